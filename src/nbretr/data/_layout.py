"""Helpers shared by the dataset layouts: finding the video folder and indexing it once,
reading id lists and annotation files with problems reported by file and line.

A structurally broken annotation file (not valid JSON, a truncated pickle, a missing
top-level key, the wrong type at the top) is one :class:`AnnotationError` naming the file
and what is wrong; a malformed entry inside a sound file is a *problem* (reported, the
entry dropped) because one bad line should not stop a run.
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

from nbretr.data.decoding import VIDEO_EXTENSIONS, strip_video_ext


class AnnotationError(ValueError):
    """A malformed annotation file, or (strict mode) a malformed entry or a video that is
    not there. The message names the file and what is wrong in it."""


class MissingVideosError(AnnotationError):
    """The videos of a split are not where they were looked for: none found, or more than
    the allowed share (``max_missing``, 1%) missing without ``allow_missing=True``."""


# Files under a video folder that are never videos (annotations, partial downloads, ...);
# every other file is a candidate, whatever its extension, as in the reference's os.walk.
NOT_VIDEO = frozenset((".json", ".txt", ".csv", ".tsv", ".pkl", ".pickle", ".md", ".py", ".yaml", ".yml",
                       ".log", ".tmp", ".part", ".crdownload", ".aria2", ".zip", ".tar", ".gz", ".tgz", ".bz2",
                       ".xz", ".7z", ".rar", ".npy", ".npz", ".h5", ".hdf5", ".lock", ".sh", ".html", ".xml",
                       ".srt", ".vtt", ".jpg", ".jpeg", ".png", ".gif", ".pdf", ".sha256", ".md5"))


class VideoIndex:
    """Every file under ``folder`` (recursively, following links once; hidden files and
    the :data:`NOT_VIDEO` kinds skipped), indexed by name once, so that looking up a video
    id costs a dict access.

    A file ``N`` is found under the keys ``splitext(N)`` (the reference's rule: ``X.mov.mp4``
    is id ``X.mov``, ``vid.avi`` is ``vid``), ``N`` itself (``X.mov`` is id ``X.mov``) and
    ``N`` with every video extension stripped (``X.mov.mp4`` and ``X.mov`` are id ``X``).
    When several files claim one key, the reference's rule wins, then the exact name, then
    a known video extension, .mp4 first, then the first path in sorted order."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.count = 0
        best: dict[str, tuple[tuple, Path]] = {}
        seen_dirs: set[tuple[int, int]] = set()
        for dirpath, dirnames, filenames in os.walk(self.folder, followlinks=True):
            st = os.stat(dirpath)
            if (st.st_dev, st.st_ino) in seen_dirs:  # a link loop
                dirnames[:] = []
                continue
            seen_dirs.add((st.st_dev, st.st_ino))
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                low = name.lower()
                ext = os.path.splitext(low)[1]
                if name.startswith(".") or ext in NOT_VIDEO:
                    continue
                path = Path(dirpath) / name
                self.count += 1
                known = ext in VIDEO_EXTENSIONS
                tie = (0 if known else 1, 0 if ext == ".mp4" else 1, str(path))
                keys = [(os.path.splitext(name)[0], 0), (name, 1)]
                stem, prev = strip_video_ext(name), name
                while stem != prev:
                    keys.append((stem, 2))
                    stem, prev = strip_video_ext(stem), stem
                for key, rank in keys:
                    if not key:
                        continue
                    score = (rank,) + tie
                    old = best.get(key)
                    if old is None or score < old[0]:
                        best[key] = (score, path)
        self._paths = {k: p for k, (_, p) in best.items()}

    def __len__(self) -> int:
        return self.count

    def find(self, video_id: str, prefixes: tuple[str, ...] = ("",)) -> Path | None:
        """The file of ``video_id`` (as written in the annotation, with or without a
        container extension), trying each prefix (e.g. ActivityNet's ``v_``)."""
        for pre in prefixes:
            for key in (pre + video_id, pre + strip_video_ext(video_id)):
                p = self._paths.get(key)
                if p is not None:
                    return p
        return None


def video_dir(ds, candidates: tuple[str, ...]) -> Path:
    """The folder holding ``ds``'s videos: option ``video_dir`` (absolute, or relative to
    root), else the first of ``candidates`` under root that exists and holds a file, else
    root itself. It is searched recursively (:class:`VideoIndex`)."""
    given = ds._options.get("video_dir")
    if given is not None:
        p = Path(given).expanduser()
        p = p if p.is_absolute() else ds.root / p
        if not p.is_dir():
            raise FileNotFoundError(f"{ds.name}: video_dir {p} does not exist")
        return p
    for c in candidates:
        p = ds.root / c
        if p.is_dir() and _has_file(p):
            return p
    return ds.root


def _has_file(folder: Path) -> bool:
    for _, _, files in os.walk(folder, followlinks=True):
        if any(not f.startswith(".") for f in files):
            return True
    return False


def _need_file(ds, path: Path, what: str = "annotation file") -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{ds.name}: {what} {path} does not exist")


def read_json(ds, path: Path, kind: type | None = None) -> Any:
    """The parsed content of ``path``; not valid JSON (a truncated download, say), or not
    of type ``kind`` at the top, is one :class:`AnnotationError` naming the file."""
    _need_file(ds, path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise AnnotationError(f"{ds.name}: {path} is not a UTF-8 JSON file ({err})") from None
    except ValueError as err:
        where = f"line {err.lineno} column {err.colno}" if hasattr(err, "lineno") else "somewhere"
        size = path.stat().st_size
        raise AnnotationError(f"{ds.name}: {path} is not valid JSON: {getattr(err, 'msg', err)} at {where} "
                              f"(the file has {size:,} bytes; a truncated download? fetch it again)") from None
    if kind is not None and not isinstance(data, kind):
        raise AnnotationError(f"{ds.name}: {path} should hold a JSON {_json_kind(kind)} at the top, "
                              f"found a {_json_kind(type(data))}")
    return data


def need_key(ds, path: Path, data: dict, key: str, kind: type) -> Any:
    """``data[key]`` of the top-level object read from ``path``; absent, or not of type
    ``kind``, is one :class:`AnnotationError` naming the file and the key."""
    if key not in data:
        keys = ", ".join(repr(k) for k in list(data)[:8]) or "none"
        raise AnnotationError(f"{ds.name}: {path} has no key {key!r} at the top (its keys: {keys}); "
                              f"is it the right file?")
    if not isinstance(data[key], kind):
        raise AnnotationError(f"{ds.name}: {path}: {key!r} should be a JSON {_json_kind(kind)}, "
                              f"found a {_json_kind(type(data[key]))}")
    return data[key]


def _json_kind(t: type) -> str:
    return {dict: "object", list: "list", str: "string", int: "number", float: "number",
            bool: "boolean", type(None): "null"}.get(t, t.__name__)


def read_pickle(ds, path: Path, kind: type | None = None) -> Any:
    _need_file(ds, path)
    try:
        with open(path, "rb") as f:
            data = pickle.load(f)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError,
            IndexError, KeyError) as err:
        raise AnnotationError(f"{ds.name}: {path} is not a readable pickle ({type(err).__name__}: "
                              f"{str(err)[:120]}; a truncated download? fetch it again)") from None
    if kind is not None and not isinstance(data, kind):
        raise AnnotationError(f"{ds.name}: {path} should hold a {kind.__name__}, found a {type(data).__name__}")
    return data


def read_id_list(ds, path: Path) -> list[tuple[int, str]]:
    """``(line number, id)`` for each non-blank line of a one-id-per-line file, ids as
    written (a container extension kept; lookups try with and without it); a line that is
    not a single token is a problem (reported, skipped)."""
    _need_file(ds, path, "list file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise AnnotationError(f"{ds.name}: {path} is not a UTF-8 text file ({err})") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 1:
            ds._problem(path, n, f"malformed line (expected one video id): {line[:80]!r}")
            continue
        out.append((n, parts[0]))
    return out


def first_occurrences(ds, ids: list[tuple[int | str, str]], key=strip_video_ext
                      ) -> list[tuple[int | str, str]]:
    """``ids`` with repeats removed (the first kept), as the reference adds a repeated id
    once; the repeats are counted on ``ds.repeated_ids``. Option ``repeated_ids="repeat"``
    keeps them (the reference's MSVD loader, which iterates its list as written)."""
    if ds._options.get("repeated_ids", "once") == "repeat":
        return list(ids)
    if ds._options.get("repeated_ids", "once") != "once":
        raise ValueError(f"{ds.name}: repeated_ids must be 'once' or 'repeat', "
                         f"got {ds._options.get('repeated_ids')!r}")
    seen: set[str] = set()
    out = []
    for where, vid in ids:
        k = key(vid)
        if k in seen:
            ds.repeated_ids.append(vid)
            continue
        seen.add(k)
        out.append((where, vid))
    return out

