"""A durable worker in a process of its own, for multi-process and crash tests.

    python -m tests.worker_process CONNECTION HUB [--kill-at POINT] [--kill-after N] [--no-inline]
        [--kill-instance PREFIX] [--app MODULE:NAME] [--lease SECONDS] [--max-dequeue-count N]

With ``--kill-at``, the process SIGKILLs itself the N-th time processing passes POINT (see
``WorkerOptions.fault_hook``): a crash at an exact point of the commit protocol. With
``--kill-instance``, only passes for instance ids starting with PREFIX count (``@``: entities).
``--app`` names the app to serve (default ``tests.chaos_app:app``).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import signal

from durable import DFApp, Worker, WorkerOptions
from storage.azure import AzureStorageBackend

READY = "worker started"


def _load_app(reference: str) -> DFApp:
    module, _, name = reference.partition(":")
    app = getattr(importlib.import_module(module), name)
    assert isinstance(app, DFApp), reference
    return app


def _killer(point: str, after: int, instance_prefix: str = ""):  # type: ignore[no-untyped-def]
    seen = 0

    def hook(at: str, instance_id: str) -> None:
        nonlocal seen
        if at == point and instance_id.startswith(instance_prefix):
            seen += 1
            if seen >= after:
                os.kill(os.getpid(), signal.SIGKILL)

    return hook


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("connection")
    parser.add_argument("hub")
    parser.add_argument("--kill-at")
    parser.add_argument("--kill-after", type=int, default=1)
    parser.add_argument("--kill-instance", default="")
    parser.add_argument("--no-inline", action="store_true", help="send every activity through the work-item queue")
    parser.add_argument("--app", default="tests.chaos_app:app")
    parser.add_argument("--lease", type=float, default=5.0, help="WorkerOptions.visibility_timeout")
    parser.add_argument("--max-dequeue-count", type=int, default=WorkerOptions.max_dequeue_count)
    args = parser.parse_args()
    app = _load_app(args.app)
    options = WorkerOptions(
        idle_poll_max=0.2, visibility_timeout=args.lease, retry_delay=0.5, inline_activities=not args.no_inline,
        max_dequeue_count=args.max_dequeue_count,
    )  # fmt: skip
    if args.kill_at:
        options.fault_hook = _killer(args.kill_at, args.kill_after, args.kill_instance)
    backend = AzureStorageBackend(args.connection, task_hub=args.hub)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print(READY, flush=True)  # from here on SIGTERM stops it cleanly
    try:
        await Worker(app.durable_functions, backend, options=options).run(stop)
    finally:
        await backend.close()


if __name__ == "__main__":
    asyncio.run(main())
