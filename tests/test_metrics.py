"""nbretr.metrics (retrieval and hubness) on hand-made cases, and the hubness CLI."""
import math

import numpy as np
import pytest
import scipy.stats
import torch

from nbretr import metrics, scoring
from nbretr import hubness as hub


def test_retrieval_metrics_known_answers():
    ranks = torch.tensor([1, 2, 5, 6, 10, 11, 50, 51])
    m = metrics.retrieval_metrics(ranks)
    assert m["R1"] == pytest.approx(12.5)
    assert m["R5"] == pytest.approx(37.5)
    assert m["R10"] == pytest.approx(62.5)
    assert m["R50"] == pytest.approx(87.5)
    assert m["MdR"] == pytest.approx(8.0)       # mean of the middle ranks 6 and 10
    assert m["MnR"] == pytest.approx(136 / 8)
    assert m["Rsum"] == pytest.approx(12.5 + 37.5 + 62.5)
    with pytest.raises(ValueError, match="1-based"):
        metrics.retrieval_metrics(torch.tensor([0, 1]))


def test_ranks_from_sim_tie_rule_and_multi_caption():
    sim = torch.tensor([[0.9, 0.5, 0.9, 0.1],
                        [0.2, 0.2, 0.2, 0.3]])
    # row 0 target 2: item 0 has equal value and lower index -> rank 2
    # row 1 target 1: item 3 higher, item 0 equal & lower -> rank 3
    assert scoring.ranks_from_sim(sim, torch.tensor([2, 1])).tolist() == [2, 3]
    # gallery_owner: items 0,1 belong to query 0; items 2,3 to query 1
    owner = torch.tensor([0, 0, 1, 1])
    # query 0 best target: item 0 (0.9) -> rank 1; query 1 best: item 3 (0.3) -> rank 1
    assert scoring.ranks_from_sim(sim, gallery_owner=owner).tolist() == [1, 1]
    owner = torch.tensor([1, 0, 1, 0])
    # query 0 targets {1, 3}: best 0.5 (item 1) -> items 0, 2 above -> rank 3
    # query 1 targets {0, 2}: both 0.2, best is item 0 -> item 3 above -> rank 2
    assert scoring.ranks_from_sim(sim, gallery_owner=owner).tolist() == [3, 2]


def test_rank_of_targets_chunked_equals_full():
    q = torch.randint(-2, 3, (37, 6)).float()
    g = torch.randint(-2, 3, (53, 6)).float()
    t = torch.randint(0, 53, (37,))
    full = scoring.ranks_from_sim(q @ g.T, t)
    for elems in (1, 53, 100, 10 ** 6):
        assert torch.equal(scoring.ranks(q, g, t, max_tile_elems=elems), full)
    owner = torch.randint(0, 37, (53,))
    owner[:37] = torch.arange(37)  # every query owns at least one item
    full = scoring.ranks_from_sim(q @ g.T, gallery_owner=owner)
    assert torch.equal(scoring.ranks(q, g, gallery_owner=owner, max_tile_elems=60), full)


def test_ranks_from_topk():
    idx = torch.tensor([[3, 1, 2], [0, 2, 1]])
    assert metrics.ranks_from_topk(idx, torch.tensor([2, 5])).tolist() == [3, 4]


def test_retrieval_report_multi_caption():
    video = torch.eye(3)
    text = torch.tensor([[1.0, 0, 0], [0, 0.5, 0.6], [0, 1, 0], [0, 0, 1], [0.9, 0.1, 0]])
    c2v = torch.tensor([0, 1, 1, 2, 0])
    rep = scoring.retrieval_report(text, video, c2v)
    # t2v ranks: [1, 2, 1, 1, 1]; v2t: video 1's best caption is text 2 (sim 1) -> rank 1
    assert rep["t2v"]["R1"] == pytest.approx(80.0)
    assert rep["v2t"]["R1"] == pytest.approx(100.0)


def brute_hubness(x, k, nq):
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    return {
        "skewness": scipy.stats.skew(x),
        "hub_occurrence": x[x >= 2 * k].sum() / (k * nq),
        "antihub_share": np.mean(x == 0),
        "robin_hood": 0.5 * np.abs(x - x.mean()).sum() / x.sum(),
        "gini": np.abs(x[:, None] - x[None, :]).sum() / (2 * n * x.sum()),
        "max_ratio": x.max() / x.mean(),
        "hubs_5x": int(np.sum(x >= 5 * x.mean())),
    }


def test_hubness_hand_made():
    # 4 gallery items, k=1, 4 queries: one hub takes 3 slots
    h = metrics.hubness(torch.tensor([3, 1, 0, 0]), k=1, num_queries=4)
    assert h["hub_occurrence"] == pytest.approx(3 / 4)    # N_k >= 2: item 0
    assert h["antihub_share"] == pytest.approx(0.5)
    assert h["robin_hood"] == pytest.approx(0.5 * (2 + 0 + 1 + 1) / 4)
    assert h["gini"] == pytest.approx(2 * (2 + 3 + 3 + 1 + 1 + 0) / (2 * 4 * 4))  # all ordered pairs
    assert h["max_ratio"] == pytest.approx(3.0) and h["hubs_5x"] == 0  # mean N_k 1: item 0 takes 3x its share
    flat = metrics.hubness(torch.tensor([2, 2, 2]), k=2, num_queries=3)
    assert math.isnan(flat["skewness"]) and flat["gini"] == 0 and flat["robin_hood"] == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hubness_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    x = rng.poisson(3.0, size=57) * (rng.random(57) < 0.8) + (rng.random(57) < 0.05) * 40
    k, nq = 5, int(x.sum()) // 5
    got = metrics.hubness(torch.from_numpy(x), k, nq)
    want = brute_hubness(x, k, nq)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key


def test_skewness_grows_with_dimension():
    """The known effect (Radovanovic et al. 2010): Euclidean k-NN of i.i.d. Gaussian data,
    N_k skewness ~0.2 at d=3, ~5 at d=512 (measured). (On L2-normalised isotropic data,
    i.e. uniform on the sphere, there is no such growth: no point is nearer the mean.)"""
    torch.manual_seed(0)
    skews = {}
    for d in (3, 512):
        q = torch.randn(1500, d)
        g = torch.randn(1500, d)
        rep = hub.hubness_report(q, g, 10, metric="euclidean")
        skews[d] = rep["hubness"]["skewness"]
    assert skews[3] < 1.0 and skews[512] > 3.0, skews


def test_cli_end_to_end(tmp_path, capsys):
    torch.manual_seed(0)
    x = torch.randn(200, 16)
    np.save(tmp_path / "q.npy", (x + 0.1 * torch.randn_like(x)).numpy())
    torch.save(x, tmp_path / "g.pt")
    png = tmp_path / "out" / "hist.png"
    assert hub.main([str(tmp_path / "q.npy"), str(tmp_path / "g.pt"), "--paired", "--k", "5", "--metric", "euclidean",
                     "--png", str(png), "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "R@1" in out and "skewness" in out
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "r.json").exists()


@pytest.mark.parametrize("case,msg", [
    ("missing", "query file"),
    ("badext", "expected a .npy or .pt file"),
    ("3d", "expected a 2-D array [N, D], got shape [2, 3, 4]"),
    ("dim", "query has D=4 but gallery has D=5"),
    ("k", "--k must be in [1, 6]"),
])
def test_cli_errors_name_the_problem(tmp_path, capsys, case, msg):
    np.save(tmp_path / "q.npy", np.zeros((3, 4), np.float32) + 1)
    np.save(tmp_path / "g.npy", np.ones((6, 4), np.float32))
    q, g, extra = str(tmp_path / "q.npy"), str(tmp_path / "g.npy"), []
    if case == "missing":
        q = str(tmp_path / "nope.npy")
    elif case == "badext":
        (tmp_path / "q.txt").write_text("1 2")
        q = str(tmp_path / "q.txt")
    elif case == "3d":
        np.save(tmp_path / "q.npy", np.zeros((2, 3, 4), np.float32))
    elif case == "dim":
        np.save(tmp_path / "g.npy", np.ones((6, 5), np.float32))
    elif case == "k":
        extra = ["--k", "7"]
    with pytest.raises(SystemExit) as exc:
        hub.main([q, g, "--png", str(tmp_path / "h.png"), *extra])
    assert exc.value.code == 2
    assert msg in capsys.readouterr().err
