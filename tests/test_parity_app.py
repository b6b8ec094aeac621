"""Parity with the official SDK's app side: the usages Microsoft documents for
``azure-functions-durable`` (v2 programming model), each as a small app run under ``durable start``
and driven over HTTP, plus the documented ``build()`` unit-test pattern.

- a ``df.Blueprint`` registered on a plain ``func.FunctionApp`` attaches the durable runtime;
- ``df.DFApp`` with ``register_functions`` / ``register_blueprint``;
- ``function_name`` stacked on the durable decorators names the durable function;
- ``orchestration_trigger(input_type=)`` / ``activity_trigger(input_type=)``;
- ``builder.build().get_user_function()`` reaches the code as written;
- host.json read as leniently as the Functions host reads it; the Durable Task Scheduler refused;
  a host.json the host cannot parse stops the host, not the unit tests that import the app.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest.mock import AsyncMock, Mock

import aiohttp
import azure.functions as func
import pytest

import durable as df
from durable.host._settings import HostSettings, SettingsError
from tests.fixtures_host import REPO_ROOT, ServedApp


def write_app(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(textwrap.dedent(text).lstrip())
    return folder


async def finished(http: aiohttp.ClientSession, status_uri: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        async with http.get(status_uri) as response:
            status: dict[str, Any] = await response.json()
        if status["runtimeStatus"] in ("Completed", "Failed", "Terminated"):
            return status
        assert time.monotonic() < deadline, f"not finished in 30 s: {status}"
        await asyncio.sleep(0.1)


# -- apps run under durable start ---------------------------------------------------------------------
# The blueprint sample's shape: durable functions on a df.Blueprint, registered on a plain
# func.FunctionApp that also has a function of its own; function_name names each durable function.
PLAIN_APP_BLUEPRINT = """
    import azure.functions as func

    import durable as df

    bp = df.Blueprint()


    @bp.route(route="start/{name}", methods=["POST"])
    @bp.durable_client_input(client_name="client")
    async def start(req: func.HttpRequest, client):
        try:
            instance_id = await client.start_new(req.route_params["name"], client_input=req.get_json())
        except df.FunctionNotFound as error:
            return func.HttpResponse(str(error), status_code=404)
        return client.create_check_status_response(req, instance_id)


    @bp.function_name(name="Greeter")
    @bp.orchestration_trigger(context_name="context")
    def greeter_orchestrator(context: df.DurableOrchestrationContext):
        name = context.get_input()
        greeting = yield context.call_activity("Greet", name)
        visits = yield context.call_entity(df.EntityId("Visits", name), "add", 1)
        return f"{greeting} (visit {visits})"


    @bp.function_name(name="Greet")
    @bp.activity_trigger(input_name="who")
    def greet(who: str) -> str:
        return f"Hello {who}"


    @bp.function_name(name="Visits")
    @bp.entity_trigger(context_name="context")
    def visits(context: df.DurableEntityContext) -> None:
        value = context.get_state(lambda: 0) + context.get_input()
        context.set_state(value)
        context.set_result(value)
"""

PLAIN_APP = """
    import azure.functions as func
    from parity_blueprint import bp

    app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)
    app.register_functions(bp)


    @app.route(route="ping")
    def ping(req: func.HttpRequest) -> func.HttpResponse:
        return func.HttpResponse("pong")
"""

# What the Functions host accepts (Json.NET, configuration keys in any case, numbers as strings)
# and what Microsoft's samples carry (extensionBundle, logging, unknown keys).
LENIENT_HOST_JSON = """
    {
      // comments, as Json.NET reads them
      "version": "2.0",
      "logging": {"applicationInsights": {"samplingSettings": {"isEnabled": true, "excludedTypes": "Request"}}},
      "extensionBundle": {"id": "Microsoft.Azure.Functions.ExtensionBundle", "version": "[4.*, 5.0.0)"},
      "Extensions": {
        /* a block comment */
        "DurableTask": {"HubName": "ParityPlain", "StorageProvider": {"PartitionCount": "2"}, "tracing": {}},
        "queues": {"messageEncoding": "none",},
      },
    }
"""


async def test_blueprint_on_a_plain_function_app(serve_app: Callable[..., ServedApp], tmp_path: Path) -> None:
    folder = write_app(
        tmp_path / "plain",
        {"function_app.py": PLAIN_APP, "parity_blueprint.py": PLAIN_APP_BLUEPRINT, "host.json": LENIENT_HOST_JSON},
    )
    served = serve_app(folder)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{served.base_url}/api/ping") as response:
            assert await response.text() == "pong"
        for visit in (1, 2):
            async with http.post(f"{served.base_url}/api/start/Greeter", json="Ada") as response:
                assert response.status == 202, await response.text()
                payload = await response.json()
            assert "taskHub=ParityPlain" in payload["statusQueryGetUri"]
            status = await finished(http, payload["statusQueryGetUri"])
            assert status["runtimeStatus"] == "Completed", status
            assert status["name"] == "Greeter"
            assert status["output"] == f"Hello Ada (visit {visit})"
        # function_name renamed it: the Python name is no orchestrator
        async with http.post(f"{served.base_url}/api/start/greeter_orchestrator", json="Ada") as response:
            assert response.status == 404
            assert "Greeter" in await response.text()
        # the management API came with the runtime
        async with http.get(f"{served.base_url}/api/durabletask/entities/Visits/Ada") as response:
            assert response.status == 200
            assert await response.json() == 2


DFAPP_WITH_BLUEPRINTS = """
    import dataclasses

    import azure.functions as func

    import durable as df


    @dataclasses.dataclass
    class Order:
        item: str
        quantity: int


    orders = df.Blueprint()


    @orders.orchestration_trigger(context_name="context", input_type=Order)
    def order_orchestrator(context: df.DurableOrchestrationContext):
        order = context.get_input()
        line = yield context.call_activity("describe_order", order)
        total = yield context.call_activity("Price", order)
        return {"input_type": type(order).__name__, "line": line, "total": total}


    @orders.activity_trigger(input_name="order", input_type=Order)
    def describe_order(order: Order) -> str:
        return f"{type(order).__name__}: {order.quantity} x {order.item}"


    # An explicit activity= name wins over function_name, as in the Durable extension.
    @orders.function_name(name="ignored_name")
    @orders.activity_trigger(input_name="order", activity="Price")
    def price(order: Order) -> float:
        return order.quantity * 2.5


    app = df.DFApp(http_auth_level=func.AuthLevel.ANONYMOUS)
    app.register_blueprint(orders)
    app.register_functions(df.http_starter())
"""


async def test_dfapp_with_register_blueprint_and_input_types(
    serve_app: Callable[..., ServedApp], tmp_path: Path
) -> None:
    host_json = '{"version": "2.0", "extensions": {"durableTask": {"hubName": "ParityDFApp"}}}'
    folder = write_app(tmp_path / "dfapp", {"function_app.py": DFAPP_WITH_BLUEPRINTS, "host.json": host_json})
    served = serve_app(folder)
    async with aiohttp.ClientSession() as http:
        start = f"{served.base_url}/api/orchestrators/order_orchestrator"
        async with http.post(start, json={"item": "pen", "quantity": 4}) as response:
            assert response.status == 202, await response.text()
            payload = await response.json()
        status = await finished(http, payload["statusQueryGetUri"])
    assert status["runtimeStatus"] == "Completed", status["output"]
    assert status["output"] == {"input_type": "Order", "line": "Order: 4 x pen", "total": 10.0}


def start_host(folder: Path) -> subprocess.CompletedProcess[str]:
    """``durable start`` on ``folder``, expected to refuse the app and exit at once."""
    return subprocess.run(
        [sys.executable, "-m", "durable", "start", "--app-dir", str(folder), "--port", "1"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


async def test_durable_task_scheduler_is_refused_clearly(tmp_path: Path) -> None:
    # Microsoft's openai_agents sample runs on the Durable Task Scheduler with this provider.
    provider = '{"type": "azureManaged", "connectionStringName": "DURABLE_TASK_SCHEDULER_CONNECTION_STRING"}'
    host_json = f'{{"version": "2.0", "extensions": {{"durableTask": {{"storageProvider": {provider}}}}}}}'

    folder = write_app(tmp_path / "dts", {"function_app.py": PLAIN_APP, "parity_blueprint.py": PLAIN_APP_BLUEPRINT,
                                          "host.json": host_json})  # fmt: skip
    started = start_host(folder)
    assert started.returncode != 0
    assert "azureManaged" in started.stdout + started.stderr
    assert "Durable Task Scheduler" in started.stdout + started.stderr


# An app as its own unit tests see it: they import it and reach the code through the builders.
UNIT_TESTED_APP = """
    import azure.functions as func

    import durable as df

    app = df.DFApp(http_auth_level=func.AuthLevel.ANONYMOUS)


    @app.orchestration_trigger(context_name="context")
    def greetings(context):
        first = yield context.call_activity("greet", "Ada")
        return [first]


    @app.activity_trigger(input_name="name")
    def greet(name: str) -> str:
        return f"Hi {name}"
"""
UNIT_TEST_OF_THE_APP = """
    from unittest.mock import Mock

    import function_app

    context = Mock(call_activity=lambda name, value: f"{name}({value})")
    steps = function_app.greetings.build().get_user_function().orchestrator_function(context)
    print(next(steps), function_app.greet.build().get_user_function()("Ada"))
"""


def run_unit_test_of(folder: Path) -> subprocess.CompletedProcess[str]:
    """The app's unit test, run from the app folder as ``pytest`` runs it there (outside any host)."""
    environment = {name: value for name, value in os.environ.items() if name != "AzureWebJobsScriptRoot"}
    script = textwrap.dedent(UNIT_TEST_OF_THE_APP)
    return subprocess.run(
        [sys.executable, "-c", script], cwd=folder, env=environment, capture_output=True, text=True, timeout=60
    )


def test_an_unparseable_host_json_stops_the_host_not_the_apps_unit_tests(tmp_path: Path) -> None:
    # Microsoft's function_chaining sample ships such a host.json (two objects): the Functions host
    # refuses to start with it, but the sample's unit tests, which only import the app, pass.
    two_objects = '{"version": "2.0"}\n{"version": "2.0"}\n'
    folder = write_app(tmp_path / "unit", {"function_app.py": UNIT_TESTED_APP, "host.json": two_objects})
    unit_test = run_unit_test_of(folder)
    assert unit_test.returncode == 0, unit_test.stderr
    assert unit_test.stdout.split() == ["greet(Ada)", "Hi", "Ada"]
    assert "single JSON object" in unit_test.stderr  # warned, with what is wrong
    started = start_host(folder)
    assert started.returncode != 0
    assert "single JSON object" in started.stdout + started.stderr


def test_an_unsupported_storage_provider_still_fails_the_import(tmp_path: Path) -> None:
    host_json = '{"extensions": {"durableTask": {"storageProvider": {"type": "azureManaged"}}}}'
    folder = write_app(tmp_path / "unit", {"function_app.py": UNIT_TESTED_APP, "host.json": host_json})
    unit_test = run_unit_test_of(folder)
    assert unit_test.returncode != 0
    assert "Durable Task Scheduler" in unit_test.stderr


# -- host.json -----------------------------------------------------------------------------------------
def test_host_json_is_read_as_leniently_as_the_functions_host(tmp_path: Path) -> None:
    (tmp_path / "host.json").write_text(textwrap.dedent(LENIENT_HOST_JSON))
    settings = HostSettings.load(tmp_path)
    assert settings.hub_name == "ParityPlain"
    assert settings.partition_count == 2
    assert settings.message_encoding == "none"
    (tmp_path / "host.json").write_text(
        '{"extensions": {"DURABLETASK": {"maxConcurrentActivityFunctions": "3"}, "Http": {"RoutePrefix": "x/"}}}'
    )
    settings = HostSettings.load(tmp_path)
    assert settings.max_concurrent_activities == 3
    assert settings.route_prefix == "x"


def test_host_json_keeps_strings_that_look_like_comments(tmp_path: Path) -> None:
    (tmp_path / "host.json").write_text('{"extensions": {"durableTask": {"hubName": "a//b/*c*/,"}}}')
    assert HostSettings.load(tmp_path).hub_name == "a//b/*c*/,"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # two objects in one file (Microsoft's function_chaining sample has this): Json.NET refuses it too
        ('{"version": "2.0"}{"version": "2.0"}', "single JSON object"),
        ('{"version": "2.0",', "cannot read"),
        ('{"extensions": {"durableTask": {"storageProvider": {"type": "mssql"}}}}', "'mssql'"),
        ('{"extensions": {"durableTask": {"storageProvider": {"type": "AzureManaged"}}}}', "Durable Task Scheduler"),
    ],
)
def test_host_json_errors_say_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "host.json").write_text(text)
    with pytest.raises(SettingsError, match=message):
        HostSettings.load(tmp_path)


def test_azure_storage_provider_type_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "host.json").write_text(
        '{"extensions": {"durableTask": {"storageProvider": {"type": "AzureStorage"}}}}'
    )
    assert HostSettings.load(tmp_path).hub_name == "DurableHub"


# -- the function builders and the unit-test pattern -------------------------------------------------
def unit_blueprint() -> df.Blueprint:
    bp = df.Blueprint()

    @bp.route(route="start")
    @bp.durable_client_input(client_name="client")
    async def start(req: func.HttpRequest, client: Any) -> Any:
        instance_id = await client.start_new("chain", client_input=req.params.get("city"))
        return client.create_check_status_response(req, instance_id)

    @bp.function_name(name="chain")
    @bp.orchestration_trigger(context_name="context")
    def chain_orchestrator(context: Any) -> Any:
        first = yield context.call_activity("hello", context.get_input())
        second = yield context.call_activity("hello", first)
        return [first, second]

    @bp.activity_trigger(input_name="city")
    def hello(city: str) -> str:
        return f"Hello {city}"

    @bp.entity_trigger(context_name="context")
    def Counter(context: Any) -> None:
        if context.operation_name == "add":
            context.set_state(context.get_state(lambda: 0) + context.get_input())

    bp.start, bp.chain, bp.hello, bp.counter = start, chain_orchestrator, hello, Counter  # type: ignore[attr-defined]
    return bp


def test_orchestrator_build_get_user_function_is_the_generator_function() -> None:
    bp = unit_blueprint()
    code = bp.chain.build().get_user_function().orchestrator_function  # type: ignore[attr-defined]
    context = Mock()
    context.get_input = Mock(return_value="Oslo")
    context.call_activity = Mock(side_effect=lambda name, value: f"{name}:{value}")
    steps = code(context)
    assert next(steps) == "hello:Oslo"
    assert steps.send("Hello Oslo") == "hello:Hello Oslo"
    with pytest.raises(StopIteration) as done:
        steps.send("Hello Hello Oslo")
    assert done.value.value == ["Hello Oslo", "Hello Hello Oslo"]
    # the builder and the user function are callable like the generator function too
    assert next(bp.chain(context)) == "hello:Oslo"  # type: ignore[attr-defined]
    assert next(bp.chain.build().get_user_function()(context)) == "hello:Oslo"  # type: ignore[attr-defined]


def test_client_entity_and_activity_build_get_user_function() -> None:
    bp = unit_blueprint()
    code = bp.start.build().get_user_function().client_function  # type: ignore[attr-defined]
    client = Mock()
    client.start_new = AsyncMock(return_value="id-1")
    client.create_check_status_response = Mock(return_value="response")
    request = func.HttpRequest("GET", "/api/start", params={"city": "Lima"}, body=b"")
    assert asyncio.run(code(request, client)) == "response"
    client.start_new.assert_awaited_once_with("chain", client_input="Lima")

    entity = bp.counter.build().get_user_function().entity_function  # type: ignore[attr-defined]
    state = {"value": 5}
    context = Mock(operation_name="add")
    context.get_input = Mock(return_value=3)
    context.get_state = Mock(side_effect=lambda initial: state["value"])
    context.set_state = Mock(side_effect=lambda value: state.update(value=value))
    entity(context)
    assert state["value"] == 8

    assert bp.hello.build().get_user_function()("Quito") == "Hello Quito"  # type: ignore[attr-defined]
    assert bp.hello("Quito") == "Hello Quito"  # type: ignore[attr-defined]


def test_function_name_names_the_durable_function_in_either_order() -> None:
    bp = df.Blueprint()

    @bp.orchestration_trigger(context_name="context")
    @bp.function_name(name="BelowTrigger")
    def below(context: Any) -> Any:
        yield context.call_activity("x")

    @bp.function_name(name="AboveTrigger")
    @bp.activity_trigger(input_name="value")
    def above(value: Any) -> Any:
        return value

    @bp.function_name(name="not_this")
    @bp.entity_trigger(context_name="context", entity_name="Explicit")
    def entity(context: Any) -> None:
        pass

    registry = bp.durable_functions
    assert set(registry.orchestrators) == {"BelowTrigger"}
    assert "AboveTrigger" in registry.activities and "above" not in registry.activities
    assert set(registry.entities) == {"explicit"}
    assert below.build().get_function_name() == "BelowTrigger"
    # durable functions are not functions of the Functions host: none of them is indexed
    assert bp._function_builders == []


def test_durable_function_names_stay_unique() -> None:
    bp = df.Blueprint()

    @bp.activity_trigger(input_name="value")
    def first(value: Any) -> Any:
        return value

    with pytest.raises(ValueError, match="first"):

        @bp.function_name(name="first")
        @bp.activity_trigger(input_name="value")
        def second(value: Any) -> Any:
            return value


def test_durable_functions_refuse_other_bindings() -> None:
    bp = df.Blueprint()
    with pytest.raises(TypeError, match="no other bindings"):

        @bp.queue_output(arg_name="out", queue_name="q", connection="AzureWebJobsStorage")
        @bp.activity_trigger(input_name="value")
        def with_output(value: Any, out: Any) -> None:
            pass

    with pytest.raises(TypeError, match="durable client"):

        @bp.durable_client_input(client_name="client")
        @bp.orchestration_trigger(context_name="context")
        def orchestrator_with_client(context: Any, client: Any) -> None:
            pass


async def test_a_plain_function_app_gets_the_runtime_once_for_all_its_blueprints(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AzureWebJobsStorage", "UseDevelopmentStorage=true")  # clients are built, never used
    first, second = unit_blueprint(), df.Blueprint()

    @second.orchestration_trigger(context_name="context")
    def other(context: Any) -> Any:
        return (yield context.call_activity("hello", "x"))

    app = func.FunctionApp()
    app.register_functions(first)
    app.register_blueprint(second)
    names = [function.get_function_name() for function in app.get_functions()]
    assert len(names) == len(set(names))
    assert "start" in names and "durable_management" in names and "durable_workitems" in names
    assert not {"chain", "hello", "Counter", "other"} & set(names)
    runtime = app.hosted_runtime  # type: ignore[attr-defined]
    assert set(runtime.app.durable_functions.orchestrators) == {"chain", "other"}
    # the app reads as a DFApp does (df.Replayer, the local host): its registry, its runtime
    assert app.durable_functions is runtime.app.durable_functions  # type: ignore[attr-defined]
    # both blueprints hand out clients of the runtime the app got
    assert first.client().task_hub_name == second.client().task_hub_name == runtime.settings.hub_name
    await runtime.close()

    unattached = df.Blueprint()
    with pytest.raises(RuntimeError, match="register_functions"):
        unattached.client()


def test_dfapp_indexes_its_own_and_its_blueprints_host_functions_only() -> None:
    app = df.DFApp()

    @app.function_name(name="Renamed")
    @app.orchestration_trigger(context_name="context")
    def orchestrator(context: Any) -> Any:
        yield context.call_activity("x")

    app.register_functions(unit_blueprint())
    names = {function.get_function_name() for function in app.get_functions()}
    assert "start" in names and "durable_management" in names
    assert not {"Renamed", "orchestrator", "chain", "hello"} & names
    assert {"Renamed", "chain"} <= set(app.durable_functions.orchestrators)


@dataclasses.dataclass
class Point:
    x: int
    y: int


async def test_activity_input_type_decodes_the_input() -> None:
    bp = df.Blueprint()

    @bp.activity_trigger(input_name="point", input_type=Point)
    async def norm(point: Point) -> int:
        return abs(point.x) + abs(point.y)

    activity = bp.durable_functions.activities["norm"]
    assert await activity.invoke({"x": 3, "y": -4}) == 7
    assert await activity.invoke(Point(1, 1)) == 2
