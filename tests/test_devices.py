"""Devices: every runtime on the device asked for, or one clear line and exit 2; never a silent CPU.

These run on CI's CPU-only machine: ``--device cuda`` must be refused for
every runtime, ``--device auto`` must run on the CPU and say so. The GPU
figures come from ``make gpu-check`` (scripts/gpu_check.py), whose quick CPU
form runs here too, so that it cannot rot.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from painn_export import save_model
from painn_export.cli import main as export_main
from painn_export.errors import RuntimeUnavailableError
from painn_export.export import export_onnx
from painn_export.runners import OnnxRuntimeRunner, TorchRunner, open_runner, parse_device
from painn_export.samples import example_set
from painn_export.schema import write_input
from pipelines.cli import main as batch_main

from conftest import SMALL, make_model

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusals")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("devices")
    model = make_model(SMALL, torch.float32)
    ckpt = save_model(model, tmp / "m.pt")
    onnx = export_onnx(model, tmp / "m.onnx")
    engine = tmp / "m.engine"  # an engine file and its sidecar: TensorRT itself is what is missing here
    engine.write_bytes(b"\0")
    from painn_export.metadata import read_metadata

    (tmp / "m.engine.json").write_text(
        json.dumps({"model_metadata": read_metadata(onnx), "profiles": [], "precision": "fp32"})
    )
    samples = example_set(seed=2, sizes=(5,))[:3]
    inp = write_input(tmp / "in.h5", [(s.atomic_numbers, s.positions, s.cell, s.pbc) for s in samples])
    return {"ckpt": ckpt, "onnx": onnx, "engine": engine, "input": inp}


@pytest.mark.parametrize(
    "model, runtime",
    [
        ("ckpt", "torch"),
        ("ckpt", "onnxruntime"),
        ("onnx", "onnxruntime"),
        ("engine", "tensorrt"),
        ("ckpt", "aoti"),
    ],
)
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_run_on_cuda_without_one_is_one_line_and_exit_2(files, tmp_path, model, runtime, device):
    out = tmp_path / "out.h5"
    args = ["run", str(files["input"]), "--model", str(files[model]), "--runtime", runtime, "-o", str(out)]
    result = CliRunner().invoke(batch_main, [*args, "--device", device, "--workers", "0", "-q"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert any(word in lines[0] for word in ("CUDA", "GPU", "TensorRT")), lines[0]
    assert not out.exists() and not (tmp_path / "out.partial.h5").exists()


def test_ray_on_cuda_without_gpus_for_the_actors_is_refused(files, tmp_path):
    """--device cuda with --ray but no --ray-gpus-per-actor would run the actors on the CPU: refused."""
    pytest.importorskip("ray")
    args = ["run", str(files["input"]), "-o", str(tmp_path / "o.h5"), "--device", "cuda", "--ray", "local"]
    result = CliRunner().invoke(batch_main, args)
    assert result.exit_code == 2 and "--ray-gpus-per-actor" in result.output, result.output
    assert not (tmp_path / "o.partial.h5").exists()


def test_run_on_auto_uses_the_cpu_and_says_so(files, tmp_path):
    out = tmp_path / "out.h5"
    args = [
        "run",
        str(files["input"]),
        "--model",
        str(files["onnx"]),
        "-o",
        str(out),
        "--workers",
        "0",
        "--json",
    ]
    result = CliRunner().invoke(batch_main, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["device"] == "cpu" and summary["provider"] == "cpu" and summary["gpu"] == ""
    assert summary["runtime"] == "onnxruntime-cpu" and 0 < summary["model_fraction"] <= 1
    import h5py

    with h5py.File(out) as fh:
        assert fh.attrs["fingerprint_device"] == "cpu" and fh.attrs["fingerprint_provider"] == "cpu"


def test_export_commands_refuse_cuda_in_one_line(files):
    runner = CliRunner()
    for args in (
        ["parity", "--checkpoint", str(files["ckpt"]), "--device", "cuda"],
        ["parity", "--checkpoint", str(files["ckpt"]), "--onnx", str(files["onnx"]), "--device", "cuda:0"],
    ):
        result = runner.invoke(export_main, args)
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert "CUDA" in result.output
    result = runner.invoke(export_main, ["parity", "--checkpoint", str(files["ckpt"]), "--device", "gpu"])
    assert result.exit_code == 2 and "auto|cpu|cuda|cuda:N" in result.output


def test_onnx_check_on_cuda_is_refused(files, tmp_path):
    args = ["onnx", "--checkpoint", str(files["ckpt"]), "-o", str(tmp_path / "x.onnx"), "--device", "cuda"]
    result = CliRunner().invoke(export_main, args)
    assert result.exit_code == 2 and "CUDA" in result.output, result.output


def test_runners_say_where_they_run(files):
    model = make_model(SMALL, torch.float32)
    for runner in (TorchRunner(model, device="auto"), OnnxRuntimeRunner(files["onnx"], device="auto")):
        with runner:
            assert runner.device == "cpu" and runner.provider == "cpu"
    for runner in (TorchRunner(model, device="cuda"), OnnxRuntimeRunner(files["onnx"], device="cuda")):
        with pytest.raises(RuntimeUnavailableError):
            runner.activate()
    with pytest.raises(ValueError, match="device must be"):
        parse_device("cuda:x")


def test_ase_calculator_takes_a_device(files):
    from ase.build import molecule

    from painn_export.ase import PaiNNCalculator

    atoms = molecule("H2O")
    atoms.calc = PaiNNCalculator.from_file(files["onnx"], device="cpu")
    assert np.isfinite(atoms.get_potential_energy())
    atoms.calc = PaiNNCalculator.from_file(files["onnx"], device="cuda")
    with pytest.raises(RuntimeUnavailableError, match="CUDA"):
        atoms.get_potential_energy()
    empty = molecule("H2O")[:0]
    empty.calc = PaiNNCalculator.from_file(files["onnx"], device="cpu")
    with pytest.raises(ValueError, match="no atoms"):
        empty.get_potential_energy()


def test_open_runner_refuses_an_engine_on_the_cpu(files):
    with pytest.raises(RuntimeUnavailableError, match="GPU"):
        open_runner(files["engine"], "tensorrt", device="cpu")


def test_gpu_check_quick_on_the_cpu(tmp_path):
    """``make gpu-check``'s script, small and on the CPU: every section is there and parity passes."""
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "gpu_check.py"),
            "--device",
            "cpu",
            "--quick",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["parity"] and all(r["passed"] for r in report["parity"])
    assert {r["model"] for r in report["parity"]} == {"demo", "ocp-direct", "ocp-gradient"}
    assert any(r["quantity"] == "repeat:forces" for r in report["parity"])
    assert any(r["quantity"] == "stress" for r in report["parity"])
    runtimes = {r["runtime"] for r in report["throughput"] if "error" not in r}
    assert {"eager", "onnxruntime"} <= runtimes, report["throughput"]
    assert report["pipeline"] and report["pipeline"][0]["device"] == "cpu"
    # Device graphs (issue 32): the demo model and the OCP-size one at its graph settings.
    device_rows = {r.get("model"): r for r in report["pipeline"] if r["graphs"].startswith("device (")}
    assert set(device_rows) == {"demo", "ocp-direct"}, report["pipeline"]
    ocp = device_rows["ocp-direct"]
    assert ocp["atoms_per_s"] > 0 and ocp["max_neighbors"] == 50 and ocp["runtime"].startswith("torch")
    assert 0 < ocp["device_busy_fraction"] <= 1
    assert "| model |" in (tmp_path / "gpu_check.md").read_text()


# What the GPU machine's image ('cuda', read on 2026-11-17; the device tool's KINDS.md) already has:
# make gpu-check carries, as wheels, only what the check imports beyond these.
GPU_IMAGE = set(
    """absl-py accelerate attrs certifi click cloudpickle contourpy cuda-bindings cuda-core cycler cython
    filelock flatbuffers fonttools fsspec h5py idna jinja2 joblib kiwisolver llvmlite markupsafe matplotlib
    ml-dtypes mpmath networkx numba numpy onnx onnx-ir onnxruntime onnxscript packaging pandas pillow pip
    pluggy protobuf psutil pyarrow pygments pyparsing pytest python-dateutil pyyaml requests rich scipy
    setuptools six sympy threadpoolctl tqdm triton torch typing-extensions urllib3 wheel""".split()
)


def test_the_gpu_check_wheel_list_covers_what_the_check_imports(tmp_path):
    """Every distribution the quick check loads, beyond the GPU image's own, is in docs/gpu.md's
    `pip download` list (a missing one fails on the GPU machine, which has no registry)."""
    import re

    code = (
        "import importlib.metadata as md, json, sys\n"
        f"sys.path.insert(0, {str(ROOT / 'scripts')!r})\n"
        "import gpu_check\n"
        f"rc = gpu_check.main(['--device', 'cpu', '--quick', '--out', {str(tmp_path)!r}])\n"
        "tops = {m.split('.')[0] for m in sys.modules}\n"
        "dists = {d for t, ds in md.packages_distributions().items() if t in tops for d in ds}\n"
        "print(json.dumps(sorted(dists)))\n"
        "sys.exit(rc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = {_norm(d) for d in json.loads(proc.stdout.strip().splitlines()[-1])}
    text = (ROOT / "docs" / "gpu.md").read_text(encoding="utf-8")
    block = re.search(r"pip download[^\n]*\\\n(?:[^\n]*\\\n)*[^\n]*", text).group(0)
    listed = {_norm(w) for w in block.replace("\\", " ").split() if not w.startswith("-")}
    # What painn-export needs (its own requirements, and theirs, without extras) and the check loaded:
    # optional imports of other libraries (vesin tries ase) are not needs.
    needed = _requirements("painn-export") & loaded
    missing = sorted(needed - GPU_IMAGE - {d for d in needed if d.startswith("nvidia-")} - listed)
    assert not missing, f"docs/gpu.md's wheel list lacks {missing} (needed and loaded: {sorted(needed)})"
    assert "vesin" in needed  # the check does load what it needs (the list is not vacuous)


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _requirements(dist: str) -> set[str]:
    """``dist``'s requirements without extras, and theirs, as installed here."""
    import importlib.metadata as md

    from packaging.requirements import Requirement

    seen, todo = set(), [dist]
    while todo:
        name = todo.pop()
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            if _norm(req.name) not in seen:
                seen.add(_norm(req.name))
                todo.append(req.name)
    return seen


def test_the_gpu_check_writes_each_section_as_it_goes(tmp_path, monkeypatch):
    """A section that fails is reported, and what came before it is on disk (it wrote at the end only)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    monkeypatch.setattr(gpu_check, "models", lambda quick: {})
    monkeypatch.setattr(
        gpu_check,
        "parity",
        lambda *a: [
            {
                "model": "m",
                "runtime": "r",
                "quantity": "energy",
                "max_abs": 0.0,
                "max_rel": 0.0,
                "passed": True,
            }
        ],
    )

    def broken(*args):
        raise RuntimeError("out of device memory\nmore")

    monkeypatch.setattr(gpu_check, "throughput", broken)
    monkeypatch.setattr(gpu_check, "pipeline", lambda *a: [])
    assert gpu_check.main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["parity"][0]["passed"] and report["errors"] == {
        "throughput": "RuntimeError: out of device memory"
    }
    assert "throughput" in (tmp_path / "gpu_check.md").read_text()


def test_a_cuda_index_beyond_the_gpus_is_one_line_for_every_runner(tmp_path, monkeypatch):
    """cuda:N past the GPUs torch sees (here: one, pretended): one line naming N and how many there
    are, before anything touches a GPU; AOTInductor's was a traceback."""
    from painn_export.runners import AOTInductorRunner

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    package = tmp_path / "m.pt2"
    import zipfile

    with zipfile.ZipFile(package, "w") as archive:  # a package's facts, compiled for the GPU
        archive.writestr("painn_export.json", json.dumps({"device": "cuda", "metadata": {}}))
    for runner in (
        AOTInductorRunner(package, device="cuda:3"),
        TorchRunner(make_model(SMALL, torch.float32), device="cuda:3"),
    ):
        with pytest.raises(RuntimeUnavailableError, match=r"no CUDA device 3 \(torch .* sees 1\)") as caught:
            runner.activate()
        assert len(str(caught.value).splitlines()) == 1
