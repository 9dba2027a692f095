"""``retention probe``: score a model on a knowledge set and report what it knows, per protocol and relation.

``--targets true`` scores each record's true target (``target_true`` against ``target_new``), ``new`` its
counterfactual (``target_new`` against ``target_true``: what an edit would ask for), ``both`` both, side by side.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from jsonargparse.typing import NonNegativeInt, PositiveInt

from retention.commands.options import (
    Device,
    OnError,
    Protocol,
    UsageError,
    check_device,
    command_parser,
    run_main,
)
from retention.io import atomic_write_jsonl
from retention.models import DEFAULT_MODEL, ModelNotFound, check_model_name, load_model
from retention.records import Probe

Targets = Literal["true", "new", "both"]


@dataclass
class ProbeArgs:
    """What to score, under which protocols, on which device, and where to write it."""

    model: str = DEFAULT_MODEL
    """Model: smollm2-135m, tiny-llama, tiny-gpt2, a local folder, a .gguf file or a hub id."""
    data: str = "builtin"
    """Knowledge records: 'builtin' or a CounterFact / zsRE / retention JSON(L) file."""
    protocols: list[Protocol] = field(default_factory=lambda: ["top1", "prob"])
    """Protocols, comma-separated or a YAML list: top1, prob, token_acc, gen."""
    probes: list[Literal["rewrite", "paraphrase"]] = field(default_factory=lambda: ["rewrite"])
    """Which prompts of each record to score, comma-separated or a YAML list: rewrite, paraphrase."""
    targets: Targets = "true"
    """Which target each prompt should continue with: true (target_true), new (the counterfactual target_new),
    or both side by side."""
    limit: NonNegativeInt | None = None
    """Score only the first N records."""
    batch_size: PositiveInt = 16
    """Probes per forward pass."""
    max_new_tokens: PositiveInt = 10
    """Generation length for the gen protocol."""
    out: str | None = None
    """Per-probe JSONL output (default: runs/probe/<data name>.jsonl)."""
    on_error: OnError = "raise"
    """Malformed records: raise (naming file, record and field), or skip and count."""
    device: Device = "auto"
    """Device: auto (cuda when available, else cpu), cpu, cuda or cuda:i."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Model dtype; auto: float32 on CPU, bfloat16 on a GPU that supports it."""


ARGS = ProbeArgs

_KINDS = {"rewrite": "known", "paraphrase": "known_paraphrase"}


def parser():
    return command_parser(ProbeArgs, __doc__)


def check_model(name_or_path: str) -> None:
    """``--model`` checked before any work: a name that is neither built in nor local, when the hub cannot
    provide it, is a UsageError at once (:func:`~retention.models.check_model_name`)."""
    try:
        check_model_name(name_or_path)
    except ModelNotFound as err:
        raise UsageError(f"--model: {err}") from None


def check(args: ProbeArgs) -> None:
    """What can be checked before loading the model."""
    from retention.scoring import check_protocols

    for flag, values in (("--protocols", args.protocols), ("--probes", args.probes)):
        if not values:
            raise UsageError(f"{flag}: give at least one")
    try:
        check_protocols(args.protocols)
    except ValueError as err:
        raise UsageError(f"--protocols: {err}") from None
    bad = set(args.probes) - _KINDS.keys()
    if bad:
        raise UsageError(f"--probes: unknown kind(s) {sorted(bad)}; choose from rewrite, paraphrase")
    check_device(args.device)
    check_model(args.model)


def select_probes(records, kinds, targets: str) -> dict[str, list[Probe]]:
    """``{"true": probes, "new": probes}`` (the keys ``targets`` asks for) of the prompts ``kinds``: true probes
    expect ``target_true`` over ``target_new``, new probes the reverse (kinds ``new``, ``new_paraphrase``)."""
    wanted = {_KINDS[k] for k in kinds}
    true = [p for r in records for p in r.true_probes(kind="known") if p.kind in wanted]
    out = {}
    if targets in ("true", "both"):
        out["true"] = true
    if targets in ("new", "both"):
        out["new"] = [Probe(p.prompt, p.alternative, p.target, p.kind.replace("known", "new"), p.case_id)
                      for p in true if p.alternative]
    return out


def format_known_table(results: dict[str, list], relation_of: dict[str, str], protocols) -> str:
    """Probes passing each protocol, per relation and in total; one column per protocol and target set
    (``results``: ``{"true": [...], "new": [...]}``, either or both)."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for which, rs in results.items():
        for res in rs:
            for rel in (relation_of.get(res.probe.case_id, "") or "-", "ALL"):
                counts[rel][which] += 1
                for p in protocols:
                    counts[rel][(p, which)] += int(bool(res.passed.get(p)))
    both = len(results) > 1
    columns = [(p, w) for p in protocols for w in results]
    header = f"{'relation':<12}{'probes':>8}" + "".join(f"{p + ' ' + w if both else p:>16}" for p, w in columns)
    lines = [header, "-" * len(header)]
    first = next(iter(results))
    for rel in sorted(k for k in counts if k != "ALL") + ["ALL"]:
        c = counts[rel]
        cells = "".join(f"{c[(p, w)]:>9} {c[(p, w)] / c[w] if c[w] else 0:>6.1%}" for p, w in columns)
        lines.append(f"{rel:<12}{c[first]:>8}{cells}")
    return "\n".join(lines)


def execute(args: ProbeArgs) -> int:
    from retention.data.readers import read_records
    from retention.scoring import score_probes

    check(args)
    records, report = read_records(args.data, on_error=args.on_error, limit=args.limit)
    if report.skipped:
        print(f"skipped {report.skipped} malformed record(s) of {args.data}")
    probes = select_probes(records, args.probes, args.targets)
    n_probes = sum(map(len, probes.values()))
    if not n_probes:
        print(f"retention probe: nothing to score: {len(records)} record(s) of {args.data} read "
              f"(--limit {args.limit}, {report.skipped} skipped) give no {','.join(args.probes)} probe", file=sys.stderr)
        return 2
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    t0 = time.perf_counter()
    results = {which: score_probes(model, tokenizer, ps, args.protocols, batch_size=args.batch_size,
                                   max_new_tokens=args.max_new_tokens, progress=True)
               for which, ps in probes.items()}
    elapsed = time.perf_counter() - t0
    relation_of = {str(r.case_id): r.relation_id for r in records}
    print(f"\n{args.model} on {args.data}: {len(records)} records, {n_probes} probes ({args.targets} targets), "
          f"{elapsed:.1f} s ({n_probes / elapsed:.1f} probes/s)\n")
    print(format_known_table(results, relation_of, args.protocols))
    out = Path(args.out or Path("runs") / "probe" / f"{Path(args.data).stem}.jsonl")
    atomic_write_jsonl(out, ({**r.to_dict(), "targets": which} for which, rs in results.items() for r in rs))
    print(f"\nper-probe results: {out}")
    return 0


def main(argv: list[str]) -> int:
    """``retention probe ARGV``."""
    return run_main("probe", ARGS, parser, execute, argv)
