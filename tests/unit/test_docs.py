"""The docs stay true: every config field is in the README's reference and in --help."""

import subprocess
import sys
from pathlib import Path

from hpcopt.config import fields_for_cli

ROOT = Path(__file__).resolve().parents[2]


def test_readme_documents_every_config_field():
    readme = (ROOT / "README.md").read_text()
    sections = {}
    for section, name, kind, default, doc in fields_for_cli():
        sections.setdefault(section, []).append(name)
        assert f"| `{name}` | {kind} | `{default!r}` | {doc} |" in readme, f"{section}.{name} not documented as it is"
    for section in sections:
        assert f"**[{section}]**" in readme


def test_help_lists_every_flag():
    out = subprocess.run([sys.executable, "-m", "hpcopt", "train", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for section, name, *_ in fields_for_cli():
        assert f"--{section}.{name}" in out


def test_readme_names_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()
