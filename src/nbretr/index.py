"""``python -m nbretr.index MODEL_DIR VIDEO_DIR --out INDEX_DIR``: decode and encode every
video of a folder with an exported model and store what search needs (the global token,
the WTI frame tokens, masks and weights) in safetensors shards with a manifest (see
:mod:`nbretr.gallery`).

    python -m nbretr.index models/mine /videos --out index/                # build (or resume)
    python -m nbretr.index models/mine /videos --out index/ --add          # append new videos
    python -m nbretr.index models/mine /videos --out index/ --query-bank captions.txt   # + --correction

Videos are decoded with nbretr's decoders and the model's frame sampling, in DataLoader
workers; unreadable files are skipped, counted and listed (``skipped.txt``). An
interrupted build (Ctrl-C, a crash) keeps every finished shard: the same command resumes
after them. ``--add`` encodes the videos of VIDEO_DIR (or ``--files``) not yet indexed into
new shards; nothing already indexed is rewritten.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from nbretr import gallery as G

log = logging.getLogger("nbretr")

DEFAULT_SHARD_SIZE = 4096
FAISS_MIN_ITEMS = 200_000     # the first stage goes through an IVF index from this gallery size (faiss installed)


# -- the videos ----------------------------------------------------------------------------------

def video_extensions() -> tuple[str, ...]:
    from nbretr.data.decoding import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
    return tuple(VIDEO_EXTENSIONS) + tuple(IMAGE_EXTENSIONS)


def list_videos(video_dir: str | os.PathLike, files: str | os.PathLike | None = None) -> list[Path]:
    """The video files to index: every file under ``video_dir`` (recursively) with a video or
    image extension, sorted; or the paths listed in ``files`` (one per line, relative to
    ``video_dir`` or absolute, in that order). Errors name the folder or file."""
    d = Path(video_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"video folder {d} does not exist" if not d.exists() else
                                f"{d} is a file, not a video folder")
    if files is not None:
        lst = Path(files)
        if not lst.is_file():
            raise FileNotFoundError(f"--files {lst} does not exist")
        out = []
        for n, line in enumerate(lst.read_text().splitlines(), 1):
            if not line.strip():
                raise ValueError(f"--files {lst}: line {n} is empty; list one video path per line")
            p = Path(line.strip())
            out.append((p if p.is_absolute() else d / p).resolve())
        if not out:
            raise ValueError(f"--files {lst} lists no videos")
        return out
    ext = video_extensions()
    out = sorted(p.resolve() for p in d.rglob("*") if p.is_file() and p.suffix.lower() in ext)
    if not out:
        raise ValueError(f"video folder {d} holds no video files (searched recursively for "
                         f"{', '.join(sorted({e for e in ext})[:8])}, ...)")
    return out


class VideoFiles(torch.utils.data.Dataset):
    """Decoded, CLIP-preprocessed videos of a list of files (the dataset loaders' pipeline:
    :func:`nbretr.data.decode_frames`, :class:`~nbretr.data.Preprocess`, padding to
    ``max_frames``); an unreadable file comes back with ``bad`` and its reason."""

    def __init__(self, paths: Sequence[Path], data: dict[str, Any]):
        from nbretr.data.decoding import Preprocess
        self.paths = [str(p) for p in paths]
        self.data = dict(data)
        self.preprocess = Preprocess(image_size=int(data["image_size"]))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        from nbretr.data.decoding import VideoDecodeError, decode_frames, pad_frames
        d, s = self.data, int(self.data["image_size"])
        try:
            frames = decode_frames(self.paths[i], int(d["max_frames"]), float(d["video_framerate"]),
                                   sampling=d.get("frame_sampling") or "uniform")
            video, mask = pad_frames(self.preprocess(frames), int(d["max_frames"]))
            return {"video": video, "video_mask": mask, "i": i, "bad": False, "reason": ""}
        except VideoDecodeError as err:
            reason = f"{err.reason}: {err.detail}" if err.detail else err.reason
        except Exception as err:  # noqa: BLE001  (any decoder failure: skip the file, say why)
            reason = f"undecodable: {type(err).__name__}: {str(err)[:200]}"
        return {"video": torch.zeros(int(d["max_frames"]), 3, s, s),
                "video_mask": torch.zeros(int(d["max_frames"]), dtype=torch.long), "i": i, "bad": True,
                "reason": reason}


# -- the features ---------------------------------------------------------------------------------

def _global(model, x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, text: bool) -> torch.Tensor:
    if model.config.baseline:  # no clustering modules: the weight-averaged normalised token
        return F.normalize((weight.unsqueeze(-1) * F.normalize(x, dim=-1)).sum(1), dim=-1)
    return (model.global_tokens_text if text else model.global_tokens_video)(x, mask).float()


@torch.no_grad()
def encode_videos(model, video: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """What search needs of a batch of videos: the global token (first stage) and the
    prepared WTI inputs, exactly as ``nbretr.eval`` prepares them."""
    v, m = model.encode_video(video, mask)
    v = v.float()
    w = model.token_weights_video(v, m).float()
    return {"global": _global(model, v, m, w, False), "tokens": F.normalize(v, dim=-1), "mask": m, "weight": w}


@torch.no_grad()
def encode_texts(model, tokenizer, texts: Sequence[str], max_words: int, device, batch: int = 256
                 ) -> dict[str, torch.Tensor]:
    """The same for captions or queries: global token and prepared WTI inputs."""
    parts: dict[str, list] = {"global": [], "tokens": [], "mask": [], "weight": []}
    for i in range(0, len(texts), batch):
        ids, mask = tokenizer(list(texts[i:i + batch]), max_words)
        t, m = model.encode_text(ids.to(device), mask.to(device))
        t = t.float()
        w = model.token_weights_text(t, m).float()
        parts["global"].append(_global(model, t, m, w, True))
        parts["tokens"].append(F.normalize(t, dim=-1))
        parts["mask"].append(m)
        parts["weight"].append(w)
    return {k: torch.cat(v) for k, v in parts.items()}


def read_lines(path: str | os.PathLike, what: str) -> list[str]:
    """Non-empty lines of a text file; an empty line is an error naming the file and line."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} {p} does not exist")
    lines = p.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            raise ValueError(f"{what} {p}: line {n} is empty; give one query per line")
    if not lines:
        raise ValueError(f"{what} {p} is empty")
    return [ln.strip() for ln in lines]


# -- building ----------------------------------------------------------------------------------------

def _new_manifest(model_dir: Path, fp: str, mcfg: dict, video_dir: Path, dtype: str) -> dict[str, Any]:
    return {"format": G.FORMAT, "version": G.VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": {"dir": str(model_dir.resolve()), "fingerprint": fp, "source": mcfg.get("source", "")},
            "data": dict(mcfg["data"]), "dtype": dtype, "video_dir": str(video_dir.resolve()),
            "shards": [], "skipped": [], "complete": False}


def check_model(manifest: dict[str, Any], fp: str, model_dir: Path, where: Path) -> None:
    if manifest["model"]["fingerprint"] != fp:
        raise G.IndexError(
            f"index {where} was built by another model: its manifest records model {manifest['model']['dir']} "
            f"(fingerprint {manifest['model']['fingerprint'][:16]}), {model_dir} has fingerprint {fp[:16]}; "
            "use that model, or build a new index")


def build_index(model_dir: str | os.PathLike, video_dir: str | os.PathLike, out: str | os.PathLike, *,
                add: bool = False, files: str | os.PathLike | None = None, shard_size: int = DEFAULT_SHARD_SIZE,
                batch_size: int = 32, num_workers: int = 2, device: str = "cpu", dtype: str = "float32",
                query_bank: str | os.PathLike | None = None, faiss: str = "auto", progress: bool = True,
                qbnorm_beta: float | None = None, qbnorm_k: int | None = None,
                dsl_temperature: float | None = None) -> dict[str, Any]:
    """Build, resume or extend (``add``) the index ``out``; returns its manifest."""
    from nbretr import pretrained
    from nbretr.runtime import FolderLock
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"--shard-size and --batch-size must be >= 1, got {shard_size} and {batch_size}")
    if dtype not in ("float32", "float16"):
        raise ValueError(f"--dtype must be float32 or float16, got {dtype!r}")
    if faiss not in ("auto", "yes", "no"):
        raise ValueError(f"--faiss must be auto, yes or no, got {faiss!r}")
    model_dir, video_dir, out = Path(model_dir), Path(video_dir), Path(out)
    mcfg = pretrained.read_config(model_dir)
    fp = pretrained.fingerprint(model_dir)
    manifest = None
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not an index folder")
    if out.is_dir() and (out / G.MANIFEST).exists():
        manifest = G.read_manifest(out)
        check_model(manifest, fp, model_dir, out)
        if manifest["complete"] and not add:
            raise ValueError(f"--out {out} already holds a complete index of {sum(s['count'] for s in manifest['shards'])} "
                             "videos; pass --add to append new videos, or choose a new folder (nothing is overwritten)")
        if not add and Path(manifest["video_dir"]) != video_dir.resolve():
            raise ValueError(f"--out {out} holds an interrupted index of {manifest['video_dir']}, not {video_dir}; "
                             "resume it with that folder, or pass --add to index this one into it")
        G.Gallery(out)  # every listed shard present and of the recorded size, before anything is added
    elif out.is_dir() and any(p for p in out.iterdir() if p.name != ".nbretr.lock"):
        raise ValueError(f"--out {out} is not empty and holds no index ({G.MANIFEST}); choose a new folder")
    elif add:
        raise FileNotFoundError(f"--add: {out} holds no index to add to; build it first (without --add)")
    videos = list_videos(video_dir, files)
    if query_bank is not None and manifest is not None and manifest.get("query_bank"):
        raise ValueError(f"--query-bank: index {out} already has a query bank ({manifest['query_bank']['file']})")
    bank_lines = read_lines(query_bank, "--query-bank") if query_bank is not None else None

    out.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(out, "--out")
    try:
        if manifest is None:
            manifest = _new_manifest(model_dir, fp, mcfg, video_dir, dtype)
            G.write_manifest(out, manifest)
        done = {p for s in manifest["shards"] for p in s["paths"]} | {s["path"] for s in manifest["skipped"]}
        todo = [p for p in videos if str(p) not in done]
        manifest["complete"] = False
        G.write_manifest(out, manifest)
        model, tok, _ = pretrained.load_model(model_dir, device=device)
        if bank_lines is not None:
            _store_query_bank(out, manifest, model, tok, bank_lines, Path(query_bank), device, qbnorm_beta,
                              qbnorm_k, dsl_temperature)
        n_before = sum(s["count"] for s in manifest["shards"])
        log.info("%s: %d video file(s) found, %d already indexed or skipped, %d to encode", video_dir, len(videos),
                 len(videos) - len(todo), len(todo))
        _encode_into(out, manifest, model, todo, shard_size, batch_size, num_workers, device, dtype, progress)
        if manifest.get("query_bank"):
            _bank_stats(out, manifest, model, device)
        _maybe_faiss(out, manifest, faiss)
        manifest["complete"] = True
        G.write_manifest(out, manifest)
        total = sum(s["count"] for s in manifest["shards"])
        manifest["_summary"] = {"found": len(videos), "new": total - n_before, "total": total}
        return manifest
    finally:
        lock.release(remove=True)


def _encode_into(out: Path, manifest: dict, model, todo: list[Path], shard_size: int, batch_size: int,
                 num_workers: int, device, dtype: str, progress: bool) -> None:
    from tqdm import tqdm

    from nbretr.data import collate
    if not todo:
        return
    ds = VideoFiles(todo, manifest["data"])
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
    buf: dict[str, list] = {"global": [], "tokens": [], "mask": [], "weight": []}
    paths: list[str] = []
    skipped: list[dict] = []
    store = torch.float16 if dtype == "float16" else torch.float32

    def flush():
        if not paths:
            if skipped:
                manifest["skipped"].extend(skipped)
                skipped.clear()
                G.write_manifest(out, manifest)
            return
        i = len(manifest["shards"])
        t = {"global": torch.cat(buf["global"]).to(store), "tokens": torch.cat(buf["tokens"]).to(store),
             "mask": torch.cat(buf["mask"]).to(torch.uint8), "weight": torch.cat(buf["weight"]).float()}
        digest, size = G.write_safetensors(out / G.shard_name(i), t, {"format": "pt"})
        manifest["shards"].append({"file": G.shard_name(i), "count": len(paths), "bytes": size, "sha256": digest,
                                   "dim": int(t["global"].shape[1]), "frames": int(t["tokens"].shape[1]),
                                   "paths": list(paths)})
        manifest["skipped"].extend(skipped)
        G.write_manifest(out, manifest)
        for v in buf.values():
            v.clear()
        paths.clear()
        skipped.clear()

    bar = tqdm(total=len(todo), unit="video", desc="index", disable=not progress, dynamic_ncols=True)
    n_skipped = 0
    try:
        for b in loader:
            bad = b["bad"]
            for j in bad.nonzero().flatten().tolist():
                skipped.append({"path": ds.paths[int(b["i"][j])], "reason": b["reason"][j]})
                n_skipped += 1
            keep = ~bad
            if keep.any():
                f = encode_videos(model, b["video"][keep].to(device), b["video_mask"][keep].to(device))
                for k in buf:
                    buf[k].append(f[k].cpu())
                paths.extend(ds.paths[int(i)] for i in b["i"][keep])
            # shards of exactly shard_size items (the remainder is carried into the next shard)
            while len(paths) >= shard_size:
                rest = {k: torch.cat(v) for k, v in buf.items()}
                rest_paths = paths[shard_size:]
                for k in buf:
                    buf[k][:] = [rest[k][:shard_size]]
                del paths[shard_size:]
                flush()
                if rest_paths:
                    for k in buf:
                        buf[k].append(rest[k][shard_size:])
                    paths.extend(rest_paths)
            bar.update(len(bad))
            bar.set_postfix(skipped=n_skipped)
        flush()
    finally:
        bar.close()


def _store_query_bank(out: Path, manifest: dict, model, tok, lines: list[str], src: Path, device, beta, k,
                      temperature) -> None:
    from nbretr.eval import CorrectionParams
    d = CorrectionParams()
    f = encode_texts(model, tok, lines, int(manifest["data"]["max_words"]), device)
    t = {"tokens": f["tokens"].cpu().float(), "mask": f["mask"].cpu().to(torch.uint8), "weight": f["weight"].cpu()}
    digest, size = G.write_safetensors(out / "query_bank.safetensors", t, {"format": "pt"})
    manifest["query_bank"] = {"file": "query_bank.safetensors", "source": str(src.resolve()), "count": len(lines),
                              "bytes": size, "sha256": digest,
                              "qbnorm_beta": float(beta if beta is not None else d.qbnorm_beta),
                              "qbnorm_k": int(k if k is not None else d.qbnorm_k),
                              "dsl_temperature": float(temperature if temperature is not None else d.dsl_temperature)}
    G.write_manifest(out, manifest)


def _bank_stats(out: Path, manifest: dict, model, device) -> None:
    """Per-gallery statistics of the query bank (the corrections' normalisers), over the
    whole gallery: QB-Norm's log-sum-exp and activation set, the dual softmax's column
    log-sum-exp; recomputed after every build or --add (the activation set depends on the
    whole gallery). Reuses :func:`nbretr.retrieval.bank_stats` and ``column_lse``."""
    from nbretr import ops
    from nbretr import scoring
    qb = manifest["query_bank"]
    bank = G.open_shard(out / qb["file"])
    gal = G.Gallery(out)
    n_b, n_g = qb["count"], len(gal)
    if n_g == 0:
        return
    b = (bank["tokens"].float().to(device), bank["mask"].to(device), bank["weight"].float().to(device))

    def fn(bs: slice, gs: slice) -> torch.Tensor:
        v = tuple(x.to(device) for x in gal.rows(gs.start, gs.stop))
        return ops.wti_similarity(*(x[bs] for x in b), *v)

    st = scoring.bank_stats(fn, n_b, n_g, betas=[qb["qbnorm_beta"]], hit_ks=[qb["qbnorm_k"]])
    col = scoring.column_lse(fn, n_b, n_g, temperature=qb["dsl_temperature"])
    t = {"qbnorm_lse": st.lse[qb["qbnorm_beta"]].double().cpu(), "qbnorm_hits": st.hits[qb["qbnorm_k"]].to(torch.uint8).cpu(),
         "dsl_col_lse": col.double().cpu()}
    digest, size = G.write_safetensors(out / "bank_stats.safetensors", t, {"format": "pt"})
    manifest["bank_stats"] = {"file": "bank_stats.safetensors", "items": n_g, "bytes": size, "sha256": digest}
    G.write_manifest(out, manifest)


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def build_faiss_ivf(gal: G.Gallery, nlist: int | None = None, train_size: int = 65536, seed: int = 0):
    """An inverted-file index (``IndexIVFFlat``, inner product) of the global tokens."""
    import faiss
    import numpy as np
    n, d = len(gal), gal.dim
    nlist = nlist or max(16, min(1024, int(4 * n ** 0.5)))
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, size=min(n, max(train_size, 40 * nlist)), replace=False))
    parts = []
    for i, off, t in gal.iter_shards():
        sel = sample[(sample >= off) & (sample < off + len(t["global"]))] - off
        parts.append(np.asarray(t["global"].numpy()[sel], dtype=np.float32))
    quant = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quant, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.train(np.ascontiguousarray(np.concatenate(parts)))
    for i, off, t in gal.iter_shards():
        index.add(np.ascontiguousarray(t["global"].numpy(), dtype=np.float32))
    return index


def _maybe_faiss(out: Path, manifest: dict, mode: str) -> None:
    n = sum(s["count"] for s in manifest["shards"])
    if mode == "no" or (mode == "auto" and (n < FAISS_MIN_ITEMS or not faiss_available())):
        manifest.pop("faiss", None)
        return
    if not faiss_available():
        raise ValueError("--faiss yes: faiss is not installed (pip install faiss-cpu)")
    import faiss
    index = build_faiss_ivf(G.Gallery(out))
    tmp = out / ".faiss.ivf.partial"
    faiss.write_index(index, str(tmp))
    os.replace(tmp, out / "faiss.ivf")
    manifest["faiss"] = {"file": "faiss.ivf", "items": n, "nlist": int(index.nlist),
                         "sha256": G.file_sha256(out / "faiss.ivf")}


def main(argv: list[str] | None = None) -> int:
    from nbretr.runtime import setup_logging
    p = argparse.ArgumentParser(prog="python -m nbretr.index", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", help="an exported model folder (python -m nbretr.export)")
    p.add_argument("video_dir", help="folder of videos (searched recursively)")
    p.add_argument("--out", required=True, help="the index folder (new; or an interrupted one to resume)")
    p.add_argument("--add", action="store_true", help="append the videos not yet in the index --out")
    p.add_argument("--files", default=None, help="index only these files: one path per line (relative to "
                                                 "VIDEO_DIR or absolute), in this order")
    p.add_argument("--query-bank", default=None,
                   help="text file of typical queries, one per line, for search --correction (QB-Norm, dual softmax)")
    p.add_argument("--qbnorm-beta", type=float, default=None, help="QB-Norm beta stored with the bank (default 20)")
    p.add_argument("--qbnorm-k", type=int, default=None, help="QB-Norm activation k (default 1)")
    p.add_argument("--dsl-temperature", type=float, default=None, help="dual softmax temperature (default 1000)")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="videos per shard (default 4096)")
    p.add_argument("--batch-size", type=int, default=32, help="videos per encoder batch (default 32)")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader decoding processes (default 2)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16"),
                   help="storage of the token features (float16 halves the index; default float32)")
    p.add_argument("--faiss", default="auto", choices=("auto", "yes", "no"),
                   help=f"build an IVF index of the global tokens (auto: from {FAISS_MIN_ITEMS} videos, "
                        "when faiss is installed)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    setup_logging(0)
    t0 = time.perf_counter()
    try:
        m = build_index(args.model_dir, args.video_dir, args.out, add=args.add, files=args.files,
                        shard_size=args.shard_size, batch_size=args.batch_size, num_workers=args.num_workers,
                        device=args.device, dtype=args.dtype, query_bank=args.query_bank, faiss=args.faiss,
                        qbnorm_beta=args.qbnorm_beta, qbnorm_k=args.qbnorm_k, dsl_temperature=args.dsl_temperature)
    except KeyboardInterrupt:
        from nbretr.runtime import Interrupted
        raise Interrupted(f"interrupted; every finished shard is kept in {args.out}: run the same command again "
                          "to resume") from None
    s = m["_summary"]
    skipped = m["skipped"]
    print(f"index {Path(args.out).resolve()}: {s['total']} videos in {len(m['shards'])} shard(s) "
          f"({s['new']} encoded now, {time.perf_counter() - t0:.1f} s); {len(skipped)} unreadable file(s) skipped"
          + (f", listed in {Path(args.out) / G.SKIPPED}" if skipped else ""))
    for sk in skipped[:10]:
        print(f"  skipped {sk['path']}: {sk['reason']}")
    if len(skipped) > 10:
        print(f"  ... and {len(skipped) - 10} more")
    return 0


if __name__ == "__main__":
    from nbretr.runtime import run_cli
    sys.exit(run_cli(main, "python -m nbretr.index"))
