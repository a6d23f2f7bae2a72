"""From dataclass fields to command-line flags and the README's reference, for `hpcopt train`
(the config sections) and `hpcopt analyze` (AnalyzeOptions) alike.

A field is documented by the one-line docstring under it (as in torchtitan's configs); that line
is the flag's help and the README's "meaning" column, so the three never disagree.

    python -m hpcopt.flags        # print the README's reference tables
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect

METAVARS = {"int": "N", "float": "X", "bool": "BOOL", "dict": "JSON", "str": "STR"}


@functools.cache
def field_docs(cls) -> dict[str, str]:
    """The docstrings under a dataclass's fields."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    out = {}
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
            out[a.target.id] = b.value.value
    return out


def type_name(f: dataclasses.Field) -> str:
    return f.type if isinstance(f.type, str) else f.type.__name__


def default_of(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def described(cls):
    """(name, type name, default, doc) of every field of `cls`."""
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        yield f.name, type_name(f), default_of(f), docs.get(f.name, "")


def add_flags(group, cls, *, flag, dest, values: bool, special: dict | None = None) -> None:
    """One flag per field of `cls` on an argparse group. `flag(name)` and `dest(name)` name them.
    `values`: every flag takes a value as a string, checked later by the config (train's
    --section.key VALUE, left unset when not given); otherwise flags are typed from the field,
    booleans as --x/--no-x, with the field's default. `special` maps a field to argparse keyword
    arguments of its own (or None to leave it out)."""
    special = special or {}
    for name, kind, default, doc in described(cls):
        kw = dict(special.get(name, {}))
        if name in special and special[name] is None:
            continue
        if values:
            base = kind.removesuffix(" | None")
            kw.setdefault("metavar", METAVARS.get(base, "STR"))
            kw.setdefault("default", argparse.SUPPRESS)
        elif kind.startswith("bool"):
            kw.setdefault("action", argparse.BooleanOptionalAction)
            kw.setdefault("default", default)
        else:
            base = kind.removesuffix(" | None")
            if base in ("int", "float"):
                kw.setdefault("type", int if base == "int" else float)
            kw.setdefault("metavar", METAVARS.get(base, "STR"))
            kw.setdefault("default", default)
        shown = "" if default is None or default == () else f" (default: {default!r})"
        kw.setdefault("help", doc + shown)
        group.add_argument(flag(name), dest=dest(name), **kw)


def reference(sections: dict[str, type]) -> str:
    """The README's reference: one markdown table per section."""
    out = []
    for section, cls in sections.items():
        caption = f" — {cls.__doc__}" if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "(") else ""
        out += [f"**[{section}]**{caption}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        out += [f"| `{name}` | {kind.replace(' | None', ', optional')} | `{default!r}` | {doc} |"
                for name, kind, default, doc in described(cls)]
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    from hpcopt.config import SECTIONS

    print(reference(SECTIONS))
