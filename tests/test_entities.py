"""Durable entities on the in-memory backend (DESIGN §6, §7): state and results, failures and
rollback, deletion, entity-to-entity and scheduled signals, exactly-once per-sender ordering under
duplication and reordering, critical sections and their misuse, ids, listing, continue-as-new."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

import durable as df
from durable import EntityId
from durable.core._entities import EntityRequest, EntitySnapshot, entity_message
from durable.core._messages import WorkMessage

S = df.OrchestrationRuntimeStatus


async def settle(runtime: df.DurableRuntime) -> None:
    await runtime.worker.run_until_idle()


async def snapshot_of(runtime: df.DurableRuntime, entity: EntityId) -> EntitySnapshot:
    return EntitySnapshot.from_events((await runtime.backend.load_history(entity.instance_id)).events)


async def state_of(runtime: df.DurableRuntime, entity: EntityId):  # type: ignore[no-untyped-def]
    response = await runtime.client().read_entity_state(entity)
    return response.entity_state if response.entity_exists else "<missing>"


def queued_bodies_for(runtime: df.DurableRuntime, instance_id: str) -> list[tuple[str, str]]:
    """(queue, body) of every queued message addressed to ``instance_id``, after splitting the
    envelopes that carry several messages into one queue message each (as a redelivery does)."""
    runtime.backend.split_envelopes()
    out = []
    for queue, stored in runtime.backend.queues.items():
        for message in stored:
            if json.loads(message.body).get("InstanceId") == instance_id:
                out.append((queue, message.body))
    return out


def register_counter(app: df.DFApp) -> None:
    @app.entity_trigger(context_name="context")
    def counter(context):
        value = context.get_state(lambda: 0)
        if context.operation_name == "add":
            value += context.get_input()
        elif context.operation_name == "get":
            context.set_result(value)
        elif context.operation_name == "reset":
            context.destruct_on_exit()
            return
        elif context.operation_name == "new?":
            context.set_result(context.is_newly_constructed)
        context.set_state(value)


def register_appender(app: df.DFApp, name: str = "log") -> None:
    """An entity whose state is the list of the inputs of its ``append`` operations, in order."""

    @app.entity_trigger(context_name="context", entity_name=name)
    def appender(context):
        items = context.get_state(list)
        if context.operation_name == "append":
            items.append(context.get_input())
        elif context.operation_name == "get":
            context.set_result(items)
        context.set_state(items)


# -- state, results, errors ----------------------------------------------------------------------------
async def test_function_entity_keeps_state_and_returns_results(app, runtime):
    register_counter(app)

    @app.orchestration_trigger(context_name="context")
    def reader(context):
        fresh = yield context.call_entity(EntityId("counter", "other"), "new?")
        value = yield context.call_entity(EntityId("counter", "c1"), "get")
        again = yield context.call_entity(EntityId("counter", "c1"), "new?")
        return [fresh, value, again]

    client = runtime.client()
    assert not (await client.read_entity_state(EntityId("counter", "c1"))).entity_exists
    await client.signal_entity(EntityId("counter", "c1"), "add", 5)
    await client.signal_entity(EntityId("counter", "c1"), "add", 3)
    await settle(runtime)
    state = await client.read_entity_state(EntityId("counter", "c1"))
    assert state.entity_exists and state.entity_state == 8

    iid = await client.start_new("reader")
    await settle(runtime)
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed, status.output
    assert status.output == [True, 8, False]


async def test_class_entity_methods_are_operations_and_fields_are_state(app, runtime):
    @app.entity_trigger(context_name="context")
    class Account:
        def __init__(self):
            self.balance = 0
            self.history = []

        def deposit(self, amount):
            self.balance += amount
            self.history.append(amount)

        def get(self):
            return self.balance

        def _private(self):
            return "secret"

    @app.orchestration_trigger(context_name="context")
    def banker(context):
        account = EntityId("Account", "acc")
        yield context.call_entity(account, "deposit", 30)
        yield context.call_entity(account, "deposit", 12)
        balance = yield context.call_entity(account, "get")
        errors = []
        for operation in ("withdraw_everything", "_private", "__init__"):
            try:
                yield context.call_entity(account, operation)
            except df.TaskFailedError as error:
                errors.append([error.error_type, error.error_message])
        return {"balance": balance, "errors": errors}

    client = runtime.client()
    iid = await client.start_new("banker")
    await settle(runtime)
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed, status.output
    assert status.output["balance"] == 42
    assert [e[0] for e in status.output["errors"]] == ["AttributeError"] * 3
    assert "withdraw_everything" in status.output["errors"][0][1]
    state = await client.read_entity_state(EntityId("account", "acc"))
    assert state.entity_state == {"balance": 42, "history": [30, 12]}


async def test_failing_operation_is_rolled_back_but_earlier_operations_of_the_batch_stay(app, runtime):
    sent_by_failed_operation = EntityId("log", "should-not-receive")
    register_appender(app)

    @app.entity_trigger(context_name="context")
    def ledger(context):
        items = context.get_state(list)
        if context.operation_name == "append":
            items.append(context.get_input())
        elif context.operation_name == "append_then_fail":
            items.append(context.get_input())
            context.set_state(items)
            context.signal_entity(sent_by_failed_operation, "append", "leaked")
            raise ValueError(f"refusing {context.get_input()}")
        elif context.operation_name == "get":
            context.set_result(items)
        context.set_state(items)

    @app.orchestration_trigger(context_name="context")
    def writer(context):
        target = EntityId("ledger", "l1")
        context.signal_entity(target, "append", "a")  # same step → same entity batch as the call
        try:
            yield context.call_entity(target, "append_then_fail", "b")
            failure = None
        except df.TaskFailedError as error:
            failure = {"type": error.error_type, "message": error.error_message}
        items = yield context.call_entity(target, "get")
        return {"failure": failure, "items": items}

    client = runtime.client()
    iid = await client.start_new("writer")
    await runtime.worker.run_once()  # the orchestration's first step: signal + call sent together
    await runtime.worker.run_once()  # the entity's first step: both in one batch
    history = await runtime.backend.load_history("@ledger@l1")
    assert history.checkpoint == 1, "signal and call should have been one entity batch"
    assert await state_of(runtime, EntityId("ledger", "l1")) == ["a"]
    await settle(runtime)
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed, status.output
    assert status.output == {"failure": {"type": "ValueError", "message": "refusing b"}, "items": ["a"]}
    # the failed operation's signals were rolled back with its state
    assert await runtime.backend.read_instance(sent_by_failed_operation.instance_id) is None


async def test_first_operation_failing_leaves_entity_nonexistent(app, runtime):
    @app.entity_trigger(context_name="context")
    def fragile(context):
        context.set_state("created")
        raise RuntimeError("no")

    client = runtime.client()
    await client.signal_entity(EntityId("fragile", "f"), "anything")
    await settle(runtime)
    assert not (await client.read_entity_state(EntityId("fragile", "f"))).entity_exists


async def test_calling_an_unregistered_entity_fails_the_call(app, runtime):
    @app.orchestration_trigger(context_name="context")
    def caller(context):
        try:
            yield context.call_entity(EntityId("ghost", "g"), "boo")
        except df.TaskFailedError as error:
            return error.error_type

    client = runtime.client()
    iid = await client.start_new("caller")
    await settle(runtime)
    assert (await client.get_status(iid)).output == "LookupError"


# -- deletion --------------------------------------------------------------------------------------------
async def test_destruct_on_exit_deletes_the_state_and_the_entity_can_be_recreated(app, runtime):
    register_counter(app)
    client = runtime.client()
    entity = EntityId("counter", "d1")
    await client.signal_entity(entity, "add", 7)
    await settle(runtime)
    assert (await runtime.backend.read_instance(entity.instance_id)).runtime_status is S.Running

    await client.signal_entity(entity, "reset")
    await settle(runtime)
    assert not (await client.read_entity_state(entity)).entity_exists
    row = await runtime.backend.read_instance(entity.instance_id)
    assert row.runtime_status is S.Completed
    assert row.input is None
    assert [e.entity_id for e in (await client.list_entities("counter"))[0]] == []

    await client.signal_entity(entity, "add", 2)  # starts over from the initializer
    await settle(runtime)
    assert (await client.read_entity_state(entity)).entity_state == 2
    assert (await runtime.backend.read_instance(entity.instance_id)).runtime_status is S.Running


async def test_client_delete_entity_deletes_the_state_and_the_entity_can_be_recreated(app, runtime):
    register_counter(app)

    @app.orchestration_trigger(context_name="context")
    def probe(context):
        fresh = yield context.call_entity(EntityId("counter", "d2"), "new?")
        return fresh

    client = runtime.client()
    entity = EntityId("counter", "d2")
    await client.signal_entity(entity, "add", 7)
    await settle(runtime)
    await client.delete_entity(entity)
    await settle(runtime)
    assert not (await client.read_entity_state(entity)).entity_exists
    assert (await runtime.backend.read_instance(entity.instance_id)).runtime_status is S.Completed

    iid = await client.start_new("probe")
    await settle(runtime)
    assert (await client.get_status(iid)).output is True  # newly constructed again
    await client.signal_entity(entity, "add", 1)
    await settle(runtime)
    assert await state_of(runtime, entity) == 1


# -- signals -------------------------------------------------------------------------------------------
async def test_entity_signals_another_entity_in_order(app, runtime):
    register_appender(app)

    @app.entity_trigger(context_name="context")
    def fanout(context):
        for i in range(context.get_input()):
            context.signal_entity(EntityId("log", "sink"), "append", i)
        context.signal_entity("@log@sink", "append", "end")  # instance-id form also accepted
        context.set_state(context.get_state(lambda: 0) + 1)

    client = runtime.client()
    await client.signal_entity(EntityId("fanout", "f"), "go", 5)
    await settle(runtime)
    await client.signal_entity(EntityId("fanout", "f"), "go", 2)
    await settle(runtime)
    assert await state_of(runtime, EntityId("log", "sink")) == [0, 1, 2, 3, 4, "end", 0, 1, "end"]
    assert await state_of(runtime, EntityId("fanout", "f")) == 2


async def test_scheduled_signal_from_client_is_delivered_only_after_its_time(app, runtime, clock):
    register_counter(app)
    client = runtime.client()
    entity = EntityId("counter", "later")
    await client.signal_entity(entity, "add", 1, scheduled_time=clock.now + timedelta(seconds=60))
    await settle(runtime)
    assert not (await client.read_entity_state(entity)).entity_exists
    clock.advance(59)
    await settle(runtime)
    assert not (await client.read_entity_state(entity)).entity_exists
    clock.advance(2)
    await settle(runtime)
    assert await state_of(runtime, entity) == 1

    with pytest.raises(ValueError):
        await client.signal_entity(entity, "add", 1, scheduled_time=clock.now.replace(tzinfo=None))


async def test_scheduled_signal_from_orchestration_is_delivered_only_after_its_time(app, runtime, clock):
    register_counter(app)

    @app.orchestration_trigger(context_name="context")
    def scheduler(context):
        context.signal_entity(
            EntityId("counter", "sched"), "add", 10, scheduled_time=context.current_utc_datetime + timedelta(minutes=5)
        )
        context.signal_entity(EntityId("counter", "sched"), "add", 1)
        return "sent"
        yield

    client = runtime.client()
    iid = await client.start_new("scheduler")
    await settle(runtime)
    assert (await client.get_status(iid)).runtime_status is S.Completed
    assert await state_of(runtime, EntityId("counter", "sched")) == 1
    clock.advance(299)
    await settle(runtime)
    assert await state_of(runtime, EntityId("counter", "sched")) == 1
    clock.advance(2)
    await settle(runtime)
    assert await state_of(runtime, EntityId("counter", "sched")) == 11


async def test_orchestration_signals_apply_exactly_once_in_order_despite_duplicates_and_reordering(app, runtime):
    register_appender(app)
    entity = EntityId("log", "dup")

    @app.orchestration_trigger(context_name="context")
    def sender(context):
        for i in range(1, 6):
            context.signal_entity(entity, "append", i)
        yield context.create_timer(context.current_utc_datetime)
        for i in range(6, 9):
            context.signal_entity(entity, "append", i)
        return "done"

    client = runtime.client()
    iid = await client.start_new("sender")
    await runtime.worker.run_orchestrations_once()  # first step: five signals queued, not yet applied
    queued = queued_bodies_for(runtime, entity.instance_id)
    assert len(queued) == 5
    # reorder: reverse the entity's messages in their queue, and add a duplicate of each
    (queue,) = {q for q, _ in queued}
    stored = runtime.backend.queues[queue]
    mine = [m for m in stored if json.loads(m.body)["InstanceId"] == entity.instance_id]
    others = [m for m in stored if m not in mine]
    runtime.backend.queues[queue] = others + list(reversed(mine))
    for q, body in queued:
        runtime.backend.put_raw(q, body)
    await settle(runtime)
    assert (await client.get_status(iid)).runtime_status is S.Completed
    assert await state_of(runtime, entity) == [1, 2, 3, 4, 5, 6, 7, 8]

    # late duplicates of already applied messages change nothing
    for q, body in queued:
        runtime.backend.put_raw(q, body)
    await runtime.backend.send([WorkMessage.from_json(queued[0][1])])
    await settle(runtime)
    assert await state_of(runtime, entity) == [1, 2, 3, 4, 5, 6, 7, 8]


async def test_client_signal_duplicated_on_the_queue_applies_once(app, runtime):
    register_counter(app)
    client = runtime.client()
    entity = EntityId("counter", "once")
    await client.signal_entity(entity, "add", 4)
    ((queue, body),) = queued_bodies_for(runtime, entity.instance_id)
    runtime.backend.put_raw(queue, body)
    await settle(runtime)
    runtime.backend.put_raw(queue, body)  # and once more after it was applied
    await settle(runtime)
    assert await state_of(runtime, entity) == 4


@pytest.mark.parametrize("one_batch", [False, True])
async def test_sequenced_messages_sent_out_of_order_apply_in_sequence(app, runtime, clock, one_batch):
    register_appender(app)
    target = EntityId("log", "seq").instance_id

    def message(seq: int, message_id: str | None = None) -> WorkMessage:
        request = EntityRequest("op", operation="append", input=json.dumps(seq), sender="s1", seq=seq)
        return entity_message(target, request, clock.now, message_id or f"m{seq}")

    if one_batch:
        await runtime.backend.send([message(3), message(1), message(2), message(2, "another-id")])
        await settle(runtime)
    else:
        await runtime.backend.send([message(3)])
        await settle(runtime)
        assert await state_of(runtime, EntityId("log", "seq")) == "<missing>"  # buffered behind the gap
        await runtime.backend.send([message(1)])
        await settle(runtime)
        assert await state_of(runtime, EntityId("log", "seq")) == [1]
        await runtime.backend.send([message(2)])
        await settle(runtime)
    assert await state_of(runtime, EntityId("log", "seq")) == [1, 2, 3]
    # another sender has its own sequence; an old sequence number of s1 is a duplicate
    other = EntityRequest("op", operation="append", input='"x"', sender="s2", seq=1)
    await runtime.backend.send([entity_message(target, other, clock.now, "x1"), message(1, "stale")])
    await settle(runtime)
    assert await state_of(runtime, EntityId("log", "seq")) == [1, 2, 3, "x"]
    assert (await snapshot_of(runtime, EntityId("log", "seq"))).buffered == {}


# -- critical sections ------------------------------------------------------------------------------------
def register_bank(app: df.DFApp, observed: list[tuple[str, str, str]]) -> None:
    @app.entity_trigger(context_name="context")
    def account(context):
        balance = context.get_state(lambda: 0)
        request = context.get_input() or {}
        observed.append((context.entity_key, context.operation_name, request.get("by", "?")))
        if context.operation_name == "get":
            context.set_result(balance)
        elif context.operation_name == "set":
            balance = request["value"]
        elif context.operation_name == "deposit":  # read-modify-write outside any lock
            balance += request["amount"]
        context.set_state(balance)

    @app.orchestration_trigger(context_name="context")
    def transfer(context):
        spec = context.get_input()
        source, target = EntityId("account", spec["from"]), EntityId("account", spec["to"])
        me = {"by": context.instance_id}
        with (yield context.lock([target, source])):  # any order: locks are taken in a global order
            a = yield context.call_entity(source, "get", me)
            b = yield context.call_entity(target, "get", me)
            yield context.call_entity(source, "set", {**me, "value": a - spec["amount"]})
            yield context.call_entity(target, "set", {**me, "value": b + spec["amount"]})
        return "ok"


def assert_contiguous(observed: list[tuple[str, str, str]], keys: list[str]) -> None:
    for key in keys:
        owners = [by for k, _, by in observed if k == key and by.startswith("t")]
        runs = [o for i, o in enumerate(owners) if i == 0 or owners[i - 1] != o]
        assert len(runs) == len(set(runs)), f"sections interleaved on {key}: {owners}"


async def test_concurrent_transfers_never_interleave(app, runtime):
    observed: list[tuple[str, str, str]] = []
    register_bank(app, observed)
    client = runtime.client()
    await client.signal_entity(EntityId("account", "a"), "deposit", {"amount": 1000})
    await settle(runtime)
    ids = []
    for i in range(1, 7):
        direction = {"from": "a", "to": "b"} if i % 2 else {"from": "b", "to": "a"}
        ids.append(await client.start_new("transfer", f"t{i}", {**direction, "amount": 10 * i}))
    # unlocked deposits arrive while the sections run: they must wait, not interleave
    for _ in range(3):
        await client.signal_entity(EntityId("account", "a"), "deposit", {"amount": 1, "by": "client"})
        await client.signal_entity(EntityId("account", "b"), "deposit", {"amount": 1, "by": "client"})
        for _ in range(3):
            await runtime.worker.run_once()
    await settle(runtime)
    for iid in ids:
        assert (await client.get_status(iid)).runtime_status is S.Completed
    moved = sum(10 * i if i % 2 else -10 * i for i in range(1, 7))
    assert await state_of(runtime, EntityId("account", "a")) == 1000 - moved + 3
    assert await state_of(runtime, EntityId("account", "b")) == moved + 3
    assert_contiguous(observed, ["a", "b"])
    # within each entity, a section's four-operation pattern is never split by a client deposit
    for key in ("a", "b"):
        seq = [(op, by) for k, op, by in observed if k == key]
        for i, (op, by) in enumerate(seq):
            if op == "get" and by.startswith("t"):
                assert seq[i + 1] == ("set", by), f"something ran inside {by}'s section on {key}: {seq}"
    for key in ("a", "b"):
        assert (await snapshot_of(runtime, EntityId("account", key))).lock_owner is None


async def test_lock_is_released_at_the_end_of_the_with_block(app, runtime):
    observed: list[tuple[str, str, str]] = []
    register_bank(app, observed)

    @app.orchestration_trigger(context_name="context")
    def holder(context):
        entity = EntityId("account", "x")
        with (yield context.lock([entity])) as section:
            assert [str(e) for e in section.entities] == ["@account@x"]
            yield context.call_entity(entity, "set", {"value": 5, "by": "holder"})
            yield context.wait_for_external_event("leave")
        # after the section, the entity can be signalled and called again
        context.signal_entity(entity, "deposit", {"amount": 1, "by": "holder"})
        value = yield context.call_entity(entity, "get", {"by": "holder"})
        done = yield context.wait_for_external_event("finish")
        return [value, done]

    @app.orchestration_trigger(context_name="context")
    def later(context):
        with (yield context.lock([EntityId("account", "x")])):
            value = yield context.call_entity(EntityId("account", "x"), "get", {"by": "later"})
        return value

    client = runtime.client()
    first = await client.start_new("holder", "holder")
    await settle(runtime)
    assert (await snapshot_of(runtime, EntityId("account", "x"))).lock_owner.startswith("holder|")
    second = await client.start_new("later", "later")
    await client.signal_entity(EntityId("account", "x"), "deposit", {"amount": 100, "by": "client"})
    await settle(runtime)
    assert (await client.get_status(second)).runtime_status is S.Running  # waits for the lock
    await client.raise_event(first, "leave")
    await settle(runtime)
    # holder left its section (and is still running): the waiting lock and signal got through
    assert (await client.get_status(first)).runtime_status is S.Running
    assert (await client.get_status(second)).runtime_status is S.Completed
    await client.raise_event(first, "finish", "yes")
    await settle(runtime)
    status = await client.get_status(first)
    assert status.runtime_status is S.Completed, status.output
    assert await state_of(runtime, EntityId("account", "x")) == 106
    assert (await snapshot_of(runtime, EntityId("account", "x"))).lock_owner is None


async def _assert_lock_free(runtime: df.DurableRuntime, key: str) -> None:
    """A fresh orchestration can take the lock on ``account/key`` and finish."""
    client = runtime.client()
    iid = await client.start_new("later_locker", None, key)
    await settle(runtime)
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed, f"lock on {key} was never released: {status.runtime_status}"
    assert (await snapshot_of(runtime, EntityId("account", key))).lock_owner is None


def register_later_locker(app: df.DFApp) -> None:
    @app.orchestration_trigger(context_name="context")
    def later_locker(context):
        entity = EntityId("account", context.get_input())
        with (yield context.lock([entity])):
            value = yield context.call_entity(entity, "get")
        return value


@pytest.mark.parametrize("how", ["fails-inside", "fails-after", "returns-inside", "never-exits", "terminated"])
async def test_locks_are_released_when_the_orchestration_ends(app, runtime, how):
    register_bank(app, [])
    register_later_locker(app)

    @app.orchestration_trigger(context_name="context")
    def ender(context):
        entities = [EntityId("account", "p"), EntityId("account", "q")]
        if how == "never-exits":
            yield context.lock(entities)  # the section is never left explicitly
            yield context.call_entity(entities[0], "get")
            return "done"
        with (yield context.lock(entities)):
            yield context.call_entity(entities[0], "get")
            if how == "fails-inside":
                raise ValueError("inside")
            if how == "returns-inside":
                return "done"
            if how == "terminated":
                yield context.wait_for_external_event("never")
        raise ValueError("after")

    client = runtime.client()
    iid = await client.start_new("ender", "ender")
    await settle(runtime)
    if how == "terminated":
        assert (await snapshot_of(runtime, EntityId("account", "q"))).lock_owner.startswith("ender|")
        await client.terminate(iid, "stop")
        await settle(runtime)
    expected = {"fails-inside": S.Failed, "fails-after": S.Failed, "terminated": S.Terminated}.get(how, S.Completed)
    assert (await client.get_status(iid)).runtime_status is expected
    await _assert_lock_free(runtime, "p")
    await _assert_lock_free(runtime, "q")


async def test_lock_requested_by_an_orchestration_terminated_while_waiting_is_released(app, runtime):
    """DESIGN §7: the orchestration ending for any reason releases every lock — including one it
    was still waiting for when it was terminated."""
    register_bank(app, [])
    register_later_locker(app)

    @app.orchestration_trigger(context_name="context")
    def sitter(context):
        with (yield context.lock([EntityId("account", "w")])):
            yield context.wait_for_external_event("leave")
        return "left"

    client = runtime.client()
    holder = await client.start_new("sitter", "holder")
    await settle(runtime)
    waiter = await client.start_new("sitter", "waiter")
    await settle(runtime)  # its lock request is queued behind holder's
    await client.terminate(waiter, "give up")
    await settle(runtime)
    assert (await client.get_status(waiter)).runtime_status is S.Terminated
    await client.raise_event(holder, "leave")
    await settle(runtime)
    assert (await client.get_status(holder)).output == "left"
    await _assert_lock_free(runtime, "w")


MISUSES = {
    "nested-lock": "nested",
    "sub-orchestration": "sub-orchestration",
    "unlocked-call": "@account@outside",
    "two-pending-calls": "one pending call",
    "signal-locked": "locked by this critical section",
}


@pytest.mark.parametrize("misuse", sorted(MISUSES))
async def test_misuse_inside_a_critical_section_fails_at_the_call_site(app, runtime, misuse):
    register_bank(app, [])
    register_later_locker(app)

    @app.orchestration_trigger(context_name="context")
    def child(context):
        return "child"
        yield

    @app.orchestration_trigger(context_name="context")
    def misuser(context):
        locked = EntityId("account", "m")
        with (yield context.lock([locked])):
            yield context.call_entity(locked, "get")  # a legal call first
            try:
                if misuse == "nested-lock":
                    yield context.lock([EntityId("account", "n")])
                elif misuse == "sub-orchestration":
                    yield context.call_sub_orchestrator("child")
                elif misuse == "unlocked-call":
                    yield context.call_entity(EntityId("account", "outside"), "get")
                elif misuse == "two-pending-calls":
                    yield context.task_all([context.call_entity(locked, "get"), context.call_entity(locked, "get")])
                elif misuse == "signal-locked":
                    context.signal_entity(locked, "deposit", {"amount": 1})
            except df.OrchestrationApiMisuse as error:
                context.set_custom_status(type(error).__name__)  # raised synchronously at the call site
                raise
        return "should not get here"

    client = runtime.client()
    iid = await client.start_new("misuser")
    await settle(runtime)
    status = await client.get_status(iid)
    assert status.runtime_status is S.Failed, status.output
    assert status.failure_details["ErrorType"] == "OrchestrationApiMisuse"
    assert MISUSES[misuse] in status.failure_details["Message"]
    assert status.custom_status == "OrchestrationApiMisuse"
    assert (await client.get_status(f"{iid}:2")) is None  # no sub-orchestration was started
    await _assert_lock_free(runtime, "m")
    assert await state_of(runtime, EntityId("account", "m")) == 0  # the signal never went out


async def test_calls_and_signals_to_other_entities_are_allowed_after_the_section(app, runtime):
    register_bank(app, [])

    @app.orchestration_trigger(context_name="context")
    def sequential(context):
        x, y = EntityId("account", "s1"), EntityId("account", "s2")
        with (yield context.lock([x])):
            yield context.call_entity(x, "set", {"value": 1})
        with (yield context.lock([x, y])):  # a second, non-nested section
            a, b = yield context.task_all([context.call_entity(x, "get"), context.call_entity(y, "get")])
        context.signal_entity(x, "deposit", {"amount": 10})
        return [a, b]

    client = runtime.client()
    iid = await client.start_new("sequential")
    await settle(runtime)
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed, status.output
    assert status.output == [1, 0]
    assert await state_of(runtime, EntityId("account", "s1")) == 11


# -- ids, names, listing -------------------------------------------------------------------------------
def test_entity_id_validation_and_case_insensitive_names():
    for name, key in [("a@b", "k"), ("", "k"), ("a", ""), (None, "k"), ("a", None)]:
        with pytest.raises(ValueError):
            EntityId(name, key)  # type: ignore[arg-type]
    entity = EntityId("Counter", "Key@1")
    assert entity.name == "counter" and entity.key == "Key@1"  # keys keep their case (and may hold '@')
    assert entity.instance_id == "@counter@Key@1"
    assert EntityId.from_instance_id("@counter@Key@1") == entity
    assert EntityId("COUNTER", "k") == EntityId("counter", "k")
    for bad in ["counter", "@counter", "@@k", ""]:
        with pytest.raises(ValueError):
            EntityId.from_instance_id(bad)
    app = df.DFApp()
    with pytest.raises(ValueError):
        app.entity_trigger(context_name="context", entity_name="bad@name")(lambda context: None)


async def test_entity_names_are_case_insensitive_end_to_end(app, runtime):
    @app.entity_trigger(context_name="context", entity_name="MixedCase")
    def anything(context):
        context.set_state(context.get_state(lambda: 0) + context.get_input())
        context.set_result(context.get_state())

    @app.orchestration_trigger(context_name="context")
    def shouter(context):
        value = yield context.call_entity(EntityId("MIXEDCASE", "k"), "add", 1)
        return value

    client = runtime.client()
    await client.signal_entity(EntityId("mixedcase", "k"), "add", 10)
    await client.signal_entity("@MixedCase@k", "add", 100)
    iid = await client.start_new("shouter")
    await settle(runtime)
    assert (await client.get_status(iid)).output in (1, 11, 111)
    assert await state_of(runtime, EntityId("mIxEdCaSe", "k")) == 111
    assert await state_of(runtime, EntityId("mixedcase", "K")) == "<missing>"  # keys are case-sensitive


async def test_list_entities_pages_through_existing_entities_of_one_name(app, runtime):
    register_counter(app)

    @app.entity_trigger(context_name="context")
    def count(context):  # a name that is a prefix of "counter"
        context.set_state(1)

    client = runtime.client()
    for i in range(5):
        await client.signal_entity(EntityId("counter", f"c{i}"), "add", i + 1)
    await client.signal_entity(EntityId("count", "c9"), "x")
    await client.signal_entity(EntityId("counter", "gone"), "add", 1)
    await settle(runtime)
    await client.signal_entity(EntityId("counter", "gone"), "reset")
    await settle(runtime)

    seen, token, pages = [], None, 0
    while True:
        page, token = await client.list_entities("Counter", 2, token)
        pages += 1
        assert len(page) <= 2
        seen.extend((e.entity_id, e.state) for e in page)
        if token is None:
            break
    assert pages == 3
    assert sorted(seen, key=lambda s: s[0].key) == [(EntityId("counter", f"c{i}"), i + 1) for i in range(5)]
    only, token = await client.list_entities("count")
    assert [(e.entity_id.key, e.state) for e in only] == [("c9", 1)] and token is None
    assert (await client.list_entities("nobody"))[0] == []


# -- continue-as-new -------------------------------------------------------------------------------------
async def test_signal_right_before_continue_as_new_is_delivered(app, runtime):
    register_appender(app)

    @app.orchestration_trigger(context_name="context")
    def looper(context):
        n = context.get_input()
        yield context.create_timer(context.current_utc_datetime)
        context.signal_entity(EntityId("log", "can"), "append", n)
        if n < 3:
            context.continue_as_new(n + 1)
            return None
        return n

    client = runtime.client()
    iid = await client.start_new("looper", None, 0)
    await settle(runtime)
    assert (await client.get_status(iid)).output == 3
    assert await state_of(runtime, EntityId("log", "can")) == [0, 1, 2, 3]


async def test_signals_of_executions_continued_within_one_step_are_all_delivered(app, runtime):
    """Several continue-as-new executions that never wait run in one step; each one's signal must
    still go out (none may be dropped when the next execution starts)."""
    register_appender(app)

    @app.orchestration_trigger(context_name="context")
    def spinner(context):
        n = context.get_input()
        context.signal_entity(EntityId("log", "spin"), "append", n)
        if n < 3:
            context.continue_as_new(n + 1)
            return None
        return n
        yield

    client = runtime.client()
    iid = await client.start_new("spinner", None, 0)
    await settle(runtime)
    assert (await client.get_status(iid)).output == 3
    assert await state_of(runtime, EntityId("log", "spin")) == [0, 1, 2, 3]
