"""Per-fact features (docs/analysis.md defines each): the t=0 margin and confidence, the edit's diagnostics,
the subject's length in tokens, corpus frequencies of subject, target and alternative, and the run's
settings; and :func:`load_facts`, which reads the facts of finished runs with their features.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from retention.data.phrasings import TEMPLATE_SOURCES, template_phrasings
from retention.io import nan_for_null
from retention.study.analysis.facts import Fact, Probes, read_probes, run_facts
from retention.study.results import RunResult, load_results


def count_terms(text: str, terms: Sequence[str]) -> dict[str, int]:
    """Case-insensitive whole-word occurrences of each term in ``text`` (a term may span words: "New York").

    >>> count_terms("New York, new york; Newark.", ["New York", "York", "New"])
    {'New York': 2, 'York': 2, 'New': 2}
    """
    lower = text.lower()
    out = {}
    for term in dict.fromkeys(t.strip() for t in terms if t and t.strip()):
        out[term] = len(re.findall(r"(?<!\w)" + re.escape(term.lower()) + r"(?!\w)", lower))
    return out


def _run_config(folder: Path) -> dict:
    """The run's resolved config: ``config.yaml`` (LightningCLI's), else the study's record of it."""
    path = folder / "config.yaml"
    if path.is_file():
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    done = folder / "study_run.json"
    if done.is_file():
        tree: dict = {}
        for key, value in json.loads(done.read_text(encoding="utf-8")).get("config", {}).items():
            node = tree
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        return tree
    return {}


def _get(tree: dict, dotted: str, default: Any = None) -> Any:
    """``tree[a][b]`` for ``dotted`` ``a.b``; ``default`` where a part is missing."""
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return default
        tree = tree[part]
    return tree


class FeatureSources:
    """Knowledge records, tokenizers and corpus counts shared by the runs (each loaded once)."""

    def __init__(self, corpus: str | None):
        self.records: dict[tuple[str, str], dict[str, Any]] = {}
        self.tokenizers: dict[str, Any] = {}
        self.notes: list[str] = []
        self.corpus_text: str | None = None
        self.corpus_id = None
        self.counts: dict[str, int] = {}
        if corpus:
            from retention.corpus import corpus_text

            try:
                self.corpus_text, self.corpus_id = corpus_text(corpus, min_chars=5_000_000, what="analysis corpus")
            except (FileNotFoundError, ImportError, OSError) as err:
                self.notes.append(f"corpus frequencies left out: {err}")

    def knowledge(self, source: str | None, on_error: str = "raise") -> dict[str, Any]:
        """The records of a knowledge source by case id; empty (with a note) when it cannot be read."""
        if not source:
            return {}
        key = (str(source), on_error)
        if key not in self.records:
            from retention.data.readers import load_records

            try:
                self.records[key] = {str(r.case_id): r for r in load_records(source, on_error=on_error)}
            except (OSError, ValueError) as err:
                self.notes.append(f"knowledge {source!r} could not be read ({err}): no subject, relation or "
                                  "corpus features for its facts")
                self.records[key] = {}
        return self.records[key]

    def tokenizer(self, model: str | None):
        """The model's tokenizer; None (with a note) when it cannot be loaded."""
        if not model:
            return None
        if model not in self.tokenizers:
            from retention.models import load_tokenizer

            try:
                self.tokenizers[model] = load_tokenizer(model)
            except Exception as err:  # noqa: BLE001 (any failure only leaves the token counts out)
                self.notes.append(f"tokenizer of {model!r} could not be loaded ({type(err).__name__}: {err}): "
                                  "no subject token counts")
                self.tokenizers[model] = None
        return self.tokenizers[model]

    def frequency(self, term: str | None) -> float:
        """Whole-word occurrences of ``term`` in the reference corpus; NaN without a corpus or a term."""
        if self.corpus_text is None or not term:
            return math.nan
        term = term.strip()
        if term not in self.counts:
            self.counts.update(count_terms(self.corpus_text, [term]))
        return float(self.counts.get(term, 0))


def _subject_tokens(tokenizer, record) -> float:
    if tokenizer is None or record is None:
        return math.nan
    text = record.subject if record.prompt.lstrip().startswith("{}") else " " + record.subject
    return float(len(tokenizer(text, add_special_tokens=False)["input_ids"]))


def _effective_k(record, k: int, source: str, seed: int) -> float:
    """Augmentation phrasings the run gave this fact: recomputed for the deterministic sources (``record``,
    ``relations``: a record can get fewer than ``k``), ``k`` itself for ``model``."""
    if k <= 0:
        return 0.0
    if record is None or source not in TEMPLATE_SOURCES:
        return float(k)
    try:
        return float(len(template_phrasings(record, k, source, seed)))
    except (KeyError, ValueError):
        return float(k)


def tokens_per_step(config: dict, world_size: int | None = None) -> float:
    """Tokens one optimiser step sees on a packed text task (batch x block x ranks x accumulation; the ranks
    from the run's recorded world size, else the config's devices x nodes when they are numbers, else one);
    NaN for the other families, whose examples vary in length.

    >>> config = {"data": {"batch_size": 8, "task": {"family": "text", "block_size": 128}}}
    >>> tokens_per_step(config), tokens_per_step(config, world_size=4)
    (1024.0, 4096.0)
    """
    if _get(config, "data.task.family") != "text":
        return math.nan
    if not world_size:
        devices = _get(config, "trainer.devices", 1)
        world_size = (devices if isinstance(devices, int) and devices > 0 else 1) * int(
            _get(config, "trainer.num_nodes", 1) or 1)
    return float(int(_get(config, "data.batch_size", 1)) * int(_get(config, "data.task.block_size", 1))
                 * world_size * int(_get(config, "trainer.accumulate_grad_batches", 1) or 1))


def add_features(facts: Sequence[Fact], result: RunResult, ctx: FeatureSources) -> None:
    """Per-fact features of one run's facts (see docs/analysis.md for each)."""
    config = _run_config(result.folder)
    run = result.summary.get("run", {})
    diagnostics = {str(d.get("case_id")): d for d in run.get("edit_diagnostics") or [] if isinstance(d, dict)}
    records = dict(ctx.knowledge(_get(config, "edits.knowledge", run.get("knowledge")),
                                 _get(config, "edits.on_error", "raise")))
    controls = _get(config, "edits.controls")
    if controls:
        records.update(ctx.knowledge(controls, _get(config, "edits.on_error", "raise")))
    tokenizer = ctx.tokenizer(_get(config, "model.model_name", run.get("model")))
    layers = [int(x) for x in run.get("edited_layers") or []]
    k = int(_get(config, "paraphrases.k", 0) or 0)
    source = str(_get(config, "paraphrases.source", "record"))
    k_seed = int(_get(config, "paraphrases.seed", 0) or 0)
    lr = _get(config, "model.optimizer.lr")
    for fact in facts:
        record = records.get(fact.case_id)
        t0 = fact.t0
        margin = t0.get("target_logprob", math.nan) - t0.get("alt_logprob", math.nan)
        # Memory editors (GRACE, WISE) change no weight: their update norms are null.
        diag = nan_for_null(diagnostics.get(fact.case_id, {}), ("delta_norm", "relative_update")) \
            if fact.set == "edited" else {}
        target_freq = ctx.frequency(t0.get("target"))
        alternative_freq = ctx.frequency(t0.get("alternative"))
        subject_freq = ctx.frequency(record.subject if record else None)
        f = {
            "edited": 1.0 if fact.set == "edited" else 0.0,
            "margin_t0": margin,
            "target_logprob_t0": float(t0.get("target_logprob", math.nan)),
            "target_rank_t0": float(t0["target_rank"]) if t0.get("target_rank") is not None else math.nan,
            "relation": record.relation_id if record else "",
            "subject": record.subject if record else "",
            "subject_tokens": _subject_tokens(tokenizer, record),
            "subject_freq": subject_freq,
            "target_freq": target_freq,
            "alternative_freq": alternative_freq,
            "log_subject_freq": math.log1p(subject_freq),
            "log_target_freq": math.log1p(target_freq),
            "log_alternative_freq": math.log1p(alternative_freq),
            "steps": float(fact.steps[-1]),
            "log10_lr": math.log10(float(lr)) if lr else math.nan,
            "n_edit": float(run.get("n_edit", math.nan)),
            "tokens_per_step": tokens_per_step(config, result.summary.get("environment", {}).get("world_size")),
        }
        if fact.set == "edited":
            f.update({
                "update_norm": float(diag.get("delta_norm", math.nan)),
                "relative_update": float(diag.get("relative_update", math.nan)),
                "layer": float(diag["layer"]) if "layer" in diag else (float(np.mean(layers)) if layers else math.nan),
                "n_layers": float(len(layers)) if layers else math.nan,
                "k": _effective_k(record, k, source, k_seed),
                "k_nominal": float(k),
            })
        fact.features = f


def load_facts(folders: Sequence[str | Path], corpus: str | None = "wikitext2") -> tuple[list[Fact], list[str]]:
    """Every edited and intrinsic fact of the finished runs in ``folders`` (study or run folders), with
    features; and notes on what could not be computed."""
    results, _, missing = load_results(folders)
    runs = [(r, read_probes(r.folder)) for r in results]
    facts, notes = facts_of(runs, corpus)
    if missing:
        notes.append(f"{len(missing)} unfinished runs left out")
    return facts, notes


def facts_of(runs: Sequence[tuple[RunResult, Probes]],
             corpus: str | None = "wikitext2") -> tuple[list[Fact], list[str]]:
    """The facts of runs with their probe records (:func:`read_probes`), with features; and notes."""
    ctx = FeatureSources(corpus)
    facts: list[Fact] = []
    for r, probes in runs:
        if not probes:
            ctx.notes.append(f"{r.folder}: no probes/step_*.jsonl; left out")
            continue
        c = r.condition
        mine = run_facts(probes, study=c.study, cell=c.cell, arm=c.arm, seed=r.seed, run=r.folder.name)
        add_features(mine, r, ctx)
        facts.extend(mine)
    if ctx.corpus_id:
        ctx.notes.append(f"corpus frequencies from {ctx.corpus_id}")
    return facts, ctx.notes
