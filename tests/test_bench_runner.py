"""bench/_runner.py: the CPU peak-memory measurement counts each live byte once; the work
memory is the peak beyond the returned outputs."""
import sys
from pathlib import Path

import pytest
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


def test_work_memory_excludes_the_returned_outputs():
    def fn():
        tmp = torch.empty(2 * 2**18)     # 2 MiB of scratch, freed before returning
        out = (torch.zeros(2**18), [torch.zeros(2**17)])  # 1 MiB + 0.5 MiB returned
        del tmp
        return out

    r = _runner.run_case("case", "impl", {}, fn, "cpu", warmup=0, repeats=1)
    assert r.peak_mb == 3.5 and r.out_mb == 1.5 and r.work_mb == 2.0
    table = _runner.table([r], "impl", "t")
    assert "work MiB" in table.splitlines()[3] and " 2.00 " in table.splitlines()[-1]


def test_cpu_peak_sees_scratch_freed_inside_an_op():
    """logsumexp allocates a temporary the size of its input and frees it before it
    returns; the per-op figures date that free at the op's start and miss it."""
    x = torch.zeros(64, 128, 256)   # 8 MiB
    assert _runner.cpu_peak_bytes(lambda: torch.logsumexp(x, dim=1)) >= x.numel() * 4


def test_table_names_the_parameters_that_differ():
    rs = [_runner.Result("topk", impl, {"N": 10, "k": k, "dtype": "float32"}, ms, 1.0)
          for k in (10, 100) for impl, ms in (("bare", 2.0), ("ext", 1.0))]
    lines = _runner.table(rs, "bare", "t").splitlines()[5:]
    assert [line.split()[:3] for line in lines] == [["topk", "k=10", "bare"], ["topk", "k=10", "ext"],
                                                    ["topk", "k=100", "bare"], ["topk", "k=100", "ext"]]
    assert " 2.00x" in lines[1] and " 2.00x" in lines[3]


def test_a_case_that_cannot_allocate_is_recorded_not_raised():
    """An allocation the machine refuses (torch's CPU allocator says "can't allocate
    memory", CUDA "out of memory") marks the case infinite; other errors still raise."""
    def refuse():
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 40000000000 bytes. Error code 12 (Cannot allocate memory)")
    r = _runner.run_case("x", "untiled", {}, refuse, "cpu", warmup=0, repeats=1)
    assert r.ms == float("inf") and r.peak_mb == float("inf")

    def broken():
        raise RuntimeError("shape mismatch")
    with pytest.raises(RuntimeError, match="shape mismatch"):
        _runner.run_case("x", "broken", {}, broken, "cpu", warmup=0, repeats=1)


def test_dtype_and_int_lists_name_the_bad_value(capsys):
    assert _runner.dtype_list("bf16,float32, fp16") == ["bfloat16", "float32", "float16"]
    assert _runner.int_list("10,200_000") == [10, 200000]
    p = _runner.arg_parser("x")
    p.add_argument("--dtypes", type=_runner.dtype_list, default="fp32")
    p.add_argument("--ks", type=_runner.int_list, default="10")
    assert p.parse_args([]).dtypes == ["float32"] and p.parse_args([]).ks == [10]
    for argv, msg in [(["--dtypes", "float32,int8"], "argument --dtypes: unknown dtype 'int8'"),
                      (["--ks", "10,a"], "argument --ks: expected comma-separated integers, got '10,a'"),
                      (["--ks", "0"], "argument --ks: expected comma-separated integers >= 1, got '0'")]:
        with pytest.raises(SystemExit):
            p.parse_args(argv)
        assert msg in capsys.readouterr().err
