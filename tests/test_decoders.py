"""The decoding backends (torchcodec, decord, PyAV) and their options: torchcodec decodes
the same frame indices and frames as decord for each sampling rule; ``--decoder`` /
``--decode-device`` errors; the message when FFmpeg's libraries are missing.

torchcodec's tests skip when torchcodec or FFmpeg's shared libraries are missing here, and
fail instead under ``NBRETR_REQUIRE_TORCHCODEC=1`` (as the CI command sets)."""
from __future__ import annotations

import logging
import os
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from nbretr.data import decoding
from nbretr.data.decoding import (DecoderUnavailable, VideoDecodeError, decode_frames, missing_ffmpeg_libraries,
                                  probe_video, resolve_decoder, sample_indices, torchcodec_status)


def need(backend: str) -> None:
    why = decoding.why_unavailable(backend)
    if not why:
        return
    if backend == "torchcodec" and os.environ.get("NBRETR_REQUIRE_TORCHCODEC", "0") == "1":
        pytest.fail(f"NBRETR_REQUIRE_TORCHCODEC=1 but {why}")
    pytest.skip(why)


def write_coded_video(path: Path, n: int, fps, h: int = 48, w: int = 64) -> None:
    """A libx264 .mp4 whose frame k shows the code ``(40 k) mod 250`` in its right half, so
    that a frame decoded at the wrong index differs by at least 10 grey levels there. ``fps``
    may be a Fraction (30000/1001)."""
    import av
    container = av.open(str(path), "w")
    stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
    stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
    stream.options = {"crf": "10", "g": "12"}
    yy, xx = np.mgrid[0:h, 0:w // 2]
    for k in range(n):
        img = np.zeros((h, w, 3), np.uint8)
        img[:, : w // 2] = np.stack([xx * 4 % 256, yy * 5 % 256, np.full_like(xx, 90)], -1)
        img[:, w // 2:] = (40 * k) % 250
        for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()


def frame_codes(frames: np.ndarray) -> list[int]:
    return [int(round(v)) for v in frames[:, :, frames.shape[2] // 2 + 4:].mean(axis=(1, 2, 3))]


CLIPS = [  # (frames, fps): 30 fps, NTSC 29.97 (the "first" rule truncates it to 29), 25, 2
    (95, 30), (95, Fraction(30000, 1001)), (80, 25), (30, 2),
]
RULES = [  # (sampling, framerate, max_frames, start, end)
    ("first", 1.0, 12, None, None), ("uniform", 1.0, 12, None, None), ("uniform", 1.0, 2, None, None),
    ("first", 2.0, 5, 1.0, 2.0), ("uniform", 3.0, 4, 0.5, 2.5), ("uniform", 0, 7, None, None),
]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    pytest.importorskip("av")
    root = tmp_path_factory.mktemp("clips")
    out = []
    for n, fps in CLIPS:
        p = root / f"clip_{n}_{float(fps):.2f}.mp4"
        write_coded_video(p, n, fps)
        out.append((p, n, fps))
    return out


@pytest.mark.parametrize("rule", RULES, ids=lambda r: f"{r[0]}-{r[1]}fps-{r[2]}-{r[3]}-{r[4]}")
def test_torchcodec_decodes_decords_indices_and_frames(clips, rule):
    need("torchcodec")
    need("decord")
    sampling, framerate, max_frames, start, end = rule
    for path, n, fps in clips:
        # the stream as each decoder reports it: the same length and header frame rate
        tc_n, tc_fps = probe_video(path, "torchcodec")
        dc_n, dc_fps = probe_video(path, "decord")
        assert tc_n == dc_n == n, path
        assert tc_fps == pytest.approx(dc_fps, abs=1e-6), path
        idx = sample_indices(tc_n, tc_fps, max_frames, framerate, start, end, sampling)
        assert idx.tolist() == sample_indices(dc_n, dc_fps, max_frames, framerate, start, end, sampling).tolist()
        a = decode_frames(path, max_frames, framerate, start, end, backend="torchcodec", sampling=sampling)
        b = decode_frames(path, max_frames, framerate, start, end, backend="decord", sampling=sampling)
        assert a.dtype == np.uint8 and a.shape == b.shape == (len(idx), 48, 64, 3), path
        # the frames at those indices: each frame's code names its index
        expect = [(40 * int(i)) % 250 for i in idx]
        assert np.abs(np.array(frame_codes(a)) - expect).max() <= 3, (path, frame_codes(a), expect)
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2, path


def test_all_three_decoders_agree_on_a_clip(clips):
    need("torchcodec")
    need("decord")
    need("pyav")
    path = clips[1][0]
    outs = {b: decode_frames(path, 12, 1.0, backend=b, sampling="first") for b in ("torchcodec", "decord", "pyav")}
    assert outs["torchcodec"].shape[0] == 4  # 95 frames at 29.97: seconds 0-3 at int(fps) = 29
    for b in ("decord", "pyav"):
        assert np.abs(outs["torchcodec"].astype(int) - outs[b].astype(int)).max() <= 2, b


def test_torchcodec_bad_files_are_decode_errors(tmp_path, clips):
    need("torchcodec")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(200))
    with pytest.raises(VideoDecodeError, match="undecodable video file .*bad.mp4: torchcodec"):
        decode_frames(bad, backend="torchcodec")
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(clips[0][0].read_bytes()[:400])
    with pytest.raises(VideoDecodeError, match="cut.mp4"):
        decode_frames(cut, backend="torchcodec")


def test_auto_takes_the_first_installed_in_the_measured_order(monkeypatch, caplog, clips):
    assert set(decoding.AUTO_ORDER) == set(decoding.DECODERS) and len(decoding.AUTO_ORDER) == 3
    installed = decoding.available_backends()
    if not installed:
        pytest.skip("no decoder installed")
    assert resolve_decoder("auto") == installed[0]
    assert installed == [b for b in decoding.AUTO_ORDER if b in installed]
    # the first one gone: the next one, and one INFO line saying why
    first, second = decoding.AUTO_ORDER[:2]
    need(first)
    need(second)
    if first == "torchcodec":
        monkeypatch.setattr(decoding, "_torchcodec_state", {"ok": False, "why": "torchcodec is not installed"})
    else:
        monkeypatch.setattr(decoding, f"_have_{'av' if first == 'pyav' else first}", lambda: False)
    monkeypatch.setattr(decoding, "_reported", set())
    assert resolve_decoder("auto") == second
    with caplog.at_level(logging.INFO, logger="nbretr.data"):
        for _ in range(2):
            decode_frames(clips[0][0], 12, 1.0)
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs.count(f"nbretr.data: {decoding.why_unavailable(first)}; decoding videos with {second}") == 1


# ------------------------------------------------------------------ options and their errors

def test_decode_device_cuda_errors_name_the_option(monkeypatch):
    if not torch.cuda.is_available():
        with pytest.raises(DecoderUnavailable, match="--decode-device cuda: CUDA is not available"):
            resolve_decoder("torchcodec", "cuda")
        with pytest.raises(DecoderUnavailable, match="--decode-device cuda"):
            resolve_decoder("auto", "cuda:0")
    # decord and PyAV decode on the CPU only, GPU or not
    for gpu in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda gpu=gpu: gpu)
        for backend in ("decord", "pyav"):
            with pytest.raises(DecoderUnavailable, match=f"--decode-device cuda: --decoder {backend} decodes on the "
                                                         "CPU only"):
                resolve_decoder(backend, "cuda")
    with pytest.raises(ValueError, match="--decode-device must be cpu or cuda"):
        resolve_decoder("auto", "tpu")
    with pytest.raises(ValueError, match="--decoder must be one of auto, torchcodec, decord, pyav"):
        resolve_decoder("opencv")


def test_decode_device_cuda_passed_to_torchcodec(monkeypatch, clips):
    """With a GPU (simulated here), ``device="cuda"`` reaches torchcodec's VideoDecoder."""
    need("torchcodec")
    import torchcodec.decoders as tcd
    seen = []
    real = tcd.VideoDecoder

    def spy(*a, **kw):
        seen.append(kw.get("device"))
        kw["device"] = "cpu"  # no GPU here: decode on the CPU after recording the request
        return real(*a, **kw)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(tcd, "VideoDecoder", spy)
    frames = decode_frames(clips[0][0], 12, 1.0, backend="auto", device="cuda")
    assert seen == ["cuda"] and frames.shape[0] == 4


def test_cli_reports_decoder_errors(tmp_path, capsys):
    from nbretr import train
    from nbretr.runtime import run_cli
    code = run_cli(train.main, "python -m nbretr.train", ["--decode-device", "cuda", "--decoder", "pyav",
                                                          "--print-config"])
    err = capsys.readouterr().err
    assert code == 2 and "error: --decode-device cuda: --decoder pyav decodes on the CPU only" in err
    if not torch.cuda.is_available():
        code = run_cli(train.main, "python -m nbretr.train", ["--decode-device", "cuda", "--print-config"])
        err = capsys.readouterr().err
        assert code == 2 and "--decode-device cuda: CUDA is not available" in err
    code = run_cli(train.main, "python -m nbretr.train", ["--decoder", "opencv", "--print-config"])
    assert code == 2 and "--decoder must be one of" in capsys.readouterr().err


def test_decoder_options_in_the_config(capsys):
    from nbretr import train
    assert train.main(["--decoder", "pyav", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "decoder: pyav" in out and "decode_device: cpu" in out


# ------------------------------------------------------------------ FFmpeg's shared libraries

def test_missing_ffmpeg_libraries_are_named():
    loaded = []

    def fake(name):
        loaded.append(name)
        if name.startswith(("libavcodec.", "libswscale.")):
            raise OSError(f"{name}: cannot open shared object file")
        return object()

    assert missing_ffmpeg_libraries(load=fake) == ["libavcodec", "libswscale"]
    assert "libavcodec.so.59" in loaded and "libavutil.so.56" in loaded


def test_torchcodec_without_ffmpeg_says_what_to_install(monkeypatch):
    pytest.importorskip("torchcodec")
    monkeypatch.setattr(decoding, "_torchcodec_state", {})
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)  # the import fails, as without FFmpeg
    monkeypatch.setattr(decoding, "missing_ffmpeg_libraries", lambda: ["libavcodec", "libavformat"])
    ok, why = torchcodec_status()
    assert not ok
    assert "libavcodec, libavformat not found" in why and "apt-get install -y libavcodec59" in why
    with pytest.raises(DecoderUnavailable, match="--decoder torchcodec: torchcodec cannot load FFmpeg's shared "
                                                 "libraries: libavcodec, libavformat"):
        resolve_decoder("torchcodec")
    if decoding._have_decord() or decoding._have_av():
        assert resolve_decoder("auto") in ("decord", "pyav")  # auto goes on without it


def test_ffmpeg_libraries_present_when_torchcodec_is_required():
    """CI installs FFmpeg's libraries (the README's test command): torchcodec must load."""
    if os.environ.get("NBRETR_REQUIRE_TORCHCODEC", "0") != "1":
        pytest.skip("only under NBRETR_REQUIRE_TORCHCODEC=1")
    ok, why = torchcodec_status()
    assert ok, why
    assert missing_ffmpeg_libraries() == []
