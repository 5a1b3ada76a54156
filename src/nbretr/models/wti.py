"""The WTI head (docs/method.md, "Fine-grained similarity (WTI)"): two token-weight MLPs and the
weighted token-wise similarity through :func:`nbretr.ops.wti_similarity`.

``a_t = softmax_l(MLP_t(T)_l)`` over valid text tokens, ``a_v = softmax_f(MLP_v(V)_f)`` over
valid frames, MLP = Linear(D, 2D), ReLU, Linear(2D, 1) (D = 512 for ViT-B); tokens are
L2-normalised and ``s_ij = ½(Σ_l a_t[i,l]·max_f S_ij[l,f] + Σ_f a_v[j,f]·max_l S_ij[l,f])``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nbretr import ops

_MASK_FILL = -9e15  # the reference's fill before the softmax


def weight_mlp(dim: int) -> nn.Sequential:
    """Linear(D, 2D), ReLU, Linear(2D, 1), initialised N(0, 0.02) with zero biases. The
    ReLU is not in place (the reference's is): on [B, L, D] tokens the first Linear's output
    is a view, and an in-place op on it costs autograd a copy of the whole base (CopySlices,
    AsStrided) in the backward, about a tenth of the loss head's time; the values are the same."""
    mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, 1))
    for m in mlp:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    return mlp


def masked_token_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over dim 1 of ``logits [B, N]`` on valid tokens, exactly 0 on masked ones
    (float32). A row with no valid token gets all zeros."""
    keep = mask.to(torch.bool)
    w = torch.softmax(logits.float().masked_fill(~keep, _MASK_FILL), dim=1)
    return w * keep


class WTIHead(nn.Module):
    """Token weights for text and video and the WTI similarity ``[Bt, Bv]`` (float32)."""

    def __init__(self, dim: int, backend: ops.Backend | None = None):
        super().__init__()
        self.text_weight_fc = weight_mlp(dim)
        self.video_weight_fc = weight_mlp(dim)
        self.backend = backend

    def text_weights(self, t: torch.Tensor, t_mask: torch.Tensor) -> torch.Tensor:
        """``a_t [B, L]`` float32 from un-normalised text tokens ``[B, L, D]``."""
        return masked_token_softmax(self.text_weight_fc(t).squeeze(-1), t_mask)

    def video_weights(self, v: torch.Tensor, v_mask: torch.Tensor) -> torch.Tensor:
        """``a_v [B, F]`` float32 from un-normalised frame features ``[B, F, D]``."""
        return masked_token_softmax(self.video_weight_fc(v).squeeze(-1), v_mask)

    def forward(self, t: torch.Tensor, t_mask: torch.Tensor, v: torch.Tensor, v_mask: torch.Tensor,
                *, backend: ops.Backend | None = None) -> torch.Tensor:
        """``s [Bt, Bv]`` float32 for un-normalised tokens t ``[Bt, L, D]``, v ``[Bv, F, D]``."""
        a_t = self.text_weights(t, t_mask)
        a_v = self.video_weights(v, v_mask)
        t_hat = F.normalize(t.float(), dim=-1)
        v_hat = F.normalize(v.float(), dim=-1)
        return ops.wti_similarity(t_hat, t_mask, a_t, v_hat, v_mask, a_v,
                                  backend=backend if backend is not None else self.backend)

    def token_triples(self, t, t_mask, v, v_mask):
        """``((t̂, t_mask, a_t), (v̂, v_mask, a_v))``: the inputs of the WTI operators."""
        return ((F.normalize(t.float(), dim=-1), t_mask, self.text_weights(t, t_mask)),
                (F.normalize(v.float(), dim=-1), v_mask, self.video_weights(v, v_mask)))
