"""Generate the option table of docs/configuration.md from nbretr.config.

Every field of ``TrainConfig`` (its own and those of the model's ``NeighborRetrConfig``)
becomes one row: the command-line flag, the default as ``--help`` shows it, the allowed
values, and the comment written beside the field in the source. The table sits between
the ``options:begin`` / ``options:end`` markers of docs/configuration.md.

    python tools/config_docs.py            # print the table
    python tools/config_docs.py --write    # rewrite it in docs/configuration.md
    python tools/config_docs.py --check    # exit 1 when docs/configuration.md is stale

tests/test_configuration_doc.py checks that every field has its row.
"""
from __future__ import annotations

import argparse
import inspect
import re
import sys
from dataclasses import fields
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "configuration.md"
BEGIN, END = "<!-- options:begin (tools/config_docs.py --write) -->", "<!-- options:end -->"
_FIELD = re.compile(r"^\s{4}(\w+)\s*:[^=]*=[^#]*(?:#\s*(.*))?$")
_CONT = re.compile(r"^\s{8,}#\s*(.*)$")


def field_comments(cls: type) -> dict[str, str]:
    """The comment beside each field in ``cls``'s source (with its continuation lines)."""
    out: dict[str, str] = {}
    last = None
    for line in inspect.getsource(cls).splitlines():
        m = _FIELD.match(line)
        if m:
            last = m.group(1)
            out[last] = (m.group(2) or "").strip()
            continue
        c = _CONT.match(line)
        if c and last is not None and out.get(last):
            out[last] += " " + c.group(1).strip()
            continue
        last = None
    return out


def rows() -> list[tuple[str, str, str, str]]:
    """``(flag, default, values, description)`` per option, in the order of ``--help``."""
    from nbretr import config as C
    from nbretr.models.neighborretr import NeighborRetrConfig

    parser = C.build_parser("")
    helps = {a.dest: a.help for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS}
    notes = {**field_comments(NeighborRetrConfig), **field_comments(C.TrainConfig)}
    out = []
    for f in fields(C.TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name in C.DERIVED:
            default, flag = "set by the run", f"{flag} (not an option)"
        else:
            default = re.sub(r"^\(default (.*)\)$", r"\1", helps.get(f.name, "")).split("; one of ")[0]
        values = ", ".join(C.CHOICES.get(f.name, ()))
        note = notes.get(f.name, "")
        if f.name in ("recipe", "preset"):
            default = "by the dataset (Presets below)"
        elif f.name in C.RECIPE_FIELDS and "recipe" not in note:
            note = (note + "; " if note else "") + "set by the recipe unless given"
        out.append((flag, default, values, note))
    return out


def table() -> str:
    def cell(s: str) -> str:
        return s.replace("|", "\\|")

    lines = ["| option | default | values | what it does |", "|---|---|---|---|"]
    lines += [f"| `{flag}` | {cell(default)} | {cell(values)} | {cell(note)} |"
              for flag, default, values, note in rows()]
    return "\n".join(lines)


def presets_table() -> str:
    """What each recipe, preset and dataset sets (nbretr.config.RECIPES, EMBEDDED_PIPELINE,
    EMBEDDED_DEFAULTS, DATASET_VALUES, REFERENCE_DATASET_VALUES, REFERENCE_PROCESSES)."""
    from nbretr import config as C

    def opts(values: dict) -> str:
        return ", ".join(f"`--{k.replace('_', '-')} {v}`" for k, v in values.items())

    lines = ["| applied when | sets |", "|---|---|"]
    for name, values in C.RECIPES.items():
        lines.append(f"| recipe `{name}` | {opts(values)} |")
    for ds, values in C.DATASET_VALUES.items():
        lines.append(f"| dataset `{ds}` (any recipe) | {opts(values)} |")
    for ds, values in C.REFERENCE_DATASET_VALUES.items():
        lines.append(f"| dataset `{ds}`, recipe `reference` | {opts(values)} |")
    for ds, n in C.REFERENCE_PROCESSES.items():
        lines.append(f"| dataset `{ds}`, recipe `reference` | `--grad-world-size {n}` |")
    lines.append(f"| preset `embedded` | {opts({**C.EMBEDDED_PIPELINE, **C.EMBEDDED_DEFAULTS})} |")
    return "\n".join(lines)


PRESETS_BEGIN, PRESETS_END = "<!-- presets:begin (tools/config_docs.py --write) -->", "<!-- presets:end -->"


def rewritten(text: str) -> str:
    """``text`` (docs/configuration.md) with the tables between the markers regenerated."""
    for begin, end, body in ((BEGIN, END, table()), (PRESETS_BEGIN, PRESETS_END, presets_table())):
        i, j = text.index(begin) + len(begin), text.index(end)
        text = text[:i] + "\n" + body + "\n" + text[j:]
    return text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--write", action="store_true", help="rewrite the table in docs/configuration.md")
    g.add_argument("--check", action="store_true", help="exit 1 when docs/configuration.md is stale")
    args = p.parse_args()
    if not (args.write or args.check):
        print(table())
        return 0
    text = DOC.read_text()
    new = rewritten(text)
    if args.check:
        if new != text:
            print(f"{DOC} is stale: run python tools/config_docs.py --write", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
