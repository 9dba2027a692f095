"""A fine-tuned model written out as folders that plain ``transformers`` and ``peft`` read (no retention import).

- ``<path>/``: the fine-tuned model with any adapters merged, and its tokenizer;
- with LoRA/DoRA also ``<path>/base/``: the model fine-tuning started from (the base model *after* the run's
  edits), and its tokenizer;
- and ``<path>/adapter/``: the peft adapter alone, its ``base_model_name_or_path`` the absolute path of
  ``<path>/base``, so ``AutoPeftModelForCausalLM.from_pretrained("<path>/adapter")`` gives ``<path>``'s logits.

The whole folder is written beside ``path`` and renamed over it when complete (:func:`retention.io.atomic_path`).

A model whose edits live in a memory module (GRACE, WISE: :mod:`retention.editing.memory`) is refused: a key
lookup or a router is no weight, so the folder would hold the fine-tuned model without its edits, and plain
``transformers`` would load it without a word.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from retention.editing.memory import attached
from retention.io import atomic_path

BASE = "base"
ADAPTER = "adapter"


def _is_adapter_tensor(name: str) -> bool:
    return any(part.startswith("lora_") for part in name.split("."))


def memory_modules(model: nn.Module) -> list[str]:
    """The names of the modules of ``model`` that carry an edit memory (GRACE, WISE), each with its kind."""
    return [f"{name} ({memory.kind})" for name, module in model.named_modules()
            if (memory := attached(module)) is not None]


def check_exportable(model: nn.Module) -> None:
    """Raise ValueError naming ``run.save_model`` if ``model``'s edits live in a memory module."""
    held = memory_modules(model)
    if held:
        raise ValueError(f"run.save_model: the edits live in a memory module at {', '.join(held)}, not in the "
                         "weights, and an exported model would be the fine-tuned model without them; leave "
                         "run.save_model off with edits.editor grace or wise (docs/editors.md)")


def base_weights(peft_model: nn.Module) -> dict[str, Tensor]:
    """The weights of the model under a LoRA/DoRA wrapper, named as in the unwrapped model (each wrapped layer's
    ``base_layer`` weight under the layer's own name; the adapters' tensors left out). Views, not copies."""
    return {name.replace(".base_layer.", "."): tensor
            for name, tensor in peft_model.get_base_model().state_dict().items() if not _is_adapter_tensor(name)}


def write_model(model: nn.Module, tokenizer, path: str | Path) -> Path:
    """Write ``model`` (a transformers model, or a peft model over one, which this merges in place) and its
    tokenizer as described in the module docstring; returns ``path``. A model with an edit memory is refused
    (:func:`check_exportable`)."""
    check_exportable(model)
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
