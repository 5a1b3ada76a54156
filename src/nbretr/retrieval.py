"""Streaming retrieval statistics over any gallery size (never the full query x gallery
matrix): score blocks come from a ``score_fn(q_slice, g_slice) -> [q, g]`` (for NeighborRetr,
WTI similarity through ``nbretr.ops.wti_similarity``), one row block at a time.

From each row block: the rank of each query's target (ties: lower gallery index first, as
in ``topk_centrality``), its top-k (ties: lower index, or at random as scikit-hubness does),
the k-occurrence counts N_k and the summed similarity of every gallery item; and, for the
inference-time hubness corrections (docs/corrections.md), the per-gallery statistics over
a bank and the corrections themselves.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

ScoreFn = Callable[[slice, slice], torch.Tensor]


def row_blocks(score_fn: ScoreFn, num_q: int, num_g: int, *, q_chunk: int, g_chunk: int
               ) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield (query slice, scores [len, num_g]) row block by row block; each block is
    assembled from [q_chunk, g_chunk] tiles, in fp32 (fp64 scores stay fp64)."""
    def tile(qs, g0):
        t = score_fn(qs, slice(g0, min(g0 + g_chunk, num_g)))
        return t if t.dtype == torch.float64 else t.float()

    for q0 in range(0, num_q, q_chunk):
        qs = slice(q0, min(q0 + q_chunk, num_q))
        tiles = [tile(qs, g0) for g0 in range(0, num_g, g_chunk)]
        yield qs, torch.cat(tiles, dim=1) if len(tiles) > 1 else tiles[0]


TIES = ("lower-index", "random")

_P = 2147483647          # 2^31 - 1: every product below stays inside int64


def tie_keys(rows: torch.Tensor, num_g: int, seed: int = 0) -> torch.Tensor:
    """[len(rows), num_g] int64 pseudo-random keys, a fixed function of (query index, gallery
    index, seed): the random tie rule sorts equal scores by these, so its draw does not depend
    on chunking or on how the queries are split across ranks."""
    g = torch.arange(num_g, dtype=torch.long, device=rows.device)[None, :]
    x = ((rows.long()[:, None] % _P) * 1000003 + g + (seed % _P) * 7919) % _P
    for mul in (48271, 69621, 16807):
        x = (x * mul + 12345) % _P
        x = x ^ (x >> 13)
    return x


def topk_rows(block: torch.Tensor, k: int, keys: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k per row, descending. Equal values: lower column index first (a stable sort), or,
    with ``keys`` (:func:`tie_keys`), lower key first (a random order among equal values)."""
    if keys is None:
        vals, idx = torch.sort(block, dim=1, descending=True, stable=True)
        return vals[:, :k], idx[:, :k]
    order = torch.argsort(keys, dim=1)                           # random column order per row
    vals, pos = torch.sort(block.gather(1, order), dim=1, descending=True, stable=True)
    return vals[:, :k], order.gather(1, pos[:, :k])


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
                 transform: Callable[[slice, torch.Tensor], torch.Tensor] | None = None,
                 ties: str = "lower-index", tie_seed: int = 0, q_offset: int = 0) -> StreamStats:
    """Ranks, top-k, N_k and sums for queries whose correct gallery items are ``targets[q]``
    (several for multi-caption video->text: the rank is the best one's).
    ``transform(qs, block)`` rescores a block before ranking (the hubness corrections).

    ``ties`` is the tie rule of the top-k lists and so of N_k: ``"lower-index"`` (equal
    scores: lower gallery index first) or ``"random"`` (scikit-hubness's default: equal
    scores in a random order, from :func:`tie_keys` of the global query index
    ``q_offset + q``, the gallery index and ``tie_seed``). Target ranks always use the
    lower-index rule."""
    if k < 1 or k > num_g:
        raise ValueError(f"k must be in [1, {num_g}] (the gallery size), got {k}")
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    ranks = torch.empty(num_q, dtype=torch.long)
    topk_all = torch.empty(num_q, k, dtype=torch.long)
    counts = torch.zeros(num_g, dtype=torch.long, device=device)
    sums = torch.zeros(num_g, dtype=torch.float64, device=device)
    for qs, block in row_blocks(score_fn, num_q, num_g, q_chunk=q_chunk, g_chunk=g_chunk):
        if transform is not None:
            block = transform(qs, block)
        sums += block.double().sum(0)
        keys = None
        if ties == "random":
            rows = torch.arange(q_offset + qs.start, q_offset + qs.stop, device=block.device)
            keys = tie_keys(rows, num_g, tie_seed)
        _, idx = topk_rows(block, k, keys)
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


# -- per-gallery statistics over a bank (for the hubness corrections) ---------------------------

@dataclass
class BankStats:
    """Per-gallery statistics of ``s(b, g)`` over the rows b of a bank (one streaming pass)."""
    size: int                  # number of bank rows
    lse: dict                  # beta -> [G] logsumexp_b(beta * s(b, g))
    topk_mean: dict            # k -> [G] mean of the k largest s(b, g) over the bank (k clipped to the bank)
    hits: dict                 # k -> [G] bool: g is in the top-k of some bank row (ties: lower index)


def bank_stats(score_fn: ScoreFn, num_b: int, num_g: int, *, betas: Sequence[float] = (),
               mean_ks: Sequence[int] = (), hit_ks: Sequence[int] = (), q_chunk: int = 256,
               g_chunk: int = 4096) -> BankStats:
    """One streaming pass over the bank's row blocks ``score_fn(b_slice, g_slice)``:
    column logsumexps for every ``beta`` in ``betas``, column top-k means for every k in
    ``mean_ks`` (k clipped to the bank size) and, for every k in ``hit_ks``, the set of
    gallery items that are in some bank row's top-k (QB-Norm's activation set; k clipped
    to the gallery size)."""
    if num_b < 1:
        raise ValueError("the bank is empty")
    for k in hit_ks:
        if k < 1:
            raise ValueError(f"activation k must be >= 1, got {k}")
    lse: dict = {}
    hits: dict = {}
    kmax = min(max(mean_ks), num_b) if mean_ks else 0
    run_top = None
    for _, block in row_blocks(score_fn, num_b, num_g, q_chunk=q_chunk, g_chunk=g_chunk):
        for beta in betas:
            b_lse = torch.logsumexp(beta * block.double(), dim=0)
            lse[beta] = b_lse if beta not in lse else torch.logaddexp(lse[beta], b_lse)
        if kmax:
            cand = block if run_top is None else torch.cat((run_top, block), 0)
            run_top = torch.topk(cand, min(kmax, cand.shape[0]), dim=0).values
        for k in hit_ks:
            idx = topk_rows(block, min(k, num_g))[1]         # k >= the gallery: every item
            h = torch.zeros(num_g, dtype=torch.bool, device=block.device)
            h[idx.reshape(-1)] = True
            hits[k] = h if k not in hits else hits[k] | h
    means = {k: run_top[: min(k, num_b)].mean(0) for k in mean_ks}
    return BankStats(num_b, lse, means, hits)


# -- the corrections ------------------------------------------------------------------------------
# Every function takes a row block ``s [q, G]`` of test-query x test-gallery similarities and
# returns scores that rank each row the way the correction ranks it (log space where the method
# is a product of exponentials: the ranking is the same). docs/corrections.md has the papers,
# the formulas, the defaults and the conventions.

def inverted_softmax(block: torch.Tensor, stats: BankStats, beta: float) -> torch.Tensor:
    """log of exp(beta s(q,g)) / sum_b exp(beta s(b,g)) (sum over the bank ``stats``)."""
    return (beta * block.double() - stats.lse[beta][None, :]).to(block.dtype)


def dynamic_inverted_softmax(block: torch.Tensor, stats: BankStats, beta: float, k: int) -> torch.Tensor:
    """QB-Norm's dynamic inverted softmax (Bogolin et al., CVPR 2022): rows whose top-1 gallery
    item (raw similarity, ties: lower index) is in the activation set -- the gallery items
    in the top-k of some bank row -- get the inverted softmax (log space); the other rows
    keep their similarities. Rows are ranked independently, so the two scales may mix."""
    top1 = topk_rows(block, 1)[1][:, 0]
    use = stats.hits[k][top1]
    out = block.clone()
    out[use] = inverted_softmax(block[use], stats, beta)
    return out


def qb_norm(block: torch.Tensor, stats: BankStats, beta: float = 20.0, k: int = 1) -> torch.Tensor:
    """QB-Norm with the dynamic inverted softmax over the query bank ``stats`` (authors'
    defaults beta = 20, activation k = 1)."""
    return dynamic_inverted_softmax(block, stats, beta, k)


DBNORM_BETA1 = 1 / 1.99
DBNORM_BETA2 = 3.0


def db_norm(block: torch.Tensor, q_stats: BankStats, g_stats: BankStats, beta1: float = DBNORM_BETA1,
            beta2: float = DBNORM_BETA2, *, dynamic: bool = False, k: int = 1) -> torch.Tensor:
    """DBNorm (Wang et al., EMNLP 2023), log space. Dual inverted softmax::

        log [ exp(b1 s(q,g)) / sum_{q' in query bank} exp(b1 s(q',g)) ]
          + log [ exp(b2 s(q,g)) / sum_{g' in gallery bank} exp(b2 s(g',g)) ]

    ``q_stats``: the query bank's cross-modal similarities s(q', g) to the test gallery
    (``lse[beta1]``, ``hits[k]``); ``g_stats``: the gallery bank's same-modality
    similarities s(g', g) to the test gallery (``lse[beta2]``, ``hits[k]``).

    ``dynamic=True``: dual dynamic inverted softmax -- each factor is applied only to rows
    whose top-1 gallery item is in that bank's activation set (top-k of some bank row); a
    factor not applied is its numerator exp(b s(q,g)) (so a row with neither ranks by s)."""
    s = block.double()
    fq = beta1 * s - q_stats.lse[beta1][None, :]
    fg = beta2 * s - g_stats.lse[beta2][None, :]
    if dynamic:
        top1 = topk_rows(block, 1)[1][:, 0]
        fq = torch.where(q_stats.hits[k][top1][:, None], fq, beta1 * s)
        fg = torch.where(g_stats.hits[k][top1][:, None], fg, beta2 * s)
    return (fq + fg).to(block.dtype)


def nnn(block: torch.Tensor, stats: BankStats, alpha: float = 0.75, k: int = 128) -> torch.Tensor:
    """NNN (Chowdhury et al., EMNLP 2024): s(q,g) - alpha * mean of the k largest s(b,g) over
    the query bank."""
    return block - alpha * stats.topk_mean[k][None, :]


def csls(block: torch.Tensor, stats: BankStats, k: int = 10) -> torch.Tensor:
    """CSLS (Conneau et al., ICLR 2018): 2 s(q,g) - r_G(q) - r_Q(g), r = mean similarity to
    the k nearest cross-modal items; r_G(q) over the test gallery (this block's row),
    r_Q(g) over the query bank (``stats``), not over the test queries."""
    r_g = torch.topk(block, min(k, block.shape[1]), dim=1).values.mean(1, keepdim=True)
    return 2 * block - r_g - stats.topk_mean[k][None, :]


DSL_TEMPERATURE = 1000.0


def dual_softmax(block: torch.Tensor, col_lse: torch.Tensor, temperature: float = DSL_TEMPERATURE) -> torch.Tensor:
    """Dual softmax at inference (CAMoE, Cheng et al. 2021): s(q,g) * softmax over the test
    queries of s(., g) / temperature (CAMoE's convention: divide by the temperature).
    ``col_lse`` [G] = logsumexp over all test queries of s(q, g) / temperature
    (:func:`column_lse`). Float64, so that small factors do not underflow into ties."""
    s = block.double()
    return s * torch.exp(s / temperature - col_lse[None, :].to(s.device))


def column_lse(score_fn: ScoreFn, num_q: int, num_g: int, *, temperature: float, q_chunk: int = 256,
               g_chunk: int = 4096) -> torch.Tensor:
    """[G] logsumexp over the rows of s(q, g) / temperature (float64)."""
    lse = None
    for _, block in row_blocks(score_fn, num_q, num_g, q_chunk=q_chunk, g_chunk=g_chunk):
        b = torch.logsumexp(block.double() / temperature, dim=0)
        lse = b if lse is None else torch.logaddexp(lse, b)
    return lse
