"""RetentionMonitor: score the edit and control sets at t=0, every k steps and at the end; log retention."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from retention.callbacks.probing import ScoreSettings, measure
from retention.callbacks.t0_cache import measure_t0
from retention.data.selection import KnowledgeSets
from retention.pipeline_contract import Measurement, PipelineCallback
from retention.records import Probe
from retention.scoring import PRECISIONS, ProbeResult, bf16_supported, check_protocols, top1_blind


class RetentionMonitor(PipelineCallback):
    """Measures the probe sets of :class:`~retention.callbacks.apply_edits.ApplyEdits` during fine-tuning.

    t=0 is measured when ApplyEdits has applied the edits (``on_edits_applied``, before the strategy wraps the
    model; without edit and control sets the monitor does nothing; with ``share_t0`` an earlier run's t=0 of the
    same edited model, probes and settings is reused: :mod:`~retention.callbacks.t0_cache`);
    then every ``every_n_steps`` optimizer steps and at the end of training. Logs, per probe group (``edit``,
    ``edit_paraphrase``, ``edit_neighborhood``, ``control``, ``control_paraphrase``) and protocol,
    ``retention/<group>_<protocol>`` (vs t=0) and ``accuracy/<group>_<protocol>``, and keeps the curves (in
    the module's :class:`~retention.pipeline_contract.PipelineState` too, for the report). The state also gets
    its score settings, probes and t=0 results, for a later measurement against t=0 (EditAfterFineTune's).
    """

    def __init__(
        self,
        protocols: Sequence[str] = ("top1", "prob", "gen"),
        every_n_steps: int = 50,
        batch_size: int = 16,
        max_new_tokens: int = 10,
        share_t0: bool = True,
        precision: Literal["32", "bf16", 32] = "32",
    ):
        """
        Args:
            protocols: scoring protocols (docs/design.md): any of top1, prob, token_acc, gen.
            every_n_steps: measure every this many optimizer steps (0: only t=0 and the end).
            batch_size: probes per scoring forward.
            max_new_tokens: greedy tokens generated per probe for the ``gen`` protocol.
            share_t0: reuse the t=0 measurement an earlier run made of the same edited model, probes and
                settings (cached on disk; a study's arms that differ only after editing measure t=0 once).
            precision: ``32`` (YAML may read it as a number), or ``bf16``: score under autocast to bfloat16, on a
                CPU with AVX-512 BF16 or AMX or a GPU with bf16 (independent of ``trainer.precision``: scoring runs
                outside the training step). Retention compares measurements made alike, t=0 included
                (docs/finetuning.md#bf16-on-cpu).
        """
        if every_n_steps < 0:
            raise ValueError(f"monitor.every_n_steps={every_n_steps}: must be >= 0")
        if not protocols:
            raise ValueError("monitor.protocols is empty: retention is measured under at least one protocol "
                             "(top1, prob, token_acc, gen)")
        for flag, value in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens)):
            if value < 1:
                raise ValueError(f"monitor.{flag}={value}: must be >= 1")
        try:
            protocols = check_protocols(protocols)
        except ValueError as e:
            raise ValueError(f"monitor.protocols: {e}") from None
        precision = str(precision)
        if precision not in PRECISIONS:
            raise ValueError(f"monitor.precision={precision!r}: choose from {', '.join(PRECISIONS)}")
        if precision == "bf16" and not (bf16_supported("cpu") or bf16_supported("cuda")):
            raise ValueError(
                "monitor.precision=bf16: this machine computes in bfloat16 nowhere natively (a CPU "
                f"{torch.backends.cpu.get_cpu_capability()} without AVX-512 BF16 or AMX, no GPU with bf16), and "
                "emulated bf16 is slower than float32; set --monitor.precision 32"
            )
        self.settings = ScoreSettings(protocols, batch_size, max_new_tokens, precision)
        self.every_n_steps = every_n_steps
        self.share_t0 = share_t0
        self.probes: list[Probe] = []
        self.baseline: list[ProbeResult] = []
        """This rank's t=0 results (its shard of the probes)."""
        self.measurements: list[Measurement] = []

    @property
    def protocols(self) -> tuple[str, ...]:
        return self.settings.protocols

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        pl_module.pipeline.score_settings = self.settings

    @override
    def on_edits_applied(self, trainer: Trainer, pl_module: LightningModule, sets: KnowledgeSets) -> None:
        self.probes = pl_module.pipeline.probes = sets.probes()
        if not self.probes:
            return
        pl_module.pipeline.protocols = self.protocols
        pl_module.pipeline.measurements = self.measurements
        if "top1" in self.protocols:
            self._flag_top1_blind(pl_module, sets)
        # On one device FSDP1's units hold whole weights (checked on an H200); sharded over several they do not.
        if isinstance(trainer.strategy, FSDPStrategy) and trainer.world_size > 1:
            raise ValueError(
                "RetentionMonitor: probes cannot be scored under FSDP1 (trainer.strategy fsdp) on more than one "
                "device: its units gather their weights only inside the wrapped forward, and scoring reads the "
                "decoder and the head directly; shard with FSDP2 instead (configs/trainer/fsdp2_gpu.yaml)"
            )
        # On a resumed run (the trainer knows its checkpoint already) the checkpoint's curves replace this list
        # afterwards and the loggers have t=0; it is measured again as the baseline of the later measurements.
        args = (pl_module.model, pl_module.tokenizer, self.probes, self.settings)
        if self.share_t0:
            m, self.baseline = measure_t0(*args, pl_module.pipeline)
        else:
            m, self.baseline = measure(*args, 0)
            pl_module.pipeline.stats["t0_reused"] = 0
        pl_module.pipeline.baseline = self.baseline
        self._record(trainer, m, log=trainer.ckpt_path is None)

    @staticmethod
    def _flag_top1_blind(pl_module: LightningModule, sets: KnowledgeSets) -> None:
        """Count (``top1_blind_edits``) and warn about edit records ``top1`` cannot judge: their new and true
        targets share the first token (:func:`~retention.scoring.top1_blind`)."""
        blind = top1_blind(pl_module.tokenizer, sets.edit)
        pl_module.pipeline.stats["top1_blind_edits"] = len(blind)
        if blind:
            rank_zero_warn(
                f"{len(blind)} of {len(sets.edit)} edit records (case ids {', '.join(blind[:5])}"
                f"{', ...' if len(blind) > 5 else ''}) have target_new and target_true with the same first token: "
                "top1 cannot tell their edit from no edit; read their retention under prob or gen"
            )

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self._last_step():
            self._measure(trainer, pl_module)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_step != self._last_step():
            self._measure(trainer, pl_module)

    def _last_step(self) -> int:
        return self.measurements[-1].step if self.measurements else -1

    def _measure(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.probes:
            return  # no edit or control set (plain fine-tuning)
        m, _ = measure(pl_module.model, pl_module.tokenizer, self.probes, self.settings, trainer.global_step,
                       self.baseline)
        self._record(trainer, m)

    def _record(self, trainer: Trainer, m: Measurement, log: bool = True) -> None:
        self.measurements.append(m)
        if not log:
            return
        metrics = {
            f"{name}/{group}_{protocol}": r["value"]
            for name in ("retention", "accuracy")
            for group, by_protocol in m.rates[name].items()
            for protocol, r in by_protocol.items()
            if not math.isnan(r["value"])
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=m.step)
        parts = []
        for group in ("edit", "control"):
            for protocol in self.protocols:
                r = m.rates["retention"].get(group, {}).get(protocol)
                if r is not None:
                    parts.append(f"{group} {protocol} {r['value']:.2f} ({r['count']}/{r['denominator']})")
        rank_zero_info(f"step {m.step}: measured {len(self.probes)} probes in {m.seconds:.1f} s; retention "
                       + ", ".join(parts))

    @override
    def state_dict(self) -> dict:
        return {"measurements": [m.to_dict() for m in self.measurements]}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        # In place: the module's PipelineState holds this list.
        self.measurements[:] = [
            Measurement(d["step"], {k: d[k] for k in ("accuracy", "retention")}, d["seconds"])
            for d in state_dict["measurements"]
        ]
