"""Which implementation an operator runs: the extension ("ext") or pure PyTorch ("torch").

Chosen per call (``backend=`` on every function in :mod:`nbretr.ops`), per block
(``with nbretr.ops.use_backend("torch"): ...``) and per process (``NBRETR_BACKEND``).
``"auto"`` (the default) takes the extension when it is built for the tensors' device,
else the torch path (a missing extension is reported once, at import; a loaded one that
lacks the device once per (op, device)). On a CUDA device ``"auto"`` takes the extension
only for the ops in :data:`CUDA_AUTO_DEFAULTS` whose CUDA kernels have passed the CUDA
tests on a GPU and were measured faster than the torch path; the others run their torch
path there unless ``backend="ext"`` asks for the kernel by name.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from typing import Iterator, Literal

import torch

from nbretr import _ext
from nbretr.ops.cuda_defaults import CUDA_AUTO_DEFAULTS, CudaDefault, cuda_auto_defaults  # noqa: F401

Backend = Literal["auto", "ext", "torch"]
_VALID = ("auto", "ext", "torch")
_local = threading.local()
_warned: set[tuple[str, str]] = set()
log = logging.getLogger("nbretr")


def _check(name: str, value: str) -> str:
    if value not in _VALID:
        raise ValueError(f"{name} must be one of {_VALID}, got {value!r}")
    return value


def default_backend() -> str:
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    return _check("NBRETR_BACKEND", os.environ.get("NBRETR_BACKEND", "auto") or "auto")


@contextlib.contextmanager
def use_backend(backend: Backend) -> Iterator[None]:
    """Run every nbretr op inside the block on ``backend`` unless a call names its own."""
    _check("backend", backend)
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(backend)
    try:
        yield
    finally:
        stack.pop()


def ext_supports(device: torch.device) -> tuple[bool, str]:
    if not _ext.ext_loaded():
        return False, f"the extension is not loaded ({_ext.ext_unavailable_reason()})"
    if device.type == "cpu":
        return True, ""
    if device.type == "cuda":
        if _ext.ext_has_cuda():
            return True, ""
        decision = _ext.build_record().get("cuda_decision")
        return False, ("the extension was built without CUDA kernels"
                       + (f" ({decision})" if decision else "")
                       + "; rebuild with `NBRETR_CUDA=1 pip install --no-build-isolation .`")
    return False, f"the extension has no kernels for device type {device.type!r}"


def resolve(op: str, backend: Backend | None, device: torch.device) -> str:
    """Return "ext" or "torch" for running ``op`` on ``device``."""
    choice = _check("backend", backend) if backend is not None else default_backend()
    if choice == "torch":
        return "torch"
    if choice == "auto" and device.type == "cuda":
        default = CUDA_AUTO_DEFAULTS.get(op)
        if default is None or default.backend == "torch":
            return "torch"
    ok, why = ext_supports(device)
    if ok:
        return "ext"
    if choice == "ext":
        raise RuntimeError(
            f"nbretr.ops.{op}: backend='ext' requested but {why}. "
            + (f"{_ext.ext_advice()}; or use" if not _ext.ext_loaded() else "Or use")
            + " backend='torch'."
        )
    key = (op, device.type)
    # A missing extension was already reported once at import; warn here only about
    # a loaded extension that lacks this device.
    if _ext.ext_loaded() and key not in _warned:
        _warned.add(key)
        warnings.warn(f"nbretr.ops.{op}: {why}; using the pure-PyTorch path on {device.type}",
                      RuntimeWarning, stacklevel=3)
    return "torch"
