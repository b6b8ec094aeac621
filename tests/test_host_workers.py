"""``durable start --workers N``: worker processes beside the serving one, on Azurite.

They share the task hub (its partitions spread over the processes through their leases), are
started again when they exit, stop with the host, and stop by themselves when the serving process
is killed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from durable.host import _processes
from durable.host._azurite import free_ports
from durable.runtime._wake import registry_of
from storage.azure import AzureStorageBackend
from storage.azure._accounting import COUNTS_FILE_SETTING
from tests.fixtures_host import REPO_ROOT, ServedApp
from tests.test_local_host import unique, write_app

APP = """
    import os

    import azure.functions as func

    import durable as df

    app = df.DFApp(http_auth_level=func.AuthLevel.ANONYMOUS)
    app.register_functions(df.http_starter())


    @app.orchestration_trigger(context_name="context")
    def where(context: df.DurableOrchestrationContext):
        return (yield context.call_activity("pid", None))


    @app.activity_trigger(input_name="unused")
    def pid(unused: None) -> int:
        return os.getpid()
"""
WORKER_STARTED = re.compile(r"worker process (\d+) started \(pid (\d+)\)")


def write_workers_app(folder: Path) -> Path:
    return write_app(folder, APP, {"durableTask": {"hubName": unique("Workers")}})


def worker_pids(served: ServedApp) -> dict[int, int]:
    """Worker process number -> its pid, the last one the host started under that number."""
    return {int(number): int(pid) for number, pid in WORKER_STARTED.findall(served.output())}


def wait_for(condition: Callable[[], object], what: str, served: ServedApp, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen:\n{served.output()}"
        time.sleep(0.1)


def is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited; its parent has not reaped it yet


async def run_orchestrations(base_url: str, count: int) -> list[int]:
    """Start ``count`` orchestrations through the app's HTTP starter and wait for their outputs."""
    async with aiohttp.ClientSession() as http:

        async def one() -> int:
            async with http.post(f"{base_url}/api/orchestrators/where") as answer:
                assert answer.status == 202, await answer.text()
                status_url = (await answer.json())["statusQueryGetUri"]
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                async with http.get(status_url) as answer:
                    status = await answer.json()
                if status["runtimeStatus"] == "Completed":
                    return int(status["output"])
                assert status["runtimeStatus"] in ("Pending", "Running"), status
                await asyncio.sleep(0.2)
            raise AssertionError(f"not completed: {status}")

        return list(await asyncio.gather(*(one() for _ in range(count))))


async def test_worker_processes_share_the_task_hub_and_stop_with_the_host(
    serve_app: Callable[..., ServedApp], tmp_path: Path, azurite: str
) -> None:
    app_dir = write_workers_app(tmp_path / "app")
    served = serve_app(app_dir, "--workers", "2")
    assert "with 2 worker processes" in served.output()
    wait_for(lambda: 2 in worker_pids(served), "worker process 2's start", served)
    worker = worker_pids(served)[2]
    ran_in: set[int] = set()
    deadline = time.monotonic() + 60
    # Under steady work the worker process takes partitions from the serving one within a few
    # ownership rounds (their activities then run where their orchestrations do).
    while worker not in ran_in:
        assert time.monotonic() < deadline, f"nothing ran in the worker process:\n{served.output()}"
        ran_in.update(await run_orchestrations(served.base_url, 8))
    assert ran_in <= {served.process.pid, worker}
    # Each is told of the other's sends (durable.runtime._wake): both registered for the hub.
    hub = json.loads((app_dir / "host.json").read_text())["extensions"]["durableTask"]["hubName"]
    backend = AzureStorageBackend(azurite, task_hub=hub)
    registered = registry_of(backend.local_wake_group)
    await backend.close()
    assert {int(entry.name.split("-")[0]) for entry in registered.iterdir()} == {served.process.pid, worker}
    assert served.stop() == 0
    assert not registered.exists()  # unregistered on the way out
    assert not is_running(worker)
    assert "Host stopped." in served.output()


def test_a_worker_process_that_exits_is_started_again(serve_app: Callable[..., ServedApp], tmp_path: Path) -> None:
    # The app setting the Functions host reads, instead of --workers.
    served = serve_app(write_workers_app(tmp_path / "app"), FUNCTIONS_WORKER_PROCESS_COUNT="3")
    wait_for(lambda: {2, 3} <= set(worker_pids(served)), "the worker processes' start", served)
    first = worker_pids(served)[3]
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: worker_pids(served)[3] != first, "worker process 3's restart", served)
    assert "worker process 3 exited with code -9; starting it again" in served.output()
    assert is_running(worker_pids(served)[3]) and is_running(worker_pids(served)[2])


def test_worker_processes_stop_when_the_serving_process_is_killed(azurite: str, tmp_path: Path) -> None:
    app_dir = write_workers_app(tmp_path / "app")
    (port,) = free_ports(1)
    log_path = tmp_path / "host.log"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DURABLE_", "FUNCTIONS_"))}
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "durable", "start", "-d", str(app_dir), "--port", str(port), "--workers", "2"],
            cwd=REPO_ROOT,
            env={**clean, "AzureWebJobsStorage": azurite, "PYTHONUNBUFFERED": "1"},
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
    served = ServedApp(app_dir, port, process, log_path)
    try:
        wait_for(lambda: 2 in worker_pids(served), "worker process 2's start", served)
        process.kill()
        process.wait()
        wait_for(lambda: not is_running(worker_pids(served)[2]), "the worker process's stop", served)
        assert "the serving process" in served.output() and "is gone; stopping" in served.output()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for pid in worker_pids(served).values():  # none is left behind, whatever failed
            if is_running(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("count", ["0", "11", "two"])
def test_a_bad_worker_count_is_refused(azurite: str, tmp_path: Path, count: str) -> None:
    app_dir = write_workers_app(tmp_path / "app")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DURABLE_", "FUNCTIONS_"))}
    result = subprocess.run(
        [sys.executable, "-m", "durable", "start", "--app-dir", str(app_dir), "--port", str(free_ports(1)[0])],
        cwd=REPO_ROOT,
        env={**clean, "AzureWebJobsStorage": azurite, "FUNCTIONS_WORKER_PROCESS_COUNT": count},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert f"the number of worker processes must be 1 to 10, got {count!r}" in result.stderr


# -- the supervisor on its own: commands that are not hosts --------------------------------------------
async def test_a_worker_process_that_keeps_exiting_at_start_up_is_given_up(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_processes, "RESTART_PAUSE", 0.01)
    caplog.set_level(logging.INFO, logger="durable.host")
    exits = [sys.executable, "-c", "import sys; sys.exit(3)"]  # the number is its argument
    supervisor = _processes.WorkerProcesses(exits, count=2, stop_timeout=5)
    await asyncio.wait_for(supervisor.run(asyncio.Event()), 60)  # ends by itself: given up
    started = [r for r in caplog.records if r.getMessage().startswith("worker process 2 started")]
    assert len(started) == _processes.MAX_QUICK_EXITS + 1
    assert "worker process 2 exited 6 times in a row right after it started" in caplog.text
    assert "exited with code 3; starting it again" in caplog.text


async def test_a_worker_process_started_again_counts_its_requests_in_a_file_of_its_own(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Each start of worker process 2 writes the counts file it is given, then exits: a restart
    must not overwrite what the process before it counted (the benchmark adds the files up)."""
    monkeypatch.setattr(_processes, "RESTART_PAUSE", 0.01)
    monkeypatch.setenv(COUNTS_FILE_SETTING, str(tmp_path / "counts.json"))
    write = f"pathlib.Path(os.environ[{COUNTS_FILE_SETTING!r}]).write_text(str(os.getpid()))"
    writes = [sys.executable, "-c", f"import os, pathlib, sys; {write}; sys.exit(3)"]
    supervisor = _processes.WorkerProcesses(writes, count=2, stop_timeout=5)
    await asyncio.wait_for(supervisor.run(asyncio.Event()), 60)  # given up after its quick exits
    files = sorted(tmp_path.glob("counts-worker*.json"))
    assert len(files) == _processes.MAX_QUICK_EXITS + 1  # one per start
    assert len({f.read_text() for f in files}) == len(files)  # each written by another process
    assert tmp_path / "counts-worker2.json" in files


async def test_a_worker_process_that_ignores_sigterm_is_killed(monkeypatch: pytest.MonkeyPatch) -> None:
    stubborn = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "print('ready', flush=True); time.sleep(60)"]  # fmt: skip
    supervisor = _processes.WorkerProcesses(stubborn, count=2, stop_timeout=0.5)
    stop = asyncio.Event()
    running = asyncio.create_task(supervisor.run(stop))
    while 2 not in supervisor.processes:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.5)  # its SIGTERM handler is set
    stop.set()
    await asyncio.wait_for(running, 10)
    assert supervisor.processes[2].returncode == -signal.SIGKILL
