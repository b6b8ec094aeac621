"""Recovery after a worker dies: its messages come back within one (short) lease, and the lease of
every message still being worked on is renewed, so that a live worker keeps its work.

- On the in-memory backend with the fake clock: a worker dies holding messages, another takes
  them over after one lease's worth of its polling rounds.
- On the in-memory backend in real time: a long activity and a long step keep their messages
  while their worker lives (renewal), and work done within half a lease costs no renewal.
- The lease keeper and the local host's queue-trigger runner in isolation (renewal timing,
  settling with the receipt the last renewal returned).
- On Azurite with real processes, for the polling worker and for ``durable start``: a process
  that holds an instance's messages beyond its lease keeps them while it lives; SIGKILLed, the
  instance completes on another process within the lease plus a polling interval.

    python -m tests.test_recovery APP_DIR CONNECTION HUB

runs a polling worker with the default ``WorkerOptions`` over the app in APP_DIR (the worker
processes of the Azurite test).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import durable as df
from durable.host._azurite import accepts_connections, free_ports
from durable.host._host import QueueTriggerRunner, load_function_app
from durable.host._settings import HostSettings, SettingsError
from durable.runtime._backend import WORK_ITEM_QUEUE, ReceivedMessage, control_queue, partition_of
from durable.runtime._polling import RECOVERY_SECONDS, PollIntervals
from durable.runtime._worker import LeaseKeeper
from storage import InMemoryBackend
from storage.azure import AzureStorageBackend
from tests.fixtures_host import REPO_ROOT, STARTUP_TIMEOUT, ServedApp

S = df.OrchestrationRuntimeStatus
DEFAULTS = df.WorkerOptions()


class Recording:
    """A shared backend as one worker sees it: what that worker received, and optionally slow
    commits (storage that holds a step up)."""

    def __init__(self, inner: InMemoryBackend, commit_delay: float = 0.0) -> None:
        self.inner = inner
        self.commit_delay = commit_delay
        self.received: list[str] = []  # message ids
        self.renewals = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def receive(self, queue: str, max_count: int, visibility_timeout: float) -> list[Any]:
        batch = await self.inner.receive(queue, max_count, visibility_timeout)
        self.received += [d.message.id for d in batch if isinstance(d, ReceivedMessage)]
        return batch

    async def release(self, received: ReceivedMessage, delay: float) -> None:
        self.renewals += 1
        await self.inner.release(received, delay)

    async def commit(self, instance_id: str, **kwargs: Any) -> str:
        await asyncio.sleep(self.commit_delay)
        return await self.inner.commit(instance_id, **kwargs)


def _history_is_clean(events: list[df.HistoryEvent]) -> None:
    kinds = [e.event_type for e in events]
    assert kinds.count(df.EventType.EXECUTION_STARTED) == 1
    assert kinds.count(df.EventType.TASK_SCHEDULED) == kinds.count(df.EventType.TASK_COMPLETED) == 1
    assert kinds.count(df.EventType.EXECUTION_COMPLETED) == 1


# -- (a) a worker dies holding messages: taken over within one lease ----------------------------------
@pytest.mark.parametrize("inline", [True, False], ids=["holding-its-control-message", "holding-a-work-item"])
async def test_a_dead_workers_messages_are_taken_over_after_one_lease_of_polling(app, clock, inline):
    attempts: list[int] = []
    started = asyncio.Event()

    @app.orchestration_trigger(context_name="context")
    def job(context):
        return (yield context.call_activity("hang_once", 1))

    @app.activity_trigger(input_name="n")
    async def hang_once(n):
        attempts.append(n)
        if len(attempts) == 1:
            started.set()
            await asyncio.Event().wait()  # its worker dies in here
        return "done"

    backend = InMemoryBackend(partition_count=4, clock=clock)
    options = df.WorkerOptions(inline_activities=inline)  # the default lease
    doomed = df.Worker(app.durable_functions, backend, clock=clock, options=options)
    client = df.DurableOrchestrationClient(backend, registry=app.durable_functions, clock=clock)
    instance_id = await client.start_new("job")
    if not inline:
        await doomed.run_orchestrations_once()  # the first step sends the work item
    # The doomed worker receives the start message (inline: it runs the activity while holding it)
    # or the work item, and dies mid-activity: nothing settled, nothing renewed any more.
    dying = asyncio.create_task(doomed.run_once())
    await asyncio.wait_for(started.wait(), timeout=5)
    dying.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await dying
    del doomed

    survivor = df.Worker(app.durable_functions, backend, clock=clock, options=options)
    intervals = PollIntervals.for_lease(options.visibility_timeout, options.idle_poll_max)
    held = control_queue(partition_of(instance_id, 4)) if inline else WORK_ITEM_QUEUE
    rounds = 0
    while True:
        # The dead worker's message is still in its queue, so an idle poller keeps polling it
        # every ``busy`` seconds instead of backing off to the idle interval.
        assert not await backend.queue_is_empty(held)
        rounds += 1
        assert rounds <= 1000
        clock.advance(intervals.busy)
        if await survivor.run_once():
            break
    await survivor.run_until_idle()
    status = await client.get_status(instance_id)
    assert (status.runtime_status, status.output) == (S.Completed, "done")
    assert attempts == [1, 1]
    # Taken over in the polling round where the dead worker's lease ran out: 4 rounds of 5 s with
    # the default 20 s lease (it was 150 rounds with the former 300 s lease).
    lease_rounds = math.ceil(options.visibility_timeout / intervals.busy)
    assert rounds in (lease_rounds, lease_rounds + 1), rounds
    assert rounds * intervals.busy <= RECOVERY_SECONDS
    _history_is_clean((await backend.load_history(instance_id)).events)


# -- (b) renewal: a live worker keeps its work ----------------------------------------------------------
LEASE = 1.0  # the shortest lease a queue gives; renewed every 0.5 s
HELD = 2.5 * LEASE


async def _poll_while(worker: df.Worker, busy: asyncio.Task[Any], holder: Recording) -> None:
    """Once ``busy`` has received its messages, poll with ``worker`` every 50 ms until it is done."""
    while not holder.received:
        await asyncio.sleep(0.01)
    while not busy.done():
        await worker.run_once()
        await asyncio.sleep(0.05)
    await busy


@pytest.mark.parametrize("inline", [False, True], ids=["work-item", "inline"])
async def test_a_long_activity_keeps_its_message_while_its_worker_lives(app, inline):
    calls: list[int] = []

    @app.orchestration_trigger(context_name="context")
    def slow_job(context):
        return (yield context.call_activity("slow", 21))

    @app.activity_trigger(input_name="n")
    async def slow(n):
        calls.append(n)
        await asyncio.sleep(HELD)  # two and a half leases
        return n * 2

    shared = InMemoryBackend(partition_count=4)  # real time
    options = df.WorkerOptions(visibility_timeout=LEASE, inline_activities=inline)
    first, other = Recording(shared), Recording(shared)
    worker = df.Worker(app.durable_functions, first, options=options)  # type: ignore[arg-type]
    rival = df.Worker(app.durable_functions, other, options=options)  # type: ignore[arg-type]
    client = df.DurableOrchestrationClient(shared, registry=app.durable_functions)
    instance_id = await client.start_new("slow_job")
    if not inline:
        await worker.run_orchestrations_once()
    first.received.clear()
    busy = asyncio.create_task(worker.run_once())
    await _poll_while(rival, busy, first)  # the rival polls every 50 ms while the activity runs

    assert first.renewals >= 2  # renewed every half lease
    assert not set(first.received) & set(other.received), "a held message was delivered to the rival"
    for _ in range(3):
        await worker.run_until_idle()
        await rival.run_until_idle()
    status = await client.get_status(instance_id)
    assert (status.runtime_status, status.output) == (S.Completed, 42)
    assert calls == [21]
    _history_is_clean((await shared.load_history(instance_id)).events)


async def test_a_step_held_up_longer_than_the_lease_keeps_its_messages(app):
    @app.orchestration_trigger(context_name="context")
    def quick(context):
        return (yield context.call_activity("double", 4))

    @app.activity_trigger(input_name="n")
    def double(n):
        return n * 2

    shared = InMemoryBackend(partition_count=4)
    options = df.WorkerOptions(visibility_timeout=LEASE, inline_activities=False)
    slow_storage, other = Recording(shared, commit_delay=HELD), Recording(shared)
    worker = df.Worker(app.durable_functions, slow_storage, options=options)  # type: ignore[arg-type]
    rival = df.Worker(app.durable_functions, other, options=options)  # type: ignore[arg-type]
    client = df.DurableOrchestrationClient(shared, registry=app.durable_functions)
    instance_id = await client.start_new("quick")
    busy = asyncio.create_task(worker.run_orchestrations_once())  # its first commit takes 2.5 leases
    await _poll_while(rival, busy, slow_storage)

    assert slow_storage.received and slow_storage.renewals >= 2
    assert not set(slow_storage.received) & set(other.received), "the start message was delivered twice"
    await rival.run_until_idle()  # the rest of the instance, at normal speed
    status = await client.get_status(instance_id)
    assert (status.runtime_status, status.output) == (S.Completed, 8)
    _history_is_clean((await shared.load_history(instance_id)).events)


async def test_work_done_within_half_a_lease_renews_nothing(app, clock):
    @app.orchestration_trigger(context_name="context")
    def chain(context):
        value = 0
        for _ in range(5):
            value = yield context.call_activity("inc", value)
        return value

    @app.activity_trigger(input_name="n")
    async def inc(n):
        return n + 1

    for inline in (True, False):
        counted = Recording(InMemoryBackend(partition_count=4, clock=clock))
        options = df.WorkerOptions(inline_activities=inline)
        worker = df.Worker(app.durable_functions, counted, clock=clock, options=options)  # type: ignore[arg-type]
        client = df.DurableOrchestrationClient(counted.inner, registry=app.durable_functions, clock=clock)
        ids = [await client.start_new("chain") for _ in range(10)]
        await worker.run_until_idle()
        assert [(await client.get_status(i)).output for i in ids] == [5] * 10
        assert counted.renewals == 0


# -- the lease keeper and the local host's runner in isolation -------------------------------------------
class _Inner:
    """An acknowledger whose renewals wait for a gate."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.gate = asyncio.Event()

    async def extend(self, delivery: ReceivedMessage, seconds: float) -> None:
        self.events.append("extend")
        await self.gate.wait()
        self.events.append("extended")

    async def done(self, delivery: ReceivedMessage) -> None:
        self.events.append("done")


async def _one_delivery(app: df.DFApp, clock: Any) -> ReceivedMessage:
    @app.orchestration_trigger(context_name="context")
    def noop(context):
        return None
        yield

    backend = InMemoryBackend(partition_count=1, clock=clock)
    await df.DurableOrchestrationClient(backend, registry=app.durable_functions).start_new("noop")
    [delivery] = await backend.receive("control-00", 1, 30)
    assert isinstance(delivery, ReceivedMessage)
    return delivery


async def test_settling_waits_for_the_renewal_in_flight_and_ends_renewal(app, clock):
    delivery = await _one_delivery(app, clock)
    inner = _Inner()
    keeper = LeaseKeeper(inner)  # type: ignore[arg-type]
    async with keeper.holding([delivery], lease=0.2):
        while not inner.events:  # the first renewal (after 0.1 s) is in flight, held at the gate
            await asyncio.sleep(0.01)
        settling = asyncio.create_task(keeper.done(delivery))
        await asyncio.sleep(0.05)
        assert inner.events == ["extend"]  # the settle waits: it must use the renewal's receipt
        assert not settling.done()
        inner.gate.set()
        await settling
        assert inner.events == ["extend", "extended", "done"]
        await asyncio.sleep(0.3)  # settled: no more renewals
    assert inner.events == ["extend", "extended", "done"]


class _FakeQueue:
    queue_name = "jobs"

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.receipts = 0

    async def update_message(self, message_id: str, pop_receipt: str, visibility_timeout: int) -> Any:
        self.calls.append(("update", pop_receipt, visibility_timeout))
        self.receipts += 1
        return SimpleNamespace(pop_receipt=f"r{self.receipts}", next_visible_on=None)

    async def delete_message(self, message_id: str, pop_receipt: str) -> None:
        self.calls.append(("delete", pop_receipt))


def _raw_message() -> Any:
    return SimpleNamespace(id="m1", pop_receipt="r0", content="hello", dequeue_count=1, inserted_on=None,
                           expires_on=None, next_visible_on=None)  # fmt: skip


@pytest.mark.parametrize(("runs_for", "fails"), [(1.3, False), (1.3, True), (0.1, False)])
async def test_the_local_host_renews_a_running_functions_message(runs_for, fails):
    queue = _FakeQueue()
    settings = HostSettings(queue_message_lease=1.0, queue_visibility_timeout=7, message_encoding="none")

    async def function(msg):
        await asyncio.sleep(runs_for)
        if fails:
            raise RuntimeError("failed")

    runner = QueueTriggerRunner("f", function, "msg", queue, _FakeQueue(), settings)  # type: ignore[arg-type]
    await runner._invoke(_raw_message())
    renewals = [("update", "r0", 1), ("update", "r1", 1)] if runs_for > 1 else []  # at 0.5 s and 1 s
    last = f"r{len(renewals)}"  # settled with the receipt of the last renewal
    assert queue.calls == [*renewals, ("update", last, 7) if fails else ("delete", last)]


def test_message_lease_setting(tmp_path: Path) -> None:
    assert HostSettings.load(tmp_path).queue_message_lease == 20.0
    (tmp_path / "host.json").write_text('{"extensions": {"queues": {"messageLease": "00:00:45"}}}')
    assert HostSettings.load(tmp_path).queue_message_lease == 45.0
    (tmp_path / "host.json").write_text('{"extensions": {"queues": {"messageLease": 0.5}}}')
    with pytest.raises(SettingsError, match="messageLease"):
        HostSettings.load(tmp_path)


# -- (c) real processes on Azurite: a process killed while holding an instance's messages ----------------
APP = """
    import asyncio
    import os
    from pathlib import Path

    import azure.functions as func

    import durable as df

    app = df.DFApp(http_auth_level=func.AuthLevel.ANONYMOUS)


    @app.orchestration_trigger(context_name="context")
    def recovery_job(context):
        return (yield context.call_activity("hold_first_attempt", context.get_input()))


    @app.activity_trigger(input_name="folder")
    async def hold_first_attempt(folder: str) -> str:
        # The first attempt holds its message (for good: its process gets killed); later ones finish.
        attempts = Path(folder) / "attempts"
        with attempts.open("a") as file:
            file.write(f"{os.getpid()}\\n")
        if len(attempts.read_text().split()) == 1:
            await asyncio.sleep(3600)
        return f"done by {os.getpid()}"
"""
SLACK = 5.0  # start-up of the step and the activity on the survivor, Azurite, a loaded machine


def _write_app(folder: Path, hub: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "function_app.py").write_text(textwrap.dedent(APP))
    # Every setting but the encoding at its default, messageLease (20 s) included.
    extensions = {"queues": {"messageEncoding": "none"}, "durableTask": {"hubName": hub}}
    (folder / "host.json").write_text(json.dumps({"version": "2.0", "extensions": extensions}))
    return folder


def _attempts(folder: Path) -> list[int]:
    path = folder / "attempts"
    return [int(pid) for pid in path.read_text().split()] if path.exists() else []


async def _wait_for(condition: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def _kill_holder_and_time_the_recovery(
    client: df.DurableOrchestrationClient, folder: Path, lease: float, poll: float,
    start: Any, kill: Any,
) -> float:  # fmt: skip
    """Start a first process, an instance it takes and holds, a second process; keep both alive
    longer than a lease (the holder must keep the message), then kill the holder: the seconds
    until the second one completed the instance."""
    holder_pid = await start()
    instance_id = await client.start_new("recovery_job", None, str(folder))
    await _wait_for(lambda: _attempts(folder), "the first attempt")
    assert _attempts(folder) == [holder_pid]
    survivor_pid = await start()
    await asyncio.sleep(lease + 3)
    assert _attempts(folder) == [holder_pid], "the message was delivered again while its holder was alive"
    killed_at = time.monotonic()
    await kill()
    status = await client.wait_for_completion(instance_id, timeout=lease + poll + 30)
    elapsed = time.monotonic() - killed_at
    assert (status.runtime_status, status.output) == (S.Completed, f"done by {survivor_pid}")
    assert _attempts(folder) == [holder_pid, survivor_pid]
    # The holder last renewed at most half a lease before it died: the message was hidden for
    # between half a lease and a lease more, then taken within a polling interval.
    assert lease / 2 - 1 <= elapsed <= lease + poll + SLACK, elapsed
    print(f"\nrecovered {elapsed:.1f} s after the kill (lease {lease:g} s, polling interval {poll:g} s)")
    return elapsed


@pytest.mark.azurite
async def test_a_killed_worker_process_is_taken_over_within_its_lease(azure_backend, tmp_path):
    app_dir = _write_app(tmp_path / "app", azure_backend.task_hub)
    folder = tmp_path / "run"
    folder.mkdir()
    processes: list[asyncio.subprocess.Process] = []

    async def start() -> int:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.test_recovery", str(app_dir), azure_backend.connection_string,
            azure_backend.task_hub, cwd=REPO_ROOT,
        )  # fmt: skip
        processes.append(process)
        return process.pid

    async def kill() -> None:
        processes[0].kill()
        assert await processes[0].wait() == -signal.SIGKILL

    client = df.DurableOrchestrationClient(azure_backend)
    try:
        elapsed = await _kill_holder_and_time_the_recovery(
            client, folder, DEFAULTS.visibility_timeout,
            PollIntervals.for_lease(DEFAULTS.visibility_timeout, DEFAULTS.idle_poll_max).busy, start, kill,
        )  # fmt: skip
        assert elapsed <= RECOVERY_SECONDS
    finally:
        for process in processes:
            if process.returncode is None:
                process.terminate()
                await process.wait()


def _start_host(app_dir: Path, azurite: str, log_path: Path) -> ServedApp:
    (port,) = free_ports(1)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DURABLE_")}
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "durable", "start", "--app-dir", str(app_dir), "--port", str(port)],
            cwd=REPO_ROOT, env={**clean, "AzureWebJobsStorage": azurite, "PYTHONUNBUFFERED": "1"},
            stdout=log, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
    served = ServedApp(app_dir, port, process, log_path)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not (accepts_connections(port) and "Host started" in served.output()):
        if process.poll() is not None or time.monotonic() > deadline:
            served.stop()
            raise RuntimeError(f"durable start did not come up:\n{served.output()}")
        time.sleep(0.1)
    return served


@pytest.mark.azurite
async def test_a_killed_local_host_is_taken_over_within_its_lease(azurite, tmp_path):
    hub = f"recovery{uuid.uuid4().hex[:10]}"
    app_dir = _write_app(tmp_path / "app", hub)
    folder = tmp_path / "run"
    folder.mkdir()
    settings = HostSettings.load(app_dir)
    assert settings.queue_message_lease == 20.0  # the default
    backend = AzureStorageBackend(azurite, task_hub=hub)
    await backend.create_task_hub()
    hosts: list[ServedApp] = []

    async def start() -> int:
        log_path = tmp_path / f"host-{len(hosts)}.log"
        hosts.append(await asyncio.to_thread(_start_host, app_dir, azurite, log_path))
        return hosts[-1].process.pid

    async def kill() -> None:
        hosts[0].process.kill()
        assert await asyncio.to_thread(hosts[0].process.wait) == -signal.SIGKILL

    try:
        elapsed = await _kill_holder_and_time_the_recovery(
            df.DurableOrchestrationClient(backend), folder, settings.queue_message_lease,
            PollIntervals.for_lease(settings.queue_message_lease, settings.max_queue_polling_interval).busy,
            start, kill,
        )  # fmt: skip
        assert elapsed <= RECOVERY_SECONDS
    finally:
        for host in hosts[1:]:
            assert await asyncio.to_thread(host.stop) == 0, host.output()
        hosts[0].stop()
        await backend.delete_task_hub()
        await backend.close()


# -- a polling worker with the default options, for the Azurite test ------------------------------------
async def _serve(app_dir: str, connection: str, hub: str) -> None:
    app = load_function_app(Path(app_dir))
    backend = AzureStorageBackend(connection, task_hub=hub)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await df.Worker(app.durable_functions, backend).run(stop)  # type: ignore[attr-defined]
    finally:
        await backend.close()


if __name__ == "__main__":
    asyncio.run(_serve(*sys.argv[1:4]))
