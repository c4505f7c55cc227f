"""Compiled slot layout for :func:`painn_export.batch.collate` (numba).

A pass over the atoms and two over the edges write the whole feed that
:func:`painn_export.batch.collate_reference` writes with a dozen numpy
scatters and their temporaries (each as large as the edge list): the same
arrays, bit for bit (tests/test_collate.py). The one sum, each structure's
centroid, is taken row by row from the first atom, as numpy's
``mean(axis=0)`` of a C-ordered ``[n, 3]`` array does; every float is
computed in float64 and cast once.

Imported on the first collate, not with the package (numba's import and
its on-disk cache cost about a second once per process).
"""

from __future__ import annotations

from painn_export._jit import jit


@jit
def slot_layout(
    positions, natoms, edge_index, nedges, edge_slot, edge_reverse, edge_shift, K, P, g0, g1, a0, e0, p0,
    ia0, ie0, out_positions, neighbors, shift, mask, neighbor_reverse, slot_pair, pair_slots, edges,
    flat_edge_index, flat_edge_shift, flat,
) -> int:  # fmt: skip
    """Write the slot layout of graphs ``g0 .. g1 - 1``; returns the number of pairs they hold, or
    ``-(s + 1)`` (nothing written) when graph ``s`` has no atoms, an index outside itself, a slot
    outside ``K`` or reverses that do not pair its edges.

    The batch has ``B`` graphs, ``N`` atoms and ``E`` edges in all, one
    after another; ``a0``, ``e0``, ``p0``: the atoms, edges and pairs of the
    graphs before ``g0`` (a graph of ``n`` edges holds ``n / 2`` pairs);
    ``natoms`` ``[B]`` and ``nedges`` ``[B]`` are every graph's.

    Inputs, from the batch's atom ``ia0`` and edge ``ie0`` on (at least
    these graphs'; indices local to each graph; ``ie0`` below 0 when the
    inputs hold edges before the batch's first, as a skin pass's do): ``positions`` ``[., 3]``
    float64 Å, ``edge_index`` ``[2, .]`` (sender, receiver), ``edge_slot``,
    ``edge_reverse``, ``edge_shift`` ``[., 3]`` float64 Å; ``K`` slots per
    atom, ``P`` pairs.

    Outputs (preallocated, for all ``B`` graphs; this call writes its
    graphs' rows only, so calls on other graphs may run at the same time;
    float ones in the feed's dtype): ``out_positions`` ``[N, 3]``,
    ``neighbors``, ``shift`` ``[N * K, 3]``, ``mask``, ``neighbor_reverse``,
    ``slot_pair`` ``[N * K]``, ``pair_slots`` ``[P, 2]`` (the pairs only, not
    the spare rows); when ``edges`` is true the flat edge list,
    ``flat_edge_index`` ``[2, E]`` (global atom indices) and
    ``flat_edge_shift`` ``[E, 3]``; and the scratch ``flat`` ``[E]`` (each
    edge's flat slot).
    """
    # First, what every write below relies on (a graph made with Graph.from_checked skipped Graph's
    # checks): atoms, indices within the graph, slots within K, reverses that pair the edges.
    start = e0 - ie0
    for s in range(g0, g1):
        n, m = natoms[s], nedges[s]
        if n <= 0:
            return -(s + 1)
        for e in range(start, start + m):
            r = edge_reverse[e]
            if not (0 <= edge_index[0, e] < n and 0 <= edge_index[1, e] < n and 0 <= edge_slot[e] < K):
                return -(s + 1)
            if not (0 <= r < m and r != e - start and edge_reverse[start + r] == e - start):
                return -(s + 1)
        start += m
    # Each structure about its own centroid (numpy's mean(axis=0): rows in order, then / n).
    a = a0
    for s in range(g0, g1):
        n = natoms[s]
        x = a - ia0
        c0, c1, c2 = positions[x, 0], positions[x, 1], positions[x, 2]
        for t in range(x + 1, x + n):
            c0 += positions[t, 0]
            c1 += positions[t, 1]
            c2 += positions[t, 2]
        c0, c1, c2 = c0 / n, c1 / n, c2 / n
        for t in range(n):
            out_positions[a + t, 0] = positions[x + t, 0] - c0
            out_positions[a + t, 1] = positions[x + t, 1] - c1
            out_positions[a + t, 2] = positions[x + t, 2] - c2
        a += n
    # Padding: the centre itself, a zero shift and mask, its own reverse, no pair.
    for f in range(a0 * K, a * K):
        neighbors[f] = f // K
        neighbor_reverse[f] = f
        slot_pair[f] = P
        mask[f] = 0
        shift[f, 0] = 0
        shift[f, 1] = 0
        shift[f, 2] = 0
    # Edges: each to its receiver's slot, offset by the atoms of earlier graphs.
    a = a0
    start = e0
    for s in range(g0, g1):
        for e in range(start, start + nedges[s]):
            x = e - ie0
            send = edge_index[0, x] + a
            recv = edge_index[1, x] + a
            f = recv * K + edge_slot[x]
            flat[e] = f
            if edges:
                flat_edge_index[0, e] = send
                flat_edge_index[1, e] = recv
                flat_edge_shift[e, 0] = edge_shift[x, 0]
                flat_edge_shift[e, 1] = edge_shift[x, 1]
                flat_edge_shift[e, 2] = edge_shift[x, 2]
            neighbors[f] = send
            shift[f, 0] = edge_shift[x, 0]
            shift[f, 1] = edge_shift[x, 1]
            shift[f, 2] = edge_shift[x, 2]
            mask[f] = 1
        a += natoms[s]
        start += nedges[s]
    # Reverses and pairs (an edge and its reverse; numbered by the first of the two, in edge order).
    start = e0
    p = p0
    for s in range(g0, g1):
        for e in range(start, start + nedges[s]):
            r = edge_reverse[e - ie0] + start
            neighbor_reverse[flat[e]] = flat[r]
            if e < r:
                if p < P:  # more pairs than P: counted, and refused by the caller
                    pair_slots[p, 0] = flat[e]
                    pair_slots[p, 1] = flat[r]
                    slot_pair[flat[e]] = p
                    slot_pair[flat[r]] = p
                p += 1
        start += nedges[s]
    return p - p0
