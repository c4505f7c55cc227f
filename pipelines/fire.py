"""ASE's FIRE optimiser, one structure's state at a time, so that many relax in one batch.

The update rule and its parameters are those of ``ase.optimize.FIRE``
(Bitzek et al., PRL 97, 170201 (2006), as ASE writes it) with its defaults;
the arithmetic is ASE's, in its order, so that a structure's trajectory
follows ASE's with this package's calculator step for step (to the rounding
of the model's forces in another batch). What ASE keeps in its optimiser
object is kept here per structure in a :class:`FireState`: velocities, time
step, mixing ``a``, the count of downhill steps (ASE's ``Nsteps``) and the
steps taken (ASE's ``nsteps``).

Degrees of freedom:

- atoms only: the positions (Å); forces on fixed atoms are zero, as ASE's
  ``FixAtoms`` makes them, so those atoms never move;
- with the cell (``cell=True``): ASE's ``FrechetCellFilter`` with its
  defaults, the ``n + 3`` rows of positions in the undeformed cell and
  ``n log(n F)`` of the deformation gradient ``F`` from the starting cell;
  the cell rows' forces are the Frechet derivative of the energy with respect
  to ``log F``, divided by ``n`` (eV), computed from the stress.

Convergence is ASE's: the largest row norm of these forces (eV/Å on atoms,
eV on the cell rows) below ``fmax``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FireParams:
    """ASE FIRE's parameters and defaults (``dt``, ``dtmax`` in ASE's time unit; ``maxstep`` Å)."""

    dt: float = 0.1
    maxstep: float = 0.2
    dtmax: float = 1.0
    Nmin: int = 5
    finc: float = 1.1
    fdec: float = 0.5
    astart: float = 0.1
    fa: float = 0.99
    a: float = 0.1


@dataclass
class FireState:
    """One structure's relaxation: its geometry and what ASE's FIRE object would hold.

    ``velocity`` is ``[n, 3]`` (``[n + 3, 3]`` with the cell) and zero
    before the first step (ASE: ``vel is None`` while ``steps == 0``).
    """

    positions: np.ndarray  # [n, 3] float64, Å
    cell: np.ndarray  # [3, 3] float64, Å, rows are lattice vectors
    orig_cell: np.ndarray  # [3, 3] float64, Å: the starting cell (FrechetCellFilter's reference)
    fixed: np.ndarray  # [n] bool
    velocity: np.ndarray  # [n (+ 3), 3] float64
    dt: float
    a: float
    n_positive: int = 0  # ASE's Nsteps: downhill steps since the last reset
    steps: int = 0  # ASE's nsteps: steps taken
    # log F [3, 3] at the current cell, from generalized_forces, for the step's own
    # degrees of freedom (one logm a step, not two); None until then. Derived, never saved.
    log_deform: np.ndarray | None = None

    @classmethod
    def start(cls, positions, cell, fixed, params: FireParams, with_cell: bool) -> FireState:
        positions = np.array(positions, dtype=np.float64)
        n = positions.shape[0]
        return cls(
            positions=positions,
            cell=np.array(cell, dtype=np.float64),
            orig_cell=np.array(cell, dtype=np.float64),
            fixed=np.asarray(fixed, dtype=bool).copy(),
            velocity=np.zeros((n + 3 if with_cell else n, 3)),
            dt=float(params.dt),
            a=float(params.a),
        )


def generalized_forces(state: FireState, forces: np.ndarray, stress: np.ndarray | None) -> np.ndarray:
    """The optimiser's forces ``[n, 3]`` (``[n + 3, 3]`` with ``stress``, eV/Å and eV).

    ``forces`` ``[n, 3]`` eV/Å as the model gives them; fixed atoms' rows
    become zero (``FixAtoms``). ``stress`` ``[3, 3]`` eV/Å^3 (None: atoms
    only) is symmetrised as ASE's Voigt form does, then turned into
    ``FrechetCellFilter``'s cell forces.
    """
    f = np.array(forces, dtype=np.float64)
    f[state.fixed] = 0.0
    if stress is None:
        return f
    from scipy.linalg import expm_frechet, logm

    n = f.shape[0]
    stress = np.asarray(stress, dtype=np.float64)
    sym = (stress + stress.T) / 2  # ASE's Voigt round trip
    volume = abs(np.linalg.det(state.cell))
    virial = -volume * sym
    deform = deform_grad(state)
    log_deform = state.log_deform = logm(deform)
    ucf_cell_grad = virial @ np.linalg.inv(deform.T)
    # ASE sums each of the nine directions' derivative L(X, E_mn) against G;
    # L(X, .) is the adjoint of L(X^T, .) (Frobenius product), so the nine
    # sums are the one derivative L(X^T, G): one Fréchet derivative, not nine
    # (equal to rounding; the tests hold it to ASE's steps).
    cell_force = expm_frechet(log_deform.T, ucf_cell_grad, compute_expm=False)
    out = np.zeros((n + 3, 3))
    out[:n] = f @ deform
    out[n:] = cell_force / float(n)
    return out


_blas = {}


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """Within it, BLAS and LAPACK run on one thread (the 3x3 cell algebra of ``--cell``).

    On 3x3 matrices threads only cost: waking OpenBLAS's pool took up to
    30 ms for one ``logm`` (against about 0.1 ms on one thread), and the
    model's runtime competes for the same cores. The limit is set once
    around a batch's steps, not per structure (threadpoolctl's controller is made once).
    """
    from threadpoolctl import ThreadpoolController

    controller = _blas.get("controller")
    if controller is None:
        controller = _blas["controller"] = ThreadpoolController()
    with controller.limit(limits=1, user_api="blas"):
        yield


def max_forces(gforces: list[np.ndarray]) -> np.ndarray:
    """``[B]`` largest row norm of each structure's :func:`generalized_forces` (eV/Å, or eV on cell rows).

    Each value is ``sqrt(max_rows(fx² + fy² + fz²))``, whatever else is in the list.
    """
    if not gforces:
        return np.zeros(0)
    rows = np.array([len(g) for g in gforces], dtype=np.int64)
    f = np.concatenate(gforces)
    square = np.sum(f * f, axis=1)
    out = np.zeros(len(gforces))
    some = rows > 0
    if some.any():
        out[some] = np.sqrt(np.maximum.reduceat(square, (np.cumsum(rows) - rows)[some]))
    return out


def deform_grad(state: FireState) -> np.ndarray:
    """``F`` ``[3, 3]``: the current cell's deformation from the starting one (``cell = orig @ F.T``)."""
    return np.linalg.solve(state.orig_cell, state.cell).T


def _get_x(state: FireState, with_cell: bool) -> np.ndarray:
    """The degrees of freedom ``[n (+ 3), 3]`` (FrechetCellFilter.get_positions with the cell)."""
    if not with_cell:
        return state.positions.copy()
    n = state.positions.shape[0]
    deform = deform_grad(state)
    if state.log_deform is None:  # not from generalized_forces at this cell
        from scipy.linalg import logm

        state.log_deform = logm(deform)
    x = np.zeros((n + 3, 3))
    x[:n] = np.linalg.solve(deform, state.positions.T).T
    # ASE's log(n F) * n, with log(n F) = log F + ln(n) I (n I commutes with F)
    x[n:] = (state.log_deform + np.log(float(n)) * np.eye(3)) * float(n)
    return x


def _set_x(state: FireState, x: np.ndarray, with_cell: bool) -> None:
    """Set positions (and cell) from ``x`` as ASE does, fixed atoms held (FixAtoms.adjust_positions)."""
    if not with_cell:
        new = x.copy()
        new[state.fixed] = state.positions[state.fixed]
        state.positions = new
        return
    from scipy.linalg import expm

    n = state.positions.shape[0]
    new_deform = expm(x[n:] / float(n)) / float(n)
    strain = (new_deform - np.eye(3)).T
    new_cell = state.orig_cell @ (np.eye(3) + strain)
    # Atoms.set_cell(scale_atoms=True): what fixed atoms keep.
    scaled = np.dot(state.positions, np.linalg.solve(state.cell, new_cell))
    new = x[:n] @ (np.eye(3) + strain)
    new[state.fixed] = scaled[state.fixed]
    state.positions, state.cell = new, new_cell


def fire_step(state: FireState, gforces: np.ndarray, params: FireParams, with_cell: bool) -> None:
    """One FIRE step of ``state`` under ``gforces`` (:func:`generalized_forces`), in place."""
    fire_steps([state], [gforces], params, with_cell)


def fire_steps(
    states: list[FireState], gforces: list[np.ndarray], params: FireParams, with_cell: bool
) -> None:
    """One FIRE step of every state under its ``gforces`` (:func:`generalized_forces`), in place.

    The whole batch at once: ASE's three dot products per structure are
    segment sums over the batch's rows, its branches are masks, and its
    arithmetic is ASE's, element for element, in ASE's order (a structure's
    sums differ from ``np.vdot``'s only in rounding: the tests hold the steps
    to ASE's). A structure's numbers do not depend on the others in the batch.
    """
    B = len(states)
    if not B:
        return
    rows = np.array([len(g) for g in gforces], dtype=np.int64)  # [B] n (+ 3)
    start = np.cumsum(rows) - rows
    seg = np.repeat(np.arange(B), rows)  # [R] each row's structure
    f = np.concatenate(gforces).reshape(-1, 3)  # [R, 3]
    vel = np.concatenate([s.velocity for s in states]).reshape(-1, 3)
    dt = np.array([s.dt for s in states], dtype=np.float64)  # [B]
    a = np.array([s.a for s in states], dtype=np.float64)
    n_positive = np.array([s.n_positive for s in states], dtype=np.int64)
    started = np.array([s.steps > 0 for s in states])  # ASE's first step: vel = 0, no downhill test

    def dot(x, y):  # [B] per structure, over its rows
        return np.add.reduceat(np.sum(x * y, axis=1), start)

    vf, grad2, vv = dot(f, vel), dot(f, f), dot(vel, vel)
    up = started & (vf > 0.0)
    down = started & ~(vf > 0.0)
    if up.any():
        r = up[seg]
        ar = a[seg][r, None]
        vel[r] = (1.0 - ar) * vel[r] + ar * f[r] / np.sqrt(grad2[seg][r, None]) * np.sqrt(vv[seg][r, None])
        grow = up & (n_positive > params.Nmin)
        dt[grow] = np.minimum(dt[grow] * params.finc, params.dtmax)
        a[grow] *= params.fa
        n_positive[up] += 1
    if down.any():
        r = down[seg]
        vel[r] = vel[r] * 0.0
        a[down] = params.astart
        dt[down] *= params.fdec
        n_positive[down] = 0
    vel = vel + dt[seg, None] * f
    dr = dt[seg, None] * vel
    normdr = np.sqrt(dot(dr, dr))
    capped = normdr > params.maxstep
    if capped.any():
        r = capped[seg]
        dr[r] = params.maxstep * dr[r] / normdr[seg][r, None]
    if not with_cell:  # _set_x(x + dr) for every structure at once: fixed atoms stay
        x = np.concatenate([s.positions for s in states])
        fixed = np.concatenate([s.fixed for s in states])
        moved = x + dr
        moved[fixed] = x[fixed]
    for s, state in enumerate(states):
        lo, hi = start[s], start[s] + rows[s]
        if with_cell:
            _set_x(state, _get_x(state, with_cell) + dr[lo:hi], with_cell)
        else:
            state.positions = moved[lo:hi]
        state.velocity = vel[lo:hi]
        state.dt, state.a, state.n_positive = float(dt[s]), float(a[s]), int(n_positive[s])
        state.steps += 1
        state.log_deform = None
