"""``ring_push`` / ``ring_view``: the in-place circular memory-bank update (docs/operators.md)."""
from __future__ import annotations

from typing import Sequence

import torch

from nbretr.ops import _backend
from nbretr.ops._checks import check_ring_push_args, check_ring_push_extra
from nbretr.ops.reference import ring as _ref

__all__ = ["ring_push", "ring_view"]

_OP = "ring_push"


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
    if not buffers:
        check_ring_push_args(buffers, items, head, filled)  # raises: no device to resolve
    if _backend.resolve(_OP, backend, buffers[0].device) == "ext":
        check_ring_push_extra(buffers, items, filled)  # the rest is checked in C++
        torch.ops.nbretr.ring_push(buffers, items, head)
        _, new_head, new_filled = _ref._ring_arith(items[0].shape[0], head, filled, buffers[0].shape[0])
        return new_head, new_filled
    check_ring_push_args(buffers, items, head, filled)
    return _ref.ring_push(buffers, items, head, filled)


def ring_view(buffers: Sequence[torch.Tensor], head: int, filled: int) -> list[torch.Tensor]:
    """The ``filled`` valid rows of each buffer, newest first, as fresh tensors."""
    return _ref.ring_view(list(buffers), head, filled)


if _backend._ext.ext_loaded():

    @torch.library.register_fake("nbretr::ring_push")
    def _ring_push_fake(buffers, items, head):  # mutates `buffers` in place, returns nothing
        check_ring_push_args(buffers, items, head)
        return None
