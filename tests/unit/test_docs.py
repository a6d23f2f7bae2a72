"""The docs stay true: every config field is in the README's reference and in --help."""

import subprocess
import sys
from pathlib import Path

from hpcopt.config import fields_for_cli

ROOT = Path(__file__).resolve().parents[2]


def test_readme_config_reference_is_the_generated_one():
    from hpcopt.config import SECTIONS
    from hpcopt.flags import reference

    readme = (ROOT / "README.md").read_text()
    assert reference(SECTIONS) in readme, "README's config reference is stale: paste `python -m hpcopt.flags`"
    for section, name, *_ in fields_for_cli():
        assert f"| `{name}` |" in readme


def test_analyze_help_comes_from_the_same_field_docs():
    from hpcopt.analyze.options import AnalyzeOptions
    from hpcopt.flags import field_docs

    out = subprocess.run([sys.executable, "-m", "hpcopt", "analyze", "--help"], capture_output=True,
                         text=True, check=True, env={**__import__("os").environ, "COLUMNS": "2000"}).stdout
    for name, doc in field_docs(AnalyzeOptions).items():
        if name not in ("skip", "grid", "report"):  # their help says how to write the value
            assert doc in out, name


def test_help_lists_every_flag():
    out = subprocess.run([sys.executable, "-m", "hpcopt", "train", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for section, name, *_ in fields_for_cli():
        assert f"--{section}.{name}" in out


def test_readme_names_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()
