"""Reference implementations that tests and benchmarks compare the package's fast paths against: the scorer that
runs one forward per probe, and the v*/z optimisation that runs every layer with weight gradients at every step
(what ROME-style code usually does)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from retention.editing.base import EditRequest
from retention.editing.context import EditorContext
from retention.editing.memit import keys_and_values
from retention.editing.targets import MAX_ROWS, TargetHParams, TargetOptimiser, TargetVector
from retention.records import Probe
from retention.scoring import RANK_CAP, ProbeResult, _gen_passed, check_protocols, greedy_generate
from retention.tokens import prompt_ids, target_ids


@torch.no_grad()
def score_probes_unbatched(
    model: nn.Module, tokenizer, probes: Sequence[Probe], protocols: Sequence[str] = ("top1", "prob"),
    max_new_tokens: int = 10,
) -> list[ProbeResult]:
    """Reference scorer: one full forward per prompt–target pair, no padding (as per-probe loops do)."""
    protocols = check_protocols(protocols)
    device = next(model.parameters()).device
    results = []
    for p in probes:
        res = ProbeResult(p)
        pids = prompt_ids(tokenizer, p.prompt)

        def mean_lp(tids: list[int], pids: list[int] = pids):
            ids = torch.tensor([pids + tids], device=device)
            logits = model(input_ids=ids).logits[0, len(pids) - 1 : -1].float()
            lp = torch.log_softmax(logits, -1).gather(1, torch.tensor(tids, device=device)[:, None])[:, 0]
            rank = min(int((logits[0] > logits[0, tids[0]]).sum()), RANK_CAP)
            return lp.mean().item(), logits.argmax(-1).cpu(), torch.tensor(tids), rank

        tids = target_ids(tokenizer, p.target)
        res.target_logprob, argmax, tgt, res.target_rank = mean_lp(tids)
        res.top1_token = tokenizer.decode(argmax[:1])
        if "top1" in protocols:
            res.passed["top1"] = bool(argmax[0] == tgt[0])
        if "token_acc" in protocols:
            res.passed["token_acc"] = bool((argmax == tgt).all())
        if "prob" in protocols and p.alternative is not None:
            res.alt_logprob = mean_lp(target_ids(tokenizer, p.alternative))[0]
            res.passed["prob"] = res.target_logprob > res.alt_logprob
        if "gen" in protocols:
            res.generation = greedy_generate(model, tokenizer, [p.prompt], max_new_tokens)[0]
            res.passed["gen"] = _gen_passed(res.generation, p.target)
        results.append(res)
    return results


class NaiveTargetOptimiser(TargetOptimiser):
    """The same δ optimisation the slow way: every step a full forward and backward through all layers, with
    weight gradients."""

    def prefix(self) -> torch.Tensor | None:
        return None

    def trained_weights(self) -> list[nn.Parameter]:
        return list(self.base.parameters())


def naive_targets(model: nn.Module, tokenizer, requests: Sequence[EditRequest], context_templates: Sequence[str],
                  hparams: TargetHParams, layer: int, site: str = "mlp_out",
                  max_rows: int = MAX_ROWS) -> list[TargetVector]:
    """:func:`~retention.editing.targets.optimise_targets` run by :class:`NaiveTargetOptimiser`."""
    context = EditorContext.of(model, tokenizer)
    return NaiveTargetOptimiser(context, requests, context_templates, hparams, layer, site, max_rows).run()


class FullPositionsTargetOptimiser(TargetOptimiser):
    """The package's δ optimisation but every step runs every position of every row (nothing held)."""

    split = False


def full_position_targets(model: nn.Module, tokenizer, requests: Sequence[EditRequest],
                          context_templates: Sequence[str], hparams: TargetHParams, layer: int,
                          site: str = "mlp_out", max_rows: int = MAX_ROWS) -> list[TargetVector]:
    """:func:`~retention.editing.targets.optimise_targets` run by :class:`FullPositionsTargetOptimiser`."""
    context = EditorContext.of(model, tokenizer)
    return FullPositionsTargetOptimiser(context, requests, context_templates, hparams, layer, site, max_rows).run()


@torch.no_grad()
def average_key(model: nn.Module | EditorContext, tokenizer, layer: int, request: EditRequest,
                context_templates: Sequence[str]) -> torch.Tensor:
    """ROME's ``k̄`` computed by a forward of its own: the MLP-out input at the subject's last token, averaged over
    the rewriting prompts (float64) — the one-request, one-column case of
    :func:`~retention.editing.memit.keys_and_values` (``per="request"``, all prompts in one forward). ROME reads it
    on the v* optimiser's first step instead (``TargetVector.key``)."""
    keys, _ = keys_and_values(model, tokenizer, [request], context_templates, layer, batch_size=None, per="request")
    return keys[0]
