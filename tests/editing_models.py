"""Tiny random models for editor tests.

Edits need a model whose logits respond to its hidden states: the 0.02-initialised tiny models give near-uniform
next-token distributions (every logit within about a nat), so these are initialised at 0.2. Prompts put the
subject last, so δ at layer 0 reaches the next-token prediction through layer 1 directly.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from retention.editing.base import EditRequest
from retention.records import Probe

FACT = EditRequest("1", "Danielle Darrieux", "The mother tongue of {}", "English", "French")
OTHER = EditRequest("2", "Toko Yasuda", "The instrument played by {}", "piano", "guitar")
UNRELATED = "The capital of France is"


def edit_model(kind: str, vocab_size: int):
    if kind == "llama":
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                             initializer_range=0.2)
    else:
        config = GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, initializer_range=0.2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config).eval()


def rewrite_probe(req: EditRequest) -> Probe:
    return Probe(req.rewrite_prompt, req.target_new, req.target_true)


@torch.no_grad()
def next_token_logprobs(model, tokenizer, prompt: str) -> torch.Tensor:
    ids = tokenizer(prompt, return_tensors="pt")
    return torch.log_softmax(model(**ids).logits[0, -1].float(), -1)


def kl(p_log: torch.Tensor, q_log: torch.Tensor) -> float:
    return torch.sum(p_log.exp() * (p_log - q_log)).item()


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model, saved: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
