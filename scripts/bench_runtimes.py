"""Model-only throughput of every available runtime, compared in one run.

    python scripts/bench_runtimes.py [--configs demo ocp] [--atoms 1000 10000 50000]
                                     [--repeats 5] [--device cpu|cuda] [--json out.json]

For each config (``demo``: the bundled model's size; ``ocp``: hidden 512, 6
layers, 128 rbf, 12 Å, 50 neighbours; random weights) and batch size, one
batch of periodic structures of ~100 atoms (density 0.07 Å⁻³) is built once;
each runtime then runs it ``--repeats`` times after a warm-up, and the table
prints the median wall time, atoms/s, structures/s and the ratio to the
scatter-free eager model and to the torch_scatter reference.

Runtimes: torch_scatter reference (if torch-scatter is installed), scatter-free
eager, ONNX Runtime CPU on both export targets ("trt graph": ScatterElements
sums, what TensorRT takes; "ort graph": ScatterND sums); with ``--device cuda``: PyTorch CUDA eager (fp32,
tf32), ONNX Runtime CUDA and TensorRT (when installed). A runtime that is
unavailable or runs out of memory gets a row saying so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(fn, repeats: int, sync=None) -> float:
    fn()  # warm-up (allocations, kernel selection)
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


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


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    text = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    if torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name()}"
    try:
        import onnxruntime

        text += f", onnxruntime {onnxruntime.__version__}"
    except ImportError:
        pass
    return text


def runtimes(model, onnx_paths, device: str):
    """(name, callable factory) pairs; a factory returns fn(feed) or raises RuntimeError."""
    import torch

    from painn_export.model import INPUT_NAMES
    from painn_export.runners import OnnxRuntimeRunner, TorchRunner

    def reference():
        import torch_scatter  # noqa: F401  (ImportError: the row says n/a)

        from painn_export.reference import reference_forward

        state = {k: v.to(device) for k, v in model.state_dict().items()}

        def run(feed):
            inputs = {k: torch.from_numpy(feed[k]).to(device) for k in INPUT_NAMES}
            with torch.no_grad():
                return reference_forward(state, model.config, model.normalization, **inputs)

        return run

    def eager(dev, tf32=False):
        def make():
            torch.backends.cuda.matmul.allow_tf32 = tf32
            runner = TorchRunner(model, device=dev)
            runner.activate()
            return runner.infer

        return make

    def ort(providers, target):
        def make():
            runner = OnnxRuntimeRunner(onnx_paths(target), providers=providers)
            runner.activate()
            return runner.infer

        return make

    rows = [
        (f"torch_scatter reference ({device})", reference),
        (f"scatter-free eager ({device}, fp32)", eager(device)),
    ]
    if device == "cuda":
        rows.append(("scatter-free eager (cuda, tf32)", eager("cuda", tf32=True)))
        rows.append(("onnxruntime cuda (fp32, ort graph)", ort(["CUDAExecutionProvider"], "onnxruntime")))
    rows.append(("onnxruntime cpu (fp32, trt graph)", ort(["CPUExecutionProvider"], "tensorrt")))
    rows.append(("onnxruntime cpu (fp32, ort graph)", ort(["CPUExecutionProvider"], "onnxruntime")))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", nargs="+", default=["demo", "ocp"])
    parser.add_argument("--atoms", nargs="+", type=int, default=[1000, 10000, 50000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--max-edges", type=int, default=3_000_000, help="skip batches with more edges")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument(
        "--only", nargs="+", default=None, help="run only runtimes whose label contains one of these words"
    )
    args = parser.parse_args(argv)

    import torch

    from painn_export.config import PRESETS
    from painn_export.export import export_onnx
    from painn_export.model import PaiNN

    print(f"# {time.strftime('%Y-%m-%d')} | {machine()}")
    print(f"# python scripts/bench_runtimes.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    header = f"{'config':<6}{'atoms':>7}{'edges':>9}  {'runtime':<36}{'median ms':>11}{'atoms/s':>11}{'struct/s':>10}{'vs eager':>10}{'vs ref':>8}"
    print(header)
    print("-" * len(header))
    results = []
    sync = torch.cuda.synchronize if args.device == "cuda" else None
    for name in args.configs:
        config = PRESETS[name]
        torch.manual_seed(0)
        model = PaiNN(config).eval()
        with tempfile.TemporaryDirectory() as tmp:
            exported: dict[str, Path] = {}

            def onnx_paths(target, model=model, tmp=tmp, name=name, exported=exported):
                """Exported on first use (an ORT row), once per target."""
                if target not in exported:
                    exported[target] = export_onnx(model, Path(tmp) / f"{name}-{target}.onnx", target=target)
                return exported[target]

            for n_atoms in args.atoms:
                feed = make_batch(config, n_atoms)
                n_edges, n_sys = feed["edge_index"].shape[1], len(feed["natoms"])
                if n_edges > args.max_edges:
                    print(
                        f"{name:<6}{n_atoms:>7}{n_edges:>9}  skipped: more than --max-edges {args.max_edges}"
                    )
                    continue
                times = {}
                for label, factory in runtimes(model, onnx_paths, args.device):
                    if args.only and not any(word in label for word in args.only):
                        continue
                    try:
                        fn = factory()
                        times[label] = timed(lambda: fn(feed), args.repeats, sync)
                    except (ImportError, RuntimeError, MemoryError) as exc:
                        times[label] = None
                        reason = str(exc).splitlines()[0][:60]
                        print(
                            f"{name:<6}{feed['positions'].shape[0]:>7}{n_edges:>9}  {label:<36}  n/a: {reason}"
                        )
                    finally:
                        if args.device == "cuda":
                            torch.cuda.empty_cache()
                eager = times.get(f"scatter-free eager ({args.device}, fp32)")
                ref = times.get(f"torch_scatter reference ({args.device})")
                for label, t in times.items():
                    if t is None:
                        continue
                    atoms = feed["positions"].shape[0]
                    row = {
                        "config": name,
                        "atoms": atoms,
                        "edges": n_edges,
                        "structures": n_sys,
                        "runtime": label,
                        "median_s": t,
                        "atoms_per_s": atoms / t,
                        "structures_per_s": n_sys / t,
                        "speedup_vs_eager": eager / t if eager else None,
                        "speedup_vs_reference": ref / t if ref else None,
                    }
                    results.append(row)
                    vs_e = f"{row['speedup_vs_eager']:.2f}x" if eager else "-"
                    vs_r = f"{row['speedup_vs_reference']:.2f}x" if ref else "-"
                    print(
                        f"{name:<6}{atoms:>7}{n_edges:>9}  {label:<36}{1000 * t:>11.1f}{atoms / t:>11.0f}"
                        f"{n_sys / t:>10.1f}{vs_e:>10}{vs_r:>8}",
                        flush=True,
                    )
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "rows": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
