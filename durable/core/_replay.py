"""The step function: replay an orchestrator over its history, then apply new events.

``execute_step(history, new_events)`` is pure apart from running user code: it returns the events
to append (or, after continue-as-new, the new execution's history) and the resulting status.
Replay is linear in history length: every event is dispatched once, tasks are found by id.
"""

from __future__ import annotations

import inspect
import logging
import uuid
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from . import _serialization as serialization
from ._context import _NOT_SET, DurableOrchestrationContext, EntityCallTask
from ._errors import FunctionNotFound, NonDeterminismError, OrchestrationApiMisuse, TaskFailedError
from ._history import (
    ACTION_EVENT_TYPES,
    COMPLETION_EVENT_TYPES,
    EventType,
    FailureDetails,
    HistoryEvent,
    started_event,
)
from ._status import OrchestrationRuntimeStatus
from ._task import TaskBase, TimerTask

log = logging.getLogger("durable.replay")

Orchestrator = Callable[[DurableOrchestrationContext], Any]

# A continue-as-new loop that never waits for anything would never commit; stop it.
MAX_CONTINUATIONS_PER_STEP = 100

# Events that may reach a suspended orchestration without being held back.
_CONTROL_EVENTS = frozenset(
    {EventType.EXECUTION_SUSPENDED, EventType.EXECUTION_RESUMED, EventType.EXECUTION_TERMINATED}
)


@dataclass
class StepResult:
    keep: int  # stored events kept before ``events`` (0 when a new execution replaced the history)
    events: list[HistoryEvent]
    execution_id: str
    started: HistoryEvent  # the ExecutionStarted of the (new) current execution
    status: OrchestrationRuntimeStatus
    output: str | None = None
    failure: FailureDetails | None = None
    custom_status: str | None = None
    continued_as_new: bool = False
    # New events no execution took: completions that reached an execution after it continued as
    # new in this very step (the caller releases lock grants among them).
    unconsumed: list[HistoryEvent] = field(default_factory=list)
    # Executions this step ran and continued as new from, oldest first (none were committed).
    continued_from: list[str] = field(default_factory=list)
    # The execution, live, as replaying the step's history and events would leave it (None when
    # the step ended it): the next step of that history continues it instead of replaying.
    session: ReplaySession | None = None


@dataclass
class _Outcome:
    status: OrchestrationRuntimeStatus
    output: str | None = None
    failure: FailureDetails | None = None


@dataclass
class _Execution:
    """Replay state of one execution of one orchestration."""

    orchestrator: Orchestrator | None
    context: DurableOrchestrationContext | None = None
    generator: Generator[Any, Any, Any] | None = None
    awaited: TaskBase | None = None
    outcome: _Outcome | None = None
    suspended: bool = False
    held_back: list[HistoryEvent] = field(default_factory=list)  # events that arrived while suspended
    started: HistoryEvent | None = None
    replaying: bool = False
    diverged: bool = False  # replay met a NonDeterminismError
    step_time: datetime | None = None
    recorded_custom_status: str | None = None  # the latest one history holds
    seen: list[HistoryEvent] = field(default_factory=list)  # events applied so far (context.histories)

    # -- continuing without replay ------------------------------------------------------------
    def continues(self, history: Sequence[HistoryEvent]) -> bool:
        """Whether this live execution is where replaying ``history`` would leave it: it applied
        exactly those events (the step that committed them produced it) and still runs. (User
        code that changed ``context.histories`` only costs the session: the step replays.)"""
        return (
            self.generator is not None
            and self.outcome is None
            and len(self.seen) == len(history)
            and (not history or self.seen[-1] == history[-1])
        )

    def settle(self, actions: Sequence[HistoryEvent], completed: HistoryEvent) -> None:
        """Bring a live execution to where replaying its step's own output would: its new actions
        are history now (replay would match them to the code's pending actions one by one), and
        the step's OrchestratorCompleted records the custom status."""
        ctx = self._ctx()
        self.seen.extend(actions)
        ctx._pending_actions.clear()
        self.apply(completed)

    # -- event dispatch ------------------------------------------------------------------------
    def apply(self, event: HistoryEvent) -> None:
        self.seen.append(event)
        self._dispatch(event)

    def _dispatch(self, event: HistoryEvent) -> None:
        """Handle an event: now, or once resumed when it is a delivery to a suspended execution
        (it is in ``seen`` once, from when it was applied)."""
        if self.outcome is not None and self.outcome.status.is_terminal:
            return  # nothing happens to a finished execution
        if self.suspended and event.event_type not in _CONTROL_EVENTS and _is_delivery(event):
            self.held_back.append(event)
            return
        handler = _HANDLERS.get(event.event_type)
        if handler is not None:
            handler(self, event)

    def _on_orchestrator_started(self, event: HistoryEvent) -> None:
        self.step_time = event.timestamp
        if self.context is not None:
            self.context._current_utc_datetime = event.timestamp

    def _on_orchestrator_completed(self, event: HistoryEvent) -> None:
        if event.custom_status is not None:
            self.recorded_custom_status = event.custom_status
        ctx = self.context
        if ctx is not None and ctx._is_replaying and ctx._pending_actions:
            action = next(iter(ctx._pending_actions.values()))
            raise NonDeterminismError(
                f"the orchestrator code took the new action {_describe(action)}, "
                f"which the history does not have at that point"
            )

    def _on_execution_started(self, event: HistoryEvent) -> None:
        self.started = event
        ctx = DurableOrchestrationContext(
            instance_id=event.instance_id or "",
            execution_id=event.execution_id or "",
            name=event.name or "",
            input_json=event.input,
            parent_instance_id=event.parent_instance_id,
            start_time=self.step_time or event.timestamp,
            version=event.version,
            histories=self.seen,
        )
        ctx._is_replaying = self.replaying
        self.context = ctx
        if self.orchestrator is None:
            raise FunctionNotFound(f"no orchestrator function named '{event.name}' is registered")
        try:
            returned = self.orchestrator(ctx)
        except Exception as exc:
            self._fail(exc)
            return
        if inspect.isgenerator(returned):
            self.generator = returned
            self._advance(None, None, first=True)
        else:
            self._complete(returned)

    def _on_action(self, event: HistoryEvent) -> None:
        ctx = self._ctx()
        if event.execution_id is not None and event.execution_id != ctx._execution_id:
            return  # a message carried over from the previous execution (continue-as-new)
        expected = ctx._pending_actions.pop(event.event_id, None)
        if expected is None:
            raise NonDeterminismError(
                f"history event {_describe(event)} has no matching action: "
                f"the orchestrator code did not take it on replay"
            )
        if _shape(expected) != _shape(event):
            raise NonDeterminismError(
                f"history event {_describe(event)} does not match the orchestrator code's "
                f"new action {_describe(expected)}"
            )

    def _on_completed(self, event: HistoryEvent) -> None:
        task = self._ctx()._open_tasks.pop(_action_id(event), None)
        if task is None:
            return  # completion of an action this execution never took (filtered upstream)
        try:
            value = serialization.decode(event.result)
        except serialization.PayloadError as exc:
            task._set_exception(exc)
        else:
            task._set_result(value)
        self._resume()

    def _on_failed(self, event: HistoryEvent) -> None:
        ctx = self._ctx()
        task = ctx._open_tasks.pop(_action_id(event), None)
        if task is None:
            return
        failure = event.failure or FailureDetails("Exception", event.result or "unknown failure")
        if event.event_type is EventType.SUB_ORCHESTRATION_FAILED:
            kind = "sub-orchestration"
        elif isinstance(task, EntityCallTask):
            kind = "entity operation"
        else:
            kind = "activity"
        name = event.name or "?"
        task._set_exception(
            TaskFailedError(f"{kind} '{name}' failed: {failure.error_type}: {failure.message}", failure)
        )
        self._resume()

    def _on_timer_fired(self, event: HistoryEvent) -> None:
        task = self._ctx()._open_tasks.pop(_action_id(event), None)
        if task is None or (isinstance(task, TimerTask) and task.is_cancelled):
            return
        task._set_result(None)
        self._resume()

    def _on_event_raised(self, event: HistoryEvent) -> None:
        self._ctx()._deliver_event(event)
        self._resume()

    def _on_suspended(self, event: HistoryEvent) -> None:
        self.suspended = True

    def _on_resumed(self, event: HistoryEvent) -> None:
        self.suspended = False
        held, self.held_back = self.held_back, []
        for index, held_event in enumerate(held):
            if _continued_as_new(self):  # the rest belongs to the next execution
                self.held_back = held[index:]
                return
            self._dispatch(held_event)

    def _on_terminated(self, event: HistoryEvent) -> None:
        self.outcome = _Outcome(OrchestrationRuntimeStatus.Terminated, output=event.input)
        self.generator = None

    # -- driving the generator -----------------------------------------------------------------
    def _ctx(self) -> DurableOrchestrationContext:
        if self.context is None:
            raise NonDeterminismError("history has events before its ExecutionStarted event")
        return self.context

    def _resume(self) -> None:
        while self.generator is not None and self.awaited is not None and self.awaited.is_completed:
            task = self.awaited
            self._advance(task.result, task.exception)

    def _advance(self, value: Any, error: BaseException | None, first: bool = False) -> None:
        assert self.generator is not None
        try:
            if first:
                yielded = next(self.generator)
            elif error is not None:
                yielded = self.generator.throw(error)
            else:
                yielded = self.generator.send(value)
        except StopIteration as stop:
            self._complete(stop.value)
            return
        except Exception as exc:
            self._fail(exc)
            return
        if not isinstance(yielded, TaskBase):
            self._fail(
                OrchestrationApiMisuse(
                    f"orchestrator yielded {type(yielded).__name__}; yield tasks from the context "
                    f"(call_activity, create_timer, task_all, ...)"
                )
            )
            return
        self.awaited = yielded
        self._resume()

    def _complete(self, value: Any) -> None:
        self.generator = None
        try:
            output = serialization.encode(value)
        except serialization.PayloadError as exc:
            self._fail(exc)
            return
        self.outcome = _Outcome(OrchestrationRuntimeStatus.Completed, output=output)

    def _fail(self, exc: BaseException) -> None:
        self.generator = None
        self.outcome = _Outcome(OrchestrationRuntimeStatus.Failed, failure=FailureDetails.from_exception(exc))


# What a step hands the next one of the same history (``StepResult.session``): opaque to callers.
ReplaySession = _Execution

_HANDLERS: dict[EventType, Callable[[_Execution, HistoryEvent], None]] = {
    EventType.ORCHESTRATOR_STARTED: _Execution._on_orchestrator_started,
    EventType.ORCHESTRATOR_COMPLETED: _Execution._on_orchestrator_completed,
    EventType.EXECUTION_STARTED: _Execution._on_execution_started,
    EventType.TASK_COMPLETED: _Execution._on_completed,
    EventType.SUB_ORCHESTRATION_COMPLETED: _Execution._on_completed,
    EventType.TASK_FAILED: _Execution._on_failed,
    EventType.SUB_ORCHESTRATION_FAILED: _Execution._on_failed,
    EventType.TIMER_FIRED: _Execution._on_timer_fired,
    EventType.EVENT_RAISED: _Execution._on_event_raised,
    EventType.EXECUTION_SUSPENDED: _Execution._on_suspended,
    EventType.EXECUTION_RESUMED: _Execution._on_resumed,
    EventType.EXECUTION_TERMINATED: _Execution._on_terminated,
    **{t: _Execution._on_action for t in ACTION_EVENT_TYPES},
}


def _action_id(event: HistoryEvent) -> int:
    linked = event.completed_task_id
    return -1 if linked is None else linked


def _is_delivery(event: HistoryEvent) -> bool:
    """Events that complete tasks or deliver data: held back while the instance is suspended."""
    return event.event_type in COMPLETION_EVENT_TYPES or event.event_type is EventType.EVENT_RAISED


def _shape(action: HistoryEvent) -> tuple[EventType, str | None, str | None, bool]:
    """What replay compares of an action: its kind, name, target (sub-orchestration or entity)
    and, for a message to an entity, whether it waits for a reply (call) or not (signal)."""
    target = action.instance_id if action.event_type in _TARGETED else None
    # Our own JSON has this key only when the request expects a reply (user input is nested text).
    waits = action.event_type is EventType.EVENT_SENT and '"reply_to"' in (action.input or "")
    return action.event_type, action.name, target, waits


_TARGETED = frozenset({EventType.EVENT_SENT, EventType.SUB_ORCHESTRATION_CREATED})


def _describe(event: HistoryEvent) -> str:
    label = f"{event.event_type.value}"
    if event.name:
        label += f" '{event.name}'"
    if event.event_type in _TARGETED and event.instance_id:
        label += f" to {event.instance_id}"
    if event.event_type is EventType.TIMER_CREATED and event.fire_at:
        label += f" (fire at {event.fire_at.isoformat()})"
    return f"{label} #{event.event_id}"


def new_execution_id() -> str:
    return uuid.uuid4().hex


def execute_step(
    resolve: Callable[[str], Orchestrator | None],
    history: Sequence[HistoryEvent],
    new_events: Sequence[HistoryEvent],
    now: datetime,
    session: ReplaySession | None = None,
) -> StepResult:
    """Advance an orchestration by one step.

    ``history`` is the current execution's committed history (empty for a new instance, whose
    ``new_events`` then start with ExecutionStarted); ``resolve`` maps orchestrator names to code.
    ``session`` is the live execution the step that committed ``history`` returned: the step
    continues it instead of replaying ``history`` (it is changed: use it once). One that does not
    continue ``history`` exactly is ignored.
    """
    keep = len(history)
    unconsumed: list[HistoryEvent] = []
    continued_from: list[str] = []
    for _ in range(MAX_CONTINUATIONS_PER_STEP):
        result = _run_once(resolve, history, new_events, now, keep, session)
        session = None  # a continue-as-new goes on with a new execution, replayed from its start
        unconsumed += result.unconsumed
        result.unconsumed, result.continued_from = unconsumed, list(continued_from)
        if not result.continued_as_new:
            return result
        continued_from.append(_execution_of(history, new_events))
        # Start the next execution right away, in the same step, as DTFx does.
        history, new_events, keep = [], result.events, 0
    # A loop that never waits would never commit: fail the execution it was about to start.
    failure = FailureDetails.from_exception(
        OrchestrationApiMisuse(
            f"orchestration continued as new {MAX_CONTINUATIONS_PER_STEP} times in one step without waiting "
            f"for anything; an eternal orchestration must await a timer, an event or an activity"
        )
    )
    ended = [
        HistoryEvent(EventType.ORCHESTRATOR_STARTED, now),
        HistoryEvent(EventType.ORCHESTRATOR_COMPLETED, now),
        HistoryEvent(EventType.EXECUTION_COMPLETED, now, failure=failure,
                     runtime_status=OrchestrationRuntimeStatus.Failed.value),
    ]  # fmt: skip
    return StepResult(
        keep=0,
        events=[*result.events, *ended],
        execution_id=result.execution_id,
        started=result.started,
        status=OrchestrationRuntimeStatus.Failed,
        failure=failure,
        unconsumed=unconsumed,
        continued_from=continued_from,
    )


def _execution_of(history: Sequence[HistoryEvent], new_events: Sequence[HistoryEvent]) -> str:
    started = started_event([*history[:2], *new_events])
    return (started.execution_id or "") if started is not None else ""


def _name_of_started(history: Sequence[HistoryEvent], new_events: Sequence[HistoryEvent]) -> str | None:
    started = started_event([*history[:2], *new_events])
    return started.name if started is not None else None


def _run_once(
    resolve: Callable[[str], Orchestrator | None],
    history: Sequence[HistoryEvent],
    new_events: Sequence[HistoryEvent],
    now: datetime,
    keep: int,
    session: ReplaySession | None,
) -> StepResult:
    replay = session is None or not session.continues(history)
    if replay:
        name = _name_of_started(history, new_events)
        execution = _Execution(orchestrator=resolve(name) if name else None)
    else:
        assert session is not None
        execution = session
    appended: list[HistoryEvent] = [HistoryEvent(EventType.ORCHESTRATOR_STARTED, now)]
    leftover: list[HistoryEvent] = []  # events that arrive after the code continued as new
    try:
        if replay:
            _replay(execution, history)
        execution.apply(appended[0])
        for index, event in enumerate(new_events):
            if _continued_as_new(execution):
                leftover = list(new_events[index:])
                break
            appended.append(event)
            execution.apply(event)
    except (NonDeterminismError, FunctionNotFound) as exc:
        execution.outcome = _Outcome(OrchestrationRuntimeStatus.Failed, failure=FailureDetails.from_exception(exc))
        execution.generator = None
        execution.diverged = True

    ctx = execution.context
    if execution.started is None or ctx is None:
        raise ValueError("cannot run a step for an instance that has not started")
    outcome = execution.outcome
    continuing = ctx._continue_as_new_input is not _NOT_SET and (
        outcome is None or outcome.status is OrchestrationRuntimeStatus.Completed
    )
    if execution.diverged:
        ctx._pending_actions.clear()  # the code's actions cannot be trusted
    elif outcome is not None and outcome.status is OrchestrationRuntimeStatus.Terminated:
        ctx._pending_actions.clear()  # terminated code takes no more actions...
    if not execution.diverged and (continuing or (outcome is not None and outcome.status.is_terminal)):
        ctx._release_locks()  # ...but an ending execution always leaves its critical section
        ctx._retire_as_sender()
    actions = list(ctx._pending_actions.values())
    appended.extend(actions)
    custom_status = _encode_custom_status(ctx)
    # Recorded in history (when changed) so the Instances row can always be rebuilt from it.
    recorded = execution.recorded_custom_status
    changed = None
    if custom_status != (None if recorded == "null" else recorded):
        changed = "null" if custom_status is None else custom_status  # "null": cleared
    step_completed = HistoryEvent(EventType.ORCHESTRATOR_COMPLETED, now, custom_status=changed)
    appended.append(step_completed)
    started = execution.started
    execution_id = started.execution_id or ""

    if continuing:
        try:
            next_input = serialization.encode(ctx._continue_as_new_input)
        except serialization.PayloadError as exc:
            outcome = _Outcome(OrchestrationRuntimeStatus.Failed, failure=FailureDetails.from_exception(exc))
        else:
            # The start message's id stays: a re-sent copy of it must still be seen as a duplicate.
            next_started = started.replace(timestamp=now, input=next_input, execution_id=new_execution_id())
            # Events not consumed yet, held back while suspended, or that arrived after the code
            # continued as new belong to the next execution (a terminate ends it); answers to
            # this execution's tasks are stale (the caller releases lock grants among them).
            pending = execution.held_back + leftover
            carried = [e.replace(timestamp=now) for e in ctx._unconsumed_events()]
            carried += [e for e in pending if e.event_type in _CARRIED_OVER]
            unconsumed = [e for e in pending if e.event_type not in _CARRIED_OVER]
            # The last step's actions still go out, as DTFx sends them (timers aside: nothing
            # would wait for them). They move into the new history marked with the old execution
            # id, which replay skips and completions for which are dropped as stale.
            sends = [
                e.replace(execution_id=execution_id)
                for e in ctx._pending_actions.values()
                if e.event_type is not EventType.TIMER_CREATED
            ]
            # ...and so do those carried into this execution, when it too ends in the same step.
            sends = [e for e in new_events if e.event_type in ACTION_EVENT_TYPES and e.execution_id] + sends
            return StepResult(
                keep=0,
                events=[next_started, *carried, *sends],
                execution_id=next_started.execution_id or "",
                started=next_started,
                status=OrchestrationRuntimeStatus.Running,
                custom_status=custom_status,
                continued_as_new=True,
                unconsumed=unconsumed,
            )
    if outcome is None:
        status = OrchestrationRuntimeStatus.Suspended if execution.suspended else OrchestrationRuntimeStatus.Running
        execution.settle(actions, step_completed)
        return StepResult(keep, appended, execution_id, started, status, custom_status=custom_status, session=execution)
    appended.append(
        HistoryEvent(
            EventType.EXECUTION_COMPLETED,
            now,
            result=outcome.output,
            failure=outcome.failure,
            runtime_status=outcome.status.value,
        )
    )
    return StepResult(
        keep,
        appended,
        execution_id,
        started,
        outcome.status,
        output=outcome.output,
        failure=outcome.failure,
        custom_status=custom_status,
    )


_CARRIED_OVER = frozenset(
    {EventType.EVENT_RAISED, EventType.EXECUTION_TERMINATED, EventType.EXECUTION_SUSPENDED, EventType.EXECUTION_RESUMED}
)


def _continued_as_new(execution: _Execution) -> bool:
    ctx, outcome = execution.context, execution.outcome
    return (
        ctx is not None
        and outcome is not None
        and outcome.status is OrchestrationRuntimeStatus.Completed
        and ctx._continue_as_new_input is not _NOT_SET
    )


def _replay(execution: _Execution, history: Sequence[HistoryEvent]) -> None:
    execution.replaying = True
    for event in history:
        execution.apply(event)
    execution.replaying = False
    if execution.context is not None:
        execution.context._is_replaying = False


def _encode_custom_status(ctx: DurableOrchestrationContext) -> str | None:
    try:
        return serialization.encode(ctx._custom_status)
    except serialization.PayloadError:
        log.warning("custom status of %s is not JSON serializable; ignored", ctx.instance_id)
        return None
