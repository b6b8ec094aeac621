"""The long conformance run: many generated programs, each under its own seeded fault schedule.

    .venv/bin/python -m tests.conformance.run --programs 10000 [--seed S] [--faults all|none|crash,dup,...]
        [--jobs N] [--shrink] [--show SEED]

Program ``i`` is ``generate(S + i)`` run with ``SimConfig.from_seed(S + i, faults)``. Prints the
programs and seeds run, the faults injected by kind, the storage calls interleaved, what the
programs exercised, and the violations by kind with their seeds (``--shrink``: minimised and
printed as regression tests; ``--show SEED``: one run with its full schedule). Exit status 1
when a violation was found.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

from .model import Outcome
from .programs import (
    Activity,
    Call,
    FanOut,
    Op,
    Program,
    Race,
    Section,
    Signal,
    Sleep,
    Sub,
    Transfer,
    Unawaited,
    WaitEvent,
    generate,
)
from .shrink import as_test, category, known_bug, shrink
from .simulate import FAULT_KINDS, SimConfig, Simulation, simulate


@dataclass
class Tally:
    programs: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    programs_with: Counter[str] = field(default_factory=Counter)  # programs with at least one fault of a kind
    features: Counter[str] = field(default_factory=Counter)
    compared: Counter[str] = field(default_factory=Counter)
    ticks: int = 0
    failures: dict[str, list[int]] = field(default_factory=dict)  # violation kind -> seeds

    def add(self, other: Tally) -> None:
        self.programs += other.programs
        self.faults += other.faults
        self.programs_with += other.programs_with
        self.features += other.features
        self.compared += other.compared
        self.ticks += other.ticks
        for kind, seeds in other.failures.items():
            self.failures.setdefault(kind, []).extend(seeds)


def parse_faults(text: str) -> tuple[str, ...]:
    if text == "all":
        return FAULT_KINDS
    if text == "none":
        return ()
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = set(kinds) - set(FAULT_KINDS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown fault kinds {sorted(unknown)}; known: {', '.join(FAULT_KINDS)}")
    return kinds


def features(program: Program, expected: Outcome) -> set[str]:
    """What a program exercises, for the report: from its code and from its fault-free outcome."""

    def ops(body: tuple[Op, ...]) -> list[Op]:
        return [x for op in body for x in (op, *(ops(op.body) if isinstance(op, Section) else ()))]

    found = set()
    kinds: dict[type, str] = {
        Activity: "activities", FanOut: "fan-out (task_all)", Race: "task_any race", Sub: "sub-orchestrations",
        Sleep: "durable timers", WaitEvent: "external events", Section: "critical sections (journals)",
        Transfer: "critical sections (bank transfers)", Unawaited: "tasks never awaited",
    }  # fmt: skip
    for spec in program.orchestrators:
        if spec.generations > 1:
            found.add("continue_as_new")
        for op in ops(spec.body):
            if type(op) in kinds:
                found.add(kinds[type(op)])
            if getattr(op, "attempts", 1) > 1:
                found.add("retries (activity or sub-orchestration)")
            if isinstance(op, Signal) and op.delay:
                found.add("scheduled signals")
            if isinstance(op, Signal | Call) and op.operation == "forward":
                found.add("entity-to-entity signals")
            if isinstance(op, Signal | Call) and op.operation == "delete":
                found.add("entity deletion")
            if isinstance(op, Signal | Call) and op.operation == "fail":
                found.add("failing entity operations (rolled back)")
    if program.signals:
        found.add("client signals")
    if program.terminations:
        found.add("terminate")
    if program.suspensions:
        found.add("suspend and resume")
    if any(f.status == "Failed" for f in expected.orchestrations.values()):
        found.add("orchestrations that fail")
    journals = [e for i, e in expected.entities.items() if i.startswith("@journal@")]
    if any(len({entry[0] for entry in j}) > 1 for j in journals):
        found.add("one entity, several senders (journal)")
    sections = [{e[0] for e in j if isinstance(e[1], str) and e[1].startswith("enter")} for j in journals]
    locking = [s for s in program.starts if any(isinstance(op, Section | Transfer)
                                                for op in ops(program.orchestrator(s.orchestrator).body))]  # fmt: skip
    if any(len(s) > 1 for s in sections) or len(locking) > 1:
        found.add("contended critical sections (2+ instances)")
    if any(len(o.body) > 1 for o in program.orchestrators) or any(
        sum(1 for e in j if e[0] == sender) > 1 for j in journals for sender in {e[0] for e in j}
    ):
        found.add("several operations per sender")
    return found


async def run_seeds(seeds: list[int], faults: tuple[str, ...]) -> Tally:
    logging.disable(logging.CRITICAL)  # the workers log every injected failure
    tally = Tally()
    for seed in seeds:
        program = generate(seed)
        result = await simulate(program, SimConfig.from_seed(seed, faults))
        tally.programs += 1
        tally.faults += result.faults
        tally.programs_with += Counter(result.faults.keys())
        tally.features += Counter(features(program, result.expected))
        tally.compared["orchestration outcomes"] += len(result.expected.orchestrations)
        tally.compared["entity states"] += len(set(result.expected.entities) | set(result.actual.entities))
        tally.compared["activity executions (expected)"] += sum(result.expected.activity_runs.values())
        tally.compared["activity executions (actual)"] += sum(result.actual.activity_runs.values())
        tally.compared["journal entries"] += sum(
            len(v) for k, v in result.actual.entities.items() if k.startswith("@journal@")
        )
        tally.ticks += result.ticks
        if result.violations:
            known = known_bug(result)
            kind = f"known bug {known}" if known else category(result.violations[0])
            tally.failures.setdefault(kind, []).append(seed)
    return tally


def _run_chunk(seeds: list[int], faults: tuple[str, ...]) -> Tally:
    return asyncio.run(run_seeds(seeds, faults))


async def show(seed: int, faults: tuple[str, ...]) -> None:
    program, config = generate(seed), SimConfig.from_seed(seed, faults)
    result = await Simulation(program, config, verbose=True).run()
    print(f"program = {program!r}\nconfig = {config!r}\n")
    print("\n".join(result.log))
    print("\nexpected:", result.expected)
    print("actual:  ", result.actual)
    print("violations:", *result.violations, sep="\n  ")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.conformance.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--programs", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0, help="the first seed (program i uses seed + i)")
    parser.add_argument("--faults", type=parse_faults, default=FAULT_KINDS, help="all, none, or some of: "
                        + ",".join(FAULT_KINDS))  # fmt: skip
    parser.add_argument("--jobs", type=int, default=1, help="processes")
    parser.add_argument("--shrink", action="store_true", help="minimise the first failure of each kind")
    parser.add_argument("--show", type=int, metavar="SEED", help="run one seed and print its whole schedule")
    args = parser.parse_args(argv)
    if args.show is not None:
        asyncio.run(show(args.show, args.faults))
        return 0

    seeds = list(range(args.seed, args.seed + args.programs))
    started = time.perf_counter()
    tally = Tally()
    if args.jobs > 1:
        chunks = [seeds[i :: args.jobs * 8] for i in range(args.jobs * 8)]
        with ProcessPoolExecutor(args.jobs) as pool:
            for part in pool.map(_run_chunk, chunks, [args.faults] * len(chunks)):
                tally.add(part)
    else:
        tally = asyncio.run(run_seeds(seeds, args.faults))
    elapsed = time.perf_counter() - started

    failing = sum(len(s) for s in tally.failures.values())
    print(f"programs:   {tally.programs} (seeds {args.seed}..{args.seed + args.programs - 1}), "
          f"fault kinds: {','.join(args.faults) or 'none'}")  # fmt: skip
    print(f"wall time:  {elapsed:.1f} s ({tally.programs / elapsed * 60:.0f} programs/min, jobs={args.jobs})")
    print(f"scheduler steps: {tally.ticks} ({tally.ticks / max(tally.programs, 1):.0f} per program)")
    print(f"faults injected: {sum(tally.faults.values())}")
    for kind in FAULT_KINDS:
        print(f"  {kind:8} {tally.faults[kind]:7}  in {tally.programs_with[kind]} programs")
    print("checked:", ", ".join(f"{count} {what}" for what, count in tally.compared.items()))
    print("programs exercising:")
    for feature, count in sorted(tally.features.items(), key=lambda item: -item[1]):
        print(f"  {count:7}  {feature}")
    print(f"violations: {failing} programs")
    for kind, failed in sorted(tally.failures.items()):
        print(f"  {len(failed):5}  {kind}: seeds {sorted(failed)[:12]}{' ...' if len(failed) > 12 else ''}")
    if args.shrink:
        for kind, failed in sorted(tally.failures.items()):
            seed = min(failed)
            program, config, result = asyncio.run(shrink(generate(seed), SimConfig.from_seed(seed, args.faults)))
            print(f"\n# {kind} (seed {seed}, shrunk to size {program.size()})")
            print(as_test(f"seed_{seed}", program, config, result))
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
