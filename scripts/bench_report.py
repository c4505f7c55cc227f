"""Time and memory of ``painn-batch report`` on a large synthetic run output.

    python scripts/bench_report.py --structures 1000000 --atoms 70 --workdir /tmp/bench-report

Writes (once; reused when present with the same sizes) an input file with
reference labels, and a run output computed "from" it (the model's numbers
are the reference plus noise; every structure ok, the fingerprint records
the input's hash), then makes the report in a fresh process and prints its
wall time and peak resident memory (the child's ``ru_maxrss``), with the
machine. ``--atoms`` is the mean atom count (uniform from 1 to 2x-1). The
files take about 80 bytes per atom: 5.6 GB at 70 million atoms.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BLOCK = 1 << 16  # structures written at a time


def make_files(workdir: Path, n_structures: int, mean_atoms: int, seed: int = 0) -> tuple[Path, Path]:
    import h5py

    from painn_export.version import __version__
    from pipelines.output import STATUS, input_sha256

    inp, out = workdir / "input.h5", workdir / "output.h5"
    stamp = workdir / "sizes.json"
    sizes = {"structures": n_structures, "atoms": mean_atoms, "seed": seed}
    if stamp.exists() and json.loads(stamp.read_text()) == sizes and inp.exists() and out.exists():
        return inp, out
    workdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    natoms = rng.integers(1, 2 * mean_atoms, n_structures)
    offsets = np.concatenate([[0], np.cumsum(natoms)]).astype(np.int64)
    n_atoms = int(offsets[-1])
    with h5py.File(inp, "w") as fi, h5py.File(out, "w") as fo:
        fi.create_dataset("atom_offset", data=offsets)
        fi.create_dataset("cell", data=np.broadcast_to(np.eye(3) * 20.0, (n_structures, 3, 3)))
        fi.create_dataset("pbc", data=np.ones((n_structures, 3), bool))
        z = fi.create_dataset("atomic_numbers", (n_atoms,), np.int64)
        pos = fi.create_dataset("positions", (n_atoms, 3), np.float64)
        f_ref = fi.create_dataset("forces", (n_atoms, 3), np.float64)
        fo_forces = fo.create_dataset("forces", (n_atoms, 3), np.float64)
        e_ref = rng.normal(-4.0, 0.5, n_structures) * natoms
        fi.create_dataset("energy", data=e_ref)
        fo.create_dataset("energy", data=e_ref + rng.normal(0, 0.01, n_structures) * natoms)
        for lo in range(0, n_structures, BLOCK):
            hi = min(lo + BLOCK, n_structures)
            a0, a1 = int(offsets[lo]), int(offsets[hi])
            z[a0:a1] = rng.choice([13, 28, 29, 46, 47, 78, 79], a1 - a0)
            pos[a0:a1] = rng.uniform(0, 20, (a1 - a0, 3))
            forces = rng.normal(0, 1.0, (a1 - a0, 3))
            f_ref[a0:a1] = forces
            fo_forces[a0:a1] = forces + rng.normal(0, 0.03, (a1 - a0, 3))
        fo.create_dataset("status", data=np.full(n_structures, STATUS["ok"], np.int8))
        fo.create_dataset("message", data=np.zeros(n_structures, "S160"))
        fo.attrs["status_codes"] = json.dumps(STATUS)
    fingerprint = {
        "input_sha256": input_sha256(inp),
        "n_structures": n_structures,
        "n_atoms": n_atoms,
        "model_sha256": "synthetic",
        "runtime": "synthetic",
        "precision": "float32",
        "stress": False,
        "package_version": __version__,
        "device": "cpu",
        "provider": "cpu",
    }
    with h5py.File(out, "r+") as fo:
        fo.attrs.update({f"fingerprint_{k}": v for k, v in fingerprint.items()})
    stamp.write_text(json.dumps(sizes))
    return inp, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structures", type=int, default=10_000)
    parser.add_argument("--atoms", type=int, default=70, help="mean atoms per structure")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-report"))
    parser.add_argument("--max-points", type=int, default=100_000)
    args = parser.parse_args()
    start = time.perf_counter()
    inp, out = make_files(args.workdir, args.structures, args.atoms)
    made = time.perf_counter() - start
    code = (
        "import sys; from pipelines.report import write_report; "
        "write_report(sys.argv[1], sys.argv[2], sys.argv[3], max_points=int(sys.argv[4]))"
    )
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", code, str(out), str(inp), str(args.workdir / "report"), str(args.max_points)],
        check=True,
    )
    seconds = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # Linux: KiB
    n_atoms = int(np.asarray(__import__("h5py").File(inp)["atom_offset"][-1]))
    print(
        json.dumps(
            {
                "structures": args.structures,
                "atoms": n_atoms,
                "files_GB": round((inp.stat().st_size + out.stat().st_size) / 1e9, 2),
                "files_made_s": round(made, 1),
                "report_s": round(seconds, 1),
                "report_peak_rss_MiB": round(peak_mib),
                "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                f"Python {platform.python_version()}",
            }
        )
    )


if __name__ == "__main__":
    main()
