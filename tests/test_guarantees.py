"""Protocol guarantees (DESIGN §6, §7) that used to break: one regression test per scenario of the issue.

Each test drives the public API on the in-memory backend; where a scenario needs a message delivered
again or in a chosen order, the helpers below record what the runtime sends and inject it again."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from datetime import timedelta

import pytest

import durable as df
from durable import EntityId, EventType
from durable.core._messages import WorkMessage
from durable.core._protocol import OUTCOMES_TO_PARENT
from durable.runtime._client import START_SEND_ATTEMPTS
from storage import control_queue, partition_of
from tests.conftest import CrashOnce

S = df.OrchestrationRuntimeStatus


# -- helpers -----------------------------------------------------------------------------------------------
async def settle(runtime: df.DurableRuntime, clock=None, rounds: int = 0) -> None:  # type: ignore[no-untyped-def]
    """Run until idle; with ``clock``, also let ``rounds`` rounds of retries and deferrals come back."""
    await runtime.worker.run_until_idle()
    for _ in range(rounds):
        clock.advance(31)
        await runtime.worker.run_until_idle()


def record_sends(runtime: df.DurableRuntime) -> list[WorkMessage]:
    """Keep a copy of every message the runtime sends (to re-deliver one later)."""
    sent: list[WorkMessage] = []
    original = runtime.backend.send

    async def send(messages):  # type: ignore[no-untyped-def]
        sent.extend(messages)
        await original(messages)

    runtime.backend.send = send  # type: ignore[method-assign]
    return sent


def hold_back(runtime: df.DurableRuntime, to_instance: str) -> Callable[[], list[WorkMessage]]:
    """Keep messages addressed to ``to_instance`` off the queues; the returned function lets them go
    (it returns them; the caller sends them when it chooses)."""
    held: list[WorkMessage] = []
    original = runtime.backend.send
    state = {"holding": True}

    async def send(messages):  # type: ignore[no-untyped-def]
        keep = [m for m in messages if state["holding"] and m.instance_id == to_instance]
        held.extend(keep)
        await original([m for m in messages if m not in keep])

    def release() -> list[WorkMessage]:
        state["holding"] = False
        return held

    runtime.backend.send = send  # type: ignore[method-assign]
    return release


def queue_of(runtime: df.DurableRuntime, instance_id: str) -> str:
    return control_queue(partition_of(instance_id, runtime.backend.partition_count))


async def deliver_again(runtime: df.DurableRuntime, message: WorkMessage) -> None:
    """The very same message (same id) delivered once more, as an at-least-once queue may."""
    await runtime.backend.send([message])


def second_worker(runtime: df.DurableRuntime, inline: bool = False) -> df.Worker:
    """Another worker on the same task hub, with an empty cache."""
    options = df.WorkerOptions(inline_activities=inline)
    return df.Worker(runtime.worker.registry, runtime.backend, clock=runtime.clock, options=options)


def register_log(app: df.DFApp, name: str = "log") -> None:
    """An entity whose state is the list of the inputs of its ``append`` operations."""

    @app.entity_trigger(context_name="context", entity_name=name)
    def log(context):
        items = context.get_state(list)
        if context.operation_name == "append":
            items.append(context.get_input())
        context.set_state(items)


async def state_of(runtime: df.DurableRuntime, entity: EntityId):  # type: ignore[no-untyped-def]
    response = await runtime.client().read_entity_state(entity)
    return response.entity_state if response.entity_exists else "<missing>"


def sent_to(sent: list[WorkMessage], instance_id: str, event_type: EventType) -> list[WorkMessage]:
    """The recorded messages of one event type addressed to ``instance_id``."""
    return [m for m in sent if m.instance_id == instance_id and m.event.event_type is event_type]


# -- 1. applied message ids survive continue-as-new ------------------------------------------------------------
@pytest.mark.parametrize("how", ["re-sent after the commit", "duplicated by the queue"])
async def test_an_event_redelivered_after_continue_as_new_is_not_applied_twice(app, runtime, clock, how):
    """Scenario 1: an event redelivered after the step that consumed it continued as new."""

    @app.orchestration_trigger(context_name="context")
    def two_rounds(context):
        value = yield context.wait_for_external_event("E")
        if context.get_input() == 0:
            context.continue_as_new(1)
            return None
        return value

    client = runtime.client()
    sent = record_sends(runtime)
    iid = await client.start_new("two_rounds", "cas-dup", 0)
    await settle(runtime)
    await client.raise_event(iid, "E", "first")
    [event] = sent_to(sent, iid, EventType.EVENT_RAISED)
    if how == "duplicated by the queue":  # a copy the queue hands out a little later
        runtime.backend.put_raw(queue_of(runtime, iid), event.to_json(), delay=5)
    await settle(runtime)
    if how == "re-sent after the commit":
        await deliver_again(runtime, event)
    clock.advance(10)
    await settle(runtime)
    status = await client.get_status(iid)
    assert status.runtime_status is S.Running, f"the duplicate was applied to the next execution: {status.output}"
    await client.raise_event(iid, "E", "second")
    await settle(runtime)
    assert (await client.get_status(iid)).output == "second"


# -- 2. terminate in the same batch as the event that continues as new --------------------------------------
async def test_a_terminate_in_the_same_batch_as_a_continue_as_new_event_terminates(app, runtime):
    """Scenario 2: terminate received in one batch with the event that makes the code continue as new."""

    @app.orchestration_trigger(context_name="context")
    def looper(context):
        yield context.wait_for_external_event("next")
        context.continue_as_new(context.get_input() + 1)

    client = runtime.client()
    iid = await client.start_new("looper", "cas-term", 0)
    await settle(runtime)
    await client.raise_event(iid, "next")
    await client.terminate(iid, "stop")
    await settle(runtime)
    assert (await client.get_status(iid)).runtime_status is S.Terminated


# -- 3. a late grant to a replaced execution must not free the next execution's lock ---------------------------
async def test_a_late_lock_grant_to_a_replaced_execution_does_not_break_mutual_exclusion(app, runtime):
    """Scenario 3: execution 1 requests lock(g) and continues as new; execution 2 holds g; nobody else gets in."""

    @app.entity_trigger(context_name="context")
    def gate(context):
        markers = context.get_state(list)
        markers.append(f"{context.operation_name} {context.get_input()}")
        context.set_state(markers)

    gate_id = EntityId("gate", "g")

    @app.orchestration_trigger(context_name="context")
    def guarded(context):
        if context.get_input() == "request and leave":
            context.lock([gate_id])  # requested, never awaited
            context.continue_as_new("stay")
            return None
        with (yield context.lock([gate_id])):
            yield context.call_entity(gate_id, "enter", context.instance_id)
            if context.get_input() == "stay":
                yield context.wait_for_external_event("leave")
            yield context.call_entity(gate_id, "exit", context.instance_id)
        return "done"

    client = runtime.client()
    holder = await client.start_new("guarded", "holder", "request and leave")
    await settle(runtime)
    assert await state_of(runtime, gate_id) == ["enter holder"]  # execution 2 is inside its section
    intruder = await client.start_new("guarded", "intruder", "pass through")
    await settle(runtime)
    markers = await state_of(runtime, gate_id)
    assert markers == ["enter holder"], f"two orchestrations inside critical sections on g: {markers}"
    assert (await client.get_status(intruder)).runtime_status is S.Running
    await client.raise_event(holder, "leave")
    await settle(runtime)
    assert await state_of(runtime, gate_id) == ["enter holder", "exit holder", "enter intruder", "exit intruder"]


# -- 4. scheduled signals more than 7 days ahead ---------------------------------------------------------------
async def test_an_entity_signal_scheduled_ten_days_ahead_is_applied_on_day_ten(app, runtime, clock):
    """Scenario 4: a client signal scheduled 10 days ahead surfaces on day 7 (queue visibility limit)."""
    register_log(app)
    client = runtime.client()
    entity = EntityId("log", "later")
    start = clock.now
    await client.signal_entity(entity, "append", "due", scheduled_time=start + timedelta(days=10))
    while clock.now < start + timedelta(days=10) - timedelta(hours=1):
        await settle(runtime)
        assert await state_of(runtime, entity) == "<missing>", f"applied early, at {clock.now - start}"
        clock.advance(3600)
    clock.advance(2 * 3600)
    await settle(runtime)
    assert await state_of(runtime, entity) == ["due"]
    assert not runtime.backend.poison_queue


# -- 5. a grant reaching a terminated and purged instance ------------------------------------------------------
async def test_locks_granted_to_a_terminated_and_purged_orchestration_are_released(app, runtime, clock):
    """Scenario 5: terminated while its lock request travels over 2 entities, then purged."""
    register_log(app)
    first, second = EntityId("log", "a"), EntityId("log", "b")

    @app.orchestration_trigger(context_name="context")
    def locker(context):
        with (yield context.lock([first, second])):
            yield context.call_entity(first, "append", context.instance_id)
        return "locked and released"

    client = runtime.client()
    let_go = hold_back(runtime, first.instance_id)
    await client.start_new("locker", "doomed")
    await settle(runtime)
    await client.terminate("doomed", "give up")
    await settle(runtime)
    assert (await client.get_status("doomed")).runtime_status is S.Terminated
    await client.purge_instance_history("doomed")
    await runtime.backend.send(let_go())  # the lock request travels a -> b -> "doomed" now
    await settle(runtime, clock, rounds=20)

    iid = await client.start_new("locker", "next")
    await settle(runtime, clock, rounds=20)
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed, f"a and b stay locked: {status.runtime_status}"
    assert status.output == "locked and released"


# -- 6. a re-created entity's outgoing signals -----------------------------------------------------------------
@pytest.mark.parametrize("delete", ["delete_entity", "destruct_on_exit"])
async def test_signals_of_an_entity_deleted_purged_and_used_again_are_applied(app, runtime, delete):
    """Scenario 6: an entity deleted, purged and used again numbers its signals from 1 again."""
    register_log(app)
    sink = EntityId("log", "sink")

    @app.entity_trigger(context_name="context")
    def relay(context):
        if context.operation_name == "forward":
            context.signal_entity(sink, "append", context.get_input())
            context.set_state(context.get_state(lambda: 0) + 1)
        elif context.operation_name == "die":
            context.destruct_on_exit()

    client = runtime.client()
    relay_id = EntityId("relay", "r")
    await client.signal_entity(relay_id, "forward", "first life")
    await settle(runtime)
    if delete == "delete_entity":
        await client.delete_entity(relay_id)
    else:
        await client.signal_entity(relay_id, "die")
    await settle(runtime)
    assert await state_of(runtime, relay_id) == "<missing>"
    await client.purge_instance_history(relay_id.instance_id)
    await client.signal_entity(relay_id, "forward", "second life")
    await settle(runtime)
    assert await state_of(runtime, relay_id) == 1
    assert await state_of(runtime, sink) == ["first life", "second life"]


def register_simple(app: df.DFApp) -> None:
    """``simple``: one activity, ``echo``, whose result it returns."""

    @app.orchestration_trigger(context_name="context")
    def simple(context):
        return (yield context.call_activity("echo", context.get_input()))

    @app.activity_trigger(input_name="x")
    def echo(x):
        return x


# -- 7. start_new whose start message could not be sent --------------------------------------------------------
async def test_start_new_retried_after_its_send_failed_succeeds(app, runtime, clock):
    """Scenario 7: start_new wrote the Pending row but its send failed; the caller retries."""

    register_simple(app)
    backend = runtime.backend
    original = backend.send
    failures = {"left": START_SEND_ATTEMPTS}  # start_new retries the send itself before giving up

    async def flaky_send(messages):  # type: ignore[no-untyped-def]
        if failures["left"]:
            failures["left"] -= 1
            raise ConnectionError("queue unavailable")
        await original(messages)

    backend.send = flaky_send  # type: ignore[method-assign]
    client = runtime.client()
    with pytest.raises(ConnectionError):
        await client.start_new("simple", "unlucky", 7)
    assert await client.start_new("simple", "unlucky", 7) == "unlucky"
    await settle(runtime, clock, rounds=3)
    status = await client.get_status("unlucky")
    assert status.runtime_status is S.Completed
    assert status.output == 7


async def test_a_restart_whose_start_could_not_be_sent_is_marked_failed(app, runtime):
    """Found in review: the row of a restart whose start message could not be sent stayed
    Pending for ever (the Failed mark went with checkpoint 0 under the Pending row's N)."""

    register_simple(app)
    client = runtime.client()
    await client.start_new("simple", "again", 1)
    await settle(runtime)
    original = runtime.backend.send

    async def broken_send(messages):  # type: ignore[no-untyped-def]
        raise ConnectionError("queue unavailable")

    runtime.backend.send = broken_send  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        await client.start_new("simple", "again", 2)
    status = await client.get_status("again")
    assert status.runtime_status is S.Failed and status.failure_details["ErrorType"] == "StartNotSent"
    runtime.backend.send = original  # type: ignore[method-assign]
    await client.start_new("simple", "again", 3)
    await settle(runtime)
    assert (await client.get_status("again")).output == 3


async def test_a_start_whose_answers_were_lost_is_not_marked_failed_once_it_runs(app, runtime):
    """Found in review: every send of the start went out with its answer lost; the instance's
    first step ran before start_new gave up, and the Failed mark went over its Running row."""

    @app.orchestration_trigger(context_name="context")
    def waiter(context):
        return (yield context.wait_for_external_event("go"))

    original = runtime.backend.send
    sends = {"count": 0}

    async def answers_lost(messages):  # type: ignore[no-untyped-def]
        await original(messages)
        sends["count"] += 1
        if sends["count"] == START_SEND_ATTEMPTS:
            runtime.backend.send = original  # type: ignore[method-assign]
            await runtime.worker.run_until_idle()  # the first step runs meanwhile
        raise ConnectionError("the answer was lost")

    runtime.backend.send = answers_lost  # type: ignore[method-assign]
    client = runtime.client()
    with pytest.raises(ConnectionError):
        await client.start_new("waiter", "lucky")
    assert (await client.get_status("lucky")).runtime_status is S.Running
    await client.raise_event("lucky", "go", "yes")
    await settle(runtime)
    assert (await client.get_status("lucky")).output == "yes"


# -- 8. inline activities of a step that loses its commit ------------------------------------------------------
async def test_an_inline_activity_of_a_step_that_loses_to_a_terminate_never_runs(app, make_runtime):
    """Scenario 8: a step's inline activity runs, then its commit loses to a terminate committed by another worker."""
    runtime = make_runtime(app, inline=True)
    calls: list[str] = []

    @app.orchestration_trigger(context_name="context")
    def after_go(context):
        yield context.wait_for_external_event("go")
        return (yield context.call_activity("side_effect", "x"))

    @app.activity_trigger(input_name="x")
    def side_effect(x):
        calls.append(x)
        return x

    client = runtime.client()
    iid = await client.start_new("after_go", "raced")
    await settle(runtime)
    other = second_worker(runtime)
    backend = runtime.backend
    original_commit = backend.commit
    raced = {"done": False}

    async def commit(instance_id, **kwargs):  # type: ignore[no-untyped-def]
        if not raced["done"] and any(e.event_type is EventType.TASK_SCHEDULED for e in kwargs["new_events"]):
            raced["done"] = True  # just before this commit, another worker commits a terminate
            await client.terminate(iid, "stop")
            await other.run_orchestrations_once()
        return await original_commit(instance_id, **kwargs)

    backend.commit = commit  # type: ignore[method-assign]
    await client.raise_event(iid, "go")
    await settle(runtime)
    assert raced["done"]
    assert (await client.get_status(iid)).runtime_status is S.Terminated
    assert calls == [], "the activity ran for a step that was never committed"


# -- 9. a late failure from before a rewind ---------------------------------------------------------------------
async def test_a_failure_redelivered_after_a_rewind_does_not_fail_the_rewound_run(app, runtime):
    """Scenario 9: the TaskFailed of the run before the rewind is delivered again before the new result."""
    failing = {"now": True}

    @app.orchestration_trigger(context_name="context")
    def once(context):
        return (yield context.call_activity("fragile", 3))

    @app.activity_trigger(input_name="x")
    def fragile(x):
        if failing["now"]:
            raise RuntimeError("down")
        return x * 2

    client = runtime.client()
    sent = record_sends(runtime)
    iid = await client.start_new("once", "rewound")
    await settle(runtime)
    assert (await client.get_status(iid)).runtime_status is S.Failed
    [old_failure] = sent_to(sent, iid, EventType.TASK_FAILED)
    failing["now"] = False
    await client.rewind(iid, "fixed")
    await runtime.worker.run_orchestrations_once()  # the rewind; the activity is queued again
    await deliver_again(runtime, old_failure)
    await settle(runtime)
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed, status.output
    assert status.output == 6


# -- 10. rewind of an orchestration that retried or handled a failure -----------------------------------------
@pytest.mark.parametrize("shape", ["retried", "handled"])
async def test_an_orchestration_that_retried_or_handled_a_failure_completes_after_rewind(app, runtime, clock, shape):
    """Scenario 10: rewind after call_activity_with_retry gave up, or after a handled then an unhandled failure."""
    attempts: dict[str, int] = {}
    fail_first = {"retried": {"flaky": 2}, "handled": {"flaky": 1, "other": 1}}[shape]

    @app.orchestration_trigger(context_name="context")
    def resilient(context):
        if shape == "retried":
            retry = df.RetryOptions(first_retry_interval_in_milliseconds=1000, max_number_of_attempts=2)
            return (yield context.call_activity_with_retry("flaky", retry, "R"))
        with contextlib.suppress(df.TaskFailedError):  # a handled failure
            yield context.call_activity("flaky", "first")
        return (yield context.call_activity("other", "B"))

    def make(name):  # type: ignore[no-untyped-def]
        def activity(x):
            attempts[name] = attempts.get(name, 0) + 1
            if attempts[name] <= fail_first.get(name, 0):
                raise RuntimeError(f"{name} attempt {attempts[name]} fails")
            return x

        activity.__name__ = name
        return activity

    app.activity_trigger(input_name="x")(make("flaky"))
    app.activity_trigger(input_name="x")(make("other"))
    client = runtime.client()
    iid = await client.start_new("resilient", "rewind-" + shape)
    await settle(runtime, clock, rounds=2)
    assert (await client.get_status(iid)).runtime_status is S.Failed
    await client.rewind(iid)
    await settle(runtime, clock, rounds=2)
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed, status.failure_details
    assert status.output == ("R" if shape == "retried" else "B")


# -- 11. status right after restarting an id -------------------------------------------------------------------
async def test_a_restarted_id_never_reports_the_previous_run_as_its_status(app, runtime):
    """Scenario 11: start_new with the id of a completed instance, processed by a worker that has not cached it."""

    @app.orchestration_trigger(context_name="context")
    def doubler(context):
        return (yield context.call_activity("double", context.get_input()))

    @app.activity_trigger(input_name="x")
    def double(x):
        return 2 * x

    client = runtime.client()
    iid = await client.start_new("doubler", "again", 1)
    await settle(runtime)
    assert (await client.get_status(iid)).output == 2

    seen: list[tuple[S, object]] = []
    backend = runtime.backend
    original_write = backend.write_instance

    async def write_instance(record, etag=None):  # type: ignore[no-untyped-def]
        written = await original_write(record, etag)
        status = await client.get_status(iid)
        seen.append((status.runtime_status, status.output))
        return written

    backend.write_instance = write_instance  # type: ignore[method-assign]
    await client.start_new("doubler", iid, 5)
    status = await client.get_status(iid)
    seen.append((status.runtime_status, status.output))
    other = second_worker(runtime)
    while await other.run_once():
        pass
    assert seen[-1] == (S.Completed, 10)
    before_the_end = seen[: seen.index((S.Completed, 10))]
    assert all(s in (S.Pending, S.Running) for s, _ in before_the_end), f"statuses seen after the restart: {seen}"


# -- 12. work scheduled, not awaited, by a step that continues as new -------------------------------------------
async def test_work_scheduled_without_waiting_before_continue_as_new_still_runs(app, runtime):
    """Scenario 12: an activity and a sub-orchestration scheduled, not awaited, in a step that continues as new."""
    calls: list[str] = []

    @app.orchestration_trigger(context_name="context")
    def launcher(context):
        if context.get_input() == 0:
            context.call_activity("record", "from execution 0")
            context.call_sub_orchestrator("child", "from execution 0", "launched-child")
            context.continue_as_new(1)
            return None
        return "next execution done"

    @app.orchestration_trigger(context_name="context")
    def child(context):
        return context.get_input()

    @app.activity_trigger(input_name="x")
    def record(x):
        calls.append(x)

    client = runtime.client()
    iid = await client.start_new("launcher", "launcher", 0)
    await settle(runtime)
    assert (await client.get_status(iid)).output == "next execution done"
    assert calls == ["from execution 0"]
    child_status = await client.get_status("launched-child")
    assert child_status is not None, "the sub-orchestration was never started"
    assert child_status.runtime_status is S.Completed


# -- 13. user operations named like protocol messages ----------------------------------------------------------
async def test_entity_operations_named_lock_and_release_are_ordinary_operations(app, runtime):
    """Scenario 13: call_entity(e, "lock") / (e, "release"): replies are results, not lock messages."""

    @app.entity_trigger(context_name="context")
    def door(context):
        context.set_result({"lock": 42, "release": 7}[context.operation_name])

    @app.orchestration_trigger(context_name="context")
    def doorman(context):
        door_id = EntityId("door", "front")
        locked = yield context.call_entity(door_id, "lock")
        released = yield context.call_entity(door_id, "release")
        return [locked, released]

    client = runtime.client()
    sent = record_sends(runtime)
    iid = await client.start_new("doorman", "doorman")
    await settle(runtime)
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed, status.output
    assert status.output == [42, 7]
    # the entity's replies delivered once more (at least once), after the orchestration completed
    replies = sent_to(sent, iid, EventType.TASK_COMPLETED)
    assert len(replies) == 2
    for reply in replies:
        await deliver_again(runtime, reply)
    for _ in range(runtime.worker.options.max_dequeue_count + 1):  # long enough for a failing one to be poisoned
        await settle(runtime)
        runtime.clock.advance(runtime.worker.options.retry_delay + 1)
    assert runtime.backend.poison_queue == [], "a reply named 'lock' was taken for a lock grant"
    assert runtime.backend.pending_count() == 0
    assert (await client.get_status(iid)).output == [42, 7]


# -- 14. a continue-as-new loop that never waits ---------------------------------------------------------------
async def test_a_continue_as_new_loop_that_never_waits_fails_the_instance(app, runtime, clock):
    """Scenario 14: an orchestrator that always continues as new at once."""

    @app.orchestration_trigger(context_name="context")
    def spinner(context):
        context.continue_as_new(context.get_input() + 1)
        return None
        yield  # a generator orchestrator

    client = runtime.client()
    iid = await client.start_new("spinner", "spinner", 0)
    for _ in range(runtime.worker.options.max_dequeue_count + 2):
        await settle(runtime)
        clock.advance(runtime.worker.options.retry_delay + 1)
    status = await client.get_status(iid)
    assert runtime.backend.poison_queue == []
    assert status.runtime_status is S.Failed
    assert "continue" in status.failure_details["Message"].lower()


# -- suspected, confirmed: an entity step that sees only duplicates committed anyway ---------------------------------
async def test_an_entity_step_that_sees_only_duplicates_commits_nothing(app, runtime):
    """Suspected: a batch of duplicates made the entity commit (and rewrite its row) again."""
    register_log(app)

    @app.entity_trigger(context_name="context", entity_name="relay")
    def relay(context):  # its steps have an outbox: what a duplicate-only step used to rewrite
        context.set_state(context.get_state(int) + 1)
        context.signal_entity(EntityId("log", "sink"), "append", context.get_input())

    sent = record_sends(runtime)
    client = runtime.client()
    entity = EntityId("relay", "dups")
    await client.signal_entity(entity, "forward", 1)
    await settle(runtime)
    before = runtime.backend.histories[entity.instance_id].checkpoint
    (signal,) = sent_to(sent, entity.instance_id, EventType.ENTITY_MESSAGE)
    await deliver_again(runtime, signal)
    await settle(runtime)
    assert runtime.backend.histories[entity.instance_id].checkpoint == before
    assert await state_of(runtime, entity) == 1
    assert await state_of(runtime, EntityId("log", "sink")) == [1]
    assert runtime.backend.pending_count() == 0


# -- suspected, confirmed: messages for a not-yet-started instance were dropped after ~3 minutes ----------------------
async def test_an_event_waits_for_a_pending_instance_whose_start_is_late(app, runtime, clock):
    """Suspected: an event for an instance whose start message is slow was dropped after 3 minutes."""

    @app.orchestration_trigger(context_name="context")
    def waiter(context):
        return (yield context.wait_for_external_event("go"))

    held: list[WorkMessage] = []
    send = runtime.backend.send

    async def hold_the_start(messages):  # type: ignore[no-untyped-def]
        held.extend(m for m in messages if m.event.event_type is EventType.EXECUTION_STARTED)
        await send([m for m in messages if m.event.event_type is not EventType.EXECUTION_STARTED])

    runtime.backend.send = hold_the_start  # type: ignore[method-assign]
    client = runtime.client()
    await client.start_new("waiter", "late")
    await client.raise_event("late", "go", "finally")
    for _ in range(20):  # ten minutes of deferrals
        await runtime.worker.run_until_idle()
        clock.advance(30)
    runtime.backend.send = send  # type: ignore[method-assign]
    await send(held)
    await settle(runtime, clock, rounds=2)
    status = await client.get_status("late")
    assert status.runtime_status is S.Completed and status.output == "finally"


# -- 16. purging an entity (or an orchestration) that is still in use ------------------------------------------------
async def test_purging_an_entity_in_use_is_refused_and_its_senders_finish(app, runtime):
    """Scenario 16: a purge in the middle of a burst of signals stranded the senders."""

    @app.entity_trigger(context_name="context", entity_name="counter")
    def counter(context):
        context.set_state(context.get_state(int) + 1)

    @app.orchestration_trigger(context_name="context")
    def burst(context):
        for _ in range(20):
            context.signal_entity(EntityId("counter", "c"), "add")
            yield context.create_timer(context.current_utc_datetime)  # one signal per step
        return "sent"

    client = runtime.client()
    senders = [await client.start_new("burst") for _ in range(3)]
    for _ in range(5):  # part of the burst is through
        await runtime.worker.run_once()
    with pytest.raises(df.PurgeRefused, match="in use"):
        await client.purge_instance_history("@counter@c")
    with pytest.raises(df.PurgeRefused, match="terminal"):
        await client.purge_instance_history(senders[0])
    assert (await client.purge_instance_history_by(runtime_status=[S.Running])).instances_deleted == 0
    await settle(runtime)
    assert [(await client.get_status(i)).runtime_status for i in senders] == [S.Completed] * 3
    assert await state_of(runtime, EntityId("counter", "c")) == 60
    # Once its state is deleted and it is idle, the entity can be purged.
    await client.delete_entity("@counter@c")
    await settle(runtime)
    assert (await client.purge_instance_history("@counter@c")).instances_deleted == 1


# -- suspected, confirmed: per-sender counters of an entity were never pruned --------------------------------------
async def test_an_entity_forgets_the_counters_of_senders_that_ended(app, runtime, clock):
    """Suspected: an eternal orchestration signalling an entity grew the entity's state by one
    sender counter per execution, for ever."""
    register_log(app)

    @app.orchestration_trigger(context_name="context")
    def eternal(context):
        round_ = context.get_input()
        context.signal_entity(EntityId("log", "l"), "append", round_)
        yield context.create_timer(context.current_utc_datetime)
        if round_ < 9:
            context.continue_as_new(round_ + 1)

    sent = record_sends(runtime)
    client = runtime.client()
    await client.start_new("eternal", "forever", 0)
    await settle(runtime)
    assert await state_of(runtime, EntityId("log", "l")) == list(range(10))
    snapshot = _entity_snapshot(runtime, "@log@l")
    assert snapshot.senders == {} and len(snapshot.retired) == 10
    # A late duplicate from a retired sender is still recognised...
    clock.advance(3600)
    first_signal = sent_to(sent, "@log@l", EventType.ENTITY_MESSAGE)[0]
    await deliver_again(runtime, first_signal)
    await client.signal_entity(EntityId("log", "l"), "append", "later")
    await settle(runtime)
    assert await state_of(runtime, EntityId("log", "l")) == [*range(10), "later"]
    # ...and once the window has passed, retired senders are forgotten too.
    clock.advance(7 * 3600)
    await client.signal_entity(EntityId("log", "l"), "append", "much later")
    await settle(runtime)
    assert _entity_snapshot(runtime, "@log@l").retired == {}
    assert (await state_of(runtime, EntityId("log", "l")))[-2:] == ["later", "much later"]


def _entity_snapshot(runtime: df.DurableRuntime, instance_id: str):  # type: ignore[no-untyped-def]
    from durable.core._entities import EntitySnapshot

    return EntitySnapshot.from_events(runtime.backend.histories[instance_id].events)


async def test_a_terminate_for_an_instance_whose_start_is_missing_terminates_its_pending_row(app, runtime, clock):
    """Scenario 7: a terminate for an instance whose start message is lost (or late) was dropped
    after a few deferrals and the row stayed Pending; it now ends the instance Terminated, and the
    start, if it comes after all, is a duplicate."""

    @app.orchestration_trigger(context_name="context")
    def waiter(context):
        return (yield context.wait_for_external_event("go"))

    held: list[WorkMessage] = []
    send = runtime.backend.send

    async def lose_the_start(messages):  # type: ignore[no-untyped-def]
        held.extend(m for m in messages if m.event.event_type is EventType.EXECUTION_STARTED)
        await send([m for m in messages if m.event.event_type is not EventType.EXECUTION_STARTED])

    runtime.backend.send = lose_the_start  # type: ignore[method-assign]
    client = runtime.client()
    await client.start_new("waiter", "lost-start")
    await client.terminate("lost-start", "never mind")
    await settle(runtime)
    status = await client.get_status("lost-start")
    assert status.runtime_status is S.Terminated and status.output == "never mind"
    runtime.backend.send = send  # type: ignore[method-assign]
    await send(held)  # the start turns up after all
    await settle(runtime)
    assert (await client.get_status("lost-start")).runtime_status is S.Terminated
    assert runtime.backend.pending_count() == 0


# -- a child's row lagged behind its outcome, which its parent already showed (protocol I8) ------------------------


def register_parent_and_child(app: df.DFApp) -> None:
    @app.orchestration_trigger(context_name="context")
    def parent(context):
        try:
            return (yield context.call_sub_orchestrator("child", context.get_input()))
        except df.TaskFailedError as error:
            return f"failed: {error.error_type}"

    @app.orchestration_trigger(context_name="context")
    def child(context):
        value = yield context.call_activity("halve", context.get_input())
        return value

    @app.activity_trigger(input_name="n")
    def halve(n):
        if n % 2:
            raise ValueError(f"{n} is odd")
        return n // 2


@pytest.mark.parametrize("crash", [False, True])
@pytest.mark.parametrize(("given", "shown"), [(10, S.Completed), (7, S.Failed)])
async def test_a_child_row_shows_its_outcome_before_its_parent_learns_it(app, runtime, clock, given, shown, crash):
    """Found by CI on Azurite: a parent completed, and its child's status was still missing (the
    child's row was written after its outcome had been sent, and handed over). Whenever the
    outcome message leaves, the child's row must already show it — also when the worker died
    right after the child's last commit and the next one sends what that step owed."""
    register_parent_and_child(app)
    commits: list[str] = []

    def crash_after_the_childs_last_commit(point: str, instance_id: str) -> None:
        if crash and point == "committed" and instance_id == "p:0":
            commits.append(instance_id)
            if len(commits) == 2:
                raise ConnectionError("worker died after the child's last commit")

    runtime.worker.options.fault_hook = crash_after_the_childs_last_commit
    rows_seen: list[df.OrchestrationRuntimeStatus | None] = []
    send = runtime.backend.send

    async def look_at_the_child_first(messages):  # type: ignore[no-untyped-def]
        for message in messages:
            if message.event.event_type in OUTCOMES_TO_PARENT:
                row = await runtime.backend.read_instance("p:0")
                rows_seen.append(None if row is None else row.runtime_status)
        await send(messages)

    runtime.backend.send = look_at_the_child_first  # type: ignore[method-assign]
    client = runtime.client()
    await client.start_new("parent", "p", given)
    await settle(runtime, clock, rounds=2)
    assert len(commits) == (2 if crash else 0)
    assert rows_seen == [shown]
    assert (await client.get_status("p")).runtime_status is S.Completed
    child = await runtime.backend.read_instance("p:0")
    assert child is not None and child.runtime_status is shown and child.finished


@pytest.mark.parametrize("then", ["wait", "purge", "restart"])
async def test_a_crash_after_a_row_written_ahead_still_tells_the_parent(app, runtime, clock, then):
    """The row written ahead of the child's outcome proves nothing sent: a worker dying right
    after it leaves the parent waiting only until the child's message comes back. Meanwhile
    the child is neither purged nor started again (its parent would wait for ever): both say
    why, and work once the outcome is sent."""
    register_parent_and_child(app)
    runtime.worker.options.fault_hook = crash = CrashOnce("row-ahead")
    client = runtime.client()
    await client.start_new("parent", "p", 10)
    await runtime.worker.run_until_idle()
    assert crash.crashed == ["p:0"]
    child = await runtime.backend.read_instance("p:0")
    assert child is not None and child.runtime_status is S.Completed and not child.finished
    assert (await client.get_status("p")).runtime_status is S.Running
    if then == "purge":
        with pytest.raises(df.PurgeRefused, match="still sending its outcome"):
            await client.purge_instance_history("p:0")
    elif then == "restart":
        with pytest.raises(df.OrchestrationAlreadyExistsError, match="still sending its outcome"):
            await client.start_new("child", "p:0", 4)
    await settle(runtime, clock, rounds=2)
    status = await client.get_status("p")
    assert status.runtime_status is S.Completed and status.output == 5
    assert (await runtime.backend.read_instance("p:0")).finished
    if then == "purge":
        assert (await client.purge_instance_history("p:0")).instances_deleted == 1
    elif then == "restart":
        await client.start_new("child", "p:0", 4)
        await settle(runtime)
        assert (await client.get_status("p:0")).output == 2
    assert runtime.backend.pending_count() == 0


async def test_a_row_written_ahead_of_a_purged_history_blocks_nothing(app, runtime):
    """A late writer (its worker lost the instance, which was then finished and purged) may
    put a marked row back with no history under it: nobody will write it again, so a purge
    takes it and a start replaces it."""

    @app.orchestration_trigger(context_name="context")
    def one(context):
        return (yield context.call_activity("echo", 1))

    @app.activity_trigger(input_name="x")
    def echo(x):
        return x

    client = runtime.client()
    for then in ("purge", "restart"):
        await client.start_new("one", "o")
        await settle(runtime)
        finished = await runtime.backend.read_instance("o")
        assert finished is not None and finished.finished
        assert (await client.purge_instance_history("o")).instances_deleted == 1
        await runtime.backend.write_instance(dataclasses.replace(finished, sends_pending=True))  # the late writer
        if then == "purge":
            assert (await client.purge_instance_history("o")).instances_deleted == 1
            assert await runtime.backend.read_instance("o") is None
        else:
            await client.start_new("one", "o")
            await settle(runtime)
            assert (await client.get_status("o")).runtime_status is S.Completed
