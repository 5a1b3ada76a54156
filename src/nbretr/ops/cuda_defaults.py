"""Which implementation ``backend="auto"`` runs for each operator on a CUDA device.

A leaf module (it imports nothing of nbretr) so that both :mod:`nbretr.ops._backend` and
:func:`nbretr.build_info` read the same table.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CudaDefault:
    """What ``backend="auto"`` runs for one op on a CUDA device, and the GPU evidence."""
    backend: str          # "ext" or "torch"
    evidence: str


# The one place that decides which implementation ``backend="auto"`` runs on CUDA. A CUDA
# kernel becomes the default only after it has passed the CUDA tests on a GPU and was
# measured faster than the torch path at the training shapes (bench/RESULTS.md holds the
# runs); docs/operators.md carries the same table.
CUDA_AUTO_DEFAULTS: dict[str, CudaDefault] = {
    "ring_push": CudaDefault(
        "ext", "H200, 2026-11-27, kernel as at 8bd8756: CUDA tests pass; 1.6-2.2x the torch path "
               "(bank 1,280-1,920, batch 128)"),
    "sinkhorn_log": CudaDefault(
        "ext", "H200, 2026-11-27, kernel as at 8bd8756: CUDA tests pass; 11.5-12.3x the torch loop "
               "(2 x 128^2, 50 iterations)"),
    "wti_similarity": CudaDefault(
        "torch", "the tiled CUDA driver has never run on a GPU; the fused kernel it replaced measured "
                 "0.04-0.22x the torch path (H200, 2026-11-27)"),
    "topk_centrality": CudaDefault(
        "torch", "the CUDA rounds scan and the linearity sums changed after the H200 run of "
                 "2026-11-27 and have not run on a GPU since"),
}


def cuda_auto_defaults() -> dict[str, dict[str, str]]:
    """:data:`CUDA_AUTO_DEFAULTS` as plain data (for build_info and run records)."""
    return {op: {"backend": d.backend, "evidence": d.evidence} for op, d in CUDA_AUTO_DEFAULTS.items()}
