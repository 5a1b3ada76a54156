"""The dataset base class shared by every layout: annotation checking, pre-tokenised
captions, video loading with bad-file handling, and the bad-video summary.

A subclass implements :meth:`VideoTextDataset._read` and returns the split's videos (id,
path, optional start/end seconds) and captions (text, video position). Everything else —
items, views, bad-file accounting — lives here once.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import Dataset

from nbretr.data.decoding import Preprocess, VideoDecodeError, decode_frames, pad_frames

log = logging.getLogger("nbretr.data")

BAD_REASONS = ("missing", "empty", "undecodable", "no frames")


class AnnotationError(ValueError):
    """A malformed annotation, or one naming a video that is not there (strict mode)."""


@dataclass
class VideoRecord:
    video_id: str
    path: Path
    start: float | None = None
    end: float | None = None


class VideoTextDataset(Dataset):
    """Caption-indexed video-text dataset (one item per caption; for multi-caption test sets
    every caption is a query and ``caption_to_video`` maps it to its video).

    Items: ``text_ids``/``text_mask`` LongTensor ``[max_words]``, ``video`` float32
    ``[max_frames, 3, image_size, image_size]`` (CLIP-normalised), ``video_mask`` LongTensor
    ``[max_frames]``, ``index`` (caption index), ``video_index``, ``bad`` (True for a video
    that could not be decoded: then ``video`` is zeros and ``video_mask`` all zero).

    A bad video logs one warning naming the file (per process) and is counted in shared
    memory, so :meth:`bad_summary` sees what the DataLoader workers met. ``strict=True``
    raises :class:`~nbretr.data.decoding.VideoDecodeError` instead. Annotation problems
    (malformed lines, videos that are not there) are logged with file and line at
    construction and the entries dropped (strict: :class:`AnnotationError`).
    """

    name = "base"

    def __init__(self, root: str | os.PathLike, split: str, tokenizer, *, max_words: int = 24,
                 max_frames: int = 12, video_framerate: float = 1.0, image_size: int = 224,
                 strict: bool = False, augment: bool = False, flip_p: float = 0.5,
                 backend: str = "auto", **kw):
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        self.root = Path(root)
        self.split = split
        self.tokenizer = tokenizer
        self.max_words = int(max_words)
        self.max_frames = int(max_frames)
        self.video_framerate = float(video_framerate)
        self.image_size = int(image_size)
        self.strict = bool(strict)
        self.backend = backend
        self.preprocess = Preprocess(image_size=self.image_size, augment=augment, flip_p=flip_p)
        self.annotation_problems: list[str] = []
        self._options = kw
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.name}: dataset folder {self.root} does not exist")
        videos, pairs = self._read()
        self._set(videos, pairs)

    # ---- subclass API ---------------------------------------------------------------
    def _read(self) -> tuple[list[VideoRecord], list[tuple[str, int]]]:
        raise NotImplementedError

    def _problem(self, file: str | os.PathLike, line: int | str | None, msg: str) -> None:
        where = f"{file}" + (f" line {line}" if isinstance(line, int) else (f" entry {line}" if line else ""))
        text = f"{self.name} {self.split}: {where}: {msg}"
        if self.strict:
            raise AnnotationError(text)
        self.annotation_problems.append(text)
        log.warning("%s", text)

    # ---- construction ---------------------------------------------------------------
    def _set(self, videos: Sequence[VideoRecord], pairs: Sequence[tuple[str, int]]) -> None:
        if self.annotation_problems:
            log.warning("%s %s: %d annotation problem(s); those entries were dropped", self.name, self.split,
                        len(self.annotation_problems))
        self.videos = list(videos)
        self.video_ids = [v.video_id for v in self.videos]
        self.captions = [c for c, _ in pairs]
        self.caption_to_video = torch.tensor([v for _, v in pairs], dtype=torch.long)
        ids, mask = [], []
        for s in range(0, len(self.captions), 4096):
            i, m = self.tokenizer(self.captions[s:s + 4096], self.max_words)
            ids.append(i.to(torch.int32))
            mask.append(m.to(torch.int8))
        self._ids = torch.cat(ids) if ids else torch.zeros(0, self.max_words, dtype=torch.int32)
        self._mask = torch.cat(mask) if mask else torch.zeros(0, self.max_words, dtype=torch.int8)
        n = max(len(self.videos), 1)
        # shared with DataLoader workers (fork or spawn); no lock (a lock made in one start
        # method cannot travel to the other): concurrent hits on one video may undercount
        self._bad_code = mp.RawArray("b", n)  # reason code + 1 per video, 0 = not seen bad
        self._bad_hits = mp.RawArray("i", n)
        self._warned: set[int] = set()
        log.info("%s %s: %d videos, %d captions", self.name, self.split, len(self.videos), len(self.captions))

    @property
    def num_videos(self) -> int:
        return len(self.videos)

    def __len__(self) -> int:
        return len(self.captions)

    # ---- items ----------------------------------------------------------------------
    def text(self, index: int) -> dict:
        return {"text_ids": self._ids[index].long(), "text_mask": self._mask[index].long(), "index": int(index),
                "video_index": int(self.caption_to_video[index])}

    def load_video(self, video_index: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """``(video [max_frames,3,S,S] float32, video_mask [max_frames] int64, bad)``."""
        rec = self.videos[video_index]
        try:
            frames = decode_frames(rec.path, self.max_frames, self.video_framerate, rec.start, rec.end,
                                   backend=self.backend)
        except VideoDecodeError as err:
            if self.strict:
                raise VideoDecodeError(err.path, err.reason,
                                       f"{err.detail} ({self.name} {self.split}, video {rec.video_id}; "
                                       "strict=True)") from None
            self._record_bad(video_index, err)
            s = self.image_size
            return torch.zeros(self.max_frames, 3, s, s), torch.zeros(self.max_frames, dtype=torch.long), True
        video, mask = pad_frames(self.preprocess(frames), self.max_frames)
        return video, mask, False

    def __getitem__(self, index: int) -> dict:
        if index < 0:
            index += len(self)
        item = self.text(index)
        video, mask, bad = self.load_video(item["video_index"])
        item.update(video=video, video_mask=mask, bad=bad)
        return item

    def text_view(self) -> "TextView":
        """A dataset over the captions with text fields only (no decoding), for evaluation."""
        return TextView(self)

    def video_view(self) -> "VideoView":
        """A dataset over the split's videos (index = video index), each decoded once, for
        evaluation of multi-caption sets; items carry ``video``, ``video_mask``,
        ``video_index``, ``bad``."""
        return VideoView(self)

    # ---- bad videos -----------------------------------------------------------------
    def _record_bad(self, video_index: int, err: VideoDecodeError) -> None:
        code = BAD_REASONS.index(err.reason) + 1 if err.reason in BAD_REASONS else len(BAD_REASONS)
        self._bad_hits[video_index] += 1
        self._bad_code[video_index] = code
        if video_index not in self._warned:
            self._warned.add(video_index)
            log.warning("nbretr.data: skipping bad video %s (%s%s)", err.path, err.reason,
                        f": {err.detail}" if err.detail else "")

    def bad_summary(self) -> dict:
        """Counts of bad videos met since construction or :meth:`reset_bad_summary`, in this
        process and its DataLoader workers: ``bad_videos`` (distinct files), ``bad_items``
        (items returned bad), ``by_reason`` {reason: files}, ``files`` (paths)."""
        codes = list(self._bad_code[: len(self.videos)])
        hits = list(self._bad_hits[: len(self.videos)])
        by_reason: dict[str, int] = {}
        files = []
        for i, c in enumerate(codes):
            if c:
                r = BAD_REASONS[c - 1]
                by_reason[r] = by_reason.get(r, 0) + 1
                files.append(str(self.videos[i].path))
        return {"bad_videos": len(files), "bad_items": int(sum(hits)), "by_reason": by_reason, "files": files,
                "annotation_problems": len(self.annotation_problems)}

    def reset_bad_summary(self) -> None:
        for i in range(len(self._bad_hits)):
            self._bad_hits[i] = 0
            self._bad_code[i] = 0
        self._warned.clear()


def log_bad_summary(dataset: VideoTextDataset, logger: logging.Logger | None = None, epoch: int | None = None,
                    reset: bool = False) -> dict:
    """Log ``dataset.bad_summary()`` (a warning when anything was bad, else info) and return
    it; ``reset=True`` starts a new count (call at the end of each epoch)."""
    logger = logger or log
    s = dataset.bad_summary()
    tag = f"{dataset.name} {dataset.split}" + (f" epoch {epoch}" if epoch is not None else "")
    if s["bad_videos"]:
        shown = ", ".join(s["files"][:5]) + (" ..." if len(s["files"]) > 5 else "")
        logger.warning("%s: %d bad video(s), %d item(s) skipped, by reason %s: %s", tag, s["bad_videos"],
                       s["bad_items"], s["by_reason"], shown)
    else:
        logger.info("%s: no bad videos", tag)
    if reset:
        dataset.reset_bad_summary()
    return s


class TextView(Dataset):
    def __init__(self, ds: VideoTextDataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        return self.ds.text(i)


class VideoView(Dataset):
    def __init__(self, ds: VideoTextDataset):
        self.ds = ds

    def __len__(self) -> int:
        return self.ds.num_videos

    def __getitem__(self, i: int) -> dict:
        video, mask, bad = self.ds.load_video(i)
        return {"video": video, "video_mask": mask, "video_index": int(i), "bad": bad}
