"""One structure's graph, and many graphs packed into one flat model feed.

Geometry conventions, written once:

- ``cell`` rows are the lattice vectors ``a1, a2, a3`` (Å); a Cartesian image
  offset is ``S @ cell`` for integer ``S`` ``[3]``.
- An edge ``e`` has a sender ``j = edge_index[0, e]`` (the neighbour) and a
  receiver ``i = edge_index[1, e]`` (the centre); ``cell_shift[e]`` is the
  image of ``j``; ``edge_shift[e] = cell_shift[e] @ cell`` (Å), so the edge
  vector ``x_j + edge_shift - x_i`` points from ``i`` to ``j``.
- Graphs are symmetric: every edge ``(j, i, S)`` has its reverse ``(i, j, -S)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Graph:
    """Model inputs of one structure (numpy, float64 geometry)."""

    atomic_numbers: np.ndarray  # [n_atoms] int64
    positions: np.ndarray  # [n_atoms, 3] float64, Å
    edge_index: np.ndarray  # [2, n_edges] int64, (sender j, receiver i)
    cell_shift: np.ndarray  # [n_edges, 3] int64, image offset of j
    edge_shift: np.ndarray  # [n_edges, 3] float64, Å
    cell: np.ndarray | None = None  # [3, 3] float64, Å, rows = lattice vectors (stress only)

    @property
    def n_atoms(self) -> int:
        return int(self.positions.shape[0])

    @property
    def n_edges(self) -> int:
        return int(self.edge_index.shape[1])

    def distances(self, edges: slice = slice(None)) -> np.ndarray:
        """Lengths of the edges ``edges`` (all by default), Å, in float64."""
        j, i = self.edge_index[:, edges]
        return np.linalg.norm(self.positions[j] + self.edge_shift[edges] - self.positions[i], axis=1)


def collate(graphs: Sequence[Graph], dtype: np.dtype | type = np.float32) -> dict[str, np.ndarray]:
    """Pack graphs into one feed keyed by the model's input names.

    Atom indices in ``edge_index`` are offset by the atoms of earlier graphs;
    ``system_index`` numbers the graphs; floats are cast to ``dtype``. The
    feed also holds ``cell`` ``[n_systems, 3, 3]`` (zeros for graphs without
    one), the extra input of stress models; runtimes take the inputs they need.
    """
    dtype = np.dtype(dtype)
    natoms = np.array([g.n_atoms for g in graphs], dtype=np.int64)  # [n_systems]
    nedges = np.array([g.n_edges for g in graphs], dtype=np.int64)
    atom_offset = np.concatenate([[0], np.cumsum(natoms)[:-1]]).astype(np.int64)
    if graphs:
        edge_index = np.concatenate(
            [g.edge_index + off for g, off in zip(graphs, atom_offset)], axis=1
        )  # [2, n_edges]
        positions = np.concatenate([g.positions for g in graphs])
        edge_shift = np.concatenate([g.edge_shift for g in graphs])
        atomic_numbers = np.concatenate([g.atomic_numbers for g in graphs])
    else:
        edge_index = np.zeros((2, 0), dtype=np.int64)
        positions = edge_shift = np.zeros((0, 3))
        atomic_numbers = np.zeros(0, dtype=np.int64)
    return {
        "atomic_numbers": atomic_numbers.astype(np.int64),
        "positions": positions.astype(dtype),
        "edge_index": edge_index.astype(np.int64).reshape(2, int(nedges.sum())),
        "edge_shift": edge_shift.astype(dtype).reshape(-1, 3),
        "system_index": np.repeat(np.arange(len(graphs), dtype=np.int64), natoms),
        "natoms": natoms,
        "cell": np.array(
            [np.zeros((3, 3)) if g.cell is None else g.cell for g in graphs], dtype=dtype
        ).reshape(-1, 3, 3),
    }
