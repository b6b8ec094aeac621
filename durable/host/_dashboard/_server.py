"""The dashboard: an admin web UI over one task hub, served as aiohttp routes under ``/dashboard``.

Server-rendered HTML (Jinja2, autoescaped) plus a little vanilla JS; every read and action goes
through ``DurableOrchestrationClient``, so the dashboard refuses what the client refuses (purging
a running instance, rewinding one that did not fail in an activity). It is an admin surface:

- it answers only requests addressed to a loopback name (``Host``), so a web page elsewhere
  cannot reach it through DNS rebinding;
- when a key is configured it requires it (the ``x-functions-key`` header, ``?code=`` once, or
  the login form), and remembers it in an HttpOnly, SameSite=Strict cookie;
- every POST carries a per-process CSRF token; pages send a strict Content-Security-Policy.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlencode

import jinja2
from aiohttp import web
from azure.core.exceptions import AzureError, ResourceNotFoundError
from yarl import URL

from ...core._entities import EntityId, is_entity_id
from ...core._history import HistoryEvent, utcnow
from ...core._ids import is_control, validate_instance_id
from ...core._status import OrchestrationRuntimeStatus
from ...core._timestamps import parse_timestamp
from ...runtime._client import (
    DurableOrchestrationClient,
    DurableOrchestrationStatus,
    EntityStatus,
    OrchestrationAlreadyExistsError,
    PurgeRefused,
)
from ._timeline import build_timeline

log = logging.getLogger("durable.dashboard")

DASHBOARD_PATH = "/dashboard"
KEY_COOKIE = "durable_dashboard_key"
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
MAX_FETCHES = 10  # storage pages read to fill one filtered dashboard page
MAX_SHOWN_JSON = 100_000  # characters of a payload shown before it is cut
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
HERE = Path(__file__).parent

# Who may use the dashboard: given the key a request presents (None: none), may it?
Authorize = Callable[[str | None], bool]
# Makes sure the task hub exists before the dashboard reads it (idempotent; cheap once done).
Prepare = Callable[[], Awaitable[None]]
_S = OrchestrationRuntimeStatus
_UNFINISHED = frozenset({_S.Pending, _S.Running, _S.ContinuedAsNew, _S.Suspended})
# What an action's redirect says happened (fixed texts: nothing user-supplied is reflected).
_NOTICES = {
    "raise": "Event sent. The instance receives it on its next step.",
    "terminate": "Termination requested.",
    "suspend": "Suspension requested.",
    "resume": "Resumption requested.",
    "rewind": "Rewind requested: the failed activities run again.",
    "restart": "Restarted.",
    "purge": "Instance purged.",
    "signal": "Operation signalled.",
    "delete": "Deletion of the entity's state requested.",
}
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # A ?code= must not leave in a Referer; same-origin (not no-referrer) keeps the Origin header of
    # form posts, which no-referrer turns into "null".
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class _Refused(Exception):
    """A request the dashboard answers with an error page (4xx, or 503 when storage fails)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _refuse(status: int, message: str) -> NoReturn:
    raise _Refused(status, message)


@dataclass(frozen=True)
class _Dashboard:
    client: DurableOrchestrationClient
    authorize: Authorize
    templates: jinja2.Environment
    csrf: str
    prepare: Prepare | None = None

    @property
    def locked(self) -> bool:
        return not self.authorize(None)

    def presented_key(self, request: web.Request) -> str | None:
        return request.headers.get("x-functions-key") or request.query.get("code") or request.cookies.get(KEY_COOKIE)

    def allows(self, key: str | None) -> bool:
        # A key that is not ASCII matches none (and must not reach compare_digest, which raises).
        return (key is None or key.isascii()) and self.authorize(key)

    def render(self, request: web.Request, template: str, status: int = 200, **values: Any) -> web.Response:
        page = self.templates.get_template(template).render(
            base=DASHBOARD_PATH, csrf=self.csrf, task_hub=self.client.task_hub_name, locked=self.locked, **values
        )
        return web.Response(text=page, status=status, content_type="text/html", headers=_SECURITY_HEADERS)


def dashboard_app(
    client: DurableOrchestrationClient, authorize: Authorize | None = None, prepare: Prepare | None = None
) -> web.Application:
    """The dashboard as an aiohttp application, to be mounted at ``DASHBOARD_PATH`` with
    ``add_subapp``. ``authorize`` says whether a presented key (None: none) gives access; by
    default the dashboard is open (it is served on 127.0.0.1 only). ``prepare``, when given, is
    awaited before each request is served (an app's host creates its task hub with it)."""
    templates = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    templates.filters.update(json=_shown_json, time=_time)
    templates.globals.update(link=_link, statuses=[s.value for s in OrchestrationRuntimeStatus])
    dashboard = _Dashboard(client, authorize or (lambda _key: True), templates, secrets.token_urlsafe(32), prepare)
    app = web.Application(middlewares=[_guard(dashboard)])
    routes = _Routes(dashboard)
    app.router.add_get("/", routes.instances)
    app.router.add_get("/instance", routes.instance)
    app.router.add_post("/instance/{action}", routes.instance_action)
    app.router.add_get("/entities", routes.entities)
    app.router.add_get("/entity", routes.entity)
    app.router.add_post("/entity/{action}", routes.entity_action)
    app.router.add_get("/login", routes.login_page)
    app.router.add_post("/login", routes.login)
    app.router.add_post("/logout", routes.logout)
    app.router.add_static("/static/", HERE / "static")
    return app


def mount_dashboard(
    server: web.Application,
    client: DurableOrchestrationClient,
    authorize: Authorize,
    prepare: Prepare | None = None,
) -> None:
    """Serve the dashboard under ``DASHBOARD_PATH`` of ``server`` (before its catch-all routes)."""
    server.router.add_get(DASHBOARD_PATH, to_dashboard)  # the sub-app's own paths all have the slash
    server.add_subapp(DASHBOARD_PATH, dashboard_app(client, authorize, prepare))


async def to_dashboard(request: web.Request) -> web.Response:
    return web.Response(status=302, headers={"Location": f"{DASHBOARD_PATH}/"})


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _guard(dashboard: _Dashboard) -> Any:
    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if (request.url.host or "").lower() not in LOOPBACK_HOSTS:
            return web.Response(status=403, text="the dashboard answers only requests to 127.0.0.1 or localhost")
        if request.method == "POST" and not await _same_site_form(request, dashboard.csrf):
            return web.Response(status=403, text="this form is out of date or was not sent by the dashboard")
        public = request.path.startswith(f"{DASHBOARD_PATH}/static/") or request.path == f"{DASHBOARD_PATH}/login"
        if not public and not dashboard.allows(dashboard.presented_key(request)):
            if request.method != "GET":
                return web.Response(status=401, text="the dashboard requires the admin key")
            return dashboard.render(request, "login.html", status=401, next=request.path_qs, error="")
        if "code" in request.query and request.method == "GET":  # remember the key, then drop it from the URL
            kept = {name: value for name, value in request.query.items() if name != "code"}
            response = _see_other(f"{request.path}?{urlencode(kept)}" if kept else request.path)
            _set_key_cookie(response, request.query["code"])
            return response
        try:
            if dashboard.prepare is not None and not public:
                await _storage(dashboard.prepare())
            return await handler(request)
        except _Refused as refused:
            return dashboard.render(request, "message.html", status=refused.status, message=refused.message)

    return guard


async def _same_site_form(request: web.Request, csrf: str) -> bool:
    origin = request.headers.get("Origin")
    if origin is not None and (URL(origin).host or "").lower() not in LOOPBACK_HOSTS:
        return False
    form = await request.post()
    token = form.get("csrf")
    return isinstance(token, str) and secrets.compare_digest(token.encode(), csrf.encode())


def _see_other(location: str) -> web.Response:
    """After a form or a login: go (GET) to ``location``, a dashboard URL."""
    return web.Response(status=303, headers={"Location": location})


def _set_key_cookie(response: web.StreamResponse, key: str) -> None:
    response.set_cookie(KEY_COOKIE, key, path=DASHBOARD_PATH, httponly=True, samesite="Strict")


class _Routes:
    def __init__(self, dashboard: _Dashboard) -> None:
        self.dashboard = dashboard
        self.client = dashboard.client

    # -- instances ------------------------------------------------------------------------------
    async def instances(self, request: web.Request) -> web.Response:
        query = request.query
        statuses = _statuses(query.getall("status", []))
        created_from = _timestamp(query.get("from", ""), "created from")
        created_to = _timestamp(query.get("to", ""), "created to")
        if created_from and created_to and created_from > created_to:
            _refuse(400, "'created from' is after 'created to'")
        prefix = _text(query.get("prefix", ""), "instance id prefix")
        name = _text(query.get("name", ""), "orchestrator name").lower()
        top = _page_size(query.get("top", ""))

        async def fetch(size: int, token: str | None) -> tuple[list[DurableOrchestrationStatus], str | None]:
            return await self.client.get_status_page(
                created_from, created_to, statuses or None, prefix or None, size, token, show_input=False
            )

        def keep(status: DurableOrchestrationStatus) -> bool:  # entities have a page of their own
            return not status.instance_id.startswith("@") and name in status.name.lower()

        rows, token = await _collect(fetch, keep, top, query.get("token") or None)
        filters = {"status": [s.value for s in statuses], "from": query.get("from", ""), "to": query.get("to", "")}
        filters.update(prefix=prefix, name=query.get("name", ""), top=str(top))
        return self.dashboard.render(
            request, "instances.html", rows=rows, next_token=token, filters=filters, notice=_notice(query)
        )

    async def instance(self, request: web.Request) -> web.Response:
        return await self._instance_page(request, _instance_id(request.query.get("id", "")))

    async def _instance_page(
        self, request: web.Request, instance_id: str, refused: _Refused | None = None
    ) -> web.Response:
        """The instance page; after a refused action, saying why, with the refusal's status."""
        found = await _storage(
            self.client.get_status(instance_id, show_history=True, show_history_output=True, show_input=True)
        )
        if found is None:
            _refuse(404, f"no instance with id '{instance_id}'")
        events = [HistoryEvent.from_dict(event) for event in found.history or []]
        return self.dashboard.render(
            request,
            "instance.html",
            status=refused.status if refused else 200,
            instance=found,
            unfinished=found.runtime_status in _UNFINISHED,
            timeline=build_timeline(events, utcnow()),
            events=found.history or [],
            parent=next((e.parent_instance_id for e in events if e.parent_instance_id), None),
            notice=_notice(request.query),
            error=refused.message if refused else "",
        )

    async def instance_action(self, request: web.Request) -> web.Response:
        form = await request.post()
        instance_id = _instance_id(_field(form, "id"))
        action = request.match_info["action"]
        reason = _field(form, "reason")
        back = _link("/instance", id=instance_id, done=action)
        try:
            if action == "raise":
                event_name = _field(form, "event").strip()
                if not event_name:
                    _refuse(400, "give the event a name")
                await self._require_unfinished(instance_id)
                await _storage(self.client.raise_event(instance_id, event_name, _json_field(form, "data")))
            elif action in ("terminate", "suspend", "resume"):
                await self._require_unfinished(instance_id)
                operation = getattr(self.client, action)
                await _storage(operation(instance_id, reason or None))
            elif action == "rewind":
                await _storage(self.client.rewind(instance_id, reason))
            elif action == "restart":
                new_id = await _storage(self.client.restart(instance_id, _field(form, "new_id") == "on"))
                back = _link("/instance", id=new_id, done=action)
            elif action == "purge":
                result = await _storage(self.client.purge_instance_history(instance_id))
                if result.instances_deleted == 0:
                    _refuse(404, f"no instance with id '{instance_id}'")
                back = _link("/", done=action)
            else:
                _refuse(404, f"no such action: {action}")
        except (_Refused, ValueError) as exc:
            return await self._instance_page(request, instance_id, _refusal(exc))
        return _see_other(back)

    async def _require_unfinished(self, instance_id: str) -> None:
        found = await _storage(self.client.get_status(instance_id, show_input=False))
        if found is None:
            _refuse(404, f"no instance with id '{instance_id}'")
        if found.runtime_status not in _UNFINISHED:
            _refuse(409, f"instance '{instance_id}' is {found.runtime_status.value}; it has finished")

    # -- entities -------------------------------------------------------------------------------
    async def entities(self, request: web.Request) -> web.Response:
        query = request.query
        name = _text(query.get("name", ""), "entity name")
        top = _page_size(query.get("top", ""))
        try:
            prefix = EntityId(name, "x").instance_id[:-1] if name else "@"
        except ValueError as exc:
            _refuse(400, str(exc))

        async def fetch(size: int, token: str | None) -> tuple[list[DurableOrchestrationStatus], str | None]:
            return await self.client.get_status_page(
                runtime_status=[_S.Running], instance_id_prefix=prefix, page_size=size, continuation_token=token
            )

        found, token = await _collect(fetch, lambda status: is_entity_id(status.instance_id), top, query.get("token"))
        rows = [EntityStatus(EntityId.from_instance_id(s.instance_id), s.last_updated_time, s.input_) for s in found]
        filters = {"name": name, "top": str(top)}
        return self.dashboard.render(
            request, "entities.html", rows=rows, next_token=token, filters=filters, notice=_notice(query)
        )

    async def entity(self, request: web.Request) -> web.Response:
        return await self._entity_page(request, _entity_id(request.query.get("id", "")))

    async def _entity_page(
        self, request: web.Request, entity: EntityId, refused: _Refused | None = None
    ) -> web.Response:
        state = await _storage(self.client.read_entity_state(entity))
        record = await _storage(self.client.get_status(entity.instance_id, show_input=False))
        return self.dashboard.render(
            request,
            "entity.html",
            status=refused.status if refused else 200,
            entity=entity,
            state=state,
            record=record,
            notice=_notice(request.query),
            error=refused.message if refused else "",
        )

    async def entity_action(self, request: web.Request) -> web.Response:
        form = await request.post()
        entity = _entity_id(_field(form, "id"))
        action = request.match_info["action"]
        back = _link("/entity", id=entity.instance_id, done=action)
        try:
            if action == "signal":
                operation = _field(form, "operation").strip()
                if not operation:
                    _refuse(400, "give the operation a name")
                await _storage(self.client.signal_entity(entity, operation, _json_field(form, "input")))
            elif action == "delete":
                await _storage(self.client.delete_entity(entity))
            elif action == "purge":
                result = await _storage(self.client.purge_instance_history(entity.instance_id))
                if result.instances_deleted == 0:
                    _refuse(404, f"entity {entity} has nothing to purge")
                back = _link("/entities", done=action)
            else:
                _refuse(404, f"no such action: {action}")
        except (_Refused, ValueError) as exc:
            return await self._entity_page(request, entity, _refusal(exc))
        return _see_other(back)

    # -- the key --------------------------------------------------------------------------------
    async def login_page(self, request: web.Request) -> web.Response:
        return self.dashboard.render(request, "login.html", next=_local_path(request.query.get("next", "")), error="")

    async def login(self, request: web.Request) -> web.Response:
        form = await request.post()
        key = _field(form, "key")
        target = _local_path(_field(form, "next"))
        if not self.dashboard.allows(key):
            return self.dashboard.render(request, "login.html", status=401, next=target, error="That key is not valid.")
        response = _see_other(target)
        _set_key_cookie(response, key)
        return response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        response = _see_other(f"{DASHBOARD_PATH}/login")
        response.del_cookie(KEY_COOKIE, path=DASHBOARD_PATH)
        return response


def _refusal(exc: Exception) -> _Refused:
    """Why the client (or the dashboard) refused an action, as the status the page is sent with;
    storage failures (503) are not the action's fault and go to the error page instead."""
    if isinstance(exc, _Refused):
        if exc.status >= 500:
            raise exc
        return exc
    if isinstance(exc, PurgeRefused):
        return _Refused(412, str(exc))
    if isinstance(exc, OrchestrationAlreadyExistsError):
        return _Refused(409, str(exc))
    return _Refused(400, str(exc))  # FunctionNotFound and other bad input


# -- reading requests ------------------------------------------------------------------------------
async def _collect(
    fetch: Callable[[int, str | None], Awaitable[tuple[list[DurableOrchestrationStatus], str | None]]],
    keep: Callable[[DurableOrchestrationStatus], bool],
    top: int,
    token: str | None,
) -> tuple[list[DurableOrchestrationStatus], str | None]:
    """Read storage pages until ``top`` instances pass ``keep`` (or the pages run out), so that a
    filter storage cannot apply still fills a page; returns them and the next page's token. Each
    read asks for no more than the page still lacks, so the token never skips a row."""
    rows: list[DurableOrchestrationStatus] = []
    for _ in range(MAX_FETCHES):
        try:
            page, token = await _storage(fetch(top - len(rows), token))
        except ValueError as exc:  # a malformed continuation token, or a query storage rejects
            _refuse(400, f"invalid query: {exc}")
        rows.extend(status for status in page if keep(status))
        if token is None or len(rows) >= top:
            break
    return rows, token


async def _storage(call: Awaitable[Any]) -> Any:
    """Await a client call; storage that cannot be reached is a 503 page, not a 500."""
    try:
        return await call
    except ResourceNotFoundError:
        _refuse(503, "the task hub was not found in the storage account (has the app run against it yet?)")
    except AzureError as exc:
        log.warning("dashboard: storage request failed", exc_info=True)
        _refuse(503, f"storage request failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    except (OverflowError, asyncio.TimeoutError) as exc:
        _refuse(400 if isinstance(exc, OverflowError) else 503, f"the request could not be served: {exc}")


def _field(form: Mapping[str, Any], name: str) -> str:
    value = form.get(name, "")
    if not isinstance(value, str):
        _refuse(400, f"form field '{name}' must be text")
    return value


def _json_field(form: Mapping[str, Any], name: str) -> Any:
    """A form field holding JSON (empty: no value)."""
    text = _field(form, name)
    if not text.strip():
        return None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        _refuse(400, f"'{name}' is not valid JSON: {exc}")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _statuses(values: list[str]) -> list[OrchestrationRuntimeStatus]:
    known = {status.value.lower(): status for status in OrchestrationRuntimeStatus}
    chosen = []
    for value in values:
        if value.lower() not in known:
            _refuse(400, f"unknown status '{value}'; valid: {', '.join(known[k].value for k in known)}")
        chosen.append(known[value.lower()])
    return chosen


def _timestamp(value: str, what: str) -> datetime | None:
    """A form's date and time (``datetime-local``: no zone, taken as UTC)."""
    if not value.strip():
        return None
    try:
        return parse_timestamp(value)
    except ValueError:
        _refuse(400, f"'{what}' must be a date and time like 2026-01-31T13:45, got '{value}'")


def _text(value: str, what: str) -> str:
    if len(value) > 256 or any(is_control(ch) for ch in value):
        _refuse(400, f"the {what} must be at most 256 printable characters")
    return value


def _page_size(value: str) -> int:
    if not value.strip():
        return DEFAULT_PAGE_SIZE
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= MAX_PAGE_SIZE:
        _refuse(400, f"page size must be a number from 1 to {MAX_PAGE_SIZE}")
    return int(value)


def _instance_id(value: str) -> str:
    try:
        return validate_instance_id(value)
    except ValueError as exc:
        _refuse(400, f"invalid instance id: {exc}")


def _entity_id(value: str) -> EntityId:
    try:
        return EntityId.from_instance_id(value)
    except ValueError as exc:
        _refuse(400, f"invalid entity id: {exc}")


def _notice(query: Mapping[str, str]) -> str:
    return _NOTICES.get(query.get("done", ""), "")


def _local_path(target: str) -> str:
    """Where to go after logging in: a dashboard page, never another site."""
    return target if target.startswith(f"{DASHBOARD_PATH}/") and not target.startswith("//") else f"{DASHBOARD_PATH}/"


# -- template helpers -----------------------------------------------------------------------------
def _link(path: str, **params: Any) -> str:
    """A dashboard URL; empty parameters are left out, lists repeat."""
    kept = {name: value for name, value in params.items() if value not in (None, "", [])}
    query = urlencode(kept, doseq=True)
    return f"{DASHBOARD_PATH}{path}{'?' + query if query else ''}"


def _shown_json(value: Any) -> str:
    text = json.dumps(value, indent=2, ensure_ascii=False, default=str, sort_keys=False)
    if len(text) > MAX_SHOWN_JSON:
        return f"{text[:MAX_SHOWN_JSON]}\n… ({len(text) - MAX_SHOWN_JSON} more characters)"
    return text


def _time(value: datetime | str | None) -> str:
    """A time as the dashboard shows it: UTC, to the millisecond (history events carry ISO text)."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return str(value)
    if value is None:
        return ""
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
