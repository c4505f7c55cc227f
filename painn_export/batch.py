"""One structure's graph, and many graphs packed into one flat model feed.

Geometry conventions, written once:

- ``cell`` rows are the lattice vectors ``a1, a2, a3`` (Å); a Cartesian image
  offset is ``S @ cell`` for integer ``S`` ``[3]``.
- An edge ``e`` has a sender ``j = edge_index[0, e]`` (the neighbour) and a
  receiver ``i = edge_index[1, e]`` (the centre); ``cell_shift[e]`` is the
  image of ``j``; ``edge_shift[e] = cell_shift[e] @ cell`` (Å), so the edge
  vector ``x_j + edge_shift - x_i`` points from ``i`` to ``j``.
- Graphs are symmetric: every edge ``(j, i, S)`` has its reverse ``(i, j, -S)``.

The model does not take the edge list: it takes the neighbour-major ("slot",
ELL) layout of :mod:`painn_export.contract`, which :func:`collate` builds from
each graph's edge list (its invariants: :mod:`painn_export.slots`). Each edge
``e`` goes to slot ``edge_slot[e]`` of its receiver's row (its rank among the
receiver's incoming edges, in edge order); ``edge_reverse[e]`` is the index
of its reverse edge, which the gradient of a gather reads.

A :class:`Graph` that a caller builds is checked where it is made: indices
in range, shapes that agree, every edge's reverse present, and no edge from
an atom to itself in the same image (zero length; the only edge that is its
own reverse). Self-edges through a periodic image and repeated edges are
valid and are evaluated as upstream would (each counts once per listing).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from painn_export.contract import slot_count

COLLATE_GROUPS = 4  # collate with a pool: the layout is written in this many groups of graphs
COLLATE_POOL_SLOTS = 1 << 16  # ... when it has at least this many slots (less: the hand-off costs more)
# What a Graph may hold beyond its fields (in its __dict__, derived, never compared or pickled as fields):
# its busiest atom's edges, once found (Graph.max_degree); and, from a builder that writes many graphs'
# edges into one set of arrays (painn_export.skin), the mark (edge_index [2, E] int64, edge_slot [E]
# int64, edge_reverse [E] int64, edge_shift [E, 3] float64, e0, e1): its edges are those arrays' columns
# e0:e1, so collate reads consecutive graphs of one set in place instead of joining copies.
_MAX_DEGREE = "_max_degree"
_SPAN = "_edge_span"


class InvalidGraphError(ValueError):
    """A graph the model cannot evaluate; the message names the first offending edge or array."""


class AsymmetricGraphError(InvalidGraphError):
    """An edge list without the reverse ``(i, j, -S)`` of some edge ``(j, i, S)``."""


def reverse_edges(edge_index: np.ndarray, cell_shift: np.ndarray) -> np.ndarray:
    """``[n_edges]`` index of each edge's reverse ``(i, j, -S)``; raises if one is missing.

    Graphs from :func:`painn_export.neighbors.neighbor_graph` list their
    one-sided pairs and then the reverses in the same order, so the reverse
    of ``e`` is ``(e + n_edges / 2) mod n_edges``: checked in one pass, the
    general matching (a sort of both key sets) runs only when that fails.
    """
    n = edge_index.shape[1]
    edge_index = np.asarray(edge_index, dtype=np.int64)
    cell_shift = np.asarray(cell_shift, dtype=np.int64).reshape(n, 3)
    if n % 2 == 0:
        half = n // 2
        if np.array_equal(edge_index[:, :half], edge_index[::-1, half:]) and np.array_equal(
            cell_shift[:half], -cell_shift[half:]
        ):
            return np.concatenate([np.arange(half, n), np.arange(half)]).astype(np.int64)
    # General case: match each edge's key (j, i, S) with the keys (i, j, -S).
    keys = np.ascontiguousarray(np.concatenate([edge_index.T, cell_shift], axis=1))  # [n, 5]
    wanted = np.ascontiguousarray(np.concatenate([edge_index[::-1].T, -cell_shift], axis=1))  # [n, 5]
    order_keys = np.lexsort(keys.T[::-1])
    order_wanted = np.lexsort(wanted.T[::-1])
    if not np.array_equal(keys[order_keys], wanted[order_wanted]):
        row = np.dtype((np.void, 5 * 8))
        missing = np.flatnonzero(~np.isin(wanted.view(row).ravel(), keys.view(row).ravel()))
        what = (
            f"edge {int(missing[0])} (j={keys[missing[0], 0]}, i={keys[missing[0], 1]}, "
            f"S={keys[missing[0], 2:].tolist()}) has no reverse (i, j, -S)"
            if missing.size
            else "some edge appears more often than its reverse"
        )
        raise AsymmetricGraphError(
            f"the graph is not symmetric: {what}; the model needs every edge's reverse, "
            "as painn_export.neighbors.neighbor_graph builds"
        )
    reverse = np.empty(n, dtype=np.int64)
    reverse[order_wanted] = order_keys
    return reverse


def slots_within_receiver(receivers: np.ndarray, n_atoms: int) -> np.ndarray:
    """``[n_edges]`` rank of each edge among its receiver's edges, in edge order."""
    receivers = np.asarray(receivers, dtype=np.int64)
    order = np.argsort(receivers, kind="stable")
    degree = np.bincount(receivers, minlength=n_atoms)
    start = np.concatenate([[0], np.cumsum(degree)[:-1]])
    slot = np.empty(len(receivers), dtype=np.int64)
    slot[order] = np.arange(len(receivers)) - start[receivers[order]]
    return slot


@dataclass(frozen=True)
class Graph:
    """Model inputs of one structure (numpy, float64 geometry). Its arrays are not changed in place
    once it is made (what it finds from them, such as :attr:`max_degree`, is kept)."""

    atomic_numbers: np.ndarray  # [n_atoms] int64
    positions: np.ndarray  # [n_atoms, 3] float64, Å
    edge_index: np.ndarray  # [2, n_edges] int64, (sender j, receiver i)
    cell_shift: np.ndarray  # [n_edges, 3] int64, image offset of j
    edge_shift: np.ndarray  # [n_edges, 3] float64, Å
    cell: np.ndarray | None = None  # [3, 3] float64, Å, rows = lattice vectors (stress only)
    edge_slot: np.ndarray | None = None  # [n_edges] slot of each edge in its receiver's row
    edge_reverse: np.ndarray | None = None  # [n_edges] index of the reverse edge
    # Å: the shortest distance between two atoms, or an atom and its own image,
    # found by the search (pairs the graph drops included); inf if none.
    min_distance: float = float("inf")

    def __post_init__(self) -> None:
        self._check()
        # Derived once where the graph is built (a neighbour worker), never per batch;
        # a caller's own are checked (O(E)): a wrong one would give wrong numbers silently.
        if self.edge_slot is None:
            object.__setattr__(self, "edge_slot", slots_within_receiver(self.edge_index[1], self.n_atoms))
        else:
            self._check_slots()
        if self.edge_reverse is None:
            object.__setattr__(self, "edge_reverse", reverse_edges(self.edge_index, self.cell_shift))
        else:
            self._check_reverse()

    @classmethod
    def from_checked(
        cls, *, max_degree: int | None = None, edge_span: tuple | None = None, **fields
    ) -> Graph:
        """The graph of ``fields`` that hold :class:`Graph`'s checks already: no second check.

        For arrays taken from a checked graph (built in another process, or
        narrowed), or written by a builder whose tests hold its output to the
        checks (:func:`painn_export.skin.update_skins`). ``max_degree``: the
        builder's count of the busiest atom's edges (``edge_slot.max() + 1``),
        if it has one, held to :attr:`max_degree` by the same tests.
        ``edge_span``: ``(edge_index, edge_slot, edge_reverse, edge_shift, e0,
        e1)`` when the edge fields are columns ``e0:e1`` of those arrays,
        which the builder wrote for many graphs (:data:`_SPAN`). What another
        graph derived (its ``vars`` beyond :meth:`fields`) is not carried over.
        """
        for derived in (_MAX_DEGREE, _SPAN):  # another graph's: not true of these fields
            fields.pop(derived, None)
        unknown = fields.keys() - cls.__dataclass_fields__.keys()  # (dataclasses.fields: ~4 µs a call)
        if unknown:
            raise TypeError(f"Graph has no field {', '.join(sorted(unknown))}")
        graph = cls.__new__(cls)
        graph.__dict__.update(fields)
        if max_degree is not None:
            graph.__dict__[_MAX_DEGREE] = int(max_degree)
        if edge_span is not None:
            graph.__dict__[_SPAN] = edge_span
        return graph

    def fields(self) -> dict:
        """The graph's fields by name (what :class:`Graph` and :meth:`from_checked` take)."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    def __getstate__(self) -> dict:
        """What pickles: the fields (and a found ``max_degree``), never a builder's shared arrays."""
        state = dict(self.__dict__)
        state.pop(_SPAN, None)
        return state

    def _check_slots(self) -> None:
        slot = np.asarray(self.edge_slot, dtype=np.int64)
        if slot.shape != (self.n_edges,) or (self.n_edges and slot.min() < 0):
            raise InvalidGraphError(
                f"Graph.edge_slot must be {self.n_edges} slots >= 0, got shape {slot.shape}"
            )
        key = np.asarray(self.edge_index[1], dtype=np.int64) * (int(slot.max(initial=0)) + 1) + slot
        if np.unique(key).size != self.n_edges:
            raise InvalidGraphError("Graph.edge_slot puts two edges of one receiver in the same slot")

    def _check_reverse(self) -> None:
        rev = np.asarray(self.edge_reverse, dtype=np.int64)
        n = self.n_edges
        if rev.shape != (n,) or (n and (rev.min() < 0 or rev.max() >= n)):
            raise InvalidGraphError(f"Graph.edge_reverse must be {n} edge indices, got shape {rev.shape}")
        index = np.asarray(self.edge_index, dtype=np.int64)
        shift = np.asarray(self.cell_shift, dtype=np.int64)
        wrong = (
            (rev[rev] != np.arange(n))
            | (index[0, rev] != index[1])
            | (index[1, rev] != index[0])
            | np.any(shift[rev] != -shift, axis=1)
        )
        if wrong.any():
            e = int(np.flatnonzero(wrong)[0])
            raise InvalidGraphError(
                f"Graph.edge_reverse[{e}] = {int(rev[e])} is not the reverse (i, j, -S) of edge {e}"
            )

    def _check(self) -> None:
        n, e = self.n_atoms, self.edge_index.shape[-1] if self.edge_index.ndim == 2 else -1
        shapes = {
            "atomic_numbers": (self.atomic_numbers.shape, (n,)),
            "positions": (self.positions.shape, (n, 3)),
            "edge_index": (self.edge_index.shape, (2, e)),
            "cell_shift": (self.cell_shift.shape, (e, 3)),
            "edge_shift": (self.edge_shift.shape, (e, 3)),
        }
        for name, (got, want) in shapes.items():
            if got != want:
                raise InvalidGraphError(f"Graph.{name} has shape {got}, expected {want}")
        if n == 0:
            raise InvalidGraphError("a graph with no atoms has nothing to evaluate")
        if e and (self.edge_index.min() < 0 or self.edge_index.max() >= n):
            bad = int(np.flatnonzero((self.edge_index < 0).any(0) | (self.edge_index >= n).any(0))[0])
            raise InvalidGraphError(
                f"edge {bad} (j={self.edge_index[0, bad]}, i={self.edge_index[1, bad]}) names an atom "
                f"outside 0..{n - 1}"
            )
        loops = (self.edge_index[0] == self.edge_index[1]) & ~np.any(self.cell_shift, axis=1)
        if loops.any():
            bad = int(np.flatnonzero(loops)[0])
            raise InvalidGraphError(
                f"edge {bad} joins atom {self.edge_index[0, bad]} to itself in the same image (zero "
                "length); a self-edge needs a non-zero cell_shift"
            )

    @property
    def n_atoms(self) -> int:
        return int(self.positions.shape[0])

    @property
    def n_edges(self) -> int:
        return int(self.edge_index.shape[1])

    @property
    def max_degree(self) -> int:
        """Most incoming edges of any atom: the slots this graph needs (found once per graph)."""
        found = self.__dict__.get(_MAX_DEGREE)
        if found is None:
            found = self.__dict__[_MAX_DEGREE] = int(self.edge_slot.max()) + 1 if self.n_edges else 0
        return found

    def distances(self) -> np.ndarray:
        """Lengths of the edges, Å, in float64."""
        j, i = self.edge_index
        return np.linalg.norm(self.positions[j] + self.edge_shift - self.positions[i], axis=1)


def even_runs(work: np.ndarray, parts: int) -> list[tuple[int, int]]:
    """Contiguous runs ``(first, last)`` of items whose costs are ``work`` ``[B]``: at most ``parts``,
    none empty, about equal in work, together ``0..B`` in order (how a batch is shared out to threads)."""
    ends = np.cumsum(work)
    total = float(ends[-1]) if len(ends) else 0.0
    bounds = np.searchsorted(ends, np.arange(1, parts) * total / parts)
    bounds = np.unique(np.concatenate([[0], np.minimum(bounds, len(work)), [len(work)]]))
    return [(int(first), int(last)) for first, last in itertools.pairwise(bounds) if last > first]


def collate(
    graphs: Sequence[Graph],
    dtype: np.dtype | type = np.float32,
    n_slots: int | None = None,
    n_pairs: int | None = None,
    pool: ThreadPoolExecutor | None = None,
    edges: bool = True,
) -> dict[str, np.ndarray]:
    """Pack graphs into one feed keyed by the contract's names (:func:`~painn_export.contract.feed_names`).

    The slot layout has ``n_slots`` slots per atom (default
    :func:`~painn_export.contract.slot_count` of the busiest atom). Padding
    slots point at the centre itself with a zero shift, a zero mask, a
    reverse index to themselves, and no pair (``slot_pair == n_pairs``).
    Each edge and its reverse form a pair (``pair_slots``: its two flat
    slots; ``slot_pair``: each slot's pair), whose radial filter the model
    computes once; ``n_pairs`` (default: the edges' half, at least 1) may add
    spare pairs, whose slots are "none" (``n_atoms * n_slots``) and which no
    slot reads. ``system_index`` numbers the graphs; floats are cast to
    ``dtype``. The feed also holds ``cell`` ``[n_systems, 3, 3]`` (zeros for
    graphs without one) and the flat edge list (``edge_index``, atom indices
    offset by the atoms of earlier graphs, and ``edge_shift``) that the
    torch_scatter reference takes; runtimes take the inputs they need
    (``edges=False`` leaves that list out: no runtime reads it).
    Positions are moved to each structure's centroid (in float64, before the
    cast): energies, forces and stress do not depend on it, and float32 edge
    vectors then keep their digits wherever the structure sits.

    The layout is written by compiled passes
    (:mod:`painn_export._collate_kernel`), one per group of graphs on
    ``pool``'s threads (a ``ThreadPoolExecutor``, not one whose task is
    calling this; :data:`COLLATE_GROUPS` groups from
    :data:`COLLATE_POOL_SLOTS` slots on; None: one pass here);
    each graph's rows are the same bits either way, and
    :func:`collate_reference` writes the same arrays with numpy (the tests
    hold the two equal bit for bit). Consecutive graphs of one set of a
    :func:`~painn_export.skin.update_skins` pass's arrays are read where
    that pass wrote them (the groups are also cut where a set ends); other
    graphs' edges, and all positions, are joined into copies first; the same
    bits either way (tests/test_skin.py).
    """
    from painn_export._collate_kernel import slot_layout

    # Given n_slots, the kernel checks every slot against it (the busiest atom is found only if one is not).
    natoms, nedges, K, P = _sizes(graphs, n_slots, n_pairs, need=n_slots is None)
    dtype = np.dtype(dtype)
    n_atoms, n_edges = int(natoms.sum()), int(nedges.sum())
    positions = np.empty((n_atoms, 3), dtype=dtype)
    neighbors = np.empty(n_atoms * K, dtype=np.int64)
    shift = np.empty((n_atoms * K, 3), dtype=dtype)
    mask = np.empty(n_atoms * K, dtype=dtype)
    neighbor_reverse = np.empty(n_atoms * K, dtype=np.int64)
    slot_pair = np.empty(n_atoms * K, dtype=np.int64)
    pair_slots = np.empty((P, 2), dtype=np.int64)
    edge_index = np.empty((2, n_edges if edges else 0), dtype=np.int64)
    edge_shift = np.empty((n_edges if edges else 0, 3), dtype=dtype)
    scratch = np.empty(n_edges, dtype=np.int64)
    atom_start = np.concatenate([[0], np.cumsum(natoms)])
    edge_start = np.concatenate([[0], np.cumsum(nedges)])

    def layout(g0: int, g1: int) -> int:
        """Graphs g0 .. g1 - 1 laid out: 0, or what is wrong (each graph holds half its edges' pairs).

        Their arrays are joined here, in the group's own task: on a pool, the copies run in parallel too.
        """
        part = _joined(graphs[g0:g1], in_place=True)
        a0, e0 = atom_start[g0], edge_start[g0]
        pairs = slot_layout(
            part["positions"], natoms, part["edge_index"], nedges, part["edge_slot"],
            part["edge_reverse"], part["edge_shift"], K, P, g0, g1, a0, e0, e0 // 2, a0,
            e0 - part["first_edge"],
            positions, neighbors, shift, mask, neighbor_reverse, slot_pair, pair_slots, edges, edge_index,
            edge_shift, scratch,
        )  # fmt: skip
        return min(pairs, 0)  # checked: a graph whose reverses pair its edges holds half their pairs

    # About equal work on a pool; and each set of a skin pass's arrays in groups of its own.
    on_pool = pool is not None and len(graphs) > 1 and n_atoms * K >= COLLATE_POOL_SLOTS
    groups = _groups(graphs, natoms * K + nedges, COLLATE_GROUPS if on_pool else 1)
    wrong = list(pool.map(lambda g: layout(*g), groups)) if on_pool else [layout(*g) for g in groups]
    if any(wrong):  # a slot beyond a caller's n_slots, or a graph made with Graph.from_checked
        if n_slots is not None:
            _check_slots(K, max(g.max_degree for g in graphs))
        bad = [-w - 1 for w in wrong if w < 0]
        which = f"graph {bad[0]}" if bad else "a graph"
        raise InvalidGraphError(
            f"{which} has no atoms, an index outside itself, a slot beyond n_slots, or edge_reverse "
            "that does not pair every edge with one other edge (Graph's own checks would have said which)"
        )
    pair_slots[n_edges // 2 :] = n_atoms * K  # spare pairs: "no slot"
    return _feed(
        graphs, natoms, K, positions, neighbors, shift, mask, slot_pair, pair_slots, neighbor_reverse,
        (edge_index, edge_shift) if edges else None,
    )  # fmt: skip


def collate_reference(
    graphs: Sequence[Graph],
    dtype: np.dtype | type = np.float32,
    n_slots: int | None = None,
    n_pairs: int | None = None,
) -> dict[str, np.ndarray]:
    """:func:`collate` written with numpy scatters: the slow reference its compiled pass is tested against."""
    flat, K, P = _flatten(graphs, dtype, n_slots, n_pairs)
    dtype = flat["dtype"]
    natoms, nedges = flat["natoms"], flat["nedges"]
    n_atoms, n_edges = len(flat["positions"]), flat["edge_index"].shape[1]
    atom_offset = np.repeat(np.cumsum(natoms) - natoms, nedges)  # [n_edges] each edge's graph's atoms
    edge_offset = np.repeat(np.cumsum(nedges) - nedges, nedges)
    edge_index = flat["edge_index"] + atom_offset  # [2, n_edges]
    reverse = flat["edge_reverse"] + edge_offset  # [n_edges]
    starts = np.cumsum(natoms) - natoms
    # Each structure about its own centroid, in float64, before any cast:
    # x_j + shift - x_i must not lose digits to where a structure sits.
    positions = np.concatenate(
        [
            flat["positions"][a : a + n] - flat["positions"][a : a + n].mean(axis=0)
            for a, n in zip(starts, natoms)
        ]
    )
    send, recv = edge_index
    flat_slot = recv * K + flat["edge_slot"]  # [n_edges] flat slot of each edge

    neighbors = np.repeat(np.arange(n_atoms, dtype=np.int64), K)  # [n_atoms * K], padding: the centre
    neighbors[flat_slot] = send
    shift = np.zeros((n_atoms * K, 3), dtype=dtype)
    shift[flat_slot] = flat["edge_shift"]
    mask = np.zeros(n_atoms * K, dtype=dtype)
    mask[flat_slot] = 1
    neighbor_reverse = np.arange(n_atoms * K, dtype=np.int64)  # padding: the slot itself
    neighbor_reverse[flat_slot] = flat_slot[reverse]

    # Pairs: an edge and its reverse have one length, so one filter W(|r_ij|).
    # Graph refuses self-loops, the only edges that are their own reverse.
    first = np.flatnonzero(np.arange(n_edges) < reverse)  # [n_edges / 2] each pair's first edge
    real = len(first)
    _check_pairs(real, P)
    pair_slots = np.full((P, 2), n_atoms * K, dtype=np.int64)  # [n_pairs, 2], spare: "none"
    pair_slots[:real, 0] = flat_slot[first]
    pair_slots[:real, 1] = flat_slot[reverse[first]]
    pair_of_edge = np.empty(n_edges, dtype=np.int64)
    pair_of_edge[first] = np.arange(real)
    pair_of_edge[reverse[first]] = np.arange(real)
    slot_pair = np.full(n_atoms * K, P, dtype=np.int64)  # padding: no pair
    slot_pair[flat_slot] = pair_of_edge
    return _feed(
        graphs, natoms, K, positions.astype(dtype), neighbors, shift, mask, slot_pair, pair_slots,
        neighbor_reverse, (edge_index, flat["edge_shift"].astype(dtype)),
    )  # fmt: skip


def _flatten(graphs: Sequence[Graph], dtype, n_slots: int | None, n_pairs: int | None):
    """The graphs' arrays one after another (indices still local), with the slots ``K`` and pairs ``P``."""
    natoms, nedges, K, P = _sizes(graphs, n_slots, n_pairs)
    return {"dtype": np.dtype(dtype), "natoms": natoms, "nedges": nedges, **_joined(graphs)}, K, P  # copies


def _sizes(graphs: Sequence[Graph], n_slots: int | None, n_pairs: int | None, need: bool = True):
    """``(natoms [B], nedges [B], K, P)``: each graph's atoms and edges, the slots and the pairs.

    ``need``: check ``n_slots`` against the busiest atom here (else the caller's kernel checks each slot).
    """
    if not len(graphs):
        raise InvalidGraphError("no graphs to collate: a feed needs at least one structure")
    natoms = np.array([g.n_atoms for g in graphs], dtype=np.int64)  # [n_systems]
    nedges = np.array([g.n_edges for g in graphs], dtype=np.int64)
    if n_slots is None or need:
        busiest = max(g.max_degree for g in graphs)
        K = slot_count(busiest) if n_slots is None else int(n_slots)
        _check_slots(K, busiest)
    else:
        K = int(n_slots)
        _check_slots(K, 0)  # at least one slot: the kernel checks the edges' slots against the rest
    real = int(nedges.sum()) // 2  # an edge and its reverse (Graph checks every edge has one)
    P = max(real, 1) if n_pairs is None else int(n_pairs)
    _check_pairs(real, P)
    return natoms, nedges, K, P


def _joined(graphs: Sequence[Graph], in_place: bool = False) -> dict[str, np.ndarray]:
    """The graphs' positions (float64) and read-only edge arrays (int64 indices, float64 shifts), one
    after another, from ``"first_edge"`` on (0: copies).

    ``in_place``: graphs that are consecutive graphs of one builder's set of
    arrays (:data:`_SPAN`), and only those, are read where the builder wrote
    them: the set's whole arrays, with ``"first_edge"`` where these graphs'
    edges start (the compiled layout takes C-ordered arrays and an offset).
    Else (and always for :func:`collate_reference`) the arrays are copied.
    """
    int64, float64 = np.int64, np.float64
    positions = np.concatenate([g.positions for g in graphs]).astype(float64, copy=False)
    shared = _shared_span(graphs) if in_place else None
    if shared is not None:
        index, slot, reverse, shift, e0, _ = shared
        return {"positions": positions, "edge_index": index, "edge_slot": slot, "edge_reverse": reverse,
                "edge_shift": shift, "first_edge": e0}  # fmt: skip
    joined = {
        "edge_index": np.concatenate([g.edge_index for g in graphs], axis=1).astype(int64, copy=False),
        "edge_slot": np.concatenate([g.edge_slot for g in graphs]).astype(int64, copy=False),
        "edge_reverse": np.concatenate([g.edge_reverse for g in graphs]).astype(int64, copy=False),
        "edge_shift": np.concatenate([g.edge_shift for g in graphs])
        .astype(float64, copy=False)
        .reshape(-1, 3),
    }
    for array in joined.values():  # read-only, as a builder's are: one compiled signature for both
        array.flags.writeable = False
    return {"positions": positions, **joined, "first_edge": 0}


def _shared_span(graphs: Sequence[Graph]) -> tuple | None:
    """``(edge_index, edge_slot, edge_reverse, edge_shift, e0, e1)`` when ``graphs`` are consecutive
    graphs of one builder's set of arrays (each marked :data:`_SPAN`, one after another); else None."""
    first = graphs[0].__dict__.get(_SPAN) if len(graphs) else None
    if first is None:
        return None
    before = None
    for g in graphs:
        span = g.__dict__.get(_SPAN)
        if span is None or (before is not None and not _follows(before, span)):
            return None
        if g.edge_index.base is not span[0] or g.n_edges != span[5] - span[4]:  # a mark not of these edges
            return None
        before = span
    return (*first[:4], first[4], before[5])


def _follows(before: tuple, span: tuple) -> bool:
    """Whether the graph marked ``span`` is the one after the graph marked ``before`` in one set."""
    return span[0] is before[0] and span[4] == before[5]


def _groups(graphs: Sequence[Graph], work: np.ndarray, parts: int) -> list[tuple[int, int]]:
    """collate's groups: :func:`even_runs` of ``work`` in ``parts``, also cut where one builder's set
    of arrays (:data:`_SPAN`) ends or a marked graph is not the one after the graph before it, so that
    each group of marked graphs is read in place (more than ``4 * COLLATE_GROUPS`` such cuts: not cut)."""
    groups = even_runs(work, parts)
    spans = [g.__dict__.get(_SPAN) for g in graphs]
    cuts = [  # where the graph before is not the one before it in the same set
        k
        for k in range(1, len(graphs))
        if (spans[k] is None) != (spans[k - 1] is None)
        or (spans[k] is not None and not _follows(spans[k - 1], spans[k]))
    ]
    if not cuts or len(cuts) > 4 * COLLATE_GROUPS:  # one set (or none), or many small ones: as they are
        return groups
    bounds = sorted({0, len(graphs), *cuts, *(g0 for g0, _ in groups)})
    return list(itertools.pairwise(bounds))


def _check_slots(K: int, busiest: int) -> None:
    if K < max(busiest, 1):
        raise ValueError(f"n_slots={K} is fewer than the {max(busiest, 1)} slots the busiest atom needs")


def _check_pairs(real: int, P: int) -> None:
    if P < max(real, 1):
        raise ValueError(f"n_pairs={P} is fewer than the {max(real, 1)} pairs the graphs need")


def _feed(graphs, natoms, K, positions, neighbors, shift, mask, slot_pair, pair_slots, reverse, edges):
    """The feed's dictionary (:func:`collate`'s keys) from the layout's flat arrays; ``edges``: the flat
    edge list ``(edge_index, edge_shift)``, or None for a feed without it."""
    n_atoms = len(positions)
    feed = {
        "atomic_numbers": np.concatenate([g.atomic_numbers for g in graphs]).astype(np.int64, copy=False),
        "positions": positions,
        "neighbors": neighbors.reshape(n_atoms, K),
        "neighbor_shift": shift.reshape(n_atoms, K, 3),
        "neighbor_mask": mask.reshape(n_atoms, K),
        "slot_pair": slot_pair.reshape(n_atoms, K),
        "pair_slots": pair_slots,
        "neighbor_reverse": reverse.reshape(n_atoms, K),
        "system_index": np.repeat(np.arange(len(natoms), dtype=np.int64), natoms),
        "natoms": natoms,
        "cell": np.array(
            [np.zeros((3, 3)) if g.cell is None else g.cell for g in graphs], dtype=np.float64
        ).reshape(-1, 3, 3),
    }
    if edges is not None:
        feed["edge_index"], feed["edge_shift"] = edges
    return feed


def canonical_graph(graph: Graph) -> Graph:
    """``graph`` in the canonical edge order, the one :func:`~painn_export.neighbors.neighbor_graph` writes.

    The first half (the one-sided edges) sorted by ``(receiver i, sender j,
    S)``, the reverses in the same order: what the neighbour kernel and
    :mod:`painn_export.device_graphs` list. The model sums over edges in their
    order, so one order makes a structure's numbers independent of how its
    graph was found (host, device, a Verlet skin; an exact ``--resume``).
    """
    half = graph.n_edges // 2
    index, shift = np.asarray(graph.edge_index), np.asarray(graph.cell_shift)
    order = np.lexsort((shift[:half, 2], shift[:half, 1], shift[:half, 0], index[0, :half], index[1, :half]))
    perm = np.concatenate([order, order + half])
    return Graph(
        atomic_numbers=graph.atomic_numbers,
        positions=graph.positions,
        edge_index=index[:, perm],
        cell_shift=shift[perm],
        edge_shift=np.asarray(graph.edge_shift)[perm],
        cell=graph.cell,
        min_distance=graph.min_distance,
    )
