"""``report.html``: a report folder as one self-contained web page.

The page holds the conclusion (:mod:`retention.study.conclusion`), the definitions of retention, the protocols and
the intervals, the tables and figures of ``report.md`` (each PNG embedded as a ``data:`` URI), the provenance of
every pooled run, and ``report.csv`` / ``comparisons.csv`` as embedded downloads. It names no external resource,
so it opens offline. Its one inline script records on ``<html data-figures="loaded/total">`` how many figures
decoded, which the browser test reads back.
"""

from __future__ import annotations

import base64
import csv
import html
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from retention.io import atomic_write_text
from retention.provenance import describe
from retention.study.conclusion import HEADING, conclusion
from retention.study.report import ReportError, load_results, provenance_groups

PAGE = "report.html"
OWN_SECTIONS = {HEADING.removeprefix("## "), "Provenance"}
"""Sections of report.md the page renders itself, from the rows and the runs."""
PASSES_WHEN = {
    "top1": "the most likely next token after the prompt is the first token of the target",
    "prob": "the mean per-token log-probability of the target beats the alternative's",
    "token_acc": "under teacher forcing every target token is the argmax",
    "gen": "greedy generation contains the target string",
}
DEFINITIONS = """## Definitions

A *probe* is a prompt, a target and an alternative: for an edited fact's prompts (and their paraphrases) the
target is the new object and the alternative the true one; for control facts and neighbourhood prompts the target
is the true object.

**Retention** of a probe set S under a protocol, from the model after editing (t=0) to the model after
fine-tuning, is |{x in S : x passes at t=0 and after}| / |{x in S : x passes at t=0}|, shown with its count and
denominator. **Edited (E)** retention is that of the edited facts, **intrinsic (I)** that of control facts the
model knew and nobody edited; 1 − E is the edit flip ratio. E and I are compared under the same protocol.

{protocols}

**Intervals** (95 %): a rate is the mean over seeds with a Student-t interval (one seed: the pooled count with
Wilson's interval); a difference is taken seed by seed with the paired t-interval (one seed: Newcombe's interval
from the pooled counts). The seed is the unit of replication: each seed draws its own facts and fine-tuning order.
"""
SCRIPT = """addEventListener("load", () => {
  const images = Array.from(document.images);
  const loaded = images.filter((img) => img.complete && img.naturalWidth > 0).length;
  document.documentElement.dataset.figures = loaded + "/" + images.length;
});"""
STYLE = """body { font: 15px/1.45 system-ui, sans-serif; color: #1d1d1f; margin: 0; background: #fafafa; }
main { max-width: 1180px; margin: 0 auto; padding: 1.5em 2em 3em; background: #fff; }
h1 { margin-bottom: .2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.8em; }
nav a { margin-right: 1em; } code { background: #f1f1f4; padding: 0 .25em; border-radius: 3px; }
.scroll { overflow-x: auto; } table { border-collapse: collapse; margin: .6em 0; font-size: 13px; }
th, td { border: 1px solid #d8d8dc; padding: .25em .55em; text-align: left; white-space: nowrap; }
th { background: #f1f1f4; } tr:nth-child(even) td { background: #fafafc; }
td strong { background: #fff3c4; } #conclusion { background: #f3f8ff; padding: .2em 1.2em .6em; border-radius: 6px; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 13px; color: #555; } details summary { cursor: pointer; }
"""


def _inline(text: str) -> str:
    out = html.escape(text, quote=False)
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    out = re.sub(r"(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])", r"<em>\1</em>", out)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", out)


def _table(rows: Sequence[str]) -> str:
    cells = [[c.strip() for c in row.strip().strip("|").split("|")] for row in rows]
    head, body = cells[0], [r for r in cells[1:] if not all(set(c) <= set("-: ") for c in r)]
    return ('<div class="scroll"><table><thead><tr>' + "".join(f"<th>{_inline(c)}</th>" for c in head)
            + "</tr></thead><tbody>" + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>"
                                              for r in body) + "</tbody></table></div>")


def _list(items: Sequence[str]) -> str:
    """``- item`` lines, with ``  - sub-item`` lines under the item before them."""
    out, open_sub = ["<ul>"], False
    for item in items:
        sub = item.startswith("  ")
        if sub and not open_sub:
            out[-1] = out[-1].removesuffix("</li>") + "<ul>"
        elif not sub and open_sub:
            out.append("</ul></li>")
        out.append(f"<li>{_inline(item.strip()[2:])}</li>")
        open_sub = sub
    return "".join(out) + ("</ul></li>" if open_sub else "") + "</ul>"


def markdown_html(text: str, figure: Callable[[str, str], str]) -> str:
    """The Markdown the reports write (headings, paragraphs, pipe tables, lists, bold, code, images on their own
    line) as HTML; ``figure(alt, src)`` renders an image."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        start = i
        if line.startswith("|") or re.match(r" {0,2}- ", line):
            table = line.startswith("|")
            while i < len(lines) and (lines[i].startswith("|") if table else re.match(r" {0,2}- ", lines[i])):
                i += 1
            out.append(_table(lines[start:i]) if table else _list(lines[start:i]))
            continue
        if heading := re.fullmatch(r"(#{1,4}) (.+)", line):
            level, title = len(heading[1]), heading[2]
            out.append(f'<h{level} id="{_anchor(title)}">{_inline(title)}</h{level}>')
        elif image := re.fullmatch(r"!\[(.*?)\]\((.+?)\)", line.strip()):
            out.append(figure(image[1], image[2]))
        elif line.strip():
            while i + 1 < len(lines) and lines[i + 1].strip() and not re.match(r"[|#!]| {0,2}- ", lines[i + 1]):
                i += 1
            out.append(f"<p>{_inline(' '.join(lines[start:i + 1]))}</p>")
        i += 1
    return "\n".join(out)


def _anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def _sections(text: str) -> tuple[str, list[tuple[str, str]]]:
    """report.md as (what comes before its first ``##`` heading, without the title; [(heading, section)])."""
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    preamble = "\n".join(line for line in parts[0].splitlines() if not line.startswith("# "))
    return preamble, [(parts[k], f"## {parts[k]}\n{parts[k + 1]}") for k in range(1, len(parts), 2)]


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _embedded(folder: Path) -> Callable[[str, str], str]:
    def figure(alt: str, src: str) -> str:
        path = folder / src
        if Path(src).name != src or not path.is_file():
            raise ReportError(f"{folder / 'report.md'}: figure {src!r} is not a file of the report folder")
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return (f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{_inline(alt)}</figcaption></figure>")
    return figure


def _provenance(results: Sequence[Any]) -> str:
    groups = list(provenance_groups(results).values())
    label = {id(r): f"p{i}" for i, runs in enumerate(groups, 1) for r in runs}
    items = "".join(f"<li><strong>p{i}</strong> ({len(runs)} run(s) of "
                    f"{html.escape(', '.join(sorted({r.condition.study for r in runs})))}): "
                    f"{html.escape(describe(runs[0].summary.get('provenance')))}</li>"
                    for i, runs in enumerate(groups, 1))
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in (
        r.folder.name, r.condition.study, r.condition.cell, r.condition.arm, r.seed,
        "-" if r.fact is None else r.fact, label[id(r)])) + "</tr>" for r in results)
    head = "".join(f"<th>{h}</th>" for h in ("run folder", "study", "cell", "arm", "seed", "fact", "provenance"))
    opened = " open" if len(results) <= 40 else ""
    return (f'<h2 id="provenance">Provenance</h2><p>{len(results)} run(s) pooled, from {len(groups)} provenance '
            f"group(s) (code, lock, Python, corpora, base model):</p><ul>{items}</ul>"
            f"<details{opened}><summary>Every run ({len(results)})</summary><div class=\"scroll\"><table><thead>"
            f"<tr>{head}</tr></thead><tbody>{rows}</tbody></table></div></details>")


def _download(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<a download="{path.name}" href="data:text/csv;base64,{data}">{path.name}</a>'


def _definitions(protocols: Sequence[str]) -> str:
    rows = [f"| `{p}` | {PASSES_WHEN[p]} |" for p in protocols if p in PASSES_WHEN]
    return DEFINITIONS.replace("{protocols}", "\n".join(["| protocol | a probe passes when |", "| --- | --- |", *rows]))


def page(report_md: str, rates: Sequence[Mapping[str, Any]], comparisons: Sequence[Mapping[str, Any]],
         results: Sequence[Any], figure: Callable[[str, str], str], downloads: Sequence[str] = ()) -> str:
    """The HTML page of a report: its Markdown, its rate and comparison rows and the runs pooled."""
    preamble, sections = _sections(report_md)
    studies = sorted({r.condition.study for r in results})
    protocols = list(dict.fromkeys(r["protocol"] for r in rates))
    kept = [(title, text) for title, text in sections if title not in OWN_SECTIONS]
    nav = " ".join(f'<a href="#{_anchor(t)}">{html.escape(t)}</a>'
                   for t in ["What the intervals show", "Definitions", *(t for t, _ in kept), "Provenance"])
    body = [
        "<h1>Retention report</h1>", markdown_html(preamble, figure), f"<nav>{nav}</nav>",
        f'<section id="conclusion">{markdown_html(chr(10).join(conclusion(rates, comparisons)), figure)}</section>',
        markdown_html(_definitions(protocols), figure),
        *(markdown_html(text, figure) for _, text in kept),
        _provenance(results),
    ]
    if downloads:
        body.append(f"<p>Data: {' · '.join(downloads)}</p>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>Retention report: {html.escape(', '.join(studies))}</title><style>{STYLE}</style></head>\n"
            "<body><main>\n" + "\n".join(body) + f"\n</main><script>{SCRIPT}</script></body></html>\n")


def write_html(folders: Sequence[str | Path], out: str | Path, mixed_provenance: str = "refuse") -> Path:
    """Write ``<out>/report.html`` from the report files already in ``out`` (``report.md``, the CSVs, the PNGs)
    and the runs of ``folders``; returns its path."""
    out = Path(out)
    files = [out / name for name in ("report.md", "report.csv", "comparisons.csv")]
    if absent := [str(f) for f in files if not f.is_file()]:
        raise ReportError(f"no {', '.join(absent)}: write the report (retention report) before its web page")
    results, _, _ = load_results(folders, mixed_provenance)
    text = page(files[0].read_text(encoding="utf-8"), _read_csv(files[1]), _read_csv(files[2]), results,
                _embedded(out), [_download(f) for f in [*files[1:], out / "costs.csv", out / "accuracy.csv"]
                                 if f.is_file()])
    return atomic_write_text(out / PAGE, text)
