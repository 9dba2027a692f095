"""``retention probe``: score a model on a knowledge set and report what it knows, per protocol and relation."""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from retention.cli import parse_args
from retention.io import atomic_write_jsonl
from retention.models import DEFAULT_MODEL, load_model
from retention.scoring import check_protocols, score_probes


@dataclass
class ProbeArgs:
    """What to score, under which protocols, and where to write it."""

    model: str = DEFAULT_MODEL
    """Model: smollm2-135m, tiny-llama, tiny-gpt2, a local folder, a .gguf file or a hub id."""
    data: str = "builtin"
    """Knowledge records: 'builtin' or a CounterFact / zsRE / retention JSON(L) file."""
    protocols: str = "top1,prob"
    """Comma-separated protocols: top1, prob, token_acc, gen."""
    probes: str = "rewrite"
    """Which prompts of each record to score: comma-separated rewrite, paraphrase."""
    limit: int | None = None
    """Score only the first N records."""
    batch_size: int = 16
    """Probes per forward pass."""
    max_new_tokens: int = 10
    """Generation length for the gen protocol."""
    out: str | None = None
    """Per-probe JSONL output (default: runs/probe/<data name>.jsonl)."""
    on_error: str = "raise"
    """Malformed records: raise (naming file, record and field), or skip and count."""


def _probes(records, kinds: set[str]):
    kind_names = {"rewrite": "known", "paraphrase": "known_paraphrase"}
    bad = kinds - kind_names.keys()
    if bad:
        raise ValueError(f"--probes: unknown kind(s) {sorted(bad)}; choose from rewrite, paraphrase")
    wanted = {kind_names[k] for k in kinds}
    return [p for r in records for p in r.true_probes(kind="known") if p.kind in wanted]


def format_known_table(results, relation_of: dict[str, str], protocols) -> str:
    """A table of probes passing each protocol, per relation and in total."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for res in results:
        for rel in (relation_of.get(res.probe.case_id, "") or "-", "ALL"):
            counts[rel]["n"] += 1
            for p in protocols:
                counts[rel][p] += int(bool(res.passed.get(p)))
    header = f"{'relation':<12}{'probes':>8}" + "".join(f"{p:>14}" for p in protocols)
    lines = [header, "-" * len(header)]
    for rel in sorted(k for k in counts if k != "ALL") + ["ALL"]:
        c = counts[rel]
        cells = "".join(f"{c[p]:>7} {c[p] / c['n']:>5.1%}" for p in protocols)
        lines.append(f"{rel:<12}{c['n']:>8}{cells}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from retention.data.readers import read_records

    args = parse_args(ProbeArgs, argv, "retention probe", __doc__)
    protocols = check_protocols([p.strip() for p in args.protocols.split(",") if p.strip()])
    records, report = read_records(args.data, on_error=args.on_error, limit=args.limit)
    if report.skipped:
        print(f"skipped {report.skipped} malformed record(s) of {args.data}")
    probes = _probes(records, {k.strip() for k in args.probes.split(",") if k.strip()})
    if not probes:
        print(f"retention probe: nothing to score: {len(records)} record(s) of {args.data} read "
              f"(--limit {args.limit}, {report.skipped} skipped) give no {args.probes} probe", file=sys.stderr)
        return 2
    model, tokenizer = load_model(args.model)
    t0 = time.perf_counter()
    results = score_probes(
        model, tokenizer, probes, protocols, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        progress=True,
    )
    elapsed = time.perf_counter() - t0
    relation_of = {str(r.case_id): r.relation_id for r in records}
    print(f"\n{args.model} on {args.data}: {len(records)} records, {len(probes)} probes, "
          f"{elapsed:.1f} s ({len(probes) / elapsed:.1f} probes/s)\n")
    print(format_known_table(results, relation_of, protocols))
    out = Path(args.out or Path("runs") / "probe" / f"{Path(args.data).stem}.jsonl")
    atomic_write_jsonl(out, (r.to_dict() for r in results))
    print(f"\nper-probe results: {out}")
    return 0
