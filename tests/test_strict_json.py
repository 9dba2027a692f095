"""Every JSON and JSON-lines file a run writes is strict JSON (no bare NaN or Infinity, which jq, JavaScript and
most parsers refuse): non-finite numbers are written as null (docs/formats.md, "JSON files")."""

from __future__ import annotations

import json
from pathlib import Path

from tiny_runs import fit_config, prepare


def _refuse(constant: str):
    raise ValueError(f"bare {constant} is not JSON")


def strict_documents(path: Path) -> list:
    """The JSON documents of a .json (one) or .jsonl (one per line) file, parsed strictly."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines() if path.suffix == ".jsonl" else [text]
    return [json.loads(line, parse_constant=_refuse) for line in lines if line.strip()]


def test_every_json_file_of_a_run_and_its_cache_is_strict(tmp_path, tiny_llama, monkeypatch):
    """The run goes through the API (``retention.fit``: a config file, then groups merged key by key over it)."""
    import yaml

    import retention

    prepare(tmp_path, tiny_llama[1])
    monkeypatch.setenv("RETENTION_CACHE", str(tmp_path / "cache"))
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(fit_config(tmp_path)), encoding="utf-8")
    retention.fit(tmp_path / "tiny.yaml", run={"name": "strict", "save_model": True},
                  monitor={"protocols": ["top1", "gen"]})  # no prob: alt_logprob is never computed

    run, cache = tmp_path / "runs" / "strict", tmp_path / "cache"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["monitor"]["protocols"] == ["top1", "gen"] and config["run"]["save_model"] is True
    assert config["monitor"]["every_n_steps"] == 2 and config["trainer"]["max_steps"] == 3  # kept from the file
    files = sorted(p for root in (run, cache) for p in root.rglob("*") if p.suffix in (".json", ".jsonl"))
    names = {p.relative_to(run).parts[0] for p in files if p.is_relative_to(run)}
    assert {"summary.json", "probes", "model"} <= names and any(p.is_relative_to(cache) for p in files)
    documents = {p: strict_documents(p) for p in files}
    rows = [row for p, docs in documents.items() if p.parent.name == "probes" for row in docs]
    assert rows and all(r["alt_logprob"] is None and "prob" not in r["passed"] for r in rows)
    summary = documents[run / "summary.json"][0]
    empty = [r for by_group in summary["retention"].values() for r in by_group.values() if r["denominator"] == 0]
    assert empty and all(r["value"] is None for r in empty)  # a rate of nothing: null, beside its denominator 0

    retention.report(run, out=tmp_path / "report", plots=False)
    assert "retention" in (tmp_path / "report" / "report.md").read_text()
