"""Throughput, latency, storage requests and CPU per unit of work, in both execution modes.

    .venv/bin/python -m benchmarks.run [--mode inproc|host|both] [--workloads seq5,fan100,...]
                                       [--repeat N] [--json results.json] [--connection CONN]
                                       [--workers N]

Workloads (the app is ``benchmarks/app/function_app.py``):

- ``seq5``: 200 orchestrations of five activities in a row, started at once;
- ``fan100``: 10 orchestrations, each fanning out 100 activities;
- ``counter``: 10 orchestrations each signalling one counter entity 100 times;
- ``bank``: 200 transfers among 10 accounts, each inside a critical section on both accounts;
- ``idle``: an idle worker or host, in storage requests per second (after it settled: see
  ``IDLE_SETTLE_SECONDS``);
- ``wake``: after the idle period, how long one orchestration started in the same process waits
  for its first step (its "latency"); it runs with ``idle``;
- ``scaleout`` (host mode only): 1, then 2, then 4 ``durable start`` hosts on one fresh task hub
  per host count, work started round-robin through their management APIs; two rows per host
  count: ``scaleout-spread``, 200 seq5 orchestrations at once (spread over the partitions), and
  ``scaleout-hot``, 2,000 signals to one counter entity from 20 orchestrations (a hot entity).
  Requests and CPU are summed over the hosts; each host's log is ``host<i>.log`` in the folder
  printed to stderr (commit conflicts show as "commit conflict on ...; reloading").

Modes: ``inproc`` runs the worker in this process (``DurableRuntime``); ``host`` serves the app
with ``durable start`` in a subprocess, which is how Functions runs us: work is started through
its management API, and its storage requests are counted by the host itself (it writes them to
the file ``DURABLE_STORAGE_REQUEST_COUNTS`` names) and its CPU read from /proc. ``--workers N``
serves it with ``durable start --workers N`` (the worker processes' requests and CPU are added).
In host mode the ``seq5`` run also asks the management API for a status every 50 ms and reports
the p99 answer time.

Completion is watched every 0.25 s through a backend that is not counted, by a query for the key
of one unfinished orchestration's Instances row (never by polling instances one by one); a run
lasts from its first start to the last completion its instances' rows record (not to when the
query saw it). With ``--repeat N`` every row runs N times, each on a fresh task hub with fresh
processes, and the median run of each row is printed at the end. Before the first run and after
the last, one ``benchmarks.capacity`` measurement (one client process, 5 s) prints the storage
requests per second the machine serves with no engine work: this machine's speed varies by the
hour, and those two lines say how fast it was. ``--json`` writes the medians, every run and the
two capacity measurements.
Without ``--connection`` (or ``AZURITE_CONNECTION_STRING``) it starts its own Azurite.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import importlib.util
import itertools
import json
import math
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiohttp

import durable as df
from benchmarks import capacity
from durable.core._status import InstanceRecord
from durable.host._azurite import Azurite
from durable.runtime._backend import InstanceQuery
from storage import partition_of
from storage.azure import AzureStorageBackend, StorageRequestCounter
from storage.azure._accounting import COUNTS_FILE_SETTING

APP_DIR = Path(__file__).parent / "app"
REPO = Path(__file__).parent.parent
S = df.OrchestrationRuntimeStatus
UNFINISHED = frozenset({S.Pending, S.Running})
MASTER_KEY = "benchmark-master-key"
IDLE_SECONDS = 60.0
# Before measuring idleness: the pollers back off (about 10 s) and a process lets go of the
# partitions it took at start once they gave no work for 30 s (durable.runtime._ownership).
IDLE_SETTLE_SECONDS = 45.0
TAKE_UP_SECONDS = 60.0  # at most
SCALEOUT = ("scaleout-spread", "scaleout-hot")  # run together on one hub per host count
SCALEOUT_HOSTS = (1, 2, 4)
# Each host logs its commit conflicts (Information), so that a run can count them in its logs.
HOST_LOG_LEVELS = {"AzureFunctionsJobHost__logging__logLevel__durable.worker": "Information"}


def load_app() -> df.DFApp:
    spec = importlib.util.spec_from_file_location("benchmark_app", APP_DIR / "function_app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.app  # type: ignore[no-any-return]


@dataclass
class Workload:
    name: str
    unit: str
    orchestrator: str
    inputs: list[Any]
    units: int
    check: Callable[[list[Any]], str | None]  # outputs -> a complaint, or None
    setup: dict[str, int] = field(default_factory=dict)  # account -> opening balance


def _sequences(name: str) -> Workload:
    return Workload(name, "orchestration", "sequence", list(range(200)), 200,
                    lambda out: None if sorted(out) == [i + 5 for i in range(200)] else "wrong sums")  # fmt: skip


def _signals(name: str, key: str, orchestrations: int) -> Workload:
    """``orchestrations`` x 100 signals to one counter; each orchestration then reads it, and the
    last read sees every signal (each one's signals precede its read), so its value is the total."""
    total = orchestrations * 100
    return Workload(name, "signal", "signal_counter", [{"key": key, "count": 100}] * orchestrations, total,
                    lambda out: None if max(out) == total else f"counter at {max(out)}, not {total}")  # fmt: skip


def workloads(run: str) -> dict[str, Workload]:
    accounts = [f"{run}-acct{i}" for i in range(10)]
    rng = random.Random(7)
    transfers = []
    for _ in range(200):
        source, target = rng.sample(accounts, 2)
        transfers.append({"from": source, "to": target, "amount": rng.randint(1, 50)})
    return {
        "seq5": _sequences("seq5"),
        "fan100": Workload("fan100", "orchestration", "fan_out", [100] * 10, 10,
                           lambda out: None if out == [5050] * 10 else f"wrong sums {out[:3]}"),
        "counter": _signals("counter", run, 10),
        "bank": Workload("bank", "transfer", "transfer", transfers, 200,
                         lambda out: None if all(isinstance(o, bool) for o in out) else "a transfer failed",
                         setup=dict.fromkeys(accounts, 1000)),
        "scaleout-spread": _sequences("scaleout-spread"),
        "scaleout-hot": _signals("scaleout-hot", run, 20),
    }  # fmt: skip


@dataclass
class Result:
    mode: str
    workload: str
    unit: str
    units: int
    seconds: float
    per_second: float
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    requests_per_unit: float
    requests_by_kind: dict[str, float]
    cpu_ms_per_unit: float
    extra: dict[str, float] = field(default_factory=dict)


# -- the two modes ---------------------------------------------------------------------------------
class Target:
    """Where the workload runs: starts orchestrations, counts requests and CPU."""

    mode: str
    client: df.DurableOrchestrationClient  # to set up entities

    async def start(self, name: str, payload: Any) -> str:
        raise NotImplementedError

    def counts(self) -> dict[str, int]:
        raise NotImplementedError

    def cpu_seconds(self) -> float:
        raise NotImplementedError


class InProcess(Target):
    mode = "inproc"

    def __init__(self, connection: str, hub: str) -> None:
        self.counter = StorageRequestCounter()
        self.backend = AzureStorageBackend(connection, task_hub=hub, counter=self.counter)
        self.runtime = df.DurableRuntime(load_app(), self.backend)

    async def __aenter__(self) -> InProcess:
        await self.backend.create_task_hub()
        await self.runtime.start()
        self.client = self.runtime.client()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runtime.stop()
        await self.backend.close()

    async def start(self, name: str, payload: Any) -> str:
        return await self.client.start_new(name, None, payload)

    def counts(self) -> dict[str, int]:
        return self.counter.snapshot()

    def cpu_seconds(self) -> float:
        return time.process_time()


class _Host:
    """One ``durable start`` process (and its worker processes, with ``--workers``): its port, its
    log and the files it and its worker processes write their request counts to."""

    def __init__(self, folder: Path, index: int, workers: int = 1) -> None:
        self.port = _free_port()
        self.log = folder / f"host{index}.log"
        self.counts_file = folder / f"counts{index}.json"  # a worker process's: counts{index}-worker{n}.json
        self.workers = workers
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/durabletask"

    def launch(self, env: dict[str, str]) -> None:
        command = [sys.executable, "-m", "durable", "start", "--app-dir", str(APP_DIR), "--port", str(self.port),
                   "--master-key", MASTER_KEY, "--workers", str(self.workers)]  # fmt: skip
        with self.log.open("wb") as log:  # the child keeps its own handle
            self.process = subprocess.Popen(command, env={**env, COUNTS_FILE_SETTING: str(self.counts_file)},
                                            stdout=log, stderr=subprocess.STDOUT, cwd=REPO)  # fmt: skip

    async def answering(self, session: aiohttp.ClientSession, deadline: float) -> None:
        assert self.process is not None
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"durable start exited: {self.log.read_text()[-2000:]}")
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{self.base}/instances?top=1") as answer:
                    if answer.status == 200 and len(self._worker_pids()) == self.workers - 1:
                        return
            if time.monotonic() > deadline:
                raise RuntimeError(f"durable start did not answer in time (log: {self.log})")
            await asyncio.sleep(0.2)

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def _counts_files(self) -> list[Path]:
        return [self.counts_file, *self.counts_file.parent.glob(f"{self.counts_file.stem}-worker*.json")]

    def counts(self) -> dict[str, int]:
        return _summed(json.loads(path.read_text())["counts"] for path in self._counts_files() if path.exists())

    async def fresh_counts(self, since: float) -> dict[str, int]:
        """The totals as written after ``since`` (a process writes them every half second of activity)."""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with contextlib.suppress(FileNotFoundError, ValueError):
                written = [json.loads(path.read_text()) for path in self._counts_files()]
                if all(data["time"] >= since for data in written):
                    return _summed(data["counts"] for data in written)
            await asyncio.sleep(0.1)
        return self.counts()

    def _worker_pids(self) -> list[int]:
        """The host's worker processes (its children running ``durable start --worker-process``)."""
        assert self.process is not None
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        with contextlib.suppress(FileNotFoundError):
            return [int(pid) for pid in children.read_text().split()
                    if b"--worker-process" in Path(f"/proc/{pid}/cmdline").read_bytes()]  # fmt: skip
        return []

    def cpu_seconds(self) -> float:
        """The CPU time of the host and of its worker processes."""
        assert self.process is not None
        return sum(capacity.cpu_seconds(pid) for pid in [self.process.pid, *self._worker_pids()])


def _summed(counts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """Request counts by kind, added up over processes."""
    return dict(sum((collections.Counter(c) for c in counts), collections.Counter()))


class Hosted(Target):
    """``hosts`` ``durable start`` processes serving the app on one task hub, each on its own port;
    work is started round-robin over them, and their requests and CPU are summed."""

    mode = "host"

    def __init__(self, connection: str, hub: str, hosts: int = 1, workers: int = 1) -> None:
        self.connection = connection
        self.hub = hub
        self.folder = Path(tempfile.mkdtemp(prefix="bench-host-"))
        self.hosts = [_Host(self.folder, i, workers) for i in range(hosts)]
        self.workers = workers
        self._next_host = itertools.cycle(self.hosts)
        # The set-up client, not counted; its messages encoded as the host expects (host.json default).
        self.backend = AzureStorageBackend(connection, task_hub=hub, base64_messages=True)
        self.client = df.DurableOrchestrationClient(self.backend)

    async def __aenter__(self) -> Hosted:
        env = dict(os.environ, AzureWebJobsStorage=self.connection, BENCH_TASK_HUB=self.hub,
                   PYTHONPATH=str(REPO), **HOST_LOG_LEVELS)  # fmt: skip
        print(f"{len(self.hosts)} host(s) on task hub {self.hub}, logs in {self.folder}", file=sys.stderr)
        self.session = aiohttp.ClientSession(headers={"x-functions-key": MASTER_KEY})
        try:
            for host in self.hosts:
                host.launch(env)
            deadline = time.monotonic() + 60 + 15 * len(self.hosts)  # they start side by side on few cores
            await asyncio.gather(*(host.answering(self.session, deadline) for host in self.hosts))
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()
        for host in self.hosts:
            host.stop()
        await self.backend.close()

    async def start(self, name: str, payload: Any) -> str:
        async with self.session.post(f"{next(self._next_host).base}/orchestrators/{name}", json=payload) as answer:
            if answer.status != 202:
                raise RuntimeError(f"start {name}: {answer.status} {await answer.text()}")
            return str((await answer.json())["id"])

    def counts(self) -> dict[str, int]:
        return _summed(host.counts() for host in self.hosts)

    async def fresh_counts(self, since: float) -> dict[str, int]:
        return _summed(await asyncio.gather(*(host.fresh_counts(since) for host in self.hosts)))

    def cpu_seconds(self) -> float:
        return sum(host.cpu_seconds() for host in self.hosts)

    async def status_latency(self, instance_ids: list[str], stop: asyncio.Event) -> list[float]:
        """Ask for a status every 50 ms until ``stop``: the answer times, in ms."""
        times: list[float] = []
        while not stop.is_set():
            if instance_ids:
                started = time.perf_counter()
                url = f"{next(self._next_host).base}/instances/{random.choice(instance_ids)}"
                async with self.session.get(url) as answer:
                    await answer.read()
                times.append((time.perf_counter() - started) * 1000)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.05)
        return times


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- measuring -------------------------------------------------------------------------------------
class Observer(AzureStorageBackend):
    """The uncounted backend that watches a task hub; its Instances table client is open to the
    completion check (``_unfinished``)."""

    def __init__(self, connection: str, task_hub: str) -> None:
        super().__init__(connection, task_hub=task_hub)
        self.instances = self._instances


async def _unfinished(observer: Observer) -> bool:
    """Whether an orchestration has not finished yet: a query for the key of one such Instances
    row (entities' rows, Running while they exist, have ids that begin with ``@``), so that the
    watching costs next to nothing in the process it shares with an in-process worker. Listing
    the unfinished instances took 7% of that process's CPU in bank, every 0.25 s."""
    statuses = " or ".join(f"RuntimeStatus eq '{s.value}'" for s in sorted(UNFINISHED, key=lambda s: s.value))
    not_entity = "(PartitionKey lt '@' or PartitionKey ge 'A') and RowKey eq ''"
    pages = observer.instances.query_entities(
        f"({statuses}) and {not_entity}", results_per_page=1, select=["PartitionKey"]
    ).by_page()
    async for page in pages:  # a page may come back empty with a continuation: read on
        async for _ in page:
            return True
    return False


async def _all_records(observer: Observer) -> list[InstanceRecord]:
    out: list[InstanceRecord] = []
    token = None
    while True:
        page, token = await observer.query_instances(InstanceQuery(), page_size=1000, continuation_token=token)
        out += page
        if token is None:
            return out


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _open_accounts(target: Target, balances: dict[str, int]) -> None:
    for account, amount in balances.items():
        await target.client.signal_entity(df.EntityId("account", account), "deposit", amount)
    deadline = time.monotonic() + 120
    for account, amount in balances.items():
        while (await target.client.read_entity_state(df.EntityId("account", account))).entity_state != amount:
            if time.monotonic() > deadline:
                raise RuntimeError("accounts were not opened within 120 s")
            await asyncio.sleep(0.2)


async def _take_up_hub(target: Target, observer: Observer) -> None:
    """Let the process(es) take up the task hub as hosts that have been serving it have: a signal
    to a counter on each partition makes that control queue's poller claim its lease, and several
    hosts spread the partitions among themselves (a steal a round), until every partition is held
    and no process holds more than its share. Taking up a hub after an idle spell costs a process
    about three lease requests a partition, and the hosts a few rounds to spread: start-up costs,
    which a run of one second would otherwise count among its units of work (a row then measures
    N hosts serving the hub, not hosts being added to it)."""
    partitions = observer.partition_count
    keys: dict[int, df.EntityId] = {}
    for n in itertools.count():
        entity = df.EntityId("counter", f"take-up-{n}")
        keys.setdefault(partition_of(entity.instance_id, partitions), entity)
        if len(keys) == partitions:
            break
    processes = min(partitions, len(target.hosts) * target.workers if isinstance(target, Hosted) else 1)
    share = math.ceil(partitions / processes)
    watcher = df.DurableOrchestrationClient(observer)
    deadline = time.monotonic() + TAKE_UP_SECONDS
    while time.monotonic() < deadline:
        for entity in keys.values():  # work on every partition: held ones stay held
            await target.client.signal_entity(entity, "add", 1)
        await asyncio.sleep(0.5)
        per_process = collections.Counter((await observer.partition_owners()).values())
        spread = sum(per_process.values()) == partitions and len(per_process) == processes
        if (
            spread
            and max(per_process.values()) <= share
            and all([(await watcher.read_entity_state(entity)).entity_exists for entity in keys.values()])
        ):
            return
    print(f"the task hub was not taken up within {TAKE_UP_SECONDS:.0f} s", file=sys.stderr)


async def measure(target: Target, observer: Observer, workload: Workload) -> Result:
    if workload.setup:
        await _open_accounts(target, workload.setup)
    await _take_up_hub(target, observer)
    before_ids = {r.instance_id for r in await _all_records(observer)}
    counts_before, cpu_before = target.counts(), target.cpu_seconds()
    if isinstance(target, Hosted):  # what the host wrote last may be up to half a second old
        counts_before = await target.fresh_counts(time.time())
    started = time.time()
    stop_probe = asyncio.Event()
    ids: list[str] = []
    probe = None
    if isinstance(target, Hosted) and workload.name == "seq5":
        probe = asyncio.create_task(target.status_latency(ids, stop_probe))
    ids += await asyncio.gather(*(target.start(workload.orchestrator, p) for p in workload.inputs))
    while await _unfinished(observer):
        await asyncio.sleep(0.25)
    finished_at = time.time()
    stop_probe.set()
    probe_times = await probe if probe is not None else []
    counts_after = await target.fresh_counts(finished_at) if isinstance(target, Hosted) else target.counts()
    cpu = target.cpu_seconds() - cpu_before
    records = [r for r in await _all_records(observer) if r.instance_id in set(ids) - before_ids]
    failed = [r for r in records if r.runtime_status is not S.Completed]
    if failed or len(records) != len(workload.inputs):
        raise RuntimeError(f"{workload.name}: {len(failed)} of {len(records)} instances did not complete")
    # Until the last instance completed, as its Instances row says (same machine, same clock):
    # the completion check's own 0.25 s period would otherwise count in short runs.
    seconds = max(r.last_updated_time.timestamp() for r in records) - started
    complaint = workload.check([json.loads(r.output) if r.output else None for r in records])
    if complaint:
        raise RuntimeError(f"{workload.name}: {complaint}")
    if workload.setup:
        balances = [(await target.client.read_entity_state(df.EntityId("account", a))).entity_state
                    for a in workload.setup]  # fmt: skip
        if sum(balances) != sum(workload.setup.values()):
            raise RuntimeError(f"bank: money not conserved: {sum(balances)} != {sum(workload.setup.values())}")
    by_kind = {k: counts_after.get(k, 0) - counts_before.get(k, 0) for k in set(counts_after) | set(counts_before)}
    latencies = [(r.last_updated_time - r.created_time).total_seconds() * 1000 for r in records]
    extra: dict[str, float] = {}
    if workload.name == "fan100":
        extra["requests_per_activity"] = sum(by_kind.values()) / (100 * len(records))
    if probe_times:
        extra["status_p99_ms"] = _percentile(probe_times, 0.99) or 0.0
    if isinstance(target, Hosted) and workload.name in SCALEOUT:
        extra["hosts"] = len(target.hosts)
    if isinstance(target, Hosted) and target.workers > 1:
        extra["workers"] = target.workers
    return Result(
        mode=target.mode, workload=workload.name, unit=workload.unit, units=workload.units,
        seconds=round(seconds, 2), per_second=round(workload.units / seconds, 1),
        latency_p50_ms=_percentile(latencies, 0.5), latency_p99_ms=_percentile(latencies, 0.99),
        requests_per_unit=round(sum(by_kind.values()) / workload.units, 2),
        requests_by_kind={k: round(v / workload.units, 2) for k, v in sorted(by_kind.items()) if v},
        cpu_ms_per_unit=round(cpu * 1000 / workload.units, 2), extra=extra,
    )  # fmt: skip


async def measure_idle(target: Target, observer: Observer, seconds: float) -> list[Result]:
    await asyncio.sleep(IDLE_SETTLE_SECONDS)
    counts_before, cpu_before, started = target.counts(), target.cpu_seconds(), time.time()
    if isinstance(target, Hosted):
        counts_before = await target.fresh_counts(started - 1)
    await asyncio.sleep(seconds)
    counts_after = await target.fresh_counts(time.time() - 1) if isinstance(target, Hosted) else target.counts()
    requests = sum(counts_after.values()) - sum(counts_before.values())
    cpu_ms = (target.cpu_seconds() - cpu_before) * 1000
    # requests per unit: per second of idleness
    idle = Result(target.mode, "idle", "second", int(seconds), seconds, 0.0, None, None,
                  round(requests / seconds, 3), {}, round(cpu_ms / seconds, 2))  # fmt: skip
    # Work this process sends to itself after the idle period: how long until its first step.
    instance_id = await target.start("sequence", 0)
    while await _unfinished(observer):
        await asyncio.sleep(0.05)
    status = await target.client.get_status(instance_id, show_history=True)
    first_step = _first_step_delay_ms(status)
    wake = Result(target.mode, "wake", "orchestration", 1, 0.0, 0.0, first_step, first_step, 0.0, {}, 0.0)
    return [idle, wake]


def _first_step_delay_ms(status: df.DurableOrchestrationStatus | None) -> float | None:
    """Milliseconds from the instance's creation to its first step."""
    if status is None or not status.history or status.created_time is None:
        return None
    for event in status.history:
        stamp = event.get("Timestamp") if isinstance(event, dict) else None
        if stamp:
            when = datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
            return max(0.0, (when - status.created_time.astimezone(timezone.utc)).total_seconds() * 1000)
    return None


@contextlib.asynccontextmanager
async def _fresh_hub(connection: str) -> AsyncIterator[tuple[str, Observer]]:
    """A new task hub, deleted afterwards, and its observer: the uncounted backend that watches it."""
    hub = f"bench{uuid.uuid4().hex[:10]}"
    observer = Observer(connection, hub)
    try:
        await observer.create_task_hub()
        yield hub, observer
    finally:
        with contextlib.suppress(Exception):
            await observer.delete_task_hub()
        await observer.close()


def _sessions(modes: list[str], names: list[str]) -> Iterator[tuple[str, int, tuple[str, ...]]]:
    """(mode, hosts, workloads) to run one after another on one fresh task hub."""
    for mode in modes:
        for name in names:
            if name != "scaleout":
                yield mode, 1, (name,)
            elif mode == "host":  # scale-out is over processes: in process there is one worker
                yield from ((mode, hosts, SCALEOUT) for hosts in SCALEOUT_HOSTS)


async def run(
    connection: str, modes: list[str], names: list[str], idle_seconds: float, repeat: int = 1, workers: int = 1
) -> list[Result]:
    """Every session ``repeat`` times, each time on a fresh task hub and fresh processes; a row per
    run as it ends. Returns every run's row, in the order run."""
    results: list[Result] = []
    for mode, hosts, session in _sessions(modes, names):
        for attempt in range(repeat):
            async with _fresh_hub(connection) as (hub, observer):
                target = InProcess(connection, hub) if mode == "inproc" else Hosted(connection, hub, hosts, workers)
                async with target:
                    for name in session:
                        if name == "idle":
                            new = await measure_idle(target, observer, idle_seconds)
                        else:
                            new = [await measure(target, observer, workloads(hub)[name])]
                        for result in new:
                            result.extra.update({"run": attempt + 1} if repeat > 1 else {})
                            print(_row(result), flush=True)
                        results += new
    return results


def median_runs(results: list[Result]) -> list[Result]:
    """Of the runs of each row (workload, mode, host count), the median one: by throughput, or
    for the idle row by requests per second, for the wake row by its latency (runs are whole:
    a row's figures all come from one run)."""
    rows: dict[tuple[str, str, float], list[Result]] = {}
    for result in results:
        rows.setdefault((result.workload, result.mode, result.extra.get("hosts", 1)), []).append(result)

    def rank(r: Result) -> tuple[float, float, float]:
        return (r.per_second, -r.requests_per_unit, -(r.latency_p50_ms or 0.0))

    return [sorted(runs, key=rank)[(len(runs) - 1) // 2] for runs in rows.values()]


def _row(r: Result) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    kinds = ", ".join(f"{k} {v}" for k, v in sorted(r.requests_by_kind.items(), key=lambda kv: -kv[1])[:4])
    extra = " ".join(f"{k}={v:.3g}" for k, v in r.extra.items())
    throughput = f"{r.per_second} {r.unit}s/s" if r.per_second else "-"
    return (f"| {r.workload} | {r.mode} | {throughput} | {ms(r.latency_p50_ms)} / {ms(r.latency_p99_ms)}"
            f" | {r.requests_per_unit} ({kinds}) | {r.cpu_ms_per_unit} | {extra} |")  # fmt: skip


HEADER = ("| workload | mode | throughput | latency p50 / p99 ms | storage requests per unit (top kinds) "
          "| CPU ms per unit | other |\n|---|---|---|---|---|---|---|")  # fmt: skip


CAPACITY_SECONDS = 5.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["inproc", "host", "both"], default="both")
    parser.add_argument("--workloads", default="seq5,fan100,counter,bank,idle,scaleout")
    parser.add_argument("--idle-seconds", type=float, default=IDLE_SECONDS)
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    parser.add_argument("--connection", default=os.environ.get("AZURITE_CONNECTION_STRING"))
    parser.add_argument("--repeat", type=int, default=1, help="runs of each row; the median run is reported")
    parser.add_argument("--workers", type=int, default=1, help="host mode: durable start --workers N")
    args = parser.parse_args()
    modes = ["inproc", "host"] if args.mode == "both" else [args.mode]
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    unknown = set(names) - ({*workloads("x"), "idle", "scaleout"} - set(SCALEOUT))
    if unknown:
        parser.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    print(capacity.machine(), flush=True)
    with contextlib.ExitStack() as stack:
        connection, azurite_pid = args.connection, None
        if not connection:
            azurite = stack.enter_context(Azurite())
            connection, azurite_pid = azurite.connection_string, azurite.pid
        # This machine's speed varies by the hour: what it serves with no engine work, before and
        # after, says which hour a table was measured in (see benchmarks.capacity).
        before = capacity.measure(connection, seconds=CAPACITY_SECONDS, azurite_pid=azurite_pid)
        print(f"capacity before: {before.sentence()}\n{HEADER}", flush=True)
        runs = asyncio.run(run(connection, modes, names, args.idle_seconds, args.repeat, args.workers))
        after = capacity.measure(connection, seconds=CAPACITY_SECONDS, azurite_pid=azurite_pid)
        print(f"capacity after: {after.sentence()}", flush=True)
    medians = median_runs(runs)
    if args.repeat > 1:
        print(f"\nmedian of {args.repeat} runs\n{HEADER}", flush=True)
        for result in medians:
            print(_row(result), flush=True)
    if args.json:
        written = {
            "capacity": {"before": asdict(before), "after": asdict(after)},
            "medians": [asdict(r) for r in medians],
            "runs": [asdict(r) for r in runs],
        }
        args.json.write_text(json.dumps(written, indent=2))


if __name__ == "__main__":
    main()
