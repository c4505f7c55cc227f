"""Loading OCP/fairchem checkpoints (synthetic, in upstream's layout) and our native format."""

import json

import numpy as np
import pytest
import torch

from painn_export import CheckpointError, PaiNN, PaiNNConfig, TargetNormalization, load_checkpoint, save_model
from painn_export.checkpoint import load_model

from conftest import make_model
from structures import all_kinds, run

CONFIG = PaiNNConfig(hidden_channels=16, num_layers=2, num_rbf=8, cutoff=5.0, max_neighbors=20)
ATTRS = {
    "hidden_channels": 16,
    "num_layers": 2,
    "num_rbf": 8,
    "cutoff": 5.0,
    "max_neighbors": 20,
    "rbf": {"name": "gaussian"},
    "envelope": {"name": "polynomial", "exponent": 5},
    "regress_forces": True,
    "direct_forces": True,
    "use_pbc": True,
    "otf_graph": True,
    "num_elements": 83,
    "scale_file": "painn_scaling_factors.json",
}


def upstream_checkpoint(model, *, style="ocp", prefix="module.", normalizers=True, with_scales=True):
    """A checkpoint dict laid out as the OCP (or fairchem) trainer writes it."""
    state = {prefix + k: v.float().clone() for k, v in model.state_dict().items()}
    if not with_scales:
        state = {k: v for k, v in state.items() if "upd_out_scalar_scale" not in k}
    if style == "ocp":
        config = {"model": "painn", "model_attributes": dict(ATTRS), "dataset": {"normalize_labels": True}}
    else:
        config = {"model": {"name": "painn", **ATTRS}}
    ckpt = {"epoch": 3, "step": 1000, "state_dict": state, "config": config, "optimizer": {}, "amp": None}
    if normalizers:
        if style == "ocp":
            ckpt["normalizers"] = {
                "target": {"mean": torch.tensor(-0.7), "std": torch.tensor(2.5)},
                "grad_target": {"mean": torch.tensor(0.0), "std": torch.tensor(0.9)},
            }
        else:
            ckpt["normalizers"] = {
                "energy": {"mean": torch.tensor(-0.7), "rmsd": torch.tensor(2.5)},
                "forces": {"mean": torch.tensor(0.0), "rmsd": torch.tensor(0.9)},
            }
            ckpt["elementrefs"] = {"energy": {"element_references": torch.linspace(-2, 0, 100)}}
    return ckpt


def expected_normalization(style):
    refs = tuple(torch.linspace(-2, 0, 100).double().tolist()) if style == "fairchem" else ()
    f32 = [float(torch.tensor(v)) for v in (-0.7, 2.5, 0.0, 0.9)]  # stored as float32 tensors
    return TargetNormalization(*f32, refs)


@pytest.fixture
def graphs(rng):
    return [s.graph(CONFIG.cutoff, CONFIG.max_neighbors) for s in all_kinds(rng)]


@pytest.mark.parametrize("style", ["ocp", "fairchem"])
def test_upstream_checkpoint_round_trips(style, tmp_path, graphs):
    source = make_model(CONFIG, torch.float32)
    path = tmp_path / "checkpoint.pt"
    torch.save(upstream_checkpoint(source, style=style), path)

    loaded = load_checkpoint(path, dtype=torch.float64)
    assert loaded.config == CONFIG
    assert loaded.provenance["source_format"] == "ocp" and len(loaded.provenance["source_sha256"]) == 64

    # The same weights with the checkpoint's normalisers applied by hand.
    norm = expected_normalization(style)
    truth = PaiNN(CONFIG, norm)
    truth.load_state_dict(source.state_dict())
    e, f = run(loaded, graphs)
    e_truth, f_truth = run(truth.double().eval(), graphs)
    np.testing.assert_array_equal(e, e_truth)
    np.testing.assert_array_equal(f, f_truth)
    # The normalisers really were applied: outputs differ from the raw model's.
    e_raw, _ = run(source.double(), graphs)
    assert not np.allclose(e, e_raw)


def test_scale_factors_from_separate_file(tmp_path, graphs):
    source = make_model(CONFIG, torch.float32)
    scales = {f"upd_out_scalar_scale_{i}": float(s.scale_factor) for i, s in enumerate(source.layer_scales())}
    (tmp_path / "painn_scaling_factors.json").write_text(json.dumps({"comment": "painn", **scales}))
    path = tmp_path / "old.pt"
    torch.save(upstream_checkpoint(source, with_scales=False, normalizers=False), path)

    loaded = load_checkpoint(path, dtype=torch.float64)  # finds the config's scale file beside it
    np.testing.assert_array_equal(run(loaded, graphs)[0], run(source.double(), graphs)[0])

    explicit = tmp_path / "elsewhere.json"
    explicit.write_text(json.dumps(scales))
    loaded = load_checkpoint(path, scale_file=explicit, dtype=torch.float64)
    np.testing.assert_array_equal(run(loaded, graphs)[0], run(source.double(), graphs)[0])


def test_missing_scale_file_is_a_clear_error(tmp_path):
    path = tmp_path / "old.pt"
    torch.save(upstream_checkpoint(make_model(CONFIG), with_scales=False), path)
    with pytest.raises(CheckpointError, match=r"upd_out_scalar_scale.*scale_file"):
        load_checkpoint(path)


def test_scale_dict_overrides_and_ema_weights_are_used(tmp_path, graphs):
    source = make_model(CONFIG, torch.float32, seed=1)
    other = make_model(CONFIG, torch.float32, seed=2)
    ckpt = upstream_checkpoint(other, normalizers=False)
    ckpt["ema"] = {
        "decay": 0.999,
        "num_updates": 10,
        "shadow_params": [p.detach().clone() for p in source.parameters() if p.requires_grad],
    }
    ckpt["scale_dict"] = {
        f"upd_out_scalar_scale_{i}": float(s.scale_factor) for i, s in enumerate(source.layer_scales())
    }
    path = tmp_path / "ema.pt"
    torch.save(ckpt, path)
    loaded = load_checkpoint(path, dtype=torch.float64)
    assert loaded.provenance["used_ema"]
    np.testing.assert_array_equal(run(loaded, graphs)[1], run(source.double(), graphs)[1])
    raw = load_checkpoint(path, dtype=torch.float64, use_ema=False)
    assert not np.allclose(run(raw, graphs)[1], run(source.double(), graphs)[1])


def test_native_round_trip(tmp_path, graphs):
    model = make_model(CONFIG, torch.float32, normalization=expected_normalization("fairchem"))
    path = save_model(model, tmp_path / "model.pt", provenance={"note": "test"})
    loaded = load_model(path, dtype=torch.float32)
    assert loaded.config == model.config and loaded.normalization == model.normalization
    assert loaded.provenance["note"] == "test"
    e, f = run(loaded, graphs, torch.float32)
    e0, f0 = run(model, graphs, torch.float32)
    np.testing.assert_array_equal(e, e0)
    np.testing.assert_array_equal(f, f0)


def _corrupt(ckpt, what):
    if what == "unknown_hparam":
        ckpt["config"]["model_attributes"]["num_spherical"] = 7
    elif what == "not_painn":
        ckpt["config"]["model"] = "gemnet_oc"
    elif what == "bad_rbf":
        ckpt["config"]["model_attributes"]["rbf"] = {"name": "gaussian", "width": 2}
    elif what == "missing_weight":
        del ckpt["state_dict"]["module.out_energy.0.weight"]
    elif what == "extra_weight":
        ckpt["state_dict"]["module.out_dipole.weight"] = torch.zeros(3)
    elif what == "bad_normalizer":
        ckpt["normalizers"]["target"] = {"mean": torch.tensor(0.0)}
    elif what == "unknown_normalizer":
        ckpt["normalizers"]["stress"] = {"mean": 0.0, "std": 1.0}
    elif what == "no_state_dict":
        del ckpt["state_dict"]
    return ckpt


@pytest.mark.parametrize(
    ("what", "message"),
    [
        ("unknown_hparam", r"num_spherical"),
        ("not_painn", r"gemnet_oc"),
        ("bad_rbf", r"rbf.*width"),
        ("missing_weight", r"missing.*out_energy\.0\.weight"),
        ("extra_weight", r"unexpected.*out_dipole"),
        ("bad_normalizer", r"\['target'\] has neither 'std'"),
        ("unknown_normalizer", r"'stress'"),
        ("no_state_dict", r"'state_dict'"),
    ],
)
def test_malformed_checkpoint_errors_name_the_key(what, message, tmp_path):
    path = tmp_path / f"{what}.pt"
    torch.save(_corrupt(upstream_checkpoint(make_model(CONFIG)), what), path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"definitely not a torch file")
    with pytest.raises(CheckpointError, match=r"garbage\.pt: not a readable torch checkpoint"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "absent.pt")
