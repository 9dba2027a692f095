"""A run folder's lifecycle: made this run's own (or refused), marked incomplete until the run ends, rewound to
its checkpoint on a resume, and deleted when a fresh run fails before its first step or a study discards it.

``retention fit`` and ``retention study`` both go through these functions; what a run writes into the folder is
listed in ``docs/pipeline.md``.
"""

from __future__ import annotations

import csv
import os
import shutil
import time
from pathlib import Path
from typing import Any

from filelock import FileLock

from retention.callbacks.checkpoint import LAST, RUN_KEY, CheckpointError, RunIdentity, open_checkpoint
from retention.io import LOCK, atomic_write_json, empty_folder, lock_folder
from retention.summary import INCOMPLETE

RUN_MARKERS = (INCOMPLETE, "config.yaml", "summary.json")
"""Files a run writes into its folder; ``run.overwrite`` deletes only a folder that holds one."""
RESUME_FREE_KEYS = ("config", "ckpt_path", "weights_only", "run.overwrite", "run.wandb",
                    "run.keep_checkpoint", "run.resume_changes", "trainer.enable_progress_bar")
"""Resolved keys a resume may change freely: how a run is started, shown and kept, not what it computes."""


def launched_as_rank_zero(env: dict[str, str] | None = None) -> bool:
    """Whether this process is global rank 0, before a trainer knows: every rank variable a launcher sets is 0.
    ``RANK`` (torchrun), ``SLURM_PROCID`` (srun) and ``LOCAL_RANK`` (Lightning's launcher, for the processes it
    starts) are not enough: with Lightning's launcher on several nodes the process each node starts by hand
    has only ``NODE_RANK``."""
    env = os.environ if env is None else env
    return all(int(env.get(k, 0)) == 0 for k in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "NODE_RANK", "GROUP_RANK"))


def prepare_run_folder(run_dir: Path, overwrite: bool, resume: bool) -> FileLock:
    """Make ``run_dir`` this run's own: refuse an existing one unless ``overwrite`` (emptied; only a run
    folder) or ``resume``, and one another run is using; mark it incomplete until the run finishes. Returns
    the folder's lock, which the caller holds until the run ends."""
    existing = run_dir.is_dir() and any(p.name != LOCK for p in run_dir.iterdir())
    if existing and not resume:
        if not overwrite:
            raise FileExistsError(
                f"run folder {run_dir} exists: choose another run.name, replace it with run.overwrite true, or "
                "resume it with --ckpt_path last"
            )
        if not any((run_dir / name).exists() for name in RUN_MARKERS):
            raise FileExistsError(f"run.overwrite: {run_dir} is not a run folder (it holds none of "
                                  f"{', '.join(RUN_MARKERS)}), and only run folders are replaced: choose "
                                  "another run.name or run.out_dir")
    lock = lock_folder(run_dir, "run")
    try:
        if existing and not resume:
            empty_folder(run_dir, keep=(LOCK,))
        atomic_write_json(run_dir / INCOMPLETE, {
            "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "note": "this run has not finished; its files may be partial (resume it with --ckpt_path last)",
        })
    except BaseException:
        lock.release()
        raise
    return lock


def finish_run_folder(run_dir: Path) -> None:
    """Mark ``run_dir`` a finished run (the last thing a run does)."""
    (run_dir / INCOMPLETE).unlink(missing_ok=True)


def remove_run_folder(run_dir: Path) -> None:
    """Delete a run folder, unless a run is using it (raises :class:`retention.io.FolderLocked`)."""
    lock = lock_folder(run_dir, "run")
    try:
        shutil.rmtree(run_dir)
    finally:
        lock.release()


def has_checkpoint(run_dir: Path) -> bool:
    """Whether an interrupted run in ``run_dir`` can resume (``--ckpt_path last``)."""
    return (run_dir / "checkpoints" / LAST).exists()  # a file, or a link to a sharded checkpoint folder


def resume_point(run_dir: Path, ckpt_path: str) -> tuple[Path, Path, dict[str, Any]]:
    """The checkpoint ``--ckpt_path`` names (``last``: this run's ``checkpoints/last.ckpt``), what to restore from
    (the file itself, or a sharded folder's private copy that was checked: what is checked is what is restored)
    and its content, read without running code (a sharded checkpoint's folder: its ``meta.pt``, everything but
    the weights)."""
    path = run_dir / "checkpoints" / LAST if ckpt_path == "last" else Path(ckpt_path)
    if not (path.is_file() or (path / "meta.pt").is_file()):
        raise FileNotFoundError(f"--ckpt_path {ckpt_path}: no checkpoint at {path}")
    restore, checkpoint = open_checkpoint(path)
    if not isinstance(checkpoint.get("global_step"), int):
        raise CheckpointError(f"{path}: not a checkpoint of retention fit (no integer global_step)")
    return path, restore, checkpoint


def check_resume(path: Path, checkpoint: dict[str, Any], identity: RunIdentity, allowed: list[str]) -> None:
    """Refuse to resume from ``checkpoint`` (read from ``path``) with a config or data that differs from the
    run that wrote it, in keys other than ``allowed``; record the allowed changes in ``identity``."""
    stored = checkpoint.get(RUN_KEY)
    if not isinstance(stored, dict):
        raise CheckpointError(f"{path}: records no config (written before retention checked resumes, or "
                              "not by retention fit), so this resume cannot be shown to be the same run: "
                              "start the run again, or resume it anyway with --run.resume_changes '[\"*\"]'")
    differences = identity.differences(stored)
    known = set(identity.config) | set(stored.get("config", {}))
    unknown = [k for k in allowed if k != "*" and k not in known]
    if unknown:
        raise ValueError(f"run.resume_changes: {unknown} are not keys of the resolved config (dotted keys, "
                         "e.g. model.optimizer.lr; --print_config shows them)")
    refused = [k for k in differences if "*" not in allowed and k not in allowed]
    if refused:
        lines = "".join(f"  {k}: {differences[k][0]!r} in the checkpoint, {differences[k][1]!r} now\n"
                        for k in refused)
        raise CheckpointError(
            f"{path}: this resume is not the run that wrote the checkpoint; its config differs in:\n{lines}"
            "resume with the checkpoint's values, or allow the change with "
            f"--run.resume_changes '[{','.join(refused)}]' (config.yaml then records both values)")
    step = checkpoint["global_step"]
    identity.changes = [*stored.get("changes", []), *({"step": step, "key": k, "before": b, "after": a}
                                                      for k, (b, a) in differences.items())]


def rewind_run_folder(run_dir: Path, step: int) -> list[dict]:
    """Forget what an interrupted run wrote after its checkpoint's ``step``: per-probe files of later
    measurements are deleted; returns the ``metrics.csv`` rows up to ``step`` (the CSV logger starts the file
    afresh; they are logged again ahead of the resumed run's rows)."""
    for path in (run_dir / "probes").glob("step_*.jsonl"):
        if int(path.stem.removeprefix("step_")) > step:
            path.unlink()
    metrics = run_dir / "metrics.csv"
    if not metrics.is_file():
        return []
    with open(metrics, newline="", encoding="utf-8") as f:
        rows = [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
    return [row for row in rows if int(row.get("step", 0)) <= step]
