"""topk_centrality, pure PyTorch (docs/operators.md): chunked matrix products, top-k
per tile merged into a running top-k with the tie rule enforced, counts by bincount and
sums in fp64.

The similarity is a swappable piece: :func:`topk_centrality_tiled` takes a tile function
``tile_fn(q0, q1, g0, g1) -> fp32 [q1-q0, g1-g0]``; :func:`dot_tile_fn` is sim="dot".
Argument checks are done by the public wrapper (:mod:`nbretr.ops.topk`).
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

TileFn = Callable[[int, int, int, int], torch.Tensor]

# elements per similarity tile (fp32): 16M = 64 MiB
TILE_ELEMS = 1 << 24


@functools.lru_cache(maxsize=None)
def _has_mm_out_dtype(device: str) -> bool:
    try:
        a = torch.zeros(1, 1, dtype=torch.bfloat16, device=device)
        torch.mm(a, a, out_dtype=torch.float32)
        return True
    except (TypeError, RuntimeError):
        return False


def dot_tile_fn(q: torch.Tensor, g: torch.Tensor) -> TileFn:
    """Tiles of ``q @ g.T`` in fp32 (fp16/bf16 inputs: fp32 accumulation; on CUDA via
    ``mm(out_dtype=float32)``, elsewhere by casting the operands to fp32)."""
    q = q.contiguous()
    if q.dtype == torch.float32:
        gf = g.contiguous()
        return lambda q0, q1, g0, g1: torch.mm(q[q0:q1], gf[g0:g1].T)
    if q.is_cuda and _has_mm_out_dtype(str(q.device)):
        gc = g.contiguous()
        return lambda q0, q1, g0, g1: torch.mm(q[q0:q1], gc[g0:g1].T, out_dtype=torch.float32)
    gf = g.float().contiguous()
    return lambda q0, q1, g0, g1: torch.mm(q[q0:q1].float(), gf[g0:g1].T)


def select_topk(vals: torch.Tensor, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best ``k`` of every row, best first (descending value, equal values by
    ascending index).

    Args:
        vals: [R, n] fp32 candidates; idx: [R, n] or [n] int64 gallery indices.
        Requirement: within a row, entries with equal values appear in ascending index
        order (true for a tile in gallery order, and for ``cat(list, later candidates)``).
    Returns:
        values [R, k'] and indices [R, k'], k' = min(k, n).
    """
    R, n = vals.shape
    kk = min(k, n)
    idx = idx.expand(R, n)
    if kk == 0:
        return vals[:, :0], idx[:, :0]
    kth = vals.topk(kk, dim=1).values[:, -1:]
    gt = vals > kth
    eq = vals == kth
    need = kk - gt.sum(1, keepdim=True)
    if bool((eq.sum(1, keepdim=True) > need).any()):
        # ties straddle the k-th place: keep the lowest-index (= earliest) equal entries
        eq = eq & (eq.cumsum(1) <= need)
    sel = gt | eq
    v = vals[sel].view(R, kk)
    i = idx[sel].view(R, kk)
    order = v.argsort(dim=1, descending=True, stable=True)
    return v.gather(1, order), i.gather(1, order)


def topk_centrality_tiled(tile_fn: TileFn, Q: int, G: int, k: int, *, exclude_self: bool = False,
                          q_offset: int = 0, counts: torch.Tensor, sums: torch.Tensor,
                          device: torch.device | str, q_chunk: int | None = None,
                          g_tile: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stream query chunks x gallery tiles from ``tile_fn``; return values [Q, k] fp32 and
    indices [Q, k] int64, adding into ``counts`` [G] int64 and ``sums`` [G] fp64 in place.
    ``k`` must not exceed the candidates per row (checked by the caller)."""
    values = torch.empty(Q, k, dtype=torch.float32, device=device)
    indices = torch.empty(Q, k, dtype=torch.int64, device=device)
    if Q == 0:
        return values, indices
    if g_tile is None:
        g_tile = max(1, min(G, TILE_ELEMS // 256))
    if q_chunk is None:
        q_chunk = max(1, min(Q, TILE_ELEMS // max(g_tile, 1)))
    for q0 in range(0, Q, q_chunk):
        q1 = min(Q, q0 + q_chunk)
        run_v = run_i = None
        for g0 in range(0, G, g_tile):
            g1 = min(G, g0 + g_tile)
            tile = tile_fn(q0, q1, g0, g1)
            if exclude_self:
                rows = torch.arange(q0, q1, device=device)
                cols = rows + q_offset - g0
                inside = (cols >= 0) & (cols < g1 - g0)
                r, c = (rows - q0)[inside], cols[inside]
                tile = tile.clone()
                tile[r, c] = 0.0
                sums[g0:g1] += tile.sum(0, dtype=torch.float64)
                tile[r, c] = float("-inf")
            else:
                sums[g0:g1] += tile.sum(0, dtype=torch.float64)
            cand = torch.arange(g0, g1, device=device)
            tv, ti = select_topk(tile, cand, k)
            if run_v is None:
                run_v, run_i = tv, ti
            else:
                run_v, run_i = select_topk(torch.cat((run_v, tv), 1), torch.cat((run_i, ti), 1), k)
        values[q0:q1] = run_v
        indices[q0:q1] = run_i
    counts += torch.bincount(indices.flatten(), minlength=G)
    return values, indices


def topk_centrality_dot(q: torch.Tensor, g: torch.Tensor, k: int, *, exclude_self: bool = False,
                        q_offset: int = 0, counts: torch.Tensor, sums: torch.Tensor,
                        q_chunk: int | None = None, g_tile: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """sim="dot": similarity ``q @ g.T`` (fp32 accumulation). See :func:`topk_centrality_tiled`."""
    return topk_centrality_tiled(dot_tile_fn(q, g), q.shape[0], g.shape[0], k, exclude_self=exclude_self,
                                 q_offset=q_offset, counts=counts, sums=sums, device=q.device,
                                 q_chunk=q_chunk, g_tile=g_tile)
