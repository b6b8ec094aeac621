"""The conformance suite on Azurite, as it runs in CI: a fixed set of generated programs on the real
runtime in processes of their own — polling workers and local Functions hosts (``durable start``)
— SIGKILLed at seeded moments (and, for the polling workers, at points of the commit protocol),
and with Azurite itself restarted mid-run; every outcome compared with the reference model by the
checker of the simulation (``tests.conformance.azure``). About a minute.

The long run is ``python -m tests.conformance.run --azure both --programs 200`` (docs/guarantees.md).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from azure.core.exceptions import ResourceNotFoundError
from azure.storage.queue import QueueClient

from .azure import (
    EVENT_TIMEOUT,
    RACE_TIMER,
    AzureConfig,
    AzureResult,
    RestartableAzurite,
    emulator,
    real_time,
    run_on_azurite,
    waits_long,
)
from .programs import Race, Sleep, WaitEvent, generate

# Programs that finish within seconds (none sits out an event timeout), chosen for what they
# exercise: activities and retries, critical sections and transfers, sub-orchestrations,
# continue_as_new, events, suspend/resume, terminate, client and scheduled signals.
KILLS = {"worker": (13, 27), "host": (27, 36)}
COMMIT_KILLS = 55
HANDOVER_KILLS = 41
RESTARTS = {"worker": 52, "host": 21}

pytestmark = pytest.mark.azurite


@pytest.fixture(scope="module")
def shared_azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RestartableAzurite]:
    with emulator(tmp_path_factory.mktemp("azurite")) as started:
        yield started


def _report(results: list[AzureResult]) -> str:
    return "\n".join(f"{r.config}: {r.violations}\n  log: {r.log}" for r in results if r.violations)


@pytest.mark.parametrize("mode", list(KILLS))
async def test_generated_programs_conform_with_worker_processes_killed(
    mode: str, shared_azurite: RestartableAzurite, tmp_path: Path
) -> None:
    configs = [AzureConfig.from_seed(seed, mode, ("kill",)) for seed in KILLS[mode]]
    if mode == "worker":
        # and runs where every worker's first process dies at its first commit, and the first
        # time it hands a message over to an instance of a partition it holds (before applying it)
        for seed, point in ((COMMIT_KILLS, "committed"), (HANDOVER_KILLS, "handed-over")):
            first = AzureConfig.from_seed(seed, mode, ())
            configs.append(dataclasses.replace(first, hook_kills=tuple((s, point, 1) for s in range(first.workers))))
    results = await asyncio.gather(
        *(run_on_azurite(generate(c.seed), c, shared_azurite, tmp_path / str(c.seed)) for c in configs)
    )
    assert not any(r.violations for r in results), _report(results)
    injected = sum((r.faults for r in results), Counter[str]())
    assert injected["kill"] == sum(len(c.kills) for c in configs)  # every SIGKILL was sent
    if mode == "worker":  # the processes meant to die at their first commit, or handover, did
        for result in results[-2:]:
            assert result.faults["kill at a commit point"] >= 1, (result.config, result.faults)


async def test_generated_programs_conform_across_an_azurite_restart(tmp_path: Path) -> None:
    async def run(mode: str) -> AzureResult:
        config = AzureConfig.from_seed(RESTARTS[mode], mode)
        assert config.azurite_restarts and config.kills
        with emulator(tmp_path / mode / "azurite") as own:  # its own: a restart would disturb other runs
            return await run_on_azurite(generate(config.seed), config, own, tmp_path / mode)

    results = await asyncio.gather(*(run(mode) for mode in RESTARTS))
    assert not any(r.violations for r in results), _report(results)
    for result in results:
        assert result.faults["azurite"] == 1
        assert any("Azurite restarted" in line for line in result.log)


def test_real_time_programs_keep_their_shape_with_short_durations() -> None:
    for seed in (*KILLS["worker"], *KILLS["host"], COMMIT_KILLS, *RESTARTS.values()):
        assert not waits_long(real_time(generate(seed))), seed
    for seed in range(200):
        program, cut = generate(seed), real_time(generate(seed))
        assert len(program.orchestrators) == len(cut.orchestrators)
        for original, short in zip(program.orchestrators, cut.orchestrators, strict=True):
            assert [type(op) for op in original.body] == [type(op) for op in short.body]
            for op in short.body:
                assert not isinstance(op, Sleep) or op.seconds <= 4
                assert not isinstance(op, WaitEvent) or op.timeout in (0, EVENT_TIMEOUT)
                assert not isinstance(op, Race) or op.timer == RACE_TIMER


@pytest.mark.parametrize(("hard", "kept"), [(True, 0), (False, 3)], ids=["SIGKILL", "SIGTERM"])
def test_azurite_keeps_acknowledged_writes_only_when_stopped_gracefully(hard: bool, kept: int, tmp_path: Path) -> None:
    """Why the Azurite fault is a graceful restart: Azurite saves its queue and table metadata
    (LokiJS) every 5 s and when it shuts down, so SIGKILLed it forgets what it acknowledged in
    its last seconds — here a queue and 3 messages — which no storage client can ride through."""
    with emulator(tmp_path) as azurite:
        queue = QueueClient.from_connection_string(azurite.connection_string, "acknowledged")
        queue.create_queue()
        for n in range(3):
            queue.send_message(f"m{n}")
        azurite.restart(hard=hard)
        queue = QueueClient.from_connection_string(azurite.connection_string, "acknowledged")
        try:
            stored = queue.get_queue_properties().approximate_message_count
        except ResourceNotFoundError:
            stored = 0  # the queue itself was forgotten
        assert stored == kept
