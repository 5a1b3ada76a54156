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

Backends (``backend=``, ``--decoder`` on the command line): torchcodec, decord and PyAV.
``"auto"`` takes the first installed of :data:`AUTO_ORDER` (the order measured by
``bench/data.py``, fastest first; docs/benchmarks.md) and falls back to PyAV for a file the
chosen decoder cannot open. The choice is logged once per process. Every backend decodes the
same frame indices (:func:`sample_indices` on the stream's frame count and header frame
rate). torchcodec can decode on a CUDA device (``device="cuda"``, NVDEC); the other two
decode on the CPU only.
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
import re
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


# FFmpeg's shared libraries that torchcodec loads from the system, with the major versions
# (FFmpeg 4 to 8) it has builds for; Debian 12 ships FFmpeg 5.1 (the *59/57/6/8 packages).
FFMPEG_LIBRARIES = {
    "libavutil": (56, 57, 58, 59, 60), "libavcodec": (58, 59, 60, 61, 62),
    "libavformat": (58, 59, 60, 61, 62), "libavdevice": (58, 59, 60, 61, 62),
    "libavfilter": (7, 8, 9, 10, 11), "libswscale": (5, 6, 7, 8, 9), "libswresample": (3, 4, 5, 6),
}
FFMPEG_APT = ("apt-get install -y libavcodec59 libavformat59 libavutil57 libswscale6 libavdevice59 "
              "libavfilter8")


def missing_ffmpeg_libraries(load=None) -> list[str]:
    """The FFmpeg libraries (``libavcodec``, ...) of which no version torchcodec supports
    can be loaded here. ``load`` (tests) replaces :class:`ctypes.CDLL`."""
    import ctypes
    load = load or ctypes.CDLL
    missing = []
    for name, majors in FFMPEG_LIBRARIES.items():
        for major in majors:
            try:
                load(f"{name}.so.{major}")
                break
            except OSError:
                continue
        else:
            missing.append(name)
    return missing


class DecoderUnavailable(ValueError):
    """A decoder (or decoding device) that was asked for and cannot be used here; the
    message says why and what to install or which option to change."""


_torchcodec_state: dict[str, object] = {}


def torchcodec_status() -> tuple[bool, str]:
    """``(usable, why not)`` for torchcodec: the package imports and its FFmpeg libraries
    load. The reason names the missing FFmpeg libraries and the command that installs them."""
    if "ok" not in _torchcodec_state:
        ok, why = True, ""
        try:
            import torchcodec  # noqa: F401
        except ImportError:
            ok, why = False, "torchcodec is not installed (pip install torchcodec, or 'nbretr[data]')"
        if ok:
            try:
                with quiet_stderr():
                    from torchcodec.decoders import VideoDecoder  # noqa: F401  (loads FFmpeg)
            except Exception as err:  # noqa: BLE001  (RuntimeError/OSError from the library loader)
                missing = missing_ffmpeg_libraries()
                ok = False
                if missing:
                    why = (f"torchcodec cannot load FFmpeg's shared libraries: {', '.join(missing)} "
                           f"not found (FFmpeg 4 to 8; on Debian 12: {FFMPEG_APT})")
                else:
                    why = f"torchcodec could not be loaded: {str(err).strip().splitlines()[0][:300]}"
        _torchcodec_state.update(ok=ok, why=why)
    return bool(_torchcodec_state["ok"]), str(_torchcodec_state["why"])


def _have_torchcodec() -> bool:
    return torchcodec_status()[0]


DECODERS = ("torchcodec", "decord", "pyav")
# The order "auto" tries, fastest first on the MSR-VTT-like clips of bench/data.py, raw and
# re-encoded by nbretr.prepare (docs/benchmarks.md): decord, then PyAV, then torchcodec
# (torchcodec was the fastest only on the embedded set's 32x32 clips).
AUTO_ORDER = ("decord", "pyav", "torchcodec")
_HAVE = {"torchcodec": _have_torchcodec, "decord": lambda: _have_decord(), "pyav": lambda: _have_av()}


def available_backends() -> list[str]:
    """The installed (and loadable) decoding backends, in the order ``"auto"`` tries them."""
    return [b for b in AUTO_ORDER if _HAVE[b]()]


def why_unavailable(backend: str) -> str:
    """Why ``backend`` cannot decode here ("" when it can)."""
    if backend == "torchcodec":
        return torchcodec_status()[1]
    if backend == "decord":
        return "" if _have_decord() else "decord is not installed (pip install decord, or 'nbretr[data]')"
    if backend == "pyav":
        return "" if _have_av() else "PyAV is not installed (pip install av, or 'nbretr[data]')"
    raise ValueError(f"decoder must be one of auto, {', '.join(DECODERS)}, got {backend!r}")


def resolve_decoder(backend: str = "auto", device: str = "cpu") -> str:
    """The decoder that ``backend`` (``--decoder``) means here: itself, or for ``"auto"``
    the first installed of :data:`AUTO_ORDER` (torchcodec alone with a CUDA ``device``).
    Raises :class:`DecoderUnavailable` naming the option when the choice cannot work here,
    and ``ValueError`` for an unknown name."""
    if backend not in ("auto",) + DECODERS:
        raise ValueError(f"--decoder must be one of auto, {', '.join(DECODERS)}, got {backend!r}")
    dev = str(device or "cpu")
    if dev not in ("cpu",) and not dev.startswith("cuda"):
        raise ValueError(f"--decode-device must be cpu or cuda (or cuda:N), got {dev!r}")
    if dev.startswith("cuda"):
        if backend not in ("auto", "torchcodec"):
            raise DecoderUnavailable(f"--decode-device {dev}: --decoder {backend} decodes on the CPU only; "
                                     "CUDA decoding needs --decoder torchcodec (or auto), or use "
                                     "--decode-device cpu")
        if not torch.cuda.is_available():
            raise DecoderUnavailable(f"--decode-device {dev}: CUDA is not available here (torch "
                                     f"{torch.__version__}, torch.cuda.is_available() is False); use "
                                     "--decode-device cpu")
        ok, why = torchcodec_status()
        if not ok:
            raise DecoderUnavailable(f"--decode-device {dev} needs torchcodec: {why}; or use --decode-device cpu")
        return "torchcodec"
    if backend != "auto":
        why = why_unavailable(backend)
        if why:
            raise DecoderUnavailable(f"--decoder {backend}: {why}")
        return backend
    for b in AUTO_ORDER:  # the first that loads (torchcodec, last, is imported only when needed)
        if _HAVE[b]():
            return b
    raise DecoderUnavailable("no video decoding backend: install decord, av or torchcodec "
                             "(pip install 'nbretr[data]')")


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


def _quietly(decode, *args) -> np.ndarray:
    """Run a decoder with its native stderr captured; on failure, what the library printed
    joins the error's detail instead of reaching the terminal."""
    failure = None
    with quiet_stderr() as caught:
        try:
            return decode(*args)
        except VideoDecodeError as err:
            failure = err
    said = _decoder_said(caught)
    if said and said not in failure.detail:
        failure = VideoDecodeError(failure.path, failure.reason, f"{failure.detail} ({said})")
    raise failure


def _decode_decord(path: str, max_frames: int, framerate: float, start, end, sampling: str = "uniform") -> np.ndarray:
    return _quietly(_decode_decord_inner, path, max_frames, framerate, start, end, sampling)


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


def probe_video(path: str | os.PathLike, backend: str = "auto") -> tuple[int, float]:
    """``(frame count, frame rate)`` of a video's first video stream as ``backend`` sees
    them, the two numbers :func:`sample_indices` turns into frame indices (torchcodec: the
    packet scan's count and the header's average rate; decord: ``len`` and
    ``get_avg_fps()``; PyAV: the stream's frame count and average rate). Raises
    :class:`VideoDecodeError` when the file cannot be opened."""
    path = str(path)
    if not os.path.isfile(path):
        raise VideoDecodeError(path, "missing", "no such file")
    chosen = resolve_decoder(backend)
    with quiet_stderr():
        try:
            if chosen == "torchcodec":
                from torchcodec.decoders import VideoDecoder
                return _torchcodec_counts(VideoDecoder(path, seek_mode="exact").metadata)[:2]
            if chosen == "decord":
                import decord
                vr = decord.VideoReader(path, num_threads=1)
                return len(vr), float(vr.get_avg_fps())
            import av
            with av.open(path) as container:
                if not container.streams.video:
                    raise VideoDecodeError(path, "no frames", "no video stream")
                st = container.streams.video[0]
                n = int(st.frames or 0) or sum(1 for _ in container.demux(st) if _.size)
                return n, float(st.average_rate or st.guessed_rate or 0.0)
        except VideoDecodeError:
            raise
        except Exception as err:  # noqa: BLE001
            raise VideoDecodeError(path, "undecodable", f"{chosen}: {str(err).strip()[:200]}") from None


def _torchcodec_reason(err: BaseException, path: str) -> str:
    """torchcodec's error without its C++ source location and the file name (the error
    names the file already): "Could not open input file: Invalid data found when processing
    input"."""
    text = " ".join(str(err).split())
    text = re.sub(r"^\w+, \S+\.(?:cpp|h):\d+, ", "", text)
    text = text.replace(f": {path} ", ": ").replace(path, "").strip()
    return text[:200]


def _torchcodec_counts(md) -> tuple[int, float, int | None]:
    """``(frame count, frame rate, frames present)`` from torchcodec's stream metadata, as
    decord counts them: the header's frame count when it has one (else the packet scan's),
    the header's average rate (decord's ``get_avg_fps()``; the "first" rule truncates it),
    and the packet scan's count (frames past it are missing: a truncated file)."""
    held = md.num_frames_from_content
    n = int(md.num_frames_from_header or held or md.num_frames or 0)
    fps = float(md.average_fps_from_header or md.average_fps or 0.0)
    return n, fps, (int(held) if held is not None else None)


def _decode_torchcodec(path: str, max_frames: int, framerate: float, start, end, sampling: str = "uniform",
                       device: str = "cpu") -> np.ndarray:
    return _quietly(_decode_torchcodec_inner, path, max_frames, framerate, start, end, sampling, device)


def _decode_torchcodec_inner(path: str, max_frames: int, framerate: float, start, end,
                             sampling: str = "uniform", device: str = "cpu") -> np.ndarray:
    from torchcodec.decoders import VideoDecoder
    try:
        # exact seek mode: the frame count comes from a scan of the packets, as decord's index
        dec = VideoDecoder(path, dimension_order="NHWC", num_ffmpeg_threads=1, device=device, seek_mode="exact")
        n, fps, held = _torchcodec_counts(dec.metadata)
    except Exception as err:  # noqa: BLE001  (RuntimeError/ValueError with FFmpeg's message)
        raise VideoDecodeError(path, "undecodable", f"torchcodec: {_torchcodec_reason(err, path)}") from None
    idx = sample_indices(n, fps, max_frames, framerate, start, end, sampling)
    if len(idx) == 0:
        raise VideoDecodeError(path, "no frames", "the container holds no video frames")
    if held is not None and int(idx[-1]) >= held:  # decord fails on these frames too
        raise VideoDecodeError(path, "undecodable", f"torchcodec: truncated, the header lists {n} frames but "
                                                    f"the file holds {held}")
    try:
        frames = dec.get_frames_at(idx.tolist()).data
    except Exception as err:  # noqa: BLE001
        raise VideoDecodeError(path, "undecodable", f"torchcodec: {_torchcodec_reason(err, path)}") from None
    finally:
        del dec
    return frames.cpu().numpy()


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
                  backend: str = "auto", sampling: str = "uniform", device: str = "cpu") -> np.ndarray:
    """Decode the sampled frames of one video (or one image, as a one-frame video).

    Returns uint8 ``[n, H, W, 3]`` RGB (on the CPU) with ``1 <= n <= max_frames``. Raises
    :class:`VideoDecodeError` for a missing, empty, truncated or undecodable file.
    ``backend``: "auto" (the first installed of :data:`AUTO_ORDER`, then PyAV for files it
    cannot open), "torchcodec", "decord", "pyav"; a backend that cannot work here raises
    :class:`DecoderUnavailable`. ``device``: "cpu", or "cuda"/"cuda:N" to decode with
    torchcodec on the GPU (unverified on a GPU: docs/data.md).
    ``sampling``: "first" or "uniform" (see :func:`sample_indices`).
    """
    path = str(path)
    if not os.path.exists(path):
        raise VideoDecodeError(path, "missing", "no such file")
    if os.path.getsize(path) == 0:
        raise VideoDecodeError(path, "empty", "the file has 0 bytes")
    if path.lower().endswith(IMAGE_EXTENSIONS):
        return _load_image(path)
    chosen = resolve_decoder(backend, device)
    if backend == "auto":
        if chosen == AUTO_ORDER[0]:  # the usual case: debug level (every DataLoader worker is a new process)
            _report_once("decoder:" + chosen, "nbretr.data: decoding videos with %s", chosen, level=logging.DEBUG)
        else:
            _report_once("decoder:" + chosen, "nbretr.data: %s; decoding videos with %s",
                         "; ".join(why_unavailable(b) for b in AUTO_ORDER[:AUTO_ORDER.index(chosen)]), chosen)
    kw = {"device": str(device)} if chosen == "torchcodec" else {}
    decode = globals()["_decode_" + chosen]  # looked up here, so that tests can replace one
    try:
        return decode(path, max_frames, framerate, start, end, sampling, **kw)
    except VideoDecodeError as err:
        if backend != "auto" or chosen == "pyav" or not _have_av():
            raise
        try:
            frames = _decode_pyav(path, max_frames, framerate, start, end, sampling)
        except VideoDecodeError as err2:  # bad for both: one error (the caller warns once)
            raise VideoDecodeError(path, err2.reason, f"{err.detail}; {err2.detail}") from None
        # said once per process, and only when it helps (PyAV read what the first could not)
        _report_once("fallback", "nbretr.data: %s could not open %s (%s); PyAV could, and is tried "
                     "for such files", chosen, path, err.detail)
        return frames


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
