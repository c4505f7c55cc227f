"""Feed rate: graphs and the model's feed built on the host (per structure) against on a device (per batch).

    python scripts/bench_feed.py [--structures 1000] [--atoms 68] [--batch 250]
                                 [--device cpu] [--repeats 3] [--cutoff 12] [--max-neighbors 50]
                                 [--transport]

Generates ``--structures`` periodic bulk structures of ``--atoms`` atoms on
average (30 % spread; the demo elements, ~2.4 Å apart; seeded), with the OCP
graph settings by default (12 Å, cap 50), and times, per atom:

- host: ``neighbor_graph`` per structure then ``collate`` per batch of
  ``--batch`` structures, on one core (what one neighbour worker does, plus
  the main process's collate); with ``canonical_graph`` too (the edge order
  the device path produces, which a host path would need for bitwise equal feeds);
- device: ``device_feed`` per batch of ``--batch`` structures on ``--device``
  (float32 feed; torch's threads on the CPU), after one warm-up batch (Warp
  compiles its kernels on the first call of a process: reported apart).

Prints the median of ``--repeats`` in µs/atom, the atoms per second each
reaches, and how many host cores would feed a GPU that takes 200 000 atoms/s.

Then the pipeline itself (``painn-batch run``'s :func:`pipelines.run.run_file`)
on the same structures written to an HDF5 file, with a nearly free model (one
layer, 8 features, 8 radial functions; the graph settings above) on
``--runtime`` / ``--device``, once with ``--graphs host --workers 0`` (every
host step in this one process) and once with ``--graphs device``. For each:
the host's µs per atom, **wall − device graph time − runtime time** (the
summary's ``seconds``, ``graph_seconds`` and ``model_seconds``): reading,
packing, collate or the device feed's host side, writing; on the host path it
includes the neighbour search, i.e. one core's whole share. Also the device
path's own graph time per atom (on ``--device``), and the host cores that
each path needs to feed 200 000 atoms/s. Run start-up (the runtime, the file)
is inside the wall time: use a few thousand structures for figures.

``--transport`` instead times how a neighbour worker's chunks (``CHUNK``
structures, float32 feed) reach the main process, per atom: one spawned
worker builds each chunk and serialises it (its list of items pickled, or
its graphs packed into shared memory, ``pipelines.graph_transport``, and
that pickled); the main process then loads it (unpickling the items, or
taking the descriptor, mapping the file and making the graphs over views),
then collates the chunk's graphs into one feed. The worker's serialising
time is reported beside the main process's, whose time (this thread's CPU
time; the load's wall time too, which includes waiting on the worker's
socket for the descriptor) is the one that competes with the runtime; the
pipe's copy of the bytes is in neither. A second table then times
``neighbour_items`` itself with two workers, each way, its graphs collated a
chunk at a time: the main process's CPU time over all its threads (the
process pool's thread that reads the pipe included), and the wall time.
"""

from __future__ import annotations

import argparse
import pickle
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ELEMENTS = np.array([13, 28, 29, 46, 47, 78, 79])
GPU_ATOMS_PER_S = 200_000  # what one GPU evaluates at OCP settings (issue 32)


def structures(n: int, atoms: int, seed: int = 0):
    from painn_export.samples import bulk

    rng = np.random.default_rng(seed)
    sizes = rng.integers(int(0.7 * atoms), int(1.3 * atoms) + 1, n)
    return [bulk(rng, int(k), ELEMENTS) for k in sizes]


def batches(samples, size: int):
    for start in range(0, len(samples), size):
        part = samples[start : start + size]
        yield (
            (
                np.concatenate([s.positions for s in part]),
                np.stack([s.cell for s in part]),
                np.stack([s.pbc for s in part]),
                np.concatenate([s.atomic_numbers for s in part]).astype(np.int64),
                np.array([len(s.positions) for s in part]),
            ),
            part,
        )


def host(samples, size: int, cutoff: float, k: int, canonical: bool) -> float:
    """Seconds for every batch: neighbor_graph per structure, then collate (float32)."""
    from painn_export.batch import collate
    from painn_export.device_graphs import canonical_graph
    from painn_export.neighbors import neighbor_graph

    t = time.perf_counter()
    for _, part in batches(samples, size):
        graphs = [
            neighbor_graph(s.positions, s.cell, s.pbc, cutoff, k, atomic_numbers=s.atomic_numbers)
            for s in part
        ]
        if canonical:
            graphs = [canonical_graph(g) for g in graphs]
        collate(graphs, np.float32)
    return time.perf_counter() - t


def device(samples, size: int, cutoff: float, k: int, where: str) -> float:
    """Seconds for every batch: device_feed (float32), synchronised at the end."""
    import torch

    from painn_export.device_graphs import device_feed

    t = time.perf_counter()
    for arrays, _ in batches(samples, size):
        device_feed(*arrays, cutoff=cutoff, max_neighbors=k, device=where)
    if where.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t


def pipeline_rows(samples, args, workdir: Path) -> list[tuple[str, object]]:
    """``run_file`` with ``--graphs host --workers 0`` and ``--graphs device`` on the same file: summaries."""
    import torch

    from painn_export import save_model
    from painn_export.config import PaiNNConfig
    from painn_export.model import PaiNN
    from painn_export.schema import write_input
    from pipelines.run import run_file

    torch.manual_seed(0)
    config = PaiNNConfig(
        hidden_channels=8, num_layers=1, num_rbf=8, cutoff=args.cutoff, max_neighbors=args.max_neighbors
    )
    model = save_model(PaiNN(config), workdir / "free.pt")
    rows = [(s.atomic_numbers, s.positions, s.cell, s.pbc) for s in samples]
    inp = write_input(workdir / "in.h5", rows)
    warm = write_input(workdir / "warm.h5", rows[: min(len(rows), 20)])
    out = []
    for graphs in ("host", "device"):
        options = dict(
            runtime=args.runtime, device=args.device, graphs=graphs, workers=0, progress=False, overwrite=True
        )
        run_file(warm, workdir / "warm.out.h5", model, **options)  # numba, Warp, the runtime: loaded
        out.append((graphs, run_file(inp, workdir / f"{graphs}.out.h5", model, **options)))
    return out


def _serialised_chunk(indices: np.ndarray, shared: bool) -> tuple[float, bytes]:
    """In the neighbour worker: one chunk's items serialised as they travel, and the seconds it took."""
    from pipelines.graph_transport import pack
    from pipelines.graphs import build_items

    items = build_items(indices)
    t = time.perf_counter()
    blob = pickle.dumps(pack(items) if shared else items, protocol=pickle.HIGHEST_PROTOCOL)
    return time.perf_counter() - t, blob


def transport_rows(samples, args, workdir: Path) -> None:
    """The main process's side of receiving chunks: unpickling items against unpacking shared graphs."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from painn_export.batch import collate
    from painn_export.schema import write_input
    from pipelines import graph_transport
    from pipelines.graphs import CHUNK, GraphSettings, init_worker_process

    rows = [(s.atomic_numbers, s.positions, s.cell, s.pbc) for s in samples]
    inp = write_input(workdir / "in.h5", rows)
    settings = GraphSettings(args.cutoff, args.max_neighbors, int(ELEMENTS.max()), "float32")
    chunks = [np.arange(lo, min(lo + CHUNK, len(rows))) for lo in range(0, len(rows), CHUNK)]
    n_atoms = sum(len(s.positions) for s in samples)
    modes = {"pickled items": False}
    if graph_transport.available():
        modes["shared memory (memfd)"] = True
    keys = ("worker", "load", "load_cpu", "collate")
    times = {mode: {key: [] for key in keys} for mode in modes}
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        1, mp_context=ctx, initializer=init_worker_process, initargs=(str(inp), settings)
    ) as pool:
        for shared in modes.values():  # the worker's imports and kernels, collate's kernel, each path once
            _, blob = pool.submit(_serialised_chunk, chunks[0], shared).result()
            collate([it.graph for it in graph_transport.unpack(pickle.loads(blob)) if it.graph], np.float32)
        for _ in range(args.repeats):
            for mode, shared in modes.items():
                total = dict.fromkeys(keys, 0.0)
                for chunk in chunks:
                    serialise, blob = pool.submit(_serialised_chunk, chunk, shared).result()
                    total["worker"] += serialise
                    wall, cpu = time.perf_counter(), time.thread_time()
                    items = graph_transport.unpack(pickle.loads(blob))
                    total["load"] += time.perf_counter() - wall
                    total["load_cpu"] += time.thread_time() - cpu
                    cpu = time.thread_time()
                    collate([it.graph for it in items if it.graph is not None], np.float32, edges=False)
                    total["collate"] += time.thread_time() - cpu
                    del items
                for key in keys:
                    times[mode][key].append(total[key])
    print(
        f"\nchunks of {CHUNK} structures from one neighbour worker (float32 feed), "
        f"µs/atom, median of {args.repeats}; main: this thread's CPU time, and the load's wall time"
    )
    print("| transport | worker: serialise | main: load (wall) | main: load | main: collate | main: both |")
    print("| --- | --- | --- | --- | --- | --- |")
    for mode, kinds in times.items():
        worker, load, load_cpu, packed = (statistics.median(kinds[k]) / n_atoms * 1e6 for k in keys)
        print(
            f"| {mode} | {worker:.2f} | {load:.2f} | {load_cpu:.2f} | {packed:.2f} | {load_cpu + packed:.2f} |"
        )


def receive_rows(samples, args, workdir: Path, workers: int = 2) -> None:
    """The main process's whole CPU time (every thread: the pool's pipe reader too) to receive the
    items of ``neighbour_items`` from ``workers`` neighbour workers and collate them a chunk at a
    time, pickled against shared memory."""
    from painn_export.batch import collate
    from painn_export.schema import write_input
    from pipelines import graph_transport, graphs

    rows = [(s.atomic_numbers, s.positions, s.cell, s.pbc) for s in samples]
    inp = str(write_input(workdir / "receive.h5", rows))
    n_atoms = sum(len(s.positions) for s in samples)
    settings = graphs.GraphSettings(args.cutoff, args.max_neighbors, int(ELEMENTS.max()), "float32")
    modes = {"pickled items": False}
    if graph_transport.available():
        modes["shared memory (memfd)"] = True
    times: dict[str, list[tuple[float, float]]] = {mode: [] for mode in modes}
    real = graph_transport.available
    try:
        for _ in range(args.repeats):
            for mode, shared in modes.items():
                graph_transport.available = real if shared else (lambda: False)
                cpu, wall = time.process_time(), time.perf_counter()
                held = []  # collated a chunk at a time, as run's batches read them (shared pages fault here)
                for item in graphs.neighbour_items(inp, np.arange(len(rows)), settings, workers):
                    if item.graph is not None:
                        held.append(item.graph)
                    if len(held) == graphs.CHUNK:
                        collate(held, np.float32, edges=False)
                        held = []
                if held:
                    collate(held, np.float32, edges=False)
                times[mode].append((time.process_time() - cpu, time.perf_counter() - wall))
    finally:
        graph_transport.available = real
    print(
        f"\nneighbour_items from {workers} workers (float32 feed) then collate, µs/atom, median of "
        f"{args.repeats}: the main process's CPU time (all its threads), and the wall time (the workers' "
        "search sets it)"
    )
    print("| transport | main process CPU | wall |")
    print("| --- | --- | --- |")
    for mode, runs in times.items():
        cpu = statistics.median(r[0] for r in runs) / n_atoms * 1e6
        wall = statistics.median(r[1] for r in runs) / n_atoms * 1e6
        print(f"| {mode} | {cpu:.2f} | {wall:.2f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--structures", type=int, default=1000)
    parser.add_argument("--atoms", type=int, default=68, help="mean atoms per structure")
    parser.add_argument("--batch", type=int, default=250, help="structures per batch")
    parser.add_argument("--device", default="cpu", help="where device_feed runs, e.g. cuda:0")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cutoff", type=float, default=12.0)
    parser.add_argument("--max-neighbors", type=int, default=50)
    parser.add_argument("--runtime", default="torch", help="the pipeline rows' runtime (torch, onnxruntime)")
    parser.add_argument("--skip-feed", action="store_true", help="only the pipeline rows")
    parser.add_argument(
        "--transport", action="store_true", help="only how a worker's chunks reach the main process"
    )
    args = parser.parse_args(argv)
    if args.transport:  # no torch, no device: the host's neighbour stage alone
        import tempfile

        samples = structures(args.structures, args.atoms)
        print(
            f"machine: {platform.processor() or platform.machine()}, {platform.python_version()}; "
            f"{len(samples)} periodic structures of ~{args.atoms} atoms, cutoff {args.cutoff} Å, "
            f"cap {args.max_neighbors}"
        )
        with tempfile.TemporaryDirectory() as tmp:
            transport_rows(samples, args, Path(tmp))
            receive_rows(samples, args, Path(tmp))
        return 0

    import torch

    from painn_export.device_graphs import init_kernels

    samples = structures(args.structures, args.atoms)
    n_atoms = sum(len(s.positions) for s in samples)
    settings = (args.cutoff, args.max_neighbors)
    print(
        f"machine: {platform.processor() or platform.machine()}, {platform.python_version()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), device {args.device}"
    )
    if args.device.startswith("cuda"):
        print(f"GPU: {torch.cuda.get_device_name(torch.device(args.device))}")
    print(
        f"{len(samples)} periodic structures, {n_atoms} atoms ({n_atoms / len(samples):.0f} per structure), "
        f"cutoff {args.cutoff} Å, cap {args.max_neighbors}, {args.batch} structures per batch"
    )
    print(f"Warp kernel cache: {init_kernels()}")

    if not args.skip_feed:
        feed_rows(samples, args, settings, n_atoms)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        runs = pipeline_rows(samples, args, Path(tmp))
    print(
        f"\npainn-batch run, a nearly free model (1 layer, 8 features) with {args.runtime} on {args.device}; "
        "host = wall - device graphs - runtime"
    )
    print(
        f"| --graphs | wall µs/atom | runtime µs/atom | device graphs µs/atom | host µs/atom "
        f"| host cores for {GPU_ATOMS_PER_S} atoms/s |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for graphs, summary in runs:
        atoms = summary.atoms or 1
        wall, model, graph = (summary.seconds / atoms * 1e6, summary.model_seconds / atoms * 1e6,
                              summary.graph_seconds / atoms * 1e6)  # fmt: skip
        host = wall - model - graph
        detail = "workers 0: one core does it all" if graphs == "host" else f"built on {args.device}"
        print(
            f"| {graphs} ({detail}) | {wall:.2f} | {model:.2f} | {graph:.2f} | {host:.2f} "
            f"| {GPU_ATOMS_PER_S * host * 1e-6:.1f} |"
        )
    print(
        f"one GPU at OCP settings needs {GPU_ATOMS_PER_S} atoms/s; target: host <= 2 µs/atom with --graphs device"
    )
    return 0


def feed_rows(samples, args, settings, n_atoms) -> None:
    """The per-batch feed rows: host neighbor_graph + collate against device_feed."""
    first = samples[: args.batch]
    t = time.perf_counter()
    device(first, args.batch, *settings, args.device)
    print(f"first device batch (kernel compile or cache load): {time.perf_counter() - t:.1f} s")
    host(first, args.batch, *settings, True)  # numba's kernel, vesin's buffers

    rows = [
        ("host: neighbor_graph + collate (1 core)", lambda: host(samples, args.batch, *settings, False)),
        (f"device_feed on {args.device}", lambda: device(samples, args.batch, *settings, args.device)),
    ]
    times = {}
    print(f"\n| path | µs/atom (median of {args.repeats}) | atoms/s | cores for {GPU_ATOMS_PER_S} atoms/s |")
    print("| --- | --- | --- | --- |")
    for name, run in rows:
        seconds = statistics.median(run() for _ in range(args.repeats))
        times[name] = seconds
        per_atom = seconds / n_atoms * 1e6
        cores = GPU_ATOMS_PER_S * per_atom * 1e-6
        print(f"| {name} | {per_atom:.2f} | {n_atoms / seconds:,.0f} | {cores:.1f} |")


if __name__ == "__main__":
    raise SystemExit(main())
