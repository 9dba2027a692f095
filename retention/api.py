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

:func:`fit`, :func:`run_study` and :func:`report` run ``retention fit``, ``study`` and ``report`` with the same
options (``retention.study`` is the package of the study machinery, hence ``run_study``).
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

__all__ = ["CommandError", "EditResult", "KnowledgeRecord", "Scores", "edit", "fit", "load_facts", "load_model",
           "report", "run_study", "score", "select_known"]

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

    return _select(model, tokenizer, list(records), n, protocol, batch_size)


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
    return results[0] if len(results) == 1 else EditResult.merge(results)


@dataclass
class Scores:
    """Probe results and their rates per probe group and protocol (``print`` gives the table)."""

    protocols: tuple[str, ...]
    results: list[ProbeResult]

    @property
    def rates(self) -> dict[str, dict[str, Rate]]:
        """``{group: {protocol: {"value", "count", "denominator"}}}`` over the groups present (``edit``: the
        rewrite prompts, ``edit_paraphrase``, ``edit_neighborhood``; ``control``, ``control_paraphrase``)."""
        from retention.callbacks.probing import outcomes
        from retention.metrics import ProbeCounts
        from retention.records import GROUPS, probe_group

        present = {probe_group(r.probe.kind) for r in self.results}
        groups = [g for g in GROUPS if g in present]
        counts = ProbeCounts(groups, self.protocols)
        counts.update(*outcomes(self.results, self.results, groups, self.protocols))
        return counts.rates()["accuracy"]

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

    def __repr__(self) -> str:
        facts = len({r.probe.case_id for r in self.results})
        rates = self.rates
        edit = {p: f"{r['count']}/{r['denominator']}" for p, r in rates.get("edit", {}).items()}
        return (f"Scores(facts={facts}, probes={len(self.results)}, protocols={self.protocols!r}, groups="
                f"{list(rates)!r}, edit={edit!r})")

    def to_dict(self) -> dict[str, Any]:
        return {"protocols": list(self.protocols), "rates": self.rates, "probes": [r.to_dict() for r in self.results]}

    def to_records(self) -> list[dict[str, Any]]:
        """One flat dict per probe: ``case_id``, ``group``, ``kind``, ``prompt``, ``target``, ``alternative``,
        ``passed_<protocol>`` for each protocol (None where the protocol does not score the probe, as ``prob``
        for a probe without an alternative), ``target_logprob``, ``alt_logprob`` (NaN where not computed),
        ``top1_token``, ``target_rank``, ``generation``.

        >>> from retention.records import Probe
        >>> from retention.scoring import ProbeResult
        >>> scores = Scores(("top1",), [ProbeResult(Probe("The capital of France is", "Paris", kind="rewrite",
        ...                                                case_id="7"), passed={"top1": True})])
        >>> scores.to_records()[0]["passed_top1"], scores.to_records()[0]["group"]
        (True, 'edit')
        >>> scores
        Scores(facts=1, probes=1, protocols=('top1',), groups=['edit'], edit={'top1': '1/1'})
        """
        from retention.records import probe_group

        rows = []
        for r in self.results:
            row = r.to_dict()
            passed = row.pop("passed")
            rows.append({"case_id": row.pop("case_id"), "group": probe_group(r.probe.kind), "kind": row.pop("kind"),
                         **{k: row.pop(k) for k in ("prompt", "target", "alternative")},
                         **{f"passed_{p}": passed.get(p) for p in self.protocols}, **row})
        return rows

    def to_pandas(self):
        """:meth:`to_records` as a ``pandas.DataFrame`` (``passed_*`` columns of pandas' nullable boolean type)."""
        import pandas as pd

        frame = pd.DataFrame(self.to_records())
        return frame.astype({f"passed_{p}": "boolean" for p in self.protocols})


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


class CommandError(RuntimeError):
    """A command run through the API (:func:`fit`, :func:`run_study`, :func:`report`) that failed; its exit status
    is ``status`` and its message went to stderr."""

    def __init__(self, command: str, status: int):
        self.status = status
        super().__init__(f"retention {command} exited with status {status} (its message is above, on stderr)")


def _flags(options: dict[str, Any]) -> list[str]:
    """``--name=value`` per option whose value is not None (lists and mappings as JSON, booleans as true/false).

    >>> _flags({"out": "runs/r", "plots": False, "folders": None, "tags": ["a", "b"]})
    ['--out=runs/r', '--plots=false', '--tags=["a", "b"]']
    """
    import json

    def text(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        return json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)

    return [f"--{name}={text(value)}" for name, value in options.items() if value is not None]


def _run(command: str, main, argv: list[str]) -> None:
    try:
        status = main(argv)
    except SystemExit as exit_:  # a parse error, as on the command line
        status = exit_.code if isinstance(exit_.code, int) else 1
    if status:
        raise CommandError(command, int(status))


def fit(*configs: str | Path | dict[str, Any], **options: Any) -> None:
    """``retention fit``: edit, fine-tune and measure retention, writing a run folder (``run.out_dir``/``run.name``).

    ``configs``: config files or mappings, applied in order as ``--config`` layers; ``options``: what the flags
    set, a group as a mapping (``trainer={"max_steps": 5}`` is ``--trainer.max_steps 5``, merged key by key over the
    configs) or a top-level option (``ckpt_path="last"``). Raises :class:`CommandError` when the run fails::

        retention.fit("configs/demo.yaml", run={"name": "demo", "overwrite": True}, trainer={"max_steps": 20})
    """
    import yaml

    from retention.commands.fit import main

    layers = [str(c) if isinstance(c, (str, Path)) else yaml.safe_dump(dict(c), sort_keys=False) for c in configs]
    dotted = {f"{group}.{k}": v for group, value in options.items() if isinstance(value, dict) for k, v in value.items()}
    top = {k: v for k, v in options.items() if not isinstance(v, dict)}
    argv = [arg for layer in layers for arg in ("--config", layer)]
    if dotted or top:
        argv += ["--config", yaml.safe_dump({**dotted, **top}, sort_keys=False)]
    _run("fit", main, argv)


def run_study(config: str | Path, out_dir: str | Path | None = None, dry_run: bool = False, jobs: int = 1,
              deadline: int | None = None, redo_changed: bool = False, report: bool = True) -> None:
    """``retention study -c config``: run a whole study (resumable) and write its report; the options are the
    command's (``retention study --help``). Raises :class:`CommandError` when a run fails or an option is bad."""
    from retention.commands.study import main

    _run("study", main, ["--config", str(config), *_flags({
        "out_dir": out_dir, "dry_run": dry_run, "jobs": jobs, "deadline": deadline, "redo_changed": redo_changed,
        "report": report})])


def report(folders: str | Path | Sequence[str | Path], out: str | Path | None = None, plots: bool = True,
           analysis: bool = False, mixed_provenance: Literal["refuse", "label"] = "refuse",
           analysis_corpus: str | None = "wikitext2", html: bool = False) -> None:
    """``retention report folders...``: retention with confidence intervals over study or run folders, written
    to ``out`` (default ``<folder>/report`` for one folder, else ``runs/report``); the options are the command's
    (``retention report --help``). Raises :class:`CommandError` when the folders cannot be reported on."""
    from retention.commands.report import main

    folders = [folders] if isinstance(folders, (str, Path)) else list(folders)
    _run("report", main, [*map(str, folders), *_flags({
        "out": out, "plots": plots, "analysis": analysis, "mixed_provenance": mixed_provenance,
        "analysis_corpus": "null" if analysis_corpus is None else analysis_corpus, "html": html})])
