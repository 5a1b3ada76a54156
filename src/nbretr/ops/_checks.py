"""The operators' argument checks in Python, written once: the torch path and the fake
(meta) kernels run these; the extension runs its C++ checks (csrc/common/*_checks.h), in
the same order and with the same messages, and the ext path does not run these again.

Only what C++ cannot see is checked in Python on the ext path as well: the ``*_extra``
functions (autograd flags, Python-level arguments such as ring_push's ``filled``).
tests/test_*.py compare the messages across backends.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

#: the largest k on every backend (csrc/common/topk.h kTopkMaxK)
TOPK_MAX_K = 1024
#: float32's maximum / 2 (csrc/common/topk_checks.h)
TOPK_SIM_LIMIT = 1.7014117331926443e38

WTI_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
TOPK_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
SINKHORN_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def fail(op: str, msg: str) -> None:
    """Raise the error every backend raises: ``RuntimeError("nbretr.<op>: <msg>")``."""
    raise RuntimeError(f"nbretr.{op}: {msg}")


def shape(x: torch.Tensor) -> str:
    """A shape as C++ prints it: ``[2, 3]``."""
    return "[" + ", ".join(map(str, x.shape)) + "]"


# ---- ring_push (csrc/common/ring_checks.h) ------------------------------------------

def check_ring_push_args(buffers: Sequence[torch.Tensor], items: Sequence[torch.Tensor], head: int,
                         filled: int | None = None) -> int:
    """The checks of csrc/common/ring_checks.h, with the same messages, plus the
    Python-level ones (:func:`check_ring_push_extra`: the fill level, when given, and
    autograd) at their places. Returns the batch length."""
    op = "ring_push"
    if not isinstance(buffers, (list, tuple)) or len(buffers) == 0:
        fail(op, "buffers must be a non-empty list of tensors")
    if len(items) != len(buffers):
        fail(op, f"items has {len(items)} tensors but buffers has {len(buffers)}; pass one item per buffer")
    capacity = buffers[0].shape[0] if buffers[0].dim() > 0 else 0
    if capacity <= 0:
        fail(op, f"buffers[0] must have shape [capacity, ...] with capacity >= 1, got {shape(buffers[0])}")
    if not 0 <= head < capacity:
        fail(op, f"head must be in [0, capacity={capacity}), got {head}")
    if filled is not None:
        _check_filled(filled, capacity)
    n = items[0].shape[0] if items[0].dim() > 0 else -1
    device = buffers[0].device
    for b, (buf, item) in enumerate(zip(buffers, items)):
        if buf.device != device:
            fail(op, f"buffers[{b}] is on {buf.device} but buffers[0] is on {device}; "
                 "every buffer and item must be on one device")
        if item.device != device:
            fail(op, f"items[{b}] is on {item.device} but the buffers are on {device}; move it with .to({device})")
        if buf.dim() < 1 or buf.shape[0] != capacity:
            fail(op, f"buffers[{b}] has shape {shape(buf)} but buffers[0] has capacity {capacity}; "
                 "every buffer must have the same number of rows")
        if not buf.is_contiguous():
            fail(op, f"buffers[{b}] must be contiguous")
        if item.dim() != buf.dim():
            fail(op, f"items[{b}] has shape {shape(item)} but buffers[{b}] has shape {shape(buf)}; "
                 f"expected [n{', ' if buf.dim() > 1 else ''}{', '.join(map(str, buf.shape[1:]))}]")
        if item.shape[1:] != buf.shape[1:]:
            fail(op, f"items[{b}] has shape {shape(item)} but buffers[{b}] has rows of shape "
                 f"{list(buf.shape[1:])}")
        if item.dtype != buf.dtype:
            fail(op, f"items[{b}] has dtype {item.dtype} but buffers[{b}] has dtype {buf.dtype}")
        if item.shape[0] != n:
            fail(op, f"items[{b}] has {item.shape[0]} rows but items[0] has {n}; every item must hold the same batch")
        _check_ring_grads(b, buf, item)
    return n


def _check_filled(filled: int, capacity: int) -> None:
    if not 0 <= filled <= capacity:
        fail("ring_push", f"filled must be in [0, capacity={capacity}], got {filled}")


def _check_ring_grads(b: int, buf: torch.Tensor, item: torch.Tensor) -> None:
    if buf.requires_grad:
        fail("ring_push", f"buffers[{b}] requires grad; a memory bank holds constants (create it without "
             "requires_grad)")
    if item.requires_grad:
        fail("ring_push", f"items[{b}] requires grad; the bank stores no graph: push item.detach()")


def check_ring_push_extra(buffers: Sequence[torch.Tensor], items: Sequence[torch.Tensor], filled: int) -> None:
    """What the C++ op cannot check (the ext path runs this, then the op): the fill level
    and autograd. ``buffers`` is a non-empty list."""
    if buffers[0].dim() > 0 and buffers[0].shape[0] > 0:
        _check_filled(filled, buffers[0].shape[0])
    for b, (buf, item) in enumerate(zip(buffers, items)):
        _check_ring_grads(b, buf, item)


# ---- sinkhorn_log (csrc/common/sinkhorn_checks.h) -----------------------------------

def check_sinkhorn_args(scores: torch.Tensor, log_mu: torch.Tensor, log_nu: torch.Tensor, n_iters: int,
                        eps: float, tol: float | None) -> None:
    """The checks of csrc/common/sinkhorn_checks.h, with the same messages."""
    op = "sinkhorn_log"
    if scores.dim() != 3:
        fail(op, f"scores must be a 3-D tensor [B, M, N], got shape {shape(scores)}")
    if scores.dtype not in SINKHORN_FLOATS:
        fail(op, f"scores must be float16, bfloat16, float32 or float64, got {scores.dtype}")
    B, M, N = scores.shape
    for t, name, length, dim in ((log_mu, "log_mu", M, "M"), (log_nu, "log_nu", N, "N")):
        if t.device != scores.device:
            fail(op, f"{name} is on {t.device} but scores is on {scores.device}")
        if t.dim() != 2 or t.shape[0] != B or t.shape[1] != length:
            fail(op, f"{name} must have shape [B, {dim}] = [{B}, {length}], got {shape(t)}")
        if not t.dtype.is_floating_point:
            fail(op, f"{name} must be a floating tensor, got {t.dtype}")
    if n_iters < 0:
        fail(op, f"n_iters must be >= 0, got {n_iters}")
    if not (eps > 0 and math.isfinite(eps)):
        fail(op, f"eps must be a positive finite number, got {eps:g}")
    if tol is not None and not tol >= 0:
        fail(op, f"tol must be >= 0 (or None), got {tol:g}")


def check_sinkhorn_masks(scores: torch.Tensor) -> None:
    """The fully-masked row/column check of csrc/common/sinkhorn_checks.h (same message,
    same first offender: lowest problem, rows before columns, lowest index)."""
    if scores.numel() == 0:
        return
    B, M, N = scores.shape
    neg = torch.isneginf(scores)
    bad_rows, bad_cols = neg.all(2), neg.all(1)
    if not bool(bad_rows.any() | bad_cols.any()):
        return
    for b in range(B):
        if bool(bad_rows[b].any()):
            i = int(bad_rows[b].to(torch.uint8).argmax())
            fail("sinkhorn_log", f"scores[{b}, {i}, :] is entirely -inf (problem {b}, row {i} of {M} is fully "
                 "masked); every row and column needs at least one finite score")
        if bool(bad_cols[b].any()):
            j = int(bad_cols[b].to(torch.uint8).argmax())
            fail("sinkhorn_log", f"scores[{b}, :, {j}] is entirely -inf (problem {b}, column {j} of {N} is fully "
                 "masked); every row and column needs at least one finite score")


# ---- wti_similarity (csrc/common/wti_checks.h) --------------------------------------

def _check_wti_side(x, mask, weight, xn, mn, wn, dims, two, t) -> None:
    op = "wti_similarity"
    if x.dim() != 3:
        fail(op, f"{xn} must have shape {dims}, got {shape(x)}")
    if x.shape[1] < 1:
        fail(op, f"{xn} must have at least one token ({dims} with {two} >= 1), got {shape(x)}")
    if x.device != t.device:
        fail(op, f"{xn} is on {x.device} but t is on {t.device}")
    if mask.device != t.device:
        fail(op, f"{mn} is on {mask.device} but t is on {t.device}")
    if weight.device != t.device:
        fail(op, f"{wn} is on {weight.device} but t is on {t.device}")
    if mask.dim() != 2 or tuple(mask.shape) != tuple(x.shape[:2]):
        fail(op, f"{mn} has shape {shape(mask)} but {xn} has shape {shape(x)}; "
             f"expected [{x.shape[0]}, {x.shape[1]}]")
    if weight.dim() != 2 or tuple(weight.shape) != tuple(x.shape[:2]):
        fail(op, f"{wn} has shape {shape(weight)} but {mn} has shape {shape(mask)}; "
             f"expected [{x.shape[0]}, {x.shape[1]}]")
    if not weight.dtype.is_floating_point:
        fail(op, f"{wn} has dtype {weight.dtype}; expected a floating dtype")
    if mask.dtype.is_complex:
        fail(op, f"{mn} has dtype {mask.dtype}; expected bool, integer or floating")


def check_wti_args(t, t_mask, t_weight, v, v_mask, v_weight) -> tuple[int, int, int, int, int]:
    """The checks of csrc/common/wti_checks.h, same order and messages. Returns
    ``(Bt, Bv, L, F, D)``."""
    if t.dtype not in WTI_FLOATS:
        fail("wti_similarity", f"t has dtype {t.dtype}; expected torch.float32, torch.float16, torch.bfloat16 "
             "or torch.float64")
    if v.dtype != t.dtype:
        fail("wti_similarity", f"v has dtype {v.dtype} but t has dtype {t.dtype}")
    _check_wti_side(t, t_mask, t_weight, "t", "t_mask", "t_weight", "[Bt, L, D]", "L", t)
    _check_wti_side(v, v_mask, v_weight, "v", "v_mask", "v_weight", "[Bv, F, D]", "F", t)
    if v.shape[2] != t.shape[2]:
        fail("wti_similarity", f"v has D={v.shape[2]} but t has D={t.shape[2]}; t [Bt, L, D] and v [Bv, F, D] "
             "must share D")
    return t.shape[0], v.shape[0], t.shape[1], v.shape[1], t.shape[2]


# ---- topk_centrality (csrc/common/topk_checks.h) ------------------------------------

def check_topk_k(k: Any) -> None:
    """k's type and range (C++ gets an int from the schema; Python checks the type too)."""
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= TOPK_MAX_K:
        fail("topk_centrality", f"k must be in [1, {TOPK_MAX_K}], got {k}")


def _check_topk_grads(counts: torch.Tensor, sums: torch.Tensor) -> None:
    for name, t in (("counts", counts), ("sums", sums)):
        if t.requires_grad:
            fail("topk_centrality", f"{name} requires grad; topk_centrality has no gradient")


def check_topk_common(Q: int, G: int, k: int, exclude_self: bool, q_offset: int, counts: torch.Tensor,
                      sums: torch.Tensor, device: torch.device) -> None:
    """csrc/common/topk_checks.h ``check_topk_common``, same messages (plus autograd)."""
    op = "topk_centrality"
    check_topk_k(k)
    if exclude_self and not (q_offset >= 0 and q_offset + Q <= G):
        fail(op, "exclude_self needs q_offset >= 0 and q_offset + Q <= G (query row r is gallery item "
             f"r + q_offset), got q_offset={q_offset}, Q={Q}, G={G}")
    avail = G - 1 if exclude_self else G
    if k > avail:
        fail(op, f"k={k} exceeds the {avail} gallery items a query can get (G={G}"
             f"{', exclude_self' if exclude_self else ''}); pass k <= {avail}")
    for name, dtype in (("counts", torch.int64), ("sums", torch.float64)):
        t = counts if name == "counts" else sums
        if t.dim() != 1 or t.shape[0] != G:
            fail(op, f"{name} must have shape [G={G}], got {shape(t)}")
        if t.dtype != dtype:
            fail(op, f"{name} must have dtype {dtype}, got {t.dtype}")
        if t.device != device:
            fail(op, f"{name} is on {t.device} but q is on {device}; every tensor must be on one device")
        if not t.is_contiguous():
            fail(op, f"{name} must be contiguous")
        if t.requires_grad:
            fail(op, f"{name} requires grad; topk_centrality has no gradient")


def check_topk_finite(name: str, x: torch.Tensor) -> float:
    """max |x|, after checking every element is finite (as csrc/common/topk_checks.h)."""
    if not x.numel():
        return 0.0
    lo, hi = (float(m) for m in torch.aminmax(x))  # one pass: NaN propagates
    if not (math.isfinite(lo) and math.isfinite(hi)):
        fail("topk_centrality", f"{name} contains NaN or Inf values; topk_centrality needs finite inputs")
    return max(abs(lo), abs(hi))


def check_topk_sim_range(D: int, max_q: float, max_g: float) -> None:
    """|q_i . g_j| <= D max|q| max|g| must stay in float32's range (half of it, for the
    products' rounding), or similarities could be Inf or NaN and no two backends would rank
    them alike (as csrc/common/topk_checks.h ``check_topk_sim_range``)."""
    bound = float(D) * max_q * max_g
    if not bound <= TOPK_SIM_LIMIT:
        fail("topk_centrality", f"q and g may give similarities beyond the float32 range (D * max|q| * max|g| = "
             f"{bound:g} > {TOPK_SIM_LIMIT:g}); scale them down")


def check_topk_dot_args(q: Any, g: Any, k: int, exclude_self: bool, q_offset: int, counts: torch.Tensor,
                        sums: torch.Tensor, finite: bool = True) -> None:
    """csrc/common/topk_checks.h ``check_topk_dot_args``, same messages (``finite=False``
    skips the NaN/Inf scan and the range bound, for fake tensors)."""
    op = "topk_centrality"
    if not isinstance(q, torch.Tensor) or q.dim() != 2:
        fail(op, "q must be a 2-D tensor [Q, D], got "
             f"{'shape ' + shape(q) if isinstance(q, torch.Tensor) else type(q).__name__}")
    if not isinstance(g, torch.Tensor) or g.dim() != 2:
        fail(op, "g must be a 2-D tensor [G, D], got "
             f"{'shape ' + shape(g) if isinstance(g, torch.Tensor) else type(g).__name__}")
    if q.shape[1] != g.shape[1]:
        fail(op, f"q has D={q.shape[1]} features but g has D={g.shape[1]}")
    if q.dtype not in TOPK_FLOATS:
        fail(op, f"q has dtype {q.dtype}; expected torch.float32, torch.float16 or torch.bfloat16")
    if g.dtype != q.dtype:
        fail(op, f"g has dtype {g.dtype} but q has dtype {q.dtype}; pass both in one dtype")
    if g.device != q.device:
        fail(op, f"g is on {g.device} but q is on {q.device}; every tensor must be on one device")
    check_topk_common(q.shape[0], g.shape[0], k, exclude_self, q_offset, counts, sums, q.device)
    if finite:
        check_topk_sim_range(q.shape[1], check_topk_finite("q", q), check_topk_finite("g", g))


def check_topk_dot_extra(k: Any, counts: torch.Tensor, sums: torch.Tensor) -> None:
    """What the C++ op cannot check (the ext path runs this, then the op): k's Python type
    (its range is C++'s) and autograd on counts and sums."""
    if not isinstance(k, int) or isinstance(k, bool):
        check_topk_k(k)  # raises, with the message of every backend
    _check_topk_grads(counts, sums)


def check_wti_range(q: tuple, g: tuple) -> None:
    """topk_centrality sim="wti" (a Python driver on every backend): finite tokens, masks
    and weights, and every stage of the WTI similarity inside float32's range (as
    sim="dot"'s bound, with the same limit): the raw token products
    |x_q . x_g| <= D max|x_q| max|x_g| (computed before any mask or weight applies), the
    masked ones (times max|m_q| max|m_g|), and the similarity
    |s| <= (masked bound) (L_q max|w_q| + L_g max|w_g|) / 2."""
    m = {}
    for side, trip in (("q", q), ("g", g)):
        for part, x in zip(("tokens", "mask", "weight"), trip):
            if x.is_floating_point():
                m[side, part] = check_topk_finite(f"{side} {part}", x)
            else:
                m[side, part] = float(x.double().abs().max()) if x.numel() else 0.0
    D = q[0].shape[-1] if q[0].dim() == 3 else 0
    Lq, Lg = (t[0].shape[1] if t[0].dim() == 3 else 0 for t in (q, g))
    raw = D * m["q", "tokens"] * m["g", "tokens"]
    masked = raw * m["q", "mask"] * m["g", "mask"]
    sim = masked * (Lq * m["q", "weight"] + Lg * m["g", "weight"]) / 2
    for what, bound in (("token products", raw), ("masked token products", masked), ("WTI similarities", sim)):
        if not bound <= TOPK_SIM_LIMIT:
            fail("topk_centrality", f"q and g may give {what} beyond the float32 range (bound {bound:g} > "
                 f"{TOPK_SIM_LIMIT:g}); scale the tokens, masks or weights down")


# ---- topk_rank (csrc/common/topk_rank_checks.h) --------------------------------------

_RANK = "topk_rank"
TOPK_RANK_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_topk_rank_args(scores: Any, targets: Any, k: Any, counts: torch.Tensor) -> None:
    """csrc/common/topk_rank_checks.h ``check_topk_rank_args``, same messages and order
    (the torch path and the fake kernel)."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        got = "shape " + shape(scores) if isinstance(scores, torch.Tensor) else type(scores).__name__
        fail(_RANK, f"scores must be a 2-D tensor [R, G], got {got}")
    if scores.dtype not in TOPK_RANK_FLOATS:
        fail(_RANK, f"scores has dtype {scores.dtype}; expected torch.float32, torch.float64, torch.float16 or "
              "torch.bfloat16")
    R, G = scores.shape
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= G:
        fail(_RANK, f"k must be in [0, G={G}], got {k}")
    if targets is not None:
        if not isinstance(targets, torch.Tensor) or targets.dim() != 2 or targets.shape[0] != R \
                or targets.shape[1] < 1:
            got = shape(targets) if isinstance(targets, torch.Tensor) else type(targets).__name__
            fail(_RANK, f"targets must have shape [R={R}, T >= 1], got {got}")
        if targets.dtype != torch.int64:
            fail(_RANK, f"targets must have dtype torch.int64, got {targets.dtype}")
        if targets.device != scores.device:
            fail(_RANK, f"targets is on {targets.device} but scores is on {scores.device}; every tensor must be on "
                  "one device")
    if counts.dim() != 1 or counts.shape[0] != G:
        fail(_RANK, f"counts must have shape [G={G}], got {shape(counts)}")
    if counts.dtype != torch.int64:
        fail(_RANK, f"counts must have dtype torch.int64, got {counts.dtype}")
    if counts.device != scores.device:
        fail(_RANK, f"counts is on {counts.device} but scores is on {scores.device}; every tensor must be on one device")
    if not counts.is_contiguous():
        fail(_RANK, "counts must be contiguous")
    if counts.requires_grad:
        fail(_RANK, "counts requires grad; topk_rank has no gradient")


def check_topk_rank_values(scores: torch.Tensor, targets: torch.Tensor | None) -> None:
    """What the kernel checks while it reads: target entries, then NaN scores."""
    G = scores.shape[1]
    if targets is not None and targets.numel():
        bad = (targets < -1) | (targets >= G)
        if bool(bad.any()):
            r, c = (int(x) for x in bad.nonzero()[0])
            fail(_RANK, f"targets[{r}, {c}] = {int(targets[r, c])} is outside [-1, G={G}) (-1 marks padding)")
        empty = ~(targets >= 0).any(1)
        if bool(empty.any()):
            fail(_RANK, f"targets row {int(empty.nonzero()[0, 0])} has no target (every entry is -1)")
    if scores.numel() and bool(torch.isnan(scores).any()):
        fail(_RANK, "scores contain NaN values; ranks need ordered scores")


def check_topk_rank_extra(k: Any, counts: torch.Tensor) -> None:
    """What the extension's C++ checks cannot see: k's Python type and autograd."""
    if not isinstance(k, int) or isinstance(k, bool):
        fail(_RANK, f"k must be in [0, G={counts.shape[0] if counts.dim() == 1 else '?'}], got {k}")
    if counts.requires_grad:
        fail(_RANK, "counts requires grad; topk_rank has no gradient")
