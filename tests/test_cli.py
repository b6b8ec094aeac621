"""The ``durable`` command's inspection tools (``status``, ``history``, ``purge``), run as
``python -m durable`` subprocesses against task hubs on the session's Azurite.

Instances are made in-process with ``DurableRuntime`` on an ``AzureStorageBackend`` whose task hub
is the one the app folder's ``host.json`` names, as ``durable start`` would make them."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

import durable as df
from storage.azure import AzureStorageBackend
from tests.fixtures_host import REPO_ROOT

bp = df.Blueprint()


@bp.orchestration_trigger(context_name="context")
def greet_twice(context: df.DurableOrchestrationContext):  # type: ignore[no-untyped-def]
    first = yield context.call_activity("cli_hello", context.get_input())
    second = yield context.call_activity("cli_hello", "again")
    return [first, second]


@bp.orchestration_trigger(context_name="context")
def fails(context: df.DurableOrchestrationContext):  # type: ignore[no-untyped-def]
    yield context.call_activity("cli_broken", None)


@bp.activity_trigger(input_name="name")
def cli_hello(name: str) -> str:
    return f"Hello {name}!"


@bp.activity_trigger(input_name="value")
def cli_broken(value: Any) -> None:
    raise ValueError("the activity is broken")


def make_app_dir(root: Path, hub: str) -> Path:
    app_dir = root / hub
    app_dir.mkdir()
    (app_dir / "host.json").write_text(
        json.dumps({"version": "2.0", "extensions": {"durableTask": {"hubName": hub}}}), encoding="utf-8"
    )
    return app_dir


def run_instances(azurite: str, hub: str, *runs: tuple[str, str, Any]) -> dict[str, str]:
    """Run (orchestrator, instance id, input) to completion on ``hub``; their final statuses."""

    async def main() -> dict[str, str]:
        backend = AzureStorageBackend(azurite, task_hub=hub)
        try:
            async with df.DurableRuntime(bp, backend, task_hub_name=hub) as runtime:
                client = runtime.client()
                for name, instance_id, value in runs:
                    await client.start_new(name, instance_id, value)
                finished = [await client.wait_for_completion(i, timeout=60) for _, i, _ in runs]
                return {s.instance_id: s.runtime_status.value for s in finished}
        finally:
            await backend.close()

    return asyncio.run(main())


def statuses(azurite: str, hub: str, *instance_ids: str) -> list[str | None]:
    """The instances' runtime statuses, read in-process (None: no such instance)."""

    async def main() -> list[str | None]:
        backend = AzureStorageBackend(azurite, task_hub=hub)
        try:
            client = df.DurableOrchestrationClient(backend, task_hub_name=hub)
            found = [await client.get_status(i) for i in instance_ids]
            return [None if s is None else s.runtime_status.value for s in found]
        finally:
            await backend.close()

    return asyncio.run(main())


def durable(*args: str, azurite: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "AzureWebJobsStorage": azurite, "COLUMNS": "100", **env}
    return subprocess.run(
        [sys.executable, "-m", "durable", *args],
        cwd=REPO_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def hub(azurite: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """An app folder whose task hub holds two completed instances and a failed one."""
    name = unique("CliHub")
    app_dir = make_app_dir(tmp_path_factory.mktemp("cli"), name)
    ids = {"done": unique("done-"), "failed": unique("failed-"), "wide": unique("wide-")}
    finished = run_instances(
        azurite, name, ("greet_twice", ids["done"], "Ann"), ("fails", ids["failed"], None),
        ("greet_twice", ids["wide"], LONG_INPUT),
    )  # fmt: skip
    assert finished == {ids["done"]: "Completed", ids["failed"]: "Failed", ids["wide"]: "Completed"}
    return app_dir, ids


LONG_INPUT = "word " * 80


def test_status_prints_json(hub: tuple[Path, dict[str, str]], azurite: str) -> None:
    app_dir, ids = hub
    result = durable("status", ids["done"], "--app-dir", str(app_dir), azurite=azurite)
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["instanceId"] == ids["done"]
    assert status["name"] == "greet_twice"
    assert status["runtimeStatus"] == "Completed"
    assert status["input"] == "Ann"
    assert status["output"] == ["Hello Ann!", "Hello again!"]
    assert status["createdTime"].endswith("Z")


def test_status_of_a_failed_instance(hub: tuple[Path, dict[str, str]], azurite: str) -> None:
    app_dir, ids = hub
    result = durable("status", ids["failed"], "-d", str(app_dir), azurite=azurite)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["runtimeStatus"] == "Failed"


def test_status_json_is_not_wrapped(hub: tuple[Path, dict[str, str]], azurite: str) -> None:
    app_dir, ids = hub
    result = durable("status", ids["wide"], "--app-dir", str(app_dir), azurite=azurite, COLUMNS="40")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["output"][0] == f"Hello {LONG_INPUT}!"


def test_status_of_an_unknown_instance(hub: tuple[Path, dict[str, str]], azurite: str) -> None:
    app_dir, _ = hub
    result = durable("status", "no-such-instance", "--app-dir", str(app_dir), azurite=azurite)
    assert result.returncode == 1
    assert "no instance with id 'no-such-instance'" in result.stderr
    assert result.stdout == ""  # stdout stays clean for `durable status ... | jq`


def test_history_lists_the_events(hub: tuple[Path, dict[str, str]], azurite: str) -> None:
    app_dir, ids = hub
    result = durable("history", ids["done"], "--app-dir", str(app_dir), azurite=azurite)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("│")]
    events = [cells[3].strip() for cells in (row.split("│") for row in rows) if cells[1].strip().isdigit()]
    assert [e for e in events if not e.startswith("Orchestrator")] == [
        "ExecutionStarted",
        "TaskScheduled",
        "TaskCompleted",
        "TaskScheduled",
        "TaskCompleted",
        "ExecutionCompleted",
    ]
    assert "OrchestratorStarted" in events
    assert f"greet_twice {ids['done']}: Completed" in result.stdout
    assert "TaskScheduledId=0" in result.stdout
    assert "TaskScheduledId=1" in result.stdout


def test_history_is_readable_in_a_narrow_terminal(hub: tuple[Path, dict[str, str]], azurite: str) -> None:
    app_dir, ids = hub
    result = durable("history", ids["done"], "--app-dir", str(app_dir), azurite=azurite, COLUMNS="80")
    assert result.returncode == 0, result.stderr
    for event in ("ExecutionStarted", "OrchestratorStarted", "OrchestratorCompleted", "ExecutionCompleted"):
        assert f"│ {event} " in result.stdout, event  # whole names, never cut short


def test_history_of_a_failed_instance(hub: tuple[Path, dict[str, str]], azurite: str) -> None:
    app_dir, ids = hub
    result = durable("history", ids["failed"], "--app-dir", str(app_dir), azurite=azurite, COLUMNS="200")
    assert result.returncode == 0, result.stderr
    assert "TaskFailed" in result.stdout
    assert "the activity is broken" in result.stdout
    assert ": Failed" in result.stdout


def test_history_of_an_unknown_instance(hub: tuple[Path, dict[str, str]], azurite: str) -> None:
    app_dir, _ = hub
    result = durable("history", "no-such-instance", "--app-dir", str(app_dir), azurite=azurite)
    assert result.returncode == 1
    assert "no instance with id 'no-such-instance'" in result.stderr


def test_purge_one_instance(azurite: str, tmp_path: Path) -> None:
    name = unique("CliPurge")
    app_dir = make_app_dir(tmp_path, name)
    run_instances(azurite, name, ("greet_twice", "gone", "x"), ("greet_twice", "kept", "y"))
    result = durable("purge", "gone", "--app-dir", str(app_dir), azurite=azurite)
    assert result.returncode == 0, result.stderr
    assert "1 instance(s) purged" in result.stdout
    after = durable("status", "gone", "--app-dir", str(app_dir), azurite=azurite)
    assert after.returncode == 1
    assert "no instance with id 'gone'" in after.stderr
    assert statuses(azurite, name, "gone", "kept") == [None, "Completed"]
    again = durable("purge", "gone", "--app-dir", str(app_dir), azurite=azurite)
    assert again.returncode == 1  # like the HTTP API's 404
    assert "no instance with id 'gone'" in again.stderr


def test_purge_by_status(azurite: str, tmp_path: Path) -> None:
    name = unique("CliPurgeAll")
    app_dir = make_app_dir(tmp_path, name)
    run_instances(azurite, name, ("greet_twice", "a", "1"), ("greet_twice", "b", "2"), ("fails", "c", None))
    result = durable("purge", "--status", "Completed", "--app-dir", str(app_dir), azurite=azurite)
    assert result.returncode == 0, result.stderr
    assert "2 instance(s) purged" in result.stdout
    gone = durable("status", "a", "--app-dir", str(app_dir), azurite=azurite)
    assert gone.returncode == 1
    assert "no instance with id 'a'" in gone.stderr
    assert statuses(azurite, name, "a", "b", "c") == [None, None, "Failed"]
    result = durable("purge", "--status", "Completed", "--status", "Failed", "-d", str(app_dir), azurite=azurite)
    assert (result.returncode, result.stdout.strip()) == (0, "1 instance(s) purged")
    assert statuses(azurite, name, "c") == [None]


def test_purge_never_deletes_a_running_instance(azurite: str, tmp_path: Path) -> None:
    name = unique("CliPurgeRunning")
    app_dir = make_app_dir(tmp_path, name)

    async def start_without_a_worker() -> None:
        backend = AzureStorageBackend(azurite, task_hub=name)
        try:
            await backend.create_task_hub()
            await df.DurableOrchestrationClient(backend, task_hub_name=name).start_new("greet_twice", "busy", "z")
        finally:
            await backend.close()

    asyncio.run(start_without_a_worker())  # Pending: not finished
    one = durable("purge", "busy", "--app-dir", str(app_dir), azurite=azurite)
    assert one.returncode == 1
    assert "only instances in a terminal state can be purged" in one.stderr and "Traceback" not in one.stderr
    by_status = durable("purge", "--status", "Pending", "--app-dir", str(app_dir), azurite=azurite)
    assert (by_status.returncode, by_status.stdout.strip()) == (0, "0 instance(s) purged")
    assert statuses(azurite, name, "busy") == ["Pending"]


def test_purge_without_arguments_is_a_usage_error(hub: tuple[Path, dict[str, str]], azurite: str) -> None:
    app_dir, _ = hub
    result = durable("purge", "--app-dir", str(app_dir), azurite=azurite)
    assert result.returncode == 2
    assert "give an instance id or at least one --status" in result.stderr


def test_purge_with_an_unknown_status_is_a_usage_error(hub: tuple[Path, dict[str, str]], azurite: str) -> None:
    app_dir, _ = hub
    result = durable("purge", "--status", "Finished", "--app-dir", str(app_dir), azurite=azurite)
    assert result.returncode == 2
    assert "Finished" in result.stderr


def test_hub_name_from_an_app_setting_in_local_settings(hub: tuple[Path, dict[str, str]], azurite: str) -> None:
    app_dir, ids = hub
    other = app_dir.parent / "indirect"
    other.mkdir()
    (other / "host.json").write_text('{"extensions": {"durableTask": {"hubName": "%CLI_HUB%"}}}')
    (other / "local.settings.json").write_text(json.dumps({"Values": {"CLI_HUB": app_dir.name}}))
    result = durable("status", ids["done"], "--app-dir", str(other), azurite=azurite)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["runtimeStatus"] == "Completed"


def test_malformed_host_json_is_an_error_not_a_traceback(azurite: str, tmp_path: Path) -> None:
    (tmp_path / "host.json").write_text('{"extensions": ')
    result = durable("status", "x", "--app-dir", str(tmp_path), azurite=azurite)
    assert result.returncode == 1
    assert "host.json" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_task_hub_is_an_error_not_a_traceback(azurite: str, tmp_path: Path) -> None:
    app_dir = make_app_dir(tmp_path, unique("NeverUsed"))
    status = durable("status", "x", "--app-dir", str(app_dir), azurite=azurite)
    assert status.returncode == 1
    assert "no instance with id 'x'" in status.stderr
    purge = durable("purge", "--status", "Completed", "--app-dir", str(app_dir), azurite=azurite)
    assert purge.returncode == 1
    assert f"task hub {app_dir.name} not found" in purge.stderr
    assert "Traceback" not in purge.stderr


def test_missing_app_dir_is_a_usage_error(azurite: str, tmp_path: Path) -> None:
    result = durable("status", "x", "--app-dir", str(tmp_path / "nowhere"), azurite=azurite)
    assert result.returncode == 2
    assert "does not exist" in result.stderr


def test_missing_connection_setting(tmp_path: Path) -> None:
    (tmp_path / "host.json").write_text(
        '{"extensions": {"durableTask": {"storageProvider": {"connectionStringName": "CliNoSuchSetting"}}}}'
    )
    environment = {k: v for k, v in os.environ.items() if k != "CliNoSuchSetting"}
    result = subprocess.run(
        [sys.executable, "-m", "durable", "status", "x", "--app-dir", str(tmp_path)],
        cwd=REPO_ROOT,
        env={**environment, "CliNoSuchSetting": ""},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "CliNoSuchSetting is not set" in result.stderr


def test_help_lists_the_commands() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "durable", "--help"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    for command in ("start", "status", "history", "purge", "replay"):
        assert command in result.stdout
