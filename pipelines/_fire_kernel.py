"""Compiled FIRE steps and ``FrechetCellFilter`` algebra for a whole batch (numba).

:mod:`pipelines.fire`'s numpy functions are the references these are tested
against (tests/test_fire_kernel.py):

- :func:`fire_rows`: FIRE's velocity and step for every structure's rows,
  ASE's arithmetic element for element in ASE's order, with the reference's
  sums (each row's ``x·y`` left to right, then numpy's pairwise order over
  the rows): the same bits as :func:`pipelines.fire.fire_steps_reference`.
- :func:`cell_forces` and :func:`step_cells`: the generalised forces of a
  cell relaxation and its step, each structure's 3x3 algebra written out
  (cofactor inverses, the matrix functions of :mod:`pipelines.matrix_functions`
  with the same algorithms), equal to the references to rounding.

One loop per structure, so a structure's numbers never depend on the
others in the batch. A numpy call on a ``[B, 3, 3]`` stack costs tens of
microseconds whatever ``B``; a cell step makes about a hundred of them, and
these loops do the same work in about a microsecond per structure.

Imported on the first step, not with the package.
"""

from __future__ import annotations

import math

import numpy as np

from painn_export._jit import jit

_TAYLOR = 18  # as pipelines.matrix_functions: terms of exp's series at norm <= 1/2
_SERIES = 12  # odd terms of 2 atanh(Z) at ||Z|| <= 1/7
_ROOT_STEPS = 64  # most Denman–Beavers iterations per square root
_ROOTS = 64  # most square roots before log's series


@jit
def fire_rows(
    f, vel, start, dt, a, n_positive, started, dr,
    Nmin, finc, fdec, dtmax, astart, fa, maxstep,
):  # fmt: skip
    """One FIRE step's velocities and displacements for every structure, in place.

    Structure ``s``'s rows are ``start[s]:start[s + 1]`` of ``f`` ``[R, 3]``
    (its generalised forces), ``vel`` ``[R, 3]`` (updated) and ``dr``
    ``[R, 3]`` (written: its step); ``dt``, ``a``, ``n_positive`` ``[B]``
    are updated; ``started[s]``: it has taken a step (ASE's first step has
    no downhill test).
    """
    w = np.empty(start[-1])
    for s in range(start.shape[0] - 1):
        r0, r1 = start[s], start[s + 1]
        vf = _dot(f, vel, r0, r1, w)
        if started[s]:
            if vf > 0.0:
                grad2 = _dot(f, f, r0, r1, w)
                vv = _dot(vel, vel, r0, r1, w)
                root_g, root_v, mix = math.sqrt(grad2), math.sqrt(vv), a[s]
                for r in range(r0, r1):
                    for c in range(3):
                        vel[r, c] = (1.0 - mix) * vel[r, c] + mix * f[r, c] / root_g * root_v
                if n_positive[s] > Nmin:
                    dt[s] = min(dt[s] * finc, dtmax)
                    a[s] *= fa
                n_positive[s] += 1
            else:
                for r in range(r0, r1):
                    for c in range(3):
                        vel[r, c] = vel[r, c] * 0.0
                a[s] = astart
                dt[s] *= fdec
                n_positive[s] = 0
        h = dt[s]
        for r in range(r0, r1):
            for c in range(3):
                vel[r, c] = vel[r, c] + h * f[r, c]
                dr[r, c] = h * vel[r, c]
        norm = math.sqrt(_dot(dr, dr, r0, r1, w))
        if norm > maxstep:
            for r in range(r0, r1):
                for c in range(3):
                    dr[r, c] = maxstep * dr[r, c] / norm


@jit
def _dot(x, y, r0, r1, w) -> float:
    """Rows ``r0:r1`` of ``x·y`` as the reference sums them: each row's three products left to right,
    then numpy's ``add.reduceat`` over the rows (the first row plus the pairwise sum of the rest).
    ``w``: scratch, at least ``r1`` long."""
    for r in range(r0, r1):
        w[r] = x[r, 0] * y[r, 0] + x[r, 1] * y[r, 1] + x[r, 2] * y[r, 2]
    return w[r0] + _pairwise(w, r0 + 1, r1 - r0 - 1) if r1 - r0 > 1 else w[r0]


@jit
def _pairwise(a, lo, n) -> float:
    """``a[lo:lo + n]``'s sum in numpy's pairwise order (its float64 add-reduce): below 8 terms one
    after another; up to 128, eight running sums joined pairwise, then the rest; beyond, two halves
    (the first a multiple of 8)."""
    if n < 8:
        total = 0.0
        for i in range(n):
            total += a[lo + i]
        return total
    if n <= 128:
        r = a[lo : lo + 8].copy()
        i = 8
        while i < n - n % 8:
            for j in range(8):
                r[j] += a[lo + i + j]
            i += 8
        total = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
        while i < n:
            total += a[lo + i]
            i += 1
        return total
    half = n // 2
    half -= half % 8
    return _pairwise(a, lo, half) + _pairwise(a, lo + half, n - half)


@jit
def move_atoms(positions, dr, fixed, out) -> None:
    """``out = positions + dr`` ``[N, 3]`` Å, fixed atoms where they were (``FixAtoms``)."""
    for t in range(positions.shape[0]):
        for c in range(3):
            out[t, c] = positions[t, c] if fixed[t] else positions[t, c] + dr[t, c]


# -- FrechetCellFilter -----------------------------------------------------------
# 3x3 matrices are 9-tuples, row by row (numba keeps them in registers: no allocation per product).


@jit
def cell_forces(forces, fixed, natoms, stress, cells, orig_cells, out, log_deform) -> int:
    """The generalised forces of a cell relaxation (``FrechetCellFilter``); 0, or ``s + 1`` when the
    logarithm of structure ``s``'s deformation did not converge.

    Inputs: ``forces`` ``[N, 3]`` eV/Å and ``fixed`` ``[N]`` (each
    structure's atoms in turn, ``natoms`` ``[B]``), ``stress``, ``cells``,
    ``orig_cells`` ``[B, 3, 3]`` (eV/Å³, Å, Å). Writes ``out`` ``[N + 3B, 3]``
    (each structure's ``n`` atom rows ``f F`` then its 3 cell rows, eV/Å and
    eV) and ``log_deform`` ``[B, 3, 3]`` (``log F``). As the reference, the
    nine directional derivatives ASE sums are one Fréchet derivative
    ``L(log F^T, G)``.
    """
    atom, row = 0, 0
    for s in range(natoms.shape[0]):
        n = natoms[s]
        deform = _deform(_load(orig_cells[s]), _load(cells[s]))
        ok, logf = _logm(deform)
        if not ok:
            return s + 1
        _store(logf, log_deform[s])
        volume = abs(_det(_load(cells[s])))
        st = _load(stress[s])
        sym = _scale(_add(st, _t(st)), 0.5)
        virial = _scale(sym, -volume)
        ucf = _mm(virial, _inv(_t(deform)))
        frechet = _expm_frechet(_t(logf), ucf)
        for t in range(n):
            for j in range(3):
                total = 0.0
                if not fixed[atom + t]:
                    total = forces[atom + t, 0] * deform[j] + forces[atom + t, 1] * deform[3 + j]
                    total += forces[atom + t, 2] * deform[6 + j]
                out[row + t, j] = total
        for i in range(3):
            for j in range(3):
                out[row + n + i, j] = frechet[3 * i + j] / n
        atom += n
        row += n + 3
    return 0


@jit
def step_cells(positions, fixed, natoms, dr, start, cells, orig_cells, log_deform, new_positions, new_cells):
    """``FrechetCellFilter.set_positions(get_positions() + dr)`` for every structure.

    ``positions`` ``[N, 3]`` Å and ``fixed`` ``[N]`` (structure by
    structure, ``natoms`` ``[B]``); ``dr`` ``[R, 3]`` with structure ``s``'s
    ``n`` atom rows then its 3 cell rows from ``start[s]``; ``cells``,
    ``orig_cells``, ``log_deform`` ``[B, 3, 3]``. Writes ``new_positions``
    ``[N, 3]`` and ``new_cells`` ``[B, 3, 3]``. Fixed atoms keep their
    fractional coordinates. Returns 0, or ``s + 1`` when structure ``s``'s cell is singular.
    """
    atom = 0
    for s in range(natoms.shape[0]):
        n = natoms[s]
        r0 = start[s]
        cell, orig = _load(cells[s]), _load(orig_cells[s])
        inv_deform = _inv(_deform(orig, cell))
        # get_positions' cell rows, log(n F) n = (log F + ln(n) I) n, plus dr, over n.
        logf, shift = _load(log_deform[s]), math.log(n)
        x = np.empty(9)
        for i in range(3):
            for j in range(3):
                k = 3 * i + j
                x[k] = ((logf[k] + shift * _EYE[k]) * n + dr[r0 + n + i, j]) / n
        new_deform = _expm(_load9(x))
        strain = np.empty(9)
        for i in range(3):
            for j in range(3):
                strain[3 * i + j] = _EYE[3 * i + j] + (new_deform[3 * j + i] / n - _EYE[3 * j + i])
        st = _load9(strain)
        new_cell = _mm(orig, st)
        _store(new_cell, new_cells[s])
        inv_cell = _inv(cell)
        for k in range(9):
            if not math.isfinite(inv_cell[k]):
                return s + 1
        scale = _mm(inv_cell, new_cell)
        for t in range(n):
            p0, p1, p2 = positions[atom + t, 0], positions[atom + t, 1], positions[atom + t, 2]
            if fixed[atom + t]:  # its fractional coordinates
                for j in range(3):
                    new_positions[atom + t, j] = p0 * scale[j] + p1 * scale[3 + j] + p2 * scale[6 + j]
                continue
            # get_positions' atom rows (in the undeformed cell), plus dr, then deformed again.
            x0 = inv_deform[0] * p0 + inv_deform[1] * p1 + inv_deform[2] * p2 + dr[r0 + t, 0]
            x1 = inv_deform[3] * p0 + inv_deform[4] * p1 + inv_deform[5] * p2 + dr[r0 + t, 1]
            x2 = inv_deform[6] * p0 + inv_deform[7] * p1 + inv_deform[8] * p2 + dr[r0 + t, 2]
            for j in range(3):
                new_positions[atom + t, j] = x0 * st[j] + x1 * st[3 + j] + x2 * st[6 + j]
        atom += n
    return 0


@jit
def log_deforms(cells, orig_cells, out) -> int:
    """``out`` ``[B, 3, 3]``: each ``log F``; 0, or ``s + 1`` when structure ``s``'s did not converge."""
    for s in range(cells.shape[0]):
        ok, logf = _logm(_deform(_load(orig_cells[s]), _load(cells[s])))
        if not ok:
            return s + 1
        _store(logf, out[s])
    return 0


# -- 3x3 algebra on 9-tuples -------------------------------------------------------

_EYE = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@jit
def _load(m):
    return (m[0, 0], m[0, 1], m[0, 2], m[1, 0], m[1, 1], m[1, 2], m[2, 0], m[2, 1], m[2, 2])


@jit
def _load9(m):
    return (m[0], m[1], m[2], m[3], m[4], m[5], m[6], m[7], m[8])


@jit
def _store(x, out) -> None:
    for i in range(3):
        for j in range(3):
            out[i, j] = x[3 * i + j]


@jit
def _t(x):
    return (x[0], x[3], x[6], x[1], x[4], x[7], x[2], x[5], x[8])


@jit
def _add(x, y):
    return (
        x[0] + y[0], x[1] + y[1], x[2] + y[2], x[3] + y[3], x[4] + y[4], x[5] + y[5],
        x[6] + y[6], x[7] + y[7], x[8] + y[8],
    )  # fmt: skip


@jit
def _sub(x, y):
    return (
        x[0] - y[0], x[1] - y[1], x[2] - y[2], x[3] - y[3], x[4] - y[4], x[5] - y[5],
        x[6] - y[6], x[7] - y[7], x[8] - y[8],
    )  # fmt: skip


@jit
def _scale(x, c):
    return (x[0] * c, x[1] * c, x[2] * c, x[3] * c, x[4] * c, x[5] * c, x[6] * c, x[7] * c, x[8] * c)


@jit
def _div(x, c):
    return (x[0] / c, x[1] / c, x[2] / c, x[3] / c, x[4] / c, x[5] / c, x[6] / c, x[7] / c, x[8] / c)


@jit
def _mm(x, y):
    return (
        x[0] * y[0] + x[1] * y[3] + x[2] * y[6],
        x[0] * y[1] + x[1] * y[4] + x[2] * y[7],
        x[0] * y[2] + x[1] * y[5] + x[2] * y[8],
        x[3] * y[0] + x[4] * y[3] + x[5] * y[6],
        x[3] * y[1] + x[4] * y[4] + x[5] * y[7],
        x[3] * y[2] + x[4] * y[5] + x[5] * y[8],
        x[6] * y[0] + x[7] * y[3] + x[8] * y[6],
        x[6] * y[1] + x[7] * y[4] + x[8] * y[7],
        x[6] * y[2] + x[7] * y[5] + x[8] * y[8],
    )


@jit
def _det(m) -> float:
    return (
        m[0] * (m[4] * m[8] - m[5] * m[7])
        - m[1] * (m[3] * m[8] - m[5] * m[6])
        + m[2] * (m[3] * m[7] - m[4] * m[6])
    )


@jit
def _inv(m):
    """``m⁻¹`` by cofactors (NaN or inf for a singular ``m``)."""
    c = (
        m[4] * m[8] - m[5] * m[7],
        m[2] * m[7] - m[1] * m[8],
        m[1] * m[5] - m[2] * m[4],
        m[5] * m[6] - m[3] * m[8],
        m[0] * m[8] - m[2] * m[6],
        m[2] * m[3] - m[0] * m[5],
        m[3] * m[7] - m[4] * m[6],
        m[1] * m[6] - m[0] * m[7],
        m[0] * m[4] - m[1] * m[3],
    )
    return _div(c, m[0] * c[0] + m[1] * c[3] + m[2] * c[6])


@jit
def _deform(orig_cell, cell):
    """``F`` with ``cell = orig_cell F^T``: ``(orig_cell⁻¹ cell)^T``."""
    return _t(_mm(_inv(orig_cell), cell))


@jit
def _norm1(x) -> float:
    """The largest column sum of absolute values."""
    return max(_column1(x, 0), _column1(x, 1), _column1(x, 2))


@jit
def _column1(x, j: int) -> float:
    return abs(x[j]) + abs(x[3 + j]) + abs(x[6 + j])


@jit
def _squarings(norm: float) -> int:
    """Halvings that bring a norm to 1/2 or below (matrix_functions.expm's rule)."""
    return math.ceil(math.log2(norm / 0.5)) if norm > 0.5 else 0


@jit
def _shifted(a):
    """``(a - mu I, mu)``, ``mu`` the mean eigenvalue (the trace over 3)."""
    mu = (a[0] + a[4] + a[8]) / 3
    return _sub(a, _scale(_EYE, mu)), mu


@jit
def _expm(a):
    """``exp(a)``: :func:`pipelines.matrix_functions.expm`'s algorithm (shift, scaling, Taylor, squaring)."""
    x, mu = _shifted(a)
    squarings = _squarings(_norm1(x))
    x = _div(x, 2.0**squarings)
    result = _add(_EYE, _div(x, _TAYLOR))
    for k in range(_TAYLOR - 1, 0, -1):
        result = _add(_EYE, _div(_mm(x, result), k))
    for _ in range(squarings):
        result = _mm(result, result)
    return _scale(result, math.exp(mu))


@jit
def _expm_frechet(a, e):
    """``L(a, e)``: the upper-right block of ``exp([[a, e], [0, a]])``, the blocks carried on their own
    (:func:`pipelines.matrix_functions.expm_frechet`'s algorithm, without the zero block's products)."""
    x, mu = _shifted(a)
    # The block matrix's 1-norm: the larger of x's columns and those of [e; x].
    norm = _norm1(x)
    for j in range(3):
        norm = max(norm, _column1(e, j) + _column1(x, j))
    scale = 2.0 ** _squarings(norm)
    x, y = _div(x, scale), _div(e, scale)
    # Horner on [[P, Q], [0, P]]: I + [[x, y], [0, x]] [[P, Q], [0, P]] / k.
    p, q = _add(_EYE, _div(x, _TAYLOR)), _div(y, _TAYLOR)
    for k in range(_TAYLOR - 1, 0, -1):
        p, q = _add(_EYE, _div(_mm(x, p), k)), _div(_add(_mm(x, q), _mm(y, p)), k)
    for _ in range(_squarings(norm)):
        p, q = _mm(p, p), _add(_mm(p, q), _mm(q, p))
    return _scale(q, math.exp(mu))


@jit
def _logm(a):
    """``(converged, log(a))``: :func:`pipelines.matrix_functions.logm`'s algorithm (square roots to
    ``||a - I|| <= 1/4``, then ``2 atanh``'s series); not converged for eigenvalues off the right
    half-plane."""
    roots = 0
    while _norm1(_sub(a, _EYE)) > 0.25:
        ok, a = _sqrtm(a)
        if roots == _ROOTS or not ok:
            return False, a
        roots += 1
    z = _mm(_sub(a, _EYE), _inv(_add(a, _EYE)))
    z2 = _mm(z, z)
    term, total = z, z
    for k in range(1, _SERIES):
        term = _mm(term, z2)
        total = _add(total, _div(term, 2 * k + 1))
    return True, _scale(total, 2.0 * 2.0**roots)


@jit
def _sqrtm(a):
    """``(converged, sqrt(a))``, the principal square root: scaled Denman–Beavers to convergence."""
    y, z = a, _EYE
    for _ in range(_ROOT_STEPS):
        far = _norm1(_sub(y, _inv(z))) > 1e-2 * _norm1(y)
        if far:
            mu = abs(_det(y) * _det(z)) ** (-1.0 / 6)
            y, z = _scale(y, mu), _scale(z, mu)
        y_next = _div(_add(y, _inv(z)), 2.0)
        z_next = _div(_add(z, _inv(y)), 2.0)
        done = not far and _norm1(_sub(y_next, y)) <= 1e-9 * _norm1(y_next)
        y, z = y_next, z_next
        if done:
            return True, y
    return False, y
