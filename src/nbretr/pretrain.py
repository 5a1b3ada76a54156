"""The pretrained stand-in: the tiny CLIP pretrained on a generated corpus, so that the
embedded default run fine-tunes a pretrained CLIP as the paper's recipe does instead of
starting from random weights.

The corpus (:func:`nbretr.data.synthetic.corpus_specs`) is drawn by the embedded dataset's
generator from random streams the dataset never uses, and leaves out every clip whose
factors and caption equal those of a video in the dataset's builds; its clips are rendered
in memory (frames 0, 11 and 23 of 24, chroma-subsampled like the decoded .mp4 files).

The model is the tiny CLIP of the embedded preset (width 64, 2 layers, 2 heads, 8-pixel
patches on 32-pixel frames, the embedded word vocabulary), trained with CLIP's symmetric
InfoNCE: a caption is its end token's projected feature (CLIP's pooling), a clip the mean
of its frames' projected CLS features plus a linear map of the last frame's minus the first
frame's (a motion head, dropped after pretraining, through which the text tower learns the
direction words). The result is a Hugging Face CLIP folder (``config.json``,
``model.safetensors``) with the word vocabulary (``word_tokenizer.json``) and a
``manifest.json`` naming every file's size and SHA-256, the settings, the corpus's held-out
scores and the wall time.

It is built on first use and cached beside the dataset, ``<data>/synthetic/clip-tiny-<size>``
(``data/synthetic`` or ``$NBRETR_DATA/synthetic``; ``-seed<N>`` for another seed): a folder
whose manifest is missing, incomplete, for other settings or does not match its files is
rebuilt, never loaded. Building writes a temporary folder and renames it into place, under
the same lock as the dataset, so concurrent runs build once. Cost on 2 cores: see
docs/data.md ("The pretrained stand-in").

Command: ``python -m nbretr.pretrain [--size default|small] [--seed N] [--root DIR] [--force]``.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from nbretr.checkpoint import file_sha256

log = logging.getLogger("nbretr")

VERSION = 1
FRAMES = (0, 11, 23)
# the architecture of the embedded preset's tiny CLIP (config.EMBEDDED_DEFAULTS)
ARCH = dict(image_size=32, width=64, layers=2, heads=2, patch_size=8)
# the run options (TrainConfig fields) that must equal ARCH's shapes for --clip tiny-pretrained
ARCH_OPTIONS = {"clip_width": "width", "clip_layers": "layers", "clip_heads": "heads", "patch_size": "patch_size"}
# corpus and optimisation per size: "default" for the embedded default, "small" for tests
SETTINGS = {
    "default": dict(samples=20000, val=1000, epochs=8, batch_size=256, lr=2e-3, weight_decay=0.1, warmup=0.05),
    "small": dict(samples=1024, val=128, epochs=2, batch_size=128, lr=2e-3, weight_decay=0.1, warmup=0.05),
}
MAX_WORDS = 16
FILES = ("config.json", "model.safetensors", "word_tokenizer.json")


def dir_name(size: str = "default", seed: int = 0) -> str:
    """``clip-tiny-<size>[-seed<N>]``: the stand-in's folder name."""
    return f"clip-tiny-{size}" + ("" if int(seed) == 0 else f"-seed{int(seed)}")


def default_dir(size: str = "default", seed: int = 0) -> Path:
    """``<data>/synthetic/clip-tiny-<size>[-seed<N>]``, beside the dataset's builds."""
    from nbretr.data.synthetic import base_root
    return base_root() / dir_name(size, seed)


def params(size: str, seed: int) -> dict:
    """Everything the stand-in depends on; a cached folder with other params is rebuilt."""
    from nbretr.data import synthetic
    if size not in SETTINGS:
        raise ValueError(f"pretrained stand-in size must be one of {sorted(SETTINGS)}, got {size!r}")
    return {"version": VERSION, "generator_version": synthetic.VERSION, "size": size, "seed": int(seed),
            "frames": list(FRAMES), "max_words": MAX_WORDS, **ARCH, **SETTINGS[size]}


def _read_manifest(root: Path) -> dict | None:
    try:
        m = json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("complete") is True and isinstance(m.get("files"), dict) else None


def problems(root: str | os.PathLike, size: str = "default", seed: int = 0) -> list[str]:
    """Why the folder ``root`` cannot be loaded as the stand-in of ``size`` and ``seed``
    (empty when it can): no complete manifest, other settings, or a file missing or whose
    size or SHA-256 differs from the manifest."""
    root = Path(root)
    m = _read_manifest(root)
    if m is None:
        return [f"{root}: no complete manifest.json"]
    want, have = params(size, seed), m.get("params") or {}
    if have != want:
        diff = sorted(k for k in set(want) | set(have) if have.get(k) != want.get(k))
        return [f"{root}: built with other settings ({', '.join(diff)})"]
    out = []
    for name in FILES:
        entry, path = m["files"].get(name), root / name
        if entry is None:
            out.append(f"{path}: not in the manifest")
        elif not path.is_file():
            out.append(f"{path}: missing")
        elif path.stat().st_size != entry.get("bytes") or file_sha256(path) != entry.get("sha256"):
            out.append(f"{path}: differs from the manifest (corrupt or partial)")
    return out


def ensure(size: str = "default", seed: int = 0, root: str | os.PathLike | None = None, *,
           progress: bool | None = None) -> Path:
    """The folder of the stand-in of ``size`` and ``seed``, built (or rebuilt) when the cache
    does not check out (:func:`problems`). Returns a folder :func:`nbretr.models.clip.load_clip`
    reads."""
    from nbretr.data.synthetic import build_lock
    root = Path(root) if root is not None else default_dir(size, seed)
    if not problems(root, size, seed):
        return root
    with build_lock(root):
        bad = problems(root, size, seed)
        if not bad:  # another process built it meanwhile
            return root
        if root.exists():
            log.warning("pretrained stand-in: rebuilding %s (%s)", root, "; ".join(bad))
        else:
            log.info("pretrained stand-in: %s is not built yet; pretraining the tiny CLIP (size %s)", root, size)
        return build(root, size, seed, progress=progress)


def build(root: str | os.PathLike, size: str = "default", seed: int = 0, *, progress: bool | None = None) -> Path:
    """Pretrain the stand-in and write it to ``root`` (replacing what is there): into a
    temporary folder beside it first, renamed into place once complete. The caller holds
    the lock (:func:`ensure` does)."""
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.with_name(f".{root.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):  # a cold cache must not change the caller's draws
            clip, tok, stats = pretrain(size, seed, progress=progress)
        tmp.mkdir()
        clip.save_pretrained(str(tmp), safe_serialization=True)
        tok.save(tmp / "word_tokenizer.json")
        files = {n: {"bytes": (tmp / n).stat().st_size, "sha256": file_sha256(tmp / n)} for n in FILES}
        manifest = {"params": params(size, seed), "complete": True, "files": files, "stats": stats,
                    "wall_s": round(time.perf_counter() - t0, 1), "threads": torch.get_num_threads()}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("pretrained stand-in: wrote %s in %.0f s (held-out text->video R@1 %.1f)", root,
             manifest["wall_s"], stats["val_t2v_R1"])
    return root


class _Pretrainer(nn.Module):
    """The tiny CLIP with the pretraining's pooling and its (discarded) motion head."""

    def __init__(self, vocab_size: int):
        super().__init__()
        from nbretr.models import clip as clip_mod
        self.clip = clip_mod.build_clip(clip_mod.tiny_clip_config(
            vocab_size, ARCH["image_size"], width=ARCH["width"], layers=ARCH["layers"], heads=ARCH["heads"],
            patch_size=ARCH["patch_size"]))
        dim = self.clip.config.projection_dim
        self.motion = nn.Linear(dim, dim)

    def text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        from nbretr.models.clip import encode_text_tokens
        tokens = encode_text_tokens(self.clip, ids, mask)
        end = mask.sum(1) - 1  # the end token: the word tokenizer packs <start> words <end>
        return F.normalize(tokens[torch.arange(ids.shape[0]), end], dim=-1)

    def video(self, frames: torch.Tensor) -> torch.Tensor:
        from nbretr.models.clip import encode_frames
        b, f = frames.shape[:2]
        x = encode_frames(self.clip, frames.flatten(0, 1)).view(b, f, -1)
        return F.normalize(x.mean(1) + self.motion(x[:, -1] - x[:, 0]), dim=-1)


def _corpus(size: str, seed: int):
    from nbretr.data import synthetic
    from nbretr.data.decoding import Preprocess
    s = SETTINGS[size]
    specs = synthetic.corpus_specs(s["samples"] + s["val"], seed)
    frames = np.stack([synthetic.render_frames(sp, seed, list(FRAMES)) for sp in specs])  # [N, F, H, W, 3]
    tok = synthetic.word_tokenizer()
    ids, mask = tok([sp["caption"] for sp in specs], max_words=MAX_WORDS)
    return frames, ids, mask, tok, Preprocess(image_size=ARCH["image_size"])


def _images(frames: np.ndarray, pre) -> torch.Tensor:
    b, f = frames.shape[:2]
    return pre(frames.reshape(b * f, *frames.shape[2:])).view(b, f, 3, pre.image_size, pre.image_size)


@torch.no_grad()
def _evaluate(model: _Pretrainer, frames, ids, mask, pre, k: int = 10) -> dict:
    from nbretr import metrics, scoring
    model.eval()
    t = torch.cat([model.text(ids[i:i + 256], mask[i:i + 256]) for i in range(0, len(ids), 256)])
    v = torch.cat([model.video(_images(frames[i:i + 256], pre)) for i in range(0, len(ids), 256)])
    model.train()
    ranks = scoring.ranks(t, v)
    counts = scoring.k_occurrence(t, v, k)
    return {"val_t2v_R1": round(100 * float((ranks == 1).double().mean()), 2),
            "val_t2v_R5": round(100 * float((ranks <= 5).double().mean()), 2),
            "val_t2v_skewness": round(metrics.hubness(counts, k, len(ids))["skewness"], 3), "val_items": len(ids)}


def pretrain(size: str = "default", seed: int = 0, *, progress: bool | None = None):
    """``(clip, tokenizer, stats)``: the pretrained ``CLIPModel`` (eval mode), the word
    tokenizer and the corpus's held-out scores (text->video R@1/R@5 and N_10 skewness, %
    and unitless, on the ``val`` items of :data:`SETTINGS`)."""
    from tqdm import tqdm

    s = SETTINGS[size]
    frames, ids, mask, tok, pre = _corpus(size, seed)
    n = s["samples"]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = _Pretrainer(tok.vocab_size)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s["weight_decay"]},
                             {"params": rest, "weight_decay": 0.0}], lr=s["lr"])
    per_epoch = n // s["batch_size"]
    total = per_epoch * s["epochs"]
    warm = max(1, int(total * s["warmup"]))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: (i + 1) / warm if i < warm else 0.5 * (1 + math.cos(math.pi * (i - warm) / max(1, total - warm))))
    bar = tqdm(total=total, desc=f"pretrain clip-tiny[{size}]", unit="step",
               disable=None if progress is None else not progress)
    losses = []
    for _ in range(s["epochs"]):
        order = torch.randperm(n, generator=gen)
        for b in range(per_epoch):
            idx = order[b * s["batch_size"]:(b + 1) * s["batch_size"]]
            t = model.text(ids[idx], mask[idx])
            v = model.video(_images(frames[idx.numpy()], pre))
            logits = model.clip.logit_scale.exp() * t @ v.T
            y = torch.arange(len(idx))
            loss = (F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y)) / 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                model.clip.logit_scale.clamp_(max=math.log(100.0))
            losses.append(float(loss.detach()))
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    stats = _evaluate(model, frames[n:], ids[n:], mask[n:], pre)
    stats.update(steps=total, first_loss=round(losses[0], 4), last_loss=round(float(np.mean(losses[-10:])), 4))
    return model.clip.eval(), tok, stats


def load_tokenizer(root: str | os.PathLike):
    """The word tokenizer saved with the stand-in."""
    from nbretr.data.tokenizers import WordTokenizer
    return WordTokenizer.load(Path(root) / "word_tokenizer.json")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nbretr.pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="default", choices=sorted(SETTINGS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--root", default=None, help="folder (default <data>/synthetic/clip-tiny-<size>)")
    p.add_argument("--force", action="store_true", help="pretrain again even when the cache checks out")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = Path(a.root) if a.root else default_dir(a.size, a.seed)
    if a.force and root.exists():
        shutil.rmtree(root)
    root = ensure(a.size, a.seed, root, progress=True)
    m = _read_manifest(root)
    print(f"{root}: pretrained stand-in ready ({m['stats']}, built in {m['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
