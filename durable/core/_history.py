"""History events: the durable record an orchestration is replayed against.

The event types and their linkage follow the Durable Task Framework (DTFx): an action the
orchestrator takes (scheduling an activity, creating a timer, ...) is recorded with an ``event_id``
equal to the action's sequence number in its execution; the event that completes it points back
with ``task_scheduled_id`` (``timer_id`` for timers). Payloads stay JSON text here; only the
orchestration context decodes them for user code.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any


class EventType(str, enum.Enum):
    EXECUTION_STARTED = "ExecutionStarted"
    EXECUTION_COMPLETED = "ExecutionCompleted"
    EXECUTION_TERMINATED = "ExecutionTerminated"
    EXECUTION_SUSPENDED = "ExecutionSuspended"
    EXECUTION_RESUMED = "ExecutionResumed"
    EXECUTION_REWOUND = "ExecutionRewound"
    CONTINUE_AS_NEW = "ContinueAsNew"
    ORCHESTRATOR_STARTED = "OrchestratorStarted"
    ORCHESTRATOR_COMPLETED = "OrchestratorCompleted"
    TASK_SCHEDULED = "TaskScheduled"
    TASK_COMPLETED = "TaskCompleted"
    TASK_FAILED = "TaskFailed"
    SUB_ORCHESTRATION_CREATED = "SubOrchestrationInstanceCreated"
    SUB_ORCHESTRATION_COMPLETED = "SubOrchestrationInstanceCompleted"
    SUB_ORCHESTRATION_FAILED = "SubOrchestrationInstanceFailed"
    TIMER_CREATED = "TimerCreated"
    TIMER_FIRED = "TimerFired"
    EVENT_RAISED = "EventRaised"
    EVENT_SENT = "EventSent"
    # Entities: a message to an entity, and the snapshot row an entity's history consists of.
    ENTITY_MESSAGE = "EntityMessage"
    ENTITY_STATE = "EntityState"


# Events that record an action taken by orchestrator code; replay checks them against the code.
# Each may be answered by a completion (an EventSent by an entity's reply to a call or lock).
ACTION_EVENT_TYPES = frozenset(
    {
        EventType.TASK_SCHEDULED,
        EventType.SUB_ORCHESTRATION_CREATED,
        EventType.TIMER_CREATED,
        EventType.EVENT_SENT,
    }
)
# Events that complete an action; ``HistoryEvent.completed_task_id`` says which.
COMPLETION_EVENT_TYPES = frozenset(
    {
        EventType.TASK_COMPLETED,
        EventType.TASK_FAILED,
        EventType.SUB_ORCHESTRATION_COMPLETED,
        EventType.SUB_ORCHESTRATION_FAILED,
        EventType.TIMER_FIRED,
    }
)


@dataclass(frozen=True)
class FailureDetails:
    """Why a task or an orchestration failed, kept as text so it survives any process boundary."""

    error_type: str
    message: str
    stack_trace: str | None = None

    @classmethod
    def from_exception(cls, exc: BaseException) -> FailureDetails:
        import traceback

        return cls(
            error_type=type(exc).__name__,
            message=str(exc),
            stack_trace="".join(traceback.format_exception(exc)),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"ErrorType": self.error_type, "Message": self.message, "StackTrace": self.stack_trace}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FailureDetails:
        return cls(data["ErrorType"], data["Message"], data.get("StackTrace"))


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class HistoryEvent:
    """One row of an instance's history. Only the fields relevant to ``event_type`` are set."""

    event_type: EventType
    timestamp: datetime
    event_id: int = -1
    name: str | None = None
    input: str | None = None  # JSON text
    result: str | None = None  # JSON text
    failure: FailureDetails | None = None
    task_scheduled_id: int | None = None  # completions point at their scheduling event
    timer_id: int | None = None  # TimerFired points at its TimerCreated
    fire_at: datetime | None = None
    instance_id: str | None = None  # ExecutionStarted: this instance; sub-orchestration / EventSent: target
    execution_id: str | None = None
    parent_instance_id: str | None = None
    parent_execution_id: str | None = None
    parent_task_scheduled_id: int | None = None
    runtime_status: str | None = None  # ExecutionCompleted: Completed / Failed / ContinuedAsNew
    message_id: str | None = None  # id of the inbound message that produced this event (de-duplication)
    custom_status: str | None = None  # OrchestratorCompleted: the custom status, when the step changed it
    version: str | None = None
    # ExecutionStarted: protocol bookkeeping carried from earlier executions of the same instance id
    # (applied message ids, lineage); JSON text written and read by ``_protocol`` only.
    carried: str | None = None
    # ExecutionStarted: the W3C trace context of the span that started the execution (a client's
    # start, a parent's step), as JSON text; every step of the execution is traced under it.
    parent_trace_context: str | None = None

    @property
    def completed_task_id(self) -> int | None:
        """For a completion (TaskCompleted, TimerFired, ...): the ``event_id`` of its action."""
        return self.timer_id if self.event_type is EventType.TIMER_FIRED else self.task_scheduled_id

    def replace(self, **changes: Any) -> HistoryEvent:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with DTFx-style property names; unset fields are omitted."""
        out: dict[str, Any] = {"EventType": self.event_type.value, "Timestamp": self.timestamp.isoformat()}
        for name, prop in _SERIALIZED_FIELDS:
            value = getattr(self, name)
            if value is None or (name == "event_id" and value == -1):
                continue
            if isinstance(value, datetime):
                value = value.isoformat()
            elif isinstance(value, FailureDetails):
                value = value.to_dict()
            out[prop] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HistoryEvent:
        kwargs: dict[str, Any] = {
            "event_type": EventType(data["EventType"]),
            "timestamp": datetime.fromisoformat(data["Timestamp"]),
        }
        for field_name, prop in _PROPERTY_NAMES.items():
            if prop not in data or data[prop] is None:
                continue
            value = data[prop]
            if field_name == "fire_at":
                value = datetime.fromisoformat(value)
            elif field_name == "failure":
                value = FailureDetails.from_dict(value)
            kwargs[field_name] = value
        return cls(**kwargs)


_PROPERTY_NAMES = {
    "event_id": "EventId",
    "name": "Name",
    "input": "Input",
    "result": "Result",
    "failure": "FailureDetails",
    "task_scheduled_id": "TaskScheduledId",
    "timer_id": "TimerId",
    "fire_at": "FireAt",
    "instance_id": "InstanceId",
    "execution_id": "ExecutionId",
    "parent_instance_id": "ParentInstanceId",
    "parent_execution_id": "ParentExecutionId",
    "parent_task_scheduled_id": "ParentTaskScheduledId",
    "runtime_status": "OrchestrationStatus",
    "message_id": "MessageId",
    "custom_status": "CustomStatus",
    "version": "Version",
    "carried": "CarriedState",
    "parent_trace_context": "ParentTraceContext",
}
# (field, property) in field order, but for the two every event has; read once, not per event.
_SERIALIZED_FIELDS = tuple(
    (f.name, _PROPERTY_NAMES[f.name])
    for f in dataclasses.fields(HistoryEvent)
    if f.name not in ("event_type", "timestamp")
)


def started_event(events: Sequence[HistoryEvent]) -> HistoryEvent | None:
    """The ExecutionStarted event of a history (of its current execution)."""
    return next((e for e in events if e.event_type is EventType.EXECUTION_STARTED), None)


@dataclass
class InstanceHistory:
    """An instance's committed history as of its sentinel row (the commit point)."""

    instance_id: str
    events: list[HistoryEvent] = field(default_factory=list)
    etag: str | None = None  # None: never committed
    execution_id: str | None = None
    # events[outbox_start:] produced outbound messages not yet confirmed sent
    outbox_start: int = 0
    checkpoint: int = 0  # number of committed steps

    @property
    def exists(self) -> bool:
        return self.etag is not None
