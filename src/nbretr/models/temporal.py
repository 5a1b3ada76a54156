"""The temporal transformer over frames (docs/method.md, "Encoders").

``V = Transformer(F + P) + F``: learned frame position embeddings ``P`` (a table of CLIP's
context length, initialised from CLIP's text positional embedding), ``layers`` (default 4)
CLIP text-transformer blocks (initialised from the first blocks of CLIP's text transformer),
a frame mask on the attention keys (additive −1e6, as the reference), and the input added
back (residual).
"""
from __future__ import annotations

import copy
import logging

import torch
from torch import nn

log = logging.getLogger("nbretr")


class TemporalTransformer(nn.Module):
    """Frames ``[B, F, D]`` + mask ``[B, F]`` → ``[B, F, D]``.

    Built from a transformers ``CLIPTextConfig`` (its ``hidden_size`` must equal D) so that its
    blocks are ``CLIPEncoderLayer`` and load CLIP's text blocks one to one."""

    def __init__(self, text_config, layers: int = 4, max_positions: int | None = None):
        super().__init__()
        from transformers.models.clip.modeling_clip import CLIPEncoderLayer

        cfg = copy.deepcopy(text_config)
        self.width = cfg.hidden_size
        self.frame_position_embeddings = nn.Embedding(max_positions or cfg.max_position_embeddings,
                                                      self.width)
        self.layers = nn.ModuleList([CLIPEncoderLayer(cfg) for _ in range(layers)])
        self.grad_checkpointing = False  # recompute each block in backward (training only)
        nn.init.normal_(self.frame_position_embeddings.weight, std=0.02)

    @torch.no_grad()
    def init_from_clip(self, clip) -> None:
        """Copy CLIP's text positional table and its first ``len(self.layers)`` text blocks."""
        pos = clip.text_model.embeddings.position_embedding.weight
        n = min(pos.shape[0], self.frame_position_embeddings.num_embeddings)
        self.frame_position_embeddings.weight[:n].copy_(pos[:n])
        src = clip.text_model.encoder.layers
        for i, layer in enumerate(self.layers):
            if i < len(src):
                layer.load_state_dict(src[i].state_dict())
        if len(self.layers) > len(src):
            log.info("temporal transformer has %d layers, CLIP's text transformer only %d: "
                        "the rest keep their random initialisation", len(self.layers), len(src))

    def forward(self, frames: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        B, F, D = frames.shape
        if F > self.frame_position_embeddings.num_embeddings:
            raise ValueError(f"frames: {F} frames exceed the {self.frame_position_embeddings.num_embeddings} "
                             "frame position embeddings")
        pos = self.frame_position_embeddings(torch.arange(F, device=frames.device))
        x = frames + pos[None].to(frames.dtype)
        keep = frame_mask.to(torch.bool)
        bias = torch.zeros(B, 1, F, F, dtype=x.dtype, device=x.device)
        bias = bias.masked_fill(~keep[:, None, None, :], -1e6 if x.dtype == torch.float32 else -1e4)
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if ckpt:
                from torch.utils.checkpoint import checkpoint
                x = checkpoint(layer, x, bias, use_reentrant=False)
            else:
                x = layer(x, bias)
        return x + frames
