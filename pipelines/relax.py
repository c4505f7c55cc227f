"""``painn-batch relax``: every structure of an HDF5 file relaxed with FIRE, many at a time.

The loop, on one runner:

1. **Refill.** Structures enter the batch while it stays within the
   atom/edge budget ``run`` uses (:class:`pipelines.batches.Limits`); one
   that converges or fails leaves it, and others enter at the next step
   ("in-flight" batching). They are taken in input order, but one that does
   not fit does not hold back those behind it: up to :data:`WINDOW`
   structures wait while later ones that fit enter, and a waiting one that
   has been passed :data:`PATIENCE` times lets nothing more pass until it
   is in. Every choice depends only on the batch, the window and the input,
   so a resumed run rebuilds the same batches. A batch that failed for
   memory lowers the atom budget for every batch after it
   (:attr:`pipelines.batches.Summary.memory_atoms`). Structures the input itself rules out
   (``empty_structure``, ``bad_cell``, ...) get ``run``'s statuses from its
   neighbour workers (``--workers``) and never enter.
2. **Graphs.** Each structure keeps a Verlet-skin neighbour list
   (:class:`painn_export.skin.SkinGraph`): searched again only when an
   atom has moved more than half the skin, filtered to the exact graph in
   between. Edges are put in one canonical order (by centre, neighbour,
   image), so a graph never depends on when its list was searched.
3. **Model and FIRE.** One inference for the whole batch, then one FIRE step
   per structure (:mod:`pipelines.fire`: ASE's rule, parameters and
   convergence test, ``FrechetCellFilter`` with ``--cell``).
4. **Output.** Per structure: final positions, cell, energy, forces (as the
   model gives them, fixed atoms included), stress where the model has it,
   steps and a status (``converged``, ``not_converged``, ``diverged`` or an
   input status). Every ``checkpoint_every`` model calls, and once more when
   a stop signal ends the run, the optimiser state of the structures in
   flight goes to a sidecar file (:mod:`pipelines.relax_checkpoint`: written
   under a temporary name, then the results finished since the last
   checkpoint, then renamed): a run killed at any moment resumes
   (``--resume``) from a consistent state, and, the batches being rebuilt
   exactly, gives the same numbers, bitwise on a deterministic runtime, with
   the same options. The sidecar goes when the run ends.

Output datasets, beyond ``run``'s (:mod:`pipelines.output`):

=================  =======  ==============  ==============================================
``positions``      float64  ``[Σn, 3]``     Å, final geometry (NaN until final)
``cell``           float64  ``[S, 3, 3]``   Å, final cell (changes only with ``--cell``)
``steps``          int32    ``[S]``         FIRE steps taken (-1 until final)
``fmax``           float64  ``[S]``         the largest force at the final geometry (eV/Å; eV on the
                                            cell rows with ``--cell``), what convergence tests
``trajectory_*``   float64  ``[Σn, F, 3]``  ``--trajectory-every N``: positions at steps 0, N, 2N, ...
                                            (NaN after the end); ``_cell`` ``[S, F, 3, 3]``,
                                            ``_energy`` and ``_fmax`` ``[S, F]``; F = steps // N + 1
=================  =======  ==============  ==============================================
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from painn_export.batch import Graph
from painn_export.neighbors import StructureError
from painn_export.schema import InputReader, validate_input
from painn_export.skin import SkinGraph, update_skins
from pipelines.batches import Budget, Summary, batch_limits, infer_split
from pipelines.device_batches import Sized
from pipelines.fire import FireState, fire_steps, generalized_forces_many, max_forces, one_blas_thread
from pipelines.graphs import MIN_SEPARATION, GraphSettings, neighbour_items
from pipelines.options import RelaxSettings, RunOptions
from pipelines.output import (
    RELAXED,
    STATUS,
    Fingerprint,
    Writer,
    contiguous_runs,
    fingerprint_fields,
    open_partial,
    output_datasets,
    output_session,
    planned_bytes,
)
from pipelines.progress import Progress
from pipelines.relax_checkpoint import Checkpoint, Saved, checkpoint_path, discard, fingerprint_of
from pipelines.relax_checkpoint import read as read_checkpoint
from pipelines.relax_checkpoint import writing as writing_checkpoint
from pipelines.signals import Stopped, check_stop, stop_at_safe_points

log = logging.getLogger(__name__)

WINDOW = 32  # structures that may wait (not fitting) while later ones enter
PATIENCE = 64  # a waiting structure passed this often lets nothing more pass

__all__ = ["CellNeedsStressError", "RelaxSettings", "RelaxSummary", "relax_file"]


class CellNeedsStressError(ValueError):
    """``--cell`` with a model that has no stress output."""


@dataclass(frozen=True)
class RelaxFingerprint(Fingerprint):
    """A run's fingerprint plus what decides a relaxation's result."""

    fmax: float = 0.05
    max_steps: int = 300
    relax_cell: bool = False
    optimizer: str = "FIRE"
    trajectory_every: int = 0


@dataclass
class RelaxSummary(Summary):
    steps: int = 0  # FIRE steps taken by this run, over all structures (not those before a --resume)
    model_calls: int = 0  # batched inferences
    atom_evaluations: int = 0  # atoms x evaluations (an evaluation per step, and one at the start)
    skin_seconds: float = 0.0  # wall time building the skin graphs on the host (searches, filters)
    searches: int = 0  # neighbour searches (the rest were skin-list filters)
    mean_batch_atoms: float = 0.0
    reference: dict | None = None  # relaxed energies against the input's reference, if it has one
    planned_bytes: int = 0  # the output file's size, allocated when it is created (0: resumed)
    checkpoint_bytes: int = 0  # the largest checkpoint sidecar this run wrote

    def as_dict(self) -> dict:
        report = super().as_dict()
        report.update(
            {
                "steps": self.steps,
                "model_calls": self.model_calls,
                "atom_evaluations": self.atom_evaluations,
                "us_per_atom_step": round(1e6 * self.seconds / self.atom_evaluations, 2)
                if self.atom_evaluations
                else None,
                "graph_fraction": round(self.skin_seconds / self.seconds, 3) if self.seconds else None,
                "searches": self.searches,
                "mean_batch_atoms": round(self.mean_batch_atoms, 1),
                "reference": self.reference,
                "planned_bytes": self.planned_bytes,
                "checkpoint_bytes": self.checkpoint_bytes,
            }
        )
        return report

    @property
    def all_ok(self) -> bool:
        return sum(n for k, n in self.counts.items() if k in RELAXED) == self.n_structures


@dataclass
class _Member:
    """A structure in flight, or waiting to enter: its optimiser state and neighbour list."""

    index: int
    z: np.ndarray  # [n] int64
    pbc: np.ndarray  # [3] bool
    state: FireState
    skin: SkinGraph
    graph: Graph | None = None
    fmax: float = float("nan")  # at the last evaluation
    passed: int = 0  # waiting: how many later structures entered before it

    @property
    def n_atoms(self) -> int:
        return int(self.z.shape[0])


@dataclass
class _Finished:
    index: int
    status: str
    message: str
    state: FireState | None = None
    fmax: float = float("nan")
    energy: float = float("nan")
    forces: np.ndarray | None = None
    stress: np.ndarray | None = None


def relax_file(
    input_path: str | Path,
    output_path: str | Path,
    model_path: str | Path | None = None,
    *,
    settings: RelaxSettings | None = None,
    options: RunOptions | None = None,
    observer=None,
    **changes,
) -> RelaxSummary:
    """Relax every structure of ``input_path``; write the results to ``output_path``.

    ``options`` (or their fields as keywords), files, locks, signals,
    ``resume`` and ``overwrite`` behave as in :func:`pipelines.run.run_file`.
    ``observer``, if given, is called before each model call with
    ``(indices in the batch, atoms in it, atoms of the next structure waiting or None)``.
    """
    start = time.perf_counter()
    options = RunOptions.of(options, **changes)
    settings = settings or RelaxSettings()
    info = validate_input(input_path)
    output_path = Path(output_path)
    with output_session(input_path, output_path, options.resume, options.overwrite) as partial:
        summary = _relax_locked(
            input_path, output_path, partial, info, model_path, settings, options, observer
        )
    summary.seconds = time.perf_counter() - start
    return summary


def _datasets(n_structures: int, n_atoms: int, frames: int = 0) -> dict:
    """The relaxation's datasets beyond ``run``'s: ``name -> (shape, dtype, fill)``.

    ``frames`` > 0 (``--trajectory-every N``): frame ``f`` holds step ``f N``.
    """
    sets = {
        "positions": ((n_atoms, 3), np.float64, np.nan),
        "cell": ((n_structures, 3, 3), np.float64, np.nan),
        "steps": ((n_structures,), np.int32, -1),
        "fmax": ((n_structures,), np.float64, np.nan),
    }
    if frames:
        sets.update(
            {
                "trajectory_positions": ((n_atoms, frames, 3), np.float64, np.nan),
                "trajectory_cell": ((n_structures, frames, 3, 3), np.float64, np.nan),
                "trajectory_energy": ((n_structures, frames), np.float64, np.nan),
                "trajectory_fmax": ((n_structures, frames), np.float64, np.nan),
            }
        )
    return sets


def _refuse_small_disk(partial: Path, need: int) -> None:
    """One line when the output's folder has less free space than the file will take."""
    free = shutil.disk_usage(partial.parent).free
    if need > free:
        raise ValueError(
            f"{partial} needs {need / 1e9:.2f} GB and {partial.parent} has {free / 1e9:.2f} GB free: "
            "free some space, write the output elsewhere, or keep fewer trajectory frames"
        )


def _relax_locked(
    input_path, output_path: Path, partial: Path, info, model_path, settings: RelaxSettings, options, observer
) -> RelaxSummary:
    from painn_export.files import file_sha256
    from painn_export.runners import loader_for

    loader = loader_for(model_path, options.runtime, options.dtype)
    facts = loader.facts()
    if settings.cell and not facts.stress:
        raise CellNeedsStressError(
            f"--cell needs a model with stress, and {model_path or 'the bundled model'} has none "
            "(export it with stress, or relax the atoms only)"
        )
    runner = loader.runner(options.device)
    runner.activate()
    try:
        if settings.cell and not runner.has_stress:
            raise CellNeedsStressError(f"--cell needs a model with stress, and {model_path} serves none")
        # Not in the fingerprint: both paths give the same graphs and edge order, so the same bits.
        from painn_export.device_graphs import graphs_on_device

        on_device = graphs_on_device(options.graphs, runner.device)
        model_sha256 = file_sha256(loader.path)
        fingerprint = RelaxFingerprint(
            **fingerprint_fields(input_path, info, model_sha256, runner.identity()),
            fmax=float(settings.fmax),
            max_steps=int(settings.steps),
            relax_cell=bool(settings.cell),
            trajectory_every=int(settings.trajectory_every),
        )
        frames = settings.steps // settings.trajectory_every + 1 if settings.trajectory_every else 0
        extra = _datasets(info.n_structures, info.n_atoms, frames)
        ckpt = checkpoint_path(output_path)
        creating = not (options.resume and (partial.exists() or output_path.exists()))
        sets = output_datasets(info.n_structures, info.n_atoms, fingerprint.stress, extra)
        need = planned_bytes(sets) if creating else 0
        if creating:
            log.info("relax: creating %s, %.3f GB", partial, need / 1e9)
            _refuse_small_disk(partial, need)
            discard(ckpt)  # a checkpoint belongs to the partial output it was written with
        open_partial(partial, output_path, fingerprint, options.resume, extra)

        with InputReader(input_path) as reader:
            out = _RelaxOutput(partial, reader.offsets, ckpt, resumed=not creating)
            summary = RelaxSummary(
                output=str(output_path),
                runtime=runner.name,
                device=runner.device,
                provider=runner.provider,
                gpu=runner.gpu,
                n_structures=info.n_structures,
                planned_bytes=need,
                graphs=f"device ({runner.device})" if on_device else "host",
            )
            try:
                if not len(out.writer.pending()):  # finished already: checked, nothing to compute
                    summary.already_done = info.n_structures
                else:
                    loop = _Loop(
                        str(input_path),
                        reader,
                        runner,
                        facts,
                        settings,
                        out,
                        summary,
                        batch_limits(facts.profiles, options.max_atoms, options.max_edges),
                        options.neighbour_workers,
                        observer,
                        on_device,
                    )
                    bar = Progress(
                        info.n_structures - summary.already_done,
                        enabled=options.progress,
                        label=f"relax, {runner.name} on {runner.device}",
                    )
                    loop.bar = bar
                    try:
                        loop.run()
                    finally:
                        bar.close()
                summary.counts = out.writer.status_counts()
                summary.reference = relaxed_reference(reader, out)
                finished = len(out.writer.pending()) == 0
            finally:
                out.close()
        if finished:
            partial.replace(output_path)
            discard(ckpt)  # after the rename: a kill between leaves a finished output and an empty checkpoint
    finally:
        runner.deactivate()
    return summary


class _RelaxOutput:
    """The partial output (final results through :class:`~pipelines.output.Writer`) and its checkpoint."""

    def __init__(self, path: Path, offsets: np.ndarray, ckpt: Path, resumed: bool) -> None:
        self.writer = Writer(path, offsets)
        self.fh = self.writer.fh
        self.offsets = offsets
        self.ckpt = ckpt
        self.resumed = resumed  # trajectory frames of a killed run may lie past a structure's new end
        self.fingerprint = fingerprint_of(self.fh)

    def close(self) -> None:
        self.writer.close()

    def commit(self, done: list[_Finished]) -> None:
        """Final results: geometry, steps and fmax, energies and forces, flushed, then statuses."""
        if not done:
            return
        fh, off = self.fh, self.offsets
        ended = sorted((d for d in done if d.state is not None), key=lambda d: d.index)
        for run in contiguous_runs([d.index for d in ended]):
            part = ended[run.start : run.stop]
            s0, s1 = part[0].index, part[-1].index + 1
            fh["positions"][off[s0] : off[s1]] = np.concatenate([d.state.positions for d in part])
            fh["cell"][s0:s1] = np.stack([d.state.cell for d in part])
            fh["steps"][s0:s1] = [d.state.steps for d in part]
            fh["fmax"][s0:s1] = [d.fmax for d in part]
        if self.resumed and "trajectory_energy" in fh:
            self._clear_frames_after(ended)
        rows = [
            (d.index, d.energy, d.forces, d.stress, d.status)
            for d in done
            if d.forces is not None and d.status in ("converged", "not_converged")
        ]
        self.writer.commit_results(rows)  # flushes, then the statuses
        self.writer.commit_status([(d.index, d.status, d.message) for d in done if d.forces is None])

    def _clear_frames_after(self, ended: list[_Finished]) -> None:
        """NaN in each structure's frames after its last: a killed run may have gone further."""
        fh, off = self.fh, self.offsets
        every = int(fh.attrs["fingerprint_trajectory_every"])
        frames = fh["trajectory_energy"].shape[1]
        for d in ended:
            s, f = d.index, d.state.steps // every + 1
            if f < frames:
                fh["trajectory_positions"][off[s] : off[s + 1], f:] = np.nan
                fh["trajectory_cell"][s, f:] = np.nan
                fh["trajectory_energy"][s, f:] = np.nan
                fh["trajectory_fmax"][s, f:] = np.nan

    def frame(self, m: _Member, f: int, energy: float, fmax: float) -> None:
        """Trajectory frame ``f`` of ``m`` (its current geometry); rewritten alike on a resume."""
        fh, off, s = self.fh, self.offsets, m.index
        fh["trajectory_positions"][off[s] : off[s + 1], f] = m.state.positions
        fh["trajectory_cell"][s, f] = m.state.cell
        fh["trajectory_energy"][s, f] = energy
        fh["trajectory_fmax"][s, f] = fmax

    def checkpoint(self, members: list[_Member], next_index: int, calls: int, waiting: list):
        """A context: the members' state written under a temporary name, renamed when it ends well."""
        states = [
            Saved(
                m.index,
                m.state.positions,
                m.state.velocity,
                m.state.cell,
                m.state.dt,
                m.state.a,
                m.state.n_positive,
                m.state.steps,
            )
            for m in members
        ]
        return writing_checkpoint(self.ckpt, Checkpoint(states, next_index, calls, waiting), self.fingerprint)

    def restore(self) -> Checkpoint:
        """The checkpoint in force (none: nothing in flight, nothing entered)."""
        off = self.offsets
        return read_checkpoint(self.ckpt, self.fingerprint, lambda s: int(off[s + 1] - off[s]))


class _Loop:
    """The in-flight relaxation of one run: refill, graphs, model, FIRE, checkpoints."""

    def __init__(
        self, input_path, reader, runner, facts, settings, out, summary, limits, workers, observer, on_device
    ) -> None:
        self.input_path, self.reader, self.runner, self.facts = input_path, reader, runner, facts
        self.settings, self.out, self.summary, self.limits = settings, out, summary, limits
        self.workers, self.observer = workers, observer
        self.on_device = on_device  # graphs and feeds built on the runner's device each step
        self.device_graphs = None  # the batch's first members' DeviceGraphs (the rest built when fed)
        # Workers search each structure's skin list at entry; its first graph comes with it.
        self.graph_settings = dataclasses.replace(GraphSettings.of(facts, runner), skin=settings.skin)
        self.bar = None
        self.done: list[_Finished] = []  # finished since the last checkpoint
        self.batch: list[_Member] = []
        self.waiting: list[_Member] = []  # pulled from the input, not in yet (input order)
        restored = out.restore()
        self.next_index, self.calls = restored.next_index, restored.calls
        self.restored_waiting = restored.waiting  # [(index, passed)]: rebuilt first by run()
        for saved in restored.states:
            self.batch.append(self._restored(saved))
            summary.steps -= saved.steps  # this run's summary counts this run's steps
        self.device_graphs = None  # the restored batch's are built when it is fed
        status = out.fh["status"][...]
        in_flight = {m.index for m in self.batch}
        summary.already_done = sum(
            1 for s in range(self.next_index) if status[s] != STATUS["pending"] and s not in in_flight
        )

    # -- members ---------------------------------------------------------------
    def _restored(self, saved: Saved) -> _Member:
        s = saved.index
        z, _, cells, pbcs = self.reader.structures(s, s + 1)
        fixed = self.reader.fixed(s, s + 1)
        state = FireState(
            positions=np.array(saved.positions, np.float64),
            cell=np.array(saved.cell, np.float64),
            orig_cell=np.array(cells[0], np.float64),
            fixed=fixed,
            velocity=np.array(saved.velocity, np.float64),
            dt=saved.dt,
            a=saved.a,
            n_positive=saved.n_positive,
            steps=saved.steps,
        )
        skin = SkinGraph(self.facts.cutoff, self.facts.max_neighbors, skin=self.settings.skin)
        member = _Member(s, np.asarray(z, np.int64), pbcs[0], state, skin)
        failure = self._build_graph(member)
        if failure is not None:  # cannot happen for a state that was evaluated before; keep it honest
            raise RuntimeError(f"structure {s}: its checkpointed geometry has no graph ({failure})")
        return member

    def _build_graph(self, m: _Member) -> str | None:
        """Update ``m.graph`` at its current geometry; a message when it has none (diverged)."""
        (failure,) = self._build_graphs([m])
        return failure

    @staticmethod
    def _graph_failure(graph) -> str | None:
        """Why ``graph`` (or the StructureError in its place) cannot be evaluated; None when it can."""
        if isinstance(graph, StructureError):
            return f"the geometry became invalid: {graph}"
        if graph.min_distance < MIN_SEPARATION:
            return f"atoms came {graph.min_distance:.3g} Å apart (< {MIN_SEPARATION} Å)"
        return None

    def _finish(self, m: _Member, status: str, message: str = "", result=None) -> None:
        energy, forces, stress = result if result is not None else (float("nan"), None, None)
        self.done.append(_Finished(m.index, status, message, m.state, m.fmax, energy, forces, stress))
        self.summary.steps += m.state.steps
        self.summary.atoms += m.n_atoms
        if self.bar is not None:
            self.bar.update(1, m.n_atoms)

    # -- the loop --------------------------------------------------------------
    def run(self) -> None:
        n = self.reader.n_structures
        again = np.array([index for index, _ in self.restored_waiting], dtype=np.int64)
        pending = np.concatenate([again, np.arange(self.next_index, n, dtype=np.int64)])
        items = (
            neighbour_items(self.input_path, pending, self.graph_settings, self.workers)
            if len(pending)
            else None
        )
        for index, passed in self.restored_waiting:  # the window as the checkpoint left it
            item = next(items)
            if item.index != index or item.start is None:  # it had a graph when it first waited
                raise RuntimeError(f"structure {index}: waiting in the checkpoint, but has no graph now")
            self.waiting.append(self._member_of(item))
            self.waiting[-1].passed = passed
        fill = []
        try:
            with stop_at_safe_points():  # a signal stops the loop where its state is whole
                self._steps(items, fill)
        except Stopped as exc:
            if exc.safe:
                self._checkpoint()  # the last: --resume continues from this very step
            raise
        finally:
            self.summary.mean_batch_atoms = float(np.mean(fill)) if fill else 0.0
        self._checkpoint()  # the last: nothing in flight, every structure entered

    def _steps(self, items, fill: list) -> None:
        while True:
            check_stop()
            self._refill(items)
            if not self.batch:
                break
            atoms = sum(m.n_atoms for m in self.batch)
            fill.append(atoms)
            if self.observer is not None:
                smallest = min((m.n_atoms for m in self.waiting), default=None)
                self.observer([m.index for m in self.batch], atoms, smallest)
            results = self._evaluate(self.batch)
            self.calls += 1
            self.summary.model_calls += 1
            with one_blas_thread() if self.settings.cell else nullcontext():
                stepping = self._advance(self.batch, results)
            self.batch = []
            for m, failure in zip(stepping, self._build_graphs(stepping)):
                if failure is None:
                    self.batch.append(m)
                else:
                    m.fmax = float("nan")  # the geometry written was never evaluated
                    self._finish(m, "diverged", failure)
            if self.calls % self.settings.checkpoint_every == 0:
                self._checkpoint()

    def _checkpoint(self) -> None:
        waiting = [(m.index, m.passed) for m in self.waiting]
        with self.out.checkpoint(self.batch, self.next_index, self.calls, waiting):
            self.out.commit(self.done)  # before the rename: see the module doc
        self.summary.checkpoint_bytes = max(self.summary.checkpoint_bytes, self.out.ckpt.stat().st_size)
        self.summary.computed += len(self.done)
        self.done = []

    def _refill(self, items) -> None:
        """Admit waiting structures, then new ones, while the budget holds (the module doc's rule).

        Each candidate is looked at in input order; one that does not fit
        waits (up to ``WINDOW``) and those behind it may pass, until one has
        been passed ``PATIENCE`` times: then nothing behind it enters before it.
        """
        budget = Budget(self.limits.lowered(self.summary.memory_atoms), [m.graph for m in self.batch])
        still: list[_Member] = []
        blocked = False  # a waiting structure has been passed often enough

        def offer(m: _Member) -> None:
            nonlocal blocked
            if not blocked and budget.admits(m.graph):
                self.batch.append(m)
                budget.add(m.graph)
                for ahead in still:
                    ahead.passed += 1
                    blocked = blocked or ahead.passed >= PATIENCE
                return
            still.append(m)
            blocked = blocked or m.passed >= PATIENCE

        for m in self.waiting:
            offer(m)
        while items is not None and len(still) < WINDOW and not blocked:
            item = next(items, None)
            if item is None:
                break
            self.next_index = item.index + 1
            if item.graph is None:  # an input status, as run gives it
                self._input_status(item.index, item.status, item.message)
            elif self.settings.cell and not item.start.pbc.all():
                self._input_status(
                    item.index, "bad_cell", "--cell relaxes periodic cells only; this one is not"
                )
            else:
                offer(self._member_of(item))
        self.waiting = still

    def _input_status(self, index: int, status: str, message: str) -> None:
        self.out.writer.commit_status([(index, status, message)])
        self.summary.computed += 1
        if self.bar is not None:
            self.bar.update(1, 0)

    def _member_of(self, item) -> _Member:
        """A structure entering from its neighbour item: the worker's skin list and first graph."""
        start, graph = item.start, item.graph
        state = FireState.start(
            graph.positions, start.cell, start.fixed, self.settings.fire, self.settings.cell
        )
        self.summary.searches += start.skin.n_searches
        return _Member(item.index, graph.atomic_numbers, start.pbc, state, start.skin, graph)

    def _evaluate(self, members: list[_Member]) -> list:
        """``(energy, forces, stress)`` per member (float64), or a too_large message (:func:`infer_split`)."""
        feed_of = self._device_feed_of(members) if self.on_device else None
        results = infer_split(self.runner, [m.graph for m in members], self.limits, self.summary, feed_of)
        out = []
        for m, result in zip(members, results):
            if isinstance(result, str):
                out.append(result)
                continue
            energy, forces, stress = result
            stress = None if stress is None else np.asarray(stress, np.float64)
            out.append((energy, np.asarray(forces, np.float64), stress))
            self.summary.atom_evaluations += m.n_atoms
        return out

    def _advance(self, members: list[_Member], results: list) -> list[_Member]:
        """Each member converges, runs out of steps or diverges (it leaves), or takes a FIRE step.

        Returns those that stepped, in order; the step is one :func:`fire_steps` for all.
        """
        judged = []
        for m, result in zip(members, results):
            if isinstance(result, str):
                self._finish(m, "too_large", result)
                continue
            energy, forces, stress = result
            cell_stress = stress if self.settings.cell else None
            finite = np.isfinite(energy) and np.isfinite(forces).all()
            if not finite or (cell_stress is not None and not np.isfinite(cell_stress).all()):
                m.fmax = float("nan")
                self._finish(m, "diverged", "the model's energy, forces or stress are not finite")
                continue
            judged.append((m, result))
        gforces = generalized_forces_many(
            [m.state for m, _ in judged],
            [result[1] for _, result in judged],
            [result[2] for _, result in judged] if self.settings.cell else None,
        )
        stepping, step_forces = [], []
        every = self.settings.trajectory_every
        for (m, result), g, fmax in zip(judged, gforces, max_forces(gforces)):
            m.fmax = float(fmax)
            if every and m.state.steps % every == 0:
                self.out.frame(m, m.state.steps // every, result[0], m.fmax)
            if m.fmax < self.settings.fmax:  # ASE's test
                self._finish(m, "converged", "", result)
            elif m.state.steps >= self.settings.steps:
                self._finish(m, "not_converged", f"{m.state.steps} steps without converging", result)
            else:
                stepping.append(m)
                step_forces.append(g)
        fire_steps([m.state for m in stepping], step_forces, self.settings.fire, self.settings.cell)
        return stepping

    def _build_graphs(self, members: list[_Member]) -> list[str | None]:
        """Update the members' graphs at their geometry, in one pass; per member, why it has none, or None."""
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
            failures.append(self._graph_failure(graph))
            if failures[-1] is None:
                m.graph = graph  # in the canonical order already: the kernel writes it
        return failures

    def _build_on_device(self, members: list[_Member]) -> list[str | None]:
        """:meth:`_build_graphs` on the runner's device: the members' graphs become the batch's first.

        The statuses' messages are the skin path's; each member's ``graph`` is
        its size (atoms, busiest atom), which admission and splitting read.
        """
        self.device_graphs = None
        if not members:
            return []
        graphs = self._device_build(members)
        failures, sizes = [], iter(zip(graphs.natoms.tolist(), graphs.max_degree.tolist()))
        for m, kind, message, closest in zip(
            members, graphs.status.kind, graphs.status.message, graphs.status.min_distance
        ):
            if kind == "ok":
                m.graph = Sized(*next(sizes))
                failures.append(None)
            elif kind == "atoms_too_close":
                failures.append(f"atoms came {closest:.3g} Å apart (< {MIN_SEPARATION} Å)")
            else:
                failures.append(f"the geometry became invalid: {message}")
        self.device_graphs = graphs  # the survivors' graphs, in order: they lead the next batch
        return failures

    def _device_build(self, members: list[_Member]):
        """:func:`~painn_export.device_graphs.build_graphs` of the members' current geometry."""
        from painn_export.device_graphs import build_graphs

        t0 = time.perf_counter()
        settings = self.graph_settings
        graphs = build_graphs(
            np.concatenate([m.state.positions for m in members]),
            np.array([m.state.cell for m in members]),
            np.array([m.pbc for m in members]),
            np.concatenate([m.z for m in members]),
            np.array([m.n_atoms for m in members]),
            cutoff=settings.cutoff, max_neighbors=settings.max_neighbors, device=self.runner.device,
            min_separation=MIN_SEPARATION,
        )  # fmt: skip
        self.summary.graph_seconds += time.perf_counter() - t0
        return graphs

    def _device_feed_of(self, members: list[_Member]):
        """``feed_of(lo, hi)`` for :func:`infer_split`: the members' device feed (entrants built now)."""
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
        degree = built.max_degree

        def feed_of(lo: int, hi: int) -> dict:
            t0 = time.perf_counter()
            part = built.select(np.arange(lo, hi))
            feed = part.feed(dtype, n_slots=self.limits.slots_for(int(degree[lo:hi].max())))
            self.summary.graph_seconds += time.perf_counter() - t0
            return feed

        return feed_of


def relaxed_reference(reader: InputReader, out: _RelaxOutput) -> dict | None:
    """Relaxed energies (and positions) against the input's ``relaxed_energy`` (``relaxed_positions``).

    Over the converged structures: mean and largest absolute energy error
    per atom (eV/atom), mean absolute error of the energy change the
    relaxation brought (relaxed minus the reference's starting ``energy``,
    when the input has it), and the RMS of position differences (Å).
    """
    fh = reader.fh
    if "relaxed_energy" not in fh:
        return None
    status = out.fh["status"][...]
    ok = np.flatnonzero(np.isin(status, [STATUS[k] for k in RELAXED]))
    if not len(ok):
        return {"structures": 0}
    natoms = np.diff(reader.offsets)[ok]
    ours = out.fh["energy"][...][ok]
    ref = fh["relaxed_energy"][...][ok]
    err = np.abs(ours - ref) / natoms
    report = {
        "structures": len(ok),
        "relaxed_energy_mae_eV_per_atom": float(err.mean()),
        "relaxed_energy_max_error_eV_per_atom": float(err.max()),
    }
    if "relaxed_positions" in fh:
        sq, count = 0.0, 0
        for s in ok:
            a0, a1 = reader.offsets[s], reader.offsets[s + 1]
            d = out.fh["positions"][a0:a1] - fh["relaxed_positions"][a0:a1]
            sq += float(np.sum(d * d))
            count += int(a1 - a0)
        report["relaxed_positions_rms_A"] = float(np.sqrt(sq / count))
    return report
