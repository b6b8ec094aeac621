"""The orchestration context: the API orchestrator code calls.

Every method that starts durable work records an *action* (a history event with the next sequence
number as its ``event_id``) and returns a task. The replay executor (``_replay``) matches actions
against stored history and completes tasks from it; this module holds no I/O.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import typing
import uuid
from collections import deque
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from . import _serialization as serialization
from ._entities import EntityId, EntityRequest, as_entity_id, lock_owner
from ._errors import OrchestrationApiMisuse
from ._history import EventType, HistoryEvent
from ._http import HTTP_ACTIVITY_NAME, DurableHttpRequest, TokenSource
from ._ids import validate_instance_id
from ._retry import RetryOptions
from ._task import (
    AtomicTask,
    ExternalEventTask,
    HttpTask,
    RetryableTask,
    TaskBase,
    TimerTask,
    WhenAllTask,
    WhenAnyTask,
)

_NOT_SET: Any = object()


def event_key(name: str) -> str:
    """External event names match case-insensitively, as in Durable Functions."""
    return name.casefold()


class FunctionContext:
    """Function-level attributes the orchestration does not use (the official SDK's bag of them)."""

    def __init__(self, **attributes: Any) -> None:
        for key, value in attributes.items():
            setattr(self, key, value)


if typing.TYPE_CHECKING:
    _LoggerAdapter = logging.LoggerAdapter[logging.Logger]
else:  # subscriptable at run time only from Python 3.11
    _LoggerAdapter = logging.LoggerAdapter


class ReplaySafeLogger(_LoggerAdapter):
    """A logger adapter that is disabled while its orchestration replays (see
    ``DurableOrchestrationContext.create_replay_safe_logger``)."""

    def __init__(self, logger: logging.Logger, context: DurableOrchestrationContext) -> None:
        super().__init__(logger, {})
        self.context = context

    def isEnabledFor(self, level: int) -> bool:  # every logging method asks this first
        return not self.context.is_replaying and super().isEnabledFor(level)


class DurableOrchestrationContext:
    def __init__(
        self,
        instance_id: str,
        execution_id: str,
        name: str,
        input_json: str | None,
        parent_instance_id: str | None,
        start_time: datetime,
        version: str | None = None,
        histories: list[HistoryEvent] | None = None,
    ) -> None:
        self._instance_id = instance_id
        self._execution_id = execution_id
        self._name = name
        self._input_json = input_json
        self._parent_instance_id = parent_instance_id
        self._current_utc_datetime = start_time
        self._version = version
        # The history replayed so far, shared with the executor, which appends to it.
        self._histories: list[HistoryEvent] = histories if histories is not None else []
        self._function_context = FunctionContext()
        # Set by the runtime from the app's registration (see ``_configure``).
        self._input_type: type | None = None
        self._default_version: str | None = None
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

    def create_replay_safe_logger(self, logger: logging.Logger) -> ReplaySafeLogger:
        """``logger`` for orchestrator code: what it logs while replaying is dropped, so each
        record is emitted once, when its code runs for the first time. (The official Python SDK
        has none; its users test ``is_replaying`` themselves.)"""
        return ReplaySafeLogger(logger, self)

    @property
    def current_utc_datetime(self) -> datetime:
        """The time of the current step, the same on every replay."""
        return self._current_utc_datetime

    @property
    def function_name(self) -> str:
        return self._name

    @property
    def version(self) -> str | None:
        """The version the instance was created with (``start_new(version=)``, a
        sub-orchestration's ``version=``, or the creating app's ``defaultVersion``); None if none."""
        return self._version

    @property
    def histories(self) -> list[HistoryEvent]:
        """The history events replayed so far in this step."""
        return self._histories

    @property
    def function_context(self) -> FunctionContext:
        return self._function_context

    @property
    def will_continue_as_new(self) -> bool:
        """True once ``continue_as_new`` has been called in this step."""
        return self._continue_as_new_input is not _NOT_SET

    def _configure(self, input_type: type | None, default_version: str | None) -> None:
        """What the app registered: ``orchestration_trigger(input_type=)`` and the default
        version that sub-orchestrations started without ``version=`` get."""
        self._input_type = input_type
        self._default_version = default_version

    def get_input(self, expected_type: type | None = None) -> Any:
        """The orchestration's input, as ``expected_type`` (or the trigger's ``input_type``)
        when given: a dataclass or a class with ``from_json`` is rebuilt from its JSON, and a
        value of another type is an error (``PayloadError``)."""
        return serialization.decode_as(self._input_json, expected_type or self._input_type)

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

    def call_activity(self, name: str | Any, input_: Any = None, expected_type: type | None = None) -> TaskBase:
        """Run an activity, named or given as its decorated function; ``expected_type`` (or the
        function's return annotation, for a class) is the type its result is decoded as."""
        activity = registered_name(name, ACTIVITY_TRIGGER)
        task_id = self._record(EventType.TASK_SCHEDULED, name=activity, input=serialization.encode(input_))
        return self._open(AtomicTask(task_id, expected_type or result_type(name)))

    def call_activity_with_retry(
        self, name: str | Any, retry_options: RetryOptions, input_: Any = None, expected_type: type | None = None
    ) -> TaskBase:
        expected_type = expected_type or result_type(name)
        activity = registered_name(name, ACTIVITY_TRIGGER)  # a bad name fails here, not at an attempt
        return RetryableTask(self, lambda: self.call_activity(activity, input_, expected_type), retry_options)

    def call_http(
        self,
        method: str,
        uri: str,
        content: Any = None,
        headers: dict[str, str] | None = None,
        token_source: TokenSource | None = None,
        is_raw_str: bool = False,
    ) -> TaskBase:
        """Make an HTTP request (run by the runtime as a built-in activity, never here) and get a
        ``DurableHttpResponse``. ``content`` is sent as JSON, or as it is with ``is_raw_str``. A
        202 answer with a ``Location`` header is polled with GET (durable timers in between,
        ``Retry-After`` honoured) until the answer is not 202."""
        if is_raw_str and not isinstance(content, str):
            raise TypeError("call_http: is_raw_str=True needs str content")
        body = content if is_raw_str or content is None else serialization.encode(content)
        request = DurableHttpRequest.build(method, uri, body, headers, token_source)
        return HttpTask(self, request)

    def _schedule_http(self, request: DurableHttpRequest) -> AtomicTask:
        """One HTTP request, as a call of the built-in HTTP activity (used by ``HttpTask``)."""
        task_id = self._record(EventType.TASK_SCHEDULED, name=HTTP_ACTIVITY_NAME, input=request.to_json())
        return self._open(AtomicTask(task_id))

    def call_sub_orchestrator(
        self,
        name: str | Any,
        input_: Any = None,
        instance_id: str | None = None,
        version: str | None = None,
        expected_type: type | None = None,
    ) -> TaskBase:
        """Run an orchestration (named or given as its decorated function) as a child of this
        one. ``version`` defaults to this app's default version (``host.json``)."""
        expected_type = expected_type or result_type(name)
        name = registered_name(name, ORCHESTRATION_TRIGGER)
        if version is not None and not isinstance(version, str):
            raise OrchestrationApiMisuse(f"a sub-orchestration's version must be a string, got {version!r}")
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
            version=version if version is not None else self._default_version,
        )
        return self._open(AtomicTask(task_id, expected_type))

    def call_sub_orchestrator_with_retry(
        self,
        name: str | Any,
        retry_options: RetryOptions,
        input_: Any = None,
        instance_id: str | None = None,
        version: str | None = None,
        expected_type: type | None = None,
    ) -> TaskBase:
        expected_type = expected_type or result_type(name)
        child = registered_name(name, ORCHESTRATION_TRIGGER)
        return RetryableTask(
            self, lambda: self.call_sub_orchestrator(child, input_, instance_id, version, expected_type), retry_options
        )

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
        """A UUID (as text) that is the same on every replay of this point of the orchestration."""
        return str(self.new_guid())

    def new_guid(self) -> uuid.UUID:
        """A ``uuid.UUID`` that is the same on every replay of this point of the orchestration."""
        name = f"{self._instance_id}_{self._current_utc_datetime.isoformat()}_{self._guid_counter}"
        self._guid_counter += 1
        return uuid.uuid5(uuid.NAMESPACE_URL, name)

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


# The binding types of the official SDK's durable triggers, and their explicit-name parameters.
ACTIVITY_TRIGGER = "activityTrigger"
ORCHESTRATION_TRIGGER = "orchestrationTrigger"
_DURABLE_TRIGGERS = {ACTIVITY_TRIGGER: "activity", ORCHESTRATION_TRIGGER: "orchestrator", "entityTrigger": "entity"}
_NAME_PARAMETERS = {
    ACTIVITY_TRIGGER: "activity",
    ORCHESTRATION_TRIGGER: "orchestration",
    "entityTrigger": "entity_name",
}


def registered_name(target: str | Any, trigger: str) -> str:
    """The name a durable function is registered under, given as such or as the function builder
    its durable decorator returned: the trigger's explicit name (``activity_trigger(activity=)``
    ...), else the function's name (``function_name`` honoured)."""
    what = _DURABLE_TRIGGERS[trigger]
    if isinstance(target, str):
        _check_name(target, what)
        return target
    function = getattr(target, "_function", None)  # the Functions programming model's builder
    if function is None or not callable(getattr(function, "get_trigger", None)):
        raise OrchestrationApiMisuse(
            f"expected the name of an {what} function or the function its durable decorator returned, got {target!r}"
        )
    bound = function.get_trigger()
    kind = getattr(bound, "type", None)
    if kind != trigger:
        actual = (
            f"an {_DURABLE_TRIGGERS[kind]} function" if kind in _DURABLE_TRIGGERS else f"a {kind or 'plain'} function"
        )
        raise OrchestrationApiMisuse(f"{function.get_function_name()} is {actual}, not an {what} function")
    name = getattr(bound, _NAME_PARAMETERS[trigger], None) or function.get_function_name()
    _check_name(name, what)
    return str(name)


def result_type(target: str | Any) -> type | None:
    """The class a durable function's return annotation names (a dataclass or a class with
    ``from_json``), to decode its result as; None for names, builtins and unannotated functions."""
    user_function = getattr(getattr(target, "_function", None), "get_user_function", None)
    if not callable(user_function):
        return None
    try:
        return _annotated_result(user_function())
    except TypeError:  # an unhashable callable: not cached, and not worth inspecting
        return None


@functools.lru_cache(maxsize=1024)  # asked on every call, replays included
def _annotated_result(function: Any) -> type | None:
    try:
        annotation = typing.get_type_hints(function).get("return")
    except Exception:  # unresolvable annotations: no type, as if there were none
        return None
    return annotation if serialization.is_rebuildable(annotation) else None


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
