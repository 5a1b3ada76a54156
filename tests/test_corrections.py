"""The inference-time hubness corrections (nbretr.retrieval) against their published
definitions, each expected value computed here independently: plain Python/numpy loops
over small matrices, or numbers worked out by hand and written down."""
import math

import numpy as np
import pytest
import torch

from nbretr import retrieval as R
from nbretr import scoring


def _fn(S):
    return lambda qs, gs: S[qs, gs]


def _order(row):
    """Gallery indices of one row, best first, equal values by lower index."""
    return sorted(range(len(row)), key=lambda j: (-row[j], j))


def _activation(bank, k):
    """Gallery items in the top-k of some bank row."""
    out = set()
    for row in bank:
        out |= set(_order(list(row))[:k])
    return out


def _stats(SB, **kw):
    return scoring.bank_stats(_fn(torch.as_tensor(SB, dtype=torch.float64)), len(SB), len(SB[0]), q_chunk=3,
                        g_chunk=4, **kw)


def _rand(*shape, seed):
    return np.random.default_rng(seed).uniform(-0.3, 0.9, size=shape)


# -- DBNorm ---------------------------------------------------------------------------------

# Text->video, worked by hand. Test similarities s(q, g) of 2 queries x 2 videos; a query
# bank of 1 training caption, neutral (0.5 to both videos); a gallery bank of 2 training
# videos, both close to video 0 (video 0 looks like a hub from the gallery side).
HAND_S = [[0.9, 0.8],
          [0.2, 0.6]]
HAND_QBANK = [[0.5, 0.5]]
HAND_GBANK = [[0.9, 0.1],
              [0.8, 0.2]]
# b1 = 1/1.99, b2 = 3.
# query factor exp(b1 s(q,g)) / exp(b1 0.5) = exp((s - 0.5) / 1.99):
#   q0: exp(0.4/1.99) = 1.222631, exp(0.3/1.99) = 1.162710
#   q1: exp(-0.3/1.99) = 0.860059, exp(0.1/1.99) = 1.051535
# gallery factor exp(3 s(q,g)) / sum_g' exp(3 s(g',g)); the sums are
#   video 0: e^2.7 + e^2.4 = 14.879732 + 11.023176 = 25.902908
#   video 1: e^0.3 + e^0.6 =  1.349859 +  1.822119 =  3.171978
#   q0: e^2.7 / 25.902908 = 0.574443, e^2.4 / 3.171978 = 3.475175
#   q1: e^0.6 / 25.902908 = 0.070344, e^1.8 / 3.171978 = 1.907216
# DBNorm = product:
HAND_DBNORM = [[1.222631 * 0.574443, 1.162710 * 3.475175],     # 0.702331, 4.040622
               [0.860059 * 0.070344, 1.051535 * 1.907216]]     # 0.060500, 2.005505
# q0's best video turns from 0 (raw 0.9 > 0.8) to 1. The former nbretr "DBNorm" divided by
# a per-query sum over the gallery bank of exp(beta s(q, g')) (constant along the row) and
# so ranked like the query-bank inverted softmax: with this neutral query bank, video 0.


def test_dbnorm_hand_example():
    S = torch.tensor(HAND_S, dtype=torch.float64)
    q = _stats(HAND_QBANK, betas=(1 / 1.99,), hit_ks=(1,))
    g = _stats(HAND_GBANK, betas=(3.0,), hit_ks=(1,))
    out = R.db_norm(S, q, g)                                      # the authors' default betas
    torch.testing.assert_close(out.exp(), torch.tensor(HAND_DBNORM, dtype=torch.float64), rtol=1e-5, atol=0)
    st = scoring.stream(_fn(S), 2, 2, [[1], [1]], k=1, rescore=lambda qs, b: R.db_norm(b, q, g))
    assert st.ranks.tolist() == [1, 1]                            # raw: q0 ranks video 1 second
    assert scoring.stream(_fn(S), 2, 2, [[1], [1]], k=1).ranks.tolist() == [2, 1]
    assert R.DBNORM_BETA1 == pytest.approx(1 / 1.99) and R.DBNORM_BETA2 == 3.0


def test_dbnorm_dynamic_hand_example():
    """Dual dynamic inverted softmax, k = 1. Activation sets: the query bank's top-1 is video 0
    (a tie, lower index), the gallery bank's top-1s are video 0 and video 0. q0's top-1 is
    video 0: both factors apply (= the static values). q1's top-1 is video 1, in neither set:
    each factor is its numerator exp(b s), the row exp((b1 + b2) s)."""
    S = torch.tensor(HAND_S, dtype=torch.float64)
    q = _stats(HAND_QBANK, betas=(1 / 1.99,), hit_ks=(1,))
    g = _stats(HAND_GBANK, betas=(3.0,), hit_ks=(1,))
    out = R.db_norm(S, q, g, dynamic=True, k=1).exp()
    b = 1 / 1.99 + 3
    want = [HAND_DBNORM[0], [math.exp(b * 0.2), math.exp(b * 0.6)]]
    torch.testing.assert_close(out, torch.tensor(want, dtype=torch.float64), rtol=2e-6, atol=0)


def _ref_dbnorm(S, SQ, SG, b1, b2, dynamic=False, k=1):
    Q, G = S.shape
    AQ, AG = _activation(SQ, k), _activation(SG, k)
    out = np.zeros((Q, G))
    for q in range(Q):
        top1 = _order(list(S[q]))[0]
        for g in range(G):
            fq = math.exp(b1 * S[q, g])
            if not dynamic or top1 in AQ:
                fq /= sum(math.exp(b1 * SQ[i, g]) for i in range(len(SQ)))
            fg = math.exp(b2 * S[q, g])
            if not dynamic or top1 in AG:
                fg /= sum(math.exp(b2 * SG[i, g]) for i in range(len(SG)))
            out[q, g] = fq * fg
    return out


@pytest.mark.parametrize("dynamic,k,seed", [(False, 1, 0), (True, 1, 1), (True, 2, 2), (True, 3, 3)])
def test_dbnorm_against_loops(dynamic, k, seed):
    S, SQ, SG = _rand(7, 5, seed=seed), _rand(9, 5, seed=seed + 10), _rand(6, 5, seed=seed + 20)
    b1, b2 = 1 / 1.99, 3.0
    q = _stats(SQ, betas=(b1,), hit_ks=(k,))
    g = _stats(SG, betas=(b2,), hit_ks=(k,))
    got = R.db_norm(torch.from_numpy(S), q, g, b1, b2, dynamic=dynamic, k=k).exp().numpy()
    np.testing.assert_allclose(got, _ref_dbnorm(S, SQ, SG, b1, b2, dynamic, k), rtol=1e-9)


def test_dbnorm_dynamic_mixes_factors():
    """A row whose top-1 is in the query bank's activation set only gets the query factor."""
    S = np.array([[0.1, 0.7, 0.3]])
    SQ = np.array([[0.0, 0.9, 0.2]])            # activation set {1}
    SG = np.array([[0.8, 0.1, 0.3]])            # activation set {0}
    q = _stats(SQ, betas=(2.0,), hit_ks=(1,))
    g = _stats(SG, betas=(5.0,), hit_ks=(1,))
    got = R.db_norm(torch.from_numpy(S), q, g, 2.0, 5.0, dynamic=True, k=1).exp().numpy()
    want = [[math.exp(2 * s) / math.exp(2 * sq) * math.exp(5 * s) for s, sq in zip(S[0], SQ[0])]]
    np.testing.assert_allclose(got, want, rtol=1e-12)


# -- QB-Norm ----------------------------------------------------------------------------------

def _ref_qbnorm(S, SB, beta, k):
    A = _activation(SB, k)
    out = S.copy()
    norm = set()
    for q in range(S.shape[0]):
        if _order(list(S[q]))[0] in A:
            norm.add(q)
            for g in range(S.shape[1]):
                out[q, g] = math.exp(beta * S[q, g]) / sum(math.exp(beta * SB[b, g]) for b in range(len(SB)))
    return out, norm


@pytest.mark.parametrize("beta,k,seed", [(20.0, 1, 0), (20.0, 2, 1), (5.0, 3, 2), (20.0, 8, 3)])
def test_qbnorm_dynamic_inverted_softmax_against_loops(beta, k, seed):
    S, SB = _rand(10, 8, seed=seed), _rand(6, 8, seed=seed + 50)
    stats = _stats(SB, betas=(beta,), hit_ks=(k,))
    got = R.qb_norm(torch.from_numpy(S), stats, beta, k).numpy()
    want, norm = _ref_qbnorm(S, SB, beta, k)
    if k == 8:
        assert len(norm) == 10                   # every item is activated: the plain inverted softmax
    for q in range(10):
        if q in norm:
            np.testing.assert_allclose(np.exp(got[q]), want[q], rtol=1e-9)
        else:
            np.testing.assert_array_equal(got[q], S[q])
    assert 0 < len(norm) or k == 1


def test_qbnorm_k_widens_the_activation_set():
    """Hand example: bank rows [0.9, 0.5, 0.1] and [0.2, 0.8, 0.7]. k = 1 activates videos
    {0, 1}; k = 2 adds video 2. A query whose top-1 is video 2 is normalised only at k = 2."""
    SB = np.array([[0.9, 0.5, 0.1], [0.2, 0.8, 0.7]])
    S = np.array([[0.3, 0.2, 0.6]])
    stats = _stats(SB, betas=(20.0,), hit_ks=(1, 2))
    assert stats.hits[1].tolist() == [True, True, False]
    assert stats.hits[2].tolist() == [True, True, True]
    np.testing.assert_array_equal(R.qb_norm(torch.from_numpy(S), stats, 20.0, 1).numpy(), S)
    got = np.exp(R.qb_norm(torch.from_numpy(S), stats, 20.0, 2).numpy()[0])
    want = [math.exp(20 * 0.3) / (math.exp(18) + math.exp(4)),
            math.exp(20 * 0.2) / (math.exp(10) + math.exp(16)),
            math.exp(20 * 0.6) / (math.exp(2) + math.exp(14))]
    np.testing.assert_allclose(got, want, rtol=1e-12)


# -- NNN, CSLS, DSL ---------------------------------------------------------------------------

@pytest.mark.parametrize("k,alpha", [(3, 0.75), (128, 0.5)])
def test_nnn_against_loops(k, alpha):
    S, SB = _rand(5, 6, seed=7), _rand(11, 6, seed=8)
    stats = _stats(SB, mean_ks=(k,))
    want = np.zeros_like(S)
    for g in range(6):
        col = sorted(SB[:, g], reverse=True)[:k]          # k clipped to the 11 bank rows
        for q in range(5):
            want[q, g] = S[q, g] - alpha * sum(col) / len(col)
    np.testing.assert_allclose(R.nnn(torch.from_numpy(S), stats, alpha=alpha, k=k).numpy(), want, rtol=1e-12)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_csls_against_loops(k):
    """r_G(q): the k nearest test gallery items of q; r_Q(g): the k nearest query-bank rows."""
    S, SB = _rand(5, 6, seed=9), _rand(4, 6, seed=10)
    stats = _stats(SB, mean_ks=(k,))
    want = np.zeros_like(S)
    for q in range(5):
        rg = sorted(S[q], reverse=True)[:k]
        for g in range(6):
            rq = sorted(SB[:, g], reverse=True)[:k]
            want[q, g] = 2 * S[q, g] - sum(rg) / len(rg) - sum(rq) / len(rq)
    np.testing.assert_allclose(R.csls(torch.from_numpy(S), stats, k=k).numpy(), want, rtol=1e-12)


@pytest.mark.parametrize("temperature", [1000.0, 1.0, 0.01])
def test_dual_softmax_divides_by_the_temperature(temperature):
    """s(q,g) * exp(s(q,g)/T) / sum_q' exp(s(q',g)/T) over the test queries; T = 0.01 is the
    former nbretr convention (scores x 100), T = 1000 CAMoE's code default."""
    S = _rand(6, 4, seed=11)
    col = scoring.column_lse(_fn(torch.from_numpy(S)), 6, 4, temperature=temperature, q_chunk=4, g_chunk=3)
    got = R.dual_softmax(torch.from_numpy(S), col, temperature).numpy()
    want = np.zeros_like(S)
    for g in range(4):
        z = sum(math.exp(S[q, g] / temperature) for q in range(6))
        for q in range(6):
            want[q, g] = S[q, g] * math.exp(S[q, g] / temperature) / z
    np.testing.assert_allclose(got, want, rtol=1e-9)
    assert R.DSL_TEMPERATURE == 1000.0


def test_dual_softmax_float32_keeps_small_factors_apart():
    """A float32 block at T = 0.01: exp(100 s - lse) is far below float32's range for items a
    stronger query dominates; the result is float64, so they are not all tied at 0."""
    S = torch.tensor([[0.9, 0.05, 0.02], [0.1, 2.0, 2.0]])
    col = scoring.column_lse(_fn(S), 2, 3, temperature=0.01)
    out = R.dual_softmax(S[:1], col, 0.01)
    assert out.dtype == torch.float64
    assert out[0, 0] > out[0, 1] > out[0, 2] > 0           # ~0.9, 1e-86, 2e-88
    f32 = S[:1] * torch.exp(100 * S[:1] - col.float())
    assert f32[0, 1] == f32[0, 2] == 0                     # what float32 would have made of them
