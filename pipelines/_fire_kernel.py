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
others in the batch: the numpy references make about a hundred calls on
``[B, 3, 3]`` stacks per cell step, each costing tens of microseconds
whatever ``B``. A structure whose cell algebra fails (a singular or
inverted cell: no logarithm, an inverse that is not finite) is reported in
``ok``, and the others are computed.

Imported on the first step, not with the package.
"""

from __future__ import annotations

import math

import numpy as np

from painn_export._jit import jit

# numpy's float semantics: a division by zero gives inf or NaN (numba's default raises), which the
# kernels then report as a structure that failed instead of stopping the batch.
_compiled = jit(error_model="numpy")

_TAYLOR = 18  # as pipelines.matrix_functions: terms of exp's series at norm <= 1/2
_SERIES = 12  # odd terms of 2 atanh(Z) at ||Z|| <= 1/7
_ROOT_STEPS = 64  # most Denman–Beavers iterations per square root
_ROOTS = 64  # square roots tried before log's series (the reference's loop: at most 63 taken)


@_compiled
def fire_rows(
    f, vel, start, dt, a, n_positive, started, dr,
    Nmin, finc, fdec, dtmax, astart, fa, maxstep,
):  # fmt: skip
    """One FIRE step's velocities and displacements for every structure, in place.

    Structure ``s``'s rows (at least one) are ``start[s]:start[s + 1]`` of
    ``f`` ``[R, 3]`` float64 (its generalised forces, eV/Å; eV on cell rows),
    ``vel`` ``[R, 3]`` (ASE's velocities, updated) and ``dr`` ``[R, 3]``
    (written: its step, Å); ``dt`` (ASE's time unit), ``a`` and
    ``n_positive`` ``[B]`` are updated; ``started[s]``: it has taken a step
    (ASE's first step has no downhill test). The scalars are
    :class:`pipelines.fire.FireParams`'.
    """
    w = np.empty(start[-1], dtype=np.float64)
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


@_compiled
def _dot(x, y, r0, r1, w) -> float:
    """Rows ``r0:r1`` of ``x·y`` as the reference sums them: each row's three products left to right,
    then numpy's ``add.reduceat`` over the rows (the first row plus the pairwise sum of the rest).
    ``w``: scratch, at least ``r1`` long."""
    if r1 <= r0:
        return 0.0
    for r in range(r0, r1):
        w[r] = x[r, 0] * y[r, 0] + x[r, 1] * y[r, 1] + x[r, 2] * y[r, 2]
    return w[r0] + _pairwise(w, r0 + 1, r1 - r0 - 1) if r1 - r0 > 1 else w[r0]


@_compiled
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
        r0, r1, r2, r3 = a[lo], a[lo + 1], a[lo + 2], a[lo + 3]
        r4, r5, r6, r7 = a[lo + 4], a[lo + 5], a[lo + 6], a[lo + 7]
        i = 8
        while i < n - n % 8:
            r0, r1, r2, r3 = r0 + a[lo + i], r1 + a[lo + i + 1], r2 + a[lo + i + 2], r3 + a[lo + i + 3]
            r4, r5, r6, r7 = r4 + a[lo + i + 4], r5 + a[lo + i + 5], r6 + a[lo + i + 6], r7 + a[lo + i + 7]
            i += 8
        total = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
        while i < n:
            total += a[lo + i]
            i += 1
        return total
    half = n // 2
    half -= half % 8
    return _pairwise(a, lo, half) + _pairwise(a, lo + half, n - half)


@_compiled
def move_atoms(positions, dr, fixed, out) -> None:
    """``out = positions + dr`` ``[N, 3]`` Å, fixed atoms where they were (``FixAtoms``)."""
    for t in range(positions.shape[0]):
        for c in range(3):
            out[t, c] = positions[t, c] if fixed[t] else positions[t, c] + dr[t, c]


# -- FrechetCellFilter -----------------------------------------------------------
# 3x3 matrices are 9-tuples, row by row (numba keeps them in registers: no allocation per product).


@_compiled
def cell_forces(forces, fixed, natoms, stress, cells, orig_cells, out, log_deform, ok) -> None:
    """The generalised forces of a cell relaxation (``FrechetCellFilter``).

    Inputs: ``forces`` ``[N, 3]`` eV/Å and ``fixed`` ``[N]`` (each
    structure's atoms in turn, ``natoms`` ``[B]``, each at least 1),
    ``stress``, ``cells``, ``orig_cells`` ``[B, 3, 3]`` (eV/Å³, Å, Å).
    Writes ``out`` ``[N + 3B, 3]`` (each structure's ``n`` atom rows ``f F``
    then its 3 cell rows, eV/Å and eV), ``log_deform`` ``[B, 3, 3]`` (``log
    F``) and ``ok`` ``[B]``: False where the deformation has no logarithm or
    the result is not finite (that structure's rows are then not to be
    used). As the reference, the nine directional derivatives ASE sums are
    one Fréchet derivative ``L(log F^T, G)``.
    """
    atom, row = 0, 0
    for s in range(natoms.shape[0]):
        n = natoms[s]
        deform = _deform(_load(orig_cells[s]), _load(cells[s]))
        good, logf = _logm(deform)
        _store(logf, log_deform[s])
        volume = abs(_det(_load(cells[s])))
        st = _load(stress[s])
        virial = _scale(_scale(_add(st, _t(st)), 0.5), -volume)
        ucf = _mm(virial, _inv(_t(deform)))
        frechet = _expm_frechet(_t(logf), ucf)
        ok[s] = good and _finite(frechet) and _finite(deform)
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


@_compiled
def step_cells(
    positions, fixed, natoms, dr, start, cells, orig_cells, log_deform, new_positions, new_cells, ok
) -> None:
    """``FrechetCellFilter.set_positions(get_positions() + dr)`` for every structure.

    ``positions`` ``[N, 3]`` Å and ``fixed`` ``[N]`` (structure by
    structure, ``natoms`` ``[B]``); ``dr`` ``[R, 3]`` (Å; eV⁻¹-scaled cell
    rows as ASE's) with structure ``s``'s ``n`` atom rows then its 3 cell
    rows from ``start[s]``; ``cells``, ``orig_cells``, ``log_deform`` ``[B,
    3, 3]``. Writes ``new_positions`` ``[N, 3]``, ``new_cells`` ``[B, 3,
    3]`` and ``ok`` ``[B]`` (False: a cell or deformation without a finite
    inverse, or a new cell that is not finite). Fixed atoms keep their
    fractional coordinates.
    """
    atom = 0
    for s in range(natoms.shape[0]):
        n = natoms[s]
        r0 = start[s]
        cell, orig = _load(cells[s]), _load(orig_cells[s])
        inv_deform = _inv(_deform(orig, cell))
        # get_positions' cell rows, log(n F) n = (log F + ln(n) I) n, plus dr, over n.
        x = _cell_rows(_load(log_deform[s]), math.log(n), n, dr, r0 + n)
        new_deform = _div(_expm(x), n)
        st = _add(_EYE, _t(_sub(new_deform, _EYE)))  # I + strain
        new_cell = _mm(orig, st)
        _store(new_cell, new_cells[s])
        inv_cell = _inv(cell)
        scale = _mm(inv_cell, new_cell)  # what fixed atoms keep: their fractional coordinates
        ok[s] = _finite(inv_deform) and _finite(inv_cell) and _finite(new_cell)
        for t in range(n):
            p0, p1, p2 = positions[atom + t, 0], positions[atom + t, 1], positions[atom + t, 2]
            if fixed[atom + t]:
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


@_compiled
def _cell_rows(logf, shift, n, dr, r):
    """``((log F + shift I) n + dr[r:r + 3]) / n`` as a 9-tuple."""
    return (
        ((logf[0] + shift) * n + dr[r, 0]) / n,
        ((logf[1] + 0.0) * n + dr[r, 1]) / n,
        ((logf[2] + 0.0) * n + dr[r, 2]) / n,
        ((logf[3] + 0.0) * n + dr[r + 1, 0]) / n,
        ((logf[4] + shift) * n + dr[r + 1, 1]) / n,
        ((logf[5] + 0.0) * n + dr[r + 1, 2]) / n,
        ((logf[6] + 0.0) * n + dr[r + 2, 0]) / n,
        ((logf[7] + 0.0) * n + dr[r + 2, 1]) / n,
        ((logf[8] + shift) * n + dr[r + 2, 2]) / n,
    )


@_compiled
def log_deforms(cells, orig_cells, out, ok) -> None:
    """``out`` ``[B, 3, 3]``: each ``log F``; ``ok`` ``[B]`` False where there is none."""
    for s in range(cells.shape[0]):
        good, logf = _logm(_deform(_load(orig_cells[s]), _load(cells[s])))
        _store(logf, out[s])
        ok[s] = good


# -- 3x3 algebra on 9-tuples -------------------------------------------------------

_EYE = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@_compiled
def _load(m):
    return (m[0, 0], m[0, 1], m[0, 2], m[1, 0], m[1, 1], m[1, 2], m[2, 0], m[2, 1], m[2, 2])


@_compiled
def _load9(m):
    return (m[0], m[1], m[2], m[3], m[4], m[5], m[6], m[7], m[8])


@_compiled
def _store(x, out) -> None:
    for i in range(3):
        for j in range(3):
            out[i, j] = x[3 * i + j]


@_compiled
def _t(x):
    return (x[0], x[3], x[6], x[1], x[4], x[7], x[2], x[5], x[8])


@_compiled
def _add(x, y):
    return (
        x[0] + y[0], x[1] + y[1], x[2] + y[2], x[3] + y[3], x[4] + y[4], x[5] + y[5],
        x[6] + y[6], x[7] + y[7], x[8] + y[8],
    )  # fmt: skip


@_compiled
def _sub(x, y):
    return (
        x[0] - y[0], x[1] - y[1], x[2] - y[2], x[3] - y[3], x[4] - y[4], x[5] - y[5],
        x[6] - y[6], x[7] - y[7], x[8] - y[8],
    )  # fmt: skip


@_compiled
def _scale(x, c):
    return (x[0] * c, x[1] * c, x[2] * c, x[3] * c, x[4] * c, x[5] * c, x[6] * c, x[7] * c, x[8] * c)


@_compiled
def _div(x, c):
    return (x[0] / c, x[1] / c, x[2] / c, x[3] / c, x[4] / c, x[5] / c, x[6] / c, x[7] / c, x[8] / c)


@_compiled
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


@_compiled
def _det(m) -> float:
    return (
        m[0] * (m[4] * m[8] - m[5] * m[7])
        - m[1] * (m[3] * m[8] - m[5] * m[6])
        + m[2] * (m[3] * m[7] - m[4] * m[6])
    )


@_compiled
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


@_compiled
def _deform(orig_cell, cell):
    """``F`` with ``cell = orig_cell F^T``: ``(orig_cell⁻¹ cell)^T``."""
    return _t(_mm(_inv(orig_cell), cell))


@_compiled
def _finite(x) -> bool:
    for k in range(9):
        if not math.isfinite(x[k]):
            return False
    return True


@_compiled
def _norm1(x) -> float:
    """The largest column sum of absolute values (NaN when any is)."""
    return _max_nan(_max_nan(_column1(x, 0), _column1(x, 1)), _column1(x, 2))


@_compiled
def _max_nan(a: float, b: float) -> float:
    """The larger of two, NaN when either is (as numpy's ``max``)."""
    if a != a or b != b:
        return math.nan
    return a if a >= b else b


@_compiled
def _column1(x, j: int) -> float:
    return abs(x[j]) + abs(x[3 + j]) + abs(x[6 + j])


@_compiled
def _squarings(norm: float) -> int:
    """Halvings that bring a norm to 1/2 or below (matrix_functions.expm's rule)."""
    return math.ceil(math.log2(norm / 0.5)) if 0.5 < norm < math.inf else 0  # NaN, inf: none (not finite)


@_compiled
def _shifted(a):
    """``(a - mu I, mu)``, ``mu`` the mean eigenvalue (the trace over 3)."""
    mu = (a[0] + a[4] + a[8]) / 3
    return _sub(a, _scale(_EYE, mu)), mu


@_compiled
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


@_compiled
def _expm_frechet(a, e):
    """``L(a, e)``: the upper-right block of ``exp([[a, e], [0, a]])``, the blocks carried on their own
    (:func:`pipelines.matrix_functions.expm_frechet`'s algorithm, without the zero block's products)."""
    x, mu = _shifted(a)
    # The block matrix's 1-norm: the larger of x's columns and those of [e; x].
    norm = _norm1(x)
    for j in range(3):
        norm = _max_nan(norm, _column1(e, j) + _column1(x, j))
    scale = 2.0 ** _squarings(norm)
    x, y = _div(x, scale), _div(e, scale)
    # Horner on [[P, Q], [0, P]]: I + [[x, y], [0, x]] [[P, Q], [0, P]] / k.
    p, q = _add(_EYE, _div(x, _TAYLOR)), _div(y, _TAYLOR)
    for k in range(_TAYLOR - 1, 0, -1):
        p, q = _add(_EYE, _div(_mm(x, p), k)), _div(_add(_mm(x, q), _mm(y, p)), k)
    for _ in range(_squarings(norm)):
        p, q = _mm(p, p), _add(_mm(p, q), _mm(q, p))
    return _scale(q, math.exp(mu))


@_compiled
def _logm(a):
    """``(converged, log(a))``: :func:`pipelines.matrix_functions.logm`'s algorithm (square roots to
    ``||a - I|| <= 1/4``, at most 63 as the reference, then ``2 atanh``'s series); not converged for
    eigenvalues off the right half-plane, or a matrix or result that is not finite."""
    if not _finite(a):
        return False, a
    roots = 0
    while _norm1(_sub(a, _EYE)) > 0.25:
        if roots == _ROOTS - 1:
            return False, a
        ok, a = _sqrtm(a)
        if not ok:
            return False, a
        roots += 1
    z = _mm(_sub(a, _EYE), _inv(_add(a, _EYE)))
    z2 = _mm(z, z)
    term, total = z, z
    for k in range(1, _SERIES):
        term = _mm(term, z2)
        total = _add(total, _div(term, 2 * k + 1))
    log = _scale(total, 2.0 * 2.0**roots)
    return _finite(log), log


@_compiled
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
        if not (_finite(y_next) and _finite(z_next)):  # a singular iterate: no principal root
            return False, y_next
        done = not far and _norm1(_sub(y_next, y)) <= 1e-9 * _norm1(y_next)
        y, z = y_next, z_next
        if done:
            return True, y
    return False, y
