"""Check orchestrator code against recorded histories before deploying it.

An orchestration that is running (or may be rewound, or is still being looked at) replays its
history every time it wakes up, so a change to its orchestrator code is only safe when the new code
takes the same actions, in the same order, as the history records. ``Replayer`` runs the current
code against stored histories, the way the runtime would, and reports where they part ways::

    replayer = df.Replayer(app)  # a DFApp / Blueprint, or {"name": orchestrator_function}
    result = replayer.replay_history(df.ReplayHistory.from_json(path.read_text()))
    if not result.ok:
        print(result.message)  # names the history event and the new action that disagree

Histories come from a task hub (``await ReplayHistory.load(backend, instance_id)``, or
``durable history ID --json`` on the command line) or from files. ``durable replay`` runs the
check from the command line.

History file format
-------------------
A JSON object with three members::

    {
      "instanceId": "order-42",
      "name": "process_order",
      "events": [
        {"EventType": "OrchestratorStarted", "Timestamp": "2026-01-01T00:00:00+00:00"},
        {"EventType": "ExecutionStarted", "Timestamp": "...", "Name": "process_order", "Input": "..."},
        ...
      ]
    }

``instanceId`` and ``name`` are the instance and its orchestrator (when left out they are taken
from the ExecutionStarted event); ``events`` is the history of the instance's current execution
(after ``continue_as_new`` only the latest one is stored), oldest first, each event in the form
``HistoryEvent.to_dict()`` writes: DTFx property names (``EventType``, ``Timestamp``, ``EventId``,
``Name``, ``Input``, ``Result``, ``TaskScheduledId``, ``FailureDetails``, ...), payloads as JSON text,
times in ISO 8601, unset properties left out. Other members are ignored.

What counts as a divergence
---------------------------
Replay drives the code through the history with ``execute_step``, as a worker does when the
instance wakes up. The code diverges when

- an action it takes (activity, sub-orchestration, timer, entity message) is not the one the
  history records at that point, or the history records an action the code does not take;
- it ends (completes, fails, continues as new) where the history goes on, or keeps running where
  the history ended, or ends differently (Completed where the history says Failed, ...);
- its orchestrator function is no longer registered.

Inputs, outputs and custom status are not compared: only the code's actions and how it ends. A
history that ended Failed replays successfully when the code fails at the same point again.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..core._errors import DurableError, FunctionNotFound, NonDeterminismError
from ..core._history import ACTION_EVENT_TYPES, EventType, FailureDetails, HistoryEvent
from ..core._replay import StepResult, execute_step
from ..core._status import OrchestrationRuntimeStatus
from ._registry import FunctionRegistry
from ._runtime import DurableApp

# Failures of a replay step that mean the code no longer matches its history.
DIVERGENCE_ERRORS = frozenset({NonDeterminismError.__name__, FunctionNotFound.__name__})

Orchestrator = Callable[..., Any]
Functions = DurableApp | FunctionRegistry | Mapping[str, Orchestrator]


class _StoredHistory(Protocol):
    @property
    def events(self) -> Sequence[HistoryEvent]: ...


class HistoryStore(Protocol):
    """What ``ReplayHistory.load`` needs of a backend."""

    async def load_history(self, instance_id: str) -> _StoredHistory: ...


@dataclass
class ReplayHistory:
    """The history of one orchestration instance's current execution, to replay code against."""

    instance_id: str
    name: str
    events: list[HistoryEvent]

    def __post_init__(self) -> None:
        started = _started(self.events)
        if started is None:
            raise ValueError(f"the history of {self.instance_id!r} has no ExecutionStarted event")
        if started[1].name != self.name:
            raise ValueError(
                f"the history of {self.instance_id!r} is of orchestrator {started[1].name!r}, not {self.name!r}"
            )

    @classmethod
    def from_events(
        cls, events: Iterable[HistoryEvent], instance_id: str | None = None, name: str | None = None
    ) -> ReplayHistory:
        """A history from its events; the instance id and name default to its ExecutionStarted's."""
        listed = list(events)
        started = _started(listed)
        if started is None:
            raise ValueError("a history needs an ExecutionStarted event")
        event = started[1]
        return cls(instance_id or event.instance_id or "", name or event.name or "", listed)

    @classmethod
    def from_json(cls, data: str | bytes | Mapping[str, Any]) -> ReplayHistory:
        """Parse the format in this module's docstring (text, or the already-decoded object)."""
        if isinstance(data, str | bytes):
            try:
                data = json.loads(data)
            except ValueError as exc:
                raise ValueError(f"not a JSON history: {exc}") from exc
        if not isinstance(data, Mapping) or not isinstance(data.get("events"), list):
            raise ValueError('a history is a JSON object with an "events" list')
        try:
            events = [HistoryEvent.from_dict(item) for item in data["events"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed history event: {exc!r}") from exc
        return cls.from_events(events, data.get("instanceId"), data.get("name"))

    def to_dict(self) -> dict[str, Any]:
        return {"instanceId": self.instance_id, "name": self.name, "events": [e.to_dict() for e in self.events]}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    @classmethod
    async def load(cls, backend: HistoryStore, instance_id: str) -> ReplayHistory:
        """The stored history of an orchestration instance. Raises ``LookupError`` when the task
        hub has no history for it, ``ValueError`` when it is not an orchestration (an entity)."""
        stored = await backend.load_history(instance_id)
        if not stored.events:
            raise LookupError(f"no instance with id {instance_id!r}")
        if _started(stored.events) is None:
            raise ValueError(f"{instance_id!r} is not an orchestration instance")
        return cls.from_events(stored.events, instance_id=instance_id)

    @property
    def recorded_status(self) -> OrchestrationRuntimeStatus:
        """How the history leaves the execution: ended (Completed, Failed, ...) or still running."""
        ended = _ended(self.events)
        if ended is not None:
            return OrchestrationRuntimeStatus(ended[1].runtime_status or "Failed")
        suspended = False
        for event in self.events:
            if event.event_type is EventType.EXECUTION_SUSPENDED:
                suspended = True
            elif event.event_type is EventType.EXECUTION_RESUMED:
                suspended = False
        return OrchestrationRuntimeStatus.Suspended if suspended else OrchestrationRuntimeStatus.Running


@dataclass(frozen=True)
class ReplayResult:
    """The verdict on one history: does the current code still replay it?"""

    instance_id: str
    name: str
    ok: bool
    # Why not ok: error type NonDeterminismError (the code diverged) or FunctionNotFound (no such
    # orchestrator), or that of an error that stopped replay; None when ok.
    error: FailureDetails | None = None
    # Where the code and the history part ways, when known: an index into the history's events.
    event_index: int | None = None
    event: HistoryEvent | None = None
    recorded_status: OrchestrationRuntimeStatus | None = None  # as the history leaves the execution
    replayed_status: OrchestrationRuntimeStatus | None = None  # as the current code leaves it
    events: int = field(default=0, compare=False)  # length of the history

    @property
    def message(self) -> str:
        """One line: what was replayed and how it went."""
        subject = f"{self.name} ({self.instance_id})"
        if self.ok:
            return f"{subject}: replayed {self.events} events, {_status_text(self.replayed_status)}"
        where = ""
        if self.event_index is not None and self.event is not None:
            where = f" at history event {self.event_index} ({describe_event(self.event)})"
        error = self.error or FailureDetails("DurableError", "replay failed")
        return f"{subject}: {error.error_type}{where}: {error.message}"

    def raise_on_failure(self) -> None:
        """Raise the divergence (``NonDeterminismError``, ``FunctionNotFound``) unless ok."""
        if self.ok:
            return
        if self.error is not None and self.error.error_type == FunctionNotFound.__name__:
            raise FunctionNotFound(self.message)
        if self.error is not None and self.error.error_type == NonDeterminismError.__name__:
            raise NonDeterminismError(self.message)
        raise DurableError(self.message)


class Replayer:
    """Replays recorded histories against the current orchestrator code.

    ``functions`` is the code to check: a ``DFApp`` or ``Blueprint`` (its registered
    orchestrators), a ``FunctionRegistry``, or a mapping from orchestrator name to function.
    """

    def __init__(self, functions: Functions) -> None:
        if isinstance(functions, FunctionRegistry):
            self._resolve: Callable[[str], Orchestrator | None] = functions.orchestrator
        elif isinstance(getattr(functions, "durable_functions", None), FunctionRegistry):  # DFApp, Blueprint
            self._resolve = functions.durable_functions.orchestrator  # type: ignore[union-attr]
        elif isinstance(functions, Mapping):
            table = dict(functions)
            self._resolve = table.get
        else:
            raise TypeError(f"expected a DFApp, Blueprint or mapping of orchestrators, got {type(functions).__name__}")

    def replay_history(self, history: ReplayHistory) -> ReplayResult:
        """Replay one history; never raises for a divergence (see ``ReplayResult.raise_on_failure``)."""
        return _Replay(self._resolve, history).run()

    def replay_histories(self, histories: Iterable[ReplayHistory]) -> list[ReplayResult]:
        """Replay every history, whatever the verdicts; results in the same order."""
        return [self.replay_history(history) for history in histories]


class _Replay:
    """One history's check. Besides the replay of the whole history it replays prefixes of it
    (binary searches, so O(n log n) in all) to find where the code parted from the history."""

    def __init__(self, resolve: Callable[[str], Orchestrator | None], history: ReplayHistory) -> None:
        self.resolve = resolve
        self.history = history
        self.events = history.events
        found = _started(self.events)
        assert found is not None  # checked by ReplayHistory
        self.start_index, started = found
        self.execution_id = started.execution_id
        self.now = max(e.timestamp for e in self.events)

    # -- verdicts ------------------------------------------------------------------------------------
    def run(self) -> ReplayResult:
        recorded = self.history.recorded_status
        try:
            full = self._step(len(self.events))
        except Exception as exc:  # the replay could not even run: report it, do not stop a batch
            return self._result(recorded, None, FailureDetails(type(exc).__name__, str(exc)))
        replayed = self._status_of(full)
        if full.failure is not None and full.failure.error_type in DIVERGENCE_ERRORS:
            index = self._first(lambda step: step is not None and _step_diverged(step)) - 1
            # Without the stack trace: it would show the replay machinery, not the user's code.
            error = FailureDetails(full.failure.error_type, full.failure.message)
            return self._result(recorded, replayed, error, index)
        ended = _ended(self.events)
        if ended is None:
            if _ends(replayed):
                return self._ended_early(recorded, replayed, full)
            return self._result(recorded, replayed)
        end_index, end = ended
        if not _ends(replayed):
            message = (
                f"history event {describe_event(end)} ends the execution {recorded.value}, "
                f"but the orchestrator code does not end there: it is still waiting"
            )
            return self._diverged(recorded, replayed, message, end_index)
        mismatch = self._compare_tail(full, replayed)
        if mismatch is not None:
            return self._diverged(recorded, replayed, *mismatch)
        if replayed is not recorded:
            message = (
                f"history event {describe_event(end)} ends the execution {recorded.value}, "
                f"but the orchestrator code ends it {_outcome_text(replayed, full)}"
            )
            return self._diverged(recorded, replayed, message, end_index)
        return self._result(recorded, replayed)

    def _ended_early(
        self, recorded: OrchestrationRuntimeStatus, replayed: OrchestrationRuntimeStatus, full: StepResult
    ) -> ReplayResult:
        """The code ends an execution that the history keeps running."""
        mismatch = self._compare_tail(full, replayed)
        if mismatch is not None:
            return self._diverged(recorded, replayed, *mismatch)
        index = self._end_point()
        last = self.events[index - 1]
        message = (
            f"the history keeps the execution running after event {describe_event(last)}, "
            f"but the orchestrator code ends it there ({_outcome_text(replayed, full)})"
        )
        return self._diverged(recorded, replayed, message, index - 1)

    def _compare_tail(self, full: StepResult, replayed: OrchestrationRuntimeStatus) -> tuple[str, int] | None:
        """Once the code has ended, replay looks at no more events; the actions the history records
        after that point must be exactly those the code took on its way out (which the replay
        step returns as new). Returns a divergence message and event index, if any."""
        if full.keep == 0:  # continued as new: the step returned the next execution's history
            code_actions: list[HistoryEvent] = []
        else:
            code_actions = [e for e in full.events if e.event_type in ACTION_EVENT_TYPES]
        point = self._end_point()
        recorded = [(i, e) for i, e in enumerate(self.events) if i >= point and self._owned_action(e)]
        for position in range(max(len(recorded), len(code_actions))):
            history_event = recorded[position] if position < len(recorded) else None
            action = code_actions[position] if position < len(code_actions) else None
            if history_event is not None and action is not None and _same_action(history_event[1], action):
                continue
            if history_event is None:
                assert action is not None
                return (
                    f"the orchestrator code took the new action {describe_event(action)} as it ended, "
                    f"which the history does not have",
                    point - 1,
                )
            index, event = history_event
            if action is None:
                return (
                    f"history event {describe_event(event)} has no matching action: the orchestrator code "
                    f"ended ({_outcome_text(replayed, full)}) before taking it",
                    index,
                )
            return (
                f"history event {describe_event(event)} does not match the orchestrator code's new action "
                f"{describe_event(action)}",
                index,
            )
        return None

    def _end_point(self) -> int:
        """The shortest prefix of the history after which the code has ended."""
        return self._first(lambda step: step is not None and _ends(self._status_of(step)))

    # -- replaying prefixes --------------------------------------------------------------------------
    def _step(self, length: int) -> StepResult:
        return execute_step(self.resolve, self.events[:length], [], self.now)

    def _probe(self, length: int) -> StepResult | None:
        try:
            return self._step(length)
        except Exception:
            return None

    def _first(self, holds: Callable[[StepResult | None], bool]) -> int:
        """The smallest prefix length (past ExecutionStarted) whose replay satisfies ``holds``,
        which must stay true for all longer prefixes and hold for the whole history."""
        low, high = self.start_index + 1, len(self.events)
        while low < high:
            middle = (low + high) // 2
            if holds(self._probe(middle)):
                high = middle
            else:
                low = middle + 1
        return high

    def _status_of(self, step: StepResult) -> OrchestrationRuntimeStatus:
        if step.keep == 0 or (self.execution_id is not None and step.execution_id != self.execution_id):
            return OrchestrationRuntimeStatus.ContinuedAsNew
        return step.status

    def _owned_action(self, event: HistoryEvent) -> bool:
        """An action of this execution's code (not a message carried over from the previous one)."""
        return event.event_type in ACTION_EVENT_TYPES and (
            event.execution_id is None or event.execution_id == self.execution_id
        )

    # -- results -------------------------------------------------------------------------------------
    def _diverged(
        self,
        recorded: OrchestrationRuntimeStatus,
        replayed: OrchestrationRuntimeStatus,
        message: str,
        index: int | None,
    ) -> ReplayResult:
        error = FailureDetails(NonDeterminismError.__name__, message)
        return self._result(recorded, replayed, error, index)

    def _result(
        self,
        recorded: OrchestrationRuntimeStatus,
        replayed: OrchestrationRuntimeStatus | None,
        error: FailureDetails | None = None,
        index: int | None = None,
    ) -> ReplayResult:
        return ReplayResult(
            instance_id=self.history.instance_id,
            name=self.history.name,
            ok=error is None,
            error=error,
            event_index=index,
            event=None if index is None else self.events[index],
            recorded_status=recorded,
            replayed_status=replayed,
            events=len(self.events),
        )


def _ends(status: OrchestrationRuntimeStatus) -> bool:
    return status.is_terminal or status is OrchestrationRuntimeStatus.ContinuedAsNew


def _step_diverged(step: StepResult) -> bool:
    return step.failure is not None and step.failure.error_type in DIVERGENCE_ERRORS


def _same_action(recorded: HistoryEvent, action: HistoryEvent) -> bool:
    return (
        recorded.event_type is action.event_type
        and recorded.name == action.name
        and recorded.event_id == action.event_id
        and recorded.instance_id == action.instance_id
    )


def _started(events: Sequence[HistoryEvent]) -> tuple[int, HistoryEvent] | None:
    return next(((i, e) for i, e in enumerate(events) if e.event_type is EventType.EXECUTION_STARTED), None)


def _ended(events: Sequence[HistoryEvent]) -> tuple[int, HistoryEvent] | None:
    for index in range(len(events) - 1, -1, -1):
        if events[index].event_type is EventType.EXECUTION_COMPLETED:
            return index, events[index]
    return None


def _status_text(status: OrchestrationRuntimeStatus | None) -> str:
    if status is None:
        return "not run"
    if _ends(status):
        return f"ends {status.value}"
    return f"still {status.value}"


def _outcome_text(status: OrchestrationRuntimeStatus, step: StepResult) -> str:
    if status is OrchestrationRuntimeStatus.ContinuedAsNew:
        return "by continuing as new"
    if status is OrchestrationRuntimeStatus.Failed and step.failure is not None:
        return f"Failed ({step.failure.error_type}: {step.failure.message})"
    return str(status.value)


def describe_event(event: HistoryEvent) -> str:
    """A history event or action in a report: ``TaskScheduled 'charge' #3``."""
    label = event.event_type.value
    if event.name:
        label += f" '{event.name}'"
    if event.event_type in (EventType.EVENT_SENT, EventType.SUB_ORCHESTRATION_CREATED) and event.instance_id:
        label += f" to {event.instance_id}"
    if event.event_type is EventType.EXECUTION_COMPLETED and event.runtime_status:
        label += f" ({event.runtime_status})"
    if event.event_id >= 0:
        label += f" #{event.event_id}"
    elif event.completed_task_id is not None:
        label += f" for #{event.completed_task_id}"
    return label
