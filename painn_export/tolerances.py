"""The one table of numerical tolerances, each with its reason: ``data/tolerances.toml``.

Keys are ``(comparison, dtype)``. Energies are compared per atom (eV/atom) so
that one tolerance fits systems of any size, except where an entry's reason
says "per structure" (``other_batch``); forces per component (eV/Å).
A value passes when ``|a - b| <= atol + rtol * |b|`` elementwise, ``b`` being
the reference side, or when both are NaN (a stress undefined on both sides).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    reason: str


@functools.cache
def table() -> dict[tuple[str, str], dict[str, Tolerance]]:
    """The table, ``(comparison, dtype) -> quantity -> Tolerance``, from ``data/tolerances.toml``
    (read once; a data file, so that each row is a fact with its reason and no code)."""
    import tomllib
    from importlib.resources import files

    text = files("painn_export").joinpath("data", "tolerances.toml").read_text(encoding="utf-8")
    return {
        (comparison, dtype): {quantity: Tolerance(**row) for quantity, row in rows.items()}
        for comparison, dtypes in tomllib.loads(text).items()
        for dtype, rows in dtypes.items()
    }


def tolerance(comparison: str, dtype: str, quantity: str) -> Tolerance:
    try:
        return table()[(comparison, dtype)][quantity]
    except KeyError:
        raise KeyError(f"no tolerance for {comparison!r}, {dtype!r}, {quantity!r}") from None


@dataclass(frozen=True)
class Comparison:
    """Errors of ``actual`` against ``reference`` for one quantity."""

    quantity: str
    max_abs: float
    p99_abs: float
    max_rel: float
    worst_index: int  # flat index of the largest violation ratio
    passed: bool
    tolerance: Tolerance

    def describe(self) -> str:
        status = "ok" if self.passed else "FAIL"
        return (
            f"{self.quantity}: max abs {self.max_abs:.3e}, p99 abs {self.p99_abs:.3e}, "
            f"max rel {self.max_rel:.3e} (atol {self.tolerance.atol:g}, rtol {self.tolerance.rtol:g}) "
            f"worst at flat index {self.worst_index}: {status}"
        )


def compare(quantity: str, actual, reference, tol: Tolerance) -> Comparison:
    """Elementwise ``|a - b| <= atol + rtol |b|`` with a report of the actual errors."""
    a = np.asarray(actual, dtype=np.float64).ravel()
    b = np.asarray(reference, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"{quantity}: shapes differ, {a.shape} vs {b.shape}")
    if a.size == 0:
        return Comparison(quantity, 0.0, 0.0, 0.0, -1, True, tol)
    both_nan = np.isnan(a) & np.isnan(b)  # undefined on both sides (stress without a volume)
    a, b = np.where(both_nan, 0.0, a), np.where(both_nan, 0.0, b)
    err = np.abs(a - b)
    bound = tol.atol + tol.rtol * np.abs(b)
    # A zero bound (bitwise comparisons) passes only exact equality.
    ratio = np.divide(err, bound, out=np.where(err == 0, 0.0, np.inf), where=(bound > 0) & np.isfinite(err))
    rel = err / np.maximum(np.abs(b), np.finfo(np.float64).tiny)
    return Comparison(
        quantity=quantity,
        max_abs=float(np.max(err)),
        p99_abs=float(np.percentile(err, 99)),
        max_rel=float(np.max(rel)),
        worst_index=int(np.argmax(ratio)),
        passed=bool(np.all(ratio <= 1.0)),
        tolerance=tol,
    )
