"""WTI token-wise similarity: the extension vs the torch path (the reference's einsum
over a [Bt, Bv, L, F] tensor). Forward and forward+backward at the training shapes
(128 x 128 and 128 x 1,920 pairs, L=32, F=12, D=512) and the evaluation shape
(1,000 x 1,000, forward only, no grad), fp32 and bf16. Targets (docs/operators.md): CPU >= 2x
faster and >= 10x less peak memory; GPU >= 5x and >= 10x. On CUDA the extension's two
implementations are timed: "ext" (tiled, the default) and "ext fused" (kernel setting
wti_cuda="fused").
Masks keep each token with probability 0.75 (the first always). The CPU kernel leaves
masked tokens out of its products; "ext keep-all" (wti_cpu_compact=False) computes
every token's, as it would for inputs without padding."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as Fn

sys.path.insert(0, str(Path(__file__).parent))
import _runner  # noqa: E402

from nbretr import ops  # noqa: E402


def make_side(B, L, D, dtype, device, gen):
    x = Fn.normalize(torch.randn(B, L, D, generator=gen), dim=-1).to(dtype).to(device)
    m = torch.rand(B, L, generator=gen) > 0.25
    m[:, 0] = True
    w = torch.randn(B, L, generator=gen).masked_fill(~m, float("-inf")).softmax(-1).to(device)
    return x, m.long().to(device), w


def select(name: str) -> str:
    """The backend for a timed implementation ("torch", "ext", "ext fused", "ext keep-all");
    the two CUDA implementations of the extension are chosen by the kernel setting wti_cuda,
    whether the CPU kernel drops masked tokens by wti_cpu_compact (docs/configuration.md)."""
    ops.set_kernel_settings(wti_cuda="fused" if name == "ext fused" else "tiled",
                            wti_cpu_compact=name != "ext keep-all")
    return "ext" if name.startswith("ext") else name


def main() -> int:
    p = _runner.arg_parser(__doc__)
    p.add_argument("--dtypes", type=_runner.dtype_list, default="float32,bfloat16")
    p.add_argument("--no-eval", action="store_true", help="skip the 1,000 x 1,000 evaluation shape")
    args = p.parse_args()
    dev = args.device
    has_ext = ops._backend.ext_supports(torch.device(dev))[0]
    L, F, D = (32, 12, 512) if not args.quick else (8, 4, 64)
    train = [(128, 128), (128, 1920)] if not args.quick else [(16, 16), (16, 96)]
    evals = [] if args.no_eval else ([(1000, 1000)] if not args.quick else [(64, 64)])
    gen = torch.Generator().manual_seed(0)
    results = []
    impls = ["torch"] + (["ext"] if has_ext else [])
    impls += (["ext fused"] if dev.startswith("cuda") else ["ext keep-all"]) if has_ext else []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        cases = [(bt, bv, True) for bt, bv in train] + [(bt, bv, False) for bt, bv in evals]
        for bt, bv, with_grad in cases:
            t, mt, wt = make_side(bt, L, D, dtype, dev, gen)
            v, mv, wv = make_side(bv, F, D, dtype, dev, gen)
            gout = torch.randn(bt, bv, generator=gen).to(dev)
            # correctness first: ext vs torch path in fp32 on the same inputs
            if has_ext and bt * bv <= 128 * 1920:
                up = [a.float() if a.is_floating_point() else a for a in (t, mt, wt, v, mv, wv)]
                want = ops.wti_similarity(*up, backend="torch")
                for name in impls[1:]:
                    got = ops.wti_similarity(t, mt, wt, v, mv, wv, backend=select(name))
                    tol = 1e-4 if dtype == torch.float32 else 3e-2
                    err = (got - want).abs().max().item()
                    assert err < tol, f"{name} differs from the torch path by {err} at {bt}x{bv} {dtype_name}"
            params = dict(Bt=bt, Bv=bv, L=L, F=F, D=D, dtype=dtype_name)
            flop = 2.0 * bt * bv * L * F * D
            for name in impls:
                impl = select(name)

                def fwd(impl=impl):
                    with torch.no_grad():
                        return ops.wti_similarity(t, mt, wt, v, mv, wv, backend=impl)

                results.append(_runner.run_case(f"fwd {bt}x{bv}", name, params, fwd, dev, warmup=1,
                                                repeats=args.repeats, extra={"gflop": flop / 1e9}))
                if with_grad:
                    tg, wtg, vg, wvg = (x.detach().clone().requires_grad_(True) for x in (t, wt, v, wv))

                    def fwd_bwd(impl=impl, tg=tg, wtg=wtg, vg=vg, wvg=wvg):
                        s = ops.wti_similarity(tg, mt, wtg, vg, mv, wvg, backend=impl)
                        return torch.autograd.grad(s, (tg, wtg, vg, wvg), gout)

                    results.append(_runner.run_case(f"fwd+bwd {bt}x{bv}", name, params, fwd_bwd, dev, warmup=1,
                                                    repeats=args.repeats, extra={"gflop": 3 * flop / 1e9}))
        print(_runner.table([r for r in results if r.params["dtype"] == dtype_name], "torch",
                            f"wti_similarity ({dev}, {dtype_name}, L={L}, F={F}, D={D})"), flush=True)
    _runner.write_json(results, args.out, "wti_similarity")
    return 0


if __name__ == "__main__":
    _runner.main_guard(main)
