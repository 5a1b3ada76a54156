"""Checkpoints: written atomically (temporary file in the same folder, fsync, rename), read
with ``weights_only=True``. Everything a resumed run needs to continue exactly: model,
optimiser, scheduler, AMP scaler, memory bank, RNG states, step counters, config.

A run keeps two: ``last.pt`` and the one before it, ``previous.pt`` (:func:`save_rotating`).
:func:`load_with_fallback` reads ``last.pt`` and, when that file is unreadable (a disk that
filled up, a copy cut short), falls back to ``previous.pt`` with a warning naming both.

A checkpoint read as an nbretr checkpoint (``required`` keys given) that holds keys this
version does not read is loaded with an :class:`UnknownCheckpointKeysWarning` naming them
(:func:`check_keys`), never silently.
"""
from __future__ import annotations

import hashlib
import logging
import os
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("nbretr")

TMP_SUFFIX = ".partial"
PREVIOUS_NAME = "previous.pt"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read (truncated, corrupt, not a checkpoint)."""


class UnknownCheckpointKeysWarning(UserWarning):
    """A checkpoint holds keys that this version of nbretr does not read (written by another
    version, or by hand): they are ignored, and named in this warning."""


#: every top-level key nbretr writes and reads: a training checkpoint (last.pt, previous.pt;
#: nbretr.train.Trainer.state) and the best-on-validation one (best.pt: model, global_step,
#: config, val_rsum)
CHECKPOINT_KEYS = frozenset({
    "model", "optimizer", "scheduler", "scaler", "bank", "rng", "epoch", "step_in_epoch", "global_step",
    "config", "eval_best", "nbretr_version", "val_rsum",
})


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """The SHA-256 of a file, read in chunks (model and index fingerprints)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def check_keys(state: dict[str, Any], path: str | os.PathLike, known: frozenset[str] = CHECKPOINT_KEYS) -> list[str]:
    """The keys of ``state`` that are not in ``known``, sorted; when there are any, an
    :class:`UnknownCheckpointKeysWarning` (and a log warning) names them and the file."""
    unknown = sorted(str(k) for k in set(state) - known)
    if unknown:
        msg = (f"checkpoint {path}: ignoring key(s) this version of nbretr does not read: {unknown} "
               "(written by another version?)")
        log.warning("%s", msg)
        warnings.warn(msg, UnknownCheckpointKeysWarning, stacklevel=3)
    return unknown


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` so that a reader (or a crash at any moment) sees either the
    previous complete file or the new complete file, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path


def save_rotating(obj: Any, path: str | os.PathLike) -> Path:
    """:func:`save_atomic` to ``path`` after moving the file already there (if any) to
    ``previous.pt`` beside it: a crash at any moment leaves at least one complete file."""
    path = Path(path)
    if path.is_file():
        os.replace(path, path.with_name(PREVIOUS_NAME))
    return save_atomic(obj, path)


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu",
         required: tuple[str, ...] = ()) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``. A missing file raises
    ``FileNotFoundError`` naming it; a file that cannot be read, or that lacks one of the
    ``required`` keys, raises :class:`CheckpointError` naming it. With ``required``, keys
    outside :data:`CHECKPOINT_KEYS` are named in an :class:`UnknownCheckpointKeysWarning`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001  (zip, pickle, EOF and storage errors all mean "unreadable")
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or not an nbretr checkpoint): "
                              f"{type(err).__name__}: {first}") from err
    if required:
        if not isinstance(obj, dict):
            raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not an nbretr checkpoint")
        missing = [k for k in required if k not in obj]
        if missing:
            raise CheckpointError(f"checkpoint {path} lacks {missing}: not an nbretr training checkpoint")
        check_keys(obj, path)
    return obj


def load_with_fallback(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                       required: tuple[str, ...] = ()) -> tuple[dict[str, Any], Path]:
    """:func:`load` ``path``; when it is unreadable and a ``previous.pt`` sits beside it,
    warn naming both and load that one instead. Returns ``(state, the file read)``."""
    path = Path(path)
    try:
        return load(path, map_location, required), path
    except (CheckpointError, FileNotFoundError) as err:
        prev = path.with_name(PREVIOUS_NAME)
        if path.name == PREVIOUS_NAME or not prev.is_file():
            if isinstance(err, FileNotFoundError):
                raise
            raise CheckpointError(f"{err}; no earlier checkpoint ({PREVIOUS_NAME}) is kept beside it") from err
        log.warning("%s; falling back to the previous checkpoint %s", err, prev)
        return load(prev, map_location, required), prev


def clean_partials(folder: str | os.PathLike) -> list[Path]:
    """Remove temporary files left by a run killed while saving; returns what was removed."""
    removed = []
    for p in Path(folder).glob(f"*{TMP_SUFFIX}"):
        p.unlink(missing_ok=True)
        removed.append(p)
    if removed:
        log.warning("removed %d partial checkpoint file(s) from an interrupted save: %s",
                    len(removed), ", ".join(p.name for p in removed))
    return removed


# -- RNG state as plain tensors and numbers (weights_only-safe) --------------------------

def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_gauss": float(np_state[4]),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
