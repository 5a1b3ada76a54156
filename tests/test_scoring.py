"""The scoring engine (nbretr.scoring): streaming ranks, N_k, tie rules and bank statistics
against dense computations (the corrections themselves: tests/test_corrections.py)."""
import torch
import pytest

from nbretr import ops, scoring

from helpers import require_ext


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
    st = scoring.stream(_dense_fn(S), 17, 11, targets, k=4, q_chunk=q_chunk, g_chunk=g_chunk)
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
    stats = scoring.bank_stats(_dense_fn(SB), B, G, betas=(20.0, 0.5), mean_ks=(3, 128), hit_ks=(1, 2),
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
    assert scoring.bank_stats(_dense_fn(SB), B, G, hit_ks=(G + 1,)).hits[G + 1].all()    # k clipped to the gallery
    with pytest.raises(ValueError, match="activation k must be >= 1"):
        scoring.bank_stats(_dense_fn(SB), B, G, hit_ks=(0,))
    with pytest.raises(ValueError, match="bank is empty"):
        scoring.bank_stats(_dense_fn(SB), 0, G)


@pytest.mark.parametrize("q_chunk", [2, 5, 64])
def test_random_ties_spread_equal_scores(q_chunk):
    """--hubness-ties random: among equal scores the top-k pick is random per query (as
    scikit-hubness), a fixed function of (query, gallery item, seed): chunking and the query
    offset of a distributed share do not change it. Strictly better items always come first."""
    Q, G, k = 3000, 6, 2
    S = torch.zeros(Q, G)
    S[:, 5] = 1.0                                    # item 5 beats the five tied items
    st = scoring.stream(_dense_fn(S), Q, G, [[0]] * Q, k=k, ties="random", tie_seed=3, q_chunk=q_chunk)
    assert (st.topk_indices[:, 0] == 5).all()
    share = st.counts[:5].double() / Q               # each tied item: P = 1/5 for the one free slot
    assert ((share - 0.2).abs() < 0.03).all(), share
    low = scoring.stream(_dense_fn(S), Q, G, [[0]] * Q, k=k, q_chunk=q_chunk)
    assert low.counts.tolist() == [Q, 0, 0, 0, 0, Q]  # lower-index rule: one artificial hub
    ref = scoring.stream(_dense_fn(S), Q, G, [[0]] * Q, k=k, ties="random", tie_seed=3, q_chunk=7)
    assert torch.equal(st.topk_indices, ref.topk_indices)
    part = scoring.stream(lambda qs, gs: S[qs.start + 1000:qs.stop + 1000, gs], 500, G, [[0]] * 500, k=k,
                          ties="random", tie_seed=3, q_offset=1000, q_chunk=q_chunk)
    assert torch.equal(part.topk_indices, ref.topk_indices[1000:1500])
    other = scoring.stream(_dense_fn(S), Q, G, [[0]] * Q, k=k, ties="random", tie_seed=4)
    assert not torch.equal(other.topk_indices, st.topk_indices)
    assert torch.equal(st.ranks, low.ranks)          # target ranks keep the lower-index rule
    with pytest.raises(ValueError, match="ties must be one of"):
        scoring.stream(_dense_fn(S), Q, G, [[0]] * Q, k=k, ties="first")


def test_stream_ranks_bad_k():
    with pytest.raises(ValueError, match="k must be in \\[1, 3\\]"):
        scoring.stream(_dense_fn(torch.zeros(2, 3)), 2, 3, [[0], [1]], k=4)


# -- the engine against an independent full-sort reference ------------------------------------

def argsort_reference(S, targets, k):
    """Ranks, top-k and N_k from a stable descending argsort of the full matrix: the tie rule
    (equal scores, lower index first) by construction; a query's rank is its best target's."""
    order = torch.argsort(S, dim=1, descending=True, stable=True)
    pos = torch.argsort(order, dim=1)                   # column -> its place in the sorted row
    ranks = torch.tensor([min(int(pos[i, t]) for t in ts) + 1 for i, ts in enumerate(targets)])
    topk = order[:, :k]
    return ranks, topk, torch.bincount(topk.reshape(-1), minlength=S.shape[1])


@pytest.mark.parametrize("backend", ["torch", "ext"])
@pytest.mark.parametrize("q_chunk,g_chunk", [(1, 1), (4, 7), (64, 64)])
def test_stream_with_rescore_matches_argsort_reference(backend, q_chunk, g_chunk):
    """Every row block is rescored (here: a per-query sign and a per-item offset, so the hook
    must get the global query slice) and then ranked; ties everywhere (rounded scores)."""
    if backend == "ext":
        require_ext("cpu")
    Q, G, k = 37, 29, 5
    S = torch.randn(Q, G).round(decimals=1)
    sign = torch.where(torch.arange(Q) % 3 == 0, -1.0, 1.0)
    bias = (torch.arange(G) % 4 - 2) * 0.1
    targets = [[(3 * i) % G] for i in range(Q)]
    targets[5] = [2, 11, 20]
    targets[6] = [28, 0]
    with ops.use_backend(backend):
        st = scoring.stream(_dense_fn(S), Q, G, targets, k, q_chunk=q_chunk, g_chunk=g_chunk,
                            rescore=lambda qs, b: (b * sign[qs, None] + bias).round(decimals=1))
    RS = (S * sign[:, None] + bias).round(decimals=1)
    ranks, topk, counts = argsort_reference(RS, targets, k)
    assert torch.equal(st.ranks, ranks)
    assert torch.equal(st.topk_indices, topk)
    assert torch.equal(st.counts, counts)
    torch.testing.assert_close(st.sums, RS.double().sum(0))


def test_stream_fp64_blocks_keep_their_ties():
    """fp64 scores are ranked in fp64 (the dual softmax's factors would tie in fp32)."""
    S = torch.tensor([[1.0, 1.0 + 1e-12, 1.0 - 1e-12]], dtype=torch.float64)
    st = scoring.stream(_dense_fn(S), 1, 3, [[0]], 3)
    assert st.topk_indices.tolist() == [[1, 0, 2]] and st.ranks.tolist() == [2]


def test_query_without_target_ranks_past_the_gallery():
    S = torch.randn(3, 4)
    st = scoring.stream(_dense_fn(S), 3, 4, [[0], [], [3]], 2)
    assert st.ranks[1] == 5
    ranks, _, _ = argsort_reference(S, [[0], [0], [3]], 2)
    assert st.ranks[0] == ranks[0] and st.ranks[2] == ranks[2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ranks_of_embeddings_match_argsort_reference(dtype):
    """scoring.ranks (the hubness command's and retrieval_report's ranks): integer features,
    so the dot products are exact and tie a lot."""
    q = torch.randint(-2, 3, (41, 6)).to(dtype)
    g = torch.randint(-2, 3, (67, 6)).to(dtype)
    t = torch.randint(0, 67, (41,))
    S = q.float() @ g.float().T
    want, _, _ = argsort_reference(S, [[int(x)] for x in t], 1)
    for elems in (1, 100, 10 ** 6):
        assert torch.equal(scoring.ranks(q, g, t, max_tile_elems=elems), want)
    owner = torch.randint(0, 41, (67,))
    owner[:41] = torch.arange(41)
    want, _, _ = argsort_reference(S, [(owner == i).nonzero().flatten().tolist() for i in range(41)], 1)
    assert torch.equal(scoring.ranks(q, g, gallery_owner=owner, max_tile_elems=300), want)
    with pytest.raises(ValueError, match="query 3 owns no gallery item"):
        scoring.ranks(q, g, gallery_owner=torch.tensor([0, 1, 2] + [4] * 64))


def _triples(n, L, D, dtype=torch.float32):
    x = torch.nn.functional.normalize(torch.randn(n, L, D), dim=-1)
    x = (x * 4).round() / 4                              # coarse tokens: tied similarities
    mask = (torch.rand(n, L) > 0.2).long()
    mask[:, 0] = 1
    w = torch.softmax(torch.randn(n, L), dim=-1)
    return x.to(dtype), mask, w


@pytest.mark.parametrize("backend", ["torch", "ext"])
def test_eval_directions_match_dense_wti_and_argsort(backend):
    """Evaluation's two directions (WTI score function, multi-caption video->text, the
    best-caption ranking) through the engine, against the dense WTI matrix and argsort."""
    if backend == "ext":
        require_ext("cpu")
    from nbretr import eval as E
    from nbretr.runtime import Dist
    texts, vids = _triples(23, 5, 8), _triples(9, 4, 8)
    c2v = torch.tensor([i % 9 for i in range(23)])
    with ops.use_backend(backend):
        S = ops.wti_similarity(*texts, *vids).float()    # [texts, videos]
        opts = E.RankOptions(q_chunk=4)
        t2v = E._rank_direction(scoring.wti_score_fn(texts, vids, q_is_text=True), 23, 9,
                                scoring.as_targets(c2v, 23), 3, Dist(), opts)
        v2t_targets = [(c2v == v).nonzero().flatten().tolist() for v in range(9)]
        v2t = E._rank_direction(scoring.wti_score_fn(vids, texts, q_is_text=False), 9, 23,
                                scoring.as_targets(v2t_targets, 9), 3, Dist(), opts)
        best = E._rank_direction(E.best_caption_score_fn(vids, texts, c2v), 9, 9,
                                 scoring.as_targets(torch.arange(9), 9), 3, Dist(), opts)
    r, tk, c = argsort_reference(S, [[int(v)] for v in c2v], 3)
    assert torch.equal(t2v.ranks, r) and torch.equal(t2v.topk_indices, tk) and torch.equal(t2v.counts, c)
    r, tk, c = argsort_reference(S.T.contiguous(), v2t_targets, 3)
    assert torch.equal(v2t.ranks, r) and torch.equal(v2t.topk_indices, tk) and torch.equal(v2t.counts, c)
    VB = torch.stack([S[c2v == g].amax(0) for g in range(9)], 1)   # [query video, gallery video]
    r, tk, c = argsort_reference(VB, [[v] for v in range(9)], 3)
    assert torch.equal(best.ranks, r) and torch.equal(best.topk_indices, tk) and torch.equal(best.counts, c)
