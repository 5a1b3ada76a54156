"""The method's claim on our own data: train the tiny model twice on the embedded dataset
with the same seed and budget — NeighborRetr's losses vs the plain InfoNCE baseline — and
print R@1 and N_k skewness (k = 10) both ways for each.

    python bench/method_effect.py [--epochs N] [--out DIR] [extra nbretr.train options]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def run(name: str, extra: list[str], out: Path) -> dict:
    run_dir = out / name
    cmd = [sys.executable, "-m", "nbretr.train", "--output-dir", str(run_dir), *extra]
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["wall_s"] = round(time.time() - t0, 1)
    return metrics


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/out/method_effect")
    args, extra = p.parse_known_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"neighborretr": run("neighborretr", extra, out), "baseline": run("baseline", [*extra, "--baseline"], out)}
    rows = []
    header = f"{'run':<14}{'t2v R@1':>9}{'t2v Rsum':>10}{'t2v skew':>10}{'v2t R@1':>9}{'v2t Rsum':>10}{'v2t skew':>10}{'wall s':>8}"
    for name, m in res.items():
        rows.append(f"{name:<14}{m['t2v']['R1']:>9.1f}{m['t2v']['Rsum']:>10.1f}{m['t2v']['hubness']['skewness']:>10.3f}"
                    f"{m['v2t']['R1']:>9.1f}{m['v2t']['Rsum']:>10.1f}{m['v2t']['hubness']['skewness']:>10.3f}{m['wall_s']:>8.0f}")
    table = "\n".join([header, "-" * len(header), *rows])
    print(table)
    (out / "method_effect.json").write_text(json.dumps(res, indent=1))
    print(f"wrote {out / 'method_effect.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
