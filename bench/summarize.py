"""Print a short table from the JSON files written by bench/*.py (used by gpu_check.sh).

Per bench file and case: every implementation's median time, its speed-up and its peak
memory ratio against the case's baseline implementation (the first one listed)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def _ratio(a: float, b: float) -> float:
    if b in (0, float("inf")) or not math.isfinite(a) or math.isnan(b):
        return float("nan")
    return a / b


def rows(folder: str) -> list[tuple]:
    out = []
    for f in sorted(Path(folder).glob("*.json")):
        data = json.loads(f.read_text())
        if "results" not in data:
            continue
        groups: dict[str, list[dict]] = {}
        for r in data["results"]:
            skip = {"L", "F", "D", "iters", "image"}
            key = r["name"] + " " + ",".join(f"{k}={v}" for k, v in r["params"].items() if k not in skip)
            groups.setdefault(key, []).append(r)
        for key, rs in groups.items():
            base = rs[0]
            for r in rs[1:]:
                out.append((data["bench"], key, f"{r['impl']} / {base['impl']}", r["ms"],
                            _ratio(base["ms"], r["ms"]), _ratio(base["peak_mb"], r["peak_mb"])))
    return out


def main(folder: str) -> int:
    table = rows(folder)
    if not table:
        print(f"no bench JSON in {folder}")
        return 1
    width = max(len(r[1]) for r in table)
    print(f"{'bench':<15} {'case':<{width}} {'impl / baseline':<30} {'ms':>9} {'speedup':>8} {'mem':>7}")
    for b, k, i, ms, sp, mem in table:
        print(f"{b:<15} {k:<{width}} {i:<30} {ms:>9.3f} {sp:>7.2f}x {mem:>6.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "bench/out"))
