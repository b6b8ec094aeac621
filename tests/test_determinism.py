"""Replay from stored history, and the determinism check when code and history disagree."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import durable as df
from durable import EventType, HistoryEvent
from durable.core._replay import execute_step

S = df.OrchestrationRuntimeStatus
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def _noop_activities(app, *names):
    for name in names:

        def activity(x, _name=name):
            return f"{_name}:{x}"

        activity.__name__ = name
        app.activity_trigger(input_name="x", activity=name)(activity)


async def _swap_code(runtime, clock, register):
    """A runtime on the same backend whose app has the changed orchestrator code."""
    new_app = df.DFApp()
    register(new_app)
    return df.DurableRuntime(new_app, runtime.backend, clock=clock)


async def _run_changed(app, runtime, clock, original, changed, instance_id="det"):
    """Run ``original`` to its wait for "go", swap in ``changed``, deliver "go", return the status."""
    original(app)
    client = runtime.client()
    await client.start_new("orch", instance_id)
    await runtime.worker.run_until_idle()
    assert (await client.get_status(instance_id)).runtime_status is S.Running

    new_runtime = await _swap_code(runtime, clock, changed)
    new_client = new_runtime.client()
    await new_client.raise_event(instance_id, "go")
    await new_runtime.worker.run_until_idle()
    return await new_client.get_status(instance_id)


def _assert_nondeterminism(status, *fragments):
    assert status.runtime_status is S.Failed, status.output
    details = status.failure_details
    assert details["ErrorType"] == "NonDeterminismError", details
    for fragment in fragments:
        assert fragment in details["Message"], (fragment, details["Message"])


async def test_changed_activity_name(app, runtime, clock):
    def original(a):
        @a.orchestration_trigger(context_name="context", orchestration="orch")
        def orch(context):
            yield context.call_activity("a", 1)
            yield context.wait_for_external_event("go")
            return "done"

        _noop_activities(a, "a", "b")

    def changed(a):
        @a.orchestration_trigger(context_name="context", orchestration="orch")
        def orch(context):
            yield context.call_activity("b", 1)
            yield context.wait_for_external_event("go")
            return "done"

        _noop_activities(a, "a", "b")

    status = await _run_changed(app, runtime, clock, original, changed)
    _assert_nondeterminism(status, "TaskScheduled 'a'", "'b'")


async def test_activity_replaced_by_timer(app, runtime, clock):
    def original(a):
        @a.orchestration_trigger(context_name="context", orchestration="orch")
        def orch(context):
            yield context.call_activity("a", 1)
            yield context.wait_for_external_event("go")
            return "done"

        _noop_activities(a, "a")

    def changed(a):
        @a.orchestration_trigger(context_name="context", orchestration="orch")
        def orch(context):
            yield context.create_timer(context.current_utc_datetime + timedelta(seconds=1))
            yield context.wait_for_external_event("go")
            return "done"

        _noop_activities(a, "a")

    status = await _run_changed(app, runtime, clock, original, changed)
    _assert_nondeterminism(status, "TaskScheduled 'a'", "TimerCreated")


async def test_extra_action_not_in_history(app, runtime, clock):
    def original(a):
        @a.orchestration_trigger(context_name="context", orchestration="orch")
        def orch(context):
            yield context.call_activity("a", 1)
            yield context.wait_for_external_event("go")
            return "done"

        _noop_activities(a, "a", "extra")

    def changed(a):
        @a.orchestration_trigger(context_name="context", orchestration="orch")
        def orch(context):
            yield context.task_all([context.call_activity("a", 1), context.call_activity("extra", 2)])
            yield context.wait_for_external_event("go")
            return "done"

        _noop_activities(a, "a", "extra")

    status = await _run_changed(app, runtime, clock, original, changed)
    _assert_nondeterminism(status, "'extra'")


async def test_extra_action_after_completed_activity(app, runtime, clock):
    def original(a):
        @a.orchestration_trigger(context_name="context", orchestration="orch")
        def orch(context):
            yield context.call_activity("a", 1)
            yield context.wait_for_external_event("go")
            return "done"

        _noop_activities(a, "a", "extra")

    def changed(a):
        @a.orchestration_trigger(context_name="context", orchestration="orch")
        def orch(context):
            yield context.call_activity("a", 1)
            yield context.call_activity("extra", 2)  # history has the event wait here instead
            yield context.wait_for_external_event("go")
            return "done"

        _noop_activities(a, "a", "extra")

    status = await _run_changed(app, runtime, clock, original, changed)
    _assert_nondeterminism(status, "TaskScheduled 'extra'")


async def test_fewer_actions_than_history(app, runtime, clock):
    def original(a):
        @a.orchestration_trigger(context_name="context", orchestration="orch")
        def orch(context):
            yield context.task_all([context.call_activity("a", 1), context.call_activity("b", 2)])
            yield context.wait_for_external_event("go")
            return "done"

        _noop_activities(a, "a", "b")

    def changed(a):
        @a.orchestration_trigger(context_name="context", orchestration="orch")
        def orch(context):
            yield context.call_activity("a", 1)
            yield context.wait_for_external_event("go")
            return "done"

        _noop_activities(a, "a", "b")

    status = await _run_changed(app, runtime, clock, original, changed)
    _assert_nondeterminism(status, "TaskScheduled 'b'")


async def test_changed_sub_orchestrator_name(app, runtime, clock):
    def register_children(a):
        @a.orchestration_trigger(context_name="context")
        def child_one(context):
            return 1

        @a.orchestration_trigger(context_name="context")
        def child_two(context):
            return 2

    def original(a):
        @a.orchestration_trigger(context_name="context", orchestration="orch")
        def orch(context):
            yield context.call_sub_orchestrator("child_one")
            yield context.wait_for_external_event("go")
            return "done"

        register_children(a)

    def changed(a):
        @a.orchestration_trigger(context_name="context", orchestration="orch")
        def orch(context):
            yield context.call_sub_orchestrator("child_two")
            yield context.wait_for_external_event("go")
            return "done"

        register_children(a)

    status = await _run_changed(app, runtime, clock, original, changed)
    _assert_nondeterminism(status, "SubOrchestrationInstanceCreated 'child_one'", "'child_two'")


async def test_unchanged_code_replays_on_fresh_runtime(app, runtime, clock):
    calls: list[str] = []

    def register(a):
        @a.orchestration_trigger(context_name="context", orchestration="orch")
        def orch(context):
            x = yield context.call_activity("step", "one")
            y = yield context.wait_for_external_event("go")
            yield context.create_timer(context.current_utc_datetime + timedelta(seconds=5))
            z = yield context.call_activity("step", "two")
            return [x, y, z]

        @a.activity_trigger(input_name="x", activity="step")
        def step(x):
            calls.append(x)
            return x.upper()

    register(app)
    client = runtime.client()
    await client.start_new("orch", "replayed")
    await runtime.worker.run_until_idle()
    assert calls == ["one"]

    fresh = await _swap_code(runtime, clock, register)  # a new worker with an empty cache
    fresh_client = fresh.client()
    await fresh_client.raise_event("replayed", "go", "event")
    await fresh.worker.run_until_idle()
    assert (await fresh_client.get_status("replayed")).runtime_status is S.Running
    clock.advance(5)
    await fresh.worker.run_until_idle()
    status = await fresh_client.get_status("replayed")
    assert status.runtime_status is S.Completed, status.failure_details
    assert status.output == ["ONE", "event", "TWO"]
    assert calls.count("two") == 1


# -- the pure step function ------------------------------------------------------------------------
def _orch(context):
    a = yield context.call_activity("a", context.get_input())
    b = yield context.call_activity("b", a)
    return [a, b]


def _resolve(name):
    return {"orch": _orch}.get(name)


def _started(input_json="1"):
    return HistoryEvent(
        EventType.EXECUTION_STARTED, T0, name="orch", input=input_json, instance_id="i", execution_id="e1"
    )


def test_execute_step_first_step():
    result = execute_step(_resolve, [], [_started()], T0)
    assert result.status is S.Running
    assert result.keep == 0
    assert result.execution_id == "e1"
    types = [e.event_type for e in result.events]
    assert types == [
        EventType.ORCHESTRATOR_STARTED,
        EventType.EXECUTION_STARTED,
        EventType.TASK_SCHEDULED,
        EventType.ORCHESTRATOR_COMPLETED,
    ]
    scheduled = result.events[2]
    assert scheduled.name == "a"
    assert scheduled.event_id == 0
    assert scheduled.input == "1"


def test_execute_step_replays_history_and_completes():
    t1 = T0 + timedelta(seconds=3)
    t2 = T0 + timedelta(seconds=7)
    history = [
        HistoryEvent(EventType.ORCHESTRATOR_STARTED, T0),
        _started(),
        HistoryEvent(EventType.TASK_SCHEDULED, T0, event_id=0, name="a", input="1"),
        HistoryEvent(EventType.ORCHESTRATOR_COMPLETED, T0),
        HistoryEvent(EventType.ORCHESTRATOR_STARTED, t1),
        HistoryEvent(EventType.TASK_COMPLETED, t1, task_scheduled_id=0, result='"A"'),
        HistoryEvent(EventType.TASK_SCHEDULED, t1, event_id=1, name="b", input='"A"'),
        HistoryEvent(EventType.ORCHESTRATOR_COMPLETED, t1),
    ]
    new = [HistoryEvent(EventType.TASK_COMPLETED, t2, task_scheduled_id=1, result='"B"')]
    result = execute_step(_resolve, history, new, t2)
    assert result.keep == len(history)
    assert result.status is S.Completed
    assert result.output == '["A","B"]'
    types = [e.event_type for e in result.events]
    assert types == [
        EventType.ORCHESTRATOR_STARTED,
        EventType.TASK_COMPLETED,
        EventType.ORCHESTRATOR_COMPLETED,
        EventType.EXECUTION_COMPLETED,
    ]
    assert result.events[0].timestamp == t2
    assert result.events[-1].runtime_status == "Completed"
    assert result.events[-1].result == '["A","B"]'


def test_execute_step_middle_step_schedules_next():
    history = [
        HistoryEvent(EventType.ORCHESTRATOR_STARTED, T0),
        _started('"x"'),
        HistoryEvent(EventType.TASK_SCHEDULED, T0, event_id=0, name="a", input='"x"'),
        HistoryEvent(EventType.ORCHESTRATOR_COMPLETED, T0),
    ]
    new = [HistoryEvent(EventType.TASK_COMPLETED, T0, task_scheduled_id=0, result='"ax"')]
    result = execute_step(_resolve, history, new, T0 + timedelta(seconds=1))
    assert result.status is S.Running
    scheduled = [e for e in result.events if e.event_type is EventType.TASK_SCHEDULED]
    assert len(scheduled) == 1
    assert scheduled[0].name == "b" and scheduled[0].event_id == 1 and scheduled[0].input == '"ax"'


def test_execute_step_detects_nondeterminism():
    history = [
        HistoryEvent(EventType.ORCHESTRATOR_STARTED, T0),
        _started(),
        HistoryEvent(EventType.TASK_SCHEDULED, T0, event_id=0, name="something_else", input="1"),
        HistoryEvent(EventType.ORCHESTRATOR_COMPLETED, T0),
    ]
    new = [HistoryEvent(EventType.TASK_COMPLETED, T0, task_scheduled_id=0, result='"A"')]
    result = execute_step(_resolve, history, new, T0)
    assert result.status is S.Failed
    assert result.failure is not None
    assert result.failure.error_type == "NonDeterminismError"
    assert "TaskScheduled 'something_else'" in result.failure.message
    assert "'a'" in result.failure.message
    assert result.events[-1].event_type is EventType.EXECUTION_COMPLETED
    assert result.events[-1].runtime_status == "Failed"


def test_execute_step_task_failed_surfaces_as_task_failed_error():
    def catcher(context):
        try:
            yield context.call_activity("a")
        except df.TaskFailedError as exc:
            return exc.error_type
        return None

    history = [
        HistoryEvent(EventType.ORCHESTRATOR_STARTED, T0),
        HistoryEvent(EventType.EXECUTION_STARTED, T0, name="c", instance_id="i", execution_id="e"),
        HistoryEvent(EventType.TASK_SCHEDULED, T0, event_id=0, name="a"),
        HistoryEvent(EventType.ORCHESTRATOR_COMPLETED, T0),
    ]
    failed = HistoryEvent(
        EventType.TASK_FAILED, T0, task_scheduled_id=0, name="a", failure=df.FailureDetails("KeyError", "k", "tb")
    )
    result = execute_step(lambda n: catcher if n == "c" else None, history, [failed], T0)
    assert result.status is S.Completed
    assert result.output == '"KeyError"'


def test_execute_step_stored_history_round_trip():
    """A history serialized as the store writes it (to_dict/from_dict) replays identically."""
    first = execute_step(_resolve, [], [_started()], T0)
    stored = [HistoryEvent.from_dict(e.to_dict()) for e in first.events]
    second = execute_step(
        _resolve, stored, [HistoryEvent(EventType.TASK_COMPLETED, T0, task_scheduled_id=0, result='"A"')], T0
    )
    assert second.status is S.Running
    assert [e.name for e in second.events if e.event_type is EventType.TASK_SCHEDULED] == ["b"]


def test_execute_step_replay_is_flagged():
    seen: list[bool] = []

    def orch(context):
        seen.append(context.is_replaying)
        yield context.call_activity("a")
        seen.append(context.is_replaying)
        return "x"

    history = [
        HistoryEvent(EventType.ORCHESTRATOR_STARTED, T0),
        HistoryEvent(EventType.EXECUTION_STARTED, T0, name="o", instance_id="i", execution_id="e"),
        HistoryEvent(EventType.TASK_SCHEDULED, T0, event_id=0, name="a"),
        HistoryEvent(EventType.ORCHESTRATOR_COMPLETED, T0),
    ]
    result = execute_step(
        lambda n: orch, history, [HistoryEvent(EventType.TASK_COMPLETED, T0, task_scheduled_id=0)], T0
    )
    assert result.status is S.Completed
    assert seen == [True, False]


def _entity_messenger(send):
    """Orchestrator code that sends one message to an entity (through ``send``) and waits for "go"."""

    def register(a):
        @a.entity_trigger(context_name="ctx", entity_name="box")
        def box(ctx):
            ctx.set_result(ctx.operation_name)

        @a.orchestration_trigger(context_name="context", orchestration="orch")
        def orch(context):
            task = send(context)
            yield context.wait_for_external_event("go")
            if task is not None:
                yield task
            return "done"

    return register


async def test_changed_entity_target(app, runtime, clock):
    status = await _run_changed(
        app,
        runtime,
        clock,
        _entity_messenger(lambda c: c.signal_entity(df.EntityId("box", "one"), "poke")),
        _entity_messenger(lambda c: c.signal_entity(df.EntityId("box", "two"), "poke")),
    )
    _assert_nondeterminism(status, "to @box@one", "to @box@two")


async def test_signal_replaced_by_call(app, runtime, clock):
    status = await _run_changed(
        app,
        runtime,
        clock,
        _entity_messenger(lambda c: c.signal_entity(df.EntityId("box", "one"), "poke")),
        _entity_messenger(lambda c: c.call_entity(df.EntityId("box", "one"), "poke")),
    )
    _assert_nondeterminism(status, "EventSent 'poke' to @box@one")


async def test_changed_sub_orchestration_instance_id(app, runtime, clock):
    def with_child(child_id):
        def register(a):
            @a.orchestration_trigger(context_name="context", orchestration="orch")
            def orch(context):
                yield context.wait_for_external_event("go")
                return "done"

            @a.orchestration_trigger(context_name="context", orchestration="parent")
            def parent(context):
                child = context.call_sub_orchestrator("orch", None, child_id)
                yield context.wait_for_external_event("go")
                yield child

        return register

    with_child("kid-1")(app)
    client = runtime.client()
    await client.start_new("parent", "p")
    await runtime.worker.run_until_idle()
    new_runtime = await _swap_code(runtime, clock, with_child("kid-2"))
    await new_runtime.client().raise_event("p", "go")
    await new_runtime.worker.run_until_idle()
    _assert_nondeterminism(await new_runtime.client().get_status("p"), "to kid-1", "to kid-2")
