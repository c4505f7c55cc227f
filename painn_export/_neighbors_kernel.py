"""Compiled per-centre cap and symmetrisation for :mod:`painn_export.neighbors`, and the batched
skin update for :mod:`painn_export.skin` (numba).

Imported on the first graph, not with the package: numba's import and
loading the compiled code from numba's on-disk cache cost about a second once
per process (the first compilation, about 10 s, happens once per install).
The semantics are those documented in :mod:`painn_export.neighbors`; this
module does them in a few passes over the half list, without the temporaries
a numpy formulation needs (which cost more than the neighbour
search itself at 6 Å).

Finding each capped centre's k-th nearest without grouping pairs by centre:
a ``[n_atoms, bins]`` histogram of d² (one pass over the pairs, both ends)
says which bins hold each centre's k-th and (k+1)-th nearest; a second pass
collects only the pairs in those bins (a handful per centre), which are
sorted to read the two values exactly. A third pass keeps each pair by the
threshold of the centre on its kept side. Where the cap cuts through a tie
(perfect crystals: whole shells are equally distant), only the tie group is
gathered and ordered by (j, S); the group is read from the sorted candidates,
and only when it may reach past them (within the tie tolerance of a bin
edge) does the centre gather all its entries.

Half-list convention: pair ``p`` is ``(a[p], b[p], S[p])`` with squared
distance ``d2[p]``, standing for the two entries "centre a, neighbour b,
shift S" and "centre b, neighbour a, shift -S". A self-image pair
(``a == b``) gives its centre both entries.
"""

from __future__ import annotations

import math
import threading

import numpy as np

from painn_export._jit import jit as _jit


@_jit
def _pair_d2(positions, a: int, b: int, s0, s1, s2, cell) -> float:
    """``|(x_b - x_a) + S @ cell|²`` (float64, Å²), always in this order of operations: the one d²."""
    total = 0.0
    for x in range(3):
        v = (positions[b, x] - positions[a, x]) + (s0 * cell[0, x] + s1 * cell[1, x] + s2 * cell[2, x])
        total += v * v
    return total


@_jit
def squared_distances(a, b, S, positions, cell, out) -> None:
    """``out[p]``: pair ``p``'s :func:`_pair_d2`."""
    for p in range(a.shape[0]):
        out[p] = _pair_d2(positions, a[p], b[p], S[p, 0], S[p, 1], S[p, 2], cell)


@_jit
def _kept_side_is_b(a: int, b: int, s0: int, s1: int, s2: int) -> bool:
    """True where upstream's symmetrisation keeps the entry of centre ``b`` (``max(a, b)``).

    It keeps ``(i, j, S)`` with ``j < i``, or ``j == i`` and ``S`` lexicographically
    negative; for a self-image pair the b-side entry has shift ``-S``.
    """
    if b != a:
        return b > a
    return s0 > 0 or (s0 == 0 and (s1 > 0 or (s1 == 0 and s2 > 0)))


@_jit
def _lex_less(j1: int, s1, j2: int, s2) -> bool:
    """(j1, S1) < (j2, S2) lexicographically: our tie-break among equal distances."""
    if j1 != j2:
        return j1 < j2
    for x in range(3):
        if s1[x] != s2[x]:
            return s1[x] < s2[x]
    return False


_BINS = 64  # d² bins per centre when looking for its k-th nearest
_HIST_CELLS = 1 << 22  # fewer bins for structures with more than 65536 atoms


@_jit
def _tie_chain(values, i: int, tie_rtol: float):
    """``(g0, g1)``: the tie group through ``values[i]`` (sorted ascending), bounds inclusive.

    A chain: neighbours in sorted order closer than ``tie_rtol`` (relative)
    belong to one group, so it may span more than ``tie_rtol`` in all.
    """
    g0 = i
    while g0 > 0 and values[g0] - values[g0 - 1] <= tie_rtol * values[g0]:
        g0 -= 1
    g1 = i
    while g1 + 1 < values.size and values[g1 + 1] - values[g1] <= tie_rtol * values[g1 + 1]:
        g1 += 1
    return g0, g1


@_jit
def _sort_small(x) -> None:
    """Sort ``x`` in place: insertion sort (the slices here hold a handful of values)."""
    if x.size > 32:
        x[:] = np.sort(x)
        return
    for t in range(1, x.size):
        v = x[t]
        u = t
        while u > 0 and x[u - 1] > v:
            x[u] = x[u - 1]
            u -= 1
        x[u] = v


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
    edges sorted by ``(receiver i, sender j, S)``, then their reverses in the
    same order (the canonical order, :mod:`painn_export.neighbors`).

    Large arrays are allocated here, in numpy, and filled by the compiled
    loops: numba's own allocations of them are not reused between calls and
    cost page faults several times the loops' time. The scratch arrays are
    kept per thread for the same reason.
    """
    n_pairs = a.shape[0]
    keep = _scratch_keep(n_pairs)
    keep[:] = True
    if k > 0 and 2 * n_pairs > k:
        bins = max(8, min(_BINS, _HIST_CELLS // max(n_atoms, 1)))
        hist = _scratch_hist(n_atoms * bins)
        _cap(a, b, S, d2, n_atoms, k, strict, tie_rtol, tolerance, keep, hist, bins)
    n_kept = int(np.count_nonzero(keep))
    edge_index = np.empty((2, 2 * n_kept), dtype=np.int64)
    cell_shift = np.empty((2 * n_kept, 3), dtype=np.int64)
    edge_shift = np.empty((2 * n_kept, 3), dtype=np.float64)
    start = np.zeros(n_atoms + 1, dtype=np.int64)
    order, key = np.empty(n_kept, dtype=np.int64), np.empty(n_kept, dtype=np.int64)
    _canonical_order(a, b, S, keep, start, order, key)
    _write_edges(a, b, S, order, cell, edge_index, cell_shift, edge_shift)
    return edge_index, cell_shift, edge_shift


_local = threading.local()


def _scratch_keep(n_pairs: int):
    """This thread's ``[P]`` bool scratch (one byte per pair).

    Kept between calls (grown, never shrunk): fresh arrays of this size cost
    more in page faults than the work done in them.
    """
    held = getattr(_local, "keep", None)
    if held is None or held.size < n_pairs:
        held = _local.keep = np.empty(max(n_pairs + n_pairs // 4, 1024), dtype=np.bool_)
    return held[:n_pairs]


def _scratch_hist(cells: int):
    """This thread's int32 histogram scratch, zeroed, ``[cells]``."""
    held = getattr(_local, "hist", None)
    if held is None or held.size < cells:
        held = _local.hist = np.empty(max(cells, 1024), dtype=np.int32)
    hist = held[:cells]
    hist[:] = 0
    return hist


@_jit
def _cap(a, b, S, d2, n_atoms, k, strict, tie_rtol, tolerance, keep, hist, bins):
    """Clear ``keep[p]`` for the pairs the cap removes from the side symmetrisation keeps.

    ``hist`` ``[n_atoms * bins]`` int32 (zeroed) is scratch.
    """
    n_pairs = a.shape[0]
    r2 = 0.0  # largest d²: the histogram's range
    for p in range(n_pairs):
        r2 = max(r2, d2[p])
    scale = bins * (1.0 - 1e-9) / r2 if r2 > 0 else 0.0
    # Pass 1: per-centre histogram of d², both ends of every pair.
    for p in range(n_pairs):
        bin_ = int(d2[p] * scale)
        hist[a[p] * bins + bin_] += 1
        hist[b[p] * bins + bin_] += 1
    # Per centre: bins lo..hi hold its ranks k-1 and k; `below` entries come before lo.
    lo = np.full(n_atoms, bins, dtype=np.int64)  # bins: not capped
    hi = np.zeros(n_atoms, dtype=np.int64)
    below = np.zeros(n_atoms, dtype=np.int64)
    start = np.zeros(n_atoms + 1, dtype=np.int64)  # of each centre's candidates in `values`
    total = np.zeros(n_atoms, dtype=np.int64)  # entries per centre
    for c in range(n_atoms):
        row = c * bins
        for t in range(bins):
            total[c] += hist[row + t]
        start[c + 1] = start[c]
        if total[c] <= k:
            continue
        cum = 0
        t = 0
        while cum + hist[row + t] < k:
            cum += hist[row + t]
            t += 1
        lo[c], below[c] = t, cum
        upto = cum + hist[row + t]
        while upto < k + 1:
            t += 1
            upto += hist[row + t]
        hi[c] = t
        start[c + 1] = start[c] + upto - cum
    # Pass 2: the candidates (pairs in bins lo..hi), grouped by centre.
    values = np.empty(start[n_atoms], dtype=np.float64)
    fill = start[:-1].copy()
    for p in range(n_pairs):
        bin_ = int(d2[p] * scale)
        for c in (a[p], b[p]):
            if lo[c] <= bin_ <= hi[c]:
                values[fill[c]] = d2[p]
                fill[c] += 1
    threshold = np.full(n_atoms, np.inf)  # keep d² <= threshold[centre]
    # Centres whose cap cuts a tie: keep d² < group_lo, choose `need` of the
    # entries with group_lo <= d² <= group_hi (the tie group) by (j, S).
    tied = np.zeros(n_atoms, dtype=np.bool_)
    group_lo = np.zeros(n_atoms)
    group_hi = np.zeros(n_atoms)
    need = np.zeros(n_atoms, dtype=np.int64)
    group_size = np.zeros(n_atoms, dtype=np.int64)
    slow = np.zeros(n_atoms, dtype=np.bool_)  # tie group may reach outside the candidates
    n_slow = 0
    for c in range(n_atoms):
        if lo[c] == bins:
            continue
        cand = values[start[c] : start[c + 1]]
        _sort_small(cand)
        i_k = k - 1 - below[c]
        d_k, d_k1 = cand[i_k], cand[i_k + 1]  # k-th, (k+1)-th nearest
        if not strict:
            threshold[c] = d_k1 + tolerance
        elif d_k1 - d_k > tie_rtol * d_k1:
            threshold[c] = d_k
        else:
            g0, g1 = _tie_chain(cand, i_k, tie_rtol)
            # The chain can go on outside the candidates only where its end is
            # within tie_rtol (twice, for rounding) of the edge of bins lo..hi.
            open_below = g0 == 0 and below[c] > 0 and int(cand[0] * (1.0 - 2 * tie_rtol) * scale) < lo[c]
            open_above = (
                g1 == cand.size - 1
                and below[c] + cand.size < total[c]
                and int(cand[g1] * (1.0 + 2 * tie_rtol) * scale) > hi[c]
            )
            tied[c] = True
            if open_below or open_above:
                slow[c] = True  # its group is read from all its entries below
                n_slow += 1
                continue
            group_lo[c], group_hi[c] = cand[g0], cand[g1]
            need[c] = k - below[c] - g0
            group_size[c] = g1 - g0 + 1
    if n_slow:
        _groups_from_all_entries(a, b, d2, n_atoms, k, tie_rtol, slow, group_lo, group_hi, need, group_size)
    # Pass 3: each pair by the centre on the side symmetrisation keeps.
    for p in range(n_pairs):
        centre = max(a[p], b[p])
        if tied[centre]:
            keep[p] = d2[p] < group_lo[centre]  # tie group members: below
        else:
            keep[p] = d2[p] <= threshold[centre]
    if tied.any():
        group_start = np.zeros(n_atoms + 1, dtype=np.int64)
        group_start[1:] = np.cumsum(group_size)
        _choose_in_groups(a, b, S, d2, n_atoms, tied, group_lo, group_hi, need, group_start, keep)


@_jit
def _choose_in_groups(a, b, S, d2, n_atoms, tied, group_lo, group_hi, need, group_start, keep) -> None:
    """Of each tied centre's tie group, keep the ``need[c]`` smallest entries by (j, S).

    The group members of centre ``c`` are its entries with ``group_lo[c] <= d²
    <= group_hi[c]``; ``group_start`` gives their slots (sizes counted when the groups
    were found).
    """
    n_members = group_start[n_atoms]
    member_pair = np.empty(n_members, dtype=np.int64)
    member_side = np.empty(n_members, dtype=np.int8)  # 0: the a-side entry (b, S); 1: (a, -S)
    member_nbr = np.empty(n_members, dtype=np.int64)
    member_shift = np.empty((n_members, 3), dtype=np.int64)
    fill = group_start[:-1].copy()
    for p in range(a.shape[0]):
        for side in range(2):
            c = a[p] if side == 0 else b[p]
            if tied[c] and group_lo[c] <= d2[p] <= group_hi[c]:
                m = fill[c]
                sign = 1 if side == 0 else -1
                member_pair[m], member_side[m] = p, side
                member_nbr[m] = b[p] if side == 0 else a[p]
                for x in range(3):
                    member_shift[m, x] = sign * S[p, x]
                fill[c] += 1
    for c in range(n_atoms):
        if not tied[c]:
            continue
        # Selection of the need[c] smallest by (j, S), in place over the slots.
        g0, g1 = group_start[c], group_start[c + 1]
        for t in range(g0, g1):
            best = t
            if t < g0 + need[c]:
                for u in range(t + 1, g1):
                    if _lex_less(member_nbr[u], member_shift[u], member_nbr[best], member_shift[best]):
                        best = u
                if best != t:
                    member_pair[t], member_pair[best] = member_pair[best], member_pair[t]
                    member_side[t], member_side[best] = member_side[best], member_side[t]
                    member_nbr[t], member_nbr[best] = member_nbr[best], member_nbr[t]
                    for x in range(3):
                        member_shift[t, x], member_shift[best, x] = member_shift[best, x], member_shift[t, x]
            # The pair follows the entry on the side symmetrisation keeps.
            p = member_pair[t]
            kept_b = _kept_side_is_b(a[p], b[p], S[p, 0], S[p, 1], S[p, 2])
            if kept_b == (member_side[t] == 1):
                keep[p] = t < g0 + need[c]


@_jit
def _groups_from_all_entries(a, b, d2, n_atoms, k, tie_rtol, slow, group_lo, group_hi, need, group_size):
    """Tie groups of the ``slow`` centres, whose group may reach past their candidate bins.

    Sorts all of each such centre's d² and follows the chain of gaps within
    ``tie_rtol`` through its k-th nearest, as :func:`_cap` does on the
    candidates; sets the centre's ``group_lo``, ``group_hi``, ``need`` and
    ``group_size``.
    """
    n_pairs = a.shape[0]
    start = np.zeros(n_atoms + 1, dtype=np.int64)
    for p in range(n_pairs):
        if slow[a[p]]:
            start[a[p] + 1] += 1
        if slow[b[p]]:
            start[b[p] + 1] += 1
    start = np.cumsum(start)
    values = np.empty(start[n_atoms], dtype=np.float64)
    fill = start[:-1].copy()
    for p in range(n_pairs):
        for c in (a[p], b[p]):
            if slow[c]:
                values[fill[c]] = d2[p]
                fill[c] += 1
    for c in range(n_atoms):
        if not slow[c]:
            continue
        dist = np.sort(values[start[c] : start[c + 1]])
        g0, g1 = _tie_chain(dist, k - 1, tie_rtol)
        group_lo[c], group_hi[c] = dist[g0], dist[g1]
        need[c] = k - g0
        group_size[c] = g1 - g0 + 1


@_jit
def _canonical_order(a, b, S, keep, start, order, key) -> None:
    """``order[e]``: the kept pair written as one-sided edge ``e``, in ``(i, j, S)`` order.

    A counting sort by receiver ``i`` (``start [n_atoms + 1]``, zeroed: each
    receiver's run bounds after), then each receiver's run (at most ``k``
    pairs under a strict cap) sorted by one int64 key of ``(j, S)``; ``key
    [n_kept]`` is scratch. Keys are unique (an edge set has no duplicates).
    """
    n_atoms = start.shape[0] - 1
    span = 0
    for p in range(a.shape[0]):
        if keep[p]:
            centre = b[p] if _kept_side_is_b(a[p], b[p], S[p, 0], S[p, 1], S[p, 2]) else a[p]
            start[centre + 1] += 1
            for x in range(3):
                span = max(span, abs(S[p, x]))
    for c in range(n_atoms):
        start[c + 1] += start[c]
    width = 2 * span + 1  # S + span lies in [0, width) on each axis
    for p in range(a.shape[0]):
        if not keep[p]:
            continue
        flip = _kept_side_is_b(a[p], b[p], S[p, 0], S[p, 1], S[p, 2])
        centre, nbr = (b[p], a[p]) if flip else (a[p], b[p])
        sign = -1 if flip else 1
        slot = start[centre]  # start[c] walks to the run's end here; moved back below
        start[centre] += 1
        order[slot] = p
        shift = 0
        for x in range(3):
            shift = shift * width + sign * S[p, x] + span
        key[slot] = nbr * width * width * width + shift
    for c in range(n_atoms, 0, -1):
        start[c] = start[c - 1]
    start[0] = 0
    for c in range(n_atoms):
        lo, hi = start[c], start[c + 1]
        if hi - lo <= 32:  # insertion sort of (key, pair) together
            for t in range(lo + 1, hi):
                v, q = key[t], order[t]
                u = t
                while u > lo and key[u - 1] > v:
                    key[u], order[u] = key[u - 1], order[u - 1]
                    u -= 1
                key[u], order[u] = v, q
        else:
            perm = np.argsort(key[lo:hi])
            order[lo:hi] = order[lo:hi][perm]


@_jit
def _write_edges(a, b, S, order, cell, edge_index, cell_shift, edge_shift):
    """Pairs ``order`` as one-sided edges (j <= i) into the first half, their reverses into the second."""
    n_kept = edge_index.shape[1] // 2
    for e in range(n_kept):
        p = order[e]
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


# -- the skin update of many structures at once (painn_export.skin) -----------------
#
# One call takes every structure's kept candidate pairs (the half list of its
# last search, within cutoff + skin, in the canonical order) and its current
# positions and cell, and writes each structure's graph: the squared
# distances, the cutoff and minimum-distance filter, the cap and
# symmetrisation above, the edges, and each edge's slot and reverse.
# Structures are independent: each one's arithmetic is the same whatever else
# is in the call. (In this module, not its own: numba's on-disk cache is
# invalidated by a change to the calling function's file only, and these
# passes compile the ones above into themselves.)


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
    [B], degree [B])``: structure ``s``'s edges are ``edge_start[s]:edge_start[s + 1]``,
    in the canonical order, with atom, slot and reverse indices within the
    structure; ``closest[s]`` (Å) is its shortest candidate pair, dropped
    pairs included (``inf`` for none); ``degree[s]`` its busiest atom's edges
    (``edge_slot.max() + 1`` of its edges, 0 for none).

    Scratch is kept per thread and outputs are allocated here, in numpy:
    numba's own allocations of arrays this size are not reused between calls
    and cost several times the loops' time in page faults.
    """
    n_structures, n_pairs = len(atom_start) - 1, len(a)
    most_atoms = int(np.max(np.diff(atom_start), initial=0))
    d2, ca, cb, cS, cd2, keep, order = _skin_scratch(n_pairs)
    hist, count = _skin_scratch_atoms(most_atoms)
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
    degree = np.zeros(n_structures, dtype=np.int64)
    _edges(
        cells, atom_start, pair_start, ca, cb, cS, keep, n_within, n_kept, order, count,
        edge_index, cell_shift, edge_shift, edge_slot, edge_reverse, edge_start, degree,
    )  # fmt: skip
    return edge_index, cell_shift, edge_shift, edge_slot, edge_reverse, edge_start, closest, degree


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
    edge_index, cell_shift, edge_shift, edge_slot, edge_reverse, edge_start, degree,
):  # fmt: skip
    """Per structure: the kept pairs as edges (already in the canonical order), slots, reverses and
    the busiest atom's edges."""
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
        most = 0
        for e in range(e0, e1):
            r = edge_index[1, e]
            edge_slot[e] = c[r]
            c[r] += 1
            most = max(most, c[r])
            local = e - e0
            edge_reverse[e] = local + half if local < half else local - half
        degree[s] = most


def _skin_scratch(n_pairs: int):
    """This thread's per-pair scratch ``(d2, ca, cb, cS, cd2, keep, order)``, grown, never shrunk."""
    held = getattr(_local, "skin_pairs", None)
    if held is None or held[0].size < n_pairs:
        size = max(n_pairs + n_pairs // 4, 1024)
        held = _local.skin_pairs = (
            np.empty(size, dtype=np.float64),
            np.empty(size, dtype=np.int64),
            np.empty(size, dtype=np.int64),
            np.empty((size, 3), dtype=np.int32),
            np.empty(size, dtype=np.float64),
            np.empty(size, dtype=np.bool_),
            np.empty(size, dtype=np.int64),
        )
    return tuple(x[:n_pairs] for x in held)


def _skin_scratch_atoms(n_atoms: int):
    """This thread's ``(hist [n_atoms * bins] int32, count [n_atoms] int64)`` scratch."""
    held = getattr(_local, "skin_atoms", None)
    if held is None or held[1].size < n_atoms:
        size = max(n_atoms + n_atoms // 4, 256)
        cells = max(8 * size, min(_BINS * size, _HIST_CELLS))  # the most n_atoms * bins any n <= size needs
        held = _local.skin_atoms = (np.empty(cells, dtype=np.int32), np.empty(size, dtype=np.int64))
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


# -- every pair of a small structure, by images, in the canonical order (painn_export.skin) ----------


@_jit
def image_pairs(positions, cell, dual, reach, r2, min_d2, a, b, S) -> int:
    """The half list within the cutoff of a structure, every atom pair against every image it can reach.

    Pair ``(a, b, S)`` is written with ``b`` the receiver (``a < b``, or a
    self-image ``a == b`` with ``S`` lexicographically positive), in the
    canonical order (:func:`canonical_pairs`' order: by receiver, sender, then
    the receiver's shift ``-S``). For each atom pair, axis ``x``'s images
    are those with ``|((x_b - x_a) + S @ cell) . dual[x]| <= reach[x]``
    (``dual``: ``[3, 3]`` the periodic lattice vectors' duals, zero rows on
    non-periodic axes; ``reach[x] >= cutoff |dual[x]|``, zero on
    non-periodic axes): every image within the cutoff, with a margin.
    A pair is kept when ``min_d2 < d² <= r2``, ``d²`` being :func:`_pair_d2`.

    Writes at most ``len(a)`` pairs and returns how many there are (more
    than ``len(a)``: call again with room for them).
    """
    n = positions.shape[0]
    room = a.shape[0]
    count = 0
    lo = np.zeros(3, dtype=np.int64)
    hi = np.zeros(3, dtype=np.int64)
    for i in range(n):
        for j in range(i + 1):
            for x in range(3):
                f = 0.0
                for y in range(3):
                    f += (positions[i, y] - positions[j, y]) * dual[x, y]
                lo[x] = math.ceil(f - reach[x])
                hi[x] = math.floor(f + reach[x])
            for t0 in range(lo[0], hi[0] + 1):
                for t1 in range(lo[1], hi[1] + 1):
                    for t2 in range(lo[2], hi[2] + 1):
                        if j == i and not (t0 < 0 or (t0 == 0 and (t1 < 0 or (t1 == 0 and t2 < 0)))):
                            continue  # a self-image once (its receiver's shift negative), never itself
                        s0, s1, s2 = -t0, -t1, -t2
                        total = _pair_d2(positions, j, i, s0, s1, s2, cell)
                        if total <= r2 and total > min_d2:
                            if count < room:
                                a[count], b[count] = j, i
                                S[count, 0], S[count, 1], S[count, 2] = s0, s1, s2
                            count += 1
    return count
