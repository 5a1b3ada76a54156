"""The build and the backend switch (issue: foundation)."""
import json
import shutil
import os
import subprocess
import sys
import warnings

import pytest
import torch

import nbretr
from nbretr import ops
from nbretr.ops import _backend

from conftest import require_ext


def test_build_info_keys():
    info = nbretr.build_info()
    for key in ("extension_loaded", "reason", "cuda_compiled", "cuda_archs", "built_torch_version",
                "built_cuda_version", "torch_version"):
        assert key in info
    assert info["torch_version"] == torch.__version__
    if info["extension_loaded"]:
        assert info["reason"] is None
        assert info["built_torch_version"] == torch.__version__
    else:
        assert info["reason"]


def test_cuda_kernels_compiled_where_nvcc_and_cuda_torch():
    """Where nvcc and a CUDA build of torch are present (this machine, CI), the default build
    compiles the CUDA kernels for at least 8.0 and 9.0."""
    if shutil.which("nvcc") is None or torch.version.cuda is None:
        pytest.skip("no nvcc on PATH or a CPU build of torch: CUDA kernels are not expected")
    if os.environ.get("NBRETR_CPU_ONLY", "0") == "1" or os.environ.get("TORCH_CUDA_ARCH_LIST"):
        pytest.skip("CPU-only build or a custom TORCH_CUDA_ARCH_LIST was requested")
    info = nbretr.build_info()
    assert info["extension_loaded"], info["reason"]
    assert info["cuda_compiled"]
    assert {"8.0", "9.0"} <= set(info["cuda_archs"])
    assert info["built_cuda_version"]


def _run_py(code: str, cwd=None, **env) -> subprocess.CompletedProcess:
    e = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, env=e,
                          cwd=cwd)


def test_disabled_extension_warns_once_and_runs_torch_path():
    code = (
        "import torch, nbretr, warnings\n"
        "b=[torch.zeros(4,2)]\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    h,f = nbretr.ops.ring_push(b,[torch.ones(3,2)],0,0)\n"
        "    h,f = nbretr.ops.ring_push(b,[torch.ones(3,2)],h,f)\n"
        "print(len(w), h, f, nbretr.build_info()['extension_loaded'])\n"
        "try:\n"
        "    nbretr.ops.ring_push(b,[torch.ones(1,2)],h,f,backend='ext')\n"
        "except RuntimeError as e:\n"
        "    print('ERR', e)\n"
    )
    r = _run_py(code, NBRETR_DISABLE_EXT="1")
    assert r.returncode == 0, r.stderr
    # one warning at import (stderr), none per call
    assert r.stderr.count("extension not loaded") == 1, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0] == "0 2 4 False"
    assert lines[1].startswith("ERR") and "backend='ext'" in lines[1] and "pip install --no-build-isolation" in lines[1]


def test_mismatched_build_is_refused(tmp_path):
    """An extension built against another torch is not loaded (and says why)."""
    pkg = tmp_path / "nbretr"
    src = os.path.dirname(nbretr.__file__)
    subprocess.run(["cp", "-r", src, str(tmp_path)], check=True)
    (pkg / "_build_info.json").write_text(json.dumps({"torch_version": "0.0.1", "cuda_compiled": False,
                                                      "cuda_archs": []}))
    r = _run_py("import nbretr; i=nbretr.build_info(); print(i['extension_loaded'], i['reason'])",
                cwd=str(tmp_path), PYTHONPATH=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("False built against torch 0.0.1"), r.stdout
    assert "extension not loaded" in r.stderr


def test_backend_switch_precedence(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("NBRETR_BACKEND", "torch")
    assert _backend.resolve("ring_push", None, cpu) == "torch"
    with ops.use_backend("auto"):
        expected = "ext" if nbretr.build_info()["extension_loaded"] else "torch"
        assert _backend.resolve("ring_push", None, cpu) == expected
        with ops.use_backend("torch"):
            assert _backend.resolve("ring_push", None, cpu) == "torch"
        assert _backend.resolve("ring_push", "torch", cpu) == "torch"
    monkeypatch.setenv("NBRETR_BACKEND", "gpu")
    with pytest.raises(ValueError, match="NBRETR_BACKEND must be one of"):
        _backend.resolve("ring_push", None, cpu)
    with pytest.raises(ValueError, match="backend must be one of"):
        _backend.resolve("ring_push", "fast", cpu)


def test_ext_on_cpu_when_built():
    require_ext("cpu")
    assert _backend.resolve("ring_push", "ext", torch.device("cpu")) == "ext"
    assert hasattr(torch.ops.nbretr, "ring_push")
