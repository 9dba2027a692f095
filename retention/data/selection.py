"""Fact selection: keep the facts a base model knows, split them into an edit set and a control set."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from retention.records import KnowledgeRecord, Probe
from retention.scoring import check_protocols, score_probes

log = logging.getLogger(__name__)


@dataclass
class KnowledgeSets:
    """The facts of a run: the edit set E (edited to ``target_new``) and the intrinsic control set I."""

    edit: list[KnowledgeRecord] = field(default_factory=list)
    control: list[KnowledgeRecord] = field(default_factory=list)

    def probes(self) -> list[Probe]:
        """Edit probes (rewrite, paraphrase, neighbourhood) of E, then true-fact probes of I."""
        probes = [p for r in self.edit for p in r.edit_probes()]
        return probes + [p for r in self.control for p in r.true_probes("control")]

    def terms(self) -> list[str]:
        """Subjects and objects (true and new) of both sets: what task data must not mention."""
        return sorted({t for r in self.edit + self.control for t in (r.subject, r.target_true, r.target_new)})


def select_known_facts(
    model: nn.Module,
    tokenizer,
    records: Sequence[KnowledgeRecord],
    protocol: str = "top1",
    batch_size: int = 16,
    progress: bool = False,
) -> list[KnowledgeRecord]:
    """The records whose rewrite prompt the model answers with ``target_true`` under ``protocol``."""
    (protocol,) = check_protocols([protocol])
    t0 = time.perf_counter()
    probes = [r.true_probes()[0] for r in records]
    results = score_probes(model, tokenizer, probes, protocols=(protocol,), batch_size=batch_size, progress=progress)
    known = [r for r, res in zip(records, results) if res.passed[protocol]]
    log.info(f"{len(known)} of {len(records)} facts known under {protocol} ({time.perf_counter() - t0:.1f} s)")
    return known


def select_known(
    model: nn.Module,
    tokenizer,
    records: Sequence[KnowledgeRecord],
    n: int | None = None,
    protocol: str = "top1",
    batch_size: int = 16,
    progress: bool = False,
) -> list[KnowledgeRecord]:
    """The records the model knows under ``protocol`` (``"none"`` keeps all), in order; with ``n``, the first ``n``
    of them, scoring records in chunks only until ``n`` are found."""
    if protocol == "none":
        return list(records[:n] if n is not None else records)
    if n is None:
        return select_known_facts(model, tokenizer, records, protocol, batch_size, progress)
    known: list[KnowledgeRecord] = []
    start = 0
    while len(known) < n and start < len(records):
        chunk = records[start : start + max(2 * (n - len(known)), batch_size)]
        known += select_known_facts(model, tokenizer, chunk, protocol, batch_size, progress)
        start += len(chunk)
    if len(known) < n:
        log.warning(f"only {len(known)} of {len(records)} facts are known under {protocol} (asked for {n})")
    return known[:n]


def _key(text: str) -> str:
    return " ".join(text.casefold().split())


def split_edit_control(
    records: Sequence[KnowledgeRecord], n_edit: int, n_control: int, seed: int = 0,
    edit: Sequence[KnowledgeRecord] | None = None,
) -> tuple[list[KnowledgeRecord], list[KnowledgeRecord]]:
    """A seeded split into ``n_edit`` facts to edit and ``n_control`` untouched ones, disjoint by subject.

    No subject is in both sets, and no subject of one set is an object (true or new target) of the other:
    editing "France -> capital -> Rome" must not touch a control fact about "Paris" or "France". Records are
    drawn in a seeded random order and each goes to the edit set while it needs more, else to the control set.

    With ``edit`` given (an edit made earlier), the edit set is ``edit`` (``n_edit`` is ignored) and only
    controls are drawn, by the same rule; when ``edit`` is what this split draws from ``records``, so are the
    controls (the rule is symmetric, so a control never conflicts with a later edit fact). A record with an
    edit fact's case id is never a control.
    """
    if n_edit < 0 or n_control < 0:
        raise ValueError(f"n_edit={n_edit}, n_control={n_control}: sizes must be >= 0")
    order = list(records)
    random.Random(seed).shuffle(order)
    sets: tuple[list[KnowledgeRecord], list[KnowledgeRecord]] = (list(edit or []), [])
    wanted = (len(sets[0]) if edit is not None else n_edit, n_control)
    subjects: tuple[set[str], set[str]] = ({_key(r.subject) for r in sets[0]}, set())
    objects: tuple[set[str], set[str]] = ({_key(t) for r in sets[0] for t in (r.target_true, r.target_new)}, set())
    edit_ids = {str(r.case_id) for r in sets[0]}
    for rec in order:
        if str(rec.case_id) in edit_ids:
            continue
        if all(len(s) == w for s, w in zip(sets, wanted)):
            break
        subject, objs = _key(rec.subject), {_key(rec.target_true), _key(rec.target_new)}
        for side in (0, 1):
            other = 1 - side
            if len(sets[side]) == wanted[side]:
                continue
            if subject in subjects[other] or subject in objects[other] or objs & subjects[other]:
                continue
            sets[side].append(rec)
            subjects[side].add(subject)
            objects[side].update(objs)
            break
    if len(sets[0]) < wanted[0] or len(sets[1]) < n_control:
        raise ValueError(
            f"only {len(sets[0])} edit and {len(sets[1])} control facts disjoint by subject could be drawn from "
            f"{len(records)} records (seed {seed}); {wanted[0]} edit and {n_control} control requested"
        )
    return sets
