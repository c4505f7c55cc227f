"""``painn-batch relax`` against ``painn-batch run`` and a sequential loop of ASE FIRE.

    python scripts/bench_relax.py [--structures 200] [--repeats 3] [--ase-structures 200]
                                  [--runtime onnxruntime] [--max-atoms 4096] [--json FILE]

On one file of perturbed fcc bulk (alloys) and slab structures of 20-100
atoms (the demo model's elements, seeded; slabs with their bottom layer
fixed), with the bundled model:

1. ``painn-batch run`` on the same structures (repeated ``--run-copies``
   times, so that start-up is a small part): wall µs per atom.
2. ``painn-batch relax`` (``--fmax`` 0.05, ``--steps`` 300): wall µs per atom
   per step (an evaluation of a structure's atoms is one atom-step: the
   steps taken plus the first evaluation), structures/s, the fraction of wall
   time in graph building, steps.
3. A sequential loop of ``ase.optimize.FIRE`` with ``PaiNNCalculator`` on the
   same runtime, over the first ``--ase-structures`` structures: structures/s,
   µs per atom per step, steps (the same criterion: ``fmax``, ``steps``).

Each timing is repeated ``--repeats`` times (the ASE loop ``--ase-repeats``);
reported: median and spread (min-max). The model runs with its runtime's
default CPU threads (ONNX Runtime: one per physical core).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

# 20-100 atoms: repeats of the 4-atom cubic fcc cell, and slabs (a, b, layers).
BULK_REPEATS = ((3, 2, 1), (2, 2, 2), (3, 3, 1), (3, 2, 2), (4, 2, 2), (3, 3, 2), (4, 3, 2))
SLAB_SIZES = ((3, 3, 3), (3, 3, 4), (4, 4, 3), (4, 4, 4), (4, 4, 5))


def structures(n: int, seed: int):
    from make_relax_examples import perturbed

    rng = np.random.default_rng(seed)
    return [perturbed(k, rng, BULK_REPEATS, SLAB_SIZES) for k in range(n)]


def write(path: Path, atoms_list, copies: int = 1) -> Path:
    from make_relax_examples import fixed_mask

    from painn_export.schema import write_input

    rows = [(a.numbers, a.positions, a.cell[:], a.pbc) for a in atoms_list] * copies
    return write_input(path, rows, fixed=[fixed_mask(a) for a in atoms_list] * copies)


def spread(values: list[float]) -> dict:
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
        "runs": len(values),
    }


def bench_run(path: Path, out: Path, args) -> float:
    """µs per atom of ``painn-batch run`` (wall)."""
    from pipelines.run import run_file

    summary = run_file(
        path,
        out,
        None,
        runtime=args.runtime,
        device="cpu",
        max_atoms=args.max_atoms,
        workers=args.workers,
        overwrite=True,
        progress=False,
    )
    return 1e6 * summary.seconds / summary.atoms


def bench_relax(path: Path, out: Path, args) -> dict:
    from pipelines.relax import RelaxSettings, relax_file

    settings = RelaxSettings(fmax=args.fmax, steps=args.steps)
    summary = relax_file(
        path,
        out,
        None,
        settings=settings,
        runtime=args.runtime,
        device="cpu",
        max_atoms=args.max_atoms,
        workers=args.workers,
        overwrite=True,
        progress=False,
    )
    report = summary.as_dict()
    import h5py

    with h5py.File(out) as fh:
        steps = fh["steps"][...]
    return {
        "us_per_atom_step": 1e6 * summary.seconds / summary.atom_evaluations,
        "structures_per_s": summary.n_structures / summary.seconds,
        "graph_fraction": summary.graph_seconds / summary.seconds,
        "model_fraction": summary.model_seconds / summary.seconds,
        "seconds": summary.seconds,
        "steps": steps,
        "counts": report["status_counts"],
        "mean_batch_atoms": summary.mean_batch_atoms,
    }


def bench_ase(atoms_list, args) -> dict:
    from ase.optimize import FIRE

    from painn_export.ase import PaiNNCalculator

    calc = PaiNNCalculator.from_file(None, args.runtime, device="cpu")
    calc.calculate(atoms_list[0].copy())  # start the runtime outside the timing
    steps, evaluations = [], 0
    start = time.perf_counter()
    for atoms in atoms_list:
        atoms = atoms.copy()
        atoms.calc = calc
        opt = FIRE(atoms, logfile=None)
        opt.run(fmax=args.fmax, steps=args.steps)
        steps.append(opt.nsteps)
        evaluations += len(atoms) * (opt.nsteps + 1)
    seconds = time.perf_counter() - start
    return {
        "us_per_atom_step": 1e6 * seconds / evaluations,
        "structures_per_s": len(atoms_list) / seconds,
        "seconds": seconds,
        "steps": np.array(steps),
    }


def bench_model(atoms_list, args) -> dict:
    """Model only (``runner.infer`` on prebuilt graphs): µs per atom one structure at a time vs packed.

    The floor under both the batched relaxation and the ASE loop: on a CPU
    the question is whether a packed batch costs less per atom than one
    structure alone.
    """
    from painn_export.batch import collate
    from painn_export.neighbors import neighbor_graph
    from painn_export.runners import open_runner

    runner, facts = open_runner(None, args.runtime, "cpu")
    runner.activate()
    graphs = [
        neighbor_graph(
            a.positions, a.cell[:], a.pbc, facts.cutoff, facts.max_neighbors, atomic_numbers=a.numbers
        )
        for a in atoms_list
    ]
    atoms = sum(g.n_atoms for g in graphs)
    packed, batch = [], []
    for g in graphs:
        if batch and sum(b.n_atoms for b in batch) + g.n_atoms > args.max_atoms:
            packed.append(batch)
            batch = []
        batch.append(g)
    packed.append(batch)
    feeds = {
        "alone": [collate([g], np.float32) for g in graphs],
        "packed": [collate(b, np.float32) for b in packed],
    }
    report = {}
    for name, group in feeds.items():
        runner.infer(group[0])  # warm
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            for feed in group:
                runner.infer(feed)
            times.append(1e6 * (time.perf_counter() - start) / atoms)
        report[name] = spread(times)
    runner.deactivate()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structures", type=int, default=200)
    parser.add_argument("--ase-structures", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ase-repeats", type=int, default=1)
    parser.add_argument("--run-copies", type=int, default=5)
    parser.add_argument("--runtime", default="onnxruntime")
    parser.add_argument("--max-atoms", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--fmax", type=float, default=0.05)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    atoms_list = structures(args.structures, args.seed)
    sizes = [len(a) for a in atoms_list]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        inp = write(tmp / "in.h5", atoms_list)
        many = write(tmp / "many.h5", atoms_list, args.run_copies)
        run_us, relax = [], []
        for _ in range(args.repeats):
            run_us.append(bench_run(many, tmp / "run.h5", args))
            relax.append(bench_relax(inp, tmp / "relax.h5", args))
            print(
                f"run {run_us[-1]:.1f} us/atom, relax {relax[-1]['us_per_atom_step']:.1f} us/atom/step",
                file=sys.stderr,
            )
        k = args.ase_structures
        ase = [bench_ase(atoms_list[:k], args) for _ in range(args.ase_repeats)] if k else []
        model = bench_model(atoms_list, args)
    relax_steps = relax[0]["steps"][:k]
    ase_steps = ase[0]["steps"] if ase else relax_steps
    report = {
        "machine": f"{platform.machine()}, {platform.processor() or platform.uname().machine}, "
        f"{__import__('os').cpu_count()} logical CPUs",
        "command": "python " + " ".join(sys.argv),
        "structures": args.structures,
        "atoms": int(sum(sizes)),
        "atoms_per_structure": [min(sizes), max(sizes)],
        "runtime": args.runtime,
        "run_us_per_atom": spread(run_us),
        "relax_us_per_atom_step": spread([r["us_per_atom_step"] for r in relax]),
        "relax_over_run": round(
            statistics.median([r["us_per_atom_step"] for r in relax]) / statistics.median(run_us), 3
        ),
        "relax_structures_per_s": spread([r["structures_per_s"] for r in relax]),
        "relax_graph_fraction": spread([r["graph_fraction"] for r in relax]),
        "relax_model_fraction": spread([r["model_fraction"] for r in relax]),
        "relax_mean_batch_atoms": round(relax[0]["mean_batch_atoms"], 1),
        "relax_status_counts": relax[0]["counts"],
        "model_only_us_per_atom_alone": model["alone"],
        "model_only_us_per_atom_packed": model["packed"],
        "ase_structures": k,
    }
    if ase:
        report.update(
            {
                "ase_structures_per_s": spread([a["structures_per_s"] for a in ase]),
                "ase_us_per_atom_step": spread([a["us_per_atom_step"] for a in ase]),
                "speedup_structures_per_s": round(
                    statistics.median([r["structures_per_s"] for r in relax])
                    / statistics.median([a["structures_per_s"] for a in ase]),
                    2,
                ),
                "steps_relax_over_ase": round(float(relax_steps.sum()) / float(ase_steps.sum()), 4),
                "steps_equal_fraction": round(float(np.mean(relax_steps == ase_steps)), 3),
                "steps_mean": [round(float(relax_steps.mean()), 1), round(float(ase_steps.mean()), 1)],
            }
        )
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
