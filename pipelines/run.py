"""``painn-batch run``: structures from HDF5 -> graphs -> batches -> runtime -> HDF5.

Stages, each bounded so that memory does not grow with the file:

1. **Neighbour workers** (``--workers N`` processes; 0 = in the main process)
   read ranges of pending structures straight from the input and return
   their graphs, or a status for a structure that cannot be evaluated
   (:mod:`pipelines.graphs`). At most ``2 N + 1`` ranges are in flight, so
   reading and neighbour search run ahead of inference by a bounded amount.
2. **Batcher** packs graphs in input order up to ``--max-atoms`` /
   ``--max-edges`` (counted as the padded slots, atoms × slots per atom, that
   the model evaluates) and a TensorRT engine's largest profile.
3. **Runner** (PyTorch, ONNX Runtime or TensorRT) evaluates a batch; a batch
   that fails (out of memory, no engine profile fits) is split in halves down
   to single structures before one is marked ``too_large``.
4. **Writer** commits each batch, data then status, into ``OUT.partial.h5``
   (:mod:`pipelines.output`), renamed to ``OUT`` when nothing is pending.

``--resume`` reopens the partial file, checks its fingerprints and computes
only what is still pending. Ctrl-C flushes what is done and exits 130.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from painn_export.batch import collate, slot_count
from painn_export.errors import BatchTooLargeError
from painn_export.schema import InputReader, validate_input
from pipelines.graphs import GraphSettings, Item, build_items, close_worker, init_worker, init_worker_process
from pipelines.output import (
    STATUS,
    SUCCESS,
    Fingerprint,
    OutputLock,
    ResumeError,
    Writer,
    check_resumable,
    create,
    input_sha256,
    refuse_same_file,
)
from pipelines.progress import Progress

__all__ = ["STATUS", "ResumeError", "RunInterruptedError", "Summary", "WorkerError", "run_file"]

CHUNK = 128  # structures per neighbour-worker task


class WorkerError(RuntimeError):
    """A neighbour-list worker process died or could not start."""


class RunInterruptedError(RuntimeError):
    """Ctrl-C: what was done is flushed to the partial file; ``--resume`` continues."""


@dataclass
class Summary:
    output: str = ""
    runtime: str = ""
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
            "n_structures": self.n_structures,
            "computed": self.computed,
            "already_done": self.already_done,
            "status_counts": self.counts,
            "seconds": round(self.seconds, 3),
            "structures_per_s": round(self.computed / self.seconds, 2) if self.seconds else None,
            "atoms_per_s": round(self.atoms / self.seconds, 1) if self.seconds else None,
            "energy_mae_eV_per_atom": self.energy_mae_per_atom,
            "forces_mae_eV_per_A": self.forces_mae,
        }
        return {k: None if isinstance(v, float) and not np.isfinite(v) else v for k, v in report.items()}

    @property
    def all_ok(self) -> bool:
        return sum(n for k, n in self.counts.items() if k in SUCCESS) == self.n_structures


def run_file(
    input_path: str | Path,
    output_path: str | Path,
    model_path: str | Path | None = None,
    *,
    runtime: str = "onnxruntime",
    max_atoms: int = 4096,
    max_edges: int | None = None,
    workers: int = 1,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
    ray=None,
) -> Summary:
    """Evaluate every structure of ``input_path``; write results to ``output_path``.

    An existing output or partial output is never replaced silently: pass
    ``resume`` to continue (or check) it, ``overwrite`` to start over. A run
    holds a lock on ``output_path``: a second run on it is refused. With
    ``ray`` (a :class:`pipelines.ray_run.RayOptions`) the graphs and the
    inference run on a Ray cluster; this process still writes the output.
    """
    start = time.perf_counter()
    info = validate_input(input_path)
    output_path = Path(output_path)
    try:
        output_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(
            f"cannot create the output folder {output_path.parent}: {exc.strerror or exc}"
        ) from exc
    partial = output_path.with_name(output_path.name.removesuffix(".h5") + ".partial.h5")
    refuse_same_file(output_path, input_path)
    refuse_same_file(partial, input_path)
    with OutputLock(output_path):
        if not resume and not overwrite:
            _refuse_to_replace(output_path, partial)
        summary = _run_locked(
            input_path,
            output_path,
            partial,
            info,
            model_path,
            runtime=runtime,
            limits=(max_atoms, max_edges),
            workers=workers,
            resume=resume,
            progress=progress,
            ray=ray,
        )
    summary.seconds = time.perf_counter() - start
    return summary


def _refuse_to_replace(output_path: Path, partial: Path) -> None:
    """Work on disk is never started over silently: name --resume and --overwrite."""
    if partial.exists():
        try:
            import h5py

            with h5py.File(partial, "r") as fh:
                done = int(np.count_nonzero(fh["status"][...]))
            what = f"holds {done} finished structures of an earlier run"
        except (OSError, KeyError):
            what = "is left from an earlier run"
        raise ResumeError(f"{partial} {what}: continue it with --resume, or start over with --overwrite")
    if output_path.exists():
        raise ResumeError(
            f"{output_path} exists: replace it with --overwrite, or complete/check it with --resume"
        )


def _run_locked(
    input_path,
    output_path: Path,
    partial: Path,
    info,
    model_path,
    *,
    runtime,
    limits,
    workers,
    resume,
    progress,
    ray,
) -> Summary:
    from painn_export.checkpoint import file_sha256
    from painn_export.demo import demo_model_path
    from painn_export.runners import open_runner
    from painn_export.version import __version__

    runner, facts = open_runner(model_path, runtime)
    runner.activate()
    try:
        fingerprint = Fingerprint(
            input_sha256=input_sha256(input_path),
            n_structures=info.n_structures,
            n_atoms=info.n_atoms,
            model_sha256=file_sha256(model_path or demo_model_path()),
            runtime=runner.name,
            precision=runner.precision,
            stress=runner.has_stress,
            package_version=__version__,
        )
        if resume and not partial.exists() and output_path.exists():
            check_resumable(output_path, fingerprint)
            output_path.replace(partial)  # a finished output resumes to itself
        elif resume and partial.exists():
            check_resumable(partial, fingerprint)
        else:
            create(partial, fingerprint)

        with InputReader(input_path) as reader:
            offsets = reader.offsets
        writer = Writer(partial, offsets)
        summary = Summary(output=str(output_path), runtime=runner.name, n_structures=info.n_structures)
        try:
            pending = writer.pending()
            summary.already_done = info.n_structures - len(pending)
            limits = _limits(runner, *limits)
            settings = GraphSettings(facts.cutoff, facts.max_neighbors, facts.num_elements)
            bar = Progress(len(pending), enabled=progress)
            try:
                if ray is None:
                    items = _items(str(input_path), pending, settings, workers)
                    _evaluate(items, runner, writer, limits, summary, bar)
                else:
                    from pipelines.ray_run import evaluate_on_ray

                    job = (str(input_path), model_path, runtime, settings, limits)
                    evaluate_on_ray(job, pending, ray, writer, summary, bar)
            except KeyboardInterrupt as exc:
                raise RunInterruptedError(
                    f"interrupted; rerun with --resume to continue from {partial}"
                ) from exc
            finally:
                bar.close()
            summary.counts = writer.status_counts()
            if info.has_reference:
                _add_mae(summary, input_path, writer)
            finished = len(writer.pending()) == 0
            if ray is not None and not finished:
                raise WorkerError(
                    f"{len(writer.pending())} structures did not come back from the Ray cluster"
                )
        finally:
            writer.close()
        if finished:
            partial.replace(output_path)
    finally:
        runner.deactivate()
    return summary


@dataclass(frozen=True)
class Limits:
    """What one batch may hold."""

    atoms: int
    edge_slots: float  # atoms x slots per atom (the padded edges the model evaluates)
    systems: float
    slots: float  # slots per atom


def _limits(runner, max_atoms: int, max_edges: int | None) -> Limits:
    """Batch limits: the user's, within a TensorRT engine's largest profile."""
    limits = Limits(max_atoms, float(max_edges or np.inf), np.inf, np.inf)
    profiles = getattr(runner, "profiles", None) or []
    if profiles:
        limits = Limits(
            min(max_atoms, max(p.atoms[2] for p in profiles)),
            limits.edge_slots,
            max(p.systems[2] for p in profiles),
            max(p.slots[2] for p in profiles),
        )
    return limits


def _chunks(pending: np.ndarray):
    """Runs of pending structure indices, at most CHUNK each."""
    for lo in range(0, len(pending), CHUNK):
        yield pending[lo : lo + CHUNK]


def _items(input_path: str, pending: np.ndarray, settings: GraphSettings, workers: int):
    """Items of every pending structure, in order, from a bounded window of worker tasks."""
    if workers <= 0:
        init_worker(input_path, settings)
        try:
            for chunk in _chunks(pending):
                yield from build_items(chunk)
        finally:
            close_worker()  # the input is not left open in this process after the run
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    # spawn: the workers never inherit the runtime's threads or open HDF5 handles.
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=init_worker_process, initargs=(input_path, settings)
    )
    window: deque = deque()
    try:
        for chunk in _chunks(pending):
            window.append(pool.submit(build_items, chunk))
            if len(window) > 2 * workers:
                yield from window.popleft().result()
        while window:
            yield from window.popleft().result()
    except BrokenProcessPool as exc:
        raise WorkerError(
            "a neighbour-list worker process died or could not start (killed, out of memory, "
            "or the input became unreadable)"
        ) from exc
    finally:
        # Without waiting: the workers exit in the background while the last
        # batch runs (they are joined at interpreter exit at the latest).
        pool.shutdown(wait=False, cancel_futures=True)


def _evaluate(items, runner, writer, limits: Limits, summary, bar) -> None:
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
        if item.graph is None:
            failed.append((item.index, item.status, item.message))
            if len(failed) >= CHUNK:
                flush_failed()
            continue
        g = item.graph
        grown_atoms, grown_degree = atoms + g.n_atoms, max(degree, g.max_degree)
        if batch and (
            grown_atoms > limits.atoms
            or grown_atoms * slot_count(grown_degree) > limits.edge_slots
            or slot_count(grown_degree) > limits.slots
            or len(batch) >= limits.systems
        ):
            _run_batch(runner, batch, writer, summary, bar)
            batch, grown_atoms, grown_degree = [], g.n_atoms, g.max_degree
        batch.append(item)
        atoms, degree = grown_atoms, grown_degree
    if batch:
        _run_batch(runner, batch, writer, summary, bar)
    flush_failed()


def _run_batch(runner, batch: list[Item], writer: Writer, summary: Summary, bar: Progress) -> None:
    """Evaluate ``batch`` and commit it; split it in halves when it does not fit the runtime.

    Only a batch that is too large (memory, an engine profile) is split; any
    other failure ends the run with its message, work so far kept.
    """
    try:
        out = runner.infer(collate([it.graph for it in batch], np.float32))
    except BatchTooLargeError as exc:
        if len(batch) == 1:
            message = f"failed alone in a batch: {str(exc).splitlines()[0][:120]}"
            writer.commit_status([(batch[0].index, "too_large", message)])
            summary.computed += 1
            bar.update(1, 0)
            return
        half = len(batch) // 2
        _run_batch(runner, batch[:half], writer, summary, bar)
        _run_batch(runner, batch[half:], writer, summary, bar)
        return
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


def _add_mae(summary: Summary, input_path, writer: Writer, block: int = 4096) -> None:
    """MAE against the input's reference labels over successful structures, in blocks."""

    ok_codes = [STATUS[k] for k in SUCCESS]
    e_sum = f_sum = 0.0
    n_s = n_f = 0
    offsets = writer.offsets
    with InputReader(input_path) as src:
        for lo in range(0, summary.n_structures, block):
            hi = min(lo + block, summary.n_structures)
            ok = np.isin(writer.fh["status"][lo:hi], ok_codes)
            if not ok.any():
                continue
            natoms = np.diff(offsets[lo : hi + 1])
            ref_energy, ref_forces = src.labels(lo, hi)
            e_err = np.abs(writer.fh["energy"][lo:hi] - ref_energy) / np.maximum(natoms, 1)
            e_sum += float(e_err[ok].sum())
            n_s += int(ok.sum())
            a0, a1 = offsets[lo], offsets[hi]
            atom_ok = np.repeat(ok, natoms)
            f_err = np.abs(writer.fh["forces"][a0:a1] - ref_forces)[atom_ok]
            f_sum += float(f_err.sum())
            n_f += f_err.size
    summary.energy_mae_per_atom = e_sum / n_s if n_s else None
    summary.forces_mae = f_sum / n_f if n_f else None


def default_workers() -> int:
    """One neighbour worker per spare core, at least one."""
    return max(1, min(4, (os.cpu_count() or 2) - 1))
