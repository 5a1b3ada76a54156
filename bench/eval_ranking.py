"""Evaluation ranking before/after the scoring engine: the time to compute the t2v and v2t
metrics (R@K, MdR, MnR) and the hubness table (N_k, k = 10) of generated paired features
(D = 512, texts = videos + noise, L2-normalised), streamed in row blocks of 256 queries x
4,096-item tiles as python -m nbretr.eval does (the score function here is the dot product
instead of WTI, so that a 100k gallery fits in a CPU run).

- before: the ranking of main before the engine, kept below as ``before_stream_ranks``
  (a full ``torch.sort`` of every row block for the top-k, and a comparison pass for the
  ranks); it is the reference, not library code.
- after: :func:`nbretr.scoring.stream` as nbretr.eval calls it (``nbretr.ops.topk_rank`` per
  row block: a bounded top-k and a count per row, no sort; no float64 column sums, which the
  evaluation never reported), with the extension ("auto") and the torch path.

Both must give identical ranks, N_k and metrics (checked before anything is timed). The
last row times the score blocks alone (the dot products, nothing ranked): the floor.

  python bench/eval_ranking.py                       # gallery 1,000 (all queries) and 100,000 (2,000 queries)
  python bench/eval_ranking.py --sizes 100000 --queries 5000
  python bench/eval_ranking.py --threads 1           # one thread: steadier on a shared machine
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import _runner  # noqa: E402

from nbretr import metrics, ops, scoring  # noqa: E402


# -- before: main's retrieval.stream_ranks and helpers, default options only (reference only) ----

def before_topk_rows(block, k):
    vals, idx = torch.sort(block, dim=1, descending=True, stable=True)
    return vals[:, :k], idx[:, :k]


def before_ranks_of(block, rows, targets):
    s = block[rows]
    t = s.gather(1, targets[:, None])
    cols = torch.arange(block.shape[1], device=block.device)[None, :]
    better = (s > t) | ((s == t) & (cols < targets[:, None]))
    return better.sum(1) + 1


def before_stream_ranks(score_fn, num_q, num_g, targets, k, *, q_chunk=256, g_chunk=4096):
    ranks = torch.empty(num_q, dtype=torch.long)
    topk_all = torch.empty(num_q, k, dtype=torch.long)
    counts = torch.zeros(num_g, dtype=torch.long)
    sums = torch.zeros(num_g, dtype=torch.float64)
    for qs, block in scoring._row_blocks(score_fn, num_q, num_g, q_chunk=q_chunk, g_chunk=g_chunk):
        sums += block.double().sum(0)
        _, idx = before_topk_rows(block, k)
        counts += torch.bincount(idx.reshape(-1), minlength=num_g)
        topk_all[qs] = idx.cpu()
        rows, cols = [], []
        for r, q in enumerate(range(qs.start, qs.stop)):
            for t in targets[q]:
                rows.append(r)
                cols.append(t)
        rows_t = torch.tensor(rows, device=block.device)
        r_all = before_ranks_of(block, rows_t, torch.tensor(cols, device=block.device))
        best = torch.full((qs.stop - qs.start,), num_g + 1, dtype=torch.long, device=block.device)
        best.scatter_reduce_(0, rows_t, r_all, reduce="amin")
        ranks[qs] = best.cpu()
    return ranks, topk_all, counts


# -- the measured task -----------------------------------------------------------------------------

def features(n: int, d: int = 512, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    v = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    t = torch.nn.functional.normalize(v + 6.0 * torch.randn(n, d, generator=g) / d ** 0.5, dim=-1)
    return t, v


def dot_fn(q, g):
    return lambda qs, gs: q[qs] @ g[gs].T


def evaluate(path: str, texts, vids, n_q: int, k: int = 10):
    """t2v and v2t metrics + hubness of the first n_q queries against the whole gallery."""
    G = vids.shape[0]
    out = {}
    for name, q, g in (("t2v", texts, vids), ("v2t", vids, texts)):
        targets = [[i] for i in range(n_q)]
        if path == "blocks":                        # the floor: the score blocks alone, nothing ranked
            fn = dot_fn(q, g)
            for q0 in range(0, n_q, 256):
                for g0 in range(0, G, 4096):
                    fn(slice(q0, min(q0 + 256, n_q)), slice(g0, min(g0 + 4096, G)))
            continue
        if path == "before":
            ranks, _, counts = before_stream_ranks(dot_fn(q, g), n_q, G, targets, k)
        else:
            st = scoring.stream(dot_fn(q, g), n_q, G, targets, k, sums=False, backend=path)   # as nbretr.eval
            ranks, counts = st.ranks, st.counts
        out[name] = {**metrics.retrieval_metrics(ranks), "hubness": metrics.hubness(counts, k, n_q),
                     "_ranks": ranks, "_counts": counts}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1000,100000", help="gallery sizes (default 1000,100000)")
    p.add_argument("--queries", type=int, default=2000,
                   help="queries per direction for galleries above 10k (default 2000; smaller galleries use all)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per case (median; default 3)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's; 1 gives steadier figures on a shared machine)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        texts, vids = features(n)
        n_q = n if n <= 10_000 else min(n, args.queries)
        ref = evaluate("before", texts, vids, n_q)
        for path in ("auto", "torch"):
            got = evaluate(path, texts, vids, n_q)
            for d in ("t2v", "v2t"):
                assert torch.equal(got[d]["_ranks"], ref[d]["_ranks"]), (n, path, d)
                assert torch.equal(got[d]["_counts"], ref[d]["_counts"]), (n, path, d)
        base = None
        for label, path in (("before (full sort per row block)", "before"),
                            ("after: engine, extension", "auto"), ("after: engine, torch path", "torch"),
                            ("score blocks only (the floor)", "blocks")):
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                evaluate(path, texts, vids, n_q)
                times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            base = med if base is None else base
            rows.append({"gallery": n, "queries_per_direction": n_q, "path": label, "seconds": med,
                         "speedup": base / med})
            print(f"gallery {n:>7}  queries {n_q:>6}  {label:<34} {med:9.3f} s  {base / med:6.2f}x", flush=True)
    info = {"machine": _runner.machine(), "commit": _runner.git_commit(),
            "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "extension": ops._backend._ext.ext_loaded(), "rows": rows,
            "metrics_t2v_R1_last": ref["t2v"]["R1"]}
    print(json.dumps({k: v for k, v in info.items() if k != "rows"}))
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
