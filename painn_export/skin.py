"""Graphs of moving structures (MD, relaxations), searched again only when needed: a Verlet skin.

A :class:`SkinGraph` keeps, per structure, the pairs within ``cutoff +
skin`` found by its last search. At each update their distances are
recomputed at the new positions, and the cutoff, upstream's cap and
symmetrisation, the canonical edge order and the slot layout are applied:
exactly :func:`painn_export.neighbors.neighbor_graph`'s graph, as long as no
pair the list lacks can have come within the cutoff. That holds while no
atom has moved more than ``skin / 2`` since the search; a new search happens
when one has, or when pbc or the atoms change. Positions must not be
re-wrapped into the cell between searches (ASE's dynamics do not wrap).

A periodic cell may change too (a cell relaxation): with ``M = cell0⁻¹
cell`` (the strain since the search) and ``u = x - x0 M`` each atom's
displacement beyond the affine one, a pair's vector is ``r0 M + u_b - u_a``,
so a pair the search did not list (``|r0| > cutoff + skin``) is still beyond
the cutoff while ``2 max |u| <= σ_min(M) (cutoff + skin) - cutoff``
(``σ_min``: M's smallest singular value). Searched again only when that
fails; with the cell unchanged it is the ``skin / 2`` test. A cell that is
not periodic on every axis searches again whenever it changes.

:func:`update_skins` updates many structures in one pass (a relaxation's
whole batch): the skin tests are vectorised over the batch, and one compiled
call (:func:`painn_export._neighbors_kernel.skin_graphs`) writes every structure's graph.
:meth:`SkinGraph.update` is that pass for one structure; each structure's
numbers are the same whatever else is updated with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from painn_export.batch import Graph, even_runs
from painn_export.neighbors import (
    DEGENERACY_TOLERANCE,
    MIN_DISTANCE_SQ,
    TIE_RTOL,
    StructureError,
    _image_search,
    _search,
    validate_structure,
)

GROUPS = 4  # with a pool: the compiled pass runs on this many groups of structures, about equal in pairs
POOL_PAIRS = 1 << 17  # ... when they hold this many pairs (fewer: the hand-offs cost more than they save)


class SkinGraph:
    """One structure's skin list (module doc); :meth:`update` gives its graph at new positions."""

    def __init__(self, cutoff: float, max_neighbors: int, skin: float = 0.5, strict: bool = True) -> None:
        if skin < 0:
            raise ValueError(f"skin must be >= 0 Å, got {skin}")
        self.cutoff, self.max_neighbors, self.skin, self.strict = cutoff, max_neighbors, skin, strict
        self.n_searches = 0
        self._z = None  # [n] int64 atomic numbers of the last search
        self._pbc = None  # [bool, bool, bool] of the last search (a list: compared in ~0.2 µs)
        self._ref_positions = None  # [n, 3] float64 Å at the last search
        self._ref_cell = None  # [3, 3] float64 Å at the last search
        self._pairs = None  # (a [P], b [P], S [P, 3]): the half list within cutoff + skin

    def update(self, atomic_numbers, positions, cell, pbc) -> Graph:
        """The graph at ``positions`` ``[n, 3]`` Å, ``cell`` ``[3, 3]`` Å, ``pbc`` ``[3]``.

        Raises :class:`~painn_export.neighbors.StructureError` for NaN
        positions, bad shapes or a singular periodic cell.
        """
        positions, cell, pbc = validate_structure(positions, cell, pbc)
        z = np.asarray(atomic_numbers, dtype=np.int64)
        if z.shape != (positions.shape[0],):
            raise StructureError("bad_shape", f"atomic_numbers must be [{positions.shape[0]}], got {z.shape}")
        (graph,) = update_skins([self], [z], [positions], [cell], [pbc])
        if isinstance(graph, StructureError):
            raise graph
        return graph

    def _needs_search(self, z, pbc) -> bool:
        """True when there is no list yet, or the atoms or pbc changed since it was made."""
        if self._pairs is None:
            return True
        same_z = z is self._z or np.array_equal(z, self._z)
        return not (same_z and pbc.tolist() == self._pbc)

    def _search(self, z, positions, cell, pbc) -> None:
        from painn_export._neighbors_kernel import canonical_pairs

        # Coincident atoms stay in the list: they set min_distance now, and may part before the next search.
        reach = self.cutoff + self.skin
        # Small structures: the same pairs, found faster (None: more work than vesin's search).
        pairs = _image_search(positions, cell, pbc, reach, min_d2=-1.0)
        if pairs is not None:
            self._pairs = pairs
        else:
            a, b, S, _, _ = _search(positions, cell, pbc, reach, min_d2=-1.0)
            order = canonical_pairs(a, b, S, len(positions))
            self._pairs = (a[order], b[order], S[order])  # own copies (vesin reuses its buffers), sorted once
        self._z, self._pbc = z, pbc.tolist()
        self._ref_positions, self._ref_cell = positions.copy(), cell.copy()
        self.n_searches += 1


def update_skins(
    skins: Sequence[SkinGraph],
    atomic_numbers: Sequence[np.ndarray],
    positions: Sequence[np.ndarray],
    cells: Sequence[np.ndarray],
    pbcs: Sequence[np.ndarray],
    pool: ThreadPoolExecutor | None = None,
) -> list[Graph | StructureError]:
    """Each structure's graph at its new geometry, or the StructureError it cannot have one for.

    Args (one entry per structure, ``B`` in all):
        skins: the structures' :class:`SkinGraph` (updated in place; all with
            one cutoff, cap, skin and strictness).
        atomic_numbers: ``[n]`` int64.
        positions: ``[n, 3]`` float64 Å.
        cells: ``[3, 3]`` float64 Å, rows are lattice vectors.
        pbcs: ``[3]`` bool.
        pool: threads to share the work (the searches, and the compiled pass
            over groups of structures from :data:`POOL_PAIRS` pairs on); None:
            this thread. The graphs are the same bits either way: each
            structure's arithmetic is its own.

    Positions that are not finite and periodic cells that are singular give
    the :class:`~painn_export.neighbors.StructureError` that
    :func:`~painn_export.neighbors.validate_structure` raises, in that
    structure's place; wrong shapes or dtypes raise ``ValueError``.
    """
    B = len(skins)
    if not B:
        return []
    first = skins[0]
    settings = (first.cutoff, first.max_neighbors, first.skin, first.strict)
    if any((s.cutoff, s.max_neighbors, s.skin, s.strict) != settings for s in skins):
        raise ValueError("update_skins takes skins of one cutoff, cap, skin and strictness")
    natoms = np.array([len(x) for x in positions], dtype=np.int64)
    for x, z, c, p in zip(positions, atomic_numbers, cells, pbcs):
        if x.dtype != np.float64 or x.ndim != 2 or x.shape[1] != 3 or z.shape != x.shape[:1]:
            raise ValueError("update_skins takes float64 [n, 3] positions and [n] atomic numbers")
        if c.shape != (3, 3) or p.shape != (3,) or p.dtype != np.bool_:
            raise ValueError("update_skins takes [3, 3] cells and [3] bool pbc")
    atom_start = np.concatenate([[0], np.cumsum(natoms)])
    of_atom = np.repeat(np.arange(B), natoms)  # [N] each atom's structure
    pos = np.concatenate(positions)  # [N, 3]
    cell = np.array(cells, dtype=np.float64)  # [B, 3, 3]
    pbc = np.array(pbcs, dtype=bool)  # [B, 3]
    # A non-periodic axis's vector that is not finite is dropped, as validate_structure does.
    cell[~np.isfinite(cell).all(axis=2) & ~pbc] = 0.0
    failed: dict[int, StructureError] = {}
    for s in np.flatnonzero(natoms == 0):
        failed[int(s)] = StructureError("empty_structure", "structure has no atoms")
    for s in np.unique(of_atom[~np.isfinite(pos).all(axis=1)]):
        failed[int(s)] = StructureError("nonfinite_positions", "positions contain NaN or inf")

    search = np.array([sk._needs_search(z, p) for sk, z, p in zip(skins, atomic_numbers, pbcs)])
    known = np.flatnonzero(~search)  # each has a list, hence atoms
    if known.size:
        ref_cell = np.array([skins[s]._ref_cell for s in known])  # [b, 3, 3]
        same = np.all(cell[known] == ref_cell, axis=(1, 2))
        # Unchanged cells: the skin / 2 test; strained periodic cells: the strain test (module doc).
        search[known[same]] = _moved(skins, known[same], pos, atom_start, None) > first.skin / 2
        strained = known[~same]
        periodic = pbc[strained].all(axis=1)
        search[strained[~periodic]] = True  # a cell that is not periodic everywhere: search again
        strained = strained[periodic]
        if strained.size:
            ref = ref_cell[~same][periodic]
            with np.errstate(all="ignore"):  # a collapsed or NaN cell: not finite, searched (and refused)
                strain = np.linalg.solve(ref, cell[strained])  # [b, 3, 3] M: cell = cell0 @ M
                finite = np.isfinite(strain).all(axis=(1, 2))
                strain[~finite] = np.eye(3)
                beyond = _moved(skins, strained, pos, atom_start, strain)
                sigma = np.linalg.svd(strain, compute_uv=False)[:, -1]
            reach = first.cutoff + first.skin
            search[strained] = ~finite | ~(2 * beyond <= sigma * reach - first.cutoff)

    def search_one(s: int) -> StructureError | None:
        x = pos[atom_start[s] : atom_start[s + 1]]
        try:
            _, cell[s], _ = validate_structure(x, cell[s], pbc[s])
        except StructureError as exc:
            return exc
        skins[s]._search(atomic_numbers[s], x, cell[s], pbc[s])
        return None

    again = [int(s) for s in np.flatnonzero(search) if s not in failed]
    for s, error in zip(again, _map(pool, search_one, again)):
        if error is not None:
            failed[s] = error
    return _graphs(skins, atomic_numbers, positions, pos, cell, atom_start, failed, pool)


def _map(pool: ThreadPoolExecutor | None, function, items: list) -> list:
    """``[function(x) for x in items]``, on ``pool``'s threads when there is more than one item."""
    if pool is None or len(items) < 2:
        return [function(x) for x in items]
    return list(pool.map(function, items))


def _moved(skins, which: np.ndarray, pos: np.ndarray, atom_start: np.ndarray, strain) -> np.ndarray:
    """``[b]`` each structure's largest displacement (Å) since its search, beyond ``strain`` ``[b, 3, 3]``.

    ``strain`` None: the plain displacement ``x - x0``; else ``x - x0 M``.
    """
    if not which.size:
        return np.zeros(0)
    counts = atom_start[which + 1] - atom_start[which]
    before = np.cumsum(counts) - counts  # [b] each structure's first row among the rows taken
    rows = np.arange(int(counts.sum())) + np.repeat(atom_start[which] - before, counts)  # [n] into pos
    ref = np.concatenate([skins[s]._ref_positions for s in which])  # [n, 3]
    if strain is not None:
        ref = np.einsum("ai,aij->aj", ref, np.repeat(strain, counts, axis=0))
    d = pos[rows] - ref
    return np.sqrt(np.maximum.reduceat(np.sum(d * d, axis=1), np.cumsum(counts) - counts))


def _graphs(skins, atomic_numbers, positions, pos, cell, atom_start, failed, pool) -> list:
    """Every structure's graph from its pairs, in compiled calls (one per group of structures, on
    ``pool``'s threads); ``failed`` ones keep their error."""
    B = len(skins)
    ok = [s for s in range(B) if s not in failed]
    out: list = [failed.get(s) for s in range(B)]
    if not ok:
        return out
    n_pairs = np.array([len(skins[s]._pairs[0]) for s in ok], dtype=np.int64)
    parts = 1 if pool is None or n_pairs.sum() < POOL_PAIRS else GROUPS
    groups = [ok[t0:t1] for t0, t1 in even_runs(n_pairs, parts)]  # about equal pairs: the kernel's work

    def group_graphs(group: list[int]) -> list[tuple[int, Graph]]:
        return _group_graphs(skins, atomic_numbers, positions, pos, cell, atom_start, group)

    for done in _map(pool, group_graphs, groups):
        for s, graph in done:
            out[s] = graph
    return out


def _group_graphs(skins, atomic_numbers, positions, pos, cell, atom_start, group) -> list:
    """``(s, graph)`` of the structures ``group`` (ascending), from one compiled call."""
    from painn_export._neighbors_kernel import skin_graphs

    first = skins[0]
    if len(group) < len(skins):  # the kernel sees these structures only
        pos = np.concatenate([positions[s] for s in group])
        cell = cell[group]
        atom_start = np.concatenate([[0], np.cumsum([len(positions[s]) for s in group])])
    pairs = [skins[s]._pairs for s in group]
    n_pairs = np.array([len(p[0]) for p in pairs], dtype=np.int64)
    pair_start = np.concatenate([[0], np.cumsum(n_pairs)])
    a = np.concatenate([p[0] for p in pairs]).astype(np.int64, copy=False)
    b = np.concatenate([p[1] for p in pairs]).astype(np.int64, copy=False)
    S = np.concatenate([p[2] for p in pairs]).astype(np.int32, copy=False).reshape(-1, 3)
    r2 = first.cutoff * first.cutoff
    index, shift, edge_shift, slot, reverse, edge_start, closest, degree = skin_graphs(
        pos, cell, atom_start, a, b, S, pair_start, r2, MIN_DISTANCE_SQ,
        first.max_neighbors, first.strict, TIE_RTOL, DEGENERACY_TOLERANCE,
    )  # fmt: skip
    for shared in (index, shift, edge_shift, slot, reverse):  # views of these are every graph's arrays
        shared.flags.writeable = False
    out = []
    for t, s in enumerate(group):
        e0, e1 = int(edge_start[t]), int(edge_start[t + 1])
        # Checked by construction (the kernel writes each reverse at e ± E/2, no zero-length edge,
        # atoms of the structure only); tests/test_skin.py compares them with Graph's own checks.
        out.append(
            (
                s,
                Graph.from_checked(
                    atomic_numbers=atomic_numbers[s],
                    positions=positions[s],
                    edge_index=index[:, e0:e1],
                    cell_shift=shift[e0:e1],
                    edge_shift=edge_shift[e0:e1],
                    cell=cell[t],
                    edge_slot=slot[e0:e1],
                    edge_reverse=reverse[e0:e1],
                    min_distance=float(closest[t]),
                    max_degree=int(degree[t]),
                    edge_span=(index, slot, reverse, edge_shift, e0, e1),  # collate reads these in place
                ),
            )
        )
    return out
