"""The public datasets as users download them (issue 24): tiny annotation files in each
dataset's published format, written here, with small decodable videos in the layouts the
downloads produce (DiDeMo ``X.mov.mp4`` / ``X.mov`` / ``.wmv``, split subfolders,
``YouTubeClips/``), missing and repeated videos, and the released loaders' orders and
DiDeMo time window."""
from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from nbretr.data import MissingVideosError, build_dataset, sample_indices, synthetic
from nbretr.data.decoding import CLIP_MEAN, CLIP_STD


@pytest.fixture(autouse=True)
def _own_tempdir(tmp_path, monkeypatch):
    """Missing-video lists written to the default place (the temp folder) stay in tmp_path."""
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


@pytest.fixture(scope="module")
def tok():
    return synthetic.word_tokenizer()


def _write(path: Path, seconds: int = 4, fps: int = 1) -> None:
    """A decodable H.264 clip at ``path`` (whatever its extension) whose frame k is grey at
    level 5 * k, so that a decoded frame tells which one it is."""
    tmp = path.with_name(path.name + ".tmp-writing.mp4")
    frames = np.zeros((seconds * fps, 16, 16, 3), np.uint8)
    for k in range(len(frames)):
        frames[k] = 5 * k
    path.parent.mkdir(parents=True, exist_ok=True)
    synthetic.write_mp4(tmp, frames, fps=fps)
    tmp.rename(path)


def _grey_levels(video: torch.Tensor, mask: torch.Tensor) -> list[int]:
    """The grey level of each real frame of a CLIP-normalised item video."""
    std, mean = torch.tensor(CLIP_STD).view(1, 3, 1, 1), torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    px = (video[mask.bool()] * std + mean) * 255
    return [int(round(v)) for v in px.mean(dim=(1, 2, 3)).tolist()]


# ---------------------------------------------------------------- DiDeMo

DIDEMO_IDS = ["10015567@N08_3655084291_d8b58466fa.mov", "27233056@N04_3950573208_4e7d1a3c7a.mp4",
              "95427876@N00_2490196431_d2a1d3d9a6.wmv"]


def _didemo(root: Path, split: str, ids: list[str], list_ids: list[str] | None = None) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{split}_list.txt").write_text("".join(f"{v}\n" for v in (list_ids or ids)))
    items = []
    for k, v in enumerate(ids):  # two moments a video, interleaved as in the released JSON
        items.append({"video": v, "description": f"moment one of {k}", "times": [[0, 0], [0, 1]]})
    for k, v in enumerate(ids):
        items.append({"video": v, "description": f"moment two of {k}", "times": [[2, 3]]})
    (root / f"{split}_data.json").write_text(json.dumps(items))


@pytest.mark.parametrize("layout", ["X.mov.mp4", "X.mov", "X"])
def test_didemo_finds_files_as_downloaded(tmp_path, tok, layout):
    root = tmp_path / "didemo"
    # the list repeats an id (added once) and is in another order than the JSON (JSON wins)
    _didemo(root, "test", DIDEMO_IDS, list_ids=[DIDEMO_IDS[2], DIDEMO_IDS[0], DIDEMO_IDS[2], DIDEMO_IDS[1]])
    for k, v in enumerate(DIDEMO_IDS):
        name = {"X.mov.mp4": v + ".mp4", "X.mov": v, "X": v.rsplit(".", 1)[0] + ".mp4"}[layout]
        _write(root / "videos" / ("part1" if k else "part0") / name)  # in subfolders
    ds = build_dataset("didemo", root, "test", tok, image_size=16)
    assert ds.video_ids == DIDEMO_IDS and ds.missing_videos == []
    assert ds.captions == [f"moment one of {k} moment two of {k}" for k in range(3)]
    assert ds.repeated_ids == [DIDEMO_IDS[2]]
    assert not any(ds[i]["bad"] for i in range(len(ds)))


def test_didemo_window_follows_the_reference(tmp_path, tok):
    root = tmp_path / "didemo"
    _didemo(root, "test", DIDEMO_IDS[:1])
    _write(root / "videos" / (DIDEMO_IDS[0] + ".mp4"), seconds=40)  # 40 s at 1 fps: frame k = second k
    ds = build_dataset("didemo", root, "test", tok, image_size=16)
    item = ds[0]
    # the released loader: seconds 0..31 (both included), 12 picked uniformly
    assert _grey_levels(item["video"], item["video_mask"]) == pytest.approx(
        [5 * s for s in (0, 2, 5, 8, 11, 14, 16, 19, 22, 25, 28, 31)], abs=3)
    whole = build_dataset("didemo", root, "test", tok, image_size=16, didemo_window=None)[0]
    assert _grey_levels(whole["video"], whole["video_mask"]) == pytest.approx(
        [5 * s for s in np.linspace(0, 39, 12).astype(int)], abs=3)
    # a clip shorter than the window is sampled whole
    short = sample_indices(20, 1.0, 12, 1.0, ds.videos[0].start, ds.videos[0].end)
    assert short.tolist() == np.arange(20)[np.linspace(0, 19, 12).astype(int)].tolist()
    with pytest.raises(ValueError, match="didemo_window"):
        build_dataset("didemo", root, "test", tok, didemo_window=(5, 2))


# ---------------------------------------------------------------- ActivityNet, MSVD: subfolders

def test_activitynet_split_subfolders(tmp_path, tok):
    root = tmp_path / "anet"
    ann = {f"v_{k}": {"duration": 4.0, "timestamps": [[0, 2], [2, 4]], "sentences": [f"A {k}.", f"B {k}."]}
           for k in "abcd"}
    (root).mkdir()
    (root / "train.json").write_text(json.dumps({k: ann[k] for k in ("v_a", "v_b")}))
    (root / "val_1.json").write_text(json.dumps({k: ann[k] for k in ("v_c", "v_d")}))
    (root / "train_ids.json").write_text(json.dumps(["v_b", "v_a", "v_b"]))  # a repeat: once
    (root / "val_ids.json").write_text(json.dumps(["v_d", "v_c"]))
    _write(root / "videos" / "train" / "v_a.mp4")
    _write(root / "videos" / "train" / "v_b.mkv")
    _write(root / "videos" / "val" / "v_c.webm")
    _write(root / "videos" / "val" / "d.mp4")  # without the v_ prefix
    tr = build_dataset("activitynet", root, "train", tok, image_size=16)
    assert tr.video_ids == ["v_b", "v_a"] and tr.captions == ["A b. B b.", "A a. B a."]
    assert tr.repeated_ids == ["v_b"]
    te = build_dataset("activitynet", root, "test", tok, image_size=16)
    assert te.video_ids == ["v_d", "v_c"] and te.missing_videos == []
    assert [p.name for p in (v.path for v in te.videos)] == ["d.mp4", "v_c.webm"]
    assert te[1]["video_mask"].sum() == 4


def test_msvd_youtubeclips_and_video_dir(tmp_path, tok):
    root = tmp_path / "msvd"
    ids = ["-4wsuPCjDBc_5_15", "bQJQGoJF7_k_162_169", "zv2RIbUsnSw_335_341"]
    raw = {v: [["a", "clip", str(k)], ["another", "caption", str(k)]] for k, v in enumerate(ids)}
    root.mkdir()
    (root / "raw-captions.pkl").write_bytes(pickle.dumps(raw))
    for split in ("train", "val", "test"):
        (root / f"{split}_list.txt").write_text("\n".join(ids) + "\n")
    for v in ids:
        _write(root / "videos" / "YouTubeClips" / f"{v}.avi")
    te = build_dataset("msvd", root, "test", tok, image_size=16)
    assert te.video_ids == ids and len(te) == 6 and te.caption_to_video.tolist() == [0, 0, 1, 1, 2, 2]
    assert te.video_folder == root / "videos" and te.missing_videos == []
    # the videos elsewhere than the annotations: video_dir (absolute, or relative to root)
    (root / "videos").rename(tmp_path / "elsewhere")
    for vd in (tmp_path / "elsewhere", "../elsewhere/YouTubeClips"):
        ds = build_dataset("msvd", root, "test", tok, image_size=16, video_dir=vd)
        assert ds.missing_videos == [] and not ds[0]["bad"]
    with pytest.raises(FileNotFoundError, match="video_dir"):
        build_dataset("msvd", root, "test", tok, video_dir="nope")


def test_msvd_repeated_list_id(tmp_path, tok):
    root = tmp_path / "msvd"
    root.mkdir()
    (root / "raw-captions.pkl").write_bytes(pickle.dumps({"a": [["x"]], "b": [["y"], ["z"]]}))
    (root / "test_list.txt").write_text("a\nb\na\n")
    _write(root / "a.mp4")
    _write(root / "b.avi")
    ds = build_dataset("msvd", root, "test", tok)
    assert ds.video_ids == ["a", "b"] and ds.captions == ["x", "y", "z"]
    # the released MSVD loader iterates its list as written: a repeat is added again
    rep = build_dataset("msvd", root, "test", tok, repeated_ids="repeat")
    assert rep.video_ids == ["a", "b", "a"] and rep.captions == ["x", "y", "z", "x"]


# ---------------------------------------------------------------- MSR-VTT: order, missing videos

def _msrvtt(root: Path, n_test: int = 2, have: set[int] | None = None, empty_files: bool = False) -> None:
    root.mkdir(parents=True, exist_ok=True)
    sents = [{"video_id": f"video{v}", "caption": f"caption {j} of {v}", "sen_id": 10 * v + j}
             for j in range(2) for v in (1, 0, 2)]  # JSON order: interleaved by sentence
    (root / "MSRVTT_data.json").write_text(json.dumps({"info": {}, "videos": [], "sentences": sents}))
    (root / "MSRVTT_train.9k.csv").write_text("video_id\nvideo2\nvideo0\nvideo1\nvideo0\n")
    rows = [f"ret{k},msr{7000 + k},video{7000 + k},sentence {k}" for k in range(n_test)]
    (root / "MSRVTT_JSFUSION_test.csv").write_text("key,vid_key,video_id,sentence\n" + "\n".join(rows) + "\n")
    for v in list(range(3)) + [7000 + k for k in range(n_test)]:
        if have is None or v in have:
            p = root / "videos" / f"video{v}.mp4"
            if empty_files:  # construction does not decode: names are enough
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(b"")
            else:
                _write(p, seconds=2)


def test_msrvtt_train_pairs_in_json_order(tmp_path, tok):
    root = tmp_path / "msrvtt"
    _msrvtt(root)
    tr = build_dataset("msrvtt", root, "train", tok, image_size=16)
    # the released loader walks MSRVTT_data.json's sentences and keeps the listed videos
    assert tr.captions == [f"caption {j} of {v}" for j in range(2) for v in (1, 0, 2)]
    assert tr.video_ids == ["video1", "video0", "video2"]
    assert tr.caption_to_video.tolist() == [0, 1, 2, 0, 1, 2]
    assert tr.repeated_ids == ["video0"]


def test_missing_test_video_keeps_the_test_set_whole(tmp_path, tok, caplog):
    root = tmp_path / "msrvtt"
    _msrvtt(root, n_test=2, have={0, 1, 2, 7000})
    with pytest.raises(MissingVideosError) as err:  # 1 of 2 (50%) missing: refused
        build_dataset("msrvtt", root, "test", tok)
    msg = str(err.value)
    assert str(root / "videos") in msg and "<video_id>.mp4" in msg and "video7001" in msg
    assert "--allow-missing" in msg and "--video-dir" in msg
    listed = tmp_path / "missing.txt"
    with caplog.at_level(logging.WARNING, logger="nbretr.data"):
        ds = build_dataset("msrvtt", root, "test", tok, image_size=16, allow_missing=True, missing_list=listed)
        items = [ds[i] for i in range(len(ds))]
    assert len(ds) == 2 and ds.video_ids == ["video7000", "video7001"]  # nothing dropped
    assert ds.missing_videos == ["video7001"] and listed.read_text() == "video7001\n"
    assert [it["bad"] for it in items] == [False, True] and items[1]["video_mask"].sum() == 0
    assert items[1]["video"].abs().sum() == 0  # black frames, as the released MSR-VTT loader
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "1 of 2 videos" in warnings[0] and str(listed) in warnings[0]
    assert ds.bad_summary()["by_reason"] == {"missing": 1}


def test_missing_share_threshold_and_train_split(tmp_path, tok, caplog):
    root = tmp_path / "msrvtt"
    _msrvtt(root, n_test=101, have=set(range(3)) | {7000 + k for k in range(100)}, empty_files=True)
    with caplog.at_level(logging.INFO, logger="nbretr.data"):
        ds = build_dataset("msrvtt", root, "test", tok, missing_list=tmp_path / "m.txt")  # 1 of 101: < 1%
    assert len(ds) == 101 and ds.missing_videos == ["video7100"]
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1 and "1 of 101 videos (0.99%) not found" in warned[0]
    (root / "videos" / "video7099.mp4").unlink()  # 2 of 101: over 1%
    with pytest.raises(MissingVideosError, match=r"2 of 101 videos \(2.0%\).*video7099, video7100"):
        build_dataset("msrvtt", root, "test", tok)
    assert len(build_dataset("msrvtt", root, "test", tok, max_missing=0.05)) == 101
    # train drops a missing video's captions (the released DiDeMo/ActivityNet loaders do too)
    (root / "videos" / "video1.mp4").unlink()
    tr = build_dataset("msrvtt", root, "train", tok, allow_missing=True)
    assert tr.video_ids == ["video0", "video2"] and len(tr) == 4 and tr.missing_videos == ["video1"]
    kept = build_dataset("msrvtt", root, "train", tok, allow_missing=True, keep_missing=True)
    assert kept.video_ids == ["video1", "video0", "video2"] and len(kept) == 6


def test_no_video_found_is_an_error_even_when_allowed(tmp_path, tok):
    root = tmp_path / "didemo"
    _didemo(root, "test", DIDEMO_IDS)
    (root / "videos").mkdir()
    (root / "videos" / "unrelated.mp4").write_bytes(b"")
    with pytest.raises(MissingVideosError, match=r"none of the 3 videos found under .*videos \(searched "
                                                 r"recursively for <video> or <video>.mp4.*10015567@N08"):
        build_dataset("didemo", root, "test", tok, allow_missing=True)


def test_folder_indexed_once_per_construction(tmp_path, tok, monkeypatch):
    from nbretr.data import _layout
    root = tmp_path / "msrvtt"
    _msrvtt(root, n_test=20, empty_files=True)
    calls = []
    monkeypatch.setattr(_layout.os, "walk", _counting(_layout.os.walk, calls))
    ds = build_dataset("msrvtt", root, "test", tok)
    walked = [c for c in calls if Path(c) == root / "videos"]
    assert len(ds) == 20 and len(walked) <= 2  # the index (and the has-files probe), not one per video


def _counting(fn, calls):
    def wrapper(top, *a, **k):
        calls.append(top)
        return fn(top, *a, **k)
    return wrapper


def test_train_cli_options_reach_the_dataset(tmp_path, tok):
    from nbretr.config import build_parser, resolve_config
    from nbretr.builders import build_split
    root = tmp_path / "msrvtt"
    _msrvtt(root, n_test=2, have={0, 1, 2, 7000})
    (root / "videos").rename(tmp_path / "vids")
    args = build_parser("t").parse_args(["--dataset", "msrvtt", "--data-root", str(root), "--video-dir",
                                         str(tmp_path / "vids"), "--allow-missing"])
    cfg = resolve_config(args)
    ds = build_split(cfg, "test", tok)
    assert ds.video_folder == tmp_path / "vids" and ds.missing_videos == ["video7001"] and len(ds) == 2


def test_evaluation_counts_and_reports_missing_test_videos(tmp_path, tok):
    """A missing test video stays a query's target (the test set is whole) and the report
    says how many are missing next to the metrics."""
    from nbretr.config import TrainConfig
    from nbretr.eval import evaluate, format_report
    from nbretr.models import NeighborRetr
    root = tmp_path / "msrvtt"
    _msrvtt(root, n_test=3, have={0, 1, 2, 7000, 7002})
    ds = build_dataset("msrvtt", root, "test", tok, image_size=16, allow_missing=True, max_frames=2,
                       max_words=8, missing_list=tmp_path / "m.txt")
    cfg = TrainConfig(dataset="msrvtt", num_workers=0, max_words=8, max_frames=2)
    torch.manual_seed(0)
    model = NeighborRetr(cfg.model_config(vocab_size=tok.vocab_size, image_size=16, patch_size=8,
                                          temporal_layers=1))
    m = evaluate(model, ds, cfg, k=2)
    assert m["missing_videos"] == 1 and m["t2v"]["num_queries"] == 3 and m["t2v"]["num_gallery"] == 3
    assert "missing videos: 1 of the test split's videos were not found" in format_report(m)
