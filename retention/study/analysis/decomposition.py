"""Format shift or real loss: where the ``top1`` protocol disagrees with ``prob``, and why a fact passing
``top1`` at t=0 no longer does.

Probes that lost ``top1`` but kept ``prob`` get the new top-1 token classified (a function word from
:data:`FUNCTION_WORDS`, punctuation or space, the start of the alternative, other) and the target's rank before
and after (``target_rank`` of the probe records, when the run recorded it). Facts passing ``top1`` at t=0 are
split by :func:`loss_class` and compared with retention under every protocol and under ``rank < k``.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from statistics import median
from typing import Any

from retention.study.analysis.facts import SETS, Fact, Probes, by_condition, protocols_of
from retention.study.results import RunResult
from retention.study.stats import LEVEL, wilson

FUNCTION_WORDS = frozenset("""
a an the this that these those some any no every each all both either neither
of in on at to for from by with about as into onto upon over under after before between through during
and or but nor so yet if than then because while although though whether
is are was were be been being am has have had do does did will would shall should can could may might must
it its it's he him his she her hers they them their theirs we us our you your i me my mine who whom whose
which what where when why how there here not also very just only more most such same other one
""".split())
"""Function words (closed-class English words) for classifying a new top-1 token."""
RANK_PROTOCOLS = (5, 10)
"""``rank < k`` protocols computed from the recorded target rank (top-k accuracy of the target's first token)."""
LOSS_CLASSES = ("kept", "format shift", "displaced", "buried", "overturned")


def token_category(token: str, alternative: str | None = None) -> str:
    """``function word``, ``punctuation/space``, ``alternative`` (the probe's alternative starts with it) or
    ``other``.

    >>> [token_category(" the"), token_category(","), token_category(" Par", "Paris"), token_category(" Rome")]
    ['function word', 'punctuation/space', 'alternative', 'other']
    """
    word = token.strip().lower()
    if word in FUNCTION_WORDS:
        return "function word"
    if not word or not any(ch.isalnum() for ch in word):
        return "punctuation/space"
    if alternative and alternative.strip().lower().startswith(word):
        return "alternative"
    return "other"


def sensitivity_rows(runs: Sequence[tuple[RunResult, Probes]]) -> list[dict]:
    """Probes (every group) passing ``top1`` and ``prob`` at t=0 that lost ``top1`` but kept ``prob`` at the
    last step: the new top-1 token, its category, and the target's rank at t=0 and at the end."""
    rows = []
    for result, probes in runs:
        steps = sorted(probes)
        if len(steps) < 2 or steps[0] != 0:
            continue
        first = {(r["group"], r["case_id"], r["kind"], r["prompt"], r["target"]): r for r in probes[0]}
        for r in probes[steps[-1]]:
            r0 = first.get((r["group"], r["case_id"], r["kind"], r["prompt"], r["target"]))
            if r0 is None or not (r0["passed"].get("top1") and r0["passed"].get("prob")):
                continue
            if r["passed"].get("top1") is not False or r["passed"].get("prob") is not True:
                continue
            c = result.condition
            rows.append({"study": c.study, "cell": c.cell, "arm": c.arm, "seed": result.seed,
                         "run": result.folder.name, "group": r["group"], "case_id": r["case_id"],
                         "prompt": r["prompt"], "target": r["target"], "alternative": r.get("alternative"),
                         "top1_t0": r0.get("top1_token", ""), "top1_final": r.get("top1_token", ""),
                         "category": token_category(r.get("top1_token", ""), r.get("alternative")),
                         "rank_t0": r0.get("target_rank"), "rank_final": r.get("target_rank"),
                         "margin_t0": r0["target_logprob"] - r0["alt_logprob"],
                         "margin_final": r["target_logprob"] - r["alt_logprob"], "step": steps[-1]})
    return rows


def sensitivity_at_risk(runs: Sequence[tuple[RunResult, Probes]]) -> dict[tuple[str, str, str, str], int]:
    """Per (study, cell, arm, group): the probes passing both ``top1`` and ``prob`` at t=0, in runs measured
    after t=0."""
    at_risk: Counter = Counter()
    for r, by_step in runs:
        if by_step and 0 in by_step and len(by_step) > 1:
            c = r.condition
            for row in by_step[0]:
                if row["passed"].get("top1") and row["passed"].get("prob"):
                    at_risk[(c.study, c.cell, c.arm, row["group"])] += 1
    return dict(at_risk)


def records_ranks(runs: Sequence[tuple[RunResult, Probes]]) -> bool:
    """Whether any run recorded the target's rank (``target_rank``) in its probe records."""
    return any(row.get("target_rank") is not None for _, by_step in runs for rows in by_step.values()
               for row in rows[:1])


def sensitivity_summary(rows: Sequence[dict], at_risk: dict[tuple, int]) -> list[dict]:
    """Per condition and group: how many probes passing both at t=0 lost top1 but kept prob, the share whose new
    top-1 is a function word (Wilson), and the median target rank before and after."""
    by: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        by[(r["study"], r["cell"], r["arm"], r["group"])].append(r)
    out = []
    for key in sorted(set(by) | set(at_risk)):
        rs = by.get(key, [])
        cats = Counter(r["category"] for r in rs)
        fw = wilson(cats["function word"], len(rs))
        ranks0 = [r["rank_t0"] for r in rs if r["rank_t0"] is not None]
        ranks1 = [r["rank_final"] for r in rs if r["rank_final"] is not None]
        out.append({"study": key[0], "cell": key[1], "arm": key[2], "group": key[3],
                    "passing_both_t0": at_risk.get(key, 0), "lost_top1_kept_prob": len(rs),
                    **{c.replace(" ", "_").replace("/", "_"): cats[c] for c in
                       ("function word", "punctuation/space", "alternative", "other")},
                    "function_word_share": fw.estimate, "fw_low": fw.low, "fw_high": fw.high,
                    "median_rank_t0": median(ranks0) if ranks0 else math.nan,
                    "median_rank_final": median(ranks1) if ranks1 else math.nan})
    return out


def loss_class(t0: dict, final: dict) -> str:
    """Why a fact passing ``top1`` at t=0 is or is not passing at the end, from its probe records: ``kept``;
    ``format shift`` (the new top-1 is a function word or punctuation, the target still beats the alternative
    and is within the top 10); ``displaced`` (the same, but the new top-1 is another content word);
    ``buried`` (the target still beats the alternative but fell out of the top 10); ``overturned`` (the
    alternative now beats the target: for an edit, the original object is back).

    >>> t0 = {"passed": {"top1": True}, "target_logprob": -1.0, "alt_logprob": -3.0}
    >>> end = {"passed": {"top1": False}, "target_logprob": -2.0, "alt_logprob": -3.0, "target_rank": 1,
    ...        "top1_token": " the"}
    >>> loss_class(t0, end), loss_class(t0, {**end, "alt_logprob": -1.5})
    ('format shift', 'overturned')
    """
    if final["passed"].get("top1"):
        return "kept"
    if final["target_logprob"] <= final["alt_logprob"]:
        return "overturned"
    rank = final.get("target_rank")
    if rank is not None and rank >= 10:
        return "buried"
    category = token_category(final.get("top1_token", ""), final.get("alternative"))
    return "format shift" if category in ("function word", "punctuation/space") else "displaced"


def decomposition_rows(facts: Sequence[Fact], level: float = LEVEL) -> list[dict]:
    """Per condition and set: the facts passing ``top1`` at t=0 split by :func:`loss_class` at the last step,
    retention under every recorded protocol and under ``rank < k`` (:data:`RANK_PROTOCOLS`), each with its
    count, denominator and Wilson interval, and the median change in the target's log-prob."""
    rows = []
    for (study, cell, arm), group in by_condition(facts).items():
        for name in SETS:
            mine = [f for f in group if f.set == name]
            if not mine:
                continue
            row: dict[str, Any] = {"study": study, "cell": cell, "arm": arm, "set": name, "facts": len(mine),
                                   "step": max(f.steps[-1] for f in mine)}
            at_risk = [f for f in mine if f.passed.get("top1", (None,))[0] is True]
            classes = Counter(loss_class(f.t0, f.final) for f in at_risk)
            row["top1_t0"] = len(at_risk)
            row.update({c.replace(" ", "_"): classes[c] for c in LOSS_CLASSES})
            for protocol in protocols_of(mine):
                kept = [k for f in mine if (k := f.kept_final(protocol)) is not None]
                w = wilson(sum(kept), len(kept), level)
                row.update({f"{protocol}_kept": sum(kept), f"{protocol}_n": len(kept), f"{protocol}_rate": w.estimate,
                            f"{protocol}_low": w.low, f"{protocol}_high": w.high})
            ranked = [f for f in mine if f.t0.get("target_rank") is not None and f.final.get("target_rank") is not None]
            for k in RANK_PROTOCOLS if ranked else ():
                start = [f for f in ranked if f.t0["target_rank"] < k]
                kept_k = sum(f.final["target_rank"] < k for f in start)
                w = wilson(kept_k, len(start), level)
                row.update({f"top{k}_kept": kept_k, f"top{k}_n": len(start), f"top{k}_rate": w.estimate,
                            f"top{k}_low": w.low, f"top{k}_high": w.high})
            deltas = [f.final["target_logprob"] - f.t0["target_logprob"] for f in mine]
            row["median_delta_logprob"] = median(deltas)
            ranks = [(f.t0["target_rank"], f.final["target_rank"]) for f in ranked]
            row["median_rank_t0"] = median(r for r, _ in ranks) if ranks else math.nan
            row["median_rank_final"] = median(r for _, r in ranks) if ranks else math.nan
            rows.append(row)
    return rows
