"""The embedded default dataset: short videos of moving coloured shapes with captions of
mixed specificity, generated on the spot, reproducibly from a seed. Its test split has hubs,
as real video-text test sets do (docs/data.md, "The embedded dataset", has the design and
the statistics that fixed it).

Each video: 24 frames of 32x32 RGB at 2 fps (12 s; sampling at the default 1 fps gives
the default 12 frames), libx264 .mp4 (~3 KB each) written in process with PyAV (or with
imageio + imageio-ffmpeg: ``writer="imageio"``, ten times slower, one ffmpeg process per
file), read back through the same decoding path as real datasets.

Content. Most clips show 1-3 shapes of one colour, kind and size moving in one direction at
one speed over a plain background: 8 colours x 5 shapes x 3 counts x 4 directions x 4
backgrounds x 2 sizes x 2 speeds. Colours and shapes are long-tailed (Zipf weights: red is
about 8 times as frequent as pink). A share of clips (:data:`P_BUSY`) are visually generic:
4-6 shapes of mixed colours and kinds moving every which way. A share of captions
(:data:`P_GENERIC`) are generic ("a shape moving on a white background"), and the other
captions mention each factor with its own probability (:data:`MENTION`), so some captions
name one clip and others fit hundreds.

Splits are i.i.d., like real datasets: video i goes to test if i % 8 in (0, 4), val if
i % 8 == 1, else train (25% / 12.5% / 62.5%). Sizes: "default" 4,000 videos (2,500 / 500 /
1,000), "small" 64 (40 / 8 / 16) for tests.

Cached under ``root`` (by default one folder per size, ``data/synthetic/<size>``, or
``$NBRETR_DATA/synthetic/<size>``; ``<size>-seed<N>`` for a seed other than 0) with a
``manifest.json`` that records every file's size and CRC-32; :func:`build` checks sizes
(cheap; ``verify="full"`` also checksums) and regenerates only missing or corrupt files.
Generation holds an exclusive lock on ``<root>.lock`` beside the folder: processes that
start together (torchrun ranks, two commands) wait for the first and then reuse its build.

:func:`corpus_specs` and :func:`render_frames` give the pretraining corpus of the tiny CLIP
(:mod:`nbretr.pretrain`): other random streams, rendered in memory, and no (content,
caption) pair of the dataset's own builds.

Command: ``python -m nbretr.data.synthetic [--root DIR] [--size default|small] [--seed N]``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import multiprocessing as mp
import os
import sys
import time
import uuid
import zlib
from pathlib import Path

import numpy as np

from nbretr.data.base import VideoRecord, VideoTextDataset

log = logging.getLogger("nbretr.data")

VERSION = 2
SIZES = {"default": 4000, "small": 64}
FRAME_SIZE = 32
FPS = 2
NUM_FRAMES = 24

# factor values, in decreasing frequency where the frequency is long-tailed
COLOURS = {"red": (220, 30, 30), "blue": (40, 70, 235), "green": (30, 190, 40), "yellow": (240, 220, 40),
           "purple": (150, 40, 200), "cyan": (40, 210, 220), "orange": (250, 140, 20), "pink": (250, 130, 190)}
SHAPES = {"square": "squares", "circle": "circles", "triangle": "triangles", "cross": "crosses",
          "diamond": "diamonds"}
COUNTS = {1: "one", 2: "two", 3: "three"}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
BACKGROUNDS = {"black": (10, 10, 10), "white": (245, 245, 245), "gray": (120, 120, 120), "brown": (110, 70, 35)}
SIZES_PX = {"small": 6, "big": 9}
SPEEDS_PX = {"slowly": 0.35, "quickly": 0.8}   # per frame: 8 or 18 px over the clip
ZIPF = 1.0              # colour and shape weights 1 / rank**ZIPF
P_BUSY = 0.08           # visually generic clips: 4-6 shapes of mixed colours, kinds and directions
P_GENERIC = 0.10        # captions that name nothing but "shape" (and perhaps the background)
# probability that a specific caption names each factor (the shape's kind is always named)
MENTION = {"colour": 0.85, "count": 0.5, "direction": 0.75, "background": 0.5, "size": 0.35, "speed": 0.35}
VERBS = ("moving", "sliding", "drifting")
BUSY_NOUNS = ("several shapes of different colours", "many coloured shapes", "a crowd of shapes")


def base_root() -> Path:
    """``$NBRETR_DATA/synthetic`` or ``data/synthetic``: the folder holding one build per size."""
    base = os.environ.get("NBRETR_DATA")
    return Path(base) / "synthetic" if base else Path("data") / "synthetic"


def default_root(size: str = "default", seed: int = 0) -> Path:
    """The default folder of the build of ``size`` and ``seed``: ``<base>/<size>`` (seed 0)
    or ``<base>/<size>-seed<seed>`` (see :func:`base_root`), so that sizes and seeds never
    overwrite each other."""
    return base_root() / (size if int(seed) == 0 else f"{size}-seed{int(seed)}")


@contextlib.contextmanager
def build_lock(root: Path):
    """Hold an exclusive ``flock`` on ``<root>.lock`` (beside the dataset folder); logs once
    when it has to wait for another process. A no-op where ``fcntl`` does not exist."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock (one process at a time is the user's business)
        yield
        return
    root.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(root.with_name(root.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("synthetic dataset %s: another process is building it; waiting", root)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def _split_of(i: int) -> str:
    return "test" if i % 8 in (0, 4) else "val" if i % 8 == 1 else "train"


def _zipf(n: int) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** ZIPF
    return w / w.sum()


_COLOUR_P, _SHAPE_P = _zipf(len(COLOURS)), _zipf(len(SHAPES))


def _pick(rng: np.random.Generator, names, p=None) -> str:
    names = list(names)
    return names[int(rng.choice(len(names), p=p))]


def _spec_from_rng(rng: np.random.Generator, i: int) -> dict:
    """Factors and caption of one clip from its own generator (see the module docstring)."""
    bg = _pick(rng, BACKGROUNDS)
    busy = bool(rng.random() < P_BUSY)
    if busy:
        k = int(rng.integers(4, 7))
        colours = [_pick(rng, COLOURS) for _ in range(k)]
        shapes = [_pick(rng, SHAPES) for _ in range(k)]
        directions = [_pick(rng, DIRECTIONS) for _ in range(k)]
        spec = {"busy": True, "count": k, "colour": "mixed", "shape": "mixed", "direction": "mixed",
                "size": "small", "speed": _pick(rng, SPEEDS_PX), "background": bg,
                "parts": {"colours": colours, "shapes": shapes, "directions": directions}}
        noun = BUSY_NOUNS[int(rng.integers(len(BUSY_NOUNS)))]
        verb = ("moving around", "moving in all directions")[int(rng.integers(2))]
        caption = f"{noun} {verb}" + (f" on a {bg} background" if rng.random() < MENTION["background"] else "")
    else:
        spec = {"busy": False, "count": int(rng.integers(1, 4)), "colour": _pick(rng, COLOURS, _COLOUR_P),
                "shape": _pick(rng, SHAPES, _SHAPE_P), "direction": _pick(rng, DIRECTIONS),
                "size": _pick(rng, SIZES_PX), "speed": _pick(rng, SPEEDS_PX), "background": bg}
        caption = _caption(rng, spec)
    spec["caption"] = caption
    spec["id"] = f"{i:05d}"
    spec["file"] = f"videos/{i:05d}.mp4"
    return spec


def _caption(rng: np.random.Generator, spec: dict) -> str:
    """A caption of a single-kind clip: generic (:data:`P_GENERIC`) or naming each factor
    with its :data:`MENTION` probability, in one of three word orders."""
    n = spec["count"]
    plural = n > 1
    noun = SHAPES[spec["shape"]] if plural else spec["shape"]
    if rng.random() < P_GENERIC:
        say = {f: False for f in MENTION}
        say["background"] = bool(rng.random() < MENTION["background"])
        noun = "shapes" if plural else "shape"
    else:
        say = {f: bool(rng.random() < p) for f, p in MENTION.items()}
    words = [COUNTS[n] if say["count"] else ("some" if plural else "a")]
    if say["size"]:
        words.append(spec["size"])
    if say["colour"]:
        words.append(spec["colour"])
    words.append(noun)
    verb = [VERBS[int(rng.integers(len(VERBS)))]]
    if say["speed"]:
        verb.append(spec["speed"])
    if say["direction"]:
        verb.append(spec["direction"])
    np_, vp = " ".join(words), " ".join(verb)
    if not say["background"]:
        return f"{np_} {vp}"
    bg = spec["background"]
    order = int(rng.integers(3))
    if order == 0:
        return f"{np_} {vp} on a {bg} background"
    if order == 1:
        return f"on a {bg} background {np_} {vp}"
    return f"a {bg} background with {np_} {vp}"


def video_spec(i: int, seed: int) -> dict:
    """The factors, caption and split of video ``i`` (deterministic in ``seed``, ``i``)."""
    spec = _spec_from_rng(np.random.default_rng([seed, i]), i)
    spec["split"] = _split_of(i)
    return spec


def _key(spec: dict) -> str:
    """What makes two clips the same (content factors and caption), for :func:`corpus_specs`."""
    return json.dumps([spec[f] for f in ("count", "colour", "shape", "direction", "size", "speed", "background",
                                         "caption")] + [spec.get("parts")], sort_keys=True)


def corpus_specs(n: int, seed: int = 0, exclude_seeds: tuple[int, ...] = (0,)) -> list[dict]:
    """``n`` clip specs for pretraining, from random streams the dataset never uses
    (``[seed, i, 7]`` instead of ``[seed, i]``), with any clip whose factors and caption equal
    those of a video of a dataset build (every size, seeds ``exclude_seeds``) left out, so
    the corpus shares no (content, caption) pair with the embedded dataset's splits."""
    taken = {_key(video_spec(i, s)) for s in exclude_seeds for i in range(max(SIZES.values()))}
    out, i = [], 0
    while len(out) < n:
        spec = _spec_from_rng(np.random.default_rng([seed, i, 7]), i)
        spec["split"] = "pretrain"
        if _key(spec) not in taken:
            out.append(spec)
        i += 1
    return out


def _shape_mask(shape: str, n: int) -> np.ndarray:
    yy, xx = np.mgrid[0:n, 0:n] + 0.5
    c = n / 2
    if shape == "square":
        return np.ones((n, n), bool)
    if shape == "circle":
        return (yy - c) ** 2 + (xx - c) ** 2 <= c * c
    if shape == "triangle":  # apex up
        return (yy >= 0.5) & (np.abs(xx - c) <= yy / 2)
    if shape == "cross":
        w = n / 6
        return (np.abs(xx - c) <= w) | (np.abs(yy - c) <= w)
    if shape == "diamond":
        return np.abs(xx - c) + np.abs(yy - c) <= c
    raise ValueError(shape)


def _tracks(spec: dict, rng: np.random.Generator) -> list[tuple[str, str, str, float, float]]:
    """One ``(colour, shape, direction, along0, across)`` per shape of the clip: start
    position along the motion axis (within the slack the travel leaves) and across it."""
    px, speed = SIZES_PX[spec["size"]], SPEEDS_PX[spec["speed"]]
    free = FRAME_SIZE - px
    slack = free - speed * (NUM_FRAMES - 1)
    k = spec["count"]
    if spec.get("busy"):
        parts = spec["parts"]
        return [(parts["colours"][j], parts["shapes"][j], parts["directions"][j], rng.uniform(0, slack),
                 rng.uniform(0, free)) for j in range(k)]
    # the shapes sit in k separate bands across the motion axis so that they can be counted
    band = free / k
    return [(spec["colour"], spec["shape"], spec["direction"], rng.uniform(0, slack),
             min(band * j + rng.uniform(0, max(band - px * 0.25, 0.0)), free)) for j in range(k)]


def render(spec: dict, seed: int, frames: "np.ndarray | list[int] | None" = None) -> np.ndarray:
    """uint8 ``[NUM_FRAMES, FRAME_SIZE, FRAME_SIZE, 3]`` frames of one video (only the frame
    indices ``frames`` when given)."""
    rng = np.random.default_rng([seed, int(spec["id"]), 1 if spec.get("split") != "pretrain" else 8])
    px, speed = SIZES_PX[spec["size"]], SPEEDS_PX[spec["speed"]]
    free = FRAME_SIZE - px
    index = list(range(NUM_FRAMES)) if frames is None else [int(f) for f in frames]
    out = np.empty((len(index), FRAME_SIZE, FRAME_SIZE, 3), np.uint8)
    out[:] = np.array(BACKGROUNDS[spec["background"]], np.uint8)
    masks = {}
    for colour, shape, direction, along0, across in _tracks(spec, rng):
        mask = masks.setdefault(shape, _shape_mask(shape, px))
        dx, dy = DIRECTIONS[direction]
        rgb = np.array(COLOURS[colour], np.uint8)
        for o, f in enumerate(index):
            a = along0 + speed * f
            if dx < 0 or dy < 0:
                a = free - a
            x, y = (a, across) if dx else (across, a)
            xi, yi = int(round(x)), int(round(y))
            out[o, yi:yi + px, xi:xi + px][mask] = rgb
    return out


def chroma_subsample(frames: np.ndarray) -> np.ndarray:
    """``frames`` (uint8 ``[..., H, W, 3]``, even H and W) as H.264's yuv420p stores them: full
    luma, chroma averaged over 2x2 blocks (BT.601). Pretraining frames rendered in memory
    go through this so that they look like the decoded clips."""
    x = frames.astype(np.float32)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb, cr = 0.564 * (b - y), 0.713 * (r - y)

    def pool(c):
        h, w = c.shape[-2:]
        m = c.reshape(*c.shape[:-2], h // 2, 2, w // 2, 2).mean(axis=(-3, -1))
        return np.repeat(np.repeat(m, 2, axis=-2), 2, axis=-1)

    cb, cr = pool(cb), pool(cr)
    rgb = np.stack([y + 1.403 * cr, y - 0.344 * cb - 0.714 * cr, y + 1.773 * cb], -1)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def render_frames(spec: dict, seed: int, frames: "list[int]") -> np.ndarray:
    """The frames ``frames`` of a clip rendered in memory and chroma-subsampled, uint8
    ``[len(frames), FRAME_SIZE, FRAME_SIZE, 3]`` (the pretraining corpus's samples)."""
    return chroma_subsample(render(spec, seed, frames))


def write_mp4(path: Path, frames: np.ndarray, fps: float = FPS, writer: str = "auto") -> None:
    """Write uint8 frames ``[n, H, W, 3]`` as an H.264 (libx264, yuv420p, crf 18) .mp4,
    atomically (temp file + rename). ``writer``: "pyav" encodes in process (~5 ms for one
    of these clips), "imageio" pipes to imageio-ffmpeg's ffmpeg binary (~50 ms: one process
    per file); "auto" = pyav when installed. Byte-for-byte output: imageio's ffmpeg writes
    the same bytes every time; PyAV's libx264 was seen to write slightly different bytes
    for ~5% of these clips from run to run (decoded pixels within ~15 levels), so the
    content, not the bytes, is what the seed reproduces with it."""
    if writer == "auto":
        try:
            import av  # noqa: F401
            writer = "pyav"
        except ImportError:
            writer = "imageio"
    # unique per process and call: concurrent writers never share a temp file
    tmp = path.with_name(f"{path.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp.mp4")
    try:
        _write(tmp, frames, fps, writer)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write(tmp: Path, frames: np.ndarray, fps: float, writer: str) -> None:
    if writer == "pyav":
        import av

        with av.open(str(tmp), "w") as c:
            s = c.add_stream("libx264", rate=int(fps))
            s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
            s.options = {"crf": "18", "preset": "veryfast", "threads": "1"}
            for k, fr in enumerate(frames):
                vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(fr), format="rgb24")
                vf.pts = k
                c.mux(s.encode(vf))
            c.mux(s.encode())
    elif writer == "imageio":
        import imageio.v2 as iio

        w = iio.get_writer(str(tmp), format="FFMPEG", fps=fps, codec="libx264", quality=None, macro_block_size=16,
                           pixelformat="yuv420p", ffmpeg_log_level="error",
                           output_params=["-crf", "18", "-preset", "veryfast", "-threads", "1"])
        try:
            for fr in frames:
                w.append_data(fr)
        finally:
            w.close()
    else:
        raise ValueError(f"writer must be 'auto', 'pyav' or 'imageio', got {writer!r}")


def _crc(path: Path) -> int:
    return zlib.crc32(path.read_bytes()) & 0xFFFFFFFF


def _make(args: tuple[Path, dict, int, str]) -> tuple[str, int, int]:
    root, spec, seed, writer = args
    path = root / spec["file"]
    write_mp4(path, render(spec, seed), writer=writer)
    return spec["id"], path.stat().st_size, _crc(path)


def _params(size: str, seed: int) -> dict:
    return {"version": VERSION, "size": size, "num_videos": SIZES[size], "seed": int(seed), "fps": FPS,
            "num_frames": NUM_FRAMES, "frame_size": FRAME_SIZE}


def _read_manifest(root: Path) -> dict | None:
    try:
        m = json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("complete") and isinstance(m.get("videos"), list) else None


def check(root: str | os.PathLike, verify: str = "size") -> list[str]:
    """Ids of the videos listed in ``root``'s manifest that are missing or corrupt (size, or
    with ``verify="full"`` also CRC-32, differs from the manifest). Raises FileNotFoundError
    when there is no complete manifest."""
    root = Path(root)
    m = _read_manifest(root)
    if m is None:
        raise FileNotFoundError(f"no complete synthetic-dataset manifest in {root}")
    bad = []
    for v in m["videos"]:
        p = root / v["file"]
        try:
            ok = p.stat().st_size == v["bytes"] and (verify != "full" or _crc(p) == v["crc32"])
        except OSError:
            ok = False
        if not ok:
            bad.append(v["id"])
    return bad


def _intact(root: Path, params: dict, verify: str) -> tuple[dict | None, set[str]]:
    """``(manifest, ids to regenerate)``; manifest None when there is none for ``params``."""
    old = _read_manifest(root)
    if old is None or {k: old.get(k) for k in params} != params:
        return None, set()
    return old, set(check(root, verify))


def build(root: str | os.PathLike | None = None, size: str = "default", seed: int = 0, *, workers: int = 2,
          verify: str = "size", progress: bool | None = None, writer: str = "auto") -> Path:
    """Generate the embedded dataset in ``root`` (default :func:`default_root` of ``size``
    and ``seed``), or reuse it when its manifest matches ``size``/``seed`` and every file
    checks out, regenerating only missing or corrupt videos. Returns the folder. Generation
    runs under :func:`build_lock`, so concurrent callers build once. ``workers``: processes
    for encoding (a Pool of 2 by default); ``writer``: see :func:`write_mp4` ("imageio" for
    byte-identical rebuilds, 10x slower).
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    root = Path(root) if root is not None else default_root(size, seed)
    params = _params(size, seed)
    old, bad = _intact(root, params, verify)
    if old is not None and not bad:  # the usual case: no lock needed to read a complete build
        return root
    with build_lock(root):
        old, bad = _intact(root, params, verify)  # another process may have built it meanwhile
        if old is not None and not bad:
            return root
        return _generate(root, size, seed, params, old, bad, workers, progress, writer)


def _generate(root: Path, size: str, seed: int, params: dict, old: dict | None, bad: set[str], workers: int,
              progress: bool | None, writer: str) -> Path:
    specs = [video_spec(i, seed) for i in range(params["num_videos"])]
    done: dict[str, dict] = {}
    if old is not None:
        done = {v["id"]: v for v in old["videos"] if v["id"] not in bad}
        log.warning("synthetic dataset %s: %d missing or corrupt video(s), regenerating them", root, len(bad))
    elif _read_manifest(root) is not None:
        log.info("synthetic dataset %s was built with other settings; regenerating", root)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    for stale in (root / "videos").glob("*.tmp.mp4"):  # left by a killed writer (we hold the lock)
        stale.unlink(missing_ok=True)
    mpath = root / "manifest.json"
    if mpath.exists():
        mpath.unlink()  # incomplete until rewritten
    todo = [s for s in specs if s["id"] not in done]
    from tqdm import tqdm

    t0 = time.perf_counter()
    results: dict[str, tuple[int, int]] = {}
    bar = tqdm(total=len(todo), desc=f"synthetic[{size}]", unit="video",
               disable=None if progress is None else not progress)
    jobs = [(root, s, seed, writer) for s in todo]
    if workers > 1 and len(todo) >= 16:
        with mp.get_context("fork" if sys.platform != "win32" else "spawn").Pool(workers) as pool:
            for vid, nbytes, crc in pool.imap_unordered(_make, jobs, chunksize=8):
                results[vid] = (nbytes, crc)
                bar.update()
    else:
        for job in jobs:
            vid, nbytes, crc = _make(job)
            results[vid] = (nbytes, crc)
            bar.update()
    bar.close()
    entries = []
    for s in specs:
        e = dict(s)
        if s["id"] in results:
            e["bytes"], e["crc32"] = results[s["id"]]
        else:
            e["bytes"], e["crc32"] = done[s["id"]]["bytes"], done[s["id"]]["crc32"]
        entries.append(e)
    manifest = dict(params, complete=True, generated_s=round(time.perf_counter() - t0, 2), videos=entries)
    tmp = mpath.with_name(f".manifest.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(manifest, indent=0))
    os.replace(tmp, mpath)
    log.info("synthetic dataset %s: %d video(s) written in %.1f s", root, len(todo), manifest["generated_s"])
    return root


def _adopt_flat_build(size: str, seed: int) -> None:
    """Move a build made before sizes had their own folders (``<base>/manifest.json`` and
    ``<base>/videos``) into ``<base>/<size>`` when it is that size and seed and that folder
    has no build yet, so that it is not generated again."""
    base, target = base_root(), default_root(size, seed)
    flat = _read_manifest(base)
    if flat is None or flat.get("size") != size or flat.get("seed") != seed or _read_manifest(target) is not None:
        return
    with build_lock(target):
        flat = _read_manifest(base)
        if flat is None or flat.get("size") != size or flat.get("seed") != seed or not (base / "videos").is_dir() \
                or _read_manifest(target) is not None:
            return
        target.mkdir(parents=True, exist_ok=True)
        if (target / "videos").exists():
            return
        os.replace(base / "videos", target / "videos")
        os.replace(base / "manifest.json", target / "manifest.json")
        log.info("synthetic dataset: moved the %s build from %s to %s", size, base, target)


def ensure(root: str | os.PathLike | None = None, size: str | None = None, seed: int | None = None) -> Path:
    """A folder ready to read. ``root`` None: :func:`default_root` of ``size`` ("default")
    and ``seed`` (0), built if needed. An explicit ``root`` with ``size``/``seed`` None:
    any complete valid build there is accepted (missing or corrupt files regenerated);
    otherwise as :func:`build`."""
    if root is None:
        size, seed = size or "default", 0 if seed is None else int(seed)
        if size in SIZES:
            _adopt_flat_build(size, seed)
        return build(None, size, seed)
    root = Path(root)
    m = _read_manifest(root)
    if m is not None and size is None and seed is None and m.get("size") in SIZES and m.get("version") == VERSION:
        return build(root, m["size"], m["seed"])
    return build(root, size or "default", 0 if seed is None else seed)


class SyntheticDataset(VideoTextDataset):
    """The embedded dataset (see the module docstring); one caption per video. Extra
    options: ``size`` and ``seed`` (passed to :func:`ensure`, which builds it if needed)."""

    name = "synthetic"

    def __init__(self, root=None, split="train", tokenizer=None, **kw):
        kw.setdefault("flip_p", 0.0)  # captions say left/right
        root = ensure(root, kw.pop("size", None), kw.pop("seed", None))
        if tokenizer is None:
            tokenizer = word_tokenizer(root)
        super().__init__(root, split, tokenizer, **kw)

    def _read(self):
        m = _read_manifest(self.root)
        videos, pairs = [], []
        for v in m["videos"]:
            if v["split"] == self.split:
                pairs.append((v["caption"], len(videos)))
                videos.append(VideoRecord(v["id"], self.root / v["file"]))
        return videos, pairs


def word_tokenizer(root: str | os.PathLike | None = None):
    """The word tokenizer for the embedded dataset and the pretraining corpus: every word the
    generator can write, in alphabetical order (all splits share it, so test words are known)."""
    from nbretr.data.tokenizers import WordTokenizer

    words = [*COUNTS.values(), "some", "a", *SIZES_PX, *COLOURS, *SHAPES, *SHAPES.values(), "shape", "shapes",
             *VERBS, *SPEEDS_PX, *DIRECTIONS, "on", "background", "with", *BACKGROUNDS, *BUSY_NOUNS,
             "moving around", "moving in all directions"]
    return WordTokenizer.from_captions([" ".join(words)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nbretr.data.synthetic", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=None,
                   help="folder (default data/synthetic/<size>, or $NBRETR_DATA/synthetic/<size>)")
    p.add_argument("--size", default="default", choices=sorted(SIZES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--verify", default="size", choices=["size", "full"])
    p.add_argument("--writer", default="auto", choices=["auto", "pyav", "imageio"],
                   help="mp4 writer: pyav (in process, fast) or imageio-ffmpeg (byte-identical rebuilds, 10x slower)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    if a.root is None:
        _adopt_flat_build(a.size, a.seed)
    root = build(a.root, a.size, a.seed, workers=a.workers, verify=a.verify, progress=True, writer=a.writer)
    m = _read_manifest(root)
    n = {s: sum(v["split"] == s for v in m["videos"]) for s in ("train", "val", "test")}
    nbytes = sum(v["bytes"] for v in m["videos"])
    print(f"{root}: {len(m['videos'])} videos (train {n['train']}, val {n['val']}, test {n['test']}), "
          f"{nbytes / 2**20:.1f} MiB, ready in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
