"""Edit requests, a corpus and hyperparameters for the MEMIT and AlphaEdit tests on tiny random models."""

from __future__ import annotations

import random
from pathlib import Path

from retention.editing.base import EditRequest
from retention.records import Probe
from retention.scoring import score_probes

WORDS = ("the of and a in to was is for on as by with he she it from at his her an which that were are city river "
         "king film album song team war music born known years first new after school church played house").split()
SUBJECTS = ["Danielle Darrieux", "Toko Yasuda", "Edwin of Northumbria", "Apple A5", "Honus Wagner", "Pervez Musharraf",
            "Ferdinand Tönnies", "Thomas Joannes Stieltjes", "Anaal Nathrakh", "Grete Stern", "Nagorno-Karabakh",
            "Kingdom of Gwynedd", "Michel Denisot", "Brian Mulroney", "Jacques Maritain", "Fazl Ilahi Chaudhry"]
TARGETS = ["English", "piano", "Islam", "Google", "football", "Paris", "Berlin", "Dutch", "metal", "Argentina",
           "Armenia", "Wales", "French", "Canada", "Rome", "Pakistan"]
# The subject ends each prompt, so the last critical layer's output at the subject feeds the prediction directly.
TEMPLATES = ["The mother tongue of {}", "The instrument played by {}", "The religion of {}", "The maker of {}",
             "The sport of {}", "The city of {}"]
REQUESTS = [EditRequest(str(i), s, TEMPLATES[i % len(TEMPLATES)], t) for i, (s, t) in enumerate(zip(SUBJECTS, TARGETS))]


def write_corpus(folder: Path) -> Path:
    """A small seeded text file for the key statistics."""
    rng = random.Random(0)
    paragraphs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))).capitalize() + "."
                  for _ in range(200)]
    path = folder / "corpus.txt"
    path.write_text("\n\n".join(paragraphs), encoding="utf-8")
    return path


def tiny_hparams(corpus: Path, **kw) -> dict:
    """Random tiny models have small activations and need a longer optimisation: no weight decay, a loose clamp."""
    return {"layers": [0, 1], "context_templates": [[5, 1]], "v_weight_decay": 0.0, "clamp_norm_factor": 1e4,
            "v_steps": 40, "v_lr": 1.0, "mom2_corpus": str(corpus), "mom2_samples": 200, "mom2_max_length": 32, **kw}


def top1(model, tokenizer, requests) -> list[bool]:
    probes = [Probe(r.rewrite_prompt, r.target_new) for r in requests]
    return [r.passed["top1"] for r in score_probes(model, tokenizer, probes, ("top1",))]
