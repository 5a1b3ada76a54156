"""topk_centrality (sim="dot") on every backend against a full-matrix oracle (docs/operators.md).

Two kinds of inputs:
- small integers (exact products and sums in fp32, also from fp16/bf16): values, indices,
  counts and sums must equal the oracle exactly, so the tie rule (descending value, equal
  values by lower gallery index) is checked bit for bit on every backend;
- random reals: compared the faiss way (values close; where indices differ the indexed
  oracle values are equal up to tolerance; no index twice in a row).
"""
import pytest
import torch

from nbretr import ops
from nbretr.ops.reference import select_topk, topk_centrality_dot

from helpers import FLOAT_DTYPES, assert_topk_equivalent, require_ext, nbretr_testing_ops

BACKENDS = ["torch", "ext"]


def _ok(backend, device):
    if backend == "ext":
        require_ext(device)


def oracle(q, g, k, exclude_self=False, q_offset=0):
    """Full matrix in fp64, stable sort: the tie rule by construction."""
    s = q.double() @ g.double().T
    s_sum = s.clone()
    if exclude_self:
        r = torch.arange(q.shape[0], device=q.device)
        s[r, r + q_offset] = float("-inf")
        s_sum[r, r + q_offset] = 0
    v, i = torch.sort(s, dim=1, descending=True, stable=True)
    v, i = v[:, :k], i[:, :k]
    counts = torch.bincount(i.flatten(), minlength=g.shape[0])
    return v.float(), i, counts, s_sum.sum(0)


def int_data(Q, G, D, device, dtype, dup=True, lo=-2, hi=3):
    q = torch.randint(lo, hi, (Q, D), device=device).to(dtype)
    g = torch.randint(lo, hi, (G, D), device=device).to(dtype)
    if dup and G > 2:  # deliberately duplicated gallery rows: exact ties
        g[G - 1] = g[0]
        g[G // 2] = g[1]
    return q, g


SHAPES = [  # Q, G, D, k
    (1, 1, 4, 1),
    (1, 7, 3, 7),       # k = G
    (5, 1, 6, 1),
    (17, 33, 5, 4),
    (33, 301, 16, 10),
    (64, 2100, 8, 100),  # crosses a CPU gallery tile (2048)
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_exact_on_integer_data(device, backend, dtype, shape):
    _ok(backend, device)
    Q, G, D, k = shape
    q, g = int_data(Q, G, D, device, dtype)
    v, i, c, s = ops.topk_centrality(q, g, k, backend=backend)
    ov, oi, oc, os_ = oracle(q, g, k)
    assert v.dtype == torch.float32 and i.dtype == torch.int64
    assert c.dtype == torch.int64 and s.dtype == torch.float64
    assert torch.equal(v, ov)
    assert torch.equal(i, oi)
    assert torch.equal(c, oc)
    assert torch.equal(s, os_)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 64, 1024])
def test_large_k_and_many_ties(device, backend, k):
    _ok(backend, device)
    # values in {-1, 0, 1}: huge tie groups straddle the k-th place
    q, g = int_data(9, 2500, 2, device, torch.float32, lo=-1, hi=2)
    v, i, c, s = ops.topk_centrality(q, g, k, backend=backend)
    ov, oi, oc, os_ = oracle(q, g, k)
    assert torch.equal(v, ov) and torch.equal(i, oi) and torch.equal(c, oc) and torch.equal(s, os_)


def assert_faiss_equivalent(v, i, ov, oi, s_full, atol):
    torch.testing.assert_close(v, ov, rtol=0, atol=atol)
    diff = i != oi
    if diff.any():
        rows = diff.nonzero()[:, 0]
        got = s_full[rows, i[diff]]
        want = s_full[rows, oi[diff]]
        torch.testing.assert_close(got, want, rtol=0, atol=2 * atol)
    for row in i.tolist():
        assert len(row) == len(set(row)), f"index repeated in a top-k row: {row}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(13, 97, 33, 9), (40, 2051, 64, 50)])
def test_random_reals_faiss_way(device, backend, dtype, shape):
    _ok(backend, device)
    Q, G, D, k = shape
    q = torch.randn(Q, D, device=device).to(dtype)
    g = torch.randn(G, D, device=device).to(dtype)
    g[G - 1] = g[3]  # duplicated row: equal values, lower index first
    v, i, c, s = ops.topk_centrality(q, g, k, backend=backend)
    s_full = q.double() @ g.double().T
    ov, oi, oc, os_ = oracle(q, g, k)
    assert_faiss_equivalent(v, i, ov, oi, s_full, atol=1e-4)
    # the duplicate never precedes its original in a row
    for row in i.tolist():
        if 3 in row and G - 1 in row:
            assert row.index(3) < row.index(G - 1)
    assert int(c.sum()) == Q * k
    torch.testing.assert_close(s, os_, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_ext_equals_torch_path(device, dtype):
    require_ext(device)
    q = torch.randn(50, 32, device=device).to(dtype)
    g = torch.randn(777, 32, device=device).to(dtype)
    g[500] = g[5]
    a = ops.topk_centrality(q, g, 20, backend="ext")
    b = ops.topk_centrality(q, g, 20, backend="torch")
    s_full = q.double() @ g.double().T
    assert_faiss_equivalent(a[0], a[1], b[0], b[1], s_full, atol=1e-4)
    torch.testing.assert_close(a[3], b[3], rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("q_offset", [0, 5])
def test_exclude_self_and_streaming(device, backend, q_offset):
    _ok(backend, device)
    x = torch.randint(-2, 3, (60, 6), device=device).float()
    x[59] = x[0]
    k = 7
    # whole set at once (q_offset 0) vs. streamed in chunks with q_offset
    ov, oi, oc, os_ = oracle(x, x, k, exclude_self=True)
    if q_offset == 0:
        v, i, c, s = ops.topk_centrality(x, x, k, exclude_self=True, backend=backend)
    else:
        c = torch.zeros(60, dtype=torch.int64, device=device)
        s = torch.zeros(60, dtype=torch.float64, device=device)
        vs, is_ = [], []
        for start in range(0, 60, 23):
            chunk = x[start:start + 23]
            v, i, c2, s2 = ops.topk_centrality(chunk, x, k, exclude_self=True, q_offset=start, counts=c, sums=s,
                                               backend=backend)
            assert c2 is c and s2 is s  # accumulated in place
            vs.append(v)
            is_.append(i)
        v, i = torch.cat(vs), torch.cat(is_)
    assert torch.equal(v, ov) and torch.equal(i, oi)
    assert torch.equal(c, oc) and torch.equal(s, os_)
    assert not (i == torch.arange(60, device=device)[:, None]).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 7, 100])
def test_exclude_self_wide_gallery(device, backend, k):
    """A set against itself over a full-width CPU tile (the kernel selects a row's first
    tile at once, from a bound that must leave out the own item, here usually the row's
    largest value), with tie groups from small integers."""
    _ok(backend, device)
    x = torch.randint(-2, 3, (1500, 12), device=device).float()
    x[1499] = x[0]
    v, i, c, s = ops.topk_centrality(x, x, k, exclude_self=True, backend=backend)
    ov, oi, oc, os_ = oracle(x, x, k, exclude_self=True)
    assert torch.equal(v, ov) and torch.equal(i, oi)
    assert torch.equal(c, oc) and torch.equal(s, os_)


@pytest.mark.parametrize("backend", BACKENDS)
def test_counts_accumulate_and_empty_queries(device, backend):
    _ok(backend, device)
    q, g = int_data(10, 20, 4, device, torch.float32)
    counts = torch.full((20,), 3, dtype=torch.int64, device=device)
    sums = torch.full((20,), 0.5, dtype=torch.float64, device=device)
    ops.topk_centrality(q, g, 4, counts=counts, sums=sums, backend=backend)
    _, _, oc, os_ = oracle(q, g, 4)
    assert torch.equal(counts, oc + 3) and torch.equal(sums, os_ + 0.5)
    before_c, before_s = counts.clone(), sums.clone()
    v, i, c, s = ops.topk_centrality(q[:0], g, 4, counts=counts, sums=sums, backend=backend)
    assert v.shape == (0, 4) and i.shape == (0, 4) and v.dtype == torch.float32 and i.dtype == torch.int64
    assert torch.equal(c, before_c) and torch.equal(s, before_s)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_not_modified_and_noncontiguous(device, backend):
    _ok(backend, device)
    q, g = int_data(12, 40, 6, device, torch.float32)
    qt = q.T.contiguous().T  # non-contiguous view, same values
    gs = torch.cat([g, g], 1)[:, ::2]  # strided
    assert not qt.is_contiguous() or not gs.is_contiguous()
    q0, g0 = qt.clone(), gs.clone()
    v, i, _, _ = ops.topk_centrality(qt, gs, 5, backend=backend)
    ov, oi, _, _ = oracle(q0, g0, 5)
    assert torch.equal(v, ov) and torch.equal(i, oi)
    assert torch.equal(qt, q0) and torch.equal(gs, g0)


def test_requires_grad_inputs_give_no_graph(device):
    q = torch.randn(4, 3, device=device, requires_grad=True)
    g = torch.randn(6, 3, device=device, requires_grad=True)
    v, _, _, _ = ops.topk_centrality(q, g, 2)
    assert not v.requires_grad


def _err_cases(device):
    q = torch.randn(4, 3, device=device)
    g = torch.randn(6, 3, device=device)
    c = torch.zeros(6, dtype=torch.int64, device=device)
    s = torch.zeros(6, dtype=torch.float64, device=device)
    nan_q = q.clone()
    nan_q[1, 2] = float("nan")
    inf_g = g.clone()
    inf_g[0, 0] = float("inf")
    return [
        (dict(q=q[0], g=g, k=2), "q must be a 2-D tensor [Q, D], got shape [3]"),
        (dict(q=q, g=g[:, :2], k=2), "q has D=3 features but g has D=2"),
        (dict(q=q.double(), g=g.double(), k=2), "q has dtype torch.float64; expected"),
        (dict(q=q, g=g.half(), k=2), "g has dtype torch.float16 but q has dtype torch.float32"),
        (dict(q=q, g=g, k=0), "k must be in [1, 1024], got 0"),
        (dict(q=q, g=g, k=1025), "k must be in [1, 1024], got 1025"),
        (dict(q=q, g=g, k=7), "k=7 exceeds the 6 gallery items a query can get (G=6); pass k <= 6"),
        (dict(q=g, g=g, k=6, exclude_self=True), "k=6 exceeds the 5 gallery items a query can get (G=6, exclude_self)"),
        (dict(q=q, g=g, k=2, exclude_self=True, q_offset=3), "exclude_self needs q_offset >= 0 and q_offset + Q <= G"),
        (dict(q=q, g=g, k=2, counts=c[:5]), "counts must have shape [G=6], got [5]"),
        (dict(q=q, g=g, k=2, counts=c.int()), "counts must have dtype torch.int64, got torch.int32"),
        (dict(q=q, g=g, k=2, sums=s.float()), "sums must have dtype torch.float64, got torch.float32"),
        (dict(q=nan_q, g=g, k=2), "q contains NaN or Inf values"),
        (dict(q=q, g=inf_g, k=2), "g contains NaN or Inf values"),
        (dict(q=torch.full_like(q, 1e20), g=torch.full_like(g, -1e19), k=2),
         "q and g may give similarities beyond the float32 range (D * max|q| * max|g| = 3e+39 > 1.70141e+38); "
         "scale them down"),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_errors_name_the_argument(device, backend):
    _ok(backend, device)
    for kw, msg in _err_cases(device):
        kw = dict(kw)
        q, g, k = kw.pop("q"), kw.pop("g"), kw.pop("k")
        with pytest.raises(RuntimeError, match=r"nbretr\.topk_centrality: " + _re(msg)):
            ops.topk_centrality(q, g, k, backend=backend, **kw)
    with pytest.raises(RuntimeError, match="sim must be"):
        ops.topk_centrality(torch.zeros(1, 1), torch.zeros(1, 1), 1, sim="cos", backend=backend)


def _re(msg):
    import re
    return re.escape(msg)


def test_cpp_checks_match_python_messages():
    """The registered op checks its own arguments (direct torch.ops calls) with the same words."""
    require_ext("cpu")
    for kw, msg in _err_cases("cpu"):
        if "q_offset" in kw and "exclude_self" not in kw:
            continue
        q, g, k = kw["q"], kw["g"], kw["k"]
        G = g.shape[0] if g.dim() == 2 else 0
        c = kw.get("counts", torch.zeros(G, dtype=torch.int64))
        s = kw.get("sums", torch.zeros(G, dtype=torch.float64))
        with pytest.raises(RuntimeError, match=_re(msg)):
            torch.ops.nbretr.topk_centrality_dot(q, g, k, kw.get("exclude_self", False), kw.get("q_offset", 0), c, s)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_opcheck(device, dtype):
    require_ext(device)
    q = torch.randn(7, 5, device=device).to(dtype)
    g = torch.randn(11, 5, device=device).to(dtype)
    c = torch.zeros(11, dtype=torch.int64, device=device)
    s = torch.zeros(11, dtype=torch.float64, device=device)
    torch.library.opcheck(torch.ops.nbretr.topk_centrality_dot, (q, g, 3, False, 0, c, s),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_select_topk_tie_rule():
    vals = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 0.0]])
    idx = torch.arange(6)
    v, i = select_topk(vals, idx, 2)
    assert v.tolist() == [[3.0, 3.0]] and i.tolist() == [[1, 2]]
    v, i = select_topk(vals, idx, 4)
    assert i.tolist() == [[1, 2, 4, 3]]


def test_torch_path_tiling_does_not_change_results():
    q, g = int_data(30, 100, 5, "cpu", torch.float32)
    ref = oracle(q, g, 12)
    for qc, gt in [(1, 1), (7, 13), (30, 100), (4, 99)]:
        c = torch.zeros(100, dtype=torch.int64)
        s = torch.zeros(100, dtype=torch.float64)
        v, i = topk_centrality_dot(q, g, 12, counts=c, sums=s, q_chunk=qc, g_tile=gt)
        assert torch.equal(v, ref[0]) and torch.equal(i, ref[1]) and torch.equal(c, ref[2]) and torch.equal(s, ref[3])


@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize("k", [1, 9, 40])
def test_cpu_engine_chunks_tiles_and_epochs(exclude_self, k):
    """The CPU engine (csrc/cpu/topk_engine.h) through its test hook, with query chunks,
    gallery tiles and epochs small enough that small inputs cross every boundary: a
    candidate reservoir cut back many times (k = 1), epochs shorter than k (their lists
    merged), and tiles wide enough for the first-tile bound (>= 1024 columns)."""
    require_ext("cpu")
    x = torch.randint(-2, 3, (300, 5)).float()  # tie groups everywhere
    x[299] = x[0]
    g = torch.cat([x, torch.randint(-2, 3, (1700, 5)).float()])
    ref = oracle(x, g, k, exclude_self=exclude_self)
    for qc, gt, ep in [(7, 13, 5), (64, 100, 230), (300, 2000, 2000), (50, 1024, 1100), (33, 1500, 3)]:
        c = torch.zeros(2000, dtype=torch.int64)
        s = torch.zeros(2000, dtype=torch.float64)
        v, i = nbretr_testing_ops().topk_centrality_dot_tiled(x, g, k, exclude_self, 0, c, s, qc, gt, ep)
        what = f"q_chunk={qc} g_tile={gt} epoch={ep}"
        assert torch.equal(v, ref[0]) and torch.equal(i, ref[1]), what
        assert torch.equal(c, ref[2]) and torch.equal(s, ref[3]), what


@pytest.mark.needs_cuda
@pytest.mark.parametrize("rounds", [1, 3, None])
@pytest.mark.parametrize("k", [1, 64, 300])
def test_cuda_scan_rounds(rounds_setting, rounds, k):
    """The CUDA selection scans a full list's tile row in rounds of the topk_cuda_rounds
    kernel setting x P columns (default 16; 1 = P-column rounds); a round with more than P
    candidates (tie groups from small integers) is scanned again P columns at a time."""
    require_ext("cuda")
    rounds_setting(rounds)
    q, g = int_data(40, 9000, 3, "cuda", torch.float32, lo=-1, hi=2)
    v, i, c, s = ops.topk_centrality(q, g, k, backend="ext")
    ov, oi, oc, os_ = oracle(q, g, k)
    assert torch.equal(v, ov) and torch.equal(i, oi) and torch.equal(c, oc) and torch.equal(s, os_)
    x = torch.randn(300, 16, device="cuda")  # random reals, a set against itself plus more
    gal = torch.cat([x, torch.randn(8000, 16, device="cuda")])
    v, i, c, _ = ops.topk_centrality(x, gal, 5, exclude_self=True, backend="ext")
    ov, oi, _, _ = oracle(x, gal, 5, exclude_self=True)
    assert_faiss_equivalent(v, i, ov, oi, x.double() @ gal.double().T, atol=1e-4)
    assert not (i == torch.arange(300, device="cuda")[:, None]).any() and int(c.sum()) == 300 * 5


@pytest.mark.needs_cuda
@pytest.mark.parametrize("rounds", [1, None])
@pytest.mark.parametrize("k", [1, 100, 1024])
def test_cuda_large_many_chunks_and_tiles(rounds_setting, rounds, k):
    """More than one query chunk (2,048 rows) and gallery tile (32,768 columns): each row's
    running list is carried across tiles and chunks, and exclude_self falls in later tiles
    (q_offset > 0). Small integers: huge tie groups, exact comparison with the oracle."""
    require_ext("cuda")
    rounds_setting(rounds)
    q, g = int_data(1, 70000, 4, "cuda", torch.float32, lo=-1, hi=2)
    off = 40000
    q = g[off:off + 2500]
    c = torch.zeros(70000, dtype=torch.int64, device="cuda")
    s = torch.zeros(70000, dtype=torch.float64, device="cuda")
    v, i, _, _ = ops.topk_centrality(q, g, k, exclude_self=True, q_offset=off, counts=c, sums=s, backend="ext")
    ov, oi, oc, os_ = oracle(q, g, k, exclude_self=True, q_offset=off)
    assert torch.equal(v, ov) and torch.equal(i, oi) and torch.equal(c, oc) and torch.equal(s, os_)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("rounds", [1, 3, None])
def test_cuda_every_round_overflows(rounds_setting, rounds):
    """An ascending gallery: every column beats the row's current k-th value, so every
    wide round holds more than P candidates and is scanned again P columns at a time."""
    require_ext("cuda")
    rounds_setting(rounds)
    q = torch.ones(3, 1, device="cuda")
    g = torch.arange(20000, device="cuda", dtype=torch.float32)[:, None]
    v, i, c, s = ops.topk_centrality(q, g, 1024, backend="ext")
    ov, oi, oc, os_ = oracle(q, g, 1024)
    assert torch.equal(v, ov) and torch.equal(i, oi) and torch.equal(c, oc) and torch.equal(s, os_)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_large_half_inputs_many_tiles(monkeypatch, dtype):
    """fp16/bf16 over more than one gallery tile, fp16 also with torch's fp16 cuBLAS
    accumulation allowed (products on upcast inputs then): exact on integer data."""
    require_ext("cuda")
    q, g = int_data(300, 40000, 8, "cuda", dtype)
    ov, oi, oc, os_ = oracle(q, g, 50)
    for allow in ([False, True] if dtype == torch.float16 else [False]):
        torch.backends.cuda.matmul.allow_fp16_accumulation = allow  # (conftest restores it)
        v, i, c, s = ops.topk_centrality(q, g, 50, backend="ext")
        assert torch.equal(v, ov) and torch.equal(i, oi) and torch.equal(c, oc) and torch.equal(s, os_), allow


def test_cuda_scan_rounds_bad_value():
    """A bad topk_cuda_rounds is refused, naming the setting, and changes nothing."""
    before = ops.get_kernel_settings()
    for bad in (0, 4097, "3", 2.0):
        with pytest.raises(ValueError, match="topk_cuda_rounds must be an integer in"):
            ops.set_kernel_settings(topk_cuda_rounds=bad)
    assert ops.get_kernel_settings() == before


@pytest.fixture
def rounds_setting():
    """Set topk_cuda_rounds for one test (None: the default) and restore it after."""
    old = ops.get_kernel_settings()

    def set_rounds(rounds):
        if rounds is not None:
            ops.set_kernel_settings(topk_cuda_rounds=rounds)

    yield set_rounds
    ops.set_kernel_settings(topk_cuda_rounds=old.topk_cuda_rounds)


@pytest.mark.needs_cuda
def test_cuda_non_default_stream():
    require_ext("cuda")
    q, g = int_data(20, 3000, 8, "cuda", torch.float32)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())  # q, g were made on the default stream
    with torch.cuda.stream(stream):
        v, i, c, s = ops.topk_centrality(q, g, 30, backend="ext")
    stream.synchronize()
    ov, oi, oc, os_ = oracle(q, g, 30)
    assert torch.equal(v, ov) and torch.equal(i, oi) and torch.equal(c, oc) and torch.equal(s, os_)


@pytest.mark.parametrize("backend", BACKENDS)
def test_signed_zeros_and_negative_values_tie(device, backend):
    """-0.0 and +0.0 compare equal: lower index first (the CPU kernel sorts packed keys)."""
    _ok(backend, device)
    q = torch.tensor([[1.0], [-1.0]], device=device)
    g = torch.tensor([[-0.0], [0.0], [-0.0], [-3.0], [2.0], [-3.0]], device=device)
    v, i, _, _ = ops.topk_centrality(q, g, 6, backend=backend)
    assert i.tolist() == [[4, 0, 1, 2, 3, 5], [3, 5, 0, 1, 2, 4]]
    assert v.tolist() == [[2.0, 0.0, 0.0, 0.0, -3.0, -3.0], [3.0, 3.0, 0.0, 0.0, 0.0, -2.0]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_similarity_range(device, backend):
    """Finite inputs whose similarities could leave float32's range (Inf, then NaN from
    Inf - Inf) are refused on every backend; up to the bound they are ranked as usual."""
    _ok(backend, device)
    q = torch.tensor([[1e20, 1e20]], device=device)
    g = torch.tensor([[1e20, -1e20], [1.0, 1.0]], device=device)
    with pytest.raises(RuntimeError, match=_re("q and g may give similarities beyond the float32 range")):
        ops.topk_centrality(q, g, 2, backend=backend)
    q = torch.tensor([[1e18]], device=device)
    g = torch.tensor([[1e18], [-1e19], [1.3e20], [0.0]], device=device)  # bound 1.3e38: allowed
    v, i, c, s = ops.topk_centrality(q, g, 4, backend=backend)
    assert i.tolist() == [[2, 0, 3, 1]] and torch.isfinite(v).all()
    assert torch.equal(v, (q.double() @ g.double().T)[:, i[0]].float())


@pytest.mark.parametrize("backend", BACKENDS)
def test_subnormal_similarities_keep_their_order(device, backend):
    """Similarities below float32's normal range are ordered by value, not flushed to 0 and
    tied by index (the CUDA build keeps subnormals: --ftz=false)."""
    _ok(backend, device)
    q = torch.tensor([[1e-20]], device=device)
    g = torch.tensor([[1e-20], [2e-20], [0.0], [-1e-20]], device=device)  # 1e-40, 2e-40, 0, -1e-40
    v, i, _, _ = ops.topk_centrality(q, g, 4, backend=backend)
    assert i.tolist() == [[1, 0, 2, 3]]
    assert v[0, 0] > v[0, 1] > 0 > v[0, 3]


# -- sim="wti": token-set queries and galleries (streamed WTI blocks) ---------------------

def _wti_triple(n, L, D, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, L, D, generator=g), dim=-1)
    mask = torch.ones(n, L, dtype=torch.long)
    mask[::3, L // 2:] = 0
    w = torch.softmax(torch.randn(n, L, generator=g).masked_fill(mask == 0, -1e4), dim=1) * mask
    return x, mask, w


@pytest.mark.parametrize("backend", ["torch", "ext"])
@pytest.mark.parametrize("q_role", ["text", "video"])
def test_wti_sim_matches_full_matrix(backend, q_role, monkeypatch):
    if backend == "ext":
        require_ext("cpu")
    import nbretr.ops.topk as topk_mod
    monkeypatch.setattr(topk_mod, "WTI_TILE", 7)       # several tiles each way
    texts = _wti_triple(19, 5, 16, 0)
    vids = _wti_triple(23, 4, 16, 1)
    vids = (torch.cat((vids[0], vids[0][:3])), torch.cat((vids[1], vids[1][:3])), torch.cat((vids[2], vids[2][:3])))
    s = ops.wti_similarity(*texts, *vids, backend="torch").float()         # [19, 26], duplicated columns tie
    q, g, full = (texts, vids, s) if q_role == "text" else (vids, texts, s.t())
    k = 6
    vals, idx, counts, sums = ops.topk_centrality(q, g, k, sim="wti", q_role=q_role, backend=backend)
    order = torch.sort(full, dim=1, descending=True, stable=True)
    assert_topk_equivalent(vals, idx, order.values[:, :k], order.indices[:, :k])
    torch.testing.assert_close(counts, torch.bincount(idx.flatten(), minlength=full.shape[1]))
    torch.testing.assert_close(sums, full.double().sum(0), rtol=1e-5, atol=1e-5)


def test_wti_sim_bad_input():
    with pytest.raises(RuntimeError, match="q must be a \\(tokens, mask, weight\\) triple"):
        ops.topk_centrality(torch.zeros(2, 3), _wti_triple(2, 2, 3, 0), 1, sim="wti")
    with pytest.raises(RuntimeError, match="q_role must be"):
        ops.topk_centrality(_wti_triple(2, 2, 3, 0), _wti_triple(2, 2, 3, 0), 1, sim="wti", q_role="audio")


@pytest.mark.parametrize("backend", BACKENDS)
def test_wti_sim_refuses_non_finite_and_out_of_range(backend):
    """sim="wti" keeps sim="dot"'s contract: NaN/Inf tokens or weights, and similarities
    that could leave float32's range, are errors (before any block is computed)."""
    _ok(backend, "cpu")
    q, g = _wti_triple(3, 4, 8, 0), _wti_triple(5, 2, 8, 1)
    bad = q[0].clone()
    bad[1, 2, 3] = float("nan")
    with pytest.raises(RuntimeError, match=_re("q tokens contains NaN or Inf values")):
        ops.topk_centrality((bad, q[1], q[2]), g, 2, sim="wti", backend=backend)
    w = g[2].clone()
    w[0, 0] = float("inf")
    with pytest.raises(RuntimeError, match=_re("g weight contains NaN or Inf values")):
        ops.topk_centrality(q, (g[0], g[1], w), 2, sim="wti", backend=backend)
    with pytest.raises(RuntimeError, match=_re("may give token products beyond the float32 range")):
        ops.topk_centrality((q[0] * 1e19, q[1], q[2]), (g[0] * 1e19, g[1], g[2]), 2, sim="wti", backend=backend)
    # the raw products overflow before the masks and weights apply: small ones do not help
    with pytest.raises(RuntimeError, match=_re("may give token products beyond the float32 range")):
        ops.topk_centrality((q[0] * 1e20, q[1] * 1e-3, q[2] * 0), (g[0] * 1e20, g[1], g[2] * 0), 2, sim="wti",
                            backend=backend)
    with pytest.raises(RuntimeError, match=_re("may give WTI similarities beyond the float32 range")):
        ops.topk_centrality((q[0] * 1e18, q[1], q[2] * 1e4), (g[0] * 1e18, g[1], g[2] * 1e4), 2, sim="wti",
                            backend=backend)
    v, _, _, _ = ops.topk_centrality((q[0] * 1e17, q[1], q[2]), (g[0] * 1e17, g[1], g[2]), 2, sim="wti",
                                     backend=backend)  # within the bound: ranked as usual
    assert torch.isfinite(v).all()
