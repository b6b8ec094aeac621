"""Shared fixtures: a controllable clock and an in-process runtime on the in-memory backend.

Azurite fixtures live in ``tests/fixtures_azurite.py``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta, timezone

import pytest

import durable as df
from storage import InMemoryBackend

pytest_plugins = ["tests.fixtures_azurite", "tests.fixtures_host"]


class FakeClock:
    """A clock that only moves when told to; the in-memory queues and the worker both read it."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 1, 1, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def app() -> df.DFApp:
    return df.DFApp()


class CrashOnce:
    """A ``WorkerOptions.fault_hook`` under which the worker dies (raises, as a process killed
    there would stop) the first time it passes ``point``; ``crashed`` names the instance it was at."""

    def __init__(self, point: str) -> None:
        self.point = point
        self.crashed: list[str] = []

    def __call__(self, point: str, instance_id: str) -> None:
        if point == self.point and not self.crashed:
            self.crashed.append(instance_id)
            raise ConnectionError(f"worker died at '{point}'")


@pytest.fixture
def make_runtime(clock: FakeClock) -> Callable[[df.Blueprint], df.DurableRuntime]:
    """Builds a runtime for an app on a fresh in-memory backend driven by the fake clock.

    Tests drive it step by step with ``runtime.worker.run_until_idle()``. Activities go through
    the work-item queue unless ``inline=True`` (the production default, covered by
    test_inline_activities.py and the Azurite tests), so each step of the protocol is visible."""

    def make(app: df.Blueprint, inline: bool = False) -> df.DurableRuntime:
        backend = InMemoryBackend(partition_count=4, clock=clock)
        return df.DurableRuntime(app, backend, clock=clock, options=df.WorkerOptions(inline_activities=inline))

    return make


@pytest.fixture
async def runtime(
    app: df.DFApp, make_runtime: Callable[[df.Blueprint], df.DurableRuntime]
) -> AsyncIterator[df.DurableRuntime]:
    yield make_runtime(app)
