"""The neighbour-list stage: read a range of structures, build each graph or say why not.

Runs in worker processes (or in the main one with ``--workers 0``). A worker
opens the input once and reads the structure ranges it is given, so only
graphs, never the raw input, travel between processes: in shared memory
(:mod:`pipelines.graph_transport`) where the system has ``os.memfd_create``,
else pickled, as a relaxation's items always are. Imports stay light
(numpy, h5py, vesin, numba): no torch or ONNX Runtime in the workers.

With ``--graphs device`` neither ``run`` nor ``relax`` uses this stage: the
main process reads the raw structures and the runner's device builds their
graphs and gives their statuses (:mod:`pipelines.device_batches`,
:meth:`pipelines.relax_graphs.StepGraphs.entering`); no host graph is made.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from painn_export.batch import Graph, even_runs
from painn_export.neighbors import StructureError, neighbor_graph
from painn_export.schema import InputReader
from painn_export.skin import SkinGraph
from pipelines import graph_transport
from pipelines.signals import run_ignoring_stop_signals

CHUNK = 128  # structures per neighbour-graph task (a worker's, or a Ray task's)
# With a pool (threads of this process): a chunk this process builds goes to them in this many
# contiguous pieces of about equal atoms, not one task per structure (the hand-off would cost more
# than a small structure's build). Four: a piece for each of relax's threads at most (host_threads).
PIECES = 4

MIN_SEPARATION = 0.5  # Å; closer atoms are physically meaningless for these models


@dataclass(frozen=True)
class GraphSettings:
    cutoff: float  # Å
    max_neighbors: int
    num_elements: int
    feed_dtype: str = "float32"  # the runner's feed: float32 graphs travel narrowed (for_float32_feed)
    # A relaxation's items carry each structure's start (Start); with ``skin`` (Å, the host
    # path) the skin list is searched in the worker and its graph is the item's (float64).
    relax: bool = False
    skin: float | None = None

    @classmethod
    def of(cls, facts, runner_or_dtype) -> GraphSettings:
        """The settings for a model's facts and its runner (or the runner's feed dtype)."""
        dtype = getattr(runner_or_dtype, "feed_dtype", runner_or_dtype)
        return cls(facts.cutoff, facts.max_neighbors, facts.num_elements, np.dtype(dtype).name)


@dataclass(frozen=True)
class Start:
    """What a relaxation starts a structure from: the input's structure, and on the host its skin list.

    Made in the neighbour worker with the structure's graph (whose arrays it
    shares, so they are pickled once), or with ``--graphs device`` from the
    input read in the main process (:meth:`pipelines.relax_graphs.StepGraphs.entering`).
    """

    atomic_numbers: np.ndarray  # [n] int64
    positions: np.ndarray  # [n, 3] float64 Å, as in the input
    cell: np.ndarray  # [3, 3] float64 Å, as in the input
    pbc: np.ndarray  # [3] bool
    fixed: np.ndarray  # [n] bool: atoms held fixed
    skin: SkinGraph | None = None  # host path: searched at the input's geometry, its graph the item's


@dataclass(frozen=True)
class Item:
    """One structure after the neighbour stage: a graph, or a status and message.

    For a float32 feed the graph travels in its dtypes (int32
    ``edge_index``, ``cell_shift``, ``edge_slot`` and ``edge_reverse``, float32 ``edge_shift``; see
    :func:`for_float32_feed`): half the bytes of the float64 graph for the
    workers to write (:mod:`pipelines.graph_transport`) and the main process
    to read. A float64 feed keeps its graph's float64 shifts.
    """

    index: int
    graph: Graph | None  # with --graphs device: what packing reads of the device's graph (Sized)
    status: str
    message: str
    start: Start | None = None  # with GraphSettings.relax, for a structure with a graph


# A neighbour worker process's open input and settings, set once by its
# initialiser (the process pool's idiom: one worker, one input). The main
# process never uses it: ``--workers 0`` calls :func:`items_from` with a reader of its own.
_worker: dict = {}


def init_worker_process(input_path: str, settings: GraphSettings) -> None:
    """Initialiser of a neighbour worker process: light, tied to its run, its input opened once."""
    _keep_torch_out()
    _exit_with_parent()
    _worker["reader"] = InputReader(input_path)
    _worker["settings"] = settings


def _keep_torch_out() -> None:
    """Make ``import torch`` fail in this worker, unless something already imported it.

    vesin imports torch (and cupy) whenever installed, only to accept their
    tensors; a worker passes numpy arrays, and torch would cost it ~0.9 s of
    start-up and ~190 MB of memory.
    """
    import sys

    for name in ("torch", "cupy"):
        sys.modules.setdefault(name, None)  # None: ImportError on import


def _exit_with_parent(poll_s: float = 0.5) -> None:
    """End this worker when the run that spawned it is gone (SIGKILL, OOM kill).

    A killed parent cannot shut its pool down, and an idle worker would wait
    on the task queue forever, holding the input file and its memory. A
    daemon thread notices the re-parenting instead.
    """
    import os
    import threading

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def warm_worker() -> None:
    """In a worker process: build one small graph, so that the compiled kernels are loaded."""
    z, pos = np.array([1, 1]), np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    structure_item(-1, z, pos, np.eye(3) * 10.0, np.ones(3, bool), _worker["settings"])


def build_items(indices: np.ndarray) -> list[Item]:
    """In a worker process: graphs (or statuses) of the structures ``indices`` (sorted) of its input."""
    return items_from(_worker["reader"], _worker["settings"], indices)


def build_shared(indices: np.ndarray) -> graph_transport.SharedChunk | list[Item]:
    """In a worker process: :func:`build_items`' items, their graphs in shared memory
    (:func:`pipelines.graph_transport.pack`; the main process reads them with ``unpack``).

    Where the file cannot be made here and now (``OSError``: EMFILE, ENOMEM,
    a memfd refused after all), the list itself, pickled as without shared
    memory: ``unpack`` takes either, and the items are the same.
    """
    items = build_items(indices)
    try:
        return graph_transport.pack(items)
    except OSError:
        return items


def items_from(
    reader: InputReader, settings: GraphSettings, indices: np.ndarray, pool: ThreadPoolExecutor | None = None
) -> list[Item]:
    """Graphs (or statuses) of the structures ``indices`` (sorted) of an open input, in that order.

    The structures are read here, on the calling thread, in one read (h5py
    is not for concurrent use). ``pool``: threads to build them on, in
    :func:`~painn_export.batch.even_runs` of the chunk (vesin's search and the compiled kernels
    release the GIL); None: this thread. The items are the same bits in the
    same order either way: each structure's build is its own.
    """
    offsets = reader.offsets
    lo, hi = int(indices[0]), int(indices[-1]) + 1
    z_all, pos_all, cells, pbcs = reader.structures(lo, hi)
    fixed_all = reader.fixed(lo, hi) if settings.relax else None
    a0 = offsets[lo]
    order = [int(s) for s in indices]

    def build(first: int, last: int) -> list[Item]:
        """The items of ``order[first:last]``."""
        out = []
        for s in order[first:last]:
            atoms = slice(offsets[s] - a0, offsets[s + 1] - a0)
            item = structure_item(s, z_all[atoms], pos_all[atoms], cells[s - lo], pbcs[s - lo], settings)
            if fixed_all is not None and item.start is not None:
                item.start.fixed[:] = fixed_all[atoms]
            out.append(item)
        return out

    if pool is None or len(order) < 2:
        return build(0, len(order))
    at = np.asarray(order)
    bounds = even_runs(offsets[at + 1] - offsets[at], PIECES)
    built = [pool.submit(build, first, last) for first, last in bounds]
    return [item for piece in built for item in piece.result()]  # in the chunk's order


def structure_item(s: int, z, pos, cell, pbc, settings: GraphSettings) -> Item:
    if len(z) == 0:
        return Item(s, None, "empty_structure", "structure has no atoms")
    if z.min() < 1 or z.max() > settings.num_elements:
        bad = sorted({int(v) for v in z if not 1 <= v <= settings.num_elements})
        return Item(s, None, "unknown_element", f"atomic numbers outside 1..{settings.num_elements}: {bad}")
    start = None
    try:
        skin = None
        if settings.skin is None:
            graph = neighbor_graph(pos, cell, pbc, settings.cutoff, settings.max_neighbors, atomic_numbers=z)
        else:  # the same graph, from the skin list the relaxation then keeps
            skin = SkinGraph(settings.cutoff, settings.max_neighbors, skin=settings.skin)
            graph = skin.update(z, pos, cell, pbc)
        if settings.relax:
            geometry = graph.atomic_numbers, graph.positions, np.array(cell, np.float64), np.array(pbc, bool)
            start = Start(*geometry, np.zeros(len(z), bool), skin)  # fixed: set by items_from
    except StructureError as exc:
        return Item(s, None, exc.kind, str(exc))
    # Every pair the search found counts here, self-images and coincident
    # atoms included (the graph itself drops pairs closer than 0.01 Å, as upstream).
    if graph.min_distance < MIN_SEPARATION:
        what = "atoms or periodic images" if np.asarray(pbc).any() else "atoms"
        message = f"{what} {graph.min_distance:.3g} Å apart (< {MIN_SEPARATION} Å)"
        return Item(s, None, "atoms_too_close", message)
    if start is not None:
        return Item(s, graph, "ok", "", start)
    return Item(s, for_float32_feed(graph) if settings.feed_dtype == "float32" else graph, "ok", "")


def for_float32_feed(graph: Graph) -> Graph:
    """``graph`` with int32 indices and shifts and float32 edge shifts (what a float32 feed keeps).

    The same edges in narrower types: not checked again (``dataclasses.replace``
    would, at about half a millisecond a structure).
    """
    return Graph.from_checked(
        **{
            **graph.fields(),
            "edge_index": graph.edge_index.astype(np.int32),
            "cell_shift": graph.cell_shift.astype(np.int32),
            "edge_shift": graph.edge_shift.astype(np.float32),
            "edge_slot": graph.edge_slot.astype(np.int32),
            "edge_reverse": graph.edge_reverse.astype(np.int32),
        }
    )


class WorkerError(RuntimeError):
    """A neighbour-list worker process died or could not start."""


def chunks(pending: np.ndarray):
    """Runs of pending structure indices, at most CHUNK each: one neighbour-graph task each."""
    for lo in range(0, len(pending), CHUNK):
        yield pending[lo : lo + CHUNK]


def neighbour_items(
    input_path: str,
    pending: np.ndarray,
    settings: GraphSettings,
    workers: int,
    start_here: bool = False,
    pool: ThreadPoolExecutor | None = None,
):
    """Items of every pending structure, in order, from a bounded window of worker tasks.

    ``start_here``: this process builds the chunks itself until a worker is
    ready (a worker's interpreter, imports and compiled kernels take most of
    a second that the run would otherwise wait out), and all of them when
    there is one chunk. For a caller that loads the neighbour code anyway
    (``relax`` searches its skin lists here); elsewhere vesin's import of
    torch would cost more. The items are the same whoever builds them.

    ``pool``: the caller's threads, on which the chunks this process builds
    (``start_here``, or all with ``workers <= 0``) are built (:func:`items_from`);
    None: this thread. The caller keeps it open until this generator is closed.

    A worker's graphs reach this process in shared memory, their arrays
    read-only views (:mod:`pipelines.graph_transport`), unless the system
    has no ``os.memfd_create`` or the items are a relaxation's (each with a
    ``Start``): then the worker's list is pickled.
    """
    if workers <= 0 or (start_here and len(pending) <= CHUNK):
        # In this process: a reader of its own (no module state), closed after the run.
        with InputReader(input_path) as reader:
            for chunk in chunks(pending):
                yield from items_from(reader, settings, chunk, pool)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    # spawn: the workers never inherit the runtime's threads or open HDF5 handles.
    ctx = multiprocessing.get_context("spawn")
    processes = ProcessPoolExecutor(
        workers,
        mp_context=ctx,
        initializer=run_ignoring_stop_signals,
        initargs=(init_worker_process, input_path, settings),
    )
    shared = graph_transport.available() and not settings.relax  # how the workers' items travel
    task = build_shared if shared else build_items
    window: deque = deque()
    here = _Here(input_path, settings, pool) if start_here else None
    # One warm-up task per worker: the process pool starts a process per task it cannot give an idle one.
    warming = [processes.submit(warm_worker) for _ in range(workers)] if start_here else []

    def ready() -> bool:  # a worker can build (or the process pool broke: submitting then says so)
        return any(w.done() for w in warming)

    try:
        tasks = chunks(pending)
        for chunk in tasks:
            if here is not None and not window and not ready():
                # The workers are still starting. Once one is up (looked at before each item is
                # handed out), they start on the next chunks while the caller uses these: not
                # only when it asks for the first item past them, which it would then wait out.
                for item in here.items(chunk):
                    if not window and ready():
                        window.extend(processes.submit(task, c) for c in itertools.islice(tasks, 2 * workers))
                    yield item
                continue
            window.append(processes.submit(task, chunk))
            if len(window) > 2 * workers:
                yield from graph_transport.unpack(window.popleft().result())
        while window:
            yield from graph_transport.unpack(window.popleft().result())
    except BrokenProcessPool as exc:
        raise WorkerError(
            "a neighbour-list worker process died or could not start (killed, out of memory, "
            "or the input became unreadable)"
        ) from exc
    finally:
        # Without waiting: the workers exit in the background while the last
        # batch runs (they are joined at interpreter exit at the latest).
        processes.shutdown(wait=False, cancel_futures=True)
        if here is not None:
            here.close()


class _Here:
    """This process's own reader, opened when it first builds a chunk (``start_here``), and the
    caller's threads it builds on (``pool``, None: this thread)."""

    def __init__(self, input_path: str, settings: GraphSettings, pool: ThreadPoolExecutor | None) -> None:
        self.input_path, self.settings, self.pool, self.reader = input_path, settings, pool, None

    def items(self, chunk: np.ndarray) -> list[Item]:
        if self.reader is None:
            self.reader = InputReader(self.input_path)
        return items_from(self.reader, self.settings, chunk, self.pool)

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()


def default_workers() -> int:
    """One neighbour worker per spare core, at least one."""
    return max(1, min(4, (os.cpu_count() or 2) - 1))
