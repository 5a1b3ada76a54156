"""Loading the compiled extension ``nbretr._C`` and reporting how it was built.

The extension is optional: without it (or with one built against another torch) every
operator runs on its pure-PyTorch path. The build facts are read from
``_build_info.json`` *before* the shared library is loaded, so a mismatched build is
refused without risking an undefined-symbol crash.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("nbretr")

BUILD_HINT = (
    "build it against the installed torch with "
    "`pip install --no-build-isolation .` from the repository root (needs scikit-build-core, "
    "pybind11, cmake, ninja; see docs/building.md)"
)

_state: dict[str, Any] = {"loaded": False, "module": None, "reason": "not attempted", "info": {},
                          "advice": BUILD_HINT}


def _same_torch(built: str, running: str) -> bool:
    # 2.14.1+cu130 vs 2.14.1: the local tag names the CUDA flavour, which must match too.
    return built == running


def _package_dirs() -> list[Path]:
    """The folders of the package ``nbretr``: one for a plain install or a source tree; the
    source folder and the install folder for an editable install (scikit-build-core's
    redirect mode puts both in ``nbretr.__path__``)."""
    pkg = sys.modules.get(__package__ or "nbretr")
    paths = list(getattr(pkg, "__path__", None) or [])
    return [Path(p) for p in paths] or [Path(__file__).parent]


def _installed_build() -> Path | None:
    """The ``_build_info.json`` of the installed distribution ``nbretr``, if there is one
    (whether or not it is the copy being imported)."""
    try:
        dist = importlib.metadata.distribution("nbretr")
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if f.name == "_build_info.json" and f.parent.name == "nbretr":
            path = Path(dist.locate_file(f)).resolve()
            if path.is_file():
                return path
    return None


def _source_root(pkg_dir: Path) -> Path | None:
    """The repository root when ``pkg_dir`` is this project's source folder."""
    for root in (pkg_dir.parent.parent, pkg_dir.parent):  # src/nbretr, or a flat nbretr/
        if (root / "pyproject.toml").is_file() and (root / "CMakeLists.txt").is_file():
            return root
    return None


def _missing_build_advice(pkg_dirs: list[Path]) -> tuple[str, str]:
    """(reason, advice) when no ``_build_info.json`` is next to the imported package."""
    here = pkg_dirs[0].resolve()
    reason = f"no compiled extension in {here} (_build_info.json missing)"
    installed = _installed_build()
    if installed is not None and installed.parent not in {d.resolve() for d in pkg_dirs}:
        reason = (f"the package was imported from {here}, which has no compiled module, and it "
                  f"shadows the installed build in {installed.parent}")
        return reason, (
            f"To use the installed kernels, run from a folder that does not contain "
            f"{here.name}/ (or drop {here.parent} from PYTHONPATH); to use this tree, "
            f"install it with `pip install --no-build-isolation .` (or `-e .`)")
    root = _source_root(here)
    if root is not None:
        return reason, (
            f"This is the source tree of {root}: install it with `pip install --no-build-isolation .` "
            f"(or `-e .`) from there, or build in place with tools/dev_build.sh and PYTHONPATH=src")
    return reason, f"To get the kernels, {BUILD_HINT}"


def _load() -> None:
    if os.environ.get("NBRETR_DISABLE_EXT", "") not in ("", "0"):
        _state["reason"] = "disabled by NBRETR_DISABLE_EXT"
        _state["advice"] = "Unset NBRETR_DISABLE_EXT to use the kernels"
        return
    pkg_dirs = _package_dirs()
    info_path = next((d / "_build_info.json" for d in pkg_dirs if (d / "_build_info.json").is_file()), None)
    if info_path is None:
        _state["reason"], _state["advice"] = _missing_build_advice(pkg_dirs)
        return
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError) as err:
        _state["reason"] = f"unreadable {info_path}: {err}"
        _state["advice"] = f"To rebuild it, {BUILD_HINT}"
        return
    _state["info"] = info
    if not _same_torch(info.get("torch_version", "?"), torch.__version__):
        _state["reason"] = (
            f"built against torch {info.get('torch_version')} but torch {torch.__version__} is running"
        )
        _state["advice"] = f"To rebuild it, {BUILD_HINT}"
        return
    try:
        module = importlib.import_module("nbretr._C")
    except ImportError as err:
        _state["reason"] = f"import of nbretr._C failed: {err}"
        _state["advice"] = f"To rebuild it, {BUILD_HINT}"
        return
    _state.update(loaded=True, module=module, reason="", advice="")


_load()
if not _state["loaded"]:
    warnings.warn(
        f"nbretr: C++/CUDA extension not loaded ({_state['reason']}); every operator runs on the "
        f"pure-PyTorch path. {_state['advice']}.",
        RuntimeWarning,
        stacklevel=2,
    )


def ext_loaded() -> bool:
    return bool(_state["loaded"])


def ext_has_cuda() -> bool:
    return bool(_state["loaded"] and _state["module"].cuda_compiled)


def ext_unavailable_reason() -> str:
    return str(_state["reason"])


def ext_advice() -> str:
    """What to do to get the kernels, for the situation found at import ("" when loaded)."""
    return str(_state["advice"])


def build_record() -> dict[str, Any]:
    """The build's own record (``_build_info.json``), {} when none was found."""
    return dict(_state["info"])


def build_info() -> dict[str, Any]:
    """What nbretr runs on: extension loaded (or why not), CUDA kernels, archs, versions."""
    from nbretr.ops.cuda_defaults import CUDA_AUTO_DEFAULTS
    info = _state["info"]
    mod = _state["module"]
    archs = [a for a in (mod.cuda_archs.split(",") if mod else info.get("cuda_archs", [])) if a]
    return {
        "extension_loaded": ext_loaded(),
        "reason": _state["reason"] or None,
        "cuda_compiled": ext_has_cuda() if mod else bool(info.get("cuda_compiled", False)),
        # how the build chose (NBRETR_CUDA=auto|1|0) and why: from _build_info.json
        "cuda_mode": info.get("cuda_mode"),
        "cuda_decision": info.get("cuda_decision"),
        "cuda_archs": archs,
        "built_torch_version": mod.torch_version if mod else info.get("torch_version"),
        "built_cuda_version": (mod.cuda_version if mod else info.get("cuda_version")) or None,
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "backend_default": os.environ.get("NBRETR_BACKEND", "auto"),
        "cuda_auto": {op: d.backend for op, d in CUDA_AUTO_DEFAULTS.items()},
    }
