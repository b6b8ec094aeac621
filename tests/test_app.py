"""DFApp / Blueprint: the durable decorators and the client binding."""

from __future__ import annotations

import inspect
import json

import azure.functions as func
import pytest

import durable as df
from durable.host._settings import HostSettings

S = df.OrchestrationRuntimeStatus


def test_decorators_return_function_builders_that_stay_callable(app):
    def orchestrator(context):
        return "x"

    def activity(name):
        return f"hi {name}"

    async def async_activity(name):
        return f"async hi {name}"

    # Function builders, as the Functions programming model's decorators return (so that
    # function_name and build() work), wrapping the code unchanged...
    built_orchestrator = app.orchestration_trigger(context_name="context")(orchestrator)
    built_activity = app.activity_trigger(input_name="name")(activity)
    app.activity_trigger(input_name="name")(async_activity)
    assert built_orchestrator.code is orchestrator and built_activity.code is activity
    # ... and still directly callable, e.g. from unit tests
    assert built_activity("Bob") == "hi Bob"
    assert built_orchestrator(None) == "x"
    assert app.durable_functions.orchestrator("orchestrator") is orchestrator
    assert "activity" in app.durable_functions.activities
    assert "async_activity" in app.durable_functions.activities


def test_decorator_custom_names(app):
    @app.orchestration_trigger(context_name="context", orchestration="CustomOrch")
    def orch(context):
        return 1

    @app.activity_trigger(input_name="x", activity="CustomActivity")
    def act(x):
        return x

    assert app.durable_functions.orchestrator("CustomOrch") is orch.code
    assert "CustomActivity" in app.durable_functions.activities
    assert app.durable_functions.orchestrator("orch") is None


async def test_custom_names_are_runnable(app, runtime):
    @app.orchestration_trigger(context_name="context", orchestration="CustomOrch")
    def orch(context):
        return (yield context.call_activity("CustomActivity", 2))

    @app.activity_trigger(input_name="x", activity="CustomActivity")
    def act(x):
        return x * 21

    client = runtime.client()
    iid = await client.start_new("CustomOrch")
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed
    assert status.output == 42


def test_activity_trigger_validates_input_name(app):
    def activity(payload):
        return payload

    with pytest.raises(TypeError, match="wrong_name"):
        app.activity_trigger(input_name="wrong_name")(activity)
    assert "activity" not in app.durable_functions.activities


def test_duplicate_names_rejected(app):
    @app.orchestration_trigger(context_name="context")
    def same(context):
        return 1

    with pytest.raises(ValueError, match="same"):

        @app.orchestration_trigger(context_name="context", orchestration="same")
        def other(context):
            return 2

    with pytest.raises(ValueError, match="same"):

        @app.activity_trigger(input_name="x", activity="same")
        def act(x):
            return x

    @app.activity_trigger(input_name="x")
    def an_activity(x):
        return x

    with pytest.raises(ValueError, match="an_activity"):

        @app.activity_trigger(input_name="y", activity="an_activity")
        def another(y):
            return y

    assert app.durable_functions.orchestrator("same") is same.code


def test_duplicate_names_between_blueprint_and_app_rejected(app):
    @app.activity_trigger(input_name="x")
    def shared(x):
        return x

    bp = df.Blueprint()

    @bp.activity_trigger(input_name="x", activity="shared")
    def shared_too(x):
        return x

    with pytest.raises(ValueError, match="shared"):
        app.register_functions(bp)


async def test_blueprint_functions_are_runnable(app, runtime):
    bp = df.Blueprint()

    @bp.orchestration_trigger(context_name="context")
    def bp_orchestrator(context):
        a = yield context.call_activity("bp_activity", "x")
        b = yield context.call_activity("app_activity", a)
        return b

    @bp.activity_trigger(input_name="value")
    def bp_activity(value):
        return value + "-bp"

    @app.activity_trigger(input_name="value")
    def app_activity(value):
        return value + "-app"

    app.register_functions(bp)  # after the runtime was created: it must still see them
    client = runtime.client()
    iid = await client.start_new("bp_orchestrator")
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed
    assert status.output == "x-bp-app"


async def test_durable_client_input_injects_client(app, runtime):
    @app.orchestration_trigger(context_name="context")
    def greet(context):
        return f"hello {context.get_input()}"
        yield  # pragma: no cover

    @app.durable_client_input(client_name="client")
    async def starter(name, client):
        assert isinstance(client, df.DurableOrchestrationClient)
        return await client.start_new("greet", None, name)

    assert list(inspect.signature(starter).parameters) == ["name"]
    iid = await starter("world")
    await runtime.worker.run_until_idle()
    status = await runtime.client().get_status(iid)
    assert status.runtime_status is S.Completed
    assert status.output == "hello world"


async def test_durable_client_input_sync_function(app, runtime):
    @app.durable_client_input(client_name="client")
    def which_client(client):
        return client

    assert list(inspect.signature(which_client).parameters) == []
    client = await which_client()
    assert isinstance(client, df.DurableOrchestrationClient)


def test_durable_client_input_validates_client_name(app):
    def no_client(req):
        return req

    with pytest.raises(TypeError, match="client"):
        app.durable_client_input(client_name="client")(no_client)


async def test_durable_client_input_without_storage_setting_fails_clearly(monkeypatch):
    # Outside a runtime the client comes from the app settings, as in a Functions host.
    monkeypatch.delenv("AzureWebJobsStorage", raising=False)
    lonely = df.DFApp()

    @lonely.durable_client_input(client_name="client")
    async def starter(client):
        return client

    with pytest.raises(ValueError, match="AzureWebJobsStorage is not set"):
        await starter()


async def test_durable_client_input_with_http_route(app, runtime):
    @app.orchestration_trigger(context_name="context")
    def greet(context):
        return "routed"
        yield  # pragma: no cover

    @app.route(route="start/{name}")
    @app.durable_client_input(client_name="client")
    async def http_start(req: func.HttpRequest, client) -> func.HttpResponse:
        instance_id = await client.start_new(req.route_params["name"])
        return func.HttpResponse(instance_id)

    functions = {f.get_function_name(): f for f in app.get_functions()}
    assert "http_start" in functions
    user_function = functions["http_start"].get_user_function()
    assert list(inspect.signature(user_function).parameters) == ["req"]
    binding_names = {b["name"] for b in functions["http_start"].get_bindings_dict()["bindings"]}
    assert "client" not in binding_names

    request = func.HttpRequest("POST", "http://localhost/api/start/greet", body=b"", route_params={"name": "greet"})
    response = await user_function(request)
    iid = response.get_body().decode()
    await runtime.worker.run_until_idle()
    status = await runtime.client().get_status(iid)
    assert status.runtime_status is S.Completed
    assert status.output == "routed"


async def test_blueprint_durable_client_input(app, runtime):
    bp = df.Blueprint()

    @bp.orchestration_trigger(context_name="context")
    def from_bp(context):
        return "bp"
        yield  # pragma: no cover

    @bp.durable_client_input(client_name="client")
    async def bp_starter(client):
        return await client.start_new("from_bp")

    app.register_functions(bp)
    iid = await bp_starter()
    await runtime.worker.run_until_idle()
    assert (await runtime.client().get_status(iid)).output == "bp"


def test_dfapp_is_a_function_app():
    app = df.DFApp(http_auth_level=func.AuthLevel.ANONYMOUS)
    assert isinstance(app, func.FunctionRegister)

    @app.route(route="ping")
    def ping(req: func.HttpRequest) -> func.HttpResponse:
        return func.HttpResponse("pong")

    functions = {f.get_function_name(): json.loads(f.get_function_json()) for f in app.get_functions()}
    assert functions["ping"]["bindings"][0]["type"] == "httpTrigger"
    # The runtime's own triggers: one per control queue (host.json: 4 partitions), the work items,
    # and the management API — all standard bindings, nothing from the Durable extension.
    hub = HostSettings.load().hub_name.lower()
    queues = {
        name: spec["bindings"][0]["queueName"]
        for name, spec in functions.items()
        if spec["bindings"][0]["type"] == "queueTrigger"
    }
    assert queues == {
        **{f"durable_control_{p:02d}": f"{hub}-control-{p:02d}" for p in range(4)},
        "durable_workitems": f"{hub}-workitems",
    }
    management = functions["durable_management"]["bindings"]
    assert management[0]["type"] == "httpTrigger" and management[0]["route"] == "durabletask/{*path}"
    assert management[1] == {"direction": "OUT", "type": "http", "name": "$return"}
    for spec in functions.values():
        assert spec["scriptFile"] == "function_app.py"
        assert all(binding["type"] in {"httpTrigger", "http", "queueTrigger"} for binding in spec["bindings"])


async def test_http_starter_starts_orchestrations_and_rejects_bad_requests(app, runtime):
    @app.orchestration_trigger(context_name="context")
    def echo_input(context):
        return context.get_input()
        yield  # a generator orchestrator

    app.register_functions(df.http_starter())
    starter = next(f for f in app.get_functions() if f.get_function_name() == "http_start")
    handler = starter.get_user_function()

    def post(name: str, body: bytes) -> func.HttpRequest:
        return func.HttpRequest(
            "POST", f"http://127.0.0.1:7071/api/orchestrators/{name}", route_params={"functionName": name}, body=body
        )

    response = await handler(post("echo_input", b'{"x": 1}'))
    assert response.status_code == 202
    instance_id = json.loads(response.get_body())["id"]
    await runtime.worker.run_until_idle()
    assert (await runtime.client().get_status(instance_id)).output == {"x": 1}

    unknown = await handler(post("nope", b""))
    assert unknown.status_code == 404 and b"nope" in unknown.get_body()
    assert (await handler(post("echo_input", b"{not json"))).status_code == 400
