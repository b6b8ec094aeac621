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
import concurrent.futures
import contextlib
import functools
import importlib.util
import inspect
import json
import logging
import math
import os
import queue
import re
import secrets
import signal
import sys
import threading
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import azure.functions as func
from aiohttp import web
from azure.core.exceptions import HttpResponseError, ResourceExistsError, ServiceRequestError
from azure.functions.decorators.http import HttpTrigger
from azure.functions.decorators.queue import QueueTrigger
from azure.storage.queue.aio import QueueClient

from storage.azure._accounting import counter_from_environment
from storage.azure._connection import StorageConnection, StorageEndpoints, queue_client

from ..core._entities import is_entity_id
from ..core._history import EventType, HistoryEvent
from ..core._protocol import Commit
from ..runtime._backend import WORK_ITEM_QUEUE, SendListener, control_queue
from ..runtime._ownership import PartitionOwnership
from ..runtime._polling import PollIntervals, poll, wake_when_due
from ..runtime._wake import start_local_wakes
from ..runtime._worker import Invocation
from ._azurite import (
    Azurite,
    accepts_connections,
    ensure_running,
    local_emulator_ports,
    storage_unreachable,
    unreachable_local_storage,
)
from ._client_binding import MANAGEMENT_KEY_SETTING, MASTER_KEY_SETTING, same_key
from ._functions import MANAGEMENT_FUNCTION, named_connection, open_connection, storage_connection
from ._processes import (
    WORKER_PROCESS_COUNT_SETTING,
    ServingProcess,
    WorkerProcesses,
    parse_worker_count,
    stop_when_orphaned,
    worker_command,
)
from ._settings import (
    HostSettings,
    IdentityConnection,
    LocalHostOptions,
    identity_connection,
    load_local_host_options,
    load_local_settings,
)

log = logging.getLogger("durable.host")
T = TypeVar("T")
# The categories func start logs under, so that host.json's logging.logLevel applies to them.
durable_log = logging.getLogger("Host.Triggers.DurableTask")

SHUTDOWN_GRACE = 10.0  # seconds running functions get to finish on Ctrl-C or SIGTERM
STOP_TIMEOUT = SHUTDOWN_GRACE + 10.0  # a worker process's whole stop, its leases given back included
HTTP_REASON = "This function was programmatically called via the host APIs."
DURABLE_REASON = "(null)"  # what the Functions host logs for Durable triggers


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
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the app's own error: show where in its code, not our frames
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith("<frozen")]
        where = "".join(traceback.format_list(frames))
        problem = "".join(traceback.format_exception_only(exc)).strip()
        raise HostError(f"function_app.py failed to import:\n{where}{problem}") from exc
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
        return any(key is not None and same_key(key, presented) for key in accepted)


class _DaemonThreads(concurrent.futures.ThreadPoolExecutor):  # asyncio accepts only this class
    """The event loop's executor for synchronous user code (``asyncio.to_thread``): daemon threads,
    so that code still running when the host exits after its grace period does not hold the
    process (the Functions host stops its worker process likewise). A call takes an idle thread
    or starts one; threads are kept for the next calls (starting one per call cost more than
    most activities). The pool's own threads are never started."""

    def __init__(self) -> None:
        super().__init__(max_workers=1)
        self._calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)  # threads done with their call, about to take another

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as exc:  # handed to the awaiting coroutine
                    future.set_exception(exc)

        self._calls.put(run)
        if not self._idle.acquire(blocking=False):
            threading.Thread(target=self._serve, name="function", daemon=True).start()
        return future

    def _serve(self) -> None:
        while True:
            self._calls.get()()
            self._idle.release()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        pass  # nothing to wait for: see above


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


# -- invocation and lifecycle logs ---------------------------------------------------------------------
class _Outcome:
    """What an invocation says about itself besides raising: a failed orchestration step."""

    failed = False


@contextlib.contextmanager
def executing(function_name: str, reason: str) -> Iterator[_Outcome]:
    """Log an invocation as the Functions host does: ``Executing 'Functions.X' (Reason=..., Id=...)``
    before, ``Executed 'Functions.X' (Succeeded|Failed, Id=..., Duration=NNms)`` after, under the
    category ``Function.X``."""
    logger = logging.getLogger(f"Function.{function_name}")
    invocation_id = uuid.uuid4()
    logger.info("Executing 'Functions.%s' (Reason='%s', Id=%s)", function_name, reason, invocation_id)
    started = time.monotonic()
    outcome = _Outcome()

    def executed(result: str) -> str:
        duration = round((time.monotonic() - started) * 1000)
        return f"Executed 'Functions.{function_name}' ({result}, Id={invocation_id}, Duration={duration}ms)"

    try:
        yield outcome
    except Exception as exc:
        logger.error("%s\nResult: Failure\nException: %s: %s", executed("Failed"), type(exc).__name__, exc,
                     exc_info=exc)  # fmt: skip
        raise
    if outcome.failed:
        logger.error(executed("Failed"))
    else:
        logger.info(executed("Succeeded"))


def _size(text: str | None) -> str:
    return f"({len((text or '').encode())} bytes)"


def _text(payload: str | None) -> str:
    """A JSON payload as a reason reads best: a string without its quotes."""
    try:
        value = json.loads(payload or '""')
    except ValueError:
        return payload or ""
    return value if isinstance(value, str) else str(payload)


class DurableLog:
    """Watches the durable worker (``WorkerObserver``): logs each orchestrator step, activity and
    entity batch like an invocation, and orchestration lifecycle like the Durable extension
    (``<id>: Function 'name (Orchestrator)' started/completed/failed/terminated``). Activities
    run under ``maxConcurrentActivityFunctions`` here, whether from the work-item queue or inline."""

    def __init__(self, settings: HostSettings) -> None:
        self._activity_slots = asyncio.Semaphore(settings.max_concurrent_activities)

    @contextlib.asynccontextmanager
    async def invoking(self, invocation: Invocation) -> AsyncIterator[None]:
        slots = self._activity_slots if invocation.kind == "Activity" else contextlib.nullcontext()
        async with slots:
            with executing(invocation.name, DURABLE_REASON) as outcome:
                yield
                outcome.failed = invocation.failed

    def committed(self, commit: Commit) -> None:
        instance_id = commit.history.instance_id
        if is_entity_id(instance_id):
            return  # an entity batch has no lifecycle beyond its invocation
        events = commit.new_events
        started = commit.view.started if commit.view is not None else None
        function = f"Function '{started.name if started else '?'} (Orchestrator)'"
        if any(e.event_type is EventType.EXECUTION_REWOUND for e in events):
            durable_log.info("%s: %s was rewound. State: Rewound.", instance_id, function)
            return  # a rewound history is rewritten whole: its start is not a new one
        for event in events:
            if event.event_type is EventType.EXECUTION_STARTED:
                durable_log.info("%s: %s started. IsReplay: False. Input: %s. State: Started.",
                                 instance_id, function, _size(event.input))  # fmt: skip
            elif event.event_type is EventType.EXECUTION_COMPLETED:
                self._ended(instance_id, function, event)

    @staticmethod
    def _ended(instance_id: str, function: str, event: HistoryEvent) -> None:
        status = event.runtime_status or "Failed"
        if status == "Failed":
            reason = f"{event.failure.error_type}: {event.failure.message}" if event.failure else "unknown"
            durable_log.error("%s: %s failed with an error. Reason: %s. IsReplay: False. State: Failed.",
                              instance_id, function, reason)  # fmt: skip
        elif status == "Terminated":
            durable_log.warning("%s: %s was terminated. Reason: %s. State: Terminated.",
                                instance_id, function, _text(event.result))  # fmt: skip
        else:
            continued = status == "ContinuedAsNew"
            durable_log.info("%s: %s completed. ContinuedAsNew: %s. IsReplay: False. Output: %s. State: Completed.",
                             instance_id, function, continued, _size(event.result))  # fmt: skip


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
    """Polls one queue for one function, with the Functions host's retry and poison semantics.

    ``slots`` bounds the invocations in flight (shared by the control queues: the orchestrator
    and entity limit); ``logged`` says whether invocations are logged as the user's (the durable
    runtime's own triggers are not: the functions they run are, by ``DurableLog``)."""

    def __init__(self, function_name: str, function: Any, binding_name: str, queue: QueueClient,
                 poison: QueueClient, settings: HostSettings, *, logged: bool = True,
                 slots: asyncio.Semaphore | None = None, batch_size: int | None = None) -> None:  # fmt: skip
        self.function_name = function_name
        self.function = function
        self.binding_name = binding_name
        self.queue = queue
        self.poison = poison
        self.settings = settings
        self.logged = logged
        self.slots = slots
        self.batch_size = max(1, min(32, batch_size or settings.queue_batch_size))
        self.wake = asyncio.Event()  # set when this process sent a message to the queue
        # a user's trigger backs off to maxPollingInterval; the durable runtime's own set theirs
        self.intervals = PollIntervals(0.05, settings.queue_max_polling_interval, settings.queue_max_polling_interval)
        # a control queue's: received from only while this host holds its partition (_ownership)
        self.ownership: PartitionOwnership | None = None
        self.partition = 0
        self._unreachable = False  # storage is down: said once, not on every poll
        self._created = False

    async def run(self, stop: asyncio.Event) -> None:
        once = functools.partial(self._poll_once, stop)
        await poll(stop, self.wake, once, functools.partial(self._is_empty, stop), self._intervals)

    def _intervals(self) -> PollIntervals:
        if self.ownership is None:
            return self.intervals
        return self.ownership.intervals(self.partition, self.intervals)

    async def _poll_once(self, stop: asyncio.Event) -> int:
        try:
            # A request stuck in storage retries must not hold up a shutdown: race it with stop.
            await _unless_stopped(self.create_queue(), stop)
            if self.ownership is None:
                batch = await _unless_stopped(self._receive(), stop)
            else:  # a control queue's: taken as its partition's holder only
                taking = self.ownership.take(self.partition, self._receive, self._put_back)
                batch = await _unless_stopped(taking, stop)
        except _Stopped:
            return 0
        except ServiceRequestError as exc:
            self._unreachable_storage(exc)
            return 0
        except Exception:
            log.exception("polling %s failed", self.queue.queue_name)
            return 0
        self._reachable()
        await self._invoke_all(batch)  # running invocations are not cut short
        return len(batch)

    async def _put_back(self, batch: list[Any]) -> None:
        """Visible again at once, for the host that holds their partition."""
        put = (self.queue.update_message(raw.id, raw.pop_receipt, visibility_timeout=0) for raw in batch)
        await asyncio.gather(*put, return_exceptions=True)

    async def _is_empty(self, stop: asyncio.Event) -> bool:
        ask = functools.partial(self._queue_is_empty, stop)
        return await (ask() if self.ownership is None else self.ownership.is_empty(self.partition, ask))

    async def _queue_is_empty(self, stop: asyncio.Event) -> bool:
        try:
            properties = await _unless_stopped(self.queue.get_queue_properties(), stop)
        except _Stopped:
            return False
        except ServiceRequestError as exc:
            self._unreachable_storage(exc)
            return False
        return not properties.approximate_message_count

    async def create_queue(self) -> None:
        """Create the queue unless done already (a failure is retried on the next poll)."""
        if not self._created:
            with contextlib.suppress(ResourceExistsError):
                await self.queue.create_queue()
            self._created = True

    def _unreachable_storage(self, exc: Exception) -> None:
        if not self._unreachable:
            log.error("%s", storage_unreachable(self.queue.url, exc))
            self._unreachable = True

    def _reachable(self) -> None:
        if self._unreachable:
            log.info("storage is reachable again (%s)", self.queue.queue_name)
            self._unreachable = False

    async def poll_once(self) -> int:
        batch = await self._receive()
        await self._invoke_all(batch)
        return len(batch)

    async def _receive(self) -> list[Any]:
        pager = self.queue.receive_messages(
            messages_per_page=self.batch_size, visibility_timeout=math.ceil(self.settings.queue_message_lease)
        )
        async for page in pager.by_page():
            return [m async for m in page]
        return []

    async def _invoke_all(self, batch: list[Any]) -> None:
        await asyncio.gather(*(self._invoke(m) for m in batch))

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
            # Leased first: a message waiting for a slot keeps its lease (it may wait behind
            # steps taken for handed-over messages, which hold the same slots).
            async with self._leased(raw), self.slots or contextlib.nullcontext():
                with self._logged():
                    await _call(self.function, {self.binding_name: message})
        except Exception as exc:
            # A logged invocation's failure has been told already, and a storage outage by the poller.
            quiet = self.logged or isinstance(exc, ServiceRequestError)
            log.log(
                logging.WARNING if quiet else logging.ERROR,
                "function %s failed on message %s (attempt %d)%s",
                self.function_name, raw.id, raw.dequeue_count, f": {type(exc).__name__}" if quiet else "",
                exc_info=not quiet,
            )  # fmt: skip
            if raw.dequeue_count >= self.settings.queue_max_dequeue_count:
                await self._move_to_poison(raw)
            else:
                await self.queue.update_message(
                    raw.id, raw.pop_receipt, visibility_timeout=int(self.settings.queue_visibility_timeout)
                )
            return
        await self.queue.delete_message(raw.id, raw.pop_receipt)

    def _logged(self) -> contextlib.AbstractContextManager[Any]:
        if not self.logged:
            return contextlib.nullcontext()
        return executing(self.function_name, f"New queue message detected on '{self.queue.queue_name}'.")

    @contextlib.asynccontextmanager
    async def _leased(self, raw: Any) -> AsyncIterator[None]:
        """Keep a message hidden while its function runs, as the Functions host does: renew its
        lease every half lease. On leaving, a renewal in flight is waited for, so that settling
        the message uses the pop receipt it returned. Cancelled (a stop after the grace period),
        it cancels the renewal too: the message is not settled then anyway."""
        stop = asyncio.Event()
        keeper = asyncio.create_task(self._keep_leased(raw, stop))
        try:
            yield
        except asyncio.CancelledError:
            keeper.cancel()
            raise
        finally:
            stop.set()
            with contextlib.suppress(asyncio.CancelledError):
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
                outage = isinstance(exc, ServiceRequestError)  # said by the poller; no traceback needed
                log.warning("could not renew the lease of message %s; retrying", raw.id, exc_info=not outage)
                continue
            raw.pop_receipt = updated.pop_receipt
            raw.next_visible_on = updated.next_visible_on

    async def _move_to_poison(self, raw: Any) -> None:
        log.error("message %s moved to %s after %d attempts", raw.id, self.poison.queue_name, raw.dequeue_count)
        with contextlib.suppress(ResourceExistsError):
            await self.poison.create_queue()
        await self.poison.send_message(raw.content)
        await self.queue.delete_message(raw.id, raw.pop_receipt)


def _queue_client(connection: StorageConnection, queue_name: str) -> QueueClient:
    # The poll loop is the retry: a storage outage is reported within seconds, not after the
    # SDK's default retries (15 s, then 45 s ...).
    options: dict[str, Any] = {"retry_total": 2, "initial_backoff": 1, "increment_base": 2}
    counter = counter_from_environment()  # a benchmark counting this process's requests
    if counter is not None:
        options["raw_request_hook"] = counter.hook
    client = queue_client(connection, queue_name, **options)
    if counter is not None:
        counter.register_endpoint(client.url, "queue")
    return client


class _Stopped(Exception):
    """The host is stopping: what was waited for no longer matters."""


async def _unless_stopped(work: Any, stop: asyncio.Event) -> Any:
    """Await ``work`` unless ``stop`` is set first (then cancel it and raise ``_Stopped``)."""
    task = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait([task, stopping], return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise _Stopped
    return task.result()


def _resolve_app_settings(value: str, function_name: str) -> str:
    """Binding expressions ``%AppSetting%`` (e.g. ``queue_name="%JobsQueue%"``), as the host resolves them."""

    def setting(found: re.Match[str]) -> str:
        if found.group(1) not in os.environ:
            raise HostError(f"function {function_name}: the app setting {found.group(1)} is not set")
        return os.environ[found.group(1)]

    return re.sub(r"%([^%]+)%", setting, value)


# -- the host ------------------------------------------------------------------------------------------
DEFAULT_PORT = 7071


def configure_logging(verbose: bool = False, worker_process: int | None = None) -> None:
    """Log lines as ``func start`` prints them: ``[2026-11-30T12:00:00.123Z] message``; a worker
    process's (``--workers``) say which it is."""
    tag = "" if worker_process is None else f"[worker {worker_process}] "
    formatter = logging.Formatter(f"[%(asctime)s] {tag}%(message)s")
    formatter.converter = time.gmtime

    def utc_time(record: logging.LogRecord, datefmt: str | None = None) -> str:
        moment = datetime.fromtimestamp(record.created, tz=timezone.utc)
        return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"

    formatter.formatTime = utc_time  # type: ignore[method-assign]
    handler = logging.StreamHandler()
    handler.setFormatter(formatter)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], force=True)
    logging.getLogger("azure").setLevel(logging.WARNING)


def apply_log_levels(levels: Mapping[str, int]) -> None:
    """host.json ``logging.logLevel``: ``default`` for everything, or a level per category (a
    prefix of logger names: ``Function`` covers ``Function.hello``). ``-v`` keeps debug output."""
    for category, level in levels.items():
        if category.lower() == "default":
            root = logging.getLogger()
            if root.level > logging.DEBUG:
                root.setLevel(level)
        else:
            logging.getLogger(category).setLevel(level)


def _disabled_functions() -> set[str]:
    """Functions the app settings disable (``AzureWebJobs.<name>.Disabled``), lower-cased: the
    Functions host matches function names case-insensitively."""
    disabled = set()
    for key, value in os.environ.items():
        found = re.fullmatch(r"AzureWebJobs\.(.+)\.Disabled", key, re.IGNORECASE)
        if found and value.strip().lower() in ("true", "1"):
            disabled.add(found.group(1).lower())
    return disabled


def _runtime_queues(settings: HostSettings) -> set[str]:
    """The task hub's queues: their triggers are the durable runtime's, not the user's."""
    queues = [control_queue(p) for p in range(settings.partition_count)] + [WORK_ITEM_QUEUE]
    return {f"{settings.hub_name.lower()}-{queue}" for queue in queues}


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """Until the event loop handles signals, let SIGTERM unwind the stack like Ctrl-C, so that
    what was started (Azurite) is stopped on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class LocalHost:
    def __init__(
        self,
        app_dir: Path,
        *,
        port: int | None = None,
        keys: AuthKeys | None = None,
        workers: int | None = None,
        worker_process: int | None = None,
    ) -> None:
        self.app_dir = app_dir.resolve()
        self.requested_port = port  # --port; otherwise Host.LocalHttpPort, otherwise 7071
        self.port = port or DEFAULT_PORT
        self.keys = keys or AuthKeys()
        # --workers; otherwise the app setting FUNCTIONS_WORKER_PROCESS_COUNT, otherwise 1 (_processes).
        self.requested_workers = workers
        self.workers = 1
        # Set in a worker process of another host (2..N): it polls the queues and serves no HTTP,
        # and stops if its serving process (its parent) is gone.
        self.worker_process = worker_process
        self._serving = ServingProcess() if worker_process is not None else None
        self.routes: list[HttpRoute] = []
        self.queue_runners: list[QueueTriggerRunner] = []
        self.listing: list[str] = []  # the function list, as func start prints it
        self.options = LocalHostOptions()
        self._azurite: Azurite | None = None
        self._app: func.FunctionRegister | None = None
        self._orchestrator_slots: asyncio.Semaphore | None = None  # maxConcurrentOrchestratorFunctions
        # The storage accounts of the queue triggers; an identity-based one holds its credential.
        self._accounts: dict[str | IdentityConnection, StorageConnection] = {}

    def prepare(self) -> None:
        """Read settings, start Azurite if the app uses it and none runs, index the app. Whatever
        goes wrong (or a signal), an Azurite started here is stopped again."""
        try:
            with _sigterm_as_exit():
                self._prepare()
        except BaseException:
            self.stop_emulator()
            raise

    def _prepare(self) -> None:
        for name, value in load_local_settings(self.app_dir).items():
            os.environ.setdefault(name, value)
        self.options = load_local_host_options(self.app_dir)
        self.port = self.requested_port or self.options.http_port or DEFAULT_PORT
        if self.worker_process is None:
            try:
                self.workers = parse_worker_count(
                    self.requested_workers or os.environ.get(WORKER_PROCESS_COUNT_SETTING) or 1
                )
            except ValueError as exc:
                raise HostError(str(exc)) from exc
        os.environ.setdefault("AzureWebJobsScriptRoot", str(self.app_dir))
        if self.keys.function_key or self.keys.master_key:
            # The management API's own key (Durable Functions' durabletask_extension system key),
            # generated as the Functions host generates system keys: the only key in the URLs the
            # app hands out. The API also takes the master key (it authorizes itself: _dispatch).
            os.environ.setdefault(MANAGEMENT_KEY_SETTING, secrets.token_urlsafe(32))
        if self.keys.master_key:
            os.environ[MASTER_KEY_SETTING] = self.keys.master_key
        # Management URLs point at the address served here, whatever Host header a request has.
        os.environ["WEBSITE_HOSTNAME"] = f"127.0.0.1:{self.port}"
        settings = HostSettings.load(self.app_dir)
        self.settings = settings
        apply_log_levels(settings.log_levels)
        if identity_connection(settings.connection_setting) is None:
            os.environ.setdefault(settings.connection_setting, "UseDevelopmentStorage=true")
        connection = storage_connection(settings)  # a clear error for what cannot be used
        if isinstance(connection, str):  # an identity-based connection is never the emulator's
            # A worker process uses the storage its serving process found or started.
            if self.worker_process is None:
                self._azurite = ensure_running(connection, self.app_dir / ".azurite")
            emulator = local_emulator_ports(connection)
            if self._azurite is not None:
                log.info("started Azurite on 127.0.0.1 ports %s (data in %s); it stops with the host",
                         self._azurite.ports, self.app_dir / ".azurite")  # fmt: skip
            elif self.worker_process is None and emulator is not None and accepts_connections(emulator[1]):
                # not ours: say whose storage is used
                log.info("using the Azurite already running on 127.0.0.1 ports %s", emulator)
            unreachable = unreachable_local_storage(connection)
            if unreachable is not None:
                raise HostError(unreachable)
        self._app = load_function_app(self.app_dir)
        self._index(self._app, connection)

    def _index(self, app: func.FunctionRegister, connection: str | IdentityConnection) -> None:
        """The app's functions as the worker indexes them; disabled ones are left out."""
        disabled = _disabled_functions()
        runtime_queues = _runtime_queues(self.settings)
        orchestrator_slots = self._orchestrator_slots = asyncio.Semaphore(self.settings.max_concurrent_orchestrations)
        for function in app.get_functions():
            trigger = function.get_trigger()
            name = function.get_function_name() or ""
            if name.lower() in disabled:
                self.listing.append(f"{name}: disabled")
            elif isinstance(trigger, HttpTrigger):
                template = trigger.route or name
                methods = frozenset(str(getattr(m, "value", m)).upper() for m in (trigger.methods or []))
                level = str(getattr(trigger.auth_level, "value", trigger.auth_level) or "function")
                pattern = compile_route(template)
                user_function = function.get_user_function()
                self.routes.append(HttpRoute(name, template, methods, level, trigger.name, pattern, user_function))
                if name != MANAGEMENT_FUNCTION:
                    shown = ",".join(sorted(methods)) or "GET,POST,PUT,DELETE,PATCH,HEAD,OPTIONS"
                    self.listing.append(f"{name}: [{shown}] {self.url(template)}")
            elif isinstance(trigger, QueueTrigger):
                own = named_connection(trigger.connection) if trigger.connection else None
                account = self._open(own or connection)  # a trigger's own setting, else the app's
                queue_name = _resolve_app_settings(trigger.queue_name, name)
                queue = _queue_client(account, queue_name)
                poison = _queue_client(account, f"{queue_name}-poison")
                runtime = queue_name.lower() in runtime_queues
                work_items = runtime and queue_name.lower().endswith(f"-{WORK_ITEM_QUEUE}")
                runner = QueueTriggerRunner(
                    name, function.get_user_function(), trigger.name, queue, poison, self.settings, logged=not runtime
                )
                if runtime:
                    settings = self.settings
                    lease, most = settings.queue_message_lease, settings.max_queue_polling_interval
                    runner.intervals = PollIntervals.for_lease(lease, most)
                if runtime and not work_items:
                    # maxConcurrentOrchestratorFunctions bounds control-queue work (orchestrations and
                    # entities); activities are bounded where they run, inline or not (DurableLog).
                    runner.slots = orchestrator_slots
                elif work_items:  # take no more work items than may run at once
                    runner.batch_size = max(1, min(runner.batch_size, self.settings.max_concurrent_activities))
                self.queue_runners.append(runner)
                if not runtime:
                    self.listing.append(f"{name}: queueTrigger")
            else:
                kind = getattr(trigger, "type", "unknown")
                log.warning("function %s: %s triggers are not supported by the local host", name, kind)
        self.routes.sort(key=lambda route: route_precedence(route.template))  # stable: ties keep their order
        registry = getattr(app, "durable_functions", None)
        if registry is not None:
            self._index_durable(registry, disabled)

    def _open(self, connection: str | IdentityConnection) -> StorageConnection:
        """One credential per account for all the triggers that poll it (closed with the clients)."""
        account = self._accounts.get(connection)
        if account is None:
            account = self._accounts[connection] = open_connection(connection)
        return account

    def _index_durable(self, registry: Any, disabled: set[str]) -> None:
        """Orchestrators, activities and entities. A disabled one is removed from the registry, so
        that calling it fails as the Durable extension fails it (no such function)."""
        kinds = (
            (registry.orchestrators, "orchestrationTrigger"),
            (registry.activities, "activityTrigger"),
            (registry.entities, "entityTrigger"),
        )
        for table, trigger in kinds:
            for name in list(table):
                if name.lower() in disabled:
                    del table[name]
                    self.listing.append(f"{name}: disabled")
                else:
                    self.listing.append(f"{name}: {trigger}")

    def url(self, template: str) -> str:
        prefix = f"/{self.settings.route_prefix}" if self.settings.route_prefix else ""
        return f"http://127.0.0.1:{self.port}{prefix}/{template.strip('/')}"

    def describe(self) -> str:
        lines = ["Functions:", ""]
        for entry in self.listing:
            lines += [f"        {entry}", ""]
        return "\n".join(lines).rstrip()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self.options.cors_origins and _is_preflight(request):
            return self._preflight(request)
        response = await self._dispatch(request)
        origin = request.headers.get("Origin")
        if origin and self.options.cors_origins and self.options.allows_origin(origin):
            self._allow_origin(response, origin)
        return response

    def _allow_origin(self, response: web.StreamResponse, origin: str) -> None:
        if "Access-Control-Allow-Origin" in response.headers:
            return  # the function answered CORS itself
        any_origin = "*" in self.options.cors_origins and not self.options.cors_credentials
        response.headers["Access-Control-Allow-Origin"] = "*" if any_origin else origin
        if not any_origin:
            response.headers.add("Vary", "Origin")
        if self.options.cors_credentials:
            response.headers["Access-Control-Allow-Credentials"] = "true"

    def _preflight(self, request: web.Request) -> web.Response:
        """A browser's CORS preflight, answered by the host (as the Functions host's CORS
        middleware does) without invoking a function. A refused origin gets no CORS headers."""
        response = web.Response(status=204)
        origin = request.headers["Origin"]
        if self.options.allows_origin(origin):
            self._allow_origin(response, origin)
            response.headers["Access-Control-Allow-Methods"] = request.headers["Access-Control-Request-Method"]
            asked = request.headers.get("Access-Control-Request-Headers")
            if asked:
                response.headers["Access-Control-Allow-Headers"] = asked
        return response

    async def _dispatch(self, request: web.Request) -> web.Response:
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
            # The management API authorizes itself, as the Durable extension's webhooks: system key or master key.
            level = "anonymous" if route.function_name == MANAGEMENT_FUNCTION else route.auth_level
            if not self.keys.allows(level, presented):
                return web.Response(status=401)
            http_request = func.HttpRequest(
                method=request.method,
                url=str(request.url),
                headers=dict(request.headers),
                params=dict(request.query),
                route_params=params,
                body=await request.read(),
            )
            # The management API is the Durable extension's webhook under func start, not a function.
            management = route.function_name == MANAGEMENT_FUNCTION
            try:
                with contextlib.nullcontext() if management else executing(route.function_name, HTTP_REASON):
                    return _to_aiohttp(await _call(route.function, {route.binding_name: http_request}))
            except Exception:  # a function's failure is logged as its invocation's
                if management:
                    log.exception("the management API failed on %s %s", request.method, path)
                return web.Response(status=500)
        return web.json_response({"error": f"no function serves {request.method} {path}"}, status=404)

    async def serve(self, stop: asyncio.Event) -> None:
        """Serve the HTTP triggers (not in a worker process) and run the queue triggers until
        ``stop``; with ``--workers N``, with N - 1 worker processes beside this one."""
        hosted = getattr(self._app, "hosted_runtime", None)
        asyncio.get_running_loop().set_default_executor(_DaemonThreads())
        watched = self._watch_durable_functions()  # no I/O: wiring only
        # The listener first (a port in use ends start-up before anything else runs); it is
        # closed in the finally below with everything started after it.
        runner = await self._listen(hosted) if self.worker_process is None else None
        ownership, local_wakes = None, None
        pollers: list[asyncio.Task[None]] = []
        helpers: list[asyncio.Task[None]] = []
        # Everything started from here on is undone in the finally below, a start-up cut short included.
        try:
            if watched is not None and hosted is not None:
                ownership, wake = watched
                local_wakes = await start_local_wakes(hosted.backend, wake, ownership)
            # Listening before "Host started", as the Functions host: the trigger queues exist (an error
            # here is the pollers' to report and retry).
            await asyncio.gather(*(r.create_queue() for r in self.queue_runners), return_exceptions=True)
            pollers.extend(asyncio.create_task(r.run(stop)) for r in self.queue_runners)
            if ownership is not None:
                pollers.append(asyncio.create_task(ownership.run(stop)))
            if self._serving is not None:
                helpers.append(asyncio.create_task(stop_when_orphaned(stop, self._serving)))
                print(f"Worker process {self.worker_process} started (pid {os.getpid()})", flush=True)
            else:
                if self.workers > 1:
                    command = worker_command(self.app_dir, self.port, log.isEnabledFor(logging.DEBUG))
                    helpers.append(asyncio.create_task(WorkerProcesses(command, self.workers, STOP_TIMEOUT).run(stop)))
                print(self.describe(), flush=True)
                if hosted is not None:
                    print(f"\nDashboard: http://127.0.0.1:{self.port}/dashboard/", flush=True)
                workers = f" with {self.workers} worker processes" if self.workers > 1 else ""
                print(f"\nHost started on http://127.0.0.1:{self.port}{workers} (Ctrl-C to stop)", flush=True)
            await stop.wait()
        finally:
            stop.set()  # also when cancelled: the helpers end on it
            if local_wakes is not None:
                local_wakes.close()
            stopping = [self._stop_pollers(pollers), *helpers]
            if runner is not None:
                stopping.append(runner.cleanup())
            if hosted is not None:  # what was handed over between its instances gets the same grace
                stopping.append(hosted.worker.finish_up(SHUTDOWN_GRACE))
            for failure in await asyncio.gather(*stopping, return_exceptions=True):
                if isinstance(failure, Exception):  # the rest of the shutdown still runs
                    log.error("stopping the host failed", exc_info=failure)
            if hosted is not None:  # rows held back by steps that ended after the hand-overs did
                await hosted.worker.write_held_rows(everything=True)
            if ownership is not None:  # once nothing runs any more: another host takes over at once
                await ownership.release_all()
            await self._close_clients()

    async def _listen(self, hosted: Any) -> web.AppRunner:
        """The HTTP server, listening on 127.0.0.1."""
        server = web.Application(client_max_size=100 * 1024 * 1024)
        if hosted is not None:  # a durable app: its task hub's dashboard, an admin surface
            from ._dashboard import mount_dashboard  # jinja2 is only needed here

            mount_dashboard(server, hosted.client(), lambda key: self.keys.allows("admin", key), hosted.ensure_task_hub)
        server.router.add_route("*", "/{tail:.*}", self.handle)
        # In-flight requests get the same grace as running functions, then are cut short.
        runner = web.AppRunner(server, access_log=None, shutdown_timeout=SHUTDOWN_GRACE)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            message = (
                f"port {self.port} is unavailable: close the process using it or pick another with --port "
                f"(or Host.LocalHttpPort in local.settings.json)"
            )
            raise HostError(message) from exc
        return runner

    @staticmethod
    async def _stop_pollers(pollers: list[asyncio.Task[None]]) -> None:
        """Pollers stop receiving at once; invocations in flight get a grace period, then are
        cancelled (their messages reappear after the lease), so a stop never hangs on storage."""
        if not pollers:  # asyncio.wait refuses an empty set (an app without queue triggers)
            return
        _, stuck = await asyncio.wait(pollers, timeout=SHUTDOWN_GRACE)
        for task in stuck:
            task.cancel()
        await asyncio.gather(*pollers, return_exceptions=True)

    async def _close_clients(self) -> None:
        closing = [runner.queue.close() for runner in self.queue_runners]
        closing += [runner.poison.close() for runner in self.queue_runners]
        hosted = getattr(self._app, "hosted_runtime", None)
        if hosted is not None:
            closing.append(hosted.close())
        await asyncio.gather(*closing, return_exceptions=True)
        credentials = [a.credential.close() for a in self._accounts.values() if isinstance(a, StorageEndpoints)]
        await asyncio.gather(*credentials, return_exceptions=True)

    def _watch_durable_functions(self) -> tuple[PartitionOwnership, SendListener] | None:
        """Log what the durable worker runs and bound its activities, poll a queue right away
        when this app itself wrote to it (as the Functions host does) or another process of this
        machine did (``start_local_wakes``, in ``serve``), and have the control queues polled only
        while this host holds their partitions: the ownership to run, and how to wake a queue's
        poller."""
        hosted = getattr(self._app, "hosted_runtime", None)
        if hosted is None:
            return None
        hosted.worker.options.observer = DurableLog(self.settings)
        backend = hosted.backend
        by_queue = {runner.queue.queue_name: runner for runner in self.queue_runners}

        physical_name: Callable[[str], str] = getattr(backend, "physical_queue_name", str)

        def wake(queue: str, delay: float) -> None:
            runner = by_queue.get(physical_name(queue))
            if runner is not None:
                wake_when_due(runner.wake, delay)

        backend.add_send_listener(wake)
        ownership = PartitionOwnership(backend)
        for partition in range(backend.partition_count):
            runner = by_queue.get(physical_name(control_queue(partition)))
            if runner is not None:
                runner.ownership, runner.partition = ownership, partition
        ownership.on_available(lambda partition: wake(control_queue(partition), 0.0))
        hosted.worker.ownership = ownership  # messages between its partitions' instances are handed over
        hosted.worker.step_slots = self._orchestrator_slots  # ...and their steps count as invocations
        return ownership, wake

    def stop_emulator(self) -> None:
        if self._azurite is not None:
            self._azurite.stop()
            self._azurite = None


def _is_preflight(request: web.Request) -> bool:
    headers = request.headers
    return request.method == "OPTIONS" and "Origin" in headers and "Access-Control-Request-Method" in headers
