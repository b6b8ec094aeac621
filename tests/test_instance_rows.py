"""Instances rows of steps that change nothing they show wait (protocol I6).

A step whose row would show what the row already shows (a lock granted, a read, an orchestration
that moved on without changing its status) and that sends no work item writes the row
``WorkerOptions.row_delay`` seconds later, or never when a later step's row comes first. These
tests drive the worker step by step on the in-memory backend and a fake clock, writing held-back
rows only when they say so (``row_timer=False``). Only a worker that holds partitions (a
long-running host, which writes its held rows when it stops) holds rows back: these workers
get an ownership that holds none."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest

import durable as df
from durable.core._status import InstanceRecord
from durable.runtime._ownership import PartitionOwnership
from storage import InMemoryBackend

S = df.OrchestrationRuntimeStatus
COUNTER = df.EntityId("counter", "c")


@pytest.fixture
def make(clock) -> Callable[..., df.DurableRuntime]:
    def build(app: df.Blueprint, backend: InMemoryBackend | None = None, **options: object) -> df.DurableRuntime:
        backend = backend or InMemoryBackend(partition_count=4, clock=clock)
        settings = {"inline_activities": False, "row_timer": False, **options}
        runtime = df.DurableRuntime(app, backend, clock=clock, options=df.WorkerOptions(**settings))  # type: ignore[arg-type]
        runtime.worker.ownership = PartitionOwnership(backend, clock=lambda: clock().timestamp())
        return runtime

    return build


@pytest.fixture
def counter_app(app: df.DFApp) -> df.DFApp:
    @app.entity_trigger(context_name="context")
    def counter(context):
        value = context.get_state(lambda: 0)
        if context.operation_name == "add":
            context.set_state(value + context.get_input())
        context.set_result(value)

    @app.orchestration_trigger(context_name="context")
    def read_then_wait(context):
        value = yield context.call_entity(COUNTER, "get")
        yield context.wait_for_external_event("go")
        return value

    @app.orchestration_trigger(context_name="context")
    def read_then_echo(context):
        value = yield context.call_entity(COUNTER, "get")
        return (yield context.call_activity("echo", value))

    @app.activity_trigger(input_name="value")
    def echo(value):
        return value

    return app


async def _row_and_history(runtime: df.DurableRuntime, instance_id: str) -> tuple[InstanceRecord, int]:
    record = await runtime.backend.read_instance(instance_id)
    assert record is not None
    return record, (await runtime.backend.load_history(instance_id)).checkpoint


async def _steps(runtime: df.DurableRuntime) -> None:
    """Process what is visible, without writing held-back rows (``run_until_idle`` writes them)."""
    while await runtime.worker.run_once():
        pass


async def _read(runtime: df.DurableRuntime, added: int) -> df.DurableOrchestrationClient:
    """The counter added ``added`` to, then read by ``reader`` (which waits for "go"): the rows of
    the read and of the step that took its answer are held back."""
    client = runtime.client()
    await client.signal_entity(COUNTER, "add", added)
    await client.start_new("read_then_wait", "reader")
    await _steps(runtime)
    return client


async def test_a_read_holds_the_entity_row_back_until_it_is_due_and_a_change_writes_at_once(counter_app, make, clock):
    runtime = make(counter_app)
    client = runtime.client()
    await client.signal_entity(COUNTER, "add", 5)
    await _steps(runtime)
    record, checkpoint = await _row_and_history(runtime, COUNTER.instance_id)
    assert record.checkpoint == checkpoint == 1 and record.input == "5"  # a change: written at once

    await client.start_new("read_then_wait", "reader")
    await _steps(runtime)
    record, checkpoint = await _row_and_history(runtime, COUNTER.instance_id)
    assert checkpoint == 2 and record.checkpoint == 1, "the read changed nothing the row shows"
    assert (await client.read_entity_state(COUNTER)).entity_state == 5
    # The orchestration's step that took the answer shows Running, as its first did: held back too.
    record, checkpoint = await _row_and_history(runtime, "reader")
    assert record.runtime_status is S.Running and (record.checkpoint, checkpoint) == (1, 2)
    clock.advance(0.5)
    assert await runtime.worker.write_held_rows() == 0  # not due yet
    clock.advance(0.6)
    assert await runtime.worker.write_held_rows() == 2
    record, checkpoint = await _row_and_history(runtime, COUNTER.instance_id)
    assert record.checkpoint == checkpoint == 2 and record.input == "5"
    record, checkpoint = await _row_and_history(runtime, "reader")
    assert record.runtime_status is S.Running and record.checkpoint == checkpoint == 2
    await client.raise_event("reader", "go")
    await _steps(runtime)
    record, checkpoint = await _row_and_history(runtime, "reader")
    assert record.runtime_status is S.Completed and record.output == "5" and record.checkpoint == checkpoint == 3


async def test_a_later_step_writes_the_row_a_held_back_one_would_have(counter_app, make, clock):
    runtime = make(counter_app)
    client = await _read(runtime, 1)
    await client.signal_entity(COUNTER, "add", 2)  # before the held-back read's row is due
    await _steps(runtime)
    record, checkpoint = await _row_and_history(runtime, COUNTER.instance_id)
    assert record.checkpoint == checkpoint and record.input == "3"
    clock.advance(5)
    await runtime.worker.write_held_rows()
    record, _ = await _row_and_history(runtime, COUNTER.instance_id)
    assert record.checkpoint == checkpoint and record.input == "3"


async def test_a_step_that_sends_a_work_item_writes_its_row_at_once(counter_app, make):
    """Else a worker loading the instance before the row is written would send the work item
    again, and the activity would run twice."""
    runtime = make(counter_app)
    client = runtime.client()
    await client.start_new("read_then_echo", "echoer")
    await runtime.worker.run_orchestrations_once()  # the start: asks the entity
    await runtime.worker.run_orchestrations_once()  # the entity answers (its row held back)
    await runtime.worker.run_orchestrations_once()  # the answer: the work item goes out
    record, checkpoint = await _row_and_history(runtime, "echoer")
    assert checkpoint == 2 and record.checkpoint == 2 and record.runtime_status is S.Running


async def test_an_inline_chain_writes_the_row_its_first_step_changed(app, make):
    """Only a chain's last row is written: the status its first step changed must show, though
    the last step alone changed nothing."""

    @app.orchestration_trigger(context_name="context")
    def work_then_wait(context):
        yield context.call_activity("noop", None)
        yield context.wait_for_external_event("go")
        return "done"

    @app.activity_trigger(input_name="value")
    def noop(value):
        return value

    runtime = make(app, inline_activities=True)
    await runtime.client().start_new("work_then_wait", "chain")
    await runtime.worker.run_orchestrations_once()
    record, checkpoint = await _row_and_history(runtime, "chain")
    assert checkpoint == 2 and record.checkpoint == 2 and record.runtime_status is S.Running


async def test_a_worker_that_loads_an_instance_whose_row_lags_sends_its_messages_again_and_writes_it(
    counter_app, make, caplog
):
    caplog.set_level(logging.INFO, logger="durable.worker")
    first = make(counter_app)
    client = await _read(first, 7)  # ``first`` then dies, its held-back rows with it
    record, checkpoint = await _row_and_history(first, COUNTER.instance_id)
    assert record.checkpoint < checkpoint

    second = make(counter_app, backend=first.backend)
    await client.signal_entity(COUNTER, "add", 1)
    await second.worker.run_until_idle()
    record, checkpoint = await _row_and_history(second, COUNTER.instance_id)
    assert record.checkpoint == checkpoint and record.input == "8"
    # The answer to the read went out again: the orchestration applied it once.
    history = await second.backend.load_history("reader")
    answers = [e for e in history.events if e.event_type is df.EventType.TASK_COMPLETED]
    assert len(answers) == 1
    assert any("for reader" in r.getMessage() and r.getMessage().startswith("dropped") for r in caplog.records)
    await client.raise_event("reader", "go")
    await second.worker.run_until_idle()
    status = await client.get_status("reader")
    assert status.runtime_status is S.Completed and status.output == 7


async def _held_then_purged(counter_app: df.DFApp, make: Callable[..., df.DurableRuntime]) -> df.DurableRuntime:
    """A worker holding back a row of ``reader``, which another worker completes and the client
    then purges."""
    first = make(counter_app)
    client = first.client()
    await client.start_new("read_then_wait", "reader")
    await _steps(first)  # ``first`` holds back the row of the step that took the entity's answer
    second = make(counter_app, backend=first.backend)
    await client.raise_event("reader", "go")
    await second.worker.run_until_idle()
    assert (await client.get_status("reader")).runtime_status is S.Completed
    await client.purge_instance_history("reader")
    return first


async def test_a_held_back_row_never_brings_back_a_purged_instance(counter_app, make):
    first = await _held_then_purged(counter_app, make)
    await first.worker.write_held_rows(everything=True)
    assert await first.client().get_status("reader") is None


async def test_a_held_back_row_never_replaces_the_pending_row_of_the_id_started_again(counter_app, make):
    first = await _held_then_purged(counter_app, make)
    client = first.client()
    await client.start_new("read_then_wait", "reader")
    pending = await client.get_status("reader")
    await first.worker.write_held_rows(everything=True)
    status = await client.get_status("reader")
    assert status.runtime_status is S.Pending and status.created_time == pending.created_time


async def test_a_held_back_row_whose_write_fails_stays_held_until_a_write_succeeds(counter_app, make, clock):
    runtime = make(counter_app)
    await _read(runtime, 1)
    update, failures = runtime.backend.update_instance, 0

    async def failing_once(record, etag=None):  # type: ignore[no-untyped-def]
        nonlocal failures
        if failures == 0:
            failures += 1
            raise ConnectionError("storage unavailable")
        return await update(record, etag)

    runtime.backend.update_instance = failing_once  # type: ignore[method-assign]
    clock.advance(2)
    written = await runtime.worker.write_held_rows()
    assert written == 1 and runtime.worker.rows_due_at is not None  # one written, one still held
    assert await runtime.worker.write_held_rows() == 1
    assert runtime.worker.rows_due_at is None
    for instance_id in (COUNTER.instance_id, "reader"):
        record, checkpoint = await _row_and_history(runtime, instance_id)
        assert record.checkpoint == checkpoint
