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

Two callers, one loop (:func:`evaluate_chunks`): the local pipeline reads its
chunks from the input (:func:`evaluate_on_device`); a Ray inference actor
(:mod:`pipelines.ray_run`) takes the :class:`Structures` its read task sent
(:func:`evaluate_structures`), so no graph is ever built on the host or
shipped between Ray's stages.

A chunk's results are committed together when the chunk is done (and on
the way out of an error or a stop signal, what was computed), not batch by
batch: the output file's writes and flushes are the host's largest cost
per structure here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from painn_export.schema import InputReader
from pipelines.batches import Budget, Limits, run_batch
from pipelines.graphs import CHUNK, MIN_SEPARATION, GraphSettings, Item
from pipelines.signals import check_stop

CHUNK_BATCHES = 4  # a chunk built on the device holds at most this many batches' atoms (and edge bound)


class Sized(NamedTuple):
    """What packing and :func:`~pipelines.batches.infer_split` read of one structure's device graph."""

    n_atoms: int
    max_degree: int


def atom_rows(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``[sum(counts)]`` int64: the rows ``starts[k] .. starts[k] + counts[k]``, one run after another."""
    counts = np.asarray(counts, dtype=np.int64)
    before = np.cumsum(counts) - counts  # where each run starts in the result
    return np.arange(int(counts.sum()), dtype=np.int64) + np.repeat(np.asarray(starts) - before, counts)


@dataclass(frozen=True)
class Structures:
    """Structures as a device build takes them: their atoms one structure after another, and their
    indices in the input. What the local pipeline reads, and what a Ray read task sends its actor."""

    index: np.ndarray  # [S] int64, in the input
    atomic_numbers: np.ndarray  # [N] int64
    positions: np.ndarray  # [N, 3] float64 Å
    cell: np.ndarray  # [S, 3, 3] float64 Å, rows are lattice vectors
    pbc: np.ndarray  # [S, 3] bool
    natoms: np.ndarray  # [S] int64

    @classmethod
    def read(cls, reader: InputReader, indices: np.ndarray) -> Structures:
        """Structures ``indices`` (sorted) of an open input, read as one range."""
        indices = np.asarray(indices, dtype=np.int64)
        offsets = reader.offsets
        lo, hi = int(indices[0]), int(indices[-1]) + 1
        z, pos, cell, pbc = reader.structures(lo, hi)
        natoms = offsets[indices + 1] - offsets[indices]
        if hi - lo != indices.size:  # not one run (--resume): keep the asked structures' atoms
            rows = atom_rows(offsets[indices] - offsets[lo], natoms)
            z, pos, cell, pbc = z[rows], pos[rows], cell[indices - lo], pbc[indices - lo]
        return cls(indices, z, pos, cell, pbc, natoms)

    def take(self, which: np.ndarray) -> Structures:
        """Some of these structures (``which``: increasing positions among them)."""
        which = np.asarray(which, dtype=np.int64)
        rows = atom_rows((np.cumsum(self.natoms) - self.natoms)[which], self.natoms[which])
        return Structures(
            self.index[which], self.atomic_numbers[rows], self.positions[rows],
            self.cell[which], self.pbc[which], self.natoms[which],
        )  # fmt: skip

    @staticmethod
    def join(a: Structures | None, b: Structures) -> Structures:
        if a is None or not a.index.size:
            return b
        return Structures(
            np.concatenate([a.index, b.index]), np.concatenate([a.atomic_numbers, b.atomic_numbers]),
            np.concatenate([a.positions, b.positions]), np.concatenate([a.cell, b.cell]),
            np.concatenate([a.pbc, b.pbc]), np.concatenate([a.natoms, b.natoms]),
        )  # fmt: skip


def feeds_of(graphs, start: int, limits: Limits, dtype, summary):
    """``feed_of(a, b)`` for :func:`~pipelines.batches.infer_split`: the device feed of built graphs
    ``start + a .. start + b`` (torch ``dtype``) on :meth:`Limits.slots_for` slots; its time in
    ``summary.graph_seconds``."""

    def feed_of(a: int, b: int) -> dict:
        t = time.perf_counter()
        part = graphs.select(np.arange(start + a, start + b))
        feed = part.feed(dtype, n_slots=limits.slots_for(int(graphs.max_degree[start + a : start + b].max())))
        summary.graph_seconds += time.perf_counter() - t
        return feed

    return feed_of


def chunk_bounds(atoms: np.ndarray, limits: Limits, settings: GraphSettings) -> list[tuple[int, int]]:
    """Runs ``[lo, hi)`` of structures (``atoms`` each, in order) to build at once: within
    :data:`CHUNK_BATCHES` batches' atoms and edge bound; a run always holds at least one structure.

    The edge bound is the strict cap's (``2 n k``); without a strict cap only atoms bound a run.
    """
    from painn_export.device_graphs import max_edges

    atoms = np.asarray(atoms, dtype=np.int64)
    try:
        bound = max_edges(atoms, max_neighbors=settings.max_neighbors)
    except ValueError:  # no strict cap: no bound; the device search sizes itself (it widens once)
        bound = np.zeros_like(atoms)
    # A run [lo, hi) fits when both sums stay within their caps: the largest such hi, found by
    # bisection on the running sums (inf caps: one run).
    atoms_sum = np.concatenate([[0], np.cumsum(atoms)])
    edges_sum = np.concatenate([[0], np.cumsum(bound)])
    atom_cap = CHUNK_BATCHES * limits.atoms
    edge_cap = CHUNK_BATCHES * limits.edge_slots
    bounds, lo = [], 0
    while lo < atoms.size:
        hi = min(
            np.searchsorted(atoms_sum, atoms_sum[lo] + atom_cap, side="right"),
            np.searchsorted(edges_sum, edges_sum[lo] + edge_cap, side="right"),
        ) - 1  # fmt: skip
        hi = max(int(hi), lo + 1)
        bounds.append((lo, hi))
        lo = hi
    return bounds


def evaluate_on_device(input_path, pending, runner, writer, limits: Limits, settings: GraphSettings,
                       summary, bar) -> None:  # fmt: skip
    """Every pending structure through device graphs and ``runner``, committed through ``writer``.

    The batches, feeds, statuses and messages are those of
    :func:`pipelines.batches.evaluate` over the host's items (module doc).
    """
    pending = np.asarray(pending, dtype=np.int64)
    with InputReader(input_path) as reader:
        bounds = chunk_bounds(np.diff(reader.offsets)[pending], limits, settings)
        evaluate_chunks(
            bounds, lambda lo, hi: Structures.read(reader, pending[lo:hi]),
            runner, writer, limits, settings, summary, bar,
        )  # fmt: skip


def evaluate_structures(structures: Structures, runner, writer, limits: Limits, settings: GraphSettings,
                        summary, bar) -> None:  # fmt: skip
    """:func:`evaluate_on_device` of structures already read (a Ray actor's, from its read task)."""
    bounds = chunk_bounds(structures.natoms, limits, settings)
    evaluate_chunks(
        bounds, lambda lo, hi: structures.take(np.arange(lo, hi)),
        runner, writer, limits, settings, summary, bar,
    )  # fmt: skip


def evaluate_chunks(bounds: list[tuple[int, int]], load: Callable[[int, int], Structures], runner, writer,
                    limits: Limits, settings: GraphSettings, summary, bar) -> None:  # fmt: skip
    """The loop both callers share: ``load(lo, hi)`` gives each run of :func:`chunk_bounds`, in order."""
    import torch

    from painn_export.device_graphs import build_graphs

    dtype = torch.from_numpy(np.empty(0, runner.feed_dtype)).dtype
    out = Held()  # a chunk's results, committed together
    carried: Structures | None = None  # the open batch's structures, built again with the next chunk
    try:
        for number, (lo, hi) in enumerate(bounds):
            check_stop()
            todo = Structures.join(carried, load(lo, hi))
            start = time.perf_counter()
            graphs = build_graphs(
                todo.positions, todo.cell, todo.pbc, todo.atomic_numbers, todo.natoms,
                cutoff=settings.cutoff, max_neighbors=settings.max_neighbors, device=runner.device,
                min_separation=MIN_SEPARATION, num_elements=settings.num_elements,
            )  # fmt: skip
            summary.graph_seconds += time.perf_counter() - start
            _commit_statuses(graphs.status, todo.index, out, summary, bar)
            ok = graphs.status.in_feed  # [n_ok] positions in todo of the structures with a graph
            built = _Built(graphs, todo.index[ok].tolist(), todo.natoms[ok].tolist())
            open_from = built.run_closed_batches(runner, out, limits, dtype, summary, bar)
            if number == len(bounds) - 1:
                if open_from < len(built.index):
                    built.run(open_from, len(built.index), runner, out, limits, dtype, summary, bar)
            else:
                carried = todo.take(ok[open_from:])
            out.flush_to(writer)
    finally:
        out.flush_to(writer)  # what was computed before an error or a stop signal is kept


class Held:
    """Results and statuses held back: takes a writer's two calls, hands them on later
    (:meth:`flush_to`; a Ray actor's :class:`~pipelines.ray_columns.Collector` returns them instead)."""

    def __init__(self) -> None:
        self.results: list = []
        self.statuses: list = []

    def commit_results(self, rows) -> None:
        self.results += rows

    def commit_status(self, rows) -> None:
        self.statuses += rows

    def flush_to(self, writer) -> None:
        """What is held, to ``writer``: the results in one commit, the statuses in :data:`CHUNK`'s."""
        results, statuses = self.results, self.statuses
        self.results, self.statuses = [], []
        writer.commit_results(results)
        for lo in range(0, len(statuses), CHUNK):
            writer.commit_status(statuses[lo : lo + CHUNK])


def _commit_statuses(status, index, writer, summary, bar) -> None:
    kind = np.asarray(status.kind)
    failed = [(int(index[s]), status.kind[s], status.message[s]) for s in np.flatnonzero(kind != "ok")]
    writer.commit_status(failed)
    summary.computed += len(failed)
    bar.update(len(failed), 0)


@dataclass(frozen=True)
class _Built:
    """A chunk's device graphs, the input index of each, and their atoms (host copies of the sizes)."""

    graphs: object  # DeviceGraphs
    index: list[int]  # [n_ok] structures in the input
    natoms: list[int]  # [n_ok]

    def run_closed_batches(self, runner, writer, limits: Limits, dtype, summary, bar) -> int:
        """Pack (Budget's rule, exact sizes) and run every batch but the last; where the last starts.

        A batch's budget is :func:`~pipelines.batches.evaluate`'s: within the
        atoms a memory failure left (``summary.memory_atoms``) as it stood when
        the batch opened (a carried batch opened before this chunk, after the
        last batch that ran: the same).
        """
        sizes = [Sized(n, d) for n, d in zip(self.natoms, self.graphs.max_degree.tolist())]
        start, budget = 0, Budget(limits.lowered(summary.memory_atoms))
        for k, size in enumerate(sizes):
            if not budget.admits(size):
                self.run(start, k, runner, writer, limits, dtype, summary, bar, sizes)
                start, budget = k, Budget(limits.lowered(summary.memory_atoms))
            budget.add(size)
        return start

    def run(self, lo: int, hi: int, runner, writer, limits: Limits, dtype, summary, bar, sizes=None) -> None:
        """One batch (the built graphs ``lo..hi``) through :func:`.run_batch`."""
        degree = self.graphs.max_degree
        if sizes is None:
            sizes = [Sized(n, d) for n, d in zip(self.natoms, degree.tolist())]
        batch = [Item(self.index[k], sizes[k], "ok", "") for k in range(lo, hi)]

        run_batch(
            runner, batch, writer, summary, bar, limits, feeds_of(self.graphs, lo, limits, dtype, summary)
        )
