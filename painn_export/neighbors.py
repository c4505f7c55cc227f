"""Periodic neighbour graphs with upstream OCP PaiNN semantics, built off the model's path.

Upstream PaiNN builds its graph in ``forward`` with ``radius_graph_pbc``, caps
it per centre atom, then ``symmetrize_edges``. :func:`neighbor_graph`
reproduces that graph for one structure:

1. **Radius graph** (``radius_graph_pbc``): every pair ``(i, j, S)`` with
   ``d² = |x_j + S @ cell - x_i|² <= cutoff²`` (inclusive) and ``d² > 1e-4``
   Å² (drops self-pairs and coincident atoms), over every periodic image that
   can be within the cutoff, never shifting along a non-periodic axis. The
   candidate pairs come from vesin's cell list; ``d²`` is recomputed here in
   float64 and the bounds applied exactly as above.
2. **Per-centre cap** (``get_max_neighbors_mask``), for centres with more
   than ``max_neighbors`` pairs, in one of upstream's two modes:

   - ``strict=True`` (what upstream PaiNN uses: it never sets
     ``enforce_max_neighbors_strictly``, so fairchem's ``generate_graph``
     defaults it to True): the ``max_neighbors`` nearest. Upstream breaks
     ties with an unstable sort, so its choice depends on input order;
     **ours** sorts by ``(d², j, S)`` lexicographically, i.e. among equally
     distant neighbours (``d²`` equal to ``TIE_RTOL`` relative, so that a tie
     survives rotation) the lower atom index, then the lexicographically
     smaller image offset, wins.
   - ``strict=False`` (``radius_graph_pbc``'s own default): every pair with
     ``d² <= d²_(k+1) + 0.01`` Å², pivoting on the (k+1)-th nearest squared
     distance; set-valued, so order cannot matter.
3. **Symmetrisation** (``symmetrize_edges`` with
   ``symmetric_edge_symmetrization=False``): keep the pairs whose neighbour
   index is lower than the centre's (``j < i``), and the self-image pairs
   ``j == i`` whose offset ``S`` is lexicographically negative; then add the
   reverse ``(i, j, -S)`` of each kept pair. A pair kept by the cap only from
   the higher-index side is therefore dropped in both directions.

Output edges are the kept one-sided pairs in neighbour-search order, then
their reverses: deterministic for a given input, not sorted (the model does
not care, and sorting was the slowest step). The two-pass build (a small radius
first, the full cutoff only when some centre has too few neighbours there)
returns the identical graph; it only avoids enumerating pairs the cap would
discard anyway.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from painn_export.batch import Graph

# Pairs this close (Å², inclusive) are dropped, as upstream's radius graph does.
MIN_DISTANCE_SQ = 1.0e-4
# Relative difference of squared distances below which our strict cap treats
# two neighbours as equally far (then the lower j, then the smaller S, wins).
TIE_RTOL = 1.0e-9
# Tie tolerance of upstream's non-strict cap (Å², on squared distances).
DEGENERACY_TOLERANCE = 0.01
# vesin excludes d == cutoff; it is asked for a little more and we filter.
_CANDIDATE_SKIN = 1.0e-6
# The first pass aims for this many candidates per centre, relative to k + 1.
_FIRST_PASS_MARGIN = 1.6


class StructureError(ValueError):
    """A structure that cannot be turned into a graph; ``kind`` says why."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def validate_structure(
    positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Float64 ``[n, 3]`` positions, ``[3, 3]`` cell and bool ``[3]`` pbc, or StructureError."""
    positions = np.asarray(positions, dtype=np.float64)
    cell = np.asarray(cell, dtype=np.float64)
    pbc = np.asarray(pbc, dtype=bool)
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise StructureError("bad_shape", f"positions must be [n_atoms, 3], got {positions.shape}")
    if cell.shape != (3, 3):
        raise StructureError("bad_shape", f"cell must be [3, 3] (rows are lattice vectors), got {cell.shape}")
    if pbc.shape != (3,):
        raise StructureError("bad_shape", f"pbc must be 3 booleans, got shape {pbc.shape}")
    if not np.isfinite(positions).all():
        raise StructureError("nonfinite_positions", "positions contain NaN or inf")
    if pbc.any():
        if not np.isfinite(cell).all():
            raise StructureError("bad_cell", "cell contains NaN or inf")
        # Each periodic lattice vector must stick out of the plane of the other two.
        volume = abs(np.linalg.det(cell))
        norms = np.linalg.norm(cell, axis=1)
        if volume <= 1e-9 * max(float(np.prod(norms)), 1e-300) or (norms[pbc] == 0).any():
            raise StructureError(
                "bad_cell", f"periodic structure with a singular cell (volume {volume:.3g} Å³)"
            )
    return positions, cell, pbc


def _candidates(
    positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, radius: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """All pairs with ``MIN_DISTANCE_SQ < d² <= radius²``: (i, j, S, d²), float64 d²."""
    from vesin import NeighborList

    box = cell if pbc.any() else np.zeros((3, 3))
    nl = NeighborList(cutoff=radius * (1 + _CANDIDATE_SKIN) + _CANDIDATE_SKIN, full_list=True)
    i, j, S = nl.compute(positions, box, pbc.tolist(), quantities="ijS", copy=True)
    i = i.astype(np.int64)
    j = j.astype(np.int64)
    S = S.astype(np.int64).reshape(-1, 3)
    S[:, ~pbc] = 0  # never shift along a non-periodic axis (vesin gives 0 there too)
    vec = positions[j] - positions[i] + S @ cell
    d2 = np.einsum("ij,ij->i", vec, vec)
    keep = (d2 <= radius * radius) & (d2 > MIN_DISTANCE_SQ)
    return i[keep], j[keep], S[keep], d2[keep]


def _cap(
    i: np.ndarray, j: np.ndarray, S: np.ndarray, d2: np.ndarray, n_atoms: int, k: int, strict: bool
) -> np.ndarray:
    """Indices of the pairs kept by the per-centre cap (in no particular order).

    Vectorised: the centres with more than ``k`` pairs get their squared
    distances in one padded ``[centres, max_count]`` matrix, and a row-wise
    partition finds each one's k-th and (k+1)-th nearest. A centre whose k-th
    and (k+1)-th nearest are further apart than ``TIE_RTOL`` keeps exactly its
    pairs up to the k-th; a centre with a tie across that boundary goes
    through :func:`_cap_exact`, the (d², j, S) ordering.
    """
    counts = np.bincount(i, minlength=n_atoms)
    if k <= 0 or counts.max(initial=0) <= k:
        return np.arange(i.size)
    if i.size > 1 and np.any(i[1:] < i[:-1]):  # vesin groups pairs by centre; make sure
        order = np.argsort(i, kind="stable")
        return order[_cap(i[order], j[order], S[order], d2[order], n_atoms, k, strict)]
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    over = np.flatnonzero(counts > k)  # centres to cap
    width = int(counts[over].max())
    # Padded matrix of the capped centres' pair indices and squared distances.
    col = np.arange(width)
    valid = col[None, :] < counts[over][:, None]  # [n_over, width]
    pair = np.where(valid, start[over][:, None] + col[None, :], 0)
    dmat = np.where(valid, d2[pair], np.inf)
    part = np.partition(dmat, (k - 1, k), axis=1)
    d_k, d_k1 = part[:, k - 1], part[:, k]  # k-th and (k+1)-th nearest, squared
    if strict:
        clear = d_k1 - d_k > TIE_RTOL * d_k1
        keep_mat = valid & (dmat <= d_k[:, None]) & clear[:, None]
    else:
        clear = np.ones(over.size, dtype=bool)
        keep_mat = valid & (dmat <= d_k1[:, None] + DEGENERACY_TOLERANCE)
    keep = np.ones(i.size, dtype=bool)
    keep[pair[valid]] = False  # capped centres keep only what the matrix says
    keep[pair[keep_mat]] = True
    if not clear.all():
        tied = np.isin(i, over[~clear])
        idx = np.flatnonzero(tied)
        keep[idx] = False
        keep[idx[_cap_exact(i[idx], j[idx], S[idx], d2[idx], n_atoms, k)]] = True
    return np.flatnonzero(keep)


def _cap_exact(
    i: np.ndarray, j: np.ndarray, S: np.ndarray, d2: np.ndarray, n_atoms: int, k: int
) -> np.ndarray:
    """Strict cap by sorting (i, d², j, S), squared distances within ``TIE_RTOL`` counting as equal."""
    counts = np.bincount(i, minlength=n_atoms)
    order = np.lexsort((d2, i))
    d2_sorted, i_sorted = d2[order], i[order]
    new_group = np.ones(order.size, dtype=bool)
    new_group[1:] = (i_sorted[1:] != i_sorted[:-1]) | (
        d2_sorted[1:] - d2_sorted[:-1] > TIE_RTOL * d2_sorted[1:]
    )
    group = np.cumsum(new_group)  # increasing along (i, d²): ties share a group
    tie_order = np.lexsort((S[order, 2], S[order, 1], S[order, 0], j[order], group))
    order = order[tie_order]
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(order.size) - np.repeat(start, counts)  # rank within centre
    return order[(rank < k) | (counts[i[order]] <= k)]


def _symmetrize(i: np.ndarray, j: np.ndarray, S: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Upstream's one-sided symmetrisation: the kept one-sided pairs, then their reverses."""
    s_negative = (S[:, 0] < 0) | ((S[:, 0] == 0) & ((S[:, 1] < 0) | ((S[:, 1] == 0) & (S[:, 2] < 0))))
    mask = (j < i) | ((j == i) & s_negative)
    i, j, S = i[mask], j[mask], S[mask]
    return np.concatenate([i, j]), np.concatenate([j, i]), np.concatenate([S, -S])


def _density_radius(n_atoms: int, cell: np.ndarray, pbc: np.ndarray, k: int) -> float | None:
    """Radius expected to hold ``_FIRST_PASS_MARGIN * (k + 1)`` neighbours (bulk estimate)."""
    if not pbc.all() or n_atoms == 0:
        return None
    density = n_atoms / abs(np.linalg.det(cell))
    want = _FIRST_PASS_MARGIN * (k + 1) + 4
    return (3 * want / (4 * math.pi * density)) ** (1 / 3)


def neighbor_graph(
    positions: np.ndarray,
    cell: np.ndarray,
    pbc: Sequence[bool] | np.ndarray,
    cutoff: float,
    max_neighbors: int,
    *,
    atomic_numbers: np.ndarray | None = None,
    strict: bool = True,
    two_pass: bool = True,
) -> Graph:
    """The graph upstream PaiNN would build for one structure.

    Args:
        positions: ``[n_atoms, 3]`` Å, wrapped or not.
        cell: ``[3, 3]`` Å, rows are lattice vectors (may be zero when no pbc).
        pbc: ``[3]`` bool, periodicity along each lattice vector.
        cutoff: Å, inclusive.
        max_neighbors: per-centre cap (``<= 0``: no cap).
        atomic_numbers: ``[n_atoms]``, carried into the graph (zeros if None).
        strict: upstream's ``enforce_max_neighbors_strictly`` (see module doc).
        two_pass: try a smaller radius first (same result, faster at large cutoffs).

    Raises StructureError for NaN positions, bad shapes, or a singular periodic cell.
    """
    positions, cell, pbc = validate_structure(positions, cell, pbc)
    n = positions.shape[0]
    z = np.zeros(n, dtype=np.int64) if atomic_numbers is None else np.asarray(atomic_numbers, np.int64)
    if z.shape != (n,):
        raise StructureError("bad_shape", f"atomic_numbers must be [{n}], got {z.shape}")

    pairs = None
    radius = _density_radius(n, cell, pbc, max_neighbors) if (two_pass and max_neighbors > 0) else None
    if radius is not None:
        # A centre with > k pairs within r0 has its k nearest (and, non-strict,
        # everything within sqrt(d²_(k+1) + tol)) inside r1: it is decided.
        r0 = radius
        r1 = r0 if strict else math.sqrt(r0 * r0 + DEGENERACY_TOLERANCE)
        if r1 < cutoff:
            cand = _candidates(positions, cell, pbc, r1)
            within_r0 = cand[3] <= r0 * r0
            counts = np.bincount(cand[0][within_r0], minlength=n)
            if n and counts.min() > max_neighbors:
                pairs = cand
    if pairs is None:
        pairs = _candidates(positions, cell, pbc, cutoff)

    return _graph_from_pairs(z, positions, cell, *pairs, max_neighbors, strict)


def _graph_from_pairs(z, positions, cell, i, j, S, d2, max_neighbors: int, strict: bool) -> Graph:
    """Cap and symmetrise the radius-graph pairs ``(i, j, S, d²)`` into a Graph."""
    kept = _cap(i, j, S, d2, positions.shape[0], max_neighbors, strict)
    i, j, S = _symmetrize(i[kept], j[kept], S[kept])
    edge_index = np.stack([j, i]).astype(np.int64)  # [2, n_edges], (sender j, receiver i)
    return Graph(
        atomic_numbers=z,
        positions=positions,
        edge_index=edge_index,
        cell_shift=S,
        edge_shift=S.astype(np.float64) @ cell,
        cell=cell,
    )


class SkinGraph:
    """The graph of a moving structure (MD, relaxation), searched again only when needed.

    Pairs within ``cutoff + skin`` are kept from the last search; each
    :meth:`update` recomputes their distances at the new positions and
    applies the cutoff, the cap and the symmetrisation, which gives exactly
    :func:`neighbor_graph`'s graph as long as no atom has moved more than
    ``skin / 2`` since the search (then no pair outside the list can be
    within the cutoff). A new search happens when an atom has moved further,
    or when the cell, pbc or atoms change. Positions must not be re-wrapped
    into the cell between searches (ASE's dynamics do not wrap).
    """

    def __init__(self, cutoff: float, max_neighbors: int, skin: float = 0.5, strict: bool = True) -> None:
        if skin < 0:
            raise ValueError(f"skin must be >= 0 Å, got {skin}")
        self.cutoff, self.max_neighbors, self.skin, self.strict = cutoff, max_neighbors, skin, strict
        self.n_searches = 0
        self._key = None
        self._ref_positions = None
        self._pairs = None

    def update(self, atomic_numbers, positions, cell, pbc) -> Graph:
        positions, cell, pbc = validate_structure(positions, cell, pbc)
        z = np.asarray(atomic_numbers, dtype=np.int64)
        key = (z.tobytes(), cell.tobytes(), pbc.tobytes())
        moved = (
            np.inf
            if self._ref_positions is None or key != self._key
            else np.sqrt(np.max(np.sum((positions - self._ref_positions) ** 2, axis=1), initial=0.0))
        )
        if moved > self.skin / 2:
            i, j, S, _ = _candidates(positions, cell, pbc, self.cutoff + self.skin)
            self._pairs, self._key, self._ref_positions = (i, j, S), key, positions.copy()
            self.n_searches += 1
        i, j, S = self._pairs
        vec = positions[j] - positions[i] + S @ cell
        d2 = np.einsum("ij,ij->i", vec, vec)
        keep = (d2 <= self.cutoff * self.cutoff) & (d2 > MIN_DISTANCE_SQ)
        return _graph_from_pairs(
            z, positions, cell, i[keep], j[keep], S[keep], d2[keep], self.max_neighbors, self.strict
        )
