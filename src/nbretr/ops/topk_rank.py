"""``topk_rank``: the top-k and the rank of given targets in every row of a score block,
topk_centrality's sibling for scores that are already computed (rescored blocks of the
hubness corrections, WTI blocks, best-caption blocks). docs/operators.md, "topk_rank"."""
from __future__ import annotations

import warnings
from typing import Any

import torch

from nbretr.ops import _backend
from nbretr.ops.reference import topk_rank as _ref

__all__ = ["topk_rank"]

_OP = "topk_rank"
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_warned: set[str] = set()


def _fail(msg: str) -> None:
    raise RuntimeError(f"nbretr.{_OP}: {msg}")


def _shape(x: torch.Tensor) -> str:
    return "[" + ", ".join(map(str, x.shape)) + "]"


def check_topk_rank_args(scores: Any, targets: Any, k: Any, counts: torch.Tensor) -> None:
    """csrc/common/topk_rank_checks.h ``check_topk_rank_args``, same messages and order."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        got = "shape " + _shape(scores) if isinstance(scores, torch.Tensor) else type(scores).__name__
        _fail(f"scores must be a 2-D tensor [R, G], got {got}")
    if scores.dtype not in _DTYPES:
        _fail(f"scores has dtype {scores.dtype}; expected torch.float32, torch.float64, torch.float16 or "
              "torch.bfloat16")
    R, G = scores.shape
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= G:
        _fail(f"k must be in [0, G={G}], got {k}")
    if targets is not None:
        if not isinstance(targets, torch.Tensor) or targets.dim() != 2 or targets.shape[0] != R \
                or targets.shape[1] < 1:
            got = _shape(targets) if isinstance(targets, torch.Tensor) else type(targets).__name__
            _fail(f"targets must have shape [R={R}, T >= 1], got {got}")
        if targets.dtype != torch.int64:
            _fail(f"targets must have dtype torch.int64, got {targets.dtype}")
        if targets.device != scores.device:
            _fail(f"targets is on {targets.device} but scores is on {scores.device}; every tensor must be on "
                  "one device")
    if counts.dim() != 1 or counts.shape[0] != G:
        _fail(f"counts must have shape [G={G}], got {_shape(counts)}")
    if counts.dtype != torch.int64:
        _fail(f"counts must have dtype torch.int64, got {counts.dtype}")
    if counts.device != scores.device:
        _fail(f"counts is on {counts.device} but scores is on {scores.device}; every tensor must be on one device")
    if not counts.is_contiguous():
        _fail("counts must be contiguous")
    if counts.requires_grad:
        _fail("counts requires grad; topk_rank has no gradient")


def _check_values(scores: torch.Tensor, targets: torch.Tensor | None) -> None:
    """What the kernel checks while it reads: target entries, then NaN scores."""
    G = scores.shape[1]
    if targets is not None and targets.numel():
        bad = (targets < -1) | (targets >= G)
        if bool(bad.any()):
            r, c = (int(x) for x in bad.nonzero()[0])
            _fail(f"targets[{r}, {c}] = {int(targets[r, c])} is outside [-1, G={G}) (-1 marks padding)")
        empty = ~(targets >= 0).any(1)
        if bool(empty.any()):
            _fail(f"targets row {int(empty.nonzero()[0, 0])} has no target (every entry is -1)")
    if scores.numel() and bool(torch.isnan(scores).any()):
        _fail("scores contain NaN values; ranks need ordered scores")


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
    check_topk_rank_args(scores, targets, k, counts)
    scores = scores.detach()
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
        values, indices, ranks = torch.ops.nbretr.topk_rank(scores, targets, k, counts)
    else:
        _check_values(scores, targets)
        values, indices, ranks = _ref.topk_rank(scores, k, targets, counts)
    return values, indices, ranks, counts


if _backend._ext.ext_loaded():

    @torch.library.register_fake("nbretr::topk_rank")
    def _topk_rank_fake(scores, targets, k, counts):
        R = scores.shape[0]
        return (scores.new_empty((R, k)), scores.new_empty((R, k), dtype=torch.int64),
                scores.new_empty((R if targets is not None else 0,), dtype=torch.int64))
