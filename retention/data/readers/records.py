"""Our own knowledge records (:meth:`KnowledgeRecord.to_dict` objects in a JSON array or JSONL, as the built-in
set): every field known, nothing ignored."""

from __future__ import annotations

from dataclasses import fields

from retention.data.readers.common import Raw, short
from retention.records import KnowledgeRecord, NeighborhoodPrompt, PortabilityPrompt

_OWN_FIELDS = {f.name for f in fields(KnowledgeRecord)}


def from_records(raw: Raw, case_id: str, zsre_target: str) -> KnowledgeRecord:
    unknown = sorted(set(raw.data) - _OWN_FIELDS)
    if unknown:
        raise raw.error(unknown[0], f"unknown field (known: {', '.join(sorted(_OWN_FIELDS))})")
    neighborhood = []
    for i, item in enumerate(raw.get("neighborhood", list, [])):
        if not isinstance(item, dict):
            raise raw.error(f"neighborhood[{i}]", f"expected {{prompt, target}}, got {short(item)}")
        n = Raw(raw.path, raw.ref, item, f"neighborhood[{i}].")
        extra = sorted(set(item) - {"prompt", "target"})
        if extra:
            raise n.error(extra[0], "unknown field (known: prompt, target)")
        neighborhood.append(NeighborhoodPrompt(n.text("prompt"), n.target("target")))
    portability = []
    for i, item in enumerate(raw.get("portability", list, [])):
        if not isinstance(item, dict):
            raise raw.error(f"portability[{i}]", f"expected {{prompt, target, alternative}}, got {short(item)}")
        q = Raw(raw.path, raw.ref, item, f"portability[{i}].")
        extra = sorted(set(item) - {"prompt", "target", "alternative"})
        if extra:
            raise q.error(extra[0], "unknown field (known: prompt, target, alternative)")
        alternative = q.target("alternative") if item.get("alternative") is not None else None
        portability.append(PortabilityPrompt(q.text("prompt"), q.target("target"), alternative))
    return KnowledgeRecord(
        case_id=case_id,
        subject=raw.text("subject"),
        prompt=raw.text("prompt"),
        relation_id=raw.get("relation_id", str, ""),
        target_new=raw.target("target_new"),
        target_true=raw.target("target_true"),
        paraphrases=raw.texts("paraphrases"),
        neighborhood=neighborhood,
        generation_prompts=raw.texts("generation_prompts"),
        augmentations=raw.texts("augmentations"),
        source=raw.get("source", str, ""),
        portability=portability,
    )

