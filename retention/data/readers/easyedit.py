"""EasyEdit's flat records and KnowEdit's (nested ``locality``/``portability``), read by one converter; the formats
are described in :mod:`retention.data.readers`."""

from __future__ import annotations

from retention.data.readers.common import ALIASES, UNKNOWN, Raw, check_prompt, short, template_from_sentence
from retention.records import KnowledgeRecord, NeighborhoodPrompt, PortabilityPrompt


def _answer(raw: Raw, name: str) -> str:
    """The answer of a ground-truth field: a string, a list of answers or a list of alias lists (KnowEdit). The
    first answer is the target; further ones are counted as ignored."""
    value = raw.get(name, (str, list))
    if isinstance(value, str):
        return raw.target(name)
    flat = [a for group in value for a in group] if value and all(isinstance(v, list) for v in value) else value
    if not flat:
        raise raw.error(name, "empty list")
    if not all(isinstance(a, str) and a.strip() for a in flat):
        raise raw.error(name, f"expected answers (non-empty strings or lists of them), got {short(value)}")
    if len(flat) > 1:
        raw.ignore(name, ALIASES)
    return flat[0].strip()


def _prompt_answer_items(raw: Raw, name: str) -> list[tuple[list[str], str]]:
    """``(prompts, answer)`` of each ``{prompt, ground_truth}`` of a KnowEdit ``locality`` or ``portability``
    mapping (``{<kind>: [items]}``; a kind whose value is null, as in KnowEdit's parquet files, has none)."""
    if raw.data.get(name) is None:
        return []
    kinds = raw.child(name)
    out = []
    for kind, items in kinds.data.items():
        if items is None:
            continue
        if not isinstance(items, list):
            raise kinds.error(kind, f"expected a list of {{prompt, ground_truth}}, got {short(items)}")
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise kinds.error(f"{kind}[{i}]", f"expected {{prompt, ground_truth}}, got {short(item)}")
            entry = kinds.sub(f"{kind}[{i}]", item)
            if not entry.has("prompt"):
                raise entry.error("prompt", "missing")
            for extra in sorted(set(item) - {"prompt", "ground_truth"}):
                entry.ignore(extra, UNKNOWN)
            prompts = entry.texts("prompt", single_ok=True)
            for j, prompt in enumerate(prompts):
                check_prompt(entry, "prompt" if isinstance(item["prompt"], str) else f"prompt[{j}]", prompt)
            out.append((prompts, _answer(entry, "ground_truth")))
    return out


def _pairs(raw: Raw, prompts_name: str, answers_name: str) -> list[tuple[str, str]]:
    """Flat EasyEdit ``<x>_prompt`` and ``<x>_ground_truth`` (a string or a list each), paired up."""
    prompts = raw.texts(prompts_name, single_ok=True)
    answers = [t.strip() for t in raw.texts(answers_name, single_ok=True)]
    if len(prompts) != len(answers):
        raise raw.error(answers_name, f"{len(answers)} answer(s) for {len(prompts)} {prompts_name}(s); they must pair up")
    return list(zip(prompts, answers))


_EASYEDIT_FIELDS = {
    "case_id", "subject", "prompt", "src", "relation_id", "target_new", "ground_truth", "rephrase",
    "rephrase_prompt", "locality_prompt", "locality_ground_truth", "portability_prompt",
    "portability_ground_truth", "locality", "portability",
}  # fmt: skip


def from_easyedit(raw: Raw, case_id: str, zsre_target: str) -> KnowledgeRecord:
    """EasyEdit's flat records and KnowEdit's (nested ``locality``/``portability``), read by one converter."""
    if not raw.has("subject") and raw.has("concept"):
        raise raw.error("subject", "missing: a WikiBio record (text, labels, concept) edits a passage, not a fact "
                                   "with an old and a new answer")
    if not raw.has("ground_truth"):
        raise raw.error("ground_truth", "missing: the old answer is what the edit replaces (the 'prob' alternative, "
                                        "and what a control fact is measured against); KnowEdit's Wiki_recent "
                                        "inserts facts without one, which this measurement cannot use")
    prompt_field = "src" if raw.has("src") and not raw.has("prompt") else "prompt"
    if prompt_field == "prompt" and raw.has("src"):
        raw.ignore("src", "prompt is used")
    subject, prompt = raw.text("subject"), raw.text(prompt_field)
    target_new, target_true = raw.target("target_new"), _answer(raw, "ground_truth")
    paraphrases = raw.texts("rephrase_prompt", single_ok=True) + raw.texts("rephrase", single_ok=True)
    neighborhood = [NeighborhoodPrompt(p, t) for p, t in _pairs(raw, "locality_prompt", "locality_ground_truth")]
    neighborhood += [NeighborhoodPrompt(p, t) for ps, t in _prompt_answer_items(raw, "locality") for p in ps]
    portable = _pairs(raw, "portability_prompt", "portability_ground_truth")
    portable += [(p, t) for ps, t in _prompt_answer_items(raw, "portability") for p in ps]
    for name in sorted(set(raw.data) - _EASYEDIT_FIELDS):
        raw.ignore(name, UNKNOWN)
    return KnowledgeRecord(
        case_id=case_id,
        subject=subject,
        prompt=template_from_sentence(raw, prompt_field, prompt, subject),
        relation_id=raw.get("relation_id", str, ""),
        target_new=target_new,
        target_true=target_true,
        paraphrases=list(dict.fromkeys(paraphrases)),
        neighborhood=neighborhood,
        # An answer that is the new target (Subject_Aliasing) has the old answer as its alternative.
        portability=[PortabilityPrompt(p, t, target_true if t.casefold() == target_new.casefold() else None)
                     for p, t in portable],
        source="knowedit" if raw.has("locality") or raw.has("portability") else "easyedit",
    )
