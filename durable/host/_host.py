"""The local development host: ``durable start`` serves an app folder the way ``func start`` does.

It indexes ``function_app.py`` as the Python worker does (``app.get_functions()``), serves the HTTP
triggers on 127.0.0.1, and runs the queue triggers with the Functions host's documented semantics:
batches of ``batchSize``, a message kept hidden while its function runs (its lease renewed every
half lease), delete on success, retry after ``visibilityTimeout`` on failure, and after
``maxDequeueCount`` attempts move the message to ``<queue>-poison``. The lease is short
(``messageLease``, 20 s), so the messages of a host that died are retried within seconds. It is a
development host, not a replacement for the Functions host.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import importlib.util
import inspect
import logging
import math
import os
import re
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import azure.functions as func
from aiohttp import web
from azure.core.exceptions import HttpResponseError, ResourceExistsError
from azure.functions.decorators.http import HttpTrigger
from azure.functions.decorators.queue import QueueTrigger
from azure.storage.queue.aio import QueueClient

from ._azurite import Azurite, ensure_running, resolve_connection_string
from ._functions import MANAGEMENT_KEY_SETTING
from ._settings import HostSettings, load_local_settings

log = logging.getLogger("durable.host")

SHUTDOWN_GRACE = 10.0  # seconds running functions get to finish on Ctrl-C


class HostError(Exception):
    """The app folder cannot be served (no function_app.py, no app object, bad settings)."""


# -- loading the app ---------------------------------------------------------------------------------
def load_function_app(app_dir: Path) -> func.FunctionRegister:
    """Import ``function_app.py`` from ``app_dir`` and return its app object, as the worker does."""
    script = app_dir / "function_app.py"
    if not script.exists():
        raise HostError(f"no function_app.py in {app_dir}")
    if str(app_dir) not in sys.path:
        sys.path.insert(0, str(app_dir))
    spec = importlib.util.spec_from_file_location("function_app", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["function_app"] = module
    spec.loader.exec_module(module)
    apps = [value for value in vars(module).values() if isinstance(value, func.FunctionRegister)]
    if len(apps) != 1:
        raise HostError(f"function_app.py must define exactly one FunctionApp/DFApp, found {len(apps)}")
    return apps[0]


# -- HTTP triggers -----------------------------------------------------------------------------------
@dataclass
class HttpRoute:
    function_name: str
    template: str
    methods: frozenset[str]
    auth_level: str
    binding_name: str
    pattern: re.Pattern[str]
    function: Any

    def match(self, method: str, path: str) -> dict[str, str] | None:
        if self.methods and method not in self.methods:
            return None
        found = self.pattern.fullmatch(path)
        if found is None:
            return None
        return {k: v for k, v in found.groupdict().items() if v is not None}


# ASP.NET route constraints the Functions host enforces, as regexes over one path segment
# (value-range constraints like min/max/range only check the shape; unknown ones match anything).
_CONSTRAINTS = {
    "int": r"-?\d+",
    "long": r"-?\d+",
    "min": r"-?\d+",
    "max": r"-?\d+",
    "range": r"-?\d+",
    "bool": r"(?:true|false)",
    "alpha": r"[a-z]+",
    "decimal": r"-?\d+(?:\.\d+)?",
    "double": r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?",
    "float": r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?",
    "guid": r"\{?[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}\}?",
}


def _constraint(text: str) -> str:
    name, _, argument = text.partition("(")
    numbers = argument.rstrip(")").replace(" ", "")
    if name == "length" and numbers:
        return f"[^/]{{{numbers}}}"
    if name == "minlength" and numbers:
        return f"[^/]{{{numbers},}}"
    if name == "maxlength" and numbers:
        return f"[^/]{{0,{numbers}}}"
    return _CONSTRAINTS.get(name.lower(), "")


def compile_route(template: str) -> re.Pattern[str]:
    """A Functions route template (``orders/{id}``, ``{name?}``, ``{*rest}``, ``{id:int}``) as a regex
    over the path after the route prefix."""
    parts = []
    for i, segment in enumerate(template.strip("/").split("/")):
        sep = "/" if i else ""
        param = re.fullmatch(r"\{(\*?)([A-Za-z_]\w*)((?::[^}?]+)?)(\??)\}", segment)
        if param is None:
            parts.append(re.escape(sep + segment))
            continue
        catch_all, name, constraints, optional = param.groups()
        if catch_all:
            parts.append(f"(?:{re.escape(sep)}(?P<{name}>.*))?")
            continue
        # Each constraint must match the whole segment: a lookahead anchored at the segment's end.
        checks = "".join(f"(?={c}(?![^/]))" for c in map(_constraint, constraints.split(":")[1:]) if c)
        value = f"{re.escape(sep)}(?P<{name}>{checks}[^/]+)"
        parts.append(f"(?:{value})?" if optional else value)
    return re.compile("".join(parts), re.IGNORECASE)


def route_precedence(template: str) -> tuple[int, ...]:
    """Sort key among routes that match the same path, as ASP.NET routing (and so the Functions host)
    orders them: per segment, literal < constrained parameter < parameter < catch-all."""
    digits = []
    for segment in template.strip("/").split("/"):
        if not segment.startswith("{"):
            digits.append(1)
        elif segment.startswith("{*"):
            digits.append(5)
        else:
            digits.append(3 if ":" in segment else 4)
    return tuple(digits)


@dataclass(frozen=True)
class AuthKeys:
    """Keys the local host checks for non-anonymous functions; none configured means open."""

    function_key: str | None = None
    master_key: str | None = None

    def allows(self, auth_level: str, presented: str | None) -> bool:
        level = auth_level.lower()
        if level == "anonymous" or (self.function_key is None and self.master_key is None):
            return True
        if presented is None:
            return False
        accepted = [self.master_key] if level == "admin" else [self.function_key, self.master_key]
        return any(key is not None and hmac.compare_digest(key, presented) for key in accepted)


async def _call(function: Any, kwargs: Mapping[str, Any]) -> Any:
    if inspect.iscoroutinefunction(function):
        return await function(**kwargs)
    result = await asyncio.to_thread(function, **kwargs)
    return await result if inspect.isawaitable(result) else result


def _to_aiohttp(result: Any) -> web.Response:
    if isinstance(result, func.HttpResponse):
        headers = {k: v for k, v in result.headers.items() if k.lower() != "content-length"}
        response = web.Response(status=result.status_code, body=result.get_body(), headers=headers)
        if result.mimetype and "content-type" not in {k.lower() for k in headers}:
            response.content_type = result.mimetype
            response.charset = result.charset
        return response
    if result is None:
        return web.Response(status=204)
    if isinstance(result, bytes | str):
        return web.Response(status=200, body=result if isinstance(result, bytes) else result.encode())
    raise TypeError(f"an HTTP function returned {type(result).__name__}, not an HttpResponse")


# -- queue triggers ----------------------------------------------------------------------------------
class HostQueueMessage(func.QueueMessage):
    """A queue message with the metadata the Functions host provides."""

    def __init__(self, *, id: str, body: bytes, pop_receipt: str, dequeue_count: int, **times: Any) -> None:
        super().__init__(id=id, body=body, pop_receipt=pop_receipt)
        self._dequeue_count = dequeue_count
        self._times = times

    @property
    def dequeue_count(self) -> int:
        return self._dequeue_count

    @property
    def insertion_time(self) -> datetime | None:
        return self._times.get("insertion_time")

    @property
    def expiration_time(self) -> datetime | None:
        return self._times.get("expiration_time")

    @property
    def time_next_visible(self) -> datetime | None:
        return self._times.get("time_next_visible")


class QueueTriggerRunner:
    """Polls one queue for one function, with the Functions host's retry and poison semantics."""

    def __init__(self, function_name: str, function: Any, binding_name: str, queue: QueueClient,
                 poison: QueueClient, settings: HostSettings) -> None:  # fmt: skip
        self.function_name = function_name
        self.function = function
        self.binding_name = binding_name
        self.queue = queue
        self.poison = poison
        self.settings = settings
        self.wake = asyncio.Event()  # set when this process sent a message to the queue

    async def run(self, stop: asyncio.Event) -> None:
        with contextlib.suppress(ResourceExistsError):
            await self.queue.create_queue()
        delay = 0.05
        while not stop.is_set():
            try:
                handled = await self.poll_once()
            except Exception:
                log.exception("polling %s failed", self.queue.queue_name)
                handled = 0
            if handled:
                delay = 0.05
                continue
            waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self.wake.wait())]
            _, pending = await asyncio.wait(waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
            for waiting in pending:
                waiting.cancel()
            if self.wake.is_set():
                self.wake.clear()
                delay = 0.05
            else:
                delay = min(delay * 2, self.settings.queue_max_polling_interval)

    async def poll_once(self) -> int:
        pager = self.queue.receive_messages(
            messages_per_page=max(1, min(32, self.settings.queue_batch_size)),
            visibility_timeout=math.ceil(self.settings.queue_message_lease),
        )
        batch = []
        async for page in pager.by_page():
            batch = [m async for m in page]
            break
        await asyncio.gather(*(self._invoke(m) for m in batch))
        return len(batch)

    def _body(self, content: Any) -> bytes:
        text = content if isinstance(content, str) else str(content or "")
        if self.settings.message_encoding == "base64":
            try:
                return base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                log.warning("message on %s is not base64 although messageEncoding is base64", self.queue.queue_name)
        return text.encode("utf-8")

    async def _invoke(self, raw: Any) -> None:
        if raw.dequeue_count > self.settings.queue_max_dequeue_count:
            # Attempts that never settled (the process died or was killed mid-invocation) still
            # count: like the Functions host, poison such a message without invoking again.
            await self._move_to_poison(raw)
            return
        message = HostQueueMessage(
            id=raw.id, body=self._body(raw.content), pop_receipt=raw.pop_receipt, dequeue_count=raw.dequeue_count,
            insertion_time=raw.inserted_on, expiration_time=raw.expires_on, time_next_visible=raw.next_visible_on,
        )  # fmt: skip
        try:
            async with self._leased(raw):
                await _call(self.function, {self.binding_name: message})
        except Exception:
            log.exception(
                "function %s failed on message %s (attempt %d)", self.function_name, raw.id, raw.dequeue_count
            )
            if raw.dequeue_count >= self.settings.queue_max_dequeue_count:
                await self._move_to_poison(raw)
            else:
                await self.queue.update_message(
                    raw.id, raw.pop_receipt, visibility_timeout=int(self.settings.queue_visibility_timeout)
                )
            return
        await self.queue.delete_message(raw.id, raw.pop_receipt)

    @contextlib.asynccontextmanager
    async def _leased(self, raw: Any) -> AsyncIterator[None]:
        """Keep a message hidden while its function runs, as the Functions host does: renew its
        lease every half lease. On leaving, a renewal in flight is waited for, so that settling
        the message uses the pop receipt it returned."""
        stop = asyncio.Event()
        keeper = asyncio.create_task(self._keep_leased(raw, stop))
        try:
            yield
        finally:
            stop.set()
            await keeper

    async def _keep_leased(self, raw: Any, stop: asyncio.Event) -> None:
        lease = self.settings.queue_message_lease
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=lease / 2)
            if stop.is_set():
                return
            try:
                updated = await self.queue.update_message(raw.id, raw.pop_receipt, visibility_timeout=math.ceil(lease))
            except Exception as exc:
                if isinstance(exc, HttpResponseError) and (
                    exc.status_code == 404 or getattr(exc, "error_code", None) == "PopReceiptMismatch"
                ):  # deleted, or its pop receipt moved on (someone else holds it now)
                    log.warning("message %s on %s is no longer leased to this host", raw.id, self.queue.queue_name)
                    return
                log.warning("could not renew the lease of message %s; retrying", raw.id, exc_info=True)
                continue
            raw.pop_receipt = updated.pop_receipt
            raw.next_visible_on = updated.next_visible_on

    async def _move_to_poison(self, raw: Any) -> None:
        log.error("message %s moved to %s after %d attempts", raw.id, self.poison.queue_name, raw.dequeue_count)
        with contextlib.suppress(ResourceExistsError):
            await self.poison.create_queue()
        await self.poison.send_message(raw.content)
        await self.queue.delete_message(raw.id, raw.pop_receipt)


def _resolve_app_settings(value: str, function_name: str) -> str:
    """Binding expressions ``%AppSetting%`` (e.g. ``queue_name="%JobsQueue%"``), as the host resolves them."""

    def setting(found: re.Match[str]) -> str:
        if found.group(1) not in os.environ:
            raise HostError(f"function {function_name}: the app setting {found.group(1)} is not set")
        return os.environ[found.group(1)]

    return re.sub(r"%([^%]+)%", setting, value)


# -- the host ------------------------------------------------------------------------------------------
class LocalHost:
    def __init__(self, app_dir: Path, *, port: int = 7071, keys: AuthKeys | None = None) -> None:
        self.app_dir = app_dir.resolve()
        self.port = port
        self.keys = keys or AuthKeys()
        self.routes: list[HttpRoute] = []
        self.queue_runners: list[QueueTriggerRunner] = []
        self._azurite: Azurite | None = None
        self._app: func.FunctionRegister | None = None

    def prepare(self) -> None:
        """Read settings, start Azurite if the app uses it and none runs, index the app."""
        for name, value in load_local_settings(self.app_dir).items():
            os.environ.setdefault(name, value)
        os.environ.setdefault("AzureWebJobsScriptRoot", str(self.app_dir))
        key = self.keys.function_key or self.keys.master_key
        if key is not None:  # management URLs handed out by the app must carry a key that works
            os.environ.setdefault(MANAGEMENT_KEY_SETTING, key)
        settings = HostSettings.load(self.app_dir)
        self.settings = settings
        connection = os.environ.setdefault(settings.connection_setting, "UseDevelopmentStorage=true")
        self._azurite = ensure_running(connection, self.app_dir / ".azurite")
        self._app = load_function_app(self.app_dir)
        for function in self._app.get_functions():
            trigger = function.get_trigger()
            name = function.get_function_name() or ""
            if isinstance(trigger, HttpTrigger):
                template = trigger.route or name
                methods = frozenset(str(getattr(m, "value", m)).upper() for m in (trigger.methods or []))
                level = str(getattr(trigger.auth_level, "value", trigger.auth_level) or "function")
                pattern = compile_route(template)
                user_function = function.get_user_function()
                self.routes.append(HttpRoute(name, template, methods, level, trigger.name, pattern, user_function))
            elif isinstance(trigger, QueueTrigger):
                setting = os.environ.get(trigger.connection or "") or connection
                connection_string = resolve_connection_string(setting)
                queue_name = _resolve_app_settings(trigger.queue_name, name)
                queue = QueueClient.from_connection_string(connection_string, queue_name)
                poison = QueueClient.from_connection_string(connection_string, f"{queue_name}-poison")
                self.queue_runners.append(
                    QueueTriggerRunner(name, function.get_user_function(), trigger.name, queue, poison, settings)
                )
            else:
                kind = getattr(trigger, "type", "unknown")
                log.warning("function %s: %s triggers are not supported by the local host", name, kind)
        self.routes.sort(key=lambda route: route_precedence(route.template))  # stable: ties keep their order

    def url(self, template: str) -> str:
        prefix = f"/{self.settings.route_prefix}" if self.settings.route_prefix else ""
        return f"http://127.0.0.1:{self.port}{prefix}/{template.strip('/')}"

    def describe(self) -> str:
        lines = ["Functions:", ""]
        for route in self.routes:
            methods = ",".join(sorted(route.methods)) or "GET,POST,PUT,DELETE,PATCH,HEAD,OPTIONS"
            lines.append(f"        {route.function_name}: [{methods}] {self.url(route.template)}")
        lines.append("")
        lines.extend(f"        {runner.function_name}: queueTrigger" for runner in self.queue_runners)
        return "\n".join(lines)

    async def handle(self, request: web.Request) -> web.Response:
        prefix = f"/{self.settings.route_prefix}/" if self.settings.route_prefix else "/"
        path = request.path
        if not path.lower().startswith(prefix.lower()):  # routes, prefix included, ignore case
            return web.json_response({"error": "not found"}, status=404)
        relative = path[len(prefix) :]
        for route in self.routes:
            params = route.match(request.method, relative)
            if params is None:
                continue
            presented = request.headers.get("x-functions-key") or request.query.get("code")
            if not self.keys.allows(route.auth_level, presented):
                return web.Response(status=401)
            http_request = func.HttpRequest(
                method=request.method,
                url=str(request.url),
                headers=dict(request.headers),
                params=dict(request.query),
                route_params=params,
                body=await request.read(),
            )
            try:
                return _to_aiohttp(await _call(route.function, {route.binding_name: http_request}))
            except Exception:
                log.exception("function %s failed", route.function_name)
                return web.Response(status=500)
        return web.json_response({"error": f"no function serves {request.method} {path}"}, status=404)

    async def serve(self, stop: asyncio.Event) -> None:
        server = web.Application(client_max_size=100 * 1024 * 1024)
        server.router.add_route("*", "/{tail:.*}", self.handle)
        runner = web.AppRunner(server, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            message = f"port {self.port} is unavailable: close the process using it or pick another with --port"
            raise HostError(message) from exc
        self._wake_on_own_sends()
        pollers = [asyncio.create_task(r.run(stop)) for r in self.queue_runners]
        print(self.describe(), flush=True)
        print(f"\nHost started on http://127.0.0.1:{self.port} (Ctrl-C to stop)", flush=True)
        try:
            await stop.wait()
        finally:
            # In-flight invocations get a grace period; a poller stuck in storage retries does not.
            if pollers:  # asyncio.wait refuses an empty set (an app without queue triggers)
                _, stuck = await asyncio.wait(pollers, timeout=SHUTDOWN_GRACE)
                for task in stuck:
                    task.cancel()
                await asyncio.gather(*pollers, return_exceptions=True)
            await runner.cleanup()
            for queue_runner in self.queue_runners:
                await queue_runner.queue.close()
                await queue_runner.poison.close()
            hosted = getattr(self._app, "hosted_runtime", None)
            if hosted is not None:
                await hosted.close()

    def _wake_on_own_sends(self) -> None:
        """Like the Functions host, poll a queue right away when this app itself wrote to it."""
        hosted = getattr(self._app, "hosted_runtime", None)
        backend = getattr(hosted, "backend", None) if hosted is not None else None
        if backend is None or not hasattr(backend, "on_send"):
            return
        by_queue = {runner.queue.queue_name: runner for runner in self.queue_runners}

        def wake(queue_name: str) -> None:
            runner = by_queue.get(queue_name)
            if runner is not None:
                runner.wake.set()

        backend.on_send = wake

    def stop_emulator(self) -> None:
        if self._azurite is not None:
            self._azurite.stop()
            self._azurite = None
