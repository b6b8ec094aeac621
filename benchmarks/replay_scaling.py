"""Replay cost vs history size: a fan-out of N activities, replayed in full.

Builds the history of an N-activity fan-out/fan-in whose results have all arrived, then times one
step (full replay plus completion). Linear replay shows as a flat time per history event.

    python -m benchmarks.replay_scaling [N ...]   (from the repository root)
"""

from __future__ import annotations

import sys
import time
from datetime import datetime, timezone

from durable.core._history import EventType, HistoryEvent
from durable.core._replay import execute_step


def fan_out(context):  # type: ignore[no-untyped-def]
    n = context.get_input()
    results = yield context.task_all([context.call_activity("work", i) for i in range(n)])
    return sum(results)


def fan_out_history(n: int) -> tuple[list[HistoryEvent], list[HistoryEvent]]:
    """History after the first step, and the N completions as new events."""
    t = datetime(2026, 1, 1, tzinfo=timezone.utc)
    started = HistoryEvent(
        EventType.EXECUTION_STARTED, t, name="fan_out", input=str(n), instance_id="bench", execution_id="e1"
    )
    result = execute_step(lambda name: fan_out, [], [started], t)
    completions = [HistoryEvent(EventType.TASK_COMPLETED, t, task_scheduled_id=i, result=str(i)) for i in range(n)]
    return result.events, completions


def main(sizes: list[int]) -> None:
    print(f"{'activities':>10} {'history events':>15} {'step (ms)':>10} {'us/event':>9}")
    for n in sizes:
        history, completions = fan_out_history(n)
        # Replay the whole history and apply every completion, as a worker would after a restart.
        start = time.perf_counter()
        result = execute_step(lambda name: fan_out, history, completions, history[0].timestamp)
        elapsed = time.perf_counter() - start
        assert result.output == str(sum(range(n))), result.output
        events = len(history) + len(completions)
        print(f"{n:>10} {events:>15} {elapsed * 1000:>10.1f} {elapsed * 1e6 / events:>9.2f}")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [1_000, 2_500, 5_000, 10_000, 20_000])
