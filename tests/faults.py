"""Deterministic storage fault injection for tests against Azurite.

``FaultPolicy`` is an azure-core pipeline policy that, for each HTTP request a storage client
sends, asks a ``FaultInjector`` what to do with it:

- ``Fault.SERVER_BUSY``: answer ``503 Server Busy`` without sending the request;
- ``Fault.DROP_REQUEST``: raise ``ServiceRequestError`` without sending it (the connection broke
  before the request reached storage: nothing happened there);
- ``Fault.LOSE_ANSWER``: send it, let storage carry it out, then raise ``ServiceResponseError``
  (the connection broke on the way back: the change is made, the caller does not know);
- ``Fault.DELAY``: send it after a pause (a slow network or proxy).

Where the policy sits in the client's pipeline matters (``Placement``):

- ``PER_RETRY`` (after the SDK's retry policy, like a flaky network or proxy): every attempt can
  be hit, and the SDK retries what its policy allows. The queue and blob SDKs retry every error
  and every 5xx (so a lost answer to a ``send_message`` enqueues the message twice, and a lost
  answer to a receive leaves its messages leased to nobody until their visibility timeout); the
  table SDK retries 503s on any method but connection errors only on idempotent methods, so a
  dropped connection or a lost answer on a POST (an insert, a ``$batch`` transaction) reaches
  the caller. The queue SDK waits 15 s before its first retry (``fast_sdk_retries`` shortens
  the back-off of a backend's clients when a test is about something else).
- ``PER_CALL`` (before the retry policy): the fault reaches the backend whatever the SDK would
  have done; ``LOSE_ANSWER`` then means "the whole call, retries included, succeeded and its
  answer was lost".

The injector draws from a seeded ``random.Random`` (rates per fault, optionally limited to some
request kinds), and also plays scripted ``Rule``\\ s ("lose the answer of the 3rd insert into
the Instances table", "lose the answer of the first receive that carries a message for
@account@x", "delay the purge's listing by 2 s"), which make a test deterministic whatever the
interleaving of concurrent requests. Every fault injected is logged (``FaultInjector.log``;
random delays are only counted, in ``FaultInjector.delayed``).

Install it on a backend with ``install_faults(backend, injector, placement)``: it splices the
policy into the pipelines the backend's clients already have (``AzureStorageBackend`` takes no
extra policies), before or after their retry policy. A backend may get one policy per placement.

Request kinds are ``StorageRequestCounter``'s (``table.batch``, ``table.write``, ``table.read``,
``table.query``, ``queue.send``, ``queue.receive``, ``queue.delete``, ``queue.update``,
``blob.read``, ``blob.write``, ``other``).
"""

from __future__ import annotations

import asyncio
import enum
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from azure.core.exceptions import ServiceRequestError, ServiceResponseError
from azure.core.pipeline import PipelineRequest, PipelineResponse
from azure.core.pipeline._base_async import AsyncPipeline, _AsyncTransportRunner
from azure.core.pipeline.policies import AsyncHTTPPolicy, AsyncRetryPolicy
from azure.core.rest._http_response_impl_async import AsyncHttpResponseImpl

from storage.azure import StorageRequestCounter

try:  # the storage SDKs' own retry policies (queues and blobs); tables use azure-core's
    from azure.storage.blob._shared.policies_async import AsyncStorageRetryPolicy as _BlobRetry
    from azure.storage.queue._shared.policies_async import AsyncStorageRetryPolicy as _QueueRetry

    _RETRY_TYPES: tuple[type, ...] = (AsyncRetryPolicy, _QueueRetry, _BlobRetry)
except ImportError:  # pragma: no cover - older SDK layouts
    _RETRY_TYPES = (AsyncRetryPolicy,)


class Fault(str, enum.Enum):
    NONE = "none"
    SERVER_BUSY = "503"
    DROP_REQUEST = "drop-request"  # ServiceRequestError, nothing sent
    LOSE_ANSWER = "lose-answer"  # sent and carried out, then ServiceResponseError
    DELAY = "delay"


class Placement(str, enum.Enum):
    PER_CALL = "per-call"  # before the SDK's retry policy: faults reach the caller
    PER_RETRY = "per-retry"  # after it: each attempt may be hit, the SDK retries what it may


@dataclass(frozen=True)
class RequestInfo:
    """What a rule or a rate filter sees of a request."""

    kind: str  # StorageRequestCounter's classification
    method: str
    url: str
    path: str  # unquoted URL path (account/table(...) or account/queue/messages/...)
    body: bytes | None  # the request body when it is in memory (table rows, queue messages)

    def body_text(self) -> str:
        return (self.body or b"").decode("utf-8", errors="replace")


@dataclass
class Rule:
    """A scripted fault: hit the matching requests ``skip`` of them let through first, ``times``
    times (``times=None``: every one after the skipped ones)."""

    fault: Fault
    kind: str | None = None  # request kind, e.g. "table.batch" (None: any)
    match: Callable[[RequestInfo], bool] | None = None  # further condition on the request
    skip: int = 0
    times: int | None = 1
    delay: float = 0.0  # for Fault.DELAY
    # LOSE_ANSWER only: decide once the answer is in, on its status and body (e.g. "a receive
    # that carried a message for this instance"); ``skip``/``times`` count matching answers.
    answer_match: Callable[[RequestInfo, int, bytes], bool] | None = None
    seen: int = 0
    hits: int = 0

    def applies(self, info: RequestInfo) -> bool:
        if self.answer_match is not None:
            return False  # decided by ``applies_to_answer``
        return self._count(info)

    def applies_to_answer(self, info: RequestInfo, status: int, body: bytes) -> bool:
        if self.answer_match is None or (self.kind is not None and info.kind != self.kind):
            return False
        if not self.answer_match(info, status, body):
            return False
        return self._count(info)

    def _count(self, info: RequestInfo) -> bool:
        if self.kind is not None and info.kind != self.kind:
            return False
        if self.match is not None and not self.match(info):
            return False
        self.seen += 1
        if self.seen <= self.skip:
            return False
        if self.times is not None and self.hits >= self.times:
            return False
        self.hits += 1
        return True


@dataclass
class FaultRates:
    """Probabilities per request (each request gets at most one fault)."""

    server_busy: float = 0.0
    drop_request: float = 0.0
    lose_answer: float = 0.0
    delay: float = 0.0
    max_delay: float = 2.0


# The scenario of the report: a proxy with 2% 503s, 1% drops before and 1% after the request
# reached storage, and 3% delays of up to 2 s.
PROXY_RATES = FaultRates(server_busy=0.02, drop_request=0.01, lose_answer=0.01, delay=0.03, max_delay=2.0)


@dataclass(frozen=True)
class InjectedFault:
    fault: Fault
    kind: str
    method: str
    path: str
    placement: Placement
    note: str = ""


@dataclass
class FaultInjector:
    """Decides the fate of each request: scripted rules first, then the seeded rates."""

    seed: int = 0
    rates: FaultRates = field(default_factory=FaultRates)
    kinds: frozenset[str] | None = None  # random faults only on these request kinds (None: all)
    rules: list[Rule] = field(default_factory=list)
    enabled: bool = True
    log: list[InjectedFault] = field(default_factory=list)
    classifier: StorageRequestCounter = field(default_factory=StorageRequestCounter)

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)
        self._lock = threading.Lock()
        self.delayed = 0  # random delays injected (not logged one by one)

    def add_rule(self, rule: Rule) -> Rule:
        self.rules.append(rule)
        return rule

    def register_endpoint(self, url: str, service: str) -> None:
        self.classifier.register_endpoint(url, service)

    def describe(self, http_request: Any) -> RequestInfo:
        method, url = http_request.method, http_request.url
        body: bytes | None = None
        content = getattr(http_request, "content", None)
        if content is None:
            content = getattr(http_request, "body", None)
        if isinstance(content, bytes):
            body = content
        elif isinstance(content, str):
            body = content.encode("utf-8")
        return RequestInfo(
            self.classifier.classify(method, url), method.upper(), url, unquote(urlsplit(url).path), body
        )

    def decide(self, info: RequestInfo, placement: Placement) -> tuple[Fault, float]:
        if not self.enabled:
            return Fault.NONE, 0.0
        with self._lock:
            for rule in self.rules:
                if rule.applies(info):
                    self._record(rule.fault, info, placement, "rule")
                    return rule.fault, rule.delay
            if self.kinds is not None and info.kind not in self.kinds:
                return Fault.NONE, 0.0
            r = self._random.random()
            rates = self.rates
            for fault, rate in (
                (Fault.SERVER_BUSY, rates.server_busy),
                (Fault.DROP_REQUEST, rates.drop_request),
                (Fault.LOSE_ANSWER, rates.lose_answer),
                (Fault.DELAY, rates.delay),
            ):
                if r < rate:
                    delay = self._random.uniform(0.0, rates.max_delay) if fault is Fault.DELAY else 0.0
                    if fault is Fault.DELAY:
                        self.delayed += 1
                    else:
                        self._record(fault, info, placement, "random")
                    return fault, delay
                r -= rate
            return Fault.NONE, 0.0

    @property
    def watches_answers(self) -> bool:
        return self.enabled and any(rule.answer_match is not None for rule in self.rules)

    def lose_answer(self, info: RequestInfo, placement: Placement, status: int, body: bytes) -> bool:
        """After a request was carried out: should its answer be lost (``Rule.answer_match``)?"""
        if not self.enabled:
            return False
        with self._lock:
            for rule in self.rules:
                if rule.fault is Fault.LOSE_ANSWER and rule.applies_to_answer(info, status, body):
                    self._record(Fault.LOSE_ANSWER, info, placement, "rule on answer")
                    return True
        return False

    def _record(self, fault: Fault, info: RequestInfo, placement: Placement, note: str) -> None:
        self.log.append(InjectedFault(fault, info.kind, info.method, info.path, placement, note))

    def summary(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in self.log:
            key = f"{f.fault.value}:{f.kind}"
            out[key] = out.get(key, 0) + 1
        return dict(sorted(out.items()))


class _InjectedResponse(AsyncHttpResponseImpl):
    """A response fabricated by the policy (no connection behind it)."""

    class _Nothing:
        async def close(self) -> None:
            return None

    def __init__(self, request: Any, status_code: int, reason: str, body: bytes, headers: dict[str, str]) -> None:
        super().__init__(
            request=request,
            internal_response=self._Nothing(),
            status_code=status_code,
            reason=reason,
            content_type=headers.get("Content-Type"),
            headers=headers,
            stream_download_generator=None,
        )
        self._content = body
        self._is_stream_consumed = True


def _server_busy(request: PipelineRequest[Any], info: RequestInfo) -> _InjectedResponse:
    if info.kind.startswith("table"):
        body = b'{"odata.error":{"code":"ServerBusy","message":{"lang":"en-US","value":"Injected: server busy."}}}'
        headers = {"Content-Type": "application/json;odata=minimalmetadata;streaming=true;charset=utf-8"}
    else:
        body = (
            b'<?xml version="1.0" encoding="utf-8"?><Error><Code>ServerBusy</Code>'
            b"<Message>Injected: server busy.</Message></Error>"
        )
        headers = {"Content-Type": "application/xml"}
    headers.update({"x-ms-error-code": "ServerBusy", "Content-Length": str(len(body))})
    return _InjectedResponse(request.http_request, 503, "Server Busy", body, headers)


async def _read_body(response: PipelineResponse[Any, Any]) -> bytes:
    """Load the answer's body (the SDK reads it from memory afterwards)."""
    http_response = response.http_response
    try:
        if hasattr(http_response, "load_body"):
            await http_response.load_body()
            return bytes(http_response.body() or b"")
        return bytes(await http_response.read())
    except Exception:
        return b""


class FaultPolicy(AsyncHTTPPolicy):  # type: ignore[type-arg]
    """Applies the injector's decision to each request passing through it."""

    def __init__(self, injector: FaultInjector, placement: Placement) -> None:
        super().__init__()
        self.injector = injector
        self.placement = placement

    async def send(self, request: PipelineRequest[Any]) -> PipelineResponse[Any, Any]:
        info = self.injector.describe(request.http_request)
        fault, delay = self.injector.decide(info, self.placement)
        if delay > 0:
            await asyncio.sleep(delay)
        if fault is Fault.SERVER_BUSY:
            return PipelineResponse(request.http_request, _server_busy(request, info), request.context)
        if fault is Fault.DROP_REQUEST:
            raise ServiceRequestError(f"injected: connection dropped before sending {info.method} {info.path}")
        response = await self.next.send(request)
        if fault is Fault.NONE and self.injector.watches_answers:
            body = await _read_body(response)
            if self.injector.lose_answer(info, self.placement, response.http_response.status_code, body):
                fault = Fault.LOSE_ANSWER
        if fault is Fault.LOSE_ANSWER:
            # The server has done it; read and drop its answer as a broken connection would.
            http_response = response.http_response
            read = getattr(http_response, "read", None)
            if read is not None:
                try:
                    result = read()
                    if asyncio.iscoroutine(result):
                        await result
                except Exception:
                    pass
            raise ServiceResponseError(
                f"injected: answer to {info.method} {info.path} lost after it reached storage "
                f"({http_response.status_code})"
            )
        return response


# -- installing it on a backend ------------------------------------------------------------------------
def _pipelines(root: Any) -> list[AsyncPipeline[Any, Any]]:
    """Every AsyncPipeline reachable from ``root`` through object attributes (clients nest
    generated clients that hold the pipeline)."""
    found: list[AsyncPipeline[Any, Any]] = []
    seen: set[int] = set()
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or obj is None or isinstance(obj, (str, bytes, int, float, bool)):
            continue
        seen.add(id(obj))
        if isinstance(obj, AsyncPipeline):
            found.append(obj)
            continue
        module = type(obj).__module__ or ""
        if isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif module.startswith(("azure.", "storage.")):
            with_dict = getattr(obj, "__dict__", None)
            if with_dict:
                stack.extend(with_dict.values())
    return found


def _relink(pipeline: AsyncPipeline[Any, Any]) -> None:
    policies = pipeline._impl_policies
    for index in range(len(policies) - 1):
        policies[index].next = policies[index + 1]
    if policies:
        policies[-1].next = _AsyncTransportRunner(pipeline._transport)


def _splice(pipeline: AsyncPipeline[Any, Any], injector: FaultInjector, placement: Placement) -> bool:
    policies = pipeline._impl_policies
    if any(isinstance(p, FaultPolicy) and p.injector is injector and p.placement is placement for p in policies):
        return False
    retry = next((i for i, p in enumerate(policies) if isinstance(p, _RETRY_TYPES)), None)
    if retry is None:
        raise RuntimeError(f"no retry policy in pipeline {pipeline!r}")
    # One policy object per pipeline: a policy's ``next`` is where its own pipeline goes on.
    policies.insert(retry if placement is Placement.PER_CALL else retry + 1, FaultPolicy(injector, placement))
    _relink(pipeline)
    return True


def install_faults(backend: Any, injector: FaultInjector, placement: Placement = Placement.PER_RETRY) -> None:
    """Splice a ``FaultPolicy`` into every storage client pipeline of an ``AzureStorageBackend``.

    The backend has no hook for extra policies, so this edits the pipelines its clients already
    have, before (``PER_CALL``) or after (``PER_RETRY``) their retry policy. Queue clients are
    created first, so all of them are covered; table clients the backend would create later
    (it creates none) get it from the service client's policy list. Each backend (worker)
    should have its own injector, or share one on purpose."""
    injector.register_endpoint(backend._tables.url, "table")
    injector.register_endpoint(backend._queues.url, "queue")
    injector.register_endpoint(backend._blobs.url, "blob")
    for name in backend.logical_queues():
        backend._queue(name)
    spliced = sum(_splice(pipeline, injector, placement) for pipeline in _pipelines(backend))
    if not spliced:
        raise RuntimeError("found no storage pipeline to install the fault policy on")
    table_policies = backend._tables._policies
    retry = next(i for i, p in enumerate(table_policies) if isinstance(p, _RETRY_TYPES))
    table_policies.insert(retry if placement is Placement.PER_CALL else retry + 1, FaultPolicy(injector, placement))


def fast_sdk_retries(backend: Any, backoff: float = 0.05) -> None:
    """Shorten the SDK retry policies' back-off on every pipeline of ``backend`` (the queue and
    blob SDKs wait 15 s before their first retry): keeps fault tests short without changing
    what is retried."""
    for pipeline in _pipelines(backend):
        for policy in pipeline._impl_policies:
            if hasattr(policy, "initial_backoff"):  # the storage SDKs' ExponentialRetry
                policy.initial_backoff = backoff
                policy.increment_base = backoff  # pow(base, n) grows the wait from the 2nd retry on
                policy.random_jitter_range = 0
            elif isinstance(policy, AsyncRetryPolicy):
                policy.backoff_factor = backoff


def pipeline_kinds(backend: Any) -> list[list[str]]:
    """The policy class names of each pipeline of ``backend`` (to check an installation)."""
    return [[type(p).__name__ for p in pl._impl_policies] for pl in _pipelines(backend)]


def entity_path_matches(instance_id_fragment: str) -> Callable[[RequestInfo], bool]:
    """A rule condition: the request's URL or body mentions ``instance_id_fragment``."""

    def match(info: RequestInfo) -> bool:
        return instance_id_fragment in info.path or instance_id_fragment in info.body_text()

    return match


def all_of(*conditions: Callable[[RequestInfo], bool]) -> Callable[[RequestInfo], bool]:
    return lambda info: all(c(info) for c in conditions)


def kinds(*names: str) -> frozenset[str]:
    return frozenset(names)


__all__ = [
    "PROXY_RATES",
    "Fault",
    "FaultInjector",
    "FaultPolicy",
    "FaultRates",
    "InjectedFault",
    "Placement",
    "RequestInfo",
    "Rule",
    "all_of",
    "entity_path_matches",
    "fast_sdk_retries",
    "install_faults",
    "kinds",
    "pipeline_kinds",
]
