"""``retention edit``: edit facts into a model, report edit success next to the unedited model, save the result.

Edit success is scored on each fact's rewrite prompt, its held-out paraphrases and its neighbourhood prompts
(other subjects that must keep their own answers) under the ``top1`` and ``prob`` protocols, before and after.
Writes ``scores.json`` (the table and every probe's result), the ``EditResult`` (``edit/``; ``edits/<case_id>/``
in ``single`` mode) and the edited model as safetensors (``model/``; not in ``single`` mode, where every edit
is applied alone to the unedited model). In ``batch`` and ``sequential`` mode it also writes what a
``retention fit`` run needs to use the edit instead of making it (``edits.precomputed: OUT``): the facts as
edited (``facts.jsonl``), the edited weights themselves (``edited_weights.safetensors``: bit for bit what the
editor left, which the summed deltas of a sequential edit are not) and the unedited model's weight
fingerprint (``base_fingerprint`` in ``scores.json``).

``--dtype`` other than float32 (bfloat16 or float16, for models too large for float32 on the device) edits and
scores in that dtype (the editors' statistics and solves stay float32/float64) but writes neither ``facts.jsonl``
nor ``edited_weights.safetensors``: ``retention fit`` loads the model in float32, so only a float32 edit can be
its ``edits.precomputed``.

Facts whose new and true targets share their first token pass or fail ``top1`` alike, edited or not: they are
counted (``top1_blind_edits`` in ``scores.json``) and warned about.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from jsonargparse.typing import PositiveInt

from retention.commands.options import Device, OnError, UsageError, check_device, command_parser, run_main
from retention.commands.probe import check_model
from retention.data.edit_folder import EDITED_WEIGHTS, FACTS, SCORES
from retention.editing.easyedit import PREFIX as EASYEDIT_PREFIX
from retention.io import atomic_path, atomic_write_json, atomic_write_text, safe_name
from retention.metrics import ProbeCounts, count_rates, probe_counts
from retention.models import DEFAULT_MODEL, load_model, model_fingerprint
from retention.provenance import provenance
from retention.records import GROUP_LABELS, probe_group
from retention.scoring import score_probes, top1_blind

PROTOCOLS = ("top1", "prob")
_GROUPS = ("edit", "edit_paraphrase", "edit_neighborhood", "edit_portability")


@dataclass
class EditArgs:
    """The model, editor, facts and edit mode, and what to save."""

    model: str = DEFAULT_MODEL
    """Model: smollm2-135m, tiny-llama, tiny-gpt2, a local folder, a .gguf file or a hub id."""
    editor: str = "rome"
    """Editor: rome, ft-l, ft-m, memit, alphaedit, or the import path of an Editor subclass (package.module.Class)."""
    data: str = "builtin"
    """Knowledge records: 'builtin' or a CounterFact / zsRE / retention JSON(L) file."""
    n: PositiveInt = 50
    """Number of facts to edit (the first N, after --select_known)."""
    mode: Literal["batch", "sequential", "single"] = "sequential"
    """batch (one call), sequential (one after another) or single (each alone on the unedited model; ROME, MEMIT
    and AlphaEdit optimise the single edits' targets together)."""
    batch_size: PositiveInt = 1
    """Requests per editor call in sequential mode."""
    hparams: str | None = None
    """Editor hyperparameters: a YAML file or a preset name (default: the preset named after --model)."""
    set: dict[str, Any] | None = None
    """Hyperparameter overrides as a YAML mapping, e.g. --set '{layer: 6, v_lr: 0.1}'."""
    select_known: Literal["top1", "prob", "token_acc", "gen", "none"] = "top1"
    """Keep only facts the unedited model knows under this protocol; 'none' keeps all."""
    out: str = "runs/edit"
    """Output folder."""
    save_model: bool = True
    """Save the edited model (safetensors) under OUT/model."""
    batch_size_scoring: PositiveInt = 16
    """Probes per forward pass when scoring."""
    on_error: OnError = "raise"
    """Malformed records: raise (naming file, record and field), or skip and count."""
    device: Device = "auto"
    """Device to edit on: auto (cuda when available, else cpu), cpu, cuda or cuda:i."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Model dtype. float32 is what `retention fit` loads; with another dtype the folder cannot be its
    edits.precomputed (facts.jsonl and edited_weights.safetensors are not written)."""


ARGS = EditArgs


def parser():
    return command_parser(EditArgs, __doc__)


def check(args: EditArgs) -> None:
    """What can be checked before loading the model: N, the editor, the hyperparameters file and the device."""
    from retention.editing.registry import editor_class

    if args.n < 1:
        raise UsageError(f"--n {args.n} must be at least 1 (the number of facts to edit)")
    try:
        editor_class(args.editor)
    except ValueError as err:
        raise UsageError(f"--editor: {err}") from None
    hparams_file = Path(args.hparams.removeprefix(EASYEDIT_PREFIX)) if args.hparams is not None else None
    if hparams_file is not None and hparams_file.suffix in (".yaml", ".yml") and not hparams_file.is_file():
        raise UsageError(f"--hparams {args.hparams}: no such file")
    check_device(args.device)
    check_model(args.model)


def _easyedit_hint(args: EditArgs) -> str | None:
    """The hint to prefix ``--hparams`` with ``easyedit:`` when it names an EasyEdit file given as ours."""
    from dataclasses import fields

    from retention.editing.easyedit import easyedit_hint
    from retention.editing.registry import editor_class

    if args.hparams is None or args.hparams.startswith(EASYEDIT_PREFIX) or not Path(args.hparams).is_file():
        return None
    return easyedit_hint(args.hparams, {f.name for f in fields(editor_class(args.editor)[0].hparams_class)})


def _accuracy(results) -> dict:
    """``{group: {protocol: Rate}}`` over scored probes (the accuracy of :class:`~retention.metrics.ProbeCounts`)."""
    from retention.callbacks.probing import outcomes

    counts = ProbeCounts(_GROUPS, PROTOCOLS)
    counts.update(*outcomes(results, results, _GROUPS, PROTOCOLS))
    return counts.rates()["accuracy"]


def _efficacy_by_call(results, after) -> list[dict]:
    """Efficacy of each editor call's facts, scored after the last call (what sequential editing kept): the
    accuracy of their rewrite probes, counted with the call as the probe group."""
    import torch

    from retention.callbacks.probing import outcomes

    rewrite = {r.probe.case_id: r for r in after if r.probe.kind == "rewrite"}
    owned = [(i, rewrite[c]) for i, result in enumerate(results) for c in map(str, result.case_ids) if c in rewrite]
    scored = [r for _, r in owned]
    _, _, passed, has = outcomes(scored, scored, [probe_group("rewrite")], PROTOCOLS)
    calls = [str(i) for i in range(len(results))]
    group = torch.tensor([i for i, _ in owned], dtype=torch.long)
    rates = count_rates(probe_counts(group, passed, passed, has, len(calls)), calls, PROTOCOLS)["accuracy"]
    return [{"call": i + 1, "facts": sum(owner == i for owner, _ in owned), **rates[c]} for i, c in enumerate(calls)]


def format_edit_table(before: dict, after: dict) -> str:
    """Edit success per probe group and protocol, unedited -> edited."""
    lines = [f"{'probes':<18}{'n':>6}" + "".join(f"{p + ' unedited':>16}{p + ' edited':>14}" for p in PROTOCOLS)]
    lines.append("-" * len(lines[0]))
    for g in (g for g in _GROUPS if any(after[g][p]["denominator"] for p in PROTOCOLS)):
        cells = "".join(f"{before[g][p]['value']:>16.1%}{after[g][p]['value']:>14.1%}" for p in PROTOCOLS)
        lines.append(f"{GROUP_LABELS[g]:<18}{after[g][PROTOCOLS[0]]['denominator']:>6}{cells}")
    return "\n".join(lines)


def run(args: EditArgs) -> dict:
    import json

    from safetensors.torch import save_file

    from retention.arch import unwrap_model
    from retention.data.readers import load_records
    from retention.editing.base import EditRequest, run_edits
    from retention.editing.registry import build_editor

    t_start = time.perf_counter()
    check(args)
    try:
        editor = build_editor(args.editor, args.hparams, args.model, **(args.set or {}))
    except (ValueError, FileNotFoundError) as err:
        hint = _easyedit_hint(args)
        raise UsageError(f"--hparams/--set: {err}" + (f"; {hint}" if hint else "")) from None
    records = load_records(args.data, on_error=args.on_error)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    from retention.data.selection import select_known

    records = select_known(model, tokenizer, records, args.n, args.select_known, args.batch_size_scoring)
    if not records:
        raise ValueError(f"no facts to edit from {args.data}")
    if args.mode == "single":
        folders: dict[str, str] = {}
        for case_id in (str(r.case_id) for r in records):
            name = safe_name(case_id)
            if name in folders:
                raise ValueError(f"{args.data}: case ids {folders[name]!r} and {case_id!r} both name the "
                                 f"edit folder edits/{name} (--mode single saves one folder per case id): give "
                                 "the facts distinct case ids")
            folders[name] = case_id
    probes = [p for r in records for p in r.edit_probes()]
    score = dict(protocols=PROTOCOLS, batch_size=args.batch_size_scoring)
    before = score_probes(model, tokenizer, probes, **score, progress=True)  # a bar with its ETA
    requests = [EditRequest.from_record(r) for r in records]
    base_fingerprint = model_fingerprint(unwrap_model(model))
    fingerprint = base_fingerprint if args.mode != "single" else None
    print(f"editing {len(requests)} facts with {args.editor} ({args.mode}) into {args.model}")
    t0 = time.perf_counter()
    editor.prepare(model, tokenizer, fingerprint)
    results = run_edits(editor, model, tokenizer, requests, args.mode, args.batch_size)
    edit_seconds = time.perf_counter() - t0
    out = Path(args.out)
    if args.mode == "single":
        from tqdm.auto import tqdm

        after = []
        for rec, result in tqdm(list(zip(records, results)), desc="scoring each edit", unit="edit"):
            result.apply(model)
            after += score_probes(model, tokenizer, rec.edit_probes(), **score)
            result.revert(model)
            result.save(out / "edits" / safe_name(rec.case_id))  # case ids come from data: never a path
    else:
        after = score_probes(model, tokenizer, probes, **score, progress=True)
        merged = type(results[0]).merge(results)
        merged.save(out / "edit")
        in_weights = bool(merged.deltas)  # GRACE and WISE keep their edits in a memory module, not the weights
        if not in_weights:
            print(f"{args.editor}: the edits live in {out / 'edit'} (a memory attached to the model), not in its "
                  "weights: no edited weights or model folder are written")
        if in_weights and args.dtype == "float32":  # what `retention fit` (float32) can use as edits.precomputed
            base = unwrap_model(model)
            with atomic_path(out / EDITED_WEIGHTS) as tmp:
                save_file({n: base.get_parameter(n).detach().cpu().contiguous() for n in sorted(merged.deltas)},
                          str(tmp))
            atomic_write_text(out / FACTS, "".join(json.dumps(r.to_dict(), ensure_ascii=False, allow_nan=False) + "\n"
                                                   for r in records))
        if in_weights and args.save_model:
            with atomic_path(out / "model", folder=True) as tmp:
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
    acc_before, acc_after = _accuracy(before), _accuracy(after)
    summary = {
        "model": args.model, "editor": args.editor, "mode": args.mode, "data": args.data, "n_edits": len(requests),
        "dtype": args.dtype, "device": str(next(model.parameters()).device),
        "hparams": editor.hparams.to_dict(), "edit_seconds": edit_seconds,
        "seconds_per_edit": edit_seconds / len(requests), "base_fingerprint": base_fingerprint,
        "unedited": acc_before, "edited": acc_after,
        "probes": [{"unedited": b.to_dict(), "edited": a.to_dict()} for b, a in zip(before, after)],
    }
    if args.mode == "sequential":
        summary["efficacy_by_call"] = _efficacy_by_call(results, after)
    blind = top1_blind(tokenizer, records)
    summary["top1_blind_edits"] = len(blind)
    hparams = summary["hparams"]
    summary["provenance"] = provenance(
        {"knowledge": args.data if args.data != "builtin" else None, "mom2": hparams.get("mom2_corpus") if hparams.get("mom2_adjustment", True) else None},
        args.model, base_fingerprint)
    atomic_write_json(out / SCORES, summary)
    print(f"\n{args.editor} ({args.mode}), {len(requests)} edits of {args.model}: "
          f"{edit_seconds:.1f} s editing ({edit_seconds / len(requests):.2f} s per edit), "
          f"{time.perf_counter() - t_start:.0f} s in all\n")
    print(format_edit_table(acc_before, acc_after))
    if blind:
        print(f"\nWARNING: {len(blind)} of {len(records)} facts have target_new and target_true with the same first "
              "token: top1 cannot tell their edit from no edit (read prob for them)")
    if any(c["facts"] > 1 for c in summary.get("efficacy_by_call", [])):  # calls of one fact: the table says it
        print("\nefficacy of each call's facts after the last call:")
        for c in summary["efficacy_by_call"]:
            cells = "  ".join(f"{p} {c[p]['value']:.1%} ({c[p]['count']}/{c[p]['denominator']})" for p in PROTOCOLS)
            print(f"  call {c['call']:>3} ({c['facts']} facts)  {cells}")
    if args.dtype != "float32" and args.mode != "single":
        print(f"\nedited in {args.dtype}: {out} cannot be `retention fit`'s edits.precomputed (fit loads float32; "
              "edit with --dtype float32 for that)")
    print(f"\nresults: {out}")
    return summary


def execute(args: EditArgs) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    run(args)
    return 0


def main(argv: list[str]) -> int:
    """``retention edit ARGV``."""
    return run_main("edit", ARGS, parser, execute, argv)
