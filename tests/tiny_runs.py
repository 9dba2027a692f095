"""A tiny editable model, a one-example task and a `retention fit` config around them, for pipeline and study
tests: random models know no facts (``known_protocol: none``), and a task whose examples are all the same makes
every batch the same whatever the sampler (1 rank and 2 DDP ranks train identically)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import yaml
from editing_models import edit_model
from lightning.pytorch import Callback

N_EDIT, N_CONTROL = 3, 6
PROTOCOLS = ["top1", "prob", "gen"]
ROME = {"layer": 0, "context_templates": [[5, 1]], "v_steps": 10, "v_weight_decay": 0.0, "clamp_norm_factor": 1.0e4,
        "mom2_adjustment": False}


def prepare(root: Path, tokenizer) -> None:
    """Write ``root/model`` (the 0.2-initialised tiny llama, which responds to edits) and ``root/same.jsonl``."""
    if (root / "model").exists():
        return
    edit_model("llama", len(tokenizer)).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rows = [{"instruction": "Say zorp blik twice.", "output": "zorp blik zorp blik"}] * 40
    (root / "same.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def fit_config(root: Path, name: str | None = None, protocols: list[str] = PROTOCOLS, **trainer) -> dict:
    """A run config: ROME in batch mode on the built-in facts, 3 steps of full fine-tuning, measured every 2."""
    config = {
        "model": {"model_name": str(root / "model"), "adapter": {"method": "full"},
                  "optimizer": {"lr": 1.0e-2, "schedule": "constant"}},
        "data": {"task": {"family": "instruct", "source": str(root / "same.jsonl"), "val_fraction": 0.25},
                 "batch_size": 4},
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 3, "val_check_interval": 100,
                    "check_val_every_n_epoch": None, "enable_progress_bar": False, "enable_model_summary": False,
                    **trainer},
        "run": {"out_dir": str(root / "runs"), "wandb": "disabled"},
        "edits": {"knowledge": "builtin", "n_edit": N_EDIT, "n_control": N_CONTROL, "known_protocol": "none",
                  "editor": "rome", "mode": "batch", "hparams": dict(ROME)},
        "monitor": {"protocols": protocols, "every_n_steps": 2, "max_new_tokens": 3},
    }
    if name is not None:
        config["run"]["name"] = name
    return config


def prepare_distinct(root: Path, n: int = 40) -> Path:
    """``root/distinct.jsonl``: ``n`` different instruction examples, so the data order shows in the results."""
    path = root / "distinct.jsonl"
    rows = [{"instruction": f"Say item {i} twice.", "output": f"item {i} item {i}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


class KillAt(Callback):
    """Kills its own process (SIGKILL: no cleanup, as a preempted job) when training reaches ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


RATES = ("t0", "retention", "final_accuracy", "curves")
"""The summary.json keys that must equal the 1-rank run's in a run that differs only in how it runs."""


def write_config(root: Path, name: str, **trainer) -> Path:
    """``root/<name>.yaml``: the tiny run config, editing on every rank (no edit cache: distributed tests check
    that ranks edit alike)."""
    config = fit_config(root, name, **trainer)
    config["edits"]["cache"] = False
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def read_run(folder: Path) -> tuple[dict, dict[str, list[dict]]]:
    """A run folder's ``summary.json`` and its per-probe files by name."""
    summary = json.loads((folder / "summary.json").read_text())
    probes = {p.name: [json.loads(line) for line in p.read_text().splitlines()] for p in (folder / "probes").iterdir()}
    return summary, probes


def run_one_rank(root: Path, tokenizer) -> tuple[Path, Path]:
    """The tiny pipeline run in-process on 1 rank (the ``one_rank`` fixture): (config, run folder)."""
    prepare(root, tokenizer)
    from retention.commands.fit import main

    config = write_config(root, "one")
    assert main(["--config", str(config)]) == 0
    return config, root / "runs" / "one"


class WaitAt(Callback):
    """At training step ``step``, creates ``<path>.waiting`` and waits (at most 5 minutes) until ``path``
    exists: a run held alive while another process tries its folder."""

    def __init__(self, step: int, path: str):
        self.step, self.path = step, Path(path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self.path.with_name(self.path.name + ".waiting").touch()
            deadline = time.monotonic() + 300
            while not self.path.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
