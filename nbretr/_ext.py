"""Loading the compiled extension ``nbretr._C`` and reporting how it was built.

The extension is optional: without it (or with one built against another torch) every
operator runs on its pure-PyTorch path. The build facts are read from
``_build_info.json`` *before* the shared library is loaded, so a mismatched build is
refused without risking an undefined-symbol crash.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("nbretr")

BUILD_HINT = (
    "build it against the installed torch with "
    "`pip install --no-build-isolation .` (needs scikit-build-core, pybind11, cmake, ninja; "
    "see README.md)"
)

_state: dict[str, Any] = {"loaded": False, "module": None, "reason": "not attempted", "info": {}}


def _same_torch(built: str, running: str) -> bool:
    # 2.14.1+cu130 vs 2.14.1: the local tag names the CUDA flavour, which must match too.
    return built == running


def _load() -> None:
    info_path = Path(__file__).with_name("_build_info.json")
    if os.environ.get("NBRETR_DISABLE_EXT", "") not in ("", "0"):
        _state["reason"] = "disabled by NBRETR_DISABLE_EXT"
        return
    if not info_path.exists():
        _state["reason"] = f"no compiled extension next to {Path(__file__).parent} ({info_path.name} missing)"
        return
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError) as err:
        _state["reason"] = f"unreadable {info_path}: {err}"
        return
    _state["info"] = info
    if not _same_torch(info.get("torch_version", "?"), torch.__version__):
        _state["reason"] = (
            f"built against torch {info.get('torch_version')} but torch {torch.__version__} is running"
        )
        return
    try:
        module = importlib.import_module("nbretr._C")
    except ImportError as err:
        _state["reason"] = f"import of nbretr._C failed: {err}"
        return
    _state.update(loaded=True, module=module, reason="")


_load()
if not _state["loaded"]:
    warnings.warn(
        f"nbretr: C++/CUDA extension not loaded ({_state['reason']}); every operator runs on the "
        f"pure-PyTorch path. To get the kernels, {BUILD_HINT}.",
        RuntimeWarning,
        stacklevel=2,
    )


def ext_loaded() -> bool:
    return bool(_state["loaded"])


def ext_has_cuda() -> bool:
    return bool(_state["loaded"] and _state["module"].cuda_compiled)


def ext_unavailable_reason() -> str:
    return str(_state["reason"])


def build_info() -> dict[str, Any]:
    """What nbretr runs on: extension loaded (or why not), CUDA kernels, archs, versions."""
    from nbretr.ops._backend import CUDA_AUTO_DEFAULTS
    info = _state["info"]
    mod = _state["module"]
    archs = [a for a in (mod.cuda_archs.split(",") if mod else info.get("cuda_archs", [])) if a]
    return {
        "extension_loaded": ext_loaded(),
        "reason": _state["reason"] or None,
        "cuda_compiled": ext_has_cuda() if mod else bool(info.get("cuda_compiled", False)),
        "cuda_archs": archs,
        "built_torch_version": mod.torch_version if mod else info.get("torch_version"),
        "built_cuda_version": (mod.cuda_version if mod else info.get("cuda_version")) or None,
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "backend_default": os.environ.get("NBRETR_BACKEND", "auto"),
        "cuda_auto": {op: d.backend for op, d in CUDA_AUTO_DEFAULTS.items()},
    }
