"""TensorRT: sidecar checks and profiles run everywhere; building engines needs TensorRT and a GPU."""

import numpy as np
import pytest

from painn_export.contract import input_names
from painn_export.trt import Profile, check_sidecar


def test_sidecar_mismatch_is_refused_with_rebuild_advice():
    sidecar = {"tensorrt_version": "10.1.0", "gpu_name": "NVIDIA H100", "compute_capability": "9.0"}
    check_sidecar(sidecar, "10.1.0", "NVIDIA H100", "9.0")
    with pytest.raises(RuntimeError, match="rebuild"):
        check_sidecar(sidecar, "10.3.0", "NVIDIA H100", "9.0")
    with pytest.raises(RuntimeError, match="A100"):
        check_sidecar(sidecar, "10.1.0", "NVIDIA A100", "8.0")


def test_profiles_validate_and_admit():
    p = Profile(atoms=(1, 100, 1000), slots=(8, 48, 96))
    assert p.admits(500, 64) and not p.admits(2000, 16) and not p.admits(500, 128)
    shapes = p.input_shapes()
    assert shapes["neighbor_shift"] == ((1, 8, 3), (100, 48, 3), (1000, 96, 3))
    assert shapes["neighbor_reverse"] == ((1, 8), (100, 48), (1000, 96))
    assert shapes["pair_slots"] == ((1, 2), (2400, 2), (48000, 2))
    assert set(shapes) == {*input_names(gradient=True)}  # no host-only entry reaches the engine
    with pytest.raises(ValueError):
        Profile(atoms=(10, 5, 100))
    with pytest.raises(ValueError, match="slot count"):
        Profile(slots=(8, 50, 100))  # collate never makes 50 slots


def test_a_batch_at_the_largest_slot_profile_fits():
    """collate, the batcher and the profile agree on the slot count: a fully packed batch at
    the profile's largest slot count is admitted whole and fed with exactly that many slots."""
    from painn_export.batch import collate
    from painn_export.neighbors import neighbor_graph
    from pipelines.batches import batch_limits

    profiles = (Profile(atoms=(1, 64, 1000), slots=(8, 8, 8)),)  # an engine's (ModelFacts.profiles)

    # one atom, its eight images in a plane: every slot of K = 8 holds an edge
    g = neighbor_graph(np.zeros((1, 3)), np.diag([2.5, 2.5, 10.0]), np.array([1, 1, 0], bool), 3.6, 50)
    assert g.max_degree == 8
    limits = batch_limits(profiles, max_atoms=4096, max_edges=None)
    assert limits.admit(10, g.max_degree)
    feed = collate([g] * 10)
    assert profiles[0].admits(*feed["neighbors"].shape)


def test_an_engine_whose_profiles_start_at_eight_slots_still_takes_small_molecules():
    """Engines built before slot counts below 8 existed: a batch of diatomics (one slot would do)
    is given the engine's smallest slot count, so it fits a profile instead of failing as too large."""
    from painn_export.batch import collate
    from painn_export.neighbors import neighbor_graph
    from pipelines.batches import batch_limits

    old = (Profile(atoms=(1, 64, 1000), slots=(8, 64, 128)),)
    pos = np.array([[0.0, 0.0, 0.0], [0.74, 0.0, 0.0]])
    g = neighbor_graph(pos, np.eye(3) * 20, np.zeros(3, bool), 5.0, 50)
    assert g.max_degree == 1 and collate([g] * 10)["neighbors"].shape[1] == 1
    limits = batch_limits(old, max_atoms=4096, max_edges=None)
    assert limits.admit(20, g.max_degree)
    feed = limits.collate([g] * 10)
    assert feed["neighbors"].shape[1] == 8 and old[0].admits(*feed["neighbors"].shape)
    assert limits.slots_for(9) == 16 and batch_limits((), 4096, None).slots_for(1) == 1


def test_cli_profiles_trtexec_style():
    from painn_export.cli import _profiles

    ranges = {f"{b}_{a}": () for b in ("min", "opt", "max") for a in ("atoms", "slots")}
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
    from painn_export.runners import open_runner
    from painn_export.samples import example_set
    from painn_export.trt import build_engine

    from conftest import SMALL, make_model

    model = make_model(SMALL, torch.float32)
    onnx_path = export_onnx(model, tmp_path / "m.onnx")
    engine = build_engine(onnx_path, tmp_path / "m.engine", [Profile()], tf32=False)
    runner, _ = open_runner(engine, "tensorrt", device="cuda")
    rows = run_parity(model, [(runner, "float32")], example_set())
    assert all(r.comparison.passed for r in rows), [r.as_dict() for r in rows]
