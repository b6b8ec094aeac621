"""``durable dashboard``: the dashboard on its own, over any storage account's task hub."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp import web

from storage.azure._connection import StorageConnection

from ...runtime._client import DurableOrchestrationClient
from .._settings import HostSettings
from ._server import DASHBOARD_PATH, Authorize, mount_dashboard, to_dashboard


def standalone_client(app_dir: Path, connection: StorageConnection, task_hub: str) -> DurableOrchestrationClient:
    """A client of ``task_hub`` in the storage account of ``connection`` (a connection string, or
    identity-based endpoints), with the partition count
    and queue message encoding of the app in ``app_dir`` (``host.json``), so that the app's
    workers read the messages the dashboard sends."""
    from storage.azure import AzureStorageBackend

    settings = HostSettings.load(app_dir)
    backend = AzureStorageBackend(
        connection,
        task_hub=task_hub,
        partition_count=settings.partition_count,
        base64_messages=settings.message_encoding == "base64",
    )
    return DurableOrchestrationClient(backend, task_hub_name=task_hub, route_prefix=settings.route_prefix)


async def serve_dashboard(
    client: DurableOrchestrationClient, port: int, authorize: Authorize, stop: asyncio.Event
) -> None:
    """Serve the dashboard on 127.0.0.1:``port`` until ``stop`` is set (``/`` leads to it)."""
    server = web.Application()
    mount_dashboard(server, client, authorize)
    server.router.add_get("/", to_dashboard)
    runner = web.AppRunner(server, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        print(f"Dashboard of task hub {client.task_hub_name} on http://127.0.0.1:{port}{DASHBOARD_PATH}/", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()
