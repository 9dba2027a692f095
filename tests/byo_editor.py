"""A bring-your-own editor for tests: any :class:`Editor` subclass works by its import path
(``edits.editor: tests.byo_editor.RankOneEditor``, ``retention edit --editor ...``, ``retention.edit(...)``).

:class:`RankOneEditor` is deliberately simple, and honest about it: for each request it reads the key ``k`` (the
input of one MLP output projection at the last token of the rewrite prompt) and the residual ``h`` there, picks
the value change ``δ = strength · ‖h‖ · ŵ`` along the output embedding ``ŵ`` of the new target's first token, and
solves ``ΔW K = D`` in closed form (``ΔW = D K⁺``: rank one for one request, exact for linearly independent keys).
With the last layer edited, the new first token wins the rewrite prompt's next-token argmax. It knows nothing of
paraphrases or neighbours: a test editor, not a method.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from retention.arch import ArchAdapter, unwrap_model
from retention.editing.base import Editor, EditorHParams, EditRequest, EditResult, RequestDiagnostics
from retention.scoring import target_ids


@dataclass
class RankOneHParams(EditorHParams):
    layer: int | None = None
    """The decoder layer whose MLP output projection is edited; None for the last one."""
    strength: float = 1.0
    """The value change's norm, in units of the residual's norm at the edited token."""

    def validate(self) -> None:
        super().validate()
        if not self.strength > 0:
            raise ValueError(f"strength={self.strength}: must be > 0")


class RankOneEditor(Editor):
    name = "rank-one"
    hparams_class = RankOneHParams

    @torch.no_grad()
    def edit(self, model: nn.Module, tokenizer, requests: Sequence[EditRequest]) -> EditResult:
        t0 = time.perf_counter()
        base = unwrap_model(model)
        arch = ArchAdapter.for_model(base)
        layer = (arch.num_layers - 1 if self.hparams.layer is None else self.hparams.layer) % arch.num_layers
        head = base.get_output_embeddings().weight
        keys, values = [], []
        captured: dict[str, torch.Tensor] = {}
        hooks = [arch.mlp_out(layer).register_forward_pre_hook(lambda _m, args: captured.update(k=args[0])),
                 arch.layer(layer).register_forward_hook(
                     lambda _m, _a, out: captured.update(h=out[0] if isinstance(out, tuple) else out))]
        try:
            for request in requests:
                ids = tokenizer(request.rewrite_prompt, return_tensors="pt")["input_ids"].to(head.device)
                base(input_ids=ids)
                w = head[target_ids(tokenizer, request.target_new)[0]].float()
                h = captured["h"][0, -1].float()
                keys.append(captured["k"][0, -1].float())
                values.append(self.hparams.strength * h.norm() * w / w.norm())
        finally:
            for hook in hooks:
                hook.remove()
        K, D = torch.stack(keys, 1), torch.stack(values, 1)  # [in, n], [out, n]
        delta = D @ torch.linalg.pinv(K)  # [out, in]: ΔW k_i = δ_i
        seconds = time.perf_counter() - t0
        diags = [RequestDiagnostics(r.case_id, seconds / len(requests), delta_norm=delta.norm().item())
                 for r in requests]
        return EditResult(self.name, {f"{arch.mlp_out_name(layer)}.weight": arch.delta_to_weight(delta).cpu()},
                          [layer], [r.case_id for r in requests], diags, self.hparams.to_dict(), seconds)
