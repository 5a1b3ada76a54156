"""``sinkhorn_log``: batched log-domain Sinkhorn with an exact backward (docs/operators.md).

Used by the uniform-regularisation loss (docs/method.md, "Loss 3") on the n x n global
similarity matrix every training step.
"""
from __future__ import annotations

import math

import torch

from nbretr.ops import _backend
from nbretr.ops._checks import SINKHORN_FLOATS as _FLOATS, check_sinkhorn_args, check_sinkhorn_masks, fail
from nbretr.ops.reference import sinkhorn as _ref

__all__ = ["sinkhorn_log"]

_OP = "sinkhorn_log"


def sinkhorn_log(scores: torch.Tensor, log_mu: torch.Tensor | None = None, log_nu: torch.Tensor | None = None, *,
                 n_iters: int = 50, tol: float | None = None, eps: float = 1.0,
                 backend: _backend.Backend | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Solve B independent entropic OT problems in the log domain.

    With ``K = scores / eps``, ``a = log_mu``, ``b = log_nu`` and ``u_0 = v_0 = 0``, each
    iteration t = 1, 2, ... updates ``u_t = a - LSE_j(K_ij + v_{t-1,j})`` and then
    ``v_t = b - LSE_i(K_ij + u_t,i)`` (docs/method.md, "Loss 3"; the reference's loop).

    Args:
        scores: ``[B, M, N]`` float32/float64, or float16/bfloat16 (computed in float32).
            ``-inf`` entries are allowed (padding, masks); a row or column that is
            entirely ``-inf`` is an error naming the problem and the row/column.
        log_mu: ``[B, M]`` log row marginals (any float dtype; finite), default
            ``-log(M + N)`` everywhere (the reference's normaliser).
        log_nu: ``[B, N]`` log column marginals, default ``-log(M + N)``.
        n_iters: maximum number of full (u then v) iterations, >= 0.
        tol: optional early stop, per problem. After a full iteration t (1 <= t < n_iters)
            the row-marginal error ``max_i |sum_j exp(log_plan_t[i, j]) - exp(log_mu_i)|``
            of the plan ``K + u_t + v_t`` is computed (the column marginals are exact after
            the v half-step); a problem whose error is < ``tol`` stops there with
            ``iters_done = t`` and its outputs are those of iteration t. The error costs no
            extra pass: it reuses the next iteration's row log-sum-exp.
        eps: entropic regularisation (> 0); POT's ``reg``.
        backend: "auto" | "ext" | "torch" (see :mod:`nbretr.ops._backend`).

    Returns:
        ``(log_plan [B, M, N], log_u [B, M], log_v [B, N], iters_done [B] int64)``, in
        float64 for float64 scores, else float32. ``log_plan = K + u + v``; L_opt's
        plan is ``Q = exp(log_plan + log(M + N))``. Empty problems (B, M or N = 0) return
        an empty plan, zero potentials and ``iters_done = 0``.

    Differentiable w.r.t. ``scores``, ``log_mu`` and ``log_nu``: the ext backward is the
    exact gradient of the iterations run (recomputed from the stored potentials, memory
    O(n_iters * (M + N)) per problem); the torch path differentiates the loop.
    """
    if scores.dim() == 3:
        B, M, N = scores.shape
        acc = _ref.compute_dtype(scores.dtype) if scores.dtype in _FLOATS else torch.float32
        if log_mu is None:
            log_mu = torch.full((B, M), -math.log(max(M + N, 1)), dtype=acc, device=scores.device)
        if log_nu is None:
            log_nu = torch.full((B, N), -math.log(max(M + N, 1)), dtype=acc, device=scores.device)
    if log_mu is None or log_nu is None:
        log_mu = log_nu = scores.new_zeros(0, 0)  # reported by the shape check below
    n_iters, eps = int(n_iters), float(eps)
    tol = None if tol is None else float(tol)
    if _backend.resolve(_OP, backend, scores.device) == "ext":  # checked in C++
        log_plan, log_u, log_v, iters, _, _ = torch.ops.nbretr.sinkhorn_log(scores, log_mu, log_nu, n_iters, eps, tol)
        return log_plan, log_u, log_v, iters
    check_sinkhorn_args(scores, log_mu, log_nu, n_iters, eps, tol)
    check_sinkhorn_masks(scores)
    return _ref.sinkhorn_log(scores, log_mu, log_nu, n_iters, eps, tol)


if _backend._ext.ext_loaded():

    @torch.library.register_fake("nbretr::sinkhorn_log")
    def _sinkhorn_log_fake(scores, log_mu, log_nu, n_iters, eps, tol):
        check_sinkhorn_args(scores, log_mu, log_nu, n_iters, eps, tol)  # not the masks: data
        B, M, N = scores.shape
        acc = _ref.compute_dtype(scores.dtype)
        new = scores.new_empty
        return (new((B, M, N), dtype=acc), new((B, M), dtype=acc), new((B, N), dtype=acc),
                new((B,), dtype=torch.long), new((B, n_iters, M), dtype=acc), new((B, n_iters, N), dtype=acc))

    @torch.library.register_fake("nbretr::sinkhorn_log_backward")
    def _sinkhorn_log_backward_fake(grad_log_plan, grad_log_u, grad_log_v, scores, log_mu, log_nu, u_hist, v_hist,
                                    iters_done, eps):
        return torch.empty_like(scores), torch.empty_like(log_mu), torch.empty_like(log_nu)

    def _setup_context(ctx, inputs, output):
        scores, log_mu, log_nu, n_iters, eps, tol = inputs
        _, _, _, iters, u_hist, v_hist = output
        ctx.save_for_backward(scores, log_mu, log_nu, u_hist, v_hist, iters)
        ctx.eps = eps
        ctx.mark_non_differentiable(iters, u_hist, v_hist)

    def _backward(ctx, g_plan, g_u, g_v, g_iters, g_uh, g_vh):
        scores, log_mu, log_nu, u_hist, v_hist, iters = ctx.saved_tensors
        acc = _ref.compute_dtype(scores.dtype)
        B, M, N = scores.shape
        g_plan = scores.new_zeros((B, M, N), dtype=acc) if g_plan is None else g_plan.to(acc)
        g_u = scores.new_zeros((B, M), dtype=acc) if g_u is None else g_u.to(acc)
        g_v = scores.new_zeros((B, N), dtype=acc) if g_v is None else g_v.to(acc)
        g_s, g_mu, g_nu = torch.ops.nbretr.sinkhorn_log_backward(g_plan, g_u, g_v, scores, log_mu, log_nu, u_hist,
                                                                 v_hist, iters, ctx.eps)
        return g_s, g_mu, g_nu, None, None, None

    torch.library.register_autograd("nbretr::sinkhorn_log", _backward, setup_context=_setup_context)

    def _no_double_backward(ctx, *grads):
        fail("sinkhorn_log_backward", "double backward is not supported (the backward is not differentiable)")

    def _setup_backward(ctx, inputs, output):
        pass

    torch.library.register_autograd("nbretr::sinkhorn_log_backward", _no_double_backward,
                                    setup_context=_setup_backward)
