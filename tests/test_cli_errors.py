"""Bad files and paths given to either CLI: one line naming what to do, exit 1, no traceback."""

import os

import pytest
import torch
from click.testing import CliRunner

from painn_export import save_model
from painn_export.cli import main as export_main
from painn_export.samples import example_set
from painn_export.schema import write_input
from pipelines.cli import main as batch_main

from conftest import SMALL, make_model


@pytest.fixture
def files(tmp_path):
    structures = example_set(seed=9, sizes=(5,))[:2]
    rows = [(s.atomic_numbers, s.positions, s.cell, s.pbc) for s in structures]
    inp = write_input(tmp_path / "in.h5", rows)
    ckpt = save_model(make_model(SMALL, torch.float32), tmp_path / "m.pt")
    (tmp_path / "random.onnx").write_bytes(os.urandom(4096))
    (tmp_path / "truncated.h5").write_bytes(inp.read_bytes()[:2000])
    (tmp_path / "afile").write_text("x")
    return tmp_path, inp, ckpt


def _one_line_error(main, args, *words):
    result = CliRunner().invoke(main, [str(a) for a in args])
    # An exception the CLI did not turn into its own error would be result.exception itself.
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 1, result.output
    assert "Error" in result.output and "Traceback" not in result.output, result.output
    for word in words:
        assert word in result.output, result.output


def test_batch_cli(files):
    tmp, inp, ckpt = files
    _one_line_error(batch_main, ["run", inp, "--model", tmp / "random.onnx"], "painn-export onnx")
    _one_line_error(batch_main, ["run", tmp / "truncated.h5"], "truncated.h5")
    torch_run = ["run", inp, "--model", ckpt, "--runtime", "torch"]
    _one_line_error(batch_main, [*torch_run, "-o", tmp / "afile" / "o.h5"], "output folder")


def test_export_cli(files, monkeypatch):
    tmp, inp, ckpt = files
    _one_line_error(export_main, ["parity", "--checkpoint", ckpt, "--onnx", tmp / "random.onnx"], "ONNX")
    _one_line_error(export_main, ["check-ops", tmp / "random.onnx"])
    _one_line_error(export_main, ["onnx", "--checkpoint", ckpt, "-o", tmp / "afile" / "m.onnx"])
    monkeypatch.setenv("PAINN_EXPORT_CACHE", str(tmp / "afile" / "cache"))
    _one_line_error(batch_main, ["run", inp, "--model", ckpt, "-o", tmp / "o2.h5"], "afile")


def test_convert_of_damaged_files_names_the_file(tmp_path):
    import ase.io
    import h5py
    import numpy as np
    from ase.build import bulk

    ase.io.write(str(tmp_path / "ok.extxyz"), [bulk("Cu", cubic=True)] * 2)
    text = (tmp_path / "ok.extxyz").read_text()
    (tmp_path / "garbage.extxyz").write_text(text.replace("Cu ", "Cu abc ", 1))
    with h5py.File(tmp_path / "spice.h5", "w") as fh:  # 2 conformations, gradients of another shape
        group = fh.create_group("mol")
        group["atomic_numbers"] = np.array([1, 8, 1])
        group["conformations"] = np.zeros((2, 3, 3))
        group["dft_total_energy"] = np.zeros(2)
        group["dft_total_gradient"] = np.zeros((2, 2, 3))
    for name, fmt in (("garbage.extxyz", "auto"), ("spice.h5", "spice")):
        out = tmp_path / f"{name}.out.h5"
        _one_line_error(batch_main, ["convert", tmp_path / name, "--format", fmt, "-o", out], name)
        assert not out.exists()
