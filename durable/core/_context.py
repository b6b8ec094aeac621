"""The orchestration context: the API orchestrator code calls.

Every method that starts durable work records an *action* (a history event with the next sequence
number as its ``event_id``) and returns a task. The replay executor (``_replay``) matches actions
against stored history and completes tasks from it; this module holds no I/O.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections import deque
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from . import _serialization as serialization
from ._entities import EntityId, EntityRequest, as_entity_id, lock_owner
from ._errors import OrchestrationApiMisuse
from ._history import EventType, HistoryEvent
from ._ids import validate_instance_id
from ._retry import RetryOptions
from ._task import AtomicTask, ExternalEventTask, RetryableTask, TaskBase, TimerTask, WhenAllTask, WhenAnyTask

_NOT_SET: Any = object()


def event_key(name: str) -> str:
    """External event names match case-insensitively, as in Durable Functions."""
    return name.casefold()


class DurableOrchestrationContext:
    def __init__(
        self,
        instance_id: str,
        execution_id: str,
        name: str,
        input_json: str | None,
        parent_instance_id: str | None,
        start_time: datetime,
    ) -> None:
        self._instance_id = instance_id
        self._execution_id = execution_id
        self._name = name
        self._input_json = input_json
        self._parent_instance_id = parent_instance_id
        self._current_utc_datetime = start_time
        self._is_replaying = False
        self._sequence = 0
        self._guid_counter = 0
        # actions taken by the code and not yet matched against history, by sequence number
        self._pending_actions: dict[int, HistoryEvent] = {}
        # tasks waiting for a completion event, by the sequence number of their action
        self._open_tasks: dict[int, AtomicTask] = {}
        self._event_waiters: dict[str, deque[ExternalEventTask]] = {}
        self._received_events: dict[str, deque[HistoryEvent]] = {}
        self._custom_status: Any = None
        self._continue_as_new_input: Any = _NOT_SET
        # entities: sequence numbers used per destination, and the critical section's state
        self._entity_seq: dict[str, int] = {}
        self._locked: list[str] | None = None  # entities held by the current critical section
        self._section_owner: str | None = None  # the lock owner id of the current critical section
        self._lock_pending: LockTask | None = None
        self._calls_in_flight: set[str] = set()  # locked entities with an unanswered call_entity

    # -- properties --------------------------------------------------------------------------------
    @property
    def instance_id(self) -> str:
        return self._instance_id

    @property
    def parent_instance_id(self) -> str | None:
        return self._parent_instance_id

    @property
    def is_replaying(self) -> bool:
        """True while the code re-executes steps already in history (e.g. to skip logging)."""
        return self._is_replaying

    @property
    def current_utc_datetime(self) -> datetime:
        """The time of the current step, the same on every replay."""
        return self._current_utc_datetime

    @property
    def function_name(self) -> str:
        return self._name

    def get_input(self) -> Any:
        return serialization.decode(self._input_json)

    # -- actions -----------------------------------------------------------------------------------
    def _record(self, event_type: EventType, **fields: Any) -> int:
        task_id = self._sequence
        self._sequence += 1
        self._pending_actions[task_id] = HistoryEvent(
            event_type, self._current_utc_datetime, event_id=task_id, **fields
        )
        return task_id

    def _open(self, task: AtomicTask) -> AtomicTask:
        self._open_tasks[task.id] = task
        return task

    def call_activity(self, name: str, input_: Any = None) -> TaskBase:
        _check_name(name, "activity")
        task_id = self._record(EventType.TASK_SCHEDULED, name=name, input=serialization.encode(input_))
        return self._open(AtomicTask(task_id))

    def call_activity_with_retry(self, name: str, retry_options: RetryOptions, input_: Any = None) -> TaskBase:
        return RetryableTask(self, lambda: self.call_activity(name, input_), retry_options)

    def call_sub_orchestrator(self, name: str, input_: Any = None, instance_id: str | None = None) -> TaskBase:
        _check_name(name, "orchestrator")
        if self._locked is not None:
            raise OrchestrationApiMisuse("a critical section cannot call a sub-orchestration")
        task_id = self._sequence
        child_id = instance_id if instance_id is not None else f"{self._instance_id}:{task_id}"
        try:
            validate_instance_id(child_id)
        except ValueError as error:
            raise OrchestrationApiMisuse(f"invalid sub-orchestration instance id: {error}") from None
        if child_id.startswith("@"):
            raise OrchestrationApiMisuse("sub-orchestration instance ids cannot start with '@' (entity ids do)")
        self._record(
            EventType.SUB_ORCHESTRATION_CREATED,
            name=name,
            input=serialization.encode(input_),
            instance_id=child_id,
        )
        return self._open(AtomicTask(task_id))

    def call_sub_orchestrator_with_retry(
        self, name: str, retry_options: RetryOptions, input_: Any = None, instance_id: str | None = None
    ) -> TaskBase:
        return RetryableTask(self, lambda: self.call_sub_orchestrator(name, input_, instance_id), retry_options)

    def create_timer(self, fire_at: datetime) -> TimerTask:
        if fire_at.tzinfo is None:
            raise OrchestrationApiMisuse("create_timer needs a timezone-aware datetime (use UTC)")
        task_id = self._record(EventType.TIMER_CREATED, fire_at=fire_at)
        task = TimerTask(task_id, fire_at)
        self._open(task)
        return task

    def wait_for_external_event(self, name: str) -> TaskBase:
        _check_name(name, "event")
        task = ExternalEventTask(name)
        buffered = self._received_events.get(event_key(name))
        if buffered:
            task._set_result(serialization.decode(buffered.popleft().input))
        else:
            self._event_waiters.setdefault(event_key(name), deque()).append(task)
        return task

    def task_all(self, activities: Sequence[TaskBase]) -> TaskBase:
        return WhenAllTask(activities)

    def task_any(self, activities: Sequence[TaskBase]) -> TaskBase:
        return WhenAnyTask(activities)

    def continue_as_new(self, input_: Any) -> None:
        """Restart this orchestration with a fresh history and ``input_`` once this step ends.

        External events received but not yet consumed carry over to the new execution."""
        self._continue_as_new_input = input_

    def set_custom_status(self, status: Any) -> None:
        self._custom_status = status

    @property
    def custom_status(self) -> Any:
        return self._custom_status

    def new_uuid(self) -> str:
        """A UUID that is the same on every replay of this point of the orchestration."""
        name = f"{self._instance_id}_{self._current_utc_datetime.isoformat()}_{self._guid_counter}"
        self._guid_counter += 1
        return str(uuid.uuid5(uuid.NAMESPACE_URL, name))

    def new_guid(self) -> str:
        return self.new_uuid()

    # -- entities ----------------------------------------------------------------------------------
    @property
    def _sender(self) -> str:
        return f"{self._instance_id}|{self._execution_id}"

    def _send_to_entity(self, target: str, request: EntityRequest, scheduled_time: datetime | None = None) -> int:
        """Record an EventSent carrying ``request`` to entity ``target``; returns its event id."""
        if scheduled_time is None:  # scheduled signals are exempt from ordering (they would block it)
            sequence = self._entity_seq.get(target, 0) + 1
            self._entity_seq[target] = sequence
            request = dataclasses.replace(request, sender=self._sender, seq=sequence)
        if request.owner is None and self._locked is not None and target in self._locked:
            # An operation inside the critical section: the entity serves its lock holder.
            request = dataclasses.replace(request, owner=self._section_owner)
        name = request.operation or request.kind
        return self._record(
            EventType.EVENT_SENT, name=name, instance_id=target, input=request.to_json(), fire_at=scheduled_time
        )

    def signal_entity(
        self,
        entityId: EntityId | str,  # the official SDK's parameter names
        operationName: str,
        operationInput: Any = None,
        scheduled_time: datetime | None = None,
    ) -> None:
        """Send an operation to an entity without waiting for it (one-way)."""
        target = as_entity_id(entityId).instance_id
        if self._locked is not None and target in self._locked:
            raise OrchestrationApiMisuse(f"cannot signal {target}: it is locked by this critical section")
        _check_name(operationName, "operation")
        request = EntityRequest("op", operation=operationName, input=serialization.encode(operationInput))
        self._send_to_entity(target, request, scheduled_time)

    def call_entity(
        self,
        entityId: EntityId | str,
        operationName: str,
        operationInput: Any = None,
    ) -> TaskBase:
        """Run an operation on an entity and wait for its result (or its failure, typed)."""
        target = as_entity_id(entityId).instance_id
        _check_name(operationName, "operation")
        if self._locked is not None:
            if target not in self._locked:
                raise OrchestrationApiMisuse(f"a critical section can only call the entities it locked, not {target}")
            if target in self._calls_in_flight:
                raise OrchestrationApiMisuse(f"a critical section can have one pending call per entity ({target})")
        task_id = self._sequence
        request = EntityRequest(
            "op",
            operation=operationName,
            input=serialization.encode(operationInput),
            reply_to={"instance": self._instance_id, "execution": self._execution_id, "task": task_id},
        )
        self._send_to_entity(target, request)
        task = EntityCallTask(task_id, self, target)
        if self._locked is not None:
            self._calls_in_flight.add(target)
        return self._open(task)

    def lock(self, entities: Sequence[EntityId | str]) -> TaskBase:
        """Acquire a critical section: ``with (yield context.lock([e1, e2])):`` ... The entities are
        locked in one global order, so two orchestrations never deadlock on each other."""
        if self._locked is not None or self._lock_pending is not None:
            raise OrchestrationApiMisuse("critical sections cannot be nested")
        ids = sorted({as_entity_id(e).instance_id for e in entities})
        if not ids:
            raise OrchestrationApiMisuse("lock needs at least one entity")
        task_id = self._sequence
        owner = lock_owner(self._instance_id, self._execution_id, task_id)
        request = EntityRequest(
            "lock",
            lock=ids,
            position=0,
            owner=owner,
            reply_to={"instance": self._instance_id, "execution": self._execution_id, "task": task_id},
        )
        self._send_to_entity(ids[0], request)
        task = LockTask(task_id, self, ids, owner)
        self._lock_pending = task
        return self._open(task)

    def _release_locks(self) -> None:
        """Leave the critical section: tell every locked entity (also done when the orchestration ends)."""
        held, self._locked = self._locked, None
        owner, self._section_owner = self._section_owner, None
        self._calls_in_flight.clear()
        for target in held or []:
            self._send_to_entity(target, EntityRequest("release", owner=owner))

    def _retire_as_sender(self) -> None:
        """An ending execution tells each entity it numbered messages for that it will send no
        more (in sequence, after everything else it sent), so entities can forget its counter."""
        for target in sorted(self._entity_seq):
            self._send_to_entity(target, EntityRequest("retire"))

    # -- used by the executor ----------------------------------------------------------------------
    def _deliver_event(self, event: HistoryEvent) -> None:
        key = event_key(event.name or "")
        waiters = self._event_waiters.get(key)
        if waiters:
            waiters.popleft()._set_result(serialization.decode(event.input))
        else:
            self._received_events.setdefault(key, deque()).append(event)

    def _unconsumed_events(self) -> list[HistoryEvent]:
        return [event for queue in self._received_events.values() for event in queue]


def _check_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not name:
        raise OrchestrationApiMisuse(f"{what} name must be a non-empty string, got {name!r}")


class EntityCallTask(AtomicTask):
    """The reply of one ``call_entity``."""

    def __init__(self, task_id: int, context: DurableOrchestrationContext, target: str) -> None:
        super().__init__(task_id)
        self._context, self._target = context, target

    def _set_result(self, value: Any) -> None:
        self._context._calls_in_flight.discard(self._target)
        super()._set_result(value)

    def _set_exception(self, exc: BaseException) -> None:
        self._context._calls_in_flight.discard(self._target)
        super()._set_exception(exc)


class LockTask(AtomicTask):
    """Completes when the last entity of the lock set has granted it; its value is the critical
    section, a context manager that releases the locks on exit."""

    def __init__(self, task_id: int, context: DurableOrchestrationContext, entities: list[str], owner: str) -> None:
        super().__init__(task_id)
        self._context, self._entities, self._owner = context, entities, owner

    def _set_result(self, value: Any) -> None:
        self._context._lock_pending = None
        self._context._locked = list(self._entities)
        self._context._section_owner = self._owner
        super()._set_result(CriticalSection(self._context, self._entities))


class CriticalSection:
    def __init__(self, context: DurableOrchestrationContext, entities: list[str]) -> None:
        self._context = context
        self.entities = [EntityId.from_instance_id(e) for e in entities]

    def __enter__(self) -> CriticalSection:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        # GeneratorExit: the runtime is discarding the orchestrator (terminated); it releases
        # the locks itself, in the step that records the termination.
        if exc_type is not GeneratorExit and self._context._locked is not None:
            self._context._release_locks()
