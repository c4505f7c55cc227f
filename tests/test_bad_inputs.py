"""Inputs that used to give a silent wrong number or lose work: each now gets a status or a clear refusal."""

import json
import os

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from painn_export import save_model
from painn_export.batch import collate
from painn_export.export import graphs_for
from painn_export.runners import TorchRunner
from painn_export.samples import Sample, bulk, example_set, molecule, slab
from painn_export.schema import write_input
from pipelines.cli import main
from pipelines.output import OutputLock

from checks import assert_close
from conftest import SMALL, make_model

ELEMENTS = np.arange(1, 30)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_model(make_model(SMALL, torch.float32), tmp_path_factory.mktemp("m") / "m.pt")


def _write(path, structures):
    return write_input(path, [(s.atomic_numbers, s.positions, s.cell, s.pbc) for s in structures])


def _run(tmp_path, checkpoint, structures, *extra, name="in.h5"):
    inp = _write(tmp_path / name, structures)
    out = tmp_path / (name.removesuffix(".h5") + ".out.h5")
    args = ["run", str(inp), "--model", str(checkpoint), "--runtime", "torch", "-o", str(out)]
    result = CliRunner().invoke(main, [*args, "--workers", "0", "--json", *extra])
    return result, out


def _statuses(out):
    from pipelines.output import STATUS

    names = {v: k for k, v in STATUS.items()}
    with h5py.File(out) as fh:
        return [names[int(c)] for c in fh["status"][...]], fh["energy"][...], fh["forces"][...]


def test_a_cell_does_not_matter_where_no_axis_is_periodic(tmp_path, checkpoint):
    """A molecule with a NaN cell was computed with it (34 eV off); now the cell is not used."""
    rng = np.random.default_rng(0)
    m = molecule(rng, 8, ELEMENTS)
    nan_cell = Sample("nan", m.atomic_numbers, m.positions, np.full((3, 3), np.nan), m.pbc)
    big_cell = Sample("big", m.atomic_numbers, m.positions, np.eye(3) * 50.0, m.pbc)
    result, out = _run(tmp_path, checkpoint, [m, nan_cell, big_cell])
    assert result.exit_code == 0, result.output
    status, energy, _ = _statuses(out)
    assert status == ["ok"] * 3
    assert_close("energy", energy[1:], np.full(2, energy[0]), "other_batch", "float32")


def test_only_periodic_axes_need_lattice_vectors(tmp_path, checkpoint):
    """A slab with a zero (or NaN) vacuum vector and a wire with zero side vectors are valid."""
    rng = np.random.default_rng(1)
    s = slab(rng, 12, ELEMENTS)
    cells = [s.cell.copy() for _ in range(3)]
    cells[1][2] = 0.0
    cells[2][2] = np.nan
    slabs = [Sample(f"slab{k}", s.atomic_numbers, s.positions, c, s.pbc) for k, c in enumerate(cells)]
    wire_cell = np.zeros((3, 3))
    wire_cell[0, 0] = 3.0
    wire = Sample(
        "wire", np.array([6, 6]), np.array([[0.0, 0, 0], [1.5, 0, 0]]), wire_cell, [True, False, False]
    )
    result, out = _run(tmp_path, checkpoint, [*slabs, wire])
    assert result.exit_code == 0, result.output
    status, energy, _ = _statuses(out)
    assert status == ["ok"] * 4
    assert_close("energy", energy[1:3], np.full(2, energy[0]), "other_batch", "float32")


@pytest.mark.parametrize(
    "positions, cell, pbc",
    [
        ([[0.0, 0, 0]], np.diag([0.4, 3.0, 3.0]), [True] * 3),  # own image 0.4 Å away
        ([[0.0, 0, 0], [0.005, 0, 0]], np.zeros((3, 3)), [False] * 3),  # 0.005 Å apart
        ([[0.001, 1, 1], [4.996, 1, 1]], np.eye(3) * 5.0, [True] * 3),  # 0.005 Å across the boundary
        ([[1.0, 1, 1], [1.0, 1, 1]], np.eye(3) * 5.0, [True] * 3),  # the same place
    ],
    ids=["self_image", "coincident", "across_boundary", "identical"],
)
def test_too_close_sees_every_pair(tmp_path, checkpoint, positions, cell, pbc):
    z = np.full(len(positions), 6)
    result, out = _run(tmp_path, checkpoint, [Sample("x", z, np.array(positions), cell, np.array(pbc))])
    assert result.exit_code == 3, result.output
    assert _statuses(out)[0] == ["atoms_too_close"]


def test_far_from_the_origin_gives_the_same_numbers():
    """Coordinates near 1e4 Å: float32 edge vectors keep their digits (local origin before the cast)."""
    rng = np.random.default_rng(2)
    model = make_model(SMALL, torch.float32)
    near = [s for s in example_set(seed=2, sizes=(9,)) if s.name in ("bulk", "slab", "molecule")]
    far = [
        Sample(s.name, s.atomic_numbers, s.positions + 1.0e4 + rng.uniform(0, 1, 3), s.cell, s.pbc)
        for s in near
    ]
    with TorchRunner(model) as runner:
        a = runner.infer(collate(graphs_for(model, near), np.float32))
        b = runner.infer(collate(graphs_for(model, far), np.float32))
    for quantity in ("energy", "forces"):
        assert_close(quantity, b[quantity], a[quantity], "far_from_origin", "float32")


def test_output_equal_to_the_input_is_refused(tmp_path, checkpoint):
    structures = example_set(seed=3, sizes=(5,))[:2]
    inp = write_input(
        tmp_path / "in.h5", [(s.atomic_numbers, s.positions, s.cell, s.pbc) for s in structures]
    )
    before = inp.read_bytes()
    os.symlink(inp, tmp_path / "link.h5")
    for target in (inp, tmp_path / "link.h5"):
        result = CliRunner().invoke(
            main, ["run", str(inp), "--model", str(checkpoint), "--runtime", "torch", "-o", str(target)]
        )
        assert result.exit_code == 1 and "input file" in result.output, result.output
    assert inp.read_bytes() == before
    result = CliRunner().invoke(main, ["convert", str(inp), "-o", str(inp)])
    assert result.exit_code == 1 and "input file" in result.output and inp.read_bytes() == before


def test_existing_work_is_never_started_over_silently(tmp_path, checkpoint):
    structures = example_set(seed=4, sizes=(5,))[:3]
    result, out = _run(tmp_path, checkpoint, structures)
    assert result.exit_code == 0, result.output
    result, _ = _run(tmp_path, checkpoint, structures)
    assert result.exit_code == 1 and "--overwrite" in result.output and "--resume" in result.output
    result, _ = _run(tmp_path, checkpoint, structures, "--overwrite")
    assert result.exit_code == 0, result.output
    # A partial file from an earlier run: its finished structures are counted and kept.
    partial = out.with_name("in.out.partial.h5")
    out.rename(partial)
    result, _ = _run(tmp_path, checkpoint, structures)
    assert result.exit_code == 1 and "3 finished structures" in result.output and "--resume" in result.output
    assert partial.exists()
    result, _ = _run(tmp_path, checkpoint, structures, "--resume")
    assert result.exit_code == 0 and json.loads(result.output)["already_done"] == 3


def test_a_second_run_on_the_same_output_is_refused(tmp_path, checkpoint):
    structures = example_set(seed=5, sizes=(5,))[:2]
    out = tmp_path / "in.out.h5"
    with OutputLock(out):  # as a running painn-batch holds it
        for extra in ((), ("--resume",), ("--overwrite",)):
            result, _ = _run(tmp_path, checkpoint, structures, *extra)
            assert result.exit_code == 1 and "another painn-batch run" in result.output, result.output
            assert "delete" not in result.output.replace("not yours to delete", "")
    assert not out.exists()
    result, _ = _run(tmp_path, checkpoint, structures)  # released: the run goes ahead
    assert result.exit_code == 0, result.output
    assert not out.with_name(out.name + ".lock").exists()


def test_output_folder_is_created_and_a_file_in_the_way_is_one_line(tmp_path, checkpoint):
    structures = example_set(seed=6, sizes=(5,))[:2]
    inp = write_input(
        tmp_path / "in.h5", [(s.atomic_numbers, s.positions, s.cell, s.pbc) for s in structures]
    )
    args = ["run", str(inp), "--model", str(checkpoint), "--runtime", "torch", "--workers", "0", "-o"]
    result = CliRunner().invoke(main, [*args, str(tmp_path / "new" / "dir" / "out.h5")])
    assert result.exit_code == 0 and (tmp_path / "new" / "dir" / "out.h5").is_file(), result.output
    (tmp_path / "afile").write_text("x")
    result = CliRunner().invoke(main, [*args, str(tmp_path / "afile" / "out.h5")])
    assert result.exit_code == 1 and "output folder" in result.output
    assert "Traceback" not in result.output


def test_json_summary_is_strict_json(tmp_path, checkpoint):
    """No NaN in the summary: an MAE over no successful structure is null."""
    bad = Sample("bad", np.array([6]), np.array([[np.nan, 0, 0]]), np.zeros((3, 3)), np.zeros(3, bool))
    inp = write_input(
        tmp_path / "in.h5",
        [(bad.atomic_numbers, bad.positions, bad.cell, bad.pbc)],
        energies=[0.0],
        forces=[np.zeros((1, 3))],
    )
    result = CliRunner().invoke(
        main, ["run", str(inp), "--model", str(checkpoint), "--runtime", "torch", "--workers", "0", "--json"]
    )
    assert result.exit_code == 3, result.output

    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    summary = json.loads(result.output.strip().splitlines()[-1], parse_constant=refuse)
    assert summary["energy_mae_eV_per_atom"] is None


def test_export_refuses_results_of_another_input(tmp_path, checkpoint):
    pytest.importorskip("ase")
    rng = np.random.default_rng(7)
    a = [bulk(rng, 6, ELEMENTS) for _ in range(2)]
    b = [bulk(rng, 6, ELEMENTS) for _ in range(2)]  # same sizes, other structures
    result, out_a = _run(tmp_path, checkpoint, a, name="a.h5")
    assert result.exit_code == 0, result.output
    inp_b = _write(tmp_path / "b.h5", b)
    xyz = tmp_path / "x.extxyz"
    result = CliRunner().invoke(main, ["export", str(out_a), "--input", str(inp_b), "-o", str(xyz)])
    assert result.exit_code == 1 and "not computed from" in result.output, result.output
    assert not xyz.exists()
    result = CliRunner().invoke(
        main, ["export", str(out_a), "--input", str(tmp_path / "a.h5"), "-o", str(xyz)]
    )
    assert result.exit_code == 0 and xyz.is_file(), result.output
