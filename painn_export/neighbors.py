"""Periodic neighbour graphs with upstream OCP PaiNN semantics, built off the model's path.

Upstream PaiNN builds its graph in ``forward`` with ``radius_graph_pbc``, caps
it per centre atom, then ``symmetrize_edges``. :func:`neighbor_graph`
reproduces that graph for one structure:

1. **Radius graph** (``radius_graph_pbc``): every pair ``(i, j, S)`` with
   ``d² = |x_j + S @ cell - x_i|² <= cutoff²`` (inclusive) and ``d² > 1e-4``
   Å² (drops self-pairs and coincident atoms), over every periodic image that
   can be within the cutoff, never shifting along a non-periodic axis. The
   pairs come from vesin's half list (each pair once), asked for a slightly
   larger radius; ``d²`` is computed here in float64, in one fixed order of
   operations, and both bounds are applied to that value.
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

Output edges are in the canonical order: the kept one-sided pairs sorted by
``(receiver i, sender j, S)``, then their reverses in the same order. The
model sums over slots and pairs in edge order, so the order decides the last
bits of its outputs; this one is also the order
:mod:`painn_export.device_graphs` builds on a device, which makes the two
paths' feeds, hence outputs, bitwise equal (earlier versions listed them in
vesin's search order: the same edges, outputs differing in the last bits).

The two-pass build (a small radius first, the full cutoff only when some
centre has too few neighbours there) returns the identical graph; it only
avoids enumerating pairs the cap would discard anyway.

How: steps 2 and 3 run as a few compiled passes over the half list
(:mod:`painn_export._neighbors_kernel`, numba), without grouping pairs by
centre: each capped centre's k-th and (k+1)-th nearest are read from a small
histogram of its d², and the (d², j, S) order is applied only to the tie group
a cap cuts through. Vectorised numpy needed about ten full-size temporaries
for the same work and cost 2-4x vesin's own search at 6 Å
(docs/benchmarks.md).
"""

from __future__ import annotations

import math
import threading
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
# A skin list's search (painn_export.skin) pairs every atom with every image it can reach, compiled,
# up to this many atoms; larger structures use vesin. With the canonical sort it saves, against vesin's
# search and canonical_pairs: 4-8x up to about 100 atoms, 1.3x at 400 and none at 720 (7 Å); 5-7x at
# 13 Å up to 720 (rattled fcc Cu; docs/benchmarks.md).
IMAGE_SEARCH_ATOMS = 384


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
        periodic = cell[pbc]  # [n_periodic, 3]: only these need to be lattice vectors
        if not np.isfinite(periodic).all():
            raise StructureError("bad_cell", "a periodic lattice vector contains NaN or inf")
        # The periodic vectors must be independent: their Gram determinant is
        # the squared volume (area, length) they span.
        norms = np.linalg.norm(periodic, axis=1)
        span_sq = np.linalg.det(periodic @ periodic.T)
        if (norms == 0).any() or span_sq <= (1e-9 * float(np.prod(norms))) ** 2:
            raise StructureError(
                "bad_cell",
                f"periodic lattice vectors {np.flatnonzero(pbc).tolist()} are zero or not independent",
            )
    # A non-periodic axis is never shifted along: its vector does not enter the
    # graph. One that is not finite is dropped (zero), so that it cannot reach
    # a distance through 0 * NaN; the cell then has no volume (no stress).
    if not np.isfinite(cell).all():
        cell = cell.copy()
        cell[~np.isfinite(cell).all(axis=1)] = 0.0  # only non-periodic rows reach here
    return positions, cell, pbc


def _search(
    positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, radius: float, min_d2: float = MIN_DISTANCE_SQ
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """Each pair with ``min_d2 < d² <= radius²`` once: ``(a, b, S, d², closest)``.

    ``min_d2`` (Å²) is :data:`MIN_DISTANCE_SQ` for a graph; a skin list keeps
    coincident atoms too (``min_d2 < 0``), which may move apart before its next search.

    ``closest`` (Å) is the shortest distance of *every* pair found, those the
    graph drops included (coincident atoms, ``d² <= MIN_DISTANCE_SQ``), and an
    atom's own periodic images: what a too-close check must read. ``inf``
    when there is no pair.

    vesin's half list: ``a``, ``b`` int64 ``[P]``, ``S`` int32 ``[P, 3]`` with
    ``d² = |x_b + S @ cell - x_a|²`` (float64, Å²); the reverse ``(b, a, -S)``
    is implied. A self-image pair ``(a, a, S)`` appears once for ``±S``.
    ``d²`` is computed here from the positions (:func:`_distance_sq`, the one
    definition every bound is applied to), not taken from vesin, so the
    inclusive cutoff does not depend on vesin's rounding.

    ``a``, ``b`` and ``S`` may be views into this thread's vesin buffers,
    valid until its next search: copy what must outlive that.
    """
    nl = _half_list(radius * (1 + _CANDIDATE_SKIN) + _CANDIDATE_SKIN)
    box = cell if pbc.any() else np.zeros((3, 3))
    P, S = nl.compute(positions, box, pbc.tolist(), quantities="PS", copy=False)
    P = P.view(np.int64)  # size_t indices, always < 2**63
    a, b = P[:, 0], P[:, 1]
    if not pbc.all() and S.size and S[:, ~pbc].any():  # vesin never shifts there; make sure
        S = S.copy()
        S[:, ~pbc] = 0
    d2 = _distance_sq(positions, cell, a, b, S)
    closest = math.sqrt(float(d2.min())) if d2.size else math.inf
    keep = (d2 <= radius * radius) & (d2 > min_d2)
    if not keep.all():
        a, b, S, d2 = a[keep], b[keep], S[keep], d2[keep]
    return a, b, S, d2, closest


def _image_search(
    positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, radius: float, min_d2: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Each pair with ``min_d2 < d² <= radius²`` once, as ``(a, b, S)``: :func:`_search`'s half list, in
    the canonical order (:func:`~painn_export._neighbors_kernel.canonical_pairs`' order), in new arrays.

    Every atom pair is tried against every periodic image that can be within
    ``radius`` (:func:`~painn_export._neighbors_kernel.image_pairs`): O(n²)
    pairs, for small structures. None, nothing searched, for more than
    :data:`IMAGE_SEARCH_ATOMS` atoms, or image offsets beyond int32 (a cell
    so nearly flat, or atoms so far outside it, that either search would
    take hours). The set is :func:`_search`'s, decided on the same ``d²``;
    each pair is written with its receiver as ``b`` (vesin may write either
    end first: the edges are the same). ``positions``, ``cell``, ``pbc`` as
    :func:`validate_structure` gives them (periodic vectors independent).
    """
    from painn_export._neighbors_kernel import image_pairs

    n_atoms = len(positions)
    if n_atoms > IMAGE_SEARCH_ATOMS:
        return None
    dual = np.zeros((3, 3))  # [3, 3] rows: each periodic vector's dual within their span, else zero
    periodic = cell[pbc]
    if len(periodic):
        dual[pbc] = np.linalg.pinv(periodic).T  # (P Pᵀ)⁻¹ P, without squaring P's condition number
    # |v . dual[x]| <= |v| |dual[x]|: no image farther along x is within radius (with a margin for rounding).
    reach = np.where(
        pbc, radius * np.linalg.norm(dual, axis=1) * (1 + _CANDIDATE_SKIN) + _CANDIDATE_SKIN, 0.0
    )
    fractional = positions @ dual.T  # [n, 3]: an image offset is at most their spread plus the reach
    if n_atoms and (np.ptp(fractional, axis=0) + reach).max() >= np.iinfo(np.int32).max:
        return None
    a, b, S = _image_scratch(max(64, 48 * n_atoms))
    n = image_pairs(positions, cell, dual, reach, radius * radius, min_d2, a, b, S)
    if n > len(a):  # more than the scratch holds: once more with room for them
        a, b, S = _image_scratch(n)
        n = image_pairs(positions, cell, dual, reach, radius * radius, min_d2, a, b, S)
    return a[:n].copy(), b[:n].copy(), S[:n].copy()


_local = threading.local()


def _image_scratch(n_pairs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """This thread's ``(a [n] int64, b [n] int64, S [n, 3] int32)`` scratch, at least ``n_pairs`` long."""
    held = getattr(_local, "image_pairs", None)
    if held is None or len(held[0]) < n_pairs:
        size = n_pairs + n_pairs // 4
        held = _local.image_pairs = (
            np.empty(size, np.int64),
            np.empty(size, np.int64),
            np.empty((size, 3), np.int32),
        )
    return held


def _half_list(cutoff: float):
    """This thread's vesin half neighbour list, set to ``cutoff`` (reused: vesin keeps its buffers)."""
    nl = getattr(_local, "half_list", None)
    if nl is None:
        from vesin import NeighborList

        nl = _local.half_list = NeighborList(cutoff=cutoff, full_list=False)
    nl.cutoff = float(cutoff)  # read by every compute() (vesin 0.6)
    return nl


def _distance_sq(positions, cell, a, b, S) -> np.ndarray:
    """``|(x_b - x_a) + S @ cell|²`` ``[P]`` float64, Å²: the definition every bound is applied to."""
    from painn_export._neighbors_kernel import squared_distances

    d2 = np.empty(a.shape[0], dtype=np.float64)
    squared_distances(a, b, S, positions, cell, d2)
    return d2


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

    pairs, r2 = None, cutoff * cutoff
    radius = _density_radius(n, cell, pbc, max_neighbors) if (two_pass and max_neighbors > 0) else None
    if radius is not None:
        # A centre with > k pairs within r0 has its k nearest (and, non-strict,
        # everything within sqrt(d²_(k+1) + tol)) inside r1: it is decided.
        r0 = radius
        r1 = r0 if strict else math.sqrt(r0 * r0 + DEGENERACY_TOLERANCE)
        if r1 < cutoff:
            cand = _search(positions, cell, pbc, r1)
            a, b, _, d2, _ = cand
            within = d2 <= r0 * r0
            counts = np.bincount(a[within], minlength=n) + np.bincount(b[within], minlength=n)
            if n and counts.min() > max_neighbors:
                pairs, r2 = cand, r1 * r1
    if pairs is None:
        pairs = _search(positions, cell, pbc, cutoff)

    return _graph_from_pairs(z, positions, cell, *pairs, max_neighbors, strict, r2)


def _graph_from_pairs(
    z,
    positions,
    cell,
    a,
    b,
    S,
    d2,
    closest: float,
    max_neighbors: int,
    strict: bool,
    r2: float,
) -> Graph:
    """Cap and symmetrise the half-list pairs ``(a, b, S, d²)`` (all ``d² <= r2``) into a Graph."""
    from painn_export._neighbors_kernel import cap_and_symmetrize

    n = positions.shape[0]
    edge_index, cell_shift, edge_shift = cap_and_symmetrize(
        a, b, S, d2, n, max_neighbors, strict, TIE_RTOL, DEGENERACY_TOLERANCE, cell
    )
    edges = {"edge_index": edge_index, "cell_shift": cell_shift, "edge_shift": edge_shift}
    return Graph(atomic_numbers=z, positions=positions, cell=cell, min_distance=closest, **edges)
