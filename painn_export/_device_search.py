"""The neighbour search of :mod:`painn_export.device_graphs`: nvalchemi-toolkit-ops' batched cell list.

Its traps, each handled here (and each shown in tests/test_device_graphs.py):
its cutoff is strict (``d² < c²``) and in its own arithmetic, so it is asked
for a slightly larger one and every bound is applied to our own d²; it keeps
coincident atoms (we drop them after the too-close check has seen them); it
refuses cells without volume, so the non-periodic axes of molecules, slabs
and wires get vacuum vectors (:func:`search_cell`); a row that overflows the
neighbour matrix is counted but not stored, so the search runs again, once,
as wide as the busiest row; on the CPU unused shift entries are not
initialised, so only counted entries are read; its import starts Warp,
which compiles kernels on first use and caches them (:func:`init_kernels`).
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import torch

from painn_export._device_cap import cap_and_symmetrize, squared_distances
from painn_export.neighbors import DEGENERACY_TOLERANCE, MIN_DISTANCE_SQ, TIE_RTOL

# The search is asked for this much more than the cutoff (relative, and Å):
# its strict bound in its own float64 arithmetic must not lose a pair at d == cutoff.
_SEARCH_SKIN = 1.0e-6
# Vacuum added to a non-periodic axis's search vector beyond the structure's extent (Å).
_VACUUM = 1.0
_INSTALL = "device graphs need nvalchemi-toolkit-ops: pip install 'painn-export[device-graphs]'"


def _warp():
    try:
        import warp
    except ImportError as exc:
        raise ImportError(_INSTALL) from exc
    return warp


def init_kernels(cache_dir: str | os.PathLike | None = None, quiet: bool = True) -> str:
    """Start Warp (once per process) and return the folder its compiled kernels are cached in.

    ``cache_dir``: where to cache them (Warp adds a folder per version);
    default ``$WARP_CACHE_PATH``, else the user's cache directory. Must be
    given before Warp starts: a different folder afterwards is an error.
    ``quiet`` keeps Warp's start-up banner off stdout (the pipeline's JSON).
    :func:`device_feed` calls this with the defaults when Warp is not started.
    Importing ``nvalchemiops`` starts Warp: call this before that.
    """
    wp = _warp()
    from warp._src import context

    if cache_dir is not None:
        wanted = os.path.join(os.path.realpath(cache_dir), wp.config.version)
        if context.runtime is not None:
            if os.path.realpath(wp.config.kernel_cache_dir) != wanted:
                raise RuntimeError(
                    f"Warp already started with its kernel cache in {wp.config.kernel_cache_dir}; "
                    f"call init_kernels({str(cache_dir)!r}) before any device graph"
                )
        else:
            wp.config.kernel_cache_dir = os.fspath(cache_dir)
    if context.runtime is None:
        if quiet:
            wp.config.log_level = max(wp.config.log_level, wp.LOG_WARNING)
        wp.init()
    return wp.config.kernel_cache_dir


def search_cell(pos, cell, periodic, system):
    """A cell the search accepts, and positions inside it: vacuum vectors on the non-periodic axes.

    Returns ``cell [S, 3, 3]`` whose periodic rows are the structure's and
    whose other rows are orthonormal to them and to each other, as long as
    the structure's extent along them plus ``_VACUUM``; and positions moved
    along those rows only (fractional coordinates along the periodic rows,
    hence every image offset, unchanged) to start at 0 on them.
    """
    S = cell.shape[0]
    frame = []  # [S, 3] unit vectors: the periodic rows orthonormalised, then the vacuum directions
    unit = torch.zeros(S, 3, 3, dtype=cell.dtype, device=cell.device)  # vacuum direction of each row

    def residual(v):
        for q in frame:
            v = v - (v * q).sum(dim=1, keepdim=True) * q
        return v

    def normalised(v, on):
        return torch.where(
            on[:, None], v / torch.linalg.vector_norm(v, dim=1, keepdim=True).clamp_min(1e-300), 0
        )

    for axis in range(3):
        frame.append(normalised(residual(cell[:, axis]), periodic[:, axis]))
    eye = torch.eye(3, dtype=cell.dtype, device=cell.device)
    for axis in range(3):
        candidates = torch.stack([residual(eye[e].expand(S, 3)) for e in range(3)], dim=1)  # [S, 3, 3]
        best = torch.linalg.vector_norm(candidates, dim=2).argmax(dim=1)  # [S] the one least in the span
        v = normalised(candidates[torch.arange(S, device=cell.device), best], ~periodic[:, axis])
        frame.append(v)
        unit[:, axis] = v
    along = torch.einsum("nx,nax->na", pos, unit[system])  # [N, 3] coordinate along each vacuum direction
    index = system[:, None].expand(-1, 3)
    lo = torch.full((S, 3), math.inf, dtype=pos.dtype, device=pos.device).scatter_reduce(
        0, index, along, "amin"
    )
    hi = torch.full((S, 3), -math.inf, dtype=pos.dtype, device=pos.device).scatter_reduce(
        0, index, along, "amax"
    )
    search = torch.where(periodic[:, :, None], cell, unit * (hi - lo + _VACUUM)[:, :, None])
    moved = pos - torch.einsum("na,nax->nx", lo[system], unit[system])
    return search, moved


def search_and_cap(pos, cell, periodic, counts, system, searched, cutoff, k, strict, first_width) -> dict:
    """The capped one-sided edges of the searched structures, and each structure's closest pair."""
    device, S = pos.device, counts.shape[0]
    closest = torch.full((S,), math.inf, dtype=torch.float64, device=device)
    index = torch.nonzero(searched[system]).squeeze(1)  # [Ns] searched atom -> batch atom
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    if not index.numel():
        return {"closest": closest, "centre": empty, "neighbor": empty, "shift": empty.view(0, 3)}
    # The search sees only the searched structures (it refuses cells without volume).
    kept = torch.nonzero(searched).squeeze(1)  # [Ss] searched structure -> batch structure
    compact = torch.cumsum(searched.to(torch.int64), 0) - 1  # [S] batch structure -> searched
    sub_system = system[index]  # [Ns] batch structure of each searched atom
    cell_for_search, moved = search_cell(pos[index], cell[kept], periodic[kept], compact[sub_system])
    width = first_width or _first_width(counts[searched.cpu()], cell[kept], periodic[kept], cutoff)
    neighbor, count, shift = _neighbor_matrix(
        moved, cutoff, cell_for_search, periodic[kept], compact[sub_system], width
    )
    M = neighbor.shape[1]
    filled = torch.arange(M, device=device)[None, :] < count[:, None]  # [Ns, M] entries it wrote
    rows = torch.arange(index.numel(), device=device)
    neighbor = torch.where(filled, neighbor.to(torch.int64), rows[:, None])  # [Ns, M] searched indices
    shift = torch.where(filled[:, :, None], shift.to(torch.int64), 0)  # [Ns, M, 3] (CPU: not initialised)
    d2 = squared_distances(pos[index], rows, cell[sub_system], neighbor, shift)  # [Ns, M]
    d2 = torch.where(filled, d2, math.inf)
    # Every pair found counts for the too-close check, those the graph drops included.
    closest = torch.sqrt(closest.scatter_reduce(0, sub_system, d2.min(dim=1).values, "amin"))
    d2 = torch.where((d2 > MIN_DISTANCE_SQ) & (d2 <= cutoff * cutoff), d2, math.inf)
    i, j, s = cap_and_symmetrize(d2, neighbor, shift, k, strict, TIE_RTOL, DEGENERACY_TOLERANCE)
    return {"closest": closest, "centre": index[i], "neighbor": index[j], "shift": s}


def _neighbor_matrix(pos, cutoff, cell, periodic, system, width):
    """``batch_cell_list``'s full list ``(neighbor [n, M] int32, count [n], shift [n, M, 3] int32)``.

    A row with more than ``width`` neighbours is counted but not stored: the
    search then runs once more, as wide as the busiest row.
    """
    init_kernels()  # before nvalchemiops, whose import starts Warp
    try:
        from nvalchemiops.torch.neighbors import batch_cell_list
    except ImportError as exc:
        raise ImportError(_INSTALL) from exc
    radius = cutoff * (1 + _SEARCH_SKIN) + _SEARCH_SKIN
    batch_idx = system.to(torch.int32)
    for _ in range(2):
        with warnings.catch_warnings():  # "the CPU version ... memory allocation": its own note
            warnings.simplefilter("ignore", UserWarning)
            neighbor, count, shift = batch_cell_list(
                pos, radius, cell, periodic, batch_idx, max_neighbors=max(int(width), 1)
            )
        busiest = int(count.max())
        if busiest <= neighbor.shape[1]:
            return neighbor, count, shift
        width = busiest
    raise RuntimeError(f"batch_cell_list stored {neighbor.shape[1]} of {busiest} neighbours twice")


def _first_width(counts, cell, periodic, cutoff) -> int:
    """Neighbour-matrix width of the first search: the expected busiest row, with a margin."""
    expected = expected_neighbors(
        counts.numpy(), cell.cpu().numpy(), periodic.cpu().numpy(), cutoff * (1 + _SEARCH_SKIN)
    )
    return math.ceil(1.25 * expected.max(initial=0) + 16)


def expected_neighbors(natoms, cells, pbc, cutoff: float) -> np.ndarray:
    """``[n_systems]`` float: neighbours per atom within ``cutoff`` at the structure's mean density (numpy).

    ``natoms`` times the ball of radius ``cutoff`` over the periodic
    lattice's measure, in as many dimensions as there are periodic axes
    (volume, area, length); ``natoms - 1`` (every other atom, a bound) for a
    molecule. Otherwise an estimate, not a bound: atoms may cluster.
    """
    natoms = np.asarray(natoms, dtype=np.float64)
    cells = np.asarray(cells, dtype=np.float64).reshape(-1, 3, 3)
    pbc = np.asarray(pbc, dtype=bool).reshape(-1, 3)
    rows = np.where(pbc[:, :, None], cells, 0.0)  # [S, 3, 3] the periodic rows
    p = pbc.sum(axis=1)
    area = sum(np.linalg.norm(np.cross(rows[:, u], rows[:, v]), axis=1) for u, v in [(0, 1), (1, 2), (0, 2)])
    measure = np.select(
        [p == 3, p == 2, p == 1],
        [np.abs(np.linalg.det(rows)), area, np.linalg.norm(rows, axis=2).sum(axis=1)],
        default=np.inf,
    )
    ball = np.select(
        [p == 3, p == 2, p == 1], [4.0 / 3.0 * math.pi * cutoff**3, math.pi * cutoff**2, 2 * cutoff]
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        dense = np.where(measure > 0, natoms * ball / measure, np.inf)
    return np.where(p == 0, np.maximum(natoms - 1, 0), dense)
