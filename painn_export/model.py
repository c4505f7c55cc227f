"""Scatter-free PaiNN (Schütt et al. 2021, arXiv:2102.03150) with OCP numerics.

This is upstream OCP/fairchem PaiNN (``ocpmodels.models.painn.painn``) written
as a pure function of a precomputed graph in the neighbour-major ("slot")
layout of :mod:`painn_export.contract`: no torch_scatter, no torch_geometric,
no neighbour search inside ``forward``, and no scatter of any kind. Parameter
and buffer names are upstream's, so an upstream state_dict loads with
``strict=True``.

It reads as the paper's Figure 2: an embedding, then per layer a message
(:class:`PaiNNMessage`) and an update (:class:`PaiNNUpdate`), then a readout
(atomic energies, and direct forces or ``-∂E/∂x``). Every sum over edges is a
slot primitive of :mod:`painn_export.slots`. The graph returns per-atom
quantities; the sums over a system's atoms are the host's, in float64
(:mod:`painn_export.readout`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from painn_export.config import PaiNNConfig, TargetNormalization
from painn_export.contract import STRESS_NEEDS_GRADIENT, output_names
from painn_export.layers import AtomEmbedding, RadialBasis, ScaledSiLU, ScaleFactor, const
from painn_export.readout import SystemReadout
from painn_export.slots import GraphInputs, gather_neighbors, pairs_to_slots, slots_to_pairs

# Upstream replaces edge lengths within this distance of zero by this value
# before dividing by them (Å).
ZERO_DISTANCE_EPS = 1.0e-6
# Added under the square root of |v|^2 in the update block, as upstream, so
# that the norm has a finite gradient at zero.
NORM_EPS = 1.0e-8


class EdgeGeometry(NamedTuple):
    """What the messages need of the edges: directions per slot, radial basis per pair."""

    unit_vector: torch.Tensor  # [N, K, 3] r̂_ij, from centre i to neighbour j
    basis: torch.Tensor  # [P + 1, R + 1] each pair's masked radial basis, mask appended; last row zero


class PaiNNMessage(nn.Module):
    """Message block (paper eq. 7-8, OCP variant with LayerNorm).

    ``φ(s_j) ∘ W(r_ij)`` has three F-wide parts ``(Δs, a, b)``:

    - ``Δs_i = Σ_j Δs_ij``
    - ``Δv_i = Σ_j (v_j a_ij / √3 + b_ij r̂_ij) / √F``

    ``φ`` is upstream's MLP ``x_proj`` (F -> F -> 3F). It is computed part by
    part: the hidden layer once (:meth:`phi_hidden`), then each part from its
    own F rows of the last Linear (:meth:`phi`), so that no ``[N, K, 3F]``
    tensor is ever split. ``W`` is upstream's ``rbf_proj`` (R -> 3F), also
    part by part (:meth:`radial_filter`).
    """

    def __init__(self, hidden_channels: int, num_rbf: int) -> None:
        super().__init__()
        self.hidden_channels = hidden_channels
        self.x_proj = nn.Sequential(
            nn.Linear(hidden_channels, hidden_channels),
            ScaledSiLU(),
            nn.Linear(hidden_channels, hidden_channels * 3),
        )
        self.rbf_proj = nn.Linear(num_rbf, hidden_channels * 3)
        self.inv_sqrt_3 = 1 / math.sqrt(3.0)
        self.inv_sqrt_h = 1 / math.sqrt(hidden_channels)
        self.x_layernorm = nn.LayerNorm(hidden_channels)

    def _rows(self, part: int) -> slice:
        F = self.hidden_channels
        return slice(part * F, (part + 1) * F)

    def phi_hidden(self, x: torch.Tensor) -> torch.Tensor:
        """``x_proj``'s first Linear and activation on the normalised scalars: ``[N, F]``."""
        first, act = self.x_proj[0], self.x_proj[1]
        return act(first(self.x_layernorm(x)))

    def phi(self, hidden: torch.Tensor, part: int) -> torch.Tensor:
        """Part ``part`` (0: Δs, 1: a, 2: b) of ``x_proj``'s last Linear: ``[N, F]``."""
        last = self.x_proj[2]
        rows = self._rows(part)
        return torch.nn.functional.linear(hidden, last.weight[rows], last.bias[rows])

    def radial_filter(self, part: int, edges: EdgeGeometry, graph: GraphInputs) -> torch.Tensor:
        """Part ``part`` of ``W(r_ij)`` in the slots, ``[N, K, F]`` (zero in padding).

        The projection runs once per pair, not per slot (an edge and its
        reverse have one length), on the basis with the mask appended: the
        bias enters as the weight of that last column.
        """
        rows = self._rows(part)
        weight = torch.cat(
            [self.rbf_proj.weight[rows].t(), self.rbf_proj.bias[rows].unsqueeze(0)]
        )  # [R+1, F]
        per_pair = edges.basis @ weight  # [P + 1, F]; the last (padding's) row is 0 @ W = 0
        return pairs_to_slots(per_pair, graph.pair_slots, graph.slot_pair, graph.exportable_backward)

    def forward(
        self,
        x: torch.Tensor,  # [N, F]
        vec: torch.Tensor | None,  # [N, 3, F]; None where it is still zero (first layer)
        graph: GraphInputs,
        edges: EdgeGeometry,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Δs [N, F], Δv [N, 3, F])``, sums over each centre's slots."""
        hidden = self.phi_hidden(x)  # [N, F]

        def message(part: int) -> torch.Tensor:  # φ(s_j) ∘ W(r_ij), one part: [N, K, F]
            sender = gather_neighbors(self.phi(hidden, part), graph.neighbors, graph.neighbor_reverse)
            return sender * self.radial_filter(part, edges, graph)

        ds = message(0).sum(dim=1)  # [N, F]
        # Σ_j b_ij r̂_ij: [N, 3, K] @ [N, K, F]
        dv = torch.matmul(edges.unit_vector.transpose(1, 2), message(2)) * const(self.inv_sqrt_h, ds)
        if vec is not None:
            # Σ_j v_j a_ij with a_ij = φ_a(s_j) W_a(r_ij): the sender's factor is
            # applied once per atom, before the gather, not once per edge.
            sender = vec * self.phi(hidden, 1).unsqueeze(1)  # [N, 3, F]
            vec_phi = gather_neighbors(sender, graph.neighbors, graph.neighbor_reverse)  # [N, K, 3, F]
            va = (vec_phi * self.radial_filter(1, edges, graph).unsqueeze(2)).sum(dim=1)  # [N, 3, F]
            dv = dv + va * const(self.inv_sqrt_3 * self.inv_sqrt_h, va)
        return ds, dv


class PaiNNUpdate(nn.Module):
    """Update block (paper eq. 9-11).

    ``(U v, V v) = vec_proj(v)``; ``(a_vv, a_sv, a_ss) = MLP([s, ‖V v‖])``:

    - ``Δs = (a_ss + a_sv ⟨U v, V v⟩ / √F) / √2``
    - ``Δv = a_vv U v``
    """

    def __init__(self, hidden_channels: int) -> None:
        super().__init__()
        self.hidden_channels = hidden_channels
        self.vec_proj = nn.Linear(hidden_channels, hidden_channels * 2, bias=False)
        self.xvec_proj = nn.Sequential(
            nn.Linear(hidden_channels * 2, hidden_channels),
            ScaledSiLU(),
            nn.Linear(hidden_channels, hidden_channels * 3),
        )
        self.inv_sqrt_2 = 1 / math.sqrt(2.0)
        self.inv_sqrt_h = 1 / math.sqrt(hidden_channels)

    def forward(
        self,
        x: torch.Tensor,  # [n_atoms, F]
        vec: torch.Tensor,  # [n_atoms, 3, F]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        F = self.hidden_channels
        uv, vv = torch.split(self.vec_proj(vec), F, dim=-1)  # [n_atoms, 3, F] each
        vec_dot = (uv * vv).sum(dim=1) * const(self.inv_sqrt_h, uv)  # [n_atoms, F]
        # A full tensor, not a scalar: torch.onnx (2.13, dynamo) drops `x + 1e-8`.
        vv_sq = torch.sum(vv**2, dim=-2)  # [n_atoms, F]
        vv_norm = torch.sqrt(vv_sq + torch.full_like(vv_sq, NORM_EPS))  # [n_atoms, F]
        a_ss, a_sv, a_vv = torch.split(
            self.xvec_proj(torch.cat([x, vv_norm], dim=-1)), F, dim=-1
        )  # [n_atoms, F] each
        dx = (a_ss + a_sv * vec_dot) * const(self.inv_sqrt_2, x)  # [n_atoms, F]
        dvec = a_vv.unsqueeze(1) * uv  # [n_atoms, 3, F]
        return dx, dvec


class GatedEquivariantBlock(nn.Module):
    """Gated equivariant block (paper fig. 3): scalars gate a vector projection.

    ``s' = silu(MLP_s([s, ‖W1 v‖]))``, ``v' = MLP_v([s, ‖W1 v‖]) · W2 v``.
    """

    def __init__(self, hidden_channels: int, out_channels: int) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.vec1_proj = nn.Linear(hidden_channels, hidden_channels, bias=False)
        self.vec2_proj = nn.Linear(hidden_channels, out_channels, bias=False)
        self.update_net = nn.Sequential(
            nn.Linear(hidden_channels * 2, hidden_channels),
            ScaledSiLU(),
            nn.Linear(hidden_channels, out_channels * 2),
        )
        self.act = ScaledSiLU()

    def forward(
        self,
        x: torch.Tensor,  # [n_atoms, H]
        v: torch.Tensor,  # [n_atoms, 3, H]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        vec1 = torch.linalg.vector_norm(self.vec1_proj(v), dim=-2)  # [n_atoms, H]
        vec2 = self.vec2_proj(v)  # [n_atoms, 3, O]
        x, gate = torch.split(self.update_net(torch.cat([x, vec1], dim=-1)), self.out_channels, dim=-1)
        return self.act(x), gate.unsqueeze(1) * vec2  # [n_atoms, O], [n_atoms, 3, O]


class PaiNNOutput(nn.Module):
    """Direct force head: two gated equivariant blocks, F -> F/2 -> 1 vector."""

    def __init__(self, hidden_channels: int) -> None:
        super().__init__()
        self.output_network = nn.ModuleList(
            [
                GatedEquivariantBlock(hidden_channels, hidden_channels // 2),
                GatedEquivariantBlock(hidden_channels // 2, 1),
            ]
        )

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        for block in self.output_network:
            x, vec = block(x, vec)
        return vec.squeeze(-1)  # [n_atoms, 3]


class PaiNN(nn.Module):
    """PaiNN energy and force model on a precomputed graph.

    Forces come from the direct, equivariant head (``direct_forces=True``,
    upstream's default) or as ``-∂E/∂positions`` (``direct_forces=False``);
    gradient models can also return each atom's virial, for the stress. The
    outputs are per atom (:mod:`painn_export.contract`), de-normalised with
    ``normalization`` except for the per-system energy mean and element
    references, which :class:`painn_export.readout.SystemReadout` adds.
    """

    def __init__(
        self,
        config: PaiNNConfig | None = None,
        normalization: TargetNormalization | None = None,
    ) -> None:
        super().__init__()
        config = config or PaiNNConfig()
        normalization = normalization or TargetNormalization()
        if not config.regress_forces:
            raise NotImplementedError(
                "energy-only models (regress_forces=False) are not supported: every runtime "
                "contract outputs forces"
            )
        refs = normalization.element_references
        if refs and len(refs) < config.num_elements + 1:
            raise ValueError(
                f"element_references has {len(refs)} entries; it needs one per atomic "
                f"number 0..{config.num_elements} ({config.num_elements + 1})"
            )
        self.config = config
        self.normalization = normalization
        # Where the weights came from (source file hash, format), recorded by the
        # checkpoint loader and written into exported files' metadata.
        self.provenance: dict[str, str] = {}
        F = config.hidden_channels

        self.atom_emb = AtomEmbedding(F, config.num_elements)
        self.radial_basis = RadialBasis(config)
        self.message_layers = nn.ModuleList(
            [PaiNNMessage(F, config.num_rbf) for _ in range(config.num_layers)]
        )
        self.update_layers = nn.ModuleList([PaiNNUpdate(F) for _ in range(config.num_layers)])
        # Upstream names these per-layer scales "upd_out_scalar_scale_{i}" at
        # the model's top level; the names are part of the checkpoint format.
        for i in range(config.num_layers):
            self.add_module(f"upd_out_scalar_scale_{i}", ScaleFactor())
        self.out_energy = nn.Sequential(nn.Linear(F, F // 2), ScaledSiLU(), nn.Linear(F // 2, 1))
        # As upstream, the force head exists only in direct-force models.
        self.out_forces = PaiNNOutput(F) if config.direct_forces else None
        self.inv_sqrt_2 = 1 / math.sqrt(2.0)
        self.reset_parameters()

    @property
    def gradient_forces(self) -> bool:
        """Forces are ``-∂E/∂positions`` (and stress is available)."""
        return not self.config.direct_forces

    def reset_parameters(self) -> None:
        """Upstream's initialisation (Xavier-uniform weights, zero biases)."""
        linears = [self.out_energy[0], self.out_energy[2]]
        for layer in self.message_layers:
            linears += [layer.x_proj[0], layer.x_proj[2], layer.rbf_proj]
        for layer in self.update_layers:
            linears += [layer.vec_proj, layer.xvec_proj[0], layer.xvec_proj[2]]
        if self.out_forces is not None:
            for block in self.out_forces.output_network:
                linears += [block.vec1_proj, block.vec2_proj, block.update_net[0], block.update_net[2]]
        for lin in linears:
            nn.init.xavier_uniform_(lin.weight)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def layer_scales(self) -> list[ScaleFactor]:
        return [getattr(self, f"upd_out_scalar_scale_{i}") for i in range(self.config.num_layers)]

    def forward(self, graph: GraphInputs, virial: bool = False) -> tuple[torch.Tensor, ...]:
        """``(atom_energy [N] eV, forces [N, 3] eV/Å)``, plus ``atom_virial [N, 3, 3]`` eV
        with ``virial`` (gradient models only). Per-atom outputs of the contract:
        :class:`painn_export.readout.SystemReadout` makes system energies and stress."""
        if self.config.direct_forces:
            if virial:
                raise ValueError(STRESS_NEEDS_GRADIENT + "; this model has a direct force head")
            x, vec = self.representation(graph)
            forces = self.out_forces(x, vec)  # [N, 3]
            return self._denormalize_energy(self.atom_energies(x)), self._denormalize_forces(forces)
        if not graph.exportable_backward:
            raise ValueError(
                "a gradient-force model needs neighbor_reverse (the reverse-edge slots; "
                "painn_export.batch.collate builds it)"
            )
        return self._conservative(graph, virial)

    def per_atom(self, feed: dict[str, np.ndarray], virial: bool = False) -> dict[str, np.ndarray]:
        """The graph's outputs (numpy, float32 or wider) of a collated feed, in the model's dtype, device."""
        weight = self.atom_emb.embeddings.weight
        graph = GraphInputs.from_feed(feed, weight.dtype, weight.device, self.gradient_forces)
        with torch.inference_mode(self.config.direct_forces):  # gradient forces need autograd
            outputs = self(graph, virial=virial)
        wide = torch.promote_types(weight.dtype, torch.float32)  # numpy has no bfloat16
        return {n: t.detach().to(wide).cpu().numpy() for n, t in zip(output_names(virial), outputs)}

    def predict(self, feed: dict[str, np.ndarray], stress: bool = False) -> dict[str, np.ndarray]:
        """``{"energy", "forces"[, "stress"]}`` of a collated feed: the graph, then the host's sums."""
        return SystemReadout.of(self.normalization).totals(self.per_atom(feed, stress), feed)

    def edge_geometry(self, graph: GraphInputs) -> EdgeGeometry:
        """Unit vectors per slot and the masked radial basis per pair."""
        # r_ij = x_j + shift - x_i, pointing from centre i to neighbour j.
        x_j = gather_neighbors(graph.positions, graph.neighbors, graph.neighbor_reverse)  # [N, K, 3]
        distance_vec = x_j + graph.neighbor_shift - graph.positions.unsqueeze(1)  # [N, K, 3]
        # Padding slots get a unit stand-in, so that |r| and its gradient stay finite there.
        mask = graph.neighbor_mask
        edge = (mask > const(0.0, mask)).unsqueeze(-1)  # [N, K, 1]
        distance_vec = torch.where(edge, distance_vec, torch.ones_like(distance_vec))
        distance = torch.linalg.vector_norm(distance_vec, dim=-1)  # [N, K]
        distance = torch.where(
            distance <= const(ZERO_DISTANCE_EPS, distance),
            torch.full_like(distance, ZERO_DISTANCE_EPS),
            distance,
        )
        unit_vector = distance_vec / distance.unsqueeze(-1)  # [N, K, 3]
        rbf = self.radial_basis(distance.reshape(-1))  # [N * K, R]
        flat_mask = mask.reshape(-1, 1)  # [N * K, 1]
        basis = torch.cat([rbf * flat_mask, flat_mask], dim=-1)  # [N * K, R + 1], padding: all zeros
        per_pair = slots_to_pairs(basis, graph.pair_slots, graph.slot_pair, graph.exportable_backward)
        return EdgeGeometry(unit_vector, per_pair)  # basis [P + 1, R + 1]

    def representation(self, graph: GraphInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Final scalar ``s`` ``[N, F]`` and vector ``v`` ``[N, 3, F]`` features (paper Fig. 2)."""
        edges = self.edge_geometry(graph)
        x = self.atom_emb(graph.atomic_numbers)  # s: [N, F]
        vec = None  # v: [N, 3, F], zero before the first message (its v_j term is skipped)
        for message, update, scale in zip(self.message_layers, self.update_layers, self.layer_scales()):
            dx, dvec = message(x, vec, graph, edges)
            x = (x + dx) * const(self.inv_sqrt_2, x)  # [N, F]
            vec = dvec if vec is None else vec + dvec  # [N, 3, F]
            dx, dvec = update(x, vec)
            x = scale(x + dx)
            vec = vec + dvec
        return x, vec

    def atom_energies(self, x: torch.Tensor) -> torch.Tensor:
        """Readout: each atom's normalised energy ``[N]`` (upstream's ``out_energy``)."""
        return self.out_energy(x).squeeze(-1)

    def _denormalize_energy(self, atom_energy: torch.Tensor) -> torch.Tensor:
        """eV ``[N]``: times ``energy_std``, in float32 or wider whatever the model's dtype.

        The energy mean and the element references are per system: the host
        adds them, and sums per system, in float64 (:mod:`painn_export.readout`).
        """
        wide = atom_energy.to(torch.promote_types(atom_energy.dtype, torch.float32))
        return wide * const(self.normalization.energy_std, wide)

    def _conservative(self, graph: GraphInputs, virial: bool) -> tuple[torch.Tensor, ...]:
        """Atomic energies, ``F = -∂E/∂x`` and, with ``virial``, each atom's share of ``∂E/∂ε``.

        A symmetric strain ``x -> x (1 + ε)`` moves positions and the edges'
        periodic shifts, so ``∂E/∂ε = Σ_i x_i ⊗ ∂E/∂x_i + Σ_slots s ⊗ ∂E/∂s``,
        symmetrised: a per-atom sum that the host adds up per system. (Each
        structure's sum is independent of its origin: its forces sum to zero.)
        """
        with torch.enable_grad():
            positions = graph.positions.detach().requires_grad_(True)
            shift = graph.neighbor_shift.detach().requires_grad_(virial)
            x, _ = self.representation(graph._replace(positions=positions, neighbor_shift=shift))
            energy = self.atom_energies(x)  # [N] normalised
            wrt = [positions, shift] if virial else [positions]
            grads = torch.autograd.grad(energy.sum(), wrt, create_graph=self.training)
        forces = self._denormalize_forces(-grads[0])  # [N, 3]
        atom_energy = self._denormalize_energy(energy if self.training else energy.detach())
        if not virial:
            return atom_energy, forces
        strain = positions.unsqueeze(-1) * grads[0].unsqueeze(1)  # [N, 3, 3]: x_a ∂E/∂x_b
        strain = strain + (shift.unsqueeze(-1) * grads[1].unsqueeze(2)).sum(dim=1)  # + s_a ∂E/∂s_b
        strain = (strain + strain.transpose(1, 2)) * const(0.5, strain)
        # Of the physical energy: the normalised energy's times energy_std.
        return atom_energy, forces, strain * const(self.normalization.energy_std, strain)

    def _denormalize_forces(self, forces: torch.Tensor) -> torch.Tensor:
        norm = self.normalization
        return forces * const(norm.forces_std, forces) + const(norm.forces_mean, forces)
