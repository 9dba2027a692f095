"""GRACE and WISE through `retention fit` on the tiny model: the memory survives the strategy's wrap, is the same
on every rank (DDP and FSDP2 on 2 CPU ranks), is not trained by the fine-tune, comes back bit for bit on resume;
`freeze.policy: edited` freezes the memory's layer; an export is refused before any work."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from editing_models import FACT, edit_model
from lightning.pytorch import Callback
from tiny_runs import N_EDIT, fit_config, prepare
from torch.distributed.tensor import DTensor

from retention.arch import unwrap_model
from retention.commands.fit import main
from retention.editing.grace import GraceEditor, GraceHParams
from retention.editing.memory import attached
from retention.modules.export import check_exportable, write_model

TESTS = Path(__file__).resolve().parent
CONFIGS = TESTS.parents[0] / "configs" / "trainer"
HPARAMS = {"grace": {"layer": 0, "radius": 1.0, "value_lr": 0.5, "value_steps": 60},
           "wise": {"layer": 0, "lr": 1.0, "steps": 40}}


def _digest(tensors: dict[str, torch.Tensor], meta: dict | None = None) -> str:
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name]
        t = t.full_tensor() if isinstance(t, DTensor) else t  # every rank calls this: a collective under FSDP2
        h.update(name.encode() + t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class MemoryDigest(Callback):
    """Appends to ``<folder>/rank<r>.jsonl``, when fitting starts (after the wrap) and when training ends: the
    digest of each attached memory (tensors and fields) and of its layer's weights."""

    def __init__(self, folder: str):
        self.folder = Path(folder)

    def _write(self, trainer, pl_module, when: str) -> None:
        model = unwrap_model(pl_module.model)
        rows = {}
        for name, module in model.named_modules():
            memory = attached(module)
            if memory is not None:
                layer = model.get_submodule(name.rsplit(".", 2)[0])  # the decoder layer holding the projection
                rows[name] = {"memory": _digest(dict(memory.named_buffers()), memory.meta),
                              "layer": _digest(dict(layer.named_parameters()))}
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f"rank{trainer.global_rank}.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"when": when, "step": trainer.global_step, "memories": rows}) + "\n")

    def on_fit_start(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module, "start")

    def on_train_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module, "end")


def _config(root: Path, name: str, editor: str, **run) -> Path:
    config = fit_config(root, name)
    config["edits"].update(editor=editor, hparams=dict(HPARAMS[editor]), cache=False)
    config["run"].update(run)
    config["trainer"]["callbacks"] = [{"class_path": "test_memory_pipeline.MemoryDigest",
                                       "init_args": {"folder": str(root / "digests" / name)}}]
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _digests(root: Path, name: str) -> dict[int, list[dict]]:
    folder = root / "digests" / name
    return {int(p.stem[4:]): [json.loads(line) for line in p.read_text().splitlines()]
            for p in sorted(folder.glob("rank*.jsonl"))}


def _summary(root: Path, name: str) -> dict:
    return json.loads((root / "runs" / name / "summary.json").read_text())


def _fit(*args: str) -> str:
    """``retention fit`` in a subprocess with one thread per rank (float results depend on the thread count)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "retention", "fit", *args], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_llama) -> Path:
    root = tmp_path_factory.mktemp("memory")
    prepare(root, tiny_llama[1])
    return root


def _landed_and_kept(root: Path, name: str, ranks: int, protocols=("top1", "prob")) -> tuple[dict, dict]:
    """Checks every run here shares: the edits land at t=0 under ``protocols`` on the probes of every rank, the
    memory is one memory on every rank and the fine-tune leaves it as edited; returns the rank-0 rows (start,
    end)."""
    summary = _summary(root, name)
    assert summary["environment"]["world_size"] == ranks and summary["run"]["edited_layers"] == [0]
    for protocol in protocols:
        t0 = summary["t0"]["edit"][protocol]
        assert t0["count"] == t0["denominator"] == N_EDIT, protocol  # the probes are split over the ranks
    rows = _digests(root, name)
    assert sorted(rows) == list(range(ranks))
    assert all(r == rows[0] for r in rows.values())  # the same memory and weights on every rank, start and end
    start, end = rows[0]
    assert (start["when"], end["when"], end["step"]) == ("start", "end", 3)
    assert list(start["memories"]) == ["model.layers.0.mlp.down_proj"]
    (first,), (last,) = start["memories"].values(), end["memories"].values()
    assert first["memory"] == last["memory"]  # the codebook / side memory is kept as edited
    return first, last


def test_grace_fit_keeps_the_codebook_trains_the_base_and_resumes_to_the_same_codebook(root):
    config = _config(root, "grace", "grace", checkpoint_every=2, keep_checkpoint=True)
    assert main(["--config", str(config)]) == 0
    first, last = _landed_and_kept(root, "grace", 1)
    assert first["layer"] != last["layer"]  # the memory's layer trained under it
    before = _summary(root, "grace")
    # Resumed from step 2: edited again from the base model, the same codebook, the same results.
    assert main(["--config", str(config), "--ckpt_path", "last"]) == 0
    rows = _digests(root, "grace")[0]
    assert [r["when"] for r in rows] == ["start", "end", "start", "end"]
    assert {r["memories"]["model.layers.0.mlp.down_proj"]["memory"] for r in rows} == {first["memory"]}
    after = _summary(root, "grace")
    for key in ("t0", "retention", "curves"):
        assert after[key] == before[key], key
    # The checkpoint holds the codebook, and a resume attaches that one, not the one the run edits again.
    path = root / "runs" / "grace" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=False)
    saved = checkpoint["retention_edits"]["memories"]["model.layers.0.mlp.down_proj"]
    assert _digest(saved["tensors"], saved["meta"]) == first["memory"]
    saved["tensors"]["values"] = saved["tensors"]["values"] + 0.25
    torch.save(checkpoint, path)
    assert main(["--config", str(config), "--ckpt_path", "last"]) == 0
    rows = _digests(root, "grace")[0]
    resumed = [r for r in rows if r["when"] == "start"]
    assert len(resumed) == 3
    assert resumed[-1]["memories"]["model.layers.0.mlp.down_proj"]["memory"] == _digest(saved["tensors"], saved["meta"])


def test_grace_on_two_ddp_ranks_with_the_memory_layer_frozen(root):
    """`freeze.policy: edited` freezes the layer the codebook sits on: its weights and the codebook stay as edited
    on both ranks."""
    config = _config(root, "grace_ddp", "grace")
    out = _fit("--config", str(config), "--config", str(CONFIGS / "ddp_cpu.yaml"), "--freeze.policy", "edited")
    assert "Starting with 2 processes" in out
    first, last = _landed_and_kept(root, "grace_ddp", 2)
    assert first["layer"] == last["layer"]
    assert _summary(root, "grace_ddp")["run"]["frozen_layers"] == [0]


def test_wise_on_two_fsdp2_ranks_measures_what_one_rank_does(root):
    """Under FSDP2 the router reads the unsharded main weight inside the layer's forward: both ranks hold the side
    memory 1 rank edits, it stays as edited while the (sharded) main memory trains, and the rates are 1 rank's.
    (On the random tiny model one of the three batch edits lands under `prob` but not `top1`, on 1 rank too.)"""
    _fit("--config", str(_config(root, "wise_one", "wise")))
    out = _fit("--config", str(_config(root, "wise_fsdp2", "wise")), "--config", str(CONFIGS / "fsdp2_cpu.yaml"))
    assert "Starting with 2 processes" in out
    first, last = _landed_and_kept(root, "wise_fsdp2", 2, protocols=("prob",))
    assert first["layer"] != last["layer"]
    assert _digests(root, "wise_one")[0][0]["memories"] == _digests(root, "wise_fsdp2")[0][0]["memories"]
    one, two = _summary(root, "wise_one"), _summary(root, "wise_fsdp2")
    for key in ("t0", "retention", "curves"):
        assert two[key] == one[key], key


def test_an_export_of_memory_edits_is_refused(root, tiny_llama, tmp_path):
    config = _config(root, "refused", "wise")
    with pytest.raises(ValueError, match=r"--run\.save_model: wise keeps its edits in a memory module"):
        main(["--config", str(config), "--run.save_model", "true"])
    assert not (root / "runs" / "refused").exists()
    # Called directly (module.export, write_model): refused while a memory is attached, nothing written.
    model = edit_model("llama", len(tiny_llama[1]))
    result = GraceEditor(GraceHParams(layer=0, value_steps=2)).edit(model, tiny_llama[1], [FACT])
    result.apply(model)
    with pytest.raises(ValueError, match=r"run\.save_model: .*model\.layers\.0\.mlp\.down_proj \(grace\)"):
        write_model(model, tiny_llama[1], tmp_path / "model")
    assert not (tmp_path / "model").exists()
    result.revert(model)
    check_exportable(model)
