"""`FineTuneModule.export` of a LoRA run: the merged model, and the peft adapter alone in ``<path>/adapter``, which
``PeftModel.from_pretrained`` loads onto the base model to the same logits."""

from __future__ import annotations

import copy

import torch
from lightning.pytorch import Trainer
from peft import PeftModel
from torch.utils.data import DataLoader

from retention.models import load_model
from retention.modules.finetune import AdapterArgs, FineTuneModule, OptimizerArgs


def test_lora_export_writes_an_adapter_that_peft_loads_to_the_merged_model(tmp_path):
    model, tok = load_model("tiny-llama")
    base = copy.deepcopy(model)
    module = FineTuneModule.from_model(model, tok, adapter=AdapterArgs(method="lora", rank=2),
                                       optimizer=OptimizerArgs(lr=1e-2, schedule="constant"))
    ids = torch.randint(0, model.config.vocab_size, (8, 12), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in ids]
    Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False).fit(module, DataLoader(batches, batch_size=4))
    path = module.export(tmp_path / "model")
    assert (path / "adapter" / "adapter_config.json").is_file()
    assert (path / "adapter" / "adapter_model.safetensors").is_file()
    probe = ids[:2, :8]
    with torch.no_grad():
        before = base(input_ids=probe).logits
    merged, _ = load_model(str(path))
    adapted = PeftModel.from_pretrained(base, str(path / "adapter")).eval()
    with torch.no_grad():
        after = merged(input_ids=probe).logits
        torch.testing.assert_close(adapted(input_ids=probe).logits, after, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(before, after, atol=1e-3)  # the adapter was trained: not base against base


def test_full_fine_tuning_exports_no_adapter(tmp_path):
    model, tok = load_model("tiny-llama")
    path = FineTuneModule.from_model(model, tok).export(tmp_path / "model")
    assert (path / "config.json").is_file() and not (path / "adapter").exists()
