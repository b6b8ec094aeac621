"""The management HTTP API: Durable Functions' ``/runtime/webhooks/durabletask/...`` API, served
under ``/{routePrefix}/durabletask/...`` (DESIGN §8; the routes and every deliberate difference are
listed in the README's "Management HTTP API" section).

Paths, query parameters, status codes and JSON bodies follow the Durable Functions HTTP API
reference and, where it is silent, the extension's handler. Error bodies have the shape the
extension's (ASP.NET) errors have and the official client parses: ``{"Message": ...,
"ExceptionMessage": ...}``; operations the extension answers without content answer with an
empty body.

Every request is authorized here, as the extension authorizes its webhooks: by the management
system key or the master key (``_client_binding.ManagementKeys``), never by a function key.
Requests under ``rpc/{token}/`` come from the official SDK's client class built from our binding
string (``_client_binding``): its orchestration inputs, event data and operation inputs arrive as
JSON text inside a JSON string, and ``restart`` answers with the new instance id.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime, timezone
from typing import Any, NoReturn
from urllib.parse import parse_qs, unquote, urlsplit

import azure.functions as func

from ..core import _serialization as serialization
from ..core._entities import EntityId, is_entity_id
from ..core._errors import FunctionNotFound
from ..core._ids import validate_instance_id
from ..core._status import OrchestrationRuntimeStatus
from ..core._timestamps import parse_timestamp
from ..runtime._client import (
    DurableOrchestrationClient,
    DurableOrchestrationStatus,
    OrchestrationAlreadyExistsError,
    PurgeRefused,
)
from ._client_binding import RPC_SEGMENT, DurableClient, ManagementKeys

logger = logging.getLogger(__name__)

CONTINUATION_TOKEN_HEADER = "x-ms-continuation-token"
# Seconds a poller of a running instance's status should wait (the extension's value).
STATUS_RETRY_AFTER = 5
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000  # Azure Tables' own page limit; a page may always hold fewer than ``top``

_S = OrchestrationRuntimeStatus
_IN_PROGRESS = frozenset({_S.Pending, _S.Running, _S.ContinuedAsNew, _S.Suspended})
_INSTANCE_OPERATIONS = ("terminate", "rewind", "restart", "suspend", "resume")
# Timestamps of query parameters are clamped to what Azure Tables can store (and Python can add a
# millisecond to): earlier or later bounds select the same instances.
_EARLIEST = datetime(1601, 1, 1, tzinfo=timezone.utc)
_LATEST = datetime(9999, 12, 30, tzinfo=timezone.utc)


class _HttpError(Exception):
    def __init__(self, status_code: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.headers = headers or {}


def _fail(status_code: int, message: str, headers: dict[str, str] | None = None) -> NoReturn:
    raise _HttpError(status_code, message, headers)


async def handle_management_request(
    client: DurableOrchestrationClient, request: func.HttpRequest, path: str
) -> func.HttpResponse:
    """Serve one management API request.

    ``path`` is the part of the URL path after ``/{routePrefix}/durabletask/`` (e.g.
    ``instances/abc/terminate``). Hosts differ in how much of it they have percent-decoded, so
    when the request URL ends with the same path, its raw form is used instead: it is split on
    ``/`` first and each segment is then decoded, so instance ids may hold ``/`` and ``%``
    (sent as ``%2F`` and ``%25``). Query parameters are read from the request URL and from
    ``request.params`` (which wins)."""
    try:
        bound = DurableClient.of(client)
        return await _Request(bound, request, _raw_path(request, path), ManagementKeys.from_environment()).dispatch()
    except _HttpError as exc:
        return _error(exc.status_code, exc.message, exc.headers)
    except Exception as exc:
        logger.exception("management API request %s %s failed", request.method, path)
        return _error(500, f"something went wrong while processing the request ({type(exc).__name__})")


Handler = Callable[[], Awaitable[func.HttpResponse]]


class _Request:
    def __init__(
        self, client: DurableOrchestrationClient, request: func.HttpRequest, path: str, keys: ManagementKeys
    ) -> None:
        self.client = client
        self.request = request
        self.method = str(request.method).upper()
        self.path = path
        self.query = _query_params(request)
        self.keys = keys
        self.rpc = False  # a request of the official client (see the module docstring)

    # -- routing --------------------------------------------------------------------------------

    async def dispatch(self) -> func.HttpResponse:
        segments = self._authorize(self._segments())
        self._check_task_hub()
        head = segments[0].lower() if segments else ""
        rest = segments[1:]
        if head == "orchestrators" and len(rest) in (1, 2):
            instance_id = rest[1] if len(rest) == 2 else None
            return await self._route({"POST": lambda: self.start(rest[0], instance_id)})
        if head == "instances":
            if not rest:
                return await self._route({"GET": self.list_instances, "DELETE": self.purge_by_filter})
            instance_id = rest[0]
            if len(rest) == 1:
                return await self._route(
                    {"GET": lambda: self.get_instance(instance_id), "DELETE": lambda: self.purge(instance_id)}
                )
            operation = rest[1].lower()
            if len(rest) == 2 and operation in _INSTANCE_OPERATIONS:
                return await self._route({"POST": lambda: self.instance_operation(instance_id, operation)})
            if len(rest) == 3 and operation == "raiseevent":
                return await self._route({"POST": lambda: self.raise_event(instance_id, rest[2])})
        if head == "entities" and len(rest) <= 1:
            return await self._route({"GET": lambda: self.list_entities(rest[0] if rest else None)})
        if head == "entities" and len(rest) == 2:
            entity = _entity_id(rest[0], rest[1])
            return await self._route(
                {
                    "GET": lambda: self.read_entity(entity),
                    "POST": lambda: self.signal_entity(entity),
                    "DELETE": lambda: self.delete_entity(entity),
                }
            )
        _fail(404, f"no management API route matches '{self.path}'")

    async def _route(self, handlers: dict[str, Handler]) -> func.HttpResponse:
        handler = handlers.get(self.method)
        if handler is None:
            allowed = ", ".join(sorted(handlers))
            _fail(405, f"method {self.method} is not allowed here; use {allowed}", {"Allow": allowed})
        return await handler()

    def _segments(self) -> list[str]:
        trimmed = self.path.strip("/")
        if not trimmed:
            return []
        try:
            return [unquote(segment, encoding="utf-8", errors="strict") for segment in trimmed.split("/")]
        except UnicodeDecodeError:
            _fail(400, "the request path is not valid percent-encoded UTF-8")

    def _authorize(self, segments: list[str]) -> list[str]:
        """Check the request's key (or, under ``rpc/``, its token); returns the route's segments."""
        if len(segments) >= 2 and segments[0] == RPC_SEGMENT:
            refusal = self.keys.rpc_refusal(segments[1])
            self.rpc = True
            segments = segments[2:]
        else:
            presented = self.query.get("code") or self.request.headers.get("x-functions-key") or None
            refusal = self.keys.refusal(presented)
        if refusal is not None:
            _fail(401, refusal)
        return segments

    def _check_task_hub(self) -> None:
        requested = self.query.get("taskhub", "").strip()
        served = self.client.task_hub_name
        if requested and served and requested.lower() != served.lower():
            _fail(400, f"this app serves task hub '{served}', not '{requested}'")

    # -- orchestrations ---------------------------------------------------------------------------

    async def start(self, function_name: str, instance_id: str | None) -> func.HttpResponse:
        if instance_id is not None:
            instance_id = _instance_id(instance_id)
        client_input = self._payload()
        timeout = self._seconds("timeout")
        polling_interval = self._seconds("pollinginterval")
        version = self.query.get("version") or None  # the official client sends the version it starts
        try:
            new_id = await self.client.start_new(function_name, instance_id, client_input, version)
        except OrchestrationAlreadyExistsError as exc:
            _fail(409, str(exc))
        except (FunctionNotFound, ValueError) as exc:
            _fail(400, str(exc))
        return await self._check_status_or_wait(new_id, timeout, polling_interval)

    async def _check_status_or_wait(
        self, instance_id: str, timeout: float | None, polling_interval: float | None
    ) -> func.HttpResponse:
        if timeout is None or polling_interval is None:
            return self.client.create_check_status_response(self.request, instance_id)
        if polling_interval > timeout:
            _fail(400, "'pollingInterval' must not be longer than 'timeout'")
        return await self.client.wait_for_completion_or_create_check_status_response(
            self.request, instance_id, round(timeout * 1000), round(polling_interval * 1000)
        )

    async def get_instance(self, raw_id: str) -> func.HttpResponse:
        instance_id = _instance_id(raw_id)
        show_history = self._bool("showhistory", False)
        show_history_output = self._bool("showhistoryoutput", False)
        show_input = self._bool("showinput", True)
        fail_with_500 = self._bool("returninternalservererroronfailure", False)
        status = await self.client.get_status(instance_id, show_history, show_history_output, show_input)
        if status is None:
            _fail(404, f"no instance with id '{instance_id}'")
        body = status.to_json()
        if status.history is not None:
            body["historyEvents"] = _documented_history(status.history, show_input)
        if status.runtime_status in _IN_PROGRESS:
            headers = {"Location": str(self.request.url), "Retry-After": str(STATUS_RETRY_AFTER)}
            return _json(202, body, headers)
        if status.runtime_status is _S.Failed and fail_with_500:
            return _json(500, body)
        return _json(200, body)

    async def list_instances(self) -> func.HttpResponse:
        statuses, token = await self._status_page(self.request.headers.get(CONTINUATION_TOKEN_HEADER) or None)
        # The official client reads one answer and has no paging: it gets every instance.
        while self.rpc and token is not None and "top" not in self.query:
            more, token = await self._status_page(token)
            statuses += more
        headers = {CONTINUATION_TOKEN_HEADER: token} if token else None
        return _json(200, [s.to_json() for s in statuses], headers)

    async def _status_page(self, token: str | None) -> tuple[list[DurableOrchestrationStatus], str | None]:
        created_from = self._datetime("createdtimefrom")
        created_to = self._datetime("createdtimeto")
        statuses = self._statuses()
        prefix = self.query.get("instanceidprefix") or None
        page_size = min(self._positive_int("top", DEFAULT_PAGE_SIZE), MAX_PAGE_SIZE)
        show_input = self._bool("showinput", True)
        try:
            return await self.client.get_status_page(
                created_from, created_to, statuses, prefix, page_size, token, show_input
            )
        except ValueError as exc:
            _fail(400, f"invalid query: {exc}")

    async def purge(self, raw_id: str) -> func.HttpResponse:
        instance_id = _instance_id(raw_id)
        try:
            result = await self.client.purge_instance_history(instance_id)
        except PurgeRefused as refused:
            _fail(412, str(refused))
        if result.instances_deleted == 0:
            _fail(404, f"no instance with id '{instance_id}'")
        return _json(200, {"instancesDeleted": result.instances_deleted})

    async def purge_by_filter(self) -> func.HttpResponse:
        created_from = self._datetime("createdtimefrom")
        if created_from is None:
            _fail(400, "please provide a value for the 'createdTimeFrom' parameter")
        created_to = self._datetime("createdtimeto")
        statuses = self._statuses()
        result = await self.client.purge_instance_history_by(created_from, created_to, statuses)
        if result.instances_deleted == 0:
            _fail(404, "no instances match the filter")
        return _json(200, {"instancesDeleted": result.instances_deleted})

    async def raise_event(self, raw_id: str, event_name: str) -> func.HttpResponse:
        instance_id = _instance_id(raw_id)
        if not event_name:
            _fail(400, "the event name must not be empty")
        await self._require_unfinished(instance_id)
        if self._media_type() != "application/json":
            _fail(400, "only application/json request content is supported")
        event_data = self._payload()
        try:
            await self.client.raise_event(instance_id, event_name, event_data)
        except ValueError as exc:  # it finished since we looked
            _fail(410, str(exc))
        return _empty(202)

    async def instance_operation(self, raw_id: str, operation: str) -> func.HttpResponse:
        instance_id = _instance_id(raw_id)
        reason = self.query.get("reason", "")
        if operation == "restart":
            return await self.restart(instance_id)
        if operation == "rewind":
            status = await self._require_status(instance_id)
            if status.runtime_status is not _S.Failed:
                _fail(
                    410,
                    f"instance '{instance_id}' is {status.runtime_status.value}; "
                    "only instances in the Failed state can be rewound",
                )
            try:
                await self.client.rewind(instance_id, reason)
            except ValueError as exc:  # its status changed since we looked
                _fail(410, str(exc))
            return _empty(202)
        await self._require_unfinished(instance_id)
        if operation == "terminate":
            await self.client.terminate(instance_id, reason)
        elif operation == "suspend":
            await self.client.suspend(instance_id, reason)
        else:
            await self.client.resume(instance_id, reason)
        return _empty(202)

    async def restart(self, instance_id: str) -> func.HttpResponse:
        new_instance_id = self._bool("restartwithnewinstanceid", True)
        timeout = self._seconds("timeout")
        polling_interval = self._seconds("pollinginterval")
        await self._require_status(instance_id)
        try:
            new_id = await self.client.restart(instance_id, new_instance_id)
        except OrchestrationAlreadyExistsError as exc:
            _fail(409, f"a non-terminal instance with this instance id already exists: {exc}")
        except (FunctionNotFound, ValueError) as exc:
            _fail(400, f"instance id does not match a valid orchestration instance: {exc}")
        if self.rpc:  # the official client's restart returns the answer as the new instance id
            return _json(202, new_id)
        return await self._check_status_or_wait(new_id, timeout, polling_interval)

    async def _require_status(self, instance_id: str) -> DurableOrchestrationStatus:
        status = await self.client.get_status(instance_id, show_input=False)
        if status is None:
            _fail(404, f"no instance with id '{instance_id}'")
        return status

    async def _require_unfinished(self, instance_id: str) -> None:
        status = await self._require_status(instance_id)
        if status.runtime_status.is_terminal:
            _fail(410, f"instance '{instance_id}' is {status.runtime_status.value}")

    # -- entities -------------------------------------------------------------------------------

    async def list_entities(self, name: str | None) -> func.HttpResponse:
        """Entities that exist (have state), all or of one name; a page may hold fewer than
        ``top`` even when more follow (the time filters apply to each page)."""
        prefix = _entity_id(name, "x").instance_id[:-1] if name is not None else "@"
        page_size = min(self._positive_int("top", DEFAULT_PAGE_SIZE), MAX_PAGE_SIZE)
        fetch_state = self._bool("fetchstate", False)
        operated_from = self._datetime("lastoperationtimefrom")
        operated_to = self._datetime("lastoperationtimeto")
        token = self.request.headers.get(CONTINUATION_TOKEN_HEADER) or None
        try:
            page, next_token = await self.client.get_status_page(
                runtime_status=[_S.Running],
                instance_id_prefix=prefix,
                page_size=page_size,
                continuation_token=token,
                show_input=fetch_state,
            )
        except ValueError as exc:
            _fail(400, f"invalid query: {exc}")
        body = []
        for status in page:
            operated = status.last_updated_time
            if not is_entity_id(status.instance_id) or (operated_from and operated < operated_from):
                continue
            if operated_to and operated > operated_to:
                continue
            entity = EntityId.from_instance_id(status.instance_id)
            item: dict[str, Any] = {
                "entityId": {"name": entity.name, "key": entity.key},
                "lastOperationTime": _net_timestamp(operated),
            }
            if fetch_state:
                item["state"] = status.input_
            body.append(item)
        return _json(200, body, {CONTINUATION_TOKEN_HEADER: next_token} if next_token else None)

    async def read_entity(self, entity: EntityId) -> func.HttpResponse:
        found = await self.client.read_entity_state(entity)
        if not found.entity_exists:
            _fail(404, f"entity {entity} does not exist")
        return _json(200, found.entity_state)

    async def signal_entity(self, entity: EntityId) -> func.HttpResponse:
        operation = self.query.get("op", "")
        if not operation:
            _fail(400, "the 'op' query parameter (the operation name) is required")
        registry = self.client._registry  # the app's functions, when the client belongs to one
        if registry is not None and registry.entity(entity.name) is None:
            known = ", ".join(sorted(registry.entities)) or "none"
            _fail(404, f"no entity function named '{entity.name}' (registered: {known})")
        if self.request.get_body() and self._media_type() != "application/json":
            _fail(400, "only application/json request content is supported")
        await self.client.signal_entity(entity, operation, self._payload())
        return _empty(202)

    async def delete_entity(self, entity: EntityId) -> func.HttpResponse:
        await self.client.delete_entity(entity)
        return _empty(202)

    # -- request parsing ------------------------------------------------------------------------

    def _media_type(self) -> str:
        return str(self.request.headers.get("content-type") or "").split(";")[0].strip().lower()

    def _payload(self) -> Any:
        """The request's JSON content; an empty body is ``None`` (no input). The official client
        sends JSON text inside a JSON string: under ``rpc/`` that text is the payload."""
        try:
            value = parse_json_content(self.request.get_body() or b"")
            if not self.rpc or value is None:
                return value
            if not isinstance(value, str):
                raise ValueError("the official client's payloads are JSON text inside a JSON string")
            return _parse_json(value)
        except ValueError as exc:
            _fail(400, str(exc))

    def _bool(self, name: str, default: bool) -> bool:
        value = self.query.get(name, "").strip().lower()
        if not value:
            return default
        if value not in ("true", "false"):
            _fail(400, f"query parameter '{_display(name)}' must be 'true' or 'false'")
        return value == "true"

    def _positive_int(self, name: str, default: int) -> int:
        value = self.query.get(name, "").strip()
        if not value:
            return default
        try:
            number = int(value) if value.isascii() and value.isdigit() else 0
        except ValueError:
            number = 0
        if number < 1:
            _fail(400, f"query parameter '{_display(name)}' must be a positive integer")
        return number

    def _seconds(self, name: str) -> float | None:
        value = self.query.get(name, "").strip()
        if not value:
            return None
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if not 0 <= seconds <= 24 * 3600:  # also rejects NaN
            _fail(400, f"query parameter '{_display(name)}' must be a number of seconds")
        return seconds

    def _datetime(self, name: str) -> datetime | None:
        value = self.query.get(name, "").strip()
        if not value:
            return None
        parsed = _parse_datetime(value)
        if parsed is None:
            _fail(400, f"query parameter '{_display(name)}' must be an ISO 8601 timestamp, got '{value}'")
        return min(max(parsed, _EARLIEST), _LATEST)

    def _statuses(self) -> list[OrchestrationRuntimeStatus] | None:
        value = self.query.get("runtimestatus", "")
        names = [n.strip() for n in value.split(",") if n.strip()]
        if not names:
            return None
        known = {s.value.lower(): s for s in OrchestrationRuntimeStatus}
        statuses: list[OrchestrationRuntimeStatus] = []
        for name in names:
            if name.lower() == "canceled":
                continue  # a Durable Functions status no instance here ever has
            status = known.get(name.lower())
            if status is None:
                valid = ", ".join(s.value for s in OrchestrationRuntimeStatus)
                _fail(400, f"unknown runtimeStatus '{name}'; valid values: {valid}")
            statuses.append(status)
        return statuses


def _raw_path(request: func.HttpRequest, path: str) -> str:
    """The still-encoded form of ``path``, taken from the request URL when it carries it."""
    url_path = urlsplit(str(request.url or "")).path
    marker = url_path.lower().find("/durabletask/")
    if marker < 0:
        return path
    raw = url_path[marker + len("/durabletask/") :]
    given = path.strip("/")
    # as is; fully decoded (aiohttp); decoded except for "%2F" (ASP.NET Core, the Functions host)
    keep_slashes = raw.replace("%2F", "%252F").replace("%2f", "%252f")
    if given in (raw.strip("/"), unquote(raw).strip("/"), unquote(keep_slashes).strip("/")):
        return raw
    return path


def _query_params(request: func.HttpRequest) -> dict[str, str]:
    """Query parameters by lower-cased name (Durable Functions reads them case-insensitively);
    repeated parameters are joined with commas, as .NET's ``NameValueCollection`` does."""
    collected: dict[str, list[str]] = {}
    for name, values in parse_qs(urlsplit(str(request.url or "")).query, keep_blank_values=True).items():
        collected.setdefault(name.lower(), []).extend(values)
    merged = {name: ",".join(values) for name, values in collected.items()}
    for name, value in (request.params or {}).items():
        merged[str(name).lower()] = str(value)
    return merged


_DISPLAY_NAMES = {
    "showhistory": "showHistory",
    "showhistoryoutput": "showHistoryOutput",
    "showinput": "showInput",
    "returninternalservererroronfailure": "returnInternalServerErrorOnFailure",
    "restartwithnewinstanceid": "restartWithNewInstanceId",
    "createdtimefrom": "createdTimeFrom",
    "createdtimeto": "createdTimeTo",
    "pollinginterval": "pollingInterval",
    "lastoperationtimefrom": "lastOperationTimeFrom",
    "lastoperationtimeto": "lastOperationTimeTo",
}


def _display(name: str) -> str:
    return _DISPLAY_NAMES.get(name, name)


def _entity_id(name: str, key: str) -> EntityId:
    try:
        entity = EntityId(name, key)
        validate_instance_id(entity.instance_id)
    except ValueError as exc:
        _fail(400, f"invalid entity id: {exc}")
    return entity


def _instance_id(raw: str) -> str:
    try:
        return validate_instance_id(raw)
    except ValueError as exc:
        _fail(400, f"invalid instance id: {exc}")


def parse_json_content(body: bytes) -> Any:
    """An HTTP request's content as JSON, ``None`` when empty. Raises ``ValueError`` saying what
    is wrong with it (not UTF-8, not JSON, truncated, a non-standard constant)."""
    if not body.strip():
        return None
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"the request content is not valid UTF-8: {exc}") from None
    return _parse_json(text)


def _parse_json(text: str) -> Any:
    """Strict JSON: ``NaN`` and ``Infinity`` are refused, as by every JSON parser but Python's."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError("invalid JSON content: nested too deeply") from None
    except ValueError as exc:
        raise ValueError(f"invalid JSON content: {exc}") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse_datetime(value: str) -> datetime | None:
    """An ISO 8601 timestamp; naive ones are UTC. Accepts a trailing ``Z``, a ``+`` offset that
    arrived as a space (an unencoded ``+`` in a query string), and years of fewer than four
    digits (Python's ``strftime`` can omit leading zeroes, which Durable Functions tolerates)."""
    text = value.strip()
    for candidate in _datetime_candidates(text):
        try:
            return parse_timestamp(candidate)
        except ValueError:
            continue
    return None


def _datetime_candidates(text: str) -> Iterable[str]:
    year, dash, rest = text.partition("-")
    if dash and year.isdigit() and len(year) < 4:
        text = year.zfill(4) + "-" + rest
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    yield text
    if " " in text:
        date, _, tail = text.rpartition(" ")
        yield f"{date}+{tail}"  # "...T10:00:00 02:00" was "...T10:00:00+02:00"


# -- history events as Durable Functions shows them -----------------------------------------------
# Replay bookkeeping, not part of the documented history.
_HIDDEN_EVENTS = frozenset({"OrchestratorStarted", "OrchestratorCompleted"})
# A completion shows the name and time of the event that scheduled it, which is then left out.
_SCHEDULED_BY = {
    "TaskCompleted": "TaskScheduled",
    "TaskFailed": "TaskScheduled",
    "SubOrchestrationInstanceCompleted": "SubOrchestrationInstanceCreated",
    "SubOrchestrationInstanceFailed": "SubOrchestrationInstanceCreated",
}
# Events whose name is a function's: shown as ``FunctionName``.
_FUNCTION_EVENTS = frozenset({"ExecutionStarted", *_SCHEDULED_BY, *_SCHEDULED_BY.values()})
_SHOWN_FIELDS = ("InstanceId", "FireAt", "TimerId", "OrchestrationStatus")


def _documented_history(events: list[dict[str, Any]], show_input: bool) -> list[dict[str, Any]]:
    """``historyEvents`` as the HTTP API reference shows them, from ``HistoryEvent.to_dict`` dicts
    (``Result`` already removed unless ``showHistoryOutput``)."""
    scheduling = {(e["EventType"], e.get("EventId")): e for e in events if e["EventType"] in _SCHEDULED_BY.values()}
    merged = set()
    for event in events:
        source_type = _SCHEDULED_BY.get(event["EventType"])
        if source_type is not None and (source_type, event.get("TaskScheduledId")) in scheduling:
            merged.add((source_type, event.get("TaskScheduledId")))
    shown = []
    for event in events:
        kind = event["EventType"]
        if kind in _HIDDEN_EVENTS or (kind, event.get("EventId")) in merged:
            continue
        item: dict[str, Any] = {"EventType": kind}
        name = event.get("Name")
        source = scheduling.get((_SCHEDULED_BY.get(kind, ""), event.get("TaskScheduledId")))
        if source is not None:
            name = source.get("Name")
            item["ScheduledTime"] = _net_timestamp(datetime.fromisoformat(source["Timestamp"]))
        if name is not None:
            item["FunctionName" if kind in _FUNCTION_EVENTS else "Name"] = name
        if "Input" in event and (show_input or kind != "ExecutionStarted"):
            item["Input"] = serialization.decode(event["Input"])
        if "Result" in event:
            item["Result"] = serialization.decode(event["Result"])
        failure = event.get("FailureDetails")
        if failure is not None:
            item["Reason"] = failure.get("Message")
            item["Details"] = failure.get("StackTrace")
            item["FailureDetails"] = failure
        item.update({key: event[key] for key in _SHOWN_FIELDS if key in event})
        item["Timestamp"] = _net_timestamp(datetime.fromisoformat(event["Timestamp"]))
        shown.append(item)
    return shown


def _net_timestamp(value: datetime) -> str:
    """UTC in .NET's round-trip format (seven fractional digits), as Durable Functions writes
    history and entity times."""
    utc = value.astimezone(timezone.utc) if value.tzinfo else value
    return f"{utc:%Y-%m-%dT%H:%M:%S}.{utc.microsecond:06d}0Z"


def _json(status_code: int, value: Any, headers: dict[str, str] | None = None) -> func.HttpResponse:
    return func.HttpResponse(
        serialization.encode(value) or "null",
        status_code=status_code,
        headers={"Content-Type": "application/json", **(headers or {})},
        mimetype="application/json",
    )


def _error(status_code: int, message: str, headers: dict[str, str] | None = None) -> func.HttpResponse:
    return _json(status_code, {"Message": message, "ExceptionMessage": message}, headers)


def _empty(status_code: int) -> func.HttpResponse:
    return func.HttpResponse(status_code=status_code)
