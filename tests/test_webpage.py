"""``retention report --html``: one self-contained page, its generated conclusion, and the page as a real
headless Chromium renders it (headings, every figure decoded, no console message)."""

from __future__ import annotations

import base64
import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from retention.cli import main as cli_main
from retention.study.conclusion import HEADING, conclusion
from retention.study.report import ReportError, aggregate, comparisons, load_results, rate_rows
from retention.study.runner import DONE
from retention.study.webpage import SCRIPT, markdown_html, write_html

PROTOCOLS = ("top1", "prob")
KEPT = {
    # (arm, protocol) -> per seed (edited kept of 10, intrinsic kept of 10)
    ("baseline", "top1"): [(10, 5), (10, 6), (10, 4)],  # E − I = +0.5 [+0.25, +0.75]: excludes 0
    ("baseline", "prob"): [(10, 10)] * 3,  # 0 in every seed
    ("frozen", "top1"): [(10, 9), (10, 3), (10, 6)],  # E − I = +0.4, half-width 0.74: inconclusive
    ("frozen", "prob"): [(10, 10)] * 3,
}


def _rate(count: int, denominator: int = 10) -> dict:
    return {"value": count / denominator, "count": count, "denominator": denominator}


def _provenance(commit: str = "c0ffee" * 6) -> dict:
    return {"code": {"retention": "0.1.0", "commit": commit, "dirty": False}, "lock_sha256": "ab" * 32,
            "python": "3.11.7", "corpora": {"task": {"spec": "builtin", "sha256": "cd" * 32}},
            "model": {"name": "tiny", "fingerprint": "0123456789abcdef"}}


def make_study(folder: Path, name: str = "toy", commit: str = "c0ffee" * 6) -> Path:
    """A finished study folder without a model: arms baseline and frozen, 3 seeds, counts from :data:`KEPT`."""
    runs = []
    for arm in ("baseline", "frozen"):
        for seed in range(3):
            run = f"{arm}__seed{seed}"
            retained = {g: {p: _rate(KEPT[arm, p][seed][i]) for p in PROTOCOLS}
                        for i, g in enumerate(("edit", "control"))}
            start = {g: {p: _rate(10) for p in PROTOCOLS} for g in ("edit", "control")}
            summary = {"run": {"seed": seed}, "protocols": list(PROTOCOLS), "final_step": 8,
                       "provenance": _provenance(commit),
                       "measurements": [{"step": 0, "accuracy": start, "retention": start},
                                        {"step": 8, "accuracy": retained, "retention": retained}]}
            (folder / "runs" / run).mkdir(parents=True)
            (folder / "runs" / run / "summary.json").write_text(json.dumps(summary))
            (folder / "runs" / run / DONE).write_text("{}")
            runs.append({"name": run, "cell": {}, "arm": arm, "seed": seed, "fact": None, "state": "done"})
    (folder / "study.json").write_text(json.dumps({"spec": {"name": name, "baseline": "baseline"}, "runs": runs}))
    return folder


@pytest.fixture
def study(tmp_path) -> Path:
    return make_study(tmp_path / "toy")


def _report(folders: list[Path], out: Path, *extra: str) -> int:
    return cli_main(["report", *map(str, folders), "--out", str(out), "--html", "true", *extra])


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_the_conclusion_says_which_intervals_exclude_zero_and_which_do_not(study, tmp_path):
    results, baselines, _ = load_results([study])
    aggregates = aggregate(results)
    rates, diffs = rate_rows(aggregates), comparisons(aggregates, baselines)
    text = "\n".join(conclusion(rates, diffs))
    assert text.startswith(HEADING)
    # 4 E − I (2 arms x 2 protocols) and 4 frozen − baseline (E and I x 2 protocols; E paraphrase has no probes).
    assert "- 8 differences at the final step (paired t over seeds, n = 3); 1 of them has a 95% interval" in text
    assert "  - baseline: E − I (top1) +0.50 [+0.25, +0.75]" in text
    assert "frozen: E − I (top1)" not in text  # inconclusive, so counted, not named
    assert "- 5 are 0 in every seed" in text  # E − I under prob in both arms; frozen − baseline but I under top1
    # frozen E − I (top1): +0.40, t-interval [-0.35, +1.15] clipped at 1; frozen − baseline I (top1): +0.10 ± 0.90.
    assert "- 2 include 0 and are inconclusive: their half-widths run from 0.67 to 0.90 (median 0.78)" in text
    assert "about 0.4 would exclude 0 by chance alone if nothing differed; 1 does, more than chance gives." in text
    assert "`top1` edited 1.00, intrinsic 0.50–0.60" in text
    # Read back from the CSV files the report writes, the rows give the same conclusion.
    assert _report([study], tmp_path / "out") == 0
    assert conclusion(_rows(tmp_path / "out" / "report.csv"), _rows(tmp_path / "out" / "comparisons.csv")) == \
        text.split("\n")


def test_the_conclusion_of_single_runs_rests_on_pooled_counts(study):
    results, baselines, _ = load_results([study / "runs" / "baseline__seed0", study / "runs" / "frozen__seed0"])
    aggregates = aggregate(results)
    text = "\n".join(conclusion(rate_rows(aggregates), comparisons(aggregates, baselines)))
    # Two run folders are two conditions without a baseline: E − I under two protocols each, Newcombe's interval.
    assert re.search(r"- 4 differences at the final step \(Newcombe \(pooled\), n = \d+(–\d+)?\); 1 of them has", text)
    assert "  - baseline__seed0: E − I (top1) +0.50 [" in text and "- 3 include 0 and are inconclusive" in text


def test_report_html_is_one_page_that_names_no_external_resource(study, tmp_path):
    out = tmp_path / "out"
    assert _report([study], out) == 0
    page = (out / "report.html").read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == 2  # final_retention.png, curves_all.png
    images = re.findall(r'<img [^>]*src="([^"]*)"', page)
    assert len(images) == len(pngs) and all(src.startswith("data:image/png;base64,") for src in images)
    links = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert all(link.startswith(("data:", "#")) for link in links), [x[:40] for x in links]
    assert not re.search(r"https?://", page)
    for heading in ("What the intervals show", "Definitions", "toy: all", "Plots", "Provenance"):
        assert page.count(f">{heading}</h2>") == 1, heading
    assert "<td><strong>+0.50 [+0.25, +0.75]</strong></td>" in page  # report.md's bold difference
    assert page.count("<td>p1</td>") == 6 and "retention 0.1.0 c0ffeec0ff" in page  # every run, its provenance
    assert '<a download="report.csv" href="data:text/csv;base64,' in page


def test_report_html_pools_runs_of_two_provenances_when_labelled(study, tmp_path):
    other = make_study(tmp_path / "other", name="toy", commit="beef" * 10)
    out = tmp_path / "out"
    assert _report([study, other], out, "--mixed_provenance", "label") == 0
    page = (out / "report.html").read_text()
    assert page.count("<td>p1</td>") == page.count("<td>p2</td>") == 6
    assert "retention 0.1.0 beefbeefbe" in page and ">toy [p2]: all</h2>" in page


def test_html_needs_the_report_files_first(study, tmp_path, capsys):
    with pytest.raises(ReportError, match="report.md.*write the report"):
        write_html([study], tmp_path / "empty")
    out = tmp_path / "out"
    assert _report([study], out) == 0
    (out / "final_retention.png").unlink()
    with pytest.raises(ReportError, match="figure 'final_retention.png' is not a file of the report folder"):
        write_html([study], out)


def test_markdown_escapes_html_and_keeps_tables_lists_and_a_conclusion_once():
    text = "\n".join([f"{HEADING}", "", "- a <b>", "  - sub **x**", "- c", "", "| h | <i> |", "| --- | --- |",
                      "| 1 | **2** |", "", "a `code`", "line two"])
    out = markdown_html(text, lambda alt, src: "")
    assert "&lt;b&gt;" in out and "<b>" not in out and "<th>&lt;i&gt;</th>" in out
    assert "<ul><li>a &lt;b&gt;<ul><li>sub <strong>x</strong></li></ul></li><li>c</li></ul>" in out
    assert "<td><strong>2</strong></td>" in out and "<p>a <code>code</code> line two</p>" in out


# -- in a real browser ----------------------------------------------------------------------------------------


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("chromium is not installed: `make test` installs it with apt-get as root on Debian "
                    "(apt-get install --no-install-recommends chromium); here it could not be")
    return found


def render(page: Path, tmp_path: Path, screenshot: Path | None = None) -> tuple[str, list[str]]:
    """The DOM of ``page`` after its load event, as headless Chromium (no network) leaves it, and the console
    messages it logged."""
    command = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={tmp_path / 'profile'}",
               "--enable-logging=stderr", "--v=0", "--hide-scrollbars", "--window-size=1280,1800", "--dump-dom"]
    if screenshot:
        command.append(f"--screenshot={screenshot}")
    done = subprocess.run([*command, page.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, [line for line in done.stderr.splitlines() if ":CONSOLE" in line]


def test_the_report_page_renders_in_headless_chromium(study, tmp_path):
    out = tmp_path / "out"
    assert _report([study], out) == 0
    dom, console = render(out / "report.html", tmp_path, screenshot=tmp_path / "shot.png")
    for heading in ("Retention report", "What the intervals show", "Definitions", "toy: all", "Provenance"):
        assert re.search(rf"<h[12][^>]*>{re.escape(heading)}</h[12]>", dom), heading
    assert 'data-figures="2/2"' in dom  # every figure decoded: complete and naturalWidth > 0
    assert console == []
    shot = (tmp_path / "shot.png").read_bytes()
    assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 20_000


def test_the_browser_check_sees_a_broken_figure_an_external_one_and_a_script_error(tmp_path):
    page = tmp_path / "broken.html"
    good = (Path(__file__).parents[1] / "docs" / "demo_retention_curves.png").read_bytes()
    page.write_text(
        "<!DOCTYPE html><html><body><h1>x</h1>"
        f'<img src="data:image/png;base64,{base64.b64encode(good).decode()}">'
        '<img src="data:image/png;base64,AAAA"><img src="https://example.org/figure.png">'
        f"<script>{SCRIPT}\nundefined_name();</script>"
        "</body></html>")
    dom, console = render(page, tmp_path)
    assert 'data-figures="1/3"' in dom
    assert any("undefined_name is not defined" in line for line in console)
