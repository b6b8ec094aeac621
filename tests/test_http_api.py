"""The management HTTP API (``durable.host._http_api``) and the client's HTTP helpers, driven with real
``azure.functions.HttpRequest`` objects against the in-memory runtime."""

from __future__ import annotations

import asyncio
import json
import re
from datetime import timedelta
from typing import Any
from urllib.parse import quote

import azure.durable_functions as df_official
import azure.functions as func
import pytest

import durable as df
from durable import EventType
from durable.core._messages import WorkMessage
from durable.host._client_binding import (
    AZURE_INSTANCE_SETTING,
    MANAGEMENT_KEY_SETTING,
    MASTER_KEY_SETTING,
    ManagementKeys,
    same_key,
)
from durable.host._host import AuthKeys
from durable.host._http_api import handle_management_request
from durable.runtime._client import DurableOrchestrationClient, OrchestrationAlreadyExistsError

S = df.OrchestrationRuntimeStatus
HOST = "http://localhost:7071"
BASE = f"{HOST}/api/durabletask/"


def _register(app: df.DFApp) -> None:
    @app.orchestration_trigger(context_name="context")
    def echo(context):
        return context.get_input()
        yield  # a generator orchestrator

    @app.orchestration_trigger(context_name="context")
    def waiter(context):
        value = yield context.wait_for_external_event("Go")
        return {"got": value, "input": context.get_input()}

    @app.orchestration_trigger(context_name="context")
    def boom(context):
        yield context.call_activity("explode", None)

    @app.activity_trigger(input_name="value")
    def explode(value):
        raise ValueError("kaboom")


@pytest.fixture
def client(app, runtime) -> DurableOrchestrationClient:
    _register(app)
    return runtime.client()


def make_request(
    method: str,
    path_and_query: str,
    *,
    body: bytes | str | None = None,
    json_body: Any = None,
    headers: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
    base: str = BASE,
) -> func.HttpRequest:
    headers = dict(headers or {})
    if json_body is not None:
        body = json.dumps(json_body)
        headers.setdefault("Content-Type", "application/json")
    raw = body.encode() if isinstance(body, str) else (body or b"")
    return func.HttpRequest(method, base + path_and_query, headers=headers, params=params, body=raw)


async def call(
    client: DurableOrchestrationClient, method: str, path_and_query: str, **kwargs: Any
) -> func.HttpResponse:
    request = make_request(method, path_and_query, **kwargs)
    return await handle_management_request(client, request, path_and_query.split("?")[0])


def body_of(response: func.HttpResponse) -> Any:
    return json.loads(response.get_body())


def assert_error(response: func.HttpResponse, status_code: int, *fragments: str) -> None:
    assert response.status_code == status_code, response.get_body()
    assert response.headers["Content-Type"] == "application/json"
    message = body_of(response)["ExceptionMessage"]
    for fragment in fragments:
        assert fragment in message


async def start(runtime, client, name: str, instance_id: str, value: Any = None) -> str:
    iid = await client.start_new(name, instance_id, value)
    await runtime.worker.run_until_idle()
    return iid


def sent_events(runtime, instance_id: str) -> list[EventType]:
    """Event types of the visible-or-not messages waiting in the instance's control queue."""
    events = []
    for queue in runtime.backend.queues.values():
        for stored in queue:
            message = WorkMessage.from_json(stored.body)
            if message.instance_id == instance_id:
                events.append(message.event.event_type)
    return events


# -- start ------------------------------------------------------------------------------------------


async def test_start_returns_check_status_response(client, runtime):
    response = await call(client, "POST", "orchestrators/echo", json_body={"a": 1})
    assert response.status_code == 202
    payload = body_of(response)
    iid = payload["id"]
    assert response.headers["Location"] == payload["statusQueryGetUri"]
    assert response.headers["Retry-After"] == "10"
    assert response.headers["Content-Type"] == "application/json"
    assert payload["statusQueryGetUri"] == f"{BASE}instances/{iid}?connection=Storage"
    assert payload["sendEventPostUri"] == f"{BASE}instances/{iid}/raiseEvent/{{eventName}}?connection=Storage"

    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed
    assert status.output == {"a": 1}


async def test_start_with_instance_id_and_no_body(client, runtime):
    response = await call(client, "POST", "orchestrators/echo/my-id")
    assert response.status_code == 202
    assert body_of(response)["id"] == "my-id"
    await runtime.worker.run_until_idle()
    status = await client.get_status("my-id")
    assert status.runtime_status is S.Completed
    assert status.output is None


async def test_start_with_running_id_is_conflict(client, runtime):
    assert (await call(client, "POST", "orchestrators/waiter/dup")).status_code == 202
    # The same start repeated while Pending is taken as a retry of it (its first send may have
    # been lost); a different start for the Pending id is a conflict.
    assert (await call(client, "POST", "orchestrators/waiter/dup")).status_code == 202
    assert_error(await call(client, "POST", "orchestrators/waiter/dup", body=b'"other"'), 409, "dup")
    await runtime.worker.run_until_idle()
    assert_error(await call(client, "POST", "orchestrators/waiter/dup"), 409, "dup")  # Running
    # once finished, the id may be reused
    await client.terminate("dup")
    await runtime.worker.run_until_idle()
    assert (await call(client, "POST", "orchestrators/waiter/dup")).status_code == 202


async def test_start_unknown_function_is_bad_request(client):
    assert_error(await call(client, "POST", "orchestrators/nope"), 400, "nope")


@pytest.mark.parametrize(
    ("body", "fragment"),
    [("{not json", "JSON"), ('{"a": [1, 2', "JSON"), ("NaN", "NaN"), ('{"a": Infinity}', "Infinity"),
     (b"\xff\xfe", "UTF-8"), (b'"caf\xe9"', "UTF-8")],
)  # fmt: skip
async def test_start_with_malformed_body_is_bad_request(client, body, fragment):
    assert_error(await call(client, "POST", "orchestrators/echo", body=body), 400, fragment)


@pytest.mark.parametrize("raw_id", ["%01bad", "%C2%85bad", "x" * 300, "@entity", "%20", "%ff"])
async def test_start_with_malformed_id_is_bad_request(client, raw_id):
    response = await call(client, "POST", f"orchestrators/echo/{raw_id}")
    assert_error(response, 400)


async def test_instance_id_is_url_decoded_and_encoded(client, runtime):
    response = await call(client, "POST", "orchestrators/waiter/a%2Fb%20c")
    assert response.status_code == 202
    payload = body_of(response)
    assert payload["id"] == "a/b c"
    assert payload["statusQueryGetUri"].startswith(f"{BASE}instances/a%2Fb%20c?")
    await runtime.worker.run_until_idle()
    status = await call(client, "GET", "instances/a%2Fb%20c")
    assert status.status_code == 202
    assert body_of(status)["instanceId"] == "a/b c"


@pytest.mark.parametrize("given_path", ["instances/a%2Fb%2541", "instances/a/b%41", "instances/a%2Fb%41"])
async def test_instance_id_survives_hosts_that_decode_the_path(client, runtime, given_path):
    """The URL keeps the raw path; a host may hand over the route's path decoded, or half-decoded
    (ASP.NET keeps %2F)."""
    await start(runtime, client, "waiter", "a/b%41")
    request = make_request("GET", "instances/a%2Fb%2541")
    response = await handle_management_request(client, request, given_path)
    assert response.status_code == 202
    assert body_of(response)["instanceId"] == "a/b%41"


async def test_path_not_in_url_is_decoded_by_segment(client, runtime):
    await start(runtime, client, "waiter", "x/y")
    request = make_request("GET", "", base="http://localhost:7071/mgmt")
    response = await handle_management_request(client, request, "instances/x%2Fy")
    assert response.status_code == 202


async def test_start_and_wait_with_timeout_query(client, runtime):
    response = await call(client, "POST", "orchestrators/waiter/w1?timeout=0.05&pollingInterval=0.01")
    assert response.status_code == 202  # did not finish in time: the check-status response
    assert body_of(response)["id"] == "w1"

    async def run_soon() -> None:
        await asyncio.sleep(0.02)
        await runtime.worker.run_until_idle()

    worker = asyncio.create_task(run_soon())
    response = await call(client, "POST", "orchestrators/echo/e1?timeout=5&pollingInterval=0.01", json_body=[1, 2])
    await worker
    assert response.status_code == 200
    assert body_of(response) == [1, 2]


@pytest.mark.parametrize(
    "query", ["timeout=abc&pollingInterval=1", "timeout=1&pollingInterval=-1", "timeout=nan&pollingInterval=1"]
)
async def test_start_with_malformed_timeout_is_bad_request(client, query):
    assert_error(await call(client, "POST", f"orchestrators/echo?{query}"), 400)


async def test_polling_interval_longer_than_timeout_is_bad_request(client):
    assert_error(await call(client, "POST", "orchestrators/echo?timeout=1&pollingInterval=2"), 400, "pollingInterval")


# -- status -----------------------------------------------------------------------------------------


async def test_get_status_of_running_instance(client, runtime, clock):
    await start(runtime, client, "waiter", "r1", {"x": 1})
    response = await call(client, "GET", "instances/r1?taskHub=&code=abc")
    assert response.status_code == 202
    assert response.headers["Location"] == f"{BASE}instances/r1?taskHub=&code=abc"
    assert response.headers["Retry-After"] == "5"
    payload = body_of(response)
    assert payload == {
        "name": "waiter",
        "instanceId": "r1",
        "runtimeStatus": "Running",
        "input": {"x": 1},
        "customStatus": None,
        "output": None,
        "createdTime": clock().strftime("%Y-%m-%dT%H:%M:%SZ"),
        "lastUpdatedTime": clock().strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


async def test_get_status_of_completed_instance_with_history(client, runtime):
    await start(runtime, client, "echo", "c1", "hi")
    response = await call(client, "GET", "instances/c1")
    assert response.status_code == 200
    assert "Location" not in response.headers
    payload = body_of(response)
    assert payload["runtimeStatus"] == "Completed"
    assert payload["output"] == "hi"
    assert "historyEvents" not in payload

    response = await call(client, "GET", "instances/c1?showHistory=true&showHistoryOutput=TRUE&showInput=false")
    payload = body_of(response)
    assert payload["input"] is None
    kinds = [e["EventType"] for e in payload["historyEvents"]]
    assert kinds == ["ExecutionStarted", "ExecutionCompleted"]  # no replay bookkeeping
    assert payload["historyEvents"][0]["FunctionName"] == "echo"
    assert "Input" not in payload["historyEvents"][0]  # showInput=false
    assert payload["historyEvents"][-1]["Result"] == "hi"
    assert payload["historyEvents"][-1]["OrchestrationStatus"] == "Completed"

    payload = body_of(await call(client, "GET", "instances/c1?showHistory=true"))
    assert "Result" not in payload["historyEvents"][-1]


async def test_get_status_of_failed_and_terminated_instances(client, runtime):
    await start(runtime, client, "boom", "f1")
    response = await call(client, "GET", "instances/f1")
    assert response.status_code == 200  # the extension answers 200 for Failed ...
    assert body_of(response)["runtimeStatus"] == "Failed"
    assert "kaboom" in body_of(response)["output"]
    # ... unless asked for a 500
    assert (await call(client, "GET", "instances/f1?returnInternalServerErrorOnFailure=true")).status_code == 500

    await start(runtime, client, "waiter", "t1")
    await client.terminate("t1", "enough")
    await runtime.worker.run_until_idle()
    response = await call(client, "GET", "instances/t1")
    assert response.status_code == 200
    assert body_of(response)["runtimeStatus"] == "Terminated"


async def test_get_status_of_suspended_instance_is_accepted(client, runtime):
    await start(runtime, client, "waiter", "s1")
    await client.suspend("s1")
    await runtime.worker.run_until_idle()
    response = await call(client, "GET", "instances/s1")
    assert response.status_code == 202
    assert body_of(response)["runtimeStatus"] == "Suspended"


async def test_get_status_of_unknown_instance_is_not_found(client):
    assert_error(await call(client, "GET", "instances/nobody"), 404, "nobody")


@pytest.mark.parametrize("query", ["showHistory=yes", "showInput=1", "showHistoryOutput=maybe"])
async def test_get_status_with_malformed_bool_is_bad_request(client, runtime, query):
    await start(runtime, client, "echo", "b1")
    assert_error(await call(client, "GET", f"instances/b1?{query}"), 400, "'true' or 'false'")


async def test_query_params_from_request_params_are_honoured(client, runtime):
    await start(runtime, client, "echo", "p1", 5)
    request = make_request("GET", "instances/p1", params={"showInput": "false"})
    response = await handle_management_request(client, request, "instances/p1")
    assert body_of(response)["input"] is None


# -- list -------------------------------------------------------------------------------------------


async def _populate(runtime, client, clock) -> None:
    await start(runtime, client, "echo", "job-1", 1)
    clock.advance(60)
    await start(runtime, client, "echo", "job-2", 2)
    clock.advance(60)
    await start(runtime, client, "waiter", "other-1", 3)
    clock.advance(60)
    await start(runtime, client, "boom", "job-3")


@pytest.mark.parametrize("path", ["instances", "instances/"])
async def test_list_instances(client, runtime, clock, path):
    await _populate(runtime, client, clock)
    response = await call(client, "GET", path)
    assert response.status_code == 200
    assert "x-ms-continuation-token" not in response.headers
    payload = body_of(response)
    assert sorted(p["instanceId"] for p in payload) == ["job-1", "job-2", "job-3", "other-1"]
    assert {p["instanceId"]: p["input"] for p in payload}["job-2"] == 2


async def test_list_instances_with_filters(client, runtime, clock):
    start_time = clock()
    await _populate(runtime, client, clock)

    def ids(response: func.HttpResponse) -> list[str]:
        assert response.status_code == 200, response.get_body()
        return sorted(p["instanceId"] for p in body_of(response))

    assert ids(await call(client, "GET", "instances?runtimeStatus=Completed")) == ["job-1", "job-2"]
    assert ids(await call(client, "GET", "instances?runtimeStatus=running,Failed")) == ["job-3", "other-1"]
    assert ids(await call(client, "GET", "instances?runtimeStatus=Running&runtimeStatus=Failed")) == [
        "job-3",
        "other-1",
    ]
    assert ids(await call(client, "GET", "instances?runtimeStatus=Canceled")) == []
    assert ids(await call(client, "GET", "instances?instanceIdPrefix=job-")) == ["job-1", "job-2", "job-3"]
    since = quote((start_time + timedelta(seconds=60)).isoformat())
    until = (start_time + timedelta(seconds=120)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert ids(await call(client, "GET", f"instances?createdTimeFrom={since}&createdTimeTo={until}")) == [
        "job-2",
        "other-1",
    ]
    # an unencoded "+" in the offset arrives as a space
    since_plus = (start_time + timedelta(seconds=150)).strftime("%Y-%m-%dT%H:%M:%S+00:00")
    assert ids(await call(client, "GET", f"instances?createdTimeFrom={since_plus}")) == ["job-3"]
    payload = body_of(await call(client, "GET", "instances?instanceIdPrefix=job-1&showInput=false"))
    assert payload[0]["input"] is None


async def test_list_instances_pages_with_continuation_token(client, runtime, clock):
    await _populate(runtime, client, clock)
    seen: list[str] = []
    token = None
    pages = 0
    while True:
        headers = {"x-ms-continuation-token": token} if token else None
        response = await call(client, "GET", "instances?top=3", headers=headers)
        assert response.status_code == 200
        page = body_of(response)
        assert len(page) <= 3
        seen += [p["instanceId"] for p in page]
        pages += 1
        token = response.headers.get("x-ms-continuation-token")
        if not token:
            break
    assert pages == 2
    assert sorted(seen) == ["job-1", "job-2", "job-3", "other-1"]


@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        ("top=0", "top"),
        ("top=-1", "top"),
        ("top=abc", "top"),
        ("top=1.5", "top"),
        ("createdTimeFrom=yesterday", "createdTimeFrom"),
        ("createdTimeTo=2026-13-01", "createdTimeTo"),
        ("runtimeStatus=Running,Sleeping", "Sleeping"),
        ("showInput=nope", "showInput"),
    ],
)
async def test_list_instances_with_malformed_query_is_bad_request(client, query, fragment):
    assert_error(await call(client, "GET", f"instances?{query}"), 400, fragment)


async def test_list_instances_with_malformed_continuation_token_is_bad_request(client, runtime, clock):
    await _populate(runtime, client, clock)
    response = await call(client, "GET", "instances", headers={"x-ms-continuation-token": "garbage"})
    assert_error(response, 400)


async def test_get_status_page(client, runtime, clock):
    await _populate(runtime, client, clock)
    page, token = await client.get_status_page(instance_id_prefix="job-", page_size=2, show_input=False)
    assert [s.instance_id for s in page] == ["job-1", "job-2"]
    assert all(s.input_ is None for s in page)
    assert token is not None
    page, token = await client.get_status_page(instance_id_prefix="job-", page_size=2, continuation_token=token)
    assert [s.instance_id for s in page] == ["job-3"]
    assert token is None
    page, _ = await client.get_status_page(runtime_status=[S.Running])
    assert [s.instance_id for s in page] == ["other-1"]
    with pytest.raises(ValueError):
        await client.get_status_page(page_size=0)


# -- raise event, terminate, suspend, resume --------------------------------------------------------


async def test_raise_event(client, runtime):
    await start(runtime, client, "waiter", "e1", "in")
    response = await call(client, "POST", "instances/e1/raiseEvent/Go", json_body={"ok": True})
    assert response.status_code == 202
    assert response.get_body() == b""
    await runtime.worker.run_until_idle()
    status = await client.get_status("e1")
    assert status.runtime_status is S.Completed
    assert status.output == {"got": {"ok": True}, "input": "in"}


async def test_raise_event_errors(client, runtime):
    assert_error(await call(client, "POST", "instances/ghost/raiseEvent/Go", json_body=1), 404)
    await start(runtime, client, "echo", "done")
    assert_error(await call(client, "POST", "instances/done/raiseEvent/Go", json_body=1), 410)
    await start(runtime, client, "waiter", "e2")
    plain = {"Content-Type": "text/plain"}
    assert_error(
        await call(client, "POST", "instances/e2/raiseEvent/Go", body="1", headers=plain), 400, "application/json"
    )
    assert_error(await call(client, "POST", "instances/e2/raiseEvent/Go", body="1"), 400, "application/json")
    json_header = {"Content-Type": "application/json; charset=utf-8"}
    assert_error(
        await call(client, "POST", "instances/e2/raiseEvent/Go", body="{oops", headers=json_header), 400, "JSON"
    )
    # a charset parameter is fine
    assert (
        await call(client, "POST", "instances/e2/raiseEvent/Go", body='"v"', headers=json_header)
    ).status_code == 202
    # the route is case-insensitive, as the extension's
    assert (await call(client, "POST", "instances/e2/RAISEEVENT/Go", json_body=2)).status_code == 202


async def test_terminate(client, runtime):
    await start(runtime, client, "waiter", "t1")
    response = await call(client, "POST", "instances/t1/terminate?reason=tired")
    assert response.status_code == 202
    await runtime.worker.run_until_idle()
    status = await client.get_status("t1")
    assert status.runtime_status is S.Terminated
    assert status.output == "tired"
    assert_error(await call(client, "POST", "instances/t1/terminate"), 410, "Terminated")
    assert_error(await call(client, "POST", "instances/ghost/terminate"), 404)


async def test_suspend_and_resume(client, runtime):
    await start(runtime, client, "waiter", "s1")
    assert (await call(client, "POST", "instances/s1/suspend?reason=wait")).status_code == 202
    await runtime.worker.run_until_idle()
    assert (await client.get_status("s1")).runtime_status is S.Suspended
    assert (await call(client, "POST", "instances/s1/resume?reason=go")).status_code == 202
    await runtime.worker.run_until_idle()
    assert (await client.get_status("s1")).runtime_status is S.Running

    assert_error(await call(client, "POST", "instances/ghost/suspend"), 404)
    assert_error(await call(client, "POST", "instances/ghost/resume"), 404)
    await start(runtime, client, "echo", "fin")
    assert_error(await call(client, "POST", "instances/fin/suspend"), 410)
    assert_error(await call(client, "POST", "instances/fin/resume"), 410)


# -- rewind -----------------------------------------------------------------------------------------


async def test_rewind_route(client, runtime):
    assert_error(await call(client, "POST", "instances/ghost/rewind"), 404)
    await start(runtime, client, "waiter", "running")
    assert_error(await call(client, "POST", "instances/running/rewind"), 410, "Failed")
    await start(runtime, client, "echo", "completed")
    assert_error(await call(client, "POST", "instances/completed/rewind"), 410, "Failed")

    await start(runtime, client, "boom", "failed")
    response = await call(client, "POST", "instances/failed/rewind?reason=fixed")
    assert response.status_code == 202
    assert sent_events(runtime, "failed") == [EventType.EXECUTION_REWOUND]


async def test_client_rewind(client, runtime):
    with pytest.raises(ValueError, match="no instance"):
        await client.rewind("ghost", "why")
    await start(runtime, client, "echo", "ok")
    with pytest.raises(ValueError, match="only Failed"):
        await client.rewind("ok", "why")
    assert sent_events(runtime, "ok") == []

    await start(runtime, client, "boom", "bad")
    await client.rewind("bad", "fixed it")
    queued = [WorkMessage.from_json(m.body) for q in runtime.backend.queues.values() for m in q]
    rewinds = [m for m in queued if m.instance_id == "bad"]
    assert len(rewinds) == 1
    assert rewinds[0].event.event_type is EventType.EXECUTION_REWOUND
    assert rewinds[0].event.input == '"fixed it"'


# -- restart ----------------------------------------------------------------------------------------


async def test_restart_with_new_instance_id(client, runtime):
    await start(runtime, client, "echo", "orig", {"n": 1})
    response = await call(client, "POST", "instances/orig/restart")
    assert response.status_code == 202
    new_id = body_of(response)["id"]
    assert new_id != "orig"
    assert response.headers["Location"] == body_of(response)["statusQueryGetUri"]
    await runtime.worker.run_until_idle()
    status = await client.get_status(new_id)
    assert status.name == "echo"
    assert status.output == {"n": 1}


async def test_restart_with_same_instance_id(client, runtime):
    await start(runtime, client, "waiter", "same", "v")
    assert_error(await call(client, "POST", "instances/same/restart?restartWithNewInstanceId=false"), 409)
    await client.raise_event("same", "Go", 1)
    await runtime.worker.run_until_idle()
    response = await call(client, "POST", "instances/same/restart?restartWithNewInstanceId=false")
    assert response.status_code == 202
    assert body_of(response)["id"] == "same"
    await runtime.worker.run_until_idle()
    status = await client.get_status("same", show_input=True)
    assert status.runtime_status is S.Running
    assert status.input_ == "v"


async def test_restart_errors(client, runtime):
    assert_error(await call(client, "POST", "instances/ghost/restart"), 404, "ghost")
    await start(runtime, client, "echo", "r")
    assert_error(await call(client, "POST", "instances/r/restart?restartWithNewInstanceId=perhaps"), 400)


async def test_client_restart(client, runtime):
    await start(runtime, client, "waiter", "cr", [1])
    with pytest.raises(OrchestrationAlreadyExistsError):
        await client.restart("cr", restart_with_new_instance_id=False)
    new_id = await client.restart("cr")
    await runtime.worker.run_until_idle()
    assert (await client.get_status(new_id, show_input=True)).input_ == [1]
    with pytest.raises(ValueError):
        await client.restart("ghost")


# -- purge ------------------------------------------------------------------------------------------


async def test_purge_instance(client, runtime):
    await start(runtime, client, "echo", "p1")
    response = await call(client, "DELETE", "instances/p1")
    assert response.status_code == 200
    assert body_of(response) == {"instancesDeleted": 1}
    assert await client.get_status("p1") is None
    assert_error(await call(client, "DELETE", "instances/p1"), 404)
    await start(runtime, client, "waiter", "live")
    assert_error(await call(client, "DELETE", "instances/live"), 412, "Running")


async def test_purge_by_filter(client, runtime, clock):
    start_time = clock()
    await _populate(runtime, client, clock)
    since = start_time.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert_error(await call(client, "DELETE", "instances"), 400, "createdTimeFrom")
    assert_error(await call(client, "DELETE", "instances?createdTimeFrom=soon"), 400, "createdTimeFrom")
    future = (start_time + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert_error(await call(client, "DELETE", f"instances/?createdTimeFrom={future}"), 404)

    response = await call(client, "DELETE", f"instances/?createdTimeFrom={since}&runtimeStatus=Completed")
    assert response.status_code == 200
    assert body_of(response) == {"instancesDeleted": 2}
    response = await call(client, "DELETE", f"instances?createdTimeFrom={since}")
    assert body_of(response) == {"instancesDeleted": 1}  # job-3 (Failed); the running one stays
    assert [s.instance_id for s in await client.get_status_all()] == ["other-1"]


# -- entities, routing, errors ----------------------------------------------------------------------


async def test_entity_routes_signal_read_list_and_delete(app, runtime, client):
    @app.entity_trigger(context_name="context")
    def counter(context):
        value = context.get_state(lambda: 0)
        if context.operation_name == "add":
            value += context.get_input()
        context.set_state(value)

    assert_error(await call(client, "GET", "entities/Counter/c1"), 404, "does not exist")
    for key, amount in (("c1", 5), ("c1", 2), ("c2", 1)):
        response = await call(client, "POST", f"entities/Counter/{key}?op=add", json_body=amount)
        assert response.status_code == 202
    await runtime.worker.run_until_idle()

    response = await call(client, "GET", "entities/counter/c1")  # names are case-insensitive
    assert response.status_code == 200 and body_of(response) == 7

    first = await call(client, "GET", "entities/Counter?top=1&fetchState=true")
    assert first.status_code == 200
    token = first.headers.get("x-ms-continuation-token")
    assert token
    second = await call(
        client, "GET", "entities/Counter?top=1&fetchState=true", headers={"x-ms-continuation-token": token}
    )
    listed = body_of(first) + body_of(second)
    assert [(e["entityId"], e["state"]) for e in listed] == [
        ({"name": "counter", "key": "c1"}, 7),
        ({"name": "counter", "key": "c2"}, 1),
    ]
    assert "state" not in body_of(await call(client, "GET", "entities/Counter"))[0]

    assert (await call(client, "DELETE", "entities/Counter/c1")).status_code == 202
    await runtime.worker.run_until_idle()
    assert_error(await call(client, "GET", "entities/Counter/c1"), 404)
    assert [e["entityId"]["key"] for e in body_of(await call(client, "GET", "entities/Counter"))] == ["c2"]


@pytest.mark.parametrize(
    ("method", "path", "fragment"),
    [
        ("POST", "entities/Counter/c1", "'op'"),
        ("GET", "entities/Co@unter/c1", "invalid entity id"),
        ("PUT", "entities/Counter/c1", "not allowed"),
    ],
)
async def test_entity_routes_reject_bad_requests(client, method, path, fragment):
    response = await call(client, method, path)
    assert response.status_code in (400, 405)
    assert fragment in response.get_body().decode()


@pytest.mark.parametrize(
    "path",
    [
        "",
        "nothing",
        "instances/a/b/c/d",
        "instances/a/explode",
        "orchestrators",
        "orchestrators/a/b/c",
        "makeprimary",
        "entities/a/b/c",
    ],
)
async def test_unknown_routes_are_not_found(client, path):
    assert_error(await call(client, "GET", path), 404)


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "orchestrators/echo", "POST"),
        ("PUT", "instances", "DELETE, GET"),
        ("POST", "instances/x", "DELETE, GET"),
        ("GET", "instances/x/terminate", "POST"),
        ("DELETE", "instances/x/raiseEvent/Go", "POST"),
        ("PATCH", "entities/Counter/c1", "DELETE, GET, POST"),
    ],
)
async def test_wrong_method_is_not_allowed(client, method, path, allowed):
    response = await call(client, method, path)
    assert_error(response, 405, method)
    assert response.headers["Allow"] == allowed


@pytest.mark.parametrize(
    "path",
    [
        "instances/%01x",
        "instances/%C2%85x",
        "instances/%ff",
        "instances/%20%20",
        "instances//terminate",
        f"instances/{'y' * 257}/suspend",
    ],
)
async def test_malformed_instance_ids_are_bad_requests(client, path):
    method = "POST" if path.endswith(("terminate", "suspend")) else "GET"
    assert_error(await call(client, method, path), 400)


async def test_other_task_hub_is_bad_request(app, runtime):
    _register(app)
    client = DurableOrchestrationClient(runtime.backend, registry=app.durable_functions, task_hub_name="MyHub")
    assert (await call(client, "GET", "instances?taskHub=myhub")).status_code == 200
    assert_error(await call(client, "GET", "instances?taskHub=OtherHub"), 400, "OtherHub")


async def test_unexpected_failure_is_a_json_500(client, monkeypatch):
    async def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("storage is down")

    monkeypatch.setattr(client, "get_status", broken)
    assert_error(await call(client, "GET", "instances/x"), 500, "RuntimeError")


# -- client HTTP helpers ----------------------------------------------------------------------------


async def test_create_http_management_payload(app, runtime):
    client = DurableOrchestrationClient(
        runtime.backend,
        task_hub_name="My Hub",
        http_base_url="https://example.net/api/durabletask/",
        management_key="k&y",
    )
    payload = client.create_http_management_payload("id/1")
    base = "https://example.net/api/durabletask/instances/id%2F1"
    query = "taskHub=My%20Hub&connection=Storage&code=k%26y"
    assert payload == {
        "id": "id/1",
        "statusQueryGetUri": f"{base}?{query}",
        "sendEventPostUri": f"{base}/raiseEvent/{{eventName}}?{query}",
        "terminatePostUri": f"{base}/terminate?reason={{text}}&{query}",
        "rewindPostUri": f"{base}/rewind?reason={{text}}&{query}",
        "purgeHistoryDeleteUri": f"{base}?{query}",
        "restartPostUri": f"{base}/restart?{query}",
        "suspendPostUri": f"{base}/suspend?reason={{text}}&{query}",
        "resumePostUri": f"{base}/resume?reason={{text}}&{query}",
    }


async def test_management_payload_without_base_url(runtime, monkeypatch):
    monkeypatch.delenv("WEBSITE_HOSTNAME", raising=False)
    client = DurableOrchestrationClient(runtime.backend, task_hub_name="Hub")
    payload = client.create_http_management_payload("abc")
    assert (
        payload["statusQueryGetUri"]
        == "http://localhost:7071/api/durabletask/instances/abc?taskHub=Hub&connection=Storage"
    )
    monkeypatch.setenv("WEBSITE_HOSTNAME", "myapp.azurewebsites.net")
    payload = client.create_http_management_payload("abc")
    assert payload["statusQueryGetUri"].startswith("https://myapp.azurewebsites.net/api/durabletask/instances/abc?")


async def test_create_check_status_response_uses_request_origin(runtime):
    client = DurableOrchestrationClient(runtime.backend, task_hub_name="Hub", route_prefix="")
    request = func.HttpRequest("POST", "https://app.example:8443/start/hello?x=1", body=b"")
    response = client.create_check_status_response(request, "abc")
    assert response.status_code == 202
    assert response.headers["Content-Type"] == "application/json"
    payload = body_of(response)
    assert payload["id"] == "abc"
    expected = "https://app.example:8443/durabletask/instances/abc?taskHub=Hub&connection=Storage"
    assert payload["statusQueryGetUri"] == expected
    assert response.headers["Location"] == expected
    assert set(payload) == {
        "id",
        "statusQueryGetUri",
        "sendEventPostUri",
        "terminatePostUri",
        "rewindPostUri",
        "purgeHistoryDeleteUri",
        "restartPostUri",
        "suspendPostUri",
        "resumePostUri",
    }

    client = DurableOrchestrationClient(runtime.backend, route_prefix="/custom/")
    payload = body_of(client.create_check_status_response(request, "abc"))
    assert (
        payload["statusQueryGetUri"] == "https://app.example:8443/custom/durabletask/instances/abc?connection=Storage"
    )


async def test_wait_for_completion_completed_in_time(client, runtime):
    request = make_request("POST", "start")
    await start(runtime, client, "echo", "w1", {"out": [1]})
    response = await client.wait_for_completion_or_create_check_status_response(request, "w1")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    assert body_of(response) == {"out": [1]}

    # completes while we wait
    await client.start_new("echo", "w2", "later")

    async def run_soon() -> None:
        await asyncio.sleep(0.03)
        await runtime.worker.run_until_idle()

    worker = asyncio.create_task(run_soon())
    response = await client.wait_for_completion_or_create_check_status_response(request, "w2", 5000, 10)
    await worker
    assert response.status_code == 200
    assert body_of(response) == "later"


async def test_wait_for_completion_timeout_returns_check_status(client, runtime):
    request = make_request("POST", "start")
    await start(runtime, client, "waiter", "slow")
    response = await client.wait_for_completion_or_create_check_status_response(request, "slow", 50, 10)
    assert response.status_code == 202
    assert body_of(response)["id"] == "slow"
    assert response.headers["Location"] == f"{BASE}instances/slow?connection=Storage"


async def test_wait_for_completion_failed_and_terminated(client, runtime):
    request = make_request("POST", "start")
    await start(runtime, client, "boom", "f")
    response = await client.wait_for_completion_or_create_check_status_response(request, "f", 100, 10)
    assert response.status_code == 500
    assert body_of(response)["runtimeStatus"] == "Failed"

    await start(runtime, client, "waiter", "t")
    await client.terminate("t")
    await runtime.worker.run_until_idle()
    response = await client.wait_for_completion_or_create_check_status_response(request, "t", 100, 10)
    assert response.status_code == 200
    assert body_of(response)["runtimeStatus"] == "Terminated"


async def test_wait_for_completion_rejects_bad_intervals(client):
    request = make_request("POST", "start")
    with pytest.raises(ValueError):
        await client.wait_for_completion_or_create_check_status_response(request, "x", 100, 200)
    with pytest.raises(ValueError):
        await client.wait_for_completion_or_create_check_status_response(request, "x", -1, -2)


# -- documented shapes: entities, history ----------------------------------------------------------


async def test_entity_listing_of_all_names_and_by_last_operation_time(app, runtime, client, clock):
    @app.entity_trigger(context_name="context")
    def counter(context):
        context.set_state(context.get_state(lambda: 0) + 1)

    @app.entity_trigger(context_name="context")
    def device(context):
        context.set_state(context.operation_name)

    for path in ("entities/counter/early", "entities/device/radio", "entities/counter/late"):
        assert (await call(client, "POST", f"{path}?op=touch")).status_code == 202
        await runtime.worker.run_until_idle()
        clock.advance(60)
    await start(runtime, client, "echo", "not-an-entity", 1)

    listed = body_of(await call(client, "GET", "entities?fetchState=true"))
    assert sorted((e["entityId"]["name"], e["entityId"]["key"], e["state"]) for e in listed) == [
        ("counter", "early", 1),
        ("counter", "late", 1),
        ("device", "radio", "touch"),
    ]
    # .NET round-trip UTC timestamps, as Durable Functions writes them
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{7}Z", e["lastOperationTime"]) for e in listed)
    after_first = "2026-01-01T00:00:30Z"
    before_last = "2026-01-01T00:01:30Z"
    keys = [
        e["entityId"]["key"]
        for e in body_of(await call(client, "GET", f"entities?lastOperationTimeFrom={after_first}"))
    ]
    assert sorted(keys) == ["late", "radio"]
    window = f"entities/counter?lastOperationTimeFrom={after_first}&lastOperationTimeTo=2026-01-01T00:02:30Z"
    assert [e["entityId"]["key"] for e in body_of(await call(client, "GET", window))] == ["late"]
    keys = [
        e["entityId"]["key"] for e in body_of(await call(client, "GET", f"entities?lastOperationTimeTo={before_last}"))
    ]
    assert sorted(keys) == ["early", "radio"]
    assert_error(await call(client, "GET", "entities?lastOperationTimeFrom=yesterday"), 400, "lastOperationTimeFrom")


async def test_signal_to_an_unknown_entity_name_is_not_found(app, client):
    @app.entity_trigger(context_name="context")
    def counter(context):
        context.set_state(1)

    assert_error(await call(client, "POST", "entities/nosuch/k?op=add", json_body=1), 404, "nosuch")
    assert (await call(client, "POST", "entities/Counter/k?op=add", json_body=1)).status_code == 202


@pytest.mark.parametrize("content_type", ["text/plain", None])
async def test_entity_signal_content_must_be_json(app, client, content_type):
    @app.entity_trigger(context_name="context")
    def counter(context):
        context.set_state(1)

    headers = {"Content-Type": content_type} if content_type else {}
    response = await call(client, "POST", "entities/counter/k?op=add", body="5", headers=headers)
    assert_error(response, 400, "application/json")
    assert (await call(client, "POST", "entities/counter/k?op=reset", headers=headers)).status_code == 202  # no body


async def test_history_events_are_shaped_as_documented(app, runtime, client):
    @app.orchestration_trigger(context_name="context")
    def two_steps(context):
        first = yield context.call_activity("shout", "a")
        second = yield context.call_activity("shout", "b")
        return [first, second]

    @app.activity_trigger(input_name="text")
    def shout(text):
        return text.upper()

    await start(runtime, client, "two_steps", "h1", {"go": True})
    events = body_of(await call(client, "GET", "instances/h1?showHistory=true&showHistoryOutput=true"))["historyEvents"]
    assert [e["EventType"] for e in events] == [
        "ExecutionStarted",
        "TaskCompleted",
        "TaskCompleted",
        "ExecutionCompleted",
    ]
    started, first, second, completed = events
    assert (started["FunctionName"], started["Input"]) == ("two_steps", {"go": True})
    assert [(e["FunctionName"], e["Result"]) for e in (first, second)] == [("shout", "A"), ("shout", "B")]
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{7}Z"
    for event in events:
        assert re.fullmatch(stamp, event["Timestamp"]), event
        assert "Name" not in event and "MessageId" not in event and "CarriedState" not in event
    assert re.fullmatch(stamp, first["ScheduledTime"]) and first["ScheduledTime"] <= first["Timestamp"]
    assert (completed["OrchestrationStatus"], completed["Result"]) == ("Completed", ["A", "B"])
    without_output = body_of(await call(client, "GET", "instances/h1?showHistory=true"))["historyEvents"]
    assert all("Result" not in e for e in without_output)


async def test_history_of_a_failed_activity(app, runtime, client):
    @app.orchestration_trigger(context_name="context")
    def survives(context):
        try:
            yield context.call_activity("explode", None)
        except Exception:
            return "survived"

    await start(runtime, client, "survives", "h2")
    events = body_of(await call(client, "GET", "instances/h2?showHistory=true"))["historyEvents"]
    assert [e["EventType"] for e in events] == ["ExecutionStarted", "TaskFailed", "ExecutionCompleted"]
    failed = events[1]
    assert failed["FunctionName"] == "explode" and "kaboom" in failed["Reason"]
    assert failed["ScheduledTime"] <= failed["Timestamp"]


# -- authorization and the URLs handed out ----------------------------------------------------------

SYSTEM_KEY = "system-key"
MASTER_KEY = "master-key"


@pytest.fixture
def keyed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The management API's keys as ``durable start --master-key`` (or an Azure deployment) sets them."""
    monkeypatch.setenv(MANAGEMENT_KEY_SETTING, SYSTEM_KEY)
    monkeypatch.setenv(MASTER_KEY_SETTING, MASTER_KEY)
    monkeypatch.delenv(AZURE_INSTANCE_SETTING, raising=False)
    monkeypatch.delenv("WEBSITE_HOSTNAME", raising=False)


async def test_management_api_takes_only_its_system_key_or_the_master_key(client, runtime, keyed):
    await start(runtime, client, "echo", "k1", 1)
    assert_error(await call(client, "GET", "instances/k1"), 401, "system key")
    assert_error(await call(client, "GET", "instances/k1?code=a-function-key"), 401, "does not open")
    assert_error(await call(client, "DELETE", "instances/k1", headers={"x-functions-key": "other"}), 401)
    assert (await call(client, "GET", f"instances/k1?code={SYSTEM_KEY}")).status_code == 200
    assert (await call(client, "GET", "instances/k1", headers={"x-functions-key": MASTER_KEY})).status_code == 200


@pytest.mark.parametrize("code", ["%C3%A9t%C3%A9", "%E2%98%83", "system-key%C3%A9", "%00"])
async def test_a_non_ascii_key_is_refused_not_an_error(client, keyed, code):
    assert_error(await call(client, "GET", f"instances?code={code}"), 401, "does not open")


def test_key_comparison_takes_any_characters():
    assert same_key("ключ", "ключ") and not same_key("ключ", "key")
    keys = AuthKeys("function-key", "master-key")
    assert not keys.allows("function", "☃") and not keys.allows("admin", "ключ")
    assert keys.allows("function", "function-key")


async def test_management_api_is_closed_on_azure_without_a_key(client, monkeypatch):
    monkeypatch.delenv(MANAGEMENT_KEY_SETTING, raising=False)
    monkeypatch.delenv(MASTER_KEY_SETTING, raising=False)
    monkeypatch.setenv(AZURE_INSTANCE_SETTING, "0123abc")
    assert_error(await call(client, "GET", "instances?code=anything"), 401, MANAGEMENT_KEY_SETTING)
    monkeypatch.delenv(AZURE_INSTANCE_SETTING)
    assert (await call(client, "GET", "instances")).status_code == 200  # local and no keys: open


async def test_urls_handed_out_carry_the_system_key_and_the_configured_origin(app, runtime, keyed, monkeypatch):
    _register(app)
    client = DurableOrchestrationClient(
        runtime.backend, registry=app.durable_functions, task_hub_name="Hub", management_key=SYSTEM_KEY
    )
    response = await call(
        client, "POST", f"orchestrators/echo?code={MASTER_KEY}", base="http://attacker.example/api/durabletask/"
    )
    assert response.status_code == 202
    links = body_of(response)
    assert response.headers["Location"] == links["statusQueryGetUri"]
    base = f"http://localhost:7071/api/durabletask/instances/{links['id']}"
    for name, url in links.items():
        if name != "id":
            assert url.startswith(base) and f"code={SYSTEM_KEY}" in url and MASTER_KEY not in url, (name, url)

    monkeypatch.setenv("WEBSITE_HOSTNAME", "myapp.azurewebsites.net")
    links = body_of(
        await call(client, "POST", f"orchestrators/echo?code={SYSTEM_KEY}", base="http://evil/api/durabletask/")
    )
    assert links["statusQueryGetUri"].startswith("https://myapp.azurewebsites.net/api/durabletask/instances/")


# -- the official client's binding string and its requests ------------------------------------------


async def test_client_input_hands_over_the_official_binding_string(app, runtime, keyed):
    _register(app)

    @app.route(route="links", methods=["POST"])
    @app.durable_client_input(client_name="client")
    async def hand_out(req: func.HttpRequest, client: df.DurableOrchestrationClient) -> func.HttpResponse:
        instance_id = await client.start_new("echo", None, "hello")
        response = client.create_check_status_response(req, instance_id)
        return func.HttpResponse(json.dumps([client.binding_string, json.loads(response.get_body())]))

    handler = next(f for f in app.get_functions() if f.get_function_name() == "hand_out").get_user_function()
    request = func.HttpRequest("POST", "http://attacker.example/api/links", body=b"")
    binding_string, links = json.loads((await handler(request)).get_body())
    assert links["statusQueryGetUri"].startswith("http://localhost:7071/api/durabletask/instances/")  # not the Host

    official = df_official.DurableOrchestrationClient(binding_string)
    bindings = official._orchestration_bindings
    assert bindings.task_hub_name == runtime.client().task_hub_name
    token = ManagementKeys.from_environment().rpc_token()
    assert bindings.rpc_base_url == f"http://localhost:7071/api/durabletask/rpc/{token}/"
    assert SYSTEM_KEY not in bindings.rpc_base_url and MASTER_KEY not in binding_string
    payload = official.create_http_management_payload("abc")
    assert payload["id"] == "abc"
    assert payload["statusQueryGetUri"].startswith("http://localhost:7071/api/durabletask/instances/abc?")
    assert payload["terminatePostUri"].startswith("http://localhost:7071/api/durabletask/instances/abc/terminate?")
    assert "{functionName}" in bindings.creation_urls["createNewInstancePostUri"]


async def test_rpc_routes_take_the_official_clients_encoding(client, runtime, keyed):
    rpc = f"rpc/{ManagementKeys.from_environment().rpc_token()}/"
    # JSON text inside a JSON string, as the official client sends orchestration inputs
    response = await call(client, "POST", f"{rpc}orchestrators/waiter/r1", json_body=json.dumps({"a": [1]}))
    assert response.status_code == 202 and body_of(response)["id"] == "r1"
    await runtime.worker.run_until_idle()
    assert (await client.get_status("r1", show_input=True)).input_ == {"a": [1]}
    event = await call(client, "POST", f"{rpc}instances/r1/raiseEvent/Go", json_body=json.dumps("yes"))
    assert event.status_code == 202
    await runtime.worker.run_until_idle()
    assert (await client.get_status("r1")).output == {"got": "yes", "input": {"a": [1]}}

    response = await call(client, "POST", f"{rpc}instances/r1/restart?restartWithNewInstanceId=true")
    assert response.status_code == 202
    new_id = body_of(response)  # the official client's restart returns this answer as the id
    assert isinstance(new_id, str) and new_id != "r1"
    assert (await client.get_status(new_id)) is not None

    assert_error(await call(client, "POST", f"{rpc}orchestrators/echo", json_body={"a": 1}), 400, "JSON string")
    assert_error(await call(client, "POST", f"{rpc}orchestrators/echo", json_body="{not json"), 400, "JSON")
    assert_error(await call(client, "GET", "rpc/not-the-token/instances"), 401, "RPC token")
    assert_error(await call(client, "POST", f"{rpc}orchestrators/nope"), 400, "nope")
    assert "ExceptionMessage" in body_of(await call(client, "POST", f"{rpc}orchestrators/nope"))


# -- the samples' HTTP starter ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "body", "status", "fragment"),
    [
        ("nope", b"", 404, b"nope"),
        ("echo", b"NaN", 400, b"NaN"),
        ("echo", b'{"x": [1,', 400, b"JSON"),
        ("echo", b"\xff\xfe", 400, b"UTF-8"),
        ("echo", b"not json", 400, b"JSON"),
    ],
)
async def test_http_starter_answers_bad_requests_with_4xx(app, runtime, name, body, status, fragment):
    _register(app)
    app.register_functions(df.http_starter())
    handler = next(f for f in app.get_functions() if f.get_function_name() == "http_start").get_user_function()
    request = func.HttpRequest(
        "POST", f"http://127.0.0.1:7071/api/orchestrators/{name}", route_params={"functionName": name}, body=body
    )
    response = await handler(request)
    assert response.status_code == status and fragment in response.get_body()


@pytest.mark.parametrize("key", ["k" * 257, "bell\x07", "line\nbreak", "\x7f"])
async def test_counter_sample_refuses_keys_that_cannot_name_an_entity(app, runtime, key):
    from samples.counter_entity.blueprint import bp

    app.register_functions(bp)
    functions = {f.get_function_name(): f.get_user_function() for f in app.get_functions()}
    url = "http://127.0.0.1:7071/api/counters/x"
    add = func.HttpRequest("POST", f"{url}/add", route_params={"key": key, "operation": "add"}, body=b"1")
    read = func.HttpRequest("GET", url, route_params={"key": key}, body=b"")
    for handler, request in ((functions["counter_signal"], add), (functions["counter_get"], read)):
        response = await handler(request)
        assert response.status_code == 400 and b"invalid counter key" in response.get_body()
