"""topk_rank on every backend against a full-sort oracle (docs/operators.md, "topk_rank").

Scores are rounded (or small integers), so ties are everywhere: the top-k lists, the
k-occurrence counts and the target ranks must equal the oracle exactly, which checks the
tie rule (descending score, equal scores by lower column index) bit for bit.
"""
import re

import pytest
import torch

from nbretr import ops

from helpers import require_ext

BACKENDS = ["torch", "ext"]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _ok(backend, device="cpu"):
    if backend == "ext":
        require_ext(device)


def oracle(s, k, targets=None):
    """A stable descending argsort of every row: the tie rule by construction. The rank of a
    row's target is its position in the sorted row + 1; a row's rank is its best target's."""
    order = torch.argsort(s.double(), dim=1, descending=True, stable=True)
    idx = order[:, :k]
    vals = s.gather(1, idx)
    counts = torch.bincount(idx.flatten(), minlength=s.shape[1])
    ranks = None
    if targets is not None:
        pos = torch.empty_like(order)
        pos.scatter_(1, order, torch.arange(s.shape[1]).expand_as(order).contiguous())
        r = []
        for i in range(s.shape[0]):
            ts = [int(t) for t in targets[i] if t >= 0]
            r.append(min(int(pos[i, t]) for t in ts) + 1)
        ranks = torch.tensor(r, dtype=torch.int64)
    return vals, idx, counts, ranks


def tie_scores(R, G, dtype, levels=5):
    """Scores with few distinct values (huge tie groups), exact in every dtype."""
    return (torch.randint(-levels, levels + 1, (R, G)).double() / 4).to(dtype)


def some_targets(R, G, T=3):
    t = torch.randint(0, G, (R, T))
    t[:, 1:][torch.rand(R, T - 1) < 0.5] = -1       # ragged: -1 padding
    return t


SHAPES = [  # R, G, k
    (1, 1, 1),
    (1, 7, 7),       # k = G
    (5, 1, 0),       # ranks only
    (17, 33, 4),
    (33, 301, 10),
    (64, 2100, 100),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_exact_against_sort_oracle(backend, dtype, shape):
    _ok(backend)
    R, G, k = shape
    s = tie_scores(R, G, dtype)
    t = some_targets(R, G)
    v, i, r, c = ops.topk_rank(s, k, targets=t, backend=backend)
    ov, oi, oc, orank = oracle(s, k, t)
    assert v.dtype == dtype and i.dtype == torch.int64 and r.dtype == torch.int64 and c.dtype == torch.int64
    assert torch.equal(i, oi)
    assert torch.equal(v, ov)
    assert torch.equal(c, oc)
    assert torch.equal(r, orank)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rank_is_the_count_of_items_before_the_target(backend):
    """The contract's formula, written out: 1 + #{j : s_j > s_t or (s_j == s_t and j < t)}."""
    _ok(backend)
    s = torch.tensor([[0.9, 0.5, 0.9, 0.1],
                      [0.2, 0.2, 0.2, 0.3]])
    assert ops.topk_rank(s, targets=torch.tensor([[2], [1]]), backend=backend)[2].tolist() == [2, 3]
    # several targets: the best one's rank (row 0: item 1 at 0.5 -> 3; row 1: items 0 and 2 tie -> item 0)
    t = torch.tensor([[1, 3], [2, 0]])
    assert ops.topk_rank(s, targets=t, backend=backend)[2].tolist() == [3, 2]


@pytest.mark.parametrize("backend", BACKENDS)
def test_infinities_signed_zeros_and_random_reals(backend):
    _ok(backend)
    s = torch.tensor([[0.0, -0.0, float("inf"), float("-inf"), 0.0, float("inf"), -1.0]])
    t = torch.tensor([[1]])
    v, i, r, _ = ops.topk_rank(s, 7, targets=t, backend=backend)
    assert i.tolist() == [[2, 5, 0, 1, 4, 6, 3]]       # +0 and -0 are equal: by index
    assert r.tolist() == [4]
    x = torch.randn(40, 5000, dtype=torch.float64)
    x[:, ::7] = float("-inf")                           # as the best-caption blocks' empty columns
    tt = some_targets(40, 5000, 5)
    got = ops.topk_rank(x, 50, targets=tt, backend=backend)
    want = oracle(x, 50, tt)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[3]) and torch.equal(got[3], want[2])


@pytest.mark.parametrize("dtype", DTYPES)
def test_ext_equals_torch_path(dtype):
    require_ext("cpu")
    s = torch.randn(300, 4097).to(dtype)                # bf16/fp16 rounding: many ties
    t = some_targets(300, 4097, 4)
    a = ops.topk_rank(s, 32, targets=t, backend="ext")
    b = ops.topk_rank(s, 32, targets=t, backend="torch")
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_counts_accumulate_no_targets_and_empty(backend):
    _ok(backend)
    s = tie_scores(9, 13, torch.float32)
    c = torch.full((13,), 5, dtype=torch.int64)
    v, i, r, c2 = ops.topk_rank(s, 3, counts=c, backend=backend)
    assert c2 is c and r.shape == (0,)
    assert torch.equal(c, 5 + oracle(s, 3)[2])
    v, i, r, c3 = ops.topk_rank(torch.zeros(0, 13), 3, targets=torch.zeros(0, 1, dtype=torch.int64),
                                counts=c, backend=backend)
    assert v.shape == (0, 3) and i.shape == (0, 3) and r.shape == (0,)
    assert torch.equal(c3, 5 + oracle(s, 3)[2])        # untouched


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_not_modified_and_noncontiguous(backend):
    _ok(backend)
    base = tie_scores(40, 30, torch.float32)
    s = base.t()                                        # [30, 40], not contiguous
    keep = s.clone()
    t = torch.randint(0, 40, (1, 30)).t()               # [30, 1], not contiguous
    got = ops.topk_rank(s, 5, targets=t, backend=backend)
    want = oracle(s.contiguous(), 5, t)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[3])
    assert torch.equal(s, keep)


def _err_cases():
    s = torch.zeros(3, 4)
    t = torch.zeros(3, 1, dtype=torch.int64)
    nan = s.clone()
    nan[1, 2] = float("nan")
    return [
        (dict(scores=torch.zeros(4)), "scores must be a 2-D tensor [R, G], got shape [4]"),
        (dict(scores=torch.zeros(3, 4, dtype=torch.int32)), "scores has dtype torch.int32; expected"),
        (dict(scores=s, k=5), "k must be in [0, G=4], got 5"),
        (dict(scores=s, k=-1), "k must be in [0, G=4], got -1"),
        (dict(scores=s, targets=torch.zeros(2, 1, dtype=torch.int64)),
         "targets must have shape [R=3, T >= 1], got [2, 1]"),
        (dict(scores=s, targets=torch.zeros(3, 0, dtype=torch.int64)),
         "targets must have shape [R=3, T >= 1], got [3, 0]"),
        (dict(scores=s, targets=t.int()), "targets must have dtype torch.int64, got torch.int32"),
        (dict(scores=s, counts=torch.zeros(5, dtype=torch.int64)), "counts must have shape [G=4], got [5]"),
        (dict(scores=s, counts=torch.zeros(4)), "counts must have dtype torch.int64, got torch.float32"),
        (dict(scores=s, counts=torch.zeros(4, 2, dtype=torch.int64)[:, 0]), "counts must be contiguous"),
        (dict(scores=s, targets=torch.tensor([[0], [4], [1]])), "targets[1, 0] = 4 is outside [-1, G=4)"),
        (dict(scores=s, targets=torch.tensor([[0], [-2], [1]])), "targets[1, 0] = -2 is outside [-1, G=4)"),
        (dict(scores=s, targets=torch.tensor([[0, 1], [-1, -1], [1, -1]])), "targets row 1 has no target"),
        (dict(scores=nan, targets=t), "scores contain NaN values"),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_errors_name_the_argument(backend):
    _ok(backend)
    for kw, msg in _err_cases():
        kw = dict(kw)
        s, k = kw.pop("scores"), kw.pop("k", 1)
        with pytest.raises(RuntimeError, match=r"nbretr\.topk_rank: " + re.escape(msg)):
            ops.topk_rank(s, k, backend=backend, **kw)


def test_cpp_checks_match_python_messages():
    """The registered op checks its own arguments (direct torch.ops calls) with the same words,
    and a refused call leaves the counts untouched."""
    require_ext("cpu")
    for kw, msg in _err_cases():
        s = kw["scores"]
        G = s.shape[1] if s.dim() == 2 else 0
        c = kw.get("counts", torch.zeros(G, dtype=torch.int64))
        keep = c.clone()
        with pytest.raises(RuntimeError, match=re.escape(msg)):
            torch.ops.nbretr.topk_rank(s, kw.get("targets"), kw.get("k", min(1, G)), c)
        assert torch.equal(c, keep)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_targets", [True, False])
def test_opcheck(dtype, with_targets):
    require_ext("cpu")
    s = torch.randn(7, 11).to(dtype)
    t = some_targets(7, 11) if with_targets else None
    c = torch.zeros(11, dtype=torch.int64)
    torch.library.opcheck(torch.ops.nbretr.topk_rank, (s, t, 3, c),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_no_cuda_kernel_auto_runs_the_torch_path():
    """There is no CUDA kernel: on a CUDA device "auto" resolves to the torch path."""
    from nbretr.ops import _backend
    assert _backend.resolve("topk_rank", "auto", torch.device("cuda", 0)) == "torch"
