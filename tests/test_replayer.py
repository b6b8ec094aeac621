"""``Replayer``: the checked-in histories of ``tests/histories`` replayed against the code they were
recorded with (they must pass) and against changed code (each change must be reported, naming the
history event and the new action), plus ``durable replay`` and ``durable history --json``."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import durable as df
from durable import EventType, Replayer, ReplayHistory
from tests.fixtures_host import REPO_ROOT
from tests.histories import orchestrators as code
from tests.histories.regenerate import regenerate

HISTORIES = Path(__file__).parent / "histories"
S = df.OrchestrationRuntimeStatus


def load(stem: str) -> ReplayHistory:
    return ReplayHistory.from_json((HISTORIES / f"{stem}.json").read_text(encoding="utf-8"))


# -- the recorded code replays every fixture -------------------------------------------------------------
# file -> how the recorded execution ended (Running: still in progress)
RECORDED = {
    "activity_chain": S.Completed,
    "activity_chain_inline": S.Completed,
    "fan_out_fan_in": S.Completed,
    "timer_and_event": S.Completed,
    "awaiting_approval": S.Running,
    "continue_as_new": S.Completed,
    "rewind": S.Completed,
    "failed_activity": S.Failed,
    "critical_section": S.Completed,
    "terminated_in_critical_section": S.Terminated,
    "sub_orchestration": S.Completed,
    "sub_orchestration_child": S.Completed,
}


def test_every_fixture_has_a_verdict() -> None:
    assert sorted(p.stem for p in HISTORIES.glob("*.json")) == sorted(RECORDED)


@pytest.mark.parametrize(("stem", "status"), RECORDED.items(), ids=list(RECORDED))
def test_fixture_replays_against_the_recorded_code(stem: str, status: df.OrchestrationRuntimeStatus) -> None:
    history = load(stem)
    result = Replayer(code.bp).replay_history(history)
    assert result.ok, result.message
    assert result.error is None and result.event_index is None
    assert (result.instance_id, result.name) == (history.instance_id, history.name)
    assert result.recorded_status is status
    assert result.replayed_status is status
    assert result.events == len(history.events)


def test_fixtures_hold_their_scenarios() -> None:
    """Each file records what its name says (so the tables here test what they claim to)."""

    def types(stem: str) -> list[EventType]:
        return [e.event_type for e in load(stem).events]

    assert sum(1 for e in load("fan_out_fan_in").events if e.event_type is EventType.TASK_SCHEDULED) == 6
    assert {EventType.TIMER_CREATED, EventType.TIMER_FIRED, EventType.EVENT_RAISED} <= set(types("timer_and_event"))
    assert EventType.EXECUTION_COMPLETED not in types("awaiting_approval")
    counter = load("continue_as_new").events
    started = next(i for i, e in enumerate(counter) if e.event_type is EventType.EXECUTION_STARTED)
    assert counter[started].input == "3"  # a later execution, not the first
    assert counter[started + 1].event_type is EventType.EVENT_RAISED  # the event carried over into it
    rewound = types("rewind")
    assert EventType.EXECUTION_REWOUND in rewound and EventType.TASK_FAILED not in rewound
    sent = [e.name for e in load("critical_section").events if e.event_type is EventType.EVENT_SENT]
    assert sent == ["lock", "get", "get", "set", "set", "release", "release", "audit", "retire", "retire"]
    assert EventType.EXECUTION_TERMINATED in types("terminated_in_critical_section")
    assert EventType.SUB_ORCHESTRATION_CREATED in types("sub_orchestration")
    assert load("sub_orchestration_child").events[1].parent_instance_id == "parent-1"
    failed = load("failed_activity").events[-1]
    assert failed.runtime_status == "Failed" and failed.failure is not None
    assert failed.failure.error_type == "TaskFailedError"


# -- changed code -----------------------------------------------------------------------------------------
# (file, orchestrator, changed code, index of the event where they part, fragments of the message)
DIVERGENT: list[tuple[str, str, Callable[..., Any], int, list[str]]] = [
    ("activity_chain", "chain", code.chain_with_renamed_activity, 6,
     ["history event TaskScheduled 'hello' #1", "new action TaskScheduled 'greet' #1"]),
    ("activity_chain", "chain", code.chain_with_added_activity, 6,
     ["history event TaskScheduled 'hello' #1", "new action TaskScheduled 'audit' #1"]),
    ("activity_chain", "chain", code.chain_with_appended_activity, 14,
     ["new action TaskScheduled 'audit' #3", "history does not have"]),
    ("activity_chain", "chain", code.chain_without_last_activity, 10,
     ["history event TaskScheduled 'hello' #2 has no matching action", "code ended (Completed) before taking it"]),
    ("activity_chain_inline", "chain", code.chain_with_renamed_activity, 6,
     ["history event TaskScheduled 'hello' #1", "new action TaskScheduled 'greet' #1"]),
    ("activity_chain_inline", "chain", code.chain_without_last_activity, 10,
     ["history event TaskScheduled 'hello' #2 has no matching action"]),
    ("fan_out_fan_in", "fan_out", code.fan_out_dropping_one, 6,
     ["history event TaskScheduled 'square' #4 has no matching action"]),
    ("timer_and_event", "approval", code.approval_with_activity_for_timer, 2,
     ["history event TimerCreated", "#0 does not match", "new action TaskScheduled 'cool_off' #0"]),
    ("timer_and_event", "approval", code.approval_without_cooling_off, 6,
     ["history event TimerCreated #1 has no matching action"]),
    ("awaiting_approval", "approval", code.approval_with_activity_for_timer, 2,
     ["history event TimerCreated", "new action TaskScheduled 'cool_off' #0"]),
    ("awaiting_approval", "approval", code.approval_without_waiting, 5,
     ["keeps the execution running after event TimerFired for #0", "code ends it there (Completed)"]),
    ("continue_as_new", "counter", code.counter_with_renamed_activity, 3,
     ["history event TaskScheduled 'add' #0", "new action TaskScheduled 'sum' #0"]),
    ("continue_as_new", "counter", code.counter_without_end, 8,
     ["ExecutionCompleted (Completed)", "ends it by continuing as new"]),
    ("rewind", "rewound", code.rewound_with_renamed_retry, 6,
     ["history event TaskScheduled 'flaky' #1", "new action TaskScheduled 'reliable' #1"]),
    ("failed_activity", "failing", code.failing_now_handled, 11,
     ["ExecutionCompleted (Failed)", "ends the execution Failed", "code ends it Completed"]),
    ("failed_activity", "failing", code.failing_now_waits, 11,
     ["ExecutionCompleted (Failed) ends the execution Failed", "does not end there: it is still waiting"]),
    ("critical_section", "transfer", code.transfer_without_lock, 2,
     ["history event EventSent 'lock'", "new action EventSent 'get'"]),
    ("critical_section", "transfer", code.transfer_without_audit, 24,
     ["history event EventSent 'audit' to @account@b #7"]),
    ("sub_orchestration", "parent", code.parent_with_renamed_child, 2,
     ["history event SubOrchestrationInstanceCreated 'child'", "new action SubOrchestrationInstanceCreated 'kid'"]),
    ("sub_orchestration_child", "child", code.child_with_timer, 2,
     ["history event TaskScheduled 'hello' #0", "new action TimerCreated", "#0"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("stem", "name", "changed", "index", "fragments"),
    DIVERGENT,
    ids=[f"{stem}-{changed.__name__}" for stem, _, changed, _, _ in DIVERGENT],
)
def test_changed_code_is_reported(
    stem: str, name: str, changed: Callable[..., Any], index: int, fragments: list[str]
) -> None:
    history = load(stem)
    result = Replayer({name: changed}).replay_history(history)
    assert not result.ok
    assert result.error is not None and result.error.error_type == "NonDeterminismError"
    assert result.error.stack_trace is None
    for fragment in fragments:
        assert fragment in result.error.message, result.error.message
    assert result.event_index == index, result.message
    assert result.event is history.events[index]
    assert f"at history event {index} (" in result.message
    assert result.recorded_status is RECORDED[stem]
    with pytest.raises(df.NonDeterminismError, match="NonDeterminismError at history event"):
        result.raise_on_failure()


# Changes that keep the actions (inputs, outputs, a timer's due time, code past where the history ends).
COMPATIBLE = [
    ("activity_chain", "chain", code.chain_with_changed_inputs),
    ("timer_and_event", "approval", code.approval_with_longer_deadline),
    ("awaiting_approval", "approval", code.approval_with_longer_deadline),
    ("terminated_in_critical_section", "guarded", code.guarded_changed_after_the_wait),
]


@pytest.mark.parametrize(("stem", "name", "changed"), COMPATIBLE, ids=[f"{s}-{c.__name__}" for s, _, c in COMPATIBLE])
def test_changes_that_keep_the_actions_replay(stem: str, name: str, changed: Callable[..., Any]) -> None:
    result = Replayer({name: changed}).replay_history(load(stem))
    assert result.ok, result.message
    result.raise_on_failure()  # does not raise


def test_a_history_that_ended_failed_replays_when_the_code_fails_again() -> None:
    history = load("failed_activity")
    assert history.recorded_status is S.Failed
    result = Replayer(code.bp).replay_history(history)
    assert result.ok and result.error is None
    assert result.replayed_status is S.Failed
    assert "ends Failed" in result.message


def test_unregistered_orchestrator() -> None:
    result = Replayer({"something_else": code.chain}).replay_history(load("activity_chain"))
    assert not result.ok
    assert result.error is not None and result.error.error_type == "FunctionNotFound"
    assert "no orchestrator function named 'chain'" in result.error.message
    assert result.event_index == 1 and result.event is not None
    assert result.event.event_type is EventType.EXECUTION_STARTED
    with pytest.raises(df.FunctionNotFound):
        result.raise_on_failure()


def test_an_edited_history_is_caught() -> None:
    """The verdict comes from the history's content: rename an activity in the recorded JSON."""
    data = json.loads((HISTORIES / "activity_chain.json").read_text(encoding="utf-8"))
    for event in data["events"]:
        if event.get("EventId") == 2 and event["EventType"] == "TaskScheduled":
            event["Name"] = "hola"
    result = Replayer(code.bp).replay_history(ReplayHistory.from_json(data))
    assert not result.ok
    assert result.error is not None
    assert "history event TaskScheduled 'hola' #2" in result.error.message
    assert "new action TaskScheduled 'hello' #2" in result.error.message


def test_replay_histories_reports_every_history() -> None:
    replayer = Replayer({"chain": code.chain_with_renamed_activity, "fan_out": code.fan_out})
    stems = ["activity_chain", "fan_out_fan_in", "activity_chain_inline", "sub_orchestration"]
    results = replayer.replay_histories(load(stem) for stem in stems)
    assert [r.instance_id for r in results] == ["chain-1", "fan-out-1", "chain-inline-1", "parent-1"]
    assert [r.ok for r in results] == [False, True, False, False]
    assert results[3].error is not None and results[3].error.error_type == "FunctionNotFound"


@pytest.mark.parametrize("kind", ["app", "blueprint", "registry", "mapping"])
def test_replayer_takes_apps_blueprints_registries_and_mappings(kind: str) -> None:
    functions: Any
    if kind == "app":
        functions = df.DFApp()
        functions.register_functions(code.bp)
    elif kind == "blueprint":
        functions = code.bp
    elif kind == "registry":
        functions = code.bp.durable_functions
    else:
        functions = {"chain": code.chain}
    assert Replayer(functions).replay_history(load("activity_chain")).ok


def test_replayer_rejects_other_things() -> None:
    with pytest.raises(TypeError, match="expected a DFApp"):
        Replayer([code.chain])  # type: ignore[arg-type]


# -- the file format --------------------------------------------------------------------------------------
def test_json_round_trip() -> None:
    history = load("critical_section")
    again = ReplayHistory.from_json(history.to_json())
    assert again == history
    assert ReplayHistory.from_json(history.to_dict()) == history
    assert json.loads(history.to_json(indent=None)) == history.to_dict()
    assert history.to_dict()["events"][1] == history.events[1].to_dict()


def test_instance_id_and_name_default_to_the_execution_started_event() -> None:
    data = load("sub_orchestration_child").to_dict()
    del data["instanceId"], data["name"]
    history = ReplayHistory.from_json(json.dumps(data))
    assert (history.instance_id, history.name) == ("parent-1-child", "child")


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("not json", "not a JSON history"),
        ("[]", 'an "events" list'),
        ('{"events": {}}', 'an "events" list'),
        ('{"events": [{"Timestamp": "2026-01-01T00:00:00+00:00"}]}', "malformed history event"),
        ('{"events": [{"EventType": "Nope", "Timestamp": "2026-01-01T00:00:00+00:00"}]}', "malformed history event"),
        ('{"events": [{"EventType": "OrchestratorStarted", "Timestamp": "2026-01-01T00:00:00+00:00"}]}',
         "needs an ExecutionStarted event"),
    ],
)  # fmt: skip
def test_malformed_histories(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        ReplayHistory.from_json(text)


def test_name_must_match_the_history() -> None:
    data = load("activity_chain").to_dict()
    data["name"] = "fan_out"
    with pytest.raises(ValueError, match="is of orchestrator 'chain', not 'fan_out'"):
        ReplayHistory.from_json(data)


# -- histories from a backend ------------------------------------------------------------------------------
async def test_load_from_a_backend(make_runtime: Callable[..., df.DurableRuntime]) -> None:
    runtime = make_runtime(code.bp)
    client = runtime.client()
    await client.start_new("parent", "live-1")
    await runtime.worker.run_until_idle()
    history = await ReplayHistory.load(runtime.backend, "live-1")
    assert (history.instance_id, history.name) == ("live-1", "parent")
    assert history.events == (await runtime.backend.load_history("live-1")).events
    assert history.recorded_status is S.Completed
    assert Replayer(code.bp).replay_history(history).ok
    assert not Replayer({"parent": code.parent_with_renamed_child}).replay_history(history).ok
    with pytest.raises(LookupError, match="no instance with id 'nobody'"):
        await ReplayHistory.load(runtime.backend, "nobody")

    await client.start_new("transfer", "live-2")
    await runtime.worker.run_until_idle()
    assert Replayer(code.bp).replay_history(await ReplayHistory.load(runtime.backend, "live-2")).ok
    with pytest.raises(ValueError, match="not an orchestration"):
        await ReplayHistory.load(runtime.backend, "@account@a")  # an entity the transfer used


def test_regenerated_histories_replay(tmp_path: Path) -> None:
    """regenerate.py re-records every fixture (same files, same instances) with histories the code replays."""
    written = regenerate(tmp_path)
    assert sorted(p.name for p in written) == sorted(f"{stem}.json" for stem in RECORDED)
    replayer = Replayer(code.bp)
    for path in written:
        fresh = ReplayHistory.from_json(path.read_text(encoding="utf-8"))
        kept = load(path.stem)
        assert (fresh.instance_id, fresh.name) == (kept.instance_id, kept.name)
        result = replayer.replay_history(fresh)
        assert result.ok, result.message
        assert result.recorded_status is RECORDED[path.stem]
    assert code.FLAKY["fail"] is True  # left as found


# -- the command line ---------------------------------------------------------------------------------------
def durable(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "durable", *args],
        cwd=REPO_ROOT,
        env={**os.environ, "COLUMNS": "100", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def app_with(folder: Path, **orchestrators: str) -> Path:
    """An app folder whose function_app.py registers functions of ``orchestrators.py`` under other names."""
    folder.mkdir(exist_ok=True)
    lines = ["import durable as df", "from tests.histories import orchestrators as code", "", "app = df.DFApp()"]
    lines += [
        f'app.orchestration_trigger(context_name="context", orchestration="{name}")(code.{function})'
        for name, function in orchestrators.items()
    ]
    (folder / "function_app.py").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


RECORDED_APP = "tests/histories/orchestrators.py"


def test_cli_replays_files() -> None:
    files = ["-f", "tests/histories/activity_chain.json", "--file", "tests/histories/critical_section.json"]
    result = durable("replay", *files, "--app", RECORDED_APP)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines == [
        "OK chain (chain-1): replayed 16 events, ends Completed",
        "OK transfer (transfer-1): replayed 29 events, ends Completed",
    ]


def test_cli_reports_a_divergence(tmp_path: Path) -> None:
    app_dir = app_with(tmp_path / "app", chain="chain_with_renamed_activity")
    result = durable("replay", "--file", "tests/histories/activity_chain.json", "--app-dir", str(app_dir), COLUMNS="60")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "DIVERGED chain (chain-1) at history event 6: TaskScheduled 'hello' #1" in result.stdout
    assert (
        "NonDeterminismError: history event TaskScheduled 'hello' #1 does not match the orchestrator code's "
        "new action TaskScheduled 'greet' #1"
    ) in result.stdout  # on one line, however narrow the terminal


def test_cli_reports_every_file(tmp_path: Path) -> None:
    app_dir = app_with(tmp_path / "app", chain="chain_without_last_activity", fan_out="fan_out")
    files = ["activity_chain", "fan_out_fan_in", "activity_chain_inline"]
    args = [arg for stem in files for arg in ("-f", f"tests/histories/{stem}.json")]
    result = durable("replay", *args, "-d", str(app_dir))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "DIVERGED chain (chain-1) at history event 10" in result.stdout
    assert "OK fan_out (fan-out-1)" in result.stdout
    assert "DIVERGED chain (chain-inline-1) at history event 10" in result.stdout
    assert "history event TaskScheduled 'hello' #2 has no matching action" in result.stdout


def test_cli_usage_errors(tmp_path: Path) -> None:
    nothing = durable("replay")
    assert nothing.returncode == 2
    assert "give an instance id or at least one --file" in nothing.stderr
    (tmp_path / "bad.json").write_text('{"events": []}')
    bad = durable("replay", "-f", str(tmp_path / "bad.json"), "--app", RECORDED_APP)
    assert bad.returncode == 2
    assert "bad.json: a history needs an ExecutionStarted event" in bad.stderr
    no_app = durable("replay", "-f", "tests/histories/activity_chain.json", "-d", str(tmp_path))
    assert no_app.returncode == 2
    assert "no function_app.py in" in no_app.stderr
    (tmp_path / "function_app.py").write_text("raise RuntimeError('broken app')\n")
    broken = durable("replay", "-f", "tests/histories/activity_chain.json", "-d", str(tmp_path))
    assert broken.returncode == 2
    assert "RuntimeError: broken app" in broken.stderr
    assert "Traceback" not in broken.stderr


# -- against a task hub (Azurite) -----------------------------------------------------------------------------
def run_on_hub(azurite: str, hub: str, *starts: tuple[str, str]) -> None:
    from storage.azure import AzureStorageBackend

    async def main() -> None:
        backend = AzureStorageBackend(azurite, task_hub=hub)
        try:
            async with df.DurableRuntime(code.bp, backend, task_hub_name=hub) as runtime:
                client = runtime.client()
                for name, instance_id in starts:
                    await client.start_new(name, instance_id)
                for _, instance_id in starts:
                    status = await client.wait_for_completion(instance_id, timeout=60)
                    assert status.runtime_status is S.Completed, status
        finally:
            await backend.close()

    asyncio.run(main())


@pytest.mark.azurite
def test_cli_exports_and_replays_stored_histories(azurite: str, tmp_path: Path) -> None:
    hub = f"ReplayHub{uuid.uuid4().hex[:10]}"
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "host.json").write_text(json.dumps({"version": "2.0", "extensions": {"durableTask": {"hubName": hub}}}))
    run_on_hub(azurite, hub, ("chain", "stored-chain"), ("parent", "stored-parent"))

    exported = durable("history", "stored-chain", "--json", "-d", str(app_dir), AzureWebJobsStorage=azurite)
    assert exported.returncode == 0, exported.stderr
    history = ReplayHistory.from_json(exported.stdout)
    assert (history.instance_id, history.name) == ("stored-chain", "chain")
    assert [e.name for e in history.events if e.event_type is EventType.TASK_SCHEDULED] == ["hello"] * 3
    (tmp_path / "stored-chain.json").write_text(exported.stdout)

    ok = durable("replay", "stored-chain", "-d", str(app_dir), "--app", RECORDED_APP, AzureWebJobsStorage=azurite)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "OK chain (stored-chain)" in ok.stdout

    app_with(app_dir, chain="chain_with_added_activity", parent="parent")
    diverged = durable("replay", "stored-chain", "-d", str(app_dir), AzureWebJobsStorage=azurite)
    assert diverged.returncode == 1, diverged.stdout + diverged.stderr
    assert "new action TaskScheduled 'audit' #1" in diverged.stdout
    from_file = durable("replay", "-f", str(tmp_path / "stored-chain.json"), "-d", str(app_dir))
    assert (from_file.returncode, from_file.stdout) == (1, diverged.stdout)
    parent = durable("replay", "stored-parent", "-d", str(app_dir), AzureWebJobsStorage=azurite)
    assert parent.returncode == 0, parent.stdout + parent.stderr

    missing = durable("replay", "nobody", "-d", str(app_dir), AzureWebJobsStorage=azurite)
    assert missing.returncode == 2
    assert "no instance with id 'nobody'" in missing.stderr
    missing_json = durable("history", "nobody", "--json", "-d", str(app_dir), AzureWebJobsStorage=azurite)
    assert missing_json.returncode == 1
    assert "no instance with id 'nobody'" in missing_json.stderr
    assert missing_json.stdout == ""


def test_help_lists_replay() -> None:
    result = durable("--help")
    assert result.returncode == 0
    assert "replay" in result.stdout
    history = durable("history", "--help")
    assert "--json" in history.stdout
