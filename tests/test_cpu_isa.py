"""The CPU kernels' narrower builds (csrc/common/cpu_isa.h): the widest of AVX-512,
AVX2+FMA+F16C and baseline x86-64 that the CPU runs is picked once per process, and
NBRETR_CPU_ISA caps it. The op tests run again in a subprocess under each cap, so every
build is tested on a machine that has them all."""
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

import nbretr
from conftest import require_ext

TESTS = Path(__file__).parent
OP_TESTS = ["test_wti.py", "test_sinkhorn.py", "test_topk.py"]


def _run(args, isa):
    env = dict(os.environ, NBRETR_CPU_ISA=isa, NBRETR_REQUIRE_EXT="1")
    # the same nbretr as this process, whatever the working directory
    env["PYTHONPATH"] = os.pathsep.join([str(Path(nbretr.__file__).parent.parent), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, *args], cwd=TESTS, env=env, capture_output=True, text=True, timeout=900)


def _level(isa):
    r = _run(["-c", "import nbretr._C as c; print(c.cpu_isa_level())"], isa)
    assert r.returncode == 0, r.stderr
    return int(r.stdout)


def test_cap_lowers_the_level():
    require_ext("cpu")
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86-64 only")
    hw = _level("")
    assert _level("base") == 0
    assert _level("avx2") == min(hw, 1)
    assert _level("avx512") == hw


def test_bad_cap_names_the_variable():
    require_ext("cpu")
    r = _run(["-c", "import nbretr._C as c; c.cpu_isa_level()"], "sse4")
    assert r.returncode != 0 and "NBRETR_CPU_ISA must be avx512, avx2 or base, got 'sse4'" in r.stderr


@pytest.mark.parametrize("isa", ["avx2", "base"])
def test_op_tests_pass_under_cap(isa):
    require_ext("cpu")
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86-64 only")
    r = _run(["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not needs_cuda",
              *(str(TESTS / f) for f in OP_TESTS)], isa)  # the cap concerns the CPU kernels only
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout.splitlines()[-1]
