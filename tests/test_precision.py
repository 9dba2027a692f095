"""bf16 on CPU: fine-tuning under ``trainer.precision: bf16-mixed`` and probe scoring under
``monitor.precision: bf16`` (autocast), and the refusal where the device has no native bfloat16.

This machine may lack AVX-512 BF16, where autocast still runs (emulated, slowly): the tests that use bf16 declare it
supported, so they check what bf16 does, not the machine."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
import yaml
from editing_models import edit_model
from tiny_runs import fit_config, prepare

import retention.callbacks.monitor as monitor_module
import retention.scoring as scoring
from retention.callbacks.checkpoint import load_checkpoint
from retention.callbacks.monitor import RetentionMonitor
from retention.callbacks.probing import score_shard
from retention.records import Probe
from retention.scoring import score_probes

PROBES = [
    Probe("The capital of France is", "Paris", "London"),
    Probe("The Eiffel Tower is located in the city of", "Paris", "Rome"),
    Probe("Danielle Darrieux's mother tongue is", "French", "English"),
    Probe("Toko Yasuda plays the", "guitar", "piano"),
    Probe("The official language of the United States of America is", "English", "Spanish"),
    Probe("Apple A5 was created by", "Apple", "Google"),
    Probe("The mother tongue of Danielle Darrieux is", "English", "French"),
    Probe("The instrument played by Toko Yasuda is", "piano", "guitar"),
]


@pytest.fixture
def bf16_everywhere(monkeypatch):
    """Declare native bf16 on this machine (autocast runs either way)."""
    for module in (scoring, monitor_module):
        monkeypatch.setattr(module, "bf16_supported", lambda device: True)


def test_bf16_mixed_fit_trains_float32_master_weights(tmp_path, tiny_llama, bf16_everywhere):
    from retention.commands.fit import main

    prepare(tmp_path, tiny_llama[1])
    config = fit_config(tmp_path, "bf16", protocols=["top1", "prob"], precision="bf16-mixed", max_steps=2,
                        gradient_clip_val=1.0)
    config["edits"].update(n_edit=1, n_control=2)
    config["edits"]["hparams"]["v_steps"] = 5
    config["monitor"].update(precision="bf16", every_n_steps=0)
    config["run"].update(keep_checkpoint=True, checkpoint_every=1)
    path = tmp_path / "bf16.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main(["--config", str(path)]) == 0

    folder = tmp_path / "runs" / "bf16"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["environment"]["precision"] == "bf16-mixed" and summary["final_step"] == 2
    assert summary["t0"]["edit"]["prob"]["denominator"] == 1  # the edit was measured
    with open(folder / "metrics.csv", newline="") as f:
        losses = [float(row["train/loss"]) for row in csv.DictReader(f) if row["train/loss"]]
    assert losses and all(math.isfinite(x) for x in losses)
    weights = load_checkpoint(folder / "checkpoints" / "last.ckpt")["state_dict"]
    assert weights and all(w.dtype == torch.float32 for w in weights.values())
    from transformers import AutoModelForCausalLM

    start = AutoModelForCausalLM.from_pretrained(tmp_path / "model").state_dict()
    name = "model.layers.1.mlp.down_proj.weight"  # not edited (ROME writes layer 0): only training moved it
    assert not torch.equal(weights[f"model.{name}"], start[name])


def test_bf16_scoring_autocasts_and_keeps_clear_outcomes(tiny_llama, bf16_everywhere):
    tok = tiny_llama[1]
    model = edit_model("llama", len(tok))  # 0.2-initialised: margins well above bf16's rounding
    dtypes = []
    hook = model.model.layers[0].mlp.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    fp32 = score_probes(model, tok, PROBES, ("top1", "prob"), batch_size=4)
    assert set(dtypes) == {torch.float32}
    dtypes.clear()
    settings = RetentionMonitor(protocols=("top1", "prob"), batch_size=4, precision="bf16").settings
    bf16 = score_shard(model, tok, PROBES, settings)
    hook.remove()
    assert set(dtypes) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast leaves the weights alone
    clear = [(a, b) for a, b in zip(fp32, bf16) if abs(a.margin) > 0.5]
    assert len(clear) >= len(PROBES) // 2
    assert all(a.passed["prob"] == b.passed["prob"] for a, b in clear)
    assert max(abs(a.target_logprob - b.target_logprob) for a, b in zip(fp32, bf16)) > 0  # bf16 did compute


def test_bf16_refused_without_native_support(monkeypatch, tiny_llama):
    for module in (scoring, monitor_module):
        monkeypatch.setattr(module, "bf16_supported", lambda device: False)
    with pytest.raises(ValueError, match="--monitor.precision 32"):
        RetentionMonitor(precision="bf16")
    with pytest.raises(ValueError, match="monitor.precision"):
        RetentionMonitor(precision="16")
    assert RetentionMonitor(precision=32).settings.precision == "32"  # `precision: 32` as YAML reads it
    with pytest.raises(ValueError, match="precision bf16: cpu has no native bfloat16"):
        score_probes(*tiny_llama, PROBES[:1], ("top1",), precision="bf16")
