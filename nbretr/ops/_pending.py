"""TEMPORARY stand-ins for ``wti_similarity``, ``topk_centrality`` and ``sinkhorn_log``.

*** DELETE THIS FILE ON MERGE. ***  The real operators (branches wti, topk, sinkhorn) replace
it with identical semantics (INTERFACES.md "Operators"); only the three import lines in
``nbretr/ops/__init__.py`` point here. These are the plain pure-torch formulations of
METHOD.md, written only so that the model branch (nbretr.models, nbretr.losses) can be
developed and tested before the operators land. ``backend`` is accepted and ignored here
(the value is still validated). Nothing outside ``nbretr/ops/__init__.py`` imports this file.
"""
from __future__ import annotations

import math

import torch

from nbretr.ops import _backend


def _float(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def wti_similarity(t: torch.Tensor, t_mask: torch.Tensor, t_weight: torch.Tensor,
                   v: torch.Tensor, v_mask: torch.Tensor, v_weight: torch.Tensor,
                   *, backend: _backend.Backend | None = None) -> torch.Tensor:
    """WTI similarity ``s [Bt, Bv]`` (METHOD.md "Fine-grained similarity"), einsum form.

    t [Bt,L,D], v [Bv,F,D] L2-normalised; masks [Bt,L]/[Bv,F] {0,1}; weights softmaxed, 0 on
    masked tokens. Output float32 (float64 for float64 inputs)."""
    if backend is not None:
        _backend._check("backend", backend)
    t, v, t_weight, v_weight = _float(t), _float(v), _float(t_weight), _float(v_weight)
    tm = t_mask.to(t.dtype)
    vm = v_mask.to(t.dtype)
    s = torch.einsum("ald,bfd->ablf", t, v) * tm[:, None, :, None] * vm[None, :, None, :]
    t2v = torch.einsum("abl,al->ab", s.max(dim=-1).values, t_weight)
    v2t = torch.einsum("abf,bf->ab", s.max(dim=-2).values, v_weight)
    return (t2v + v2t) / 2


@torch.no_grad()
def topk_centrality(q, g, k: int, *, sim: str = "dot", exclude_self: bool = False,
                    counts: torch.Tensor | None = None, sums: torch.Tensor | None = None,
                    q_role: str = "text", backend: _backend.Backend | None = None):
    """Top-k gallery items per query and per-gallery k-occurrence counts / similarity sums.

    Returns ``(values [Q,k] float32, indices [Q,k] int64, counts [G] int64, sums [G] float64)``;
    ties: lower gallery index first. ``sim="wti"``: q, g are ``(tokens, mask, weight)`` triples,
    ``q_role`` says which of them is text."""
    if backend is not None:
        _backend._check("backend", backend)
    if sim == "dot":
        m = _float(q) @ _float(g).T
    elif sim == "wti":
        if q_role == "text":
            m = wti_similarity(*q, *g)
        elif q_role == "video":
            m = wti_similarity(*g, *q).T
        else:
            raise ValueError(f"q_role must be 'text' or 'video', got {q_role!r}")
    else:
        raise ValueError(f"sim must be 'dot' or 'wti', got {sim!r}")
    m = m.float()
    Q, G = m.shape
    if not 0 <= k <= G:
        raise ValueError(f"k must be in [0, G={G}], got {k}")
    sums_new = m.double().sum(0)
    if exclude_self:
        n = min(Q, G)
        m = m.clone()
        m[torch.arange(n), torch.arange(n)] = float("-inf")
    values, indices = torch.sort(m, dim=1, descending=True, stable=True)
    values, indices = values[:, :k].contiguous(), indices[:, :k].contiguous()
    counts_new = torch.bincount(indices.flatten(), minlength=G)[:G]
    if counts is not None:
        counts += counts_new
    else:
        counts = counts_new
    if sums is not None:
        sums += sums_new
    else:
        sums = sums_new
    return values, indices, counts, sums
