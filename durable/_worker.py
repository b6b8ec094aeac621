"""The worker: moves instances forward by reading queues, running steps and committing them.

This is the only part of the engine that does I/O. For each batch of control-queue messages of
one instance it follows DESIGN §4: load (or reuse the cached) history, drop duplicates, run the
step, commit history + outbox marker under the sentinel's ETag, send the outbox, project the
Instances row, and only then delete the inbound messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

from . import _serialization as serialization
from ._app import FunctionRegistry
from ._backend import (
    MAX_QUEUE_DELAY_SECONDS,
    WORK_ITEM_QUEUE,
    Backend,
    ConcurrencyConflict,
    InstanceHistory,
    PoisonedMessage,
    ReceivedMessage,
    control_queue,
)
from ._entities import (
    ENTITY_EXECUTION,
    EntityId,
    EntityRequest,
    EntitySnapshot,
    entity_message,
    execute_entity_step,
    is_entity_id,
)
from ._history import (
    ACTION_EVENT_TYPES,
    COMPLETION_EVENT_TYPES,
    EventType,
    FailureDetails,
    HistoryEvent,
    started_event,
    utcnow,
)
from ._messages import MessageTarget, WorkMessage
from ._outbox import outbound_messages
from ._replay import StepResult, execute_step
from ._status import InstanceRecord, OrchestrationRuntimeStatus, project_instance

log = logging.getLogger("durable.worker")

Clock = Callable[[], datetime]

MAX_VISIBILITY_DELAY = timedelta(seconds=MAX_QUEUE_DELAY_SECONDS)
_PENDING = OrchestrationRuntimeStatus.Pending
MAX_START_WAITS = 10  # deferrals of a message for an instance that has not started (about 4 minutes)


@dataclass
class WorkerOptions:
    batch_size: int = 32
    visibility_timeout: float = 300.0
    max_dequeue_count: int = 5
    max_concurrent_activities: int = 16
    idle_poll_min: float = 0.05
    idle_poll_max: float = 2.0  # an idle worker polls each queue at most every 2 s
    cache_size: int = 1000
    retry_delay: float = 1.0  # before a message whose processing failed is seen again
    # Run a step's activities in this worker when they are all it asks for (see Worker._run_inline).
    inline_activities: bool = True
    inline_max_activities: int = 16  # larger fan-outs go through the work-item queue
    inline_budget: float = 5.0  # seconds of inline work before committing anyway
    entity_batch_size: int = 32  # messages an entity applies in one step; the rest wait for the next
    # Fault injection for chaos tests: called with a point name ("committed", "sent",
    # "projected", "activity-reported") and the instance id as processing passes that point.
    fault_hook: Callable[[str, str], None] | None = None


@dataclass
class _Cached:
    history: InstanceHistory
    record_etag: str | None = None  # of the Instances row as this worker last wrote it


@dataclass
class _Plan:
    """What to do with one instance's batch of deliveries."""

    apply: list[HistoryEvent] = field(default_factory=list)
    applied: list[ReceivedMessage] = field(default_factory=list)
    dropped: list[ReceivedMessage] = field(default_factory=list)
    deferred: list[tuple[ReceivedMessage, float]] = field(default_factory=list)
    new_execution: bool = False
    rewind: bool = False
    # Releases owed to entities whose lock was granted to this instance after it had ended.
    releases: list[WorkMessage] = field(default_factory=list)


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
        self.acks = acks or QueueAcknowledger(backend, clock)
        self._cache: OrderedDict[str, _Cached] = OrderedDict()
        # one step at a time per instance in this worker: the lock and how many hold or await it
        self._instance_locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self._activity_slots = asyncio.Semaphore(self.options.max_concurrent_activities)

    # -- loops ---------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Poll until ``stop`` is set; each queue backs off on its own while it is empty."""
        pollers: list[Callable[[], Awaitable[int]]] = [
            functools.partial(self.run_partition_once, p) for p in range(self.backend.partition_count)
        ]
        pollers.append(self.run_activities_once)
        await asyncio.gather(*(self._poll_loop(stop, once) for once in pollers))

    async def _poll_loop(self, stop: asyncio.Event, once: Callable[[], Awaitable[int]]) -> None:
        delay = self.options.idle_poll_min
        while not stop.is_set():
            try:
                handled = await once()
            except Exception:
                log.exception("worker poll failed; retrying")
                handled = 0
            if handled:
                delay = self.options.idle_poll_min
                continue
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)
            delay = min(delay * 2, self.options.idle_poll_max)

    async def run_once(self) -> int:
        """Poll every queue once and process what arrived; returns the number of messages."""
        counts = await asyncio.gather(self.run_orchestrations_once(), self.run_activities_once())
        return sum(counts)

    async def run_until_idle(self, max_rounds: int = 10_000) -> None:
        """Process messages until no queue has a visible message (for tests and scripts)."""
        for _ in range(max_rounds):
            if not await self.run_once():
                return
        raise RuntimeError(f"still busy after {max_rounds} rounds")

    async def run_orchestrations_once(self) -> int:
        counts = await asyncio.gather(*(self.run_partition_once(p) for p in range(self.backend.partition_count)))
        return sum(counts)

    async def run_partition_once(self, partition: int) -> int:
        """Receive one batch from a control queue and process it, instances in parallel."""
        batch = await self.backend.receive(
            control_queue(partition), self.options.batch_size, self.options.visibility_timeout
        )
        by_instance: dict[str, list[ReceivedMessage]] = {}
        for delivery in batch:
            if await self._screen(delivery):
                assert isinstance(delivery, ReceivedMessage)
                by_instance.setdefault(delivery.message.instance_id, []).append(delivery)
        await asyncio.gather(*(self._process_instance(i, d) for i, d in by_instance.items()))
        return len(batch)

    async def run_activities_once(self) -> int:
        batch = await self.backend.receive(
            WORK_ITEM_QUEUE, self.options.max_concurrent_activities, self.options.visibility_timeout
        )
        runnable = [d for d in batch if await self._screen(d)]
        await asyncio.gather(*(self._run_activity(d) for d in runnable))  # type: ignore[arg-type]
        return len(batch)

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
    async def _run_activity(self, delivery: ReceivedMessage) -> None:
        message = delivery.message
        keep_leased = asyncio.create_task(self._keep_leased(delivery))
        try:
            completion = await self._execute_activity(message)
        finally:
            keep_leased.cancel()
        try:
            await self.backend.send(
                [WorkMessage(MessageTarget.ORCHESTRATION, message.instance_id, completion, message.execution_id,
                             id=completion.message_id or "")]
            )  # fmt: skip
            self._fault("activity-reported", message.instance_id)
            await self.acks.done(delivery)
        except Exception as exc:
            log.exception("could not report activity %s of %s; it will run again", completion.name, message.instance_id)
            await self.acks.failed([delivery], exc, self.options.retry_delay)

    async def _keep_leased(self, delivery: ReceivedMessage) -> None:
        """Renew a running activity's hold on its message, so that a long activity is not
        delivered to another worker halfway through."""
        period = self.options.visibility_timeout / 2
        while True:
            await asyncio.sleep(period)
            try:
                await self.acks.extend(delivery, self.options.visibility_timeout)
            except Exception:
                log.warning("could not renew the lease of %s", delivery.message.id, exc_info=True)

    async def _execute_activity(self, message: WorkMessage) -> HistoryEvent:
        """Run the activity a work item asks for; its completion event (result or failure)."""
        scheduled = message.event
        activity = self.registry.activities.get(scheduled.name or "")
        result: str | None = None
        failure: FailureDetails | None = None
        if activity is None:
            failure = FailureDetails("FunctionNotFound", f"no activity function named '{scheduled.name}'")
        else:
            try:
                async with self._activity_slots:
                    value = await activity.invoke(serialization.decode(scheduled.input))
                result = serialization.encode(value)
            except Exception as exc:
                failure = FailureDetails.from_exception(exc)
        return HistoryEvent(
            EventType.TASK_FAILED if failure else EventType.TASK_COMPLETED,
            self.clock(),
            name=scheduled.name,
            task_scheduled_id=scheduled.event_id,
            result=result,
            failure=failure,
            message_id=f"{message.id}/result",  # the id its completion message would have
        )

    # -- orchestrations --------------------------------------------------------------------------
    async def process_delivery(self, delivery: ReceivedMessage | PoisonedMessage) -> None:
        """Process one message on its own (the Functions host's queue triggers call this)."""
        if not await self._screen(delivery):
            return
        assert isinstance(delivery, ReceivedMessage)
        if delivery.message.target is MessageTarget.ACTIVITY:
            await self._run_activity(delivery)
        else:
            await self._process_instance(delivery.message.instance_id, [delivery])

    async def _process_instance(self, instance_id: str, deliveries: list[ReceivedMessage]) -> None:
        limit = self.options.entity_batch_size
        if is_entity_id(instance_id) and len(deliveries) > limit:  # the rest waits for the next step
            await asyncio.gather(*(self.acks.later(d, 0.0) for d in deliveries[limit:]))
            deliveries = deliveries[:limit]
        lock, users = self._instance_locks.get(instance_id, (asyncio.Lock(), 0))
        self._instance_locks[instance_id] = (lock, users + 1)
        try:
            async with lock:
                for attempt in range(10):
                    if await self._try_step(instance_id, deliveries, attempt):
                        return
                raise ConcurrencyConflict(f"{instance_id}: gave up after repeated commit conflicts")
        except Exception as exc:
            log.exception("processing %s failed; its messages will be retried", instance_id)
            self._cache.pop(instance_id, None)
            await self.acks.failed(deliveries, exc, self.options.retry_delay)
        finally:
            lock, users = self._instance_locks[instance_id]
            if users > 1:
                self._instance_locks[instance_id] = (lock, users - 1)
            else:
                del self._instance_locks[instance_id]

    async def _try_step(self, instance_id: str, deliveries: list[ReceivedMessage], attempt: int = 0) -> bool:
        """One attempt; False when the commit lost a race and the step must be redone."""
        if is_entity_id(instance_id):
            return await self._try_entity_step(instance_id, deliveries)
        cached = self._cache.get(instance_id)
        fresh = cached is None
        if cached is None and attempt == 0 and _only_starts(deliveries):
            # Almost always a new instance: skip the read; if it does exist, the create-only
            # commit conflicts and the next attempt loads it.
            cached, fresh = _Cached(InstanceHistory(instance_id)), False
        elif cached is None:
            cached = await self._load(instance_id)
        now = self.clock()
        plan = _plan(cached.history, deliveries, now)
        if not plan.apply and not fresh:
            # Nothing new according to the cache; make sure against storage before dropping.
            cached = await self._load(instance_id, cached)
            plan = _plan(cached.history, deliveries, now)
        if not plan.apply:
            await self._settle(instance_id, plan)
            return True

        history = cached.history
        base, reopened_at = history.events, None
        if plan.new_execution:
            base = []
        elif plan.rewind:
            base, reopened_at = _rewound(history.events)
        result = execute_step(self.registry.orchestrator, base, plan.apply, now)
        events = base[: result.keep] + result.events
        # Rows that change: only the new ones, unless the history was rewritten (restart, rewind).
        keep = result.keep if base is history.events and result.keep == len(base) else 0
        # Events whose messages are unconfirmed: this step's, and after a rewind the reopened tasks'.
        outbox_start = min(result.keep, reopened_at if reopened_at is not None else result.keep)
        result, events, outbox_start, rewritten = await self._run_inline(instance_id, result, events, outbox_start)
        if rewritten:
            keep = 0
        checkpoint = history.checkpoint + 1
        try:
            etag = await self.backend.commit(
                instance_id,
                expected_etag=history.etag,
                execution_id=result.execution_id,
                keep=keep,
                new_events=events[keep:],
                outbox_start=outbox_start,
                checkpoint=checkpoint,
            )
        except ConcurrencyConflict:
            log.info("commit conflict on %s; reloading", instance_id)
            self._cache.pop(instance_id, None)
            return False

        committed = InstanceHistory(instance_id, events, etag, result.execution_id, outbox_start, checkpoint)
        self._fault("committed", instance_id)
        await self.backend.send(
            _unconfirmed_messages(instance_id, result.execution_id, result.started, events, outbox_start)
        )
        self._fault("sent", instance_id)
        # Written after every step, even when the status did not change: its checkpoint tells
        # the next worker to load this instance that the sends are done (see _load).
        record_etag = cached.record_etag or next((d.message.record_etag for d in plan.applied), None)
        record_etag = await self._project(instance_id, events, checkpoint, now, record_etag)
        self._fault("projected", instance_id)
        self._remember(instance_id, _Cached(committed, record_etag))
        await self._settle(instance_id, plan)
        return True

    async def _run_inline(
        self, instance_id: str, result: StepResult, events: list[HistoryEvent], outbox_start: int
    ) -> tuple[StepResult, list[HistoryEvent], int, bool]:
        """While a step's only messages are work items for activities this worker has, run them
        here and feed their results into the next step, all before one commit.

        This saves the work-item and completion queue round trips and one commit per activity.
        It keeps the guarantees: nothing is committed until the chain ends, so a crash replays
        from the last commit (activities run at least once) and the inbound messages, deleted
        only after the commit, come back. Returns the last step, the history, where its
        unconfirmed messages start, and whether the history was rewritten (continue-as-new)."""
        rewritten = False
        if not self.options.inline_activities:
            return result, events, outbox_start, rewritten
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.inline_budget
        while not result.status.is_terminal and loop.time() < deadline:
            outbound = _unconfirmed_messages(instance_id, result.execution_id, result.started, events, outbox_start)
            if not outbound or len(outbound) > self.options.inline_max_activities:
                break
            if any(m.target is not MessageTarget.ACTIVITY or m.event.name not in self.registry.activities
                   for m in outbound):  # fmt: skip
                break
            completions = await asyncio.gather(*(self._execute_activity(m) for m in outbound))
            result = execute_step(self.registry.orchestrator, events, completions, self.clock())
            if result.keep != len(events):  # continued as new: a fresh history
                events, outbox_start, rewritten = list(result.events), 0, True
            else:
                events, outbox_start = events + result.events, len(events)
        return result, events, outbox_start, rewritten

    async def _try_entity_step(self, instance_id: str, deliveries: list[ReceivedMessage]) -> bool:
        cached = self._cache.get(instance_id) or await self._load(instance_id)
        history = cached.history
        messages = [d.message for d in deliveries if d.message.event.event_type is EventType.ENTITY_MESSAGE]
        if len(messages) < len(deliveries):
            log.warning(
                "dropped %d non-entity message(s) sent to entity %s", len(deliveries) - len(messages), instance_id
            )
        now = self.clock()
        entity = EntityId.from_instance_id(instance_id)
        before = EntitySnapshot.from_events(history.events)
        result = execute_entity_step(
            self.registry.entity, entity, EntitySnapshot.from_events(history.events), messages, now
        )
        if result.snapshot == before:
            await self._settle(instance_id, _Plan(dropped=list(deliveries)))  # only duplicates: nothing to commit
            return True
        events = [result.snapshot.to_event(now)]
        checkpoint = history.checkpoint + 1
        outbox_start = 0  # pending until the Instances row shows the step finished (see _load)
        try:
            etag = await self.backend.commit(
                instance_id, expected_etag=history.etag, execution_id=ENTITY_EXECUTION, keep=0,
                new_events=events, outbox_start=outbox_start, checkpoint=checkpoint,
            )  # fmt: skip
        except ConcurrencyConflict:
            self._cache.pop(instance_id, None)
            return False
        self._fault("committed", instance_id)
        await self.backend.send(result.outbox)
        self._fault("sent", instance_id)
        await self.backend.write_instance(result.snapshot.record(entity, checkpoint, now))
        self._fault("projected", instance_id)
        committed = InstanceHistory(instance_id, events, etag, ENTITY_EXECUTION, outbox_start, checkpoint)
        self._remember(instance_id, _Cached(committed))
        await self._settle(instance_id, _Plan(applied=list(deliveries)))
        return True

    def _fault(self, point: str, instance_id: str) -> None:
        if self.options.fault_hook is not None:
            self.options.fault_hook(point, instance_id)

    async def _project(
        self,
        instance_id: str,
        events: Sequence[HistoryEvent],
        checkpoint: int,
        now: datetime,
        etag: str | None = None,
    ) -> str | None:
        """Write the Instances row for ``events``; returns its new ETag."""
        record = project_instance(instance_id, events, checkpoint, now)
        return None if record is None else await self.backend.write_instance(record, etag)

    async def _load(self, instance_id: str, cached: _Cached | None = None) -> _Cached:
        """Read an instance's history. Unless it is what ``cached`` (this worker's own last
        commit) already holds, finish its last step's follow-up first."""
        history = await self.backend.load_history(instance_id)
        if cached is not None and cached.history.etag == history.etag:
            return cached
        if history.exists and history.outbox_start < len(history.events):
            # The last step was committed by someone else. Its follow-up is done when the
            # Instances row has caught up with it, since every step writes that row after its
            # sends. Otherwise its worker may have died after the commit: send its messages again
            # (receivers drop duplicates) and write the row.
            record = await self.backend.read_instance(instance_id)
            # (A Pending row is the client's, written before any step: it proves nothing.)
            if record is None or record.checkpoint < history.checkpoint or record.runtime_status is _PENDING:
                messages, projected = _follow_up(instance_id, history, self.clock())
                await self.backend.send(messages)
                if projected is not None:
                    await self.backend.write_instance(projected)
        cached = _Cached(history)
        self._remember(instance_id, cached)
        return cached

    def _remember(self, instance_id: str, cached: _Cached) -> None:
        self._cache[instance_id] = cached
        self._cache.move_to_end(instance_id)
        while len(self._cache) > self.options.cache_size:
            self._cache.popitem(last=False)

    async def _settle(self, instance_id: str, plan: _Plan) -> None:
        for delivery in plan.dropped:
            log.info(
                "dropped %s message %s for %s (duplicate, stale or for a finished instance)",
                delivery.message.event.event_type.value,
                delivery.message.id,
                instance_id,
            )
        if plan.releases:
            log.info("%s ended before its lock was granted: releasing %d entities", instance_id, len(plan.releases))
            await self.backend.send(plan.releases)
        await asyncio.gather(*(self.acks.done(d) for d in plan.applied + plan.dropped))
        await asyncio.gather(*(self.acks.later(d, delay) for d, delay in plan.deferred))


def _release_late_lock(grant: HistoryEvent, message: WorkMessage) -> list[WorkMessage]:
    """Release messages for every entity of a lock set whose grant reached an execution that has
    ended (or been replaced by continue-as-new) and so will never leave its critical section."""
    try:
        lock = json.loads(grant.result or "[]")
    except ValueError:
        return []
    release = EntityRequest("release", owner=message.instance_id)
    return [entity_message(target, release, grant.timestamp, f"{message.id}/release/{target}") for target in lock]


def _follow_up(
    instance_id: str, history: InstanceHistory, now: datetime
) -> tuple[list[WorkMessage], InstanceRecord | None]:
    """What a committed step still owes the world: its outbound messages and its Instances row."""
    if is_entity_id(instance_id):
        snapshot = EntitySnapshot.from_events(history.events)
        return snapshot.outbox_messages(), snapshot.record(
            EntityId.from_instance_id(instance_id), history.checkpoint, now
        )
    started = started_event(history.events)
    if started is None:
        return [], None
    execution_id = history.execution_id or ""
    messages = _unconfirmed_messages(instance_id, execution_id, started, history.events, history.outbox_start)
    return messages, project_instance(instance_id, history.events, history.checkpoint, now)


def _unconfirmed_messages(
    instance_id: str, execution_id: str, started: HistoryEvent, events: Sequence[HistoryEvent], start: int
) -> list[WorkMessage]:
    """The outbound messages of ``events[start:]``, less those of actions already completed (after
    a rewind the range holds tasks that had succeeded: they must not run again)."""
    closed = {e.completed_task_id for e in events if e.event_type in COMPLETION_EVENT_TYPES}
    pending = [
        e
        for e in events[start:]
        if not (e.event_type in ACTION_EVENT_TYPES and e.execution_id is None and e.event_id in closed)
    ]
    messages = outbound_messages(instance_id, execution_id, started, pending)
    ended = next((e for e in pending if e.event_type is EventType.EXECUTION_COMPLETED), None)
    if ended is not None:
        messages += _leftover_lock_releases(instance_id, execution_id, events, ended.timestamp)
    return messages


def _leftover_lock_releases(
    instance_id: str, execution_id: str, events: Sequence[HistoryEvent], now: datetime
) -> list[WorkMessage]:
    """Releases for entities an ended execution still holds by its history. Normally none: the
    code's critical section released them; but code that diverged from its history (and so
    failed) could not record its releases."""
    requests = {
        e.event_id: e
        for e in events
        if e.event_type is EventType.EVENT_SENT and e.name == "lock" and e.execution_id is None
    }
    held: set[str] = set()
    for event in events:
        if (
            event.event_type is EventType.TASK_COMPLETED
            and event.name == "lock"
            and event.task_scheduled_id in requests
        ):
            held |= set(EntityRequest.from_json(requests[event.task_scheduled_id].input).lock or [])
        elif event.event_type is EventType.EVENT_SENT and event.name == "release":
            held.discard(event.instance_id or "")
    release = EntityRequest("release", owner=instance_id)
    return [
        entity_message(target, release, now, f"{instance_id}/{execution_id}/leftover-release/{target}")
        for target in sorted(held)
    ]


def _only_starts(deliveries: Sequence[ReceivedMessage]) -> bool:
    """Only fresh client starts: ``start_new`` just created the instance (its Pending row's ETag
    rides along). Sub-orchestration starts may be re-sent for finished children: those are read."""
    return all(
        d.message.event.event_type is EventType.EXECUTION_STARTED and d.message.record_etag is not None
        for d in deliveries
    )


def _rewound(events: Sequence[HistoryEvent]) -> tuple[list[HistoryEvent], int | None]:
    """A failed execution's history with its activity failures taken out, so that replay finds
    those activities pending again; and the index of the first one."""
    # Activities can run again. A failed entity call cannot (the entity already applied its
    # sequence number), nor a failed sub-orchestration (its instance, finished, would drop the
    # start; children are not rewound recursively): those failures stand.
    retryable = {e.event_id for e in events if e.event_type is EventType.TASK_SCHEDULED and e.execution_id is None}
    failures = (EventType.TASK_FAILED, EventType.SUB_ORCHESTRATION_FAILED)

    def reopened(event: HistoryEvent) -> bool:
        return event.event_type in failures and event.task_scheduled_id in retryable

    kept = [e for e in events if not reopened(e) and e.event_type is not EventType.EXECUTION_COMPLETED]
    reopened_ids = {e.task_scheduled_id for e in events if reopened(e)}
    first = (i for i, e in enumerate(kept) if e.event_id in reopened_ids and e.event_type in ACTION_EVENT_TYPES)
    return kept, next(first, None)


def _plan(history: InstanceHistory, deliveries: Sequence[ReceivedMessage], now: datetime) -> _Plan:
    """Sort a batch into events to apply, duplicates/stale messages to drop and early ones to defer."""
    plan = _Plan()
    execution_id = history.execution_id
    completion = next((e for e in reversed(history.events) if e.event_type is EventType.EXECUTION_COMPLETED), None)
    terminal = completion is not None
    failed = completion is not None and completion.runtime_status == OrchestrationRuntimeStatus.Failed.value
    started = history.exists and bool(history.events)
    open_ids: set[int] = set()
    closed_ids: set[int] = set()
    seen_messages: set[str] = set()
    for event in history.events:
        if event.event_type in ACTION_EVENT_TYPES:
            open_ids.add(event.event_id)
        elif event.event_type in COMPLETION_EVENT_TYPES:
            closed_ids.add(event.completed_task_id)  # type: ignore[arg-type]
        if event.message_id:
            seen_messages.add(event.message_id)

    for delivery in deliveries:
        message, event = delivery.message, delivery.message.event
        kind = event.event_type
        if kind is EventType.EXECUTION_STARTED:
            if (started and not terminal) or message.id in seen_messages:
                plan.dropped.append(delivery)
                continue
            # A new instance, or a finished one started again under the same id.
            plan.new_execution = started
            started, terminal, execution_id = True, False, event.execution_id
            open_ids, closed_ids = set(), set()
        elif not started:
            if message.deferrals >= MAX_START_WAITS:
                log.warning("dropped %s for %s: the instance never started", kind.value, history.instance_id)
                plan.dropped.append(delivery)
            else:  # sent before the instance's start message was processed: try again shortly
                plan.deferred.append((delivery, min(2.0**message.deferrals, 30.0)))
            continue
        elif kind is EventType.EXECUTION_REWOUND:
            if not failed or message.id in seen_messages or plan.apply:
                plan.dropped.append(delivery)  # only a failed instance rewinds, and alone
                continue
            plan.rewind, terminal, failed = True, False, False
        elif terminal or message.id in seen_messages:
            plan.dropped.append(delivery)
            if terminal and kind is EventType.TASK_COMPLETED and event.name == "lock":
                plan.releases += _release_late_lock(event, message)
            continue
        elif kind in COMPLETION_EVENT_TYPES:
            task_id = event.completed_task_id
            if message.execution_id != execution_id or task_id not in open_ids or task_id in closed_ids:
                plan.dropped.append(delivery)
                if message.execution_id != execution_id and kind is EventType.TASK_COMPLETED and event.name == "lock":
                    plan.releases += _release_late_lock(event, message)  # granted to an execution now gone
                continue
            if kind is EventType.TIMER_FIRED and event.fire_at is not None and event.fire_at > now:
                # Delivered early (queue visibility is capped at 7 days): wait some more.
                remaining = min(event.fire_at - now, MAX_VISIBILITY_DELAY)
                plan.deferred.append((delivery, remaining.total_seconds()))
                continue
            closed_ids.add(task_id)
        seen_messages.add(message.id)
        plan.apply.append(event.replace(message_id=message.id))
        plan.applied.append(delivery)
        if kind is EventType.EXECUTION_TERMINATED:
            terminal = True
    return plan


class Acknowledger(Protocol):
    """Who settles a delivery once the worker is done with it."""

    async def done(self, delivery: ReceivedMessage) -> None: ...

    async def later(self, delivery: ReceivedMessage, delay: float) -> None:
        """Deliver the message again after ``delay`` seconds."""

    async def failed(self, deliveries: Sequence[ReceivedMessage], error: Exception, delay: float) -> None:
        """Processing raised; the messages must be retried."""

    async def poison(self, delivery: ReceivedMessage | PoisonedMessage, reason: str) -> None: ...

    async def extend(self, delivery: ReceivedMessage, seconds: float) -> None:
        """Keep the message invisible ``seconds`` longer: it is still being worked on."""


def deferred_copy(message: WorkMessage, delay: float, now: datetime) -> WorkMessage:
    """The same message (same id, so still recognisable as a duplicate), visible after ``delay``."""
    visible_at = now + timedelta(seconds=delay)
    return dataclasses.replace(message, visible_at=visible_at, deferrals=message.deferrals + 1)


class QueueAcknowledger:
    """The worker's own polling loop: settle deliveries on the queue they came from."""

    def __init__(self, backend: Backend, clock: Clock = utcnow) -> None:
        self.backend = backend
        self.clock = clock

    async def done(self, delivery: ReceivedMessage) -> None:
        await self.backend.delete(delivery)

    async def later(self, delivery: ReceivedMessage, delay: float) -> None:
        # Re-post rather than release: releasing would count towards the poison limit, and a
        # message deferred on purpose (a timer due in weeks) is not failing.
        await self.backend.send([deferred_copy(delivery.message, delay, self.clock())])
        await self.backend.delete(delivery)

    async def failed(self, deliveries: Sequence[ReceivedMessage], error: Exception, delay: float) -> None:
        for delivery in deliveries:
            try:
                await self.backend.release(delivery, delay)
            except Exception:  # the visibility timeout brings it back anyway
                log.warning("could not release message %s", delivery.message.id, exc_info=True)

    async def poison(self, delivery: ReceivedMessage | PoisonedMessage, reason: str) -> None:
        await self.backend.poison(delivery, reason)

    async def extend(self, delivery: ReceivedMessage, seconds: float) -> None:
        await self.backend.release(delivery, seconds)
