"""``wti_similarity``: fused token-wise (WTI) similarity with backward (docs/operators.md)."""
from __future__ import annotations

import torch

from nbretr.ops import _backend
from nbretr.ops._checks import check_wti_args
from nbretr.ops.reference import wti as _ref

__all__ = ["wti_similarity", "wti_block", "check_wti_args"]

_OP = "wti_similarity"


def wti_similarity(t: torch.Tensor, t_mask: torch.Tensor, t_weight: torch.Tensor, v: torch.Tensor,
                   v_mask: torch.Tensor, v_weight: torch.Tensor, *,
                   backend: _backend.Backend | None = None) -> torch.Tensor:
    """Token-wise (WTI) similarity of every text with every video.

    Args:
        t: text tokens ``[Bt, L, D]``, L2-normalised; float32, float16, bfloat16 or float64.
        t_mask: ``[Bt, L]`` {0,1} token mask, any bool/integer/floating dtype.
        t_weight: ``[Bt, L]`` softmaxed token weights (0 on masked tokens), any floating dtype.
        v, v_mask, v_weight: the same for videos, ``[Bv, F, D]``, ``[Bv, F]``, ``[Bv, F]``;
            ``v`` has ``t``'s dtype.

    Returns:
        ``s [Bt, Bv]`` float32 (float64 for float64 inputs)::

            S_ij[l, f] = <t_il, v_jf> * t_mask[i, l] * v_mask[j, f]      (masked: 0, not -inf)
            s_ij = 1/2 (sum_l t_weight[i, l] max_f S_ij[l, f] + sum_f v_weight[j, f] max_l S_ij[l, f])

    The extension never holds the ``[Bt, Bv, L, F]`` tensor (tiles only), accumulates in
    float32 (float64 for float64) and is differentiable w.r.t. ``t``, ``v``, ``t_weight``
    and ``v_weight`` (gradients in their dtypes; a max passes its gradient to its arg-max,
    ties to the lowest index; masked entries get none). Double backward is not supported.
    The torch path is the reference's einsum formulation in the tokens' dtype.
    """
    if _backend.resolve(_OP, backend, t.device) == "ext":  # checked in C++
        return torch.ops.nbretr.wti_similarity(t, t_mask, t_weight, v, v_mask, v_weight)
    check_wti_args(t, t_mask, t_weight, v, v_mask, v_weight)
    return _ref.wti_similarity(t, t_mask, t_weight, v, v_mask, v_weight)


def wti_block(q: tuple[torch.Tensor, torch.Tensor, torch.Tensor], g: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
              *, q_role: str = "text", backend: _backend.Backend | None = None) -> torch.Tensor:
    """One ``[Q_tile, G_tile]`` block of WTI similarities for tiled callers (topk_centrality
    with ``sim="wti"``): ``q`` and ``g`` are ``(tokens, mask, weight)`` triples; with
    ``q_role="text"`` q is the text side, with ``"video"`` the video side (the block is then
    the transpose of ``wti_similarity(g..., q...)``). No gradient is taken (``no_grad``)."""
    if q_role not in ("text", "video"):
        raise ValueError(f"q_role must be 'text' or 'video', got {q_role!r}")
    with torch.no_grad():
        if q_role == "text":
            return wti_similarity(*q, *g, backend=backend)
        return wti_similarity(*g, *q, backend=backend).t()


if _backend._ext.ext_loaded():

    def _out_dtype(t: torch.Tensor) -> torch.dtype:
        return torch.float64 if t.dtype == torch.float64 else torch.float32

    @torch.library.register_fake("nbretr::wti_similarity")
    def _wti_fake(t, t_mask, t_weight, v, v_mask, v_weight):
        check_wti_args(t, t_mask, t_weight, v, v_mask, v_weight)
        return t.new_empty((t.shape[0], v.shape[0]), dtype=_out_dtype(t))

    @torch.library.register_fake("nbretr::wti_similarity_backward")
    def _wti_backward_fake(grad, t, t_mask, t_weight, v, v_mask, v_weight):
        return (torch.empty_like(t, memory_format=torch.contiguous_format),
                torch.empty_like(t_weight, memory_format=torch.contiguous_format),
                torch.empty_like(v, memory_format=torch.contiguous_format),
                torch.empty_like(v_weight, memory_format=torch.contiguous_format))

    def _setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _backward(ctx, grad):
        t, t_mask, t_weight, v, v_mask, v_weight = ctx.saved_tensors
        gt, gwt, gv, gwv = torch.ops.nbretr.wti_similarity_backward(
            grad, t, t_mask, t_weight, v, v_mask, v_weight)
        need = ctx.needs_input_grad
        return (gt if need[0] else None, None, gwt if need[2] else None,
                gv if need[3] else None, None, gwv if need[5] else None)

    torch.library.register_autograd("nbretr::wti_similarity", _backward, setup_context=_setup_context)

    def _refuse_double_backward(ctx, *grads):
        raise RuntimeError("nbretr.wti_similarity: double backward is not supported "
                           "(wti_similarity_backward has no derivative); use backend='torch' "
                           "for higher-order gradients")

    torch.library.register_autograd("nbretr::wti_similarity_backward", _refuse_double_backward,
                                    setup_context=lambda ctx, inputs, output: None)
