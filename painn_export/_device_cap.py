"""Upstream's per-centre cap and one-sided symmetrisation as batched torch ops, for device graphs.

The rules are :mod:`painn_export.neighbors`' (its module docstring); this
module applies them to a padded full neighbour matrix on any torch device,
with a few sorts over the whole batch and no loop over structures or centres:

- the squared distances are recomputed in float64 in the host kernel's exact
  order of operations (:func:`squared_distances`), so every bound (the
  inclusive cutoff, ``MIN_DISTANCE_SQ``, the cap's ties) sees the very numbers
  the host path sees;
- strict cap: each capped row is sorted by d²; the tie chains (neighbours in
  sorted order whose d² differ by at most ``TIE_RTOL`` of the larger) are
  numbered by a cumulative sum; the chain through the k-th nearest is the tie
  group; rows whose group the cap cuts rank the group's members by
  ``(j, S)`` (one lexicographic sort of all such members in the batch);
- non-strict cap: the (k+1)-th nearest by ``kthvalue``;
- symmetrisation keeps the entries ``j < i`` (or ``j == i`` with ``S``
  lexicographically negative) that the cap kept at their centre ``i``.

Sorts of several integer keys go through :func:`lexsort`: one sort of a
packed int64 key when the key ranges allow it, else stable sorts key by key.
"""

from __future__ import annotations

import torch


def squared_distances(
    positions: torch.Tensor,  # [n_atoms, 3] float64, Å
    centre: torch.Tensor,  # [R] int64: the centre of each row
    centre_cell: torch.Tensor,  # [R, 3, 3] float64, Å: the cell of each centre's structure
    neighbor: torch.Tensor,  # [R, M] int64
    shift: torch.Tensor,  # [R, M, 3] int64, image of the neighbour
) -> torch.Tensor:
    """``|(x_j - x_i) + S @ cell|²`` ``[R, M]`` float64, Å², in the host kernel's order of operations.

    Each term is one elementwise torch op (no fused multiply-add), so the
    result is bitwise the host's (``painn_export._neighbors_kernel.squared_distances``).
    """
    flat = neighbor.reshape(-1)  # [R * M]
    s = [shift[..., a].to(torch.float64) for a in range(3)]  # 3 x [R, M]
    c = centre_cell[:, None]  # [R, 1, 3, 3]
    total = None
    for x in range(3):
        image = (s[0] * c[..., 0, x] + s[1] * c[..., 1, x]) + s[2] * c[..., 2, x]  # [R, M] Å
        column = positions[:, x].contiguous()  # [n_atoms]
        x_j = column.index_select(0, flat).view(neighbor.shape)  # [R, M]
        x_i = column.index_select(0, centre)[:, None]  # [R, 1]
        v = (x_j - x_i) + image  # [R, M]
        total = v * v if total is None else total + v * v
    return total


def image_offsets(cell: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``S @ cell`` ``[n, 3]`` float64, Å, in the host kernel's order of operations.

    ``cell`` ``[n, 3, 3]`` (each row's own cell), ``shift`` ``[n, 3]`` int64.
    """
    s = shift.to(torch.float64)
    return torch.stack(
        [(s[:, 0] * cell[:, 0, x] + s[:, 1] * cell[:, 1, x]) + s[:, 2] * cell[:, 2, x] for x in range(3)],
        dim=1,
    )


def lexsort(keys: list[torch.Tensor]) -> torch.Tensor:
    """``[n]`` permutation that sorts by ``keys[0]``, then ``keys[1]``, ... (int64 ``[n]`` each).

    One stable sort of a packed key when the product of the key ranges fits
    in 62 bits, else one stable sort per key, the last key first.
    """
    n = keys[0].shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=keys[0].device)
    bounds = torch.stack([torch.stack([k.min(), k.max()]) for k in keys]).cpu().tolist()  # one sync
    spans = [hi - lo + 1 for lo, hi in bounds]
    total = 1
    for span in spans:
        total *= span
    if total < 2**62:
        packed = torch.zeros(n, dtype=torch.int64, device=keys[0].device)
        for k, (lo, _), span in zip(keys, bounds, spans):
            packed = packed * span + (k - lo)
        return torch.sort(packed, stable=True).indices
    order = torch.arange(n, device=keys[0].device)
    for k in reversed(keys):
        order = order[torch.sort(k[order], stable=True).indices]
    return order


def lex_negative(shift: torch.Tensor) -> torch.Tensor:
    """``[...]`` bool: ``S`` ``[..., 3]`` is lexicographically below ``(0, 0, 0)``."""
    s0, s1, s2 = shift[..., 0], shift[..., 1], shift[..., 2]
    return (s0 < 0) | ((s0 == 0) & ((s1 < 0) | ((s1 == 0) & (s2 < 0))))


def cap_rows(d2, neighbor, shift, k: int, strict: bool, tie_rtol: float, tolerance: float) -> torch.Tensor:
    """``[R, M]`` bool: the entries each row's cap keeps (rows with more than ``k`` entries).

    ``d2`` ``[R, M]`` float64 Å² (inf where a slot holds no entry), ``neighbor``
    ``[R, M]`` and ``shift`` ``[R, M, 3]`` int64: the capped rows of :func:`cap_and_symmetrize`'s matrix.

    ``strict``: the ``k`` nearest, ties (to ``tie_rtol``, chained) broken by
    ``(j, S)``; else every entry with ``d² <= d²_(k+1) + tolerance``.
    """
    if not strict:
        pivot = torch.kthvalue(d2, k + 1, dim=1).values  # [R] the (k+1)-th nearest
        return d2 <= (pivot + tolerance)[:, None]
    value, order = torch.sort(d2, dim=1)  # [R, M] ascending, empty slots (inf) last
    link = torch.zeros_like(value, dtype=torch.bool)  # [R, M] same tie chain as the previous
    link[:, 1:] = (value[:, 1:] - value[:, :-1] <= tie_rtol * value[:, 1:]) & torch.isfinite(value[:, 1:])
    chain = torch.cumsum((~link).to(torch.int64), dim=1)  # [R, M] tie chain of each sorted entry
    group = chain[:, k - 1 : k]  # [R, 1] the chain through the k-th nearest: the tie group
    keep_sorted = chain < group  # [R, M] everything nearer than the group
    member = chain == group  # [R, M]
    cut = member[:, k]  # [R] the group reaches past the k-th: the cap chooses within it
    keep_sorted |= member & ~cut[:, None]  # a group the cap does not cut is kept whole
    rows = torch.nonzero(cut).squeeze(1)  # [Rc]
    if rows.numel():
        need = k - keep_sorted[rows].sum(dim=1)  # [Rc] members to keep in each cut group
        r, t = torch.nonzero(member[rows], as_tuple=True)  # [G] cut-group members (row in rows, position)
        col = order[rows[r], t]  # [G] their matrix columns
        j = neighbor[rows[r], col]
        s = shift[rows[r], col]  # [G, 3]
        by = lexsort([r, j, s[:, 0], s[:, 1], s[:, 2]])  # [G] row-major, then (j, S)
        size = torch.bincount(r, minlength=rows.numel())  # [Rc]
        start = torch.cumsum(size, 0) - size  # [Rc]
        rank = torch.empty_like(by)
        rank[by] = torch.arange(by.numel(), device=by.device) - start[r[by]]  # [G] rank within its group
        keep_sorted[rows[r], t] = rank < need[r]
    keep = torch.zeros_like(keep_sorted)
    keep.scatter_(1, order, keep_sorted)  # back from sorted positions to matrix columns
    return keep


def cap_and_symmetrize(
    d2: torch.Tensor,  # [N, M] float64 Å², inf where a slot holds no graph entry
    neighbor: torch.Tensor,  # [N, M] int64
    shift: torch.Tensor,  # [N, M, 3] int64
    k: int,
    strict: bool,
    tie_rtol: float,
    tolerance: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kept one-sided entries ``(i, j, S)`` of the full neighbour matrix, sorted by ``(i, j, S)``.

    Row ``i`` of the matrix is centre ``i``; returns ``centre`` ``[m]``,
    ``neighbor`` ``[m]`` (``j <= i``) and ``shift`` ``[m, 3]``, all int64.
    """
    N, M = d2.shape
    keep = torch.isfinite(d2)  # [N, M]
    if k > 0:
        capped = torch.nonzero(keep.sum(dim=1) > k).squeeze(1)  # [R]
        if capped.numel():
            keep[capped] = cap_rows(
                d2[capped], neighbor[capped], shift[capped], k, strict, tie_rtol, tolerance
            )
    centre = torch.arange(N, device=d2.device)[:, None].expand(N, M)  # [N, M]
    one_sided = (neighbor < centre) | ((neighbor == centre) & lex_negative(shift))
    i, col = torch.nonzero(keep & one_sided, as_tuple=True)  # [m]
    j, s = neighbor[i, col], shift[i, col]
    order = lexsort([i, j, s[:, 0], s[:, 1], s[:, 2]])
    return i[order], j[order], s[order]
