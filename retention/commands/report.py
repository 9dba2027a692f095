"""``retention report``: retention with confidence intervals over one or more study or run folders.

    retention report runs/studies/paper_smollm2_cpu
    retention report runs/demo runs/demo_freeze --out runs/report

Writes report.md, report.csv, comparisons.csv and PNGs (see docs/studies.md for the statistics), and with --html
report.html, all of it in one page that opens offline.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from retention.commands.options import command_parser, run_main


@dataclass
class ReportArgs:
    """Which folders to report on and where to write."""

    folders: list[str] = field(default_factory=list)
    """Study folders (holding study.json) or run folders (holding summary.json), given before the options."""
    out: str | None = None
    """Output folder; default <the folder>/report for one folder, else runs/report."""
    plots: bool = True
    """Write the PNGs (retention curves with interval bands, final retention per arm)."""
    analysis: bool = False
    """Also write <out>/analysis/: per-fact survival (Kaplan-Meier), its predictors (logistic regression),
    edited vs intrinsic matched on t=0 confidence, top1-vs-prob disagreements (docs/analysis.md)."""
    html: bool = False
    """Also write report.html: the tables, figures, definitions, conclusion and the provenance of every run in one
    self-contained page that opens offline."""
    mixed_provenance: str = "refuse"
    """Runs made by different code, lock, Python, corpora or base model (their summaries' provenance):
    ``refuse`` to pool them (an error listing the groups), or ``label`` to report each group apart as
    ``<study> [p<i>]``."""
    analysis_corpus: str | None = "wikitext2"
    """With --analysis: the reference corpus of the subject and object frequencies (builtin, wikitext2,
    hf:<id> or a text file; null for none; left out with a note when it cannot be read)."""


ARGS = ReportArgs


def parser():
    p = command_parser(ReportArgs, __doc__.split("\n\n")[0], skip={"folders"})
    p.add_argument("folders", nargs="*", default=argparse.SUPPRESS,
                   help="Study folders (holding study.json) or run folders (holding summary.json).")
    return p


def execute(args: ReportArgs) -> int:
    from retention.study.report import ReportError, write_report
    from retention.study.webpage import write_html

    folders = list(args.folders)
    if not folders:
        print("retention report: give one or more study or run folders", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else (Path(folders[0]) / "report" if len(folders) == 1 else Path("runs/report"))
    try:
        paths = write_report(folders, out, plots=args.plots, mixed_provenance=args.mixed_provenance)
        if args.html:
            paths["html"] = write_html(folders, out, mixed_provenance=args.mixed_provenance)
    except ReportError as err:
        print(f"retention report: {err}", file=sys.stderr)
        return 2
    print(paths["markdown"].read_text(encoding="utf-8"))
    print("written: " + ", ".join(str(p) for p in paths.values()))
    if args.analysis:
        from retention.study.analysis import write_analysis

        written = write_analysis(folders, out / "analysis", corpus=args.analysis_corpus, plots=args.plots)
        print(f"analysis ({out / 'analysis'}): " + ", ".join(p.name for p in written.values()))
    return 0


def main(argv: list[str]) -> int:
    """``retention report ARGV``."""
    return run_main("report", ARGS, parser, execute, argv)
