"""FineTuneModule, its schedule, the pipeline contract (hook, adapters, freezing), StopOnValLoss and `retention fit`."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader

from retention.arch import ArchAdapter
from retention.callbacks.stopping import StopOnValLoss
from retention.models import load_model
from retention.modules.finetune import AdapterArgs, FineTuneModule, OptimizerArgs, lr_factor, token_nll
from retention.pipeline_contract import PipelineCallback


def _batches(vocab: int, n: int = 4, length: int = 16) -> list[dict[str, torch.Tensor]]:
    """A tiny in-memory dataset: fixed random sequences, loss on every token."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def _collate(items):
    ids = torch.stack([it["input_ids"] for it in items])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.stack([it["labels"] for it in items])}


def _loader(model, **kw) -> DataLoader:
    return DataLoader(_batches(model.config.vocab_size), batch_size=4, collate_fn=_collate, **kw)


def _trainer(max_steps: int, callbacks=(), **kw) -> Trainer:
    return Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=list(callbacks), **kw,
    )


@torch.no_grad()
def _loss(model, loader) -> float:
    batch = next(iter(loader))
    total, count = token_nll(model(input_ids=batch["input_ids"]).logits, batch["labels"])
    return (total / count).item()


class _Freeze(PipelineCallback):
    """Stands in for the pipeline's FreezeLayers callback: decides frozen layers in the contract hook."""

    def __init__(self, layers):
        self.layers, self.calls = set(layers), 0

    def on_base_model_ready(self, trainer, pl_module):
        self.calls += 1
        assert not hasattr(pl_module.model, "peft_config"), "hook must run before adapters are added"
        pl_module.pipeline.frozen_layers = set(self.layers)


@pytest.mark.parametrize("name,method,lr", [
    ("tiny-llama", "full", 1e-2), ("tiny-llama", "lora", 1e-1), ("tiny-llama", "dora", 1e-1), ("tiny-gpt2", "lora", 1e-1),
])
def test_fine_tuning_reduces_loss(name, method, lr):
    model, tok = load_model(name)
    loader = _loader(model)
    before = _loss(model, loader)
    module = FineTuneModule.from_model(
        model, tok, adapter=AdapterArgs(method=method, rank=4, dropout=0.0),
        optimizer=OptimizerArgs(lr=lr, schedule="constant"),
    )
    _trainer(8).fit(module, loader)
    after = _loss(module.model, loader)
    # The tiny models' tied, small-norm embeddings bound what adapters can move (full fine-tuning moves far more).
    assert after < before - 0.1, (before, after)
    assert module.train_tokens == 8 * 4 * 16


def test_adapters_on_target_layers_only_and_never_on_frozen():
    model, tok = load_model("tiny-llama")
    freeze = _Freeze({0})
    module = FineTuneModule.from_model(model, tok, adapter=AdapterArgs(method="lora", rank=2))
    _trainer(1, [freeze]).fit(module, _loader(model))
    arch = ArchAdapter.for_model(module.model)
    trainable = [n for n, p in module.model.named_parameters() if p.requires_grad]
    assert trainable and all(arch.layer_index_of(n) == 1 and "lora_" in n for n in trainable)
    assert not [n for n, _ in arch.layer(0).named_parameters() if "lora_" in n]
    # every linear projection of the layer is targeted by default
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}

    model, tok = load_model("tiny-llama")
    module = FineTuneModule.from_model(
        model, tok, adapter=AdapterArgs(method="dora", target_layers=[0], target_modules=["v_proj"]))
    module.configure_model()
    trainable = [n for n, p in module.model.named_parameters() if p.requires_grad]
    assert trainable and all(".layers.0.self_attn.v_proj.lora_" in n for n in trainable)

    model, tok = load_model("tiny-llama")
    module = FineTuneModule.from_model(model, tok, adapter=AdapterArgs(method="lora", target_layers=[-2]))
    module.pipeline.frozen_layers = {0}
    with pytest.raises(ValueError, match="no layer left for lora adapters"):
        module.configure_model()


@pytest.mark.parametrize("name,method", [("tiny-llama", "full"), ("tiny-gpt2", "lora")])
def test_frozen_layers_bit_identical_after_training(name, method):
    model, tok = load_model(name)
    arch = ArchAdapter.for_model(model)
    before = {i: {n: p.detach().clone() for n, p in arch.layer(i).state_dict().items()} for i in (0, 1)}
    module = FineTuneModule.from_model(
        model, tok, adapter=AdapterArgs(method=method, rank=2), optimizer=OptimizerArgs(lr=1e-2, weight_decay=0.1))
    _trainer(3, [_Freeze({0})]).fit(module, _loader(model))
    merged = ArchAdapter.for_model(module.merged_model())
    after = {i: merged.layer(i).state_dict() for i in (0, 1)}
    assert all(torch.equal(before[0][n], after[0][n]) for n in before[0])
    assert any(not torch.equal(before[1][n], after[1][n]) for n in before[1])


def test_configure_model_is_idempotent_and_calls_the_hook_once():
    model, tok = load_model("tiny-llama")
    freeze = _Freeze({1})
    trainer = _trainer(1, [freeze])
    module = FineTuneModule.from_model(model, tok, adapter=AdapterArgs(method="lora", rank=2))
    trainer.validate(module, _loader(model), verbose=False)
    peft_model = module.model
    trainer.fit(module, _loader(model))
    assert freeze.calls == 1 and module.model is peft_model
    assert not any(".base_layer.base_layer" in n for n, _ in module.model.named_parameters())
    assert [v["step"] for v in module.validations] == [0]


def test_lr_schedule_warmup_then_cosine_or_constant():
    warm, total = 4, 20
    factors = [lr_factor(s, warm, total, "cosine") for s in range(total)]
    assert factors[:warm] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(a >= b for a, b in zip(factors[warm:], factors[warm + 1:]))
    assert factors[warm] == 1.0 and factors[-1] < 0.01
    assert lr_factor(total + 5, warm, total, "cosine") == 0.0
    assert [lr_factor(s, 2, None, "constant") for s in range(4)] == [0.5, 1.0, 1.0, 1.0]


def test_schedule_drives_the_optimizer():
    model, tok = load_model("tiny-gpt2")
    module = FineTuneModule.from_model(model, tok, optimizer=OptimizerArgs(lr=1e-3, warmup_steps=2))
    seen = []

    class Record(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    _trainer(6, [Record()]).fit(module, DataLoader(_batches(model.config.vocab_size, n=24), batch_size=4,
                                                   collate_fn=_collate))
    expected = [1e-3 * lr_factor(s, 2, 6, "cosine") for s in range(6)]
    assert seen == pytest.approx(expected)


def test_cosine_needs_a_finite_run():
    model, tok = load_model("tiny-llama")
    module = FineTuneModule.from_model(model, tok)
    trainer = _trainer(-1, max_epochs=-1)
    with pytest.raises(ValueError, match="trainer.max_steps"):
        trainer.fit(module, _loader(model))


def test_non_finite_loss_raises():
    model, tok = load_model("tiny-llama")
    with torch.no_grad():
        ArchAdapter.for_model(model).final_norm.weight.fill_(float("nan"))
    module = FineTuneModule.from_model(model, tok)
    with pytest.raises(FloatingPointError, match="non-finite training loss"):
        _trainer(2).fit(module, _loader(model))


def test_validation_logs_token_weighted_loss_and_ppl():
    model, tok = load_model("tiny-llama")
    module = FineTuneModule.from_model(model, tok)
    loader = DataLoader(_batches(model.config.vocab_size, n=6), batch_size=4, collate_fn=_collate)  # 4 + 2 rows
    (metrics,) = _trainer(1).validate(module, loader, verbose=False)
    with torch.no_grad():  # the Hugging Face loss is a per-batch mean over the (length - 1) * rows shifted tokens
        pairs = [(model(**b).loss, b["input_ids"].shape[0] * 15) for b in loader]
    expected = sum(loss * n for loss, n in pairs) / sum(n for _, n in pairs)
    assert metrics["val/loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["val/ppl"] == pytest.approx(math.exp(expected.item()), rel=1e-4)
    labels = torch.tensor([[5, -100, 7, 8]])
    logits = torch.randn(1, 4, 10)
    total, count = token_nll(logits, labels)
    assert count == 2 and total == pytest.approx(
        -(logits[0, 1].log_softmax(-1)[7] + logits[0, 2].log_softmax(-1)[8]).item(), rel=1e-5)


def test_export_merges_adapters(tmp_path):
    model, tok = load_model("tiny-llama")
    module = FineTuneModule.from_model(
        model, tok, adapter=AdapterArgs(method="lora", rank=2), optimizer=OptimizerArgs(lr=1e-2))
    _trainer(2).fit(module, _loader(model))
    module.model.eval()
    path = module.export(tmp_path / "model")
    reloaded, _ = load_model(str(path))
    ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(module(ids), reloaded(input_ids=ids).logits, atol=1e-4)
    assert not any("lora_" in n for n in reloaded.state_dict())


def test_stop_on_val_loss():
    model, tok = load_model("tiny-llama")
    stop = StopOnValLoss(threshold=1e3, check_every_n_steps=3)
    module = FineTuneModule.from_model(model, tok, optimizer=OptimizerArgs(schedule="constant"))
    loader = DataLoader(_batches(model.config.vocab_size, n=40), batch_size=4, collate_fn=_collate)
    val = _loader(model)
    trainer = _trainer(20, [stop])
    trainer.fit(module, loader, val)
    assert stop.stopped_at_step == 3 and trainer.global_step == 3

    stop = StopOnValLoss(threshold=0.0, check_every_n_steps=2)
    module = FineTuneModule.from_model(*load_model("tiny-llama"), optimizer=OptimizerArgs(schedule="constant"))
    trainer = _trainer(5, [stop])
    trainer.fit(module, loader, val)
    assert stop.stopped_at_step is None and trainer.global_step == 5
    assert [v["step"] for v in module.validations] == [2, 4]

    with pytest.raises(ValueError, match="val_check_interval"):
        _trainer(5, [StopOnValLoss(1.0, check_every_n_steps=2)], val_check_interval=3).fit(module, loader, val)


TINY_CONFIG = """
model:
  model_name: tiny-llama
  adapter: {method: lora, rank: 2}
  optimizer: {lr: 1.0e-3, warmup_steps: 1}
data:
  task: {family: classify, source: builtin, limit: 40, max_length: 64}
  batch_size: 4
trainer:
  max_steps: 5
  accelerator: cpu
  enable_progress_bar: false
  enable_model_summary: false
run:
  out_dir: {out_dir}
  wandb: disabled
"""


def test_fit_cli_fine_tunes_and_reports(tmp_path, capsys):
    from retention.cli import main

    base, override = tmp_path / "tiny.yaml", tmp_path / "override.yaml"
    base.write_text(TINY_CONFIG.replace("{out_dir}", str(tmp_path / "runs")))
    override.write_text("trainer: {max_steps: 2, val_check_interval: 1}\nmodel: {adapter: {method: dora}}\n"
                        "run: {name: layered}\n")
    assert main(["fit", "--config", str(base), "--config", str(override)]) == 0
    out = capsys.readouterr().out
    assert "fit: tiny-llama (dora) on classify from builtin: 2 steps" in out
    run = tmp_path / "runs" / "layered"
    assert "method: dora" in (run / "config.yaml").read_text()
    rows = [r for r in csv.DictReader((run / "metrics.csv").open()) if r["val/loss"]]
    assert all(r["val/ppl"] and r["val/accuracy"] for r in rows)
    # validated before training (inference mode), then inside fit (no_grad) after every step; the report
    # labels rows with the global step, the CSV with Lightning's logging step
    report = [line.split() for line in out.splitlines() if line.split()[:1] in (["0"], ["1"], ["2"])]
    assert [r[0] for r in report] == ["0", "1", "2"]
    assert [r[1] for r in report] == [f"{float(r['val/loss']):.4f}" for r in rows]

    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(base), "--print_config"])
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    assert "model_name: tiny-llama" in printed and "use_distributed_sampler: false" in printed


def _scheduled_lrs(optimizer: OptimizerArgs, total: int) -> list[float]:
    """The learning rate of each of ``total`` optimizer steps, from the scheduler configure_optimizers builds."""
    from types import SimpleNamespace

    module = FineTuneModule.from_model(torch.nn.Linear(2, 2), None, optimizer=optimizer)
    module._trainer = SimpleNamespace(estimated_stepping_batches=total)  # all configure_optimizers reads of it
    config = module.configure_optimizers()
    return _stepped_lrs(config["optimizer"], config["lr_scheduler"]["scheduler"], total)


def _stepped_lrs(opt, sched, total: int) -> list[float]:
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_demo_schedule_is_the_documented_one_bit_for_bit():
    # configs/demo.yaml: lr 1e-4, warmup 5, constant, 120 steps. Warmup from lr/5 (not 0), full rate from step 4.
    lrs = _scheduled_lrs(OptimizerArgs(lr=1.0e-4, warmup_steps=5, schedule="constant"), 120)
    assert lrs == [1.0e-4 * ((s + 1) / 5) for s in range(5)] + [1.0e-4] * 115
    assert lrs[:5] == [2e-05, 4e-05, 6e-05, 8e-05, 1e-04]
    # Cosine (configs/fit/*): the same warmup, then 0.5 (1 + cos(pi (s - w) / (T - w))).
    lrs = _scheduled_lrs(OptimizerArgs(lr=3.0e-4, warmup_steps=5, schedule="cosine"), 120)
    assert lrs == [3.0e-4 * ((s + 1) / 5) for s in range(5)] + [
        3.0e-4 * (0.5 * (1.0 + math.cos(math.pi * ((s - 5) / 115)))) for s in range(5, 120)
    ]


@pytest.mark.parametrize(("schedule", "warmup", "total"), [
    ("constant", 5, 120), ("constant", 3, 120), ("constant", 0, 120),
    ("cosine", 5, 120), ("cosine", 10, 120), ("cosine", 20, 60), ("cosine", 0, 120),
])
def test_schedule_against_transformers(schedule, warmup, total):
    """Why lr_factor is ours: transformers' warmup is one step behind (it starts at 0); from the end of warmup on
    the two give the same floats."""
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    ours = _scheduled_lrs(OptimizerArgs(lr=1.0e-4, warmup_steps=warmup, schedule=schedule), total)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0e-4)
    if schedule == "constant":
        sched = get_constant_schedule_with_warmup(opt, warmup)
    else:
        sched = get_cosine_schedule_with_warmup(opt, warmup, total)
    theirs = _stepped_lrs(opt, sched, total)
    assert ours[warmup:] == theirs[warmup:]
    if warmup:
        assert theirs[:warmup] == [0.0, *ours[:warmup - 1]]
        assert ours[0] == 1.0e-4 / warmup


def test_lightning_hooks_carry_override():
    """Every method a class defines that a base class also has is marked @override, and only those."""
    import inspect

    from retention.callbacks.augmentation import ParaphraseAugmentation
    from retention.callbacks.checkpoint import LastCheckpoint
    from retention.callbacks.freeze import FreezeLayers
    from retention.data.datamodule import TaskDataModule

    for cls in (FineTuneModule, StopOnValLoss, LastCheckpoint, TaskDataModule, FreezeLayers, ParaphraseAugmentation):
        for name, member in vars(cls).items():
            if not inspect.isfunction(member) or name.startswith("__"):
                continue
            inherited = any(hasattr(base, name) for base in cls.__mro__[1:])
            assert getattr(member, "__override__", False) == inherited, f"{cls.__name__}.{name}"
