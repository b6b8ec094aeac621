"""Messages between instances of partitions one process holds are handed over in that process
(``Worker._send``): sent hidden for a lease as their durable copy, processed at once without a
receive, and taken from the queue like any other message if their process dies first. And
deliveries that reach an instance while its next step waits for its turn join that step."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import durable as df
from durable.runtime._backend import partition_of
from durable.runtime._ownership import IDLE_RELEASE_SECONDS, PartitionOwnership
from durable.runtime._worker import Invocation
from storage import InMemoryBackend
from tests.conftest import FakeClock

S = df.OrchestrationRuntimeStatus


def bank_app() -> df.DFApp:
    app = df.DFApp()

    @app.entity_trigger(context_name="context")
    def account(context: df.DurableEntityContext) -> None:
        balance = context.get_state(lambda: 0) + (context.get_input() or 0)
        context.set_state(balance)
        context.set_result(balance)

    @app.orchestration_trigger(context_name="context")
    def move(context: df.DurableOrchestrationContext):  # type: ignore[no-untyped-def]
        source, target = df.EntityId("account", "a"), df.EntityId("account", "b")
        with (yield context.lock([source, target])):
            yield context.call_entity(source, "add", -5)
            return (yield context.call_entity(target, "add", 5))

    return app


class Receipts:
    """A worker's handle on a shared in-memory hub, counting the messages it received."""

    def __init__(self, backend: InMemoryBackend) -> None:
        self.backend = backend
        self.received = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)

    async def receive(self, queue: str, max_count: int, visibility_timeout: float) -> list[Any]:
        got = await self.backend.receive(queue, max_count, visibility_timeout)
        self.received += len(got)
        return got


async def test_messages_between_held_partitions_are_never_received_from_the_queue() -> None:
    backend = InMemoryBackend(partition_count=4)
    spy = Receipts(backend)
    app = bank_app()
    async with df.DurableRuntime(app, spy, options=df.WorkerOptions(idle_poll_max=0.2)) as runtime:  # type: ignore[arg-type]
        client = runtime.client()
        instance_id = await client.start_new("move")
        status = await client.wait_for_completion(instance_id, timeout=10)
    assert (status.runtime_status, status.output) == (S.Completed, 5)
    # The first message of each partition came through its queue (the worker took the partition
    # up then); everything after — of ten lock requests, grants, calls, answers and releases —
    # was handed over between the instances.
    instances = [instance_id, df.EntityId("account", "a").instance_id, df.EntityId("account", "b").instance_id]
    assert spy.received == len({partition_of(i, 4) for i in instances})
    assert all(not messages for messages in backend.queues.values())  # each settled on its queue


async def test_a_handed_over_message_is_taken_from_the_queue_when_its_process_dies(clock: FakeClock) -> None:
    backend = InMemoryBackend(partition_count=4, clock=clock)
    app = bank_app()
    dead: list[str] = []

    def die_at_hand_over(point: str, instance_id: str) -> None:
        if point == "handed-over":
            dead.append(instance_id)
            raise asyncio.CancelledError  # the process is gone: nothing it was handed runs

    options = df.WorkerOptions(visibility_timeout=20, fault_hook=die_at_hand_over)
    doomed = df.Worker(app.durable_functions, backend, clock=clock, options=options)
    doomed.ownership = PartitionOwnership(backend, clock=lambda: clock().timestamp())
    for partition in range(4):
        assert await doomed.ownership.claim(partition)
    client = df.DurableOrchestrationClient(backend, clock=clock)
    instance_id = await client.start_new("move")
    await doomed.run_once()  # the first step asks for the locks: handed over, and lost
    await asyncio.sleep(0)
    assert dead  # the lock request went to the first account in this process, and died with it
    survivor = df.Worker(app.durable_functions, backend, clock=clock)
    await survivor.run_until_idle()
    assert (await client.get_status(instance_id)).runtime_status is S.Running  # hidden: the lease runs
    clock.advance(21)
    await survivor.run_until_idle()
    status = await client.get_status(instance_id)
    assert (status.runtime_status, status.output) == (S.Completed, 5)
    balances = [await client.read_entity_state(df.EntityId("account", key)) for key in "ab"]
    assert [b.entity_state for b in balances] == [-5, 5]


class StepKinds:
    """A worker observer that records the kind of every step it runs ("Entity", "Orchestrator")."""

    def __init__(self) -> None:
        self.steps: list[str] = []

    @contextlib.asynccontextmanager
    async def invoking(self, invocation: Invocation) -> AsyncIterator[None]:
        self.steps.append(invocation.kind)
        yield

    def committed(self, commit: object) -> None:
        pass


async def signalled_tally(signals: int) -> tuple[df.DFApp, InMemoryBackend, df.DurableOrchestrationClient, df.EntityId]:
    """A tally entity on a one-partition backend, sent ``signals`` signals (1, 2, ...) one queue
    message each."""
    app = df.DFApp()

    @app.entity_trigger(context_name="context")
    def tally(context: df.DurableEntityContext) -> None:
        context.set_state(context.get_state(lambda: 0) + context.get_input())

    backend = InMemoryBackend(partition_count=1)
    client = df.DurableOrchestrationClient(backend)
    entity = df.EntityId("tally", "t")
    for amount in range(1, signals + 1):
        await client.signal_entity(entity, "add", amount)
    return app, backend, client, entity


async def test_deliveries_arriving_while_a_step_waits_join_it() -> None:
    """Ten queue messages for one entity, processed by ten concurrent invocations (as the
    Functions host's queue triggers run them): the first steps alone, the other nine join the
    one step that waits for it, and every invocation returns once its message is applied."""
    app, backend, client, entity = await signalled_tally(10)
    observer = StepKinds()
    worker = df.Worker(app.durable_functions, backend, options=df.WorkerOptions(observer=observer))
    commit = backend.commit

    async def commit_taking_a_while(*args: Any, **kwargs: Any) -> str:
        await asyncio.sleep(0.01)  # as a commit to Azure Storage does: the others arrive meanwhile
        return await commit(*args, **kwargs)

    backend.commit = commit_taking_a_while  # type: ignore[method-assign]
    separately = [await backend.receive("control-00", 1, 30) for _ in range(10)]  # one per queue message
    await asyncio.gather(*(worker.process_deliveries(one) for one in separately))
    assert observer.steps == ["Entity", "Entity"]
    assert (await client.read_entity_state(entity)).entity_state == sum(range(1, 11))
    assert backend.queues["control-00"] == []  # all settled


async def test_a_partition_that_only_gets_handed_over_work_stays_held(clock: FakeClock) -> None:
    """Handed-over messages never pass their queue's poller, and still count as the partition's
    work: it is not released as idle while they flow."""
    backend = InMemoryBackend(partition_count=4, clock=clock)
    worker = df.Worker(bank_app().durable_functions, backend, clock=clock)
    ownership = worker.ownership = PartitionOwnership(backend, clock=lambda: clock().timestamp())
    accounts = {partition_of(df.EntityId("account", key).instance_id, 4) for key in "ab"}
    instance_id = next(f"move-{n}" for n in range(100) if partition_of(f"move-{n}", 4) not in accounts)
    for partition in range(4):
        assert await ownership.claim(partition)
    clock.advance(IDLE_RELEASE_SECONDS - 5)
    client = df.DurableOrchestrationClient(backend, clock=clock)
    await client.start_new("move", instance_id)
    await worker.run_until_idle()  # the start is received; all the rest is handed over
    status = await client.wait_for_completion(instance_id, timeout=10)
    assert status.runtime_status is S.Completed
    clock.advance(10)  # the accounts' partitions got no receive since they were taken up
    await ownership.round()
    assert accounts <= set(ownership.owned)


async def test_results_of_one_fan_outs_envelopes_run_side_by_side_go_back_in_one_send() -> None:
    """A fan-out of 64 activities travels as two work-item envelopes; run by two concurrent
    invocations (as the Functions host runs queue triggers), their results go back in one send,
    which the orchestration applies in one step."""
    app = df.DFApp()

    @app.orchestration_trigger(context_name="context")
    def fan(context):  # type: ignore[no-untyped-def]
        return sum((yield context.task_all([context.call_activity("double", i) for i in range(64)])))

    @app.activity_trigger(input_name="value")
    def double(value: int) -> int:
        return 2 * value

    backend = InMemoryBackend(partition_count=1)
    client = df.DurableOrchestrationClient(backend)
    worker = df.Worker(app.durable_functions, backend, options=df.WorkerOptions(inline_activities=False))
    instance_id = await client.start_new("fan")
    await worker.run_orchestrations_once()
    envelopes = [await backend.receive("workitems", 1, 30) for _ in range(2)]
    assert all(len(envelope) == 32 for envelope in envelopes)  # two queue messages, 32 work items each
    await asyncio.gather(*(worker.process_deliveries(envelope) for envelope in envelopes))
    assert len(backend.queues["control-00"]) == 1  # all 64 results in one queue message
    assert backend.queues["workitems"] == []  # both envelopes settled once their results went out
    await worker.run_orchestrations_once()
    assert (await client.get_status(instance_id)).output == 2 * sum(range(64))


async def test_an_entity_takes_more_deliveries_than_a_step_holds_in_several_steps_without_requeueing() -> None:
    """25 signals reach an entity at once, 10 a step (``entity_batch_size``): three steps in a
    row, none of the signals put back on the queue (each would be sent again on its own)."""
    app, backend, client, entity = await signalled_tally(25)
    observer = StepKinds()
    options = df.WorkerOptions(entity_batch_size=10, observer=observer)
    worker = df.Worker(app.durable_functions, backend, options=options)
    await worker.process_deliveries(await backend.receive("control-00", 32, 30))
    assert observer.steps == ["Entity"] * 3
    assert backend.queues["control-00"] == []  # every signal settled, none sent again
    assert (await client.read_entity_state(entity)).entity_state == sum(range(1, 26))


async def test_when_a_later_step_of_a_burst_fails_the_earlier_steps_deliveries_are_settled() -> None:
    """25 signals, 10 a step, the third step's commit failing: the 20 signals the first two steps
    applied are settled (not left to come back after their lease), the last 5 are put back."""
    app, backend, client, entity = await signalled_tally(25)
    worker = df.Worker(app.durable_functions, backend, options=df.WorkerOptions(entity_batch_size=10))
    commit, commits = backend.commit, 0

    async def third_commit_failing(*args: Any, **kwargs: Any) -> str:
        nonlocal commits
        commits += 1
        if commits == 3:
            raise ConnectionError("storage unavailable")
        return await commit(*args, **kwargs)

    backend.commit = third_commit_failing  # type: ignore[method-assign]
    await worker.process_deliveries(await backend.receive("control-00", 32, 30))
    assert (await client.read_entity_state(entity)).entity_state == sum(range(1, 21))
    assert backend.pending_count() == 5  # the third step's signals, put back for a retry


async def test_steps_for_handed_over_messages_take_the_step_slots() -> None:
    """The local host gives the worker its maxConcurrentOrchestratorFunctions slots: the steps
    taken for handed-over messages count against them, as its control-queue invocations do."""

    def app_signalling_six() -> df.DFApp:
        app = df.DFApp()

        @app.entity_trigger(context_name="context")
        def tally(context: df.DurableEntityContext) -> None:
            context.set_state(context.get_state(lambda: 0) + 1)

        @app.orchestration_trigger(context_name="context")
        def spread(context: df.DurableOrchestrationContext):  # type: ignore[no-untyped-def]
            for key in range(6):
                context.signal_entity(df.EntityId("tally", str(key)), "add")
            return (yield context.call_activity("done", None))

        @app.activity_trigger(input_name="unused")
        def done(unused: None) -> str:
            return "done"

        return app

    async def most_entity_commits_at_once(slots: asyncio.Semaphore | None) -> int:
        backend = InMemoryBackend(partition_count=1)  # one partition: every signal is handed over
        commit, running, peak = backend.commit, 0, 0

        async def commit_taking_a_while(instance_id: str, **kwargs: Any) -> str:
            nonlocal running, peak
            entity = instance_id.startswith("@")
            running += entity
            peak = max(peak, running)
            try:
                await asyncio.sleep(0.02)
                return await commit(instance_id, **kwargs)
            finally:
                running -= entity

        backend.commit = commit_taking_a_while  # type: ignore[method-assign]
        async with df.DurableRuntime(app_signalling_six(), backend) as runtime:
            runtime.worker.step_slots = slots
            client = runtime.client()
            status = await client.wait_for_completion(await client.start_new("spread"), timeout=10)
            assert status.runtime_status is S.Completed
            for key in range(6):
                state = await client.read_entity_state(df.EntityId("tally", str(key)))
                assert state.entity_state == 1
        return peak

    assert await most_entity_commits_at_once(asyncio.Semaphore(2)) == 2
    assert await most_entity_commits_at_once(None) == 6
