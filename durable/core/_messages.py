"""Messages between instances and workers: what the queues carry.

Every message wraps one history event. Orchestration messages go to the control queue of the
target instance's partition; activity work items go to the shared work-item queue. Each message
has a unique id so receivers can drop duplicates (queues deliver at least once).
"""

from __future__ import annotations

import enum
import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from ._history import HistoryEvent

# How long a message is recognised as a duplicate once applied, beyond what a history or an
# entity's sequence numbers prove (ids carried over a continue-as-new, retired entity senders).
# Redeliveries come within minutes (a lease); 6 hours covers a worker stalled many times over.
DEDUP_WINDOW = timedelta(hours=6)

# Azure queues hide a message for at most 7 days: one due later (a durable timer, a scheduled
# signal) arrives early and is put back until it is due.
MAX_QUEUE_DELAY_SECONDS = 7 * 24 * 3600 - 300


class MessageKind(str, enum.Enum):
    """What a message is for the protocol, in a field of its own so that no user-chosen name
    (an operation called "lock", an event called "release") can be taken for it."""

    LOCK_GRANT = "lock-grant"  # the last entity of a lock set grants the critical section


class MessageTarget(str, enum.Enum):
    ORCHESTRATION = "orchestration"  # control queue of the instance's partition
    ACTIVITY = "activity"  # shared work-item queue


def new_message_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class WorkMessage:
    target: MessageTarget
    instance_id: str  # the orchestration the message is for (for activities: the one that scheduled it)
    event: HistoryEvent
    execution_id: str | None = None  # when set, the message is only valid for that execution
    visible_at: datetime | None = None  # delayed delivery (durable timers, retried deliveries)
    # A start message carries the ETag of the Pending Instances row its sender wrote, so the
    # worker's first status update needs no read.
    record_etag: str | None = None
    deferrals: int = 0  # times a worker put this message back for later (see Acknowledger.later)
    kind: MessageKind | None = None  # protocol messages only
    id: str = field(default_factory=new_message_id)
    # W3C trace context of the span that sent the message, as runtime/_tracing writes it (JSON
    # text); the receiver's span is its child. Not part of the protocol: None is always fine.
    trace_context: str | None = None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "Id": self.id,
            "Target": self.target.value,
            "InstanceId": self.instance_id,
            "Event": self.event.to_dict(),
        }
        if self.execution_id is not None:
            body["ExecutionId"] = self.execution_id
        if self.visible_at is not None:
            body["VisibleAt"] = self.visible_at.isoformat()
        if self.record_etag is not None:
            body["RecordETag"] = self.record_etag
        if self.deferrals:
            body["Deferrals"] = self.deferrals
        if self.kind is not None:
            body["Kind"] = self.kind.value
        if self.trace_context is not None:
            body["TraceContext"] = self.trace_context
        return body

    @classmethod
    def from_json(cls, text: str) -> WorkMessage:
        """Parse a queue message body; raises ``ValueError`` on anything malformed."""
        try:
            body = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"malformed work message: {exc!r}") from exc
        return cls.from_dict(body)

    @classmethod
    def from_dict(cls, body: Any) -> WorkMessage:
        """The message ``to_dict`` made; raises ``ValueError`` on anything malformed."""
        try:
            visible_at = body.get("VisibleAt")
            trace_context = body.get("TraceContext")  # best effort: a malformed one is dropped, not the message
            return cls(
                target=MessageTarget(body["Target"]),
                instance_id=str(body["InstanceId"]),
                event=HistoryEvent.from_dict(body["Event"]),
                execution_id=body.get("ExecutionId"),
                visible_at=datetime.fromisoformat(visible_at) if visible_at else None,
                record_etag=body.get("RecordETag"),
                deferrals=int(body.get("Deferrals", 0)),
                kind=MessageKind(body["Kind"]) if body.get("Kind") else None,
                id=str(body["Id"]),
                trace_context=trace_context if isinstance(trace_context, str) else None,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"malformed work message: {exc!r}") from exc
