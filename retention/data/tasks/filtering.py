"""Edit-irrelevant task data: drop examples that mention an edited or control subject or object, and hold
out a validation split."""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Iterable, Sequence
from typing import TypeVar

from retention.data.tasks.examples import Example, example_text

log = logging.getLogger(__name__)

T = TypeVar("T")


def mention_pattern(terms: Iterable[str]) -> re.Pattern | None:
    """One case-insensitive regex matching any term as a whole word (None when there are no terms).

    "Whole word" means no letter, digit or underscore touches the match on either side, so terms that start
    or end with punctuation ("U.S.", "C++") work; any run of whitespace inside a multiword term matches any
    run of whitespace in the text.
    """
    words = sorted({" ".join(t.split()) for t in terms if t and t.strip()}, key=len, reverse=True)
    if not words:
        return None
    alternatives = "|".join(r"\s+".join(re.escape(w) for w in term.split(" ")) for term in words)
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


def filter_mentions(examples: Sequence[Example], terms: Iterable[str]) -> tuple[list[Example], int]:
    """Keep the examples that mention none of ``terms``; returns ``(kept, number dropped)``."""
    pattern = mention_pattern(terms)
    if pattern is None:
        return list(examples), 0
    kept = [ex for ex in examples if not pattern.search(example_text(ex))]
    n_dropped = len(examples) - len(kept)
    log.info("dropped %d of %d task examples that mention an edited or control term", n_dropped, len(examples))
    return kept, n_dropped


def split_validation(items: Sequence[T], val_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """A seeded random split into ``(train, val)``; val gets ``round(n * val_fraction)`` items, at least one
    when the fraction is positive and there are two or more items."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = round(len(items) * val_fraction)
    if val_fraction > 0 and len(items) >= 2:
        n_val = max(n_val, 1)
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    train = [x for i, x in enumerate(items) if i not in val_idx]
    val = [x for i, x in enumerate(items) if i in val_idx]
    return train, val
