"""Comparing what the runtime did with what the reference model says (``compare``).

Unique outcomes are compared exactly: each orchestration's status, output (where a value marked
``['racy', ...]`` matches any racy value) and error type; each counter's final state. Racy ones
are checked with invariants that every fault-free run satisfies, the model's run as the witness:

- journals (``append`` from many senders): for every sender (one execution), the entries it
  appended are exactly the model's, in the same order — nothing lost, nothing applied twice,
  FIFO per sender; between a critical section's ``enter`` and ``exit`` markers on a journal, no
  one else's entry (mutual exclusion); sections that lock the same journals pass through them
  in the same order (serializable);
- accounts (transfers under locks): money is conserved, no balance is negative, and each
  balance is its start plus what the runtime's own outputs say was moved in and out;
- activities ran at least as often as in the model with each input, and never with an input the
  model never used (no work that no committed step scheduled).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

from .model import Final, Outcome
from .programs import INITIAL_BALANCE, Program, Transfer


def matches(expected: Any, actual: Any) -> bool:
    """Equality, where ``['racy', x]`` in ``expected`` matches any ``['racy', y]``."""
    if isinstance(expected, list) and expected[:1] == ["racy"]:
        return isinstance(actual, list) and actual[:1] == ["racy"] and len(actual) == 2
    if isinstance(expected, list):
        return (
            isinstance(actual, list)
            and len(expected) == len(actual)
            and all(matches(e, a) for e, a in zip(expected, actual, strict=True))
        )
    if isinstance(expected, dict):
        return (
            isinstance(actual, dict)
            and expected.keys() == actual.keys()
            and all(matches(v, actual[k]) for k, v in expected.items())
        )
    return bool(expected == actual)


def compare(program: Program, expected: Outcome, actual: Outcome) -> list[str]:
    violations = _orchestrations(expected.orchestrations, actual.orchestrations)
    for entity in sorted(set(expected.entities) | set(actual.entities)):
        name = entity.split("@")[1]
        if name == "counter" and expected.entities.get(entity) != actual.entities.get(entity):
            violations.append(
                f"counter {entity}: state {actual.entities.get(entity)!r}, expected {expected.entities.get(entity)!r}"
            )
    violations += _journals(expected, actual)
    violations += _accounts(program, actual)
    violations += _activities(expected, actual)
    return violations


def _orchestrations(expected: dict[str, Final], actual: dict[str, Final]) -> list[str]:
    violations = []
    for instance in sorted(set(expected) | set(actual)):
        want, got = expected.get(instance), actual.get(instance)
        if want is None or got is None:
            violations.append(f"orchestration {instance}: {'unexpected' if want is None else 'missing'} ({got})")
        elif want.status != got.status or want.error != got.error or not matches(want.output, got.output):
            violations.append(f"orchestration {instance}: {got}, expected {want}")
    return violations


# -- journals ---------------------------------------------------------------------------------------
def _journals(expected: Outcome, actual: Outcome) -> list[str]:
    violations = []
    names = sorted(e for e in set(expected.entities) | set(actual.entities) if e.startswith("@journal@"))
    sections: dict[str, list[tuple[str, str]]] = {}
    for journal in names:
        want, got = expected.entities.get(journal, []), actual.entities.get(journal, [])
        for sender in sorted({e[0] for e in want} | {e[0] for e in got}):
            mine, theirs = [e for e in got if e[0] == sender], [e for e in want if e[0] == sender]
            if mine != theirs:
                violations.append(f"journal {journal}: sender {sender} appended {mine}, expected {theirs}")
        violations += _exclusive(journal, got)
        sections[journal] = [(e[0], e[1][5:]) for e in got if isinstance(e[1], str) and e[1].startswith("enter")]
    for (a, in_a), (b, in_b) in itertools.combinations(sections.items(), 2):
        common = set(in_a) & set(in_b)
        order_a, order_b = [s for s in in_a if s in common], [s for s in in_b if s in common]
        if order_a != order_b:
            violations.append(f"critical sections passed {a} in the order {order_a} but {b} in {order_b}")
    return violations


def _exclusive(journal: str, entries: list[Any]) -> list[str]:
    """Between [s, 'enterI'] and [s, 'exitI'] only s appends."""
    holder: tuple[str, str] | None = None
    for position, (sender, item) in enumerate(entries):
        marker = item if isinstance(item, str) else ""
        if holder is not None and sender != holder[0]:
            return [f"journal {journal}: entry {position} {[sender, item]} inside the critical section of {holder}"]
        if marker.startswith("enter"):
            if holder is not None:
                return [f"journal {journal}: {[sender, item]} entered while {holder} held it"]
            holder = (sender, marker[5:])
        elif marker.startswith("exit"):
            if holder != (sender, marker[4:]):
                return [f"journal {journal}: {[sender, item]} left a section it was not in ({holder})"]
            holder = None
    return [f"journal {journal}: the critical section of {holder} never ended"] if holder else []


# -- accounts -------------------------------------------------------------------------------------------
def _transfers(trace: Any) -> Iterator[tuple[str, str, int]]:
    """The transfers an execution's trace reports (not its children's: they report their own)."""
    for entry in trace:
        if isinstance(entry, list) and entry[:1] == ["racy"] and isinstance(entry[1], list):
            if entry[1][:1] == ["transfer"]:
                _, source, target, amount = entry[1]
                yield source, target, amount
        elif isinstance(entry, list) and entry[:1] == ["section"]:
            yield from _transfers(entry[1])


def _accounts(program: Program, actual: Outcome) -> list[str]:
    accounts = sorted({f"@account@{r.split('@')[1]}" for o in program.orchestrators for r in _account_refs(o.body)})
    if not accounts:
        return []
    balances = {a: actual.entities.get(a, INITIAL_BALANCE) for a in accounts}
    violations = []
    if sum(balances.values()) != INITIAL_BALANCE * len(accounts):
        violations.append(f"money is not conserved: balances {balances}")
    violations += [f"account {a} is overdrawn: {b}" for a, b in balances.items() if b < 0]
    movers = {o.name for o in program.orchestrators if _account_refs(o.body)}
    if any(f.name in movers and f.status != "Completed" for f in actual.orchestrations.values()):
        return violations  # some transfers are not reported in an output: only conservation holds
    moved = dict.fromkeys(accounts, INITIAL_BALANCE)
    for final in actual.orchestrations.values():
        for trace in final.output if final.name in movers and isinstance(final.output, list) else []:
            for source, target, amount in _transfers(trace):
                moved[source] -= amount
                moved[target] += amount
    if moved != balances:
        violations.append(f"balances {balances} disagree with the transfers the orchestrations report: {moved}")
    return violations


def _account_refs(body: Any) -> list[str]:
    return [ref for op in body if isinstance(op, Transfer) for ref in (op.source, op.target)]


# -- activities ------------------------------------------------------------------------------------------
def _activities(expected: Outcome, actual: Outcome) -> list[str]:
    violations = []
    for key in sorted(set(expected.activity_runs) | set(actual.activity_runs)):
        want, got = expected.activity_runs[key], actual.activity_runs[key]
        if want == 0:
            violations.append(f"activity {key} ran {got} times; no fault-free run schedules it")
        elif got < want:
            violations.append(f"activity {key} ran {got} times, fewer than the {want} it must")
    return violations
