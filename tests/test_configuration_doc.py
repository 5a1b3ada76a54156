"""docs/configuration.md lists every option, kernel setting and environment variable, so
that it cannot drift from the code (tools/config_docs.py regenerates its tables)."""
import dataclasses
import importlib.util
import re
from pathlib import Path

from nbretr import config as C
from nbretr import ops

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "configuration.md"


def test_every_config_field_is_documented():
    text = DOC.read_text()
    missing = [f.name for f in dataclasses.fields(C.TrainConfig)
               if f"`--{f.name.replace('_', '-')}" not in text]
    assert not missing, f"options missing from docs/configuration.md (python tools/config_docs.py --write): {missing}"


def test_generated_tables_are_current():
    spec = importlib.util.spec_from_file_location("config_docs", ROOT / "tools" / "config_docs.py")
    config_docs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(config_docs)
    text = DOC.read_text()
    assert config_docs.rewritten(text) == text, "docs/configuration.md is stale: run python tools/config_docs.py --write"


def test_every_kernel_setting_is_documented():
    text = DOC.read_text()
    for f in dataclasses.fields(ops.KernelSettings):
        assert f"| `{f.name}` |" in text, f.name


def _sources():
    for folder, pattern in (("src", "*.py"), ("csrc", "*"), ("cmake", "*"), ("tools", "*"), ("bench", "*.py"),
                            ("bench", "*.sh"), ("tests", "*.py")):
        yield from (p for p in (ROOT / folder).rglob(pattern) if p.is_file())
    yield ROOT / "CMakeLists.txt"


def test_every_environment_variable_is_documented():
    """Every NBRETR_* variable the code reads (os.environ, getenv, CMake's $ENV{}) has a row
    in the table, and no C++/CUDA source reads the environment at all."""
    reads = re.compile(r"(?:environ(?:\.get)?\(?\[?|getenv\(|setenv\(|ENV\{|env |dict\(os\.environ, )"
                       r"[\"']?(NBRETR_[A-Z_]+)")
    shell = re.compile(r"\$\{?(NBRETR_[A-Z_]+)")  # $NBRETR_X, ${NBRETR_X:-...} in shell scripts
    named = set()
    for path in _sources():
        text = path.read_text(errors="replace")
        named |= set(reads.findall(text)) | (set(shell.findall(text)) if path.suffix == ".sh" else set())
        if path.suffix in (".h", ".cpp", ".cu", ".cuh"):
            assert "getenv" not in text, f"{path.relative_to(ROOT)} reads the environment"
    table = DOC.read_text().split("## Environment variables", 1)[1].split("\n## ", 1)[0]
    assert {"NBRETR_BACKEND", "NBRETR_DATA", "NBRETR_CUDA"} <= named  # the scan finds them
    missing = sorted(v for v in named if f"`{v}`" not in table)
    assert not missing, f"environment variables missing from docs/configuration.md: {missing}"
    for gone in ("NBRETR_WTI_CUDA", "NBRETR_TOPK_CUDA_ROUNDS", "NBRETR_WTI_CPU_COMPACT", "NBRETR_CPU_ISA"):
        assert gone not in named, gone
