"""Identity-based storage connections (``AzureWebJobsStorage__accountName`` / ``__credential`` /
``__clientId`` / ``__*ServiceUri``), from the app settings to requests that carry an Entra ID
bearer token.

The round trips run against an Azurite of their own that serves HTTPS with a self-signed
certificate and checks bearer tokens (``--oauth basic``: lifetime, issuer and audience; it does not
check signatures). The token comes from the managed identity credential the settings ask for,
which, with ``IDENTITY_ENDPOINT`` and ``IDENTITY_HEADER`` set as App Service sets them, asks a
local token endpoint of this test (it records the requests, so the test sees which identity was
asked for)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, web
from azure.core.credentials import AccessToken
from azure.core.credentials_async import AsyncTokenCredential
from azure.core.exceptions import HttpResponseError
from azure.identity.aio import DefaultAzureCredential, ManagedIdentityCredential
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import durable as df
from durable.host._azurite import accepts_connections, find_azurite, free_ports
from durable.host._functions import HostedRuntime, open_connection, storage_connection
from durable.host._host import LocalHost
from durable.host._settings import HostSettings, IdentityConnection
from durable.runtime._backend import InstanceQuery
from durable.runtime._client import DurableOrchestrationClient
from storage.azure import AzureStorageBackend
from storage.azure._connection import StorageEndpoints, table_service_client

pytestmark = pytest.mark.azurite

REPO_ROOT = Path(__file__).resolve().parent.parent
ACCOUNT = "devstoreaccount1"  # Azurite's account, which it also serves to bearer tokens
IDENTITY_HEADER = "identity-header-secret"
CLIENT_ID = "5d6e7f80-1a2b-4c3d-9e8f-0a1b2c3d4e5f"  # the user-assigned identity the settings name


# -- an HTTPS Azurite that checks bearer tokens ------------------------------------------------------
def _self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)  # trusted as its own CA
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@dataclass(frozen=True)
class SecureAzurite:
    ports: tuple[int, int, int]  # blob, queue, table
    certificate: Path

    def url(self, service: str) -> str:
        port = self.ports[("blob", "queue", "table").index(service)]
        return f"https://127.0.0.1:{port}/{ACCOUNT}"

    def endpoints(self, credential: AsyncTokenCredential) -> StorageEndpoints:
        blob, queue, table = (self.url(service) for service in ("blob", "queue", "table"))
        return StorageEndpoints(blob, queue, table, credential, connection_verify=str(self.certificate))


@pytest.fixture(scope="module")
def secure_azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureAzurite]:
    folder = tmp_path_factory.mktemp("azurite-oauth")
    cert, key = _self_signed_certificate(folder)
    blob, queue, table = free_ports(3)
    command = [str(find_azurite(REPO_ROOT)), "--silent", "--skipApiVersionCheck", "--disableTelemetry", "--loose"]
    command += ["--oauth", "basic", "--cert", str(cert), "--key", str(key), "--location", str(folder)]
    for service, port in (("blob", blob), ("queue", queue), ("table", table)):
        command += [f"--{service}Host", "127.0.0.1", f"--{service}Port", str(port)]
    with open(folder / "azurite.log", "wb") as log:
        process = subprocess.Popen(command, cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not all(accepts_connections(p) for p in (blob, queue, table)):
            assert process.poll() is None, (folder / "azurite.log").read_text(errors="replace")
            assert time.monotonic() < deadline, "Azurite (HTTPS, OAuth) did not start within 30 s"
            time.sleep(0.1)
        yield SecureAzurite((blob, queue, table), cert)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- a managed identity token endpoint (App Service's protocol) --------------------------------------
def _jwt(claims: dict[str, object]) -> str:
    def part(value: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256', 'typ': 'JWT'})}.{part(claims)}.bm90LWNoZWNrZWQ"  # Azurite skips signatures


def storage_token(audience: str = "https://storage.azure.com", lifetime: int = 3600) -> str:
    now = int(time.time())
    return _jwt({
        "aud": audience,
        "iss": "https://sts.windows.net/72f988bf-0000-0000-0000-000000000000/",
        "iat": now - 60,
        "nbf": now - 60,
        "exp": now + lifetime,
        "oid": CLIENT_ID,
    })  # fmt: skip


class FixedToken:
    """A token credential that hands out one given token (the storage SDKs ask it for each request)."""

    def __init__(self, token: str) -> None:
        self.token = token

    async def get_token(
        self, *scopes: str, claims: str | None = None, tenant_id: str | None = None, enable_cae: bool = False,
        **kwargs: Any,
    ) -> AccessToken:  # fmt: skip
        return AccessToken(self.token, int(time.time()) + 3600)

    async def close(self) -> None:
        pass

    async def __aenter__(self) -> FixedToken:
        return self

    async def __aexit__(self, *exc: object) -> None:
        pass


@dataclass
class TokenEndpoint:
    url: str
    requests: list[dict[str, str]] = field(default_factory=list)  # query parameters and the identity header


@pytest.fixture
async def token_endpoint() -> AsyncIterator[TokenEndpoint]:
    endpoint = TokenEndpoint("")

    async def issue(request: web.Request) -> web.Response:
        endpoint.requests.append({**request.query, "header": request.headers.get("X-IDENTITY-HEADER", "")})
        if request.headers.get("X-IDENTITY-HEADER") != IDENTITY_HEADER:
            return web.json_response({"error": "bad identity header"}, status=401)
        expires_on = int(time.time()) + 3600
        body = {"access_token": storage_token(), "expires_on": str(expires_on), "resource": request.query.get(
            "resource", ""), "token_type": "Bearer"}  # fmt: skip
        return web.json_response(body)

    server = web.Application()
    server.router.add_get("/msi/token", issue)
    runner = web.AppRunner(server, access_log=None)
    await runner.setup()
    port = free_ports(1)[0]
    await web.TCPSite(runner, "127.0.0.1", port).start()
    endpoint.url = f"http://127.0.0.1:{port}/msi/token"
    try:
        yield endpoint
    finally:
        await runner.cleanup()


def identity_settings(
    azurite: SecureAzurite, tokens: TokenEndpoint, name: str = "AzureWebJobsStorage"
) -> dict[str, str]:
    """App settings of an identity-based connection to ``azurite`` with a user-assigned managed
    identity, and the environment App Service gives such an identity."""
    return {
        f"{name}__blobServiceUri": azurite.url("blob"),
        f"{name}__queueServiceUri": azurite.url("queue"),
        f"{name}__tableServiceUri": azurite.url("table"),
        f"{name}__credential": "managedidentity",
        f"{name}__clientId": CLIENT_ID,
        "IDENTITY_ENDPOINT": tokens.url,
        "IDENTITY_HEADER": IDENTITY_HEADER,
    }


def _hub() -> str:
    return f"identity{uuid.uuid4().hex[:10]}"


@pytest.fixture
def app_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "host.json").write_text(
        json.dumps({"version": "2.0", "extensions": {"durableTask": {"hubName": _hub()}}})
    )
    monkeypatch.setenv("AzureWebJobsScriptRoot", str(tmp_path))
    monkeypatch.delenv("AzureWebJobsStorage", raising=False)
    for name in list(os.environ):
        if name.startswith("AzureWebJobsStorage__"):
            monkeypatch.delenv(name)
    return tmp_path


# -- from the settings to the backend ------------------------------------------------------------
async def test_account_name_and_client_id_become_the_backends_endpoints_and_credential(
    app_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AzureWebJobsStorage__accountName", "contosodurable")
    monkeypatch.setenv("AzureWebJobsStorage__credential", "managedidentity")
    monkeypatch.setenv("AzureWebJobsStorage__clientId", CLIENT_ID)
    runtime = HostedRuntime(df.Blueprint(), HostSettings.load(app_dir))
    backend = runtime.backend
    try:
        assert isinstance(backend, AzureStorageBackend)
        assert backend.connection_string is None
        endpoints = backend.connection
        assert isinstance(endpoints, StorageEndpoints)
        assert (endpoints.blob_url, endpoints.queue_url, endpoints.table_url) == (
            "https://contosodurable.blob.core.windows.net",
            "https://contosodurable.queue.core.windows.net",
            "https://contosodurable.table.core.windows.net",
        )
        assert isinstance(endpoints.credential, ManagedIdentityCredential)
        assert endpoints.close_credential  # made for this backend, closed with it
        client = table_service_client(endpoints)
        async with client:
            assert client.url.startswith("https://contosodurable.table.core.windows.net")
            assert client.account_name == "contosodurable"
    finally:
        await runtime.close()


async def test_a_connection_string_in_the_setting_wins_over_identity_settings(
    app_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As the Functions host reads them: the setting's own value first, then its <name>__* section.
    monkeypatch.setenv("AzureWebJobsStorage", "UseDevelopmentStorage=true")
    monkeypatch.setenv("AzureWebJobsStorage__accountName", "contosodurable")
    runtime = HostedRuntime(df.Blueprint(), HostSettings.load(app_dir))
    try:
        backend = runtime.backend
        assert isinstance(backend, AzureStorageBackend)
        assert backend.connection == backend.connection_string
        assert "BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1" in str(backend.connection_string)
    finally:
        await runtime.close()


def test_endpoints_refuse_plain_http_for_a_token() -> None:
    # The SDKs would send the bearer token in the clear; storage refuses it there anyway.
    credential = ManagedIdentityCredential()
    with pytest.raises(ValueError, match="queue_url must be an https:// URL"):
        StorageEndpoints("https://a.blob.core.windows.net", "http://127.0.0.1:10001/a", "https://t", credential)


# -- round trips with a managed identity's bearer token ------------------------------------------
async def test_orchestration_round_trip_with_a_managed_identity_token(
    app_dir: Path, monkeypatch: pytest.MonkeyPatch, secure_azurite: SecureAzurite, token_endpoint: TokenEndpoint
) -> None:
    for name, value in identity_settings(secure_azurite, token_endpoint).items():
        monkeypatch.setenv(name, value)
    settings = HostSettings.load(app_dir)
    identity = storage_connection(settings)
    assert isinstance(identity, IdentityConnection)
    # The one difference from Azure: this Azurite's certificate is self-signed.
    opened = open_connection(identity)
    assert isinstance(opened, StorageEndpoints)
    endpoints = replace(opened, connection_verify=str(secure_azurite.certificate))
    backend = AzureStorageBackend(endpoints, task_hub=settings.hub_name)
    app = df.DFApp()

    @app.orchestration_trigger(context_name="context")
    def echo_twice(context: df.DurableOrchestrationContext):  # type: ignore[no-untyped-def]
        text = context.get_input()
        first = yield context.call_activity("echo", text)
        second = yield context.call_activity("echo", first)
        return len(second)

    @app.activity_trigger(input_name="text")
    def echo(text: str) -> str:
        return text

    options = df.WorkerOptions(idle_poll_min=0.02, idle_poll_max=0.1, visibility_timeout=10.0)
    runtime = df.DurableRuntime(app, backend, task_hub_name=settings.hub_name, options=options)
    await backend.create_task_hub()
    await runtime.start()
    try:
        big = "x" * 100_000  # past the queue and table limits: through blobs too
        instance_id = await runtime.client().start_new("echo_twice", client_input=big)
        status = await runtime.client().wait_for_completion(instance_id, timeout=30)
        assert status.runtime_status == df.OrchestrationRuntimeStatus.Completed
        assert status.output == len(big)
    finally:
        await runtime.stop()
        await backend.delete_task_hub()
        await backend.close()
    # Every token came from the identity the settings name, for Azure Storage.
    assert token_endpoint.requests
    assert {(r["client_id"], r["resource"], r["header"]) for r in token_endpoint.requests} == {
        (CLIENT_ID, "https://storage.azure.com", IDENTITY_HEADER)
    }


async def test_azurite_refuses_a_token_for_another_audience(secure_azurite: SecureAzurite) -> None:
    """What makes the round trip above mean something: the emulator does check the tokens."""

    def endpoints(token: str) -> StorageEndpoints:
        blob, queue, table = (secure_azurite.url(s) for s in ("blob", "queue", "table"))
        return StorageEndpoints(
            blob, queue, table, FixedToken(token), connection_verify=str(secure_azurite.certificate)
        )

    hub = _hub()
    async with AzureStorageBackend(endpoints(storage_token()), task_hub=hub) as right:
        await right.create_task_hub()
        try:
            assert await right.query_instances(InstanceQuery(), page_size=1) is not None
            wrong_audience = endpoints(storage_token(audience="https://vault.azure.net"))
            expired = endpoints(storage_token(lifetime=-120))
            for refused_connection in (wrong_audience, expired):
                async with AzureStorageBackend(refused_connection, task_hub=hub) as refused_backend:
                    with pytest.raises(HttpResponseError) as refused:
                        await refused_backend.query_instances(InstanceQuery(), page_size=1)
                    assert refused.value.status_code in (401, 403)
        finally:
            await right.delete_task_hub()


async def test_cli_operates_a_hub_through_the_identity_connection(
    app_dir: Path, secure_azurite: SecureAzurite, token_endpoint: TokenEndpoint
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AzureWebJobsStorage")}
    env.update(identity_settings(secure_azurite, token_endpoint))
    env["SSL_CERT_FILE"] = str(secure_azurite.certificate)  # trust the self-signed certificate

    async def durable(*args: str) -> dict[str, Any]:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "durable", *args, "--app-dir", str(app_dir), "--json",
            cwd=REPO_ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(), timeout=60)
        assert process.returncode == 0, err.decode()
        result: dict[str, Any] = json.loads(out)
        return result

    hub = HostSettings.load(app_dir).hub_name
    async with AzureStorageBackend(secure_azurite.endpoints(FixedToken(storage_token())), task_hub=hub) as backend:
        await backend.create_task_hub()
        await DurableOrchestrationClient(backend, task_hub_name=hub).start_new("pending_one")
        info = await durable("hub", "info")
        await backend.delete_task_hub()
    assert info["taskHub"] == hub
    assert info["account"] == ACCOUNT
    assert info["tables"] == {f"{hub}Instances": True, f"{hub}History": True}
    assert info["instances"] == {"Pending": 1}
    assert sum(info["queues"].values()) == 1  # the start message
    # The command's requests carried tokens of the identity the settings name.
    assert {r["client_id"] for r in token_endpoint.requests} == {CLIENT_ID}


async def test_the_standalone_dashboard_lists_a_hub_through_the_identity_connection(
    app_dir: Path, secure_azurite: SecureAzurite, token_endpoint: TokenEndpoint
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AzureWebJobsStorage")}
    env.update(identity_settings(secure_azurite, token_endpoint))
    env["SSL_CERT_FILE"] = str(secure_azurite.certificate)
    hub = HostSettings.load(app_dir).hub_name
    (port,) = free_ports(1)
    async with AzureStorageBackend(secure_azurite.endpoints(FixedToken(storage_token())), task_hub=hub) as backend:
        await backend.create_task_hub()
        instance_id = await DurableOrchestrationClient(backend, task_hub_name=hub).start_new("pending_one")
        dashboard = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "durable", "dashboard", "--app-dir", str(app_dir), "--port", str(port),
            cwd=REPO_ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while not accepts_connections(port):
                assert dashboard.returncode is None and time.monotonic() < deadline, "the dashboard did not start"
                await asyncio.sleep(0.2)
            async with ClientSession() as http, http.get(f"http://127.0.0.1:{port}/dashboard/") as answer:
                page = await answer.text()
            assert answer.status == 200, page
            assert instance_id in page  # listed through the identity connection
        finally:
            dashboard.send_signal(signal.SIGINT)
            await asyncio.wait_for(dashboard.communicate(), timeout=30)
            await backend.delete_task_hub()
    assert {r["client_id"] for r in token_endpoint.requests} == {CLIENT_ID}


# -- the local host's queue-trigger pollers ------------------------------------------------------
LOCAL_APP = """
import azure.functions as func

app = func.FunctionApp()


@app.queue_trigger(arg_name="msg", queue_name="orders", connection="AzureWebJobsStorage")
def take_order(msg: func.QueueMessage) -> None:
    pass


@app.queue_trigger(arg_name="msg", queue_name="invoices", connection="BillingStorage")
def file_invoice(msg: func.QueueMessage) -> None:
    pass
"""


async def test_local_host_polls_queue_triggers_through_identity_connections(
    app_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (app_dir / "function_app.py").write_text(LOCAL_APP)
    monkeypatch.setenv("AzureWebJobsStorage__queueServiceUri", "https://contosodurable.queue.core.windows.net")
    monkeypatch.setenv("AzureWebJobsStorage__blobServiceUri", "https://contosodurable.blob.core.windows.net")
    monkeypatch.setenv("AzureWebJobsStorage__tableServiceUri", "https://contosodurable.table.core.windows.net")
    monkeypatch.setenv("AzureWebJobsStorage__credential", "managedidentity")
    monkeypatch.setenv("AzureWebJobsStorage__clientId", CLIENT_ID)
    monkeypatch.setenv("BillingStorage__accountName", "contosobilling")  # a trigger's own connection
    # The host sets process-wide state as the worker does (settings, sys.path, the app module): undo it.
    saved_environment = dict(os.environ)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setitem(sys.modules, "function_app", sys.modules.get("function_app"))
    host = LocalHost(app_dir, port=free_ports(1)[0])
    host.prepare()
    try:
        assert "AzureWebJobsStorage" not in os.environ  # no emulator fallback was put in its place
        orders, invoices = sorted(host.queue_runners, key=lambda runner: runner.queue.queue_name, reverse=True)
        assert orders.queue.url == "https://contosodurable.queue.core.windows.net/orders"
        assert orders.poison.url == "https://contosodurable.queue.core.windows.net/orders-poison"
        assert isinstance(orders.queue.credential, ManagedIdentityCredential)
        assert orders.poison.credential is orders.queue.credential  # one credential per account
        assert invoices.queue.url == "https://contosobilling.queue.core.windows.net/invoices"
        # No __credential: DefaultAzureCredential (locally, the developer's sign-in), as the Functions host.
        assert isinstance(invoices.queue.credential, DefaultAzureCredential)
    finally:
        await host._close_clients()
        host.stop_emulator()
        os.environ.clear()
        os.environ.update(saved_environment)


DURABLE_APP = """
import azure.functions as func

import durable as df

app = df.DFApp(http_auth_level=func.AuthLevel.ANONYMOUS)


@app.orchestration_trigger(context_name="context")
def greet_all(context):
    greetings = []
    for name in context.get_input():
        greetings.append((yield context.call_activity("greet", name)))
    return greetings


@app.activity_trigger(input_name="name")
def greet(name: str) -> str:
    return f"Hello {name}"
"""


async def test_durable_start_runs_orchestrations_through_the_identity_connection(
    app_dir: Path, secure_azurite: SecureAzurite, token_endpoint: TokenEndpoint
) -> None:
    (app_dir / "function_app.py").write_text(DURABLE_APP)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AzureWebJobsStorage")}
    env.update(identity_settings(secure_azurite, token_endpoint))
    env.update(SSL_CERT_FILE=str(secure_azurite.certificate), PYTHONUNBUFFERED="1")
    (port,) = free_ports(1)
    host = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "durable", "start", "--app-dir", str(app_dir), "--port", str(port),
        cwd=REPO_ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    hub = HostSettings.load(app_dir).hub_name
    # The app's queue triggers read base64 messages (host.json's default): send them so.
    connection = secure_azurite.endpoints(FixedToken(storage_token()))
    try:
        async with AzureStorageBackend(connection, task_hub=hub, base64_messages=True) as backend:
            await backend.create_task_hub()  # as the host does; whoever comes first
            client = DurableOrchestrationClient(backend, task_hub_name=hub)
            instance_id = await client.start_new("greet_all", client_input=["Tokyo", "Lima"])
            with contextlib.suppress(TimeoutError):  # told below, with what the host said
                await client.wait_for_completion(instance_id, timeout=30)
            status = await client.get_status(instance_id)
    finally:
        if host.returncode is None:
            host.send_signal(signal.SIGINT)
        output, _ = await asyncio.wait_for(host.communicate(), timeout=30)
    # Only once the host has stopped: its pollers would meet missing queues (and say so) otherwise.
    async with AzureStorageBackend(connection, task_hub=hub) as backend:
        await backend.delete_task_hub()
    said = output.decode(errors="replace")
    assert status is not None and status.runtime_status == df.OrchestrationRuntimeStatus.Completed, said
    assert status.output == ["Hello Tokyo", "Hello Lima"]
    assert host.returncode == 0, said
    assert "Traceback" not in said and "Unclosed" not in said, said  # credentials and clients closed
    # The host's pollers and its runtime took their tokens from the identity the settings name.
    assert token_endpoint.requests
    assert {r["client_id"] for r in token_endpoint.requests} == {CLIENT_ID}
