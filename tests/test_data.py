"""nbretr.data: sampling, decoding backends, preprocessing, tokenizers, the embedded
dataset, each standard layout on a miniature copy written here, and bad data."""
from __future__ import annotations

import collections
import gzip
import json
import logging
import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from nbretr.data import (AnnotationError, VideoDecodeError, build_dataset, collate, decode_frames, log_bad_summary,
                         sample_indices)
from nbretr.data import synthetic
from nbretr.data.decoding import CLIP_MEAN, CLIP_STD, Preprocess, available_backends
from nbretr.data.tokenizers import WordTokenizer, clip_tokenizer_from_bpe, load_clip_tokenizer

BACKENDS = available_backends()


def write_video(path: Path, n: int = 10, fps: float = 2, h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    """A real libx264 .mp4 whose frame k has mean brightness growing with k."""
    rng = np.random.default_rng(seed)
    frames = np.zeros((n, h, w, 3), np.uint8)
    for k in range(n):
        frames[k] = 10 + 20 * k
        frames[k, :, : w // 4] = rng.integers(0, 255, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    synthetic.write_mp4(path, frames, fps=fps)
    return frames


@pytest.fixture(autouse=True)
def _own_tempdir(tmp_path, monkeypatch):
    """Missing-video lists written to the default place (the temp folder) stay in tmp_path."""
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    return synthetic.build(tmp_path_factory.mktemp("synthetic"), "small", seed=0, progress=False)


@pytest.fixture(scope="module")
def word_tok():
    return synthetic.word_tokenizer()


# ---------------------------------------------------------------- sampling and decoding

def test_sample_indices_framerate_and_uniform_pick():
    # 30 s at 30 fps, 1 fps -> 30 candidates (one per second) -> 12 picked uniformly
    idx = sample_indices(900, 30.0, 12, 1.0)
    cand = np.arange(0, 900, 30)
    assert idx.tolist() == cand[np.linspace(0, 29, 12).astype(int)].tolist()
    assert idx[0] == 0 and idx[-1] == 870
    # fewer candidates than max_frames: all of them
    assert sample_indices(100, 25.0, 12, 1.0).tolist() == [0, 25, 50, 75]
    # start/end seconds
    assert sample_indices(300, 10.0, 64, 1.0, start=5, end=9).tolist() == [50, 60, 70, 80]
    # a clip shorter than one period still gives its first frame; empty clip gives none
    assert sample_indices(3, 30.0, 12, 1.0).tolist() == [0]
    assert sample_indices(0, 30.0, 12).tolist() == []
    # framerate <= 0: every frame, then uniform pick
    assert len(sample_indices(50, 10.0, 12, 0)) == 12
    with pytest.raises(ValueError, match="max_frames"):
        sample_indices(10, 10.0, 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_samples_the_right_frames(tmp_path, backend):
    frames = write_video(tmp_path / "v.mp4", n=10, fps=2)  # 5 s at 2 fps
    got = decode_frames(tmp_path / "v.mp4", max_frames=12, framerate=1.0, backend=backend)
    assert got.shape == (5, 48, 64, 3) and got.dtype == np.uint8
    # frames 0, 2, 4, 6, 8: brightness of the uniform part identifies the frame
    np.testing.assert_allclose(got[:, :, 32:].mean(axis=(1, 2, 3)), frames[::2, :, 32:].mean(axis=(1, 2, 3)), atol=3)
    got = decode_frames(tmp_path / "v.mp4", max_frames=2, framerate=2.0, start=1.0, end=4.0, backend=backend)
    np.testing.assert_allclose(got[:, 0, 40].mean(axis=-1), [frames[2, 0, 40, 0], frames[7, 0, 40, 0]], atol=3)


def test_backends_agree(tmp_path):
    if len(BACKENDS) < 2:
        pytest.skip("needs both decord and av")
    write_video(tmp_path / "v.mp4", n=12, fps=4)
    a = decode_frames(tmp_path / "v.mp4", 6, 2.0, backend="decord")
    b = decode_frames(tmp_path / "v.mp4", 6, 2.0, backend="pyav")
    assert a.shape == b.shape
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 2


def test_backend_choice_reported_once(tmp_path, monkeypatch, caplog):
    from nbretr.data import decoding
    if "pyav" not in BACKENDS:
        pytest.skip("needs av")
    write_video(tmp_path / "v.mp4")
    monkeypatch.setattr(decoding, "_have_decord", lambda: False)  # as if decord were not installed
    monkeypatch.setattr(decoding, "_torchcodec_state", {"ok": False, "why": "torchcodec is not installed"})
    monkeypatch.setattr(decoding, "_reported", set())
    with caplog.at_level(logging.INFO, logger="nbretr.data"):
        for _ in range(3):
            assert decode_frames(tmp_path / "v.mp4", 12, 1.0).shape[0] == 5
    before = decoding.AUTO_ORDER[:decoding.AUTO_ORDER.index("pyav")]
    why = "; ".join(decoding.why_unavailable(b) for b in before)
    assert [r.getMessage() for r in caplog.records].count(f"nbretr.data: {why}; decoding videos with pyav") == 1


def test_pyav_fallback_for_files_decord_cannot_open(tmp_path, monkeypatch, caplog):
    from nbretr.data import decoding
    if len(BACKENDS) < 2:
        pytest.skip("needs both decord and av")
    write_video(tmp_path / "v.mp4")

    def refuse(path, *a, **kw):
        raise VideoDecodeError(path, "undecodable", "decord: simulated failure")

    # auto's first choice (torchcodec, else decord) and decord both refuse the file
    monkeypatch.setattr(decoding, "_decode_decord", refuse)
    monkeypatch.setattr(decoding, "_decode_torchcodec", refuse)
    monkeypatch.setattr(decoding, "_reported", set())
    with caplog.at_level(logging.INFO, logger="nbretr.data"):
        for _ in range(2):
            assert decode_frames(tmp_path / "v.mp4", 12, 1.0).shape == (5, 48, 64, 3)
    assert sum("PyAV could" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(VideoDecodeError, match="simulated failure"):
        decode_frames(tmp_path / "v.mp4", backend="decord")


def test_preprocess_resize_crop_normalise():
    frames = np.full((3, 48, 64, 3), 255, np.uint8)
    out = Preprocess(image_size=32)(frames)
    assert out.shape == (3, 3, 32, 32) and out.dtype == torch.float32
    expect = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(out[0, :, 5, 5], expect, atol=1e-4, rtol=1e-4)
    # centre crop of the wider side: a left border stripe is cut away
    frames = np.full((3, 48, 96, 3), 255, np.uint8)
    frames[:, :, :8] = 0
    out = Preprocess(image_size=32)(frames)
    torch.testing.assert_close(out[0, :, 16, 0], expect, atol=1e-3, rtol=1e-3)
    # the resize matches CLIP's PIL bicubic resize within 2 grey levels
    from PIL import Image
    rnd = np.random.default_rng(0).integers(0, 255, (2, 40, 30, 3), dtype=np.uint8)
    std, mean = torch.tensor(CLIP_STD).view(1, 3, 1, 1), torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    out = Preprocess(image_size=20)(rnd) * std + mean
    pil = np.stack([np.asarray(Image.fromarray(f).resize((20, 27), Image.BICUBIC))[3:23] for f in rnd])
    assert np.abs(out.permute(0, 2, 3, 1).numpy() * 255 - pil).max() <= 2.01
    aug = Preprocess(image_size=32, augment=True)(frames, torch.Generator().manual_seed(0))
    assert aug.shape == (3, 3, 32, 32) and torch.isfinite(aug).all()


# ---------------------------------------------------------------- tokenizers

def test_word_tokenizer(tmp_path):
    tok = WordTokenizer.from_captions(["a red square", "a blue square moving left", "a red circle"])
    assert tok.itos[:4] == list(WordTokenizer.SPECIALS) and tok.itos[4] == "a" and tok.vocab_size == 11
    ids, mask = tok(["a red square", "zzz"], max_words=5)
    assert ids.dtype == torch.long and ids.shape == (2, 5)
    assert ids[0].tolist() == [1, tok.stoi["a"], tok.stoi["red"], tok.stoi["square"], 2]
    assert ids[1].tolist() == [1, 3, 2, 0, 0] and mask[1].tolist() == [1, 1, 1, 0, 0]
    ids, _ = tok("a blue square moving left", max_words=4)  # truncation keeps start and end
    assert ids[0].tolist() == [1, tok.stoi["a"], tok.stoi["blue"], 2]
    tok.save(tmp_path / "tok.json")
    assert WordTokenizer.load(tmp_path / "tok.json").itos == tok.itos


def _fake_bpe(path: Path) -> None:
    merges = ["#version: 0.2", "t h", "th e</w>", "r e", "re d</w>", "s q", "sq u", "squ a", "squa r", "squar e</w>"]
    with gzip.open(path, "wt") as f:
        f.write("\n".join(merges) + "\n")


def test_clip_tokenizer_from_bpe_and_hf_dir(tmp_path):
    _fake_bpe(tmp_path / "bpe_simple_vocab_16e6.txt.gz")
    hf = clip_tokenizer_from_bpe(tmp_path / "bpe_simple_vocab_16e6.txt.gz")
    assert hf.convert_tokens_to_ids("<|startoftext|>") == 512 + 9 and hf.convert_tokens_to_ids("the</w>") == 513
    for src in (tmp_path / "bpe_simple_vocab_16e6.txt.gz", tmp_path / "ViT-B-32.pt"):
        if src.suffix == ".pt":
            src.write_bytes(b"not read")  # the BPE file next to an OpenAI archive is used
        tok = load_clip_tokenizer(src)
        ids, mask = tok(["The red square", "the"], max_words=6)
        assert ids[0].tolist() == [tok.start_id, 513, 515, 520, tok.end_id, 0]
        assert mask.tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]]
    long_ids, long_mask = tok(["the red square " * 60], max_words=8)  # truncated, no length warning
    assert long_ids[0].tolist() == [tok.start_id, 513, 515, 520, 513, 515, 520, tok.end_id]
    tok.save(tmp_path / "hf")
    tok2 = load_clip_tokenizer(tmp_path / "hf")
    assert torch.equal(tok2(["the red square"], 8)[0], tok(["the red square"], 8)[0])
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "model.pt").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="bpe_simple_vocab_16e6"):
        load_clip_tokenizer(tmp_path / "bare" / "model.pt")


# ---------------------------------------------------------------- the embedded dataset

def test_synthetic_build_reuse_and_repair(small_root, tmp_path):
    m = json.loads((small_root / "manifest.json").read_text())
    assert m["complete"] and len(m["videos"]) == 64 and m["size"] == "small"
    assert synthetic.check(small_root, "full") == []
    root = tmp_path / "syn"
    shutil.copytree(small_root, root)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (root / "videos").iterdir()}
    assert synthetic.build(root, "small", progress=False) == root
    assert {p.name: p.stat().st_mtime_ns for p in (root / "videos").iterdir()} == mtimes  # reused
    # corrupt one file, delete another: exactly those two are rewritten
    victim, gone = root / "videos" / "00003.mp4", root / "videos" / "00010.mp4"
    victim.write_bytes(victim.read_bytes()[:100])
    gone.unlink()
    assert sorted(synthetic.check(root)) == ["00003", "00010"]
    synthetic.build(root, "small", progress=False)
    assert synthetic.check(root, "full") == []
    changed = {p.name for p in (root / "videos").iterdir() if mtimes.get(p.name) != p.stat().st_mtime_ns}
    assert changed == {"00003.mp4", "00010.mp4"}


@pytest.mark.parametrize("writer", ["pyav", "imageio"])
def test_synthetic_writers_read_back(tmp_path, writer):
    spec = synthetic.video_spec(7, 0)
    frames = synthetic.render(spec, 0)
    synthetic.write_mp4(tmp_path / "a.mp4", frames, writer=writer)
    got = decode_frames(tmp_path / "a.mp4", max_frames=24, framerate=0)
    assert got.shape == frames.shape
    assert np.abs(got.astype(int) - frames).mean() < 8  # lossy, chroma subsampled at 32x32
    if writer == "imageio":  # the ffmpeg binary writes the same bytes every time
        synthetic.write_mp4(tmp_path / "b.mp4", frames, writer=writer)
        assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()


def test_synthetic_default_root_from_env(small_root, tmp_path, monkeypatch):
    # a build in the old flat layout ($NBRETR_DATA/synthetic/manifest.json) is moved into
    # its size's folder instead of being generated again
    shutil.copytree(small_root, tmp_path / "synthetic")
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "synthetic" / "videos").iterdir()}
    monkeypatch.setenv("NBRETR_DATA", str(tmp_path))
    ds = build_dataset("synthetic", None, "val", None, image_size=32, augment=True, size="small")  # its tokenizer
    assert ds.root == tmp_path / "synthetic" / "small" and ds.num_videos == 8
    assert not (tmp_path / "synthetic" / "manifest.json").exists()
    assert {p.name: p.stat().st_mtime_ns for p in (ds.root / "videos").iterdir()} == mtimes
    assert ds.preprocess.flip_p == 0.0  # captions say left/right
    item = ds[0]
    assert item["video"].shape == (12, 3, 32, 32) and item["text_mask"].sum() > 5


def _caption_agrees(spec: dict) -> bool:
    """Every factor word in the caption is the clip's own, and its shape is named."""
    words = spec["caption"].split()
    if spec["busy"]:
        return "shapes" in words and not set(words) & set(synthetic.COLOURS)
    named = {"colour": set(synthetic.COLOURS), "direction": set(synthetic.DIRECTIONS),
             "background": set(synthetic.BACKGROUNDS), "size": set(synthetic.SIZES_PX),
             "speed": set(synthetic.SPEEDS_PX), "count": set(synthetic.COUNTS.values())}
    for factor, vocab in named.items():
        own = synthetic.COUNTS[spec["count"]] if factor == "count" else spec[factor]
        if set(words) & vocab - {own}:
            return False
    plural = spec["count"] > 1
    nouns = {synthetic.SHAPES[spec["shape"]] if plural else spec["shape"], "shapes" if plural else "shape"}
    return bool(set(words) & nouns)


def test_synthetic_captions_and_factors(small_root):
    m = json.loads((small_root / "manifest.json").read_text())
    # reproducible from the seed
    assert [synthetic.video_spec(i, 0)["caption"] for i in range(64)] == [v["caption"] for v in m["videos"]]
    assert [synthetic.video_spec(i, 1)["caption"] for i in range(64)] != [v["caption"] for v in m["videos"]]
    spec5 = synthetic.video_spec(5, 0)
    assert np.array_equal(synthetic.render(spec5, 0), synthetic.render(spec5, 0))
    specs = [synthetic.video_spec(i, 0) for i in range(synthetic.SIZES["default"])]
    assert all(_caption_agrees(s) for s in specs)
    tok = synthetic.word_tokenizer()
    assert not any(tok.unk_id in tok.encode(s["caption"]) for s in specs)
    assert max(len(tok.encode(s["caption"])) for s in specs) + 2 <= 16  # the embedded preset's max_words
    # i.i.d. splits of 25% / 12.5% / 62.5%
    assert collections.Counter(s["split"] for s in specs) == {"test": 1000, "val": 500, "train": 2500}
    # the design's shares: visually generic clips, long-tailed colours and shapes, vague captions
    busy = [s for s in specs if s["busy"]]
    assert abs(len(busy) / len(specs) - synthetic.P_BUSY) < 0.02
    colours = collections.Counter(s["colour"] for s in specs if not s["busy"])
    ranked = [c for c, _ in colours.most_common()]
    assert ranked[0] == "red" and colours["red"] > 4 * colours["pink"]
    shapes = collections.Counter(s["shape"] for s in specs if not s["busy"])
    assert shapes.most_common(1)[0][0] == "square" and shapes["square"] > 3 * shapes["diamond"]
    lengths = [len(s["caption"].split()) for s in specs]
    assert min(lengths) <= 3 and max(lengths) >= 12  # "a shape drifting" ... every factor named
    # what the frames show: one colour on the background, or (busy) several colours
    single = next(s for s in specs if not s["busy"])
    f = synthetic.render(single, 0)
    seen = {tuple(p) for p in f.reshape(-1, 3)}
    assert seen == {synthetic.COLOURS[single["colour"]], synthetic.BACKGROUNDS[single["background"]]}
    b = busy[0]
    seen = {tuple(p) for p in synthetic.render(b, 0).reshape(-1, 3)}
    assert len(seen - {synthetic.BACKGROUNDS[b["background"]]}) == len(set(b["parts"]["colours"]))
    assert synthetic.render(single, 0, [0, 23]).shape == (2, synthetic.FRAME_SIZE, synthetic.FRAME_SIZE, 3)
    assert np.array_equal(synthetic.render(single, 0, [0, 23]), f[[0, 23]])


def test_pretraining_corpus_is_disjoint_from_the_dataset():
    corpus = synthetic.corpus_specs(3000, seed=0)
    assert corpus == synthetic.corpus_specs(3000, seed=0)
    keys = {synthetic._key(synthetic.video_spec(i, 0)) for i in range(synthetic.SIZES["default"])}
    assert not keys & {synthetic._key(s) for s in corpus}
    assert all(s["split"] == "pretrain" and _caption_agrees(s) for s in corpus)
    # its own random stream: not the dataset's clips again
    assert [s["caption"] for s in corpus[:50]] != [synthetic.video_spec(i, 0)["caption"] for i in range(50)]
    frames = synthetic.render_frames(corpus[0], 0, [0, 11, 23])
    assert frames.shape == (3, 32, 32, 3) and frames.dtype == np.uint8


def test_chroma_subsample_keeps_luma_and_averages_chroma():
    rng = np.random.default_rng(0)
    flat = np.full((2, 4, 4, 3), (200, 40, 90), np.uint8)
    assert np.abs(synthetic.chroma_subsample(flat).astype(int) - flat).max() <= 1
    x = rng.integers(0, 256, (1, 4, 4, 3), dtype=np.uint8)
    y = synthetic.chroma_subsample(x).astype(float)
    luma = lambda a: 0.299 * a[..., 0] + 0.587 * a[..., 1] + 0.114 * a[..., 2]  # noqa: E731
    inside = (y > 0).all(-1) & (y < 255).all(-1)  # where no channel was clipped
    assert np.abs(luma(y) - luma(x.astype(float)))[inside].max() < 1.5
    # a red-green checkerboard keeps its luma but not its chroma contrast at 2x2
    board = np.zeros((1, 2, 2, 3), np.uint8)
    board[0, 0, 0] = board[0, 1, 1] = (150, 80, 80)
    board[0, 0, 1] = board[0, 1, 0] = (80, 150, 80)
    out = synthetic.chroma_subsample(board)
    assert np.abs(out[0, 0, 0].astype(int) - out[0, 0, 1]).max() > 0  # luma still differs
    cb = lambda a: -0.169 * a[..., 0] - 0.331 * a[..., 1] + 0.5 * a[..., 2]  # noqa: E731
    assert np.ptp(cb(out.astype(float))) < 2


def test_synthetic_dataset_items_and_loader(small_root, word_tok):
    ds = build_dataset("synthetic", small_root, "train", word_tok, image_size=32)
    assert len(ds) == ds.num_videos == 40 and len(ds.video_ids) == 40
    assert ds.caption_to_video.tolist() == list(range(40))
    item = ds[3]
    assert item["video"].shape == (12, 3, 32, 32) and item["video"].dtype == torch.float32
    assert item["video_mask"].tolist() == [1] * 12 and item["bad"] is False
    assert item["text_ids"].shape == (24,) and item["text_ids"].dtype == torch.long
    assert item["text_mask"].sum() == len(ds.captions[3].split()) + 2
    batch = next(iter(DataLoader(ds, batch_size=4, collate_fn=collate)))
    assert batch["video"].shape == (4, 12, 3, 32, 32) and batch["index"].dtype == torch.long
    assert batch["bad"].dtype == torch.bool and batch["video_mask"].shape == (4, 12)
    # 2 fps clips sampled at 2 fps and 4 frames: uniform over 24 frames
    ds4 = build_dataset("synthetic", small_root, "test", word_tok, max_frames=4, video_framerate=2.0, image_size=16)
    it = ds4[0]
    assert it["video"].shape == (4, 3, 16, 16) and it["video_mask"].tolist() == [1, 1, 1, 1]
    tv, vv = ds4.text_view(), ds4.video_view()
    assert len(tv) == len(ds4) and "video" not in tv[0]
    assert len(vv) == ds4.num_videos and vv[1]["video_index"] == 1


# ---------------------------------------------------------------- the standard layouts (miniatures)

def _videos(folder: Path, names: list[str], ext: str = ".mp4", n: int = 6) -> None:
    for k, name in enumerate(names):
        write_video(folder / f"{name}{ext}", n=n, fps=2, h=24, w=32, seed=k)


def test_msrvtt_layout(tmp_path, word_tok):
    root = tmp_path / "msrvtt"
    _videos(root / "videos", ["video0", "video1", "video2", "video7010"])
    sents = [{"video_id": f"video{i}", "caption": f"a red square number {i} {j}", "sen_id": 3 * i + j}
             for i in range(3) for j in range(3)]
    (root / "MSRVTT_data.json").write_text(json.dumps({"videos": [], "sentences": sents}))
    (root / "MSRVTT_train.9k.csv").write_text("video_id\nvideo0\nvideo1\nvideo2\n")
    (root / "MSRVTT_train.7k.csv").write_text("video_id\nvideo0\nvideo1\n")
    (root / "MSRVTT_JSFUSION_test.csv").write_text(
        "key,vid_key,video_id,sentence\nret0,msr7010,video7010,a man is talking\n")
    tr = build_dataset("msrvtt", root, "train", word_tok, image_size=32)
    assert tr.num_videos == 3 and len(tr) == 9 and tr.caption_to_video.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert tr.captions[4] == "a red square number 1 1"
    assert build_dataset("msrvtt", root, "train", word_tok, train_list="7k").num_videos == 2
    te = build_dataset("msrvtt", root, "test", word_tok, image_size=32)
    assert te.video_ids == ["video7010"] and te.captions == ["a man is talking"]
    assert te[0]["video_mask"].tolist() == [1, 1, 1] + [0] * 9  # 3 s at 1 fps


def test_msvd_multi_caption(tmp_path, word_tok):
    root = tmp_path / "msvd"
    _videos(root / "videos", ["vidA_1_5", "vidB_2_7"], ext=".mp4")
    raw = {"vidA_1_5": [["a", "cat", "plays"], ["the", "cat", "jumps"]], "vidB_2_7": [["a", "dog"], ["dog", "runs"],
                                                                                     ["a", "dog", "barks"]]}
    (root / "raw-captions.pkl").write_bytes(pickle.dumps(raw))
    for s in ("train", "val", "test"):
        (root / f"{s}_list.txt").write_text("vidA_1_5\nvidB_2_7\n")
    te = build_dataset("msvd", root, "test", word_tok, image_size=32)
    assert te.num_videos == 2 and len(te) == 5 and te.caption_to_video.tolist() == [0, 0, 1, 1, 1]
    assert te.captions[0] == "a cat plays"
    assert te[3]["video_index"] == 1 and te[3]["index"] == 3


def test_didemo_paragraphs(tmp_path, word_tok):
    root = tmp_path / "didemo"
    _videos(root / "videos", ["111@N00_22_abc", "333@N00_44_def"])
    (root / "test_list.txt").write_text("111@N00_22_abc.mp4\n333@N00_44_def\n")
    data = [{"video": "111@N00_22_abc.avi", "description": "a girl waves", "times": [[0, 0], [0, 1]]},
            {"video": "333@N00_44_def.avi", "description": "a car passes", "times": [[1, 1]]},
            {"video": "111@N00_22_abc.avi", "description": "she laughs", "times": [[2, 3]]}]
    (root / "test_data.json").write_text(json.dumps(data))
    ds = build_dataset("didemo", root, "test", word_tok, image_size=32)
    assert ds.video_ids == ["111@N00_22_abc.avi", "333@N00_44_def.avi"]  # as the JSON names them
    assert ds.captions == ["a girl waves she laughs", "a car passes"]
    assert ds[1]["video"].shape == (12, 3, 32, 32)


def test_activitynet_paragraphs(tmp_path, word_tok):
    root = tmp_path / "anet"
    _videos(root / "videos", ["v_abc", "v_xyz"])
    ann = {"v_abc": {"duration": 3.0, "timestamps": [[0, 1], [1, 3]], "sentences": ["A man runs.", " He stops."]},
           "v_xyz": {"duration": 3.0, "timestamps": [[0, 3]], "sentences": ["Kids play."]}}
    (root / "val_1.json").write_text(json.dumps(ann))
    (root / "val_ids.json").write_text(json.dumps(["v_abc", "v_xyz"]))
    (root / "train.json").write_text(json.dumps(ann))
    (root / "train_ids.json").write_text(json.dumps(["v_xyz"]))
    ds = build_dataset("activitynet", root, "test", word_tok, max_words=64, max_frames=64, image_size=32)
    assert ds.captions == ["A man runs. He stops.", "Kids play."] and len(ds) == 2
    assert ds[0]["video"].shape == (64, 3, 32, 32) and ds[0]["video_mask"].sum() == 3
    assert build_dataset("activitynet", root, "train", word_tok).video_ids == ["v_xyz"]


@pytest.mark.parametrize("name", ["coco", "flickr30k"])
def test_karpathy_images(tmp_path, word_tok, name):
    from PIL import Image
    root = tmp_path / name
    images = []
    for k, split in enumerate(["train", "restval", "val", "test", "test"]):
        fp = "val2014" if name == "coco" else ""
        fn = f"img{k}.jpg"
        (root / "images" / fp).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((40, 60, 3), 30 * k, np.uint8)).save(root / "images" / fp / fn)
        entry = {"filename": fn, "split": split, "sentences": [{"raw": f"photo {k} caption {j}"} for j in range(6)]}
        if name == "coco":
            entry["filepath"] = fp
        images.append(entry)
    (root / f"dataset_{name}.json").write_text(json.dumps({"images": images, "dataset": name}))
    te = build_dataset(name, root, "test", word_tok, max_frames=1, image_size=32)
    assert te.num_videos == 2 and len(te) == 10 and te.caption_to_video.tolist() == [0] * 5 + [1] * 5
    item = te[7]
    assert item["video"].shape == (1, 3, 32, 32) and item["video_mask"].tolist() == [1]
    # a broken image is a bad item, like a broken video
    te.videos[1].path.write_text("not an image")
    item = te[7]
    assert item["bad"] and item["video_mask"].tolist() == [0]
    assert te.bad_summary()["by_reason"] == {"undecodable": 1}
    assert build_dataset(name, root, "train", word_tok).num_videos == 2  # train + restval
    if name == "coco":
        assert build_dataset(name, root, "test", word_tok, test_size="1k").num_videos == 2


# ---------------------------------------------------------------- bad data

def _broken_msrvtt(root: Path) -> None:
    _videos(root / "videos", ["good0", "good1"])
    (root / "videos" / "empty.mp4").write_bytes(b"")
    data = (root / "videos" / "good0.mp4").read_bytes()
    (root / "videos" / "trunc.mp4").write_bytes(data[: len(data) // 2])
    (root / "videos" / "text.mp4").write_text("this is not a video\n")
    # a "fast start" mp4 (index first) cut after a third: opens, then fails mid-stream
    av = pytest.importorskip("av")
    with av.open(str(root / "faststart.mp4"), "w", options={"movflags": "faststart"}) as c:
        st = c.add_stream("libx264", rate=8)
        st.width = st.height = 64
        st.pix_fmt = "yuv420p"
        for f in np.random.default_rng(0).integers(0, 255, (48, 64, 64, 3), dtype=np.uint8):
            c.mux(st.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(st.encode())
    data = (root / "faststart.mp4").read_bytes()
    assert data.find(b"moov") < data.find(b"mdat")
    (root / "videos" / "cut.mp4").write_bytes(data[: len(data) // 3])
    rows = ["key,vid_key,video_id,sentence"] + [f"r{i},k{i},{v},caption of {v}" for i, v in
                                                enumerate(["good0", "empty", "trunc", "text", "cut", "good1"])]
    (root / "MSRVTT_JSFUSION_test.csv").write_text("\n".join(rows) + "\n")


def test_bad_videos_are_skipped_with_one_warning_each(tmp_path, word_tok, caplog):
    root = tmp_path / "broken"
    _broken_msrvtt(root)
    ds = build_dataset("msrvtt", root, "test", word_tok, image_size=32)
    assert len(ds) == 6
    with caplog.at_level(logging.WARNING, logger="nbretr.data"):
        for _ in range(2):  # two epochs: still one warning per file
            items = [ds[i] for i in range(len(ds))]
    assert [it["bad"] for it in items] == [False, True, True, True, True, False]
    for it in items[1:5]:
        assert it["video_mask"].sum() == 0 and it["video"].abs().sum() == 0
    assert items[0]["video_mask"].sum() == 3
    msgs = [r.getMessage() for r in caplog.records if "skipping bad video" in r.getMessage()]
    assert len(msgs) == 4
    for name, reason in (("empty.mp4", "empty"), ("trunc.mp4", "undecodable"), ("text.mp4", "undecodable"),
                         ("cut.mp4", "undecodable")):
        assert sum(name in m and reason in m for m in msgs) == 1, msgs
    s = ds.bad_summary()
    assert s["bad_videos"] == 4 and s["bad_items"] == 8 and s["by_reason"] == {"empty": 1, "undecodable": 3}
    with caplog.at_level(logging.WARNING, logger="nbretr.data"):
        log_bad_summary(ds, epoch=0, reset=True)
    assert "4 bad video(s), 8 item(s) skipped" in caplog.records[-1].getMessage()
    assert ds.bad_summary()["bad_items"] == 0
    # a batch with bad items: the training loop can drop them
    batch = collate(items)
    assert batch["bad"].tolist() == [False, True, True, True, True, False]


def test_bad_videos_strict_raises_naming_the_file(tmp_path, word_tok):
    root = tmp_path / "broken"
    _broken_msrvtt(root)
    ds = build_dataset("msrvtt", root, "test", word_tok, image_size=32, strict=True)
    ds[0]
    for i, name in ((1, "empty.mp4"), (2, "trunc.mp4"), (3, "text.mp4"), (4, "cut.mp4")):
        with pytest.raises(VideoDecodeError, match=name):
            ds[i]
    with pytest.raises(VideoDecodeError, match="missing"):
        decode_frames(root / "videos" / "nope.mp4")


def test_bad_summary_counts_worker_items(tmp_path, word_tok):
    root = tmp_path / "broken"
    _broken_msrvtt(root)
    ds = build_dataset("msrvtt", root, "test", word_tok, image_size=16)
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate)
    bad = torch.cat([b["bad"] for b in loader])
    assert bad.tolist() == [False, True, True, True, True, False]
    assert ds.bad_summary()["bad_items"] == 4  # seen by the workers, counted in shared memory


def test_annotation_problems_name_file_and_line(tmp_path, word_tok, caplog):
    root = tmp_path / "ann"
    _videos(root / "videos", ["video0", "video1"])
    (root / "MSRVTT_JSFUSION_test.csv").write_text(
        "key,vid_key,video_id,sentence\nr0,k0,video0,fine\nr1,k1,video9,missing video\nr2,k2\nr3,k3,video1,ok\n")
    with caplog.at_level(logging.WARNING, logger="nbretr.data"):
        ds = build_dataset("msrvtt", root, "test", word_tok, allow_missing=True)
    # the malformed row is dropped; the missing video keeps its pair (the test set stays whole)
    assert ds.video_ids == ["video0", "video9", "video1"] and ds.captions == ["fine", "missing video", "ok"]
    assert ds.missing_videos == ["video9"]
    assert len(ds.annotation_problems) == 1
    assert f"{root / 'MSRVTT_JSFUSION_test.csv'} line 4: malformed row" in ds.annotation_problems[0]
    problems = [r.getMessage() for r in caplog.records if "annotation problem" in r.getMessage()]
    assert len(problems) == 1 and "MSRVTT_JSFUSION_test.csv line 4: malformed row" in problems[0]
    with pytest.raises(AnnotationError, match="line 4"):
        build_dataset("msrvtt", root, "test", word_tok, strict=True)
    (root / "test_list.txt").write_text("video0\nvideo1 extra\nvideo5\n")
    (root / "raw-captions.pkl").write_bytes(pickle.dumps({"video0": [["a"]], "video5": [["b"]]}))
    ms = build_dataset("msvd", root, "test", word_tok, allow_missing=True)
    assert ms.video_ids == ["video0", "video5"] and ms.missing_videos == ["video5"]
    assert any("test_list.txt line 2: malformed line" in p for p in ms.annotation_problems)


def test_build_dataset_errors(tmp_path, word_tok):
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("kinetics", tmp_path, "test", word_tok)
    with pytest.raises(ValueError, match="split"):
        build_dataset("msrvtt", tmp_path, "dev", word_tok)
    with pytest.raises(FileNotFoundError, match="MSRVTT_JSFUSION_test.csv"):
        build_dataset("msrvtt", tmp_path, "test", word_tok)


# ---------------------------------------------------------------- issue 16: what users met

def _msrvtt_train_root(root: Path) -> Path:
    _videos(root / "videos", ["video0", "video1"])
    (root / "MSRVTT_train.9k.csv").write_text("video_id\n" + "".join(f"video{i % 2}\n" for i in range(100)))
    return root


def test_truncated_msrvtt_json_is_one_error_naming_the_file(tmp_path, word_tok, caplog):
    from nbretr.runtime import is_user_error
    root = _msrvtt_train_root(tmp_path / "msrvtt")
    sents = [{"video_id": f"video{i % 2}", "caption": f"caption {i}", "sen_id": i} for i in range(40)]
    text = json.dumps({"videos": [], "sentences": sents})
    (root / "MSRVTT_data.json").write_text(text[: len(text) // 2])  # an interrupted download
    with caplog.at_level(logging.WARNING, logger="nbretr.data"):
        with pytest.raises(AnnotationError, match=r"MSRVTT_data.json is not valid JSON.*line 1 column") as err:
            build_dataset("msrvtt", root, "train", word_tok)
    assert str(root / "MSRVTT_data.json") in str(err.value)
    assert is_user_error(err.value)  # the CLI prints `prog: error: ...`, no traceback
    assert caplog.records == []  # no "has no caption" flood before it


def test_msrvtt_json_without_sentences_names_the_key(tmp_path, word_tok):
    root = _msrvtt_train_root(tmp_path / "msrvtt")
    (root / "MSRVTT_data.json").write_text(json.dumps({"videos": [{"video_id": "video0"}], "info": {}}))
    with pytest.raises(AnnotationError, match=r"MSRVTT_data.json has no key 'sentences'.*'videos', 'info'"):
        build_dataset("msrvtt", root, "train", word_tok)
    (root / "MSRVTT_data.json").write_text(json.dumps([{"video_id": "video0", "caption": "x"}]))
    with pytest.raises(AnnotationError, match=r"MSRVTT_data.json should hold a JSON object at the top, found a list"):
        build_dataset("msrvtt", root, "train", word_tok)
    # every sentence malformed: one error naming the problem, not an empty training set
    (root / "MSRVTT_data.json").write_text(json.dumps({"sentences": [{"video": "video0", "text": "x"}] * 3}))
    with pytest.raises(AnnotationError, match=r"no \(caption, video\) pairs: 5 annotation problem\(s\), e.g. "
                                              r".*sentences\[0\]: malformed sentence entry"):
        build_dataset("msrvtt", root, "train", word_tok)


@pytest.mark.parametrize("name, files", [
    ("msvd", {"raw-captions.pkl": b"\x80\x04\x95", "test_list.txt": b"video0\n"}),
    ("didemo", {"test_list.txt": b"video0\n", "test_data.json": b'[{"video": "video0", "descr'}),
    ("activitynet", {"val_ids.json": b'["v_a"]', "val_1.json": b'{"v_a": {"sentences": ['}),
])
def test_other_truncated_annotations_are_one_error(tmp_path, word_tok, name, files):
    root = tmp_path / name
    _videos(root / "videos", ["video0"])
    for fn, data in files.items():
        (root / fn).write_bytes(data)
    broken = next(fn for fn in files if fn.endswith((".pkl", "data.json", "val_1.json")))
    with pytest.raises(AnnotationError, match=re.escape(str(root / broken))):
        build_dataset(name, root, "test", word_tok)


_BAD_VIDEO_SCRIPT = r"""
import logging, sys
from torch.utils.data import DataLoader
from nbretr.data import build_dataset, collate
from nbretr.data.synthetic import word_tokenizer
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
ds = build_dataset("msrvtt", sys.argv[1], "test", word_tokenizer(), image_size=16)
for epoch in range(2):  # new DataLoader workers each epoch, as in nbretr.train
    bad = [b["bad"].tolist() for b in DataLoader(ds, batch_size=1, num_workers=2, collate_fn=collate)]
    assert bad == [[False], [True], [False]], bad
for i in range(len(ds)):  # and in the main process too
    ds[i]
print("OK")
"""


@pytest.mark.slow
def test_bad_video_is_warned_once_and_decoder_noise_stays_quiet(tmp_path):
    import subprocess
    import sys
    root = tmp_path / "msrvtt"
    _videos(root / "videos", ["good0", "good1"])
    data = (root / "videos" / "good0.mp4").read_bytes()
    (root / "videos" / "trunc.mp4").write_bytes(data[: len(data) // 2])  # no moov atom
    (root / "MSRVTT_JSFUSION_test.csv").write_text(
        "key,vid_key,video_id,sentence\nr0,k0,good0,a\nr1,k1,trunc,b\nr2,k2,good1,c\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    env.pop("NBRETR_DECODER_LOG", None)
    out = subprocess.run([sys.executable, "-c", _BAD_VIDEO_SCRIPT, str(root)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "OK", out.stderr
    lines = [ln for ln in out.stderr.splitlines() if "trunc.mp4" in ln]
    assert len(lines) == 1 and "skipping bad video" in lines[0], out.stderr
    if BACKENDS[:1] == ["decord"]:
        assert "moov atom not found" in lines[0]  # the decoder's words, in the one warning
    if BACKENDS[:1] == ["torchcodec"]:  # FFmpeg's words, as torchcodec passes them on
        assert "torchcodec: Could not open input file: Invalid data found when processing input" in lines[0]
    assert "moov atom" not in out.stderr.replace(lines[0], "")  # and nowhere else
    assert "ERROR opening" not in out.stderr and "video_reader.cc" not in out.stderr


def test_synthetic_sizes_do_not_overwrite_each_other(tmp_path, monkeypatch):
    monkeypatch.setenv("NBRETR_DATA", str(tmp_path))
    monkeypatch.setitem(synthetic.SIZES, "default", 20)  # a cheap stand-in for the 2,000 videos
    default = synthetic.ensure(None, "default")
    stamp = {p: p.stat().st_mtime_ns for p in default.rglob("*") if p.is_file()}
    small = synthetic.ensure(None, "small")
    assert default == tmp_path / "synthetic" / "default" and small == tmp_path / "synthetic" / "small"
    assert synthetic.ensure(None, "default") == default  # found intact: nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in default.rglob("*") if p.is_file()} == stamp
    assert json.loads((default / "manifest.json").read_text())["num_videos"] == 20
    assert json.loads((small / "manifest.json").read_text())["num_videos"] == 64
    assert synthetic.default_root("small", 3) == tmp_path / "synthetic" / "small-seed3"


@pytest.mark.slow
def test_concurrent_first_use_builds_the_synthetic_set_once(tmp_path):
    # torchrun ranks (or two commands) starting together on a fresh machine
    import subprocess
    import sys
    env = dict(os.environ, NBRETR_DATA=str(tmp_path), PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    code = ("import logging, sys; from nbretr.data import build_dataset; logging.basicConfig(level=logging.INFO); "
            "ds = build_dataset('synthetic', None, 'train', None, size='small', image_size=32); "
            "print(ds.root, len(ds))")
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(4)]
    outs = [p.communicate(timeout=600) + (p.returncode,) for p in procs]
    for out, err, rc in outs:
        assert rc == 0, err
        assert out.split() == [str(tmp_path / "synthetic" / "small"), "40"]
    root = tmp_path / "synthetic" / "small"
    assert synthetic.check(root, "full") == []
    assert sorted(p.name for p in (root / "videos").iterdir()) == [f"{i:05d}.mp4" for i in range(64)]
    assert sum("video(s) written" in err for _, err, _ in outs) == 1, outs  # generated by one of them


@pytest.mark.slow
def test_a_second_builder_waits_for_the_lock_holder(tmp_path):
    import subprocess
    import sys
    import time
    root = tmp_path / "synthetic" / "small"
    env = dict(os.environ, NBRETR_DATA=str(tmp_path), PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    log_file = tmp_path / "stderr.txt"
    with synthetic.build_lock(root), open(log_file, "w") as err:  # as if another process were generating it
        p = subprocess.Popen([sys.executable, "-m", "nbretr.data.synthetic", "--size", "small"], env=env,
                             stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 120
        while "waiting" not in log_file.read_text() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1)
        assert p.poll() is None, log_file.read_text()  # blocked on the lock ...
        assert not (root / "videos").exists() or not any((root / "videos").iterdir())  # ... writing nothing
    assert p.wait(timeout=300) == 0, log_file.read_text()
    assert "another process is building it; waiting" in log_file.read_text()
    assert synthetic.check(root, "full") == []


def test_train_cli_names_the_broken_annotation_file(tmp_path, capsys, monkeypatch):
    from nbretr import train as T
    from nbretr.runtime import run_cli
    root = _msrvtt_train_root(tmp_path / "msrvtt")
    (root / "MSRVTT_data.json").write_text('{"videos": [], "sentences": [{"video_id": "video0", "capt')
    monkeypatch.chdir(tmp_path)
    assert run_cli(T.main, "prog", ["--dataset", "msrvtt", "--data-root", str(root)]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[0].startswith(f"prog: error: msrvtt: {root / 'MSRVTT_data.json'} is not valid JSON"), err
    assert "has no caption" not in err and "batch-size" not in err and "Traceback" not in err
