"""The test harness shared by every operator's tests.

- ``device`` fixture / ``DEVICES``: cpu always, cuda when present (marked ``needs_cuda``
  and skipped here when absent).
- ``DTYPES`` / ``tol(dtype)``: the floating dtypes every op accepts and their tolerances.
- ``seed`` (autouse): every test starts from the same RNG state.
- ``BACKENDS``: the backends to compare; "ext" is skipped (or, with NBRETR_REQUIRE_EXT=1
  as in CI, fails) when the extension is not loaded.
"""
from __future__ import annotations

import os

import pytest
import torch

import nbretr
from nbretr._ext import ext_has_cuda, ext_loaded, ext_unavailable_reason

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda)]
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}


def tol(dtype: torch.dtype) -> dict:
    return TOLERANCES[dtype]


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "needs_cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)


def pytest_report_header(config):
    info = nbretr.build_info()
    return [f"nbretr build: {info}"]


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


def require_ext(device: str = "cpu") -> None:
    """Skip (or fail when NBRETR_REQUIRE_EXT=1) unless the extension runs on ``device``."""
    ok = ext_loaded() and (device == "cpu" or ext_has_cuda())
    if ok:
        return
    why = ext_unavailable_reason() if not ext_loaded() else "extension built without CUDA"
    if os.environ.get("NBRETR_REQUIRE_EXT", "0") == "1":
        pytest.fail(f"NBRETR_REQUIRE_EXT=1 but the extension cannot run on {device}: {why}")
    pytest.skip(f"extension not available on {device}: {why}")


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture
def ext_device(device):
    """A device on which the extension must run (skips otherwise)."""
    require_ext(device)
    return device


def assert_topk_equivalent(values, indices, ref_values, ref_indices, gallery_values=None):
    """faiss-style comparison of top-k results: values equal; where indices differ the
    two indexed values are equal; no index appears twice in a row."""
    torch.testing.assert_close(values, ref_values)
    diff = indices != ref_indices
    if diff.any():
        torch.testing.assert_close(values[diff], ref_values[diff])
    for row in indices.tolist():
        valid = [i for i in row if i >= 0]
        assert len(valid) == len(set(valid)), f"index repeated in a top-k row: {row}"


@pytest.fixture(autouse=True)
def _restore_cublas_fp16_accumulation():
    """Tests may set torch.backends.cuda.matmul.allow_fp16_accumulation (a property that
    monkeypatch cannot restore); put it back after each test."""
    before = getattr(torch.backends.cuda.matmul, "allow_fp16_accumulation", None)
    yield
    if before is not None:
        torch.backends.cuda.matmul.allow_fp16_accumulation = before
