"""Ring buffer, pure PyTorch (docs/operators.md)."""
from __future__ import annotations

import torch


def _ring_arith(n: int, head: int, filled: int, capacity: int) -> tuple[int, int, int]:
    """(kept, new_head, new_filled); mirrors csrc/common/ring.h."""
    kept = min(n, capacity)
    new_head = (head - kept) % capacity
    return kept, new_head, min(filled + kept, capacity)


def ring_push(buffers: list[torch.Tensor], items: list[torch.Tensor], head: int, filled: int) -> tuple[int, int]:
    """Write every item's first min(n, capacity) rows into its buffer (in place), with
    one ``index_copy_`` per buffer. Argument checks are done by the public wrapper."""
    capacity = buffers[0].shape[0]
    n = items[0].shape[0]
    kept, new_head, new_filled = _ring_arith(n, head, filled, capacity)
    if kept:
        idx = (torch.arange(kept, device=buffers[0].device) + new_head) % capacity
        for buf, item in zip(buffers, items):
            buf.index_copy_(0, idx, item[:kept])
    return new_head, new_filled


def ring_view(buffers: list[torch.Tensor], head: int, filled: int) -> list[torch.Tensor]:
    """The rows newest-first (fresh tensors; the buffers are not aliased)."""
    out = []
    for buf in buffers:
        capacity = buf.shape[0]
        end = head + filled
        if end <= capacity:
            out.append(buf[head:end].clone())
        else:
            out.append(torch.cat((buf[head:], buf[: end - capacity])))
    return out


def cat_slice_push(bank: list[torch.Tensor], items: list[torch.Tensor], capacity: int) -> list[torch.Tensor]:
    """The reference implementation's update, ``cat((batch, bank))[:capacity]``: a full
    copy of the bank per push. The semantics ring_push/ring_view must reproduce."""
    return [torch.cat((item, b))[:capacity] for item, b in zip(items, bank)]
