"""Architecture adapter: where a causal LM keeps its layers, MLP output projections, norm and head.

Detected from the model's config (``model_type``), never from its name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class _Layout:
    layers: str
    """Dotted path of the decoder-layer ModuleList."""
    mlp: str
    """Path of the MLP inside a layer."""
    mlp_out: str
    """Path of the MLP output projection inside a layer (its input is the editing key)."""
    attn: str
    final_norm: str
    embed: str
    weight_is_in_out: bool = False
    """True for GPT-2's Conv1D, whose weight is stored ``[in, out]``."""


_LLAMA = _Layout("model.layers", "mlp", "mlp.down_proj", "self_attn", "model.norm", "model.embed_tokens")
_LAYOUTS: dict[str, _Layout] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "mixtral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _LLAMA,
    "olmo": _LLAMA,
    "gpt2": _Layout("transformer.h", "mlp", "mlp.c_proj", "attn", "transformer.ln_f", "transformer.wte", True),
    "gptj": _Layout("transformer.h", "mlp", "mlp.fc_out", "attn", "transformer.ln_f", "transformer.wte"),
    "gpt_neox": _Layout(
        "gpt_neox.layers", "mlp", "mlp.dense_4h_to_h", "attention", "gpt_neox.final_layer_norm", "gpt_neox.embed_in"
    ),
}


def unwrap_model(model: nn.Module) -> nn.Module:
    """The underlying transformers model of a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def out_of_range(layers, n: int) -> list[int]:
    """The entries of ``layers`` that are no layer index of an ``n``-layer model (negatives count from the end)."""
    return [int(i) for i in layers if not -n <= int(i) < n]


class UnsupportedArchitecture(ValueError):
    pass


class ArchAdapter:
    """Uniform access to the parts of a supported causal LM that editing, tracing and freezing need."""

    def __init__(self, model: nn.Module):
        self.model = unwrap_model(model)
        model_type = getattr(getattr(self.model, "config", None), "model_type", None)
        if model_type not in _LAYOUTS:
            raise UnsupportedArchitecture(
                f"unsupported architecture model_type={model_type!r} ({type(self.model).__name__}); "
                f"supported: {', '.join(sorted(_LAYOUTS))}"
            )
        self.model_type = model_type
        self._layout = _LAYOUTS[model_type]
        if self._layout.layers not in dict(self.model.named_modules()):
            raise UnsupportedArchitecture(f"{type(self.model).__name__} has no '{self._layout.layers}' module")

    @classmethod
    def for_model(cls, model: nn.Module) -> ArchAdapter:
        return cls(model)

    def _get(self, path: str) -> nn.Module:
        return self.model.get_submodule(path)

    @property
    def layers(self) -> nn.ModuleList:
        return self._get(self._layout.layers)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "hidden_size", None) or cfg.n_embd)

    @property
    def weight_is_in_out(self) -> bool:
        return self._layout.weight_is_in_out

    @property
    def final_norm(self) -> nn.Module:
        return self._get(self._layout.final_norm)

    @property
    def embed(self) -> nn.Module:
        return self._get(self._layout.embed)

    @property
    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def _check(self, i: int) -> int:
        if not -self.num_layers <= i < self.num_layers:
            raise IndexError(f"layer {i} out of range: the model has {self.num_layers} layers (0..{self.num_layers - 1})")
        return i % self.num_layers

    def layer_name(self, i: int) -> str:
        return f"{self._layout.layers}.{self._check(i)}"

    def mlp_name(self, i: int) -> str:
        return f"{self.layer_name(i)}.{self._layout.mlp}"

    def attn_name(self, i: int) -> str:
        return f"{self.layer_name(i)}.{self._layout.attn}"

    def mlp_out_name(self, i: int) -> str:
        return f"{self.layer_name(i)}.{self._layout.mlp_out}"

    def layer(self, i: int) -> nn.Module:
        return self._get(self.layer_name(i))

    def mlp(self, i: int) -> nn.Module:
        return self._get(self.mlp_name(i))

    def attn(self, i: int) -> nn.Module:
        return self._get(self.attn_name(i))

    def mlp_out(self, i: int) -> nn.Module:
        return self._get(self.mlp_out_name(i))

    def layer_index_of(self, param_name: str) -> int | None:
        """The decoder-layer index a parameter name belongs to, or None (embeddings, final norm, head)."""
        marker = self._layout.layers + "."
        pos = param_name.find(marker)
        if pos < 0:
            return None
        rest = param_name[pos + len(marker):]
        head = rest.split(".", 1)[0]
        return int(head) if head.isdigit() else None

    def weight_to_out_in(self, weight: torch.Tensor) -> torch.Tensor:
        """A stored MLP-out weight (or delta) as the canonical ``[out, in]`` matrix."""
        return weight.t() if self.weight_is_in_out else weight

    def delta_to_weight(self, delta_out_in: torch.Tensor) -> torch.Tensor:
        """A canonical ``[out, in]`` delta in the stored layout of the MLP-out weight."""
        return delta_out_in.t() if self.weight_is_in_out else delta_out_in

    def mlp_out_weight(self, i: int) -> torch.Tensor:
        return self.mlp_out(i).weight

    def key_size(self, i: int) -> int:
        """The input width of layer ``i``'s MLP output projection: the size of an editing key."""
        return self.weight_to_out_in(self.mlp_out_weight(i)).shape[1]

    def mlp_out_delta(self, i: int, update_out_in: torch.Tensor) -> tuple[str, torch.Tensor]:
        """An editor's ``[out, in]`` update of layer ``i``'s MLP output projection as an edit-result entry: the
        weight's parameter name and the float32 delta in the weight's stored layout, on the weight's device."""
        weight = self.mlp_out_weight(i)
        delta = self.delta_to_weight(update_out_in.float()).contiguous().to(weight.device)
        return f"{self.mlp_out_name(i)}.weight", delta
