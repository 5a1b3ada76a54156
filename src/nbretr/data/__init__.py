"""Video-text data: decoding (decord, PyAV fallback), the standard dataset layouts, the
embedded synthetic dataset, tokenisers, and ``build_dataset`` / ``collate``.

>>> from nbretr.data import build_dataset, collate
>>> from nbretr.data.synthetic import word_tokenizer
>>> ds = build_dataset("synthetic", "data/synthetic", "train", word_tokenizer(), image_size=32)
"""
from __future__ import annotations

import os

import torch
from torch.utils.data import Dataset

from nbretr.data.activitynet import ActivityNet
from nbretr.data._layout import AnnotationError, MissingVideosError
from nbretr.data.base import VideoRecord, VideoTextDataset, log_bad_summary
from nbretr.data.decoding import Preprocess, VideoDecodeError, decode_frames, sample_indices
from nbretr.data.didemo import DiDeMo
from nbretr.data.images import COCO, Flickr30K
from nbretr.data.msrvtt import MSRVTT
from nbretr.data.msvd import MSVD

# nbretr.data.synthetic is imported on use (it is also a script: `python -m` must find it
# not yet imported)
DATASETS: dict[str, type[VideoTextDataset] | None] = {
    "synthetic": None, "msrvtt": MSRVTT, "msvd": MSVD, "didemo": DiDeMo,
    "activitynet": ActivityNet, "coco": COCO, "flickr30k": Flickr30K,
}


def __getattr__(name: str):
    if name == "SyntheticDataset":
        from nbretr.data.synthetic import SyntheticDataset
        return SyntheticDataset
    raise AttributeError(f"module 'nbretr.data' has no attribute {name!r}")


def loader_context(dataset, num_workers: int):
    """The DataLoader ``multiprocessing_context`` for ``dataset``: "spawn" when its videos are
    decoded on CUDA by worker processes (a forked child cannot use CUDA), else None (the
    default)."""
    base = dataset
    while hasattr(base, "dataset") and not hasattr(base, "decode_device"):
        base = base.dataset  # Subset, views
    dev = str(getattr(base, "decode_device", "cpu"))
    return "spawn" if num_workers > 0 and dev.startswith("cuda") else None


def build_dataset(name: str, root: str | os.PathLike | None, split: str, tokenizer, *, max_words: int = 24,
                  max_frames: int = 12, video_framerate: float = 1.0, image_size: int = 224, strict: bool = False,
                  **kw) -> Dataset:
    """The ``split`` ("train"|"val"|"test") of dataset ``name`` (one of :data:`DATASETS`)
    read from ``root``. Items are dicts (see :class:`VideoTextDataset`). Extra options:
    ``augment`` (random resized crop + flip, off by default), ``flip_p``, ``backend``
    ("auto"|"torchcodec"|"decord"|"pyav"), ``decode_device`` ("cpu"|"cuda"; torchcodec),
    ``video_dir`` (the video folder, absolute or under root; searched recursively); missing videos: ``allow_missing``, ``max_missing`` (0.01),
    ``keep_missing`` (default: test/val keep, train drops), ``missing_list`` (file for their
    ids); ``repeated_ids`` ("once"|"repeat"); per layout: msrvtt ``train_list`` ("9k"|"7k"),
    didemo ``didemo_window`` ((0, 31) | None), coco ``test_size`` ("5k"|"1k"), coco/flickr30k
    ``image_root``, ``annotation``; synthetic ``size``, ``seed`` (root None:
    ``data/synthetic/<size>`` or ``$NBRETR_DATA/synthetic/<size>``; the tokenizer may be None
    for its word tokenizer). See docs/data.md."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    if root is None and key != "synthetic":
        raise ValueError(f"{name}: root (the dataset folder) is required")
    cls = DATASETS[key] or __getattr__("SyntheticDataset")
    return cls(root, split, tokenizer, max_words=max_words, max_frames=max_frames,
                         video_framerate=video_framerate, image_size=image_size, strict=strict, **kw)


def collate(batch: list[dict]) -> dict:
    """Stack a list of items: tensors stacked, ints -> LongTensor, bools -> BoolTensor,
    floats -> float32 tensor, anything else kept as a list."""
    if not batch:
        raise ValueError("collate: empty batch")
    out = {}
    for k in batch[0]:
        vals = [b[k] for b in batch]
        v0 = vals[0]
        if torch.is_tensor(v0):
            out[k] = torch.stack(vals)
        elif isinstance(v0, bool):
            out[k] = torch.tensor(vals, dtype=torch.bool)
        elif isinstance(v0, int):
            out[k] = torch.tensor(vals, dtype=torch.long)
        elif isinstance(v0, float):
            out[k] = torch.tensor(vals, dtype=torch.float32)
        else:
            out[k] = vals
    return out


__all__ = ["build_dataset", "collate", "DATASETS", "VideoTextDataset", "VideoRecord", "AnnotationError",
           "MissingVideosError",
           "VideoDecodeError", "decode_frames", "loader_context", "sample_indices", "Preprocess", "log_bad_summary",
           "SyntheticDataset", "MSRVTT", "MSVD", "DiDeMo", "ActivityNet", "COCO", "Flickr30K"]
