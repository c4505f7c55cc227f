"""pipelines.matrix_functions: exp, log and exp's Fréchet derivative of many 3x3 matrices, against
scipy and against 40-digit references (mpmath)."""

from __future__ import annotations

import mpmath
import numpy as np
import pytest
import scipy.linalg as sl

from pipelines.matrix_functions import expm, expm_frechet, logm


def _deformations(rng, scale: float, count: int = 100) -> np.ndarray:
    """Deformation gradients exp(strain + small rotation): what FrechetCellFilter takes logs of."""
    s = scale * rng.normal(size=(count, 3, 3))
    w = 0.1 * scale * rng.normal(size=(count, 3, 3))
    return np.array([sl.expm((a + a.T) / 2 + (b - b.T) / 2) for a, b in zip(s, w)])


def _exact_expm(a: np.ndarray) -> np.ndarray:
    mpmath.mp.dps = 40
    return np.array(mpmath.expm(mpmath.matrix(a.tolist())).tolist(), dtype=float)


@pytest.mark.parametrize("scale", [1e-4, 1e-2, 0.1, 0.3, 0.6])
def test_logm_equals_scipys_on_deformation_gradients(rng, scale):
    f = _deformations(rng, scale)
    want = np.array([sl.logm(x).real for x in f])
    # Both are ~1e-14 from the exact log at 60 % strain (the matrices come from scipy's expm).
    np.testing.assert_allclose(logm(f), want, rtol=0, atol=5e-14)
    np.testing.assert_allclose(expm(logm(f)), f, rtol=0, atol=5e-14)  # a round trip


@pytest.mark.parametrize("scale", [1e-3, 0.1, 0.5, 2.0])
def test_expm_and_its_frechet_derivative_equal_scipys(rng, scale):
    a = scale * rng.normal(size=(100, 3, 3))
    e = rng.normal(size=(100, 3, 3))
    size = np.exp(np.abs(a).sum(axis=(1, 2)))[:, None, None]  # the result's scale
    np.testing.assert_array_less(np.abs(expm(a) - [sl.expm(x) for x in a]) / size, 1e-13)
    want = np.array([sl.expm_frechet(x, y, compute_expm=False) for x, y in zip(a, e)])
    np.testing.assert_array_less(np.abs(expm_frechet(a, e) - want) / size, 1e-13)


def test_expm_of_a_shifted_log_is_within_a_few_ulps_of_the_exact_value(rng):
    """FIRE's cell step takes exp(log F + ln(n) I): ours within 4 ulps of 16 (n = 16), scipy's 5e-13 off."""
    x = np.log(16.0) * np.eye(3) + logm(_deformations(rng, 0.05, count=20))
    exact = np.array([_exact_expm(m) for m in x])
    assert np.abs(expm(x) - exact).max() <= 4 * np.spacing(16.0)
    assert np.abs(np.array([sl.expm(m) for m in x]) - exact).max() > 10 * np.spacing(16.0)


def test_each_matrix_is_computed_on_its_own(rng):
    """A matrix's result does not depend on the others in the stack (own scaling, roots, squarings)."""
    mixed = np.concatenate([_deformations(rng, 1e-3, 5), _deformations(rng, 0.6, 5)])
    for k in range(len(mixed)):
        np.testing.assert_array_equal(logm(mixed)[k], logm(mixed[k : k + 1])[0])
        np.testing.assert_array_equal(expm(3 * mixed)[k], expm(3 * mixed[k : k + 1])[0])
        np.testing.assert_array_equal(
            expm_frechet(mixed, mixed[::-1])[k], expm_frechet(mixed[k], mixed[::-1][k])
        )
    np.testing.assert_array_equal(expm(mixed[0]), expm(mixed[:1])[0])  # [m, m] alone, too


def test_logm_far_from_the_identity_converges_to_the_exact_log(rng):
    """Square roots run to convergence (scaled Denman–Beavers): condition numbers up to 1e8, with
    errors of the order of cond x eps, as scipy's (within a few times its error)."""
    for d in (1e2, 1e4, 1e6, 1e8):
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        a = q @ np.diag([d, 1.0, 0.3]) @ q.T
        want = q @ np.diag(np.log([d, 1.0, 0.3])) @ q.T
        ours, theirs = np.abs(logm(a) - want).max(), np.abs(sl.logm(a).real - want).max()
        assert ours <= max(5 * theirs, 1e-13), (d, ours, theirs)


def test_logm_refuses_a_matrix_off_its_domain():
    with pytest.raises(np.linalg.LinAlgError):
        logm(np.array([np.eye(3), -np.eye(3)]))
