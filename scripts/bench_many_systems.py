"""Peak memory of a run over many tiny systems: the system sums must not grow as atoms × systems.

    python scripts/bench_many_systems.py [--systems 100 10000] [--max-atoms 20000] [--runtime onnxruntime]

For each count, a file of that many two-atom molecules (H2-like, 0.74 Å,
seeded) is evaluated by ``painn-batch run`` (bundled demo model, one batch
when ``--max-atoms`` allows, ``--workers 0``) in a fresh process; its peak
resident memory is reported. The runtime's own size is the peak resident
memory of a process that only opens the same runtime on the model (the
"runtime only" row: the interpreter, its libraries and the session). Before contract version 3 the graph held a one-hot
``[n_atoms, n_systems]`` matrix: 20 000 atoms × 10 000 systems of float32 is
0.8 GB per copy.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def molecules(path: Path, n: int, seed: int = 0) -> Path:
    from painn_export.schema import write_input

    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        pos = np.array([[0.0, 0.0, 0.0], [0.74, 0.0, 0.0]]) + rng.normal(0, 0.02, (2, 3))
        rows.append((np.array([29, 29]), pos * 3.0, np.zeros((3, 3)), np.zeros(3, bool)))
    return write_input(path, rows)


def peak_rss_mib(args: list[str]) -> tuple[float, float]:
    """Peak RSS (MiB) and wall seconds of ``painn-batch ARGS`` in a child process."""
    code = (
        "import resource, sys; from pipelines.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024, time.perf_counter() - start


def runtime_only_mib(runtime: str) -> float:
    """Peak RSS (MiB) of a child process that opens and starts ``runtime`` on the demo model, and no more."""
    code = (
        "import resource, sys; from painn_export.runners import open_runner\n"
        "runner, _ = open_runner(None, sys.argv[1], 'cpu'); runner.activate()\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", code, runtime], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--systems", nargs="+", type=int, default=[100, 10_000])
    parser.add_argument("--max-atoms", type=int, default=20_000)
    parser.add_argument("--runtime", default="onnxruntime")
    args = parser.parse_args(argv)
    print(
        f"# {time.strftime('%Y-%m-%d')} | {os.cpu_count()} cores | python scripts/bench_many_systems.py "
        + " ".join(argv if argv is not None else sys.argv[1:])
    )
    print("| systems | atoms | peak RSS | wall |")
    print("| ---: | ---: | ---: | ---: |")
    print(f"| runtime only | 0 | {runtime_only_mib(args.runtime):.0f} MiB | |", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.systems:
            inp = molecules(Path(tmp) / f"m{n}.h5", n)
            run = ["run", str(inp), "-o", str(Path(tmp) / f"o{n}.h5"), "--runtime", args.runtime]
            run += ["--max-atoms", str(args.max_atoms), "--workers", "0", "-q"]
            rss, wall = peak_rss_mib(run)
            print(f"| {n} | {2 * n} | {rss:.0f} MiB | {wall:.1f} s |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
