"""``ring_push`` / ``ring_view``: the in-place circular memory-bank update (docs/operators.md)."""
from __future__ import annotations

from typing import Sequence

import torch

from nbretr.ops import _backend
from nbretr.ops.reference import ring as _ref

__all__ = ["ring_push", "ring_view"]

_OP = "ring_push"


def _fail(msg: str) -> None:
    raise RuntimeError(f"nbretr.{_OP}: {msg}")


def check_ring_push_args(buffers: Sequence[torch.Tensor], items: Sequence[torch.Tensor], head: int,
                         filled: int) -> int:
    """The checks of csrc/common/ring_checks.h, with the same messages, plus the
    Python-level ones (autograd, fill level). Returns the batch length."""
    if not isinstance(buffers, (list, tuple)) or len(buffers) == 0:
        _fail("buffers must be a non-empty list of tensors")
    if len(items) != len(buffers):
        _fail(f"items has {len(items)} tensors but buffers has {len(buffers)}; pass one item per buffer")
    capacity = buffers[0].shape[0] if buffers[0].dim() > 0 else 0
    if capacity <= 0:
        _fail(f"buffers[0] must have shape [capacity, ...] with capacity >= 1, got {list(buffers[0].shape)}")
    if not 0 <= head < capacity:
        _fail(f"head must be in [0, capacity={capacity}), got {head}")
    if not 0 <= filled <= capacity:
        _fail(f"filled must be in [0, capacity={capacity}], got {filled}")
    n = items[0].shape[0] if items[0].dim() > 0 else -1
    device = buffers[0].device
    for b, (buf, item) in enumerate(zip(buffers, items)):
        if buf.device != device:
            _fail(f"buffers[{b}] is on {buf.device} but buffers[0] is on {device}; "
                  "every buffer and item must be on one device")
        if item.device != device:
            _fail(f"items[{b}] is on {item.device} but the buffers are on {device}; move it with .to({device})")
        if buf.dim() < 1 or buf.shape[0] != capacity:
            _fail(f"buffers[{b}] has shape {list(buf.shape)} but buffers[0] has capacity {capacity}; "
                  "every buffer must have the same number of rows")
        if not buf.is_contiguous():
            _fail(f"buffers[{b}] must be contiguous")
        if item.dim() != buf.dim():
            _fail(f"items[{b}] has shape {list(item.shape)} but buffers[{b}] has shape {list(buf.shape)}; "
                  f"expected [n{', ' if buf.dim() > 1 else ''}{', '.join(map(str, buf.shape[1:]))}]")
        if item.shape[1:] != buf.shape[1:]:
            _fail(f"items[{b}] has shape {list(item.shape)} but buffers[{b}] has rows of shape "
                  f"{list(buf.shape[1:])}")
        if item.dtype != buf.dtype:
            _fail(f"items[{b}] has dtype {item.dtype} but buffers[{b}] has dtype {buf.dtype}")
        if item.shape[0] != n:
            _fail(f"items[{b}] has {item.shape[0]} rows but items[0] has {n}; every item must hold the same batch")
        if buf.requires_grad:
            _fail(f"buffers[{b}] requires grad; a memory bank holds constants (create it without "
                  "requires_grad)")
        if item.requires_grad:
            _fail(f"items[{b}] requires grad; the bank stores no graph: push item.detach()")
    return n


def ring_push(buffers: Sequence[torch.Tensor], items: Sequence[torch.Tensor], head: int, filled: int,
              *, backend: _backend.Backend | None = None) -> tuple[int, int]:
    """Push a batch into aligned ring buffers in place; return ``(new_head, new_filled)``.

    Args:
        buffers: tensors ``[capacity, *row_shape_b]``, contiguous, one device, any dtype
            (features fp32/fp16/bf16, {0,1} masks, int64 ids). Modified in place.
        items: one tensor ``[n, *row_shape_b]`` per buffer with the buffer's dtype; may be
            non-contiguous. Only the first ``min(n, capacity)`` rows are kept.
        head, filled: the ring state returned by the previous push (``0, 0`` when empty).

    After any sequence of pushes, :func:`ring_view` equals the reference update
    ``bank = cat((batch, bank))[:capacity]``: newest batch first, rows in order. Cost
    O(n) per push (one kernel launch for all buffers on CUDA), never O(capacity).
    """
    buffers, items = list(buffers), list(items)
    n = check_ring_push_args(buffers, items, head, filled)
    capacity = buffers[0].shape[0]
    if _backend.resolve(_OP, backend, buffers[0].device) == "ext":
        torch.ops.nbretr.ring_push(buffers, items, head)
        _, new_head, new_filled = _ref._ring_arith(n, head, filled, capacity)
        return new_head, new_filled
    return _ref.ring_push(buffers, items, head, filled)


def ring_view(buffers: Sequence[torch.Tensor], head: int, filled: int) -> list[torch.Tensor]:
    """The ``filled`` valid rows of each buffer, newest first, as fresh tensors."""
    return _ref.ring_view(list(buffers), head, filled)


if _backend._ext.ext_loaded():

    @torch.library.register_fake("nbretr::ring_push")
    def _ring_push_fake(buffers, items, head):  # mutates `buffers` in place, returns nothing
        return None
