"""The durable functions an app registers, by kind and name: what the runtime runs.

Every registry also holds the built-in HTTP activity that ``context.call_http`` schedules, and
the app's orchestration versioning settings (the version its orchestrator code is at).
"""

from __future__ import annotations

import asyncio
import inspect
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from ..core._context import DurableOrchestrationContext
from ..core._errors import FunctionNotFound
from ..core._history import EventType, HistoryEvent
from ..core._http import HTTP_ACTIVITY_NAME, DurableHttpRequest, header
from ..core._serialization import as_type
from ..core._versioning import VersioningOptions

HTTP_TIMEOUT_SECONDS = 100.0  # per request of a durable HTTP call (Durable Functions' HttpClient default)
# The App Service managed identity endpoint protocol: https://learn.microsoft.com/azure/app-service/overview-managed-identity
_IDENTITY_API_VERSION = "2019-08-01"


@dataclass(frozen=True)
class ActivityFunction:
    name: str
    function: Callable[..., Any]
    input_name: str
    input_type: type | None = None  # activity_trigger(input_type=): what the input is decoded as

    async def invoke(self, value: Any) -> Any:
        if self.input_type is not None and value is not None:
            value = as_type(value, self.input_type)  # a PayloadError fails the activity, saying why
        if inspect.iscoroutinefunction(self.function):
            return await self.function(**{self.input_name: value})
        # Sync activities run on a thread so a slow one does not stall the worker's event loop.
        return await asyncio.to_thread(self.function, **{self.input_name: value})


class DurableHttpError(Exception):
    """A durable HTTP request could not be made (connection refused, DNS, timeout, no token)."""


async def _http_activity(request: dict[str, Any]) -> dict[str, Any]:
    """The built-in activity behind ``context.call_http``: one request, its answer as JSON."""
    call = DurableHttpRequest.from_dict(request)
    headers = dict(call.headers)
    if call.token_source is not None and header(headers, "Authorization") is None:
        headers["Authorization"] = f"Bearer {await _managed_identity_token(call.token_source)}"
    timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_SECONDS)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.request(call.method, call.uri, data=call.content, headers=headers) as response,
        ):
            content = await response.text()
            answer_headers = {name: ", ".join(response.headers.getall(name)) for name in response.headers}
            return {"statusCode": response.status, "headers": answer_headers, "content": content}
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise DurableHttpError(f"{call.method} {call.uri} failed: {type(exc).__name__}: {exc}") from None


async def _managed_identity_token(token_source: dict[str, Any]) -> str:
    """A token for the token source's resource from the app's managed identity (the endpoint
    App Service and Functions provide in ``IDENTITY_ENDPOINT``/``IDENTITY_HEADER``)."""
    endpoint, secret = os.environ.get("IDENTITY_ENDPOINT"), os.environ.get("IDENTITY_HEADER")
    if token_source.get("kind") != "AzureManagedIdentity" or not token_source.get("resource"):
        raise DurableHttpError(f"unsupported token source {token_source!r}")
    if not endpoint or not secret:
        raise DurableHttpError(
            "call_http was given a ManagedIdentityTokenSource, but this process has no managed identity "
            "(IDENTITY_ENDPOINT and IDENTITY_HEADER are not set)"
        )
    params = {"resource": token_source["resource"], "api-version": _IDENTITY_API_VERSION}
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_SECONDS)) as session,
            session.get(endpoint, params=params, headers={"X-IDENTITY-HEADER": secret}) as response,
        ):
            body = await response.json(content_type=None)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        raise DurableHttpError(f"could not get a managed identity token: {exc}") from None
    if response.status != 200 or not isinstance(body, dict) or "access_token" not in body:
        raise DurableHttpError(f"the managed identity endpoint answered {response.status}: {body!r}")
    return str(body["access_token"])


BUILTIN_ACTIVITIES = {HTTP_ACTIVITY_NAME: ActivityFunction(HTTP_ACTIVITY_NAME, _http_activity, "request")}


@dataclass(frozen=True)
class _ConfiguredOrchestrator:
    """An orchestrator with what the app registered about it, handed to its context first."""

    function: Callable[..., Any]
    input_type: type | None
    versioning: VersioningOptions

    def __call__(self, context: DurableOrchestrationContext) -> Any:
        if self.versioning.fails(context.version):
            raise self.versioning.mismatch(context.version)
        context._configure(self.input_type, self.versioning.default_version)
        return self.function(context)


@dataclass
class FunctionRegistry:
    orchestrators: dict[str, Callable[..., Any]] = field(default_factory=dict)
    activities: dict[str, ActivityFunction] = field(default_factory=dict)
    entities: dict[str, Callable[..., Any]] = field(default_factory=dict)
    # orchestration_trigger(input_type=): what context.get_input() decodes the input as
    orchestrator_input_types: dict[str, type] = field(default_factory=dict)
    # host.json defaultVersion / versionMatchStrategy / versionFailureStrategy
    versioning: VersioningOptions = field(default_factory=VersioningOptions)

    def merge(self, other: FunctionRegistry) -> None:
        for name in [*other.orchestrators, *other.activities, *other.entities]:
            self._check_free(name)
        self.orchestrators.update(other.orchestrators)
        self.orchestrator_input_types.update(other.orchestrator_input_types)
        self.activities.update(other.activities)
        self.entities.update(other.entities)

    def _check_free(self, name: str) -> None:
        if name in self.orchestrators or name in self.activities or name in self.entities:
            raise ValueError(f"a durable function named '{name}' is already registered")

    def add_orchestrator(self, name: str, function: Callable[..., Any], input_type: type | None = None) -> None:
        self._check_free(name)
        self.orchestrators[name] = function
        if input_type is not None:
            self.orchestrator_input_types[name] = input_type

    def add_activity(self, activity: ActivityFunction) -> None:
        self._check_free(activity.name)
        self.activities[activity.name] = activity

    def activity(self, name: str) -> ActivityFunction | None:
        """The app's activity ``name``, or the runtime's built-in one (``call_http``'s)."""
        return self.activities.get(name) or BUILTIN_ACTIVITIES.get(name)

    def orchestrator(self, name: str) -> Callable[..., Any] | None:
        """The code to run for orchestrator ``name``: the registered function itself, or, when the
        app set an input type or versioning for it, the function wrapped to apply them."""
        function = self.orchestrators.get(name)
        input_type = self.orchestrator_input_types.get(name)
        if function is None or (input_type is None and self.versioning == VersioningOptions()):
            return function
        return _ConfiguredOrchestrator(function, input_type, self.versioning)

    def rejects_version(self, started: HistoryEvent | None, new_events: Sequence[HistoryEvent]) -> bool:
        """Whether this app leaves the instance alone (``versionFailureStrategy`` Reject): its
        version, that of the execution ``new_events`` start if they do, does not match."""
        starts = [e for e in new_events if e.event_type is EventType.EXECUTION_STARTED]
        event = starts[-1] if starts else started
        return event is not None and self.versioning.rejects(event.version)

    def entity(self, name: str) -> Callable[..., Any] | None:
        return self.entities.get(name.lower())

    def add_entity(self, name: str, function: Callable[..., Any]) -> None:
        self._check_free(name.lower())
        self.entities[name.lower()] = function

    def require_orchestrator(self, name: str) -> Callable[..., Any]:
        function = self.orchestrators.get(name)
        if function is None:
            known = ", ".join(sorted(self.orchestrators)) or "none"
            raise FunctionNotFound(f"no orchestrator function named '{name}' (registered: {known})")
        return function
