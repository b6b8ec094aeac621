"""``DurableOrchestrationClient``: start, query and control orchestration instances."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from . import _serialization as serialization
from ._app import FunctionRegistry
from ._backend import Backend, InstanceExists, InstanceQuery
from ._history import EventType, HistoryEvent, utcnow
from ._messages import MessageTarget, WorkMessage
from ._replay import new_execution_id
from ._status import InstanceRecord, OrchestrationRuntimeStatus

MAX_INSTANCE_ID_LENGTH = 256


def validate_instance_id(instance_id: str) -> str:
    """Instance ids become table keys and queue routing keys: keep them printable and bounded."""
    if not isinstance(instance_id, str) or not instance_id.strip():
        raise ValueError("instance id must be a non-empty string")
    if len(instance_id) > MAX_INSTANCE_ID_LENGTH:
        raise ValueError(f"instance id is longer than {MAX_INSTANCE_ID_LENGTH} characters")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in instance_id):
        raise ValueError("instance id must not contain control characters")
    return instance_id


@dataclass
class DurableOrchestrationStatus:
    """The status of an instance, shaped like the official SDK's class of the same name."""

    name: str
    instance_id: str
    runtime_status: OrchestrationRuntimeStatus
    created_time: datetime
    last_updated_time: datetime
    input_: Any = None
    output: Any = None
    custom_status: Any = None
    history: list[dict[str, Any]] | None = None
    failure_details: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_record(cls, record: InstanceRecord, show_input: bool = True) -> DurableOrchestrationStatus:
        output: Any = serialization.decode(record.output)
        if record.failure is not None and output is None:
            output = f"{record.failure.error_type}: {record.failure.message}"
        return cls(
            name=record.name,
            instance_id=record.instance_id,
            runtime_status=record.runtime_status,
            created_time=record.created_time,
            last_updated_time=record.last_updated_time,
            input_=serialization.decode(record.input) if show_input else None,
            output=output,
            custom_status=serialization.decode(record.custom_status),
            failure_details=record.failure.to_dict() if record.failure else None,
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "instanceId": self.instance_id,
            "runtimeStatus": self.runtime_status.value,
            "input": self.input_,
            "customStatus": self.custom_status,
            "output": self.output,
            "createdTime": _iso(self.created_time),
            "lastUpdatedTime": _iso(self.last_updated_time),
        }
        if self.history is not None:
            out["historyEvents"] = self.history
        return out


def _iso(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class PurgeHistoryResult:
    instances_deleted: int


class DurableOrchestrationClient:
    def __init__(
        self,
        backend: Backend,
        *,
        registry: FunctionRegistry | None = None,
        task_hub_name: str = "",
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._backend = backend
        self._registry = registry
        self.task_hub_name = task_hub_name
        self._clock = clock

    async def start_new(
        self, orchestration_function_name: str, instance_id: str | None = None, client_input: Any = None
    ) -> str:
        """Start an orchestration; returns its instance id. Raises ``ValueError`` for a bad id,
        an unknown orchestrator name, a non-JSON input, or an id that is already running."""
        if self._registry is not None:
            self._registry.require_orchestrator(orchestration_function_name)
        instance_id = validate_instance_id(instance_id) if instance_id is not None else uuid.uuid4().hex
        if instance_id.startswith("@"):
            raise ValueError("instance ids starting with '@' are reserved for entities")
        input_json = serialization.encode(client_input)
        now = self._clock()
        execution_id = new_execution_id()
        try:
            await self._backend.create_instance(
                InstanceRecord(
                    instance_id=instance_id,
                    name=orchestration_function_name,
                    runtime_status=OrchestrationRuntimeStatus.Pending,
                    created_time=now,
                    last_updated_time=now,
                    execution_id=execution_id,
                    input=input_json,
                )
            )
        except InstanceExists:
            raise ValueError(f"an instance with id '{instance_id}' already exists and is not finished") from None
        started = HistoryEvent(
            EventType.EXECUTION_STARTED,
            now,
            name=orchestration_function_name,
            input=input_json,
            instance_id=instance_id,
            execution_id=execution_id,
        )
        await self._backend.send([WorkMessage(MessageTarget.ORCHESTRATION, instance_id, started)])
        return instance_id

    async def get_status(
        self,
        instance_id: str,
        show_history: bool = False,
        show_history_output: bool = False,
        show_input: bool = True,
    ) -> DurableOrchestrationStatus | None:
        record = await self._backend.read_instance(validate_instance_id(instance_id))
        if record is None:
            return None
        status = DurableOrchestrationStatus.from_record(record, show_input)
        if show_history:
            history = await self._backend.load_history(instance_id)
            status.history = [_history_json(e, show_history_output) for e in history.events]
        return status

    async def get_status_by(
        self,
        created_time_from: datetime | None = None,
        created_time_to: datetime | None = None,
        runtime_status: Iterable[OrchestrationRuntimeStatus] | None = None,
    ) -> list[DurableOrchestrationStatus]:
        query = InstanceQuery(
            runtime_status=frozenset(runtime_status) if runtime_status is not None else None,
            created_from=created_time_from,
            created_to=created_time_to,
        )
        return [DurableOrchestrationStatus.from_record(r) async for r in self._query(query)]

    async def get_status_all(self) -> list[DurableOrchestrationStatus]:
        return await self.get_status_by()

    async def _query(self, query: InstanceQuery) -> Any:
        token: str | None = None
        while True:
            page, token = await self._backend.query_instances(query, 100, token)
            for record in page:
                yield record
            if token is None:
                return

    async def _require(self, instance_id: str) -> InstanceRecord:
        record = await self._backend.read_instance(validate_instance_id(instance_id))
        if record is None:
            raise ValueError(f"no instance with id '{instance_id}'")
        return record

    async def _send_control(self, instance_id: str, event: HistoryEvent) -> None:
        await self._backend.send([WorkMessage(MessageTarget.ORCHESTRATION, instance_id, event)])

    async def raise_event(self, instance_id: str, event_name: str, event_data: Any = None) -> None:
        if not isinstance(event_name, str) or not event_name:
            raise ValueError("event name must be a non-empty string")
        record = await self._require(instance_id)
        if record.runtime_status.is_terminal:
            raise ValueError(f"instance '{instance_id}' is {record.runtime_status.value}; it takes no more events")
        event = HistoryEvent(
            EventType.EVENT_RAISED, self._clock(), name=event_name, input=serialization.encode(event_data)
        )
        await self._send_control(instance_id, event)

    async def terminate(self, instance_id: str, reason: str | None = None) -> None:
        record = await self._require(instance_id)
        if record.runtime_status.is_terminal:
            return  # already finished: nothing to terminate
        await self._send_control(
            instance_id,
            HistoryEvent(EventType.EXECUTION_TERMINATED, self._clock(), input=serialization.encode(reason)),
        )

    async def suspend(self, instance_id: str, reason: str | None = None) -> None:
        await self._require(instance_id)
        await self._send_control(
            instance_id, HistoryEvent(EventType.EXECUTION_SUSPENDED, self._clock(), input=serialization.encode(reason))
        )

    async def resume(self, instance_id: str, reason: str | None = None) -> None:
        await self._require(instance_id)
        await self._send_control(
            instance_id, HistoryEvent(EventType.EXECUTION_RESUMED, self._clock(), input=serialization.encode(reason))
        )

    async def purge_instance_history(self, instance_id: str) -> PurgeHistoryResult:
        deleted = await self._backend.purge_instance(validate_instance_id(instance_id))
        return PurgeHistoryResult(int(deleted))

    async def purge_instance_history_by(
        self,
        created_time_from: datetime | None = None,
        created_time_to: datetime | None = None,
        runtime_status: Iterable[OrchestrationRuntimeStatus] | None = None,
    ) -> PurgeHistoryResult:
        statuses = frozenset(runtime_status) if runtime_status is not None else None
        query = InstanceQuery(runtime_status=statuses, created_from=created_time_from, created_to=created_time_to)
        ids = [r.instance_id async for r in self._query(query) if r.runtime_status.is_terminal or statuses]
        deleted = 0
        for instance_id in ids:
            deleted += int(await self._backend.purge_instance(instance_id))
        return PurgeHistoryResult(deleted)

    async def wait_for_completion(
        self, instance_id: str, timeout: float = 60.0, poll_interval: float = 0.1
    ) -> DurableOrchestrationStatus:
        """Poll until the instance is Completed, Failed or Terminated; ``TimeoutError`` otherwise."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            status = await self.get_status(instance_id)
            if status is not None and status.runtime_status.is_terminal:
                return status
            if loop.time() >= deadline:
                raise TimeoutError(f"instance '{instance_id}' did not finish within {timeout} s")
            await asyncio.sleep(poll_interval)


def _history_json(event: HistoryEvent, show_output: bool) -> dict[str, Any]:
    data = event.to_dict()
    if not show_output:
        data.pop("Result", None)
    return data
