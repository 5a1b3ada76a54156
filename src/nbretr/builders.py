"""What training and evaluation both build from a resolved :class:`TrainConfig`: the
tokenizer, the dataset splits, the model, the data loader, and the recipe's CLIP choices.

``nbretr.train`` and ``nbretr.eval`` import this module; it imports neither of them.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import torch

from nbretr.config import TINY_CLIPS, TrainConfig, dataset_key

log = logging.getLogger("nbretr")


def data_root(cfg: TrainConfig) -> Path | None:
    if cfg.data_root:
        return Path(cfg.data_root)
    if cfg.dataset == "synthetic":
        return None  # data/synthetic or $NBRETR_DATA/synthetic, built on first use
    raise ValueError(f"--data-root is required for --dataset {cfg.dataset}")


def image_size(cfg: TrainConfig) -> int:
    if cfg.image_size:
        return cfg.image_size
    if cfg.dataset == "synthetic" and cfg.clip in TINY_CLIPS:
        from nbretr.data import synthetic
        return synthetic.FRAME_SIZE
    return 224


def build_split(cfg: TrainConfig, split: str, tokenizer, out_dir: Path | None = None):
    from nbretr.data import build_dataset
    kw: dict[str, Any] = {}
    if out_dir is not None and cfg.dataset != "synthetic":
        kw["missing_list"] = Path(out_dir) / f"missing_videos_{split}.txt"
    if cfg.dataset == "synthetic":
        kw["size"] = cfg.synthetic_size
    if cfg.train_split and split == "train":
        kw["train_list"] = cfg.train_split
    if cfg.video_dir:
        kw["video_dir"] = cfg.video_dir
    if cfg.allow_missing:
        kw["allow_missing"] = True
    if cfg.frame_sampling:
        kw["frame_sampling"] = cfg.frame_sampling
    kw["backend"] = cfg.decoder
    kw["decode_device"] = cfg.decode_device
    if dataset_key(cfg.dataset) == "didemo":
        kw["didemo_window"] = parse_window(cfg.didemo_window)
    if split == "train" and cfg.augment and cfg.augment != "none":
        from nbretr.data.augment import make_augment
        kw["clip_augment"] = make_augment(cfg.augment, image_size=image_size(cfg))
    return build_dataset(cfg.dataset, data_root(cfg), split, tokenizer, max_words=cfg.max_words,
                         max_frames=cfg.max_frames, video_framerate=cfg.video_framerate,
                         image_size=image_size(cfg), strict=cfg.strict_data, **kw)


def parse_window(text: str) -> tuple[float, float] | None:
    """``--didemo-window``: "first,last" seconds, or "whole"."""
    if str(text).strip().lower() in ("whole", "none"):
        return None
    try:
        first, last = (float(x) for x in str(text).split(","))
    except ValueError:
        raise ValueError(f"--didemo-window must be 'first,last' seconds or 'whole', got {text!r}") from None
    return first, last


def build_tokenizer(cfg: TrainConfig, run_dir: Path | None):
    """The tokenizer of the chosen CLIP checkpoint; for the tiny model a word tokenizer (the
    embedded dataset's, or one built from the training captions), saved in the run folder
    so that evaluation reads the same vocabulary."""
    from nbretr.data import tokenizers
    saved = run_dir / "tokenizer.json" if run_dir else None
    if cfg.init_model:  # the model folder's own tokenizer (kept in the run folder too)
        from nbretr import pretrained
        tok = pretrained.load_tokenizer(cfg.init_model)
        if saved is not None and not saved.exists() and not hasattr(tok, "hf"):
            tok.save(saved)
        return tok
    if cfg.clip not in TINY_CLIPS:
        return tokenizers.load_clip_tokenizer(cfg.tokenizer_path or cfg.clip_path)
    if saved is not None and saved.exists():
        return tokenizers.WordTokenizer.load(saved)
    if cfg.dataset == "synthetic":
        from nbretr.data import synthetic
        tok = synthetic.word_tokenizer()
    else:
        def blank(texts, n):
            return torch.zeros(len(texts), n, dtype=torch.long), torch.zeros(len(texts), n, dtype=torch.long)
        tok = tokenizers.WordTokenizer.from_captions(build_split(cfg, "train", blank).captions)
    if saved is not None:
        tok.save(saved)
    return tok


def build_datasets(cfg: TrainConfig, tokenizer, splits: tuple[str, ...] = ("train", "test"),
                   out_dir: Path | None = None) -> dict[str, Any]:
    """The splits; with ``out_dir``, a split that misses a few videos lists their ids in
    ``out_dir/missing_videos_<split>.txt``."""
    return {split: build_split(cfg, split, tokenizer, out_dir) for split in splits}


def build_model(cfg: TrainConfig, vocab_size: int | None):
    """NeighborRetr on the tiny random CLIP (embedded default) or a local checkpoint."""
    from nbretr.models import NeighborRetr
    if cfg.init_model:  # architecture and weights from the model folder, the rest from cfg
        return model_for_run(cfg)
    overrides = dict(image_size=image_size(cfg), clip_path=clip_path(cfg))
    if vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    return NeighborRetr(cfg.model_config(**overrides))


def clip_path(cfg: TrainConfig) -> str | None:
    """The CLIP checkpoint the model starts from: ``--clip-path`` for a real CLIP, the cached
    pretrained stand-in (built on first use, :func:`nbretr.pretrain.ensure`) for
    ``tiny-pretrained``, None for the random tiny CLIP. The stand-in is cached beside the
    dataset: next to ``--data-root`` when given, else in the default data folder."""
    if cfg.clip == "tiny":
        return None
    if cfg.clip == "tiny-pretrained":
        from nbretr import pretrain
        size = cfg.synthetic_size if cfg.synthetic_size in pretrain.SETTINGS else "default"
        root = Path(cfg.data_root).parent / pretrain.dir_name(size) if cfg.data_root else None
        return str(pretrain.ensure(size, root=root))
    return cfg.clip_path


def clip_precision(cfg: TrainConfig, device: torch.device) -> str:
    """"fp16" or "fp32": ``--clip-weights auto`` is the released code's rule, float16 CLIP
    weights when CUDA is present."""
    choice = cfg.clip_weights or "fp32"
    if choice == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    return choice


def prepare_clip(model, cfg: TrainConfig, device: torch.device) -> None:
    """Apply the recipe's CLIP choices: float16 weights (updated in place by the optimiser)
    and the frozen patch embedding; and ``--freeze-clip-layers``."""
    from nbretr.models import clip as clip_mod
    if cfg.freeze_patch_embed:
        clip_mod.freeze_patch_embedding(model.clip)
    if cfg.freeze_clip_layers >= 0:
        frozen = clip_mod.freeze_clip_layers(model.clip, cfg.freeze_clip_layers)
        log.info("--freeze-clip-layers %d: %d CLIP parameter tensors frozen (embeddings and blocks 0-%d of "
                 "both towers)", cfg.freeze_clip_layers, len(frozen), cfg.freeze_clip_layers - 1)
    if clip_precision(cfg, device) == "fp16":
        n = clip_mod.clip_weights_to_fp16(model.clip)
        log.info("CLIP weights in float16 (%d layers), updated in place by the optimiser", n)


def make_loader(dataset, sampler, per_rank_batch: int, num_workers: int):
    from nbretr.data import collate, loader_context
    return torch.utils.data.DataLoader(dataset, batch_size=per_rank_batch, sampler=sampler,
                                       num_workers=num_workers, collate_fn=collate,
                                       multiprocessing_context=loader_context(dataset, num_workers),
                                       persistent_workers=False, pin_memory=torch.cuda.is_available())


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def drop_bad(batch: dict) -> dict:
    """Remove items whose video could not be decoded (the dataset already warned)."""
    bad = batch.get("bad")
    if bad is None or not torch.as_tensor(bad).any():
        return batch
    keep = ~torch.as_tensor(bad, dtype=torch.bool)
    return {k: (v[keep] if torch.is_tensor(v) and v.shape[:1] == keep.shape else v) for k, v in batch.items()}


# -- runs that start from an exported model folder (--init-model) ------------------------------


def init_model_config(cfg, given: Mapping[str, Any] | None = None):
    """``cfg`` (a TrainConfig) made to fit the model folder ``cfg.init_model``: the
    architecture fields (:data:`ARCH_FIELDS`) and the input size come from the folder (one
    given with another value is an error naming both); ``max_words``, ``max_frames``,
    ``video_framerate`` and ``frame_sampling`` come from it unless given."""
    from nbretr import pretrained
    given = dict(given or {})
    d = Path(cfg.init_model)
    if d.is_file():
        raise ValueError(f"--init-model {d} is a file; it takes a model folder written by python -m nbretr.export "
                         "(a released pytorch_model.bin: export it with --from-released first)")
    mc = pretrained.read_config(d)
    if cfg.clip not in TINY_CLIPS or cfg.clip_path or cfg.tokenizer_path:
        raise ValueError(f"--init-model {d} brings its own CLIP tower and tokenizer; drop --clip, --clip-path "
                         "and --tokenizer-path")
    model, data = mc["model"], mc["data"]
    conflicts = []
    for name in pretrained.ARCH_FIELDS:
        want = data["image_size"] if name == "image_size" else model.get(name)
        if name in given and given[name] is not None and given[name] != want:
            conflicts.append(f"--{name.replace('_', '-')} {given[name]!r} (the model has {want!r})")
        if hasattr(cfg, name) and name != "vocab_size":
            setattr(cfg, name, want)
    if conflicts:
        raise ValueError(f"--init-model {d}: the model's architecture is fixed, but {'; '.join(conflicts)}")
    for name in ("max_words", "max_frames", "video_framerate", "frame_sampling"):
        if given.get(name) is None:
            setattr(cfg, name, data[name])
    cfg.init_model = str(d)
    return cfg


def model_for_run(cfg):
    """The model of a run that starts from ``cfg.init_model``: the folder's architecture and
    weights, every other model field (losses, backend, gradients) from ``cfg``."""
    import dataclasses

    from nbretr import pretrained
    from nbretr.config import RECIPE_FIELDS
    from nbretr.models import NeighborRetrConfig
    d = Path(cfg.init_model)
    mc = pretrained.read_config(d)
    runtime = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(NeighborRetrConfig)
               if f.name not in pretrained.ARCH_FIELDS and f.name != "clip_path" and hasattr(cfg, f.name)}
    defaults = NeighborRetrConfig()
    for name, v in list(runtime.items()):
        if v is None and name in RECIPE_FIELDS:
            runtime[name] = getattr(defaults, name)
    model = pretrained.build_model(mc["model"], mc.get("clip_config"), **runtime)
    pretrained._load_weights(model, d / pretrained.WEIGHTS)
    log.info("model initialised from %s (%s)", d, mc.get("source", ""))
    return model
