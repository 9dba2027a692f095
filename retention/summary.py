"""A run's summary: its ``summary.json``, its retention table, its curve plot, and whether fine-tuning collapsed.

Rates come with their denominators (``retention.metrics.Rate``), per probe group (``retention.records.GROUPS``:
what a probe measures). The table puts edited (``edit``) and intrinsic (``control``) retention side by side
under every protocol.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from retention.io import atomic_path
from retention.metrics import Rate, flip_ratio
from retention.records import GROUP_LABELS, GROUPS

INCOMPLETE = "incomplete.json"
"""Present in a run folder from the run's start until it has finished; readers refuse such folders."""

COLLAPSE_UNIFORM = 0.9
"""A last validation loss at or above this fraction of ln(vocabulary size) — the loss of a uniform guess — is
a collapse (when the first validation was below it)."""
COLLAPSE_GROWTH = 2.0
"""A last validation loss more than this many times the first is a collapse."""


def _fmt(r: Rate | None) -> str:
    if r is None:
        return "-"
    undefined = r["value"] is None or math.isnan(r["value"])  # null in summary.json, NaN in memory
    value = "  n/a" if undefined else f"{r['value']:.2f}"
    return f"{value} ({r['count']}/{r['denominator']})"


def format_table(summary: Mapping[str, Any]) -> str:
    """The final retention table: edited vs intrinsic (and paraphrase, neighbourhood) under every protocol."""
    protocols = summary["protocols"]
    groups = [g for g in GROUPS if any(g in summary["retention"].get(p, {}) for p in protocols)]
    width = 20
    lines = [
        f"Retention after {summary['final_step']} fine-tuning steps (kept / passing at t=0), "
        f"{summary['run'].get('n_edit', '?')} edits, {summary['run'].get('n_control', '?')} control facts",
        f"{'protocol':<10}" + "".join(f"{GROUP_LABELS[g]:<{width}}" for g in groups),
    ]
    for p in protocols:
        row = summary["retention"].get(p, {})
        lines.append(f"{p:<10}" + "".join(f"{_fmt(row.get(g)):<{width}}" for g in groups))
    lines.append("")
    lines.append("Accuracy at t=0 (after editing, before fine-tuning):")
    groups0 = [g for g in GROUPS if g in summary["t0"]]
    lines.append(f"{'protocol':<10}" + "".join(f"{GROUP_LABELS[g]:<{width}}" for g in groups0))
    for p in protocols:
        lines.append(f"{p:<10}" + "".join(f"{_fmt(summary['t0'][g].get(p)):<{width}}" for g in groups0))
    after = summary.get("after_finetune")
    if after is not None:
        made = "made again" if after["mode"] == "reedit" else "made only then"
        lines += ["", f"Accuracy after fine-tuning, the edit {made} (step {after['step']}, after.mode {after['mode']}):"]
        groups1 = [g for g in GROUPS if g in after["accuracy"]]
        lines.append(f"{'protocol':<10}" + "".join(f"{GROUP_LABELS[g]:<{width}}" for g in groups1))
        for p in protocols:
            lines.append(f"{p:<10}" + "".join(f"{_fmt(after['accuracy'][g].get(p)):<{width}}" for g in groups1))
    downstream = summary.get("downstream", {})
    if downstream.get("collapsed"):
        lines += ["", collapse_warning(downstream["collapse_reason"])]
    return "\n".join(lines)


def collapse(validations: Sequence[Mapping[str, float]], vocab_size: int) -> str | None:
    """Why the validation losses (rows with ``step`` and ``val/loss``, first to last) say fine-tuning collapsed
    the model, or None: the last loss is non-finite, or at least :data:`COLLAPSE_UNIFORM` · ln(vocab_size) while
    the first was below that, or more than :data:`COLLAPSE_GROWTH` times the first."""
    rows = [r for r in validations if "val/loss" in r]
    if not rows:
        return None
    (first, s0), (last, s1) = ((r["val/loss"], r["step"]) for r in (rows[0], rows[-1]))
    uniform = COLLAPSE_UNIFORM * math.log(vocab_size)
    if not math.isfinite(last):
        return f"validation loss is {last} at step {s1}"
    if last >= uniform > first:
        return (f"validation loss {last:.3f} at step {s1} is at least {COLLAPSE_UNIFORM}·ln({vocab_size}) = "
                f"{uniform:.3f}, near a uniform guess (it was {first:.3f} at step {s0})")
    if last > COLLAPSE_GROWTH * first:
        return f"validation loss {last:.3f} at step {s1} is more than {COLLAPSE_GROWTH:g}× its {first:.3f} at step {s0}"
    return None


def collapse_warning(reason: str) -> str:
    """The report line of a collapsed run."""
    return (f"WARNING: fine-tuning collapsed the model ({reason}); its retention measures the collapse, not "
            "forgetting: lower optimizer.lr or add warmup / gradient clipping")


def summarize(
    run: Mapping[str, Any],
    protocols: Sequence[str],
    measurements: Sequence[Mapping[str, Any]],
    downstream: Mapping[str, float] | None = None,
    timings: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """The ``summary.json`` of a run from its measurements (t=0 first), each
    ``{"step", "accuracy": {group: {protocol: Rate}}, "retention": {group: {protocol: Rate}}}``."""
    if not measurements:
        raise ValueError("no measurements: the run has not measured t=0")
    first, last = measurements[0], measurements[-1]
    retention = {p: {g: last["retention"][g][p] for g in last["retention"]} for p in protocols}
    return {
        "run": dict(run),
        "protocols": list(protocols),
        "final_step": last["step"],
        "t0": first["accuracy"],
        "edit_success_t0": {g: first["accuracy"][g] for g in ("edit", "edit_paraphrase") if g in first["accuracy"]},
        "retention": retention,
        "flip_ratio": {p: flip_ratio(retention[p]["edit"]) for p in protocols if "edit" in retention[p]},
        "final_accuracy": last["accuracy"],
        "curves": curves(measurements),
        "measurements": [{k: m[k] for k in ("step", "accuracy", "retention")} for m in measurements],
        "downstream": dict(downstream or {}),
        "timings": dict(timings or {}),
    }


def curves(measurements: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, list[list[float]]]]:
    """``{group: {protocol: [[step, retention], ...]}}`` over the measurements."""
    out: dict[str, dict[str, list[list[float]]]] = {}
    for m in measurements:
        for group, by_protocol in m["retention"].items():
            for protocol, r in by_protocol.items():
                out.setdefault(group, {}).setdefault(protocol, []).append([m["step"], r["value"]])
    return out


def plot_curves(curve_data: Mapping[str, Mapping[str, Sequence[Sequence[float]]]], path: str | Path,
                title: str = "") -> Path:
    """A PNG with one panel per protocol: retention of each probe group against fine-tuning steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protocols = list(dict.fromkeys(p for by_protocol in curve_data.values() for p in by_protocol))
    fig, axes = plt.subplots(1, len(protocols), figsize=(4.2 * len(protocols), 3.6), squeeze=False, sharey=True)
    styles = {"edit": ("C3", "-"), "control": ("C0", "-"), "edit_paraphrase": ("C3", "--"),
              "control_paraphrase": ("C0", "--"), "edit_neighborhood": ("C2", ":"),
              "edit_portability": ("C1", "-.")}  # fmt: skip
    for ax, protocol in zip(axes[0], protocols):
        for group in GROUPS:
            points = curve_data.get(group, {}).get(protocol)
            if not points:
                continue
            color, line = styles[group]
            ax.plot([s for s, _ in points], [v for _, v in points], line, color=color, marker="o", markersize=3,
                    label=GROUP_LABELS[group])
        ax.set_title(protocol)
        ax.set_xlabel("fine-tuning step")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("retention (vs t=0)")
    axes[0][-1].legend(fontsize=8, loc="lower left")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig, path: str | Path) -> Path:
    """Write a matplotlib figure as a PNG atomically, then close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return path
