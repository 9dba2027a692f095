"""Training throughput: FineTuneModule under ``Trainer.fit`` vs a plain PyTorch loop.

Same model (the default SmolLM2-135M, full fine-tuning), same fixed batch of 4 x 128 tokens, same AdamW
(param groups and constant schedule from ``retention.modules.finetune``); the plain loop takes the loss from
the Hugging Face model (``labels=``), as a hand-written loop would. Each timed run is a fresh ``Trainer.fit``
of ``STEPS`` steps (its setup included) or ``STEPS`` plain steps, interleaved, after one warm-up run of each.
On a machine shared with other work, run it with ``OMP_NUM_THREADS=1``: with 2 threads on 2 oversubscribed
cores, the same step's time varied up to 5x from run to run.
"""

from __future__ import annotations

import logging

import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from bench.common import interleaved_medians
from retention.models import load_model
from retention.modules.finetune import FineTuneModule, OptimizerArgs, lr_factor, param_groups

BATCH, LENGTH, STEPS, REPEATS = 4, 128, 4, 3
TARGET = 0.95


def random_batch(vocab_size: int, batch: int, length: int) -> dict[str, torch.Tensor]:
    """A fixed (seeded) batch of random token ids, every position labelled."""
    ids = torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def fit_steps(module: FineTuneModule, batch: dict[str, torch.Tensor], steps: int, precision: str = "32-true") -> None:
    """A fresh ``Trainer.fit`` of ``steps`` optimizer steps on ``batch`` (setup included), on the CPU."""
    trainer = Trainer(
        accelerator="cpu", devices=1, max_steps=steps, precision=precision, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )
    trainer.fit(module, DataLoader([batch] * steps, batch_size=None))


def run() -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    model, tok = load_model("smollm2-135m")
    batch = random_batch(model.config.vocab_size, BATCH, LENGTH)
    args = OptimizerArgs(lr=1e-5, schedule="constant")
    module = FineTuneModule.from_model(model, tok, optimizer=args)
    module.configure_model()

    def plain() -> None:
        model.train()
        optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=args.betas)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, args.warmup_steps, None, args.schedule))
        for _ in range(STEPS):
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

    print(f"full fine-tuning of smollm2-135m, batch {BATCH}x{LENGTH}, {STEPS} steps per run, "
          f"median of {REPEATS} interleaved runs, {torch.get_num_threads()} threads")
    med = interleaved_medians({"plain PyTorch loop": plain,
                               "Lightning Trainer.fit": lambda: fit_steps(module, batch, STEPS)}, repeats=REPEATS)
    tokens = BATCH * LENGTH * STEPS
    for name, t in med.items():
        print(f"{name:>22}: {tokens / t:7.1f} tokens/s  ({t:.1f} s for {STEPS} steps)")
    ratio = med["plain PyTorch loop"] / med["Lightning Trainer.fit"]
    verdict = "meets" if ratio >= TARGET else "below"
    print(f"Lightning / plain throughput: {ratio:.3f}x ({verdict} the {TARGET}x target)")
