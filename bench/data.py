"""Data-loading throughput: frames per second decoded (decord) and CLIP-preprocessed
through a DataLoader with 0 workers (in process, 1 torch thread) and 2 workers, over the embedded dataset's train split
(1,500 clips of 24 frames at 32x32, 12 frames sampled each) at output size 32 and, on
512 of the clips, 224,
and over a few MSR-VTT-like clips (320x240, 30 fps, 12 s; 12 frames at 1 fps, 224x224).
Correctness first: every item has its full frame mask and no bad video.
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
    results, lines = [], []
    cases = [("synthetic train", root, "synthetic", 32), ("synthetic train", root, "synthetic", 224)]
    tmp = None
    if not args.quick:
        tmp = tempfile.TemporaryDirectory()
        cases.append(("msrvtt-like 320x240", msrvtt_like(Path(tmp.name), 32), "msrvtt", 224))
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
    if tmp is not None:
        tmp.cleanup()
    print(f"## data loading ({backends[0]}); machine: {_runner.machine()}  torch {torch.__version__}  "
          f"commit {_runner.git_commit()}")
    print(f"embedded dataset ({size}) ready in {build_s:.1f} s")
    print(f"{'case':<22} {'size':>5} {'clips':>6} {'workers':>8} {'epoch s':>8} {'frames/s':>12} {'clips/s':>9}")
    print("\n".join(lines))
    _runner.write_json(results, args.out, "data")
    return 0


if __name__ == "__main__":
    _runner.main_guard(main)
