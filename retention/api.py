"""The Python API: what the commands do, as functions on a model in memory.

::

    import retention

    model, tokenizer = retention.load_model("smollm2-135m")
    facts = retention.select_known(model, tokenizer, retention.load_facts("builtin"), n=3)
    before = retention.score(model, tokenizer, facts)
    result = retention.edit(model, tokenizer, facts, editor="rome")   # the model is now edited
    after = retention.score(model, tokenizer, facts)
    print(before, after, sep="\\n\\n")
    result.revert(model)                                                # and back, bit for bit

``retention`` imports these lazily, so ``import retention`` stays cheap; ``retention.api`` is the same module.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from retention.editing.base import EditorHParams, EditRequest, EditResult
from retention.models import DEFAULT_MODEL
from retention.records import KnowledgeRecord

if TYPE_CHECKING:
    from retention.metrics import Rate
    from retention.scoring import ProbeResult

__all__ = ["EditResult", "KnowledgeRecord", "Scores", "edit", "load_facts", "load_model", "score", "select_known"]

_NAMES: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()
"""The name each model was loaded under, for the editor preset :func:`edit` picks."""


def load_model(
    name: str = DEFAULT_MODEL, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
    trust_remote_code: bool = False,
) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)``, the model in eval mode: ``smollm2-135m`` (the default), ``tiny-llama`` /
    ``tiny-gpt2`` (random, for tests), a local folder, a ``.gguf`` file or a Hugging Face hub id. ``dtype``
    defaults to float32 on CPU and bfloat16 on GPUs that support it; edit in float32 for exact results."""
    from retention.models import load_model as _load

    model, tokenizer = _load(name, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    _NAMES[model] = name
    return model, tokenizer


def load_facts(
    source: str | Path = "builtin", n: int | None = None, on_error: Literal["raise", "skip"] = "raise",
    zsre_target: str = "alt",
) -> list[KnowledgeRecord]:
    """Knowledge records: ``builtin`` (the shipped facts) or a CounterFact, zsRE, KnowEdit or retention JSON(L)
    file (the format is detected); ``n`` keeps the first ``n``; ``on_error="skip"`` skips malformed records
    (logged) instead of raising an error naming the file, record and field."""
    from retention.data.readers import load_records

    return load_records(source, on_error=on_error, limit=n, zsre_target=zsre_target)


def select_known(
    model: nn.Module, tokenizer, records: Sequence[KnowledgeRecord], n: int | None = None,
    protocol: str = "top1", batch_size: int = 16,
) -> list[KnowledgeRecord]:
    """The records the model knows (answers with ``target_true`` under ``protocol``: top1, prob, token_acc, gen;
    ``none`` keeps all), in order; with ``n``, the first ``n`` of them (fewer, with a warning, if not found)."""
    from retention.data.selection import select_known as _select

    return _select(model, tokenizer, list(records), protocol, n, batch_size)


def edit(
    model: nn.Module, tokenizer, records: Sequence[KnowledgeRecord | EditRequest], editor: str = "rome",
    hparams: str | Path | dict[str, Any] | EditorHParams | None = None,
    mode: Literal["batch", "sequential"] = "batch", batch_size: int = 1, model_name: str | None = None,
    **overrides: Any,
) -> EditResult:
    """Edit ``records`` (each ``prompt.format(subject)`` to continue with ``target_new``) into ``model`` and
    return the :class:`EditResult`, already applied (``result.revert(model)`` restores the weights bit for bit).

    ``editor``: rome, memit, alphaedit, ft-l, ft-m or the import path of an ``Editor`` subclass of your own.
    ``hparams``: a YAML file, a preset name, an ``EditorHParams`` or a mapping of fields over the preset; None
    for the preset named after the model (``model_name``, else the name :func:`load_model` loaded it under).
    ``overrides``: fields that replace the resolved ones (``layer=4``). ``mode``: ``batch`` (one editor call)
    or ``sequential`` (calls of ``batch_size`` requests, each applied before the next is computed).
    """
    from retention.editing.base import run_edits
    from retention.editing.registry import build_editor

    if mode not in ("batch", "sequential"):
        raise ValueError(f"mode={mode!r}: choose batch or sequential (the single protocol edits one fact per model: "
                         "call edit once per fact and revert in between)")
    if not records:
        raise ValueError("no records to edit")
    name = model_name if model_name is not None else _NAMES.get(model) or getattr(model, "name_or_path", None)
    editor_ = build_editor(editor, hparams, name, **overrides)
    requests = [r if isinstance(r, EditRequest) else EditRequest.from_record(r) for r in records]
    results = run_edits(editor_, model, tokenizer, requests, mode, batch_size)
    if len(results) == 1:
        return results[0]
    merged = EditResult.merge(results)
    # The weights as they were before the first call, so the merged result reverts the whole sequence exactly.
    for result in results:
        for param, original in result._originals.items():
            merged._originals.setdefault(param, original)
    return merged


@dataclass
class Scores:
    """Probe results and their rates per probe group and protocol (``print`` gives the table)."""

    protocols: tuple[str, ...]
    results: list[ProbeResult]

    @property
    def rates(self) -> dict[str, dict[str, Rate]]:
        """``{group: {protocol: {"value", "count", "denominator"}}}`` over the groups present (``edit``: the
        rewrite prompts, ``edit_paraphrase``, ``edit_neighborhood``; ``control``, ``control_paraphrase``)."""
        from retention.metrics import rate
        from retention.records import GROUPS, probe_group

        out: dict[str, dict[str, Rate]] = {}
        for group in GROUPS:
            rs = [r for r in self.results if probe_group(r.probe.kind) == group]
            if rs:
                out[group] = {p: rate(sum(bool(r.passed.get(p)) for r in rs), sum(p in r.passed for r in rs))
                              for p in self.protocols}
        return out

    def rate(self, group: str = "edit", protocol: str = "top1") -> float:
        """The pass rate of a probe group under a protocol (NaN when nothing was scored)."""
        return self.rates[group][protocol]["value"]

    def passed(self, protocol: str = "top1", group: str = "edit") -> dict[str, bool]:
        """Per fact (case id): whether its probe of ``group`` passes under ``protocol`` (first probe per fact)."""
        from retention.records import probe_group

        out: dict[str, bool] = {}
        for r in self.results:
            if probe_group(r.probe.kind) == group and protocol in r.passed:
                out.setdefault(r.probe.case_id, bool(r.passed[protocol]))
        return out

    def table(self) -> str:
        from retention.records import GROUP_LABELS

        rates = self.rates
        lines = [f"{'probes':<18}{'n':>6}" + "".join(f"{p:>16}" for p in self.protocols)]
        for group, by_protocol in rates.items():
            n = max(r["denominator"] for r in by_protocol.values())
            cells = "".join(f"{by_protocol[p]['value']:>8.1%} {by_protocol[p]['count']:>3}/{by_protocol[p]['denominator']:<3}"
                            for p in self.protocols)
            lines.append(f"{GROUP_LABELS[group]:<18}{n:>6}" + cells)
        return "\n".join(lines)

    __str__ = table

    def to_dict(self) -> dict[str, Any]:
        return {"protocols": list(self.protocols), "rates": self.rates, "probes": [r.to_dict() for r in self.results]}


def score(
    model: nn.Module, tokenizer, records: Sequence[KnowledgeRecord], protocols: Sequence[str] = ("top1", "prob"),
    probes: Literal["edit", "true"] = "edit", batch_size: int = 16, max_new_tokens: int = 10,
) -> Scores:
    """Score ``records`` under ``protocols`` (top1, prob, token_acc, gen), as ``retention edit`` does.

    ``probes="edit"`` asks for the edit (rewrite prompt and paraphrases expect ``target_new``; neighbourhood
    prompts keep their own answers): edit success after an edit, near 0 before it. ``probes="true"`` asks for
    the facts as they were (``target_true`` against ``target_new``): what the model knows, as for controls."""
    from retention.scoring import check_protocols, score_probes

    protocols = check_protocols(protocols)
    if probes not in ("edit", "true"):
        raise ValueError(f"probes={probes!r}: choose edit or true")
    probe_list = [p for r in records for p in (r.edit_probes() if probes == "edit" else r.true_probes())]
    results = score_probes(model, tokenizer, probe_list, protocols=protocols, batch_size=batch_size,
                           max_new_tokens=max_new_tokens)
    return Scores(tuple(protocols), results)
