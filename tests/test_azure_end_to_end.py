"""The engine end to end on Azure Storage (Azurite): real queues, tables and blobs, real time."""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from pathlib import Path

import pytest
from azure.data.tables.aio import TableClient
from azure.storage.queue.aio import QueueClient

import durable as df
from durable import EventType, HistoryEvent, OrchestrationRuntimeStatus
from storage import control_queue, partition_of
from storage.azure import AzureStorageBackend
from tests import chaos_app

pytestmark = pytest.mark.azurite

FAST = df.WorkerOptions(idle_poll_min=0.02, idle_poll_max=0.1, visibility_timeout=10.0, retry_delay=0.2)
REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def azure_runtime(app: df.DFApp, azure_backend: AzureStorageBackend) -> AsyncIterator[df.DurableRuntime]:
    runtime = df.DurableRuntime(app, azure_backend, task_hub_name=azure_backend.task_hub, options=FAST)
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()


def assert_well_formed(events: Sequence[HistoryEvent]) -> None:
    """A history where no step was applied twice: every action and completion appears once."""
    kinds = Counter(e.event_type for e in events)
    assert kinds[EventType.EXECUTION_STARTED] == 1
    assert kinds[EventType.EXECUTION_COMPLETED] <= 1
    assert kinds[EventType.ORCHESTRATOR_STARTED] == kinds[EventType.ORCHESTRATOR_COMPLETED]
    scheduled = [e.event_id for e in events if e.event_type is EventType.TASK_SCHEDULED]
    completed = [e.task_scheduled_id for e in events if e.event_type is EventType.TASK_COMPLETED]
    assert len(scheduled) == len(set(scheduled)), f"an action was recorded twice: {scheduled}"
    assert len(completed) == len(set(completed)), f"a completion was applied twice: {completed}"
    assert set(completed) <= set(scheduled)


async def test_chaining_records_a_dtfx_compatible_history(app, azure_runtime, azure_backend):
    @app.orchestration_trigger(context_name="context")
    def chain(context):
        greetings = []
        for city in ("Tokyo", "Seattle", "London"):
            greetings.append((yield context.call_activity("hello", city)))
        return greetings

    @app.activity_trigger(input_name="city")
    def hello(city):
        return f"Hello {city}!"

    client = azure_runtime.client()
    instance_id = await client.start_new("chain", "chain/1#?")
    status = await client.wait_for_completion(instance_id, timeout=30)
    assert status.runtime_status is OrchestrationRuntimeStatus.Completed
    assert status.output == ["Hello Tokyo!", "Hello Seattle!", "Hello London!"]

    history = await azure_backend.load_history(instance_id)
    assert_well_formed(history.events)
    # The raw rows follow DTFx's layout: escaped partition key, hex row keys, event type names.
    table = TableClient.from_connection_string(azure_backend.connection_string, f"{azure_backend.task_hub}History")
    async with table:
        rows = [r async for r in table.query_entities("PartitionKey eq 'chain^01^2^3'")]
    row_keys = sorted(r["RowKey"] for r in rows)
    assert "sentinel" in row_keys
    assert f"{0:016X}" in row_keys
    by_key = {r["RowKey"]: r for r in rows}
    assert by_key[f"{1:016X}"]["EventType"] == "ExecutionStarted"
    assert by_key["sentinel"]["HistoryLength"] == len(history.events)


async def test_fan_out_fan_in(app, azure_runtime):
    @app.orchestration_trigger(context_name="context")
    def fan(context):
        results = yield context.task_all([context.call_activity("square", i) for i in range(25)])
        return sum(results)

    @app.activity_trigger(input_name="n")
    async def square(n):
        return n * n

    client = azure_runtime.client()
    instance_id = await client.start_new("fan")
    status = await client.wait_for_completion(instance_id, timeout=30)
    assert status.output == sum(i * i for i in range(25))


async def test_human_interaction_event_and_timeout(app, azure_runtime):
    @app.orchestration_trigger(context_name="context")
    def approval(context):
        timeout = context.create_timer(context.current_utc_datetime + timedelta(seconds=context.get_input()))
        event = context.wait_for_external_event("Approval")
        winner = yield context.task_any([event, timeout])
        if winner is event:
            timeout.cancel()
            return f"approved: {event.result}"
        return "timed out"

    client = azure_runtime.client()
    approved = await client.start_new("approval", None, 60)
    timed_out = await client.start_new("approval", None, 1)
    await client.raise_event(approved, "approval", "yes")
    assert (await client.wait_for_completion(approved, timeout=30)).output == "approved: yes"
    assert (await client.wait_for_completion(timed_out, timeout=30)).output == "timed out"


async def test_sub_orchestration_failure_reaches_the_parent(app, azure_runtime):
    @app.orchestration_trigger(context_name="context")
    def parent(context):
        try:
            yield context.call_sub_orchestrator("child", "boom")
        except df.TaskFailedError as error:
            return {"type": error.error_type, "message": error.error_message}

    @app.orchestration_trigger(context_name="context")
    def child(context):
        yield context.call_activity("explode", context.get_input())

    @app.activity_trigger(input_name="what")
    def explode(what):
        raise KeyError(what)

    client = azure_runtime.client()
    instance_id = await client.start_new("parent")
    status = await client.wait_for_completion(instance_id, timeout=30)
    assert status.output["type"] == "TaskFailedError"
    assert "KeyError" in status.output["message"]
    child_status = await client.get_status(f"{instance_id}:0")
    assert child_status is not None and child_status.runtime_status is OrchestrationRuntimeStatus.Failed


async def test_retry_and_continue_as_new_with_carried_event(app, azure_runtime):
    attempts: list[int] = []

    @app.orchestration_trigger(context_name="context")
    def flaky_counter(context):
        count = context.get_input()
        value = yield context.call_activity_with_retry("flaky", df.RetryOptions(100, 5, backoff_coefficient=2.0), count)
        if count < 2:
            context.continue_as_new(count + 1)
            return None
        extra = yield context.wait_for_external_event("bonus")
        return value + extra

    @app.activity_trigger(input_name="count")
    def flaky(count):
        attempts.append(count)
        if attempts.count(count) < 2:
            raise RuntimeError("transient")
        return count * 10

    client = azure_runtime.client()
    instance_id = await client.start_new("flaky_counter", None, 0)
    await client.raise_event(instance_id, "bonus", 7)  # raised early: carried across executions
    status = await client.wait_for_completion(instance_id, timeout=30)
    assert status.output == 27
    assert Counter(attempts) == {0: 2, 1: 2, 2: 2}


async def test_one_megabyte_input_and_output_round_trip(app, azure_runtime):
    @app.orchestration_trigger(context_name="context")
    def echo(context):
        text = context.get_input()
        reversed_text = yield context.call_activity("reverse", text)
        return reversed_text

    @app.activity_trigger(input_name="text")
    def reverse(text):
        return text[::-1]

    big = "".join(chr(ord("a") + i % 26) for i in range(1_000_000))
    client = azure_runtime.client()
    instance_id = await client.start_new("echo", None, big)
    status = await client.wait_for_completion(instance_id, timeout=60)
    assert status.output == big[::-1]
    assert (await client.get_status(instance_id, show_input=True)).input_ == big


async def test_terminate_suspend_resume(app, azure_runtime):
    @app.orchestration_trigger(context_name="context")
    def waiter(context):
        value = yield context.wait_for_external_event("go")
        return value

    client = azure_runtime.client()
    suspended = await client.start_new("waiter")
    doomed = await client.start_new("waiter")
    await _wait_for_status(client, suspended, OrchestrationRuntimeStatus.Running)
    await client.suspend(suspended, "pause")
    await _wait_for_status(client, suspended, OrchestrationRuntimeStatus.Suspended)
    await client.raise_event(suspended, "go", 42)
    await asyncio.sleep(0.5)
    assert (await client.get_status(suspended)).runtime_status is OrchestrationRuntimeStatus.Suspended
    await client.resume(suspended, "continue")
    assert (await client.wait_for_completion(suspended, timeout=30)).output == 42

    await client.terminate(doomed, "no longer needed")
    status = await client.wait_for_completion(doomed, timeout=30)
    assert status.runtime_status is OrchestrationRuntimeStatus.Terminated
    assert status.output == "no longer needed"


async def test_malformed_message_is_poisoned_and_work_goes_on(app, azure_runtime, azure_backend):
    @app.orchestration_trigger(context_name="context")
    def noop(context):
        return "done"
        yield  # a generator

    queue_name = f"{azure_backend.task_hub.lower()}-{control_queue(partition_of('x', 4))}"
    queue = QueueClient.from_connection_string(azure_backend.connection_string, queue_name)
    async with queue:
        await queue.send_message("this is not a work message")
    client = azure_runtime.client()
    instance_id = await client.start_new("noop", "x")
    assert (await client.wait_for_completion(instance_id, timeout=30)).output == "done"
    for _ in range(50):
        bodies = [body for _, body, _ in await azure_backend.poison_messages()]
        if bodies:
            break
        await asyncio.sleep(0.1)
    assert "this is not a work message" in bodies


async def _wait_for_status(
    client: df.DurableOrchestrationClient, instance_id: str, wanted: OrchestrationRuntimeStatus
) -> None:
    for _ in range(300):
        status = await client.get_status(instance_id)
        if status is not None and status.runtime_status is wanted:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{instance_id} never reached {wanted.value}")


# -- separate worker processes ---------------------------------------------------------------------
async def _spawn_worker(backend: AzureStorageBackend, *extra: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.worker_process",
        backend.connection_string,
        backend.task_hub,
        *extra,
        cwd=REPO_ROOT,
    )


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.terminate()
        await process.wait()


async def test_two_worker_processes_never_double_commit(azure_backend):
    workers = [await _spawn_worker(azure_backend, "--no-inline") for _ in range(2)]
    try:
        client = df.DurableOrchestrationClient(azure_backend, registry=chaos_app.app.durable_functions)
        ids = [await client.start_new("sequence", f"seq-{i}", i) for i in range(12)]
        for i, instance_id in enumerate(ids):
            status = await client.wait_for_completion(instance_id, timeout=60)
            assert status.output == i + 5
            assert_well_formed((await azure_backend.load_history(instance_id)).events)
    finally:
        for worker in workers:
            await _stop(worker)


@pytest.mark.parametrize(
    ("point", "mode"),
    [
        # Activities through the work-item queue: one commit per step, killed at the second.
        ("committed", ("--no-inline", "--kill-after", "2")),
        ("sent", ("--no-inline", "--kill-after", "2")),
        ("projected", ("--no-inline", "--kill-after", "2")),
        ("activity-reported", ("--no-inline", "--kill-after", "2")),
        # Activities run inline: the whole sequence is one commit, killed right after it.
        ("committed", ("--kill-after", "1")),
        ("sent", ("--kill-after", "1")),
    ],
)
async def test_worker_killed_mid_protocol_loses_nothing(azure_backend, point, mode):
    client = df.DurableOrchestrationClient(azure_backend, registry=chaos_app.app.durable_functions)
    instance_id = await client.start_new("sequence", f"crash-{point}", 100)
    doomed = await _spawn_worker(azure_backend, "--kill-at", point, *mode)
    assert await asyncio.wait_for(doomed.wait(), timeout=60) == -9  # it really died at that point
    survivor = await _spawn_worker(azure_backend)
    try:
        status = await client.wait_for_completion(instance_id, timeout=60)
        assert status.runtime_status is OrchestrationRuntimeStatus.Completed
        assert status.output == 105
        assert_well_formed((await azure_backend.load_history(instance_id)).events)
    finally:
        await _stop(survivor)


async def test_a_long_activity_keeps_its_message_while_it_runs(app, azure_backend):
    calls: list[int] = []

    @app.orchestration_trigger(context_name="context")
    def slow_job(context):
        return (yield context.call_activity("slow", 7))

    @app.activity_trigger(input_name="n")
    async def slow(n):
        calls.append(n)
        await asyncio.sleep(7)  # more than twice the 3 s lease: it must be renewed
        return n * 6

    # Two workers on one task hub: without renewal the other one would take the message over.
    options = df.WorkerOptions(
        idle_poll_min=0.02, idle_poll_max=0.1, visibility_timeout=3.0, retry_delay=0.2, inline_activities=False
    )
    runtimes = [df.DurableRuntime(app, azure_backend, options=options) for _ in range(2)]
    for runtime in runtimes:
        await runtime.start()
    try:
        client = runtimes[0].client()
        instance_id = await client.start_new("slow_job")
        assert (await client.wait_for_completion(instance_id, timeout=30)).output == 42
        assert calls == [7]
    finally:
        for runtime in runtimes:
            await runtime.stop()
