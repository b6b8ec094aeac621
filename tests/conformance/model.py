"""The reference model: what a durable program does when nothing goes wrong.

An interpreter of the high-level semantics of orchestrations, activities and entities (the
paper's model, "Durable Functions: Semantics for Stateful Serverless"), small enough to read in
one sitting and sharing no code with the runtime. The program's own functions run here:
orchestrators (generator functions) against ``ModelContext``, which has the methods of
``durable.DurableOrchestrationContext`` they call; entities against ``ModelEntityContext``
(``durable.DurableEntityContext``'s); activities as they are.

One thing happens at a time, in a fixed order, with no storage, faults, queues or replay:

- ``soon`` is a FIFO of what happens next (an activity runs, a message reaches an entity, an
  orchestration starts or receives an event), taken first in, first out;
- durable timers and scheduled signals wait in a heap by due time (``at``); logical time jumps
  to the next one only when the FIFO is empty;
- an orchestration's generator is advanced as soon as the task it waits for completes, and the
  actions it takes join the FIFO in the order it took them.

Entities apply their messages one at a time in arrival order. A critical section
(``with (yield context.lock([...]))``) locks its entities in sorted order, one after the other;
a locked entity serves only its holder and keeps everyone else's messages waiting, in order.

``run_model`` returns the ``Outcome``: each orchestration's final status and output, each
entity's final state, and how often each activity ran with each input. A program whose outcome
does not depend on the interleaving must produce exactly this on the runtime whatever the faults;
for racy ones (several senders to one entity) ``tests.conformance.check`` compares invariants
that every fault-free run satisfies, with this run as the witness.
"""

from __future__ import annotations

import functools
import heapq
import inspect
import itertools
import json
from collections import Counter, deque
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol

import durable as df

START_TIME = datetime(2026, 1, 1, tzinfo=timezone.utc)
MAX_HAPPENINGS = 200_000  # a program that runs longer than this is a bug in the program


def roundtrip(value: Any) -> Any:
    """A value as it comes back from storage: every payload is JSON."""
    return None if value is None else json.loads(json.dumps(value))


def activity_key(name: str, value: Any) -> tuple[str, str]:
    """How activity runs are counted: by name and input."""
    return name, json.dumps(value, sort_keys=True)


def entity_instance_id(entity: df.EntityId | str) -> str:
    return entity.instance_id if isinstance(entity, df.EntityId) else df.EntityId.from_instance_id(entity).instance_id


class Registry(Protocol):
    """What the model needs of an app (``df.DFApp().durable_functions``)."""

    orchestrators: dict[str, Callable[..., Any]]
    activities: Any  # name -> an object with ``function`` and ``input_name``
    entities: dict[str, Callable[..., Any]]


# -- outcome ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Final:
    """Where an orchestration ended: ``Completed`` (with ``output``), ``Failed`` (with the error
    type), ``Terminated`` (with the reason as ``output``), or ``Running`` (waiting for something
    that never came)."""

    status: str
    output: Any = None
    error: str | None = None
    name: str = ""  # the orchestrator


@dataclass
class Outcome:
    orchestrations: dict[str, Final] = field(default_factory=dict)
    entities: dict[str, Any] = field(default_factory=dict)  # '@name@key' -> state; absent: no state
    activity_runs: Counter[tuple[str, str]] = field(default_factory=Counter)


# -- tasks ----------------------------------------------------------------------------------------------
class Task:
    """What orchestrator code yields: completes once, with a value or a ``df.TaskFailedError``."""

    def __init__(self) -> None:
        self.is_completed = False
        self.is_faulted = False
        self.result: Any = None
        self.exception: BaseException | None = None
        self._listeners: list[Callable[[Task], None]] = []

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        if self.is_completed:
            return
        self.is_completed, self.is_faulted = True, error is not None
        self.result, self.exception = result, error
        for listener in self._listeners:
            listener(self)

    def on_finish(self, listener: Callable[[Task], None]) -> None:
        if self.is_completed:
            listener(self)
        else:
            self._listeners.append(listener)


class Timer(Task):
    def __init__(self) -> None:
        super().__init__()
        self.is_cancelled = False

    def cancel(self) -> None:
        self.is_cancelled = True


def all_of(tasks: Sequence[Task]) -> Task:
    """Succeeds with every result once all have; fails with the first failure to come."""
    done = Task()

    def check(child: Task) -> None:
        if child.is_faulted:
            done.finish(error=child.exception)
        elif all(t.is_completed for t in tasks):
            done.finish([t.result for t in tasks])

    if not tasks:
        done.finish([])
    for task in tasks:
        task.on_finish(check)
    return done


def any_of(tasks: Sequence[Task]) -> Task:
    """Succeeds with the first task to complete, however it completed."""
    done = Task()
    for task in tasks:
        task.on_finish(done.finish)
    return done


def failure(kind: str, name: str, exc: BaseException | df.FailureDetails) -> df.TaskFailedError:
    details = exc if isinstance(exc, df.FailureDetails) else df.FailureDetails(type(exc).__name__, str(exc))
    return df.TaskFailedError(f"{kind} '{name}' failed: {details.error_type}: {details.message}", details)


# -- orchestrations ---------------------------------------------------------------------------------------
class ModelContext:
    """One execution of an orchestration, seen from its code (``df.DurableOrchestrationContext``)."""

    def __init__(self, orchestration: Orchestration, input_: Any, execution: int) -> None:
        self._orchestration = orchestration
        self._execution = execution
        self._model = orchestration.model
        self._input = input_
        self._continue_input: Any = None
        self._continued = False
        self._waiters: dict[str, deque[Task]] = {}
        self._section: tuple[str, list[str]] | None = None  # (owner, entities) of the critical section
        self._sections = itertools.count()
        self.custom_status: Any = None

    @property
    def instance_id(self) -> str:
        return self._orchestration.instance_id

    @property
    def parent_instance_id(self) -> str | None:
        return self._orchestration.parent_id

    @property
    def current_utc_datetime(self) -> datetime:
        return self._model.now

    @property
    def is_replaying(self) -> bool:
        return False

    def get_input(self) -> Any:
        return roundtrip(self._input)

    def set_custom_status(self, status: Any) -> None:
        self.custom_status = status

    def continue_as_new(self, input_: Any) -> None:
        self._continue_input, self._continued = input_, True

    # activities, sub-orchestrations, timers, events
    def call_activity(self, name: str, input_: Any = None) -> Task:
        task = Task()
        self._model.soon(lambda: self._model.run_activity(name, input_, task))
        return task

    def call_activity_with_retry(self, name: str, retry_options: df.RetryOptions, input_: Any = None) -> Task:
        return self._with_retry(lambda: self.call_activity(name, input_), retry_options)

    def call_sub_orchestrator(self, name: str, input_: Any = None, instance_id: str | None = None) -> Task:
        if instance_id is None:
            raise ValueError("the model needs sub-orchestrations to have explicit instance ids")
        task = Task()
        parent = self.instance_id
        self._model.soon(lambda: self._model.start(name, instance_id, input_, task, parent))
        return task

    def call_sub_orchestrator_with_retry(
        self, name: str, retry_options: df.RetryOptions, input_: Any = None, instance_id: str | None = None
    ) -> Task:
        return self._with_retry(lambda: self.call_sub_orchestrator(name, input_, instance_id), retry_options)

    def _with_retry(self, attempt: Callable[[], Task], options: df.RetryOptions) -> Task:
        """Attempt n waits first_retry_interval * backoff_coefficient**(n-1) after failing."""
        done = Task()
        attempts = 0

        def start() -> None:
            nonlocal attempts
            attempts += 1
            attempt().on_finish(finished)

        def finished(task: Task) -> None:
            if not task.is_faulted:
                done.finish(task.result)
            elif attempts >= options.max_number_of_attempts:
                done.finish(error=task.exception)
            else:
                delay = options.first_retry_interval_in_milliseconds * options.backoff_coefficient ** (attempts - 1)
                if options.max_retry_interval_in_milliseconds is not None:
                    delay = min(delay, options.max_retry_interval_in_milliseconds)
                self.create_timer(self._model.now + timedelta(milliseconds=delay)).on_finish(lambda _: start())

        start()
        return done

    def create_timer(self, fire_at: datetime) -> Timer:
        timer = Timer()
        self._model.at(fire_at, lambda: None if timer.is_cancelled else timer.finish(None))
        return timer

    def wait_for_external_event(self, name: str) -> Task:
        task = Task()
        buffered = self._orchestration.buffered.get(name.casefold())
        if buffered:
            task.finish(buffered.popleft())
        else:
            self._waiters.setdefault(name.casefold(), deque()).append(task)
        return task

    def task_all(self, tasks: Sequence[Task]) -> Task:
        return all_of(tasks)

    def task_any(self, tasks: Sequence[Task]) -> Task:
        return any_of(tasks)

    # entities and critical sections
    def signal_entity(
        self,
        entityId: df.EntityId | str,  # the official SDK's parameter names
        operationName: str,
        operationInput: Any = None,
        scheduled_time: datetime | None = None,
    ) -> None:
        message = EntityMessage("op", operationName, operationInput)
        self._model.send(entity_instance_id(entityId), message, scheduled_time)

    def call_entity(
        self,
        entityId: df.EntityId | str,
        operationName: str,
        operationInput: Any = None,
    ) -> Task:
        target = entity_instance_id(entityId)
        task = Task()
        owner = self._section[0] if self._section and target in self._section[1] else None
        self._model.send(target, EntityMessage("op", operationName, operationInput, task, owner))
        return task

    def lock(self, entities: Sequence[df.EntityId | str]) -> Task:
        ids = sorted({entity_instance_id(e) for e in entities})
        owner = f"{self.instance_id}/{self._execution}/{next(self._sections)}"
        granted = Task()
        granted.on_finish(lambda _: setattr(self, "_section", (owner, ids)))
        self._model.send(ids[0], EntityMessage("lock", owner=owner, reply=granted, lock=tuple(ids)))
        section = Task()
        granted.on_finish(lambda _: section.finish(CriticalSection(self)))
        return section

    def _release(self) -> None:
        if self._section is not None:
            owner, ids = self._section
            self._section = None
            for target in ids:
                self._model.send(target, EntityMessage("release", owner=owner))


class CriticalSection:
    def __init__(self, context: ModelContext) -> None:
        self._context = context

    def __enter__(self) -> CriticalSection:
        return self

    def __exit__(self, *exc: object) -> None:
        self._context._release()


class Orchestration:
    """An orchestration instance: its executions one after the other (continue-as-new)."""

    def __init__(self, model: Model, name: str, instance_id: str, parent: Task | None, parent_id: str | None) -> None:
        self.model, self.name, self.instance_id = model, name, instance_id
        self.parent, self.parent_id = parent, parent_id
        self.final = Final("Running", name=name)
        self.buffered: dict[str, deque[Any]] = {}  # events received and not consumed yet (carried over)
        self.context: ModelContext | None = None
        self.generator: Generator[Any, Any, Any] | None = None
        self._executions = itertools.count()

    def run_execution(self, input_: Any) -> None:
        context = self.context = ModelContext(self, input_, next(self._executions))
        try:
            returned = self.model.registry.orchestrators[self.name](context)
        except Exception as exc:
            self._fail(exc)
            return
        if not inspect.isgenerator(returned):
            self._end(returned)
            return
        self.generator = returned
        self._advance(context, None, None)

    def _advance(self, context: ModelContext, value: Any, error: BaseException | None) -> None:
        """Run the code until it waits for a task that has not completed (or it ends)."""
        if context is not self.context or self.generator is None:
            return  # an answer for an execution that has ended
        while True:
            try:
                yielded = self.generator.throw(error) if error is not None else self.generator.send(value)
            except StopIteration as stop:
                self._end(stop.value)
                return
            except Exception as exc:
                self._fail(exc)
                return
            if not isinstance(yielded, Task):
                self._fail(TypeError(f"orchestrator yielded {type(yielded).__name__}"))
                return
            if not yielded.is_completed:
                yielded.on_finish(lambda task: self._advance(context, task.result, task.exception))
                return
            value, error = yielded.result, yielded.exception

    def deliver_event(self, name: str, value: Any) -> None:
        if self.final.status != "Running" or self.context is None:
            return  # a finished instance takes no more events
        waiters = self.context._waiters.get(name.casefold())
        if waiters:
            waiters.popleft().finish(roundtrip(value))
        else:
            self.buffered.setdefault(name.casefold(), deque()).append(roundtrip(value))

    def terminate(self, reason: Any) -> None:
        if self.final.status != "Running":
            return  # a finished instance is not terminated
        if self.context is not None:
            self.context._release()
        if self.generator is not None:
            self.generator.close()
        self.generator = None
        self.final = Final("Terminated", roundtrip(reason), name=self.name)
        if self.parent is not None:
            self.parent.finish(error=failure("sub-orchestration", self.name, df.FailureDetails("Terminated", "")))

    def _end(self, value: Any) -> None:
        context = self.context
        assert context is not None
        context._release()  # an ending execution leaves its critical section
        self.generator = None
        if context._continued:
            self.run_execution(roundtrip(context._continue_input))
            return
        self.final = Final("Completed", roundtrip(value), name=self.name)
        if self.parent is not None:
            self.parent.finish(self.final.output)

    def _fail(self, exc: BaseException) -> None:
        if self.context is not None:
            self.context._release()
        self.generator = None
        self.final = Final("Failed", error=type(exc).__name__, name=self.name)
        if self.parent is not None:
            self.parent.finish(error=failure("sub-orchestration", self.name, exc))


# -- entities ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EntityMessage:
    kind: str  # "op", "lock" or "release"
    operation: str = ""
    input: Any = None
    reply: Task | None = None
    owner: str | None = None  # the critical section it belongs to
    lock: tuple[str, ...] = ()  # "lock": the sorted lock set, of which this message is for ``position``
    position: int = 0


class ModelEntityContext:
    """One operation on an entity, seen from its code (``df.DurableEntityContext``)."""

    def __init__(self, entity: Entity, operation: str, input_: Any) -> None:
        self._entity_id = df.EntityId.from_instance_id(entity.instance_id)
        self.operation_name = operation
        self._input = input_
        self._exists, self._state = entity.exists, roundtrip(entity.state)
        self._result: Any = None
        self._destruct = False
        self._signals: list[tuple[str, str, Any]] = []

    @property
    def entity_name(self) -> str:
        return self._entity_id.name

    @property
    def entity_key(self) -> str:
        return self._entity_id.key

    @property
    def is_newly_constructed(self) -> bool:
        return not self._exists

    def get_input(self) -> Any:
        return roundtrip(self._input)

    def get_state(self, initializer: Callable[[], Any] | None = None) -> Any:
        if not self._exists:
            return initializer() if initializer is not None else None
        return self._state

    def set_state(self, state: Any) -> None:
        self._state, self._exists, self._destruct = state, True, False

    def set_result(self, result: Any) -> None:
        self._result = result

    def destruct_on_exit(self) -> None:
        self._destruct = True

    def signal_entity(self, entity_id: df.EntityId | str, operation_name: str, operation_input: Any = None) -> None:
        self._signals.append((entity_instance_id(entity_id), operation_name, operation_input))


class Entity:
    def __init__(self, model: Model, instance_id: str) -> None:
        self.model, self.instance_id = model, instance_id
        self.exists, self.state = False, None
        self.holder: str | None = None  # the critical section that holds the lock
        self.waiting: list[EntityMessage] = []  # messages held back by someone else's lock, in order

    def receive(self, message: EntityMessage) -> None:
        if self.holder is not None and message.owner != self.holder:
            self.waiting.append(message)
        elif message.kind == "lock":
            self.holder = message.owner
            if message.position + 1 < len(message.lock):
                self.model.send(message.lock[message.position + 1], replace(message, position=message.position + 1))
            elif message.reply is not None:
                message.reply.finish(None)
        elif message.kind == "release":
            self.holder = None
            waiting, self.waiting = self.waiting, []
            for held in waiting:
                self.receive(held)
        else:
            self._operate(message)

    def _operate(self, message: EntityMessage) -> None:
        context = ModelEntityContext(self, message.operation, roundtrip(message.input))
        name = context.entity_name
        try:
            self.model.registry.entities[name](context)
            result = roundtrip(context._result)
            state = None if context._destruct or not context._exists else roundtrip(context._state)
        except Exception as exc:  # the operation's changes are rolled back
            if message.reply is not None:
                message.reply.finish(error=failure("entity operation", message.operation, exc))
            return
        self.exists, self.state = state is not None, state
        for target, operation, value in context._signals:
            self.model.send(target, EntityMessage("op", operation, value))
        if message.reply is not None:
            message.reply.finish(result)


# -- the scheduler -------------------------------------------------------------------------------------
class Model:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.now = START_TIME
        self._fifo: deque[Callable[[], None]] = deque()
        self._timers: list[tuple[datetime, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self.orchestrations: dict[str, Orchestration] = {}
        self.entities: dict[str, Entity] = {}
        self.activity_runs: Counter[tuple[str, str]] = Counter()

    def soon(self, happening: Callable[[], None]) -> None:
        self._fifo.append(happening)

    def at(self, when: datetime, happening: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (max(when, self.now), next(self._order), happening))

    def run(self) -> None:
        for _ in range(MAX_HAPPENINGS):
            if self._fifo:
                self._fifo.popleft()()
            elif self._timers:
                when, _, happening = heapq.heappop(self._timers)
                self.now = when
                happening()
            else:
                return
        raise RuntimeError(f"the program did not finish within {MAX_HAPPENINGS} steps")

    def start(self, name: str, instance_id: str, input_: Any, parent: Task | None, parent_id: str | None) -> None:
        existing = self.orchestrations.get(instance_id)
        if existing is not None and existing.final.status == "Running":
            return  # a start for a running instance is refused
        orchestration = Orchestration(self, name, instance_id, parent, parent_id)
        self.orchestrations[instance_id] = orchestration  # a finished one is replaced (restarted)
        orchestration.run_execution(roundtrip(input_))

    def raise_event(self, instance_id: str, name: str, value: Any) -> None:
        orchestration = self.orchestrations.get(instance_id)
        if orchestration is not None:
            orchestration.deliver_event(name, value)

    def terminate(self, instance_id: str, reason: Any) -> None:
        orchestration = self.orchestrations.get(instance_id)
        if orchestration is not None:
            orchestration.terminate(reason)

    def run_activity(self, name: str, input_: Any, task: Task) -> None:
        self.activity_runs[activity_key(name, roundtrip(input_))] += 1
        activity = self.registry.activities[name]
        try:
            value = _run_to_end(activity.function(**{activity.input_name: roundtrip(input_)}))
        except Exception as exc:
            task.finish(error=failure("activity", name, exc))
        else:
            task.finish(roundtrip(value))

    def send(self, target: str, message: EntityMessage, scheduled_time: datetime | None = None) -> None:
        entity = self.entities.get(target) or self.entities.setdefault(target, Entity(self, target))
        if scheduled_time is None:
            self.soon(lambda: entity.receive(message))
        else:
            self.at(scheduled_time, lambda: entity.receive(message))

    def outcome(self) -> Outcome:
        return Outcome(
            orchestrations={i: o.final for i, o in self.orchestrations.items()},
            entities={i: e.state for i, e in self.entities.items() if e.exists},
            activity_runs=Counter(self.activity_runs),
        )


def _run_to_end(value: Any) -> Any:
    """The value of an activity: async activities that never suspend are run to their end."""
    if not inspect.iscoroutine(value):
        return value
    try:
        value.send(None)
    except StopIteration as stop:
        return stop.value
    value.close()
    raise RuntimeError("the model runs activities without an event loop: they must not await anything")


@dataclass(frozen=True)
class Start:
    """An orchestration the driver starts (``client.start_new``)."""

    orchestrator: str
    instance_id: str
    input: Any = None


@dataclass(frozen=True)
class RaiseEvent:
    """An event the driver raises (``client.raise_event``), after ``at_tick`` scheduler steps of
    the simulation (the model raises it after every start: events are buffered until wanted)."""

    instance_id: str
    name: str
    value: Any = None
    at_tick: int = 0


@dataclass(frozen=True)
class Terminate:
    """The driver terminates an instance (``client.terminate``) after ``at_tick`` scheduler steps.
    The model terminates it after the events: programs target only instances that wait from
    their start for an event nobody raises, whose outcome then does not depend on when."""

    instance_id: str
    reason: str
    at_tick: int = 0


@dataclass(frozen=True)
class Suspend:
    """The driver suspends an instance (``client.suspend``) after ``at_tick`` steps and resumes it
    (``client.resume``) once its status says Suspended: a pause, which changes no outcome."""

    instance_id: str
    at_tick: int = 0


@dataclass(frozen=True)
class ClientSignal:
    """A signal the driver sends to an entity (``client.signal_entity``) right after the starts."""

    entity: str  # '@name@key'
    operation: str
    input: Any = None


def run_model(
    registry: Registry,
    starts: Sequence[Start],
    events: Sequence[RaiseEvent] = (),
    signals: Sequence[ClientSignal] = (),
    terminations: Sequence[Terminate] = (),
) -> Outcome:
    """Run a program fault-free: start the orchestrations, send the signals, raise the events and
    terminate, in that order, then let everything happen."""
    model = Model(registry)
    for start in starts:
        model.soon(functools.partial(model.start, start.orchestrator, start.instance_id, start.input, None, None))
    for signal in signals:
        model.send(signal.entity, EntityMessage("op", signal.operation, signal.input))
    for event in events:
        model.soon(functools.partial(model.raise_event, event.instance_id, event.name, event.value))
    for termination in terminations:
        model.soon(functools.partial(model.terminate, termination.instance_id, termination.reason))
    model.run()
    return model.outcome()
