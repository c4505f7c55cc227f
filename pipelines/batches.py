"""Packing structures into batches and evaluating them: the part the local and the Ray pipelines share.

Items (a graph, or a status for a structure that has none) are packed in
order up to the batch limits (atoms, padded edge slots, slots per atom) and
run; a batch the runtime cannot fit is split in halves down to
one structure (``too_large``), any other failure ends the run. Results go to
a *writer* with ``commit_results``/``commit_status``: the output file's
:class:`~pipelines.output.Writer` locally, a collector on a Ray actor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from painn_export.batch import collate
from painn_export.contract import slot_count
from painn_export.errors import BatchTooLargeError, one_line
from pipelines.graphs import Item
from pipelines.output import SUCCESS
from pipelines.signals import check_stop

CHUNK = 128  # structures per neighbour-graph task (a worker's, or a Ray task's)


def chunks(pending: np.ndarray):
    """Runs of pending structure indices, at most CHUNK each: one neighbour-graph task each."""
    for lo in range(0, len(pending), CHUNK):
        yield pending[lo : lo + CHUNK]


@dataclass
class Summary:
    output: str = ""
    runtime: str = ""
    device: str = ""  # where the runtime ran (cpu, cuda:0)
    provider: str = ""  # what ran it: cpu, cuda, tensorrt
    gpu: str = ""  # the GPU's name, when one ran it
    model_seconds: float = 0.0  # wall time inside the runtime's inference calls
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
            "n_structures": self.n_structures,
            "computed": self.computed,
            "already_done": self.already_done,
            "status_counts": self.counts,
            "seconds": round(self.seconds, 3),
            "structures_per_s": round(self.computed / self.seconds, 2) if self.seconds else None,
            "atoms_per_s": round(self.atoms / self.seconds, 1) if self.seconds else None,
            "model_fraction": round(self.model_seconds / self.seconds, 3) if self.seconds else None,
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

    def collate(self, graphs, dtype=np.float32) -> dict:
        """The feed of ``graphs`` on :meth:`slots_for` slots per atom."""
        return collate(graphs, dtype, n_slots=self.slots_for(max(g.max_degree for g in graphs)))


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


def evaluate(items, runner, writer, limits: Limits, summary, bar) -> None:
    """Pack ``items`` (in order) into batches within ``limits``, run each, commit through ``writer``.

    ``writer`` needs ``commit_results`` and ``commit_status`` (the output
    file's :class:`~pipelines.output.Writer`, or a collector on a Ray actor).
    """
    batch: list[Item] = []
    atoms = degree = 0
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
        g = item.graph
        grown_atoms, grown_degree = atoms + g.n_atoms, max(degree, g.max_degree)
        if batch and not limits.admit(grown_atoms, grown_degree):
            run_batch(runner, batch, writer, summary, bar, limits)
            batch, grown_atoms, grown_degree = [], g.n_atoms, g.max_degree
        batch.append(item)
        atoms, degree = grown_atoms, grown_degree
    if batch:
        run_batch(runner, batch, writer, summary, bar, limits)
    flush_failed()


def run_batch(runner, batch: list[Item], writer, summary: Summary, bar, limits: Limits) -> None:
    """Evaluate ``batch`` and commit it; split it in halves when it does not fit the runtime.

    Only a batch that is too large (memory, an engine profile) is split; any
    other failure ends the run with its message, work so far kept.
    """
    try:
        out = runner.infer(limits.collate([it.graph for it in batch]))
    except BatchTooLargeError as exc:
        if len(batch) == 1:
            message = f"failed alone in a batch: {one_line(exc, limit=130)}"
            writer.commit_status([(batch[0].index, "too_large", message)])
            summary.computed += 1
            bar.update(1, 0)
            return
        half = len(batch) // 2
        run_batch(runner, batch[:half], writer, summary, bar, limits)
        run_batch(runner, batch[half:], writer, summary, bar, limits)
        return
    summary.model_seconds += runner.last_inference_s
    rows, bad = [], []
    atom = 0
    for k, it in enumerate(batch):
        n = it.graph.n_atoms
        e, f = float(out["energy"][k]), out["forces"][atom : atom + n]
        atom += n
        stress = out["stress"][k] if "stress" in out else None
        if not (np.isfinite(e) and np.isfinite(f).all()):
            bad.append((it.index, "nonfinite_output", "model output is not finite"))
            continue
        kind = "ok" if stress is None or np.isfinite(stress).all() else "ok_no_stress"
        rows.append((it.index, e, f, stress, kind))
        summary.atoms += n
    writer.commit_results(rows)
    writer.commit_status(bad)
    summary.computed += len(batch)
    bar.update(len(batch), sum(it.graph.n_atoms for it in batch))
