"""Facts written once: the README's contract table, the version and the import floors."""

import re
from pathlib import Path

import tomllib

from painn_export.contract import markdown_table

ROOT = Path(__file__).resolve().parents[1]


def readme_section(begin: str, end: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(re.escape(begin) + r"\n(.*?)\n" + re.escape(end), text, re.S)
    assert match, f"README.md lacks the {begin} ... {end} markers"
    return match.group(1).strip()


def test_readme_contract_table_is_the_contract():
    got = readme_section("<!-- contract:begin -->", "<!-- contract:end -->")
    assert got == markdown_table().strip(), (
        "README.md's contract table differs from painn_export/contract.py; paste the output of "
        "python -c 'from painn_export.contract import markdown_table; print(markdown_table())'"
    )


def test_version_is_written_once():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    from importlib.metadata import version

    from painn_export.version import __version__

    assert version("painn-export") == __version__
