"""The slot layout of :func:`painn_export.batch.collate`, as torch ops on the graphs' device.

Line for line the same arrays as ``collate``, from a
:class:`~painn_export.device_graphs.DeviceGraphs`: every index computed
in int64, every float in float64 and then cast once, so that the feed of the
same edges in the same order is bitwise the host's. The one sum,
each structure's centroid, is taken row by row from the first atom, as
numpy's ``mean(axis=0)`` of a C-ordered ``[n, 3]`` array does
(:func:`centroids`); atomics or a tree reduction would round differently.
"""

from __future__ import annotations

import torch

from painn_export.batch import InvalidGraphError


def centroids(positions: torch.Tensor, natoms: torch.Tensor) -> torch.Tensor:
    """``[n_systems, 3]`` float64 Å: each structure's mean position, bitwise numpy's ``mean(axis=0)``.

    ``positions`` ``[n_atoms, 3]`` float64, structures one after another,
    ``natoms`` ``[n_systems]`` (each >= 1). One step per atom of the largest
    structure, each over all structures at once.
    """
    start = torch.cumsum(natoms, 0) - natoms  # [S]
    total = positions[start]  # [S, 3] numpy starts from the first row, not from zero
    for t in range(1, int(natoms.max())):
        more = natoms > t  # [S]
        row = positions[torch.where(more, start + t, start)]  # [S, 3]
        total = torch.where(more[:, None], total + row, total)
    return total / natoms[:, None].to(torch.float64)


def slot_layout(graphs, dtype: torch.dtype, K: int, n_pairs: int | None) -> dict[str, torch.Tensor]:
    """``collate``'s feed of ``graphs`` on ``K`` slots per atom (see :func:`painn_export.batch.collate`)."""
    device = graphs.positions.device
    natoms = graphs.natoms  # [S]
    n_atoms, n_edges = int(graphs.positions.shape[0]), int(graphs.edge_index.shape[1])
    system = torch.repeat_interleave(torch.arange(natoms.numel(), device=device), natoms)  # [n_atoms]
    send, recv = graphs.edge_index  # [E] each
    reverse = graphs.edge_reverse  # [E]
    # Rank of each edge among its receiver's edges, in edge order (slots_within_receiver).
    order = torch.sort(recv, stable=True).indices  # [E]
    degree = torch.bincount(recv, minlength=n_atoms)  # [n_atoms]
    start = torch.cumsum(degree, 0) - degree
    edge_slot = torch.empty_like(recv)
    edge_slot[order] = torch.arange(n_edges, device=device) - start[recv[order]]
    flat = recv * K + edge_slot  # [E] flat slot of each edge

    positions = graphs.positions - centroids(graphs.positions, natoms)[system]  # [n_atoms, 3] float64
    neighbors = torch.arange(n_atoms, device=device).repeat_interleave(K)  # [n_atoms * K] padding: centre
    neighbors[flat] = send
    shift = torch.zeros(n_atoms * K, 3, dtype=dtype, device=device)
    shift[flat] = graphs.edge_shift.to(dtype)
    mask = torch.zeros(n_atoms * K, dtype=dtype, device=device)
    mask[flat] = 1
    neighbor_reverse = torch.arange(n_atoms * K, device=device)  # padding: the slot itself
    neighbor_reverse[flat] = flat[reverse]

    first = torch.nonzero(torch.arange(n_edges, device=device) < reverse).squeeze(1)  # [real]
    real = first.numel()
    P = max(real, 1) if n_pairs is None else int(n_pairs)
    if P < max(real, 1):
        raise ValueError(f"n_pairs={P} is fewer than the {max(real, 1)} pairs the graphs need")
    pair_slots = torch.full((P, 2), n_atoms * K, dtype=torch.int64, device=device)  # spare: "none"
    pair_slots[:real, 0] = flat[first]
    pair_slots[:real, 1] = flat[reverse[first]]
    pair_of_edge = torch.empty(n_edges, dtype=torch.int64, device=device)
    pair_of_edge[first] = torch.arange(real, device=device)
    pair_of_edge[reverse[first]] = torch.arange(real, device=device)
    slot_pair = torch.full((n_atoms * K,), P, dtype=torch.int64, device=device)  # padding: no pair
    slot_pair[flat] = pair_of_edge
    if not n_atoms:
        raise InvalidGraphError("a graph with no atoms has nothing to evaluate")
    return {
        "atomic_numbers": graphs.atomic_numbers,
        "positions": positions.to(dtype),
        "neighbors": neighbors.view(n_atoms, K),
        "neighbor_shift": shift.view(n_atoms, K, 3),
        "neighbor_mask": mask.view(n_atoms, K),
        "slot_pair": slot_pair.view(n_atoms, K),
        "pair_slots": pair_slots,
        "neighbor_reverse": neighbor_reverse.view(n_atoms, K),
        "system_index": system,
        "natoms": natoms,
        "cell": graphs.cell,
        "edge_index": graphs.edge_index,
        "edge_shift": graphs.edge_shift.to(dtype),
    }
