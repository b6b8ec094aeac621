"""The ``durable`` command's inspection tools (``list``, ``status``, ``history``, ``purge``, ``hub``)
and its errors, run as ``python -m durable`` subprocesses against task hubs on the session's Azurite.

Instances are made in-process with ``DurableRuntime`` on an ``AzureStorageBackend`` whose task hub
is the one the app folder's ``host.json`` names, as ``durable start`` would make them."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

import durable as df
from durable.host._azurite import connection_string, free_ports
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
    result = durable("status", ids["done"], "--json", "--app-dir", str(app_dir), azurite=azurite)
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["instanceId"] == ids["done"]
    assert status["name"] == "greet_twice"
    assert status["runtimeStatus"] == "Completed"
    assert status["input"] == "Ann"
    assert status["output"] == ["Hello Ann!", "Hello again!"]
    assert status["createdTime"].endswith("Z")


def test_status_as_a_table(hub: tuple[Path, dict[str, str]], azurite: str) -> None:
    app_dir, ids = hub
    result = durable("status", ids["done"], "--app-dir", str(app_dir), azurite=azurite)
    assert result.returncode == 0, result.stderr
    fields = dict(line.split(None, 1) for line in result.stdout.splitlines() if line.strip() and "  " in line)
    assert fields["instance"].strip() == ids["done"]
    assert fields["name"].strip() == "greet_twice"
    assert fields["status"].strip() == "Completed"
    assert fields["input"].strip() == '"Ann"'
    assert fields["output"].strip() == '["Hello Ann!", "Hello again!"]'


def test_status_of_a_failed_instance(hub: tuple[Path, dict[str, str]], azurite: str) -> None:
    app_dir, ids = hub
    result = durable("status", ids["failed"], "-d", str(app_dir), azurite=azurite, COLUMNS="200")
    assert result.returncode == 0, result.stderr
    assert "Failed" in result.stdout
    assert "failure" in result.stdout  # the panel with the error and its stack trace
    assert "ValueError: the activity is broken" in result.stdout
    assert "Traceback (most recent call last)" in result.stdout
    status = json.loads(durable("status", ids["failed"], "--json", "-d", str(app_dir), azurite=azurite).stdout)
    assert status["runtimeStatus"] == "Failed"
    assert status["failureDetails"]["ErrorType"] == "TaskFailedError"
    assert "the activity is broken" in status["failureDetails"]["Message"]


def test_status_json_is_not_wrapped(hub: tuple[Path, dict[str, str]], azurite: str) -> None:
    app_dir, ids = hub
    result = durable("status", ids["wide"], "--json", "--app-dir", str(app_dir), azurite=azurite, COLUMNS="40")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["output"][0] == f"Hello {LONG_INPUT}!"


def test_status_of_an_unknown_instance(hub: tuple[Path, dict[str, str]], azurite: str) -> None:
    app_dir, _ = hub
    result = durable("status", "no-such-instance", "--app-dir", str(app_dir), azurite=azurite)
    assert result.returncode == 1
    assert "no instance with id 'no-such-instance'" in result.stderr
    assert result.stdout == ""  # stdout stays clean for `durable status ... | jq`


def test_history_is_a_timeline(hub: tuple[Path, dict[str, str]], azurite: str) -> None:
    app_dir, ids = hub
    result = durable("history", ids["done"], "--app-dir", str(app_dir), azurite=azurite, COLUMNS="120")
    assert result.returncode == 0, result.stderr
    assert f"greet_twice {ids['done']}: Completed" in result.stdout
    rows = [line.split() for line in result.stdout.splitlines() if line.strip().startswith(("execution", "activity"))]
    assert [row[:2] for row in rows] == [
        ["execution", "greet_twice"],
        ["activity", "cli_hello"],
        ["activity", "cli_hello"],
    ]
    assert all("completed" in row and row[2].startswith("+") for row in rows)
    assert all(any(cell.startswith("━") for cell in row) for row in rows)  # each has a bar on the time axis


def test_history_timeline_of_a_failed_instance_in_a_narrow_terminal(
    hub: tuple[Path, dict[str, str]], azurite: str
) -> None:
    app_dir, ids = hub
    result = durable("history", ids["failed"], "--app-dir", str(app_dir), azurite=azurite, COLUMNS="80")
    assert result.returncode == 0, result.stderr
    lines = [line.strip() for line in result.stdout.splitlines()]
    activity = next(i for i, line in enumerate(lines) if line.startswith("activity"))
    assert lines[activity].split()[:2] == ["activity", "cli_broken"]
    assert lines[activity + 1] == "ValueError: the activity is broken"  # the detail, under the name
    assert "Traceback (most recent call last)" in result.stdout  # the failure panel
    assert all(len(line) <= 80 for line in result.stdout.splitlines())


def test_history_lists_the_events(hub: tuple[Path, dict[str, str]], azurite: str) -> None:
    app_dir, ids = hub
    result = durable("history", ids["done"], "--events", "--app-dir", str(app_dir), azurite=azurite)
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
    result = durable("history", ids["done"], "--events", "-d", str(app_dir), azurite=azurite, COLUMNS="80")
    assert result.returncode == 0, result.stderr
    for event in ("ExecutionStarted", "OrchestratorStarted", "OrchestratorCompleted", "ExecutionCompleted"):
        assert f"│ {event} " in result.stdout, event  # whole names, never cut short


def test_history_of_a_failed_instance(hub: tuple[Path, dict[str, str]], azurite: str) -> None:
    app_dir, ids = hub
    result = durable("history", ids["failed"], "--events", "-d", str(app_dir), azurite=azurite, COLUMNS="200")
    assert result.returncode == 0, result.stderr
    assert "TaskFailed" in result.stdout
    assert "the activity is broken" in result.stdout
    assert ": Failed" in result.stdout


def test_history_of_an_unknown_instance(hub: tuple[Path, dict[str, str]], azurite: str) -> None:
    app_dir, _ = hub
    result = durable("history", "no-such-instance", "--app-dir", str(app_dir), azurite=azurite)
    assert result.returncode == 1
    assert "no instance with id 'no-such-instance'" in result.stderr


def listed(app_dir: Path, azurite: str, *args: str) -> tuple[list[str], str | None]:
    """The instance ids and continuation token ``durable list ... --json`` prints."""
    result = durable("list", *args, "--json", "--app-dir", str(app_dir), azurite=azurite)
    assert result.returncode == 0, result.stderr
    page = json.loads(result.stdout)
    return [status["instanceId"] for status in page["instances"]], page["continuationToken"]


def test_list_as_a_table(hub: tuple[Path, dict[str, str]], azurite: str) -> None:
    app_dir, ids = hub
    result = durable("list", "--app-dir", str(app_dir), azurite=azurite, COLUMNS="120")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.strip()}
    assert rows["instance"][:4] == ["instance", "id", "name", "status"]
    assert rows[ids["done"]][1:3] == ["greet_twice", "Completed"]
    assert rows[ids["failed"]][1:3] == ["fails", "Failed"]
    assert ids["wide"] in rows


def test_list_filters(hub: tuple[Path, dict[str, str]], azurite: str) -> None:
    app_dir, ids = hub
    everything = sorted(ids.values())
    assert listed(app_dir, azurite, "--status", "failed") == ([ids["failed"]], None)
    both = listed(app_dir, azurite, "-s", "Completed", "-s", "Failed", "--name", "greet_twice")
    assert both == (sorted([ids["done"], ids["wide"]]), None)
    assert listed(app_dir, azurite, "--prefix", "done-") == ([ids["done"]], None)
    assert listed(app_dir, azurite, "--created-from", "1h", "--created-to", "2999-01-01")[0] == everything
    assert listed(app_dir, azurite, "--created-from", "2999-01-01T00:00:00+02:00")[0] == []
    widest = listed(app_dir, azurite, "--created-from", "0001-01-01T00:00:00Z", "--created-to", "9999-12-31T23:59:59Z")
    assert widest == (everything, None)  # bounds beyond what storage can hold filter nothing


def test_list_pages(hub: tuple[Path, dict[str, str]], azurite: str) -> None:
    app_dir, ids = hub
    everything = sorted(ids.values())
    first = durable("list", "-n", "2", "--app-dir", str(app_dir), azurite=azurite, COLUMNS="120")
    assert first.returncode == 0, first.stderr
    shown = [line.split()[0] for line in first.stdout.splitlines() if line.strip().startswith(tuple(everything))]
    assert shown == everything[:2]
    hint = "More instances match: repeat with --continue "
    assert hint in first.stderr
    token = first.stderr.split(hint)[1].split()[0]
    assert listed(app_dir, azurite, "-n", "2", "--continue", token) == (everything[2:], None)
    assert listed(app_dir, azurite, "--page-size", "1", "--all") == (everything, None)


def test_list_with_bad_filters_is_a_usage_error(hub: tuple[Path, dict[str, str]], azurite: str) -> None:
    app_dir, _ = hub
    result = durable("list", "--created-from", "yesterday", "--app-dir", str(app_dir), azurite=azurite)
    assert result.returncode == 2
    assert "--created-from: 'yesterday' is not a time" in result.stderr


def test_purge_one_instance(azurite: str, tmp_path: Path) -> None:
    name = unique("CliPurge")
    app_dir = make_app_dir(tmp_path, name)
    run_instances(azurite, name, ("greet_twice", "gone", "x"), ("greet_twice", "kept", "y"))
    result = durable("purge", "gone", "--app-dir", str(app_dir), azurite=azurite)
    assert result.returncode == 0, result.stderr
    assert "1 instance(s) purged" in result.stdout
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
    assert statuses(azurite, name, "a", "b", "c") == [None, None, "Failed"]
    result = durable("purge", "--status", "Completed", "--status", "Failed", "-d", str(app_dir), azurite=azurite)
    assert (result.returncode, result.stdout.strip()) == (0, "1 instance(s) purged")
    assert statuses(azurite, name, "c") == [None]


def at_a_terminal(answer: str, *args: str, azurite: str) -> subprocess.CompletedProcess[str]:
    """Run ``durable`` with a terminal as its stdin, on which ``answer`` is typed."""
    typing_end, terminal = pty.openpty()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "durable", *args], cwd=REPO_ROOT, stdin=terminal, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env={**os.environ, "AzureWebJobsStorage": azurite, "COLUMNS": "100"},
        )  # fmt: skip
        os.write(typing_end, answer.encode())
        out, err = process.communicate(timeout=60)
    finally:
        os.close(typing_end)
        os.close(terminal)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def test_purge_by_filters_asks_at_a_terminal(azurite: str, tmp_path: Path) -> None:
    name = unique("CliPurgeAsk")
    app_dir = make_app_dir(tmp_path, name)
    run_instances(azurite, name, ("greet_twice", "a", "1"), ("greet_twice", "b", "2"))
    declined = at_a_terminal("n\n", "purge", "--status", "Completed", "-d", str(app_dir), azurite=azurite)
    assert declined.returncode == 1
    assert f"Purge 2 instance(s) from task hub {name}? [y/N]" in declined.stderr and "Aborted" in declined.stderr
    assert statuses(azurite, name, "a", "b") == ["Completed", "Completed"]
    accepted = at_a_terminal("y\n", "purge", "--status", "Completed", "-d", str(app_dir), azurite=azurite)
    assert (accepted.returncode, accepted.stdout.strip()) == (0, "2 instance(s) purged"), accepted.stderr
    assert statuses(azurite, name, "a", "b") == [None, None]


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
    unstarted = durable("history", "busy", "--app-dir", str(app_dir), azurite=azurite)
    assert (unstarted.returncode, unstarted.stdout.strip()) == (0, "busy has no history yet: it is Pending")
    one = durable("purge", "busy", "--app-dir", str(app_dir), azurite=azurite)
    assert one.returncode == 1
    assert "only instances in a terminal state can be purged" in one.stderr and "Traceback" not in one.stderr
    assert "--force purges it anyway" in one.stderr
    by_status = durable("purge", "--status", "Pending", "--json", "--app-dir", str(app_dir), azurite=azurite)
    assert by_status.returncode == 0, by_status.stderr
    assert json.loads(by_status.stdout) == {
        "dryRun": False, "purged": 0, "purgedIds": [], "refused": {"busy": "it is Pending"}
    }  # fmt: skip
    assert statuses(azurite, name, "busy") == ["Pending"]
    forced = durable("purge", "--status", "Pending", "--force", "--app-dir", str(app_dir), azurite=azurite)
    assert (forced.returncode, forced.stdout.strip()) == (0, "1 instance(s) purged")
    assert statuses(azurite, name, "busy") == [None]


def test_purge_many_at_once_with_a_progress_bar(azurite: str, tmp_path: Path) -> None:
    name = unique("CliPurgeMany")
    app_dir = make_app_dir(tmp_path, name)
    ids = [f"many-{i:02d}" for i in range(40)]
    run_instances(azurite, name, *(("greet_twice", i, i) for i in ids), ("fails", "other", None))
    dry = durable("purge", "--prefix", "many-", "--dry-run", "--json", "--app-dir", str(app_dir), azurite=azurite)
    assert dry.returncode == 0, dry.stderr
    assert sorted(json.loads(dry.stdout)["purgedIds"]) == ids
    assert statuses(azurite, name, ids[0]) == ["Completed"]  # a dry run purges nothing
    result = durable(
        "purge", "--prefix", "many-", "--status", "Completed", "--app-dir", str(app_dir), azurite=azurite,
        TTY_COMPATIBLE="1",  # stderr counts as a terminal: the progress bar is drawn
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("40 instance(s) purged")
    assert "purging" in result.stderr and "40/40" in result.stderr
    assert statuses(azurite, name, *ids, "other") == [None] * 40 + ["Failed"]


def test_purge_without_arguments_is_a_usage_error(hub: tuple[Path, dict[str, str]], azurite: str) -> None:
    app_dir, _ = hub
    result = durable("purge", "--app-dir", str(app_dir), azurite=azurite)
    assert result.returncode == 2
    assert "give an instance id or filters" in result.stderr


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
    result = durable("status", ids["done"], "--json", "--app-dir", str(other), azurite=azurite)
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
    for command in (["status", "x"], ["purge", "--status", "Completed"]):
        result = durable(*command, "--app-dir", str(app_dir), azurite=azurite)
        assert result.returncode == 1
        assert f"task hub {app_dir.name} not found in the storage account" in result.stderr
        assert "Traceback" not in result.stderr


def test_storage_emulator_down_is_an_error_that_says_how_to_start_it(tmp_path: Path) -> None:
    (tmp_path / "host.json").write_text("{}")
    ports = free_ports(3)
    result = durable("list", "--app-dir", str(tmp_path), azurite=connection_string(*ports))
    assert result.returncode == 1
    assert f"cannot connect to the storage emulator at 127.0.0.1:{ports[2]}: Azurite is not running" in result.stderr
    assert "npx azurite" in result.stderr
    assert "Traceback" not in result.stderr


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
    for command in ("start", "list", "start-new", "status", "history", "raise-event", "terminate", "suspend", "resume",
                    "rewind", "restart", "purge", "replay", "hub"):  # fmt: skip
        assert f" {command} " in result.stdout, command


def test_hub_create_info_list_and_delete(azurite: str, tmp_path: Path) -> None:
    name = unique("CliHubLife")
    app_dir = make_app_dir(tmp_path, name)

    def hub(*args: str) -> subprocess.CompletedProcess[str]:
        return durable("hub", *args, "--app-dir", str(app_dir), azurite=azurite, COLUMNS="120")

    assert "Traceback" not in (missing := hub("info")).stderr and missing.returncode == 1
    assert (created := hub("create", "--json")).returncode == 0, created.stderr
    assert json.loads(created.stdout) == {"taskHub": name, "created": True}
    assert "exists already" in hub("create").stdout
    assert name in json.loads(hub("list", "--json").stdout)["taskHubs"]
    run_instances(azurite, name, ("greet_twice", "h1", "x"), ("fails", "h2", None))
    info = json.loads(hub("info", "--json").stdout)
    assert info["taskHub"] == name and info["partitionCount"] == 4
    assert info["instances"] == {"Completed": 1, "Failed": 1}
    assert info["tables"] == {f"{name}Instances": True, f"{name}History": True}
    queues = ("control-00", "control-01", "control-02", "control-03", "workitems", "poison")
    assert set(info["queues"]) == {f"{name.lower()}-{queue}" for queue in queues}
    assert all(count == 0 for count in info["queues"].values())
    table = hub("info").stdout
    assert f"{name}Instances" in table and "2 rows" in table and f"{name.lower()}-workitems" in table
    refused = hub("delete")  # stdin is not a terminal: no one to ask
    assert refused.returncode == 2 and "pass --yes" in refused.stderr
    assert statuses(azurite, name, "h1") == ["Completed"]
    assert hub("delete", "--yes").returncode == 0
    assert name not in json.loads(hub("list", "--json").stdout)["taskHubs"]


def test_task_hub_and_connection_flags(hub: tuple[Path, dict[str, str]], azurite: str, tmp_path: Path) -> None:
    app_dir, ids = hub
    (tmp_path / "host.json").write_text("{}")  # would mean DurableHub on UseDevelopmentStorage=true
    result = subprocess.run(
        [sys.executable, "-m", "durable", "status", ids["done"], "--json", "--app-dir", str(tmp_path),
         "--task-hub", app_dir.name, "--connection-string", azurite],
        cwd=REPO_ROOT, env={k: v for k, v in os.environ.items() if k != "AzureWebJobsStorage"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["runtimeStatus"] == "Completed"
    bad = durable("status", "x", "--task-hub", "no_such-hub", "--app-dir", str(tmp_path), azurite=azurite)
    assert bad.returncode == 1 and "invalid task hub name 'no_such-hub'" in bad.stderr


def test_replay_as_json() -> None:
    """A recorded history replayed against the code that recorded it, reported for scripts."""
    result = subprocess.run(
        [sys.executable, "-m", "durable", "replay", "-f", "tests/histories/activity_chain.json", "--json",
         "--app", "tests/histories/orchestrators.py"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    [report] = json.loads(result.stdout)
    assert report["ok"] is True and (report["instanceId"], report["name"]) == ("chain-1", "chain")
    assert report["message"] == "chain (chain-1): replayed 16 events, ends Completed"
    assert report["error"] is None
