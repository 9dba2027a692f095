"""zsRE records in the MEND format; the format and its two target conventions are described in
:mod:`retention.data.readers`."""

from __future__ import annotations

from retention.data.readers.common import Raw, template_from_sentence
from retention.records import KnowledgeRecord, NeighborhoodPrompt

ZSRE_TARGETS = {
    "alt": "EasyEdit's convention: target_new = alt (a wrong answer), target_true = answers[0]",
    "answers0": "ROME's convention: target_new = answers[0] (the correct answer is edited in), "
    "target_true = alt (only the alternative for the 'prob' protocol, not a fact the model knows)",
}
"""Conventions for the new target of zsRE records."""


def from_zsre(raw: Raw, case_id: str, zsre_target: str) -> KnowledgeRecord:
    subject, src = raw.text("subject"), raw.text("src")
    answers = raw.texts("answers")
    if not answers:
        raise raw.error("answers", "empty list")
    alt = raw.target("alt")
    answer = answers[0].strip()
    target_new, target_true = (alt, answer) if zsre_target == "alt" else (answer, alt)
    neighborhood = []
    if raw.has("loc") or raw.has("loc_ans"):
        loc = raw.text("loc").rstrip()
        neighborhood.append(NeighborhoodPrompt(loc if loc.endswith("?") else loc + "?", raw.target("loc_ans")))
    return KnowledgeRecord(
        case_id=case_id,
        subject=subject,
        prompt=template_from_sentence(raw, "src", src, subject),
        relation_id="",
        target_new=target_new,
        target_true=target_true,
        paraphrases=raw.texts("rephrase", single_ok=True),
        neighborhood=neighborhood,
        source="zsre",
    )
