"""The storage contract: every backend behaves the same (in-memory, and Azure Storage on Azurite)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import pytest

from durable._backend import WORK_ITEM_QUEUE, Backend, ReceivedMessage, control_queue, partition_of
from durable._history import EventType, FailureDetails, HistoryEvent
from durable._ids import validate_instance_id
from durable._messages import MessageTarget, WorkMessage
from durable._status import InstanceRecord, OrchestrationRuntimeStatus
from storage import ConcurrencyConflict, InMemoryBackend, InstanceExists, InstanceQuery, PoisonedMessage
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
