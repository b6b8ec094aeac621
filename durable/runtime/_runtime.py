"""``DurableRuntime``: an app's durable functions hosted over one backend, in this process.

The local host and the tests use it; in Azure the Functions host plays this part through the
queue triggers the adapter registers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime
from types import TracebackType
from typing import Protocol

from ..core._history import utcnow
from ._backend import Backend
from ._client import DurableOrchestrationClient
from ._registry import FunctionRegistry
from ._worker import Worker, WorkerOptions


class DurableApp(Protocol):
    """What the runtime needs of an app object (``df.DFApp``, ``df.Blueprint``): its registry,
    and a way to hand it clients once a runtime hosts it."""

    durable_functions: FunctionRegistry

    def set_client_factory(
        self,
        factory: Callable[[], DurableOrchestrationClient],
        prepare_task_hub: Callable[[], Awaitable[None]] | None = None,
    ) -> None: ...


class DurableRuntime:
    def __init__(
        self,
        app: DurableApp,
        backend: Backend,
        *,
        task_hub_name: str = "",
        clock: Callable[[], datetime] = utcnow,
        options: WorkerOptions | None = None,
    ) -> None:
        self.app = app
        self.backend = backend
        self.task_hub_name = task_hub_name
        self.clock = clock
        self.worker = Worker(app.durable_functions, backend, clock=clock, options=options)
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        app.set_client_factory(self.client)

    def client(self) -> DurableOrchestrationClient:
        return DurableOrchestrationClient(
            self.backend, registry=self.app.durable_functions, task_hub_name=self.task_hub_name, clock=self.clock
        )

    async def start(self) -> None:
        """Create the task hub if needed and start polling in the background."""
        await self.backend.create_task_hub()
        self._stop.clear()
        self._task = asyncio.create_task(self.worker.run(self._stop))

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def __aenter__(self) -> DurableRuntime:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
