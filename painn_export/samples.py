"""Generated example structures for export tracing, parity checks and benchmarks.

Each is ``(atomic_numbers [n] int64, positions [n, 3] Å, cell [3, 3] Å rows =
lattice vectors, pbc [3] bool)``. Seeded, so a parity report is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Sample:
    name: str
    atomic_numbers: np.ndarray  # [n] int64
    positions: np.ndarray  # [n, 3] Å
    cell: np.ndarray  # [3, 3] Å
    pbc: np.ndarray  # [3] bool


def _jittered_grid(rng: np.random.Generator, n: int) -> np.ndarray:
    """``[n, 3]`` fractional coordinates, no two atoms closer than a quarter grid step."""
    m = int(np.ceil(n ** (1 / 3)))
    grid = np.stack(np.meshgrid(*[np.arange(m)] * 3, indexing="ij"), -1).reshape(-1, 3)
    pick = rng.permutation(len(grid))[:n]
    return (grid[pick] + 0.5 + rng.uniform(-0.25, 0.25, (n, 3))) / m


def bulk(rng: np.random.Generator, n: int, elements: np.ndarray, spacing: float = 2.4) -> Sample:
    """Random triclinic periodic cell with about ``spacing`` Å between atoms."""
    a = spacing * np.ceil(n ** (1 / 3))
    cell = np.eye(3) * a + rng.uniform(-0.15, 0.15, (3, 3)) * a
    return Sample(
        "bulk", rng.choice(elements, n), _jittered_grid(rng, n) @ cell, cell, np.array([True, True, True])
    )


def slab(rng: np.random.Generator, n: int, elements: np.ndarray, spacing: float = 2.4) -> Sample:
    """Periodic in a1, a2; vacuum along a3 (not periodic)."""
    side = spacing * np.ceil(np.sqrt(n / 3))
    cell = np.array([[side, 0.0, 0.0], [0.3 * side, side, 0.0], [0.0, 0.0, 3 * spacing + 15.0]])
    frac = _jittered_grid(rng, n) * np.array([1.0, 1.0, 3 * spacing / cell[2, 2]])
    return Sample("slab", rng.choice(elements, n), frac @ cell, cell, np.array([True, True, False]))


def molecule(rng: np.random.Generator, n: int, elements: np.ndarray, spacing: float = 1.6) -> Sample:
    """A non-periodic cluster; the cell is zero."""
    pos = _jittered_grid(rng, n) * spacing * np.ceil(n ** (1 / 3))
    return Sample("molecule", rng.choice(elements, n), pos, np.zeros((3, 3)), np.zeros(3, bool))


def tiny_cell(rng: np.random.Generator, elements: np.ndarray) -> Sample:
    """Two atoms in a cell much smaller than a typical cutoff: many images per atom."""
    cell = np.array([[2.4, 0.0, 0.0], [0.8, 2.3, 0.0], [0.3, 0.5, 2.5]])
    pos = np.array([[0.1, 0.2, 0.1], [1.4, 1.2, 1.3]])
    return Sample("tiny_cell", rng.choice(elements, 2), pos, cell, np.array([True, True, True]))


def single_atom(rng: np.random.Generator, elements: np.ndarray) -> Sample:
    return Sample(
        "single_atom", rng.choice(elements, 1), np.zeros((1, 3)), np.zeros((3, 3)), np.zeros(3, bool)
    )


def isolated_atom(rng: np.random.Generator, elements: np.ndarray) -> Sample:
    """A molecule with one atom far from the others: an atom without neighbours."""
    pos = np.array([[0.0, 0.0, 0.0], [1.2, 0.3, 0.0], [40.0, 40.0, 40.0]])
    return Sample("isolated_atom", rng.choice(elements, 3), pos, np.zeros((3, 3)), np.zeros(3, bool))


def example_set(
    seed: int = 0, num_elements: int = 83, sizes: tuple[int, ...] = (8, 24), large: int = 0
) -> list[Sample]:
    """Every kind above at a few sizes: what parity checks run on by default.

    ``large > 0`` adds a bulk cell of that many atoms (256 atoms at 5 Å hold
    thousands of edges): where a runtime that sums in a racy order shows it.
    """
    rng = np.random.default_rng(seed)
    elements = np.arange(1, num_elements + 1)
    out: list[Sample] = []
    for n in sizes:
        out += [bulk(rng, n, elements), slab(rng, n, elements), molecule(rng, n, elements)]
    out += [tiny_cell(rng, elements), single_atom(rng, elements), isolated_atom(rng, elements)]
    if large:
        big = bulk(rng, large, elements)
        out.append(Sample(f"bulk_{large}", big.atomic_numbers, big.positions, big.cell, big.pbc))
    return out
