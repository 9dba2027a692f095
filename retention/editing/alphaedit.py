"""AlphaEdit: MEMIT's update confined to the null space of the preserved keys.

Fang et al. 2025, "AlphaEdit: Null-Space Constrained Knowledge Editing for Language Models" (ICLR 2025,
arXiv 2410.02355), §3: with ``P`` the projector onto the eigenvectors of the preserved-key covariance
``C₀ = E[k kᵀ]`` (:mod:`retention.editing.covariance`) whose eigenvalues fall below a threshold, the update of a
critical layer for keys ``K`` and residuals ``R`` (computed as in MEMIT, :mod:`retention.editing.memit`) is

    ΔW = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + α I)⁻¹

where ``K_p`` are the keys of the batches edited before (sequential editing keeps them) and ``α`` the L2 weight.
Since ``ΔW = ΔW P`` and ``P k₀ ≈ 0`` for preserved keys, the outputs for preserved knowledge do not move.
The threshold is absolute (``nullspace_threshold``, on eigenvalues of the mean ``k kᵀ``) or relative to the
largest eigenvalue; the projector's rank is logged and reported. Projectors are cached on disk, keyed by a digest
of the covariance they come from and the threshold.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from retention.diskcache import DiskCache
from retention.editing.base import EditRequest
from retention.editing.context import EditorContext
from retention.editing.memit import MemitEditor, MemitHParams, keys_and_values
from retention.paths import cache_dir

log = logging.getLogger(__name__)


@dataclass
class AlphaEditHParams(MemitHParams):
    """AlphaEdit hyperparameters: MEMIT's, plus the null-space threshold and the L2 weight.

    ``mom2_update_weight`` is not used (the projector takes the covariance's place); ``mom2_adjustment: false``
    means no preserved keys (P = I), the named fallback.
    """

    nullspace_threshold: float = 2e-2
    """Eigenvalues of C₀ below this span the null space (AlphaEdit's 2e-2, absolute)."""
    relative_threshold: bool = False
    """Read ``nullspace_threshold`` as a fraction of C₀'s largest eigenvalue."""
    l2: float = 10.0
    """α, the L2 weight on the update (AlphaEdit's ``L2``)."""

    def validate(self) -> None:
        super().validate()
        if self.nullspace_threshold <= 0:
            raise ValueError(f"nullspace_threshold={self.nullspace_threshold}: must be > 0")
        if self.relative_threshold and self.nullspace_threshold >= 1:
            raise ValueError(f"nullspace_threshold={self.nullspace_threshold}: a relative threshold must be < 1")
        if self.l2 <= 0:
            raise ValueError(f"l2={self.l2}: must be > 0 (it keeps the projected system invertible)")


def null_space_basis(cov: torch.Tensor, threshold: float, relative: bool = False) -> torch.Tensor:
    """The eigenvectors ``U`` (``[in, rank]``, float64) of ``cov`` whose eigenvalue is below the threshold."""
    values, vectors = torch.linalg.eigh(cov.double())
    limit = threshold * values.max().item() if relative else threshold
    return vectors[:, values < limit].contiguous()


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.blake2b(tensor.detach().cpu().contiguous().numpy().tobytes(), digest_size=12).hexdigest()


def null_space_projector(cov: torch.Tensor, threshold: float, relative: bool = False) -> tuple[torch.Tensor, int]:
    """``P = U Uᵀ`` for :func:`null_space_basis` and its rank; the basis is cached under ``cache_dir()/projectors``
    (keyed by the covariance's digest and the threshold) and reused, an entry failing its check is recomputed."""
    entries = DiskCache(cache_dir() / "projectors")
    key = {"covariance": _digest(cov.double()), "threshold": threshold, "relative": relative}
    hit = entries.get(key)
    if hit is None:
        basis = null_space_basis(cov, threshold, relative)
        entries.put(key, {"rank": basis.shape[1]}, {"U": basis})
    else:
        basis = hit[1]["U"]
    return basis @ basis.T, basis.shape[1]


def alphaedit_delta(keys: torch.Tensor, resid: torch.Tensor, projector: torch.Tensor, previous: torch.Tensor,
                    l2: float) -> torch.Tensor:
    """``ΔW = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + α I)⁻¹`` (float64 ``[out, in]``) for keys ``[n, in]``, residuals
    ``[n, out]``, the projector ``P`` and ``previous = K_p K_pᵀ``."""
    k, r, p = keys.double().T, resid.double().T, projector.double()
    a = p @ (k @ k.T + previous.double()) + l2 * torch.eye(k.shape[0], dtype=torch.float64)
    # X = A⁻¹ P K Rᵀ satisfies αX = P(K Rᵀ − (KKᵀ + K_pK_pᵀ) X), so X = P X: ΔW = Xᵀ lies in P's range.
    return torch.linalg.solve(a, p @ k @ r.T).T


class AlphaEditEditor(MemitEditor):
    """AlphaEdit: MEMIT with each layer's update projected onto the null space of its preserved keys; the keys
    of earlier batches are kept while the model holds their edits (sequential editing)."""

    name = "alphaedit"
    hparams_class = AlphaEditHParams
    hparams: AlphaEditHParams

    def __init__(self, hparams: AlphaEditHParams):
        super().__init__(hparams)
        self._projectors: dict[int, torch.Tensor] = {}
        self._ranks: dict[int, int] = {}
        self._previous: dict[int, torch.Tensor] = {}
        """Critical layer -> K_p K_pᵀ of the batches edited so far."""
        self._expected: dict[str, str] = {}
        """Parameter name -> digest of its weight with the earlier batches applied."""
        self._n_previous = 0
        """Requests of the earlier batches."""

    def _set_up(self, ctx: EditorContext, fresh: bool) -> None:
        if fresh:
            self._projectors, self._ranks, self._previous, self._expected, self._n_previous = {}, {}, {}, {}, 0
            hp = self.hparams
            for layer in ctx.layers:
                if layer in ctx.covs:
                    p, rank = null_space_projector(ctx.covs[layer], hp.nullspace_threshold, hp.relative_threshold)
                else:
                    dim = ctx.adapter.key_size(layer)
                    p, rank = torch.eye(dim, dtype=torch.float64), dim
                self._projectors[layer], self._ranks[layer] = p, rank
                log.info("alphaedit layer %d: null-space projector of rank %d of %d (threshold %g%s)", layer, rank,
                         p.shape[0], hp.nullspace_threshold, " × largest eigenvalue" if hp.relative_threshold else "")
        elif self._expected and not self._holds_earlier_batches(ctx.model):
            log.info("alphaedit: the model no longer holds the earlier batches' edits; their keys are dropped")
            self._previous, self._expected, self._n_previous = {}, {}, 0

    def _holds_earlier_batches(self, model: nn.Module) -> bool:
        return all(_digest(model.get_parameter(name)) == d for name, d in self._expected.items())

    def _solve(self, ctx: EditorContext, index: int, layer: int, keys: torch.Tensor,
               resid: torch.Tensor) -> torch.Tensor:
        p = self._projectors[layer]
        previous = self._previous.get(layer, torch.zeros_like(p))
        return alphaedit_delta(keys, resid, p, previous, self.hparams.l2)

    def _after_batch(self, ctx: EditorContext, requests: Sequence[EditRequest]) -> None:
        # The batch's keys as the edited model computes them join the preserved set (as in AlphaEdit's code).
        self._n_previous += len(requests)
        for layer in ctx.layers:
            keys, _ = keys_and_values(ctx, ctx.tokenizer, requests, ctx.templates, layer, layer,
                                      self.hparams.batch_size)
            previous = self._previous.get(layer)
            self._previous[layer] = keys.T @ keys + (0 if previous is None else previous)
            name = f"{ctx.adapter.mlp_out_name(layer)}.weight"
            self._expected[name] = _digest(ctx.model.get_parameter(name))

    def _info(self) -> dict:
        return {"projector_ranks": dict(self._ranks), "earlier_requests_kept": self._n_previous}

