"""The ``durable`` command: run an app locally and inspect its instances."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar
from urllib.parse import urlsplit

import typer
from azure.core.exceptions import AzureError, ClientAuthenticationError, ResourceNotFoundError, ServiceRequestError
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from storage._keys import odata_string
from storage.azure._connection import (
    StorageConnection,
    blob_service_client,
    queue_service_client,
    resolve_connection_string,
    table_service_client,
)

from ..core._entities import is_entity_id
from ..core._history import EventType, HistoryEvent, utcnow
from ..core._status import OrchestrationRuntimeStatus
from ..core._timestamps import parse_timestamp
from ..runtime._backend import InstanceQuery
from ..runtime._client import DurableOrchestrationClient, DurableOrchestrationStatus, PurgeRefused
from ..runtime._replayer import Replayer, ReplayHistory, ReplayResult, describe_event
from ._azurite import accepts_connections
from ._functions import open_connection, storage_connection
from ._settings import HostSettings, IdentityConnection, SettingsError, identity_connection, load_local_settings

if TYPE_CHECKING:
    from storage.azure import AzureStorageBackend

    from ..runtime._registry import FunctionRegistry
    from ._app import Blueprint
    from ._host import LocalHost

cli = typer.Typer(help="Durable Functions for Python on Azure Storage: local host and tools.", no_args_is_help=True)
console = Console()
errors = Console(stderr=True)  # errors go to stderr, so that stdout stays parseable (status | jq)
T = TypeVar("T")

AppDir = Annotated[
    Path, typer.Option("--app-dir", "-d", exists=True, file_okay=False, help="The app folder (with host.json).")
]


def _fail(message: str, code: int = 1) -> typer.Exit:
    errors.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    return typer.Exit(code)


@cli.command()
def start(
    app_dir: AppDir = Path("."),
    port: Annotated[
        int | None,
        typer.Option(help="Port to serve HTTP triggers on (127.0.0.1 only) [default: Host.LocalHttpPort or 7071]."),
    ] = None,
    function_key: Annotated[
        str | None, typer.Option(envvar="DURABLE_FUNCTION_KEY", help="Key required by function-level triggers.")
    ] = None,
    master_key: Annotated[
        str | None, typer.Option(envvar="DURABLE_MASTER_KEY", help="Key accepted everywhere; required by admin.")
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Processes that run the queue triggers and durable work, sharing the task hub's partitions; "
            "the first also serves HTTP [default: FUNCTIONS_WORKER_PROCESS_COUNT or 1].",
        ),
    ] = None,
    worker_process: Annotated[int | None, typer.Option(hidden=True)] = None,  # set by the serving process
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Serve the app in APP_DIR like `func start`: HTTP triggers on 127.0.0.1, queue triggers polled."""
    from ._host import AuthKeys, HostError, LocalHost, configure_logging  # the HTTP server stack, only needed here

    configure_logging(verbose, worker_process)
    keys = AuthKeys(function_key, master_key)
    host = LocalHost(app_dir, port=port, keys=keys, workers=workers, worker_process=worker_process)
    try:
        host.prepare()
    except (HostError, SettingsError, FileNotFoundError, RuntimeError) as exc:
        raise _fail(str(exc)) from exc
    try:
        asyncio.run(_serve(host))
    except HostError as exc:
        raise _fail(str(exc)) from exc
    finally:
        host.stop_emulator()


async def _serve(host: LocalHost) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await host.serve(stop)
    print("Host stopped.", flush=True)


# -- addressing a task hub ----------------------------------------------------------------------------
# Every command but `start` and `replay --file` works on a task hub, named the way the app names it:
# host.json's hubName and connection setting, values from the environment or local.settings.json,
# overridden by flags.
TaskHubOption = Annotated[
    str | None,
    typer.Option("--task-hub", help="The task hub (default: hubName in APP_DIR/host.json, else DurableHub)."),
]
ConnectionOption = Annotated[
    str | None,
    typer.Option(
        "--connection-string",
        help="Storage connection string (default: the app setting host.json names, AzureWebJobsStorage, "
        "from the environment or local.settings.json; else UseDevelopmentStorage=true).",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON (for scripts) instead of tables.")]

PURGE_CONCURRENCY = 16  # purges in flight at once: each is a few requests that wait on the network
QUERY_PAGE = 1000  # the most rows a table query returns per request
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
# Table storage keeps times from 1601 to 9999: a bound beyond them filters nothing.
EARLIEST_TIME = datetime(1601, 1, 2, tzinfo=timezone.utc)
LATEST_TIME = datetime(9999, 12, 30, tzinfo=timezone.utc)
AGE_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


@dataclass(frozen=True)
class HubTarget:
    """Where a command's task hub is: the app folder whose settings name it, and flag overrides."""

    app_dir: Path
    task_hub: str | None = None
    connection: str | None = None


@dataclass(frozen=True)
class Hub:
    """An open task hub: its storage backend and a client of it."""

    name: str
    backend: AzureStorageBackend
    client: DurableOrchestrationClient


def _address(target: HubTarget, error_code: int) -> tuple[str | IdentityConnection, str, HostSettings]:
    """The storage account (connection string or identity-based connection) and task hub name
    ``target`` means, and the app's settings."""
    try:
        for name, value in load_local_settings(target.app_dir).items():
            os.environ.setdefault(name, value)
        settings = HostSettings.load(target.app_dir)
        if identity_connection(settings.connection_setting) is None:
            os.environ.setdefault(settings.connection_setting, "UseDevelopmentStorage=true")
        connection = target.connection or storage_connection(settings)
    except SettingsError as exc:
        raise _fail(str(exc), error_code) from exc
    return connection, target.task_hub or settings.hub_name, settings


def _locate(target: HubTarget, error_code: int) -> tuple[StorageConnection, str]:
    """What the storage clients of the task hub ``target`` means are built from, and its name."""
    connection, hub_name, _ = _address(target, error_code)
    return open_connection(connection), hub_name


def _unreachable_local_endpoint(connection: str) -> str | None:
    """The first endpoint of ``connection`` on this machine that nobody listens on (Azurite is
    down): found at once, where the storage SDKs would retry for a while and then fail obscurely."""
    fields = {
        key.strip().lower(): value.strip()
        for key, _, value in (part.partition("=") for part in resolve_connection_string(connection).split(";"))
    }
    for key in ("tableendpoint", "queueendpoint", "blobendpoint"):
        url = urlsplit(fields.get(key, ""))
        if url.hostname in LOCAL_HOSTS and url.port and not accepts_connections(url.port, url.hostname):
            return f"{url.hostname}:{url.port}"
    return None


def _with_hub(
    target: HubTarget, action: Callable[[Hub], Awaitable[T]], error_code: int = 1, must_exist: bool = True
) -> T:
    """Run ``action`` on the task hub ``target`` names; storage and input errors end the command
    with a message and ``error_code`` instead of a traceback."""
    from storage.azure import AzureStorageBackend

    connection, hub_name, settings = _address(target, error_code)
    down = _unreachable_local_endpoint(connection) if isinstance(connection, str) else None
    if down is not None:
        raise _fail(
            f"cannot connect to the storage emulator at {down}: Azurite is not running. Start it with "
            f"`npx azurite --silent --location .azurite` in the project folder (`durable start` also starts it), "
            f"or point AzureWebJobsStorage / --connection-string at a storage account",
            error_code,
        )
    try:
        backend = AzureStorageBackend(
            open_connection(connection),
            task_hub=hub_name,
            partition_count=settings.partition_count,
            # What the app's queue triggers expect: the messages the CLI sends must parse there.
            base64_messages=settings.message_encoding == "base64",
        )
    except ValueError as exc:  # a bad hub name or connection string
        raise _fail(str(exc), error_code) from exc

    async def run() -> T:
        try:
            if must_exist and not await _hub_exists(backend):
                raise _hub_not_found(backend)
            return await action(Hub(hub_name, backend, DurableOrchestrationClient(backend, task_hub_name=hub_name)))
        finally:
            await backend.close()

    try:
        return asyncio.run(run())
    except ResourceNotFoundError as exc:  # a table or queue went missing under the command
        raise _hub_not_found(backend, error_code) from exc
    except ServiceRequestError as exc:
        raise _fail(f"cannot reach the storage account: {_first_line(exc)}", error_code) from exc
    except ClientAuthenticationError as exc:
        raise _fail(f"the storage account refused the credentials: {_first_line(exc)}", error_code) from exc
    except AzureError as exc:
        raise _fail(f"storage request failed: {_first_line(exc)}", error_code) from exc
    except (SettingsError, LookupError, ValueError) as exc:  # the client's refusals: unknown instance, ...
        raise _fail(str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc), error_code) from exc


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


async def _hub_exists(backend: AzureStorageBackend) -> bool:
    try:
        await backend.query_instances(InstanceQuery(), page_size=1)
    except ResourceNotFoundError:
        return False
    return True


def _hub_not_found(backend: AzureStorageBackend, error_code: int = 1) -> typer.Exit:
    return _fail(
        f"task hub {backend.task_hub} not found in the storage account (check hubName in host.json or "
        f"--task-hub; `durable hub list` shows the task hubs there, `durable hub create` makes one)",
        error_code,
    )


def _emit_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, ensure_ascii=False, default=str))


# -- filters --------------------------------------------------------------------------------------
StatusOption = Annotated[
    list[OrchestrationRuntimeStatus] | None,
    typer.Option("--status", "-s", case_sensitive=False, help="Only instances in this status (repeatable)."),
]
CreatedFromOption = Annotated[
    str | None,
    typer.Option(
        "--created-from",
        help="Only instances created at or after this time: ISO 8601 (UTC unless it has an offset) or an age "
        "such as 30m, 12h, 7d.",
    ),
]
CreatedToOption = Annotated[
    str | None,
    typer.Option("--created-to", "--created-before", help="Only instances created at or before this time."),
]
PrefixOption = Annotated[str | None, typer.Option("--prefix", help="Only instances whose id starts with this.")]
NameOption = Annotated[str | None, typer.Option("--name", help="Only instances of this orchestrator.")]


@dataclass(frozen=True)
class InstanceFilter:
    statuses: frozenset[OrchestrationRuntimeStatus] | None = None
    created_from: datetime | None = None
    created_to: datetime | None = None
    prefix: str | None = None
    name: str | None = None  # checked on each page (the Instances table has no index on it)

    @classmethod
    def of(
        cls,
        statuses: list[OrchestrationRuntimeStatus] | None,
        created_from: str | None,
        created_to: str | None,
        prefix: str | None,
        name: str | None,
    ) -> InstanceFilter:
        since = _parse_time(created_from, "--created-from") if created_from else None
        until = _parse_time(created_to, "--created-to") if created_to else None
        return cls(
            statuses=frozenset(statuses) if statuses else None,
            created_from=since if since is not None and since > EARLIEST_TIME else None,
            created_to=until if until is not None and until < LATEST_TIME else None,
            prefix=prefix or None,
            name=name or None,
        )

    @property
    def is_empty(self) -> bool:
        return self == InstanceFilter()

    async def page(
        self, client: DurableOrchestrationClient, limit: int | None, token: str | None = None
    ) -> tuple[list[DurableOrchestrationStatus], str | None]:
        """Up to ``limit`` (None: all) matching instances from ``token`` on, and the token after them."""
        found: list[DurableOrchestrationStatus] = []
        while True:
            size = QUERY_PAGE if limit is None else min(QUERY_PAGE, limit - len(found))
            page, token = await client.get_status_page(
                created_time_from=self.created_from,
                created_time_to=self.created_to,
                runtime_status=self.statuses,
                instance_id_prefix=self.prefix,
                page_size=size,
                continuation_token=token,
                show_input=False,
            )
            found.extend(status for status in page if self.name is None or status.name == self.name)
            if token is None or (limit is not None and len(found) >= limit):
                return found, token


def _parse_time(value: str, option: str) -> datetime:
    text = value.strip()
    age = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhdw])", text)
    if age is not None:
        return utcnow() - timedelta(**{AGE_UNITS[age.group(2)]: float(age.group(1))})
    try:
        return parse_timestamp(text)
    except ValueError:
        raise _fail(
            f"{option}: {value!r} is not a time (use ISO 8601, e.g. 2026-11-30T12:00:00Z, or an age: 30m, 12h, 7d)",
            code=2,
        ) from None


# -- rendering ------------------------------------------------------------------------------------
STATUS_STYLES = {
    OrchestrationRuntimeStatus.Pending: "yellow",
    OrchestrationRuntimeStatus.Running: "cyan",
    OrchestrationRuntimeStatus.Completed: "green",
    OrchestrationRuntimeStatus.ContinuedAsNew: "blue",
    OrchestrationRuntimeStatus.Failed: "bold red",
    OrchestrationRuntimeStatus.Terminated: "magenta",
    OrchestrationRuntimeStatus.Suspended: "yellow",
}


def _styled(status: OrchestrationRuntimeStatus) -> Text:
    return Text(status.value, style=STATUS_STYLES[status])


def _when(value: datetime | None) -> str:
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if value else ""


def _short(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _status_json(status: DurableOrchestrationStatus) -> dict[str, Any]:
    out = status.to_json()
    if status.failure_details is not None:
        out["failureDetails"] = status.failure_details
    return out


def _print_status(status: DurableOrchestrationStatus) -> None:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    table.add_row("instance", Text(status.instance_id))
    table.add_row("name", Text(status.name))
    table.add_row("status", _styled(status.runtime_status))
    table.add_row("created", _when(status.created_time) + " UTC")
    table.add_row("last updated", _when(status.last_updated_time) + " UTC")
    for label, value in (("input", status.input_), ("output", status.output), ("custom status", status.custom_status)):
        if value is not None:
            table.add_row(label, Text(_short(json.dumps(value, ensure_ascii=False, default=str), 2000)))
    console.print(table)
    if status.failure_details is not None:
        _print_failure(status.failure_details)


def _print_failure(failure: dict[str, Any]) -> None:
    body = Text(f"{failure.get('ErrorType')}: {failure.get('Message')}", style="bold red")
    if failure.get("StackTrace"):
        body.append("\n\n" + str(failure["StackTrace"]).rstrip(), style="default")
    console.print(Panel(body, title="failure", title_align="left", border_style="red"))


# -- commands: instances --------------------------------------------------------------------------
@cli.command("list")
def list_instances(
    runtime_status: StatusOption = None,
    created_from: CreatedFromOption = None,
    created_to: CreatedToOption = None,
    prefix: PrefixOption = None,
    name: NameOption = None,
    page_size: Annotated[int, typer.Option("--page-size", "-n", min=1, help="Instances per page.")] = 50,
    continuation: Annotated[
        str | None, typer.Option("--continue", help="Show the page after the one that printed this token.")
    ] = None,
    every_page: Annotated[bool, typer.Option("--all", help="Every matching instance, not one page.")] = False,
    app_dir: AppDir = Path("."),
    task_hub: TaskHubOption = None,
    connection: ConnectionOption = None,
    as_json: JsonOption = False,
) -> None:
    """List instances (in instance id order), filtered by status, creation time, id prefix and orchestrator."""
    query = InstanceFilter.of(runtime_status, created_from, created_to, prefix, name)
    found, token = _with_hub(
        HubTarget(app_dir, task_hub, connection),
        lambda hub: query.page(hub.client, None if every_page else page_size, continuation),
    )
    if as_json:
        _emit_json({"instances": [_status_json(s) for s in found], "continuationToken": token})
        return
    if not found:
        console.print("No instances match.")
    else:
        wide = console.width >= 110  # room for the last-updated column too
        table = Table(box=box.SIMPLE_HEAD)
        table.add_column("instance id", overflow="fold")  # ids wrap rather than lose characters
        table.add_column("name", overflow="fold")
        table.add_column("status", no_wrap=True)
        table.add_column("created (UTC)", no_wrap=True)
        if wide:
            table.add_column("last updated (UTC)", no_wrap=True)
        for status in found:
            cells: list[Text | str] = [Text(status.instance_id), Text(status.name), _styled(status.runtime_status)]
            cells += [_when(status.created_time)] + ([_when(status.last_updated_time)] if wide else [])
            table.add_row(*cells)
        console.print(table)
    if token is not None:  # on stderr: stdout stays the table
        errors.print(f"More instances match: repeat with --continue {token}", soft_wrap=True, highlight=False)


@cli.command("start-new")
def start_new(
    orchestrator: Annotated[str, typer.Argument(help="The orchestrator function to start.")],
    input_json: Annotated[str | None, typer.Option("--input", "-i", help="The input, as JSON text.")] = None,
    instance_id: Annotated[
        str | None, typer.Option("--id", help="The instance id (default: a new random one).")
    ] = None,
    wait: Annotated[
        bool,
        typer.Option("--wait", help="Wait until it finishes (a worker must be running); exit 1 unless it completes."),
    ] = False,
    timeout: Annotated[float, typer.Option(help="Seconds --wait waits at most.")] = 60.0,
    app_dir: AppDir = Path("."),
    task_hub: TaskHubOption = None,
    connection: ConnectionOption = None,
    as_json: JsonOption = False,
) -> None:
    """Start an orchestration (as the client's start_new does) and print its instance id."""
    try:
        value = json.loads(input_json) if input_json is not None else None
    except ValueError as exc:
        raise _fail(f"--input is not JSON: {exc}", code=2) from exc

    async def run(hub: Hub) -> tuple[str, DurableOrchestrationStatus | None]:
        if not await _hub_exists(hub.backend):  # as a client binding does before its first use
            await hub.backend.create_task_hub()
            errors.print(f"Created task hub {hub.name}", highlight=False)
        started = await hub.client.start_new(orchestrator, instance_id, value)
        if not wait:
            return started, None
        try:
            return started, await hub.client.wait_for_completion(started, timeout=timeout, poll_interval=0.25)
        except TimeoutError:
            raise _fail(f"started {started}, which had not finished after {timeout:g} s") from None

    started, final = _with_hub(HubTarget(app_dir, task_hub, connection), run, must_exist=False)
    if as_json:
        _emit_json(_status_json(final) if final is not None else {"instanceId": started})
    elif final is not None:
        _print_status(final)
    else:
        console.print(f"Started {orchestrator}: {started}", highlight=False, soft_wrap=True)
    if final is not None and final.runtime_status is not OrchestrationRuntimeStatus.Completed:
        raise typer.Exit(1)


@cli.command()
def status(
    instance_id: str,
    app_dir: AppDir = Path("."),
    task_hub: TaskHubOption = None,
    connection: ConnectionOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show an instance's status: input, output, custom status and failure details."""
    found = _with_hub(
        HubTarget(app_dir, task_hub, connection), lambda hub: hub.client.get_status(instance_id, show_input=True)
    )
    if found is None:
        raise _fail(f"no instance with id {instance_id!r}")
    if as_json:
        _emit_json(_status_json(found))
    else:
        _print_status(found)


@cli.command()
def history(
    instance_id: str,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the history as JSON, the file format `durable replay --file` reads.")
    ] = False,
    events: Annotated[bool, typer.Option("--events", help="List every history event instead of the timeline.")] = False,
    app_dir: AppDir = Path("."),
    task_hub: TaskHubOption = None,
    connection: ConnectionOption = None,
) -> None:
    """Show an instance's history as a timeline of its activities, timers, sub-orchestrations and
    events (or every event with --events, or export it with --json)."""
    target = HubTarget(app_dir, task_hub, connection)
    if as_json:
        typer.echo(_stored_history(target, instance_id).to_json())
        return

    async def load(hub: Hub) -> tuple[DurableOrchestrationStatus | None, list[HistoryEvent]]:
        found = await hub.client.get_status(instance_id, show_input=False)
        return found, (await hub.backend.load_history(instance_id)).events if found is not None else []

    found, stored = _with_hub(target, load)
    if found is None:
        raise _fail(f"no instance with id {instance_id!r}")
    if not stored:
        console.print(f"{instance_id} has no history yet: it is {found.runtime_status.value}", highlight=False)
        return
    if stored[0].event_type is EventType.ENTITY_STATE:
        raise _fail(f"{instance_id!r} is an entity, which keeps no history: `durable status {instance_id}` shows it")
    title = Text.assemble(f"{found.name} {instance_id}: ", _styled(found.runtime_status))
    console.print(_events_table(stored, title) if events else _timeline(stored, title, console.width))
    if found.failure_details is not None:
        _print_failure(found.failure_details)


def _events_table(stored: list[HistoryEvent], title: Text) -> Table:
    table = Table(title=title)
    for column in ("#", "time", "event", "id"):  # never wrapped or cut short: detail gives way
        table.add_column(column, no_wrap=True)
    table.add_column("detail", ratio=1)
    for index, event in enumerate(stored):
        table.add_row(str(index), _clock(event.timestamp), event.event_type.value, _event_id(event), _detail(event))
    return table


def _clock(value: datetime) -> str:
    return value.strftime("%H:%M:%S.%f")[:-3]


def _event_id(event: HistoryEvent) -> str:
    if event.event_id >= 0:
        return f"EventId={event.event_id}"
    if event.task_scheduled_id is not None:
        return f"TaskScheduledId={event.task_scheduled_id}"
    if event.timer_id is not None:
        return f"TimerId={event.timer_id}"
    return ""


def _detail(event: HistoryEvent) -> Text:
    parts = [str(v) for v in (event.name, event.instance_id, event.fire_at, event.runtime_status) if v is not None]
    for label, value in (("input", event.input), ("result", event.result)):
        if value is not None:
            parts.append(f"{label}={_short(value)}")
    if event.failure is not None:
        parts.append(f"{event.failure.error_type}: {event.failure.message}")
    return Text(" ".join(parts))


OUTCOME_STYLES = {"completed": "green", "failed": "red", "running": "yellow", "instant": "cyan"}


def _timeline(stored: list[HistoryEvent], title: Text, width: int) -> Table:
    """The dashboard's timeline (one place decides what a bar is), drawn in characters."""
    from ._dashboard._timeline import build_timeline, format_duration

    timeline = build_timeline(stored, utcnow())
    assert timeline is not None  # the caller checked the history is not empty
    bar_width = max(10, min(40, (width - 60) // 2))
    wide = width >= 100  # room for the outcome in words and a detail column
    table = Table(title=title, box=box.SIMPLE_HEAD)
    table.add_column("kind", no_wrap=True)
    table.add_column("name", no_wrap=wide, overflow="fold")  # narrow: the detail goes under the name
    table.add_column("start", justify="right", no_wrap=True)
    table.add_column("took", justify="right", no_wrap=True)
    if wide:
        table.add_column("outcome", no_wrap=True)
    table.add_column(f"0 … {timeline.span}", no_wrap=True)
    if wide:
        table.add_column("detail", ratio=1, overflow="fold")  # the one column that gives way
    for row in timeline.rows:
        style = OUTCOME_STYLES.get(row.outcome, "default")
        detail = Text(_short(row.detail, 200))
        name = Text(row.label) if wide or not row.detail else Text.assemble(row.label, "\n", (detail.plain, "dim"))
        cells: list[Text | str] = [row.kind, name, "+" + format_duration(row.start - timeline.start), row.duration]
        cells += [Text(row.outcome, style=style)] if wide else []
        cells += [_bar(row.left, None if row.outcome == "instant" else row.width, bar_width, style)]
        table.add_row(*cells, *([detail] if wide else []))
    return table


def _bar(left: float, width: float | None, columns: int, style: str) -> Text:
    """A bar at ``left`` percent of an axis ``columns`` characters wide, ``width`` percent long
    (at least one character); None: a marker for an instant."""
    first = min(columns - 1, int(left * columns / 100))
    if width is None:
        return Text(" " * first + "◆", style=style)
    last = max(first, min(columns - 1, round((left + width) * columns / 100) - 1))
    return Text(" " * first + "━" * (last - first + 1), style=style)


# -- commands: acting on one instance -----------------------------------------------------------
ReasonOption = Annotated[str | None, typer.Option("--reason", "-r", help="Why (recorded in the history).")]


def _act(
    target: HubTarget,
    instance_id: str,
    verb: str,
    action: Callable[[DurableOrchestrationClient, DurableOrchestrationStatus], Awaitable[dict[str, Any] | None]],
    as_json: bool,
    refuse: Callable[[OrchestrationRuntimeStatus], str | None] = lambda _: None,
) -> None:
    """Check the instance exists and may be acted on (``refuse`` says why not), act, report."""

    async def run(hub: Hub) -> dict[str, Any]:
        found = await hub.client.get_status(instance_id, show_input=False)
        if found is None:
            raise _fail(f"no instance with id {instance_id!r}")
        reason = refuse(found.runtime_status)
        if reason is not None:
            raise _fail(f"instance {instance_id!r} is {found.runtime_status.value}: {reason}")
        extra = await action(hub.client, found)
        return {
            "instanceId": instance_id,
            "action": verb,
            "previousStatus": found.runtime_status.value,
            **(extra or {}),
        }

    report = _with_hub(target, run)
    if as_json:
        _emit_json(report)
        return
    line = f"{verb}: sent to {instance_id} (it was {report['previousStatus']})"
    if "newInstanceId" in report:
        line = f"{verb}: {instance_id} (it was {report['previousStatus']}) started again as {report['newInstanceId']}"
    console.print(line, highlight=False, soft_wrap=True)


def _unless_finished(status: OrchestrationRuntimeStatus) -> str | None:
    return "it has finished" if status.is_terminal else None


@cli.command("raise-event")
def raise_event(
    instance_id: str,
    event_name: str,
    data: Annotated[str | None, typer.Option("--data", help="The event's data, as JSON text.")] = None,
    app_dir: AppDir = Path("."),
    task_hub: TaskHubOption = None,
    connection: ConnectionOption = None,
    as_json: JsonOption = False,
) -> None:
    """Send an external event to an instance (what wait_for_external_event waits for)."""
    try:
        value = json.loads(data) if data is not None else None
    except ValueError as exc:
        raise _fail(f"--data is not JSON: {exc}", code=2) from exc

    async def send(client: DurableOrchestrationClient, _: DurableOrchestrationStatus) -> dict[str, Any]:
        await client.raise_event(instance_id, event_name, value)
        return {"eventName": event_name}

    _act(HubTarget(app_dir, task_hub, connection), instance_id, "raise-event", send, as_json, _unless_finished)


@cli.command()
def terminate(
    instance_id: str,
    reason: ReasonOption = None,
    app_dir: AppDir = Path("."),
    task_hub: TaskHubOption = None,
    connection: ConnectionOption = None,
    as_json: JsonOption = False,
) -> None:
    """Terminate an instance that has not finished."""

    async def send(client: DurableOrchestrationClient, _: DurableOrchestrationStatus) -> None:
        await client.terminate(instance_id, reason)

    _act(HubTarget(app_dir, task_hub, connection), instance_id, "terminate", send, as_json, _unless_finished)


@cli.command()
def suspend(
    instance_id: str,
    reason: ReasonOption = None,
    app_dir: AppDir = Path("."),
    task_hub: TaskHubOption = None,
    connection: ConnectionOption = None,
    as_json: JsonOption = False,
) -> None:
    """Suspend an instance: it takes messages but makes no progress until resumed."""

    def refuse(status: OrchestrationRuntimeStatus) -> str | None:
        if status is OrchestrationRuntimeStatus.Suspended:
            return "it is suspended already"
        return _unless_finished(status)

    async def send(client: DurableOrchestrationClient, _: DurableOrchestrationStatus) -> None:
        await client.suspend(instance_id, reason)

    _act(HubTarget(app_dir, task_hub, connection), instance_id, "suspend", send, as_json, refuse)


@cli.command()
def resume(
    instance_id: str,
    reason: ReasonOption = None,
    app_dir: AppDir = Path("."),
    task_hub: TaskHubOption = None,
    connection: ConnectionOption = None,
    as_json: JsonOption = False,
) -> None:
    """Resume a suspended instance."""

    def refuse(status: OrchestrationRuntimeStatus) -> str | None:
        return None if status is OrchestrationRuntimeStatus.Suspended else "only a suspended instance can be resumed"

    async def send(client: DurableOrchestrationClient, _: DurableOrchestrationStatus) -> None:
        await client.resume(instance_id, reason)

    _act(HubTarget(app_dir, task_hub, connection), instance_id, "resume", send, as_json, refuse)


@cli.command()
def rewind(
    instance_id: str,
    reason: ReasonOption = None,
    app_dir: AppDir = Path("."),
    task_hub: TaskHubOption = None,
    connection: ConnectionOption = None,
    as_json: JsonOption = False,
) -> None:
    """Rewind a failed instance: it retries the activity failures that ended it."""

    async def send(client: DurableOrchestrationClient, _: DurableOrchestrationStatus) -> None:
        await client.rewind(instance_id, reason or "")

    _act(HubTarget(app_dir, task_hub, connection), instance_id, "rewind", send, as_json)


@cli.command()
def restart(
    instance_id: str,
    new_id: Annotated[
        bool,
        typer.Option("--new-id/--same-id", help="Start under a new instance id, or reuse this one (once finished)."),
    ] = True,
    app_dir: AppDir = Path("."),
    task_hub: TaskHubOption = None,
    connection: ConnectionOption = None,
    as_json: JsonOption = False,
) -> None:
    """Start an instance's orchestrator again with the same input."""

    def refuse(status: OrchestrationRuntimeStatus) -> str | None:
        if new_id or status.is_terminal:
            return None
        return "it has not finished: terminate it first, or restart it under a new id"

    async def send(client: DurableOrchestrationClient, _: DurableOrchestrationStatus) -> dict[str, Any]:
        return {"newInstanceId": await client.restart(instance_id, restart_with_new_instance_id=new_id)}

    _act(HubTarget(app_dir, task_hub, connection), instance_id, "restart", send, as_json, refuse)


# -- purge ----------------------------------------------------------------------------------------
@dataclass
class PurgeReport:
    purged: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # instance id → why not

    def to_json(self) -> dict[str, Any]:
        return {"purged": len(self.purged), "purgedIds": self.purged, "refused": self.refused}


@cli.command()
def purge(
    instance_id: Annotated[str | None, typer.Argument(help="The instance to purge.")] = None,
    runtime_status: StatusOption = None,
    created_from: CreatedFromOption = None,
    created_to: CreatedToOption = None,
    prefix: PrefixOption = None,
    name: NameOption = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Also purge instances that have not finished and entities in use (their work is lost)."
        ),
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be purged; purge nothing.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Purge by filters without asking (in a terminal).")] = False,
    app_dir: AppDir = Path("."),
    task_hub: TaskHubOption = None,
    connection: ConnectionOption = None,
    as_json: JsonOption = False,
) -> None:
    """Delete the history and status of one instance, or of every finished instance that matches
    the filters. Instances that have not finished are never purged unless --force."""
    query = InstanceFilter.of(runtime_status, created_from, created_to, prefix, name)
    if (instance_id is None) == query.is_empty:
        raise _fail("give an instance id or filters (--status, --created-from, --created-to, --prefix, --name)", 2)
    target = HubTarget(app_dir, task_hub, connection)
    if instance_id is not None:
        report = _with_hub(target, lambda hub: _purge_one(hub, instance_id, force, dry_run))
        if not report.purged and not report.refused:
            raise _fail(f"no instance with id {instance_id!r}")  # as the HTTP API's 404
        if report.refused:
            raise _fail(f"{report.refused[instance_id]} (--force purges it anyway)")
    else:
        ask = not (yes or dry_run) and sys.stdin.isatty()  # a person at a terminal confirms; scripts do not
        report = _with_hub(
            target, lambda hub: _purge_matching(hub, query, force, dry_run, show_progress=not as_json, ask=ask)
        )
    if as_json:
        _emit_json({"dryRun": dry_run, **report.to_json()})
        return
    verb = "would be purged" if dry_run else "purged"
    console.print(f"{len(report.purged)} instance(s) {verb}", highlight=False)
    if report.refused:
        console.print(
            f"{len(report.refused)} not purged: they have not finished or are entities in use (--force purges them)",
            highlight=False,
            soft_wrap=True,
        )


async def _purge_one(hub: Hub, instance_id: str, force: bool, dry_run: bool) -> PurgeReport:
    found = await hub.client.get_status(instance_id, show_input=False)
    report = PurgeReport()
    if found is None:
        return report
    if dry_run:
        report.purged.append(instance_id)
    elif force:
        if await hub.backend.purge_instance(instance_id):
            report.purged.append(instance_id)
    else:
        try:
            if (await hub.client.purge_instance_history(instance_id)).instances_deleted:
                report.purged.append(instance_id)
        except PurgeRefused as exc:
            report.refused[instance_id] = str(exc)
    return report


async def _purge_matching(
    hub: Hub, query: InstanceFilter, force: bool, dry_run: bool, show_progress: bool, ask: bool = False
) -> PurgeReport:
    """Purge the matching instances, ``PURGE_CONCURRENCY`` at a time: each purge is a few
    requests that mostly wait on the network (the client's purge_instance_history_by goes one by
    one). Unless forced, each goes through the client's ``purge_instance_history``, which decides
    as that method does (it reads the row again: a terminal one may still be sending its outcome
    to its parent, protocol I8); the query's statuses only sort out the instances that are not
    terminal."""
    matching, _ = await query.page(hub.client, None)
    report = PurgeReport()
    candidates = []
    for status in matching:
        if force or status.runtime_status.is_terminal or is_entity_id(status.instance_id):
            candidates.append(status.instance_id)
        else:
            report.refused[status.instance_id] = f"it is {status.runtime_status.value}"
    if dry_run:
        report.purged.extend(candidates)
        return report
    if ask and candidates:
        typer.confirm(f"Purge {len(candidates)} instance(s) from task hub {hub.name}?", abort=True, err=True)
    gate = asyncio.Semaphore(PURGE_CONCURRENCY)
    with Progress(
        TextColumn("purging"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=errors, disable=not (show_progress and errors.is_terminal), transient=False,
    ) as progress:  # fmt: skip
        task = progress.add_task("purge", total=len(candidates))

        async def purge_one(instance_id: str) -> None:
            async with gate:
                try:
                    if force:
                        deleted = await hub.backend.purge_instance(instance_id)
                    else:
                        deleted = bool((await hub.client.purge_instance_history(instance_id)).instances_deleted)
                except PurgeRefused as exc:  # an entity in use, an outcome still being sent, a new start
                    report.refused[instance_id] = str(exc)
                else:
                    if deleted:
                        report.purged.append(instance_id)
                progress.advance(task)

        await asyncio.gather(*(purge_one(i) for i in candidates))
    return report


# -- replay -----------------------------------------------------------------------------------------
@cli.command()
def replay(
    instance_id: Annotated[
        str | None, typer.Argument(help="An instance whose stored history to replay (from APP_DIR's task hub).")
    ] = None,
    files: Annotated[
        list[Path] | None,
        typer.Option(
            "--file",
            "-f",
            exists=True,
            dir_okay=False,
            help="A history file from `durable history ID --json` (repeatable).",
        ),
    ] = None,
    app: Annotated[
        Path | None,
        typer.Option(
            exists=True, dir_okay=False, help="The Python file defining the app (default: APP_DIR/function_app.py)."
        ),
    ] = None,
    app_dir: AppDir = Path("."),
    task_hub: TaskHubOption = None,
    connection: ConnectionOption = None,
    as_json: JsonOption = False,
) -> None:
    """Replay histories against the app's current orchestrator code and report where it diverges.

    Exits with 0 when the code replays every history, 1 when it diverges from one, 2 on bad input."""
    if instance_id is None and not files:
        raise _fail("give an instance id or at least one --file", code=2)
    histories = [_read_history(path) for path in files or []]
    if instance_id is not None:
        histories.append(_stored_history(HubTarget(app_dir, task_hub, connection), instance_id, error_code=2))
    replayer = Replayer(_load_app(app or app_dir / "function_app.py", app_dir))
    results = replayer.replay_histories(histories)
    if as_json:
        _emit_json([_replay_json(result) for result in results])
    else:
        for result in results:
            _print_replay(result)
    if not all(result.ok for result in results):
        raise typer.Exit(1)


def _stored_history(target: HubTarget, instance_id: str, error_code: int = 1) -> ReplayHistory:
    return _with_hub(target, lambda hub: ReplayHistory.load(hub.backend, instance_id), error_code)


def _replay_json(result: ReplayResult) -> dict[str, Any]:
    return {
        "instanceId": result.instance_id,
        "name": result.name,
        "ok": result.ok,
        "message": result.message,
        "eventIndex": result.event_index,
        "event": result.event.to_dict() if result.event is not None else None,
        "error": result.error.to_dict() if result.error is not None else None,
    }


def _read_history(path: Path) -> ReplayHistory:
    try:
        return ReplayHistory.from_json(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as exc:
        raise _fail(f"{path}: {exc}", code=2) from exc


def _load_app(script: Path, app_dir: Path) -> Blueprint | FunctionRegistry:
    """The orchestrators a Python file defines: its DFApp's (as the worker indexes function_app.py),
    or, in a module without one, those of its Blueprints."""
    from ..runtime._registry import FunctionRegistry
    from ._app import Blueprint
    from ._functions import DFApp

    if not script.is_file():
        raise _fail(f"no {script.name} in {script.parent} (use --app to name the file defining the app)", code=2)
    try:
        for name, value in load_local_settings(app_dir).items():
            os.environ.setdefault(name, value)
    except SettingsError as exc:
        raise _fail(str(exc), code=2) from exc
    os.environ.setdefault("AzureWebJobsScriptRoot", str(app_dir.resolve()))
    folder = str(script.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(script.stem, script)
    if spec is None or spec.loader is None:
        raise _fail(f"cannot import {script}", code=2)
    module = importlib.util.module_from_spec(spec)
    sys.modules[script.stem] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise _fail(f"cannot load {script}: {type(exc).__name__}: {exc}", code=2) from exc
    values = list(vars(module).values())
    apps = [value for value in values if isinstance(value, DFApp)]
    if len(apps) > 1:
        raise _fail(f"{script} defines {len(apps)} DFApps; it must define one", code=2)
    if apps:
        return apps[0]
    blueprints = [value for value in values if isinstance(value, Blueprint)]
    if not blueprints:
        raise _fail(f"{script} defines no DFApp or Blueprint", code=2)
    registry = FunctionRegistry()
    try:
        for blueprint in blueprints:
            registry.merge(blueprint.durable_functions)
    except ValueError as exc:
        raise _fail(f"{script}: {exc}", code=2) from exc
    return registry


def _print_replay(result: ReplayResult) -> None:
    subject = escape(f"{result.name} ({result.instance_id})")
    if result.ok:
        console.print(f"[green]OK[/green] {escape(result.message)}", soft_wrap=True, highlight=False)
        return
    where = ""
    if result.event_index is not None and result.event is not None:
        where = f" at history event {result.event_index}: {escape(describe_event(result.event))}"
    console.print(f"[red]DIVERGED[/red] {subject}{where}", soft_wrap=True, highlight=False)
    if result.error is not None:
        console.print(
            f"  {escape(result.error.error_type)}: {escape(result.error.message)}", soft_wrap=True, highlight=False
        )


# -- task hubs --------------------------------------------------------------------------------------
hub_cli = typer.Typer(help="Inspect, create and delete task hubs.", no_args_is_help=True)
cli.add_typer(hub_cli, name="hub")


@hub_cli.command("list")
def hub_list(
    app_dir: AppDir = Path("."),
    connection: ConnectionOption = None,
    as_json: JsonOption = False,
) -> None:
    """List the task hubs in the storage account."""

    async def run(hub: Hub) -> list[str]:
        async with table_service_client(hub.backend.connection) as tables:
            names = {table.name async for table in tables.list_tables()}
        return sorted(n[: -len("Instances")] for n in names if n.endswith("Instances") and n[:-9] + "History" in names)

    names = _with_hub(HubTarget(app_dir, None, connection), run, must_exist=False)
    if as_json:
        _emit_json({"taskHubs": names})
    elif names:
        console.print("\n".join(names), highlight=False)
    else:
        console.print("No task hubs in this storage account.")


@dataclass
class HubInfo:
    name: str
    account: str
    partition_count: int
    tables: dict[str, int | None]  # rows (the Instances table) or -1 (not counted); None: missing
    queues: dict[str, int | None]  # approximate message count; None: missing
    containers: dict[str, bool]
    statuses: dict[str, int]  # orchestration instances by runtime status
    entities: int

    def to_json(self) -> dict[str, Any]:
        return {
            "taskHub": self.name,
            "account": self.account,
            "partitionCount": self.partition_count,
            "tables": {name: rows is not None for name, rows in self.tables.items()},
            "queues": self.queues,
            "containers": self.containers,
            "instances": self.statuses,
            "entities": self.entities,
        }


@hub_cli.command("info")
def hub_info(
    app_dir: AppDir = Path("."),
    task_hub: TaskHubOption = None,
    connection: ConnectionOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show a task hub: its tables, queues (with message counts) and instances by status."""
    info = _with_hub(HubTarget(app_dir, task_hub, connection), _describe_hub)
    if as_json:
        _emit_json(info.to_json())
        return
    console.print(
        f"Task hub [bold]{escape(info.name)}[/bold] in storage account {escape(info.account)}, "
        f"{info.partition_count} partition(s)",
        highlight=False,
    )
    resources = Table(box=box.SIMPLE_HEAD)
    resources.add_column("resource")
    resources.add_column("name", no_wrap=True)
    resources.add_column("holds", justify="right")
    for name, rows in info.tables.items():
        resources.add_row("table", name, "missing" if rows is None else "" if rows < 0 else f"{rows} rows")
    for name, count in info.queues.items():
        resources.add_row("queue", name, "missing" if count is None else f"{count} messages")
    for name, exists in info.containers.items():
        resources.add_row("container", name, "" if exists else "missing")
    console.print(resources)
    counts = Table(box=box.SIMPLE_HEAD)
    counts.add_column("status")
    counts.add_column("instances", justify="right")
    for status in OrchestrationRuntimeStatus:
        counts.add_row(_styled(status), str(info.statuses.get(status.value, 0)))
    counts.add_row("entities", str(info.entities))
    console.print(counts)


async def _describe_hub(hub: Hub) -> HubInfo:
    backend = hub.backend
    connection = backend.connection  # an identity-based one's credential is the backend's: closed with it
    statuses: dict[str, int] = {}
    entities = 0
    async with (
        table_service_client(connection) as tables,
        queue_service_client(connection) as queues,
        blob_service_client(connection) as blobs,
    ):
        instances = tables.get_table_client(backend.instances_table_name)
        async for row in instances.list_entities(select=["PartitionKey", "RuntimeStatus"]):
            if str(row["PartitionKey"]).startswith("@"):
                entities += 1
            else:
                status = str(row.get("RuntimeStatus"))
                statuses[status] = statuses.get(status, 0) + 1
        history_filter = f"TableName eq {odata_string(backend.history_table_name)}"
        history_exists = [t async for t in tables.query_tables(history_filter)] != []

        async def queue_length(name: str) -> int | None:
            try:
                properties = await queues.get_queue_client(name).get_queue_properties()
            except ResourceNotFoundError:
                return None
            return int(properties.approximate_message_count or 0)

        queue_names = [backend.physical_queue_name(q) for q in backend.logical_queues()]
        lengths = await asyncio.gather(*(queue_length(name) for name in queue_names))
        container_names = [backend.large_messages_container_name, backend.leases_container_name]
        found = await asyncio.gather(*(blobs.get_container_client(name).exists() for name in container_names))
        account = str(tables.account_name)
    return HubInfo(
        name=hub.name,
        account=account,
        partition_count=backend.partition_count,
        tables={
            backend.instances_table_name: entities + sum(statuses.values()),
            backend.history_table_name: -1 if history_exists else None,
        },
        queues=dict(zip(queue_names, lengths, strict=True)),
        containers=dict(zip(container_names, found, strict=True)),
        statuses=statuses,
        entities=entities,
    )


@hub_cli.command("create")
def hub_create(
    app_dir: AppDir = Path("."),
    task_hub: TaskHubOption = None,
    connection: ConnectionOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a task hub's tables, queues and containers (what `durable start` does on first run)."""

    async def run(hub: Hub) -> tuple[str, bool]:
        existed = await _hub_exists(hub.backend)
        await hub.backend.create_task_hub()  # also completes a hub that lost a queue or container
        return hub.name, not existed

    name, created = _with_hub(HubTarget(app_dir, task_hub, connection), run, must_exist=False)
    if as_json:
        _emit_json({"taskHub": name, "created": created})
    else:
        console.print(f"Task hub {name} {'created' if created else 'exists already'}", highlight=False)


@hub_cli.command("delete")
def hub_delete(
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Delete without asking.")] = False,
    app_dir: AppDir = Path("."),
    task_hub: TaskHubOption = None,
    connection: ConnectionOption = None,
    as_json: JsonOption = False,
) -> None:
    """Delete a task hub with every instance, history, message and payload in it."""
    target = HubTarget(app_dir, task_hub, connection)
    name = _address(target, 1)[1]
    if not yes:
        if not sys.stdin.isatty():
            raise _fail(f"deleting task hub {name} deletes all its instances: pass --yes to go ahead", code=2)
        typer.confirm(f"Delete task hub {name} and all its instances?", abort=True)

    async def run(hub: Hub) -> None:
        await hub.backend.delete_task_hub()

    _with_hub(target, run)
    if as_json:
        _emit_json({"taskHub": name, "deleted": True})
    else:
        console.print(f"Task hub {name} deleted", highlight=False)


@cli.command()
def dashboard(
    app_dir: AppDir = Path("."),
    task_hub: TaskHubOption = None,
    connection: ConnectionOption = None,
    port: Annotated[int, typer.Option(help="Port to serve the dashboard on (127.0.0.1 only).")] = 7072,
    master_key: Annotated[
        str | None, typer.Option(envvar="DURABLE_MASTER_KEY", help="Key the dashboard requires (admin).")
    ] = None,
) -> None:
    """Serve the web dashboard of a task hub on 127.0.0.1, without running the app (`durable start`
    serves it too, under /dashboard)."""
    from ._dashboard import serve_dashboard, standalone_client
    from ._host import AuthKeys

    storage_connection, hub_name = _locate(HubTarget(app_dir, task_hub, connection), 1)
    keys = AuthKeys(master_key=master_key)

    async def run() -> None:
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        async with standalone_client(app_dir, storage_connection, hub_name) as client:
            await serve_dashboard(client, port, lambda key: keys.allows("admin", key), stop)

    try:
        asyncio.run(run())
    except OSError as exc:
        raise _fail(f"cannot serve on port {port}: {exc.strerror or exc}") from exc
    except (SettingsError, ValueError) as exc:
        raise _fail(str(exc)) from exc


def main() -> None:
    cli()
