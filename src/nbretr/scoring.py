"""The scoring engine: the one place that streams row blocks of scores through the top-k
operators (never the full query x gallery matrix).

Scores come from a ``score_fn(q_slice, g_slice) -> [q, g]`` (for NeighborRetr,
:func:`wti_score_fn`: WTI blocks from :func:`nbretr.ops.wti_similarity`; :func:`dot_score_fn`
for embeddings), one row block of ``q_chunk`` queries at a time, assembled from
``[q_chunk, g_chunk]`` tiles. A ``rescore(q_slice, block)`` hook rescores each block before
it is ranked (the inference-time hubness corrections of :mod:`nbretr.retrieval`). Every
block is ranked by :func:`nbretr.ops.topk_rank`: the top-k of every row (so N_k) and the
rank of every row's best target, in one O(G) pass per row instead of a sort. Feature
pairs with no rescoring go through :func:`nbretr.ops.topk_centrality` directly
(:func:`k_occurrence`; the model's k-occurrence centrality).

The tie rule is the operators' everywhere: equal scores, lower gallery index first.
``ties="random"`` (scikit-hubness's default) orders equal scores in the top-k lists by
:func:`tie_keys` instead; target ranks always keep the lower-index rule.

Also here, because they stream the same blocks: the per-gallery statistics over a bank
(:func:`bank_stats`) and the column log-sum-exp of the dual softmax (:func:`column_lse`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence, Union

import torch

from nbretr import ops

__all__ = [
    "ScoreFn", "Rescore", "TIES", "StreamStats", "BankStats",
    "stream", "ranks", "ranks_from_sim", "retrieval_report", "k_occurrence",
    "bank_stats", "column_lse", "tie_keys", "as_targets", "owner_targets", "dot_score_fn", "wti_score_fn",
]

ScoreFn = Callable[[slice, slice], torch.Tensor]
Rescore = Callable[[slice, torch.Tensor], torch.Tensor]
SimFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Targets = Union[torch.Tensor, Sequence[Sequence[int]]]

TIES = ("lower-index", "random")

_P = 2147483647          # 2^31 - 1: every product below stays inside int64


def _row_blocks(score_fn: ScoreFn, num_q: int, num_g: int, *, q_chunk: int, g_chunk: int
                ) -> Iterator[tuple[slice, torch.Tensor]]:
    """(query slice, scores [len, num_g]) row block by row block, each assembled from
    [q_chunk, g_chunk] tiles, in fp32 (fp64 scores stay fp64)."""
    def tile(qs, g0):
        t = score_fn(qs, slice(g0, min(g0 + g_chunk, num_g)))
        return t if t.dtype == torch.float64 else t.float()

    for q0 in range(0, num_q, q_chunk):
        qs = slice(q0, min(q0 + q_chunk, num_q))
        tiles = [tile(qs, g0) for g0 in range(0, num_g, g_chunk)]
        yield qs, torch.cat(tiles, dim=1) if len(tiles) > 1 else tiles[0]


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


# -- targets --------------------------------------------------------------------------------------

def as_targets(targets: Targets, num_q: int) -> torch.Tensor:
    """Every query's correct gallery items as int64 [num_q, T] (CPU), -1 = padding, as
    :func:`nbretr.ops.topk_rank` takes them. ``targets``: a [num_q] or [num_q, T] tensor, or
    one sequence of gallery indices per query (several for multi-caption video->text)."""
    if isinstance(targets, torch.Tensor):
        t = targets.detach().long().cpu()
        t = t.view(-1, 1) if t.dim() == 1 else t
        if t.dim() != 2 or t.shape[0] != num_q:
            raise ValueError(f"targets must have {num_q} rows, got shape {list(targets.shape)}")
        return t
    if len(targets) != num_q:
        raise ValueError(f"targets must have {num_q} rows, got {len(targets)}")
    lengths = torch.tensor([len(t) for t in targets], dtype=torch.long)
    width = int(lengths.max()) if num_q else 1
    out = torch.full((num_q, max(width, 1)), -1, dtype=torch.long)
    if num_q and width:
        flat = torch.tensor([j for t in targets for j in t], dtype=torch.long)
        rows = torch.repeat_interleave(torch.arange(num_q), lengths)
        starts = torch.cumsum(lengths, 0) - lengths
        out[rows, torch.arange(flat.numel()) - starts[rows]] = flat
    return out


def owner_targets(gallery_owner: torch.Tensor, num_q: int, *, who: str = "owner_targets") -> torch.Tensor:
    """[num_q, T] targets (-1 padded) of a gallery whose item j belongs to query
    ``gallery_owner[j]`` (e.g. ``caption_to_video`` when the gallery is captions); every
    query must own an item."""
    owner = torch.as_tensor(gallery_owner).detach().long().cpu().flatten()
    per = torch.bincount(owner[(owner >= 0) & (owner < num_q)], minlength=num_q)[:num_q]
    if num_q and bool((per == 0).any()):
        bad = int((per == 0).nonzero()[0, 0])
        raise ValueError(f"{who}: query {bad} owns no gallery item (gallery_owner)")
    keep = ((owner >= 0) & (owner < num_q)).nonzero().flatten()
    order = keep[torch.argsort(owner[keep], stable=True)]
    rows = owner[order]
    starts = torch.cumsum(per, 0) - per
    out = torch.full((num_q, max(int(per.max()) if num_q else 1, 1)), -1, dtype=torch.long)
    out[rows, torch.arange(order.numel()) - starts[rows]] = order
    return out


# -- the engine -----------------------------------------------------------------------------------

@dataclass
class StreamStats:
    """What one pass over the row blocks collects."""
    ranks: torch.Tensor                      # [Q] 1-based rank of each query's best target
    topk_indices: torch.Tensor               # [Q, k]
    counts: torch.Tensor                     # [G] int64 k-occurrence
    sums: torch.Tensor | None                # [G] float64 summed (rescored) score; None if not asked
    extra: dict = field(default_factory=dict)


def _stream(score_fn: ScoreFn, num_q: int, num_g: int, targets: torch.Tensor | None, k: int, *,
            q_chunk: int, g_chunk: int, rescore: Rescore | None = None, ties: str = "lower-index",
            tie_seed: int = 0, q_offset: int = 0, sums: bool = True,
            backend: ops.Backend | None = None) -> StreamStats:
    """The pass behind :func:`stream` and :func:`ranks`: ``targets`` [num_q, T] (-1 padded)
    or None (no ranks), ``k`` >= 0 (0: no top-k)."""
    rank_out = torch.zeros(num_q if targets is not None else 0, dtype=torch.long)
    topk_all = torch.empty(num_q, k, dtype=torch.long)
    counts = sums_acc = None
    for qs, block in _row_blocks(score_fn, num_q, num_g, q_chunk=q_chunk, g_chunk=g_chunk):
        if rescore is not None:
            block = rescore(qs, block)
        dev = block.device
        if counts is None:
            counts = torch.zeros(num_g, dtype=torch.long, device=dev)
            sums_acc = torch.zeros(num_g, dtype=torch.float64, device=dev)
        if sums:
            sums_acc += block.double().sum(0)
        t = none = None
        if targets is not None:
            t = targets[qs]
            none = (t < 0).all(1)                     # no target: ranks num_g + 1, a miss at every K
            if bool(none.any()):
                t = t.clone()
                t[none, 0] = 0
            t = t.to(dev)
        if ties == "random" and k:
            rows = torch.arange(q_offset + qs.start, q_offset + qs.stop, device=dev)
            order = torch.argsort(tie_keys(rows, num_g, tie_seed), dim=1)   # random column order per row
            _, pos, _, _ = ops.topk_rank(block.gather(1, order), k, backend=backend)
            idx = order.gather(1, pos)
            counts += torch.bincount(idx.reshape(-1), minlength=num_g)
            r = ops.topk_rank(block, 0, targets=t, backend=backend)[2] if t is not None else None
        else:
            _, idx, r, _ = ops.topk_rank(block, k, targets=t, counts=counts, backend=backend)
        topk_all[qs] = idx.cpu()
        if t is not None:
            rank_out[qs] = r.cpu().masked_fill(none, num_g + 1)
    if counts is None:
        counts = torch.zeros(num_g, dtype=torch.long)
        sums_acc = torch.zeros(num_g, dtype=torch.float64)
    return StreamStats(rank_out, topk_all, counts.cpu(), sums_acc.cpu() if sums else None)


def stream(score_fn: ScoreFn, num_q: int, num_g: int, targets: Targets, k: int, *, q_chunk: int = 256,
           g_chunk: int = 4096, rescore: Rescore | None = None, ties: str = "lower-index", tie_seed: int = 0,
           q_offset: int = 0, sums: bool = True, backend: ops.Backend | None = None) -> StreamStats:
    """Ranks, top-k, N_k and score sums of ``num_q`` queries against ``num_g`` gallery items.

    Args:
        score_fn: ``score_fn(q_slice, g_slice) -> [q, g]`` scores (fp32; fp64 stays fp64).
        targets: every query's correct gallery items (:func:`as_targets`; several for
            multi-caption video->text: the rank is the best one's; a query with none ranks
            ``num_g + 1``).
        k: top-k per query, 1 <= k <= num_g.
        rescore: ``rescore(q_slice, block) -> block`` applied to every row block before it is
            ranked (the hubness corrections); the sums are of the rescored scores.
        ties: the tie rule of the top-k lists and so of N_k: ``"lower-index"`` (equal scores:
            lower gallery index first) or ``"random"`` (equal scores in a random order, from
            :func:`tie_keys` of the global query index ``q_offset + q``, the gallery index and
            ``tie_seed``). Target ranks always use the lower-index rule.
        sums: collect the [G] float64 column sums of the (rescored) scores (a pass over
            every block in float64); ``StreamStats.sums`` is None without.
        backend: of :func:`nbretr.ops.topk_rank`.
    Returns:
        :class:`StreamStats` on the CPU.
    """
    if k < 1 or k > num_g:
        raise ValueError(f"k must be in [1, {num_g}] (the gallery size), got {k}")
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    return _stream(score_fn, num_q, num_g, as_targets(targets, num_q), k, q_chunk=q_chunk, g_chunk=g_chunk,
                   rescore=rescore, ties=ties, tie_seed=tie_seed, q_offset=q_offset, sums=sums, backend=backend)


# -- ranks of embeddings and of similarity blocks -----------------------------------------------

def _dot_sim(q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    if q.dtype == torch.float32:
        return q @ g.T
    return q.float() @ g.float().T


def dot_score_fn(q: torch.Tensor, g: torch.Tensor, sim_fn: SimFn | None = None) -> ScoreFn:
    """score_fn of ``sim_fn(q rows, g rows)`` (default: the dot product, fp32 accumulation)."""
    sim_fn = sim_fn or _dot_sim
    return lambda qs, gs: sim_fn(q[qs], g[gs])


def wti_score_fn(q: tuple, g: tuple, *, q_is_text: bool) -> ScoreFn:
    """score_fn of WTI blocks (:func:`nbretr.ops.wti_similarity`) over prepared (tokens,
    mask, weights) triples: ``q`` are texts (``q_is_text``) or videos, ``g`` the other
    modality; a block is [q rows, g rows] either way."""
    def fn(qs: slice, gs: slice) -> torch.Tensor:
        a = tuple(x[qs] for x in q)
        b = tuple(x[gs] for x in g)
        if q_is_text:
            return ops.wti_similarity(*a, *b)
        return ops.wti_similarity(*b, *a).t()
    return fn


def _targets_or_owner(who: str, num_q: int, targets, gallery_owner, *, row_offset: int = 0) -> torch.Tensor:
    if targets is not None and gallery_owner is not None:
        raise ValueError(f"{who}: pass at most one of targets and gallery_owner")
    if gallery_owner is not None:
        return owner_targets(gallery_owner, row_offset + num_q, who=who)[row_offset:]
    return as_targets(targets, num_q)


@torch.no_grad()
def ranks(q: torch.Tensor, g: torch.Tensor, targets: torch.Tensor | None = None, *,
          gallery_owner: torch.Tensor | None = None, sim_fn: SimFn | None = None,
          max_tile_elems: int = 1 << 24, backend: ops.Backend | None = None) -> torch.Tensor:
    """1-based rank of each query's target for any gallery size, in query chunks of at most
    ``max_tile_elems`` similarities (never the full matrix).

    Args:
        q: [Q, ...] queries; g: [G, ...] gallery (for the default dot similarity [Q, D] and
            [G, D], fp32 accumulation).
        targets: [Q] int64, the gallery index of each query's correct item (default: the
            paired item ``arange(Q)``); or
        gallery_owner: [G] int64, the query each gallery item belongs to (e.g.
            ``caption_to_video`` when the gallery is captions): a query's rank is its best
            item's (video->text on multi-caption sets).
        sim_fn: ``sim_fn(q_chunk, g) -> fp32 [chunk, G]``; default the dot product.
    Returns:
        [Q] int64 on q's device (ties: equal similarity and lower index ranks first).
    """
    Q, G = q.shape[0], g.shape[0]
    if targets is None and gallery_owner is None:
        if Q > G:
            raise ValueError(f"ranks: paired ranks need Q <= G, got Q={Q}, G={G}")
        targets = torch.arange(Q)
    t = _targets_or_owner("ranks", Q, targets, gallery_owner)
    chunk = max(1, max_tile_elems // max(G, 1))
    st = _stream(dot_score_fn(q, g, sim_fn), Q, G, t, 0, q_chunk=chunk, g_chunk=max(G, 1), sums=False,
                 backend=backend)
    return st.ranks.to(q.device)


def ranks_from_sim(sim: torch.Tensor, targets: torch.Tensor | None = None, *,
                   gallery_owner: torch.Tensor | None = None, row_offset: int = 0,
                   backend: ops.Backend | None = None) -> torch.Tensor:
    """Ranks of the targets in the rows of a similarity block ``sim`` [R, G] (full gallery).

    Exactly one of ``targets`` [R] (or [R, T], -1 padded) and ``gallery_owner`` [G] (row r's
    targets are ``{j : gallery_owner[j] == r + row_offset}``). Returns [R] int64 1-based
    ranks on sim's device (ties: equal similarity and lower index ranks first)."""
    if (targets is None) == (gallery_owner is None):
        raise ValueError("ranks_from_sim: pass exactly one of targets and gallery_owner")
    t = _targets_or_owner("ranks_from_sim", sim.shape[0], targets, gallery_owner, row_offset=row_offset)
    return ops.topk_rank(sim, 0, targets=t.to(sim.device), backend=backend)[2]


def retrieval_report(text: torch.Tensor, video: torch.Tensor, caption_to_video: torch.Tensor | None = None, *,
                     sim_fn: SimFn | None = None, max_tile_elems: int = 1 << 24,
                     backend: ops.Backend | None = None) -> dict[str, dict[str, float]]:
    """text->video and video->text metrics. ``caption_to_video`` [num_texts] maps each
    caption to its video (default: paired, text i <-> video i); video->text takes a video's
    best-ranked caption. ``sim_fn(a, b)`` is the similarity with a = text rows for t2v and
    a = video rows for v2t (default: dot product, symmetric)."""
    from nbretr.metrics import retrieval_metrics
    T, V = text.shape[0], video.shape[0]
    if caption_to_video is None:
        if T != V:
            raise ValueError(f"retrieval_report: {T} texts and {V} videos; pass caption_to_video")
        caption_to_video = torch.arange(T)
    c2v = caption_to_video.to(text.device).long()
    kw = dict(sim_fn=sim_fn, max_tile_elems=max_tile_elems, backend=backend)
    t2v = ranks(text, video, c2v, **kw)
    v2t = ranks(video, text, gallery_owner=c2v, **kw)
    return {"t2v": retrieval_metrics(t2v), "v2t": retrieval_metrics(v2t)}


def k_occurrence(q: torch.Tensor, g: torch.Tensor, k: int = 10, *, exclude_self: bool = False,
                 backend: ops.Backend | None = None) -> torch.Tensor:
    """N_k [G] int64 of the gallery for queries q (dot similarity) via topk_centrality."""
    _, _, counts, _ = ops.topk_centrality(q, g, k, exclude_self=exclude_self, backend=backend)
    return counts


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
               g_chunk: int = 4096, backend: ops.Backend | None = None) -> BankStats:
    """One streaming pass over the bank's row blocks ``score_fn(b_slice, g_slice)``:
    column logsumexps for every ``beta`` in ``betas``, column top-k means for every k in
    ``mean_ks`` (k clipped to the bank size) and, for every k in ``hit_ks``, the set of
    gallery items that are in some bank row's top-k (QB-Norm's activation set; k clipped
    to the gallery size; the N_k of :func:`nbretr.ops.topk_rank` > 0)."""
    if num_b < 1:
        raise ValueError("the bank is empty")
    for k in hit_ks:
        if k < 1:
            raise ValueError(f"activation k must be >= 1, got {k}")
    lse: dict = {}
    occ: dict = {}
    kmax = min(max(mean_ks), num_b) if mean_ks else 0
    run_top = None
    for _, block in _row_blocks(score_fn, num_b, num_g, q_chunk=q_chunk, g_chunk=g_chunk):
        for beta in betas:
            b_lse = torch.logsumexp(beta * block.double(), dim=0)
            lse[beta] = b_lse if beta not in lse else torch.logaddexp(lse[beta], b_lse)
        if kmax:
            cand = block if run_top is None else torch.cat((run_top, block), 0)
            run_top = torch.topk(cand, min(kmax, cand.shape[0]), dim=0).values
        for k in hit_ks:
            if k not in occ:
                occ[k] = torch.zeros(num_g, dtype=torch.long, device=block.device)
            ops.topk_rank(block, min(k, num_g), counts=occ[k], backend=backend)  # k >= the gallery: every item
    means = {k: run_top[: min(k, num_b)].mean(0) for k in mean_ks}
    return BankStats(num_b, lse, means, {k: c > 0 for k, c in occ.items()})


def column_lse(score_fn: ScoreFn, num_q: int, num_g: int, *, temperature: float, q_chunk: int = 256,
               g_chunk: int = 4096) -> torch.Tensor:
    """[G] logsumexp over the rows of s(q, g) / temperature (float64)."""
    lse = None
    for _, block in _row_blocks(score_fn, num_q, num_g, q_chunk=q_chunk, g_chunk=g_chunk):
        b = torch.logsumexp(block.double() / temperature, dim=0)
        lse = b if lse is None else torch.logaddexp(lse, b)
    return lse
