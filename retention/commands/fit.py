"""``retention fit``: fine-tune a model on a downstream task with LightningCLI and report validation numbers.

With a model, a task and no edits it fine-tunes and reports; the retention pipeline plugs in through its own
option groups (``edits``, ``paraphrases``, ``freeze``, ``monitor``, ``report``). Examples::

    retention fit --config configs/fit/instruct_alpaca.yaml
    retention fit --config configs/fit/text_builtin.yaml --config configs/trainer/ddp_cpu.yaml
    retention fit --config configs/fit/math_builtin.yaml --trainer.max_steps 5 --print_config
    retention fit --config configs/demo.yaml --optimizer SGD --optimizer.lr 0.01 --optimizer.momentum 0.9

Every run writes into ``<run.out_dir>/<run.name>/``: the resolved ``config.yaml``, the CSV logger's
``metrics.csv`` and ``hparams.yaml``, W&B files (offline unless credentials exist) and, with
``run.save_model``, the merged fine-tuned model under ``model/``. A run never mixes with another: it holds
the folder's lock (``.lock``) while it runs, an existing folder is refused unless ``run.overwrite`` (which
empties it first, and only a run folder) or ``--ckpt_path`` (which resumes it), and ``incomplete.json`` marks
the folder until the run has finished. ``checkpoints/last.ckpt`` is rewritten every ``run.checkpoint_every``
steps; ``--ckpt_path last`` resumes an interrupted run to the same results as an uninterrupted one (weights,
data position, token counts, curves, ``metrics.csv`` rows). A resume is the run that wrote the checkpoint:
another config or data is refused unless ``run.resume_changes`` names the keys. Checkpoints are read as
tensors and plain values only.

The options, their checks and the run itself: :mod:`retention.fitting`; the run folder: :mod:`retention.runfolder`.
"""

from __future__ import annotations

import threading

from retention.fitting import fit


def main(argv: list[str], started: threading.Event | None = None) -> int:
    """``retention fit ARGV``; raises on any error (``started`` is set once the work has begun: an error before
    it is the user's)."""
    fit(argv, started)
    return 0
