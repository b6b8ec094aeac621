"""OpenTelemetry tracing: a span for each client operation that sends work (start, raise event,
signal entity), each orchestration step, each activity run and each entity operation, linked
parent → child across queues by the W3C trace context the messages carry.

Names and attributes are Durable Functions' (DTFx's distributed tracing): ``create_orchestration:{name}``
(client, producer) → ``orchestration:{name}`` (every step of the execution, server) →
``activity:{name}`` (server) and ``orchestration:{child}`` (steps of a sub-orchestration) and
``entity:{name}:{operation}`` (server for a call, consumer for a signal); raised events are
``orchestration_event:{name}``. A step's span is the parent of what it schedules; the steps of an
execution are children of the span that started it, whose context the ExecutionStarted event keeps
(``ParentTraceContext``), so replaying a history emits nothing: one span per step executed.

Only the OpenTelemetry API is needed: until a host configures an exporter (``configure_exporters``)
every span is the API's no-op span. The core never sees a span, only the context as text.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ..core import _protocol as protocol
from ..core._entities import DurableEntityContext, EntityFunction, EntityRequest
from ..core._history import EventType, HistoryEvent
from ..core._messages import WorkMessage
from ..core._outbox import with_trace_context
from ..core._status import OrchestrationRuntimeStatus

if TYPE_CHECKING:  # the SDK is the optional [tracing] extra
    from opentelemetry.sdk.trace import SpanProcessor

log = logging.getLogger("durable.tracing")

TRACER_NAME = "durable"

# Attribute names: DTFx's tracing schema.
TYPE = "durabletask.type"
NAME = "durabletask.task.name"
VERSION = "durabletask.task.version"
INSTANCE_ID = "durabletask.task.instance_id"
EXECUTION_ID = "durabletask.task.execution_id"
STATUS = "durabletask.task.status"
TASK_ID = "durabletask.task.task_id"
OPERATION = "durabletask.task.operation"
TARGET_INSTANCE_ID = "durabletask.event.target_instance_id"

_PROPAGATOR = TraceContextTextMapPropagator()
_provider: trace.TracerProvider | None = None  # set by tests; otherwise the global provider


def use_tracer_provider(provider: trace.TracerProvider | None) -> None:
    """Trace through ``provider`` instead of the global one (None: the global one again)."""
    global _provider
    _provider = provider


def _tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME, tracer_provider=_provider)


def _recording() -> bool:
    """Whether spans go anywhere: the API's default provider makes only no-op spans."""
    provider = _provider or trace.get_tracer_provider()
    return not isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider))


# -- the context as text (what messages and ExecutionStarted carry) ----------------------------------
def context_text(span: Span) -> str | None:
    """``span``'s W3C trace context as the JSON text messages carry (DTFx's ``ParentTraceContext``
    property names); None for a span that is not sampled anywhere (the no-op span)."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    if "traceparent" not in carrier:
        return None
    return json.dumps({"TraceParent": carrier["traceparent"], "TraceState": carrier.get("tracestate")})


def parent_context(text: str | None) -> Context | None:
    """The context ``context_text`` wrote; None for none or anything malformed (tracing is best
    effort: a bad context from a queue never fails the work it came with)."""
    if not text:
        return None
    try:
        data = json.loads(text)
        carrier = {"traceparent": str(data["TraceParent"])}
        if data.get("TraceState"):
            carrier["tracestate"] = str(data["TraceState"])
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    context = _PROPAGATOR.extract(carrier)
    return context if trace.get_current_span(context).get_span_context().is_valid else None


def _span_name(kind: str, name: str | None, version: str | None = None) -> str:
    return f"{kind}:{name or ''}@({version})" if version else f"{kind}:{name or ''}"


def _attributes(**values: str | int | None) -> dict[str, str | int]:
    return {key: value for key, value in values.items() if value is not None}


# -- clients -------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _client_span(name: str, attributes: dict[str, str | int]) -> Iterator[str | None]:
    """A producer span, child of whatever the caller is in (an HTTP trigger's span, say); yields
    the context to put on the message sent."""
    with _tracer().start_as_current_span(name, kind=SpanKind.PRODUCER, attributes=attributes) as span:
        yield context_text(span)


def starting_orchestration(
    name: str, instance_id: str, execution_id: str | None, version: str | None
) -> contextlib.AbstractContextManager[str | None]:
    attributes = _attributes(
        **{TYPE: "orchestration", NAME: name, INSTANCE_ID: instance_id, EXECUTION_ID: execution_id, VERSION: version}
    )
    return _client_span(_span_name("create_orchestration", name, version), attributes)


def raising_event(instance_id: str, event_name: str) -> contextlib.AbstractContextManager[str | None]:
    attributes = _attributes(**{TYPE: "event", NAME: event_name, TARGET_INSTANCE_ID: instance_id})
    return _client_span(_span_name("orchestration_event", event_name), attributes)


def signalling_entity(
    entity_instance_id: str, entity_name: str, operation: str
) -> contextlib.AbstractContextManager[str | None]:
    attributes = _attributes(**{TYPE: "entity", OPERATION: "signal_entity", TARGET_INSTANCE_ID: entity_instance_id})
    return _client_span(f"entity:{entity_name}:{operation}", attributes)


# -- orchestration steps -----------------------------------------------------------------------------
class StepTrace:
    """The span of one orchestration step, told the step's outcome by ``finish``."""

    def __init__(self, span: Span) -> None:
        self.span = span

    def finish(self, commit: protocol.Commit) -> None:
        """Record the step's status and send its messages as the step's children."""
        self.span.set_attribute(STATUS, commit.status.value)
        if commit.status is OrchestrationRuntimeStatus.Failed:
            failure = next((e.failure for e in commit.new_events if e.failure is not None), None)
            self.span.set_status(Status(StatusCode.ERROR, failure.message if failure else None))
        commit.messages = with_trace_context(commit.messages, context_text(self.span))


@contextlib.asynccontextmanager
async def orchestration_step(
    view: protocol.OrchestrationView, new_events: Sequence[HistoryEvent], inbound: Sequence[WorkMessage]
) -> AsyncIterator[StepTrace]:
    """A span for a step of ``view``'s orchestration (a new execution's when ``new_events`` start
    one), child of the span that started the execution and linked to those that sent ``inbound``."""
    started = next((e for e in new_events if e.event_type is EventType.EXECUTION_STARTED), view.started)
    parent = parent_context(started.parent_trace_context) if started is not None else None
    name = started.name if started is not None else None
    version = started.version if started is not None else None
    attributes = _attributes(
        **{
            TYPE: "orchestration",
            NAME: name,
            INSTANCE_ID: view.instance_id,
            EXECUTION_ID: started.execution_id if started is not None else None,
            VERSION: version,
        }
    )
    own = started.parent_trace_context if started is not None else None
    links = _links(m.trace_context for m in inbound if m.trace_context != own)
    # No parent is a new trace, not whatever the worker's own context happens to be.
    with _tracer().start_as_current_span(
        _span_name("orchestration", name, version),
        context=parent or Context(),
        kind=SpanKind.SERVER,
        attributes=attributes,
        links=links,
    ) as span:
        yield StepTrace(span)


def _links(texts: Iterable[str | None]) -> list[Link]:
    links: list[Link] = []
    seen: set[str | None] = set()
    for text in texts:
        context = parent_context(text) if text not in seen else None
        seen.add(text)
        if context is not None:
            links.append(Link(trace.get_current_span(context).get_span_context()))
    return links


# -- activities ---------------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def activity(work_item: WorkMessage) -> AsyncIterator[None]:
    """A span around an activity's run, child of the step that scheduled it; an exception the
    activity raises marks it failed on its way through."""
    scheduled = work_item.event
    attributes = _attributes(
        **{
            TYPE: "activity",
            NAME: scheduled.name,
            INSTANCE_ID: work_item.instance_id,
            EXECUTION_ID: work_item.execution_id,
            TASK_ID: scheduled.event_id,
            VERSION: scheduled.version,
        }
    )
    with _tracer().start_as_current_span(
        _span_name("activity", scheduled.name),
        context=parent_context(work_item.trace_context) or Context(),
        kind=SpanKind.SERVER,
        attributes=attributes,
    ):
        yield


# -- entities -----------------------------------------------------------------------------------------
def entity_operations(
    resolve: Callable[[str], EntityFunction | None], applied: Sequence[WorkMessage]
) -> Callable[[str], EntityFunction | None]:
    """``resolve`` with each operation it runs traced as a child of the span that sent it.

    The core runs the operations of a batch in its own order (per sender, after a lock, from
    earlier batches' buffers), so an operation is matched to the first message of this batch with
    the same operation name and input; one it cannot match (applied from a buffer) starts a trace."""
    if not _recording():
        return resolve
    senders: dict[tuple[str | None, str | None], deque[tuple[str | None, bool]]] = {}
    for message in applied:
        try:
            request = EntityRequest.from_json(message.event.input)
        except ValueError:
            continue
        if request.kind == "op":
            key = (request.operation, request.input)
            senders.setdefault(key, deque()).append((message.trace_context, request.reply_to is None))

    def traced_resolve(name: str) -> EntityFunction | None:
        function = resolve(name)
        if function is None:
            return None

        def traced(context: DurableEntityContext) -> Any:
            # the input as sent (JSON text), to match the message without decoding it
            waiting = senders.get((context.operation_name, context._input_json))
            sender, signal = waiting.popleft() if waiting else (None, None)
            attributes = _attributes(
                **{
                    TYPE: "entity",
                    INSTANCE_ID: context.entity_id.instance_id,
                    OPERATION: None if signal is None else ("signal_entity" if signal else "call_entity"),
                }
            )
            with _tracer().start_as_current_span(
                f"entity:{context.entity_name}:{context.operation_name}",
                context=parent_context(sender) or Context(),
                kind=SpanKind.CONSUMER if signal else SpanKind.SERVER,
                attributes=attributes,
            ):
                return function(context)

        return traced

    return traced_resolve


# -- export ---------------------------------------------------------------------------------------------
_configured: list[str] | None = None


def configure_exporters() -> list[str]:
    """Export spans, once per process, to Application Insights (``azure-monitor-opentelemetry``)
    when ``APPLICATIONINSIGHTS_CONNECTION_STRING`` is set and over OTLP when
    ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is; both when both
    are. Returns where spans go; nothing set: nowhere, and tracing stays the API's no-op.
    The exporters are the ``[tracing]`` extra; one that is missing is logged, not raised, so an
    app without them still runs."""
    global _configured
    if _configured is not None:
        return _configured
    _configured = []
    environ = os.environ  # where the exporters read their own settings too
    otlp = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    try:
        processors = [_otlp_processor(environ)] if otlp else []
        if environ.get("APPLICATIONINSIGHTS_CONNECTION_STRING"):
            from azure.monitor.opentelemetry import configure_azure_monitor

            # Storage SDK calls are the runtime's polling, not the app's work: left out.
            configure_azure_monitor(
                instrumentation_options={"azure_sdk": {"enabled": False}}, span_processors=processors
            )
            _configured.append("Application Insights")
        elif processors:
            from opentelemetry.sdk.trace import TracerProvider

            provider = TracerProvider()
            provider.add_span_processor(processors[0])
            trace.set_tracer_provider(provider)
        if otlp:
            _configured.append(f"OTLP ({otlp})")
    except ImportError as error:
        log.warning(
            "tracing is configured (%s) but its exporter is not installed (%s): "
            "pip install 'durable-azure-storage[tracing]'; spans are not exported",
            "APPLICATIONINSIGHTS_CONNECTION_STRING" if environ.get("APPLICATIONINSIGHTS_CONNECTION_STRING") else "OTLP",
            error.name,
        )
        _configured = []
    except Exception as error:  # a bad telemetry setting must not keep the app from running
        log.warning("tracing could not be configured, spans are not exported: %s", error)
        _configured = []
    if _configured:
        log.info("tracing: spans are exported to %s", " and ".join(_configured))
    return _configured


def _otlp_processor(environ: Mapping[str, str]) -> SpanProcessor:
    """A batching processor for the OTLP exporter the environment asks for (``http/protobuf``
    unless ``OTEL_EXPORTER_OTLP_PROTOCOL`` is ``grpc``); the exporter reads its endpoint, headers
    and timeouts from the environment itself."""
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    protocol_name = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    if protocol_name == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return BatchSpanProcessor(GrpcExporter())
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return BatchSpanProcessor(HttpExporter())
