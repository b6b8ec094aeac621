"""The classic Durable Functions application patterns, run on the in-memory backend."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import durable as df
from durable import EventType

S = df.OrchestrationRuntimeStatus


async def test_function_chaining(app, runtime):
    @app.orchestration_trigger(context_name="context")
    def chain(context):
        a = yield context.call_activity("hello", "Tokyo")
        b = yield context.call_activity("hello", "Seattle")
        c = yield context.call_activity("hello", "London")
        return [a, b, c]

    @app.activity_trigger(input_name="city")
    def hello(city):
        return f"Hello {city}!"

    client = runtime.client()
    iid = await client.start_new("chain", None, None)
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed
    assert status.output == ["Hello Tokyo!", "Hello Seattle!", "Hello London!"]

    # the activities were scheduled one after another, each in its own step
    history = (await runtime.backend.load_history(iid)).events
    scheduled = [e for e in history if e.event_type is EventType.TASK_SCHEDULED]
    assert [e.name for e in scheduled] == ["hello", "hello", "hello"]
    assert [e.event_id for e in scheduled] == [0, 1, 2]
    completed = [e for e in history if e.event_type is EventType.TASK_COMPLETED]
    assert [e.task_scheduled_id for e in completed] == [0, 1, 2]
    assert history[-1].event_type is EventType.EXECUTION_COMPLETED


async def test_fan_out_fan_in(app, runtime):
    calls: list[int] = []

    @app.orchestration_trigger(context_name="context")
    def fan(context):
        n = context.get_input()
        tasks = [context.call_activity("square", i) for i in range(n)]
        results = yield context.task_all(tasks)
        total = yield context.call_activity("add", results)
        return {"results": results, "total": total}

    @app.activity_trigger(input_name="x")
    def square(x):
        calls.append(x)
        return x * x

    @app.activity_trigger(input_name="values")
    def add(values):
        return sum(values)

    client = runtime.client()
    iid = await client.start_new("fan", None, 50)
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed
    assert status.output["results"] == [i * i for i in range(50)]  # in task order, not completion order
    assert status.output["total"] == sum(i * i for i in range(50))
    assert sorted(calls) == list(range(50))

    history = (await runtime.backend.load_history(iid)).events
    # all 50 were scheduled in the first step, before any completed
    first_step_end = next(i for i, e in enumerate(history) if e.event_type is EventType.ORCHESTRATOR_COMPLETED)
    assert sum(1 for e in history[:first_step_end] if e.event_type is EventType.TASK_SCHEDULED) == 50


async def test_fan_out_empty_task_all(app, runtime):
    @app.orchestration_trigger(context_name="context")
    def empty(context):
        results = yield context.task_all([])
        return results

    client = runtime.client()
    iid = await client.start_new("empty")
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed
    assert status.output == []


def _register_approval(app):
    @app.orchestration_trigger(context_name="context")
    def approval(context):
        deadline = context.current_utc_datetime + timedelta(hours=1)
        timeout = context.create_timer(deadline)
        event = context.wait_for_external_event("Approval")
        winner = yield context.task_any([event, timeout])
        if winner == event:
            timeout.cancel()
            result = yield context.call_activity("process", event.result)
            return result
        return "timed out"

    @app.activity_trigger(input_name="value")
    def process(value):
        return f"approved: {value}"


async def test_human_interaction_approved_before_timeout(app, runtime, clock):
    _register_approval(app)
    client = runtime.client()
    start = clock()
    iid = await client.start_new("approval", "approval-1")
    await runtime.worker.run_until_idle()
    assert (await client.get_status(iid)).runtime_status is S.Running

    await client.raise_event(iid, "Approval", "yes")
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert clock() == start  # the clock never moved: the pending timer did not hold the orchestration
    assert status.runtime_status is S.Completed
    assert status.output == "approved: yes"

    history = (await runtime.backend.load_history(iid)).events
    assert not any(e.event_type is EventType.TIMER_FIRED for e in history)
    timers = [e for e in history if e.event_type is EventType.TIMER_CREATED]
    assert len(timers) == 1 and timers[0].fire_at == start + timedelta(hours=1)

    # the timer message still fires later; it must not disturb the finished instance
    clock.advance(2 * 3600)
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed
    assert status.output == "approved: yes"
    assert runtime.backend.poison_queue == []


async def test_human_interaction_timeout(app, runtime, clock):
    _register_approval(app)
    client = runtime.client()
    iid = await client.start_new("approval", "approval-2")
    await runtime.worker.run_until_idle()

    clock.advance(30 * 60)  # not yet
    await runtime.worker.run_until_idle()
    assert (await client.get_status(iid)).runtime_status is S.Running

    clock.advance(31 * 60)  # past the deadline
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed
    assert status.output == "timed out"
    history = (await runtime.backend.load_history(iid)).events
    assert sum(1 for e in history if e.event_type is EventType.TIMER_FIRED) == 1


async def test_monitor(app, runtime, clock):
    checks: list[int] = []

    @app.orchestration_trigger(context_name="context")
    def monitor(context):
        polls = 0
        while True:
            polls += 1
            state = yield context.call_activity("check_job", polls)
            if state == "done":
                return {"polls": polls}
            yield context.create_timer(context.current_utc_datetime + timedelta(seconds=30))

    @app.activity_trigger(input_name="attempt")
    def check_job(attempt):
        checks.append(attempt)
        return "done" if len(checks) >= 3 else "running"

    client = runtime.client()
    start = clock()
    iid = await client.start_new("monitor")
    await runtime.worker.run_until_idle()
    assert checks == [1]
    assert (await client.get_status(iid)).runtime_status is S.Running

    clock.advance(10)  # timer not due yet
    await runtime.worker.run_until_idle()
    assert checks == [1]

    clock.advance(20)
    await runtime.worker.run_until_idle()
    assert checks == [1, 2]

    clock.advance(30)
    await runtime.worker.run_until_idle()
    assert checks == [1, 2, 3]
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed
    assert status.output == {"polls": 3}

    history = (await runtime.backend.load_history(iid)).events
    timers = [e for e in history if e.event_type is EventType.TIMER_CREATED]
    assert [t.fire_at for t in timers] == [start + timedelta(seconds=30), start + timedelta(seconds=60)]


async def test_eternal_orchestration_continue_as_new(app, runtime, clock):
    seen_inputs: list[int] = []

    @app.orchestration_trigger(context_name="context")
    def eternal(context):
        n = context.get_input()
        if not context.is_replaying:
            seen_inputs.append(n)
        yield context.call_activity("work", n)
        if n >= 3:
            return n
        yield context.create_timer(context.current_utc_datetime + timedelta(seconds=10))
        context.continue_as_new(n + 1)
        return None

    @app.activity_trigger(input_name="n")
    def work(n):
        return n

    client = runtime.client()
    iid = await client.start_new("eternal", "eternal-1", 0)
    await runtime.worker.run_until_idle()
    first = await runtime.backend.load_history(iid)
    first_execution = first.execution_id
    assert first_execution
    assert first.events[1].event_type is EventType.EXECUTION_STARTED
    assert first.events[1].execution_id == first_execution

    execution_ids = {first_execution}
    for expected_input in (1, 2, 3):
        clock.advance(10)
        await runtime.worker.run_until_idle()
        history = await runtime.backend.load_history(iid)
        execution_ids.add(history.execution_id)
        # the history starts fresh: only this execution's events
        started = [e for e in history.events if e.event_type is EventType.EXECUTION_STARTED]
        assert len(started) == 1
        assert started[0].execution_id == history.execution_id
        assert started[0].input == str(expected_input)
        assert history.events[0].event_type is EventType.ORCHESTRATOR_STARTED
        assert history.events[1] == started[0]
        # exactly one activity call per execution in the fresh history
        assert sum(1 for e in history.events if e.event_type is EventType.TASK_SCHEDULED) == 1

    assert len(execution_ids) == 4  # every continue-as-new got a new execution id
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed
    assert status.output == 3
    assert seen_inputs == [0, 1, 2, 3]


async def test_sub_orchestrations(app, runtime):
    @app.orchestration_trigger(context_name="context")
    def parent(context):
        results = yield context.task_all(
            [
                context.call_sub_orchestrator("child", "a"),
                context.call_sub_orchestrator("child", "b"),
            ]
        )
        named = yield context.call_sub_orchestrator("child", "c", instance_id="my-child")
        return [*results, named]

    @app.orchestration_trigger(context_name="context")
    def child(context):
        value = yield context.call_activity("upper", context.get_input())
        return {"id": context.instance_id, "parent": context.parent_instance_id, "value": value}

    @app.activity_trigger(input_name="s")
    def upper(s):
        return s.upper()

    client = runtime.client()
    iid = await client.start_new("parent", "p")
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed, status.output
    assert status.output == [
        {"id": "p:0", "parent": "p", "value": "A"},
        {"id": "p:1", "parent": "p", "value": "B"},
        {"id": "my-child", "parent": "p", "value": "C"},
    ]
    for child_id, value in (("p:0", "A"), ("p:1", "B"), ("my-child", "C")):
        child_status = await client.get_status(child_id)
        assert child_status is not None, child_id
        assert child_status.runtime_status is S.Completed
        assert child_status.name == "child"
        assert child_status.output["value"] == value

    history = (await runtime.backend.load_history(iid)).events
    created = [e for e in history if e.event_type is EventType.SUB_ORCHESTRATION_CREATED]
    assert [e.instance_id for e in created] == ["p:0", "p:1", "my-child"]


async def test_async_activities(app, runtime):
    @app.orchestration_trigger(context_name="context")
    def orchestrate(context):
        first = yield context.call_activity("slow_double", 2)
        both = yield context.task_all(
            [context.call_activity("slow_double", first), context.call_activity("sync_inc", 1)]
        )
        return both

    @app.activity_trigger(input_name="x")
    async def slow_double(x):
        await asyncio.sleep(0)
        return x * 2

    @app.activity_trigger(input_name="x")
    def sync_inc(x):
        return x + 1

    client = runtime.client()
    iid = await client.start_new("orchestrate")
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed
    assert status.output == [8, 2]
