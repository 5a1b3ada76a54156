"""Video decoding, frame sampling and CLIP preprocessing.

Sampling follows the reference's raw-video extractor: candidate frames are taken at
``framerate`` frames per second over ``[start, end)`` (the whole clip by default); when
there are more than ``max_frames`` candidates, ``max_frames`` of them are picked uniformly
(``linspace`` over the candidates, as the reference's ``slice_framepos=2``). Only the
sampled frames are decoded (decord ``get_batch`` on their indices), so a worker never holds
more than one clip's sampled frames.

Backends: decord (preferred) and PyAV (used when decord is not installed, or for a file
decord cannot open). The choice is made automatically and logged once per process.
Every decoding failure surfaces as :class:`VideoDecodeError` with the file and a short
reason, never as a raw decoder trace.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger("nbretr.data")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".3gp", ".flv")
_SCALE = 1.0 / (255.0 * torch.tensor(CLIP_STD).view(1, 3, 1, 1))
_BIAS = -torch.tensor(CLIP_MEAN).view(1, 3, 1, 1) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class VideoDecodeError(RuntimeError):
    """A video (or image) that cannot be used: ``path`` and a short ``reason``
    ("missing", "empty", "undecodable", "no frames")."""

    def __init__(self, path: str | os.PathLike, reason: str, detail: str = ""):
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        msg = f"{reason} video file {self.path}"
        if detail:
            msg += f": {detail}"
        super().__init__(msg)


_reported: set[str] = set()


def _report_once(key: str, msg: str, *args, level: int = logging.INFO) -> None:
    if key not in _reported:
        _reported.add(key)
        log.log(level, msg, *args)


def _have_decord() -> bool:
    try:
        import decord  # noqa: F401
    except ImportError:
        return False
    return True


def _have_av() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


def available_backends() -> list[str]:
    """The installed decoding backends, preferred first."""
    return [b for b, ok in (("decord", _have_decord()), ("pyav", _have_av())) if ok]


def sample_indices(num_frames: int, fps: float, max_frames: int, framerate: float = 1.0,
                   start: float | None = None, end: float | None = None) -> np.ndarray:
    """Frame indices (int64, sorted, at most ``max_frames``) to decode from a clip of
    ``num_frames`` frames at ``fps``.

    Candidates are the frames at times ``start + k / framerate`` for ``k = 0, 1, ...``
    inside ``[start, end)`` (the whole clip by default; ``framerate <= 0`` means every
    frame); if there are more than ``max_frames`` candidates, ``max_frames`` are chosen
    uniformly among them. A clip shorter than ``1 / framerate`` still yields its first frame.
    """
    if num_frames <= 0:
        return np.zeros(0, dtype=np.int64)
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    fps = float(fps) if fps and fps > 0 and math.isfinite(fps) else 25.0
    duration = num_frames / fps
    t0 = 0.0 if start is None else max(0.0, float(start))
    t1 = duration if end is None else min(duration, float(end))
    if t0 >= duration:  # start past the end (bad timestamps): fall back to the last second
        t0 = max(0.0, duration - 1.0)
    if t1 <= t0:
        t1 = min(duration, t0 + 1.0 / fps)
    if framerate and framerate > 0:
        times = np.arange(t0, t1, 1.0 / framerate)
        cand = np.unique(np.clip(np.floor(times * fps + 1e-6).astype(np.int64), 0, num_frames - 1))
    else:
        cand = np.arange(int(math.floor(t0 * fps)), max(int(math.ceil(t1 * fps)), int(t0 * fps) + 1),
                         dtype=np.int64).clip(0, num_frames - 1)
        cand = np.unique(cand)
    if len(cand) > max_frames:
        cand = cand[np.linspace(0, len(cand) - 1, num=max_frames).astype(np.int64)]
    return cand.astype(np.int64)


def _decode_decord(path: str, max_frames: int, framerate: float, start, end) -> np.ndarray:
    import decord
    try:
        vr = decord.VideoReader(path, num_threads=1)
        n = len(vr)
        fps = vr.get_avg_fps()
    except Exception as err:  # decord raises DECORDError/RuntimeError with the ffmpeg message
        raise VideoDecodeError(path, "undecodable", f"decord: {str(err).splitlines()[0][:200]}") from None
    idx = sample_indices(n, fps, max_frames, framerate, start, end)
    if len(idx) == 0:
        raise VideoDecodeError(path, "no frames", "the container holds no video frames")
    try:
        frames = vr.get_batch(idx.tolist()).asnumpy()
    except Exception as err:
        raise VideoDecodeError(path, "undecodable", f"decord: {str(err).splitlines()[0][:200]}") from None
    finally:
        del vr
    return frames


def _decode_pyav(path: str, max_frames: int, framerate: float, start, end) -> np.ndarray:
    import av
    try:
        container = av.open(path)
    except Exception as err:
        raise VideoDecodeError(path, "undecodable", f"pyav: {str(err)[:200]}") from None
    try:
        if not container.streams.video:
            raise VideoDecodeError(path, "no frames", "no video stream")
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 25.0)
        n = int(stream.frames or 0)
        if n <= 0:
            dur = None
            if stream.duration is not None and stream.time_base is not None:
                dur = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                dur = container.duration / 1e6
            n = int(round(dur * fps)) if dur else 0
        if n <= 0:  # unknown length: count by decoding (the fallback path, rare)
            n = sum(1 for _ in container.decode(stream))
            container.seek(0)
        idx = sample_indices(n, fps, max_frames, framerate, start, end)
        wanted = {int(i): k for k, i in enumerate(idx)}
        out: list[np.ndarray | None] = [None] * len(idx)
        last = int(idx[-1]) if len(idx) else -1
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                out[wanted[i]] = frame.to_ndarray(format="rgb24")
            if i >= last:
                break
    except VideoDecodeError:
        raise
    except Exception as err:
        raise VideoDecodeError(path, "undecodable", f"pyav: {str(err)[:200]}") from None
    finally:
        container.close()
    frames = [f for f in out if f is not None]
    if not frames:
        raise VideoDecodeError(path, "no frames", "no frame could be decoded")
    return np.stack(frames)


def _load_image(path: str) -> np.ndarray:
    from PIL import Image
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))[None]
    except Exception as err:
        raise VideoDecodeError(path, "undecodable", f"PIL: {str(err)[:200]}") from None


def decode_frames(path: str | os.PathLike, max_frames: int = 12, framerate: float = 1.0,
                  start: float | None = None, end: float | None = None,
                  backend: str = "auto") -> np.ndarray:
    """Decode the sampled frames of one video (or one image, as a one-frame video).

    Returns uint8 ``[n, H, W, 3]`` RGB with ``1 <= n <= max_frames``. Raises
    :class:`VideoDecodeError` for a missing, empty, truncated or undecodable file.
    ``backend``: "auto" (decord, then PyAV for files decord cannot open), "decord", "pyav".
    """
    path = str(path)
    if not os.path.exists(path):
        raise VideoDecodeError(path, "missing", "no such file")
    if os.path.getsize(path) == 0:
        raise VideoDecodeError(path, "empty", "the file has 0 bytes")
    if path.lower().endswith(IMAGE_EXTENSIONS):
        return _load_image(path)
    if backend not in ("auto", "decord", "pyav"):
        raise ValueError(f"backend must be 'auto', 'decord' or 'pyav', got {backend!r}")
    if backend == "decord" or (backend == "auto" and _have_decord()):
        if backend == "auto":
            # the usual case: debug level (every DataLoader worker is a new process)
            _report_once("decord", "nbretr.data: decoding videos with decord", level=logging.DEBUG)
        try:
            return _decode_decord(path, max_frames, framerate, start, end)
        except VideoDecodeError as err:
            if backend == "decord" or not _have_av():
                raise
            _report_once("fallback", "nbretr.data: decord could not open %s (%s); trying PyAV for "
                         "such files", path, err.detail)
            try:
                return _decode_pyav(path, max_frames, framerate, start, end)
            except VideoDecodeError as err2:
                raise VideoDecodeError(path, err2.reason, f"{err.detail}; {err2.detail}") from None
    if not _have_av():
        raise RuntimeError("no video decoding backend: install decord or av (pip install 'nbretr[data]')")
    if backend == "auto":
        _report_once("pyav", "nbretr.data: decord is not installed; decoding videos with PyAV")
    return _decode_pyav(path, max_frames, framerate, start, end)


@dataclass
class Preprocess:
    """CLIP preprocessing of uint8 frames ``[n, H, W, 3]`` to float32 ``[n, 3, S, S]``:
    resize the shorter side to ``image_size`` (bicubic, antialiased, on uint8 like CLIP's
    PIL resize: within 2 grey levels of PIL), centre crop, scale to [0, 1], normalise with
    CLIP's mean/std. With ``augment=True`` (training only, off by default): random resized
    crop (area scale ``augment_scale``, aspect 3/4..4/3) and horizontal flip with probability
    ``flip_p``, the same for every frame of a clip. Flipping swaps left and right, which
    changes the meaning of the embedded dataset's captions: it uses ``flip_p=0`` there.
    """

    image_size: int = 224
    augment: bool = False
    augment_scale: tuple[float, float] = (0.5, 1.0)
    flip_p: float = 0.5

    def __call__(self, frames: np.ndarray, generator: torch.Generator | None = None) -> torch.Tensor:
        # uint8 NCHW in channels-last memory: torch's fast antialiased uint8 resize path
        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
        s = self.image_size
        if self.augment:
            x = self._random_resized_crop(x, generator)
            if self.flip_p > 0 and torch.rand((), generator=generator).item() < self.flip_p:
                x = x.flip(-1)
        else:
            h, w = x.shape[-2:]
            if min(h, w) != s:
                scale = s / min(h, w)
                x = _resize(x, (max(s, round(h * scale)), max(s, round(w * scale))))
            h, w = x.shape[-2:]
            top, left = (h - s) // 2, (w - s) // 2
            x = x[:, :, top:top + s, left:left + s]
        # (x/255 - mean)/std as one conversion and two in-place passes on contiguous data
        out = torch.empty(x.shape, dtype=torch.float32)
        out.copy_(x.contiguous())
        return out.mul_(_SCALE).add_(_BIAS)

    def _random_resized_crop(self, x: torch.Tensor, generator) -> torch.Tensor:
        h, w = x.shape[-2:]
        area = h * w
        for _ in range(10):
            a = area * float(torch.empty(()).uniform_(*self.augment_scale, generator=generator))
            logr = float(torch.empty(()).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator))
            r = math.exp(logr)
            cw, ch = int(round(math.sqrt(a * r))), int(round(math.sqrt(a / r)))
            if 0 < cw <= w and 0 < ch <= h:
                top = int(torch.randint(0, h - ch + 1, (), generator=generator))
                left = int(torch.randint(0, w - cw + 1, (), generator=generator))
                break
        else:
            ch = cw = min(h, w)
            top, left = (h - ch) // 2, (w - cw) // 2
        return _resize(x[:, :, top:top + ch, left:left + cw], (self.image_size, self.image_size))


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic antialiased resize of uint8 ``[n, 3, h, w]`` (result uint8, saturated)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    x = x.contiguous(memory_format=torch.channels_last)
    return F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)


def pad_frames(frames: torch.Tensor, max_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad ``[n, 3, S, S]`` to ``[max_frames, 3, S, S]`` with zeros; returns
    ``(video, video_mask)`` with mask int64 ``[max_frames]`` (1 = a real frame)."""
    n = min(frames.shape[0], max_frames)
    mask = torch.zeros(max_frames, dtype=torch.long)
    mask[:n] = 1
    if n == max_frames:
        return frames[:n], mask
    video = frames.new_zeros((max_frames,) + tuple(frames.shape[1:]))
    video[:n] = frames[:n]
    return video, mask


def find_video(folder: str | os.PathLike, video_id: str, index: dict[str, Path] | None = None) -> Path | None:
    """The file for ``video_id`` in ``folder`` (any known video extension; ``index`` from
    :func:`index_folder` avoids one stat per extension)."""
    stem = strip_video_ext(video_id)
    if index is not None:
        return index.get(stem)
    for ext in VIDEO_EXTENSIONS:
        p = Path(folder) / f"{stem}{ext}"
        if p.exists():
            return p
    return None


def strip_video_ext(name: str) -> str:
    low = name.lower()
    for ext in VIDEO_EXTENSIONS:
        if low.endswith(ext):
            return name[: -len(ext)]
    return name


def index_folder(folder: str | os.PathLike) -> dict[str, Path]:
    """Map file stem -> path for every video file directly inside ``folder`` (one scandir)."""
    out: dict[str, Path] = {}
    try:
        with os.scandir(folder) as it:
            for e in it:
                if e.name.lower().endswith(VIDEO_EXTENSIONS):
                    stem = strip_video_ext(e.name)
                    if stem not in out or e.name.lower().endswith(".mp4"):
                        out[stem] = Path(e.path)
    except FileNotFoundError:
        pass
    return out
