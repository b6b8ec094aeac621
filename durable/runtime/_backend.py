"""The storage interface the runtime is written against, with its two implementations
(Azure Storage in ``storage.azure``, in-memory in ``storage.memory``).

The interface is the task hub of DESIGN §5 in abstract form: per-instance histories committed
under an ETag with their outbox marker, the Instances projection, partitioned control queues and
the shared work-item queue with at-least-once, visibility-timeout semantics.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from ..core._history import HistoryEvent
from ..core._history import InstanceHistory as InstanceHistory  # re-exported: backends return it
from ..core._messages import MAX_QUEUE_DELAY_SECONDS as MAX_QUEUE_DELAY_SECONDS  # re-exported for backends
from ..core._messages import MessageTarget, WorkMessage
from ..core._status import InstanceRecord, OrchestrationRuntimeStatus

MAX_PARTITIONS = 16
DEFAULT_PARTITIONS = 4
WORK_ITEM_QUEUE = "workitems"


SendListener = Callable[[str, float], None]  # (queue, delay in seconds)


class SendListeners:
    """The listeners a backend tells of its sends (``Backend.add_send_listener``)."""

    def __init__(self) -> None:
        self._listeners: list[SendListener] = []

    def add(self, listener: SendListener) -> None:
        self._listeners.append(listener)

    def sent(self, queue: str, delay: float) -> None:
        for listener in self._listeners:
            listener(queue, delay)


class ConcurrencyConflict(Exception):
    """The instance was committed by someone else since it was loaded (its ETag moved)."""


class InstanceExists(Exception):
    """An instance with this id already exists and is not in a terminal state."""


def fnv1a32(text: str) -> int:
    """32-bit FNV-1a over UTF-8, the hash DESIGN §4 fixes for partitioning instance ids."""
    h = 0x811C9DC5
    for byte in text.encode("utf-8"):
        h ^= byte
        h = (h * 0x01000193) & 0xFFFFFFFF
    return h


@functools.lru_cache(maxsize=16384)  # every message is routed by its id; the ids of a hub's busy instances repeat
def partition_of(instance_id: str, partition_count: int) -> int:
    return fnv1a32(instance_id) % partition_count


def control_queue(partition: int) -> str:
    """Logical name of a control queue; backends prefix it with the task hub name."""
    return f"control-{partition:02d}"


def queue_for(message: WorkMessage, partition_count: int) -> str:
    if message.target is MessageTarget.ACTIVITY:
        return WORK_ITEM_QUEUE
    return control_queue(partition_of(message.instance_id, partition_count))


@dataclass
class ReceivedMessage:
    """A message taken from a queue, invisible to others until deleted or its lease runs out."""

    queue: str
    message: WorkMessage
    dequeue_count: int
    receipt: object  # backend handle needed to delete or release this delivery
    held: bool = False  # handed over by this process's own send (``send_held``), not received


@dataclass
class PoisonedMessage:
    """A queue message whose body could not be parsed, or that failed too often."""

    queue: str
    body: str
    dequeue_count: int
    receipt: object
    reason: str


@dataclass(frozen=True)
class InstanceQuery:
    runtime_status: frozenset[OrchestrationRuntimeStatus] | None = None
    created_from: datetime | None = None
    created_to: datetime | None = None
    instance_id_prefix: str | None = None


class Backend(Protocol):
    """What every backend does the same way (``tests/test_storage_contract.py`` runs one suite
    against each). Every method that takes an instance id raises ``ValueError`` for an invalid
    one (``validate_instance_id``). ETags are opaque tokens: compare them for equality and pass
    them back, nothing else."""

    partition_count: int

    async def create_task_hub(self) -> None: ...

    async def delete_task_hub(self) -> None: ...

    async def close(self) -> None: ...

    # -- queues -------------------------------------------------------------------------------
    async def send(self, messages: Sequence[WorkMessage]) -> None:
        """Enqueue each message on its queue (see ``queue_for``), honouring ``visible_at``.
        Messages due now and bound for the same queue may share one queue message (an envelope,
        ``storage._envelopes``); each is still received, settled and poisoned on its own.

        A message is hidden for at most ``MAX_QUEUE_DELAY_SECONDS`` (the queue service's 7-day
        limit): one due later arrives early, and the worker puts it back."""

    async def send_held(self, messages: Sequence[WorkMessage], lease: float) -> list[ReceivedMessage]:
        """Enqueue ``messages`` (due now) hidden for ``lease`` seconds and hand them back as
        deliveries this process holds, as if it had just received them: it processes them at
        once, with no receive and no polling delay. If it dies first, they become visible when
        the lease runs out, like any message whose worker died."""

    def add_send_listener(self, listener: SendListener) -> None:
        """Have ``listener`` called with a queue's name and the message's delay in seconds after
        each send of this backend to that queue: a poller in the same process wakes up then (or
        when the message comes due) instead of waiting out its idle back-off."""

    async def queue_is_empty(self, queue: str) -> bool:
        """Whether ``queue`` holds no message at all: none visible, delayed or leased. An idle
        poller asks this (one request) instead of receiving (see ``runtime._polling``)."""

    # -- partition leases (``runtime._ownership``) ------------------------------------------------
    async def acquire_partition(self, partition: int, owner: str, seconds: float, *, steal: bool = False) -> bool:
        """Lease ``partition`` to ``owner`` (a GUID) for ``seconds`` (15 to 60); False when another
        owner holds it, unless ``steal``, which breaks that lease first."""

    async def renew_partition(self, partition: int, owner: str) -> bool:
        """Extend ``owner``'s lease by its duration; False when it was lost (ran out and was taken,
        or stolen)."""

    async def release_partition(self, partition: int, owner: str) -> None:
        """Give the lease back (nothing happens if ``owner`` no longer holds it)."""

    async def partition_owners(self) -> dict[int, str]:
        """The partitions leased now, and to whom."""

    async def receive(
        self, queue: str, max_count: int, visibility_timeout: float
    ) -> list[ReceivedMessage | PoisonedMessage]:
        """Take up to ``max_count`` (1 to 32) visible messages and hide them for
        ``visibility_timeout`` seconds (1 s to ``MAX_QUEUE_DELAY_SECONDS``); each delivery counts
        in ``dequeue_count``. Unparsable bodies come back as poisoned."""

    async def parse_deliveries(
        self, queue: str, body: str, dequeue_count: int
    ) -> list[ReceivedMessage | PoisonedMessage]:
        """The messages of a queue message that someone else (the Functions host) took from
        ``queue``, as deliveries without a receipt; large-message references are resolved. An
        envelope of several messages delivered again is split instead (its messages are sent
        anew, see ``storage._envelopes``) and yields none."""

    async def delete(self, received: ReceivedMessage | PoisonedMessage) -> None:
        """Remove the message (and its large-message blob, if any) from its queue. A stale
        receipt (the message was re-delivered since) deletes nothing; a delivery without a
        receipt (``parse_deliveries``) raises ``TypeError``, as do ``release`` and ``poison``. For
        a message that came in an envelope, the queue message goes with its last message."""

    async def release(self, received: ReceivedMessage, delay: float) -> None:
        """Give the message back to the queue, visible again after ``delay`` seconds (at most
        ``MAX_QUEUE_DELAY_SECONDS``); nothing happens for a stale receipt. The runtime uses it to
        renew a lease: for a message that came in an envelope it moves the whole envelope, once
        for all its messages renewed together."""

    async def poison(self, received: ReceivedMessage | PoisonedMessage, reason: str) -> None:
        """Move the message to the task hub's poison queue and remove it from its own; with a
        stale receipt (the message is someone else's now), nothing happens."""

    # -- histories ----------------------------------------------------------------------------
    async def load_history(self, instance_id: str) -> InstanceHistory: ...

    async def commit(
        self,
        instance_id: str,
        *,
        expected_etag: str | None,
        execution_id: str,
        keep: int,
        new_events: Sequence[HistoryEvent],
        outbox_start: int,
        checkpoint: int,
    ) -> str:
        """Atomically make the history ``old[:keep] + new_events`` and record the outbox marker.

        ``expected_etag`` None means the instance must not exist yet. Returns the new ETag; raises
        ``ConcurrencyConflict`` when the sentinel's ETag is no longer ``expected_etag`` (or is not
        one this backend handed out), ``ValueError`` when ``keep`` is negative or longer than the
        committed history. A commit that fails leaves the committed history as it was, however
        many events it has: a loader never sees part of a commit.
        """

    # -- instances ------------------------------------------------------------------------------
    async def read_instance(self, instance_id: str) -> InstanceRecord | None: ...

    async def write_instance(self, record: InstanceRecord, etag: str | None = None) -> str | None:
        """Insert or update the record, unless the stored one has a higher checkpoint. ``etag``:
        the stored row's ETag as the caller last saw it (saves a read when still current; a
        stale one costs a read, never a wrong write). Returns the new ETag (None when a newer
        record was kept)."""

    async def update_instance(self, record: InstanceRecord, etag: str | None = None) -> str | None:
        """``write_instance``, but only over a row of the record's execution: a row written late
        (a held-back one, protocol I6) never brings back an instance purged meanwhile, nor
        replaces the Pending row of one started again."""

    async def create_instance(self, record: InstanceRecord) -> str:
        """Insert a Pending record for a new instance; raises ``InstanceExists`` if a
        non-terminal instance with that id exists (a terminal one is replaced). Returns its ETag."""

    async def query_instances(
        self, query: InstanceQuery, page_size: int = 100, continuation_token: str | None = None
    ) -> tuple[list[InstanceRecord], str | None]:
        """One page (at most ``page_size`` >= 1 records, possibly fewer before the last) of the
        matching records, in the order of their escaped ids (``storage._keys.escape_key``, the
        Instances table's PartitionKey), and the token of the next page (None: no more)."""

    async def purge_instance(self, instance_id: str, expected_etag: str | None = None) -> bool:
        """Delete the instance's history, record and large-payload blobs; True when a history or
        record was deleted. With ``expected_etag`` (the history's, as loaded), raise
        ``ConcurrencyConflict`` instead if the instance was committed since."""
