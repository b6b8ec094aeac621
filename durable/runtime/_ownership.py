"""Partition ownership: in a long-running host (the polling worker, ``durable start``) one process
at a time takes the messages of a control queue.

Without it every process polls every control queue, so the messages of a hot entity or
orchestration spread over all of them and their steps race for its ETag: more hosts made a hot
instance slower. With it a process receives from a control queue only while it holds that
partition's lease (``Backend.acquire_partition``: a blob lease in Azure Storage, as DTFx takes),
and the others leave that queue alone. The work-item queue stays shared: activities touch no
instance state.

- Claimed on demand: a poller receives from a control queue that nobody held at the last look
  and, if that gave messages, takes its lease (one request); it leaves alone a queue another
  process held at the last look. A partition that gave no work for ``IDLE_RELEASE_SECONDS`` is
  released, so an idle host holds nothing and makes no lease requests. While held, a control
  queue is polled at least every ``HELD_POLL_MAX`` seconds (``HOT_POLL_MAX`` while it has work
  and other processes are around): its holder alone takes its messages.
- While a process holds partitions or was refused one, it renews its leases and looks at who
  holds what every ``ROUND_SECONDS`` (one listing): it gives up partitions above its fair share
  that gave no work lately, and takes half the excess of each process above its share (at least
  one) while below its own — or, when nobody is above the share (rounded up), one partition of a
  process holding two or more than it — so the partitions spread over the processes within a few
  rounds, no two counts more than one apart, without leaving a busy one unpolled between two looks.
  A process that holds nothing and saw nothing held looks too, ``ROUND_SECONDS`` after it
  started and then less and less often, and once a minute (``IDLE_LOOK_MAX``) after it was busy:
  it may have joined a hub whose holders take every message before it receives one.
- A process that dies stops renewing: its leases run out within ``LEASE_SECONDS``, the next look
  of another process frees its partitions, and its messages come back when their own lease (the
  queue's visibility timeout) runs out, within the recovery bound (``_polling``). A process that
  stops releases its leases once its pollers are done.
- Ownership is an optimisation, never a condition of safety: commits stay ETag-guarded, so two
  processes briefly stepping one instance (a lease lost mid-step, a steal) conflict and redo; the
  first such conflict has the loser check its lease (``recheck``), so a steal costs one conflict,
  not a round of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ._backend import Backend
from ._polling import PollIntervals, wait_for_any

log = logging.getLogger("durable.worker")
T = TypeVar("T")  # a received message, as the poller's queue client gives it

LEASE_SECONDS = 15.0  # the shortest blob lease: a dead owner's partitions are free again soonest
ROUND_SECONDS = 5.0  # renew and look three times a lease
IDLE_RELEASE_SECONDS = 30.0
IDLE_LOOK_MAX = 60.0  # a process holding nothing and seeing nothing held looks at least this often
HELD_POLL_MAX = 0.5
# A held partition that gave work (received, or handed over within this process) this recently
# is hot: while other processes hold partitions, their messages to its instances come through its
# queue, which is then polled at least every HOT_POLL_MAX seconds, not HELD_POLL_MAX.
HOT_SECONDS = 1.0
HOT_POLL_MAX = 0.1
RELEASE_TIMEOUT = 2.0  # a stopping process waits no longer for its leases to be given back
RECHECK_SECONDS = 1.0  # a held partition's lease is checked on a commit conflict at most this often


class PartitionOwnership:
    """The partitions this process holds, and what it knows of the others' (see the module)."""

    def __init__(
        self, backend: Backend, *, owner: str | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.backend = backend
        self.owner = owner or str(uuid.uuid4())  # the lease id: a GUID
        self.clock = clock
        self.owned: dict[int, float] = {}  # partition -> when it last gave work
        self.others: dict[int, str] = {}  # partition -> its holder, at the last look ("" if unknown)
        self._available: list[Callable[[int], None]] = []
        self._rechecked: dict[int, float] = {}  # partition -> when a commit conflict last had it checked
        self._watching = asyncio.Event()  # set while there is anything to renew or watch

    def on_available(self, listener: Callable[[int], None]) -> None:
        """Have ``listener`` called with a partition whose queue this process should poll now:
        one another process no longer holds, or one just taken from another (its poller may be
        in a long wait, as for any queue held elsewhere)."""
        self._available.append(listener)

    def holds(self, partition: int) -> bool:
        return partition in self.owned

    @property
    def alone(self) -> bool:
        """No other process held a partition at the last look (nor refused this one a claim).
        Another host busy on the hub shows up within a round of taking its first partition."""
        return not self.others

    async def take(
        self,
        partition: int,
        receive: Callable[[], Awaitable[list[T]]],
        put_back: Callable[[list[T]], Awaitable[None]],
    ) -> list[T]:
        """What a poller of ``partition``'s control queue may process now: nothing while another
        process holds it; otherwise what ``receive`` gave, once this process holds the partition
        (``claim``), and nothing if another took it up first (the batch is ``put_back`` for it)."""
        if partition in self.others:
            return []
        batch = await receive()
        if batch and not await self.claim(partition):
            await put_back(batch)
            return []
        if batch:
            self.worked(partition)
        return batch

    async def is_empty(self, partition: int, ask: Callable[[], Awaitable[bool]]) -> bool:
        """For an idle poller: a partition held here or elsewhere counts as holding messages
        without asking its queue (its holder polls it, at least every ``HELD_POLL_MAX`` s)."""
        if partition in self.owned or partition in self.others:
            return False
        return await ask()

    def intervals(self, partition: int, usual: PollIntervals) -> PollIntervals:
        """How to poll ``partition``'s control queue: while this process holds it, at least every
        ``HELD_POLL_MAX`` seconds (messages other processes send reach it only so), and every
        ``HOT_POLL_MAX`` while it is hot and other processes are around."""
        if partition not in self.owned:
            return usual
        most = min(usual.busy, HELD_POLL_MAX)
        if not self.others:
            # Alone, whatever reaches the queue comes from this process, whose sends wake the
            # poller (timers when due): an empty receive need not be followed by quicker ones.
            return PollIntervals(most, most, most)
        if self.clock() - self.owned[partition] < HOT_SECONDS:
            most = min(most, HOT_POLL_MAX)
        return PollIntervals(min(usual.minimum, most), most, most)

    async def claim(self, partition: int) -> bool:
        """A receive from ``partition``'s control queue, which nobody held at the last look, gave
        messages: take its lease. False when another process holds it: the caller puts the
        messages back for it (a race between two processes taking up the same queue)."""
        if partition in self.owned:
            return True
        if partition in self.others:
            return False
        if await self.backend.acquire_partition(partition, self.owner, LEASE_SECONDS):
            self.owned[partition] = self.clock()
            log.info("took partition %d", partition)
        else:
            self.others[partition] = ""  # someone: the next look says who
        self._watching.set()
        return partition in self.owned

    async def recheck(self, partition: int) -> None:
        """A commit on an instance of a held partition lost a race: another process may have
        stolen the partition since the last look (it then steps the same instances). Renew its
        lease at once, and let it go if that fails, instead of racing the thief until the next
        round."""
        now = self.clock()
        if partition not in self.owned or now - self._rechecked.get(partition, -math.inf) < RECHECK_SECONDS:
            return
        self._rechecked[partition] = now
        if not await self.backend.renew_partition(partition, self.owner):
            self.owned.pop(partition, None)  # a round may have let it go meanwhile
            self.others[partition] = ""  # someone: the next look says who
            log.info("lost partition %d (a commit conflict found its lease taken)", partition)

    def worked(self, partition: int) -> None:
        """A receive from ``partition`` gave work: keep it for another idle period."""
        if partition in self.owned:
            self.owned[partition] = self.clock()

    async def run(self, stop: asyncio.Event) -> None:
        """Renew, look and balance every round while there is anything to keep or watch, until
        ``stop``. Then ``release_all``, once the pollers are done."""
        idle_look = ROUND_SECONDS  # a process just started may have joined a busy hub: look soon
        while not stop.is_set():
            if not (self.owned or self.others):
                # Nothing held here nor, at the last look, elsewhere: look now and then all the
                # same (less and less often while that lasts). A process whose fellows drain
                # every queue before it receives from one learns so, and takes its share.
                self._watching.clear()
                await wait_for_any((stop, self._watching), idle_look)
                if stop.is_set() or self._watching.is_set():
                    continue
                idle_look = min(idle_look * 2, IDLE_LOOK_MAX)
            else:
                idle_look = IDLE_LOOK_MAX  # after a busy spell, the hub's idle budget comes first
                await wait_for_any((stop,), ROUND_SECONDS)
            if not stop.is_set():
                try:
                    await self.round()
                except Exception:  # storage trouble: leases run out, commits stay guarded
                    log.warning("could not renew or look at the partition leases", exc_info=True)

    async def release_all(self) -> None:
        """Give every lease back (a stopping process), so that another takes over at once; a
        lease storage does not take back within ``RELEASE_TIMEOUT`` runs out by itself."""
        releases = asyncio.gather(*(self._release(p) for p in list(self.owned)), return_exceptions=True)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(releases, RELEASE_TIMEOUT)

    async def round(self) -> None:
        now = self.clock()
        for partition, last_work in list(self.owned.items()):
            if now - last_work >= IDLE_RELEASE_SECONDS:
                await self._release(partition)
            elif not await self.backend.renew_partition(partition, self.owner):
                self.owned.pop(partition, None)  # a commit conflict's recheck may have let it go meanwhile
                log.info("lost partition %d (its lease ran out or was taken)", partition)
        held = await self.backend.partition_owners()
        freed = set(self.others) - set(held)
        self.others = {p: owner for p, owner in held.items() if owner != self.owner}
        for partition in [p for p in self.owned if p in self.others]:
            self.owned.pop(partition, None)  # taken while this process thought it held it
        await self._balance(held)
        for partition in freed:
            self._now_available(partition)

    async def _balance(self, held: dict[int, str]) -> None:
        """Towards an even share among the processes that hold partitions, this one included."""
        share = math.ceil(self.backend.partition_count / len(set(held.values()) | {self.owner}))
        if len(self.owned) > share:
            # Only partitions that gave no work lately are let go: a released partition is polled
            # by nobody until another process's next look, so a busy one would leave its messages
            # waiting up to a round. Busy ones go to a process below its share by a steal (below),
            # which polls them at once.
            now = self.clock()
            idle = [p for p, last_work in self.owned.items() if now - last_work >= HOT_SECONDS]
            for partition in sorted(idle, key=self.owned.__getitem__)[: len(self.owned) - share]:
                await self._release(partition)
                # left for a process below its share: not claimed back before the next look
                self.others[partition] = ""
            return
        lacking = share - len(self.owned)
        if lacking > 0:
            for partition in self._to_steal(share)[:lacking]:
                if await self.backend.acquire_partition(partition, self.owner, LEASE_SECONDS, steal=True):
                    self.others.pop(partition, None)
                    self.owned[partition] = self.clock()
                    log.info("took partition %d from a process holding more than its share", partition)
                    self._now_available(partition)

    def _to_steal(self, share: int) -> list[int]:
        """Half the excess of each process above its share (at least one). Processes below their
        share that look at the same time may take a holder below its own (each sees the same
        excess); it then takes partitions back in its next rounds, as a process below its share.

        The share is rounded up, so holders may all be at it while this process is two or more
        below them (4 partitions held 2, 2, 0 by three processes): then one partition of such a
        holder, which evens the two out; one a round, so the others' counts are seen anew."""
        by_owner: dict[str, list[int]] = {}
        for partition, owner in self.others.items():
            if owner:  # "" is a holder not known yet
                by_owner.setdefault(owner, []).append(partition)
        candidates: list[int] = []
        for partitions in by_owner.values():
            excess = len(partitions) - share
            if excess > 0:
                # random: not all hungry processes after the same partitions
                candidates += random.sample(partitions, max(1, excess // 2))
        if not candidates:
            richer = [ps for ps in by_owner.values() if len(ps) - len(self.owned) >= 2]
            if richer:
                candidates = random.sample(random.choice(richer), 1)
        random.shuffle(candidates)
        return candidates

    def _now_available(self, partition: int) -> None:
        for listener in self._available:
            listener(partition)

    async def _release(self, partition: int) -> None:
        self.owned.pop(partition, None)
        await self.backend.release_partition(partition, self.owner)
