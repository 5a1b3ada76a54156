"""``topk_centrality``: tiled similarity with online top-k and centrality counting
(docs/operators.md, "topk_centrality")."""
from __future__ import annotations

from typing import Any

import torch

from nbretr.ops import _backend
from nbretr.ops._checks import (TOPK_MAX_K, TOPK_SIM_LIMIT, check_topk_common, check_topk_dot_args,  # noqa: F401
                                check_topk_dot_extra, check_wti_range, fail)
from nbretr.ops.reference import topk as _ref

__all__ = ["topk_centrality", "TOPK_MAX_K"]

_OP = "topk_centrality"


def topk_centrality(q: Any, g: Any, k: int, *, sim: str = "dot", exclude_self: bool = False,
                    counts: torch.Tensor | None = None, sums: torch.Tensor | None = None,
                    q_offset: int = 0, q_role: str = "text",
                    backend: _backend.Backend | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every query's top-k gallery items and every gallery item's k-occurrence and
    similarity sum, streamed over tiles: the Q x G similarity matrix is never held
    (memory O((Q+G)·D + Q·k) plus one fixed-size tile).

    Args:
        q: sim="dot": queries [Q, D], float32/float16/bfloat16 (fp32 accumulation).
        g: sim="dot": gallery [G, D], same dtype and device as ``q``.
        k: neighbours per query, 1 <= k <= 1024 (:data:`TOPK_MAX_K`) and k <= G
            (k <= G - 1 with ``exclude_self``); the same bound on every backend.
        sim: "dot" (``q @ g.T``) or "wti": q and g are ``(tokens, mask, weight)`` triples as
            for :func:`nbretr.ops.wti_similarity` and the similarity is WTI's ``s``; each
            [q_tile, g_tile] block comes from the wti_similarity kernel of the chosen backend
            (no [Q, G, L, F] tensor, no Q x G matrix) and is selected by the tiled driver.
        exclude_self: q and g are one set: query row r is gallery item ``r + q_offset``,
            which is neither a candidate nor summed.
        counts: int64 [G], accumulated into in place (k-occurrence N_k); new zeros if None.
        sums: float64 [G], accumulated into in place (sum over queries of the similarity;
            soft centrality = sums / total queries); new zeros if None. The torch path
            adds the fp32 tile values in fp64; the extension (CPU and CUDA) uses
            linearity, ``(sum_i q_i) . g_j`` in fp64, so sim="dot" sums differ between
            the two at the level of fp32 rounding.
        q_offset: with ``exclude_self``, the gallery index of query row 0, so chunks of a
            self-set (or one rank's share in DDP) can be streamed: needs
            ``0 <= q_offset`` and ``q_offset + Q <= G``. Ignored otherwise.
        q_role: for sim="wti" only: "text" when the queries are texts (t2v), "video" when
            the queries are videos (v2t).
        backend: "auto" | "ext" | "torch" (see :mod:`nbretr.ops._backend`).

    Returns:
        ``(values [Q, k] float32, indices [Q, k] int64, counts [G] int64, sums [G] float64)``:
        rows best first, descending value, equal values by ascending gallery index
        (identical rule on CPU, CUDA and torch). ``counts``/``sums`` are the given tensors.
        Empty ``q`` gives empty outputs and leaves counts/sums untouched. NaN or Inf in the
        inputs is an error on every backend, and so are inputs whose similarities could
        leave float32's range (``D * max|q| * max|g|`` above half its maximum). No gradient
        (inputs are detached).
    """
    if sim == "wti":
        return _topk_centrality_wti(q, g, k, exclude_self=exclude_self, counts=counts, sums=sums,
                                    q_offset=q_offset, q_role=q_role, backend=backend)
    if sim != "dot":
        fail(_OP, f"sim must be \"dot\" or \"wti\", got {sim!r}")
    if not isinstance(q, torch.Tensor) or not isinstance(g, torch.Tensor):
        check_topk_dot_args(q, g, k, exclude_self, q_offset, counts, sums)  # raises
    G = g.shape[0] if g.dim() == 2 else 0
    if counts is None:
        counts = torch.zeros(G, dtype=torch.int64, device=q.device)
    if sums is None:
        sums = torch.zeros(G, dtype=torch.float64, device=q.device)
    q, g = q.detach(), g.detach()
    use_ext = _backend.resolve(_OP, backend, q.device) == "ext"
    if use_ext:
        check_topk_dot_extra(k, counts, sums)  # the rest is checked in C++
    else:
        check_topk_dot_args(q, g, k, exclude_self, q_offset, counts, sums)
    q_offset = int(q_offset) if exclude_self else 0
    if use_ext:
        values, indices = torch.ops.nbretr.topk_centrality_dot(q, g, k, bool(exclude_self), q_offset, counts, sums)
    else:
        values, indices = _ref.topk_centrality_dot(q, g, k, exclude_self=bool(exclude_self), q_offset=q_offset,
                                                   counts=counts, sums=sums)
    return values, indices, counts, sums


WTI_TILE = 256  # queries x gallery items per WTI block (the torch path holds tile x L x F)


def _topk_centrality_wti(q: Any, g: Any, k: int, *, exclude_self: bool, counts: torch.Tensor | None,
                         sums: torch.Tensor | None, q_offset: int, q_role: str,
                         backend: _backend.Backend | None):
    from nbretr.ops.wti import wti_block
    for name, x in (("q", q), ("g", g)):
        if not (isinstance(x, (tuple, list)) and len(x) == 3 and all(isinstance(t, torch.Tensor) for t in x)):
            fail(_OP, f"with sim=\"wti\", {name} must be a (tokens, mask, weight) triple of tensors")
    if q_role not in ("text", "video"):
        fail(_OP, f"q_role must be \"text\" or \"video\", got {q_role!r}")
    q = tuple(t.detach() for t in q)
    g = tuple(t.detach() for t in g)
    Q, G = q[0].shape[0], g[0].shape[0]
    device = q[0].device
    if counts is None:
        counts = torch.zeros(G, dtype=torch.int64, device=device)
    if sums is None:
        sums = torch.zeros(G, dtype=torch.float64, device=device)
    check_topk_common(Q, G, k, exclude_self, q_offset, counts, sums, device)
    check_wti_range(q, g)
    q_offset = int(q_offset) if exclude_self else 0

    def tile_fn(q0: int, q1: int, g0: int, g1: int) -> torch.Tensor:
        block = wti_block(tuple(t[q0:q1] for t in q), tuple(t[g0:g1] for t in g), q_role=q_role, backend=backend)
        return block.float()

    values, indices = _ref.topk_centrality_tiled(tile_fn, Q, G, k, exclude_self=bool(exclude_self),
                                                 q_offset=q_offset, counts=counts, sums=sums, device=device,
                                                 q_chunk=WTI_TILE, g_tile=WTI_TILE)
    return values, indices, counts, sums


if _backend._ext.ext_loaded():

    @torch.library.register_fake("nbretr::topk_centrality_dot")
    def _topk_centrality_dot_fake(q, g, k, exclude_self, q_offset, counts, sums):
        check_topk_dot_args(q, g, k, exclude_self, q_offset, counts, sums, finite=False)  # values: data
        return (q.new_empty((q.shape[0], k), dtype=torch.float32),
                q.new_empty((q.shape[0], k), dtype=torch.int64))
