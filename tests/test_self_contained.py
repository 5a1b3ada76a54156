"""The repository is self-contained: no tracked file points at notes that live outside it,
and every relative Markdown link in README.md and docs/*.md (``](docs/...)``,
``](../...)``, ``](operators.md#...)``) reaches a file that exists.

Needs a git checkout (the tracked-file list comes from ``git ls-files``); skipped otherwise.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Built from pieces so that this file does not match itself.
FORBIDDEN = ["METHOD" + ".md", "KERNELS" + ".md", "BUILD" + ".md", "STYLE" + ".md", ".." + "/shared"]

# ](target "optional title"): every Markdown link or image target
_LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_EXTERNAL = re.compile(r"^(?:[a-zA-Z][a-zA-Z0-9+.-]*:|#|/)")  # a scheme, an anchor, an absolute path


def _relative_links(line: str) -> list[str]:
    """The relative link targets of a Markdown line (docs/..., ../..., operators.md#x)."""
    return [t for t in _LINK.findall(line) if not _EXTERNAL.match(t)]


def _tracked_files() -> list[Path]:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    except subprocess.CalledProcessError:
        pytest.skip("not a git checkout")
    files = [ROOT / p for p in out.stdout.decode("utf-8", "surrogateescape").split("\0") if p]
    if not files:
        pytest.skip("git lists no tracked files")
    return [f for f in files if f.is_file()]


def _text(path: Path) -> str | None:
    """The file's text, or None for a binary file (a NUL byte in its first 8 KiB)."""
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None
    return data.decode("utf-8", "replace")


def test_no_reference_to_outside_notes():
    hits = []
    for path in _tracked_files():
        text = _text(path)
        if text is None:
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            for needle in FORBIDDEN:
                if needle in line:
                    hits.append(f"{path.relative_to(ROOT)}:{lineno}: {needle}: {line.strip()[:120]}")
    assert not hits, ("tracked files point at notes outside the repository; write what is "
                      "needed into docs/ and point there:\n" + "\n".join(hits))


def _markdown_files() -> list[Path]:
    tracked = set(_tracked_files())
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return [f for f in files if f in tracked]


def test_markdown_links_resolve():
    files = _markdown_files()
    assert ROOT / "README.md" in files
    broken = []
    for md in files:
        for lineno, line in enumerate(md.read_text(encoding="utf-8").splitlines(), 1):
            for target in _relative_links(line):
                rel = target.split("#", 1)[0].split("?", 1)[0]
                if not rel:
                    continue
                dest = (md.parent / rel).resolve()
                if not dest.exists():
                    broken.append(f"{md.relative_to(ROOT)}:{lineno}: ]({target}) -> {rel} does not exist")
    assert not broken, "broken relative links:\n" + "\n".join(broken)


def test_link_pattern_finds_relative_links():
    """The link pattern itself: relative targets found, URLs and anchors left alone."""
    line = ("see [a](docs/method.md#losses), [b](../README.md), [c](https://x.org/docs/y), "
            "[d](#local), [e](./docs/operators.md \"title\"), [f](operators.md#ring_push), "
            "[g](mailto:a@b.c)")
    assert _relative_links(line) == ["docs/method.md#losses", "../README.md", "./docs/operators.md",
                                     "operators.md#ring_push"]
