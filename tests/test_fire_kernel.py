"""pipelines._fire_kernel: the compiled FIRE steps and cell algebra against their numpy references
(pipelines.fire's *_reference functions, pipelines.matrix_functions) and scipy, at a relaxation's size."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import scipy.linalg as sl

from pipelines import _fire_kernel as kernel
from pipelines.fire import (
    CellAlgebraError,
    FireParams,
    FireState,
    Rows,
    fire_steps,
    fire_steps_reference,
    generalized_forces_many,
    generalized_forces_reference,
    max_forces,
)


def _batch(rng, with_cell: bool, count: int = 300) -> list[FireState]:
    """Structures of 1 to 300 atoms (most 8 to 48: a screening batch; a few past the 128 rows where
    numpy's pairwise sums split), a tenth of the atoms fixed, skewed cells."""
    extra = [1, 2, 7, 129, 200, 300] if count >= 100 else []
    sizes = np.concatenate([rng.integers(8, 49, count - len(extra)), extra]).astype(int)
    out = []
    for n in sizes:
        cell = np.diag(rng.uniform(6, 12, 3)) + 0.5 * rng.standard_normal((3, 3))
        positions = rng.uniform(0, 1, (n, 3)) @ cell
        out.append(FireState.start(positions, cell, rng.random(n) < 0.1, FireParams(), with_cell))
    return out


def _forces(rng, states, step: int) -> list[np.ndarray]:
    """Forces that turn against the velocity now and then (FIRE's downhill branch), some large (its cap)."""
    scale = 5.0 if step % 7 == 3 else 0.3
    sign = -1.0 if step % 5 == 4 else 1.0
    return [sign * scale * rng.standard_normal((len(s.positions), 3)) for s in states]


def test_fire_steps_equal_the_numpy_reference_bit_for_bit(rng):
    """Atoms only: velocities, steps, positions, dt, a and the downhill count equal the reference's bits
    over 30 steps of 300 structures, through both branches and dt's growth."""
    states = _batch(rng, with_cell=False)
    ref = copy.deepcopy(states)
    params = FireParams()
    branches = set()
    for step in range(30):
        forces = _forces(rng, states, step)
        g, g_ref = (
            generalized_forces_many(states, forces, None),
            generalized_forces_reference(ref, forces, None),
        )
        assert isinstance(g, Rows) and len(g) == len(g_ref)
        for got, want in zip(g, g_ref):
            np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(max_forces(g), max_forces(g_ref))
        before = [(s.n_positive, s.dt) for s in ref]
        fire_steps(states, g, params, False)
        fire_steps_reference(ref, g_ref, params, False)
        for (n_positive, dt), s in zip(before, ref):
            branches.add(
                "down" if s.n_positive == 0 and s.steps > 1 else "up" if s.n_positive > n_positive else ""
            )
            branches.add("grown" if s.dt > dt else "")
        for a, b in zip(states, ref):
            np.testing.assert_array_equal(a.positions, b.positions)
            np.testing.assert_array_equal(a.velocity, b.velocity)
            assert (a.dt, a.a, a.n_positive, a.steps) == (b.dt, b.a, b.n_positive, b.steps)
    assert {"down", "up", "grown"} <= branches


def test_a_capped_step_is_the_references(rng):
    """Forces large enough that every structure's step is cut to maxstep: the same bits."""
    states = _batch(rng, with_cell=False, count=40)
    ref = copy.deepcopy(states)
    forces = [100.0 * rng.standard_normal((len(s.positions), 3)) for s in states]
    start = [s.positions.copy() for s in states]
    fire_steps(states, generalized_forces_many(states, forces, None), FireParams(), False)
    fire_steps_reference(ref, generalized_forces_reference(ref, forces, None), FireParams(), False)
    for a, b, x0 in zip(states, ref, start):
        np.testing.assert_array_equal(a.positions, b.positions)
        assert np.linalg.norm(a.positions - x0) == pytest.approx(FireParams().maxstep, rel=1e-12)


def test_cell_steps_equal_the_numpy_reference_to_rounding(rng):
    """With the cell (FrechetCellFilter): each step's generalised forces, positions and cell within
    1e-12 relative of the reference from the same state, over 20 steps of 300 structures."""
    states = _batch(rng, with_cell=True)
    params = FireParams()
    for step in range(20):
        forces = _forces(rng, states, step)
        stress = [0.02 * rng.standard_normal((3, 3)) for _ in states]
        ref = copy.deepcopy(states)
        g, g_ref = (
            generalized_forces_many(states, forces, stress),
            generalized_forces_reference(ref, forces, stress),
        )
        for got, want in zip(g, g_ref):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())
        for a, b in zip(states, ref):
            np.testing.assert_allclose(a.log_deform, b.log_deform, rtol=0, atol=1e-14)
        fire_steps(states, g, params, True)
        fire_steps_reference(ref, g_ref, params, True)
        for a, b in zip(states, ref):
            np.testing.assert_allclose(
                a.positions, b.positions, rtol=0, atol=1e-12 * np.abs(b.positions).max()
            )
            np.testing.assert_allclose(a.cell, b.cell, rtol=0, atol=1e-12 * np.abs(b.cell).max())
            np.testing.assert_allclose(a.velocity, b.velocity, rtol=0, atol=1e-12 * np.abs(b.velocity).max())
    strained = [np.abs(s.cell - s.orig_cell).max() for s in states]
    assert max(strained) > 0.1  # the cells moved: the algebra ran away from the identity


def test_a_cell_step_without_its_log_computes_it(rng):
    """fire_steps on states whose log F was not set by generalized_forces_many finds it itself."""
    states = _batch(rng, with_cell=True, count=20)
    forces = [rng.standard_normal((len(s.positions), 3)) for s in states]
    stress = [0.02 * rng.standard_normal((3, 3)) for _ in states]
    for _ in range(3):
        fire_steps(states, generalized_forces_many(states, forces, stress), FireParams(), True)
    again = copy.deepcopy(states)
    g = generalized_forces_many(states, forces, stress)
    for s in again:
        s.log_deform = None
    fire_steps(states, g, FireParams(), True)
    fire_steps(again, g, FireParams(), True)
    for a, b in zip(states, again):
        np.testing.assert_array_equal(a.positions, b.positions)
        np.testing.assert_array_equal(a.cell, b.cell)


def _deformations(rng, scale: float, count: int = 100) -> np.ndarray:
    s = scale * rng.normal(size=(count, 3, 3))
    w = 0.1 * scale * rng.normal(size=(count, 3, 3))
    return np.array([sl.expm((a + a.T) / 2 + (b - b.T) / 2) for a, b in zip(s, w)])


def _tuple(m: np.ndarray) -> tuple:
    return tuple(float(x) for x in m.ravel())


@pytest.mark.parametrize("scale", [1e-4, 1e-2, 0.1, 0.3, 0.6])
def test_the_kernels_logm_equals_scipys(rng, scale):
    for f in _deformations(rng, scale):
        ok, log = kernel._logm(_tuple(f))
        assert ok
        np.testing.assert_allclose(np.reshape(log, (3, 3)), sl.logm(f).real, rtol=0, atol=5e-14)


@pytest.mark.parametrize("scale", [1e-3, 0.1, 0.5, 2.0])
def test_the_kernels_expm_and_frechet_derivative_equal_scipys(rng, scale):
    for a, e in zip(scale * rng.normal(size=(100, 3, 3)), rng.normal(size=(100, 3, 3))):
        size = np.exp(np.abs(a).sum())
        got = np.reshape(kernel._expm(_tuple(a)), (3, 3))
        assert np.abs(got - sl.expm(a)).max() / size < 1e-13
        got = np.reshape(kernel._expm_frechet(_tuple(a), _tuple(e)), (3, 3))
        assert np.abs(got - sl.expm_frechet(a, e, compute_expm=False)).max() / size < 1e-13


def _inside_out(states):
    states[1].cell = -states[1].cell


def _singular_now(states):
    states[1].cell = states[1].cell.copy()
    states[1].cell[2] = states[1].cell[0] + states[1].cell[1]


def _singular_at_start(states):
    states[1].orig_cell = np.zeros((3, 3))


@pytest.mark.parametrize("skewed", [True, False])
@pytest.mark.parametrize("broken", [_inside_out, _singular_now, _singular_at_start])
def test_a_cell_without_a_step_is_named_and_the_others_are_untouched(rng, skewed, broken):
    """A cell turned inside out, singular now or singular at the start (skewed or orthorhombic: exact
    zeros): CellAlgebraError names its place in the batch, from the forces and from the step's own
    logarithm, and no state changes."""
    states = _batch(rng, with_cell=True, count=3)
    if not skewed:
        for s in states:
            s.cell = s.orig_cell = np.diag(rng.uniform(6, 12, 3))
    broken(states)
    before = copy.deepcopy(states)
    forces = [np.ones((len(s.positions), 3)) for s in states]
    with pytest.raises(CellAlgebraError) as raised:
        generalized_forces_many(states, forces, [np.eye(3)] * 3)
    assert raised.value.positions == [1]
    rows = [np.ones((len(s.positions) + 3, 3)) for s in states]
    with pytest.raises(CellAlgebraError) as raised:  # log_deform None: fire_steps finds it itself
        fire_steps(states, rows, FireParams(), True)
    assert raised.value.positions == [1]
    for a, b in zip(states, before):
        np.testing.assert_array_equal(a.positions, b.positions)
        np.testing.assert_array_equal(a.velocity, b.velocity)
        assert a.steps == b.steps == 0


def test_a_step_to_a_cell_without_an_inverse_is_refused(rng):
    """The step itself checks the cell it reads: one made singular after its forces were found."""
    states = _batch(rng, with_cell=True, count=3)
    g = generalized_forces_many(states, [np.ones((len(s.positions), 3)) for s in states], [np.eye(3)] * 3)
    states[2].cell = np.zeros((3, 3))
    with pytest.raises(CellAlgebraError) as raised:
        fire_steps(states, g, FireParams(), True)
    assert raised.value.positions == [2]
    assert all(s.steps == 0 for s in states)


def test_forces_of_the_wrong_shape_are_refused(rng):
    states = _batch(rng, with_cell=False, count=3)
    sizes = [len(s.positions) for s in states]
    with pytest.raises(ValueError, match=r"\[n, 3\]"):
        generalized_forces_many(states, [np.zeros((2, 3))] * 3, None)
    uneven = [np.zeros((sizes[0] + 1, 3)), np.zeros((sizes[1] - 1, 3)), np.zeros((sizes[2], 3))]  # same total
    with pytest.raises(ValueError, match=r"\[n, 3\]"):
        generalized_forces_many(states, uneven, None)
    with pytest.raises(ValueError, match=r"\[n, 3\]"):
        generalized_forces_many(states, [np.zeros((n * 3, 1)) for n in sizes], None)
    with pytest.raises(ValueError, match="rows"):
        fire_steps(states, [np.zeros((2, 3))] * 3, FireParams(), False)


def test_a_state_of_the_wrong_kind_is_refused_before_any_compiled_write(rng):
    """Velocities of an atoms-only state stepped with the cell (3 rows short), or a fixed mask of the
    wrong length: ValueError (the compiled loops check no bounds)."""
    states = _batch(rng, with_cell=False, count=3)
    rows = [np.zeros((len(s.positions) + 3, 3)) for s in states]
    with pytest.raises(ValueError, match="velocity"):
        fire_steps(states, rows, FireParams(), True)
    states[0].fixed = states[0].fixed[:-1]
    with pytest.raises(ValueError, match="fixed"):
        generalized_forces_many(states, [np.zeros((len(s.positions), 3)) for s in states], None)


def test_a_structure_without_atoms_is_refused(rng):
    states = _batch(rng, with_cell=False, count=3)
    states[1] = FireState.start(np.zeros((0, 3)), np.eye(3), np.zeros(0, bool), FireParams(), False)
    with pytest.raises(ValueError, match="none"):
        generalized_forces_many(states, [np.zeros((len(s.positions), 3)) for s in states], None)
    with pytest.raises(ValueError, match="none"):
        fire_steps(states, [np.zeros((len(s.positions), 3)) for s in states], FireParams(), False)


def test_dt_grows_to_dtmax_as_the_reference(rng):
    """Forces that stay downhill for 40 steps: dt grows by finc to dtmax and stays; the same bits."""
    states = _batch(rng, with_cell=False, count=20)
    ref = copy.deepcopy(states)
    forces = [rng.standard_normal((len(s.positions), 3)) for s in states]
    for _ in range(40):
        fire_steps(states, generalized_forces_many(states, forces, None), FireParams(), False)
        fire_steps_reference(ref, generalized_forces_reference(ref, forces, None), FireParams(), False)
    assert {s.dt for s in states} == {FireParams().dtmax}
    for a, b in zip(states, ref):
        np.testing.assert_array_equal(a.positions, b.positions)
        assert (a.dt, a.a, a.n_positive) == (b.dt, b.a, b.n_positive)


def test_rows_read_as_a_list_and_take_structures_in_any_order(rng):
    arrays = [rng.standard_normal((n, 3)) for n in (3, 1, 4)]
    rows = Rows.of(arrays)
    assert Rows.of(rows) is rows and len(rows) == 3 and rows.start.dtype == np.int64
    for got, want in zip(rows, arrays):
        np.testing.assert_array_equal(got, want)
    picked = rows.take(np.array([2, 0]))
    assert len(picked) == 2
    np.testing.assert_array_equal(picked[0], arrays[2])
    np.testing.assert_array_equal(picked[1], arrays[0])
    assert rows.take(np.arange(3)) is rows
    assert len(rows.take(np.array([], dtype=np.int64))) == 0
    with pytest.raises(ValueError, match=r"\[n, 3\]"):
        Rows.of([np.zeros((2, 2))])
