"""Streaming ranks, N_k, tie rules and bank statistics against dense computations (the
corrections themselves: tests/test_corrections.py)."""
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


def test_bank_stats_against_dense():
    torch.manual_seed(0)
    G, B = 9, 13
    SB = torch.randn(B, G).round(decimals=1)        # ties: the activation sets use the lower index
    stats = R.bank_stats(_dense_fn(SB), B, G, betas=(20.0, 0.5), mean_ks=(3, 128), hit_ks=(1, 2),
                         q_chunk=4, g_chunk=5)
    assert stats.size == B
    for beta in (20.0, 0.5):
        torch.testing.assert_close(stats.lse[beta], torch.logsumexp(beta * SB.double(), 0))
    torch.testing.assert_close(stats.topk_mean[3], SB.topk(3, dim=0).values.mean(0))
    torch.testing.assert_close(stats.topk_mean[128], SB.mean(0))    # k clipped to the bank
    for k in (1, 2):
        hit = torch.zeros(G, dtype=torch.bool)
        for row in SB.tolist():
            for j in sorted(range(G), key=lambda j: (-row[j], j))[:k]:
                hit[j] = True
        assert torch.equal(stats.hits[k], hit), k
    assert R.bank_stats(_dense_fn(SB), B, G, hit_ks=(G + 1,)).hits[G + 1].all()    # k clipped to the gallery
    with pytest.raises(ValueError, match="activation k must be >= 1"):
        R.bank_stats(_dense_fn(SB), B, G, hit_ks=(0,))
    with pytest.raises(ValueError, match="bank is empty"):
        R.bank_stats(_dense_fn(SB), 0, G)


@pytest.mark.parametrize("q_chunk", [2, 5, 64])
def test_random_ties_spread_equal_scores(q_chunk):
    """--hubness-ties random: among equal scores the top-k pick is random per query (as
    scikit-hubness), a fixed function of (query, gallery item, seed): chunking and the query
    offset of a distributed share do not change it. Strictly better items always come first."""
    Q, G, k = 3000, 6, 2
    S = torch.zeros(Q, G)
    S[:, 5] = 1.0                                    # item 5 beats the five tied items
    st = R.stream_ranks(_dense_fn(S), Q, G, [[0]] * Q, k=k, ties="random", tie_seed=3, q_chunk=q_chunk)
    assert (st.topk_indices[:, 0] == 5).all()
    share = st.counts[:5].double() / Q               # each tied item: P = 1/5 for the one free slot
    assert ((share - 0.2).abs() < 0.03).all(), share
    low = R.stream_ranks(_dense_fn(S), Q, G, [[0]] * Q, k=k, q_chunk=q_chunk)
    assert low.counts.tolist() == [Q, 0, 0, 0, 0, Q]  # lower-index rule: one artificial hub
    ref = R.stream_ranks(_dense_fn(S), Q, G, [[0]] * Q, k=k, ties="random", tie_seed=3, q_chunk=7)
    assert torch.equal(st.topk_indices, ref.topk_indices)
    part = R.stream_ranks(lambda qs, gs: S[qs.start + 1000:qs.stop + 1000, gs], 500, G, [[0]] * 500, k=k,
                          ties="random", tie_seed=3, q_offset=1000, q_chunk=q_chunk)
    assert torch.equal(part.topk_indices, ref.topk_indices[1000:1500])
    other = R.stream_ranks(_dense_fn(S), Q, G, [[0]] * Q, k=k, ties="random", tie_seed=4)
    assert not torch.equal(other.topk_indices, st.topk_indices)
    assert torch.equal(st.ranks, low.ranks)          # target ranks keep the lower-index rule
    with pytest.raises(ValueError, match="ties must be one of"):
        R.stream_ranks(_dense_fn(S), Q, G, [[0]] * Q, k=k, ties="first")


def test_stream_ranks_bad_k():
    with pytest.raises(ValueError, match="k must be in \\[1, 3\\]"):
        R.stream_ranks(_dense_fn(torch.zeros(2, 3)), 2, 3, [[0], [1]], k=4)
