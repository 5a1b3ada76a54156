"""Log-domain Sinkhorn: sinkhorn_log (extension) vs the torch loop (the reference's 50
logsumexp iterations, batched) vs POT's ``ot.bregman.sinkhorn_log`` (one call per problem,
forward only). Shapes: the training shape 2 x 128 x 128, a batch of 64 x 128 x 128 and one
4,096 x 4,096 problem, 50 iterations each; forward and forward+backward.
Targets (docs/operators.md): CPU >= 3x the torch loop; GPU >= 50x at the training shape, 5x at 4,096^2."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import _runner  # noqa: E402

from nbretr import ops  # noqa: E402


def main() -> int:
    p = _runner.arg_parser(__doc__)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--no-large", action="store_true", help="skip the 4,096 x 4,096 problem")
    args = p.parse_args()
    dev = args.device
    shapes = [(2, 128, 128), (64, 128, 128)] + ([] if args.no_large else [(1, 4096, 4096)])
    if args.quick:
        shapes = [(2, 32, 32), (8, 32, 32), (1, 256, 256)]
    have_ext = ops._backend.ext_supports(torch.device(dev))[0]
    try:
        import ot
    except ImportError:
        ot = None
    results = []
    for B, M, N in shapes:
        big = M * N >= 4096 * 4096
        reps = 1 if (big and dev == "cpu") else args.repeats
        warm = 1 if (big and dev == "cpu") else 2
        params = dict(B=B, M=M, N=N, iters=args.iters)
        scores = torch.randn(B, M, N, device=dev)
        W = torch.randn(B, M, N, device=dev)
        # correctness first: ext equals the torch loop
        if have_ext:
            got = ops.sinkhorn_log(scores, n_iters=args.iters, backend="ext")
            ref = ops.sinkhorn_log(scores, n_iters=args.iters, backend="torch")
            for g, r in zip(got[:3], ref[:3]):
                torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)

        impls = ["torch"] + (["ext"] if have_ext else [])
        for impl in impls:
            def fwd(impl=impl):
                with torch.no_grad():
                    return ops.sinkhorn_log(scores, n_iters=args.iters, backend=impl)

            results.append(_runner.run_case("forward", impl, params, fwd, dev, warmup=warm, repeats=reps,
                                            memory=not (big and dev == "cpu")))
        if ot is not None:
            a = torch.full((M,), 1.0 / (M + N), device=dev)
            b = torch.full((N,), 1.0 / (M + N), device=dev)

            def pot():
                return [ot.bregman.sinkhorn_log(a, b, -scores[k], reg=1.0, numItermax=args.iters, stopThr=0.0)
                        for k in range(B)]

            results.append(_runner.run_case("forward", "POT sinkhorn_log", params, pot, dev, warmup=warm,
                                            repeats=reps, memory=False))
        for impl in impls:
            if impl == "torch" and big and dev == "cpu":
                continue  # the autograd graph of 50 iterations at 4,096^2: ~10 GB of saved tensors

            def fwd_bwd(impl=impl):
                s = scores.clone().requires_grad_(True)
                log_plan = ops.sinkhorn_log(s, n_iters=args.iters, backend=impl)[0]
                (log_plan.exp() * W).sum().backward()
                return s.grad

            results.append(_runner.run_case("forward+backward", impl, params, fwd_bwd, dev, warmup=warm,
                                            repeats=reps, memory=not (big and dev == "cpu")))
    print(_runner.table(results, "torch", f"sinkhorn_log ({dev}, float32, {args.iters} iterations)"))
    _runner.write_json(results, args.out, "sinkhorn")
    return 0


if __name__ == "__main__":
    _runner.main_guard(main)
