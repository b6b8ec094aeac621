"""The long conformance run: many generated programs, each under its own seeded fault schedule.

    .venv/bin/python -m tests.conformance.run --programs 10000 [--seed S] [--faults all|none|crash,dup,...]
        [--jobs N] [--shrink] [--show SEED]
    .venv/bin/python -m tests.conformance.run --azure worker|host|both --programs 200 [--seed S]
        [--faults kill,azurite] [--jobs N]

Program ``i`` is ``generate(S + i)`` run with ``SimConfig.from_seed(S + i, faults)``. Prints the
programs and seeds run, the faults injected by kind, the storage calls interleaved, what the
programs exercised, and the violations by kind with their seeds (``--shrink``: minimised and
printed as regression tests; ``--show SEED``: one run with its full schedule). Exit status 1
when a violation was found.

With ``--azure``, the programs run on Azurite instead (``tests.conformance.azure``: real worker
processes, polling workers or ``durable start``, SIGKILLed at seeded moments, Azurite restarted),
``--jobs`` runs at a time on one Azurite of its own (a run with an Azurite restart has one of its
own); program ``i`` in mode M is ``generate(S + i)`` with ``AzureConfig.from_seed(S + i, M)``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from . import azure
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


def parse_faults(text: str, known: tuple[str, ...] = FAULT_KINDS) -> tuple[str, ...]:
    if text == "all":
        return known
    if text == "none":
        return ()
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = set(kinds) - set(known)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown fault kinds {sorted(unknown)}; known: {', '.join(known)}")
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


async def run_on_azurite(seeds: list[int], modes: list[str], faults: tuple[str, ...], jobs: int, folder: Path) -> int:
    """The ``--azure`` run: prints what ran, the faults injected and the violations; 1 if any."""
    runs = [(seed, mode) for seed in seeds for mode in modes]
    faults_injected: Counter[str] = Counter()
    features_seen: Counter[str] = Counter()
    compared: Counter[str] = Counter()
    failures: list[str] = []
    slots = asyncio.Semaphore(jobs)
    started = time.perf_counter()
    with azure.emulator(folder / "azurite") as shared:

        async def one(seed: int, mode: str) -> None:
            async with slots:
                program, config = generate(seed), azure.AzureConfig.from_seed(seed, mode, faults)
                where = folder / f"{mode}-{seed}"
                try:
                    if config.azurite_restarts:  # restarting the shared emulator would disturb the other runs
                        with azure.emulator(where / "azurite") as own:
                            result = await azure.run_on_azurite(program, config, own, where)
                    else:
                        result = await azure.run_on_azurite(program, config, shared, where)
                except Exception as error:  # the harness failed (an Azurite that did not come back, say)
                    print(f"  {mode:6} seed {seed}: HARNESS ERROR {error!r}", flush=True)
                    failures.append(f"{mode} seed {seed}: harness error {error!r}")
                    return
            faults_injected.update(result.faults)
            features_seen.update(features(result.program, result.expected))
            compared["orchestration outcomes"] += len(result.expected.orchestrations)
            compared["entity states"] += len(set(result.expected.entities) | set(result.actual.entities))
            compared["activity executions (expected)"] += sum(result.expected.activity_runs.values())
            compared["activity executions (actual)"] += sum(result.actual.activity_runs.values())
            status = "ok" if not result.violations else "VIOLATION " + "; ".join(result.violations[:3])
            print(
                f"  {mode:6} seed {seed}: {result.seconds:5.1f} s, faults {dict(+result.faults)}: {status}", flush=True
            )
            if result.violations:
                failures.append(f"{mode} seed {seed}: {result.violations}")

        await asyncio.gather(*(one(seed, mode) for seed, mode in runs))
    elapsed = time.perf_counter() - started
    print(f"runs:       {len(runs)} ({len(seeds)} programs, seeds {seeds[0]}..{seeds[-1]}, modes {','.join(modes)}), "
          f"fault kinds: {','.join(faults) or 'none'}")  # fmt: skip
    print(f"wall time:  {elapsed:.1f} s (jobs={jobs})")
    print("faults injected:", ", ".join(f"{kind} {count}" for kind, count in sorted(faults_injected.items())))
    print("checked:", ", ".join(f"{count} {what}" for what, count in compared.items()))
    print("programs exercising:")
    for feature, count in sorted(features_seen.items(), key=lambda item: -item[1]):
        print(f"  {count:7}  {feature}")
    print(f"violations: {len(failures)} runs", *failures, sep="\n  ")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.conformance.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--programs", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0, help="the first seed (program i uses seed + i)")
    parser.add_argument("--faults", default="all", help="all, none, or some of: " + ",".join(FAULT_KINDS)
                        + " (with --azure: " + ",".join(azure.FAULT_KINDS) + ")")  # fmt: skip
    parser.add_argument("--jobs", type=int, default=1, help="processes")
    parser.add_argument("--shrink", action="store_true", help="minimise the first failure of each kind")
    parser.add_argument("--show", type=int, metavar="SEED", help="run one seed and print its whole schedule")
    parser.add_argument("--azure", choices=("worker", "host", "both"),
                        help="run on Azurite with real processes killed, in this execution mode")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        args.faults = parse_faults(args.faults, azure.FAULT_KINDS if args.azure else FAULT_KINDS)
    except argparse.ArgumentTypeError as error:
        parser.error(str(error))
    if args.azure:
        modes = list(azure.MODES) if args.azure == "both" else [args.azure]
        seeds = list(range(args.seed, args.seed + args.programs))
        logging.disable(logging.CRITICAL)
        with tempfile.TemporaryDirectory(prefix="conformance-azure-") as folder:
            return asyncio.run(run_on_azurite(seeds, modes, args.faults, args.jobs, Path(folder)))
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
