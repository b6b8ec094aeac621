"""The Azure Functions adapter: the standard triggers a ``DFApp`` registers, and the runtime that
serves them inside a Functions worker process.

No Durable extension is involved: the task hub's control queues and work-item queue get ordinary
queue triggers, and the management API an ordinary HTTP trigger. The Functions host then owns each
message's acknowledgement: it deletes a message when its function returns and retries it (up to
``maxDequeueCount``, then moves it to ``<queue>-poison``) when the function raises.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import azure.functions as func

from ..core._history import utcnow
from ..runtime import _tracing as tracing
from ..runtime._backend import WORK_ITEM_QUEUE, Backend, PoisonedMessage, ReceivedMessage, control_queue
from ..runtime._client import DurableOrchestrationClient
from ..runtime._worker import Worker, WorkerOptions, deferred_copy
from ._app import Blueprint
from ._client_binding import MANAGEMENT_KEY_SETTING
from ._settings import HostSettings, IdentityConnection, UnreadableSettingsFile, resolve_identity_connection

if TYPE_CHECKING:
    from storage.azure._connection import StorageConnection

log = logging.getLogger("durable.functions")

MANAGEMENT_FUNCTION = "durable_management"
# App setting with the key that management URLs carry as ``code=`` (the management API's trigger
# is function-level, so any function key of the app works).


class PoisonMessageError(Exception):
    """Raised so that the Functions host retries the message and, at the limit, poisons it."""


class HostAcknowledger:
    """Settles deliveries the way a queue-triggered function can: by returning or raising."""

    def __init__(self, backend: Backend, clock: Callable[[], datetime] = utcnow) -> None:
        self.backend = backend
        self.clock = clock

    async def done(self, delivery: ReceivedMessage) -> None:
        pass  # the host deletes the message when the function returns

    async def later(self, delivery: ReceivedMessage, delay: float) -> None:
        # A function cannot change its message's visibility: enqueue a delayed copy (same id,
        # so duplicates are still recognised) and let the host delete the original.
        await self.backend.send([deferred_copy(delivery.message, delay, self.clock())])

    async def failed(self, deliveries: Sequence[ReceivedMessage], error: Exception, delays: Sequence[float]) -> None:
        # Retry through a delayed copy, as the polling worker does, so that a storage fault does
        # not count towards the host's poison limit. If even that fails, raise: the host then
        # keeps the message and retries it after its visibility timeout.
        for delivery, delay in zip(deliveries, delays, strict=True):
            await self.later(delivery, delay)

    async def poison(self, delivery: ReceivedMessage | PoisonedMessage, reason: str) -> None:
        raise PoisonMessageError(reason)

    async def extend(self, delivery: ReceivedMessage, seconds: float) -> None:
        pass  # the Functions host renews the messages its functions are working on


def named_connection(name: str) -> str | IdentityConnection | None:
    """The storage account the app setting ``name`` names, as the Functions host reads it: the
    connection string it holds, or else the identity-based connection of its ``<name>__*``
    settings (``__accountName``, ``__credential`` ...); None when neither is set."""
    return os.environ.get(name) or resolve_identity_connection(name)


def storage_connection(settings: HostSettings) -> str | IdentityConnection:
    """The storage account of the app's task hub (a clear error when its setting is missing)."""
    return named_connection(settings.connection_setting) or settings.connection_string()


def open_connection(connection: str | IdentityConnection) -> StorageConnection:
    """What the storage clients are built from. An identity-based connection gets a new credential
    (``close_credential``: the backend given it closes it; other holders close it themselves)."""
    from storage.azure._connection import StorageEndpoints

    if isinstance(connection, str):
        return connection
    return StorageEndpoints(
        blob_url=connection.blob_uri,
        queue_url=connection.queue_uri,
        table_url=connection.table_uri,
        credential=connection.credential(),
        close_credential=True,
    )


class HostedRuntime:
    """The durable runtime of one app in a Functions worker process, built from the app settings
    (``AzureWebJobsStorage`` and ``host.json``) when first needed."""

    def __init__(self, app: Blueprint, settings: HostSettings) -> None:
        self.app = app
        self.settings = settings
        # host.json's orchestration versioning applies to the app's orchestrators and starts
        app.durable_functions.versioning = settings.versioning
        tracing.configure_exporters()  # once per process, from the app settings
        self._backend: Backend | None = None
        self._worker: Worker | None = None
        self._task_hub_ready = False
        self._task_hub_lock = asyncio.Lock()

    async def ensure_task_hub(self) -> None:
        """Create the task hub's tables, queues and containers once per process (idempotent)."""
        if self._task_hub_ready:
            return
        async with self._task_hub_lock:
            if not self._task_hub_ready:
                await self.backend.create_task_hub()
                self._task_hub_ready = True

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            from storage.azure import AzureStorageBackend

            self._backend = AzureStorageBackend(
                open_connection(storage_connection(self.settings)),
                task_hub=self.settings.hub_name,
                partition_count=self.settings.partition_count,
                base64_messages=self.settings.message_encoding == "base64",
            )
        return self._backend

    @property
    def worker(self) -> Worker:
        if self._worker is None:
            # Retries and poisoning are the host's business here: never poison on our own.
            options = WorkerOptions(
                max_dequeue_count=1_000_000,
                max_concurrent_activities=self.settings.max_concurrent_activities,
                extended_sessions=self.settings.extended_sessions,
            )
            self._worker = Worker(
                self.app.durable_functions, self.backend, options=options, acks=HostAcknowledger(self.backend)
            )
        return self._worker

    def client(self) -> DurableOrchestrationClient:
        return DurableOrchestrationClient(
            self.backend,
            registry=self.app.durable_functions,
            task_hub_name=self.settings.hub_name,
            route_prefix=self.settings.route_prefix,
            management_key=os.environ.get(MANAGEMENT_KEY_SETTING) or None,
        )

    async def handle_queue_message(self, queue: str, message: func.QueueMessage) -> None:
        await self.ensure_task_hub()
        body = message.get_body().decode("utf-8")
        deliveries = await self.backend.parse_deliveries(queue, body, message.dequeue_count or 1)
        await self.worker.process_deliveries(deliveries)

    async def close(self) -> None:
        if self._backend is not None:
            await self._backend.close()
            self._backend = None
            self._worker = None


def register_runtime_functions(app: Blueprint, runtime: HostedRuntime) -> None:
    """Add the task hub's queue triggers and the management API's HTTP trigger to ``app``."""
    settings = runtime.settings
    hub = settings.hub_name.lower()
    queues = [control_queue(p) for p in range(settings.partition_count)] + [WORK_ITEM_QUEUE]
    for queue in queues:
        name = f"durable_{queue.replace('-', '_')}"
        handler = _queue_handler(runtime, queue, name)
        trigger = app.queue_trigger(arg_name="msg", queue_name=f"{hub}-{queue}", connection=settings.connection_setting)
        app.function_name(name)(trigger(handler))

    async def durable_management(req: func.HttpRequest) -> func.HttpResponse:
        from ._http_api import handle_management_request

        return await handle_management_request(await app.ready_client(), req, req.route_params.get("path", ""))

    # Anonymous for the host: the management API authorizes each request itself (its system key
    # or the master key, never a function key; see _client_binding.ManagementKeys), which also
    # lets the official client's key-less ``rpc/`` requests through to that check.
    route = app.route(
        route="durabletask/{*path}",
        methods=[func.HttpMethod.GET, func.HttpMethod.POST, func.HttpMethod.DELETE],
        auth_level=func.AuthLevel.ANONYMOUS,
    )
    app.function_name(MANAGEMENT_FUNCTION)(route(durable_management))


def _queue_handler(runtime: HostedRuntime, queue: str, name: str) -> Callable[[func.QueueMessage], Awaitable[None]]:
    async def handler(msg: func.QueueMessage) -> None:
        await runtime.handle_queue_message(queue, msg)

    handler.__name__ = handler.__qualname__ = name
    return handler


class DFApp(Blueprint, func.FunctionRegister):
    """The function app: ``app = df.DFApp(http_auth_level=func.AuthLevel.ANONYMOUS)``.

    Besides the user's functions it registers the runtime's own: a queue trigger per control
    queue, one for the work-item queue, and the management API's HTTP trigger (see
    ``_functions``), configured from ``host.json``."""

    def __init__(self, http_auth_level: func.AuthLevel | str = func.AuthLevel.FUNCTION) -> None:
        super().__init__(auth_level=http_auth_level)
        self.hosted_runtime = _host_runtime(self)

    def register_functions(self, function_container: Any) -> None:
        super().register_functions(function_container)
        if isinstance(function_container, Blueprint):
            _adopt(self, function_container)

    register_blueprint = register_functions


def _host_runtime(container: Blueprint) -> HostedRuntime:
    """Host the durable runtime in ``container``: its client, and its queue and HTTP triggers."""
    runtime = HostedRuntime(container, _settings_at_import())
    container.set_client_factory(runtime.client, runtime.ensure_task_hub)
    register_runtime_functions(container, runtime)
    return runtime


def _settings_at_import() -> HostSettings:
    """``host.json`` as importing the app reads it. The Functions host and ``durable start`` refuse
    to start with a file that is not one JSON object before they import the app, so only an import
    outside a host meets one: the documented unit tests of an app's functions, which never reach
    the runtime (the official SDK does not read host.json at all). Those keep working, with a
    warning; any other refusal (an unsupported storage provider, say) still fails the import."""
    try:
        return HostSettings.load()
    except UnreadableSettingsFile as exc:
        log.warning("%s; a host refuses to start with it, an import outside one uses the default settings", exc)
        return HostSettings()


def _adopt(host: Blueprint, blueprint: Blueprint) -> None:
    """The durable functions of ``blueprint`` join those ``host`` runs; its clients use ``host``'s."""
    host.durable_functions.merge(blueprint.durable_functions)
    host.durable_builders.extend(blueprint.durable_builders)
    blueprint.set_client_factory(host.client, host.prepare_task_hub)


# The attribute of a plain func.FunctionApp that holds the durable runtime attached to it.
ATTACHED_RUNTIME = "durable_runtime_functions"


def attach_durable_runtime(app: func.FunctionRegister, blueprint: Blueprint) -> None:
    """Registering a durable ``Blueprint`` on a plain ``func.FunctionApp`` attaches the durable
    runtime to that app, once: the runtime's queue and HTTP triggers join the app's functions,
    and the app gets ``hosted_runtime`` and ``durable_functions`` as a ``DFApp`` has them (the local
    host, ``df.Replayer`` and the tools read those)."""
    host = getattr(app, ATTACHED_RUNTIME, None)
    if not isinstance(host, Blueprint):
        host = Blueprint()
        runtime = _host_runtime(host)
        app._function_builders.extend(host._function_builders)
        setattr(app, ATTACHED_RUNTIME, host)
        app.hosted_runtime = runtime  # type: ignore[attr-defined]
        app.durable_functions = host.durable_functions  # type: ignore[attr-defined]
    _adopt(host, blueprint)


def _attaching(stock: Callable[[func.FunctionRegister, Any], None]) -> Callable[[func.FunctionRegister, Any], None]:
    @functools.wraps(stock)
    def register_functions(self: func.FunctionRegister, function_container: Any) -> None:
        stock(self, function_container)
        if isinstance(function_container, Blueprint) and not isinstance(self, DFApp):
            attach_durable_runtime(self, function_container)

    register_functions.attaches_durable_runtime = True  # type: ignore[attr-defined]
    return register_functions


# A plain FunctionApp knows nothing of durable blueprints, and registering one is the only moment
# the two meet: wrap the programming model's registration so the runtime attaches there (once per
# process, whoever imports this module first).
if not getattr(func.FunctionRegister.register_functions, "attaches_durable_runtime", False):
    func.FunctionRegister.register_functions = _attaching(  # type: ignore[method-assign, assignment]
        func.FunctionRegister.register_functions
    )
    func.FunctionRegister.register_blueprint = func.FunctionRegister.register_functions
