"""Generated programs on the real runtime against Azurite, with real processes killed.

``run_on_azurite(program, config, emulator, folder)`` runs a generated program (its durations cut
to seconds by ``real_time``) in 2-3 processes of its own — polling workers
(``tests.worker_process`` over ``tests.conformance.azure_app``) or local Functions hosts
(``durable start``) — against an Azurite this process started, and injects the faults of its
``AzureConfig``, all drawn from one seed:

- ``kill``: a worker process is SIGKILLed at a seeded moment and started again (a new process,
  empty cache); in the worker mode some processes also SIGKILL themselves the n-th time they
  pass a point of the commit protocol (``WorkerOptions.fault_hook``: "committed", "row-ahead",
  "sent", "projected", "activity-reported"), and are started again;
- ``azurite``: Azurite itself is stopped and started again on the same ports and data folder
  while the workers run; they must ride through (the SDKs' retries, the worker's polling loop).
  It is stopped with SIGTERM: on SIGKILL Azurite loses the writes of its last seconds that it
  had acknowledged (it saves its queue and table metadata with LokiJS every 5 s), which no
  storage client can survive and Azure Storage does not do (see docs/guarantees.md).

The driver (this process) starts the instances, raises the events, sends the signals, terminates
and suspends as the program says, then waits until the task hub is at rest, reads the outcome
through the client and checks it with ``check.compare`` against the reference model, plus what
must hold of any task hub at rest (``simulate.outcome_at_rest``) and that nothing was poisoned.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import random
import signal
import socket
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from azure.storage.queue.aio import QueueServiceClient

import durable as df
from durable.host._azurite import Azurite, free_ports
from durable.runtime._backend import WORK_ITEM_QUEUE, InstanceQuery, control_queue
from storage.azure import AzureStorageBackend
from tests.worker_process import READY

from .check import compare
from .model import Outcome, RaiseEvent, Suspend, Terminate
from .programs import Op, Program, Race, Section, Signal, Sleep, WaitEvent, fault_free
from .simulate import outcome_at_rest

REPO_ROOT = Path(__file__).resolve().parents[2]
MODES = ("worker", "host")
FAULT_KINDS = ("kill", "azurite")
HOOK_POINTS = ("committed", "row-ahead", "sent", "projected", "activity-reported")
LEASE = 5.0  # the workers' lease (visibility timeout), renewed every half lease
# Timeouts that must not fire when the awaited work or event comes (as in the model): far
# longer than a lease, an Azurite restart and the SDKs' retries after it.
EVENT_TIMEOUT = 20
RACE_TIMER = 30
MAX_DEQUEUE_COUNT = 100  # poisoning is for crash loops; the kills make none
QUIET_WINDOW = LEASE + 5.0  # no visible message for this long: nothing held, nothing due soon


def real_time(program: Program) -> Program:
    """The program with durations that a real run can wait for: sleeps and scheduled signals of
    1 s to 4 s (9 days: 4 s), event timeouts of ``EVENT_TIMEOUT`` and race timers of
    ``RACE_TIMER`` seconds. The model runs this program too, so both see the same durations."""

    def seconds(value: int) -> int:
        return 1 if value <= 60 else 2 if value <= 3600 else 4

    def cut(op: Op) -> Op:
        if isinstance(op, Sleep):
            return Sleep(seconds(op.seconds))
        if isinstance(op, Signal) and op.delay:
            return dataclasses.replace(op, delay=seconds(op.delay))
        if isinstance(op, WaitEvent) and op.timeout:
            return dataclasses.replace(op, timeout=EVENT_TIMEOUT)
        if isinstance(op, Race):
            return dataclasses.replace(op, timer=RACE_TIMER)
        if isinstance(op, Section):
            return dataclasses.replace(op, body=tuple(cut(inner) for inner in op.body))
        return op

    orchestrators = tuple(dataclasses.replace(o, body=tuple(cut(op) for op in o.body)) for o in program.orchestrators)
    return dataclasses.replace(program, orchestrators=orchestrators)


def waits_long(program: Program) -> bool:
    """Whether a real run of the program sits out a timeout (an event nobody raises, raced
    against a timer): ``EVENT_TIMEOUT`` seconds or more."""
    raised = {(e.instance_id, e.name) for e in program.events}
    for start in program.starts:
        spec = program.orchestrator(start.orchestrator)
        for generation in range(spec.generations):
            for op in spec.body:
                if (
                    isinstance(op, WaitEvent)
                    and op.timeout
                    and (start.instance_id, f"{op.name}.g{generation}") not in raised
                ):
                    return True
    return False


@dataclass(frozen=True)
class AzureConfig:
    seed: int
    mode: str = "worker"  # "worker": tests.worker_process; "host": durable start
    workers: int = 2
    inline: bool = True  # WorkerOptions.inline_activities (worker mode)
    kills: tuple[tuple[float, int], ...] = ()  # (seconds after the processes started, slot): SIGKILLed
    hook_kills: tuple[tuple[int, str, int], ...] = ()  # (slot, point, n): its first process dies there
    azurite_restarts: tuple[float, ...] = ()  # seconds after the driver's calls

    @classmethod
    def from_seed(cls, seed: int, mode: str, faults: tuple[str, ...] = FAULT_KINDS) -> AzureConfig:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
        rng = random.Random(f"azure/{seed}/{mode}")
        workers = rng.choice((2, 2, 3))
        kills: list[tuple[float, int]] = []
        hook_kills: list[tuple[int, str, int]] = []
        restarts: list[float] = []
        if "kill" in faults:
            at = 0.5 if mode == "worker" else 1.5  # a host takes about a second to start
            for _ in range(rng.randint(1, 3)):
                at += rng.uniform(0.2, 2.5)
                kills.append((round(at, 2), rng.randrange(workers)))
            if mode == "worker":
                slots = rng.sample(range(workers), rng.randint(0, workers))
                hook_kills = [(slot, rng.choice(HOOK_POINTS), rng.randint(1, 3)) for slot in sorted(slots)]
        if "azurite" in faults:
            restarts = [round(rng.uniform(0.3, 2.5), 2)]
        return cls(seed, mode, workers, rng.random() < 0.5, tuple(kills), tuple(hook_kills), tuple(restarts))


@dataclass
class AzureResult:
    program: Program  # as run (``real_time``)
    config: AzureConfig
    violations: list[str]
    expected: Outcome
    actual: Outcome
    seconds: float
    faults: Counter[str] = field(default_factory=Counter)  # injected, by kind
    log: list[str] = field(default_factory=list)


class RestartableAzurite(Azurite):
    """An Azurite on fixed ports with its data in a folder, which can be restarted in place.

    Its ports lie below the kernel's ephemeral range: while it is down, no port picked by
    ``free_ports`` (a host's, another Azurite's) and no client connection's own port can take
    one of them."""

    def __init__(self, location: Path) -> None:
        super().__init__(_ports_below_the_ephemeral_range(), location=location)

    def restart(self, hard: bool = False) -> None:
        """Stop it — gracefully (SIGTERM: it saves its data first), or ``hard`` with SIGKILL — and
        start it again on the same ports and folder."""
        if hard and self._process is not None:
            self._process.kill()
            self._process.wait()
        self.stop()
        self.start()
        time.sleep(0.5)
        if self._process is None or self._process.poll() is not None:  # it did not keep its ports
            raise RuntimeError(f"Azurite exited after its restart on {self.ports}")


def _ports_below_the_ephemeral_range() -> tuple[int, int, int]:
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    while True:
        first = random.randrange(max(1024, low - 12_000), low - 3)
        ports = (first, first + 1, first + 2)
        if all(_bindable(port) for port in ports):
            return ports


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# -- worker processes ------------------------------------------------------------------------------------
@dataclass
class _Slot:
    number: int
    process: asyncio.subprocess.Process | None = None
    incarnations: int = 0
    killed: set[int] = field(default_factory=set)  # pids this runner SIGKILLed
    exits: list[tuple[int, int]] = field(default_factory=list)  # (exit code, pid) of its dead processes
    log: Path | None = None  # the output of its current process
    # Held while its process is replaced: two kills close together (or a kill and a restart by
    # the supervisor) would otherwise both start one, and the process of one would be lost track of.
    replacing: asyncio.Lock = field(default_factory=asyncio.Lock)


class _Processes:
    """The run's worker processes: one per slot, started again whenever one dies."""

    def __init__(
        self, config: AzureConfig, connection: str, hub: str, folder: Path, program_file: Path, azurite: asyncio.Lock
    ) -> None:
        self.config, self.connection, self.hub, self.folder = config, connection, hub, folder
        # Held while Azurite restarts. A host is started only while Azurite is up, and until it
        # is up itself: ``durable start`` starts an Azurite of its own when it finds none on the
        # connection's local ports, which would take the restarting one's ports.
        self.azurite = azurite
        self.slots = [_Slot(n) for n in range(config.workers)]
        runs = folder / "runs"
        runs.mkdir()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("DURABLE_")}
        self.env.update(CONFORMANCE_PROGRAM=str(program_file), CONFORMANCE_RUNS=str(runs), PYTHONUNBUFFERED="1")
        self.env["AzureWebJobsStorage"] = connection
        self.stopping = False
        if config.mode == "host":
            self.app_dir = folder / "app"
            self.app_dir.mkdir()
            (self.app_dir / "function_app.py").write_text("from tests.conformance.azure_app import app  # noqa: F401\n")
            queues = {"messageEncoding": "none", "messageLease": f"00:00:{LEASE:02.0f}",
                      "maxDequeueCount": MAX_DEQUEUE_COUNT, "maxPollingInterval": "00:00:00.5"}  # fmt: skip
            durable = {"hubName": hub, "storageProvider": {"maxQueuePollingInterval": "00:00:00.5"}}
            host = {"version": "2.0", "extensions": {"queues": queues, "durableTask": durable}}
            (self.app_dir / "host.json").write_text(json.dumps(host))

    def _command(self, slot: _Slot) -> list[str]:
        if self.config.mode == "host":
            (port,) = free_ports(1)
            return [sys.executable, "-m", "durable", "start", "--app-dir", str(self.app_dir), "--port", str(port)]
        command = [sys.executable, "-m", "tests.worker_process", self.connection, self.hub,
                   "--app", "tests.conformance.azure_app:app", "--lease", str(LEASE),
                   "--max-dequeue-count", str(MAX_DEQUEUE_COUNT)]  # fmt: skip
        if not self.config.inline:
            command.append("--no-inline")
        for number, point, after in self.config.hook_kills:
            if number == slot.number and slot.incarnations == 0:
                command += ["--kill-at", point, "--kill-after", str(after)]
        return command

    async def start(self, slot: _Slot) -> None:
        if self.config.mode == "host" and self.config.azurite_restarts:
            async with self.azurite:
                await self._launch(slot)
                await self._started(slot)
        else:
            await self._launch(slot)

    async def _started(self, slot: _Slot, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not self._ready(slot) and time.monotonic() < deadline:
            if slot.process is None or slot.process.returncode is not None:
                return
            await asyncio.sleep(0.1)

    def _ready(self, slot: _Slot) -> bool:
        marker = b"Host started" if self.config.mode == "host" else READY.encode()
        return slot.log is not None and marker in slot.log.read_bytes()

    async def _launch(self, slot: _Slot) -> None:
        slot.log = self.folder / f"w{slot.number}.{slot.incarnations}.log"
        log = open(slot.log, "wb")  # noqa: SIM115 - the child's
        try:
            slot.process = await asyncio.create_subprocess_exec(
                *self._command(slot), cwd=REPO_ROOT, env=self.env, stdout=log, stderr=asyncio.subprocess.STDOUT
            )
        finally:
            log.close()
        slot.incarnations += 1

    async def start_all(self) -> None:
        for slot in self.slots:
            await self.start(slot)

    async def kill(self, number: int) -> None:
        slot = self.slots[number]
        async with slot.replacing:
            process = slot.process
            if process is not None:
                if process.returncode is None:
                    slot.killed.add(process.pid)
                    process.kill()
                slot.exits.append((await process.wait(), process.pid))
            if not self.stopping:
                await self.start(slot)

    async def supervise(self) -> None:
        """Start again whatever died (a process that killed itself at a commit point)."""
        while not self.stopping:
            for slot in self.slots:
                async with slot.replacing:
                    if slot.process is not None and slot.process.returncode is not None and not self.stopping:
                        slot.exits.append((slot.process.returncode, slot.process.pid))
                        await self.start(slot)
            await asyncio.sleep(0.2)

    async def stop(self) -> list[str]:
        """Stop every process gracefully (SIGTERM for a worker, Ctrl-C for a host); what went wrong.
        A process started while others stop (a restart that was under way) is stopped too."""
        self.stopping = True
        problems: list[str] = []
        stopped: set[int] = set()
        while live := [p for p in (s.process for s in self.slots) if p is not None and p.pid not in stopped]:
            for slot in [s for s in self.slots if s.process in live]:
                assert slot.process is not None
                stopped.add(slot.process.pid)
                problems += await self._stop(slot, slot.process)
        return problems

    async def _stop(self, slot: _Slot, process: asyncio.subprocess.Process) -> list[str]:
        if process.returncode is not None:
            return []
        ready = self._ready(slot)
        process.send_signal(signal.SIGINT if self.config.mode == "host" else signal.SIGTERM)
        problems = []
        try:
            code = await asyncio.wait_for(process.wait(), 30)
        except asyncio.TimeoutError:
            process.kill()
            code = await process.wait()
            problems.append(f"w{slot.number} did not stop within 30 s")
        # One still starting up (restarted after a kill) is interrupted before it can stop cleanly:
        # by the signal, or by a KeyboardInterrupt while Python itself starts (1).
        if ready and code != 0:
            problems.append(f"w{slot.number} exited with {code} when stopped")
        return problems

    def self_killed(self) -> int:
        """Processes that died of SIGKILL that this runner did not send (a ``--kill-at`` point)."""
        return sum(
            1 for slot in self.slots for code, pid in slot.exits if code == -signal.SIGKILL and pid not in slot.killed
        )

    def activity_runs(self) -> Counter[tuple[str, str]]:
        runs: Counter[tuple[str, str]] = Counter()
        for path in sorted((self.folder / "runs").glob("runs-*.jsonl")):
            for line in path.read_text().splitlines():
                name, key = json.loads(line)
                runs[(name, key)] += 1
        return runs


# -- the run -----------------------------------------------------------------------------------------------
class AzureRun:
    def __init__(self, program: Program, config: AzureConfig, emulator: RestartableAzurite, folder: Path) -> None:
        self.program, self.config, self.emulator = real_time(program), config, emulator
        self.folder = folder
        self.hub = f"conf{config.seed}{config.mode[0]}{uuid.uuid4().hex[:8]}"
        self.violations: list[str] = []
        self.log: list[str] = []
        self.faults: Counter[str] = Counter()
        self.restarting = asyncio.Lock()  # held while Azurite is down
        self.resumes: list[str] = []
        self.last_seen = "nothing"  # what the wait for rest saw last
        self.started = time.monotonic()

    def _note(self, text: str) -> None:
        self.log.append(f"{time.monotonic() - self.started:7.2f} {text}")

    async def run(self, timeout: float = 240.0) -> AzureResult:
        expected = fault_free(self.program)
        self.folder.mkdir(parents=True, exist_ok=True)
        program_file = self.folder / "program.txt"
        program_file.write_text(repr(self.program))
        connection = self.emulator.connection_string
        backend = AzureStorageBackend(connection, task_hub=self.hub)
        await backend.create_task_hub()
        client = df.DurableOrchestrationClient(backend)
        processes = _Processes(self.config, connection, self.hub, self.folder, program_file, self.restarting)
        actual = Outcome()
        try:
            await processes.start_all()
            supervisor = asyncio.create_task(processes.supervise())
            driven = asyncio.Event()
            faults = asyncio.create_task(self._inject(processes, driven))
            await self._drive(client)
            driven.set()
            try:
                await asyncio.wait_for(self._until_at_rest(client, backend, expected, faults), timeout)
            except asyncio.TimeoutError:
                self.violations.append(f"not at rest after {timeout:.0f} s: {self.last_seen}")
            faults.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await faults
            # The supervisor first: a restart of its racing the stop would outlive the run.
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
            self.violations += await processes.stop()
            self.faults["kill at a commit point"] = processes.self_killed()
            actual = await self._outcome(client, backend, processes)
        finally:
            if not processes.stopping:
                await processes.stop()
            with contextlib.suppress(Exception):
                await backend.delete_task_hub()
            await backend.close()
        violations = compare(self.program, expected, actual) + self.violations
        seconds = time.monotonic() - self.started
        return AzureResult(self.program, self.config, violations, expected, actual, seconds, self.faults, self.log)

    # -- the driver ---------------------------------------------------------------------------------------
    async def _drive(self, client: df.DurableOrchestrationClient) -> None:
        """Start every instance (again when a call fails: the same start is safe to repeat), send the
        client signals, then raise, terminate and suspend in the program's order, spread over about
        two seconds (``at_tick`` / 200)."""
        for start in self.program.starts:
            for attempt in range(10):
                try:
                    await client.start_new(start.orchestrator, start.instance_id, start.input)
                    break
                except Exception as error:  # a storage error: call it again
                    self._note(f"start_new {start.instance_id} failed ({error!r}), attempt {attempt}")
                    await asyncio.sleep(0.5)
            else:
                self.violations.append(f"start_new {start.instance_id} failed 10 times")
        for signal_ in self.program.signals:
            await client.signal_entity(signal_.entity, signal_.operation, signal_.input)
        actions: list[RaiseEvent | Terminate | Suspend] = [
            *self.program.events, *self.program.terminations, *self.program.suspensions
        ]  # fmt: skip
        actions.sort(key=lambda a: a.at_tick)
        began = time.monotonic()
        for action in actions:
            await asyncio.sleep(max(0.0, began + action.at_tick / 200 - time.monotonic()))
            with contextlib.suppress(ValueError):  # the instance has finished (it failed first)
                if isinstance(action, Terminate):
                    await client.terminate(action.instance_id, action.reason)
                elif isinstance(action, Suspend):
                    await client.suspend(action.instance_id, "a pause")
                    self.resumes.append(action.instance_id)
                else:
                    await client.raise_event(action.instance_id, action.name, action.value)
        self._note("driver done")

    async def _resume_suspended(self, client: df.DurableOrchestrationClient) -> None:
        for instance_id in list(self.resumes):
            status = await client.get_status(instance_id)
            if status is not None and status.runtime_status is df.OrchestrationRuntimeStatus.Suspended:
                await client.resume(instance_id, "go on")
                self.resumes.remove(instance_id)

    async def _inject(self, processes: _Processes, driven: asyncio.Event) -> None:
        """The seeded kills, each at its time after the processes started, and Azurite restarts,
        at theirs after the driver's calls (which are not all safe to repeat after an error)."""
        began = time.monotonic()

        async def kill(at: float, slot: int) -> None:
            await asyncio.sleep(at)
            self._note(f"SIGKILL w{slot}")
            await processes.kill(slot)
            self.faults["kill"] += 1

        async def restart(at: float) -> None:
            await driven.wait()
            await asyncio.sleep(at)
            async with self.restarting:
                down = time.monotonic()
                await asyncio.to_thread(self.emulator.restart)
                self._note(f"Azurite restarted (down {time.monotonic() - down:.1f} s)")
            self.faults["azurite"] += 1

        await asyncio.gather(*(kill(at, slot) for at, slot in self.config.kills),
                             *(restart(at) for at in self.config.azurite_restarts))  # fmt: skip
        self._note(f"faults done after {time.monotonic() - began:.1f} s")

    async def _until_at_rest(
        self, client: df.DurableOrchestrationClient, backend: AzureStorageBackend, expected: Outcome,
        faults: asyncio.Task[None],
    ) -> None:  # fmt: skip
        """Wait until every orchestration has settled where the model says it can (ended, or
        waiting for good), every fault was injected, and either no queue holds any message or
        none has been visible for ``QUIET_WINDOW`` seconds (a message a dead process held comes
        back within a lease; what is left is timers that lost their race, due later)."""
        queues = [control_queue(p) for p in range(backend.partition_count)] + [WORK_ITEM_QUEUE]
        quiet_since: float | None = None
        last: Any = None
        async with QueueServiceClient.from_connection_string(self.emulator.connection_string) as service:
            clients = [service.get_queue_client(backend.physical_queue_name(q)) for q in queues]
            while True:
                await asyncio.sleep(0.5)
                if faults.done() and faults.exception() is not None:
                    raise RuntimeError("a fault could not be injected") from faults.exception()
                if self.restarting.locked():
                    continue
                try:
                    await self._resume_suspended(client)
                    statuses = {i: await client.get_status(i) for i in sorted(expected.orchestrations)}
                    visible = [len(await q.peek_messages(max_messages=1)) for q in clients]
                    stored = [(await q.get_queue_properties()).approximate_message_count for q in clients]
                except Exception as error:  # Azurite going down: look again
                    self._note(f"at-rest check failed: {error!r}")
                    quiet_since = None
                    continue
                # (A suspend that reached an instance after it ended never shows: no resume is owed.)
                settled = faults.done() and all(
                    s is not None and (s.runtime_status.is_terminal or not _ends(expected.orchestrations[i].status))
                    for i, s in statuses.items()
                )
                observed = ({i: s.runtime_status.value if s else None for i, s in statuses.items()}, visible)
                self.last_seen = f"statuses {observed[0]}, visible messages {visible}, stored {stored}"
                if not settled or any(visible) or observed != last:
                    quiet_since, last = None, observed
                    continue
                if not any(stored):
                    return
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since >= QUIET_WINDOW:
                    return

    async def _outcome(
        self, client: df.DurableOrchestrationClient, backend: AzureStorageBackend, processes: _Processes
    ) -> Outcome:
        ids: list[str] = []
        token: str | None = None
        while True:
            records, token = await backend.query_instances(InstanceQuery(), 100, token)
            ids += [r.instance_id for r in records]
            if token is None:
                break
        outcome, violations = await outcome_at_rest(
            backend, client, sorted(ids), datetime.now(timezone.utc), processes.activity_runs()
        )
        self.violations += violations
        for queue, body, reason in await backend.poison_messages():
            self.violations.append(f"poisoned on {queue}: {reason}: {body[:200]}")
        return outcome


def _ends(status: str) -> bool:
    return status in ("Completed", "Failed", "Terminated")


async def run_on_azurite(
    program: Program, config: AzureConfig, emulator: RestartableAzurite, folder: Path
) -> AzureResult:
    return await AzureRun(program, config, emulator, folder).run()


@contextlib.contextmanager
def emulator(folder: Path) -> Iterator[RestartableAzurite]:
    """An Azurite of its own (data in ``folder``), for runs that restart it."""
    started = RestartableAzurite(folder)
    with started:
        yield started


__all__ = ["AzureConfig", "AzureResult", "RestartableAzurite", "emulator", "real_time", "run_on_azurite"]
