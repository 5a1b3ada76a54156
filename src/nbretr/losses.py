"""The losses of NeighborRetr (docs/method.md, "Losses"), one function each, for ONE direction.

Every function takes plain tensors (rows = queries, columns = gallery) and returns a scalar.
The model (:mod:`nbretr.models.neighborretr`) calls each twice, on ``s`` (text→video) and on
``sᵀ`` (video→text), and averages. All of them compute in float32 (float64 stays float64),
so they are safe to call under autocast.

| docs/method.md | here |
|---|---|
| Loss 1, centrality weighting (L_wti) | :func:`centrality_weighting_loss` |
| Loss 2, neighbour adjusting (L_nbi)  | :func:`neighbor_adjusting_loss` |
| Loss 3, uniform regularisation (L_opt) | :func:`uniform_regularization_loss` |
| Loss 4, KL consistency (L_kl)        | :func:`kl_consistency_loss` |
| baseline (plain symmetric InfoNCE)    | :func:`infonce_loss` |
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from nbretr import ops

__all__ = [
    "infonce_loss",
    "centrality_weighting_loss",
    "neighbor_adjusting_loss",
    "uniform_regularization_loss",
    "kl_consistency_loss",
    "minmax_normalize",
]

_NEG = -1e30  # a finite "minus infinity" for masked softmax rows that may be empty


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _check_matrix(name: str, x: torch.Tensor, square: bool = False) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D [queries, gallery] matrix, got shape {list(x.shape)}")
    if square and x.shape[0] != x.shape[1]:
        raise ValueError(f"{name} must be square [B, B] (row i's positive is column i), got {list(x.shape)}")


@torch.autocast("cuda", enabled=False)
def infonce_loss(logits: torch.Tensor) -> torch.Tensor:
    """One direction of symmetric InfoNCE: ``−mean_i log_softmax_j(logits)[i, i]``.

    logits [B, B] (already scaled by the logit scale); the baseline averages this over
    ``logits`` and ``logits.T``."""
    _check_matrix("logits", logits, square=True)
    logits = _f32(logits)
    return -torch.diagonal(F.log_softmax(logits, dim=1)).mean()


@torch.autocast("cuda", enabled=False)
def centrality_weighting_loss(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """L_wti for one direction (docs/method.md, "Loss 1"):
    ``−mean_i w_i · log_softmax_j(logits_ij)[i, i]``, weights NOT normalised.

    logits [B, B] = ``logit_scale · s`` (rows queries); weights [B] = ``exp(κ·c_i)`` of the
    query side (see :meth:`nbretr.models.NeighborRetr.centrality_weights`)."""
    _check_matrix("logits", logits, square=True)
    if weights.shape != (logits.shape[0],):
        raise ValueError(f"weights must have shape [{logits.shape[0]}], got {list(weights.shape)}")
    logits, weights = _f32(logits), _f32(weights)
    return -(torch.diagonal(F.log_softmax(logits, dim=1)) * weights).mean()


def minmax_normalize(x: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Per-row min-max normalisation ``(x − min) / (max − min)`` with min and max taken over
    the columns where ``region`` is True, applied to every column (so values outside the
    region's range leave [0, 1]). A row whose region is empty becomes 0 (the reference's
    ±9e15 sentinels give the same constant in its normalised difference); a row whose
    region has max == min divides by 1 instead of 0 (the reference gives NaN there)."""
    empty = ~region.any(dim=1, keepdim=True)
    lo = torch.where(region, x, math.inf).amin(dim=1, keepdim=True)
    hi = torch.where(region, x, -math.inf).amax(dim=1, keepdim=True)
    lo = torch.where(empty, torch.zeros_like(lo), lo)
    hi = torch.where(empty, torch.ones_like(hi), hi)
    den = hi - lo
    den = torch.where(den > 0, den, torch.ones_like(den))
    return torch.where(empty, torch.zeros_like(x), (x - lo) / den)


@torch.autocast("cuda", enabled=False)
def neighbor_adjusting_loss(sim: torch.Tensor, bank_sim: torch.Tensor | None, num_neighbors: int,
                            temperature: float, *, centrality: torch.Tensor | None = None,
                            normalize_over: Literal["complement", "neighbors"] = "complement"
                            ) -> torch.Tensor:
    """L_nbi for one direction (docs/method.md, "Loss 2").

    Args:
        sim: [B, B] batch similarity ``S`` (rows queries, columns gallery; no logit scale).
        bank_sim: [B, Q_bank] gallery items of the batch × bank queries ``M`` (may carry
            gradient, as in the reference); centrality ``c_j = mean_q M[j, q]``. ``None`` or
            zero columns (empty bank): ``c = 0``.
        num_neighbors: k; ``N(i)`` = top-k columns of row i without the diagonal (ties: lower
            column first); clamped to ``B − 1``.
        temperature: τ of ``p_ij = softmax_{j∈N(i)}(τ · d_ij)``.
        centrality: [B] gallery centrality given directly (e.g. k-occurrence frequencies);
            overrides ``bank_sim``.
        normalize_over: "complement" (default, the reference: min/max over the columns
            outside ``E(i) = N(i) ∪ {i}``) or "neighbors" (min/max over ``E(i)``).

    ``d_ij = norm S_ij − norm c_j`` on N(i), ``p_ii = 1``, and
    ``L = mean_i −Σ_{j∈E(i)} p_ij log_softmax_{j∈E(i)}(S_ij) / Σ_j p_ij``.
    """
    _check_matrix("sim", sim, square=True)
    if normalize_over not in ("complement", "neighbors"):
        raise ValueError(f"normalize_over must be 'complement' or 'neighbors', got {normalize_over!r}")
    sim = _f32(sim)
    B = sim.shape[0]
    if centrality is None:
        if bank_sim is not None and bank_sim.dim() != 2:
            raise ValueError(f"bank_sim must be [B gallery, bank queries], got {list(bank_sim.shape)}")
        if bank_sim is not None and bank_sim.shape[0] != B:
            raise ValueError(f"bank_sim must have {B} rows (the batch gallery), got {list(bank_sim.shape)}")
        if bank_sim is None or bank_sim.shape[1] == 0:
            centrality = sim.new_zeros(B)
        else:
            centrality = _f32(bank_sim).mean(dim=1)
    elif centrality.shape != (B,):
        raise ValueError(f"centrality must have shape [{B}], got {list(centrality.shape)}")
    centrality = centrality.to(sim.dtype)

    eye = torch.eye(B, dtype=torch.bool, device=sim.device)
    k = max(0, min(int(num_neighbors), B - 1))
    with torch.no_grad():
        order = torch.sort(sim.masked_fill(eye, -math.inf), dim=1, descending=True, stable=True).indices
        nbr = torch.zeros_like(eye).scatter_(1, order[:, :k], True)
        ext = nbr | eye
    region = ~ext if normalize_over == "complement" else ext
    norm_s = minmax_normalize(sim, region)
    norm_c = minmax_normalize(centrality[None, :].expand(B, B), region)
    d = norm_s - norm_c
    p = torch.softmax((temperature * d).masked_fill(~nbr, _NEG), dim=1)
    p = p.masked_fill(~nbr, 0.0) + eye.to(sim.dtype)
    logp = F.log_softmax(sim.masked_fill(~ext, -math.inf), dim=1)
    logp = torch.where(ext, logp, torch.zeros_like(logp))
    return (-(p * logp).sum(dim=1) / p.sum(dim=1)).mean()


@torch.autocast("cuda", enabled=False)
def uniform_regularization_loss(sim: torch.Tensor, temperature: float, beta: float, n_iters: int,
                                detach_plan: bool = True, *, backend: ops.Backend | None = None
                                ) -> torch.Tensor:
    """L_opt for one direction (docs/method.md, "Loss 3") on the global matrix ``G [m, n]``.

    ``Q = exp(log_plan + log(m+n))`` from :func:`nbretr.ops.sinkhorn_log` on the raw scores
    (marginals ``−log(m+n)``, ``n_iters`` iterations; plan detached unless ``detach_plan`` is
    False), ``P = β·Q + (1−β)·I``, ``L = −mean_i Σ_j P_ij log_softmax_j(τ·G_ij)``."""
    _check_matrix("sim", sim)
    sim = _f32(sim)
    m, n = sim.shape
    scores = sim.detach() if detach_plan else sim
    log_plan = ops.sinkhorn_log(scores[None], n_iters=n_iters, backend=backend)[0][0]
    plan = torch.exp(log_plan + math.log(m + n))
    target = beta * plan + (1.0 - beta) * torch.eye(m, n, dtype=sim.dtype, device=sim.device)
    return -(target * F.log_softmax(temperature * sim, dim=1)).sum(dim=1).mean()


@torch.autocast("cuda", enabled=False)
def kl_consistency_loss(global_sim: torch.Tensor, local_sim: torch.Tensor) -> torch.Tensor:
    """L_kl for one direction (docs/method.md, "Loss 4"):
    ``KL(softmax(local) ‖ softmax(global))`` row-wise, summed and divided by ``n²`` (PyTorch
    ``kl_div(log_softmax(global), softmax(local), reduction='mean')``, as the reference)."""
    _check_matrix("global_sim", global_sim)
    if global_sim.shape != local_sim.shape:
        raise ValueError(f"global_sim {list(global_sim.shape)} and local_sim {list(local_sim.shape)} differ")
    log_q = F.log_softmax(_f32(global_sim), dim=1)
    p = F.softmax(_f32(local_sim), dim=1)
    # = F.kl_div(log_q, p, reduction="mean") (which warns about its 'mean'): 0·log 0 = 0
    return (torch.special.xlogy(p, p) - p * log_q).sum() / p.numel()
