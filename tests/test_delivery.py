"""At-least-once delivery: duplicates, poison messages, crashes between commit and send, stale executions."""

from __future__ import annotations

import itertools
import json
from datetime import datetime, timedelta

import durable as df
from durable import EventType, HistoryEvent
from durable.core._messages import MessageTarget, WorkMessage
from storage import control_queue, partition_of

try:
    from durable.runtime._backend import WORK_ITEM_QUEUE
except ImportError:  # older layout
    from storage._backend import WORK_ITEM_QUEUE  # type: ignore[no-redef]

S = df.OrchestrationRuntimeStatus


def _record_sends(runtime):
    """Wrap ``backend.send`` to keep a copy of every message sent."""
    sent: list[WorkMessage] = []
    original = runtime.backend.send

    async def send(messages):
        sent.extend(messages)
        await original(messages)

    runtime.backend.send = send
    return sent


def _control_queue_of(runtime, instance_id):
    return control_queue(partition_of(instance_id, runtime.backend.partition_count))


def _count(history, event_type):
    return sum(1 for e in history if e.event_type is event_type)


def _register_chain(app, calls):
    @app.orchestration_trigger(context_name="context")
    def chain(context):
        a = yield context.call_activity("step", "a")
        go = yield context.wait_for_external_event("go")
        b = yield context.call_activity("step", "b")
        return [a, go, b]

    @app.activity_trigger(input_name="x")
    def step(x):
        calls.append(x)
        return x.upper()


async def test_duplicate_task_completed_resent_is_dropped(app, runtime):
    calls: list[str] = []
    _register_chain(app, calls)
    sent = _record_sends(runtime)
    client = runtime.client()
    iid = await client.start_new("chain", "dup-completed")
    await runtime.worker.run_until_idle()
    completions = [m for m in sent if m.event.event_type is EventType.TASK_COMPLETED]
    assert len(completions) == 1

    # the same completion delivered again (same message id)
    await runtime.backend.send([completions[0]])
    await runtime.worker.run_until_idle()
    history = (await runtime.backend.load_history(iid)).events
    assert _count(history, EventType.TASK_COMPLETED) == 1
    assert (await client.get_status(iid)).runtime_status is S.Running

    await client.raise_event(iid, "go", "G")
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed
    assert status.output == ["A", "G", "B"]
    assert calls == ["a", "b"]
    history = (await runtime.backend.load_history(iid)).events
    assert _count(history, EventType.TASK_COMPLETED) == 2


async def test_duplicate_task_completed_raw_json_is_dropped(app, runtime):
    calls: list[str] = []
    _register_chain(app, calls)
    sent = _record_sends(runtime)
    client = runtime.client()
    iid = await client.start_new("chain", "dup-raw")
    await runtime.worker.run_until_idle()
    completion = next(m for m in sent if m.event.event_type is EventType.TASK_COMPLETED)

    runtime.backend.put_raw(_control_queue_of(runtime, iid), completion.to_json())
    runtime.backend.put_raw(_control_queue_of(runtime, iid), completion.to_json())
    await runtime.worker.run_until_idle()
    await client.raise_event(iid, "go", "G")
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed
    assert status.output == ["A", "G", "B"]
    assert calls == ["a", "b"]
    assert runtime.backend.pending_count() == 0


async def test_completion_with_new_message_id_for_completed_task_is_dropped(app, runtime):
    """Same task completed twice with different message ids (e.g. a re-run activity): first wins."""
    calls: list[str] = []
    _register_chain(app, calls)
    sent = _record_sends(runtime)
    client = runtime.client()
    iid = await client.start_new("chain", "dup-other-id")
    await runtime.worker.run_until_idle()
    completion = next(m for m in sent if m.event.event_type is EventType.TASK_COMPLETED)
    other = WorkMessage(
        MessageTarget.ORCHESTRATION,
        iid,
        completion.event.replace(result='"SOMETHING ELSE"'),
        completion.execution_id,
    )
    assert other.id != completion.id
    await runtime.backend.send([other])
    await runtime.worker.run_until_idle()
    await client.raise_event(iid, "go", "G")
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.output == ["A", "G", "B"]


async def test_duplicate_completion_in_same_batch(app, runtime):
    calls: list[str] = []

    @app.orchestration_trigger(context_name="context")
    def single(context):
        value = yield context.call_activity("step", "a")
        return value

    @app.activity_trigger(input_name="x")
    def step(x):
        calls.append(x)
        return x.upper()

    original = runtime.backend.send

    async def send_twice(messages):
        doubled = []
        for m in messages:
            doubled.append(m)
            if m.event.event_type is EventType.TASK_COMPLETED:
                doubled.append(m)
        await original(doubled)

    runtime.backend.send = send_twice
    client = runtime.client()
    iid = await client.start_new("single")
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed
    assert status.output == "A"
    assert calls == ["a"]
    history = (await runtime.backend.load_history(iid)).events
    assert _count(history, EventType.TASK_COMPLETED) == 1
    assert runtime.backend.pending_count() == 0


async def test_duplicate_activity_work_item_runs_again_but_completes_once(app, runtime):
    calls: list[str] = []

    @app.orchestration_trigger(context_name="context")
    def single(context):
        value = yield context.call_activity("step", "a")
        return value

    @app.activity_trigger(input_name="x")
    def step(x):
        calls.append(x)
        return x.upper()

    sent = _record_sends(runtime)
    client = runtime.client()
    iid = await client.start_new("single")
    await runtime.worker.run_orchestrations_once()
    work_item = next(m for m in sent if m.target is MessageTarget.ACTIVITY)
    await runtime.backend.send([work_item])  # the work item is delivered twice
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed
    assert status.output == "A"
    assert calls == ["a", "a"]  # activities run at least once
    history = (await runtime.backend.load_history(iid)).events
    assert _count(history, EventType.TASK_COMPLETED) == 1
    assert runtime.backend.pending_count() == 0


async def test_duplicate_execution_started_does_not_restart(app, runtime):
    calls: list[str] = []
    _register_chain(app, calls)
    client = runtime.client()
    iid = await client.start_new("chain", "dup-start")
    queue = _control_queue_of(runtime, iid)
    start_body = runtime.backend.queues[queue][0].body
    assert '"ExecutionStarted"' in start_body
    await runtime.worker.run_until_idle()
    assert calls == ["a"]

    runtime.backend.put_raw(queue, start_body)  # duplicate while running
    await runtime.worker.run_until_idle()
    history = (await runtime.backend.load_history(iid)).events
    assert _count(history, EventType.EXECUTION_STARTED) == 1
    assert calls == ["a"]

    await client.raise_event(iid, "go", "G")
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed
    assert status.output == ["A", "G", "B"]

    runtime.backend.put_raw(queue, start_body)  # duplicate after completion
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed
    assert status.output == ["A", "G", "B"]
    assert calls == ["a", "b"]
    history = (await runtime.backend.load_history(iid)).events
    assert _count(history, EventType.EXECUTION_STARTED) == 1


async def test_duplicate_execution_started_in_same_batch(app, runtime):
    calls: list[str] = []
    _register_chain(app, calls)
    client = runtime.client()
    iid = await client.start_new("chain", "dup-start-batch")
    queue = _control_queue_of(runtime, iid)
    runtime.backend.put_raw(queue, runtime.backend.queues[queue][0].body)
    await runtime.worker.run_until_idle()
    history = (await runtime.backend.load_history(iid)).events
    assert _count(history, EventType.EXECUTION_STARTED) == 1
    assert calls == ["a"]


async def test_duplicate_raised_event_is_dropped(app, runtime):
    @app.orchestration_trigger(context_name="context")
    def two_waits(context):
        first = yield context.wait_for_external_event("E")
        second = yield context.wait_for_external_event("E")
        return [first, second]

    client = runtime.client()
    iid = await client.start_new("two_waits")
    await runtime.worker.run_until_idle()
    await client.raise_event(iid, "E", 1)
    queue = _control_queue_of(runtime, iid)
    body = runtime.backend.queues[queue][0].body
    runtime.backend.put_raw(queue, body)  # the same raise delivered twice
    await runtime.worker.run_until_idle()
    assert (await client.get_status(iid)).runtime_status is S.Running
    await client.raise_event(iid, "E", 2)
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed
    assert status.output == [1, 2]


async def test_malformed_message_goes_to_poison_queue(app, runtime):
    calls: list[str] = []
    _register_chain(app, calls)
    client = runtime.client()
    for partition in range(runtime.backend.partition_count):
        runtime.backend.put_raw(control_queue(partition), "this is not json {")
    runtime.backend.put_raw(control_queue(0), '{"Id": "x", "Target": "orchestration"}')
    runtime.backend.put_raw(WORK_ITEM_QUEUE, "[1, 2")
    iid = await client.start_new("chain", "poison-neighbour")
    await runtime.worker.run_until_idle()
    await client.raise_event(iid, "go", "G")
    await runtime.worker.run_until_idle()

    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed
    assert status.output == ["A", "G", "B"]
    bodies = [body for _, body, _ in runtime.backend.poison_queue]
    assert bodies.count("this is not json {") == runtime.backend.partition_count
    assert "[1, 2" in bodies
    assert '{"Id": "x", "Target": "orchestration"}' in bodies
    assert runtime.backend.pending_count() == 0


def _fail_first_send_after_commit(runtime, predicate=lambda events: True):
    """Make ``send`` raise once, right after a commit whose new events satisfy ``predicate``."""
    backend = runtime.backend
    original_commit, original_send = backend.commit, backend.send
    state = {"armed": False, "fired": 0}

    async def commit(instance_id, **kwargs):
        etag = await original_commit(instance_id, **kwargs)
        if state["fired"] == 0 and predicate(kwargs["new_events"]):
            state["armed"] = True
        return etag

    async def send(messages):
        if state["armed"]:
            state["armed"] = False
            state["fired"] += 1
            raise ConnectionError("simulated crash between commit and send")
        await original_send(messages)

    backend.commit = commit
    backend.send = send
    return state


async def _run_past_retry(runtime, clock, rounds=3):
    for _ in range(rounds):
        await runtime.worker.run_until_idle()
        clock.advance(runtime.worker.options.retry_delay + 1)
    await runtime.worker.run_until_idle()


async def test_crash_between_commit_and_send_mid_orchestration(app, runtime, clock):
    calls: list[str] = []

    @app.orchestration_trigger(context_name="context")
    def chain(context):
        a = yield context.call_activity("step", "a")
        b = yield context.call_activity("step", "b")
        return [a, b]

    @app.activity_trigger(input_name="x")
    def step(x):
        calls.append(x)
        return x.upper()

    # crash after the commit of the step that schedules 'b' (its work item is never sent)
    state = _fail_first_send_after_commit(
        runtime, lambda events: any(e.event_type is EventType.TASK_SCHEDULED and e.event_id == 1 for e in events)
    )
    client = runtime.client()
    iid = await client.start_new("chain", "crash-mid")
    await _run_past_retry(runtime, clock)
    assert state["fired"] == 1
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed
    assert status.output == ["A", "B"]
    assert calls.count("b") >= 1
    history = (await runtime.backend.load_history(iid)).events
    assert _count(history, EventType.TASK_SCHEDULED) == 2
    assert _count(history, EventType.TASK_COMPLETED) == 2
    assert _count(history, EventType.EXECUTION_COMPLETED) == 1


async def test_crash_between_commit_and_send_on_final_step(app, runtime, clock):
    """The completing step is committed but the worker dies before sending/projecting it."""
    calls: list[str] = []

    @app.orchestration_trigger(context_name="context")
    def chain(context):
        a = yield context.call_activity("step", "a")
        return a

    @app.activity_trigger(input_name="x")
    def step(x):
        calls.append(x)
        return x.upper()

    state = _fail_first_send_after_commit(
        runtime, lambda events: any(e.event_type is EventType.EXECUTION_COMPLETED for e in events)
    )
    client = runtime.client()
    iid = await client.start_new("chain", "crash-final")
    await _run_past_retry(runtime, clock)
    assert state["fired"] == 1
    history = (await runtime.backend.load_history(iid)).events
    assert _count(history, EventType.EXECUTION_COMPLETED) == 1
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed
    assert status.output == "A"
    assert calls == ["a"]


async def test_crash_between_commit_and_send_of_sub_orchestration_result(app, runtime, clock):
    @app.orchestration_trigger(context_name="context")
    def parent(context):
        return (yield context.call_sub_orchestrator("child", 5))

    @app.orchestration_trigger(context_name="context")
    def child(context):
        return (yield context.call_activity("double", context.get_input()))

    @app.activity_trigger(input_name="x")
    def double(x):
        return x * 2

    # crash right after the child commits its completion: the reply to the parent is not sent
    state = _fail_first_send_after_commit(
        runtime, lambda events: any(e.event_type is EventType.EXECUTION_COMPLETED for e in events)
    )
    client = runtime.client()
    iid = await client.start_new("parent", "crash-parent")
    await _run_past_retry(runtime, clock)
    assert state["fired"] == 1
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed, status
    assert status.output == 10
    child_status = await client.get_status("crash-parent:0")
    assert child_status.runtime_status is S.Completed
    assert child_status.output == 10


async def test_crash_before_commit_retries_step(app, runtime, clock):
    calls: list[str] = []

    @app.orchestration_trigger(context_name="context")
    def chain(context):
        a = yield context.call_activity("step", "a")
        b = yield context.call_activity("step", "b")
        return [a, b]

    @app.activity_trigger(input_name="x")
    def step(x):
        calls.append(x)
        return x.upper()

    backend = runtime.backend
    original_commit = backend.commit
    state = {"failed": 0}

    async def commit(instance_id, **kwargs):
        if state["failed"] == 0 and any(e.event_type is EventType.TASK_COMPLETED for e in kwargs["new_events"]):
            state["failed"] += 1
            raise ConnectionError("storage unavailable")
        return await original_commit(instance_id, **kwargs)

    backend.commit = commit
    client = runtime.client()
    iid = await client.start_new("chain", "crash-before")
    await _run_past_retry(runtime, clock)
    assert state["failed"] == 1
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed
    assert status.output == ["A", "B"]
    # activities run at least once (a reload may re-send the last committed step's work items)
    assert set(calls) == {"a", "b"}
    history = (await runtime.backend.load_history(iid)).events
    assert _count(history, EventType.TASK_COMPLETED) == 2


async def test_stale_execution_messages_dropped_after_continue_as_new(app, runtime, clock):
    @app.orchestration_trigger(context_name="context")
    def eternal(context):
        generation = context.get_input()
        yield context.create_timer(context.current_utc_datetime + timedelta(seconds=10 * (generation + 1)))
        if generation == 0:
            context.continue_as_new(1)
            return None
        return "second generation done"

    client = runtime.client()
    iid = await client.start_new("eternal", "stale", 0)
    await runtime.worker.run_until_idle()
    old_execution = (await runtime.backend.load_history(iid)).execution_id
    clock.advance(10)
    await runtime.worker.run_until_idle()
    history = await runtime.backend.load_history(iid)
    new_execution = history.execution_id
    assert new_execution != old_execution
    assert _count(history.events, EventType.TIMER_CREATED) == 1  # generation 1 waits on its timer #0

    # A timer-fired for timer #0 of the *old* execution, due now: it must not fire the new timer.
    stale = WorkMessage(
        MessageTarget.ORCHESTRATION,
        iid,
        HistoryEvent(EventType.TIMER_FIRED, clock(), timer_id=0, fire_at=clock()),
        execution_id=old_execution,
    )
    stale_completion = WorkMessage(
        MessageTarget.ORCHESTRATION,
        iid,
        HistoryEvent(EventType.TASK_COMPLETED, clock(), task_scheduled_id=0, result='"stale"'),
        execution_id=old_execution,
    )
    await runtime.backend.send([stale, stale_completion])
    await runtime.worker.run_until_idle()
    history = await runtime.backend.load_history(iid)
    assert _count(history.events, EventType.TIMER_FIRED) == 0
    assert _count(history.events, EventType.TASK_COMPLETED) == 0
    assert (await client.get_status(iid)).runtime_status is S.Running
    # what is left is generation 1's own timer (possibly re-sent, with the same message id)
    left = [json.loads(m.body) for q in runtime.backend.queues.values() for m in q]
    assert left, "generation 1's timer message must still be queued"
    assert {m["ExecutionId"] for m in left} == {new_execution}
    assert {m["Event"]["EventType"] for m in left} == {"TimerFired"}
    assert len({m["Id"] for m in left}) == 1

    clock.advance(20)
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed
    assert status.output == "second generation done"


async def test_completion_for_unknown_task_is_dropped(app, runtime):
    @app.orchestration_trigger(context_name="context")
    def waits(context):
        value = yield context.wait_for_external_event("go")
        return value

    client = runtime.client()
    iid = await client.start_new("waits")
    await runtime.worker.run_until_idle()
    execution = (await runtime.backend.load_history(iid)).execution_id
    bogus = WorkMessage(
        MessageTarget.ORCHESTRATION,
        iid,
        HistoryEvent(EventType.TASK_COMPLETED, runtime.clock(), task_scheduled_id=7, result="1"),
        execution_id=execution,
    )
    await runtime.backend.send([bogus])
    await runtime.worker.run_until_idle()
    history = (await runtime.backend.load_history(iid)).events
    assert _count(history, EventType.TASK_COMPLETED) == 0
    await client.raise_event(iid, "go", "ok")
    await runtime.worker.run_until_idle()
    assert (await client.get_status(iid)).output == "ok"


async def test_crash_between_commit_and_send_on_first_step_status_is_projected(app, runtime, clock):
    """The first step commits, then the worker dies before sending/projecting: the row must not stay Pending."""

    @app.orchestration_trigger(context_name="context")
    def waits(context):
        context.set_custom_status("waiting for go")
        value = yield context.wait_for_external_event("go")
        return value

    state = _fail_first_send_after_commit(
        runtime, lambda events: any(e.event_type is EventType.EXECUTION_STARTED for e in events)
    )
    client = runtime.client()
    iid = await client.start_new("waits", "crash-first")
    await _run_past_retry(runtime, clock)
    assert state["fired"] == 1
    history = (await runtime.backend.load_history(iid)).events
    assert _count(history, EventType.EXECUTION_STARTED) == 1
    status = await client.get_status(iid)
    assert status.runtime_status is S.Running
    assert status.custom_status == "waiting for go"


async def test_message_failing_repeatedly_is_retried_with_growing_delays_never_lost_and_others_proceed(
    app, runtime, clock
):
    @app.orchestration_trigger(context_name="context")
    def simple(context):
        return (yield context.call_activity("echo", context.get_input()))

    @app.activity_trigger(input_name="x")
    def echo(x):
        return x

    original_commit = runtime.backend.commit
    attempts: list[datetime] = []

    async def commit(instance_id, **kwargs):
        if instance_id == "broken-for-a-while":
            attempts.append(clock.now)
            if len(attempts) <= 8:
                raise ConnectionError("this instance's partition is unavailable")
        return await original_commit(instance_id, **kwargs)

    runtime.backend.commit = commit
    client = runtime.client()
    await client.start_new("simple", "broken-for-a-while", 1)
    healthy = await client.start_new("simple", "healthy", 2)
    for _ in range(400):
        await runtime.worker.run_until_idle()
        clock.advance(1)
    status = await client.get_status(healthy)
    assert status.runtime_status is S.Completed and status.output == 2
    # Far more failures than the poison limit: still retried, with doubling delays, and not lost.
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(attempts)]
    assert gaps[:7] == sorted(gaps[:7]) and gaps[6] >= 32
    assert runtime.backend.poison_queue == []
    status = await client.get_status("broken-for-a-while")
    assert status.runtime_status is S.Completed and status.output == 1
    assert runtime.backend.pending_count() == 0


async def test_activity_redelivered_after_lost_ack(app, runtime, clock):
    """The activity's completion was sent but its work item was not deleted: it runs again later,
    and the second completion is a duplicate."""
    calls: list[str] = []

    @app.orchestration_trigger(context_name="context")
    def single(context):
        value = yield context.call_activity("step", "a")
        return value

    @app.activity_trigger(input_name="x")
    def step(x):
        calls.append(x)
        return f"{x.upper()}{len(calls)}"

    backend = runtime.backend
    original_delete = backend.delete
    lost = {"n": 0}

    async def delete(received):
        if received.queue == WORK_ITEM_QUEUE and lost["n"] == 0:
            lost["n"] += 1
            raise ConnectionError("ack lost")
        await original_delete(received)

    backend.delete = delete
    client = runtime.client()
    iid = await client.start_new("single")
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed
    assert status.output == "A1"

    clock.advance(runtime.worker.options.visibility_timeout + 1)  # the work item becomes visible again
    await runtime.worker.run_until_idle()
    assert calls == ["a", "a"]
    status = await client.get_status(iid)
    assert status.output == "A1"  # the first completion won; the re-run's is dropped
    history = (await runtime.backend.load_history(iid)).events
    assert _count(history, EventType.TASK_COMPLETED) == 1
    assert backend.pending_count() == 0


async def test_two_workers_share_an_instance(app, make_runtime, clock):
    """Workers with stale caches must reload on ETag conflicts, never lose or repeat a step."""
    calls: list[int] = []

    @app.orchestration_trigger(context_name="context")
    def stepper(context):
        results = []
        for _ in range(4):
            value = yield context.wait_for_external_event("next")
            results.append((yield context.call_activity("work", value)))
        return results

    @app.activity_trigger(input_name="x")
    def work(x):
        calls.append(x)
        return x * 10

    runtime_a = make_runtime(app)
    runtime_b = df.DurableRuntime(app, runtime_a.backend, clock=clock)
    client = runtime_a.client()
    iid = await client.start_new("stepper", "shared")
    await runtime_a.worker.run_until_idle()  # worker A caches the instance
    for i, worker in enumerate([runtime_b.worker, runtime_a.worker, runtime_b.worker, runtime_a.worker]):
        await client.raise_event(iid, "next", i)
        await worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed, status.failure_details
    assert status.output == [0, 10, 20, 30]
    history = (await runtime_a.backend.load_history(iid)).events
    assert _count(history, EventType.EVENT_RAISED) == 4
    assert _count(history, EventType.TASK_COMPLETED) == 4


async def test_stale_cache_conflict_on_commit(app, make_runtime, clock):
    """Worker A holds a stale cache and receives a new event: its commit conflicts and it retries."""

    @app.orchestration_trigger(context_name="context")
    def collect(context):
        a = yield context.wait_for_external_event("A")
        b = yield context.wait_for_external_event("B")
        return [a, b]

    runtime_a = make_runtime(app)
    runtime_b = df.DurableRuntime(app, runtime_a.backend, clock=clock)
    client = runtime_a.client()
    iid = await client.start_new("collect", "conflict")
    await runtime_a.worker.run_until_idle()
    await client.raise_event(iid, "A", 1)
    await runtime_b.worker.run_until_idle()  # B advances the instance; A's cache is now stale
    await client.raise_event(iid, "B", 2)
    await runtime_a.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed
    assert status.output == [1, 2]
