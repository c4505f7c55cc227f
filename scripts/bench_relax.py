"""``painn-batch relax`` against ``painn-batch run`` and a sequential loop of ASE FIRE.

    python scripts/bench_relax.py [--structures 200] [--repeats 3] [--ase-structures 200]
                                  [--runtime onnxruntime] [--max-atoms 4096] [--json FILE]

On one file of perturbed fcc bulk (alloys) and slab structures of 20-100
atoms (``--sizes small``: 8-16, ``medium``: 24-48) (the demo model's elements, seeded; slabs with their bottom layer
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

Two more modes (issue 31), instead of the above:

    python scripts/bench_relax.py --host-time [--structures 500] [--repeats 3]
    python scripts/bench_relax.py --file-size [--structures 20000]

``--host-time``: a nearly free model (the demo's graph settings, 1 layer, 8
features, random weights; a gradient-force twin with stress for ``--cell``)
so that what is measured is the pipeline: host µs per atom-step = (wall time
- time inside the runtime) / atom evaluations, for ``relax``, ``relax
--cell`` and ``run`` (per atom). ``--file-size``: the finished relaxation's
file against ``run``'s output plus the relaxation's own datasets
(``positions``, ``cell``, ``steps``, ``fmax``), and the largest the files of
a relaxation get mid-run (the partial output, preallocated, plus the largest
checkpoint sidecar).
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

# --sizes: repeats of the 4-atom cubic fcc cell, and slabs (a, b, layers).
SIZES = {
    "mixed": (  # 20-100 atoms
        ((3, 2, 1), (2, 2, 2), (3, 3, 1), (3, 2, 2), (4, 2, 2), (3, 3, 2), (4, 3, 2)),
        ((3, 3, 3), (3, 3, 4), (4, 4, 3), (4, 4, 4), (4, 4, 5)),
    ),
    "small": (((2, 1, 1), (3, 1, 1), (2, 2, 1)), ((2, 2, 2), (2, 2, 3), (3, 2, 2), (2, 2, 4))),  # 8-16
    "medium": (  # 24-48
        ((3, 2, 1), (2, 2, 2), (3, 3, 1), (5, 2, 1), (4, 3, 1)),
        ((3, 2, 4), (3, 3, 3), (3, 3, 4), (4, 4, 3)),
    ),
}


def structures(n: int, seed: int, sizes: str = "mixed"):
    from make_relax_examples import perturbed

    bulk, slabs = SIZES[sizes]
    rng = np.random.default_rng(seed)
    return [perturbed(k, rng, bulk, slabs) for k in range(n)]


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
        "graph_fraction": summary.skin_seconds / summary.seconds,
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


def free_models(folder: Path, runtime: str) -> tuple[Path, Path]:
    """Two nearly free checkpoints with the demo's graph settings: direct forces, and gradient (stress)."""
    import dataclasses

    import torch

    from painn_export import save_model
    from painn_export.checkpoint import load_model
    from painn_export.demo import demo_model_path
    from painn_export.model import PaiNN

    demo = load_model(demo_model_path())
    tiny = dataclasses.replace(demo.config, num_layers=1, hidden_channels=8, num_rbf=8)
    paths = []
    for name, direct in (("free", True), ("free_stress", False)):
        torch.manual_seed(0)
        model = PaiNN(dataclasses.replace(tiny, direct_forces=direct), demo.normalization).eval()
        if runtime == "onnxruntime":  # exported here, not inside the timed runs
            from painn_export.export import export_onnx

            paths.append(export_onnx(model, folder / f"{name}.onnx", stress=not direct))
        else:
            paths.append(save_model(model, folder / f"{name}.pt"))
    return paths[0], paths[1]


def bench_host(args) -> dict:
    """Host µs per atom-step (wall minus the runtime's time) of relax, relax --cell and run."""
    from pipelines.relax import RelaxSettings, relax_file
    from pipelines.run import run_file

    atoms_list = structures(args.structures, args.seed)
    common = {
        "runtime": args.runtime,
        "device": "cpu",
        "max_atoms": args.max_atoms,
        "workers": args.workers,
        "overwrite": True,
        "progress": False,
    }
    rows: dict[str, list[float]] = {"relax": [], "relax_cell": [], "run": []}
    skin: dict[str, list[float]] = {}  # of the host time: the skin pass (searches included)
    counts = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        free, free_stress = free_models(tmp, args.runtime)
        inp = write(tmp / "in.h5", atoms_list)
        warm = write(tmp / "warm.h5", atoms_list[:2])  # imports, compiled kernels, sessions: not timed
        relax_file(
            warm, tmp / "warm.h5.out", free_stress, settings=RelaxSettings(steps=2, cell=True), **common
        )
        for _ in range(args.repeats):
            for name, model, cell in (("relax", free, False), ("relax_cell", free_stress, True)):
                settings = RelaxSettings(fmax=args.fmax, steps=args.steps, cell=cell)
                summary = relax_file(inp, tmp / f"{name}.h5", model, settings=settings, **common)
                host = summary.seconds - summary.model_seconds
                rows[name].append(1e6 * host / summary.atom_evaluations)
                skin.setdefault(name, []).append(1e6 * summary.skin_seconds / summary.atom_evaluations)
                counts[name] = summary.as_dict()["status_counts"]
                print(f"{name}: {rows[name][-1]:.2f} host us/atom-step", file=sys.stderr)
            summary = run_file(inp, tmp / "run.h5", free, **common)
            rows["run"].append(1e6 * (summary.seconds - summary.model_seconds) / summary.atoms)
    return {
        "host_us_per_atom_step_relax": spread(rows["relax"]),
        "host_us_per_atom_step_relax_cell": spread(rows["relax_cell"]),
        "host_us_per_atom_run": spread(rows["run"]),
        "of_which_skin_us_per_atom_step": {name: spread(v) for name, v in skin.items()},
        "status_counts": counts,
    }


def bench_file_size(args) -> dict:
    """The finished relaxation's file against run's plus the relaxation's datasets; the mid-run peak."""
    import h5py

    from pipelines.relax import RelaxSettings, relax_file
    from pipelines.run import run_file

    atoms_list = structures(min(args.structures, 500), args.seed)
    atoms_list = (atoms_list * (args.structures // len(atoms_list) + 1))[: args.structures]
    common = {"runtime": args.runtime, "device": "cpu", "max_atoms": args.max_atoms}
    common.update(workers=args.workers, overwrite=True, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        free, _ = free_models(tmp, args.runtime)
        inp = write(tmp / "in.h5", atoms_list)
        run_file(inp, tmp / "run.h5", free, **common)
        settings = RelaxSettings(fmax=args.fmax, steps=args.steps)
        summary = relax_file(inp, tmp / "relax.h5", free, settings=settings, **common)
        run_bytes = (tmp / "run.h5").stat().st_size
        relax_bytes = (tmp / "relax.h5").stat().st_size
        with h5py.File(tmp / "relax.h5") as fh:
            own = sum(fh[k].size * fh[k].dtype.itemsize for k in ("positions", "cell", "steps", "fmax"))
    return {
        "structures": args.structures,
        "run_bytes": run_bytes,
        "relax_own_datasets_bytes": int(own),
        "relax_bytes": relax_bytes,
        "relax_over_run_plus_own": round(relax_bytes / (run_bytes + own), 4),
        "largest_mid_run_bytes": relax_bytes + summary.checkpoint_bytes,
        "largest_checkpoint_bytes": summary.checkpoint_bytes,
    }


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
    parser.add_argument("--sizes", choices=sorted(SIZES), default="mixed", help="mixed: 20-100 atoms.")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--host-time", action="store_true", help="Host time per atom-step (issue 31).")
    parser.add_argument("--file-size", action="store_true", help="File sizes (issue 31).")
    args = parser.parse_args()
    if args.host_time or args.file_size:
        report = {
            "machine": f"{platform.machine()}, {platform.processor() or platform.uname().machine}, "
            f"{__import__('os').cpu_count()} logical CPUs",
            "command": "python " + " ".join(sys.argv),
            "runtime": args.runtime,
            **(bench_host(args) if args.host_time else {}),
            **(bench_file_size(args) if args.file_size else {}),
        }
        text = json.dumps(report, indent=1)
        print(text)
        if args.json:
            args.json.write_text(text + "\n")
        return

    atoms_list = structures(args.structures, args.seed, args.sizes)
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
