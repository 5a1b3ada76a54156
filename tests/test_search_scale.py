"""Search over galleries split into many memory-mapped shards: the running top-k over shards
equals one top-k over the whole gallery (ties: lower index), the faiss IVF first stage
probing every list equals the exact one, and two gloo processes that each score their share
of the shards return what one process returns. Generated features, no model."""
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from nbretr import gallery as G
from nbretr.search import Retriever, merge_topk

D, FR, L = 16, 4, 6


def _features(n: int, seed: int, dup_every: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    glob = torch.randn(n, D, generator=g)
    if dup_every:  # exact ties in the first stage
        glob[dup_every::dup_every] = glob[0]
    tok = F.normalize(torch.randn(n, FR, D, generator=g), dim=-1)
    mask = torch.ones(n, FR, dtype=torch.uint8)
    mask[::3, 2:] = 0
    w = torch.softmax(torch.randn(n, FR, generator=g).masked_fill(mask == 0, -1e9), 1) * mask
    return {"global": glob, "tokens": tok, "mask": mask, "weight": w}


def _queries(q: int, seed: int = 9) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(q, L, dtype=torch.long)
    mask[1::2, 4:] = 0
    return {"global": torch.randn(q, D, generator=g), "tokens": F.normalize(torch.randn(q, L, D, generator=g), dim=-1),
            "mask": mask, "weight": torch.softmax(torch.randn(q, L, generator=g).masked_fill(mask == 0, -1e9), 1) * mask}


def _mapped_file(ptr: int) -> str:
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split()
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if lo <= ptr < hi:
            return parts[5] if len(parts) > 5 else ""
    return ""


def _index(path, n=91, shard=13, dup_every=0):
    f = _features(n, 0, dup_every)
    G.create_index(path, ({k: v[i:i + shard] for k, v in f.items()} for i in range(0, n, shard)))
    return f


def test_running_topk_over_memory_mapped_shards_equals_one_topk(tmp_path):
    f = _index(tmp_path / "idx", dup_every=7)
    r = Retriever(tmp_path / "idx", load_model=False)
    assert len(r.gallery.entries) == 7
    if Path("/proc/self/maps").exists():  # the tensors live in a mapping of the shard file, not in a copy
        t = r.gallery.shard(2)["tokens"]
        assert _mapped_file(t.data_ptr()) == str(tmp_path / "idx" / "shard-00002.safetensors")
    q = _queries(5)
    q["global"][0] = f["global"][0]      # ties among every 7th item
    cand = r.first_stage_candidates(q["global"], 20)
    s = q["global"] @ f["global"].T
    for row in range(5):
        assert cand[row].tolist() == torch.argsort(s[row], descending=True, stable=True)[:20].tolist()
    pre = Retriever(tmp_path / "idx", load_model=False, preload=True)       # global tokens held in memory
    assert torch.equal(pre.first_stage_candidates(q["global"], 20), cand)
    # re-ranking: WTI over the candidates, ties by lower index
    from nbretr import ops
    hits = r.rank_features(q, k=8, depth=20)
    for row in range(5):
        c = cand[row]
        wti = ops.wti_similarity(q["tokens"][row:row + 1], q["mask"][row:row + 1], q["weight"][row:row + 1],
                                 f["tokens"][c], f["mask"][c], f["weight"][c])[0]
        v, i = merge_topk(wti[None], c[None], 8)
        assert [h.index for h in hits[row]] == i[0].tolist()
        assert [h.path for h in hits[row]] == [f"item-{j}" for j in i[0].tolist()]


def test_merge_topk_breaks_ties_by_lower_index_and_ignores_padding():
    v = torch.tensor([[1.0, 2.0, 2.0, 5.0, 0.0]])
    i = torch.tensor([[4, 9, 3, -1, 7]])
    vals, idx = merge_topk(v, i, 3)
    assert idx.tolist() == [[3, 9, 4]] and vals.tolist() == [[2.0, 2.0, 1.0]]


def test_faiss_first_stage_probing_every_list_equals_the_exact_one(tmp_path):
    pytest.importorskip("faiss")
    import faiss

    from nbretr.index import build_faiss_ivf
    _index(tmp_path / "idx", n=300, shard=64)
    gal = G.Gallery(tmp_path / "idx")
    ivf = build_faiss_ivf(gal, nlist=8)
    faiss.write_index(ivf, str(tmp_path / "idx" / "faiss.ivf"))
    m = G.read_manifest(tmp_path / "idx")
    m["faiss"] = {"file": "faiss.ivf", "items": 300, "nlist": 8, "sha256": G.file_sha256(tmp_path / "idx" / "faiss.ivf")}
    G.write_manifest(tmp_path / "idx", m)
    q = _queries(6)
    exact = Retriever(tmp_path / "idx", load_model=False, first_stage="exact").first_stage_candidates(q["global"], 15)
    approx = Retriever(tmp_path / "idx", load_model=False, first_stage="faiss", nprobe=8)
    assert approx._use_faiss()
    assert torch.equal(approx.first_stage_candidates(q["global"], 15), exact)


def _worker(rank, world, init_file, path, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        r = Retriever(path, load_model=False)
        assert r.gallery.owned == [i for i in range(7) if i % world == rank]
        q = _queries(4)
        res = {d: [[(h.index, h.score) for h in hits] for hits in r.rank_features(q, k=10, depth=d)]
               for d in (25, 91)}
        if rank == 0:
            torch.save(res, out_file)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_each_scoring_their_shards_return_one_processes_results(tmp_path):
    _index(tmp_path / "idx")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "idx"), str(tmp_path / "out.pt")), nprocs=2,
             join=True, start_method="spawn")
    got = torch.load(tmp_path / "out.pt", weights_only=False)
    r = Retriever(tmp_path / "idx", load_model=False)
    q = _queries(4)
    for d in (25, 91):
        one = [[(h.index, h.score) for h in hits] for hits in r.rank_features(q, k=10, depth=d)]
        assert [[i for i, _ in row] for row in got[d]] == [[i for i, _ in row] for row in one]
        for a, b in zip(got[d], one):
            assert [s for _, s in a] == pytest.approx([s for _, s in b], rel=1e-6)
