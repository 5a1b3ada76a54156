"""nbretr.losses: each loss against an independent numpy computation on small hand-checkable
matrices, options, gradients, dtypes, and ext-vs-torch agreement (once the ops are merged)."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import nbretr
from nbretr import losses
from helpers import require_ext


def require_ext_ops(*names: str) -> None:
    require_ext("cpu")
    missing = [n for n in names if not hasattr(torch.ops.nbretr, n)]
    assert not missing, f"the extension has no ops {missing}"  # a typo here must not skip silently


def np_log_softmax(row):
    row = np.asarray(row, dtype=np.float64)
    m = row.max()
    return row - m - math.log(np.exp(row - m).sum())


S3 = np.array([[0.9, 0.2, 0.4],
               [0.1, 0.8, 0.3],
               [0.5, 0.6, 0.7]])


def test_infonce_by_hand():
    want = -np.mean([np_log_softmax(S3[i])[i] for i in range(3)])
    got = losses.infonce_loss(torch.tensor(S3))
    assert got.item() == pytest.approx(want, rel=1e-12)


def test_centrality_weighting_by_hand():
    w = np.array([1.2, 0.7, 1.0])
    logits = 10 * S3
    want = -np.mean([w[i] * np_log_softmax(logits[i])[i] for i in range(3)])
    got = losses.centrality_weighting_loss(torch.tensor(logits), torch.tensor(w))
    assert got.item() == pytest.approx(want, rel=1e-12)
    # weights are not normalised: doubling them doubles the loss
    got2 = losses.centrality_weighting_loss(torch.tensor(logits), torch.tensor(2 * w))
    assert got2.item() == pytest.approx(2 * want, rel=1e-12)


def np_neighbor_loss(S, M, k, tau, over="complement", centrality=None):
    """docs/method.md "Loss 2" with explicit loops."""
    B = S.shape[0]
    c = M.mean(axis=1) if centrality is None else centrality
    k = min(k, B - 1)
    total = 0.0
    for i in range(B):
        others = sorted([j for j in range(B) if j != i], key=lambda j: (-S[i, j], j))
        N = others[:k]
        E = set(N) | {i}
        region = [j for j in range(B) if (j not in E) == (over == "complement")]

        def norm(x):
            if not region:
                return np.zeros(B)
            lo, hi = min(x[j] for j in region), max(x[j] for j in region)
            den = hi - lo if hi > lo else 1.0
            return (x - lo) / den

        ns, nc = norm(S[i]), norm(c)
        d = {j: ns[j] - nc[j] for j in N}
        z = sum(math.exp(tau * d[j]) for j in N)
        p = {j: math.exp(tau * d[j]) / z for j in N}
        p[i] = 1.0
        Es = sorted(E)
        lse = math.log(sum(math.exp(S[i, j]) for j in Es))
        total += -sum(p[j] * (S[i, j] - lse) for j in Es) / sum(p.values())
    return total / B


@pytest.mark.parametrize("over", ["complement", "neighbors"])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 20])
def test_neighbor_adjusting_by_hand(k, over):
    rng = np.random.default_rng(1)
    S = rng.normal(size=(5, 5))
    M = rng.normal(size=(5, 7))
    want = np_neighbor_loss(S, M, k, 3.0, over)
    got = losses.neighbor_adjusting_loss(torch.tensor(S), torch.tensor(M), k, 3.0, normalize_over=over)
    assert got.item() == pytest.approx(want, rel=1e-10)


def test_neighbor_adjusting_3x3_by_hand():
    # 3x3, k=1: N(0)={2}, complement {1}: min=max -> divide by 1.
    M = np.array([[0.3, 0.1], [0.5, 0.9], [0.2, 0.2]])
    want = np_neighbor_loss(S3, M, 1, 3.0)
    got = losses.neighbor_adjusting_loss(torch.tensor(S3), torch.tensor(M), 1, 3.0)
    assert got.item() == pytest.approx(want, rel=1e-10)
    # with one neighbour, p_ij = p_ii = 1: each row is a two-way cross-entropy averaged over
    # its two columns; neighbours: row 0 -> col 2, row 1 -> col 2, row 2 -> col 1
    by_hand = np.mean([-np_log_softmax([S3[i, i], S3[i, j]]).sum() / 2 for i, j in [(0, 2), (1, 2), (2, 1)]])
    assert got.item() == pytest.approx(by_hand, rel=1e-10)


def test_neighbor_adjusting_centrality_and_empty_bank():
    rng = np.random.default_rng(2)
    S = rng.normal(size=(6, 6))
    c = rng.random(6)
    want = np_neighbor_loss(S, None, 2, 3.0, centrality=c)
    got = losses.neighbor_adjusting_loss(torch.tensor(S), None, 2, 3.0, centrality=torch.tensor(c))
    assert got.item() == pytest.approx(want, rel=1e-10)
    empty = losses.neighbor_adjusting_loss(torch.tensor(S), torch.zeros(6, 0, dtype=torch.float64), 2, 3.0)
    none = losses.neighbor_adjusting_loss(torch.tensor(S), None, 2, 3.0)
    assert empty.item() == pytest.approx(np_neighbor_loss(S, None, 2, 3.0, centrality=np.zeros(6)))
    assert none.item() == empty.item()
    one = losses.neighbor_adjusting_loss(torch.tensor([[0.5]]), None, 20, 3.0)
    assert one.item() == pytest.approx(0.0, abs=1e-12)


def np_uniform_loss(G, tau, beta, iters):
    m, n = G.shape
    log_mu = np.full(m, -math.log(m + n))
    log_nu = np.full(n, -math.log(m + n))
    u, v = np.zeros(m), np.zeros(n)
    for _ in range(iters):
        u = np.array([log_mu[i] - math.log(sum(math.exp(G[i, j] + v[j]) for j in range(n))) for i in range(m)])
        v = np.array([log_nu[j] - math.log(sum(math.exp(G[i, j] + u[i]) for i in range(m))) for j in range(n)])
    Q = np.exp(G + u[:, None] + v[None, :] + math.log(m + n))
    P = beta * Q + (1 - beta) * np.eye(m, n)
    return -np.mean([sum(P[i, j] * np_log_softmax(tau * G[i])[j] for j in range(n)) for i in range(m)])


@pytest.mark.parametrize("shape", [(3, 3), (4, 4), (3, 5)])
def test_uniform_regularization_by_hand(shape):
    rng = np.random.default_rng(3)
    G = rng.normal(size=shape) * 2
    want = np_uniform_loss(G, 3.0, 0.7, 50)
    got = losses.uniform_regularization_loss(torch.tensor(G), 3.0, 0.7, 50)
    assert got.item() == pytest.approx(want, rel=1e-9)
    # plan's row sums: Q rows sum to about n/(m+n)*... ; beta=0 is plain cross-entropy on the diagonal
    ce = losses.uniform_regularization_loss(torch.tensor(G), 3.0, 0.0, 50)
    assert ce.item() == pytest.approx(-np.mean([np_log_softmax(3 * G[i])[i] for i in range(shape[0])]))


def test_uniform_plan_detached_by_default():
    G = torch.randn(5, 5, dtype=torch.float64, requires_grad=True)
    g1, = torch.autograd.grad(losses.uniform_regularization_loss(G, 3.0, 0.7, 50), G)
    g2, = torch.autograd.grad(losses.uniform_regularization_loss(G, 3.0, 0.7, 50, detach_plan=False), G)
    assert not torch.allclose(g1, g2)
    # detached: the gradient is that of -sum P log_softmax with P constant
    Gd = G.detach().clone().requires_grad_(True)
    with torch.no_grad():
        log_plan = nbretr.ops.sinkhorn_log(Gd[None], n_iters=50)[0][0]
        P = 0.7 * torch.exp(log_plan + math.log(10)) + 0.3 * torch.eye(5, dtype=torch.float64)
    ref = -(P * torch.log_softmax(3 * Gd, 1)).sum(1).mean()
    g3, = torch.autograd.grad(ref, Gd)
    torch.testing.assert_close(g1, g3)


def test_kl_by_hand():
    g = np.array([[1.0, 2.0, 0.5], [0.2, 0.1, 0.3], [3.0, 1.0, 2.0]])
    p_all = [np.exp(np_log_softmax(S3[i])) for i in range(3)]
    want = sum(p_all[i][j] * (math.log(p_all[i][j]) - np_log_softmax(g[i])[j])
               for i in range(3) for j in range(3)) / 9
    got = losses.kl_consistency_loss(torch.tensor(g), torch.tensor(S3))
    assert got.item() == pytest.approx(want, rel=1e-12)
    with warnings.catch_warnings():  # its reduction="mean" warns; it is the reference's call
        warnings.simplefilter("ignore")
        ref = torch.nn.functional.kl_div(torch.log_softmax(torch.tensor(g), 1),
                                         torch.softmax(torch.tensor(S3), 1), reduction="mean")
    assert got.item() == pytest.approx(ref.item(), rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_losses_compute_in_fp32(dtype):
    s = torch.randn(6, 6).to(dtype)
    w = torch.rand(6).to(dtype)
    for out in (losses.infonce_loss(s), losses.centrality_weighting_loss(s, w),
                losses.neighbor_adjusting_loss(s, torch.randn(6, 9).to(dtype), 2, 3.0),
                losses.uniform_regularization_loss(s, 3.0, 0.7, 50), losses.kl_consistency_loss(s, s.T)):
        assert out.dtype == torch.float32 and torch.isfinite(out)


def test_neighbor_gradients_flow_to_sim_and_bank():
    S = torch.randn(8, 8, dtype=torch.float64, requires_grad=True)
    M = torch.randn(8, 11, dtype=torch.float64, requires_grad=True)
    losses.neighbor_adjusting_loss(S, M, 3, 3.0).backward()
    assert torch.isfinite(S.grad).all() and S.grad.abs().sum() > 0
    assert torch.isfinite(M.grad).all() and M.grad.abs().sum() > 0
    torch.autograd.gradcheck(lambda s, m: losses.neighbor_adjusting_loss(s, m, 3, 3.0),
                             (S.detach().requires_grad_(), M.detach().requires_grad_()))


def test_errors():
    with pytest.raises(ValueError, match="square"):
        losses.infonce_loss(torch.randn(3, 4))
    with pytest.raises(ValueError, match="weights must have shape"):
        losses.centrality_weighting_loss(torch.randn(3, 3), torch.rand(4))
    with pytest.raises(ValueError, match="bank_sim must have 3 rows"):
        losses.neighbor_adjusting_loss(torch.randn(3, 3), torch.randn(4, 5), 1, 3.0)
    with pytest.raises(ValueError, match="normalize_over"):
        losses.neighbor_adjusting_loss(torch.randn(3, 3), None, 1, 3.0, normalize_over="all")


def test_uniform_ext_matches_torch():
    require_ext_ops("sinkhorn_log")
    G = torch.randn(32, 32) * 3
    a = losses.uniform_regularization_loss(G, 3.0, 0.7, 50, backend="torch")
    b = losses.uniform_regularization_loss(G, 3.0, 0.7, 50, backend="ext")
    torch.testing.assert_close(b, a, rtol=1e-5, atol=0)
