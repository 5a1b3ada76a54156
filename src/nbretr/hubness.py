"""Hubness report: ``python -m nbretr.hubness QUERY GALLERY [--paired] [--k 10] [--png FILE]``.

Reads query and gallery embeddings ([N, D] .npy or .pt), compares them by cosine
similarity (``--metric dot|euclidean`` for the others), streams them through :func:`nbretr.ops.topk_centrality`
(N_k) and the scoring engine (:func:`nbretr.scoring.ranks`) and prints
R@K (with ``--paired``: query i's correct item is gallery item i) and the hubness table
(docs/corrections.md, "Hubness measures"), and saves a histogram of the k-occurrences N_k as PNG.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from nbretr import metrics, ops, scoring

__all__ = ["load_embeddings", "hubness_report", "save_histogram", "main"]


class InputError(ValueError):
    """A bad input file or argument (the message names it)."""


def load_embeddings(path: str | Path, role: str) -> torch.Tensor:
    """[N, D] float tensor from a .npy or .pt file (a tensor, or a dict with exactly one)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{role} file {str(p)!r} does not exist")
    try:
        if p.suffix == ".npy":
            x = torch.from_numpy(np.load(p, allow_pickle=False))
        elif p.suffix in (".pt", ".pth"):
            obj = torch.load(p, map_location="cpu", weights_only=True)
            if isinstance(obj, dict):
                tensors = [v for v in obj.values() if isinstance(v, torch.Tensor)]
                if len(tensors) != 1:
                    raise InputError(f"{role} file {str(p)!r} holds a dict with {len(tensors)} tensors; "
                                     "save one [N, D] tensor")
                obj = tensors[0]
            if not isinstance(obj, torch.Tensor):
                raise InputError(f"{role} file {str(p)!r} holds a {type(obj).__name__}, not a tensor")
            x = obj
        else:
            raise InputError(f"{role} file {str(p)!r}: expected a .npy or .pt file")
    except InputError:
        raise
    except Exception as err:  # unreadable / corrupt file
        raise InputError(f"{role} file {str(p)!r} could not be read: {err}") from err
    if x.dim() != 2:
        raise InputError(f"{role} file {str(p)!r}: expected a 2-D array [N, D], got shape {list(x.shape)}")
    if not (x.is_floating_point()):
        raise InputError(f"{role} file {str(p)!r}: expected floating-point embeddings, got {x.dtype}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        x = x.float()
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise InputError(f"{role} file {str(p)!r} contains NaN or Inf values")
    return x


@torch.no_grad()
def hubness_report(q: torch.Tensor, g: torch.Tensor, k: int = 10, *, paired: bool = False,
                   exclude_self: bool = False, metric: str = "cosine",
                   backend: str | None = None) -> dict:
    """R@K (paired) and hubness measures of gallery g for queries q.

    metric: "cosine" (L2-normalised dot product, the retrieval setting), "dot" (as given)
    or "euclidean" (nearest by L2 distance, as the classic hubness studies; computed as a
    dot product of augmented vectors [q, 1]·[2g, -|g|²] = 2q·g - |g|², which ranks gallery
    items exactly as -|q - g|² does).

    Returns {"hubness": dict, "retrieval": dict | None, "counts": [G] int64,
    "k": k, "num_queries": Q, "gallery_size": G}.
    """
    if metric == "cosine":
        q = torch.nn.functional.normalize(q.float(), dim=-1).to(q.dtype)
        g = torch.nn.functional.normalize(g.float(), dim=-1).to(g.dtype)
    elif metric == "euclidean":
        qf, gf = q.float(), g.float()
        q = torch.cat([qf, torch.ones_like(qf[:, :1])], 1)
        g = torch.cat([2 * gf, -(gf * gf).sum(1, keepdim=True)], 1)
    elif metric != "dot":
        raise ValueError(f"metric must be 'cosine', 'dot' or 'euclidean', got {metric!r}")
    counts = scoring.k_occurrence(q, g, k, exclude_self=exclude_self, backend=backend)
    retrieval = None
    if paired:
        ranks = scoring.ranks(q, g)
        retrieval = metrics.retrieval_metrics(ranks)
    return {"hubness": metrics.hubness(counts, k, q.shape[0]), "retrieval": retrieval, "counts": counts,
            "k": k, "num_queries": q.shape[0], "gallery_size": g.shape[0], "metric": metric}


def save_histogram(counts: torch.Tensor | dict[str, torch.Tensor], k: int, path: str | Path) -> Path:
    """Histogram of N_k (log count axis) as PNG, matplotlib's Agg backend. ``counts`` is one
    [G] tensor or a dict ``{label: counts}`` (one panel each, e.g. both retrieval directions)."""
    from nbretr._plot import pyplot, save_figure
    plt = pyplot()

    panels = counts if isinstance(counts, dict) else {"": counts}
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (label, c) in zip(axes[0], panels.items()):
        x = torch.as_tensor(c).detach().cpu().numpy()
        bins = np.arange(0, max(int(x.max()) if x.size else 0, 1) + 2) - 0.5
        ax.hist(x, bins=bins if len(bins) <= 200 else 100, color="#3b6ea5")
        ax.set_yscale("log")
        ax.axvline(2 * k, color="#c0392b", linestyle="--", label=f"hub threshold 2k = {2 * k}")
        ax.set_xlabel(f"N_{k} (k-occurrence)")
        ax.set_ylabel("gallery items")
        if label:
            ax.set_title(label)
        ax.legend()
    return save_figure(fig, path)


def format_report(rep: dict) -> str:
    lines = [f"queries {rep['num_queries']}, gallery {rep['gallery_size']}, k = {rep['k']}, metric {rep['metric']}"]
    if rep["retrieval"] is not None:
        r = rep["retrieval"]
        lines.append("")
        lines.append("| R@1 | R@5 | R@10 | R@50 | MdR | MnR | Rsum |")
        lines.append("|---|---|---|---|---|---|---|")
        lines.append(f"| {r['R1']:.1f} | {r['R5']:.1f} | {r['R10']:.1f} | {r['R50']:.1f} | {r['MdR']:.1f} "
                     f"| {r['MnR']:.1f} | {r['Rsum']:.1f} |")
    h = rep["hubness"]
    lines.append("")
    lines.append(f"| N_k skewness | hub occurrence (N_k >= {2 * rep['k']}) | anti-hub share (N_k = 0) "
                 "| Robin Hood | Gini |")
    lines.append("|---|---|---|---|---|")
    lines.append(f"| {h['skewness']:.3f} | {h['hub_occurrence']:.3f} | {h['antihub_share']:.3f} "
                 f"| {h['robin_hood']:.3f} | {h['gini']:.3f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nbretr.hubness", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("query", help="query embeddings [Q, D] (.npy or .pt)")
    p.add_argument("gallery", help="gallery embeddings [G, D] (.npy or .pt)")
    p.add_argument("--k", type=int, default=10, help="k of the k-occurrence N_k (default 10)")
    p.add_argument("--paired", action="store_true", help="query i's correct item is gallery item i: print R@K")
    p.add_argument("--exclude-self", action="store_true",
                   help="query and gallery are one set: a point is not its own neighbour")
    p.add_argument("--metric", default="cosine", choices=["cosine", "dot", "euclidean"],
                   help="cosine (L2-normalised, default), dot (as given) or euclidean distance")
    p.add_argument("--png", default="hubness_nk.png", help="histogram of N_k (default hubness_nk.png)")
    p.add_argument("--json", default=None, help="also write the numbers as JSON here")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--backend", default=None, choices=["auto", "ext", "torch"])
    args = p.parse_args(argv)
    try:
        q = load_embeddings(args.query, "query").to(args.device)
        g = load_embeddings(args.gallery, "gallery").to(args.device)
        if q.shape[1] != g.shape[1]:
            raise InputError(f"query has D={q.shape[1]} but gallery has D={g.shape[1]} "
                             f"({args.query!r}, {args.gallery!r})")
        if q.dtype != g.dtype:
            g = g.to(q.dtype)
        G = g.shape[0]
        avail = G - 1 if args.exclude_self else G
        if not 1 <= args.k <= min(avail, ops.TOPK_MAX_K):
            raise InputError(f"--k must be in [1, {min(avail, ops.TOPK_MAX_K)}] for a gallery of {G} items"
                             f"{' with --exclude-self' if args.exclude_self else ''}, got {args.k}")
        if args.exclude_self and q.shape[0] != G:
            raise InputError(f"--exclude-self needs one set: query has {q.shape[0]} rows, gallery {G}")
        if args.paired and q.shape[0] > G:
            raise InputError(f"--paired needs Q <= G (query i <-> gallery i), got Q={q.shape[0]}, G={G}")
    except InputError as err:
        p.error(str(err))
    rep = hubness_report(q, g, args.k, paired=args.paired, exclude_self=args.exclude_self,
                         metric=args.metric, backend=args.backend)
    print(format_report(rep))
    png = save_histogram(rep["counts"], args.k, args.png)
    print(f"\nhistogram of N_{args.k}: {png}")
    if args.json:
        payload = {k: v for k, v in rep.items() if k != "counts"}
        Path(args.json).write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
