"""Global features by token clustering (docs/method.md, "Global features").

Two rounds of cluster-and-merge per modality end at ONE global token per sample, for any
number of tokens N: round 1 keeps ``ceil(N·ratio)`` clusters (reference ratios: text 1/6,
video 1/4: 24 words → 4, 12 frames → 3), round 2 always keeps 1 (the reference's second
ratios, 1/4 and 1/3, are exactly what makes 4 → 1 and 3 → 1; for other N the second round's
ratio is 1/n₁, so 64 words → 11 → 1 rather than the reference's 11 → 3).

Each round (:class:`ClusterMerge` then :class:`MergeBlock`):
1. token mixer: ``x ← x + Conv1d_k3(x)`` over tokens (no bias), LayerNorm, score
   ``Linear(D, 1)``; weight ``exp(score)``, masked tokens score −∞ (weight 0);
2. DPC-kNN (:func:`dpc_knn`): distances ``cdist/√D`` (masked tokens' columns set to the
   batch's max + 1), density ``exp(−mean of the k=3 smallest squared distances)``
   (0 on masked tokens), distance to the nearest denser token (the row max if none),
   centres = top ``n`` of density × distance, each token to its nearest centre;
3. merge (:func:`merge_tokens`): weighted average of the mixed tokens within each cluster;
4. block: the merged tokens attend (pre-LayerNorm, shared norm for queries and keys) over
   the round's mixed tokens with the scores as an additive attention bias, residual;
   then an MLP (``cluster_mlp=True``, the default; the reference's block has no MLP: set
   ``mlp=False`` to match it).

Deviations from the reference, on purpose: the density tie-break is deterministic
(+1e-6·(N−j)/N, earlier tokens win, instead of uniform noise × 1e-6), so two runs give the
same numbers; a sample with NO valid token is clustered as if all its tokens were valid
(the reference produces NaN).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def dpc_knn(x: torch.Tensor, num_clusters: int, k: int = 3, mask: torch.Tensor | None = None
            ) -> torch.Tensor:
    """DPC-kNN cluster assignment ``[B, N]`` int64 in ``[0, num_clusters)`` of tokens x ``[B, N, C]``;
    cluster c's centre is assigned to c."""
    B, N, C = x.shape
    x = x.float()
    dist = torch.cdist(x, x) / math.sqrt(C)
    if mask is not None:
        keep = mask.to(torch.bool)
        dist = torch.where(keep[:, None, :], dist, dist.max() + 1)
    near = torch.topk(dist, k=min(k, N), dim=-1, largest=False).values
    density = torch.exp(-(near ** 2).mean(dim=-1))
    density = density + 1e-6 * torch.arange(N, 0, -1, device=x.device, dtype=x.dtype) / N
    if mask is not None:
        density = density * keep
    denser = density[:, None, :] > density[:, :, None]          # [b, i, j]: j denser than i
    dmax = dist.flatten(1).max(dim=-1).values[:, None, None]
    parent = torch.where(denser, dist, dmax).min(dim=-1).values  # [B, N]
    centres = torch.topk(parent * density, k=num_clusters, dim=-1).indices  # [B, n]
    to_centre = torch.gather(dist, 1, centres[:, :, None].expand(B, num_clusters, N))  # [B, n, N]
    assign = to_centre.argmin(dim=1)
    assign.scatter_(1, centres, torch.arange(num_clusters, device=x.device).expand(B, -1).contiguous())
    return assign


def merge_tokens(x: torch.Tensor, assign: torch.Tensor, num_clusters: int, weight: torch.Tensor
                 ) -> torch.Tensor:
    """Weighted average within clusters: ``[B, n, C]`` = Σ_{l∈c} w_l x_l / (Σ_{l∈c} w_l + 1e-6)."""
    w = F.one_hot(assign, num_clusters).to(x.dtype) * weight[..., None].to(x.dtype)  # [B, N, n]
    total = w.sum(dim=1) + 1e-6
    return torch.einsum("bnc,bnd->bcd", w, x) / total[..., None]


class ClusterMerge(nn.Module):
    """Token mixer + DPC-kNN + merge (the reference's CTM)."""

    def __init__(self, dim: int, k: int = 3):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, kernel_size=3, padding=1, bias=False)
        self.norm = nn.LayerNorm(dim)
        self.score = nn.Linear(dim, 1)
        self.k = k

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, num_clusters: int):
        """Returns ``(merged [B, n, D], mixed tokens [B, N, D], scores [B, N] (−∞ on masked))``."""
        x = x + self.conv(x.transpose(1, 2)).transpose(1, 2)
        x = self.norm(x)
        score = self.score(x).squeeze(-1)
        if mask is not None:
            score = score.masked_fill(~mask.to(torch.bool), -math.inf)
        assign = dpc_knn(x, num_clusters, self.k, mask)
        merged = merge_tokens(x, assign, num_clusters, score.exp())
        return merged, x, score


class MergeBlock(nn.Module):
    """Merged tokens attend over the previous tokens (score as attention bias), then an MLP
    (the reference's TCBlock; ``mlp=False`` is exactly the reference's attention-only block)."""

    def __init__(self, dim: int, heads: int = 8, mlp: bool = True, mlp_ratio: float = 4.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} must be divisible by heads {heads}")
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = None
        if mlp:
            hidden = int(dim * mlp_ratio)
            self.norm2 = nn.LayerNorm(dim)
            self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, merged: torch.Tensor, tokens: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        B, n, C = merged.shape
        N = tokens.shape[1]
        h, hd = self.heads, C // self.heads
        q = self.q(self.norm1(merged)).view(B, n, h, hd).transpose(1, 2)
        k, v = self.kv(self.norm1(tokens)).view(B, N, 2, h, hd).permute(2, 0, 3, 1, 4)
        attn = (q * hd ** -0.5) @ k.transpose(-2, -1) + score[:, None, None, :].to(q.dtype)
        out = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, n, C)
        x = merged + self.proj(out)
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))
        return x


class GlobalTokenizer(nn.Module):
    """Two rounds of cluster-merge-block: tokens ``[B, N, D]`` + mask → one token ``[B, D]``."""

    def __init__(self, dim: int, first_ratio: float, *, k: int = 3, heads: int = 8, mlp: bool = True):
        super().__init__()
        if not 0 < first_ratio <= 1:
            raise ValueError(f"first_ratio must be in (0, 1], got {first_ratio}")
        self.first_ratio = first_ratio
        self.merge0, self.block0 = ClusterMerge(dim, k), MergeBlock(dim, heads, mlp)
        self.merge1, self.block1 = ClusterMerge(dim, k), MergeBlock(dim, heads, mlp)

    def cluster_counts(self, n_tokens: int) -> tuple[int, int]:
        """Clusters kept by the two rounds for ``n_tokens`` input tokens: ``(ceil(N·r), 1)``."""
        return max(1, math.ceil(n_tokens * self.first_ratio - 1e-9)), 1

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n0, n1 = self.cluster_counts(x.shape[1])
        keep = mask.to(torch.bool)
        keep = keep | ~keep.any(dim=1, keepdim=True)  # a sample with no valid token: use all
        merged, mixed, score = self.merge0(x, keep, n0)
        x = self.block0(merged, mixed, score)
        merged, mixed, score = self.merge1(x, None, n1)
        x = self.block1(merged, mixed, score)
        return x[:, 0]
