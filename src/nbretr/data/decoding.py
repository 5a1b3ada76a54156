"""Video decoding, frame sampling and CLIP preprocessing.

Two sampling rules (``sampling=``):

- ``"first"``, the released NeighborRetr code's: the frames at ``framerate`` per second,
  counted in whole seconds of the integer frame rate (``int(fps)``, as OpenCV reports it),
  over the clip or ``[start, end]`` seconds, and of those the first ``max_frames`` (at
  1 fps: the first 12 seconds of a clip).
- ``"uniform"``: candidate frames at ``framerate`` per second over ``[start, end)``, and
  when there are more than ``max_frames`` of them, ``max_frames`` picked uniformly
  (``linspace``) so that the whole clip is covered.

Only the sampled frames are decoded (decord ``get_batch`` on their indices), so a worker
never holds more than one clip's sampled frames.

Backends: decord (preferred) and PyAV (used when decord is not installed, or for a file
decord cannot open). The choice is made automatically and logged once per process.
Every decoding failure surfaces as :class:`VideoDecodeError` with the file and a short
reason, never as a raw decoder trace. The decoders' own messages (FFmpeg's ``moov atom not
found``, decord's ``ERROR opening``), which they write straight to the process's stderr,
are caught while a file is opened and decoded and kept for the error's detail instead of
reaching the terminal; ``NBRETR_DECODER_LOG=1`` lets them through.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger("nbretr.data")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Container extensions recognised as videos (stripped from ids, preferred when indexing a
# folder); a file with another extension is still a candidate (see nbretr.data._layout).
VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".3gp", ".3g2", ".flv",
                    ".wmv", ".asf", ".ogv", ".ogg", ".ts", ".m2ts", ".mts", ".vob", ".divx", ".f4v", ".qt",
                    ".rm", ".rmvb", ".mxf", ".dv", ".m2v", ".mod", ".nut", ".y4m")
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


_quiet_lock = threading.Lock()
_quiet_state = {"depth": 0, "saved": -1, "sink": None}


@contextlib.contextmanager
def quiet_stderr():
    """Send what C libraries write to file descriptor 2 to a temporary file while inside;
    yields a list that receives the caught text (when this is the only thread inside).
    Nested and concurrent uses share one redirection (reference-counted). A no-op with
    ``NBRETR_DECODER_LOG=1`` or when fd 2 cannot be redirected."""
    caught: list[str] = []
    if os.environ.get("NBRETR_DECODER_LOG", "") not in ("", "0"):
        yield caught
        return
    with _quiet_lock:
        st = _quiet_state
        if st["depth"] == 0:
            try:
                sys.stderr.flush()
            except (AttributeError, ValueError, OSError):
                pass
            sink = saved = None
            try:
                sink = tempfile.TemporaryFile()
                saved = os.dup(2)
                os.dup2(sink.fileno(), 2)
                st["saved"], st["sink"] = saved, sink
            except OSError:  # no fd 2 (a daemon), no temp space: let the noise through
                if saved is not None:
                    os.close(saved)
                if sink is not None:
                    sink.close()
                sink = None
        else:
            sink = st["sink"]
        if sink is not None:
            st["depth"] += 1
            start = os.lseek(sink.fileno(), 0, os.SEEK_END)
    if sink is None:
        yield caught
        return
    try:
        yield caught
    finally:
        with _quiet_lock:
            st = _quiet_state
            end = os.lseek(sink.fileno(), 0, os.SEEK_END)
            if st["depth"] == 1 and end > start:
                caught.append(os.pread(sink.fileno(), min(end - start, 4096), start).decode("utf-8", "replace"))
            st["depth"] -= 1
            if st["depth"] == 0:
                os.dup2(st["saved"], 2)
                os.close(st["saved"])
                st["sink"].close()
                st["saved"], st["sink"] = -1, None


def _decoder_said(caught: list[str]) -> str:
    """The decoder's own first meaningful line (e.g. FFmpeg's ``moov atom not found``)."""
    for line in "".join(caught).splitlines():
        line = line.strip()
        if line:
            return line.split("] ", 1)[-1][:160] if line.startswith("[") else line[:160]
    return ""


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


SAMPLING_RULES = ("first", "uniform")


def first_seconds_indices(num_frames: int, fps: float, max_frames: int, framerate: float = 1.0,
                          start: float | None = None, end: float | None = None) -> np.ndarray:
    """The released code's rule: frame ``sec * int(fps) + j * (int(fps) // framerate)`` for
    each whole second ``sec`` from ``start`` to ``end`` (both included; the whole clip by
    default) and ``j < framerate``, then the first ``max_frames`` of them. A frame rate
    OpenCV would report as 0 counts as 30, and ``framerate <= 0`` means every frame."""
    ifps = int(fps) if fps and math.isfinite(fps) and int(fps) > 0 else 30
    per_sec = ifps if not framerate or framerate <= 0 else int(framerate)
    per_sec = max(1, per_sec)
    interval = max(1, ifps // per_sec)
    duration = max(1, (num_frames + ifps - 1) // ifps)
    s0 = 0 if start is None else min(int(start), duration - 1)
    s1 = duration - 1 if end is None else min(int(end), duration - 1)
    out: list[int] = []
    for sec in range(s0, s1 + 1):
        for j in list(range(0, ifps, interval))[:per_sec]:
            idx = sec * ifps + j
            if idx < num_frames:
                out.append(idx)
            if len(out) == max_frames:
                return np.asarray(out, dtype=np.int64)
    return np.asarray(out, dtype=np.int64)


def sample_indices(num_frames: int, fps: float, max_frames: int, framerate: float = 1.0,
                   start: float | None = None, end: float | None = None,
                   sampling: str = "uniform") -> np.ndarray:
    """Frame indices (int64, sorted, at most ``max_frames``) to decode from a clip of
    ``num_frames`` frames at ``fps``.

    ``sampling="uniform"``: candidates are the frames at times ``start + k / framerate``
    for ``k = 0, 1, ...`` inside ``[start, end)`` (the whole clip by default;
    ``framerate <= 0`` means every frame); if there are more than ``max_frames``
    candidates, ``max_frames`` are chosen uniformly among them. A clip shorter than
    ``1 / framerate`` still yields its first frame. ``sampling="first"``:
    :func:`first_seconds_indices` (the released code's rule).
    """
    if num_frames <= 0:
        return np.zeros(0, dtype=np.int64)
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    if sampling == "first":
        return first_seconds_indices(num_frames, fps, max_frames, framerate, start, end)
    if sampling != "uniform":
        raise ValueError(f"frame sampling must be one of {SAMPLING_RULES}, got {sampling!r}")
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


def _decode_decord(path: str, max_frames: int, framerate: float, start, end, sampling: str = "uniform") -> np.ndarray:
    failure = None
    with quiet_stderr() as caught:
        try:
            return _decode_decord_inner(path, max_frames, framerate, start, end, sampling)
        except VideoDecodeError as err:
            failure = err
    said = _decoder_said(caught)
    if said and said not in failure.detail:
        failure = VideoDecodeError(failure.path, failure.reason, f"{failure.detail} ({said})")
    raise failure


def _decode_decord_inner(path: str, max_frames: int, framerate: float, start, end,
                         sampling: str = "uniform") -> np.ndarray:
    import decord
    try:
        vr = decord.VideoReader(path, num_threads=1)
        n = len(vr)
        fps = vr.get_avg_fps()
    except Exception as err:  # decord raises DECORDError/RuntimeError with the ffmpeg message
        raise VideoDecodeError(path, "undecodable", f"decord: {str(err).splitlines()[0][:200]}") from None
    idx = sample_indices(n, fps, max_frames, framerate, start, end, sampling)
    if len(idx) == 0:
        raise VideoDecodeError(path, "no frames", "the container holds no video frames")
    try:
        frames = vr.get_batch(idx.tolist()).asnumpy()
    except Exception as err:
        raise VideoDecodeError(path, "undecodable", f"decord: {str(err).splitlines()[0][:200]}") from None
    finally:
        del vr
    return frames


def _decode_pyav(path: str, max_frames: int, framerate: float, start, end, sampling: str = "uniform") -> np.ndarray:
    with quiet_stderr():
        return _decode_pyav_inner(path, max_frames, framerate, start, end, sampling)


def _decode_pyav_inner(path: str, max_frames: int, framerate: float, start, end,
                       sampling: str = "uniform") -> np.ndarray:
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
        idx = sample_indices(n, fps, max_frames, framerate, start, end, sampling)
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
                  backend: str = "auto", sampling: str = "uniform") -> np.ndarray:
    """Decode the sampled frames of one video (or one image, as a one-frame video).

    Returns uint8 ``[n, H, W, 3]`` RGB with ``1 <= n <= max_frames``. Raises
    :class:`VideoDecodeError` for a missing, empty, truncated or undecodable file.
    ``backend``: "auto" (decord, then PyAV for files decord cannot open), "decord", "pyav".
    ``sampling``: "first" or "uniform" (see :func:`sample_indices`).
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
            return _decode_decord(path, max_frames, framerate, start, end, sampling)
        except VideoDecodeError as err:
            if backend == "decord" or not _have_av():
                raise
            try:
                frames = _decode_pyav(path, max_frames, framerate, start, end, sampling)
            except VideoDecodeError as err2:  # bad for both: one error (the caller warns once)
                raise VideoDecodeError(path, err2.reason, f"{err.detail}; {err2.detail}") from None
            # said once per process, and only when it helps (PyAV read what decord could not)
            _report_once("fallback", "nbretr.data: decord could not open %s (%s); PyAV could, and is tried "
                         "for such files", path, err.detail)
            return frames
    if not _have_av():
        raise RuntimeError("no video decoding backend: install decord or av (pip install 'nbretr[data]')")
    if backend == "auto":
        _report_once("pyav", "nbretr.data: decord is not installed; decoding videos with PyAV")
    return _decode_pyav(path, max_frames, framerate, start, end, sampling)


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


def strip_video_ext(name: str) -> str:
    """``name`` without its last extension when that is a video container's
    (:data:`VIDEO_EXTENSIONS`, any case): ``X.mov.mp4`` -> ``X.mov``, ``vid`` -> ``vid``."""
    root, ext = os.path.splitext(name)
    return root if root and ext.lower() in VIDEO_EXTENSIONS else name
