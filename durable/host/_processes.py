"""``durable start --workers N``: more processes running one app's queue triggers on its task hub.

A Python process runs one step at a time (the GIL), so on a machine with cores to spare the host
runs ``N - 1`` worker processes beside the one that serves HTTP, as the Functions host runs
``FUNCTIONS_WORKER_PROCESS_COUNT`` language workers. A worker process is a host without an HTTP
server: it indexes the same app and polls the same queues. The task hub's partitions spread over
the processes through their leases, as over several hosts (``runtime._ownership``); the shared
work-item queue goes to whichever process asks first.

The serving process supervises them: one that exits is started again (after a pause that grows
while it keeps exiting at once), and stopping the host stops them (SIGTERM: each gives its
invocations the same grace as the host and writes what it held back). A worker process whose
serving process is gone (killed without a chance to stop it) stops by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from storage.azure._accounting import COUNTS_FILE_SETTING

log = logging.getLogger("durable.host")

WORKER_PROCESS_COUNT_SETTING = "FUNCTIONS_WORKER_PROCESS_COUNT"  # the Functions app setting
# In a worker process's environment: the pid of the process that serves HTTP and started it.
SERVING_PROCESS_SETTING = "DURABLE_SERVING_PROCESS"
MAX_WORKER_PROCESSES = 10  # the Functions host's limit for FUNCTIONS_WORKER_PROCESS_COUNT
RESTART_PAUSE = 1.0  # before starting an exited worker process again; doubled while it keeps exiting
RESTART_PAUSE_MAX = 30.0
STABLE_SECONDS = 30.0  # a process that ran this long before exiting is restarted after the shortest pause
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


def counts_file_of(number: int, environment: Mapping[str, str]) -> dict[str, str]:
    """Worker process ``number``'s own request-counts file beside the host's (``counts.json`` ->
    ``counts-worker2.json``), if the host writes one: each process counts its own requests."""
    path = environment.get(COUNTS_FILE_SETTING)
    if not path:
        return {}
    own = Path(path)
    return {COUNTS_FILE_SETTING: str(own.with_name(f"{own.stem}-worker{number}{own.suffix}"))}


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
        pause = RESTART_PAUSE
        while not stop.is_set():
            started = time.monotonic()
            environment = {
                **os.environ,
                **counts_file_of(number, os.environ),
                SERVING_PROCESS_SETTING: str(os.getpid()),
            }
            process = await asyncio.create_subprocess_exec(*self.command, str(number), env=environment)
            self.processes[number] = process
            log.info("worker process %d started (pid %d)", number, process.pid)
            exited = asyncio.ensure_future(process.wait())
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not exited.done():
                await self._stop(process, exited)
                return
            if time.monotonic() - started >= STABLE_SECONDS:
                pause = RESTART_PAUSE
            log.warning("worker process %d exited with code %s; starting it again in %.0f s",
                        number, process.returncode, pause)  # fmt: skip
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), pause)
            pause = min(pause * 2, RESTART_PAUSE_MAX)

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


def serving_process() -> int:
    """In a worker process: the pid of the serving process (its parent, unless already gone)."""
    return int(os.environ.get(SERVING_PROCESS_SETTING) or os.getppid())


async def stop_when_orphaned(stop: asyncio.Event, parent: int) -> None:
    """Set ``stop`` once this process's parent (the serving process, ``parent``) is gone: the
    process is then re-parented, which ``getppid`` shows (on POSIX)."""
    while not stop.is_set():
        if os.getppid() != parent:
            log.warning("the serving process (pid %d) is gone; stopping", parent)
            stop.set()
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), PARENT_CHECK_SECONDS)


def worker_command(app_dir: Path, port: int, verbose: bool) -> list[str]:
    """``durable start`` for a worker process of the host serving ``app_dir`` on ``port`` (the
    management URLs the app hands out name the serving process); its number goes last."""
    command = [sys.executable, "-m", "durable", "start", "--app-dir", str(app_dir), "--port", str(port)]
    return [*command, *(["--verbose"] if verbose else []), "--worker-process"]
