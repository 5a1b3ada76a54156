"""Retrieval metrics from ranks and hubness measures from k-occurrences (definitions:
docs/corrections.md, "Hubness measures and the tie rule").

The ranks and the k-occurrences themselves come from the scoring engine
(:mod:`nbretr.scoring`): the rank of a target is ``1 + #{gallery items with higher
similarity, or equal similarity and lower index}`` (the tie rule of
:func:`nbretr.ops.topk_centrality`).
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "retrieval_metrics",
    "ranks_from_topk",
    "hubness",
]


def retrieval_metrics(ranks: torch.Tensor) -> dict[str, float]:
    """R@1/5/10/50 (percent), median rank MdR, mean rank MnR and Rsum = R@1 + R@5 + R@10.

    Args:
        ranks: [Q] 1-based rank of each query's correct item (any integer/float dtype).
    MdR is numpy's median (mean of the two middle ranks for an even count), as the
    reference computes it.
    """
    r = torch.as_tensor(ranks).detach().double().cpu().flatten()
    if r.numel() == 0:
        raise ValueError("retrieval_metrics: ranks is empty")
    if bool((r < 1).any()):
        raise ValueError("retrieval_metrics: ranks are 1-based; got a rank < 1")
    out = {f"R{K}": 100.0 * float((r <= K).double().mean()) for K in (1, 5, 10, 50)}
    out["MdR"] = float(np.median(r.numpy()))
    out["MnR"] = float(r.mean())
    out["Rsum"] = out["R1"] + out["R5"] + out["R10"]
    return out


def ranks_from_topk(indices: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Ranks from top-k lists (e.g. :func:`nbretr.ops.topk_centrality` indices [Q, k]):
    position + 1 where the target is in the list, ``k + 1`` where it is not (so R@K is
    exact for K <= k; MdR/MnR are not)."""
    Q, k = indices.shape
    hit = indices == targets.to(indices.device).view(Q, 1)
    pos = torch.where(hit, torch.arange(1, k + 1, device=indices.device)[None, :], k + 1)
    return pos.amin(1)


def hubness(counts: torch.Tensor, k: int, num_queries: int) -> dict[str, float]:
    """Hubness measures of k-occurrences (scikit-hubness definitions; docs/corrections.md).

    Args:
        counts: [G] N_k of every gallery item (zeros included), e.g. from topk_centrality.
        k: the k of the k-occurrences; num_queries: |Q|.
    Returns:
        skewness (biased third standardised moment = scipy.stats.skew; nan when all N_k
        are equal), hub_occurrence (share of all k·|Q| slots taken by hubs, N_k >= 2k),
        antihub_share (share of items with N_k = 0), robin_hood
        (½ Σ|N_k − mean| / Σ N_k), gini (Σ_i Σ_j |N_i − N_j| / (2|G| Σ N_k)),
        max_ratio (max N_k / mean N_k: how many times its share of the top-k slots the
        biggest hub takes) and hubs_5x (the number of items with N_k >= 5 mean N_k).
    """
    x = torch.as_tensor(counts).detach().double().cpu().flatten()
    n = x.numel()
    if n == 0:
        raise ValueError("hubness: counts is empty")
    total = float(x.sum())
    mu = x.mean()
    d = x - mu
    m2 = float((d * d).mean())
    m3 = float((d * d * d).mean())
    skew = m3 / m2 ** 1.5 if m2 > 0 else math.nan
    hubs = x >= 2 * k
    xs = torch.sort(x).values
    i = torch.arange(1, n + 1, dtype=torch.float64)
    nan = math.nan
    return {
        "skewness": skew,
        "hub_occurrence": float(x[hubs].sum()) / (k * num_queries) if num_queries else nan,
        "antihub_share": float((x == 0).double().mean()),
        "robin_hood": 0.5 * float(d.abs().sum()) / total if total else nan,
        "gini": float(((2 * i - n - 1) * xs).sum()) / (n * total) if total else nan,
        "max_ratio": float(x.max() / mu) if total else nan,
        "hubs_5x": int((x >= 5 * mu).sum()) if total else 0,
    }
