"""Pytest fixtures for tests against the Azurite storage emulator.

``azurite`` (session): a connection string to a running emulator — the one named by the
``AZURITE_CONNECTION_STRING`` environment variable, or one this fixture starts from
``node_modules/.bin/azurite`` on free local ports (in-memory, stopped at the end of the session).
``azure_backend`` (function): a fresh ``AzureStorageBackend`` on a unique task hub, with a
``StorageRequestCounter`` attached as ``backend.counter``; the hub is deleted afterwards.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from storage.azure import AzureStorageBackend, StorageRequestCounter

REPO_ROOT = Path(__file__).resolve().parent.parent
AZURITE_BIN = REPO_ROOT / "node_modules" / ".bin" / "azurite"
# Azurite's well-known development account key (the same for every Azurite installation).
DEV_ACCOUNT = "devstoreaccount1"
DEV_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
STARTUP_TIMEOUT = 30.0


def azurite_connection_string(
    blob_port: int, queue_port: int, table_port: int, host: str = "127.0.0.1"
) -> str:
    return (
        f"DefaultEndpointsProtocol=http;AccountName={DEV_ACCOUNT};AccountKey={DEV_KEY};"
        f"BlobEndpoint=http://{host}:{blob_port}/{DEV_ACCOUNT};"
        f"QueueEndpoint=http://{host}:{queue_port}/{DEV_ACCOUNT};"
        f"TableEndpoint=http://{host}:{table_port}/{DEV_ACCOUNT};"
    )


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def azurite() -> Iterator[str]:
    existing = os.environ.get("AZURITE_CONNECTION_STRING")
    if existing:
        yield existing
        return
    if not AZURITE_BIN.exists():
        raise RuntimeError(f"Azurite is not installed at {AZURITE_BIN}: run `npm ci` (the Makefile does)")
    blob_port, queue_port, table_port = _free_ports(3)
    # --inMemoryPersistence and --location are mutually exclusive in Azurite 3.x; run it from a temp
    # directory so nothing (debug logs, workspace files) lands in the repository.
    workdir = tempfile.mkdtemp(prefix="azurite-")
    log = open(os.path.join(workdir, "azurite.log"), "wb")  # noqa: SIM115  (closed at teardown)
    process = subprocess.Popen(
        [
            str(AZURITE_BIN),
            "--silent",
            "--skipApiVersionCheck",
            "--disableTelemetry",
            "--loose",
            "--inMemoryPersistence",
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            str(blob_port),
            "--queueHost",
            "127.0.0.1",
            "--queuePort",
            str(queue_port),
            "--tableHost",
            "127.0.0.1",
            "--tablePort",
            str(table_port),
        ],
        cwd=workdir,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not all(_accepts(p) for p in (blob_port, queue_port, table_port)):
            if process.poll() is not None:
                log.flush()
                output = Path(workdir, "azurite.log").read_text(errors="replace")
                raise RuntimeError(f"Azurite exited with {process.returncode}:\n{output}")
            if time.monotonic() > deadline:
                raise RuntimeError("Azurite did not start listening in time")
            time.sleep(0.1)
        yield azurite_connection_string(blob_port, queue_port, table_port)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


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
