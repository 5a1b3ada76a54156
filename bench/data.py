"""Data-loading throughput.

1. Decoders: each installed decoder (torchcodec, decord, PyAV) decodes the 12 sampled
   frames (1 fps, uniform) of every clip, in process: frames per second and CPU seconds
   (process time) per 1,000 frames, on the embedded dataset's clips (512 of the train
   split: 24 frames at 32x32) and on MSR-VTT-like clips (320x240, 30 fps, 12 s). All
   decoders must return the same frames (within 2 grey levels): checked first.
2. Loading: frames per second decoded (``auto`` decoder) and CLIP-preprocessed through a
   DataLoader with 0 workers (in process, 1 torch thread) and 2 workers, over the embedded
   dataset's train split (2,500 clips) at output size 32 and, on 512 of the clips, 224,
   and over the MSR-VTT-like clips (12 frames at 1 fps, 224x224).
3. Prepare: the MSR-VTT-like clips re-encoded by ``python -m nbretr.prepare`` (3 fps,
   shorter side 224): its time, then decoding and loading (0 workers) before and after.

Skips (exit 0) when no decoding backend or no mp4 writer is installed."""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _runner  # noqa: E402


def epoch(ds, workers: int, batch: int) -> tuple[float, int, int]:
    """Seconds for one pass (worker start-up included), valid frames, items."""
    from torch.utils.data import DataLoader

    from nbretr.data import collate
    loader = DataLoader(ds, batch_size=batch, num_workers=workers, collate_fn=collate, shuffle=False)
    t0 = time.perf_counter()
    frames = items = 0
    for b in loader:
        assert not b["bad"].any(), "bad video in the benchmark data"
        frames += int(b["video_mask"].sum())
        items += b["video_mask"].shape[0]
    return time.perf_counter() - t0, frames, items


def msrvtt_like(folder: Path, n: int) -> Path:
    """``n`` 12-second 320x240 30-fps clips (a moving square on a gradient) in the MSR-VTT
    test layout."""
    from nbretr.data.synthetic import write_mp4
    (folder / "videos").mkdir(parents=True, exist_ok=True)
    rows = ["key,vid_key,video_id,sentence"]
    yy, xx = np.mgrid[0:240, 0:320]
    base = np.stack([xx * 255 // 320, yy * 255 // 240, np.full_like(xx, 80)], -1).astype(np.uint8)
    for i in range(n):
        frames = np.repeat(base[None], 360, 0)
        for f in range(360):
            x = (f * 2 + 17 * i) % 280
            frames[f, 100:140, x:x + 40] = (255, 255, 255)
        write_mp4(folder / "videos" / f"video{i}.mp4", frames, fps=30)
        rows.append(f"r{i},k{i},video{i},clip {i}")
    (folder / "MSRVTT_JSFUSION_test.csv").write_text("\n".join(rows) + "\n")
    return folder


def decode_pass(paths: list[str], decoder: str) -> tuple[float, float, int, list]:
    """Wall seconds, CPU seconds, frames and the decoded arrays' checksums for decoding the
    12 sampled frames of every path with ``decoder``."""
    from nbretr.data import decode_frames
    sums = []
    frames = 0
    c0, t0 = time.process_time(), time.perf_counter()
    for p in paths:
        f = decode_frames(p, 12, 1.0, backend=decoder, sampling="uniform")
        frames += f.shape[0]
        sums.append(f[:, ::7, ::7].astype(np.int16))
    return time.perf_counter() - t0, time.process_time() - c0, frames, sums


def compare_decoders(name: str, paths: list[str], decoders: list[str], lines: list[str], results: list) -> dict:
    ref = None
    rates = {}
    for dec in decoders:
        decode_pass(paths[:4], dec)  # warm the libraries
        wall, cpu, frames, sums = decode_pass(paths, dec)
        if ref is None:
            ref = sums
        else:
            for a, b in zip(ref, sums):
                assert a.shape == b.shape and int(np.abs(a - b).max()) <= 2, f"{dec} decodes other frames"
        rates[dec] = frames / wall
        results.append(_runner.Result(f"decode {name}", dec, dict(clips=len(paths)), wall * 1e3, float("nan"),
                                      dict(frames_per_s=frames / wall, cpu_s_per_1000_frames=1e3 * cpu / frames,
                                           frames=frames)))
        lines.append(f"{name:<26} {dec:<11} {len(paths):>6} {frames:>7} {wall:>8.2f} {frames / wall:>10.0f} "
                     f"{1e3 * cpu / frames:>12.2f}")
    return rates


def main() -> int:
    p = _runner.arg_parser(__doc__)
    p.add_argument("--root", default=None, help="embedded dataset folder (default data/synthetic)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()
    from nbretr.data.decoding import available_backends
    backends = available_backends()
    if not backends:
        print("skipped: no video decoding backend (pip install decord av)")
        return 0
    try:
        from nbretr.data import build_dataset, synthetic
        size = "small" if args.quick else "default"
        t0 = time.perf_counter()
        root = synthetic.build(args.root, size, progress=False)
        build_s = time.perf_counter() - t0
    except ImportError as err:
        print(f"skipped: cannot write the embedded dataset ({err})")
        return 0
    tok = synthetic.word_tokenizer()
    results, lines, dec_lines, prep_lines = [], [], [], []
    tmp = tempfile.TemporaryDirectory()
    raw = None
    n_msr = 8 if args.quick else 32
    t0 = time.perf_counter()
    raw = msrvtt_like(Path(tmp.name) / "raw", n_msr)
    gen_s = time.perf_counter() - t0
    # 1. decoders
    synth_ds = build_dataset("synthetic", root, "train", tok, image_size=32)
    synth_paths = [str(r.path) for r in synth_ds.videos][: (64 if args.quick else 512)]
    raw_paths = sorted(str(p) for p in (raw / "videos").glob("*.mp4"))
    rates = {}
    for name, paths in (("embedded 32x32", synth_paths), ("msrvtt-like 320x240 30fps", raw_paths)):
        rates[name] = compare_decoders(name, paths, backends, dec_lines, results)
    cases = [("synthetic train", root, "synthetic", 32), ("synthetic train", root, "synthetic", 224)]
    if not args.quick:
        cases.append(("msrvtt-like 320x240", raw, "msrvtt", 224))
    for name, folder, kind, size_px in (cases[:1] if args.quick else cases):
        ds = build_dataset(kind, folder, "train" if kind == "synthetic" else "test", tok, image_size=size_px)
        assert int(ds[0]["video_mask"].sum()) == ds.max_frames, "correctness: a clip lost frames"
        if size_px > 32 and len(ds) > 512:
            ds = torch.utils.data.Subset(ds, range(512))  # upsampling to 224 dominates: fewer clips
        for w in (0, args.workers):
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # as in a DataLoader worker (the main process's threads spin otherwise)
            try:
                secs, frames, items = epoch(ds, w, args.batch)
            finally:
                torch.set_num_threads(threads)
            fps = frames / secs
            params = dict(clips=len(ds), image_size=size_px, batch=args.batch)
            results.append(_runner.Result(name, f"workers={w}", params, secs * 1e3, float("nan"),
                                          dict(frames_per_s=fps, clips_per_s=items / secs, frames=frames,
                                               backend=backends[0])))
            lines.append(f"{name:<22} {size_px:>5} {len(ds):>6} {w:>8} {secs:>8.2f} {fps:>12.0f} {items / secs:>9.1f}")
    # 3. prepare: re-encode the MSR-VTT-like clips, then decode and load before/after
    from nbretr.prepare import prepare
    prepared = Path(tmp.name) / "prepared"
    (prepared).mkdir()
    for f in raw.glob("*.csv"):
        (prepared / f.name).write_text(f.read_text())
    t0 = time.perf_counter()
    counts = prepare(raw / "videos", prepared / "videos", workers=args.workers, progress=False, log=lambda *a: None)
    prep_s = time.perf_counter() - t0
    assert counts["converted"] == n_msr and counts["failed"] == 0, counts
    prep_paths = sorted(str(p) for p in (prepared / "videos").glob("*.mp4"))
    size_raw = sum(Path(p).stat().st_size for p in raw_paths) / 2**20
    size_prep = sum(Path(p).stat().st_size for p in prep_paths) / 2**20
    rates["prepared 3fps 298x224"] = compare_decoders("prepared 3fps 298x224", prep_paths, backends, dec_lines, results)
    for label, folder in (("before (raw)", raw), ("after prepare", prepared)):
        ds = build_dataset("msrvtt", folder, "test", tok, image_size=224)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            secs, frames, items = epoch(ds, 0, args.batch)
        finally:
            torch.set_num_threads(threads)
        results.append(_runner.Result("msrvtt-like load 224", label, dict(clips=len(ds)), secs * 1e3, float("nan"),
                                      dict(frames_per_s=frames / secs, backend=backends[0])))
        prep_lines.append(f"{label:<16} {len(ds):>6} {secs:>8.2f} {frames / secs:>10.0f}")
    tmp.cleanup()
    print(f"## data loading; machine: {_runner.machine()}  torch {torch.__version__}  commit {_runner.git_commit()}")
    print(f"embedded dataset ({size}) ready in {build_s:.1f} s; {n_msr} MSR-VTT-like clips written in {gen_s:.1f} s")
    print("\n### decoders (12 frames per clip at 1 fps, in process)")
    print(f"{'clips':<26} {'decoder':<11} {'clips':>6} {'frames':>7} {'wall s':>8} {'frames/s':>10} "
          f"{'CPU s/1000f':>12}")
    print("\n".join(dec_lines))
    for name, r in rates.items():
        print(f"fastest on {name}: {' > '.join(sorted(r, key=r.get, reverse=True))}")
    print(f"\n### loading ({backends[0]}, the auto decoder)")
    print(f"{'case':<22} {'size':>5} {'clips':>6} {'workers':>8} {'epoch s':>8} {'frames/s':>12} {'clips/s':>9}")
    print("\n".join(lines))
    print(f"\n### prepare ({n_msr} MSR-VTT-like clips, {args.workers} workers): {prep_s:.1f} s; "
          f"{size_raw:.1f} MiB -> {size_prep:.1f} MiB")
    print(f"{'msrvtt-like, 224':<16} {'clips':>6} {'epoch s':>8} {'frames/s':>10}   (0 workers, {backends[0]})")
    print("\n".join(prep_lines))
    _runner.write_json(results, args.out, "data")
    return 0


if __name__ == "__main__":
    _runner.main_guard(main)
