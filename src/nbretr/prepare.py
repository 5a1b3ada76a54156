"""``python -m nbretr.prepare VIDEO_DIR OUT_DIR``: re-encode a dataset's videos once so that
every epoch decodes less.

Defaults are those of the released NeighborRetr preprocessing (its
``preprocess/compress_video.py``): 3 frames per second, the shorter side scaled to 224
pixels with even dimensions and the aspect ratio kept, the video stream alone (no audio),
FFmpeg's default encoder for the file's container (libx264 for ``.mp4``). Each file keeps its
name and its path below VIDEO_DIR, so the loaders find the prepared copies the way they
found the originals (``--data-root`` / ``--video-dir`` pointed at OUT_DIR).

Departures from the released script, none of which changes a well-formed output: the
folder layout is kept (the script wrote every file into one folder); a portrait video gets
its width set to 224 and its height scaled up (the script's expression set the height to
224·w/h, below 224, for those); outputs are written to a hidden temporary name and renamed,
so an interrupted run never leaves a partial file under the final name; on a rerun a
finished output is skipped only after it decodes (``--verify``), and a file that does not is
redone; an input FFmpeg cannot read is listed in ``OUT_DIR/prepare_failed.txt`` and counted
instead of being copied over unchanged.

Encoding runs in ``--workers`` processes (default: every CPU), one single-threaded FFmpeg
each, with a progress bar. FFmpeg is the binary that the ``imageio-ffmpeg`` package ships
(``--ffmpeg`` or ``$NBRETR_FFMPEG`` to use another); nothing is downloaded.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from nbretr.data.decoding import VIDEO_EXTENSIONS

FAILED_LIST = "prepare_failed.txt"
PARTIAL_TAG = ".nbretr-partial"


@dataclass(frozen=True)
class Options:
    fps: float = 3.0
    short_side: int = 224
    codec: str | None = None      # None: FFmpeg's default for the container (as the released script)
    crf: int | None = None        # None: the encoder's default (libx264: 23)
    verify: str = "decode"        # decode | probe
    ffmpeg: str = ""
    timeout: float = 600.0


def find_ffmpeg(explicit: str | None = None) -> str:
    """The FFmpeg binary: ``explicit`` (``--ffmpeg``), ``$NBRETR_FFMPEG``, else imageio-ffmpeg's."""
    path = explicit or os.environ.get("NBRETR_FFMPEG")
    if path:
        found = shutil.which(path) or (path if os.path.isfile(path) and os.access(path, os.X_OK) else None)
        if not found:
            raise FileNotFoundError(f"--ffmpeg {path}: no such executable")
        return found
    try:
        import imageio_ffmpeg
    except ImportError:
        raise FileNotFoundError("no FFmpeg binary: install imageio-ffmpeg (pip install imageio-ffmpeg, or "
                                "'nbretr[data]'), or pass --ffmpeg PATH") from None
    try:
        return imageio_ffmpeg.get_ffmpeg_exe()
    except RuntimeError as err:
        raise FileNotFoundError(f"no FFmpeg binary: imageio-ffmpeg has none here ({err}); pass --ffmpeg PATH") from None


def scale_filter(short_side: int) -> str:
    """FFmpeg's ``scale`` for a shorter side of ``short_side`` pixels, the other side scaled
    with the aspect ratio and truncated to an even number (a square video: both sides)."""
    s = int(short_side)
    return (f"scale='if(gt(a,1),trunc(oh*a/2)*2,{s})':'if(gt(a,1),{s},trunc(ow/a/2)*2)'")


def ffmpeg_command(ffmpeg: str, src: Path, dst: Path, opt: Options) -> list[str]:
    cmd = [ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-i", str(src), "-map", "0:v:0"]
    if opt.short_side > 0:
        cmd += ["-filter:v", scale_filter(opt.short_side)]
    if opt.fps > 0:
        cmd += ["-r", f"{opt.fps:g}"]
    if opt.codec:
        cmd += ["-c:v", opt.codec]
    if opt.crf is not None:
        cmd += ["-crf", str(opt.crf)]
    cmd += ["-threads", "1", str(dst)]
    return cmd


def check_output(path: Path, mode: str = "decode") -> str:
    """"" when ``path`` is a usable video: it opens, has a video stream and (``mode``
    "decode") every frame decodes, at least one; else the reason."""
    import av
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                return "no video stream"
            stream = container.streams.video[0]
            if mode == "probe":
                return "" if (stream.frames or 0) > 0 or stream.duration or container.duration else "no frames"
            n = sum(1 for _ in container.decode(stream))
            return "" if n > 0 else "no frames"
    except Exception as err:  # noqa: BLE001  (av.error.*: the file is cut short or not a video)
        return f"{type(err).__name__}: {str(err)[:200]}"


def partial_name(dst: Path) -> Path:
    """The hidden temporary name an output is written under: ``.name.nbretr-partial.ext``
    (the container's extension kept, so FFmpeg picks the same format; hidden, so the loaders'
    index skips it)."""
    return dst.with_name(f".{dst.stem}{PARTIAL_TAG}{dst.suffix}")


def convert(src: str, dst: str, opt: Options) -> tuple[str, str]:
    """Encode ``src`` to ``dst`` (temporary name, verified, renamed). Returns
    ``(status, detail)``: ("done", ""), ("failed", why)."""
    src_p, dst_p = Path(src), Path(dst)
    dst_p.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_name(dst_p)
    try:
        proc = subprocess.run(ffmpeg_command(opt.ffmpeg, src_p, tmp, opt), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=opt.timeout)
    except subprocess.TimeoutExpired:
        tmp.unlink(missing_ok=True)
        return "failed", f"ffmpeg took longer than {opt.timeout:g} s"
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        said = " ".join(proc.stderr.strip().splitlines()[-2:])[:300] or f"exit status {proc.returncode}"
        return "failed", f"ffmpeg: {said}"
    why = check_output(tmp, opt.verify)
    if why:
        tmp.unlink(missing_ok=True)
        return "failed", f"the re-encoded file does not decode ({why})"
    os.replace(tmp, dst_p)
    return "done", ""


def list_inputs(video_dir: Path, out_dir: Path) -> tuple[list[Path], list[Path]]:
    """``(videos, others)`` below ``video_dir`` (recursive, links followed, hidden files and
    folders left out; ``out_dir`` skipped if it lies inside): files with a video extension,
    and the other files."""
    videos, others = [], []
    out_real = out_dir.resolve()
    seen: set[str] = set()
    for root, dirs, files in os.walk(video_dir, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a link loop
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and Path(root, d).resolve() != out_real)
        for name in sorted(files):
            if name.startswith("."):
                continue
            p = Path(root) / name
            (videos if p.suffix.lower() in VIDEO_EXTENSIONS else others).append(p)
    return videos, others


def check_folders(video_dir: Path, out_dir: Path) -> None:
    if not video_dir.exists():
        raise FileNotFoundError(f"VIDEO_DIR {video_dir}: no such folder")
    if not video_dir.is_dir():
        raise NotADirectoryError(f"VIDEO_DIR {video_dir} is a file, not a folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"OUT_DIR {out_dir} is a file, not a folder")
    vd, od = video_dir.resolve(), out_dir.resolve()
    if od == vd:
        raise ValueError(f"OUT_DIR {out_dir} is VIDEO_DIR itself; choose another folder (the originals are kept)")
    if vd in od.parents:
        raise ValueError(f"OUT_DIR {out_dir} is inside VIDEO_DIR {video_dir}; choose a folder outside it (its "
                         "outputs would be read as inputs on the next run)")
    if od in vd.parents:
        raise ValueError(f"VIDEO_DIR {video_dir} is inside OUT_DIR {out_dir}; choose an OUT_DIR outside it")


def prepare(video_dir: str | os.PathLike, out_dir: str | os.PathLike, opt: Options | None = None, *,
            workers: int | None = None, progress: bool = True, log=print) -> dict:
    """Re-encode every video below ``video_dir`` into ``out_dir`` (same relative paths).
    Returns the counts ``{"videos", "converted", "skipped", "redone", "failed", "other_files",
    "seconds"}`` and ``"failed_list"`` (the file naming the inputs that failed, or None)."""
    from tqdm import tqdm
    video_dir, out_dir = Path(video_dir), Path(out_dir)
    opt = opt or Options()
    if opt.fps < 0:
        raise ValueError(f"--fps must be > 0 (or 0: keep the frame rate), got {opt.fps:g}")
    if opt.short_side < 0 or opt.short_side % 2:
        raise ValueError(f"--short-side must be an even number of pixels (or 0: keep the size), got {opt.short_side}")
    if opt.verify not in ("decode", "probe"):
        raise ValueError(f"--verify must be decode or probe, got {opt.verify!r}")
    check_folders(video_dir, out_dir)
    opt = Options(**{**opt.__dict__, "ffmpeg": find_ffmpeg(opt.ffmpeg or None)})
    videos, others = list_inputs(video_dir, out_dir)
    if not videos:
        raise FileNotFoundError(f"VIDEO_DIR {video_dir}: no video files found (looked for "
                                f"{', '.join(VIDEO_EXTENSIONS[:6])}, ... in every subfolder)")
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.rglob(f".*{PARTIAL_TAG}*"):  # left by an interrupted run
        stale.unlink(missing_ok=True)
    t0 = time.time()
    counts = {"videos": len(videos), "converted": 0, "skipped": 0, "redone": 0, "failed": 0,
              "other_files": len(others)}
    todo: list[tuple[Path, Path]] = []
    redo: set[Path] = set()
    check = tqdm(videos, desc="check outputs", unit="file", disable=not progress, leave=False)
    for src in check:
        dst = out_dir / src.relative_to(video_dir)
        if dst.exists():
            if dst.is_file() and dst.stat().st_size > 0 and not check_output(dst, opt.verify):
                counts["skipped"] += 1
                continue
            redo.add(dst)
        todo.append((src, dst))
    failures: list[tuple[Path, str]] = []
    n = max(1, min(workers or os.cpu_count() or 1, len(todo) or 1))
    if todo:
        with cf.ProcessPoolExecutor(max_workers=n) as pool, \
                tqdm(total=len(todo), desc="prepare", unit="video", disable=not progress) as bar:
            futures = {pool.submit(convert, str(s), str(d), opt): (s, d) for s, d in todo}
            for fut in cf.as_completed(futures):
                src, dst = futures[fut]
                try:
                    status, detail = fut.result()
                except Exception as err:  # noqa: BLE001  (a worker that died)
                    status, detail = "failed", f"{type(err).__name__}: {err}"
                if status == "done":
                    counts["converted"] += 1
                    counts["redone"] += dst in redo
                else:
                    counts["failed"] += 1
                    failures.append((src, detail))
                bar.set_postfix(failed=counts["failed"], refresh=False)
                bar.update(1)
    failed_list = out_dir / FAILED_LIST
    if failures:
        failures.sort()
        failed_list.write_text("".join(f"{s.relative_to(video_dir)}\t{why}\n" for s, why in failures))
    else:
        failed_list.unlink(missing_ok=True)
    counts["seconds"] = round(time.time() - t0, 2)
    counts["failed_list"] = str(failed_list) if failures else None
    msg = (f"prepare: {counts['videos']} video(s) in {video_dir}: {counts['converted']} re-encoded"
           f"{' (' + str(counts['redone']) + ' redone: unreadable outputs)' if counts['redone'] else ''}, "
           f"{counts['skipped']} already done, {counts['failed']} unreadable"
           f"{' (listed in ' + str(failed_list) + ')' if failures else ''}; "
           f"{opt.fps:g} fps, short side {opt.short_side} px; {counts['seconds']:.1f} s with {n} worker(s)")
    if others:
        msg += f"; {len(others)} other file(s) left out (not a video extension)"
    log(msg)
    for src, why in failures[:3]:
        log(f"  unreadable: {src}: {why}")
    return counts


def main(argv: list[str] | None = None) -> int:
    doc = (__doc__ or "").split("\n\n")
    p = argparse.ArgumentParser(prog="python -m nbretr.prepare", description=doc[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog="\n\n".join(doc[1:]))
    p.add_argument("video_dir", metavar="VIDEO_DIR", help="the dataset's video folder (searched recursively)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="where the re-encoded videos go (same relative paths); "
                                                      "must not be inside VIDEO_DIR")
    p.add_argument("--fps", type=float, default=3.0, help="output frame rate (default 3, as the released "
                                                          "preprocessing; 0 keeps the input's)")
    p.add_argument("--short-side", type=int, default=224, help="shorter side in pixels, even (default 224; "
                                                               "0 keeps the size)")
    p.add_argument("--workers", type=int, default=None, help="encoding processes (default: every CPU)")
    p.add_argument("--codec", default=None, help="video encoder (default: FFmpeg's for the container, "
                                                 "libx264 for .mp4)")
    p.add_argument("--crf", type=int, default=None, help="encoder quality (default: the encoder's, 23 for libx264)")
    p.add_argument("--verify", default="decode", choices=("decode", "probe"),
                   help="how a finished output is checked before it is skipped or kept: decode every "
                        "frame (default) or only open it")
    p.add_argument("--ffmpeg", default=None, help="FFmpeg binary (default: $NBRETR_FFMPEG, else imageio-ffmpeg's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    opt = Options(fps=args.fps, short_side=args.short_side, codec=args.codec, crf=args.crf, verify=args.verify,
                  ffmpeg=args.ffmpeg or "")
    counts = prepare(args.video_dir, args.out_dir, opt, workers=args.workers, progress=not args.no_progress)
    return 1 if counts["failed"] and counts["failed"] == counts["videos"] else 0


if __name__ == "__main__":
    from nbretr.runtime import run_cli
    sys.exit(run_cli(main, "python -m nbretr.prepare"))
