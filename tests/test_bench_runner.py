"""bench/_runner.py: the CPU peak-memory measurement counts each live byte once."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import _runner  # noqa: E402


def test_cpu_peak_counts_nested_allocations_once():
    def fn():
        a = torch.empty(2_500_000)       # 10 MB
        b = a.to(torch.float64)          # 20 MB, allocated inside aten::to -> _to_copy -> empty_strided
        del a
        return b.sum()

    assert _runner.cpu_peak_bytes(fn) == 30_000_000


def test_cpu_peak_follows_frees():
    def fn():
        for _ in range(5):
            x = torch.empty(1_000_000)   # 4 MB, freed each iteration
            del x
        keep = [torch.empty(250_000) for _ in range(4)]  # 4 x 1 MB live together
        return keep

    assert _runner.cpu_peak_bytes(fn) == 4_000_000
