"""ApplyEdits' first step: which facts a run edits and which it keeps as controls.

The candidates are read from the knowledge source, sampled (seeded) down to ``max_candidates``, filtered to the
facts the base model knows (cached on disk by the model's weight fingerprint and the candidates) and split,
seeded and disjoint by subject and object, into the edit set and the control set. An edit made earlier brings
its own edit set; only the controls are drawn then.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from retention.data.readers import ReadReport, read_records
from retention.data.selection import KnowledgeSets, select_known, split_edit_control
from retention.diskcache import DiskCache, digest, file_digest
from retention.models import shared
from retention.paths import cache_dir
from retention.records import KnowledgeRecord
from retention.scoring import check_protocols

SELECTION_CACHE_VERSION = 1
"""Bump when selection changes what it computes, so cached entries are recomputed."""


@dataclass
class FactSelectionArgs:
    """Which facts a run edits (the edit set E) and keeps untouched (the intrinsic control set I)."""

    knowledge: str = "builtin"
    """A knowledge file (CounterFact, zsRE, our records) or a built-in set name (``builtin``)."""
    n_edit: int = 0
    """Facts to edit. With ``n_edit`` and ``n_control`` both 0 (the default) the callback does nothing: plain
    fine-tuning."""
    n_control: int = 0
    """Known facts left untouched (the intrinsic control set I)."""
    known_protocol: str = "top1"
    """Keep facts the base model answers correctly under this protocol (top1, prob, token_acc, gen); ``none``
    keeps every fact (random test models know nothing)."""
    max_candidates: int | None = None
    """Score at most this many records (a seeded sample) when selecting known facts."""
    seed: int = 0
    """Seed of the sample and of the edit/control split."""
    on_error: Literal["raise", "skip"] = "raise"
    """Malformed knowledge records: ``raise`` (an error naming file, record and field) or ``skip`` (skipped and
    counted)."""

    def __post_init__(self) -> None:
        if self.n_edit < 0 or self.n_control < 0:
            raise ValueError(f"ApplyEdits: n_edit={self.n_edit}, n_control={self.n_control} must be >= 0")
        if self.known_protocol != "none":
            check_protocols([self.known_protocol])
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"ApplyEdits: on_error {self.on_error!r} unknown; choose raise or skip")
        if self.max_candidates is not None and self.max_candidates < self.n_edit + self.n_control:
            raise ValueError(f"ApplyEdits: max_candidates={self.max_candidates} cannot give n_edit + n_control = "
                             f"{self.n_edit + self.n_control} known facts")


@dataclass
class Selection:
    """What the selection step produced."""

    sets: KnowledgeSets
    stats: dict[str, int]
    """``candidates`` (after ``max_candidates``), ``known``, ``read_records`` and ``skipped_records`` (malformed,
    under ``on_error: skip``)."""
    seconds: float
    cache_hit: bool | None
    """Whether the known facts came from the selection cache (None: nothing was scored)."""
    seed_edit: list[KnowledgeRecord]
    """The seed's whole edit set: ``sets.edit`` itself, but in a run of the single protocol, whose one fact is
    among them (its edit is made together with theirs)."""


def known_facts(model: nn.Module, tokenizer, records: list[KnowledgeRecord], protocol: str, fingerprint: str,
                cache: bool) -> tuple[list[KnowledgeRecord], bool]:
    """The records the model knows under ``protocol``, and whether they came from the selection cache (keyed by
    the model's weight fingerprint, the protocol and the records)."""
    store = DiskCache(cache_dir() / "selection")
    key = {"version": SELECTION_CACHE_VERSION, "model": fingerprint, "protocol": protocol,
           "records": digest([dataclasses.asdict(r) for r in records])}
    with store.lock(key) if cache else contextlib.nullcontext():
        hit = store.get(key) if cache else None
        if hit is not None:
            known_ids = set(hit[0]["known"])
            return [r for r in records if str(r.case_id) in known_ids], True
        known = select_known(model, tokenizer, records, protocol=protocol)
        if cache:
            store.put(key, {"known": [str(r.case_id) for r in known]})
    return known, False


def candidates_and_known(
    args: FactSelectionArgs, pl_module, fingerprint: str | None, candidates: str | None, cache: bool,
) -> tuple[list[KnowledgeRecord], ReadReport | None, list[KnowledgeRecord], bool | None]:
    """The candidates (read from ``candidates`` and sampled down to ``args.max_candidates``), their read report,
    the known ones among them and whether those came from the selection cache (None: nothing was scored)."""
    records, report = read_records(candidates, on_error=args.on_error) if candidates is not None else ([], None)
    if args.max_candidates is not None and len(records) > args.max_candidates:
        records = random.Random(args.seed).sample(records, args.max_candidates)
    if args.known_protocol == "none" or not records:  # no records: edited_model without controls
        return records, report, list(records), None
    known, cache_hit = known_facts(pl_module.model, pl_module.tokenizer, records, args.known_protocol,
                                   fingerprint, cache)
    return records, report, known, cache_hit


def _source_digest(source: str | None) -> str | None:
    """A knowledge file's SHA-256, or the name of a built-in set."""
    return file_digest(source) if source is not None and Path(source).is_file() else source


def select_facts(
    args: FactSelectionArgs, pl_module, fingerprint: str | None, *, candidates: str | None,
    edit_set: list[KnowledgeRecord] | None = None, edit_set_report: ReadReport | None = None,
    single_index: int | None = None, cache: bool = True,
) -> Selection:
    """Read the ``candidates`` source (None: no candidates), keep the known facts and split them into
    ``args.n_edit`` edit and ``args.n_control`` control facts; with ``edit_set`` (an edit made earlier, read
    with ``edit_set_report``) that is the edit set and only controls are drawn. ``single_index`` keeps one edit
    fact (a run of the single protocol). ``pl_module`` gives the model and tokenizer that score the candidates."""
    t0 = time.perf_counter()
    computed = []

    def compute() -> tuple[list[KnowledgeRecord], ReadReport | None, list[KnowledgeRecord], bool | None]:
        computed.append(True)
        return candidates_and_known(args, pl_module, fingerprint, candidates, cache)

    if cache and (fingerprint is not None or args.known_protocol == "none"):
        # A study's runs in one process read and score the candidates once (retention.models.shared_loads).
        records, report, known, cache_hit = shared("selection", lambda: {
            "model": fingerprint, "candidates": candidates, "source": _source_digest(candidates),
            "protocol": args.known_protocol, "max_candidates": args.max_candidates,
            "seed": args.seed if args.max_candidates is not None else None,  # the seed draws only the sample
            "on_error": args.on_error}, compute)
        cache_hit = cache_hit if computed or cache_hit is None else True  # kept from an earlier run: reused
    else:
        records, report, known, cache_hit = compute()
    n_edit = len(edit_set) if edit_set is not None else args.n_edit
    edit, control = split_edit_control(known, n_edit, args.n_control, args.seed, edit=edit_set)
    seed_edit = edit
    if single_index is not None:
        edit = [edit[single_index]]
    reports = [r for r in (report, edit_set_report) if r is not None]
    stats = {"candidates": len(records), "known": len(known), "read_records": sum(r.read for r in reports),
             "skipped_records": sum(r.skipped for r in reports)}
    seconds = time.perf_counter() - t0
    rank_zero_info(f"{args.knowledge}: {len(known)} of {len(records)} facts known under {args.known_protocol}; "
                   f"{len(edit)} to edit, {len(control)} controls ({seconds:.1f} s)")
    return Selection(KnowledgeSets(edit, control), stats, seconds, cache_hit, seed_edit)
