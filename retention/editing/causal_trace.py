"""Causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT", §2.1).

For a fact the model knows, the subject's token embeddings are corrupted with Gaussian noise
(σ = ``noise_scale`` × the standard deviation of subject-token embeddings), which destroys the recall; then one
activation of the clean run is restored in the corrupted run — a layer's output (``hidden``), its MLP output
(``mlp``) or its attention output (``attn``), at a group of token positions — and the probability of the true
object's first token is measured again. The indirect effect of that restoration is
``p(restored) − p(corrupted)``; its average over facts (AIE) shows where facts are recalled. The MLP layers with
the highest AIE at the subject's last token are the *located layers* that editors and freeze policies can use
(``layers: located``); :func:`save_located` stores them per model and :func:`located_layers` reads them.

All restorations of one fact and one noise draw run as one batch of corrupted rows with different restore points.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from retention.arch import ArchAdapter, out_of_range, unwrap_model
from retention.diskcache import DiskCache
from retention.editing.trace import capture, patch_outputs, start_at_layer, subject_token_span
from retention.io import atomic_path
from retention.models import model_fingerprint
from retention.paths import cache_dir
from retention.records import KnowledgeRecord
from retention.tokens import prompt_ids, target_ids

log = logging.getLogger(__name__)

KINDS = ("hidden", "mlp", "attn")
POSITION_GROUPS = (
    "first_subject", "middle_subject", "last_subject", "first_subsequent", "further", "last",
)
"""Token-position groups of Meng et al.'s heatmaps; ``last_subject`` is the one that locates the MLP layers."""


@dataclass
class TraceConfig:
    """Hyperparameters of causal tracing."""

    noise_scale: float = 3.0
    """Noise σ as a multiple of the standard deviation of the subject-token embeddings (the paper's 3)."""
    samples: int = 3
    """Noise draws per fact (the paper uses 10); effects are averaged over draws."""
    kinds: tuple[str, ...] = ("hidden", "mlp")
    """Which activations to restore: ``hidden`` (layer output), ``mlp`` (MLP output), ``attn`` (attention output)."""
    window: int = 1
    """``mlp``/``attn``: restore this many consecutive layers centred on each layer, fewer at the ends of the model
    (the paper uses 10 of 48)."""
    all_positions: bool = False
    """Restore at every position group of :data:`POSITION_GROUPS`, not only at the subject's last token."""
    rows_per_batch: int = 16
    """Corrupted rows per forward pass (rows are grouped by their lowest restored layer, and each forward starts
    there from the cached corrupted run, so smaller batches skip more shared work)."""
    seed: int = 0

    def __post_init__(self):
        self.kinds = tuple(self.kinds)
        bad = [k for k in self.kinds if k not in KINDS]
        if bad:
            raise ValueError(f"kinds: unknown {bad}; choose from {', '.join(KINDS)}")
        if self.window < 1 or self.samples < 1 or self.rows_per_batch < 1:
            raise ValueError(f"window={self.window}, samples={self.samples}, rows_per_batch={self.rows_per_batch}: "
                             "each must be >= 1")

    @property
    def groups(self) -> tuple[str, ...]:
        return POSITION_GROUPS if self.all_positions else ("last_subject",)


@dataclass
class FactTrace:
    """The tracing of one fact."""

    case_id: str
    prompt: str
    subject: str
    target: str
    p_clean: float
    p_corrupted: float
    effects: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    """kind -> position group -> per-layer ``p(restored)`` (averaged over noise draws); groups absent from this
    prompt (e.g. no middle subject tokens) are left out."""

    def indirect_effect(self, kind: str, group: str) -> list[float] | None:
        probs = self.effects.get(kind, {}).get(group)
        return None if probs is None else [p - self.p_corrupted for p in probs]


@dataclass
class TraceResult:
    """Per-fact traces and their averages."""

    model: str
    num_layers: int
    config: TraceConfig
    noise_std: float
    """The σ actually used (``noise_scale`` × embedding std)."""
    facts: list[FactTrace]
    seconds: float = 0.0

    def aie(self, kind: str, group: str = "last_subject") -> list[float]:
        """Average indirect effect per layer over the facts whose prompt has that position group."""
        rows = [e for f in self.facts if (e := f.indirect_effect(kind, group)) is not None]
        if not rows:
            return [math.nan] * self.num_layers
        return torch.tensor(rows).mean(0).tolist()

    def located(self, k: int, kind: str = "mlp") -> list[int]:
        """The ``k`` contiguous layers with the highest summed AIE of ``kind`` at the subject's last token."""
        return best_window(self.aie(kind), k)

    def to_dict(self, k: int) -> dict:
        groups = self.config.groups
        return {
            "model": self.model,
            "num_layers": self.num_layers,
            "config": asdict(self.config),
            "noise_std": self.noise_std,
            "n_facts": len(self.facts),
            "mean_p_clean": _mean([f.p_clean for f in self.facts]),
            "mean_p_corrupted": _mean([f.p_corrupted for f in self.facts]),
            "aie": {kind: {g: self.aie(kind, g) for g in groups} for kind in self.config.kinds},
            "located": {"kind": "mlp", "k": k, "layers": self.located(k)} if "mlp" in self.config.kinds else None,
            "seconds": self.seconds,
            "facts": [_rounded(asdict(f)) for f in self.facts],
        }


def _rounded(value):
    """Floats to 6 significant digits (keeps the per-fact JSON small)."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def best_window(values: Sequence[float], k: int) -> list[int]:
    """Indices of the ``k`` contiguous entries with the largest sum (the earliest on ties)."""
    if not 1 <= k <= len(values):
        raise ValueError(f"window of k={k} layers does not fit {len(values)} layers")
    sums = [sum(values[i : i + k]) for i in range(len(values) - k + 1)]
    start = max(range(len(sums)), key=lambda i: (sums[i], -i))
    return list(range(start, start + k))


def _position_groups(n_tokens: int, first: int, last: int) -> dict[str, list[int]]:
    groups = {
        "first_subject": [first],
        "middle_subject": list(range(first + 1, last)),
        "last_subject": [last],
        "first_subsequent": [last + 1] if last + 1 < n_tokens else [],
        "further": list(range(last + 2, n_tokens - 1)),
        "last": [n_tokens - 1],
    }
    return {g: pos for g, pos in groups.items() if pos}


def _modules(adapter: ArchAdapter, kind: str, layer: int) -> nn.Module:
    return {"hidden": adapter.layer, "mlp": adapter.mlp, "attn": adapter.attn}[kind](layer)


def _window(layer: int, window: int, num_layers: int) -> range:
    """The ``window`` layers centred on ``layer``, clipped at the ends of the model (as in the paper)."""
    lo = layer - window // 2
    return range(max(0, lo), min(num_layers, lo + window))


@torch.no_grad()
def embedding_noise_std(model: nn.Module, tokenizer, records: Sequence[KnowledgeRecord]) -> float:
    """Standard deviation of the token embeddings of the records' subjects (the paper's noise reference)."""
    embed = ArchAdapter.for_model(model).embed
    ids = [i for r in records for i in tokenizer(" " + r.subject, add_special_tokens=False)["input_ids"]]
    device = embed.weight.device
    return embed(torch.tensor(ids, device=device)).float().std().item()


def _last_token_prob(model: nn.Module, input_ids: torch.Tensor, target: int) -> torch.Tensor:
    base = unwrap_model(model)
    hidden = base.base_model(input_ids=input_ids).last_hidden_state[:, -1]
    return torch.softmax(base.get_output_embeddings()(hidden).float(), -1)[:, target]


@torch.no_grad()
def trace_fact(
    model: nn.Module, tokenizer, record: KnowledgeRecord, noise_std: float, config: TraceConfig,
    generator: torch.Generator,
) -> FactTrace:
    """Trace one fact: clean run, corrupted run, and every restoration of ``config`` in batches."""
    adapter = ArchAdapter.for_model(model)
    device = adapter.embed.weight.device
    ids = prompt_ids(tokenizer, record.rewrite_prompt)
    try:
        first, last = subject_token_span(tokenizer, record.prompt, record.subject)
    except ValueError as err:
        raise ValueError(f"record {record.case_id}: {err}") from None
    target = target_ids(tokenizer, record.target_true)[0]
    input_ids = torch.tensor([ids], device=device)
    n_layers = adapter.num_layers

    modules = {(kind, i): _modules(adapter, kind, i) for kind in config.kinds for i in range(n_layers)}
    with capture(modules, inputs=False) as captured:
        p_clean = _last_token_prob(model, input_ids, target).item()
    clean = {key: c.output for key, c in captured.items()}

    groups = {g: pos for g, pos in _position_groups(len(ids), first, last).items() if g in config.groups}
    # One row per restoration (kind, group, layer). A row's forward equals the corrupted run below the first
    # layer it restores, so rows are sorted by that layer and each batch starts from the cached corrupted input
    # of its lowest one.
    specs = [(kind, g, i) for kind in config.kinds for g in groups for i in range(n_layers)]
    restored = [list(_window(i, config.window, n_layers)) if kind != "hidden" else [i] for kind, _, i in specs]
    order = sorted(range(len(specs)), key=lambda r: restored[r][0])
    p_corrupted = 0.0
    probs = torch.zeros(len(specs))
    width = adapter.embed.weight.shape[1]
    for _ in range(config.samples):
        noise = torch.randn((last - first + 1, width), generator=generator).to(device) * noise_std
        blocks = {i: adapter.layer(i) for i in range(n_layers)}
        with patch_outputs({adapter.embed: _corrupter(first, last, noise)}), capture(blocks, outputs=False) as seen:
            p_corrupted += _last_token_prob(model, input_ids, target).item()
        for at in range(0, len(order), config.rows_per_batch):
            rows = order[at : at + config.rows_per_batch]
            masks: dict[tuple[str, int], torch.Tensor] = {}
            for r, row in enumerate(rows):
                kind, g, _ = specs[row]
                for j in restored[row]:
                    mask = masks.setdefault((kind, j), torch.zeros(len(rows), len(ids), 1, dtype=torch.bool))
                    mask[r, groups[g]] = True
            start = restored[rows[0]][0]
            hooks = {modules[key]: _restorer(clean[key], m.to(device)) for key, m in masks.items()}
            with start_at_layer(model, start, seen[start].input.expand(len(rows), -1, -1), adapter), patch_outputs(hooks):
                probs[rows] += _last_token_prob(model, input_ids.expand(len(rows), -1), target).cpu()
    probs /= config.samples
    effects: dict[str, dict[str, list[float]]] = {}
    for (kind, g, _), p in zip(specs, probs.tolist()):
        effects.setdefault(kind, {}).setdefault(g, []).append(p)
    return FactTrace(str(record.case_id), record.rewrite_prompt, record.subject, record.target_true,
                     p_clean, p_corrupted / config.samples, effects)


def _corrupter(first: int, last: int, noise: torch.Tensor):
    def hook(output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        output[:, first : last + 1] += noise.to(output.dtype)
        return output

    return hook


def _restorer(clean: torch.Tensor, mask: torch.Tensor):
    def hook(output: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, clean.to(output.dtype), output)

    return hook


def trace_facts(
    model: nn.Module, tokenizer, records: Sequence[KnowledgeRecord], config: TraceConfig | None = None,
    model_name: str = "", progress: bool = False,
) -> TraceResult:
    """Trace every record and collect the averages (the noise σ is estimated from these records' subjects)."""
    config = config or TraceConfig()
    if not records:
        raise ValueError("causal tracing needs at least one fact")
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    noise_std = config.noise_scale * embedding_noise_std(model, tokenizer, records)
    generator = torch.Generator().manual_seed(config.seed)
    iterator = records
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(records, desc="tracing", unit="fact")
    facts = [trace_fact(model, tokenizer, r, noise_std, config, generator) for r in iterator]
    model.train(was_training)
    seconds = time.perf_counter() - t0
    log.info("traced %d facts in %.1f s", len(facts), seconds)
    return TraceResult(model_name, ArchAdapter.for_model(model).num_layers, config, noise_std, facts, seconds)


def plot_trace(result: TraceResult, path: str | Path, k: int | None = None, title: str = "") -> Path:
    """A heatmap of the AIE per layer: one panel per restored kind (rows: position groups, or kinds at the
    subject's last token when only that group was traced); ``k`` names the located window in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = result.config.groups
    kinds = result.config.kinds
    if len(groups) == 1:
        panels = [("restored at the subject's last token", list(kinds), [result.aie(k) for k in kinds])]
    else:
        panels = [(f"{kind} restored", list(groups), [result.aie(kind, g) for g in groups]) for kind in kinds]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6.0, 0.28 * result.num_layers + 2), 1.2 + 0.45 *
                             sum(len(p[1]) for p in panels) + 0.6 * len(panels)), squeeze=False)
    for ax, (name, labels, rows) in zip(axes[:, 0], panels):
        im = ax.imshow(torch.tensor(rows).numpy(), aspect="auto", cmap="Purples", interpolation="nearest")
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xticks(range(0, result.num_layers, max(1, result.num_layers // 15)))
        ax.set_xlabel("layer")
        ax.set_title(name, fontsize=10)
        fig.colorbar(im, ax=ax, label="AIE")
    located = result.located(k) if k and "mlp" in kinds else None
    fig.suptitle(title or f"Causal trace of {result.model} over {len(result.facts)} facts"
                 + (f"\nlocated MLP layers {located}" if located else ""), fontsize=11)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


def _located() -> DiskCache:
    return DiskCache(cache_dir() / "located", name=lambda key: key["fingerprint"])


def save_located(model: nn.Module, layers: Sequence[int], info: dict | None = None) -> Path:
    """Store the located layers of ``model`` (keyed by its weights' fingerprint) for :func:`located_layers`."""
    return _located().put({"fingerprint": model_fingerprint(model)}, {"layers": list(layers), **(info or {})})


class LayersNotLocated(FileNotFoundError):
    pass


def located_layers(model: nn.Module, fingerprint: str | None = None) -> list[int]:
    """The layers ``retention locate`` found for this model (``layers: located`` in presets and freeze policies);
    ``fingerprint``: the model's :func:`~retention.models.model_fingerprint` when the caller has it already."""
    entries, key = _located(), {"fingerprint": fingerprint or model_fingerprint(model)}
    path = entries.data_path(key, ".json")
    if not path.exists():
        raise LayersNotLocated(
            f"no located layers for this model (looked for {path}): run 'retention locate --model <model>' first, "
            "or give the layers explicitly"
        )
    hit = entries.get(key)  # a failed check is logged, with what was wrong
    if hit is None:
        raise LayersNotLocated(f"{path} failed its check: rerun 'retention locate'")
    return [int(i) for i in hit[0]["layers"]]


def resolve_layers(layers: Sequence[int] | str, model: nn.Module, fingerprint: str | None = None) -> list[int]:
    """An editor's layer setting as indices: ``"located"`` reads :func:`located_layers` (with the model's
    ``fingerprint`` when given), negatives count from the end."""
    if isinstance(layers, str):
        if layers != "located":
            raise ValueError(f"layers={layers!r}: give a list of layer indices or 'located'")
        return located_layers(model, fingerprint)
    n = ArchAdapter.for_model(model).num_layers
    bad = out_of_range(layers, n)
    if bad:
        raise ValueError(f"layers: {bad[0]} is out of range for a model with {n} layers")
    return [int(i) % n for i in layers]
