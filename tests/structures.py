"""Test structures (positions Å, cell rows = lattice vectors, pbc) and helpers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from painn_export.batch import Graph, collate
from painn_export.neighbors import neighbor_graph
from painn_export.samples import Sample, _jittered_grid
from painn_export.slots import GraphInputs


@dataclass(frozen=True)
class Structure(Sample):
    """A sample structure (:class:`painn_export.samples.Sample`) that builds its own graph and feed."""

    def graph(self, cutoff: float, max_neighbors: int, **kw) -> Graph:
        return neighbor_graph(
            self.positions,
            self.cell,
            self.pbc,
            cutoff,
            max_neighbors,
            atomic_numbers=self.atomic_numbers,
            **kw,
        )

    def transformed(self, rotation: np.ndarray, translation: np.ndarray) -> Structure:
        return Structure(
            self.name,
            self.atomic_numbers,
            self.positions @ rotation.T + translation,
            self.cell @ rotation.T,
            self.pbc,
        )


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def bulk(rng, n=12, a=5.0, skew=0.4) -> Structure:
    cell = np.eye(3) * a + rng.uniform(-skew, skew, (3, 3))
    pos = _jittered_grid(rng, n) @ cell
    return Structure("bulk", rng.integers(1, 84, n), pos, cell, np.array([True, True, True]))


def slab(rng, n=10) -> Structure:
    cell = np.array([[5.3, 0.0, 0.0], [1.5, 4.8, 0.0], [0.0, 0.0, 18.0]])
    frac = _jittered_grid(rng, n) * np.array([1.0, 1.0, 0.35])
    pos = frac @ cell
    pos[0, 2] -= 2.0  # an atom outside the cell along the non-periodic axis
    return Structure("slab", rng.integers(1, 84, n), pos, cell, np.array([True, True, False]))


def molecule(rng, n=7) -> Structure:
    pos = _jittered_grid(rng, n) * 6.0
    return Structure("molecule", rng.integers(1, 84, n), pos, np.eye(3) * 20.0, np.array([False] * 3))


def tiny_cell(rng) -> Structure:
    """Two atoms in a cell far smaller than the cutoff: many self-images and edges per atom."""
    cell = np.array([[2.2, 0.0, 0.0], [0.7, 2.1, 0.0], [0.3, 0.4, 2.3]])
    pos = np.array([[0.1, 0.2, 0.1], [1.3, 1.1, 1.2]])
    return Structure("tiny_cell", rng.integers(1, 84, 2), pos, cell, np.array([True, True, True]))


def chain(rng, n: int, cutoff: float = 5.0) -> Graph:
    """A bent chain of ``n`` atoms 0.9 Å apart: every pair within ``cutoff``, in-degree ``n - 1``
    (a batch of them runs on :func:`~painn_export.contract.slot_count` ``(n - 1)`` slots)."""
    pos = np.arange(n)[:, None] * np.array([0.9, 0.3, 0.0]) + rng.normal(0, 0.05, (n, 3))
    z = rng.integers(1, 84, n)
    return neighbor_graph(pos, np.eye(3) * 20, np.zeros(3, bool), cutoff, 50, atomic_numbers=z)


def all_kinds(rng) -> list[Structure]:
    return [bulk(rng), slab(rng), molecule(rng), tiny_cell(rng)]


REFERENCE_INPUTS = ("atomic_numbers", "positions", "edge_index", "edge_shift", "system_index", "natoms")


def feed(graphs, dtype=torch.float64) -> GraphInputs:
    """The model's graph inputs for ``graphs``: the slot layout with the reverse
    index (direct-force models' gathers then take the exportable backward too)."""
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    return GraphInputs.from_feed(collate(graphs, np_dtype), dtype)


def reference_feed(graphs, dtype=torch.float64) -> dict[str, torch.Tensor]:
    """The torch_scatter reference's keyword inputs: the flat edge list."""
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    batch = collate(graphs, np_dtype)
    return {k: torch.from_numpy(batch[k]) for k in REFERENCE_INPUTS}


def predict(model, graphs, stress: bool = False, translate=None) -> dict[str, np.ndarray]:
    """Energies and forces (and stress) with the host's sums; ``translate`` (Å, [3])
    moves every atom after collate, which itself centres each structure: so the
    model alone sees the translation."""
    dtype = model.atom_emb.embeddings.weight.dtype
    batch = collate(graphs, np.float64 if dtype == torch.float64 else np.float32)
    if translate is not None:
        batch["positions"] = batch["positions"] + np.asarray(translate, dtype=batch["positions"].dtype)
    return model.predict(batch, stress=stress)


def run(model, graphs, dtype=torch.float64, translate=None):
    """Energies and forces of ``model`` (whose dtype is ``dtype``) on ``graphs``, as numpy."""
    assert model.atom_emb.embeddings.weight.dtype == dtype, "cast the model to the dtype first"
    out = predict(model, graphs, translate=translate)
    return out["energy"], out["forces"]
