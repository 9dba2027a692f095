"""Batched probe scoring under the four protocols of docs/design.md.

- ``top1``: the argmax next token after the prompt is the first token of ``" " + target``.
- ``prob``: the mean per-token log-prob of ``" " + target`` exceeds that of ``" " + alternative``.
- ``token_acc``: every target token is the argmax under teacher forcing.
- ``gen``: greedy generation of up to ``max_new_tokens`` tokens contains the target (case-insensitive).

One forward per batch: each probe contributes a ``prompt + target`` row (and a ``prompt + alternative`` row
for ``prob``), right-padded; logits are computed only at the positions that predict target tokens.

A row longer than the model's positions (``max_position_embeddings``) has its prompt cut from the left, keeping
BOS and the prompt's end, which the target continues; so does a ``gen`` prompt, to leave room for
``max_new_tokens``. The cut probes are counted in a warning and each records how many tokens it lost
(``ProbeResult.prompt_cut``).

``precision="bf16"`` scores under ``torch.autocast`` to bfloat16 (the weights stay as they are; the log-probs are
taken in float32), on a device that computes in bfloat16 natively (:func:`bf16_supported`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from retention.arch import unwrap_model
from retention.distributed import is_sharded
from retention.records import KnowledgeRecord, Probe
from retention.tokens import prompt_ids, right_pad, target_ids

log = logging.getLogger(__name__)

PROTOCOLS = ("top1", "prob", "token_acc", "gen")
PRECISIONS = ("32", "bf16")
RANK_CAP = 100
"""``ProbeResult.target_rank`` is recorded up to this value (it means "this far down or further"): deep in the
vocabulary logits lie so close together that the exact rank changes with the float noise of another batch shape
(one rank vs two DDP ranks), and the analysis only asks how few places the target fell."""


@dataclass
class ProbeResult:
    probe: Probe
    passed: dict[str, bool] = field(default_factory=dict)
    """Protocol -> outcome; ``prob`` is absent for probes without an alternative."""
    target_logprob: float = math.nan
    """Mean per-token log-prob of the target."""
    alt_logprob: float = math.nan
    top1_token: str = ""
    target_rank: int | None = None
    """Rank of the target's first token after the prompt: how many tokens have a strictly higher logit (0: the
    argmax), capped at :data:`RANK_CAP`. Recorded for the analysis of protocol disagreements (docs/analysis.md);
    decides no protocol."""
    generation: str | None = None
    prompt_cut: int = 0
    """Prompt tokens cut from the left so that the probe fits the model's positions (module docstring)."""

    @property
    def margin(self) -> float:
        return self.target_logprob - self.alt_logprob

    def to_dict(self) -> dict:
        p = self.probe
        return {
            "case_id": p.case_id, "kind": p.kind, "prompt": p.prompt, "target": p.target,
            "alternative": p.alternative, "passed": self.passed, "target_logprob": self.target_logprob,
            "alt_logprob": self.alt_logprob, "top1_token": self.top1_token, "target_rank": self.target_rank,
            "generation": self.generation, **({"prompt_cut": self.prompt_cut} if self.prompt_cut else {}),
        }


def check_protocols(protocols: Sequence[str]) -> tuple[str, ...]:
    bad = [p for p in protocols if p not in PROTOCOLS]
    if bad:
        raise ValueError(f"unknown protocol(s) {', '.join(bad)}; choose from {', '.join(PROTOCOLS)}")
    return tuple(protocols)


def top1_blind(tokenizer, records: Sequence[KnowledgeRecord]) -> list[str]:
    """Case ids of the records whose ``target_new`` and ``target_true`` start with the same token: ``top1`` passes
    or fails them alike edited or not (e.g. " Paris" and " Paris Hilton"), so only ``prob``/``gen`` can tell."""
    return [str(r.case_id) for r in records
            if r.target_true.strip() and target_ids(tokenizer, r.target_new)[0] == target_ids(tokenizer, r.target_true)[0]]


def bf16_supported(device: torch.device | str) -> bool:
    """Whether ``device`` computes in bfloat16 natively: a CUDA GPU that supports it, or a CPU with AVX-512 BF16
    or AMX. Other CPUs emulate it, slower than float32 (docs/finetuning.md#bf16-on-cpu)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def autocast(precision: str, device: torch.device):
    """The context ``precision`` scores in on ``device``: nothing for ``32``, autocast to bfloat16 for ``bf16``
    (refused where :func:`bf16_supported` is false)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if precision == "32":
        return contextlib.nullcontext()
    if not bf16_supported(device):
        raise ValueError(f"precision bf16: {device} has no native bfloat16 (a CPU needs AVX-512 BF16 or AMX, a GPU "
                         "bf16 support); score in float32 (precision 32)")
    return torch.autocast(device.type, dtype=torch.bfloat16)


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model has positions for (``max_position_embeddings``), or None when its config
    names none."""
    value = getattr(getattr(unwrap_model(model), "config", None), "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def fit_prompt(prompt: list[int], room: int, bos: int | None) -> list[int]:
    """``prompt`` cut from the left to at most ``room`` tokens, keeping a leading BOS."""
    if len(prompt) <= room:
        return prompt
    keep_bos = bos is not None and prompt[:1] == [bos] and room > 1
    return [bos, *prompt[len(prompt) - room + 1 :]] if keep_bos else prompt[len(prompt) - room :]


def _hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final (normed) hidden states of the decoder, without the LM head over every position."""
    return unwrap_model(model).base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


@dataclass
class ScoreRow:
    ids: list[int]
    start: int
    """Index of the first continuation token."""
    length: int
    """Number of continuation tokens."""


def score_rows(model: nn.Module, rows: list[ScoreRow], pad_id: int, ranks: bool = False):
    """One forward over right-padded rows; per row the log-probs, argmax ids and ids of its continuation tokens
    (with ``ranks``, also each token's rank: how many tokens have a strictly higher logit)."""
    device = next(model.parameters()).device
    input_ids, mask = right_pad([r.ids for r in rows], pad_id)
    hidden = _hidden_states(model, input_ids.to(device), mask.to(device))
    row_idx = torch.cat([torch.full((r.length,), i) for i, r in enumerate(rows)])
    pos_idx = torch.cat([torch.arange(r.start - 1, r.start - 1 + r.length) for r in rows])
    tgt = torch.cat([torch.tensor(r.ids[r.start : r.start + r.length]) for r in rows]).to(device)
    logits = unwrap_model(model).get_output_embeddings()(hidden[row_idx.to(device), pos_idx.to(device)]).float()
    logprobs = torch.log_softmax(logits, dim=-1)
    tok_lp = logprobs.gather(1, tgt[:, None])[:, 0].cpu()
    argmax = logits.argmax(-1).cpu()
    rank = (logits > logits.gather(1, tgt[:, None])).sum(1).cpu() if ranks else None
    out, k = [], 0
    for r in rows:
        item = (tok_lp[k : k + r.length], argmax[k : k + r.length], tgt[k : k + r.length].cpu())
        out.append((*item, rank[k : k + r.length]) if ranks else item)
        k += r.length
    return out


@torch.no_grad()
def greedy_generate(model: nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    """Greedy continuations of a batch of prompts (left-padded for generation), each prompt cut from the left to
    leave ``max_new_tokens`` of the model's positions.

    A sharded model (FSDP2) generates ``max_new_tokens`` steps on every rank, past EOS, so that ranks whose
    prompts end early still take part in the others' forwards; the rows are then cut at EOS as ``generate``
    does, so the text is the same."""
    device = next(model.parameters()).device
    limit = max_positions(model)
    room = None if limit is None else limit - max_new_tokens
    if room is not None and room < 2:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's {limit} "
                         "positions")
    sides = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side = tokenizer.truncation_side = "left"
    try:
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True, truncation=room is not None,
                        max_length=room).to(device)
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = sides
    base = unwrap_model(model)
    fixed = is_sharded(model)
    eos = base.generation_config.eos_token_id if fixed else None
    out = base.generate(
        **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
        temperature=None, top_p=None, top_k=None, **({"eos_token_id": None} if fixed else {}),
    )[:, enc["input_ids"].shape[1] :]
    if fixed and eos is not None:
        out = pad_after_eos(out, eos, tokenizer.pad_token_id)
    return tokenizer.batch_decode(out, skip_special_tokens=True)


def pad_after_eos(tokens: torch.Tensor, eos: int | list[int], pad_id: int) -> torch.Tensor:
    """Generated ``tokens`` with every position after a row's first EOS set to ``pad_id``: what ``generate``
    writes for a finished row when it stops at EOS."""
    ended = torch.isin(tokens, torch.tensor(eos if isinstance(eos, list) else [eos], device=tokens.device))
    after = (ended.cumsum(1) - ended.long()) > 0
    return tokens.masked_fill(after, pad_id)


def _gen_passed(generation: str, target: str) -> bool:
    return target.strip().lower() in generation.lower()


@torch.no_grad()
def score_probes(
    model: nn.Module,
    tokenizer,
    probes: Sequence[Probe],
    protocols: Sequence[str] = ("top1", "prob"),
    batch_size: int = 16,
    max_new_tokens: int = 10,
    progress: bool = False,
    precision: str = "32",
) -> list[ProbeResult]:
    """Score probes in batches; results are in the order of ``probes``. ``precision``: ``32``, or ``bf16``
    under autocast (module docstring)."""
    protocols = check_protocols(protocols)
    with autocast(precision, next(model.parameters()).device):
        return _score_probes(model, tokenizer, probes, protocols, batch_size, max_new_tokens, progress)


def _score_probes(model, tokenizer, probes, protocols, batch_size, max_new_tokens, progress) -> list[ProbeResult]:
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    results = [ProbeResult(p) for p in probes]
    limit = max_positions(model)
    encoded = []
    for p, res in zip(probes, results):
        pids = prompt_ids(tokenizer, p.prompt)
        tids = target_ids(tokenizer, p.target)
        alt = target_ids(tokenizer, p.alternative) if p.alternative is not None and "prob" in protocols else None
        if limit is not None:
            room = limit - max(len(tids), len(alt or ()))
            if room < 1:
                raise ValueError(f"probe of case {p.case_id} ({p.kind}): its target or alternative is longer than "
                                 f"the model's {limit} positions")
            if "gen" in protocols:
                room = min(room, limit - max_new_tokens)  # greedy_generate cuts its prompt alike
            cut = fit_prompt(pids, room, tokenizer.bos_token_id)
            res.prompt_cut, pids = len(pids) - len(cut), cut
        encoded.append((pids, tids, alt))
    cut = [r for r in results if r.prompt_cut]
    if cut:
        log.warning("%d of %d probes are longer than the model's %d positions: their prompts were cut from the left "
                    "to fit (first: case %s, %s, %d tokens cut)", len(cut), len(results), limit,
                    cut[0].probe.case_id, cut[0].probe.kind, cut[0].prompt_cut)
    # Sorting by length keeps padding small; results are written back by index.
    order = sorted(range(len(probes)), key=lambda i: len(encoded[i][0]) + len(encoded[i][1]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    iterator = batches
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc="scoring", unit="batch")
    for batch in iterator:
        rows, owners = [], []
        for i in batch:
            pids, tids, aids = encoded[i]
            rows.append(ScoreRow(pids + tids, len(pids), len(tids)))
            owners.append((i, "target"))
            if aids is not None:
                rows.append(ScoreRow(pids + aids, len(pids), len(aids)))
                owners.append((i, "alt"))
        for (i, which), (lp, argmax, tgt, rank) in zip(owners, score_rows(model, rows, tokenizer.pad_token_id,
                                                                           ranks=True)):
            res = results[i]
            if which == "target":
                res.target_logprob = lp.mean().item()
                res.top1_token = tokenizer.decode(argmax[:1])
                res.target_rank = min(int(rank[0]), RANK_CAP)
                if "top1" in protocols:
                    res.passed["top1"] = bool(argmax[0] == tgt[0])
                if "token_acc" in protocols:
                    res.passed["token_acc"] = bool((argmax == tgt).all())
            else:
                res.alt_logprob = lp.mean().item()
        if "prob" in protocols:
            for i in batch:
                if encoded[i][2] is not None:
                    results[i].passed["prob"] = results[i].target_logprob > results[i].alt_logprob
        if "gen" in protocols:
            gens = greedy_generate(model, tokenizer, [probes[i].prompt for i in batch], max_new_tokens)
            for i, g in zip(batch, gens):
                results[i].generation = g
                results[i].passed["gen"] = _gen_passed(g, probes[i].target)
    if progress:
        print(f"scored {len(probes)} probes in {time.perf_counter() - t0:.1f} s")
    model.train(was_training)
    return results
