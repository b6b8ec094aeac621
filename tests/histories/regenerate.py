"""Re-record the history fixtures of this folder: ``python -m tests.histories.regenerate [--out DIR]``.

Each scenario runs orchestrators of ``orchestrators.bp`` on a fresh in-memory backend with a clock
that only moves when told to, and saves the stored history of the instances it names as
``ReplayHistory`` JSON. Random ids (execution ids, message ids) come from a generator seeded with the
scenario's name, and failures are saved without their stack traces (which name files and line numbers
of this checkout), so re-recording with an unchanged engine gives the same files.

The fixtures are meant to stay as recorded: they stand for histories an older version left in a task
hub, which the current code must still replay. Re-record only to add scenarios or when the history
format itself changes on purpose.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import uuid
import zlib
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from unittest import mock

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import durable as df
from durable import EventType, ReplayHistory
from storage import InMemoryBackend
from tests.histories import orchestrators

FOLDER = Path(__file__).resolve().parent
S = df.OrchestrationRuntimeStatus


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class Recording:
    """One scenario's runtime, and the instances whose histories it saves (file stem -> instance id)."""

    def __init__(self, inline: bool) -> None:
        self.clock = Clock()
        self.backend = InMemoryBackend(partition_count=4, clock=self.clock)
        self.runtime = df.DurableRuntime(
            orchestrators.bp,
            self.backend,
            clock=self.clock,
            options=df.WorkerOptions(inline_activities=inline),
        )
        self.client = self.runtime.client()
        self.saved: dict[str, str] = {}

    async def idle(self) -> None:
        await self.runtime.worker.run_until_idle()

    async def expect(self, instance_id: str, status: df.OrchestrationRuntimeStatus) -> None:
        found = await self.client.get_status(instance_id)
        assert found is not None and found.runtime_status is status, (instance_id, found)

    async def events(self, instance_id: str) -> list[df.HistoryEvent]:
        return (await self.backend.load_history(instance_id)).events


Scenario = Callable[[Recording], Awaitable[None]]
SCENARIOS: dict[str, tuple[Scenario, bool]] = {}  # name -> (scenario, inline activities)


def scenario(inline: bool = False) -> Callable[[Scenario], Scenario]:
    def register(function: Scenario) -> Scenario:
        SCENARIOS[function.__name__] = (function, inline)
        return function

    return register


@scenario()
async def activity_chain(rec: Recording) -> None:
    await rec.client.start_new("chain", "chain-1")
    await rec.idle()
    await rec.expect("chain-1", S.Completed)
    rec.saved["activity_chain"] = "chain-1"


@scenario(inline=True)
async def activity_chain_inline(rec: Recording) -> None:
    """The same chain with activities run inline, as in production: several steps per commit."""
    await rec.client.start_new("chain", "chain-inline-1")
    await rec.idle()
    await rec.expect("chain-inline-1", S.Completed)
    rec.saved["activity_chain_inline"] = "chain-inline-1"


@scenario()
async def fan_out_fan_in(rec: Recording) -> None:
    await rec.client.start_new("fan_out", "fan-out-1", 5)
    await rec.idle()
    await rec.expect("fan-out-1", S.Completed)
    rec.saved["fan_out_fan_in"] = "fan-out-1"


@scenario()
async def timer_and_event(rec: Recording) -> None:
    await rec.client.start_new("approval", "approval-1")
    await rec.idle()
    rec.clock.advance(300)  # the cooling-off timer fires
    await rec.idle()
    await rec.expect("approval-1", S.Running)
    await rec.client.raise_event("approval-1", "Approval", "yes")
    await rec.idle()
    await rec.expect("approval-1", S.Completed)
    rec.saved["timer_and_event"] = "approval-1"


@scenario()
async def awaiting_approval(rec: Recording) -> None:
    """The same orchestration, still running: waiting for the approval."""
    await rec.client.start_new("approval", "approval-2")
    await rec.idle()
    rec.clock.advance(300)
    await rec.idle()
    await rec.expect("approval-2", S.Running)
    rec.saved["awaiting_approval"] = "approval-2"


@scenario()
async def continue_as_new(rec: Recording) -> None:
    await rec.client.start_new("counter", "counter-1", 0)
    await rec.idle()
    await rec.client.raise_event("counter-1", "add", 1)
    await rec.idle()
    # Both in one step: 2 is consumed, 0 waits and is carried into the next execution, which ends.
    await rec.client.raise_event("counter-1", "add", 2)
    await rec.client.raise_event("counter-1", "add", 0)
    await rec.idle()
    await rec.expect("counter-1", S.Completed)
    events = await rec.events("counter-1")
    started = next(i for i, e in enumerate(events) if e.event_type is EventType.EXECUTION_STARTED)
    assert events[started].input == "3", events[started]
    assert events[started + 1].event_type is EventType.EVENT_RAISED, "the carried event"
    rec.saved["continue_as_new"] = "counter-1"


@scenario()
async def rewind(rec: Recording) -> None:
    orchestrators.FLAKY["fail"] = True
    try:
        await rec.client.start_new("rewound", "rewind-1")
        await rec.idle()
        await rec.expect("rewind-1", S.Failed)
        orchestrators.FLAKY["fail"] = False
        await rec.client.rewind("rewind-1", "the service is back")
        await rec.idle()
    finally:
        orchestrators.FLAKY["fail"] = True
    await rec.expect("rewind-1", S.Completed)
    assert any(e.event_type is EventType.EXECUTION_REWOUND for e in await rec.events("rewind-1"))
    rec.saved["rewind"] = "rewind-1"


@scenario()
async def failed_activity(rec: Recording) -> None:
    await rec.client.start_new("failing", "failing-1")
    await rec.idle()
    await rec.expect("failing-1", S.Failed)
    rec.saved["failed_activity"] = "failing-1"


@scenario()
async def critical_section(rec: Recording) -> None:
    await rec.client.start_new("transfer", "transfer-1")
    await rec.idle()
    await rec.expect("transfer-1", S.Completed)
    state = await rec.client.read_entity_state(df.EntityId("account", "b"))
    assert state.entity_exists and state.entity_state == 110, state
    rec.saved["critical_section"] = "transfer-1"


@scenario()
async def terminated_in_critical_section(rec: Recording) -> None:
    """Terminated while holding a lock: the step that records the termination releases it (and
    tells the entity this execution sends no more)."""
    await rec.client.start_new("guarded", "guarded-1")
    await rec.idle()
    await rec.client.terminate("guarded-1", "taking too long")
    await rec.idle()
    await rec.expect("guarded-1", S.Terminated)
    events = await rec.events("guarded-1")
    assert [e.name for e in events if e.event_type is EventType.EVENT_SENT] == ["lock", "release", "retire"], events
    rec.saved["terminated_in_critical_section"] = "guarded-1"


@scenario()
async def sub_orchestration(rec: Recording) -> None:
    await rec.client.start_new("parent", "parent-1")
    await rec.idle()
    await rec.expect("parent-1", S.Completed)
    rec.saved["sub_orchestration"] = "parent-1"
    rec.saved["sub_orchestration_child"] = "parent-1-child"


async def _record(name: str) -> dict[str, ReplayHistory]:
    run, inline = SCENARIOS[name]
    rec = Recording(inline)
    await run(rec)
    histories = {stem: await ReplayHistory.load(rec.backend, iid) for stem, iid in rec.saved.items()}
    for history in histories.values():
        history.events = [_without_stack_trace(e) for e in history.events]
    return histories


def _without_stack_trace(event: df.HistoryEvent) -> df.HistoryEvent:
    if event.failure is None or event.failure.stack_trace is None:
        return event
    return event.replace(failure=df.FailureDetails(event.failure.error_type, event.failure.message))


def _seeded_uuid4(seed: str) -> Callable[[], uuid.UUID]:
    generator = random.Random(zlib.crc32(seed.encode()))
    return lambda: uuid.UUID(int=generator.getrandbits(128), version=4)


def regenerate(folder: Path = FOLDER) -> list[Path]:
    """Record every scenario and write its histories to ``folder``; returns the files written."""
    written = []
    for name in SCENARIOS:
        with mock.patch("uuid.uuid4", _seeded_uuid4(name)):
            histories = asyncio.run(_record(name))
        for stem, history in histories.items():
            path = folder / f"{stem}.json"
            path.write_text(history.to_json() + "\n", encoding="utf-8")
            written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=FOLDER, help="folder to write to (default: this one)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for path in regenerate(args.out):
        print(path)


if __name__ == "__main__":
    main()
