"""``durable start`` as ``func start`` behaves: the function list, per-invocation and lifecycle logs,
the settings it honours (``Host.LocalHttpPort``, ``Host.CORS``, ``logging.logLevel``, the durable
concurrency limits, ``AzureWebJobs.<fn>.Disabled``) or refuses with a clear message, and cleaning
up what it started on every way out (import error, SIGTERM with storage gone)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.storage.queue.aio import QueueClient

from durable.host._azurite import Azurite, accepts_connections, free_ports, local_emulator_ports
from durable.host._host import SHUTDOWN_GRACE, QueueTriggerRunner
from durable.host._settings import (
    HostSettings,
    SettingsError,
    identity_connection,
    load_local_host_options,
    resolve_identity_connection,
)
from storage.azure._connection import DEV_KEY, connection_string
from tests.fixtures_host import REPO_ROOT, ServedApp
from tests.test_local_host import fetch, fetch_json, start_host, stop_cleanly, unique, wait_for, write_app

WAIT = 30.0  # upper bound for anything asynchronous (never asserted on)
TERMINAL = {"Completed", "Failed", "Terminated"}

APP = """
    import time

    import azure.functions as func

    import durable as df

    app = df.DFApp(http_auth_level=func.AuthLevel.ANONYMOUS)


    @app.route(route="start/{name}", methods=["POST"])
    @app.durable_client_input(client_name="client")
    async def http_start(req: func.HttpRequest, client: df.DurableOrchestrationClient) -> func.HttpResponse:
        payload = req.get_json() if req.get_body() else None
        instance_id = await client.start_new(req.route_params["name"], None, payload)
        return client.create_check_status_response(req, instance_id)


    @app.route(route="terminate/{id}", methods=["POST"])
    @app.durable_client_input(client_name="client")
    async def stop_it(req: func.HttpRequest, client: df.DurableOrchestrationClient) -> func.HttpResponse:
        await client.terminate(req.route_params["id"], "enough")
        return func.HttpResponse(status_code=202)


    @app.route(route="signal/{key}", methods=["POST"])
    @app.durable_client_input(client_name="client")
    async def signal(req: func.HttpRequest, client: df.DurableOrchestrationClient) -> func.HttpResponse:
        await client.signal_entity(df.EntityId("counter", req.route_params["key"]), "add", 1)
        return func.HttpResponse(status_code=202)


    @app.route(route="hello", methods=["GET"])
    def hello(req: func.HttpRequest) -> str:
        return "hi"


    @app.route(route="boom", methods=["GET"])
    def boom(req: func.HttpRequest) -> str:
        raise RuntimeError("http boom")


    @app.route(route="quiet", methods=["GET"])
    def quiet(req: func.HttpRequest) -> str:
        return "shh"


    @app.route(route="off", methods=["GET"])
    def switched_off(req: func.HttpRequest) -> str:
        return "on"


    @app.orchestration_trigger(context_name="context")
    def greet(context: df.DurableOrchestrationContext):
        return (yield context.call_activity("say_hello", context.get_input()))


    @app.orchestration_trigger(context_name="context")
    def fails(context: df.DurableOrchestrationContext):
        yield context.call_activity("say_hello", "x")
        raise ValueError("broken on purpose")


    @app.orchestration_trigger(context_name="context")
    def waits(context: df.DurableOrchestrationContext):
        yield context.wait_for_external_event("never")


    @app.orchestration_trigger(context_name="context")
    def calls_bad(context: df.DurableOrchestrationContext):
        try:
            yield context.call_activity("bad_activity", None)
        except Exception:
            return "caught"


    @app.orchestration_trigger(context_name="context")
    def uses_disabled(context: df.DurableOrchestrationContext):
        return (yield context.call_activity("disabled_activity", None))


    @app.orchestration_trigger(context_name="context")
    def fan_out(context: df.DurableOrchestrationContext):
        count = context.get_input()
        return (yield context.task_all([context.call_activity("timed", i) for i in range(count)]))


    @app.activity_trigger(input_name="name")
    def say_hello(name: str) -> str:
        return f"Hello {name}!"


    @app.activity_trigger(input_name="value")
    def bad_activity(value: None) -> None:
        raise RuntimeError("activity broke")


    @app.activity_trigger(input_name="value")
    def disabled_activity(value: None) -> str:
        return "ran"


    @app.activity_trigger(input_name="index")
    def timed(index: int) -> list[float]:
        started = time.time()
        time.sleep(0.2)
        return [started, time.time()]


    @app.orchestration_trigger(context_name="context")
    def sleepy(context: df.DurableOrchestrationContext):
        return (yield context.call_activity("nap", context.get_input()))


    @app.activity_trigger(input_name="seconds")
    def nap(seconds: float) -> None:
        time.sleep(seconds)


    @app.entity_trigger(context_name="context")
    def counter(context: df.DurableEntityContext) -> None:
        context.set_state(context.get_state(lambda: 0) + context.get_input())
"""

DISABLED = {"AzureWebJobs.switched_off.Disabled": "true", "AzureWebJobs.Disabled_Activity.Disabled": "1"}


def extensions(hub: str, **durable: Any) -> dict[str, Any]:
    fast = {"storageProvider": {"maxQueuePollingInterval": "00:00:01"}}
    return {"durableTask": {"hubName": hub, **fast, **durable}, "queues": {"maxPollingInterval": "00:00:01"}}


@pytest.fixture(scope="module")
def app(azurite: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedApp]:
    folder = tmp_path_factory.mktemp("fidelity")
    app_dir = write_app(folder / "app", APP, extensions(unique("Fidelity")))
    host = json.loads((app_dir / "host.json").read_text())
    host["logging"] = {"logLevel": {"Function.quiet": "Warning"}}
    (app_dir / "host.json").write_text(json.dumps(host))
    served = start_host(app_dir, azurite, folder / "host.log", **DISABLED)
    yield served
    stop_cleanly(served)


async def run_to_end(served: ServedApp, orchestrator: str, payload: Any = None) -> tuple[str, dict[str, Any]]:
    status, started = await fetch_json("POST", f"{served.base_url}/api/start/{orchestrator}", json=payload)
    assert status == 202, started
    return started["id"], await wait_status(started["statusQueryGetUri"], TERMINAL)


async def wait_status(url: str, wanted: set[str]) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT
    while True:
        _, body = await fetch_json("GET", url)
        if body["runtimeStatus"] in wanted or time.monotonic() > deadline:
            return body  # type: ignore[no-any-return]
        await asyncio.sleep(0.1)


async def logged(served: ServedApp, pattern: str) -> re.Match[str]:
    """The first match of ``pattern`` in the host's output, once it has been written."""
    found = await asyncio.to_thread(wait_for, lambda: re.search(pattern, served.output()), pattern)
    return found  # type: ignore[no-any-return]


def executed(function: str, result: str = "Succeeded") -> str:
    return rf"Executed 'Functions\.{function}' \({result}, Id=([0-9a-f-]{{36}}), Duration=\d+ms\)"


# -- the function list and the logs ------------------------------------------------------------------
def test_function_list_shows_the_apps_functions_not_the_runtimes(app: ServedApp) -> None:
    output = app.output()
    listing = output[output.index("Functions:") : output.index("Host started")]
    assert f"        http_start: [POST] {app.base_url}/api/start/{{name}}\n" in listing
    assert f"        hello: [GET] {app.base_url}/api/hello\n" in listing
    for line in ("greet: orchestrationTrigger", "say_hello: activityTrigger", "counter: entityTrigger"):
        assert f"        {line}\n" in listing
    assert "        switched_off: disabled\n" in listing
    assert "        disabled_activity: disabled\n" in listing
    for internal in ("durable_control", "durable_workitems", "durable_management", "queueTrigger"):
        assert internal not in listing


async def test_http_invocations_are_logged_like_func_start(app: ServedApp) -> None:
    assert (await fetch("GET", f"{app.base_url}/api/hello"))[0] == 200
    done = await logged(app, executed("hello"))
    reason = "This function was programmatically called via the host APIs."
    assert f"Executing 'Functions.hello' (Reason='{reason}', Id={done.group(1)})" in app.output()
    assert (await fetch("GET", f"{app.base_url}/api/boom"))[0] == 500
    await logged(app, executed("boom", "Failed") + r"\nResult: Failure\nException: RuntimeError: http boom")


async def test_an_orchestration_logs_its_steps_activities_and_lifecycle(app: ServedApp) -> None:
    instance_id, status = await run_to_end(app, "greet", "Ann")
    assert (status["runtimeStatus"], status["output"]) == ("Completed", "Hello Ann!")
    await logged(
        app, rf"{instance_id}: Function 'greet \(Orchestrator\)' started\. IsReplay: False\. Input: \(5 bytes\)"
    )
    await logged(app, rf"{instance_id}: Function 'greet \(Orchestrator\)' completed\. ContinuedAsNew: False\.")
    step = await logged(app, executed("greet"))
    assert f"Executing 'Functions.greet' (Reason='(null)', Id={step.group(1)})" in app.output()
    await logged(app, executed("say_hello"))


async def test_a_failed_orchestration_is_logged_with_its_reason(app: ServedApp) -> None:
    instance_id, status = await run_to_end(app, "fails")
    assert status["runtimeStatus"] == "Failed"
    await logged(app, executed("fails", "Failed"))
    await logged(
        app, rf"{instance_id}: Function 'fails \(Orchestrator\)' failed with an error\. Reason: ValueError: broken on"
    )


async def test_a_failed_activity_is_logged_as_a_failed_invocation(app: ServedApp) -> None:
    _, status = await run_to_end(app, "calls_bad")
    assert (status["runtimeStatus"], status["output"]) == ("Completed", "caught")
    await logged(
        app, executed("bad_activity", "Failed") + r"\nResult: Failure\nException: RuntimeError: activity broke"
    )


async def test_a_terminated_orchestration_is_logged_with_the_reason(app: ServedApp) -> None:
    status, started = await fetch_json("POST", f"{app.base_url}/api/start/waits")
    assert status == 202
    await wait_status(started["statusQueryGetUri"], {"Running"})
    assert (await fetch("POST", f"{app.base_url}/api/terminate/{started['id']}"))[0] == 202
    assert (await wait_status(started["statusQueryGetUri"], TERMINAL))["runtimeStatus"] == "Terminated"
    terminated = r"Function 'waits \(Orchestrator\)' was terminated\. Reason: enough\. State: Terminated"
    await logged(app, f"{started['id']}: {terminated}")


async def test_an_entity_batch_is_logged_as_an_invocation(app: ServedApp) -> None:
    assert (await fetch("POST", f"{app.base_url}/api/signal/{unique('k')}"))[0] == 202
    await logged(app, executed("counter"))


async def test_log_level_per_category_from_host_json(app: ServedApp) -> None:
    assert (await fetch("GET", f"{app.base_url}/api/quiet"))[0] == 200
    assert (await fetch("GET", f"{app.base_url}/api/hello"))[0] == 200
    await logged(app, executed("hello"))  # after quiet's, had it been logged
    assert "Functions.quiet" not in app.output()


async def test_disabled_functions_are_not_run(app: ServedApp) -> None:
    assert (await fetch("GET", f"{app.base_url}/api/off"))[0] == 404
    _, status = await run_to_end(app, "uses_disabled")
    assert status["runtimeStatus"] == "Failed"
    assert "disabled_activity" in json.dumps(status["output"])
    assert "Functions.disabled_activity" not in app.output()


# -- concurrency limits ---------------------------------------------------------------------------------
def most_at_once(intervals: list[list[float]]) -> int:
    """The largest number of intervals that overlap at one moment."""
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = peak = 0
    for _, change in edges:  # at equal times an end (-1) sorts first: touching is not overlapping
        running += change
        peak = max(peak, running)
    return peak


@pytest.mark.parametrize("count", [4, 20])  # run inline by the orchestration's worker / via the work-item queue
async def test_max_concurrent_activity_functions_holds(serve_app: Any, tmp_path: Path, count: int) -> None:
    hub = unique("Limits")
    served = serve_app(write_app(tmp_path / "app", APP, extensions(hub, maxConcurrentActivityFunctions=2)))
    _, status = await run_to_end(served, "fan_out", count)
    assert status["runtimeStatus"] == "Completed", status
    assert len(status["output"]) == count
    assert most_at_once(status["output"]) == 2  # the limit, and the concurrency it allows


async def test_without_a_limit_activities_overlap(serve_app: Any, tmp_path: Path) -> None:
    served = serve_app(write_app(tmp_path / "app", APP, extensions(unique("NoLimit"))))
    _, status = await run_to_end(served, "fan_out", 4)
    assert most_at_once(status["output"]) == 4  # what the limit test would see without the limit


@pytest.mark.parametrize("limit", [1, 3, None])
async def test_control_queues_share_the_orchestrator_limit(azurite: str, limit: int | None) -> None:
    """maxConcurrentOrchestratorFunctions bounds the invocations of all control queues together
    (the local host hands every control-queue runner the same slots)."""
    settings = HostSettings(message_encoding="none", queue_max_polling_interval=0.1)
    slots = asyncio.Semaphore(limit) if limit else None
    running, peak, handled = 0, 0, 0

    async def function(msg: Any) -> None:
        nonlocal running, peak, handled
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.05)
        running -= 1
        handled += 1

    runners = []
    for _ in range(2):
        name = unique("slots")
        queue = QueueClient.from_connection_string(azurite, name)
        await queue.create_queue()
        for index in range(4):
            await queue.send_message(f"m{index}")
        poison = QueueClient.from_connection_string(azurite, f"{name}-poison")
        runners.append(QueueTriggerRunner(name, function, "msg", queue, poison, settings, logged=False, slots=slots))
    stop = asyncio.Event()
    tasks = [asyncio.create_task(runner.run(stop)) for runner in runners]
    try:
        await asyncio.to_thread(wait_for, lambda: handled == 8, "every message to be handled")
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        for runner in runners:
            await runner.queue.delete_queue()
            await runner.queue.close()
            await runner.poison.close()
    assert peak == limit if limit else peak >= 4  # without a limit a batch of 4 runs at once


# -- local.settings.json Host: port and CORS ------------------------------------------------------------
def run_durable_start(app_dir: Path, connection: str | None, **env: str) -> subprocess.Popen[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("AzureWebJobsStorage", "DURABLE_"))}
    if connection is not None:
        environment["AzureWebJobsStorage"] = connection
    return subprocess.Popen(
        [sys.executable, "-m", "durable", "start", "--app-dir", str(app_dir)],
        cwd=REPO_ROOT,
        env={**environment, "PYTHONUNBUFFERED": "1", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_listening(process: subprocess.Popen[str], port: int) -> None:
    deadline = time.monotonic() + WAIT
    while not accepts_connections(port):
        assert process.poll() is None, process.stdout.read() if process.stdout else ""
        assert time.monotonic() < deadline, "the host did not listen"
        time.sleep(0.1)


def stop(process: subprocess.Popen[str], sig: int = signal.SIGINT) -> tuple[int, str]:
    process.send_signal(sig)
    output, _ = process.communicate(timeout=WAIT)
    return process.returncode, output


async def test_local_http_port_and_cors_from_local_settings(azurite: str, tmp_path: Path) -> None:
    (port,) = free_ports(1)
    app_dir = write_app(tmp_path / "app", APP, extensions(unique("Cors")))
    host = {"LocalHttpPort": port, "CORS": "https://allowed.example, http://localhost:3000", "CORSCredentials": True}
    (app_dir / "local.settings.json").write_text(json.dumps({"IsEncrypted": False, "Values": {}, "Host": host}))
    process = run_durable_start(app_dir, azurite)
    try:
        wait_listening(process, port)  # no --port: Host.LocalHttpPort
        base = f"http://127.0.0.1:{port}/api"
        preflight = {"Origin": "https://allowed.example", "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "content-type,x-custom"}  # fmt: skip
        status, headers, _ = await fetch("OPTIONS", f"{base}/start/greet", headers=preflight)
        assert status == 204
        assert headers["Access-Control-Allow-Origin"] == "https://allowed.example"
        assert headers["Access-Control-Allow-Methods"] == "POST"
        assert headers["Access-Control-Allow-Headers"] == "content-type,x-custom"
        assert headers["Access-Control-Allow-Credentials"] == "true"
        refused = {**preflight, "Origin": "https://evil.example"}
        status, headers, _ = await fetch("OPTIONS", f"{base}/start/greet", headers=refused)
        assert status == 204 and "Access-Control-Allow-Origin" not in headers
        status, headers, body = await fetch("GET", f"{base}/hello", headers={"Origin": "http://localhost:3000"})
        assert (status, body) == (200, b"hi")
        assert headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
        status, headers, _ = await fetch("GET", f"{base}/hello", headers={"Origin": "https://evil.example"})
        assert status == 200 and "Access-Control-Allow-Origin" not in headers
    finally:
        code, output = stop(process)
    assert code == 0, output


async def test_without_cors_settings_a_preflight_is_not_answered(serve_app: Any, tmp_path: Path) -> None:
    served = serve_app(write_app(tmp_path / "app", APP, extensions(unique("NoCors"))))
    preflight = {"Origin": "https://allowed.example", "Access-Control-Request-Method": "POST"}
    status, headers, _ = await fetch("OPTIONS", f"{served.base_url}/api/start/greet", headers=preflight)
    assert status == 404 and "Access-Control-Allow-Origin" not in headers


# -- start-up errors and shutdown ---------------------------------------------------------------------
def test_an_import_error_stops_the_azurite_durable_start_started(tmp_path: Path) -> None:
    ports = free_ports(3)
    probe = tmp_path / "storage-was-up"
    source = f"""
        from pathlib import Path
        from durable.host._azurite import accepts_connections

        Path({str(probe)!r}).write_text(str(accepts_connections({ports[1]})))
        import no_such_module_here
    """
    app_dir = write_app(tmp_path / "app", source, {})
    process = run_durable_start(app_dir, connection_string(*ports))  # Azurite's account, nothing listening
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 1, output
    assert "function_app.py failed to import" in output
    assert "ModuleNotFoundError: No module named 'no_such_module_here'" in output
    assert probe.read_text() == "True"  # durable start had started Azurite for the app...
    assert not any(accepts_connections(p) for p in ports)  # ...and stopped it on the way out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_start_up_stops_the_azurite_durable_start_started(tmp_path: Path, sig: int) -> None:
    ports = free_ports(3)
    importing = tmp_path / "importing"
    source = f"""
        import time
        from pathlib import Path

        Path({str(importing)!r}).touch()
        time.sleep(60)
    """
    process = run_durable_start(write_app(tmp_path / "app", source, {}), connection_string(*ports))
    try:
        wait_for(importing.exists, "function_app.py to be imported")
        assert accepts_connections(ports[1])  # Azurite is up, started for this app
        code, output = stop(process, sig)
    finally:
        process.kill()
    assert code != 0, output  # interrupted, not served
    assert not any(accepts_connections(p) for p in ports), output


def test_unreachable_storage_at_start_names_the_endpoint(tmp_path: Path) -> None:
    blob, queue, table = free_ports(3)
    account = "someaccount"  # not the emulator's account, so durable start does not start one
    connection = (
        f"DefaultEndpointsProtocol=http;AccountName={account};AccountKey={DEV_KEY};"
        f"BlobEndpoint=http://127.0.0.1:{blob}/{account};QueueEndpoint=http://127.0.0.1:{queue}/{account};"
        f"TableEndpoint=http://127.0.0.1:{table}/{account};"
    )
    app_dir = write_app(tmp_path / "app", "import azure.functions as func\napp = func.FunctionApp()\n", {})
    process = run_durable_start(app_dir, connection)
    output, _ = process.communicate(timeout=WAIT)
    assert process.returncode == 1, output
    assert f"cannot reach Azure Storage at http://127.0.0.1:{queue}" in output
    assert "azurite" in output
    assert "Traceback" not in output


async def test_sigterm_exits_promptly_when_storage_is_gone(tmp_path: Path) -> None:
    app_dir = write_app(tmp_path / "app", APP, extensions(unique("Outage")))
    with Azurite() as emulator:
        served = start_host(app_dir, emulator.connection_string, tmp_path / "host.log")
        queue_port = emulator.ports[1]
        status, _ = await fetch_json("POST", f"{served.base_url}/api/start/sleepy", json=60)
        assert status == 202
        await logged(served, r"Executing 'Functions\.nap'")
    # Azurite is gone while a long activity runs. The pollers say so (once each), naming the
    # endpoint, and a SIGTERM ends the host after the grace period, activity or not.
    await logged(served, rf"cannot reach Azure Storage at http://127\.0\.0\.1:{queue_port} .*Azurite")
    began = time.monotonic()
    code, _ = stop(served.process, signal.SIGTERM)
    took = time.monotonic() - began
    output = served.output()
    assert code == 0, output
    assert "Host stopped." in output
    assert took < SHUTDOWN_GRACE + 5, f"took {took:.1f} s to stop"
    assert output.count("cannot reach Azure Storage") <= 5, output  # once per poller (4 control queues, work items)


# -- settings -------------------------------------------------------------------------------------------
def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_durable_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    durable = {
        "maxConcurrentActivityFunctions": 3,
        "maxConcurrentOrchestratorFunctions": 5,
        "storageProvider": {"connectionName": "MyStorage"},
    }
    write_json(tmp_path / "host.json", {"extensions": {"durableTask": durable}})
    settings = HostSettings.load(tmp_path)
    assert (settings.max_concurrent_activities, settings.max_concurrent_orchestrations) == (3, 5)
    assert settings.connection_setting == "MyStorage"
    monkeypatch.setenv("MyStorage__accountName", "acct")
    monkeypatch.setenv("MyStorage__queueServiceUri", "https://acct.queue.core.windows.net")
    monkeypatch.delenv("MyStorage", raising=False)
    assert identity_connection("MyStorage") == {
        "accountName": "acct",
        "queueServiceUri": "https://acct.queue.core.windows.net",
    }
    with pytest.raises(SettingsError, match="MyStorage is an identity-based connection"):
        settings.connection_string()
    monkeypatch.setenv("MyStorage", "UseDevelopmentStorage=true")
    assert settings.connection_string() == "UseDevelopmentStorage=true"  # a connection string wins


def identity_settings(monkeypatch: pytest.MonkeyPatch, **values: str) -> None:
    for key in [k for k in os.environ if k.startswith("Conn__")]:
        monkeypatch.delenv(key)
    for key, value in values.items():
        monkeypatch.setenv(f"Conn__{key}", value)


async def test_identity_based_connections_resolve_as_the_functions_host_does(monkeypatch: pytest.MonkeyPatch) -> None:
    from azure.identity.aio import ClientSecretCredential, DefaultAzureCredential, ManagedIdentityCredential

    identity_settings(monkeypatch)
    assert resolve_identity_connection("Conn") is None
    identity_settings(monkeypatch, accountName="acct", credential="managedidentity", clientId="1234")
    found = resolve_identity_connection("Conn")
    assert found is not None
    assert (found.blob_uri, found.queue_uri, found.table_uri) == (
        "https://acct.blob.core.windows.net",
        "https://acct.queue.core.windows.net",
        "https://acct.table.core.windows.net",
    )
    credentials = [found.credential()]
    assert isinstance(credentials[0], ManagedIdentityCredential)
    # explicit endpoints (a sovereign cloud, or Azurite), names in any case; a service principal
    identity_settings(
        monkeypatch,
        serviceUri="https://b.example",
        QUEUESERVICEURI="https://q.example",
        tableServiceUri="https://t.example",
        tenantId="t",
        clientId="c",
        clientSecret="s",
    )
    found = resolve_identity_connection("Conn")
    assert found is not None and (found.blob_uri, found.queue_uri, found.table_uri) == (
        "https://b.example",
        "https://q.example",
        "https://t.example",
    )
    credentials.append(found.credential())
    assert isinstance(credentials[1], ClientSecretCredential)
    identity_settings(monkeypatch, accountName="acct")  # locally: the developer's sign-in
    found = resolve_identity_connection("Conn")
    assert found is not None
    credentials.append(found.credential())
    assert isinstance(credentials[2], DefaultAzureCredential)
    for credential in credentials:
        await credential.close()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"queueServiceUri": "https://q.example"},
            "has no blob endpoint: set Conn__accountName, or Conn__blobServiceUri",
        ),
        ({"accountName": "acct", "credential": "password"}, "Conn__credential must be managedidentity"),
    ],
)
def test_incomplete_identity_connections_are_refused(
    monkeypatch: pytest.MonkeyPatch, values: dict[str, str], message: str
) -> None:
    identity_settings(monkeypatch, **values)
    with pytest.raises(SettingsError, match=message):
        resolve_identity_connection("Conn")


@pytest.mark.parametrize(
    ("host", "message"),
    [
        ({"extensions": {"durableTask": {"maxConcurrentActivityFunctions": 0}}}, "maxConcurrentActivityFunctions"),
        ({"extensions": {"durableTask": {"maxConcurrentOrchestratorFunctions": "x"}}}, "maxConcurrentOrchestrator"),
        ({"logging": {"logLevel": {"default": "Loud"}}}, "unknown level 'Loud'"),
        ({"logging": {"logLevel": "Warning"}}, "logging.logLevel must be an object"),
    ],
)
def test_bad_host_settings_are_refused(tmp_path: Path, host: dict[str, Any], message: str) -> None:
    write_json(tmp_path / "host.json", host)
    with pytest.raises(SettingsError, match=message):
        HostSettings.load(tmp_path)


def test_log_levels(tmp_path: Path) -> None:
    levels = {"default": "Warning", "Function": "Information", "Host.Triggers.DurableTask": "None"}
    write_json(tmp_path / "host.json", {"logging": {"logLevel": levels}})
    assert HostSettings.load(tmp_path).log_levels == {
        "default": 30,
        "Function": 20,
        "Host.Triggers.DurableTask": 60,
    }


@pytest.mark.parametrize(
    ("host", "message"),
    [
        ({"LocalHttpPort": 70000}, "LocalHttpPort must be a port number"),
        ({"CORS": ["a"]}, "CORS must be a string"),
        ({"CORSCredentials": "yes"}, "CORSCredentials must be true or false"),
        ({"CORS": "*", "CORSCredentials": True}, "cannot be true when Host.CORS allows every origin"),
        ({"UseHttps": True}, "Host.UseHttps is not supported"),
    ],
)
def test_bad_local_host_settings_are_refused(tmp_path: Path, host: dict[str, Any], message: str) -> None:
    write_json(tmp_path / "local.settings.json", {"Values": {}, "Host": host})
    with pytest.raises(SettingsError, match=message):
        load_local_host_options(tmp_path)


def test_local_host_settings(tmp_path: Path) -> None:
    assert load_local_host_options(tmp_path).http_port is None  # no file
    write_json(tmp_path / "local.settings.json", {"Host": {"LocalHttpPort": 7072, "CORS": "https://A.example/"}})
    options = load_local_host_options(tmp_path)
    assert options.http_port == 7072
    assert options.allows_origin("https://a.example") and not options.allows_origin("https://b.example")
    assert not options.cors_credentials


def test_which_connections_mean_a_local_emulator() -> None:
    assert local_emulator_ports("UseDevelopmentStorage=true") == (10000, 10001, 10002)
    assert local_emulator_ports(connection_string(1, 2, 3)) == (1, 2, 3)
    assert local_emulator_ports(connection_string(1, 2, 3, host="192.0.2.1")) is None
    other = "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=a2V5;EndpointSuffix=core.windows.net"
    assert local_emulator_ports(other) is None
