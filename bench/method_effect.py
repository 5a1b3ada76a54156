"""Does NeighborRetr do what the paper claims on data we can run? Fine-tune the pretrained
stand-in on the embedded dataset (whose test split has hubs) under several training
configurations and seeds, and report the mean and standard deviation over seeds of
text->video and video->text R@1, Rsum and N_10 skewness (plus the biggest hub's share), for:

- ``infonce``: the plain symmetric InfoNCE baseline on the same model (``--baseline``);
- ``neighborretr``: the method with the reference's loss settings (the package's embedded
  default; a ``neighborretr-defaults`` row is added only if the package's defaults differ);
- ``infonce+qbnorm``, ``infonce+dsl``: the baseline's checkpoints with an inference-time
  hubness correction (``python -m nbretr.eval --corrections ...``, the authors' settings),
  and ``infonce+dsl-t0.01``: DSL at temperature 0.01 (docs/corrections.md says why);
- the ablation ``no-wti``, ``no-nbi``, ``no-opt``, ``no-kl``: NeighborRetr with one loss's
  weight set to 0.

Every run is a ``python -m nbretr.train`` subprocess in ``<out>/<config>/seed<N>``; a run whose
``metrics.json`` exists is reused, so an interrupted benchmark resumes where it stopped.
Writes ``<out>/method_effect.json`` (every run's numbers), ``<out>/method_effect.md`` (the
table and the verdict) and ``<out>/nk_distributions.png`` (the N_10 distributions of the
baseline and NeighborRetr, all seeds pooled).

    python bench/method_effect.py [--seeds 0,1,2,3,4] [--configs all] [--out DIR]
                                  [--epochs N] [-- extra nbretr.train options]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _runner import machine  # noqa: E402

# name -> extra nbretr.train options (the embedded default is NeighborRetr with the
# reference's loss settings: the configs below only change what they name)
TRAINED = {
    "infonce": ["--baseline"],
    "neighborretr": [],
    "no-wti": ["--w-wti", "0"],
    "no-nbi": ["--w-nbi", "0"],
    "no-opt": ["--w-opt", "0"],
    "no-kl": ["--w-kl", "0"],
}
# the reference's loss settings, checked against the package's embedded default
REFERENCE_LOSS = {"detach_centrality": False, "w_wti": 1.0, "w_opt": 1.0, "w_nbi": 1.0, "w_kl": 1.0,
                  "centrality_scale": 0.3, "temperature": 3.0, "beta": 0.7, "centrality": "mean"}
# row -> (eval folder, correction, extra nbretr.eval options); DSL twice: CAMoE code's
# temperature 1000 on raw similarities, and 0.01, its softmax on CLIP-scaled (x100) logits
CORRECTED = {"infonce+qbnorm": ("eval-authors", "qbnorm", []), "infonce+dsl": ("eval-authors", "dsl", []),
             "infonce+dsl-t0.01": ("eval-dsl-t0.01", "dsl", ["--dsl-temperature", "0.01"])}
ROWS = ("infonce", "infonce+qbnorm", "infonce+dsl", "infonce+dsl-t0.01", "neighborretr", "neighborretr-defaults",
        "no-wti", "no-nbi", "no-opt", "no-kl")
COLUMNS = (("t2v", "R1"), ("t2v", "Rsum"), ("t2v", "skewness"), ("t2v", "max_ratio"),
           ("v2t", "R1"), ("v2t", "Rsum"), ("v2t", "skewness"))


def package_default_differs(py: str) -> bool:
    """True when the embedded default's loss settings differ from :data:`REFERENCE_LOSS`."""
    import yaml
    out = subprocess.run([py, "-m", "nbretr.train", "--print-config"], check=True, capture_output=True, text=True)
    cfg = yaml.safe_load(out.stdout)
    return any(cfg.get(k) != v for k, v in REFERENCE_LOSS.items())


def _run_once(out: Path, cmd: list[str], log_path: Path) -> dict:
    """``out``'s metrics.json, plus ``wall_s``: runs ``cmd`` (its output to ``log_path``) only
    when there is no metrics.json yet, and records its wall time beside it."""
    wall = out / "wall_s.txt"
    if not (out / "metrics.json").is_file():
        print("$", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        with open(log_path, "w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
        wall.write_text(f"{time.perf_counter() - t0:.1f}\n")
    m = json.loads((out / "metrics.json").read_text())
    m["wall_s"] = float(wall.read_text()) if wall.is_file() else math.nan
    return m


def train(run_dir: Path, args: list[str], seed: int, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "nbretr.train", "--output-dir", str(run_dir), "--seed", str(seed),
           "--report-to", "none", *args, *extra]
    return _run_once(run_dir, cmd, run_dir.parent / f"seed{seed}.log")


def correct(run_dir: Path, row: str) -> dict:
    """The baseline run's test metrics after the correction of ``row`` (:data:`CORRECTED`),
    as a metrics dict of its own; one ``nbretr.eval`` call per eval folder."""
    folder, name, opts = CORRECTED[row]
    names = sorted({c for f, c, _ in CORRECTED.values() if f == folder})
    cmd = [sys.executable, "-m", "nbretr.eval", "--checkpoint", str(run_dir), "--corrections", ",".join(names),
           "--output-dir", str(run_dir / folder), *opts]
    m = _run_once(run_dir / folder, cmd, run_dir.parent / f"{run_dir.name}-{folder}.log")
    return {"t2v": m["corrections"][name]["t2v"], "v2t": m["corrections"][name]["v2t"], "wall_s": m["wall_s"]}


def value(m: dict, d: str, key: str) -> float:
    return float(m[d]["hubness"][key] if key in ("skewness", "max_ratio", "hubs_5x") else m[d][key])


def summarize(runs: dict[str, dict[int, dict]]) -> dict[str, dict]:
    out = {}
    for name, by_seed in runs.items():
        row = {"seeds": sorted(by_seed), "wall_s": sum(m["wall_s"] for m in by_seed.values())}
        for d, key in COLUMNS:
            xs = [value(m, d, key) for m in by_seed.values()]
            row[f"{d}_{key}"] = {"mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0,
                                 "values": xs}
        out[name] = row
    return out


def table(summary: dict[str, dict]) -> str:
    heads = [f"{d} {k.replace('max_ratio', 'top hub x')}" for d, k in COLUMNS]
    lines = ["| run | " + " | ".join(heads) + " | wall s |", "|---" * (len(heads) + 2) + "|"]
    for name in ROWS:
        if name not in summary:
            continue
        r = summary[name]
        cells = []
        for d, k in COLUMNS:
            c = r[f"{d}_{k}"]
            digits = 2 if k in ("skewness", "max_ratio") else 1
            cells.append(f"{c['mean']:.{digits}f} ± {c['sd']:.{digits}f}")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def verdict(summary: dict[str, dict]) -> list[str]:
    """Whether NeighborRetr beats the baseline by more than the seeds' spread (the larger of
    the two standard deviations), on t2v R@1, v2t R@1 and t2v/v2t N_10 skewness."""
    if "neighborretr" not in summary or "infonce" not in summary:
        return []
    nr, base = summary["neighborretr"], summary["infonce"]
    lines = []
    for col, better in (("t2v_R1", 1), ("v2t_R1", 1), ("t2v_skewness", -1), ("v2t_skewness", -1)):
        diff = nr[col]["mean"] - base[col]["mean"]
        spread = max(nr[col]["sd"], base[col]["sd"])
        if better * diff > spread:
            word = "better"
        elif -better * diff > spread:
            word = "worse"
        else:
            word = "within the spread"
        lines.append(f"- {col.replace('_', ' ')}: NeighborRetr {nr[col]['mean']:.2f} vs InfoNCE "
                     f"{base[col]['mean']:.2f} (difference {diff:+.2f}, spread {spread:.2f}): {word}")
    return lines


def figure(runs: dict[str, dict[int, dict]], path: Path) -> None:
    """The N_10 distributions (t2v and v2t panels) of the baseline and NeighborRetr, seeds pooled."""
    import numpy as np

    from nbretr._plot import pyplot, save_figure
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, d, title in zip(axes, ("t2v", "v2t"), ("text->video (gallery: videos)", "video->text (gallery: captions)")):
        k = None
        for name, colour in (("infonce", "tab:gray"), ("neighborretr", "tab:blue")):
            counts = []
            for m in runs.get(name, {}).values():
                nk = json.loads(Path(m["nk_counts"]).read_text())
                counts.extend(nk[d])
                k = nk["k"]
            if not counts:
                continue
            c = np.asarray(counts)
            bins = np.arange(0, c.max() + 2) - 0.5
            skew = statistics.fmean(value(m, d, "skewness") for m in runs[name].values())
            ax.hist(c, bins=bins, histtype="step", linewidth=1.6, color=colour, density=True,
                    label=f"{name} (skewness {skew:.2f})")
        ax.set_yscale("log")
        ax.set_xlabel(f"N_{k}: times an item is in a query's top {k}")
        ax.set_ylabel("share of gallery items")
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"N_{k} distributions on the embedded test split, {len(runs.get('infonce', {}))} seeds pooled")
    save_figure(fig, path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2,3,4", help="training seeds (comma list)")
    p.add_argument("--configs", default="all", help=f"comma list of {', '.join(ROWS)}, or all")
    p.add_argument("--out", default="bench/out/method_effect")
    args, extra = p.parse_known_args()
    extra = [x for x in extra if x != "--"]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    wanted = set(ROWS) if args.configs == "all" else {c.strip() for c in args.configs.split(",")}
    bad = wanted - set(ROWS)
    if bad:
        p.error(f"--configs: unknown {sorted(bad)}; known: {', '.join(ROWS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trained = dict(TRAINED)
    if "neighborretr-defaults" in wanted and package_default_differs(sys.executable):
        trained["neighborretr-defaults"] = []
        trained["neighborretr"] = [f"--{k.replace('_', '-')}={v}" for k, v in REFERENCE_LOSS.items()]
    t0 = time.perf_counter()
    runs: dict[str, dict[int, dict]] = {}
    need = {n for n in trained if n in wanted} | ({"infonce"} if wanted & set(CORRECTED) else set())
    # the comparison first (every seed), then the ablation: a stopped run still has the former
    main_rows = [n for n in trained if not n.startswith("no-")]
    jobs = [(n, s) for group in (main_rows, [n for n in trained if n.startswith("no-")])
            for s in seeds for n in group if n in need]
    for i, (name, seed) in enumerate(jobs, 1):
        print(f"[{i}/{len(jobs)}] {name} seed {seed} ({time.perf_counter() - t0:.0f} s so far)", flush=True)
        run_dir = out / name / f"seed{seed}"
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        runs.setdefault(name, {})[seed] = train(run_dir, trained[name], seed, extra)
        if name == "infonce":
            for row in CORRECTED:
                if row in wanted:
                    runs.setdefault(row, {})[seed] = correct(run_dir, row)
    summary = summarize(runs)
    wall = time.perf_counter() - t0
    md = [f"Machine: {machine()}. Seeds {', '.join(map(str, seeds))}; this invocation took {wall / 60:.1f} min "
          f"(runs reused from an earlier invocation count in the table's wall column, not here).", "",
          table(summary), "", "Verdict (difference of the means against the larger standard deviation):",
          *verdict(summary)]
    (out / "method_effect.md").write_text("\n".join(md) + "\n")
    (out / "method_effect.json").write_text(json.dumps({"machine": machine(), "seeds": seeds, "extra": extra,
                                                        "summary": summary}, indent=1))
    if "infonce" in runs and "neighborretr" in runs:
        figure(runs, out / "nk_distributions.png")
    print("\n".join(md))
    print(f"wrote {out / 'method_effect.md'}, {out / 'method_effect.json'}"
          + (f", {out / 'nk_distributions.png'}" if (out / "nk_distributions.png").exists() else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
