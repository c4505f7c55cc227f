"""The real onnxruntime-gpu wheel, alone, on a machine without CUDA: what a GPU user's install does here.

Runs in an environment of its own (``make ort-gpu-check``, part of ``make
test``): torch, then ``pip install -e '.[gpu]'``, which brings
onnxruntime-gpu and no onnxruntime. In the main environment (plain
onnxruntime) it is skipped; there ``tests/test_ort.py`` checks the same
logic with ONNX Runtime's session standing in.
"""

import importlib.metadata as md
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _installed(name: str) -> bool:
    try:
        md.distribution(name)
    except md.PackageNotFoundError:
        return False
    return True


pytestmark = pytest.mark.skipif(
    not _installed("onnxruntime-gpu"), reason="needs the onnxruntime-gpu environment: make ort-gpu-check"
)


def _batch(*args, cwd):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cli = [sys.executable, "-c", "from pipelines.cli import main; main()"]
    return subprocess.run([*cli, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def test_the_gpu_wheel_is_alone_and_has_its_cuda_provider():
    """The `gpu` extra installs onnxruntime-gpu without onnxruntime (which would hide the CUDA provider)."""
    import onnxruntime

    assert not _installed("onnxruntime"), "the gpu extra must not bring the CPU wheel"
    assert "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    assert hasattr(onnxruntime, "preload_dlls")


def test_auto_runs_on_the_cpu_says_why_and_equals_plain_onnxruntime_bitwise(tmp_path):
    """No CUDA libraries here: --device auto runs on the CPU with one warning in ONNX Runtime's own
    words (not its raw colour-coded lines); the numbers are plain onnxruntime's, bit for bit."""
    plain = os.environ.get("PAINN_PLAIN_ORT_OUTPUT")
    assert plain, "make ort-gpu-check sets PAINN_PLAIN_ORT_OUTPUT: the demo run with plain onnxruntime"
    out = tmp_path / "gpu-wheel.h5"
    done = _batch("run", str(ROOT / "examples" / "emt_examples.h5"), "-o", str(out), "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert (summary["device"], summary["provider"]) == ("cpu", "cpu")
    warned = [line for line in done.stderr.splitlines() if "--device auto runs on the CPU" in line]
    assert len(warned) == 1 and "could not start its CUDA provider" in warned[0], done.stderr
    assert "[E:onnxruntime" not in done.stderr and "\x1b[" not in done.stderr
    with h5py.File(out) as got, h5py.File(ROOT / plain) as want:
        for name in ("energy", "forces", "status"):
            np.testing.assert_array_equal(got[name][...], want[name][...])
        assert got.attrs["fingerprint_runtime"] == want.attrs["fingerprint_runtime"] == "onnxruntime-cpu"


def test_cuda_is_refused_with_onnxruntimes_reason(tmp_path):
    done = _batch(
        "run",
        str(ROOT / "examples" / "emt_examples.h5"),
        "-o",
        str(tmp_path / "o.h5"),
        "--device",
        "cuda",
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "could not start its CUDA provider on cuda:0: " in lines[0], done.stderr
    assert not list(tmp_path.glob("o*"))
