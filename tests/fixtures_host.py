"""Pytest fixtures that run an app folder under ``durable start`` in a subprocess, on Azurite.

``serve_app(app_dir, **env)`` (from the ``serve_app`` fixture) starts the local host on a free
port with ``AzureWebJobsStorage`` pointing at the session's Azurite, waits until it listens, and
returns a ``ServedApp`` with its base URL; every host is stopped with Ctrl-C (SIGINT) at the end of
the test, and must exit cleanly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from durable.host._azurite import accepts_connections, free_ports

REPO_ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT = 30.0


@dataclass
class ServedApp:
    app_dir: Path
    port: int
    process: subprocess.Popen[str]
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@pytest.fixture
def serve_app(azurite: str, tmp_path: Path) -> Iterator[Callable[..., ServedApp]]:
    served: list[ServedApp] = []

    def start(app_dir: Path, *args: str, **env: str) -> ServedApp:
        (port,) = free_ports(1)
        log_path = tmp_path / f"host-{port}.log"
        environment = {**os.environ, "AzureWebJobsStorage": azurite, "PYTHONUNBUFFERED": "1", **env}
        log = open(log_path, "w")  # noqa: SIM115 - the child writes to it until it stops
        process = subprocess.Popen(
            [sys.executable, "-m", "durable", "start", "--app-dir", str(app_dir), "--port", str(port), *args],
            cwd=REPO_ROOT,
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        log.close()
        app = ServedApp(app_dir, port, process, log_path)
        served.append(app)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not (accepts_connections(port) and "Host started" in app.output()):
            if process.poll() is not None or time.monotonic() > deadline:
                app.stop()
                raise RuntimeError(f"durable start did not come up:\n{app.output()}")
            time.sleep(0.1)
        return app

    yield start
    for app in served:
        code = app.stop()
        assert code == 0, f"host exited with {code}:\n{app.output()}"
