"""How many storage requests per second this machine serves through the Azure SDK and Azurite when
nothing else runs: the ceiling every workload's throughput sits under (a workload that needs R
requests per unit makes at most capacity / R units per second here).

    .venv/bin/python -m benchmarks.capacity [--processes 1,2] [--concurrency 16] [--seconds 10]
                                            [--connection CONN]

Each client process keeps ``--concurrency`` rounds in flight, a round being what a step of the
runtime asks of storage: a queue message sent, two rows written in one table transaction, a row
upserted, the message deleted (four requests). The clients are built as the runtime builds them
(``storage.azure._connection``). After a warm-up, it counts the requests every process completes
in ``--seconds`` and the CPU the processes and, when it started Azurite itself, Azurite used
meanwhile. Without ``--connection`` (or ``AZURITE_CONNECTION_STRING``) it starts its own Azurite.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import multiprocessing
import os
import platform
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from azure.core.exceptions import ResourceExistsError

from durable.host._azurite import Azurite
from storage.azure._connection import queue_service_client, table_service_client

WARM_UP_SECONDS = 3.0


@dataclass
class Load:
    requests: int
    cpu_seconds: float
    seconds: float  # the window measured: shorter than asked when the process came up late


async def _load(connection: str, name: str, concurrency: int, begin: float, end: float) -> Load:
    """Rounds until ``end``; the requests completed and the CPU used between ``begin`` and ``end``
    are what counts."""
    async with table_service_client(connection) as tables, queue_service_client(connection) as queues:
        table = tables.get_table_client(name)
        queue = queues.get_queue_client(name)
        with contextlib.suppress(ResourceExistsError):  # another process made them first
            await table.create_table()
        with contextlib.suppress(ResourceExistsError):
            await queue.create_queue()
        done = 0

        async def rounds(lane: int) -> None:
            nonlocal done
            key = f"{os.getpid()}-{lane}"
            for n in itertools.count():
                if time.time() >= end:
                    return
                message = await queue.send_message(f"lane {lane} round {n}")
                done += 1
                rows = [{"PartitionKey": key, "RowKey": f"{n}-{i}", "Event": "x" * 100} for i in range(2)]
                await table.submit_transaction([("upsert", row) for row in rows])
                done += 1
                await table.upsert_entity({"PartitionKey": key, "RowKey": "", "Status": "Running", "Round": n})
                done += 1
                await queue.delete_message(message)
                done += 1

        async def window() -> Load:
            await asyncio.sleep(max(0.0, begin - time.time()))
            done_at_begin, cpu_at_begin, began = done, time.process_time(), time.time()
            await asyncio.sleep(max(0.0, end - time.time()))
            return Load(done - done_at_begin, time.process_time() - cpu_at_begin, time.time() - began)

        measured = asyncio.create_task(window())
        await asyncio.gather(*(rounds(lane) for lane in range(concurrency)))
        return await measured


def _process(connection: str, name: str, concurrency: int, begin: float, end: float) -> Load:
    return asyncio.run(_load(connection, name, concurrency, begin, end))


def cpu_seconds(pid: int) -> float:
    """The CPU time a process has used (0 for one that has just ended)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def machine() -> str:
    """When and on what a measurement ran: the first line of every benchmark's output."""
    return (f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.platform()}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}")  # fmt: skip


@dataclass
class Capacity:
    """What the machine served in one measurement: requests per second and the CPU each cost."""

    processes: int
    concurrency: int
    requests_per_second: float
    client_cpu_ms: float
    azurite_cpu_ms: float | None  # None when Azurite is not ours to watch

    def row(self) -> str:
        """This command's table row (``HEADER``)."""
        azurite = "-" if self.azurite_cpu_ms is None else f"{self.azurite_cpu_ms:.2f}"
        return (f"| {self.processes} | {self.concurrency} | {self.requests_per_second:.0f} "
                f"| {self.client_cpu_ms:.2f} | {azurite} |")  # fmt: skip

    def sentence(self) -> str:
        """The line ``benchmarks.run`` prints before its first run and after its last."""
        azurite = "" if self.azurite_cpu_ms is None else f", Azurite {self.azurite_cpu_ms:.2f}"
        return (f"{self.requests_per_second:.0f} storage requests/s with no engine work "
                f"(CPU ms per request: client {self.client_cpu_ms:.2f}{azurite})")  # fmt: skip


HEADER = ("| client processes | rounds in flight each | requests/s | client CPU ms per request "
          "| Azurite CPU ms per request |\n|---|---|---|---|---|")  # fmt: skip


def measure(
    connection: str, processes: int = 1, concurrency: int = 16, seconds: float = 10.0, azurite_pid: int | None = None
) -> Capacity:
    name = f"capacity{uuid.uuid4().hex[:10]}"
    begin = time.time() + WARM_UP_SECONDS
    end = begin + seconds
    try:
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            pending = pool.starmap_async(_process, [(connection, name, concurrency, begin, end)] * processes)
            azurite_cpu = None
            if azurite_pid is not None:
                time.sleep(max(0.0, begin - time.time()))
                at_begin = cpu_seconds(azurite_pid)
                time.sleep(max(0.0, end - time.time()))
                azurite_cpu = cpu_seconds(azurite_pid) - at_begin
            loads = pending.get()
    finally:
        asyncio.run(_drop(connection, name))
    if any(load.seconds < seconds / 2 for load in loads):
        raise RuntimeError(f"a client process came up too late to measure (warm-up {WARM_UP_SECONDS:g} s)")
    requests = sum(load.requests for load in loads)
    return Capacity(
        processes,
        concurrency,
        sum(load.requests / load.seconds for load in loads),
        1000 * sum(load.cpu_seconds for load in loads) / requests,
        None if azurite_cpu is None else 1000 * azurite_cpu / requests,
    )


async def _drop(connection: str, name: str) -> None:
    """Leave the emulator as it was: a benchmark measures next on the same one."""
    async with table_service_client(connection) as tables, queue_service_client(connection) as queues:
        await asyncio.gather(tables.delete_table(name), queues.delete_queue(name), return_exceptions=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", default="1,2", help="client process counts to run, one row each")
    parser.add_argument("--concurrency", type=int, default=16, help="rounds in flight per process")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connection", default=os.environ.get("AZURITE_CONNECTION_STRING"))
    args = parser.parse_args()
    print(f"{machine()}\n{HEADER}")
    with contextlib.ExitStack() as stack:
        connection, pid = args.connection, None
        if not connection:
            azurite = stack.enter_context(Azurite())
            connection, pid = azurite.connection_string, azurite.pid
        for processes in (int(p) for p in args.processes.split(",")):
            print(measure(connection, processes, args.concurrency, args.seconds, pid).row(), flush=True)


if __name__ == "__main__":
    main()
