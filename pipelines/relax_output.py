"""What a relaxation writes: its own datasets, its final results, trajectory frames and checkpoints.

The output file is ``run``'s (:class:`~pipelines.output.Writer`) plus the
datasets of :func:`relax_datasets`; :class:`RelaxOutput` commits finished
structures (geometry, steps, ``fmax``, then ``run``'s results and statuses),
writes trajectory frames, and writes and reads the in-flight checkpoint
(:mod:`pipelines.relax_checkpoint`). Members are :mod:`pipelines.relax`'s
structures in flight (``index``, ``state``).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from painn_export.schema import InputReader
from pipelines.fire import FireState
from pipelines.output import RELAXED, STATUS, Writer, write_rows
from pipelines.relax_checkpoint import Checkpoint, Saved, fingerprint_of
from pipelines.relax_checkpoint import read as read_checkpoint
from pipelines.relax_checkpoint import writing as writing_checkpoint


@dataclass
class Finished:
    """A structure's end: its status, message, final state and results (to commit)."""

    index: int
    status: str
    message: str
    state: FireState | None = None
    fmax: float = float("nan")
    energy: float = float("nan")
    forces: np.ndarray | None = None
    stress: np.ndarray | None = None


def relax_datasets(n_structures: int, n_atoms: int, frames: int = 0) -> dict:
    """The relaxation's datasets beyond ``run``'s: ``name -> (shape, dtype, fill)``.

    ``frames`` > 0 (``--trajectory-every N``): frame ``f`` holds step ``f N``.
    """
    sets = {
        "positions": ((n_atoms, 3), np.float64, np.nan),
        "cell": ((n_structures, 3, 3), np.float64, np.nan),
        "steps": ((n_structures,), np.int32, -1),
        "fmax": ((n_structures,), np.float64, np.nan),
    }
    if frames:
        sets.update(
            {
                "trajectory_positions": ((n_atoms, frames, 3), np.float64, np.nan),
                "trajectory_cell": ((n_structures, frames, 3, 3), np.float64, np.nan),
                "trajectory_energy": ((n_structures, frames), np.float64, np.nan),
                "trajectory_fmax": ((n_structures, frames), np.float64, np.nan),
            }
        )
    return sets


def refuse_small_disk(partial: Path, need: int) -> None:
    """One line when the output's folder has less free space than the file will take."""
    free = shutil.disk_usage(partial.parent).free
    if need > free:
        raise ValueError(
            f"{partial} needs {need / 1e9:.2f} GB and {partial.parent} has {free / 1e9:.2f} GB free: "
            "free some space, write the output elsewhere, or keep fewer trajectory frames"
        )


class RelaxOutput:
    """The partial output (final results through :class:`~pipelines.output.Writer`) and its checkpoint."""

    def __init__(self, path: Path, offsets: np.ndarray, ckpt: Path, resumed: bool) -> None:
        self.writer = Writer(path, offsets)
        self.fh = self.writer.fh
        self.offsets = offsets
        self.ckpt = ckpt
        self.resumed = resumed  # trajectory frames of a killed run may lie past a structure's new end
        self.fingerprint = fingerprint_of(self.fh)

    def close(self) -> None:
        self.writer.close()

    def commit(self, done: list[Finished]) -> None:
        """Final results: geometry, steps and fmax, energies and forces, flushed, then statuses."""
        if not done:
            return
        fh, sets = self.fh, self.writer.dataset
        ended = sorted((d for d in done if d.state is not None), key=lambda d: d.index)
        if ended:
            index = np.array([d.index for d in ended], dtype=np.int64)
            positions = np.concatenate([d.state.positions for d in ended])
            write_rows(sets("positions"), index, positions, self.offsets)
            write_rows(sets("cell"), index, np.stack([d.state.cell for d in ended]))
            write_rows(sets("steps"), index, np.array([d.state.steps for d in ended]))
            write_rows(sets("fmax"), index, np.array([d.fmax for d in ended], dtype=np.float64))
            fh.flush()  # before any status, also when none of them has forces (commit_results flushes)
        if self.resumed and "trajectory_energy" in fh:
            self._clear_frames_after(ended)
        rows = [
            (d.index, d.energy, d.forces, d.stress, d.status)
            for d in done
            if d.forces is not None and d.status in ("converged", "not_converged")
        ]
        self.writer.commit_results(rows)  # flushes, then the statuses
        self.writer.commit_status([(d.index, d.status, d.message) for d in done if d.forces is None])

    def _clear_frames_after(self, ended: list[Finished]) -> None:
        """NaN in each structure's frames after its last: a killed run may have gone further."""
        sets, off = self.writer.dataset, self.offsets
        every = int(self.fh.attrs["fingerprint_trajectory_every"])
        frames = sets("trajectory_energy").shape[1]
        for d in ended:
            s, f = d.index, d.state.steps // every + 1
            if f < frames:
                sets("trajectory_positions")[off[s] : off[s + 1], f:] = np.nan
                sets("trajectory_cell")[s, f:] = np.nan
                sets("trajectory_energy")[s, f:] = np.nan
                sets("trajectory_fmax")[s, f:] = np.nan

    def frame(self, m, f: int, energy: float, fmax: float) -> None:
        """Trajectory frame ``f`` of ``m`` (its current geometry); rewritten alike on a resume."""
        sets, off, s = self.writer.dataset, self.offsets, m.index
        sets("trajectory_positions")[off[s] : off[s + 1], f] = m.state.positions
        sets("trajectory_cell")[s, f] = m.state.cell
        sets("trajectory_energy")[s, f] = energy
        sets("trajectory_fmax")[s, f] = fmax

    def checkpoint(self, members: list, next_index: int, calls: int, waiting: list, memory_atoms=None):
        """A context: the members' state written under a temporary name, renamed when it ends well."""
        states = [
            Saved(
                m.index,
                m.state.positions,
                m.state.velocity,
                m.state.cell,
                m.state.dt,
                m.state.a,
                m.state.n_positive,
                m.state.steps,
            )
            for m in members
        ]
        return writing_checkpoint(
            self.ckpt, Checkpoint(states, next_index, calls, waiting, memory_atoms), self.fingerprint
        )

    def restore(self) -> Checkpoint:
        """The checkpoint in force (none: nothing in flight, nothing entered)."""
        off = self.offsets
        return read_checkpoint(self.ckpt, self.fingerprint, lambda s: int(off[s + 1] - off[s]))


def relaxed_reference(reader: InputReader, out: RelaxOutput) -> dict | None:
    """Relaxed energies (and positions) against the input's ``relaxed_energy`` (``relaxed_positions``).

    Over the converged structures: mean and largest absolute energy error
    per atom (eV/atom), mean absolute error of the energy change the
    relaxation brought (relaxed minus the reference's starting ``energy``,
    when the input has it), and the RMS of position differences (Å).
    """
    fh = reader.fh
    if "relaxed_energy" not in fh:
        return None
    status = out.fh["status"][...]
    ok = np.flatnonzero(np.isin(status, [STATUS[k] for k in RELAXED]))
    if not len(ok):
        return {"structures": 0}
    natoms = np.diff(reader.offsets)[ok]
    ours = out.fh["energy"][...][ok]
    ref = fh["relaxed_energy"][...][ok]
    err = np.abs(ours - ref) / natoms
    report = {
        "structures": len(ok),
        "relaxed_energy_mae_eV_per_atom": float(err.mean()),
        "relaxed_energy_max_error_eV_per_atom": float(err.max()),
    }
    if "relaxed_positions" in fh:
        sq, count = 0.0, 0
        for s in ok:
            a0, a1 = reader.offsets[s], reader.offsets[s + 1]
            d = out.fh["positions"][a0:a1] - fh["relaxed_positions"][a0:a1]
            sq += float(np.sum(d * d))
            count += int(a1 - a0)
        report["relaxed_positions_rms_A"] = float(np.sqrt(sq / count))
    return report
