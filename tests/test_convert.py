"""painn-batch convert (ASE files, ANI- and SPICE-style HDF5) and export (extxyz)."""

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("ase", reason="ASE not installed (pip install painn-export[ase])")
import ase.db
import ase.io
from ase.build import bulk, molecule
from ase.calculators.emt import EMT

from painn_export import save_model
from painn_export.schema import read_structures, validate_input
from pipelines.cli import main
from pipelines.convert import BOHR_ANGSTROM, HARTREE_EV

from conftest import SMALL, make_model


def emt_frames():
    frames = [
        bulk("Cu", "fcc", a=3.6).repeat((2, 2, 2)),
        molecule("H2O"),
        bulk("Al", "fcc", a=4.05, cubic=True),
    ]
    frames[1].center(vacuum=5.0)
    out = []
    for k, atoms in enumerate(frames):
        atoms.rattle(0.05, seed=k)
        atoms.calc = EMT()
        atoms.get_potential_energy()
        atoms.get_forces()
        out.append(atoms)
    return out


def convert(args):
    result = CliRunner().invoke(main, ["convert", *args])
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.parametrize("suffix", ["extxyz", "traj", "db"])
def test_ase_files_with_calculator_results(tmp_path, suffix):
    frames = emt_frames()
    src = tmp_path / f"in.{suffix}"
    if suffix == "db":
        with ase.db.connect(str(src)) as db:
            for atoms in frames:
                db.write(atoms)
    else:
        ase.io.write(str(src), frames)
    out = tmp_path / "out.h5"
    convert([str(src), "-o", str(out)])
    info = validate_input(out)
    assert info.n_structures == 3 and info.has_reference
    with h5py.File(out) as fh:
        # extxyz stores 8 significant digits
        np.testing.assert_allclose(fh["energy"][...], [a.get_potential_energy() for a in frames], rtol=1e-7)
        want = np.concatenate([a.get_forces() for a in frames])
        np.testing.assert_allclose(fh["forces"][...], want, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(fh["pbc"][...], [a.pbc for a in frames])
    samples = read_structures(out)
    np.testing.assert_allclose(samples[0].positions, frames[0].positions, atol=1e-7)
    np.testing.assert_allclose(samples[0].cell, frames[0].cell[:], atol=1e-7)


def test_ase_explicit_keys(tmp_path):
    frames = emt_frames()
    for atoms in frames:
        atoms.info["ref_e"] = atoms.get_potential_energy() + 1.0
        atoms.arrays["ref_f"] = atoms.get_forces() * 2.0
        atoms.calc = None
    src = tmp_path / "in.extxyz"
    ase.io.write(str(src), frames)
    out = tmp_path / "out.h5"
    convert([str(src), "-o", str(out), "--energy-key", "ref_e", "--forces-key", "ref_f"])
    with h5py.File(out) as fh:
        np.testing.assert_allclose(fh["energy"][...], [a.info["ref_e"] for a in frames], rtol=1e-7)
        want = np.concatenate([a.arrays["ref_f"] for a in frames])
        np.testing.assert_allclose(fh["forces"][...], want, rtol=1e-6, atol=1e-7)
    result = CliRunner().invoke(
        main, ["convert", str(src), "-o", str(tmp_path / "x.h5"), "--energy-key", "nope"]
    )
    assert result.exit_code == 1 and "'nope'" in result.output


def test_ani_style_hdf5_in_hartree(tmp_path):
    src = tmp_path / "ani.h5"
    rng = np.random.default_rng(0)
    coords = rng.normal(size=(4, 3, 3))
    with h5py.File(src, "w") as fh:
        g = fh.create_group("gdb11_s01/gdb11_s01-0")
        g["species"] = np.array([b"O", b"H", b"H"])
        g["coordinates"] = coords
        g["energies"] = np.array([-76.4, -76.3, -76.2, -76.1])
        g2 = fh.create_group("ani1x/C1H4")
        g2["atomic_numbers"] = np.array([6, 1, 1, 1, 1])
        g2["coordinates"] = rng.normal(size=(2, 5, 3))
        g2["energies"] = np.array([-40.5, -40.4])
        g2["forces"] = rng.normal(size=(2, 5, 3))
    out = tmp_path / "out.h5"
    convert([str(src), "-o", str(out)])
    with h5py.File(out) as fh:
        assert fh["atom_offset"].shape[0] - 1 == 6
        assert "energy" not in fh  # the first group has no forces: labels only when complete
    structures = read_structures(out)
    by_id = {s.name: s for s in structures}
    np.testing.assert_array_equal(by_id["gdb11_s01/gdb11_s01-0/2"].atomic_numbers, [8, 1, 1])
    np.testing.assert_allclose(by_id["gdb11_s01/gdb11_s01-0/2"].positions, coords[2])
    assert not by_id["ani1x/C1H4/1"].pbc.any()
    # labelled group alone: hartree -> eV
    with h5py.File(src, "a") as fh:
        del fh["gdb11_s01"]
    convert([str(src), "-o", str(out), "--format", "ani"])
    with h5py.File(out) as fh:
        np.testing.assert_allclose(fh["energy"][...], np.array([-40.5, -40.4]) * HARTREE_EV)


def test_spice_style_hdf5_gradient_in_hartree_per_bohr(tmp_path):
    src = tmp_path / "spice.h5"
    rng = np.random.default_rng(1)
    conf = rng.normal(size=(3, 4, 3))
    grad = rng.normal(size=(3, 4, 3))
    with h5py.File(src, "w") as fh:
        g = fh.create_group("mol-1")
        g["atomic_numbers"] = np.array([6, 8, 1, 1])
        g["conformations"] = conf
        g["dft_total_energy"] = np.array([-114.0, -114.1, -114.2])
        g["dft_total_gradient"] = grad
        g["smiles"] = np.array([b"C=O"])
    out = tmp_path / "out.h5"
    convert([str(src), "-o", str(out)])
    with h5py.File(out) as fh:
        np.testing.assert_allclose(fh["positions"][...], conf.reshape(-1, 3) * BOHR_ANGSTROM)
        np.testing.assert_allclose(fh["energy"][...], np.array([-114.0, -114.1, -114.2]) * HARTREE_EV)
        # forces are minus the gradient, hartree/bohr -> eV/Å
        np.testing.assert_allclose(fh["forces"][...], -grad.reshape(-1, 3) * HARTREE_EV / BOHR_ANGSTROM)


def test_run_then_export_to_extxyz(tmp_path):
    frames = emt_frames()
    src = tmp_path / "in.extxyz"
    ase.io.write(str(src), frames)
    inp = tmp_path / "in.h5"
    convert([str(src), "-o", str(inp)])
    model = save_model(make_model(SMALL, torch.float32), tmp_path / "m.pt")
    res = tmp_path / "res.h5"
    result = CliRunner().invoke(
        main, ["run", str(inp), "--model", str(model), "--runtime", "torch", "-o", str(res), "--workers", "0"]
    )
    assert result.exit_code == 0, result.output
    xyz = tmp_path / "res.extxyz"
    result = CliRunner().invoke(main, ["export", str(res), "--input", str(inp), "-o", str(xyz)])
    assert result.exit_code == 0, result.output
    back = ase.io.read(str(xyz), index=":")
    with h5py.File(res) as fh:
        # extxyz writes per-atom floats with 8 decimals
        np.testing.assert_allclose([a.info["painn_energy"] for a in back], fh["energy"][...], rtol=1e-7)
        got = np.concatenate([a.arrays["painn_forces"] for a in back])
        np.testing.assert_allclose(got, fh["forces"][...], rtol=0, atol=1e-8)
    assert [a.info["painn_status"] for a in back] == ["ok"] * 3
    np.testing.assert_allclose(back[0].positions, frames[0].positions, atol=1e-6)


def test_hdf5_errors_name_the_group_the_dataset_and_the_shape(tmp_path):
    """A user finds a molecule by its group and a dataset by its name, not by a structure number."""
    spice, ani = tmp_path / "spice.h5", tmp_path / "ani.h5"
    with h5py.File(spice, "w") as fh:
        for name, n_atoms in (("ok-mol", 3), ("mol-7", 2)):  # the second's gradient has 3 atoms
            g = fh.create_group(name)
            g["atomic_numbers"] = np.ones(n_atoms, int)
            g["conformations"] = np.zeros((2, n_atoms, 3))
            g["dft_total_energy"] = np.zeros(2)
            g["dft_total_gradient"] = np.zeros((2, 3, 3))
    with h5py.File(ani, "w") as fh:
        g = fh.create_group("data/H2O")
        g["species"] = np.array([b"O", b"H", b"H"])
        g["coordinates"] = np.zeros((2, 3, 3))
        g["energies"] = np.zeros(1)  # one energy for two conformations
    cases = (
        (spice, ["group 'mol-7'", "dataset 'dft_total_gradient'", "[2, 3, 3]", "expected [2, 2, 3]"]),
        (ani, ["group 'data/H2O'", "dataset 'energies'", "[1]", "expected [2]"]),
    )
    for source, words in cases:
        out = tmp_path / "out.h5"
        result = CliRunner().invoke(main, ["convert", str(source), "-o", str(out)])
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        for word in [source.name, *words]:
            assert word in result.output, result.output
        assert not out.exists() and not (tmp_path / "out.h5.writing").exists()
