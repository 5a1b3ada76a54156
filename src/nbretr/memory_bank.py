"""The memory bank of NeighborRetr (docs/method.md, "Memory bank") on ``ring_push``.

At each epoch start the bank is refilled from ``mb_batch`` encoded batches
(:meth:`MemoryBank.fill`); after every step the step's batch is pushed
(:meth:`MemoryBank.push`), oldest entries dropped. The reference does
``cat((batch, bank))[:capacity]`` per field per step; this writes the batch in place.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch

from nbretr import ops



class MemoryBank:
    """Aligned ring buffers of named fields with a fixed capacity.

    Default fields (``MemoryBank.for_features``): ``text [C, L, D]`` (float),
    ``text_mask [C, L]``, ``video [C, F, D]`` (float), ``video_mask [C, F]``, ``ids [C]``
    (int64 sample indices). Any other set of fields can be given as a dict of
    ``name -> (row_shape, dtype)``.

    ``view()`` returns the rows newest first (equal to the reference's concatenate-and-
    slice bank); ``fields()`` returns the valid rows in storage order without copying when
    the bank is full, for order-free consumers (similarities, centrality means).
    """

    def __init__(self, capacity: int, fields: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                 device: torch.device | str = "cpu", *, backend: ops.Backend | None = None):
        if capacity < 1:
            raise ValueError(f"MemoryBank: capacity must be >= 1, got {capacity}")
        if not fields:
            raise ValueError("MemoryBank: fields must name at least one field")
        self.capacity = int(capacity)
        self.backend = backend
        self._buffers: dict[str, torch.Tensor] = {
            name: torch.zeros((self.capacity, *shape), dtype=dtype, device=device)
            for name, (shape, dtype) in fields.items()
        }
        self.head = 0
        self.filled = 0

    @classmethod
    def for_features(cls, capacity: int, max_words: int, max_frames: int, dim: int,
                     dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                     mask_dtype: torch.dtype = torch.long, **kw) -> "MemoryBank":
        """The bank of docs/method.md: token-level text/video features, masks, sample ids."""
        return cls(capacity, {
            "text": ((max_words, dim), dtype),
            "text_mask": ((max_words,), mask_dtype),
            "video": ((max_frames, dim), dtype),
            "video_mask": ((max_frames,), mask_dtype),
            "ids": ((), torch.long),
        }, device, **kw)

    # -- state -------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._buffers)

    @property
    def device(self) -> torch.device:
        return next(iter(self._buffers.values())).device

    def __len__(self) -> int:
        return self.filled

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}={list(v.shape[1:])}:{str(v.dtype).replace('torch.', '')}"
                           for k, v in self._buffers.items())
        return f"MemoryBank(capacity={self.capacity}, filled={self.filled}, {shapes}, device={self.device})"

    def reset(self) -> None:
        self.head = 0
        self.filled = 0

    # -- updates -----------------------------------------------------------------------
    def push(self, batch: Mapping[str, torch.Tensor]) -> None:
        """Push one batch (a dict with every field, same batch length): newest first.
        Tensors are detached and cast to the field's dtype and device."""
        missing = [k for k in self._buffers if k not in batch]
        extra = [k for k in batch if k not in self._buffers]
        if missing or extra:
            raise KeyError(f"MemoryBank.push: batch fields {sorted(batch)} do not match the bank's "
                           f"{self.names} (missing {missing}, unexpected {extra})")
        bufs = list(self._buffers.values())
        items = [batch[k].detach().to(device=b.device, dtype=b.dtype) for k, b in self._buffers.items()]
        self.head, self.filled = ops.ring_push(bufs, items, self.head, self.filled, backend=self.backend)

    def fill(self, batches: Iterable[Mapping[str, torch.Tensor]]) -> None:
        """Empty the bank, then push each batch in turn (the start-of-epoch refill)."""
        self.reset()
        for batch in batches:
            self.push(batch)

    # -- reads -------------------------------------------------------------------------
    def view(self) -> dict[str, torch.Tensor]:
        """Every field's valid rows, newest first (fresh tensors)."""
        rows = ops.ring_view(list(self._buffers.values()), self.head, self.filled)
        return dict(zip(self._buffers, rows))

    def fields(self) -> dict[str, torch.Tensor]:
        """Every field's valid rows in storage order: the buffers themselves (no copy) when
        the bank is full, else a copy. For consumers that do not depend on row order."""
        if self.filled == self.capacity:
            return dict(self._buffers)
        return self.view()

    # -- persistence ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, object]:
        return {"capacity": self.capacity, "head": self.head, "filled": self.filled,
                "buffers": {k: v.clone() for k, v in self._buffers.items()}}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        bufs = state["buffers"]
        if int(state["capacity"]) != self.capacity or set(bufs) != set(self._buffers):
            raise ValueError(
                f"MemoryBank.load_state_dict: saved bank has capacity {state['capacity']} and fields "
                f"{sorted(bufs)}, this one capacity {self.capacity} and fields {sorted(self._buffers)}")
        for k, v in bufs.items():
            if v.shape != self._buffers[k].shape or v.dtype != self._buffers[k].dtype:
                raise ValueError(f"MemoryBank.load_state_dict: field {k!r} is {list(v.shape)} {v.dtype}, "
                                 f"expected {list(self._buffers[k].shape)} {self._buffers[k].dtype}")
            self._buffers[k].copy_(v)
        self.head, self.filled = int(state["head"]), int(state["filled"])

    def to(self, device: torch.device | str) -> "MemoryBank":
        """Move the bank to ``device`` (in place; returns self)."""
        self._buffers = {k: v.to(device) for k, v in self._buffers.items()}
        return self
