"""Step time and peak memory of NeighborRetr's loss head (everything after the encoders:
WTI against the batch and the bank, token clustering, the four losses, the bank push) and
of a full training step of the tiny model, extension vs torch path.

    python bench/train_step.py [--device cuda] [--size tiny|vitb32] [--batch 128] [--out DIR]
    python bench/train_step.py --memory-options --size vitb32 --batch 8

``--size vitb32`` uses a ViT-B/32-sized random CLIP (width 512, 12 layers) at 224x224.
``--memory-options``: one full training step (encoders, losses, backward, optimiser step)
without and with ``--grad-checkpointing`` and ``--freeze-clip-layers 6``: step time and
peak memory (CPU: every tensor allocation, as the profiler records them), after checking
that checkpointing gives the same gradients.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import _runner  # noqa: E402

from nbretr import MemoryBank, ops  # noqa: E402


def build(size: str, max_words: int, max_frames: int, device: str):
    from nbretr.models import NeighborRetr, NeighborRetrConfig
    from nbretr.models import clip as clip_mod
    torch.manual_seed(0)
    cfg = NeighborRetrConfig(max_words=max_words, max_frames=max_frames, vocab_size=1000, image_size=32)
    if size == "vitb32":
        from transformers import CLIPConfig
        ccfg = CLIPConfig(text_config=dict(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                                           num_hidden_layers=12, num_attention_heads=8,
                                           max_position_embeddings=77, hidden_act="quick_gelu"),
                          vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                             num_attention_heads=12, image_size=224, patch_size=32,
                                             hidden_act="quick_gelu"),
                          projection_dim=512)
        image = 224
        model = NeighborRetr(cfg, clip_model=clip_mod.build_clip(ccfg))
    else:
        model = NeighborRetr(cfg)
        image = 32
    model = model.to(device)
    return model, image


def memory_options(args) -> int:
    """Step time and peak memory of a full training step with the memory options."""
    import copy

    from nbretr.models import clip as clip_mod
    from nbretr.optim import build_optimizer
    dev = args.device
    batch = args.batch or (4 if args.quick else 8)
    L, F = 24, 12
    base, image = build(args.size, L, F, dev)
    g = torch.Generator(device="cpu").manual_seed(0)
    inputs = {"text_ids": torch.randint(1, 999, (batch, L), generator=g).to(dev),
              "text_mask": torch.ones(batch, L, dtype=torch.long, device=dev),
              "video": torch.randn(batch, F, 3, image, image, generator=g).to(dev),
              "video_mask": torch.ones(batch, F, dtype=torch.long, device=dev),
              "index": torch.arange(batch, device=dev)}
    layers = len(base.clip.text_model.encoder.layers)
    n_freeze = min(6, layers)
    variants = {"plain": (False, -1), "grad-checkpointing": (True, -1), f"freeze-clip-layers {n_freeze}": (False, n_freeze),
                f"both": (True, n_freeze)}
    # correctness first: checkpointing gives the plain step's gradients
    grads = {}
    for ck in (False, True):
        m = copy.deepcopy(base)
        m.set_grad_checkpointing(ck)
        m.train()
        m(inputs)["loss"].backward()
        grads[ck] = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    worst = max(float((grads[True][n] - grads[False][n]).abs().max() / grads[False][n].abs().max().clamp_min(1e-12))
                for n in grads[False])
    print(f"checkpointing vs plain: largest relative gradient difference {worst:.2e} over {len(grads[False])} tensors")
    del grads
    results = []
    params = dict(size=args.size, batch=batch, frames=F, words=L, image=image)
    for name, (ck, freeze) in variants.items():
        model = copy.deepcopy(base)
        model.set_grad_checkpointing(ck)
        clip_mod.freeze_patch_embedding(model.clip)  # as the reference recipe
        clip_mod.freeze_clip_layers(model.clip, freeze)
        model.train()
        opt, _ = build_optimizer(model, 1e-4, 1e-3, 0.2, 100, 0.1, "bertadam")
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

        def step(model=model, opt=opt):
            out = model(inputs)
            out["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        r = _runner.run_case("full step fwd+bwd+opt", name, params, step, dev, repeats=args.repeats, warmup=1,
                             extra=dict(trainable_params=trainable))
        print(f"{name:<24} {r.ms:>10.0f} ms {r.peak_mb:>10.0f} MiB peak  {trainable / 1e6:.1f} M trainable", flush=True)
        results.append(r)
        del model, opt
    print(_runner.table(results, "plain", f"memory options, full training step ({dev}, {args.size})"))
    _runner.write_json(results, args.out, f"train_step_memory_{args.size}")
    return 0


def main() -> int:
    p = _runner.arg_parser(__doc__)
    p.add_argument("--size", default="tiny", choices=["tiny", "vitb32"])
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--mb-batch", type=int, default=None, help="bank = mb_batch x batch entries")
    p.add_argument("--memory-options", action="store_true",
                   help="time and peak memory of a full step with --grad-checkpointing / --freeze-clip-layers")
    args = p.parse_args()
    if args.memory_options:
        return memory_options(args)
    dev = args.device
    batch = args.batch or (16 if args.quick else (128 if dev.startswith("cuda") else 64))
    mb = args.mb_batch or (2 if args.quick else 10)
    L, F = 24, 12
    model, image = build(args.size, L, F, dev)
    D = model.dim
    g = torch.Generator(device="cpu").manual_seed(0)
    feats = {"T": torch.randn(batch, L, D, generator=g).to(dev), "V": torch.randn(batch, F, D, generator=g).to(dev)}
    tmask = torch.ones(batch, L, dtype=torch.long, device=dev)
    tmask[:, L // 2:] = (torch.rand(batch, L - L // 2, generator=g) > 0.5).long().to(dev)
    tmask[:, 0] = 1
    vmask = torch.ones(batch, F, dtype=torch.long, device=dev)
    bank = MemoryBank.for_features(mb * batch, L, F, D, device=dev)
    for _ in range(mb):
        bank.push({"text": torch.randn(batch, L, D, device=dev), "text_mask": tmask, "video": torch.randn(batch, F, D, device=dev),
                   "video_mask": vmask, "ids": torch.arange(batch, device=dev)})
    results = []
    params = dict(size=args.size, batch=batch, bank=len(bank), L=L, F=F, D=D)
    losses = {}
    backends = ["torch"] + (["ext"] if ops._backend.ext_supports(torch.device(dev))[0] else [])
    for backend in backends:  # correctness first, on the same bank
        with torch.no_grad(), ops.use_backend(backend):
            losses[backend] = float(model.loss(feats["T"], tmask, feats["V"], vmask, bank)["loss"])
    for backend in backends:
        def head(backend=backend):
            T = feats["T"].clone().requires_grad_(True)
            V = feats["V"].clone().requires_grad_(True)
            with ops.use_backend(backend):
                out = model.loss(T, tmask, V, vmask, bank)
                out["loss"].backward()
                bank.push({"text": T.detach(), "text_mask": tmask, "video": V.detach(), "video_mask": vmask,
                           "ids": torch.arange(batch, device=dev)})
            return out
        results.append(_runner.run_case("loss head fwd+bwd+push", backend, params, head, dev, repeats=args.repeats,
                                        warmup=1))
    if len(losses) == 2:
        rel = abs(losses["ext"] - losses["torch"]) / max(abs(losses["torch"]), 1e-12)
        print(f"loss ext {losses['ext']:.6f} vs torch {losses['torch']:.6f} (rel diff {rel:.2e})")
    # full step: encoders + loss + backward
    full_batch = 8 if args.quick else (batch if args.size == "tiny" else min(batch, 128))
    ids = torch.randint(1, 999, (full_batch, L), generator=g).to(dev)
    inputs = {"text_ids": ids, "text_mask": torch.ones(full_batch, L, dtype=torch.long, device=dev),
              "video": torch.randn(full_batch, F, 3, image, image, generator=g).to(dev),
              "video_mask": torch.ones(full_batch, F, dtype=torch.long, device=dev),
              "index": torch.arange(full_batch, device=dev)}
    fparams = dict(size=args.size, batch=full_batch, bank=len(bank), image=image)
    amp = torch.bfloat16 if dev.startswith("cuda") else None
    for backend in backends:
        def step(backend=backend):
            with ops.use_backend(backend), torch.autocast(torch.device(dev).type, dtype=amp, enabled=amp is not None):
                out = model(inputs, bank=bank)
            out["loss"].backward()
            model.zero_grad(set_to_none=True)
        results.append(_runner.run_case("full step fwd+bwd", backend, fparams, step, dev, repeats=max(2, args.repeats // 2),
                                        warmup=1))
    print(_runner.table(results, "torch", f"training step ({dev}, {args.size})"))
    _runner.write_json(results, args.out, f"train_step_{args.size}")
    return 0


if __name__ == "__main__":
    _runner.main_guard(main)
