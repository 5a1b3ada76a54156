"""Common benchmark runner for bench/*.py.

Each benchmark case is a callable; the runner checks nothing itself (the scripts check
correctness before timing), warms up, synchronises before reading the clock, takes the
median of repeats, measures peak memory (CUDA: max_memory_allocated; CPU: the high-water
mark of tensor allocations from the profiler's memory events), prints a table last and
writes JSON.
Out-of-memory is recorded as ``inf`` rather than aborting the sweep.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def git_commit() -> str:
    """The commit being measured: $NBRETR_COMMIT (set by gpu_check.sh, for copies of the
    tree without .git), else ``git rev-parse``."""
    if os.environ.get("NBRETR_COMMIT"):
        return os.environ["NBRETR_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def cpu_peak_bytes(fn: Callable[[], object]) -> float:
    """Peak bytes of CPU tensor memory live during one call of ``fn``: the profiler's
    allocation and free records ("[memory]" events, one per allocation or free, wherever
    it happens) summed in time order. (The per-op figures of ``prof.events()`` do not do:
    a free inside an op, e.g. of a kernel's scratch, is folded into that op's self usage
    and so dated at its start, which hides the scratch from the peak.)"""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = [e for e in prof.profiler.kineto_results.events()
               if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    live = peak = 0
    for e in sorted(records, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return float(peak)


@dataclass
class Result:
    name: str
    impl: str
    params: dict
    ms: float
    peak_mb: float
    extra: dict = field(default_factory=dict)
    out_mb: float = float("nan")  # bytes of the tensors the case returns (its outputs)

    @property
    def work_mb(self) -> float:
        """Peak memory beyond the case's own outputs: what it needs on top of the tensors
        every implementation must return (e.g. the gradients of a backward)."""
        return self.peak_mb - self.out_mb if self.out_mb == self.out_mb else float("nan")


def time_fn(fn: Callable[[], object], device: str, warmup: int = 2, repeats: int = 5,
            min_time_s: float = 0.0) -> float:
    """Median milliseconds of one call of ``fn``.

    CPU: each repeat is one call between host clock reads. CUDA: each repeat times a run of
    calls with CUDA events, the run long enough (about 2 ms) that launch gaps and the clock
    do not dominate sub-millisecond kernels; the result is per call."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def run(n: int) -> float:
            start.record()
            for _ in range(n):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / n

        inner = max(1, min(200, int(2.0 / max(run(1), 1e-3))))
        times = [run(inner) for _ in range(max(repeats, 1))]
        return statistics.median(times)
    times = []
    t_start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - t_start) < min_time_s:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 10 * max(repeats, 1):
            break
    return statistics.median(times)


def returned_mb(obj: object) -> float:
    """MiB of the tensors in ``obj`` (a tensor or nested tuples/lists/dicts of them)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size() / 2**20
    if isinstance(obj, (tuple, list)):
        return sum(returned_mb(x) for x in obj)
    if isinstance(obj, dict):
        return sum(returned_mb(x) for x in obj.values())
    return 0.0


def peak_mb(fn: Callable[[], object], device: str) -> tuple[float, float]:
    """Peak memory allocated while running ``fn`` once, in MiB, above what was live, and
    the MiB of the tensors ``fn`` returned (its outputs, counted in the peak)."""
    gc.collect()
    out: list = []
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out.append(fn())
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20, returned_mb(out)
    peak = cpu_peak_bytes(lambda: out.append(fn())) / 2**20
    return peak, returned_mb(out)


def run_case(name: str, impl: str, params: dict, fn: Callable[[], object], device: str,
             warmup: int = 2, repeats: int = 5, memory: bool = True, extra: dict | None = None) -> Result:
    try:
        ms = time_fn(fn, device, warmup=warmup, repeats=repeats)
        mem, out = peak_mb(fn, device) if memory else (float("nan"), float("nan"))
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as err:
        msg = str(err).lower()
        if ("out of memory" not in msg and "can't allocate memory" not in msg
                and not isinstance(err, (torch.OutOfMemoryError, MemoryError))):
            raise
        ms, mem, out = float("inf"), float("inf"), float("nan")
    return Result(name, impl, params, ms, mem, extra or {}, out)


def _ratio(base: float, x: float) -> float:
    if base != base or x != x or x == float("inf"):
        return float("nan")
    if x <= 0:
        return float("inf") if base > 0 else 1.0
    return base / x


def table(results: list[Result], baseline_impl: str, title: str) -> str:
    """Rows grouped by (name, params); speedup = baseline time / impl time (>1: faster),
    mem ratio = baseline peak / impl peak. Where the cases return tensors, two more columns:
    the peak beyond those outputs ("work") and its ratio."""
    lines = [f"## {title}", f"machine: {machine()}  torch {torch.__version__}  commit {git_commit()}", ""]
    work = any(r.out_mb > 0 for r in results)
    header = f"{'case':<34} {'impl':<18} {'ms':>10} {'peak MiB':>10} {'speedup':>8} {'mem ratio':>9}"
    if work:
        header += f" {'work MiB':>9} {'work ratio':>10}"
    lines += [header, "-" * len(header)]
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        groups.setdefault((r.name, json.dumps(r.params, sort_keys=True)), []).append(r)
    # the parameters that tell apart the cases of one name (shown after it)
    by_name: dict[str, list[dict]] = {}
    for r in results:
        by_name.setdefault(r.name, []).append(r.params)
    varying = {name: [k for k in sorted(set().union(*ps)) if len({json.dumps(p.get(k)) for p in ps}) > 1]
               for name, ps in by_name.items()}
    for (name, _), rs in groups.items():
        base = next((r for r in rs if r.impl == baseline_impl), None)
        keys = varying[name]
        if keys:
            name = f"{name} " + " ".join(f"{k}={rs[0].params.get(k)}" for k in keys)
        for r in rs:
            sp = base.ms / r.ms if base and r.ms not in (0, float("inf")) else float("nan")
            mr = _ratio(base.peak_mb, r.peak_mb) if base else float("nan")
            line = f"{name:<34} {r.impl:<18} {r.ms:>10.3f} {r.peak_mb:>10.2f} {sp:>7.2f}x {mr:>8.1f}x"
            if work:
                wr = _ratio(base.work_mb, r.work_mb) if base else float("nan")
                line += f" {r.work_mb:>9.2f} {wr:>9.1f}x"
            lines.append(line)
    return "\n".join(lines)


def write_json(results: list[Result], out: str | os.PathLike | None, bench: str) -> Path | None:
    """Write the results to ``out`` (a folder, then ``<bench>.json`` in it, or a .json file)
    and print where; nothing without ``out``."""
    if not out:
        return None
    path = Path(out)
    if path.suffix != ".json":
        path.mkdir(parents=True, exist_ok=True)
        path = path / f"{bench}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"bench": bench, "machine": machine(), "torch": torch.__version__, "commit": git_commit(),
               "date": time.strftime("%Y-%m-%d"), "results": [{**asdict(r), "work_mb": r.work_mb} for r in results]}
    path.write_text(json.dumps(payload, indent=1, default=float))
    print(f"wrote {path}")
    return path


_DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16", "half": "float16", "float64": "float64", "fp64": "float64",
           "double": "float64"}


def dtype_list(text: str) -> list[str]:
    """argparse type for --dtypes: comma-separated names (torch's or fp32/bf16/fp16/fp64),
    returned as torch's names; an unknown one is an error that names it."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n.lower() not in _DTYPES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown dtype {bad[0]!r}; expected a comma-separated list of "
                                         "float32 (fp32), bfloat16 (bf16), float16 (fp16), float64 (fp64)"
                                         if bad else "expected at least one dtype")
    return [_DTYPES[n.lower()] for n in names]


def int_list(text: str) -> list[int]:
    """argparse type for comma-separated positive integers (sizes, k)."""
    try:
        vals = [int(n) for n in text.split(",") if n.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return vals


def arg_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="folder (or .json file) for the JSON results")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="small shapes, for smoke tests")
    return p


def main_guard(fn: Callable[[], int]) -> None:
    sys.exit(fn())
