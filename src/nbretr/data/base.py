"""The dataset base class shared by every layout: annotation checking, pre-tokenised
captions, the video-folder index and missing videos, video loading with bad-file handling,
and the bad-video summary.

A subclass implements :meth:`VideoTextDataset._read` and returns the split's videos (id,
path, optional start/end seconds, whether the file was found) and captions (text, video
position). Everything else — items, views, missing and bad-file accounting — lives here once.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from nbretr.data._layout import AnnotationError, MissingVideosError, VideoIndex, video_dir
from nbretr.data.decoding import SAMPLING_RULES, Preprocess, VideoDecodeError, decode_frames, pad_frames

log = logging.getLogger("nbretr.data")

BAD_REASONS = ("missing", "empty", "undecodable", "no frames")


@dataclass
class VideoRecord:
    """One video of a split: its id as the annotation writes it, its file (for a video not
    found, the path it was expected at), the sampled window in seconds (None: the whole
    clip), and ``missing`` when no file was found for it."""
    video_id: str
    path: Path
    start: float | None = None
    end: float | None = None
    missing: bool = False


class VideoTextDataset(Dataset):
    """Caption-indexed video-text dataset (one item per caption; for multi-caption test sets
    every caption is a query and ``caption_to_video`` maps it to its video).

    Items: ``text_ids``/``text_mask`` LongTensor ``[max_words]``, ``video`` float32
    ``[max_frames, 3, image_size, image_size]`` (CLIP-normalised), ``video_mask`` LongTensor
    ``[max_frames]``, ``index`` (caption index), ``video_index``, ``bad`` (True for a video
    that is missing or could not be decoded: then ``video`` is zeros and ``video_mask`` all
    zero, the reference's black frames).

    Videos are looked up in an index of the video folder built once at construction
    (recursive; any extension; see :class:`~nbretr.data._layout.VideoIndex`). A video not
    found is *missing*: ``missing_videos`` lists their ids. By default the test and val
    splits keep its items (the test set stays whole; they come back ``bad`` — the released
    MSR-VTT loader feeds black frames) and the train split drops them (``keep_missing``
    overrides). None found, or more than ``max_missing`` (1%) of the split's videos missing,
    is a :class:`MissingVideosError` naming the folder, the expected file names and three
    ids, unless ``allow_missing=True``; fewer give one warning line and the full list in the
    file ``missing_list`` (default: ``<tmp>/nbretr-missing-<dataset>-<split>.txt``).

    A bad video logs one warning naming the file (once, whichever process meets it first) and
    is counted in shared memory, so :meth:`bad_summary` sees what the DataLoader workers met. ``strict=True``
    raises :class:`~nbretr.data.decoding.VideoDecodeError` instead, and a missing video or
    a malformed annotation entry is an :class:`AnnotationError` at construction. A malformed
    annotation *file* is always one :class:`AnnotationError` naming it; malformed entries in
    a sound file are dropped with one summary warning (``annotation_problems`` lists them).
    """

    name = "base"

    def __init__(self, root: str | os.PathLike, split: str, tokenizer, *, max_words: int = 24,
                 max_frames: int = 12, video_framerate: float = 1.0, image_size: int = 224,
                 strict: bool = False, augment: bool = False, flip_p: float = 0.5,
                 backend: str = "auto", allow_missing: bool = False, max_missing: float = 0.01,
                 keep_missing: bool | None = None, missing_list: str | os.PathLike | None = None,
                 frame_sampling: str = "uniform", decode_device: str = "cpu",
                 clip_augment: Callable[[np.ndarray], np.ndarray] | None = None, **kw):
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
        if backend != "auto" or str(decode_device) != "cpu":  # a decoder asked for that cannot work: say so now
            from nbretr.data.decoding import resolve_decoder
            resolve_decoder(backend, decode_device)
        self.backend = backend
        self.decode_device = str(decode_device)
        if frame_sampling not in SAMPLING_RULES:
            raise ValueError(f"frame_sampling must be one of {SAMPLING_RULES}, got {frame_sampling!r}")
        self.frame_sampling = frame_sampling
        # a clip-level augmentation of the decoded uint8 frames [n, H, W, 3], applied before
        # resizing (where the released code applies its RandAugment); None: none
        self.clip_augment = clip_augment
        self.preprocess = Preprocess(image_size=self.image_size, augment=augment, flip_p=flip_p)
        self.allow_missing = bool(allow_missing)
        self.max_missing = float(max_missing)
        self.keep_missing = (split != "train") if keep_missing is None else bool(keep_missing)
        self.missing_list: Path | None = Path(missing_list) if missing_list is not None else None
        self.annotation_problems: list[str] = []
        self.repeated_ids: list[str] = []
        self.missing_videos: list[str] = []
        self.video_folder: Path | None = None
        self.video_pattern = "<id>.<ext>"
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
        log.debug("%s", text)

    def _video_index(self, candidates: tuple[str, ...], pattern: str) -> VideoIndex:
        """Index the video folder (option ``video_dir``, else the first of ``candidates``
        under root that holds files, else root) once; ``pattern`` describes the expected file
        names for messages."""
        self.video_folder = video_dir(self, candidates)
        self.video_pattern = pattern
        index = VideoIndex(self.video_folder)
        log.debug("%s %s: %d candidate video files under %s", self.name, self.split, len(index), self.video_folder)
        return index

    def _video(self, index: VideoIndex, vid: str, prefixes: tuple[str, ...] = ("",), **kw) -> VideoRecord:
        """The record of video ``vid`` (found in ``index``, or marked missing)."""
        path = index.find(vid, prefixes)
        if path is None:
            return VideoRecord(vid, (self.video_folder or self.root) / f"{vid}", missing=True, **kw)
        return VideoRecord(vid, path, **kw)

    # ---- construction ---------------------------------------------------------------
    def _set(self, videos: Sequence[VideoRecord], pairs: Sequence[tuple[str, int]]) -> None:
        videos, pairs = list(videos), list(pairs)
        tag = f"{self.name} {self.split}"
        if self.annotation_problems:
            shown = "; ".join(p.split(": ", 1)[1] for p in self.annotation_problems[:3])
            more = len(self.annotation_problems) - 3
            log.warning("%s: %d annotation problem(s), those entries were dropped: %s%s", tag,
                        len(self.annotation_problems), shown, f" (+{more} more in dataset.annotation_problems)"
                        if more > 0 else "")
        if self.repeated_ids:
            log.info("%s: %d repeated id(s) in the list added once (as the reference), e.g. %s", tag,
                     len(self.repeated_ids), ", ".join(self.repeated_ids[:3]))
        if not pairs:
            why = (f"{len(self.annotation_problems)} annotation problem(s), e.g. " +
                   "; ".join(self.annotation_problems[:3])) if self.annotation_problems else \
                "the annotation files name no video of this split"
            raise AnnotationError(f"{tag}: no (caption, video) pairs: {why}")
        self._check_missing(videos)
        if self.missing_videos and not self.keep_missing:
            videos, pairs = _drop_missing(videos, pairs)
        self.videos = videos
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
        # warned-about flags, also shared: a video met bad by several DataLoader workers
        # (or by new workers each epoch) is warned about once, not once per process
        self._warned_shared = mp.RawArray("b", n)
        log.info("%s: %d videos, %d captions", tag, len(self.videos), len(self.captions))

    def _check_missing(self, videos: list[VideoRecord]) -> None:
        missing = [v.video_id for v in videos if v.missing]
        self.missing_videos = missing
        if not missing:
            return
        tag = f"{self.name} {self.split}"
        where = (f"under {self.video_folder} (searched recursively for {self.video_pattern}, any video "
                 f"extension)")
        examples = ", ".join(missing[:3])
        share = len(missing) / len(videos)
        if self.strict or len(missing) == len(videos) or (share > self.max_missing and not self.allow_missing):
            if len(missing) == len(videos):
                head = f"none of the {len(videos)} videos found {where}"
            else:
                head = f"{len(missing)} of {len(videos)} videos ({share:.1%}) not found {where}"
            hint = "" if len(missing) == len(videos) or self.strict else (
                f"; or accept them with allow_missing=True (--allow-missing): "
                + ("kept as black frames, as the reference does" if self.keep_missing else "dropped")
                + f" (more than {self.max_missing:.0%} missing is refused by default)")
            raise MissingVideosError(f"{tag}: {head}; ids not found include {examples}. Point video_dir "
                                     f"(--video-dir) at the folder holding them{hint}")
        listed = self._write_missing_list(missing)
        what = ("kept as black frames (bad=True) so that the split stays whole" if self.keep_missing
                else "their captions dropped")
        log.warning("%s: %d of %d videos (%.2f%%) not found %s, e.g. %s; %s; the ids are listed in %s", tag,
                    len(missing), len(videos), 100 * share, where, examples, what, listed or "dataset.missing_videos")

    def _write_missing_list(self, missing: list[str]) -> Path | None:
        path = self.missing_list or Path(tempfile.gettempdir()) / f"nbretr-missing-{self.name}-{self.split}.txt"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text("".join(f"{v}\n" for v in missing))
            os.replace(tmp, path)
        except OSError as err:
            log.warning("%s %s: could not write the missing-video list to %s (%s)", self.name, self.split, path, err)
            return None
        return path

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
        if rec.missing:  # reported once at construction; black frames, as the reference
            self._bad_hits[video_index] += 1
            self._bad_code[video_index] = BAD_REASONS.index("missing") + 1
            s = self.image_size
            return torch.zeros(self.max_frames, 3, s, s), torch.zeros(self.max_frames, dtype=torch.long), True
        try:
            frames = decode_frames(rec.path, self.max_frames, self.video_framerate, rec.start, rec.end,
                                   backend=self.backend, sampling=self.frame_sampling,
                                   device=self.decode_device)
        except VideoDecodeError as err:
            if self.strict:
                raise VideoDecodeError(err.path, err.reason,
                                       f"{err.detail} ({self.name} {self.split}, video {rec.video_id}; "
                                       "strict=True)") from None
            self._record_bad(video_index, err)
            s = self.image_size
            return torch.zeros(self.max_frames, 3, s, s), torch.zeros(self.max_frames, dtype=torch.long), True
        if self.clip_augment is not None:
            frames = self.clip_augment(frames)
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
        first = not self._warned_shared[video_index]
        self._warned_shared[video_index] = 1
        if first:
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
                "annotation_problems": len(self.annotation_problems), "missing_videos": len(self.missing_videos)}

    def reset_bad_summary(self) -> None:
        for i in range(len(self._bad_hits)):
            self._bad_hits[i] = 0
            self._bad_code[i] = 0


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


def _drop_missing(videos: list[VideoRecord], pairs: list[tuple[str, int]]
                  ) -> tuple[list[VideoRecord], list[tuple[str, int]]]:
    new_index, kept = {}, []
    for i, v in enumerate(videos):
        if not v.missing:
            new_index[i] = len(kept)
            kept.append(v)
    return kept, [(c, new_index[v]) for c, v in pairs if v in new_index]
