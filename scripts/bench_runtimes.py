"""Model-only throughput and peak memory of each runtime, each in its own process.

    python scripts/bench_runtimes.py [--configs demo ocp] [--atoms 1000 10000]
                                     [--repeats 3] [--threads 2] [--json out.json]

For each config (``demo``: the bundled model's size; ``ocp``: hidden 512, 6
layers, 128 rbf, 12 Å, 50 neighbours; random weights, seed 0) and batch size,
one batch of periodic structures of 80-120 atoms (density ~0.07 Å⁻³) is built
(seeded, so every process builds the same one). Each runtime then runs in a
fresh process of its own: one warm-up, ``--repeats`` timed runs, the median
reported, and the peak resident memory of that process (it holds the same
batch and model in every row, so the rows compare). The process also checks
that its repeated runs gave bitwise-identical outputs.

Runtimes, all float32 on the CPU with ``--threads`` threads:

- ``torch_scatter reference``: upstream's aggregation on the flat edge list
  (:mod:`painn_export.reference`), the slow reference;
- ``eager``: the scatter-free model (slot layout) in PyTorch;
- ``onnxruntime``: the default export (slot layout, no scatter) on ONNX
  Runtime's CPU provider;
- ``aoti``: the same graph compiled ahead of time by AOTInductor
  (``painn-export aoti``; compiled once per config in the parent, its compile
  time and package size reported below the table).

Ratios are against eager and the reference of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RUNTIMES = ("reference", "eager", "onnxruntime", "aoti")
LABELS = {
    "reference": "torch_scatter reference (edge list)",
    "eager": "scatter-free eager (slot layout)",
    "onnxruntime": "ONNX Runtime CPU (slot layout)",
    "aoti": "AOTInductor CPU (slot layout)",
}


def make_batch(config, n_atoms: int, seed: int = 0):
    """Structures of ~100 atoms up to ``n_atoms`` in total, as one float32 feed."""
    from painn_export.batch import collate
    from painn_export.neighbors import neighbor_graph
    from painn_export.samples import bulk

    rng = np.random.default_rng(seed)
    elements = np.array([13, 28, 29, 46, 47, 78, 79])
    graphs, total = [], 0
    while total < n_atoms:
        n = int(min(rng.integers(80, 121), max(n_atoms - total, 2)))
        s = bulk(rng, n, elements, spacing=2.42)
        graphs.append(
            neighbor_graph(
                s.positions,
                s.cell,
                s.pbc,
                config.cutoff,
                config.max_neighbors,
                atomic_numbers=s.atomic_numbers,
            )
        )
        total += n
    return collate(graphs, np.float32)


def model_for(name: str):
    import torch

    from painn_export.config import PRESETS
    from painn_export.model import PaiNN

    torch.manual_seed(0)
    return PaiNN(PRESETS[name]).eval()


def machine(threads: int) -> str:
    import onnxruntime
    import torch

    cpu = platform.processor() or platform.machine()
    return (
        f"{cpu}, {os.cpu_count()} cores, {threads} threads, python {platform.python_version()}, "
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}"
    )


def worker(spec: dict) -> dict:
    """One runtime on one batch, in this process: median seconds, peak RSS, determinism."""
    import torch

    torch.set_num_threads(spec["threads"])
    model = model_for(spec["config"])
    feed = make_batch(model.config, spec["atoms"])
    kind = spec["runtime"]
    if kind == "reference":
        from painn_export.reference import reference_forward

        inputs = {
            k: torch.from_numpy(feed[k])
            for k in ("atomic_numbers", "positions", "edge_index", "edge_shift", "system_index", "natoms")
        }
        state = model.state_dict()

        def run():
            with torch.no_grad():
                e, f = reference_forward(state, model.config, model.normalization, **inputs)
            return {"energy": e.numpy(), "forces": f.numpy()}
    else:
        from painn_export.runners import AOTInductorRunner, OnnxRuntimeRunner, TorchRunner

        if kind == "eager":
            runner = TorchRunner(model)
        elif kind == "aoti":
            runner = AOTInductorRunner(spec["aoti"], device="cpu", threads=spec["threads"])
        else:
            runner = OnnxRuntimeRunner(spec["onnx"], threads=spec["threads"])
        runner.activate()

        def run():
            return runner.infer(feed)

    first = run()  # warm-up
    times, bitwise = [], True
    for _ in range(spec["repeats"]):
        t = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - t)
        bitwise &= all(np.array_equal(out[k], first[k]) for k in first)
    return {
        "median_s": statistics.median(times),
        "times_s": times,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "bitwise_repeatable": bool(bitwise),
        "atoms": int(feed["positions"].shape[0]),
        "edges": int(feed["edge_index"].shape[1]),
        "slots": int(feed["neighbors"].shape[1]),
        "structures": len(feed["natoms"]),
        "energy_sum": float(np.sum(first["energy"], dtype=np.float64)),
    }


def run_in_process(spec: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        return {"error": f"exit {proc.returncode}: {tail[:80]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", nargs="+", default=["demo", "ocp"])
    parser.add_argument("--atoms", nargs="+", type=int, default=[1000, 10000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    import torch

    from painn_export.export import export_onnx

    torch.set_num_threads(args.threads)
    print(f"# {time.strftime('%Y-%m-%d')} | {machine(args.threads)}")
    print(f"# python scripts/bench_runtimes.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(
        "| config | atoms | edges | slots/atom | runtime | median | atoms/s | vs eager | vs reference "
        "| peak RSS | repeat bitwise |"
    )
    print("| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    results, compiled = [], []
    for name in args.configs:
        with tempfile.TemporaryDirectory() as tmp:
            onnx_path = aoti_path = None
            if "onnxruntime" in args.runtimes:
                onnx_path = str(export_onnx(model_for(name), Path(tmp) / f"{name}.onnx"))
            if "aoti" in args.runtimes:
                from painn_export.aoti import export_aoti

                start = time.perf_counter()
                aoti_path = str(export_aoti(model_for(name), Path(tmp) / f"{name}.pt2"))
                compiled.append(
                    f"{name}: AOTInductor compile {time.perf_counter() - start:.0f} s (export, compile, "
                    f"check against eager), package {Path(aoti_path).stat().st_size / 1e6:.1f} MB"
                )
            for n_atoms in args.atoms:
                rows = {}
                for kind in args.runtimes:
                    spec = {
                        "config": name,
                        "atoms": n_atoms,
                        "runtime": kind,
                        "repeats": args.repeats,
                        "threads": args.threads,
                        "onnx": onnx_path,
                        "aoti": aoti_path,
                    }
                    rows[kind] = run_in_process(spec)
                eager = rows.get("eager", {}).get("median_s")
                ref = rows.get("reference", {}).get("median_s")
                for kind, r in rows.items():
                    r = {"config": name, "runtime": LABELS[kind], **r}
                    results.append(r)
                    if "error" in r:
                        print(
                            f"| {name} | {n_atoms} | | | {LABELS[kind]} | {r['error']} | | | | | |",
                            flush=True,
                        )
                        continue
                    t = r["median_s"]
                    vs_e = f"{eager / t:.2f}×" if eager else "-"
                    vs_r = f"{ref / t:.2f}×" if ref else "-"
                    print(
                        f"| {name} | {r['atoms']} | {r['edges']} | {r['slots']} | {LABELS[kind]} | "
                        f"{1000 * t:.0f} ms | {r['atoms'] / t:.0f} | {vs_e} | {vs_r} | "
                        f"{r['peak_rss_mb']:.0f} MB | {'yes' if r['bitwise_repeatable'] else 'NO'} |",
                        flush=True,
                    )
    for line in compiled:
        print(f"# {line}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(args.threads), "rows": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
