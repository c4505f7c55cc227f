"""The bundled demo model: package data, default model of both CLIs, accuracy on the examples."""

import json
from pathlib import Path

import h5py
import pytest
from click.testing import CliRunner

from painn_export.checkpoint import load_model
from painn_export.cli import main as export_main
from painn_export.demo import demo_model_path
from painn_export.export import read_metadata
from pipelines.cli import main as batch_main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "emt_examples.h5"
# Issue targets on held-out EMT structures.
ENERGY_MAE_TARGET = 0.015  # eV/atom
FORCES_MAE_TARGET = 0.08  # eV/Å


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PAINN_EXPORT_CACHE", str(tmp_path / "cache"))


def test_demo_model_is_small_package_data_with_a_card():
    path = demo_model_path()
    assert path.stat().st_size < 2_000_000
    assert (path.parent / "demo.md").is_file()
    model = load_model(path)
    assert model.config.direct_forces and model.config.cutoff == 6.0
    assert model.provenance["test_forces_mae_eV_per_A"] <= FORCES_MAE_TARGET


def test_examples_are_held_out_emt_structures_with_labels():
    with h5py.File(EXAMPLES) as fh:
        assert fh["atom_offset"].shape[0] - 1 == 100
        assert "energy" in fh and "forces" in fh
        assert fh["positions"].attrs["units"] == "Angstrom"


def test_default_run_meets_the_accuracy_targets(tmp_path):
    """`painn-batch run examples/emt_examples.h5 --json`: demo model on ONNX Runtime CPU."""
    result = CliRunner().invoke(batch_main, ["run", str(EXAMPLES), "-o", str(tmp_path / "out.h5"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["status_counts"] == {"ok": 100}
    assert summary["energy_mae_eV_per_atom"] <= ENERGY_MAE_TARGET, summary
    assert summary["forces_mae_eV_per_A"] <= FORCES_MAE_TARGET, summary


def test_onnx_command_defaults_to_the_demo_model(tmp_path):
    out = tmp_path / "demo.onnx"
    result = CliRunner().invoke(export_main, ["onnx", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(read_metadata(out)["painn_export.config"])["hidden_channels"] == 96
