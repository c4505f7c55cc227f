"""Physics property checkers. Each raises AssertionError naming the transform it used."""

from __future__ import annotations

import numpy as np

from painn_export.tolerances import compare, tolerance

from structures import Structure, random_rotation, run

TOL_E = tolerance("invariance", "float64", "energy")
TOL_F = tolerance("invariance", "float64", "forces")


def assert_close(quantity: str, got, want, comparison: str, dtype: str) -> None:
    """``got`` within the tolerance table's bound for ``(comparison, dtype, quantity)`` of ``want``."""
    result = compare(quantity, got, want, tolerance(comparison, dtype, quantity))
    assert result.passed, f"{comparison}: {result.describe()}"


def _graph(model, s: Structure):
    return s.graph(model.config.cutoff, model.config.max_neighbors)


def _assert(result, context: str) -> None:
    assert result.passed, f"{context}: {result.describe()}"


def check_rotation_translation(model, s: Structure, rng, rotate=True, translate=True) -> None:
    """E(Rx + t) = E(x) and F(Rx + t) = R F(x).

    The rotation goes through the graph builder; the translation is applied
    to the model's input itself (collate centres each structure, which would
    hide a model that depends on where the structure sits).
    """
    R = random_rotation(rng) if rotate else np.eye(3)
    t = rng.normal(0, 3.0, 3) if translate else np.zeros(3)
    e0, f0 = run(model, [_graph(model, s)])
    e1, f1 = run(model, [_graph(model, s.transformed(R, np.zeros(3)))], translate=t)
    context = f"{s.name} rotation={R.tolist()} translation={t.tolist()}"
    _assert(compare("energy", e1, e0, TOL_E), context)
    _assert(compare("forces", f1, f0 @ R.T, TOL_F), context)


def check_permutation(model, s: Structure, rng) -> None:
    """Relabelling atoms (and so re-indexing edges) permutes forces, keeps energy."""
    perm = rng.permutation(len(s.positions))
    p = Structure(s.name, s.atomic_numbers[perm], s.positions[perm], s.cell, s.pbc)
    e0, f0 = run(model, [_graph(model, s)])
    e1, f1 = run(model, [_graph(model, p)])
    context = f"{s.name} permutation={perm.tolist()}"
    _assert(compare("energy", e1, e0, TOL_E), context)
    _assert(compare("forces", f1, f0[perm], TOL_F), context)


def check_batching(model, structures: list[Structure]) -> None:
    """A batch gives each structure's own result."""
    graphs = [_graph(model, s) for s in structures]
    e_b, f_b = run(model, graphs)
    offset = 0
    for s, g in zip(structures, graphs):
        e, f = run(model, [g])
        context = f"{s.name} at batch position {offset}"
        _assert(compare("energy", e_b[structures.index(s) : structures.index(s) + 1], e, TOL_E), context)
        _assert(compare("forces", f_b[offset : offset + g.n_atoms], f, TOL_F), context)
        offset += g.n_atoms


def check_large_separation(model, a: Structure, b: Structure, gap: float = 50.0) -> None:
    """Two molecules far beyond the cutoff in one system: E(a ∪ b) = E(a) + E(b)."""
    shift = np.array([a.positions[:, 0].max() - b.positions[:, 0].min() + gap, 0.0, 0.0])
    merged = Structure(
        "a+b",
        np.concatenate([a.atomic_numbers, b.atomic_numbers]),
        np.concatenate([a.positions, b.positions + shift]),
        np.zeros((3, 3)),
        np.zeros(3, bool),
    )
    e_a, f_a = run(model, [_graph(model, a)])
    e_b, f_b = run(model, [_graph(model, b)])
    e_ab, f_ab = run(model, [_graph(model, merged)])
    context = f"separation gap={gap} Å, shift={shift.tolist()}"
    _assert(compare("energy", e_ab, e_a + e_b, TOL_E), context)
    _assert(compare("forces", f_ab, np.concatenate([f_a, f_b]), TOL_F), context)
