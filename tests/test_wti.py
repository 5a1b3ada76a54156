"""wti_similarity (docs/operators.md): ext vs torch path, gradients, gradcheck, low precision,
masks, ties, errors, opcheck."""
import pytest
import torch
import torch.nn.functional as Fn

from nbretr import ops
from nbretr.ops.reference import wti_similarity as ref_wti

from helpers import require_ext, nbretr_testing_ops

BACKENDS = ["torch", "ext"]


def _backend_ok(backend, device):
    if backend == "ext":
        require_ext(device)


def make_side(B, L, D, dtype=torch.float32, device="cpu", mask_dtype=torch.long, one_token_rows=True, gen=None):
    """Normalised tokens, a {0,1} mask with >= 1 valid token per row (some rows with only
    one), softmaxed weights that are 0 on masked tokens."""
    x = Fn.normalize(torch.randn(B, L, D, generator=gen, dtype=torch.float64), dim=-1)
    m = torch.rand(B, L, generator=gen) > 0.3
    m[:, 0] = True
    if one_token_rows and B > 1:
        m[1::3] = False
        m[1::3, L - 1] = True  # rows entirely masked but one (the last) token
    w = torch.randn(B, L, generator=gen, dtype=torch.float64).masked_fill(~m, float("-inf")).softmax(-1)
    return (x.to(dtype).to(device), m.to(mask_dtype).to(device), w.to(torch.float32 if dtype != torch.float64 else dtype).to(device))


def make(Bt, Bv, L, F, D, dtype=torch.float32, device="cpu", mask_dtype=torch.long, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (*make_side(Bt, L, D, dtype, device, mask_dtype, gen=gen), *make_side(Bv, F, D, dtype, device, mask_dtype, gen=gen))


SHAPES = [  # Bt, Bv, L, F, D
    (1, 1, 1, 1, 8),
    (3, 5, 7, 4, 16),
    (5, 3, 77, 12, 64),
    (2, 7, 1, 77, 24),
    (9, 11, 32, 12, 33),
    (13, 2, 20, 77, 512),
    (40, 37, 9, 5, 8),  # several CPU tiles in each direction
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mask_dtype", [torch.long, torch.bool, torch.float32])
def test_forward_matches_torch_path(device, shape, mask_dtype):
    require_ext(device)
    args = make(*shape, device=device, mask_dtype=mask_dtype)
    got = ops.wti_similarity(*args, backend="ext")
    want = ops.wti_similarity(*args, backend="torch")
    assert got.dtype == torch.float32 and got.shape == shape[:2]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _grads(args, backend, gout):
    t, mt, wt, v, mv, wv = [a.detach().clone() for a in args]
    for x in (t, wt, v, wv):
        x.requires_grad_(True)
    s = ops.wti_similarity(t, mt, wt, v, mv, wv, backend=backend)
    s.backward(gout)
    return s.detach(), t.grad, wt.grad, v.grad, wv.grad


@pytest.mark.parametrize("shape", SHAPES)
def test_gradients_match_torch_path(device, shape):
    require_ext(device)
    args = make(*shape, device=device)
    gout = torch.randn(shape[:2], device=device)
    got = _grads(args, "ext", gout)
    want = _grads(args, "torch", gout)
    for name, a, b in zip(["s", "t", "t_weight", "v", "v_weight"], got, want):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5, msg=name)


@pytest.mark.parametrize("shape", [(3, 4, 300, 5, 8), (2, 3, 6, 270, 8), (70, 9, 32, 12, 16)])
def test_gradients_long_sequences_cpu(shape):
    """L or F > 256: the CPU backward stores its arg-maxes as int32 instead of uint8; many
    text blocks (70 x 32 tokens): the fused dL/dt path."""
    require_ext("cpu")
    args = make(*shape, dtype=torch.float64)
    gout = torch.randn(shape[:2], dtype=torch.float64)
    for a, b in zip(_grads(args, "ext", gout), _grads(args, "torch", gout)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(2, 3, 3, 4, 5), (3, 2, 5, 2, 8), (1, 4, 1, 3, 6)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(device, shape, backend):
    _backend_ok(backend, device)
    t, mt, wt, v, mv, wv = make(*shape, dtype=torch.float64, device=device, seed=sum(shape))
    for x in (t, wt, v, wv):
        x.requires_grad_(True)

    def fn(t, wt, v, wv):
        return ops.wti_similarity(t, mt, wt, v, mv, wv, backend=backend)

    assert torch.autograd.gradcheck(fn, (t, wt, v, wv), eps=1e-6, atol=1e-7)


def test_float64_ext_matches_torch(device):
    require_ext(device)
    args = make(6, 5, 11, 7, 19, dtype=torch.float64, device=device)
    gout = torch.randn(6, 5, dtype=torch.float64, device=device)
    got, want = _grads(args, "ext", gout), _grads(args, "torch", gout)
    assert got[0].dtype == torch.float64
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 9, 32, 12, 512), (5, 4, 77, 3, 40)])
def test_low_precision_flash_attention_rule(device, dtype, shape):
    """ext error vs an fp32 reference <= 2x the torch path's own error in that dtype + eps."""
    require_ext(device)
    args = make(*shape, dtype=dtype, device=device)
    up = [a.float() if a.is_floating_point() else a for a in args]
    gout = torch.randn(shape[:2], device=device)
    ref = _grads(up, "torch", gout)
    ext = _grads(args, "ext", gout)
    pt = _grads(args, "torch", gout)
    assert ext[0].dtype == torch.float32
    for name, e, p, r in zip(["s", "t", "t_weight", "v", "v_weight"], ext, pt, ref):
        assert e.dtype == p.dtype, name
        err_ext = (e.float() - r.float()).abs().max().item()
        err_pt = (p.float() - r.float()).abs().max().item()
        assert err_ext <= 2 * err_pt + 1e-5, f"{name}: ext {err_ext} vs torch-in-{dtype} {err_pt}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape, fused, texts_whole", [((7, 45, 9, 12, 100), False, True),
                                                       ((70, 30, 32, 12, 16), True, False),
                                                       ((48, 300, 32, 12, 72), True, True)])
def test_low_precision_cpu_is_the_fp32_kernel_on_upcast_inputs(dtype, shape, fused, texts_whole):
    """fp16/bf16 tokens are never copied whole: the products' operands are converted block
    by block, the backward's row sums read the tokens as they are (converted on load), and
    dL/dv and dL/dt are summed per block in fp32 (dL/dt whole only when a thread's texts
    collect it over all its tiles), then written in the tokens' dtype: the result must be
    the fp32 kernel's on the upcast inputs, rounded once. Two threads; the cases: few text
    blocks (dL/dt in its own pass, reading the video tokens), many (dL/dt right after each
    tile) with the videos or the texts compacted whole; D of 100 and 72 reach the 64-wide
    row sums and their tails."""
    require_ext("cpu")
    args = make(*shape, dtype=dtype)
    up = [a.float() if a.is_floating_point() else a for a in args]
    gout = torch.randn(shape[:2])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        t_rows, v_rows, t_blocks, _ = nbretr_testing_ops().wti_cpu_plan(*args, gout).tolist()
        assert (t_blocks >= 4, t_rows <= v_rows) == (fused, texts_whole)  # the case is the one named
        got, want = _ext_grads(args, gout), _ext_grads(up, gout)
    finally:
        torch.set_num_threads(threads)
    for name, a, b in zip(["s", "t", "t_weight", "v", "v_weight"], got, want):
        assert a.dtype == (dtype if name in ("t", "v") else torch.float32), name
        assert torch.equal(a, b.to(a.dtype)), name


def test_masked_tokens_get_zero_gradient(device):
    require_ext(device)
    args = make(6, 5, 8, 6, 16, device=device)
    _, gt, gwt, gv, gwv = _grads(args, "ext", torch.randn(6, 5, device=device))
    mt, mv = args[1].bool(), args[4].bool()
    assert (gt[~mt] == 0).all() and (gv[~mv] == 0).all()
    assert gt[mt].abs().sum() > 0 and gv[mv].abs().sum() > 0


def test_masked_entry_can_be_the_max():
    """A masked frame contributes 0 to the max (reference semantics): with every real
    similarity negative, max_f is 0 and comes from the masked frame."""
    t = torch.tensor([[[1.0, 0.0]]])
    v = torch.tensor([[[-1.0, 0.0], [0.0, 1.0]]])  # <t, v0> = -1, <t, v1> = 0 (masked anyway)
    mt, wt = torch.ones(1, 1), torch.ones(1, 1)
    mv, wv = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]])
    for backend in ["torch"] + (["ext"] if ops._backend.ext_supports(torch.device("cpu"))[0] else []):
        s = ops.wti_similarity(t, mt, wt, v, mv, wv, backend=backend)
        # t2v = max(-1, 0) = 0; v2t = 1 * (-1) + 0 * 0 = -1
        assert s.item() == pytest.approx(-0.5), backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_lowest_index(backend):
    _backend_ok(backend, "cpu")
    t = torch.tensor([[[0.6, 0.8]]], requires_grad=True)
    v = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]], requires_grad=True)  # two identical frames
    ones = torch.ones(1, 1)
    s = ops.wti_similarity(t, ones, ones, v, torch.ones(1, 2), torch.tensor([[1.0, 0.0]]), backend=backend)
    s.backward()
    # the row max over the tied frames routes to frame 0; frame 1 has weight 0
    torch.testing.assert_close(v.grad[0, 1], torch.zeros(2))
    torch.testing.assert_close(v.grad[0, 0], torch.tensor([0.6, 0.8]))


def _scan_max(row):
    """The kernels' max: a scan keeping the first entry unless a later one is greater
    (so a NaN in front is kept and later NaNs are skipped)."""
    best = row[0]
    for x in row[1:]:
        if x > best:
            best = x
    return best


@pytest.mark.parametrize("F", [5, 20])  # the CPU kernel's vector path (F <= 16) and its scan
def test_nan_rows_follow_the_scan(F):
    """A NaN token: the CPU kernel's vectorised max must hand such pairs to the scan, whose
    weight gradients d a_t[l] = sum_j g_ij / 2 max_f S[l, f] (and d a_v alike) are checked
    here against a Python scan, NaN for NaN."""
    require_ext("cpu")
    t, mt, wt, v, mv, wv = make(3, 4, 6, F, 8)
    t[1, 2] = float("nan")  # text 1, token 2: its rows of S are all NaN
    v[2, 3] = float("nan")  # video 2, frame 3: inside every row of S (skipped by the scan)
    gout = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    _, gwt, _, gwv = torch.ops.nbretr.wti_similarity_backward(gout, t, mt, wt, v, mv, wv)
    want_wt, want_wv = torch.zeros(3, 6), torch.zeros(4, F)
    for i in range(3):
        for j in range(4):
            S = (t[i] @ v[j].T) * mt[i, :, None] * mv[j, None, :]
            for l in range(6):
                want_wt[i, l] += 0.5 * gout[i, j] * _scan_max(S[l].tolist())
            for f in range(F):
                want_wv[j, f] += 0.5 * gout[i, j] * _scan_max(S[:, f].tolist())
    assert gwt.isnan().sum() == 1 and gwv.isnan().sum() == 1  # token (1, 2) and frame (2, 3)
    torch.testing.assert_close(gwt, want_wt, rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(gwv, want_wv, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_inputs(device, backend):
    _backend_ok(backend, device)
    if backend == "torch":
        pytest.skip("the reference's max over an empty batch dimension is not defined")
    for bt, bv in [(0, 3), (2, 0), (0, 0)]:
        args = make(max(bt, 1), max(bv, 1), 4, 3, 8, device=device)
        t, mt, wt, v, mv, wv = args
        t, mt, wt, v, mv, wv = t[:bt], mt[:bt], wt[:bt], v[:bv], mv[:bv], wv[:bv]
        for x in (t, wt, v, wv):
            x.requires_grad_(True)
        s = ops.wti_similarity(t, mt, wt, v, mv, wv, backend=backend)
        assert s.shape == (bt, bv)
        s.sum().backward()
        assert t.grad.shape == t.shape and (t.grad == 0).all()
        assert v.grad.shape == v.shape and (v.grad == 0).all()


def test_zero_width_tokens(device):
    """D = 0: every dot product is 0, so s = 0 and every gradient is 0 (no division by the
    row size anywhere)."""
    require_ext(device)
    t, mt, wt, v, mv, wv = make(3, 4, 5, 6, 8, device=device)
    t, v = t[..., :0].contiguous(), v[..., :0].contiguous()
    gout = torch.randn(3, 4, device=device)
    got = _grads((t, mt, wt, v, mv, wv), "ext", gout)
    assert (got[0] == 0).all() and got[1].shape == t.shape and got[3].shape == v.shape
    assert all((g == 0).all() for g in got[2:] if g is not None)
    if device == "cpu":
        for a in _tiled_grads((t, mt, wt, v, mv, wv), gout, (16, 16)):
            assert (a == 0).all()


def test_non_contiguous_inputs(device):
    require_ext(device)
    t, mt, wt, v, mv, wv = make(5, 6, 7, 4, 10, device=device)
    tn = t.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    vn = v.transpose(0, 1).contiguous().transpose(0, 1)
    wtn = wt.t().contiguous().t()
    assert not tn.is_contiguous() and not vn.is_contiguous() and not wtn.is_contiguous()
    gout = torch.randn(5, 6, device=device)
    got = _grads((tn, mt, wtn, vn, mv, wv), "ext", gout)
    want = _grads((t, mt, wt, v, mv, wv), "torch", gout)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_inputs_not_modified(device):
    require_ext(device)
    args = make(4, 3, 5, 6, 7, device=device)
    before = [a.clone() for a in args]
    _grads(args, "ext", torch.randn(4, 3, device=device))
    for a, b in zip(args, before):
        assert torch.equal(a, b)


def test_double_backward_refused():
    require_ext("cpu")
    t, mt, wt, v, mv, wv = make(2, 3, 4, 5, 6)
    t.requires_grad_(True)
    s = ops.wti_similarity(t, mt, wt, v, mv, wv, backend="ext")
    (g,) = torch.autograd.grad(s.sum(), t, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        g.sum().backward()


def test_wti_block_roles():
    t, mt, wt, v, mv, wv = make(5, 4, 6, 3, 8)
    full = ops.wti_similarity(t, mt, wt, v, mv, wv)
    torch.testing.assert_close(ops.wti_block((t[1:4], mt[1:4], wt[1:4]), (v[2:], mv[2:], wv[2:])), full[1:4, 2:])
    torch.testing.assert_close(ops.wti_block((v, mv, wv), (t, mt, wt), q_role="video"), full.t())
    with pytest.raises(ValueError, match="q_role"):
        ops.wti_block((t, mt, wt), (v, mv, wv), q_role="audio")


# -- errors: same message on every backend ----------------------------------------------

def _bad_cases():
    t, mt, wt, v, mv, wv = make(2, 3, 4, 5, 6)
    return [
        ("v has D=7 but t has D=6; t \\[Bt, L, D\\] and v \\[Bv, F, D\\] must share D",
         (t, mt, wt, torch.randn(3, 5, 7), mv, wv)),
        ("t_mask has shape \\[2, 5\\] but t has shape \\[2, 4, 6\\]; expected \\[2, 4\\]",
         (t, torch.ones(2, 5), wt, v, mv, wv)),
        ("v_mask has shape \\[3\\] but v has shape \\[3, 5, 6\\]; expected \\[3, 5\\]",
         (t, mt, wt, v, torch.ones(3), wv)),
        ("t_weight has shape \\[2, 3\\] but t_mask has shape \\[2, 4\\]; expected \\[2, 4\\]",
         (t, mt, torch.ones(2, 3), v, mv, wv)),
        ("v_weight has shape \\[5, 3\\] but v_mask has shape \\[3, 5\\]; expected \\[3, 5\\]",
         (t, mt, wt, v, mv, wv.t())),
        ("t must have shape \\[Bt, L, D\\], got \\[2, 4\\]", (t[:, :, 0], mt, wt, v, mv, wv)),
        ("v has dtype torch.float16 but t has dtype torch.float32", (t, mt, wt, v.half(), mv, wv)),
        ("t has dtype torch.int64; expected torch.float32, torch.float16, torch.bfloat16 or torch.float64",
         (t.long(), mt, wt, v.long(), mv, wv)),
        ("t_weight has dtype torch.int64; expected a floating dtype", (t, mt, wt.long(), v, mv, wv)),
        ("v must have at least one token \\(\\[Bv, F, D\\] with F >= 1\\), got \\[3, 0, 6\\]",
         (t, mt, wt, v[:, :0], mv[:, :0], wv[:, :0])),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_errors_name_the_argument(backend):
    _backend_ok(backend, "cpu")
    for pattern, args in _bad_cases():
        with pytest.raises(RuntimeError, match="nbretr.wti_similarity: " + pattern):
            ops.wti_similarity(*args, backend=backend)


def test_kernel_checks_match_python_checks():
    require_ext("cpu")
    for pattern, args in _bad_cases():
        with pytest.raises(RuntimeError, match="nbretr.wti_similarity: " + pattern):
            torch.ops.nbretr.wti_similarity(*args)
        with pytest.raises(RuntimeError, match="nbretr.wti_similarity: " + pattern):
            torch.ops.nbretr.wti_similarity_backward(torch.zeros(2, 3), *args)
    t, mt, wt, v, mv, wv = make(2, 3, 4, 5, 6)
    with pytest.raises(RuntimeError, match="grad has shape \\[3, 2\\]; expected \\[Bt, Bv\\] = \\[2, 3\\]"):
        torch.ops.nbretr.wti_similarity_backward(torch.zeros(3, 2), t, mt, wt, v, mv, wv)


def test_device_mismatch_error():
    t, mt, wt, v, mv, wv = make(2, 3, 4, 5, 6)
    with pytest.raises(RuntimeError, match="nbretr.wti_similarity: v_mask is on meta but t is on cpu"):
        ops.wti_similarity(t, mt, wt, v, mv.to("meta"), wv)


# -- registration -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_opcheck(device, dtype):
    require_ext(device)
    t, mt, wt, v, mv, wv = make(3, 4, 5, 3, 8, dtype=dtype, device=device)
    for x in (t, wt, v, wv):
        x.requires_grad_(True)
    torch.library.opcheck(torch.ops.nbretr.wti_similarity.default, (t, mt, wt, v, mv, wv))
    g = torch.randn(3, 4, device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    torch.library.opcheck(torch.ops.nbretr.wti_similarity_backward.default,
                          (g, t.detach(), mt, wt.detach(), v.detach(), mv, wv.detach()))


def test_fake_tensor_mode():
    require_ext("cpu")
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        t, v = torch.randn(3, 4, 8, dtype=torch.bfloat16), torch.randn(5, 2, 8, dtype=torch.bfloat16)
        s = torch.ops.nbretr.wti_similarity(t, torch.ones(3, 4), torch.ones(3, 4), v, torch.ones(5, 2), torch.ones(5, 2))
        assert s.shape == (3, 5) and s.dtype == torch.float32


@pytest.mark.needs_cuda
def test_non_default_stream():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    require_ext("cuda")
    args = make(6, 7, 9, 5, 32, device="cuda")
    want = ops.wti_similarity(*args, backend="torch")
    gout = torch.randn(6, 7, device="cuda")
    want_grads = _grads(args, "ext", gout)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())  # the inputs were made on the default stream
    with torch.cuda.stream(s):
        got = ops.wti_similarity(*args, backend="ext")
        got_grads = _grads(args, "ext", gout)  # the backward too
    s.synchronize()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(["s", "t", "t_weight", "v", "v_weight"], got_grads, want_grads):
        assert torch.equal(a, b), name


# ---- the CUDA backend's tiled driver (csrc/common/wti_tiled.h), checked on the CPU ------
# The test op nbretr_testing.wti_tiled runs the driver's tiling, products and gradient
# algebra with host loops in place of its per-line CUDA kernels; the per-line steps are
# the CPU kernel's.

TILES = [(1, 1), (40, 30), (2048, 2048)]  # one pair per tile, partial tiles, one tile


def _tiled_grads(args, gout, tile):
    t, mt, wt, v, mv, wv = args
    s = nbretr_testing_ops().wti_tiled(t, mt, wt, v, mv, wv, *tile)
    return (s, *nbretr_testing_ops().wti_tiled_backward(gout, t, mt, wt, v, mv, wv, *tile))


def _ext_grads(args, gout):
    s = torch.ops.nbretr.wti_similarity(*args)
    return (s, *torch.ops.nbretr.wti_similarity_backward(gout, *args))


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiled_driver_matches_cpu_kernel(shape, tile, dtype):
    require_ext("cpu")
    args = make(*shape, dtype=dtype)
    gout = torch.randn(shape[:2], dtype=dtype if dtype == torch.float64 else torch.float32)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=2e-5)
    for name, a, b in zip(["s", "t", "t_weight", "v", "v_weight"], _tiled_grads(args, gout, tile),
                          _ext_grads(args, gout)):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, **tol, msg=name)


@pytest.mark.parametrize("tile", TILES)
def test_tiled_driver_ties_and_masks_exact(tile):
    """Small-integer tokens, dyadic weights, integer upstream gradients: every product and
    sum is exact whatever its order and ties abound, so the tiled driver must route each
    max to the same (lowest) index as the CPU kernel, bit for bit."""
    require_ext("cpu")
    gen = torch.Generator().manual_seed(3)
    t, mt, wt, v, mv, wv = make(7, 9, 6, 5, 4)
    t = torch.randint(-2, 3, t.shape, generator=gen).float()
    v = torch.randint(-2, 3, v.shape, generator=gen).float()
    wt, wv = mt.float() * 0.25, mv.float() * 0.5
    gout = torch.randint(-3, 4, (7, 9), generator=gen).float()
    for name, a, b in zip(["s", "t", "t_weight", "v", "v_weight"], _tiled_grads((t, mt, wt, v, mv, wv), gout, tile),
                          _ext_grads((t, mt, wt, v, mv, wv), gout)):
        assert torch.equal(a, b), name
    # masked tokens get no gradient
    _, gt, _, gv, _ = _tiled_grads((t, mt, wt, v, mv, wv), gout, tile)
    assert (gt[mt == 0] == 0).all() and (gv[mv == 0] == 0).all()


def _exact_inputs(Bt, Bv, L, F, D, dtype, seed=5):
    """Small-integer tokens, masks with zeros (whole items too) and non-binary values,
    dyadic weights, integer upstream gradients: every product and sum is exact in any
    order, ties and exact zeros abound."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.randint(-2, 3, (Bt, L, D), generator=gen).to(dtype)
    v = torch.randint(-2, 3, (Bv, F, D), generator=gen).to(dtype)
    vals = torch.tensor([0.0, 0.0, 1.0, 1.0, 2.0, 0.5])
    mt = vals[torch.randint(0, 6, (Bt, L), generator=gen)]
    mv = vals[torch.randint(0, 6, (Bv, F), generator=gen)]
    mt[Bt // 2] = 0  # a text, and a video, with every token masked
    mv[Bv // 2] = 0
    mt[0], mv[0] = 1, 1  # and one with none
    wt, wv = (mt != 0).float() * 0.25, (mv != 0).float() * 0.5
    gout = torch.randint(-3, 4, (Bt, Bv), generator=gen).to(torch.float64 if dtype == torch.float64 else torch.float32)
    return (t, mt, wt, v, mv, wv), gout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(9, 11, 7, 5, 4), (40, 37, 9, 5, 3), (70, 30, 32, 12, 6), (40, 200, 32, 12, 4),
                                   (5, 300, 6, 12, 4)])
def test_cpu_kernel_drops_masked_tokens_exactly(shape, dtype):
    """The CPU kernel leaves masked tokens out of its products and puts their zeros back
    into each max (csrc/cpu/wti_similarity.cpp, "the kept tokens"): on exact inputs its
    outputs and gradients must equal, bit for bit, those of the same kernel keeping every
    token (kernel setting wti_cpu_compact=False) and those of the tiled driver, which never drops.
    Shapes: few and many text blocks (dL/dt in its own pass or right after each tile),
    the texts or the videos as the side compacted whole."""
    require_ext("cpu")
    args, gout = _exact_inputs(*shape, dtype)
    mt, mv = args[1], args[4]
    plan = nbretr_testing_ops().wti_cpu_plan(*args, gout).tolist()
    assert plan[:2] == [int((mt != 0).sum()), int((mv != 0).sum())]  # tokens were dropped
    dropped = _ext_grads(args, gout)
    tiled = _tiled_grads(args, gout, (40, 30))
    with ops.kernel_settings(wti_cpu_compact=False):
        assert nbretr_testing_ops().wti_cpu_plan(*args, gout).tolist()[:2] == [mt.numel(), mv.numel()]
        kept = _ext_grads(args, gout)
    for name, a, b, c in zip(["s", "t", "t_weight", "v", "v_weight"], dropped, kept, tiled):
        assert torch.equal(a, b), name
        assert torch.equal(a, c), name
    # a masked token's gradient is 0, a kept one's is not (somewhere)
    assert (dropped[1][mt == 0] == 0).all() and dropped[1][mt != 0].abs().sum() > 0


def test_cpu_kernel_keeps_masked_tokens_when_dropping_is_not_exact():
    """Dropping a masked token is exact only while its products are finite (then they are
    +-0): a NaN or an Inf anywhere, products that may overflow, or a non-finite weight or
    upstream gradient make the kernel keep every token, NaNs where the full scan has them."""
    require_ext("cpu")
    args, gout = _exact_inputs(6, 7, 5, 4, 3, torch.float32)
    t, mt, wt, v, mv, wv = args
    full = [mt.numel(), mv.numel()]
    plan = lambda *a, g=None: nbretr_testing_ops().wti_cpu_plan(*a, g).tolist()[:2]  # noqa: E731
    assert plan(*args) != full
    i, l = (mt == 0).nonzero()[0].tolist()
    for bad in (float("nan"), float("inf"), 1e37):  # 1e37: D * max|t| * max|v| * max|m_t| * max|m_v| > FLT_MAX / 4
        t2 = t.clone()
        t2[i, l, 0] = bad  # a masked token
        assert plan(t2, mt, wt, v, mv, wv) == full, bad
    s = torch.ops.nbretr.wti_similarity(t2, mt, wt, v, mv, wv)  # no product overflows, only the bound
    assert torch.isfinite(s).all()
    t2[i, l, 0] = float("nan")
    s = torch.ops.nbretr.wti_similarity(t2, mt, wt, v, mv, wv)
    assert s[i].isnan().any()  # the masked NaN token's row of S is NaN * 0 = NaN, kept by the scan
    wt2 = wt.clone()
    wt2[0, 0] = float("inf")
    assert plan(t, mt, wt2, v, mv, wv) == full
    g2 = gout.clone()
    g2[0, 0] = float("nan")
    assert plan(*args, g=g2) == full and plan(*args, g=gout) != full


def test_tiled_driver_half_inputs_and_errors():
    require_ext("cpu")
    args = make(6, 5, 7, 4, 16, dtype=torch.bfloat16)
    gout = torch.randn(6, 5)
    got, want = _tiled_grads(args, gout, (20, 10)), _ext_grads(args, gout)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="testing.wti_tiled: tile_rows and tile_cols must be >= 1, got 0 and 5"):
        nbretr_testing_ops().wti_tiled(*args, 0, 5)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("impl", ["tiled", "fused"])
@pytest.mark.parametrize("shape", [(3, 5, 7, 4, 16), (13, 2, 20, 77, 512), (40, 37, 9, 5, 8), (3, 200, 150, 12, 32)])
def test_cuda_implementations(wti_cuda_setting, impl, shape):
    """Both CUDA implementations (kernel setting wti_cuda="tiled", the default, or "fused")
    against the torch path; the fused one refuses L or F > 128 with its message."""
    require_ext("cuda")
    wti_cuda_setting(impl)
    args = make(*shape, device="cuda")
    gout = torch.randn(shape[:2], device="cuda")
    if impl == "fused" and max(shape[2], shape[3]) > 128:
        with pytest.raises(RuntimeError, match="the CUDA kernel supports at most 128 tokens"):
            ops.wti_similarity(*args, backend="ext")
        return
    for name, a, b in zip(["s", "t", "t_weight", "v", "v_weight"], _grads(args, "ext", gout), _grads(args, "torch", gout)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5, msg=name)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_large_tiled_many_tiles_exact(wti_cuda_setting, dtype):
    """The CUDA tiled default over many tiles (300 x 300 pairs, L=32, F=12: 5 x 2 tiles of
    2,048 x 2,048 entries, ragged at the edges, dt/dv accumulated across tiles) on exact
    small-integer inputs: outputs and gradients equal the CPU kernel's bit for bit; fp16
    also with torch's fp16 cuBLAS accumulation allowed (the products then run on upcast
    inputs)."""
    require_ext("cuda")
    wti_cuda_setting("tiled")
    args, gout = _exact_inputs(300, 300, 32, 12, 8, dtype)
    want = _ext_grads(args, gout)
    cuda_args = [a.cuda() for a in args]
    flags = [False, True] if dtype == torch.float16 else [False]
    for allow in flags:
        torch.backends.cuda.matmul.allow_fp16_accumulation = allow  # (conftest restores it)
        got = _ext_grads(cuda_args, gout.cuda())
        for name, a, b in zip(["s", "t", "t_weight", "v", "v_weight"], got, want):
            assert a.dtype == b.dtype, name
            assert torch.equal(a.cpu(), b), f"{name} (allow_fp16_accumulation={allow})"



@pytest.fixture
def wti_cuda_setting():
    """Set the wti_cuda kernel setting for one test and restore it after."""
    old = ops.get_kernel_settings().wti_cuda
    yield lambda impl: ops.set_kernel_settings(wti_cuda=impl)
    ops.set_kernel_settings(wti_cuda=old)
