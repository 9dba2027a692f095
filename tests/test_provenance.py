"""Every run records what produced it, and ``retention report`` never pools runs that differ in it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from tiny_runs import fit_config, prepare

from retention.cli import main as cli_main
from retention.diskcache import file_digest as file_sha256
from retention.provenance import LOCK_FILE, pooling_key


def test_a_run_records_code_lock_corpora_and_model(tmp_path, tiny_llama, monkeypatch, capsys):
    from retention.commands.fit import main as fit_main

    monkeypatch.setenv("RETENTION_CACHE", str(tmp_path / "cache"))
    prepare(tmp_path, tiny_llama[1])
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(fit_config(tmp_path, protocols=["prob"])))
    assert fit_main(["--config", str(tmp_path / "base.yaml"), "--run.name", "a"]) == 0
    summary = json.loads((tmp_path / "runs" / "a" / "summary.json").read_text())
    block = summary["provenance"]
    assert block["corpora"]["task"] == {"spec": str(tmp_path / "same.jsonl"),
                                        "sha256": file_sha256(tmp_path / "same.jsonl")}
    assert block["model"]["fingerprint"] == summary["run"]["base_fingerprint"]
    assert re.fullmatch(r"[0-9a-f]{16}", block["model"]["fingerprint"])
    assert block["lock_sha256"] == (file_sha256(LOCK_FILE) if LOCK_FILE.is_file() else None)
    if (Path(__file__).parents[1] / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{40}", block["code"]["commit"]) and isinstance(block["code"]["dirty"], bool)

    # A run whose key statistics came from another corpus by name (another editor's preset) pools with it.
    runs = tmp_path / "runs"
    other = json.loads((runs / "a" / "summary.json").read_text())
    other["provenance"]["corpora"]["mom2"] = {"spec": "wikitext2", "sha256": "1" * 64}
    other["run"]["seed"] = 1
    (runs / "c").mkdir()
    (runs / "c" / "summary.json").write_text(json.dumps(other))
    assert cli_main(["report", str(runs / "a"), str(runs / "c"), "--out", str(tmp_path / "rep_c")]) == 0
    # The same task file read as other bytes (edited in place) is refused, then kept apart when labelled.
    other = json.loads((runs / "a" / "summary.json").read_text())
    other["provenance"]["corpora"]["task"]["sha256"] = "0" * 64
    (runs / "b").mkdir()
    (runs / "b" / "summary.json").write_text(json.dumps(other))
    assert pooling_key(other["provenance"]) != pooling_key(block)
    capsys.readouterr()
    assert cli_main(["report", str(runs / "a"), str(runs / "b"), "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert "not pooled" in err and "p1: 1 run(s)" in err and "p2: 1 run(s)" in err and "--mixed_provenance label" in err
    assert "task " in err and "has 2 different digests" in err
    assert not (tmp_path / "rep" / "report.md").exists()
    assert cli_main(["report", str(runs / "a"), str(runs / "b"), "--out", str(tmp_path / "rep"),
                     "--mixed_provenance", "label"]) == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "a [p1]" in text and "b [p2]" in text and "## Provenance" in text and "000000000000" in text

