"""Durable entities on Azure Storage (Azurite): concurrent signals, a worker killed mid-run, large
state offloaded to blobs, typed failures and the entity's Instances row."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from azure.storage.blob.aio import ContainerClient

import durable as df
from durable import EntityId, OrchestrationRuntimeStatus
from durable.core._entities import EntitySnapshot
from storage.azure import AzureStorageBackend
from tests import chaos_app

pytestmark = pytest.mark.azurite

S = OrchestrationRuntimeStatus
FAST = df.WorkerOptions(idle_poll_min=0.02, idle_poll_max=0.1, visibility_timeout=10, retry_delay=0.2)
REPO_ROOT = Path(__file__).resolve().parent.parent
ORCHESTRATIONS, SIGNALS_EACH = 10, 100


@pytest.fixture
def app() -> df.DFApp:
    """This module's app: the chaos app's functions plus the ones a test registers."""
    app = df.DFApp()
    app.durable_functions.merge(chaos_app.app.durable_functions)
    return app


@pytest.fixture
async def azure_runtime(app: df.DFApp, azure_backend: AzureStorageBackend) -> AsyncIterator[df.DurableRuntime]:
    runtime = df.DurableRuntime(app, azure_backend, task_hub_name=azure_backend.task_hub, options=FAST)
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()


async def _run_signallers(client: df.DurableOrchestrationClient, key: str) -> list[int]:
    """Start the signalling orchestrations concurrently and return their ``get`` results."""
    spec = {"key": key, "count": SIGNALS_EACH}
    ids = await asyncio.gather(*(client.start_new("signal_counter", f"{key}-{i}", spec) for i in range(ORCHESTRATIONS)))
    outputs = []
    for instance_id in ids:
        status = await client.wait_for_completion(instance_id, timeout=60)
        assert status.runtime_status is S.Completed, status.output
        outputs.append(status.output)
    return outputs


def _assert_counts(outputs: list[int]) -> None:
    total = ORCHESTRATIONS * SIGNALS_EACH
    # each get follows its own orchestration's signals; the last get served sees every signal
    assert all(SIGNALS_EACH <= value <= total for value in outputs), outputs
    assert max(outputs) == total, outputs


async def test_thousand_signals_from_ten_orchestrations_sum_exactly(app, azure_runtime, azure_backend):
    client = azure_runtime.client()
    outputs = await _run_signallers(client, "inproc")
    _assert_counts(outputs)
    state = await client.read_entity_state(EntityId("chaos_counter", "inproc"))
    assert state.entity_exists and state.entity_state == ORCHESTRATIONS * SIGNALS_EACH


async def _spawn_worker(backend: AzureStorageBackend, *extra: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.worker_process", backend.connection_string, backend.task_hub, *extra,
        cwd=REPO_ROOT,
    )  # fmt: skip


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.terminate()
        await process.wait()


@pytest.mark.parametrize("point", ["committed", "sent"])
async def test_worker_killed_mid_run_loses_and_duplicates_no_signal(azure_backend, point):
    client = df.DurableOrchestrationClient(azure_backend, registry=chaos_app.app.durable_functions)
    spec = {"key": "crash", "count": SIGNALS_EACH}
    ids = await asyncio.gather(*(client.start_new("signal_counter", f"crash-{i}", spec) for i in range(ORCHESTRATIONS)))
    # dies in the middle of the counter's work, right after its first entity step was committed
    # (its replies unsent) or sent (its inbound messages undeleted). The first, because how many
    # steps the counter takes depends on how the signals arrive: an entity applies up to 1,000
    # messages a step, and an orchestration's 100 signals travel in one or two queue messages.
    doomed = await _spawn_worker(
        azure_backend, "--kill-at", point, "--kill-after", "1", "--kill-instance", "@chaos_counter@"
    )
    survivor = None
    try:
        assert await asyncio.wait_for(doomed.wait(), timeout=60) == -9
        survivor = await _spawn_worker(azure_backend)
        outputs = []
        for instance_id in ids:
            status = await client.wait_for_completion(instance_id, timeout=60)
            assert status.runtime_status is S.Completed, status.output
            outputs.append(status.output)
    finally:
        await _stop(doomed)
        if survivor is not None:
            await _stop(survivor)
    _assert_counts(outputs)
    state = await client.read_entity_state(EntityId("chaos_counter", "crash"))
    assert state.entity_exists and state.entity_state == ORCHESTRATIONS * SIGNALS_EACH
    snapshot = EntitySnapshot.from_events((await azure_backend.load_history("@chaos_counter@crash")).events)
    # Each orchestration's 100 signals and 1 call were applied in order, then its "retire" once it
    # ended (which may still be on its way when the workers stop): a sender is either retired or
    # has all its 101 messages applied, none buffered.
    assert snapshot.buffered == {}
    assert set(snapshot.senders.values()) <= {SIGNALS_EACH + 1}
    assert len(snapshot.senders) + len(snapshot.retired) == ORCHESTRATIONS
    assert snapshot.buffered == {} and snapshot.lock_owner is None


async def test_large_state_round_trips_through_a_blob(app, azure_runtime, azure_backend):
    @app.entity_trigger(context_name="context")
    def big(context):
        if context.operation_name == "set":
            context.set_state(context.get_input())
        elif context.operation_name == "get":
            context.set_result(context.get_state())

    @app.orchestration_trigger(context_name="context")
    def big_reader(context):
        value = yield context.call_entity(EntityId("big", "b"), "get")
        return len(value)

    payload = {"text": "".join(chr(ord("a") + i % 26) for i in range(200_000)), "n": 7}
    client = azure_runtime.client()
    await client.signal_entity(EntityId("big", "b"), "set", payload)
    for _ in range(100):  # client signals and orchestration calls are not ordered with each other
        if (await client.read_entity_state(EntityId("big", "b"))).entity_exists:
            break
        await asyncio.sleep(0.1)
    instance_id = await client.start_new("big_reader")
    status = await client.wait_for_completion(instance_id, timeout=30)
    assert status.runtime_status is S.Completed, status.output
    assert status.output == len(payload)
    state = await client.read_entity_state(EntityId("big", "b"))
    assert state.entity_exists and state.entity_state == payload
    container = ContainerClient.from_connection_string(
        azure_backend.connection_string, azure_backend.large_messages_container_name
    )
    async with container:
        blobs = [b.name async for b in container.list_blobs()]
    assert any(name.startswith("@big@b/") for name in blobs), blobs


async def test_call_entity_failure_is_typed(app, azure_runtime):
    @app.entity_trigger(context_name="context")
    def picky(context):
        if context.operation_name == "fail":
            raise KeyError("missing thing")
        context.set_state("ok")

    @app.orchestration_trigger(context_name="context")
    def picky_caller(context):
        try:
            yield context.call_entity(EntityId("picky", "p"), "fail")
        except df.TaskFailedError as error:
            return {"type": error.error_type, "message": error.error_message}
        return None

    client = azure_runtime.client()
    instance_id = await client.start_new("picky_caller")
    status = await client.wait_for_completion(instance_id, timeout=30)
    assert status.output == {"type": "KeyError", "message": "'missing thing'"}


async def test_entity_instances_row_shows_name_status_and_state(app, azure_runtime, azure_backend):
    client = azure_runtime.client()
    entity = EntityId("chaos_counter", "row/key#1")
    await client.signal_entity(entity, "add", 41)
    await client.signal_entity(entity, "add", 1)
    for _ in range(100):
        record = await azure_backend.read_instance(entity.instance_id)
        if record is not None and record.input is not None and json.loads(record.input) == 42:
            break
        await asyncio.sleep(0.1)
    assert record is not None
    assert record.instance_id == "@chaos_counter@row/key#1"
    assert record.name == "chaos_counter"
    assert record.runtime_status is S.Running
    assert json.loads(record.input) == 42
    listed, _ = await client.list_entities("chaos_counter")
    assert [(e.entity_id, e.state) for e in listed] == [(entity, 42)]
