"""The figures of the analysis: Kaplan–Meier curves per grid cell, retention against each dose, and retention
along fine-tuning; PNGs through :func:`retention.summary.save_figure`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from retention.study.analysis.facts import group_rows, ordered_protocols
from retention.study.figures import note_empty, pyplot
from retention.summary import save_figure


def plot_survival(rows: Sequence[dict], path: Path, title: str) -> Path:
    """Rows: arms; columns: protocols; Kaplan–Meier step curves of edited (red) and intrinsic (blue) facts with
    their log-log interval bands; a panel where no fact passed at t=0 says so."""
    plt = pyplot()
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    protocols = ordered_protocols(r["protocol"] for r in rows)
    fig, axes = plt.subplots(len(arms), len(protocols), figsize=(3.6 * len(protocols), 2.6 * len(arms)),
                             squeeze=False, sharex=True, sharey=True)
    curves = group_rows(rows, ("arm", "protocol", "set"))
    for row, arm in zip(axes, arms):
        for ax, protocol in zip(row, protocols):
            drawn = False
            for name, color in (("edited", "C3"), ("intrinsic", "C0")):
                pts = curves.get((arm, protocol, name), [])
                if not pts:
                    continue
                drawn = True
                xs = [p["step"] for p in pts]
                n = pts[0]["n_facts"]
                ax.step(xs, [p["survival"] for p in pts], where="post", color=color, label=f"{name} (n={n})")
                ax.fill_between(xs, [p["ci_low"] for p in pts], [p["ci_high"] for p in pts], step="post",
                                color=color, alpha=0.18, linewidth=0)
            ax.set_ylim(-0.03, 1.03)
            ax.grid(alpha=0.3)
            ax.set_title(f"{arm} · {protocol}", fontsize=9)
            if drawn:
                ax.legend(fontsize=6, loc="lower left")
            else:
                note_empty(ax, f"no fact passed {protocol} at t=0")
        row[0].set_ylabel("share never lost")
    for ax in axes[-1]:
        ax.set_xlabel("fine-tuning step")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def _panels(n: int):
    plt = pyplot()
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n + 3.5, 3.4), squeeze=False, sharey=True)
    return fig, axes[0]


def _finish(fig, axes, title: str, path: Path) -> Path:
    """One legend right of the panels (it would hide the curves inside them), the title, and the PNG."""
    axes[-1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(title, fontsize=10)
    width = 4.2 * len(axes) + 3.5
    fig.subplots_adjust(left=0.7 / width, right=(4.2 * len(axes) - 0.1) / width, bottom=0.16, top=0.84, wspace=0.08)
    return save_figure(fig, path)


def plot_dose(rows: Sequence[dict], path: Path, title: str) -> Path:
    """Columns: protocols; retention against the dose per series and arm, edited (solid) and intrinsic
    (dashed), with Wilson error bars."""
    protocols = ordered_protocols(r["protocol"] for r in rows)
    fig, axes = _panels(len(protocols))
    series = list(dict.fromkeys((r["series"], r["arm"]) for r in rows))
    values = [r["value"] for r in rows]
    log_x = min(values) > 0 and max(values) / min(values) >= 20
    for ax, protocol in zip(axes, protocols):
        for i, (name_s, arm) in enumerate(series):
            for name, style in (("edited", "-o"), ("intrinsic", "--s")):
                pts = sorted((r for r in rows if r["protocol"] == protocol and r["set"] == name
                              and (r["series"], r["arm"]) == (name_s, arm)), key=lambda r: r["value"])
                if not pts:
                    continue
                shift = 0.0 if log_x else (i - (len(series) - 1) / 2) * 0.012 * (max(values) - min(values))
                xs = [r["value"] + shift for r in pts]  # side by side, so the error bars do not hide each other
                ys = [r["rate"] for r in pts]
                err = [[y - r["low"] for y, r in zip(ys, pts)], [r["high"] - y for y, r in zip(ys, pts)]]
                label = f"{name}: {name_s}" + ("" if arm == "baseline" else f", {arm}")
                ax.errorbar(xs, ys, yerr=err, fmt=style, color=f"C{i}", capsize=3, markersize=4,
                            alpha=1.0 if name == "edited" else 0.7, label=label)
        if log_x:
            ax.set_xscale("log")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        ax.set_title(protocol, fontsize=9)
        ax.set_xlabel(rows[0]["dose"])
    axes[0].set_ylabel("retained at the end (of passing at t=0)")
    return _finish(fig, axes, title, path)


def plot_curves(rows: Sequence[dict], path: Path, title: str) -> Path:
    """Columns: protocols; retention at every measured step against the tokens seen (or the step), one colour
    per condition, edited solid and intrinsic dashed, with Wilson bands."""
    protocols = ordered_protocols(r["protocol"] for r in rows)
    fig, axes = _panels(len(protocols))
    conditions = list(dict.fromkeys((r["cell"], r["arm"]) for r in rows))
    tokens = all(not math.isnan(r["tokens"]) for r in rows)
    for ax, protocol in zip(axes, protocols):
        for i, (cell, arm) in enumerate(conditions):
            for name, style in (("edited", "-"), ("intrinsic", "--")):
                pts = [r for r in rows if r["protocol"] == protocol and r["set"] == name
                       and (r["cell"], r["arm"]) == (cell, arm)]
                if not pts:
                    continue
                xs = [r["tokens"] if tokens else r["step"] for r in pts]
                label = f"{name}: {cell}" + ("" if arm == "baseline" else f", {arm}") + f" (n={pts[0]['at_risk']})"
                ax.plot(xs, [r["rate"] for r in pts], style, color=f"C{i}", label=label)
                ax.fill_between(xs, [r["low"] for r in pts], [r["high"] for r in pts], color=f"C{i}", alpha=0.12,
                                linewidth=0)
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        ax.set_title(protocol, fontsize=9)
        ax.set_xlabel("tokens seen" if tokens else "fine-tuning step")
    axes[0].set_ylabel("passing (of passing at t=0)")
    return _finish(fig, axes, title, path)
