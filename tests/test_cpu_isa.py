"""The CPU kernels' narrower builds (csrc/common/cpu_isa.h): the widest of AVX-512,
AVX2+FMA+F16C and baseline x86-64 that the CPU runs is detected once per process, and the
``cpu_isa`` kernel setting (``nbretr.ops.kernel_settings(cpu_isa=...)``) caps it. The op
tests run again in a subprocess under each cap (pytest's ``--cpu-isa`` option, tests/conftest.py),
so every build is tested on a machine that has them all."""
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

import nbretr
from nbretr import _ext, ops
from helpers import require_ext

TESTS = Path(__file__).parent
OP_TESTS = ["test_wti.py", "test_sinkhorn.py", "test_topk.py"]


def _level(isa):
    with ops.kernel_settings(cpu_isa=isa):
        return _ext.ext_module().cpu_isa_level()


def test_cap_lowers_the_level():
    require_ext("cpu")
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86-64 only")
    hw = _level("auto")
    assert hw == _ext.ext_module().cpu_isa_hw_level()
    assert _level("base") == 0
    assert _level("avx2") == min(hw, 1)
    assert _level("avx512") == hw
    assert _ext.ext_module().cpu_isa_level() == hw  # restored after each block


def test_bad_cap_names_the_setting():
    with pytest.raises(ValueError, match="cpu_isa must be 'auto', 'avx512', 'avx2' or 'base', got 'sse4'"):
        ops.set_kernel_settings(cpu_isa="sse4")
    assert ops.get_kernel_settings().cpu_isa == "auto"


@pytest.mark.slow
@pytest.mark.parametrize("isa", ["avx2", "base"])
def test_op_tests_pass_under_cap(isa):
    require_ext("cpu")
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86-64 only")
    env = dict(os.environ, NBRETR_REQUIRE_EXT="1")
    # the same nbretr as this process, whatever the working directory
    env["PYTHONPATH"] = os.pathsep.join([str(Path(nbretr.__file__).parent.parent), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-p", "no:cacheprovider", f"--cpu-isa={isa}",
                        "-m", "not needs_cuda", *(str(TESTS / f) for f in OP_TESTS)],  # the cap concerns the CPU kernels only
                       cwd=TESTS, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout.splitlines()[-1]
    assert f"cpu_isa={isa}" in r.stdout  # the cap was applied (conftest's report header)
