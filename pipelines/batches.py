"""Packing structures into batches and evaluating them: the one rule run, relax and Ray share.

- :class:`Limits` and :class:`Budget`: what one batch may hold (atoms,
  padded edge slots, slots per atom, a TensorRT engine's profiles), and
  whether the next graph still fits.
- :func:`infer_split`: one batch through the runner, its feed collated in
  the runner's own float dtype (:attr:`~painn_export.runners.Runner.feed_dtype`:
  a float64 model is fed float64); a batch the runtime cannot fit (memory,
  an engine profile) is split in halves down to one structure, which is
  then ``too_large``. The retry runs *after* the failed attempt's exception
  is gone, with the runner's cached device memory given back: a traceback
  holds the failed forward's tensors (its frames), and a retry inside the
  ``except`` would run with that memory still taken.
- :func:`evaluate`: ``run``'s loop over items (a graph, or a status for a
  structure that has none) in order. Results go to a *writer* with
  ``commit_results``/``commit_status``: the output file's
  :class:`~pipelines.output.Writer` locally, a collector on a Ray actor.
  Any failure other than "too large" ends the run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from painn_export.batch import collate
from painn_export.contract import slot_count
from painn_export.errors import BatchTooLargeError, one_line
from pipelines.graphs import CHUNK, Item
from pipelines.output import SUCCESS
from pipelines.signals import check_stop


@dataclass
class Summary:
    output: str = ""
    runtime: str = ""
    device: str = ""  # where the runtime ran (cpu, cuda:0)
    provider: str = ""  # what ran it: cpu, cuda, tensorrt
    gpu: str = ""  # the GPU's name, when one ran it
    graphs: str = ""  # where the graphs and the feed were built: host, or device (on cpu, cuda:0)
    graph_seconds: float = 0.0  # wall time building graphs and feeds on the device (device graphs)
    model_seconds: float = 0.0  # wall time inside the runtime's inference calls
    # Atoms a batch may hold after one failed for memory (half the smallest that failed); None: none failed.
    memory_atoms: int | None = None
    n_structures: int = 0
    computed: int = 0  # structures given a final status by this run
    already_done: int = 0  # structures final before this run (--resume)
    counts: dict[str, int] = field(default_factory=dict)
    atoms: int = 0
    seconds: float = 0.0
    energy_mae_per_atom: float | None = None
    forces_mae: float | None = None

    def as_dict(self) -> dict:
        """The summary as JSON-ready values (a quantity that is not finite is None)."""
        report = {
            "output": self.output,
            "runtime": self.runtime,
            "device": self.device,
            "provider": self.provider,
            "gpu": self.gpu,
            "graphs": self.graphs,
            "n_structures": self.n_structures,
            "computed": self.computed,
            "already_done": self.already_done,
            "status_counts": self.counts,
            "seconds": round(self.seconds, 3),
            "structures_per_s": round(self.computed / self.seconds, 2) if self.seconds else None,
            "atoms_per_s": round(self.atoms / self.seconds, 1) if self.seconds else None,
            "model_fraction": round(self.model_seconds / self.seconds, 3) if self.seconds else None,
            "device_graph_fraction": round(self.graph_seconds / self.seconds, 3) if self.seconds else None,
            "memory_atoms": self.memory_atoms,
            "energy_mae_eV_per_atom": self.energy_mae_per_atom,
            "forces_mae_eV_per_A": self.forces_mae,
        }
        return {k: None if isinstance(v, float) and not np.isfinite(v) else v for k, v in report.items()}

    @property
    def all_ok(self) -> bool:
        return sum(n for k, n in self.counts.items() if k in SUCCESS) == self.n_structures


@dataclass(frozen=True)
class Limits:
    """What one batch may hold."""

    atoms: int
    edge_slots: float  # atoms x slots per atom (the padded edges the model evaluates)
    slots: float  # slots per atom
    # Fewest slots per atom a batch is given: a TensorRT engine's smallest profile
    # (one built before slot counts below 8 existed starts at 8); else 1.
    min_slots: int = 1

    def slots_for(self, max_degree: int) -> int:
        """Slots per atom of a batch whose busiest atom has ``max_degree`` edges: what collate is given."""
        return max(slot_count(max_degree), self.min_slots)

    def admit(self, atoms: int, max_degree: int) -> bool:
        """A batch of ``atoms`` whose busiest atom has ``max_degree`` edges fits."""
        slots = self.slots_for(max_degree)
        return atoms <= self.atoms and atoms * slots <= self.edge_slots and slots <= self.slots

    def lowered(self, atoms: int | None) -> Limits:
        """These limits with at most ``atoms`` atoms a batch (None: unchanged)."""
        return self if atoms is None or atoms >= self.atoms else dataclasses.replace(self, atoms=atoms)

    def collate(self, graphs, dtype, pool=None, max_degree: int | None = None) -> dict:
        """The feed of ``graphs``, floats in ``dtype``, on :meth:`slots_for` slots per atom
        (on ``pool``'s threads: :func:`~painn_export.batch.collate`), without the flat edge list
        that only the torch_scatter reference reads. ``max_degree``: the graphs' busiest atom, when
        the caller knows it (else found here)."""
        if max_degree is None:
            max_degree = max(g.max_degree for g in graphs)
        return collate(graphs, dtype, n_slots=self.slots_for(max_degree), pool=pool, edges=False)


def batch_limits(profiles, max_atoms: int, max_edges: int | None) -> Limits:
    """Batch limits: the user's, within a TensorRT engine's largest profile (``ModelFacts.profiles``)."""
    limits = Limits(max_atoms, float(max_edges or np.inf), np.inf)
    if profiles:
        limits = Limits(
            min(max_atoms, max(p.atoms[2] for p in profiles)),
            limits.edge_slots,
            max(p.slots[2] for p in profiles),
            min(p.slots[0] for p in profiles),
        )
    return limits


class Budget:
    """The atoms and busiest atom of a batch being packed, against its :class:`Limits`."""

    def __init__(self, limits: Limits, graphs=()) -> None:
        self.limits = limits
        self.count = self.atoms = self.degree = 0
        for g in graphs:
            self.add(g)

    def admits(self, graph) -> bool:
        """``graph`` may join: the batch is empty (a graph alone always tries) or stays within the limits."""
        return not self.count or self.limits.admit(
            self.atoms + graph.n_atoms, max(self.degree, graph.max_degree)
        )

    def add(self, graph) -> None:
        self.count += 1
        self.atoms += graph.n_atoms
        self.degree = max(self.degree, graph.max_degree)


# One structure's numbers from a batch: (energy eV, forces [n, 3] eV/Å, stress [3, 3] eV/Å³ or None).
Evaluation = tuple[float, np.ndarray, "np.ndarray | None"]
TOO_LARGE = "failed alone in a batch: "  # how a too_large message starts


def infer_split(runner, graphs: list, limits: Limits, summary=None, feed_of=None) -> list[Evaluation | str]:
    """Each graph's :data:`Evaluation`, in order, or a ``too_large`` message for one that fails alone.

    ``summary.model_seconds`` (when given) adds the runtime's time of every
    batch that ran. Only :class:`~painn_export.errors.BatchTooLargeError`
    splits; any other failure propagates. With ``summary``, a batch of more
    than one structure that failed sets ``summary.memory_atoms`` to half its
    atoms (or less, as it was), and it and every batch after it run in
    consecutive pieces within that: no size that failed is tried again.
    Without, a failed batch is split in halves. ``feed_of(lo, hi)`` (when given)
    makes the feed of ``graphs[lo:hi]`` (a device feed,
    :mod:`pipelines.device_batches`; ``graphs`` then need only ``n_atoms``
    and ``max_degree``), else :meth:`Limits.collate` does.
    """
    results: list = [None] * len(graphs)
    todo = _within(graphs, None if summary is None else summary.memory_atoms)[::-1]  # popped from the end
    while todo:
        check_stop()
        lo, hi = todo.pop()
        failure = None
        try:
            feed = feed_of(lo, hi) if feed_of else limits.collate(graphs[lo:hi], runner.feed_dtype)
            out = runner.infer(feed)
        except BatchTooLargeError as exc:
            failure = one_line(exc, limit=130)  # only its words outlive the handler: not its frames
        feed = None  # a device feed's memory is given back before a retry
        if failure is not None:  # the exception, its traceback and the failed tensors are gone now
            runner.free_memory()
            if hi - lo == 1:
                results[lo] = TOO_LARGE + failure
            elif summary is not None:  # this range and all that remain, within half of it
                half = max(1, sum(graphs[k].n_atoms for k in range(lo, hi)) // 2)
                summary.memory_atoms = min(half, summary.memory_atoms or half)
                remaining = [(lo, hi), *todo[::-1]]  # in order
                todo = [
                    (a + p, a + q)
                    for a, b in remaining
                    for p, q in _within(graphs[a:b], summary.memory_atoms)
                ][::-1]
            else:
                mid = (lo + hi) // 2
                todo += [(mid, hi), (lo, mid)]  # popped from the end: the first half runs first
            continue
        if summary is not None:
            summary.model_seconds += runner.last_inference_s
        atom = 0
        for k in range(hi - lo):
            n = graphs[lo + k].n_atoms
            stress = out["stress"][k] if "stress" in out else None
            results[lo + k] = (float(out["energy"][k]), out["forces"][atom : atom + n], stress)
            atom += n
    return results


def _within(graphs: list, atoms: int | None) -> list[tuple[int, int]]:
    """``graphs`` as consecutive ranges of at most ``atoms`` atoms (one graph alone always tries)."""
    if atoms is None:
        return [(0, len(graphs))]
    ranges, lo, total = [], 0, 0
    for k, g in enumerate(graphs):
        if k > lo and total + g.n_atoms > atoms:
            ranges.append((lo, k))
            lo, total = k, 0
        total += g.n_atoms
    return [*ranges, (lo, len(graphs))] if graphs else []


def evaluate(items, runner, writer, limits: Limits, summary, bar) -> None:
    """Pack ``items`` (in order) into batches within ``limits``, run each, commit through ``writer``.

    ``writer`` needs ``commit_results`` and ``commit_status`` (the output
    file's :class:`~pipelines.output.Writer`, or a collector on a Ray actor).
    """
    batch: list[Item] = []
    budget = Budget(limits)
    failed: list[tuple[int, str, str]] = []

    def flush_failed():
        nonlocal failed
        writer.commit_status(failed)
        summary.computed += len(failed)
        bar.update(len(failed), 0)
        failed = []

    for item in items:
        check_stop()
        if item.graph is None:
            failed.append((item.index, item.status, item.message))
            if len(failed) >= CHUNK:
                flush_failed()
            continue
        if not budget.admits(item.graph):
            run_batch(runner, batch, writer, summary, bar, limits)
            batch, budget = [], Budget(limits.lowered(summary.memory_atoms))
        batch.append(item)
        budget.add(item.graph)
    if batch:
        run_batch(runner, batch, writer, summary, bar, limits)
    flush_failed()


def run_batch(runner, batch: list[Item], writer, summary: Summary, bar, limits: Limits, feed_of=None) -> None:
    """Evaluate ``batch`` (:func:`infer_split`, ``feed_of`` as there); commit each result or status."""
    rows, bad = [], []
    results = infer_split(runner, [it.graph for it in batch], limits, summary, feed_of)
    for it, result in zip(batch, results):
        if isinstance(result, str):
            bad.append((it.index, "too_large", result))
            continue
        e, f, stress = result
        if not (np.isfinite(e) and np.isfinite(f).all()):
            bad.append((it.index, "nonfinite_output", "model output is not finite"))
            continue
        kind = "ok" if stress is None or np.isfinite(stress).all() else "ok_no_stress"
        rows.append((it.index, e, f, stress, kind))
        summary.atoms += it.graph.n_atoms
    writer.commit_results(rows)
    writer.commit_status(bad)
    summary.computed += len(batch)
    bar.update(len(batch), sum(it.graph.n_atoms for it in batch if it.graph is not None))
