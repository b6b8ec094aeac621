"""The conformance suite as it runs in CI: a fixed set of generated programs on the real runtime
(in-memory backend, two or three workers, virtual clock), each under its own seeded fault
schedule, compared with the reference model; a batch per fault kind, one without faults and one
with all of them (about 400 programs, some 15 seconds). Also: that the model meets its own
invariants, that the checks do fail on a wrong expectation and on a broken runtime, that a run is
reproducible from its seed, and that a failing run shrinks.

The long run is ``python -m tests.conformance.run --programs 10000`` (``docs/guarantees.md``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

import durable as df
from durable.core import _entities as entities
from durable.core import _protocol as protocol
from durable.core._messages import WorkMessage
from storage import InMemoryBackend

from . import model, programs
from .check import compare
from .model import Final, Outcome
from .programs import fault_free, generate
from .shrink import category, known_bug, shrink
from .simulate import FAULT_KINDS, SimConfig, outcome_at_rest, simulate

BATCHES: dict[str, tuple[tuple[str, ...], range]] = {
    "none": ((), range(0, 40)),
    **{kind: ((kind,), range(100 + 1000 * i, 100 + 1000 * i + 30)) for i, kind in enumerate(FAULT_KINDS)},
    "all": (FAULT_KINDS, range(20_000, 20_120)),
}


@pytest.fixture(autouse=True)
def quiet() -> Iterator[None]:
    """The workers log every failure the faults cause."""
    logging.disable(logging.CRITICAL)
    yield
    logging.disable(logging.NOTSET)


@pytest.mark.parametrize("batch", list(BATCHES))
async def test_generated_programs_conform_to_the_model_under_faults(batch: str) -> None:
    faults, seeds = BATCHES[batch]
    injected: Counter[str] = Counter()
    failures, known = [], []
    for seed in seeds:
        result = await simulate(generate(seed), SimConfig.from_seed(seed, faults))
        injected += result.faults
        if result.violations and known_bug(result):
            known.append(seed)  # an open bug with its own regression test (test_regressions.py)
        elif result.violations:
            failures.append(f"seed {seed}: " + "; ".join(result.violations[:3]))
    assert not failures, "\n".join(failures)
    for kind in faults:  # the batch did what it says
        assert injected[kind] >= 10, f"only {injected[kind]} {kind} faults injected in {len(seeds)} programs"
    assert len(known) <= len(seeds) // 5, f"open bugs hit in seeds {known}"


def test_the_model_meets_its_own_invariants() -> None:
    for seed in range(300):
        program = generate(seed)
        outcome = fault_free(program)
        assert compare(program, outcome, outcome) == [], seed


# -- the checks can fail -------------------------------------------------------------------------------
def changed(outcome: Outcome, **changes: Any) -> Outcome:
    """``outcome`` with some orchestrations, entities or activity counts replaced."""
    return Outcome(
        orchestrations={**outcome.orchestrations, **changes.get("orchestrations", {})},
        entities={**outcome.entities, **changes.get("entities", {})},
        activity_runs=changes.get("activity_runs", outcome.activity_runs),
    )


def per_sender(entries: list[Any]) -> dict[str, list[Any]]:
    return {sender: [e for e in entries if e[0] == sender] for sender in {e[0] for e in entries}}


def test_a_wrong_expectation_is_reported() -> None:
    """Each way the runtime's outcome could differ from the model's is reported."""
    reported: Counter[str] = Counter()
    for seed in range(200):
        program = generate(seed)
        expected, actual = fault_free(program), fault_free(program)
        assert compare(program, expected, actual) == []
        for name, final in actual.orchestrations.items():
            if final.status == "Completed":
                wrong = dataclasses.replace(final, output=["something else"])
                assert any(name in v for v in compare(program, expected, changed(actual, orchestrations={name: wrong})))
                reported["output"] += 1
            stuck = Final("Running", name=final.name)
            if final.status != "Running":
                assert compare(program, expected, changed(actual, orchestrations={name: stuck}))
                reported["status"] += 1
        for entity, state in actual.entities.items():
            if entity.startswith("@counter@"):
                assert compare(program, expected, changed(actual, entities={entity: state + 1}))
                reported["counter"] += 1
            elif entity.startswith("@journal@") and state:
                assert compare(program, expected, changed(actual, entities={entity: [*state, state[0]]}))
                reported["journal: applied twice"] += 1
                assert compare(program, expected, changed(actual, entities={entity: state[1:]}))
                reported["journal: lost"] += 1
                if per_sender(state) != per_sender(state[::-1]):
                    assert compare(program, expected, changed(actual, entities={entity: state[::-1]}))
                    reported["journal: out of order"] += 1
            elif entity.startswith("@account@"):
                richer = compare(program, expected, changed(actual, entities={entity: state + 5}))
                assert any("money" in v for v in richer)
                reported["money"] += 1
        for key in actual.activity_runs:
            fewer = actual.activity_runs - Counter({key: actual.activity_runs[key]})
            assert compare(program, expected, changed(actual, activity_runs=fewer))
            reported["activity"] += 1
    assert len(reported) == 8 and min(reported.values()) > 0, reported


def test_interleaved_critical_sections_are_reported() -> None:
    program = generate(0)
    nested = [["a", "enter1"], ["b", 1], ["a", "exit1"]]
    outcome = changed(fault_free(program), entities={"@journal@j0": nested})
    assert any("inside the critical section" in v for v in compare(program, outcome, outcome))
    crossed = changed(
        fault_free(program),
        entities={
            "@journal@j0": [["a", "enter1"], ["a", "exit1"], ["b", "enter2"], ["b", "exit2"]],
            "@journal@j1": [["b", "enter2"], ["b", "exit2"], ["a", "enter1"], ["a", "exit1"]],
        },
    )
    assert any("in the order" in v for v in compare(program, crossed, crossed))


@pytest.mark.parametrize(
    ("mutation", "faults"),
    [
        ("entity operations are not de-duplicated", ("dup",)),
        ("entities ignore their locks", ()),
        ("a child's row goes after its outcome", ()),
    ],
)
async def test_a_broken_runtime_is_caught(
    mutation: str, faults: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The simulation finds a runtime with a guarantee taken out (within 300 seeds), and shrinks
    a failing run to a program no larger that fails the same way."""
    if mutation == "entity operations are not de-duplicated":
        original = entities._EntityRunner.receive

        def receive(self: entities._EntityRunner, message: WorkMessage) -> None:
            request = entities.EntityRequest.from_json(message.event.input)
            if request.sender and request.seq and request.seq <= self.s.senders.get(request.sender, 0):
                self.deliver(request, message.id)  # applied again
            else:
                original(self, message)

        monkeypatch.setattr(entities._EntityRunner, "receive", receive)
    elif mutation == "a child's row goes after its outcome":
        monkeypatch.setattr(protocol, "row_goes_ahead", lambda messages: False)
    else:

        def deliver(self: entities._EntityRunner, request: entities.EntityRequest, message_id: str) -> None:
            self.execute(request, message_id)  # whoever holds the lock

        monkeypatch.setattr(entities._EntityRunner, "deliver", deliver)
    caught = []
    for seed in range(300):
        result = await simulate(generate(seed), SimConfig.from_seed(seed, faults))
        if result.violations:
            caught.append(seed)
        if len(caught) == 3:
            break
    assert len(caught) == 3, f"{mutation}: caught by seeds {caught} only"
    if mutation == "entity operations are not de-duplicated":  # and a failing run shrinks
        program, config = generate(caught[0]), SimConfig.from_seed(caught[0], faults)
        small, _, result = await shrink(program, config, budget=150)
        assert result.violations and small.size() <= program.size()
        first = await simulate(program, config)
        assert category(first.violations[0]) in {category(v) for v in result.violations}


# -- reproducibility -----------------------------------------------------------------------------------
async def test_a_run_is_reproducible_from_its_seed() -> None:
    for seed in (3, 20_005):
        program = generate(seed)
        assert program == generate(seed)
        assert eval(repr(program), {**vars(programs), **vars(model)}) == program
        first = await simulate(program, SimConfig.from_seed(seed))
        second = await simulate(program, SimConfig.from_seed(seed))
        assert (first.log, first.violations, first.actual) == (second.log, second.violations, second.actual)
        assert first.faults == second.faults and sum(first.faults.values()) > 0


async def test_a_row_left_written_ahead_is_reported() -> None:
    """At rest, no row may still be marked as written ahead of its step's messages (protocol
    I8): one that is keeps its instance from being purged or started again."""
    app = df.DFApp()

    @app.orchestration_trigger(context_name="context")
    def one(context):  # type: ignore[no-untyped-def]
        return 1
        yield  # an orchestrator is a generator

    runtime = df.DurableRuntime(app, InMemoryBackend(partition_count=1))
    client = runtime.client()
    await client.start_new("one", "x")
    await runtime.worker.run_until_idle()
    now = runtime.clock()
    assert (await outcome_at_rest(runtime.backend, client, ["x"], now, Counter()))[1] == []
    row = await runtime.backend.read_instance("x")
    assert row is not None
    # As a worker leaves it when it dies between the row ahead and the sends (a marked row
    # never goes over the unmarked one of its step, so it is put in place directly).
    runtime.backend.instances["x"] = dataclasses.replace(row, sends_pending=True)
    _, violations = await outcome_at_rest(runtime.backend, client, ["x"], now, Counter())
    assert violations == ["x: its row, written ahead of its step's messages, was never confirmed"]
