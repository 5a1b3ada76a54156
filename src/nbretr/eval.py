"""``python -m nbretr.eval``: encode a test split, rank through the operators at any gallery
size, report R@1/5/10/50, MdR, MnR, Rsum both ways and the hubness table (N_k skewness, hub
occurrence, anti-hubs, Robin Hood, Gini), save metrics.json and an N_k histogram PNG, and
optionally the inference-time hubness corrections (QB-Norm, DBNorm, NNN, CSLS, dual
softmax) with R@K and hubness before and after each.

    python -m nbretr.eval --checkpoint runs/<run>/checkpoints/last.pt [--dataset ...] \
        [--corrections all|qbnorm,dbnorm,nnn,csls,dsl]

Under torchrun the queries are split across ranks; counts and sums are all-reduced.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist

from nbretr import metrics as M
from nbretr import ops
from nbretr import retrieval as R
from nbretr.hubness import save_histogram
from nbretr.runtime import Dist, cleanup_distributed, setup_distributed, setup_logging, write_json

log = logging.getLogger("nbretr")

CORRECTIONS = ("qbnorm", "dbnorm", "nnn", "csls", "dsl")


# -- encoding -----------------------------------------------------------------------------

@torch.no_grad()
def encode_texts(model, dataset, caption_indices: Sequence[int] | None, device, batch: int = 256):
    """Prepared text tokens for WTI (normalised tokens, mask, softmaxed weights) of the
    captions ``caption_indices`` of ``dataset`` (all when None), from the token ids the
    dataset already holds (no second tokenisation)."""
    idx = list(range(len(dataset))) if caption_indices is None else list(caption_indices)
    ts, ms, ws = [], [], []
    for i in range(0, len(idx), batch):
        items = [dataset.text(c) for c in idx[i:i + batch]]
        ids = torch.stack([it["text_ids"] for it in items]).to(device)
        mask = torch.stack([it["text_mask"] for it in items]).to(device)
        t, m = model.encode_text(ids, mask)
        t = t.float()
        ws.append(model.token_weights_text(t, m).float())
        ts.append(torch.nn.functional.normalize(t, dim=-1))
        ms.append(m)
    return torch.cat(ts), torch.cat(ms), torch.cat(ws)


@torch.no_grad()
def encode_videos(model, dataset, video_indices: Sequence[int] | None, device, batch: int = 64,
                  num_workers: int = 0):
    """Prepared video tokens (normalised tokens, mask, weights) of the videos
    ``video_indices`` of ``dataset`` (all when None), each decoded once."""
    from nbretr.data import collate
    from tqdm import tqdm
    view = dataset.video_view()
    if video_indices is not None:
        view = torch.utils.data.Subset(view, list(video_indices))
    loader = torch.utils.data.DataLoader(view, batch_size=batch, num_workers=num_workers, collate_fn=collate)
    vs, ms, ws = [], [], []
    for b in tqdm(loader, desc="encode videos", unit="batch", leave=False, disable=len(loader) < 2):
        v, m = model.encode_video(b["video"].to(device), b["video_mask"].to(device))
        v = v.float()
        ws.append(model.token_weights_video(v, m).float())
        vs.append(torch.nn.functional.normalize(v, dim=-1))
        ms.append(m)
    return torch.cat(vs), torch.cat(ms), torch.cat(ws)


def wti_score_fn(q, g, *, q_is_text: bool):
    """score_fn for :mod:`nbretr.retrieval` over prepared (tokens, mask, weights) triples."""
    def fn(qs: slice, gs: slice) -> torch.Tensor:
        a = tuple(x[qs] for x in q)
        b = tuple(x[gs] for x in g)
        if q_is_text:
            return ops.wti_similarity(*a, *b)
        return ops.wti_similarity(*b, *a).t()
    return fn


# -- evaluation ------------------------------------------------------------------------------

def _direction_report(stats: R.StreamStats, k: int, num_g: int) -> dict[str, Any]:
    out = M.retrieval_metrics(stats.ranks)
    out.update(num_queries=int(stats.ranks.numel()), num_gallery=num_g)
    out["hubness"] = M.hubness(stats.counts, k, int(stats.ranks.numel()))
    return out


def _all_reduce_stats(stats: R.StreamStats, dist_: Dist, num_q: int, q_range: slice) -> R.StreamStats:
    if not dist_.enabled:
        return stats
    counts, sums = stats.counts.to(dist_.device), stats.sums.to(dist_.device)
    dist.all_reduce(counts)
    dist.all_reduce(sums)
    parts = [None] * dist_.world_size
    dist.all_gather_object(parts, (q_range.start, q_range.stop, stats.ranks[q_range].tolist()))
    ranks = torch.empty(num_q, dtype=torch.long)
    for start, stop, r in parts:
        ranks[start:stop] = torch.tensor(r, dtype=torch.long)
    return R.StreamStats(ranks, stats.topk_indices, counts.cpu(), sums.cpu())


def _rank_direction(score_fn, num_q, num_g, targets, k, dist_, transform=None, q_chunk=256) -> R.StreamStats:
    """Ranks for this rank's share of the queries, all-reduced across ranks."""
    per = -(-num_q // dist_.world_size)
    q_range = slice(min(num_q, dist_.rank * per), min(num_q, (dist_.rank + 1) * per))
    n_local = q_range.stop - q_range.start

    def local_fn(qs, gs):
        return score_fn(slice(q_range.start + qs.start, q_range.start + qs.stop), gs)

    local_transform = None if transform is None else (
        lambda qs, block: transform(slice(q_range.start + qs.start, q_range.start + qs.stop), block))
    if n_local > 0:
        local = R.stream_ranks(local_fn, n_local, num_g, targets[q_range], k, q_chunk=q_chunk,
                               transform=local_transform)
        ranks = torch.zeros(num_q, dtype=torch.long)
        ranks[q_range] = local.ranks
        stats = R.StreamStats(ranks, local.topk_indices, local.counts, local.sums)
    else:
        stats = R.StreamStats(torch.zeros(num_q, dtype=torch.long), torch.zeros(0, k, dtype=torch.long),
                              torch.zeros(num_g, dtype=torch.long), torch.zeros(num_g, dtype=torch.float64))
    return _all_reduce_stats(stats, dist_, num_q, q_range)


@torch.no_grad()
def evaluate(model, test_ds, cfg, dist_: Dist | None = None, *, k: int = 10, out_dir: Path | None = None,
             corrections: Sequence[str] = (), bank_ds=None, bank_size: int = 5000,
             q_chunk: int = 256) -> dict[str, Any]:
    """Evaluate text->video and video->text on ``test_ds``; returns the metrics dict."""
    dist_ = dist_ or Dist(device=next(model.parameters()).device)
    device = dist_.device
    was_training = model.training
    model.eval()
    texts = encode_texts(model, test_ds, None, device)
    vids = encode_videos(model, test_ds, None, device, num_workers=cfg.num_workers)
    c2v = torch.as_tensor(test_ds.caption_to_video).tolist()
    n_t, n_v = len(c2v), test_ds.num_videos
    k_t2v, k_v2t = min(k, n_v), min(k, n_t)
    t2v_targets = [[v] for v in c2v]
    v2t_targets: list[list[int]] = [[] for _ in range(n_v)]
    for c, v in enumerate(c2v):
        v2t_targets[v].append(c)
    t2v_fn = wti_score_fn(texts, vids, q_is_text=True)
    v2t_fn = wti_score_fn(vids, texts, q_is_text=False)

    t2v = _rank_direction(t2v_fn, n_t, n_v, t2v_targets, k_t2v, dist_, q_chunk=q_chunk)
    v2t = _rank_direction(v2t_fn, n_v, n_t, v2t_targets, k_v2t, dist_, q_chunk=q_chunk)
    results: dict[str, Any] = {"dataset": cfg.dataset, "k": k,
                               "t2v": _direction_report(t2v, k_t2v, n_v),
                               "v2t": _direction_report(v2t, k_v2t, n_t)}
    if corrections:
        results["corrections"] = _corrections(model, cfg, dist_, corrections, texts, vids, t2v_fn, v2t_fn,
                                              t2v_targets, v2t_targets, k_t2v, k_v2t, bank_ds, bank_size,
                                              q_chunk)
    if out_dir is not None and dist_.is_main:
        path = Path(out_dir) / "nk_histogram.png"
        save_histogram({"text->video": t2v.counts, "video->text": v2t.counts}, k, path)
        results["nk_histogram"] = str(path)
    if was_training:
        model.train()
    return results


def _corrections(model, cfg, dist_, names, texts, vids, t2v_fn, v2t_fn, t2v_targets, v2t_targets, k_t2v, k_v2t,
                 bank_ds, bank_size, q_chunk) -> dict[str, Any]:
    """R@K and hubness after each correction, with the query banks taken from ``bank_ds``
    (training captions for text->video, training videos for video->text)."""
    if bank_ds is None:
        raise ValueError("hubness corrections need a query bank: pass the training split (bank_ds)")
    device = dist_.device
    g = torch.Generator().manual_seed(0)
    n_cap = len(bank_ds.captions)
    cap_idx = torch.randperm(n_cap, generator=g)[:bank_size].tolist()
    bank_texts = encode_texts(model, bank_ds, cap_idx, device)
    vid_sel = torch.randperm(bank_ds.num_videos, generator=g)[:bank_size].tolist()
    bank_vids = encode_videos(model, bank_ds, vid_sel, device, num_workers=cfg.num_workers)
    n_t, n_v = len(texts[0]), len(vids[0])
    out: dict[str, Any] = {}
    for direction, q, gal, bank_q, bank_g, q_is_text, targets, k, fn in (
        ("t2v", texts, vids, bank_texts, bank_vids, True, t2v_targets, k_t2v, t2v_fn),
        ("v2t", vids, texts, bank_vids, bank_texts, False, v2t_targets, k_v2t, v2t_fn),
    ):
        n_q, n_g = len(q[0]), len(gal[0])
        bank_fn = wti_score_fn(bank_q, gal, q_is_text=q_is_text)
        stats = R.bank_stats(bank_fn, len(bank_q[0]), n_g, beta=20.0, ks=(10, 128), q_chunk=q_chunk)
        need = set(names)
        transforms = {}
        if "qbnorm" in need:
            transforms["qbnorm"] = lambda qs, b: R.qb_norm(b, stats)
        if "dbnorm" in need:
            gbank_fn = wti_score_fn(q, bank_g, q_is_text=q_is_text)
            g_lse = R.row_lse(gbank_fn, n_q, len(bank_g[0]), temp=stats.beta, q_chunk=q_chunk)
            transforms["dbnorm"] = lambda qs, b: R.db_norm(b, stats, g_lse[qs])
        if "nnn" in need:
            transforms["nnn"] = lambda qs, b: R.nnn(b, stats, alpha=0.75, k=128)
        if "csls" in need:
            transforms["csls"] = lambda qs, b: R.csls(b, stats, k=10)
        if "dsl" in need:
            col = R.column_lse(fn, n_q, n_g, temp=100.0, q_chunk=q_chunk)
            transforms["dsl"] = lambda qs, b: R.dual_softmax(b, col, temp=100.0)
        for name, tr in transforms.items():
            st = _rank_direction(fn, n_q, n_g, targets, k, dist_, transform=tr, q_chunk=q_chunk)
            out.setdefault(name, {})[direction] = _direction_report(st, k, n_g)
    return out


# -- reporting -------------------------------------------------------------------------------

def format_report(m: dict[str, Any]) -> str:
    cols = ("R1", "R5", "R10", "R50", "MdR", "MnR", "Rsum")
    hcols = ("skewness", "hub_occurrence", "antihub_share", "robin_hood", "gini")
    lines = [f"{'':<18}" + "".join(f"{c:>8}" for c in cols) + f"{'queries':>9}{'gallery':>9}"]

    def row(label, d):
        vals = "".join(f"{d[c]:>8.1f}" for c in cols)
        return f"{label:<18}{vals}{d['num_queries']:>9}{d['num_gallery']:>9}"

    def hrow(label, d):
        return f"{label:<18}" + "".join(f"{d['hubness'][c]:>15.3f}" for c in hcols)

    for name, d in (("text->video", m["t2v"]), ("video->text", m["v2t"])):
        lines.append(row(name, d))
    for cname, cd in m.get("corrections", {}).items():
        for dname, d in cd.items():
            lines.append(row(f"{cname} {dname}", d))
    lines += ["", f"hubness (k={m['k']}){'':<1}" + "".join(f"{c:>15}" for c in hcols)]
    for name, d in (("text->video", m["t2v"]), ("video->text", m["v2t"])):
        lines.append(hrow(name, d))
    for cname, cd in m.get("corrections", {}).items():
        for dname, d in cd.items():
            lines.append(hrow(f"{cname} {dname}", d))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from nbretr import checkpoint as ckpt
    from nbretr.config import TrainConfig
    from nbretr.train import build_datasets, build_model, build_tokenizer
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a checkpoint file or a run folder (its checkpoints/last.pt)")
    p.add_argument("--dataset", default=None)
    p.add_argument("--data-root", "--data_root", dest="data_root", default=None)
    p.add_argument("--corrections", default="", help=f"comma list of {', '.join(CORRECTIONS)}, or 'all'")
    p.add_argument("--bank-size", type=int, default=5000, help="query-bank size for the corrections")
    p.add_argument("--k", type=int, default=None, help="k of the hubness report (default: the run's eval_k)")
    p.add_argument("--output-dir", default=None, help="where metrics.json and the PNG go (default: the run folder)")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    corr = CORRECTIONS if args.corrections == "all" else tuple(c for c in args.corrections.split(",") if c)
    bad = [c for c in corr if c not in CORRECTIONS]
    if bad:
        p.error(f"--corrections: unknown {bad}; choose from {', '.join(CORRECTIONS)} or 'all'")
    path = Path(args.checkpoint)
    if path.is_dir():
        path = path / "checkpoints" / "last.pt"
    state = ckpt.load(path)
    cfg = TrainConfig(**{k: v for k, v in state["config"].items() if k in TrainConfig.__dataclass_fields__})
    if args.dataset:
        cfg.dataset = args.dataset
    if args.data_root:
        cfg.data_root = args.data_root
    run_dir = path.parent.parent
    out_dir = Path(args.output_dir) if args.output_dir else run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    dist_ = setup_distributed(args.device)
    setup_logging(dist_.rank)
    try:
        splits = ("train", "test") if corr else ("test",)
        tok = build_tokenizer(cfg, run_dir)
        data = build_datasets(cfg, tok, splits)
        model = build_model(cfg, getattr(tok, "vocab_size", None)).to(dist_.device)
        model.load_state_dict(state["model"])
        metrics = evaluate(model, data["test"], cfg, dist_, k=args.k or cfg.eval_k, out_dir=out_dir,
                           corrections=corr, bank_ds=data.get("train"), bank_size=args.bank_size)
        if dist_.is_main:
            print(format_report(metrics))
            mpath = write_json(out_dir / "metrics.json", metrics)
            print(f"metrics: {mpath.resolve()}")
        return 0
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    from nbretr.runtime import run_cli
    sys.exit(run_cli(main, "python -m nbretr.eval"))
