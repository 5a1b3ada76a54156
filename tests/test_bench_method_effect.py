"""bench/method_effect.py's arithmetic: mean and standard deviation over seeds, the table,
the verdict against the seeds' spread, and the N_k figure (on made-up run metrics; the
trainings themselves are the benchmark's business)."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import method_effect as ME  # noqa: E402


def _metrics(t2v_r1, skew, tmp: Path, name: str, counts=(0, 5, 10, 25)):
    nk = tmp / f"{name}.json"
    nk.write_text(json.dumps({"k": 10, "t2v": list(counts), "v2t": list(counts)}))
    h = {"skewness": skew, "max_ratio": 2.5, "hubs_5x": 0}
    return {"t2v": {"R1": t2v_r1, "Rsum": 3 * t2v_r1, "hubness": h},
            "v2t": {"R1": t2v_r1 + 1, "Rsum": 3 * t2v_r1, "hubness": dict(h)},
            "nk_counts": str(nk), "wall_s": 10.0}


def test_summary_table_and_verdict(tmp_path):
    runs = {"infonce": {s: _metrics(r, 2.0 + 0.1 * s, tmp_path, f"i{s}") for s, r in enumerate([5.0, 6.0, 7.0])},
            "neighborretr": {s: _metrics(r, 1.0, tmp_path, f"n{s}") for s, r in enumerate([9.0, 9.5, 10.0])}}
    summary = ME.summarize(runs)
    r1 = summary["infonce"]["t2v_R1"]
    assert r1["mean"] == pytest.approx(6.0) and r1["sd"] == pytest.approx(1.0)  # sample standard deviation
    assert summary["infonce"]["wall_s"] == pytest.approx(30.0)
    table = ME.table(summary)
    assert "| infonce | 6.0 ± 1.0 |" in table and "| neighborretr | 9.5 ± 0.5 |" in table
    lines = ME.verdict(summary)
    assert lines[0].endswith("better")                        # +3.5 R@1 against a spread of 1.0
    assert "t2v skewness" in lines[2] and lines[2].endswith("better")   # lower skewness is better
    close = {"infonce": runs["infonce"],
             "neighborretr": {s: _metrics(r, 2.1, tmp_path, f"c{s}") for s, r in enumerate([6.5, 5.5, 6.8])}}
    lines = ME.verdict(ME.summarize(close))
    assert lines[0].endswith("within the spread") and lines[2].endswith("within the spread")
    worse = {"infonce": runs["neighborretr"], "neighborretr": runs["infonce"]}
    assert ME.verdict(ME.summarize(worse))[0].endswith("worse")


def test_figure_is_written(tmp_path):
    runs = {"infonce": {0: _metrics(5.0, 2.0, tmp_path, "a", counts=(0, 0, 40, 0))},
            "neighborretr": {0: _metrics(6.0, 1.0, tmp_path, "b")}}
    ME.figure(runs, tmp_path / "nk.png")
    assert (tmp_path / "nk.png").stat().st_size > 5000
