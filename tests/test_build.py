"""The build and the backend switch (issue: foundation)."""
import importlib.metadata
import json
import shutil
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import nbretr
from nbretr import ops
from nbretr.ops import _backend

from helpers import require_ext


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


def test_cuda_kernels_follow_the_build_option():
    """The build records how NBRETR_CUDA chose (auto / 1 / 0) and keeps to it: 1 compiles the
    CUDA kernels (CI has nvcc but no GPU, and still compiles them), 0 does not, auto only
    where a GPU is visible (a CPU-only machine gets the fast CPU-only build)."""
    require_ext("cpu")
    info = nbretr.build_info()
    assert info["cuda_mode"] in ("auto", "1", "0"), info
    assert info["cuda_decision"], info
    if info["cuda_mode"] == "1":
        assert info["cuda_compiled"], info
        assert info["built_cuda_version"]
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            assert {"8.0", "9.0"} <= set(info["cuda_archs"])
    elif info["cuda_mode"] == "0":
        assert not info["cuda_compiled"] and info["cuda_archs"] == [], info
    elif not torch.cuda.is_available() or torch.version.cuda is None:
        assert not info["cuda_compiled"], info
    elif shutil.which("nvcc"):
        assert info["cuda_compiled"], info


REPO = Path(__file__).resolve().parents[1]
# An editable install's import hook comes before sys.path; a test that means to import a
# copy of the sources first removes it.
HIDE_EDITABLE = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path "
                 "if not type(f).__name__.startswith('ScikitBuild')]\n")


def _installed_nbretr() -> Path | None:
    """The folder of the installed build (its _build_info.json), None when nbretr is not installed."""
    try:
        dist = importlib.metadata.distribution("nbretr")
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if f.name == "_build_info.json" and f.parent.name == "nbretr" and Path(dist.locate_file(f)).is_file():
            return Path(dist.locate_file(f)).resolve().parent
    return None


def _require_installed() -> Path:
    where = _installed_nbretr()
    if where is not None:
        return where
    if os.environ.get("NBRETR_REQUIRE_EXT", "0") == "1":
        pytest.fail("NBRETR_REQUIRE_EXT=1 but nbretr is not installed (pip install --no-build-isolation .)")
    pytest.skip("nbretr is not installed with its extension (pip install --no-build-isolation .)")


def _run_py(code: str, cwd=None, **env) -> subprocess.CompletedProcess:
    e = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, env=e,
                          cwd=cwd)


@pytest.mark.slow
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
    assert lines[1].startswith("ERR") and "backend='ext'" in lines[1] and "Unset NBRETR_DISABLE_EXT" in lines[1]


@pytest.mark.slow
def test_mismatched_build_is_refused(tmp_path):
    """An extension built against another torch is not loaded (and says why)."""
    pkg = tmp_path / "nbretr"
    src = os.path.dirname(nbretr.__file__)
    subprocess.run(["cp", "-r", src, str(tmp_path)], check=True)
    (pkg / "_build_info.json").write_text(json.dumps({"torch_version": "0.0.1", "cuda_compiled": False,
                                                      "cuda_archs": []}))
    r = _run_py(HIDE_EDITABLE + "import nbretr; i=nbretr.build_info(); print(i['extension_loaded'], i['reason'])",
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


@pytest.mark.slow
def test_import_from_the_repository_root_uses_the_installed_extension():
    """What the README's first command does: install, then `python -m nbretr.train` from the
    repository root. The root must not hold a source copy of the package that hides the
    installed build (its `_C`), for a plain and for an editable install alike."""
    _require_installed()
    if not (REPO / "pyproject.toml").is_file():
        pytest.skip("not run from a source checkout")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NBRETR_DISABLE_EXT")}
    code = "import nbretr; i = nbretr.build_info(); print(i['extension_loaded']); print(i['reason'])"
    outputs = []
    for args in (["-c", code], ["-m", "nbretr.train", "--help"]):
        r = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr
        assert "extension not loaded" not in r.stderr, r.stderr
        outputs.append(r.stdout)
    assert outputs[0].splitlines()[0] == "True", outputs[0]


@pytest.mark.slow
def test_a_source_copy_shadowing_the_install_says_so(tmp_path):
    """A folder of bare sources found before the installed build (the working directory, or
    PYTHONPATH): the warning names both places instead of advising an install that is done."""
    installed = _require_installed()
    pkg_src = Path(nbretr.__file__).resolve().parent
    shutil.copytree(pkg_src, tmp_path / "nbretr",
                    ignore=shutil.ignore_patterns("_C*", "_build_info.json", "__pycache__"))
    r = _run_py(HIDE_EDITABLE + "import nbretr; i = nbretr.build_info(); print(i['extension_loaded'], nbretr.__file__)",
                cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("False " + str(tmp_path)), r.stdout
    assert "extension not loaded" in r.stderr
    assert "shadows the installed build in " + str(installed) in r.stderr, r.stderr
    assert "run from a folder that does not contain nbretr/" in r.stderr, r.stderr


def _cmake() -> list[str]:
    cmake = shutil.which("cmake", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if cmake is None or not (REPO / "CMakeLists.txt").is_file():
        pytest.skip("no cmake or no CMakeLists.txt (not a source checkout)")
    ninja = shutil.which("ninja", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    return [cmake, "-S", str(REPO), "-DPython_EXECUTABLE=" + sys.executable] + (
        ["-G", "Ninja", "-DCMAKE_MAKE_PROGRAM=" + ninja] if ninja else [])


@pytest.mark.slow
def test_cmake_cuda_option_configure_only(tmp_path):
    """The NBRETR_CUDA choice at configure time (no compilation), in one reused build folder as
    `pip install` reuses build/: 0 and the older NBRETR_CPU_ONLY=1 give a CPU-only build; the
    variable does not stick in the cache (the next configure without it is auto again); auto
    with no visible GPU is CPU-only; 1 where no nvcc can be used fails, naming the way out; a
    bad value fails."""
    base = _cmake() + ["-B", str(tmp_path / "b")]
    clean = {k: v for k, v in os.environ.items() if k not in ("NBRETR_CUDA", "NBRETR_CPU_ONLY", "CUDACXX")}

    def configure(**env):
        r = subprocess.run(base, env={**clean, **env}, capture_output=True, text=True, timeout=600)
        info = None
        if r.returncode == 0:
            info = json.loads((tmp_path / "b" / "_build_info.json").read_text())
        return r, info

    r, info = configure(NBRETR_CUDA="0")
    assert r.returncode == 0, r.stdout + r.stderr
    assert info["cuda_mode"] == "0" and info["cuda_compiled"] is False, info
    assert "NBRETR_CUDA=0" in info["cuda_decision"]

    r, info = configure(CUDA_VISIBLE_DEVICES="")
    assert r.returncode == 0, r.stdout + r.stderr
    assert info["cuda_mode"] == "auto" and info["cuda_compiled"] is False, info
    if torch.version.cuda is not None and shutil.which("nvcc"):
        assert "no visible GPU" in info["cuda_decision"], info

    r, info = configure(NBRETR_CPU_ONLY="1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert info["cuda_mode"] == "0" and info["cuda_compiled"] is False, info

    r, _ = configure(NBRETR_CUDA="1", CUDACXX=str(tmp_path / "no-such-nvcc"))
    assert r.returncode != 0
    err = " ".join((r.stdout + r.stderr).split())
    assert "requires the CUDA kernels" in err and "NBRETR_CUDA=0" in err, err

    r, _ = configure(NBRETR_CUDA="maybe")
    assert r.returncode != 0
    assert "expected auto, 1 or 0" in r.stdout + r.stderr
