"""Physics properties of the model, and tests that the checkers can fail."""

import dataclasses

import pytest
import torch

from painn_export.model import PaiNN

from checks import (
    assert_close,
    check_batching,
    check_large_separation,
    check_permutation,
    check_rotation_translation,
)
from conftest import SMALL
from conftest import make_model as _make_model
from structures import Structure, all_kinds, molecule, run

KINDS = ["bulk", "slab", "molecule", "tiny_cell"]

# Upstream's per-centre cap followed by its one-sided symmetrisation (keep
# j < i) depends on atom labels, so the *capped* graph is not permutation
# invariant by construction. The model's properties are tested on uncapped
# graphs; the graph's own properties are tested in test_neighbors.py.
UNCAPPED = dataclasses.replace(SMALL, max_neighbors=10_000)


def make_model():
    return _make_model(UNCAPPED)


def structure(kind, rng):
    return {s.name: s for s in all_kinds(rng)}[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_rotation_and_translation(kind, rng):
    model = make_model()
    for _ in range(3):
        check_rotation_translation(model, structure(kind, rng), rng)


@pytest.mark.parametrize("kind", KINDS)
def test_permutation(kind, rng):
    check_permutation(make_model(), structure(kind, rng), rng)


def test_batching(rng):
    check_batching(make_model(), all_kinds(rng))


def test_large_separation(rng):
    check_large_separation(make_model(), molecule(rng, 5), molecule(rng, 6))


def test_lattice_translation_of_one_atom(rng):
    """Moving one atom by a lattice vector changes nothing (same periodic solid)."""
    model = make_model()
    s = structure("bulk", rng)
    moved = s.positions.copy()
    moved[3] += s.cell[1] - 2 * s.cell[2]
    e0, f0 = run(model, [s.graph(5.0, 10_000)])
    e1, f1 = run(model, [Structure("moved", s.atomic_numbers, moved, s.cell, s.pbc).graph(5.0, 10_000)])
    assert_close("energy", e1, e0, "invariance", "float64")
    assert_close("forces", f1, f0, "invariance", "float64")


# --- the checkers themselves, against deliberately broken models -----------------


class Broken(PaiNN):
    """A copy of a model with a term that violates exactly one property."""

    def __init__(self, model, kind):
        super().__init__(model.config, model.normalization)
        self.load_state_dict(model.state_dict())
        self.to(next(model.parameters()).dtype).eval()
        self.kind = kind

    def forward(self, graph, virial=False):
        atom_energy, forces = super().forward(graph, virial)
        z, x = graph.atomic_numbers, graph.positions
        if self.kind == "absolute_frame":  # depends on absolute x coordinates
            atom_energy = atom_energy + x[:, 0]
            forces = forces + torch.tensor([1.0, 0.0, 0.0], dtype=forces.dtype)
        elif self.kind == "atom_order":  # depends on which atom comes first
            atom_energy = atom_energy + 0.1 * z[0].to(atom_energy.dtype)
        elif self.kind == "batch_crosstalk":  # depends on the whole batch
            atom_energy = atom_energy + 1e-3 * x.shape[0]
        elif self.kind == "non_additive":  # E grows with n² when two structures merge
            atom_energy = atom_energy + 1e-2 * x.shape[0]
        return atom_energy, forces


def test_checkers_catch_broken_models(rng):
    base = make_model()
    s = structure("bulk", rng)
    with pytest.raises(AssertionError, match="rotation="):
        check_rotation_translation(Broken(base, "absolute_frame"), s, rng, translate=False)
    with pytest.raises(AssertionError, match="translation="):
        check_rotation_translation(Broken(base, "absolute_frame"), s, rng, rotate=False)
    with pytest.raises(AssertionError, match="permutation="):
        check_permutation(Broken(base, "atom_order"), s, rng)
    with pytest.raises(AssertionError, match="batch position"):
        check_batching(Broken(base, "batch_crosstalk"), all_kinds(rng))
    with pytest.raises(AssertionError, match="separation"):
        check_large_separation(Broken(base, "non_additive"), molecule(rng, 4), molecule(rng, 5))
