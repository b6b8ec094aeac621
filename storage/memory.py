"""In-memory backend: the task hub in process memory, for fast tests of the engine.

It keeps the semantics the Azure backend has (ETag-checked commits, sentinel outbox marker,
at-least-once queues with visibility timeouts and dequeue counts, the queue service's limits from
``storage._limits``, instance-id validation, listing order) so that engine tests exercise the same
protocol; ``tests/test_storage_contract.py`` runs the same tests against both. Time comes from an
injectable clock so tests can move it forward.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from durable.core._history import HistoryEvent, utcnow
from durable.core._ids import validate_instance_id
from durable.core._messages import WorkMessage
from durable.core._status import InstanceRecord, may_replace
from durable.runtime._backend import (
    DEFAULT_PARTITIONS,
    MAX_PARTITIONS,
    ConcurrencyConflict,
    InstanceExists,
    InstanceHistory,
    InstanceQuery,
    PoisonedMessage,
    ReceivedMessage,
    SendListener,
    SendListeners,
)

from ._envelopes import Outgoing, SharedReceipt, deliveries, pack, split_on_redelivery, unpack
from ._keys import escape_key
from ._limits import lease_seconds, message_delay, receive_count

Clock = Callable[[], datetime]


@dataclass
class _StoredMessage:
    id: int
    body: str
    visible_at: datetime
    dequeue_count: int = 0
    pop_receipt: int = 0


@dataclass
class _StoredHistory:
    events: list[HistoryEvent]
    etag: str
    execution_id: str
    outbox_start: int
    checkpoint: int


class InMemoryBackend:
    def __init__(self, partition_count: int = DEFAULT_PARTITIONS, clock: Clock = utcnow) -> None:
        if not 1 <= partition_count <= MAX_PARTITIONS:
            raise ValueError(f"partition_count must be 1..{MAX_PARTITIONS}, got {partition_count}")
        self.partition_count = partition_count
        self.clock = clock
        self.queues: dict[str, list[_StoredMessage]] = {}
        self.poison_queue: list[tuple[str, str, str]] = []  # (queue, body, reason)
        self.histories: dict[str, _StoredHistory] = {}
        self.instances: dict[str, InstanceRecord] = {}
        self._ids = itertools.count(1)
        self._send_listeners = SendListeners()
        self.partition_leases: dict[int, tuple[str, datetime, float]] = {}  # owner, expiry, duration

    def add_send_listener(self, listener: SendListener) -> None:
        self._send_listeners.add(listener)

    async def queue_is_empty(self, queue: str) -> bool:
        return not self.queues.get(queue)

    # -- partition leases -----------------------------------------------------------------------
    def _partition_holder(self, partition: int) -> str | None:
        lease = self.partition_leases.get(partition)
        return lease[0] if lease is not None and lease[1] > self.clock() else None

    async def acquire_partition(self, partition: int, owner: str, seconds: float, *, steal: bool = False) -> bool:
        holder = self._partition_holder(partition)
        if holder not in (None, owner) and not steal:
            return False
        self.partition_leases[partition] = (owner, self.clock() + timedelta(seconds=seconds), seconds)
        return True

    async def renew_partition(self, partition: int, owner: str) -> bool:
        lease = self.partition_leases.get(partition)
        if lease is None or lease[0] != owner:  # as in Azure, a lease run out renews if nobody took it
            return False
        self.partition_leases[partition] = (owner, self.clock() + timedelta(seconds=lease[2]), lease[2])
        return True

    async def release_partition(self, partition: int, owner: str) -> None:
        lease = self.partition_leases.get(partition)
        if lease is not None and lease[0] == owner:
            del self.partition_leases[partition]

    async def partition_owners(self) -> dict[int, str]:
        held = {p: self._partition_holder(p) for p in self.partition_leases}
        return {p: owner for p, owner in held.items() if owner is not None}

    async def create_task_hub(self) -> None:
        pass

    async def delete_task_hub(self) -> None:
        self.queues.clear()
        self.poison_queue.clear()
        self.histories.clear()
        self.instances.clear()

    async def close(self) -> None:
        pass

    # -- queues -------------------------------------------------------------------------------
    def put_raw(self, queue: str, body: str, delay: float = 0.0) -> _StoredMessage:
        """Enqueue an arbitrary body (tests use it to inject malformed messages)."""
        stored = _StoredMessage(next(self._ids), body, self.clock() + timedelta(seconds=delay))
        self.queues.setdefault(queue, []).append(stored)
        return stored

    async def send(self, messages: Sequence[WorkMessage]) -> None:
        for outgoing in self._pack(messages):
            delay = message_delay(outgoing.delay)
            self.put_raw(outgoing.queue, outgoing.body, delay)
            self._send_listeners.sent(outgoing.queue, delay)

    def _pack(self, messages: Sequence[WorkMessage]) -> list[Outgoing]:
        for message in messages:
            validate_instance_id(message.instance_id)
        return pack(messages, self.partition_count, self.clock())

    async def receive(
        self, queue: str, max_count: int, visibility_timeout: float
    ) -> list[ReceivedMessage | PoisonedMessage]:
        now = self.clock()
        count = receive_count(max_count)
        lease = timedelta(seconds=lease_seconds(visibility_timeout))
        out: list[ReceivedMessage | PoisonedMessage] = []
        for stored in list(self.queues.get(queue, [])):
            if len(out) >= count:
                break
            if stored.visible_at > now:
                continue
            stored.dequeue_count += 1
            stored.pop_receipt += 1
            stored.visible_at = now + lease
            receipt = (stored.id, stored.pop_receipt)
            try:
                parts = unpack(stored.body)
            except ValueError as exc:
                out.append(PoisonedMessage(queue, stored.body, stored.dequeue_count, receipt, str(exc)))
                continue
            if split_on_redelivery(parts, stored.dequeue_count):
                self.queues[queue].remove(stored)
                for part in parts:
                    self.put_raw(queue, part.to_json())
            else:
                out.extend(deliveries(queue, parts, stored.dequeue_count, receipt))
        return out

    async def send_held(self, messages: Sequence[WorkMessage], lease: float) -> list[ReceivedMessage]:
        held: list[ReceivedMessage] = []
        for outgoing in self._pack(messages):
            stored = self.put_raw(outgoing.queue, outgoing.body, lease_seconds(lease))
            held += deliveries(outgoing.queue, outgoing.messages, 0, (stored.id, stored.pop_receipt), held=True)
        return held

    async def parse_deliveries(
        self, queue: str, body: str, dequeue_count: int
    ) -> list[ReceivedMessage | PoisonedMessage]:
        try:
            parts = unpack(body)
        except ValueError as exc:
            return [PoisonedMessage(queue, body, dequeue_count, None, str(exc))]
        if split_on_redelivery(parts, dequeue_count):
            for part in parts:
                self.put_raw(queue, part.to_json())
            return []
        return [*deliveries(queue, parts, dequeue_count, None)]

    def _find(self, received: ReceivedMessage | PoisonedMessage) -> _StoredMessage | None:
        receipt = received.receipt
        if isinstance(receipt, SharedReceipt):
            receipt = receipt.inner
        if not isinstance(receipt, tuple):
            raise TypeError("message was not received from this backend")
        msg_id, pop_receipt = receipt
        for stored in self.queues.get(received.queue, []):
            if stored.id == msg_id and stored.pop_receipt == pop_receipt:
                return stored
        return None  # already deleted, or re-delivered to someone else since

    async def delete(self, received: ReceivedMessage | PoisonedMessage) -> None:
        stored = self._find(received)
        if isinstance(received.receipt, SharedReceipt) and not received.receipt.settle(received):
            return  # other parts of its envelope are still open
        if stored is not None:
            self.queues[received.queue].remove(stored)

    async def release(self, received: ReceivedMessage, delay: float) -> None:
        stored = self._find(received)
        shared = received.receipt
        if isinstance(shared, SharedReceipt) and not shared.needs_renewal(self.clock().timestamp()):
            return
        if stored is not None:
            stored.visible_at = self.clock() + timedelta(seconds=message_delay(delay))

    async def poison(self, received: ReceivedMessage | PoisonedMessage, reason: str) -> None:
        stored = self._find(received)
        if stored is None:
            return
        shared = received.receipt
        if isinstance(shared, SharedReceipt):
            assert isinstance(received, ReceivedMessage)
            self.poison_queue.append((received.queue, received.message.to_json(), reason))
            if shared.settle(received):
                self.queues[received.queue].remove(stored)
            return
        self.queues[received.queue].remove(stored)
        self.poison_queue.append((received.queue, stored.body, reason))

    def split_envelopes(self) -> None:
        """Put each queued message in a queue message of its own, in order (for tests that drop,
        duplicate or reorder single messages)."""
        for stored in self.queues.values():
            stored[:] = [
                replace(message, id=next(self._ids), body=part.to_json())
                for message in stored
                for part in unpack(message.body)
            ]

    def pending_count(self) -> int:
        return sum(len(q) for q in self.queues.values())

    # -- histories ----------------------------------------------------------------------------
    async def load_history(self, instance_id: str) -> InstanceHistory:
        validate_instance_id(instance_id)
        stored = self.histories.get(instance_id)
        if stored is None:
            return InstanceHistory(instance_id)
        return InstanceHistory(
            instance_id,
            events=list(stored.events),
            etag=stored.etag,
            execution_id=stored.execution_id,
            outbox_start=stored.outbox_start,
            checkpoint=stored.checkpoint,
        )

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
        validate_instance_id(instance_id)
        if keep < 0:
            raise ValueError("keep must be >= 0")
        stored = self.histories.get(instance_id)
        current_etag = stored.etag if stored else None
        if current_etag != expected_etag:
            raise ConcurrencyConflict(instance_id)
        kept = stored.events[:keep] if stored else []
        if keep > len(kept):
            raise ValueError(f"keep={keep} is beyond the committed history of {len(kept)} events")
        etag = f"W/{next(self._ids)}"
        self.histories[instance_id] = _StoredHistory(
            kept + list(new_events), etag, execution_id, outbox_start, checkpoint
        )
        return etag

    # -- instances ------------------------------------------------------------------------------
    async def read_instance(self, instance_id: str) -> InstanceRecord | None:
        validate_instance_id(instance_id)
        return self.instances.get(instance_id)

    async def write_instance(self, record: InstanceRecord, etag: str | None = None) -> str | None:
        return self._write_instance(record, create=True)

    async def update_instance(self, record: InstanceRecord, etag: str | None = None) -> str | None:
        return self._write_instance(record, create=False)

    def _write_instance(self, record: InstanceRecord, create: bool) -> str | None:
        validate_instance_id(record.instance_id)
        current = self.instances.get(record.instance_id)
        if current is None:
            replaces = create
        else:  # an update only replaces a row of the record's own execution
            same_run = create or current.execution_id == record.execution_id
            replaces = same_run and may_replace(current, record)
        if replaces:
            self.instances[record.instance_id] = record
            return f"W/{next(self._ids)}"
        return None

    async def create_instance(self, record: InstanceRecord) -> str:
        validate_instance_id(record.instance_id)
        current = self.instances.get(record.instance_id)
        if current is not None and not current.finished:
            raise InstanceExists(record.instance_id)
        if current is not None:
            # Restarting a finished instance: the new history starts where the old one's checkpoint was.
            record = replace(record, checkpoint=current.checkpoint)
        self.instances[record.instance_id] = record
        return f"W/{next(self._ids)}"

    async def query_instances(
        self, query: InstanceQuery, page_size: int = 100, continuation_token: str | None = None
    ) -> tuple[list[InstanceRecord], str | None]:
        if page_size < 1:
            raise ValueError("page_size must be >= 1")
        # In the order of the Instances table's PartitionKey, the escaped id, as Azure lists them.
        matching = [
            r
            for _, r in sorted((escape_key(i), r) for i, r in self.instances.items())
            if (query.runtime_status is None or r.runtime_status in query.runtime_status)
            and (query.created_from is None or r.created_time >= query.created_from)
            and (query.created_to is None or r.created_time <= query.created_to)
            and (query.instance_id_prefix is None or r.instance_id.startswith(query.instance_id_prefix))
        ]
        try:
            start = int(continuation_token or 0)
        except ValueError as exc:
            raise ValueError("invalid continuation token") from exc
        page = matching[start : start + page_size]
        next_token = str(start + page_size) if start + page_size < len(matching) else None
        return page, next_token

    async def purge_instance(self, instance_id: str, expected_etag: str | None = None) -> bool:
        validate_instance_id(instance_id)
        stored = self.histories.get(instance_id)
        if expected_etag is not None and (stored is None or stored.etag != expected_etag):
            raise ConcurrencyConflict(instance_id)
        found = instance_id in self.instances or instance_id in self.histories
        self.instances.pop(instance_id, None)
        self.histories.pop(instance_id, None)
        return found
