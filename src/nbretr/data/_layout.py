"""Helpers shared by the dataset layouts: finding the video folder, reading id lists and
JSON with problems reported by file and line."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nbretr.data.decoding import index_folder, strip_video_ext


def video_dir(ds, candidates: tuple[str, ...]) -> Path:
    """The folder holding ``ds``'s videos: option ``video_dir`` (absolute, or relative to
    root), else the first of ``candidates`` under root that exists (root itself last)."""
    given = ds._options.get("video_dir")
    if given is not None:
        p = Path(given)
        p = p if p.is_absolute() else ds.root / p
        if not p.is_dir():
            raise FileNotFoundError(f"{ds.name}: video_dir {p} does not exist")
        return p
    for c in candidates:
        p = ds.root / c
        if p.is_dir() and any(index_folder(p)):
            return p
    return ds.root


def read_json(ds, path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{ds.name}: annotation file {path} does not exist")
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        ds._problem(path, getattr(err, "lineno", None), f"malformed JSON: {err}")
        return None


def read_id_list(ds, path: Path) -> list[tuple[int, str]]:
    """``(line number, id)`` for each non-blank line of a one-id-per-line file; a line that
    is not a single token is reported and skipped."""
    if not path.is_file():
        raise FileNotFoundError(f"{ds.name}: list file {path} does not exist")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 1:
            ds._problem(path, n, f"malformed line (expected one video id): {line[:80]!r}")
            continue
        out.append((n, strip_video_ext(parts[0])))
    return out


def lookup(index: dict[str, Path], vid: str, prefixes: tuple[str, ...] = ("",)) -> Path | None:
    stem = strip_video_ext(vid)
    for pre in prefixes:
        p = index.get(pre + stem)
        if p is not None:
            return p
    return None

