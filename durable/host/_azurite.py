"""Starting and stopping the Azurite storage emulator (installed from npm into ``node_modules``).

Used by the local host (``durable start``), the test fixtures and the benchmarks, so a fresh
machine needs nothing but ``npm ci``.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from storage.azure._connection import DEFAULT_PORTS, connection_string
from storage.azure._connection import resolve_connection_string as resolve_connection_string

STARTUP_TIMEOUT = 30.0


def free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def accepts_connections(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def find_azurite(start: Path | None = None) -> Path:
    """The ``azurite`` executable from the nearest ``node_modules`` at or above ``start``."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents, Path(__file__).resolve().parent.parent):
        candidate = folder / "node_modules" / ".bin" / "azurite"
        if candidate.exists():
            return candidate
    found = shutil.which("azurite")
    if found:
        return Path(found)
    raise FileNotFoundError("Azurite is not installed: run `npm ci` in the project folder (the Makefile does)")


class Azurite:
    """An Azurite process on 127.0.0.1; ``ports=None`` picks free ports, data in ``location``
    (a temporary folder, removed on stop, when not given)."""

    def __init__(self, ports: tuple[int, int, int] | None = None, location: Path | None = None) -> None:
        if ports is None:
            blob, queue, table = free_ports(3)
            ports = (blob, queue, table)
        self.ports = ports
        self._location = location
        self._tempdir: str | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def connection_string(self) -> str:
        return connection_string(*self.ports)

    def start(self) -> Azurite:
        location = self._location
        if location is None:
            self._tempdir = tempfile.mkdtemp(prefix="azurite-")
            location = Path(self._tempdir)
        location.mkdir(parents=True, exist_ok=True)
        log = open(location / "azurite.log", "wb")  # noqa: SIM115 - owned by the child process
        command = [str(find_azurite()), "--silent", "--skipApiVersionCheck", "--disableTelemetry", "--loose"]
        command += ["--location", str(location)]
        for service, port in zip(("blob", "queue", "table"), self.ports, strict=True):
            command += [f"--{service}Host", "127.0.0.1", f"--{service}Port", str(port)]
        self._process = subprocess.Popen(
            command,
            cwd=location,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C in a terminal goes to us; we stop Azurite ourselves
        )
        log.close()
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not all(accepts_connections(p) for p in self.ports):
            if self._process.poll() is not None:
                output = (location / "azurite.log").read_text(errors="replace")
                raise RuntimeError(f"Azurite exited with code {self._process.returncode}:\n{output}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"Azurite did not listen on {self.ports} within {STARTUP_TIMEOUT} s")
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None
        if self._tempdir is not None:
            shutil.rmtree(self._tempdir, ignore_errors=True)
            self._tempdir = None

    def __enter__(self) -> Azurite:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def ensure_running(connection: str, data_folder: Path) -> Azurite | None:
    """Start Azurite on the default ports when ``connection`` means the local emulator and none
    is listening yet; returns the started emulator (the caller stops it), or None."""
    if resolve_connection_string(connection) != connection_string(*DEFAULT_PORTS):
        return None
    if all(accepts_connections(p) for p in DEFAULT_PORTS):
        return None
    return Azurite(DEFAULT_PORTS, location=data_folder).start()


__all__ = ["Azurite", "connection_string", "ensure_running", "resolve_connection_string"]
