"""OpenTelemetry tracing (durable/runtime/_tracing.py): spans collected in-process with the SDK's
in-memory exporter, on the in-memory backend and once through Azurite; the replay-safe logger."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import os
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timezone

import pytest
from aiohttp import web
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import durable as df
from durable import EventType
from durable.core._history import HistoryEvent
from durable.core._messages import MessageTarget, WorkMessage
from durable.runtime import _tracing as tracing

S = df.OrchestrationRuntimeStatus


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Spans of this test only, through a provider of its own (the global one stays untouched)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_tracer_provider(provider)
    try:
        yield exporter
    finally:
        tracing.use_tracer_provider(None)
        provider.shutdown()


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    """The finished spans called ``name``, in the order they started."""
    found = [s for s in exporter.get_finished_spans() if s.name == name]
    return sorted(found, key=lambda s: s.start_time or 0)


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


def _register_parent_child_and_counter(app: df.DFApp) -> None:
    @app.orchestration_trigger(context_name="context")
    def parent(context):
        greeting = yield context.call_activity("hello", "parent")  # scheduled by step 1
        child = yield context.call_sub_orchestrator("child", "x")  # step 2
        total = yield context.call_entity(df.EntityId("counter", "k"), "add", 5)  # step 3
        return [greeting, child, total]  # step 4

    @app.orchestration_trigger(context_name="context")
    def child(context):
        return (yield context.call_activity("hello", context.get_input()))

    @app.activity_trigger(input_name="name")
    def hello(name):
        return f"hello {name}"

    @app.entity_trigger(context_name="context")
    def counter(context):
        total = context.get_state(lambda: 0) + context.get_input()
        context.set_state(total)
        context.set_result(total)


async def _steps_in_history(runtime: df.DurableRuntime, instance_id: str) -> int:
    history = await runtime.backend.load_history(instance_id)
    return sum(e.event_type is EventType.ORCHESTRATOR_STARTED for e in history.events)


async def test_client_start_steps_activities_sub_orchestration_and_entity_form_one_linked_trace(
    app, make_runtime, spans
):
    _register_parent_child_and_counter(app)
    runtime = make_runtime(app)
    client = runtime.client()
    instance_id = await client.start_new("parent", "p1")
    await runtime.worker.run_until_idle()
    status = await client.get_status(instance_id)
    assert status.runtime_status is S.Completed
    assert status.output == ["hello parent", "hello x", 5]

    [start] = named(spans, "create_orchestration:parent")
    assert start.kind is SpanKind.PRODUCER
    assert start.attributes is not None
    assert start.attributes["durabletask.type"] == "orchestration"
    assert start.attributes["durabletask.task.name"] == "parent"
    assert start.attributes["durabletask.task.instance_id"] == "p1"
    assert start.attributes["durabletask.task.execution_id"]

    # One span per step executed, each a child of the client's start: none for replayed events.
    steps = named(spans, "orchestration:parent")
    assert len(steps) == await _steps_in_history(runtime, instance_id) == 4
    assert {parent_of(s) for s in steps} == {span_id(start)}
    assert all(s.kind is SpanKind.SERVER for s in steps)
    assert [s.attributes["durabletask.task.status"] for s in steps if s.attributes] == [
        "Running",
        "Running",
        "Running",
        "Completed",
    ]
    assert steps[0].attributes is not None
    assert steps[0].attributes["durabletask.task.execution_id"] == start.attributes["durabletask.task.execution_id"]

    # What a step schedules is its child: the activity (step 1), the sub-orchestration (step 2),
    # the entity operation (step 3).
    activities = named(spans, "activity:hello")
    assert len(activities) == 2
    parent_activity = next(
        a for a in activities if a.attributes and a.attributes["durabletask.task.instance_id"] == "p1"
    )
    assert parent_of(parent_activity) == span_id(steps[0])
    assert parent_activity.attributes is not None
    assert parent_activity.attributes["durabletask.type"] == "activity"
    assert parent_activity.attributes["durabletask.task.task_id"] == 0

    child_steps = named(spans, "orchestration:child")
    assert len(child_steps) == 2  # its start and the activity's result
    assert {parent_of(s) for s in child_steps} == {span_id(steps[1])}
    child_activity = next(a for a in activities if a is not parent_activity)
    assert parent_of(child_activity) == span_id(child_steps[0])

    [operation] = named(spans, "entity:counter:add")
    assert parent_of(operation) == span_id(steps[2])
    assert operation.kind is SpanKind.SERVER
    assert operation.attributes is not None
    assert operation.attributes["durabletask.task.operation"] == "call_entity"
    assert operation.attributes["durabletask.task.instance_id"] == "@counter@k"

    everything = spans.get_finished_spans()
    assert {s.context.trace_id for s in everything if s.context} == {start.context.trace_id if start.context else 0}


async def test_activities_run_inline_are_children_of_the_step_that_scheduled_them(app, make_runtime, spans):
    @app.orchestration_trigger(context_name="context")
    def sequence(context):
        first = yield context.call_activity("double", 1)
        return (yield context.call_activity("double", first))

    @app.activity_trigger(input_name="value")
    def double(value):
        return value * 2

    runtime = make_runtime(app, inline=True)
    instance_id = await runtime.client().start_new("sequence", "s1")
    await runtime.worker.run_until_idle()
    assert (await runtime.client().get_status(instance_id)).output == 4

    steps = named(spans, "orchestration:sequence")
    activities = named(spans, "activity:double")
    assert len(steps) == await _steps_in_history(runtime, instance_id) == 3
    assert [parent_of(a) for a in activities] == [span_id(steps[0]), span_id(steps[1])]


async def test_client_signal_and_raised_event_are_traced_into_the_work_they_send(app, make_runtime, spans):
    _register_parent_child_and_counter(app)

    @app.orchestration_trigger(context_name="context")
    def approval(context):
        return (yield context.wait_for_external_event("approved"))

    runtime = make_runtime(app)
    client = runtime.client()
    await client.signal_entity(df.EntityId("counter", "s"), "add", 2)
    instance_id = await client.start_new("approval", "a1")
    await runtime.worker.run_until_idle()
    await client.raise_event(instance_id, "approved", True)
    await runtime.worker.run_until_idle()
    assert (await client.get_status(instance_id)).output is True

    [signal] = [s for s in named(spans, "entity:counter:add") if s.kind is SpanKind.PRODUCER]
    assert signal.attributes is not None
    assert signal.attributes["durabletask.task.operation"] == "signal_entity"
    assert signal.attributes["durabletask.event.target_instance_id"] == "@counter@s"
    [operation] = [s for s in named(spans, "entity:counter:add") if s.kind is SpanKind.CONSUMER]
    assert parent_of(operation) == span_id(signal)
    assert operation.attributes is not None
    assert operation.attributes["durabletask.task.operation"] == "signal_entity"

    [raised] = named(spans, "orchestration_event:approved")
    assert raised.kind is SpanKind.PRODUCER
    assert raised.attributes is not None
    assert raised.attributes["durabletask.event.target_instance_id"] == instance_id
    [start] = named(spans, "create_orchestration:approval")
    first, second = named(spans, "orchestration:approval")
    # The step that applies the event stays in the instance's trace and links to the sender.
    assert parent_of(second) == span_id(start)
    assert [link.context.span_id for link in second.links] == [span_id(raised)]
    assert list(first.links) == []


async def test_failures_mark_their_spans_as_errors(app, make_runtime, spans):
    @app.orchestration_trigger(context_name="context")
    def failing(context):
        yield context.call_activity("broken", None)

    @app.activity_trigger(input_name="value")
    def broken(value):
        raise RuntimeError("disk on fire")

    runtime = make_runtime(app)
    instance_id = await runtime.client().start_new("failing", "f1")
    await runtime.worker.run_until_idle()
    assert (await runtime.client().get_status(instance_id)).runtime_status is S.Failed

    [activity] = named(spans, "activity:broken")
    assert activity.status.status_code is StatusCode.ERROR
    assert [e.name for e in activity.events] == ["exception"]
    last = named(spans, "orchestration:failing")[-1]
    assert last.attributes is not None and last.attributes["durabletask.task.status"] == "Failed"
    assert last.status.status_code is StatusCode.ERROR
    assert "disk on fire" in (last.status.description or "")


@pytest.fixture
def untraced() -> Iterator[None]:
    """The API's no-op provider, as a process gets when no exporter is configured (whatever the
    environment of this test run configured)."""
    tracing.use_tracer_provider(trace.NoOpTracerProvider())
    try:
        yield
    finally:
        tracing.use_tracer_provider(None)


async def test_without_a_configured_provider_nothing_is_traced_or_carried(app, make_runtime, untraced):
    _register_parent_child_and_counter(app)
    runtime = make_runtime(app)
    instance_id = await runtime.client().start_new("parent", "quiet")
    await runtime.worker.run_until_idle()
    history = await runtime.backend.load_history(instance_id)
    started = next(e for e in history.events if e.event_type is EventType.EXECUTION_STARTED)
    assert started.parent_trace_context is None
    registry = runtime.worker.registry
    assert tracing.entity_operations(registry.entity, []) == registry.entity  # not even wrapped


def test_messages_carry_the_trace_context_and_older_messages_still_parse():
    event = HistoryEvent(EventType.EVENT_RAISED, datetime(2026, 1, 1, tzinfo=timezone.utc), name="e")
    context = json.dumps({"TraceParent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"})
    message = WorkMessage(MessageTarget.ORCHESTRATION, "i", event, trace_context=context)
    assert WorkMessage.from_json(message.to_json()) == message
    body = json.loads(message.to_json())
    del body["TraceContext"]  # written before tracing existed
    assert WorkMessage.from_json(json.dumps(body)).trace_context is None
    body["TraceContext"] = {"not": "text"}  # a malformed context loses the context, not the message
    assert WorkMessage.from_json(json.dumps(body)).trace_context is None
    assert tracing.parent_context(context) is not None
    for malformed in ("{", "[]", json.dumps({"TraceParent": "00-zz"}), json.dumps({"TraceState": "a=b"})):
        assert tracing.parent_context(malformed) is None


@pytest.mark.parametrize("sessions", [False, True], ids=["replaying", "extended-sessions"])
async def test_replay_safe_logger_drops_what_replays_log(app, make_runtime, caplog, sessions):
    user_log = logging.getLogger("tests.tracing.user")

    @app.orchestration_trigger(context_name="context")
    def chatty(context):
        safe = context.create_replay_safe_logger(user_log)
        for step in range(3):
            safe.info("safe %d", step)
            user_log.info("plain %d", step)
            yield context.call_activity("noop", step)
        safe.warning("done")

    @app.activity_trigger(input_name="value")
    def noop(value):
        return value

    runtime = make_runtime(app)
    runtime.worker.options.extended_sessions = sessions
    with caplog.at_level(logging.INFO, logger="tests.tracing.user"):
        await runtime.client().start_new("chatty", "c1")
        await runtime.worker.run_until_idle()
    messages = [r.getMessage() for r in caplog.records if r.name == "tests.tracing.user"]
    assert [m for m in messages if not m.startswith("plain")] == ["safe 0", "safe 1", "safe 2", "done"]
    # the plain logger repeats itself on every replay; a live execution is not replayed
    assert messages.count("plain 0") == (1 if sessions else 4)


@pytest.mark.azurite
async def test_the_trace_context_survives_azure_storage(app, azure_backend, spans):
    @app.orchestration_trigger(context_name="context")
    def greet(context):
        return (yield context.call_activity("hello", "azure"))

    @app.activity_trigger(input_name="name")
    def hello(name):
        return f"hello {name}"

    options = df.WorkerOptions(inline_activities=False, idle_poll_max=0.1)
    runtime = df.DurableRuntime(app, azure_backend, task_hub_name=azure_backend.task_hub, options=options)
    client = runtime.client()
    instance_id = await client.start_new("greet", "g1")
    await runtime.worker.run_until_idle()
    assert (await client.get_status(instance_id)).output == "hello azure"

    [start] = named(spans, "create_orchestration:greet")
    steps = named(spans, "orchestration:greet")
    [activity] = named(spans, "activity:hello")
    assert len(steps) == 2
    assert {parent_of(s) for s in steps} == {span_id(start)}  # through the history table
    assert parent_of(activity) == span_id(steps[0])  # through the work-item queue
    history = await azure_backend.load_history(instance_id)
    started = next(e for e in history.events if e.event_type is EventType.EXECUTION_STARTED)
    assert tracing.parent_context(started.parent_trace_context) is not None
    assert f"{span_id(start):016x}" in (started.parent_trace_context or "")


@pytest.fixture
async def collector() -> AsyncIterator[tuple[str, list[bytes]]]:
    """A local HTTP endpoint standing in for an OTLP collector and Application Insights' ingestion:
    its address and the (decompressed) bodies posted to it."""
    received: list[bytes] = []

    async def collect(request: web.Request) -> web.Response:
        body = await request.read()
        received.append(gzip.decompress(body) if body[:2] == b"\x1f\x8b" else body)
        return web.json_response({"itemsReceived": 1, "itemsAccepted": 1, "errors": []})

    server = web.Application()
    server.router.add_post("/{tail:.*}", collect)
    runner = web.AppRunner(server)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", received
    finally:
        await runner.cleanup()


async def _configure_and_trace_in_a_new_process(settings: dict[str, str]) -> str:
    """Run a fresh process (export is configured once per process) with ``settings`` as its only
    tracing settings: it configures export, starts an orchestration span, flushes; returns what
    ``configure_exporters`` said."""
    script = (
        "from opentelemetry import trace\n"
        "from durable.runtime import _tracing as t\n"
        "print(t.configure_exporters())\n"
        "with t.starting_orchestration('exported', 'i1', None, None): pass\n"
        "if hasattr(trace.get_tracer_provider(), 'shutdown'): trace.get_tracer_provider().shutdown()\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "APPLICATIONINSIGHTS_"))}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, env={**env, **settings}, stdout=asyncio.subprocess.PIPE
    )
    stdout, _ = await process.communicate()
    assert process.returncode == 0
    return stdout.decode().strip()


async def test_otlp_export_is_configured_from_the_environment(collector):
    endpoint, received = collector
    assert await _configure_and_trace_in_a_new_process({}) == "[]"  # nothing set: exported nowhere
    assert received == []
    said = await _configure_and_trace_in_a_new_process({"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint})
    assert said == f"['OTLP ({endpoint})']"
    assert len(received) == 1 and b"create_orchestration:exported" in received[0]  # protobuf keeps names as text


async def test_application_insights_export_is_configured_from_its_connection_string(collector):
    endpoint, received = collector
    connection = f"InstrumentationKey=00000000-0000-0000-0000-000000000000;IngestionEndpoint={endpoint}/"
    settings = {
        "APPLICATIONINSIGHTS_CONNECTION_STRING": connection,
        "APPLICATIONINSIGHTS_STATSBEAT_DISABLED_ALL": "true",
        "OTEL_TRACES_SAMPLER": "always_on",  # the distro's default rate limit may drop a lone span
    }
    assert await _configure_and_trace_in_a_new_process(settings) == "['Application Insights']"
    assert any(b'"name": "create_orchestration:exported"' in body for body in received)
