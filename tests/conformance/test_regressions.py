"""Runtime bugs the conformance simulation found, each kept as a regression test: the failing run
minimised (``tests.conformance.shrink``) and spelled out as program + schedule, and where the
scenario is clear, the same bug as a plain test of the runtime.

A test marked ``xfail`` is a bug that is NOT fixed yet: the mark names it. Once it is fixed the
plain test passes (strict: the suite then fails until the mark is removed); the replayed schedules
are not strict, since a change anywhere in the runtime may take the same seed down another path.

Bugs
----

``stale-pending-row`` (fixed in d2aba60): an instance whose first step continued as new (a
``continue_as_new`` that ran before the code first waited: a loop that only signals, or an inline
activity chain) and whose worker died after the commit but before writing the Instances row was
never followed up:
the client's Pending row keeps the first execution's id, the history has moved on to a later
execution, and ``protocol._row_proves_done`` takes a Pending row for *another* execution to be
a newer start (a restart) written after this run finished — so ``follow_up`` owes nothing. The
step's messages are never re-sent (its activities never run, its signals are lost) and the row
stays Pending forever (``wait_for_completion`` never returns). A Pending row is older than the
history exactly when its checkpoint is lower (a restart's Pending row carries the checkpoint of
the run it replaces), so ``record.checkpoint >= history.checkpoint`` alone decides correctly
(the fix).

``repeated-start-after-continue-as-new`` (fixed): ``start_new`` called again for an instance whose
Pending row is still there (what a caller does after a lost answer; ``_restart_pending`` re-sends
the start for the same execution, under a new message id) runs the orchestration a second time
when the first execution continued as new in its first step and the instance had finished before
the second start arrived. The copy should be dropped as a duplicate start by its execution id,
but the execution ids before a ``continue_as_new`` are recorded (``lineage``, via
``_carry_into``) only when the history being replaced had already started
(``step_orchestration``: ``if keep == 0 and view.is_started``): a brand-new instance that
continues as new within its first step keeps no lineage, so the first execution's id is unknown,
the finished instance takes the start for a restart, and every effect of the run (entity
operations, activities) happens twice.

``events-held-while-suspended-lost-on-continue-as-new`` (fixed): events that reach an instance
while it is suspended are held back (``_Execution.held_back``) and applied, in order, when it is
resumed (``_on_resumed``). If one of them lets the code finish with ``continue_as_new``, the ones
after it are dropped: ``_Execution.apply`` ignores everything once the outcome is terminal, and
they are neither in ``held_back`` (already swapped out) nor among the unconsumed events that
``_run_once`` carries into the next execution (that only catches new events *after* the one that
continued, ``leftover``). An event the next execution waits for is lost; it waits for ever.

``lock-overtakes-earlier-operation`` (fixed): an orchestration that signals (or calls) entity B
and then locks ``[A, B]`` can have its earlier operation applied to B *after* its critical
section, against FIFO per sender. The lock request reaches B from A (the request travels entity
to entity), so it can overtake the orchestration's own earlier message to B; B is then locked by
the section, and when the earlier message arrives (sequence number n, no lock owner: it was sent
before the section) the entity applies it in sequence but, since its owner is not the lock
holder, parks it behind the lock, while the section's own operations (n + 1, ...) go through.
Messages of the holder's own execution that precede the section could be let through (the code
cannot signal a locked entity inside the section, so they all precede it), or the lock could be
taken only once the requester's earlier messages have been applied.

``lock-overtakes-earlier-operation-behind-another-section`` (fixed; found by the long run at
seed 40363, no fault needed): the same inversion when B is locked by *another* orchestration's
section as the earlier message and the overtaking lock request arrive: both queue behind that
lock, the request first. When that section releases B, the request is served and the new holder
takes B; the entity then lets through what waits for the holder's section (messages naming it as
owner), but not the holder's own message from before the section, which stayed parked until the
section ended. The fix: that pass lets the holder's earlier messages through too
(``_sent_by_holder``, as on arrival).

``retried-start-runs-twice`` (fixed; came with 63e9eea, "an unsent start marks its Pending row
Failed"): when the send of the start message succeeds but its answer is lost,
``_abandon_start`` marks the Pending row Failed; the caller's retry then finds a terminal row,
``create_instance`` replaces it with a new execution, and a second start message goes out. If the
first run has finished by the time it arrives (one-step orchestrations, a batch size of 1), the
instance runs again. Before 63e9eea the retry found the Pending row and re-sent the same
execution's start, which the instance drops (unless it continued as new in its first step: the
bug above).

``held-completion-carried-into-the-next-execution`` (fixed: only events are carried, held answers
are stale and unconsumed; came with the fix of the bug
above, 54618d5): ``_on_resumed`` now leaves the held events after the one that continues as new
in ``held_back``, and ``_run_once`` carries ``held_back`` into the next execution whole. But
besides raised events, ``held_back`` holds the *answers* that reached the suspended execution
(activity results, timers, sub-orchestration and entity replies): carried over, such an answer
lands in the next execution's history right after its ExecutionStarted and completes whatever
task of the new execution has the same id (ids restart at 0 in each execution), and the real
answer is then dropped as being for a closed task. An orchestration that left an activity
running when it continued as new, and was suspended while that activity's result and the
event that let it continue arrived, takes the old execution's result for its own. Only the
kinds ``_CARRIED_OVER`` names (events, terminate, suspend, resume) should be carried; the held
answers are stale like the ``leftover`` ones (``StepResult.unconsumed``, whose lock grants are
released).

``inline-answer-of-an-earlier-execution`` (fixed: only the committed execution's work items run
inline): with inline activities, a step that continues
as new sends the previous execution's last actions (activities it started and did not wait for)
along with the new execution's, and when all of them are activities ``Worker._inline_chain`` runs
them itself and feeds every result to ``protocol.continue_step``, which applies them to the *new*
execution without the check ``plan_orchestration`` makes for queued answers ("for another
execution"). The old execution's answer for its task *n* closes the new execution's task *n*:
the new execution's work item for that id is then never sent (``owed_messages`` leaves out
answered tasks), so an activity a committed step scheduled never runs, and a new execution that
waits for its task *n* waits for ever (checked: it stays Running; had the old answer come after
the new task was opened, it would have taken the old result). Answers should be scoped to their execution
here too: run inline only the current execution's work items (send the others), or pass the
results through the same plan.

The fixes: a step records the executions it continued from in the lineage of the one it commits
(``StepResult.continued_from``); events held while suspended, after the one that continues as new,
go to the next execution (``_Execution._on_resumed``); an entity lets the lock holder's messages
sent before its critical section through (``_sent_by_holder``); ``start_new`` sends the same start
message again itself before giving up (``START_SEND_ATTEMPTS``), so a lost answer costs no second
execution.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta, timezone
from typing import cast

import pytest

import durable as df
from storage import Backend, InMemoryBackend

from .model import RaiseEvent, Start, Suspend
from .programs import Activity, Append, Call, FanOut, Orchestrator, Program, Section, Signal, Unawaited, WaitEvent
from .simulate import SimConfig, simulate

S = df.OrchestrationRuntimeStatus
REPEATED_START = "runtime bug repeated-start-after-continue-as-new (see this module's docstring): not fixed yet"
HELD_EVENTS = "runtime bug events-held-while-suspended-lost-on-continue-as-new (see the docstring): not fixed yet"
LOCK_OVERTAKES = "runtime bug lock-overtakes-earlier-operation (see this module's docstring): not fixed yet"
HELD_COMPLETION = "runtime bug held-completion-carried-into-the-next-execution (see the docstring): not fixed yet"
INLINE_ANSWER = "runtime bug inline-answer-of-an-earlier-execution (see the docstring): not fixed yet"
RETRIED_START = "runtime bug retried-start-runs-twice (see this module's docstring): not fixed yet"


async def assert_conforms(program: Program, config: SimConfig) -> None:
    logging.disable(logging.CRITICAL)
    try:
        result = await simulate(program, config)
    finally:
        logging.disable(logging.NOTSET)
    assert not result.violations, "\n".join([*result.violations, "faults:", *result.log])


class Died(BaseException):
    """The worker process died (not an error the worker could handle)."""


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        return self.now


async def test_a_worker_dying_after_a_first_step_that_continued_as_new_is_followed_up() -> None:
    app = df.DFApp()

    @app.orchestration_trigger(context_name="context")
    def twice(context: df.DurableOrchestrationContext):  # type: ignore[no-untyped-def]
        if context.get_input() == 0:
            context.continue_as_new(1)  # before the code waits for anything: in the first step
            return None
        return (yield context.call_activity("echo", "done"))

    @app.activity_trigger(input_name="value")
    async def echo(value: str) -> str:
        return value

    clock = Clock()
    backend = InMemoryBackend(partition_count=1, clock=clock)

    def die_after_the_commit(point: str, instance_id: str) -> None:
        raise Died(point)

    doomed = df.Worker(app.durable_functions, backend, clock=clock,
                       options=df.WorkerOptions(inline_activities=False, fault_hook=die_after_the_commit))  # fmt: skip
    client = df.DurableOrchestrationClient(backend, registry=app.durable_functions, clock=clock)
    await client.start_new("twice", "i", 0)
    with pytest.raises(Died):
        await doomed.run_once()  # committed execution 2 with its work item; sent nothing, wrote no row

    options = df.WorkerOptions(inline_activities=False)
    successor = df.Worker(app.durable_functions, backend, clock=clock, options=options)
    clock.now += timedelta(minutes=5)  # the dead worker's lease on the start message runs out
    await successor.run_until_idle()

    status = await client.get_status("i")
    assert status is not None
    assert (status.runtime_status, status.output) == (S.Completed, "done")


def counting_app() -> df.DFApp:
    """An orchestrator ``loop`` that adds 1 to ``counter@c`` per execution, for ``executions``
    executions chained by continue_as_new before it ever waits (all in its first step)."""
    app = df.DFApp()

    @app.orchestration_trigger(context_name="context")
    def loop(context: df.DurableOrchestrationContext):  # type: ignore[no-untyped-def]
        executions_left = context.get_input()
        context.signal_entity(df.EntityId("counter", "c"), "add", 1)
        if executions_left > 1:
            context.continue_as_new(executions_left - 1)
        return "done"
        yield  # a generator function that never waits

    @app.entity_trigger(context_name="context")
    def counter(context: df.DurableEntityContext) -> None:
        context.set_state(context.get_state(lambda: 0) + context.get_input())

    return app


async def counted(app: df.DFApp, client: df.DurableOrchestrationClient, worker: df.Worker) -> tuple[object, object]:
    await worker.run_until_idle()
    status = await client.get_status("i")
    state = await client.read_entity_state(df.EntityId("counter", "c"))
    return (status.runtime_status if status else None), state.entity_state


async def test_start_new_repeated_before_the_start_was_processed_runs_a_continue_as_new_loop_once() -> None:
    app, clock = counting_app(), Clock()
    backend = InMemoryBackend(partition_count=1, clock=clock)
    client = df.DurableOrchestrationClient(backend, registry=app.durable_functions, clock=clock)
    await client.start_new("loop", "i", 2)
    await client.start_new("loop", "i", 2)  # the same call again (its answer was lost, say): same execution
    worker = df.Worker(app.durable_functions, backend, clock=clock, options=df.WorkerOptions(batch_size=1))
    assert await counted(app, client, worker) == (S.Completed, 2)  # two executions, one add each


async def test_events_held_while_suspended_reach_the_execution_after_a_continue_as_new() -> None:
    app = df.DFApp()

    @app.orchestration_trigger(context_name="context")
    def waits_twice(context: df.DurableOrchestrationContext):  # type: ignore[no-untyped-def]
        n = context.get_input()
        value = yield context.wait_for_external_event(f"e{n}")
        if n == 0:
            context.continue_as_new(1)
            return None
        return value

    clock = Clock()
    backend = InMemoryBackend(partition_count=1, clock=clock)
    client = df.DurableOrchestrationClient(backend, registry=app.durable_functions, clock=clock)
    worker = df.Worker(app.durable_functions, backend, clock=clock)
    await client.start_new("waits_twice", "i", 0)
    await client.suspend("i")
    await worker.run_until_idle()
    await client.raise_event("i", "e0", "first")  # held back: the instance is suspended
    await client.raise_event("i", "e1", "second")  # held back too; for the next execution
    await worker.run_until_idle()
    await client.resume("i")
    await worker.run_until_idle()

    status = await client.get_status("i")
    assert status is not None
    assert (status.runtime_status, status.output) == (S.Completed, "second")


async def test_an_operation_sent_before_a_lock_is_applied_before_the_critical_section() -> None:
    app = df.DFApp()
    first, second = df.EntityId("journal", "j0"), df.EntityId("journal", "j1")

    @app.orchestration_trigger(context_name="context")
    def signal_then_lock(context: df.DurableOrchestrationContext):  # type: ignore[no-untyped-def]
        context.signal_entity(second, "append", "before the section")
        with (yield context.lock([first, second])):
            yield context.call_entity(second, "append", "inside the section")
        return "done"

    @app.entity_trigger(context_name="context")
    def journal(context: df.DurableEntityContext) -> None:
        context.set_state([*context.get_state(list), context.get_input()])

    clock = Clock()
    backend = InMemoryBackend(partition_count=1, clock=clock)
    client = df.DurableOrchestrationClient(backend, registry=app.durable_functions, clock=clock)
    worker = df.Worker(app.durable_functions, backend, clock=clock)
    await client.start_new("signal_then_lock", "i")
    await worker.run_once()  # the first step sends the signal to j1 and the lock request to j0
    backend.split_envelopes()
    queue = backend.queues["control-00"]
    signal = next(m for m in queue if json.loads(m.body)["InstanceId"] == second.instance_id)
    queue.remove(signal)  # the signal is slow...
    await worker.run_until_idle()  # ...the lock goes j0 -> j1, the section calls j1 (held for the signal)
    queue.append(signal)
    await worker.run_until_idle()

    status = await client.get_status("i")
    assert status is not None and status.runtime_status is S.Completed
    assert (await client.read_entity_state(second)).entity_state == ["before the section", "inside the section"]


async def test_an_answer_held_while_suspended_is_not_taken_by_the_next_execution() -> None:
    app = df.DFApp()

    @app.orchestration_trigger(context_name="context")
    def twice(context: df.DurableOrchestrationContext):  # type: ignore[no-untyped-def]
        n = context.get_input()
        work = context.call_activity("echo", f"run {n}")  # task 0 of each execution
        if n == 0:  # the first execution leaves its activity running and continues as new
            yield context.wait_for_external_event("go")
            context.continue_as_new(1)
            return None
        return (yield work)

    @app.activity_trigger(input_name="value")
    async def echo(value: str) -> str:
        return value

    clock = Clock()
    backend = InMemoryBackend(partition_count=1, clock=clock)
    client = df.DurableOrchestrationClient(backend, registry=app.durable_functions, clock=clock)
    worker = df.Worker(app.durable_functions, backend, clock=clock, options=df.WorkerOptions(inline_activities=False))
    await client.start_new("twice", "i", 0)
    await worker.run_orchestrations_once()  # the first step: the work item for "run 0" goes out
    await client.suspend("i")
    await worker.run_orchestrations_once()
    await client.raise_event("i", "go")  # held back: the instance is suspended
    await worker.run_orchestrations_once()
    await worker.run_activities_once()  # "run 0" is done; its answer is held back after the event
    await worker.run_orchestrations_once()
    await client.resume("i")
    await worker.run_until_idle()

    status = await client.get_status("i")
    assert status is not None
    assert (status.runtime_status, status.output) == (S.Completed, "run 1")


async def test_an_inline_answer_for_the_previous_execution_does_not_close_a_task_of_the_next() -> None:
    app = df.DFApp()
    ran: list[str] = []

    @app.orchestration_trigger(context_name="context")
    def loop(context: df.DurableOrchestrationContext):  # type: ignore[no-untyped-def]
        n = context.get_input()
        yield context.call_activity("work", f"awaited {n}")  # task 0
        context.call_activity("work", f"not awaited {n}")  # task 1, never waited for
        if n == 0:
            context.continue_as_new(1)
            return None
        return "done"

    @app.activity_trigger(input_name="value")
    async def work(value: str) -> str:
        ran.append(value)
        return value

    clock = Clock()
    backend = InMemoryBackend(partition_count=1, clock=clock)
    client = df.DurableOrchestrationClient(backend, registry=app.durable_functions, clock=clock)
    worker = df.Worker(app.durable_functions, backend, clock=clock, options=df.WorkerOptions(inline_activities=True))
    await client.start_new("loop", "i", 0)
    await worker.run_until_idle()

    status = await client.get_status("i")
    assert status is not None and status.runtime_status is S.Completed
    assert sorted(ran) == ["awaited 0", "awaited 1", "not awaited 0", "not awaited 1"]


class _LosesTheFirstSendAnswer:
    """The backend, except that the first ``send`` happens and then raises (its answer was lost)."""

    def __init__(self, backend: InMemoryBackend) -> None:
        self.backend, self.lost = backend, False

    def __getattr__(self, name: str) -> object:
        return getattr(self.backend, name)

    async def send(self, messages: list[object]) -> None:
        await self.backend.send(messages)  # type: ignore[arg-type]
        if not self.lost:
            self.lost = True
            raise ConnectionError("the answer to the send was lost")


async def test_start_new_retried_after_the_answer_of_its_send_was_lost_runs_the_orchestration_once() -> None:
    app, clock = counting_app(), Clock()
    backend = InMemoryBackend(partition_count=1, clock=clock)
    losing = cast(Backend, _LosesTheFirstSendAnswer(backend))
    client = df.DurableOrchestrationClient(losing, registry=app.durable_functions, clock=clock)
    await client.start_new("loop", "i", 1)  # it sends the same start again itself
    await client.start_new("loop", "i", 1)  # and a caller trying again is a retry of it (Pending)
    worker = df.Worker(app.durable_functions, backend, clock=clock, options=df.WorkerOptions(batch_size=1))
    assert await counted(app, client, worker) == (S.Completed, 1)


# -- minimised simulation runs -------------------------------------------------------------------------
async def test_seed_68_crash_after_the_sends_of_a_signal_loop_that_continued_as_new() -> None:
    """The row stays Pending although both executions completed (the signal did go out)."""
    program = Program(
        orchestrators=(Orchestrator("main0", (Signal("counter@c0", "add", 4, delay=60),), generations=2),),
        starts=(Start("main0", "o3", {"gen": 0, "acc": []}),),
    )
    config = SimConfig(seed=71339, workers=1, partitions=1, inline=True, batch_size=32, entity_batch_size=32,
                       faults=("crash",), max_faults=12, fault_rate=0.03)  # fmt: skip
    await assert_conforms(program, config)


async def test_seed_167_crash_after_an_inline_chain_that_continued_as_new() -> None:
    """Crash at "committed" after the inline chain committed both executions: Pending forever."""
    program = Program(
        orchestrators=(Orchestrator("main0", (Activity(3),), generations=2),),
        starts=(Start("main0", "o0", {"gen": 0, "acc": []}),),
    )
    config = SimConfig(seed=167, workers=1, partitions=1, inline=True, batch_size=1, entity_batch_size=3,
                       faults=("crash",), max_faults=12, fault_rate=0.08)  # fmt: skip
    await assert_conforms(program, config)


async def test_seed_511_crash_after_the_commit_of_a_signal_loop_loses_its_signals() -> None:
    """Crash after the commit, before the sends: the signals to its own counters are never sent."""
    program = Program(
        orchestrators=(Orchestrator("main1", (Signal("counter@{me}", "add", 3),), generations=2),),
        starts=(Start("main1", "o0", {"gen": 0, "acc": []}),),
    )
    config = SimConfig(seed=16349, workers=1, partitions=1, inline=False, batch_size=4, entity_batch_size=32,
                       faults=("crash",), max_faults=1, fault_rate=0.08)  # fmt: skip
    await assert_conforms(program, config)


async def test_seed_1892_start_new_retried_after_a_lost_answer() -> None:
    """A signal loop of two executions, started by a start_new that is retried after the answer of
    its send was lost: counter@c0 gets the adds of one run too many."""
    program = Program(
        orchestrators=(Orchestrator("main0", (Signal("counter@c0", "add", 1),), generations=2),),
        starts=tuple(Start("main0", f"o{i}", {"gen": 0, "acc": []}) for i in (1, 2, 3)),
    )
    config = SimConfig(seed=25649, workers=1, partitions=1, inline=False, batch_size=1, entity_batch_size=1,
                       faults=("client",), max_faults=2, fault_rate=0.01)  # fmt: skip
    await assert_conforms(program, config)


async def test_seed_1010462_a_crash_lets_the_lock_overtake_an_earlier_signal() -> None:
    """One crash (at "projected") and the section's entries land on j1 before the signal sent first."""
    program = Program(
        orchestrators=(Orchestrator("main0", (Append("journal@j1"), Section(("journal@j0", "journal@j1")))),),
        starts=(Start("main0", "o3", {"gen": 0, "acc": []}),),
    )
    config = SimConfig(seed=1121328, workers=1, partitions=1, inline=False, batch_size=32, entity_batch_size=32,
                       faults=("crash",), max_faults=1, fault_rate=0.08)  # fmt: skip
    await assert_conforms(program, config)


async def test_seed_40363_the_lock_overtakes_a_signal_queued_behind_another_section() -> None:
    """No fault needed: o0 holds j1; o1's signal to j1 and its lock request (forwarded by j0) both
    wait behind o0's section, the request first; o1's section then ran before its own signal."""
    program = Program(
        orchestrators=(
            Orchestrator("main0", (Call("counter@{me}", "forward", ["c0", 6]), Append("journal@j1"),
                                   Section(("journal@j0", "journal@j1")))),
            Orchestrator("main1", (Section(("journal@j1",)),)),
        ),
        starts=(Start("main1", "o0", {"gen": 0, "acc": []}), Start("main0", "o1", {"gen": 0, "acc": []})),
    )  # fmt: skip
    config = SimConfig(seed=103715, workers=3, partitions=4, inline=False, batch_size=4, entity_batch_size=32,
                       faults=(), max_faults=12, fault_rate=0.01)  # fmt: skip
    await assert_conforms(program, config)


async def test_suspended_while_both_events_arrive_then_resumed() -> None:
    """The driver suspends o0, raises the events of both its executions, then resumes it: fails
    without any fault (found by seed 71334 of the long run, whose shrunk schedule stays large)."""
    program = Program(
        orchestrators=(Orchestrator("main0", (WaitEvent("e1"),), generations=2),),
        starts=(Start("main0", "o0", {"gen": 0, "acc": []}),),
        events=(RaiseEvent("o0", "e1.g0", 1, at_tick=40), RaiseEvent("o0", "e1.g1", 2, at_tick=40)),
        suspensions=(Suspend("o0", at_tick=20),),
    )
    await assert_conforms(program, SimConfig(seed=0, workers=1, partitions=1, faults=()))


async def test_seed_1003619_answers_held_while_suspended_close_the_next_executions_tasks() -> None:
    """A fan-out fails on its first failure and continues as new while the other activities
    still run; their answers are held while o1 is suspended, then carried into the next
    execution, whose own activities of the same ids are never sent (found by the long run after
    the fix of events-held-while-suspended: 4 of 20,000 programs)."""
    program = Program(
        orchestrators=(Orchestrator("main0", (FanOut((6, 20, 13, 13)),), generations=2),),
        starts=(Start("main0", "o1", {"gen": 0, "acc": []}),),
        suspensions=(Suspend("o1", at_tick=36),),
    )
    config = SimConfig(seed=1114485, workers=1, partitions=1, inline=True, batch_size=4, entity_batch_size=1,
                       faults=("crash",), max_faults=2, fault_rate=0.08)  # fmt: skip
    await assert_conforms(program, config)


async def test_seed_3001362_a_loop_leaving_an_activity_running_with_inline_activities() -> None:
    """No fault needed: one worker, inline activities, a loop of two executions that each leave
    an activity running; the second execution's is never sent."""
    program = Program(
        orchestrators=(Orchestrator("main0", (Activity(7), Unawaited(23)), generations=2),),
        starts=(Start("main0", "o2", {"gen": 0, "acc": []}),),
    )
    await assert_conforms(program, SimConfig(seed=3001362, workers=1, partitions=1, inline=True, faults=()))
