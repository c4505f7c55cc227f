"""describe(): what a runner will be, read from the model file alone, equals what it is once started.

A Ray driver fingerprints its output with describe() and never starts a
runtime; its actors report the started runner's identity. The two must
agree, or every Ray run would be refused (or, worse, mix results).
"""

import json

import pytest
import torch

from painn_export import save_model
from painn_export.errors import RuntimeUnavailableError
from painn_export.export import export_onnx
from painn_export.metadata import read_metadata
from painn_export.runners import describe, open_runner
from painn_export.trt import Profile

from conftest import GRADIENT, SMALL, make_model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("describe")
    direct = make_model(SMALL, torch.float32)
    gradient = make_model(GRADIENT, torch.float32)
    return {
        "direct.pt": save_model(direct, tmp / "direct.pt"),
        "gradient.pt": save_model(gradient, tmp / "gradient.pt"),
        "direct.onnx": export_onnx(direct, tmp / "direct.onnx"),
        "stress.onnx": export_onnx(gradient, tmp / "stress.onnx", stress=True),
        "float64.onnx": export_onnx(make_model(SMALL, torch.float64), tmp / "float64.onnx"),
        "tmp": tmp,
    }


@pytest.mark.parametrize(
    "name, runtime",
    [
        (None, "onnxruntime"),  # the bundled demo model
        ("direct.pt", "torch"),
        ("gradient.pt", "torch"),
        ("direct.pt", "onnxruntime"),
        ("gradient.pt", "onnxruntime"),
        ("direct.onnx", "onnxruntime"),
        ("stress.onnx", "onnxruntime"),
        ("float64.onnx", "onnxruntime"),
    ],
)
def test_describe_equals_the_started_runner(files, name, runtime, monkeypatch):
    monkeypatch.setenv("PAINN_EXPORT_CACHE", str(files["tmp"] / "cache"))
    path = None if name is None else files[name]
    identity, facts = describe(path, runtime, "cpu")
    runner, opened = open_runner(path, runtime, "cpu")
    with runner:
        assert identity == runner.identity()
    assert facts == opened


def test_describe_reads_an_engine_without_tensorrt(files):
    """The driver of GPU actors needs neither TensorRT nor a GPU to plan an engine's run."""
    engine = files["tmp"] / "m.engine"
    engine.write_bytes(b"\0")  # never opened: only its sidecar is read
    profile = Profile(atoms=(1, 64, 1000), slots=(8, 16, 32))
    side = {
        "model_metadata": read_metadata(files["stress.onnx"]),
        "profiles": [{"atoms": profile.atoms, "slots": profile.slots}],
        "precision": "fp16",
    }
    (files["tmp"] / "m.engine.json").write_text(json.dumps(side))
    identity, facts = describe(engine, "tensorrt", "cuda")
    assert (identity.runtime, identity.precision, identity.stress) == ("tensorrt", "fp16", True)
    assert (identity.device, identity.provider) == ("cuda", "tensorrt")
    assert facts.profiles == (profile,)
    with pytest.raises(RuntimeUnavailableError, match="GPU only"):
        describe(engine, "tensorrt", "cpu")


@pytest.mark.parametrize("runtime, device", [("torch", "cpu"), ("aoti", "cpu"), ("tensorrt", "cuda")])
def test_describe_refuses_what_open_runner_refuses(files, runtime, device):
    """An ONNX file on another runtime: the same words from the driver as from a runner."""
    with pytest.raises(ValueError) as opened:
        open_runner(files["direct.onnx"], runtime, device)
    with pytest.raises(ValueError) as described:
        describe(files["direct.onnx"], runtime, device)
    assert str(described.value) == str(opened.value)


def test_describe_needs_a_device_not_auto(files):
    with pytest.raises(ValueError, match="not auto"):
        describe(files["direct.onnx"], "onnxruntime", "auto")
    identity, _ = describe(files["direct.pt"], "torch", "cuda:1")  # nothing is started: no GPU needed
    assert (identity.runtime, identity.device, identity.provider) == ("torch-cuda-float32", "cuda", "cuda")
