"""ONNX Runtime's runner: the IO-binding path on the CPU, CUDA provider options, and why CUDA was not used.

The CUDA provider cannot start on this machine; what the runner asks of it
(options) and what it does when it does not start (ONNX Runtime's own words,
caught from its stderr) are checked here with ONNX Runtime's session class
standing in, and for real with the onnxruntime-gpu wheel in
``tests/test_ort_gpu_wheel.py`` (``make ort-gpu-check``).
"""

import logging
import os
from typing import ClassVar

import numpy as np
import pytest

from painn_export.batch import collate
from painn_export.demo import demo_model_path
from painn_export.errors import RuntimeUnavailableError
from painn_export.export import graphs_for
from painn_export.runners import OnnxRuntimeRunner, open_runner
from painn_export.runners.ort import cuda_provider_options, onnxruntime_words
from painn_export.samples import bulk


@pytest.fixture(scope="module")
def demo_onnx(tmp_path_factory):
    from painn_export.checkpoint import load_model
    from painn_export.export import export_onnx

    model = load_model(demo_model_path())
    return export_onnx(model, tmp_path_factory.mktemp("ort") / "demo.onnx"), model


def test_io_binding_equals_the_plain_run_bitwise(demo_onnx):
    """The runner binds inputs and outputs on every device; on the CPU that path equals
    ``session.run`` bit for bit (2 threads, a 2 000-atom cell, twice), and ORT writes straight
    into the arrays the runner returns (no second copy)."""
    path, model = demo_onnx
    rng = np.random.default_rng(0)
    sample = bulk(rng, 2000, np.array([13, 28, 29, 46, 47, 78, 79]), spacing=2.5)
    feed = collate(graphs_for(model, [sample]), np.float32)
    runner = OnnxRuntimeRunner(path, device="cpu", threads=2)
    with runner:
        inputs = runner._inputs(feed)
        plain = dict(zip(runner.output_names, runner.session.run(list(runner.output_names), inputs)))
        bindings, make = [], runner.session.io_binding
        runner.session.io_binding = lambda: bindings.append(1) or make()
        for _ in range(2):
            bound = runner._infer(feed)
            for name in runner.output_names:
                assert bound[name].dtype == plain[name].dtype
                np.testing.assert_array_equal(bound[name], plain[name])
                assert bound[name].flags.owndata  # the array ORT wrote into, not a copy of one
        assert len(bindings) == 2  # the binding path ran, on the CPU


class _FallingBack:
    """ONNX Runtime's session when the CUDA provider fails to load: it says why on stderr (its C++
    logger, in colour) and runs on the CPU. Records the providers it was asked for."""

    asked: ClassVar[list] = []
    real = None  # onnxruntime's own session class

    def __init__(self, path, options, providers):
        _FallingBack.asked.append(providers)
        self._real = _FallingBack.real(path, options, providers=["CPUExecutionProvider"])
        if providers[0] != "CPUExecutionProvider":
            line = (
                "\x1b[1;31m2026-12-06 07:00:00.0 [E:onnxruntime:Default, provider_bridge_ort.cc:2251 "
                "TryGetProviderInfo_CUDA] Failed to load library libonnxruntime_providers_cuda.so with "
                "error: libcublasLt.so.13: cannot open shared object file: No such file or directory\x1b[m\n"
            )
            os.write(2, line.encode())

    def __getattr__(self, name):
        return getattr(self._real, name)


@pytest.fixture
def cuda_that_fails(monkeypatch):
    import onnxruntime

    _FallingBack.asked = []
    _FallingBack.real = onnxruntime.InferenceSession
    monkeypatch.setattr(
        onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(onnxruntime, "InferenceSession", _FallingBack)
    monkeypatch.setattr(onnxruntime, "preload_dlls", lambda *a, **k: None, raising=False)
    return _FallingBack


def test_cuda_options_are_true_float32_and_a_tight_arena(demo_onnx, cuda_that_fails):
    path, _ = demo_onnx
    with pytest.raises(RuntimeUnavailableError):
        OnnxRuntimeRunner(path, device="cuda:1").activate()
    name, options = cuda_that_fails.asked[-1][0]
    assert name == "CUDAExecutionProvider"
    assert options == {"device_id": "1", "use_tf32": "0", "arena_extend_strategy": "kSameAsRequested"}
    assert cuda_provider_options(0, tf32=True)["use_tf32"] == "1"


def test_auto_says_why_cuda_was_not_used_in_onnxruntimes_words(demo_onnx, cuda_that_fails, caplog, capfd):
    """--device auto: runs on the CPU, and the warning carries ORT's own reason (no raw log lines);
    --device cuda: refused (exit 2 in the CLIs) with that reason."""
    path, _ = demo_onnx
    with caplog.at_level(logging.WARNING, logger="painn_export.runners.ort"):
        runner = OnnxRuntimeRunner(path, device="auto")
        with runner:
            assert (runner.device, runner.provider, runner.name) == ("cpu", "cpu", "onnxruntime-cpu")
    assert "libcublasLt.so.13: cannot open shared object file" in runner.fallback_reason
    assert any(
        "--device auto runs on the CPU" in r.message and "libcublasLt" in r.message for r in caplog.records
    )
    assert "[E:onnxruntime" not in capfd.readouterr().err  # ORT's raw lines are caught, not shown
    with pytest.raises(
        RuntimeUnavailableError, match=r"could not start its CUDA provider on cuda:0: Failed to load"
    ):
        OnnxRuntimeRunner(path, device="cuda").activate()


def test_onnxruntime_words_keeps_warnings_and_errors_only(capfd):
    with onnxruntime_words() as words:
        os.write(2, b"\x1b[0;93m2026 [W:onnxruntime:, session_state.cc:1 Foo] a warning\x1b[m\n")
        os.write(2, b"2026 [I:onnxruntime:, x.cc:1 Bar] information\n")
        os.write(2, b"2026 [E:onnxruntime:Default, y.cc:2 Baz] an error\n")
    assert words == ["a warning", "an error"]
    assert capfd.readouterr().err == ""


def test_tf32_is_recorded_as_the_precision_only_where_it_applies(demo_onnx):
    """tf32 is a CUDA provider setting: on the CPU the precision stays the file's."""
    path, _ = demo_onnx
    runner = OnnxRuntimeRunner(path, device="cpu", tf32=True)
    with runner:
        assert runner.precision == "float32"


def test_a_plain_cpu_run_is_untouched_by_the_cuda_machinery(demo_onnx):
    path, _ = demo_onnx
    runner, _ = open_runner(path, None, "cpu")
    with runner:
        assert runner.fallback_reason == "" and runner.provider == "cpu"


def test_its_threads_sleep_between_calls(demo_onnx):
    """ORT's intra-op threads do not spin-wait between runs: the pipeline's own work between them
    (graphs, collate, FIRE, an ASE loop's Python) needs those cores (docs/benchmarks.md)."""
    path, _ = demo_onnx
    with OnnxRuntimeRunner(path, device="cpu", threads=2) as runner:
        options = runner.session.get_session_options()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        assert options.intra_op_num_threads == 2
