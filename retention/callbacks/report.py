"""RunReport: write the run folder and print the final table.

The folder (``out_dir``, default the trainer's ``default_root_dir``) gets, all written atomically:

- ``probes/step_<N>.jsonl``: per-probe results of every measurement (t=0 is step 0), written as they come;
- ``summary.json``: edited and intrinsic retention side by side under every protocol with denominators,
  accuracy at t=0 (edit success), the curves, downstream metrics (flagged ``collapsed`` when the validation loss
  says fine-tuning destroyed the model), timings, what produced it (``provenance``:
  :mod:`retention.provenance`), and with ``after.mode`` the edit made after fine-tuning (``after_finetune``);
- ``probes/after_finetune.jsonl``: with ``after.mode``, the per-probe results of the model edited after
  fine-tuning (each row marked ``after_finetune: <mode>``);
- ``retention_curves.png``: retention against fine-tuning steps, one panel per protocol under which some probe
  passed at t=0 (:func:`plot_run_curves`);
- ``config.yaml`` is LightningCLI's resolved configuration (its SaveConfigCallback writes it to the log dir).

With a W&B logger attached, the final table (:func:`table_rows`, key ``retention/table``), the curve PNG
(``retention/curves``) and the provenance block (config key ``provenance``) go to the W&B run too.

A resumed run (``--ckpt_path``) rewrites the same files: the monitor's curves come back from the checkpoint.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from retention.arch import unwrap_model
from retention.io import atomic_write_json, atomic_write_jsonl
from retention.pipeline_contract import Measurement, PipelineCallback
from retention.provenance import provenance
from retention.records import GROUPS, probe_group
from retention.summary import collapse, format_table, plot_curves, summarize

TABLE_COLUMNS = ["protocol", "group", "retention", "kept", "passing_t0", "accuracy_t0", "probes"]
"""The columns of :func:`table_rows`: retention (kept / passing at t=0) and accuracy at t=0 (passing / probes)."""


def environment(trainer: Trainer) -> dict:
    """What can change a run's numbers besides its config: library versions, device, precision and CPU threads
    (summation order, hence float results, depends on the thread count)."""
    import platform

    import lightning
    import torch
    import transformers

    return {
        "torch": torch.__version__, "transformers": transformers.__version__, "lightning": lightning.__version__,
        "python": platform.python_version(), "device": str(trainer.strategy.root_device),
        "world_size": trainer.world_size, "precision": str(trainer.precision), "threads": torch.get_num_threads(),
    }


def run_provenance(trainer: Trainer, pl_module: LightningModule) -> dict:
    """The provenance block of a run (:mod:`retention.provenance`): the task's source (the built-in one of a
    family other than text is package data, covered by the code), the key-statistics corpus of the editor's
    resolved hyperparameters, the knowledge file, the base model."""
    edit = pl_module.pipeline.edit
    task = getattr(trainer.datamodule, "task_config", None)
    hparams = edit.get("hparams") if isinstance(edit.get("hparams"), dict) else {}
    knowledge = edit.get("knowledge")
    corpora = {"task": task.source if task is not None and (task.family == "text" or task.source != "builtin")
               else None,
               "mom2": hparams.get("mom2_corpus") if hparams.get("mom2_adjustment", True) else None,
               "knowledge": knowledge if isinstance(knowledge, str) and knowledge != "builtin" else None}
    return provenance(corpora, getattr(pl_module, "model_name", None), edit.get("base_fingerprint"))


def table_rows(summary: dict) -> list[list]:
    """The final retention table of a ``summary.json`` as rows of :data:`TABLE_COLUMNS`, one per protocol and
    probe group (NaN, an empty denominator, as None; so is the null that summary.json holds for it)."""
    def number(value: float | None) -> float | None:
        return None if value is None or math.isnan(value) else value

    rows = []
    for protocol in summary["protocols"]:
        kept = summary["retention"].get(protocol, {})
        for group in (g for g in GROUPS if g in kept):
            t0 = summary["t0"][group][protocol]
            rows.append([protocol, group, number(kept[group]["value"]), kept[group]["count"],
                         kept[group]["denominator"], number(t0["value"]), t0["denominator"]])
    return rows


def collapse_reason(pl_module: LightningModule) -> str | None:
    """Why the module's validation history says fine-tuning collapsed the model, or None
    (:func:`retention.summary.collapse` over ``pl_module.validations``, judged against its vocabulary size)."""
    vocab_size = unwrap_model(pl_module.model).get_output_embeddings().weight.shape[0]
    return collapse(getattr(pl_module, "validations", []), vocab_size)


def drawable_curves(curves: dict[str, dict[str, list]]) -> tuple[dict[str, dict[str, list]], list[str]]:
    """The retention curves (``{group: {protocol: [[step, value], ...]}}``) of the protocols under which some
    group has a point to draw, and the protocols left with none: a retention is undefined (NaN, or None) where no
    probe of the group passed at t=0. The protocols keep their order, and the groups all their curves (the
    figure's legend lists every group)."""
    def defined(value) -> bool:
        return value is not None and not math.isnan(value)

    protocols = dict.fromkeys(p for by_protocol in curves.values() for p in by_protocol)
    drawn = {p for by_protocol in curves.values() for p, points in by_protocol.items()
             if any(defined(v) for _, v in points)}
    kept = {group: {p: points for p, points in by_protocol.items() if p in drawn}
            for group, by_protocol in curves.items()}
    return {g: by_protocol for g, by_protocol in kept.items() if by_protocol}, [p for p in protocols if p not in drawn]


def plot_run_curves(curves: dict[str, dict[str, list]], path: Path, title: str) -> Path | None:
    """``retention_curves.png``: a panel for each protocol under which some probe passed at t=0 (the others are
    named in the title); None, and no file, when no probe passed at t=0 under any protocol."""
    kept, empty = drawable_curves(curves)
    if not kept:
        rank_zero_info(f"no retention curve to draw: no probe passed at t=0 under {', '.join(empty)}")
        return None
    if empty:
        title += f"\nno probe passed at t=0 under {', '.join(empty)}"
    return plot_curves(kept, path, title=title)


def probe_rows(m: Measurement) -> list[dict]:
    return [{"step": m.step, "group": probe_group(r.probe.kind), **r.to_dict()} for r in m.results or []]


class RunReport(PipelineCallback):
    """Writes per-probe results, ``summary.json`` and the curve PNG of a run; prints the retention table.

    It reads everything from the module's :class:`~retention.pipeline_contract.PipelineState`."""

    def __init__(self, out_dir: str | None = None, plot: bool = True):
        """
        Args:
            out_dir: the run folder; None for the trainer's ``default_root_dir``.
            plot: write ``retention_curves.png``.
        """
        self.out_dir = out_dir
        self.plot = plot
        self._written: set[int] = set()
        self._t_start = time.perf_counter()
        self._t_train: float | None = None
        self.summary: dict | None = None
        self._png: Path | None = None
        """The curve PNG once written."""

    def folder(self, trainer: Trainer) -> Path:
        return Path(self.out_dir or trainer.default_root_dir)

    def _flush(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Write the per-probe results of measurements not yet written (rank 0 holds them)."""
        if not trainer.is_global_zero:
            return
        for m in pl_module.pipeline.measurements:
            if m.results is not None and m.step not in self._written:
                atomic_write_jsonl(self.folder(trainer) / "probes" / f"step_{m.step:06d}.jsonl", probe_rows(m))
                self._written.add(m.step)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush(trainer, pl_module)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._t_train = time.perf_counter()

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        self._flush(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush(trainer, pl_module)
        if trainer.is_global_zero and pl_module.pipeline.measurements:
            self.write(trainer, pl_module)
            rank_zero_info("\n" + self.describe(trainer))

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # `retention fit` validates once more after fit when the last step had no validation: keep it.
        if self.summary is not None and trainer.is_global_zero and not trainer.sanity_checking:
            self.summary["downstream"] = self._downstream(pl_module)
            atomic_write_json(self.folder(trainer) / "summary.json", self.summary)

    @staticmethod
    def _downstream(pl_module: LightningModule) -> dict:
        """Validation metrics before and after fine-tuning (the FineTuneModule's ``validations``), and whether
        they say the model collapsed (:func:`collapse_reason`)."""
        validations = getattr(pl_module, "validations", [])
        out = {"train_tokens": getattr(pl_module, "train_tokens", 0)}
        if validations:
            out["first"], out["last"] = validations[0], validations[-1]
            reason = collapse_reason(pl_module)
            out["collapsed"] = reason is not None
            if reason is not None:
                out["collapse_reason"] = reason
        return out

    def write(self, trainer: Trainer, pl_module: LightningModule) -> dict:
        """Write ``summary.json`` and the curve PNG; returns the summary."""
        state = pl_module.pipeline
        measure_s = sum(m.seconds for m in state.measurements)
        # Measurements after t=0, and an edit after fine-tuning, run inside the training window; fine-tuning is
        # the rest of it.
        train_window = time.perf_counter() - self._t_train if self._t_train is not None else 0.0
        after_s = state.after.edit_seconds + state.after.measurement.seconds if state.after is not None else 0.0
        timings = {
            **state.timings,
            "measure_s": measure_s,
            "fine_tune_s": max(0.0, train_window - sum(m.seconds for m in state.measurements[1:]) - after_s),
            "total_s": time.perf_counter() - self._t_start,
        }
        stats = dict(state.stats)
        task = getattr(trainer.datamodule, "task", None)
        if getattr(task, "n_dropped", None) is not None:
            stats["task_examples_dropped"] = int(task.n_dropped)
        read = getattr(task, "read_report", None)
        if read is not None:  # malformed task records skipped under task.on_error: skip
            stats["task_records_read"], stats["task_records_skipped"] = read.read, read.skipped
        run = {**state.edit, **stats, "model": getattr(pl_module, "model_name", ""),
               "frozen_layers": sorted(state.frozen_layers)}
        self.summary = summarize(run, state.protocols, [m.to_dict() for m in state.measurements],
                                 self._downstream(pl_module), timings)
        self.summary["environment"] = environment(trainer)
        self.summary["provenance"] = run_provenance(trainer, pl_module)
        folder = self.folder(trainer)
        if state.after is not None:
            self.summary["after_finetune"] = state.after.to_dict()
            rows = [{"after_finetune": state.after.mode, **row} for row in probe_rows(state.after.measurement)]
            atomic_write_jsonl(folder / "probes" / "after_finetune.jsonl", rows)
        atomic_write_json(folder / "summary.json", self.summary)
        if self.plot:
            self._png = plot_run_curves(
                self.summary["curves"], folder / "retention_curves.png",
                title=f"{run['model']}: {run.get('editor')} ({run.get('mode')}), {run['n_edit']} edits, "
                f"{run['n_control']} controls, frozen {run['frozen_layers'] or 'none'}")
        self.log_to_wandb(trainer)
        return self.summary

    def log_to_wandb(self, trainer: Trainer) -> None:
        """Log the final table (``retention/table``) and the curve PNG (``retention/curves``) to every W&B logger."""
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.config.update({"provenance": self.summary["provenance"]}, allow_val_change=True)
                logger.log_table(key="retention/table", columns=TABLE_COLUMNS, data=table_rows(self.summary),
                                 step=trainer.global_step)
                if self._png is not None:
                    logger.log_image(key="retention/curves", images=[str(self._png)], step=trainer.global_step,
                                     caption=[f"retention after {self.summary['final_step']} steps"])

    def describe(self, trainer: Trainer) -> str:
        """The final table and where the files are."""
        folder, t = self.folder(trainer), self.summary["timings"]
        lines = [format_table(self.summary), "", f"summary: {folder / 'summary.json'}"]
        if self._png is not None:
            lines.append(f"curves:  {self._png}")
        lines.append(f"time: {t['total_s']:.0f} s (select {t.get('select_s', 0):.0f} s, edit {t.get('edit_s', 0):.0f} s, "
                     f"fine-tune {t['fine_tune_s']:.0f} s, measure {t['measure_s']:.0f} s)")
        return "\n".join(lines)
