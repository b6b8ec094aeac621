"""Instance status: the runtime status enum and the Instances-table record."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from ._history import EventType, FailureDetails, HistoryEvent


class OrchestrationRuntimeStatus(str, enum.Enum):
    Pending = "Pending"
    Running = "Running"
    Completed = "Completed"
    ContinuedAsNew = "ContinuedAsNew"
    Failed = "Failed"
    Terminated = "Terminated"
    Suspended = "Suspended"

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset(
    {OrchestrationRuntimeStatus.Completed, OrchestrationRuntimeStatus.Failed, OrchestrationRuntimeStatus.Terminated}
)


@dataclass(frozen=True)
class InstanceRecord:
    """One row of the Instances table: the queryable projection of an instance's history.

    ``checkpoint`` is the number of committed steps it reflects; a writer never replaces a record
    with a higher checkpoint, so a delayed update cannot roll the status back. ``sends_pending``
    marks a row written ahead of its step's messages (protocol I8): it shows the step, but does
    not yet prove its messages sent.
    """

    instance_id: str
    name: str
    runtime_status: OrchestrationRuntimeStatus
    created_time: datetime
    last_updated_time: datetime
    execution_id: str | None = None
    input: str | None = None  # JSON text
    output: str | None = None  # JSON text
    custom_status: str | None = None  # JSON text
    failure: FailureDetails | None = None
    completed_time: datetime | None = None
    parent_instance_id: str | None = None
    checkpoint: int = 0
    version: str | None = None  # the orchestration version it was created with
    sends_pending: bool = False

    @property
    def finished(self) -> bool:
        """Terminal, and done sending what its last step owes (so it may be restarted or purged)."""
        return self.runtime_status.is_terminal and not self.sends_pending


def may_replace(stored: InstanceRecord, record: InstanceRecord) -> bool:
    """Whether the projection ``record`` may be written over the ``stored`` row: never over a
    higher checkpoint (protocol I6); at the same checkpoint, never over a restart's Pending row
    (which carries the checkpoint of the finished run it replaces, so a late row of that run
    comes with the same one, I6), and a row marked as written ahead of its step's messages never
    over that step's unmarked row (a late marker would take back the proof of the sends, I8)."""
    if stored.checkpoint != record.checkpoint:
        return stored.checkpoint < record.checkpoint
    newer_start = (
        stored.runtime_status is OrchestrationRuntimeStatus.Pending and stored.execution_id != record.execution_id
    )
    return not newer_start and not (record.sends_pending and not stored.sends_pending)


def shows_the_same(shown: InstanceRecord | None, record: InstanceRecord) -> bool:
    """Whether ``record`` shows what ``shown`` does: everything a status query reads but when it
    was written, the checkpoint it carries and whether its sends are pending."""
    return shown is not None and replace(shown, last_updated_time=record.last_updated_time,
                                         checkpoint=record.checkpoint,
                                         sends_pending=record.sends_pending) == record  # fmt: skip


def project_instance(
    instance_id: str, events: Sequence[HistoryEvent], checkpoint: int, now: datetime
) -> InstanceRecord | None:
    """The Instances row that corresponds to a history (None for a history that has not started).

    The worker writes this after each step, and again when it finds a committed step whose
    follow-up (sends, projection) may not have happened."""
    started: HistoryEvent | None = None
    completed: HistoryEvent | None = None
    suspended = False
    custom_status: str | None = None
    for event in events:
        kind = event.event_type
        if kind is EventType.EXECUTION_STARTED:
            started = event
        elif kind is EventType.EXECUTION_COMPLETED:
            completed = event
        elif kind is EventType.EXECUTION_SUSPENDED:
            suspended = True
        elif kind is EventType.EXECUTION_RESUMED:
            suspended = False
        elif kind is EventType.ORCHESTRATOR_COMPLETED and event.custom_status is not None:
            custom_status = event.custom_status
    if started is None:
        return None
    if completed is not None:
        status = OrchestrationRuntimeStatus(completed.runtime_status or "Failed")
    else:
        status = OrchestrationRuntimeStatus.Suspended if suspended else OrchestrationRuntimeStatus.Running
    return InstanceRecord(
        instance_id=instance_id,
        name=started.name or "",
        runtime_status=status,
        created_time=started.timestamp,
        last_updated_time=now,
        execution_id=started.execution_id,
        input=started.input,
        output=completed.result if completed is not None else None,
        custom_status=custom_status,
        failure=completed.failure if completed is not None else None,
        completed_time=completed.timestamp if completed is not None else None,
        parent_instance_id=started.parent_instance_id,
        checkpoint=checkpoint,
        version=started.version,
    )
