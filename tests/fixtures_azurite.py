"""Pytest fixtures for tests against the Azurite storage emulator.

``azurite`` (session): a connection string to a running emulator — the one named by the
``AZURITE_CONNECTION_STRING`` environment variable, or one this fixture starts from
``node_modules/.bin/azurite`` on free local ports (data in a temporary folder, removed at the end).
``azure_backend`` (function): a fresh ``AzureStorageBackend`` on a unique task hub, with a
``StorageRequestCounter`` attached as ``backend.counter``; the hub is deleted afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from durable.host._azurite import Azurite
from storage.azure import AzureStorageBackend, StorageRequestCounter


@pytest.fixture(scope="session")
def azurite() -> Iterator[str]:
    existing = os.environ.get("AZURITE_CONNECTION_STRING")
    if existing:
        yield existing
        return
    with Azurite() as emulator:
        yield emulator.connection_string


def unique_task_hub(prefix: str = "test") -> str:
    return f"{prefix}{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def azure_backend(azurite: str) -> AsyncIterator[AzureStorageBackend]:
    backend = AzureStorageBackend(azurite, task_hub=unique_task_hub(), counter=StorageRequestCounter())
    await backend.create_task_hub()
    try:
        yield backend
    finally:
        try:
            await backend.delete_task_hub()
        finally:
            await backend.close()
