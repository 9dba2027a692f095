"""The one knowledge-record type shared by every source (CounterFact, zsRE, the built-in set)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


class RecordError(ValueError):
    """A malformed knowledge record: names the file, the record and the field."""

    def __init__(self, path: str, record: str | int, field_name: str, message: str):
        self.path, self.record, self.field_name = path, record, field_name
        super().__init__(f"{path}: record {record}: field '{field_name}': {message}")


@dataclass(frozen=True)
class Probe:
    """One scored question: ``prompt`` should continue with ``target`` rather than ``alternative``."""

    prompt: str
    target: str
    alternative: str | None = None
    kind: str = "rewrite"
    """rewrite | paraphrase | neighborhood | portability | control | generation"""
    case_id: str = ""


@dataclass(frozen=True)
class NeighborhoodPrompt:
    """A prompt about another subject that should still produce ``target`` (its own true object)."""

    prompt: str
    target: str


@dataclass(frozen=True)
class PortabilityPrompt:
    """A question whose answer follows from the edit (KnowEdit's portability, MQuAKE's multi-hop questions):
    after editing, ``prompt`` should continue with ``target``; ``alternative`` (the pre-edit answer, when known)
    is what the ``prob`` protocol compares it with."""

    prompt: str
    target: str
    alternative: str | None = None


@dataclass
class KnowledgeRecord:
    """A fact ``prompt.format(subject) -> target_true`` and its counterfactual ``target_new``."""

    case_id: str
    subject: str
    prompt: str
    """Template with one ``{}`` standing for the subject, e.g. ``"The capital of {} is"``."""
    relation_id: str
    target_new: str
    target_true: str
    paraphrases: list[str] = field(default_factory=list)
    """Evaluation paraphrases: full prompts (subject filled in). Never used while editing."""
    neighborhood: list[NeighborhoodPrompt] = field(default_factory=list)
    generation_prompts: list[str] = field(default_factory=list)
    augmentations: list[str] = field(default_factory=list)
    """Augmentation phrasings: templates with ``{}``, used while editing only, disjoint from ``paraphrases``."""
    source: str = ""
    portability: list[PortabilityPrompt] = field(default_factory=list)
    """Evaluation prompts whose answers the edit implies (probe kind ``portability``); edited facts only."""

    @property
    def rewrite_prompt(self) -> str:
        return self.prompt.format(self.subject)

    def edit_probes(self) -> list[Probe]:
        """Probes of an edited fact: rewrite and paraphrases expect ``target_new``; neighbours keep their own."""
        cid = str(self.case_id)
        probes = [Probe(self.rewrite_prompt, self.target_new, self.target_true, "rewrite", cid)]
        probes += [Probe(p, self.target_new, self.target_true, "paraphrase", cid) for p in self.paraphrases]
        probes += [Probe(n.prompt, n.target, self.target_new, "neighborhood", cid) for n in self.neighborhood]
        probes += [Probe(q.prompt, q.target, q.alternative, "portability", cid) for q in self.portability]
        return probes

    def true_probes(self, kind: str = "control") -> list[Probe]:
        """Probes of the fact as the base model knows it (``target_true`` beats ``target_new``)."""
        cid = str(self.case_id)
        probes = [Probe(self.rewrite_prompt, self.target_true, self.target_new, kind, cid)]
        probes += [Probe(p, self.target_true, self.target_new, f"{kind}_paraphrase", cid) for p in self.paraphrases]
        return probes

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["neighborhood"] = [asdict(n) for n in self.neighborhood]
        if not self.portability:  # absent when empty: records without it serialise as before
            del d["portability"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KnowledgeRecord:
        d = dict(d)
        d["neighborhood"] = [NeighborhoodPrompt(**n) for n in d.get("neighborhood", [])]
        d["portability"] = [PortabilityPrompt(**q) for q in d.get("portability", [])]
        return cls(**d)


# -- probe groups ----------------------------------------------------------------------------------------------

GROUP_OF_KIND = {
    "rewrite": "edit",
    "paraphrase": "edit_paraphrase",
    "neighborhood": "edit_neighborhood",
    "portability": "edit_portability",
    "control": "control",
    "control_paraphrase": "control_paraphrase",
}
"""Probe kind (``Probe.kind``) -> probe group: what a probe measures. ``edit`` (the rewrite prompt of an edited
fact), ``edit_paraphrase`` (its held-out evaluation paraphrases), ``edit_neighborhood`` (prompts about other
subjects that must keep their answers), ``edit_portability`` (questions whose answers the edit implies:
KnowEdit's portability, MQuAKE's multi-hop questions), ``control`` and ``control_paraphrase`` (the intrinsic
control facts, never edited)."""
GROUPS = ("edit", "control", "edit_paraphrase", "control_paraphrase", "edit_neighborhood", "edit_portability")
"""Probe groups in table order: edited and intrinsic side by side first."""
GROUP_LABELS = {
    "edit": "edited (E)",
    "control": "intrinsic (I)",
    "edit_paraphrase": "E paraphrase",
    "control_paraphrase": "I paraphrase",
    "edit_neighborhood": "E neighbourhood",
    "edit_portability": "E portability",
}


def probe_group(kind: str) -> str:
    """The group of a probe kind (:data:`GROUP_OF_KIND`)."""
    if kind not in GROUP_OF_KIND:
        raise ValueError(f"probe kind {kind!r} has no group; known kinds: {', '.join(GROUP_OF_KIND)}")
    return GROUP_OF_KIND[kind]
