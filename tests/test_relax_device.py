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
