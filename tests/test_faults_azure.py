"""Storage faults on Azurite: 503s, dropped connections (before and after the request reached
storage) and delays, injected into the storage clients' pipelines by ``tests.faults``.

The rule these tests hold the runtime to: a storage call that fails, or that succeeds but whose
answer is lost, never strands a lock, an instance or a message — at worst it delays them by a
few seconds.

Scenario 15 (bank transfers under ``context.lock`` behind a faulty proxy, three workers): most
transfers still Running after 15 minutes with every account locked, and starts left Pending.
Scenario 16 (an entity purged while orchestrations are still signalling it): the senders stay
Running with their operations buffered on an entity that starts over.

Faults are seeded or scripted (``Rule``), so each test injects the same faults on every run; a
stall shows as instances not finishing before a bounded deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from azure.core.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError

import durable as df
from durable import EntityId, OrchestrationRuntimeStatus
from storage.azure import AzureStorageBackend
from tests.faults import (
    PROXY_RATES,
    Fault,
    FaultInjector,
    FaultRates,
    Placement,
    RequestInfo,
    Rule,
    fast_sdk_retries,
    install_faults,
)

pytestmark = pytest.mark.azurite

S = OrchestrationRuntimeStatus


def worker_options(**overrides: Any) -> df.WorkerOptions:
    """Fast polling and short leases, so that a delivery lost to a fault comes back quickly;
    ``overrides`` that this version's WorkerOptions does not know are ignored."""
    known = {f.name for f in dataclasses.fields(df.WorkerOptions)}
    values: dict[str, Any] = {
        "idle_poll_min": 0.02,
        "idle_poll_max": 0.1,
        "visibility_timeout": 5.0,
        "retry_delay": 0.2,
        "max_retry_delay": 2.0,
    }
    values.update(overrides)
    return df.WorkerOptions(**{k: v for k, v in values.items() if k in known})


# -- the apps ---------------------------------------------------------------------------------------------
def bank_app() -> df.DFApp:
    """The bank transfer sample's entities and orchestrations."""
    from samples.bank_transfer.blueprint import bp

    app = df.DFApp()
    app.register_functions(bp)
    return app


def counter_app() -> df.DFApp:
    app = df.DFApp()

    @app.entity_trigger(context_name="context", entity_name="counter")
    def counter(context: df.DurableEntityContext) -> None:
        value = context.get_state(lambda: 0)
        if context.operation_name == "add":
            value += context.get_input()
        elif context.operation_name == "get":
            context.set_result(value)
        context.set_state(value)

    @app.orchestration_trigger(context_name="context")
    def signal_twice(context: df.DurableOrchestrationContext):  # type: ignore[no-untyped-def]
        """Signal the counter, wait for "go", signal it again and read it."""
        counter_id = EntityId("counter", context.get_input())
        context.signal_entity(counter_id, "add", 1)
        yield context.wait_for_external_event("go")
        context.signal_entity(counter_id, "add", 10)
        value = yield context.call_entity(counter_id, "get")
        return value

    @app.orchestration_trigger(context_name="context")
    def hello(context: df.DurableOrchestrationContext):  # type: ignore[no-untyped-def]
        return f"hello {context.get_input()}"
        yield  # a generator

    return app


# -- a cluster of workers, each behind its own faulty pipelines --------------------------------------------
@dataclasses.dataclass
class Cluster:
    """``workers`` workers on one task hub, each on its own backend (own clients, own faults), and
    a client on another backend with its own faults. Faults start disabled."""

    app: df.DFApp
    connection: str
    hub: str
    workers: int = 3
    options: df.WorkerOptions = dataclasses.field(default_factory=worker_options)
    placement: Placement = Placement.PER_RETRY
    client_placement: Placement = Placement.PER_CALL
    rates: FaultRates = dataclasses.field(default_factory=FaultRates)
    seed: int = 0
    fast_retries: bool = True

    def __post_init__(self) -> None:
        self.backends: list[AzureStorageBackend] = []
        self.injectors: list[FaultInjector] = []
        self.client_backend = AzureStorageBackend(self.connection, task_hub=self.hub)
        self.client_faults = FaultInjector(seed=self.seed * 1000 + 999, enabled=False)
        install_faults(self.client_backend, self.client_faults, self.client_placement)
        for index in range(self.workers):
            backend = AzureStorageBackend(self.connection, task_hub=self.hub)
            injector = FaultInjector(seed=self.seed * 1000 + index, rates=self.rates, enabled=False)
            install_faults(backend, injector, self.placement)
            if self.fast_retries:
                fast_sdk_retries(backend)
            self.backends.append(backend)
            self.injectors.append(injector)
        if self.fast_retries:
            fast_sdk_retries(self.client_backend)
        self.client = df.DurableOrchestrationClient(self.client_backend, registry=self.app.durable_functions)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def worker_faults(self, enabled: bool) -> None:
        for injector in self.injectors:
            injector.enabled = enabled

    def add_worker_rule(self, rule_factory: Callable[[], Rule]) -> list[Rule]:
        """The same scripted fault on every worker (each gets its own copy of the rule)."""
        rules = [injector.add_rule(rule_factory()) for injector in self.injectors]
        return rules

    def faults_log(self) -> list[Any]:
        return [entry for injector in [*self.injectors, self.client_faults] for entry in injector.log]

    async def start(self) -> None:
        for backend in self.backends:
            worker = df.Worker(self.app.durable_functions, backend, options=self.options)
            self._tasks.append(asyncio.create_task(worker.run(self._stop)))

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for backend in [*self.backends, self.client_backend]:
            with contextlib.suppress(Exception):
                await backend.close()


@contextlib.asynccontextmanager
async def cluster(azure_backend: AzureStorageBackend, app: df.DFApp, **kwargs: Any) -> AsyncIterator[Cluster]:
    nodes = Cluster(app, azure_backend.connection_string, azure_backend.task_hub, **kwargs)
    await nodes.start()
    try:
        yield nodes
    finally:
        await nodes.stop()


async def statuses(client: df.DurableOrchestrationClient, ids: list[str]) -> dict[str, S | None]:
    found = await asyncio.gather(*(client.get_status(i) for i in ids))
    return {i: (s.runtime_status if s is not None else None) for i, s in zip(ids, found, strict=True)}


async def wait_until_finished(
    client: df.DurableOrchestrationClient, ids: list[str], timeout: float
) -> dict[str, S | None]:
    """Poll until every instance is terminal or ``timeout`` passes; the last statuses."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        current = await statuses(client, ids)
        if all(s is not None and s.is_terminal for s in current.values()) or loop.time() >= deadline:
            return current
        await asyncio.sleep(0.25)


def unfinished(current: dict[str, S | None]) -> dict[str, str]:
    return {i: (s.value if s is not None else "missing") for i, s in current.items() if s is None or not s.is_terminal}


def instances_insert(info: RequestInfo) -> bool:
    """An insert into the Instances table (``create_instance``: the Pending row of a start)."""
    return info.method == "POST" and info.path.rstrip("/").endswith("Instances")


# -- 0. the harness does what its docstring says ---------------------------------------------------------------
async def test_fault_policy_places_faults_before_or_after_the_sdk_retries(azure_backend):
    hub, connection = azure_backend.task_hub, azure_backend.connection_string
    client = df.DurableOrchestrationClient(azure_backend)
    async with (
        AzureStorageBackend(connection, task_hub=hub) as per_retry,
        AzureStorageBackend(connection, task_hub=hub) as per_call,
    ):
        retry_faults, call_faults = FaultInjector(seed=1), FaultInjector(seed=1)
        install_faults(per_retry, retry_faults, Placement.PER_RETRY)
        install_faults(per_call, call_faults, Placement.PER_CALL)
        fast_sdk_retries(per_retry)
        fast_sdk_retries(per_call)
        messages = df.DurableOrchestrationClient(per_retry)

        # After the retry policy, a lost answer to a queue put is retried: the message is there twice.
        retry_faults.add_rule(Rule(Fault.LOSE_ANSWER, kind="queue.send"))
        await messages.signal_entity(EntityId("counter", "dup"), "add", 1)
        queue = azure_backend._queue(_control_queue_of(azure_backend, "@counter@dup"))
        peeked = await queue.peek_messages(max_messages=32)
        assert len(peeked) == 2
        # A 503 after the retry policy is retried away...
        retry_faults.add_rule(Rule(Fault.SERVER_BUSY, kind="table.write", times=2))
        await per_retry.create_instance(_pending_record("busy"))
        # ...but not a dropped connection on a POST (table inserts and transactions): it surfaces.
        retry_faults.add_rule(Rule(Fault.DROP_REQUEST, kind="table.write"))
        with pytest.raises(ServiceRequestError):
            await per_retry.create_instance(_pending_record("dropped"))
        assert await client.get_status("dropped") is None

        # Before the retry policy every fault reaches the backend: a 503...
        call_faults.add_rule(Rule(Fault.SERVER_BUSY, kind="table.write"))
        with pytest.raises(HttpResponseError) as busy:
            await per_call.create_instance(_pending_record("refused"))
        assert busy.value.status_code == 503
        # ...and an answer lost after the insert was made.
        call_faults.add_rule(Rule(Fault.LOSE_ANSWER, kind="table.write"))
        with pytest.raises(ServiceResponseError):
            await per_call.create_instance(_pending_record("lost"))
        lost = await client.get_status("lost")
        assert lost is not None and lost.runtime_status is S.Pending

        # Seeded rates draw the same faults on every run.
        def draws(seed: int) -> list[Fault]:
            injector = FaultInjector(seed=seed, rates=PROXY_RATES)
            info = RequestInfo("queue.receive", "GET", "http://x/q/messages", "/q/messages", None)
            return [injector.decide(info, Placement.PER_RETRY)[0] for _ in range(500)]

        assert draws(7) == draws(7) != draws(8)


def _control_queue_of(backend: AzureStorageBackend, instance_id: str) -> str:
    try:
        from durable.runtime._backend import control_queue, partition_of
    except ImportError:  # the layout before durable/runtime
        from durable._backend import control_queue, partition_of  # type: ignore[no-redef]

    return control_queue(partition_of(instance_id, backend.partition_count))


def _pending_record(instance_id: str) -> Any:
    from datetime import datetime, timezone

    try:
        from durable.core._status import InstanceRecord
    except ImportError:  # the layout before durable/core
        from durable._status import InstanceRecord  # type: ignore[no-redef]

    now = datetime.now(timezone.utc)
    return InstanceRecord(instance_id, "hello", S.Pending, now, now, execution_id="e1")


# -- 15a. starts: a lost answer to the Pending row's insert, or a refused start message ----------------------------
async def test_start_new_retried_after_the_answer_to_its_insert_was_lost_starts_the_instance(azure_backend):
    """Scenario 15's Pending starts: the Pending row's insert succeeded but its answer was lost
    (not retried by the SDK: a POST); the caller retried start_new with the same id and was
    told the instance exists — with no start message ever sent."""
    async with cluster(azure_backend, counter_app(), workers=1) as nodes:
        nodes.client_faults.enabled = True
        nodes.client_faults.add_rule(Rule(Fault.LOSE_ANSWER, kind="table.write", match=instances_insert))
        try:
            await nodes.client.start_new("hello", "retried", "world")
        except ServiceResponseError:  # it may also make sense of the lost answer itself
            await nodes.client.start_new("hello", "retried", "world")  # the caller's retry
        assert nodes.client_faults.log, "the insert was not hit"
        status = await nodes.client.wait_for_completion("retried", timeout=20)
        assert status.runtime_status is S.Completed and status.output == "hello world"


async def test_start_new_retried_after_its_start_message_was_refused_starts_the_instance(azure_backend):
    """The Pending row was written, then the start message's put failed (a 503 that reached the
    caller); the caller's retry must send it, not answer "exists"."""
    async with cluster(azure_backend, counter_app(), workers=1) as nodes:
        nodes.client_faults.enabled = True
        nodes.client_faults.add_rule(Rule(Fault.SERVER_BUSY, kind="queue.send"))
        try:
            await nodes.client.start_new("hello", "resent", "again")
        except HttpResponseError:  # (or it retries the put itself)
            await nodes.client.start_new("hello", "resent", "again")  # the caller's retry
        assert nodes.client_faults.log, "the start message's put was not hit"
        status = await nodes.client.wait_for_completion("resent", timeout=20)
        assert status.runtime_status is S.Completed and status.output == "hello again"


async def test_a_start_whose_insert_answer_was_lost_is_not_left_pending(azure_backend):
    """The same lost answer, for a start with a generated id (the HTTP starter's way): the caller
    cannot retry it (it never learnt the id), so start_new must either start the instance or leave
    nothing behind — never a Pending row that no start message will ever reach."""
    async with cluster(azure_backend, counter_app(), workers=1) as nodes:
        nodes.client_faults.enabled = True
        nodes.client_faults.add_rule(Rule(Fault.LOSE_ANSWER, kind="table.write", match=instances_insert))
        started: str | None = None
        with contextlib.suppress(ServiceResponseError):
            started = await nodes.client.start_new("hello", None, "anyone")
        if started is not None:
            status = await nodes.client.wait_for_completion(started, timeout=20)
            assert status.runtime_status is S.Completed
        await asyncio.sleep(5)  # the workers have long processed whatever was sent
        pending = await nodes.client.get_status_by(runtime_status=[S.Pending])
        assert [p.instance_id for p in pending] == [], "a start left Pending for good"


async def test_a_start_whose_start_message_could_not_be_sent_is_not_left_pending(azure_backend):
    """A start with a generated id whose Pending row was written but whose start message's put
    was refused (a 503 that reached the caller): start_new raises, and the caller, who never
    learnt the id, cannot retry it. The row must not stay Pending for good (start_new can retry
    the put, take its row back, or a worker can later settle a Pending row no start reaches)."""
    async with cluster(azure_backend, counter_app(), workers=1) as nodes:
        nodes.client_faults.enabled = True
        nodes.client_faults.add_rule(Rule(Fault.SERVER_BUSY, kind="queue.send"))
        started: str | None = None
        with contextlib.suppress(HttpResponseError):
            started = await nodes.client.start_new("hello", None, "nobody")
        assert nodes.client_faults.log, "the start message's put was not hit"
        if started is not None:
            status = await nodes.client.wait_for_completion(started, timeout=20)
            assert status.runtime_status is S.Completed
        await asyncio.sleep(5)
        pending = await nodes.client.get_status_by(runtime_status=[S.Pending])
        assert [p.instance_id for p in pending] == [], "a start left Pending for good"


# -- 15b. critical sections under a faulty proxy ----------------------------------------------------------------
async def _fund(client: df.DurableOrchestrationClient, accounts: list[str], amount: int) -> None:
    ids = [await client.start_new("bank_deposit", f"fund-{a}", {"account": a, "amount": amount}) for a in accounts]
    for instance_id in ids:
        assert (await client.wait_for_completion(instance_id, timeout=30)).runtime_status is S.Completed


async def _balances(client: df.DurableOrchestrationClient, accounts: list[str]) -> dict[str, Any]:
    states = await asyncio.gather(*(client.read_entity_state(EntityId("account", a)) for a in accounts))
    return {a: (s.entity_state or {}).get("balance") for a, s in zip(accounts, states, strict=True)}


@pytest.mark.parametrize("placement", [Placement.PER_RETRY, Placement.PER_CALL])
async def test_bank_transfers_behind_a_faulty_proxy_all_complete_and_leave_no_lock(azure_backend, placement):
    """Scenario 15 scaled down: 3 workers, 24 transfers over 4 accounts, the proxy's fault rates
    (2% 503, 1% drops before and 1% after the request reached storage, 3% delays up to 2 s) on
    every storage call of every worker for 20 s, then none. Every transfer completes, every
    account ends unlocked (a later transfer over all of them completes) and no money is made or
    lost. Leases are 5 s here, so a lost delivery costs seconds (see the next test for 300 s).
    Per call, every fault reaches the backend (no SDK retry absorbs any)."""
    accounts = ["a", "b", "c", "d"]
    rng = random.Random(15)
    transfers = {
        f"t{n}": {"from": pair[0], "to": pair[1], "amount": rng.randint(1, 30)}
        for n, pair in enumerate(rng.sample(accounts, 2) for _ in range(24))
    }
    nodes_of = cluster(azure_backend, bank_app(), workers=3, rates=PROXY_RATES, seed=15, placement=placement)
    async with nodes_of as nodes:
        await _fund(nodes.client, accounts, 1000)
        nodes.worker_faults(True)
        for instance_id, request in transfers.items():
            await nodes.client.start_new("bank_transfer", instance_id, request)
        during = await wait_until_finished(nodes.client, list(transfers), timeout=20)
        nodes.worker_faults(False)
        after = await wait_until_finished(nodes.client, list(transfers), timeout=25)
        assert unfinished(after) == {}, (
            f"stranded after the faults stopped: {unfinished(after)} "
            f"(unfinished while faulty: {len(unfinished(during))}; faults: {len(nodes.faults_log())})"
        )
        assert all(s is S.Completed for s in after.values())
        # No lock left behind: transfers over every account still get their locks.
        for source, target in (("a", "b"), ("c", "d")):
            request = {"from": source, "to": target, "amount": 1}
            check = await nodes.client.start_new("bank_transfer", f"check-{source}", request)
            assert (await nodes.client.wait_for_completion(check, timeout=10)).runtime_status is S.Completed
        assert sum((await _balances(nodes.client, accounts)).values()) == 4 * 1000


def lock_request_of(instance_id: str) -> Callable[[bytes], bool]:
    """Whether a queue request or answer body holds the lock request of ``instance_id``'s
    critical section (its first action: message id ``{instance}/{execution}/EventSent/0``)."""
    prefix, suffix = f"{instance_id}/".encode(), b"/EventSent/0"
    return lambda body: prefix in body and suffix in body


def _carries(holds: Callable[[bytes], bool]) -> Callable[[RequestInfo, int, bytes], bool]:
    """An answer to a queue receive that carries the message ``holds`` recognises."""
    return lambda info, status, body: status == 200 and holds(body)


async def test_a_lost_receive_answer_holds_a_critical_section_up_for_seconds_not_a_lease(azure_backend):
    """The mechanism behind scenario 15's stall: a receive is a GET that takes the messages (it
    makes them invisible for the visibility timeout); when its answer is lost the SDK retries
    and gets the *next* messages, and the lost ones come back only when their lease runs out —
    300 s with the worker's default options. A lock request in that batch holds every transfer
    waiting on its accounts for 5 minutes; with ~1% of receives lost, 200 serialised transfers
    make almost no progress in 15 minutes. Here: the default options, one lost receive answer
    (the one carrying the lock request), and the transfer must finish within 30 s. Without
    partition leases: with them, the worker hands the lock request over to the account it holds
    and never receives it (tests/test_handover.py)."""
    default_lease = df.WorkerOptions().visibility_timeout
    options = worker_options(visibility_timeout=default_lease, max_retry_delay=300.0, partition_leases=False)
    async with cluster(azure_backend, bank_app(), workers=1, options=options) as nodes:
        await _fund(nodes.client, ["x", "y"], 100)
        nodes.worker_faults(True)
        nodes.add_worker_rule(
            lambda: Rule(Fault.LOSE_ANSWER, kind="queue.receive", answer_match=_carries(lock_request_of("held-up")))
        )
        await nodes.client.start_new("bank_transfer", "held-up", {"from": "x", "to": "y", "amount": 5})
        status = await wait_until_finished(nodes.client, ["held-up"], timeout=30)
        assert nodes.faults_log(), "the receive carrying the lock request was not hit"
        assert unfinished(status) == {}, "one lost receive answer held the critical section up for a whole lease"


async def test_a_refused_queue_call_holds_a_critical_section_up_for_seconds_not_the_sdk_back_off(azure_backend):
    """The other contributor: the queue SDK's default retry policy waits 15 s (then 18 s, 24 s)
    before retrying a 503, inside the step, with the instance's messages leased and its locks
    held. With the backend's own clients (no shortened back-off), one 503 on the put of the lock
    request must not cost the transfer more than 10 s."""
    async with cluster(azure_backend, bank_app(), workers=1, fast_retries=False) as nodes:
        await _fund(nodes.client, ["p", "q"], 100)
        nodes.worker_faults(True)
        nodes.add_worker_rule(
            lambda: Rule(
                Fault.SERVER_BUSY, kind="queue.send", match=lambda info: lock_request_of("busy")(info.body or b"")
            )
        )
        await nodes.client.start_new("bank_transfer", "busy", {"from": "p", "to": "q", "amount": 5})
        status = await wait_until_finished(nodes.client, ["busy"], timeout=10)
        assert nodes.faults_log(), "the put of the lock request was not hit"
        assert unfinished(status) == {}, "one 503 held the critical section up for the SDK's back-off"


# -- 16. purging an entity that orchestrations are still signalling --------------------------------------------------
async def _value(client: df.DurableOrchestrationClient, key: str) -> Any:
    state = await client.read_entity_state(EntityId("counter", key))
    return state.entity_state if state.entity_exists else None


async def _wait_for(predicate: Callable[[], Any], timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await predicate():
        if loop.time() >= deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.1)


async def test_purging_an_entity_between_two_signals_of_a_running_orchestration_strands_nothing(azure_backend):
    """Scenario 16, deterministic: the orchestration has signalled the counter once (sequence
    number 1 from its execution) and waits; the counter's state is deleted, so the purge's
    "in use" check (state, lock, waiting, buffered) lets it through — but the counter still
    knew that sender. The purged counter starts over, and the orchestration's next messages
    (sequence 2 and 3) wait behind a sequence 1 that will never come again: the signal is
    buffered and the call never answered."""
    async with cluster(azure_backend, counter_app(), workers=1) as nodes:
        client = nodes.client
        await client.start_new("signal_twice", "sender", "k")
        await _wait_for(lambda: _is(client, "k", 1), timeout=15)
        await client.delete_entity(EntityId("counter", "k"))
        await _wait_for(lambda: _is(client, "k", None), timeout=15)
        with contextlib.suppress(ValueError):  # refusing the purge is a fine answer too
            await client.purge_instance_history("@counter@k")
        await client.raise_event("sender", "go")
        status = await wait_until_finished(client, ["sender"], timeout=15)
        assert unfinished(status) == {}, "the sender's messages were buffered on the purged entity"
        assert (await client.get_status("sender")).output in (10, 11)


async def _is(client: df.DurableOrchestrationClient, key: str, value: Any) -> bool:
    return await _value(client, key) == value


async def test_a_purge_racing_an_entity_step_strands_nothing(azure_backend):
    """Scenario 16 as a race: the purge checks the entity (its first step not committed yet:
    nothing in use), then lists and deletes its rows. Here the entity's first commit is slow (a
    1.5 s proxy delay) and so is the purge's listing (2 s): the commit lands in between, and the
    purge deletes it — state and sender numbering — while its sender goes on: its next signal
    and call are buffered forever. A purge must be atomic with its check (e.g. delete the
    sentinel under the ETag it checked, first)."""
    async with cluster(azure_backend, counter_app(), workers=1) as nodes:
        client = nodes.client
        nodes.worker_faults(True)
        (slow_commit,) = nodes.add_worker_rule(
            lambda: Rule(Fault.DELAY, kind="table.batch", delay=1.5, match=lambda i: b"@counter@r" in (i.body or b""))
        )
        await client.start_new("signal_twice", "racer", "r")
        await _wait_for(lambda: _true(slow_commit.hits > 0), timeout=15)  # the entity's commit is on its way
        nodes.client_faults.enabled = True
        nodes.client_faults.add_rule(
            Rule(Fault.DELAY, kind="table.query", delay=2.0, match=lambda i: "select" in i.url.lower())
        )
        with contextlib.suppress(ValueError):  # refusing the purge is a fine answer too
            await client.purge_instance_history("@counter@r")
        nodes.client_faults.enabled = False
        await client.raise_event("racer", "go")
        status = await wait_until_finished(client, ["racer"], timeout=15)
        assert unfinished(status) == {}, "the racer's messages were buffered on an entity purged mid-step"
        assert (await client.get_status("racer")).output in (10, 11)


async def _true(value: bool) -> bool:
    return value
