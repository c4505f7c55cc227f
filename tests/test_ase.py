"""The ASE calculator over PyTorch and ONNX Runtime: relaxation, MD, energy conservation."""

import dataclasses

import numpy as np
import pytest
import torch

pytest.importorskip("ase", reason="ASE not installed (pip install painn-export[ase])")
from ase import units
from ase.build import bulk, fcc111
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
from ase.md.verlet import VelocityVerlet
from ase.optimize import BFGS

from painn_export import TargetNormalization
from painn_export.ase import PaiNNCalculator
from painn_export.checkpoint import load_model
from painn_export.demo import demo_model_path
from painn_export.export import export_onnx
from painn_export.metadata import ModelFacts
from painn_export.runners import OnnxRuntimeRunner, TorchRunner

from conftest import SMALL, make_model


@pytest.fixture(scope="module")
def demo_calculators(tmp_path_factory):
    """The bundled demo model on PyTorch (float64) and on ONNX Runtime (float32 export)."""
    model = load_model(demo_model_path())
    onnx_path = export_onnx(model, tmp_path_factory.mktemp("demo") / "demo.onnx")
    facts = ModelFacts(model.config.cutoff, model.config.max_neighbors, model.config.num_elements, False)

    def make(runtime):
        runner = TorchRunner(model, dtype="float64") if runtime == "torch" else OnnxRuntimeRunner(onnx_path)
        return PaiNNCalculator(runner, facts)

    return make


def rattled_cu_alloy():
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
    atoms.symbols[[0, 5, 9, 17]] = "Pd"
    atoms.rattle(0.08, seed=3)
    return atoms


def test_bfgs_relaxation_agrees_between_runtimes(demo_calculators):
    results = {}
    for runtime in ("torch", "onnxruntime"):
        atoms = fcc111("Pt", size=(2, 2, 3), vacuum=6.0)
        atoms.rattle(0.1, seed=1)
        atoms.calc = demo_calculators(runtime)
        e0 = atoms.get_potential_energy()
        BFGS(atoms, logfile=None).run(fmax=0.05, steps=200)
        results[runtime] = (e0, atoms.get_potential_energy(), atoms.positions.copy(), atoms.get_forces())
    (e0_t, e_t, x_t, f_t), (_, e_o, x_o, f_o) = results["torch"], results["onnxruntime"]
    assert e_t < e0_t - 0.05, "the relaxation should lower the energy"
    assert np.abs(f_t).max() < 0.05 and np.abs(f_o).max() < 0.05
    assert abs(e_o - e_t) < 1e-3 * len(x_t)
    assert np.abs(x_o - x_t).max() < 1e-2


def test_md_trajectories_agree_between_runtimes(demo_calculators):
    trajectories = {}
    for runtime in ("torch", "onnxruntime"):
        atoms = rattled_cu_alloy()
        MaxwellBoltzmannDistribution(atoms, temperature_K=600, rng=np.random.default_rng(0))
        atoms.calc = demo_calculators(runtime)
        dyn = VelocityVerlet(atoms, timestep=2.0 * units.fs)
        energies = []
        dyn.attach(lambda a=atoms, e=energies: e.append(a.get_potential_energy()), interval=5)
        dyn.run(50)
        trajectories[runtime] = (np.array(energies), atoms.positions.copy())
        assert atoms.calc.graphs.n_searches < 50, "the skin should spare most neighbour searches"
    (e_t, x_t), (e_o, x_o) = trajectories["torch"], trajectories["onnxruntime"]
    assert np.abs(e_o - e_t).max() < 1e-3
    assert np.abs(x_o - x_t).max() < 1e-3


def smooth_model(direct: bool):
    """Random weights, uncapped graph, and rbf_proj biases zeroed.

    Upstream PaiNN's radial projection has a bias, so an edge entering the
    cutoff adds a finite message: the energy jumps there, whatever the
    forces. Zeroing it leaves a smooth energy (the envelope takes every edge
    to zero), which is what an energy-conservation test needs; the
    uncapped graph avoids the cap's jumps.
    """
    config = dataclasses.replace(SMALL, direct_forces=direct, max_neighbors=10_000)
    model = make_model(
        config, torch.float32, normalization=TargetNormalization(energy_std=0.1, forces_std=0.1)
    )
    with torch.no_grad():
        for layer in model.message_layers:
            layer.rbf_proj.bias.zero_()
    return model


def test_nve_with_gradient_forces_conserves_energy(tmp_path):
    """VelocityVerlet through ONNX Runtime: -dE/dx conserves E_total, the direct head does not."""
    deviation = {}
    for direct in (True, False):
        model = smooth_model(direct)
        path = export_onnx(model, tmp_path / f"direct_{direct}.onnx")
        facts = ModelFacts(
            model.config.cutoff, model.config.max_neighbors, model.config.num_elements, not direct
        )
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
        atoms.rattle(0.05, seed=1)
        atoms.calc = PaiNNCalculator(OnnxRuntimeRunner(path), facts)
        MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
        dyn = VelocityVerlet(atoms, timestep=1.0 * units.fs)
        total = []
        dyn.attach(lambda a=atoms, t=total: t.append(a.get_total_energy()), interval=1)
        dyn.run(300)
        deviation["direct" if direct else "gradient"] = np.abs(np.array(total) - total[0]).max()
    assert deviation["gradient"] < 1e-3, deviation
    assert deviation["gradient"] < 0.01 * deviation["direct"], deviation


def test_stress_through_the_calculator(tmp_path):
    """A gradient-force ONNX graph with stress gives ASE's Voigt stress, equal to the model's."""
    from ase.stress import full_3x3_to_voigt_6_stress

    from painn_export.batch import collate
    from painn_export.neighbors import neighbor_graph

    model = smooth_model(direct=False)
    path = export_onnx(model, tmp_path / "stress.onnx", dtype=torch.float64, stress=True)
    atoms = rattled_cu_alloy()
    atoms.calc = PaiNNCalculator.from_file(path, device="cpu")
    assert "stress" in atoms.calc.implemented_properties
    assert not atoms.calc.runner.active, "reading implemented_properties started the runtime"
    graph = neighbor_graph(
        atoms.positions, atoms.cell[:], atoms.pbc, 5.0, 10_000, atomic_numbers=atoms.numbers
    )
    with TorchRunner(model, dtype="float64", stress=True) as runner:
        want = runner.infer(collate([graph], np.float64))["stress"][0]
    np.testing.assert_allclose(atoms.get_stress(), full_3x3_to_voigt_6_stress(want), rtol=1e-8, atol=1e-12)
