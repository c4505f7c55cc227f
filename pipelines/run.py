"""``painn-batch run``: structures from HDF5 -> graphs -> batches -> runtime -> HDF5.

Stages, each bounded so that memory does not grow with the file:

1. **Neighbour workers** (``--workers N`` processes; 0 = in the main process)
   read ranges of pending structures straight from the input and return
   their graphs, or a status for a structure that cannot be evaluated
   (:mod:`pipelines.graphs`). At most ``2 N + 1`` ranges are in flight, so
   reading and neighbour search run ahead of inference by a bounded amount.
   With ``--graphs device`` (``auto``: when the runtime runs on a GPU) the
   graphs and the feed are built on the runtime's device instead, and this
   process only reads and writes (:mod:`pipelines.device_batches`): the same
   batches and feeds, hence the same results bit for bit. On Ray
   (``--ray``) the inference actors build them, from the structures' arrays
   (:mod:`pipelines.ray_run`).
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

import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from painn_export.schema import InputReader, validate_input
from pipelines.batches import Summary, batch_limits, evaluate
from pipelines.device_batches import evaluate_on_device
from pipelines.graphs import GraphSettings, WorkerError, neighbour_items
from pipelines.options import RunOptions
from pipelines.output import (
    STATUS,
    SUCCESS,
    Fingerprint,
    ResumeError,
    RunInterruptedError,
    Writer,
    fingerprint_fields,
    open_partial,
    output_session,
)
from pipelines.progress import Progress

__all__ = ["STATUS", "ResumeError", "RunInterruptedError", "RunOptions", "Summary", "WorkerError", "run_file"]


def run_file(
    input_path: str | Path,
    output_path: str | Path,
    model_path: str | Path | None = None,
    *,
    options: RunOptions | None = None,
    ray=None,
    **changes,
) -> Summary:
    """Evaluate every structure of ``input_path``; write results to ``output_path``.

    ``options`` (:class:`~pipelines.options.RunOptions`; its fields may also
    be given as keywords) say which runtime, device, batch limits and
    workers, and whether to resume or overwrite. An existing output or
    partial output is never replaced silently: ``resume`` continues (or
    checks) it, ``overwrite`` starts over. A run holds a lock on
    ``output_path``: a second run on it is refused. With ``ray`` (a
    :class:`pipelines.ray_cluster.RayOptions`) the graphs and the inference
    run on a Ray cluster; this process still writes the output. Before an
    output file exists, every Ray node is checked to see the same input and
    model files and to run the same package version. A device the runtime
    cannot give raises :class:`~painn_export.errors.RuntimeUnavailableError`
    before any work.
    """
    start = time.perf_counter()
    options = RunOptions.of(options, **changes)
    if ray is not None and options.device != "auto" and options.device != ray.device:
        from painn_export.errors import RuntimeUnavailableError

        raise RuntimeUnavailableError(
            f"--device {options.device} with --ray: the actors run on the GPU Ray gives each with "
            "--ray-gpus-per-actor (Ray picks which), else on a CPU; give --device auto, cuda or cpu"
        )
    info = validate_input(input_path)
    output_path = Path(output_path)
    with output_session(input_path, output_path, options.resume, options.overwrite) as partial:
        summary = _run_locked(input_path, output_path, partial, info, model_path, options, ray)
    summary.seconds = time.perf_counter() - start
    return summary


def _run_locked(input_path, output_path: Path, partial: Path, info, model_path, options, ray) -> Summary:
    from painn_export.files import file_sha256
    from painn_export.runners import loader_for
    from painn_export.runners.base import feed_dtype_of

    loader = loader_for(model_path, options.runtime, options.dtype)
    facts = loader.facts()
    model_sha256 = file_sha256(loader.path)
    stack = ExitStack()
    try:
        if ray is None:
            runner = loader.runner(options.device)
            runner.activate()
            stack.callback(runner.deactivate)  # also when what follows refuses (--graphs)
            identity = runner.identity()
            feed_dtype = runner.feed_dtype
            # Not in the fingerprint: both paths give the same graphs and edge order, so the same bits.
            from painn_export.graphs_where import graphs_on_device

            on_device = graphs_on_device(options.graphs, runner.device)
        else:  # the actors run it: this driver reads what they will run from the file, and starts nothing
            from pipelines.ray_cluster import cluster, graphs_on_actors

            runner = None
            identity = loader.identity(ray.device)
            feed_dtype = feed_dtype_of(identity.precision)
            # Every node checked (same files, same version, enough GPUs) before the output file exists;
            # Ray (started here, or joined) is left as found when the run ends.
            paths = [str(Path(p).resolve()) for p in (input_path, model_path) if p is not None]
            nodes = stack.enter_context(cluster(ray, paths))
            # Where the actors build graphs: not in the fingerprint either (the same bits).
            on_device = graphs_on_actors(options.graphs, ray, nodes)
        fingerprint = Fingerprint(**fingerprint_fields(input_path, info, model_sha256, identity))
        open_partial(partial, output_path, fingerprint, options.resume)

        with InputReader(input_path) as reader:
            offsets = reader.offsets
        writer = Writer(partial, offsets)
        where = f"Ray actors on {identity.device}" if runner is None else runner.device
        summary = Summary(
            output=str(output_path),
            runtime=identity.runtime,
            device=runner.device if runner else identity.device,
            provider=identity.provider,
            gpu=runner.gpu if runner else "",  # on Ray: what the actors report
            graphs=f"device ({where})" if on_device else "host",
            n_structures=info.n_structures,
        )
        try:
            pending = writer.pending()
            summary.already_done = info.n_structures - len(pending)
            limits = batch_limits(facts.profiles, options.max_atoms, options.max_edges)
            settings = GraphSettings.of(facts, feed_dtype)
            bar = Progress(len(pending), enabled=options.progress, label=f"{identity.runtime} on {where}")
            try:
                if on_device and ray is None:
                    evaluate_on_device(
                        str(input_path), pending, runner, writer, limits, settings, summary, bar
                    )
                elif ray is None:
                    items = neighbour_items(str(input_path), pending, settings, options.neighbour_workers)
                    evaluate(items, runner, writer, limits, summary, bar)
                else:
                    from pipelines.ray_columns import ran_by
                    from pipelines.ray_run import RayJob, evaluate_on_ray

                    # Absolute paths: every node resolves them the same way (the
                    # preflight checks each node sees the same files there).
                    model = str(Path(model_path).resolve()) if model_path else None
                    expected = ran_by(identity, model_sha256)
                    job = RayJob(
                        str(Path(input_path).resolve()),
                        model,
                        options.runtime,
                        options.dtype,
                        settings,
                        limits,
                        expected,
                        device_graphs=on_device,
                    )
                    evaluate_on_ray(job, pending, ray, writer, summary, bar)
            finally:
                bar.close()
            summary.counts = writer.status_counts()
            if info.has_reference:
                add_mae(summary, input_path, writer)
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
        stack.close()
    return summary


def add_mae(summary: Summary, input_path, writer: Writer, block: int = 4096) -> None:
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
