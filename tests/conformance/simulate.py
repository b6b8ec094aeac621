"""Deterministic simulation: a generated program on the real runtime, under injected faults, compared
with the reference model.

The real ``durable.Worker``\\ s (two or three, so that ETag races happen) share one
``storage.InMemoryBackend`` on a virtual clock. Each sees it through ``_FaultyBackend``: every
storage call stops at a *gate* until the seeded scheduler lets it through, so concurrent steps
interleave at every storage call, in an order the seed fixes. At each tick the scheduler picks one
thing to happen — let a waiting storage call through (maybe faulting it), let a worker poll a
queue, do what the driver planned (raise an event, terminate, suspend; resume once suspended),
release a held-back message, duplicate a message, stall a worker, drop an idle worker's cache —
and when nothing can happen, does what the driver still plans, releases what is held and moves
the clock to the next message's visibility (timers, retry delays, expired leases, the end of a
stall). It stops when everything is quiescent: no message anywhere, nothing running.

Half the programs (``SimConfig.ownership``, drawn from the seed) run their workers with partition
ownership, as long-running hosts do: a worker takes a control queue's messages only while it
holds that partition's lease (leases on the virtual clock, renewed, looked at and balanced in
rounds the scheduler runs as moves) and hands messages for instances of partitions it holds
straight over (``send_held`` goes through the gates too). A worker's held-back Instances rows
(protocol I6) are written when the scheduler lets their timer go off, on the virtual clock.

Faults (``FAULT_KINDS``), each drawn from the seed, within a budget per run:

- ``crash``: a worker process dies before or after any storage call (a send may die halfway
  through its messages) or at a ``WorkerOptions.fault_hook`` point ("committed", "row-ahead",
  "sent", "projected", "activity-reported"); nothing of it runs on, its leases run out, and it restarts
  with an empty cache;
- ``restart``: an idle worker restarts (its cache is dropped);
- ``storage``: a storage call fails before it happens, or happens and its answer is lost;
- ``dup``: a message sent in the last hour is delivered again;
- ``delay``: a message is held back and released later, in any order (delayed and reordered);
- ``early``: a message due later (a timer, a scheduled signal, a retry) surfaces early;
- ``stall``: a worker stops (a long pause) with storage calls pending until its leases have run
  out and other workers have taken its messages over, then goes on as if nothing happened;
- ``client``: the driver's ``start_new`` fails before or after its storage calls (an answer
  lost), and the driver calls it again.

``simulate(program, config)`` returns the violations found (``check.compare`` against the model,
plus what must hold of any quiescent task hub: no poisoned message, every status row showing
what its history does (lagging only behind steps whose messages were sent), no entity still
locked or holding messages back), with counts of the faults injected.
Everything is a function of the program and ``SimConfig`` (message and execution ids included:
``uuid.uuid4`` and ``random`` are seeded for the run), so a failing run is reproduced by its seed.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import traceback
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar, cast

import durable as df
from durable.core import _protocol as protocol
from durable.core._entities import EntitySnapshot
from durable.core._history import EventType
from durable.core._messages import WorkMessage
from durable.core._status import shows_the_same
from durable.runtime._backend import WORK_ITEM_QUEUE, ReceivedMessage, control_queue, queue_for
from durable.runtime._ownership import PartitionOwnership
from storage import Backend, InMemoryBackend

from .check import compare
from .model import START_TIME, Final, Outcome, Suspend, Terminate
from .programs import BuiltProgram, Program, build_app, fault_free

FAULT_KINDS = ("crash", "restart", "storage", "dup", "delay", "early", "stall", "client")
DUPLICATE_WINDOW = timedelta(hours=1)  # well inside the 6-hour de-duplication windows (README, Known limits)
T = TypeVar("T")


class Crash(BaseException):
    """A worker process died: a BaseException, so that no ``except Exception`` in the worker
    handles it as a storage error would be handled."""


class StorageError(Exception):
    """A transient storage failure."""


class VirtualClock:
    def __init__(self, start: datetime = START_TIME) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


@dataclass(frozen=True)
class SimConfig:
    seed: int
    workers: int = 2
    partitions: int = 2
    inline: bool = True  # WorkerOptions.inline_activities
    batch_size: int = 8
    entity_batch_size: int = 32
    faults: tuple[str, ...] = FAULT_KINDS
    max_faults: int = 12
    fault_rate: float = 0.03  # per storage call (and per message, per fault-hook point)
    # A run not quiescent by then is a violation. With ownership, lease rounds take most ticks of
    # a program whose timers span weeks (seed 8101354 needs about 41,000 and then passes).
    max_ticks: int = 60_000
    # Workers take control queues only while holding their partition's lease and hand messages
    # to instances of partitions they hold (``durable.runtime._ownership``, ``Worker._send``).
    ownership: bool = False

    @classmethod
    def from_seed(cls, seed: int, faults: Sequence[str] = FAULT_KINDS) -> SimConfig:
        rng = random.Random(f"config/{seed}")
        return cls(
            seed=seed,
            workers=rng.choice((2, 2, 3)),
            partitions=rng.choice((1, 2, 4)),
            inline=rng.random() < 0.5,
            batch_size=rng.choice((1, 4, 32)),
            entity_batch_size=rng.choice((1, 3, 32)),
            faults=tuple(k for k in FAULT_KINDS if k in faults),
            max_faults=rng.choice((4, 12, 24)) if faults else 0,
            fault_rate=rng.choice((0.01, 0.03, 0.08)),
            ownership=rng.random() < 0.5,
        )


@dataclass
class SimResult:
    program: Program
    config: SimConfig
    violations: list[str]
    faults: Counter[str]
    ticks: int
    expected: Outcome
    actual: Outcome
    log: list[str] = field(default_factory=list)


# -- one worker process's view of storage -------------------------------------------------------------------
@dataclass(eq=False)
class _Incarnation:
    slot: int
    number: int
    worker: df.Worker | None = None
    ownership: PartitionOwnership | None = None
    in_round: bool = False  # an ownership round is under way
    dead: bool = False
    actions: int = 0  # polls in flight


@dataclass(eq=False)
class _Gate:
    incarnation: _Incarnation
    operation: str
    future: asyncio.Future[str]


class _FaultyBackend:
    """The shared backend as one worker process sees it: each call waits at a gate for the
    scheduler, which may crash the process or fail the call before or after it happens."""

    def __init__(self, sim: Simulation, incarnation: _Incarnation) -> None:
        self.sim, self.incarnation, self.inner = sim, incarnation, sim.backend
        self.partition_count = sim.backend.partition_count

    async def _call(self, operation: str, perform: Callable[[], Awaitable[T]]) -> T:
        decision = await self.sim.gate(self.incarnation, operation)
        if decision == "error-before":
            raise StorageError(f"{operation} failed")
        result = await perform()
        self._after(decision, operation)
        return result

    def _after(self, decision: str, operation: str) -> None:
        if decision == "crash-after":
            self.sim.kill(self.incarnation)
            raise Crash
        if decision == "error-after":
            raise StorageError(f"the answer to {operation} was lost")

    async def send(self, messages: Sequence[WorkMessage]) -> None:
        decision = await self.sim.gate(self.incarnation, f"send {[m.id for m in messages]}")
        if decision == "error-before":
            raise StorageError("send failed")
        messages = list(messages)
        self.sim.check_outcomes_shown(messages)
        if decision == "crash-after" and len(messages) > 1:  # the process dies halfway through
            messages = messages[: self.sim.rng.randint(1, len(messages) - 1)]
        for message in messages:
            await self.sim.deliver(message)
        self._after(decision, "send")

    async def send_held(self, messages: Sequence[WorkMessage], lease: float) -> list[ReceivedMessage]:
        decision = await self.sim.gate(self.incarnation, f"send-held {[m.id for m in messages]}")
        if decision == "error-before":
            raise StorageError("send failed")
        self.sim.check_outcomes_shown(messages)
        held = await self.inner.send_held(messages, lease)
        self.sim.sent += [(self.sim.clock.now, m) for m in messages]
        self._after(decision, "send-held")
        return held

    async def acquire_partition(self, partition: int, owner: str, seconds: float, *, steal: bool = False) -> bool:
        acquire = self.inner.acquire_partition
        operation = f"acquire-partition {partition}"
        return await self._call(operation, lambda: acquire(partition, owner, seconds, steal=steal))

    async def renew_partition(self, partition: int, owner: str) -> bool:
        return await self._call(f"renew-partition {partition}", lambda: self.inner.renew_partition(partition, owner))

    async def release_partition(self, partition: int, owner: str) -> None:
        await self._call(f"release-partition {partition}", lambda: self.inner.release_partition(partition, owner))

    async def partition_owners(self) -> dict[int, str]:
        return await self._call("partition-owners", self.inner.partition_owners)

    async def receive(self, queue: str, max_count: int, visibility_timeout: float) -> Any:
        return await self._call(f"receive {queue}", lambda: self.inner.receive(queue, max_count, visibility_timeout))

    async def delete(self, received: Any) -> None:
        await self._call(f"delete {_id_of(received)}", lambda: self.inner.delete(received))

    async def release(self, received: Any, delay: float) -> None:
        await self._call(f"release {_id_of(received)}", lambda: self.inner.release(received, delay))

    async def poison(self, received: Any, reason: str) -> None:
        await self._call("poison", lambda: self.inner.poison(received, reason))

    async def load_history(self, instance_id: str) -> Any:
        return await self._call(f"load {instance_id}", lambda: self.inner.load_history(instance_id))

    async def commit(self, instance_id: str, **kwargs: Any) -> str:
        return await self._call(
            f"commit {instance_id}@{kwargs.get('checkpoint')}", lambda: self.inner.commit(instance_id, **kwargs)
        )

    async def read_instance(self, instance_id: str) -> Any:
        return await self._call(f"read-instance {instance_id}", lambda: self.inner.read_instance(instance_id))

    async def write_instance(self, record: Any, etag: str | None = None) -> str | None:
        operation = f"write-instance {record.instance_id}@{record.checkpoint} {record.runtime_status.value}"
        return await self._call(operation, lambda: self.inner.write_instance(record, etag))

    async def update_instance(self, record: Any, etag: str | None = None) -> str | None:
        operation = f"update-instance {record.instance_id}@{record.checkpoint} {record.runtime_status.value}"
        return await self._call(operation, lambda: self.inner.update_instance(record, etag))


def _id_of(received: Any) -> str:
    message = getattr(received, "message", None)
    return message.id if isinstance(message, WorkMessage) else "(unreadable message)"


class _ClientBackend:
    """The backend as the driver's client sees it: ``create_instance``, ``read_instance`` and
    ``send`` may fail before or after they happen (no gates: the client runs before the workers)."""

    def __init__(self, sim: Simulation) -> None:
        self.sim, self.inner = sim, sim.backend
        self.partition_count = sim.backend.partition_count

    async def _call(self, operation: str, perform: Callable[[], Awaitable[T]]) -> T:
        failing = self.sim._fault("client", 0.2)
        before = failing and self.sim.rng.random() < 0.5
        if failing:
            self.sim._note("client", f"{'error-before' if before else 'error-after'} {operation}")
        if before:
            raise StorageError(f"{operation} failed")
        result = await perform()
        if failing:
            raise StorageError(f"the answer to {operation} was lost")
        return result

    async def create_instance(self, record: Any) -> str:
        return await self._call("create-instance", lambda: self.inner.create_instance(record))

    async def read_instance(self, instance_id: str) -> Any:
        return await self._call("read-instance", lambda: self.inner.read_instance(instance_id))

    async def send(self, messages: Sequence[WorkMessage]) -> None:
        await self._call("send", lambda: self.inner.send(messages))


# -- the simulation -------------------------------------------------------------------------------------------
class Simulation:
    def __init__(self, program: Program, config: SimConfig, verbose: bool = False) -> None:
        self.program, self.config, self.verbose = program, config, verbose
        self.rng = random.Random(config.seed)
        self.clock = VirtualClock()
        self.backend = InMemoryBackend(partition_count=config.partitions, clock=self.clock)
        self.built: BuiltProgram = build_app(program)
        self.client = df.DurableOrchestrationClient(
            self.backend, registry=self.built.app.durable_functions, clock=self.clock
        )
        client_backend = cast(Backend, _ClientBackend(self))
        self.starter = df.DurableOrchestrationClient(
            client_backend, registry=self.built.app.durable_functions, clock=self.clock, sleep=self._client_sleep
        )
        self.incarnations: list[_Incarnation] = []
        self.gates: list[_Gate] = []
        self.held: list[WorkMessage] = []  # sent, not yet in a queue (delayed)
        self.sent: list[tuple[datetime, WorkMessage]] = []  # what may be duplicated
        self.raises: list[Any] = sorted((*program.events, *program.terminations, *program.suspensions),
                                        key=lambda e: e.at_tick)  # fmt: skip
        self.resumes: list[str] = []  # suspended by the driver, to resume once their status says so
        self.faults: Counter[str] = Counter()
        self.violations: list[str] = []
        self.log: list[str] = []
        self.tick = 0
        self.tasks: set[asyncio.Future[None]] = set()
        self.stalled: dict[int, datetime] = {}  # slot -> when its worker goes on
        for slot in range(config.workers):
            self._boot(slot)

    # -- workers --------------------------------------------------------------------------------------
    def _boot(self, slot: int) -> None:
        incarnation = _Incarnation(slot, sum(1 for i in self.incarnations if i.slot == slot))
        options = df.WorkerOptions(
            batch_size=self.config.batch_size,
            max_dequeue_count=1000,  # poisoning is for crash loops; the fault budget makes none
            inline_activities=self.config.inline,
            inline_budget=1e9,  # time-based: would make runs depend on the machine's speed
            entity_batch_size=self.config.entity_batch_size,
            row_timer=False,  # held-back Instances rows are written when due on the virtual clock
            fault_hook=lambda point, instance_id: self._hook(incarnation, point),
        )
        backend = cast(Backend, _FaultyBackend(self, incarnation))
        incarnation.worker = df.Worker(self.built.app.durable_functions, backend, clock=self.clock, options=options)
        if self.config.ownership:
            incarnation.ownership = PartitionOwnership(backend, clock=lambda: self.clock.now.timestamp())
            incarnation.worker.ownership = incarnation.ownership
        self.incarnations.append(incarnation)

    def _live(self) -> list[_Incarnation]:
        return [i for i in self.incarnations if not i.dead]

    def kill(self, incarnation: _Incarnation) -> None:
        """The process dies: none of its pending calls go through; it restarts empty."""
        if incarnation.dead:
            return
        incarnation.dead = True
        self.stalled.pop(incarnation.slot, None)
        for gate in [g for g in self.gates if g.incarnation is incarnation]:
            self.gates.remove(gate)
            gate.future.set_exception(Crash())
        self._boot(incarnation.slot)

    def _hook(self, incarnation: _Incarnation, point: str) -> None:
        if incarnation.dead:
            raise Crash
        if self._fault("crash"):
            self._note("crash", f"at {point} of w{incarnation.slot}.{incarnation.number}")
            self.kill(incarnation)
            raise Crash

    async def gate(self, incarnation: _Incarnation, operation: str) -> str:
        if incarnation.dead:
            raise Crash
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.gates.append(_Gate(incarnation, operation, future))
        return await future

    # -- faults ---------------------------------------------------------------------------------------
    def _fault(self, kind: str, rate: float | None = None) -> bool:
        """Whether to inject a fault of this kind now (drawn even when disabled: the same seed
        then takes the same path up to where a fault would have been)."""
        roll = self.rng.random()
        allowed = kind in self.config.faults and sum(self.faults.values()) < self.config.max_faults
        return allowed and roll < (self.config.fault_rate if rate is None else rate)

    def _note(self, kind: str, detail: str) -> None:
        self.faults[kind] += 1
        self.log.append(f"{self.tick}: {kind} {detail}")

    def _decide(self, gate: _Gate) -> str:
        if self._fault("crash", self.config.fault_rate / 2):
            decision = self.rng.choice(("crash-before", "crash-after"))
            self._note("crash", f"{decision} {gate.operation}")
            return decision
        if self._fault("storage"):
            decision = self.rng.choice(("error-before", "error-after"))
            self._note("storage", f"{decision} {gate.operation}")
            return decision
        return "ok"

    def check_outcomes_shown(self, messages: Sequence[WorkMessage]) -> None:
        """Protocol I8, as it happens: a child's outcome leaves for its parent only once the
        child's Instances row shows it (terminal, with that output or a failure). Outcomes for an
        execution of the parent that has ended (it continued as new) are left out: no parent
        learns them."""
        for message in messages:
            if message.event.event_type not in protocol.OUTCOMES_TO_PARENT:
                continue
            parent = self.backend.histories.get(message.instance_id)
            if parent is None or message.execution_id != parent.execution_id:
                continue
            created = [
                e.instance_id
                for e in parent.events
                if e.event_type is EventType.SUB_ORCHESTRATION_CREATED and e.event_id == message.event.task_scheduled_id
            ]
            child = created[-1] if created else None
            row = self.backend.instances.get(child) if child is not None else None
            succeeded = message.event.event_type is EventType.SUB_ORCHESTRATION_COMPLETED
            shows_it = row is not None and (
                row.runtime_status is df.OrchestrationRuntimeStatus.Completed and row.output == message.event.result
                if succeeded
                else row.runtime_status
                in (df.OrchestrationRuntimeStatus.Failed, df.OrchestrationRuntimeStatus.Terminated)
            )
            if child is not None and not shows_it:
                shown = "no row" if row is None else f"a {row.runtime_status.value} row"
                self.violations.append(f"{child}'s outcome sent to {message.instance_id} while it had {shown}")

    async def deliver(self, message: WorkMessage) -> None:
        """A message sent: into its queue, or held back, or surfacing before it is due."""
        now = self.clock.now
        self.sent.append((now, message))
        if self._fault("delay"):
            self._note("delay", message.id)
            self.held.append(message)
        elif (
            message.visible_at is not None
            and message.visible_at > now + timedelta(seconds=1)
            and self._fault("early", 0.3)
        ):
            self._note("early", message.id)
            early = self.rng.uniform(0, (message.visible_at - now).total_seconds() / 2)
            self.backend.put_raw(queue_for(message, self.backend.partition_count), message.to_json(), early)
        else:
            await self.backend.send([message])

    # -- the scheduler ----------------------------------------------------------------------------------
    async def run(self) -> SimResult:
        expected = fault_free(self.program)
        with _seeded_uuids(self.config.seed):
            loop = asyncio.get_running_loop()
            previous = loop.get_exception_handler()
            loop.set_exception_handler(self._unhandled)
            try:
                await self._start()
                while await self._step():
                    self.tick += 1
                    if self.tick >= self.config.max_ticks:
                        self.violations.append(f"not quiescent after {self.tick} ticks")
                        break
                actual = await self._outcome()
            finally:
                loop.set_exception_handler(previous)
                await self._abandon()
        violations = compare(self.program, expected, actual) + self.violations
        return SimResult(self.program, self.config, violations, self.faults, self.tick, expected, actual, self.log)

    def _unhandled(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        if not isinstance(error, Crash | StorageError):
            self.violations.append(f"unhandled in the event loop: {context.get('message')} {error!r}")

    async def _start(self) -> None:
        for start in self.program.starts:
            for _ in range(20):  # the driver calls start_new again when it fails (an answer lost, say)
                try:
                    await self.starter.start_new(start.orchestrator, start.instance_id, start.input)
                    break
                except StorageError:
                    continue
        for signal in self.program.signals:
            await self.client.signal_entity(signal.entity, signal.operation, signal.input)
        await self._raise_due()

    async def _client_sleep(self, delay: float) -> None:
        """The driver's client backs off between its attempts on the virtual clock."""
        self.clock.now += timedelta(seconds=delay)
        await asyncio.sleep(0)

    async def _raise_due(self, everything: bool = False) -> None:
        """The driver's planned calls: raise an event, terminate, suspend (then resume)."""
        while self.raises and (everything or self.raises[0].at_tick <= self.tick):
            action = self.raises.pop(0)
            with contextlib.suppress(ValueError):  # the instance has finished (it failed first)
                if isinstance(action, Terminate):
                    await self.client.terminate(action.instance_id, action.reason)
                elif isinstance(action, Suspend):
                    await self.client.suspend(action.instance_id, "a pause")
                    self.resumes.append(action.instance_id)
                else:
                    await self.client.raise_event(action.instance_id, action.name, action.value)

    def _suspended(self, instance_id: str) -> bool:
        record = self.backend.instances.get(instance_id)
        return record is not None and record.runtime_status is df.OrchestrationRuntimeStatus.Suspended

    async def _resume_suspended(self) -> bool:
        """Resume what the driver suspended, once its status row says Suspended."""
        resumed = [i for i in self.resumes if self._suspended(i)]
        for instance_id in resumed:
            self.resumes.remove(instance_id)
            await self.client.resume(instance_id, "go on")
        return bool(resumed)

    async def _settle(self) -> None:
        """Run every task until it waits at a gate or ends."""
        loop = asyncio.get_running_loop()
        ready = loop._ready  # type: ignore[attr-defined]  # the event loop's run queue
        for _ in range(100_000):
            await asyncio.sleep(0)
            if not ready:
                return
        raise RuntimeError("the workers never settle")

    def _visible_queues(self) -> list[str]:
        now = self.clock.now
        return [q for q, stored in sorted(self.backend.queues.items()) if any(m.visible_at <= now for m in stored)]

    def _runnable_gates(self) -> list[_Gate]:
        now = self.clock.now
        self.stalled = {slot: until for slot, until in self.stalled.items() if until > now}
        return [g for g in self.gates if g.incarnation.slot not in self.stalled]

    async def _step(self) -> bool:
        """One tick: something happens; False once nothing can (quiescent)."""
        await self._settle()
        moves: list[tuple[float, Callable[[], Awaitable[object]]]] = []
        if self._runnable_gates():
            moves.append((8.0, self._advance_gate))
        queues = self._visible_queues()
        for incarnation in self._live():
            if incarnation.actions < 2 and incarnation.slot not in self.stalled:
                moves += [(3.0 / len(queues), self._poller(incarnation, q)) for q in queues]
        if self.raises and self.raises[0].at_tick <= self.tick:
            moves.append((4.0, self._raise_due))
        if any(self._suspended(i) for i in self.resumes):
            moves.append((1.0, self._resume_suspended))
        if self.held:
            moves.append((0.5, self._release_held))
        for incarnation in self._live():
            ownership = incarnation.ownership
            looks = ownership is not None and (ownership.owned or ownership.others) and not incarnation.in_round
            if ownership is not None and looks and incarnation.slot not in self.stalled:
                moves.append((0.3, self._lease_round(incarnation, ownership)))
            rows_due = incarnation.worker.rows_due_at if incarnation.worker else None
            if rows_due is not None and rows_due <= self.clock.now and incarnation.slot not in self.stalled:
                moves.append((1.0, self._row_writer(incarnation)))
        if moves:  # while something is going on, now and then also:
            moves.append((0.1, self._duplicate))
            moves.append((0.08, self._restart_idle))
            moves.append((0.05, self._nudge_clock))
            if self._runnable_gates() and "stall" in self.config.faults:
                moves.append((0.05, self._stall))
        if moves:
            weights = [w for w, _ in moves]
            await self.rng.choices([m for _, m in moves], weights)[0]()
            return True
        if self.raises:  # nothing else to do: the driver raises the rest before any timer fires
            await self._raise_due(everything=True)
            return True
        if await self._resume_suspended():
            return True
        if self.held:
            await self._release_held()
            return True
        due = [m.visible_at for stored in self.backend.queues.values() for m in stored]
        due += self.stalled.values()
        due += [at for i in self._live() if i.worker and (at := i.worker.rows_due_at) is not None]
        later = [t for t in due if t > self.clock.now]
        if later:
            self.clock.now = min(later)
            return True
        if due:
            stuck = [(g.incarnation.slot, g.operation) for g in self.gates]
            self.violations.append(f"harness stuck: messages visible, nothing can take them (gates {stuck})")
        return False

    async def _advance_gate(self) -> None:
        runnable = self._runnable_gates()
        gate = runnable[self.rng.randrange(len(runnable))]
        self.gates.remove(gate)
        decision = self._decide(gate)
        if self.verbose:
            where = f"w{gate.incarnation.slot}.{gate.incarnation.number}"
            self.log.append(f"{self.tick} {self.clock.now:%d %H:%M:%S} {where}: {gate.operation} -> {decision}")
        if decision == "crash-before":
            gate.future.set_exception(Crash())
            self.kill(gate.incarnation)
        else:
            gate.future.set_result(decision)

    def _poller(self, incarnation: _Incarnation, queue: str) -> Callable[[], Awaitable[None]]:
        worker = incarnation.worker
        assert worker is not None
        if queue == WORK_ITEM_QUEUE:
            return self._move(incarnation, "poll", worker.run_activities_once)
        partition = next(p for p in range(self.backend.partition_count) if control_queue(p) == queue)
        return self._move(incarnation, "poll", lambda: worker.run_partition_once(partition, incarnation.ownership))

    def _lease_round(self, incarnation: _Incarnation, ownership: PartitionOwnership) -> Callable[[], Awaitable[None]]:
        """The worker's ownership round going off: renew, look, balance (``PartitionOwnership.run``)."""

        async def round_() -> None:
            incarnation.in_round = True  # one at a time, as its loop runs them
            try:
                await ownership.round()
            finally:
                incarnation.in_round = False

        return self._move(incarnation, "lease round", round_)

    def _row_writer(self, incarnation: _Incarnation) -> Callable[[], Awaitable[None]]:
        """The worker's timer for the Instances rows it held back (protocol I6) going off."""
        assert incarnation.worker is not None
        return self._move(incarnation, "row writer", incarnation.worker.write_held_rows)

    def _move(
        self, incarnation: _Incarnation, what: str, action: Callable[[], Awaitable[object]]
    ) -> Callable[[], Awaitable[None]]:
        """A move that starts ``action`` as one of the worker's tasks: it goes on through the gates
        while other moves happen."""

        async def start() -> None:
            task = asyncio.ensure_future(self._act(incarnation, what, action))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

        return start

    async def _act(self, incarnation: _Incarnation, what: str, action: Callable[[], Awaitable[object]]) -> None:
        incarnation.actions += 1
        try:
            await action()
        except (Crash, StorageError):
            pass  # dead; or a storage call failed, as the worker's loop would log before going on
        except Exception as error:
            if incarnation.dead:  # what a dead process left half done (its other tasks) fails as it may
                return
            self.violations.append(f"worker {what} raised {error!r}")
            if self.verbose:
                self.log.append(traceback.format_exc())
        finally:
            incarnation.actions -= 1

    async def _release_held(self) -> None:
        message = self.held.pop(self.rng.randrange(len(self.held)))
        await self.backend.send([message])

    async def _duplicate(self) -> None:
        horizon = self.clock.now - DUPLICATE_WINDOW
        recent = [m for at, m in self.sent if at >= horizon]
        if recent and self._fault("dup", 1.0):
            message = self.rng.choice(recent)
            self._note("dup", message.id)
            await self.backend.send([message])

    async def _restart_idle(self) -> None:
        idle = [i for i in self._live() if i.actions == 0 and not any(g.incarnation is i for g in self.gates)]
        if idle and self._fault("restart", 1.0):
            incarnation = self.rng.choice(idle)
            self._note("restart", f"worker {incarnation.slot}")
            self.kill(incarnation)

    async def _stall(self) -> None:
        gate = self.rng.choice(self._runnable_gates())
        if self._fault("stall", 1.0):
            lease = gate.incarnation.worker.options.visibility_timeout if gate.incarnation.worker else 0.0
            pause = timedelta(seconds=lease * self.rng.uniform(1.0, 3.0))
            self._note("stall", f"worker {gate.incarnation.slot} for {pause.total_seconds():.0f} s at {gate.operation}")
            self.stalled[gate.incarnation.slot] = self.clock.now + pause

    async def _nudge_clock(self) -> None:
        self.clock.now += timedelta(seconds=self.rng.uniform(0.1, 3.0))

    async def _abandon(self) -> None:
        """Let whatever is left die (only after a violation stopped the run early)."""
        for incarnation in self._live():
            incarnation.dead = True
        for gate in self.gates:
            gate.future.set_exception(Crash())
        self.gates.clear()
        await self._settle()

    # -- the outcome ----------------------------------------------------------------------------------
    async def _outcome(self) -> Outcome:
        sent = {message.id for _, message in self.sent}
        outcome, violations = await outcome_at_rest(
            self.backend, self.client, sorted(self.backend.instances), self.clock.now, self.built.activity_runs, sent
        )
        self.violations += violations
        for queue, body, reason in self.backend.poison_queue:
            self.violations.append(f"poisoned on {queue}: {reason}: {body[:200]}")
        return outcome


async def outcome_at_rest(
    backend: Backend,
    client: df.DurableOrchestrationClient,
    instance_ids: Sequence[str],
    now: datetime,
    activity_runs: Counter[tuple[str, str]],
    sent: set[str] | None = None,
) -> tuple[Outcome, list[str]]:
    """What a task hub at rest holds (statuses, outputs, entity states), and what must hold of
    any task hub at rest but does not: every status row showing what its history does (it may
    lag behind steps that changed nothing it shows, protocol I6, whose messages must then be
    among those ``sent``, when that is known), no entity locked, holding messages back or
    waiting for a gap."""
    outcome, violations = Outcome(activity_runs=Counter(activity_runs)), []
    for instance_id in instance_ids:
        record = await backend.read_instance(instance_id)
        assert record is not None, instance_id
        history = await backend.load_history(instance_id)
        owed = protocol.follow_up(history, record, now)
        if record.sends_pending:
            violations.append(f"{instance_id}: its row, written ahead of its step's messages, was never confirmed")
        elif owed is not None and (owed.record is None or not shows_the_same(record, owed.record)):
            violations.append(
                f"{instance_id}: status row {record.runtime_status.value} at step {record.checkpoint} does not "
                f"show what its history at step {history.checkpoint} does"
            )
        elif owed is not None and sent is not None and (unsent := [m.id for m in owed.messages if m.id not in sent]):
            violations.append(f"{instance_id}: its row lags behind a step whose messages {unsent} were never sent")
        if instance_id.startswith("@"):
            state = await client.read_entity_state(instance_id)
            if state.entity_exists:
                outcome.entities[instance_id] = state.entity_state
            violations += _entity_at_rest(instance_id, EntitySnapshot.from_events(history.events))
            continue
        status = await client.get_status(instance_id)
        assert status is not None
        error = status.failure_details["ErrorType"] if status.failure_details else None
        ended = status.runtime_status in (
            df.OrchestrationRuntimeStatus.Completed,
            df.OrchestrationRuntimeStatus.Terminated,
        )
        output = status.output if ended else None
        outcome.orchestrations[instance_id] = Final(status.runtime_status.value, output, error, status.name)
    return outcome, violations


def _entity_at_rest(instance_id: str, snapshot: EntitySnapshot) -> list[str]:
    violations = []
    if snapshot.lock_owner is not None:
        violations.append(f"{instance_id} is still locked by {snapshot.lock_owner}")
    if snapshot.waiting:
        violations.append(f"{instance_id} still holds {len(snapshot.waiting)} messages behind its lock")
    if snapshot.buffered:
        gaps = {sender: sorted(messages) for sender, messages in snapshot.buffered.items()}
        violations.append(f"{instance_id} still waits for earlier messages of {gaps}")
    return violations


@contextlib.contextmanager
def _seeded_uuids(seed: int) -> Iterator[None]:
    """Message and execution ids from the seed, so that a run is reproducible."""
    rng = random.Random(f"uuid/{seed}")
    original, state = uuid.uuid4, random.getstate()
    uuid.uuid4 = lambda: uuid.UUID(int=rng.getrandbits(128), version=4)
    random.seed(f"random/{seed}")  # and what the runtime draws (which partition to steal)
    try:
        yield
    finally:
        uuid.uuid4 = original
        random.setstate(state)


async def simulate(program: Program, config: SimConfig) -> SimResult:
    return await Simulation(program, config).run()
