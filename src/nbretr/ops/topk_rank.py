"""``topk_rank``: the top-k and the rank of given targets in every row of a score block,
topk_centrality's sibling for scores that are already computed (rescored blocks of the
hubness corrections, WTI blocks, best-caption blocks). docs/operators.md, "topk_rank"."""
from __future__ import annotations

import warnings
from typing import Any

import torch

from nbretr.ops import _backend
from nbretr.ops._checks import check_topk_rank_args, check_topk_rank_extra, check_topk_rank_values
from nbretr.ops.reference import topk_rank as _ref

__all__ = ["topk_rank"]

_OP = "topk_rank"
_warned: set[str] = set()


def topk_rank(scores: Any, k: int = 0, *, targets: torch.Tensor | None = None, counts: torch.Tensor | None = None,
              backend: _backend.Backend | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every row's top-k columns and the rank of every row's best target, in one pass over a
    score block (O(G log k) per row for the top-k, O(G) for the rank: no sort).

    Args:
        scores: [R, G] float32/float64/float16/bfloat16 (compared exactly in their dtype;
            ±Inf allowed, NaN refused).
        k: columns per row, 0 <= k <= G (0: ranks only).
        targets: int64 [R, T] or None: row r's correct columns; -1 entries are padding,
            every row needs one entry >= 0. The rank is that of the row's best target
            (highest score, equal scores by lower column), which is the smallest rank of
            its targets.
        counts: int64 [G], the k-occurrences are added into it in place; new zeros if None.
        backend: "auto" | "ext" | "torch". The extension has a CPU kernel only: on CUDA
            every backend runs the torch path ("ext" with a one-time warning).

    Returns:
        ``(values [R, k] scores' dtype, indices [R, k] int64, ranks [R] int64, counts)``:
        rows best first, descending score, equal scores by ascending column (the tie rule
        of :func:`nbretr.ops.topk_centrality`); ``ranks[r] = 1 + #{j : s[r, j] > s[r, b] or
        (s[r, j] == s[r, b] and j < b)}``, b the best target; ``ranks`` is empty [0] when
        ``targets`` is None. Deterministic and identical on every backend. No gradient.
    """
    if counts is None:
        G = scores.shape[1] if isinstance(scores, torch.Tensor) and scores.dim() == 2 else 0
        dev = scores.device if isinstance(scores, torch.Tensor) else torch.device("cpu")
        counts = torch.zeros(G, dtype=torch.int64, device=dev)
    if not isinstance(scores, torch.Tensor):
        check_topk_rank_args(scores, targets, k, counts)  # raises: scores must be a tensor
    use_ext = _backend.resolve(_OP, backend, scores.device) == "ext"
    if use_ext and scores.device.type != "cpu":
        # no CUDA kernel: a process-wide backend="ext" (nbretr.eval --backend ext) must not
        # stop the evaluation, so the torch path runs, with one warning per device type
        if scores.device.type not in _warned:
            _warned.add(scores.device.type)
            warnings.warn(f"nbretr.ops.topk_rank: the extension has no {scores.device.type} kernel; "
                          "using the pure-PyTorch path", RuntimeWarning, stacklevel=2)
        use_ext = False
    if use_ext:
        # the C++ checks run in the kernel; only what they cannot see is checked here
        check_topk_rank_extra(k, counts)
        values, indices, ranks = torch.ops.nbretr.topk_rank(scores.detach(), targets, k, counts)
    else:
        check_topk_rank_args(scores, targets, k, counts)
        scores = scores.detach()
        check_topk_rank_values(scores, targets)
        values, indices, ranks = _ref.topk_rank(scores, k, targets, counts)
    return values, indices, ranks, counts


if _backend._ext.ext_loaded():

    @torch.library.register_fake("nbretr::topk_rank")
    def _topk_rank_fake(scores, targets, k, counts):
        check_topk_rank_args(scores, targets, k, counts)
        R = scores.shape[0]
        return (scores.new_empty((R, k)), scores.new_empty((R, k), dtype=torch.int64),
                scores.new_empty((R if targets is not None else 0,), dtype=torch.int64))
