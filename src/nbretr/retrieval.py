"""Streaming retrieval statistics over any gallery size (never the full query x gallery
matrix): score blocks come from a ``score_fn(q_slice, g_slice) -> [q, g]`` (for NeighborRetr,
WTI similarity through ``nbretr.ops.wti_similarity``), one row block at a time.

From each row block: the rank of each query's target (ties: lower gallery index first, as
in ``topk_centrality``), its top-k, the k-occurrence counts N_k and the summed similarity of
every gallery item; and, for the inference-time hubness corrections of METHOD.md, the
per-gallery statistics over a bank of other queries.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

ScoreFn = Callable[[slice, slice], torch.Tensor]


def row_blocks(score_fn: ScoreFn, num_q: int, num_g: int, *, q_chunk: int, g_chunk: int
               ) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield (query slice, scores [len, num_g] fp32) row block by row block; each block is
    assembled from [q_chunk, g_chunk] tiles."""
    for q0 in range(0, num_q, q_chunk):
        qs = slice(q0, min(q0 + q_chunk, num_q))
        tiles = [score_fn(qs, slice(g0, min(g0 + g_chunk, num_g))).float() for g0 in range(0, num_g, g_chunk)]
        yield qs, torch.cat(tiles, dim=1) if len(tiles) > 1 else tiles[0]


def topk_rows(block: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k per row, descending, equal values by lower column index (a stable sort)."""
    vals, idx = torch.sort(block, dim=1, descending=True, stable=True)
    return vals[:, :k], idx[:, :k]


def ranks_of(block: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1-based rank of column ``targets[i]`` in row ``rows[i]`` of ``block`` (ties: lower
    column index ranks first)."""
    s = block[rows]                                     # [n, G]
    t = s.gather(1, targets[:, None])                   # [n, 1]
    cols = torch.arange(block.shape[1], device=block.device)[None, :]
    better = (s > t) | ((s == t) & (cols < targets[:, None]))
    return better.sum(1) + 1


@dataclass
class StreamStats:
    """What one pass over the row blocks collects."""
    ranks: torch.Tensor                      # [Q] 1-based rank of each query's best target
    topk_indices: torch.Tensor               # [Q, k]
    counts: torch.Tensor                     # [G] int64 k-occurrence
    sums: torch.Tensor                       # [G] float64 summed similarity
    extra: dict = field(default_factory=dict)


def stream_ranks(score_fn: ScoreFn, num_q: int, num_g: int, targets: Sequence[Sequence[int]], k: int, *,
                 q_chunk: int = 256, g_chunk: int = 4096, device: torch.device | str = "cpu",
                 transform: Callable[[slice, torch.Tensor], torch.Tensor] | None = None) -> StreamStats:
    """Ranks, top-k, N_k and sums for queries whose correct gallery items are ``targets[q]``
    (several for multi-caption video->text: the rank is the best one's).
    ``transform(qs, block)`` rescores a block before ranking (the hubness corrections)."""
    if k < 1 or k > num_g:
        raise ValueError(f"k must be in [1, {num_g}] (the gallery size), got {k}")
    ranks = torch.empty(num_q, dtype=torch.long)
    topk_all = torch.empty(num_q, k, dtype=torch.long)
    counts = torch.zeros(num_g, dtype=torch.long, device=device)
    sums = torch.zeros(num_g, dtype=torch.float64, device=device)
    for qs, block in row_blocks(score_fn, num_q, num_g, q_chunk=q_chunk, g_chunk=g_chunk):
        if transform is not None:
            block = transform(qs, block)
        sums += block.double().sum(0)
        _, idx = topk_rows(block, k)
        counts += torch.bincount(idx.reshape(-1), minlength=num_g)
        topk_all[qs] = idx.cpu()
        rows, cols = [], []
        for r, q in enumerate(range(qs.start, qs.stop)):
            for t in targets[q]:
                rows.append(r)
                cols.append(t)
        rows_t = torch.tensor(rows, device=block.device)
        r_all = ranks_of(block, rows_t, torch.tensor(cols, device=block.device))
        best = torch.full((qs.stop - qs.start,), num_g + 1, dtype=torch.long, device=block.device)
        best.scatter_reduce_(0, rows_t, r_all, reduce="amin")
        ranks[qs] = best.cpu()
    return StreamStats(ranks, topk_all, counts.cpu(), sums.cpu())


# -- per-gallery statistics over a bank of queries (for the hubness corrections) -------------

@dataclass
class BankStats:
    lse: torch.Tensor          # [G] logsumexp_b(beta * s(b, g))
    topk_mean: dict            # k -> [G] mean of the k largest s(b, g) over the bank
    top1_hit: torch.Tensor     # [G] bool: g is some bank query's top-1 gallery item
    beta: float


def bank_stats(score_fn: ScoreFn, num_b: int, num_g: int, *, beta: float, ks: Sequence[int] = (10, 128),
               q_chunk: int = 256, g_chunk: int = 4096) -> BankStats:
    """One streaming pass over bank-query row blocks: column logsumexp, column top-k means
    (for every k in ``ks``, clipped to the bank size) and the set of top-1 hits."""
    if num_b < 1:
        raise ValueError("the query bank is empty")
    lse = None
    kmax = min(max(ks), num_b)
    run_top = None
    hit = None
    for _, block in row_blocks(score_fn, num_b, num_g, q_chunk=q_chunk, g_chunk=g_chunk):
        b_lse = torch.logsumexp(beta * block, dim=0)
        lse = b_lse if lse is None else torch.logaddexp(lse, b_lse)
        cand = block if run_top is None else torch.cat((run_top, block), 0)
        run_top = torch.topk(cand, min(kmax, cand.shape[0]), dim=0).values
        top1 = topk_rows(block, 1)[1][:, 0]
        h = torch.zeros(num_g, dtype=torch.bool, device=block.device)
        h[top1] = True
        hit = h if hit is None else hit | h
    means = {k: run_top[: min(k, num_b)].mean(0) for k in ks}
    return BankStats(lse, means, hit, beta)


# -- the corrections (METHOD.md "Inference-time hubness corrections") ---------------------------

def inverted_softmax(block: torch.Tensor, stats: BankStats) -> torch.Tensor:
    """exp(beta s(q,g)) / sum_b exp(beta s(b,g)), in log space (same ranking)."""
    return stats.beta * block - stats.lse[None, :]


def qb_norm(block: torch.Tensor, stats: BankStats) -> torch.Tensor:
    """Dynamic inverted softmax: the inverted softmax only for queries whose top-1 gallery
    item is some bank query's top-1 (k = 1); other rows keep their similarities.
    Rows are ranked independently, so mixing the two score scales across rows is sound."""
    top1 = topk_rows(block, 1)[1][:, 0]
    use = stats.top1_hit[top1]
    out = block.clone()
    out[use] = inverted_softmax(block[use], stats)
    return out


def db_norm(block: torch.Tensor, q_stats: BankStats, g_lse_rows: torch.Tensor) -> torch.Tensor:
    """Inverted softmax against the query bank times inverted softmax against the gallery
    bank (log space: a sum). ``g_lse_rows`` [q]: logsumexp over the gallery bank of
    beta s(q, g'). The second factor is constant along a row, so rankings equal the
    query-bank inverted softmax; it changes scores compared across queries."""
    return inverted_softmax(block, q_stats) + (q_stats.beta * block - g_lse_rows[:, None])


def nnn(block: torch.Tensor, stats: BankStats, alpha: float = 0.75, k: int = 128) -> torch.Tensor:
    """s(q,g) - alpha * mean of the k largest s(b,g) over the bank."""
    return block - alpha * stats.topk_mean[k][None, :]


def csls(block: torch.Tensor, stats: BankStats, k: int = 10) -> torch.Tensor:
    """2 s(q,g) - r_G(q) - r_Q(g), r = mean similarity to the k nearest cross-modal items
    (r_G over the test gallery, r_Q over the bank queries)."""
    r_g = torch.topk(block, min(k, block.shape[1]), dim=1).values.mean(1, keepdim=True)
    return 2 * block - r_g - stats.topk_mean[k][None, :]


def dual_softmax(block: torch.Tensor, col_lse: torch.Tensor, temp: float = 100.0) -> torch.Tensor:
    """s * softmax over the test queries of (temp * s); ``col_lse`` [G] = logsumexp over all
    test queries of temp * s(q, g)."""
    return block * torch.exp(temp * block - col_lse[None, :])


def column_lse(score_fn: ScoreFn, num_q: int, num_g: int, *, temp: float, q_chunk: int = 256,
               g_chunk: int = 4096) -> torch.Tensor:
    lse = None
    for _, block in row_blocks(score_fn, num_q, num_g, q_chunk=q_chunk, g_chunk=g_chunk):
        b = torch.logsumexp(temp * block, dim=0)
        lse = b if lse is None else torch.logaddexp(lse, b)
    return lse


def row_lse(score_fn: ScoreFn, num_q: int, num_g: int, *, temp: float, q_chunk: int = 256,
            g_chunk: int = 4096) -> torch.Tensor:
    out = []
    for _, block in row_blocks(score_fn, num_q, num_g, q_chunk=q_chunk, g_chunk=g_chunk):
        out.append(torch.logsumexp(temp * block, dim=1))
    return torch.cat(out) if out else torch.empty(0)


