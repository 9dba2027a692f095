"""Facts: one case id of one run, with its outcome under each protocol at every measured step.

A *fact* is an edited fact (probe group ``edit``, its rewrite prompt, target = the new object) or an intrinsic
one (group ``control``, target = the true object). Under a protocol a fact that passed at t=0 is *lost* at the
first measured step where it no longer passes, and *censored* at the run's last measured step if it never
failed (a fact that fails, then passes again, stays lost: the first loss counts). The loss happened somewhere
between the previous measurement and that step; the step is what is recorded.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retention.io import nan_for_null

SETS = {"edited": "edit", "intrinsic": "control"}
"""Fact set -> the probe group of its one probe per fact (the edited rewrite prompt, the control fact)."""
Probes = dict[int, list[dict]]
"""A run's probe records by step (:func:`read_probes`)."""


@dataclass
class Fact:
    """One fact of one run: its outcomes at every measured step and its features."""

    study: str
    cell: str
    arm: str
    seed: int
    run: str
    case_id: str
    set: str
    """``edited`` or ``intrinsic``."""
    steps: tuple[int, ...]
    passed: dict[str, tuple[bool | None, ...]]
    """Protocol -> outcome at each of ``steps`` (None: not measured then)."""
    t0: dict
    """The probe record at t=0."""
    final: dict
    """The probe record at the last measured step."""
    features: dict[str, Any] = field(default_factory=dict)

    @property
    def condition(self) -> tuple[str, str, str]:
        """(study, grid cell, arm)."""
        return self.study, self.cell, self.arm

    def outcome(self, protocol: str) -> tuple[int, bool] | None:
        """(step, lost) under ``protocol``; None when the fact did not pass at t=0 (it is not at risk)."""
        return first_loss(self.steps, self.passed.get(protocol, ()))

    def kept_final(self, protocol: str) -> bool | None:
        """Passing at the last step, given passing at t=0 (the report's retention); None when not at risk."""
        passes = self.passed.get(protocol, ())
        if not passes or passes[0] is not True:
            return None
        return passes[-1] is True


def first_loss(steps: Sequence[int], passes: Sequence[bool | None]) -> tuple[int, bool] | None:
    """``(step, True)``: the first measured step after t=0 where the probe no longer passes; ``(last step,
    False)``: still passing at every measured step (censored there); None: it did not pass at t=0.

    >>> first_loss((0, 10, 20), (True, False, True)), first_loss((0, 10, 20), (True, True, True))
    ((10, True), (20, False))
    """
    if not passes or passes[0] is not True:
        return None
    for step, ok in zip(steps[1:], passes[1:]):
        if ok is False:
            return step, True
    return steps[-1], False


def read_probes(folder: str | Path) -> Probes:
    """A run folder's ``probes/step_<N>.jsonl``: step -> probe records."""
    out = {}
    for path in sorted(Path(folder, "probes").glob("step_*.jsonl")):
        rows = [nan_for_null(json.loads(line), ("target_logprob", "alt_logprob"))
                for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        out[int(path.stem.split("_")[1])] = rows
    return out


def run_facts(probes: Probes, **labels: Any) -> list[Fact]:
    """The edited and intrinsic facts of one run's probe records (``labels``: study, cell, arm, seed, run)."""
    steps = tuple(sorted(probes))
    if not steps or steps[0] != 0:
        return []
    by_case: dict[tuple[str, str], dict[int, dict]] = defaultdict(dict)
    for step in steps:
        for row in probes[step]:
            for name, group in SETS.items():
                if row.get("group") == group:
                    by_case[(name, str(row["case_id"]))].setdefault(step, row)
    facts = []
    for (name, case_id), rows in by_case.items():
        if 0 not in rows:
            continue
        protocols = list(rows[0]["passed"])
        passed = {p: tuple(rows[s]["passed"].get(p) if s in rows else None for s in steps) for p in protocols}
        facts.append(Fact(case_id=case_id, set=name, steps=steps, passed=passed, t0=rows[0],
                          final=rows.get(steps[-1], rows[0]), **labels))
    return facts


PROTOCOL_ORDER = ("top1", "gen", "prob", "token_acc")


def ordered_protocols(protocols) -> list[str]:
    """Protocols once each, in the usual order (strictest first), unknown ones last.

    >>> ordered_protocols(["prob", "mine", "top1", "prob"])
    ['top1', 'prob', 'mine']
    """
    found = list(dict.fromkeys(protocols))
    return sorted(found, key=lambda p: PROTOCOL_ORDER.index(p) if p in PROTOCOL_ORDER else len(PROTOCOL_ORDER))


def protocols_of(facts: Sequence[Fact]) -> list[str]:
    """The protocols recorded for ``facts``, in :func:`ordered_protocols` order."""
    return ordered_protocols(p for f in facts for p in f.passed)


def by_condition(facts: Sequence[Fact]) -> dict[tuple[str, str, str], list[Fact]]:
    """Facts per condition (:attr:`Fact.condition`)."""
    out: dict[tuple[str, str, str], list[Fact]] = defaultdict(list)
    for f in facts:
        out[f.condition].append(f)
    return dict(out)


def by_arm(facts: Sequence[Fact]) -> dict[tuple[str, str], list[Fact]]:
    """Facts per study and arm (grid cells and seeds pooled)."""
    out: dict[tuple[str, str], list[Fact]] = defaultdict(list)
    for f in facts:
        out[(f.study, f.arm)].append(f)
    return dict(out)


def group_rows(rows: Sequence[dict], keys: Sequence[str]) -> dict[tuple, list[dict]]:
    """Rows grouped by their values of ``keys``, groups in order of first appearance.

    >>> group_rows([{"arm": "a", "x": 1}, {"arm": "b", "x": 2}, {"arm": "a", "x": 3}], ["arm"])[("a",)]
    [{'arm': 'a', 'x': 1}, {'arm': 'a', 'x': 3}]
    """
    out: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        out[tuple(r[k] for k in keys)].append(r)
    return dict(out)


def fact_rows(facts: Sequence[Fact]) -> list[dict]:
    """One row per fact and protocol (facts.csv): labels, the outcome and the features."""
    return [{"study": f.study, "cell": f.cell, "arm": f.arm, "seed": f.seed, "run": f.run,
             "case_id": f.case_id, "set": f.set, "protocol": p,
             "passed_t0": f.passed[p][0], "lost_step": o[0] if (o := f.outcome(p)) and o[1] else None,
             "survived": (not o[1]) if o else None, "kept_final": f.kept_final(p), "last_step": f.steps[-1],
             **f.features} for f in facts for p in f.passed]
