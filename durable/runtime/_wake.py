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
event loop, however many sends it made. A process told of a queue wakes its poller as if it had
sent to it itself: the poller of a partition another process holds does nothing; the holder
receives at once, as does anyone for a partition nobody holds, and for the work-item queue.

A wake-up is a hint, never a condition of delivery: polling goes on as before, a datagram lost
costs only the wait it would have saved, a process that died leaves a file the next sender
prunes, and a datagram naming another task hub is ignored. Processes on different machines
still wait for their polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import hashlib
import json
import logging
import math
import os
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
GATHER_SECONDS = 0.02  # a poller told of a send wakes this much later, with what came meanwhile


def wake_root() -> Path:
    """Where the processes of this machine's user register, one directory per task hub."""
    return Path(tempfile.gettempdir()) / f"durable-wake-{_safe(getpass.getuser())}"


def registry_of(group: str, root: Path | None = None) -> Path:
    """The directory where the processes serving the task hub ``group`` names register."""
    return (root or wake_root()) / hashlib.sha256(group.encode()).hexdigest()[:24]


class LocalWakes(asyncio.DatagramProtocol):
    """This process's end of the wake-ups (see the module): ``sent`` is its backend's send
    listener; ``wake`` is called with a queue another process sent to, and a delay."""

    def __init__(
        self,
        group: str,
        wake: SendListener,
        *,
        held_here: Callable[[str], bool] = lambda queue: False,
        root: Path | None = None,
    ) -> None:
        self.wake = wake
        self.held_here = held_here  # a queue whose sends only this process takes: nobody to tell
        self.directory = registry_of(group, root)
        self.hub = self.directory.name  # names the task hub in datagrams, without showing it
        self._transport: asyncio.DatagramTransport | None = None
        self._entry: Path | None = None
        self._peers: list[int] = []
        self._peers_read = -math.inf
        self._pending: set[tuple[str, float]] = set()  # sent to, not told yet
        self._gathering: set[tuple[str, float]] = set()  # told of, its poller not woken yet
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
            self.directory.parent.mkdir(mode=0o700, exist_ok=True)
            self.directory.mkdir(mode=0o700, exist_ok=True)
            self._entry = self.directory / f"{os.getpid()}-{self.port}"
            self._entry.touch()
        except OSError as exc:
            log.warning("processes of this machine will not wake this one on their sends: %r", exc)
            self.close()

    def close(self) -> None:
        if self._entry is not None:
            self._entry.unlink(missing_ok=True)
            self._entry = None
            with contextlib.suppress(OSError):  # the last one out: no directory left per task hub
                self.directory.rmdir()
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    # -- telling -------------------------------------------------------------------------------
    def sent(self, queue: str, delay: float) -> None:
        """A send of this process (a ``SendListener``): tell the others on the next turn of the loop."""
        if self._transport is None or delay > MAX_ANNOUNCED_DELAY or self.held_here(queue):
            return
        self._pending.add((queue, round(max(delay, 0.0), 2)))
        if not self._flush_due:
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_due = False
        wakes, self._pending = sorted(self._pending), set()
        transport = self._transport
        if transport is None or not wakes:
            return
        payload = json.dumps({"hub": self.hub, "wake": wakes}).encode()
        for port in self._peer_ports():
            transport.sendto(payload, ("127.0.0.1", port))

    def _peer_ports(self) -> list[int]:
        now = time.monotonic()
        if now - self._peers_read >= PEERS_REFRESH_SECONDS:
            self._peers_read = now
            self._peers = list(self._read_peers())
        return self._peers

    def _read_peers(self) -> Iterator[int]:
        try:
            entries = list(self.directory.iterdir())
        except OSError:
            return
        for entry in entries:
            pid, _, port = entry.name.partition("-")
            if entry == self._entry or not (pid.isdigit() and port.isdigit()):
                continue
            if not _alive(int(pid)):
                entry.unlink(missing_ok=True)  # a process that died without unregistering
                continue
            yield int(port)

    # -- being told ----------------------------------------------------------------------------
    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            told = json.loads(data)
            if not isinstance(told, dict) or told.get("hub") != self.hub:
                return
            wakes = [(str(queue), float(delay)) for queue, delay in told["wake"]]
        except (ValueError, TypeError, KeyError):
            return  # not from a process of this task hub
        loop = asyncio.get_running_loop()
        for queue, delay in wakes:
            if not 0.0 <= delay <= MAX_ANNOUNCED_DELAY or (queue, delay) in self._gathering:
                continue
            # A poll per datagram would take a few messages a receive, where waiting a moment
            # takes what the other processes send meanwhile in one.
            self._gathering.add((queue, delay))
            loop.call_later(GATHER_SECONDS, self._woken, queue, delay)

    def _woken(self, queue: str, delay: float) -> None:
        self._gathering.discard((queue, delay))
        self.wake(queue, delay)

    def error_received(self, exc: Exception) -> None:
        log.debug("a wake-up datagram was refused: %r", exc)  # a process gone since the last look


async def start_local_wakes(
    backend: Backend, wake: SendListener, ownership: PartitionOwnership | None
) -> LocalWakes | None:
    """Wake-ups with the other processes of this machine serving ``backend``'s task hub, started
    and listening to its sends; None when the backend lives in this process only."""
    group: str | None = getattr(backend, "local_wake_group", None)
    if group is None:
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


def _alive(pid: int) -> bool:
    if sys.platform == "win32":  # os.kill would end the process there; the file stays
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process now
        return False
    return True


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text) or "user"
