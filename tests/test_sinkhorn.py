"""sinkhorn_log: ext vs torch path vs POT, marginals, masks, tol, gradients (docs/operators.md)."""
import math

import numpy as np
import pytest
import torch

from nbretr import ops

from helpers import require_ext

BACKENDS = ["torch", "ext"]
ALL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _backend_ok(backend, device):
    if backend == "ext":
        require_ext(device)


def _close(x, y, dtype):
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(x, y, **tol)


def _balanced(B, M, N, dtype, device):
    """Random log-marginals that each sum to 1."""
    a = torch.randn(B, M, dtype=dtype, device=device).log_softmax(1)
    b = torch.randn(B, N, dtype=dtype, device=device).log_softmax(1)
    return a, b


# -- ext vs torch path ----------------------------------------------------------------

# (B, M, N): one-element, odd sizes, M != N both ways, the training shape, and (on CUDA)
# shapes beyond one block's shared memory, which take the multi-launch path.
SHAPES = [(1, 1, 1), (3, 7, 11), (2, 13, 5), (4, 33, 33), (2, 128, 128), (1, 300, 97)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_ext_matches_torch(device, shape, dtype):
    require_ext(device)
    B, M, N = shape
    scores = (torch.randn(B, M, N, device=device) * 4).to(dtype)
    for eps, marg in ((1.0, None), (0.3, _balanced(B, M, N, torch.float32, device))):
        a, b = marg if marg is not None else (None, None)
        got = ops.sinkhorn_log(scores, a, b, n_iters=20, eps=eps, backend="ext")
        ref = ops.sinkhorn_log(scores, a, b, n_iters=20, eps=eps, backend="torch")
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        for g, r in zip(got[:3], ref[:3]):
            assert g.dtype == acc
            _close(g, r, acc)
        assert torch.equal(got[3], ref[3])
        assert got[3].dtype == torch.int64 and got[3].tolist() == [20] * B


def test_large_problem_multi_block_path(device):
    """Big enough that the CUDA kernel cannot hold it in one block's shared memory."""
    require_ext(device)
    scores = torch.randn(2, 520, 600, device=device, dtype=torch.float64)
    got = ops.sinkhorn_log(scores, n_iters=10, backend="ext")
    ref = ops.sinkhorn_log(scores, n_iters=10, backend="torch")
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)
    a, b = _balanced(2, 520, 600, torch.float64, device)
    got = ops.sinkhorn_log(scores, a, b, n_iters=200, tol=1e-6, backend="ext")
    ref = ops.sinkhorn_log(scores, a, b, n_iters=200, tol=1e-6, backend="torch")
    assert torch.equal(got[3], ref[3]) and got[3].max() < 200
    torch.testing.assert_close(got[0], ref[0], rtol=1e-9, atol=1e-9)


def test_batch_sizes_one_and_64(device):
    require_ext(device)
    for B in (1, 64):
        scores = torch.randn(B, 24, 24, device=device)
        got = ops.sinkhorn_log(scores, n_iters=50, backend="ext")
        ref = ops.sinkhorn_log(scores, n_iters=50, backend="torch")
        for g, r in zip(got, ref):
            _close(g, r, torch.float32) if g.is_floating_point() else torch.equal(g, r)
        # every problem solved independently: problem k alone gives the same answer
        alone = ops.sinkhorn_log(scores[B - 1:B].clone(), n_iters=50, backend="ext")
        _close(alone[0][0], got[0][B - 1], torch.float32)


def test_non_contiguous_inputs(device):
    require_ext(device)
    base = torch.randn(9, 4, 6, device=device)
    scores = base.permute(1, 0, 2)[:, ::2]  # [4, 5, 6], strided
    a = torch.randn(5, 4, device=device).log_softmax(0).t()
    got = ops.sinkhorn_log(scores, a, None, n_iters=15, backend="ext")
    ref = ops.sinkhorn_log(scores.contiguous(), a.contiguous(), None, n_iters=15, backend="torch")
    for g, r in zip(got[:3], ref[:3]):
        _close(g, r, torch.float32)


def test_default_marginals_are_the_references(device):
    """The reference's loop: log mu = log nu = -log(m + n), u = ... - LSE(G + v), 50 iterations."""
    require_ext(device)
    n = 16
    G = torch.randn(n, n, device=device, dtype=torch.float64)
    log_mu = torch.full((n,), -math.log(2 * n), device=device, dtype=torch.float64)
    u = torch.zeros(n, device=device, dtype=torch.float64)
    v = torch.zeros(n, device=device, dtype=torch.float64)
    for _ in range(50):
        u = log_mu - torch.logsumexp(G + v[None, :], dim=1)
        v = log_mu - torch.logsumexp(G + u[:, None], dim=0)
    Q = torch.exp(G + u[:, None] + v[None, :] + math.log(2 * n))
    for backend in BACKENDS:
        log_plan, lu, lv, _ = ops.sinkhorn_log(G[None], backend=backend)
        torch.testing.assert_close(torch.exp(log_plan[0] + math.log(2 * n)), Q, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(lu[0], u, rtol=1e-10, atol=1e-12)


# -- against POT, and the marginals ------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,eps", [((3, 12, 12), 1.0), ((2, 9, 17), 0.5), ((2, 20, 6), 0.2)])
def test_matches_pot_after_convergence(backend, shape, eps):
    ot = pytest.importorskip("ot")
    _backend_ok(backend, "cpu")
    B, M, N = shape
    scores = torch.randn(B, M, N, dtype=torch.float64)
    a, b = _balanced(B, M, N, torch.float64, "cpu")
    log_plan, _, _, iters = ops.sinkhorn_log(scores, a, b, n_iters=5000, tol=1e-13, eps=eps, backend=backend)
    assert (iters < 5000).all()
    for k in range(B):
        ref = ot.bregman.sinkhorn_log(a[k].exp().numpy(), b[k].exp().numpy(), -scores[k].numpy(), reg=eps,
                                      numItermax=5000, stopThr=1e-14)
        np.testing.assert_allclose(log_plan[k].exp().numpy(), ref, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_marginals_after_enough_iterations(device, backend, dtype):
    _backend_ok(backend, device)
    # default (uniform, -log(M+N)) marginals with M == N; balanced random ones with M != N
    scores = torch.randn(3, 40, 40, device=device, dtype=dtype)
    log_plan = ops.sinkhorn_log(scores, n_iters=300, backend=backend)[0]
    P = log_plan.double().exp()
    torch.testing.assert_close(P.sum(2), torch.full((3, 40), 1 / 80, device=device, dtype=torch.float64),
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(P.sum(1), torch.full((3, 40), 1 / 80, device=device, dtype=torch.float64),
                               rtol=0, atol=1e-5)
    scores = torch.randn(2, 25, 31, device=device, dtype=dtype)
    a, b = _balanced(2, 25, 31, dtype, device)
    P = ops.sinkhorn_log(scores, a, b, n_iters=500, eps=0.5, backend=backend)[0].double().exp()
    torch.testing.assert_close(P.sum(2), a.double().exp(), rtol=0, atol=1e-5)
    torch.testing.assert_close(P.sum(1), b.double().exp(), rtol=0, atol=1e-5)


# -- tol -------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_tol_stops_each_problem_when_its_row_error_is_small(device, backend):
    _backend_ok(backend, device)
    B, M, N = 4, 10, 10
    # problems of increasing difficulty converge after different numbers of iterations
    # (drawn on the CPU, so every device solves the same problems)
    scores = (torch.randn(B, M, N, dtype=torch.float64)
              * torch.tensor([0.1, 1.0, 3.0, 6.0], dtype=torch.float64)[:, None, None]).to(device)
    tol = 1e-6
    log_plan, u, v, iters = ops.sinkhorn_log(scores, n_iters=400, tol=tol, backend=backend)
    assert len(set(iters.tolist())) > 1 and (iters < 400).all() and (iters >= 1).all()
    mu = 1 / (M + N)
    for k in range(B):
        t = int(iters[k])
        # outputs are exactly those of t iterations without tol
        full = ops.sinkhorn_log(scores[k:k + 1], n_iters=t, backend=backend)
        # exact, except the torch path on CUDA, whose reductions may order a batch of 4
        # differently from a batch of 1
        exact = backend == "ext" or device == "cpu"
        torch.testing.assert_close(log_plan[k], full[0][0], rtol=0 if exact else 1e-12, atol=0 if exact else 1e-12)
        err = (log_plan[k].exp().sum(1) - mu).abs().max()
        assert err < tol
        # and one iteration earlier the error was not yet under tol
        if t > 1:
            prev = ops.sinkhorn_log(scores[k:k + 1], n_iters=t - 1, backend=backend)[0][0]
            assert (prev.exp().sum(1) - mu).abs().max() >= tol * 0.999


def test_tol_iters_match_between_backends(device):
    require_ext(device)
    scores = torch.randn(6, 12, 12, device=device, dtype=torch.float64) * 2
    got = ops.sinkhorn_log(scores, n_iters=300, tol=1e-7, backend="ext")
    ref = ops.sinkhorn_log(scores, n_iters=300, tol=1e-7, backend="torch")
    assert torch.equal(got[3], ref[3])
    for g, r in zip(got[:3], ref[:3]):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)


def test_zero_and_empty(device):
    require_ext(device)
    for backend in BACKENDS:
        s = torch.randn(2, 3, 4, device=device)
        log_plan, u, v, it = ops.sinkhorn_log(s, n_iters=0, backend=backend)
        torch.testing.assert_close(log_plan, s)
        assert u.abs().sum() == 0 and v.abs().sum() == 0 and it.tolist() == [0, 0]
        for shape in ((0, 3, 4), (2, 0, 4), (2, 3, 0)):
            out = ops.sinkhorn_log(torch.randn(*shape, device=device), n_iters=5, backend=backend)
            assert out[0].shape == shape and out[1].shape == shape[:2] and out[2].shape == (shape[0], shape[2])
            assert out[3].tolist() == [0] * shape[0]


# -- masks and extreme values ------------------------------------------------------------

def _masked_scores(device, dtype=torch.float32):
    s = torch.randn(3, 9, 7, device=device, dtype=dtype)
    mask = torch.rand(3, 9, 7, device=device) < 0.4
    mask[:, torch.arange(7), torch.arange(7)] = False  # every row and column keeps an entry
    mask[:, 7:, 0] = False
    return s.masked_fill(mask, float("-inf")), mask


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_entries(device, backend):
    _backend_ok(backend, device)
    scores, mask = _masked_scores(device)
    log_plan, u, v, _ = ops.sinkhorn_log(scores, n_iters=200, backend=backend)
    assert torch.isneginf(log_plan[mask]).all()
    assert torch.isfinite(log_plan[~mask]).all() and torch.isfinite(u).all() and torch.isfinite(v).all()
    ref = ops.sinkhorn_log(scores, n_iters=200, backend="torch")
    torch.testing.assert_close(log_plan, ref[0], rtol=2e-5, atol=2e-5)
    # padding a problem with -inf rows/columns... is an error only when a row is all -inf;
    # a partially masked problem is the same as the problem on its finite support
    P = log_plan.double().exp()
    torch.testing.assert_close(P.sum(1), torch.full_like(P.sum(1), 1 / 16), rtol=0, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_scores_stay_finite(device, backend, dtype):
    _backend_ok(backend, device)
    scores = torch.randn(2, 17, 17, device=device, dtype=dtype) * 1e4
    scores[0, 0, :] = 1e4
    scores[1, :, 3] = -1e4
    log_plan, u, v, it = ops.sinkhorn_log(scores, n_iters=50, tol=1e-6, backend=backend)
    assert torch.isfinite(log_plan).all() and torch.isfinite(u).all() and torch.isfinite(v).all()
    # the columns carry their mass exactly after the v half-step
    torch.testing.assert_close(torch.logsumexp(log_plan.double(), 1), torch.full((2, 17), -math.log(34),
                               device=device, dtype=torch.float64), rtol=0, atol=1e-3)


# -- gradients --------------------------------------------------------------------------

@pytest.mark.parametrize("tol", [None, 1e-3])
def test_gradcheck_float64(device, tol):
    require_ext(device)
    torch.manual_seed(1)
    S = torch.randn(2, 5, 4, dtype=torch.float64, device=device, requires_grad=True)
    a, b = _balanced(2, 5, 4, torch.float64, device)
    a.requires_grad_(True)
    b.requires_grad_(True)

    def f(s, a, b):
        return ops.sinkhorn_log(s, a, b, n_iters=25, tol=tol, eps=0.7, backend="ext")[:3]

    if tol is not None:
        it = ops.sinkhorn_log(S, a, b, n_iters=25, tol=tol, eps=0.7, backend="ext")[3]
        assert (it < 25).all() and (it > 1).all()
    assert torch.autograd.gradcheck(f, (S, a, b))
    assert torch.autograd.gradcheck(lambda s: ops.sinkhorn_log(s, n_iters=6, backend="ext")[0], (S,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tol", [None, 1e-4])
def test_backward_matches_torch_autograd(device, dtype, tol):
    require_ext(device)
    scores, mask = _masked_scores(device, dtype)
    a, b = _balanced(3, 9, 7, dtype, device)
    w = torch.randn(3, 9, 7, device=device, dtype=dtype).masked_fill(mask, 0)
    wu, wv = torch.randn(3, 9, device=device, dtype=dtype), torch.randn(3, 7, device=device, dtype=dtype)
    grads = {}
    for backend in BACKENDS:
        S = scores.clone().requires_grad_(True)
        A, Bn = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        lp, u, v, it = ops.sinkhorn_log(S, A, Bn, n_iters=40, tol=tol, eps=0.8, backend=backend)
        loss = (lp.masked_fill(mask, 0) * w).sum() + (u * wu).sum() + (v * wv).sum()
        grads[backend] = torch.autograd.grad(loss, (S, A, Bn)) + (it,)
    assert torch.equal(grads["ext"][3], grads["torch"][3])
    tol_ = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    for g, r in zip(grads["ext"][:3], grads["torch"][:3]):
        torch.testing.assert_close(g, r, **tol_)


def test_gradient_through_plan_only_and_half_inputs(device):
    """The loss path: a scalar of the plan only (log_u/log_v unused); fp16 scores get fp16 grads."""
    require_ext(device)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        S = torch.randn(2, 16, 16, device=device).to(dtype).requires_grad_(True)
        log_plan = ops.sinkhorn_log(S, n_iters=10, backend="ext")[0]
        (log_plan.exp() * torch.arange(16.0, device=device)).sum().backward()
        S2 = S.detach().clone().requires_grad_(True)
        ref = ops.sinkhorn_log(S2, n_iters=10, backend="torch")[0]
        (ref.exp() * torch.arange(16.0, device=device)).sum().backward()
        assert S.grad.dtype == dtype
        torch.testing.assert_close(S.grad.float(), S2.grad.float(), rtol=1e-2, atol=1e-3)


def test_double_backward_refused():
    require_ext("cpu")
    S = torch.randn(1, 3, 3, dtype=torch.float64, requires_grad=True)
    lp = ops.sinkhorn_log(S, n_iters=3, backend="ext")[0]
    (g,) = torch.autograd.grad(lp.sum(), S, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        g.sum().backward()


def test_opcheck(device):
    require_ext(device)
    for dtype in (torch.float32, torch.float64, torch.float16):
        S = torch.randn(2, 5, 6, device=device).to(dtype)
        a = torch.randn(2, 5, device=device).log_softmax(1)
        b = torch.randn(2, 6, device=device).log_softmax(1)
        if dtype == torch.float64:
            a, b = a.double(), b.double()
        for tol in (None, 1e-3):
            torch.library.opcheck(torch.ops.nbretr.sinkhorn_log.default, (S, a, b, 7, 0.5, tol))
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        _, _, _, it, uh, vh = torch.ops.nbretr.sinkhorn_log(S, a, b, 7, 0.5, None)
        g = (torch.randn(2, 5, 6, device=device, dtype=acc), torch.randn(2, 5, device=device, dtype=acc),
             torch.randn(2, 6, device=device, dtype=acc))
        torch.library.opcheck(torch.ops.nbretr.sinkhorn_log_backward.default,
                              (*g, S, a, b, uh, vh, it, 0.5))


def test_fake_tensor_mode():
    require_ext("cpu")
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        S = torch.randn(3, 4, 5)
        out = ops.sinkhorn_log(S, n_iters=4, backend="ext")
        assert out[0].shape == (3, 4, 5) and out[3].dtype == torch.int64


# -- errors: same message on every backend --------------------------------------------------

def _bad_cases(device):
    s = torch.randn(2, 3, 4, device=device)
    masked = s.clone()
    masked[1, 2, :] = float("-inf")
    masked_col = s.clone()
    masked_col[1, :, 3] = float("-inf")
    return [
        ("scores must be a 3-D tensor \\[B, M, N\\], got shape \\[3, 4\\]", (s[0],), {}),
        ("scores must be float16, bfloat16, float32 or float64, got torch.int64", (s.long(),), {}),
        ("log_mu must have shape \\[B, M\\] = \\[2, 3\\], got \\[2, 4\\]", (s, torch.zeros(2, 4, device=device)), {}),
        ("log_nu must have shape \\[B, N\\] = \\[2, 4\\], got \\[4\\]", (s, None, torch.zeros(4, device=device)), {}),
        ("log_mu must be a floating tensor, got torch.int64",
         (s, torch.zeros(2, 3, dtype=torch.long, device=device)), {}),
        ("n_iters must be >= 0, got -1", (s,), dict(n_iters=-1)),
        ("eps must be a positive finite number, got 0", (s,), dict(eps=0.0)),
        ("eps must be a positive finite number, got inf", (s,), dict(eps=float("inf"))),
        ("tol must be >= 0 \\(or None\\), got -1", (s,), dict(tol=-1.0)),
        ("scores\\[1, 2, :\\] is entirely -inf \\(problem 1, row 2 of 3 is fully masked\\)", (masked,), {}),
        ("scores\\[1, :, 3\\] is entirely -inf \\(problem 1, column 3 of 4 is fully masked\\)", (masked_col,), {}),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_errors_name_the_argument(device, backend):
    _backend_ok(backend, device)
    for pattern, args, kw in _bad_cases(device):
        with pytest.raises(RuntimeError, match="nbretr.sinkhorn_log: " + pattern):
            ops.sinkhorn_log(*args, backend=backend, **kw)


def test_kernel_checks_match_python_checks():
    """The C++ op, called directly, refuses the same inputs with the same messages."""
    require_ext("cpu")
    for pattern, args, kw in _bad_cases("cpu"):
        s = args[0]
        if s.dim() != 3:
            a = b = torch.zeros(2, 3)
        else:
            B, M, N = s.shape
            a = args[1] if len(args) > 1 and args[1] is not None else torch.zeros(B, M)
            b = args[2] if len(args) > 2 else torch.zeros(B, N)
        with pytest.raises(RuntimeError, match="nbretr.sinkhorn_log: " + pattern):
            torch.ops.nbretr.sinkhorn_log(s, a, b, kw.get("n_iters", 5), kw.get("eps", 1.0), kw.get("tol"))


def test_device_mismatch_error():
    s = torch.randn(2, 3, 4)
    with pytest.raises(RuntimeError, match="log_mu is on meta but scores is on cpu"):
        ops.sinkhorn_log(s, torch.zeros(2, 3, device="meta"))
