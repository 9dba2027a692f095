"""``retention locate`` on a model with fewer layers than ``--k``: k is capped at the layer count, with a note."""

from __future__ import annotations

import json

from retention.cli import main


def test_locate_caps_k_at_the_models_layers(tmp_path, tiny_llama, monkeypatch, capsys):
    """tiny-llama has 2 layers; the default k=5 used to crash after tracing and write nothing."""
    monkeypatch.setenv("RETENTION_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "locate"
    assert main(["locate", "--model", "tiny-llama", "--n", "2", "--known", "none", "--samples", "1",
                 "--out", str(out), "--device", "cpu", "--save", "false"]) == 0
    printed = capsys.readouterr().out
    assert "--k 5: tiny-llama has 2 layers; locating a window of k=2 (all of them)" in printed
    summary = json.loads((out / "causal_trace.json").read_text())
    assert summary["located"] == {"kind": "mlp", "k": 2, "layers": [0, 1]}
    assert (out / "causal_trace.png").stat().st_size > 0
