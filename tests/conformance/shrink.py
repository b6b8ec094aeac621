"""Minimising a failing run: a smaller program and fault schedule that still fail the same way.

Greedy: try one simplification at a time — fewer fault kinds, a smaller fault budget, fewer
workers and partitions, then fewer instances, events, signals, operations and executions, simpler
operations — and keep each that still fails with the same kind of violation (``category``), until
none does. The seed stays: a program and a ``SimConfig`` reproduce a run exactly, so the result
is spelled out as a regression test (``as_test``).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from .programs import Activity, FanOut, Op, Orchestrator, Program, Section, Sleep, Sub, Transfer, Unawaited, WaitEvent
from .simulate import SimConfig, SimResult, simulate

Run = Callable[[Program, SimConfig], Awaitable[SimResult]]


def category(violation: str) -> str:
    """What kind of violation: its words without ids, numbers and values."""
    statuses = re.findall(r"status='(\w+)'", violation)
    if violation.startswith("orchestration") and len(statuses) == 2:
        return f"orchestration {statuses[0]} instead of {statuses[1]}"
    head = re.split(r"[:(\[{]", violation, maxsplit=1)[0]
    return re.sub(r"@\w+@\S+|\bo\d\S*|\d+", "#", head).strip()


# Open runtime bugs a failing run can be put down to (a name, and how to tell its runs), so that a
# long run and the CI batches tell them from new failures; each has its own regression test in
# test_regressions.py. When it is fixed, its entry goes. Empty: every bug found so far is fixed,
# so any violation is a new one.
OPEN_BUGS: dict[str, Callable[[SimResult], bool]] = {}


def known_bug(result: SimResult) -> str | None:
    """The open runtime bug (``OPEN_BUGS``) a failing run is put down to, if any."""
    if not result.violations:
        return None
    return next((name for name, shows in OPEN_BUGS.items() if shows(result)), None)


def _without(items: tuple[Any, ...], index: int) -> tuple[Any, ...]:
    return items[:index] + items[index + 1 :]


def _simpler_ops(op: Op) -> Iterator[Op]:
    if isinstance(op, Activity | Sub) and op.attempts > 1:
        yield dataclasses.replace(op, attempts=1)
    if isinstance(op, FanOut) and len(op.xs) > 1:
        yield FanOut(op.xs[:1])
    if isinstance(op, Sleep) and op.seconds > 1:
        yield Sleep(1)
    if isinstance(op, WaitEvent) and op.timeout:
        yield dataclasses.replace(op, timeout=0)
    if isinstance(op, Transfer) and op.parallel:
        yield dataclasses.replace(op, parallel=False)
    if isinstance(op, Section):
        for index in range(len(op.body)):
            yield dataclasses.replace(op, body=_without(op.body, index))
        if len(op.journals) > 1:
            yield dataclasses.replace(op, journals=op.journals[:1], body=())


def _program_candidates(program: Program) -> Iterator[Program]:
    for index, start in enumerate(program.starts):
        if len(program.starts) > 1:
            gone = start.instance_id
            yield _prune(
                dataclasses.replace(
                    program,
                    starts=_without(program.starts, index),
                    events=tuple(e for e in program.events if e.instance_id != gone),
                    terminations=tuple(t for t in program.terminations if t.instance_id != gone),
                    suspensions=tuple(s for s in program.suspensions if s.instance_id != gone),
                )
            )
    for field in ("events", "signals", "terminations", "suspensions"):
        items = getattr(program, field)
        for index in range(len(items)):
            yield dataclasses.replace(program, **{field: _without(items, index)})
    for o_index, spec in enumerate(program.orchestrators):
        replace = _replacing(program, o_index)
        if spec.generations > 1:
            yield replace(dataclasses.replace(spec, generations=spec.generations - 1))
        for index, op in enumerate(spec.body):
            if len(spec.body) > 1:
                yield _prune(replace(dataclasses.replace(spec, body=_without(spec.body, index))))
            for simpler in _simpler_ops(op):
                yield replace(dataclasses.replace(spec, body=(*spec.body[:index], simpler, *spec.body[index + 1 :])))
    for index, event in enumerate(program.events):
        if event.at_tick:
            events = (*program.events[:index], dataclasses.replace(event, at_tick=0), *program.events[index + 1 :])
            yield dataclasses.replace(program, events=events)


def _replacing(program: Program, index: int) -> Callable[[Orchestrator], Program]:
    def replace(spec: Orchestrator) -> Program:
        orchestrators = (*program.orchestrators[:index], spec, *program.orchestrators[index + 1 :])
        return dataclasses.replace(program, orchestrators=orchestrators)

    return replace


def _prune(program: Program) -> Program:
    """Without the orchestrators nothing starts or calls."""
    used = {s.orchestrator for s in program.starts}
    used |= {
        op.orchestrator
        for o in program.orchestrators
        if o.name in used
        for op in o.body
        if isinstance(op, Sub | Unawaited)
    }
    return dataclasses.replace(program, orchestrators=tuple(o for o in program.orchestrators if o.name in used))


def _config_candidates(config: SimConfig, injected: int) -> Iterator[SimConfig]:
    for kind in sorted(config.faults):
        yield dataclasses.replace(config, faults=tuple(k for k in config.faults if k != kind))
    for budget in sorted({0, 1, 2, injected // 2, injected - 1}):
        if 0 <= budget < min(config.max_faults, injected):
            yield dataclasses.replace(config, max_faults=budget)
    if config.workers > 1:
        yield dataclasses.replace(config, workers=config.workers - 1)
    if config.partitions > 1:
        yield dataclasses.replace(config, partitions=1)


async def shrink(
    program: Program, config: SimConfig, run: Run = simulate, budget: int = 600, reseeds: int = 4
) -> tuple[Program, SimConfig, SimResult]:
    """The smallest failing variant found within ``budget`` runs (same violation category). A
    candidate is tried with its seed and then ``reseeds`` others, since a smaller program takes
    another path through the same schedule."""
    result = await run(program, config)
    if not result.violations:
        raise ValueError("the run does not fail")
    target, bug = category(result.violations[0]), known_bug(result)
    runs = 0

    async def fails(candidate_program: Program, candidate_config: SimConfig) -> SimResult | None:
        nonlocal runs
        for attempt_seed in [candidate_config.seed, *(candidate_config.seed + 7919 * (i + 1) for i in range(reseeds))]:
            runs += 1
            attempt = await run(candidate_program, dataclasses.replace(candidate_config, seed=attempt_seed))
            if any(category(v) == target for v in attempt.violations) and known_bug(attempt) == bug:
                return attempt  # the same kind of failure, not one put down to another (known) bug
        return None

    improved = True
    while improved and runs < budget:
        improved = False
        candidates: Iterator[tuple[Program, SimConfig]] = itertools.chain(
            ((p, config) for p in _program_candidates(program)),
            ((program, c) for c in _config_candidates(config, sum(result.faults.values()))),
        )
        for candidate_program, candidate_config in candidates:
            if runs >= budget:
                break
            attempt = await fails(candidate_program, candidate_config)
            if attempt is not None:
                program, config, result, improved = candidate_program, attempt.config, attempt, True
                break
    return program, config, result


def as_test(name: str, program: Program, config: SimConfig, result: SimResult) -> str:
    """A regression test that replays the run (paste into test_regressions.py)."""
    faults = [line.split(": ", 1)[1] for line in result.log if ": " in line and not line.split(": ")[0].count(" ")]
    lines = [
        f"async def test_{name}() -> None:",
        f'    """{result.violations[0][:100]}',
        f"    Faults: {'; '.join(faults) or 'none'}.",
        '    """',
        f"    program = {program!r}",
        f"    config = {config!r}",
        "    await assert_conforms(program, config)",
    ]
    return "\n".join(lines) + "\n"
