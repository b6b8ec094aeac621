"""Generated durable programs: a seed makes a ``Program`` (plain data), ``build_app`` turns it into
an app written against the real user API (``df.DFApp`` and its decorators).

A program is orchestrators (each a list of operations, run for one or more executions chained by
``continue_as_new``), the instances the driver starts, the events it raises and the signals it
sends. Its functions are fixed:

- activity ``work([tag, x])``: ``2x + 1``, or a ``ValueError`` when ``x % 5 == 0`` (failures are
  deterministic by input, so a retried failure fails again);
- entity ``counter``: ``add`` (returns the new value), ``get``, ``delete`` (``destruct_on_exit``),
  ``fail`` (changes its state, then raises: rolled back), ``forward([key, x])`` (signals
  ``add x`` to another counter);
- entity ``journal``: ``append`` an entry, ``get``;
- entity ``account`` (balance 100 to start): ``balance``, ``deposit``, ``withdraw`` (raises when
  the balance is short).

Operations are dataclasses; each returns a JSON value into the execution's trace, and an
orchestration's output is the list of its executions' traces. Entity keys containing ``{me}``
are private to one execution (``instance.g<execution>``), so what it reads from them does not
depend on anyone else; shared entities (``counter@c0``, ``journal@j0``, ``account@a0``) get only
operations whose effect commutes (``add``), is checked per sender (``append``), or happens under
a lock (transfers) — a read of a shared value is marked ``racy`` and compared as a wildcard.

The same seed always makes the same program; ``repr(program)`` is Python that rebuilds it
(regression tests spell programs out that way).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol, Union

import durable as df

from .model import ClientSignal, Outcome, RaiseEvent, Start, Suspend, Terminate, activity_key, run_model

DAY = 86_400
EVENT_TIMEOUT = DAY  # far beyond any delay the injected faults add (minutes), so the outcome is unique
RACE_TIMER = 2 * DAY
INITIAL_BALANCE = 100


# -- operations -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Activity:
    """``work([tag, x])``, through ``call_activity_with_retry`` when ``attempts`` > 1."""

    x: int
    attempts: int = 1


@dataclass(frozen=True)
class FanOut:
    """``task_all`` over ``work`` activities."""

    xs: tuple[int, ...]


@dataclass(frozen=True)
class Sub:
    """A sub-orchestration with the id ``<me>.s<index>``, retried when ``attempts`` > 1 (a failed
    child is then restarted under the same id)."""

    orchestrator: str
    attempts: int = 1


@dataclass(frozen=True)
class Sleep:
    seconds: int


@dataclass(frozen=True)
class WaitEvent:
    """``wait_for_external_event('<name>.g<execution>')``; with a timeout, raced against a timer."""

    name: str
    timeout: int = 0


@dataclass(frozen=True)
class Race:
    """``task_any`` of a ``work`` activity and a timer (two days), which is cancelled when it loses."""

    x: int
    timer: int = RACE_TIMER  # seconds; long enough that the activity always wins


@dataclass(frozen=True)
class Unawaited:
    """Work the code starts and never waits for — a ``work`` activity, a 30-second timer, a
    sub-orchestration (``orchestrator``, id ``<me>.u<index>``) or an ``add x`` call to this
    execution's own counter: its answer reaches an execution that may have moved on (continued
    as new, finished)."""

    x: int
    kind: str = "activity"  # "activity", "timer", "sub" or "call"
    orchestrator: str = ""


@dataclass(frozen=True)
class Signal:
    entity: str  # 'name@key'; '{me}' in the key: this execution's own entity
    operation: str
    input: Any = None
    delay: int = 0  # seconds: a scheduled signal


@dataclass(frozen=True)
class Call:
    entity: str
    operation: str
    input: Any = None
    racy: bool = False  # the result depends on other senders: traced as ['racy', result]


@dataclass(frozen=True)
class Append:
    """Append this execution's next entry ``[me, k]`` to a journal, by call or by signal."""

    journal: str
    call: bool = False


@dataclass(frozen=True)
class Section:
    """``with (yield context.lock(journals))``: append ``[me, 'enter<i>']`` to each, run the body
    (activities, sleeps, appends to the locked journals), append ``[me, 'exit<i>']`` to each."""

    journals: tuple[str, ...]
    body: tuple[Op, ...] = ()


@dataclass(frozen=True)
class Transfer:
    """In a critical section on both accounts: move min(balance, amount) from source to target
    (withdraw and deposit one after the other, or in parallel)."""

    source: str
    target: str
    amount: int
    parallel: bool = False


@dataclass(frozen=True)
class Fail:
    """Raise an uncaught ``ValueError``: the orchestration fails."""


Op = Union[  # noqa: UP007
    Activity, FanOut, Sub, Sleep, WaitEvent, Race, Unawaited, Signal, Call, Append, Section, Transfer, Fail
]


@dataclass(frozen=True)
class Orchestrator:
    name: str
    body: tuple[Op, ...]
    generations: int = 1  # executions, chained by continue_as_new


@dataclass(frozen=True)
class Program:
    orchestrators: tuple[Orchestrator, ...]
    starts: tuple[Start, ...]
    events: tuple[RaiseEvent, ...] = ()
    signals: tuple[ClientSignal, ...] = ()
    terminations: tuple[Terminate, ...] = ()
    suspensions: tuple[Suspend, ...] = ()

    def orchestrator(self, name: str) -> Orchestrator:
        return next(o for o in self.orchestrators if o.name == name)

    def size(self) -> int:
        """Operations, executions, starts, events and signals: what shrinking makes smaller."""

        def ops(body: Sequence[Op]) -> int:
            return sum(1 + (ops(op.body) if isinstance(op, Section) else 0) for op in body)

        return (
            sum(ops(o.body) + o.generations for o in self.orchestrators)
            + len(self.starts)
            + len(self.events)
            + len(self.signals)
            + len(self.terminations)
            + len(self.suspensions)
        )


def start_input() -> dict[str, Any]:
    """Every orchestration's input: its execution number and the traces of the earlier ones."""
    return {"gen": 0, "acc": []}


# -- the app --------------------------------------------------------------------------------------------
class Context(Protocol):
    """What the generated orchestrators use of ``df.DurableOrchestrationContext`` (the reference
    model's ``ModelContext`` has the same)."""

    @property
    def instance_id(self) -> str: ...

    @property
    def current_utc_datetime(self) -> datetime: ...

    def get_input(self) -> Any: ...

    def call_activity(self, name: str, input_: Any = None, /) -> Any: ...

    def call_activity_with_retry(self, name: str, retry_options: df.RetryOptions, input_: Any = None, /) -> Any: ...

    def call_sub_orchestrator(self, name: str, input_: Any = None, instance_id: str | None = None, /) -> Any: ...

    def call_sub_orchestrator_with_retry(
        self, name: str, retry_options: df.RetryOptions, input_: Any = None, instance_id: str | None = None, /
    ) -> Any: ...

    def create_timer(self, fire_at: datetime, /) -> Any: ...

    def wait_for_external_event(self, name: str, /) -> Any: ...

    def task_all(self, tasks: Sequence[Any], /) -> Any: ...

    def task_any(self, tasks: Sequence[Any], /) -> Any: ...

    def continue_as_new(self, input_: Any, /) -> None: ...

    def signal_entity(
        self, entity: df.EntityId, operation: str, value: Any = None, scheduled_time: datetime | None = None, /
    ) -> None: ...

    def call_entity(self, entity: df.EntityId, operation: str, value: Any = None, /) -> Any: ...

    def lock(self, entities: Sequence[df.EntityId], /) -> Any: ...


class EntityContext(Protocol):
    """What the generated entities use of ``df.DurableEntityContext``."""

    @property
    def operation_name(self) -> str: ...

    def get_input(self) -> Any: ...

    def get_state(self, initializer: Callable[[], Any] | None = None, /) -> Any: ...

    def set_state(self, state: Any, /) -> None: ...

    def set_result(self, result: Any, /) -> None: ...

    def destruct_on_exit(self) -> None: ...

    def signal_entity(self, entity: df.EntityId, operation: str, value: Any = None, /) -> None: ...


def retry(attempts: int) -> df.RetryOptions:
    return df.RetryOptions(first_retry_interval_in_milliseconds=1000, max_number_of_attempts=attempts,
                           backoff_coefficient=2.0)  # fmt: skip


class _Execution:
    """One execution of a generated orchestrator: runs its operations against the context."""

    def __init__(self, context: Context, generation: int) -> None:
        self.context = context
        self.generation = generation
        self.me = f"{context.instance_id}.g{generation}"
        self.entries = 0

    def entity(self, reference: str) -> df.EntityId:
        name, key = reference.split("@", 1)
        return df.EntityId(name, key.replace("{me}", self.me))

    def after(self, seconds: int) -> datetime:
        return self.context.current_utc_datetime + timedelta(seconds=seconds)

    def run(self, index: str, op: Op) -> Generator[Any, Any, Any]:
        ctx, tag = self.context, f"{self.me}/{index}"
        try:
            if isinstance(op, Activity):
                if op.attempts > 1:
                    return (yield ctx.call_activity_with_retry("work", retry(op.attempts), [tag, op.x]))
                return (yield ctx.call_activity("work", [tag, op.x]))
            if isinstance(op, FanOut):
                return (yield ctx.task_all([ctx.call_activity("work", [f"{tag}/{j}", x]) for j, x in enumerate(op.xs)]))
            if isinstance(op, Sub):
                child, child_input = f"{self.me}.s{index}", start_input()
                if op.attempts > 1:
                    task = ctx.call_sub_orchestrator_with_retry(op.orchestrator, retry(op.attempts), child_input, child)
                else:
                    task = ctx.call_sub_orchestrator(op.orchestrator, child_input, child)
                return ["sub", (yield task)]
            if isinstance(op, Sleep):
                yield ctx.create_timer(self.after(op.seconds))
                return "slept"
            if isinstance(op, WaitEvent):
                event = ctx.wait_for_external_event(f"{op.name}.g{self.generation}")
                if not op.timeout:
                    return (yield event)
                timer = ctx.create_timer(self.after(op.timeout))
                if (yield ctx.task_any([event, timer])) is timer:
                    return "timeout"
                timer.cancel()
                return event.result
            if isinstance(op, Race):
                work = ctx.call_activity("work", [tag, op.x])
                timer = ctx.create_timer(self.after(op.timer))
                if (yield ctx.task_any([work, timer])) is timer:
                    return "timeout"
                timer.cancel()
                return ["won-err", work.exception.error_type] if work.is_faulted else ["won", work.result]
            if isinstance(op, Unawaited):
                if op.kind == "timer":
                    ctx.create_timer(self.after(30))
                elif op.kind == "sub":
                    ctx.call_sub_orchestrator(op.orchestrator, start_input(), f"{self.me}.u{index}")
                elif op.kind == "call":
                    ctx.call_entity(self.entity("counter@{me}"), "add", op.x)
                else:
                    ctx.call_activity("work", [tag, op.x])
                return None
            if isinstance(op, Signal):
                when = self.after(op.delay) if op.delay else None
                ctx.signal_entity(self.entity(op.entity), op.operation, op.input, when)
                return None
            if isinstance(op, Call):
                result = yield ctx.call_entity(self.entity(op.entity), op.operation, op.input)
                return ["racy", result] if op.racy else result
            if isinstance(op, Append):
                self.entries += 1
                if op.call:
                    yield ctx.call_entity(self.entity(op.journal), "append", [self.me, self.entries])
                else:
                    ctx.signal_entity(self.entity(op.journal), "append", [self.me, self.entries])
                return None
            if isinstance(op, Section):
                journals = [self.entity(j) for j in op.journals]
                results = []
                with (yield ctx.lock(journals)):
                    for journal in journals:
                        yield ctx.call_entity(journal, "append", [self.me, f"enter{index}"])
                    for inner_index, inner in enumerate(op.body):
                        results.append((yield from self.run(f"{index}.{inner_index}", inner)))
                    for journal in journals:
                        yield ctx.call_entity(journal, "append", [self.me, f"exit{index}"])
                return ["section", results]
            if isinstance(op, Transfer):
                source, target = self.entity(op.source), self.entity(op.target)
                with (yield ctx.lock([source, target])):
                    amount = min((yield ctx.call_entity(source, "balance")), op.amount)
                    if amount > 0 and op.parallel:
                        yield ctx.task_all(
                            [ctx.call_entity(source, "withdraw", amount), ctx.call_entity(target, "deposit", amount)]
                        )
                    elif amount > 0:
                        yield ctx.call_entity(source, "withdraw", amount)
                        yield ctx.call_entity(target, "deposit", amount)
                return ["racy", ["transfer", source.instance_id, target.instance_id, amount]]
            if isinstance(op, Fail):
                raise ValueError(f"{tag} fails")
            raise TypeError(f"unknown operation {op!r}")
        except df.TaskFailedError as error:
            return ["err", error.error_type]


def orchestrator_function(spec: Orchestrator) -> Callable[[Context], Generator[Any, Any, Any]]:
    def orchestrator(context: Context) -> Generator[Any, Any, Any]:
        state = context.get_input()
        execution = _Execution(context, state["gen"])
        trace = []
        for index, op in enumerate(spec.body):
            trace.append((yield from execution.run(str(index), op)))
        traces = [*state["acc"], trace]
        if state["gen"] + 1 < spec.generations:
            context.continue_as_new({"gen": state["gen"] + 1, "acc": traces})
            return None
        return traces

    orchestrator.__name__ = spec.name
    return orchestrator


@dataclass
class BuiltProgram:
    program: Program
    app: df.DFApp
    activity_runs: Counter[tuple[str, str]] = field(default_factory=Counter)  # by the work activity itself


def build_app(program: Program, on_work: Callable[[tuple[str, str]], None] | None = None) -> BuiltProgram:
    """The program's app; ``on_work`` is told of each run of ``work`` too (by its activity key),
    where runs must be counted across processes."""
    app = df.DFApp()
    built = BuiltProgram(program, app)

    @app.activity_trigger(input_name="payload", activity="work")
    async def work(payload: list[Any]) -> int:
        key = activity_key("work", payload)
        built.activity_runs[key] += 1
        if on_work is not None:
            on_work(key)
        x = payload[1]
        if x % 5 == 0:
            raise ValueError(f"work {x} fails")
        return int(x) * 2 + 1

    @app.entity_trigger(context_name="context", entity_name="counter")
    def counter(context: EntityContext) -> None:
        value = context.get_state(lambda: 0)
        operation = context.operation_name
        if operation == "add":
            value += context.get_input()
            context.set_result(value)
        elif operation == "get":
            context.set_result(value)
        elif operation == "delete":
            context.destruct_on_exit()
            return
        elif operation == "fail":
            context.set_state(value + 1000)
            raise ValueError("the counter refuses")
        elif operation == "forward":
            key, amount = context.get_input()
            context.signal_entity(df.EntityId("counter", key), "add", amount)
        context.set_state(value)

    @app.entity_trigger(context_name="context", entity_name="journal")
    def journal(context: EntityContext) -> None:
        entries = context.get_state(list)
        if context.operation_name == "append":
            entries.append(context.get_input())
        elif context.operation_name == "get":
            context.set_result(entries)
        context.set_state(entries)

    @app.entity_trigger(context_name="context", entity_name="account")
    def account(context: EntityContext) -> None:
        balance = context.get_state(lambda: INITIAL_BALANCE)
        operation = context.operation_name
        if operation == "balance":
            context.set_result(balance)
        elif operation == "deposit":
            balance += context.get_input()
        elif operation == "withdraw":
            amount = context.get_input()
            if amount > balance:
                raise ValueError(f"balance {balance} is short of {amount}")
            balance -= amount
        context.set_state(balance)

    for spec in program.orchestrators:
        app.orchestration_trigger(context_name="context", orchestration=spec.name)(orchestrator_function(spec))
    return built


def fault_free(program: Program) -> Outcome:
    """What the reference model says the program does."""
    registry = build_app(program).app.durable_functions
    return run_model(registry, program.starts, program.events, program.signals, program.terminations)


# -- generation -----------------------------------------------------------------------------------------
class _Generator:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        rng = self.rng
        self.counters = [f"counter@c{i}" for i in range(rng.choice((0, 1, 1, 2)))]
        self.journals = [f"journal@j{i}" for i in range(rng.choice((0, 1, 1, 2)))]
        self.accounts = [f"account@a{i}" for i in range(rng.choice((0, 0, 2, 3)))]
        self.events = 0

    def x(self) -> int:
        return self.rng.randint(1, 24)  # a multiple of 5 makes work fail

    def op(self, top: bool, leaves: Sequence[str]) -> Op:
        rng = self.rng
        kinds = ["activity", "activity", "fanout", "sleep", "race", "unawaited", "private", "private", "fail"]
        kinds += ["sub", "sub"] if leaves else []
        kinds += ["event", "event"] if top else []
        kinds += ["shared", "shared"] if self.counters else []
        kinds += ["append", "append", "section"] if self.journals else []
        kinds += ["transfer", "transfer"] if self.accounts else []
        kind = rng.choice(kinds)
        if kind == "activity":
            return Activity(self.x(), rng.choice((1, 1, 1, 2, 3)))
        if kind == "fanout":
            return FanOut(tuple(self.x() for _ in range(rng.randint(1, 4))))
        if kind == "sleep":
            return Sleep(rng.choice((1, 30, 600, 3600, 9 * DAY)))
        if kind == "race":
            return Race(self.x())
        if kind == "unawaited":
            what = rng.choice(("activity", "activity", "timer", "call", *(("sub",) if leaves else ())))
            return Unawaited(self.x(), what, rng.choice(leaves) if what == "sub" else "")
        if kind == "fail":
            return Fail() if rng.random() < 0.3 else Activity(self.x())
        if kind == "sub":
            return Sub(rng.choice(leaves), rng.choice((1, 1, 2)))
        if kind == "event":
            self.events += 1
            return WaitEvent(f"e{self.events}", rng.choice((0, 0, EVENT_TIMEOUT)))
        if kind == "private":
            me = "counter@{me}"
            operation = rng.choice(("add", "add", "get", "delete", "fail", "forward"))
            value: Any = rng.randint(1, 9)
            if operation == "forward":
                if not self.counters:
                    operation = "add"
                else:
                    value = [rng.choice(self.counters).split("@")[1], rng.randint(1, 9)]
            if operation in ("get", "delete") or rng.random() < 0.5:
                return Call(me, operation, value)
            return Signal(me, operation, value)
        if kind == "shared":
            counter = rng.choice(self.counters)
            roll = rng.random()
            if roll < 0.15:
                return Call(counter, rng.choice(("add", "get")), rng.randint(1, 9), racy=True)
            if roll < 0.3:
                return Signal(counter, "add", rng.randint(1, 9), delay=rng.choice((60, 9 * DAY)))
            return Signal(counter, "add", rng.randint(1, 9))
        if kind == "append":
            return Append(rng.choice(self.journals), call=rng.random() < 0.5)
        if kind == "section":
            locked = tuple(rng.sample(self.journals, rng.randint(1, len(self.journals))))
            body: list[Op] = []
            for _ in range(rng.randint(0, 2)):
                roll = rng.random()
                if roll < 0.4:
                    body.append(Append(rng.choice(locked), call=True))
                elif roll < 0.7:
                    body.append(Activity(self.x()))
                else:
                    body.append(Sleep(rng.choice((1, 60))))
            return Section(locked, tuple(body))
        if kind == "transfer":
            source, target = rng.sample(self.accounts, 2)
            return Transfer(source, target, rng.randint(1, 150), parallel=rng.random() < 0.5)
        raise AssertionError(kind)

    def body(self, top: bool, leaves: Sequence[str], length: int) -> tuple[Op, ...]:
        return tuple(self.op(top, leaves) for _ in range(length))


def generate(seed: int) -> Program:
    """A small random program: 0-2 child orchestrators, 1-2 top-level ones, 1-4 instances."""
    g = _Generator(seed)
    rng = g.rng
    leaves = [
        Orchestrator(f"leaf{i}", g.body(False, (), rng.randint(1, 3)), rng.choice((1, 1, 2)))
        for i in range(rng.choice((0, 1, 1, 2)))
    ]
    leaf_names = [leaf.name for leaf in leaves]
    mains = [
        Orchestrator(f"main{i}", g.body(True, leaf_names, rng.randint(1, 4)), rng.choice((1, 1, 1, 2, 3)))
        for i in range(rng.randint(1, 2))
    ]
    starts = tuple(Start(rng.choice(mains).name, f"o{i}", start_input()) for i in range(rng.randint(1, 4)))
    events: list[RaiseEvent] = []
    for start in starts:
        spec = next(m for m in mains if m.name == start.orchestrator)
        for generation in range(spec.generations):
            for op in spec.body:
                if not isinstance(op, WaitEvent):
                    continue
                if rng.random() < (0.5 if op.timeout else 0.9):
                    at_tick = 0 if rng.random() < 0.5 else rng.randint(1, 400)
                    name = f"{op.name}.g{generation}"
                    events.append(RaiseEvent(start.instance_id, name, rng.randint(100, 999), at_tick))
        if rng.random() < 0.1:  # an event nobody waits for: buffered, carried over, harmless
            events.append(RaiseEvent(start.instance_id, "unwanted", 0, rng.randint(0, 50)))
    signals = tuple(
        ClientSignal(df.EntityId(*c.split("@")).instance_id, "add", rng.randint(1, 9))
        for c in g.counters
        if rng.random() < 0.3
    )
    terminations: list[Terminate] = []
    if rng.random() < 0.15:  # an instance that waits from its start for an event nobody raises
        blocked = Orchestrator("blocked", (WaitEvent("never"), *g.body(False, (), rng.randint(1, 2))))
        mains.append(blocked)
        starts += (Start(blocked.name, f"o{len(starts)}", start_input()),)
        if rng.random() < 0.8:  # terminated, maybe before its start is processed
            terminations.append(Terminate(starts[-1].instance_id, "enough", rng.choice((0, rng.randint(1, 200)))))
    suspensions = tuple(Suspend(s.instance_id, rng.randint(0, 200)) for s in starts if rng.random() < 0.1)
    used = {o.name for o in mains if any(s.orchestrator == o.name for s in starts)}
    used |= {op.orchestrator for o in mains if o.name in used for op in o.body if isinstance(op, Sub | Unawaited)}
    used.discard("")
    orchestrators = tuple(o for o in (*leaves, *mains) if o.name in used)
    return Program(orchestrators, starts, tuple(events), signals, tuple(terminations), suspensions)
