"""``painn-batch run --ray``: the same pipeline on a Ray cluster, through Ray Data.

The plan, stage by stage:

0. **Preflight.** One small task on every alive node checks, before any
   work, that it sees the input and the model at the driver's absolute paths
   (the same file: its size and hash), and that it runs this package version.
   A node that does not is one line naming the node and the path, or both
   versions.
1. **Source.** Chunk *numbers* (``ray.data.range``): the plan on the driver
   does not grow with the input. The pending indices (all, or what
   ``--resume`` left) go once into the object store; each graph task takes
   its :data:`pipelines.batches.CHUNK` indices from there. The input reaches
   the workers *by its path*: every node must see the HDF5 file at the same
   path (a shared file system, or a copy at the same place). Only indices
   travel, never structures.
2. **Graphs**, as CPU tasks (``map_batches``, one chunk per call): each opens
   the input with the schema's reader and builds the chunk's graphs with the
   local pipeline's code (:func:`pipelines.graphs.items_from`), or a status.
   A graph travels as its arrays, one tensor column each (Arrow's
   variable-shaped tensors), never as a pickled object.
   With device graphs (``--graphs device``; ``auto`` with GPU actors) the
   task only **reads**: each structure's own arrays (atomic numbers,
   positions, cell, pbc, atoms, index) travel as its row
   (:func:`pipelines.ray_columns.structure_columns`), and no graph is built
   or shipped before the actor.
3. **Inference** on an actor pool (``map_batches`` with
   ``ActorPoolStrategy``): each actor opens the model once (one Runner, on
   the GPU Ray gave it if asked, with as many threads as the CPUs Ray gave
   it: ``--ray-cpus-per-actor``, one by default), packs what it receives into batches by the local batcher's
   atom/edge budget and splits a batch that does not fit, exactly as the
   local pipeline (:func:`pipelines.batches.evaluate`). With device graphs
   the actor builds the graphs and the feed of what it receives on its own
   device with the local device path's loop
   (:func:`pipelines.device_batches.evaluate_structures`): the same batches,
   feeds and statuses as the host graphs' actor. A checkpoint is
   exported (or compiled) by the actors, into their own cache.
4. **Writing**, on the driver only: results stream back
   (``iter_batches``) and go through the crash-safe writer of the local
   pipeline, so the output, its statuses, fingerprints and ``--resume`` are
   the same. Every result says what computed it (the actor's package
   version, model file hash and runner identity); one that differs from
   what the driver recorded in the fingerprint ends the run in one line.

The driver itself never starts a runtime: it reads what the actors will
run, and the model's facts, from the model file alone
(:func:`painn_export.runners.describe`), so it needs neither their GPU nor
their libraries.

Faults: Ray retries a failed graph task, restarts a dead actor and retries
its batch (``max_retries``, ``max_restarts``, ``max_task_retries``). A
structure that never comes back stays *pending* in the partial output: the
run then fails with that count, and ``--resume`` (local or Ray) computes only
those. A killed driver leaves its ``.partial.h5`` as the local pipeline
does. Actors' errors reach the driver's log. Ray is optional (``pip
install painn-export[ray]``) and imported only here; a run leaves Ray's
logger and ``DataContext`` as it found them (:func:`pipelines.ray_cluster.cluster`).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass

import numpy as np

from pipelines.ray_cluster import RayOptions, import_ray

RETRIES = 3


@dataclass(frozen=True)
class RayJob:
    """What every task and actor of a run needs, resolved on the driver (absolute paths)."""

    input_path: str
    model_path: str | None  # None: the bundled demo model
    runtime: str | None  # None: the model file's own
    dtype: str | None  # None: the model file's own
    settings: object  # pipelines.graphs.GraphSettings
    limits: object  # pipelines.batches.Limits
    expected: dict  # what must compute the results: version, model_sha256 and the runner's identity
    device_graphs: bool = False  # the actors build graphs on their device from the structures' arrays


def graph_task(batch: dict, pending, input_path: str, settings) -> dict:
    """Ray task: the graphs (or statuses) of the chunks numbered in ``batch``, one row per structure."""
    import ray

    from painn_export.schema import InputReader
    from pipelines.graphs import CHUNK, items_from
    from pipelines.ray_columns import graph_columns

    if isinstance(pending, ray.ObjectRef):  # the object store's copy, read in place (zero-copy)
        pending = ray.get(pending)
    items = []
    with InputReader(input_path) as reader:
        for number in batch["id"]:
            chunk = pending[int(number) * CHUNK : (int(number) + 1) * CHUNK]
            items += items_from(reader, settings, chunk)
    return graph_columns(items, settings.feed_dtype)


def structure_task(batch: dict, pending, input_path: str) -> dict:
    """Ray task (device graphs): the structures of the chunks numbered in ``batch``, one row each, as
    the input holds them; the actor builds their graphs."""
    import ray

    from painn_export.schema import InputReader
    from pipelines.device_batches import Structures
    from pipelines.graphs import CHUNK
    from pipelines.ray_columns import structure_columns

    if isinstance(pending, ray.ObjectRef):
        pending = ray.get(pending)
    with InputReader(input_path) as reader:
        parts = [
            Structures.read(reader, pending[int(number) * CHUNK : (int(number) + 1) * CHUNK])
            for number in batch["id"]
        ]
    structures = parts[0]
    for part in parts[1:]:
        structures = Structures.join(structures, part)
    return structure_columns(structures)


class Inference:
    """Ray actor: one Runner, opened once; evaluates what it receives as the local pipeline would."""

    job: tuple = ()  # (RayJob, device, threads), set on the subclass made per run

    def __init__(self) -> None:
        import socket

        from painn_export.files import file_sha256
        from painn_export.runners import loader_for
        from pipelines.ray_columns import ran_by

        job, device, threads = self.job
        # As many CPU threads as the CPUs Ray gave this actor. A GPU actor's
        # device is "cuda": Ray's CUDA_VISIBLE_DEVICES makes its own GPU cuda:0.
        loader = loader_for(job.model_path, job.runtime, job.dtype)
        if loader.runtime in ("torch", "aoti"):
            import torch

            torch.set_num_threads(threads)
        self.limits, self.settings, self.device_graphs = job.limits, job.settings, job.device_graphs
        self.runner = loader.runner(device, threads=threads)
        self.runner.activate()
        if self.device_graphs:  # Warp started (its kernels from $WARP_CACHE_PATH) once, not per call
            from painn_export.device_graphs import start

            start()
        report = ran_by(self.runner.identity(), file_sha256(loader.path))
        report.update(node=socket.gethostname(), gpu=self.runner.gpu)
        self.ran_by = json.dumps(report, sort_keys=True)

    def __call__(self, batch: dict) -> dict:
        from pipelines.batches import Summary, evaluate
        from pipelines.progress import Progress
        from pipelines.ray_columns import Collector

        sink, summary, bar = Collector(), Summary(), Progress(0, enabled=False)
        if self.device_graphs:
            from pipelines.device_batches import evaluate_structures
            from pipelines.ray_columns import structures_of

            structures = structures_of(batch)
            evaluate_structures(structures, self.runner, sink, self.limits, self.settings, summary, bar)
        else:
            from pipelines.graphs import Item
            from pipelines.ray_columns import graph_of

            rows = zip(batch["index"], batch["status"], batch["message"])
            items = [Item(int(i), graph_of(batch, k), str(st), str(m)) for k, (i, st, m) in enumerate(rows)]
            evaluate(items, self.runner, sink, self.limits, summary, bar)
        return sink.as_batch(self.ran_by, summary.model_seconds, summary.graph_seconds)


def evaluate_on_ray(job: RayJob, pending: np.ndarray, options: RayOptions, writer, summary, bar) -> None:
    """Run the graph and inference stages of ``pending`` on Ray (inside :func:`cluster`); commit
    what comes back through ``writer``."""
    from pipelines.graphs import CHUNK
    from pipelines.ray_columns import commit
    from pipelines.signals import check_stop, stop_on_signals

    ray = import_ray()
    n_chunks = -(-len(pending) // CHUNK)
    if not n_chunks:
        return
    with stop_on_signals():
        ds = plan(ray, ray.put(pending), n_chunks, job, options)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            check_stop()
            commit(batch, job.expected, writer, summary, bar)


def plan(ray, pending_ref, n_chunks: int, job: RayJob, options: RayOptions):
    """The Ray Data pipeline: chunk numbers -> graph tasks (or, with device graphs, read tasks) ->
    inference actors (lazy: nothing runs).

    ``pending_ref`` is the object-store reference of the pending indices; the
    driver's plan holds only ``n_chunks`` numbers' worth of blocks.
    """
    # The job rides on the class, not in constructor arguments: a restarted
    # actor must not depend on objects in the store.
    actor = type("Inference", (Inference,), {"job": (job, options.device, options.cpus_per_actor)})
    with warnings.catch_warnings():  # retry arguments go through ray_remote_args (deprecated in Ray 2.60)
        warnings.simplefilter("ignore", DeprecationWarning)
        ds = ray.data.range(n_chunks)
        if job.device_graphs:
            task, args = structure_task, (pending_ref, job.input_path)
        else:
            task, args = graph_task, (pending_ref, job.input_path, job.settings)
        ds = ds.map_batches(
            task,
            fn_args=args,
            batch_size=1,
            batch_format="numpy",
            num_cpus=1,
            max_retries=RETRIES,
        )
        return ds.map_batches(
            actor,
            batch_size=options.actor_batch,
            batch_format="numpy",
            concurrency=max(1, options.actors),
            num_cpus=options.cpus_per_actor,
            num_gpus=options.gpus_per_actor or None,
            max_restarts=RETRIES,
            max_task_retries=RETRIES,
        )
