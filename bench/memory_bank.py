"""Memory-bank update: ring_push (extension, torch ring path) vs the reference's
concatenate-and-slice, at bank 1,280 and 1,920 entries, batch 128
(text 32x512, video 12x512, masks, ids). Target (docs/operators.md): >= 5x cat+slice."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import _runner  # noqa: E402

from nbretr import ops  # noqa: E402
from nbretr.ops.reference import cat_slice_push  # noqa: E402


def make(capacity, batch, L, F, D, dtype, device):
    bank = [torch.randn(capacity, L, D, device=device).to(dtype), torch.ones(capacity, L, dtype=torch.long, device=device),
            torch.randn(capacity, F, D, device=device).to(dtype), torch.ones(capacity, F, dtype=torch.long, device=device),
            torch.arange(capacity, device=device)]
    items = [torch.randn(batch, L, D, device=device).to(dtype), torch.ones(batch, L, dtype=torch.long, device=device),
             torch.randn(batch, F, D, device=device).to(dtype), torch.ones(batch, F, dtype=torch.long, device=device),
             torch.arange(batch, device=device)]
    return bank, items


def main() -> int:
    p = _runner.arg_parser(__doc__)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = p.parse_args()
    dev, dtype = args.device, getattr(torch, args.dtype)
    L, F, D, batch = (32, 12, 512, 128) if not args.quick else (8, 4, 32, 16)
    caps = (1280, 1920) if not args.quick else (64, 96)
    results = []
    for cap in caps:
        params = dict(capacity=cap, batch=batch, L=L, F=F, D=D, dtype=args.dtype)
        bank, items = make(cap, batch, L, F, D, dtype, dev)
        # correctness first: both ring paths reproduce cat+slice over a few pushes
        ref = [b.clone() for b in bank]
        for backend in ("ext", "torch"):
            if backend == "ext" and not ops._backend.ext_supports(torch.device(dev))[0]:
                continue
            bufs = [b.clone() for b in bank]
            r = [b.clone() for b in ref]
            head, filled = 0, cap  # physical order == logical order at head 0
            for _ in range(3):
                head, filled = ops.ring_push(bufs, items, head, filled, backend=backend)
                r = cat_slice_push(r, items, cap)
            assert all(torch.equal(a, b) for a, b in zip(ops.ring_view(bufs, head, filled), r)), backend

        state = {"bank": [b.clone() for b in bank]}

        def cat_slice():
            state["bank"] = cat_slice_push(state["bank"], items, cap)

        results.append(_runner.run_case("bank update", "cat+slice", params, cat_slice, dev, repeats=args.repeats))
        for backend in ("torch", "ext"):
            if backend == "ext" and not ops._backend.ext_supports(torch.device(dev))[0]:
                continue
            bufs = [b.clone() for b in bank]
            ring = {"head": 0, "filled": cap}

            def push(bufs=bufs, ring=ring, backend=backend):
                ring["head"], ring["filled"] = ops.ring_push(bufs, items, ring["head"], ring["filled"], backend=backend)

            results.append(_runner.run_case("bank update", f"ring_push[{backend}]", params, push, dev,
                                            repeats=args.repeats))
    print(_runner.table(results, "cat+slice", f"memory bank update ({dev}, {args.dtype})"))
    _runner.write_json(results, args.out, "memory_bank")
    return 0


if __name__ == "__main__":
    _runner.main_guard(main)
