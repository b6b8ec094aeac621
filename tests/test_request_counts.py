"""Storage requests per unit of work stay within their budgets (a count, not a time).

Each workload of ``benchmarks/run.py`` runs here at a small size on Azurite, in process, and its
requests are counted by kind. Receives are left out of the budget: how many polls come back
empty depends on timing, not on the protocol; every other request is the work itself (a send,
a delete, a commit, a row write), so a change that adds one per message or per step fails here.
The budgets are today's counts at these sizes with some headroom: about 20%, and more for the
counter, whose signals an entity applies in fewer or more steps depending on when they arrive.
Before messages travelled in envelopes (``storage._envelopes``), a fan-out cost 4.4 requests per
activity and a signal 2.3; before a worker alone on its task hub ran fan-outs itself, 0.25 per
activity; before entity steps kept their Instances row's ETag, a transfer cost about 54, and 48
before steps that change nothing their row shows held it back (protocol I6). ``measure`` has
the worker take up the task hub first, so partition lease claims (a start-up cost) are not in
the counts.
"""

from __future__ import annotations

import random

import pytest

from benchmarks.run import InProcess, Observer, Workload, measure
from tests.fixtures_azurite import unique_task_hub

pytestmark = pytest.mark.azurite


def _small_workloads(run: str) -> list[tuple[Workload, float]]:
    """(workload, budget of requests per unit other than receives)."""
    accounts = [f"{run}-acct{i}" for i in range(4)]
    rng = random.Random(3)
    transfers = [dict(zip(("from", "to"), rng.sample(accounts, 2), strict=True), amount=5) for _ in range(8)]
    return [
        (Workload("seq5", "orchestration", "sequence", list(range(20)), 20,
                  lambda out: None if sorted(out) == [i + 5 for i in range(20)] else "wrong sums"), 12.0),
        (Workload("fan100", "activity", "fan_out", [100, 100], 200,
                  lambda out: None if out == [5050, 5050] else f"wrong sums {out}"), 0.1),
        (Workload("counter", "signal", "signal_counter", [{"key": run, "count": 100}] * 2, 200,
                  lambda out: None if max(out) == 200 else f"counter at {max(out)}"), 0.3),
        (Workload("bank", "transfer", "transfer", transfers, len(transfers),
                  lambda out: None if all(isinstance(o, bool) for o in out) else "a transfer failed",
                  setup=dict.fromkeys(accounts, 100)), 48.0),
    ]  # fmt: skip


@pytest.mark.parametrize("index", range(4), ids=["seq5", "fan100", "counter", "bank"])
async def test_requests_per_unit_of_work_stay_within_budget(azurite: str, index: int) -> None:
    hub = unique_task_hub("count")
    workload, budget = _small_workloads(hub)[index]
    observer = Observer(azurite, hub)
    try:
        async with InProcess(azurite, hub) as target:
            result = await measure(target, observer, workload)
    finally:
        await observer.delete_task_hub()
        await observer.close()
    work = {kind: n for kind, n in result.requests_by_kind.items() if kind != "queue.receive"}
    spent = sum(work.values())
    assert spent <= budget, f"{workload.name}: {spent:.2f} requests per {workload.unit} (budget {budget}): {work}"
