"""The instance protocol: the one reading of a committed instance, and the rules of a step.

Everything the runtime decides about an instance is decided here, from its committed history
(an orchestration) or snapshot (an entity), without I/O:

- ``read_orchestration`` / ``read_entity`` derive, in one pass, what the rules need: execution id
  and lineage, status, open and closed tasks, the message ids already applied, the locks held and
  requested, and what the last committed step still owes (messages, Instances row);
- ``plan_orchestration`` / ``plan_entity`` sort a batch of deliveries into applied, dropped (as
  duplicate or stale), deferred (early, or for an instance that has not started) — and owe a
  release for every lock grant that will never be used;
- ``step_orchestration`` / ``step_entity`` run the step and return the ``Commit``: the history to
  write, the messages to send once it is durable and the Instances row to project;
- ``follow_up`` says what a committed step still owes when a worker takes an instance over.

The worker (``_worker``) is the I/O shell around these functions.

Invariants. The README's guarantees rest on these; each names the tests that check it
(``G::`` is tests/test_guarantees.py).

I1  A step is durable all at once or not at all, and its messages are a function of the committed
    history: they are sent only after the commit and re-derived (same ids) when a worker takes
    over an instance whose Instances row lags behind its checkpoint (``follow_up``). No work runs
    that no committed history scheduled: inline activities run after the commit that scheduled them.
    tests/test_delivery.py::test_crash_between_commit_and_send_*, tests/test_azure_end_to_end.py
    (SIGKILL at every point), G::test_an_inline_activity_of_a_step_that_loses_to_a_terminate_never_runs,
    tests/test_inline_activities.py::test_a_crash_after_a_commit_reruns_only_that_steps_activity
I2  A message is applied at most once per instance id. Applied message ids are part of the
    history and carried into every later execution (continue-as-new, restart, rewind) on its
    ExecutionStarted, bounded by ``DEDUP_WINDOW`` and ``MAX_CARRIED_IDS``; answers (completions,
    timers, replies) are scoped to the execution that asked and dropped as stale anywhere else;
    work re-sent after a rewind gets new ids, so its answers are never taken for the failures the
    rewind took out (whose ids stay known). tests/test_delivery.py::test_duplicate_*,
    G::test_an_event_redelivered_after_continue_as_new_is_not_applied_twice,
    G::test_a_failure_redelivered_after_a_rewind_does_not_fail_the_rewound_run
I3  Every delivered message ends applied, dropped with a reason, or deferred — never silently
    lost: a message early for its due time (any kind: timers, scheduled signals) is put back; one
    for an instance that has not started waits (bounded); events that arrive after the code
    continued as new go to the next execution (a terminate ends it), and so do the actions of the
    step that continued; a terminate for an instance whose start was lost applies to its Pending row.
    A message whose processing fails (a storage fault) is retried with growing delays, never
    poisoned for it (``Worker._retry_delay``; tests/test_delivery.py::test_message_failing_*).
    G::test_a_terminate_in_the_same_batch_as_a_continue_as_new_event_terminates,
    G::test_an_entity_signal_scheduled_ten_days_ahead_is_applied_on_day_ten,
    G::test_work_scheduled_without_waiting_before_continue_as_new_still_runs,
    G::test_start_new_retried_after_its_send_failed_succeeds,
    G::test_a_continue_as_new_loop_that_never_waits_fails_the_instance
I4  Lock safety: a lock is owned by one critical section of one execution (``lock_owner``).
    Entities change the holder only on a grant or release from that exact owner. A grant that
    will never be used — for an ended, replaced, purged or never-started execution, or consumed by
    nobody — is answered with a release for exactly that owner; an ending execution releases what
    its history says it holds (even when its code diverged). Protocol messages are told apart by
    a kind no user name can take. tests/test_entities.py (critical sections),
    G::test_a_late_lock_grant_to_a_replaced_execution_does_not_break_mutual_exclusion,
    G::test_locks_granted_to_a_terminated_and_purged_orchestration_are_released,
    G::test_entity_operations_named_lock_and_release_are_ordinary_operations
I5  Entity operations apply exactly once and in order per sender. A sender is one execution of an
    orchestration or one incarnation of an entity, so a re-created sender never collides with the
    numbers of an earlier one; a batch of duplicates changes nothing and commits nothing. An
    ending execution retires itself as a sender (in sequence), so entities forget its counter.
    tests/test_entities.py (duplicates and reordering),
    G::test_signals_of_an_entity_deleted_purged_and_used_again_are_applied,
    G::test_an_entity_step_that_sees_only_duplicates_commits_nothing,
    G::test_an_entity_forgets_the_counters_of_senders_that_ended
I6  The Instances row is a projection of the history carrying its checkpoint; a projection never
    replaces a newer row, nor the Pending row of a newer start (restart). It always shows what
    the history does: a step that changes nothing the row shows and sends no work item may
    leave its row for later (``Commit.record_can_wait``: a worker holding partitions writes it
    ``row_delay`` seconds on, or when it stops, unless a later step's row comes first; a late
    row only updates one of its own execution), so the row's checkpoint may lag behind such
    steps only. A worker that loads an instance whose row lags sends that step's messages
    again (I1; receivers de-duplicate, I2/I5) and writes the row; work items are never among
    them, so no activity runs again for it.
    tests/test_storage_contract.py (checkpoint order; a late row of a finished run never
    replaces its restart's Pending row, ``may_replace``),
    G::test_a_restarted_id_never_reports_the_previous_run_as_its_status,
    tests/test_instance_rows.py, the conformance simulation's at-rest check (``outcome_at_rest``)
I7  A step continues the live execution (extended session) that its predecessor left only for
    the very history that step committed: the session travels on the committed view, is taken
    by the first step computed from it (a step whose commit then fails takes it along), is not
    kept when the history was rewritten (carried state, restart, rewind, continue-as-new) and
    is ignored unless it applied exactly that history; so a step commits what a full replay of
    the history would. A worker that loads an instance replays it.
    tests/test_sessions.py (every step of five programs both ways),
    tests/test_orchestration_api.py::test_new_uuid_is_deterministic_across_replays
I8  A parent never learns a child's outcome before the child's Instances row shows it: a step
    that ends an execution and tells its parent (``row_goes_ahead``) writes its row before its
    messages, marked ``sends_pending`` — a row that proves nothing sent, so a worker taking over
    sends them again (I1), the same way — then writes it again unmarked, as an update of that
    execution's row (never a new row, nor over a new start's). A marked row never replaces the
    unmarked row of its step (``may_replace``: a late marker would take back the proof of the
    sends), and is not ``finished``: a purge or a start for its id is refused with a clear error
    until the row is written again (unless its history is gone: a late writer put it back after
    a purge, and nobody will).
    G::test_a_child_row_shows_its_outcome_before_its_parent_learns_it,
    G::test_a_crash_after_a_row_written_ahead_still_tells_the_parent,
    G::test_a_row_written_ahead_of_a_purged_history_blocks_nothing,
    tests/test_storage_contract.py::test_a_terminal_row_with_sends_pending_is_not_replaced_by_a_start,
    the conformance simulation (``check_outcomes_shown`` as it runs, and at rest)
Rewind retries the activity failures that ended a run (those after which the code took no
action); anything else is refused with a clear error (``rewindable``).
G::test_an_orchestration_that_retried_or_handled_a_failure_completes_after_rewind,
tests/test_regressions.py::test_rewind_*
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from ._entities import (
    ENTITY_EXECUTION,
    EntityFunction,
    EntityId,
    EntityRequest,
    EntitySnapshot,
    entity_message,
    execute_entity_step,
    is_entity_id,
    lock_owner,
)
from ._history import (
    ACTION_EVENT_TYPES,
    COMPLETION_EVENT_TYPES,
    EventType,
    FailureDetails,
    HistoryEvent,
    InstanceHistory,
)
from ._messages import DEDUP_WINDOW, MAX_QUEUE_DELAY_SECONDS, MessageKind, MessageTarget, WorkMessage
from ._outbox import outbound_messages
from ._replay import Orchestrator, ReplaySession, execute_step
from ._status import InstanceRecord, OrchestrationRuntimeStatus, project_instance, shows_the_same

# Applied message ids carried into later executions: those applied within DEDUP_WINDOW, at most
# this many (the newest).
MAX_CARRIED_IDS = 1000
MAX_LINEAGE = 16  # earlier execution ids remembered (starts for them are duplicates)
# Deferrals of a message for an instance that has not started: about 3 minutes, or 48 while its
# Pending row exists (its start message is on its way, or was lost: see terminate_pending).
MAX_START_WAITS = 10
# A message visible this little before its due time is on time (clocks of queue and worker differ).
EARLY_TOLERANCE = timedelta(milliseconds=500)

_S = OrchestrationRuntimeStatus
# Messages that are not answers to an execution's own actions: their ids are what de-duplicates them.
_UNSCOPED = frozenset(
    {
        EventType.EXECUTION_STARTED,
        EventType.EVENT_RAISED,
        EventType.EXECUTION_TERMINATED,
        EventType.EXECUTION_SUSPENDED,
        EventType.EXECUTION_RESUMED,
        EventType.EXECUTION_REWOUND,
    }
)
# What may wait for an instance that has not started yet (sent before its start was processed).
_MAY_PRECEDE_START = frozenset({EventType.EVENT_RAISED, EventType.EXECUTION_SUSPENDED, EventType.EXECUTION_RESUMED})


# -- carried state ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CarriedState:
    """What an execution inherits from the earlier ones under its instance id (kept on its
    ExecutionStarted event): the message ids they applied, and their execution ids."""

    applied: dict[str, datetime] = field(default_factory=dict)
    lineage: tuple[str, ...] = ()

    def to_json(self) -> str | None:
        if not self.applied and not self.lineage:
            return None
        applied = {message_id: at.isoformat() for message_id, at in self.applied.items()}
        return json.dumps({"applied": applied, "lineage": list(self.lineage)}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | None) -> CarriedState:
        if not text:
            return cls()
        data = json.loads(text)
        applied = {message_id: datetime.fromisoformat(at) for message_id, at in data.get("applied", {}).items()}
        return cls(applied, tuple(data.get("lineage", ())))

    def bounded(self, now: datetime) -> CarriedState:
        recent = sorted((at, message_id) for message_id, at in self.applied.items() if at >= now - DEDUP_WINDOW)
        return CarriedState(
            {message_id: at for at, message_id in recent[-MAX_CARRIED_IDS:]}, self.lineage[-MAX_LINEAGE:]
        )


# -- reading an orchestration -------------------------------------------------------------------------
@dataclass
class OrchestrationView:
    """An orchestration's committed history, read once."""

    history: InstanceHistory
    started: HistoryEvent | None = None
    completed: HistoryEvent | None = None
    suspended: bool = False
    open_tasks: set[int] = field(default_factory=set)  # actions of this execution without an answer
    closed_tasks: set[int] = field(default_factory=set)
    applied: dict[str, datetime] = field(default_factory=dict)  # message id -> when applied
    lineage: tuple[str, ...] = ()
    rewinds: int = 0
    lock_requests: dict[int, list[str]] = field(default_factory=dict)  # lock action id -> lock set
    held: dict[str, set[str]] = field(default_factory=dict)  # lock owner -> entities still held
    failures: list[int] = field(default_factory=list)  # indexes of activity failures
    # The applied ids a later execution inherits: those this one inherited, and its unscoped ones.
    inheritable: dict[str, datetime] = field(default_factory=dict)
    # The live execution the step that committed this history left (see ``step_orchestration``).
    session: ReplaySession | None = field(default=None, repr=False, compare=False)
    # The Instances row this history projects, as the step that committed it projected it.
    projection: InstanceRecord | None = field(default=None, repr=False, compare=False)

    @property
    def instance_id(self) -> str:
        return self.history.instance_id

    @property
    def events(self) -> list[HistoryEvent]:
        return self.history.events

    @property
    def execution_id(self) -> str | None:
        return self.started.execution_id if self.started is not None else None

    @property
    def is_started(self) -> bool:
        return self.history.exists and self.started is not None

    @property
    def is_terminal(self) -> bool:
        return self.completed is not None

    @property
    def status(self) -> OrchestrationRuntimeStatus | None:
        if not self.is_started:
            return None
        if self.completed is not None:
            return _S(self.completed.runtime_status or _S.Failed.value)
        return _S.Suspended if self.suspended else _S.Running

    def carried(self) -> CarriedState:
        """The state a later execution inherits from this one."""
        lineage = self.lineage + ((self.execution_id,) if self.execution_id else ())
        return CarriedState(dict(self.inheritable), lineage)


def read_orchestration(history: InstanceHistory) -> OrchestrationView:
    view = OrchestrationView(history)
    step_time: datetime | None = None
    for index, event in enumerate(history.events):
        kind = event.event_type
        if kind is EventType.ORCHESTRATOR_STARTED:
            step_time = event.timestamp
        elif kind is EventType.EXECUTION_STARTED:
            view.started = event
            carried = CarriedState.from_json(event.carried)
            view.applied.update(carried.applied)
            view.inheritable.update(carried.applied)
            view.lineage = carried.lineage
        elif kind is EventType.EXECUTION_COMPLETED:
            view.completed = event
        elif kind is EventType.EXECUTION_SUSPENDED:
            view.suspended = True
        elif kind is EventType.EXECUTION_RESUMED:
            view.suspended = False
        elif kind is EventType.EXECUTION_REWOUND:
            view.rewinds += 1
        elif kind in ACTION_EVENT_TYPES and event.execution_id is None:
            view.open_tasks.add(event.event_id)
            if kind is EventType.EVENT_SENT:
                _read_lock_action(view, event)
        elif kind in COMPLETION_EVENT_TYPES:
            task_id = event.completed_task_id
            if task_id is not None:
                view.closed_tasks.add(task_id)
                view.open_tasks.discard(task_id)
                if kind is EventType.TASK_FAILED:
                    view.failures.append(index)
                lock = view.lock_requests.get(task_id) if kind is EventType.TASK_COMPLETED else None
                if lock is not None:
                    view.held[lock_owner(view.instance_id, view.execution_id or "", task_id)] = set(lock)
        if event.message_id:
            view.applied[event.message_id] = step_time or event.timestamp
            if kind in _UNSCOPED:
                view.inheritable[event.message_id] = view.applied[event.message_id]
    return view


def _read_lock_action(view: OrchestrationView, event: HistoryEvent) -> None:
    """Lock requests and releases are told apart by the request's kind, never by a name."""
    if event.name not in ("lock", "release"):  # cheap filter: a protocol message has one of these names
        return
    try:
        request = EntityRequest.from_json(event.input)
    except ValueError:
        return
    if request.kind == "lock":
        view.lock_requests[event.event_id] = list(request.lock or [])
    elif request.kind == "release" and request.owner in view.held:
        view.held[request.owner].discard(event.instance_id or "")


# -- planning ------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """What to do with each message of a batch (by index in the batch)."""

    applied: list[int] = field(default_factory=list)
    events: list[HistoryEvent] = field(default_factory=list)  # what the applied messages become
    dropped: list[tuple[int, str]] = field(default_factory=list)  # and why
    deferred: list[tuple[int, float]] = field(default_factory=list)  # and for how many seconds
    releases: list[WorkMessage] = field(default_factory=list)  # for grants that will never be used
    new_execution: bool = False  # the history is replaced by a new execution (restart)
    rewind: bool = False
    grants: dict[str, WorkMessage] = field(default_factory=dict)  # applied lock grants by message id
    # A terminate for an instance whose start has not been processed, applied to its Pending row.
    terminate_pending: InstanceRecord | None = None

    @property
    def changes_history(self) -> bool:
        return bool(self.applied)


def _early_by(message: WorkMessage, now: datetime) -> float | None:
    """Seconds until a message is due, when it surfaced early (queues cap delays at 7 days)."""
    if message.visible_at is None or message.visible_at - now <= EARLY_TOLERANCE:
        return None
    return min((message.visible_at - now).total_seconds(), MAX_QUEUE_DELAY_SECONDS)


def plan_orchestration(
    view: OrchestrationView,
    messages: Sequence[WorkMessage],
    now: datetime,
    pending: InstanceRecord | None = None,
) -> Plan:
    """Sort a batch for an orchestration. ``pending``: the instance's Pending row, which the
    caller reads only when the instance has not started and a non-start message came."""
    plan = Plan()
    started, terminal = view.is_started, view.is_terminal
    failed = view.status is _S.Failed
    execution_id = view.execution_id
    open_tasks, closed_tasks = set(view.open_tasks), set(view.closed_tasks)
    seen = set(view.applied)
    known_executions = set(view.lineage) | ({execution_id} if execution_id else set())

    def drop(index: int, reason: str) -> None:
        plan.dropped.append((index, reason))
        message = messages[index]
        if message.kind is MessageKind.LOCK_GRANT and not (
            message.execution_id == execution_id and not terminal and message.event.completed_task_id in closed_tasks
        ):  # a grant nobody will use (a duplicate of one in use is just a duplicate)
            plan.releases += release_grant(message)

    for index, message in enumerate(messages):
        event, kind = message.event, message.event.event_type
        early = _early_by(message, now)
        if early is not None:
            plan.deferred.append((index, early))
            continue
        if message.id in seen:
            drop(index, "duplicate")
            continue
        if kind is EventType.EXECUTION_STARTED:
            if event.execution_id in known_executions:
                drop(index, "duplicate start")
                continue
            if started and not terminal:
                drop(index, "already running")
                continue
            # A new instance, or a finished one started again under the same id.
            plan.new_execution = plan.new_execution or started
            started, terminal, failed = True, False, False
            if execution_id:
                known_executions.add(execution_id)
            execution_id = event.execution_id
            open_tasks, closed_tasks = set(), set()
        elif not started:
            if kind is EventType.EXECUTION_TERMINATED and pending is not None and not plan.applied:
                plan.terminate_pending = pending
                started, execution_id = True, pending.execution_id
                known_executions.add(pending.execution_id or "")
            elif kind in _MAY_PRECEDE_START or kind is EventType.EXECUTION_TERMINATED:
                # Sent before the start was processed: wait for it, longer while a Pending row
                # says a start is on its way; drop it once no start came for long enough.
                waits = MAX_START_WAITS * (10 if pending is not None else 1)
                if message.deferrals < waits:
                    plan.deferred.append((index, min(2.0**message.deferrals, 30.0)))
                else:
                    drop(index, "the instance never started")
                continue
            else:
                drop(index, "no such instance")
                continue
        elif kind is EventType.EXECUTION_REWOUND:
            if not failed or plan.applied:
                drop(index, "only a failed instance rewinds, and in a step of its own")
                continue
            if not rewindable(view):
                drop(index, "nothing to rewind: no activity failure ends the history")
                continue
            plan.rewind, terminal, failed = True, False, False
        elif terminal:
            drop(index, f"instance is {view.status.value if view.status else 'finished'}")
            continue
        elif kind in COMPLETION_EVENT_TYPES:
            task_id = event.completed_task_id
            if message.execution_id != execution_id:
                drop(index, "for another execution")
                continue
            if task_id not in open_tasks or task_id in closed_tasks:
                drop(index, "no open task")
                continue
            closed_tasks.add(task_id)
            if message.kind is MessageKind.LOCK_GRANT:
                plan.grants[message.id] = message
        seen.add(message.id)
        plan.applied.append(index)
        plan.events.append(event.replace(message_id=message.id))
        if kind is EventType.EXECUTION_TERMINATED:
            terminal = True  # after a terminate before the start, too: everything else is dropped
    return plan


def release_grant(grant: WorkMessage) -> list[WorkMessage]:
    """Releases for every entity of a granted lock set, for exactly the grant's owner."""
    try:
        lock = json.loads(grant.event.result or "[]")
    except ValueError:
        return []
    if not isinstance(lock, list):
        return []
    owner = lock_owner(grant.instance_id, grant.execution_id or "", grant.event.completed_task_id or 0)
    release = EntityRequest("release", owner=owner)
    return [
        entity_message(target, release, grant.event.timestamp, f"{grant.id}/release/{target}")
        for target in lock
        if isinstance(target, str)
    ]


# -- activities -------------------------------------------------------------------------------------
def activity_completion(
    work_item: WorkMessage, result: str | None, failure: FailureDetails | None, now: datetime
) -> HistoryEvent:
    """The answer to a work item: its completion event, with the id its message has."""
    scheduled = work_item.event
    return HistoryEvent(
        EventType.TASK_FAILED if failure else EventType.TASK_COMPLETED,
        now,
        name=scheduled.name,
        task_scheduled_id=scheduled.event_id,
        result=result,
        failure=failure,
        message_id=f"{work_item.id}/result",
    )


def completion_message(work_item: WorkMessage, completion: HistoryEvent) -> WorkMessage:
    """The message that takes a work item's answer back to its orchestration (and execution)."""
    return WorkMessage(MessageTarget.ORCHESTRATION, work_item.instance_id, completion, work_item.execution_id,
                       id=completion.message_id or "")  # fmt: skip


# -- rewind ------------------------------------------------------------------------------------------
def _reopenable(view: OrchestrationView) -> list[int]:
    """Indexes of the activity failures a rewind retries: those after which the code took no
    action. A failure the code went on from (retried, or caught and handled) stays in history,
    so replay takes the same path; retrying it would change what the code did next."""
    activities = {
        e.event_id for e in view.events if e.event_type is EventType.TASK_SCHEDULED and e.execution_id is None
    }
    last_action = max(
        (i for i, e in enumerate(view.events) if e.event_type in ACTION_EVENT_TYPES and e.execution_id is None),
        default=-1,
    )
    return [i for i in view.failures if i > last_action and view.events[i].task_scheduled_id in activities]


def rewindable(view: OrchestrationView) -> bool:
    """A Failed orchestration can be rewound when an activity failure ended it."""
    return view.status is _S.Failed and bool(_reopenable(view))


def _rewound(view: OrchestrationView) -> tuple[list[HistoryEvent], int]:
    """The history with its final activity failures (and the failed ending) taken out, so that
    replay finds those activities pending again; and where the first of them was scheduled."""
    reopened = set(_reopenable(view))
    reopened_ids = {view.events[i].task_scheduled_id for i in reopened}
    kept = [
        e for i, e in enumerate(view.events) if i not in reopened and e.event_type is not EventType.EXECUTION_COMPLETED
    ]
    first = next(
        i for i, e in enumerate(kept) if e.event_type is EventType.TASK_SCHEDULED and e.event_id in reopened_ids
    )
    return kept, first


# -- the step ------------------------------------------------------------------------------------------
@dataclass
class Commit:
    """A step's result: the history to commit, then what to send and project once it is durable."""

    history: InstanceHistory  # as it will be once committed (etag filled in by the caller)
    keep: int  # stored rows kept; the rest of ``history.events`` is written
    messages: list[WorkMessage]
    record: InstanceRecord | None
    status: OrchestrationRuntimeStatus
    view: OrchestrationView | None = None  # orchestrations: the committed history, read
    record_can_wait: bool = False  # ``record`` may be written later, or superseded (see I6)

    @property
    def new_events(self) -> list[HistoryEvent]:
        return self.history.events[self.keep :]


OUTCOMES_TO_PARENT = frozenset({EventType.SUB_ORCHESTRATION_COMPLETED, EventType.SUB_ORCHESTRATION_FAILED})


def row_goes_ahead(messages: Sequence[WorkMessage]) -> bool:
    """Whether a committed step's Instances row is written before its messages too (I8): they
    tell a parent this execution's outcome. Both a step and its follow-up go by this."""
    return any(m.event.event_type in OUTCOMES_TO_PARENT for m in messages)


def step_orchestration(
    view: OrchestrationView,
    plan: Plan,
    resolve: Callable[[str], Orchestrator | None],
    now: datetime,
) -> Commit:
    """Run the step ``plan`` asks for and return its commit."""
    history = view.history
    if plan.terminate_pending is not None:
        return _terminate_before_start(view, plan, plan.terminate_pending, now)
    base, reopened_at = view.events, None
    if plan.new_execution:
        base = []
    elif plan.rewind:
        base, reopened_at = _rewound(view)
    # A view's session is used once, whatever this step does (it changes as the step runs).
    session, view.session = view.session, None
    result = execute_step(resolve, base, plan.events, now, session if base is view.events else None)
    events = base[: result.keep] + result.events
    # Rows that change: only the new ones, unless the history was rewritten (restart, rewind).
    keep = result.keep if base is view.events else 0
    carried = keep == 0 and (view.is_started or bool(result.continued_from))
    if carried:
        _carry_into(events, view, plan, result.continued_from, now)
    # Events whose messages are unconfirmed: this step's, and after a rewind the reopened tasks'.
    outbox_start = result.keep if reopened_at is None else min(result.keep, reopened_at)
    committed = InstanceHistory(
        history.instance_id, events, history.etag, result.execution_id, outbox_start, history.checkpoint + 1
    )
    new_view = read_orchestration(committed)
    if not carried and result.keep == len(base):  # the session saw exactly ``events`` (I7)
        new_view.session = result.session
    messages = owed_messages(new_view)
    for event in result.unconsumed:  # grants that reached an execution already continued as new
        grant = plan.grants.get(event.message_id or "")
        if grant is not None:
            messages += release_grant(grant)
    record = project_instance(history.instance_id, events, committed.checkpoint, now)
    shown = view.projection
    if shown is None and view.is_started:
        shown = project_instance(history.instance_id, view.events, history.checkpoint, now)
    new_view.projection = record
    return Commit(committed, keep, messages, record, result.status, new_view, _record_can_wait(shown, record, messages))


def continue_step(
    view: OrchestrationView,
    completions: Sequence[HistoryEvent],
    resolve: Callable[[str], Orchestrator | None],
    now: datetime,
) -> Commit:
    """The next step of an orchestration whose last commit ``view`` is, fed with answers that
    did not come through a queue (activities this worker ran inline after that commit)."""
    plan = Plan(applied=list(range(len(completions))), events=list(completions))
    return step_orchestration(view, plan, resolve, now)


def _carry_into(
    events: list[HistoryEvent], view: OrchestrationView, plan: Plan, continued_from: Sequence[str], now: datetime
) -> None:
    """Stamp what the new history inherits onto its ExecutionStarted: the applied ids of the
    history it replaces (and of this batch), and the executions before it — those this very step
    continued from included (a start for one of them is a duplicate)."""
    carried = view.carried()
    applied = dict(carried.applied)
    if plan.rewind:  # the failures taken out stay known, so a late copy of one is a duplicate
        applied.update((view.events[i].message_id or "", now) for i in _reopenable(view))
    applied.update((e.message_id, now) for e in plan.events if e.message_id and e.event_type in _UNSCOPED)
    applied.pop("", None)
    for index, event in enumerate(events):
        if event.event_type is EventType.EXECUTION_STARTED:
            lineage = tuple(x for x in (*carried.lineage, *continued_from) if x != event.execution_id)
            state = CarriedState(applied, lineage).bounded(now)
            events[index] = event.replace(carried=state.to_json())
            return


def _terminate_before_start(view: OrchestrationView, plan: Plan, record: InstanceRecord, now: datetime) -> Commit:
    """A terminate that reached an instance whose start message was lost or is still on its way:
    the history records the start the Pending row describes, terminated at once (the start
    message, for that execution, is then a duplicate)."""
    terminate = plan.events[0]
    started = HistoryEvent(
        EventType.EXECUTION_STARTED,
        record.created_time,
        name=record.name,
        input=record.input,
        instance_id=record.instance_id,
        execution_id=record.execution_id,
    )
    events = [
        HistoryEvent(EventType.ORCHESTRATOR_STARTED, now),
        started,
        terminate,
        HistoryEvent(EventType.ORCHESTRATOR_COMPLETED, now),
        HistoryEvent(EventType.EXECUTION_COMPLETED, now, result=terminate.input, runtime_status=_S.Terminated.value),
    ]
    committed = InstanceHistory(
        view.instance_id, events, view.history.etag, record.execution_id, 0, view.history.checkpoint + 1
    )
    projected = project_instance(view.instance_id, events, committed.checkpoint, now)
    return Commit(committed, 0, [], projected, _S.Terminated)


# -- what a committed step owes -------------------------------------------------------------------------
def owed_messages(view: OrchestrationView) -> list[WorkMessage]:
    """The messages of ``events[outbox_start:]``, less those of actions already answered (after a
    rewind the range holds tasks that had succeeded: they must not run again); and, when the
    range ends the execution, releases of the locks its history still holds."""
    started = view.started
    if started is None:
        return []
    events = view.events
    pending = [
        e
        for e in events[view.history.outbox_start :]
        if not (e.event_type in ACTION_EVENT_TYPES and e.execution_id is None and e.event_id in view.closed_tasks)
    ]
    execution_id = view.execution_id or ""
    messages = outbound_messages(view.instance_id, execution_id, started, pending, view.rewinds)
    ended = next((e for e in pending if e.event_type is EventType.EXECUTION_COMPLETED), None)
    if ended is not None:
        for owner, entities in sorted(view.held.items()):
            release = EntityRequest("release", owner=owner)
            messages += [
                entity_message(target, release, ended.timestamp, f"{owner}/leftover-release/{target}")
                for target in sorted(entities)
            ]
    return messages


@dataclass
class FollowUp:
    messages: list[WorkMessage]
    record: InstanceRecord | None


def has_unconfirmed_step(history: InstanceHistory) -> bool:
    """Whether the last committed step may still owe messages or its Instances row."""
    return history.exists and history.outbox_start < len(history.events)


def follow_up(history: InstanceHistory, record: InstanceRecord | None, now: datetime) -> FollowUp | None:
    """What the last committed step still owes, judged by its Instances row: every step writes
    that row (with its checkpoint) after its sends, so a row that caught up proves them done —
    unless it was written ahead of them (I8) and not yet again."""
    if _row_proves_done(history, record):
        return None
    if is_entity_id(history.instance_id):
        view = read_entity(history)
        return FollowUp(view.snapshot.outbox_messages(), view.snapshot.record(view.entity, history.checkpoint, now))
    orchestration = read_orchestration(history)
    return FollowUp(
        owed_messages(orchestration), project_instance(history.instance_id, history.events, history.checkpoint, now)
    )


def _row_proves_done(history: InstanceHistory, record: InstanceRecord | None) -> bool:
    # The checkpoint alone decides: the client's Pending row of a new instance has checkpoint 0;
    # that of a restart carries the checkpoint of the finished run it replaces, whose last step
    # had written its row (its status was terminal) — whatever the execution ids say (a first
    # step may have continued as new).
    # A row written ahead of its step's messages (I8) proves nothing sent.
    return record is not None and record.checkpoint >= history.checkpoint and not record.sends_pending


# -- entities -----------------------------------------------------------------------------------------
@dataclass
class EntityView:
    history: InstanceHistory
    entity: EntityId
    snapshot: EntitySnapshot  # as committed: a step works on a copy of its own


def read_entity(history: InstanceHistory) -> EntityView:
    entity = EntityId.from_instance_id(history.instance_id)
    return EntityView(history, entity, EntitySnapshot.from_events(history.events))


def plan_entity(view: EntityView, messages: Sequence[WorkMessage], now: datetime, batch_size: int) -> Plan:
    """Sort a batch for an entity: its own messages up to ``batch_size`` are applied (the entity
    step de-duplicates and orders them per sender), early ones and the overflow wait."""
    plan = Plan()
    for index, message in enumerate(messages):
        early = _early_by(message, now)
        if early is not None:
            plan.deferred.append((index, early))
        elif message.event.event_type is not EventType.ENTITY_MESSAGE:
            plan.dropped.append((index, f"a {message.event.event_type.value} message is not for an entity"))
        elif len(plan.applied) >= batch_size:
            plan.deferred.append((index, 0.0))
        else:
            plan.applied.append(index)
    return plan


def step_entity(
    view: EntityView,
    plan: Plan,
    messages: Sequence[WorkMessage],
    resolve: Callable[[str], EntityFunction | None],
    now: datetime,
) -> Commit | None:
    """Apply the planned messages; None when they change nothing (all duplicates)."""
    working = EntitySnapshot.from_events(view.history.events)  # the step changes it in place
    result = execute_entity_step(resolve, view.entity, working, [messages[i] for i in plan.applied], now)
    if not result.outbox and _same_apart_from_outbox(view.snapshot, result.snapshot):
        return None
    history = view.history
    # outbox_start 0: pending until the Instances row shows the step finished (see follow_up)
    committed = InstanceHistory(
        history.instance_id, [result.snapshot.to_event(now)], history.etag, ENTITY_EXECUTION, 0, history.checkpoint + 1
    )
    record = result.snapshot.record(view.entity, committed.checkpoint, now)
    shown = view.snapshot.record(view.entity, history.checkpoint, now) if history.exists else None
    can_wait = _record_can_wait(shown, record, result.outbox)
    return Commit(committed, 0, list(result.outbox), record, record.runtime_status, record_can_wait=can_wait)


def _record_can_wait(
    shown: InstanceRecord | None, record: InstanceRecord | None, messages: Sequence[WorkMessage]
) -> bool:
    """I6: a step's Instances row may wait when it shows nothing new and a worker that loads the
    instance before it is written may send the step's messages again: never work items, whose
    activities would run again."""
    return (
        record is not None
        and shows_the_same(shown, record)
        and all(m.target is not MessageTarget.ACTIVITY for m in messages)
    )


def _same_apart_from_outbox(before: EntitySnapshot, after: EntitySnapshot) -> bool:
    return replace(before, outbox=[]) == replace(after, outbox=[])
