"""Which test items of the embedded dataset are hubs, and why (not a test; a second).

Reads the N_10 counts a run wrote (``nk_counts.json`` in its folder) and the dataset's
manifest, and prints, pooled over the runs given: the text->video N_10 of visually generic
("busy") clips against the others and their share among the top hubs, N_10 by colour (the
colours are long-tailed), and the video->text N_10 of captions by how many factors they
name. docs/data.md quotes its output for the baseline runs of bench/method_effect.py.

    python tools/hub_composition.py RUN [RUN ...] [--data data/synthetic/default] [--top 20]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from nbretr.data import synthetic

FACTOR_WORDS = (set(synthetic.COLOURS) | set(synthetic.DIRECTIONS) | set(synthetic.BACKGROUNDS)
                | set(synthetic.SIZES_PX) | set(synthetic.SPEEDS_PX) | set(synthetic.COUNTS.values()))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run folders with nk_counts.json")
    p.add_argument("--data", default=None, help="the dataset folder (default: the default build)")
    p.add_argument("--top", type=int, default=20, help="how many of the biggest hubs to look at (per run)")
    a = p.parse_args()
    root = Path(a.data) if a.data else synthetic.default_root("default")
    test = [v for v in json.loads((root / "manifest.json").read_text())["videos"] if v["split"] == "test"]
    busy = np.array([v["busy"] for v in test])
    named = np.array([len(set(v["caption"].split()) & FACTOR_WORDS) for v in test])
    colour = np.array([v["colour"] for v in test])
    t2v, v2t, top_busy = [], [], 0
    for run in a.runs:
        nk = json.loads((Path(run) / "nk_counts.json").read_text())
        if len(nk["t2v"]) != len(test):
            raise SystemExit(f"{run}: {len(nk['t2v'])} gallery items, but {root} has {len(test)} test videos")
        t2v.append(np.asarray(nk["t2v"]))
        v2t.append(np.asarray(nk["v2t"]))
        top_busy += int(busy[np.argsort(-t2v[-1], kind="stable")[:a.top]].sum())
    t2v_all, v2t_all = np.stack(t2v), np.stack(v2t)
    n = len(a.runs)
    print(f"{n} run(s), {len(test)} test videos, k = {nk['k']}")
    print(f"text->video N_k: busy clips {t2v_all[:, busy].mean():.1f}, others {t2v_all[:, ~busy].mean():.1f}; "
          f"busy clips are {100 * busy.mean():.1f}% of the gallery and {100 * top_busy / (a.top * n):.0f}% "
          f"of the top {a.top} hubs")
    print("text->video N_k by colour (share of the gallery):")
    for c in list(synthetic.COLOURS) + ["mixed"]:
        sel = colour == c
        print(f"  {c:<7} {100 * sel.mean():5.1f}%  N_k {t2v_all[:, sel].mean():5.1f}")
    print("video->text N_k of captions by the number of factors they name:")
    for k in range(int(named.max()) + 1):
        sel = named == k
        if sel.any():
            print(f"  {k} factor(s): {sel.sum():4d} captions, N_k {v2t_all[:, sel].mean():5.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
