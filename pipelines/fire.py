"""ASE's FIRE optimiser for a whole batch of structures at once, each with its own state.

The update rule and its parameters are those of ``ase.optimize.FIRE``
(Bitzek et al., PRL 97, 170201 (2006), as ASE writes it) with its defaults,
its element-wise arithmetic in its order, so that a structure's trajectory
follows ASE's with this package's calculator step for step, to rounding
(the tolerance table's ``fire_vs_ase``). :func:`fire_steps` and
:func:`generalized_forces_many` run over the whole batch in compiled loops
(:mod:`pipelines._fire_kernel`); :func:`fire_steps_reference` and
:func:`generalized_forces_reference` are the same in numpy (dot products as
segment sums over the batch, branches as masks, the cell's matrix functions
:mod:`pipelines.matrix_functions`' on stacks), the references the loops are
tested against: the atoms' steps bit for bit, the cell's to rounding. What ASE keeps in its optimiser
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

from dataclasses import dataclass

import numpy as np

from pipelines.matrix_functions import expm, expm_frechet, logm


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
    ``FrechetCellFilter``'s cell forces. :func:`generalized_forces_many` of one.
    """
    return generalized_forces_many([state], [forces], None if stress is None else [stress])[0]


class CellAlgebraError(np.linalg.LinAlgError):
    """Structures whose cell step has no answer: a deformation without a logarithm (a cell turned
    inside out), or a cell without a finite inverse. ``positions``: their places in the batch."""

    def __init__(self, positions: list[int], what: str) -> None:
        self.positions, self.what = positions, what
        super().__init__(f"structures at batch positions {positions}: {what}")


@dataclass(frozen=True, eq=False)
class Rows:
    """Each structure's rows of one ``[R, 3]`` array, one structure after another.

    ``values`` ``[R, 3]`` float64; structure ``s``'s rows are
    ``start[s]:start[s + 1]`` (``start`` ``[B + 1]`` int64). Read as a list:
    ``len`` is ``B`` and ``rows[s]`` is structure ``s``'s rows (a view).
    """

    values: np.ndarray
    start: np.ndarray

    @classmethod
    def of(cls, arrays) -> Rows:
        """Rows holding ``arrays`` (a list of ``[n, 3]``, copied; a Rows is returned as it is)."""
        if isinstance(arrays, Rows):
            return arrays
        arrays = [np.asarray(x, dtype=np.float64) for x in arrays]
        if any(x.ndim != 2 or x.shape[1] != 3 for x in arrays):
            raise ValueError("Rows take [n, 3] arrays")
        values = np.concatenate(arrays) if arrays else np.zeros((0, 3), dtype=np.float64)
        return cls(values, _starts(np.array([len(x) for x in arrays], dtype=np.int64)))

    def __len__(self) -> int:
        return len(self.start) - 1

    def __getitem__(self, s: int) -> np.ndarray:
        return self.values[self.start[s] : self.start[s + 1]]

    def __iter__(self):
        return (self[s] for s in range(len(self)))

    def take(self, which: np.ndarray) -> Rows:
        """The structures ``which`` (``[b]`` indices), in that order (all of them: this Rows itself)."""
        which = np.asarray(which, dtype=np.int64)
        if len(which) == len(self) and np.array_equal(which, np.arange(len(self))):
            return self
        from pipelines.device_batches import atom_rows

        counts = np.diff(self.start)[which]
        return Rows(self.values[atom_rows(self.start[:-1][which], counts)], _starts(counts))


def _starts(counts: np.ndarray) -> np.ndarray:
    """``[B + 1]`` int64: where each of ``counts`` ``[B]`` rows start, and the end."""
    start = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=start[1:])
    return start


def _atoms_of(states: list[FireState]) -> np.ndarray:
    """``[B]`` int64 each state's atoms (at least one: a structure without atoms has no step)."""
    natoms = np.array([len(s.positions) for s in states], dtype=np.int64)
    if np.any(natoms == 0):
        raise ValueError("FIRE steps structures with atoms; one has none")
    return natoms


def generalized_forces_many(
    states: list[FireState], forces: list[np.ndarray], stresses: list[np.ndarray] | None
) -> Rows:
    """:func:`generalized_forces` of each structure, for the whole batch in compiled loops
    (:mod:`pipelines._fire_kernel`; :func:`generalized_forces_reference` is the numpy reference).

    ``forces`` ``[n, 3]`` eV/Å per structure, ``stresses`` ``[3, 3]`` eV/Å³
    (None: atoms only). Returns each structure's ``n`` rows (eV/Å), then with
    ``stresses`` its 3 cell rows (eV): ``[Σ n (+ 3), 3]`` float64. Each
    state's ``log_deform`` is set (with ``stresses``), for its step. Raises
    :class:`CellAlgebraError` naming the structures whose cell has no step
    (the states are then unchanged).
    """
    from pipelines import _fire_kernel as kernel

    B = len(states)
    if not B:
        return Rows(np.zeros((0, 3), dtype=np.float64), np.zeros(1, dtype=np.int64))
    natoms = _atoms_of(states)
    f = [np.asarray(x, dtype=np.float64) for x in forces]
    if len(f) != B or any(x.shape != (n, 3) for x, n in zip(f, natoms.tolist())):
        raise ValueError("generalized_forces_many: each structure takes [n, 3] forces")
    f = np.concatenate(f)  # [N, 3] own copy
    fixed = np.concatenate([s.fixed for s in states])
    if fixed.shape != (len(f),):
        raise ValueError("generalized_forces_many: each state's fixed mask is [n]")
    if stresses is None:
        f[fixed] = 0.0
        return Rows(f, _starts(natoms))
    stress = np.array(stresses, dtype=np.float64).reshape(B, 3, 3)
    cells = np.array([s.cell for s in states], dtype=np.float64)
    orig = np.array([s.orig_cell for s in states], dtype=np.float64)
    out = np.empty((len(f) + 3 * B, 3), dtype=np.float64)
    log_deform = np.empty((B, 3, 3), dtype=np.float64)
    ok = np.empty(B, dtype=np.bool_)
    kernel.cell_forces(f, fixed, natoms, stress, cells, orig, out, log_deform, ok)
    if not ok.all():
        raise CellAlgebraError(
            np.flatnonzero(~ok).tolist(), "the deformation has no logarithm (a cell turned inside out?)"
        )
    for state, log in zip(states, log_deform):
        state.log_deform = log
    return Rows(out, _starts(natoms + 3))


def generalized_forces_reference(
    states: list[FireState], forces: list[np.ndarray], stresses: list[np.ndarray] | None
) -> list[np.ndarray]:
    """:func:`generalized_forces_many` in numpy: each structure's rows, the cell algebra stacked
    (:mod:`pipelines.matrix_functions`); the reference the compiled loops are tested against."""
    out = []
    for state, f in zip(states, forces):
        f = np.array(f, dtype=np.float64)
        f[state.fixed] = 0.0
        out.append(f)
    if stresses is None or not states:
        return out
    cell = np.array([s.cell for s in states])  # [B, 3, 3]
    stress = np.array(stresses, dtype=np.float64).reshape(-1, 3, 3)
    sym = (stress + stress.transpose(0, 2, 1)) / 2  # ASE's Voigt round trip
    virial = -np.abs(np.linalg.det(cell))[:, None, None] * sym
    deform = deform_grads(states)
    log_deform = logm(deform)
    ucf_cell_grad = virial @ np.linalg.inv(deform.transpose(0, 2, 1))
    # ASE sums each of the nine directions' derivative L(X, E_mn) against G;
    # L(X, .) is the adjoint of L(X^T, .) (Frobenius product), so the nine
    # sums are the one derivative L(X^T, G): one Fréchet derivative, not nine
    # (equal to rounding; the tests hold it to ASE's steps).
    cell_force = expm_frechet(log_deform.transpose(0, 2, 1), ucf_cell_grad)
    for b, (state, f) in enumerate(zip(states, out)):
        state.log_deform = log_deform[b]
        n = f.shape[0]
        full = np.empty((n + 3, 3))
        full[:n] = f @ deform[b]
        full[n:] = cell_force[b] / float(n)
        out[b] = full
    return out


def max_forces(gforces: Rows | list[np.ndarray]) -> np.ndarray:
    """``[B]`` largest row norm of each structure's :func:`generalized_forces` (eV/Å, or eV on cell rows).

    Each value is ``sqrt(max_rows(fx² + fy² + fz²))``, whatever else is in the list.
    """
    if not len(gforces):
        return np.zeros(0)
    gforces = Rows.of(gforces)
    rows = np.diff(gforces.start)
    f = gforces.values
    square = np.sum(f * f, axis=1)
    out = np.zeros(len(gforces))
    some = rows > 0
    if some.any():
        out[some] = np.sqrt(np.maximum.reduceat(square, (np.cumsum(rows) - rows)[some]))
    return out


def deform_grads(states: list[FireState]) -> np.ndarray:
    """``F`` ``[B, 3, 3]``: each current cell's deformation from its starting one (``cell = orig @ F.T``)."""
    orig = np.array([s.orig_cell for s in states])
    return np.linalg.solve(orig, np.array([s.cell for s in states])).transpose(0, 2, 1)


def _step_cells(states: list[FireState], dr: np.ndarray, rows: np.ndarray) -> None:
    """``FrechetCellFilter``'s ``set_positions(get_positions() + dr)`` for every structure at once.

    ``dr`` ``[R, 3]``: each structure's ``n`` atom rows, then its 3 cell rows.
    Fixed atoms keep their fractional coordinates (``Atoms.set_cell(scale_atoms=True)``
    then ``FixAtoms.adjust_positions``).
    """
    B = len(states)
    natoms = rows - 3
    start = np.cumsum(rows) - rows
    atom_rows = np.concatenate([np.arange(s, s + n) for s, n in zip(start, natoms)])
    cell_rows = (start[:, None] + natoms[:, None] + np.arange(3)).ravel()
    of_atom = np.repeat(np.arange(B), natoms)  # [N] each atom's structure
    n = natoms.astype(np.float64)[:, None, None]
    eye = np.eye(3)
    deform = deform_grads(states)
    log_deform = np.array([s.log_deform for s in states]) if all(
        s.log_deform is not None for s in states
    ) else logm(deform)  # fmt: skip
    positions = np.concatenate([s.positions for s in states])  # [N, 3]
    # get_positions: atoms in the undeformed cell, and ASE's log(n F) n = (log F + ln(n) I) n.
    x_atoms = np.einsum("aij,aj->ai", np.linalg.inv(deform)[of_atom], positions)
    x_cell = (log_deform + np.log(n) * eye) * n
    # set_positions
    x_atoms = x_atoms + dr[atom_rows]
    x_cell = x_cell + dr[cell_rows].reshape(B, 3, 3)
    new_deform = expm(x_cell / n) / n
    strain = eye + (new_deform - eye).transpose(0, 2, 1)  # [B, 3, 3] I + strain
    cell = np.array([s.cell for s in states])
    new_cell = np.array([s.orig_cell for s in states]) @ strain
    scale = np.linalg.solve(cell, new_cell)  # what fixed atoms keep: their fractional coordinates
    scaled = np.einsum("aj,ajk->ak", positions, scale[of_atom])
    moved = np.einsum("aj,ajk->ak", x_atoms, strain[of_atom])
    fixed = np.concatenate([s.fixed for s in states])
    moved[fixed] = scaled[fixed]
    for b, state in enumerate(states):
        a0 = start[b] - 3 * b
        state.positions, state.cell = moved[a0 : a0 + natoms[b]], new_cell[b]


def fire_step(state: FireState, gforces: np.ndarray, params: FireParams, with_cell: bool) -> None:
    """One FIRE step of ``state`` under ``gforces`` (:func:`generalized_forces`), in place."""
    fire_steps([state], [gforces], params, with_cell)


def fire_steps(
    states: list[FireState], gforces: Rows | list[np.ndarray], params: FireParams, with_cell: bool
) -> None:
    """One FIRE step of every state under its ``gforces`` (:func:`generalized_forces`), in place.

    The whole batch in compiled loops, one structure at a time
    (:mod:`pipelines._fire_kernel`): the same bits as
    :func:`fire_steps_reference` for the atoms, and its cell step to rounding.
    A structure's numbers do not depend on the others in the batch.
    """
    from pipelines import _fire_kernel as kernel

    B = len(states)
    if not B:
        return
    gforces = Rows.of(gforces)
    start = gforces.start
    natoms = _atoms_of(states)
    rows = natoms + (3 if with_cell else 0)
    vel = np.concatenate([s.velocity for s in states])  # [R, 3] own copy, updated
    positions = np.concatenate([s.positions for s in states])  # [N, 3]
    fixed = np.concatenate([s.fixed for s in states])
    if len(gforces) != B or not np.array_equal(np.diff(start), rows):
        raise ValueError("fire_steps: each structure takes its n (+ 3 with the cell) rows of forces")
    R = int(start[-1])
    if vel.shape != (R, 3) or gforces.values.shape != (R, 3) or fixed.shape != (len(positions),):
        raise ValueError("fire_steps: a velocity is not [n (+ 3 with the cell), 3] or a fixed mask not [n]")
    dt = np.array([s.dt for s in states], dtype=np.float64)  # [B]
    a = np.array([s.a for s in states], dtype=np.float64)
    n_positive = np.array([s.n_positive for s in states], dtype=np.int64)
    started = np.array([s.steps > 0 for s in states], dtype=np.bool_)  # ASE's first step: no downhill test
    dr = np.empty_like(vel)
    p = params
    kernel.fire_rows(
        gforces.values, vel, start, dt, a, n_positive, started, dr,
        p.Nmin, p.finc, p.fdec, p.dtmax, p.astart, p.fa, p.maxstep,
    )  # fmt: skip
    moved = np.empty_like(positions)
    if with_cell:
        cells = np.array([s.cell for s in states], dtype=np.float64)
        orig = np.array([s.orig_cell for s in states], dtype=np.float64)
        ok = np.empty(B, dtype=np.bool_)
        if all(s.log_deform is not None for s in states):
            log_deform = np.array([s.log_deform for s in states], dtype=np.float64)
        else:  # not from generalized_forces_many's call on these states
            log_deform = np.empty((B, 3, 3), dtype=np.float64)
            kernel.log_deforms(cells, orig, log_deform, ok)
            if not ok.all():
                raise CellAlgebraError(np.flatnonzero(~ok).tolist(), "the deformation has no logarithm")
        new_cells = np.empty((B, 3, 3), dtype=np.float64)
        kernel.step_cells(positions, fixed, natoms, dr, start, cells, orig, log_deform, moved, new_cells, ok)
        if not ok.all():
            raise CellAlgebraError(np.flatnonzero(~ok).tolist(), "a cell without a finite inverse")
    else:  # positions + dr; fixed atoms stay (FixAtoms.adjust_positions)
        kernel.move_atoms(positions, dr, fixed, moved)
    bounds = start.tolist()
    atoms = _starts(natoms).tolist()
    cells_after = list(new_cells) if with_cell else [None] * B
    for s, (state, h, mix, count, cell) in enumerate(
        zip(states, dt.tolist(), a.tolist(), n_positive.tolist(), cells_after)
    ):
        state.positions = moved[atoms[s] : atoms[s + 1]]
        if with_cell:
            state.cell = cell
        state.velocity = vel[bounds[s] : bounds[s + 1]]
        state.dt, state.a, state.n_positive = h, mix, count
        state.steps += 1
        state.log_deform = None


def fire_steps_reference(
    states: list[FireState], gforces: list[np.ndarray], params: FireParams, with_cell: bool
) -> None:
    """:func:`fire_steps` in numpy, the reference its compiled loops are tested against.

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
    if with_cell:
        _step_cells(states, dr, rows)
    else:  # positions + dr for every structure at once; fixed atoms stay (FixAtoms.adjust_positions)
        x = np.concatenate([s.positions for s in states])
        fixed = np.concatenate([s.fixed for s in states])
        moved = x + dr
        moved[fixed] = x[fixed]
    for s, state in enumerate(states):
        lo, hi = start[s], start[s] + rows[s]
        if not with_cell:
            state.positions = moved[lo:hi]
        state.velocity = vel[lo:hi]
        state.dt, state.a, state.n_positive = float(dt[s]), float(a[s]), int(n_positive[s])
        state.steps += 1
        state.log_deform = None
