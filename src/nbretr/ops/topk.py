"""``topk_centrality``: tiled similarity with online top-k and centrality counting
(docs/operators.md, "topk_centrality")."""
from __future__ import annotations

import math
from typing import Any

import torch

from nbretr.ops import _backend
from nbretr.ops.reference import topk as _ref

__all__ = ["topk_centrality", "TOPK_MAX_K"]

_OP = "topk_centrality"
#: the largest k on every backend (csrc/common/topk.h kTopkMaxK)
TOPK_MAX_K = 1024
_FLOAT = (torch.float32, torch.float16, torch.bfloat16)


def _fail(msg: str) -> None:
    raise RuntimeError(f"nbretr.{_OP}: {msg}")


def _shape(x: torch.Tensor) -> str:
    return "[" + ", ".join(map(str, x.shape)) + "]"


def check_topk_common(Q: int, G: int, k: int, exclude_self: bool, q_offset: int, counts: torch.Tensor,
                      sums: torch.Tensor, device: torch.device) -> None:
    """csrc/common/topk_checks.h ``check_topk_common``, same messages."""
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= TOPK_MAX_K:
        _fail(f"k must be in [1, {TOPK_MAX_K}], got {k}")
    if exclude_self and not (q_offset >= 0 and q_offset + Q <= G):
        _fail("exclude_self needs q_offset >= 0 and q_offset + Q <= G (query row r is gallery item "
              f"r + q_offset), got q_offset={q_offset}, Q={Q}, G={G}")
    avail = G - 1 if exclude_self else G
    if k > avail:
        _fail(f"k={k} exceeds the {avail} gallery items a query can get (G={G}"
              f"{', exclude_self' if exclude_self else ''}); pass k <= {avail}")
    for name, dtype in (("counts", torch.int64), ("sums", torch.float64)):
        t = counts if name == "counts" else sums
        if t.dim() != 1 or t.shape[0] != G:
            _fail(f"{name} must have shape [G={G}], got {_shape(t)}")
        if t.dtype != dtype:
            _fail(f"{name} must have dtype {dtype}, got {t.dtype}")
        if t.device != device:
            _fail(f"{name} is on {t.device} but q is on {device}; every tensor must be on one device")
        if not t.is_contiguous():
            _fail(f"{name} must be contiguous")
        if t.requires_grad:
            _fail(f"{name} requires grad; topk_centrality has no gradient")


def _check_finite(name: str, x: torch.Tensor) -> float:
    """max |x|, after checking every element is finite (as csrc/common/topk_checks.h)."""
    if not x.numel():
        return 0.0
    lo, hi = (float(m) for m in torch.aminmax(x))  # one pass: NaN propagates
    if not (math.isfinite(lo) and math.isfinite(hi)):
        _fail(f"{name} contains NaN or Inf values; topk_centrality needs finite inputs")
    return max(abs(lo), abs(hi))


TOPK_SIM_LIMIT = 1.7014117331926443e38  # float32's maximum / 2 (csrc/common/topk_checks.h)


def _check_sim_range(D: int, max_q: float, max_g: float) -> None:
    """|q_i . g_j| <= D max|q| max|g| must stay in float32's range (half of it, for the
    products' rounding), or similarities could be Inf or NaN and no two backends would rank
    them alike (as csrc/common/topk_checks.h ``check_topk_sim_range``)."""
    bound = float(D) * max_q * max_g
    if not bound <= TOPK_SIM_LIMIT:
        _fail(f"q and g may give similarities beyond the float32 range (D * max|q| * max|g| = {bound:g} > "
              f"{TOPK_SIM_LIMIT:g}); scale them down")


def check_topk_dot_args(q: Any, g: Any, k: int, exclude_self: bool, q_offset: int, counts: torch.Tensor,
                        sums: torch.Tensor, finite: bool = True) -> None:
    """csrc/common/topk_checks.h ``check_topk_dot_args``, same messages (``finite=False``
    leaves the NaN/Inf scan to the kernel, which does it in the same order)."""
    if not isinstance(q, torch.Tensor) or q.dim() != 2:
        _fail(f"q must be a 2-D tensor [Q, D], got {'shape ' + _shape(q) if isinstance(q, torch.Tensor) else type(q).__name__}")
    if not isinstance(g, torch.Tensor) or g.dim() != 2:
        _fail(f"g must be a 2-D tensor [G, D], got {'shape ' + _shape(g) if isinstance(g, torch.Tensor) else type(g).__name__}")
    if q.shape[1] != g.shape[1]:
        _fail(f"q has D={q.shape[1]} features but g has D={g.shape[1]}")
    if q.dtype not in _FLOAT:
        _fail(f"q has dtype {q.dtype}; expected torch.float32, torch.float16 or torch.bfloat16")
    if g.dtype != q.dtype:
        _fail(f"g has dtype {g.dtype} but q has dtype {q.dtype}; pass both in one dtype")
    if g.device != q.device:
        _fail(f"g is on {g.device} but q is on {q.device}; every tensor must be on one device")
    check_topk_common(q.shape[0], g.shape[0], k, exclude_self, q_offset, counts, sums, q.device)
    if finite:
        _check_sim_range(q.shape[1], _check_finite("q", q), _check_finite("g", g))


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
        _fail(f"sim must be \"dot\" or \"wti\", got {sim!r}")
    if not isinstance(q, torch.Tensor) or not isinstance(g, torch.Tensor):
        check_topk_dot_args(q, g, k, exclude_self, q_offset, counts, sums)  # raises
    G = g.shape[0] if g.dim() == 2 else 0
    if counts is None:
        counts = torch.zeros(G, dtype=torch.int64, device=q.device)
    if sums is None:
        sums = torch.zeros(G, dtype=torch.float64, device=q.device)
    q, g = q.detach(), g.detach()
    use_ext = _backend.resolve(_OP, backend, q.device) == "ext"
    check_topk_dot_args(q, g, k, exclude_self, q_offset, counts, sums, finite=not use_ext)
    q_offset = int(q_offset) if exclude_self else 0
    if use_ext:
        values, indices = torch.ops.nbretr.topk_centrality_dot(q, g, k, bool(exclude_self), q_offset, counts, sums)
    else:
        values, indices = _ref.topk_centrality_dot(q, g, k, exclude_self=bool(exclude_self), q_offset=q_offset,
                                                   counts=counts, sums=sums)
    return values, indices, counts, sums


WTI_TILE = 256  # queries x gallery items per WTI block (the torch path holds tile x L x F)


def _check_wti_range(q: tuple, g: tuple) -> None:
    """sim="wti": finite tokens, masks and weights, and every stage of the WTI similarity
    inside float32's range (as sim="dot"'s bound, with the same limit): the raw token
    products |x_q . x_g| <= D max|x_q| max|x_g| (computed before any mask or weight
    applies), the masked ones (times max|m_q| max|m_g|), and the similarity
    |s| <= (masked bound) (L_q max|w_q| + L_g max|w_g|) / 2."""
    m = {}
    for side, trip in (("q", q), ("g", g)):
        for part, x in zip(("tokens", "mask", "weight"), trip):
            if x.is_floating_point():
                m[side, part] = _check_finite(f"{side} {part}", x)
            else:
                m[side, part] = float(x.double().abs().max()) if x.numel() else 0.0
    D = q[0].shape[-1] if q[0].dim() == 3 else 0
    Lq, Lg = (t[0].shape[1] if t[0].dim() == 3 else 0 for t in (q, g))
    raw = D * m["q", "tokens"] * m["g", "tokens"]
    masked = raw * m["q", "mask"] * m["g", "mask"]
    sim = masked * (Lq * m["q", "weight"] + Lg * m["g", "weight"]) / 2
    for what, bound in (("token products", raw), ("masked token products", masked), ("WTI similarities", sim)):
        if not bound <= TOPK_SIM_LIMIT:
            _fail(f"q and g may give {what} beyond the float32 range (bound {bound:g} > {TOPK_SIM_LIMIT:g}); "
                  "scale the tokens, masks or weights down")


def _topk_centrality_wti(q: Any, g: Any, k: int, *, exclude_self: bool, counts: torch.Tensor | None,
                         sums: torch.Tensor | None, q_offset: int, q_role: str,
                         backend: _backend.Backend | None):
    from nbretr.ops.wti import wti_block
    for name, x in (("q", q), ("g", g)):
        if not (isinstance(x, (tuple, list)) and len(x) == 3 and all(isinstance(t, torch.Tensor) for t in x)):
            _fail(f"with sim=\"wti\", {name} must be a (tokens, mask, weight) triple of tensors")
    if q_role not in ("text", "video"):
        _fail(f"q_role must be \"text\" or \"video\", got {q_role!r}")
    q = tuple(t.detach() for t in q)
    g = tuple(t.detach() for t in g)
    Q, G = q[0].shape[0], g[0].shape[0]
    device = q[0].device
    if counts is None:
        counts = torch.zeros(G, dtype=torch.int64, device=device)
    if sums is None:
        sums = torch.zeros(G, dtype=torch.float64, device=device)
    check_topk_common(Q, G, k, exclude_self, q_offset, counts, sums, device)
    _check_wti_range(q, g)
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
        return (q.new_empty((q.shape[0], k), dtype=torch.float32),
                q.new_empty((q.shape[0], k), dtype=torch.int64))
