"""WTI token-wise similarity, pure PyTorch (docs/operators.md): the reference's
einsum formulation, which holds the whole [Bt, Bv, L, F] similarity tensor."""
from __future__ import annotations

import torch


def wti_similarity(t: torch.Tensor, t_mask: torch.Tensor, t_weight: torch.Tensor, v: torch.Tensor,
                   v_mask: torch.Tensor, v_weight: torch.Tensor) -> torch.Tensor:
    """``s [Bt, Bv]`` (float32; float64 for float64 inputs), computed in the tokens' dtype.

    S = einsum('ild,jfd->ijlf') times both masks (masked entries 0, not -inf), max over
    frames and over tokens (``max(dim)``, whose backward routes to the returned index),
    weighted sums, half their sum. Argument checks are done by the public wrapper.
    """
    dt = t.dtype
    S = torch.einsum("ild,jfd->ijlf", t, v)
    S = S * t_mask.to(dt)[:, None, :, None]
    S = S * v_mask.to(dt)[None, :, None, :]
    t2v = torch.einsum("ijl,il->ij", S.max(dim=-1)[0], t_weight.to(dt))
    v2t = torch.einsum("ijf,jf->ij", S.max(dim=-2)[0], v_weight.to(dt))
    out = (t2v + v2t) / 2.0
    return out.to(torch.float64 if dt == torch.float64 else torch.float32)
