"""The dashboard end to end: real instances on Azurite, the dashboard's own server, and the
distribution's Chromium driven by Playwright (never a downloaded browser); screenshots are taken
along the way and checked. Also its HTTP refusals, its mounting in `durable start`, the
standalone `durable dashboard` command, and the timeline's geometry."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Error as PlaywrightError
from playwright.async_api import Page, async_playwright

import durable as df
from durable import EntityId, EventType, FailureDetails, HistoryEvent, OrchestrationRuntimeStatus
from durable.host._azurite import accepts_connections, free_ports
from durable.host._dashboard import serve_dashboard
from durable.host._dashboard._timeline import build_timeline
from durable.host._host import AuthKeys
from storage.azure import AzureStorageBackend
from tests.fixtures_azurite import unique_task_hub
from tests.fixtures_host import REPO_ROOT, ServedApp

pytestmark = pytest.mark.azurite

CHROMIUM = "/usr/bin/chromium"  # Debian's package: `apt-get install -y chromium`
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1280, "height": 900}
MASTER_KEY = "dashboard-master-key"
FAST = df.WorkerOptions(idle_poll_min=0.02, idle_poll_max=0.1, visibility_timeout=10.0, retry_delay=0.2)
# An instance id that would run script if the dashboard did not escape it.
XSS_ID = "wait-<img src=x onerror=\"alert('xss')\">"
_S = OrchestrationRuntimeStatus


def build_app() -> df.DFApp:
    app = df.DFApp()

    @app.orchestration_trigger(context_name="context")
    def approval(context: df.DurableOrchestrationContext):  # type: ignore[no-untyped-def]
        greeting = yield context.call_activity("greet", context.get_input())
        yield context.create_timer(context.current_utc_datetime + timedelta(milliseconds=300))
        child = yield context.call_sub_orchestrator("greeting", "child")
        context.set_custom_status({"stage": "waiting for approval"})
        decision = yield context.wait_for_external_event("approve")
        return {"greeting": greeting, "child": child, "decision": decision}

    @app.orchestration_trigger(context_name="context")
    def greeting(context: df.DurableOrchestrationContext):  # type: ignore[no-untyped-def]
        return (yield context.call_activity("greet", context.get_input()))

    @app.orchestration_trigger(context_name="context")
    def broken(context: df.DurableOrchestrationContext):  # type: ignore[no-untyped-def]
        yield context.call_activity("explode", None)

    @app.activity_trigger(input_name="name")
    def greet(name: str) -> str:
        return f"Hello {name}"

    @app.activity_trigger(input_name="nothing")
    def explode(nothing: Any) -> None:
        raise ValueError("boom: the activity failed")

    @app.entity_trigger(context_name="context")
    def counter(context: df.DurableEntityContext) -> None:
        if context.operation_name == "add":
            context.set_state(context.get_state(lambda: 0) + context.get_input())

    return app


@contextlib.asynccontextmanager
async def dashboard_server(client: df.DurableOrchestrationClient, master_key: str | None) -> AsyncIterator[str]:
    """The standalone dashboard server (as `durable dashboard` runs it) on a free port; its base URL."""
    keys = AuthKeys(master_key=master_key)
    (port,) = free_ports(1)
    stop = asyncio.Event()
    task = asyncio.create_task(serve_dashboard(client, port, lambda key: keys.allows("admin", key), stop))
    try:
        await _until(lambda: asyncio.to_thread(accepts_connections, port), timeout=10)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop.set()
        await task


async def _until(condition: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.1)


async def _status_is(client: df.DurableOrchestrationClient, instance_id: str, expected: _S) -> bool:
    found = await client.get_status(instance_id, show_input=False)
    return found is not None and found.runtime_status is expected


async def _waiting(client: df.DurableOrchestrationClient, instance_id: str) -> bool:
    found = await client.get_status(instance_id, show_input=False)
    return found is not None and found.custom_status == {"stage": "waiting for approval"}


def check_screenshot(path: Path, page_text: str, *expected: str) -> None:
    """A real PNG of the viewport's size with some content, taken of a page that showed ``expected``."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk comes first
    assert (width, height) == (VIEWPORT["width"], VIEWPORT["height"])
    assert len(data) > 10_000, f"{path.name} is {len(data)} bytes: a blank page?"
    for text in expected:
        assert text in page_text, f"{path.name}: the page did not show {text!r}"


async def shoot(page: Page, tmp_path: Path, name: str, *expected: str) -> str:
    path = tmp_path / f"{name}.png"
    for attempt in range(3):
        try:
            await page.screenshot(path=str(path))
            break
        except PlaywrightError as exc:
            # Headless Chromium now and then has no frame to give ("Unable to capture screenshot"):
            # a browser hiccup, not the page's; the next frame comes a moment later.
            if "Unable to capture screenshot" not in str(exc) or attempt == 2:
                raise
            await asyncio.sleep(0.5)
    text = await page.inner_text("body")
    check_screenshot(path, text, *expected)
    return text


async def _reload_until(page: Page, selector: str, expected: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while (await page.inner_text(selector)).strip() != expected:
        assert time.monotonic() < deadline, f"{selector} never became {expected!r}"
        await asyncio.sleep(0.3)
        await page.reload()


# -- the browser test ----------------------------------------------------------------------------------
async def test_dashboard_in_chromium(azure_backend: AzureStorageBackend, tmp_path: Path) -> None:
    runtime = df.DurableRuntime(build_app(), azure_backend, task_hub_name=azure_backend.task_hub, options=FAST)
    await runtime.start()
    client = runtime.client()
    try:
        await client.start_new("greeting", "done-1", "Grace")
        await client.start_new("broken", "failed-1")
        for instance_id in ("wait-approve", "wait-terminate", XSS_ID):
            await client.start_new("approval", instance_id, "Ada")
        await client.signal_entity(EntityId("counter", "c1"), "add", 5)
        await _until(lambda: _status_is(client, "done-1", _S.Completed))
        await _until(lambda: _status_is(client, "failed-1", _S.Failed))
        for instance_id in ("wait-approve", "wait-terminate", XSS_ID):
            await _until(lambda i=instance_id: _waiting(client, i))
        await _until(lambda: _entity_exists(client))
        async with dashboard_server(client, MASTER_KEY) as base_url, async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page(viewport=VIEWPORT)
                page.set_default_timeout(5000)
                dialogs: list[str] = []

                async def on_dialog(dialog: Any) -> None:  # our confirmations; an XSS alert would land here too
                    dialogs.append(dialog.message)
                    await dialog.accept()

                page.on("dialog", on_dialog)
                await _browse(page, base_url, client, tmp_path)
                assert not any("xss" in message for message in dialogs)
                assert "Terminate this instance?" in dialogs
            finally:
                await browser.close()
    finally:
        await runtime.stop()


async def _entity_exists(client: df.DurableOrchestrationClient) -> bool:
    return (await client.read_entity_state(EntityId("counter", "c1"))).entity_exists


async def _browse(page: Page, base_url: str, client: df.DurableOrchestrationClient, tmp_path: Path) -> None:
    # The key: the dashboard is an admin surface.
    response = await page.goto(f"{base_url}/dashboard/")
    assert response is not None and response.status == 401
    await page.fill("input[name=key]", "not the key")
    await page.click("button:has-text('Log in')")
    assert "That key is not valid." in await page.inner_text("body")
    await page.fill("input[name=key]", MASTER_KEY)
    await page.click("button:has-text('Log in')")

    # The list: every instance, the entity not among them, the hostile id shown as text.
    text = await shoot(page, tmp_path, "list", "done-1", "failed-1", "wait-approve", "wait-terminate", XSS_ID)
    assert "@counter@c1" not in text
    assert await page.locator("#instances img").count() == 0

    # Filters: by status, then by instance id prefix and name; paging.
    await page.check("input[name=status][value=Failed]")
    await page.click("button:has-text('Apply')")
    assert await _listed(page) == ["failed-1"]
    await page.uncheck("input[name=status][value=Failed]")
    await page.fill("input[name=prefix]", "wait-")
    await page.fill("input[name=name]", "APPROV")
    await page.click("button:has-text('Apply')")
    assert sorted(await _listed(page)) == sorted(["wait-approve", "wait-terminate", XSS_ID])
    await shoot(page, tmp_path, "filtered", "wait-approve", "Running")
    await page.goto(f"{base_url}/dashboard/?top=2")
    first_page = await _listed(page)
    assert len(first_page) == 2
    await page.click("#next-page")
    assert not set(first_page) & set(await _listed(page))

    # An instance page: details and the timeline; then raise the event it waits for.
    await page.goto(f"{base_url}/dashboard/?prefix=wait-approve")
    await page.click("a:has-text('wait-approve')")
    assert (await page.inner_text("#runtime-status")).strip() == "Running"
    assert '"Ada"' in await page.inner_text("#input")
    assert "waiting for approval" in await page.inner_text("#custom-status")
    for kind in ("execution", "activity", "timer", "suborchestration"):
        assert await page.locator(f"#timeline tr.kind-{kind} rect").count() >= 1, kind
    assert await page.locator("#timeline a:has-text('greeting')").count() == 1  # the child, linked
    await shoot(page, tmp_path, "instance", "Timeline", "greet", "timer until", "Raise event")
    await page.fill("#raise-event input[name=event]", "approve")
    await page.fill("#raise-event textarea[name=data]", '{"approved": true, "by": "<b>Lin</b>"}')
    await page.click("#raise-event button")
    assert "Event sent." in await page.inner_text(".notice")
    await _reload_until(page, "#runtime-status", "Completed")
    assert '"by": "<b>Lin</b>"' in await page.inner_text("#output")
    assert await page.locator("#timeline tr.kind-event circle").count() == 1
    await shoot(page, tmp_path, "completed", "Completed", "Hello Ada", "event approve")

    # Terminate a running instance.
    await page.goto(f"{base_url}/dashboard/instance?id=wait-terminate")
    await page.fill("#terminate input[name=reason]", "not needed")
    await page.click("#terminate button")
    assert "Termination requested." in await page.inner_text(".notice")
    await _reload_until(page, "#runtime-status", "Terminated")
    assert (await client.get_status("wait-terminate")).runtime_status is _S.Terminated  # type: ignore[union-attr]

    # Purge refuses a running instance, as the client does (this one's id is the hostile one).
    await page.goto(f"{base_url}/dashboard/")
    await page.click(f"a:text-is({_css_string(XSS_ID)})")
    async with page.expect_navigation() as navigation:
        await page.click("#purge button")
    assert (await navigation.value).status == 412
    await shoot(page, tmp_path, "purge-refused", "only instances in a terminal state can be purged", XSS_ID)
    assert await client.get_status(XSS_ID) is not None
    assert await page.locator("main img").count() == 0

    # Suspend and resume it.
    await page.click("#suspend button")
    assert "Suspension requested." in await page.inner_text(".notice")
    await _reload_until(page, "#runtime-status", "Suspended")
    await page.click("#resume button")
    await _reload_until(page, "#runtime-status", "Running")

    # A failed instance shows why, and can be rewound (its activity fails again here).
    await page.goto(f"{base_url}/dashboard/instance?id=failed-1")
    failure = await page.inner_text("#failure")
    assert "ValueError" in failure and "boom: the activity failed" in failure
    assert await page.locator("#timeline tr.kind-activity.outcome-failed").count() == 1
    await page.click("#rewind button")
    assert "Rewind requested" in await page.inner_text(".notice")

    # Restart a completed one under a new id.
    await page.goto(f"{base_url}/dashboard/instance?id=done-1")
    await page.click("#restart button")
    assert "Restarted." in await page.inner_text(".notice")
    restarted = (await page.inner_text("#instance-id")).strip()
    assert restarted != "done-1"
    await _reload_until(page, "#runtime-status", "Completed")
    assert '"Hello Grace"' in await page.inner_text("#output")

    # The entity browser and its state.
    await page.click("nav a:has-text('Entities')")
    await shoot(page, tmp_path, "entities", "counter", "c1", "5")
    await page.click("a:has-text('c1')")
    assert (await page.inner_text("#state pre")).strip() == "5"
    await page.fill("#signal input[name=operation]", "add")
    await page.fill("#signal textarea[name=input]", "2")
    await page.click("#signal button")
    assert "Operation signalled." in await page.inner_text(".notice")
    await _reload_until(page, "#state pre", "7")


async def _listed(page: Page) -> list[str]:
    return [text.strip() for text in await page.locator("#instances td.id").all_inner_texts()]


def _css_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# -- refusals over HTTP --------------------------------------------------------------------------------
async def test_bad_requests_get_clear_errors(azure_backend: AzureStorageBackend, azurite: str) -> None:
    client = df.DurableOrchestrationClient(azure_backend, task_hub_name=azure_backend.task_hub)
    await client.start_new("never_runs", "pending-1")  # no worker: it stays Pending, an unfinished instance
    key = {"x-functions-key": MASTER_KEY}
    async with dashboard_server(client, MASTER_KEY) as base_url, aiohttp.ClientSession(base_url) as http:

        async def get(path: str, **headers: str) -> tuple[int, str]:
            async with http.get(path, headers={**key, **headers}, allow_redirects=False) as response:
                return response.status, await response.text()

        # Only loopback names, only with the key; ?code= is remembered in a cookie and dropped from the URL.
        assert (await get("/dashboard/", Host="dashboard.example.com"))[0] == 403
        async with http.get("/dashboard/") as response:
            assert response.status == 401 and "Admin key required" in await response.text()
        async with http.get("/dashboard/?code=%D0%BA%D0%BB%D1%8E%D1%87") as response:  # not ASCII: refused, no 500
            assert response.status == 401
        async with http.get(f"/dashboard/entities?code={MASTER_KEY}&name=counter", allow_redirects=False) as response:
            assert response.status == 303 and response.headers["Location"] == "/dashboard/entities?name=counter"
            cookie = response.cookies["durable_dashboard_key"]
            assert cookie.value == MASTER_KEY and cookie["httponly"] and cookie["samesite"] == "Strict"

        for path, status, message in [
            ("/dashboard/?status=Bogus", 400, "unknown status"),
            ("/dashboard/?from=yesterday", 400, "must be a date and time"),
            ("/dashboard/?from=2026-02-01T00:00&to=2026-01-01T00:00", 400, "is after"),
            ("/dashboard/?top=0", 400, "page size"),
            ("/dashboard/?prefix=%07bell", 400, "printable"),
            ("/dashboard/?token=not-a-token", 400, "invalid query"),
            ("/dashboard/instance?id=", 400, "invalid instance id"),
            ("/dashboard/instance?id=nobody", 404, "no instance with id"),
            ("/dashboard/entity?id=pending-1", 400, "invalid entity id"),
            ("/dashboard/entities?name=a@b", 400, "entity name"),
        ]:
            got, text = await get(path)
            assert (got, message in text) == (status, True), (path, got, text[-300:])
        for path in ("/dashboard/?from=0001-01-01T00:00:00&to=9999-12-31T23:59:59", "/dashboard/?prefix=%27%20or%201"):
            assert (await get(path))[0] in (200, 400), path  # escaped, or refused: never a 500

        # Forms need the page's CSRF token and a loopback origin; then the client's refusals show.
        status, page = await get("/dashboard/instance?id=pending-1")
        assert status == 200
        csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]

        async def post(action: str, origin: str | None = None, **form: str) -> tuple[int, str]:
            headers = {**key, **({"Origin": origin} if origin else {})}
            async with http.post(f"/dashboard/{action}", data=form, headers=headers, allow_redirects=False) as response:
                return response.status, await response.text()

        assert (await post("instance/terminate", id="pending-1"))[0] == 403
        assert (await post("instance/terminate", "https://evil.example", id="pending-1", csrf=csrf))[0] == 403
        for action, form, status, message in [
            ("instance/raise", {"event": "go", "data": "{not json"}, 400, "is not valid JSON"),
            ("instance/raise", {"event": "go", "data": "NaN"}, 400, "is not valid JSON"),
            ("instance/raise", {"event": " "}, 400, "give the event a name"),
            ("instance/purge", {}, 412, "only instances in a terminal state can be purged"),
            ("instance/rewind", {}, 400, "only Failed instances can be rewound"),
            ("instance/explode", {}, 404, "no such action"),
        ]:
            got, text = await post(action, id="pending-1", csrf=csrf, **form)
            assert (got, message in text) == (status, True), (action, form, got, text[-300:])
        got, text = await post("instance/terminate", id="nobody", csrf=csrf)
        assert got == 404 and "no instance with id" in text
        got, text = await post("entity/signal", id="@counter@c1", csrf=csrf, operation="add", input="[1,")
        assert got == 400 and "is not valid JSON" in text
        assert (await post("instance/terminate", id="pending-1", csrf=csrf))[0] == 303

    # A task hub that does not exist: said so, not a 500.
    missing = df.DurableOrchestrationClient(AzureStorageBackend(azurite, task_hub=unique_task_hub("none")))
    async with missing, dashboard_server(missing, None) as base_url, aiohttp.ClientSession(base_url) as http:
        status, text = await _read(http.get("/dashboard/"))
        assert status == 503 and "task hub was not found" in text


# -- where it is served ----------------------------------------------------------------------------------
def test_durable_start_serves_the_dashboard_behind_the_master_key(serve_app: Callable[..., ServedApp]) -> None:
    app = serve_app(REPO_ROOT / "samples" / "function_chaining", "--master-key", "start-key")
    assert f"Dashboard: {app.base_url}/dashboard/" in app.output()
    assert _http_get(f"{app.base_url}/dashboard/")[0] == 401
    status, page = _http_get(f"{app.base_url}/dashboard", {"x-functions-key": "start-key"})  # to /dashboard/
    assert status == 200 and "<h1>Instances</h1>" in page
    status, page = _http_get(f"{app.base_url}/dashboard/entities", {"x-functions-key": "start-key"})
    assert status == 200 and "<h1>Entities</h1>" in page
    assert _http_get(f"{app.base_url}/api/no-such-function")[0] == 404  # the app's own routes are still served
    assert app.stop() == 0


async def test_durable_dashboard_command_serves_a_task_hub(
    azure_backend: AzureStorageBackend, azurite: str, tmp_path: Path
) -> None:
    client = df.DurableOrchestrationClient(azure_backend, task_hub_name=azure_backend.task_hub)
    await client.start_new("someone_elses_app", "standalone-1")
    (port,) = free_ports(1)
    log_path = tmp_path / "dashboard.log"
    command = [sys.executable, "-m", "durable", "dashboard", "-d", str(tmp_path), "--port", str(port)]
    command += ["--connection-string", azurite, "--task-hub", azure_backend.task_hub]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 20
        while "Dashboard of task hub" not in log_path.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
            await asyncio.sleep(0.1)
        status, page = await asyncio.to_thread(_http_get, f"http://127.0.0.1:{port}/")  # redirected to the list
        assert status == 200 and "standalone-1" in page and "someone_elses_app" in page
    finally:
        process.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(process.wait, 20) == 0


async def _read(request: Any) -> tuple[int, str]:
    async with request as response:
        return response.status, await response.text()


def _http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


# -- the timeline's geometry -------------------------------------------------------------------------------
def test_timeline_places_actions_on_one_axis() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)

    def at(seconds: float) -> datetime:
        return t0 + timedelta(seconds=seconds)

    failure = FailureDetails("ValueError", "no")
    events = [
        HistoryEvent(EventType.ORCHESTRATOR_STARTED, at(0)),
        HistoryEvent(EventType.EXECUTION_STARTED, at(0), name="flow"),
        HistoryEvent(EventType.TASK_SCHEDULED, at(0), event_id=0, name="first"),
        HistoryEvent(EventType.TIMER_CREATED, at(0), event_id=1, fire_at=at(4)),
        HistoryEvent(EventType.TASK_COMPLETED, at(2), task_scheduled_id=0),
        HistoryEvent(EventType.TIMER_FIRED, at(0), timer_id=1, fire_at=at(4)),  # stamped with its creation
        HistoryEvent(EventType.SUB_ORCHESTRATION_CREATED, at(4), event_id=2, name="child", instance_id="c:2"),
        HistoryEvent(EventType.SUB_ORCHESTRATION_FAILED, at(6), task_scheduled_id=2, failure=failure),
        HistoryEvent(EventType.EVENT_RAISED, at(7), name="go"),
        HistoryEvent(EventType.TASK_SCHEDULED, at(8), event_id=3, name="last"),
    ]
    timeline = build_timeline(events, now=at(10))
    assert timeline is not None and (timeline.start, timeline.end) == (at(0), at(10))  # running: up to now
    rows = {row.label: row for row in timeline.rows}
    assert [row.kind for row in timeline.rows] == [
        "execution",
        "activity",
        "timer",
        "suborchestration",
        "event",
        "activity",
    ]
    assert (rows["flow"].outcome, rows["flow"].left, rows["flow"].width) == ("running", 0.0, 100.0)
    assert (rows["first"].outcome, rows["first"].width, rows["first"].duration) == ("completed", 20.0, "2.00 s")
    timer = rows["timer until 00:00:04.000"]
    assert (timer.outcome, timer.width) == ("completed", 40.0)
    child = rows["child"]
    assert (child.outcome, child.left, child.width, child.instance_id) == ("failed", 40.0, 20.0, "c:2")
    assert child.detail == "ValueError: no"
    assert (rows["event go"].outcome, rows["event go"].left, rows["event go"].width) == ("instant", 70.0, 0.0)
    assert (rows["last"].outcome, rows["last"].left, rows["last"].width) == ("running", 80.0, 20.0)
    assert [tick.left for tick in timeline.ticks] == [0.0, 25.0, 50.0, 75.0, 100.0]

    done = [*events, HistoryEvent(EventType.EXECUTION_TERMINATED, at(9))]
    finished = build_timeline(done, now=at(60))
    assert finished is not None and finished.end == at(9)  # finished: the axis ends with the history
    assert next(row for row in finished.rows if row.kind == "execution").outcome == "terminated"
    assert build_timeline([], now=t0) is None
