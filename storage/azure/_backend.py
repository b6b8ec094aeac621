"""The Azure Storage backend: the task hub of DESIGN §5 on Tables, Queues and Blobs.

History layout
--------------
An instance's History partition holds one row per event and the ``sentinel`` row, the commit
point. The sentinel names the live history: ``HistoryLength`` events in the rows whose RowKeys are
``HistoryBase``, ``HistoryBase + 1``, ... as 16-digit uppercase hexadecimal (the DTFx convention;
``HistoryBase`` is 0 until the first rewrite, and absent in rows written before it existed). Rows
outside that range are never read: those below it are left from a rewrite and deleted, those above
it are left from a commit that failed and are overwritten by a later one.

Deviation from DTFx: DTFx numbers an execution's rows from 0. Here a rewrite of the history
(continue-as-new, rewind, every entity step) writes its rows at fresh RowKeys past the old ones and
moves ``HistoryBase`` there, so the live rows are contiguous and in order, but need not start at
0. (A DTFx reader that selects rows by the sentinel's ``ExecutionId`` and orders them by RowKey
reads the same events; until the old rows are deleted it may also see those of the same execution.)

Commit protocol
---------------
Every write to a History partition is a transaction that includes the sentinel under its ETag, so
no writer ever changes a partition someone else has committed since it loaded it:

- a step that fits in one transaction (100 entities, 4 MiB) writes its rows and replaces the
  sentinel in one transaction (for a rewrite the transaction also deletes the old rows, as many
  as fit);
- a larger step writes its rows in several transactions, each of which also touches the sentinel
  (a MERGE of no properties under the ETag the previous one returned; a create-only commit's first
  one creates an empty sentinel), and replaces the sentinel in the last. Rows of a step are always
  written above the live range (an append after it, a rewrite past the old rows), so until the
  last transaction nothing a loader reads changes: a crash or a lost race leaves the old history
  whole, and a concurrent loader never sees a mix of old and new rows. Committed rows are never
  rewritten in place.
- After the last transaction, the old rows left by a rewrite (those that did not fit in it) and
  their blobs are deleted. A crash before that leaves them below ``HistoryBase``; the next load
  notices them and the next commit deletes them.

The ETag the backend hands out for a history is a token ``{base}.{length}.{flags}:{sentinel ETag}``
(hexadecimal; flags ``b``: some live row points at a blob, ``o``: rows below the base are left
over), which tells the next commit the layout it is conditional on without a read.

Instances rows
--------------
The ETag the backend hands out for an Instances row is a token ``{checkpoint}.{flags}|{row ETag}``
(flag ``b``: the row points at blobs). A write given a current token replaces the row without
reading it, unless its checkpoint is lower than the token's (never overwrite a higher checkpoint)
or the row points at blobs (the write reads it, to delete the blobs the new row does not keep, see
``_large``); a write given a stale or unknown token reads the row and compares checkpoints.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import (
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.data.tables import EdmType, EntityProperty, UpdateMode
from azure.data.tables.aio import TableClient
from azure.storage.queue.aio import QueueClient

from durable.core._history import FailureDetails, HistoryEvent, utcnow
from durable.core._ids import validate_instance_id
from durable.core._messages import WorkMessage
from durable.core._status import InstanceRecord, OrchestrationRuntimeStatus, may_replace
from durable.runtime._backend import (
    DEFAULT_PARTITIONS,
    MAX_PARTITIONS,
    WORK_ITEM_QUEUE,
    ConcurrencyConflict,
    InstanceExists,
    InstanceHistory,
    InstanceQuery,
    PoisonedMessage,
    ReceivedMessage,
    SendListener,
    SendListeners,
    control_queue,
)
from storage._envelopes import Outgoing, SharedReceipt, deliveries, pack, split_on_redelivery, unpack
from storage._limits import lease_seconds, message_delay, receive_count

from ._accounting import StorageRequestCounter, counter_from_environment
from ._batch import MAX_BATCH_BYTES, MAX_BATCH_OPERATIONS, BatchConflict, BatchOperation
from ._batch import submit as submit_batch
from ._connection import (
    StorageConnection,
    StorageEndpoints,
    blob_service_client,
    queue_service_client,
    resolve_connection_string,
    table_service_client,
)
from ._keys import (
    escape_key,
    odata_datetime,
    odata_string,
    prefix_upper_bound,
    unescape_key,
    validate_task_hub_name,
)
from ._large import (
    LargePayloadStore,
    blob_refs,
    message_reference,
    message_too_large,
    new_blob_name,
    parse_message_reference,
)
from ._leases import PartitionLeaseStore

log = logging.getLogger("durable.storage")

_STORAGE_RETRY: dict[str, Any] = {
    "initial_backoff": 0.5, "increment_base": 2, "retry_total": 4, "random_jitter_range": 0.5
}  # fmt: skip
SENTINEL_ROW = "sentinel"
_MISSING_BLOB = "missing large-message blob"
INSTANCE_ROW = ""
POISON_QUEUE = "poison"
MAX_WRITE_ATTEMPTS = 10  # read-compare-write rounds on an Instances row before giving up
LOAD_ATTEMPTS = 5  # loads that found the rows a sentinel names missing (a rewrite in between)
_INT32 = 2**31


@dataclass
class _Receipt:
    """Queue message handle; the pop receipt changes with every update of the message."""

    message_id: str
    pop_receipt: str
    blob: str | None = None  # the large-message blob the body was read from


@dataclass(frozen=True)
class _Layout:
    """Where a committed history lives (see the module docstring); ``etag`` None: not committed."""

    etag: str | None
    base: int = 0
    length: int = 0
    blobs: bool = False
    orphans: bool = False

    def token(self) -> str:
        flags = ("b" if self.blobs else "") + ("o" if self.orphans else "")
        return f"{self.base:x}.{self.length:x}.{flags}:{self.etag}"

    @staticmethod
    def parse(token: str) -> _Layout | None:
        head, sep, etag = token.partition(":")
        parts = head.split(".")
        if not sep or not etag or len(parts) != 3 or set(parts[2]) - {"b", "o"}:
            return None
        try:
            base, length = int(parts[0], 16), int(parts[1], 16)
        except ValueError:
            return None
        if base < 0 or length < 0:
            return None
        return _Layout(etag, base, length, "b" in parts[2], "o" in parts[2])


def _row_key(index: int) -> str:
    return f"{index:016X}"


def _row_index(key: str) -> int | None:
    """The event index of a history RowKey (None for the sentinel or anything else)."""
    if len(key) != 16 or not all(c in "0123456789ABCDEF" for c in key):
        return None
    return int(key, 16)


def _int_prop(value: int) -> Any:
    if -_INT32 <= value < _INT32:
        return value
    return EntityProperty(value, EdmType.INT64)


def _plain(value: Any) -> Any:
    """Unwrap SDK property types (Int64 EntityProperty, TablesEntityDatetime) to plain values."""
    if isinstance(value, EntityProperty):
        value = value.value
    if isinstance(value, datetime) and type(value) is not datetime:
        value = datetime(
            value.year, value.month, value.day, value.hour, value.minute, value.second,
            value.microsecond, tzinfo=value.tzinfo or timezone.utc,
        )  # fmt: skip
    return value


def _entity_dict(entity: Any) -> dict[str, Any]:
    return {k: _plain(v) for k, v in dict(entity).items()}


def _etag_of(entity: Any) -> str:
    return str(entity.metadata["etag"])


# Set on a row whose ExecutionId is the committing execution's rather than the event's own: DTFx
# writes the execution on every history row (and its tools select rows by it), while an event's
# own execution id means something to replay (see HistoryEvent.execution_id), so it is not read back.
_ROW_EXECUTION_ONLY = "ExecutionIdOfRow"


def _history_entity(partition_key: str, index: int, event: HistoryEvent, execution_id: str) -> dict[str, Any]:
    data = event.to_dict()
    entity: dict[str, Any] = {
        "PartitionKey": partition_key,
        "RowKey": _row_key(index),
        "EventType": data.pop("EventType"),
        "_Timestamp": event.timestamp,
        "EventId": _int_prop(event.event_id),
    }
    if event.execution_id is None:
        entity.update({"ExecutionId": execution_id, _ROW_EXECUTION_ONLY: True})
    data.pop("Timestamp", None)
    data.pop("EventId", None)
    for column, value in data.items():
        if column == "FireAt" and event.fire_at is not None:
            entity[column] = event.fire_at
        elif column == "FailureDetails" and event.failure is not None:
            entity[column] = json.dumps(event.failure.to_dict())
        elif isinstance(value, int) and not isinstance(value, bool):
            entity[column] = _int_prop(value)
        else:
            entity[column] = value
    return entity


def _history_event(entity: dict[str, Any]) -> HistoryEvent:
    data: dict[str, Any] = {}
    skipped = {"PartitionKey", "RowKey", "_Timestamp", "Timestamp", _ROW_EXECUTION_ONLY}
    if entity.get(_ROW_EXECUTION_ONLY):
        skipped.add("ExecutionId")
    for column, value in entity.items():
        if column in skipped or value is None:
            continue
        if isinstance(value, datetime):
            value = value.isoformat()
        elif column == "FailureDetails" and isinstance(value, str):
            value = json.loads(value)
        data[column] = value
    data["Timestamp"] = entity["_Timestamp"].isoformat()
    return HistoryEvent.from_dict(data)


def _instance_entity(partition_key: str, record: InstanceRecord) -> dict[str, Any]:
    entity: dict[str, Any] = {
        "PartitionKey": partition_key,
        "RowKey": INSTANCE_ROW,
        "Name": record.name,
        "RuntimeStatus": record.runtime_status.value,
        "CreatedTime": record.created_time,
        "LastUpdatedTime": record.last_updated_time,
        "Checkpoint": _int_prop(record.checkpoint),
        "ExecutionId": record.execution_id,
        "Input": record.input,
        "Output": record.output,
        "CustomStatus": record.custom_status,
        "FailureDetails": json.dumps(record.failure.to_dict()) if record.failure else None,
        "CompletedTime": record.completed_time,
        "ParentInstanceId": record.parent_instance_id,
        "Version": record.version,
        "SendsPending": record.sends_pending or None,  # only ever stored when true
    }
    return {k: v for k, v in entity.items() if v is not None}


def _instance_record(entity: dict[str, Any]) -> InstanceRecord:
    failure = entity.get("FailureDetails")
    return InstanceRecord(
        instance_id=unescape_key(entity["PartitionKey"]),
        name=entity.get("Name", ""),
        runtime_status=OrchestrationRuntimeStatus(entity["RuntimeStatus"]),
        created_time=entity["CreatedTime"],
        last_updated_time=entity["LastUpdatedTime"],
        execution_id=entity.get("ExecutionId"),
        input=entity.get("Input"),
        output=entity.get("Output"),
        custom_status=entity.get("CustomStatus"),
        failure=FailureDetails.from_dict(json.loads(failure)) if failure else None,
        completed_time=entity.get("CompletedTime"),
        parent_instance_id=entity.get("ParentInstanceId"),
        checkpoint=int(entity.get("Checkpoint", 0)),
        version=entity.get("Version"),
        sends_pending=bool(entity.get("SendsPending", False)),
    )


def _instance_token(etag: str, checkpoint: int, has_blobs: bool) -> str:
    return f"{checkpoint:x}.{'b' if has_blobs else ''}|{etag}"


def _parse_instance_token(token: str) -> tuple[str, int, bool] | None:
    """(row ETag, checkpoint, points at blobs), or None for a token not of this backend."""
    head, sep, etag = token.partition("|")
    checkpoint, dot, flags = head.partition(".")
    if not sep or not dot or not etag or flags not in ("", "b"):
        return None
    try:
        return etag, int(checkpoint, 16), flags == "b"
    except ValueError:
        return None


def _is_gone(exc: HttpResponseError) -> bool:
    """The message was already deleted, or re-delivered to someone else (its pop receipt moved on)."""
    return exc.status_code == 404 or (
        exc.status_code == 400 and getattr(exc, "error_code", None) == "PopReceiptMismatch"
    )


def _encode_token(token: Any) -> str | None:
    if not token:
        return None
    raw = json.dumps(token, separators=(",", ":")).encode("utf-8")
    return base64.urlsafe_b64encode(raw).decode("ascii")


def _decode_token(token: str) -> dict[str, Any]:
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode("ascii")))
    except (ValueError, binascii.Error) as exc:
        raise ValueError("invalid continuation token") from exc
    if not isinstance(data, dict):
        raise ValueError("invalid continuation token")
    return data


def _plan_batches(
    rows: list[BatchOperation], deletes: list[BatchOperation], sentinel_size: int
) -> tuple[list[list[BatchOperation]], list[BatchOperation], list[BatchOperation]]:
    """Split a commit's operations into transactions: the rows for the transactions before the
    last (each leaves room for the sentinel), the operations of the last one (without the
    sentinel), and the deletes left for after it."""
    budget_ops = MAX_BATCH_OPERATIONS - 1
    budget_bytes = MAX_BATCH_BYTES - sentinel_size
    # The last transaction takes the last rows that fit, then as many deletes as fit.
    final: list[BatchOperation] = []
    used = 0
    split = len(rows)
    while split > 0 and len(final) < budget_ops and used + rows[split - 1].size <= budget_bytes:
        split -= 1
        used += rows[split].size
        final.append(rows[split])
    final.reverse()
    taken = 0
    while taken < len(deletes) and len(final) < budget_ops and used + deletes[taken].size <= budget_bytes:
        used += deletes[taken].size
        final.append(deletes[taken])
        taken += 1
    before: list[list[BatchOperation]] = []
    chunk: list[BatchOperation] = []
    chunk_bytes = 0
    for op in rows[:split]:
        if chunk and (len(chunk) >= budget_ops or chunk_bytes + op.size > budget_bytes):
            before.append(chunk)
            chunk, chunk_bytes = [], 0
        chunk.append(op)
        chunk_bytes += op.size
    if chunk:
        before.append(chunk)
    return before, final, deletes[taken:]


class AzureStorageBackend:
    """The ``Backend`` Protocol on an Azure Storage account (or Azurite)."""

    def __init__(
        self,
        connection: StorageConnection,
        task_hub: str = "DurableHub",
        partition_count: int = DEFAULT_PARTITIONS,
        counter: StorageRequestCounter | None = None,
        *,
        base64_messages: bool = False,
    ) -> None:
        """``connection``: a connection string (``UseDevelopmentStorage=true`` for Azurite), or the
        ``StorageEndpoints`` of an identity-based connection."""
        validate_task_hub_name(task_hub)
        if isinstance(connection, str):
            connection = resolve_connection_string(connection)
        if not isinstance(partition_count, int) or not 1 <= partition_count <= MAX_PARTITIONS:
            raise ValueError(f"partition_count must be 1..{MAX_PARTITIONS}, got {partition_count!r}")
        self.connection = connection
        # None for an identity-based connection (its endpoints are in ``connection``).
        self.connection_string = connection if isinstance(connection, str) else None
        self._send_listeners = SendListeners()
        self.task_hub = task_hub
        self.partition_count = partition_count
        counter = counter or counter_from_environment()
        self.counter = counter
        self.base64_messages = base64_messages
        hook: dict[str, Any] = {"raw_request_hook": counter.hook} if counter is not None else {}
        self._tables = table_service_client(connection, **hook)
        # The queue and blob SDKs wait 15 s before their first retry: far too long inside a step
        # (a critical section's locks are held meanwhile). Retry after 0.5, 2.5, 4.5, 8.5 s.
        # (These settings configure the SDKs' own async ExponentialRetry policies.)
        self._queues = queue_service_client(connection, **_STORAGE_RETRY, **hook)
        self._blobs = blob_service_client(connection, **_STORAGE_RETRY, **hook)
        if counter is not None:
            counter.register_endpoint(self._tables.url, "table")
            counter.register_endpoint(self._queues.url, "queue")
            counter.register_endpoint(self._blobs.url, "blob")
        hub = task_hub.lower()
        self.instances_table_name = f"{task_hub}Instances"
        self.history_table_name = f"{task_hub}History"
        self.large_messages_container_name = f"{hub}-largemessages"
        self.leases_container_name = f"{hub}-leases"
        self._queue_prefix = f"{hub}-"
        self._instances: TableClient = self._tables.get_table_client(self.instances_table_name)
        self._history: TableClient = self._tables.get_table_client(self.history_table_name)
        self._large = LargePayloadStore(self._blobs.get_container_client(self.large_messages_container_name))
        self._leases = PartitionLeaseStore(self._blobs.get_container_client(self.leases_container_name))
        self._queue_clients: dict[str, QueueClient] = {}

    # -- names ----------------------------------------------------------------------------------
    def logical_queues(self) -> list[str]:
        return [control_queue(p) for p in range(self.partition_count)] + [WORK_ITEM_QUEUE, POISON_QUEUE]

    def add_send_listener(self, listener: SendListener) -> None:
        self._send_listeners.add(listener)

    async def queue_is_empty(self, queue: str) -> bool:
        properties = await self._queue(queue).get_queue_properties()
        return not properties.approximate_message_count

    # -- partition leases (``_leases``) ---------------------------------------------------------
    async def acquire_partition(self, partition: int, owner: str, seconds: float, *, steal: bool = False) -> bool:
        return await self._leases.acquire(partition, owner, seconds, steal=steal)

    async def renew_partition(self, partition: int, owner: str) -> bool:
        return await self._leases.renew(partition, owner)

    async def release_partition(self, partition: int, owner: str) -> None:
        await self._leases.release(partition, owner)

    async def partition_owners(self) -> dict[int, str]:
        return await self._leases.owners()

    @property
    def local_wake_group(self) -> str:
        """Names this task hub among the processes of one machine (``durable.runtime._wake``)."""
        return f"{self._queues.url.rstrip('/')}/{self._queue_prefix}"

    def physical_queue_name(self, queue: str) -> str:
        return self._queue_prefix + queue

    def _queue(self, queue: str) -> QueueClient:
        client = self._queue_clients.get(queue)
        if client is None:
            client = self._queues.get_queue_client(self.physical_queue_name(queue))
            self._queue_clients[queue] = client
        return client

    # -- lifecycle ------------------------------------------------------------------------------
    async def create_task_hub(self) -> None:
        async def ignore_exists(coro: Any) -> None:
            with contextlib.suppress(ResourceExistsError):
                await coro

        await asyncio.gather(
            ignore_exists(self._tables.create_table(self.instances_table_name)),
            ignore_exists(self._tables.create_table(self.history_table_name)),
            *(ignore_exists(self._queue(q).create_queue()) for q in self.logical_queues()),
            ignore_exists(self._blobs.create_container(self.large_messages_container_name)),
            ignore_exists(self._blobs.create_container(self.leases_container_name)),
        )

    async def delete_task_hub(self) -> None:
        async def ignore_missing(coro: Any) -> None:
            with contextlib.suppress(ResourceNotFoundError):
                await coro

        # Hub names are alphanumeric, so "{hub}-" never prefixes another hub's queues.
        queue_names = [q.name async for q in self._queues.list_queues(name_starts_with=self._queue_prefix)]
        await asyncio.gather(
            self._tables.delete_table(self.instances_table_name),
            self._tables.delete_table(self.history_table_name),
            *(ignore_missing(self._queues.delete_queue(name)) for name in queue_names),
            ignore_missing(self._blobs.delete_container(self.large_messages_container_name)),
            ignore_missing(self._blobs.delete_container(self.leases_container_name)),
        )

    async def close(self) -> None:
        for client in self._queue_clients.values():
            await client.close()
        self._queue_clients.clear()
        await self._instances.close()
        await self._history.close()
        await self._large.container.close()
        await self._leases.container.close()
        await self._tables.close()
        await self._queues.close()
        await self._blobs.close()
        if isinstance(self.connection, StorageEndpoints) and self.connection.close_credential:
            await self.connection.credential.close()

    async def __aenter__(self) -> AzureStorageBackend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- queues ---------------------------------------------------------------------------------
    def _encode_body(self, text: str) -> str:
        if self.base64_messages:
            return base64.b64encode(text.encode("utf-8")).decode("ascii")
        return text

    def _decode_body(self, content: str) -> str:
        if self.base64_messages:
            return base64.b64decode(content.encode("ascii"), validate=True).decode("utf-8")
        return content

    async def _put(self, queue: str, body: str, delay: float, blob_prefix: str, *, notify: bool = True) -> _Receipt:
        """Enqueue ``body`` (through a blob when too large); returns the new message's handle.
        ``notify``: tell the send listeners (not for a message this process holds already)."""
        content = self._encode_body(body)
        blob: str | None = None
        if message_too_large(content):
            blob = new_blob_name(blob_prefix, "message")
            await self._large.put(blob, body)
            content = self._encode_body(message_reference(blob))
        seconds = message_delay(delay)
        visibility = math.ceil(seconds) if seconds > 0 else None
        # time_to_live=-1: messages never expire (a durable timer may wait the full 7 days).
        try:
            sent = await self._queue(queue).send_message(content, visibility_timeout=visibility, time_to_live=-1)
        except HttpResponseError:  # refused: no message points at the blob
            if blob is not None:
                await self._large.delete_quietly([blob])
            raise
        if notify:
            self._send_listeners.sent(queue, seconds)
        return _Receipt(sent.id, sent.pop_receipt or "", blob)

    async def put_raw(self, queue: str, body: str, delay: float = 0.0) -> None:
        """Enqueue an arbitrary body (tests use it to inject malformed messages)."""
        await self._put(queue, body, delay, "_raw")

    async def send(self, messages: Sequence[WorkMessage]) -> None:
        await self._enqueue(messages, None)

    async def _send_outgoing(self, outgoing: Outgoing, held_for: float | None = None) -> list[ReceivedMessage]:
        """Enqueue one queue message (two, if its body came out too large); with ``held_for``,
        hidden that long and handed back as deliveries this process holds (``send_held``)."""
        body = outgoing.body
        if len(outgoing.messages) > 1 and message_too_large(self._encode_body(body)):
            halves = await asyncio.gather(*(self._send_outgoing(half, held_for) for half in outgoing.halves()))
            return [delivery for half in halves for delivery in half]
        prefix = escape_key(outgoing.messages[0].instance_id)
        if held_for is None:
            await self._put(outgoing.queue, body, outgoing.delay, prefix)
            return []
        receipt = await self._put(outgoing.queue, body, held_for, prefix, notify=False)
        return deliveries(outgoing.queue, outgoing.messages, 0, receipt, held=True)

    async def send_held(self, messages: Sequence[WorkMessage], lease: float) -> list[ReceivedMessage]:
        return await self._enqueue(messages, lease_seconds(lease))

    async def _enqueue(self, messages: Sequence[WorkMessage], held_for: float | None) -> list[ReceivedMessage]:
        """``send`` (``held_for`` None) or ``send_held``: the messages packed into queue messages."""
        for message in messages:
            validate_instance_id(message.instance_id)
        envelopes = pack(messages, self.partition_count, utcnow())
        sent = await asyncio.gather(*(self._send_outgoing(envelope, held_for) for envelope in envelopes))
        return [delivery for envelope in sent for delivery in envelope]

    async def receive(
        self, queue: str, max_count: int, visibility_timeout: float
    ) -> list[ReceivedMessage | PoisonedMessage]:
        count = receive_count(max_count)
        visibility = math.ceil(lease_seconds(visibility_timeout))
        pager = self._queue(queue).receive_messages(messages_per_page=count, visibility_timeout=visibility)
        raw = []
        async for page in pager.by_page():  # one page = one request
            raw = [m async for m in page]
            break
        parsed = await asyncio.gather(*(self._parse(queue, m) for m in raw))
        return [delivery for deliveries in parsed for delivery in deliveries]

    async def _parse(self, queue: str, raw: Any) -> list[ReceivedMessage | PoisonedMessage]:
        receipt = _Receipt(raw.id, raw.pop_receipt)
        content = raw.content if isinstance(raw.content, str) else str(raw.content or "")
        try:
            body = self._decode_body(content)
        except (ValueError, UnicodeDecodeError) as exc:
            return [PoisonedMessage(queue, content, raw.dequeue_count, receipt, f"undecodable body: {exc!r}")]
        deliveries = await self._parse_text(queue, body, raw.dequeue_count, receipt)
        first = deliveries[0] if deliveries else None
        if isinstance(first, PoisonedMessage) and first.reason.startswith(_MISSING_BLOB):
            # Its blob is gone: deleted with a copy of this message that was processed (a send
            # the SDK retried after a lost answer enqueues the same reference twice), or by a
            # purge of its instance. Either way there is nothing left to do with it.
            log.warning("dropped message %s on %s: %s", raw.id, queue, first.reason)
            await self._delete_message(queue, replace(receipt, blob=None))
            return []
        if not deliveries:  # an envelope delivered again, split: its parts are on the queue now
            await self._delete_message(queue, receipt)
        return deliveries

    async def parse_deliveries(
        self, queue: str, body: str, dequeue_count: int
    ) -> list[ReceivedMessage | PoisonedMessage]:
        return await self._parse_text(queue, body, dequeue_count, None)

    async def _parse_text(
        self, queue: str, body: str, dequeue_count: int, receipt: _Receipt | None
    ) -> list[ReceivedMessage | PoisonedMessage]:
        blob = parse_message_reference(body)
        if blob is not None:
            if receipt is not None:
                receipt.blob = blob
            try:
                body = await self._large.get(blob)
            except ResourceNotFoundError:
                reason = f"{_MISSING_BLOB} {blob}"
                return [PoisonedMessage(queue, body, dequeue_count, receipt, reason)]
        try:
            parts = unpack(body)
        except ValueError as exc:
            return [PoisonedMessage(queue, body, dequeue_count, receipt, str(exc))]
        if split_on_redelivery(parts, dequeue_count):
            await asyncio.gather(*(self._send_outgoing(Outgoing(queue, 0.0, [part])) for part in parts))
            return []
        return [*deliveries(queue, parts, dequeue_count, receipt)]

    @staticmethod
    def _receipt(received: ReceivedMessage | PoisonedMessage) -> _Receipt:
        receipt = received.receipt
        if isinstance(receipt, SharedReceipt):
            receipt = receipt.inner
        if not isinstance(receipt, _Receipt):
            raise TypeError("message was not received from this backend")
        return receipt

    async def _delete_message(self, queue: str, receipt: _Receipt) -> bool:
        """Delete a message (and its large-message blob); False when it was no longer ours."""
        try:
            await self._queue(queue).delete_message(receipt.message_id, receipt.pop_receipt)
        except HttpResponseError as exc:
            if not _is_gone(exc):
                raise
            # Deleted already, or re-delivered to someone else: its blob is theirs to delete.
            return False
        if receipt.blob is not None:
            await self._large.delete_quietly([receipt.blob])
        return True

    async def delete(self, received: ReceivedMessage | PoisonedMessage) -> None:
        receipt = self._receipt(received)
        if isinstance(received.receipt, SharedReceipt) and not received.receipt.settle(received):
            return  # other parts of its envelope are still open
        await self._delete_message(received.queue, receipt)

    async def release(self, received: ReceivedMessage, delay: float) -> None:
        receipt = self._receipt(received)
        shared = received.receipt
        if isinstance(shared, SharedReceipt) and not shared.needs_renewal(time.monotonic()):
            return
        visibility = math.ceil(message_delay(delay))
        try:
            updated = await self._queue(received.queue).update_message(
                receipt.message_id, receipt.pop_receipt, visibility_timeout=visibility
            )
        except HttpResponseError as exc:
            if not _is_gone(exc):
                raise
            return
        if updated.pop_receipt:
            receipt.pop_receipt = updated.pop_receipt

    async def poison(self, received: ReceivedMessage | PoisonedMessage, reason: str) -> None:
        receipt = self._receipt(received)
        body = received.message.to_json() if isinstance(received, ReceivedMessage) else received.body
        envelope = json.dumps(
            {"Queue": received.queue, "Reason": reason, "DequeueCount": received.dequeue_count, "Body": body},
            separators=(",", ":"),
        )
        prefix = escape_key(received.message.instance_id) if isinstance(received, ReceivedMessage) else "_raw"
        # Copy first, then delete: a crash in between leaves the message in both queues, not in none.
        copy = await self._put(POISON_QUEUE, envelope, 0.0, prefix)
        if isinstance(received.receipt, SharedReceipt) and not received.receipt.settle(received):
            return  # other parts of its envelope are still open
        if not await self._delete_message(received.queue, receipt):
            # The message was no longer ours (re-delivered to someone else, or gone): take the copy back.
            await self._delete_message(POISON_QUEUE, copy)

    async def poison_messages(self, max_count: int = 32) -> list[tuple[str, str, str]]:
        """Peek at the poison queue: (queue, body, reason) triples, like ``InMemoryBackend.poison_queue``."""
        out: list[tuple[str, str, str]] = []
        for raw in await self._queue(POISON_QUEUE).peek_messages(max_messages=min(32, max_count)):
            body = self._decode_body(raw.content)
            blob = parse_message_reference(body)
            if blob is not None:
                body = await self._large.get(blob)
            data = json.loads(body)
            out.append((data["Queue"], data["Body"], data["Reason"]))
        return out

    # -- histories ------------------------------------------------------------------------------
    async def load_history(self, instance_id: str) -> InstanceHistory:
        validate_instance_id(instance_id)
        pk = escape_key(instance_id)
        for attempt in range(LOAD_ATTEMPTS):
            loaded = await self._load_once(instance_id, pk)
            if loaded is not None:
                return loaded
            await asyncio.sleep(0.02 * (attempt + 1))  # a rewrite moved the history meanwhile: read again
        raise RuntimeError(f"history of {instance_id!r}: rows named by its sentinel are missing")

    async def _load_once(self, instance_id: str, pk: str) -> InstanceHistory | None:
        """One read of the partition; None when the rows the sentinel names are not all there."""
        rows: dict[str, dict[str, Any]] = {}
        sentinel_etag: str | None = None
        pages = 0
        async for page in self._history.query_entities(f"PartitionKey eq {odata_string(pk)}").by_page():
            pages += 1
            async for entity in page:
                row = _entity_dict(entity)
                if row["RowKey"] == SENTINEL_ROW:
                    sentinel_etag = _etag_of(entity)
                rows[row["RowKey"]] = row
        sentinel = rows.pop(SENTINEL_ROW, None)
        if sentinel is None or sentinel_etag is None:
            return InstanceHistory(instance_id)  # never committed (rows, if any, are leftovers)
        base = int(sentinel.get("HistoryBase", 0))
        length = int(sentinel["HistoryLength"])
        orphans = any(index is not None and index < base for index in map(_row_index, rows))
        if pages > 1 and length:
            # Rows on pages read before the sentinel's may predate it. The rows a sentinel names
            # never change while it names them, so reading them again now agrees with it.
            rows = await self._query_rows(pk, base, base + length)
        keys = [_row_key(base + i) for i in range(length)]
        if any(k not in rows for k in keys):
            return None
        event_rows = [rows[k] for k in keys]
        blobs = any(blob_refs(r) for r in event_rows)
        await self._large.resolve(event_rows)
        return InstanceHistory(
            instance_id,
            events=[_history_event(r) for r in event_rows],
            etag=_Layout(sentinel_etag, base, length, blobs, orphans).token(),
            execution_id=sentinel.get("ExecutionId"),
            outbox_start=int(sentinel.get("OutboxStart", 0)),
            checkpoint=int(sentinel.get("Checkpoint", 0)),
        )

    async def _query_rows(self, pk: str, start: int | None, stop: int | None) -> dict[str, dict[str, Any]]:
        """The history rows of a partition with index in [start, stop) (None: unbounded)."""
        clauses = [f"PartitionKey eq {odata_string(pk)}"]
        clauses.append(f"RowKey ge {odata_string(_row_key(start or 0))}")
        clauses.append(f"RowKey lt {odata_string(_row_key(stop) if stop is not None else SENTINEL_ROW)}")
        rows: dict[str, dict[str, Any]] = {}
        async for entity in self._history.query_entities(" and ".join(clauses)):
            row = _entity_dict(entity)
            if _row_index(row["RowKey"]) is not None:
                rows[row["RowKey"]] = row
        return rows

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
        pk = escape_key(instance_id)
        if expected_etag is None:
            layout = _Layout(None)
        else:
            parsed = _Layout.parse(expected_etag)
            if parsed is None:  # not a token of this backend's: cannot be the current one
                raise ConcurrencyConflict(instance_id)
            layout = parsed
        if keep > layout.length:
            raise ValueError(f"keep={keep} is beyond the committed history of {layout.length} events")
        rewrite = keep < layout.length
        # A rewrite goes past the old rows, so that nothing a loader reads changes before the end.
        base = layout.base + layout.length if rewrite else layout.base
        old: dict[str, dict[str, Any]] = {}
        if rewrite and (keep or layout.blobs):
            old = await self._query_rows(pk, layout.base, layout.base + layout.length)
            if len(old) < layout.length:
                raise ConcurrencyConflict(instance_id)  # rewritten since: the token is stale
        rows: list[dict[str, Any]] = []
        for i in range(keep if rewrite else 0):  # rows a rewrite keeps: copied to their new place
            copy = dict(old[_row_key(layout.base + i)])
            copy["RowKey"] = _row_key(base + i)
            rows.append(copy)
        await self._large.resolve(rows)
        rows += [_history_entity(pk, base + keep + i, e, execution_id) for i, e in enumerate(new_events)]
        uploads = [u for row in rows for u in self._large.plan_offload(row, pk)]
        uploaded = [name for name, _ in uploads]
        replaced_blobs = {n for row in old.values() for n in blob_refs(row).values()} - set(uploaded)
        sentinel: dict[str, Any] = {
            "PartitionKey": pk,
            "RowKey": SENTINEL_ROW,
            "ExecutionId": execution_id,
            "HistoryBase": _int_prop(base),
            "HistoryLength": _int_prop(keep + len(new_events)),
            "OutboxStart": _int_prop(outbox_start),
            "Checkpoint": _int_prop(checkpoint),
        }
        old_keys = [_row_key(layout.base + i) for i in range(layout.length)] if rewrite else []
        if uploads:
            await self._large.upload_all(uploads)
        try:
            etag, leftover_keys = await self._write_history(pk, layout.etag, rows, old_keys, sentinel)
        except BatchConflict as exc:  # nothing was written: nothing points at the uploads
            await self._large.delete_quietly(uploaded)
            raise ConcurrencyConflict(instance_id) from exc
        # Committed. What the rewrite left behind (and leftovers of an earlier one) is garbage now.
        orphans = await self._delete_garbage(pk, base, leftover_keys, replaced_blobs, layout.orphans)
        blobs = bool(uploaded) or (layout.blobs and not rewrite)
        return _Layout(etag, base, keep + len(new_events), blobs, orphans).token()

    async def _write_history(
        self,
        pk: str,
        etag: str | None,
        rows: list[dict[str, Any]],
        old_keys: list[str],
        sentinel: dict[str, Any],
    ) -> tuple[str, list[str]]:
        """Write the rows and then the sentinel, every transaction conditional on the sentinel
        (see the module docstring). Returns the sentinel's new ETag and the old rows that were
        not deleted in the last transaction. Raises ``BatchConflict``."""
        row_ops = [BatchOperation("upsert", r) for r in rows]
        delete_ops = [BatchOperation("delete", {"PartitionKey": pk, "RowKey": k}) for k in old_keys]
        sentinel_size = BatchOperation("upsert", sentinel).size
        before, final, later = _plan_batches(row_ops, delete_ops, sentinel_size)
        for chunk in before:
            if etag is None:  # create-only: the first transaction creates an empty sentinel
                empty = {**sentinel, "ExecutionId": "", "HistoryBase": 0, "HistoryLength": 0, "OutboxStart": 0}
                touch = BatchOperation("create", {**empty, "Checkpoint": 0})
            else:  # unchanged, but its ETag moves: a commit from the old state now conflicts
                touch = BatchOperation("merge", {"PartitionKey": pk, "RowKey": SENTINEL_ROW}, etag)
            etag = (await submit_batch(self._history, [*chunk, touch]))[-1]
        closing = BatchOperation("create", sentinel) if etag is None else BatchOperation("replace", sentinel, etag)
        new_etag = (await submit_batch(self._history, [*final, closing]))[-1]
        assert new_etag is not None
        return new_etag, [str(op.entity["RowKey"]) for op in later]

    async def _delete_garbage(self, pk: str, base: int, keys: list[str], blobs: set[str], orphans: bool) -> bool:
        """Delete history rows below the live range and blobs no live row points at, after a
        commit; with ``orphans``, also whatever an interrupted earlier clean-up left below
        ``base``. Returns whether rows below the base may remain (clean-up is best effort)."""
        try:
            if orphans:
                found = await self._query_rows(pk, None, base)
                keys = sorted(set(keys) | set(found))
                blobs |= {n for row in found.values() for n in blob_refs(row).values()}
            # Blobs first: rows left below the base are never read, and a later clean-up of them
            # finds their blobs gone, which is fine; blobs whose rows are gone could not be found.
            await self._large.delete(blobs)
            await self._delete_rows(pk, keys)
        except Exception:
            return True
        return False

    async def _delete_rows(self, pk: str, keys: Sequence[str]) -> None:
        for start in range(0, len(keys), MAX_BATCH_OPERATIONS):
            chunk = keys[start : start + MAX_BATCH_OPERATIONS]
            try:
                await submit_batch(
                    self._history, [BatchOperation("delete", {"PartitionKey": pk, "RowKey": k}) for k in chunk]
                )
            except BatchConflict:
                # Someone deleted some of these concurrently: one at a time (a missing row is fine).
                for key in chunk:
                    await self._history.delete_entity(pk, key)

    # -- instances ------------------------------------------------------------------------------
    async def _get_instance_entity(self, pk: str) -> tuple[dict[str, Any], str] | None:
        try:
            entity = await self._instances.get_entity(pk, INSTANCE_ROW)
        except ResourceNotFoundError:
            return None
        return _entity_dict(entity), _etag_of(entity)

    async def read_instance(self, instance_id: str) -> InstanceRecord | None:
        validate_instance_id(instance_id)
        found = await self._get_instance_entity(escape_key(instance_id))
        if found is None:
            return None
        row = found[0]
        await self._large.resolve([row])
        return _instance_record(row)

    async def _put_instance(self, record: InstanceRecord, etag: str | None, current: Mapping[str, str]) -> str:
        """Create (``etag`` None) or replace under ``etag`` the row whose blob references are
        ``current``; SDK conflicts propagate. Returns the new row's ETag token."""
        pk = escape_key(record.instance_id)
        entity = _instance_entity(pk, record)
        uploads = self._large.plan_instance_offload(entity, pk, current)
        await self._large.upload_all(uploads)
        try:
            if etag is None:
                try:
                    written = await self._instances.create_entity(entity)
                except ResourceNotFoundError as exc:
                    raise RuntimeError(
                        f"table {self.instances_table_name} does not exist: create the task hub first"
                    ) from exc
            else:
                written = await self._instances.update_entity(
                    entity, mode=UpdateMode.REPLACE, etag=etag, match_condition=MatchConditions.IfNotModified
                )
        except (ResourceExistsError, ResourceModifiedError, ResourceNotFoundError, RuntimeError):
            await self._large.delete_quietly(name for name, _ in uploads)  # the write did not happen
            raise
        kept = set(blob_refs(entity).values())
        await self._large.delete_quietly(n for n in current.values() if n not in kept)
        return _instance_token(str(written.get("etag", "")), record.checkpoint, bool(kept))

    async def write_instance(self, record: InstanceRecord, etag: str | None = None) -> str | None:
        return await self._write_instance(record, etag, create=True)

    async def update_instance(self, record: InstanceRecord, etag: str | None = None) -> str | None:
        return await self._write_instance(record, etag, create=False)

    async def _write_instance(self, record: InstanceRecord, etag: str | None, create: bool) -> str | None:
        validate_instance_id(record.instance_id)
        hint = _parse_instance_token(etag) if etag is not None else None
        if hint is not None:
            row_etag, checkpoint, has_blobs = hint
            # The row as the caller last saw it: while it is current, its checkpoint is the
            # token's, so a record that is not older replaces it without a read (unless the row
            # points at blobs, which the write must then delete, or the record is marked and the
            # row may be its step's unmarked one: read it below).
            marked_over_same = record.sends_pending and checkpoint == record.checkpoint
            if checkpoint <= record.checkpoint and not marked_over_same and not has_blobs:
                try:
                    return await self._put_instance(record, row_etag, {})
                except (ResourceModifiedError, ResourceNotFoundError):
                    pass  # someone wrote since: compare checkpoints below
        pk = escape_key(record.instance_id)
        for _ in range(MAX_WRITE_ATTEMPTS):
            found = await self._get_instance_entity(pk)
            stored = _instance_record(found[0]) if found is not None else None
            if stored is not None and not may_replace(stored, record):
                return None
            if not create and (stored is None or stored.execution_id != record.execution_id):
                return None  # purged, or started again since
            try:
                if found is None:
                    return await self._put_instance(record, None, {})
                return await self._put_instance(record, found[1], blob_refs(found[0]))
            except (ResourceExistsError, ResourceModifiedError, ResourceNotFoundError):
                continue  # someone wrote in between: re-read and compare again
        raise ConcurrencyConflict(f"instance row of {record.instance_id}: too many concurrent writers")

    async def create_instance(self, record: InstanceRecord) -> str:
        validate_instance_id(record.instance_id)
        pk = escape_key(record.instance_id)
        try:  # usually a new id: try the insert before reading
            return await self._put_instance(record, None, {})
        except ResourceExistsError:
            pass
        for _ in range(MAX_WRITE_ATTEMPTS):
            found = await self._get_instance_entity(pk)
            try:
                if found is None:
                    return await self._put_instance(record, None, {})
                stored = _instance_record(found[0])
                if not stored.finished:
                    raise InstanceExists(record.instance_id)
                # Restarting a finished instance: the new history starts at the old checkpoint.
                restarted = replace(record, checkpoint=stored.checkpoint)
                return await self._put_instance(restarted, found[1], blob_refs(found[0]))
            except (ResourceExistsError, ResourceModifiedError, ResourceNotFoundError):
                continue
        raise ConcurrencyConflict(f"instance row of {record.instance_id}: too many concurrent writers")

    async def query_instances(
        self, query: InstanceQuery, page_size: int = 100, continuation_token: str | None = None
    ) -> tuple[list[InstanceRecord], str | None]:
        if page_size < 1:
            raise ValueError("page_size must be >= 1")
        if query.runtime_status is not None and not query.runtime_status:
            return [], None
        clauses: list[str] = []
        if query.runtime_status is not None:
            statuses = sorted(OrchestrationRuntimeStatus(s).value for s in query.runtime_status)
            clauses.append("(" + " or ".join(f"RuntimeStatus eq {odata_string(s)}" for s in statuses) + ")")
        # The emulator compares datetimes at millisecond precision: widen by 1 ms, filter exactly below.
        slack = timedelta(milliseconds=1)
        if query.created_from is not None:
            clauses.append(f"CreatedTime ge {odata_datetime(query.created_from - slack)}")
        if query.created_to is not None:
            clauses.append(f"CreatedTime le {odata_datetime(query.created_to + slack)}")
        if query.instance_id_prefix:
            prefix = escape_key(query.instance_id_prefix)
            clauses.append(f"PartitionKey ge {odata_string(prefix)}")
            upper = prefix_upper_bound(prefix)
            if upper is not None:
                clauses.append(f"PartitionKey lt {odata_string(upper)}")
        query_filter = " and ".join(clauses) if clauses else None

        token: Any = _decode_token(continuation_token) if continuation_token else None
        while True:
            if query_filter is None:
                pager = self._instances.list_entities(results_per_page=page_size)
            else:
                pager = self._instances.query_entities(query_filter, results_per_page=page_size)
            pages = pager.by_page(continuation_token=token)
            rows: list[dict[str, Any]] = []
            async for page in pages:
                rows = [_entity_dict(e) async for e in page]
                break
            token = pages.continuation_token  # type: ignore[attr-defined]
            records = [r for r in rows if r.get("RowKey") == INSTANCE_ROW]
            if records or not token:
                break  # an empty page with a token (server-side timeout/partition boundary): go on
        await self._large.resolve(records)
        out = [
            rec
            for rec in map(_instance_record, records)
            if (query.created_from is None or rec.created_time >= query.created_from)
            and (query.created_to is None or rec.created_time <= query.created_to)
            and (query.instance_id_prefix is None or rec.instance_id.startswith(query.instance_id_prefix))
        ]
        return out, _encode_token(token)

    async def purge_instance(self, instance_id: str, expected_etag: str | None = None) -> bool:
        validate_instance_id(instance_id)
        pk = escape_key(instance_id)
        if expected_etag is not None:
            # Take the sentinel first, under the ETag the caller judged the instance by: a step
            # committed since then makes the purge a conflict instead of wiping that step.
            layout = _Layout.parse(expected_etag)
            if layout is None:
                raise ConcurrencyConflict(instance_id)
            try:
                await self._history.delete_entity(
                    pk, SENTINEL_ROW, etag=layout.etag, match_condition=MatchConditions.IfNotModified
                )
            except (ResourceModifiedError, ResourceNotFoundError, HttpResponseError) as exc:
                if isinstance(exc, HttpResponseError) and exc.status_code not in (404, 412):
                    raise
                raise ConcurrencyConflict(instance_id) from exc
        keys = [
            str(e["RowKey"])
            async for e in self._history.query_entities(
                f"PartitionKey eq {odata_string(pk)}", select=["PartitionKey", "RowKey"]
            )
        ]
        await self._delete_rows(pk, keys)
        found = await self._get_instance_entity(pk)
        if found is not None:
            await self._instances.delete_entity(pk, INSTANCE_ROW)  # a missing entity is not an error
        await self._large.delete_prefix(pk + "/")
        return bool(keys) or found is not None
