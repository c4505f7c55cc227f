"""TensorRT: sidecar checks and profiles run everywhere; building engines needs TensorRT and a GPU."""

import pytest

from painn_export.trt import Profile, check_sidecar


def test_sidecar_mismatch_is_refused_with_rebuild_advice():
    sidecar = {"tensorrt_version": "10.1.0", "gpu_name": "NVIDIA H100", "compute_capability": "9.0"}
    check_sidecar(sidecar, "10.1.0", "NVIDIA H100", "9.0")
    with pytest.raises(RuntimeError, match="rebuild"):
        check_sidecar(sidecar, "10.3.0", "NVIDIA H100", "9.0")
    with pytest.raises(RuntimeError, match="A100"):
        check_sidecar(sidecar, "10.1.0", "NVIDIA A100", "8.0")


def test_profiles_validate_and_admit():
    p = Profile(atoms=(1, 100, 1000), slots=(8, 48, 96), systems=(1, 4, 64))
    assert p.admits(500, 64, 10) and not p.admits(2000, 10, 1) and not p.admits(500, 128, 10)
    shapes = p.input_shapes()
    assert shapes["neighbor_shift"] == ((1, 8, 3), (100, 48, 3), (1000, 96, 3))
    assert shapes["neighbor_reverse"] == ((1, 8), (100, 48), (1000, 96))
    assert shapes["cell"] == ((1, 3, 3), (4, 3, 3), (64, 3, 3))
    with pytest.raises(ValueError):
        Profile(atoms=(10, 5, 100))


def test_cli_profiles_trtexec_style():
    from painn_export.cli import _profiles

    ranges = {f"{b}_{a}": () for b in ("min", "opt", "max") for a in ("atoms", "slots", "systems")}
    ranges.update(max_atoms=(1000, 20000), opt_atoms=(500, 10000))
    profiles = _profiles(ranges)
    assert [p.atoms[2] for p in profiles] == [1000, 20000]


@pytest.mark.tensorrt
def test_engine_build_and_parity(tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT not installed")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from painn_export.export import export_onnx
    from painn_export.parity import run_parity
    from painn_export.runners import TensorRTRunner
    from painn_export.samples import example_set
    from painn_export.trt import build_engine

    from conftest import SMALL, make_model

    model = make_model(SMALL, torch.float32)
    onnx_path = export_onnx(model, tmp_path / "m.onnx")
    engine = build_engine(onnx_path, tmp_path / "m.engine", [Profile()], tf32=False)
    rows = run_parity(model, [(TensorRTRunner(engine), "float32")], example_set())
    assert all(r.comparison.passed for r in rows), [r.as_dict() for r in rows]
