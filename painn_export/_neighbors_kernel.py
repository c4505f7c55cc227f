"""Compiled per-centre cap and symmetrisation for :mod:`painn_export.neighbors` (numba).

Imported on the first graph, not with the package: numba's import and the
first compilation (cached on disk afterwards) cost about a second once per
process. The semantics are those documented in :mod:`painn_export.neighbors`;
this module only does them in one pass over the half list, without the
temporaries a numpy formulation needs (which cost more than the neighbour
search itself at 6 Å).

Half-list convention: pair ``p`` is ``(a[p], b[p], S[p])`` with squared
distance ``d2[p]``, standing for the two entries "centre a, neighbour b,
shift S" and "centre b, neighbour a, shift -S". A self-image pair
(``a == b``) gives its centre both entries.
"""

from __future__ import annotations

import numba
import numpy as np

_JIT = {"nogil": True, "cache": True}


@numba.njit(**_JIT)
def _kept_side_is_b(a: int, b: int, s0: int, s1: int, s2: int) -> bool:
    """True where upstream's symmetrisation keeps the entry of centre ``b`` (``max(a, b)``).

    It keeps ``(i, j, S)`` with ``j < i``, or ``j == i`` and ``S`` lexicographically
    negative; for a self-image pair the b-side entry has shift ``-S``.
    """
    if b != a:
        return b > a
    return s0 > 0 or (s0 == 0 and (s1 > 0 or (s1 == 0 and s2 > 0)))


@numba.njit(**_JIT)
def _lex_less(j1: int, s1, j2: int, s2) -> bool:
    """(j1, S1) < (j2, S2) lexicographically: our tie-break among equal distances."""
    if j1 != j2:
        return j1 < j2
    for x in range(3):
        if s1[x] != s2[x]:
            return s1[x] < s2[x]
    return False


_BINS = 64  # d² bins per centre when looking for its k-th nearest


@numba.njit(**_JIT)
def _kth_pair(dist, m: int, k: int, r2: float, hist, buf):
    """The k-th and (k+1)-th smallest of ``dist[:m]`` (all in ``[0, r2]``), exactly.

    A 64-bin histogram of the centre's d² says which bins hold ranks k-1 and
    k; only those bins' values are sorted (insertion sort: a handful). About
    three passes over the centre's entries, without the mispredicted
    branches of a quickselect.
    """
    scale = _BINS * (1.0 - 1e-9) / r2
    hist[:] = 0
    for e in range(m):
        hist[int(dist[e] * scale)] += 1
    below = 0  # entries in bins before lo
    lo = 0
    while below + hist[lo] < k:  # bin of rank k - 1
        below += hist[lo]
        lo += 1
    hi = lo
    upto = below + hist[lo]
    while upto < k + 1:  # bin of rank k
        hi += 1
        upto += hist[hi]
    n = 0
    for e in range(m):
        bin_ = int(dist[e] * scale)
        if lo <= bin_ <= hi:
            x = dist[e]
            t = n
            while t > 0 and buf[t - 1] > x:
                buf[t] = buf[t - 1]
                t -= 1
            buf[t] = x
            n += 1
    return buf[k - 1 - below], buf[k - below]


@numba.njit(**_JIT)
def _strict_tied(dist, m: int, k: int, tie_rtol: float, entry_pair, entry_side, lo: int, a, b, S, inside):
    """Strict cap of one centre whose k-th and (k+1)-th nearest are tied: sets ``inside[:m]``.

    Sorted by d², a chain of gaps within ``tie_rtol`` is one tie group; the
    entries before the k-th's group are kept, and of the group the smallest by
    (j, S) up to k in all (selection sort: groups are small).
    """
    order = np.argsort(dist[:m])
    g0 = k - 1
    while g0 > 0 and dist[order[g0]] - dist[order[g0 - 1]] <= tie_rtol * dist[order[g0]]:
        g0 -= 1
    g1 = k - 1
    while g1 + 1 < m and dist[order[g1 + 1]] - dist[order[g1]] <= tie_rtol * dist[order[g1 + 1]]:
        g1 += 1
    for e in range(m):
        inside[e] = False
    for r in range(g0):
        inside[order[r]] = True
    group = order[g0 : g1 + 1].copy()
    nbr = np.empty(group.size, dtype=np.int64)
    shift = np.empty((group.size, 3), dtype=np.int64)
    for t in range(group.size):
        p = entry_pair[lo + group[t]]
        sign = 1 if entry_side[lo + group[t]] & 1 == 0 else -1
        nbr[t] = b[p] if sign == 1 else a[p]
        for x in range(3):
            shift[t, x] = sign * S[p, x]
    for t in range(k - g0):
        best = t
        for u in range(t + 1, group.size):
            if _lex_less(nbr[u], shift[u], nbr[best], shift[best]):
                best = u
        group[t], group[best] = group[best], group[t]
        nbr[t], nbr[best] = nbr[best], nbr[t]
        for x in range(3):
            shift[t, x], shift[best, x] = shift[best, x], shift[t, x]
        inside[group[t]] = True


def cap_and_symmetrize(
    a, b, S, d2, n_atoms: int, k: int, strict: bool, tie_rtol: float, tolerance: float, cell
):
    """The symmetrised, capped graph of one structure.

    Args:
        a, b: ``[P]`` int64 atom indices of the half list.
        S: ``[P, 3]`` int32 image offsets (``x_b + S @ cell - x_a``).
        d2: ``[P]`` float64 squared distances, Å².
        n_atoms: atoms of the structure.
        k: per-centre cap (``<= 0``: none).
        strict: strict top-k with the (d², j, S) tie-break, else upstream's
            tolerance mode (``d² <= d²_(k+1) + tolerance``).
        tie_rtol: relative difference of d² below which two entries are tied.
        cell: ``[3, 3]`` float64 Å, rows are lattice vectors.

    Returns ``edge_index [2, E]`` int64 (sender, receiver), ``cell_shift
    [E, 3]`` int64 and ``edge_shift [E, 3]`` float64 Å: the kept one-sided
    edges, then their reverses.

    Large arrays are allocated here, in numpy, and filled by the compiled
    loops: numba's own allocations of them are not reused between calls and
    cost page faults several times the loops' time.
    """
    n_pairs = a.shape[0]
    keep = np.ones(n_pairs, dtype=np.bool_)
    if k > 0 and 2 * n_pairs > k:
        _cap(
            a,
            b,
            S,
            d2,
            n_atoms,
            k,
            strict,
            tie_rtol,
            tolerance,
            keep,
            np.empty(2 * n_pairs, dtype=np.int64),
            np.empty(2 * n_pairs, dtype=np.int8),
            np.empty(2 * n_pairs, dtype=np.float64),
        )
    n_kept = int(np.count_nonzero(keep))
    edge_index = np.empty((2, 2 * n_kept), dtype=np.int64)
    cell_shift = np.empty((2 * n_kept, 3), dtype=np.int64)
    edge_shift = np.empty((2 * n_kept, 3), dtype=np.float64)
    _write_edges(a, b, S, keep, cell, edge_index, cell_shift, edge_shift)
    return edge_index, cell_shift, edge_shift


@numba.njit(**_JIT)
def _cap(a, b, S, d2, n_atoms, k, strict, tie_rtol, tolerance, keep, entry_pair, entry_side, entry_d2):
    """Clear ``keep[p]`` for the pairs the cap removes from the side symmetrisation keeps.

    ``entry_pair``, ``entry_side`` and ``entry_d2`` (``[2P]`` scratch) receive
    the entries of the capped centres grouped by centre (counting sort): pair
    index, side and squared distance.
    """
    n_pairs = a.shape[0]
    counts = np.zeros(n_atoms, dtype=np.int64)
    r2 = 0.0  # largest d², the histograms' range
    for p in range(n_pairs):
        counts[a[p]] += 1
        counts[b[p]] += 1
        r2 = max(r2, d2[p])
    width = 0
    for c in range(n_atoms):
        width = max(width, counts[c])
    if width <= k:
        return
    start = np.zeros(n_atoms + 1, dtype=np.int64)
    for c in range(n_atoms):
        start[c + 1] = start[c] + (counts[c] if counts[c] > k else 0)
    fill = start[:-1].copy()
    for p in range(n_pairs):
        kept_b = _kept_side_is_b(a[p], b[p], S[p, 0], S[p, 1], S[p, 2])
        for side in range(2):
            c = a[p] if side == 0 else b[p]
            if counts[c] > k:
                entry_pair[fill[c]] = p
                # bit 0: the b-side entry; bit 1: the side symmetrisation keeps
                entry_side[fill[c]] = side + 2 * (kept_b == (side == 1))
                entry_d2[fill[c]] = d2[p]
                fill[c] += 1
    hist = np.empty(_BINS, dtype=np.int64)
    buf = np.empty(width, dtype=np.float64)
    inside = np.empty(width, dtype=np.bool_)
    for c in range(n_atoms):
        m = counts[c]
        if m <= k:
            continue
        lo = start[c]
        dist = entry_d2[lo : lo + m]
        d_k, d_k1 = _kth_pair(dist, m, k, r2, hist, buf)  # k-th and (k+1)-th nearest, squared
        if not strict:
            limit = d_k1 + tolerance
            for e in range(m):
                inside[e] = dist[e] <= limit
        elif d_k1 - d_k > tie_rtol * d_k1:
            for e in range(m):
                inside[e] = dist[e] <= d_k
        else:
            _strict_tied(dist, m, k, tie_rtol, entry_pair, entry_side, lo, a, b, S, inside)
        # The pair follows the entry on the side symmetrisation keeps.
        for e in range(m):
            if entry_side[lo + e] >= 2:
                keep[entry_pair[lo + e]] = inside[e]


@numba.njit(**_JIT)
def _write_edges(a, b, S, keep, cell, edge_index, cell_shift, edge_shift):
    """The kept pairs as one-sided edges (j <= i) into the first half, their reverses into the second."""
    n_kept = edge_index.shape[1] // 2
    e = 0
    for p in range(a.shape[0]):
        if not keep[p]:
            continue
        flip = _kept_side_is_b(a[p], b[p], S[p, 0], S[p, 1], S[p, 2])
        centre, nbr = (b[p], a[p]) if flip else (a[p], b[p])
        sign = -1 if flip else 1
        r = e + n_kept
        edge_index[0, e] = nbr
        edge_index[1, e] = centre
        edge_index[0, r] = centre
        edge_index[1, r] = nbr
        s0, s1, s2 = sign * S[p, 0], sign * S[p, 1], sign * S[p, 2]
        cell_shift[e, 0], cell_shift[e, 1], cell_shift[e, 2] = s0, s1, s2
        cell_shift[r, 0], cell_shift[r, 1], cell_shift[r, 2] = -s0, -s1, -s2
        for x in range(3):
            v = s0 * cell[0, x] + s1 * cell[1, x] + s2 * cell[2, x]
            edge_shift[e, x] = v
            edge_shift[r, x] = -v
        e += 1
