"""``--graphs device`` (issue 32) through the pipeline, parity and the ASE calculator, on the CPU.

Warp's CPU backend stands in for a GPU: the graphs and the feed are built by
:mod:`painn_export.device_graphs` on ``cpu`` and handed to the runtime as
torch tensors. Each run is compared with ``--graphs host`` on the same input,
bit for bit: both paths list edges in the canonical order, pack the same
batches and make the same feeds. Warp's compiled kernels are cached in
``$WARP_CACHE_PATH``, else the repository's ignored ``.warp-cache/``.
"""

import os
import signal
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_pipeline import _structures

from painn_export.device_graphs import init_kernels
from painn_export.export import export_onnx
from painn_export.schema import write_input
from pipelines.cli import main
from pipelines.run import RunInterruptedError, run_file

from conftest import SMALL, make_model

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "emt_examples.h5"


@pytest.fixture(scope="module", autouse=True)
def _kernels():
    init_kernels(os.environ.get("WARP_CACHE_PATH") or ROOT / ".warp-cache")


def _read(path) -> dict:
    with h5py.File(path) as fh:
        return {k: fh[k][...] for k in ("energy", "forces", "status", "message")}


def _assert_bitwise(a: dict, b: dict) -> None:
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), f"{k} differs: max |diff| {np.nanmax(np.abs(a[k] - b[k]))}"


def _both(tmp_path, inp, model=None, **options):
    """Summaries and outputs of ``--graphs host`` and ``--graphs device`` on the CPU."""
    out = {}
    for graphs in ("host", "device"):
        summary = run_file(
            inp, tmp_path / f"{graphs}.h5", model, graphs=graphs, device="cpu", workers=0, progress=False,
            **options,
        )  # fmt: skip
        out[graphs] = (summary, _read(tmp_path / f"{graphs}.h5"))
    return out


@pytest.mark.parametrize("runtime", ["onnxruntime", "torch"])
@pytest.mark.parametrize("max_atoms", [4096, 150])
def test_the_demo_is_bitwise_the_same_on_both_paths(tmp_path, runtime, max_atoms):
    """The bundled demo (3 274 atoms): one batch, and batches of <= 150 atoms (device chunks of four
    batches, an open batch carried into the next chunk)."""
    runs = _both(tmp_path, DEMO, runtime=runtime, max_atoms=max_atoms)
    (host, a), (device, b) = runs["host"], runs["device"]
    assert host.graphs == "host" and device.graphs == "device (cpu)" and device.graph_seconds > 0
    assert device.counts == host.counts == {"ok": 100}
    _assert_bitwise(a, b)


def test_statuses_and_results_are_the_same_on_a_file_with_bad_structures(tmp_path):
    model = export_onnx(make_model(SMALL, torch.float32), tmp_path / "m.onnx")
    good, rows, expected_bad = _structures()
    inp = write_input(tmp_path / "in.h5", rows)
    runs = _both(tmp_path, inp, model, max_atoms=12)
    a, b = runs["host"][1], runs["device"][1]
    _assert_bitwise(a, b)
    from pipelines.run import STATUS

    names = {v: k for k, v in STATUS.items()}
    assert [names[c] for c in b["status"][len(good) :]] == expected_bad
    assert runs["device"][0].counts == runs["host"][0].counts


@pytest.mark.parametrize("first, then", [("device", "host"), ("host", "device")])
def test_a_run_stopped_on_one_path_resumes_on_the_other(tmp_path, monkeypatch, first, then):
    """Stopped at a safe point after the first batch, resumed with the other --graphs: the output is
    bitwise an uninterrupted run's."""
    import pipelines.batches as batches

    whole = run_file(DEMO, tmp_path / "whole.h5", graphs="host", device="cpu", workers=0, progress=False,
                     max_atoms=300)  # fmt: skip
    assert whole.counts == {"ok": 100}
    calls = {"n": 0}
    infer_split = batches.infer_split

    def stop_after_two_batches(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:
            from pipelines.signals import Stopped

            raise Stopped(signal.SIGINT, safe=True)
        return infer_split(*args, **kwargs)

    monkeypatch.setattr(batches, "infer_split", stop_after_two_batches)
    out = tmp_path / "out.h5"
    with pytest.raises(RunInterruptedError):
        run_file(DEMO, out, graphs=first, device="cpu", workers=0, progress=False, max_atoms=300)
    monkeypatch.undo()
    with h5py.File(out.with_name("out.partial.h5")) as fh:
        done = int((fh["status"][...] != 0).sum())
    assert 0 < done < 100
    summary = run_file(DEMO, out, graphs=then, device="cpu", workers=0, progress=False, max_atoms=300,
                       resume=True)  # fmt: skip
    assert summary.already_done == done and summary.computed == 100 - done
    _assert_bitwise(_read(tmp_path / "whole.h5"), _read(out))


def test_after_a_batch_too_large_for_memory_both_paths_pack_alike(tmp_path, monkeypatch):
    """A runtime that cannot fit more than 200 atoms (a memory failure): the first batch is split,
    the atom budget lowered (Summary.memory_atoms), and every later batch packed within it; both
    paths run the same batches, in the same order, and give the same bits."""
    from painn_export.errors import BatchTooLargeError
    from painn_export.runners.base import Runner

    infer, batches = Runner.infer, []

    def small_memory(self, feed):
        atoms = [int(n) for n in feed["natoms"]]
        batches.append(atoms)
        if sum(atoms) > 200:
            raise BatchTooLargeError("out of memory (a test's runtime)")
        return infer(self, feed)

    monkeypatch.setattr(Runner, "infer", small_memory)
    out = {}
    for graphs in ("host", "device"):
        batches.clear()
        summary = run_file(DEMO, tmp_path / f"{graphs}.h5", graphs=graphs, device="cpu", workers=0,
                           progress=False, max_atoms=300)  # fmt: skip
        out[graphs] = (summary, list(batches), _read(tmp_path / f"{graphs}.h5"))
    (host, host_batches, a), (device, device_batches, b) = out["host"], out["device"]
    assert host.memory_atoms is not None and device.memory_atoms == host.memory_atoms
    assert sum(len(x) for x in host_batches) > 100  # some ran twice: split, then lowered
    assert device_batches == host_batches
    assert device.counts == host.counts == {"ok": 100}
    _assert_bitwise(a, b)


def test_graphs_device_without_nvalchemi_is_one_line_exit_2(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "nvalchemiops" or m.startswith("nvalchemiops.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "nvalchemiops", None)
    out = tmp_path / "out.h5"
    result = CliRunner().invoke(
        main, ["run", str(DEMO), "-o", str(out), "--graphs", "device", "--device", "cpu"]
    )
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "pip install 'painn-export[device-graphs]'" in lines[0], result.output
    assert not out.exists()
    # auto on the CPU builds on the host and needs nothing
    summary = run_file(DEMO, out, graphs="auto", device="cpu", workers=0, progress=False)
    assert summary.graphs == "host"


def test_the_cli_runs_graphs_device(tmp_path):
    out = tmp_path / "out.h5"
    args = ["run", str(DEMO), "-o", str(out), "--graphs", "device", "--device", "cpu", "--json", "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert '"graphs": "device (cpu)"' in result.output


def test_graph_choices_are_written_alike():
    from painn_export.cli import GRAPHS as EXPORT_GRAPHS
    from painn_export.graphs_where import GRAPHS
    from pipelines.options import GRAPHS as RUN_GRAPHS

    assert GRAPHS is RUN_GRAPHS is EXPORT_GRAPHS  # one tuple, written once


def test_parity_with_device_graphs(tmp_path):
    from painn_export.parity import run_parity
    from painn_export.runners import OnnxRuntimeRunner, TorchRunner
    from painn_export.samples import example_set

    model = make_model(SMALL, torch.float32)
    onnx_path = export_onnx(model, tmp_path / "m.onnx")
    samples = example_set(seed=3, sizes=(4, 7))

    def rows(graphs):
        runners = [
            (TorchRunner(model, dtype="float32"), "float32"),
            (OnnxRuntimeRunner(onnx_path), "float32"),
        ]
        return run_parity(model, runners, samples, graphs=graphs)

    host, device = rows("host"), rows("device")
    assert all(r.comparison.passed for r in device), [r.as_dict() for r in device if not r.comparison.passed]
    assert [r.as_dict() for r in host] == [r.as_dict() for r in device]  # the same numbers: same graphs


def test_parity_cli_graphs_device(tmp_path):
    from painn_export.cli import main as export_main

    result = CliRunner().invoke(
        export_main, ["parity", "--random-init", "demo", "--graphs", "device", "--json"]
    )
    assert result.exit_code == 0, result.output[-2000:]
    assert '"passed": true' in result.output


def test_ase_calculator_with_device_graphs():
    pytest.importorskip("ase")
    from ase.build import bulk

    from painn_export.ase import PaiNNCalculator

    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
    atoms.rattle(0.05, seed=1)
    results = {}
    for graphs in ("host", "device"):
        calc = PaiNNCalculator.from_file(None, device="cpu", graphs=graphs)
        atoms.calc = calc
        results[graphs] = (atoms.get_potential_energy(), atoms.get_forces().copy())
        assert calc.on_device == (graphs == "device")
        calc.close()
    assert results["host"][0] == results["device"][0]
    assert results["host"][1].tobytes() == results["device"][1].tobytes()
    with pytest.raises(ValueError, match="graphs must be one of"):
        PaiNNCalculator.from_file(None, device="cpu", graphs="gpu")


def test_an_engine_session_takes_tensors_without_a_host_copy(tmp_path, monkeypatch):
    """EngineSession.run with a feed of torch tensors (test_trt's fake TensorRT and GPU): nothing is
    uploaded from the host; each input is the tensor itself, cast where the engine's dtype differs
    (int64 -> INT32 here), its address given to the engine; the outputs equal the numpy feed's."""
    import test_trt
    from onnx import TensorProto

    import painn_export.trt as trt_module
    from painn_export.trt import EngineSession

    adopted = {}

    class TensorDevice(test_trt.FakeDevice):
        def upload(self, array):
            raise AssertionError("a tensor feed was uploaded from the host")

        def adopt(self, tensor, dtype):
            view = tensor.to(torch.from_numpy(np.empty(0, dtype)).dtype).contiguous().numpy()
            test_trt.FakeDevice.registry[view.ctypes.data] = view
            adopted[len(adopted)] = (tensor, view)
            return view

    def install(major, minor=8, fail=()):
        module = test_trt.make_fake_tensorrt(major, minor, frozenset(fail))
        monkeypatch.setitem(sys.modules, "tensorrt", module)
        monkeypatch.setattr(trt_module, "gpu_identity", lambda index=None: dict(test_trt.FAKE_GPU))
        monkeypatch.setattr(trt_module, "CudaDevice", test_trt.FakeDevice)
        return module

    _, engine = test_trt._built(install, tmp_path, indices=TensorProto.INT32)
    feed = {
        k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in test_trt.small_feed(5).items()
    }
    want = EngineSession(engine, 0).run(feed)
    monkeypatch.setattr(trt_module, "CudaDevice", TensorDevice)
    session = EngineSession(engine, 0)
    got = session.run({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feed.items()})
    assert len(adopted) == len(session.input_names)
    fed = dict(zip(session.input_names, adopted.values()))
    assert fed["neighbors"][1].dtype == np.int32 and fed["positions"][1].dtype == np.float32
    tensor, view = fed["positions"]
    assert tensor.data_ptr() == view.ctypes.data  # float32 already: the tensor's own memory
    for name in want:
        assert want[name].tobytes() == got[name].tobytes(), name
