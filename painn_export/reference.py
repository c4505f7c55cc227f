"""Reference PaiNN that aggregates with ``torch_scatter``, upstream's way.

It exists only to check :class:`painn_export.model.PaiNN`. It shares no
forward code with it: it reads the same state_dict as plain tensors and
evaluates the upstream equations functionally, gathering ``x_j`` per edge and
reducing with ``torch_scatter.scatter(..., reduce="sum")`` exactly where
upstream's ``MessagePassing`` does. ``torch_scatter`` is imported when the
reference is first evaluated; install the ``reference`` extra for it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as fn

from painn_export.config import PaiNNConfig, TargetNormalization


def _scatter():
    try:
        from torch_scatter import scatter
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the torch_scatter reference needs torch-scatter: "
            "pip install --no-build-isolation torch-scatter (after torch)"
        ) from exc
    return scatter


def _silu(x: torch.Tensor) -> torch.Tensor:
    return fn.silu(x) * (1 / 0.6)


def _mlp(w: Mapping[str, torch.Tensor], prefix: str, x: torch.Tensor) -> torch.Tensor:
    """``Linear -> ScaledSiLU -> Linear`` stored as ``prefix.0`` and ``prefix.2``."""
    h = _silu(fn.linear(x, w[f"{prefix}.0.weight"], w[f"{prefix}.0.bias"]))
    return fn.linear(h, w[f"{prefix}.2.weight"], w[f"{prefix}.2.bias"])


def _radial(w: Mapping[str, torch.Tensor], cfg: PaiNNConfig, dist: torch.Tensor) -> torch.Tensor:
    ds = dist / cfg.cutoff
    if cfg.envelope == "polynomial":
        p = float(cfg.envelope_exponent)
        env = (
            1 - (p + 1) * (p + 2) / 2 * ds**p + p * (p + 2) * ds ** (p + 1) - p * (p + 1) / 2 * ds ** (p + 2)
        )
    else:
        env = torch.exp(-(ds**2) / ((1 - ds) * (1 + ds)))
    env = torch.where(ds < 1, env, torch.zeros_like(ds))
    if cfg.rbf == "gaussian":
        mu = w["radial_basis.rbf.offset"]
        width = torch.linspace(0, 1, cfg.num_rbf, dtype=torch.float32)
        coeff = -0.5 / float(width[1] - width[0]) ** 2
        basis = torch.exp(coeff * (ds[:, None] - mu[None, :]) ** 2)
    elif cfg.rbf == "spherical_bessel":
        freq = w["radial_basis.rbf.frequencies"]
        basis = math.sqrt(2 / cfg.cutoff**3) / ds[:, None] * torch.sin(freq * ds[:, None])
    else:
        k = torch.arange(cfg.num_rbf)
        n = cfg.num_rbf - 1
        binom = torch.tensor([math.comb(n, int(i)) for i in k], dtype=dist.dtype)
        e = torch.exp(-fn.softplus(w["radial_basis.rbf.pregamma"]) * ds)[:, None]
        basis = binom * e**k * (1 - e) ** (n - k)
    return env[:, None] * basis


def _gated(w, prefix: str, x: torch.Tensor, v: torch.Tensor, out: int):
    v1 = torch.linalg.norm(fn.linear(v, w[f"{prefix}.vec1_proj.weight"]), dim=-2)
    v2 = fn.linear(v, w[f"{prefix}.vec2_proj.weight"])
    x, gate = torch.split(_mlp(w, f"{prefix}.update_net", torch.cat([x, v1], -1)), out, -1)
    return _silu(x), gate.unsqueeze(1) * v2


def reference_forward(
    state_dict: Mapping[str, torch.Tensor],
    config: PaiNNConfig,
    normalization: TargetNormalization,
    atomic_numbers: torch.Tensor,  # [n_atoms] int64
    positions: torch.Tensor,  # [n_atoms, 3] Å
    edge_index: torch.Tensor,  # [2, n_edges] (j, i)
    edge_shift: torch.Tensor,  # [n_edges, 3] Å
    system_index: torch.Tensor,  # [n_atoms]
    natoms: torch.Tensor,  # [n_systems]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Energy ``[n_systems]`` eV and forces ``[n_atoms, 3]`` eV/Å, in ``positions.dtype``.

    Direct-force models evaluate the force head; gradient-force models
    (``direct_forces=False``) differentiate the energy with autograd.
    """
    gradient = not config.direct_forces
    with torch.enable_grad() if gradient else torch.no_grad():
        if gradient:
            positions = positions.detach().requires_grad_(True)
        energy, forces = _reference(
            state_dict, config, atomic_numbers, positions, edge_index, edge_shift, system_index, natoms
        )
        if gradient:
            (grad,) = torch.autograd.grad(energy.sum(), [positions])
            forces = -grad
    energy, forces = energy.detach(), forces.detach()
    scatter = _scatter()
    nz = normalization
    energy = energy * nz.energy_std + nz.energy_mean
    forces = forces * nz.forces_std + nz.forces_mean
    if any(nz.element_references):
        refs = torch.tensor(nz.element_references, dtype=positions.dtype)[atomic_numbers]
        energy = energy + scatter(refs, system_index, dim=0, dim_size=natoms.shape[0], reduce="sum")
    return energy, forces


def _reference(state_dict, config, atomic_numbers, positions, edge_index, edge_shift, system_index, natoms):
    """Normalised energy ``[n_systems]`` and direct forces ``[n_atoms, 3]`` (None for gradient models)."""
    scatter = _scatter()
    dtype = positions.dtype
    w = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state_dict.items()}
    H = config.hidden_channels
    n = positions.shape[0]
    j, i = edge_index

    vec_ij = positions[j] - positions[i] + edge_shift
    d = vec_ij.norm(dim=-1)
    d = torch.where(torch.isclose(d, torch.zeros_like(d), atol=1e-6), torch.full_like(d, 1e-6), d)
    r_ij = vec_ij / d[:, None]
    rbf = _radial(w, config, d)

    x = fn.embedding(atomic_numbers - 1, w["atom_emb.embeddings.weight"])
    vec = torch.zeros(n, 3, H, dtype=dtype)
    for layer in range(config.num_layers):
        m = f"message_layers.{layer}"
        xn = fn.layer_norm(x, (H,), w[f"{m}.x_layernorm.weight"], w[f"{m}.x_layernorm.bias"])
        xh = _mlp(w, f"{m}.x_proj", xn)
        rbfh = fn.linear(rbf, w[f"{m}.rbf_proj.weight"], w[f"{m}.rbf_proj.bias"])
        # message(x_j, vec_j, rbf_ij, r_ij), then aggregate at i = edge_index[1]
        m_x, m_a, m_b = torch.split(xh[j] * rbfh, H, dim=-1)
        m_vec = vec[j] * (m_a / math.sqrt(3)).unsqueeze(1) + m_b.unsqueeze(1) * r_ij.unsqueeze(2)
        m_vec = m_vec / math.sqrt(H)
        x = x + scatter(m_x, i, dim=0, dim_size=n, reduce="sum")
        vec = vec + scatter(m_vec, i, dim=0, dim_size=n, reduce="sum")
        x = x / math.sqrt(2)

        u = f"update_layers.{layer}"
        v1, v2 = torch.split(fn.linear(vec, w[f"{u}.vec_proj.weight"]), H, dim=-1)
        dot = (v1 * v2).sum(dim=1) / math.sqrt(H)
        norm = torch.sqrt((v2**2).sum(dim=-2) + 1e-8)
        a1, a2, a3 = torch.split(_mlp(w, f"{u}.xvec_proj", torch.cat([x, norm], -1)), H, -1)
        x = x + (a1 + a2 * dot) / math.sqrt(2)
        vec = vec + a3.unsqueeze(1) * v1
        s = w[f"upd_out_scalar_scale_{layer}.scale_factor"]
        if float(s) != 0.0:
            x = x * s

    e_atom = _mlp(w, "out_energy", x).squeeze(-1)
    energy = scatter(e_atom, system_index, dim=0, dim_size=natoms.shape[0], reduce="sum")
    if not config.direct_forces:
        return energy, None
    xo, vo = _gated(w, "out_forces.output_network.0", x, vec, H // 2)
    _, vo = _gated(w, "out_forces.output_network.1", xo, vo, 1)
    return energy, vo.squeeze(-1)
