"""Regression tests for faults found in review: each names the scenario that used to go wrong."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta

import pytest

import durable as df
from durable import EventType, HistoryEvent
from durable.core._entities import EntityRequest, entity_message
from durable.core._messages import MessageTarget, WorkMessage
from tests.conftest import CrashOnce

S = df.OrchestrationRuntimeStatus


async def test_finished_child_that_continued_as_new_is_not_restarted_by_a_resent_start(app, runtime):
    runs: list[int] = []

    @app.orchestration_trigger(context_name="context")
    def parent(context):
        result = yield context.call_sub_orchestrator("child", 0, "kid")
        go = yield context.wait_for_external_event("go")
        return [result, go]

    @app.orchestration_trigger(context_name="context")
    def child(context):
        n = context.get_input()
        if not context.is_replaying:
            runs.append(n)
        yield context.call_activity("identity", n)
        if n < 1:
            context.continue_as_new(n + 1)
            return None
        return n

    @app.activity_trigger(input_name="x")
    def identity(x):
        return x

    client = runtime.client()
    await client.start_new("parent", "p")
    await runtime.worker.run_until_idle()
    assert runs == [0, 1]
    # Another worker (empty cache) loads the parent and re-sends its last step's messages,
    # among them the child's start: the finished child must recognise it as a duplicate.
    other = df.Worker(runtime.worker.registry, runtime.backend, clock=runtime.clock,
                      options=df.WorkerOptions(inline_activities=False))  # fmt: skip
    await client.raise_event("p", "go", "now")
    await other.run_until_idle()
    assert runs == [0, 1]
    status = await client.get_status("p")
    assert status.runtime_status is S.Completed and status.output == [1, "now"]


@pytest.mark.parametrize(
    "bad_call",
    [
        lambda ctx: ctx.call_entity(df.EntityId("counter", "a\x01b"), "add"),
        lambda ctx: ctx.call_sub_orchestrator("child", None, "@counter@x"),
        lambda ctx: ctx.call_sub_orchestrator("child", None, "x" * 300),
    ],
)
async def test_invalid_ids_in_orchestrator_code_fail_at_the_call_site(app, runtime, bad_call):
    @app.orchestration_trigger(context_name="context")
    def careless(context):
        yield bad_call(context)

    client = runtime.client()
    instance_id = await client.start_new("careless")
    await runtime.worker.run_until_idle()
    status = await client.get_status(instance_id)
    assert status.runtime_status is S.Failed
    assert status.failure_details["ErrorType"] in ("ValueError", "OrchestrationApiMisuse")
    assert not runtime.backend.poison_queue


async def test_rewind_reruns_only_the_failed_activity_and_records_each_completion_once(app, make_runtime):
    runtime = make_runtime(app, inline=True)
    calls: list[str] = []
    failing = {"b": True}

    @app.orchestration_trigger(context_name="context")
    def pair(context):
        return (yield context.task_all([context.call_activity("b", 1), context.call_activity("a", 2)]))

    @app.activity_trigger(input_name="x")
    def a(x):
        calls.append("a")
        return x

    @app.activity_trigger(input_name="x")
    def b(x):
        calls.append("b")
        if failing["b"]:
            raise RuntimeError("boom")
        return x

    client = runtime.client()
    await client.start_new("pair", "f")
    await runtime.worker.run_until_idle()
    assert (await client.get_status("f")).runtime_status is S.Failed
    failing["b"] = False
    await client.rewind("f")
    await runtime.worker.run_until_idle()
    status = await client.get_status("f")
    assert status.runtime_status is S.Completed and status.output == [1, 2]
    assert Counter(calls) == {"b": 2, "a": 1}
    history = (await runtime.backend.load_history("f")).events
    completed = [e.task_scheduled_id for e in history if e.event_type is EventType.TASK_COMPLETED]
    assert sorted(completed) == [0, 1]


async def test_rewind_after_a_failed_entity_call_does_not_hang(app, runtime):
    @app.entity_trigger(context_name="context")
    def fragile(context):
        raise KeyError("always")

    @app.orchestration_trigger(context_name="context")
    def caller(context):
        yield context.call_entity(df.EntityId("fragile", "x"), "poke")

    client = runtime.client()
    await client.start_new("caller", "c")
    await runtime.worker.run_until_idle()
    # An entity operation cannot run twice: the failure stands, and the rewind says so.
    with pytest.raises(ValueError, match="cannot be rewound"):
        await client.rewind("c")
    await runtime.worker.run_until_idle()
    assert (await client.get_status("c")).runtime_status is S.Failed


async def test_a_timer_months_away_fires_without_being_poisoned(app, runtime, clock):
    @app.orchestration_trigger(context_name="context")
    def patient(context):
        yield context.create_timer(context.current_utc_datetime + timedelta(days=60))
        return "fired"

    client = runtime.client()
    await client.start_new("patient", "w")
    await runtime.worker.run_until_idle()
    for _ in range(61):
        clock.advance(86400)
        await runtime.worker.run_until_idle()
    assert (await client.get_status("w")).output == "fired"
    assert not runtime.backend.poison_queue


async def test_an_event_that_arrives_before_a_slow_start_is_kept(app, runtime, clock):
    @app.orchestration_trigger(context_name="context")
    def waiter(context):
        return (yield context.wait_for_external_event("go"))

    backend = runtime.backend
    early = HistoryEvent(EventType.EVENT_RAISED, clock(), name="go", input='"early"')
    await backend.send([WorkMessage(MessageTarget.ORCHESTRATION, "x", early)])
    for _ in range(60):  # the start message is a minute late
        clock.advance(1)
        await runtime.worker.run_until_idle()
    client = runtime.client()
    await client.start_new("waiter", "x")
    for _ in range(60):
        clock.advance(1)
        await runtime.worker.run_until_idle()
    assert (await client.get_status("x")).output == "early"
    assert not backend.poison_queue


async def test_an_event_for_an_instance_that_never_starts_is_dropped_eventually(app, runtime, clock):
    backend = runtime.backend
    stray = HistoryEvent(EventType.EVENT_RAISED, clock(), name="go")
    await backend.send([WorkMessage(MessageTarget.ORCHESTRATION, "ghost", stray)])
    for _ in range(30):
        clock.advance(30)
        await runtime.worker.run_until_idle()
    assert backend.pending_count() == 0
    assert not backend.poison_queue


async def test_a_malformed_entity_message_does_not_hold_up_the_others(app, runtime):
    @app.entity_trigger(context_name="context")
    def tally(context):
        context.set_state(context.get_state(lambda: 0) + context.get_input())

    backend = runtime.backend
    now = runtime.clock()
    bad = entity_message("@tally@t", EntityRequest("op", operation="add", input="1"), now, "bad")
    bad = bad.__class__(bad.target, bad.instance_id, bad.event.replace(input='{"kind":"op","seq":"5","sender":"s"}'),
                        id="bad")  # fmt: skip
    good = [
        entity_message("@tally@t", EntityRequest("op", operation="add", input=str(n), sender="s1", seq=n), now, f"g{n}")
        for n in (1, 2, 3)
    ]
    await backend.send([good[0], bad, good[1], good[2]])
    await runtime.worker.run_until_idle()
    state = await runtime.client().read_entity_state(df.EntityId("tally", "t"))
    assert state.entity_state == 6
    assert not backend.poison_queue


async def test_an_orchestration_failing_on_nondeterminism_releases_its_locks(app, runtime):
    version = {"code": 1}

    @app.entity_trigger(context_name="context")
    def resource(context):
        context.set_state(context.get_state(lambda: 0) + 1)

    @app.orchestration_trigger(context_name="context")
    def holder(context):
        with (yield context.lock([df.EntityId("resource", "r")])):
            if version["code"] == 1:
                yield context.wait_for_external_event("go")
            else:
                yield context.call_activity("changed")  # the code changed under a running instance

    @app.orchestration_trigger(context_name="context")
    def next_holder(context):
        with (yield context.lock([df.EntityId("resource", "r")])):
            yield context.call_entity(df.EntityId("resource", "r"), "use")
        return "got it"

    client = runtime.client()
    await client.start_new("holder", "h")
    await runtime.worker.run_until_idle()
    # A new deployment with changed code: a new worker, which replays what it takes up.
    version["code"] = 2
    redeployed = df.DurableRuntime(app, runtime.backend, clock=runtime.clock, options=runtime.worker.options)
    await client.raise_event("h", "go")
    await client.start_new("next_holder", "n")
    await redeployed.worker.run_until_idle()
    assert (await client.get_status("h")).failure_details["ErrorType"] == "NonDeterminismError"
    assert (await client.get_status("n")).output == "got it"


async def test_a_lock_granted_to_an_execution_replaced_by_continue_as_new_is_released(app, runtime):
    @app.entity_trigger(context_name="context")
    def gate(context):
        context.set_state(context.get_state(lambda: 0) + 1)
        context.set_result(context.get_state())

    @app.orchestration_trigger(context_name="context")
    def impatient(context):
        if not context.get_input():
            context.lock([df.EntityId("gate", "g")])  # requested, never awaited
            context.continue_as_new(True)
            return None
        yield context.wait_for_external_event("never")

    @app.orchestration_trigger(context_name="context")
    def patient(context):
        with (yield context.lock([df.EntityId("gate", "g")])):
            return (yield context.call_entity(df.EntityId("gate", "g"), "pass"))

    client = runtime.client()
    await client.start_new("impatient", "imp")
    await runtime.worker.run_until_idle()
    await client.start_new("patient", "pat")
    await runtime.worker.run_until_idle()
    assert (await client.get_status("pat")).output == 1


async def test_a_worker_taking_an_instance_over_does_not_rerun_its_activities(app, runtime):
    calls: Counter = Counter()

    @app.orchestration_trigger(context_name="context")
    def steps(context):
        total = 0
        for n in range(6):
            total += yield context.call_activity("count", n)
        return total

    @app.activity_trigger(input_name="n")
    def count(n):
        calls[n] += 1
        return n

    client = runtime.client()
    instance_id = await client.start_new("steps")
    # Two workers with caches of their own take turns: each step is committed by the other one.
    workers = [runtime.worker, df.Worker(runtime.worker.registry, runtime.backend, clock=runtime.clock,
                                         options=df.WorkerOptions(inline_activities=False))]  # fmt: skip
    for turn in range(20):
        worker = workers[turn % 2]
        await worker.run_orchestrations_once()
        await worker.run_activities_once()
    assert (await client.get_status(instance_id)).output == sum(range(6))
    assert calls == Counter({n: 1 for n in range(6)})


async def test_an_entity_step_interrupted_before_its_row_is_written_is_projected_later(app, make_runtime):
    @app.entity_trigger(context_name="context")
    def meter(context):
        context.set_state(context.get_state(lambda: 0) + context.get_input())

    crashed = make_runtime(app)
    crashed.worker.options.fault_hook = CrashOnce("committed")
    client = crashed.client()
    await client.signal_entity(df.EntityId("meter", "m"), "add", 5)
    await crashed.worker.run_orchestrations_once()
    assert (await client.read_entity_state(df.EntityId("meter", "m"))).entity_exists is False  # row not written
    # The signal comes back to another worker: already applied, but the lagging row is written.
    other = df.Worker(crashed.worker.registry, crashed.backend, clock=crashed.clock)
    crashed.clock.advance(crashed.worker.options.retry_delay + 1)
    await other.run_until_idle()
    assert (await client.read_entity_state(df.EntityId("meter", "m"))).entity_state == 5


async def test_rewinding_a_parent_whose_child_failed_fails_again_instead_of_hanging(app, runtime):
    @app.orchestration_trigger(context_name="context")
    def family(context):
        return (yield context.call_sub_orchestrator("doomed_child", None, "child-1"))

    @app.orchestration_trigger(context_name="context")
    def doomed_child(context):
        raise RuntimeError("child failed")
        yield  # a generator orchestrator

    client = runtime.client()
    await client.start_new("family", "fam")
    await runtime.worker.run_until_idle()
    assert (await client.get_status("fam")).runtime_status is S.Failed
    # Children are not rewound: the rewind is refused rather than leaving the parent waiting.
    with pytest.raises(ValueError, match="cannot be rewound"):
        await client.rewind("fam")
    await runtime.worker.run_until_idle()
    assert (await client.get_status("fam")).runtime_status is S.Failed
    assert runtime.backend.pending_count() == 0
