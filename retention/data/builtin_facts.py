"""The built-in knowledge set: fact tables and relation phrasings written for this project.

The tables are data: ``retention/resources/builtin_relations.yaml`` holds each relation's (subject, object)
pairs and generation prompts, and says how many phrasings of the relation's templates (the one table of
:mod:`retention.data.relations`, ``retention/resources/relations.yaml``) the records draw from.
:func:`build_builtin_facts` turns them into :class:`KnowledgeRecord` s; running this module keeps the facts
the default model answers correctly under ``top1`` and writes the shipped
``retention/resources/builtin_facts.json``::

    python -m retention.data.builtin_facts --out retention/resources/builtin_facts.json
"""

from __future__ import annotations

import argparse
import random
import time
from collections import Counter
from collections.abc import Callable, Collection, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

from retention.data.relations import RELATIONS as RELATION_TABLE
from retention.data.relations import load_resource
from retention.io import atomic_write_json
from retention.records import KnowledgeRecord, NeighborhoodPrompt, Probe

BUILTIN_FACTS_PATH = Path(__file__).resolve().parents[1] / "resources" / "builtin_facts.json"
BUILTIN_RELATIONS_RESOURCE = "builtin_relations.yaml"
N_PARAPHRASES = 2
N_AUGMENTATIONS = 3
N_NEIGHBOURS = 3
N_GENERATION = 2


@dataclass(frozen=True)
class BuiltinRelation:
    """One relation of the built-in set (built from ``builtin_relations.yaml`` and the relation table)."""

    relation_id: str
    """Wikidata property id, a key of the relation table."""
    name: str
    templates: tuple[str, ...]
    """The main (rewrite) template and the phrasings the records draw evaluation paraphrases and augmentation
    phrasings from: the first ``1 + phrasings`` templates of the relation table."""
    generation_templates: tuple[str, ...]
    """Open-ended prompts about the subject, for the ``gen`` protocol and fluency checks."""
    facts: tuple[tuple[str, str], ...]
    """(subject, object) pairs."""

    @property
    def objects(self) -> list[str]:
        """Distinct objects, in table order."""
        return list(dict.fromkeys(o for _, o in self.facts))

    def case_id(self, index: int) -> str:
        return f"builtin:{self.relation_id}:{index:03d}"


def _load_relations() -> tuple[BuiltinRelation, ...]:
    rels = []
    for row in load_resource(BUILTIN_RELATIONS_RESOURCE):
        rel, n = RELATION_TABLE[row["relation"]], row["phrasings"]
        if not 0 < n < len(rel.templates):
            raise ValueError(f"{rel.id}: phrasings {n}, but the relation has {len(rel.templates)} templates")
        rels.append(
            BuiltinRelation(
                rel.id,
                rel.name,
                rel.templates[: 1 + n],
                tuple(row["generation_templates"]),
                tuple((subject, obj) for subject, obj in row["facts"]),
            )
        )
    return tuple(rels)


RELATIONS: tuple[BuiltinRelation, ...] = _load_relations()


def _first_word(text: str) -> str:
    return text.split()[0].lower()


def build_builtin_facts(
    seed: int = 0, keep: Collection[str] | None = None, first_token: Callable[[str], Hashable] = _first_word
) -> list[KnowledgeRecord]:
    """Records of the built-in set, every draw seeded per case so that filtering does not move the others.

    ``keep``: case ids to build (default all). Neighbourhood prompts come only from kept facts of the same
    relation (so a neighbour is a fact the model knows). Counterfactual targets come from all objects of the
    relation whose ``first_token`` (default: first word; pass a tokenizer's so ``top1`` can tell them apart)
    differs from the true object's and the subject's.
    """
    records = []
    for rel in RELATIONS:
        kept = [i for i in range(len(rel.facts)) if keep is None or rel.case_id(i) in keep]
        for i in kept:
            subject, target_true = rel.facts[i]
            rng = random.Random(f"{seed}:{rel.case_id(i)}")
            news = [o for o in rel.objects if first_token(o) not in (first_token(target_true), first_token(subject))]
            target_new = rng.choice(news)
            phrasings = list(rel.templates[1:])
            rng.shuffle(phrasings)
            evaluation, augmentation = phrasings[:N_PARAPHRASES], phrasings[N_PARAPHRASES:][:N_AUGMENTATIONS]
            others = [j for j in kept if j != i and rel.facts[j][1] != target_new]
            neighbours = [rel.facts[j] for j in rng.sample(others, min(N_NEIGHBOURS, len(others)))]
            generation = rng.sample(rel.generation_templates, min(N_GENERATION, len(rel.generation_templates)))
            records.append(
                KnowledgeRecord(
                    case_id=rel.case_id(i),
                    subject=subject,
                    prompt=rel.templates[0],
                    relation_id=rel.relation_id,
                    target_new=target_new,
                    target_true=target_true,
                    paraphrases=[t.format(subject) for t in evaluation],
                    neighborhood=[NeighborhoodPrompt(rel.templates[0].format(s), o) for s, o in neighbours],
                    generation_prompts=[t.format(subject) for t in generation],
                    augmentations=augmentation,
                    source="builtin",
                )
            )
    return records


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m retention.data.builtin_facts",
        description="Build the built-in knowledge set, keep the facts a model knows under top1, write JSON.",
    )
    parser.add_argument("--out", type=Path, default=BUILTIN_FACTS_PATH, help="output JSON file")
    parser.add_argument("--model", default="smollm2-135m", help="model whose known facts are kept")
    parser.add_argument("--seed", type=int, default=0, help="seed of counterfactual targets and sampled prompts")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-filter", action="store_true", help="keep every candidate (no model is loaded)")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    if args.no_filter:
        candidates = records = build_builtin_facts(args.seed)
    else:
        from retention.models import load_model
        from retention.scoring import score_probes, target_ids

        model, tokenizer = load_model(args.model)

        def first_token(text: str) -> int:
            return target_ids(tokenizer, text)[0]

        candidates = build_builtin_facts(args.seed, first_token=first_token)
        probes = [Probe(r.rewrite_prompt, r.target_true, r.target_new, "control", r.case_id) for r in candidates]
        results = score_probes(model, tokenizer, probes, protocols=("top1",), batch_size=args.batch_size, progress=True)
        known = {res.probe.case_id for res in results if res.passed["top1"]}
        records = build_builtin_facts(args.seed, known, first_token)
    total, kept = Counter(r.relation_id for r in candidates), Counter(r.relation_id for r in records)
    print(f"{'relation':<10} {'name':<20} {'candidates':>10} {'kept':>6}")
    for rel in RELATIONS:
        print(f"{rel.relation_id:<10} {rel.name:<20} {total[rel.relation_id]:>10} {kept[rel.relation_id]:>6}")
    print(f"{'total':<31} {sum(total.values()):>10} {len(records):>6}")
    atomic_write_json(args.out, [r.to_dict() for r in records])
    print(f"wrote {len(records)} records to {args.out} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
