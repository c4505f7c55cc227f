"""Facts written once: the docs' generated tables (contract, statuses, exit codes) and the version."""

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def doc_section(doc: str, name: str) -> str:
    text = (ROOT / doc).read_text(encoding="utf-8")
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    match = re.search(re.escape(begin) + r"\n(.*?)\n?" + re.escape(end), text, re.S)
    assert match, f"{doc} lacks the {begin} ... {end} markers"
    return match.group(1).strip()


@pytest.mark.parametrize(
    "doc, name, make",
    [
        ("docs/contract.md", "contract", "painn_export.contract:markdown_table"),
        ("docs/failures.md", "statuses", "pipelines.output:status_table"),
        ("docs/failures.md", "exit-codes", "pipelines.cli:exit_code_table"),
    ],
)
def test_generated_tables_in_the_docs_are_the_code(doc, name, make):
    """Tables the docs show are made by the code that holds the facts; a hand edit, or a new
    status or exit code, fails here until the table is pasted again."""
    import importlib

    module, function = make.split(":")
    want = getattr(importlib.import_module(module), function)().strip()
    assert doc_section(doc, name) == want, (
        f"{doc}'s {name} table differs from {make}; paste the output of "
        f"python -c 'from {module} import {function}; print({function}())'"
    )


def test_version_is_written_once():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    from importlib.metadata import version

    from painn_export.version import __version__

    assert version("painn-export") == __version__


def test_every_runtime_comparison_bounds_every_quantity_a_runner_returns():
    """Parity on a stress graph asks for a stress bound: a runtime row without one was a KeyError
    mid-report (TensorRT's had none)."""
    from painn_export.tolerances import table

    for (comparison, dtype), rows in table().items():
        assert all(row.reason and row.atol >= 0 and row.rtol >= 0 for row in rows.values()), (
            comparison,
            dtype,
        )
        if comparison.endswith("_vs_torch") and comparison != "torch_vs_torch":
            assert {"energy", "forces", "stress"} <= set(rows), (comparison, dtype, sorted(rows))
