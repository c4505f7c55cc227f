"""The scatter-free model against the independent torch_scatter reference."""

import dataclasses

import numpy as np
import pytest
import torch

from painn_export import PaiNNConfig, TargetNormalization
from painn_export.tolerances import compare, tolerance

from conftest import SMALL, make_model
from structures import all_kinds, predict, reference_feed

pytest.importorskip("torch_scatter", reason="torch-scatter not installed (pip install .[reference])")
from painn_export.reference import reference_forward

NORMALIZED = TargetNormalization(
    energy_mean=-1.3,
    energy_std=2.5,
    forces_mean=0.01,
    forces_std=0.7,
    element_references=tuple(np.linspace(-3.0, 1.0, 84)),
)
VARIANTS = {
    "default": (SMALL, TargetNormalization()),
    "normalized": (SMALL, NORMALIZED),
    "bessel_exponential": (
        dataclasses.replace(SMALL, rbf="spherical_bessel", envelope="exponential"),
        NORMALIZED,
    ),
    "bernstein_p7": (dataclasses.replace(SMALL, rbf="bernstein", envelope_exponent=7), TargetNormalization()),
    # forces = -dE/dx: through the reverse-edge gathers here, autograd through torch_scatter there
    "gradient_forces": (dataclasses.replace(SMALL, direct_forces=False), NORMALIZED),
}


def assert_matches(model, graphs, dtype, label):
    dt = "float64" if dtype == torch.float64 else "float32"
    out = predict(model, graphs)
    ref_e, ref_f = reference_forward(
        model.state_dict(), model.config, model.normalization, **reference_feed(graphs, dtype)
    )
    natoms = np.array([g.n_atoms for g in graphs])
    for name, a, b in [
        ("energy", out["energy"] / natoms, ref_e.numpy() / natoms),
        ("forces", out["forces"], ref_f.numpy()),
    ]:
        kind = "scatter_free_vs_reference" + ("" if model.config.direct_forces else "_gradient")
        result = compare(name, a, b, tolerance(kind, dt, name))
        assert result.passed, f"{label} ({dt}, natoms {natoms.tolist()}): {result.describe()}"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_scatter_free_matches_reference(variant, dtype, rng):
    config, norm = VARIANTS[variant]
    model = make_model(config, dtype, normalization=norm)
    structures = all_kinds(rng)
    graphs = [s.graph(config.cutoff, config.max_neighbors) for s in structures]
    assert min(g.n_edges / g.n_atoms for g in graphs if g.n_edges) > 1
    for s, g in zip(structures, graphs):
        assert_matches(model, [g], dtype, f"{variant}/{s.name}")
    assert_matches(model, graphs, dtype, f"{variant}/batch")


def test_tiny_cell_has_many_edges_per_atom(rng):
    from structures import tiny_cell

    g = tiny_cell(rng).graph(cutoff=5.0, max_neighbors=100)
    assert g.n_edges / g.n_atoms > 20
    model = make_model()
    assert_matches(model, [g], torch.float64, "tiny_cell, 100 neighbours")


def test_reference_detects_a_wrong_model(rng):
    """The comparison can fail: one perturbed weight is caught."""
    model = make_model()
    graphs = [s.graph(SMALL.cutoff, SMALL.max_neighbors) for s in all_kinds(rng)]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["message_layers.1.rbf_proj.bias"] += 1e-6
    energy = predict(model, graphs)["energy"]
    ref_e, _ = reference_forward(state, model.config, model.normalization, **reference_feed(graphs))
    tol = tolerance("scatter_free_vs_reference", "float64", "energy")
    assert not compare("energy", energy, ref_e.numpy(), tol).passed


def test_upstream_state_dict_names_load_strictly():
    """Every parameter/buffer name is upstream's (listed from upstream PaiNN's state_dict)."""
    model = make_model(PaiNNConfig(hidden_channels=8, num_layers=1, num_rbf=4))
    expected = {
        "atom_emb.embeddings.weight",
        "radial_basis.rbf.offset",
        "message_layers.0.x_proj.0.weight",
        "message_layers.0.x_proj.0.bias",
        "message_layers.0.x_proj.2.weight",
        "message_layers.0.x_proj.2.bias",
        "message_layers.0.rbf_proj.weight",
        "message_layers.0.rbf_proj.bias",
        "message_layers.0.x_layernorm.weight",
        "message_layers.0.x_layernorm.bias",
        "update_layers.0.vec_proj.weight",
        "update_layers.0.xvec_proj.0.weight",
        "update_layers.0.xvec_proj.0.bias",
        "update_layers.0.xvec_proj.2.weight",
        "update_layers.0.xvec_proj.2.bias",
        "upd_out_scalar_scale_0.scale_factor",
        "out_energy.0.weight",
        "out_energy.0.bias",
        "out_energy.2.weight",
        "out_energy.2.bias",
    } | {
        f"out_forces.output_network.{b}.{p}"
        for b in (0, 1)
        for p in (
            "vec1_proj.weight",
            "vec2_proj.weight",
            "update_net.0.weight",
            "update_net.0.bias",
            "update_net.2.weight",
            "update_net.2.bias",
        )
    }
    assert set(model.state_dict()) == expected
    # Upstream's gradient-force PaiNN has no force head.
    gradient = make_model(PaiNNConfig(hidden_channels=8, num_layers=1, num_rbf=4, direct_forces=False))
    assert set(gradient.state_dict()) == {k for k in expected if not k.startswith("out_forces.")}
