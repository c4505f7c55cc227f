"""Compiled slot layout for :func:`painn_export.batch.collate` (numba).

One pass over the atoms and one over the edges write the whole feed that
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

from painn_export._neighbors_kernel import _jit


@_jit
def slot_layout(
    positions, natoms, edge_index, nedges, edge_slot, edge_reverse, edge_shift, K, P,
    out_positions, neighbors, shift, mask, neighbor_reverse, slot_pair, pair_slots, flat_edge_index, flat,
) -> int:  # fmt: skip
    """Write the slot layout of graphs given one after another; returns the number of pairs.

    Inputs (``B`` graphs, ``N`` atoms, ``E`` edges in all; indices local to
    each graph): ``positions`` ``[N, 3]`` float64 Å, ``natoms`` ``[B]``,
    ``edge_index`` ``[2, E]`` (sender, receiver), ``nedges`` ``[B]``,
    ``edge_slot`` ``[E]``, ``edge_reverse`` ``[E]``, ``edge_shift`` ``[E, 3]``
    float64 Å; ``K`` slots per atom, ``P`` pairs (at least ``E / 2``).

    Outputs (preallocated; float ones in the feed's dtype): ``out_positions``
    ``[N, 3]``, ``neighbors``, ``shift`` ``[N * K, 3]``, ``mask``,
    ``neighbor_reverse``, ``slot_pair`` ``[N * K]``, ``pair_slots`` ``[P, 2]``,
    ``flat_edge_index`` ``[2, E]`` (global atom indices), and the scratch
    ``flat`` ``[E]`` (each edge's flat slot).
    """
    B = natoms.shape[0]
    NK = neighbors.shape[0]
    # Each structure about its own centroid (numpy's mean(axis=0): rows in order, then / n).
    a0 = 0
    for s in range(B):
        n = natoms[s]
        c0, c1, c2 = positions[a0, 0], positions[a0, 1], positions[a0, 2]
        for t in range(a0 + 1, a0 + n):
            c0 += positions[t, 0]
            c1 += positions[t, 1]
            c2 += positions[t, 2]
        c0, c1, c2 = c0 / n, c1 / n, c2 / n
        for t in range(a0, a0 + n):
            out_positions[t, 0] = positions[t, 0] - c0
            out_positions[t, 1] = positions[t, 1] - c1
            out_positions[t, 2] = positions[t, 2] - c2
        a0 += n
    # Padding: the centre itself, a zero shift and mask, its own reverse, no pair.
    for f in range(NK):
        neighbors[f] = f // K
        neighbor_reverse[f] = f
        slot_pair[f] = P
        mask[f] = 0
        shift[f, 0] = 0
        shift[f, 1] = 0
        shift[f, 2] = 0
    # Edges: each to its receiver's slot, offset by the atoms of earlier graphs.
    a0 = 0
    e0 = 0
    for s in range(B):
        for e in range(e0, e0 + nedges[s]):
            send = edge_index[0, e] + a0
            recv = edge_index[1, e] + a0
            f = recv * K + edge_slot[e]
            flat[e] = f
            flat_edge_index[0, e] = send
            flat_edge_index[1, e] = recv
            neighbors[f] = send
            shift[f, 0] = edge_shift[e, 0]
            shift[f, 1] = edge_shift[e, 1]
            shift[f, 2] = edge_shift[e, 2]
            mask[f] = 1
        a0 += natoms[s]
        e0 += nedges[s]
    # Reverses and pairs (an edge and its reverse; numbered by the first of the two, in edge order).
    e0 = 0
    p = 0
    for s in range(B):
        for e in range(e0, e0 + nedges[s]):
            r = edge_reverse[e] + e0
            neighbor_reverse[flat[e]] = flat[r]
            if e < r:
                if p < P:  # more pairs than P: counted, and refused by the caller
                    pair_slots[p, 0] = flat[e]
                    pair_slots[p, 1] = flat[r]
                    slot_pair[flat[e]] = p
                    slot_pair[flat[r]] = p
                p += 1
        e0 += nedges[s]
    for q in range(p, P):  # spare pairs: "no slot"
        pair_slots[q, 0] = NK
        pair_slots[q, 1] = NK
    return p
