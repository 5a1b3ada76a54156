"""Retrieval metrics from ranks and hubness measures from k-occurrences (definitions:
docs/corrections.md, "Hubness measures and the tie rule").

Ranks are computed for any gallery size without the full similarity matrix: queries go in
chunks (at most ``max_tile_elems`` similarities live at once) and the rank of a target is
``1 + #{gallery items with higher similarity, or equal similarity and lower index}`` (the
tie rule of :func:`nbretr.ops.topk_centrality`). k-occurrences come from
:func:`nbretr.ops.topk_centrality`.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from nbretr import ops

__all__ = [
    "retrieval_metrics",
    "ranks_from_sim",
    "ranks_from_topk",
    "rank_of_targets",
    "retrieval_report",
    "hubness",
    "k_occurrence",
]

SimFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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


def ranks_from_sim(sim: torch.Tensor, targets: torch.Tensor | None = None, *,
                   gallery_owner: torch.Tensor | None = None, row_offset: int = 0) -> torch.Tensor:
    """Ranks of the targets in rows of a similarity block ``sim`` [R, G] (full gallery).

    Exactly one of:
        targets: [R] int64, the gallery index of each row's correct item;
        gallery_owner: [G] int64, the query each gallery item belongs to (e.g.
            ``caption_to_video`` when the gallery is captions): row r's targets are
            ``{j : gallery_owner[j] == r + row_offset}`` and its rank is its best target's
            (video->text on multi-caption sets).
    Returns [R] int64 1-based ranks (ties: equal similarity and lower index ranks first).
    """
    R, G = sim.shape
    cols = torch.arange(G, device=sim.device)
    if (targets is None) == (gallery_owner is None):
        raise ValueError("ranks_from_sim: pass exactly one of targets and gallery_owner")
    if gallery_owner is not None:
        rows = torch.arange(R, device=sim.device) + row_offset
        mask = gallery_owner.to(sim.device)[None, :] == rows[:, None]
        has = mask.any(1)
        if not bool(has.all()):
            bad = int((~has).nonzero()[0, 0]) + row_offset
            raise ValueError(f"ranks_from_sim: query {bad} owns no gallery item (gallery_owner)")
        best_v = sim.masked_fill(~mask, float("-inf")).amax(1, keepdim=True)
        # lowest index among the targets with the best value
        cand = mask & (sim == best_v)
        targets = torch.where(cand, cols[None, :], G).amin(1)
    t = targets.to(sim.device).long().view(R, 1)
    st = sim.gather(1, t)
    better = (sim > st) | ((sim == st) & (cols[None, :] < t))
    return 1 + better.sum(1)


def ranks_from_topk(indices: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Ranks from top-k lists (e.g. :func:`nbretr.ops.topk_centrality` indices [Q, k]):
    position + 1 where the target is in the list, ``k + 1`` where it is not (so R@K is
    exact for K <= k; MdR/MnR are not)."""
    Q, k = indices.shape
    hit = indices == targets.to(indices.device).view(Q, 1)
    pos = torch.where(hit, torch.arange(1, k + 1, device=indices.device)[None, :], k + 1)
    return pos.amin(1)


def _dot_sim(q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    if q.dtype == torch.float32:
        return q @ g.T
    return q.float() @ g.float().T


@torch.no_grad()
def rank_of_targets(q: torch.Tensor, g: torch.Tensor, targets: torch.Tensor | None = None, *,
                    gallery_owner: torch.Tensor | None = None, sim_fn: SimFn | None = None,
                    max_tile_elems: int = 1 << 24) -> torch.Tensor:
    """1-based rank of each query's target for any gallery size, in query chunks of at
    most ``max_tile_elems`` similarities (never the full matrix).

    Args:
        q: [Q, ...] queries; g: [G, ...] gallery (for the default dot similarity [Q, D] and
            [G, D], fp32 accumulation).
        targets / gallery_owner: as in :func:`ranks_from_sim` (targets default: the paired
            item ``arange(Q)``).
        sim_fn: ``sim_fn(q_chunk, g) -> fp32 [chunk, G]``; default the dot product.
    Returns:
        [Q] int64 on q's device.
    """
    Q, G = q.shape[0], g.shape[0]
    if targets is None and gallery_owner is None:
        if Q > G:
            raise ValueError(f"rank_of_targets: paired ranks need Q <= G, got Q={Q}, G={G}")
        targets = torch.arange(Q, device=q.device)
    sim_fn = sim_fn or _dot_sim
    chunk = max(1, max_tile_elems // max(G, 1))
    out = []
    for q0 in range(0, Q, chunk):
        q1 = min(Q, q0 + chunk)
        s = sim_fn(q[q0:q1], g)
        if targets is not None:
            out.append(ranks_from_sim(s, targets[q0:q1]))
        else:
            out.append(ranks_from_sim(s, gallery_owner=gallery_owner, row_offset=q0))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64, device=q.device)


def retrieval_report(text: torch.Tensor, video: torch.Tensor, caption_to_video: torch.Tensor | None = None, *,
                     sim_fn: SimFn | None = None, max_tile_elems: int = 1 << 24) -> dict[str, dict[str, float]]:
    """text->video and video->text metrics. ``caption_to_video`` [num_texts] maps each
    caption to its video (default: paired, text i <-> video i); video->text takes a video's
    best-ranked caption. ``sim_fn(a, b)`` is the similarity with a = text rows for t2v and
    a = video rows for v2t (default: dot product, symmetric)."""
    T, V = text.shape[0], video.shape[0]
    if caption_to_video is None:
        if T != V:
            raise ValueError(f"retrieval_report: {T} texts and {V} videos; pass caption_to_video")
        caption_to_video = torch.arange(T)
    c2v = caption_to_video.to(text.device).long()
    t2v = rank_of_targets(text, video, c2v, sim_fn=sim_fn, max_tile_elems=max_tile_elems)
    v2t = rank_of_targets(video, text, gallery_owner=c2v, sim_fn=sim_fn, max_tile_elems=max_tile_elems)
    return {"t2v": retrieval_metrics(t2v), "v2t": retrieval_metrics(v2t)}


def hubness(counts: torch.Tensor, k: int, num_queries: int) -> dict[str, float]:
    """Hubness measures of k-occurrences (scikit-hubness definitions; docs/corrections.md).

    Args:
        counts: [G] N_k of every gallery item (zeros included), e.g. from topk_centrality.
        k: the k of the k-occurrences; num_queries: |Q|.
    Returns:
        skewness (biased third standardised moment = scipy.stats.skew; nan when all N_k
        are equal), hub_occurrence (share of all k·|Q| slots taken by hubs, N_k >= 2k),
        antihub_share (share of items with N_k = 0), robin_hood
        (½ Σ|N_k − mean| / Σ N_k), gini (Σ_i Σ_j |N_i − N_j| / (2|G| Σ N_k)).
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
    }


def k_occurrence(q: torch.Tensor, g: torch.Tensor, k: int = 10, *, exclude_self: bool = False,
                 backend: str | None = None) -> torch.Tensor:
    """N_k [G] int64 of the gallery for queries q (dot similarity) via topk_centrality."""
    _, _, counts, _ = ops.topk_centrality(q, g, k, exclude_self=exclude_self, backend=backend)
    return counts
