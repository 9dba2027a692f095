"""The shared v*/z optimiser of the locate-then-edit editors (ROME's v*, MEMIT's z), and context templates.

For each fact a vector δ is added to the output of one module at layer ``L`` — the MLP output projection
(ROME) or the whole decoder layer (MEMIT) — at the subject's last token of every rewriting prompt, and optimised
with Adam (Meng et al. 2022, "Locating and Editing Factual Associations in GPT", §3.1 and Appendix E.5):

    loss_f = NLL(target_new | rewriting prompts) + kl_factor · KL(p₀ ‖ p_δ on "{} is a") + wd · ‖δ‖ / ‖v₀‖²

then ``‖δ‖`` is clamped to ``clamp_norm_factor · ‖v₀‖``, where ``v₀`` is the module's original output at the
subject's last token of the plain prompt. The rewriting prompts are the context templates (a plain ``"{}"``
first, then short generated prefixes) × the request's phrasings (prompt, then augmentations), each followed by
the target's tokens but the last (teacher forcing); the KL is taken at the subject's last token of the KL prompts.

A batch of facts is optimised together: one forward/backward per step over all active facts' prompts, each fact
with its own δ, loss, Adam state, clamp and early stop, so a batch gives the vectors that one-at-a-time
optimisation gives. A fact's loss is a weighted sum over its prompt rows, so the rows of all facts are sorted by
length and run in chunks of similar length (little padding), their gradients adding up. No weight gradients are
computed and the frozen layers below ``L`` run once: their output is cached and every step starts at layer ``L``.
The positions before each prompt's subject run once too (δ never reaches them): their keys and values at layers
``L`` on are held, and every step runs only the positions from the subject's last token on
(:class:`~retention.editing.target_rows.Chunk`). :class:`TargetOptimiser` holds one batch's optimisation; :func:`optimise_targets` runs one.

The prompt rows, their chunks and the held keys are :mod:`retention.editing.target_rows`; the context templates
and the editors' shared set-up are :mod:`retention.editing.locate_then_edit`.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import DynamicCache

from retention.editing.base import EditError, EditorHParams, EditRequest, describe_requests
from retention.editing.context import EditorContext
from retention.editing.target_rows import Chunk, KeyValueRecorder, plan_chunks, prompt_rows
from retention.editing.trace import (
    add_at,
    capture,
    layer_input,
    patch_outputs,
    start_at_layer,
)
from retention.tokens import right_pad

log = logging.getLogger(__name__)

SITES = ("mlp_out", "layer")
"""Where δ is added: the MLP output projection's output (ROME) or the decoder layer's output (MEMIT)."""
MAX_ROWS = 64
"""Prompt rows per forward/backward: a step over more rows runs in chunks whose gradients add up (the memory of a
backward grows with the rows, about 30 MB per row on a 135M model)."""
HELD_BYTES = 2**30
"""At most this many bytes of held keys and values (see :class:`~retention.editing.target_rows.Chunk`); chunks
beyond it run every position at every step."""
V_LR_WARN = 10.0
"""A ``v_lr`` above this is warned about: the presets use 0.5, and Adam's steps are about ``v_lr`` per
coordinate, so a far larger rate only jumps to the clamp."""


@dataclass
class TargetVector:
    """The optimised δ of one fact and how the optimisation went."""

    delta: torch.Tensor
    """float32 ``[hidden]``: the change of the site's output at the subject's last token."""
    init: torch.Tensor
    """float32 ``[hidden]``: the site's original output there, on the plain prompt (``v₀``)."""
    losses: list[float] = field(default_factory=list)
    nll: float = float("nan")
    kl: float = float("nan")
    target_prob: float = float("nan")
    """Geometric-mean probability of the target tokens over the rewriting prompts at the last evaluated step."""
    steps: int = 0
    """Adam updates made."""
    key: torch.Tensor | None = None
    """float64 ``[in]``: the site's input at the subject's last token averaged over the rewriting prompts (first
    step; δ never changes it) — ROME's ``k̄`` when the site is the MLP output projection; None at a layer site."""

    @property
    def value(self) -> torch.Tensor:
        """``v* = v₀ + δ``."""
        return self.init + self.delta


@dataclass
class TargetHParams(EditorHParams):
    """The v*/z optimisation and context-template fields shared by ROME and MEMIT (names as in their code)."""

    v_steps: int = 20
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    kl_factor: float = 0.0625
    clamp_norm_factor: float = 4.0
    """‖δ‖ ≤ clamp_norm_factor · ‖v₀‖ (ROME: the MLP output) or ‖h_L‖ (MEMIT: the layer output, a factor < 1)."""
    early_stop_loss: float = 0.05
    kl_prompts: list[str] = field(default_factory=lambda: ["{} is a"])
    context_templates: list[list[int]] = field(default_factory=lambda: [[5, 10], [10, 10]])
    """``[length, count]`` pairs of generated prefixes (ROME's ``context_template_length_params``)."""
    context_seed: int = 0

    def validate(self) -> None:
        super().validate()
        for length, count in self.context_templates:
            if length < 1 or count < 0:
                raise ValueError(f"context_templates: [{length}, {count}] needs length >= 1 and count >= 0")
        if self.v_steps < 2:
            raise ValueError(f"v_steps={self.v_steps}: must be >= 2 (the last step only measures the loss, so one "
                             "step never changes δ)")
        for name in ("v_lr", "clamp_norm_factor", "v_weight_decay", "kl_factor", "early_stop_loss"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ValueError(f"{name}={value}: must be a finite number")
        for name in ("v_lr", "clamp_norm_factor"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be > 0")
        for name in ("v_weight_decay", "kl_factor"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 0")
        if self.v_lr > V_LR_WARN:
            log.warning("v_lr=%g is far above the presets' 0.5: Adam then jumps δ to the clamp (clamp_norm_factor) "
                        "at once, and a rate large enough to overflow leaves δ at zero (refused as a failed edit)",
                        self.v_lr)


NEGLIGIBLE_UPDATE = 2.0**-24
"""An update with ``‖ΔW‖ ≤ NEGLIGIBLE_UPDATE · ‖W‖`` is no edit: below half of float32's resolution (the deltas
are float32), added to the weight it changes almost no entry."""


def refuse_zero_update(updates: Sequence[torch.Tensor], weights: Sequence[torch.Tensor],
                       requests: EditRequest | Sequence[EditRequest], what: str, hparams: TargetHParams,
                       targets: Sequence[TargetVector]) -> None:
    """Refuse a zero (or numerically negligible) update of the ``weights`` (all of them together: one layer of
    several may be left unchanged) as a failed edit (:class:`EditError` naming the request(s)): applying it would
    record an edit that did not happen. Not when every request's ``targets`` stopped before its first step because
    its loss was already below ``early_stop_loss`` (the model already gives the new target: nothing to write)."""
    norm = math.sqrt(sum(u.double().norm().item() ** 2 for u in updates))
    scale = math.sqrt(sum(w.detach().double().norm().item() ** 2 for w in weights))
    if norm > NEGLIGIBLE_UPDATE * scale:
        return
    if all(t.steps == 0 and t.losses and t.losses[0] < hparams.early_stop_loss for t in targets):
        log.info("%s: the model already gives the new target (loss below early_stop_loss): no update",
                 describe_requests(requests))
        return
    moved = max((t.delta.double().norm().item() for t in targets), default=0.0)
    why = (f"The v*/z optimisation ended with δ = 0, as when v_lr (now {hparams.v_lr:g}) is so large that ‖δ‖ "
           f"overflows and the clamp (clamp_norm_factor {hparams.clamp_norm_factor:g}) zeroes it: lower v_lr (the "
           "presets use 0.5)") if moved == 0 else (
           f"The targets moved (‖δ‖ up to {moved:.3g}) but the update that writes them is zero: the keys' "
           "projection left nothing to write (AlphaEdit: the preserved and earlier-edited keys span the layer's "
           "key space)")
    raise EditError(f"{describe_requests(requests)}: the {what} is zero (‖ΔW‖ {norm:.3g}, ‖W‖ {scale:.3g}): the "
                    f"edit failed and is not applied. {why}")


@contextmanager
def trainable_only(model: nn.Module, params: Sequence[nn.Parameter] = ()) -> Iterator[None]:
    """Inside, only ``params`` require gradients (no weight gradients at all by default); flags restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    keep = {id(p) for p in params}
    try:
        for p, _ in flags:
            p.requires_grad_(id(p) in keep)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Inside, ``model`` is in eval mode; its training flag is restored after, also on an error."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def optimise_targets(
    model: nn.Module | EditorContext,
    tokenizer,
    requests: Sequence[EditRequest],
    context_templates: Sequence[str],
    hparams: TargetHParams,
    layer: int,
    site: str = "mlp_out",
    max_rows: int = MAX_ROWS,
) -> list[TargetVector]:
    """Optimise one δ per request at ``site`` of ``layer`` with the ``v_*`` fields of ``hparams``, all together
    (see the module docstring and :class:`TargetOptimiser`); a non-finite loss is an :class:`EditError` naming the
    request and the step. ``model`` may be the :class:`EditorContext` of an editor call."""
    if not requests:
        return []
    context = EditorContext.of(model, tokenizer)
    return TargetOptimiser(context, requests, context_templates, hparams, layer, site, max_rows).run()


class TargetOptimiser:
    """One batch of δ optimisations (the module docstring's loss, Adam, clamp and early stop per fact).

    Holds the model, its adapter, the site δ is added at and the prompt rows of all facts, and the state the steps
    share: the cached input of layer ``L`` (:meth:`prefix`), the δs and their Adam optimiser, the KL reference
    distributions of the first step and the :class:`TargetVector` results. :meth:`run` optimises; :meth:`step` is
    one forward over a chunk of rows.
    """

    split = True
    """Hold the keys and values of the positions before the subjects and run only the rest at every step (see
    :class:`Chunk`); needs the cached layer input (:meth:`prefix`) and full attention at every layer."""

    def __init__(self, context: EditorContext, requests: Sequence[EditRequest], context_templates: Sequence[str],
                 hparams: TargetHParams, layer: int, site: str = "mlp_out", max_rows: int = MAX_ROWS):
        if site not in SITES:
            raise ValueError(f"site={site!r}: choose from {', '.join(SITES)}")
        if max_rows < 1:
            raise ValueError(f"max_rows={max_rows}: must be >= 1")
        self.ctx, self.requests, self.hparams, self.max_rows = context, list(requests), hparams, max_rows
        self.base, self.adapter = context.model, context.adapter
        self.layer = layer % self.adapter.num_layers
        self.site_name = site
        self.site = self.adapter.mlp_out(self.layer) if site == "mlp_out" else self.adapter.layer(self.layer)
        self.device = context.device
        tokenizer = context.tokenizer
        self.rows = prompt_rows(tokenizer, self.requests, context_templates, hparams.kl_prompts)
        self.ids, self.mask = (t.to(self.device) for t in right_pad([r.ids for r in self.rows], tokenizer.pad_token_id))
        self.cached: torch.Tensor | None = None
        """The rows' input of layer ``L`` (:meth:`prefix`); None: every step runs all layers."""
        self.deltas: list[torch.Tensor] = []
        self.results: list[TargetVector] = []
        self.kl_init: dict[int, torch.Tensor] = {}
        """KL row -> its log-probs at δ = 0 (the first step's), the reference p₀."""
        self.weights = torch.zeros(0)
        """Per row its weight in its fact's loss: a fact's loss is a weighted sum over its rows, so chunks of rows
        add up to it exactly."""
        self._active: tuple[int, ...] | None = None
        self._built: dict[tuple[int, ...], Chunk] = {}
        """The chunks of the active facts' rows (:meth:`_plan`)."""
        params = inspect.signature(self.base.base_model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        """The forward's key/value cache argument (renamed in transformers 5)."""
        config = self.base.config
        types = getattr(config, "layer_types", None)
        self._full_attention = (all(t == "full_attention" for t in types) if types is not None
                                else getattr(config, "sliding_window", None) is None)
        """Every layer attends to all earlier positions (the split chunks' mask; a sliding window is not split)."""

    def prefix(self) -> torch.Tensor | None:
        """The rows' input of layer ``L``, computed once: the layers below it are frozen, so every step starts there
        (None would make every step run all layers)."""
        return layer_input(self.base, self.layer, self.ids, self.mask, self.adapter)

    def trained_weights(self) -> list[nn.Parameter]:
        """Weights that get gradients while δ is optimised: none (their gradients are dropped after each step)."""
        return []

    def run(self) -> list[TargetVector]:
        """Optimise every fact's δ; the results in the order of the requests."""
        hp, base = self.hparams, self.base
        t0 = time.perf_counter()
        params = self.trained_weights()
        with evaluating(base), trainable_only(base, params):
            self.cached = self.prefix()
            self.deltas = [torch.zeros(self.adapter.hidden_size, device=self.device, requires_grad=True)
                           for _ in self.requests]
            opt = torch.optim.Adam(self.deltas, lr=hp.v_lr)
            self.results = [TargetVector(torch.zeros(0), torch.zeros(0)) for _ in self.requests]
            self.kl_init = {}
            self._active = None
            active = list(range(len(self.requests)))
            self.weights = torch.tensor([r.share * (1.0 if r.targets else hp.kl_factor) for r in self.rows],
                                        device=self.device)
            for step in range(hp.v_steps):
                opt.zero_grad(set_to_none=True)
                losses = self._losses(step, active)
                decays = {f: hp.v_weight_decay * self.deltas[f].norm() / self.results[f].init.norm() ** 2
                          for f in active}
                stepping = self._record(step, active, *losses, decays)
                if stepping:
                    self._update(opt, active, stepping, decays)
                for p in params:
                    p.grad = None
                active = stepping
                if not active:
                    break
            self._built, self._active = {}, None  # frees the held keys and values
        for f, res in enumerate(self.results):
            res.delta = self.deltas[f].detach().float().clone()
            if res.key is not None:
                res.key = res.key.cpu()
        log.debug("optimised %d target vector(s) at layer %d in %.2f s", len(self.requests), self.layer,
                  time.perf_counter() - t0)
        return self.results

    def _losses(self, step: int, active: Sequence[int]) -> tuple[list[float], list[float], list[float]]:
        """Per fact its NLL, KL and target probability at this step, over the chunks of the active facts' rows;
        their gradients are accumulated (but after the last step, when nothing is updated)."""
        n = len(self.requests)
        nll, kl, prob = [0.0] * n, [0.0] * n, [0.0] * n
        for chunk in self._plan(active):
            values = self.step(chunk, step == 0)
            if step != self.hparams.v_steps - 1:
                (self.weights[chunk] * values).sum().backward()
            for i, v in zip(chunk, values.tolist()):
                r = self.rows[i]
                if r.targets is None:
                    kl[r.fact] += r.share * v
                else:
                    nll[r.fact] += r.share * v
                    prob[r.fact] += r.share * math.exp(-v)
        return nll, kl, prob

    def _plan(self, active: Sequence[int]) -> list[list[int]]:
        """The chunks of the active facts' rows, each built (:class:`Chunk`) once while the active facts stay."""
        if tuple(active) != self._active:
            split = self.split and self.cached is not None and self._full_attention
            chunks = plan_chunks(self.rows, active, self.max_rows, split)
            self._built = {}  # the chunks of the facts before go before the new are built (their held keys)
            budget = HELD_BYTES
            for chunk in chunks:
                built = self._build(chunk, split and self._held_estimate(chunk) <= budget)
                budget -= built.held_bytes
                self._built[tuple(chunk)] = built
            self._active = tuple(active)
        return [list(key) for key in self._built]

    def _held_estimate(self, chunk: Sequence[int]) -> int:
        """An upper bound of the bytes a split chunk holds (keys and values at most ``hidden_size`` wide)."""
        prefix = max(self.rows[i].subject for i in chunk)
        per_token = 2 * self.adapter.hidden_size * self.cached.element_size()
        return len(chunk) * prefix * (self.adapter.num_layers - self.layer) * per_token

    def _build(self, chunk: Sequence[int], split: bool) -> Chunk:
        """The forward inputs and loss indices of the rows ``chunk``; ``split``: hold the keys and values of the
        positions before the subjects (one forward without gradients, here) and run only the rest each step."""
        rows, dev = [self.rows[i] for i in chunk], self.device
        sel = torch.tensor(chunk, device=dev)
        lengths = torch.tensor([len(r.ids) for r in rows], device=dev)
        shift = torch.tensor([r.subject if split else 0 for r in rows], device=dev)
        prefix = int(shift.max())
        width = int((lengths - shift).max())
        held: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        positions = None
        if prefix == 0:  # nothing before the subjects to hold
            ids, mask = self.ids[sel, :width], self.mask[sel, :width]
            hidden = None if self.cached is None else self.cached[sel, :width]
        else:
            recorder = KeyValueRecorder()
            with torch.no_grad(), start_at_layer(self.base, self.layer, self.cached[sel, :prefix], self.adapter):
                self.base.base_model(input_ids=self.ids[sel, :prefix], attention_mask=self.mask[sel, :prefix],
                                     use_cache=True, **{self._cache_arg: recorder})
            # Left-pad each row's held positions (so its run positions follow them): a padding slot copies slot 0
            # (finite, masked out).
            slots = torch.arange(prefix, device=dev)
            start = prefix - shift
            source = (slots[None] - start[:, None]).clamp(min=0)
            for layer, (k, v) in recorder.given.items():
                index = source[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
                held[layer] = (k.gather(2, index), v.gather(2, index))
            cols = torch.arange(width, device=dev)
            at = (shift[:, None] + cols[None]).clamp(max=self.ids.shape[1] - 1)
            ids, hidden, positions = self.ids[sel[:, None], at], self.cached[sel[:, None], at], shift[:, None] + cols
            run = cols[None] < (lengths - shift)[:, None]
            causal = cols[None, :, None] >= cols[None, None, :]  # [1, query, key]
            allowed = torch.cat([(slots[None] >= start[:, None])[:, None].expand(-1, width, -1),
                                 causal & run[:, None]], -1)
            mask = torch.zeros(allowed.shape, dtype=hidden.dtype, device=dev)
            mask = mask.masked_fill(~allowed, torch.finfo(hidden.dtype).min)[:, None]
        logit_rows, logit_cols, tok_at, tok, tok_row, kl_at, kl_row = [], [], [], [], [], [], []
        for j, r in enumerate(rows):
            offset = int(shift[j])
            if r.targets is None:
                kl_at.append(len(logit_rows))
                kl_row.append(j)
                logit_rows.append(j)
                logit_cols.append(r.subject - offset)
            else:
                first = len(r.ids) - len(r.targets) - offset
                tok_at += range(len(logit_rows), len(logit_rows) + len(r.targets))
                tok_row += [j] * len(r.targets)
                logit_rows += [j] * len(r.targets)
                logit_cols += range(first, first + len(r.targets))
                tok += r.targets
        tok_row_t = torch.tensor(tok_row, dtype=torch.long, device=dev)
        counts = torch.zeros(len(rows), device=dev).index_add(0, tok_row_t, torch.ones(len(tok), device=dev))

        def t(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=dev)

        return Chunk(ids, mask, hidden, positions, held, t([r.subject for r in rows]) - shift, t(logit_rows),
                      t(logit_cols), t(tok_at), t(tok), tok_row_t, counts.clamp(min=1), t(kl_at), kl_row)

    def _record(self, step: int, active: Sequence[int], nll: list[float], kl: list[float], prob: list[float],
                decays: dict[int, torch.Tensor]) -> list[int]:
        """Record each active fact's losses; the facts still above ``early_stop_loss`` (none after the last step).
        A non-finite loss is an :class:`EditError`."""
        hp = self.hparams
        stepping = []
        for f in active:
            res = self.results[f]
            res.nll, res.kl, res.target_prob = nll[f], kl[f], prob[f]
            res.losses.append(nll[f] + hp.kl_factor * kl[f] + decays[f].item())
            if not math.isfinite(res.losses[-1]):
                raise EditError(
                    f"{self.requests[f].describe()}: non-finite v*/z loss {res.losses[-1]} at step {step + 1} of "
                    f"{hp.v_steps} (NLL {nll[f]}, KL {kl[f]}, ‖δ‖ {self.deltas[f].norm().item():.3g}, "
                    f"‖v₀‖ {res.init.norm().item():.3g}); the edit is not applied: lower v_lr (now {hp.v_lr}) "
                    f"or clamp_norm_factor (now {hp.clamp_norm_factor}), or load the model in float32 or "
                    f"bfloat16 (it is {self.adapter.embed.weight.dtype}) and check that its weights are finite"
                )
            if res.losses[-1] >= hp.early_stop_loss and step != hp.v_steps - 1:
                stepping.append(f)
        return stepping

    def _update(self, opt: torch.optim.Optimizer, active: Sequence[int], stepping: Sequence[int],
                decays: dict[int, torch.Tensor]) -> None:
        """An Adam step of the ``stepping`` facts' δs (with their weight decay), each then clamped to
        ``clamp_norm_factor · ‖v₀‖``; the other active facts keep their δ and Adam state."""
        torch.stack([decays[f] for f in stepping]).sum().backward()
        for f in set(active) - set(stepping):
            self.deltas[f].grad = None  # Adam skips it: a finished fact keeps its δ and Adam state
        opt.step()
        with torch.no_grad():
            for f in stepping:
                self.results[f].steps += 1
                max_norm = self.hparams.clamp_norm_factor * self.results[f].init.norm()
                norm = self.deltas[f].norm()
                if norm > max_norm:
                    self.deltas[f].mul_(max_norm / norm)

    def step(self, chunk: Sequence[int], first: bool) -> torch.Tensor:
        """One forward over the rows ``chunk`` (as planned by :meth:`_plan`) with each fact's δ added at the site;
        per row its target NLL (rewriting row) or KL (KL row). The ``first`` step records ``v₀`` and the KL
        reference."""
        c, sub = self._built[tuple(chunk)], [self.rows[i] for i in chunk]
        facts = sorted({r.fact for r in sub})
        slot = {f: j for j, f in enumerate(facts)}
        stacked = torch.stack([self.deltas[f] for f in facts])
        values = stacked[torch.tensor([slot[r.fact] for r in sub], device=stacked.device)]
        patch = add_at(torch.arange(len(sub)), c.subject, values)
        kwargs = {"input_ids": c.ids, "attention_mask": c.mask, "use_cache": False}
        if c.held:
            cache = DynamicCache()
            for layer, (k, v) in c.held.items():
                cache.update(k, v, layer)
            kwargs.update({self._cache_arg: cache, "position_ids": c.positions, "use_cache": True})
        keys = first and self.site_name == "mlp_out"
        with patch_outputs({self.site: patch}), capture({"site": self.site}, inputs=keys) as rec:
            if c.hidden is None:
                hidden = self.base.base_model(**kwargs).last_hidden_state
            else:
                with start_at_layer(self.base, self.layer, c.hidden, self.adapter):
                    hidden = self.base.base_model(**kwargs).last_hidden_state
        if first:
            for j, r in enumerate(sub):
                if r.plain:
                    # The captured output already holds δ = 0 at this step, so it is the original output.
                    self.results[r.fact].init = rec["site"].output[j, c.subject[j]].detach().float().clone()
            if keys:
                for j, r in enumerate(sub):
                    if r.targets is not None:  # a rewriting prompt (the target tokens after it change no key)
                        key = rec["site"].input[j, c.subject[j]].double()
                        res = self.results[r.fact]
                        res.key = key * r.share if res.key is None else res.key + key * r.share
        return self._row_losses(chunk, c, hidden, first)

    def _row_losses(self, chunk: Sequence[int], c: Chunk, hidden: torch.Tensor, first: bool) -> torch.Tensor:
        """Per row of ``chunk`` its mean target NLL or its KL(p₀ ‖ p) from the final hidden states ``hidden``."""
        # Logits only where they are needed. Log-probs are picked with one index per kind (a slice per row would
        # make backward zero-fill a full [positions, vocab] gradient for every row).
        logits = self.base.get_output_embeddings()(hidden[c.logit_rows, c.logit_cols]).float()
        logprobs = torch.log_softmax(logits, -1)
        per_row = torch.zeros(len(chunk), device=logits.device)
        if len(c.tok):  # a chunk may hold KL rows only
            per_row = -per_row.index_add(0, c.tok_row, logprobs[c.tok_at, c.tok]) / c.counts
        if c.kl_row:
            lp = logprobs[c.kl_at]
            if first:
                for i, j in enumerate(c.kl_row):
                    self.kl_init[chunk[j]] = lp[i].detach()
            ref = torch.stack([self.kl_init[chunk[j]] for j in c.kl_row])
            per_row = per_row.index_put((c.kl_at.new_tensor(c.kl_row),), torch.sum(ref.exp() * (ref - lp), -1))
        return per_row
