"""How a storage account is reached: a connection string (Azurite's well-known development
account, what ``UseDevelopmentStorage=true`` stands for), or identity-based endpoints with a token
credential; and the SDK service clients built from either."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from azure.data.tables.aio import TableServiceClient
from azure.storage.blob.aio import BlobServiceClient
from azure.storage.queue.aio import QueueClient, QueueServiceClient

if TYPE_CHECKING:
    from azure.core.credentials_async import AsyncTokenCredential

# Azurite's well-known development account (the same in every installation; not a secret).
DEV_ACCOUNT = "devstoreaccount1"
DEV_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
DEFAULT_PORTS = (10000, 10001, 10002)  # blob, queue, table: what UseDevelopmentStorage=true means


def connection_string(blob_port: int, queue_port: int, table_port: int, host: str = "127.0.0.1") -> str:
    return (
        f"DefaultEndpointsProtocol=http;AccountName={DEV_ACCOUNT};AccountKey={DEV_KEY};"
        f"BlobEndpoint=http://{host}:{blob_port}/{DEV_ACCOUNT};"
        f"QueueEndpoint=http://{host}:{queue_port}/{DEV_ACCOUNT};"
        f"TableEndpoint=http://{host}:{table_port}/{DEV_ACCOUNT};"
    )


def resolve_connection_string(value: str) -> str:
    """``UseDevelopmentStorage=true`` → the explicit Azurite connection string on default ports."""
    if value.replace(" ", "").lower() == "usedevelopmentstorage=true":
        return connection_string(*DEFAULT_PORTS)
    return value


@dataclass(frozen=True)
class StorageEndpoints:
    """An identity-based connection: the account's service URLs and the Entra ID token credential
    (an ``azure.identity.aio`` credential, say) that authorizes the requests, instead of a key."""

    blob_url: str
    queue_url: str
    table_url: str
    credential: AsyncTokenCredential
    # The credential was made for this connection: the backend given it closes it on close().
    close_credential: bool = False
    # azure-core's transport option: True, or the path of a CA bundle (a private CA, a local
    # emulator's self-signed certificate).
    connection_verify: bool | str = True

    def __post_init__(self) -> None:
        for name in ("blob_url", "queue_url", "table_url"):
            url = urlsplit(getattr(self, name))
            # Bearer tokens go over HTTPS only (storage and its SDKs refuse them over HTTP): say so early.
            if url.scheme != "https" or not url.hostname:
                raise ValueError(f"{name} must be an https:// URL for a token credential, got {getattr(self, name)!r}")


# What a storage account is reached with: a connection string, or identity-based endpoints.
StorageConnection = str | StorageEndpoints

_PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy")


def _http_options(options: dict[str, Any]) -> dict[str, Any]:
    """The clients' transport options. aiohttp, told to trust the environment (azure-core's
    default), looks up ~/.netrc and the proxy variables on a thread for every request — two
    executor round trips per storage request. The environment is read here once instead: with
    no proxy variable set there is nothing to trust (and a netrc entry for a storage host would
    only clash with the request's own Authorization header)."""
    if "use_env_settings" not in options:
        names = {name.lower() for name in os.environ}
        options = {**options, "use_env_settings": any(name in names for name in _PROXY_VARIABLES)}
    return options


def table_service_client(connection: StorageConnection, **options: Any) -> TableServiceClient:
    options = _http_options(options)
    if isinstance(connection, StorageEndpoints):
        return TableServiceClient(
            connection.table_url, credential=connection.credential, **_transport(connection), **options
        )
    return TableServiceClient.from_connection_string(resolve_connection_string(connection), **options)


def queue_service_client(connection: StorageConnection, **options: Any) -> QueueServiceClient:
    options = _http_options(options)
    if isinstance(connection, StorageEndpoints):
        return QueueServiceClient(
            connection.queue_url, credential=connection.credential, **_transport(connection), **options
        )
    return QueueServiceClient.from_connection_string(resolve_connection_string(connection), **options)


def blob_service_client(connection: StorageConnection, **options: Any) -> BlobServiceClient:
    options = _http_options(options)
    if isinstance(connection, StorageEndpoints):
        return BlobServiceClient(
            connection.blob_url, credential=connection.credential, **_transport(connection), **options
        )
    return BlobServiceClient.from_connection_string(resolve_connection_string(connection), **options)


def queue_client(connection: StorageConnection, queue_name: str, **options: Any) -> QueueClient:
    options = _http_options(options)
    if isinstance(connection, StorageEndpoints):
        return QueueClient(
            connection.queue_url, queue_name, credential=connection.credential, **_transport(connection), **options
        )
    return QueueClient.from_connection_string(resolve_connection_string(connection), queue_name, **options)


def _transport(endpoints: StorageEndpoints) -> dict[str, Any]:
    return {"connection_verify": endpoints.connection_verify}
