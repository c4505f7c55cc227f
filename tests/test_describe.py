"""describe(): what a runner will be, read from the model file alone, equals what it is once started.

A Ray driver fingerprints its output with describe() and never starts a
runtime; its actors report the started runner's identity. The two must
agree, or every Ray run would be refused (or, worse, mix results).
"""

import json

import numpy as np
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
    assert describe(engine, None, "cuda", dtype="float16")[0].precision == "fp16"  # --dtype names it so
    with pytest.raises(ValueError, match="a TensorRT engine in fp16, not float32"):
        describe(engine, None, "cuda", dtype="float32")


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


@pytest.mark.parametrize(
    "name, runtime, words",
    [
        ("m.pt2", "torch", "an AOTInductor package runs on --runtime aoti, not torch"),
        ("m.pt2", "onnxruntime", "an AOTInductor package runs on --runtime aoti, not onnxruntime"),
        ("direct.onnx", "aoti", "an ONNX file runs on --runtime onnxruntime, not aoti"),
        ("direct.onnx", "tensorrt", "build an engine from it with: painn-export trt direct.onnx"),
        ("m.engine", "onnxruntime", "a TensorRT engine runs on --runtime tensorrt, not onnxruntime"),
        ("direct.pt", "tensorrt", "a checkpoint cannot run on --runtime tensorrt"),
    ],
)
def test_a_runtime_that_does_not_fit_the_file_is_refused_in_one_line(files, name, runtime, words, tmp_path):
    """`--runtime torch --model x.pt2` quietly ran AOTInductor; every such pair is now one line,
    from the library and from painn-batch (exit 1, no output file)."""
    from click.testing import CliRunner

    from painn_export.schema import write_input
    from pipelines.cli import main

    path = files.get(name) or files["tmp"] / name
    path.touch()  # the suffix decides: the file is not read before the refusal
    with pytest.raises(ValueError, match=words.replace(".", r"\.")):
        open_runner(path, runtime, "cpu")
    inp = write_input(tmp_path / "in.h5", [([1, 1], [[0, 0, 0], [0.74, 0, 0]], np.eye(3) * 10, [False] * 3)])
    out = tmp_path / "out.h5"
    result = CliRunner().invoke(
        main, ["run", str(inp), "--model", str(path), "--runtime", runtime, "-o", str(out)]
    )
    assert result.exit_code == 1 and words in result.output and len(result.output.strip().splitlines()) == 1
    assert not list(tmp_path.glob("out*"))


def test_a_graph_whose_inputs_differ_from_the_contract_is_refused_before_any_output(files, tmp_path):
    """An export with an input renamed (metadata kept) failed at the first batch with KeyError,
    after creating OUT.partial.h5; now it is refused when opened, naming what differs."""
    import onnx

    from painn_export.metadata import NotAModelError
    from painn_export.schema import write_input
    from pipelines.run import run_file

    proto = onnx.load(str(files["direct.onnx"]))
    for value in proto.graph.input:
        if value.name == "positions":
            value.name = "pos"
    for node in proto.graph.node:
        node.input[:] = ["pos" if n == "positions" else n for n in node.input]
    renamed = tmp_path / "renamed.onnx"
    onnx.save(proto, str(renamed))
    inp = write_input(tmp_path / "in.h5", [([1, 1], [[0, 0, 0], [0.74, 0, 0]], np.eye(3) * 10, [False] * 3)])
    for call in (lambda: describe(renamed, None, "cpu"), lambda: run_file(inp, tmp_path / "o.h5", renamed)):
        with pytest.raises(
            NotAModelError, match=r"lacks inputs \['positions'\].*unexpected inputs \['pos'\]"
        ):
            call()
    assert not list(tmp_path.glob("o*"))


def test_a_checkpoint_in_float64_on_every_runtime_it_exports_to(files, monkeypatch):
    """``dtype``: a checkpoint runs (torch) or is exported (onnxruntime) in it, and describe says so;
    an exported file in another precision is refused, saying how to get one."""
    monkeypatch.setenv("PAINN_EXPORT_CACHE", str(files["tmp"] / "cache"))
    for runtime in ("torch", "onnxruntime"):
        identity, _ = describe(files["direct.pt"], runtime, "cpu", dtype="float64")
        runner, facts = open_runner(files["direct.pt"], runtime, "cpu", dtype="float64")
        with runner:
            assert identity == runner.identity() and identity.precision == "float64" == facts.precision
            assert runner.feed_dtype == "float64"
    with pytest.raises(ValueError, match=r"in float32, not float64.*painn-export onnx --dtype float64"):
        open_runner(files["direct.onnx"], None, "cpu", dtype="float64")
