"""Each default is written once: the CLI's option groups build the library's frozen options objects."""

import pytest
from click.testing import CliRunner

from pipelines.cli import main
from pipelines.options import RelaxSettings, RunOptions


def _captured(monkeypatch, module: str, name: str) -> list:
    import importlib

    seen = []

    def capture(input_path, output, model_path, **kwargs):
        seen.append(kwargs)
        raise SystemExit(0)

    monkeypatch.setattr(importlib.import_module(module), name, capture)
    return seen


def test_run_without_flags_asks_for_the_library_defaults(monkeypatch, tmp_path):
    seen = _captured(monkeypatch, "pipelines.run", "run_file")
    CliRunner().invoke(main, ["run", str(tmp_path / "in.h5")])
    assert seen[0]["options"] == RunOptions() and seen[0]["ray"] is None


def test_relax_without_flags_asks_for_the_library_defaults(monkeypatch, tmp_path):
    seen = _captured(monkeypatch, "pipelines.relax", "relax_file")
    CliRunner().invoke(main, ["relax", str(tmp_path / "in.h5")])
    assert seen[0]["options"] == RunOptions() and seen[0]["settings"] == RelaxSettings()


def test_every_run_option_has_a_flag_that_sets_it(monkeypatch, tmp_path):
    """A field of RunOptions that no flag reaches would keep its default whatever the user asks."""
    seen = _captured(monkeypatch, "pipelines.run", "run_file")
    flags = [
        "--runtime", "torch", "--dtype", "float64", "--device", "cpu", "--max-atoms", "7",
        "--max-edges", "9", "--workers", "0", "--overwrite", "-q",
    ]  # fmt: skip
    CliRunner().invoke(main, ["run", str(tmp_path / "in.h5"), *flags])
    got = seen[0]["options"]
    changed = {f for f in RunOptions.__dataclass_fields__ if getattr(got, f) != getattr(RunOptions(), f)}
    # --resume is the other half of --overwrite; --graphs has its own test (test_device_pipeline)
    assert changed == set(RunOptions.__dataclass_fields__) - {"resume", "graphs"}, changed


@pytest.mark.parametrize("bad", [{"resume": True, "overwrite": True}, {"max_atoms": 0}])
def test_nonsense_options_are_refused_where_they_are_made(bad):
    with pytest.raises(ValueError):
        RunOptions(**bad)
