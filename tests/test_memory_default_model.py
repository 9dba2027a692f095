"""GRACE and WISE on the default model with their presets, one edit each: it lands, prompts the memory does not
cover give the unedited logits bit for bit, and revert gives them back bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from editing_models import FACT, next_token_logprobs
from memory_cases import passes

from retention.arch import ArchAdapter
from retention.editing.memory import attached
from retention.editing.registry import build_editor
from retention.editing.trace import capture
from retention.tokens import target_ids

UNRELATED = ["The capital of France is", "Water boils at a temperature of", "def fibonacci(n):"]


def _inputs(model, tokenizer, module, prompt: str) -> torch.Tensor:
    """The input of ``module`` at every position of ``prompt`` (float32)."""
    with capture({"f": module}, outputs=False) as seen:
        next_token_logprobs(model, tokenizer, prompt)
    return seen["f"].input[0].float()


def _covered(result, model, tokenizer, module, prompt: str) -> bool:
    """Whether the memory would act at any position of ``prompt``: within a GRACE key's radius, or above WISE's
    threshold."""
    x, tensors = _inputs(model, tokenizer, module, prompt), result.memory.tensors
    if result.editor == "grace":
        dist, nearest = torch.cdist(x, tensors["keys"]).min(dim=1)
        return bool((dist <= tensors["radii"][nearest]).any())
    main = ArchAdapter.for_model(model).weight_to_out_in(module.weight).detach().float()
    act = torch.linalg.vector_norm(F.linear(x, tensors["weight"] - main), dim=-1)
    return bool((act > result.memory.meta["threshold"]).any())


@pytest.mark.slow
@pytest.mark.parametrize("editor_name", ["grace", "wise"])
def test_a_memory_edit_on_the_default_model_lands_defers_and_reverts_bit_for_bit(real_model, editor_name):
    model, tokenizer = real_model
    editor = build_editor(editor_name, model_name="smollm2-135m")
    module = ArchAdapter.for_model(model).mlp_out(editor.hparams.layer)
    assert not passes(model, tokenizer, FACT)
    before = {p: next_token_logprobs(model, tokenizer, p) for p in [FACT.rewrite_prompt, *UNRELATED]}

    result = editor.edit(model, tokenizer, [FACT])
    assert attached(module) is None
    uncovered = [p for p in UNRELATED if not _covered(result, model, tokenizer, module, p)]
    assert len(uncovered) == len(UNRELATED), "the memory covers an unrelated prompt"
    result.apply(model)
    try:
        assert passes(model, tokenizer, FACT)
        edited = next_token_logprobs(model, tokenizer, FACT.rewrite_prompt)
        target, true = (target_ids(tokenizer, t)[0] for t in (FACT.target_new, FACT.target_true))
        assert edited[target] > before[FACT.rewrite_prompt][target] and edited[target] > edited[true]
        for prompt in uncovered:
            assert torch.equal(next_token_logprobs(model, tokenizer, prompt), before[prompt]), prompt
    finally:
        result.revert(model)
    assert attached(module) is None and not module._forward_hooks
    for prompt, logprobs in before.items():
        assert torch.equal(next_token_logprobs(model, tokenizer, prompt), logprobs), prompt
