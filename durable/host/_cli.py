"""The ``durable`` command: run an app locally and inspect its instances."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from azure.core.exceptions import AzureError, ResourceNotFoundError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..core._status import OrchestrationRuntimeStatus
from ..runtime._client import DurableOrchestrationClient
from ..runtime._replayer import Replayer, ReplayHistory, ReplayResult, describe_event
from ._settings import HostSettings, SettingsError, load_local_settings

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
    port: Annotated[int, typer.Option(help="Port to serve HTTP triggers on (127.0.0.1 only).")] = 7071,
    function_key: Annotated[
        str | None, typer.Option(envvar="DURABLE_FUNCTION_KEY", help="Key required by function-level triggers.")
    ] = None,
    master_key: Annotated[
        str | None, typer.Option(envvar="DURABLE_MASTER_KEY", help="Key accepted everywhere; required by admin.")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Serve the app in APP_DIR like `func start`: HTTP triggers on 127.0.0.1, queue triggers polled."""
    from ._host import AuthKeys, HostError, LocalHost  # the HTTP server stack, only needed here

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="[%(asctime)s] %(name)s: %(message)s")
    logging.getLogger("azure").setLevel(logging.WARNING)
    host = LocalHost(app_dir, port=port, keys=AuthKeys(function_key, master_key))
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


def _with_backend(
    app_dir: Path, action: Callable[[AzureStorageBackend, HostSettings], Awaitable[T]], error_code: int = 1
) -> T:
    """Run ``action`` on the task hub of the app in ``app_dir`` (``host.json``, ``local.settings.json``)."""
    from storage.azure import AzureStorageBackend

    try:
        for name, value in load_local_settings(app_dir).items():
            os.environ.setdefault(name, value)
        settings = HostSettings.load(app_dir)
    except SettingsError as exc:
        raise _fail(str(exc), error_code) from exc
    os.environ.setdefault(settings.connection_setting, "UseDevelopmentStorage=true")

    async def run() -> T:
        backend = AzureStorageBackend(
            settings.connection_string(), task_hub=settings.hub_name, partition_count=settings.partition_count
        )
        try:
            return await action(backend, settings)
        finally:
            await backend.close()

    try:
        return asyncio.run(run())
    except ResourceNotFoundError as exc:
        raise _fail(f"task hub {settings.hub_name} not found in the storage account", error_code) from exc
    except AzureError as exc:
        raise _fail(f"storage request failed: {str(exc).splitlines()[0]}", error_code) from exc
    except (SettingsError, ValueError) as exc:
        raise _fail(str(exc), error_code) from exc


def _with_client(app_dir: Path, action: Callable[[DurableOrchestrationClient], Awaitable[T]]) -> T:
    return _with_backend(
        app_dir, lambda backend, settings: action(DurableOrchestrationClient(backend, task_hub_name=settings.hub_name))
    )


@cli.command()
def status(instance_id: str, app_dir: AppDir = Path(".")) -> None:
    """Print an instance's status as JSON."""
    found = _with_client(app_dir, lambda client: client.get_status(instance_id))
    if found is None:
        raise _fail(f"no instance with id {instance_id!r}")
    console.print_json(json.dumps(found.to_json(), default=str))


@cli.command()
def history(
    instance_id: str,
    app_dir: AppDir = Path("."),
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the history as JSON, the file format `durable replay --file` reads.")
    ] = False,
) -> None:
    """Show an instance's history as a timeline (or export it with --json)."""
    if as_json:
        typer.echo(_stored_history(app_dir, instance_id).to_json())
        return
    found = _with_client(
        app_dir, lambda client: client.get_status(instance_id, show_history=True, show_history_output=True)
    )
    if found is None or found.history is None:
        raise _fail(f"no instance with id {instance_id!r}")
    table = Table(title=f"{found.name} {instance_id}: {found.runtime_status.value}")
    for column in ("#", "time", "event", "id"):  # never wrapped or cut short: detail gives way
        table.add_column(column, no_wrap=True)
    table.add_column("detail", ratio=1)
    for index, event in enumerate(found.history):
        table.add_row(str(index), _time(event.get("Timestamp")), event["EventType"], _event_id(event), _detail(event))
    console.print(table)


def _time(value: Any) -> str:
    return datetime.fromisoformat(value).strftime("%H:%M:%S.%f")[:-3] if value else ""


def _event_id(event: dict[str, Any]) -> str:
    for key in ("EventId", "TaskScheduledId", "TimerId"):
        if key in event:
            return f"{key}={event[key]}"
    return ""


def _detail(event: dict[str, Any]) -> str:
    parts = [str(event[k]) for k in ("Name", "InstanceId", "FireAt", "OrchestrationStatus") if k in event]
    for key in ("Input", "Result"):
        if key in event:
            text = str(event[key])
            parts.append(f"{key.lower()}={text[:60]}{'…' if len(text) > 60 else ''}")
    if "FailureDetails" in event:
        failure = event["FailureDetails"]
        parts.append(f"{failure.get('ErrorType')}: {failure.get('Message')}")
    return " ".join(parts)


@cli.command()
def purge(
    instance_id: Annotated[str | None, typer.Argument(help="The instance to purge.")] = None,
    runtime_status: Annotated[
        list[OrchestrationRuntimeStatus] | None,
        typer.Option("--status", help="Purge every instance in this status (repeatable)."),
    ] = None,
    created_before: Annotated[datetime | None, typer.Option(help="Only instances created before this time.")] = None,
    app_dir: AppDir = Path("."),
) -> None:
    """Delete the history and status of one instance, or of every finished instance matching filters."""
    if instance_id is None and not runtime_status:
        raise _fail("give an instance id or at least one --status", code=2)
    if instance_id is not None:
        result = _with_client(app_dir, lambda client: client.purge_instance_history(instance_id))
        if result.instances_deleted == 0:  # as the HTTP API's 404
            raise _fail(f"no instance with id {instance_id!r}")
    else:
        result = _with_client(
            app_dir,
            lambda client: client.purge_instance_history_by(
                created_time_to=created_before, runtime_status=runtime_status
            ),
        )
    console.print(f"{result.instances_deleted} instance(s) purged")


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
) -> None:
    """Replay histories against the app's current orchestrator code and report where it diverges.

    Exits with 0 when the code replays every history, 1 when it diverges from one, 2 on bad input."""
    if instance_id is None and not files:
        raise _fail("give an instance id or at least one --file", code=2)
    histories = [_read_history(path) for path in files or []]
    if instance_id is not None:
        histories.append(_stored_history(app_dir, instance_id, error_code=2))
    replayer = Replayer(_load_app(app or app_dir / "function_app.py", app_dir))
    results = replayer.replay_histories(histories)
    for result in results:
        _print_replay(result)
    if not all(result.ok for result in results):
        raise typer.Exit(1)


def _stored_history(app_dir: Path, instance_id: str, error_code: int = 1) -> ReplayHistory:
    try:
        return _with_backend(app_dir, lambda backend, _: ReplayHistory.load(backend, instance_id), error_code)
    except LookupError as exc:  # no such instance
        raise _fail(str(exc), error_code) from exc


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


def main() -> None:
    cli()
