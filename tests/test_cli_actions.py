"""The ``durable`` commands that act on instances (``start-new``, ``raise-event``, ``terminate``,
``suspend``, ``resume``, ``rewind``, ``restart``), run as subprocesses against a task hub that a
real worker serves meanwhile: an in-process ``DurableRuntime`` on its own thread, as an app under
``durable start`` would. Effects are checked through the worker's client."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

import durable as df
from storage.azure import AzureStorageBackend
from tests.test_cli import durable, make_app_dir, unique

T = TypeVar("T")
bp = df.Blueprint()
FLAKY = {"failing": True}  # the activity fails while set: a rewind after clearing it succeeds


@bp.orchestration_trigger(context_name="context")
def await_approval(context: df.DurableOrchestrationContext):  # type: ignore[no-untyped-def]
    context.set_custom_status("waiting")
    decision = yield context.wait_for_external_event("approval")
    return {"input": context.get_input(), "decision": decision}


@bp.orchestration_trigger(context_name="context")
def echo(context: df.DurableOrchestrationContext):  # type: ignore[no-untyped-def]
    return (yield context.call_activity("cli_flaky", context.get_input()))


@bp.activity_trigger(input_name="value")
def cli_flaky(value: Any) -> Any:
    if FLAKY["failing"] and value == "flaky":
        raise RuntimeError("not yet")
    return value


class LiveHub:
    """A worker serving a task hub on a thread of its own, with its client for the checks."""

    def __init__(self, azurite: str, hub: str) -> None:
        self.azurite, self.hub = azurite, hub
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> LiveHub:
        self.thread.start()
        self.call(self._start)
        return self

    async def _start(self) -> None:
        # Base64 queue messages, as the app's queue triggers take them with host.json's defaults.
        self.backend = AzureStorageBackend(self.azurite, task_hub=self.hub, base64_messages=True)
        options = df.WorkerOptions(idle_poll_max=0.2)  # notice the CLI's messages quickly
        self.runtime = df.DurableRuntime(bp, self.backend, task_hub_name=self.hub, options=options)
        await self.runtime.start()
        self.client = self.runtime.client()

    async def _stop(self) -> None:
        await self.runtime.stop()
        await self.backend.close()

    def __exit__(self, *exc: object) -> None:
        self.call(self._stop)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def call(self, action: Callable[[], Awaitable[T]]) -> T:
        return asyncio.run_coroutine_threadsafe(action(), self.loop).result(60)  # type: ignore[arg-type]

    def status(self, instance_id: str) -> df.DurableOrchestrationStatus:
        found = self.call(lambda: self.client.get_status(instance_id, show_input=True))
        assert found is not None, instance_id
        return found

    def wait_for(self, instance_id: str, status: str, timeout: float = 20.0) -> df.DurableOrchestrationStatus:
        deadline = time.monotonic() + timeout
        while True:
            found = self.status(instance_id)
            if found.runtime_status.value == status or time.monotonic() > deadline:
                assert found.runtime_status.value == status, (instance_id, found.runtime_status)
                return found
            time.sleep(0.1)

    def start(self, name: str, value: Any = None, wait_for: str | None = "Running") -> str:
        instance_id = self.call(lambda: self.client.start_new(name, unique("act-"), value))
        if wait_for is not None:
            self.wait_for(instance_id, wait_for)
        return instance_id


@pytest.fixture(scope="module")
def live(azurite: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveHub, Path]]:
    name = unique("CliLive")
    app_dir = make_app_dir(tmp_path_factory.mktemp("live"), name)
    with LiveHub(azurite, name) as hub:
        yield hub, app_dir


def run(live: tuple[LiveHub, Path], azurite: str, *args: str) -> Any:
    """Run a command with ``--json`` on the live hub; its parsed output (exit code 0 expected)."""
    result = durable(*args, "--json", "--app-dir", str(live[1]), azurite=azurite)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def refused(live: tuple[LiveHub, Path], azurite: str, *args: str) -> str:
    """Run a command that must fail with exit code 1; its message."""
    result = durable(*args, "--app-dir", str(live[1]), azurite=azurite)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return result.stderr


def test_start_new_and_wait(live: tuple[LiveHub, Path], azurite: str) -> None:
    instance_id = unique("started-")
    status = run(live, azurite, "start-new", "echo", "--input", '{"n": [1, 2]}', "--id", instance_id, "--wait")
    assert (status["instanceId"], status["runtimeStatus"]) == (instance_id, "Completed")
    assert status["output"] == {"n": [1, 2]}


def test_start_new_prints_the_new_id(live: tuple[LiveHub, Path], azurite: str) -> None:
    hub, app_dir = live
    result = durable("start-new", "echo", "--input", '"hi"', "--app-dir", str(app_dir), azurite=azurite)
    assert result.returncode == 0, result.stderr
    instance_id = result.stdout.split()[-1]
    assert hub.wait_for(instance_id, "Completed").output == "hi"


def test_start_new_refuses_bad_input_and_a_busy_id(live: tuple[LiveHub, Path], azurite: str) -> None:
    hub, app_dir = live
    bad = durable("start-new", "echo", "--input", "{nope", "--app-dir", str(app_dir), azurite=azurite)
    assert bad.returncode == 2
    assert "--input is not JSON" in bad.stderr
    waiting = hub.start("await_approval", "x")
    busy = refused(live, azurite, "start-new", "await_approval", "--id", waiting, "--input", '"y"')
    assert waiting in busy and "already exists and is not finished" in busy


def test_start_new_wait_exits_1_when_the_instance_fails(live: tuple[LiveHub, Path], azurite: str) -> None:
    FLAKY["failing"] = True
    result = durable("start-new", "echo", "-i", '"flaky"', "--wait", "--app-dir", str(live[1]), azurite=azurite)
    assert result.returncode == 1
    assert "Failed" in result.stdout and "not yet" in result.stdout


def test_raise_event(live: tuple[LiveHub, Path], azurite: str) -> None:
    hub, _ = live
    instance_id = hub.start("await_approval", "order-7")
    report = run(live, azurite, "raise-event", instance_id, "approval", "--data", '{"ok": true}')
    assert report == {
        "instanceId": instance_id, "action": "raise-event", "previousStatus": "Running", "eventName": "approval"
    }  # fmt: skip
    assert hub.wait_for(instance_id, "Completed").output == {"input": "order-7", "decision": {"ok": True}}
    assert "it has finished" in refused(live, azurite, "raise-event", instance_id, "approval")


def test_raise_event_with_data_that_is_not_json(live: tuple[LiveHub, Path], azurite: str) -> None:
    result = durable("raise-event", "any", "approval", "--data", "yes", "--app-dir", str(live[1]), azurite=azurite)
    assert result.returncode == 2
    assert "--data is not JSON" in result.stderr


def test_suspend_and_resume(live: tuple[LiveHub, Path], azurite: str) -> None:
    hub, app_dir = live
    instance_id = hub.start("await_approval")
    result = durable("suspend", instance_id, "--reason", "maintenance", "--app-dir", str(app_dir), azurite=azurite)
    assert result.returncode == 0, result.stderr
    assert f"suspend: sent to {instance_id} (it was Running)" in result.stdout
    hub.wait_for(instance_id, "Suspended")
    assert "suspended already" in refused(live, azurite, "suspend", instance_id)
    run(live, azurite, "raise-event", instance_id, "approval", "--data", '"late"')  # held while suspended
    time.sleep(0.5)
    assert hub.status(instance_id).runtime_status.value == "Suspended"
    assert run(live, azurite, "resume", instance_id)["previousStatus"] == "Suspended"
    assert hub.wait_for(instance_id, "Completed").output["decision"] == "late"
    assert "only a suspended instance can be resumed" in refused(live, azurite, "resume", instance_id)


def test_terminate(live: tuple[LiveHub, Path], azurite: str) -> None:
    hub, _ = live
    instance_id = hub.start("await_approval")
    assert run(live, azurite, "terminate", instance_id, "--reason", "no longer needed")["action"] == "terminate"
    assert hub.wait_for(instance_id, "Terminated").output == "no longer needed"
    assert "it has finished" in refused(live, azurite, "terminate", instance_id)


def test_rewind_retries_the_failed_activity(live: tuple[LiveHub, Path], azurite: str) -> None:
    hub, _ = live
    FLAKY["failing"] = True
    instance_id = hub.start("echo", "flaky", wait_for="Failed")
    FLAKY["failing"] = False
    assert run(live, azurite, "rewind", instance_id, "--reason", "fixed")["previousStatus"] == "Failed"
    assert hub.wait_for(instance_id, "Completed").output == "flaky"
    assert "only Failed instances can be rewound" in refused(live, azurite, "rewind", instance_id)


def test_restart(live: tuple[LiveHub, Path], azurite: str) -> None:
    hub, _ = live
    instance_id = hub.start("echo", {"again": 1}, wait_for="Completed")
    fresh = run(live, azurite, "restart", instance_id)["newInstanceId"]
    assert fresh != instance_id
    assert hub.wait_for(fresh, "Completed").output == {"again": 1}
    first = hub.status(instance_id).created_time
    assert run(live, azurite, "restart", instance_id, "--same-id")["newInstanceId"] == instance_id
    deadline = time.monotonic() + 20
    while hub.status(instance_id).created_time == first and time.monotonic() < deadline:
        time.sleep(0.1)
    assert hub.wait_for(instance_id, "Completed").output == {"again": 1}
    assert hub.status(instance_id).created_time > first


def test_restart_under_the_same_id_needs_a_finished_instance(live: tuple[LiveHub, Path], azurite: str) -> None:
    hub, _ = live
    instance_id = hub.start("await_approval")
    assert "terminate it first" in refused(live, azurite, "restart", instance_id, "--same-id")
    assert hub.status(instance_id).runtime_status.value == "Running"


@pytest.mark.parametrize("command", [["raise-event", "ghost", "approval"], ["restart", "ghost"]])
def test_actions_on_an_unknown_instance(live: tuple[LiveHub, Path], azurite: str, command: list[str]) -> None:
    assert "no instance with id 'ghost'" in refused(live, azurite, *command)
