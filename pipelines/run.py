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
only what is still pending. Ctrl-C, SIGTERM and SIGHUP stop the run with
what is done kept (:mod:`pipelines.signals`).
"""

from __future__ import annotations

import os
import signal
import time
from collections import deque
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np

from painn_export.schema import InputReader, validate_input
from pipelines.batches import Summary, batch_limits, chunks, evaluate
from pipelines.graphs import GraphSettings, build_items, init_worker_process, items_from
from pipelines.output import (
    STATUS,
    SUCCESS,
    Fingerprint,
    OutputLock,
    ResumeError,
    Writer,
    input_sha256,
    open_partial,
    output_folder,
    partial_path,
    refuse_same_file,
)
from pipelines.progress import Progress
from pipelines.signals import run_ignoring_stop_signals, signal_of, stop_on_signals

__all__ = ["STATUS", "ResumeError", "RunInterruptedError", "Summary", "WorkerError", "run_file"]


class WorkerError(RuntimeError):
    """A neighbour-list worker process died or could not start."""


class RunInterruptedError(RuntimeError):
    """A stop signal (Ctrl-C, SIGTERM, SIGHUP): what was done is kept; ``--resume`` continues."""

    def __init__(self, sig: signal.Signals, partial: Path) -> None:
        if partial.exists():
            what = f"what was computed is kept in {partial}: rerun with --resume to continue"
        else:
            what = "before any result was written: rerun the command to start"
        super().__init__(f"stopped by {sig.name}; {what}")
        self.signal = sig
        self.exit_code = 128 + sig  # the shell's convention: 130 SIGINT, 129 SIGHUP, 143 SIGTERM


def run_file(
    input_path: str | Path,
    output_path: str | Path,
    model_path: str | Path | None = None,
    *,
    runtime: str = "onnxruntime",
    device: str = "auto",
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
    Before an output file exists, every Ray node is checked to see the same
    input and model files and to run the same package version.
    ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``) is where the runtime
    runs; one it cannot give raises
    :class:`~painn_export.errors.RuntimeUnavailableError` before any work.
    """
    start = time.perf_counter()
    if ray is not None and device != "auto" and device != ray.device:
        from painn_export.errors import RuntimeUnavailableError

        raise RuntimeUnavailableError(
            f"--device {device} with --ray: the actors run on the GPU Ray gives each with "
            "--ray-gpus-per-actor (Ray picks which), else on a CPU; give --device auto, cuda or cpu"
        )
    info = validate_input(input_path)
    output_path = Path(output_path)
    with output_session(input_path, output_path, resume, overwrite) as partial:
        summary = _run_locked(
            input_path,
            output_path,
            partial,
            info,
            model_path,
            runtime=runtime,
            device=device,
            limits=(max_atoms, max_edges),
            workers=workers,
            resume=resume,
            progress=progress,
            ray=ray,
        )
    summary.seconds = time.perf_counter() - start
    return summary


@contextmanager
def output_session(input_path, output_path: Path, resume: bool, overwrite: bool) -> Iterator[Path]:
    """What every command that writes an output runs inside; yields the partial file's path.

    Stop signals (their one line and exit code), the output's folder (made,
    and removed again if the command fails before writing), its lock, and the
    refusals: the output is the input, or exists without ``resume`` or
    ``overwrite``. A stop signal becomes :class:`RunInterruptedError`.
    """
    partial = partial_path(output_path)
    try:
        with stop_on_signals(), output_folder(output_path), OutputLock(output_path):
            refuse_same_file(output_path, input_path)
            refuse_same_file(partial, input_path)
            if not resume and not overwrite:
                refuse_to_replace(output_path, partial)
            yield partial
    except KeyboardInterrupt as exc:
        raise RunInterruptedError(signal_of(exc), partial) from exc


def refuse_to_replace(output_path: Path, partial: Path) -> None:
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
    device,
    limits,
    workers,
    resume,
    progress,
    ray,
) -> Summary:
    from painn_export.checkpoint import file_sha256
    from painn_export.demo import demo_model_path
    from painn_export.runners import describe, open_runner

    model_sha256 = file_sha256(model_path or demo_model_path())
    stack = ExitStack()
    if ray is None:
        runner, facts = open_runner(model_path, runtime, device)
        runner.activate()
        identity = runner.identity()
    else:  # the actors run it: this driver reads what they will run from the file, and starts nothing
        from pipelines.ray_run import cluster

        runner = None
        identity, facts = describe(model_path, runtime, ray.device)
        # Every node checked (same files, same version) before the output file exists;
        # Ray (started here, or joined) is left as found when the run ends.
        paths = [str(Path(p).resolve()) for p in (input_path, model_path) if p is not None]
        stack.enter_context(cluster(ray, paths))
    try:
        fingerprint = Fingerprint(**fingerprint_fields(input_path, info, model_sha256, identity))
        open_partial(partial, output_path, fingerprint, resume)

        with InputReader(input_path) as reader:
            offsets = reader.offsets
        writer = Writer(partial, offsets)
        summary = Summary(
            output=str(output_path),
            runtime=identity.runtime,
            device=runner.device if runner else identity.device,
            provider=identity.provider,
            gpu=runner.gpu if runner else "",  # on Ray: what the actors report
            n_structures=info.n_structures,
        )
        try:
            pending = writer.pending()
            summary.already_done = info.n_structures - len(pending)
            limits = batch_limits(facts.profiles, *limits)
            settings = GraphSettings(facts.cutoff, facts.max_neighbors, facts.num_elements)
            where = f"Ray actors on {identity.device}" if runner is None else runner.device
            bar = Progress(len(pending), enabled=progress, label=f"{identity.runtime} on {where}")
            try:
                if ray is None:
                    items = neighbour_items(str(input_path), pending, settings, workers)
                    evaluate(items, runner, writer, limits, summary, bar)
                else:
                    from pipelines.ray_run import RayJob, evaluate_on_ray, ran_by

                    # Absolute paths: every node resolves them the same way (the
                    # preflight checks each node sees the same files there).
                    model = str(Path(model_path).resolve()) if model_path else None
                    expected = ran_by(identity, model_sha256)
                    job = RayJob(str(Path(input_path).resolve()), model, runtime, settings, limits, expected)
                    evaluate_on_ray(job, pending, ray, writer, summary, bar)
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
        if runner is not None:
            runner.deactivate()
        stack.close()
    return summary


def fingerprint_fields(input_path, info, model_sha256: str, identity) -> dict:
    """What every command's fingerprint records: the input, the model file, the package, what ran."""
    from painn_export.version import __version__

    return {
        "input_sha256": input_sha256(input_path),
        "n_structures": info.n_structures,
        "n_atoms": info.n_atoms,
        "model_sha256": model_sha256,
        "package_version": __version__,
        **asdict(identity),
    }


def neighbour_items(input_path: str, pending: np.ndarray, settings: GraphSettings, workers: int):
    """Items of every pending structure, in order, from a bounded window of worker tasks."""
    if workers <= 0:
        # In this process: a reader of its own (no module state), closed after the run.
        with InputReader(input_path) as reader:
            for chunk in chunks(pending):
                yield from items_from(reader, settings, chunk)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    # spawn: the workers never inherit the runtime's threads or open HDF5 handles.
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(
        workers,
        mp_context=ctx,
        initializer=run_ignoring_stop_signals,
        initargs=(init_worker_process, input_path, settings),
    )
    window: deque = deque()
    try:
        for chunk in chunks(pending):
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
