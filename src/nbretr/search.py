"""``python -m nbretr.search INDEX_DIR "a man is cooking pasta" -k 10``: text-to-video search
over an index built by ``python -m nbretr.index``, and :class:`Retriever`, its Python face.

    python -m nbretr.search index/ "two red squares moving left" -k 5
    python -m nbretr.search index/ --queries queries.txt --json          # one query per line
    python -m nbretr.search index/ "..." --correction qbnorm             # needs index --query-bank
    torchrun --nproc_per_node 2 -m nbretr.search index/ "..."            # each rank scores its shards

Two stages, both on nbretr's operators (no other ranking path):

1. **First stage** over the videos' global tokens (the model's one-token summaries, dot
   product as in training): exact through ``nbretr.ops.topk_centrality``, shard by shard
   over the memory-mapped shards with a running top-``depth``; or, for a gallery of
   ``FAISS_MIN_ITEMS`` videos or more whose index was built with faiss installed, through
   that IVF index (approximate). With ``depth`` >= the gallery size every video is a
   candidate and this stage is skipped.
2. **Re-ranking** of the ``depth`` candidates by WTI similarity through
   ``nbretr.ops.wti_similarity`` (what ``nbretr.eval`` ranks by), optionally corrected
   (QB-Norm or dual softmax with the query bank stored at index time, the functions of
   :mod:`nbretr.retrieval` that ``nbretr.eval --corrections`` runs), best first; equal
   scores: lower gallery index first (the evaluation's rule).

Under torchrun (any backend; gloo on CPU) each rank reads and scores the shards
``i % world_size == rank``; the first-stage lists and the re-ranked candidates are
all-gathered and merged, so every rank returns what one process returns.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from nbretr import gallery as G
from nbretr import ops

log = logging.getLogger("nbretr")

CORRECTIONS = ("none", "qbnorm", "dsl")
FIRST_STAGES = ("auto", "exact", "faiss")
DEFAULT_DEPTH = 100
# fewer queries than this at once: the first stage takes topk_centrality's torch path on the CPU,
# which measured 3-10x faster than the CPU kernel for 1-8 queries x 65k items (the kernel's tiles
# are sized for thousands of queries); from this many queries on, the backend default applies
SMALL_BATCH = 64


@dataclass
class Hit:
    rank: int
    index: int        # position in the index (manifest order)
    score: float      # WTI similarity (after the correction, if any)
    path: str

    def as_dict(self) -> dict:
        return {"rank": self.rank, "score": self.score, "path": self.path, "index": self.index}


def merge_topk(values: torch.Tensor, indices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the ``k`` best (value, index) pairs of candidate lists ``[Q, C]``: descending
    value, equal values by ascending index (``topk_centrality``'s rule); index -1 (padding)
    never wins over a real entry."""
    vals = values.float().masked_fill(indices < 0, float("-inf"))
    big = torch.iinfo(torch.long).max
    order = torch.argsort(indices.masked_fill(indices < 0, big), dim=1, stable=True)
    v, i = vals.gather(1, order), indices.gather(1, order)
    pos = torch.argsort(v, dim=1, descending=True, stable=True)[:, :k]
    return v.gather(1, pos), i.gather(1, pos)


def _dist():
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist, dist.get_rank(), dist.get_world_size()
    return None, 0, 1


class Retriever:
    """Text-to-video search over an index folder.

    ``model``: a model folder (default: the one the manifest records); its fingerprint must
    equal the index's. ``depth``: candidates re-ranked by WTI per query (default 100; at
    most ``nbretr.ops.TOPK_MAX_K`` unless it covers the whole gallery). ``first_stage``:
    "auto" (faiss IVF where the index has one, else exact), "exact" or "faiss".
    ``verify``: check every shard's SHA-256 on opening (reads the whole index).
    ``backend``: the first stage's ``topk_centrality`` backend (None: the torch path for
    fewer than :data:`SMALL_BATCH` queries on the CPU, else the default). ``preload``: keep
    the global tokens in memory (``4·D`` bytes per video) instead of reading them from the
    mapped shards at every query; the frame tokens stay on disk either way.
    Under ``torch.distributed`` each rank opens only its shards (``i % world == rank``);
    every rank must call :meth:`search` with the same queries."""

    def __init__(self, index_dir: str | os.PathLike, model: str | os.PathLike | None = None, *,
                 device: str | torch.device = "cpu", depth: int = DEFAULT_DEPTH, first_stage: str = "auto",
                 nprobe: int = 32, verify: bool = False, load_model: bool = True,
                 backend: ops.Backend | None = None, preload: bool = False):
        from nbretr import pretrained
        from nbretr.index import check_model
        if first_stage not in FIRST_STAGES:
            raise ValueError(f"first_stage must be one of {FIRST_STAGES}, got {first_stage!r}")
        self.dir = Path(index_dir)
        manifest = G.read_manifest(self.dir)
        if not manifest["complete"]:
            raise G.IndexError(f"index {self.dir} is incomplete (its build was interrupted): run the same "
                               "python -m nbretr.index command again to finish it")
        model_dir = Path(model) if model is not None else Path(manifest["model"]["dir"])
        if load_model:
            if not model_dir.exists():
                raise FileNotFoundError(f"model folder {model_dir} (recorded in {self.dir / G.MANIFEST}) does not "
                                        "exist; pass the model folder explicitly (--model)")
            check_model(manifest, pretrained.fingerprint(model_dir), model_dir, self.dir)
        self._dist, self.rank, self.world = _dist()
        n_shards = len(manifest["shards"])
        self.gallery = G.Gallery(self.dir, verify=verify,
                                 shards=[i for i in range(n_shards) if i % self.world == self.rank])
        if len(self.gallery) == 0:
            raise G.IndexError(f"index {self.dir} holds no videos")
        self.device = torch.device(device)
        self.model = self.tokenizer = None
        if load_model:  # load_model=False: rank query features given to rank_features (benchmarks)
            self.model, self.tokenizer, _ = pretrained.load_model(model_dir, device=self.device)
        self.max_words = int(manifest["data"].get("max_words", 0))
        self.depth = depth
        self._check_depth(depth)
        self.first_stage = first_stage
        self.nprobe = nprobe
        self.backend = backend
        self._faiss = None
        # preload: the owned shards' global tokens copied into memory once (D floats per video:
        # 2 GiB for 1M videos at D=512), so the first stage reads no pages from disk
        self._global = {i: t["global"].float().clone() for i, _, t in self.gallery.iter_shards()} if preload else {}
        if first_stage == "faiss" and not manifest.get("faiss"):
            raise ValueError(f"first_stage faiss: index {self.dir} has no faiss index (build it with "
                             "python -m nbretr.index ... --faiss yes)")
        self._stats = None

    @property
    def manifest(self) -> dict:
        return self.gallery.manifest

    def __len__(self) -> int:
        return len(self.gallery)

    def _check_depth(self, depth: int) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if ops.TOPK_MAX_K < depth < len(self.gallery):
            raise ValueError(f"depth {depth} exceeds the first stage's limit {ops.TOPK_MAX_K} "
                             f"(and is below the gallery size {len(self.gallery)}, which re-ranks everything)")

    # -- stage 1 -----------------------------------------------------------------------------
    def _use_faiss(self) -> bool:
        f = self.manifest.get("faiss")
        if self.first_stage == "exact" or not f or self.world > 1:
            return False
        if f["items"] != len(self.gallery):
            if self.first_stage == "faiss":
                raise G.IndexError(f"{self.dir / f['file']} covers {f['items']} videos, the index {len(self.gallery)}")
            return False
        from nbretr.index import faiss_available
        if not faiss_available():
            if self.first_stage == "faiss":
                raise ValueError("first_stage faiss: faiss is not installed (pip install faiss-cpu)")
            return False
        return True

    def first_stage_candidates(self, q_global: torch.Tensor, depth: int) -> torch.Tensor:
        """``[Q, depth]`` global indices (-1: none) of the best items by global-token dot product."""
        if self._use_faiss():
            import faiss
            import numpy as np
            if self._faiss is None:
                self._faiss = faiss.read_index(str(self.dir / self.manifest["faiss"]["file"]))
                self._faiss.nprobe = self.nprobe
            _, idx = self._faiss.search(np.ascontiguousarray(q_global.cpu().numpy(), dtype=np.float32), depth)
            return torch.from_numpy(idx).long()
        Q = q_global.shape[0]
        best_v = torch.full((Q, 0), float("-inf"))
        best_i = torch.full((Q, 0), -1, dtype=torch.long)
        qg = q_global.float().to(self.device)
        backend = self.backend
        if backend is None and Q < SMALL_BATCH and self.device.type == "cpu":
            backend = "torch"  # the CPU kernel is tuned for many queries (bench/search.py, docs/search.md)
        for i, off, t in self.gallery.iter_shards():
            g = self._global.get(i, t["global"]).float().to(self.device)
            kk = min(depth, g.shape[0])
            v, i, _, _ = ops.topk_centrality(qg, g, kk, backend=backend)
            best_v, best_i = merge_topk(torch.cat((best_v, v.cpu()), 1), torch.cat((best_i, i.cpu() + off), 1), depth)
        if self._dist is not None:
            parts = [None] * self.world
            self._dist.all_gather_object(parts, (best_v, best_i))
            best_v, best_i = merge_topk(torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1),
                                        depth)
        return best_i

    # -- stage 2 -----------------------------------------------------------------------------
    def _owned(self, idx: torch.Tensor) -> torch.Tensor:
        import numpy as np
        sh = np.searchsorted(self.gallery.offsets, idx.numpy(), side="right") - 1
        return torch.as_tensor(np.isin(sh, self.gallery.owned))

    def _bank_stats(self):
        if self._stats is None:
            from nbretr.scoring import BankStats
            m = self.manifest
            if not m.get("query_bank") or not m.get("bank_stats"):
                raise ValueError(f"--correction needs a query bank: index {self.dir} was built without one "
                                 "(python -m nbretr.index ... --query-bank queries.txt)")
            bs = m["bank_stats"]
            if bs["items"] != len(self.gallery):
                raise G.IndexError(f"{self.dir / bs['file']} covers {bs['items']} videos, the index "
                                   f"{len(self.gallery)}: rerun python -m nbretr.index with --add to refresh it")
            t = G.open_shard(self.dir / bs["file"])
            qb = m["query_bank"]
            self._stats = (qb, BankStats(qb["count"], {qb["qbnorm_beta"]: t["qbnorm_lse"].clone()}, {},
                                           {qb["qbnorm_k"]: t["qbnorm_hits"].bool().clone()}),
                           t["dsl_col_lse"].clone())
        return self._stats

    def _correct(self, scores: torch.Tensor, idx: torch.Tensor, correction: str) -> torch.Tensor:
        from nbretr import retrieval
        from nbretr.scoring import BankStats
        if correction == "none":
            return scores
        qb, st, col = self._bank_stats()
        if correction == "qbnorm":
            b, k = qb["qbnorm_beta"], qb["qbnorm_k"]
            sub = BankStats(st.size, {b: st.lse[b][idx]}, {}, {k: st.hits[k][idx]})
            return retrieval.qb_norm(scores[None], sub, b, k)[0]
        return retrieval.dual_softmax(scores[None], col[idx], qb["dsl_temperature"])[0].float()

    @torch.no_grad()
    def search(self, queries: str | Sequence[str], k: int = 10, *, depth: int | None = None,
               correction: str = "none") -> list[list[Hit]]:
        """The ``k`` best videos for each query: a list of :class:`Hit` per query (for one
        query given as a string, its list)."""
        single = isinstance(queries, str)
        qs = [queries] if single else list(queries)
        for n, q in enumerate(qs):
            if not isinstance(q, str) or not q.strip():
                raise ValueError(f"query {n + 1} is empty")
        from nbretr.index import encode_texts
        if self.model is None:
            raise ValueError("this Retriever was opened with load_model=False: use rank_features")
        q = encode_texts(self.model, self.tokenizer, qs, self.max_words, self.device)
        out = self.rank_features(q, k, depth=depth, correction=correction)
        return out[0] if single else out

    @torch.no_grad()
    def rank_features(self, q: dict, k: int = 10, *, depth: int | None = None,
                      correction: str = "none") -> list[list[Hit]]:
        """The two stages for encoded queries ``q`` (``global [Q, D]``, ``tokens [Q, L, D]``
        L2-normalised, ``mask``, ``weight``: :func:`nbretr.index.encode_texts`)."""
        if correction not in CORRECTIONS:
            raise ValueError(f"correction must be one of {CORRECTIONS}, got {correction!r}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        depth = self.depth if depth is None else depth
        self._check_depth(depth)
        n_g = len(self.gallery)
        qs = range(q["tokens"].shape[0])
        if depth >= n_g:
            cand = torch.arange(n_g).expand(len(qs), n_g)
        else:
            cand = self.first_stage_candidates(q["global"], depth)
        out = []
        for r in range(len(qs)):
            c = cand[r][cand[r] >= 0]
            mine = c[self._owned(c)]
            s = torch.empty(0)
            if len(mine):
                v = tuple(x.to(self.device) for x in self.gallery.gather(mine))
                qt = tuple(q[f][r:r + 1].to(self.device) for f in ("tokens", "mask", "weight"))
                s = ops.wti_similarity(*qt, *v)[0].cpu()
            if self._dist is not None:
                parts = [None] * self.world
                self._dist.all_gather_object(parts, (mine, s))
                mine = torch.cat([p[0] for p in parts])
                s = torch.cat([p[1] for p in parts])
            if len(mine) == 0:
                out.append([])
                continue
            s = self._correct(s, mine, correction)
            v, i = merge_topk(s[None], mine[None], min(k, len(mine)))
            out.append([Hit(j + 1, int(ix), float(sc), self.gallery_path(int(ix)))
                        for j, (sc, ix) in enumerate(zip(v[0].tolist(), i[0].tolist()))])
        return out

    def gallery_path(self, index: int) -> str:
        m = self.manifest
        offs = self.gallery.offsets
        import numpy as np
        s = int(np.searchsorted(offs, index, side="right")) - 1
        return m["shards"][s]["paths"][index - offs[s]]


def format_table(query: str, hits: Sequence[Hit]) -> str:
    lines = [f"query: {query}", f"{'rank':>5}  {'score':>9}  path"]
    lines += [f"{h.rank:>5}  {h.score:>9.4f}  {h.path}" for h in hits]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from nbretr.index import read_lines
    from nbretr.runtime import setup_logging
    p = argparse.ArgumentParser(prog="python -m nbretr.search", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("index_dir", help="an index folder (python -m nbretr.index)")
    p.add_argument("query", nargs="*", help="one or more queries (quote each)")
    p.add_argument("--queries", default=None, help="a text file of queries, one per line")
    p.add_argument("-k", "--k", type=int, default=10, help="results per query (default 10)")
    p.add_argument("--depth", type=int, default=DEFAULT_DEPTH,
                   help=f"candidates re-ranked by WTI per query (default {DEFAULT_DEPTH})")
    p.add_argument("--first-stage", default="auto", choices=FIRST_STAGES,
                   help="auto (faiss IVF where the index has one, else exact topk_centrality), exact or faiss")
    p.add_argument("--nprobe", type=int, default=32, help="IVF lists probed by the faiss first stage (default 32)")
    p.add_argument("--correction", default="none", choices=CORRECTIONS,
                   help="hubness correction with the index's query bank: qbnorm or dsl (default none)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--model", default=None, help="the model folder (default: the one the index records)")
    p.add_argument("--verify", action="store_true", help="check every shard's SHA-256 first")
    p.add_argument("--preload", action="store_true",
                   help="hold the global tokens in memory (4*D bytes per video) for the first stage")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    queries = list(args.query)
    if args.queries:
        queries += read_lines(args.queries, "--queries")
    if not queries:
        p.error("give a query, or --queries FILE")
    for n, q in enumerate(args.query, 1):
        if not q.strip():
            p.error(f"query {n} on the command line is empty")
    dist_ = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist
        dist.init_process_group("gloo" if args.device == "cpu" else "nccl")
        dist_ = dist
    setup_logging(int(os.environ.get("RANK", "0")), level=logging.WARNING)
    try:
        r = Retriever(args.index_dir, args.model, device=args.device, depth=args.depth,
                      first_stage=args.first_stage, nprobe=args.nprobe, verify=args.verify, preload=args.preload)
        results = r.search(queries, args.k, correction=args.correction)
        if r.rank == 0:
            if args.json:
                print(json.dumps([{"query": q, "results": [h.as_dict() for h in hits]}
                                  for q, hits in zip(queries, results)], indent=1))
            else:
                print("\n\n".join(format_table(q, hits) for q, hits in zip(queries, results)))
        return 0
    finally:
        if dist_ is not None:
            dist_.destroy_process_group()


if __name__ == "__main__":
    from nbretr.runtime import run_cli
    sys.exit(run_cli(main, "python -m nbretr.search"))
