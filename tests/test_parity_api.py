"""Official SDK parity of the orchestration context and client API: function objects for names,
typed inputs and results, ``will_continue_as_new``, ``new_guid``, ``histories``, versioning,
``get_status``/``get_status_by`` defaults and filters, management links, entity URL paths and
durable HTTP (``call_http``, with 202 polling) against a local aiohttp server."""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta

import azure.functions as func
import pytest
from aiohttp import web

import durable as df
from durable import EventType
from durable.core._versioning import compare_versions
from durable.host._settings import HostSettings
from durable.runtime._registry import ActivityFunction

S = df.OrchestrationRuntimeStatus


@dataclass
class Point:
    x: int
    y: int


async def _run(
    runtime: df.DurableRuntime, name: str, input_: object = None, **start: object
) -> df.DurableOrchestrationStatus:
    client = runtime.client()
    instance_id = await client.start_new(name, None, input_, **start)  # type: ignore[arg-type]
    await runtime.worker.run_until_idle()
    status = await client.get_status(instance_id, show_input=True)
    assert status is not None
    return status


# -- function objects for names ------------------------------------------------------------------
async def test_activities_and_sub_orchestrators_given_as_their_functions(app, runtime):
    @app.activity_trigger(input_name="n", activity="doubled")
    def double(n: int) -> int:
        return 2 * n

    @app.function_name(name="incremented")
    @app.activity_trigger(input_name="n")
    def increment(n: int) -> int:
        return n + 1

    @app.orchestration_trigger(context_name="context")
    def child(context):
        return (yield context.call_activity(increment, context.get_input()))

    @app.orchestration_trigger(context_name="context")
    def parent(context):
        retry = df.RetryOptions(first_retry_interval_in_milliseconds=1000, max_number_of_attempts=2)
        a = yield context.call_activity(double, 5)
        b = yield context.call_activity_with_retry(increment, retry, a)
        c = yield context.call_sub_orchestrator(child, b)
        d = yield context.call_sub_orchestrator_with_retry(child, retry, c)
        return [a, b, c, d]

    status = await _run(runtime, "parent")
    assert status.runtime_status is S.Completed, status.output
    assert status.output == [10, 11, 12, 13]
    history = await runtime.backend.load_history(status.instance_id)
    names = [e.name for e in history.events if e.event_type is EventType.TASK_SCHEDULED]
    assert names == ["doubled", "incremented"]  # the registered names, not the Python ones


async def test_a_function_of_the_wrong_kind_is_refused_where_it_is_called(app, runtime):
    @app.orchestration_trigger(context_name="context")
    def some_orchestrator(context):
        return None
        yield  # pragma: no cover

    def plain(value: int) -> int:
        return value

    @app.orchestration_trigger(context_name="context")
    def wrong_kind(context):
        yield context.call_activity(some_orchestrator, 1)

    @app.orchestration_trigger(context_name="context")
    def not_durable(context):
        yield context.call_activity(plain, 1)

    status = await _run(runtime, "wrong_kind")
    assert status.runtime_status is S.Failed
    assert "some_orchestrator is an orchestrator function, not an activity function" in status.output
    status = await _run(runtime, "not_durable")
    assert status.runtime_status is S.Failed
    assert "expected the name of an activity function" in status.output


async def test_start_new_takes_the_orchestrator_function(app, runtime):
    @app.orchestration_trigger(context_name="context")
    def greeter(context):
        return f"hi {context.get_input()}"
        yield  # pragma: no cover

    client = runtime.client()
    instance_id = await client.start_new(greeter, client_input="Ann")
    await runtime.worker.run_until_idle()
    assert (await client.get_status(instance_id)).output == "hi Ann"


# -- typed inputs and results ------------------------------------------------------------------------
async def test_get_input_with_expected_type(app, runtime):
    @app.orchestration_trigger(context_name="context")
    def typed(context):
        point = context.get_input(expected_type=Point)
        return [type(point).__name__, point.x + point.y, context.get_input()]
        yield  # pragma: no cover

    @app.orchestration_trigger(context_name="context")
    def mistyped(context):
        return context.get_input(expected_type=str)
        yield  # pragma: no cover

    status = await _run(runtime, "typed", {"x": 1, "y": 2})  # plain JSON, as an HTTP starter gets it
    assert status.output == ["Point", 3, {"x": 1, "y": 2}]
    status = await _run(runtime, "mistyped", [1, 2])
    assert status.runtime_status is S.Failed
    assert "payload is a list, not a str" in status.output


async def test_registered_input_type_is_what_get_input_decodes_to(app, runtime):
    def located(context):
        point = context.get_input()
        return isinstance(point, Point) and point.y
        yield  # pragma: no cover

    app.durable_functions.add_orchestrator("located", located, input_type=Point)
    assert (await _run(runtime, "located", {"x": 0, "y": 7})).output == 7


async def test_registered_activity_input_type(app, runtime):
    def measure(point: Point) -> int:
        return point.x * point.y

    app.durable_functions.add_activity(ActivityFunction("measure", measure, "point", input_type=Point))

    @app.orchestration_trigger(context_name="context")
    def measuring(context):
        area = yield context.call_activity("measure", {"x": 3, "y": 4})
        try:
            yield context.call_activity("measure", "not a point")
        except df.TaskFailedError as error:
            return [area, error.error_message]

    assert (await _run(runtime, "measuring")).output == [12, "payload is a str, not a Point"]


async def test_results_are_decoded_as_the_activity_annotation_or_expected_type(app, runtime):
    @app.activity_trigger(input_name="n")
    def make_point(n: int) -> Point:
        return {"x": n, "y": n}  # type: ignore[return-value]  # plain JSON, rebuilt as the annotation says

    @app.activity_trigger(input_name="n")
    def make_text(n: int) -> str:
        return str(n)

    @app.orchestration_trigger(context_name="context")
    def decoding(context):
        by_annotation = yield context.call_activity(make_point, 1)
        by_name = yield context.call_activity("make_point", 2)
        expected = yield context.call_activity("make_point", 3, expected_type=Point)
        try:
            yield context.call_activity(make_text, 4, expected_type=Point)
        except Exception as error:  # the orchestrator sees the decoding error where it waits
            wrong = str(error)
        return [repr(by_annotation), by_name, repr(expected), wrong]

    status = await _run(runtime, "decoding")
    assert status.output == ["Point(x=1, y=1)", {"x": 2, "y": 2}, "Point(x=3, y=3)", "payload is a str, not a Point"]


# -- context properties ------------------------------------------------------------------------------
async def test_will_continue_as_new(app, runtime):
    @app.orchestration_trigger(context_name="context")
    def loop(context):
        n = context.get_input()
        before = context.will_continue_as_new
        if n < 1:
            context.continue_as_new(n + 1)
        context.set_custom_status([n, before, context.will_continue_as_new])
        return n
        yield  # pragma: no cover

    status = await _run(runtime, "loop", 0)
    assert status.output == 1
    assert status.custom_status == [1, False, False]
    history = await runtime.backend.load_history(status.instance_id)
    assert any(e.event_type is EventType.EXECUTION_STARTED and e.input == "1" for e in history.events)


async def test_new_guid_is_a_uuid_and_the_same_on_every_replay(app, runtime):
    @app.activity_trigger(input_name="value")
    def echo(value: str) -> str:
        return value

    @app.orchestration_trigger(context_name="context")
    def guids(context):
        first = context.new_guid()
        assert isinstance(first, uuid.UUID)
        echoed = yield context.call_activity("echo", str(first))  # recorded in the first step
        second, text = context.new_guid(), context.new_uuid()  # made after a replay
        again = yield context.call_activity("echo", str(second))
        return [str(first), echoed, str(second), again, text]

    output = (await _run(runtime, "guids")).output
    assert output[0] == output[1] and output[2] == output[3]
    assert isinstance(output[4], str) and uuid.UUID(output[4])
    assert len({output[0], output[2], output[4]}) == 3


async def test_histories_and_function_context(app, runtime):
    @app.activity_trigger(input_name="x")
    def noop(x: None) -> None:
        return None

    @app.orchestration_trigger(context_name="context")
    def observer(context):
        yield context.call_activity("noop")
        kinds = [e.event_type.value for e in context.histories]
        return [kinds, isinstance(context.function_context, df.FunctionContext)]

    kinds, has_function_context = (await _run(runtime, "observer")).output
    assert has_function_context
    assert kinds[:2] == ["OrchestratorStarted", "ExecutionStarted"]
    assert kinds.index("TaskScheduled") < kinds.index("TaskCompleted")


# -- versioning ------------------------------------------------------------------------------------
def test_version_comparison_follows_the_documented_rules():
    assert compare_versions("1.10", "1.9") == 1  # System.Version: numeric parts
    assert compare_versions("1.0", "1.0.0") == -1  # a missing part is lower
    assert compare_versions("v10", "v9") == -1  # not versions: case-insensitive text
    assert compare_versions("Beta", "beta") == 0
    assert compare_versions(None, "") == 0
    assert compare_versions(None, "0.1") == -1
    assert compare_versions("2", "10") == 1  # one number alone is no System.Version: text


def test_versioning_settings_parse_like_host_json(tmp_path):
    options = df.VersioningOptions.from_settings("2.0", "strict", "FAIL")
    assert options == df.VersioningOptions("2.0", df.VersionMatchStrategy.STRICT, df.VersionFailureStrategy.FAIL)
    assert df.VersioningOptions.from_settings(None) == df.VersioningOptions()
    with pytest.raises(ValueError, match="versionMatchStrategy must be one of None, Strict, CurrentOrOlder"):
        df.VersioningOptions.from_settings("1.0", "Newest")
    durable_task = {"defaultVersion": "1.5", "versionMatchStrategy": "None"}
    (tmp_path / "host.json").write_text(json.dumps({"version": "2.0", "extensions": {"durableTask": durable_task}}))
    assert HostSettings.load(tmp_path).versioning == df.VersioningOptions("1.5", df.VersionMatchStrategy.NONE)


async def test_version_is_kept_by_the_instance_and_its_children(app, runtime):
    @app.orchestration_trigger(context_name="context")
    def versioned_child(context):
        return context.version
        yield  # pragma: no cover

    @app.orchestration_trigger(context_name="context")
    def versioned(context):
        explicit = yield context.call_sub_orchestrator("versioned_child", version="0.5")
        default = yield context.call_sub_orchestrator("versioned_child")
        if context.get_input() == "again":
            context.continue_as_new("done")
            return None
        return [context.version, explicit, default]

    app.durable_functions.versioning = df.VersioningOptions("2.0")  # host.json defaultVersion
    status = await _run(runtime, "versioned", "again", version="1.0")
    assert status.runtime_status is S.Completed, status.output
    assert status.output == ["1.0", "0.5", "2.0"]  # children without a version get the default
    assert status.version == "1.0" and status.to_json()["version"] == "1.0"
    history = await runtime.backend.load_history(status.instance_id)
    started = next(e for e in history.events if e.event_type is EventType.EXECUTION_STARTED)
    assert started.version == "1.0"  # continue-as-new kept it

    client = runtime.client()
    restarted = await client.restart(status.instance_id)
    assert isinstance(restarted, str) and restarted != status.instance_id
    await runtime.worker.run_until_idle()
    assert (await client.get_status(restarted)).output == ["1.0", "0.5", "2.0"]
    defaulted = await _run(runtime, "versioned_child")
    assert defaulted.output == "2.0" and defaulted.version == "2.0"


async def test_newer_versions_wait_for_a_worker_that_runs_them(app, runtime, clock):
    @app.orchestration_trigger(context_name="context")
    def releasable(context):
        return context.version
        yield  # pragma: no cover

    app.durable_functions.versioning = df.VersioningOptions("1.0")  # CurrentOrOlder, Reject
    client = runtime.client()
    older = await client.start_new("releasable", version="0.9")
    newer = await client.start_new("releasable", version="1.1")
    await runtime.worker.run_until_idle()
    assert (await client.get_status(older)).output == "0.9"
    assert (await client.get_status(newer)).runtime_status is S.Pending  # left alone, not failed

    app.durable_functions.versioning = df.VersioningOptions("1.1")  # the new version is deployed
    clock.advance(60)
    await runtime.worker.run_until_idle()
    assert (await client.get_status(newer)).output == "1.1"


async def test_strict_matching_and_the_fail_strategy(app, runtime):
    @app.orchestration_trigger(context_name="context")
    def strict(context):
        return context.version
        yield  # pragma: no cover

    app.durable_functions.versioning = df.VersioningOptions.from_settings("1.0", "Strict", "Fail")
    assert (await _run(runtime, "strict", version="1.0")).output == "1.0"
    status = await _run(runtime, "strict", version="0.9")
    assert status.runtime_status is S.Failed
    assert "VersionMismatchError" in status.output and "'0.9'" in status.output


# -- client --------------------------------------------------------------------------------------------
async def test_get_status_shows_the_input_only_when_asked(app, runtime):
    @app.orchestration_trigger(context_name="context")
    def quiet(context):
        return None
        yield  # pragma: no cover

    client = runtime.client()
    instance_id = await client.start_new("quiet", None, {"secret": 1})
    await runtime.worker.run_until_idle()
    assert (await client.get_status(instance_id)).input_ is None
    assert (await client.get_status(instance_id, show_input=True)).input_ == {"secret": 1}


async def _start_named(client: df.DurableOrchestrationClient, ids: list[str]) -> None:
    for instance_id in ids:
        await client.start_new("named", instance_id)


async def test_get_status_by_instance_id_prefix(app, runtime):
    @app.orchestration_trigger(context_name="context")
    def named(context):
        return None
        yield  # pragma: no cover

    client = runtime.client()
    await _start_named(client, ["order-1", "order-2", "orders'x", "other"])
    await runtime.worker.run_until_idle()
    found = await client.get_status_by(instance_id_prefix="order-")
    assert sorted(s.instance_id for s in found) == ["order-1", "order-2"]
    completed = await client.get_status_by(runtime_status=[S.Completed], instance_id_prefix="orders'")
    assert [s.instance_id for s in completed] == ["orders'x"]


async def test_get_status_by_prefix_on_azure_storage(app, azure_backend):
    @app.orchestration_trigger(context_name="context")
    def named(context):
        return None
        yield  # pragma: no cover

    runtime = df.DurableRuntime(app, azure_backend, task_hub_name=azure_backend.task_hub)
    client = runtime.client()
    await _start_named(client, ["job/1", "job/2", "job'3", "jobs", "jo"])
    found = await client.get_status_by(instance_id_prefix="job/")
    assert sorted(s.instance_id for s in found) == ["job/1", "job/2"]
    assert [s.instance_id for s in await client.get_status_by(instance_id_prefix="job'")] == ["job'3"]
    # The version travels in the Instances row of Azure Storage too.
    versioned = await client.start_new("named", "job-v", version="3.1")
    assert (await client.get_status(versioned)).version == "3.1"


def test_entity_id_url_path():
    entity = df.EntityId("Counter", "a/b c")
    assert entity.get_entity_id_url_path() == "entities/counter/a%2Fb%20c"
    assert df.EntityId.get_entity_id_url_path(entity) == entity.get_entity_id_url_path()  # the official call
    assert df.EntityId.get_entity_id(df.EntityId.get_scheduler_id(entity)) == entity


def test_client_response_links_follow_the_request(runtime):
    client = runtime.client()
    request = func.HttpRequest("GET", "https://example.net/api/start", body=b"")
    links = client.get_client_response_links(request, "id 1")
    assert links["id"] == "id 1"
    assert links["statusQueryGetUri"].startswith("https://example.net/api/durabletask/instances/id%201?")
    started = client.create_check_status_response(request, "id 1")
    assert links == json.loads(started.get_body())
    with pytest.raises(ValueError):
        client.get_client_response_links(request, "")


# -- durable HTTP ------------------------------------------------------------------------------------
class _Server:
    """A local HTTP service: echoes requests, and runs a long operation behind 202 + Location."""

    def __init__(self) -> None:
        self.polls = 0
        self.requests: list[tuple[str, str, str, dict[str, str]]] = []
        self.base = ""

    async def echo(self, request: web.Request) -> web.Response:
        body = await request.text()
        self.requests.append((request.method, request.path, body, dict(request.headers)))
        return web.json_response({"method": request.method, "body": body}, status=201, headers={"X-Echo": "yes"})

    async def start(self, request: web.Request) -> web.Response:
        return web.Response(status=202, headers={"Location": "/operation/7", "Retry-After": "2"})

    async def operation(self, request: web.Request) -> web.Response:
        self.polls += 1
        if self.polls < 2:
            return web.Response(status=202, headers={"Location": f"{self.base}/operation/7", "Retry-After": "3"})
        return web.Response(text="finished", status=200)


@pytest.fixture
async def server() -> AsyncIterator[_Server]:
    state = _Server()
    application = web.Application()
    application.router.add_route("*", "/echo", state.echo)
    application.router.add_post("/start", state.start)
    application.router.add_get("/operation/7", state.operation)
    runner = web.AppRunner(application)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    state.base = f"http://127.0.0.1:{port}"
    try:
        yield state
    finally:
        await runner.cleanup()


async def test_call_http_makes_the_request_in_an_activity(app, runtime, server):
    @app.orchestration_trigger(context_name="context")
    def http_calls(context):
        base = context.get_input()
        get = yield context.call_http("GET", f"{base}/echo", headers={"X-Trace": "t1"})
        posted = yield context.call_http("post", f"{base}/echo", content={"n": 1})
        raw = yield context.call_http("PUT", f"{base}/echo", content="<a/>", is_raw_str=True)
        return [
            get.status_code,
            get["statusCode"],
            json.loads(get.content)["method"],
            get.headers["X-Echo"],
            json.loads(posted["content"])["body"],
            json.loads(raw.content)["body"],
        ]

    status = await _run(runtime, "http_calls", server.base)
    assert status.runtime_status is S.Completed, status.output
    assert status.output == [201, 201, "GET", "yes", '{"n":1}', "<a/>"]
    assert server.requests[0][3]["X-Trace"] == "t1"
    history = await runtime.backend.load_history(status.instance_id)
    scheduled = [e.name for e in history.events if e.event_type is EventType.TASK_SCHEDULED]
    assert scheduled == ["BuiltIn::HttpActivity"] * 3


async def test_call_http_polls_a_202_with_durable_timers(app, runtime, server, clock):
    @app.orchestration_trigger(context_name="context")
    def long_operation(context):
        response = yield context.call_http("POST", f"{context.get_input()}/start")
        assert (response.status_code, response.content) == (response["statusCode"], response["content"])
        return response  # plain JSON, as the official SDK's dict

    client = runtime.client()
    instance_id = await client.start_new("long_operation", None, server.base)
    await runtime.worker.run_until_idle()
    assert (await client.get_status(instance_id)).runtime_status is S.Running  # waiting on Retry-After
    assert server.polls == 0
    clock.advance(2)
    await runtime.worker.run_until_idle()
    assert server.polls == 1  # still 202: waits another Retry-After
    assert (await client.get_status(instance_id)).runtime_status is S.Running
    clock.advance(3)
    await runtime.worker.run_until_idle()
    status = await client.get_status(instance_id)
    assert (status.output["statusCode"], status.output["content"]) == (200, "finished")
    assert "Content-Type" in status.output["headers"]
    history = await runtime.backend.load_history(instance_id)
    timers = [e.fire_at - e.timestamp for e in history.events if e.event_type is EventType.TIMER_CREATED]
    assert timers == [timedelta(seconds=2), timedelta(seconds=3)]


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_call_http_failures_are_clear(app, runtime, monkeypatch):
    monkeypatch.delenv("IDENTITY_ENDPOINT", raising=False)

    @app.orchestration_trigger(context_name="context")
    def unreachable(context):
        try:
            yield context.call_http("GET", f"http://127.0.0.1:{context.get_input()}/")
        except df.TaskFailedError as error:
            return [error.error_type, error.error_message]

    @app.orchestration_trigger(context_name="context")
    def with_identity(context):
        token = df.ManagedIdentityTokenSource("https://management.core.windows.net/.default")
        yield context.call_http("GET", "http://127.0.0.1:1/", token_source=token)

    @app.orchestration_trigger(context_name="context")
    def not_http(context):
        yield context.call_http("GET", "ftp://example.net/file")

    error_type, message = (await _run(runtime, "unreachable", _closed_port())).output
    assert error_type == "DurableHttpError" and "GET http://127.0.0.1:" in message
    status = await _run(runtime, "with_identity")
    assert status.runtime_status is S.Failed and "no managed identity" in status.output
    status = await _run(runtime, "not_http")
    assert status.runtime_status is S.Failed and "absolute http(s) URI" in status.output
