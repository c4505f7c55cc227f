"""Neighbour graphs and the model's feed built on a torch device, edge for edge the host path's.

The host path (:func:`painn_export.neighbors.neighbor_graph` per structure,
then :func:`painn_export.batch.collate`) costs tens of µs per atom at OCP
settings (12 Å, cap 50). :func:`device_feed` does the same work for a whole
batch on ``device``, a CUDA GPU or the CPU:

1. **Checks** (per structure, batched): ``empty_structure``,
   ``unknown_element`` (with ``num_elements``), ``nonfinite_positions``,
   ``bad_cell`` (as :func:`~painn_export.neighbors.validate_structure`),
   then after the search ``atoms_too_close`` (two atoms, or an atom and its
   own image, closer than ``min_separation``). Structures that fail are left
   out of the feed; :class:`GraphStatus` says why, per structure.
2. **Search** (:mod:`painn_export._device_search`): nvalchemi-toolkit-ops'
   batched cell list (NVIDIA Warp kernels) gives the full list as a padded
   neighbour matrix; that module says how each of its traps is handled
   (strict cutoff, coincident atoms kept, no cells without volume, silent
   overflow, uninitialised entries on the CPU). The squared distances are
   recomputed in float64 in the host kernel's order of operations.
3. **Cap and symmetrisation** (:mod:`painn_export._device_cap`): upstream's
   per-centre cap with our ``(d², j, S)`` tie rule and ``TIE_RTOL``, strict or
   not, then the one-sided symmetrisation, exactly as
   :mod:`painn_export.neighbors` documents.
4. **Slot layout** (:meth:`DeviceGraphs.feed`): the feed :func:`collate`
   makes, as torch tensors on ``device``.

Edge order. The one-sided edges are sorted by ``(receiver i, sender j, S)``,
then come their reverses in the same order: the order the host's
:func:`~painn_export.neighbors.neighbor_graph` lists them in too
(:func:`canonical_graph` puts any graph in it; on the host's graphs it
changes nothing). Slots, pairs and hence the float sums over slots follow
edge order, so the feed of the host's graphs is bitwise this feed
(tests/test_device_graphs.py), and the pipeline's two paths give the same
results bit for bit (tests/test_device_pipeline.py).

Warp compiles its kernels on the first call in a process (about 15 s per
device kind) and caches them on disk: in ``$WARP_CACHE_PATH`` when set, else
in the user's cache directory; :func:`init_kernels` sets the place.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from painn_export._device_cap import image_offsets
from painn_export._device_search import expected_neighbors, init_kernels, search_and_cap
from painn_export.batch import InvalidGraphError, canonical_graph
from painn_export.contract import slot_count
from painn_export.errors import RuntimeUnavailableError

__all__ = [
    "DeviceGraphs",
    "GraphStatus",
    "build_graphs",
    "canonical_graph",
    "device_feed",
    "expected_neighbors",
    "init_kernels",
    "join_graphs",
    "max_edges",
    "start",
    "structures_feed",
]

log = logging.getLogger(__name__)

INSTALL = "device graphs need nvalchemi-toolkit-ops: pip install 'painn-export[device-graphs]'"


def start() -> str:
    """Start Warp and import the search; return the kernel cache's folder.

    Not installed: :class:`~painn_export.errors.RuntimeUnavailableError`, one
    line saying what to install. The first build in a process compiles Warp's
    kernels (seconds to tens of seconds per device kind) unless its cache
    holds them: then one line on stderr (a log warning) says so.
    """
    try:
        cache = init_kernels()
        import nvalchemiops.torch.neighbors  # noqa: F401
    except ImportError as exc:
        raise RuntimeUnavailableError(INSTALL) from exc
    if not os.path.isdir(cache) or not os.listdir(cache):
        log.warning("device graphs: Warp compiles its kernels on this first run (cached in %s)", cache)
    return cache


def structures_feed(
    structures, *, cutoff: float, max_neighbors: int, device, dtype
) -> dict[str, torch.Tensor]:
    """The device feed of a few structures (``.positions``, ``.cell``, ``.pbc``, ``.atomic_numbers``).

    For callers whose structures must all have a graph (parity, the ASE
    calculator): a structure the pipeline would give a status (``bad_cell``,
    ...) raises InvalidGraphError naming it and why.
    """
    feed, status = device_feed(
        np.concatenate([np.asarray(s.positions, dtype=np.float64).reshape(-1, 3) for s in structures]),
        np.stack([np.asarray(s.cell, dtype=np.float64).reshape(3, 3) for s in structures]),
        np.stack([np.asarray(s.pbc, dtype=bool).reshape(3) for s in structures]),
        np.concatenate([np.asarray(s.atomic_numbers, dtype=np.int64).reshape(-1) for s in structures]),
        np.array([len(s.atomic_numbers) for s in structures]),
        cutoff=cutoff, max_neighbors=max_neighbors, device=device, dtype=dtype,
    )  # fmt: skip
    for k, (kind, message) in enumerate(zip(status.kind, status.message)):
        if kind != "ok":
            raise InvalidGraphError(f"structure {k}: {kind}: {message}")
    return feed


@dataclass(frozen=True)
class GraphStatus:
    """Per input structure: ``kind`` (``"ok"`` or the pipeline's status name) and a message."""

    kind: tuple[str, ...]  # [n_systems]
    message: tuple[str, ...]  # [n_systems], "" for ok
    # [n_systems] float64 Å: the shortest distance between two atoms or an atom
    # and its own image that the search found (inf: none, or not searched).
    min_distance: np.ndarray

    @property
    def in_feed(self) -> np.ndarray:
        """``[n_ok]`` int64: the input structures in the feed, in order."""
        return np.flatnonzero(np.array(self.kind) == "ok")


@dataclass(frozen=True)
class DeviceGraphs:
    """The graphs of a batch's ``ok`` structures, on the device (float64 geometry).

    Edges are in the order the module docstring gives, structure by
    structure; atom indices count over the ``ok`` structures' atoms.
    """

    status: GraphStatus
    atomic_numbers: torch.Tensor  # [n_atoms] int64
    positions: torch.Tensor  # [n_atoms, 3] float64, Å, as given
    cell: torch.Tensor  # [n_ok, 3, 3] float64, Å (non-finite non-periodic rows zeroed)
    natoms: torch.Tensor  # [n_ok] int64
    edge_index: torch.Tensor  # [2, n_edges] int64, (sender j, receiver i)
    cell_shift: torch.Tensor  # [n_edges, 3] int64, image offset of j
    edge_shift: torch.Tensor  # [n_edges, 3] float64, Å: cell_shift @ cell
    edge_reverse: torch.Tensor  # [n_edges] int64, index of each edge's reverse
    n_edges: np.ndarray  # [n_ok] int64 edges per structure
    max_degree: np.ndarray  # [n_ok] int64 most incoming edges of any atom, per structure

    def feed(
        self,
        dtype: torch.dtype = torch.float32,
        n_slots: int | None = None,
        n_pairs: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """The model's feed, keyed and laid out as :func:`painn_export.batch.collate`'s (see there)."""
        from painn_export._device_layout import slot_layout

        if not self.natoms.numel():
            raise InvalidGraphError("no graphs to collate: a feed needs at least one structure")
        need = int(self.max_degree.max())
        K = slot_count(need) if n_slots is None else int(n_slots)
        if K < max(need, 1):
            raise ValueError(f"n_slots={K} is fewer than the {max(need, 1)} slots the busiest atom needs")
        return slot_layout(self, dtype, K, n_pairs)

    def select(self, structures) -> DeviceGraphs:
        """The graphs of some of these structures (``[m]`` increasing indices into the ``ok`` ones).

        For packing: build a large chunk once, then cut it into batches by the
        exact ``n_edges`` and ``max_degree``; each batch's :meth:`feed` is the
        feed of those structures alone. ``status`` stays the whole chunk's.
        """
        device = self.positions.device
        chosen = np.asarray(structures, dtype=np.int64).reshape(-1)
        if chosen.size and (
            np.any(np.diff(chosen) <= 0) or chosen[0] < 0 or chosen[-1] >= self.natoms.numel()
        ):
            raise ValueError(f"structures must be increasing indices below {self.natoms.numel()}")
        keep = torch.zeros(self.natoms.numel(), dtype=torch.bool, device=device)
        keep[torch.as_tensor(chosen, device=device)] = True
        system = torch.repeat_interleave(torch.arange(self.natoms.numel(), device=device), self.natoms)
        atoms = keep[system]  # [n_atoms]
        new_atom = torch.cumsum(atoms.to(torch.int64), 0) - 1
        edges = atoms[self.edge_index[1]]  # [n_edges]
        new_edge = torch.cumsum(edges.to(torch.int64), 0) - 1
        return DeviceGraphs(
            status=self.status,
            atomic_numbers=self.atomic_numbers[atoms],
            positions=self.positions[atoms],
            cell=self.cell[keep],
            natoms=self.natoms[keep],
            edge_index=new_atom[self.edge_index[:, edges]],
            cell_shift=self.cell_shift[edges],
            edge_shift=self.edge_shift[edges],
            edge_reverse=new_edge[self.edge_reverse[edges]],
            n_edges=self.n_edges[chosen],
            max_degree=self.max_degree[chosen],
        )


def join_graphs(first: DeviceGraphs, second: DeviceGraphs) -> DeviceGraphs:
    """The graphs of ``first``'s structures, then ``second``'s, as one (on ``first``'s device).

    What :meth:`DeviceGraphs.select` of a larger build would give: each
    structure's edges, in order, with atom and edge indices moved past
    ``first``'s. ``status`` becomes the two statuses one after the other.
    """
    atoms, edges = first.positions.shape[0], first.edge_index.shape[1]
    status = GraphStatus(
        first.status.kind + second.status.kind,
        first.status.message + second.status.message,
        np.concatenate([first.status.min_distance, second.status.min_distance]),
    )
    return DeviceGraphs(
        status=status,
        atomic_numbers=torch.cat([first.atomic_numbers, second.atomic_numbers]),
        positions=torch.cat([first.positions, second.positions]),
        cell=torch.cat([first.cell, second.cell]),
        natoms=torch.cat([first.natoms, second.natoms]),
        edge_index=torch.cat([first.edge_index, second.edge_index + atoms], dim=1),
        cell_shift=torch.cat([first.cell_shift, second.cell_shift]),
        edge_shift=torch.cat([first.edge_shift, second.edge_shift]),
        edge_reverse=torch.cat([first.edge_reverse, second.edge_reverse + edges]),
        n_edges=np.concatenate([first.n_edges, second.n_edges]),
        max_degree=np.concatenate([first.max_degree, second.max_degree]),
    )


def device_feed(
    positions,
    cells,
    pbc,
    atomic_numbers,
    natoms,
    *,
    dtype: torch.dtype = torch.float32,
    n_slots: int | None = None,
    n_pairs: int | None = None,
    **settings,
) -> tuple[dict[str, torch.Tensor], GraphStatus]:
    """The feed of a batch's structures (those whose status is ``ok``), built on ``device``.

    Args: the structures and ``settings`` (``cutoff``, ``max_neighbors``,
    ``strict``, ``device``, ``min_separation``, ``num_elements``) as
    :func:`build_graphs` takes them; ``dtype``, ``n_slots`` and ``n_pairs`` as
    :func:`painn_export.batch.collate` takes them. Returns the feed (torch
    tensors on ``device``) and each input structure's :class:`GraphStatus`.
    Raises InvalidGraphError when no structure is ``ok``.
    """
    graphs = build_graphs(positions, cells, pbc, atomic_numbers, natoms, **settings)
    return graphs.feed(dtype, n_slots, n_pairs), graphs.status


def build_graphs(
    positions,
    cells,
    pbc,
    atomic_numbers,
    natoms,
    *,
    cutoff: float,
    max_neighbors: int,
    strict: bool = True,
    device: str | torch.device = "cpu",
    min_separation: float = 0.0,
    num_elements: int | None = None,
    _first_width: int | None = None,
) -> DeviceGraphs:
    """Graphs of a batch of structures, as :func:`~painn_export.neighbors.neighbor_graph` builds them.

    Args (numpy arrays or torch tensors; moved to ``device``):
        positions: ``[n_atoms, 3]`` Å, the structures' atoms one after another.
        cells: ``[n_systems, 3, 3]`` Å, rows are lattice vectors.
        pbc: ``[n_systems, 3]`` bool.
        atomic_numbers: ``[n_atoms]`` int.
        natoms: ``[n_systems]`` int, atoms per structure (0 allowed: ``empty_structure``).
        cutoff: Å, inclusive. max_neighbors: per-centre cap (``<= 0``: none).
        strict: upstream's ``enforce_max_neighbors_strictly``.
        device: where to build, e.g. ``"cuda:0"`` or ``"cpu"``.
        min_separation: Å; closer atoms (or images) make ``atoms_too_close``.
        num_elements: atomic numbers outside ``1..num_elements`` make
            ``unknown_element`` (None: not checked).
    """
    device = torch.device(device)
    pos = torch.as_tensor(positions, dtype=torch.float64).to(device)
    cell = torch.as_tensor(cells, dtype=torch.float64).to(device)
    periodic = torch.as_tensor(pbc, dtype=torch.bool).to(device)
    z = torch.as_tensor(atomic_numbers).to(device=device, dtype=torch.int64)
    counts = torch.as_tensor(natoms).to(dtype=torch.int64).cpu()
    S, N = counts.shape[0], pos.shape[0] if pos.ndim == 2 else -1
    for name, got, want in [
        ("positions", tuple(pos.shape), (N, 3)),
        ("cells", tuple(cell.shape), (S, 3, 3)),
        ("pbc", tuple(periodic.shape), (S, 3)),
        ("atomic_numbers", tuple(z.shape), (N,)),
        ("natoms", tuple(counts.shape), (S,)),
    ]:
        if got != want:
            raise ValueError(f"{name} must have shape {list(want)}, got {list(got)}")
    if int(counts.sum()) != N or bool((counts < 0).any()):
        raise ValueError(f"natoms must be >= 0 and sum to the {N} rows of positions, got {counts.tolist()}")
    system = torch.repeat_interleave(torch.arange(S, device=device), counts.to(device))  # [N]

    kind, message, cell = _checks(pos, cell, periodic, z, counts, system, num_elements)
    searched = torch.as_tensor(np.array(kind) == "ok", device=device)  # [S]
    graphs = search_and_cap(
        pos, cell, periodic, counts, system, searched, cutoff, max_neighbors, strict, _first_width
    )
    closest = graphs.pop("closest").cpu().numpy()  # [S]
    for s in np.flatnonzero((np.array(kind) == "ok") & (closest < min_separation)):
        what = "atoms or periodic images" if bool(periodic[s].any()) else "atoms"
        kind[s], message[s] = "atoms_too_close", f"{what} {closest[s]:.3g} Å apart (< {min_separation} Å)"
    status = GraphStatus(tuple(kind), tuple(message), closest)
    ok = torch.as_tensor(np.array(kind) == "ok", device=device)
    return _keep_structures(status, pos, z, cell, counts, system, ok, **graphs)


def _checks(pos, cell, periodic, z, counts, system, num_elements):
    """Statuses before the search (lists of str), and the cell with non-finite non-periodic rows zeroed."""
    S = counts.shape[0]
    flags = torch.zeros(S, 3, dtype=torch.int64, device=pos.device)  # unknown element, non-finite
    if num_elements is not None:
        flags[:, 0].index_add_(0, system, ((z < 1) | (z > num_elements)).to(torch.int64))
    flags[:, 1].index_add_(0, system, (~torch.isfinite(pos).all(dim=1)).to(torch.int64))
    finite_rows = torch.isfinite(cell).all(dim=2)  # [S, 3]
    bad_values = (periodic & ~finite_rows).any(dim=1)  # [S]
    cell = torch.where(finite_rows[:, :, None], cell, torch.zeros_like(cell))
    flags[:, 2] = (bad_values | _dependent(cell, periodic)).to(torch.int64)
    flags = flags.cpu().numpy()
    kind, message = ["ok"] * S, [""] * S
    for s in np.flatnonzero((counts.numpy() == 0) | flags.any(axis=1)):  # only the failing structures
        if counts[s] == 0:
            kind[s], message[s] = "empty_structure", "structure has no atoms"
        elif flags[s, 0]:
            zs = z[system == s].cpu().numpy()
            bad = sorted({int(v) for v in zs if not 1 <= v <= num_elements})
            kind[s], message[s] = "unknown_element", f"atomic numbers outside 1..{num_elements}: {bad}"
        elif flags[s, 1]:
            kind[s], message[s] = "nonfinite_positions", "positions contain NaN or inf"
        elif bool(bad_values[s]):
            kind[s], message[s] = "bad_cell", "a periodic lattice vector contains NaN or inf"
        else:
            axes = torch.nonzero(periodic[s]).squeeze(1).tolist()
            kind[s], message[s] = "bad_cell", f"periodic lattice vectors {axes} are zero or not independent"
    return kind, message, cell


def _dependent(cell: torch.Tensor, periodic: torch.Tensor) -> torch.Tensor:
    """``[S]`` bool: the periodic rows are zero or not independent (validate_structure's test).

    Their Gram determinant (squared volume, area or length) against
    ``(1e-9 * product of their norms)²``, in closed form: equal to the host's
    LU determinant but for a cell within rounding of that threshold.
    """
    rows = torch.where(periodic[:, :, None], cell, torch.zeros_like(cell))  # [S, 3, 3]
    norms = torch.linalg.vector_norm(rows, dim=2)  # [S, 3]
    p = periodic.sum(dim=1)  # [S]
    a, b, c = rows[:, 0], rows[:, 1], rows[:, 2]
    volume_sq = torch.linalg.det(rows) ** 2
    area_sq = sum(  # exactly one term is non-zero when two rows are periodic
        (torch.linalg.vector_norm(torch.cross(u, v, dim=1), dim=1) ** 2) for u, v in [(a, b), (b, c), (a, c)]
    )
    length_sq = (norms**2).sum(dim=1)
    span_sq = torch.where(p == 3, volume_sq, torch.where(p == 2, area_sq, length_sq))
    scale = torch.where(periodic, norms, torch.ones_like(norms)).prod(dim=1)
    zero = ((norms == 0) & periodic).any(dim=1)
    return (p > 0) & (zero | (span_sq <= (1e-9 * scale) ** 2))


def max_edges(natoms, *, max_neighbors: int, strict: bool = True, pbc=None) -> np.ndarray:
    """``[n_systems]`` int64: no structure's graph has more edges than this (numpy only).

    With upstream's strict cap each centre keeps at most ``k`` one-sided
    edges, each listed with its reverse: ``2 * natoms * k``; a molecule has
    at most ``natoms * (natoms - 1)`` (give ``pbc [n_systems, 3]`` to use it).
    Without a strict cap there is no bound: ValueError.
    """
    if not strict or max_neighbors <= 0:
        raise ValueError("only a strict cap (max_neighbors > 0, strict=True) bounds the edges")
    natoms = np.asarray(natoms, dtype=np.int64)
    bound = 2 * natoms * int(max_neighbors)
    if pbc is not None:
        molecule = ~np.asarray(pbc, dtype=bool).reshape(-1, 3).any(axis=1)
        bound = np.where(molecule, np.minimum(bound, natoms * np.maximum(natoms - 1, 0)), bound)
    return bound


def _keep_structures(status, pos, z, cell, counts, system, ok, closest=None, centre=None, **edges):
    """The :class:`DeviceGraphs` of the ``ok`` structures: atoms and edges renumbered over them."""
    device = pos.device
    atoms = ok[system]  # [N]
    new_index = torch.cumsum(atoms.to(torch.int64), 0) - 1  # [N] batch atom -> feed atom
    keep = atoms[centre]  # [m] edges never cross structures
    i, j, s = new_index[centre[keep]], new_index[edges["neighbor"][keep]], edges["shift"][keep]
    natoms = counts.to(device)[ok]  # [n_ok]
    n_ok = natoms.shape[0]
    sys_of_edge = system[centre[keep]]  # [m] batch structure
    rank = torch.cumsum(ok.to(torch.int64), 0) - 1
    one_sided = torch.bincount(rank[sys_of_edge], minlength=n_ok)  # [n_ok]
    before = torch.cumsum(one_sided, 0) - one_sided
    t = torch.arange(i.numel(), device=device)
    first = t + before[rank[sys_of_edge]]  # [m] position of each one-sided edge in the edge list
    second = first + one_sided[rank[sys_of_edge]]  # [m] position of its reverse
    E = 2 * i.numel()
    edge_index = torch.empty(2, E, dtype=torch.int64, device=device)
    cell_shift = torch.empty(E, 3, dtype=torch.int64, device=device)
    edge_index[0, first], edge_index[1, first] = j, i
    edge_index[0, second], edge_index[1, second] = i, j
    cell_shift[first], cell_shift[second] = s, -s
    # S @ cell of the one-sided edge, negated for its reverse (signed zeros as the host's)
    offset = image_offsets(cell[sys_of_edge], s)  # [m, 3] float64 Å
    edge_shift = torch.empty(E, 3, dtype=torch.float64, device=device)
    edge_shift[first], edge_shift[second] = offset, -offset
    edge_reverse = torch.empty(E, dtype=torch.int64, device=device)
    edge_reverse[first], edge_reverse[second] = second, first
    n_atoms = int(atoms.sum())
    degree = torch.bincount(edge_index[1], minlength=n_atoms)  # [n_atoms]
    feed_system = torch.repeat_interleave(torch.arange(n_ok, device=device), natoms)
    max_degree = torch.zeros(n_ok, dtype=torch.int64, device=device).scatter_reduce(
        0, feed_system, degree, "amax"
    )
    return DeviceGraphs(
        status=status,
        atomic_numbers=z[atoms],
        positions=pos[atoms],
        cell=cell[ok],
        natoms=natoms,
        edge_index=edge_index,
        cell_shift=cell_shift,
        edge_shift=edge_shift,
        edge_reverse=edge_reverse,
        n_edges=(2 * one_sided).cpu().numpy(),
        max_degree=max_degree.cpu().numpy(),
    )
