"""Compiled skin update of many structures at once, for :mod:`painn_export.skin` (numba).

One call takes every structure's kept candidate pairs (the half list of its
last search, within ``cutoff + skin``) and its current positions and cell,
and writes each structure's graph: the squared distances, the cutoff and
minimum-distance filter, upstream's cap and symmetrisation (the same compiled
passes :func:`painn_export._neighbors_kernel.cap_and_symmetrize` runs), the
canonical edge order, and each edge's slot and reverse. Structures are
independent: each one's arithmetic is the same whatever else is in the call.

Imported on the first skin update, not with the package (numba's import
costs about a second; compiled code is cached on disk as in
:mod:`painn_export._neighbors_kernel`).
"""

from __future__ import annotations

import math
import threading

import numpy as np

from painn_export._neighbors_kernel import (
    _BINS,
    _HIST_CELLS,
    _canonical_order,
    _cap,
    _jit,
    _write_edges,
    squared_distances,
)


def skin_graphs(
    positions, cells, atom_start, a, b, S, pair_start, r2, min_d2, k, strict, tie_rtol, tolerance
):
    """The graphs of ``B`` structures from their candidate pairs.

    Args:
        positions: ``[N, 3]`` float64 Å, the structures' atoms one after another.
        cells: ``[B, 3, 3]`` float64 Å, rows are lattice vectors.
        atom_start: ``[B + 1]`` int64, structure ``s``'s atoms are rows
            ``atom_start[s]:atom_start[s + 1]``.
        a, b: ``[P]`` int64 candidate pairs, atom indices within their structure,
            each structure's in the canonical order (:func:`canonical_pairs`).
        S: ``[P, 3]`` int32 image offsets (``x_b + S @ cell - x_a``).
        pair_start: ``[B + 1]`` int64, structure ``s``'s pairs.
        r2: the cutoff squared (Å², inclusive); ``min_d2``: pairs at or below
            it are dropped (Å²).
        k, strict, tie_rtol, tolerance: the cap, as in ``cap_and_symmetrize``.

    Returns ``(edge_index [2, E], cell_shift [E, 3] int64, edge_shift [E, 3]
    float64, edge_slot [E], edge_reverse [E], edge_start [B + 1], closest
    [B])``: structure ``s``'s edges are ``edge_start[s]:edge_start[s + 1]``,
    in the canonical order, with atom, slot and reverse indices within the
    structure; ``closest[s]`` (Å) is its shortest candidate pair, dropped
    pairs included (``inf`` for none).

    Scratch is kept per thread and outputs are allocated here, in numpy:
    numba's own allocations of arrays this size are not reused between calls
    and cost several times the loops' time in page faults.
    """
    n_structures, n_pairs = len(atom_start) - 1, len(a)
    most_atoms = int(np.max(np.diff(atom_start), initial=0))
    d2, ca, cb, cS, cd2, keep, order = _scratch(n_pairs)
    hist, count = _scratch_atoms(most_atoms)
    n_within = np.zeros(n_structures, dtype=np.int64)
    n_kept = np.zeros(n_structures, dtype=np.int64)
    closest = np.full(n_structures, np.inf)
    _within_and_cap(
        positions, cells, atom_start, a, b, S, pair_start, r2, min_d2, k, strict, tie_rtol, tolerance,
        d2, ca, cb, cS, cd2, keep, hist, n_within, n_kept, closest,
    )  # fmt: skip
    edge_start = np.zeros(n_structures + 1, dtype=np.int64)
    np.cumsum(2 * n_kept, out=edge_start[1:])
    n_edges = int(edge_start[-1])
    edge_index = np.empty((2, n_edges), dtype=np.int64)
    cell_shift = np.empty((n_edges, 3), dtype=np.int64)
    edge_shift = np.empty((n_edges, 3), dtype=np.float64)
    edge_slot = np.empty(n_edges, dtype=np.int64)
    edge_reverse = np.empty(n_edges, dtype=np.int64)
    _edges(
        cells, atom_start, pair_start, ca, cb, cS, keep, n_within, n_kept, order, count,
        edge_index, cell_shift, edge_shift, edge_slot, edge_reverse, edge_start,
    )  # fmt: skip
    return edge_index, cell_shift, edge_shift, edge_slot, edge_reverse, edge_start, closest


@_jit
def _within_and_cap(
    positions, cells, atom_start, a, b, S, pair_start, r2, min_d2, k, strict, tie_rtol, tolerance,
    d2, ca, cb, cS, cd2, keep, hist, n_within, n_kept, closest,
):  # fmt: skip
    """Per structure: d², the pairs within the cutoff compacted (in order), the cap's ``keep``, counts."""
    for s in range(atom_start.shape[0] - 1):
        p0, p1 = pair_start[s], pair_start[s + 1]
        x = positions[atom_start[s] : atom_start[s + 1]]
        n_atoms = x.shape[0]
        squared_distances(a[p0:p1], b[p0:p1], S[p0:p1], x, cells[s], d2[p0:p1])
        least = np.inf
        q = p0
        for p in range(p0, p1):
            least = min(least, d2[p])
            if d2[p] <= r2 and d2[p] > min_d2:
                ca[q], cb[q], cd2[q] = a[p], b[p], d2[p]
                cS[q, 0], cS[q, 1], cS[q, 2] = S[p, 0], S[p, 1], S[p, 2]
                q += 1
        closest[s] = math.sqrt(least)
        n_within[s] = q - p0
        keep[p0:q] = True
        if k > 0 and 2 * (q - p0) > k:
            bins = max(8, min(_BINS, _HIST_CELLS // max(n_atoms, 1)))
            h = hist[: n_atoms * bins]
            h[:] = 0
            _cap(
                ca[p0:q],
                cb[p0:q],
                cS[p0:q],
                cd2[p0:q],
                n_atoms,
                k,
                strict,
                tie_rtol,
                tolerance,
                keep[p0:q],
                h,
                bins,
            )
        kept = 0
        for p in range(p0, q):
            if keep[p]:
                kept += 1
        n_kept[s] = kept


@_jit
def _edges(
    cells, atom_start, pair_start, ca, cb, cS, keep, n_within, n_kept, order, count,
    edge_index, cell_shift, edge_shift, edge_slot, edge_reverse, edge_start,
):  # fmt: skip
    """Per structure: the kept pairs as edges (already in the canonical order), slots and reverses."""
    for s in range(atom_start.shape[0] - 1):
        p0, q = pair_start[s], pair_start[s] + n_within[s]
        e0, e1 = edge_start[s], edge_start[s + 1]
        half = n_kept[s]
        t = 0
        for p in range(p0, q):
            if keep[p]:
                order[t] = p - p0
                t += 1
        _write_edges(
            ca[p0:q], cb[p0:q], cS[p0:q], order[:half], cells[s],
            edge_index[:, e0:e1], cell_shift[e0:e1], edge_shift[e0:e1],
        )  # fmt: skip
        # Each edge's rank among its receiver's edges, in edge order; its reverse is e ± half.
        c = count[: atom_start[s + 1] - atom_start[s]]
        c[:] = 0
        for e in range(e0, e1):
            r = edge_index[1, e]
            edge_slot[e] = c[r]
            c[r] += 1
            local = e - e0
            edge_reverse[e] = local + half if local < half else local - half


_local = threading.local()


def _scratch(n_pairs: int):
    """This thread's per-pair scratch ``(d2, ca, cb, cS, cd2, keep, order)``, grown, never shrunk."""
    held = getattr(_local, "pairs", None)
    if held is None or held[0].size < n_pairs:
        size = max(n_pairs + n_pairs // 4, 1024)
        held = _local.pairs = (
            np.empty(size, dtype=np.float64),
            np.empty(size, dtype=np.int64),
            np.empty(size, dtype=np.int64),
            np.empty((size, 3), dtype=np.int32),
            np.empty(size, dtype=np.float64),
            np.empty(size, dtype=np.bool_),
            np.empty(size, dtype=np.int64),
        )
    return tuple(x[:n_pairs] for x in held)


def _scratch_atoms(n_atoms: int):
    """This thread's ``(hist [n_atoms * bins] int32, count [n_atoms] int64)`` scratch."""
    held = getattr(_local, "atoms", None)
    if held is None or held[1].size < n_atoms:
        size = max(n_atoms + n_atoms // 4, 256)
        held = _local.atoms = (np.empty(size * _BINS, dtype=np.int32), np.empty(size, dtype=np.int64))
    return held


def canonical_pairs(a, b, S, n_atoms: int):
    """``[P]`` the order that sorts half-list pairs as the edges they become: by (receiver, sender, S).

    The receiver is the side upstream's symmetrisation keeps; sorted once per
    search, the pairs that pass the cutoff and the cap at any later step are
    then already in the canonical edge order.
    """
    n_pairs = a.shape[0]
    keep = np.ones(n_pairs, dtype=np.bool_)
    order, key = np.empty(n_pairs, dtype=np.int64), np.empty(n_pairs, dtype=np.int64)
    _canonical_order(a, b, S, keep, np.zeros(n_atoms + 1, dtype=np.int64), order, key)
    return order
