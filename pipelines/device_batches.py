"""``run --graphs device``: the host reads and writes; graphs, feeds and the model stay on the device.

The host reads pending structures (:class:`~painn_export.schema.InputReader`)
in chunks, hands each chunk's positions, cells, pbc and atomic numbers to
:func:`painn_export.device_graphs.build_graphs` on the runner's device, and
writes what comes back. A chunk holds at most :data:`CHUNK_BATCHES` batches'
atoms, and at most that many times ``--max-edges`` by the strict cap's edge
bound (:func:`~painn_export.device_graphs.max_edges`): what the device's
buffers hold is bounded before anything is built there.

Batches are the host path's, structure for structure: the structures that
have a graph are packed in input order by :class:`~pipelines.batches.Budget`'s
rule with each graph's exact atoms and busiest atom (``max_degree``), which
the device reports before any feed is made; each batch's feed is
``graphs.select(batch).feed(...)`` in the runner's dtype on
:meth:`Limits.slots_for` slots, the feed collate would make of the host's
graphs in the same (canonical) edge order. Same batches, same feeds: the
same numbers, bit for bit, on a deterministic runtime. A batch still open
when a chunk ends is carried into the next chunk (its structures are built
again there: the same graphs). Statuses (``atoms_too_close``, ``bad_cell``,
...) and their messages are the host's (tests/test_device_graphs.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from painn_export.schema import InputReader
from pipelines.batches import Budget, Limits, run_batch
from pipelines.graphs import CHUNK, MIN_SEPARATION, GraphSettings, Item
from pipelines.signals import check_stop

CHUNK_BATCHES = 4  # a chunk built on the device holds at most this many batches' atoms (and edge bound)


@dataclass(frozen=True)
class Sized:
    """What packing and :func:`~pipelines.batches.infer_split` read of one structure's device graph."""

    n_atoms: int
    max_degree: int


class _Structures:
    """Structures read from the input (concatenated arrays), with their indices in it."""

    def __init__(self, index, z, pos, cell, pbc, natoms) -> None:
        self.index = np.asarray(index, dtype=np.int64)  # [S] in the input
        self.z, self.pos = z, pos  # [N], [N, 3]
        self.cell, self.pbc, self.natoms = (
            cell,
            pbc,
            np.asarray(natoms, dtype=np.int64),
        )  # [S, 3, 3], [S, 3], [S]

    @classmethod
    def read(cls, reader: InputReader, indices: np.ndarray) -> _Structures:
        """Structures ``indices`` (sorted) of an open input, read as one range."""
        offsets = reader.offsets
        lo, hi = int(indices[0]), int(indices[-1]) + 1
        z_all, pos_all, cells, pbcs = reader.structures(lo, hi)
        rows = np.concatenate([np.arange(offsets[s], offsets[s + 1]) for s in indices]) - offsets[lo]
        rows = rows.astype(np.int64)
        return cls(indices, z_all[rows], pos_all[rows], cells[indices - lo], pbcs[indices - lo],
                   np.diff(offsets)[indices])  # fmt: skip

    def take(self, which: np.ndarray) -> _Structures:
        """Some of these structures (``which``: increasing positions among them)."""
        starts = np.concatenate([[0], np.cumsum(self.natoms)])
        rows = np.concatenate([np.arange(starts[s], starts[s + 1]) for s in which] or [np.zeros(0, np.int64)])
        return _Structures(self.index[which], self.z[rows], self.pos[rows], self.cell[which], self.pbc[which],
                           self.natoms[which])  # fmt: skip

    @staticmethod
    def join(a: _Structures | None, b: _Structures) -> _Structures:
        if a is None or not a.index.size:
            return b
        return _Structures(
            np.concatenate([a.index, b.index]), np.concatenate([a.z, b.z]), np.concatenate([a.pos, b.pos]),
            np.concatenate([a.cell, b.cell]), np.concatenate([a.pbc, b.pbc]),
            np.concatenate([a.natoms, b.natoms]),
        )  # fmt: skip


def chunks(pending: np.ndarray, natoms: np.ndarray, limits: Limits, settings: GraphSettings):
    """Runs of pending structures to build at once: within :data:`CHUNK_BATCHES` batches' atoms and edges.

    ``natoms`` ``[n_structures]`` of the whole input. The edge bound is the
    strict cap's (``2 n k``); a run always holds at least one structure.
    """
    from painn_export.device_graphs import max_edges

    if not pending.size:
        return
    atoms = natoms[pending]
    try:
        bound = max_edges(atoms, max_neighbors=settings.max_neighbors)
    except ValueError:  # no strict cap: no bound; the device search sizes itself (it widens once)
        bound = np.zeros_like(atoms)
    atom_cap = CHUNK_BATCHES * limits.atoms
    edge_cap = CHUNK_BATCHES * limits.edge_slots
    lo, have_atoms, have_edges = 0, 0, 0
    for k in range(pending.size):
        if k > lo and (have_atoms + atoms[k] > atom_cap or have_edges + bound[k] > edge_cap):
            yield pending[lo:k]
            lo, have_atoms, have_edges = k, 0, 0
        have_atoms += int(atoms[k])
        have_edges += int(bound[k])
    yield pending[lo:]


def evaluate_on_device(input_path, pending, runner, writer, limits: Limits, settings: GraphSettings,
                       summary, bar) -> None:  # fmt: skip
    """Every pending structure through device graphs and ``runner``, committed through ``writer``.

    The batches, feeds, statuses and messages are those of
    :func:`pipelines.batches.evaluate` over the host's items (module doc).
    """
    import torch

    from painn_export.device_graphs import build_graphs

    dtype = torch.from_numpy(np.empty(0, runner.feed_dtype)).dtype
    with InputReader(input_path) as reader:
        runs = list(chunks(np.asarray(pending, dtype=np.int64), np.diff(reader.offsets), limits, settings))
        carried: _Structures | None = None  # the open batch's structures, built again with the next chunk
        for number, chunk in enumerate(runs):
            check_stop()
            todo = _Structures.join(carried, _Structures.read(reader, chunk))
            start = time.perf_counter()
            graphs = build_graphs(
                todo.pos, todo.cell, todo.pbc, todo.z, todo.natoms,
                cutoff=settings.cutoff, max_neighbors=settings.max_neighbors, device=runner.device,
                min_separation=MIN_SEPARATION, num_elements=settings.num_elements,
            )  # fmt: skip
            summary.graph_seconds += time.perf_counter() - start
            _commit_statuses(graphs.status, todo.index, writer, summary, bar)
            ok = graphs.status.in_feed  # [n_ok] positions in todo of the structures with a graph
            built = _Built(graphs, todo.index[ok], graphs.natoms.cpu().numpy())
            open_batch = built.run_closed_batches(runner, writer, limits, dtype, summary, bar)
            if number == len(runs) - 1:
                if open_batch.size:
                    built.run(open_batch, runner, writer, limits, dtype, summary, bar)
            else:
                carried = todo.take(ok[open_batch])


def _commit_statuses(status, index, writer, summary, bar) -> None:
    failed = [(int(index[s]), k, m) for s, (k, m) in enumerate(zip(status.kind, status.message)) if k != "ok"]
    for lo in range(0, len(failed), CHUNK):
        writer.commit_status(failed[lo : lo + CHUNK])
    summary.computed += len(failed)
    bar.update(len(failed), 0)


@dataclass(frozen=True)
class _Built:
    """A chunk's device graphs, the input index of each, and their atoms (host copies of the sizes)."""

    graphs: object  # DeviceGraphs
    index: np.ndarray  # [n_ok] structures in the input
    natoms: np.ndarray  # [n_ok]

    def run_closed_batches(self, runner, writer, limits: Limits, dtype, summary, bar) -> np.ndarray:
        """Pack (Budget's rule, exact sizes) and run every batch but the last; the last's positions."""
        start, budget = 0, Budget(limits)
        for k in range(self.index.size):
            size = Sized(int(self.natoms[k]), int(self.graphs.max_degree[k]))
            if not budget.admits(size):
                self.run(np.arange(start, k), runner, writer, limits, dtype, summary, bar)
                start, budget = k, Budget(limits)
            budget.add(size)
        return np.arange(start, self.index.size)

    def run(self, which: np.ndarray, runner, writer, limits: Limits, dtype, summary, bar) -> None:
        """One batch (``which``: positions among the built graphs) through :func:`.run_batch`."""
        degree = self.graphs.max_degree
        batch = [
            Item(int(self.index[k]), Sized(int(self.natoms[k]), int(degree[k])), "ok", "") for k in which
        ]

        def feed_of(lo: int, hi: int) -> dict:
            t = time.perf_counter()
            part = self.graphs.select(which[lo:hi])
            feed = part.feed(dtype, n_slots=limits.slots_for(int(degree[which[lo:hi]].max())))
            summary.graph_seconds += time.perf_counter() - t
            return feed

        run_batch(runner, batch, writer, summary, bar, limits, feed_of)
