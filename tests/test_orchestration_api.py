"""The orchestration context API and the orchestration client API."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import timedelta

import pytest

import durable as df
from durable import EventType

S = df.OrchestrationRuntimeStatus


# -- payload classes (module level so the deserializer can import them) ----------------------------
@dataclass
class Point:
    x: int
    y: int


class Money:
    """A class with the official SDK's ``to_json``/``from_json`` protocol."""

    def __init__(self, amount: int, currency: str) -> None:
        self.amount = amount
        self.currency = currency

    @staticmethod
    def to_json(obj: Money) -> str:
        return json.dumps({"amount": obj.amount, "currency": obj.currency})

    @classmethod
    def from_json(cls, data: str) -> Money:
        return cls(**json.loads(data))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Money) and (self.amount, self.currency) == (other.amount, other.currency)

    def __repr__(self) -> str:
        return f"Money({self.amount}, {self.currency!r})"


# -- context API -----------------------------------------------------------------------------------
async def test_get_input(app, runtime):
    @app.orchestration_trigger(context_name="context")
    def echo(context):
        value = context.get_input()
        yield context.call_activity("noop")
        return {"got": value, "again": context.get_input()}

    @app.activity_trigger(input_name="x")
    def noop(x):
        return None

    client = runtime.client()
    iid = await client.start_new("echo", None, {"a": [1, 2, 3], "b": "text"})
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid, show_input=True)
    assert status.runtime_status is S.Completed
    assert status.output == {"got": {"a": [1, 2, 3], "b": "text"}, "again": {"a": [1, 2, 3], "b": "text"}}
    assert status.input_ == {"a": [1, 2, 3], "b": "text"}


async def test_get_input_none(app, runtime):
    @app.orchestration_trigger(context_name="context")
    def no_input(context):
        return context.get_input() is None
        yield  # pragma: no cover

    client = runtime.client()
    iid = await client.start_new("no_input")
    await runtime.worker.run_until_idle()
    assert (await client.get_status(iid)).output is True


async def test_set_custom_status(app, runtime):
    @app.orchestration_trigger(context_name="context")
    def progress(context):
        context.set_custom_status({"stage": "waiting", "pct": 10})
        yield context.wait_for_external_event("go")
        context.set_custom_status("finishing")
        yield context.call_activity("noop")
        return "ok"

    @app.activity_trigger(input_name="x")
    def noop(x):
        return None

    client = runtime.client()
    iid = await client.start_new("progress")
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Running
    assert status.custom_status == {"stage": "waiting", "pct": 10}

    await client.raise_event(iid, "go")
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed
    assert status.custom_status == "finishing"


@pytest.mark.parametrize("sessions", [False, True], ids=["replaying", "extended-sessions"])
async def test_new_uuid_is_deterministic_across_replays(app, runtime, sessions):
    runtime.worker.options.extended_sessions = sessions
    produced: list[tuple[bool, str, str | None]] = []

    @app.orchestration_trigger(context_name="context")
    def uuids(context):
        u1 = context.new_uuid()
        u2 = context.new_uuid()
        produced.append((context.is_replaying, "u1", u1))
        produced.append((context.is_replaying, "u2", u2))
        yield context.call_activity("noop")
        u3 = context.new_uuid()
        produced.append((context.is_replaying, "u3", u3))
        yield context.call_activity("noop")
        return [u1, u2, u3]

    @app.activity_trigger(input_name="x")
    def noop(x):
        return None

    client = runtime.client()
    iid = await client.start_new("uuids")
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed
    u1, u2, u3 = status.output
    for value in (u1, u2, u3):
        uuid.UUID(value)  # a well-formed UUID
    assert len({u1, u2, u3}) == 3

    by_label: dict[str, list[tuple[bool, str]]] = {}
    for replaying, label, value in produced:
        by_label.setdefault(label, []).append((replaying, value))
    if sessions:  # one live execution took all three steps: the code ran once
        assert by_label == {"u1": [(False, u1)], "u2": [(False, u2)], "u3": [(False, u3)]}
        return
    # the orchestrator ran 3 times (one per step); u1/u2 were produced 3 times, u3 twice
    assert [v for _, v in by_label["u1"]] == [u1, u1, u1]
    assert [v for _, v in by_label["u2"]] == [u2, u2, u2]
    assert [v for _, v in by_label["u3"]] == [u3, u3]
    assert [r for r, _ in by_label["u1"]] == [False, True, True]
    assert [r for r, _ in by_label["u3"]] == [False, True]


async def test_new_uuid_differs_between_instances(app, runtime):
    @app.orchestration_trigger(context_name="context")
    def one_uuid(context):
        return context.new_uuid()
        yield  # pragma: no cover

    client = runtime.client()
    a = await client.start_new("one_uuid", "inst-a")
    b = await client.start_new("one_uuid", "inst-b")
    await runtime.worker.run_until_idle()
    assert (await client.get_status(a)).output != (await client.get_status(b)).output


@pytest.mark.parametrize("sessions", [False, True], ids=["replaying", "extended-sessions"])
async def test_current_utc_datetime_and_is_replaying(app, runtime, clock, sessions):
    runtime.worker.options.extended_sessions = sessions
    seen: list[tuple[str, object, bool]] = []

    @app.orchestration_trigger(context_name="context")
    def timed(context):
        seen.append(("start", context.current_utc_datetime, context.is_replaying))
        yield context.wait_for_external_event("e1")
        seen.append(("after e1", context.current_utc_datetime, context.is_replaying))
        yield context.wait_for_external_event("e2")
        seen.append(("after e2", context.current_utc_datetime, context.is_replaying))
        return context.current_utc_datetime.isoformat()

    client = runtime.client()
    t0 = clock()
    iid = await client.start_new("timed")
    await runtime.worker.run_until_idle()
    assert seen == [("start", t0, False)]

    seen.clear()
    clock.advance(5)
    await client.raise_event(iid, "e1")
    await runtime.worker.run_until_idle()
    t1 = t0 + timedelta(seconds=5)
    replayed = [] if sessions else [("start", t0, True)]
    assert seen == [*replayed, ("after e1", t1, False)]

    seen.clear()
    clock.advance(7)
    await client.raise_event(iid, "e2")
    await runtime.worker.run_until_idle()
    t2 = t1 + timedelta(seconds=7)
    replayed = [] if sessions else [("start", t0, True), ("after e1", t1, True)]
    assert seen == [*replayed, ("after e2", t2, False)]
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed
    assert status.output == t2.isoformat()


async def test_instance_id_and_parent_instance_id(app, runtime):
    @app.orchestration_trigger(context_name="context")
    def outer(context):
        inner_ids = yield context.call_sub_orchestrator("inner", None, instance_id="the-inner")
        return {"self": context.instance_id, "parent": context.parent_instance_id, "inner": inner_ids}

    @app.orchestration_trigger(context_name="context")
    def inner(context):
        return {"self": context.instance_id, "parent": context.parent_instance_id}
        yield  # pragma: no cover

    client = runtime.client()
    iid = await client.start_new("outer", "the-outer")
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed
    assert status.output == {
        "self": "the-outer",
        "parent": None,
        "inner": {"self": "the-inner", "parent": "the-outer"},
    }


# -- external events -------------------------------------------------------------------------------
async def test_event_raised_before_orchestrator_starts_is_buffered(app, runtime):
    @app.orchestration_trigger(context_name="context")
    def waiter(context):
        yield context.call_activity("noop")
        value = yield context.wait_for_external_event("Ready")
        return value

    @app.activity_trigger(input_name="x")
    def noop(x):
        return None

    client = runtime.client()
    iid = await client.start_new("waiter")
    await client.raise_event(iid, "Ready", {"n": 1})  # before any worker ran
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed
    assert status.output == {"n": 1}


async def test_event_raised_while_waiting_on_activity_is_buffered(app, runtime):
    @app.orchestration_trigger(context_name="context")
    def waiter(context):
        a = yield context.call_activity("noop", "a")
        value = yield context.wait_for_external_event("Ready")
        return [a, value]

    @app.activity_trigger(input_name="x")
    def noop(x):
        return x

    client = runtime.client()
    iid = await client.start_new("waiter")
    await runtime.worker.run_orchestrations_once()  # first step only: the activity is scheduled, not run
    history = (await runtime.backend.load_history(iid)).events
    assert any(e.event_type is EventType.TASK_SCHEDULED for e in history)
    assert not any(e.event_type is EventType.TASK_COMPLETED for e in history)

    await client.raise_event(iid, "Ready", 42)
    await runtime.worker.run_orchestrations_once()  # the event arrives while the activity is pending
    history = (await runtime.backend.load_history(iid)).events
    assert any(e.event_type is EventType.EVENT_RAISED for e in history)
    assert (await client.get_status(iid)).runtime_status is S.Running

    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed
    assert status.output == ["a", 42]


async def test_event_names_match_case_insensitively(app, runtime):
    @app.orchestration_trigger(context_name="context")
    def approval(context):
        value = yield context.wait_for_external_event("Approval")
        return value

    client = runtime.client()
    iid = await client.start_new("approval")
    await runtime.worker.run_until_idle()
    await client.raise_event(iid, "APPROVAL", "yes")
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed
    assert status.output == "yes"


async def test_same_event_twice_delivered_in_order(app, runtime):
    @app.orchestration_trigger(context_name="context")
    def twice(context):
        first = yield context.wait_for_external_event("Item")
        second = yield context.wait_for_external_event("Item")
        return [first, second]

    client = runtime.client()
    iid = await client.start_new("twice")
    await runtime.worker.run_until_idle()
    await client.raise_event(iid, "Item", 1)
    await client.raise_event(iid, "Item", 2)
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed
    assert status.output == [1, 2]


async def test_same_event_twice_in_separate_steps(app, runtime):
    @app.orchestration_trigger(context_name="context")
    def twice(context):
        first = yield context.wait_for_external_event("Item")
        second = yield context.wait_for_external_event("Item")
        return [first, second]

    client = runtime.client()
    iid = await client.start_new("twice")
    await runtime.worker.run_until_idle()
    await client.raise_event(iid, "Item", "one")
    await runtime.worker.run_until_idle()
    assert (await client.get_status(iid)).runtime_status is S.Running
    await client.raise_event(iid, "item", "two")
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed
    assert status.output == ["one", "two"]


async def test_continue_as_new_carries_unconsumed_events(app, runtime):
    @app.orchestration_trigger(context_name="context")
    def carry(context):
        generation = context.get_input()
        if generation == 0:
            first = yield context.wait_for_external_event("First")
            context.continue_as_new(1)
            return first
        second = yield context.wait_for_external_event("Second")
        return {"generation": generation, "second": second}

    client = runtime.client()
    iid = await client.start_new("carry", None, 0)
    await runtime.worker.run_until_idle()
    await client.raise_event(iid, "Second", "kept")  # arrives first: buffered, not consumed
    await runtime.worker.run_until_idle()
    assert (await client.get_status(iid)).runtime_status is S.Running
    await client.raise_event(iid, "First", "go")  # triggers continue_as_new
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed
    assert status.output == {"generation": 1, "second": "kept"}


# -- payloads --------------------------------------------------------------------------------------
async def test_class_payloads_round_trip(app, runtime):
    @app.orchestration_trigger(context_name="context")
    def payloads(context):
        point = context.get_input()
        assert isinstance(point, Point)
        money = yield context.call_activity("price", point)
        assert isinstance(money, Money)
        moved = yield context.call_activity("move", point)
        assert isinstance(moved, Point)
        return {"money": money, "moved": moved, "list": [Point(0, 0), money]}

    @app.activity_trigger(input_name="p")
    def price(p):
        assert isinstance(p, Point)
        return Money(p.x * 100 + p.y, "EUR")

    @app.activity_trigger(input_name="p")
    def move(p):
        assert isinstance(p, Point)
        return Point(p.x + 1, p.y + 1)

    client = runtime.client()
    iid = await client.start_new("payloads", None, Point(3, 4))
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid, show_input=True)
    assert status.runtime_status is S.Completed, status.output
    assert status.input_ == Point(3, 4)
    assert status.output == {"money": Money(304, "EUR"), "moved": Point(4, 5), "list": [Point(0, 0), Money(304, "EUR")]}


async def test_to_json_class_as_orchestration_input_and_output(app, runtime):
    @app.orchestration_trigger(context_name="context")
    def doubler(context):
        m = context.get_input()
        return Money(m.amount * 2, m.currency)
        yield  # pragma: no cover

    client = runtime.client()
    iid = await client.start_new("doubler", None, Money(21, "USD"))
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed
    assert status.output == Money(42, "USD")


async def test_non_generator_orchestrator_completes(app, runtime):
    @app.orchestration_trigger(context_name="context")
    def plain(context):
        return context.get_input() * 2

    client = runtime.client()
    iid = await client.start_new("plain", None, 21)
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed
    assert status.output == 42


# -- client API ------------------------------------------------------------------------------------
async def test_terminate(app, runtime, clock):
    @app.orchestration_trigger(context_name="context")
    def forever(context):
        yield context.wait_for_external_event("never")
        return "not reached"

    client = runtime.client()
    iid = await client.start_new("forever")
    await runtime.worker.run_until_idle()
    await client.terminate(iid, "enough")
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Terminated
    assert status.output == "enough"
    history = (await runtime.backend.load_history(iid)).events
    assert any(e.event_type is EventType.EXECUTION_TERMINATED for e in history)

    # a terminated instance takes no more events
    with pytest.raises(ValueError):
        await client.raise_event(iid, "never", 1)
    # terminating again is a no-op
    await client.terminate(iid, "again")
    await runtime.worker.run_until_idle()
    assert (await client.get_status(iid)).output == "enough"


async def test_terminate_while_activity_pending(app, runtime):
    @app.orchestration_trigger(context_name="context")
    def busy(context):
        yield context.call_activity("noop")
        return "done"

    @app.activity_trigger(input_name="x")
    def noop(x):
        return None

    client = runtime.client()
    iid = await client.start_new("busy")
    await runtime.worker.run_orchestrations_once()
    await client.terminate(iid, "stop")
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Terminated
    assert status.output == "stop"


async def test_suspend_and_resume(app, runtime):
    @app.orchestration_trigger(context_name="context")
    def pausable(context):
        value = yield context.wait_for_external_event("Go")
        return value

    client = runtime.client()
    iid = await client.start_new("pausable")
    await runtime.worker.run_until_idle()
    assert (await client.get_status(iid)).runtime_status is S.Running

    await client.suspend(iid, "maintenance")
    await runtime.worker.run_until_idle()
    assert (await client.get_status(iid)).runtime_status is S.Suspended

    await client.raise_event(iid, "Go", "value")
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Suspended  # the event is held back while suspended
    assert status.output is None

    await client.resume(iid, "done")
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed
    assert status.output == "value"


async def test_start_new_with_running_id_rejected(app, runtime):
    @app.orchestration_trigger(context_name="context")
    def waits(context):
        yield context.wait_for_external_event("x")
        return 1

    client = runtime.client()
    await client.start_new("waits", "dup-id")
    await client.start_new("waits", "dup-id")  # the same start again while Pending: a retry
    with pytest.raises(ValueError):
        await client.start_new("waits", "dup-id", "another input")  # a different start: conflict
    await runtime.worker.run_until_idle()
    with pytest.raises(ValueError):
        await client.start_new("waits", "dup-id")  # Running


async def test_start_new_with_finished_id_restarts(app, runtime):
    @app.orchestration_trigger(context_name="context")
    def echo(context):
        return context.get_input()
        yield  # pragma: no cover

    client = runtime.client()
    await client.start_new("echo", "reuse", 1)
    await runtime.worker.run_until_idle()
    assert (await client.get_status("reuse")).output == 1
    await client.start_new("echo", "reuse", 2)
    await runtime.worker.run_until_idle()
    status = await client.get_status("reuse")
    assert status.runtime_status is S.Completed
    assert status.output == 2


async def test_start_new_unknown_orchestrator_names_it(app, runtime):
    client = runtime.client()
    with pytest.raises(Exception, match="no_such_orchestrator"):
        await client.start_new("no_such_orchestrator")


async def test_start_new_unknown_orchestrator_is_value_error(app, runtime):
    # DurableOrchestrationClient.start_new documents: "Raises ValueError for ... an unknown
    # orchestrator name".
    client = runtime.client()
    with pytest.raises(ValueError, match="no_such_orchestrator"):
        await client.start_new("no_such_orchestrator")


@pytest.mark.parametrize("bad_id", ["", "   ", "has\ncontrol", "tab\tid", "nul\x00", "del\x7f", "x" * 257])
async def test_bad_instance_ids_rejected(app, runtime, bad_id):
    @app.orchestration_trigger(context_name="context")
    def ok(context):
        return 1

    client = runtime.client()
    with pytest.raises(ValueError):
        await client.start_new("ok", bad_id)
    assert runtime.backend.instances == {}


async def test_longest_valid_instance_id_accepted(app, runtime):
    @app.orchestration_trigger(context_name="context")
    def ok(context):
        return 1

    client = runtime.client()
    iid = await client.start_new("ok", "y" * 256)
    await runtime.worker.run_until_idle()
    assert (await client.get_status(iid)).runtime_status is S.Completed


async def test_non_json_input_rejected(app, runtime):
    @app.orchestration_trigger(context_name="context")
    def ok(context):
        return 1

    client = runtime.client()
    with pytest.raises(ValueError):
        await client.start_new("ok", "bad-input", object())
    assert await client.get_status("bad-input") is None


async def test_purge_instance_history(app, runtime):
    @app.orchestration_trigger(context_name="context")
    def quick(context):
        yield context.call_activity("noop")
        return "done"

    @app.activity_trigger(input_name="x")
    def noop(x):
        return None

    client = runtime.client()
    iid = await client.start_new("quick", "to-purge")
    keep = await client.start_new("quick", "to-keep")
    await runtime.worker.run_until_idle()
    assert (await client.get_status(iid)).runtime_status is S.Completed

    result = await client.purge_instance_history(iid)
    assert result.instances_deleted == 1
    assert await client.get_status(iid) is None
    assert not (await runtime.backend.load_history(iid)).exists
    assert (await client.get_status(keep)).runtime_status is S.Completed

    again = await client.purge_instance_history(iid)
    assert again.instances_deleted == 0


async def test_get_status_by_runtime_status(app, runtime):
    @app.orchestration_trigger(context_name="context")
    def maybe_wait(context):
        if context.get_input():
            yield context.wait_for_external_event("x")
        return "done"

    client = runtime.client()
    done_ids = [await client.start_new("maybe_wait", f"done-{i}", False) for i in range(3)]
    running_ids = [await client.start_new("maybe_wait", f"run-{i}", True) for i in range(2)]
    await runtime.worker.run_until_idle()

    completed = await client.get_status_by(runtime_status=[S.Completed])
    assert sorted(s.instance_id for s in completed) == sorted(done_ids)
    running = await client.get_status_by(runtime_status=[S.Running])
    assert sorted(s.instance_id for s in running) == sorted(running_ids)
    both = await client.get_status_by(runtime_status=[S.Running, S.Completed])
    assert len(both) == 5
    everything = await client.get_status_all()
    assert len(everything) == 5


async def test_get_status_unknown_instance_is_none(app, runtime):
    client = runtime.client()
    assert await client.get_status("never-started") is None


async def test_get_status_show_history(app, runtime):
    @app.orchestration_trigger(context_name="context")
    def one(context):
        r = yield context.call_activity("noop", 5)
        return r

    @app.activity_trigger(input_name="x")
    def noop(x):
        return x

    client = runtime.client()
    iid = await client.start_new("one")
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid, show_history=True, show_history_output=True)
    types = [e["EventType"] for e in status.history]
    assert types[:2] == ["OrchestratorStarted", "ExecutionStarted"]
    assert "TaskScheduled" in types and "TaskCompleted" in types
    assert types[-1] == "ExecutionCompleted"
    completed = next(e for e in status.history if e["EventType"] == "TaskCompleted")
    assert completed["Result"] == "5"


# -- more lifecycle edge cases ---------------------------------------------------------------------
async def test_terminate_pending_instance(app, runtime):
    @app.orchestration_trigger(context_name="context")
    def never_runs_far(context):
        yield context.wait_for_external_event("x")
        return "no"

    client = runtime.client()
    iid = await client.start_new("never_runs_far")
    await client.terminate(iid, "changed my mind")  # before any worker ran
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Terminated
    assert status.output == "changed my mind"


async def test_terminate_suspended_instance(app, runtime):
    @app.orchestration_trigger(context_name="context")
    def waits(context):
        yield context.wait_for_external_event("x")
        return "no"

    client = runtime.client()
    iid = await client.start_new("waits")
    await runtime.worker.run_until_idle()
    await client.suspend(iid)
    await runtime.worker.run_until_idle()
    assert (await client.get_status(iid)).runtime_status is S.Suspended
    await client.terminate(iid, "bye")
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Terminated
    assert status.output == "bye"


async def test_activity_completion_held_while_suspended(app, runtime):
    @app.orchestration_trigger(context_name="context")
    def one(context):
        return (yield context.call_activity("echo", "v"))

    @app.activity_trigger(input_name="x")
    def echo(x):
        return x

    client = runtime.client()
    iid = await client.start_new("one")
    await runtime.worker.run_orchestrations_once()  # activity scheduled
    await client.suspend(iid)
    await runtime.worker.run_orchestrations_once()  # suspended
    await runtime.worker.run_until_idle()  # the activity runs; its completion is held back
    status = await client.get_status(iid)
    assert status.runtime_status is S.Suspended
    await client.resume(iid)
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed
    assert status.output == "v"


async def test_timer_in_the_past_fires_at_once(app, runtime, clock):
    @app.orchestration_trigger(context_name="context")
    def past(context):
        yield context.create_timer(context.current_utc_datetime - timedelta(seconds=10))
        return "fired"

    client = runtime.client()
    iid = await client.start_new("past")
    await runtime.worker.run_until_idle()
    assert (await client.get_status(iid)).output == "fired"


async def test_long_timer(app, runtime, clock):
    @app.orchestration_trigger(context_name="context")
    def sleepy(context):
        yield context.create_timer(context.current_utc_datetime + timedelta(days=10))
        return "woke"

    client = runtime.client()
    iid = await client.start_new("sleepy")
    await runtime.worker.run_until_idle()
    clock.advance(9 * 86400)
    # Queues hide a message for 7 days at most: the timer message came back early, and went back.
    await runtime.worker.run_until_idle()
    assert (await client.get_status(iid)).runtime_status is S.Running
    assert runtime.backend.pending_count() == 1
    clock.advance(86400)
    await runtime.worker.run_until_idle()
    assert (await client.get_status(iid)).output == "woke"


async def test_cancelled_timer_firing_later_is_ignored(app, runtime, clock):
    @app.orchestration_trigger(context_name="context")
    def cancels(context):
        timer = context.create_timer(context.current_utc_datetime + timedelta(seconds=60))
        first = yield context.task_any([context.wait_for_external_event("A"), timer])
        assert first is not timer
        timer.cancel()
        second = yield context.wait_for_external_event("B")
        return second

    client = runtime.client()
    iid = await client.start_new("cancels")
    await runtime.worker.run_until_idle()
    await client.raise_event(iid, "A")
    await runtime.worker.run_until_idle()
    clock.advance(120)  # the cancelled timer fires now
    await runtime.worker.run_until_idle()
    assert (await client.get_status(iid)).runtime_status is S.Running
    await client.raise_event(iid, "B", "b")
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed, status.failure_details
    assert status.output == "b"


async def test_restart_finished_instance_ignores_old_timer(app, runtime, clock):
    @app.orchestration_trigger(context_name="context")
    def race(context):
        timer = context.create_timer(context.current_utc_datetime + timedelta(seconds=30))
        event = context.wait_for_external_event("E")
        winner = yield context.task_any([timer, event])
        if winner == event:
            timer.cancel()
            return ["event", context.get_input()]
        return ["timer", context.get_input()]

    client = runtime.client()
    await client.start_new("race", "restart-me", 1)
    await runtime.worker.run_until_idle()
    await client.raise_event("restart-me", "E")
    await runtime.worker.run_until_idle()
    assert (await client.get_status("restart-me")).output == ["event", 1]

    clock.advance(20)
    await client.start_new("race", "restart-me", 2)  # the first run's timer is still pending
    await runtime.worker.run_until_idle()
    clock.advance(15)  # the first run's timer is due now, the second's is not
    await runtime.worker.run_until_idle()
    status = await client.get_status("restart-me")
    assert status.runtime_status is S.Running
    await client.raise_event("restart-me", "E")
    await runtime.worker.run_until_idle()
    assert (await client.get_status("restart-me")).output == ["event", 2]


async def test_get_status_by_created_time(app, runtime, clock):
    @app.orchestration_trigger(context_name="context")
    def quick(context):
        return 1

    client = runtime.client()
    t0 = clock()
    await client.start_new("quick", "early")
    clock.advance(3600)
    await client.start_new("quick", "late")
    await runtime.worker.run_until_idle()
    late = await client.get_status_by(created_time_from=t0 + timedelta(minutes=30))
    assert [s.instance_id for s in late] == ["late"]
    early = await client.get_status_by(created_time_to=t0 + timedelta(minutes=30))
    assert [s.instance_id for s in early] == ["early"]


async def test_custom_status_after_continue_as_new_and_replay(app, runtime, clock):
    @app.orchestration_trigger(context_name="context")
    def counter(context):
        n = context.get_input()
        context.set_custom_status({"n": n})
        yield context.create_timer(context.current_utc_datetime + timedelta(seconds=1))
        if n < 2:
            context.continue_as_new(n + 1)
            return None
        return n

    client = runtime.client()
    iid = await client.start_new("counter", None, 0)
    await runtime.worker.run_until_idle()
    assert (await client.get_status(iid)).custom_status == {"n": 0}
    clock.advance(1)
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid, show_input=True)
    assert status.runtime_status is S.Running
    assert status.custom_status == {"n": 1}
    assert status.input_ == 1
    clock.advance(1)
    await runtime.worker.run_until_idle()
    clock.advance(1)
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed
    assert status.output == 2
    assert status.custom_status == {"n": 2}


@pytest.mark.parametrize("sessions", [False, True], ids=["replaying", "extended-sessions"])
async def test_an_event_held_while_suspended_is_in_the_history_once(app, runtime, sessions):
    runtime.worker.options.extended_sessions = sessions

    @app.orchestration_trigger(context_name="context")
    def waits(context):
        yield context.wait_for_external_event("go")
        return sum(1 for e in context.histories if e.event_type is EventType.EVENT_RAISED)

    client = runtime.client()
    iid = await client.start_new("waits")
    await runtime.worker.run_until_idle()
    await client.suspend(iid, "hold")
    await runtime.worker.run_until_idle()
    await client.raise_event(iid, "go")  # held back while suspended...
    await runtime.worker.run_until_idle()
    await client.resume(iid, "go on")  # ...and applied on resume
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert (status.runtime_status, status.output) == (S.Completed, 1)
