"""Storage requests per orchestration: N five-activity sequences end to end on Azurite.

Counts every HTTP request the runtime makes to Azure Storage (worker and client start calls;
status polling is excluded) and prints them per orchestration, by kind, with the throughput.

    python -m benchmarks.storage_ops [--orchestrations N] [--connection CONN]   (from the repository root)

Without ``--connection`` (or ``AZURITE_CONNECTION_STRING``) it starts its own Azurite.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid

import durable as df
from durable.host._azurite import Azurite
from storage.azure import AzureStorageBackend, StorageRequestCounter
from tests.chaos_app import app


async def measure(connection: str, count: int) -> None:
    hub = f"bench{uuid.uuid4().hex[:10]}"
    counter = StorageRequestCounter()
    backend = AzureStorageBackend(connection, task_hub=hub, counter=counter)
    observer = AzureStorageBackend(connection, task_hub=hub)  # status polling, not counted
    await backend.create_task_hub()
    runtime = df.DurableRuntime(app, backend, options=df.WorkerOptions(idle_poll_max=0.5))
    watcher = df.DurableOrchestrationClient(observer)
    try:
        counter.reset()
        started = time.perf_counter()
        await runtime.start()
        client = runtime.client()
        ids = [await client.start_new("sequence", None, i) for i in range(count)]
        for i, instance_id in enumerate(ids):
            status = await watcher.wait_for_completion(instance_id, timeout=300, poll_interval=0.05)
            assert status.output == i + 5, status.output
        elapsed = time.perf_counter() - started
        await runtime.stop()
        counts = counter.snapshot()
    finally:
        await backend.delete_task_hub()
        await backend.close()
        await observer.close()
    total = sum(counts.values())
    print(f"{count} five-activity orchestrations in {elapsed:.2f} s ({count / elapsed:.1f}/s)")
    print(f"storage requests per orchestration: {total / count:.1f}")
    for kind, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:<14} {n / count:6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--orchestrations", type=int, default=50)
    parser.add_argument("--connection", default=os.environ.get("AZURITE_CONNECTION_STRING"))
    args = parser.parse_args()
    if args.connection:
        asyncio.run(measure(args.connection, args.orchestrations))
        return
    with Azurite() as emulator:
        asyncio.run(measure(emulator.connection_string, args.orchestrations))


if __name__ == "__main__":
    main()
