"""How a poller waits between receives: the one policy of the polling worker and the local host's
queue triggers.

A queue that gave work is polled again at once. An empty receive backs off, doubling from
``minimum`` up to ``busy``. Past that, the poller asks whether the queue holds any message at
all — visible, delayed (a timer) or leased to a worker (which may have died): the queue service
counts them all. A queue holding nothing is then only checked every ``idle`` seconds (one
request), so an idle host costs a few requests a minute; a queue that still holds messages keeps
being polled every ``busy`` seconds, so that the messages of a worker that died are taken over
within one lease and ``busy``, inside ``RECOVERY_SECONDS``. A send of this process to the queue wakes
its poller at once, or when the message comes due; one of another process of this machine serving
the task hub, a moment later (``_wake``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

log = logging.getLogger("durable.worker")

# The guarantee: after a worker dies, its messages are taken over within this many seconds (a
# lease, then at most one polling interval of a queue that still holds messages).
RECOVERY_SECONDS = 30.0
MIN_POLL_INTERVAL = 0.05


@dataclass(frozen=True)
class PollIntervals:
    minimum: float  # after an empty receive that followed work
    busy: float  # the longest wait while the queue holds messages (visible, delayed or leased)
    idle: float  # the longest wait while it holds none

    @classmethod
    def for_lease(cls, lease: float, max_interval: float, minimum: float = MIN_POLL_INTERVAL) -> PollIntervals:
        """Intervals that keep ``RECOVERY_SECONDS`` with ``lease``, never longer than
        ``max_interval`` (``maxQueuePollingInterval``: how long an idle queue goes unchecked)."""
        # half the time a lease leaves of the bound: the bound holds with room for slow requests
        busy = min(max_interval, max(1.0, (RECOVERY_SECONDS - lease) / 2))
        return cls(min(minimum, busy), busy, max(busy, max_interval))


async def poll(
    stop: asyncio.Event,
    wake: asyncio.Event,
    once: Callable[[], Awaitable[int]],
    is_empty: Callable[[], Awaitable[bool]],
    policy: PollIntervals | Callable[[], PollIntervals],
) -> None:
    """Call ``once`` (a receive and its processing; the number of messages) until ``stop`` is set,
    waiting between empty receives as the module docstring says. ``wake`` is set by a send of
    this process to the queue. ``policy`` may change between polls (a partition taken up)."""
    delay = 0.0
    while not stop.is_set():
        intervals = policy() if callable(policy) else policy
        delay = max(intervals.minimum, min(delay, intervals.busy))
        wake.clear()
        try:
            handled = await once()
        except Exception:
            log.exception("poll failed; retrying")
            handled = 0
        if handled:
            delay = intervals.minimum
            continue
        if delay >= intervals.busy and intervals.idle > intervals.busy and await _holds_nothing(is_empty):
            # Nothing to take over and nothing coming due: watch the queue until a message
            # arrives (then receive at once) or this process sends to it.
            while True:
                await wait_for_any((stop, wake), intervals.idle)
                if stop.is_set() or wake.is_set() or not await _holds_nothing(is_empty):
                    break
            delay = intervals.minimum if wake.is_set() else intervals.busy
            continue
        await wait_for_any((stop, wake), delay)
        delay = intervals.minimum if wake.is_set() else min(delay * 2, intervals.busy)


async def _holds_nothing(is_empty: Callable[[], Awaitable[bool]]) -> bool:
    try:
        return await is_empty()
    except Exception as exc:  # storage trouble: poll as if it held messages (the receive will tell)
        log.warning("could not tell whether a queue is empty: %r", exc)
        return False


async def wait_for_any(events: Sequence[asyncio.Event], timeout: float | None) -> None:
    """Wait until one of ``events`` is set, or ``timeout`` seconds (an idle poller's back-off,
    cut short by a stop or by a send to its queue)."""
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    _, pending = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    for waiting in pending:
        waiting.cancel()


def wake_when_due(wake: asyncio.Event, delay: float) -> None:
    """Set ``wake`` now, or when a message sent with ``delay`` seconds becomes visible."""
    if delay <= 0:
        wake.set()
    else:
        asyncio.get_running_loop().call_later(delay, wake.set)
