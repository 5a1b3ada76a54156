"""``python -m nbretr.eval``: encode a test split, rank through the operators at any gallery
size, report R@1/5/10/50, MdR, MnR, Rsum both ways and the hubness table (N_k skewness, hub
occurrence, anti-hubs, Robin Hood, Gini), save metrics.json and an N_k histogram PNG, and
optionally the inference-time hubness corrections (QB-Norm, DBNorm, NNN, CSLS, dual
softmax) with R@K and hubness before and after each.

    python -m nbretr.eval --checkpoint runs/<run>/checkpoints/last.pt [--dataset ...] \
        [--corrections all|qbnorm,dbnorm,nnn,csls,dsl] [--qbnorm-beta 20 ...]

Every correction's parameters are options (the original authors' defaults); the report and
metrics.json state them and the banks (split, items, size, seed) next to the numbers
(docs/corrections.md).

Under torchrun the queries are split across ranks; the counts are all-reduced.
"""
from __future__ import annotations

import argparse
import json
import dataclasses
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist

from nbretr import metrics, ops, retrieval, scoring
from nbretr.hubness import save_histogram
from nbretr.runtime import Dist, cleanup_distributed, setup_distributed, setup_logging, write_json

log = logging.getLogger("nbretr")

CORRECTIONS = ("qbnorm", "dbnorm", "nnn", "csls", "dsl")


V2T_RANKINGS = ("best-caption", "per-caption")


@dataclass
class CorrectionParams:
    """Every parameter of the inference-time hubness corrections; the defaults are the
    original authors' (docs/corrections.md names each source and convention)."""
    qbnorm_beta: float = 20.0                 # QB-Norm inverted-softmax beta
    qbnorm_k: int = 1                         # QB-Norm activation k (dynamic inverted softmax)
    dbnorm_beta1: float = retrieval.DBNORM_BETA1   # DBNorm query-bank beta (1/1.99)
    dbnorm_beta2: float = retrieval.DBNORM_BETA2   # DBNorm gallery-bank beta (3)
    dbnorm_dynamic: bool = False              # dual dynamic inverted softmax instead of dual inverted softmax
    dbnorm_k: int = 1                         # its activation k
    nnn_k: int = 128                          # NNN: bank neighbours per gallery item (README value)
    nnn_alpha: float = 0.75                   # NNN: weight of their mean (README value)
    csls_k: int = 10                          # CSLS neighbourhood size
    dsl_temperature: float = retrieval.DSL_TEMPERATURE  # dual softmax: softmax over queries of s / T
    query_bank_size: int = 5000               # query bank: training captions (t2v) / videos (v2t)
    gallery_bank_size: int = 5000             # gallery bank (DBNorm): training videos (t2v) / captions (v2t)
    bank_seed: int = 0                        # the banks' random subsets of the training split

    def validate(self) -> None:
        for name in ("qbnorm_k", "dbnorm_k", "nnn_k", "csls_k", "query_bank_size", "gallery_bank_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.dsl_temperature > 0:
            raise ValueError(f"dsl-temperature must be > 0, got {self.dsl_temperature}")


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
    from nbretr.data import collate, loader_context
    from tqdm import tqdm
    view = dataset.video_view()
    if video_indices is not None:
        view = torch.utils.data.Subset(view, list(video_indices))
    loader = torch.utils.data.DataLoader(view, batch_size=batch, num_workers=num_workers, collate_fn=collate,
                                         multiprocessing_context=loader_context(dataset, num_workers))
    vs, ms, ws = [], [], []
    for b in tqdm(loader, desc="encode videos", unit="batch", leave=False, disable=len(loader) < 2):
        v, m = model.encode_video(b["video"].to(device), b["video_mask"].to(device))
        v = v.float()
        ws.append(model.token_weights_video(v, m).float())
        vs.append(torch.nn.functional.normalize(v, dim=-1))
        ms.append(m)
    return torch.cat(vs), torch.cat(ms), torch.cat(ws)


# -- evaluation ------------------------------------------------------------------------------

def best_caption_score_fn(vids, texts, c2v: torch.Tensor):
    """score_fn for video->text ranked over *videos*, as the released code does for
    multi-caption sets: the score of gallery video g for query video v is the best score of
    g's captions, max_{c of g} s(c, v); the target of v is v itself."""
    c2v = torch.as_tensor(c2v, dtype=torch.long)
    order = torch.argsort(c2v, stable=True)            # captions grouped by video
    sorted_v = c2v[order]

    def fn(qs: slice, gs: slice) -> torch.Tensor:
        lo = int(torch.searchsorted(sorted_v, gs.start))
        hi = int(torch.searchsorted(sorted_v, gs.stop))
        sel = order[lo:hi]
        q = tuple(x[qs] for x in vids)
        nq, ng = q[0].shape[0], gs.stop - gs.start
        out = torch.full((nq, ng), float("-inf"), device=vids[0].device)
        if len(sel):
            t = tuple(x[sel.to(x.device)] for x in texts)
            s = ops.wti_similarity(*t, *q).t().float()       # [q, captions of the block]
            col = (c2v[sel] - gs.start).to(out.device).unsqueeze(0).expand(nq, -1)
            out.scatter_reduce_(1, col, s, reduce="amax", include_self=True)
        return out
    return fn


def hubness_note(counts: torch.Tensor, k: int, num_g: int) -> str | None:
    """Why the hubness measures are undefined (NaN) for these k-occurrences, or None."""
    if num_g <= k:
        return (f"undefined: the gallery has {num_g} item(s), not more than k={k}, so every item is in every "
                "top-k list; use a larger test split or a smaller --k")
    c = torch.as_tensor(counts)
    if c.numel() and bool((c == c.flatten()[0]).all()):
        return f"skewness undefined: every gallery item has the same N_{k} ({int(c.flatten()[0])})"
    return None


def _direction_report(stats: scoring.StreamStats, k: int, num_g: int) -> dict[str, Any]:
    out = metrics.retrieval_metrics(stats.ranks)
    out.update(num_queries=int(stats.ranks.numel()), num_gallery=num_g)
    out["hubness"] = metrics.hubness(stats.counts, k, int(stats.ranks.numel()))
    note = hubness_note(stats.counts, k, num_g)
    if note:
        out["hubness"]["note"] = note
    return out


def _all_reduce_stats(stats: scoring.StreamStats, dist_: Dist, num_q: int, q_range: slice
                      ) -> scoring.StreamStats:
    if not dist_.enabled:
        return stats
    counts = stats.counts.to(dist_.device)
    dist.all_reduce(counts)
    parts = [None] * dist_.world_size
    dist.all_gather_object(parts, (q_range.start, q_range.stop, stats.ranks[q_range].tolist()))
    ranks = torch.empty(num_q, dtype=torch.long)
    for start, stop, r in parts:
        ranks[start:stop] = torch.tensor(r, dtype=torch.long)
    return scoring.StreamStats(ranks, stats.topk_indices, counts.cpu(), None)


@dataclass
class RankOptions:
    """How every direction is ranked: queries per row block and the tie rule of the top-k
    lists behind N_k ("lower-index", or "random" seeded by ``tie_seed``)."""
    q_chunk: int = 256
    ties: str = "lower-index"
    tie_seed: int = 0


@dataclass
class Direction:
    """One retrieval direction over prepared (tokens, mask, weights) triples: ``queries``
    rank ``gallery`` by ``score_fn``; ``targets`` [num_q, T] (scoring.as_targets) are
    each query's correct items; ``k`` is the k of N_k (clipped to the gallery)."""
    name: str                 # "t2v" or "v2t"
    queries: tuple
    gallery: tuple
    q_is_text: bool
    targets: torch.Tensor
    k: int
    score_fn: scoring.ScoreFn

    @property
    def num_q(self) -> int:
        return len(self.queries[0])

    @property
    def num_g(self) -> int:
        return len(self.gallery[0])


def _rank_direction(score_fn, num_q, num_g, targets, k, dist_, opts: RankOptions,
                    rescore: scoring.Rescore | None = None) -> scoring.StreamStats:
    """Ranks for this rank's share of the queries through the scoring engine, all-reduced
    across ranks."""
    per = -(-num_q // dist_.world_size)
    q_range = slice(min(num_q, dist_.rank * per), min(num_q, (dist_.rank + 1) * per))
    n_local = q_range.stop - q_range.start

    def local_fn(qs, gs):
        return score_fn(slice(q_range.start + qs.start, q_range.start + qs.stop), gs)

    local_rescore = None if rescore is None else (
        lambda qs, block: rescore(slice(q_range.start + qs.start, q_range.start + qs.stop), block))
    if n_local > 0:
        local = scoring.stream(local_fn, n_local, num_g, targets[q_range], k, q_chunk=opts.q_chunk,
                               rescore=local_rescore, ties=opts.ties, tie_seed=opts.tie_seed,
                               q_offset=q_range.start, sums=False)
        ranks = torch.zeros(num_q, dtype=torch.long)
        ranks[q_range] = local.ranks
        stats = scoring.StreamStats(ranks, local.topk_indices, local.counts, None)
    else:
        stats = scoring.StreamStats(torch.zeros(num_q, dtype=torch.long), torch.zeros(0, k, dtype=torch.long),
                                    torch.zeros(num_g, dtype=torch.long), None)
    return _all_reduce_stats(stats, dist_, num_q, q_range)


@torch.no_grad()
def evaluate(model, test_ds, cfg, dist_: Dist | None = None, *, k: int = 10, out_dir: Path | None = None,
             corrections: Sequence[str] = (), bank_ds=None, params: CorrectionParams | None = None,
             hubness_ties: str = "lower-index", tie_seed: int = 0, q_chunk: int = 256) -> dict[str, Any]:
    """Evaluate text->video and video->text on ``test_ds``; returns the metrics dict.
    ``corrections`` (names from ``CORRECTIONS``) are run with ``params`` (default: the
    authors' values) and banks drawn from ``bank_ds`` (the training split);
    ``hubness_ties`` is the tie rule of the top-k lists behind N_k ("lower-index" or
    "random", seeded by ``tie_seed``)."""
    params = params or CorrectionParams()
    params.validate()
    opts = RankOptions(q_chunk=q_chunk, ties=hubness_ties, tie_seed=tie_seed)
    dist_ = dist_ or Dist(device=next(model.parameters()).device)
    device = dist_.device
    was_training = model.training
    model.eval()
    texts = encode_texts(model, test_ds, None, device)
    vids = encode_videos(model, test_ds, None, device, num_workers=cfg.num_workers)
    c2v = torch.as_tensor(test_ds.caption_to_video).tolist()
    n_t, n_v = len(c2v), test_ds.num_videos
    v2t_targets: list[list[int]] = [[] for _ in range(n_v)]
    for c, v in enumerate(c2v):
        v2t_targets[v].append(c)
    t2v_dir = Direction("t2v", texts, vids, True, scoring.as_targets(torch.tensor(c2v, dtype=torch.long), n_t),
                        min(k, n_v), scoring.wti_score_fn(texts, vids, q_is_text=True))
    v2t_dir = Direction("v2t", vids, texts, False, scoring.as_targets(v2t_targets, n_v), min(k, n_t),
                        scoring.wti_score_fn(vids, texts, q_is_text=False))

    v2t_ranking = getattr(cfg, "v2t_ranking", None) or "per-caption"
    if v2t_ranking not in V2T_RANKINGS:
        raise ValueError(f"v2t_ranking must be one of {V2T_RANKINGS}, got {v2t_ranking!r}")
    t2v = _rank_direction(t2v_dir.score_fn, n_t, n_v, t2v_dir.targets, t2v_dir.k, dist_, opts)
    if v2t_ranking == "best-caption":
        k_v2t_main = min(k, n_v)
        v2t = _rank_direction(best_caption_score_fn(vids, texts, test_ds.caption_to_video), n_v, n_v,
                              scoring.as_targets(torch.arange(n_v), n_v), k_v2t_main, dist_, opts)
        v2t_report = _direction_report(v2t, k_v2t_main, n_v)
    else:
        v2t = _rank_direction(v2t_dir.score_fn, n_v, n_t, v2t_dir.targets, v2t_dir.k, dist_, opts)
        v2t_report = _direction_report(v2t, v2t_dir.k, n_t)
    v2t_report["ranking"] = v2t_ranking
    missing = list(getattr(test_ds, "missing_videos", []) or [])
    results: dict[str, Any] = {"dataset": cfg.dataset, "k": k,
                               "hubness_ties": hubness_ties,
                               **({"tie_seed": tie_seed} if hubness_ties == "random" else {}),
                               "missing_videos": len(missing),
                               "t2v": _direction_report(t2v, t2v_dir.k, n_v),
                               "v2t": v2t_report}
    if corrections:
        results["corrections"] = _corrections(model, cfg, dist_, (t2v_dir, v2t_dir), corrections, bank_ds,
                                              params, opts)
    if out_dir is not None and dist_.is_main:
        path = Path(out_dir) / "nk_histogram.png"
        save_histogram({"text->video": t2v.counts, "video->text": v2t.counts}, k, path)
        results["nk_histogram"] = str(path)
        counts = Path(out_dir) / "nk_counts.json"  # every gallery item's N_k, for plots across runs
        counts.write_text(json.dumps({"k": k, "t2v": t2v.counts.tolist(), "v2t": v2t.counts.tolist()}))
        results["nk_counts"] = str(counts)
    if was_training:
        model.train()
    return results


def same_modality_score_fn(a, b):
    """score_fn of WTI similarity between two sets of one modality (gallery bank x test
    gallery for DBNorm): the WTI formula is symmetric in its two sides, so ``a`` takes the
    first side and ``b`` the second whatever the modality."""
    def fn(as_: slice, bs: slice) -> torch.Tensor:
        return ops.wti_similarity(*(x[as_] for x in a), *(x[bs] for x in b))
    return fn


def _take(triple, n):
    return tuple(x[:n] for x in triple)


def _bank_draws(bank_ds, p: CorrectionParams, need_captions: int, need_videos: int):
    """Random orders of the bank split's captions and videos (one generator seeded with
    ``bank_seed``: captions first, then videos); a bank of size n is the first n of its
    order, so a smaller bank is a subset of a larger one."""
    g = torch.Generator().manual_seed(p.bank_seed)
    cap = torch.randperm(len(bank_ds.captions), generator=g)[:need_captions].tolist()
    vid = torch.randperm(bank_ds.num_videos, generator=g)[:need_videos].tolist()
    return cap, vid


def correction_params_of(name: str, p: CorrectionParams) -> dict[str, Any]:
    """The parameters of one correction, as reported and stored in metrics.json."""
    if name == "qbnorm":
        return {"method": "dynamic inverted softmax over the query bank", "beta": p.qbnorm_beta,
                "k": p.qbnorm_k}
    if name == "dbnorm":
        return {"method": "dual dynamic inverted softmax" if p.dbnorm_dynamic else "dual inverted softmax",
                "beta1": p.dbnorm_beta1, "beta2": p.dbnorm_beta2, "dynamic": p.dbnorm_dynamic,
                **({"k": p.dbnorm_k} if p.dbnorm_dynamic else {})}
    if name == "nnn":
        return {"method": "s - alpha * mean of the k nearest bank queries", "k": p.nnn_k, "alpha": p.nnn_alpha}
    if name == "csls":
        return {"method": "2s - r_G(q) - r_Q(g), r_Q over the query bank", "k": p.csls_k}
    if name == "dsl":
        return {"method": "s * softmax over the test queries of s / T", "temperature": p.dsl_temperature}
    raise ValueError(f"unknown correction {name!r}")


def _corrections(model, cfg, dist_: Dist, directions: Sequence[Direction], names: Sequence[str], bank_ds,
                 p: CorrectionParams, opts: RankOptions) -> dict[str, Any]:
    """R@K and hubness after each correction (``names``) in each of ``directions``, each
    correction the ``rescore`` hook of the scoring engine. Banks come from ``bank_ds`` (the
    training split): the query bank holds the queries' modality (captions for text->video,
    videos for video->text), DBNorm's gallery bank the gallery's (videos for text->video,
    captions for video->text). Each direction's report carries ``params``: the
    correction's parameters and its banks."""
    q_chunk = opts.q_chunk
    need = set(names)
    uses_qbank = bool(need & {"qbnorm", "dbnorm", "nnn", "csls"})
    uses_gbank = "dbnorm" in need
    if (uses_qbank or uses_gbank) and bank_ds is None:
        raise ValueError("hubness corrections need banks: pass the training split (bank_ds)")
    device = dist_.device
    # each modality serves as one direction's query bank and the other's gallery bank
    n_each = max(p.query_bank_size if uses_qbank else 0, p.gallery_bank_size if uses_gbank else 0)
    bank_texts = bank_vids = None
    split = getattr(bank_ds, "split", None) or "train"
    if n_each:
        cap_idx, vid_idx = _bank_draws(bank_ds, p, n_each, n_each)
        bank_texts = encode_texts(model, bank_ds, cap_idx, device)
        bank_vids = encode_videos(model, bank_ds, vid_idx, device, num_workers=cfg.num_workers)

    def bank_info(items, triple, requested):
        n = min(requested, len(triple[0]))
        return {"split": split, "items": items, "size": n, "requested": requested, "seed": p.bank_seed}

    out: dict[str, Any] = {}
    for d in directions:
        gal, q_is_text, fn = d.gallery, d.q_is_text, d.score_fn
        n_q, n_g = d.num_q, d.num_g
        q_items, g_items = ("captions", "videos") if q_is_text else ("videos", "captions")
        transforms, info = {}, {}
        if uses_qbank:
            bq = _take(bank_texts if q_is_text else bank_vids, p.query_bank_size)
            qb_info = bank_info(q_items, bq, p.query_bank_size)
            betas = ([p.qbnorm_beta] if "qbnorm" in need else []) + ([p.dbnorm_beta1] if "dbnorm" in need else [])
            mean_ks = ([p.nnn_k] if "nnn" in need else []) + ([p.csls_k] if "csls" in need else [])
            hit_ks = ([p.qbnorm_k] if "qbnorm" in need else []) + \
                ([p.dbnorm_k] if "dbnorm" in need and p.dbnorm_dynamic else [])
            qstats = scoring.bank_stats(scoring.wti_score_fn(bq, gal, q_is_text=q_is_text), len(bq[0]), n_g,
                                        betas=betas, mean_ks=mean_ks, hit_ks=hit_ks, q_chunk=q_chunk)
        if "qbnorm" in need:
            transforms["qbnorm"] = lambda qs, b: retrieval.qb_norm(b, qstats, p.qbnorm_beta, p.qbnorm_k)
            info["qbnorm"] = {"query_bank": qb_info}
        if "dbnorm" in need:
            bg = _take(bank_vids if q_is_text else bank_texts, p.gallery_bank_size)
            gstats = scoring.bank_stats(same_modality_score_fn(bg, gal), len(bg[0]), n_g, betas=[p.dbnorm_beta2],
                                        hit_ks=[p.dbnorm_k] if p.dbnorm_dynamic else [], q_chunk=q_chunk)
            transforms["dbnorm"] = lambda qs, b: retrieval.db_norm(b, qstats, gstats, p.dbnorm_beta1, p.dbnorm_beta2,
                                                                  dynamic=p.dbnorm_dynamic, k=p.dbnorm_k)
            info["dbnorm"] = {"query_bank": qb_info, "gallery_bank": bank_info(g_items, bg, p.gallery_bank_size),
                              "gallery_bank_similarity": f"WTI {g_items} x {g_items}"}
        if "nnn" in need:
            transforms["nnn"] = lambda qs, b: retrieval.nnn(b, qstats, alpha=p.nnn_alpha, k=p.nnn_k)
            info["nnn"] = {"query_bank": qb_info, "k_used": min(p.nnn_k, qb_info["size"])}
        if "csls" in need:
            transforms["csls"] = lambda qs, b: retrieval.csls(b, qstats, k=p.csls_k)
            info["csls"] = {"query_bank": qb_info, "k_used_query_bank": min(p.csls_k, qb_info["size"]),
                            "k_used_gallery": min(p.csls_k, n_g)}
        if "dsl" in need:
            col = scoring.column_lse(fn, n_q, n_g, temperature=p.dsl_temperature, q_chunk=q_chunk)
            transforms["dsl"] = lambda qs, b: retrieval.dual_softmax(b, col, p.dsl_temperature)
            info["dsl"] = {"softmax_over": f"the {n_q} test {q_items}"}
        for name in CORRECTIONS:
            if name not in transforms:
                continue
            st = _rank_direction(fn, n_q, n_g, d.targets, d.k, dist_, opts, rescore=transforms[name])
            rep = _direction_report(st, d.k, n_g)
            rep["params"] = {**correction_params_of(name, p), **info[name]}
            out.setdefault(name, {})[d.name] = rep
    return out


# -- reporting -------------------------------------------------------------------------------

def _fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _bank_text(b) -> str:
    if isinstance(b, str):
        return b
    size = f"{b['size']}" + (f" (of {b['requested']} asked)" if b["size"] < b["requested"] else "")
    return f"{size} {b['split']} {b['items']}, seed {b['seed']}"


def correction_lines(cd: dict[str, Any]) -> list[str]:
    """One line per correction and direction: its parameters and banks."""
    lines = []
    for cname, dirs in cd.items():
        for dname, d in dirs.items():
            prm = d.get("params", {})
            vals = ", ".join(f"{key} {_fmt(v)}" for key, v in prm.items()
                             if key not in ("method", "query_bank", "gallery_bank", "gallery_bank_similarity"))
            banks = []
            if "query_bank" in prm:
                banks.append(f"query bank: {_bank_text(prm['query_bank'])}")
            if "gallery_bank" in prm:
                banks.append(f"gallery bank: {_bank_text(prm['gallery_bank'])} "
                             f"({prm.get('gallery_bank_similarity', '')})")
            lines.append(f"  {cname} {dname}: {prm.get('method', '')}; {vals}; " + "; ".join(banks))
    return lines


def format_report(m: dict[str, Any]) -> str:
    cols = ("R1", "R5", "R10", "R50", "MdR", "MnR", "Rsum")
    hcols = ("skewness", "hub_occurrence", "antihub_share", "robin_hood", "gini")
    lines = [f"{'':<18}" + "".join(f"{c:>8}" for c in cols) + f"{'queries':>9}{'gallery':>9}"]

    def row(label, d):
        vals = "".join(f"{d[c]:>8.1f}" for c in cols)
        return f"{label:<18}{vals}{d['num_queries']:>9}{d['num_gallery']:>9}"

    def hrow(label, d):
        return f"{label:<18}" + "".join(f"{d['hubness'][c]:>15.3f}" for c in hcols)

    head = m.get("label")
    if head:
        lines.insert(0, head)
    for name, d in (("text->video", m["t2v"]), ("video->text", m["v2t"])):
        lines.append(row(name, d))
    for cname, cd in m.get("corrections", {}).items():
        for dname, d in cd.items():
            lines.append(row(f"{cname} {dname}", d))
    if m["v2t"].get("ranking"):
        lines.append(f"video->text ranking: {m['v2t']['ranking']} "
                     + ("(a query video ranks the videos, each by its best caption's score)"
                        if m["v2t"]["ranking"] == "best-caption" else "(a query video ranks every caption; "
                        "its rank is its best caption's)"))
    if m.get("missing_videos"):
        lines.append(f"missing videos: {m['missing_videos']} of the test split's videos were not found and "
                     "were kept as black frames (they count in every metric)")
    best = m.get("best_of_test")
    if best:
        lines += ["", best["label"]]
        for name, key in (("text->video", "t2v"), ("video->text", "v2t")):
            lines.append(row(f"{name} @{best[key]['step']}", best[key]))
    lines += ["", f"hubness (k={m['k']}){'':<1}" + "".join(f"{c:>15}" for c in hcols)]
    for name, d in (("text->video", m["t2v"]), ("video->text", m["v2t"])):
        lines.append(hrow(name, d))
    for cname, cd in m.get("corrections", {}).items():
        for dname, d in cd.items():
            lines.append(hrow(f"{cname} {dname}", d))
    lines.append(f"hubness: hubs N_k >= 2k (k clipped to the gallery size); top-k ties "
                 f"{m.get('hubness_ties', 'lower-index')}" + (f" (seed {m['tie_seed']})" if "tie_seed" in m else ""))
    if m.get("corrections"):
        lines += ["", "corrections (parameters and banks):"] + correction_lines(m["corrections"])
    for name, d in (("text->video", m["t2v"]), ("video->text", m["v2t"])):
        if d["hubness"].get("note"):
            lines.append(f"note, {name} hubness: {d['hubness']['note']}")
    return "\n".join(lines)


def _add_correction_options(p: argparse.ArgumentParser) -> None:
    """The corrections' and the hubness measures' options (defaults: CorrectionParams)."""
    d = CorrectionParams()
    g = p.add_argument_group("hubness corrections and measures (docs/corrections.md; defaults: the authors')")
    g.add_argument("--qbnorm-beta", type=float, default=d.qbnorm_beta, help="QB-Norm beta (default 20)")
    g.add_argument("--qbnorm-k", type=int, default=d.qbnorm_k,
                   help="QB-Norm activation k: normalise rows whose top-1 is in some bank query's top-k (default 1)")
    g.add_argument("--dbnorm-beta1", type=float, default=d.dbnorm_beta1,
                   help="DBNorm query-bank beta (default 1/1.99)")
    g.add_argument("--dbnorm-beta2", type=float, default=d.dbnorm_beta2, help="DBNorm gallery-bank beta (default 3)")
    g.add_argument("--dbnorm-dynamic", action=argparse.BooleanOptionalAction, default=d.dbnorm_dynamic,
                   help="DBNorm's dual dynamic inverted softmax instead of the dual inverted softmax (default off)")
    g.add_argument("--dbnorm-k", type=int, default=d.dbnorm_k, help="activation k of --dbnorm-dynamic (default 1)")
    g.add_argument("--nnn-k", type=int, default=d.nnn_k, help="NNN: nearest bank queries per gallery item (128)")
    g.add_argument("--nnn-alpha", type=float, default=d.nnn_alpha, help="NNN: weight of their mean (0.75)")
    g.add_argument("--csls-k", type=int, default=d.csls_k, help="CSLS neighbourhood size (default 10)")
    g.add_argument("--dsl-temperature", type=float, default=d.dsl_temperature,
                   help="dual softmax: softmax over the test queries of s / T (CAMoE's convention; default 1000; "
                        "0.01 = scores x 100)")
    g.add_argument("--bank-size", type=int, default=None,
                   help="both bank sizes at once (the specific options below win)")
    g.add_argument("--query-bank-size", type=int, default=None,
                   help=f"query bank: training captions (t2v) / videos (v2t) (default {d.query_bank_size})")
    g.add_argument("--gallery-bank-size", type=int, default=None,
                   help=f"DBNorm's gallery bank: training videos (t2v) / captions (v2t) "
                        f"(default {d.gallery_bank_size})")
    g.add_argument("--bank-seed", type=int, default=d.bank_seed, help="seed of the banks' random subsets (default 0)")
    g.add_argument("--hubness-ties", choices=scoring.TIES, default="lower-index",
                   help="tie rule of the top-k lists behind N_k: lower-index (default) or random (scikit-hubness)")
    g.add_argument("--tie-seed", type=int, default=0, help="seed of --hubness-ties random (default 0)")


def _correction_params(p: argparse.ArgumentParser, args) -> CorrectionParams:
    d = CorrectionParams()
    fields = {f.name for f in dataclasses.fields(CorrectionParams)}
    kw = {name: getattr(args, name) for name in fields if getattr(args, name, None) is not None}
    for name in ("query_bank_size", "gallery_bank_size"):
        if getattr(args, name) is None:
            kw[name] = args.bank_size if args.bank_size is not None else getattr(d, name)
    params = CorrectionParams(**kw)
    try:
        params.validate()
    except ValueError as err:
        p.error(f"--{err}")
    return params


def eval_output_dir(run_dir: Path, output_dir: str | None) -> Path:
    """Where an evaluation writes: ``--output-dir`` (refused if an evaluation already wrote
    there), else a new ``<run>/evals/<timestamp>`` (the run's own metrics.json and
    nk_histogram.png, from the end of its training, are never overwritten)."""
    from nbretr.runtime import new_run_dir
    if output_dir:
        out = Path(output_dir)
        if (out / "metrics.json").exists():
            raise ValueError(f"--output-dir {out} already holds an evaluation ({out / 'metrics.json'}); "
                             "choose another folder")
    else:
        out = new_run_dir(None, prefix=str(run_dir / "evals"), create=False)
    out.mkdir(parents=True, exist_ok=True)
    return out


def main(argv: list[str] | None = None) -> int:
    import os

    from nbretr import checkpoint as ckpt
    from nbretr.config import TrainConfig, known_fields
    from nbretr.runtime import FolderLock
    from nbretr.builders import build_datasets, build_model, build_tokenizer
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a checkpoint file or a run folder (its checkpoints/last.pt)")
    src.add_argument("--init-model", default=None,
                     help="an exported model folder (python -m nbretr.export) instead of a training checkpoint")
    p.add_argument("--dataset", default=None)
    p.add_argument("--data-root", "--data_root", dest="data_root", default=None)
    p.add_argument("--corrections", default="", help=f"comma list of {', '.join(CORRECTIONS)}, or 'all'")
    _add_correction_options(p)
    p.add_argument("--k", type=int, default=None, help="k of the hubness report (default: the run's eval_k)")
    p.add_argument("--output-dir", default=None,
                   help="where metrics.json and the PNG go (default: a new <run>/evals/<timestamp>)")
    p.add_argument("--device", default="auto")
    p.add_argument("--backend", default=None, choices=("auto", "ext", "torch"),
                   help="nbretr.ops backend (default: $NBRETR_BACKEND or auto)")
    p.add_argument("--decoder", default=None, choices=("auto", "torchcodec", "decord", "pyav"),
                   help="video decoder (default: the run's; auto takes the fastest installed)")
    p.add_argument("--decode-device", default=None,
                   help="cpu, or cuda for torchcodec's GPU decoding (default: the run's)")
    p.add_argument("--v2t-ranking", default=None, choices=V2T_RANKINGS,
                   help="video->text on multi-caption sets (default: the run's, best-caption under the "
                        "reference recipe)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved options (the run's, with this command's) as YAML and exit")
    args = p.parse_args(argv)
    corr = CORRECTIONS if args.corrections == "all" else tuple(c for c in args.corrections.split(",") if c)
    bad = [c for c in corr if c not in CORRECTIONS]
    if bad:
        p.error(f"--corrections: unknown {bad}; choose from {', '.join(CORRECTIONS)} or 'all'")
    if args.k is not None and args.k < 1:
        p.error(f"--k must be at least 1, got {args.k}")
    backend = args.backend or os.environ.get("NBRETR_BACKEND") or "auto"
    if backend not in ("auto", "ext", "torch"):
        p.error(f"NBRETR_BACKEND={backend!r} is not a backend; use auto, ext or torch")
    params = _correction_params(p, args)
    if args.init_model:
        from nbretr import pretrained
        path = Path(args.init_model)
        meta = pretrained.read_config(path)
        state = None
        cfg = TrainConfig(**known_fields({k: v for k, v in meta.get("train_config", {}).items()
                                          if k not in ("clip", "clip_path", "tokenizer_path")},
                                         f"{path / pretrained.CONFIG} (train_config)"))
        cfg.clip, cfg.clip_path, cfg.tokenizer_path, cfg.init_model = "tiny", None, None, str(path)
        from nbretr.builders import init_model_config
        cfg = init_model_config(cfg)
        run_dir = path
    else:
        path = Path(args.checkpoint)
        if path.is_dir():
            path = path / "checkpoints" / "last.pt"
        state, path = ckpt.load_with_fallback(path, required=("model", "config"))
        cfg = TrainConfig(**known_fields(state["config"], f"checkpoint {path}"))
        run_dir = path.parent.parent
    cfg.backend = backend
    if args.v2t_ranking:
        cfg.v2t_ranking = args.v2t_ranking
    if args.decoder:
        cfg.decoder = args.decoder
    if args.decode_device:
        cfg.decode_device = args.decode_device
    if cfg.decoder != "auto" or cfg.decode_device != "cpu":  # asked for, and cannot work here: say so now
        from nbretr.data.decoding import resolve_decoder
        resolve_decoder(cfg.decoder, cfg.decode_device)
    if args.dataset:
        cfg.dataset = args.dataset
    if args.data_root:
        cfg.data_root = args.data_root
    if args.print_config:
        import yaml

        from nbretr.config import to_yaml
        evaluation = {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
                      for k, v in {**vars(args), **dataclasses.asdict(params)}.items() if k != "print_config"}
        print(to_yaml(cfg) + yaml.safe_dump({"evaluation": evaluation}, sort_keys=False), end="")
        return 0
    dist_ = setup_distributed(args.device)
    setup_logging(dist_.rank)
    lock = None
    try:
        with ops.use_backend(backend):
            out_dir = eval_output_dir(run_dir, args.output_dir) if dist_.is_main else None
            if dist_.enabled:
                obj = [str(out_dir)]
                dist.broadcast_object_list(obj, src=0)
                out_dir = Path(obj[0])
            if dist_.is_main:
                lock = FolderLock(out_dir)
            splits = ("train", "test") if corr else ("test",)
            tok = build_tokenizer(cfg, run_dir)
            data = build_datasets(cfg, tok, splits, out_dir=out_dir if dist_.is_main else None)
            model = build_model(cfg, getattr(tok, "vocab_size", None)).to(dist_.device)
            if state is not None:
                model.load_state_dict(state["model"])
            metrics = evaluate(model, data["test"], cfg, dist_, k=args.k if args.k is not None else cfg.eval_k,
                               out_dir=out_dir, corrections=corr, bank_ds=data.get("train"), params=params,
                               hubness_ties=args.hubness_ties, tie_seed=args.tie_seed)
            metrics["init_model" if state is None else "checkpoint"] = str(path)
            if dist_.is_main:
                print(format_report(metrics))
                mpath = write_json(out_dir / "metrics.json", metrics)
                print(f"metrics: {mpath.resolve()}")
            return 0
    finally:
        if lock is not None:
            lock.release(remove=True)
        cleanup_distributed()


if __name__ == "__main__":
    from nbretr.runtime import run_cli
    sys.exit(run_cli(main, "python -m nbretr.eval"))
