"""A relaxation's graphs at each step: Verlet-skin lists on the host, or built on the runner's device.

:class:`StepGraphs` gives the structures in flight their graphs after each
FIRE step, and :func:`pipelines.batches.infer_split` their feed:

- **host** (``--graphs host``): each structure's :class:`~painn_export.skin.SkinGraph`,
  all updated in one compiled pass (:func:`~painn_export.skin.update_skins`);
  the feed is :func:`~painn_export.batch.collate` of the graphs.
- **device** (``--graphs device``, or ``auto`` on a GPU): the batch's graphs
  are built on the runner's device every step
  (:func:`~painn_export.device_graphs.build_graphs`); each member's
  ``graph`` is then its size (atoms, busiest atom), which admission and
  splitting read, and the feed is built there too. The host only reads and
  writes: structures enter from :meth:`StepGraphs.entering`, which reads
  them from the input and builds them on the device a run at a time before
  any is admitted; that build gives each its input status, or its size
  (:class:`Entered`) and the graph its first feed takes (joined to the
  rest; one that waits keeps its own, selected from the build). No host
  graph, no neighbour worker, nothing pickled.

Both give the same edges in the same order, hence the same feeds and bits;
a structure without a graph gets the same status and message from both: at
entry ``run``'s input statuses (:func:`pipelines.graphs.structure_item`),
after a step its geometry became invalid, or two atoms came closer than
:data:`~pipelines.graphs.MIN_SEPARATION`.

A member is what :mod:`pipelines.relax` keeps per structure: ``z``, ``pbc``,
``skin``, ``state`` (positions, cell), ``n_atoms``, ``graph`` and ``size``
(its graph's atoms and busiest atom).
"""

from __future__ import annotations

import itertools
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

from painn_export.neighbors import StructureError
from painn_export.skin import update_skins
from pipelines.device_batches import Sized, Structures, atom_rows, chunk_bounds, feeds_of
from pipelines.graphs import MIN_SEPARATION, GraphSettings, Item, Start


def host_threads() -> int:
    """Threads for the host's work on each step's graphs: the cores this process may use (its
    affinity, not a cgroup's CPU quota), at most 4.

    The skin pass and ``collate`` give the same bits on any number of threads
    (each structure's arithmetic is its own; tests/test_relax.py).
    """
    return min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def graph_failure(graph) -> str | None:
    """Why a skin graph (or the StructureError in its place) cannot be evaluated; None when it can."""
    if isinstance(graph, StructureError):
        return f"the geometry became invalid: {graph}"
    if graph.min_distance < MIN_SEPARATION:
        return _too_close(graph.min_distance)
    return None


def _too_close(distance: float) -> str:
    return f"atoms came {distance:.3g} Å apart (< {MIN_SEPARATION} Å)"


class Entered(NamedTuple):
    """An entering structure's size from its entry build (:meth:`StepGraphs.entering`), and that build,
    whose graph of it the structure's first feed takes."""

    n_atoms: int
    max_degree: int
    built: object  # the DeviceGraphs of the structures read and built with it
    k: int  # its place among built's structures


class StepGraphs:
    """The graphs of a relaxation's batch, on the host or on ``runner``'s device (module doc)."""

    def __init__(
        self, runner, settings: GraphSettings, limits, summary, on_device: bool, threads: int | None = None
    ) -> None:
        self.runner, self.settings, self.limits, self.summary = runner, settings, limits, summary
        self.on_device = on_device
        self.device_graphs = None  # device: the DeviceGraphs of the batch's first members
        # Host: the skin pass and collate share the cores the runtime leaves idle between its calls
        # (threads: host_threads() when None); started at the first step, ended by close().
        self.threads = 1 if on_device else host_threads() if threads is None else int(threads)
        self._pool: ThreadPoolExecutor | None = None

    @property
    def pool(self) -> ThreadPoolExecutor | None:
        """The host's threads (None: one thread, this one)."""
        if self._pool is None and self.threads > 1:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="relax-graphs")
        return self._pool

    def close(self) -> None:
        """Ends the host's threads (the run is over)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def build(self, members: list) -> list[str | None]:
        """Each member's graph at its current geometry; per member, why it has none, or None.

        On the device, the members (those with a graph, in order) lead the next batch.
        """
        if self.on_device:
            return self._build_on_device(members)
        t0 = time.perf_counter()
        searches = sum(m.skin.n_searches for m in members)
        graphs = update_skins(
            [m.skin for m in members],
            [m.z for m in members],
            [m.state.positions for m in members],
            [m.state.cell for m in members],
            [m.pbc for m in members],
            pool=self.pool,
        )
        self.summary.searches += sum(m.skin.n_searches for m in members) - searches
        self.summary.skin_seconds += time.perf_counter() - t0
        failures = []
        for m, graph in zip(members, graphs):
            failures.append(graph_failure(graph))
            if failures[-1] is None:
                m.graph = graph  # in the canonical order already: the kernel writes it
        return failures

    def forget(self) -> None:
        """No graphs built ahead (a batch restored member by member): all built when it is fed."""
        self.device_graphs = None

    def entering(self, reader, pending: np.ndarray):
        """Items of the ``pending`` structures (increasing input indices), in order: the device path's entry.

        Read from ``reader`` (an open :class:`~painn_export.schema.InputReader`)
        in runs of :func:`~pipelines.device_batches.chunk_bounds` (at most a few
        batches' atoms and edges), each built on the device at once when its
        first item is asked for. A structure the build gives a status
        (``empty_structure``, ``unknown_element``, ``nonfinite_positions``,
        ``bad_cell``, ``atoms_too_close``: the host path's statuses and
        messages) is an item without a graph; the others carry their
        :class:`~pipelines.graphs.Start` and their :class:`Entered` size.
        """
        offsets = reader.offsets
        for lo, hi in chunk_bounds(np.diff(offsets)[pending], self.limits, self.settings):
            todo = Structures.read(reader, pending[lo:hi])
            first, last = int(todo.index[0]), int(todo.index[-1]) + 1
            fixed = reader.fixed(first, last)[atom_rows(offsets[todo.index] - offsets[first], todo.natoms)]
            z, positions = todo.atomic_numbers, todo.positions
            built = self._build(positions, todo.cell, todo.pbc, z, todo.natoms, self.settings.num_elements)
            ends, k = np.cumsum(todo.natoms), 0
            for s, (index, kind) in enumerate(zip(todo.index.tolist(), built.status.kind)):
                if kind != "ok":
                    yield Item(index, None, kind, built.status.message[s])
                    continue
                atoms = slice(int(ends[s] - todo.natoms[s]), int(ends[s]))
                start = Start(
                    z[atoms].copy(), positions[atoms], todo.cell[s], todo.pbc[s].copy(), fixed[atoms]
                )
                size = Entered(int(todo.natoms[s]), int(built.max_degree[k]), built, k)
                yield Item(index, size, "ok", "", start)
                k += 1

    def wait(self, members: list) -> None:
        """Members left waiting keep their own graph (device), not their entry build: what waits holds
        its graphs, as on the host, and never a whole run of structures built with it."""
        for m in members:
            g = m.graph
            if isinstance(g, Entered) and len(g.built.max_degree) > 1:
                t0 = time.perf_counter()
                m.graph = Entered(g.n_atoms, g.max_degree, g.built.select([g.k]), 0)
                self.summary.graph_seconds += time.perf_counter() - t0

    def feed_of(self, members: list):
        """``feed_of(lo, hi)`` for :func:`~pipelines.batches.infer_split`: on the host, ``collate`` on
        the host's threads (:attr:`pool`)."""
        if not self.on_device:
            graphs, dtype = [m.graph for m in members], self.runner.feed_dtype
            degree = [m.size.max_degree for m in members]
            return lambda lo, hi: self.limits.collate(
                graphs[lo:hi], dtype, pool=self.pool, max_degree=max(degree[lo:hi])
            )
        import torch

        from painn_export.device_graphs import join_graphs

        built = self.device_graphs
        have = 0 if built is None else len(built.max_degree)
        for piece in self._entered(members[have:]):  # entered since the last step (or restored)
            built = piece if built is None else join_graphs(built, piece)
        self.device_graphs = built
        dtype = torch.from_numpy(np.empty(0, self.runner.feed_dtype)).dtype
        return feeds_of(built, 0, self.limits, dtype, self.summary)

    def _entered(self, members: list):
        """The device graphs of ``members`` (entered since the last step), in order, a run at a time:
        those of a run of :class:`Entered` from one entry build selected from it, the others built now."""

        def build_of(m) -> int | None:
            return id(m.graph.built) if isinstance(m.graph, Entered) else None

        for key, run in itertools.groupby(members, build_of):
            run = list(run)
            if key is None:  # restored from a checkpoint
                fresh = self._device_build(run)
                if any(kind != "ok" for kind in fresh.status.kind):  # they had a graph when they entered
                    raise RuntimeError(
                        f"a structure that entered has no device graph: {fresh.status.message}"
                    )
                yield fresh
                continue
            built, ks = run[0].graph.built, [m.graph.k for m in run]
            if ks == list(range(len(built.max_degree))):  # all of it (one that waited: its own)
                yield built
                continue
            t0 = time.perf_counter()
            piece = built.select(ks)
            self.summary.graph_seconds += time.perf_counter() - t0
            yield piece

    def _build_on_device(self, members: list) -> list[str | None]:
        self.device_graphs = None
        if not members:
            return []
        graphs = self._device_build(members)
        failures, sizes = [], iter(zip(graphs.natoms.tolist(), graphs.max_degree.tolist()))
        status = graphs.status
        for m, kind, message, closest in zip(members, status.kind, status.message, status.min_distance):
            if kind == "ok":
                m.graph = Sized(*next(sizes))
                failures.append(None)
            elif kind == "atoms_too_close":
                failures.append(_too_close(closest))
            else:
                failures.append(f"the geometry became invalid: {message}")
        self.device_graphs = graphs  # the survivors' graphs, in order: they lead the next batch
        return failures

    def _device_build(self, members: list):
        """:func:`~painn_export.device_graphs.build_graphs` of the members' current geometry."""
        return self._build(
            np.concatenate([m.state.positions for m in members]),
            np.array([m.state.cell for m in members]),
            np.array([m.pbc for m in members]),
            np.concatenate([m.z for m in members]),
            np.array([m.n_atoms for m in members]),
        )

    def _build(self, positions, cells, pbc, atomic_numbers, natoms, num_elements=None):
        """:func:`~painn_export.device_graphs.build_graphs` on the runner's device (its arguments' shapes);
        its time in ``summary.graph_seconds``."""
        from painn_export.device_graphs import build_graphs

        t0 = time.perf_counter()
        graphs = build_graphs(
            positions, cells, pbc, atomic_numbers, natoms,
            cutoff=self.settings.cutoff, max_neighbors=self.settings.max_neighbors, device=self.runner.device,
            min_separation=MIN_SEPARATION, num_elements=num_elements,
        )  # fmt: skip
        self.summary.graph_seconds += time.perf_counter() - t0
        return graphs
