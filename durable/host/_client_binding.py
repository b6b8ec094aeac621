"""What a client of the management API needs besides storage: the keys that authorize it, the
origin its URLs point at, and the binding string of the official SDK's client class.

Durable Functions authorizes its management API with a system key of its own
(``durabletask_extension``) or the master key, and hands out only the system key in the URLs it
builds. Here the system key is the app setting ``DURABLE_MANAGEMENT_KEY`` (``durable start``
generates one when it enforces keys, as the Functions host generates system keys), and the master
key, when the process knows it, is ``DURABLE_MASTER_KEY`` (``durable start --master-key``).

``azure.durable_functions.DurableOrchestrationClient(binding_string)`` talks to the Durable
extension's local RPC endpoint (``rpcBaseUrl``), which takes no key and JSON payloads wrapped in
a JSON string. Ours is the management API itself under ``rpc/{token}/``: the token, derived from
the management key, authorizes it (the official client cannot add a key to its requests), and the
``rpc`` prefix tells the API to expect the official client's encoding.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import os
from dataclasses import dataclass

from ..runtime._client import DurableOrchestrationClient

# The app setting holding the management API's own key (the Durable extension's system key).
MANAGEMENT_KEY_SETTING = "DURABLE_MANAGEMENT_KEY"
MASTER_KEY_SETTING = "DURABLE_MASTER_KEY"
# Set by App Service on every Azure host: there, the management API is never left open.
AZURE_INSTANCE_SETTING = "WEBSITE_INSTANCE_ID"
RPC_SEGMENT = "rpc"
OPEN_RPC_TOKEN = "open"  # the token when no key is configured (a local host without keys)
# The placeholder the official client replaces with an instance id in ``managementUrls``.
INSTANCE_ID_PLACEHOLDER = "INSTANCEID"


def same_key(expected: str, presented: str) -> bool:
    """Constant-time comparison of two keys, any characters allowed (compared as UTF-8 bytes;
    ``hmac.compare_digest`` refuses non-ASCII ``str``)."""
    return hmac.compare_digest(expected.encode("utf-8", "surrogatepass"), presented.encode("utf-8", "surrogatepass"))


@dataclass(frozen=True)
class ManagementKeys:
    """The keys that open the management API. With none configured it is open, except on Azure."""

    system_key: str | None = None
    master_key: str | None = None
    on_azure: bool = False

    @classmethod
    def from_environment(cls) -> ManagementKeys:
        return cls(
            os.environ.get(MANAGEMENT_KEY_SETTING) or None,
            os.environ.get(MASTER_KEY_SETTING) or None,
            bool(os.environ.get(AZURE_INSTANCE_SETTING)),
        )

    @property
    def configured(self) -> bool:
        return self.system_key is not None or self.master_key is not None

    def refusal(self, presented: str | None) -> str | None:
        """Why a request presenting ``presented`` (``code=`` or ``x-functions-key``) is refused,
        or None when it is authorized."""
        if not self.configured:
            if self.on_azure:
                return f"the management API is closed: set the app setting {MANAGEMENT_KEY_SETTING} to its key"
            return None
        if not presented:
            return "the management API needs its system key (or the master key) as 'code' or 'x-functions-key'"
        if any(key is not None and same_key(key, presented) for key in (self.system_key, self.master_key)):
            return None
        return "the key presented does not open the management API (only its system key or the master key do)"

    def rpc_token(self) -> str:
        """The path segment that authorizes the official client's requests (see the module
        docstring): derived from the system key, so that the key itself is not in the URL."""
        secret = self.system_key or self.master_key
        if secret is None:
            return OPEN_RPC_TOKEN
        return hmac.new(secret.encode("utf-8", "surrogatepass"), b"durable-rpc", hashlib.sha256).hexdigest()

    def rpc_refusal(self, token: str) -> str | None:
        if not self.configured and self.on_azure:
            return self.refusal(None)
        if same_key(self.rpc_token(), token):
            return None
        return "the RPC token does not open the management API"


class DurableClient(DurableOrchestrationClient):
    """The client ``durable_client_input`` hands over: the runtime's client with its management
    URLs pinned to the configured origin, plus the official SDK's binding string."""

    @classmethod
    def of(cls, client: DurableOrchestrationClient) -> DurableClient:
        """A copy of ``client`` (sharing its storage) with this class's additions. The runtime
        builds clients; copying keeps this class free of their constructor's details."""
        bound = copy.copy(client)
        bound.__class__ = cls
        # Durable Functions takes the origin of management URLs from the request; a Host header
        # is the caller's to choose, so the configured one (WEBSITE_HOSTNAME) is used instead.
        bound.http_base_url = client.management_base_url(None)
        assert isinstance(bound, cls)
        return bound

    @property
    def binding_string(self) -> str:
        """The JSON ``azure.durable_functions.DurableOrchestrationClient`` is built from, pointing
        at this app's management API."""
        base = self.management_base_url(None)
        links = self.create_http_management_payload(INSTANCE_ID_PLACEHOLDER)
        query = links["statusQueryGetUri"].partition("?")[2]
        start_url = f"{base}/orchestrators/{{functionName}}[/{{instanceId}}]"
        binding = {
            "taskHubName": self.task_hub_name,
            "creationUrls": {
                "createNewInstancePostUri": f"{start_url}?{query}",
                "createAndWaitOnNewInstancePostUri": (
                    f"{start_url}?timeout={{timeoutInSeconds}}&pollingInterval={{intervalInSeconds}}&{query}"
                ),
            },
            "managementUrls": {**links, "id": INSTANCE_ID_PLACEHOLDER},
            "baseUrl": base,
            "requiredQueryStringParameters": query,
            "rpcBaseUrl": f"{base}/{RPC_SEGMENT}/{ManagementKeys.from_environment().rpc_token()}/",
        }
        return json.dumps(binding)
