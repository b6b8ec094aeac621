"""``df.connect``: a client for scripts and tests, outside any function."""

from __future__ import annotations

from typing import Any

from ..runtime._client import DurableOrchestrationClient


def connect(
    connection_string: str, task_hub_name: str = "DurableHub", partition_count: int = 4, **options: Any
) -> DurableOrchestrationClient:
    """A client of the task hub ``task_hub_name`` (the app's ``host.json`` hub name) in the
    storage account of ``connection_string`` (``UseDevelopmentStorage=true`` for Azurite). Close it
    with ``await client.close()`` or use it as ``async with``."""
    from storage.azure import AzureStorageBackend  # the host layer picks the backend; the client is storage-agnostic

    backend = AzureStorageBackend(connection_string, task_hub=task_hub_name, partition_count=partition_count)
    return DurableOrchestrationClient(backend, task_hub_name=task_hub_name, **options)
