"""``durable start --workers N``: more processes running one app's queue triggers on its task hub.

A Python process runs one step at a time (the GIL), so on a machine with cores to spare the host
runs ``N - 1`` worker processes beside the one that serves HTTP, as the Functions host runs
``FUNCTIONS_WORKER_PROCESS_COUNT`` language workers. A worker process is a host without an HTTP
server: it indexes the same app and polls the same queues. The task hub's partitions spread over
the processes through their leases, as over several hosts (``runtime._ownership``); the shared
work-item queue goes to whichever process asks first.

The serving process supervises them: one that exits is started again (after a pause that grows
while it keeps exiting soon after its start; after ``MAX_QUICK_EXITS`` such exits in a row it is
left stopped, and the others take over its share), and stopping the host stops them (SIGTERM:
each gives its invocations the same grace as the host and writes what it held back). A worker
process whose serving process is gone (killed without a chance to stop it) stops by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from storage.azure._accounting import COUNTS_FILE_SETTING

from ..runtime._polling import wait_for_any

log = logging.getLogger("durable.host")

WORKER_PROCESS_COUNT_SETTING = "FUNCTIONS_WORKER_PROCESS_COUNT"  # the Functions app setting
# In a worker process's environment: the pid of the process that serves HTTP and started it.
SERVING_PROCESS_SETTING = "DURABLE_SERVING_PROCESS"
MAX_WORKER_PROCESSES = 10  # the Functions host's limit for FUNCTIONS_WORKER_PROCESS_COUNT
RESTART_PAUSE = 1.0  # before starting an exited worker process again; doubled while it keeps exiting
RESTART_PAUSE_MAX = 30.0
STABLE_SECONDS = 30.0  # a process that ran this long before exiting is restarted after the shortest pause
MAX_QUICK_EXITS = 5  # exits in a row, each within STABLE_SECONDS of its start, before giving up on it
PARENT_CHECK_SECONDS = 1.0


def parse_worker_count(value: str | int) -> int:
    """A process count from ``--workers`` or the app setting: 1 to ``MAX_WORKER_PROCESSES``."""
    try:
        count = int(value)
    except ValueError:
        count = 0
    if not 1 <= count <= MAX_WORKER_PROCESSES:
        raise ValueError(f"the number of worker processes must be 1 to {MAX_WORKER_PROCESSES}, got {value!r}")
    return count


def counts_file_of(number: int, environment: Mapping[str, str], restart: int = 0) -> dict[str, str]:
    """Worker process ``number``'s own request-counts file beside the host's (``counts.json`` ->
    ``counts-worker2.json``), if the host writes one: each process counts its own requests. A
    process started again gets a file of its own (``counts-worker2-restart1.json``), so the
    requests of the one before it still count."""
    path = environment.get(COUNTS_FILE_SETTING)
    if not path:
        return {}
    own = Path(path)
    again = f"-restart{restart}" if restart else ""
    return {COUNTS_FILE_SETTING: str(own.with_name(f"{own.stem}-worker{number}{again}{own.suffix}"))}


class WorkerProcesses:
    """Worker processes 2..``count`` of a host, each started with ``command + [number]``."""

    def __init__(self, command: Sequence[str], count: int, stop_timeout: float) -> None:
        self.command = list(command)
        self.count = count
        self.stop_timeout = stop_timeout  # after SIGTERM, before SIGKILL
        self.processes: dict[int, asyncio.subprocess.Process] = {}

    async def run(self, stop: asyncio.Event) -> None:
        """Keep the worker processes running until ``stop`` is set; then stop them."""
        await asyncio.gather(*(self._keep(number, stop) for number in range(2, self.count + 1)))

    async def _keep(self, number: int, stop: asyncio.Event) -> None:
        pause, quick_exits = RESTART_PAUSE, 0
        for restart in itertools.count():
            if stop.is_set():
                return
            started = time.monotonic()
            process = await self._start(number, restart)
            if process is not None:
                exited = asyncio.ensure_future(process.wait())
                stopping = asyncio.ensure_future(stop.wait())
                await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
                stopping.cancel()
                if not exited.done():
                    await self._stop(process, exited)
                    return
            if stop.is_set():
                return
            if time.monotonic() - started >= STABLE_SECONDS:
                pause, quick_exits = RESTART_PAUSE, 0
            quick_exits += 1
            if quick_exits > MAX_QUICK_EXITS:
                log.error("worker process %d exited %d times in a row right after it started; not starting it "
                          "again (the other processes take over its share)", number, quick_exits)  # fmt: skip
                return
            code = "" if process is None else f" with code {process.returncode}"
            log.warning("worker process %d exited%s; starting it again in %.0f s", number, code, pause)
            await wait_for_any((stop,), pause)
            pause = min(pause * 2, RESTART_PAUSE_MAX)

    async def _start(self, number: int, restart: int) -> asyncio.subprocess.Process | None:
        counts = counts_file_of(number, os.environ, restart)
        environment = {**os.environ, **counts, SERVING_PROCESS_SETTING: str(os.getpid())}
        try:
            process = await asyncio.create_subprocess_exec(*self.command, str(number), env=environment)
        except OSError as exc:  # out of processes or memory: as if it had exited at once
            log.warning("could not start worker process %d: %s", number, exc)
            return None
        self.processes[number] = process
        log.info("worker process %d started (pid %d)", number, process.pid)
        return process

    async def _stop(self, process: asyncio.subprocess.Process, exited: asyncio.Future[int]) -> None:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            await asyncio.wait_for(asyncio.shield(exited), self.stop_timeout)
        except asyncio.TimeoutError:
            log.warning("worker process %d did not stop in %.0f s; killing it", process.pid, self.stop_timeout)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await exited


class ServingProcess:
    """In a worker process: whether the process that started it (and serves HTTP) is still there.
    Its parent is recorded at start-up: once that process is gone, this one is re-parented, which
    ``getppid`` shows (on POSIX). A parent that is not the serving process the environment names
    means that one was gone before this process got going."""

    def __init__(self) -> None:
        self.parent = os.getppid()
        named = os.environ.get(SERVING_PROCESS_SETTING)
        self.pid = int(named) if named else self.parent
        self.gone_at_start = os.name == "posix" and self.pid != self.parent

    def is_gone(self) -> bool:
        return self.gone_at_start or os.getppid() != self.parent


async def stop_when_orphaned(stop: asyncio.Event, serving: ServingProcess) -> None:
    """Set ``stop`` once the serving process is gone (killed without a chance to stop this one)."""
    while not stop.is_set():
        if serving.is_gone():
            log.warning("the serving process (pid %d) is gone; stopping", serving.pid)
            stop.set()
            return
        await wait_for_any((stop,), PARENT_CHECK_SECONDS)


def worker_command(app_dir: Path, port: int, verbose: bool) -> list[str]:
    """``durable start`` for a worker process of the host serving ``app_dir`` on ``port`` (the
    management URLs the app hands out name the serving process); its number goes last."""
    command = [sys.executable, "-m", "durable", "start", "--app-dir", str(app_dir), "--port", str(port)]
    return [*command, *(["--verbose"] if verbose else []), "--worker-process"]
