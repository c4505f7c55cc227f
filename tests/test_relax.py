"""painn-batch relax: ASE's FIRE batched, in flight, with exact skin graphs and an exact resume."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from ase.build import bulk, fcc111
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms
from ase.filters import FrechetCellFilter
from ase.optimize import FIRE
from click.testing import CliRunner

from painn_export import TargetNormalization, save_model
from painn_export.ase import PaiNNCalculator
from painn_export.batch import canonical_graph, reverse_edges
from painn_export.export import export_onnx
from painn_export.neighbors import neighbor_graph
from painn_export.schema import validate_input, write_input
from painn_export.skin import SkinGraph
from painn_export.tolerances import compare, tolerance
from pipelines.cli import main
from pipelines.fire import FireParams, FireState, fire_step, generalized_forces
from pipelines.output import STATUS
from pipelines.relax import RelaxSettings, relax_file

from conftest import SMALL, make_model

ROOT = Path(__file__).resolve().parents[1]
CLI = "import sys; from pipelines.cli import main; sys.exit(main())"


@pytest.fixture(scope="module")
def demo64(tmp_path_factory):
    """The bundled demo model (trained on EMT; direct forces, no stress) exported in float64."""
    from painn_export.checkpoint import load_model
    from painn_export.demo import demo_model_path

    model = load_model(demo_model_path()).double().eval()
    return export_onnx(model, tmp_path_factory.mktemp("demo") / "demo64.onnx", dtype=torch.float64)


@pytest.fixture(scope="module")
def stress_pt(tmp_path_factory):
    """A small random gradient-force checkpoint (stress; not physical: its atoms run together)."""
    config = dataclasses.replace(SMALL, direct_forces=False)
    model = make_model(config, torch.float32, normalization=TargetNormalization(energy_std=0.1))
    return save_model(model, tmp_path_factory.mktemp("stress") / "stress.pt")


def assert_close(quantity: str, got, want, comparison: str, dtype: str, where: str = "") -> None:
    """``got`` within the tolerance table's bound for ``(comparison, dtype, quantity)``."""
    result = compare(quantity, got, want, tolerance(comparison, dtype, quantity))
    assert result.passed, f"{comparison} {where}: {result.describe()}"


def _fixed_of(atoms) -> np.ndarray:
    mask = np.zeros(len(atoms), bool)
    for c in atoms.constraints:
        mask[c.index] = True
    return mask


def _write(path, structures) -> Path:
    rows = [(a.numbers, a.positions, a.cell[:], a.pbc) for a in structures]
    return write_input(path, rows, fixed=[_fixed_of(a) for a in structures])


def _cu(seed, repeat=(2, 1, 1), rattle=0.1, a=3.61):
    atoms = bulk("Cu", "fcc", a=a, cubic=True).repeat(repeat)
    atoms.rattle(rattle, seed=seed)
    return atoms


def _slab(seed):
    atoms = fcc111("Pt", size=(2, 2, 3), vacuum=6.0)
    atoms.rattle(0.1, seed=seed)
    atoms.set_constraint(FixAtoms(indices=range(4)))  # the bottom layer, as OC20 slabs
    return atoms


def _results(path):
    with h5py.File(path) as fh:
        return {k: fh[k][...] for k in ("positions", "cell", "energy", "forces", "steps", "status")}


# -- the optimiser alone ----------------------------------------------------------


@pytest.mark.parametrize("with_cell", [False, True])
def test_fire_state_follows_ase_fire_step_by_step(with_cell):
    """Fed the same forces (EMT), FireState takes ASE FIRE's steps, fixed atoms and the cell included."""
    atoms = _cu(2, repeat=(2, 2, 1), a=3.7)
    atoms.cell[0, 1] += 0.2
    atoms.set_constraint(FixAtoms(indices=[0, 3]))
    ase_atoms = atoms.copy()
    ase_atoms.calc = EMT()
    want = []
    opt = FIRE(FrechetCellFilter(ase_atoms) if with_cell else ase_atoms, logfile=None)
    opt.attach(lambda: want.append((ase_atoms.positions.copy(), ase_atoms.cell[:].copy())))
    opt.run(fmax=1e-9, steps=40)

    state = FireState.start(atoms.positions, atoms.cell[:], _fixed_of(atoms), FireParams(), with_cell)
    got = [(state.positions.copy(), state.cell.copy())]
    probe = atoms.copy()
    probe.set_constraint()
    probe.calc = EMT()
    for _ in range(40):
        probe.positions[:] = state.positions
        probe.cell[:] = state.cell
        stress = probe.get_stress(voigt=False) if with_cell else None
        fire_step(state, generalized_forces(state, probe.get_forces(), stress), FireParams(), with_cell)
        got.append((state.positions.copy(), state.cell.copy()))
    assert len(want) == len(got) == 41
    for step, ((x, c), (x_ase, c_ase)) in enumerate(zip(got, want)):
        comparison = "fire_cell_vs_ase" if with_cell else "fire_vs_ase"
        assert_close("positions", x, x_ase, comparison, "float64", f"step {step}")
        assert_close("cell", c, c_ase, comparison, "float64", f"step {step}")
    # Fixed atoms keep their fractional coordinates (their Cartesian ones without the cell).
    frac = got[-1][0][[0, 3]] @ np.linalg.inv(got[-1][1])
    np.testing.assert_allclose(frac, atoms.positions[[0, 3]] @ np.linalg.inv(atoms.cell[:]), atol=1e-12)
    if not with_cell:
        np.testing.assert_array_equal(got[-1][0][[0, 3]], atoms.positions[[0, 3]])


@pytest.mark.parametrize("with_cell", [False, True])
def test_fire_steps_give_each_structure_what_it_gets_alone(with_cell):
    """A structure's FIRE steps (and generalised forces) do not depend on the others in the batch."""
    from pipelines.fire import fire_steps, generalized_forces_many

    structures = [
        _cu(k, repeat=r, rattle=0.1) for k, r in enumerate([(2, 1, 1), (2, 2, 1), (1, 1, 1), (2, 2, 2)])
    ]
    structures[1].cell[0, 1] += 0.2
    fixed = [np.arange(len(a)) % 3 == 0 for a in structures]
    together = [
        FireState.start(a.positions, a.cell[:], f, FireParams(), with_cell) for a, f in zip(structures, fixed)
    ]
    alone = [
        FireState.start(a.positions, a.cell[:], f, FireParams(), with_cell) for a, f in zip(structures, fixed)
    ]

    def forces(states):
        out = []
        for atoms, state in zip(structures, states):
            probe = atoms.copy()
            probe.positions[:], probe.cell[:] = state.positions, state.cell
            probe.calc = EMT()
            out.append((probe.get_forces(), probe.get_stress(voigt=False) if with_cell else None))
        return out

    for _ in range(12):
        f = forces(together)
        stress = [s for _, s in f] if with_cell else None
        fire_steps(
            together, generalized_forces_many(together, [x for x, _ in f], stress), FireParams(), with_cell
        )
        for state, (x, st) in zip(alone, forces(alone)):
            g = generalized_forces_many([state], [x], None if st is None else [st])
            fire_steps([state], g, FireParams(), with_cell)
    for a, b in zip(together, alone):
        for key in ("positions", "cell", "velocity"):
            np.testing.assert_array_equal(getattr(a, key), getattr(b, key), err_msg=key)
        assert (a.dt, a.a, a.n_positive, a.steps) == (b.dt, b.a, b.n_positive, b.steps)


# -- the pipeline against ASE ------------------------------------------------------


def test_relax_equals_ase_fire_with_the_calculator(tmp_path, demo64):
    """Each structure's steps, status, geometry and energy equal ASE FIRE's with PaiNNCalculator."""
    structures = [_cu(0), _cu(1), _slab(1), _cu(2)]
    inp = _write(tmp_path / "in.h5", structures)
    out = tmp_path / "out.h5"
    # 40 atoms a batch: the 16-atom bulks and the 12-atom slab come and go in flight.
    settings = RelaxSettings(fmax=0.02, steps=100, trajectory_every=5)
    summary = relax_file(inp, out, demo64, settings=settings, workers=0, max_atoms=40)
    got = _results(out)
    with h5py.File(out) as fh:
        frames, frame_energy = fh["trajectory_positions"][...], fh["trajectory_energy"][...]
    assert summary.counts == {"converged": 4}
    offsets = np.concatenate([[0], np.cumsum([len(a) for a in structures])])
    for s, atoms in enumerate(structures):
        atoms.calc = PaiNNCalculator.from_file(demo64, device="cpu")
        opt = FIRE(atoms, logfile=None)
        path = []

        def keep(path=path, atoms=atoms):
            path.append((atoms.positions.copy(), atoms.get_potential_energy()))

        opt.attach(keep)
        assert opt.run(fmax=0.02, steps=100)
        a0, a1 = offsets[s], offsets[s + 1]
        for f, (x_ase, e_ase) in enumerate(path[::5]):  # step for step: every 5th step kept
            where = f"structure {s} step {5 * f}"
            assert_close("positions", frames[a0:a1, f], x_ase, "relax_vs_ase", "float64", where)
            assert_close(
                "energy",
                frame_energy[s, f] / len(atoms),
                e_ase / len(atoms),
                "relax_vs_ase",
                "float64",
                where,
            )
        assert np.isnan(frame_energy[s, len(path[::5]) :]).all()
        assert got["steps"][s] == opt.nsteps, f"structure {s}: steps differ from ASE's"
        assert_close("positions", got["positions"][a0:a1], atoms.positions, "relax_vs_ase", "float64")
        e_ase = atoms.get_potential_energy() / len(atoms)
        assert_close("energy", got["energy"][s] / len(atoms), e_ase, "relax_vs_ase", "float64")
        fixed = _fixed_of(atoms)
        np.testing.assert_array_equal(got["positions"][a0:a1][fixed], atoms.positions[fixed])


def test_relax_cell_equals_ase_fire_with_frechet_cell_filter(tmp_path, stress_pt):
    """--cell: the cell and positions follow FIRE on ASE's FrechetCellFilter, fixed atoms too."""
    structures = [_cu(3, rattle=0.05), _cu(4, rattle=0.05)]
    structures[1].cell[0, 1] += 0.1
    structures[1].set_constraint(FixAtoms(indices=[1]))
    inp = _write(tmp_path / "in.h5", structures)
    out = tmp_path / "out.h5"
    steps = 8  # a random model: a few steps, before its atoms run together
    settings = RelaxSettings(fmax=1e-6, steps=steps, cell=True)
    relax_file(inp, out, stress_pt, settings=settings, runtime="torch", device="cpu", workers=0)
    got = _results(out)
    offsets = np.concatenate([[0], np.cumsum([len(a) for a in structures])])
    for s, atoms in enumerate(structures):
        start = atoms.cell[:].copy()
        atoms.calc = PaiNNCalculator.from_file(stress_pt, "torch", device="cpu")
        FIRE(FrechetCellFilter(atoms), logfile=None).run(fmax=1e-6, steps=steps)
        assert got["status"][s] == STATUS["not_converged"] and got["steps"][s] == steps
        x = got["positions"][offsets[s] : offsets[s + 1]]
        assert_close("cell", got["cell"][s], atoms.cell[:], "relax_vs_ase", "float32", f"structure {s}")
        assert_close("positions", x, atoms.positions, "relax_vs_ase", "float32", f"structure {s}")
        assert np.abs(got["cell"][s] - start).max() > 1e-4, "the cell did not move"


# -- graphs -------------------------------------------------------------------------


def _emt_frames(atoms, with_cell: bool) -> list:
    """(positions, cell) at each step of an ASE FIRE relaxation of ``atoms`` with EMT."""
    atoms.calc = EMT()
    frames = []
    opt = FIRE(FrechetCellFilter(atoms) if with_cell else atoms, logfile=None)
    opt.attach(lambda: frames.append((atoms.positions.copy(), atoms.cell[:].copy())))
    opt.run(fmax=0.01, steps=60)
    return frames


def test_skin_graph_equals_fresh_graphs_along_a_relaxation():
    """Along FIRE/EMT relaxations (atoms, then the cell), the skin list gives the fresh graph exactly."""
    for with_cell in (False, True):
        atoms = _cu(5, repeat=(2, 2, 1), rattle=0.15)
        frames = _emt_frames(atoms, with_cell)
        skin = SkinGraph(5.0, 12, skin=1.0)
        assert len(frames) > 20
        for x, cell in frames:
            got = skin.update(atoms.numbers, x, cell, atoms.pbc)  # used as it is: no second ordering
            want = canonical_graph(neighbor_graph(x, cell, atoms.pbc, 5.0, 12, atomic_numbers=atoms.numbers))
            for key in ("edge_index", "cell_shift", "edge_shift", "edge_slot", "edge_reverse"):
                np.testing.assert_array_equal(getattr(got, key), getattr(want, key), err_msg=key)
                assert getattr(got, key).dtype == getattr(want, key).dtype, key
            fresh = neighbor_graph(x, cell, atoms.pbc, 5.0, 12, atomic_numbers=atoms.numbers)
            np.testing.assert_array_equal(got.edge_reverse, reverse_edges(got.edge_index, got.cell_shift))
            np.testing.assert_array_equal(got.min_distance, fresh.min_distance)
        # The cell moving too: searched again only when the strain and the atoms can bring a pair in.
        assert skin.n_searches < len(frames) // 3, "the skin list was searched nearly every step"


def test_skin_graph_under_strain_equals_fresh_graphs():
    """A cell strained step by step (shear and stretch, 3 %), atoms jiggling: the exact graph each time."""
    atoms = _cu(7, repeat=(2, 2, 2), rattle=0.1)
    z, x0, cell0, pbc = atoms.numbers, atoms.positions, atoms.cell[:], atoms.pbc
    skin = SkinGraph(5.0, 12, skin=1.0)
    rng = np.random.default_rng(0)
    steps = 60
    for t in range(steps):
        shear = np.array([[0.03, 0.01, 0.0], [0.0, -0.02, 0.01], [0.01, 0.0, 0.02]])
        strain = np.eye(3) + (t / steps) * shear
        x = x0 @ strain + 0.02 * rng.standard_normal(x0.shape)
        cell = cell0 @ strain
        got = skin.update(z, x, cell, pbc)
        want = canonical_graph(neighbor_graph(x, cell, pbc, 5.0, 12, atomic_numbers=z))
        for key in ("edge_index", "cell_shift", "edge_shift", "edge_slot", "edge_reverse"):
            np.testing.assert_array_equal(getattr(got, key), getattr(want, key), err_msg=f"step {t} {key}")
    assert skin.n_searches < steps // 4, f"searched {skin.n_searches} times in {steps} steps"


def test_canonical_order_does_not_depend_on_the_search():
    """The same structure searched from two earlier geometries gives the same edge order."""
    atoms = _cu(6, repeat=(2, 2, 1), rattle=0.1)
    z, x, cell, pbc = atoms.numbers, atoms.positions, atoms.cell[:], atoms.pbc
    a, b = SkinGraph(5.0, 12, skin=1.0), SkinGraph(5.0, 12, skin=1.0)
    a.update(z, x + 0.2 * np.sin(np.arange(x.size)).reshape(x.shape), cell, pbc)
    b.update(z, x - 0.2 * np.cos(np.arange(x.size)).reshape(x.shape), cell, pbc)
    ga, gb = canonical_graph(a.update(z, x, cell, pbc)), canonical_graph(b.update(z, x, cell, pbc))
    np.testing.assert_array_equal(ga.edge_index, gb.edge_index)
    np.testing.assert_array_equal(ga.cell_shift, gb.cell_shift)


# -- in-flight batching ---------------------------------------------------------------


def _observed(tmp_path, inp, model, max_atoms: int, steps: int, fmax: float = 0.05, probe=None):
    """relax_file's summary and, per model call, (structures in the batch, its atoms, smallest waiting).

    ``probe()``, when given, is called before each model call too.
    """
    calls = []

    def observer(members, atoms, following):
        calls.append((list(members), atoms, following))
        if probe is not None:
            probe()

    summary = relax_file(
        inp,
        tmp_path / "observed.h5",
        model,
        settings=RelaxSettings(fmax=fmax, steps=steps),
        workers=0,
        max_atoms=max_atoms,
        observer=observer,
    )
    return summary, calls


def test_batch_stays_full_while_structures_remain(tmp_path, demo64):
    """A structure leaves when it ends, the next enters at once: no call runs a batch the next would fit."""
    structures = [_cu(k, repeat=(1 + k % 2, 1, 1), rattle=0.05 + 0.02 * (k % 3)) for k in range(10)]
    _, calls = _observed(tmp_path, _write(tmp_path / "in.h5", structures), demo64, 36, 60)
    waiting = [(m, atoms, nxt) for m, atoms, nxt in calls if nxt is not None]
    assert waiting, "every structure fitted at once: nothing to refill"
    for members, atoms, following in waiting:
        assert atoms <= 36 and atoms + following > 36, f"batch {members} had room for the next"
    entered = {}
    for k, (members, _, _) in enumerate(calls):
        for s in members:
            entered.setdefault(s, k)
    assert sorted(entered) == list(range(10)) and sorted(entered.values()) == list(entered.values())
    late = [s for s, k in entered.items() if k > 0]
    assert any(entered[s] > 0 and set(calls[entered[s] - 1][0]) - {s} for s in late), "no refill mid-run"


# -- statuses -------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["forces", "step"])
def test_a_cell_without_a_step_diverges_alone(tmp_path, stress_pt, monkeypatch, where):
    """--cell: a structure whose cell algebra fails (turned inside out before its forces, or left
    without an inverse before its step) leaves as diverged with why; the others relax on."""
    import pipelines.relax as relax_module

    calls = {"n": 0}
    name = "generalized_forces_many" if where == "forces" else "fire_steps"
    real = getattr(relax_module, name)

    def breaking(states, *args):
        calls["n"] += 1
        if calls["n"] == 3:  # the third step: break the batch's second structure
            states[1].cell = -states[1].cell if where == "forces" else np.zeros((3, 3))
        return real(states, *args)

    monkeypatch.setattr(
        relax_module, "generalized_forces_many" if where == "forces" else "fire_steps", breaking
    )
    inp = _write(tmp_path / "in.h5", [_cu(k, rattle=0.05) for k in range(3)])
    out = tmp_path / "out.h5"
    summary = relax_file(
        inp, out, stress_pt, settings=RelaxSettings(fmax=1e-6, steps=5, cell=True),
        runtime="torch", device="cpu", workers=0,
    )  # fmt: skip
    got = _results(out)
    assert [int(x) for x in got["status"]] == [
        STATUS["not_converged"],
        STATUS["diverged"],
        STATUS["not_converged"],
    ]
    assert list(got["steps"][[0, 2]]) == [5, 5]
    with h5py.File(out) as fh:
        message = fh["message"][1].decode()
    assert message.startswith("the cell has no step" if where == "forces" else "the cell step failed"), (
        message
    )
    assert summary.counts == {"not_converged": 2, "diverged": 1}


def test_every_status(tmp_path, demo64, stress_pt):
    """converged, not_converged, diverged, and run's input statuses, each with its data or message."""
    rows = [(a.numbers, a.positions, a.cell[:], a.pbc) for a in (_cu(0, rattle=0.0), _cu(1, rattle=0.2))] + [
        (np.array([29, 29]), np.array([[0.0, 0, 0], [np.nan, 0, 0]]), np.eye(3) * 5, [True] * 3),
        (np.array([29, 29]), np.array([[0.0, 0, 0], [1.0, 0, 0]]), np.zeros((3, 3)), [True] * 3),
        (np.array([29, 120]), np.array([[0.0, 0, 0], [2.0, 0, 0]]), np.zeros((3, 3)), [False] * 3),
        (np.zeros(0, int), np.zeros((0, 3)), np.zeros((3, 3)), [False] * 3),
        (np.array([29, 29]), np.array([[0.0, 0, 0], [0.2, 0, 0]]), np.zeros((3, 3)), [False] * 3),
    ]
    inp = write_input(tmp_path / "in.h5", rows)
    out = tmp_path / "out.h5"
    args = ["relax", str(inp), "--model", str(demo64), "-o", str(out), "--workers", "0", "-q"]
    result = CliRunner().invoke(main, [*args, "--steps", "5", "--json"])
    assert result.exit_code == 3, result.output
    got = _results(out)
    names = {v: k for k, v in STATUS.items()}
    assert [names[int(c)] for c in got["status"]] == [
        "converged",
        "not_converged",
        "nonfinite_positions",
        "bad_cell",
        "unknown_element",
        "empty_structure",
        "atoms_too_close",
    ]
    assert got["steps"][1] == 5 and np.isfinite(got["energy"][:2]).all()
    assert np.isfinite(got["positions"][:16]).all() and np.isnan(got["energy"][2:]).all()
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["status_counts"]["converged"] == 1 and report["steps"] == got["steps"][:2].sum()

    # diverged: a random model runs its atoms together.
    inp2 = _write(tmp_path / "in2.h5", [_cu(3)])
    summary = relax_file(
        inp2, tmp_path / "d.h5", stress_pt, settings=RelaxSettings(steps=200), runtime="torch", workers=0
    )
    assert summary.counts == {"diverged": 1}
    with h5py.File(tmp_path / "d.h5") as fh:
        assert "apart" in fh["message"][0].decode()
        assert 0 < fh["steps"][0] < 200 and np.isfinite(fh["positions"][...]).all()

    # --cell: a model without stress is one line and exit 2; a cluster is a bad_cell.
    result = CliRunner().invoke(main, [*args, "--cell", "--overwrite"])
    assert result.exit_code == 2 and "--cell needs a model with stress" in result.output
    assert len(result.output.strip().splitlines()) == 1
    cluster = _cu(0)
    cluster.pbc = False
    inp3 = _write(tmp_path / "in3.h5", [cluster])
    summary = relax_file(
        inp3, tmp_path / "c.h5", stress_pt, settings=RelaxSettings(cell=True), runtime="torch", workers=0
    )
    assert summary.counts == {"bad_cell": 1}


def _device_of(monkeypatch, atoms: int, attempts: list):
    """Every runner loaded from now on fails (BatchTooLargeError) on feeds above ``atoms`` atoms.

    ``attempts`` gets ``(atoms in the feed, failed)`` for each inference tried.
    """
    import painn_export.runners as runners
    from painn_export.errors import BatchTooLargeError

    loader_for = runners.loader_for

    def small_device(*args, **kwargs):
        loader = loader_for(*args, **kwargs)
        make_runner = loader.runner

        def runner(*a, **k):
            runner = make_runner(*a, **k)
            infer = runner.infer

            def limited(feed):
                n = len(feed["atomic_numbers"])
                attempts.append((n, n > atoms))
                if n > atoms:
                    raise BatchTooLargeError(f"out of memory (a test's {atoms}-atom device)")
                return infer(feed)

            runner.infer = limited
            return runner

        loader.runner = runner
        return loader

    monkeypatch.setattr(runners, "loader_for", small_device)


def test_a_structure_too_large_alone_leaves_the_others_relaxing(tmp_path, demo64, monkeypatch):
    """A batch the runtime cannot fit is halved; a structure that fails alone is too_large."""
    _device_of(monkeypatch, 20, [])
    inp = _write(tmp_path / "in.h5", [_cu(0), _cu(1, repeat=(2, 2, 2)), _cu(2)])
    summary = relax_file(inp, tmp_path / "out.h5", demo64, settings=RelaxSettings(fmax=0.05), workers=0)
    assert summary.counts == {"converged": 2, "too_large": 1}
    got = _results(tmp_path / "out.h5")
    assert got["status"][1] == STATUS["too_large"] and got["steps"][1] == 0
    with h5py.File(tmp_path / "out.h5") as fh:
        assert "failed alone in a batch: out of memory" in fh["message"][1].decode()


def test_a_batch_that_failed_for_memory_lowers_the_budget_for_what_follows(tmp_path, demo64, monkeypatch):
    """relax and run: after the first batch fails, no attempt fails again; batches stay within half of it."""
    attempts: list = []
    _device_of(monkeypatch, 20, attempts)
    structures = [_cu(k, repeat=(2, 1, 1), rattle=0.05) for k in range(6)]  # 8 atoms each
    inp = _write(tmp_path / "in.h5", structures)
    tried = []  # attempts made before each model call
    summary, _ = _observed(tmp_path, inp, demo64, 48, 60, probe=lambda: tried.append(len(attempts)))
    assert summary.counts == {"converged": 6} and summary.as_dict()["memory_atoms"] == 12
    first_call = attempts[: tried[1]]  # the attempts of model call 1: 48 atoms failed, then its halves
    assert first_call[0] == (48, True) and any(failed for _, failed in first_call[1:])
    later = attempts[tried[1] :]
    assert later and not any(failed for _, failed in later), "a size that failed was tried again"
    assert max(n for n, _ in later) <= 12

    # run: the first batch of 6 fails (48 atoms, then 24: then every piece is within 12); so does the next.
    attempts.clear()
    from pipelines.run import run_file

    inp = _write(tmp_path / "in12.h5", structures * 2)
    run = run_file(inp, tmp_path / "run.h5", demo64, workers=0, max_atoms=48, progress=False)
    assert run.counts == {"ok": 12} and run.memory_atoms == 12
    assert [n for n, failed in attempts if failed] == [48, 24]
    assert attempts[0] == (48, True) and max(n for n, _ in attempts[8:]) <= 12


def test_resume_after_a_memory_failure_packs_as_before(tmp_path, demo64, monkeypatch):
    """The lowered budget is in the checkpoint: a stop after a memory failure, then --resume, is bitwise."""
    from pipelines.output import RunInterruptedError

    _device_of(monkeypatch, 20, [])
    inp = _write(tmp_path / "in.h5", [_cu(k, repeat=(2, 1, 1), rattle=0.1) for k in range(8)])
    kw = {"settings": RelaxSettings(fmax=0.01, steps=60), "workers": 0, "max_atoms": 48, "progress": False}
    relax_file(inp, tmp_path / "ref.h5", demo64, **kw)
    out = tmp_path / "out.h5"
    with pytest.raises(RunInterruptedError):
        relax_file(inp, out, demo64, observer=_stop_at_call(4, signal.SIGTERM), **kw)
    with h5py.File(tmp_path / "out.ckpt.h5") as fh:
        assert fh.attrs["memory_atoms"] == 12
    relax_file(inp, out, demo64, resume=True, **kw)
    got, want = _results(out), _results(tmp_path / "ref.h5")
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_a_structure_that_does_not_fit_does_not_hold_back_those_behind_it(tmp_path, demo64):
    """Up to WINDOW structures wait while later ones that fit enter; the large one still relaxes."""
    small = [_cu(k, repeat=(2, 1, 1), rattle=0.05) for k in range(6)]  # 8 atoms
    large = _cu(9, repeat=(2, 2, 2), rattle=0.05)  # 32 atoms
    structures = [*small[:2], large, *small[2:]]  # 8 + 8, then 32 does not fit in 40
    summary, calls = _observed(tmp_path, _write(tmp_path / "in.h5", structures), demo64, 40, 100)
    assert summary.counts == {"converged": 7}
    entered = {}
    for k, (members, _, _) in enumerate(calls):
        for s in members:
            entered.setdefault(s, k)
    assert entered[0] == entered[1] == entered[3] == entered[4] == 0, "the small ones behind it waited"
    assert entered[2] > 0
    for members, atoms, following in calls:  # never room for a waiting structure
        assert atoms <= 40 and (following is None or atoms + following > 40), (members, atoms, following)


def test_a_waiting_structure_passed_patience_times_lets_nothing_more_pass(tmp_path, demo64, monkeypatch):
    import pipelines.relax as relax

    monkeypatch.setattr(relax, "PATIENCE", 1)
    small = [_cu(k, repeat=(2, 1, 1), rattle=0.05) for k in range(6)]
    structures = [*small[:2], _cu(9, repeat=(2, 2, 2), rattle=0.05), *small[2:]]
    _, calls = _observed(tmp_path, _write(tmp_path / "in.h5", structures), demo64, 40, 100)
    entered = {}
    for k, (members, _, _) in enumerate(calls):
        for s in members:
            entered.setdefault(s, k)
    before = [s for s in range(3, 7) if entered[s] < entered[2]]
    assert before == [3], f"passed by {before}, not by exactly one (PATIENCE = 1)"


def test_resume_rebuilds_the_waiting_structures_bitwise(tmp_path, demo64, monkeypatch):
    """A stop while structures wait, one of them passed: the checkpoint names them and how often each
    was passed (PATIENCE is low here, so it counts), and --resume equals the uninterrupted run."""
    import pipelines.relax as relax
    from pipelines.output import RunInterruptedError

    monkeypatch.setattr(relax, "PATIENCE", 2)
    small = [_cu(k, repeat=(2, 1, 1), rattle=0.02) for k in range(6)]  # 8 atoms, quick to converge
    big = [_cu(k, repeat=(2, 2, 2), rattle=0.1) for k in range(2)]  # 32 atoms
    inp = _write(tmp_path / "in.h5", [small[0], *big, *small[1:]])  # the second big one waits, passed
    _, calls = _observed(tmp_path, inp, demo64, 40, 60, fmax=0.02)
    entered: dict = {}
    for k, (members, _, _) in enumerate(calls):
        for s in members:
            entered.setdefault(s, k)
    # The first call after a structure entered ahead of an earlier one still waiting.
    stop = 1 + min(entered[s] for s in entered if any(entered[w] > entered[s] for w in range(s)))
    kw = {"settings": RelaxSettings(fmax=0.02, steps=60), "workers": 0, "max_atoms": 40, "progress": False}
    relax_file(inp, tmp_path / "ref.h5", demo64, **kw)
    out = tmp_path / "out.h5"
    with pytest.raises(RunInterruptedError):
        relax_file(inp, out, demo64, observer=_stop_at_call(stop + 1, signal.SIGTERM), **kw)
    with h5py.File(tmp_path / "out.ckpt.h5") as fh:
        waiting = fh["waiting"][...]
        assert len(waiting) and (waiting[:, 0] < fh.attrs["next_index"]).all() and waiting[:, 1].any()
    relax_file(inp, out, demo64, resume=True, **kw)
    got, want = _results(out), _results(tmp_path / "ref.h5")
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_run_and_relax_do_not_resume_each_others_files(tmp_path, demo64):
    inp = _write(tmp_path / "in.h5", [_cu(0)])
    out = tmp_path / "out.h5"
    relax_file(inp, out, demo64, settings=RelaxSettings(steps=3), workers=0)
    args = [str(inp), "--model", str(demo64), "-o", str(out), "--workers", "0", "-q", "--resume"]
    result = CliRunner().invoke(main, ["run", *args])
    assert result.exit_code == 1 and "written by another painn-batch command" in result.output
    result = CliRunner().invoke(main, ["relax", *args, "--steps", "4"])
    assert result.exit_code == 1 and "max_steps=3" in result.output


def test_fixed_mask_schema_and_convert_round_trip(tmp_path, caplog):
    """FixAtoms -> convert -> 'fixed' -> the reader (others dropped, with a warning); bad 'fixed' refused."""
    import ase.io
    from ase.constraints import FixBondLength

    from painn_export.schema import InputReader, SchemaError
    from pipelines.convert import convert

    slab = _slab(0)
    ase.io.write(tmp_path / "s.extxyz", [slab, _cu(0)])
    convert(tmp_path / "s.extxyz", tmp_path / "s.h5")
    with InputReader(tmp_path / "s.h5") as reader:
        np.testing.assert_array_equal(reader.fixed(0, 1), _fixed_of(slab))
        assert not reader.fixed(1, 2).any()
    bonded = _cu(1)
    bonded.set_constraint([FixAtoms(indices=[0]), FixBondLength(1, 2)])
    ase.io.write(tmp_path / "b.traj", bonded)
    with caplog.at_level("WARNING"):
        convert(tmp_path / "b.traj", tmp_path / "b.h5")
    assert "FixBondLengths constraints, which the schema cannot hold: dropped" in caplog.text
    with InputReader(tmp_path / "b.h5") as reader:
        assert reader.fixed(0, 1).tolist() == [True] + [False] * 7
    plain = write_input(tmp_path / "plain.h5", [(a.numbers, a.positions, a.cell[:], a.pbc) for a in [_cu(0)]])
    with h5py.File(plain, "a") as fh:
        fh["fixed"] = np.zeros(3, bool)
    with pytest.raises(SchemaError, match="'fixed'"):
        validate_input(plain)


def test_export_writes_relaxed_geometry_and_fixed_atoms(tmp_path, demo64):
    import ase.io

    inp = _write(tmp_path / "in.h5", [_slab(2)])
    relax_file(inp, tmp_path / "out.h5", demo64, settings=RelaxSettings(steps=30), workers=0)
    result = CliRunner().invoke(
        main, ["export", str(tmp_path / "out.h5"), "--input", str(inp), "-o", str(tmp_path / "r.extxyz")]
    )
    assert result.exit_code == 0, result.output
    back = ase.io.read(tmp_path / "r.extxyz")
    np.testing.assert_allclose(back.positions, _results(tmp_path / "out.h5")["positions"], atol=1e-6)
    np.testing.assert_array_equal(_fixed_of(back), _fixed_of(_slab(2)))


# -- crash safety -----------------------------------------------------------------------


def _cli(args, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", CLI, *args], env=env, cwd=ROOT, **kw)


def _checkpoint_calls(ckpt: Path) -> int:
    """Model calls recorded by the checkpoint in force of a run another process is doing."""
    try:
        with h5py.File(ckpt, "r", locking=False) as fh:
            return int(fh.attrs["calls"])
    except (OSError, KeyError):
        return 0


def test_sigterm_and_sigkill_then_resume_is_bitwise_an_uninterrupted_run(tmp_path, demo64):
    structures = [_cu(k, repeat=(1 + k % 2, 1, 1), rattle=0.1) for k in range(14)] + [_slab(3)]
    inp = _write(tmp_path / "in.h5", structures)
    options = ["--model", str(demo64), "--max-atoms", "40", "--fmax", "0.01", "--workers", "0"]
    options += ["--checkpoint-every", "3", "-q", "--json"]
    ref = tmp_path / "ref.h5"
    assert _cli(["relax", str(inp), "-o", str(ref), *options]).wait(timeout=120) == 0

    out, partial, ckpt = tmp_path / "out.h5", tmp_path / "out.partial.h5", tmp_path / "out.ckpt.h5"
    # A scheduler's SIGTERM first (exit 143, work kept), then a SIGKILL mid-resume.
    for target, sig, resume in ((10, signal.SIGTERM, []), (40, signal.SIGKILL, ["--resume"])):
        args = ["relax", str(inp), "-o", str(out), *options, *resume]
        proc = _cli(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while _checkpoint_calls(ckpt) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=30)
        assert not out.exists(), "the run ended before the signal"
        if sig == signal.SIGKILL:
            assert proc.returncode == -signal.SIGKILL
        else:
            assert proc.returncode == 143 and "stopped by SIGTERM" in stderr.decode(), stderr.decode()
            assert "--resume" in stderr.decode() and not (tmp_path / "out.h5.lock").exists()
    proc = _cli(["relax", str(inp), "-o", str(out), *options, "--resume"], stdout=subprocess.PIPE)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and out.exists() and not partial.exists() and not ckpt.exists()
    assert json.loads(stdout.decode().strip().splitlines()[-1])["already_done"] > 0
    got, want = _results(out), _results(ref)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def _stop_at_call(k: int, sig: signal.Signals):
    """An observer that sends this process ``sig`` just before model call ``k`` (counted from 1)."""
    calls = []

    def observer(members, atoms, following):
        calls.append(list(members))
        if len(calls) == k:
            os.kill(os.getpid(), sig)

    return observer


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_stop_signal_writes_a_last_checkpoint_and_resume_is_bitwise(tmp_path, demo64, sig):
    """SIGTERM, SIGHUP, Ctrl-C: a last checkpoint at the step the signal came in; --resume continues it."""
    from pipelines.output import RunInterruptedError

    structures = [_cu(k, repeat=(1 + k % 2, 1, 1), rattle=0.1) for k in range(6)]
    inp = _write(tmp_path / "in.h5", structures)
    settings = RelaxSettings(fmax=0.01, steps=60, checkpoint_every=1000, trajectory_every=2)
    kw = {"settings": settings, "workers": 0, "max_atoms": 40, "progress": False}
    ref = relax_file(inp, tmp_path / "ref.h5", demo64, **kw)
    out, ckpt = tmp_path / "out.h5", tmp_path / "out.ckpt.h5"
    with pytest.raises(RunInterruptedError, match=f"stopped by {sig.name}"):
        relax_file(inp, out, demo64, observer=_stop_at_call(7, sig), **kw)
    # No checkpoint was due (every 1000 calls): this one is the signal's, taken before call 7.
    with h5py.File(ckpt) as fh:
        assert fh.attrs["calls"] == 6
        in_flight, steps_in_flight = fh["index"][...], fh["scalars"][:, 3]
        assert len(in_flight) and fh["positions"].shape[0] <= 40, "the checkpoint holds what is in flight"
    with h5py.File(tmp_path / "out.partial.h5", "a") as fh:
        assert not any(k.startswith("ckpt") for k in fh), "checkpoints live beside the output"
        final = fh["status"][...] != STATUS["pending"]
        steps_before = int(fh["steps"][...][final].sum())
        # What a killed run on a non-deterministic runtime may leave past a structure's new end.
        energy = fh["trajectory_energy"][...]
        fh["trajectory_energy"][...] = np.where(np.isnan(energy), 7.0, energy)
    summary = relax_file(inp, out, demo64, resume=True, **kw)
    assert not ckpt.exists() and not (tmp_path / "out.partial.h5").exists()
    got, want = _results(out), _results(tmp_path / "ref.h5")
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    with h5py.File(out) as fh, h5py.File(tmp_path / "ref.h5") as ref_fh:
        np.testing.assert_array_equal(fh["trajectory_energy"][...], ref_fh["trajectory_energy"][...])
        np.testing.assert_array_equal(fh["fmax"][...], ref_fh["fmax"][...])
        assert not any(k.startswith("ckpt") for k in fh)
    # This run's steps: not those taken before the signal.
    assert summary.steps == ref.steps - steps_before - int(steps_in_flight.sum())
    assert steps_in_flight.sum() > 0 and summary.steps < ref.steps


def test_fmax_dataset_is_the_final_largest_force(tmp_path, demo64):
    """``fmax`` [S]: the largest force on a free atom at the final geometry; NaN without one."""
    structures = [_cu(0), _slab(1), _cu(1, rattle=0.3)]
    inp = _write(tmp_path / "in.h5", structures)
    relax_file(inp, tmp_path / "out.h5", demo64, settings=RelaxSettings(fmax=0.03, steps=4), workers=0)
    offsets = np.concatenate([[0], np.cumsum([len(a) for a in structures])])
    with h5py.File(tmp_path / "out.h5") as fh:
        fmax, forces, status = fh["fmax"][...], fh["forces"][...], fh["status"][...]
    for s, atoms in enumerate(structures):
        f = forces[offsets[s] : offsets[s + 1]].copy()
        f[_fixed_of(atoms)] = 0.0
        assert fmax[s] == np.linalg.norm(f, axis=1).max(), f"structure {s}"
        assert (fmax[s] < 0.03) == (status[s] == STATUS["converged"])


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"fmax": float("nan")}, "--fmax must be a finite force above 0"),
        ({"fmax": float("inf")}, "--fmax must be a finite force above 0"),
        ({"fmax": 0.0}, "--fmax must be a finite force above 0"),
        ({"steps": -1}, "--steps must be at least 0"),
        ({"checkpoint_every": 0}, "--checkpoint-every must be at least 1"),
        ({"trajectory_every": -2}, "--trajectory-every must be at least 0"),
        ({"skin": float("nan")}, "skin must be a finite length"),
        ({"fire": FireParams(maxstep=0.0)}, "FIRE's maxstep must be finite and above 0"),
    ],
)
def test_nonsense_settings_are_refused(changes, words):
    with pytest.raises(ValueError, match=words):
        RelaxSettings(**changes)


@pytest.mark.parametrize("fmax", ["nan", "inf"])
def test_cli_refuses_a_non_finite_fmax_in_one_line(tmp_path, demo64, fmax):
    inp = _write(tmp_path / "in.h5", [_cu(0)])
    args = ["relax", str(inp), "--model", str(demo64), "-o", str(tmp_path / "o.h5"), "-q", "--fmax", fmax]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "--fmax must be a finite force above 0" in result.output
    assert not (tmp_path / "o.partial.h5").exists()


def test_relax_refuses_a_run_output_in_one_line(tmp_path, demo64):
    """relax --resume on run's file: written by another command (it said 'fmax=None')."""
    from pipelines.run import run_file

    inp = _write(tmp_path / "in.h5", [_cu(0)])
    run_file(inp, tmp_path / "out.h5", demo64, workers=0, progress=False)
    args = [str(inp), "--model", str(demo64), "-o", str(tmp_path / "out.h5"), "--workers", "0", "-q"]
    result = CliRunner().invoke(main, ["relax", *args, "--resume"])
    assert result.exit_code == 1 and "written by another painn-batch command" in result.output, result.output


def test_a_disk_too_small_is_refused_before_writing(tmp_path, demo64, monkeypatch):
    import shutil

    import pipelines.relax_output as relax_output

    inp = _write(tmp_path / "in.h5", [_cu(0), _cu(1)])
    real = shutil.disk_usage
    monkeypatch.setattr(relax_output.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(ValueError, match=r"needs 0\.0\d GB and .* has 0\.00 GB free"):
        relax_file(inp, tmp_path / "o.h5", demo64, workers=0, progress=False)
    assert not (tmp_path / "o.partial.h5").exists()


def test_preallocation_is_blocked_by_bytes(tmp_path, demo64, monkeypatch):
    """Trajectory rows are large (frames x 3 floats): a block is bytes, not 2^20 rows."""
    import pipelines.output as output

    monkeypatch.setattr(output, "_FILL_BYTES", 1 << 16)
    largest, full = [0], np.full

    def counting_full(shape, *args, **kwargs):
        array = full(shape, *args, **kwargs)
        if sys._getframe(1).f_code is output._fill.__code__:
            largest[0] = max(largest[0], array.nbytes)
        return array

    monkeypatch.setattr(output.np, "full", counting_full)
    inp = _write(tmp_path / "in.h5", [_cu(k, repeat=(2, 2, 2)) for k in range(8)])
    settings = RelaxSettings(steps=300, trajectory_every=1)
    summary = relax_file(inp, tmp_path / "o.h5", demo64, settings=settings, workers=0, progress=False)
    assert summary.planned_bytes > 256 * 301 * 24  # trajectory_positions alone: 1.8 MB
    assert 0 < largest[0] <= 1 << 16


def test_resume_on_a_finished_relaxation_checks_it_and_computes_nothing(tmp_path, demo64):
    """A finished output has no checkpoint: --resume re-relaxed every structure (and, on a runtime
    that is not deterministic, rewrote the results); now it is checked, as `run --resume` does."""
    inp = _write(tmp_path / "in.h5", [_cu(k) for k in range(3)])
    out = tmp_path / "out.h5"
    first = relax_file(inp, out, demo64, settings=RelaxSettings(steps=3), workers=0)
    again = relax_file(inp, out, demo64, settings=RelaxSettings(steps=3), workers=0, resume=True)
    assert first.computed == 3 and first.model_calls > 0
    assert (again.computed, again.already_done, again.model_calls, again.steps) == (0, 3, 0, 0)
    assert again.counts == first.counts


@pytest.mark.parametrize("cell", [False, True])
def test_the_hosts_threads_do_not_change_a_bit(tmp_path, demo64, stress_pt, monkeypatch, cell):
    """The skin pass and collate on one thread and on three (pipelines.relax_graphs.host_threads),
    with neighbour workers: every dataset equal, bit for bit."""
    import pipelines.relax_graphs as relax_graphs

    structures = [_cu(k, repeat=(2, 1 + k % 2, 1), rattle=0.15) for k in range(8)]
    structures += [_slab(k) for k in range(4)]
    inp = _write(tmp_path / "in.h5", structures)
    model, runtime = (stress_pt, "torch") if cell else (demo64, "onnxruntime")
    kw = {"settings": RelaxSettings(fmax=0.02, steps=40, cell=cell), "runtime": runtime, "max_atoms": 64}
    out = {}
    for threads in (1, 3):
        monkeypatch.setattr(relax_graphs, "host_threads", lambda threads=threads: threads)
        summary = relax_file(inp, tmp_path / f"t{threads}.h5", model, workers=1, **kw)
        assert summary.searches > len(structures)  # searched again along the way
        out[threads] = _results(tmp_path / f"t{threads}.h5")
    for key, want in out[1].items():
        assert out[3][key].tobytes() == want.tobytes(), key


def test_a_members_size_is_its_current_graphs_and_keeps_no_old_graph_alive():
    """Admission reads a member's size (atoms, busiest atom) once per graph; a new graph (the next
    step's, or a waiting structure's own selection on the device) gives its own size, and the
    graph it replaces is freed (a device entry build must not outlive its use)."""
    import gc
    import weakref

    from painn_export.neighbors import neighbor_graph
    from pipelines.relax import _Member

    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
    first = neighbor_graph(atoms.positions, atoms.cell[:], atoms.pbc, 5.0, 12, atomic_numbers=atoms.numbers)
    second = neighbor_graph(atoms.positions, atoms.cell[:], atoms.pbc, 2.0, 4, atomic_numbers=atoms.numbers)
    z = atoms.numbers.astype(np.int64)
    member = _Member(0, z, atoms.pbc, None, None, first)
    assert member.size == (first.n_atoms, first.max_degree)
    gone = weakref.ref(first)
    member.graph, first = second, None
    gc.collect()
    assert gone() is None
    assert member.size == (second.n_atoms, second.max_degree) == (32, 0)  # no neighbour within 2 Å
