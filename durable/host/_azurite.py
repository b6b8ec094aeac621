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
from urllib.parse import urlsplit

from storage.azure._connection import DEV_ACCOUNT, connection_string
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

    @property
    def pid(self) -> int | None:
        """The emulator's process id while it runs (benchmarks read its CPU time)."""
        return self._process.pid if self._process is not None else None

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
        try:
            self._wait_listening(location)
        except BaseException:  # a timeout, or Ctrl-C / SIGTERM while waiting: leave nothing behind
            self.stop()
            raise
        return self

    def _wait_listening(self, location: Path) -> None:
        assert self._process is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not all(accepts_connections(p) for p in self.ports):
            if self._process.poll() is not None:
                output = (location / "azurite.log").read_text(errors="replace")
                raise RuntimeError(f"Azurite exited with code {self._process.returncode}:\n{output}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"Azurite did not listen on {self.ports} within {STARTUP_TIMEOUT} s")
            time.sleep(0.1)

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
    """Start Azurite when ``connection`` means the local emulator (``UseDevelopmentStorage=true``,
    or the development account on 127.0.0.1 ports) and nothing listens there yet; returns the
    started emulator (the caller stops it), or None."""
    ports = local_emulator_ports(connection)
    if ports is None or all(accepts_connections(p) for p in ports):
        return None
    return Azurite(ports, location=data_folder).start()


def _fields(connection: str) -> dict[str, str]:
    parts = (part.split("=", 1) for part in resolve_connection_string(connection).split(";") if "=" in part)
    return {key.strip(): value.strip() for key, value in parts}


def local_emulator_ports(connection: str) -> tuple[int, int, int] | None:
    """The (blob, queue, table) ports of a connection string to Azurite's development account on
    this machine; None for anything else."""
    fields = _fields(connection)
    if fields.get("AccountName") != DEV_ACCOUNT:
        return None
    ports = []
    for key in ("BlobEndpoint", "QueueEndpoint", "TableEndpoint"):
        endpoint = urlsplit(fields.get(key, ""))
        if endpoint.scheme != "http" or not _is_local(endpoint.hostname) or endpoint.port is None:
            return None
        ports.append(endpoint.port)
    return ports[0], ports[1], ports[2]


def _is_local(host: str | None) -> bool:
    return host in ("127.0.0.1", "localhost", "::1")


def storage_unreachable(endpoint: str, error: BaseException | None = None) -> str:
    """What to tell a user whose storage endpoint does not answer: where, and how to fix it."""
    parts = urlsplit(endpoint)
    where = f"{parts.scheme}://{parts.netloc}" if parts.netloc else endpoint
    if _is_local(parts.hostname):
        hint = (
            "is Azurite running? Start it with `node_modules/.bin/azurite` (or `npx azurite`), or set "
            "AzureWebJobsStorage to UseDevelopmentStorage=true and `durable start` starts it for you"
        )
    else:
        hint = "check the storage account's connection string and that this machine can reach it"
    cause = f" ({type(error).__name__})" if error is not None else ""
    return f"cannot reach Azure Storage at {where}{cause}: {hint}"


def unreachable_local_storage(connection: str) -> str | None:
    """For a connection string to storage on this machine (Azurite): the message of
    ``storage_unreachable`` when one of its endpoints does not accept connections, else None.
    Remote accounts are not probed."""
    fields = _fields(connection)
    for key in ("QueueEndpoint", "TableEndpoint", "BlobEndpoint"):
        endpoint = fields.get(key)
        if not endpoint:
            continue
        parts = urlsplit(endpoint)
        if _is_local(parts.hostname) and not accepts_connections(parts.port or 80, parts.hostname or "127.0.0.1"):
            return storage_unreachable(endpoint)
    return None


__all__ = [
    "Azurite",
    "connection_string",
    "ensure_running",
    "local_emulator_ports",
    "resolve_connection_string",
    "storage_unreachable",
    "unreachable_local_storage",
]
