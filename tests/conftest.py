"""pytest hooks and the fixtures shared by every test file (plain helpers are in
tests/helpers.py).

- ``device`` fixture: cpu always, cuda when present (marked ``needs_cuda`` and skipped
  here when absent).
- ``seed`` (autouse): every test starts from the same RNG state.
- ``--cpu-isa``: cap the CPU kernels' x86 build for the whole run (tests/test_cpu_isa.py).
"""
from __future__ import annotations

import pytest
import torch

import nbretr
from helpers import DEVICES, HAS_CUDA


def pytest_addoption(parser):
    parser.addoption("--cpu-isa", default=None, choices=["auto", "avx512", "avx2", "base"],
                     help="cap the x86 build the CPU kernels use (nbretr.ops kernel setting cpu_isa)")


def pytest_configure(config):
    isa = config.getoption("--cpu-isa", default=None)
    if isa:
        nbretr.ops.set_kernel_settings(cpu_isa=isa)


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "needs_cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)


def pytest_report_header(config):
    info = nbretr.build_info()
    return [f"nbretr build: {info}", f"nbretr kernel settings: cpu_isa={nbretr.ops.get_kernel_settings().cpu_isa}"]


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _tf32_off():
    # Comparisons are against fp32 references: keep TF32 off.
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _restore_cublas_fp16_accumulation():
    """Tests may set torch.backends.cuda.matmul.allow_fp16_accumulation (a property that
    monkeypatch cannot restore); put it back after each test."""
    before = getattr(torch.backends.cuda.matmul, "allow_fp16_accumulation", None)
    yield
    if before is not None:
        torch.backends.cuda.matmul.allow_fp16_accumulation = before
