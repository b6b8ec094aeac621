"""The worker: the I/O shell around the instance protocol (``_protocol``).

For each batch of control-queue messages of one instance it does, in this order: receive → load
(or reuse the cached instance) → plan → step → commit → send → project → acknowledge. Every
decision (what to apply, drop or defer; what a step sends; what a taken-over step still owes) is
the protocol's; this module only moves data between it and storage. The polling loop and the
Functions host's queue triggers (``process_deliveries``) go through the same path; they differ only
in who acknowledges a delivery (``Acknowledger``).

With partition ownership (``_ownership``), messages for instances of partitions this process holds
are handed over instead of polled for (``Worker._send``): they enter the same path as held
deliveries, which the queue keeps, hidden, until they are settled.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol, TypeVar, cast

from ..core import _protocol as protocol
from ..core import _serialization as serialization
from ..core._entities import is_entity_id
from ..core._history import EventType, FailureDetails, HistoryEvent, utcnow
from ..core._messages import MessageTarget, WorkMessage
from ..core._status import InstanceRecord, OrchestrationRuntimeStatus
from . import _tracing as tracing
from ._backend import (
    WORK_ITEM_QUEUE,
    Backend,
    ConcurrencyConflict,
    InstanceHistory,
    PoisonedMessage,
    ReceivedMessage,
    control_queue,
    partition_of,
    queue_for,
)
from ._ownership import PartitionOwnership
from ._polling import PollIntervals, poll, wake_when_due
from ._registry import FunctionRegistry
from ._wake import start_local_wakes

T = TypeVar("T")

log = logging.getLogger("durable.worker")

Clock = Callable[[], datetime]

_PENDING = OrchestrationRuntimeStatus.Pending


@dataclass
class WorkerOptions:
    batch_size: int = 32
    # The lease: seconds a received message stays hidden from other workers. While this worker
    # works on a message it renews the lease every half lease (see LeaseKeeper), so a long
    # activity or step keeps its messages, and those of a worker that died are seen again
    # within one lease.
    visibility_timeout: float = 20.0
    max_dequeue_count: int = 5
    max_concurrent_activities: int = 16
    # An idle queue is checked at least every idle_poll_max seconds (maxQueuePollingInterval); one
    # that holds messages more often, to keep the recovery bound (see _polling.PollIntervals).
    idle_poll_min: float = 0.05
    idle_poll_max: float = 30.0
    cache_size: int = 1000
    retry_delay: float = 1.0  # before a message whose processing failed is seen again; doubles each time
    max_retry_delay: float = 300.0
    # Run a step's activities in this worker when they are all it asks for (see Worker._run_inline).
    inline_activities: bool = True
    inline_max_activities: int = 16  # larger fan-outs go through the work-item queue...
    # ...unless this process is alone on the task hub (``PartitionOwnership.alone``): the queue
    # would only bring them back to it, a round trip and a send, receive and delete later.
    inline_max_activities_alone: int = 1000
    inline_budget: float = 5.0  # seconds of inline work before committing anyway
    # Results of one instance's work items that finish within this many seconds of each other,
    # from different receives or queue-trigger invocations, go back in one send (see _Report).
    report_window: float = 0.05
    entity_batch_size: int = 1000  # messages an entity applies in one step; the rest wait for the next
    # A step that changes nothing its Instances row shows writes that row up to this many seconds
    # later, and not at all when a later step of the instance comes first (protocol I6); 0: at once.
    row_delay: float = 1.0
    # Whether the worker writes held-back rows on a timer of its own; False: whoever drives the
    # worker calls ``write_held_rows`` (the conformance simulation, on its virtual clock).
    row_timer: bool = True
    # Keep a cached orchestration's execution live between its steps, so that a step continues it
    # instead of replaying the whole history (the Durable extension's extendedSessionsEnabled;
    # protocol I7). A worker that loads an instance (a restart, another worker) replays it.
    extended_sessions: bool = True
    # Take a control queue's messages only while holding its partition's lease (``run`` only).
    partition_leases: bool = True
    # ``run`` wakes, and is woken by, the other processes of this machine serving the task hub
    # (``_wake``): a message between two of them does not wait for the receiver's poll.
    local_wakes: bool = True
    # Fault injection for chaos tests: called with a point name ("committed", "row-ahead", "sent",
    # "projected", "activity-reported", "handed-over") and the instance id as processing passes
    # that point.
    fault_hook: Callable[[str, str], None] | None = None
    observer: WorkerObserver | None = None  # a host watching what runs (durable start logs it)


@dataclass
class Invocation:
    """One run of user code: an orchestrator step, an activity or an entity batch."""

    kind: str  # "Orchestrator", "Activity" or "Entity", as the Durable extension names them
    name: str
    instance_id: str
    failed: bool = False  # set when the code ran but failed the instance (an orchestrator raising)


class WorkerObserver(Protocol):
    def invoking(self, invocation: Invocation) -> contextlib.AbstractAsyncContextManager[None]:
        """Entered around the user code; an exception from an activity passes through it."""
        ...

    def committed(self, commit: protocol.Commit) -> None:
        """Called after each commit (lifecycle: started, completed, failed, terminated)."""
        ...


@dataclass
class _Report:
    """The results of one instance's work items from batches running side by side (a fan-out's
    envelopes, each its own queue-trigger invocation): sent together when the last batch is done,
    or ``report_window`` after the first, so that the instance applies them in one step."""

    running: int = 0  # batches still running activities
    answers: list[WorkMessage] = field(default_factory=list)
    sent: asyncio.Future[None] | None = None  # settled once ``answers`` went out (or could not)
    finished: asyncio.Event = field(default_factory=asyncio.Event)  # no batch runs any more
    closed: bool = False  # ``answers`` were taken: a batch finishing later sends its own


@dataclass
class _Waiting:
    """The deliveries of an instance's next step, gathering while it waits for its turn."""

    deliveries: list[ReceivedMessage]
    done: asyncio.Future[None]  # set when the step is done: its riders return then
    riders: int = 0  # callers whose deliveries joined


@dataclass
class _Cached:
    """An instance as this worker last committed or loaded it, read once."""

    history: InstanceHistory
    record_etag: str | None = None  # of the Instances row as this worker last wrote it
    view: protocol.OrchestrationView | None = None  # read when first needed, unless the step had it

    @property
    def orchestration(self) -> protocol.OrchestrationView:
        if self.view is None:
            self.view = protocol.read_orchestration(self.history)
        return self.view

    @functools.cached_property
    def entity(self) -> protocol.EntityView:
        return protocol.read_entity(self.history)


class Worker:
    def __init__(
        self,
        registry: FunctionRegistry,
        backend: Backend,
        *,
        clock: Clock = utcnow,
        options: WorkerOptions | None = None,
        acks: Acknowledger | None = None,
    ) -> None:
        self.registry = registry
        self.backend = backend
        self.clock = clock
        self.options = options or WorkerOptions()
        own_queue = QueueAcknowledger(backend, clock)
        self.acks = LeaseKeeper(own_queue if acks is None else HeldApart(acks, own_queue))
        # The partitions this process holds, when it runs with partition leases (``run``, or the
        # local host): messages for their instances are handed over here, not polled for.
        self.ownership: PartitionOwnership | None = None
        # Bounds the steps taken for handed-over deliveries together with whatever else holds
        # these slots: the local host's control-queue invocations (maxConcurrentOrchestratorFunctions).
        self.step_slots: asyncio.Semaphore | None = None
        self._handed_over: dict[str, list[ReceivedMessage]] = {}  # instance -> deliveries waiting
        self._draining: set[str] = set()  # instances with a task taking their handed-over deliveries
        self._handovers: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._cache: OrderedDict[str, _Cached] = OrderedDict()
        # one step at a time per instance in this worker: the lock and how many hold or await it,
        # and the deliveries gathering for the step that waits for it
        self._instance_locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self._waiting: dict[str, _Waiting] = {}
        self._reports: dict[str, _Report] = {}
        self._held_rows: dict[str, tuple[InstanceRecord, datetime]] = {}  # instance -> row, when due
        self._row_writer: asyncio.Task[None] | None = None
        self._activity_slots = asyncio.Semaphore(self.options.max_concurrent_activities)

    # -- loops ---------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Poll until ``stop`` is set; each queue backs off on its own while it is empty (see
        ``_polling``), and is polled at once when this process sends to it. A control queue is
        received from only while this process holds its partition (``_ownership``)."""
        partitions = range(self.backend.partition_count)
        wakes = {queue: asyncio.Event() for queue in [*map(control_queue, partitions), WORK_ITEM_QUEUE]}

        def woken(queue: str, delay: float) -> None:
            if queue in wakes:
                wake_when_due(wakes[queue], delay)

        self.backend.add_send_listener(woken)
        ownership = PartitionOwnership(self.backend) if self.options.partition_leases else None
        self.ownership = ownership
        # ...and when another process of this machine serving the hub sends to it (``_wake``)
        local_wakes = await start_local_wakes(self.backend, woken, ownership) if self.options.local_wakes else None
        if ownership is not None:
            ownership.on_available(lambda partition: wakes[control_queue(partition)].set())
        options = self.options
        intervals = PollIntervals.for_lease(options.visibility_timeout, options.idle_poll_max, options.idle_poll_min)
        pollers = [
            poll(stop, wakes[control_queue(p)], functools.partial(self.run_partition_once, p, ownership),
                 functools.partial(self._partition_is_empty, p, ownership),
                 intervals if ownership is None else functools.partial(ownership.intervals, p, intervals))
            for p in partitions
        ]  # fmt: skip
        is_empty = functools.partial(self.backend.queue_is_empty, WORK_ITEM_QUEUE)
        pollers.append(poll(stop, wakes[WORK_ITEM_QUEUE], self.run_activities_once, is_empty, intervals))
        if ownership is not None:
            pollers.append(ownership.run(stop))
        try:
            await asyncio.gather(*pollers)
        finally:
            if local_wakes is not None:
                local_wakes.close()
            await self.finish_up()
            if ownership is not None:
                await ownership.release_all()

    async def run_once(self) -> int:
        """Poll every queue once and process what arrived; returns the number of messages."""
        counts = await asyncio.gather(self.run_orchestrations_once(), self.run_activities_once())
        return sum(counts)

    async def run_until_idle(self, max_rounds: int = 10_000) -> None:
        """Process messages until no queue has a visible message (for tests and scripts)."""
        for _ in range(max_rounds):
            if not await self.run_once():
                await self.write_held_rows(everything=True)
                return
        raise RuntimeError(f"still busy after {max_rounds} rounds")

    async def run_orchestrations_once(self) -> int:
        counts = await asyncio.gather(*(self.run_partition_once(p) for p in range(self.backend.partition_count)))
        return sum(counts)

    async def run_partition_once(self, partition: int, ownership: PartitionOwnership | None = None) -> int:
        """Receive one batch from a control queue and process it, instances in parallel; with
        ``ownership``, only as the partition's holder (``PartitionOwnership.take``)."""
        receive = functools.partial(self._receive, control_queue(partition), self.options.batch_size)
        batch = await (receive() if ownership is None else ownership.take(partition, receive, self._put_back))
        return await self._process(batch)

    async def _partition_is_empty(self, partition: int, ownership: PartitionOwnership | None) -> bool:
        ask = functools.partial(self.backend.queue_is_empty, control_queue(partition))
        return await (ask() if ownership is None else ownership.is_empty(partition, ask))

    async def run_activities_once(self) -> int:
        return await self._process(await self._receive(WORK_ITEM_QUEUE, self.options.max_concurrent_activities))

    async def _receive(self, queue: str, max_count: int) -> list[ReceivedMessage | PoisonedMessage]:
        return await self.backend.receive(queue, max_count, self.options.visibility_timeout)

    async def _put_back(self, batch: list[ReceivedMessage | PoisonedMessage]) -> None:
        """Visible again at once, for the process that holds their partition."""
        await asyncio.gather(*(self.backend.release(d, 0) for d in batch if isinstance(d, ReceivedMessage)))

    async def _process(self, batch: list[ReceivedMessage | PoisonedMessage]) -> int:
        """Process a received batch, its leases renewed meanwhile; the number of messages."""
        async with self.acks.holding(batch, self.options.visibility_timeout):
            await self._dispatch(batch)
        return len(batch)

    async def process_deliveries(self, deliveries: Sequence[ReceivedMessage | PoisonedMessage]) -> None:
        """Process the messages of one queue message (the Functions host's queue triggers call this)."""
        await self._dispatch(deliveries)

    async def _dispatch(self, deliveries: Sequence[ReceivedMessage | PoisonedMessage]) -> None:
        """Process received messages: each instance's messages as one step, each instance's
        work items together (their results go back together, see ``_run_activities``)."""
        steps: dict[str, list[ReceivedMessage]] = {}
        work: dict[str, list[ReceivedMessage]] = {}
        for delivery in deliveries:
            if await self._screen(delivery):
                assert isinstance(delivery, ReceivedMessage)
                message = delivery.message
                group = work if message.target is MessageTarget.ACTIVITY else steps
                group.setdefault(message.instance_id, []).append(delivery)
        await asyncio.gather(
            *(self._run_activities(items) for items in work.values()),
            *(self._process_instance(instance_id, items) for instance_id, items in steps.items()),
        )

    async def _screen(self, delivery: ReceivedMessage | PoisonedMessage) -> bool:
        """Poison unparsable messages and ones that failed too often; True if it may be processed."""
        if isinstance(delivery, PoisonedMessage):
            log.error("poisoned unreadable message on %s: %s", delivery.queue, delivery.reason)
            await self.acks.poison(delivery, delivery.reason)
            return False
        if delivery.dequeue_count > self.options.max_dequeue_count:
            reason = f"dequeued {delivery.dequeue_count} times without being processed"
            log.error(
                "poisoned message %s for instance %s (%s): %s",
                delivery.message.id,
                delivery.message.instance_id,
                delivery.message.event.event_type.value,
                reason,
            )
            await self.acks.poison(delivery, reason)
            return False
        return True

    # -- activities ------------------------------------------------------------------------------
    async def _run_activities(self, deliveries: list[ReceivedMessage]) -> None:
        """Run one instance's work items concurrently and report their results in one send, so
        that they travel together and the instance applies them in one step — together with the
        results of other batches of the instance running here (``_Report``). The work items are
        settled only once their results went out."""
        messages = [d.message for d in deliveries]
        instance_id = messages[0].instance_id
        report = self._reports.setdefault(instance_id, _Report())
        report.running += 1
        try:
            completions = await asyncio.gather(*(self._execute_activity(m) for m in messages))  # leased meanwhile
        finally:
            report.running -= 1
        answers = zip(messages, completions, strict=True)
        try:
            await self._report(instance_id, report, [protocol.completion_message(m, c) for m, c in answers])
            self._fault("activity-reported", instance_id)
            await asyncio.gather(*(self.acks.done(d) for d in deliveries))
        except Exception as exc:
            log.exception("could not report %d activity results of %s; they will run again",
                          len(messages), instance_id)  # fmt: skip
            await self.acks.failed(deliveries, exc, [self._retry_delay(d) for d in deliveries])

    async def _report(self, instance_id: str, report: _Report, answers: list[WorkMessage]) -> None:
        """Send ``answers`` with the rest of ``report``: the first batch done sends them all once
        no other batch of the instance runs, or ``report_window`` later; the others ride along."""
        if report.closed:  # finished after the window closed
            await self._send(answers)
            return
        report.answers += answers
        if report.sent is not None:  # a rider
            if not report.running:
                report.finished.set()
            await asyncio.shield(report.sent)
            return
        sent = report.sent = asyncio.get_running_loop().create_future()
        try:
            if report.running:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(report.finished.wait(), self.options.report_window)
            report.closed = True
            if self._reports.get(instance_id) is report:
                del self._reports[instance_id]  # batches starting from now report anew
            await self._send(report.answers)
            sent.set_result(None)
        finally:
            report.closed = True
            if not sent.done():  # the send failed, or a stop cut it short: the riders' work runs again
                sent.set_exception(RuntimeError(f"the activity results of {instance_id} were not sent"))
                sent.exception()  # retrieved: each rider awaiting it still raises it; none may be left

    async def _execute_activity(self, message: WorkMessage) -> HistoryEvent:
        """Run the activity a work item asks for; its completion event (result or failure)."""
        scheduled = message.event
        activity = self.registry.activity(scheduled.name or "")
        result: str | None = None
        failure: FailureDetails | None = None
        if activity is None:
            failure = FailureDetails("FunctionNotFound", f"no activity function named '{scheduled.name}'")
        else:
            try:
                invocation = Invocation("Activity", activity.name, message.instance_id)
                async with self._activity_slots, tracing.activity(message), self._invoking(invocation):
                    value = await activity.invoke(serialization.decode(scheduled.input))
                result = serialization.encode(value)
            except Exception as exc:
                failure = FailureDetails.from_exception(exc)
        return protocol.activity_completion(message, result, failure, self.clock())

    # -- orchestrations --------------------------------------------------------------------------
    async def _process_instance(self, instance_id: str, deliveries: list[ReceivedMessage]) -> None:
        """One step for ``deliveries``, one step at a time per instance. Deliveries that arrive
        while a step of the instance waits for its turn join that step — a hot entity's signals
        from several receives, a fan-in's results from several queue-trigger invocations — and
        their caller returns when it is done (settled, or put back for a retry). An entity takes
        them ``entity_batch_size`` a step, in as many steps as that needs (putting the rest back
        on the queue would send each again on its own)."""
        waiting = self._waiting.get(instance_id)
        if waiting is not None:
            waiting.deliveries += deliveries
            waiting.riders += 1
            await asyncio.shield(waiting.done)
            return
        waiting = self._waiting[instance_id] = _Waiting(list(deliveries), asyncio.get_running_loop().create_future())
        lock, users = self._instance_locks.get(instance_id, (asyncio.Lock(), 0))
        self._instance_locks[instance_id] = (lock, users + 1)
        settled = False
        unsettled = waiting.deliveries  # the same list: riders join it until the step's turn
        applied: list[ReceivedMessage] = []
        try:
            async with lock:
                del self._waiting[instance_id]  # from here on, newcomers wait for the next step
                entity = is_entity_id(instance_id)
                step = self._try_entity_step if entity else self._try_step
                most = self.options.entity_batch_size if entity else len(unsettled)
                while unsettled:
                    batch = unsettled[:most]
                    for attempt in range(10):
                        done = await step(instance_id, batch, attempt)
                        if done is not None:
                            applied += done
                            break
                    else:
                        raise ConcurrencyConflict(f"{instance_id}: gave up after repeated commit conflicts")
                    unsettled = unsettled[most:]
            # The instance's history holds them now: its next step need not wait for their deletes.
            await self._acknowledge(applied)
            settled = True
        except Exception as exc:
            log.exception("processing %s failed; its messages will be retried", instance_id)
            self._cache.pop(instance_id, None)
            await self._acknowledge(applied)  # those of the steps committed before the failure
            await self.acks.failed(unsettled, exc, [self._retry_delay(d) for d in unsettled])
            settled = True
        finally:
            if self._waiting.get(instance_id) is waiting:  # cut short before its turn
                del self._waiting[instance_id]
            if settled or not waiting.riders:
                waiting.done.set_result(None)
            else:  # cancelled (a stop): the riders' callers must not settle their messages either
                waiting.done.set_exception(RuntimeError(f"the step of {instance_id} was cut short"))
            lock, users = self._instance_locks[instance_id]
            if users > 1:
                self._instance_locks[instance_id] = (lock, users - 1)
            else:
                del self._instance_locks[instance_id]

    async def _acknowledge(self, deliveries: Sequence[ReceivedMessage]) -> None:
        """Settle deliveries whose messages a committed step applied or dropped. One that cannot be
        deleted comes back after its lease and is dropped then, as a duplicate."""
        outcomes = await _outcomes(*(self.acks.done(d) for d in deliveries))
        for delivery, outcome in zip(deliveries, outcomes, strict=True):
            if isinstance(outcome, Exception):
                log.warning("could not settle message %s: %r", delivery.message.id, outcome)

    # -- the step: load -> plan -> step -> commit -> send -> project -> ack -----------------------------
    async def _try_step(
        self, instance_id: str, deliveries: list[ReceivedMessage], attempt: int
    ) -> list[ReceivedMessage] | None:
        """One attempt at an orchestration step: the deliveries to acknowledge once the instance
        is free (those deferred are put back already), or None when the commit lost a race."""
        messages = [d.message for d in deliveries]
        cached = self._cache.get(instance_id)
        fresh = cached is None
        if cached is None and attempt == 0 and _only_starts(messages):
            # Almost always a new instance: skip the read; if it does exist, the create-only
            # commit conflicts and the next attempt loads it.
            cached, fresh = _Cached(InstanceHistory(instance_id)), False
        elif cached is None:
            cached = await self._load(instance_id)
        now = self.clock()
        plan = await self._plan(cached, messages, now)
        if not plan.changes_history and not fresh:
            # Nothing new according to the cache; make sure against storage before dropping.
            cached = await self._load(instance_id, cached)
            plan = await self._plan(cached, messages, now)
        if not plan.changes_history:
            return await self._settle(instance_id, deliveries, plan)
        if self.registry.rejects_version(cached.orchestration.started, plan.events):
            log.info("%s: its version is not this app's (versionFailureStrategy Reject); left for later", instance_id)
            await asyncio.gather(*(self.acks.later(d, self._retry_delay(d)) for d in deliveries))
            return []
        invocation = Invocation("Orchestrator", _orchestration_name(cached.orchestration, plan), instance_id)
        step_trace = tracing.orchestration_step(cached.orchestration, plan.events, messages)
        async with step_trace as trace, self._invoking(invocation):
            commit = protocol.step_orchestration(cached.orchestration, plan, self.registry.orchestrator, now)
            invocation.failed = commit.status is OrchestrationRuntimeStatus.Failed
            trace.finish(commit)
        if not await self._commit(commit):
            return None
        commit = await self._run_inline(commit)
        record_etag = cached.record_etag or next((m.record_etag for m in messages if m.record_etag), None)
        await self._finish(commit, record_etag)
        return await self._settle(instance_id, deliveries, plan)

    async def _plan(self, cached: _Cached, messages: Sequence[WorkMessage], now: datetime) -> protocol.Plan:
        view = cached.orchestration
        pending = None
        if not view.is_started and any(m.event.event_type is not EventType.EXECUTION_STARTED for m in messages):
            # Messages for an instance that has not started: is a start on its way (or lost)?
            record = await self.backend.read_instance(view.instance_id)
            pending = record if record is not None and record.runtime_status is _PENDING else None
        return protocol.plan_orchestration(view, messages, now, pending)

    async def _commit(self, commit: protocol.Commit) -> bool:
        """Make the step durable; False when someone else committed first (reload and redo)."""
        history = commit.history
        try:
            history.etag = await self.backend.commit(
                history.instance_id,
                expected_etag=history.etag,
                execution_id=history.execution_id or "",
                keep=commit.keep,
                new_events=commit.new_events,
                outbox_start=history.outbox_start,
                checkpoint=history.checkpoint,
            )
        except ConcurrencyConflict:
            log.info("commit conflict on %s; reloading", history.instance_id)
            self._cache.pop(history.instance_id, None)
            if self.ownership is not None:
                await self.ownership.recheck(partition_of(history.instance_id, self.backend.partition_count))
            return False
        self._fault("committed", history.instance_id)
        if not self.options.extended_sessions and commit.view is not None:
            commit.view.session = None  # the next step replays the history
        if self.options.observer is not None:
            self.options.observer.committed(commit)
        return True

    def _invoking(self, invocation: Invocation) -> contextlib.AbstractAsyncContextManager[None]:
        observer = self.options.observer
        return contextlib.nullcontext() if observer is None else observer.invoking(invocation)

    async def _finish(self, commit: protocol.Commit, record_etag: str | None) -> None:
        """After the commit: its messages and its Instances row, then remember what it committed."""
        instance_id = commit.history.instance_id
        self._held_rows.pop(instance_id, None)  # what this step's row shows includes it
        # Only a long-running host (it holds partitions) holds rows back: it writes them when it
        # stops, where a Functions-host process may be recycled without notice.
        can_wait = commit.record_can_wait and self.options.row_delay > 0 and self.ownership is not None
        record_etag = await self._send_then_project(
            instance_id, self._send, commit.messages, commit.record, record_etag, can_wait
        )
        self._fault("projected", instance_id)
        self._remember(instance_id, _Cached(commit.history, record_etag, commit.view))

    async def _send_then_project(
        self,
        instance_id: str,
        send: Callable[[Sequence[WorkMessage]], Awaitable[None]],
        messages: Sequence[WorkMessage],
        record: InstanceRecord | None,
        record_etag: str | None,
        can_wait: bool = False,
    ) -> str | None:
        """What a committed step owes, in order: its messages, then its Instances row, whose
        checkpoint tells a worker taking over that they were sent (``protocol.follow_up``). When
        they tell a parent its outcome, the row goes ahead of them too, marked as proving nothing
        sent, and is then written over that row only (protocol I8). Returns the row's ETag."""
        ahead = None
        if record is not None and protocol.row_goes_ahead(messages):
            ahead = dataclasses.replace(record, sends_pending=True)
            record_etag = await self.backend.write_instance(ahead, record_etag)
            self._fault("row-ahead", instance_id)
        await send(messages)
        self._fault("sent", instance_id)
        if record is None:
            return record_etag
        if ahead is not None:  # not over a row purged or started again meanwhile
            return await self.backend.update_instance(record, record_etag)
        if can_wait:
            self._hold_row(record)
            return record_etag
        return await self.backend.write_instance(record, record_etag)

    # -- Instances rows that can wait (protocol I6) ------------------------------------------------
    def _hold_row(self, record: InstanceRecord) -> None:
        due = self.clock() + timedelta(seconds=self.options.row_delay)
        self._held_rows[record.instance_id] = (record, due)
        if self.options.row_timer and self._row_writer is None:
            self._row_writer = asyncio.create_task(self._write_rows_when_due())

    async def _write_rows_when_due(self) -> None:
        try:
            while self._held_rows:
                await asyncio.sleep(self.options.row_delay)
                await self.write_held_rows()
        finally:
            self._row_writer = None

    @property
    def rows_due_at(self) -> datetime | None:
        """When the first held-back row is due (None: none is held back)."""
        return min((due for _, due in self._held_rows.values()), default=None)

    async def write_held_rows(self, everything: bool = False) -> int:
        """Write the held-back rows that are due (``everything``: all of them); how many were.
        One whose write fails stays held, for the next round (or the stop)."""
        now = self.clock()
        records = [record for record, at in self._held_rows.values() if everything or at <= now]
        writes = (self.backend.update_instance(r, self._record_etag(r.instance_id)) for r in records)
        written = 0
        for record, etag in zip(records, await _outcomes(*writes), strict=True):
            if isinstance(etag, Exception):
                log.warning("writing the Instances row of %s failed: %r", record.instance_id, etag)
                continue
            written += 1
            if self._held_rows.get(record.instance_id, (None,))[0] is record:  # not superseded meanwhile
                del self._held_rows[record.instance_id]
            cached = self._cache.get(record.instance_id)
            if cached is not None and etag is not None and cached.history.checkpoint == record.checkpoint:
                cached.record_etag = etag
        return written

    def _record_etag(self, instance_id: str) -> str | None:
        cached = self._cache.get(instance_id)
        return None if cached is None else cached.record_etag

    # -- handing over: messages between instances of partitions this process holds -------------
    async def _send(self, messages: Sequence[WorkMessage]) -> None:
        """Send ``messages``. Those due now for instances of partitions this process holds are
        sent hidden for a lease (``Backend.send_held``) and handed straight to their instances:
        no receive, no polling delay. The queue keeps them until they are settled, so a crash
        before that only delays them by the lease.

        They are handed over while their queue copies are being written: the receiver's step
        overlaps that send, and settling a delivery waits for its copy (``_Copy``). Until the
        copies are written this call does not return, so the sender's own deliveries stay
        unsettled: if the copies are lost (a crash, a failed send), the sender's step is taken
        up again and its messages re-derived from its committed history (I1), which the
        receivers de-duplicate (I2, I5) when they had applied them already."""
        local, remote = self._split_local(messages)
        if not local:
            await self.backend.send(remote)
            return
        loop, partitions = asyncio.get_running_loop(), self.backend.partition_count
        copies: dict[str, asyncio.Future[ReceivedMessage | None]] = {m.id: loop.create_future() for m in local}
        self._hand_over(
            [ReceivedMessage(queue_for(m, partitions), m, 0, _Copy(copies[m.id]), held=True) for m in local]
        )
        written: dict[str, ReceivedMessage] = {}
        try:
            sent, held = await _outcomes(
                self.backend.send(remote), self.backend.send_held(local, self.options.visibility_timeout)
            )
            if isinstance(held, list):
                written = {d.message.id: d for d in held}
            for outcome in (sent, held):
                if isinstance(outcome, Exception):
                    raise outcome
        finally:
            for message_id, copy in copies.items():
                copy.set_result(written.get(message_id))  # None: there is no copy to settle

    def _split_local(self, messages: Sequence[WorkMessage]) -> tuple[list[WorkMessage], list[WorkMessage]]:
        ownership = self.ownership
        if ownership is None or self._stopping:
            return [], list(messages)
        now, partitions = self.clock(), self.backend.partition_count
        local: list[WorkMessage] = []
        remote: list[WorkMessage] = []
        for message in messages:
            partition = partition_of(message.instance_id, partitions)
            here = (
                message.target is not MessageTarget.ACTIVITY
                and (message.visible_at is None or message.visible_at <= now)
                and ownership.holds(partition)
            )
            if here:
                ownership.worked(partition)  # work that never passes its queue keeps it held too
            (local if here else remote).append(message)
        return local, remote

    def _hand_over(self, held: Sequence[ReceivedMessage]) -> None:
        for delivery in held:
            self._handed_over.setdefault(delivery.message.instance_id, []).append(delivery)
        # In the order sent (not a set's): which instance's drain starts first must not depend on
        # string hashing, or a simulated run would not be a function of its seed.
        for instance_id in dict.fromkeys(d.message.instance_id for d in held):
            if instance_id in self._draining:
                continue
            self._draining.add(instance_id)
            task = asyncio.create_task(self._drain(instance_id))
            self._handovers.add(task)
            task.add_done_callback(self._handovers.discard)

    async def _drain(self, instance_id: str) -> None:
        """Process what was handed over to one instance: all that waits, as one step, until
        nothing does (so a burst of signals to an entity is still applied in a few steps)."""
        try:
            self._fault("handed-over", instance_id)
            while batch := self._handed_over.pop(instance_id, None):
                try:
                    # Their leases are kept while they wait for a slot. A slot's holder never waits
                    # for a drain, so waiting here holds nobody up.
                    leased = self.acks.holding(batch, self.options.visibility_timeout)
                    async with leased, self.step_slots or contextlib.nullcontext():
                        await self._dispatch(batch)
                except Exception:  # the step they joined was cut short, say: nobody else awaits this
                    log.warning("messages handed to %s were not processed; their queue copies bring them back",
                                instance_id, exc_info=True)  # fmt: skip
        finally:
            self._draining.discard(instance_id)

    async def finish_up(self, timeout: float = 10.0) -> None:
        """What a stopping process does before it gives its partitions back: stop handing messages
        over, give what was handed over ``timeout`` seconds to be processed (what is cut short
        comes back from its queue when its lease runs out), and write the rows held back."""
        self._stopping = True
        if self._handovers:
            _, unfinished = await asyncio.wait(set(self._handovers), timeout=timeout)
            for task in unfinished:
                task.cancel()
            await asyncio.gather(*unfinished, return_exceptions=True)
        if self._row_writer is not None:  # rows stay held until written: none is lost to this
            self._row_writer.cancel()
            await asyncio.gather(self._row_writer, return_exceptions=True)
        await self.write_held_rows(everything=True)

    async def _run_inline(self, commit: protocol.Commit) -> protocol.Commit:
        """While a committed step's only messages are work items for activities this worker has,
        run them here and commit the next step with their results, instead of a round trip
        through the work-item queue per activity.

        Each activity runs only after the commit that scheduled it, so no activity runs for a
        step that never became durable. A crash before the next commit leaves those work items
        unconfirmed in the last commit, so the next worker sends them (at least once). The
        inbound deliveries stay leased meanwhile (``LeaseKeeper``), as a work item's would."""
        if not self.options.inline_activities or not self._runs_inline(commit):
            return commit
        return await self._inline_chain(commit)

    def _runs_inline(self, commit: protocol.Commit) -> bool:
        """Only work items of the committed execution: those a continue-as-new carried over from
        the one before go through the queue, whose answers are checked against their execution."""
        work, execution = commit.messages, commit.history.execution_id
        alone = self.ownership is not None and self.ownership.alone
        most = self.options.inline_max_activities_alone if alone else self.options.inline_max_activities
        return (
            not commit.status.is_terminal
            and 0 < len(work) <= most
            and all(
                m.target is MessageTarget.ACTIVITY
                and m.execution_id == execution
                and self.registry.activity(m.event.name or "") is not None
                for m in work
            )
        )

    async def _inline_chain(self, commit: protocol.Commit) -> protocol.Commit:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.inline_budget
        while self._runs_inline(commit) and loop.time() < deadline:
            work = commit.messages
            completions = await asyncio.gather(*(self._execute_activity(m) for m in work))
            view = commit.view or protocol.read_orchestration(commit.history)
            invocation = Invocation("Orchestrator", _orchestration_name(view, None), view.instance_id)
            async with tracing.orchestration_step(view, [], []) as trace, self._invoking(invocation):
                following = protocol.continue_step(view, completions, self.registry.orchestrator, self.clock())
                invocation.failed = following.status is OrchestrationRuntimeStatus.Failed
                trace.finish(following)
            if not await self._commit(following):
                # Someone else moved the instance on (a terminate, say): report the results the
                # way a work-item worker would, and let the instance take or drop them.
                answers = zip(work, completions, strict=True)
                await self._send([protocol.completion_message(m, c) for m, c in answers])
                return dataclasses.replace(commit, messages=[])
            # Only the chain's last row is written: it may wait only if none before it had to be written.
            following.record_can_wait = following.record_can_wait and commit.record_can_wait
            commit = following
        return commit

    async def _try_entity_step(
        self, instance_id: str, deliveries: list[ReceivedMessage], attempt: int
    ) -> list[ReceivedMessage] | None:
        cached = self._cache.get(instance_id) or await self._load(instance_id)
        messages = [d.message for d in deliveries]
        now = self.clock()
        view = cached.entity
        plan = protocol.plan_entity(view, messages, now, self.options.entity_batch_size)
        commit = None
        if plan.applied:
            async with self._invoking(Invocation("Entity", view.entity.name, instance_id)):
                traced = tracing.entity_operations(self.registry.entity, [messages[i] for i in plan.applied])
                commit = protocol.step_entity(view, plan, messages, traced, now)
        if commit is not None:
            if not await self._commit(commit):
                return None
            await self._finish(commit, cached.record_etag)
        return await self._settle(instance_id, deliveries, plan)

    def _retry_delay(self, delivery: ReceivedMessage) -> float:
        """Growing delays between retries of a message whose processing keeps failing."""
        return min(self.options.retry_delay * 2.0**delivery.message.deferrals, self.options.max_retry_delay)

    def _fault(self, point: str, instance_id: str) -> None:
        if self.options.fault_hook is not None:
            self.options.fault_hook(point, instance_id)

    async def _load(self, instance_id: str, cached: _Cached | None = None) -> _Cached:
        """Read an instance's history. Unless it is what ``cached`` (this worker's own last
        commit) already holds, settle what its last step may still owe first."""
        history = await self.backend.load_history(instance_id)
        if cached is not None and cached.history.etag == history.etag:
            return cached
        if protocol.has_unconfirmed_step(history):
            record = await self.backend.read_instance(instance_id)
            owed = protocol.follow_up(history, record, self.clock())
            if owed is not None:
                await self._send_then_project(instance_id, self.backend.send, owed.messages, owed.record, None)
        cached = _Cached(history)
        self._remember(instance_id, cached)
        return cached

    def _remember(self, instance_id: str, cached: _Cached) -> None:
        self._cache[instance_id] = cached
        self._cache.move_to_end(instance_id)
        while len(self._cache) > self.options.cache_size:
            self._cache.popitem(last=False)

    async def _settle(
        self, instance_id: str, deliveries: Sequence[ReceivedMessage], plan: protocol.Plan
    ) -> list[ReceivedMessage]:
        """Settle a planned batch: send the releases owed and put back what waits; returns the
        deliveries applied or dropped, for ``_acknowledge``."""
        for index, reason in plan.dropped:
            message = deliveries[index].message
            kind = message.event.event_type.value
            log.info("dropped %s message %s for %s: %s", kind, message.id, instance_id, reason)
        if plan.releases:
            log.info("%s: releasing %d entities locked for a critical section that will not use them",
                     instance_id, len(plan.releases))  # fmt: skip
            await self._send(plan.releases)
        await asyncio.gather(*(self.acks.later(deliveries[i], delay) for i, delay in plan.deferred))
        return [deliveries[i] for i in plan.applied] + [deliveries[i] for i, _ in plan.dropped]


def _orchestration_name(view: protocol.OrchestrationView, plan: protocol.Plan | None) -> str:
    """The orchestrator a step runs: a new execution's (start, continue-as-new, restart) or the current one's."""
    events = plan.events if plan is not None else []
    started = next((e for e in events if e.event_type is EventType.EXECUTION_STARTED), view.started)
    return (started.name if started is not None else None) or ""


def _only_starts(messages: Sequence[WorkMessage]) -> bool:
    """Only fresh client starts: ``start_new`` just created the instance (its Pending row's ETag
    rides along). Sub-orchestration starts may be re-sent for finished children: those are read."""
    return all(m.event.event_type is EventType.EXECUTION_STARTED and m.record_etag is not None for m in messages)


class Acknowledger(Protocol):
    """Who settles a delivery once the worker is done with it."""

    async def done(self, delivery: ReceivedMessage) -> None: ...

    async def later(self, delivery: ReceivedMessage, delay: float) -> None:
        """Deliver the message again after ``delay`` seconds."""

    async def failed(self, deliveries: Sequence[ReceivedMessage], error: Exception, delays: Sequence[float]) -> None:
        """Processing raised (a storage fault, say): deliver each message again after its delay.
        Such retries never count towards poisoning: a message is only poisoned when the
        process handling it keeps dying (its dequeue count grows without a retry being posted)."""

    async def poison(self, delivery: ReceivedMessage | PoisonedMessage, reason: str) -> None: ...

    async def extend(self, delivery: ReceivedMessage, seconds: float) -> None:
        """Keep the message invisible ``seconds`` longer: it is still being worked on."""


def deferred_copy(message: WorkMessage, delay: float, now: datetime) -> WorkMessage:
    """The same message (same id, so still recognisable as a duplicate), visible after ``delay``."""
    visible_at = now + timedelta(seconds=delay)
    return dataclasses.replace(message, visible_at=visible_at, deferrals=message.deferrals + 1)


async def _outcomes(*awaitables: Awaitable[T]) -> list[T | Exception]:
    """Await ``awaitables`` side by side: each one's result, or the Exception it raised. A
    cancellation (anything not an Exception) is raised once all of them are over."""
    outcomes = await asyncio.gather(*awaitables, return_exceptions=True)
    for outcome in outcomes:
        if not isinstance(outcome, Exception) and isinstance(outcome, BaseException):
            raise outcome
    return cast("list[T | Exception]", outcomes)


@dataclass(eq=False)
class _Copy:
    """The receipt of a message handed over before its queue copy was written (``Worker._send``):
    the copy as written, or None when it was not (the send failed or was cut short)."""

    written: asyncio.Future[ReceivedMessage | None]


async def _queue_copy(delivery: ReceivedMessage) -> ReceivedMessage | None:
    """The delivery as its queue holds it; for one handed over early, once its copy is written."""
    receipt = delivery.receipt
    return await asyncio.shield(receipt.written) if isinstance(receipt, _Copy) else delivery


class QueueAcknowledger:
    """The worker's own polling loop: settle deliveries on the queue they came from."""

    def __init__(self, backend: Backend, clock: Clock = utcnow) -> None:
        self.backend = backend
        self.clock = clock

    async def done(self, delivery: ReceivedMessage) -> None:
        copy = await _queue_copy(delivery)
        if copy is not None:
            await self.backend.delete(copy)

    async def later(self, delivery: ReceivedMessage, delay: float) -> None:
        # Re-post rather than release: releasing would count towards the poison limit, and a
        # message deferred on purpose (a timer due in weeks) is not failing.
        await self.backend.send([deferred_copy(delivery.message, delay, self.clock())])
        await self.done(delivery)

    async def failed(self, deliveries: Sequence[ReceivedMessage], error: Exception, delays: Sequence[float]) -> None:
        for delivery, delay in zip(deliveries, delays, strict=True):
            try:
                await self.later(delivery, delay)
            except Exception:  # storage is failing too: the visibility timeout brings it back
                log.warning("could not put message %s back for a retry", delivery.message.id, exc_info=True)

    async def poison(self, delivery: ReceivedMessage | PoisonedMessage, reason: str) -> None:
        copy = await _queue_copy(delivery) if isinstance(delivery, ReceivedMessage) else delivery
        if copy is not None:
            await self.backend.poison(copy, reason)

    async def extend(self, delivery: ReceivedMessage, seconds: float) -> None:
        copy = await _queue_copy(delivery)
        if copy is not None:
            await self.backend.release(copy, seconds)


class HeldApart:
    """Settles the deliveries this process handed itself (``Backend.send_held``) on their queue,
    and the others through ``received`` (the Functions host's way, in its mode)."""

    def __init__(self, received: Acknowledger, queue: QueueAcknowledger) -> None:
        self.received = received
        self.queue = queue

    def _of(self, delivery: ReceivedMessage | PoisonedMessage) -> Acknowledger:
        return self.queue if isinstance(delivery, ReceivedMessage) and delivery.held else self.received

    async def done(self, delivery: ReceivedMessage) -> None:
        await self._of(delivery).done(delivery)

    async def later(self, delivery: ReceivedMessage, delay: float) -> None:
        await self._of(delivery).later(delivery, delay)

    async def failed(self, deliveries: Sequence[ReceivedMessage], error: Exception, delays: Sequence[float]) -> None:
        for acks in (self.queue, self.received):
            mine = [(d, t) for d, t in zip(deliveries, delays, strict=True) if self._of(d) is acks]
            if mine:
                await acks.failed([d for d, _ in mine], error, [t for _, t in mine])

    async def poison(self, delivery: ReceivedMessage | PoisonedMessage, reason: str) -> None:
        await self._of(delivery).poison(delivery, reason)

    async def extend(self, delivery: ReceivedMessage, seconds: float) -> None:
        await self._of(delivery).extend(delivery, seconds)


@dataclass(eq=False)
class _Held:
    delivery: ReceivedMessage
    renewal: asyncio.Task[None] | None = None  # the renewal in flight, if any


class LeaseKeeper:
    """The worker's acknowledger: settles deliveries through ``inner`` and, until it does,
    keeps the deliveries it holds leased.

    A batch the polling loop received is held (``holding``) while it is processed: from half its
    lease on, and every half lease after, each of its deliveries not settled yet is extended by a
    full lease (``Acknowledger.extend``). So a long activity, inline chain or step keeps its
    messages, while those of a worker that died are seen again within one lease; work that ends
    within half a lease (nearly all of it) costs no renewal. Settling a delivery stops its
    renewal and first waits for one in flight, so that the settling request carries the receipt
    the renewal returned."""

    def __init__(self, inner: Acknowledger) -> None:
        self.inner = inner
        self._held: dict[int, _Held] = {}  # by id() of the delivery

    @contextlib.asynccontextmanager
    async def holding(
        self, deliveries: Sequence[ReceivedMessage | PoisonedMessage], lease: float
    ) -> AsyncIterator[None]:
        """Renew ``deliveries`` (received with ``lease``) until each is settled or the block ends."""
        held = [_Held(d) for d in deliveries if isinstance(d, ReceivedMessage)]
        if not held:
            yield
            return
        for entry in held:
            self._held[id(entry.delivery)] = entry
        stop = asyncio.Event()
        keeper = asyncio.create_task(self._keep(held, lease, stop))
        try:
            yield
        finally:
            stop.set()
            await keeper
            for entry in held:
                if self._held.get(id(entry.delivery)) is entry:
                    del self._held[id(entry.delivery)]

    async def _keep(self, held: list[_Held], lease: float, stop: asyncio.Event) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=lease / 2)
            due = [entry for entry in held if self._held.get(id(entry.delivery)) is entry]
            if stop.is_set() or not due:
                return
            for entry in due:
                entry.renewal = asyncio.create_task(self._renew(entry.delivery, lease))
            await asyncio.gather(*(entry.renewal for entry in due if entry.renewal is not None))

    async def _renew(self, delivery: ReceivedMessage, lease: float) -> None:
        try:
            await self.extend(delivery, lease)
        except Exception:  # tried again in half a lease, when the message may be taken (at least once)
            log.warning("could not renew the lease of message %s", delivery.message.id, exc_info=True)

    async def _settling(self, delivery: ReceivedMessage | PoisonedMessage) -> None:
        entry = self._held.pop(id(delivery), None)
        if entry is not None and entry.renewal is not None and not entry.renewal.done():
            await asyncio.wait([entry.renewal])

    async def done(self, delivery: ReceivedMessage) -> None:
        await self._settling(delivery)
        await self.inner.done(delivery)

    async def later(self, delivery: ReceivedMessage, delay: float) -> None:
        await self._settling(delivery)
        await self.inner.later(delivery, delay)

    async def failed(self, deliveries: Sequence[ReceivedMessage], error: Exception, delays: Sequence[float]) -> None:
        for delivery in deliveries:
            await self._settling(delivery)
        await self.inner.failed(deliveries, error, delays)

    async def poison(self, delivery: ReceivedMessage | PoisonedMessage, reason: str) -> None:
        await self._settling(delivery)
        await self.inner.poison(delivery, reason)

    async def extend(self, delivery: ReceivedMessage, seconds: float) -> None:
        await self.inner.extend(delivery, seconds)
