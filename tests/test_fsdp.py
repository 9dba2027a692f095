"""FSDP2 (ModelParallelStrategy, fully_shard per decoder layer) on 2 CPU ranks (gloo) through `retention fit`:
the same rates as 1 rank, a sharded checkpoint that resumes to the same results, and an export of the gathered
weights; and the fixed-step generation that sharded scoring relies on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tiny_runs import fit_config, prepare

import retention.scoring as scoring
from retention.callbacks.checkpoint import load_checkpoint
from retention.models import load_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "trainer"
RATES = ("t0", "retention", "final_accuracy", "curves")


def test_fixed_step_generation_gives_the_text_of_generate(tiny_llama, monkeypatch):
    """Sharded generation runs every step past EOS and cuts afterwards: the text equals generate's, which stops
    at EOS (here a token the prompts reach at different steps)."""
    model, tok = tiny_llama
    prompts = ["The capital of France is", "Hello", "A b c d e f", "zorp blik"]
    free = scoring.greedy_generate(model, tok, prompts, 8)
    eos = tok(free[0])["input_ids"][2]  # a token the first prompt generates at its third step
    monkeypatch.setattr(model.generation_config, "eos_token_id", eos)
    stopped = scoring.greedy_generate(model, tok, prompts, 8)
    monkeypatch.setattr(scoring, "is_sharded", lambda _: True)
    assert scoring.greedy_generate(model, tok, prompts, 8) == stopped != free


def test_pad_after_eos():
    tokens = torch.tensor([[5, 2, 7, 2], [2, 3, 4, 5], [1, 3, 4, 6]])
    assert scoring.pad_after_eos(tokens, 2, 0).tolist() == [[5, 2, 0, 0], [2, 0, 0, 0], [1, 3, 4, 6]]
    assert scoring.pad_after_eos(tokens, [3, 7], 0).tolist() == [[5, 2, 7, 0], [2, 3, 0, 0], [1, 3, 0, 0]]


def _write(root: Path, name: str, config: dict) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _config(root: Path, name: str) -> Path:
    config = fit_config(root, name)
    config["edits"].update(cache=False, n_control=5)  # 33 probes: rank 1's shard is topped up under FSDP2
    config["data"]["task"]["val_fraction"] = 0.225  # 9 validation examples: rank 0 has 2 batches, rank 1 one
    config["run"].update(save_model=True, checkpoint_every=2, keep_checkpoint=True)
    return _write(root, name, config)


def _fit(*args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "retention", "fit", *args], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama) -> Path:
    """The tiny pipeline run on 1 rank (in-process) and on 2 FSDP2 ranks; returns the root."""
    root = tmp_path_factory.mktemp("fsdp")
    prepare(root, tiny_llama[1])
    _fit("--config", str(_config(root, "one")))  # a subprocess too: float results depend on the thread count
    out = _fit("--config", str(_config(root, "fsdp2")), "--config", str(CONFIGS / "fsdp2_cpu.yaml"))
    assert "Starting with 2 processes" in out
    return root


def _summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


def test_fsdp2_on_two_ranks_gives_the_rates_of_one_rank(runs):
    one, two = _summary(runs / "runs" / "one"), _summary(runs / "runs" / "fsdp2")
    assert two["environment"]["world_size"] == 2
    for key in RATES:
        assert two[key] == one[key], key
    assert two["downstream"]["train_tokens"] == one["downstream"]["train_tokens"]
    assert two["downstream"]["last"]["val/loss"] == pytest.approx(one["downstream"]["last"]["val/loss"], rel=1e-5)


def test_fsdp2_export_gathers_the_full_weights(runs):
    """The exported weights are gathered from the shards, and equal 1 rank's bit for bit (same thread count)."""
    one, _ = load_model(str(runs / "runs" / "one" / "model"))
    two, _ = load_model(str(runs / "runs" / "fsdp2" / "model"))
    theirs = two.state_dict()
    for name, weight in one.state_dict().items():
        assert torch.equal(theirs[name], weight), name


def test_fsdp2_sharded_checkpoint_resumes_to_the_same_results(runs):
    folder = runs / "runs" / "fsdp2"
    last = folder / "checkpoints" / "last.ckpt"
    assert last.is_symlink() and (last / "meta.pt").is_file()  # a folder of shards, linked atomically
    assert load_checkpoint(last)["global_step"] == 2
    before = _summary(folder)
    probes = {p.name: p.read_text() for p in (folder / "probes").iterdir()}
    assert sorted(p.name for p in last.resolve().glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    out = _fit("--config", str(runs / "fsdp2.yaml"), "--config", str(CONFIGS / "fsdp2_cpu.yaml"), "--ckpt_path", "last")
    assert "Restored all states from the checkpoint" in out
    after = _summary(folder)
    for key in RATES:
        assert after[key] == before[key], key
    assert after["downstream"] == before["downstream"]
    assert {p.name: p.read_text() for p in (folder / "probes").iterdir()} == probes


def test_fsdp2_keeps_frozen_edited_layers_as_one_rank_does(runs):
    """`freeze.policy: edited` under FSDP2: the edited layer is left out of the optimizer on the shards as on 1 rank
    (1 rank's frozen layers are checked bit-identical in test_freeze.py), so the runs agree on every rate and on
    every exported weight, and the frozen layer differs from the trained one's run."""
    flags = ["--freeze.policy", "edited", "--run.checkpoint_every", "0"]
    _fit("--config", str(runs / "one.yaml"), "--run.name", "one_frozen", *flags)
    _fit("--config", str(runs / "fsdp2.yaml"), "--config", str(CONFIGS / "fsdp2_cpu.yaml"),
         "--run.name", "fsdp2_frozen", *flags)
    one, two = (_summary(runs / "runs" / name) for name in ("one_frozen", "fsdp2_frozen"))
    assert one["run"]["frozen_layers"] == two["run"]["frozen_layers"] == [0]
    for key in RATES:
        assert two[key] == one[key], key
    frozen_one, _ = load_model(str(runs / "runs" / "one_frozen" / "model"))
    frozen_two, _ = load_model(str(runs / "runs" / "fsdp2_frozen" / "model"))
    trained, _ = load_model(str(runs / "runs" / "one" / "model"))
    theirs, trained = frozen_two.state_dict(), trained.state_dict()
    for name, weight in frozen_one.state_dict().items():
        assert torch.equal(theirs[name], weight), name
    layer0 = [n for n in trained if ".layers.0." in n]
    assert any(not torch.equal(trained[n], theirs[n]) for n in layer0)  # the unfrozen run trained layer 0
