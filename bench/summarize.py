"""Print a short table from the JSON files written by bench/*.py (used by gpu_check.sh).

Per bench file and case: every implementation's median time and its speed ratio against
the file's baseline implementation (the first one listed for the case)."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def main(folder: str) -> int:
    files = sorted(Path(folder).glob("*.json"))
    rows = []
    for f in files:
        data = json.loads(f.read_text())
        if "results" not in data:
            continue
        groups: dict[str, list[dict]] = {}
        for r in data["results"]:
            key = r["name"] + " " + ",".join(f"{k}={v}" for k, v in r["params"].items())
            groups.setdefault(key, []).append(r)
        for key, rs in groups.items():
            base = rs[0]
            for r in rs[1:]:
                ratio = base["ms"] / r["ms"] if r["ms"] not in (0, float("inf")) else float("nan")
                rows.append((data["bench"], key[:70], f"{r['impl']} vs {base['impl']}", r["ms"], ratio))
    if not rows:
        print(f"no bench JSON in {folder}")
        return 1
    print(f"{'bench':<16} {'case':<70} {'impls':<36} {'ms':>9} {'speedup':>8}")
    for b, k, i, ms, ratio in rows:
        print(f"{b:<16} {k:<70} {i:<36} {ms:>9.3f} {ratio:>7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "bench/out"))
