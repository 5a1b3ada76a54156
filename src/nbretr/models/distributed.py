"""All-gather with gradient for DDP (the reference gathers every feature before its losses).

:func:`all_gather_with_grad` concatenates a tensor from every rank along dim 0. Backward
gives each rank the slice of the incoming gradient that belongs to its own rows. With
``reduce_grads=False`` (default, the reference's ``AllGather``) that is the local gradient's
slice: every rank computes the same loss on the gathered batch, so DDP's averaging then
yields 1/world_size of the full gradient (the reference's scale). ``reduce_grads=True``
all-reduces (sums) the gradient first (the reference's ``AllGather2``), giving the exact
gradient of the gathered loss after DDP averaging.

Without an initialised process group, or with one rank, it is the identity.

``grad_scale`` multiplies the gradient that flows back through the gather (also on one
process): with ``grad_scale = W / W_ref`` and ``reduce_grads=False`` the encoders get
the gradient the reference's ``AllGather`` gives on ``W_ref`` processes, so a run on fewer
GPUs reproduces a multi-GPU command's dynamics (``grad_world_size`` of the model config).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, reduce_grads: bool, scale: float = 1.0) -> torch.Tensor:
        ctx.n, ctx.reduce, ctx.scale = x.shape[0], reduce_grads, scale
        ctx.rank = dist.get_rank()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.reduce:
            grad = grad.clone()
            dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        local = grad[ctx.n * ctx.rank: ctx.n * (ctx.rank + 1)]
        return (local * ctx.scale if ctx.scale != 1.0 else local), None, None


def all_gather_with_grad(x: torch.Tensor, *, reduce_grads: bool = False, grad_scale: float = 1.0) -> torch.Tensor:
    """``cat([x from rank 0, ..., x from rank W-1])`` along dim 0, differentiable; every rank
    must pass the same shape. Identity when not distributed (but for ``grad_scale``)."""
    if world_size() == 1:
        return _ScaleGrad.apply(x, grad_scale) if grad_scale != 1.0 and x.requires_grad else x
    if not x.requires_grad:
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)
    return _AllGather.apply(x, reduce_grads, float(grad_scale))
