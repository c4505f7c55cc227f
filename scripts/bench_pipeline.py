"""End-to-end ``painn-batch run`` against model-only throughput, and peak memory vs file size.

    python scripts/bench_pipeline.py [--structures 2000] [--memory-factor 10] [--model PATH]
                                     [--runtime onnxruntime] [--workers N] [--repeats 3]
                                     [--ray [--ray-actors N]] [--ray-plan-only N]

1. Generates a file of periodic bulk, slab and molecular structures of 20-100
   atoms (the demo model's elements; seeded).
2. Model-only: the same structures' graphs built beforehand, packed by the
   pipeline's batcher rule (``--max-atoms``), only ``runner.infer`` timed.
3. End-to-end: ``run_file`` on the file (read, neighbour workers, batching,
   inference, crash-safe writes), wall time.
4. Efficiency = model-only time / end-to-end time (1.0: reading, neighbour
   lists and writing are completely hidden behind inference).
5. Peak resident memory of ``painn-batch run`` in a subprocess on the file
   and on one ``--memory-factor`` times larger (its workers included).
6. ``--ray``: the same run on Ray on this machine, cold (``--ray local``:
   each run starts and stops its own Ray) and warm (a Ray already running,
   as ``--ray auto`` joins on a cluster), each repeat timed; and how fast the
   driver commits what comes back.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ELEMENTS = np.array([13, 28, 29, 46, 47, 78, 79])


def generate(path: Path, n: int, seed: int = 0) -> Path:
    from painn_export.samples import bulk, molecule, slab
    from painn_export.schema import SchemaWriter

    rng = np.random.default_rng(seed)
    makers = (bulk, bulk, slab, molecule)
    with SchemaWriter(path) as writer:
        block = []
        for k in range(n):
            s = makers[k % 4](rng, int(rng.integers(20, 101)), ELEMENTS, spacing=2.5)
            block.append((s.atomic_numbers, s.positions, s.cell, s.pbc, None, None, f"{s.name}-{k}"))
            if len(block) == 1000:
                writer.append(block)
                block = []
        writer.append(block)
    return path


def model_only(path: Path, model: str | None, runtime: str, max_atoms: int, repeats: int) -> float:
    """Median seconds of runner.infer over all batches (graphs and feeds built beforehand)."""
    from painn_export.batch import collate
    from painn_export.runners import open_runner
    from painn_export.schema import InputReader, validate_input
    from pipelines.graphs import GraphSettings, items_from

    runner, facts = open_runner(model, runtime)
    n = validate_input(path).n_structures
    settings = GraphSettings(facts.cutoff, facts.max_neighbors, facts.num_elements)
    with InputReader(str(path)) as reader:
        graphs = [it.graph for it in items_from(reader, settings, np.arange(n)) if it.graph is not None]
    feeds, batch, atoms = [], [], 0
    for g in graphs:
        if batch and atoms + g.n_atoms > max_atoms:
            feeds.append(collate(batch, np.float32))
            batch, atoms = [], 0
        batch.append(g)
        atoms += g.n_atoms
    feeds.append(collate(batch, np.float32))
    times = []
    with runner:
        runner.infer(feeds[0])  # warm-up
        for _ in range(repeats):
            t = time.perf_counter()
            for feed in feeds:
                runner.infer(feed)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def end_to_end(
    path: Path, model, runtime: str, max_atoms: int, workers: int, repeats: int, ray=None
) -> list[float]:
    """Wall seconds of ``run_file``, each repeat (local, or on Ray with ``ray`` options)."""
    from pipelines.run import run_file

    times = []
    for k in range(repeats):
        out = path.with_name(f"{path.stem}.out{k}.h5")
        t = time.perf_counter()
        summary = run_file(
            path, out, model, runtime=runtime, max_atoms=max_atoms, workers=workers, progress=False, ray=ray
        )
        times.append(time.perf_counter() - t)
        assert summary.all_ok, summary.as_dict()
        out.unlink()
    return times


def spread(times: list[float]) -> str:
    """``median s (min-max)`` of repeated wall times."""
    return f"{statistics.median(times):8.2f} s ({min(times):.2f}-{max(times):.2f})"


def driver_commit_rate(
    tmp: Path, atoms: int = 60, batch: int = 512, batches: int = 40
) -> tuple[float, float]:
    """Structures/s and MB/s the Ray driver writes: results of ``atoms``-atom structures, as they come back."""
    import json

    from pipelines.output import Fingerprint, Writer, create
    from pipelines.progress import Progress
    from pipelines.ray_columns import commit, ragged
    from pipelines.run import Summary

    n = batch * batches
    offsets = np.arange(n + 1, dtype=np.int64) * atoms
    path = tmp / "commit.h5"
    create(path, Fingerprint("x", n, int(offsets[-1]), "m", "r", "float32", False, "0"))
    writer, summary, bar = Writer(path, offsets), Summary(n_structures=n), Progress(n, enabled=False)
    rng = np.random.default_rng(0)
    blocks = [
        {
            "index": np.arange(b * batch, (b + 1) * batch, dtype=np.int64),
            "energy": rng.normal(size=batch),
            "forces": ragged([rng.normal(size=(atoms, 3)) for _ in range(batch)]),
            "stress": ragged([np.zeros((0, 3))] * batch),
            "status": np.array(["ok"] * batch, dtype=object),
            "message": np.array([""] * batch, dtype=object),
            "ran_by": np.array([json.dumps({"node": "here", "gpu": ""})] * batch, dtype=object),
            "model_seconds": np.zeros(batch),
        }
        for b in range(batches)
    ]
    t = time.perf_counter()
    for block in blocks:
        commit(block, {}, writer, summary, bar)
    seconds = time.perf_counter() - t
    writer.close()
    return n / seconds, n * atoms * 3 * 8 / seconds / 1e6


def peak_rss_mib(path: Path, model, runtime: str, workers: int) -> float:
    """Peak RSS of `painn-batch run` (MiB): the main process plus its largest worker."""
    probe = (
        "import resource, sys\n"
        "from pipelines.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,"
        " resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
    )
    args = [
        "run",
        str(path),
        "-q",
        "--runtime",
        runtime,
        "--workers",
        str(workers),
        "-o",
        str(path) + ".mem.h5",
    ]
    if model:
        args += ["--model", str(model)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", probe, *args], env=env, capture_output=True, text=True, check=False
    )
    line = [x for x in proc.stderr.splitlines() if x.startswith("RSS")][-1]
    main_kib, child_kib = (int(v) for v in line.split()[1:])
    return (main_kib + child_kib) / 1024


def ray_plan_only(n_structures: int) -> dict:
    """Plan, without running, the Ray job of ``n_structures`` pending structures: time and driver memory.

    Nothing is executed (Ray Data plans lazily); the pending indices go to the
    object store once, and the driver's plan is ``ray.data.range`` over chunk
    numbers. Driver memory is this process's resident set before and after.
    """
    import ray

    from pipelines.batches import Limits
    from pipelines.graphs import GraphSettings
    from pipelines.ray_cluster import RayOptions, connect
    from pipelines.ray_run import RayJob, plan

    def rss_mib() -> float:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    connect(RayOptions("local", cpus=1))
    try:
        before = rss_mib()
        start = time.perf_counter()
        pending = np.arange(n_structures, dtype=np.int64)
        ref = ray.put(pending)
        del pending
        settings, limits = GraphSettings(6.0, 50, 100), Limits(4096, np.inf, np.inf)
        job = RayJob("/nonexistent/in.h5", None, "onnxruntime", None, settings, limits, expected={})
        ds = plan(ray, ref, -(-n_structures // 128), job, RayOptions("local"))
        seconds = time.perf_counter() - start
        after = rss_mib()
        assert ds is not None
    finally:
        ray.shutdown()
    return {"structures": n_structures, "plan_s": seconds, "driver_rss_growth_mib": after - before}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--structures", type=int, default=2000)
    parser.add_argument("--memory-factor", type=int, default=10)
    parser.add_argument("--model", default=None, help="default: the bundled demo model")
    parser.add_argument("--runtime", default="onnxruntime")
    parser.add_argument("--max-atoms", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--ray", action="store_true", help="also run the pipeline on a local Ray")
    parser.add_argument("--ray-actors", type=int, default=1)
    parser.add_argument(
        "--ray-plan-only", type=int, default=None, metavar="N", help="only plan (not run) N structures on Ray"
    )
    args = parser.parse_args(argv)
    if args.ray_plan_only:
        row = ray_plan_only(args.ray_plan_only)
        print(
            f"# python scripts/bench_pipeline.py --ray-plan-only {args.ray_plan_only}\n"
            f"planned {row['structures']} structures in {row['plan_s']:.2f} s; driver memory grew "
            f"{row['driver_rss_growth_mib']:.0f} MiB (the pending indices live in the object store)"
        )
        return 0

    from pipelines.graphs import default_workers

    workers = default_workers() if args.workers is None else args.workers
    print(
        f"# {time.strftime('%Y-%m-%d')} | {os.cpu_count()} cores | python scripts/bench_pipeline.py "
        + " ".join(argv if argv is not None else sys.argv[1:])
    )
    with tempfile.TemporaryDirectory() as tmp:
        small = generate(Path(tmp) / "small.h5", args.structures)
        from painn_export.schema import validate_input

        n_atoms = validate_input(small).n_atoms
        t_model = model_only(small, args.model, args.runtime, args.max_atoms, args.repeats)
        e2e = end_to_end(small, args.model, args.runtime, args.max_atoms, workers, args.repeats)
        t_e2e = statistics.median(e2e)
        rows = {
            "structures": args.structures,
            "atoms": n_atoms,
            "workers": workers,
            "model_only_s": t_model,
            "end_to_end_s": t_e2e,
            "end_to_end_runs_s": e2e,
            "model_only_structures_per_s": args.structures / t_model,
            "end_to_end_structures_per_s": args.structures / t_e2e,
            "efficiency": t_model / t_e2e,
        }
        print(
            f"{args.structures} structures ({n_atoms} atoms), {args.runtime}, {workers} neighbour worker(s)"
        )
        print(f"  model only : {t_model:8.2f} s  {args.structures / t_model:8.1f} structures/s")
        print(f"  end to end : {spread(e2e)}  {args.structures / t_e2e:8.1f} structures/s")
        print(f"  efficiency : {t_model / t_e2e:8.2f}")
        if args.ray:
            from pipelines.ray_cluster import RayOptions, connect

            # Cold: each run starts its own Ray and stops it (--ray local). Warm: a Ray already
            # running that the run joins (--ray auto on a cluster): the actors still start per run.
            cold = RayOptions("local", actors=args.ray_actors, cpus=os.cpu_count())
            warm = RayOptions("auto", actors=args.ray_actors)
            t_cold = end_to_end(small, args.model, args.runtime, args.max_atoms, workers, args.repeats, cold)
            import ray

            connect(cold)
            try:
                t_warm = end_to_end(
                    small, args.model, args.runtime, args.max_atoms, workers, args.repeats, warm
                )
            finally:
                ray.shutdown()
            for name, times in (("ray_cold", t_cold), ("ray_warm", t_warm)):
                median = statistics.median(times)
                rows.update({f"{name}_s": median, f"{name}_runs_s": times})
                print(
                    f"  {name:10} : {spread(times)}  {args.structures / median:8.1f} structures/s "
                    f"({t_e2e / median:.2f}x the local pipeline; {args.ray_actors} actor(s))"
                )
            rate, mbps = driver_commit_rate(Path(tmp))
            rows.update({"driver_commit_structures_per_s": rate})
            print(f"  driver     : commits {rate:8.0f} structures/s of 60 atoms ({mbps:.0f} MB/s of forces)")
        if args.memory_factor > 1:
            big = generate(Path(tmp) / "big.h5", args.structures * args.memory_factor, seed=1)
            rss_small = peak_rss_mib(small, args.model, args.runtime, workers)
            rss_big = peak_rss_mib(big, args.model, args.runtime, workers)
            rows.update({"peak_rss_mib": rss_small, f"peak_rss_mib_x{args.memory_factor}": rss_big})
            print(
                f"  peak RSS   : {rss_small:8.0f} MiB for {args.structures} structures, "
                f"{rss_big:.0f} MiB for {args.structures * args.memory_factor}"
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
