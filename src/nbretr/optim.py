"""The reference's optimiser and schedule (docs/method.md, "Optimiser").

``BertAdam``: Adam with decoupled weight decay and *no bias correction*, as the reference's
optimiser (from CLIP4Clip) computes it; ``warmup_cosine``: linear warm-up over the first
``warmup`` fraction of the steps, then ``0.5 (1 + cos(pi x))`` of the progress x. Parameter
groups: CLIP at ``lr * coef_lr``, new modules at ``lr``; which parameters are exempt from
weight decay is ``decay_exempt``: ``"bias"`` (the released code: every parameter whose name
contains "bias"; LayerNorm gains, the logit scale and class embeddings are decayed) or
``"1d"`` (every parameter of fewer than two dimensions, normalisation weights included).
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn


class BertAdam(torch.optim.Optimizer):
    """Adam without bias correction, with decoupled weight decay (reference BertAdam).

    update = m / (sqrt(v) + eps) + weight_decay * p;  p -= lr_t * update
    The learning-rate schedule is applied by an LR scheduler (``param_group['lr']``).
    """

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.98),
                 eps: float = 1e-6, weight_decay: float = 0.01):
        if lr < 0:
            raise ValueError(f"BertAdam: lr must be >= 0, got {lr}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["next_m"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["next_v"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                m, v = state["next_m"], state["next_v"]
                g = p.grad.float() if p.dtype != torch.float32 else p.grad
                m.mul_(b1).add_(g.to(m.dtype), alpha=1 - b1)
                v.mul_(b2).addcmul_(g.to(v.dtype), g.to(v.dtype), value=1 - b2)
                update = m / (v.sqrt() + group["eps"])
                if group["weight_decay"] > 0:
                    update = update + group["weight_decay"] * p
                p.add_(update.to(p.dtype), alpha=-group["lr"])
        return loss


def warmup_cosine(progress: float, warmup: float) -> float:
    """The reference's schedule factor at ``progress`` in [0, 1]."""
    if progress < warmup:
        return progress / warmup
    return 0.5 * (1.0 + math.cos(math.pi * progress))


DECAY_EXEMPT = ("bias", "1d")


def decay_exempt_by(name: str, p: torch.Tensor, rule: str) -> bool:
    """Whether parameter ``name`` gets no weight decay under ``rule`` (see module doc)."""
    if rule == "bias":
        # the released code's list: "bias", "LayerNorm.bias", "LayerNorm.weight" (substrings;
        # with CLIP's names the last never matches, so only biases are exempt)
        return any(key in name for key in ("bias", "LayerNorm.bias", "LayerNorm.weight"))
    if rule == "1d":
        return p.ndim < 2 or "norm" in name.lower() or "ln_" in name or name.endswith(".bias")
    raise ValueError(f"decay_exempt must be one of {DECAY_EXEMPT}, got {rule!r}")


def param_groups(model: nn.Module, lr: float, coef_lr: float, weight_decay: float,
                 clip_prefix: str = "clip.", decay_exempt: str = "1d") -> list[dict]:
    """Four groups: {CLIP, new} x {decay, no decay}; the exempt ones by ``decay_exempt``.
    Frozen parameters (``requires_grad=False``) are left out."""
    groups = {(c, d): [] for c in (True, False) for d in (True, False)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_clip = name.startswith(clip_prefix) or f".{clip_prefix}" in name
        no_decay = decay_exempt_by(name, p, decay_exempt)
        groups[(is_clip, not no_decay)].append(p)
    out = []
    for (is_clip, decay), params in groups.items():
        if params:
            out.append({"params": params, "lr": lr * coef_lr if is_clip else lr,
                        "weight_decay": weight_decay if decay else 0.0,
                        "name": f"{'clip' if is_clip else 'new'}_{'decay' if decay else 'no_decay'}"})
    return out


def build_optimizer(model: nn.Module, lr: float, coef_lr: float, weight_decay: float, total_steps: int,
                    warmup_proportion: float, kind: str = "bertadam", decay_exempt: str = "1d"):
    """(optimizer, scheduler) as in the reference. ``kind``: "bertadam" (reference) or "adamw"."""
    groups = param_groups(model, lr, coef_lr, weight_decay, decay_exempt=decay_exempt)
    if kind == "bertadam":
        opt = BertAdam(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)
    elif kind == "adamw":
        opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)
    else:
        raise ValueError(f"optimizer must be 'bertadam' or 'adamw', got {kind!r}")
    total = max(1, int(total_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: warmup_cosine(step / total, max(warmup_proportion, 1e-8)))
    return opt, sched
