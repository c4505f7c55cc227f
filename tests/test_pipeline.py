"""painn-batch run end to end through the CLI, with every bad-input kind mixed in."""

import json

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from painn_export import INPUT_NAMES, save_model
from painn_export.batch import collate
from painn_export.export import export_onnx, graphs_for
from painn_export.samples import example_set
from pipelines.cli import main
from pipelines.run import STATUS
from pipelines.schema import SchemaError, validate_input, write_input

from conftest import SMALL, make_model


def _structures():
    good = example_set(seed=7, sizes=(5, 9))
    rows = [(s.atomic_numbers, s.positions, s.cell, s.pbc) for s in good]
    bad = [
        (np.array([1, 8]), np.array([[0.0, 0, 0], [np.nan, 0, 0]]), np.eye(3) * 5, [True] * 3),  # NaN
        (
            np.array([1, 8]),
            np.array([[0.0, 0, 0], [1.0, 0, 0]]),
            np.zeros((3, 3)),
            [True] * 3,
        ),  # singular cell
        (
            np.array([1, 120]),
            np.array([[0.0, 0, 0], [1.0, 0, 0]]),
            np.zeros((3, 3)),
            [False] * 3,
        ),  # unknown Z
        (np.zeros(0, int), np.zeros((0, 3)), np.zeros((3, 3)), [False] * 3),  # empty
        (np.array([1, 1]), np.array([[0.0, 0, 0], [0.2, 0, 0]]), np.zeros((3, 3)), [False] * 3),  # too close
    ]
    expected_bad = [
        "nonfinite_positions",
        "bad_cell",
        "unknown_element",
        "empty_structure",
        "atoms_too_close",
    ]
    return good, rows + bad, expected_bad


@pytest.mark.parametrize("runtime", ["onnxruntime", "torch"])
def test_run_matches_model_and_flags_bad_inputs(tmp_path, runtime):
    model = make_model(SMALL, torch.float32)
    model_path = (
        export_onnx(model, tmp_path / "m.onnx")
        if runtime == "onnxruntime"
        else save_model(model, tmp_path / "m.pt")
    )
    good, rows, expected_bad = _structures()
    inp = write_input(tmp_path / "in.h5", rows)
    out = tmp_path / "out.h5"
    result = CliRunner().invoke(
        main,
        [
            "run",
            str(inp),
            "--model",
            str(model_path),
            "--runtime",
            runtime,
            "-o",
            str(out),
            "--max-atoms",
            "20",
            "--json",
        ],
    )
    assert result.exit_code == 3, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["status_counts"]["ok"] == len(good)
    with h5py.File(out) as fh:
        status = fh["status"][...]
        assert [k for s in status[len(good) :] for k, v in STATUS.items() if v == s] == expected_bad
        feed = collate(graphs_for(model, good), np.float32)
        with torch.no_grad():
            e, f = model(**{k: torch.from_numpy(feed[k]) for k in INPUT_NAMES})
        np.testing.assert_allclose(fh["energy"][: len(good)], e.numpy(), rtol=1e-4, atol=1e-4)
        n_good = feed["positions"].shape[0]
        np.testing.assert_allclose(fh["forces"][:n_good], f.numpy(), rtol=1e-3, atol=1e-4)
        assert np.isnan(fh["energy"][len(good) :]).all()
    assert not (tmp_path / "out.partial.h5").exists()


def test_all_ok_exits_zero_and_reports_mae(tmp_path):
    model = make_model(SMALL, torch.float32)
    path = save_model(model, tmp_path / "m.pt")
    good, _, _ = _structures()
    rows = [(s.atomic_numbers, s.positions, s.cell, s.pbc) for s in good]
    inp = write_input(
        tmp_path / "in.h5",
        rows,
        energies=np.zeros(len(rows)),
        forces=[np.zeros((len(r[0]), 3)) for r in rows],
    )
    result = CliRunner().invoke(main, ["run", str(inp), "--model", str(path), "--runtime", "torch", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["energy_mae_eV_per_atom"] > 0 and summary["forces_mae_eV_per_A"] >= 0


def test_malformed_files_fail_before_work(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(SchemaError, match="not a readable HDF5"):
        validate_input(bad)
    with h5py.File(tmp_path / "missing.h5", "w") as fh:
        fh["atomic_numbers"] = np.array([1])
    with pytest.raises(SchemaError, match="missing dataset 'positions'"):
        validate_input(tmp_path / "missing.h5")
    inp = write_input(tmp_path / "shape.h5", [(np.array([1]), np.zeros((1, 3)), np.eye(3), [True] * 3)])
    with h5py.File(inp, "a") as fh:
        del fh["cell"]
        fh["cell"] = np.zeros((2, 3, 3))
    with pytest.raises(SchemaError, match="'cell'"):
        validate_input(inp)
    result = CliRunner().invoke(main, ["run", str(bad), "--model", str(bad)])
    assert result.exit_code == 1 and "not a readable HDF5" in result.output
