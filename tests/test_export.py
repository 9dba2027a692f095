"""`FineTuneModule.export`: the merged model, and with LoRA/DoRA the edited base and the peft adapter over it, which
plain transformers + peft load in a fresh process (no retention import) to the merged model's logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from retention.models import load_model
from retention.modules.finetune import AdapterArgs, FineTuneModule, OptimizerArgs

LOAD_PLAIN = """
import json, sys
import torch
from peft import AutoPeftModelForCausalLM
from transformers import AutoModelForCausalLM

path, ids = sys.argv[1], torch.tensor(json.loads(sys.argv[2]))
merged = AutoModelForCausalLM.from_pretrained(path).eval()
adapted = AutoPeftModelForCausalLM.from_pretrained(path + "/adapter").eval()
with torch.no_grad():
    delta = (adapted(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max().item()
print(json.dumps({"max_abs_delta": delta, "retention_imported": any(m.startswith("retention") for m in sys.modules)}))
"""


def load_in_fresh_process(path, ids: torch.Tensor) -> dict:
    """Load ``path/adapter`` over the base it names and ``path`` with plain transformers + peft in a new Python
    process; the max |difference| of their logits on ``ids``."""
    proc = subprocess.run([sys.executable, "-c", LOAD_PLAIN, str(path), json.dumps(ids.tolist())],
                          capture_output=True, text=True, timeout=300, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def fine_tuned(method: str) -> tuple[FineTuneModule, torch.Tensor]:
    """tiny-llama with a stand-in edit (layer 1's MLP output moved), then 2 steps of ``method`` fine-tuning."""
    model, tok = load_model("tiny-llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.add_(0.05)
    module = FineTuneModule.from_model(model, tok, adapter=AdapterArgs(method=method, rank=2),
                                       optimizer=OptimizerArgs(lr=1e-2, schedule="constant"))
    ids = torch.randint(0, model.config.vocab_size, (8, 12), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in ids]
    Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False).fit(module, DataLoader(batches, batch_size=4))
    return module, ids[:2, :8]


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_adapter_loads_onto_the_edited_base_in_a_fresh_process(tmp_path, method):
    module, probe = fine_tuned(method)
    path = module.export(tmp_path / "model")
    config = json.loads((path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((path / "base").resolve())
    # The saved base is the edited one: the stand-in edit is in it, the adapters are not.
    base, _ = load_model(str(path / "base"))
    expected = module.model.get_base_model().model.layers[1].mlp.down_proj
    torch.testing.assert_close(base.model.layers[1].mlp.down_proj.weight, expected.base_layer.weight, rtol=0, atol=0)
    loaded = load_in_fresh_process(path, probe)
    assert not loaded["retention_imported"]
    assert loaded["max_abs_delta"] < 1e-4, loaded
    # Without the edited base the adapter gives other logits: the unedited model plus the adapter is not the run.
    merged, _ = load_model(str(path))
    unedited, _ = load_model("tiny-llama")
    from peft import PeftModel

    with torch.no_grad():
        wrong = PeftModel.from_pretrained(unedited, str(path / "adapter")).eval()(input_ids=probe).logits
        assert (wrong - merged(input_ids=probe).logits).abs().max() > 1e-2


def test_export_replaces_the_folder_whole_and_leaves_nothing_behind_when_it_fails(tmp_path, monkeypatch):
    module, _ = fine_tuned("lora")
    path = module.export(tmp_path / "model")
    umask = os.umask(0)
    os.umask(umask)
    written = sorted(p.relative_to(path) for p in path.rglob("*"))
    assert {"adapter", "base", "config.json", "model.safetensors"} <= {str(p) for p in written}
    for p in path.rglob("*.safetensors"):
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, p

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(module.tokenizer, "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        module.export(path)
    assert sorted(p.relative_to(path) for p in path.rglob("*")) == written  # the earlier export, untouched
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary left


def test_full_fine_tuning_exports_no_adapter(tmp_path):
    model, tok = load_model("tiny-llama")
    path = FineTuneModule.from_model(model, tok).export(tmp_path / "model")
    assert (path / "config.json").is_file() and not (path / "adapter").exists() and not (path / "base").exists()


def test_a_fit_run_with_edits_exports_an_adapter_over_its_edited_base(tmp_path, tiny_llama):
    """`retention fit` with ROME edits, LoRA and `run.save_model`: the adapter over the saved base is the run's
    model, and over the unedited base it is not."""
    import yaml
    from tiny_runs import fit_config, prepare

    from retention.commands.fit import main

    prepare(tmp_path, tiny_llama[1])
    config = fit_config(tmp_path, "lora", protocols=["prob"])
    config["model"]["adapter"] = {"method": "lora", "rank": 2}
    config["run"]["save_model"] = True
    (tmp_path / "lora.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main(["--config", str(tmp_path / "lora.yaml")]) == 0
    path = tmp_path / "runs" / "lora" / "model"
    probe = torch.arange(2, 18).reshape(2, 8)
    loaded = load_in_fresh_process(path, probe)
    assert loaded["max_abs_delta"] < 1e-4, loaded
    print(f"edited base + adapter vs model/: max |delta logits| {loaded['max_abs_delta']:.2e}")
    from peft import PeftModel

    unedited, _ = load_model(str(tmp_path / "model"))
    merged, _ = load_model(str(path))
    with torch.no_grad():
        wrong = PeftModel.from_pretrained(unedited, str(path / "adapter")).eval()(input_ids=probe).logits
        off = (wrong - merged(input_ids=probe).logits).abs().max().item()
    print(f"unedited base + adapter vs model/: max |delta logits| {off:.2e}")
    assert off > 1e-3
