"""The extension's kernel variants: one small, process-wide settings object.

Each field picks how an extension kernel computes (never what: every variant gives the
op's documented result); the torch path ignores them. They are set in code, never read
from the environment (docs/configuration.md)::

    from nbretr import ops
    with ops.kernel_settings(wti_cuda="fused"):      # a block
        s = ops.wti_similarity(..., backend="ext")
    ops.set_kernel_settings(cpu_isa="avx2")          # the rest of the process
    ops.get_kernel_settings()                        # KernelSettings(...)

The settings are process-wide, not per thread: the autograd engine runs CUDA backwards on
its own threads, which must see the forward's choice. The C++ side is
csrc/common/settings.h.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
from dataclasses import dataclass
from typing import Iterator

from nbretr import _ext

__all__ = ["KernelSettings", "get_kernel_settings", "set_kernel_settings", "kernel_settings"]

_ISA_LEVELS = {"avx512": 2, "avx2": 1, "base": 0}


@dataclass(frozen=True)
class KernelSettings:
    """The kernel variants of the extension (defaults: the measured or safer choice)."""

    #: wti_similarity on CUDA: "tiled" (cuBLAS tiles, any L and F) or "fused" (one tile
    #: kernel, L and F <= 128; bench/RESULTS.md has both measured)
    wti_cuda: str = "tiled"
    #: wti_similarity on the CPU: leave masked tokens out of the products where that is
    #: exact (False computes every token's, as for inputs without padding)
    wti_cpu_compact: bool = True
    #: topk_centrality on CUDA: a full list's scan round in units of P columns, 1..4096
    #: (1: the P-column rounds as first measured)
    topk_cuda_rounds: int = 16
    #: the widest x86 build the CPU kernels may use: "auto" (what the CPU has), or a cap:
    #: "avx512", "avx2" or "base", so that every path can be tested on one machine
    cpu_isa: str = "auto"

    def __post_init__(self) -> None:
        if self.wti_cuda not in ("tiled", "fused"):
            raise ValueError(f"nbretr.ops kernel setting wti_cuda must be 'tiled' or 'fused', got {self.wti_cuda!r}")
        if not isinstance(self.wti_cpu_compact, bool):
            raise ValueError("nbretr.ops kernel setting wti_cpu_compact must be True or False, "
                             f"got {self.wti_cpu_compact!r}")
        r = self.topk_cuda_rounds
        if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= 4096:
            raise ValueError(f"nbretr.ops kernel setting topk_cuda_rounds must be an integer in [1, 4096], got {r!r}")
        if self.cpu_isa != "auto" and self.cpu_isa not in _ISA_LEVELS:
            raise ValueError("nbretr.ops kernel setting cpu_isa must be 'auto', 'avx512', 'avx2' or 'base', "
                             f"got {self.cpu_isa!r}")


_current = KernelSettings()
_lock = threading.Lock()


def _apply(s: KernelSettings) -> None:
    """Make ``s`` the settings of this process and of the loaded extension (called with
    the lock held)."""
    global _current
    mod = _ext.ext_module()
    if mod is not None:
        mod._set_kernel_settings(wti_cuda_fused=s.wti_cuda == "fused", wti_cpu_compact=s.wti_cpu_compact,
                                 topk_cuda_rounds=s.topk_cuda_rounds, cpu_isa_cap=_ISA_LEVELS.get(s.cpu_isa, 2))
    _current = s


def get_kernel_settings() -> KernelSettings:
    """The kernel settings in force."""
    return _current


def set_kernel_settings(**changes) -> KernelSettings:
    """Change the named fields of :class:`KernelSettings` for the whole process; return the
    settings that were in force before (for a later ``set_kernel_settings(**asdict(old))``).
    An unknown field or a bad value is a ValueError (nothing is changed then)."""
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(KernelSettings)})
    if unknown:
        raise ValueError(f"unknown nbretr.ops kernel setting(s) {unknown}; "
                         f"known: {[f.name for f in dataclasses.fields(KernelSettings)]}")
    with _lock:
        old = _current
        _apply(dataclasses.replace(old, **changes))
    return old


@contextlib.contextmanager
def kernel_settings(**changes) -> Iterator[KernelSettings]:
    """Change the named settings inside the block (process-wide) and restore them after."""
    old = set_kernel_settings(**changes)
    try:
        yield _current
    finally:
        with _lock:
            _apply(old)
