"""ParaphraseAugmentation: K extra phrasings per edit, used while editing (Wen & Zhang 2025, arXiv 2507.14198).

Each edited fact gets ``k`` templates (with ``{}`` for the subject) that the editor adds to the rewriting
prompts and key averages. Sources:

- ``record``: the record's own augmentation phrasings (the built-in set ships three), topped up from the
  relation-template table when it has fewer than ``k``;
- ``relations``: templates of the record's relation (:func:`retention.data.relations.augmentation_phrasings`);
- ``model``: paraphrases of the rewrite prompt sampled from a language model (the base model unless
  ``generator`` names another), kept when they contain the subject.

Whatever the source, a phrasing that resembles one of the record's evaluation paraphrases or its own prompt
is dropped: evaluation paraphrases measure generalisation and must never be seen while editing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from retention.arch import unwrap_model
from retention.data.phrasings import kept_phrasings, template_phrasings
from retention.pipeline_contract import PipelineCallback
from retention.records import KnowledgeRecord

Source = Literal["record", "relations", "model"]
SOURCES = ("record", "relations", "model")
Generate = Callable[[str, int], list[str]]
"""``(prompt, n) -> n sampled continuations``."""

_FEW_SHOT = (
    "Say each sentence start in other words. Keep the name in brackets.\n"
    "Original: The capital of [Italy] is\nRewrite: [Italy]'s capital city is\n"
    "Original: [Marie Curie] was born in\nRewrite: The birthplace of [Marie Curie] is\n"
    "Original: [Toyota] is headquartered in\nRewrite: The head office of [Toyota] is in\n"
    "Original: {prompt}\nRewrite:"
)


def _from_generations(record: KnowledgeRecord, generations: Sequence[str]) -> list[str]:
    """Templates parsed from the generator's rewrites of ``[subject]``-marked prompts."""
    marked = f"[{record.subject}]"
    out = []
    for text in generations:
        line = text.strip().split("\n", 1)[0].strip().rstrip(".:;,!?").strip()
        if line.count(marked) == 1 and "{" not in line and "}" not in line:
            out.append(line.replace(marked, "{}"))
    return out


def phrasings(record: KnowledgeRecord, k: int, source: str = "record", seed: int = 0,
              generate: Generate | None = None) -> list[str]:
    """Up to ``k`` editing phrasings for a record, never one that resembles an evaluation paraphrase."""
    if source not in SOURCES:
        raise ValueError(f"paraphrase source {source!r} unknown; choose from {', '.join(SOURCES)}")
    if k <= 0:
        return []
    if source == "model":
        if generate is None:
            raise ValueError("paraphrase source 'model' needs a generator")
        prompt = _FEW_SHOT.format(prompt=record.prompt.replace("{}", f"[{record.subject}]"))
        return kept_phrasings(record, _from_generations(record, generate(prompt, 4 * k)), k)
    return template_phrasings(record, k, source, seed)


def sampler(model: torch.nn.Module, tokenizer, seed: int, max_new_tokens: int = 24,
            temperature: float = 0.9) -> Generate:
    """A seeded sampling generator over ``model`` (plain-text prompts, no chat template)."""

    @torch.no_grad()
    def generate(prompt: str, n: int) -> list[str]:
        lm = unwrap_model(model)
        enc = tokenizer(prompt, return_tensors="pt").to(next(lm.parameters()).device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = lm.generate(**enc, do_sample=True, temperature=temperature, top_p=0.95, top_k=0,
                              num_return_sequences=n, max_new_tokens=max_new_tokens,
                              pad_token_id=tokenizer.pad_token_id)
        return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    return generate


class ParaphraseAugmentation(PipelineCallback):
    """Gives each edit request ``k`` phrasings before editing (see the module docstring for the sources)."""

    def __init__(self, k: int = 0, source: Source = "record", seed: int = 0, generator: str | None = None):
        """
        Args:
            k: phrasings per edited fact (0: no augmentation).
            source: record, relations or model.
            seed: seed of the relation-template draw and of model sampling.
            generator: for ``source: model``, the model that paraphrases (a ``load_model`` name); None for the
                base model being edited.
        """
        if k < 0:
            raise ValueError(f"ParaphraseAugmentation: k={k} must be >= 0")
        if source not in SOURCES:
            raise ValueError(f"ParaphraseAugmentation: source {source!r} unknown; choose from {', '.join(SOURCES)}")
        if generator is not None and source != "model":
            raise ValueError(f"ParaphraseAugmentation: generator is used only with source 'model' (not {source!r})")
        self.k, self.source, self.seed, self.generator = k, source, seed, generator
        self.counts: dict[str, int] = {}
        """case_id -> phrasings given."""

    @override
    def on_before_edits(self, trainer: Trainer, pl_module: LightningModule,
                        records: list[KnowledgeRecord]) -> list[KnowledgeRecord]:
        if self.k == 0:
            return records
        generate = None
        if self.source == "model":
            if self.generator is None:
                model, tokenizer = pl_module.model, pl_module.tokenizer
            else:
                from retention.models import load_model

                model, tokenizer = load_model(self.generator)
            generate = sampler(model, tokenizer, self.seed)
        out = []
        for r in records:
            extra = phrasings(r, self.k, self.source, self.seed, generate)
            self.counts[str(r.case_id)] = len(extra)
            out.append(dataclasses.replace(r, augmentations=extra))
        short = sum(1 for n in self.counts.values() if n < self.k)
        if short:
            rank_zero_warn(f"paraphrase augmentation ({self.source}): {short} of {len(records)} edits got fewer "
                           f"than {self.k} phrasings")
        rank_zero_info(f"paraphrase augmentation ({self.source}): {sum(self.counts.values())} phrasings for "
                       f"{len(records)} edits")
        return out
