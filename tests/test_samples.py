"""The samples, driven the way a user drives them: each sample folder is served by ``durable start``
(a subprocess on Azurite) and used over HTTP only — the starter route, then the management URLs
its 202 response hands out (status, raise event, terminate, suspend, resume, purge)."""

from __future__ import annotations

import ast
import asyncio
import hashlib
import importlib.util
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from tests.fixtures_host import REPO_ROOT, ServedApp

SAMPLES_DIR = REPO_ROOT / "samples"
SAMPLES = [
    "function_chaining",
    "fan_out_fan_in",
    "human_interaction",
    "monitor",
    "sub_orchestrations",
    "eternal_orchestration",
    "custom_status",
    "counter_entity",
    "bank_transfer",
]
POLL_TIMEOUT = 30.0
TERMINAL = {"Completed", "Failed", "Terminated"}
MANAGEMENT_URLS = {
    "statusQueryGetUri",
    "sendEventPostUri",
    "terminatePostUri",
    "rewindPostUri",
    "purgeHistoryDeleteUri",
    "restartPostUri",
    "suspendPostUri",
    "resumePostUri",
}

ServeApp = Callable[..., ServedApp]
Status = dict[str, Any]


# -- helpers ----------------------------------------------------------------------------------------
async def start(http: aiohttp.ClientSession, served: ServedApp, orchestrator: str, body: Any = None) -> dict[str, str]:
    """POST the sample's HTTP starter; check the 202 check-status response and return its payload."""
    url = f"{served.base_url}/api/orchestrators/{orchestrator}"
    async with http.post(url, json=body) as response:
        text = await response.text()
        assert response.status == 202, f"{response.status} {text}\n{served.output()}"
        payload: dict[str, str] = json.loads(text)
        assert response.headers["Location"] == payload["statusQueryGetUri"]
    assert set(payload) == MANAGEMENT_URLS | {"id"}
    instance_url = f"{served.base_url}/api/durabletask/instances/{quote(payload['id'], safe='')}"
    for name in MANAGEMENT_URLS:
        assert payload[name].startswith(instance_url), (name, payload[name])
    return payload


async def get_status(http: aiohttp.ClientSession, url: str) -> tuple[int, Status]:
    async with http.get(url) as response:
        return response.status, await response.json()


async def poll(
    http: aiohttp.ClientSession, url: str, until: Callable[[Status], bool], timeout: float = POLL_TIMEOUT
) -> tuple[int, Status]:
    """GET the status URL until ``until(status)`` holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        code, status = await get_status(http, url)
        if until(status):
            return code, status
        assert time.monotonic() < deadline, f"gave up waiting; last status {code}: {status}"
        await asyncio.sleep(0.1)


async def wait_until_finished(http: aiohttp.ClientSession, payload: dict[str, str], **query: str) -> Status:
    url = payload["statusQueryGetUri"] + "".join(f"&{k}={v}" for k, v in query.items())
    code, status = await poll(http, url, lambda s: s.get("runtimeStatus") in TERMINAL)
    assert code == 200, status
    return status


async def wait_for_stage(http: aiohttp.ClientSession, payload: dict[str, str], key: str, value: Any) -> Status:
    """Wait until the instance's custom status has ``key == value``."""

    def reached(status: Status) -> bool:
        custom = status.get("customStatus")
        return isinstance(custom, dict) and custom.get(key) == value

    _, status = await poll(http, payload["statusQueryGetUri"], reached)
    return status


async def raise_event(http: aiohttp.ClientSession, payload: dict[str, str], name: str, data: Any) -> int:
    url = payload["sendEventPostUri"].replace("{eventName}", name)
    async with http.post(url, data=json.dumps(data), headers={"Content-Type": "application/json"}) as response:
        return response.status


async def post_operation(http: aiohttp.ClientSession, payload: dict[str, str], uri: str, reason: str) -> int:
    async with http.post(payload[uri].replace("{text}", quote(reason, safe=""))) as response:
        return response.status


def event_types(status: Status) -> list[str]:
    return [event["EventType"] for event in status["historyEvents"]]


def scheduled_names(status: Status) -> list[str]:
    # The documented history shows each activity once, by its outcome, with the time it was scheduled.
    done = [e for e in status["historyEvents"] if e["EventType"] in ("TaskCompleted", "TaskFailed")]
    return [e["FunctionName"] for e in sorted(done, key=lambda e: e["ScheduledTime"])]


# -- the samples ------------------------------------------------------------------------------------
async def test_function_chaining(serve_app: ServeApp) -> None:
    served = serve_app(SAMPLES_DIR / "function_chaining")
    async with aiohttp.ClientSession() as http:
        payload = await start(http, served, "chaining_orchestrator", "Durable Functions")
        status = await wait_until_finished(http, payload, showHistory="true")
    assert status["runtimeStatus"] == "Completed"
    assert status["name"] == "chaining_orchestrator"
    assert status["input"] == "Durable Functions"
    assert status["output"] == "HELLO, DURABLE FUNCTIONS!"
    assert scheduled_names(status) == ["chaining_greet", "chaining_shout", "chaining_punctuate"]


async def test_fan_out_fan_in(serve_app: ServeApp) -> None:
    served = serve_app(SAMPLES_DIR / "fan_out_fan_in")
    async with aiohttp.ClientSession() as http:
        payload = await start(http, served, "fan_out_fan_in_orchestrator", 10)
        status = await wait_until_finished(http, payload, showHistory="true")
    assert status["runtimeStatus"] == "Completed"
    assert status["output"] == {"items": 10, "squares": [n * n for n in range(1, 11)], "total": 385}
    # The ten squares were scheduled together, in one step: they carry that step's time.
    events = status["historyEvents"]
    fanned = [e for e in events if e["EventType"] == "TaskCompleted" and e["FunctionName"] == "fan_out_square"]
    assert len(fanned) == 10
    assert len({e["ScheduledTime"] for e in fanned}) == 1


async def test_human_interaction_approved_and_rejected(serve_app: ServeApp) -> None:
    served = serve_app(SAMPLES_DIR / "human_interaction")
    async with aiohttp.ClientSession() as http:
        approved = await start(http, served, "approval_orchestrator", {"request": "laptop", "timeout_seconds": 120})
        rejected = await start(http, served, "approval_orchestrator", {"request": "yacht", "timeout_seconds": 120})
        for payload in (approved, rejected):
            waiting = await wait_for_stage(http, payload, "waiting_for", "Approval")
            assert waiting["runtimeStatus"] == "Running"
        started = time.monotonic()
        assert await raise_event(http, approved, "Approval", {"approved": True, "approver": "Ada"}) == 202
        assert await raise_event(http, rejected, "Approval", {"approved": False, "approver": "Grace"}) == 202
        approved_status = await wait_until_finished(http, approved, showHistory="true")
        rejected_status = await wait_until_finished(http, rejected)
        elapsed = time.monotonic() - started
        # the instance is over: one more event is refused
        assert await raise_event(http, approved, "Approval", {"approved": False}) == 410
    assert approved_status["runtimeStatus"] == "Completed"
    assert approved_status["output"] == {"request": "laptop", "outcome": "approved", "approver": "Ada"}
    assert rejected_status["output"] == {"request": "yacht", "outcome": "rejected", "approver": "Grace"}
    # Finished on the approval, long before the timer was due: the cancelled timer never fired.
    assert elapsed < 60
    assert "TimerCreated" in event_types(approved_status)
    assert "TimerFired" not in event_types(approved_status)
    assert scheduled_names(approved_status) == ["approval_send_request", "approval_process"]
    # The orchestrator cleared its custom status with set_custom_status(None) before returning.
    assert approved_status["customStatus"] is None


async def test_human_interaction_times_out(serve_app: ServeApp) -> None:
    served = serve_app(SAMPLES_DIR / "human_interaction")
    async with aiohttp.ClientSession() as http:
        started = time.monotonic()
        payload = await start(http, served, "approval_orchestrator", {"request": "pizza", "timeout_seconds": 2})
        status = await wait_until_finished(http, payload, showHistory="true")
        elapsed = time.monotonic() - started
    assert status["runtimeStatus"] == "Completed"
    assert status["output"] == {"request": "pizza", "outcome": "escalated", "approver": None}
    assert elapsed >= 2
    assert "TimerFired" in event_types(status)
    assert scheduled_names(status) == ["approval_send_request", "approval_escalate"]


async def test_monitor_until_done_and_until_expiry(serve_app: ServeApp) -> None:
    served = serve_app(SAMPLES_DIR / "monitor")
    async with aiohttp.ClientSession() as http:
        done = await start(
            http,
            served,
            "monitor_orchestrator",
            {"job_id": "job-done", "polling_interval_seconds": 0.5, "expiry_seconds": 60, "job_duration_seconds": 2},
        )
        expired = await start(
            http,
            served,
            "monitor_orchestrator",
            {"job_id": "job-slow", "polling_interval_seconds": 0.5, "expiry_seconds": 2, "job_duration_seconds": 600},
        )
        done_status = await wait_until_finished(http, done, showHistory="true")
        expired_status = await wait_until_finished(http, expired, showHistory="true")
    output = done_status["output"]
    assert output["job_id"] == "job-done"
    assert output["job_status"] == "Completed"
    assert output["checks"] >= 2  # the job ran for 2 s: the first check found it running
    assert done_status["customStatus"] == {"job_id": "job-done", "job_status": "Completed", "checks": output["checks"]}
    # one status check per poll, a timer between polls, then the alert
    names = scheduled_names(done_status)
    assert names == ["monitor_get_job_status"] * output["checks"] + ["monitor_send_alert"]
    assert event_types(done_status).count("TimerCreated") == output["checks"] - 1

    output = expired_status["output"]
    assert output["job_id"] == "job-slow"
    assert output["job_status"] == "Expired"
    assert output["checks"] >= 1
    assert scheduled_names(expired_status) == ["monitor_get_job_status"] * output["checks"]
    assert expired_status["customStatus"]["job_status"] == "Running"


async def test_sub_orchestrations(serve_app: ServeApp) -> None:
    served = serve_app(SAMPLES_DIR / "sub_orchestrations")
    devices = ["sensor-a", "sensor-b", "sensor-c"]
    async with aiohttp.ClientSession() as http:
        payload = await start(http, served, "provision_devices_orchestrator", devices)
        status = await wait_until_finished(http, payload, showHistory="true")
        parent_id = payload["id"]
        children = []
        for index in range(len(devices)):
            child_url = payload["statusQueryGetUri"].replace(
                f"/instances/{parent_id}?", f"/instances/{parent_id}-device-{index}?"
            )
            children.append(await get_status(http, child_url))
    assert status["runtimeStatus"] == "Completed"
    assert status["output"] == [
        {
            "device": device,
            "key": hashlib.sha256(device.encode()).hexdigest()[:16],
            "registered": True,
            "parent_instance_id": parent_id,
        }
        for device in devices
    ]
    # the children were started together, in one step
    assert event_types(status).count("SubOrchestrationInstanceCompleted") == 3
    assert event_types(status).count("SubOrchestrationInstanceCompleted") == 3
    for (code, child), device in zip(children, devices, strict=True):
        assert code == 200
        assert child["name"] == "provision_device_orchestrator"
        assert child["runtimeStatus"] == "Completed"
        assert child["input"] == device


async def test_eternal_orchestration_continues_as_new(serve_app: ServeApp) -> None:
    served = serve_app(SAMPLES_DIR / "eternal_orchestration")
    async with aiohttp.ClientSession() as http:
        payload = await start(http, served, "eternal_cleanup_orchestrator", {"interval_seconds": 0.5, "max_runs": 3})
        runs_seen: set[int] = set()

        def finished(status: Status) -> bool:
            if isinstance(status.get("customStatus"), dict):
                runs_seen.add(status["customStatus"]["run"])
            return status.get("runtimeStatus") in TERMINAL

        code, _ = await poll(http, payload["statusQueryGetUri"], finished)
        _, status = await get_status(http, payload["statusQueryGetUri"] + "&showHistory=true")
    assert code == 200
    assert status["runtimeStatus"] == "Completed"
    assert status["output"] == {"runs": 3, "last_result": "cleanup #3 done"}
    assert status["customStatus"] == {"run": 3, "stage": "cleaning"}
    assert runs_seen <= {1, 2, 3}
    # The history is the last execution's only: each run started afresh with the state as input.
    assert scheduled_names(status) == ["eternal_do_cleanup"]
    started = [e for e in status["historyEvents"] if e["EventType"] == "ExecutionStarted"]
    assert len(started) == 1
    assert "TimerCreated" not in event_types(status)
    assert started[0]["Input"] == {"interval_seconds": 0.5, "max_runs": 3, "run": 2}


async def test_custom_status_stages_with_suspend_and_resume(serve_app: ServeApp) -> None:
    served = serve_app(SAMPLES_DIR / "custom_status")
    async with aiohttp.ClientSession() as http:
        payload = await start(http, served, "order_orchestrator", {"item": "book", "quantity": 2})
        status = await wait_for_stage(http, payload, "stage", "awaiting_payment")
        assert status["runtimeStatus"] == "Running"
        assert status["customStatus"] == {"stage": "awaiting_payment", "progress": 33}

        assert await post_operation(http, payload, "suspendPostUri", "maintenance window") == 202
        code, status = await poll(http, payload["statusQueryGetUri"], lambda s: s["runtimeStatus"] == "Suspended")
        assert code == 202

        # An event raised while suspended is accepted but held back until the instance resumes.
        assert await raise_event(http, payload, "PaymentReceived", {"amount": 30}) == 202
        held_until = time.monotonic() + 1.5
        while time.monotonic() < held_until:
            code, status = await get_status(http, payload["statusQueryGetUri"])
            assert status["runtimeStatus"] == "Suspended", status
            assert status["customStatus"]["stage"] == "awaiting_payment", status
            await asyncio.sleep(0.1)

        assert await post_operation(http, payload, "resumePostUri", "back") == 202
        status = await wait_until_finished(http, payload)
    assert status["runtimeStatus"] == "Completed"
    assert status["customStatus"] == {"stage": "done", "progress": 100}
    output = status["output"]
    assert output["order"] == {"item": "book", "quantity": 2}
    assert output["paid"] == 30
    assert output["tracking_number"].startswith("TRK-")


async def test_custom_status_terminate_then_purge(serve_app: ServeApp) -> None:
    served = serve_app(SAMPLES_DIR / "custom_status")
    async with aiohttp.ClientSession() as http:
        payload = await start(http, served, "order_orchestrator", {"item": "lamp", "quantity": 1})
        await wait_for_stage(http, payload, "stage", "awaiting_payment")

        # a running instance cannot be purged
        async with http.delete(payload["purgeHistoryDeleteUri"]) as response:
            assert response.status == 412

        assert await post_operation(http, payload, "terminatePostUri", "customer cancelled") == 202
        status = await wait_until_finished(http, payload)
        assert status["runtimeStatus"] == "Terminated"
        assert status["output"] == "customer cancelled"
        assert status["customStatus"] == {"stage": "awaiting_payment", "progress": 33}
        # a terminated instance takes no more events
        assert await raise_event(http, payload, "PaymentReceived", {"amount": 1}) == 410

        async with http.delete(payload["purgeHistoryDeleteUri"]) as response:
            assert response.status == 200
            assert await response.json() == {"instancesDeleted": 1}
        code, _ = await get_status(http, payload["statusQueryGetUri"])
        assert code == 404
        async with http.delete(payload["purgeHistoryDeleteUri"]) as response:
            assert response.status == 404


# -- the root app and the sample folders ------------------------------------------------------------
def _load_root_app() -> Any:
    """Import the root function_app.py in-process, under a name of its own."""
    spec = importlib.util.spec_from_file_location("root_function_app_under_test", REPO_ROOT / "function_app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.app


def test_root_app_registers_every_sample() -> None:
    app = _load_root_app()
    registry = app.durable_functions
    # its own functions stay
    assert "hello_sequence" in registry.orchestrators
    assert "say_hello" in registry.activities
    assert "http_start" in {f.get_function_name() for f in app.get_functions()}
    seen: dict[str, str] = {}
    for name in SAMPLES:
        blueprint = importlib.import_module(f"samples.{name}.blueprint").bp
        functions = blueprint.durable_functions
        assert functions.orchestrators, f"{name} registers no orchestrator"
        for function_name in [*functions.orchestrators, *functions.activities, *functions.entities]:
            assert function_name not in seen, f"{function_name} is in both {seen[function_name]} and {name}"
            seen[function_name] = name
            assert function_name in {*registry.orchestrators, *registry.activities, *registry.entities}
        for orchestrator, function in functions.orchestrators.items():
            assert registry.orchestrators[orchestrator] is function


async def test_root_app_serves_the_samples(serve_app: ServeApp, tmp_path: Path) -> None:
    # The root app on a task hub of its own (the samples package is found from the working directory).
    app_dir = tmp_path / "root_app"
    app_dir.mkdir()
    shutil.copy(REPO_ROOT / "function_app.py", app_dir)
    host_json = (REPO_ROOT / "host.json").read_text().replace('"DurableHub"', '"RootSamplesHub"')
    (app_dir / "host.json").write_text(host_json)
    served = serve_app(app_dir)
    assert "http_start: [POST]" in served.output()
    async with aiohttp.ClientSession() as http:
        chaining = await start(http, served, "chaining_orchestrator", "root")
        fan_out = await start(http, served, "fan_out_fan_in_orchestrator", 3)
        chaining_status = await wait_until_finished(http, chaining)
        fan_out_status = await wait_until_finished(http, fan_out)
    assert chaining_status["output"] == "HELLO, ROOT!"
    assert fan_out_status["output"] == {"items": 3, "squares": [1, 4, 9], "total": 14}


@pytest.mark.parametrize("name", SAMPLES)
def test_sample_folder_is_a_complete_app(name: str) -> None:
    folder = SAMPLES_DIR / name
    for file in ("__init__.py", "function_app.py", "blueprint.py", "host.json", "requirements.txt", "README.md"):
        assert (folder / file).is_file(), f"{folder / file} is missing"
    assert (folder / "requirements.txt").read_text() == (REPO_ROOT / "requirements.txt").read_text()
    host = json.loads((folder / "host.json").read_text())
    root_host = json.loads((REPO_ROOT / "host.json").read_text())
    hub = host["extensions"]["durableTask"].pop("hubName")
    root_host["extensions"]["durableTask"].pop("hubName")
    assert host == root_host
    other_hubs = {
        json.loads((SAMPLES_DIR / other / "host.json").read_text())["extensions"]["durableTask"]["hubName"]
        for other in SAMPLES
        if other != name
    }
    assert hub not in other_hubs | {"DurableHub"}
    # The blueprint stands alone: it imports nothing from another sample (nor from its own app).
    tree = ast.parse((folder / "blueprint.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = [node.module or ""]
        else:
            continue
        for module in modules:
            top = module.split(".")[0]
            assert top in sys.stdlib_module_names or top in {"durable", "azure"}, f"{name} imports {module}"
    app_source = (folder / "function_app.py").read_text()
    assert "from blueprint import bp" in app_source
    assert "app.register_functions(bp)" in app_source
    assert "app.register_functions(df.http_starter())" in app_source  # POST /api/orchestrators/{functionName}
