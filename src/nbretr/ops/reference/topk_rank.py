"""topk_rank, pure PyTorch (docs/operators.md): the top-k of every row of a score block by
:func:`nbretr.ops.reference.topk.select_topk` (topk_centrality's tie rule) and the rank of
every row's best target by one comparison pass, O(G) per row. Argument checks are done by
the public wrapper (:mod:`nbretr.ops.topk_rank`)."""
from __future__ import annotations

import torch

from nbretr.ops.reference.topk import select_topk


def best_targets(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[R] the best target of every row: the highest score among its targets (entries >= 0;
    -1 is padding), equal scores by the lower column index."""
    R, G = scores.shape
    valid = targets >= 0
    t = targets.clamp_min(0)
    tv = scores.gather(1, t)
    best_v = tv.masked_fill(~valid, float("-inf")).amax(1, keepdim=True)
    cand = valid & (tv == best_v)
    return torch.where(cand, t, G).amin(1)


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[R] int64: 1 + #{j : s_j > s_b, or s_j == s_b and j < b}, b the row's best target."""
    b = best_targets(scores, targets)[:, None]
    sb = scores.gather(1, b)
    cols = torch.arange(scores.shape[1], device=scores.device)[None, :]
    return 1 + ((scores > sb) | ((scores == sb) & (cols < b))).sum(1)


def topk_rank(scores: torch.Tensor, k: int, targets: torch.Tensor | None,
              counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """values [R, k] (scores' dtype), indices [R, k] int64, ranks [R] int64 ([0] without
    targets); adds the k-occurrences into ``counts`` in place."""
    R, G = scores.shape
    cols = torch.arange(G, device=scores.device)
    values, indices = select_topk(scores, cols, k)
    indices = indices.contiguous()
    if targets is None:
        ranks = torch.zeros(0, dtype=torch.int64, device=scores.device)
    else:
        ranks = target_ranks(scores, targets)
    if k and R:
        counts += torch.bincount(indices.flatten(), minlength=G)
    return values, indices, ranks
