"""One structure's graph, and many graphs packed into one flat model feed.

Geometry conventions, written once:

- ``cell`` rows are the lattice vectors ``a1, a2, a3`` (Å); a Cartesian image
  offset is ``S @ cell`` for integer ``S`` ``[3]``.
- An edge ``e`` has a sender ``j = edge_index[0, e]`` (the neighbour) and a
  receiver ``i = edge_index[1, e]`` (the centre); ``cell_shift[e]`` is the
  image of ``j``; ``edge_shift[e] = cell_shift[e] @ cell`` (Å), so the edge
  vector ``x_j + edge_shift - x_i`` points from ``i`` to ``j``.
- Graphs are symmetric: every edge ``(j, i, S)`` has its reverse ``(i, j, -S)``.

The model does not take the edge list: it takes the neighbour-major ("slot",
ELL) layout of :mod:`painn_export.contract`, which :func:`collate` builds from
each graph's edge list (its invariants: :mod:`painn_export.slots`). Each edge
``e`` goes to slot ``edge_slot[e]`` of its receiver's row (its rank among the
receiver's incoming edges, in edge order); ``edge_reverse[e]`` is the index
of its reverse edge, which the gradient of a gather reads.

A :class:`Graph` that a caller builds is checked where it is made: indices
in range, shapes that agree, every edge's reverse present, and no edge from
an atom to itself in the same image (zero length; the only edge that is its
own reverse). Self-edges through a periodic image and repeated edges are
valid and are evaluated as upstream would (each counts once per listing).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from painn_export.contract import slot_count

GRAPHS = ("auto", "host", "device")  # where graphs are built: what --graphs and graphs= take


class InvalidGraphError(ValueError):
    """A graph the model cannot evaluate; the message names the first offending edge or array."""


class AsymmetricGraphError(InvalidGraphError):
    """An edge list without the reverse ``(i, j, -S)`` of some edge ``(j, i, S)``."""


def reverse_edges(edge_index: np.ndarray, cell_shift: np.ndarray) -> np.ndarray:
    """``[n_edges]`` index of each edge's reverse ``(i, j, -S)``; raises if one is missing.

    Graphs from :func:`painn_export.neighbors.neighbor_graph` list their
    one-sided pairs and then the reverses in the same order, so the reverse
    of ``e`` is ``(e + n_edges / 2) mod n_edges``: checked in one pass, the
    general matching (a sort of both key sets) runs only when that fails.
    """
    n = edge_index.shape[1]
    edge_index = np.asarray(edge_index, dtype=np.int64)
    cell_shift = np.asarray(cell_shift, dtype=np.int64).reshape(n, 3)
    if n % 2 == 0:
        half = n // 2
        if np.array_equal(edge_index[:, :half], edge_index[::-1, half:]) and np.array_equal(
            cell_shift[:half], -cell_shift[half:]
        ):
            return np.concatenate([np.arange(half, n), np.arange(half)]).astype(np.int64)
    # General case: match each edge's key (j, i, S) with the keys (i, j, -S).
    keys = np.ascontiguousarray(np.concatenate([edge_index.T, cell_shift], axis=1))  # [n, 5]
    wanted = np.ascontiguousarray(np.concatenate([edge_index[::-1].T, -cell_shift], axis=1))  # [n, 5]
    order_keys = np.lexsort(keys.T[::-1])
    order_wanted = np.lexsort(wanted.T[::-1])
    if not np.array_equal(keys[order_keys], wanted[order_wanted]):
        row = np.dtype((np.void, 5 * 8))
        missing = np.flatnonzero(~np.isin(wanted.view(row).ravel(), keys.view(row).ravel()))
        what = (
            f"edge {int(missing[0])} (j={keys[missing[0], 0]}, i={keys[missing[0], 1]}, "
            f"S={keys[missing[0], 2:].tolist()}) has no reverse (i, j, -S)"
            if missing.size
            else "some edge appears more often than its reverse"
        )
        raise AsymmetricGraphError(
            f"the graph is not symmetric: {what}; the model needs every edge's reverse, "
            "as painn_export.neighbors.neighbor_graph builds"
        )
    reverse = np.empty(n, dtype=np.int64)
    reverse[order_wanted] = order_keys
    return reverse


def slots_within_receiver(receivers: np.ndarray, n_atoms: int) -> np.ndarray:
    """``[n_edges]`` rank of each edge among its receiver's edges, in edge order."""
    receivers = np.asarray(receivers, dtype=np.int64)
    order = np.argsort(receivers, kind="stable")
    degree = np.bincount(receivers, minlength=n_atoms)
    start = np.concatenate([[0], np.cumsum(degree)[:-1]])
    slot = np.empty(len(receivers), dtype=np.int64)
    slot[order] = np.arange(len(receivers)) - start[receivers[order]]
    return slot


@dataclass(frozen=True)
class Graph:
    """Model inputs of one structure (numpy, float64 geometry)."""

    atomic_numbers: np.ndarray  # [n_atoms] int64
    positions: np.ndarray  # [n_atoms, 3] float64, Å
    edge_index: np.ndarray  # [2, n_edges] int64, (sender j, receiver i)
    cell_shift: np.ndarray  # [n_edges, 3] int64, image offset of j
    edge_shift: np.ndarray  # [n_edges, 3] float64, Å
    cell: np.ndarray | None = None  # [3, 3] float64, Å, rows = lattice vectors (stress only)
    edge_slot: np.ndarray | None = None  # [n_edges] slot of each edge in its receiver's row
    edge_reverse: np.ndarray | None = None  # [n_edges] index of the reverse edge
    # Å: the shortest distance between two atoms, or an atom and its own image,
    # found by the search (pairs the graph drops included); inf if none.
    min_distance: float = float("inf")

    def __post_init__(self) -> None:
        self._check()
        # Derived once where the graph is built (a neighbour worker), never per batch;
        # a caller's own are checked (O(E)): a wrong one would give wrong numbers silently.
        if self.edge_slot is None:
            object.__setattr__(self, "edge_slot", slots_within_receiver(self.edge_index[1], self.n_atoms))
        else:
            self._check_slots()
        if self.edge_reverse is None:
            object.__setattr__(self, "edge_reverse", reverse_edges(self.edge_index, self.cell_shift))
        else:
            self._check_reverse()

    @classmethod
    def from_checked(cls, **fields) -> Graph:
        """The graph of ``fields`` that hold :class:`Graph`'s checks already: no second check.

        For arrays taken from a checked graph (built in another process, or
        narrowed), or written by a builder whose tests hold its output to the
        checks (:func:`painn_export.skin.update_skins`)."""
        unknown = set(fields) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"Graph has no field {', '.join(sorted(unknown))}")
        graph = cls.__new__(cls)
        graph.__dict__.update(fields)
        return graph

    def _check_slots(self) -> None:
        slot = np.asarray(self.edge_slot, dtype=np.int64)
        if slot.shape != (self.n_edges,) or (self.n_edges and slot.min() < 0):
            raise InvalidGraphError(
                f"Graph.edge_slot must be {self.n_edges} slots >= 0, got shape {slot.shape}"
            )
        key = np.asarray(self.edge_index[1], dtype=np.int64) * (int(slot.max(initial=0)) + 1) + slot
        if np.unique(key).size != self.n_edges:
            raise InvalidGraphError("Graph.edge_slot puts two edges of one receiver in the same slot")

    def _check_reverse(self) -> None:
        rev = np.asarray(self.edge_reverse, dtype=np.int64)
        n = self.n_edges
        if rev.shape != (n,) or (n and (rev.min() < 0 or rev.max() >= n)):
            raise InvalidGraphError(f"Graph.edge_reverse must be {n} edge indices, got shape {rev.shape}")
        index = np.asarray(self.edge_index, dtype=np.int64)
        shift = np.asarray(self.cell_shift, dtype=np.int64)
        wrong = (
            (rev[rev] != np.arange(n))
            | (index[0, rev] != index[1])
            | (index[1, rev] != index[0])
            | np.any(shift[rev] != -shift, axis=1)
        )
        if wrong.any():
            e = int(np.flatnonzero(wrong)[0])
            raise InvalidGraphError(
                f"Graph.edge_reverse[{e}] = {int(rev[e])} is not the reverse (i, j, -S) of edge {e}"
            )

    def _check(self) -> None:
        n, e = self.n_atoms, self.edge_index.shape[-1] if self.edge_index.ndim == 2 else -1
        shapes = {
            "atomic_numbers": (self.atomic_numbers.shape, (n,)),
            "positions": (self.positions.shape, (n, 3)),
            "edge_index": (self.edge_index.shape, (2, e)),
            "cell_shift": (self.cell_shift.shape, (e, 3)),
            "edge_shift": (self.edge_shift.shape, (e, 3)),
        }
        for name, (got, want) in shapes.items():
            if got != want:
                raise InvalidGraphError(f"Graph.{name} has shape {got}, expected {want}")
        if n == 0:
            raise InvalidGraphError("a graph with no atoms has nothing to evaluate")
        if e and (self.edge_index.min() < 0 or self.edge_index.max() >= n):
            bad = int(np.flatnonzero((self.edge_index < 0).any(0) | (self.edge_index >= n).any(0))[0])
            raise InvalidGraphError(
                f"edge {bad} (j={self.edge_index[0, bad]}, i={self.edge_index[1, bad]}) names an atom "
                f"outside 0..{n - 1}"
            )
        loops = (self.edge_index[0] == self.edge_index[1]) & ~np.any(self.cell_shift, axis=1)
        if loops.any():
            bad = int(np.flatnonzero(loops)[0])
            raise InvalidGraphError(
                f"edge {bad} joins atom {self.edge_index[0, bad]} to itself in the same image (zero "
                "length); a self-edge needs a non-zero cell_shift"
            )

    @property
    def n_atoms(self) -> int:
        return int(self.positions.shape[0])

    @property
    def n_edges(self) -> int:
        return int(self.edge_index.shape[1])

    @property
    def max_degree(self) -> int:
        """Most incoming edges of any atom: the slots this graph needs."""
        return int(self.edge_slot.max()) + 1 if self.n_edges else 0

    def distances(self) -> np.ndarray:
        """Lengths of the edges, Å, in float64."""
        j, i = self.edge_index
        return np.linalg.norm(self.positions[j] + self.edge_shift - self.positions[i], axis=1)


def collate(
    graphs: Sequence[Graph],
    dtype: np.dtype | type = np.float32,
    n_slots: int | None = None,
    n_pairs: int | None = None,
) -> dict[str, np.ndarray]:
    """Pack graphs into one feed keyed by the contract's names (:func:`~painn_export.contract.feed_names`).

    The slot layout has ``n_slots`` slots per atom (default
    :func:`~painn_export.contract.slot_count` of the busiest atom). Padding
    slots point at the centre itself with a zero shift, a zero mask, a
    reverse index to themselves, and no pair (``slot_pair == n_pairs``).
    Each edge and its reverse form a pair (``pair_slots``: its two flat
    slots; ``slot_pair``: each slot's pair), whose radial filter the model
    computes once; ``n_pairs`` (default: the edges' half, at least 1) may add
    spare pairs, whose slots are "none" (``n_atoms * n_slots``) and which no
    slot reads. ``system_index`` numbers the graphs; floats are cast to
    ``dtype``. The feed also holds ``cell`` ``[n_systems, 3, 3]`` (zeros for
    graphs without one) and the flat edge list (``edge_index``, atom indices
    offset by the atoms of earlier graphs, and ``edge_shift``) that the
    torch_scatter reference takes; runtimes take the inputs they need.
    Positions are moved to each structure's centroid (in float64, before the
    cast): energies, forces and stress do not depend on it, and float32 edge
    vectors then keep their digits wherever the structure sits.
    """
    if not len(graphs):
        raise InvalidGraphError("no graphs to collate: a feed needs at least one structure")
    dtype = np.dtype(dtype)
    natoms = np.array([g.n_atoms for g in graphs], dtype=np.int64)  # [n_systems]
    nedges = np.array([g.n_edges for g in graphs], dtype=np.int64)
    n_atoms, n_edges = int(natoms.sum()), int(nedges.sum())
    atom_offset = np.concatenate([[0], np.cumsum(natoms)[:-1]]).astype(np.int64)
    edge_offset = np.concatenate([[0], np.cumsum(nedges)[:-1]]).astype(np.int64)
    need = max(g.max_degree for g in graphs)
    K = slot_count(need) if n_slots is None else int(n_slots)
    if K < max(need, 1):
        raise ValueError(f"n_slots={K} is fewer than the {max(need, 1)} slots the busiest atom needs")
    edge_index = np.concatenate(
        [g.edge_index.astype(np.int64) + off for g, off in zip(graphs, atom_offset)], axis=1
    )  # [2, n_edges]
    edge_slot = np.concatenate([g.edge_slot for g in graphs]).astype(np.int64)  # [n_edges]
    reverse = np.concatenate(
        [g.edge_reverse.astype(np.int64) + off for g, off in zip(graphs, edge_offset)]
    )  # [n_edges]
    # Each structure about its own centroid, in float64, before any cast:
    # x_j + shift - x_i must not lose digits to where a structure sits.
    positions = np.concatenate([g.positions - g.positions.mean(axis=0) for g in graphs])
    edge_shift = np.concatenate([g.edge_shift for g in graphs]).reshape(-1, 3)
    atomic_numbers = np.concatenate([g.atomic_numbers for g in graphs])
    send, recv = edge_index
    flat = recv * K + edge_slot  # [n_edges] flat slot of each edge

    neighbors = np.repeat(np.arange(n_atoms, dtype=np.int64), K)  # [n_atoms * K], padding: the centre
    neighbors[flat] = send
    shift = np.zeros((n_atoms * K, 3), dtype=dtype)
    shift[flat] = edge_shift
    mask = np.zeros(n_atoms * K, dtype=dtype)
    mask[flat] = 1
    neighbor_reverse = np.arange(n_atoms * K, dtype=np.int64)  # padding: the slot itself
    neighbor_reverse[flat] = flat[reverse]

    # Pairs: an edge and its reverse have one length, so one filter W(|r_ij|).
    # Graph refuses self-loops, the only edges that are their own reverse.
    first = np.flatnonzero(np.arange(n_edges) < reverse)  # [n_edges / 2] each pair's first edge
    real = len(first)
    P = max(real, 1) if n_pairs is None else int(n_pairs)
    if P < max(real, 1):
        raise ValueError(f"n_pairs={P} is fewer than the {max(real, 1)} pairs the graphs need")
    pair_slots = np.full((P, 2), n_atoms * K, dtype=np.int64)  # [n_pairs, 2], spare: "none"
    pair_slots[:real, 0] = flat[first]
    pair_slots[:real, 1] = flat[reverse[first]]
    pair_of_edge = np.empty(n_edges, dtype=np.int64)
    pair_of_edge[first] = np.arange(real)
    pair_of_edge[reverse[first]] = np.arange(real)
    slot_pair = np.full(n_atoms * K, P, dtype=np.int64)  # padding: no pair
    slot_pair[flat] = pair_of_edge
    return {
        "atomic_numbers": atomic_numbers.astype(np.int64),
        "positions": positions.astype(dtype),
        "neighbors": neighbors.reshape(n_atoms, K),
        "neighbor_shift": shift.reshape(n_atoms, K, 3),
        "neighbor_mask": mask.reshape(n_atoms, K),
        "slot_pair": slot_pair.reshape(n_atoms, K),
        "pair_slots": pair_slots,
        "neighbor_reverse": neighbor_reverse.reshape(n_atoms, K),
        "system_index": np.repeat(np.arange(len(graphs), dtype=np.int64), natoms),
        "natoms": natoms,
        "cell": np.array(
            [np.zeros((3, 3)) if g.cell is None else g.cell for g in graphs], dtype=np.float64
        ).reshape(-1, 3, 3),
        "edge_index": edge_index.reshape(2, n_edges),
        "edge_shift": edge_shift.astype(dtype).reshape(n_edges, 3),
    }


def canonical_graph(graph: Graph) -> Graph:
    """``graph`` in the canonical edge order, the one :func:`~painn_export.neighbors.neighbor_graph` writes.

    The first half (the one-sided edges) sorted by ``(receiver i, sender j,
    S)``, the reverses in the same order: what the neighbour kernel and
    :mod:`painn_export.device_graphs` list. The model sums over edges in their
    order, so one order makes a structure's numbers independent of how its
    graph was found (host, device, a Verlet skin; an exact ``--resume``).
    """
    half = graph.n_edges // 2
    index, shift = np.asarray(graph.edge_index), np.asarray(graph.cell_shift)
    order = np.lexsort((shift[:half, 2], shift[:half, 1], shift[:half, 0], index[0, :half], index[1, :half]))
    perm = np.concatenate([order, order + half])
    return Graph(
        atomic_numbers=graph.atomic_numbers,
        positions=graph.positions,
        edge_index=index[:, perm],
        cell_shift=shift[perm],
        edge_shift=np.asarray(graph.edge_shift)[perm],
        cell=graph.cell,
        min_distance=graph.min_distance,
    )
