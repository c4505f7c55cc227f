"""Gradient forces and stress: derivatives of the energy, checked by finite differences."""

import dataclasses

import numpy as np
import pytest
import torch

from painn_export.batch import Graph
from painn_export.tolerances import compare, tolerance

from conftest import SMALL, make_model
from structures import all_kinds, feed, predict, random_rotation

# Uncapped, so that rotating or straining never changes which edges exist.
GRADIENT = dataclasses.replace(SMALL, direct_forces=False, max_neighbors=10_000)
STEP = 1.0e-4  # Å for positions, dimensionless for strain


def evaluate(model, graph: Graph, stress: bool = True):
    return list(predict(model, [graph], stress=stress).values())


def deformed(graph: Graph, positions: np.ndarray, cell: np.ndarray) -> Graph:
    """The same edges (same integer image shifts) at new positions and cell."""
    return dataclasses.replace(
        graph, positions=positions, cell=cell, edge_shift=graph.cell_shift.astype(np.float64) @ cell
    )


def structures(rng):
    return {s.name: s for s in all_kinds(rng)}


@pytest.fixture(scope="module")
def model():
    return make_model(GRADIENT)


@pytest.mark.parametrize("kind", ["bulk", "slab", "molecule"])
def test_forces_are_minus_the_energy_gradient(kind, model, rng):
    s = structures(rng)[kind]
    g = s.graph(GRADIENT.cutoff, GRADIENT.max_neighbors)
    _, forces, _ = evaluate(model, g)
    atoms = rng.choice(g.n_atoms, size=min(4, g.n_atoms), replace=False)
    fd = forces.copy()
    for a in atoms:
        for c in range(3):
            step = np.zeros_like(g.positions)
            step[a, c] = STEP
            e_plus = evaluate(model, deformed(g, g.positions + step, g.cell), stress=False)[0]
            e_minus = evaluate(model, deformed(g, g.positions - step, g.cell), stress=False)[0]
            fd[a, c] = -(e_plus[0] - e_minus[0]) / (2 * STEP)
    result = compare("forces", forces[atoms], fd[atoms], tolerance("finite_difference", "float64", "forces"))
    assert result.passed, f"{kind}, atoms {atoms.tolist()}: {result.describe()}"
    assert np.abs(forces).max() > 1e-3, "forces too small for the test to mean anything"


@pytest.mark.parametrize("kind", ["bulk", "slab", "tiny_cell"])
def test_stress_is_the_strain_derivative_over_volume(kind, model, rng):
    s = structures(rng)[kind]
    g = s.graph(GRADIENT.cutoff, GRADIENT.max_neighbors)
    _, _, stress = evaluate(model, g)
    volume = abs(np.linalg.det(g.cell))
    fd = np.zeros((3, 3))
    for a in range(3):
        for b in range(3):
            eps = np.zeros((3, 3))
            eps[a, b] += STEP / 2
            eps[b, a] += STEP / 2
            e = []
            for sign in (1, -1):
                deform = np.eye(3) + sign * eps
                e.append(
                    evaluate(model, deformed(g, g.positions @ deform, g.cell @ deform), stress=False)[0][0]
                )
            fd[a, b] = (e[0] - e[1]) / (2 * STEP) / volume
    result = compare("stress", stress[0], fd, tolerance("finite_difference", "float64", "stress"))
    assert result.passed, f"{kind}: {result.describe()}"
    np.testing.assert_allclose(stress[0], stress[0].T, atol=1e-12)
    assert np.abs(stress).max() > 1e-5, "stress too small for the test to mean anything"


@pytest.mark.parametrize("kind", ["bulk", "slab", "molecule"])
def test_forces_and_stress_rotate(kind, model, rng):
    s = structures(rng)[kind]
    R = random_rotation(rng)
    e0, f0, s0 = evaluate(model, s.graph(GRADIENT.cutoff, GRADIENT.max_neighbors))
    e1, f1, s1 = evaluate(model, s.transformed(R, rng.normal(0, 2.0, 3)).graph(GRADIENT.cutoff, 10_000))
    tol = tolerance("invariance", "float64", "forces")
    for name, a, b in [("energy", e1, e0), ("forces", f1, f0 @ R.T), ("stress", s1, R @ s0 @ R.T)]:
        result = compare(name, a, b, tol)
        assert result.passed, f"{kind} rotated by {R.tolist()}: {result.describe()}"


def test_zero_volume_gives_nan_stress_not_a_crash(model, rng):
    s = structures(rng)["molecule"]
    g = dataclasses.replace(s.graph(GRADIENT.cutoff, 10_000), cell=np.zeros((3, 3)))
    bulk = structures(rng)["bulk"].graph(GRADIENT.cutoff, 10_000)
    energy, forces, stress = predict(model, [g, bulk], stress=True).values()
    assert np.isnan(stress[0]).all() and np.isfinite(stress[1]).all()
    assert np.isfinite(energy).all() and np.isfinite(forces).all()


def test_direct_force_model_refuses_stress(rng):
    direct = make_model(SMALL)
    g = structures(rng)["bulk"].graph(SMALL.cutoff, SMALL.max_neighbors)
    with pytest.raises(ValueError, match="gradient-force model"):
        direct(feed([g], torch.float64), virial=True)


def test_finite_difference_check_can_fail(rng):
    """The direct head's forces are not an energy gradient: the same check fails on them."""
    direct = make_model(dataclasses.replace(SMALL, max_neighbors=10_000))
    g = structures(rng)["bulk"].graph(SMALL.cutoff, 10_000)
    forces = predict(direct, [g])["forces"]
    fd = np.zeros(3)
    for c in range(3):
        step = np.zeros_like(g.positions)
        step[0, c] = STEP
        e_plus = predict(direct, [deformed(g, g.positions + step, g.cell)])["energy"]
        e_minus = predict(direct, [deformed(g, g.positions - step, g.cell)])["energy"]
        fd[c] = -float(e_plus[0] - e_minus[0]) / (2 * STEP)
    tol = tolerance("finite_difference", "float64", "forces")
    assert not compare("forces", forces[0], fd, tol).passed


def test_gradient_model_trains_through_forces(rng):
    """create_graph in training mode: a force loss has gradients for the weights."""
    model = make_model(GRADIENT).train()
    g = structures(rng)["bulk"].graph(GRADIENT.cutoff, 10_000)
    _, forces = model(feed([g], torch.float64))
    forces.pow(2).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(gr is not None and gr.abs().sum() > 0 for gr in grads)
