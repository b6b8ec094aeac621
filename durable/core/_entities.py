"""Durable entities: addressable objects whose operations run one at a time, exactly once and in
order per sender (DESIGN §6, §7).

An entity is an instance with id ``@name@key``. Its committed "history" is a single snapshot event
holding the user state and the scheduler's bookkeeping: the last sequence number applied per
sender (and operations buffered behind a gap), the sequence numbers it used per destination, the
lock holder and the operations waiting for it, and the step's outbox. A step applies a batch of
messages to the snapshot and yields the next one — a pure function, like an orchestration step.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import quote

from . import _serialization as serialization
from ._history import EventType, FailureDetails, HistoryEvent
from ._ids import validate_instance_id
from ._messages import DEDUP_WINDOW, MessageKind, MessageTarget, WorkMessage
from ._status import InstanceRecord, OrchestrationRuntimeStatus

MAX_RECENT_IDS = 500  # ids of unsequenced messages remembered for de-duplication
ENTITY_EXECUTION = "entity"  # entities have one everlasting execution


@dataclass(frozen=True)
class EntityId:
    """Identifies an entity: its name (case-insensitive) and key."""

    name: str
    key: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or "@" in self.name:
            raise ValueError(f"entity name must be a non-empty string without '@', got {self.name!r}")
        if not isinstance(self.key, str) or not self.key:
            raise ValueError(f"entity key must be a non-empty string, got {self.key!r}")
        object.__setattr__(self, "name", self.name.lower())
        validate_instance_id(self.instance_id)

    @property
    def instance_id(self) -> str:
        return f"@{self.name}@{self.key}"

    @classmethod
    def from_instance_id(cls, instance_id: str) -> EntityId:
        if not is_entity_id(instance_id):
            raise ValueError(f"not an entity instance id: {instance_id!r}")
        name, key = instance_id[1:].split("@", 1)
        return cls(name, key)

    def get_entity_id_url_path(self) -> str:
        """The entity's path under the management API: ``entities/{name}/{key}`` (the key
        percent-encoded, so that any key makes one path segment)."""
        return f"entities/{quote(self.name, safe='')}/{quote(self.key, safe='')}"

    # The official SDK's names for the instance-id conversions.
    @staticmethod
    def get_scheduler_id(entity_id: EntityId) -> str:
        return entity_id.instance_id

    @staticmethod
    def get_entity_id(scheduler_id: str) -> EntityId:
        return EntityId.from_instance_id(scheduler_id)

    def __str__(self) -> str:
        return self.instance_id


def is_entity_id(instance_id: str) -> bool:
    return instance_id.startswith("@") and instance_id.find("@", 1) > 1


def as_entity_id(value: EntityId | str) -> EntityId:
    return value if isinstance(value, EntityId) else EntityId.from_instance_id(value)


def lock_owner(instance_id: str, execution_id: str, section_id: int) -> str:
    """Who holds a lock: one critical section (the id of its lock action) of one execution, so
    that a grant or release meant for another execution or section never changes the holder."""
    return f"{instance_id}|{execution_id}|{section_id}"


# -- messages ----------------------------------------------------------------------------------------
@dataclass
class EntityRequest:
    """The payload of an entity message (carried as JSON in the event's ``input``)."""

    # "op", "lock", "release", "delete" or "retire" (the sender sends no more); never a user's
    # name: operations go in ``operation``
    kind: str
    operation: str | None = None
    input: str | None = None  # JSON text
    sender: str | None = None  # sequenced messages: who numbered them
    seq: int | None = None
    owner: str | None = None  # the critical section on whose behalf (see ``lock_owner``)
    reply_to: dict[str, Any] | None = None  # {"instance", "execution", "task"} for calls and lock grants
    lock: list[str] | None = None  # kind "lock": the sorted entity ids; position: the one addressed
    position: int = 0

    def to_json(self) -> str:
        data = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | None) -> EntityRequest:
        try:
            request = cls(**json.loads(text or ""))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"malformed entity message: {exc}") from exc
        if not request.well_formed():
            raise ValueError(f"malformed entity message: {text!r}")
        return request

    def well_formed(self) -> bool:
        optional_str = (self.operation, self.input, self.sender, self.owner)
        return (
            self.kind in ("op", "lock", "release", "delete", "retire")
            and all(value is None or isinstance(value, str) for value in optional_str)
            and (self.seq is None or (isinstance(self.seq, int) and not isinstance(self.seq, bool) and self.seq > 0))
            and (self.sender is None) == (self.seq is None)
            and isinstance(self.position, int)
            and (self.lock is None or (isinstance(self.lock, list) and all(isinstance(e, str) for e in self.lock)))
            and (
                self.reply_to is None
                or (isinstance(self.reply_to, dict) and {"instance", "execution", "task"} <= set(self.reply_to))
            )
        )


def entity_message(
    target: str, request: EntityRequest, timestamp: datetime, message_id: str, visible_at: datetime | None = None
) -> WorkMessage:
    event = HistoryEvent(EventType.ENTITY_MESSAGE, timestamp, name=request.operation or request.kind,
                         input=request.to_json())  # fmt: skip
    return WorkMessage(MessageTarget.ORCHESTRATION, target, event, visible_at=visible_at, id=message_id)


# -- the user-facing context ---------------------------------------------------------------------------
class DurableEntityContext:
    """What an entity function sees for one operation (the official SDK's class of that name)."""

    def __init__(self, entity_id: EntityId, operation: str, input_json: str | None, state: Any, exists: bool) -> None:
        self._entity_id = entity_id
        self._operation = operation
        self._input_json = input_json
        self._state = state
        self._exists = exists
        self._result: Any = None
        self._destruct = False
        self._signals: list[tuple[EntityId, str, Any]] = []

    @property
    def entity_name(self) -> str:
        return self._entity_id.name

    @property
    def entity_key(self) -> str:
        return self._entity_id.key

    @property
    def entity_id(self) -> EntityId:
        return self._entity_id

    @property
    def operation_name(self) -> str:
        return self._operation

    @property
    def is_newly_constructed(self) -> bool:
        return not self._exists

    def get_input(self) -> Any:
        return serialization.decode(self._input_json)

    def get_state(self, initializer: Callable[[], Any] | None = None) -> Any:
        if not self._exists:
            return initializer() if initializer is not None else None
        return self._state

    def set_state(self, state: Any) -> None:
        self._state, self._exists, self._destruct = state, True, False

    def set_result(self, result: Any) -> None:
        self._result = result

    def destruct_on_exit(self) -> None:
        """Delete the entity's state when this operation completes."""
        self._destruct = True

    def signal_entity(self, entity_id: EntityId | str, operation_name: str, operation_input: Any = None) -> None:
        self._signals.append((as_entity_id(entity_id), operation_name, operation_input))


EntityFunction = Callable[[DurableEntityContext], Any]


def class_entity(cls: type) -> EntityFunction:
    """Adapt a class to an entity function: public methods are operations, fields are the state."""

    def run(context: DurableEntityContext) -> None:
        instance = cls()
        state = context.get_state()
        if isinstance(state, dict):
            vars(instance).update(state)
        name = context.operation_name
        method = getattr(instance, name, None)
        if name.startswith("_") or not callable(method):
            raise AttributeError(f"entity {cls.__name__} has no operation '{name}'")
        parameters = inspect.signature(method).parameters
        result = method(context.get_input()) if parameters else method()
        context.set_state(dict(vars(instance)))
        context.set_result(result)

    run.__name__ = cls.__name__
    return run


# -- the step ------------------------------------------------------------------------------------------
@dataclass
class EntitySnapshot:
    state: str | None = None  # JSON text; None: the entity does not exist
    senders: dict[str, int] = field(default_factory=dict)  # last sequence number applied, per sender
    buffered: dict[str, dict[str, str]] = field(default_factory=dict)  # sender -> seq -> message JSON
    outgoing: dict[str, int] = field(default_factory=dict)  # last sequence number used, per destination
    recent: list[str] = field(default_factory=list)  # ids of unsequenced messages already applied
    lock_owner: str | None = None
    waiting: list[str] = field(default_factory=list)  # messages (JSON) queued behind the lock
    outbox: list[str] = field(default_factory=list)  # messages (JSON) of the last step
    created: str | None = None  # when the entity first received a message (ISO time)
    # Tells this incarnation's messages from those of an earlier one purged under the same id:
    # part of the sender identity receivers number messages by.
    incarnation: str | None = None
    # Senders that said they send no more (an ended execution), with when: their counters are
    # gone from ``senders``; a late duplicate of theirs is still dropped for ``DEDUP_WINDOW``.
    retired: dict[str, str] = field(default_factory=dict)

    def to_event(self, timestamp: datetime) -> HistoryEvent:
        meta = {k: v for k, v in dataclasses.asdict(self).items() if k != "state"}
        return HistoryEvent(EventType.ENTITY_STATE, timestamp, input=self.state,
                            result=json.dumps(meta, separators=(",", ":")))  # fmt: skip

    @classmethod
    def from_events(cls, events: Sequence[HistoryEvent]) -> EntitySnapshot:
        if not events:
            return cls()
        event = events[-1]
        return cls(state=event.input, **json.loads(event.result or "{}"))

    def outbox_messages(self) -> list[WorkMessage]:
        return [WorkMessage.from_json(text) for text in self.outbox]

    def record(self, entity: EntityId, checkpoint: int, now: datetime) -> InstanceRecord:
        """The entity's Instances row: Running while it has state (kept in ``Input``, as DTFx
        does), Completed once deleted."""
        exists = self.state is not None
        return InstanceRecord(
            instance_id=entity.instance_id,
            name=entity.name,
            runtime_status=OrchestrationRuntimeStatus.Running if exists else OrchestrationRuntimeStatus.Completed,
            created_time=datetime.fromisoformat(self.created) if self.created else now,
            last_updated_time=now,
            execution_id=ENTITY_EXECUTION,
            input=self.state,
            checkpoint=checkpoint,
        )


@dataclass
class EntityStepResult:
    snapshot: EntitySnapshot
    outbox: list[WorkMessage]
    operations: int  # operations executed


def execute_entity_step(
    resolve: Callable[[str], EntityFunction | None],
    entity_id: EntityId,
    snapshot: EntitySnapshot,
    messages: Sequence[WorkMessage],
    now: datetime,
) -> EntityStepResult:
    """Apply a batch of messages to an entity: de-duplicate, order per sender, honour the lock,
    run operations; every message this produces is in the result's outbox (and the snapshot's)."""
    if snapshot.incarnation is None:
        first = messages[0].id if messages else ""
        snapshot.incarnation = uuid.uuid5(uuid.NAMESPACE_URL, f"{entity_id}/{first}/{now.isoformat()}").hex[:16]
    if snapshot.created is None:
        snapshot.created = now.isoformat()
    horizon = (now - DEDUP_WINDOW).isoformat()
    snapshot.retired = {sender: at for sender, at in snapshot.retired.items() if at >= horizon}
    runner = _EntityRunner(resolve(entity_id.name), entity_id, snapshot, now)
    for message in messages:
        runner.receive(message)
    snapshot.outbox = [m.to_json() for m in runner.outbox]
    return EntityStepResult(snapshot, runner.outbox, runner.operations)


class _EntityRunner:
    def __init__(self, function: EntityFunction | None, entity_id: EntityId, snapshot: EntitySnapshot,
                 now: datetime) -> None:  # fmt: skip
        self.function = function
        self.entity_id = entity_id
        self.s = snapshot
        self.now = now
        self.outbox: list[WorkMessage] = []
        self.operations = 0

    # -- ordering and de-duplication ---------------------------------------------------------------
    def receive(self, message: WorkMessage) -> None:
        try:
            request = EntityRequest.from_json(message.event.input)
        except ValueError:
            return  # unreadable payload: nothing to apply (the worker logs dropped messages)
        if request.sender is None or request.seq is None:
            if message.id in self.s.recent:
                return
            self.s.recent = [*self.s.recent, message.id][-MAX_RECENT_IDS:]
            self.deliver(request, message.id)
            return
        if request.sender in self.s.retired:
            return  # a late duplicate from a sender that has ended
        last = self.s.senders.get(request.sender, 0)
        if request.seq <= last:
            return  # a duplicate of an applied message
        if request.seq > last + 1:  # an earlier message from this sender is still on its way
            self.s.buffered.setdefault(request.sender, {})[str(request.seq)] = _pack(request, message.id)
            return
        self._apply_in_order(request.sender, request, message.id)

    def _apply_in_order(self, sender: str, request: EntityRequest, message_id: str) -> None:
        while True:
            self.s.senders[sender] = request.seq or 0
            self.deliver(request, message_id)
            pending = self.s.buffered.get(sender, {})
            following = pending.pop(str((request.seq or 0) + 1), None)
            if not pending:
                self.s.buffered.pop(sender, None)
            if following is None:
                return
            request, message_id = _unpack(following)

    # -- the lock ----------------------------------------------------------------------------------
    def deliver(self, request: EntityRequest, message_id: str) -> None:
        owner = self.s.lock_owner
        if owner is not None and request.owner != owner and not _sent_by_holder(request, owner):
            self.s.waiting.append(_pack(request, message_id))
            return
        self.execute(request, message_id)

    def execute(self, request: EntityRequest, message_id: str) -> None:
        if request.kind == "lock":
            self._acquire(request)
        elif request.kind == "release":
            if request.owner == self.s.lock_owner:
                self.s.lock_owner = None
                self._serve_waiting()
        elif request.kind == "delete":
            self.s.state = None
        elif request.kind == "retire" and request.sender is not None:
            self.s.senders.pop(request.sender, None)
            self.s.buffered.pop(request.sender, None)
            self.s.retired[request.sender] = self.now.isoformat()
        else:
            self._run_operation(request, message_id)

    def _acquire(self, request: EntityRequest) -> None:
        self.s.lock_owner = request.owner
        lock = request.lock or []
        if request.position + 1 < len(lock):
            forwarded = dataclasses.replace(request, position=request.position + 1)
            self._send(lock[request.position + 1], forwarded)
        else:
            # The grant names the whole lock set, so that whoever receives it can release it all.
            self._reply(request, result=json.dumps(lock), failure=None, name="lock", kind=MessageKind.LOCK_GRANT)

    def _serve_waiting(self) -> None:
        while self.s.waiting and self.s.lock_owner is None:
            request, message_id = _unpack(self.s.waiting.pop(0))
            self.execute(request, message_id)
        # Messages of the new lock holder may be waiting behind others' — its section's, and what
        # its execution sent before the section (they queued behind the previous holder): let
        # them through, in the order they came.
        owner = self.s.lock_owner
        if owner is not None:
            still_waiting = []
            for packed in self.s.waiting:
                request, message_id = _unpack(packed)
                if request.owner == owner or _sent_by_holder(request, owner):
                    self.execute(request, message_id)
                else:
                    still_waiting.append(packed)
            self.s.waiting = still_waiting

    # -- operations ----------------------------------------------------------------------------------
    def _run_operation(self, request: EntityRequest, message_id: str) -> None:
        operation = request.operation or ""
        self.operations += 1
        exists = self.s.state is not None
        state = serialization.decode(self.s.state) if exists else None
        context = DurableEntityContext(self.entity_id, operation, request.input, state, exists)
        failure: FailureDetails | None = None
        result: str | None = None
        try:
            if self.function is None:
                raise LookupError(f"no entity function named '{self.entity_id.name}' is registered")
            returned = self.function(context)
            if inspect.isgenerator(returned) or inspect.iscoroutine(returned):
                raise TypeError("entity functions must be plain functions, not generators or coroutines")
            result = serialization.encode(context._result)
            new_state = None if context._destruct or not context._exists else serialization.encode(context._state)
        except Exception as exc:
            failure = FailureDetails.from_exception(exc)  # the operation's own changes are rolled back
        else:
            self.s.state = new_state
            for target, name, value in context._signals:
                self._send(target.instance_id, EntityRequest("op", operation=name, input=serialization.encode(value)))
        if request.reply_to is not None:
            self._reply(request, result=result, failure=failure, name=operation)

    # -- sending -------------------------------------------------------------------------------------
    def _send(self, target: str, request: EntityRequest) -> None:
        sequence = self.s.outgoing.get(target, 0) + 1
        self.s.outgoing[target] = sequence
        sender = f"{self.entity_id.instance_id}#{self.s.incarnation}"
        request = dataclasses.replace(request, sender=sender, seq=sequence)
        message_id = f"{sender}/to/{target}/{sequence}"
        self.outbox.append(entity_message(target, request, self.now, message_id))

    def _reply(
        self,
        request: EntityRequest,
        result: str | None,
        failure: FailureDetails | None,
        name: str,
        kind: MessageKind | None = None,
    ) -> None:
        reply_to = request.reply_to or {}
        event = HistoryEvent(
            EventType.TASK_FAILED if failure else EventType.TASK_COMPLETED,
            self.now,
            name=name,
            task_scheduled_id=int(reply_to["task"]),
            result=result,
            failure=failure,
        )
        message_id = (
            f"{self.entity_id.instance_id}/reply/{reply_to['instance']}/{reply_to['execution']}/{reply_to['task']}"
        )
        target, execution = reply_to["instance"], reply_to["execution"]
        self.outbox.append(WorkMessage(MessageTarget.ORCHESTRATION, target, event, execution, kind=kind, id=message_id))


def _sent_by_holder(request: EntityRequest, owner: str) -> bool:
    """A message from the execution holding the lock, sent outside its critical section: before
    it (the section's code cannot signal an entity it locked), so it goes first, in its sender's
    order, even when the lock request, travelling from entity to entity, overtook it."""
    return request.sender is not None and request.kind == "op" and owner.rpartition("|")[0] == request.sender


def _pack(request: EntityRequest, message_id: str) -> str:
    return json.dumps({"id": message_id, "request": request.to_json()})


def _unpack(packed: str) -> tuple[EntityRequest, str]:
    data = json.loads(packed)
    return EntityRequest.from_json(data["request"]), data["id"]
