"""python -m nbretr.prepare: re-encoding at the released preprocessing's defaults (3 fps,
shorter side 224, even sides, video only), the folder layout kept, unreadable inputs
listed and counted, resuming (finished outputs verified and skipped, broken ones redone),
and errors that name the bad path."""
from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")
pytest.importorskip("imageio_ffmpeg")

from nbretr import prepare as P  # noqa: E402
from nbretr.data import decode_frames  # noqa: E402
from nbretr.runtime import run_cli  # noqa: E402


def write_clip(path: Path, seconds: float, fps: int = 30, w: int = 80, h: int = 60, audio: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264", rate=fps)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        if audio:
            aus = c.add_stream("aac", rate=16000)
        for k in range(int(seconds * fps)):
            img = np.full((h, w, 3), min(2 * k, 255), np.uint8)  # frame k (<= 4 s) shows 2k
            for p in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        c.mux(vs.encode())
        if audio:
            samples = np.zeros((1, int(16000 * seconds)), np.float32)
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate = 16000
            frame.time_base = Fraction(1, 16000)
            frame.pts = 0
            for p in aus.encode(frame):
                c.mux(p)
            c.mux(aus.encode())


def stream_info(path: Path) -> tuple[int, int, float, int, int]:
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        return s.width, s.height, float(s.average_rate), len(c.streams.audio), sum(1 for _ in c.decode(s))


@pytest.fixture
def dataset(tmp_path) -> Path:
    root = tmp_path / "raw"
    write_clip(root / "videos" / "all" / "video0.mp4", 4, audio=True)
    write_clip(root / "videos" / "all" / "video1.mp4", 2)
    write_clip(root / "videos" / "sub" / "deep" / "tall.mp4", 1, w=60, h=90)
    write_clip(root / "videos" / "clip.avi", 1)
    (root / "videos" / "all" / "broken.mp4").write_text("not a video\n")
    (root / "videos" / "all" / "MSRVTT_data.json").write_text("{}")
    return root


def test_prepare_defaults_layout_and_unreadable_inputs(dataset, tmp_path):
    out = tmp_path / "prepared"
    counts = P.prepare(dataset, out, workers=2, progress=False, log=lambda *a: None)
    assert counts["videos"] == 5 and counts["converted"] == 4 and counts["failed"] == 1
    assert counts["other_files"] == 1  # the JSON file is left out
    for rel in ("videos/all/video0.mp4", "videos/all/video1.mp4", "videos/sub/deep/tall.mp4", "videos/clip.avi"):
        assert (out / rel).is_file(), rel  # the layout below VIDEO_DIR is kept, names too
    # 3 fps, shorter side 224, even sides, aspect kept, no audio
    w, h, fps, audio, n = stream_info(out / "videos/all/video0.mp4")
    assert (w, h, fps, audio) == (298, 224, 3.0, 0)
    assert 12 <= n <= 14  # 4 s at 3 fps (FFmpeg's -r may repeat the last frame)
    w, h, fps, _, _ = stream_info(out / "videos/sub/deep/tall.mp4")
    assert (w, h, fps) == (224, 336, 3.0) and w % 2 == 0 and h % 2 == 0
    assert stream_info(out / "videos/clip.avi")[:3] == (298, 224, 3.0)
    # the unreadable input: listed with its reason, counted, and nothing written for it
    listed = (out / P.FAILED_LIST).read_text().splitlines()
    assert len(listed) == 1 and listed[0].startswith("videos/all/broken.mp4\t") and "ffmpeg" in listed[0]
    assert not (out / "videos/all/broken.mp4").exists()
    assert not list(out.rglob(f"*{P.PARTIAL_TAG}*"))
    # the loaders decode the prepared copy: 1-fps sampling of the 4 s clip, frames at 0, 1, 2, 3 s
    # (and a fifth when -r repeated frames past 4 s)
    frames = decode_frames(out / "videos/all/video0.mp4", 12, 1.0, backend="pyav")
    assert frames.shape[0] in (4, 5) and frames.shape[1:3] == (224, 298)
    # FFmpeg's -r (the released command) delays the content by up to 0.4 s: within half a second
    source_frame = frames[:4].mean(axis=(1, 2, 3)) / 2
    assert np.abs(source_frame - 30 * np.arange(4)).max() <= 15, source_frame


def test_prepare_resumes_and_redoes_broken_outputs(dataset, tmp_path):
    out = tmp_path / "prepared"
    P.prepare(dataset, out, workers=2, progress=False, log=lambda *a: None)
    good = out / "videos/all/video1.mp4"
    stamp = good.stat().st_mtime_ns
    # a second run: everything finished is verified and skipped
    counts = P.prepare(dataset, out, workers=2, progress=False, log=lambda *a: None)
    assert (counts["converted"], counts["skipped"], counts["failed"]) == (0, 4, 1)
    assert good.stat().st_mtime_ns == stamp
    # a cut-short output (say, another tool killed mid-write) is redone; a stale partial is removed
    cut = out / "videos/all/video0.mp4"
    cut.write_bytes(cut.read_bytes()[:600])
    stale = P.partial_name(out / "videos/clip.avi")
    stale.write_bytes(b"half")
    (out / "videos/sub/deep/tall.mp4").unlink()
    counts = P.prepare(dataset, out, workers=1, progress=False, log=lambda *a: None)
    assert (counts["converted"], counts["redone"], counts["skipped"]) == (2, 1, 2)
    assert stream_info(cut)[:3] == (298, 224, 3.0) and not stale.exists()
    assert good.stat().st_mtime_ns == stamp
    # the broken input fixed: it is converted and the failure list goes away
    write_clip(dataset / "videos/all/broken.mp4", 1)
    counts = P.prepare(dataset, out, progress=False, log=lambda *a: None)
    assert (counts["converted"], counts["failed"]) == (1, 0) and not (out / P.FAILED_LIST).exists()


def test_prepare_command_line_and_errors(dataset, tmp_path, capsys):
    out = tmp_path / "o"
    assert run_cli(P.main, "python -m nbretr.prepare",
                   [str(dataset), str(out), "--fps", "2", "--short-side", "64", "--workers", "2", "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert "4 re-encoded, 0 already done, 1 unreadable" in said and P.FAILED_LIST in said
    assert stream_info(out / "videos/all/video1.mp4")[:3] == (84, 64, 2.0)

    def error(argv, *expect):
        code = run_cli(P.main, "python -m nbretr.prepare", [str(a) for a in argv] + ["--no-progress"])
        err = capsys.readouterr().err
        assert code == 2, err
        for e in expect:
            assert e in err, err

    error([tmp_path / "nope", tmp_path / "x"], f"VIDEO_DIR {tmp_path / 'nope'}: no such folder")
    error([dataset, dataset / "videos" / "prep"], f"OUT_DIR {dataset / 'videos' / 'prep'} is inside VIDEO_DIR")
    error([dataset, dataset], "is VIDEO_DIR itself")
    (tmp_path / "file").write_text("x")
    error([dataset, tmp_path / "file"], f"OUT_DIR {tmp_path / 'file'} is a file")
    error([dataset, tmp_path / "o2", "--short-side", "225"], "--short-side must be an even number")
    error([dataset, tmp_path / "o2", "--ffmpeg", tmp_path / "no-ffmpeg"], f"--ffmpeg {tmp_path / 'no-ffmpeg'}")
    (tmp_path / "empty").mkdir()
    error([tmp_path / "empty", tmp_path / "o3"], f"VIDEO_DIR {tmp_path / 'empty'}: no video files found")
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()
