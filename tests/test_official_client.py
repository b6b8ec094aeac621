"""The official SDK's client class (``azure.durable_functions.DurableOrchestrationClient``, a test
dependency) driving our management API: built from the binding string our client hands over, over
real HTTP, through ``durable start``, on Azurite. Also the API's authorization over real HTTP, and
the History table's rows as DTFx tools read them."""

from __future__ import annotations

import asyncio
import json
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import azure.durable_functions as df_official
import azure.functions as func
import pytest
from azure.data.tables.aio import TableClient
from azure.durable_functions.models.utils import http_utils

from durable.core._history import EventType, HistoryEvent
from storage.azure import AzureStorageBackend
from tests.fixtures_host import ServedApp

FUNCTION_KEY = "function-key"
MASTER_KEY = "master-key"
SYSTEM_KEY = "durable-system-key"
WAIT = 60.0

APP = """
    import os
    from pathlib import Path

    import azure.functions as func

    import durable as df

    app = df.DFApp(http_auth_level=func.AuthLevel.FUNCTION)


    @app.route(route="binding", methods=["GET"])
    @app.durable_client_input(client_name="client")
    async def binding(req: func.HttpRequest, client: df.DurableOrchestrationClient) -> func.HttpResponse:
        return func.HttpResponse(client.binding_string, mimetype="application/json")


    @app.route(route="start/{name}", methods=["POST"], auth_level=func.AuthLevel.ANONYMOUS)
    @app.durable_client_input(client_name="client")
    async def start(req: func.HttpRequest, client: df.DurableOrchestrationClient) -> func.HttpResponse:
        instance_id = await client.start_new(req.route_params["name"], None, req.get_json() if req.get_body() else None)
        return client.create_check_status_response(req, instance_id)


    @app.orchestration_trigger(context_name="context")
    def echo(context: df.DurableOrchestrationContext):
        return context.get_input()
        yield


    @app.orchestration_trigger(context_name="context")
    def waiter(context: df.DurableOrchestrationContext):
        value = yield context.wait_for_external_event("Go")
        return {"got": value, "input": context.get_input()}


    @app.orchestration_trigger(context_name="context")
    def flaky(context: df.DurableOrchestrationContext):
        return (yield context.call_activity("heal_check", None))


    @app.activity_trigger(input_name="value")
    def heal_check(value: None) -> str:
        if not Path(os.environ["HEALED_FILE"]).exists():
            raise RuntimeError("not healed yet")
        return "healed"


    @app.entity_trigger(context_name="context")
    def counter(context: df.DurableEntityContext) -> None:
        context.set_state(context.get_state(lambda: 0) + (context.get_input() or 0))
"""


@pytest.fixture
def official_app(tmp_path: Path, serve_app: Callable[..., ServedApp]) -> ServedApp:
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "function_app.py").write_text(textwrap.dedent(APP))
    hub = f"official{uuid.uuid4().hex[:10]}"
    host = {"version": "2.0", "extensions": {"durableTask": {"hubName": hub}}}
    (app_dir / "host.json").write_text(json.dumps(host))
    return serve_app(
        app_dir,
        "--function-key",
        FUNCTION_KEY,
        "--master-key",
        MASTER_KEY,
        DURABLE_MANAGEMENT_KEY=SYSTEM_KEY,
        HEALED_FILE=str(tmp_path / "healed"),
    )


@pytest.fixture(autouse=True)
async def fresh_official_session() -> AsyncIterator[None]:
    """The official client keeps one aiohttp session per process; each test has its own loop."""
    yield
    await http_utils._close_session()


async def fetch(method: str, url: str, **kwargs: Any) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as http, http.request(method, url, **kwargs) as response:
        return response.status, dict(response.headers), await response.read()


async def official_client(app: ServedApp) -> df_official.DurableOrchestrationClient:
    status, _, binding = await fetch("GET", f"{app.base_url}/api/binding?code={FUNCTION_KEY}")
    assert status == 200, binding
    return df_official.DurableOrchestrationClient(binding.decode())


async def eventually(check: Callable[[], Awaitable[Any]], what: str) -> Any:
    deadline = time.monotonic() + WAIT
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def status_is(
    client: df_official.DurableOrchestrationClient, instance_id: str, *statuses: str
) -> df_official.DurableOrchestrationStatus:
    async def check() -> Any:
        status = await client.get_status(instance_id)
        return status if status and status.runtime_status.value in statuses else None

    return await eventually(check, f"{instance_id} to be {'/'.join(statuses)}")


# -- the official client ---------------------------------------------------------------------------


async def test_official_client_drives_orchestrations(official_app: ServedApp) -> None:
    client = await official_client(official_app)
    Status = df_official.OrchestrationRuntimeStatus

    echo_id = await client.start_new("echo", None, {"a": [1, "two"]})
    done = await status_is(client, echo_id, "Completed")
    assert (done.output, done.input_, done.name) == ({"a": [1, "two"]}, {"a": [1, "two"]}, "echo")
    missing = await client.get_status("no-such-instance")
    assert not missing  # the official client's "not found"
    with pytest.raises(Exception, match="nope"):  # its message is read from ExceptionMessage
        await client.start_new("nope")

    await client.start_new("waiter", "w-1", [1, 2])
    await status_is(client, "w-1", "Running")
    await client.raise_event("w-1", "Go", {"x": "y"})
    assert (await status_is(client, "w-1", "Completed")).output == {"got": {"x": "y"}, "input": [1, 2]}
    with pytest.raises(Exception, match="gone"):  # raising an event on a finished instance
        await client.raise_event("w-1", "Go", 1)

    await client.start_new("waiter", "w-2")
    await status_is(client, "w-2", "Running")
    await client.suspend("w-2", "a pause")
    await status_is(client, "w-2", "Suspended")
    await client.resume("w-2", "go on")
    await status_is(client, "w-2", "Running")
    await client.terminate("w-2", "enough")
    await status_is(client, "w-2", "Terminated")
    await client.terminate("w-2", "again")  # 410, which the official client accepts
    with pytest.raises(Exception, match="No instance"):
        await client.terminate("ghost", "why")

    restarted = await client.restart(echo_id)
    assert isinstance(restarted, str) and restarted != echo_id
    assert (await status_is(client, restarted, "Completed")).output == {"a": [1, "two"]}
    assert await client.restart(echo_id, restart_with_new_instance_id=False) == echo_id

    every = {s.instance_id for s in await client.get_status_all()}
    assert {echo_id, "w-1", "w-2", restarted} <= every
    completed = await client.get_status_by(runtime_status=[Status.Completed])
    assert "w-1" in {s.instance_id for s in completed} and "w-2" not in {s.instance_id for s in completed}
    since = datetime.now(timezone.utc) - timedelta(minutes=10)
    assert {s.instance_id for s in await client.get_status_by(created_time_from=since)} >= {"w-1", "w-2"}
    assert await client.get_status_by(created_time_to=since) == []

    await client.start_new("flaky", "f-1")
    await status_is(client, "f-1", "Failed")
    (official_app.app_dir.parent / "healed").touch()
    await client.rewind("f-1", "fixed")
    assert (await status_is(client, "f-1", "Completed")).output == "healed"

    assert (await client.purge_instance_history("w-1")).instances_deleted == 1
    assert (await client.purge_instance_history("w-1")).instances_deleted == 0
    assert not await client.get_status("w-1")
    purged = await client.purge_instance_history_by(created_time_from=since, runtime_status=[Status.Terminated])
    assert purged.instances_deleted == 1  # w-2


async def test_official_client_entities_and_http_responses(official_app: ServedApp) -> None:
    client = await official_client(official_app)
    counter = df_official.EntityId("counter", "c1")
    assert (await client.read_entity_state(counter)).entity_exists is False
    await client.signal_entity(counter, "add", 5)
    await client.signal_entity(counter, "add", 2)

    async def seven() -> Any:
        state = await client.read_entity_state(counter)
        return state.entity_exists and state.entity_state == 7

    await eventually(seven, "the counter to reach 7")
    with pytest.raises(Exception, match="404"):  # an entity name the app does not have
        await client.signal_entity(df_official.EntityId("nosuch", "k"), "add", 1)

    request = func.HttpRequest("POST", f"{official_app.base_url}/api/anything", body=b"")
    instance_id = await client.start_new("echo", None, {"out": 1})
    response = await client.wait_for_completion_or_create_check_status_response(request, instance_id, 20000, 200)
    assert (response.status_code, json.loads(response.get_body())) == (200, {"out": 1})

    check = client.create_check_status_response(request, instance_id)
    assert check.status_code == 202
    links = json.loads(check.get_body())
    assert links["id"] == instance_id
    assert f"code={SYSTEM_KEY}" in links["statusQueryGetUri"] and MASTER_KEY not in check.get_body().decode()
    status, _, body = await fetch("GET", links["statusQueryGetUri"])
    assert (status, json.loads(body)["output"]) == (200, {"out": 1})


# -- authorization over real HTTP --------------------------------------------------------------------


async def test_management_api_authorization_over_http(official_app: ServedApp) -> None:
    api = f"{official_app.base_url}/api/durabletask/instances"
    assert (await fetch("GET", api))[0] == 401
    assert (await fetch("GET", f"{api}?code={FUNCTION_KEY}"))[0] == 401  # a function key is not enough
    assert (await fetch("GET", api, headers={"x-functions-key": FUNCTION_KEY}))[0] == 401
    assert (await fetch("GET", f"{api}?code={SYSTEM_KEY}"))[0] == 200
    assert (await fetch("GET", f"{api}?code={MASTER_KEY}"))[0] == 200
    for code in ("%C3%A9t%C3%A9", "%E2%98%83"):  # non-ASCII keys: refused, not a server error
        assert (await fetch("GET", f"{api}?code={code}"))[0] == 401
        assert (await fetch("GET", f"{official_app.base_url}/api/binding?code={code}"))[0] == 401

    # An anonymous starter hands out URLs with the system key only, at the host's own address.
    status, headers, body = await fetch(
        "POST", f"{official_app.base_url}/api/start/echo", json=1, headers={"Host": "attacker.example"}
    )
    assert status == 202, body
    links = json.loads(body)
    assert headers["Location"] == links["statusQueryGetUri"]
    for name, url in links.items():
        if name != "id":
            assert url.startswith(f"{official_app.base_url}/api/durabletask/instances/"), (name, url)
            assert f"code={SYSTEM_KEY}" in url and MASTER_KEY not in url and FUNCTION_KEY not in url, (name, url)

    bounds = "createdTimeFrom=0001-01-01T00:00:00Z&createdTimeTo=9999-12-31T23:59:59.999999Z"
    for query in (bounds, bounds.split("&")[0], bounds.split("&")[1]):
        status, _, body = await fetch("GET", f"{api}?{query}&code={SYSTEM_KEY}")
        assert status == 200, body
        assert links["id"] in {s["instanceId"] for s in json.loads(body)}
    status, _, body = await fetch("DELETE", f"{api}?createdTimeFrom=0001-01-01T00:00:00Z&code={SYSTEM_KEY}")
    assert status in (200, 404), body
    entities = f"{official_app.base_url}/api/durabletask/entities?code={SYSTEM_KEY}"
    assert (await fetch("GET", f"{entities}&lastOperationTimeTo={quote('9999-12-31T23:59:59.9999999Z')}"))[0] == 200


# -- the History table as DTFx tools read it ----------------------------------------------------------


async def test_every_history_row_carries_its_execution_id(azure_backend: AzureStorageBackend, azurite: str) -> None:
    now = datetime.now(timezone.utc)
    started = HistoryEvent(EventType.EXECUTION_STARTED, now, name="o", instance_id="i/1", execution_id="exec-1")
    events = [
        HistoryEvent(EventType.ORCHESTRATOR_STARTED, now),
        started,
        HistoryEvent(EventType.TASK_SCHEDULED, now, event_id=0, name="a"),
        HistoryEvent(EventType.ORCHESTRATOR_COMPLETED, now),
    ]
    etag = await azure_backend.commit(
        "i/1", expected_etag=None, execution_id="exec-1", keep=0, new_events=events, outbox_start=0, checkpoint=1
    )
    later = [
        HistoryEvent(EventType.ORCHESTRATOR_STARTED, now),
        HistoryEvent(EventType.TASK_COMPLETED, now, task_scheduled_id=0, result='"r"'),
    ]
    await azure_backend.commit(
        "i/1", expected_etag=etag, execution_id="exec-1", keep=4, new_events=later, outbox_start=0, checkpoint=2
    )

    table = TableClient.from_connection_string(azurite, azure_backend.history_table_name)
    async with table:
        rows = [dict(r) async for r in table.query_entities("PartitionKey eq 'i^01'")]
    history_rows = [r for r in rows if r["RowKey"] != "sentinel"]
    assert len(history_rows) == 6
    assert {r["EventType"] for r in history_rows} >= {"OrchestratorStarted", "TaskScheduled", "TaskCompleted"}
    assert all(r["ExecutionId"] == "exec-1" for r in history_rows), history_rows

    loaded = await azure_backend.load_history("i/1")
    assert list(loaded.events) == [*events, *later]  # the row's execution is not taken for the event's own
