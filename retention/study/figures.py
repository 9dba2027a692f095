"""The report's figures (retention curves per grid cell, final retention per arm) and what every study figure
shares: a headless pyplot and the note a panel carries when it has nothing to draw.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from retention.records import GROUP_LABELS
from retention.summary import save_figure

if TYPE_CHECKING:
    from retention.study.results import Aggregate


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def note_empty(ax, text: str) -> None:
    """Say in a panel with nothing to draw why it is empty (instead of leaving a blank frame)."""
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=8, color="0.4", wrap=True)


def legend_axis(axes: Sequence):
    """The first of ``axes`` holding a labelled artist (the last one when none does)."""
    return next((ax for ax in axes if ax.get_legend_handles_labels()[0]), axes[-1])


def plot_report_curves(aggs: Sequence[Aggregate], path: Path, title: str) -> Path:
    """Rows: arms; columns: protocols; edited (red) and intrinsic (blue) retention with interval bands; a panel
    where no probe passed at t=0 says so."""
    plt = pyplot()
    protocols = aggs[0].protocols()
    fig, axes = plt.subplots(len(aggs), len(protocols), figsize=(3.6 * len(protocols), 2.6 * len(aggs)),
                             squeeze=False, sharex=True, sharey=True)
    for row, agg in zip(axes, aggs):
        for ax, protocol in zip(row, protocols):
            drawn = False
            for group, color in (("edit", "C3"), ("control", "C0")):
                points = [(s, agg.band(s, group, protocol)) for s in agg.steps]
                points = [(s, i) for s, i in points if not math.isnan(i.estimate)]
                if not points:
                    continue
                drawn = True
                xs = [s for s, _ in points]
                ax.plot(xs, [i.estimate for _, i in points], color=color, marker="o", markersize=3,
                        label=GROUP_LABELS[group])
                lows = [i.low if not math.isnan(i.low) else i.estimate for _, i in points]
                highs = [i.high if not math.isnan(i.high) else i.estimate for _, i in points]
                ax.fill_between(xs, lows, highs, color=color, alpha=0.18, linewidth=0)
            if not drawn:
                note_empty(ax, f"no probe passed {protocol} at t=0")
            ax.set_ylim(-0.03, 1.03)
            ax.grid(alpha=0.3)
            ax.set_title(f"{agg.condition.arm} · {protocol}", fontsize=9)
        row[0].set_ylabel("retention")
    for ax in axes[-1]:
        ax.set_xlabel("fine-tuning step")
    handles, labels = legend_axis([axes[0][-1], *axes.flat]).get_legend_handles_labels()
    axes[0][-1].legend(handles, labels, fontsize=7, loc="lower left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_final(aggregates: Sequence[Aggregate], path: Path) -> Path:
    """Final retention per condition, edited and intrinsic side by side, one panel per protocol."""
    plt = pyplot()
    protocols = list(dict.fromkeys(p for a in aggregates for p in a.protocols()))
    # "editor=rome-sequential, lr=0.001" -> "rome-sequential, 0.001": the axis names are in the report's tables.
    labels = [a.condition.arm if a.condition.cell == "all" else
              f"{a.condition.arm}\n{', '.join(part.split('=', 1)[-1] for part in a.condition.cell.split(', '))}"
              for a in aggregates]
    fig, axes = plt.subplots(len(protocols), 1, figsize=(max(6.0, 0.9 * len(aggregates) + 2), 2.8 * len(protocols)),
                             squeeze=False)
    for ax, protocol in zip(axes[:, 0], protocols):
        for offset, (group, color) in zip((-0.2, 0.2), (("edit", "C3"), ("control", "C0"))):
            bands = [a.band(a.final_step, group, protocol) for a in aggregates]
            xs = [i + offset for i in range(len(aggregates))]
            ys = [b.estimate for b in bands]
            err = [[max(0.0, b.estimate - b.low) if not math.isnan(b.low) else 0 for b in bands],
                   [max(0.0, b.high - b.estimate) if not math.isnan(b.high) else 0 for b in bands]]
            ax.bar(xs, ys, width=0.4, color=color, alpha=0.8, yerr=err, capsize=3, label=GROUP_LABELS[group])
        if all(math.isnan(a.band(a.final_step, g, protocol).estimate) for a in aggregates for g in ("edit", "control")):
            note_empty(ax, f"no probe passed {protocol} at t=0")
        ax.set_xticks(range(len(aggregates)))
        ax.set_xticklabels(labels, fontsize=7, rotation=35, ha="right")
        ax.set_ylim(0, 1.05)
        ax.set_ylabel(f"retention ({protocol})")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
