"""Instance status: the runtime status enum and the Instances-table record."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

from ._history import FailureDetails


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
    with a higher checkpoint, so a delayed update cannot roll the status back.
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
