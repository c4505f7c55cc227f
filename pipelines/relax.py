"""``painn-batch relax``: every structure of an HDF5 file relaxed with FIRE, many at a time.

The loop, on one runner:

1. **Refill.** Structures enter the batch while it stays within the
   atom/edge budget ``run`` uses (:class:`pipelines.batches.Limits`); one
   that converges or fails leaves it, and others enter at the next step
   ("in-flight" batching). They are taken in input order, but one that does
   not fit does not hold back those behind it: up to :data:`WINDOW`
   structures wait while later ones that fit enter, and a waiting one that
   has been passed :data:`PATIENCE` times lets nothing more pass until it
   is in. Every choice depends only on the batch, the window, the input and
   the memory budget below, all in the checkpoint, so a resumed run rebuilds
   the same batches. A batch that failed for
   memory lowers the atom budget for every batch after it
   (:attr:`pipelines.batches.Summary.memory_atoms`). Structures the input itself rules out
   (``empty_structure``, ``bad_cell``, ``atoms_too_close``, ...) get ``run``'s
   statuses and never enter: from the neighbour workers (``--workers``) on
   the host path; with ``--graphs device`` this process reads the raw
   structures and the device builds them before admission, which gives the
   same statuses and messages and the sizes admission reads (no host graph,
   no worker: :meth:`pipelines.relax_graphs.StepGraphs.entering`).
2. **Graphs** (:mod:`pipelines.relax_graphs`). Each structure keeps a
   Verlet-skin neighbour list (:class:`painn_export.skin.SkinGraph`, searched
   first in a neighbour worker): searched again only when an atom has moved
   more than half the skin, filtered to the exact graph in between, the
   whole batch in one compiled pass. Edges are put in one canonical order
   (by centre, neighbour, image), so a graph never depends on when its list
   was searched. With ``--graphs device`` the batch's graphs are built on
   the runner's device each step instead (an entering structure's first
   graph is its entry build's): the same edges, the same bits.
3. **Model and FIRE.** One inference for the whole batch (in pieces after a
   memory failure, see 1), then one FIRE step
   for the whole batch (:mod:`pipelines.fire`: ASE's rule, parameters and
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
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from painn_export.batch import Graph
from painn_export.schema import InputReader, validate_input
from painn_export.skin import SkinGraph
from pipelines.batches import Budget, Summary, batch_limits, infer_split
from pipelines.device_batches import Sized
from pipelines.fire import CellAlgebraError, FireState, Rows, fire_steps, generalized_forces_many, max_forces
from pipelines.graphs import GraphSettings, neighbour_items
from pipelines.options import RelaxSettings, RunOptions
from pipelines.output import (
    RELAXED,
    STATUS,
    Fingerprint,
    fingerprint_fields,
    open_partial,
    output_datasets,
    output_session,
    planned_bytes,
)
from pipelines.progress import Progress
from pipelines.relax_checkpoint import Saved, checkpoint_path, discard
from pipelines.relax_graphs import StepGraphs
from pipelines.relax_output import Finished, RelaxOutput, refuse_small_disk, relax_datasets, relaxed_reference
from pipelines.signals import Stopped, check_stop, stop_at_safe_points

log = logging.getLogger(__name__)

WINDOW = 32  # structures that may wait (not fitting) while later ones enter
PATIENCE = 64  # a waiting structure passed this often lets nothing more pass

__all__ = ["CellNeedsStressError", "RelaxSettings", "RelaxSummary", "relax_file"]


NOT_PERIODIC = "--cell relaxes periodic cells only; this one is not"
STATUS_ROWS = 1024  # input statuses written together at most (a long run of them still shows progress)


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
    skin: SkinGraph | None  # None with device graphs
    graph: Graph | None = None  # device graphs: its size (Sized, or Entered until its first feed)
    fmax: float = float("nan")  # at the last evaluation
    passed: int = 0  # waiting: how many later structures entered before it
    _size: Sized | None = field(default=None, repr=False, compare=False)  # of graph: found when first read

    def __setattr__(self, name: str, value) -> None:
        if name == "graph":  # a new graph: its size is found again (nothing of the old one is kept)
            object.__setattr__(self, "_size", None)
        object.__setattr__(self, name, value)

    @property
    def n_atoms(self) -> int:
        return int(self.z.shape[0])

    @property
    def size(self) -> Sized:
        """Its graph's atoms and busiest atom, what admission and splitting read: found once per graph."""
        if self._size is None:
            self._size = Sized(self.graph.n_atoms, self.graph.max_degree)
        return self._size


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
    ``(indices in the batch, atoms in it, atoms of the smallest structure waiting, or None)``.
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
        from painn_export.graphs_where import graphs_on_device

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
        extra = relax_datasets(info.n_structures, info.n_atoms, frames)
        ckpt = checkpoint_path(output_path)
        creating = not (options.resume and (partial.exists() or output_path.exists()))
        sets = output_datasets(info.n_structures, info.n_atoms, fingerprint.stress, extra)
        need = planned_bytes(sets) if creating else 0
        if creating:
            log.info("relax: creating %s, %.3f GB", partial, need / 1e9)
            refuse_small_disk(partial, need)
            discard(ckpt)  # a checkpoint belongs to the partial output it was written with
        open_partial(partial, output_path, fingerprint, options.resume, extra)

        with InputReader(input_path) as reader:
            out = RelaxOutput(partial, reader.offsets, ckpt, resumed=not creating)
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
                        loop.graphs.close()
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


class _Loop:
    """The in-flight relaxation of one run: refill, graphs, model, FIRE, checkpoints."""

    def __init__(
        self, input_path, reader, runner, facts, settings, out, summary, limits, workers, observer, on_device
    ) -> None:
        self.input_path, self.reader, self.runner, self.facts = input_path, reader, runner, facts
        self.settings, self.out, self.summary, self.limits = settings, out, summary, limits
        self.workers, self.observer = workers, observer
        # Host path: workers check each entering structure and search its skin list, whose first graph
        # comes with it. Device path: no workers; the device checks, sizes and builds (StepGraphs.entering).
        self.graph_settings = dataclasses.replace(
            GraphSettings.of(facts, runner), relax=True, skin=settings.skin
        )
        self.graphs = StepGraphs(runner, self.graph_settings, limits, summary, on_device)
        self.bar = None
        self.done: list[Finished] = []  # finished since the last checkpoint
        self.batch: list[_Member] = []
        self.waiting: list[_Member] = []  # pulled from the input, not in yet (input order)
        restored = out.restore()
        self.next_index, self.calls = restored.next_index, restored.calls
        self.restored_waiting = restored.waiting  # [(index, passed)]: rebuilt first by run()
        summary.memory_atoms = restored.memory_atoms  # batches packed as before the stop
        for saved in restored.states:
            self.batch.append(self._restored(saved))
            summary.steps -= saved.steps  # this run's summary counts this run's steps
        self.graphs.forget()  # the restored batch's device graphs are built when it is fed
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
        failure = self.graphs.build([member])[0]
        if failure is not None:  # cannot happen for a state that was evaluated before; keep it honest
            raise RuntimeError(f"structure {s}: its checkpointed geometry has no graph ({failure})")
        return member

    def _finish(self, m: _Member, status: str, message: str = "", result=None) -> None:
        energy, forces, stress = result if result is not None else (float("nan"), None, None)
        self.done.append(Finished(m.index, status, message, m.state, m.fmax, energy, forces, stress))
        self.summary.steps += m.state.steps
        self.summary.atoms += m.n_atoms
        if self.bar is not None:
            self.bar.update(1, m.n_atoms)

    # -- the loop --------------------------------------------------------------
    def run(self) -> None:
        n = self.reader.n_structures
        again = np.array([index for index, _ in self.restored_waiting], dtype=np.int64)
        pending = np.concatenate([again, np.arange(self.next_index, n, dtype=np.int64)])
        if not len(pending):
            items = None
        elif self.graphs.on_device:  # this process reads; the device checks, sizes and builds
            items = self.graphs.entering(self.reader, pending)
        else:  # the chunks this process builds, on the host's threads (open until after items.close())
            items = neighbour_items(
                self.input_path,
                pending,
                self.graph_settings,
                self.workers,
                start_here=True,
                pool=self.graphs.pool,
            )
        fill = []
        try:
            for index, passed in self.restored_waiting:  # the window as the checkpoint left it
                item = next(items)
                if item.index != index or item.start is None:  # it had a graph when it first waited
                    raise RuntimeError(f"structure {index}: waiting in the checkpoint, but has no graph now")
                self.waiting.append(self._member_of(item))
                self.waiting[-1].passed = passed
            with stop_at_safe_points():  # a signal stops the loop where its state is whole
                self._steps(items, fill)
        except Stopped as exc:
            if exc.safe:
                self._checkpoint()  # the last: --resume continues from this very step
            raise
        finally:
            self.summary.mean_batch_atoms = float(np.mean(fill)) if fill else 0.0
            if items is not None:
                items.close()  # its workers and readers end now, not when the traceback is freed
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
            stepping = self._advance(self.batch, results)
            self.batch = []
            for m, failure in zip(stepping, self.graphs.build(stepping)):
                if failure is None:
                    self.batch.append(m)
                else:
                    m.fmax = float("nan")  # the geometry written was never evaluated
                    self._finish(m, "diverged", failure)
            if self.calls % self.settings.checkpoint_every == 0:
                self._checkpoint()

    def _checkpoint(self) -> None:
        waiting = [(m.index, m.passed) for m in self.waiting]
        memory = self.summary.memory_atoms
        with self.out.checkpoint(self.batch, self.next_index, self.calls, waiting, memory):
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
        budget = Budget(self.limits.lowered(self.summary.memory_atoms), [m.size for m in self.batch])
        still: list[_Member] = []
        blocked = False  # a waiting structure has been passed often enough

        def offer(m: _Member) -> None:
            nonlocal blocked
            if not blocked and budget.admits(m.size):
                self.batch.append(m)
                budget.add(m.size)
                for ahead in still:
                    ahead.passed += 1
                    blocked = blocked or ahead.passed >= PATIENCE
                return
            still.append(m)
            blocked = blocked or m.passed >= PATIENCE

        for m in self.waiting:
            offer(m)
        # Statuses of structures without a graph are written together, and always before this returns
        # or raises (next_index has passed them: a checkpoint must not come first).
        statuses: list[tuple[int, str, str]] = []
        try:
            while items is not None and len(still) < WINDOW and not blocked:
                item = next(items, None)
                if item is None:
                    break
                self.next_index = item.index + 1
                if item.graph is None:  # an input status, as run gives it
                    statuses.append((item.index, item.status, item.message))
                elif self.settings.cell and not item.start.pbc.all():
                    statuses.append((item.index, "bad_cell", NOT_PERIODIC))
                else:
                    offer(self._member_of(item))
                if len(statuses) >= STATUS_ROWS:
                    self._input_statuses(statuses)
                    statuses = []
        finally:
            self._input_statuses(statuses)
        self.waiting = still
        self.graphs.wait(still)

    def _input_statuses(self, rows: list[tuple[int, str, str]]) -> None:
        """Write structures' input statuses (one write and flush for all; before the next checkpoint,
        which is what a resume starts from)."""
        if not rows:
            return
        self.out.writer.commit_status(rows)
        self.summary.computed += len(rows)
        if self.bar is not None:
            self.bar.update(len(rows), 0)

    def _member_of(self, item) -> _Member:
        """A structure entering from its item: its start, and its first graph (host: the worker's skin
        list and graph; device: its size and entry build, :class:`pipelines.relax_graphs.Entered`)."""
        start = item.start
        state = FireState.start(
            start.positions, start.cell, start.fixed, self.settings.fire, self.settings.cell
        )
        if start.skin is not None:
            self.summary.searches += start.skin.n_searches
        z = np.asarray(start.atomic_numbers, np.int64)
        return _Member(item.index, z, start.pbc, state, start.skin, item.graph)

    def _evaluate(self, members: list[_Member]) -> list:
        """``(energy, forces, stress)`` per member (float64), or a too_large message (:func:`infer_split`)."""
        feed_of = self.graphs.feed_of(members)
        results = infer_split(self.runner, [m.size for m in members], self.limits, self.summary, feed_of)
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
        judged, gforces = self._generalized_forces(judged)
        stepping = []  # (member, its place in gforces)
        every = self.settings.trajectory_every
        for k, ((m, result), fmax) in enumerate(zip(judged, max_forces(gforces).tolist())):
            m.fmax = fmax
            if every and m.state.steps % every == 0:
                self.out.frame(m, m.state.steps // every, result[0], m.fmax)
            if m.fmax < self.settings.fmax:  # ASE's test
                self._finish(m, "converged", "", result)
            elif m.state.steps >= self.settings.steps:
                self._finish(m, "not_converged", f"{m.state.steps} steps without converging", result)
            else:
                stepping.append((m, k))
        stepping, _ = self._unless_cell_fails(
            stepping,
            lambda run: fire_steps(
                [m.state for m, _ in run],
                gforces.take(np.array([k for _, k in run], dtype=np.int64)),
                self.settings.fire,
                self.settings.cell,
            ),
            "the cell step failed",
        )
        return [m for m, _ in stepping]

    def _generalized_forces(self, judged: list) -> tuple[list, Rows]:
        """FIRE's forces of the judged ``(member, result)``: those whose cell has none leave as diverged
        (a deformation without a logarithm), and the others' are returned with them."""
        return self._unless_cell_fails(
            judged,
            lambda run: generalized_forces_many(
                [m.state for m, _ in run],
                [result[1] for _, result in run],
                [result[2] for _, result in run] if self.settings.cell else None,
            ),
            "the cell has no step",
            evaluated=False,
        )

    def _unless_cell_fails(self, run: list, call, why: str, evaluated: bool = True) -> tuple[list, object]:
        """``(run, call(run))`` for the ``(member, ...)`` of ``run``; where ``call`` raises
        :class:`~pipelines.fire.CellAlgebraError` (it changes no state), the members it names leave as
        diverged (``why``, and its reason; ``fmax`` NaN unless ``evaluated``) and the rest go again."""
        while True:
            try:
                return run, call(run)
            except CellAlgebraError as exc:
                failed = set(exc.positions)
                for k in sorted(failed):
                    m = run[k][0]
                    if not evaluated:
                        m.fmax = float("nan")
                    self._finish(m, "diverged", f"{why}: {exc.what}")
                run = [x for k, x in enumerate(run) if k not in failed]
