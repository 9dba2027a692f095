"""Causal-LM fine-tuning of a (possibly edited) model as a LightningModule: full, LoRA or DoRA.

Gradient clipping, precision, max steps/epochs and the validation cadence are Trainer flags
(``--trainer.gradient_clip_val 1.0``, ``--trainer.max_steps 50``, ``--trainer.val_check_interval 25``).

The module follows the pipeline contract (:mod:`retention.pipeline_contract`): ``configure_model`` checks the
order of the pipeline callbacks, loads the base model (unless one was given), calls their
``on_base_model_ready(trainer, pl_module)`` in callback order (ApplyEdits edits and writes the edited layers to
``self.pipeline``, FreezeLayers adds the frozen layers), adds adapters on the layers that are not frozen, and
turns off gradients of the frozen layers, all before the strategy wraps the model.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn
from torchmetrics import MeanMetric
from typing_extensions import override

from retention.arch import ArchAdapter, unwrap_model
from retention.distributed import all_reduce_sum, gathered_root, is_sharded
from retention.models import DEFAULT_MODEL, load_model
from retention.modules.export import check_exportable, write_model
from retention.pipeline_contract import PipelineState, check_order

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
MAX_SANE_LR = 1.0
"""Above this ``optimizer.lr`` gets a warning (fine-tuning rates are ~1e-6 to 1e-3)."""


@dataclass
class AdapterArgs:
    """What to train: all weights or peft adapters."""

    method: Literal["full", "lora", "dora"] = "full"
    """``full`` fine-tuning, or ``lora`` / ``dora`` adapters (peft)."""
    rank: int = 8
    """LoRA/DoRA rank r."""
    alpha: float = 16.0
    """LoRA/DoRA scaling numerator (the update is scaled by alpha / rank)."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: list[str] | None = None
    """Names (suffixes) of the modules that get adapters, e.g. ``[q_proj, v_proj]``; None for every linear
    projection inside the decoder layers (attention and MLP)."""
    target_layers: list[int] | None = None
    """Decoder layers that get adapters (peft ``layers_to_transform``); None for all. Frozen layers are always
    skipped."""

    def __post_init__(self) -> None:
        if self.method not in ("full", "lora", "dora"):
            raise ValueError(f"adapter.method: unknown method {self.method!r}; choose full, lora or dora")
        if self.rank < 1:
            raise ValueError(f"adapter.rank must be at least 1, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"adapter.dropout must be in [0, 1), got {self.dropout}")
        if self.method == "full" and self.target_layers is not None:
            raise ValueError(
                "adapter.target_layers applies to lora/dora; to restrict full fine-tuning to some layers, "
                "freeze the others (FreezeLayers callback)"
            )


@dataclass
class OptimizerArgs:
    """AdamW with a linear warmup, then a cosine decay to zero or a constant learning rate."""

    lr: float = 5e-5
    """Peak learning rate (LoRA/DoRA usually want ~1e-4 to 1e-3)."""
    weight_decay: float = 0.0
    """AdamW weight decay, applied to matrices only (not to biases, norms or DoRA magnitudes)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup from lr/(warmup_steps) to lr."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """After warmup: ``cosine`` decay to zero at the last step (``trainer.max_steps``/``max_epochs``), or
    ``constant``."""

    def __post_init__(self) -> None:
        check_learning_rate("--model.optimizer.lr", self.lr)
        if self.warmup_steps < 0:
            raise ValueError(f"optimizer.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"optimizer.schedule: unknown schedule {self.schedule!r}; choose cosine or constant")


def check_learning_rate(flag: str, lr: float) -> None:
    """Raise ValueError naming ``flag`` unless ``lr`` is a positive finite number; warn above :data:`MAX_SANE_LR`."""
    if not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"{flag} must be a positive finite number, got {lr}")
    if lr > MAX_SANE_LR:
        log.warning("%s=%g is above %g: optimizer steps that large usually wreck the model (NaN weights)", flag, lr,
                    MAX_SANE_LR)


def lr_factor(step: int, warmup_steps: int, total_steps: int | None, schedule: str) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based).

    Warmup is ``(step + 1) / warmup_steps``: the first step trains at ``lr / warmup_steps`` and step
    ``warmup_steps - 1`` at the full rate. Written here rather than taken from ``transformers``
    (``get_constant_schedule_with_warmup``, ``get_cosine_schedule_with_warmup``) because their warmup is
    ``step / warmup_steps``: one step behind, with a first step at learning rate 0 that moves nothing. With
    ``warmup_steps > 0`` every warmup step would differ, and with it every result already reported (``make demo``
    warms up for 5 steps). From ``warmup_steps`` on both give the same floats, bit for bit: the constant 1.0, and
    the cosine (``num_cycles=0.5``: ``cos(pi * 0.5 * 2.0 * progress)`` is ``cos(pi * progress)`` exactly)
    up to the last step; past it (not reached under ``max_steps``) this one stays at 0 where theirs rises again.
    ``tests/test_finetune.py`` checks both facts."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two AdamW groups: matrices with weight decay, vectors without."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (every layer frozen?)")
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token negative log-likelihood over labelled positions, and their count."""
    # Shift the labels left rather than slicing the logits: no copy of the [batch, length, vocab] tensor.
    shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].flatten()
    total = F.cross_entropy(logits.flatten(0, 1).float(), shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total, (shift_labels != IGNORE_INDEX).sum()


def _linear_module_names(adapter: ArchAdapter) -> list[str]:
    """Names of the linear projections inside a decoder layer (``nn.Linear`` or GPT-2's ``Conv1D``)."""
    return sorted({
        name.rsplit(".", 1)[-1]
        for name, module in adapter.layer(0).named_modules()
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
    })


def _plain(args) -> dict:
    """A dataclass as YAML-safe values (tuples as lists) for the loggers' hyperparameters."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(args).items()}


def _layer_indices(arch: ArchAdapter, layers) -> list[int]:
    """Sorted non-negative indices of ``layers`` (negative ones count from the end); out of range raises."""
    for i in layers:
        arch.layer(i)
    return sorted({i % arch.num_layers for i in layers})


class FineTuneModule(LightningModule):
    """Fine-tunes a causal LM on a task's batches (``input_ids``, ``attention_mask``, ``labels`` with -100 on
    positions that carry no loss, e.g. prompts and padding).

    Logs ``train/loss``, ``train/lr``, ``val/loss`` (token-weighted mean NLL), ``val/ppl`` and, when the
    datamodule's task defines an accuracy, ``val/<metric>`` from the task's evaluator.
    """

    def __init__(
        self,
        model_name: str = DEFAULT_MODEL,
        adapter: AdapterArgs = AdapterArgs(),  # noqa: B008 (frozen by copying below; shown in --print_config)
        optimizer: OptimizerArgs = OptimizerArgs(),  # noqa: B008
        task_eval_limit: int | None = 100,
        activation_checkpointing: bool = False,
    ):
        """
        Args:
            model_name: Base model: ``smollm2-135m`` (default), ``tiny-llama``, ``tiny-gpt2``, a local folder,
                a ``.gguf`` file or a Hugging Face hub id (loaded with ``retention.models.load_model``).
            adapter: Full fine-tuning or LoRA/DoRA adapters.
            optimizer: AdamW and its learning-rate schedule.
            task_eval_limit: Task accuracy (math, classify) on at most this many validation examples at each
                validation end (generation is slow on CPU); None for all, 0 to skip.
            activation_checkpointing: Recompute each decoder layer's activations in the backward pass instead of
                storing them (less memory, about a third more compute), under any strategy.
        """
        super().__init__()
        self.model_name = model_name
        self.adapter = replace(adapter)
        self.optim = replace(optimizer)
        self.task_eval_limit = task_eval_limit
        self.activation_checkpointing = activation_checkpointing
        self.save_hyperparameters({
            "model_name": model_name, "adapter": _plain(self.adapter), "optimizer": _plain(self.optim),
            "task_eval_limit": task_eval_limit, "activation_checkpointing": activation_checkpointing,
        })
        self.model: nn.Module | None = None
        self.tokenizer = None
        self.pipeline = PipelineState()
        """What the pipeline callbacks hand each other (edit and control sets, edited and frozen layers, ...)."""
        self.validations: list[dict[str, float]] = []
        """One entry per validation pass: ``step`` and the logged ``val/*`` values (what the CLI reports)."""
        self.train_tokens = 0
        """Input tokens (padding excluded) trained on so far, on this rank."""
        self.val_loss = MeanMetric(nan_strategy=math.nan, dist_sync_fn=all_reduce_sum).set_dtype(torch.float64)
        """Token-weighted mean validation NLL of the current pass (batch means weighted by their labelled tokens;
        ``nan_strategy=nan`` keeps a NaN loss NaN: the collapse check reads it)."""
        self._val_batches: int | None = None
        """Under FSDP2: the extra validation forwards this rank runs in the current pass (others have more batches)."""
        self._ready = False

    @classmethod
    def from_model(cls, model: nn.Module, tokenizer, **kwargs) -> FineTuneModule:
        """A module around an already-built model (tests, notebooks, a model edited outside Lightning)."""
        module = cls(model_name=getattr(model, "name_or_path", "") or type(model).__name__, **kwargs)
        module.model, module.tokenizer = model, tokenizer
        return module

    # -- model preparation (the contract) --------------------------------------------------------------

    @override
    def configure_model(self) -> None:
        if self._ready:
            return
        trainer = self._trainer
        pipeline = check_order(trainer.callbacks) if trainer is not None else []
        if self.model is None:
            # Straight onto this rank's device, so the edits (run below, before the strategy wraps the model) use
            # the accelerator; float32 weights, which the precision plugin casts or autocasts as configured.
            device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
            self.model, self.tokenizer = load_model(self.model_name, dtype=torch.float32, device=device)
        # Lightning runs configure_model under the strategy's default-device context (cuda:N on a GPU). The editing
        # and scoring code keeps its bookkeeping on the host and moves model inputs to the model's device itself,
        # as in `retention edit`, so the callbacks run with the host as the default device.
        with torch.device("cpu"):
            for callback in pipeline:
                callback.on_base_model_ready(trainer, self)
        arch = ArchAdapter.for_model(self.model)
        frozen = _layer_indices(arch, self.pipeline.frozen_layers)
        if self.adapter.method != "full":
            self.model = self._add_adapters(self.model, arch, frozen)
        for i in frozen:
            arch.layer(i).requires_grad_(False)
        if self.activation_checkpointing:
            unwrap_model(self.model).gradient_checkpointing_enable({"use_reentrant": False})
        self.model.train()
        self._distribute(trainer, arch)
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in self.model.parameters())
        log.info("%s fine-tuning: %d of %d parameters trainable, frozen layers %s",
                 self.adapter.method, n_train, n_all, frozen or "none")
        self._ready = True

    def _distribute(self, trainer, arch: ArchAdapter) -> None:
        """Shard (FSDP2) or name the wrap units (FSDP1) per decoder layer, so a frozen layer is its own unit."""
        strategy = trainer.strategy if trainer is not None else None
        if isinstance(strategy, ModelParallelStrategy):
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh
            if mesh["tensor_parallel"].size() != 1:
                raise ValueError(
                    f"ModelParallelStrategy: tensor_parallel_size={mesh['tensor_parallel'].size()}, but retention "
                    "shards with FSDP2 only: set tensor_parallel_size: 1 and data_parallel_size to the number of "
                    "devices (configs/trainer/fsdp2_gpu.yaml)"
                )
            for layer in arch.layers:
                fully_shard(layer, mesh=mesh["data_parallel"])
            fully_shard(self.model, mesh=mesh["data_parallel"])
            self._val_batches = 0
        elif isinstance(strategy, FSDPStrategy) and "auto_wrap_policy" not in strategy.kwargs:
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy

            strategy.kwargs["auto_wrap_policy"] = ModuleWrapPolicy({type(arch.layer(0))})

    def _add_adapters(self, model: nn.Module, arch: ArchAdapter, frozen: list[int]) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        a = self.adapter
        wanted = range(arch.num_layers) if a.target_layers is None else _layer_indices(arch, a.target_layers)
        layers = sorted(set(wanted) - set(frozen))
        if not layers:
            raise ValueError(
                f"no layer left for {a.method} adapters: adapter.target_layers={a.target_layers} "
                f"are all frozen (frozen layers {frozen})"
            )
        config = LoraConfig(
            r=a.rank, lora_alpha=a.alpha, lora_dropout=a.dropout, use_dora=a.method == "dora",
            target_modules=a.target_modules or _linear_module_names(arch), layers_to_transform=layers,
            layers_pattern=arch.layer_name(0).rsplit(".", 2)[-2], task_type="CAUSAL_LM",
        )
        return get_peft_model(model, config)

    # -- steps -----------------------------------------------------------------------------------------

    @override
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def _common_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token NLL of a batch over its labelled tokens, and their number."""
        logits = self(batch["input_ids"], batch.get("attention_mask"))
        return token_nll(logits, batch["labels"])

    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        total, count = self._common_step(batch)
        loss = total / count.clamp(min=1)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss ({loss.item()}) at step {self.global_step}, batch {batch_idx}: "
                f"lower optimizer.lr (now {self.optim.lr}), add warmup or gradient clipping "
                "(trainer.gradient_clip_val), or check the data and the precision"
            )
        mask = batch.get("attention_mask")
        self.train_tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        return loss

    @override
    def on_validation_epoch_start(self) -> None:
        # States made afresh each pass: a validate() runs in inference mode and validation inside fit does not,
        # and state carried from one into the other could not be updated in place.
        self.val_loss.reset()
        if self._val_batches is not None:
            # Sharded forwards are collectives: a rank with fewer validation batches repeats its last one,
            # uncounted, right after it, until it has run as many forwards as the rank with the most.
            mine = int(sum(self.trainer.num_val_batches))
            most = self.trainer.strategy.reduce(torch.tensor(mine, device=self.device), reduce_op="max")
            self._val_batches = int(most) - mine

    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        total, count = self._common_step(batch)
        self.val_loss.update(total.double() / count.clamp(min=1), weight=count)
        last = self.trainer.num_val_batches
        if self._val_batches and (dataloader_idx, batch_idx) == (len(last) - 1, last[-1] - 1):
            for _ in range(self._val_batches):
                self._common_step(batch)

    @override
    def on_validation_epoch_end(self) -> None:
        with self.val_loss.sync_context():  # every rank calls it: the labelled tokens over ranks
            if not self.val_loss.weight:
                return
        loss = float(self.val_loss.compute())  # over ranks; cached for the log below
        metrics = {"val/loss": loss, "val/ppl": math.exp(min(loss, 80.0))}
        if not self.trainer.sanity_checking:
            metrics.update(self._task_metrics())
        self.log("val/loss", self.val_loss, prog_bar=True)
        for name, value in list(metrics.items())[1:]:
            self.log(name, value, prog_bar=name != "val/ppl")
        if not self.trainer.sanity_checking:
            self.validations.append({"step": self.global_step, **metrics})

    def _task_metrics(self) -> dict[str, float]:
        task = getattr(self.trainer.datamodule, "task", None)
        if task is None or not task.has_accuracy or self.task_eval_limit == 0:
            return {}
        with gathered_root(self.model):
            result = task.evaluate(self.model, self.tokenizer, n=self.task_eval_limit)
        return {f"val/{name}": float(value) for name, value in result.items()}

    # -- checkpoints -----------------------------------------------------------------------------------

    def _frozen_parameter_names(self) -> set[str]:
        return {f"model.{n}" for n, p in self.model.named_parameters() if not p.requires_grad}

    @override
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """A light checkpoint: trainable weights only (frozen base weights, edited or not, are rebuilt on resume:
        loaded again and edited again by ApplyEdits, which restores the edited ones from its own state), plus what
        the report needs to go on as if never stopped: trained tokens, the validation history, the RNG states.

        Under FSDP2 every weight is kept: each rank writes its own shards, and the strategy loads the weights
        (before ``on_load_checkpoint``) expecting all of them."""
        if not is_sharded(self.model):
            frozen = self._frozen_parameter_names()
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}
        checkpoint["retention"] = {
            "train_tokens": self.train_tokens, "validations": self.validations,
            "rng": {"torch": torch.get_rng_state(), "random": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        }

    @override
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Under FSDP2 the strategy has loaded every weight already (strictly) and took them out of ``checkpoint``.
        if not is_sharded(self.model):
            missing = set(self.state_dict()) - set(checkpoint["state_dict"]) - self._frozen_parameter_names()
            if missing:
                raise ValueError(
                    f"the checkpoint lacks {len(missing)} trainable weights of this run (e.g. {sorted(missing)[:3]}): "
                    "was it written by a run with other adapter or freeze settings?"
                )
            self.strict_loading = False  # the frozen weights are not in a light checkpoint (checked above)
        state = checkpoint.get("retention")
        if state is not None:
            self.train_tokens, self.validations = state["train_tokens"], state["validations"]
            torch.set_rng_state(state["rng"]["torch"])
            random.setstate(state["rng"]["random"])
            if state["rng"]["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    # -- optimisation ----------------------------------------------------------------------------------

    @override
    def on_train_start(self) -> None:
        """A resumed run trains with its own optimizer settings: the optimizer and scheduler states restored
        from the checkpoint carry the learning rate, betas and weight decay they were written with, which
        differ when the resume was allowed to change them (``run.resume_changes``). Unchanged, this sets the
        same floats."""
        if self.trainer.ckpt_path is None:
            return
        o = self.optim
        optimizer = self.optimizers(use_pl_optimizer=False)
        scheduler = self.lr_schedulers()
        scheduler.base_lrs = [o.lr] * len(optimizer.param_groups)
        # The groups of param_groups(): matrices with weight decay, then vectors without.
        for i, (group, decay) in enumerate(zip(optimizer.param_groups, (o.weight_decay, 0.0))):
            group.update(lr=o.lr * scheduler.lr_lambdas[i](scheduler.last_epoch), initial_lr=o.lr,
                         betas=tuple(o.betas), weight_decay=decay)

    @override
    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # FSDP1's precision plugin refuses norm clipping; the wrapped module clips by the norm over all shards.
        clip_grad_norm = getattr(self.trainer.model, "clip_grad_norm_", None)
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm") and callable(clip_grad_norm):
            clip_grad_norm(gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    optimizer_init: dict | None = None
    """``--optimizer`` (its ``class_path`` and ``init_args``) to train with instead of AdamW (``retention fit``
    sets it; the optimizer's own defaults apply, so ``model.optimizer.weight_decay`` and betas do not)."""
    lr_scheduler_init: dict | None = None
    """``--lr_scheduler`` to step every optimizer step instead of the warmup and ``model.optimizer.schedule``."""

    @override
    def configure_optimizers(self):
        from lightning.pytorch.cli import instantiate_class

        o = self.optim
        if self.optimizer_init is None:
            optimizer = torch.optim.AdamW(param_groups(self.model, o.weight_decay), lr=o.lr, betas=tuple(o.betas))
        else:
            groups = [{"params": g["params"]} for g in param_groups(self.model, 0.0)]
            optimizer = instantiate_class(groups, self.optimizer_init)
        if self.lr_scheduler_init is not None:
            scheduler = instantiate_class(optimizer, self.lr_scheduler_init)
            config = {"scheduler": scheduler, "interval": "step"}
            if hasattr(scheduler, "monitor"):  # ReduceLROnPlateau: the metric it watches
                config["monitor"] = scheduler.monitor
            return {"optimizer": optimizer, "lr_scheduler": config}
        total = None
        if o.schedule == "cosine":
            total = self.trainer.estimated_stepping_batches
            if not math.isfinite(total):
                raise ValueError(
                    "optimizer.schedule=cosine needs a finite run: set trainer.max_steps or trainer.max_epochs "
                    "(or use optimizer.schedule=constant)"
                )
        # Our warmup, not transformers' (one step ahead of theirs; see lr_factor).
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, o.warmup_steps, total, o.schedule)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- export ----------------------------------------------------------------------------------------

    def _plain_copy(self) -> nn.Module | None:
        """A standalone copy of ``self.model`` (adapters unmerged); under FSDP2 the full weights are gathered
        (a collective: every rank calls this) into a freshly loaded model on rank 0, and other ranks get None."""
        if not is_sharded(self.model):
            return copy.deepcopy(self.model)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.global_rank != 0:
            return None
        model, _ = load_model(self.model_name, dtype=torch.float32)
        if self.adapter.method != "full":
            arch = ArchAdapter.for_model(model)
            model = self._add_adapters(model, arch, _layer_indices(arch, self.pipeline.frozen_layers))
        model.load_state_dict(state)
        return model

    def merged_model(self) -> nn.Module | None:
        """A standalone copy of the fine-tuned model with any adapters merged into its weights (None on ranks
        other than 0 under FSDP2)."""
        model = self._plain_copy()
        if model is not None and hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        return None if model is None else unwrap_model(model).eval()

    def export(self, path: str | Path) -> Path:
        """Save the fine-tuned (merged) model and its tokenizer as a folder that ``load_model`` and transformers
        read; with LoRA/DoRA also the model fine-tuning started from (after the edits) in ``<path>/base`` and the
        peft adapter over it in ``<path>/adapter`` (:mod:`retention.modules.export`). Call it on every rank: rank 0
        writes, a sharded (FSDP2) model is gathered first."""
        t0 = time.perf_counter()
        check_exportable(self.model)  # before gathering: a sharded model's copy is loaded afresh, without memory
        path = Path(path)
        if self.global_rank != 0 and not is_sharded(self.model):
            return path
        model = self._plain_copy()
        if model is None:
            return path
        write_model(model, self.tokenizer, path)
        log.info("exported the fine-tuned model to %s (%.1f s)", path, time.perf_counter() - t0)
        return path
