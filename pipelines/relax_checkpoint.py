"""A relaxation's checkpoint: the optimiser state of the structures in flight, in a sidecar file.

``OUT.ckpt.h5`` beside the partial output holds only what is in flight (its
size follows the batch, not the input) and is written whole each time: a
temporary file, then a rename onto the name (:func:`painn_export.files.written_whole`),
so the name always holds one complete checkpoint. It goes when the run
ends; a finished output holds nothing of it.

==================  =======  ===============  ===============================================
``index``           int64    ``[m]``          the structures in flight, in batch order
``rows``            int64    ``[m]``          optimiser rows of each: its atoms (+ 3 with ``--cell``)
``positions``       float64  ``[Σn, 3]``      Å, each structure's atoms in turn
``velocity``        float64  ``[Σrows, 3]``   FIRE's velocities (cell rows after the atoms)
``cell``            float64  ``[m, 3, 3]``    Å
``scalars``         float64  ``[m, 4]``       ``dt``, ``a``, downhill steps (ASE's Nsteps), steps taken
``waiting``         int64    ``[w, 2]``       structures taken from the input that wait to enter
                                              (input order): index, times passed
==================  =======  ===============  ===============================================

Attributes: ``next_index`` (the next structure to take from the input),
``memory_atoms`` (the atom budget a memory failure left, -1: none), ``calls`` (model
calls so far) and ``fingerprint`` (the partial output's, as JSON): a
checkpoint is only ever read back with the partial file it was written for.

The order that makes a kill at any moment safe is the caller's
(:meth:`pipelines.relax._Loop._checkpoint`): write the checkpoint under its
temporary name, commit the results finished since the last one to the
partial output, then rename. A run killed before the rename resumes from the
previous checkpoint, whose structures it evaluates again, to the same numbers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from painn_export.files import WatchedFile, remove_stale_temporaries, written_whole


def checkpoint_path(output: Path) -> Path:
    """Where a relaxation on ``output`` keeps its checkpoint while it runs."""
    return output.with_name(output.name.removesuffix(".h5") + ".ckpt.h5")


@dataclass
class Saved:
    """One structure's optimiser state as a checkpoint holds it."""

    index: int
    positions: np.ndarray  # [n, 3] float64, Å
    velocity: np.ndarray  # [n (+ 3), 3] float64
    cell: np.ndarray  # [3, 3] float64, Å
    dt: float
    a: float
    n_positive: int
    steps: int


@dataclass
class Checkpoint:
    states: list[Saved]  # in batch order
    next_index: int = 0  # the next structure to take from the input
    calls: int = 0  # model calls so far
    waiting: list[tuple[int, int]] = field(default_factory=list)  # (index, times passed), input order
    memory_atoms: int | None = None  # the atom budget a memory failure left (batches.Summary)


def fingerprint_of(fh) -> str:
    """The fingerprint attributes of an open partial output, as one JSON string."""
    attrs = {k: fh.attrs[k] for k in sorted(fh.attrs) if k.startswith("fingerprint_")}
    return json.dumps({k: v.item() if hasattr(v, "item") else v for k, v in attrs.items()})


def discard(path: Path) -> None:
    """Remove a checkpoint and any temporary left beside it (a new partial output starts)."""
    remove_stale_temporaries(path)
    path.unlink(missing_ok=True)


@contextmanager
def writing(path: Path, checkpoint: Checkpoint, fingerprint: str):
    """Write ``checkpoint`` under a temporary name; the block's end renames it onto ``path``.

    Seven datasets and four attributes, each written once. On any failure
    inside the block the temporary goes and ``path`` keeps the previous checkpoint.
    """
    import h5py

    states = checkpoint.states
    with written_whole(path) as tmp:
        with WatchedFile(tmp, "w+") as raw:
            fh = h5py.File(raw, "w")
            try:
                fh.attrs["next_index"] = checkpoint.next_index
                fh.attrs["calls"] = checkpoint.calls
                fh.attrs["memory_atoms"] = -1 if checkpoint.memory_atoms is None else checkpoint.memory_atoms
                fh.attrs["fingerprint"] = fingerprint
                fh["index"] = np.array([s.index for s in states], np.int64)
                fh["rows"] = np.array([s.velocity.shape[0] for s in states], np.int64)
                fh["positions"] = _stack([s.positions for s in states], (0, 3))
                fh["velocity"] = _stack([s.velocity for s in states], (0, 3))
                fh["cell"] = _stack([s.cell[None] for s in states], (0, 3, 3))
                fh["scalars"] = np.array(
                    [[s.dt, s.a, s.n_positive, s.steps] for s in states], np.float64
                ).reshape(-1, 4)
                fh["waiting"] = np.array(checkpoint.waiting, np.int64).reshape(-1, 2)
            finally:
                fh.close()
            raw.check(path)
        yield


def _stack(arrays: list[np.ndarray], empty: tuple[int, ...]) -> np.ndarray:
    return np.concatenate(arrays).astype(np.float64) if arrays else np.zeros(empty)


def read(path: Path, fingerprint: str, n_atoms: Callable[[int], int]) -> Checkpoint:
    """The checkpoint at ``path`` (none there: nothing in flight, nothing entered yet).

    ``n_atoms(s)``: structure ``s``'s atoms. A checkpoint written for another
    partial output is refused (ValueError), never silently used.
    """
    import h5py

    if not path.exists():
        return Checkpoint([])
    with h5py.File(path, "r") as fh:
        if fh.attrs["fingerprint"] != fingerprint:
            raise ValueError(
                f"{path} is the checkpoint of another run (its fingerprint differs from the partial "
                "output's): delete it, or start over with --overwrite"
            )
        index, rows = fh["index"][...], fh["rows"][...]
        positions, velocity = fh["positions"][...], fh["velocity"][...]
        cell, scalars = fh["cell"][...], fh["scalars"][...]
        waiting = [(int(s), int(p)) for s, p in fh["waiting"][...]] if "waiting" in fh else []
        memory = int(fh.attrs.get("memory_atoms", -1))
        out = Checkpoint(
            [], int(fh.attrs["next_index"]), int(fh.attrs["calls"]), waiting, None if memory < 0 else memory
        )
    atom = row = 0
    for k, s in enumerate(index.tolist()):
        n, r = n_atoms(s), int(rows[k])
        dt, a, n_positive, steps = scalars[k]
        out.states.append(
            Saved(
                s,
                positions[atom : atom + n],
                velocity[row : row + r],
                cell[k],
                float(dt),
                float(a),
                int(n_positive),
                int(steps),
            )
        )
        atom, row = atom + n, row + r
    return out
