"""Helpers shared by the test files (imported as ``from helpers import ...``; pytest puts
tests/ on sys.path). Fixtures and hooks are in tests/conftest.py.

- ``DEVICES``: cpu always, cuda when present (marked ``needs_cuda`` and skipped when absent).
- ``FLOAT_DTYPES``: the floating dtypes every op accepts.
- ``require_ext(device)``: skip unless the extension runs on ``device``; with
  NBRETR_REQUIRE_EXT=1 (as in CI) fail instead.
- ``nbretr_testing_ops()``: the test-only operators, ``torch.ops.nbretr_testing`` (csrc/testing.h),
  which exist only once a test asks for them.
- ``assert_topk_equivalent``: faiss-style comparison of top-k results.
"""
from __future__ import annotations

import os

import pytest
import torch

from nbretr._ext import ext_has_cuda, ext_loaded, ext_module, ext_unavailable_reason

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda)]
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def require_ext(device: str = "cpu") -> None:
    """Skip (or fail when NBRETR_REQUIRE_EXT=1) unless the extension runs on ``device``."""
    ok = ext_loaded() and (device == "cpu" or ext_has_cuda())
    if ok:
        return
    why = ext_unavailable_reason() if not ext_loaded() else "extension built without CUDA"
    if os.environ.get("NBRETR_REQUIRE_EXT", "0") == "1":
        pytest.fail(f"NBRETR_REQUIRE_EXT=1 but the extension cannot run on {device}: {why}")
    pytest.skip(f"extension not available on {device}: {why}")


def nbretr_testing_ops():
    """``torch.ops.nbretr_testing`` (CPU kernels only), registered on first use; skips like
    :func:`require_ext` without the extension."""
    require_ext("cpu")
    ext_module()._register_testing_ops()
    return torch.ops.nbretr_testing


def assert_topk_equivalent(values, indices, ref_values, ref_indices):
    """faiss-style comparison of top-k results: values equal; where indices differ the
    two indexed values are equal; no index appears twice in a row."""
    torch.testing.assert_close(values, ref_values)
    diff = indices != ref_indices
    if diff.any():
        torch.testing.assert_close(values[diff], ref_values[diff])
    for row in indices.tolist():
        valid = [i for i in row if i >= 0]
        assert len(valid) == len(set(valid)), f"index repeated in a top-k row: {row}"
