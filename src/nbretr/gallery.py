"""The on-disk video index of ``python -m nbretr.index`` and its memory-mapped reader.

An index folder holds:

- ``shard-NNNNN.safetensors``: one block of videos, tensors ``global`` ``[n, D]`` (the
  video's global token, for the first stage), ``tokens`` ``[n, F, D]`` (L2-normalised
  frame tokens), ``mask`` ``[n, F]`` (uint8) and ``weight`` ``[n, F]`` (the WTI frame
  weights, float32): exactly the inputs of ``nbretr.ops.topk_centrality`` and
  ``nbretr.ops.wti_similarity``;
- ``manifest.json``: ``format`` ("nbretr-index"), ``version``, ``model`` (folder and
  fingerprint, the SHA-256 of its ``model.safetensors``), ``data`` (the frame sampling the
  videos were encoded with), ``video_dir``, ``shards`` (file, item count, bytes, SHA-256 and
  the source path of every item, in order), ``skipped`` (unreadable files, with the reason),
  ``complete`` (False while a build is running or was interrupted), ``query_bank`` and
  ``bank_stats`` (for ``--correction``), ``faiss`` (an optional IVF index of the global tokens);
- ``skipped.txt``: the unreadable files, one per line.

Shards are written to a temporary file and renamed, and the manifest is rewritten (also
atomically) after every shard, so an interrupted build keeps every finished shard and
resumes after it. :class:`Gallery` reads the shards through ``numpy.memmap`` (the
safetensors layout: an 8-byte header length, a JSON header, raw little-endian data), so a
gallery larger than memory is scanned shard by shard with only the pages in use resident.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from nbretr.checkpoint import file_sha256

FORMAT = "nbretr-index"
VERSION = 1
MANIFEST = "manifest.json"
SKIPPED = "skipped.txt"
FIELDS = ("global", "tokens", "mask", "weight")
_DTYPES = {"F32": np.float32, "F16": np.float16, "U8": np.uint8, "I8": np.int8, "I64": np.int64, "F64": np.float64}


class IndexError(ValueError):  # noqa: A001  (shadows the builtin inside this module only)
    """A missing, corrupt or mismatched index file; the message names it."""


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
                      ) -> tuple[str, int]:
    """Write ``tensors`` atomically (temporary file, fsync, rename); returns (sha256, bytes)."""
    from safetensors.torch import save_file
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        digest, size = file_sha256(tmp), tmp.stat().st_size
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return digest, size


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """``(header, data start)`` of a safetensors file; errors name the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise IndexError(f"index shard {path} is truncated ({size} bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100 << 20):
                raise IndexError(f"index shard {path} is corrupt (header length {n} in a {size}-byte file)")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise FileNotFoundError(f"index shard {path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise IndexError(f"index shard {path} is corrupt (its header is not valid JSON)") from None
    if not isinstance(header, dict):
        raise IndexError(f"index shard {path} is corrupt (header is not a mapping)")
    start = 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        b, e = info["data_offsets"]
        if start + e > size:
            raise IndexError(f"index shard {path} is truncated: tensor {name!r} ends at byte {start + e}, "
                             f"the file has {size}")
    return header, start


def open_shard(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a shard as memory-mapped torch tensors (copy-on-write: never written
    back to the file)."""
    header, start = read_header(path)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise IndexError(f"index shard {path}: tensor {name!r} has dtype {info['dtype']}, not one nbretr writes")
        b, e = info["data_offsets"]
        shape = tuple(info["shape"])
        if e - b == 0:
            out[name] = torch.from_numpy(np.zeros(shape, dtype=_DTYPES[info["dtype"]]))
            continue
        arr = np.memmap(path, dtype=_DTYPES[info["dtype"]], mode="c", offset=start + b, shape=shape)
        out[name] = torch.from_numpy(arr)
    return out


def read_manifest(index_dir: str | os.PathLike) -> dict[str, Any]:
    d = Path(index_dir)
    path = d / MANIFEST
    if not d.is_dir():
        raise FileNotFoundError(f"index folder {d} does not exist")
    if not path.is_file():
        raise FileNotFoundError(f"{d} holds no {MANIFEST}: not an nbretr index (python -m nbretr.index builds one)")
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise IndexError(f"index manifest {path} is corrupt ({err})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise IndexError(f"{path} is not an nbretr index manifest")
    if int(m.get("version", 0)) > VERSION:
        raise IndexError(f"{path} has version {m['version']}; this nbretr reads up to {VERSION}")
    return m


def write_manifest(index_dir: str | os.PathLike, manifest: dict[str, Any]) -> None:
    d = Path(index_dir)
    tmp = d / f".{MANIFEST}.{os.getpid()}.partial"
    tmp.write_text(json.dumps(manifest, indent=1))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, d / MANIFEST)
    skipped = manifest.get("skipped", [])
    (d / SKIPPED).write_text("".join(f"{s['path']}\t{s['reason']}\n" for s in skipped))


class Gallery:
    """The shards of an index, memory-mapped. ``verify=True`` checks every shard's SHA-256
    (reads every byte); otherwise each shard's size and header are checked against the
    manifest (cheap). ``shards``: the shard numbers this process reads (a rank's share)."""

    def __init__(self, index_dir: str | os.PathLike, *, verify: bool = False, shards: Sequence[int] | None = None):
        self.dir = Path(index_dir)
        self.manifest = read_manifest(self.dir)
        self.entries = self.manifest["shards"]
        self.offsets = np.cumsum([0] + [s["count"] for s in self.entries]).tolist()
        self.size = self.offsets[-1]
        self.owned = list(range(len(self.entries))) if shards is None else list(shards)
        self._open: dict[int, dict[str, torch.Tensor]] = {}
        for i in self.owned:
            self._check(i, verify)

    def _check(self, i: int, verify: bool) -> None:
        e = self.entries[i]
        path = self.dir / e["file"]
        if not path.is_file():
            raise FileNotFoundError(f"index shard {path} is missing (listed in {self.dir / MANIFEST}); rebuild it "
                                    "with python -m nbretr.index into a new folder, or restore the file")
        size = path.stat().st_size
        if size != e["bytes"]:
            raise IndexError(f"index shard {path} is corrupt or truncated: {size} bytes, the manifest says "
                             f"{e['bytes']}")
        if verify and file_sha256(path) != e["sha256"]:
            raise IndexError(f"index shard {path} is corrupt: its SHA-256 differs from the manifest's")
        t = self.shard(i)
        for name in FIELDS:
            if name not in t:
                raise IndexError(f"index shard {path} lacks the tensor {name!r}")
            if t[name].shape[0] != e["count"]:
                raise IndexError(f"index shard {path}: {name} has {t[name].shape[0]} rows, the manifest says "
                                 f"{e['count']}")

    def shard(self, i: int) -> dict[str, torch.Tensor]:
        if i not in self._open:
            self._open[i] = open_shard(self.dir / self.entries[i]["file"])
        return self._open[i]

    def __len__(self) -> int:
        return self.size

    @property
    def dim(self) -> int:
        return int(self.entries[0]["dim"]) if self.entries else 0

    def path(self, index: int) -> str:
        s = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.entries[s]["paths"][index - self.offsets[s]]

    def paths(self) -> list[str]:
        return [p for e in self.entries for p in e["paths"]]

    def iter_shards(self) -> Iterator[tuple[int, int, dict[str, torch.Tensor]]]:
        """``(shard number, offset of its first item, its tensors)`` for the owned shards."""
        for i in self.owned:
            yield i, self.offsets[i], self.shard(i)

    def gather(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(tokens float32, mask, weight)`` of the items ``indices`` (global, any order),
        read from their shards (only those rows are copied)."""
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        sh = torch.as_tensor(np.searchsorted(self.offsets, idx.numpy(), side="right") - 1)
        tok = msk = wt = None
        for s in sh.unique().tolist():
            sel = (sh == s).nonzero().squeeze(1)
            local = (idx[sel] - self.offsets[s]).numpy()
            t = self.shard(s)
            a = torch.from_numpy(np.asarray(t["tokens"].numpy()[local])).float()
            m = torch.from_numpy(np.asarray(t["mask"].numpy()[local]))
            w = torch.from_numpy(np.asarray(t["weight"].numpy()[local])).float()
            if tok is None:
                tok = a.new_empty((len(idx),) + tuple(a.shape[1:]))
                msk = m.new_empty((len(idx),) + tuple(m.shape[1:]))
                wt = w.new_empty((len(idx),) + tuple(w.shape[1:]))
            tok[sel], msk[sel], wt[sel] = a, m, w
        if tok is None:
            raise ValueError("gather: no indices")
        return tok, msk, wt

    def rows(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(tokens float32, mask, weight)`` of the items ``[start, stop)``."""
        return self.gather(torch.arange(start, stop))


def create_index(out: str | os.PathLike, shards, *, model: dict | None = None, data: dict | None = None,
                 paths=None) -> dict:
    """Write an index of already computed features (benchmarks, tests): ``shards`` yields
    dicts of ``global``, ``tokens``, ``mask``, ``weight`` tensors; ``paths(start, n)``
    names items (default ``item-<n>``). ``out`` must not exist."""
    import time
    d = Path(out)
    d.mkdir(parents=True, exist_ok=False)
    manifest = {"format": FORMAT, "version": VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "model": model or {"dir": "", "fingerprint": "", "source": "generated features"},
                "data": data or {}, "dtype": "", "video_dir": "", "shards": [], "skipped": [], "complete": False}
    n = 0
    for i, t in enumerate(shards):
        count = int(t["global"].shape[0])
        digest, size = write_safetensors(d / shard_name(i), {k: t[k] for k in FIELDS}, {"format": "pt"})
        names = paths(n, count) if paths is not None else [f"item-{j}" for j in range(n, n + count)]
        manifest["shards"].append({"file": shard_name(i), "count": count, "bytes": size, "sha256": digest,
                                   "dim": int(t["global"].shape[1]), "frames": int(t["tokens"].shape[1]),
                                   "paths": names})
        n += count
    manifest["complete"] = True
    write_manifest(d, manifest)
    return manifest
