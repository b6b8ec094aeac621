"""The local development host (``durable start``): route templates, keys, settings, and app folders
served under ``durable start`` on Azurite (HTTP triggers, auth, route prefix, queue triggers with
the Functions host's retry and poison semantics, clean shutdown)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from azure.core.exceptions import ResourceNotFoundError
from azure.storage.queue import QueueClient

from durable.host._azurite import accepts_connections, free_ports
from durable.host._host import AuthKeys, compile_route, route_precedence
from durable.host._settings import HostSettings, SettingsError, load_local_settings, parse_timespan
from tests.fixtures_host import REPO_ROOT, STARTUP_TIMEOUT, ServedApp

WAIT = 30.0  # generous upper bound for anything asynchronous to happen (never asserted on)


# ====================================================================================================
# Unit tests: no subprocess
# ====================================================================================================
def match(template: str, path: str) -> dict[str, str] | None:
    found = compile_route(template).fullmatch(path)
    return None if found is None else {k: v for k, v in found.groupdict().items() if v is not None}


class TestCompileRoute:
    def test_literal(self) -> None:
        assert match("hello", "hello") == {}
        assert match("hello/world", "hello/world") == {}
        assert match("/hello/", "hello") == {}  # leading and trailing slashes of the template ignored
        assert match("hello", "hello/extra") is None
        assert match("hello", "hell") is None
        assert match("a.b", "axb") is None  # literals are not regexes

    def test_parameter(self) -> None:
        assert match("orders/{id}", "orders/42") == {"id": "42"}
        assert match("orders/{id}/items/{item}", "orders/42/items/x-1") == {"id": "42", "item": "x-1"}
        assert match("orders/{id}", "orders") is None
        assert match("orders/{id}", "orders/") is None
        assert match("orders/{id}", "orders/1/2") is None

    def test_optional_parameter(self) -> None:
        assert match("orders/{id?}", "orders/7") == {"id": "7"}
        assert match("orders/{id?}", "orders") == {}
        assert match("orders/{id?}", "orders/7/8") is None
        assert match("{name?}", "") == {}
        assert match("{name?}", "bob") == {"name": "bob"}

    def test_catch_all(self) -> None:
        assert match("files/{*path}", "files/a/b/c.txt") == {"path": "a/b/c.txt"}
        assert match("files/{*path}", "files/x") == {"path": "x"}
        assert match("files/{*path}", "files") == {}  # empty catch-all: no value
        assert match("files/{*path}", "files/") == {"path": ""}
        assert match("files/{*path}", "filesx") is None

    def test_int_constraint(self) -> None:
        assert match("orders/{id:int}", "orders/42") == {"id": "42"}
        assert match("orders/{id:int}", "orders/-3") == {"id": "-3"}
        assert match("orders/{id:int}", "orders/abc") is None
        assert match("orders/{id:int}", "orders/4x") is None
        assert match("orders/{id:int?}", "orders") == {}
        assert match("orders/{id:int?}", "orders/5") == {"id": "5"}

    def test_other_constraints(self) -> None:
        assert match("{flag:bool}", "true") == {"flag": "true"}
        assert match("{flag:bool}", "False") == {"flag": "False"}
        assert match("{flag:bool}", "yes") is None
        assert match("{name:alpha}", "abc") == {"name": "abc"}
        assert match("{name:alpha}", "ab1") is None
        guid = str(uuid.uuid4())
        assert match("{id:guid}", guid) == {"id": guid}
        assert match("{id:guid}", "not-a-guid") is None
        assert match("{code:length(3)}", "abc") == {"code": "abc"}
        assert match("{code:length(3)}", "abcd") is None
        assert match("{code:minlength(2):alpha}", "ab") == {"code": "ab"}
        assert match("{code:minlength(2):alpha}", "a") is None
        assert match("{code:minlength(2):alpha}", "a1") is None
        assert match("{x:decimal}", "1.5") == {"x": "1.5"}
        assert match("{x:decimal}", "1.5.5") is None

    def test_case_insensitive(self) -> None:
        assert match("Orders/{id}", "orders/1") == {"id": "1"}
        assert match("orders/{id}", "ORDERS/1") == {"id": "1"}

    def test_parameter_values_keep_their_case(self) -> None:
        assert match("orders/{id}", "ORDERS/AbC") == {"id": "AbC"}


def test_route_precedence_orders_literals_before_parameters_before_catch_alls() -> None:
    templates = ["orders/{*rest}", "orders/{id}", "orders/{id:int}", "orders/summary", "{*all}", "orders"]
    assert sorted(templates, key=route_precedence) == [
        "orders",
        "orders/summary",
        "orders/{id:int}",
        "orders/{id}",
        "orders/{*rest}",
        "{*all}",
    ]


class TestAuthKeys:
    @pytest.mark.parametrize("level", ["anonymous", "function", "admin", "ANONYMOUS", "Function"])
    def test_no_keys_configured_means_open(self, level: str) -> None:
        assert AuthKeys().allows(level, None)
        assert AuthKeys().allows(level, "anything")

    def test_anonymous_is_always_open(self) -> None:
        keys = AuthKeys("k1", "m1")
        assert keys.allows("anonymous", None)
        assert keys.allows("anonymous", "wrong")

    def test_function_level(self) -> None:
        keys = AuthKeys("k1", "m1")
        assert not keys.allows("function", None)
        assert not keys.allows("function", "")
        assert not keys.allows("function", "wrong")
        assert not keys.allows("function", "k1x")
        assert keys.allows("function", "k1")
        assert keys.allows("function", "m1")  # the master key works everywhere
        assert keys.allows("FUNCTION", "k1")

    def test_admin_level_needs_the_master_key(self) -> None:
        keys = AuthKeys("k1", "m1")
        assert not keys.allows("admin", None)
        assert not keys.allows("admin", "k1")
        assert not keys.allows("admin", "wrong")
        assert keys.allows("admin", "m1")

    def test_only_a_function_key(self) -> None:
        keys = AuthKeys(function_key="k1")
        assert keys.allows("function", "k1")
        assert not keys.allows("function", "m1")
        assert not keys.allows("admin", "k1")  # no master key: admin functions are closed

    def test_only_a_master_key(self) -> None:
        keys = AuthKeys(master_key="m1")
        assert not keys.allows("function", None)
        assert keys.allows("function", "m1")
        assert keys.allows("admin", "m1")


class TestSettings:
    def write_host_json(self, folder: Path, extensions: dict[str, Any]) -> None:
        (folder / "host.json").write_text(json.dumps({"version": "2.0", "extensions": extensions}))

    def test_defaults_without_host_json(self, tmp_path: Path) -> None:
        settings = HostSettings.load(tmp_path)
        assert settings == HostSettings()
        assert settings.route_prefix == "api"
        assert settings.message_encoding == "base64"

    def test_load(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("MyHubSetting", "ExpandedHub")
        self.write_host_json(
            tmp_path,
            {
                "http": {"routePrefix": "/custom/"},
                "queues": {
                    "batchSize": 8,
                    "visibilityTimeout": "00:00:05",
                    "maxDequeueCount": 3,
                    "maxPollingInterval": "00:00:01.5",
                    "messageEncoding": "None",
                },
                "durableTask": {
                    "hubName": "%MyHubSetting%",
                    "storageProvider": {
                        "partitionCount": 2, "connectionStringName": "MyStorage", "maxQueuePollingInterval": "00:00:10",
                    },
                },
            },
        )  # fmt: skip
        settings = HostSettings.load(tmp_path)
        assert settings.route_prefix == "custom"
        assert settings.hub_name == "ExpandedHub"
        assert settings.partition_count == 2
        assert settings.connection_setting == "MyStorage"
        assert settings.queue_batch_size == 8
        assert settings.queue_visibility_timeout == 5.0
        assert settings.queue_max_dequeue_count == 3
        assert settings.queue_max_polling_interval == 1.5
        assert settings.max_queue_polling_interval == 10.0
        assert settings.message_encoding == "none"

    @pytest.mark.parametrize(("value", "expected"), [(None, True), (False, False), ("true", True), ("False", False)])
    def test_extended_sessions(self, tmp_path: Path, value: Any, expected: bool) -> None:
        self.write_host_json(tmp_path, {"durableTask": {} if value is None else {"extendedSessionsEnabled": value}})
        assert HostSettings.load(tmp_path).extended_sessions is expected

    def test_extended_sessions_must_be_a_flag(self, tmp_path: Path) -> None:
        self.write_host_json(tmp_path, {"durableTask": {"extendedSessionsEnabled": "sometimes"}})
        with pytest.raises(SettingsError, match="extendedSessionsEnabled"):
            HostSettings.load(tmp_path)

    def test_empty_route_prefix(self, tmp_path: Path) -> None:
        self.write_host_json(tmp_path, {"http": {"routePrefix": ""}})
        assert HostSettings.load(tmp_path).route_prefix == ""

    def test_literal_hub_name(self, tmp_path: Path) -> None:
        self.write_host_json(tmp_path, {"durableTask": {"hubName": "PlainHub"}})
        assert HostSettings.load(tmp_path).hub_name == "PlainHub"

    def test_hub_name_from_a_missing_setting(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("NoSuchHubSetting", raising=False)
        self.write_host_json(tmp_path, {"durableTask": {"hubName": "%NoSuchHubSetting%"}})
        with pytest.raises(SettingsError, match="NoSuchHubSetting"):
            HostSettings.load(tmp_path)

    def test_malformed_host_json(self, tmp_path: Path) -> None:
        (tmp_path / "host.json").write_text('{"version": "2.0",')
        with pytest.raises(SettingsError, match=r"host\.json"):
            HostSettings.load(tmp_path)

    def test_host_json_not_an_object(self, tmp_path: Path) -> None:
        (tmp_path / "host.json").write_text("[1, 2]")
        with pytest.raises(SettingsError, match=r"host\.json"):
            HostSettings.load(tmp_path)

    @pytest.mark.parametrize(
        "queues",
        [{"visibilityTimeout": "five seconds"}, {"batchSize": "many"}, {"maxDequeueCount": None}],
    )
    def test_invalid_values_name_the_file(self, tmp_path: Path, queues: dict[str, Any]) -> None:
        self.write_host_json(tmp_path, {"queues": queues})
        with pytest.raises(SettingsError, match=r"host\.json"):
            HostSettings.load(tmp_path)

    def test_connection_string(self, monkeypatch: pytest.MonkeyPatch) -> None:
        settings = HostSettings(connection_setting="SomeStorageSetting")
        monkeypatch.delenv("SomeStorageSetting", raising=False)
        with pytest.raises(SettingsError, match="SomeStorageSetting"):
            settings.connection_string()
        monkeypatch.setenv("SomeStorageSetting", "UseDevelopmentStorage=true")
        assert settings.connection_string() == "UseDevelopmentStorage=true"

    @pytest.mark.parametrize(
        ("text", "seconds"),
        [
            ("00:00:05", 5.0),
            ("00:05:00", 300.0),
            ("01:02:03", 3723.0),
            ("1.02:03:04.5", 93784.5),
            ("0:0:0.25", 0.25),
            (" 00:00:01 ", 1.0),
            (7, 7.0),
            (2.5, 2.5),
        ],
    )
    def test_parse_timespan(self, text: str | float, seconds: float) -> None:
        assert parse_timespan(text) == seconds

    @pytest.mark.parametrize("text", ["5", "5s", "00:05", "aa:bb:cc", ""])
    def test_parse_timespan_rejects(self, text: str) -> None:
        with pytest.raises(SettingsError, match="timespan"):
            parse_timespan(text)

    def test_load_local_settings(self, tmp_path: Path) -> None:
        assert load_local_settings(tmp_path) == {}
        (tmp_path / "local.settings.json").write_text(
            json.dumps({"IsEncrypted": False, "Values": {"A": "1", "FUNCTIONS_WORKER_RUNTIME": "python", "N": 3}})
        )
        assert load_local_settings(tmp_path) == {"A": "1", "FUNCTIONS_WORKER_RUNTIME": "python", "N": "3"}

    def test_load_local_settings_without_values(self, tmp_path: Path) -> None:
        (tmp_path / "local.settings.json").write_text('{"IsEncrypted": false}')
        assert load_local_settings(tmp_path) == {}

    def test_malformed_local_settings(self, tmp_path: Path) -> None:
        (tmp_path / "local.settings.json").write_text("{nope")
        with pytest.raises(SettingsError, match=r"local\.settings\.json"):
            load_local_settings(tmp_path)
        (tmp_path / "local.settings.json").write_text('{"Values": [1]}')
        with pytest.raises(SettingsError, match=r"local\.settings\.json"):
            load_local_settings(tmp_path)


# ====================================================================================================
# Served app folders: `durable start` in a subprocess on the session's Azurite
# ====================================================================================================
def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def write_app(app_dir: Path, source: str, extensions: dict[str, Any]) -> Path:
    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "function_app.py").write_text(textwrap.dedent(source))
    (app_dir / "host.json").write_text(json.dumps({"version": "2.0", "extensions": extensions}, indent=2))
    return app_dir


def start_host(app_dir: Path, azurite: str, log_path: Path, *args: str, **env: str) -> ServedApp:
    """Like the ``serve_app`` fixture, for module-scoped hosts shared by several tests."""
    (port,) = free_ports(1)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DURABLE_")}
    environment = {**clean, "AzureWebJobsStorage": azurite, "PYTHONUNBUFFERED": "1", **env}
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "durable", "start", "--app-dir", str(app_dir), "--port", str(port), *args],
            cwd=REPO_ROOT,
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
    served = ServedApp(app_dir, port, process, log_path)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not (accepts_connections(port) and "Host started" in served.output()):
        if process.poll() is not None or time.monotonic() > deadline:
            served.stop()
            raise RuntimeError(f"durable start did not come up:\n{served.output()}")
        time.sleep(0.1)
    return served


def stop_cleanly(served: ServedApp) -> None:
    """Ctrl-C: the host finishes, says so and exits 0."""
    assert served.process.poll() is None, f"the host died early:\n{served.output()}"
    code = served.stop()
    assert code == 0, f"host exited with {code}:\n{served.output()}"
    assert "Host stopped." in served.output()
    for leak in ("Unclosed", "Task was destroyed", "Task exception was never retrieved", "KeyboardInterrupt"):
        assert leak not in served.output(), served.output()


async def fetch(method: str, url: str, **kwargs: Any) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as http, http.request(method, url, **kwargs) as response:
        return response.status, dict(response.headers), await response.read()


async def fetch_json(method: str, url: str, **kwargs: Any) -> tuple[int, Any]:
    status, _, body = await fetch(method, url, **kwargs)
    return status, json.loads(body) if body else None


# -- an HTTP app, served once with keys for all the HTTP tests ---------------------------------------
HTTP_APP = """
    import asyncio
    import json
    import threading

    import azure.functions as func

    import durable as df

    app = df.DFApp(http_auth_level=func.AuthLevel.ANONYMOUS)


    def describe(req: func.HttpRequest, kind: str) -> func.HttpResponse:
        payload = {
            "kind": kind,
            "method": req.method,
            "url": req.url,
            "route_params": dict(req.route_params),
            "params": dict(req.params),
            "header": req.headers.get("x-test-header"),
            "body": req.get_body().decode(),
            "thread": threading.current_thread() is threading.main_thread(),
        }
        return func.HttpResponse(json.dumps(payload), mimetype="application/json")


    @app.route(route="echo/{id}/{*rest}", methods=["GET", "POST"])
    def echo(req: func.HttpRequest) -> func.HttpResponse:
        return describe(req, "sync")


    @app.route(route="echo/literal/{*rest}", methods=["GET"])  # registered after echo/{id}/{*rest}
    def echo_literal(req: func.HttpRequest) -> func.HttpResponse:
        return describe(req, "literal")


    @app.route(route="aecho/{id:int}/{flag?}", methods=["GET"])
    async def async_echo(req: func.HttpRequest) -> func.HttpResponse:
        await asyncio.sleep(0)
        return describe(req, "async")


    @app.route(methods=["GET"])
    def plain(req: func.HttpRequest) -> str:
        return "plain text"


    @app.route(route="made", methods=["PUT"])
    def made(req: func.HttpRequest) -> func.HttpResponse:
        return func.HttpResponse(
            "<made/>", status_code=201, headers={"X-Custom": "yes", "Location": "/somewhere"}, mimetype="text/xml"
        )


    @app.route(route="teapot")
    async def teapot(req: func.HttpRequest) -> func.HttpResponse:
        return func.HttpResponse(status_code=418)


    @app.route(route="boom", methods=["GET"])
    def boom(req: func.HttpRequest) -> func.HttpResponse:
        raise RuntimeError("boom")


    @app.route(route="aboom", methods=["GET"])
    async def async_boom(req: func.HttpRequest) -> func.HttpResponse:
        raise ValueError("async boom")


    @app.route(route="secret", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
    def secret(req: func.HttpRequest) -> func.HttpResponse:
        return func.HttpResponse("function level")


    @app.route(route="adminonly", methods=["GET"], auth_level=func.AuthLevel.ADMIN)
    def admin_only(req: func.HttpRequest) -> func.HttpResponse:
        return func.HttpResponse("admin level")


    @app.route(route="start/{name}", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
    @app.durable_client_input(client_name="client")
    async def start(req: func.HttpRequest, client: df.DurableOrchestrationClient) -> func.HttpResponse:
        instance_id = await client.start_new(req.route_params["name"], None, req.get_json())
        return client.create_check_status_response(req, instance_id)


    @app.orchestration_trigger(context_name="context")
    def greet(context: df.DurableOrchestrationContext):
        name = context.get_input()
        return (yield context.call_activity("say_hello", name))


    @app.activity_trigger(input_name="name")
    def say_hello(name: str) -> str:
        return f"Hello {name}!"
"""


@pytest.fixture(scope="module")
def http_app(azurite: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedApp]:
    root = tmp_path_factory.mktemp("http-app")
    app_dir = write_app(root / "app", HTTP_APP, {"durableTask": {"hubName": unique("HostHttp")}})
    served = start_host(app_dir, azurite, root / "host.log", "--function-key", "k1", "--master-key", "m1")
    try:
        yield served
    finally:
        stop_cleanly(served)


KEY = {"x-functions-key": "k1"}


class TestHttpTriggers:
    async def test_route_and_query_parameters(self, http_app: ServedApp) -> None:
        url = f"{http_app.base_url}/api/echo/42/a/b.txt?x=1&y=two%20words"
        status, body = await fetch_json("GET", url, headers={"X-Test-Header": "hi"})
        assert status == 200
        assert body["kind"] == "sync"
        assert body["method"] == "GET"
        assert body["route_params"] == {"id": "42", "rest": "a/b.txt"}
        assert body["params"] == {"x": "1", "y": "two words"}
        assert body["header"] == "hi"
        assert body["url"].startswith(f"{http_app.base_url}/api/echo/42/a/b.txt?")
        assert body["thread"] is False  # sync functions run off the event loop's thread

    async def test_post_body_and_empty_catch_all(self, http_app: ServedApp) -> None:
        status, body = await fetch_json("POST", f"{http_app.base_url}/api/echo/7", data=b'{"a": 1}')
        assert status == 200
        assert body["method"] == "POST"
        assert body["route_params"] == {"id": "7"}
        assert body["body"] == '{"a": 1}'

    async def test_async_function_with_constraint_and_optional_parameter(self, http_app: ServedApp) -> None:
        status, body = await fetch_json("GET", f"{http_app.base_url}/api/aecho/5/on?q=1")
        assert status == 200
        assert body["kind"] == "async"
        assert body["route_params"] == {"id": "5", "flag": "on"}
        assert body["params"] == {"q": "1"}
        status, body = await fetch_json("GET", f"{http_app.base_url}/api/aecho/5")
        assert status == 200
        assert body["route_params"] == {"id": "5"}
        status, _, _ = await fetch("GET", f"{http_app.base_url}/api/aecho/five")  # {id:int}
        assert status == 404

    async def test_literal_segments_win_over_parameters(self, http_app: ServedApp) -> None:
        # ASP.NET route precedence, not registration order, picks among matching routes.
        status, body = await fetch_json("GET", f"{http_app.base_url}/api/echo/literal/x/y")
        assert (status, body["kind"], body["route_params"]) == (200, "literal", {"rest": "x/y"})
        status, body = await fetch_json("POST", f"{http_app.base_url}/api/echo/literal/x")  # literal is GET only
        assert (status, body["kind"], body["route_params"]) == (200, "sync", {"id": "literal", "rest": "x"})

    async def test_routes_ignore_case(self, http_app: ServedApp) -> None:
        status, body = await fetch_json("GET", f"{http_app.base_url}/API/Echo/Id1")
        assert status == 200
        assert body["route_params"] == {"id": "Id1"}

    async def test_default_route_is_the_function_name_and_str_results_are_bodies(self, http_app: ServedApp) -> None:
        status, _, body = await fetch("GET", f"{http_app.base_url}/api/plain")
        assert (status, body) == (200, b"plain text")

    async def test_http_response_passes_through(self, http_app: ServedApp) -> None:
        status, headers, body = await fetch("PUT", f"{http_app.base_url}/api/made")
        assert status == 201
        assert body == b"<made/>"
        assert headers["X-Custom"] == "yes"
        assert headers["Location"] == "/somewhere"
        assert headers["Content-Type"].startswith("text/xml")
        status, _, body = await fetch("GET", f"{http_app.base_url}/api/teapot")
        assert (status, body) == (418, b"")

    async def test_exceptions_are_500_and_the_host_keeps_serving(self, http_app: ServedApp) -> None:
        for path in ("boom", "aboom", "boom"):
            status, _, body = await fetch("GET", f"{http_app.base_url}/api/{path}")
            assert status == 500
            assert b"boom" not in body  # no exception details leak to the caller
        status, _, body = await fetch("GET", f"{http_app.base_url}/api/plain")
        assert (status, body) == (200, b"plain text")
        assert "RuntimeError: boom" in http_app.output()  # but the host logs them
        assert "ValueError: async boom" in http_app.output()

    async def test_unknown_route_is_404(self, http_app: ServedApp) -> None:
        for path in ("/api/nothing", "/api/echo", "/api/", "/nothing", "/", "/apiplain"):
            status, _, _ = await fetch("GET", f"{http_app.base_url}{path}")
            assert status == 404, path

    async def test_wrong_method_is_404_like_the_functions_host(self, http_app: ServedApp) -> None:
        # The Functions host answers 404 (not 405) for a known route with another method
        # (Azure/azure-functions-host#10098); the local host behaves the same.
        status, _, _ = await fetch("DELETE", f"{http_app.base_url}/api/echo/1")
        assert status == 404
        status, _, _ = await fetch("POST", f"{http_app.base_url}/api/plain")
        assert status == 404

    async def test_function_without_methods_accepts_any(self, http_app: ServedApp) -> None:
        for method in ("GET", "POST", "DELETE", "PATCH"):
            status, _, _ = await fetch(method, f"{http_app.base_url}/api/teapot")
            assert status == 418, method

    def test_printed_urls_look_like_func_start(self, http_app: ServedApp) -> None:
        output = http_app.output()
        base = f"http://127.0.0.1:{http_app.port}"
        assert f"echo: [GET,POST] {base}/api/echo/{{id}}/{{*rest}}" in output
        assert f"async_echo: [GET] {base}/api/aecho/{{id:int}}/{{flag?}}" in output
        assert f"plain: [GET] {base}/api/plain" in output
        assert f"made: [PUT] {base}/api/made" in output
        assert f"start: [POST] {base}/api/start/{{name}}" in output
        assert "greet: orchestrationTrigger" in output
        assert "say_hello: activityTrigger" in output
        # the runtime's own triggers are not the app's functions
        assert "durable_management" not in output
        assert "durable_control_00" not in output
        assert "durable_workitems" not in output
        assert f"Host started on {base}" in output


class TestKeys:
    async def test_anonymous_functions_are_open(self, http_app: ServedApp) -> None:
        status, _, _ = await fetch("GET", f"{http_app.base_url}/api/plain")
        assert status == 200

    async def test_function_level(self, http_app: ServedApp) -> None:
        url = f"{http_app.base_url}/api/secret"
        assert (await fetch("GET", url))[0] == 401
        assert (await fetch("GET", f"{url}?code=wrong"))[0] == 401
        assert (await fetch("GET", url, headers={"x-functions-key": "wrong"}))[0] == 401
        assert (await fetch("GET", f"{url}?code=k1"))[:1] == (200,)
        status, _, body = await fetch("GET", url, headers=KEY)
        assert (status, body) == (200, b"function level")
        assert (await fetch("GET", f"{url}?code=m1"))[0] == 200  # the master key works everywhere

    async def test_admin_level(self, http_app: ServedApp) -> None:
        url = f"{http_app.base_url}/api/adminonly"
        assert (await fetch("GET", url))[0] == 401
        assert (await fetch("GET", f"{url}?code=k1"))[0] == 401
        assert (await fetch("GET", url, headers=KEY))[0] == 401
        status, _, body = await fetch("GET", f"{url}?code=m1")
        assert (status, body) == (200, b"admin level")
        assert (await fetch("GET", url, headers={"x-functions-key": "m1"}))[0] == 200

    async def test_unknown_route_is_404_without_a_key(self, http_app: ServedApp) -> None:
        assert (await fetch("GET", f"{http_app.base_url}/api/secret/extra"))[0] == 404

    async def test_management_api_needs_the_system_or_master_key(self, http_app: ServedApp) -> None:
        url = f"{http_app.base_url}/api/durabletask/instances"
        assert (await fetch("GET", url))[0] == 401
        assert (await fetch("GET", f"{url}/some-id"))[0] == 401
        assert (await fetch("DELETE", f"{url}/some-id"))[0] == 401
        # a function key opens the app's functions, never the management API (as in Durable Functions)
        assert (await fetch("GET", url, headers=KEY))[0] == 401
        status, listing = await fetch_json("GET", url, headers={"x-functions-key": "m1"})
        assert status == 200
        assert isinstance(listing, list)
        assert (await fetch("GET", f"{url}/no-such-instance?code=m1"))[0] == 404

    async def test_check_status_urls_carry_the_system_key_only(self, http_app: ServedApp) -> None:
        assert (await fetch("POST", f"{http_app.base_url}/api/start/greet", json="Ann"))[0] == 401
        status, headers, raw = await fetch("POST", f"{http_app.base_url}/api/start/greet?code=k1", json="Ann")
        assert status == 202, raw
        payload = json.loads(raw)
        base = f"{http_app.base_url}/api/durabletask/instances/{payload['id']}"
        assert headers["Location"] == payload["statusQueryGetUri"]
        for name in ("statusQueryGetUri", "sendEventPostUri", "terminatePostUri", "purgeHistoryDeleteUri"):
            assert payload[name].startswith(base), name
            assert "code=" in payload[name], name
            assert "code=k1" not in payload[name] and "code=m1" not in payload[name], name  # never a user key
        deadline = time.monotonic() + WAIT
        while True:
            status, body = await fetch_json("GET", payload["statusQueryGetUri"])  # the key is in the URL
            assert status in (200, 202), body
            if body["runtimeStatus"] == "Completed" or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert (status, body["output"]) == (200, "Hello Ann!")
        status, purged = await fetch_json("DELETE", payload["purgeHistoryDeleteUri"])
        assert (status, purged) == (200, {"instancesDeleted": 1})


# -- queue triggers ---------------------------------------------------------------------------------
QUEUE_APP = """
    import json
    import os
    from pathlib import Path

    import azure.functions as func

    app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)
    RESULTS = Path(os.environ["RESULTS_DIR"])


    def record(function: str, msg: func.QueueMessage, **extra: str) -> None:
        line = {"function": function, "id": msg.id, "body": msg.get_body().decode("utf-8"),
                "dequeue_count": msg.dequeue_count, **extra}
        with open(RESULTS / "results.jsonl", "a", encoding="utf-8") as file:
            file.write(json.dumps(line) + "\\n")


    @app.queue_trigger(arg_name="msg", queue_name="%JOBS_QUEUE%", connection="AzureWebJobsStorage")
    def jobs(msg: func.QueueMessage) -> None:
        record("jobs", msg)


    @app.queue_trigger(arg_name="msg", queue_name="%FAILING_QUEUE%", connection="AzureWebJobsStorage")
    async def always_fails(msg: func.QueueMessage) -> None:
        record("always_fails", msg)
        raise RuntimeError("always fails")


    @app.queue_trigger(arg_name="msg", queue_name="%FLAKY_QUEUE%", connection="AzureWebJobsStorage")
    def fails_once(msg: func.QueueMessage) -> None:
        marker = RESULTS / f"failed-{msg.id}"
        if not marker.exists():
            marker.touch()
            record("fails_once", msg, outcome="raised")
            raise RuntimeError("the first attempt fails")
        record("fails_once", msg, outcome="ok")


    @app.queue_trigger(arg_name="msg", queue_name="%DOOMED_QUEUE%", connection="AzureWebJobsStorage")
    def doomed(msg: func.QueueMessage) -> None:
        record("doomed", msg)


    @app.route(route="ping", methods=["GET"])
    def ping(req: func.HttpRequest) -> func.HttpResponse:
        return func.HttpResponse("pong")
"""


@dataclass
class QueueApp:
    served: ServedApp
    azurite: str
    queues: dict[str, str]  # setting name -> queue name
    results_dir: Path

    def queue(self, setting: str, suffix: str = "") -> QueueClient:
        return QueueClient.from_connection_string(self.azurite, self.queues[setting] + suffix)

    def results(self, function: str) -> list[dict[str, Any]]:
        path = self.results_dir / "results.jsonl"
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        lines = text.split("\n")[:-1]  # the host may be writing the last line right now
        return [entry for entry in map(json.loads, lines) if entry["function"] == function]


def wait_for(condition: Callable[[], Any], what: str) -> Any:
    deadline = time.monotonic() + WAIT
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def queue_length(queue: QueueClient) -> int:
    try:
        return queue.get_queue_properties().approximate_message_count or 0
    except ResourceNotFoundError:
        return 0


def serve_queue_app(
    azurite: str, root: Path, extensions: dict[str, Any], *args: str, prepare: Callable[[QueueApp], None] | None = None,
    **env: str,
) -> QueueApp:  # fmt: skip
    queues = {name: unique("hostq") for name in ("JOBS_QUEUE", "FAILING_QUEUE", "FLAKY_QUEUE", "DOOMED_QUEUE")}
    results_dir = root / "results"
    results_dir.mkdir()
    app_dir = write_app(root / "app", QUEUE_APP, {"durableTask": {"hubName": unique("HostQueue")}, **extensions})
    # The app settings come from local.settings.json, as with `func start`.
    values = {**queues, "RESULTS_DIR": str(results_dir), "FUNCTIONS_WORKER_RUNTIME": "python"}
    (app_dir / "local.settings.json").write_text(json.dumps({"IsEncrypted": False, "Values": values}))
    app = QueueApp(None, azurite, queues, results_dir)  # type: ignore[arg-type]
    if prepare is not None:
        prepare(app)
    app.served = start_host(app_dir, azurite, root / "host.log", *args, **env)
    return app


def bump_dequeue_count(app: QueueApp) -> None:
    """Before the host runs: a message on DOOMED_QUEUE that was already received twice (as if two
    attempts had taken the process down)."""
    queue = app.queue("DOOMED_QUEUE")
    queue.create_queue()
    queue.send_message("doomed message")
    for _ in range(2):
        (received,) = queue.receive_messages(visibility_timeout=1, max_messages=1)
        queue.update_message(received, pop_receipt=received.pop_receipt, visibility_timeout=0)
    (peeked,) = queue.peek_messages()
    assert peeked.dequeue_count == 2


SPEEDY_QUEUES = {"maxDequeueCount": 2, "visibilityTimeout": "00:00:00", "maxPollingInterval": "00:00:00.200"}


@pytest.fixture(scope="module")
def base64_app(azurite: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[QueueApp]:
    """messageEncoding left at its default (base64), routePrefix "custom", no keys."""
    extensions = {"http": {"routePrefix": "custom"}, "queues": {**SPEEDY_QUEUES, "batchSize": 4}}
    app = serve_queue_app(azurite, tmp_path_factory.mktemp("base64-app"), extensions)
    try:
        yield app
    finally:
        stop_cleanly(app.served)


@pytest.fixture(scope="module")
def plain_app(azurite: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[QueueApp]:
    """messageEncoding "none", routePrefix "", the function key from DURABLE_FUNCTION_KEY."""
    extensions = {"http": {"routePrefix": ""}, "queues": {**SPEEDY_QUEUES, "messageEncoding": "none"}}
    app = serve_queue_app(
        azurite, tmp_path_factory.mktemp("plain-app"), extensions, prepare=bump_dequeue_count,
        DURABLE_FUNCTION_KEY="envkey",
    )  # fmt: skip
    try:
        yield app
    finally:
        stop_cleanly(app.served)


def b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


class TestQueueTriggers:
    def test_base64_message_bodies(self, base64_app: QueueApp) -> None:
        queue = base64_app.queue("JOBS_QUEUE")
        bodies = [json.dumps({"n": n, "text": "héllo ✓"}, ensure_ascii=False) for n in range(6)]
        sent = {queue.send_message(b64(body)).id: body for body in bodies}
        received = wait_for(lambda: len(base64_app.results("jobs")) >= len(sent) and base64_app.results("jobs"), "jobs")
        assert {entry["id"]: entry["body"] for entry in received} == sent
        assert len(received) == len(sent)
        assert all(entry["dequeue_count"] == 1 for entry in received)
        wait_for(lambda: queue_length(queue) == 0, "the messages to be deleted")

    def test_plain_message_bodies(self, plain_app: QueueApp) -> None:
        queue = plain_app.queue("JOBS_QUEUE")
        body = '{"text": "plain héllo ✓"}'
        sent = queue.send_message(body)
        (entry,) = wait_for(lambda: plain_app.results("jobs"), "jobs")
        assert (entry["id"], entry["body"], entry["dequeue_count"]) == (sent.id, body, 1)
        wait_for(lambda: queue_length(queue) == 0, "the message to be deleted")

    @pytest.mark.parametrize("encoding", ["base64", "none"])
    def test_always_failing_function_poisons_after_max_dequeue_count(
        self, encoding: str, base64_app: QueueApp, plain_app: QueueApp
    ) -> None:
        app = base64_app if encoding == "base64" else plain_app
        raw = b64("bad job") if encoding == "base64" else "bad job"
        sent = app.queue("FAILING_QUEUE").send_message(raw)
        poison = app.queue("FAILING_QUEUE", "-poison")
        wait_for(lambda: queue_length(poison) > 0, "the poison queue")
        (poisoned,) = poison.peek_messages(max_messages=32)
        assert poisoned.content == raw  # moved as it was
        attempts = [entry for entry in app.results("always_fails") if entry["id"] == sent.id]
        assert [entry["dequeue_count"] for entry in attempts] == [1, 2]  # maxDequeueCount: 2
        assert all(entry["body"] == "bad job" for entry in attempts)
        assert queue_length(app.queue("FAILING_QUEUE")) == 0
        assert f"moved to {app.queues['FAILING_QUEUE']}-poison" in app.served.output()

    def test_function_that_fails_once_succeeds_exactly_once(self, base64_app: QueueApp) -> None:
        queue = base64_app.queue("FLAKY_QUEUE")
        sent = queue.send_message(b64("flaky job"))
        wait_for(lambda: any(e["outcome"] == "ok" for e in base64_app.results("fails_once")), "the retry")
        wait_for(lambda: queue_length(queue) == 0, "the message to be deleted")
        attempts = base64_app.results("fails_once")
        assert [(e["id"], e["outcome"], e["dequeue_count"]) for e in attempts] == [
            (sent.id, "raised", 1),
            (sent.id, "ok", 2),
        ]
        assert queue_length(base64_app.queue("FLAKY_QUEUE", "-poison")) == 0

    def test_message_over_the_dequeue_limit_is_poisoned_without_invocation(self, plain_app: QueueApp) -> None:
        poison = plain_app.queue("DOOMED_QUEUE", "-poison")
        wait_for(lambda: queue_length(poison) > 0, "the poison queue")
        (poisoned,) = poison.peek_messages()
        assert poisoned.content == "doomed message"
        assert plain_app.results("doomed") == []
        assert queue_length(plain_app.queue("DOOMED_QUEUE")) == 0

    def test_queue_functions_are_listed(self, base64_app: QueueApp) -> None:
        output = base64_app.served.output()
        for name in ("jobs", "always_fails", "fails_once", "doomed"):
            assert f"        {name}: queueTrigger" in output


class TestRoutePrefix:
    async def test_custom_prefix(self, base64_app: QueueApp) -> None:
        served = base64_app.served
        status, _, body = await fetch("GET", f"{served.base_url}/custom/ping")
        assert (status, body) == (200, b"pong")  # no keys configured: function level is open
        assert (await fetch("GET", f"{served.base_url}/api/ping"))[0] == 404
        assert (await fetch("GET", f"{served.base_url}/ping"))[0] == 404
        assert f"ping: [GET] http://127.0.0.1:{served.port}/custom/ping" in served.output()

    async def test_empty_prefix_and_key_from_the_environment(self, plain_app: QueueApp) -> None:
        served = plain_app.served
        assert (await fetch("GET", f"{served.base_url}/ping"))[0] == 401
        assert (await fetch("GET", f"{served.base_url}/ping?code=k1"))[0] == 401
        status, _, body = await fetch("GET", f"{served.base_url}/ping?code=envkey")
        assert (status, body) == (200, b"pong")
        assert (await fetch("GET", f"{served.base_url}/api/ping?code=envkey"))[0] == 404
        assert f"ping: [GET] http://127.0.0.1:{served.port}/ping" in served.output()


# -- start-up errors and shutdown ----------------------------------------------------------------------
async def test_sigint_lets_a_running_request_finish(serve_app: Callable[..., ServedApp], tmp_path: Path) -> None:
    source = """
        import os
        import time
        from pathlib import Path

        import azure.functions as func

        app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)


        @app.route(route="hello")
        def hello(req: func.HttpRequest) -> str:
            return "hi"


        @app.route(route="slow", methods=["GET"])
        def slow(req: func.HttpRequest) -> str:
            Path(os.environ["STARTED_FILE"]).touch()
            while not Path(os.environ["RELEASE_FILE"]).exists():
                time.sleep(0.01)
            return "finished"
    """
    started, release = tmp_path / "started", tmp_path / "release"
    served = serve_app(
        write_app(tmp_path / "app", source, {}), STARTED_FILE=str(started), RELEASE_FILE=str(release)
    )  # an app without queue triggers
    assert f"hello: [GET,POST,PUT,DELETE,PATCH,HEAD,OPTIONS] {served.base_url}/api/hello" in served.output()
    request = asyncio.ensure_future(fetch("GET", f"{served.base_url}/api/slow"))
    await asyncio.to_thread(wait_for, started.exists, "the request to start")
    served.process.send_signal(signal.SIGINT)
    release.touch()
    status, _, body = await request
    assert (status, body) == (200, b"finished")
    assert await asyncio.to_thread(served.process.wait, WAIT) == 0
    assert served.output().rstrip().endswith("Host stopped.")


def test_port_in_use(azurite: str, tmp_path: Path) -> None:
    app_dir = write_app(tmp_path / "app", "import azure.functions as func\napp = func.FunctionApp()\n", {})
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_start(app_dir, azurite, port)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"port {port} is unavailable" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def run_start(app_dir: Path, azurite: str, port: int | None = None) -> subprocess.CompletedProcess[str]:
    port = port or free_ports(1)[0]
    return subprocess.run(
        [sys.executable, "-m", "durable", "start", "--app-dir", str(app_dir), "--port", str(port)],
        cwd=REPO_ROOT,
        env={**os.environ, "AzureWebJobsStorage": azurite},
        capture_output=True,
        text=True,
        timeout=WAIT,
    )


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({}, "no function_app.py"),
        ({"function_app.py": "x = 1\n"}, "exactly one FunctionApp"),
        (
            {"function_app.py": "import azure.functions as func\napp = func.FunctionApp()\n", "host.json": "{"},
            "host.json",
        ),
        (
            {
                "function_app.py": "import azure.functions as func\napp = func.FunctionApp()\n"
                '@app.queue_trigger(arg_name="m", queue_name="%NoSuchQueueSetting%",'
                ' connection="AzureWebJobsStorage")\n'
                "def f(m: func.QueueMessage) -> None: ...\n"
            },
            "NoSuchQueueSetting",
        ),
    ],
)
def test_start_errors_exit_1_with_a_message(azurite: str, tmp_path: Path, files: dict[str, str], message: str) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    result = run_start(tmp_path, azurite)
    assert result.returncode == 1, result.stdout + result.stderr
    assert message in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
