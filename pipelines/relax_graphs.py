"""A relaxation's graphs at each step: Verlet-skin lists on the host, or built on the runner's device.

:class:`StepGraphs` gives the structures in flight their graphs after each
FIRE step, and :func:`pipelines.batches.infer_split` their feed:

- **host** (``--graphs host``): each structure's :class:`~painn_export.skin.SkinGraph`,
  all updated in one compiled pass (:func:`~painn_export.skin.update_skins`);
  the feed is :func:`~painn_export.batch.collate` of the graphs.
- **device** (``--graphs device``, or ``auto`` on a GPU): the batch's graphs
  are built on the runner's device every step
  (:func:`~painn_export.device_graphs.build_graphs`; structures that entered
  since are built when the batch is fed, and joined); each member's
  ``graph`` is then its size (atoms, busiest atom), which admission and
  splitting read, and the feed is built there too.

Both give the same edges in the same order, hence the same feeds and bits;
a structure without a graph gets the same message from both: its geometry
became invalid, or two atoms came closer than :data:`~pipelines.graphs.MIN_SEPARATION`.

A member is what :mod:`pipelines.relax` keeps per structure: ``z``, ``pbc``,
``skin``, ``state`` (positions, cell), ``n_atoms`` and ``graph``.
"""

from __future__ import annotations

import time

import numpy as np

from painn_export.neighbors import StructureError
from painn_export.skin import update_skins
from pipelines.device_batches import Sized, feeds_of
from pipelines.graphs import MIN_SEPARATION, GraphSettings


def graph_failure(graph) -> str | None:
    """Why a skin graph (or the StructureError in its place) cannot be evaluated; None when it can."""
    if isinstance(graph, StructureError):
        return f"the geometry became invalid: {graph}"
    if graph.min_distance < MIN_SEPARATION:
        return _too_close(graph.min_distance)
    return None


def _too_close(distance: float) -> str:
    return f"atoms came {distance:.3g} Å apart (< {MIN_SEPARATION} Å)"


class StepGraphs:
    """The graphs of a relaxation's batch, on the host or on ``runner``'s device (module doc)."""

    def __init__(self, runner, settings: GraphSettings, limits, summary, on_device: bool) -> None:
        self.runner, self.settings, self.limits, self.summary = runner, settings, limits, summary
        self.on_device = on_device
        self.device_graphs = None  # device: the DeviceGraphs of the batch's first members

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

    def feed_of(self, members: list):
        """``feed_of(lo, hi)`` for :func:`~pipelines.batches.infer_split`; None on the host (collate)."""
        if not self.on_device:
            return None
        import torch

        from painn_export.device_graphs import join_graphs

        built = self.device_graphs
        have = 0 if built is None else len(built.max_degree)
        if have < len(members):  # entered since the last step (or restored): built here
            fresh = self._device_build(members[have:])
            if any(kind != "ok" for kind in fresh.status.kind):  # they had a graph when they entered
                raise RuntimeError(f"a structure that entered has no device graph: {fresh.status.message}")
            built = fresh if built is None else join_graphs(built, fresh)
        self.device_graphs = built
        dtype = torch.from_numpy(np.empty(0, self.runner.feed_dtype)).dtype
        return feeds_of(built, 0, self.limits, dtype, self.summary)

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
        from painn_export.device_graphs import build_graphs

        t0 = time.perf_counter()
        graphs = build_graphs(
            np.concatenate([m.state.positions for m in members]),
            np.array([m.state.cell for m in members]),
            np.array([m.pbc for m in members]),
            np.concatenate([m.z for m in members]),
            np.array([m.n_atoms for m in members]),
            cutoff=self.settings.cutoff, max_neighbors=self.settings.max_neighbors,
            device=self.runner.device, min_separation=MIN_SEPARATION,
        )  # fmt: skip
        self.summary.graph_seconds += time.perf_counter() - t0
        return graphs
