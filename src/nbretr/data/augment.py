"""Clip-level RandAugment: one draw of ops and magnitudes per clip, applied to every frame.

NeighborRetr trains (and encodes its memory bank) on videos augmented with RandAugment
``rand-m7-n4-mstd0.5-inc1``: for each clip, 4 ops are picked uniformly with replacement from
the increasing-severity set; each op fires with probability 0.5; a fired op's magnitude is
``N(7, 0.5)`` clipped to ``[0, 10]`` and its direction (sign) is random. All of that is drawn
once per clip and the same ops, with the same arguments, are applied to every frame. The
frames are uint8 RGB images at their decoded resolution: the augmentation comes after
decoding and before the resize / centre crop / normalisation.

The image ops, their magnitude-to-argument mappings and the config-string parsing are
timm's (``timm.data.auto_augment``); this module only moves the random draws from inside
timm's per-image ``__call__`` into :meth:`ClipRandAugment.draw`, made once per clip from
a generator the caller seeds, and replays them on each frame in :meth:`ClipRandAugment.apply`.

>>> aug = ClipRandAugment()                      # the reference's config
>>> frames = decode_frames(path, max_frames=12)  # uint8 [T, H, W, 3]
>>> frames = aug(frames, rng=seed)               # same type, dtype, shape
>>> video = Preprocess(224)(frames)              # resize, centre crop, normalise

timm is imported only when a :class:`ClipRandAugment` is built (``--augment randaugment``);
``make_augment("none")`` needs nothing.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

log = logging.getLogger("nbretr.data")

REFERENCE_CONFIG = "rand-m7-n4-mstd0.5-inc1"
AUGMENT_CHOICES = ("none", "randaugment")

_TIMM_MISSING = ("RandAugment (--augment randaugment) needs timm, which is not installed: "
                 "pip install timm (or pip install 'nbretr[data]')")


def _timm_auto_augment():
    try:
        from timm.data import auto_augment
    except ImportError as err:
        raise ImportError(_TIMM_MISSING) from err
    return auto_augment


def _pil_interpolation(value):
    """A PIL resampling constant (or a tuple of them, a random choice per clip) from a name
    ("bicubic", "bilinear", "nearest", "lanczos", "hamming", "box", "random") or a constant."""
    from PIL import Image
    resampling = getattr(Image, "Resampling", Image)
    if isinstance(value, str):
        name = value.lower()
        if name == "random":
            return (resampling.BILINEAR, resampling.BICUBIC)
        table = {"bicubic": resampling.BICUBIC, "bilinear": resampling.BILINEAR, "nearest": resampling.NEAREST,
                 "lanczos": resampling.LANCZOS, "hamming": resampling.HAMMING, "box": resampling.BOX}
        if name not in table:
            raise ValueError(f"unknown interpolation {value!r}; choose one of {sorted(table) + ['random']}")
        return table[name]
    return value


@dataclass(frozen=True)
class OpDraw:
    """One of a clip's ``n`` op slots.

    ``name``: the timm op; ``applied``: whether it fired (probability ``p``, 0.5 by default);
    ``magnitude``: the noisy, clipped magnitude (None when skipped); ``args``: the arguments
    timm's level function made of it, sign included (what every frame gets); ``resample``:
    the PIL interpolation of geometric ops; ``seed``: seeds Python's ``random`` around each
    frame's call, so any randomness left inside an op function (none for the reference's op
    set) is also the same for every frame.
    """

    name: str
    applied: bool
    magnitude: float | None = None
    args: tuple = ()
    resample: Any = None
    seed: int = 0

    def __str__(self) -> str:
        if not self.applied:
            return f"{self.name}:skip"
        args = ",".join(f"{a:.4g}" if isinstance(a, float) else str(a) for a in self.args)
        return f"{self.name}(m={self.magnitude:.3f}{', ' + args if args else ''})"


@dataclass(frozen=True)
class ClipDraw:
    """Everything random about one clip's augmentation: its ``n`` op slots, in order."""

    ops: tuple[OpDraw, ...]

    @property
    def applied(self) -> tuple[OpDraw, ...]:
        return tuple(o for o in self.ops if o.applied)

    def __str__(self) -> str:
        return " ".join(str(o) for o in self.ops)


class _FixedPythonRandom:
    """Seed Python's global ``random`` on entry and restore the caller's state on exit."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self):
        self.state = random.getstate()
        random.seed(self.seed)

    def __exit__(self, *exc):
        random.setstate(self.state)
        return False


def _as_random(rng) -> random.Random:
    """A ``random.Random`` for one clip from ``rng``: None (a seed from Python's global
    ``random``, which the DataLoader seeds per worker), an int seed, a ``random.Random``
    (used as is), a ``numpy.random.Generator`` or a ``torch.Generator`` (one seed drawn)."""
    if rng is None:
        return random.Random(random.getrandbits(64))
    if isinstance(rng, random.Random):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return random.Random(int(rng))
    if isinstance(rng, np.random.Generator):
        return random.Random(int(rng.integers(0, 2 ** 63 - 1)))
    import torch
    if isinstance(rng, torch.Generator):
        return random.Random(int(torch.randint(0, 2 ** 62, (), generator=rng)))
    raise TypeError(f"rng must be None, an int, random.Random, numpy.random.Generator or torch.Generator, "
                    f"got {type(rng).__name__}")


class ClipRandAugment:
    """RandAugment with one draw per clip (see the module docstring).

    ``config``: a timm RandAugment string (default the reference's
    ``rand-m7-n4-mstd0.5-inc1``), parsed by timm's ``rand_augment_transform``.
    ``hparams``: timm hparams, laid over the reference's: ``translate_const =
    int(0.45 * image_size)`` (used only by the absolute Translate ops, not in the ``inc1``
    set) and ``interpolation = bicubic``; no ``img_mean``, so geometric ops fill with timm's
    default grey (128, 128, 128). ``interpolation`` may be a name ("bicubic", "bilinear",
    ..., "random") or a PIL constant.

    Call with the clip's frames and a per-clip ``rng``: ``aug(frames, rng)``, or in two
    steps ``d = aug.draw(rng)`` then ``aug.apply(d, frames)``. Frames: a list of PIL images
    (returns a list), a uint8 numpy array ``[T, H, W, 3]`` (what
    :func:`nbretr.data.decoding.decode_frames` returns) or a uint8 tensor ``[T, H, W, 3]``
    or ``[T, 3, H, W]``; the result has the input's type, layout, dtype and shape.
    """

    def __init__(self, config: str = REFERENCE_CONFIG, hparams: dict | None = None, image_size: int = 224):
        aa = _timm_auto_augment()
        hp: dict = {"translate_const": int(image_size * 0.45), "interpolation": "bicubic"}
        hp.update(hparams or {})
        if "interpolation" in hp:
            hp["interpolation"] = _pil_interpolation(hp["interpolation"])
        self.config = config
        # timm's parser (it adds magnitude_std etc. to the dict it is given: pass a copy)
        ra = aa.rand_augment_transform(config, dict(hp))
        self.ops = list(ra.ops)
        self.num_layers = int(ra.num_layers)
        self.choice_weights = None if ra.choice_weights is None else np.asarray(ra.choice_weights, dtype=np.float64)
        self.hparams = dict(self.ops[0].hparams) if self.ops else hp
        self._by_name = {op.name: op for op in self.ops}
        self._level_denom = float(getattr(aa, "_LEVEL_DENOM", 10.0))

    # ---- what the config gave -------------------------------------------------------
    @property
    def op_names(self) -> list[str]:
        """The op set a clip's ops are drawn from (timm's, in timm's order)."""
        return [op.name for op in self.ops]

    @property
    def magnitude(self) -> float:
        return float(self.ops[0].magnitude)

    @property
    def magnitude_std(self) -> float:
        return float(self.ops[0].magnitude_std)

    @property
    def prob(self) -> float:
        return float(self.ops[0].prob)

    @property
    def fill(self):
        return self.ops[0].kwargs["fillcolor"]

    @property
    def interpolation(self):
        return self.ops[0].kwargs["resample"]

    def __repr__(self) -> str:
        return (f"ClipRandAugment({self.config!r}: n={self.num_layers}, m={self.magnitude:g}, "
                f"mstd={self.magnitude_std:g}, p={self.prob:g}, {len(self.ops)} ops, fill={self.fill}, "
                f"interpolation={getattr(self.interpolation, 'name', self.interpolation)})")

    # ---- draw -----------------------------------------------------------------------
    def draw(self, rng=None) -> ClipDraw:
        """Draw one clip's augmentation: the op slots (uniformly with replacement, or
        weighted without replacement for a weighted ``t`` set, as timm), then per slot, in
        timm's order: fires or not, magnitude noise and clipping, the level arguments (the
        random sign), the interpolation when it is a random choice. Only ``rng`` is used;
        Python's and NumPy's global states are left as they were (``rng=None`` takes one
        seed from Python's global ``random``)."""
        r = _as_random(rng)
        k = len(self.ops)
        if self.choice_weights is None:
            idx = [r.randrange(k) for _ in range(self.num_layers)]
        else:
            gen = np.random.default_rng(r.getrandbits(64))
            idx = gen.choice(k, self.num_layers, replace=False, p=self.choice_weights).tolist()
        out = []
        for i in idx:
            op = self.ops[i]
            if op.prob < 1.0 and r.random() > op.prob:
                out.append(OpDraw(op.name, False))
                continue
            m = float(op.magnitude)
            std = float(op.magnitude_std or 0.0)
            if std == float("inf"):
                m = r.uniform(0.0, m)
            elif std > 0:
                m = r.gauss(m, std)
            upper = getattr(op, "magnitude_max", None) or self._level_denom
            m = max(0.0, min(m, upper))
            seed = r.getrandbits(63)
            if op.level_fn is not None:
                # timm's level function (its sign comes from Python's `random`): run it once,
                # on a state seeded from this clip's generator
                with _FixedPythonRandom(seed):
                    args = tuple(op.level_fn(m, op.hparams))
            else:
                args = ()
            resample = op.kwargs.get("resample")
            if isinstance(resample, (list, tuple)):
                resample = r.choice(list(resample))
            out.append(OpDraw(op.name, True, m, args, resample, seed))
        d = ClipDraw(tuple(out))
        if log.isEnabledFor(logging.DEBUG):
            log.debug("randaugment draw: %s", d)
        return d

    # ---- apply ----------------------------------------------------------------------
    def apply_image(self, d: ClipDraw, img):
        """Apply a clip's draw to one PIL image."""
        for o in d.applied:
            op = self._by_name.get(o.name)
            if op is None:
                raise ValueError(f"op {o.name!r} is not in this augmentation's set {self.op_names}")
            kwargs = dict(op.kwargs)
            kwargs["resample"] = o.resample if o.resample is not None else kwargs.get("resample")
            with _FixedPythonRandom(o.seed):
                img = op.aug_fn(img, *o.args, **kwargs)
        return img

    def apply(self, d: ClipDraw, frames, channels_last: bool | None = None):
        """Apply draw ``d`` to every frame of ``frames`` (see the class docstring for the
        forms). ``channels_last`` picks the layout of a tensor/array whose last and second
        dimensions are both 3 (default: guessed, channels-last first). When no op fired the
        input itself is returned."""
        if not d.applied:
            return frames
        if isinstance(frames, (list, tuple)):
            out = [self.apply_image(d, im) for im in frames]
            return out if isinstance(frames, list) else tuple(out)
        from PIL import Image
        is_torch = not isinstance(frames, np.ndarray)
        if is_torch:
            import torch
            if not isinstance(frames, torch.Tensor):
                raise TypeError(f"frames must be a list of PIL images, a numpy array or a tensor, "
                                f"got {type(frames).__name__}")
            if frames.dtype != torch.uint8:
                raise TypeError(f"frames must be uint8 (RandAugment works on 8-bit images, before "
                                f"normalisation), got {frames.dtype}")
            device = frames.device
            arr = frames.detach().cpu().numpy()
        else:
            if frames.dtype != np.uint8:
                raise TypeError(f"frames must be uint8 (RandAugment works on 8-bit images, before "
                                f"normalisation), got {frames.dtype}")
            arr = frames
        if arr.ndim != 4:
            raise ValueError(f"frames must be [T, H, W, 3] or [T, 3, H, W], got shape {tuple(arr.shape)}")
        if channels_last is None:
            if arr.shape[-1] == 3:
                channels_last = True
            elif arr.shape[1] == 3:
                channels_last = False
            else:
                raise ValueError(f"frames must be [T, H, W, 3] or [T, 3, H, W], got shape {tuple(arr.shape)}")
        hwc = arr if channels_last else arr.transpose(0, 2, 3, 1)
        if hwc.shape[-1] != 3:
            raise ValueError(f"frames must have 3 (RGB) channels, got shape {tuple(arr.shape)}")
        out = np.stack([np.asarray(self.apply_image(d, Image.fromarray(np.ascontiguousarray(f), "RGB")))
                        for f in hwc])
        if not channels_last:
            out = np.ascontiguousarray(out.transpose(0, 3, 1, 2))
        if is_torch:
            import torch
            return torch.from_numpy(out).to(device)
        return out

    def __call__(self, frames, rng=None, channels_last: bool | None = None):
        """``apply(draw(rng), frames)``: one clip, one draw."""
        return self.apply(self.draw(rng), frames, channels_last=channels_last)


def make_augment(kind: str = "none", image_size: int = 224, config: str = REFERENCE_CONFIG,
                 hparams: dict | None = None) -> ClipRandAugment | None:
    """The clip augmentation named by ``--augment``: ``"none"`` -> None (timm not needed),
    ``"randaugment"`` -> :class:`ClipRandAugment` (the reference's config by default)."""
    key = (kind or "none").lower()
    if key == "none":
        return None
    if key == "randaugment":
        return ClipRandAugment(config, hparams=hparams, image_size=image_size)
    raise ValueError(f"unknown augmentation {kind!r}; choose one of {list(AUGMENT_CHOICES)}")


__all__ = ["ClipRandAugment", "ClipDraw", "OpDraw", "make_augment", "REFERENCE_CONFIG", "AUGMENT_CHOICES"]
