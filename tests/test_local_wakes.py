"""Wake-ups between processes of one machine serving one task hub (``durable.runtime._wake``):
a send of one process wakes the others' pollers of that queue, over UDP on 127.0.0.1. Between
``LocalWakes`` of one test process (each stands for a process), and through a real backend's
sends on Azurite; the processes of ``durable start --workers N`` registering is checked in
tests/test_host_workers.py."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timezone
from pathlib import Path

import pytest

from durable.core._history import EventType, HistoryEvent
from durable.core._messages import MessageTarget, WorkMessage
from durable.runtime._backend import WORK_ITEM_QUEUE, control_queue, partition_of
from durable.runtime._ownership import PartitionOwnership
from durable.runtime._wake import MAX_ANNOUNCED_DELAY, LocalWakes, registry_of, start_local_wakes
from storage.azure import AzureStorageBackend

Heard = list[tuple[str, float]]


class Peer:
    """One process's end: what it was woken for."""

    def __init__(self, group: str, root: Path, held_here: Callable[[str], bool] = lambda queue: False) -> None:
        self.heard: Heard = []
        self.arrived = asyncio.Event()
        self.wakes = LocalWakes(group, self._wake, held_here=held_here, root=root)

    def _wake(self, queue: str, delay: float) -> None:
        self.heard.append((queue, delay))
        self.arrived.set()

    async def next_wakes(self, timeout: float = 5.0) -> Heard:
        await asyncio.wait_for(self.arrived.wait(), timeout)
        self.arrived.clear()
        heard, self.heard = self.heard, []
        return heard


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "wake"  # made by the first process, private to this user


@pytest.fixture
async def peers(root: Path) -> AsyncIterator[Callable[..., Peer]]:
    started: list[Peer] = []

    def make(group: str = "hub-a", **kwargs: Callable[[str], bool]) -> Peer:
        peer = Peer(group, root, **kwargs)
        started.append(peer)
        return peer

    yield make
    for peer in started:
        peer.wakes.close()


async def test_a_send_wakes_the_other_processes_of_the_hub_once_per_turn(peers: Callable[..., Peer]) -> None:
    sender, receiver, other = peers(), peers(), peers()
    elsewhere = peers("hub-b")
    for peer in (sender, receiver, other, elsewhere):
        await peer.wakes.start()
    for _ in range(50):  # one turn of the event loop: told once, not fifty times
        sender.wakes.sent(control_queue(3), 0.0)
    sender.wakes.sent(WORK_ITEM_QUEUE, 0.0)
    sender.wakes.sent(control_queue(1), 2.5)  # a message visible in 2.5 s: wake its poller then
    expected = sorted([(control_queue(3), 0.0), (WORK_ITEM_QUEUE, 0.0), (control_queue(1), 2.5)])
    assert sorted(await receiver.next_wakes()) == expected
    assert sorted(await other.next_wakes()) == expected
    await asyncio.sleep(0.2)  # whatever else was coming has come
    assert receiver.heard == other.heard == []
    assert sender.heard == [] and elsewhere.heard == []  # not itself, nor the processes of another hub


async def test_queues_held_here_and_far_off_messages_are_not_announced(peers: Callable[..., Peer]) -> None:
    sender = peers(held_here=lambda queue: queue == control_queue(0))
    receiver = peers()
    await sender.wakes.start()
    await receiver.wakes.start()
    sender.wakes.sent(control_queue(0), 0.0)  # its own poller takes that queue's messages
    sender.wakes.sent(control_queue(2), MAX_ANNOUNCED_DELAY + 1)  # a timer: polling finds it
    sender.wakes.sent(control_queue(2), 0.0)
    assert await receiver.next_wakes() == [(control_queue(2), 0.0)]


async def test_what_is_not_a_wake_up_for_this_process_is_ignored(peers: Callable[..., Peer], root: Path) -> None:
    receiver = peers()
    await receiver.wakes.start()
    assert receiver.wakes.port is not None
    address = ("127.0.0.1", receiver.wakes.port)
    # Its token is in its file, which only this user can read.
    token = (registry_of("hub-a", root) / f"{os.getpid()}-{receiver.wakes.port}").read_text()
    assert oct(root.stat().st_mode & 0o777) == "0o700"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
        for junk in (
            b"\xff\xfe not json",
            b"[1, 2]",
            b"[" * 5000,  # nested deeper than the parser goes
            b"[" * 60000,  # too long
            b'{"token": "%s"}' % token.encode(),
            b'{"token": "%s", "wake": [["control-01"]]}' % token.encode(),
            b'{"token": "%s", "wake": [["control-01", -1]]}' % token.encode(),
            b'{"token": "someone-elses", "wake": [["control-01", 0]]}',
            b'{"wake": [["control-01", 0]]}',
        ):
            raw.sendto(junk, address)
        raw.sendto(b'{"token": "%s", "wake": [["control-02", 0]]}' % token.encode(), address)
    assert await receiver.next_wakes() == [("control-02", 0.0)]


async def test_a_registry_others_can_read_or_write_is_not_used(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    peer = Peer("hub-a", shared)
    await peer.wakes.start()
    assert peer.wakes.port is None  # polling only, with a warning
    assert list(shared.iterdir()) == []


async def test_a_process_that_died_without_unregistering_is_forgotten(peers: Callable[..., Peer], root: Path) -> None:
    directory = registry_of("hub-a", root)
    directory.mkdir(parents=True, mode=0o700)
    root.chmod(0o700)
    left_behind = directory / f"{2**22 + 1}-9"  # above any pid Linux hands out: no such process
    left_behind.write_text("token")
    half_written = directory / f".{2**22 + 2}-9"  # died between writing its entry and renaming it
    half_written.write_text("tok")
    sender, receiver = peers(), peers()
    await sender.wakes.start()
    await receiver.wakes.start()
    sender.wakes.sent(WORK_ITEM_QUEUE, 0.0)
    assert await receiver.next_wakes() == [(WORK_ITEM_QUEUE, 0.0)]
    assert not left_behind.exists() and not half_written.exists()
    receiver.wakes.close()
    sender.wakes.close()
    assert not directory.exists()  # the last one out leaves nothing behind


async def test_a_registry_a_temp_folder_cleaner_removed_is_made_again(peers: Callable[..., Peer], root: Path) -> None:
    sender, receiver = peers(), peers()
    await sender.wakes.start()
    await receiver.wakes.start()
    shutil.rmtree(root)
    receiver.wakes.sent(control_queue(1), 0.0)  # its next look at the others finds itself gone...
    await asyncio.sleep(0)  # (it tells them on the next turn of the loop)
    assert len(list(registry_of("hub-a", root).iterdir())) == 1  # ...and registers again
    assert oct(root.stat().st_mode & 0o777) == "0o700"
    sender.wakes.sent(control_queue(2), 0.0)
    assert await receiver.next_wakes() == [(control_queue(2), 0.0)]


def _event(instance_id: str) -> WorkMessage:
    event = HistoryEvent(EventType.EVENT_RAISED, datetime.now(timezone.utc), name="go", input="1")
    return WorkMessage(MessageTarget.ORCHESTRATION, instance_id, event)


async def test_a_backends_sends_wake_the_other_processes_unless_its_partition_is_held_here(
    azure_backend: AzureStorageBackend, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("durable.runtime._wake.wake_root", lambda: root)
    receiver = Peer(azure_backend.local_wake_group, root)
    await receiver.wakes.start()
    ownership = PartitionOwnership(azure_backend)
    own: Heard = []
    sender = await start_local_wakes(azure_backend, lambda queue, delay: own.append((queue, delay)), ownership)
    assert sender is not None
    try:
        held, other = "held-instance", "other-instance"
        while partition_of(other, azure_backend.partition_count) == partition_of(held, azure_backend.partition_count):
            other += "-"
        assert await ownership.claim(partition_of(held, azure_backend.partition_count))
        await azure_backend.send([_event(held)])
        await azure_backend.send([_event(other)])
        assert await receiver.next_wakes() == [(control_queue(partition_of(other, azure_backend.partition_count)), 0.0)]
        assert own == []  # a process is not told of its own sends (its send listeners are)
    finally:
        sender.close()
        receiver.wakes.close()
        await ownership.release_all()
