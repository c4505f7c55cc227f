"""``painn-batch run``: structures from HDF5 -> graphs -> batches -> runtime -> HDF5.

This first version runs in one process: it reads the input in chunks of
structures, builds each graph (a structure that cannot be evaluated gets a
status code and the run goes on), packs graphs into batches under an atom
budget, runs them, and writes each batch's energies and forces, then its
statuses, into ``OUT.partial.h5``, renamed to ``OUT`` at the end.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from painn_export.batch import collate
from painn_export.neighbors import StructureError, neighbor_graph
from pipelines.schema import validate_input

# Per-structure status codes written to the output's `status` dataset.
STATUS = {
    "pending": 0,
    "ok": 1,
    "nonfinite_positions": 2,
    "bad_cell": 3,
    "unknown_element": 4,
    "empty_structure": 5,
    "atoms_too_close": 6,
    "nonfinite_output": 7,
    "bad_shape": 8,
}
MIN_SEPARATION = 0.5  # Å; closer atoms are physically meaningless for these models
READ_CHUNK = 512  # structures read from the input at a time


@dataclass
class Summary:
    n_structures: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    energy_mae_per_atom: float | None = None
    forces_mae: float | None = None

    def as_dict(self) -> dict:
        return {
            "n_structures": self.n_structures,
            "status_counts": self.counts,
            "seconds": round(self.seconds, 3),
            "structures_per_s": round(self.n_structures / self.seconds, 2) if self.seconds else None,
            "energy_mae_eV_per_atom": self.energy_mae_per_atom,
            "forces_mae_eV_per_A": self.forces_mae,
        }


def run_file(
    input_path: str | Path,
    output_path: str | Path,
    model_path: str | Path | None = None,
    *,
    runtime: str = "onnxruntime",
    max_atoms: int = 4096,
) -> Summary:
    """Evaluate every structure of ``input_path``; write results to ``output_path``."""
    import h5py

    from painn_export import __version__

    info = validate_input(input_path)
    output_path = Path(output_path)
    partial = output_path.with_name(output_path.stem + ".partial.h5")
    from painn_export.runners import open_runner

    runner, facts = open_runner(model_path, runtime)
    cutoff, max_neighbors, num_elements = facts.cutoff, facts.max_neighbors, facts.num_elements
    summary = Summary(n_structures=info.n_structures)
    start = time.perf_counter()
    with h5py.File(input_path, "r") as src, h5py.File(partial, "w") as dst, runner:
        dst.create_dataset("energy", data=np.full(info.n_structures, np.nan))
        dst.create_dataset("forces", data=np.full((info.n_atoms, 3), np.nan))
        dst.create_dataset("status", data=np.zeros(info.n_structures, np.int8))
        dst.create_dataset("message", shape=(info.n_structures,), dtype=h5py.string_dtype())
        dst.attrs.update(
            {
                "package_version": __version__,
                "model": str(model_path),
                "runtime": runner.name,
                "input": str(input_path),
                "status_codes": json.dumps(STATUS),
                "units_energy": "eV",
                "units_forces": "eV/Angstrom",
            }
        )
        offsets = src["atom_offset"][...]
        pending: list[tuple[int, object]] = []
        pending_atoms = 0

        def flush():
            nonlocal pending, pending_atoms
            if pending:
                _run_batch(runner, pending, offsets, dst)
                dst.flush()
            pending, pending_atoms = [], 0

        for lo in range(0, info.n_structures, READ_CHUNK):
            hi = min(lo + READ_CHUNK, info.n_structures)
            a0, a1 = offsets[lo], offsets[hi]
            z_all, pos_all = src["atomic_numbers"][a0:a1], src["positions"][a0:a1]
            cells, pbcs = src["cell"][lo:hi], src["pbc"][lo:hi]
            for s in range(lo, hi):
                z = z_all[offsets[s] - a0 : offsets[s + 1] - a0].astype(np.int64)
                pos = pos_all[offsets[s] - a0 : offsets[s + 1] - a0]
                kind, message, graph = _graph_or_status(
                    z, pos, cells[s - lo], pbcs[s - lo], cutoff, max_neighbors, num_elements
                )
                if graph is None:
                    dst["status"][s], dst["message"][s] = STATUS[kind], message
                    continue
                if pending_atoms + graph.n_atoms > max_atoms:
                    flush()
                pending.append((s, graph))
                pending_atoms += graph.n_atoms
        flush()
        status = dst["status"][...]
        names = {v: k for k, v in STATUS.items()}
        summary.counts = {names[c]: int(n) for c, n in zip(*np.unique(status, return_counts=True))}
        if info.has_reference:
            _add_mae(summary, src, dst, offsets, status == STATUS["ok"])
    partial.replace(output_path)
    summary.seconds = time.perf_counter() - start
    return summary


def _graph_or_status(z, pos, cell, pbc, cutoff, max_neighbors, num_elements):
    if len(z) == 0:
        return "empty_structure", "structure has no atoms", None
    if z.min() < 1 or z.max() > num_elements:
        return "unknown_element", f"atomic numbers outside 1..{num_elements}: {sorted(set(z.tolist()))}", None
    try:
        graph = neighbor_graph(pos, cell, pbc, cutoff, max_neighbors, atomic_numbers=z)
    except StructureError as exc:
        return exc.kind, str(exc), None
    # Each atom keeps its nearest neighbours through the cap, so the graph
    # already holds every pair closer than MIN_SEPARATION: no second search.
    if len(z) > 1 and graph.n_edges and graph.distances().min() < MIN_SEPARATION:
        return "atoms_too_close", f"atoms closer than {MIN_SEPARATION} Å", None
    if len(z) > 1 and np.unique(np.round(pos, 4), axis=0).shape[0] < len(z):
        return "atoms_too_close", "coincident atoms", None
    return "ok", "", graph


def _run_batch(runner, pending, offsets, dst) -> None:
    feed = collate([g for _, g in pending], np.float32)
    out = runner.infer(feed)
    atom = 0
    for k, (s, g) in enumerate(pending):
        e, f = out["energy"][k], out["forces"][atom : atom + g.n_atoms]
        atom += g.n_atoms
        if not (np.isfinite(e) and np.isfinite(f).all()):
            dst["status"][s], dst["message"][s] = STATUS["nonfinite_output"], "model output is not finite"
            continue
        dst["energy"][s] = e
        dst["forces"][offsets[s] : offsets[s + 1]] = f
        dst["status"][s] = STATUS["ok"]


def _add_mae(summary, src, dst, offsets, ok) -> None:
    if not ok.any():
        return
    natoms = np.diff(offsets)
    e_err = np.abs(dst["energy"][...] - src["energy"][...]) / np.maximum(natoms, 1)
    summary.energy_mae_per_atom = float(np.mean(e_err[ok]))
    atom_ok = np.repeat(ok, natoms)
    summary.forces_mae = float(np.mean(np.abs(dst["forces"][...][atom_ok] - src["forces"][...][atom_ok])))
