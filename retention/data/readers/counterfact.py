"""CounterFact (ROME/MEMIT format) and MQuAKE (CounterFact-style rewrites with multi-hop questions) records; the
formats are described in :mod:`retention.data.readers`."""

from __future__ import annotations

from retention.data.readers.common import ALIASES, UNKNOWN, Raw, short
from retention.records import KnowledgeRecord, NeighborhoodPrompt, PortabilityPrompt


def from_counterfact(raw: Raw, case_id: str, zsre_target: str) -> KnowledgeRecord:
    rw = raw.child("requested_rewrite")
    target_true = rw.child("target_true").target("str")
    neighborhood = []
    for i, item in enumerate(raw.get("neighborhood_prompts", list, [])):
        name = f"neighborhood_prompts[{i}]"
        if isinstance(item, str) and item.strip():
            neighborhood.append(NeighborhoodPrompt(item, target_true))
        elif isinstance(item, dict):
            n = Raw(raw.path, raw.ref, item, name + ".")
            neighborhood.append(NeighborhoodPrompt(n.text("prompt"), n.target("target")))
        else:
            raise raw.error(name, f"expected a non-empty str or {{prompt, target}}, got {short(item)}")
    return KnowledgeRecord(
        case_id=case_id,
        subject=rw.text("subject"),
        prompt=rw.text("prompt"),
        relation_id=rw.get("relation_id", str, ""),
        target_new=rw.child("target_new").target("str"),
        target_true=target_true,
        paraphrases=raw.texts("paraphrase_prompts"),
        neighborhood=neighborhood,
        generation_prompts=raw.texts("generation_prompts"),
        source="counterfact",
    )


_SINGLE_HOPS = ("single-hop questions are not scored: the edited hop is requested_rewrite[0].question (read as a "
                "paraphrase), the others ask about other facts of the chain")
_MQUAKE_IGNORED = {"answer_alias": ALIASES, "new_answer_alias": ALIASES, "single_hops": _SINGLE_HOPS,
                   "new_single_hops": _SINGLE_HOPS, "orig": "the case's triples are metadata, not prompts"}
_REWRITE_FIELDS = {"prompt", "subject", "relation_id", "target_new", "target_true", "question"}


def from_mquake(raw: Raw, case_id: str, zsre_target: str) -> KnowledgeRecord:
    rewrites = raw.get("requested_rewrite", list)
    if len(rewrites) != 1:
        raise raw.error("requested_rewrite", "empty list" if not rewrites else (
            f"{len(rewrites)} rewrites: a multi-hop case is answered only when all of its rewrites are edited into "
            "one model, but records are selected, split and edited one by one (one rewrite each); "
            "on_error='skip' keeps the single-rewrite cases"))
    if not isinstance(rewrites[0], dict):
        raise raw.error("requested_rewrite[0]", f"expected an object, got {short(rewrites[0])}")
    rw = raw.sub("requested_rewrite[0]", rewrites[0])
    target_new, target_true = rw.child("target_new").target("str"), rw.child("target_true").target("str")
    new_answer, answer = raw.target("new_answer"), raw.target("answer")
    if not raw.has("questions"):
        raise raw.error("questions", "missing")
    questions = raw.texts("questions")
    for name in sorted(set(rw.data) - _REWRITE_FIELDS):
        rw.ignore(name, UNKNOWN)
    for name in sorted(set(raw.data) - {"case_id", "requested_rewrite", "questions", "answer", "new_answer"}):
        raw.ignore(name, _MQUAKE_IGNORED.get(name, UNKNOWN))
    alternative = answer if answer.casefold() != new_answer.casefold() else None
    return KnowledgeRecord(
        case_id=case_id,
        subject=rw.text("subject"),
        prompt=rw.text("prompt"),
        relation_id=rw.get("relation_id", str, ""),
        target_new=target_new,
        target_true=target_true,
        paraphrases=rw.texts("question", single_ok=True),
        portability=[PortabilityPrompt(q, new_answer, alternative) for q in questions],
        source="mquake",
    )
