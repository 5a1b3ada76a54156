"""Clip-level RandAugment (nbretr.data.augment): one draw per clip, timm's ops."""
from __future__ import annotations

import random
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("timm")
Image = pytest.importorskip("PIL.Image")
from timm.data import auto_augment as aa  # noqa: E402

from nbretr.data.augment import (REFERENCE_CONFIG, ClipDraw, ClipRandAugment, OpDraw,  # noqa: E402
                                 make_augment)

BICUBIC = getattr(Image, "Resampling", Image).BICUBIC


@pytest.fixture(scope="module")
def aug():
    return ClipRandAugment()


def _frame(seed: int, h: int = 48, w: int = 64) -> np.ndarray:
    """A uint8 RGB frame with structure (gradients, a block) and noise, so that every op
    (geometric, colour, histogram) changes it."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), (xx + yy) * 127 // (h + w)], -1).astype(np.int32)
    img[h // 4:h // 2, w // 4:w // 2] = g.integers(0, 256, 3)
    img += g.integers(-20, 21, img.shape)
    return img.clip(0, 255).astype(np.uint8)


def _clip(t: int, seed: int = 0) -> np.ndarray:
    return np.stack([_frame(seed * 100 + i) for i in range(t)])


def _level_args(name: str, m: float, negate: bool, monkeypatch) -> tuple:
    """timm's level arguments for op ``name`` at magnitude ``m``, with the sign forced."""
    fn = aa.LEVEL_TO_ARG[name]
    if fn is None:
        return ()
    with monkeypatch.context() as mp:
        mp.setattr(random, "random", lambda: 1.0 if negate else 0.0)
        return tuple(fn(m, {"translate_const": 100}))


# ---- the config, parsed as timm does ---------------------------------------------------

def test_reference_config_is_parsed_as_timm(aug):
    assert aug.config == REFERENCE_CONFIG == "rand-m7-n4-mstd0.5-inc1"
    assert aug.num_layers == 4
    assert aug.magnitude == 7
    assert aug.magnitude_std == 0.5
    assert aug.prob == 0.5
    increasing = aa.rand_augment_choices("default", increasing=True)
    assert aug.op_names == list(increasing)
    assert aug.op_names != list(aa.rand_augment_choices("default", increasing=False))
    # the ops timm itself builds from the same string
    ref = aa.rand_augment_transform(REFERENCE_CONFIG, {"translate_const": 100, "interpolation": BICUBIC})
    assert [op.name for op in ref.ops] == aug.op_names and ref.num_layers == aug.num_layers
    assert ref.choice_weights is None and aug.choice_weights is None
    # the reference passes bicubic and no img_mean: timm's grey fill
    assert aug.interpolation == BICUBIC
    assert tuple(aug.fill) == (128, 128, 128)
    assert aug.hparams["translate_const"] == 100


def test_other_configs_and_hparams():
    a = ClipRandAugment("rand-m9-n2-mstd0", hparams={"interpolation": "bilinear", "img_mean": (1, 2, 3)})
    assert a.num_layers == 2 and a.magnitude == 9 and a.magnitude_std == 0
    assert a.op_names == list(aa.rand_augment_choices("default", increasing=False))
    assert tuple(a.fill) == (1, 2, 3)
    assert a.interpolation == getattr(Image, "Resampling", Image).BILINEAR
    d = a.draw(3)
    assert all(o.magnitude == 9 for o in d.applied)  # mstd0: no noise
    with pytest.raises(ValueError):
        ClipRandAugment(hparams={"interpolation": "sideways"})


def test_each_clip_draws_n_ops_from_the_increasing_set(aug):
    names = set(aug.op_names)
    for s in range(100):
        d = aug.draw(s)
        assert isinstance(d, ClipDraw) and len(d.ops) == 4
        assert all(o.name in names for o in d.ops)
        for o in d.ops:
            if o.applied:
                assert 0.0 <= o.magnitude <= 10.0
            else:
                assert o.magnitude is None and o.args == ()


def test_draw_statistics(aug):
    draws = [aug.draw(s) for s in range(600)]
    op_lists = {tuple(o.name for o in d.ops) for d in draws[:50]}
    assert len(op_lists) > 1  # different clips, different ops (in fact ~50 distinct)
    assert len(op_lists) > 40
    slots = [o for d in draws for o in d.ops]
    assert {o.name for o in slots} == set(aug.op_names)  # uniform over all 15 ops
    fired = [o for o in slots if o.applied]
    assert 0.45 < len(fired) / len(slots) < 0.55  # each slot fires with p = 0.5
    m = np.array([o.magnitude for o in fired])
    assert abs(m.mean() - 7.0) < 0.05 and 0.45 < m.std() < 0.55  # N(7, 0.5)
    rot = [o.args[0] for o in fired if o.name == "Rotate"]
    assert min(rot) < 0 < max(rot)  # both directions
    # with replacement: an op can take two slots of a clip
    assert any(len({o.name for o in d.ops}) < 4 for d in draws)


def test_args_are_timms_levels_of_the_drawn_magnitude(aug, monkeypatch):
    seen = set()
    for s in range(200):
        for o in aug.draw(s).applied:
            cands = {_level_args(o.name, o.magnitude, neg, monkeypatch) for neg in (False, True)}
            assert tuple(o.args) in cands, (o, cands)
            assert o.resample == BICUBIC
            seen.add(o.name)
    assert len(seen) == 15


def test_matches_timm_augment_op_on_one_image(aug):
    """Each fired op, replayed by timm's own AugmentOp (p=1, the drawn magnitude, no noise)
    on the draw's random state, gives exactly the frame this module produces."""
    img = Image.fromarray(_frame(7))
    hp = {"translate_const": 100, "interpolation": BICUBIC}
    checked = 0
    for s in range(40):
        for o in aug.draw(s).applied:
            op = aa.AugmentOp(o.name, prob=1.0, magnitude=o.magnitude, hparams=hp)
            state = random.getstate()
            random.seed(o.seed)
            want = np.asarray(op(img))
            random.setstate(state)
            got = np.asarray(aug.apply_image(ClipDraw((o,)), img))
            np.testing.assert_array_equal(got, want, err_msg=str(o))
            checked += 1
    assert checked > 50


# ---- one draw per clip -----------------------------------------------------------------

def test_identical_frames_stay_identical(aug):
    """A clip of T identical frames comes out as T identical frames: the ops, whether each
    fires, the magnitudes and the signs are drawn once per clip (per-frame draws would make
    the frames differ for almost every seed)."""
    frame = _frame(1)
    clip = np.stack([frame] * 6)
    changed = 0
    for s in range(40):
        out = aug(clip, rng=s)
        for t in range(1, 6):
            np.testing.assert_array_equal(out[t], out[0], err_msg=f"seed {s}: {aug.draw(s)}")
        changed += int(not np.array_equal(out[0], frame))
    assert changed > 30  # most clips have at least one op that fired


def test_clip_equals_recorded_draw_applied_per_frame(aug):
    clip = _clip(5, seed=3)
    for s in range(15):
        d = aug.draw(s)
        out = aug(clip, rng=s)
        for t in range(len(clip)):
            one = aug.apply(d, clip[t:t + 1])
            np.testing.assert_array_equal(out[t], one[0])
            pil = np.asarray(aug.apply_image(d, Image.fromarray(clip[t])))
            np.testing.assert_array_equal(out[t], pil)


def test_different_seeds_different_clips(aug):
    clip = _clip(3)
    outs = {aug(clip, rng=s).tobytes() for s in range(20)}
    assert len(outs) > 15


# ---- determinism ---------------------------------------------------------------------

def test_fixed_seed_is_deterministic(aug):
    clip = _clip(4)
    assert aug.draw(11) == aug.draw(11)
    np.testing.assert_array_equal(aug(clip, rng=11), aug(clip, rng=11))
    assert aug.draw(np.random.default_rng(5)) == aug.draw(np.random.default_rng(5))
    assert aug.draw(random.Random(5)) == aug.draw(random.Random(5))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert aug.draw(g1) == aug.draw(g2)
    random.seed(9)
    a = aug.draw()
    random.seed(9)
    assert aug.draw() == a  # rng=None: one seed from Python's global random (per worker)
    with pytest.raises(TypeError):
        aug.draw("seed")


def test_explicit_rng_leaves_global_states_alone(aug):
    random.seed(1)
    np.random.seed(1)
    py, npy = random.getstate(), np.random.get_state()
    aug(_clip(2), rng=4)
    assert random.getstate() == py
    assert np.array_equal(np.random.get_state()[1], npy[1])


# ---- forms ---------------------------------------------------------------------------

def test_forms_dtype_shape_preserved(aug):
    clip = _clip(3, seed=2)
    ref = aug(clip, rng=8)
    assert isinstance(ref, np.ndarray) and ref.dtype == np.uint8 and ref.shape == clip.shape
    assert not np.array_equal(ref, clip)

    t = torch.from_numpy(clip)
    out = aug(t, rng=8)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.uint8 and out.shape == t.shape
    np.testing.assert_array_equal(out.numpy(), ref)

    tc = t.permute(0, 3, 1, 2).contiguous()
    out = aug(tc, rng=8)
    assert out.shape == tc.shape and out.dtype == torch.uint8
    np.testing.assert_array_equal(out.permute(0, 2, 3, 1).numpy(), ref)

    pils = [Image.fromarray(f) for f in clip]
    out = aug(pils, rng=8)
    assert isinstance(out, list) and len(out) == 3
    assert all(isinstance(im, Image.Image) and im.size == pils[0].size for im in out)
    np.testing.assert_array_equal(np.stack([np.asarray(im) for im in out]), ref)

    with pytest.raises(TypeError):
        aug(clip.astype(np.float32), rng=8)
    with pytest.raises(TypeError):
        aug(t.float(), rng=8)
    with pytest.raises(ValueError):
        aug(clip[0], rng=8)


def test_nothing_fired_returns_input(aug):
    clip = _clip(2)
    d = ClipDraw(tuple(OpDraw(n, False) for n in aug.op_names[:4]))
    assert aug.apply(d, clip) is clip


def test_geometric_ops_fill_grey_bicubic(aug):
    white = np.full((1, 32, 32, 3), 255, np.uint8)
    d = ClipDraw((OpDraw("Rotate", True, 10.0, (30.0,), BICUBIC, 0),))
    out = aug.apply(d, white)
    assert tuple(out[0, 0, 0]) == (128, 128, 128)  # corner: rotated-in fill
    assert tuple(out[0, 16, 16]) == (255, 255, 255)
    d = ClipDraw((OpDraw("TranslateXRel", True, 10.0, (0.45,), BICUBIC, 0),))
    out = aug.apply(d, white)
    assert tuple(out[0, 16, -1]) == (128, 128, 128)
    with pytest.raises(ValueError):
        aug.apply(ClipDraw((OpDraw("TranslateX", True, 1.0, (3.0,), BICUBIC, 0),)), white)


# ---- the option ------------------------------------------------------------------------

def test_make_augment():
    assert make_augment("none") is None
    a = make_augment("randaugment", image_size=112)
    assert isinstance(a, ClipRandAugment) and a.config == REFERENCE_CONFIG
    assert a.hparams["translate_const"] == 50
    with pytest.raises(ValueError):
        make_augment("mixup")


def test_missing_timm_message(monkeypatch):
    for name in [m for m in list(sys.modules) if m == "timm" or m.startswith("timm.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "timm", None)
    assert make_augment("none") is None  # no timm needed
    with pytest.raises(ImportError, match=r"pip install timm"):
        ClipRandAugment()
    with pytest.raises(ImportError, match=r"nbretr\[data\]"):
        make_augment("randaugment")
