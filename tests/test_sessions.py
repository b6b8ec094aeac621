"""Extended sessions (protocol I7): a step that continues the live execution its predecessor left
commits exactly what a full replay of the same history would, and a worker runs the code of a
cached orchestration once, not once per step."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

import durable as df
from durable.core import _protocol as protocol
from durable.core._history import EventType, HistoryEvent, InstanceHistory
from durable.core._messages import MessageTarget, WorkMessage

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


# -- programs ---------------------------------------------------------------------------------------
def sequence(context):  # type: ignore[no-untyped-def]
    value = context.get_input()
    for step in range(4):
        context.set_custom_status({"step": step, "at": context.current_utc_datetime.isoformat()})
        value = yield context.call_activity("double", value)
    return [value, context.new_uuid(), context.instance_id]


def fan_out_fan_in(context):  # type: ignore[no-untyped-def]
    results = yield context.task_all([context.call_activity("double", i) for i in range(20)])
    more = yield context.task_all([context.call_activity("double", r) for r in results[:5]])
    return sum(results) + sum(more)


def race(context):  # type: ignore[no-untyped-def]
    deadline = context.current_utc_datetime + timedelta(seconds=30)
    timer = context.create_timer(deadline)
    approval = context.wait_for_external_event("approve")
    winner = yield context.task_any([timer, approval])
    if winner is approval:
        timer.cancel()
    second = context.create_timer(context.current_utc_datetime + timedelta(seconds=5))
    yield second
    try:
        yield context.call_activity("fails", None)
    except df.TaskFailedError as exc:
        context.set_custom_status(str(exc)[:20])
    return winner is approval, approval.result


ACTIVITIES: dict[str, Callable[[Any], Any]] = {"double": lambda x: 2 * x, "fails": lambda _: 1 / 0}


# -- a driver that runs a program through the protocol, as a worker would ---------------------------
@dataclass
class Script:
    orchestrator: Callable[..., Any]
    input: Any
    per_step: int = 1_000  # answers delivered per step (a fan-in then takes several)
    events: dict[int, list[HistoryEvent]] = field(default_factory=dict)  # by step number


@dataclass
class Counting:
    """Resolves the program, counting how often its code is entered (a replay enters it anew)."""

    orchestrator: Callable[..., Any]
    entered: int = 0

    def __call__(self, name: str) -> Callable[..., Any]:
        def counted(context):  # type: ignore[no-untyped-def]
            self.entered += 1
            return self.orchestrator(context)

        return counted


def _answers(messages: list[WorkMessage], now: datetime) -> Iterator[WorkMessage]:
    for message in messages:
        if message.target is MessageTarget.ACTIVITY:
            event = message.event
            try:
                result, failure = json.dumps(ACTIVITIES[event.name or ""](json.loads(event.input or "null"))), None
            except Exception as exc:
                result, failure = None, df.FailureDetails.from_exception(exc)
            completion = protocol.activity_completion(message, result, failure, now)
            yield protocol.completion_message(message, completion)
        else:  # a timer: due at its fire time
            yield message


def _comparable(commit: protocol.Commit) -> tuple[Any, ...]:
    record = commit.record
    return (
        [e.to_dict() for e in commit.history.events],
        commit.keep,
        [m.to_dict() for m in commit.messages],
        commit.status,
        None if record is None else (record.runtime_status, record.output, record.custom_status, record.checkpoint),
    )


def run_both_ways(script: Script) -> tuple[Counting, Counting, int]:
    """Each step computed twice from the same committed history: continuing the session, and
    replaying a fresh reading of the history. Returns the two resolvers and the step count."""
    continuing, replaying = Counting(script.orchestrator), Counting(script.orchestrator)
    now = T0
    started = HistoryEvent(EventType.EXECUTION_STARTED, now, name="program", input=json.dumps(script.input),
                           instance_id="i", execution_id="e1")  # fmt: skip
    inbox = [WorkMessage(MessageTarget.ORCHESTRATION, "i", started, id="start")]
    view = protocol.read_orchestration(InstanceHistory("i"))
    steps = 0
    while True:
        due = [m for m in inbox if m.visible_at is None or m.visible_at <= now][: script.per_step]
        if not due and not script.events.get(steps):
            now = min(m.visible_at for m in inbox if m.visible_at is not None)  # the next timer
            continue
        inbox = [m for m in inbox if m not in due]
        due += [WorkMessage(MessageTarget.ORCHESTRATION, "i", e, id=f"event-{steps}-{n}")
                for n, e in enumerate(script.events.get(steps, []))]  # fmt: skip
        fresh = protocol.read_orchestration(InstanceHistory(**vars(view.history)))
        replayed = protocol.step_orchestration(fresh, protocol.plan_orchestration(fresh, due, now), replaying, now)
        commit = protocol.step_orchestration(view, protocol.plan_orchestration(view, due, now), continuing, now)
        assert _comparable(commit) == _comparable(replayed), f"step {steps} differs"
        steps += 1
        commit.history.etag = f"etag-{steps}"
        assert commit.view is not None
        view = commit.view
        if commit.status.is_terminal:
            return continuing, replaying, steps
        inbox += list(_answers(commit.messages, now))
        now += timedelta(seconds=1)


@pytest.mark.parametrize(
    "script",
    [
        Script(sequence, 1),
        Script(fan_out_fan_in, None, per_step=7),
        Script(race, None, events={1: [HistoryEvent(EventType.EVENT_RAISED, T0, name="approve", input='"yes"')]}),
        Script(race, None),  # the timer wins
        Script(
            sequence,
            3,
            events={
                1: [HistoryEvent(EventType.EXECUTION_SUSPENDED, T0, input='"hold"')],
                2: [HistoryEvent(EventType.EXECUTION_RESUMED, T0, input='"go"')],
            },
        ),
    ],
    ids=["sequence", "fan-in-in-chunks", "event-wins", "timer-wins", "suspended-and-resumed"],
)
def test_a_step_continuing_its_session_commits_what_a_replay_commits(script: Script) -> None:
    continuing, replaying, steps = run_both_ways(script)
    assert steps >= 4
    assert replaying.entered == steps  # the replaying side ran the code anew each step...
    assert continuing.entered == 1  # ...the continuing side once


def test_a_session_is_used_once_and_only_for_the_history_it_came_from() -> None:
    continuing = Counting(sequence)
    started = HistoryEvent(EventType.EXECUTION_STARTED, T0, name="program", input="1", instance_id="i",
                           execution_id="e1")  # fmt: skip
    start = WorkMessage(MessageTarget.ORCHESTRATION, "i", started, id="start")
    view = protocol.read_orchestration(InstanceHistory("i"))
    first = protocol.step_orchestration(view, protocol.plan_orchestration(view, [start], T0), continuing, T0)
    assert first.view is not None and first.view.session is not None
    first.history.etag = "etag-1"
    answer = next(_answers(first.messages, T0))
    # A step computed from the view (whose commit then lost a race, say) takes its session along...
    protocol.step_orchestration(first.view, protocol.plan_orchestration(first.view, [answer], T0), continuing, T0)
    assert first.view.session is None
    # ...so the step that follows a reload replays, and commits the same.
    reloaded = protocol.read_orchestration(first.history)
    again = protocol.step_orchestration(reloaded, protocol.plan_orchestration(reloaded, [answer], T0), continuing, T0)
    assert continuing.entered == 2
    assert again.status is df.OrchestrationRuntimeStatus.Running
    # A session never continues a history other than the one it applied.
    assert again.view is not None and again.view.session is not None
    assert not again.view.session.continues(first.history.events)
    assert again.view.session.continues(again.history.events)


async def test_a_worker_runs_a_cached_orchestrations_code_once_and_a_new_worker_replays_it(app, runtime) -> None:
    entered: list[bool] = []

    @app.orchestration_trigger(context_name="context")
    def approvals(context):  # type: ignore[no-untyped-def]
        entered.append(context.is_replaying)
        first = yield context.wait_for_external_event("one")
        second = yield context.call_activity("shout", first)
        third = yield context.wait_for_external_event("two")
        return [second, third]

    @app.activity_trigger(input_name="text")
    def shout(text: str) -> str:
        return text.upper()

    client = runtime.client()
    iid = await client.start_new("approvals")
    await runtime.worker.run_until_idle()
    await client.raise_event(iid, "one", "hi")
    await runtime.worker.run_until_idle()
    assert entered == [False]  # three steps so far (start, event, activity result): one run of the code

    restarted = df.DurableRuntime(app, runtime.backend, clock=runtime.clock, options=runtime.worker.options)
    await client.raise_event(iid, "two", "there")
    await restarted.worker.run_until_idle()
    assert entered == [False, True]  # the new worker replayed the history once, then went on live
    assert (await client.get_status(iid)).output == ["HI", "there"]
