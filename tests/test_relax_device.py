"""``painn-batch relax --graphs device`` (issue 32) on the CPU: bit for bit the skin path's relaxation.

Warp's CPU backend stands in for a GPU. Each step the batch's graphs are
built on the runner's device instead of updated from skin lists; both give
the same edges in the same order, so the same feeds, forces and FIRE steps,
statuses and messages (a structure whose atoms run together included).
"""

import os
import signal
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_relax import _cu, _slab, _stop_at_call, _write, demo64, stress_pt  # noqa: F401 (fixtures)

from painn_export.device_graphs import init_kernels
from painn_export.schema import write_input
from pipelines.relax import RelaxSettings, relax_file

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _kernels():
    init_kernels(os.environ.get("WARP_CACHE_PATH") or ROOT / ".warp-cache")


def _datasets(path) -> dict:
    with h5py.File(path) as fh:
        return {k: fh[k][...] for k in fh if isinstance(fh[k], h5py.Dataset)}


def _assert_bitwise(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), f"{k} differs"


def test_device_graphs_relax_bitwise_as_the_skin_lists(tmp_path, demo64):  # noqa: F811
    """In-flight batches with refills and a waiting structure, fixed atoms, trajectories: every bit equal."""
    structures = [_cu(0), _slab(1), _cu(2, repeat=(2, 2, 2)), _cu(3), _slab(4), _cu(5, repeat=(2, 2, 1))]
    inp = _write(tmp_path / "in.h5", structures)
    settings = RelaxSettings(fmax=0.02, steps=60, trajectory_every=5)
    got = {}
    for graphs in ("host", "device"):
        summary = relax_file(
            inp, tmp_path / f"{graphs}.h5", demo64, settings=settings, graphs=graphs, workers=0, max_atoms=48
        )
        assert summary.as_dict()["graphs"] == ("host" if graphs == "host" else "device (cpu)")
        got[graphs] = _datasets(tmp_path / f"{graphs}.h5")
    assert (got["host"]["steps"] > 5).all()
    _assert_bitwise(got["host"], got["device"])


def test_device_graphs_relax_cell_and_a_diverging_structure(tmp_path, stress_pt):  # noqa: F811
    """--cell with a random gradient model whose atoms run together: the same diverged messages and bits."""
    structures = [_cu(k, rattle=0.05) for k in range(3)]
    inp = _write(tmp_path / "in.h5", structures)
    settings = RelaxSettings(fmax=1e-6, steps=40, cell=True)
    got = {}
    for graphs in ("host", "device"):
        relax_file(
            inp, tmp_path / f"{graphs}.h5", stress_pt, settings=settings, graphs=graphs, runtime="torch",
            device="cpu", workers=0,
        )  # fmt: skip
        got[graphs] = _datasets(tmp_path / f"{graphs}.h5")
    messages = [m.decode() for m in got["host"]["message"]]
    assert any("Å apart" in m for m in messages), messages  # the device path's own statuses were taken
    _assert_bitwise(got["host"], got["device"])


def test_device_graphs_relax_resumes_bitwise(tmp_path, demo64):  # noqa: F811
    """A stop mid-run with device graphs, then --resume (device): equal to the uninterrupted skin run."""
    from pipelines.output import RunInterruptedError

    structures = [_cu(k, repeat=(1 + k % 2, 1, 1), rattle=0.1) for k in range(6)]
    inp = _write(tmp_path / "in.h5", structures)
    kw = {"settings": RelaxSettings(fmax=0.01, steps=60), "workers": 0, "max_atoms": 40, "progress": False}
    relax_file(inp, tmp_path / "ref.h5", demo64, graphs="host", **kw)
    out = tmp_path / "out.h5"
    with pytest.raises(RunInterruptedError):
        relax_file(inp, out, demo64, graphs="device", observer=_stop_at_call(5, signal.SIGTERM), **kw)
    relax_file(inp, out, demo64, graphs="device", resume=True, **kw)
    got, want = _datasets(out), _datasets(tmp_path / "ref.h5")
    _assert_bitwise(want, got)
    assert np.isfinite(got["energy"]).all()


def test_relax_graphs_device_without_nvalchemi_says_how_to_install_it(tmp_path, monkeypatch):
    """The library refuses before any output exists (the CLI turns it into one line, exit 2, as for run)."""
    import sys

    from painn_export.errors import RuntimeUnavailableError

    for name in [m for m in sys.modules if m == "nvalchemiops" or m.startswith("nvalchemiops.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "nvalchemiops", None)
    inp = _write(tmp_path / "in.h5", [_cu(0)])
    with pytest.raises(RuntimeUnavailableError, match=r"pip install 'painn-export\[device-graphs\]'"):
        relax_file(inp, tmp_path / "out.h5", graphs="device", device="cpu", workers=0, progress=False)
    assert not list(tmp_path.glob("out*"))


def _relax_both(tmp_path, inp, model, **kw) -> dict:
    """The datasets of ``relax`` on the host (skin lists) and on the device (Warp's CPU backend)."""
    for graphs in ("host", "device"):
        relax_file(inp, tmp_path / f"{graphs}.h5", model, graphs=graphs, workers=0, progress=False, **kw)
    return {graphs: _datasets(tmp_path / f"{graphs}.h5") for graphs in ("host", "device")}


def test_device_entry_gives_the_host_paths_statuses_and_messages(tmp_path, demo64):  # noqa: F811
    """Structures the input rules out, found by the device build at entry between structures that relax
    (refills): the host path's statuses and messages, and every other bit the same."""
    from pipelines.output import STATUS

    def row(atoms):
        return atoms.numbers, atoms.positions, atoms.cell[:], atoms.pbc

    close = _cu(5, rattle=0.0)
    close.positions[1] = close.positions[0] + [0.3, 0.0, 0.0]
    rows = [
        row(_cu(0)),
        (np.array([29, 29]), np.array([[0.0, 0, 0], [np.nan, 0, 0]]), np.eye(3) * 5, [True] * 3),
        row(_cu(1)),
        (np.array([29, 29]), np.array([[0.0, 0, 0], [1.0, 0, 0]]), np.zeros((3, 3)), [True] * 3),
        (np.array([29, 120]), np.array([[0.0, 0, 0], [2.0, 0, 0]]), np.zeros((3, 3)), [False] * 3),
        row(_cu(2)),
        (np.zeros(0, int), np.zeros((0, 3)), np.zeros((3, 3)), [False] * 3),
        (np.array([29, 29]), np.array([[0.0, 0, 0], [0.3, 0, 0]]), np.zeros((3, 3)), [False] * 3),
        row(close),
        (np.array([29]), np.zeros((1, 3)), np.eye(3) * 0.4, [True] * 3),  # an atom 0.4 Å from its image
        row(_cu(3)),
    ]
    inp = write_input(tmp_path / "in.h5", rows)
    got = _relax_both(tmp_path, inp, demo64, settings=RelaxSettings(fmax=1e-6, steps=12), max_atoms=16)
    names = {v: k for k, v in STATUS.items()}
    assert [names[int(c)] for c in got["device"]["status"]] == [
        "not_converged", "nonfinite_positions", "not_converged", "bad_cell", "unknown_element",
        "not_converged", "empty_structure", "atoms_too_close", "atoms_too_close", "atoms_too_close",
        "not_converged",
    ]  # fmt: skip
    messages = [m.decode() for m in got["device"]["message"]]
    assert messages[7] == "atoms 0.3 Å apart (< 0.5 Å)", messages
    assert messages[8] == "atoms or periodic images 0.3 Å apart (< 0.5 Å)", messages
    assert messages[9] == "atoms or periodic images 0.4 Å apart (< 0.5 Å)", messages
    assert messages[4].startswith("atomic numbers outside 1..") and messages[4].endswith(": [120]"), messages
    _assert_bitwise(got["host"], got["device"])


def test_device_entry_builds_no_host_graph_and_reuses_its_build(tmp_path, demo64, monkeypatch):  # noqa: F811
    """With device graphs nothing builds a host graph or starts the neighbour stage, even at entry, and a
    structure's first feed takes its entry build (none is built again before its first step); the
    relaxation is the host path's, bit for bit."""
    import painn_export.skin
    import pipelines.graphs
    import pipelines.relax
    import pipelines.relax_graphs
    from pipelines.relax_graphs import StepGraphs

    structures = [_cu(0), _slab(1), _cu(2, repeat=(2, 2, 2)), _cu(3), _slab(4), _cu(5, repeat=(2, 2, 1))]
    inp = _write(tmp_path / "in.h5", structures)
    kw = {"settings": RelaxSettings(fmax=0.02, steps=40), "max_atoms": 48, "progress": False}
    relax_file(inp, tmp_path / "host.h5", demo64, graphs="host", workers=0, **kw)

    def no_host_graph(*args, **kwargs):
        raise AssertionError("a host graph was built, or the neighbour stage started")

    monkeypatch.setattr(pipelines.graphs, "neighbor_graph", no_host_graph)
    monkeypatch.setattr(painn_export.skin.SkinGraph, "update", no_host_graph)
    monkeypatch.setattr(pipelines.relax_graphs, "update_skins", no_host_graph)
    monkeypatch.setattr(pipelines.relax, "neighbour_items", no_host_graph)
    built_at_steps = []
    device_build = StepGraphs._device_build

    def counted(self, members):
        built_at_steps.extend(m.state.steps for m in members)
        return device_build(self, members)

    monkeypatch.setattr(StepGraphs, "_device_build", counted)
    relax_file(inp, tmp_path / "device.h5", demo64, graphs="device", workers=1, **kw)
    assert built_at_steps and min(built_at_steps) >= 1, "a structure was built again for its first feed"
    _assert_bitwise(_datasets(tmp_path / "host.h5"), _datasets(tmp_path / "device.h5"))


def test_device_resume_rebuilds_the_waiting_structures_bitwise(tmp_path, demo64, monkeypatch):  # noqa: F811
    """A stop while structures wait (one passed), then --resume, both on the device: the waiting
    structures are read and built again at entry, and the result is the uninterrupted host run's."""
    import pipelines.relax as relax
    from pipelines.output import RunInterruptedError

    monkeypatch.setattr(relax, "PATIENCE", 2)
    small = [_cu(k, repeat=(2, 1, 1), rattle=0.02) for k in range(6)]
    big = [_cu(k, repeat=(2, 2, 2), rattle=0.1) for k in range(2)]
    inp = _write(tmp_path / "in.h5", [small[0], *big, *small[1:]])  # the second big one waits, passed
    kw = {"settings": RelaxSettings(fmax=0.02, steps=60), "workers": 0, "max_atoms": 40, "progress": False}
    calls = []
    relax_file(
        inp, tmp_path / "ref.h5", demo64, graphs="host", observer=lambda m, a, f: calls.append(m), **kw
    )
    entered: dict = {}
    for k, members in enumerate(calls):
        for s in members:
            entered.setdefault(s, k)
    # The first call after a structure entered ahead of an earlier one still waiting.
    stop = 1 + min(entered[s] for s in entered if any(entered[w] > entered[s] for w in range(s)))
    out = tmp_path / "out.h5"
    with pytest.raises(RunInterruptedError):
        relax_file(inp, out, demo64, graphs="device", observer=_stop_at_call(stop + 1, signal.SIGTERM), **kw)
    with h5py.File(tmp_path / "out.ckpt.h5") as fh:
        assert len(fh["waiting"]) and fh["waiting"][:, 1].any()
    relax_file(inp, out, demo64, graphs="device", resume=True, **kw)
    _assert_bitwise(_datasets(tmp_path / "ref.h5"), _datasets(out))
