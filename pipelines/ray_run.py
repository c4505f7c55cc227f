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
3. **Inference** on an actor pool (``map_batches`` with
   ``ActorPoolStrategy``): each actor opens the model once (one Runner, on
   the GPU Ray gave it if asked, with as many threads as the CPUs Ray gave
   it: ``--ray-cpus-per-actor``, one by default), packs what it receives into batches by the local batcher's
   atom/edge budget and splits a batch that does not fit, exactly as the
   local pipeline (:func:`pipelines.batches.evaluate`). A checkpoint is
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
logger and ``DataContext`` as it found them (:func:`cluster`).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np

INSTALL_HINT = "--ray needs Ray Data: pip install 'painn-export[ray]'"
RETRIES = 3


class RayUnavailableError(ImportError):
    """Ray is not installed; the message says what to install."""


class ClusterError(RuntimeError):
    """A Ray cluster that cannot run this job as the driver recorded it; the message names the node."""


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide to run: ``address`` is ``local`` (start Ray here),
    ``auto`` (the cluster this machine belongs to) or a cluster address."""

    address: str = "local"
    actors: int = 1  # inference actors, one Runner each
    gpus_per_actor: float = 0.0
    cpus: int | None = None  # for a local Ray: CPUs it may use (default: all)
    # Structures per actor call, packed there into model batches: larger packs
    # better, smaller streams results back sooner and loses less to a dead node.
    actor_batch: int = 512
    cpus_per_actor: int = 1  # Ray reserves them for each actor; its runtime runs that many threads

    @property
    def device(self) -> str:
        """Where the actors run: ``cuda`` (the GPU Ray gave each) with GPUs per actor, else ``cpu``."""
        return "cuda" if self.gpus_per_actor else "cpu"


@dataclass(frozen=True)
class RayJob:
    """What every task and actor of a run needs, resolved on the driver (absolute paths)."""

    input_path: str
    model_path: str | None  # None: the bundled demo model
    runtime: str
    settings: object  # pipelines.graphs.GraphSettings
    limits: object  # pipelines.batches.Limits
    expected: dict  # what must compute the results: version, model_sha256 and the runner's identity


def ran_by(identity, model_sha256: str) -> dict:
    """What computed a result: the package version, the model file's hash, the runner's identity."""
    from painn_export.version import __version__

    return {"package_version": __version__, "model_sha256": model_sha256, **asdict(identity)}


class ActorMismatchError(ClusterError):
    """An actor computed with another package version, model file or runner than the driver recorded."""


def import_ray():
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise RayUnavailableError(INSTALL_HINT) from exc
    return ray


def connect(options: RayOptions) -> bool:
    """Join or start Ray as ``options`` say; True when this call started it (and should stop it)."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    # Actors' and tasks' output (their errors) reaches this process's stderr.
    quiet = {"include_dashboard": False, "log_to_driver": True, "configure_logging": False}
    if options.address == "local":  # always a new Ray of its own, never another one on this machine
        ray.init(address="local", num_cpus=options.cpus, **quiet)
    else:
        ray.init(address=options.address, **quiet)
    return True


class PreflightError(ClusterError):
    """A node that cannot run the job: it lacks a file, or runs another package version."""


SAMPLE_BYTES = 1 << 20  # the preflight hashes a file's first and last MiB, not all of it


def _sample_digest(path: str) -> str:
    """SHA-256 of a file's first and last :data:`SAMPLE_BYTES` (with its size, enough to tell files apart)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        digest.update(fh.read(SAMPLE_BYTES))
        fh.seek(0, 2)
        fh.seek(max(0, fh.tell() - SAMPLE_BYTES))
        digest.update(fh.read(SAMPLE_BYTES))
    return digest.hexdigest()


def _node_facts(paths: list[str]) -> dict:
    """Ray task, pinned to one node: its name, package version, and each path's size and sampled hash."""
    import os
    import socket

    from painn_export.version import __version__

    files = {}
    for path in paths:
        try:
            files[path] = (os.path.getsize(path), _sample_digest(path))
        except OSError as exc:
            files[path] = (None, exc.strerror or str(exc))
    return {"node": socket.gethostname(), "version": __version__, "files": files}


def preflight(ray, paths: list[str]) -> int:
    """Check every alive node against this driver before any work; returns the number of nodes.

    Raises :class:`PreflightError` naming the node and the path (or the versions).
    """
    import socket

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = _node_facts(paths)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    probe = ray.remote(num_cpus=0)(_node_facts)
    refs = [
        probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
            paths
        )
        for n in nodes
    ]
    for node, facts in zip(nodes, ray.get(refs)):
        name = f"{facts['node']} ({node.get('NodeManagerAddress', '?')}, Ray node {node['NodeID'][:8]})"
        if facts["version"] != here["version"]:
            raise PreflightError(
                f"node {name} runs painn-export {facts['version']}, this driver {here['version']} "
                f"({socket.gethostname()}): install the same version on every node"
            )
        for path, (size, digest) in facts["files"].items():
            if size is None:
                raise PreflightError(
                    f"node {name} cannot read {path}: {digest}; every node needs it at this path"
                )
            if (size, digest) != here["files"][path]:
                raise PreflightError(f"node {name} sees another file at {path} than this driver does")
    return len(nodes)


def _graph_rows(batch: dict, pending, input_path: str, settings) -> dict:
    """Ray task: the graphs (or statuses) of the chunks numbered in ``batch``, one row per structure."""
    import ray

    from painn_export.schema import InputReader
    from pipelines.batches import CHUNK
    from pipelines.graphs import items_from

    if isinstance(pending, ray.ObjectRef):  # the object store's copy, read in place (zero-copy)
        pending = ray.get(pending)
    items = []
    with InputReader(input_path) as reader:
        for number in batch["id"]:
            chunk = pending[int(number) * CHUNK : (int(number) + 1) * CHUNK]
            items += items_from(reader, settings, chunk)
    graphs = [it.graph for it in items]  # already in the float32 feed's types (structure_item)
    columns = {
        "index": np.asarray([it.index for it in items], dtype=np.int64),
        "status": np.asarray([it.status for it in items], dtype=object),
        "message": np.asarray([it.message for it in items], dtype=object),
        "min_distance": np.asarray([np.inf if g is None else g.min_distance for g in graphs]),
    }
    for name, empty in GRAPH_ARRAYS.items():
        columns[name] = _ragged([empty if g is None else _array(g, name, empty) for g in graphs])
    return columns


# A graph's arrays, as tensor columns: each with its "no graph" (or "no cell") value, of its rank and dtype.
GRAPH_ARRAYS = {
    "atomic_numbers": np.zeros(0, np.int64),
    "positions": np.zeros((0, 3)),
    "edge_index": np.zeros((2, 0), np.int32),
    "cell_shift": np.zeros((0, 3), np.int32),
    "edge_shift": np.zeros((0, 3), np.float32),
    "edge_slot": np.zeros(0, np.int32),
    "edge_reverse": np.zeros(0, np.int32),
    "cell": np.zeros((0, 3)),
}


def _array(graph, name: str, empty: np.ndarray) -> np.ndarray:
    value = getattr(graph, name)
    return empty if value is None else np.asarray(value, dtype=empty.dtype)


def _ragged(arrays: list) -> np.ndarray:
    """A 1-d object column of arrays (Ray Data stores it as a variable-shaped tensor column).

    Filled one by one: numpy would stack arrays of equal shapes into one
    array of higher rank.
    """
    column = np.empty(len(arrays), dtype=object)
    for k, array in enumerate(arrays):
        column[k] = array
    return column


def _graph_of(batch: dict, k: int):
    """Row ``k``'s graph, rebuilt from its tensor columns; None for a structure without one."""
    from painn_export.batch import Graph

    if not len(batch["atomic_numbers"][k]):
        return None
    arrays = {name: np.asarray(batch[name][k]) for name in GRAPH_ARRAYS}
    if not len(arrays["cell"]):
        arrays["cell"] = None
    # Checked where it was built (the graph task): not again per batch.
    return Graph.from_checked(**arrays, min_distance=float(batch["min_distance"][k]))


class _Collector:
    """What the local writer would receive, kept for the driver (same two calls)."""

    def __init__(self) -> None:
        self.results: list = []
        self.statuses: list = []

    def commit_results(self, rows) -> None:
        self.results += rows

    def commit_status(self, rows) -> None:
        self.statuses += rows

    def as_batch(self, ran_by: str, model_seconds: float) -> dict:
        """Columns of what came back: forces ``[n, 3]`` (``[0, 3]`` for none) and stress ``[3, 3]``
        (``[0, 3]`` for none) as tensor columns; who computed it, and its seconds in the runtime."""
        # The runtime's own dtype travels (float32: half the bytes of float64); one dtype per column.
        dtype = self.results[0][2].dtype if self.results else np.float64
        no_forces, no_stress = np.zeros((0, 3), dtype), np.zeros((0, 3), dtype)
        rows = [(i, e, f, no_stress if st is None else st, kind, "") for i, e, f, st, kind in self.results]
        rows += [(i, np.nan, no_forces, no_stress, kind, message) for i, kind, message in self.statuses]
        seconds = np.zeros(len(rows))
        seconds[:1] = model_seconds  # the batch's, on its first row
        return {
            "index": np.asarray([r[0] for r in rows], dtype=np.int64),
            "energy": np.asarray([r[1] for r in rows], dtype=np.float64),
            "forces": _ragged([np.asarray(r[2], dtype=dtype) for r in rows]),
            "stress": _ragged([np.asarray(r[3], dtype=dtype) for r in rows]),
            "status": np.asarray([r[4] for r in rows], dtype=object),
            "message": np.asarray([r[5] for r in rows], dtype=object),
            "ran_by": np.asarray([ran_by] * len(rows), dtype=object),
            "model_seconds": seconds,
        }


class _Inference:
    """Ray actor: one Runner, opened once; evaluates what it receives as the local pipeline would."""

    job: tuple = ()  # (RayJob, device, threads), set on the subclass made per run

    def __init__(self) -> None:
        import socket

        from painn_export.checkpoint import file_sha256
        from painn_export.demo import demo_model_path
        from painn_export.runners import open_runner

        job, device, threads = self.job
        # As many CPU threads as the CPUs Ray gave this actor. A GPU actor's
        # device is "cuda": Ray's CUDA_VISIBLE_DEVICES makes its own GPU cuda:0.
        if job.runtime in ("torch", "aoti"):
            import torch

            torch.set_num_threads(threads)
        self.limits = job.limits
        self.runner, _ = open_runner(job.model_path, job.runtime, device, threads=threads)
        self.runner.activate()
        model_sha256 = file_sha256(job.model_path or demo_model_path())
        report = ran_by(self.runner.identity(), model_sha256)
        report.update(node=socket.gethostname(), gpu=self.runner.gpu)
        self.ran_by = json.dumps(report, sort_keys=True)

    def __call__(self, batch: dict) -> dict:
        from pipelines.batches import Summary, evaluate
        from pipelines.graphs import Item
        from pipelines.progress import Progress

        items = [
            Item(int(i), _graph_of(batch, k), str(status), str(message))
            for k, (i, status, message) in enumerate(zip(batch["index"], batch["status"], batch["message"]))
        ]
        sink, summary = _Collector(), Summary()
        evaluate(items, self.runner, sink, self.limits, summary, Progress(0, enabled=False))
        return sink.as_batch(self.ran_by, summary.model_seconds)


@contextmanager
def cluster(options: RayOptions, paths: list[str]) -> Iterator:
    """Ray, joined or started as ``options`` say, with every node checked against ``paths``.

    Yields the ``ray`` module. Before any output file exists, a node that
    lacks a file or runs another version is :class:`PreflightError`. On the
    way out Ray's ``ray.data`` logger and ``DataContext`` are as they were,
    and a Ray started here is stopped.
    """
    import logging

    from pipelines.signals import stop_on_signals

    ray = import_ray()
    # A Ray started here sets its own SIGTERM handler (exit 1, without a word): the run's is used.
    with stop_on_signals():
        started = connect(options)
    data_logger = logging.getLogger("ray.data")
    level = data_logger.level
    context = ray.data.DataContext.get_current()
    progress_bars = context.enable_progress_bars
    try:
        data_logger.setLevel(logging.ERROR)  # its per-run INFO lines are noise here
        context.enable_progress_bars = False  # painn-batch draws its own
        with stop_on_signals():
            preflight(ray, paths)
        yield ray
    finally:
        data_logger.setLevel(level)
        context.enable_progress_bars = progress_bars
        if started:
            ray.shutdown()


def evaluate_on_ray(job: RayJob, pending: np.ndarray, options: RayOptions, writer, summary, bar) -> None:
    """Run the graph and inference stages of ``pending`` on Ray (inside :func:`cluster`); commit
    what comes back through ``writer``."""
    from pipelines.batches import CHUNK
    from pipelines.signals import check_stop, stop_on_signals

    ray = import_ray()
    n_chunks = -(-len(pending) // CHUNK)
    if not n_chunks:
        return
    with stop_on_signals():
        ds = plan(ray, ray.put(pending), n_chunks, job, options)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            check_stop()
            _commit(batch, job.expected, writer, summary, bar)


def plan(ray, pending_ref, n_chunks: int, job: RayJob, options: RayOptions):
    """The Ray Data pipeline: chunk numbers -> graph tasks -> inference actors (lazy: nothing runs).

    ``pending_ref`` is the object-store reference of the pending indices; the
    driver's plan holds only ``n_chunks`` numbers' worth of blocks.
    """
    # The job rides on the class, not in constructor arguments: a restarted
    # actor must not depend on objects in the store.
    actor = type("Inference", (_Inference,), {"job": (job, options.device, options.cpus_per_actor)})
    with warnings.catch_warnings():  # retry arguments go through ray_remote_args (deprecated in Ray 2.60)
        warnings.simplefilter("ignore", DeprecationWarning)
        ds = ray.data.range(n_chunks)
        ds = ds.map_batches(
            _graph_rows,
            fn_args=(pending_ref, job.input_path, job.settings),
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


def _commit(batch: dict, expected: dict, writer, summary, bar) -> None:
    """Write one batch of results from the cluster through the crash-safe writer.

    Refuses (:class:`ActorMismatchError`, before writing) a batch computed by
    anything else than what the run's fingerprint records.
    """
    for text in set(batch["ran_by"]):
        report = json.loads(text)
        _check_ran_by(report, expected)
        summary.gpu = summary.gpu or report["gpu"]
    summary.model_seconds += float(np.sum(batch["model_seconds"]))
    results, failed, atoms = [], [], 0
    for i, e, f, st, status, message in zip(
        batch["index"], batch["energy"], batch["forces"], batch["stress"], batch["status"], batch["message"]
    ):
        if len(f):
            forces = np.asarray(f)
            atoms += len(forces)
            results.append((int(i), float(e), forces, np.asarray(st) if len(st) else None, str(status)))
        else:
            failed.append((int(i), str(status), str(message)))
    writer.commit_results(results)
    writer.commit_status(failed)
    summary.computed += len(results) + len(failed)
    summary.atoms += atoms
    bar.update(len(results) + len(failed), atoms)


def _check_ran_by(report: dict, expected: dict) -> None:
    """One line naming the actor's node and the first thing it ran differently from the driver."""
    for key, want in expected.items():
        if report.get(key) != want:
            raise ActorMismatchError(
                f"an actor on node {report.get('node', '?')} computed with {key}={report.get(key)!r}, "
                f"and this driver recorded {want!r}: run the same painn-export and model on every node"
            )
