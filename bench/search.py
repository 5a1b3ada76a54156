"""Search latency and peak memory for galleries of 10k, 100k and 1M videos (generated
features), nbretr's two-stage search against brute-force torch and faiss-cpu.

Each gallery is an index folder written by ``nbretr.gallery.create_index`` with the shapes
of a ViT-B model: global tokens [N, 512] float32, frame tokens [N, 12, 512] float16
(``nbretr.index --dtype float16``), masks, weights; shards of 65,536 videos. Queries are
perturbed gallery items (so the first stage has a true neighbour to find), 24 tokens.

Methods (each in a fresh process, so peak memory is its own):

- ``nbretr``: ``Retriever(first_stage="exact")``, the shipped path: ``topk_centrality`` over
  the memory-mapped shards with a running top-100, then ``wti_similarity`` over the 100
  candidates read from the shards;
- ``nbretr-mem``: the same with ``preload=True`` (global tokens held in memory, like the
  baselines; the frame tokens stay mapped);
- ``nbretr-ext``: the same with the first stage forced onto the CPU kernel
  (``backend="ext"``; ``nbretr`` takes the op's torch path for fewer than 64 queries);
- ``nbretr-ivf``: the same with the first stage through the faiss IVF index that
  ``nbretr.index`` builds from 200k videos (built here; its build time is reported);
- ``torch``: brute force, the global tokens loaded into memory, ``q @ G.T`` then
  ``torch.topk`` (first stage only; the re-ranking is the same for every method);
- ``faiss-flat``: faiss-cpu ``IndexFlatIP`` over the global tokens in memory (first stage).

Reported per query (one query at a time, median of ``--queries``): first-stage latency,
total latency (first stage + re-ranking, nbretr methods), recall of the exact top-100 (the
approximate IVF), the setup time (loading or building), and peak memory: anonymous (heap)
and file-backed resident pages (the mapped shards; the kernel may drop them under
pressure), sampled every 2 ms from /proc/self/status.

  python bench/search.py                              # 10k, 100k, 1M (writes about 14 GB at 1M)
  python bench/search.py --sizes 10000 --queries 5    # quick
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import _runner  # noqa: E402

D, FR, L, SHARD, DEPTH, K = 512, 12, 24, 65536, 100, 10


def _status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("RssAnon", "RssFile", "VmHWM"):
            out[k] = int(v.split()[0]) * 1024
    return out


class PeakMemory:
    """Peak RssAnon and RssFile of this process while inside (sampled every 2 ms)."""

    def __enter__(self):
        self.peak = _status()
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop:
            s = _status()
            for k in ("RssAnon", "RssFile"):
                self.peak[k] = max(self.peak[k], s[k])
            time.sleep(0.002)

    def __exit__(self, *a):
        self._stop = True
        self._t.join()


def make_gallery(path: Path, n: int, seed: int = 0) -> None:
    from tqdm import tqdm

    from nbretr import gallery as G
    if (path / G.MANIFEST).exists():
        return

    def shards():
        g = torch.Generator().manual_seed(seed)
        for s0 in tqdm(range(0, n, SHARD), desc=f"generate {n}", unit="shard"):
            m = min(SHARD, n - s0)
            glob = torch.randn(m, D, generator=g)
            tok = F.normalize(torch.randn(m, FR, D, generator=g), dim=-1).half()
            mask = torch.ones(m, FR, dtype=torch.uint8)
            mask[::4, 8:] = 0
            w = torch.softmax(torch.randn(m, FR, generator=g).masked_fill(mask == 0, -1e9), 1) * mask
            yield {"global": glob, "tokens": tok, "mask": mask, "weight": w}
    G.create_index(path, shards())


def queries(path: Path, q: int, seed: int = 1) -> dict:
    from nbretr import gallery as G
    gal = G.Gallery(path)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, len(gal), (q,), generator=g)
    base = torch.stack([gal.shard(int(i) // SHARD)["global"][int(i) % SHARD] for i in pick]).float()
    mask = torch.ones(q, L, dtype=torch.long)
    mask[:, 12:] = 0
    return {"global": base + 0.5 * torch.randn(q, D, generator=g),
            "tokens": F.normalize(torch.randn(q, L, D, generator=g), dim=-1), "mask": mask,
            "weight": torch.softmax(torch.randn(q, L, generator=g).masked_fill(mask == 0, -1e9), 1) * mask}


def worker(method: str, path: Path, nq: int) -> dict:
    from nbretr import gallery as G
    from nbretr.search import Retriever
    q = queries(path, nq)
    res: dict = {"method": method}
    t0 = time.perf_counter()
    with PeakMemory() as mem:
        first, total, cands = [], [], []
        if method in ("nbretr", "nbretr-ivf", "nbretr-ext", "nbretr-mem"):
            if method == "nbretr-ivf":
                import faiss

                from nbretr.index import build_faiss_ivf
                tb = time.perf_counter()
                ivf = build_faiss_ivf(G.Gallery(path))
                faiss.write_index(ivf, str(path / "faiss.ivf"))
                m = G.read_manifest(path)
                m["faiss"] = {"file": "faiss.ivf", "items": ivf.ntotal, "nlist": int(ivf.nlist),
                              "sha256": G.file_sha256(path / "faiss.ivf")}
                G.write_manifest(path, m)
                res["build_s"] = time.perf_counter() - tb
                del ivf
            r = Retriever(path, load_model=False, first_stage="faiss" if method == "nbretr-ivf" else "exact",
                          depth=DEPTH, backend="ext" if method == "nbretr-ext" else None,
                          preload=method == "nbretr-mem")
            res["setup_s"] = time.perf_counter() - t0
            for i in range(nq):
                qi = {k: v[i:i + 1] for k, v in q.items()}
                a = time.perf_counter()
                c = r.first_stage_candidates(qi["global"], DEPTH)
                b = time.perf_counter()
                r.rank_features(qi, K)
                e = time.perf_counter()
                first.append(b - a)
                total.append(e - b)        # rank_features runs its own first stage
                cands.append(c[0].tolist())
        else:
            gal = G.Gallery(path)
            glob = torch.cat([t["global"].clone() for _, _, t in gal.iter_shards()])   # in memory
            if method == "faiss-flat":
                import faiss
                index = faiss.IndexFlatIP(D)
                index.add(glob.numpy())
                del glob
            res["setup_s"] = time.perf_counter() - t0
            for i in range(nq):
                qg = q["global"][i:i + 1]
                a = time.perf_counter()
                if method == "torch":
                    c = torch.topk(qg @ glob.T, DEPTH, dim=1).indices
                else:
                    c = torch.from_numpy(index.search(qg.numpy(), DEPTH)[1])
                first.append(time.perf_counter() - a)
                cands.append(c[0].tolist())
    res.update(first_ms=1e3 * statistics.median(first), peak_anon_mib=mem.peak["RssAnon"] / 2**20,
               peak_file_mib=mem.peak["RssFile"] / 2**20, candidates=cands)
    if total:
        res["total_ms"] = 1e3 * statistics.median(total)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--queries", type=int, default=20)
    p.add_argument("--dir", default="bench/out/search", help="where the generated galleries go (reused)")
    p.add_argument("--methods", nargs="+",
                   default=["nbretr", "nbretr-mem", "nbretr-ext", "nbretr-ivf", "torch", "faiss-flat"])
    p.add_argument("--json", default="bench/out/search.json")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--index", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.worker, Path(a.index), a.queries)))
        return 0
    rows = []
    for n in a.sizes:
        path = Path(a.dir) / f"n{n}"
        path.parent.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        make_gallery(path, n)
        print(f"gallery {n}: {sum(f.stat().st_size for f in path.glob('*.safetensors')) / 2**30:.2f} GiB on disk "
              f"(ready in {time.perf_counter() - t:.0f} s)", flush=True)
        exact = None
        for method in a.methods:
            out = subprocess.run([sys.executable, __file__, "--worker", method, "--index", str(path),
                                  "--queries", str(a.queries)], capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{method} failed: {out.stderr[-1500:]}", flush=True)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            cands = r.pop("candidates")
            if method == "nbretr":
                exact = cands
            if exact is not None:
                r["recall_at_100"] = statistics.mean(len(set(x) & set(y)) / DEPTH for x, y in zip(cands, exact))
            r["n"] = n
            rows.append(r)
            print(json.dumps(r), flush=True)
    info = {"machine": _runner.machine(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "depth": DEPTH, "k": K,
            "queries": a.queries, "load": os.getloadavg(), "rows": rows}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(info, indent=1))
    print(f"\n{info['machine']}, {info['date']}, load {info['load'][0]:.1f}; depth {DEPTH}, k {K}, "
          f"{a.queries} single queries (median)")
    print(f"{'N':>9} {'method':<11} {'1st stage ms':>12} {'total ms':>9} {'recall@100':>10} {'setup s':>8} "
          f"{'anon MiB':>9} {'file MiB':>9}")
    for r in rows:
        print(f"{r['n']:>9} {r['method']:<11} {r['first_ms']:>12.2f} {r.get('total_ms', float('nan')):>9.2f} "
              f"{r.get('recall_at_100', float('nan')):>10.3f} {r['setup_s'] + r.get('build_s', 0):>8.1f} "
              f"{r['peak_anon_mib']:>9.0f} {r['peak_file_mib']:>9.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
