"""The orchestrator code the histories in this folder were recorded with, and changed versions of it.

``bp`` holds the code as it was when ``regenerate.py`` recorded the fixtures: replaying a fixture
against it must succeed. The functions after it are the same orchestrators after a change that
breaks replay (an activity renamed, one added or dropped, a timer replaced by an activity, ...);
``tests/test_replayer.py`` checks each against the history of the original.
"""

from __future__ import annotations

from collections.abc import Generator
from datetime import timedelta
from typing import Any

import durable as df
from durable import DurableEntityContext, DurableOrchestrationContext, EntityId

Orchestration = Generator[Any, Any, Any]

bp = df.Blueprint()

# regenerate.py makes ``flaky`` fail until the history it records has failed once, then rewinds it.
FLAKY = {"fail": True}


# -- the recorded code --------------------------------------------------------------------------------
@bp.orchestration_trigger(context_name="context")
def chain(context: DurableOrchestrationContext) -> Orchestration:
    a = yield context.call_activity("hello", "Tokyo")
    b = yield context.call_activity("hello", "Seattle")
    c = yield context.call_activity("hello", "London")
    return [a, b, c]


@bp.orchestration_trigger(context_name="context")
def fan_out(context: DurableOrchestrationContext) -> Orchestration:
    tasks = [context.call_activity("square", i) for i in range(context.get_input())]
    results = yield context.task_all(tasks)
    total = yield context.call_activity("add", results)
    return {"results": results, "total": total}


@bp.orchestration_trigger(context_name="context")
def approval(context: DurableOrchestrationContext) -> Orchestration:
    """A cooling-off timer, then an approval raced against a deadline."""
    yield context.create_timer(context.current_utc_datetime + timedelta(minutes=5))
    deadline = context.create_timer(context.current_utc_datetime + timedelta(hours=1))
    answer = context.wait_for_external_event("Approval")
    winner = yield context.task_any([answer, deadline])
    if winner != answer:
        return "timed out"
    deadline.cancel()
    return (yield context.call_activity("process", answer.result))


@bp.orchestration_trigger(context_name="context")
def counter(context: DurableOrchestrationContext) -> Orchestration:
    """An eternal orchestration: adds each "add" event to its total, one execution per event."""
    total = context.get_input() or 0
    amount = yield context.wait_for_external_event("add")
    total = yield context.call_activity("add", [total, amount])
    if amount == 0:
        return total
    context.continue_as_new(total)
    return None


@bp.orchestration_trigger(context_name="context")
def rewound(context: DurableOrchestrationContext) -> Orchestration:
    greeting = yield context.call_activity("hello", "Oslo")
    checked = yield context.call_activity("flaky", greeting)
    return (yield context.call_activity("hello", checked))


@bp.orchestration_trigger(context_name="context")
def failing(context: DurableOrchestrationContext) -> Orchestration:
    """Ends Failed: the activity's exception is not handled."""
    yield context.call_activity("hello", "Paris")
    yield context.call_activity("broken", None)
    return "unreachable"


@bp.orchestration_trigger(context_name="context")
def transfer(context: DurableOrchestrationContext) -> Orchestration:
    source, target = EntityId("account", "a"), EntityId("account", "b")
    with (yield context.lock([source, target])):
        a = yield context.call_entity(source, "get")
        b = yield context.call_entity(target, "get")
        yield context.call_entity(source, "set", a - 10)
        yield context.call_entity(target, "set", b + 10)
    context.signal_entity(target, "audit", "transfer done")
    return "ok"


@bp.orchestration_trigger(context_name="context")
def guarded(context: DurableOrchestrationContext) -> Orchestration:
    """Holds a lock until told to go on; regenerate.py terminates it inside the critical section."""
    with (yield context.lock([EntityId("account", "c")])):
        go = yield context.wait_for_external_event("go")
        yield context.call_entity(EntityId("account", "c"), "set", go)
    return "done"


@bp.orchestration_trigger(context_name="context")
def parent(context: DurableOrchestrationContext) -> Orchestration:
    greeting = yield context.call_sub_orchestrator("child", "Lima", f"{context.instance_id}-child")
    return (yield context.call_activity("hello", greeting))


@bp.orchestration_trigger(context_name="context")
def child(context: DurableOrchestrationContext) -> Orchestration:
    return (yield context.call_activity("hello", context.get_input()))


@bp.activity_trigger(input_name="city")
def hello(city: str) -> str:
    return f"Hello {city}!"


@bp.activity_trigger(input_name="x")
def square(x: int) -> int:
    return x * x


@bp.activity_trigger(input_name="values")
def add(values: list[int]) -> int:
    return sum(values)


@bp.activity_trigger(input_name="value")
def process(value: str) -> str:
    return f"approved: {value}"


@bp.activity_trigger(input_name="value")
def flaky(value: str) -> str:
    if FLAKY["fail"]:
        raise ConnectionError("the service is down")
    return value.upper()


@bp.activity_trigger(input_name="value")
def broken(value: Any) -> None:
    raise ValueError("the activity is broken")


@bp.entity_trigger(context_name="context")
def account(context: DurableEntityContext) -> None:
    balance = context.get_state(lambda: 100)
    if context.operation_name == "get":
        context.set_result(balance)
    elif context.operation_name == "set":
        balance = context.get_input()
    context.set_state(balance)


# -- changed code: each breaks replay of the history recorded with the original -----------------------
def chain_with_renamed_activity(context: DurableOrchestrationContext) -> Orchestration:
    a = yield context.call_activity("hello", "Tokyo")
    b = yield context.call_activity("greet", "Seattle")  # was "hello"
    c = yield context.call_activity("hello", "London")
    return [a, b, c]


def chain_with_added_activity(context: DurableOrchestrationContext) -> Orchestration:
    a = yield context.call_activity("hello", "Tokyo")
    yield context.call_activity("audit", a)  # new, before the second call
    b = yield context.call_activity("hello", "Seattle")
    c = yield context.call_activity("hello", "London")
    return [a, b, c]


def chain_with_appended_activity(context: DurableOrchestrationContext) -> Orchestration:
    a = yield context.call_activity("hello", "Tokyo")
    b = yield context.call_activity("hello", "Seattle")
    c = yield context.call_activity("hello", "London")
    yield context.call_activity("audit", [a, b, c])  # new, after the last call
    return [a, b, c]


def chain_without_last_activity(context: DurableOrchestrationContext) -> Orchestration:
    a = yield context.call_activity("hello", "Tokyo")
    b = yield context.call_activity("hello", "Seattle")
    return [a, b]  # the call for London was dropped


def chain_with_changed_inputs(context: DurableOrchestrationContext) -> Orchestration:
    """Only inputs and the output changed: the actions still match, so replay succeeds."""
    a = yield context.call_activity("hello", "Kyoto")
    b = yield context.call_activity("hello", "Portland")
    c = yield context.call_activity("hello", "Leeds")
    return {"greetings": [a, b, c]}


def fan_out_dropping_one(context: DurableOrchestrationContext) -> Orchestration:
    tasks = [context.call_activity("square", i) for i in range(context.get_input() - 1)]  # one fewer
    results = yield context.task_all(tasks)
    total = yield context.call_activity("add", results)
    return {"results": results, "total": total}


def approval_with_activity_for_timer(context: DurableOrchestrationContext) -> Orchestration:
    yield context.call_activity("cool_off", 300)  # was a durable timer
    deadline = context.create_timer(context.current_utc_datetime + timedelta(hours=1))
    answer = context.wait_for_external_event("Approval")
    winner = yield context.task_any([answer, deadline])
    if winner != answer:
        return "timed out"
    deadline.cancel()
    return (yield context.call_activity("process", answer.result))


def approval_without_cooling_off(context: DurableOrchestrationContext) -> Orchestration:
    deadline = context.create_timer(context.current_utc_datetime + timedelta(hours=1))  # the first timer is gone
    answer = context.wait_for_external_event("Approval")
    winner = yield context.task_any([answer, deadline])
    if winner != answer:
        return "timed out"
    deadline.cancel()
    return (yield context.call_activity("process", answer.result))


def counter_with_renamed_activity(context: DurableOrchestrationContext) -> Orchestration:
    total = context.get_input() or 0
    amount = yield context.wait_for_external_event("add")
    total = yield context.call_activity("sum", [total, amount])  # was "add"
    if amount == 0:
        return total
    context.continue_as_new(total)
    return None


def counter_without_end(context: DurableOrchestrationContext) -> Orchestration:
    """Continues as new where the recorded execution completed."""
    total = context.get_input() or 0
    amount = yield context.wait_for_external_event("add")
    total = yield context.call_activity("add", [total, amount])
    context.continue_as_new(total)  # even after "add 0"
    return None


def approval_without_waiting(context: DurableOrchestrationContext) -> Orchestration:
    """Takes the same actions but no longer waits for the approval: it ends where the history runs on."""
    yield context.create_timer(context.current_utc_datetime + timedelta(minutes=5))
    context.create_timer(context.current_utc_datetime + timedelta(hours=1))
    return "no approval needed"


def approval_with_longer_deadline(context: DurableOrchestrationContext) -> Orchestration:
    """Only a timer's due time changed: the actions still match, so replay succeeds."""
    yield context.create_timer(context.current_utc_datetime + timedelta(minutes=5))
    deadline = context.create_timer(context.current_utc_datetime + timedelta(hours=2))
    answer = context.wait_for_external_event("Approval")
    winner = yield context.task_any([answer, deadline])
    if winner != answer:
        return "timed out"
    deadline.cancel()
    return (yield context.call_activity("process", answer.result))


def rewound_with_renamed_retry(context: DurableOrchestrationContext) -> Orchestration:
    greeting = yield context.call_activity("hello", "Oslo")
    checked = yield context.call_activity("reliable", greeting)  # was "flaky"
    return (yield context.call_activity("hello", checked))


def failing_now_handled(context: DurableOrchestrationContext) -> Orchestration:
    """Catches the failure the recorded execution died of: it now completes where it failed."""
    yield context.call_activity("hello", "Paris")
    try:
        yield context.call_activity("broken", None)
    except df.TaskFailedError:
        return "recovered"
    return "unreachable"


def failing_now_waits(context: DurableOrchestrationContext) -> Orchestration:
    """Waits for a retry signal where the recorded execution failed: it no longer ends there."""
    yield context.call_activity("hello", "Paris")
    try:
        yield context.call_activity("broken", None)
    except df.TaskFailedError:
        yield context.wait_for_external_event("retry")
    return "unreachable"


def transfer_without_lock(context: DurableOrchestrationContext) -> Orchestration:
    source, target = EntityId("account", "a"), EntityId("account", "b")
    a = yield context.call_entity(source, "get")  # no critical section any more
    b = yield context.call_entity(target, "get")
    yield context.call_entity(source, "set", a - 10)
    yield context.call_entity(target, "set", b + 10)
    context.signal_entity(target, "audit", "transfer done")
    return "ok"


def transfer_without_audit(context: DurableOrchestrationContext) -> Orchestration:
    source, target = EntityId("account", "a"), EntityId("account", "b")
    with (yield context.lock([source, target])):
        a = yield context.call_entity(source, "get")
        b = yield context.call_entity(target, "get")
        yield context.call_entity(source, "set", a - 10)
        yield context.call_entity(target, "set", b + 10)
    return "ok"  # the audit signal, sent in the same step as the return, was dropped


def parent_with_renamed_child(context: DurableOrchestrationContext) -> Orchestration:
    greeting = yield context.call_sub_orchestrator("kid", "Lima", f"{context.instance_id}-child")  # was "child"
    return (yield context.call_activity("hello", greeting))


def child_with_timer(context: DurableOrchestrationContext) -> Orchestration:
    yield context.create_timer(context.current_utc_datetime + timedelta(seconds=1))  # new, first
    return (yield context.call_activity("hello", context.get_input()))


def guarded_changed_after_the_wait(context: DurableOrchestrationContext) -> Orchestration:
    """Changed only past the point where the recorded execution was terminated: replay succeeds."""
    with (yield context.lock([EntityId("account", "c")])):
        go = yield context.wait_for_external_event("go")
        yield context.call_entity(EntityId("account", "c"), "reset")
    return (yield context.call_activity("hello", go))
