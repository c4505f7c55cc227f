"""The matrix exponential, logarithm and Fréchet derivative of many small matrices at once (numpy).

What ASE's ``FrechetCellFilter`` asks of scipy (``expm``, ``logm``,
``expm_frechet``) for one 3x3 matrix at a time, here for a ``[B, m, m]``
stack in a few vectorised numpy calls: a relaxation with ``--cell`` needs
them for every structure at every step, and scipy's per-call cost (about a
millisecond for the three) would otherwise set the step's pace.

- :func:`expm`: the mean eigenvalue shifted out (``e^μ exp(A - μI)``), then
  scaling and squaring of a degree-18 Taylor polynomial; each matrix scaled
  to a norm <= 1/2 on its own, where the truncation error is below 1e-19
  relative.
- :func:`logm`: inverse scaling and squaring: square roots (Denman–Beavers
  with determinant scaling, each run to convergence) until ``||A - I|| <=
  1/4``, then the series ``log A = 2 atanh(Z)``, ``Z = (A - I)(A + I)⁻¹``,
  to 1e-19; for matrices whose eigenvalues have positive real parts (a
  deformation gradient), with errors of the order of cond(A) x eps, as scipy's.
- :func:`expm_frechet`: the derivative ``L(A, E)`` as the upper-right block
  of ``expm([[A, E], [0, A]])``.

Each matrix's result is computed on its own (its own scaling, its own number
of square roots and squarings): it does not depend on the others in the
stack. The tests compare all three with scipy's to 1e-13 relative.
"""

from __future__ import annotations

import numpy as np

_TAYLOR = 18  # terms of the exponential's series at norm <= 1/2: 0.5**19 / 19! < 1e-22
_SERIES = 12  # odd terms of 2 atanh(Z) at ||Z|| <= 1/7: (1/7)**25 / 25 < 1e-22
_ROOT_STEPS = 64  # most Denman–Beavers iterations per square root (a few suffice near I)


def _norm1(a: np.ndarray) -> np.ndarray:
    """``[B]`` the 1-norm (largest column sum of absolute values) of each matrix."""
    return np.abs(a).sum(axis=-2).max(axis=-1)


def expm(a: np.ndarray) -> np.ndarray:
    """``exp(A)`` of each ``[..., m, m]`` matrix (float64)."""
    a = np.asarray(a, dtype=np.float64)
    shape = a.shape
    a = a.reshape(-1, shape[-1], shape[-1])
    # exp(A) = e^mu exp(A - mu I), mu the mean eigenvalue: a deformation's
    # log(n F) is ln(n) I plus a small part, which then needs no squaring.
    mu = np.trace(a, axis1=-2, axis2=-1) / shape[-1]
    a = a - mu[:, None, None] * np.eye(shape[-1])
    norm = _norm1(a)
    squarings = np.where(norm > 0.5, np.ceil(np.log2(np.maximum(norm, 0.5) / 0.5)), 0).astype(np.int64)
    x = a / (2.0**squarings)[:, None, None]
    eye = np.broadcast_to(np.eye(shape[-1]), a.shape)
    result = eye + x / _TAYLOR  # Horner: I + x/1 (I + x/2 (I + ... (I + x/N)))
    for k in range(_TAYLOR - 1, 0, -1):
        result = eye + (x @ result) / k
    for step in range(int(squarings.max(initial=0))):
        more = squarings > step
        result[more] = result[more] @ result[more]
    return (np.exp(mu)[:, None, None] * result).reshape(shape)


def logm(a: np.ndarray) -> np.ndarray:
    """The principal ``log(A)`` of each ``[..., m, m]`` matrix with eigenvalues in the right half-plane."""
    a = np.asarray(a, dtype=np.float64)
    shape = a.shape
    a = a.reshape(-1, shape[-1], shape[-1]).copy()
    eye = np.eye(shape[-1])
    roots = np.zeros(len(a), dtype=np.int64)
    for _ in range(64):  # each root halves the logarithm; far from I takes a few dozen at most
        far = _norm1(a - eye) > 0.25
        if not far.any():
            break
        a[far] = _sqrtm(a[far])
        roots[far] += 1
    else:
        raise np.linalg.LinAlgError("logm: the square roots did not approach the identity")
    z = (a - eye) @ np.linalg.inv(a + eye)
    z2 = z @ z
    term, total = z, z.copy()
    for k in range(1, _SERIES):
        term = term @ z2
        total = total + term / (2 * k + 1)
    return (2.0 * total * (2.0**roots)[:, None, None]).reshape(shape)


def _sqrtm(a: np.ndarray) -> np.ndarray:
    """The principal square root of each matrix: Denman–Beavers with determinant scaling, to convergence.

    Each matrix iterates until its own step is below 1e-9 of its norm (with
    quadratic convergence the result is then at rounding level), at most
    :data:`_ROOT_STEPS` times; one that does not converge raises LinAlgError.
    """
    m = a.shape[-1]
    y, z = a.copy(), np.broadcast_to(np.eye(m), a.shape).copy()
    active = np.arange(len(a))
    for _ in range(_ROOT_STEPS):
        if not active.size:
            return y
        ya, za = y[active], z[active]
        far = _norm1(ya - np.linalg.inv(za)) > 1e-2 * _norm1(ya)  # scaled while far from converged
        mu = np.where(far, np.abs(np.linalg.det(ya) * np.linalg.det(za)) ** (-1.0 / (2 * m)), 1.0)
        ya, za = ya * mu[:, None, None], za * mu[:, None, None]
        y_next = (ya + np.linalg.inv(za)) / 2
        z_next = (za + np.linalg.inv(ya)) / 2
        done = ~far & (_norm1(y_next - ya) <= 1e-9 * _norm1(y_next))
        y[active], z[active] = y_next, z_next
        active = active[~done]
    if active.size:
        raise np.linalg.LinAlgError(
            "logm: a square root did not converge (eigenvalues off the right half-plane?)"
        )
    return y


def expm_frechet(a: np.ndarray, e: np.ndarray) -> np.ndarray:
    """``L(A, E)``, the derivative of ``exp`` at ``A`` in direction ``E``, for each ``[..., m, m]`` pair."""
    a = np.asarray(a, dtype=np.float64)
    m = a.shape[-1]
    block = np.zeros((*a.shape[:-2], 2 * m, 2 * m))
    block[..., :m, :m] = a
    block[..., m:, m:] = a
    block[..., :m, m:] = e
    return expm(block)[..., :m, m:]
