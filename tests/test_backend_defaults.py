"""What ``backend="auto"`` runs on a CUDA device: only kernels verified on a GPU.

These tests need no GPU: choosing the implementation reads the device type and the
extension's build facts only, no CUDA call is made.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import nbretr
from nbretr.ops import _backend

CUDA = torch.device("cuda", 0)
OPS = ("ring_push", "sinkhorn_log", "wti_similarity", "topk_centrality")


def _cuda_ext() -> bool:
    return _backend.ext_supports(CUDA)[0]


def test_every_op_has_a_recorded_cuda_default_with_its_evidence():
    assert set(_backend.CUDA_AUTO_DEFAULTS) == set(OPS)
    for op, d in _backend.CUDA_AUTO_DEFAULTS.items():
        assert d.backend in ("ext", "torch"), op
        assert "H200" in d.evidence or "never run" in d.evidence or "not run" in d.evidence, op
    assert nbretr.build_info()["cuda_auto"] == {op: d.backend for op, d in _backend.CUDA_AUTO_DEFAULTS.items()}


def test_unverified_cuda_kernels_are_not_the_auto_default():
    # The tiled WTI driver and the top-k rounds scan have not passed the CUDA tests on a GPU.
    for op in ("wti_similarity", "topk_centrality"):
        assert _backend.CUDA_AUTO_DEFAULTS[op].backend == "torch"
        assert _backend.resolve(op, None, CUDA) == "torch"
        assert _backend.resolve(op, "auto", CUDA) == "torch"


@pytest.mark.parametrize("op", ["ring_push", "sinkhorn_log"])
def test_verified_cuda_kernels_stay_the_auto_default(op):
    expected = "ext" if _cuda_ext() else "torch"
    with warnings.catch_warnings():  # an extension built without CUDA says so once
        warnings.simplefilter("ignore", RuntimeWarning)
        assert _backend.resolve(op, None, CUDA) == expected


def test_ext_by_name_still_runs_an_unverified_kernel():
    if not _cuda_ext():
        with pytest.raises(RuntimeError, match="backend='ext' requested"):
            _backend.resolve("wti_similarity", "ext", CUDA)
    else:
        assert _backend.resolve("wti_similarity", "ext", CUDA) == "ext"


def test_cpu_choice_is_unchanged():
    cpu = torch.device("cpu")
    expected = "ext" if _backend.ext_supports(cpu)[0] else "torch"
    for op in OPS:
        assert _backend.resolve(op, None, cpu) == expected
