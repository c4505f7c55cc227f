"""painn-batch run end to end through the CLI, with every bad-input kind mixed in."""

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
from click.testing import CliRunner

from painn_export import save_model
from painn_export.batch import collate
from painn_export.export import export_onnx, graphs_for
from painn_export.samples import example_set
from painn_export.schema import SchemaError, validate_input, write_input
from painn_export.tolerances import compare, tolerance
from pipelines.batches import batch_limits
from pipelines.cli import main
from pipelines.run import STATUS

from checks import assert_close
from conftest import SMALL, make_model


def _structures():
    good = example_set(seed=7, sizes=(5, 9))
    rows = [(s.atomic_numbers, s.positions, s.cell, s.pbc) for s in good]
    bad = [
        (np.array([1, 8]), np.array([[0.0, 0, 0], [np.nan, 0, 0]]), np.eye(3) * 5, [True] * 3),  # NaN
        (
            np.array([1, 8]),
            np.array([[0.0, 0, 0], [1.0, 0, 0]]),
            np.zeros((3, 3)),
            [True] * 3,
        ),  # singular cell
        (
            np.array([1, 120]),
            np.array([[0.0, 0, 0], [1.0, 0, 0]]),
            np.zeros((3, 3)),
            [False] * 3,
        ),  # unknown Z
        (np.zeros(0, int), np.zeros((0, 3)), np.zeros((3, 3)), [False] * 3),  # empty
        (np.array([1, 1]), np.array([[0.0, 0, 0], [0.2, 0, 0]]), np.zeros((3, 3)), [False] * 3),  # too close
    ]
    expected_bad = [
        "nonfinite_positions",
        "bad_cell",
        "unknown_element",
        "empty_structure",
        "atoms_too_close",
    ]
    return good, rows + bad, expected_bad


@pytest.mark.parametrize("runtime", ["onnxruntime", "torch"])
def test_run_matches_model_and_flags_bad_inputs(tmp_path, runtime):
    model = make_model(SMALL, torch.float32)
    model_path = (
        export_onnx(model, tmp_path / "m.onnx")
        if runtime == "onnxruntime"
        else save_model(model, tmp_path / "m.pt")
    )
    good, rows, expected_bad = _structures()
    inp = write_input(tmp_path / "in.h5", rows)
    out = tmp_path / "out.h5"
    result = CliRunner().invoke(
        main,
        [
            "run",
            str(inp),
            "--model",
            str(model_path),
            "--runtime",
            runtime,
            "-o",
            str(out),
            "--max-atoms",
            "20",
            "--json",
        ],
    )
    assert result.exit_code == 3, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["status_counts"]["ok"] == len(good)
    with h5py.File(out) as fh:
        status = fh["status"][...]
        assert [k for s in status[len(good) :] for k, v in STATUS.items() if v == s] == expected_bad
        feed = collate(graphs_for(model, good), np.float32)
        want = model.predict(feed)
        tol = {q: tolerance("onnxruntime_vs_torch", "float32", q) for q in ("energy", "forces")}
        natoms = feed["natoms"]
        got = fh["energy"][: len(good)] / natoms
        assert compare("energy", got, want["energy"] / natoms, tol["energy"]).passed
        n_good = feed["positions"].shape[0]
        assert compare("forces", fh["forces"][:n_good], want["forces"], tol["forces"]).passed
        assert np.isnan(fh["energy"][len(good) :]).all()
    assert not (tmp_path / "out.partial.h5").exists()


@pytest.mark.parametrize("how", ["onnx_float64", "torch_float64"])
def test_a_float64_model_is_fed_float64_through_the_pipeline(tmp_path, how):
    """A float64 export, and the float64 torch runtime, give the float64 model's numbers through
    `painn-batch run` and `relax` (one step), within 1e-10 relative: the feed is collated in the
    runner's dtype (it was float32 for every runner: 4e-6 eV off, with a fingerprint saying float64)."""
    from painn_export.checkpoint import load_model
    from painn_export.demo import demo_model_path
    from pipelines.relax import RelaxSettings, relax_file
    from pipelines.run import run_file

    model = load_model(demo_model_path()).to(torch.float64)
    samples = [s for s in example_set(seed=3, sizes=(40, 90)) if s.positions.shape[0] > 1]
    inp = write_input(tmp_path / "in.h5", [(s.atomic_numbers, s.positions, s.cell, s.pbc) for s in samples])
    if how == "onnx_float64":
        model_path, kw = export_onnx(model, tmp_path / "m64.onnx", dtype=torch.float64), {}
    else:
        model_path, kw = demo_model_path(), {"runtime": "torch", "dtype": "float64"}
    want = model.predict(collate(graphs_for(model, samples), np.float64))
    natoms = np.array([s.positions.shape[0] for s in samples])
    summary = run_file(inp, tmp_path / "o.h5", model_path, workers=0, progress=False, **kw)
    relaxed = relax_file(
        inp, tmp_path / "r.h5", model_path, settings=RelaxSettings(steps=0), workers=0, progress=False, **kw
    )
    assert summary.counts == {"ok": len(samples)} and relaxed.counts == {"not_converged": len(samples)}
    for out in ("o.h5", "r.h5"):
        with h5py.File(tmp_path / out) as fh:
            assert fh.attrs["fingerprint_precision"] == "float64"
            assert_close("energy", fh["energy"][...] / natoms, want["energy"] / natoms, "pipeline", "float64")
            assert_close("forces", fh["forces"][...], want["forces"], "pipeline", "float64")


def test_all_ok_exits_zero_and_reports_mae(tmp_path):
    model = make_model(SMALL, torch.float32)
    path = save_model(model, tmp_path / "m.pt")
    good, _, _ = _structures()
    rows = [(s.atomic_numbers, s.positions, s.cell, s.pbc) for s in good]
    inp = write_input(
        tmp_path / "in.h5",
        rows,
        energies=np.zeros(len(rows)),
        forces=[np.zeros((len(r[0]), 3)) for r in rows],
    )
    result = CliRunner().invoke(main, ["run", str(inp), "--model", str(path), "--runtime", "torch", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    # Reference labels are zero: the MAE is the mean |prediction|, read back from the output.
    with h5py.File(summary["output"]) as fh:
        natoms = np.array([len(r[0]) for r in rows])
        energy_mae = float(np.mean(np.abs(fh["energy"][...]) / natoms))
        forces_mae = float(np.mean(np.abs(fh["forces"][...])))
    assert forces_mae > 0
    assert summary["energy_mae_eV_per_atom"] == pytest.approx(energy_mae, rel=1e-6)
    assert summary["forces_mae_eV_per_A"] == pytest.approx(forces_mae, rel=1e-6)


def test_malformed_files_fail_before_work(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(SchemaError, match="not a readable HDF5"):
        validate_input(bad)
    with h5py.File(tmp_path / "missing.h5", "w") as fh:
        fh["atomic_numbers"] = np.array([1])
    with pytest.raises(SchemaError, match="missing dataset 'positions'"):
        validate_input(tmp_path / "missing.h5")
    inp = write_input(tmp_path / "shape.h5", [(np.array([1]), np.zeros((1, 3)), np.eye(3), [True] * 3)])
    with h5py.File(inp, "a") as fh:
        del fh["cell"]
        fh["cell"] = np.zeros((2, 3, 3))
    with pytest.raises(SchemaError, match="'cell'"):
        validate_input(inp)
    result = CliRunner().invoke(main, ["run", str(bad), "--model", str(bad)])
    assert result.exit_code == 1 and "not a readable HDF5" in result.output


# --- workers, resume, interruption, memory -------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
CLI = "import sys; from pipelines.cli import main; sys.exit(main())"
NO_LIMITS = batch_limits((), 1_000_000, None)  # what run_batch collates with: the slot rule, no engine


def _many(n: int, seed: int = 0):
    """``n`` small periodic and molecular structures (8-30 atoms)."""
    from painn_export.samples import bulk, molecule

    rng = np.random.default_rng(seed)
    elements = np.arange(1, 30)
    out = []
    for k in range(n):
        make = bulk if k % 3 else molecule
        s = make(rng, int(rng.integers(8, 31)), elements)
        out.append((s.atomic_numbers, s.positions, s.cell, s.pbc))
    return out


def _cli(args, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PAINN_EXPORT_CACHE": kw.pop("cache", "")}
    return subprocess.Popen([sys.executable, "-c", CLI, *args], env=env, cwd=ROOT, **kw)


def _read(path):
    with h5py.File(path) as fh:
        return {k: fh[k][...] for k in ("energy", "forces", "status")}


def test_workers_give_the_in_process_result(tmp_path):
    model_path = save_model(make_model(SMALL, torch.float32), tmp_path / "m.pt")
    inp = write_input(tmp_path / "in.h5", _many(60))
    outs = []
    for workers in ("0", "2"):
        out = tmp_path / f"out{workers}.h5"
        result = CliRunner().invoke(
            main,
            [
                "run",
                str(inp),
                "--model",
                str(model_path),
                "--runtime",
                "torch",
                "-o",
                str(out),
                "--workers",
                workers,
            ],
        )
        assert result.exit_code == 0, result.output
        outs.append(_read(out))
    for key in ("energy", "forces", "status"):
        np.testing.assert_array_equal(outs[0][key], outs[1][key])


def _done(partial: Path) -> int:
    """Structures with a final status in a partial file another process is writing."""
    try:
        with h5py.File(partial, "r", locking=False) as fh:
            return int((fh["status"][...] != STATUS["pending"]).sum())
    except (OSError, KeyError):
        return 0


def _interrupt_when(proc, partial: Path, done: int, sig) -> bool:
    """Send ``sig`` once ``partial`` holds ``done`` final statuses; False if the run ended first.

    The run's child processes at that moment are left in ``proc.workers_seen``.
    """
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if partial.exists() and _done(partial) >= done:
            proc.workers_seen = _children(proc.pid)
            proc.send_signal(sig)
            return True
        time.sleep(0.02)
    return False


def _children(pid: int) -> list[int]:
    """Child process ids of ``pid`` (Linux /proc)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _assert_gone(pids: list[int], timeout: float) -> None:
    deadline = time.time() + timeout
    alive = pids
    while alive and time.time() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if Path(f"/proc/{p}").exists() and "Z" not in _proc_state(p)]
    assert not alive, f"worker processes {alive} outlived their killed parent"


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "Z"


def test_sigkill_and_ctrl_c_then_resume_equal_an_uninterrupted_run(tmp_path):
    n = 1500
    model_path = save_model(make_model(SMALL, torch.float32), tmp_path / "m.pt")
    inp = write_input(tmp_path / "in.h5", _many(n, seed=1))
    base = [
        "run",
        str(inp),
        "--model",
        str(model_path),
        "--runtime",
        "torch",
        "--max-atoms",
        "48",
        "--json",
        "-q",
    ]
    ref = tmp_path / "ref.h5"
    assert _cli([*base, "-o", str(ref)]).wait(timeout=300) == 0

    out, partial = tmp_path / "out.h5", tmp_path / "out.partial.h5"
    rng = np.random.default_rng(0)
    # A Ctrl-C first: what was done is flushed, exit 130, the partial file stays.
    proc = _cli([*base, "-o", str(out)], stderr=subprocess.PIPE)
    assert _interrupt_when(proc, partial, int(rng.integers(50, 200)), signal.SIGINT), "the run ended too soon"
    assert proc.wait(timeout=60) == 130, proc.stderr.read().decode()
    assert partial.exists() and not out.exists()
    # Then SIGKILL at random points, each time resuming.
    for _ in range(3):
        target = _done(partial) + int(rng.integers(50, 300))
        proc = _cli([*base, "-o", str(out), "--resume"], stdout=subprocess.PIPE)
        killed = _interrupt_when(proc, partial, target, signal.SIGKILL)
        proc.wait(timeout=60)
        assert killed and not out.exists(), "the run ended before the kill"
        _assert_gone(proc.workers_seen, timeout=10)  # no orphaned graph workers
    done_before = _done(partial)
    assert 0 < done_before < n
    proc = _cli([*base, "-o", str(out), "--resume"], stdout=subprocess.PIPE)
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0
    summary = json.loads(stdout.decode().strip().splitlines()[-1])
    # Nothing computed twice, nothing lost: the last run did exactly what was pending.
    assert summary["already_done"] == done_before and summary["computed"] == n - done_before
    assert out.exists() and not partial.exists()
    got, want = _read(out), _read(ref)
    np.testing.assert_array_equal(got["status"], want["status"])
    assert (got["status"] == STATUS["ok"]).all()
    assert_close("energy", got["energy"], want["energy"], "other_batch", "float32")
    assert_close("forces", got["forces"], want["forces"], "other_batch", "float32")


def test_resume_refuses_another_model(tmp_path):
    inp = write_input(tmp_path / "in.h5", _many(10))
    a = save_model(make_model(SMALL, torch.float32, seed=1), tmp_path / "a.pt")
    b = save_model(make_model(SMALL, torch.float32, seed=2), tmp_path / "b.pt")
    args = ["run", str(inp), "--runtime", "torch", "-o", str(tmp_path / "o.h5"), "--workers", "0"]
    assert CliRunner().invoke(main, [*args, "--model", str(a)]).exit_code == 0
    result = CliRunner().invoke(main, [*args, "--model", str(b), "--resume"])
    assert result.exit_code == 1 and "model_sha256" in result.output


class _OrtFailError(Exception):
    """Stands for onnxruntime's own exception types, which are not RuntimeError."""


def _fake_runner(fail):
    from painn_export.runners import Runner

    class Fake(Runner):
        name = "fake"

        def _activate(self):
            pass

        def _infer(self, feed):
            fail(feed)
            return {
                "atom_energy": np.zeros(len(feed["positions"])),
                "forces": np.zeros((len(feed["positions"]), 3)),
            }

    runner = Fake()
    runner.activate()
    return runner


def _split_setup(tmp_path):
    from painn_export.samples import _jittered_grid
    from pipelines.batches import Summary
    from pipelines.graphs import GraphSettings, structure_item
    from pipelines.output import Fingerprint, Writer, create

    big = (np.ones(60, int), _jittered_grid(np.random.default_rng(0), 60) * 12, np.eye(3) * 12, [True] * 3)
    rows = [*_many(6), big]
    settings = GraphSettings(cutoff=5.0, max_neighbors=20, num_elements=83)
    items = [
        structure_item(k, np.asarray(z), np.asarray(p), np.asarray(c), np.asarray(b), settings)
        for k, (z, p, c, b) in enumerate(rows)
    ]
    assert all(it.graph is not None for it in items)
    offsets = np.concatenate([[0], np.cumsum([len(r[0]) for r in rows])])
    path = tmp_path / "o.h5"
    create(path, Fingerprint("x", len(rows), int(offsets[-1]), "m", "fake", "float32", False, "0"))
    return items, Writer(path, offsets), Summary(n_structures=len(rows))


def test_batches_that_do_not_fit_are_split_down_to_one_structure(tmp_path):
    """Out of memory above 40 atoms, in a runtime's own exception type: a big one alone is too_large."""
    from pipelines.batches import run_batch
    from pipelines.progress import Progress

    def fail(feed):
        if len(feed["positions"]) > 40:
            raise _OrtFailError(
                "Non-zero status code returned while running Split node. Failed to allocate memory"
            )

    items, writer, summary = _split_setup(tmp_path)
    run_batch(_fake_runner(fail), items, writer, summary, Progress(len(items), enabled=False), NO_LIMITS)
    status, message = writer.fh["status"][...], writer.fh["message"][...]
    writer.close()
    assert summary.computed == len(items)
    assert all(status[k] == STATUS["ok"] for k in range(6))
    assert status[-1] == STATUS["too_large"] and b"Failed to allocate" in message[-1]


def test_a_split_batch_is_retried_after_the_failed_attempt_is_freed(tmp_path):
    """Out of memory: the halves run after the failed forward's arrays are gone (a traceback holds
    its frames; a retry inside the ``except`` ran with that memory still taken, pytorch #18853), and
    after the runner gave back its cached device memory. A weak reference to an array the failing
    call made must be dead when the next call starts. ``run_batch`` is what ``run`` and the Ray
    actors call; ``relax`` calls the same ``infer_split``."""
    import weakref

    from pipelines.batches import infer_split, run_batch
    from pipelines.progress import Progress

    made, calls = [], []

    def fail(feed):
        alive = [ref for ref in made if ref() is not None]
        assert not alive, "retried while the failed attempt's activations were alive"
        calls.append(len(feed["positions"]))
        if len(feed["positions"]) > 40:
            activations = np.ones((1000, 64))  # what the failed forward had allocated
            made.append(weakref.ref(activations))
            raise _OrtFailError("Failed to allocate memory for requested buffer of size 67108864")

    runner = _fake_runner(fail)
    freed = []
    runner.free_memory = lambda: freed.append(len(calls))
    items, writer, summary = _split_setup(tmp_path)
    run_batch(runner, items, writer, summary, Progress(len(items), enabled=False), NO_LIMITS)
    status = writer.fh["status"][...]
    writer.close()
    assert len(made) >= 2 and freed == [k for k, n in enumerate(calls, 1) if n > 40]
    assert (status[:6] == STATUS["ok"]).all() and status[-1] == STATUS["too_large"]
    made.clear()
    results = infer_split(runner, [it.graph for it in items], NO_LIMITS)
    assert isinstance(results[-1], str) and results[-1].startswith("failed alone in a batch: ")
    assert all(isinstance(r, tuple) for r in results[:-1]) and len(made) >= 2


def test_other_runtime_errors_end_the_run_instead_of_splitting(tmp_path):
    """A failure a smaller batch would not fix is one error for the run, not 7 structures marked too_large."""
    from painn_export.errors import InferenceError
    from pipelines.batches import run_batch
    from pipelines.progress import Progress

    def fail(feed):
        raise _OrtFailError("Invalid Feed Input Name:neighbors")

    items, writer, summary = _split_setup(tmp_path)
    with pytest.raises(InferenceError, match="Invalid Feed Input Name"):
        run_batch(_fake_runner(fail), items, writer, summary, Progress(len(items), enabled=False), NO_LIMITS)
    assert not writer.fh["status"][...].any()  # nothing marked: --resume computes them all
    writer.close()


def test_gradient_model_writes_stress(tmp_path):
    """Stress is carried through; a cell without volume gives ok_no_stress, not a failure."""
    model = make_model(dataclasses.replace(SMALL, direct_forces=False), torch.float32)
    model_path = save_model(model, tmp_path / "g.pt")
    rows = _many(6)
    inp = write_input(tmp_path / "in.h5", rows)
    out = tmp_path / "o.h5"
    result = CliRunner().invoke(
        main,
        ["run", str(inp), "--model", str(model_path), "--runtime", "torch", "-o", str(out), "--workers", "0"],
    )
    assert result.exit_code == 0, result.output
    with h5py.File(out) as fh:
        stress, status = fh["stress"][...], fh["status"][...]
        assert fh["stress"].attrs["units"] == "eV/Angstrom^3"
    periodic = np.array([bool(np.any(r[3])) for r in rows])
    assert np.isfinite(stress[periodic]).all() and (status[periodic] == STATUS["ok"]).all()
    assert np.isnan(stress[~periodic]).all() and (status[~periodic] == STATUS["ok_no_stress"]).all()


@pytest.mark.slow
def test_memory_stays_flat_on_a_ten_times_larger_file(tmp_path):
    model_path = save_model(make_model(SMALL, torch.float32), tmp_path / "m.pt")
    peak = {}
    probe = (
        "import resource, sys\n"
        "from pipelines.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
    )
    for n in (300, 3000):
        inp = write_input(tmp_path / f"in{n}.h5", _many(n, seed=n))
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        args = ["run", str(inp), "--model", str(model_path), "--runtime", "torch", "-q", "--workers", "1"]
        proc = subprocess.run(
            [sys.executable, "-c", probe, *args], env=env, cwd=ROOT, capture_output=True, timeout=600
        )
        line = [x for x in proc.stderr.decode().splitlines() if x.startswith("MAXRSS")][-1]
        peak[n] = int(line.split()[1])  # KiB
    assert peak[3000] < 1.15 * peak[300] + 30_000, peak


def test_progress_bar_draws_on_a_terminal_only():
    import io

    from pipelines.progress import Progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty, pipe = Tty(), io.StringIO()
    for stream in (tty, pipe):
        bar = Progress(10, stream=stream, interval=0.0)
        bar.update(4, 400)
        bar.update(6, 600)
        bar.close()
    drawn = tty.getvalue()
    assert "10/10 structures" in drawn and "atoms/s" in drawn and "structures/s" in drawn and "<" in drawn
    assert pipe.getvalue() == ""


def test_neighbour_workers_import_no_torch(tmp_path):
    """A neighbour worker builds graphs with torch kept out (vesin would load it) and no onnxruntime.

    The probe tries the import: it succeeds wherever torch is installed (as here) unless the
    worker's initialiser keeps it out, so the check fails if that guard is lost."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from pipelines.graphs import GraphSettings, build_items, init_worker_process

    path = tmp_path / "in.h5"
    write_input(
        path, [(s.atomic_numbers, s.positions, s.cell, s.pbc) for s in example_set(seed=3, sizes=(4, 8))]
    )
    settings = GraphSettings(cutoff=5.0, max_neighbors=20, num_elements=100)
    # (torch cannot be imported here, onnxruntime was not imported)
    probe = (
        "(__import__('importlib.util').util.find_spec('torch') is None, "
        "'onnxruntime' not in __import__('sys').modules)"
    )
    with ProcessPoolExecutor(
        1,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=init_worker_process,
        initargs=(str(path), settings),
    ) as pool:
        items = pool.submit(build_items, np.arange(8)).result(timeout=300)
        loaded = pool.submit(eval, probe).result(timeout=60)
    assert [it.status for it in items] == ["ok"] * 8 and sum(it.graph.n_edges for it in items) > 0
    assert loaded == (True, True)
    import painn_export

    assert sorted(painn_export.__all__) == sorted(["__version__", *painn_export._LAZY])
    assert painn_export.PaiNN.__module__ == "painn_export.model"


CAPPED_RUN = """
import json, sys
import onnxruntime as ort

# ONNX Runtime's CPU arena capped at 64 MB for this process: a real out-of-memory in its own words.
info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
ort.create_and_register_allocator(info, ort.OrtArenaCfg(64 << 20, 1, -1, -1))
Plain = ort.SessionOptions


class Capped(Plain):
    def __init__(self):
        super().__init__()
        self.add_session_config_entry("session.use_env_allocators", "1")


ort.SessionOptions = Capped
from pipelines.run import run_file

summary = run_file(sys.argv[1], sys.argv[2], sys.argv[3], workers=0, progress=False)
print(json.dumps(summary.counts))
"""


def test_a_structure_too_large_for_onnxruntimes_memory_is_too_large_not_fatal(tmp_path):
    """ONNX Runtime out of memory (its arena capped): the big structure alone is too_large, the rest ok."""
    from painn_export.samples import bulk

    model = make_model(SMALL, torch.float32)
    onnx_path = export_onnx(model, tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    rows = [
        *_many(6),
        *[(s.atomic_numbers, s.positions, s.cell, s.pbc) for s in [bulk(rng, 3000, np.arange(1, 30))]],
    ]
    inp = write_input(tmp_path / "in.h5", rows)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", CAPPED_RUN, str(inp), str(tmp_path / "out.h5"), str(onnx_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"ok": 6, "too_large": 1}
    with h5py.File(tmp_path / "out.h5") as fh:
        message = fh["message"][6]
    assert b"out of memory" in message and b"smaller than requested bytes" in message, message


def _assert_same_items(got, want):
    """The same items bit for bit, in the same order: status and message, every field of each graph
    (dtype and bytes, ``min_distance`` included), and a relaxation's Start with its skin list."""
    assert [i.index for i in got] == [i.index for i in want]
    for g, w in zip(got, want):
        assert (g.index, g.status, g.message) == (w.index, w.status, w.message)
        assert (g.graph is None, g.start is None) == (w.graph is None, w.start is None), w.index
        pairs = []
        if w.graph is not None:
            fields = [f.name for f in dataclasses.fields(w.graph)]
            pairs += [(getattr(g.graph, name), getattr(w.graph, name)) for name in fields]
        if w.start is not None:
            fields = [f.name for f in dataclasses.fields(w.start) if f.name != "skin"]
            pairs += [(getattr(g.start, name), getattr(w.start, name)) for name in fields]
            assert (g.start.skin is None) == (w.start.skin is None)
            if w.start.skin is not None:
                mine, theirs = g.start.skin, w.start.skin
                assert mine.n_searches == theirs.n_searches
                pairs += list(zip(mine._pairs, theirs._pairs))
                pairs += [(mine._ref_positions, theirs._ref_positions), (mine._ref_cell, theirs._ref_cell)]
        for mine, theirs in pairs:
            mine, theirs = np.asarray(mine), np.asarray(theirs)
            assert (mine.dtype, mine.shape) == (theirs.dtype, theirs.shape), w.index
            assert mine.tobytes() == theirs.tobytes(), w.index


@pytest.mark.parametrize("skin", [None, 0.5])
def test_neighbour_items_are_the_same_whoever_builds_them(tmp_path, monkeypatch, skin):
    """In this process (on this thread, or in pieces on a pool of two threads), on workers, and on
    workers while this process builds what they have not started (start_here, on the pool): the same
    items in the same order, bit for bit, over several chunks, with every status among them."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import pipelines.graphs as graphs

    _, rows, _ = _structures()
    many = _many(2 * graphs.CHUNK + 40)
    structures = many[:50] + rows + many[50:] + rows[::-1]  # statuses within a chunk and at the end
    rng = np.random.default_rng(5)
    fixed = [rng.random(len(z)) < 0.3 for z, *_ in structures]  # a relaxation's Start carries them
    inp = write_input(tmp_path / "in.h5", structures, fixed=fixed)
    settings = graphs.GraphSettings(5.0, 20, 83, "float32", relax=skin is not None, skin=skin)
    pending = np.arange(len(structures))
    built_here, slow, threads = [], [False], set()
    items_from, structure_item = graphs.items_from, graphs.structure_item

    def counted(reader, settings, chunk, pool=None):
        built_here.append(len(chunk))
        if slow[0]:
            time.sleep(0.5)  # slow enough here that the workers come up and take the rest
        return items_from(reader, settings, chunk, pool)

    def where(*args):
        threads.add(threading.current_thread().name)
        return structure_item(*args)

    # This process only: the workers are spawned, with the module as written.
    monkeypatch.setattr(graphs, "items_from", counted)
    monkeypatch.setattr(graphs, "structure_item", where)
    monkeypatch.setattr(graphs, "CHUNK", 32)  # many chunks: the workers are up long before the last

    class Counted(ThreadPoolExecutor):
        tasks = 0

        def submit(self, *args, **kwargs):
            self.tasks += 1
            return super().submit(*args, **kwargs)

    def items(workers, start_here, pool=None, which=pending):
        built_here.clear()
        threads.clear()
        slow[:] = [start_here and workers > 0 and len(which) > graphs.CHUNK]
        got = graphs.neighbour_items(str(inp), which, settings, workers, start_here=start_here, pool=pool)
        return list(got), sum(built_here)

    want, here = items(0, False)
    assert here == len(pending) and threads == {threading.current_thread().name}
    one_chunk, here = items(2, True, which=pending[:9])
    assert here == 9  # built here, on this thread
    _assert_same_items(one_chunk, want[:9])
    with Counted(2, thread_name_prefix="pieces") as pool:
        for _ in range(2):  # twice: the threads take the pieces in another order each time
            pool.tasks = 0
            got, here = items(0, False, pool)
            assert here == len(pending) and threads <= {"pieces_0", "pieces_1"}
            assert pool.tasks > len(built_here)  # each chunk in pieces, not whole
            _assert_same_items(got, want)
            # One chunk, start_here: built here, on the pool; a gap in it (a resumed run's pending).
            which = np.concatenate([pending[3:5], pending[40:65]])
            got, here = items(2, True, pool, which)
            assert here == len(which) and threads <= {"pieces_0", "pieces_1"}
            _assert_same_items(got, [want[s] for s in which])
        for workers, start_here in ((1, False), (2, True)):
            got, here = items(workers, start_here, pool if start_here else None)
            # The workers cannot be ready before the first chunk, and are before the last.
            assert (0 < here < len(pending)) if start_here else here == 0
            assert threads <= {"pieces_0", "pieces_1"}  # what this process built: on the pool
            _assert_same_items(got, want)


def test_workers_start_on_the_next_chunks_while_the_first_is_used(tmp_path, monkeypatch):
    """start_here: once a worker is up, the next chunks go to the workers while the caller still
    uses the chunk built here, not when it asks for the first item past it (relax would wait out a
    whole chunk's build there); the items are the same."""
    from concurrent.futures import ProcessPoolExecutor

    import pipelines.graphs as graphs

    monkeypatch.setattr(graphs, "CHUNK", 4)  # built here long before the worker is up
    structures = _many(10 * 4)
    inp = write_input(tmp_path / "in.h5", structures)
    settings = graphs.GraphSettings(5.0, 20, 83, "float32", relax=True, skin=0.5)
    pending = np.arange(len(structures))
    want = list(graphs.neighbour_items(str(inp), pending, settings, 0))  # and this process's kernels loaded
    submitted, warming, taken = [], [], [0]
    submit = ProcessPoolExecutor.submit

    def logged(self, fn, *args, **kwargs):
        future = submit(self, fn, *args, **kwargs)
        if fn is graphs.warm_worker:
            warming.append(future)
        else:
            submitted.append(taken[0])  # how many items the caller had when the chunk went out
        return future

    monkeypatch.setattr(ProcessPoolExecutor, "submit", logged)
    got = []
    for item in graphs.neighbour_items(str(inp), pending, settings, 1, start_here=True):
        got.append(item)
        taken[0] = len(got)
        if len(got) == 1:
            for future in warming:
                future.result(timeout=120)  # the worker is up while the first chunk is being used
    assert submitted and submitted[0] < 4  # before the caller asked for the fifth item
    _assert_same_items(got, want)


def test_write_rows_puts_each_structures_rows_in_place(tmp_path):
    """One write for scattered structures: per structure and per atom (runs, a single structure, a
    structure without atoms), the rest untouched; a row count that does not match is refused."""
    from pipelines.output import write_rows

    natoms = np.array([3, 0, 2, 4, 1, 5, 2])
    offsets = np.concatenate([[0], np.cumsum(natoms)])
    with h5py.File(tmp_path / "o.h5", "w") as fh:
        per_structure = fh.create_dataset("e", data=np.full((7, 3, 3), np.nan), chunks=(2, 3, 3))
        per_atom = fh.create_dataset("f", data=np.full((offsets[-1], 3), np.nan), chunks=(3, 3))
        steps = fh.create_dataset("s", data=np.full(7, -1, np.int32))
        want_e, want_f, want_s = per_structure[...], per_atom[...], steps[...]
        index = np.array([0, 1, 2, 3, 5])  # a run of four (one without atoms), then one alone
        e = np.arange(len(index) * 9, dtype=np.float64).reshape(-1, 3, 3)
        rows = np.concatenate([np.arange(offsets[s], offsets[s + 1]) for s in index])
        f = np.arange(len(rows) * 3, dtype=np.float64).reshape(-1, 3) + 0.5
        write_rows(per_structure, index, e)
        write_rows(per_atom, index, f, offsets)
        write_rows(steps, index, np.array([7, 8, 9, 10, 11]))  # int64 into int32
        want_e[index], want_f[rows], want_s[index] = e, f, [7, 8, 9, 10, 11]
        assert per_structure[...].tobytes() == want_e.tobytes()
        assert per_atom[...].tobytes() == want_f.tobytes()
        assert steps[...].tolist() == want_s.tolist()
        with pytest.raises(ValueError, match="rows of data"):
            write_rows(per_atom, np.array([4, 6]), np.zeros((2, 3)), offsets)  # 3 rows selected
        write_rows(per_atom, np.array([], dtype=np.int64), np.zeros((0, 3)), offsets)  # nothing
        for unordered in ([3, 0], [2, 2]):  # the rows would land in file order: refused
            with pytest.raises(ValueError, match="strictly increasing"):
                write_rows(steps, np.array(unordered), np.array([1, 2]))
        assert per_atom[...].tobytes() == want_f.tobytes()
