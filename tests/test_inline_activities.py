"""Activities run inline by the worker that commits the step (WorkerOptions.inline_activities)."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

import durable as df
from durable import EventType
from durable.runtime._ownership import PartitionOwnership
from storage._envelopes import unpack

S = df.OrchestrationRuntimeStatus


@pytest.fixture
def inline_runtime(app, make_runtime):
    return make_runtime(app, inline=True)


def _register_sequence(app, calls: Counter) -> None:
    @app.orchestration_trigger(context_name="context")
    def sequence(context):
        value = context.get_input()
        for _ in range(5):
            value = yield context.call_activity("add_one", value)
        return value

    @app.activity_trigger(input_name="value")
    def add_one(value):
        calls[value] += 1
        return value + 1


async def test_a_sequence_runs_in_one_work_item_with_each_activity_after_its_schedule_commits(app, inline_runtime):
    calls: Counter = Counter()
    _register_sequence(app, calls)
    client = inline_runtime.client()
    instance_id = await client.start_new("sequence", None, 10)
    backend = inline_runtime.backend
    real_commit = backend.commit
    committed_before_run: list[bool] = []

    async def commit(instance_id, **kwargs):
        etag = await real_commit(instance_id, **kwargs)
        committed_before_run.append(sum(calls.values()) == kwargs["checkpoint"] - 1)
        return etag

    backend.commit = commit
    await inline_runtime.worker.run_orchestrations_once()  # no activity worker involved

    status = await client.get_status(instance_id)
    assert status.runtime_status is S.Completed and status.output == 15
    assert calls == Counter({10: 1, 11: 1, 12: 1, 13: 1, 14: 1})
    history = await backend.load_history(instance_id)
    assert history.checkpoint == 6  # one commit per step: the start and each result
    assert committed_before_run == [True] * 6  # each activity ran only once its schedule was durable
    kinds = [e.event_type for e in history.events]
    assert kinds.count(EventType.ORCHESTRATOR_STARTED) == 6
    assert kinds.count(EventType.TASK_COMPLETED) == 5
    assert backend.pending_count() == 0


async def test_a_crash_after_a_commit_reruns_only_that_steps_activity(app, inline_runtime, clock):
    calls: Counter = Counter()
    _register_sequence(app, calls)
    client = inline_runtime.client()
    instance_id = await client.start_new("sequence", None, 0)
    backend = inline_runtime.backend
    real_commit = backend.commit
    commits = 0

    async def crash_on_second(*args, **kwargs):
        nonlocal commits
        commits += 1
        if commits == 2:
            raise ConnectionError("worker died before committing the first result")
        return await real_commit(*args, **kwargs)

    backend.commit = crash_on_second
    await inline_runtime.worker.run_orchestrations_once()
    assert calls == Counter({0: 1})
    inline_runtime.worker._cache.clear()  # a worker that died keeps nothing
    clock.advance(inline_runtime.worker.options.retry_delay + 1)
    await inline_runtime.worker.run_until_idle()

    status = await client.get_status(instance_id)
    assert status.runtime_status is S.Completed and status.output == 5
    assert calls == Counter({0: 2, 1: 1, 2: 1, 3: 1, 4: 1})  # at least once: the lost result ran again
    completed = [e.task_scheduled_id for e in (await backend.load_history(instance_id)).events
                 if e.event_type is EventType.TASK_COMPLETED]  # fmt: skip
    assert completed == [0, 1, 2, 3, 4]


async def test_large_fan_outs_and_timers_go_through_the_queues(app, inline_runtime, clock):
    @app.orchestration_trigger(context_name="context")
    def wide(context):
        first = yield context.call_activity("double", 1)
        results = yield context.task_all([context.call_activity("double", i) for i in range(40)])
        yield context.create_timer(context.current_utc_datetime.replace(year=2030))
        return first + sum(results)

    @app.activity_trigger(input_name="n")
    def double(n):
        return 2 * n

    client = inline_runtime.client()
    instance_id = await client.start_new("wide")
    await inline_runtime.worker.run_orchestrations_once()
    # The first activity ran inline; the 40-wide fan-out is above inline_max_activities: queued,
    # 32 work items to a queue message at most, so that several workers share it.
    queued = [unpack(stored.body) for stored in inline_runtime.backend.queues["workitems"]]
    assert sorted(len(items) for items in queued) == [8, 32]
    await inline_runtime.worker.run_until_idle()
    assert (await client.get_status(instance_id)).runtime_status is S.Running  # the timer waits
    clock.advance(10 * 365 * 24 * 3600)
    await inline_runtime.worker.run_until_idle()
    status = await client.get_status(instance_id)
    assert status.runtime_status is S.Completed and status.output == 2 + 2 * sum(range(40))


async def test_inline_failures_retries_and_continue_as_new(app, inline_runtime, clock):
    attempts: Counter = Counter()

    @app.orchestration_trigger(context_name="context")
    def looping(context):
        round_ = context.get_input()
        value = yield context.call_activity_with_retry("flaky", df.RetryOptions(1000, 3), round_)
        if round_ < 2:
            context.continue_as_new(round_ + 1)
            return None
        try:
            yield context.call_activity("broken", None)
        except df.TaskFailedError as error:
            return [value, error.error_type]

    @app.activity_trigger(input_name="round_")
    def flaky(round_):
        attempts[round_] += 1
        if attempts[round_] == 1:
            raise TimeoutError("first attempt fails")
        return round_ * 10

    @app.activity_trigger(input_name="x")
    def broken(x):
        raise KeyError("gone")

    client = inline_runtime.client()
    instance_id = await client.start_new("looping", None, 0)
    for _ in range(6):
        await inline_runtime.worker.run_until_idle()
        clock.advance(2)
    status = await client.get_status(instance_id)
    assert status.runtime_status is S.Completed
    assert status.output == [20, "KeyError"]
    assert attempts == Counter({0: 2, 1: 2, 2: 2})


async def test_an_inline_activity_keeps_the_inbound_messages_leased(app, make_runtime):
    @app.orchestration_trigger(context_name="context")
    def slow_one(context):
        return (yield context.call_activity("slow", None))

    @app.activity_trigger(input_name="x")
    async def slow(x):
        await asyncio.sleep(0.3)
        return "done"

    runtime = make_runtime(app, inline=True)
    runtime.worker.options.visibility_timeout = 0.2  # renewed every 0.1 s while the activity runs
    extended: list[str] = []
    real_extend = runtime.worker.acks.extend

    async def extend(delivery, seconds):
        extended.append(delivery.message.event.event_type.value)
        await real_extend(delivery, seconds)

    runtime.worker.acks.extend = extend
    client = runtime.client()
    instance_id = await client.start_new("slow_one")
    await runtime.worker.run_orchestrations_once()
    assert (await client.get_status(instance_id)).output == "done"
    assert extended and set(extended) == {"ExecutionStarted"}


@pytest.mark.parametrize("others", [False, True], ids=["alone", "with-another-host"])
async def test_a_process_alone_on_its_task_hub_runs_a_large_fan_out_itself(app, inline_runtime, others):
    """Above ``inline_max_activities`` a fan-out goes through the work-item queue so that every
    host takes a share; a process that no other holds partitions beside runs it itself."""

    @app.orchestration_trigger(context_name="context")
    def fan(context):
        return sum((yield context.task_all([context.call_activity("double", i) for i in range(64)])))

    @app.activity_trigger(input_name="value")
    def double(value):
        return 2 * value

    worker, backend = inline_runtime.worker, inline_runtime.backend
    worker.ownership = PartitionOwnership(backend)
    if others:
        worker.ownership.others[1] = "another-host"  # as its last look at the leases found
    instance_id = await inline_runtime.client().start_new("fan")
    await worker.run_orchestrations_once()
    status = await inline_runtime.client().get_status(instance_id)
    work_items = backend.queues.get("workitems", [])
    if others:
        assert status.runtime_status is df.OrchestrationRuntimeStatus.Running
        assert sum(len(unpack(m.body)) for m in work_items) == 64
    else:
        assert status.output == 2 * sum(range(64))
        assert work_items == []
