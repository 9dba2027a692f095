"""A fine-tuned model written out as folders that plain ``transformers`` and ``peft`` read (no retention import).

- ``<path>/``: the fine-tuned model with any adapters merged, and its tokenizer;
- with LoRA/DoRA also ``<path>/base/``: the model fine-tuning started from (the base model *after* the run's
  edits), and its tokenizer;
- and ``<path>/adapter/``: the peft adapter alone, its ``base_model_name_or_path`` the absolute path of
  ``<path>/base``, so ``AutoPeftModelForCausalLM.from_pretrained("<path>/adapter")`` gives ``<path>``'s logits.

The whole folder is written beside ``path`` and renamed over it when complete (:func:`retention.io.atomic_path`).
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from retention.io import atomic_path

BASE = "base"
ADAPTER = "adapter"


def _is_adapter_tensor(name: str) -> bool:
    return any(part.startswith("lora_") for part in name.split("."))


def base_weights(peft_model: nn.Module) -> dict[str, Tensor]:
    """The weights of the model under a LoRA/DoRA wrapper, named as in the unwrapped model (each wrapped layer's
    ``base_layer`` weight under the layer's own name; the adapters' tensors left out). Views, not copies."""
    return {name.replace(".base_layer.", "."): tensor
            for name, tensor in peft_model.get_base_model().state_dict().items() if not _is_adapter_tensor(name)}


def write_model(model: nn.Module, tokenizer, path: str | Path) -> Path:
    """Write ``model`` (a transformers model, or a peft model over one, which this merges in place) and its
    tokenizer as described in the module docstring; returns ``path``."""
    path = Path(path)
    with atomic_path(path, folder=True) as tmp:
        if hasattr(model, "merge_and_unload"):
            # Before merging: the merge writes the adapters into the base weights these views show.
            model.get_base_model().save_pretrained(tmp / BASE, state_dict=base_weights(model))
            tokenizer.save_pretrained(tmp / BASE)
            for config in model.peft_config.values():
                config.base_model_name_or_path = str(path.resolve() / BASE)
            # The adapters sit inside the decoder layers, never on the embeddings (whose check would look for
            # the base, not written yet, on the hub).
            model.save_pretrained(tmp / ADAPTER, save_embedding_layers=False)
            model = model.merge_and_unload()
        model.eval().save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return path
