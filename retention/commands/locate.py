"""``retention locate``: causal tracing over facts the model knows; writes the AIE per layer (JSON), a heatmap (PNG)
and stores the located MLP layers for ``layers: located`` in editor presets and freeze policies.

    retention locate --model smollm2-135m --data ../shared/data/counterfact/counterfact_preknown.json --n 50
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from jsonargparse.typing import NonNegativeFloat, PositiveInt

from retention.commands.options import (
    Device,
    OnError,
    Protocol,
    UsageError,
    check_device,
    command_parser,
    run_main,
)
from retention.commands.probe import check_model
from retention.models import DEFAULT_MODEL, load_model


@dataclass
class LocateArgs:
    """The facts to trace, the corruption and restorations, and the located-layer choice."""

    model: str = DEFAULT_MODEL
    """Model: smollm2-135m, tiny-llama, tiny-gpt2, a local folder, a .gguf file or a hub id."""
    data: str = "builtin"
    """Knowledge records: 'builtin' or a CounterFact / zsRE / retention JSON(L) file."""
    n: PositiveInt = 50
    """Number of facts to trace (the first N the model knows)."""
    known: Protocol | Literal["none"] = "top1"
    """Protocol a fact must pass to count as known, or 'none' to trace any fact."""
    on_error: OnError = "raise"
    """Malformed records: raise (naming file, record and field), or skip and count."""
    k: PositiveInt = 5
    """Size of the located window: the k contiguous MLP layers with the highest AIE at the subject's last token
    (at most the model's layer count: a larger k is capped, with a note)."""
    samples: PositiveInt = 3
    """Noise draws per fact."""
    noise_scale: NonNegativeFloat = 3.0
    """Noise σ as a multiple of the subject embeddings' standard deviation."""
    window: PositiveInt = 1
    """Layers restored together for the MLP and attention traces."""
    kinds: list[Literal["hidden", "mlp", "attn"]] = field(default_factory=lambda: ["hidden", "mlp"])
    """Activations to restore, comma-separated or a YAML list: hidden, mlp, attn (attention output)."""
    all_positions: bool = False
    """Trace every token-position group (the paper's heatmap), not only the subject's last token."""
    seed: int = 0
    """Seed of the noise."""
    out: str = "runs/locate"
    """Output folder for causal_trace.json and causal_trace.png."""
    save: bool = True
    """Store the located layers in the cache for 'layers: located'."""
    device: Device = "auto"
    """Device: auto (cuda when available, else cpu), cpu, cuda or cuda:i."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Model dtype; auto: float32 on CPU, bfloat16 on a GPU that supports it."""


ARGS = LocateArgs


def parser():
    return command_parser(LocateArgs, __doc__)


def execute(args: LocateArgs) -> int:
    from retention.data.readers import read_records
    from retention.editing.causal_trace import TraceConfig, plot_trace, save_located, trace_facts
    from retention.io import atomic_write_json

    if args.n < 1:
        raise UsageError(f"--n {args.n} must be at least 1")
    check_device(args.device)
    check_model(args.model)
    try:
        config = TraceConfig(
            noise_scale=args.noise_scale, samples=args.samples, kinds=tuple(dict.fromkeys(args.kinds)),
            window=args.window, all_positions=args.all_positions, seed=args.seed,
        )
    except ValueError as err:
        raise UsageError(str(err)) from None
    t0 = time.perf_counter()
    records, _ = read_records(args.data, on_error=args.on_error)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    from retention.arch import ArchAdapter
    from retention.data.selection import select_known

    k = min(args.k, ArchAdapter(model).num_layers)
    if k < args.k:
        print(f"--k {args.k}: {args.model} has {k} layers; locating a window of k={k} (all of them)")

    facts = select_known(model, tokenizer, records, args.n, args.known)
    if len(facts) < args.n:
        print(f"only {len(facts)} of {len(records)} facts of {args.data} are known under {args.known}; tracing those")
    if not facts:
        return 1
    result = trace_facts(model, tokenizer, facts, config, model_name=args.model, progress=True)
    out = Path(args.out)
    summary = result.to_dict(k) | {"data": args.data, "known": args.known}
    atomic_write_json(out / "causal_trace.json", summary)
    plot_trace(result, out / "causal_trace.png", k=k if "mlp" in config.kinds else None)

    print(f"\n{args.model}: {len(facts)} facts, mean p(true object) clean {summary['mean_p_clean']:.3f}, "
          f"corrupted {summary['mean_p_corrupted']:.3f} (noise σ {result.noise_std:.3f})")
    print(f"{'layer':>5}" + "".join(f"{kind:>10}" for kind in config.kinds) + "   (AIE at the subject's last token)")
    aie = {kind: result.aie(kind) for kind in config.kinds}
    for i in range(result.num_layers):
        print(f"{i:>5}" + "".join(f"{aie[kind][i]:>10.4f}" for kind in config.kinds))
    if "mlp" in config.kinds:
        layers = result.located(k)
        print(f"\nlocated MLP layers (k={k}): {layers}")
        if args.save:
            path = save_located(model, layers, {"model": args.model, "data": args.data, "n_facts": len(facts),
                                                "k": k, "aie_mlp": aie["mlp"]})
            print(f"stored for 'layers: located': {path}")
    print(f"wrote {out / 'causal_trace.json'} and {out / 'causal_trace.png'} in {time.perf_counter() - t0:.1f} s")
    return 0


def main(argv: list[str]) -> int:
    """``retention locate ARGV``."""
    return run_main("locate", ARGS, parser, execute, argv)
