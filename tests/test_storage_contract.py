"""The storage contract: every backend behaves the same (in-memory, and Azure Storage on Azurite)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from durable.core._history import EventType, FailureDetails, HistoryEvent
from durable.core._ids import validate_instance_id
from durable.core._messages import MessageTarget, WorkMessage
from durable.core._status import InstanceRecord, OrchestrationRuntimeStatus
from durable.runtime._backend import (
    MAX_QUEUE_DELAY_SECONDS,
    WORK_ITEM_QUEUE,
    Backend,
    ReceivedMessage,
    control_queue,
    partition_of,
)
from storage import ConcurrencyConflict, InMemoryBackend, InstanceExists, InstanceQuery, PoisonedMessage
from storage._limits import lease_seconds, message_delay, receive_count
from storage.azure import AzureStorageBackend, StorageRequestCounter
from storage.azure._keys import (
    escape_key,
    odata_string,
    prefix_upper_bound,
    unescape_key,
)

T0 = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=timezone.utc)
S = OrchestrationRuntimeStatus
DUMMY_CS = (
    "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=a2V5;"
    "BlobEndpoint=http://127.0.0.1:1/devstoreaccount1;QueueEndpoint=http://127.0.0.1:2/devstoreaccount1;"
    "TableEndpoint=http://127.0.0.1:3/devstoreaccount1;"
)


class FakeClock:
    def __init__(self) -> None:
        self.now = datetime.now(timezone.utc)

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Env:
    backend: Backend
    kind: str
    clock: FakeClock | None = None

    @property
    def azure(self) -> AzureStorageBackend:
        assert isinstance(self.backend, AzureStorageBackend)
        return self.backend

    def now(self) -> datetime:
        return self.clock() if self.clock else datetime.now(timezone.utc)

    async def advance(self, seconds: float) -> None:
        if self.clock is not None:
            self.clock.now += timedelta(seconds=seconds)
        else:
            await asyncio.sleep(seconds)

    async def put_raw(self, queue: str, body: str) -> None:
        if isinstance(self.backend, InMemoryBackend):
            self.backend.put_raw(queue, body)
        else:
            await self.azure.put_raw(queue, body)

    async def queue_length(self, queue: str) -> int:
        """Messages on ``queue``, visible or not."""
        if isinstance(self.backend, InMemoryBackend):
            return len(self.backend.queues.get(queue, []))
        properties = await self.azure._queue(queue).get_queue_properties()
        return int(properties.approximate_message_count or 0)

    async def poisoned(self) -> list[tuple[str, str, str]]:
        if isinstance(self.backend, InMemoryBackend):
            return list(self.backend.poison_queue)
        return await self.azure.poison_messages()


@pytest.fixture(params=["memory", pytest.param("azure", marks=pytest.mark.azurite)])
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    if request.param == "memory":
        clock = FakeClock()
        yield Env(InMemoryBackend(clock=clock), "memory", clock)
    else:
        yield Env(request.getfixturevalue("azure_backend"), "azure")


def event(i: int, **fields: object) -> HistoryEvent:
    ts = T0 + timedelta(seconds=i)
    return HistoryEvent(EventType.TASK_SCHEDULED, ts, event_id=i, name=f"act{i}", **fields)  # type: ignore[arg-type]


def all_fields_event() -> HistoryEvent:
    return HistoryEvent(
        event_type=EventType.SUB_ORCHESTRATION_FAILED,
        timestamp=T0,
        event_id=7,
        name="child",
        input='{"a": [1, 2, "ü\'\\""]}',
        result='"done"',
        failure=FailureDetails("ValueError", "bad 'value'", "Traceback...\n  line 1"),
        task_scheduled_id=3,
        timer_id=4,
        fire_at=T0 + timedelta(days=3, microseconds=7),
        instance_id="child/1",
        execution_id="exec-1",
        parent_instance_id="parent#1",
        parent_execution_id="exec-0",
        parent_task_scheduled_id=2**40,
        runtime_status="Failed",
        message_id="m-1",
        version="1.0",
    )


def message(instance_id: str, *, payload: str = '"x"', visible_at: datetime | None = None) -> WorkMessage:
    ev = HistoryEvent(EventType.EVENT_RAISED, T0, name="evt", input=payload)
    return WorkMessage(MessageTarget.ORCHESTRATION, instance_id, ev, visible_at=visible_at)


def record(instance_id: str, status: S = S.Running, checkpoint: int = 0, **fields: object) -> InstanceRecord:
    return InstanceRecord(
        instance_id=instance_id,
        name="orch",
        runtime_status=status,
        created_time=fields.pop("created_time", T0),  # type: ignore[arg-type]
        last_updated_time=T0,
        checkpoint=checkpoint,
        **fields,  # type: ignore[arg-type]
    )


async def commit(b: Backend, iid: str, etag: str | None, keep: int, events: list[HistoryEvent], cp: int = 1) -> str:
    return await b.commit(
        iid, expected_etag=etag, execution_id="e1", keep=keep, new_events=events,
        outbox_start=keep, checkpoint=cp,
    )  # fmt: skip


def queue_of(b: Backend, iid: str) -> str:
    return control_queue(partition_of(iid, b.partition_count))


# -- histories ------------------------------------------------------------------------------------
async def test_commit_load_round_trip(env: Env) -> None:
    b = env.backend
    assert not (await b.load_history("i1")).exists
    events = [all_fields_event(), event(1), HistoryEvent(EventType.ORCHESTRATOR_STARTED, T0)]
    etag = await b.commit(
        "i1", expected_etag=None, execution_id="x1", keep=0, new_events=events, outbox_start=1, checkpoint=5
    )
    loaded = await b.load_history("i1")
    assert loaded.events == events
    assert loaded.etag == etag
    assert (loaded.execution_id, loaded.outbox_start, loaded.checkpoint) == ("x1", 1, 5)


async def test_etag_conflict(env: Env) -> None:
    b = env.backend
    await commit(b, "i", None, 0, [event(0)])
    loaded = await b.load_history("i")
    etag2 = await commit(b, "i", loaded.etag, 1, [event(1)], cp=2)
    assert etag2 != loaded.etag
    with pytest.raises(ConcurrencyConflict):
        await commit(b, "i", loaded.etag, 1, [event(2)], cp=2)
    assert [e.event_id for e in (await b.load_history("i")).events] == [0, 1]


async def test_create_only_conflict(env: Env) -> None:
    b = env.backend
    await commit(b, "i", None, 0, [event(0)])
    with pytest.raises(ConcurrencyConflict):
        await commit(b, "i", None, 0, [event(9)])


async def test_leftover_rows_ignored(env: Env) -> None:
    b = env.backend
    etag = await commit(b, "i", None, 0, [event(i) for i in range(5)])
    await commit(b, "i", etag, 2, [event(42)])
    loaded = await b.load_history("i")
    assert [e.event_id for e in loaded.events] == [0, 1, 42]


async def test_multi_batch_commit(env: Env) -> None:
    b = env.backend
    events = [event(i, input=f'"{i}"') for i in range(250)]
    etag = await commit(b, "big", None, 0, events)
    loaded = await b.load_history("big")
    assert loaded.events == events and loaded.etag == etag
    more = [event(1000 + i) for i in range(120)]
    etag = await commit(b, "big", etag, 200, more, cp=2)
    loaded = await b.load_history("big")
    assert loaded.events == events[:200] + more and loaded.etag == etag


async def test_multi_batch_commits_never_overwrite_or_mix(env: Env) -> None:
    b = env.backend
    original = [event(i) for i in range(5)]
    etag = await commit(b, "claimed", None, 0, original)
    # A create-only commit of a large step on an existing instance conflicts and changes nothing.
    with pytest.raises(ConcurrencyConflict):
        await commit(b, "claimed", None, 0, [event(i, input='"dup"') for i in range(150)])
    loaded = await b.load_history("claimed")
    assert loaded.events == original and loaded.etag == etag
    # Two large steps from the same state: one wins whole, the other conflicts.
    step_a = [event(100 + i, input='"A"') for i in range(150)]
    step_b = [event(100 + i, input='"B"') for i in range(150)]
    results = await asyncio.gather(
        commit(b, "claimed", etag, 5, step_a, cp=2), commit(b, "claimed", etag, 5, step_b, cp=2), return_exceptions=True
    )
    assert sum(isinstance(r, ConcurrencyConflict) for r in results) == 1
    inputs = {e.input for e in (await b.load_history("claimed")).events[5:]}
    assert inputs in ({'"A"'}, {'"B"'})


async def test_large_payload_commit(env: Env) -> None:
    b = env.backend
    big = '"' + "é" * 1_000_000 + '"'
    events = [event(0, input=big), event(1, result=big[:200_000]), event(2)]
    await commit(b, "large", None, 0, events)
    assert (await b.load_history("large")).events == events


# -- queues ---------------------------------------------------------------------------------------
async def test_send_receive_release_delete(env: Env) -> None:
    b = env.backend
    m = message("q1")
    queue = queue_of(b, "q1")
    await b.send([m])
    [got] = await b.receive(queue, 10, visibility_timeout=30)
    assert isinstance(got, ReceivedMessage) and got.message == m and got.dequeue_count == 1
    assert await b.receive(queue, 10, visibility_timeout=30) == []  # hidden while leased
    await b.release(got, 0)
    [again] = await b.receive(queue, 10, visibility_timeout=30)
    assert isinstance(again, ReceivedMessage) and again.dequeue_count == 2
    await b.release(again, 0)  # release updates the receipt: delete after release still works
    [third] = await b.receive(queue, 10, visibility_timeout=30)
    await b.delete(third)
    await b.release(third, 0)  # releasing a deleted message is harmless
    assert await b.receive(queue, 10, visibility_timeout=1) == []


async def test_a_queue_is_empty_only_without_any_message(env: Env) -> None:
    """Visible, leased and delayed messages all count (an idle poller relies on it), and each
    send tells the listeners its queue and delay."""
    b = env.backend
    queue = queue_of(b, "e1")
    heard: list[tuple[str, int]] = []
    b.add_send_listener(lambda q, delay: heard.append((q, round(delay))))
    assert await b.queue_is_empty(queue)
    await b.send([message("e1")])
    assert not await b.queue_is_empty(queue)
    [got] = await b.receive(queue, 5, visibility_timeout=30)
    assert not await b.queue_is_empty(queue)  # leased: its worker may die
    await b.delete(got)
    assert await b.queue_is_empty(queue)
    await b.send([message("e1", visible_at=env.now() + timedelta(seconds=30))])
    assert not await b.queue_is_empty(queue)  # a timer
    assert heard == [(queue, 0), (queue, 30)]


async def test_partition_leases(env: Env) -> None:
    b = env.backend
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    assert await b.partition_owners() == {}
    assert await b.acquire_partition(1, first, 15)
    assert await b.acquire_partition(1, first, 15)  # its holder again: still its
    assert not await b.acquire_partition(1, second, 15)
    assert await b.partition_owners() == {1: first}
    assert await b.renew_partition(1, first)
    assert not await b.renew_partition(1, second)
    assert await b.acquire_partition(1, second, 15, steal=True)
    assert await b.partition_owners() == {1: second}
    assert not await b.renew_partition(1, first)  # stolen
    await b.release_partition(1, first)  # not its any more: nothing happens
    assert await b.partition_owners() == {1: second}
    await b.release_partition(1, second)
    assert await b.partition_owners() == {}
    assert await b.acquire_partition(1, first, 15)


async def test_a_partition_lease_runs_out(env: Env) -> None:
    b = env.backend
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    assert await b.acquire_partition(0, first, 15)
    await env.advance(16)
    assert await b.partition_owners() == {}
    assert await b.acquire_partition(0, second, 15)
    assert not await b.renew_partition(0, first)
    assert await b.partition_owners() == {0: second}


async def test_messages_sent_held_are_hidden_and_come_back_unless_settled(env: Env) -> None:
    b = env.backend
    heard: list[str] = []
    b.add_send_listener(lambda q, delay: heard.append(q))
    queue = queue_of(b, "h1")
    first, second = message("h1"), message("h1", payload='"y"')
    held = await b.send_held([first, second], lease=1)
    assert [(d.message, d.dequeue_count) for d in held] == [(first, 0), (second, 0)]
    assert heard == []  # nobody to wake: this process holds them
    assert await b.receive(queue, 10, visibility_timeout=30) == []
    await b.delete(held[0])
    await b.delete(held[1])
    kept = await b.send_held([message("h1", payload='"z"')], lease=1)  # its holder dies
    await env.advance(1.5)
    [back] = await b.receive(queue, 10, visibility_timeout=30)
    assert isinstance(back, ReceivedMessage)
    assert (back.message, back.dequeue_count) == (kept[0].message, 1)
    await b.delete(back)
    assert await env.queue_length(queue) == 0


async def test_visibility_timeout_expires(env: Env) -> None:
    b = env.backend
    await b.send([message("v1")])
    queue = queue_of(b, "v1")
    [first] = await b.receive(queue, 1, visibility_timeout=1)
    assert await b.receive(queue, 1, visibility_timeout=1) == []
    await env.advance(1.5)
    [second] = await b.receive(queue, 1, visibility_timeout=30)
    assert second.dequeue_count == 2
    await b.delete(first)  # stale receipt: no effect, no error
    await b.delete(second)


async def test_delayed_message(env: Env) -> None:
    b = env.backend
    await b.send([message("d1", visible_at=env.now() + timedelta(seconds=1))])
    queue = queue_of(b, "d1")
    assert await b.receive(queue, 5, visibility_timeout=30) == []
    await env.advance(1.6)
    got = await b.receive(queue, 5, visibility_timeout=30)
    assert len(got) == 1


async def test_work_items_routed_to_shared_queue(env: Env) -> None:
    b = env.backend
    scheduled = HistoryEvent(EventType.TASK_SCHEDULED, T0, event_id=0, name="a")
    m = WorkMessage(MessageTarget.ACTIVITY, "w1", scheduled)
    await b.send([m])
    [got] = await b.receive(WORK_ITEM_QUEUE, 5, visibility_timeout=30)
    assert isinstance(got, ReceivedMessage) and got.message == m


async def test_malformed_message_is_poisoned(env: Env) -> None:
    b = env.backend
    queue = control_queue(0)
    await env.put_raw(queue, "this is { not json")
    [got] = await b.receive(queue, 5, visibility_timeout=30)
    assert isinstance(got, PoisonedMessage) and got.body == "this is { not json" and got.dequeue_count == 1
    await b.poison(got, "unparsable")
    assert await b.receive(queue, 5, visibility_timeout=30) == []
    assert await env.poisoned() == [(queue, "this is { not json", "unparsable")]


async def test_large_message_round_trip(env: Env) -> None:
    b = env.backend
    m = message("L1", payload='"' + "x" * 1_000_000 + '"')
    await b.send([m])
    [got] = await b.receive(queue_of(b, "L1"), 5, visibility_timeout=30)
    assert isinstance(got, ReceivedMessage) and got.message == m
    await b.delete(got)


# -- envelopes: several messages per queue message (storage._envelopes) ---------------------------
def work_item(instance_id: str, task: int) -> WorkMessage:
    scheduled = HistoryEvent(EventType.TASK_SCHEDULED, T0, event_id=task, name="a", input=str(task))
    return WorkMessage(MessageTarget.ACTIVITY, instance_id, scheduled)


async def test_messages_sent_together_share_a_queue_message(env: Env) -> None:
    b = env.backend
    sent = [message("e1"), message("e1"), message("e1", visible_at=env.now() + timedelta(seconds=60))]
    await b.send(sent)
    queue = queue_of(b, "e1")
    got = await b.receive(queue, 1, visibility_timeout=1)  # one queue message: the two due now
    assert [d.message for d in got if isinstance(d, ReceivedMessage)] == sent[:2]
    await b.delete(got[0])
    await b.delete(got[0])  # settling a part twice counts once
    await env.advance(1.5)
    # The envelope stays while a part is open; delivered a second time, it is split instead of
    # being handed out, and its parts come back one per queue message.
    assert await b.receive(queue, 5, visibility_timeout=30) == []
    [left] = await b.receive(queue, 1, visibility_timeout=30)
    [other] = await b.receive(queue, 1, visibility_timeout=30)
    assert {left.message, other.message} == set(sent[:2]) and left.dequeue_count == other.dequeue_count == 1
    for delivery in (left, other):
        await b.delete(delivery)
    assert await b.receive(queue, 5, visibility_timeout=30) == []


async def test_an_envelope_goes_with_its_last_part(env: Env) -> None:
    b = env.backend
    items = [work_item("e2", i) for i in range(20)]
    await b.send(items)
    got = await b.receive(WORK_ITEM_QUEUE, 32, visibility_timeout=1)
    assert sorted(d.message.event.event_id for d in got if isinstance(d, ReceivedMessage)) == list(range(20))
    for delivery in got[:-1]:
        await b.delete(delivery)
    await b.poison(got[-1], "bad")
    await env.advance(1.5)
    assert await b.receive(WORK_ITEM_QUEUE, 32, visibility_timeout=30) == []
    [(queue, body, reason)] = await env.poisoned()
    assert queue == WORK_ITEM_QUEUE and reason == "bad" and WorkMessage.from_json(body) == got[-1].message


async def test_renewing_parts_together_renews_their_envelope(env: Env) -> None:
    b = env.backend
    await b.send([message("e3"), message("e3")])
    queue = queue_of(b, "e3")
    first, second = await b.receive(queue, 1, visibility_timeout=1)
    assert isinstance(first, ReceivedMessage) and isinstance(second, ReceivedMessage)
    await b.release(first, 30)
    await b.release(second, 30)  # the same round: no second request, the same lease
    await env.advance(1.5)
    assert await b.receive(queue, 5, visibility_timeout=30) == []
    await b.delete(first)
    await b.delete(second)  # with the receipt the renewal returned
    assert await env.queue_length(queue) == 0  # deleted, hidden or not


async def test_an_envelope_handed_over_again_is_split(env: Env) -> None:
    b = env.backend
    await b.send([message("e4"), message("e4")])
    queue = queue_of(b, "e4")
    delivered = await b.receive(queue, 1, visibility_timeout=30)
    body = ""
    if isinstance(b, InMemoryBackend):
        body = b.queues[queue][0].body
    else:
        raw = await env.azure._queue(queue).peek_messages(max_messages=1)
        assert raw == []  # leased; read the body the way the Functions host would have it
    for delivery in delivered:
        await b.delete(delivery)
    parts = [d.message for d in delivered if isinstance(d, ReceivedMessage)]
    body = body or json.dumps({"Messages": [m.to_dict() for m in parts]})
    first = await b.parse_deliveries(queue, body, 1)
    assert [d.message for d in first if isinstance(d, ReceivedMessage)] == parts
    assert await b.parse_deliveries(queue, body, 2) == []  # the second time: sent anew, one by one
    again = await b.receive(queue, 5, visibility_timeout=30)
    assert sorted(d.message.id for d in again if isinstance(d, ReceivedMessage)) == sorted(m.id for m in parts)


# -- instances ------------------------------------------------------------------------------------
async def test_write_instance_never_regresses(env: Env) -> None:
    b = env.backend
    assert await b.read_instance("w") is None
    await b.write_instance(record("w", S.Running, checkpoint=3, input='"in"'))
    await b.write_instance(record("w", S.Pending, checkpoint=2))
    assert (await b.read_instance("w")) == record("w", S.Running, checkpoint=3, input='"in"')
    done = record(
        "w", S.Failed, checkpoint=4, output='"o"' * 40_000, custom_status='{"s":1}',
        failure=FailureDetails("E", "m", None), completed_time=T0 + timedelta(seconds=1),
        parent_instance_id="p", execution_id="e",
    )  # fmt: skip
    await b.write_instance(done)
    assert await b.read_instance("w") == done


async def test_update_instance_writes_over_a_row_only(env: Env) -> None:
    b = env.backend
    assert await b.update_instance(record("u", S.Running, checkpoint=2)) is None
    assert await b.read_instance("u") is None
    etag = await b.write_instance(record("u", S.Running, checkpoint=1))
    assert await b.update_instance(record("u", S.Running, checkpoint=2, custom_status='"2"'), etag) is not None
    assert await b.update_instance(record("u", S.Running, checkpoint=1), etag) is None  # never regresses
    assert (await b.read_instance("u")) == record("u", S.Running, checkpoint=2, custom_status='"2"')
    await b.purge_instance("u")
    assert await b.update_instance(record("u", S.Running, checkpoint=3), etag) is None  # purged: not brought back
    assert await b.read_instance("u") is None
    await b.write_instance(record("u", S.Pending, execution_id="second"))  # started again
    assert await b.update_instance(record("u", S.Running, checkpoint=3, execution_id="first")) is None
    assert (await b.read_instance("u")) == record("u", S.Pending, execution_id="second")


async def test_a_late_row_of_a_finished_run_never_replaces_the_pending_row_of_its_restart(env: Env) -> None:
    """Protocol I6: a restart's Pending row carries the checkpoint of the run it replaces, so a
    late row of that run (a slow worker's, whose ETag is stale) comes with the same one."""
    b = env.backend
    etag = await b.write_instance(record("r", S.Completed, checkpoint=5, execution_id="first"))
    await b.create_instance(record("r", S.Pending, execution_id="second"))
    restarted = record("r", S.Pending, checkpoint=5, execution_id="second")
    for hint in (etag, None):
        assert await b.write_instance(record("r", S.Completed, checkpoint=5, execution_id="first"), hint) is None
        assert await b.read_instance("r") == restarted
    # the same start's rows do replace it
    assert await b.write_instance(record("r", S.Running, checkpoint=5, execution_id="second")) is not None
    assert await b.write_instance(record("r", S.Running, checkpoint=6, execution_id="second")) is not None


async def test_create_instance(env: Env) -> None:
    b = env.backend
    await b.create_instance(record("c", S.Pending))
    with pytest.raises(InstanceExists):
        await b.create_instance(record("c", S.Pending))
    await b.write_instance(record("c", S.Running, checkpoint=4))
    with pytest.raises(InstanceExists):
        await b.create_instance(record("c", S.Pending))
    await b.write_instance(record("c", S.Completed, checkpoint=6))
    await b.create_instance(record("c", S.Pending, input='"again"'))
    stored = await b.read_instance("c")
    assert stored == record("c", S.Pending, checkpoint=6, input='"again"')


async def test_query_instances(env: Env) -> None:
    b = env.backend
    for i in range(7):
        status = S.Running if i % 2 else S.Completed
        await b.write_instance(record(f"job-{i}", status, created_time=T0 + timedelta(minutes=i)))
    await b.write_instance(record("other-1", S.Running))
    await b.write_instance(record("jo", S.Running))

    running, token = await b.query_instances(InstanceQuery(runtime_status=frozenset({S.Running})))
    assert token is None
    assert sorted(r.instance_id for r in running) == ["jo", "job-1", "job-3", "job-5", "other-1"]

    prefixed, _ = await b.query_instances(InstanceQuery(instance_id_prefix="job-"))
    assert sorted(r.instance_id for r in prefixed) == [f"job-{i}" for i in range(7)]

    window = InstanceQuery(created_from=T0 + timedelta(minutes=2), created_to=T0 + timedelta(minutes=4))
    assert sorted(r.instance_id for r in (await b.query_instances(window))[0]) == ["job-2", "job-3", "job-4"]

    both = InstanceQuery(runtime_status=frozenset({S.Completed, S.Failed}), instance_id_prefix="job")
    found = sorted(r.instance_id for r in (await b.query_instances(both))[0])
    assert found == ["job-0", "job-2", "job-4", "job-6"]
    assert (await b.query_instances(InstanceQuery(runtime_status=frozenset())))[0] == []

    seen: list[str] = []
    token = None
    pages = 0
    while True:
        page, token = await b.query_instances(InstanceQuery(), page_size=2, continuation_token=token)
        assert len(page) <= 2
        seen += [r.instance_id for r in page]
        pages += 1
        if token is None:
            break
    assert sorted(seen) == sorted({*(f"job-{i}" for i in range(7)), "other-1", "jo"}) and pages >= 5


async def test_purge(env: Env) -> None:
    b = env.backend
    etag = await commit(b, "p", None, 0, [event(i) for i in range(150)])
    await commit(b, "p", etag, 150, [event(200, input='"' + "z" * 100_000 + '"')], cp=2)
    await b.write_instance(record("p", S.Completed, output='"' + "y" * 100_000 + '"'))
    await b.write_instance(record("keep", S.Completed))
    assert await b.purge_instance("p") is True
    assert await b.read_instance("p") is None
    assert not (await b.load_history("p")).exists
    assert await b.purge_instance("p") is False
    assert await b.read_instance("keep") is not None
    if env.kind == "azure":
        container = env.azure._large.container
        assert [x.name async for x in container.list_blobs(name_starts_with="p/")] == []


# -- escaping -------------------------------------------------------------------------------------
SPECIAL_IDS = ["a/b", "a\\b", "a#b", "a?b", "a^b", "it's", "^0", "@counter@key/1", "ü€😀", "a%20b"]


async def test_special_instance_ids(env: Env) -> None:
    b = env.backend
    for i, iid in enumerate(SPECIAL_IDS):
        await commit(b, iid, None, 0, [event(i)])
        await b.write_instance(record(iid, S.Running, checkpoint=i))
    for i, iid in enumerate(SPECIAL_IDS):
        assert [e.event_id for e in (await b.load_history(iid)).events] == [i]
        stored = await b.read_instance(iid)
        assert stored is not None and stored.instance_id == iid and stored.checkpoint == i
    found, _ = await b.query_instances(InstanceQuery(instance_id_prefix="a"))
    assert sorted(r.instance_id for r in found) == sorted(x for x in SPECIAL_IDS if x.startswith("a"))
    found, _ = await b.query_instances(InstanceQuery(instance_id_prefix="^"))
    assert [r.instance_id for r in found] == ["^0"]
    for injection in ["x' or PartitionKey ne 'a", "' or 1 eq 1 or '", "it''s"]:
        found, _ = await b.query_instances(InstanceQuery(instance_id_prefix=injection))
        assert found == []
    found, _ = await b.query_instances(InstanceQuery(instance_id_prefix="it'"))
    assert [r.instance_id for r in found] == ["it's"]
    assert await b.purge_instance("a/b") is True
    assert await b.read_instance("a\\b") is not None


# -- Azure-only: request accounting, validation --------------------------------------------------
@pytest.mark.azurite
async def test_request_accounting(azure_backend: AzureStorageBackend) -> None:
    b = azure_backend
    counter = b.counter
    assert counter is not None
    counter.reset()
    await commit(b, "acct", None, 0, [event(i) for i in range(10)])
    assert counter.snapshot() == {"table.batch": 1}
    counter.reset()
    await b.load_history("acct")
    assert counter.snapshot() == {"table.query": 1}
    counter.reset()
    await b.send([message("acct")])
    assert counter.snapshot() == {"queue.send": 1}
    counter.reset()
    [got] = await b.receive(queue_of(b, "acct"), 32, visibility_timeout=30)
    assert counter.snapshot() == {"queue.receive": 1}
    assert isinstance(got, ReceivedMessage)
    counter.reset()
    await b.release(got, 0)
    await b.delete(got)
    assert counter.snapshot() == {"queue.update": 1, "queue.delete": 1}
    counter.reset()
    await b.write_instance(record("acct", S.Running))
    await b.read_instance("acct")
    assert counter.snapshot() == {"table.read": 2, "table.write": 1}
    assert counter.total == 3


def test_counter_classification() -> None:
    c = StorageRequestCounter()
    t, q, bl = (
        "https://a.table.core.windows.net",
        "https://a.queue.core.windows.net",
        "https://a.blob.core.windows.net",
    )
    assert c.classify("POST", f"{t}/$batch") == "table.batch"
    assert c.classify("GET", f"{t}/HubHistory()?$filter=x") == "table.query"
    assert c.classify("GET", f"{t}/HubInstances(PartitionKey='a',RowKey='')") == "table.read"
    assert c.classify("PUT", f"{t}/HubInstances(PartitionKey='a',RowKey='')") == "table.write"
    assert c.classify("POST", f"{t}/Tables") == "other"
    assert c.classify("POST", f"{q}/hub-control-00/messages") == "queue.send"
    assert c.classify("GET", f"{q}/hub-control-00/messages?numofmessages=32") == "queue.receive"
    assert c.classify("DELETE", f"{q}/hub-control-00/messages/id?popreceipt=x") == "queue.delete"
    assert c.classify("PUT", f"{q}/hub-control-00/messages/id?popreceipt=x") == "queue.update"
    assert c.classify("PUT", f"{q}/hub-control-00") == "other"
    assert c.classify("PUT", f"{bl}/hub-largemessages/x/y") == "blob.write"
    assert c.classify("GET", f"{bl}/hub-largemessages/x/y") == "blob.read"
    assert c.classify("PUT", f"{bl}/hub-largemessages?restype=container") == "other"


def test_constructor_validation() -> None:
    for bad in ["", "ab", "1abc", "a-b-c", "a" * 46, "hub_1"]:
        with pytest.raises(ValueError, match="task hub"):
            AzureStorageBackend(DUMMY_CS, task_hub=bad)
    for count in [0, 17]:
        with pytest.raises(ValueError, match="partition_count"):
            AzureStorageBackend(DUMMY_CS, partition_count=count)
    backend = AzureStorageBackend(DUMMY_CS, task_hub="MyHub1", partition_count=16)
    assert backend.physical_queue_name(control_queue(15)) == "myhub1-control-15"
    assert backend.history_table_name == "MyHub1History"
    AzureStorageBackend("UseDevelopmentStorage=true")


def test_key_escaping() -> None:
    for value in [*SPECIAL_IDS, "tab\there", "nl\n", "\x7f^x0A", "^^^", ""]:
        assert unescape_key(escape_key(value)) == value
        assert not any(ch in escape_key(value) for ch in "/\\#?\t\n\x7f")
    assert escape_key("a^/\\#?") == "a^^^0^1^2^3"
    assert escape_key("ab").startswith(escape_key("a")) and not escape_key("^0").startswith(escape_key("^^"))
    assert prefix_upper_bound("abc") == "abd"
    assert odata_string("x' or 'a") == "'x'' or ''a'"
    for bad in ["", "x" * 257, "a\nb", "a\x00"]:
        with pytest.raises(ValueError):
            validate_instance_id(bad)


async def test_commit_after_purge_conflicts(env: Env) -> None:
    b = env.backend
    etag = await commit(b, "gone", None, 0, [event(0)])
    await b.purge_instance("gone")
    with pytest.raises(ConcurrencyConflict):
        await commit(b, "gone", etag, 1, [event(1)])


@pytest.mark.azurite
async def test_base64_message_encoding(azure_backend: AzureStorageBackend, azurite: str) -> None:
    b64 = AzureStorageBackend(azurite, task_hub=azure_backend.task_hub, base64_messages=True)
    try:
        m = message("b64", payload='"<&>"')
        await b64.send([m])
        await b64.put_raw(control_queue(0), "not base64 at all!")  # sent base64-encoded: not JSON inside
        queue = queue_of(b64, "b64")
        [got] = await b64.receive(queue, 5, visibility_timeout=30)
        assert isinstance(got, ReceivedMessage) and got.message == m
        # The same queue read without base64 decoding sees base64 text, which is not a message.
        await azure_backend.put_raw(control_queue(1), "plain text")
        [plain] = await b64.receive(control_queue(1), 5, visibility_timeout=30)
        assert isinstance(plain, PoisonedMessage) and "undecodable" in plain.reason
    finally:
        await b64.close()


# -- commit: ETag semantics and rewrites ---------------------------------------------------------
async def test_commit_validates_keep_and_etag(env: Env) -> None:
    b = env.backend
    with pytest.raises(ValueError):
        await commit(b, "k", None, 1, [event(0)])  # nothing to keep in a new instance
    etag = await commit(b, "k", None, 0, [event(0), event(1)])
    with pytest.raises(ValueError):
        await commit(b, "k", etag, 3, [event(2)])  # more than there is
    with pytest.raises(ValueError):
        await commit(b, "k", etag, -1, [event(2)])
    with pytest.raises(ConcurrencyConflict):
        await commit(b, "k", "not-an-etag-of-this-backend", 2, [event(2)])
    loaded = await b.load_history("k")
    assert loaded.etag == etag and [e.event_id for e in loaded.events] == [0, 1]


async def test_rewrite_replaces_the_history(env: Env) -> None:
    b = env.backend
    first = [event(i) for i in range(5)]
    etag = await commit(b, "rw", None, 0, first)
    # continue-as-new: a fresh history (keep=0), again and again (entity steps do this every step)
    for generation in range(3):
        fresh = [event(100 * generation + i, input=f'"{generation}"') for i in range(3)]
        new_etag = await commit(b, "rw", etag, 0, fresh, cp=generation + 2)
        with pytest.raises(ConcurrencyConflict):
            await commit(b, "rw", etag, 0, [event(9)])  # the ETag before the rewrite is stale
        loaded = await b.load_history("rw")
        assert loaded.events == fresh and loaded.etag == new_etag and loaded.checkpoint == generation + 2
        etag = new_etag
    # a rewrite that keeps a prefix (rewind), then an append on top of it
    etag = await commit(b, "rw", etag, 1, [event(7), event(8)], cp=9)
    etag = await commit(b, "rw", etag, 3, [event(10)], cp=10)
    loaded = await b.load_history("rw")
    assert [e.event_id for e in loaded.events] == [200, 7, 8, 10] and loaded.etag == etag


async def test_multi_batch_rewrites(env: Env) -> None:
    b = env.backend
    old = [event(i, input=f'"old {i}"') for i in range(250)]
    etag = await commit(b, "mbr", None, 0, old)
    # keep a prefix and write more than a transaction holds
    kept_and_new = old[:40] + [event(1000 + i, input='"new"') for i in range(180)]
    etag = await commit(b, "mbr", etag, 40, kept_and_new[40:], cp=2)
    loaded = await b.load_history("mbr")
    assert loaded.events == kept_and_new and loaded.etag == etag
    # continue-as-new of a long history into a long one, then into a short one
    fresh = [event(5000 + i, input='"fresh"') for i in range(230)]
    etag = await commit(b, "mbr", etag, 0, fresh, cp=3)
    assert (await b.load_history("mbr")).events == fresh
    short = [event(9000)]
    etag = await commit(b, "mbr", etag, 0, short, cp=4)
    loaded = await b.load_history("mbr")
    assert loaded.events == short and loaded.etag == etag
    if env.kind == "azure":
        # Nothing is left of the old rows: the partition holds the live row and the sentinel.
        rows = [e async for e in env.azure._history.query_entities(f"PartitionKey eq {odata_string('mbr')}")]
        assert len(rows) == 2


# -- instances: checkpoint order and ETag hints ------------------------------------------------------
async def test_write_instance_checkpoint_order_with_etag_hints(env: Env) -> None:
    b = env.backend
    e3 = await b.write_instance(record("h", S.Running, checkpoint=3))
    assert e3 is not None
    e4 = await b.write_instance(record("h", S.Running, checkpoint=4, custom_status='"4"'), e3)  # current hint
    assert e4 is not None and e4 != e3
    assert await b.write_instance(record("h", S.Running, checkpoint=2), e3) is None  # stale hint, lower
    assert await b.write_instance(record("h", S.Running, checkpoint=2), e4) is None  # current hint, lower
    assert (await b.read_instance("h")) == record("h", S.Running, checkpoint=4, custom_status='"4"')
    e6 = await b.write_instance(record("h", S.Completed, checkpoint=6), e3)  # stale hint, higher: written
    assert e6 is not None
    same = await b.write_instance(record("h", S.Completed, checkpoint=6, output='"o"'), e6)  # equal: written
    assert same is not None
    assert (await b.read_instance("h")) == record("h", S.Completed, checkpoint=6, output='"o"')
    # the same with large columns (the Azure backend keeps them in blobs)
    big = '"' + "b" * 70_000 + '"'
    e7 = await b.write_instance(record("h", S.Running, checkpoint=7, input=big, output=big), same)
    assert e7 is not None
    assert await b.write_instance(record("h", S.Running, checkpoint=5, output='"x"'), e7) is None
    e8 = await b.write_instance(record("h", S.Running, checkpoint=8, input=big, custom_status=big), e7)
    assert e8 is not None
    assert (await b.read_instance("h")) == record("h", S.Running, checkpoint=8, input=big, custom_status=big)
    assert await b.write_instance(record("h", S.Running, checkpoint=9), e7) is not None  # stale blob hint
    assert (await b.read_instance("h")) == record("h", S.Running, checkpoint=9)


async def test_create_instance_replaces_only_terminal(env: Env) -> None:
    b = env.backend
    etag = await b.create_instance(record("ci", S.Pending, input='"' + "i" * 70_000 + '"'))
    for status in (S.Pending, S.Running, S.Suspended):
        await b.write_instance(record("ci", status, checkpoint=3), etag)
        with pytest.raises(InstanceExists):
            await b.create_instance(record("ci", S.Pending))
    for cp, status in [(5, S.Completed), (10, S.Failed), (15, S.Terminated)]:
        await b.write_instance(record("ci", status, checkpoint=cp))
        etag = await b.create_instance(record("ci", S.Pending, input=f'"{status.value}"'))
        # replaced, carrying the checkpoint of the record it replaces
        assert await b.read_instance("ci") == record("ci", S.Pending, checkpoint=cp, input=f'"{status.value}"')
        # the returned ETag works as a hint for the first update
        assert await b.write_instance(record("ci", S.Running, checkpoint=cp + 1), etag) is not None
        assert await b.write_instance(record("ci", S.Running, checkpoint=cp)) is None  # lower: kept out
        assert (await b.read_instance("ci")) == record("ci", S.Running, checkpoint=cp + 1)


async def test_a_terminal_row_with_sends_pending_is_not_replaced_by_a_start(env: Env) -> None:
    """Protocol I8: a row written ahead of its step's messages shows the outcome but is not
    finished; a start for its id waits until the row is written again without the mark."""
    b = env.backend
    etag = await b.write_instance(record("sp", S.Completed, checkpoint=4, sends_pending=True))
    stored = await b.read_instance("sp")
    assert stored == record("sp", S.Completed, checkpoint=4, sends_pending=True) and not stored.finished
    with pytest.raises(InstanceExists):
        await b.create_instance(record("sp", S.Pending))
    unmarked = await b.write_instance(record("sp", S.Completed, checkpoint=4), etag)
    assert unmarked is not None and (await b.read_instance("sp")).finished
    # A late marker never takes that proof back (over the unmarked row of its checkpoint), even
    # with the current row's ETag, which would otherwise let it write without a read.
    for hint in (unmarked, None):
        assert await b.write_instance(record("sp", S.Completed, checkpoint=4, sends_pending=True), hint) is None
        assert (await b.read_instance("sp")).finished
    await b.create_instance(record("sp", S.Pending))
    assert (await b.read_instance("sp")) == record("sp", S.Pending, checkpoint=4)


async def test_invalid_instance_ids_are_rejected(env: Env) -> None:
    b = env.backend
    for bad in ["", "a\nb", "x" * 300]:
        with pytest.raises(ValueError):
            await b.send([message(bad)])
        with pytest.raises(ValueError):
            await commit(b, bad, None, 0, [event(0)])
        with pytest.raises(ValueError):
            await b.load_history(bad)
        with pytest.raises(ValueError):
            await b.write_instance(record(bad))
        with pytest.raises(ValueError):
            await b.create_instance(record(bad))
        with pytest.raises(ValueError):
            await b.read_instance(bad)
        with pytest.raises(ValueError):
            await b.purge_instance(bad)


# -- queues: visibility, dequeue counts, limits --------------------------------------------------------
async def test_lease_hides_for_its_timeout(env: Env) -> None:
    b = env.backend
    await b.send([message("lease")])
    queue = queue_of(b, "lease")
    [got] = await b.receive(queue, 1, visibility_timeout=2)
    assert got.dequeue_count == 1
    await env.advance(1)
    assert await b.receive(queue, 1, visibility_timeout=2) == []  # still leased
    await env.advance(1.5)
    [again] = await b.receive(queue, 1, visibility_timeout=30)
    assert again.dequeue_count == 2
    await b.release(again, 1.0)  # visible again after the delay, not before
    assert await b.receive(queue, 1, visibility_timeout=30) == []
    await env.advance(1.6)
    [third] = await b.receive(queue, 1, visibility_timeout=30)
    assert third.dequeue_count == 3
    await b.delete(third)
    await env.advance(1.1)
    assert await b.receive(queue, 1, visibility_timeout=1) == []


async def test_receive_counts_are_bounded(env: Env) -> None:
    b = env.backend
    queue = queue_of(b, "many")
    for _ in range(40):  # one send each: 40 queue messages (sent together they would share one)
        await b.send([message("many")])
    assert len(await b.receive(queue, 0, visibility_timeout=30)) == 1  # at least one
    assert len(await b.receive(queue, 100, visibility_timeout=30)) == 32  # at most 32
    assert len(await b.receive(queue, 100, visibility_timeout=30)) == 7


def test_queue_limits() -> None:
    week = 7 * 24 * 3600
    assert week - 3600 < MAX_QUEUE_DELAY_SECONDS < week
    assert message_delay(-5) == 0 and message_delay(2.5) == 2.5 and message_delay(10 * 86400) == MAX_QUEUE_DELAY_SECONDS
    assert lease_seconds(0) == 1 and lease_seconds(30) == 30 and lease_seconds(10 * 86400) == MAX_QUEUE_DELAY_SECONDS
    assert receive_count(0) == 1 and receive_count(10) == 10 and receive_count(1000) == 32


async def test_delays_are_capped_at_the_queue_limit(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A message due in 10 days is sent hidden for the 7-day maximum (the worker puts it back when
    it shows up early); releases and leases are capped the same way."""
    b = env.backend
    sent_visibility: list[int] = []
    if env.kind == "azure":
        counter = env.azure.counter
        assert counter is not None
        # Uncapped, the queue service refuses the request:
        raw = env.azure._queue(WORK_ITEM_QUEUE)
        with pytest.raises(Exception, match="outside the permissible range"):
            await raw.send_message("x", visibility_timeout=10 * 86400)
        original = counter.on_request

        def spy(request: object) -> None:
            url = request.http_request.url  # type: ignore[attr-defined]
            if "visibilitytimeout=" in url:
                sent_visibility.append(int(url.split("visibilitytimeout=")[1].split("&")[0]))
            original(request)  # type: ignore[arg-type]

        monkeypatch.setattr(counter, "on_request", spy)
    queue = queue_of(b, "far")
    await b.send([message("far", visible_at=env.now() + timedelta(days=10))])
    await b.send([message("far", payload='"leased"')])
    [leased] = await b.receive(queue, 5, visibility_timeout=10 * 86400)  # capped lease
    assert isinstance(leased, ReceivedMessage) and leased.message.event.input == '"leased"'
    await b.release(leased, 10 * 86400)  # capped release
    assert await b.receive(queue, 5, visibility_timeout=30) == []
    if env.kind == "azure":
        assert sent_visibility[:3] == [MAX_QUEUE_DELAY_SECONDS] * 3  # send, receive, release
    else:
        await env.advance(MAX_QUEUE_DELAY_SECONDS - 1)
        assert await b.receive(queue, 5, visibility_timeout=30) == []
        await env.advance(1)
        got = await b.receive(queue, 5, visibility_timeout=30)
        assert len(got) == 2  # both visible after at most 7 days, the far one well before it is due


async def test_poison_moves_the_message(env: Env) -> None:
    b = env.backend
    m = message("pz")
    queue = queue_of(b, "pz")
    await b.send([m])
    [got] = await b.receive(queue, 5, visibility_timeout=30)
    await b.poison(got, "failed too often")
    assert await b.receive(queue, 5, visibility_timeout=30) == []
    [(q, body, reason)] = await env.poisoned()
    assert (q, WorkMessage.from_json(body), reason) == (queue, m, "failed too often")


async def test_poison_with_a_stale_receipt_does_nothing(env: Env) -> None:
    b = env.backend
    await b.send([message("stale")])
    queue = queue_of(b, "stale")
    [first] = await b.receive(queue, 1, visibility_timeout=1)
    await env.advance(1.5)
    [second] = await b.receive(queue, 1, visibility_timeout=30)  # re-delivered: `first` is stale
    await b.poison(first, "late")
    assert await env.poisoned() == []
    await b.release(second, 0)
    [third] = await b.receive(queue, 1, visibility_timeout=30)  # the message is still there
    assert third.dequeue_count == 3


async def test_foreign_receipts_are_refused(env: Env) -> None:
    b = env.backend
    [delivery] = await b.parse_deliveries(control_queue(0), message("f").to_json(), 1)
    assert isinstance(delivery, ReceivedMessage) and delivery.message.instance_id == "f"
    for operation in (b.delete(delivery), b.release(delivery, 0), b.poison(delivery, "x")):
        with pytest.raises(TypeError):
            await operation


# -- queries -----------------------------------------------------------------------------------------
async def test_query_order_and_paging_arguments(env: Env) -> None:
    b = env.backend
    ids = ["ab", "a/b", "a#b", "a^b", "a b", "a?b", "b", "A"]
    for iid in ids:
        await b.write_instance(record(iid))
    expected = sorted(ids, key=escape_key)  # the Instances table's PartitionKey order
    seen: list[str] = []
    token = None
    while True:
        page, token = await b.query_instances(InstanceQuery(), page_size=3, continuation_token=token)
        seen += [r.instance_id for r in page]
        if token is None:
            break
    assert seen == expected
    with pytest.raises(ValueError):
        await b.query_instances(InstanceQuery(), page_size=0)
    with pytest.raises(ValueError):
        await b.query_instances(InstanceQuery(), continuation_token="not a token")


# -- Azure: crash safety of multi-batch commits ----------------------------------------------------
def _is_last_transaction(operations: list[Any]) -> bool:
    """The transaction that replaces (or creates) the sentinel with the new history length."""
    last = operations[-1]
    return (
        last.kind in ("replace", "create")
        and last.entity.get("RowKey") == "sentinel"
        and bool(last.entity.get("HistoryLength"))
    )


@pytest.mark.azurite
async def test_crash_before_the_last_transaction_keeps_the_old_history(
    azure_backend: AzureStorageBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit too large for one transaction, interrupted before its last one (the crash of a
    worker, simulated by a failing last transaction): loaders in between and after see the old
    history, whole; the commit is then redone from a fresh load."""
    import storage.azure._backend as module

    b = azure_backend
    real_submit = module.submit_batch
    old = [event(i, input=f'"old {i}"') for i in range(230)]
    etag = await commit(b, "crash", None, 0, old)
    seen_between: list[list[HistoryEvent]] = []

    async def crash_at_the_end(table: Any, operations: list[Any]) -> list[str | None]:
        if _is_last_transaction(operations):
            raise RuntimeError("crash before the last transaction")
        result = await real_submit(table, operations)
        seen_between.append((await b.load_history("crash")).events)  # a concurrent loader
        return result

    for keep, new in [
        (0, [event(1000 + i, input=f'"new {i}"') for i in range(260)]),  # continue-as-new / rewind
        (100, [event(2000 + i) for i in range(150)]),  # rewrite keeping a prefix
        (230, [event(3000 + i) for i in range(150)]),  # append
    ]:
        seen_between.clear()
        monkeypatch.setattr(module, "submit_batch", crash_at_the_end)
        with pytest.raises(RuntimeError, match="crash"):
            await commit(b, "crash", etag, keep, new, cp=2)
        monkeypatch.setattr(module, "submit_batch", real_submit)
        assert len(seen_between) >= 1 and all(events == old for events in seen_between)
        loaded = await b.load_history("crash")
        assert loaded.events == old
        with pytest.raises(ConcurrencyConflict):  # the interrupted commit moved the sentinel's ETag
            await commit(b, "crash", etag, keep, new, cp=2)
        etag = loaded.etag  # type: ignore[assignment]
    # Redone from the last load, a multi-transaction rewrite reads back as exactly the new history.
    new = [event(4000 + i, input=f'"again {i}"') for i in range(260)]
    etag = await commit(b, "crash", etag, 0, new, cp=2)
    loaded = await b.load_history("crash")
    assert loaded.events == new and loaded.etag == etag


@pytest.mark.azurite
async def test_interrupted_clean_up_is_finished_by_the_next_commit(
    azure_backend: AzureStorageBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    import storage.azure._backend as module

    b = azure_backend
    big = '"' + "g" * 70_000 + '"'
    old = [event(i, input=big if i % 50 == 0 else None) for i in range(250)]
    etag = await commit(b, "gc", None, 0, old)
    container = b._large.container
    assert len([x async for x in container.list_blobs(name_starts_with="gc/")]) == 5

    async def no_clean_up(self: object, pk: str, keys: object) -> None:
        raise RuntimeError("crash during clean-up")

    monkeypatch.setattr(module.AzureStorageBackend, "_delete_rows", no_clean_up)
    new = [event(1000 + i) for i in range(3)]
    etag = await commit(b, "gc", etag, 0, new, cp=2)  # committed; old rows left behind
    monkeypatch.undo()
    loaded = await b.load_history("gc")
    assert loaded.events == new and loaded.etag == etag

    async def partition_size() -> int:
        return len([e async for e in b._history.query_entities(f"PartitionKey eq {odata_string('gc')}")])

    assert await partition_size() > 4
    etag = await commit(b, "gc", etag, 3, [event(2000)], cp=3)
    assert await partition_size() == 5  # four events and the sentinel
    assert [x async for x in container.list_blobs(name_starts_with="gc/")] == []
    assert [e.event_id for e in (await b.load_history("gc")).events] == [1000, 1001, 1002, 2000]


# -- Azure: blobs are deleted with what points at them --------------------------------------------------
async def _blob_names(b: AzureStorageBackend, prefix: str) -> list[str]:
    return sorted([x.name async for x in b._large.container.list_blobs(name_starts_with=prefix)])


@pytest.mark.azurite
async def test_instances_row_blobs_are_replaced_not_accumulated(azure_backend: AzureStorageBackend) -> None:
    b = azure_backend
    counter = b.counter
    assert counter is not None
    big_input = '"' + "i" * 70_000 + '"'
    etag = await b.create_instance(record("st", S.Pending, input=big_input))
    for step in range(1, 6):
        state = '"' + str(step) * 70_000 + '"'  # a large custom status / entity state, new every step
        counter.reset()
        new_etag = await b.write_instance(
            record("st", S.Running, checkpoint=step, input=big_input, custom_status=state), etag
        )
        assert new_etag is not None
        # The unchanged input keeps its blob: one upload (the new state) and one delete (the old state).
        assert counter.snapshot().get("blob.write", 0) == (1 if step == 1 else 2)
        etag = new_etag
        assert len(await _blob_names(b, "st/")) == 2
    # A write that loses its condition leaves nothing behind.
    assert await b.write_instance(record("st", S.Running, checkpoint=2, output=big_input)) is None
    # A write without large columns deletes the blobs of the row it replaces, hint or not.
    etag = await b.write_instance(record("st", S.Completed, checkpoint=7), etag)
    assert await _blob_names(b, "st/") == []
    assert await b.read_instance("st") == record("st", S.Completed, checkpoint=7)
    # Entity-style steps: history rewritten every step with a large row.
    h = await commit(b, "st", None, 0, [event(0, input=big_input)])
    for step in range(5):
        h = await commit(b, "st", h, 0, [event(step, input='"' + str(step) * 70_000 + '"')], cp=step + 2)
        assert len(await _blob_names(b, "st/")) == 1
    assert (await b.load_history("st")).events == [event(4, input='"' + "4" * 70_000 + '"')]
    await b.write_instance(record("st", S.Running, checkpoint=20, output=big_input))
    assert await b.purge_instance("st")
    assert await _blob_names(b, "st/") == []


@pytest.mark.azurite
async def test_large_message_blobs_go_with_their_messages(azure_backend: AzureStorageBackend) -> None:
    b = azure_backend
    payload = '"' + "m" * 100_000 + '"'
    queue = queue_of(b, "lm")
    await b.send([message("lm", payload=payload), message("lm", payload=payload)])
    assert len(await _blob_names(b, "lm/")) == 2
    got = await b.receive(queue, 5, visibility_timeout=1)
    assert len(got) == 2
    first, second = got
    await b.delete(first)
    assert len(await _blob_names(b, "lm/")) == 1
    # A stale receipt deletes nothing: the message and its blob belong to its new receiver.
    await asyncio.sleep(1.5)
    [again] = await b.receive(queue, 5, visibility_timeout=30)
    await b.delete(second)
    assert len(await _blob_names(b, "lm/")) == 1
    assert isinstance(again, ReceivedMessage) and again.message.event.input == payload
    # Poisoning moves the body into the poison queue's own message (and blob).
    await b.poison(again, "bad")
    names = await _blob_names(b, "lm/")
    assert len(names) == 1 and names != []
    [(poisoned_from, body, reason)] = await b.poison_messages()
    assert (poisoned_from, reason) == (queue, "bad")
    assert WorkMessage.from_json(body).event.input == payload
    assert await b.receive(queue, 5, visibility_timeout=30) == []
    await b.send([message("lm", payload=payload)])
    assert await b.purge_instance("lm") is False  # no history nor record, but its blobs go
    assert await _blob_names(b, "lm/") == []


@pytest.mark.azurite
async def test_every_request_is_counted(azure_backend: AzureStorageBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    """The request counter sees every HTTP request the backend sends (compared with aiohttp's)."""
    import aiohttp

    b = azure_backend
    counter = b.counter
    assert counter is not None
    sent = 0
    real_request = aiohttp.ClientSession._request

    async def counting(self: aiohttp.ClientSession, *args: object, **kwargs: object) -> object:
        nonlocal sent
        sent += 1
        return await real_request(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(aiohttp.ClientSession, "_request", counting)
    counter.reset()
    big = '"' + "r" * 70_000 + '"'
    etag = await commit(b, "cnt", None, 0, [event(i, input=big if i == 3 else None) for i in range(150)])
    etag = await commit(b, "cnt", etag, 0, [event(0, input=big)], cp=2)
    await b.load_history("cnt")
    tag = await b.create_instance(record("cnt", S.Pending, input=big))
    await b.write_instance(record("cnt", S.Running, checkpoint=1, output=big), tag)
    await b.read_instance("cnt")
    await b.query_instances(InstanceQuery(instance_id_prefix="c"))
    await b.send([message("cnt", payload=big), message("cnt")])
    got = await b.receive(queue_of(b, "cnt"), 5, visibility_timeout=30)
    await b.release(got[0], 0)  # type: ignore[arg-type]
    await b.poison(got[1], "x")
    await b.delete(got[0])
    await b.poison_messages()
    await b.purge_instance("cnt")
    assert sent > 20
    assert counter.total == sent, counter.snapshot()


# -- the entity encoder of the lean transaction path -----------------------------------------------
def test_entity_encoder() -> None:
    from azure.data.tables import EdmType, EntityProperty

    from storage.azure._batch import encode_entity, key_literal

    naive = datetime(2024, 1, 2, 3, 4, 5, 6)
    encoded = encode_entity(
        {
            "PartitionKey": "p'k",
            "RowKey": "0000000000000001",
            "S": 'ü\n"x"',
            "I": 2**31 - 1,
            "N": -(2**31),
            "L": 2**31,
            "M": -(2**40),
            "B": True,
            "F": 1.5,
            "Nan": float("nan"),
            "Inf": float("-inf"),
            "D": T0,
            "Naive": naive,
            "Bin": b"\x00\xff",
            "E": EntityProperty(7, EdmType.INT64),
            "Missing": None,
        }
    )
    assert encoded == {
        "PartitionKey": "p'k",
        "RowKey": "0000000000000001",
        "S": 'ü\n"x"',
        "I": 2**31 - 1,
        "N": -(2**31),
        "L": str(2**31),
        "L@odata.type": "Edm.Int64",
        "M": str(-(2**40)),
        "M@odata.type": "Edm.Int64",
        "B": True,
        "F": 1.5,
        "F@odata.type": "Edm.Double",
        "Nan": "NaN",
        "Nan@odata.type": "Edm.Double",
        "Inf": "-Infinity",
        "Inf@odata.type": "Edm.Double",
        "D": "2024-05-06T07:08:09.123456Z",
        "D@odata.type": "Edm.DateTime",
        "Naive": "2024-01-02T03:04:05.000006Z",
        "Naive@odata.type": "Edm.DateTime",
        "Bin": "AP8=",
        "Bin@odata.type": "Edm.Binary",
        "E": "7",
        "E@odata.type": "Edm.Int64",
    }
    with pytest.raises(TypeError):
        encode_entity({"X": object()})
    with pytest.raises(ValueError):
        encode_entity({"X": 2**63})
    assert key_literal("a'b/c") == "a%27%27b%2Fc"


def test_no_private_azure_data_tables_imports() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "storage"
    for source in root.rglob("*.py"):
        text = source.read_text()
        assert "azure.data.tables._" not in text, source


@pytest.mark.azurite
async def test_encoded_entities_round_trip_through_the_service(azure_backend: AzureStorageBackend) -> None:
    from storage.azure._batch import BatchOperation, submit

    table = azure_backend._history
    row = {
        "PartitionKey": "it's ü",
        "RowKey": "r'1",
        "S": "ü€😀\n\t\"'\\",
        "I": 42,
        "L": 2**40,
        "B": False,
        "F": 0.25,
        "D": T0,
        "Bin": b"\x00\x01",
    }
    etags = await submit(table, [BatchOperation("create", row), BatchOperation("upsert", {**row, "RowKey": "r2"})])
    assert all(etags)
    stored = await table.get_entity("it's ü", "r'1")
    assert stored.metadata["etag"] == etags[0]
    assert {k: stored[k] for k in ("S", "I", "B", "F", "Bin")} == {
        "S": row["S"], "I": 42, "B": False, "F": 0.25, "Bin": b"\x00\x01",
    }  # fmt: skip
    assert stored["L"].value == 2**40 and stored["D"] == T0
    # merge keeps the other properties; delete removes; conditions are checked
    (merged,) = await submit(table, [BatchOperation("merge", {"PartitionKey": "it's ü", "RowKey": "r'1"}, etags[0])])
    assert merged and merged != etags[0]
    from storage.azure._batch import BatchConflict

    with pytest.raises(BatchConflict):
        await submit(table, [BatchOperation("replace", {**row, "I": 1}, etags[0])])
    assert (await table.get_entity("it's ü", "r'1"))["I"] == 42
    assert await submit(table, [BatchOperation("delete", {"PartitionKey": "it's ü", "RowKey": "r2"})]) == [None]
    with pytest.raises(BatchConflict):
        await submit(table, [BatchOperation("delete", {"PartitionKey": "it's ü", "RowKey": "r2"})])


@pytest.mark.azurite
async def test_a_message_whose_blob_is_gone_is_dropped(azure_backend: AzureStorageBackend) -> None:
    """A send the SDK retried after a lost answer enqueues two messages with one blob; once one
    is processed and deleted, the other has nothing left to deliver (nor has a message of a
    purged instance): receive drops it instead of handing out a poisoned delivery."""
    b = azure_backend
    payload = '"' + "d" * 100_000 + '"'
    queue = queue_of(b, "dup")
    await b.send([message("dup", payload=payload)])
    [reference] = await b._queue(queue).peek_messages()
    await b._queue(queue).send_message(reference.content)  # the retried send's copy
    [first, second] = await b.receive(queue, 5, visibility_timeout=30)
    assert isinstance(first, ReceivedMessage) and isinstance(second, ReceivedMessage)
    await b.delete(first)
    await b.release(second, 0)
    assert await b.receive(queue, 5, visibility_timeout=30) == []
    assert await b._queue(queue).peek_messages() == []
    # A blob whose message body is not a message is still poisoned, not dropped.
    await b.put_raw(queue, "x" * 100_000)
    [bad] = await b.receive(queue, 5, visibility_timeout=30)
    assert isinstance(bad, PoisonedMessage)


async def test_history_longer_than_a_query_page(env: Env) -> None:
    b = env.backend
    events = [event(i) for i in range(1100)]  # a table query answers at most 1,000 rows a page
    etag = await commit(b, "long", None, 0, events)
    if env.kind == "azure":
        assert env.azure.counter is not None
        env.azure.counter.reset()
    loaded = await b.load_history("long")
    assert loaded.events == events and loaded.etag == etag
    if env.kind == "azure":  # two pages, then the rows the sentinel names read again (two pages)
        assert env.azure.counter.snapshot() == {"table.query": 4}  # type: ignore[union-attr]
    etag = await commit(b, "long", etag, 0, events[:3], cp=2)
    loaded = await b.load_history("long")
    assert loaded.events == events[:3] and loaded.etag == etag
