"""Wake-ups between the processes of one machine that serve one task hub.

A send wakes this process's poller of the queue it went to (``Backend.add_send_listener``), so
work a process sends itself starts at once. Processes sharing a task hub on one machine —
``durable start --workers N``, or several hosts side by side — learned of each other's sends only
from their next poll: a signal to an entity whose partition the other process holds, or an
activity an idle sibling could run, waited up to ``HOT_POLL_MAX`` or ``HELD_POLL_MAX`` seconds
(``_ownership``), once per hop between them.

So each such process listens on a UDP port of 127.0.0.1 and registers it as a file in a directory
of this machine's user named after the task hub (its storage endpoint and name). After sends, it
tells every other registered process which queues it sent to: one datagram each per turn of the
event loop (of up to 64 queues), however many sends it made. A process told of a queue wakes its
poller as if it had sent to it itself: the poller of a partition another process holds does
nothing; the holder receives at once, as does anyone for a partition nobody holds, and for the
work-item queue.

A wake-up is a hint, never a condition of delivery: polling goes on as before, a datagram lost
costs only the wait it would have saved, a process that died leaves a file the next sender
prunes, and a datagram without its receiver's token (in its file, which only this user can read)
is ignored. Processes on different machines still wait for their polls; so do processes on
Windows, where this is off.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ._backend import Backend, SendListener, control_queue
from ._ownership import PartitionOwnership

log = logging.getLogger("durable.worker")

PEERS_REFRESH_SECONDS = 1.0  # how stale this process's list of the others may be
# A send due further ahead is not announced: the receiver's polling finds it (wake-ups are for
# hops, not for timers).
MAX_ANNOUNCED_DELAY = 60.0
MIN_WAKE_INTERVAL = 0.005  # a queue is woken by the others at most this often: a busy sender
MAX_WAKES_PER_DATAGRAM = 64  # ...does not make a poller receive after each of its turns
MAX_DATAGRAM_BYTES = 8192


def wake_root() -> Path:
    """Where the processes of this machine's user register, one directory per task hub."""
    return Path(tempfile.gettempdir()) / f"durable-wake-{os.getuid()}"


def registry_of(group: str, root: Path | None = None) -> Path:
    """The directory where the processes serving the task hub ``group`` names register."""
    return (root or wake_root()) / hashlib.sha256(group.encode()).hexdigest()[:24]


class LocalWakes(asyncio.DatagramProtocol):
    """This process's end of the wake-ups (see the module): ``sent`` is its backend's send
    listener; ``wake`` is called with a queue another process sent to, and a delay.

    Each registered process's file holds a random token that only readers of the registry (this
    user: it is private to them) learn; a datagram must carry its receiver's token."""

    def __init__(
        self,
        group: str,
        wake: SendListener,
        *,
        held_here: Callable[[str], bool] = lambda queue: False,
        root: Path | None = None,
    ) -> None:
        self.group = group
        self.wake = wake
        self.held_here = held_here  # a queue whose sends only this process takes: nobody to tell
        self.root = root
        self.directory: Path | None = None
        self._token = secrets.token_hex(16)
        self._transport: asyncio.DatagramTransport | None = None
        self._entry: Path | None = None
        self._peers: list[tuple[int, str]] = []  # port, token
        self._peers_read = -math.inf
        self._pending: set[tuple[str, float]] = set()  # sent to, not told yet
        self._waking: set[tuple[str, float]] = set()  # told of, its poller not woken yet
        self._last_woken: dict[str, float] = {}
        self._flush_due = False

    @property
    def port(self) -> int | None:
        return None if self._transport is None else int(self._transport.get_extra_info("sockname")[1])

    async def start(self) -> None:
        """Listen on 127.0.0.1 and register; a failure leaves this process polling only."""
        try:
            loop = asyncio.get_running_loop()
            transport, _ = await loop.create_datagram_endpoint(lambda: self, local_addr=("127.0.0.1", 0))
            self._transport = transport
            self.directory = registry_of(self.group, self.root)
            self._register()
        except Exception as exc:
            log.warning("processes of this machine will not wake this one on their sends: %r", exc)
            self.close()

    def _register(self) -> None:
        assert self.directory is not None
        entry = self.directory / f"{os.getpid()}-{self.port}"
        for attempt in range(2):
            try:
                _private_directory(self.directory.parent)  # again when re-made: a cleaner took it
                self.directory.mkdir(mode=0o700, exist_ok=True)
                written = entry.with_name(f".{entry.name}")
                written.write_text(self._token)
                os.replace(written, entry)  # readers see the token whole, or no entry
                break
            except FileNotFoundError:  # the last process out removed the directory meanwhile
                if attempt:
                    raise
        self._entry = entry

    def close(self) -> None:
        """Unregister and stop listening; never raises (it runs on the way out of a worker)."""
        entry, directory, self._entry = self._entry, self.directory, None
        try:
            if entry is not None and directory is not None:
                entry.unlink(missing_ok=True)
                list(self._read_peers())  # prunes the entries of processes that died
                directory.rmdir()  # the last one out: no directory left per task hub
        except Exception as exc:  # others are registered still, or the folder is not ours to tidy
            log.debug("leaving the wake-up registry: %r", exc)
        finally:
            if self._transport is not None:
                self._transport.close()
                self._transport = None

    # -- telling -------------------------------------------------------------------------------
    def sent(self, queue: str, delay: float) -> None:
        """A send of this process (a ``SendListener``): tell the others on the next turn of the loop."""
        if self._transport is None or delay > MAX_ANNOUNCED_DELAY or self.held_here(queue):
            return
        # rounded up: a poller woken before the message is visible would find nothing
        self._pending.add((queue, math.ceil(max(delay, 0.0) * 10) / 10))
        if not self._flush_due:
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_due = False
        wakes, self._pending = sorted(self._pending), set()
        transport = self._transport
        if transport is None or not wakes:
            return
        for start in range(0, len(wakes), MAX_WAKES_PER_DATAGRAM):
            told = wakes[start : start + MAX_WAKES_PER_DATAGRAM]
            for port, token in self._peer_list():
                transport.sendto(json.dumps({"token": token, "wake": told}).encode(), ("127.0.0.1", port))

    def _peer_list(self) -> list[tuple[int, str]]:
        now = time.monotonic()
        if now - self._peers_read >= PEERS_REFRESH_SECONDS:
            self._peers_read = now
            self._peers = list(self._read_peers())
            if self._entry is not None and not self._entry.exists():  # a temp-folder cleaner took it
                with contextlib.suppress(OSError):
                    self._register()
        return self._peers

    def _read_peers(self) -> Iterator[tuple[int, str]]:
        if self.directory is None:
            return
        try:
            entries = list(self.directory.iterdir())
        except OSError:
            return
        for entry in entries:
            if entry == self._entry:
                continue
            being_written = entry.name.startswith(".")  # ``_register``'s file before its rename
            try:
                pid, port = (int(part) for part in entry.name.removeprefix(".").split("-"))
                if not 0 < port < 65536:
                    continue
                if not _alive(pid):
                    entry.unlink()  # a process that died without unregistering, or while registering
                    continue
                if being_written:
                    continue
                token = entry.read_text()
            except (OSError, ValueError, OverflowError):  # not an entry
                continue
            yield port, token

    # -- being told ----------------------------------------------------------------------------
    def datagram_received(self, data: bytes, addr: Any) -> None:
        if len(data) > MAX_DATAGRAM_BYTES:
            return
        try:
            told = json.loads(data)
            token = told.get("token") if isinstance(told, dict) else None
            if not isinstance(token, str) or not hmac.compare_digest(token, self._token):
                return  # not from a process of this user serving this task hub
            wakes = [(str(queue), float(delay)) for queue, delay in told["wake"][:MAX_WAKES_PER_DATAGRAM]]
        except Exception:  # malformed: any parse error whatsoever
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        for queue, delay in wakes:
            if not 0.0 <= delay <= MAX_ANNOUNCED_DELAY or (queue, delay) in self._waking:
                continue
            # On a later turn (what more datagrams of this turn tell wakes it once), and not more
            # often than every MIN_WAKE_INTERVAL.
            self._waking.add((queue, delay))
            later = max(0.0, self._last_woken.get(queue, -math.inf) + MIN_WAKE_INTERVAL - now)
            loop.call_later(later, self._woken, queue, delay)

    def _woken(self, queue: str, delay: float) -> None:
        self._waking.discard((queue, delay))
        self._last_woken[queue] = asyncio.get_running_loop().time()
        self.wake(queue, delay)

    def error_received(self, exc: Exception) -> None:
        log.debug("a wake-up datagram was refused: %r", exc)  # a process gone since the last look


async def start_local_wakes(
    backend: Backend, wake: SendListener, ownership: PartitionOwnership | None
) -> LocalWakes | None:
    """Wake-ups with the other processes of this machine serving ``backend``'s task hub, started
    and listening to its sends; None when the backend lives in this process only (or on Windows,
    whose temp folder and UDP sockets this does not rely on)."""
    group: str | None = getattr(backend, "local_wake_group", None)
    if group is None or sys.platform == "win32":
        return None
    partitions = {control_queue(p): p for p in range(backend.partition_count)}

    def held_here(queue: str) -> bool:
        partition = partitions.get(queue)
        return ownership is not None and partition is not None and ownership.holds(partition)

    wakes = LocalWakes(group, wake, held_here=held_here)
    await wakes.start()
    if wakes.port is None:
        return None
    backend.add_send_listener(wakes.sent)
    return wakes


def _private_directory(path: Path) -> None:
    """Make ``path`` (the user's registry) unless it exists, and make sure nobody else can read
    or plant anything in it: a directory (not a link) of this user's, closed to others."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    found = os.lstat(path)
    if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.getuid() or found.st_mode & 0o077:
        raise PermissionError(f"{path} is not a directory private to this user")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process now (ours registered in a private folder)
        return False
    return True
