"""The two execution modes share one path and one failure semantics.

The polling worker receives batches and acknowledges on its own; under the Functions host each
queue message is one function invocation (``Worker.process_deliveries``) that the host deletes when
the function returns and makes visible again (up to its dequeue limit) when it raises. The same
scenarios run in both modes here, on the in-memory backend, with the host's part played by
``HostMode`` below."""

from __future__ import annotations

import dataclasses
from collections import Counter
from datetime import timedelta

import pytest

import durable as df
from durable import EventType
from durable.host._functions import HostAcknowledger, PoisonMessageError
from durable.runtime._backend import WORK_ITEM_QUEUE, ReceivedMessage, control_queue
from tests.conftest import CrashOnce

S = df.OrchestrationRuntimeStatus


class HostMode:
    """What the Functions host does with the task hub's queue triggers: one message per
    invocation; delete on return, retry after the visibility timeout on an exception, poison
    after ``max_dequeue_count``."""

    def __init__(self, runtime: df.DurableRuntime, max_dequeue_count: int = 5) -> None:
        self.runtime = runtime
        self.backend = runtime.backend
        self.max_dequeue_count = max_dequeue_count
        # Retries and poisoning are the host's business (as in durable.host._functions.HostedRuntime).
        options = dataclasses.replace(runtime.worker.options, max_dequeue_count=1_000_000)
        self.worker = df.Worker(runtime.worker.registry, self.backend, clock=runtime.clock, options=options,
                                acks=HostAcknowledger(self.backend, runtime.clock))  # fmt: skip
        self.poisoned: list[str] = []

    async def run_until_idle(self) -> None:
        queues = [control_queue(p) for p in range(self.backend.partition_count)] + [WORK_ITEM_QUEUE]
        for _ in range(10_000):
            handled = 0
            for queue in queues:
                # One invocation per queue message: the deliveries of an envelope go together.
                invocations: dict[int, list[ReceivedMessage]] = {}
                for delivery in await self.backend.receive(queue, 16, 30.0):
                    assert isinstance(delivery, ReceivedMessage)
                    invocations.setdefault(id(delivery.receipt), []).append(delivery)
                for deliveries in invocations.values():
                    handled += 1
                    await self._invoke(deliveries)
            if not handled:
                return
        raise RuntimeError("still busy")

    async def _invoke(self, deliveries: list[ReceivedMessage]) -> None:
        first = deliveries[0]
        try:
            await self.worker.process_deliveries(deliveries)
        except PoisonMessageError:
            for delivery in deliveries:
                await self.backend.poison(delivery, "poisoned")
            return
        except Exception:
            if first.dequeue_count >= self.max_dequeue_count:
                self.poisoned.extend(d.message.id for d in deliveries)
                for delivery in deliveries:
                    await self.backend.poison(delivery, "failed too often")
            return  # visible again once its visibility timeout passes
        for delivery in deliveries:
            await self.backend.delete(delivery)


@pytest.fixture(params=["polling worker", "functions host"])
def mode(request):  # type: ignore[no-untyped-def]
    return request.param


def _driver(runtime: df.DurableRuntime, mode: str):  # type: ignore[no-untyped-def]
    return runtime.worker if mode == "polling worker" else HostMode(runtime)


async def _settle(runtime, driver, clock, rounds: int = 3) -> None:  # type: ignore[no-untyped-def]
    for _ in range(rounds):
        await driver.run_until_idle()
        clock.advance(31)  # past the retry delay and the host's visibility timeout
    await driver.run_until_idle()


def _register(app: df.DFApp, calls: Counter) -> None:
    @app.orchestration_trigger(context_name="context")
    def chain(context):
        a = yield context.call_activity("step", "a")
        go = yield context.wait_for_external_event("go")
        b = yield context.call_activity("step", "b")
        return [a, go, b]

    @app.activity_trigger(input_name="x")
    def step(x):
        calls[x] += 1
        return x.upper()


@pytest.mark.parametrize("inline", [False, True])
async def test_an_orchestration_completes_the_same_way(app, make_runtime, clock, mode, inline):
    calls: Counter = Counter()
    _register(app, calls)
    runtime = make_runtime(app, inline=inline)
    driver = _driver(runtime, mode)
    client = runtime.client()
    await client.start_new("chain", "c")
    await _settle(runtime, driver, clock)
    await client.raise_event("c", "go", "G")
    await _settle(runtime, driver, clock)
    status = await client.get_status("c")
    assert status.runtime_status is S.Completed and status.output == ["A", "G", "B"]
    assert calls == Counter({"a": 1, "b": 1})
    assert runtime.backend.pending_count() == 0


@pytest.mark.parametrize("point", ["committed", "sent", "projected"])
async def test_a_crash_at_any_point_of_a_step_loses_nothing_and_repeats_nothing(app, make_runtime, clock, mode, point):
    calls: Counter = Counter()
    _register(app, calls)
    runtime = make_runtime(app)
    runtime.worker.options.fault_hook = crash = CrashOnce(point)
    driver = _driver(runtime, mode)
    client = runtime.client()
    await client.start_new("chain", "c")
    await _settle(runtime, driver, clock)
    await client.raise_event("c", "go", "G")
    await _settle(runtime, driver, clock)
    assert crash.crashed == ["c"]
    status = await client.get_status("c")
    assert status.runtime_status is S.Completed and status.output == ["A", "G", "B"]
    history = (await runtime.backend.load_history("c")).events
    assert [e.event_type for e in history].count(EventType.TASK_COMPLETED) == 2
    assert [e.event_type for e in history].count(EventType.EVENT_RAISED) == 1
    assert runtime.backend.pending_count() == 0


async def test_an_early_message_is_put_back_the_same_way(app, make_runtime, clock, mode):
    @app.entity_trigger(context_name="context", entity_name="tally")
    def tally(context):
        context.set_state(context.get_state(int) + 1)

    runtime = make_runtime(app)
    driver = _driver(runtime, mode)
    client = runtime.client()
    entity = df.EntityId("tally", "t")
    await client.signal_entity(entity, "add", None, scheduled_time=clock.now + timedelta(days=9))
    clock.advance(7 * 24 * 3600)  # the queue gives it back after 7 days at most
    await driver.run_until_idle()
    assert (await client.read_entity_state(entity)).entity_exists is False
    clock.advance(2 * 24 * 3600 + 1)
    await driver.run_until_idle()
    assert (await client.read_entity_state(entity)).entity_state == 1
