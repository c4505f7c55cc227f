"""Reading a painn-batch output for its report: checked, then streamed in chunks of structures.

Per-structure values (energies, atom counts, statuses, steps, largest
forces, stresses: a few tens of bytes per structure) are held in memory;
per-atom values (forces, the input's reference forces, atomic numbers) are
read :data:`CHUNK_ATOMS` atoms at a time and never held whole. Scatter
plots keep every point up to ``max_points``, and are 2-D histograms past it
(a second pass over the forces, with the ranges the first one found).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from painn_export.plots import Binned, Points, ReportError
from pipelines.output import SUCCESS, partial_path

CHUNK_ATOMS = 1 << 20  # atoms per read: forces [n, 3] float64 are 24 MB, the input's as much again
CHUNK_STRUCTURES = 1 << 16  # most structures per read
BINS_2D = 200  # per axis, when a parity plot is a histogram
BINS_1D = 120


@dataclass
class Output:
    """An open painn-batch output (read only), checked to be one."""

    path: Path
    fh: object  # h5py.File
    fingerprint: dict  # fingerprint_* attributes without the prefix
    codes: dict[str, int]  # status name -> code, as the file records them
    status: np.ndarray  # [S] int8

    @property
    def kind(self) -> str:
        return "relax" if "steps" in self.fh else "run"

    @property
    def n_structures(self) -> int:
        return int(self.status.shape[0])

    @property
    def pending(self) -> int:
        return int(np.count_nonzero(self.status == self.codes.get("pending", 0)))

    def ok(self, names: set[str]) -> np.ndarray:
        """``[S]`` bool: structures whose status is one of ``names``."""
        return np.isin(self.status, [self.codes[n] for n in names if n in self.codes])

    def close(self) -> None:
        self.fh.close()


def open_output(path: str | Path) -> Output:
    """Open ``path`` read only, or raise :class:`ReportError` saying why it is not a painn-batch output.

    Opened without HDF5's file lock, so that the partial file of a run still
    in progress can be read (statuses are committed after their data).
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        hint = ""
        if path.suffix == ".h5" and partial_path(path).is_file():
            hint = (
                f"; its run has not finished: {partial_path(path)} holds what is done (report on that file)"
            )
        raise ReportError(f"{path}: no such file{hint}")
    try:
        fh = h5py.File(path, "r", locking=False)
    except OSError as exc:
        raise ReportError(f"{path}: not a painn-batch output (not a readable HDF5 file)") from exc
    missing = [name for name in ("energy", "forces", "status") if name not in fh]
    missing += [a for a in ("fingerprint_input_sha256", "status_codes") if a not in fh.attrs]
    if missing:
        fh.close()
        raise ReportError(f"{path}: not a painn-batch output (no {', '.join(missing)})")
    fingerprint = {
        k.removeprefix("fingerprint_"): v.item() if hasattr(v, "item") else v
        for k, v in fh.attrs.items()
        if k.startswith("fingerprint_")
    }
    return Output(path, fh, fingerprint, json.loads(fh.attrs["status_codes"]), fh["status"][...])


def check_input(out: Output, input_path: str | Path):
    """The input's :class:`~painn_export.schema.InputReader`, once its hash is the one ``out`` records."""
    from painn_export.schema import InputReader, SchemaError, validate_input
    from pipelines.output import input_sha256

    try:
        validate_input(input_path)
    except SchemaError as exc:
        raise ReportError(str(exc)) from exc
    if input_sha256(input_path) != str(out.fingerprint["input_sha256"]):
        raise ReportError(
            f"{out.path} was not computed from {input_path} (input fingerprints differ): "
            "give the --input that painn-batch read"
        )
    return InputReader(input_path)


def structure_ranges(offsets: np.ndarray):
    """``(lo, hi)`` ranges of structures with at most CHUNK_ATOMS atoms (or one larger structure)."""
    n = len(offsets) - 1
    lo = 0
    while lo < n:
        hi = int(np.searchsorted(offsets, offsets[lo] + CHUNK_ATOMS, side="right")) - 1
        hi = min(max(hi, lo + 1), lo + CHUNK_STRUCTURES, n)
        yield lo, hi
        lo = hi


def per_structure_max(values: np.ndarray, natoms: np.ndarray) -> np.ndarray:
    """``[len(natoms)]``: the largest of each structure's rows of ``values`` ``[Σn]`` (NaN: no atoms)."""
    out = np.full(len(natoms), np.nan)
    has = natoms > 0
    if values.size and has.any():
        starts = np.concatenate([[0], np.cumsum(natoms)[:-1]])[has]
        out[has] = np.maximum.reduceat(values, starts)  # segments end at the next non-empty start
    return out


def summary_mae(out: Output, input_path, offsets: np.ndarray) -> tuple[float | None, float | None]:
    """The energy (eV/atom) and force (eV/Å) MAE exactly as ``painn-batch run --json`` reports them.

    The run's own function (:func:`pipelines.run.add_mae`) on this file: one
    rule, the same blocks, so the same float64 sums.
    """
    from types import SimpleNamespace

    from pipelines.batches import Summary
    from pipelines.run import add_mae

    summary = Summary(n_structures=out.n_structures)
    add_mae(summary, input_path, SimpleNamespace(fh=out.fh, offsets=offsets))
    return summary.energy_mae_per_atom, summary.forces_mae


@dataclass
class RunScan:
    """What one pass over a run's output (and its input) finds; per-structure arrays are ``[S]``."""

    natoms: np.ndarray
    ok: np.ndarray  # bool: a SUCCESS status
    energy: np.ndarray  # eV
    fmax: np.ndarray  # largest |F| per structure, eV/Å (NaN where not ok)
    stress: np.ndarray | None = None  # [S, 6] eV/Å^3, Voigt order xx yy zz yz xz xy (NaN: none)
    ref_energy: np.ndarray | None = None  # eV, the input's labels
    force_error_max: np.ndarray | None = None  # largest |F - F_ref| per structure, eV/Å
    energy_sq: float = 0.0  # Σ (energy error per atom)^2 over ok structures
    force_sq: float = 0.0  # Σ (force component error)^2 over ok atoms
    force_components: int = 0
    element_abs: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [Z] Σ |component error|
    element_atoms: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # [Z] ok atoms
    force_points: Points | None = None  # (reference, predicted) components, all of them
    force_range: tuple[float, float] = (np.inf, -np.inf)  # over reference and predicted components
    force_error_abs_max: float = 0.0

    @property
    def labelled(self) -> bool:
        return self.ref_energy is not None


_VOIGT = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))


def scan_run(out: Output, reader, max_points: int) -> RunScan:
    """One pass in chunks: per-structure values, and with labels the force errors' sums and ranges."""
    offsets = reader.offsets
    natoms = np.diff(offsets)
    ok = out.ok(SUCCESS)
    labelled = "energy" in reader.fh and "forces" in reader.fh
    scan = RunScan(natoms, ok, out.fh["energy"][...], np.full(len(natoms), np.nan))
    if "stress" in out.fh:
        scan.stress = np.full((len(natoms), 6), np.nan)
    if labelled:
        scan.ref_energy = reader.fh["energy"][...].astype(np.float64)
        scan.force_error_max = np.full(len(natoms), np.nan)
        scan.element_abs = np.zeros(128)
        scan.element_atoms = np.zeros(128, np.int64)
        e_err = (scan.energy - scan.ref_energy)[ok] / natoms[ok]
        scan.energy_sq = float(np.sum(e_err**2))
    keep_points = labelled and 3 * int(natoms[ok].sum()) <= max_points
    points: list[tuple[np.ndarray, np.ndarray]] = []
    for lo, hi in structure_ranges(offsets):
        a0, a1 = int(offsets[lo]), int(offsets[hi])
        n, good = natoms[lo:hi], ok[lo:hi]
        if scan.stress is not None:
            block = out.fh["stress"][lo:hi]
            scan.stress[lo:hi] = np.stack([block[:, i, j] for i, j in _VOIGT], axis=1)
        if not good.any():
            continue
        atom_ok = np.repeat(good, n)
        forces = out.fh["forces"][a0:a1]
        fmax = per_structure_max(np.linalg.norm(forces, axis=1), n)
        scan.fmax[lo:hi] = np.where(good, fmax, np.nan)
        if not labelled:
            continue
        ref_forces = reader.fh["forces"][a0:a1]
        err = forces - ref_forces
        scan.force_error_max[lo:hi] = np.where(
            good, per_structure_max(np.linalg.norm(err, axis=1), n), np.nan
        )
        err_ok = err[atom_ok]
        scan.force_sq += float(np.sum(err_ok**2))
        scan.force_components += err_ok.size
        z = reader.fh["atomic_numbers"][a0:a1][atom_ok]
        scan.element_abs += np.bincount(z, weights=np.abs(err_ok).sum(axis=1), minlength=128)[:128]
        scan.element_atoms += np.bincount(z, minlength=128)[:128]
        pred = forces[atom_ok].ravel()
        ref = ref_forces[atom_ok].ravel()
        if pred.size:
            both = np.concatenate([pred, ref])
            scan.force_range = (min(scan.force_range[0], both.min()), max(scan.force_range[1], both.max()))
            scan.force_error_abs_max = max(scan.force_error_abs_max, float(np.abs(err_ok).max()))
        if keep_points:
            points.append((ref, pred))
    if keep_points:
        ref = np.concatenate([p[0] for p in points]) if points else np.zeros(0)
        pred = np.concatenate([p[1] for p in points]) if points else np.zeros(0)
        scan.force_points = Points(ref, pred)
    return scan


def edges(lo: float, hi: float, bins: int) -> np.ndarray:
    """``bins + 1`` equal bins over ``[lo, hi]`` (widened when the range is a single value)."""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        lo, hi = 0.0, 1.0
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, bins + 1)


def bin_indices(values: np.ndarray, e: np.ndarray) -> np.ndarray:
    """The bin of each value among equal bins ``e`` (the last edge inside the last bin)."""
    i = np.floor((values - e[0]) / (e[1] - e[0])).astype(np.int64)
    return np.clip(i, 0, len(e) - 2)


def histogram2d(x: np.ndarray, y: np.ndarray, x_edges: np.ndarray, y_edges: np.ndarray) -> np.ndarray:
    """Counts ``[nx, ny]`` of the points over equal bins (one bincount, no sort)."""
    nx, ny = len(x_edges) - 1, len(y_edges) - 1
    flat = bin_indices(x, x_edges) * ny + bin_indices(y, y_edges)
    return np.bincount(flat, minlength=nx * ny).reshape(nx, ny)


def histogram1d(values: np.ndarray, e: np.ndarray) -> np.ndarray:
    return np.bincount(bin_indices(values, e), minlength=len(e) - 1)


def force_clouds(out: Output, reader, scan: RunScan) -> tuple[Points | Binned, np.ndarray, np.ndarray]:
    """The force parity cloud, and the histogram of component errors ``(counts, edges)``.

    With every point kept (``scan.force_points``), from them; else a second
    pass over the forces bins them, on the ranges the first pass found.
    """
    m = scan.force_error_abs_max or 1.0
    err_edges = np.linspace(-m, m, BINS_1D + 1)
    if scan.force_points is not None:
        p = scan.force_points
        return p, histogram1d(p.y - p.x, err_edges), err_edges
    f_edges = edges(*scan.force_range, BINS_2D)
    counts = np.zeros((BINS_2D, BINS_2D), np.int64)
    err_counts = np.zeros(BINS_1D, np.int64)
    offsets = reader.offsets
    for lo, hi in structure_ranges(offsets):
        good = scan.ok[lo:hi]
        if not good.any():
            continue
        a0, a1 = int(offsets[lo]), int(offsets[hi])
        atom_ok = np.repeat(good, scan.natoms[lo:hi])
        pred = out.fh["forces"][a0:a1][atom_ok].ravel()
        ref = reader.fh["forces"][a0:a1][atom_ok].ravel()
        counts += histogram2d(ref, pred, f_edges, f_edges)
        err_counts += histogram1d(pred - ref, err_edges)
    return Binned(counts, f_edges, f_edges), err_counts, err_edges


def cloud(x: np.ndarray, y: np.ndarray, max_points: int) -> Points | Binned:
    """Every point up to ``max_points``, else a 2-D histogram over their common range."""
    if len(x) <= max_points:
        return Points(x, y)
    both = np.concatenate([x, y])
    e = edges(float(both.min()), float(both.max()), BINS_2D)
    return Binned(histogram2d(x, y, e, e), e, e)


def free_fmax(out: Output, reader, names: set[str]) -> np.ndarray:
    """``[S]`` largest |F| on a free atom (the input's ``fixed`` held) of structures in ``names``."""
    offsets = reader.offsets
    natoms = np.diff(offsets)
    ok = out.ok(names)
    result = np.full(len(natoms), np.nan)
    for lo, hi in structure_ranges(offsets):
        good = ok[lo:hi]
        if not good.any():
            continue
        a0, a1 = int(offsets[lo]), int(offsets[hi])
        norms = np.linalg.norm(out.fh["forces"][a0:a1], axis=1)
        norms[reader.fixed(lo, hi)] = 0.0
        result[lo:hi] = np.where(good, per_structure_max(norms, natoms[lo:hi]), np.nan)
    return result


@dataclass
class Spread:
    """Percentiles across structures of a quantity at each trajectory frame (from binned counts)."""

    steps: np.ndarray  # [F] the step of each frame
    p10: np.ndarray
    p50: np.ndarray
    p90: np.ndarray
    running: np.ndarray  # [F] structures with a value at that frame

    def first(self, frames: int) -> Spread:
        """The first ``frames`` frames only."""
        return Spread(*(a[:frames] for a in (self.steps, self.p10, self.p50, self.p90, self.running)))


def _percentiles(counts: np.ndarray, centres: np.ndarray, q: float) -> np.ndarray:
    """``[F]``: the ``q`` quantile of each row of ``counts`` ``[F, bins]`` (NaN for an empty row)."""
    total = counts.sum(axis=1)
    cum = np.cumsum(counts, axis=1)
    idx = np.array([np.searchsorted(c, q * t) if t else 0 for c, t in zip(cum, total)], np.int64)
    return np.where(total > 0, centres[np.minimum(idx, len(centres) - 1)], np.nan)


def trajectory_spread(fh, name: str, every: int, natoms: np.ndarray | None, log: bool) -> Spread:
    """The spread of ``trajectory_<name>`` ``[S, F]`` at each frame, in two passes of chunks.

    ``natoms`` given: per atom. ``energy`` is taken relative to each
    structure's first frame. ``log``: log-spaced bins (positive quantities).
    """
    ds = fh[f"trajectory_{name}"]
    n_structures, frames = ds.shape

    rows = max(1, min(CHUNK_STRUCTURES, CHUNK_ATOMS // max(frames, 1)))  # about CHUNK_ATOMS values a read

    def blocks():
        for lo in range(0, n_structures, rows):
            hi = min(lo + rows, n_structures)
            v = ds[lo:hi]
            if name == "energy":
                v = v - v[:, :1]
            if natoms is not None:
                v = v / np.maximum(natoms[lo:hi], 1)[:, None]
            yield v

    lo_v, hi_v = np.inf, -np.inf
    for v in blocks():
        finite = v[np.isfinite(v) & ((v > 0) if log else True)]
        if finite.size:
            lo_v, hi_v = min(lo_v, finite.min()), max(hi_v, finite.max())
    if log:
        lo_v, hi_v = (np.log10(lo_v), np.log10(hi_v)) if np.isfinite(lo_v) else (-3.0, 0.0)
    e = edges(lo_v, hi_v, 4 * BINS_1D)
    counts = np.zeros((frames, len(e) - 1), np.int64)
    for v in blocks():
        finite = np.isfinite(v) & ((v > 0) if log else True)
        values = np.log10(np.where(finite, v, 1.0)) if log else np.where(finite, v, 0.0)
        frame = np.broadcast_to(np.arange(frames), v.shape)
        flat = frame[finite] * (len(e) - 1) + bin_indices(values[finite], e)
        counts += np.bincount(flat, minlength=counts.size).reshape(counts.shape)
    centres = (e[:-1] + e[1:]) / 2
    if log:
        centres = 10**centres
    q = [_percentiles(counts, centres, p) for p in (0.1, 0.5, 0.9)]
    return Spread(np.arange(frames) * every, *q, counts.sum(axis=1))
