"""export -> index -> search end to end on the embedded dataset (default size: its 1,000-video
test split), against nbretr.eval on the same model; resume, --add, corrections and bad input.

The consistency test re-ranks at depth = the gallery size (1,000): every video is then
re-scored by WTI, which is what nbretr.eval ranks by, so the two must give the same rank
for every caption (the first stage only chooses which videos are re-scored). At a smaller
depth a caption whose video the global-token first stage leaves out cannot be ranked the
same, so there the test checks the weaker, exact property: the candidates are the exact
global-token top-d, and a target among them ranks no worse than in the evaluation."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nbretr import gallery as G
from nbretr import index as I
from nbretr import pretrained

pytestmark = pytest.mark.slow

# the random tiny CLIP: these tests need a trained model, not a good one (and no pretraining)
TRAIN = ["--clip", "tiny", "--batch-size", "32", "--num-workers", "0", "--mb-batch", "1", "--num-neighbors", "4",
         "--temporal-layers", "1", "--epochs", "1", "--max-steps", "4", "--do-eval", "false", "--seed", "5"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The embedded dataset (default size), a briefly trained tiny model, its export, and an
    index of the test split's videos (in the split's order)."""
    root = tmp_path_factory.mktemp("search")
    old = os.environ.get("NBRETR_DATA")
    os.environ["NBRETR_DATA"] = str(root / "data")
    from nbretr.train import main as train
    assert train(TRAIN + ["--output-dir", str(root / "run")]) == 0
    from nbretr.export import export_run
    model = export_run(root / "run", root / "model")
    data = root / "data" / "synthetic" / "default"
    m = json.loads((data / "manifest.json").read_text())
    test = [v for v in m["videos"] if v["split"] == "test"]
    (root / "test_videos.txt").write_text("".join(v["file"] + "\n" for v in test))
    (root / "test_captions.txt").write_text("".join(v["caption"] + "\n" for v in test))
    train_caps = [v["caption"] for v in m["videos"] if v["split"] == "train"][:60]
    (root / "bank.txt").write_text("".join(c + "\n" for c in train_caps))
    I.build_index(model, data, root / "idx", files=root / "test_videos.txt", shard_size=100, batch_size=64,
                  num_workers=0, progress=False, query_bank=root / "bank.txt")
    yield {"root": root, "run": root / "run", "model": model, "data": data, "idx": root / "idx",
           "videos": [str((data / v["file"]).resolve()) for v in test], "captions": [v["caption"] for v in test]}
    if old is None:
        os.environ.pop("NBRETR_DATA", None)
    else:
        os.environ["NBRETR_DATA"] = old


def _eval_ranks(model_dir):
    """Per-caption text->video ranks as nbretr.eval computes them (its encoders, its WTI
    score function, the scoring engine), and the evaluation's test split."""
    from nbretr import eval as E
    from nbretr import scoring
    from nbretr.builders import build_split
    from nbretr.config import TrainConfig, known_fields
    meta = pretrained.read_config(model_dir)
    cfg = TrainConfig(**known_fields(meta["train_config"], "t"))
    cfg.init_model = str(model_dir)
    from nbretr.builders import init_model_config
    cfg = init_model_config(cfg)
    model, tok, _ = pretrained.load_model(model_dir)
    ds = build_split(cfg, "test", tok)
    texts = E.encode_texts(model, ds, None, "cpu")
    vids = E.encode_videos(model, ds, None, "cpu")
    c2v = [int(v) for v in ds.caption_to_video]
    st = scoring.stream(scoring.wti_score_fn(texts, vids, q_is_text=True), len(c2v), ds.num_videos,
                        [[v] for v in c2v], 10)
    return st.ranks, ds, texts, vids


def test_search_gives_the_evaluations_ranks_at_full_depth(trained, tmp_path):
    from nbretr import Retriever
    from nbretr import eval as E
    from nbretr import metrics as M
    ranks_eval, ds, _, _ = _eval_ranks(trained["model"])
    r = Retriever(trained["idx"])
    n = len(trained["videos"])
    assert n == 1000 and len(r) == n and r.gallery.paths() == trained["videos"]
    target = {str(Path(v.path).resolve()): i for i, v in enumerate(ds.videos)}
    res = r.search(list(ds.captions), k=n, depth=n)
    ranks = torch.tensor([[target[h.path] for h in hits].index(int(ds.caption_to_video[c])) + 1
                          for c, hits in enumerate(res)])
    assert torch.equal(ranks, ranks_eval)
    # and the command's report is the same numbers
    assert E.main(["--init-model", str(trained["model"]), "--output-dir", str(tmp_path / "ev")]) == 0
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())["t2v"]
    mine = M.retrieval_metrics(ranks)
    for key in ("R1", "R5", "R10", "R50", "MdR", "MnR"):
        assert mine[key] == pytest.approx(m[key]), key


def test_a_shallower_search_rescores_the_exact_first_stage_candidates(trained):
    from nbretr import Retriever
    ranks_eval, ds, texts, vids = _eval_ranks(trained["model"])
    r = Retriever(trained["idx"], depth=20)
    caps = list(ds.captions)[:40]
    q = I.encode_texts(r.model, r.tokenizer, caps, r.max_words, "cpu")
    g = torch.cat([t["global"].float() for _, _, t in r.gallery.iter_shards()])
    brute = q["global"] @ g.T
    cand = r.first_stage_candidates(q["global"], 20)
    for row in range(len(caps)):
        order = torch.argsort(brute[row], descending=True, stable=True)[:20]
        assert cand[row].tolist() == order.tolist()
    res = r.search(caps, k=20)
    assert texts[0].shape[0] == len(trained["videos"])
    for c, hits in enumerate(res):
        assert sorted(h.index for h in hits) == sorted(cand[c].tolist())
        scores = [h.score for h in hits]
        assert scores == sorted(scores, reverse=True)
        t = int(ds.caption_to_video[c])
        got = [h.index for h in hits]
        if t in got:
            assert got.index(t) + 1 <= int(ranks_eval[c])


def test_eval_and_train_start_from_a_model_folder(trained, tmp_path):
    from nbretr import eval as E
    from nbretr.train import main as train
    a = tmp_path / "a"
    b = tmp_path / "b"
    assert E.main(["--checkpoint", str(trained["run"]), "--output-dir", str(a)]) == 0
    assert E.main(["--init-model", str(trained["model"]), "--output-dir", str(b)]) == 0
    ma, mb = (json.loads((p / "metrics.json").read_text()) for p in (a, b))
    for d in ("t2v", "v2t"):
        for key in ("R1", "R5", "MnR"):
            assert ma[d][key] == mb[d][key]
    with pytest.raises(SystemExit):   # exclusive
        E.main(["--checkpoint", str(trained["run"]), "--init-model", str(trained["model"])])
    with pytest.raises(FileNotFoundError, match="no config.json"):
        E.main(["--init-model", str(tmp_path)])
    # fine-tuning starts from the folder's weights: at lr 0 they do not move
    ft = tmp_path / "ft"
    assert train(TRAIN + ["--lr", "0", "--max-steps", "1", "--init-model", str(trained["model"]),
                          "--output-dir", str(ft)]) == 0
    state = torch.load(ft / "checkpoints" / "last.pt", weights_only=True)
    from safetensors.torch import load_file
    ref = load_file(str(trained["model"] / "model.safetensors"))
    assert set(ref) <= set(state["model"])
    for k, v in ref.items():
        assert torch.equal(state["model"][k].float(), v), k
    with pytest.raises(ValueError, match=r"--temporal-layers 3 \(the model has 1\)"):
        train(TRAIN + ["--temporal-layers", "3", "--init-model", str(trained["model"]),
                       "--output-dir", str(tmp_path / "bad")])


def test_an_interrupted_build_resumes_where_it_stopped(trained, tmp_path, monkeypatch):
    files = tmp_path / "files.txt"
    files.write_text("".join(f"videos/{Path(v).name}\n" for v in trained["videos"][:50]))
    kw = dict(files=files, shard_size=20, batch_size=16, num_workers=0, progress=False)
    I.build_index(trained["model"], trained["data"], tmp_path / "full", **kw)
    real, calls = I.encode_videos, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(I, "encode_videos", interrupted)
    with pytest.raises(KeyboardInterrupt):
        I.build_index(trained["model"], trained["data"], tmp_path / "cut", **kw)
    m = G.read_manifest(tmp_path / "cut")
    assert not m["complete"] and [s["count"] for s in m["shards"]] == [20]   # 32 encoded, one shard kept
    with pytest.raises(G.IndexError, match="incomplete"):
        from nbretr import Retriever
        Retriever(tmp_path / "cut")
    monkeypatch.setattr(I, "encode_videos", real)
    before = (tmp_path / "cut" / "shard-00000.safetensors").read_bytes()
    I.build_index(trained["model"], trained["data"], tmp_path / "cut", **kw)
    assert (tmp_path / "cut" / "shard-00000.safetensors").read_bytes() == before
    a, b = G.Gallery(tmp_path / "full"), G.Gallery(tmp_path / "cut")
    assert a.paths() == b.paths() and len(b) == 50
    for x, y in zip(a.rows(0, 50), b.rows(0, 50)):
        assert torch.equal(x, y)


def test_add_appends_new_videos_and_never_rewrites_old_shards(trained, tmp_path):
    first, both = tmp_path / "first.txt", tmp_path / "both.txt"
    names = [f"videos/{Path(v).name}\n" for v in trained["videos"][:30]]
    first.write_text("".join(names[:12]))
    both.write_text("".join(names))
    kw = dict(shard_size=8, batch_size=8, num_workers=0, progress=False)
    I.build_index(trained["model"], trained["data"], tmp_path / "idx", files=first, **kw)
    old = {p.name: p.read_bytes() for p in (tmp_path / "idx").glob("shard-*")}
    with pytest.raises(ValueError, match="pass --add"):
        I.build_index(trained["model"], trained["data"], tmp_path / "idx", files=both, **kw)
    m = I.build_index(trained["model"], trained["data"], tmp_path / "idx", files=both, add=True, **kw)
    assert m["_summary"] == {"found": 30, "new": 18, "total": 30}
    for name, data in old.items():
        assert (tmp_path / "idx" / name).read_bytes() == data
    gal = G.Gallery(tmp_path / "idx", verify=True)
    assert gal.paths() == trained["videos"][:30]
    ref = G.Gallery(trained["idx"])
    for x, y in zip(gal.rows(0, 30), ref.rows(0, 30)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)   # other encoder batch sizes: rounding only
    with pytest.raises(FileNotFoundError, match="holds no index to add to"):
        I.build_index(trained["model"], trained["data"], tmp_path / "none", files=both, add=True, **kw)


def test_corrections_rank_as_the_evaluations_correction_functions(trained):
    from nbretr import Retriever
    from nbretr import ops
    from nbretr import retrieval, scoring
    r = Retriever(trained["idx"])
    caps = trained["captions"][:30]
    q = I.encode_texts(r.model, r.tokenizer, caps, r.max_words, "cpu")
    n = len(r)
    vids = r.gallery.rows(0, n)
    bank = I.encode_texts(r.model, r.tokenizer, (trained["root"] / "bank.txt").read_text().splitlines(),
                          r.max_words, "cpu")
    b = (bank["tokens"], bank["mask"], bank["weight"])
    s = ops.wti_similarity(q["tokens"], q["mask"], q["weight"], *vids)
    st = scoring.bank_stats(lambda bs, gs: ops.wti_similarity(*(x[bs] for x in b), *(x[gs] for x in vids)), 60, n,
                      betas=[20.0], hit_ks=[1])
    col = scoring.column_lse(lambda bs, gs: ops.wti_similarity(*(x[bs] for x in b), *(x[gs] for x in vids)), 60, n,
                       temperature=1000.0)
    for corr, ref in (("qbnorm", retrieval.qb_norm(s, st, 20.0, 1)), ("dsl", retrieval.dual_softmax(s, col, 1000.0))):
        res = r.search(caps, k=10, depth=n, correction=corr)
        for row, hits in enumerate(res):
            order = torch.argsort(ref[row].float(), descending=True, stable=True)[:10]
            assert [h.index for h in hits] == order.tolist(), (corr, row)
    plain = [h.index for h in r.search(caps[0], k=10, depth=n)]
    assert plain == torch.argsort(s[0], descending=True, stable=True)[:10].tolist()


def test_bad_input_is_named_and_nothing_indexed_is_lost(trained, tmp_path):
    from nbretr import Retriever
    model, data = trained["model"], trained["data"]
    # an empty video folder: an error, no index folder left behind
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no video files"):
        I.build_index(model, tmp_path / "empty", tmp_path / "e_idx", progress=False)
    assert not (tmp_path / "e_idx").exists()
    # unreadable files are skipped, counted and listed
    vd = tmp_path / "videos"
    vd.mkdir()
    for v in trained["videos"][:5]:
        (vd / Path(v).name).write_bytes(Path(v).read_bytes())
    (vd / "zero.mp4").write_bytes(b"")
    (vd / "junk.avi").write_bytes(b"not a video at all" * 10)
    m = I.build_index(model, vd, tmp_path / "idx", shard_size=3, batch_size=4, num_workers=0, progress=False)
    assert len(G.Gallery(tmp_path / "idx")) == 5
    assert sorted(Path(s["path"]).name for s in m["skipped"]) == ["junk.avi", "zero.mp4"]
    listed = (tmp_path / "idx" / G.SKIPPED).read_text()
    assert "zero.mp4\tempty" in listed and "junk.avi" in listed
    # an index built by another model
    other_model, tok, meta = pretrained.load_model(model)
    with torch.no_grad():
        other_model.wti.text_weight_fc[0].bias.add_(0.01)
    other = pretrained.save_pretrained(other_model, tok, tmp_path / "other", data=meta["data"])
    manifest_before = (tmp_path / "idx" / G.MANIFEST).read_bytes()
    with pytest.raises(G.IndexError, match="built by another model"):
        I.build_index(other, vd, tmp_path / "idx", add=True, progress=False)
    with pytest.raises(G.IndexError, match="built by another model"):
        Retriever(tmp_path / "idx", other)
    assert (tmp_path / "idx" / G.MANIFEST).read_bytes() == manifest_before
    # a corrupt shard, a truncated one, a missing one: named; --add refuses to build on them
    shard = tmp_path / "idx" / "shard-00001.safetensors"
    good = shard.read_bytes()
    bad = bytearray(good)
    bad[-5] ^= 0xFF
    shard.write_bytes(bytes(bad))
    Retriever(tmp_path / "idx")                                   # same size: only the checksum tells
    with pytest.raises(G.IndexError, match=r"shard-00001.safetensors is corrupt: its SHA-256"):
        Retriever(tmp_path / "idx", verify=True)
    shard.write_bytes(good[:-100])
    with pytest.raises(G.IndexError, match="shard-00001.safetensors is corrupt or truncated"):
        Retriever(tmp_path / "idx")
    with pytest.raises(G.IndexError, match="shard-00001.safetensors is corrupt or truncated"):
        I.build_index(model, vd, tmp_path / "idx", add=True, progress=False)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="shard-00001.safetensors is missing"):
        Retriever(tmp_path / "idx")
    assert (tmp_path / "idx" / G.MANIFEST).read_bytes() == manifest_before
    shard.write_bytes(good)
    assert len(Retriever(tmp_path / "idx", verify=True)) == 5
    # a query file with an empty line
    from nbretr.search import main as search
    qf = tmp_path / "q.txt"
    qf.write_text("two red squares\n\nblue circles\n")
    with pytest.raises(ValueError, match=r"q.txt: line 2 is empty"):
        search([str(tmp_path / "idx"), "--queries", str(qf)])
    with pytest.raises(ValueError, match="correction needs a query bank"):
        Retriever(tmp_path / "idx").search("red", correction="qbnorm")


def test_the_commands_print_a_table_json_and_clear_errors(trained, tmp_path):
    import nbretr
    env = {**os.environ, "PYTHONPATH": str(Path(nbretr.__file__).parents[1])}
    env.pop("NBRETR_TRACEBACK", None)
    q = tmp_path / "q.txt"
    q.write_text("two red squares moving left\nthree blue circles moving up\n")
    p = subprocess.run([sys.executable, "-m", "nbretr.search", str(trained["idx"]), "one green triangle moving down",
                        "--queries", str(q), "-k", "3", "--json"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout)
    assert [o["query"] for o in out] == ["one green triangle moving down", "two red squares moving left",
                                         "three blue circles moving up"]
    assert all(len(o["results"]) == 3 and o["results"][0]["rank"] == 1 for o in out)
    assert all(r["path"] in trained["videos"] for o in out for r in o["results"])
    q.write_text("red\n\n")
    p = subprocess.run([sys.executable, "-m", "nbretr.search", str(trained["idx"]), "--queries", str(q)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2 and "python -m nbretr.search: error:" in p.stderr and "line 2 is empty" in p.stderr
    assert "Traceback" not in p.stderr
