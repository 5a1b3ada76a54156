"""Log-domain Sinkhorn, pure PyTorch (docs/operators.md): the reference's loop of
``logsumexp`` calls, batched over problems. Differentiable through PyTorch autograd."""
from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; float32/float16/bfloat16 are computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sinkhorn_log(scores: torch.Tensor, log_mu: torch.Tensor, log_nu: torch.Tensor, n_iters: int, eps: float,
                 tol: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The torch path of :func:`nbretr.ops.sinkhorn_log` (arguments already checked and
    the default marginals filled in). Same semantics as the kernels, including the
    ``tol`` rule: after a full iteration t >= 1 the row-marginal error
    ``max_i |exp(u_t,i + LSE_j(K_ij + v_t,j)) - exp(log_mu_i)|`` is computed with the next
    iteration's row LSE, and a problem whose error is < tol stops with iters_done = t."""
    acc = compute_dtype(scores.dtype)
    K = scores.to(acc) / eps
    B, M, N = K.shape
    a, b = log_mu.to(acc), log_nu.to(acc)
    u = K.new_zeros(B, M)
    v = K.new_zeros(B, N)
    iters = torch.zeros(B, dtype=torch.long, device=K.device)
    if K.numel() == 0:
        return K, u, v, iters
    active = torch.ones(B, dtype=torch.bool, device=K.device)
    for t in range(n_iters):
        r = torch.logsumexp(K + v[:, None, :], dim=2)
        if tol is not None and t >= 1:
            err = (torch.exp(u + r) - torch.exp(a)).abs().amax(dim=1)
            active = active & ~(err < tol)
            if not bool(active.any()):
                break
            u = torch.where(active[:, None], a - r, u)
            c = torch.logsumexp(K + u[:, :, None], dim=1)
            v = torch.where(active[:, None], b - c, v)
        else:
            u = a - r
            v = b - torch.logsumexp(K + u[:, :, None], dim=1)
        iters = iters + active.long()
    return K + u[:, :, None] + v[:, None, :], u, v, iters
