"""The Azure Storage backend: the task hub of DESIGN §5 on Tables, Queues and Blobs."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import math
from collections.abc import Callable, Sequence
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
from azure.data.tables import EdmType, EntityProperty, TableTransactionError, UpdateMode
from azure.data.tables.aio import TableClient, TableServiceClient
from azure.storage.blob.aio import BlobServiceClient
from azure.storage.queue.aio import QueueClient, QueueServiceClient

from durable._azurite import resolve_connection_string
from durable._backend import (
    DEFAULT_PARTITIONS,
    MAX_PARTITIONS,
    MAX_QUEUE_DELAY_SECONDS,
    WORK_ITEM_QUEUE,
    ConcurrencyConflict,
    InstanceExists,
    InstanceHistory,
    InstanceQuery,
    PoisonedMessage,
    ReceivedMessage,
    control_queue,
    queue_for,
)
from durable._history import FailureDetails, HistoryEvent, utcnow
from durable._ids import validate_instance_id
from durable._messages import WorkMessage
from durable._status import InstanceRecord, OrchestrationRuntimeStatus

from ._accounting import StorageRequestCounter
from ._batch import BatchConflict, BatchOperation
from ._batch import submit as submit_batch
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
    message_reference,
    message_too_large,
    new_blob_name,
    parse_message_reference,
)

SENTINEL_ROW = "sentinel"
INSTANCE_ROW = ""
POISON_QUEUE = "poison"
MAX_BATCH_OPERATIONS = 100  # entity group transaction limit
MAX_BATCH_BYTES = 3_500_000  # the limit is 4 MiB per request; keep a margin for the multipart envelope
MAX_RECEIVE_COUNT = 32
MAX_WRITE_ATTEMPTS = 10  # read-compare-write rounds on an Instances row before giving up
_INT32 = 2**31


@dataclass
class _Receipt:
    """Queue message handle; the pop receipt changes with every update of the message."""

    message_id: str
    pop_receipt: str


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


def _history_entity(partition_key: str, index: int, event: HistoryEvent) -> dict[str, Any]:
    data = event.to_dict()
    entity: dict[str, Any] = {
        "PartitionKey": partition_key,
        "RowKey": f"{index:016X}",
        "EventType": data.pop("EventType"),
        "_Timestamp": event.timestamp,
        "EventId": _int_prop(event.event_id),
    }
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
    for column, value in entity.items():
        if column in ("PartitionKey", "RowKey", "_Timestamp", "Timestamp") or value is None:
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
    )


def _entity_size(entity: dict[str, Any]) -> int:
    """A generous estimate of an entity's size in a batch request body."""
    size = 512
    for column, value in entity.items():
        size += len(column) + 64
        if isinstance(value, str):
            size += len(value.encode("utf-8")) + value.count('"') + value.count("\\")
        else:
            size += 32
    return size


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


class AzureStorageBackend:
    """The ``Backend`` Protocol on an Azure Storage account (or Azurite)."""

    def __init__(
        self,
        connection_string: str,
        task_hub: str = "DurableHub",
        partition_count: int = DEFAULT_PARTITIONS,
        counter: StorageRequestCounter | None = None,
        *,
        base64_messages: bool = False,
    ) -> None:
        validate_task_hub_name(task_hub)
        connection_string = resolve_connection_string(connection_string)
        if not isinstance(partition_count, int) or not 1 <= partition_count <= MAX_PARTITIONS:
            raise ValueError(f"partition_count must be 1..{MAX_PARTITIONS}, got {partition_count!r}")
        self.connection_string = connection_string
        # Called with the queue's name after each immediately visible send: lets a co-located
        # poller wake up instead of waiting out its idle back-off.
        self.on_send: Callable[[str], None] | None = None
        self.task_hub = task_hub
        self.partition_count = partition_count
        self.counter = counter
        self.base64_messages = base64_messages
        hook: dict[str, Any] = {"raw_request_hook": counter.hook} if counter is not None else {}
        self._tables = TableServiceClient.from_connection_string(connection_string, **hook)
        self._queues = QueueServiceClient.from_connection_string(connection_string, **hook)
        self._blobs = BlobServiceClient.from_connection_string(connection_string, **hook)
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
        self._queue_clients: dict[str, QueueClient] = {}

    # -- names ----------------------------------------------------------------------------------
    def logical_queues(self) -> list[str]:
        return [control_queue(p) for p in range(self.partition_count)] + [WORK_ITEM_QUEUE, POISON_QUEUE]

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
        await self._tables.close()
        await self._queues.close()
        await self._blobs.close()

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

    async def _put(self, queue: str, body: str, delay: float, blob_prefix: str) -> None:
        content = self._encode_body(body)
        if message_too_large(content):
            name = new_blob_name(blob_prefix, "message")
            await self._large.put(name, body)
            content = self._encode_body(message_reference(name))
        visibility = min(MAX_QUEUE_DELAY_SECONDS, math.ceil(delay)) if delay > 0 else None
        # time_to_live=-1: messages never expire (a durable timer may wait the full 7 days).
        await self._queue(queue).send_message(content, visibility_timeout=visibility, time_to_live=-1)
        if self.on_send is not None and visibility is None:
            self.on_send(self.physical_queue_name(queue))

    async def put_raw(self, queue: str, body: str, delay: float = 0.0) -> None:
        """Enqueue an arbitrary body (tests use it to inject malformed messages)."""
        await self._put(queue, body, delay, "_raw")

    async def send(self, messages: Sequence[WorkMessage]) -> None:
        if not messages:
            return
        now = utcnow()

        async def send_one(message: WorkMessage) -> None:
            validate_instance_id(message.instance_id)
            delay = (message.visible_at - now).total_seconds() if message.visible_at else 0.0
            await self._put(
                queue_for(message, self.partition_count), message.to_json(), delay,
                escape_key(message.instance_id),
            )  # fmt: skip

        await asyncio.gather(*(send_one(m) for m in messages))

    async def receive(
        self, queue: str, max_count: int, visibility_timeout: float
    ) -> list[ReceivedMessage | PoisonedMessage]:
        count = max(1, min(MAX_RECEIVE_COUNT, max_count))
        visibility = max(1, min(MAX_QUEUE_DELAY_SECONDS, math.ceil(visibility_timeout)))
        pager = self._queue(queue).receive_messages(messages_per_page=count, visibility_timeout=visibility)
        raw = []
        async for page in pager.by_page():  # one page = one request
            raw = [m async for m in page]
            break
        return list(await asyncio.gather(*(self._parse(queue, m) for m in raw)))

    async def _parse(self, queue: str, raw: Any) -> ReceivedMessage | PoisonedMessage:
        receipt = _Receipt(raw.id, raw.pop_receipt)
        content = raw.content if isinstance(raw.content, str) else str(raw.content or "")
        try:
            body = self._decode_body(content)
        except (ValueError, UnicodeDecodeError) as exc:
            return PoisonedMessage(queue, content, raw.dequeue_count, receipt, f"undecodable body: {exc!r}")
        return await self._parse_text(queue, body, raw.dequeue_count, receipt)

    async def parse_delivery(self, queue: str, body: str, dequeue_count: int) -> ReceivedMessage | PoisonedMessage:
        return await self._parse_text(queue, body, dequeue_count, None)

    async def _parse_text(
        self, queue: str, body: str, dequeue_count: int, receipt: _Receipt | None
    ) -> ReceivedMessage | PoisonedMessage:
        blob = parse_message_reference(body)
        if blob is not None:
            try:
                body = await self._large.get(blob)
            except ResourceNotFoundError:
                reason = f"missing large-message blob {blob}"
                return PoisonedMessage(queue, body, dequeue_count, receipt, reason)
        try:
            message = WorkMessage.from_json(body)
        except ValueError as exc:
            return PoisonedMessage(queue, body, dequeue_count, receipt, str(exc))
        return ReceivedMessage(queue, message, dequeue_count, receipt)

    @staticmethod
    def _receipt(received: ReceivedMessage | PoisonedMessage) -> _Receipt:
        if not isinstance(received.receipt, _Receipt):
            raise TypeError("message was not received from this backend")
        return received.receipt

    async def delete(self, received: ReceivedMessage | PoisonedMessage) -> None:
        receipt = self._receipt(received)
        try:
            await self._queue(received.queue).delete_message(receipt.message_id, receipt.pop_receipt)
        except HttpResponseError as exc:
            if not _is_gone(exc):
                raise

    async def release(self, received: ReceivedMessage, delay: float) -> None:
        receipt = self._receipt(received)
        visibility = max(0, min(MAX_QUEUE_DELAY_SECONDS, math.ceil(delay)))
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
        body = received.message.to_json() if isinstance(received, ReceivedMessage) else received.body
        envelope = json.dumps(
            {"Queue": received.queue, "Reason": reason, "DequeueCount": received.dequeue_count, "Body": body},
            separators=(",", ":"),
        )
        prefix = escape_key(received.message.instance_id) if isinstance(received, ReceivedMessage) else "_raw"
        await self._put(POISON_QUEUE, envelope, 0.0, prefix)
        await self.delete(received)

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
        rows: dict[str, dict[str, Any]] = {}
        sentinel_etag: str | None = None
        entities = self._history.query_entities(f"PartitionKey eq {odata_string(pk)}")
        async for entity in entities:
            row = _entity_dict(entity)
            if row["RowKey"] == SENTINEL_ROW:
                sentinel_etag = _etag_of(entity)
            rows[row["RowKey"]] = row
        sentinel = rows.get(SENTINEL_ROW)
        if sentinel is None or sentinel_etag is None:
            return InstanceHistory(instance_id)  # never committed (rows, if any, are leftovers)
        length = int(sentinel["HistoryLength"])
        keys = [f"{i:016X}" for i in range(length)]
        missing = [k for k in keys if k not in rows]
        if missing:
            raise RuntimeError(f"history of {instance_id!r} is missing rows {missing[:5]}")
        event_rows = [rows[k] for k in keys]
        await self._large.resolve(event_rows)
        return InstanceHistory(
            instance_id,
            events=[_history_event(r) for r in event_rows],
            etag=sentinel_etag,
            execution_id=sentinel.get("ExecutionId"),
            outbox_start=int(sentinel.get("OutboxStart", 0)),
            checkpoint=int(sentinel.get("Checkpoint", 0)),
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
        pk = escape_key(instance_id)
        rows = [_history_entity(pk, keep + i, e) for i, e in enumerate(new_events)]
        uploads = [u for row in rows for u in self._large.plan_offload(row, pk)]
        sentinel: dict[str, Any] = {
            "PartitionKey": pk,
            "RowKey": SENTINEL_ROW,
            "ExecutionId": execution_id,
            "HistoryLength": _int_prop(keep + len(rows)),
            "OutboxStart": _int_prop(outbox_start),
            "Checkpoint": _int_prop(checkpoint),
        }
        if expected_etag is None:
            sentinel_op = BatchOperation("create", sentinel)
        else:
            sentinel_op = BatchOperation("replace", sentinel, expected_etag)
        if uploads:
            await self._large.upload_all(uploads)

        sizes = [_entity_size(r) for r in rows]
        if len(rows) < MAX_BATCH_OPERATIONS and sum(sizes) + _entity_size(sentinel) <= MAX_BATCH_BYTES:
            final_rows = rows
        else:
            claim_etag, committed = await self._claim(pk, instance_id, expected_etag)
            sentinel_op = BatchOperation("replace", sentinel, claim_etag)
            final_rows = await self._write_tail_rows(keep, committed, rows, sizes)
        operations = [BatchOperation("upsert", r) for r in final_rows]
        operations.append(sentinel_op)
        try:
            etags = await submit_batch(self._history, operations)
        except BatchConflict as exc:
            raise ConcurrencyConflict(instance_id) from exc
        return etags[-1]

    async def _claim(self, pk: str, instance_id: str, expected_etag: str | None) -> tuple[str, int]:
        """Take the instance before a commit too large for one transaction: rewrite its sentinel
        unchanged under ``expected_etag`` (or create an empty one), so that a concurrent commit
        fails before either writes a row. Returns the claim's ETag and the committed length."""
        if expected_etag is None:
            committed, execution_id, outbox_start, checkpoint = 0, "", 0, 0
            operation = "create"
        else:
            try:
                current = await self._history.get_entity(pk, SENTINEL_ROW)
            except ResourceNotFoundError as exc:
                raise ConcurrencyConflict(instance_id) from exc
            if _etag_of(current) != expected_etag:
                raise ConcurrencyConflict(instance_id)
            committed = int(_plain(current["HistoryLength"]))
            execution_id = str(current.get("ExecutionId", ""))
            outbox_start = int(_plain(current.get("OutboxStart", committed)))
            checkpoint = int(_plain(current.get("Checkpoint", 0)))
            operation = "replace"
        claim = {
            "PartitionKey": pk,
            "RowKey": SENTINEL_ROW,
            "ExecutionId": execution_id,
            "HistoryLength": _int_prop(committed),
            "OutboxStart": _int_prop(outbox_start),
            "Checkpoint": _int_prop(checkpoint),
        }
        try:
            (etag,) = await submit_batch(self._history, [BatchOperation(operation, claim, expected_etag)])
        except BatchConflict as exc:
            raise ConcurrencyConflict(instance_id) from exc
        return etag, committed

    async def _write_tail_rows(
        self, keep: int, committed: int, rows: list[dict[str, Any]], sizes: list[int]
    ) -> list[dict[str, Any]]:
        """Write a too-large step's rows that lie past the committed history, in batches (the
        caller holds the claim).

        Rows past the sentinel's ``HistoryLength`` are invisible, so writing them first is safe.
        Rows that would overwrite committed history go into the final batch with the sentinel
        (unless they do not fit there either; then they are written last before it).
        Returns the rows for the final batch.
        """
        overlap = max(0, min(len(rows), committed - keep))  # rows[:overlap] overwrite committed rows
        final_count = overlap
        final_bytes = sum(sizes[:overlap])
        # Fill the final batch with the last rows, as long as they fit with the overlap rows.
        tail = list(range(overlap, len(rows)))
        final_extra: list[int] = []
        while (
            tail and final_count + 1 < MAX_BATCH_OPERATIONS and final_bytes + sizes[tail[-1]] + 1024 <= MAX_BATCH_BYTES
        ):
            index = tail.pop()
            final_extra.append(index)
            final_count += 1
            final_bytes += sizes[index]
        batches: list[list[dict[str, Any]]] = []
        current_batch: list[dict[str, Any]] = []
        current_bytes = 0
        for index in tail:
            if current_batch and (
                len(current_batch) >= MAX_BATCH_OPERATIONS or current_bytes + sizes[index] > MAX_BATCH_BYTES
            ):
                batches.append(current_batch)
                current_batch, current_bytes = [], 0
            current_batch.append(rows[index])
            current_bytes += sizes[index]
        if current_batch:
            batches.append(current_batch)
        final_overlap = list(range(overlap))
        if overlap + 1 > MAX_BATCH_OPERATIONS or final_bytes > MAX_BATCH_BYTES:
            # Cannot be atomic: write the overlapping rows just before the sentinel.
            for start in range(0, overlap, MAX_BATCH_OPERATIONS - 1):
                batches.append(rows[start : start + MAX_BATCH_OPERATIONS - 1])
            final_overlap = []
        for batch in batches:
            await submit_batch(self._history, [BatchOperation("upsert", r) for r in batch])
        return [rows[i] for i in final_overlap] + [rows[i] for i in sorted(final_extra)]

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

    async def _put_instance(self, record: InstanceRecord, etag: str | None) -> str:
        """Create (``etag`` None) or replace under ``etag``; SDK conflicts propagate. Returns the new ETag."""
        pk = escape_key(record.instance_id)
        entity = _instance_entity(pk, record)
        await self._large.upload_all(self._large.plan_offload(entity, pk))
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
        return str(written.get("etag", ""))

    async def write_instance(self, record: InstanceRecord, etag: str | None = None) -> str | None:
        validate_instance_id(record.instance_id)
        if etag is not None:
            # The row as the caller last saw it: replacing it unchanged needs no read.
            try:
                return await self._put_instance(record, etag)
            except (ResourceModifiedError, ResourceNotFoundError):
                pass  # someone wrote since: compare checkpoints below
        pk = escape_key(record.instance_id)
        for _ in range(MAX_WRITE_ATTEMPTS):
            found = await self._get_instance_entity(pk)
            if found is not None and int(found[0].get("Checkpoint", 0)) > record.checkpoint:
                return None
            try:
                return await self._put_instance(record, found[1] if found else None)
            except (ResourceExistsError, ResourceModifiedError, ResourceNotFoundError):
                continue  # someone wrote in between: re-read and compare again
        raise ConcurrencyConflict(f"instance row of {record.instance_id}: too many concurrent writers")

    async def create_instance(self, record: InstanceRecord) -> str:
        validate_instance_id(record.instance_id)
        pk = escape_key(record.instance_id)
        try:  # usually a new id: try the insert before reading
            return await self._put_instance(record, None)
        except ResourceExistsError:
            pass
        for _ in range(MAX_WRITE_ATTEMPTS):
            found = await self._get_instance_entity(pk)
            to_write = record
            if found is not None:
                status = OrchestrationRuntimeStatus(found[0]["RuntimeStatus"])
                if not status.is_terminal:
                    raise InstanceExists(record.instance_id)
                # Restarting a finished instance: the new history starts at the old checkpoint.
                to_write = replace(record, checkpoint=int(found[0].get("Checkpoint", 0)))
            try:
                return await self._put_instance(to_write, found[1] if found else None)
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

    async def purge_instance(self, instance_id: str) -> bool:
        validate_instance_id(instance_id)
        pk = escape_key(instance_id)
        keys = [
            (e["PartitionKey"], e["RowKey"])
            async for e in self._history.query_entities(
                f"PartitionKey eq {odata_string(pk)}", select=["PartitionKey", "RowKey"]
            )
        ]
        for start in range(0, len(keys), MAX_BATCH_OPERATIONS):
            chunk = keys[start : start + MAX_BATCH_OPERATIONS]
            try:
                await self._history.submit_transaction([("delete", {"PartitionKey": p, "RowKey": r}) for p, r in chunk])
            except TableTransactionError:
                # Someone deleted some of these concurrently: fall back to one at a time.
                for p, r in chunk:
                    await self._history.delete_entity(p, r)  # deleting a missing entity succeeds
        found = await self._get_instance_entity(pk)
        if found is not None:
            await self._instances.delete_entity(pk, INSTANCE_ROW)  # a missing entity is not an error
        await self._large.delete_prefix(pk + "/")
        return bool(keys) or found is not None
