"""topk_centrality (sim="dot"): extension vs torch path vs faiss-cpu (IndexFlatIP search
plus np.bincount counting), next to the bare chunked matrix product (the same tiles, no
selection), so the overhead of selection and counting is visible. Q = G = N, D = 512,
k = 10 and 100, fp32 and bf16.

Targets (docs/operators.md): CPU no slower than the torch path or faiss, within 1.15x of the bare
matrix product; GPU within 1.5x of the bare tiled product.

  python bench/topk_centrality.py                 # CPU default: N = 10k, 20k
  python bench/topk_centrality.py --sizes 50000   # one size
  python bench/topk_centrality.py --device cuda   # GPU default: N = 200k (fp32, bf16), 1M (bf16)
  python bench/topk_centrality.py --sizes 100000 --untiled --no-torch --no-faiss --ks 10 --dtypes float32
      # with the untiled formulation (q @ g.T, then topk: the reference code's), which
      # holds the whole Q x G matrix and fails where it does not fit
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import _runner  # noqa: E402

from nbretr import ops  # noqa: E402
from nbretr.ops.reference import dot_tile_fn  # noqa: E402
from nbretr.ops.reference.topk import TILE_ELEMS  # noqa: E402

try:
    import faiss  # noqa: E402
except ImportError:  # pragma: no cover
    faiss = None



def kernel_tiles(device: str, G: int) -> tuple[int, int]:
    """The extension's default (query chunk, gallery tile) on the device
    (csrc/common/topk_tiles.h, reported by nbretr._C.topk_tiles); without the extension,
    the torch path's (src/nbretr/ops/reference/topk.py)."""
    if ops._backend._ext.ext_loaded():
        import nbretr._C as ext
        return tuple(ext.topk_tiles["cuda" if device.startswith("cuda") else "cpu"])
    g_tile = max(1, min(G, TILE_ELEMS // 256))
    return max(1, TILE_ELEMS // g_tile), g_tile


def bare_mm(q, g, device):
    """The chunked matrix product alone, same tiles and casts as the extension."""
    qc, gt = kernel_tiles(device, g.shape[0])
    tile = dot_tile_fn(q, g)
    Q, G = q.shape[0], g.shape[0]

    def run():
        for q0 in range(0, Q, qc):
            for g0 in range(0, G, gt):
                tile(q0, min(Q, q0 + qc), g0, min(G, g0 + gt))
    return run


def untiled(q, g, k):
    """The reference code's formulation: the whole [Q, G] similarity matrix, then topk."""
    def run():
        s = q.float() @ g.float().T
        v, i = s.topk(k, dim=1)
        return v, i, torch.bincount(i.flatten(), minlength=g.shape[0]), s.sum(0, dtype=torch.float64)
    return run


def check(q, g, k, device, use_faiss):
    """Correctness first: ext, torch and faiss agree (faiss way) on the first rows."""
    sub = q[:256]
    ref_v, ref_i, _, _ = ops.topk_centrality(sub, g, k, backend="torch")
    outs = {}
    if ops._backend.ext_supports(torch.device(device))[0]:
        v, i, _, _ = ops.topk_centrality(sub, g, k, backend="ext")
        outs["ext"] = (v, i)
    if use_faiss:
        index = faiss.IndexFlatIP(g.shape[1])
        index.add(g.float().cpu().numpy())
        D, I = index.search(sub.float().cpu().numpy(), k)
        outs["faiss"] = (torch.from_numpy(D), torch.from_numpy(I))
    for name, (v, i) in outs.items():
        v, i = v.to(ref_v.device), i.to(ref_v.device)
        torch.testing.assert_close(v, ref_v, rtol=0, atol=1e-3, msg=f"{name} values")
        assert all(len(set(r)) == len(r) for r in i.tolist()), name


def main() -> int:
    p = _runner.arg_parser(__doc__)
    p.add_argument("--sizes", type=_runner.int_list, default=None, help="comma-separated N (Q = G = N)")
    p.add_argument("--ks", type=_runner.int_list, default="10,100")
    p.add_argument("--dtypes", type=_runner.dtype_list, default="float32,bfloat16")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--time-cap", type=float, default=float("inf"),
                   help="seconds; skip the remaining cases once the sweep has run this long")
    p.add_argument("--no-torch", action="store_true", help="skip the torch path (slow at large N)")
    p.add_argument("--no-faiss", action="store_true", help="skip faiss (slow at large N)")
    p.add_argument("--untiled", action="store_true",
                   help="also time the untiled formulation (the whole Q x G matrix, then topk); "
                        "where it does not fit, its row says so")
    p.add_argument("--fp32-max", type=int, default=None,
                   help="time float32 only up to this N (larger N: the half-precision dtypes only)")
    p.add_argument("--cuda-rounds", type=int, default=None,
                   help="the topk_cuda_rounds kernel setting (default 16; 1: the P-column rounds as first measured)")
    p.set_defaults(repeats=2)
    args = p.parse_args()
    if args.cuda_rounds is not None:
        ops.set_kernel_settings(topk_cuda_rounds=args.cuda_rounds)
    dev = args.device
    on_gpu = dev.startswith("cuda")
    if args.sizes:
        sizes = args.sizes
    elif args.quick:
        sizes = [2000]
    else:
        sizes = [200000, 1000000] if on_gpu else [10000, 20000]
        if on_gpu and args.fp32_max is None:
            args.fp32_max = 200000
    ks = args.ks
    dtypes = [getattr(torch, d) for d in args.dtypes]
    has_ext = ops._backend.ext_supports(torch.device(dev))[0]
    results: list[_runner.Result] = []
    t_start = time.perf_counter()
    torch.manual_seed(0)
    if faiss is not None and not on_gpu:
        faiss.omp_set_num_threads(torch.get_num_threads())
    skipped = []
    for N in sizes:
        base = torch.nn.functional.normalize(torch.randn(N, args.dim, device=dev), dim=1)
        q32 = base
        g32 = torch.nn.functional.normalize(base + 0.5 * torch.randn_like(base), dim=1)
        for dtype in dtypes:
            dname = str(dtype).replace("torch.", "")
            if dtype == torch.float32 and args.fp32_max is not None and N > args.fp32_max:
                skipped.append(f"N={N} {dname} (--fp32-max)")
                continue
            q, g = q32.to(dtype), g32.to(dtype)
            if time.perf_counter() - t_start > args.time_cap:
                skipped.append(f"N={N} {dname}")
                continue
            params = dict(N=N, D=args.dim, dtype=dname)
            results.append(_runner.run_case("topk", "bare mm", params, bare_mm(q, g, dev), dev, warmup=1,
                                            repeats=args.repeats))
            for k in ks:
                if time.perf_counter() - t_start > args.time_cap:
                    skipped.append(f"N={N} {dname} k={k}")
                    continue
                use_faiss = faiss is not None and not on_gpu and not args.no_faiss
                check(q, g, k, dev, use_faiss)
                pk = dict(params, k=k)
                # bare mm is k-independent: repeat its row per k for the table
                bare = results[-1] if results[-1].impl == "bare mm" else next(
                    r for r in reversed(results) if r.impl == "bare mm" and r.params == params)
                results.append(_runner.Result("topk", "bare mm", pk, bare.ms, bare.peak_mb))
                if has_ext:
                    results.append(_runner.run_case(
                        "topk", "ext", pk, lambda: ops.topk_centrality(q, g, k, backend="ext"), dev, warmup=1,
                        repeats=args.repeats))
                if not args.no_torch:
                    results.append(_runner.run_case(
                        "topk", "torch path", pk, lambda: ops.topk_centrality(q, g, k, backend="torch"), dev,
                        warmup=1, repeats=args.repeats))
                if args.untiled:
                    results.append(_runner.run_case("topk", "untiled torch", pk, untiled(q, g, k), dev, warmup=0,
                                                    repeats=1, extra={"matrix_gb": N * N * 4 / 1e9}))
                if use_faiss:
                    import numpy as np
                    gn = g.float().numpy()
                    qn = q.float().numpy()

                    def run_faiss():
                        index = faiss.IndexFlatIP(args.dim)
                        index.add(gn)
                        _, I = index.search(qn, k)
                        return np.bincount(I.ravel(), minlength=N)
                    results.append(_runner.run_case("topk", "faiss IndexFlatIP", pk, run_faiss, dev, warmup=1,
                                                    repeats=args.repeats,
                                                    extra={"note": "fp32 copy for bf16; no sums"}))
            del q, g
    results = [r for r in results if "k" in r.params]
    print(_runner.table(results, "bare mm", f"topk_centrality dot ({dev}); speedup = bare mm time / impl time"))
    print("\nratio to the bare matrix product (target: CPU <= 1.15, GPU <= 1.5):")
    for r in results:
        if r.impl == "bare mm":
            continue
        bare = next(b for b in results if b.impl == "bare mm" and b.params == r.params)
        print(f"  N={r.params['N']:>7} k={r.params['k']:>4} {r.params['dtype']:<9} {r.impl:<18} "
              f"{r.ms / bare.ms:6.2f}x bare")
    for r in results:
        if r.impl == "untiled torch" and r.ms == float("inf"):
            print(f"  N={r.params['N']:>7} untiled torch: cannot hold its {r.extra['matrix_gb']:.1f} GB "
                  f"[Q, G] matrix on this machine; the extension ran this size (rows above)")
    if skipped:
        print(f"\nskipped (--time-cap {args.time_cap:g}s, --fp32-max): {', '.join(skipped)}")
    _runner.write_json(results, args.out, "topk_centrality")
    return 0


if __name__ == "__main__":
    _runner.main_guard(main)
