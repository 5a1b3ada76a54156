"""Streaming ranks, N_k and the hubness corrections against dense computations."""
import torch
import pytest

from nbretr import retrieval as R


def _dense_fn(S):
    return lambda qs, gs: S[qs, gs]


def _dense_rank(S, q, targets):
    best = None
    for t in targets:
        row = S[q]
        r = int(((row > row[t]) | ((row == row[t]) & (torch.arange(len(row)) < t))).sum()) + 1
        best = r if best is None else min(best, r)
    return best


@pytest.mark.parametrize("q_chunk,g_chunk", [(3, 4), (64, 64)])
def test_stream_ranks_match_dense(q_chunk, g_chunk):
    S = torch.randn(17, 11).round(decimals=1)      # rounding makes ties
    targets = [[i % 11] for i in range(17)]
    targets[3] = [1, 5, 9]                           # multi-target: best rank counts
    st = R.stream_ranks(_dense_fn(S), 17, 11, targets, k=4, q_chunk=q_chunk, g_chunk=g_chunk)
    for q in range(17):
        assert st.ranks[q] == _dense_rank(S, q, targets[q])
    # top-k: descending, ties by lower index
    for q in range(17):
        row = S[q].tolist()
        order = sorted(range(11), key=lambda j: (-row[j], j))[:4]
        assert st.topk_indices[q].tolist() == order
    assert st.counts.sum() == 17 * 4
    assert torch.equal(st.counts, torch.bincount(st.topk_indices.reshape(-1), minlength=11))
    torch.testing.assert_close(st.sums, S.double().sum(0))


def test_corrections_against_formulas():
    torch.manual_seed(0)
    Q, G, B = 6, 9, 13
    S = torch.randn(Q, G)
    SB = torch.randn(B, G)
    beta = 20.0
    stats = R.bank_stats(_dense_fn(SB), B, G, beta=beta, ks=(3, 128), q_chunk=4, g_chunk=5)
    torch.testing.assert_close(stats.lse, torch.logsumexp(beta * SB, 0))
    torch.testing.assert_close(stats.topk_mean[3], SB.topk(3, dim=0).values.mean(0))
    torch.testing.assert_close(stats.topk_mean[128], SB.mean(0))    # k clipped to the bank
    hit = torch.zeros(G, dtype=torch.bool)
    hit[SB.argmax(1)] = True
    assert torch.equal(stats.top1_hit, hit)
    inv = torch.exp(beta * S) / torch.exp(beta * SB).sum(0)
    torch.testing.assert_close(R.inverted_softmax(S, stats).exp(), inv, rtol=1e-4, atol=0)
    qb = R.qb_norm(S, stats)
    for q in range(Q):
        if hit[S[q].argmax()]:
            torch.testing.assert_close(qb[q], R.inverted_softmax(S[q:q + 1], stats)[0])
        else:
            torch.testing.assert_close(qb[q], S[q])
    torch.testing.assert_close(R.nnn(S, stats, alpha=0.75, k=3), S - 0.75 * SB.topk(3, 0).values.mean(0))
    r_g = S.topk(3, dim=1).values.mean(1, keepdim=True)
    torch.testing.assert_close(R.csls(S, stats, k=3), 2 * S - r_g - SB.topk(3, 0).values.mean(0))
    col = R.column_lse(_dense_fn(S), Q, G, temp=100.0, q_chunk=4, g_chunk=5)
    torch.testing.assert_close(R.dual_softmax(S, col), S * torch.softmax(100 * S, dim=0))
    rl = R.row_lse(_dense_fn(S), Q, G, temp=2.0, q_chunk=4, g_chunk=5)
    torch.testing.assert_close(rl, torch.logsumexp(2 * S, 1))


def test_stream_ranks_bad_k():
    with pytest.raises(ValueError, match="k must be in \\[1, 3\\]"):
        R.stream_ranks(_dense_fn(torch.zeros(2, 3)), 2, 3, [[0], [1]], k=4)
