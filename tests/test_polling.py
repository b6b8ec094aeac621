"""How an idle poller waits (``durable.runtime._polling``): an empty queue costs one cheap check
per idle interval, a queue that still holds messages (which a dead worker may have leased) is
received from every busy interval, and a send of this process wakes the poller at once or when
its message comes due."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import durable as df
from durable.core._history import utcnow
from durable.core._messages import MessageTarget, WorkMessage
from durable.runtime._backend import control_queue, partition_of
from durable.runtime._polling import RECOVERY_SECONDS, PollIntervals, poll
from storage import InMemoryBackend

S = df.OrchestrationRuntimeStatus


class Spy:
    """Counts what a poller asks of its queue."""

    def __init__(self, backend: InMemoryBackend, queue: str) -> None:
        self.backend, self.queue = backend, queue
        self.receives = self.checks = 0

    async def once(self) -> int:
        self.receives += 1
        return len(await self.backend.receive(self.queue, 32, visibility_timeout=60))

    async def is_empty(self) -> bool:
        self.checks += 1
        return await self.backend.queue_is_empty(self.queue)


async def _poll_for(spy: Spy, intervals: PollIntervals, seconds: float) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(poll(stop, asyncio.Event(), spy.once, spy.is_empty, intervals))
    await asyncio.sleep(seconds)
    stop.set()
    await task


async def test_an_empty_queue_is_checked_not_received_from_once_backed_off() -> None:
    spy = Spy(InMemoryBackend(), control_queue(0))
    await _poll_for(spy, PollIntervals(minimum=0.01, busy=0.04, idle=0.5), 1.2)
    # back-off 0.01, 0.02, 0.04 (four receives), then one check per idle interval
    assert spy.receives <= 5, spy.receives
    assert 2 <= spy.checks <= 4, spy.checks


async def test_a_queue_holding_a_leased_message_is_still_received_from() -> None:
    backend = InMemoryBackend()
    queue = control_queue(partition_of("held", backend.partition_count))
    await backend.send([WorkMessage(MessageTarget.ORCHESTRATION, "held", _raised())])
    assert await backend.receive(queue, 1, visibility_timeout=60)  # leased to a worker that dies
    spy = Spy(backend, queue)
    await _poll_for(spy, PollIntervals(minimum=0.01, busy=0.04, idle=0.5), 1.2)
    assert spy.receives >= 10, spy.receives  # every busy interval: the lease may run out


def test_the_busy_interval_keeps_the_recovery_bound() -> None:
    for lease in (1.0, 5.0, 20.0, 28.0):
        intervals = PollIntervals.for_lease(lease, max_interval=30.0)
        assert lease + intervals.busy <= RECOVERY_SECONDS
        assert intervals.idle == 30.0
    fast = PollIntervals.for_lease(20.0, max_interval=0.1)
    assert fast.busy == fast.idle == 0.1  # a short maxQueuePollingInterval: no checks needed


async def test_a_timer_fires_when_due_though_idle_queues_are_polled_rarely() -> None:
    app = df.DFApp()

    @app.orchestration_trigger(context_name="context")
    def nap(context: df.DurableOrchestrationContext):  # type: ignore[no-untyped-def]
        yield context.create_timer(context.current_utc_datetime + timedelta(seconds=1))
        return "rested"

    options = df.WorkerOptions(idle_poll_min=3.0, idle_poll_max=30.0)  # polls 3 s apart at best
    async with df.DurableRuntime(app, InMemoryBackend(), options=options) as runtime:
        client = runtime.client()
        instance_id = await client.start_new("nap")
        started = time.monotonic()
        status = await client.wait_for_completion(instance_id, timeout=10)
        # woken when the timer came due, not at the next poll of its queue (3 s or more away)
        assert (status.runtime_status, status.output) == (S.Completed, "rested")
        assert time.monotonic() - started < 2.5


def _raised() -> df.HistoryEvent:
    return df.HistoryEvent(df.EventType.EVENT_RAISED, utcnow(), name="ping", input="1")
