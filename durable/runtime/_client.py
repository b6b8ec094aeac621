"""``DurableOrchestrationClient``: start, query and control orchestration instances."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote, urlsplit

import azure.functions as func

from ..core import _protocol as protocol
from ..core import _serialization as serialization
from ..core._context import ORCHESTRATION_TRIGGER, registered_name
from ..core._entities import EntityId, EntityRequest, as_entity_id, entity_message
from ..core._errors import OrchestrationApiMisuse
from ..core._history import EventType, FailureDetails, HistoryEvent, utcnow
from ..core._ids import is_control, validate_instance_id
from ..core._messages import MessageTarget, WorkMessage
from ..core._replay import new_execution_id
from ..core._status import InstanceRecord, OrchestrationRuntimeStatus
from . import _tracing as tracing
from ._backend import Backend, ConcurrencyConflict, InstanceExists, InstanceQuery
from ._registry import FunctionRegistry

log = logging.getLogger("durable.client")

START_SEND_ATTEMPTS = 3  # tries at sending a start message before start_new gives up
# The connection name Durable Functions puts in its management URLs for the Azure Storage provider.
MANAGEMENT_CONNECTION_NAME = "Storage"
# Seconds a poller should wait before asking again, as Durable Functions says in ``Retry-After``.
CHECK_STATUS_RETRY_AFTER = 10


class PurgeRefused(ValueError):
    """The instance cannot be purged now (it is running, or an entity in use)."""


class OrchestrationAlreadyExistsError(ValueError):
    """``start_new``/``restart`` with the id of an instance that exists and has not finished."""


@dataclass
class DurableOrchestrationStatus:
    """The status of an instance, shaped like the official SDK's class of the same name."""

    name: str
    instance_id: str
    runtime_status: OrchestrationRuntimeStatus
    created_time: datetime
    last_updated_time: datetime
    input_: Any = None
    output: Any = None
    custom_status: Any = None
    history: list[dict[str, Any]] | None = None
    failure_details: dict[str, Any] | None = None
    version: str | None = None  # the orchestration version the instance was created with

    @classmethod
    def from_record(cls, record: InstanceRecord, show_input: bool = True) -> DurableOrchestrationStatus:
        output: Any = serialization.decode(record.output)
        if record.failure is not None and output is None:
            output = f"{record.failure.error_type}: {record.failure.message}"
        return cls(
            name=record.name,
            instance_id=record.instance_id,
            runtime_status=record.runtime_status,
            created_time=record.created_time,
            last_updated_time=record.last_updated_time,
            input_=serialization.decode(record.input) if show_input else None,
            output=output,
            custom_status=serialization.decode(record.custom_status),
            failure_details=record.failure.to_dict() if record.failure else None,
            version=record.version,
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "instanceId": self.instance_id,
            "runtimeStatus": self.runtime_status.value,
            "input": self.input_,
            "customStatus": self.custom_status,
            "output": self.output,
            "createdTime": _iso(self.created_time),
            "lastUpdatedTime": _iso(self.last_updated_time),
        }
        if self.version is not None:
            out["version"] = self.version
        if self.history is not None:
            out["historyEvents"] = self.history
        return out


def _iso(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class EntityStateResponse:
    """What ``read_entity_state`` returns (the official SDK's shape)."""

    entity_exists: bool
    entity_state: Any = None


@dataclass(frozen=True)
class EntityStatus:
    entity_id: EntityId
    last_operation_time: datetime
    state: Any = None


@dataclass(frozen=True)
class PurgeHistoryResult:
    instances_deleted: int


class DurableOrchestrationClient:
    def __init__(
        self,
        backend: Backend,
        *,
        registry: FunctionRegistry | None = None,
        task_hub_name: str = "",
        clock: Callable[[], datetime] = utcnow,
        http_base_url: str | None = None,
        route_prefix: str = "api",
        management_key: str | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """``http_base_url`` is where the management HTTP API is served, e.g.
        ``http://127.0.0.1:7071/api/durabletask``; when None, management URLs are derived from the
        triggering request's scheme and host plus ``/{route_prefix}/durabletask``.
        ``management_key`` is appended to management URLs as ``code=``. ``sleep`` is how the
        client waits between its own retries (a simulation passes one on its virtual clock)."""
        self._backend = backend
        self._registry = registry
        self.task_hub_name = task_hub_name
        self._clock = clock
        self.http_base_url = http_base_url.rstrip("/") if http_base_url else None
        self.route_prefix = route_prefix.strip("/")
        self.management_key = management_key
        self._sleep = sleep

    async def close(self) -> None:
        await self._backend.close()

    async def __aenter__(self) -> DurableOrchestrationClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start_new(
        self,
        orchestration_function_name: str | Any,
        instance_id: str | None = None,
        client_input: Any = None,
        version: str | None = None,
    ) -> str:
        """Start an orchestration (named, or given as its decorated function); returns its
        instance id. ``version`` is the orchestration version the instance keeps for its life
        (default: the app's ``defaultVersion``). Raises ``FunctionNotFound`` for an unknown
        orchestrator name, ``ValueError`` for a bad id, version or a non-JSON input, and
        ``OrchestrationAlreadyExistsError`` (a ``ValueError``) for an id that is still running."""
        try:
            name = registered_name(orchestration_function_name, ORCHESTRATION_TRIGGER)
        except OrchestrationApiMisuse as error:
            raise ValueError(str(error)) from None
        if version is not None and (not isinstance(version, str) or any(map(is_control, version))):
            raise ValueError(f"version must be a string without control characters, got {version!r}")
        if version is None and self._registry is not None:
            version = self._registry.versioning.default_version
        return await self._start(name, instance_id, serialization.encode(client_input), version)

    async def _start(
        self, orchestration_function_name: str, instance_id: str | None, input_json: str | None, version: str | None
    ) -> str:
        if self._registry is not None:
            self._registry.require_orchestrator(orchestration_function_name)
        instance_id = validate_instance_id(instance_id) if instance_id is not None else uuid.uuid4().hex
        if instance_id.startswith("@"):
            raise ValueError("instance ids starting with '@' are reserved for entities")
        now = self._clock()
        record = InstanceRecord(
            instance_id=instance_id,
            name=orchestration_function_name,
            runtime_status=OrchestrationRuntimeStatus.Pending,
            created_time=now,
            last_updated_time=now,
            execution_id=new_execution_id(),
            input=input_json,
            version=version,
        )
        try:
            record_etag: str | None = await self._backend.create_instance(record)
        except InstanceExists:
            record, record_etag = await self._restart_pending(record)
        except Exception:
            # The insert may have been carried out with its answer lost: it was if the row is ours.
            written = await self._backend.read_instance(instance_id)
            if written is None or written.execution_id != record.execution_id:
                raise
            record_etag = None
        execution_id = record.execution_id
        with tracing.starting_orchestration(
            orchestration_function_name, instance_id, execution_id, record.version
        ) as trace_context:
            started = HistoryEvent(
                EventType.EXECUTION_STARTED,
                now,
                name=orchestration_function_name,
                input=input_json,
                instance_id=instance_id,
                execution_id=execution_id,
                version=record.version,
                parent_trace_context=trace_context,  # every step of the instance is traced under it
            )
            message = WorkMessage(
                MessageTarget.ORCHESTRATION, instance_id, started, record_etag=record_etag, trace_context=trace_context
            )
            for attempt in range(START_SEND_ATTEMPTS):
                try:
                    await self._backend.send([message])
                    return instance_id
                except Exception as error:
                    # Send the same message again (a copy that did go out is dropped as a duplicate);
                    # a caller's own retry would be a new execution, which a finished run takes for
                    # a restart.
                    if attempt + 1 == START_SEND_ATTEMPTS:
                        await self._abandon_start(record, record_etag, error)
                        raise
                    await self._sleep(0.2 * 4**attempt)
        raise AssertionError("unreachable")

    async def _abandon_start(self, record: InstanceRecord, record_etag: str | None, error: Exception) -> None:
        """The start message could not be sent: mark the Pending row Failed, so that a start whose
        caller never learnt its id is not Pending for ever. If the message did go out (its answer
        was lost), the instance's first step writes a newer row over this one. The row is read
        first: a restart's carries the checkpoint of the run it replaced (a lower one would be
        refused), and one that is no longer this start's is left alone."""
        try:
            pending = await self._backend.read_instance(record.instance_id)
            if (
                pending is None
                or pending.execution_id != record.execution_id
                or pending.runtime_status is not OrchestrationRuntimeStatus.Pending
            ):
                return  # not this start's Pending row (its first step, whose send did go out, may have run)
            failed = dataclasses.replace(
                pending,
                runtime_status=OrchestrationRuntimeStatus.Failed,
                failure=FailureDetails("StartNotSent", f"the start message could not be sent: {error}"),
                completed_time=self._clock(),
            )
            await self._backend.write_instance(failed, record_etag)
        except Exception:
            log.warning("could not mark the unsent start of %s as failed", record.instance_id, exc_info=True)

    async def _restart_pending(self, record: InstanceRecord) -> tuple[InstanceRecord, str | None]:
        """A start for an id whose row is not finished. A Pending row: its start message was
        lost (the send failed, or its answer did) or is still on its way; the same call repeated
        sends the start again for the same execution (the instance drops whichever copy comes
        second), another start for that id is a conflict. A row still sending its outcome to a
        parent (protocol I8): a conflict for now."""
        existing = await self._backend.read_instance(record.instance_id)
        if existing is not None and existing.sends_pending:
            if await self._still_sending(existing):
                raise OrchestrationAlreadyExistsError(
                    f"instance '{record.instance_id}' has finished but is still sending its outcome to its "
                    f"parent; try again in a moment"
                )
            await self._backend.purge_instance(record.instance_id)  # a row that outlived its history
            return record, await self._backend.create_instance(record)
        if existing is None or existing.runtime_status is not OrchestrationRuntimeStatus.Pending:
            raise OrchestrationAlreadyExistsError(
                f"an instance with id '{record.instance_id}' already exists and is not finished"
            )
        if (existing.name, existing.input, existing.version) != (record.name, record.input, record.version):
            raise OrchestrationAlreadyExistsError(
                f"an instance with id '{record.instance_id}' is already Pending with another input; "
                f"terminate it first to start it anew"
            )
        return existing, None

    async def get_status(
        self,
        instance_id: str,
        show_history: bool = False,
        show_history_output: bool = False,
        show_input: bool = False,
    ) -> DurableOrchestrationStatus | None:
        """The instance's status, None if there is none; its input only with ``show_input``
        (as in the official SDK), its history with ``show_history``."""
        record = await self._backend.read_instance(validate_instance_id(instance_id))
        if record is None:
            return None
        status = DurableOrchestrationStatus.from_record(record, show_input)
        if show_history:
            history = await self._backend.load_history(instance_id)
            status.history = [_history_json(e, show_history_output) for e in history.events]
        return status

    async def get_status_by(
        self,
        created_time_from: datetime | None = None,
        created_time_to: datetime | None = None,
        runtime_status: Iterable[OrchestrationRuntimeStatus] | None = None,
        instance_id_prefix: str | None = None,
    ) -> list[DurableOrchestrationStatus]:
        """The statuses of the instances that match every filter given (with their inputs, as
        the management API's list answers by default). ``instance_id_prefix`` is a range query
        on the instance id, not a scan."""
        query = InstanceQuery(
            runtime_status=frozenset(runtime_status) if runtime_status is not None else None,
            created_from=created_time_from,
            created_to=created_time_to,
            instance_id_prefix=instance_id_prefix or None,
        )
        return [DurableOrchestrationStatus.from_record(r) async for r in self._query(query)]

    async def get_status_all(self) -> list[DurableOrchestrationStatus]:
        return await self.get_status_by()

    async def get_status_page(
        self,
        created_time_from: datetime | None = None,
        created_time_to: datetime | None = None,
        runtime_status: Iterable[OrchestrationRuntimeStatus] | None = None,
        instance_id_prefix: str | None = None,
        page_size: int = 100,
        continuation_token: str | None = None,
        show_input: bool = True,
    ) -> tuple[list[DurableOrchestrationStatus], str | None]:
        """One page of a status query, and the token for the next page (None on the last page).

        A page may hold fewer than ``page_size`` instances even when more follow: always check
        the token. Raises ``ValueError`` for a malformed continuation token or page size."""
        if page_size < 1:
            raise ValueError("page size must be at least 1")
        query = InstanceQuery(
            runtime_status=frozenset(runtime_status) if runtime_status is not None else None,
            created_from=created_time_from,
            created_to=created_time_to,
            instance_id_prefix=instance_id_prefix or None,
        )
        records, token = await self._backend.query_instances(query, page_size, continuation_token or None)
        return [DurableOrchestrationStatus.from_record(r, show_input) for r in records], token

    async def _query(self, query: InstanceQuery) -> Any:
        token: str | None = None
        while True:
            page, token = await self._backend.query_instances(query, 100, token)
            for record in page:
                yield record
            if token is None:
                return

    async def _require(self, instance_id: str) -> InstanceRecord:
        record = await self._backend.read_instance(validate_instance_id(instance_id))
        if record is None:
            raise ValueError(f"no instance with id '{instance_id}'")
        return record

    async def _send_control(self, instance_id: str, event: HistoryEvent, trace_context: str | None = None) -> None:
        await self._backend.send(
            [WorkMessage(MessageTarget.ORCHESTRATION, instance_id, event, trace_context=trace_context)]
        )

    async def raise_event(self, instance_id: str, event_name: str, event_data: Any = None) -> None:
        if not isinstance(event_name, str) or not event_name:
            raise ValueError("event name must be a non-empty string")
        record = await self._require(instance_id)
        if record.runtime_status.is_terminal:
            raise ValueError(f"instance '{instance_id}' is {record.runtime_status.value}; it takes no more events")
        event = HistoryEvent(
            EventType.EVENT_RAISED, self._clock(), name=event_name, input=serialization.encode(event_data)
        )
        with tracing.raising_event(instance_id, event_name) as trace_context:
            await self._send_control(instance_id, event, trace_context)

    async def terminate(self, instance_id: str, reason: str | None = None) -> None:
        record = await self._require(instance_id)
        if record.runtime_status.is_terminal:
            return  # already finished: nothing to terminate
        await self._send_control(
            instance_id,
            HistoryEvent(EventType.EXECUTION_TERMINATED, self._clock(), input=serialization.encode(reason)),
        )

    async def suspend(self, instance_id: str, reason: str | None = None) -> None:
        await self._require(instance_id)
        await self._send_control(
            instance_id, HistoryEvent(EventType.EXECUTION_SUSPENDED, self._clock(), input=serialization.encode(reason))
        )

    async def resume(self, instance_id: str, reason: str | None = None) -> None:
        await self._require(instance_id)
        await self._send_control(
            instance_id, HistoryEvent(EventType.EXECUTION_RESUMED, self._clock(), input=serialization.encode(reason))
        )

    async def rewind(
        self,
        instance_id: str,
        reason: str = "",
        task_hub_name: str | None = None,
        connection_name: str | None = None,
    ) -> None:
        """Rewind a Failed instance: it retries its failed work from where it stopped.

        ``task_hub_name``/``connection_name`` exist for signature compatibility with the official
        SDK; this client always addresses its own task hub. Raises ``ValueError`` for an unknown
        instance or one that is not Failed."""
        record = await self._require(instance_id)
        if record.runtime_status is not OrchestrationRuntimeStatus.Failed:
            raise ValueError(
                f"instance '{instance_id}' is {record.runtime_status.value}; only Failed instances can be rewound"
            )
        if not protocol.rewindable(protocol.read_orchestration(await self._backend.load_history(instance_id))):
            raise ValueError(
                f"instance '{instance_id}' cannot be rewound: it did not fail in an activity (rewind retries "
                f"the activity failures that ended an orchestration; failures the code retried or handled, "
                f"and failures of its own code, sub-orchestrations or entity calls stay)"
            )
        await self._send_control(
            instance_id, HistoryEvent(EventType.EXECUTION_REWOUND, self._clock(), input=serialization.encode(reason))
        )

    async def restart(self, instance_id: str, restart_with_new_instance_id: bool = True) -> str:
        """Start the instance's orchestrator again with the same input; returns the new instance id.

        With ``restart_with_new_instance_id=False`` the instance id is reused, which is allowed
        once the old instance has finished (``OrchestrationAlreadyExistsError`` otherwise).
        Raises ``ValueError`` for an unknown instance."""
        record = await self._require(instance_id)
        new_id = None if restart_with_new_instance_id else record.instance_id
        return await self._start(record.name, new_id, record.input, record.version)

    # -- entities ------------------------------------------------------------------------------------
    async def signal_entity(
        self,
        entityId: EntityId | str,  # the official SDK's parameter names
        operation_name: str,
        operation_input: Any = None,
        task_hub_name: str | None = None,
        connection_name: str | None = None,
        scheduled_time: datetime | None = None,
    ) -> None:
        """Send an operation to an entity (one-way); ``scheduled_time`` delays its delivery."""
        entity = as_entity_id(entityId)
        if not isinstance(operation_name, str) or not operation_name:
            raise ValueError("operation name must be a non-empty string")
        validate_instance_id(entity.instance_id)
        request = EntityRequest("op", operation=operation_name, input=serialization.encode(operation_input))
        with tracing.signalling_entity(entity.instance_id, entity.name, operation_name) as trace_context:
            await self._send_entity(entity, request, scheduled_time, trace_context)

    async def delete_entity(self, entityId: EntityId | str) -> None:
        """Delete an entity's state (its operations keep working; the state starts over)."""
        await self._send_entity(as_entity_id(entityId), EntityRequest("delete"))

    async def _send_entity(
        self,
        entity: EntityId,
        request: EntityRequest,
        scheduled_time: datetime | None = None,
        trace_context: str | None = None,
    ) -> None:
        if scheduled_time is not None and scheduled_time.tzinfo is None:
            raise ValueError("scheduled_time must be timezone-aware (UTC)")
        message = entity_message(entity.instance_id, request, self._clock(), uuid.uuid4().hex, scheduled_time)
        await self._backend.send([dataclasses.replace(message, trace_context=trace_context)])

    async def read_entity_state(
        self,
        entityId: EntityId | str,
        task_hub_name: str | None = None,
        connection_name: str | None = None,
    ) -> EntityStateResponse:
        record = await self._backend.read_instance(as_entity_id(entityId).instance_id)
        if record is None or record.runtime_status is not OrchestrationRuntimeStatus.Running:
            return EntityStateResponse(False, None)
        return EntityStateResponse(True, serialization.decode(record.input))

    async def list_entities(
        self, entity_name: str, page_size: int = 100, continuation_token: str | None = None
    ) -> tuple[list[EntityStatus], str | None]:
        """One page of the existing entities of a name, and the token of the next page."""
        prefix = EntityId(entity_name, "x").instance_id[:-1]
        query = InstanceQuery(runtime_status=frozenset({OrchestrationRuntimeStatus.Running}), instance_id_prefix=prefix)
        records, token = await self._backend.query_instances(query, page_size, continuation_token)
        page = [
            EntityStatus(EntityId.from_instance_id(r.instance_id), r.last_updated_time, serialization.decode(r.input))
            for r in records
        ]
        return page, token

    async def purge_instance_history(self, instance_id: str) -> PurgeHistoryResult:
        """Delete a finished instance's history and status. Raises ``PurgeRefused`` (a
        ``ValueError``) for an orchestration that has not finished and for an entity that is in
        use (it has state, holds a lock or waits for messages): purging those would lose data
        or strand the orchestrations still talking to them."""
        instance_id = validate_instance_id(instance_id)
        return PurgeHistoryResult(int(await self._purge(instance_id, await self._backend.read_instance(instance_id))))

    async def _purge(self, instance_id: str, record: InstanceRecord | None) -> bool:
        """Purge after checking the instance may be purged; for an entity, only if no step
        committed since the check (its bookkeeping is what its senders rely on)."""
        if instance_id.startswith("@"):
            history = await self._backend.load_history(instance_id)
            if not history.exists:
                return False  # nothing committed yet (a first step may be on its way: leave it be)
            snapshot = protocol.read_entity(history).snapshot
            if snapshot.state is not None or snapshot.lock_owner or snapshot.waiting or snapshot.buffered:
                raise PurgeRefused(
                    f"entity '{instance_id}' is in use (it has state, holds a lock or waits for messages); "
                    f"delete its state first"
                )
            if snapshot.senders:
                raise PurgeRefused(
                    f"entity '{instance_id}' may still get messages from {len(snapshot.senders)} sender(s) "
                    f"that have not ended; purge it once they have"
                )
            try:
                return await self._backend.purge_instance(instance_id, history.etag)
            except ConcurrencyConflict:
                raise PurgeRefused(f"entity '{instance_id}' changed while it was being purged; try again") from None
        if record is not None and not record.runtime_status.is_terminal:
            raise PurgeRefused(
                f"only instances in a terminal state can be purged, but '{instance_id}' is "
                f"{record.runtime_status.value}"
            )
        if record is not None and record.sends_pending and await self._still_sending(record):
            raise PurgeRefused(
                f"'{instance_id}' has finished but is still sending its outcome to its parent; try again"
            )
        return await self._backend.purge_instance(instance_id)

    async def _still_sending(self, record: InstanceRecord) -> bool:
        """For a row written ahead of its step's messages (protocol I8): whether its history is
        there, so its worker, or the one taking its messages over, writes the row again once they
        are sent. Nobody writes again a row that a late writer put back over a purged history."""
        return (await self._backend.load_history(record.instance_id)).exists

    async def purge_instance_history_by(
        self,
        created_time_from: datetime | None = None,
        created_time_to: datetime | None = None,
        runtime_status: Iterable[OrchestrationRuntimeStatus] | None = None,
    ) -> PurgeHistoryResult:
        statuses = frozenset(runtime_status) if runtime_status is not None else None
        query = InstanceQuery(runtime_status=statuses, created_from=created_time_from, created_to=created_time_to)
        records = [r async for r in self._query(query)]
        deleted = 0
        for record in records:
            try:
                deleted += int(await self._purge(record.instance_id, record))
            except PurgeRefused:
                continue  # running instances and entities in use are never purged by a filter
        return PurgeHistoryResult(deleted)

    async def wait_for_completion(
        self, instance_id: str, timeout: float = 60.0, poll_interval: float = 0.1
    ) -> DurableOrchestrationStatus:
        """Poll until the instance is Completed, Failed or Terminated; ``TimeoutError`` otherwise."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            status = await self.get_status(instance_id)
            if status is not None and status.runtime_status.is_terminal:
                return status
            if loop.time() >= deadline:
                raise TimeoutError(f"instance '{instance_id}' did not finish within {timeout} s")
            await asyncio.sleep(poll_interval)

    # -- HTTP management ------------------------------------------------------------------------

    def management_base_url(self, request: func.HttpRequest | None = None) -> str:
        """The URL the management HTTP API is served under, without a trailing slash."""
        if self.http_base_url is not None:
            return self.http_base_url
        origin = _origin_of(request.url) if request is not None else None
        if origin is None:
            host = os.environ.get("WEBSITE_HOSTNAME") or "localhost:7071"
            local = host.startswith(("localhost", "127.0.0.1", "[::1]"))
            origin = f"{'http' if local else 'https'}://{host}"
        prefix = f"/{self.route_prefix}" if self.route_prefix else ""
        return f"{origin}{prefix}/durabletask"

    def _management_query(self) -> str:
        parts = []
        if self.task_hub_name:
            parts.append(f"taskHub={quote(self.task_hub_name, safe='')}")
        parts.append(f"connection={MANAGEMENT_CONNECTION_NAME}")
        if self.management_key:
            parts.append(f"code={quote(self.management_key, safe='')}")
        return "&".join(parts)

    def _management_payload(self, request: func.HttpRequest | None, instance_id: str) -> dict[str, str]:
        instance_url = f"{self.management_base_url(request)}/instances/{quote(instance_id, safe='')}"
        query = self._management_query()
        return {
            "id": instance_id,
            "statusQueryGetUri": f"{instance_url}?{query}",
            "sendEventPostUri": f"{instance_url}/raiseEvent/{{eventName}}?{query}",
            "terminatePostUri": f"{instance_url}/terminate?reason={{text}}&{query}",
            "rewindPostUri": f"{instance_url}/rewind?reason={{text}}&{query}",
            "purgeHistoryDeleteUri": f"{instance_url}?{query}",
            "restartPostUri": f"{instance_url}/restart?{query}",
            "suspendPostUri": f"{instance_url}/suspend?reason={{text}}&{query}",
            "resumePostUri": f"{instance_url}/resume?reason={{text}}&{query}",
        }

    def get_client_response_links(self, request: func.HttpRequest | None, instance_id: str) -> dict[str, str]:
        """The instance's management URLs, on the origin of ``request`` when given (the official
        SDK's name for ``create_http_management_payload`` with a request)."""
        return self._management_payload(request, validate_instance_id(instance_id))

    def create_http_management_payload(self, instance_id: str) -> dict[str, str]:
        """The instance's management URLs (``statusQueryGetUri``, ``sendEventPostUri``, ...)."""
        return self._management_payload(None, instance_id)

    def create_check_status_response(self, request: func.HttpRequest, instance_id: str) -> func.HttpResponse:
        """A 202 response whose body holds the instance's management URLs and whose ``Location``
        is its status URL: the start of the HTTP async polling pattern."""
        payload = self._management_payload(request, instance_id)
        return func.HttpResponse(
            serialization.encode(payload),
            status_code=202,
            headers={
                "Content-Type": "application/json",
                "Location": payload["statusQueryGetUri"],
                "Retry-After": str(CHECK_STATUS_RETRY_AFTER),
            },
            mimetype="application/json",
        )

    async def wait_for_completion_or_create_check_status_response(
        self,
        request: func.HttpRequest,
        instance_id: str,
        timeout_in_milliseconds: int = 10000,
        retry_interval_in_milliseconds: int = 1000,
    ) -> func.HttpResponse:
        """Poll the instance until it finishes or the timeout passes.

        Completed: 200 with the output as JSON. Terminated: 200 and Failed: 500, each with the
        status JSON (as the official Python SDK). Still running at the timeout: the
        ``create_check_status_response`` response."""
        if timeout_in_milliseconds < 0 or retry_interval_in_milliseconds < 0:
            raise ValueError("timeout and retry interval must not be negative")
        if retry_interval_in_milliseconds > timeout_in_milliseconds:
            raise ValueError(
                f"total timeout {timeout_in_milliseconds} ms should be bigger than "
                f"retry interval {retry_interval_in_milliseconds} ms"
            )
        validate_instance_id(instance_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_in_milliseconds / 1000
        while True:
            status = await self.get_status(instance_id)
            if status is not None:
                if status.runtime_status is OrchestrationRuntimeStatus.Completed:
                    return _json_response(200, status.output)
                if status.runtime_status is OrchestrationRuntimeStatus.Terminated:
                    return _json_response(200, status.to_json())
                if status.runtime_status is OrchestrationRuntimeStatus.Failed:
                    return _json_response(500, status.to_json())
            remaining = deadline - loop.time()
            if remaining <= 0:
                return self.create_check_status_response(request, instance_id)
            await asyncio.sleep(min(retry_interval_in_milliseconds / 1000, remaining))


def _origin_of(url: str | None) -> str | None:
    if not url:
        return None
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        return None
    return f"{parts.scheme}://{parts.netloc}"


def _json_response(status_code: int, value: Any, headers: dict[str, str] | None = None) -> func.HttpResponse:
    return func.HttpResponse(
        serialization.encode(value) or "null",
        status_code=status_code,
        headers={"Content-Type": "application/json", **(headers or {})},
        mimetype="application/json",
    )


def _history_json(event: HistoryEvent, show_output: bool) -> dict[str, Any]:
    data = event.to_dict()
    if not show_output:
        data.pop("Result", None)
    return data
