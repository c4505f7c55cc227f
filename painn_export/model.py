"""Scatter-free PaiNN (Schütt et al. 2021, arXiv:2102.03150) with OCP numerics.

This is upstream OCP/fairchem PaiNN (``ocpmodels.models.painn.painn``) written
as a pure function of a precomputed graph in the neighbour-major ("slot")
layout of :mod:`painn_export.contract`: no torch_scatter, no torch_geometric,
no neighbour search inside ``forward``, and no scatter of any kind. Parameter
and buffer names are upstream's, so an upstream state_dict loads with
``strict=True``.

How each sum is written (so that every runtime gets the same numbers every
run, and TensorRT parses the graph with no plugin):

- over the edges into a centre ``i`` (messages): a ``Gather`` of the
  senders' rows into ``[n_atoms, n_slots, ...]``, then ``ReduceSum`` over
  the slot axis (:func:`gather_neighbors`);
- over the edges out of a sender ``j`` (the backward of that gather, which
  gradient forces and stress need): the same, through the reverse-edge index
  of the symmetric graph;
- over the atoms of a system (energies, element references, the stress's
  strain): a ``MatMul`` with the ``[n_atoms, n_systems]`` one-hot system
  matrix (:func:`system_matrix`). Exact (products with 0 and 1), a fixed
  summation order on every runtime, and small: one column per system.

Inputs and outputs are those of :mod:`painn_export.contract`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from painn_export.config import PaiNNConfig, TargetNormalization
from painn_export.contract import STRESS_NEEDS_GRADIENT
from painn_export.layers import AtomEmbedding, RadialBasis, ScaledSiLU, ScaleFactor, const

# Upstream replaces edge lengths within this distance of zero by this value
# before dividing by them (Å).
ZERO_DISTANCE_EPS = 1.0e-6
# Added under the square root of |v|^2 in the update block, as upstream, so
# that the norm has a finite gradient at zero.
NORM_EPS = 1.0e-8
# Cells with |det| below this (Å^3) have no volume: their stress is NaN.
MIN_CELL_VOLUME = 1.0e-6


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``x[index]`` ``[*index.shape, ...]`` of ``x`` ``[rows, ...]``: one Gather, any index shape."""
    return x.index_select(0, index.reshape(-1)).view(*index.shape, *x.shape[1:])


class _GatherNeighbors(torch.autograd.Function):
    """``x[neighbors]`` whose backward is a gather through the reverse edges and a slot sum."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, neighbors: torch.Tensor, reverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(reverse)
        return _take(x, neighbors)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (reverse,) = ctx.saved_tensors
        flat = grad.reshape(-1, *grad.shape[2:])  # [n_atoms * n_slots, ...]
        # Row j, slot k' holds edge i -> j; its reverse j -> i is the slot that
        # read x_j. Padding slots point at themselves, whose gradient is zero.
        return _take(flat, reverse).sum(dim=1), None, None


def gather_neighbors(
    x: torch.Tensor,  # [n_atoms, ...]
    neighbors: torch.Tensor,  # [n_atoms, n_slots] int64
    reverse: torch.Tensor | None = None,  # [n_atoms, n_slots] int64
) -> torch.Tensor:
    """Rows of the neighbours, ``x[neighbors]`` ``[n_atoms, n_slots, ...]``.

    Its gradient is a sum over the slots where each atom is the *sender*.
    With ``reverse`` (the symmetric graph's reverse-edge slots) that sum is a
    gather through ``reverse`` and a sum over the slot axis: deterministic,
    and no scatter in a traced backward. Without it, autograd's own backward
    (``index_add``) is used: fine for inference, not for export.

    The gradient read through a padding slot must be zero (the model masks
    every message of a padding slot), since padding slots reverse onto
    themselves.
    """
    if reverse is None:
        return _take(x, neighbors)
    return _GatherNeighbors.apply(x, neighbors, reverse)


class _SlotsToPairs(torch.autograd.Function):
    """Each pair's row, read from its first slot; the backward gives that slot the pair's gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, pair_slots: torch.Tensor, slot_pair: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(pair_slots, slot_pair)
        return x.index_select(0, pair_slots[:, 0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        pair_slots, slot_pair = ctx.saved_tensors
        pairs = slot_pair.reshape(-1)  # [n_atoms * K] the pair of each slot
        slots = torch.arange(pairs.shape[0], dtype=pairs.dtype, device=pairs.device)
        first = pair_slots[:, 0].index_select(0, pairs) == slots  # [n_atoms * K] the slot that was read
        keep = first.to(grad.dtype).view(-1, *([1] * (grad.dim() - 1)))
        return grad.index_select(0, pairs) * keep, None, None


class _PairsToSlots(torch.autograd.Function):
    """Each slot's row, read from its pair; the backward sums a pair's two slots."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, pair_slots: torch.Tensor, slot_pair: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(pair_slots)
        return _take(y, slot_pair)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (pair_slots,) = ctx.saved_tensors
        flat = grad.reshape(-1, *grad.shape[2:])  # [n_atoms * K, ...]
        return flat.index_select(0, pair_slots[:, 0]) + flat.index_select(0, pair_slots[:, 1]), None, None


def slots_to_pairs(
    x: torch.Tensor, pair_slots: torch.Tensor, slot_pair: torch.Tensor, grad: bool
) -> torch.Tensor:
    """``[n_pairs, ...]`` rows of ``x`` ``[n_atoms * K, ...]`` at each pair's first slot.

    With ``grad`` the backward is written without a scatter (see the classes above).
    """
    if grad:
        return _SlotsToPairs.apply(x, pair_slots, slot_pair)
    return x.index_select(0, pair_slots[:, 0])


def pairs_to_slots(
    y: torch.Tensor, pair_slots: torch.Tensor, slot_pair: torch.Tensor, grad: bool
) -> torch.Tensor:
    """``[n_atoms, K, ...]``: each slot's row of ``y`` ``[n_pairs, ...]``.

    With ``grad`` the backward (a sum of each pair's two slots) is written without a scatter.
    """
    if grad:
        return _PairsToSlots.apply(y, pair_slots, slot_pair)
    return _take(y, slot_pair)


def system_matrix(system_index: torch.Tensor, n_systems: int, like: torch.Tensor) -> torch.Tensor:
    """One-hot ``[n_atoms, n_systems]`` in ``like``'s dtype: 1 where the atom is in the system."""
    systems = torch.arange(n_systems, dtype=system_index.dtype, device=system_index.device)
    return (system_index[:, None] == systems[None, :]).to(like.dtype)


class PaiNNMessage(nn.Module):
    """Message block (paper eq. 7-8, OCP variant with LayerNorm).

    ``φ(s_j) ∘ W(r_ij)`` has three F-wide parts ``(Δs, a, b)``:

    - ``Δs_i = Σ_j Δs_ij``
    - ``Δv_i = Σ_j (v_j a_ij / √3 + b_ij r̂_ij) / √F``

    Written part by part (no split of an ``[n_atoms, K, 3F]`` tensor), with
    the projection's bias folded into the basis (see :meth:`filter`) and
    ``Σ_j b_ij r̂_ij`` as one batched matrix product per atom.
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

    def filter(self, part: int, basis: torch.Tensor, pairs, grad: bool) -> torch.Tensor:
        """Part ``part`` (0: Δs, 1: a, 2: b) of ``W(r_ij)`` in the slots, ``[n_atoms, K, F]``.

        ``basis`` ``[n_pairs, R + 1]`` is each pair's masked radial basis with
        the mask appended: the bias enters as the weight of that last column,
        so the dummy pair of the padding slots (all zeros) gets no filter. The
        projection runs once per pair, not per slot: an edge and its reverse
        have one length (half the products, and none for padding).
        """
        F = self.hidden_channels
        rows = slice(part * F, (part + 1) * F)
        weight = torch.cat(
            [self.rbf_proj.weight[rows].t(), self.rbf_proj.bias[rows].unsqueeze(0)]
        )  # [R+1, F]
        return pairs_to_slots(basis @ weight, *pairs, grad)  # [n_atoms, K, F]

    def forward(
        self,
        x: torch.Tensor,  # [n_atoms, F]
        vec: torch.Tensor | None,  # [n_atoms, 3, F]; None where it is still zero (first layer)
        neighbors: torch.Tensor,  # [n_atoms, K] senders j
        reverse: torch.Tensor | None,  # [n_atoms, K] reverse-edge slots
        basis: torch.Tensor,  # [n_pairs, R + 1] masked radial basis of each pair, mask appended
        pairs: tuple[torch.Tensor, torch.Tensor],  # pair_slots [n_pairs, 2], slot_pair [n_atoms, K]
        edge_vector: torch.Tensor,  # [n_atoms, K, 3] unit vectors i -> j
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Δs [n_atoms, F], Δv [n_atoms, 3, F])``, sums over each centre's slots."""
        F = self.hidden_channels
        h = self.x_proj[1](self.x_proj[0](self.x_layernorm(x)))  # [n_atoms, F]
        out = self.x_proj[2]
        grad = reverse is not None  # the backward must stay scatter-free

        def phi(part: int) -> torch.Tensor:  # φ(s), one part: [n_atoms, F]
            rows = slice(part * F, (part + 1) * F)
            return torch.nn.functional.linear(h, out.weight[rows], out.bias[rows])

        def message(part: int) -> torch.Tensor:  # φ(s_j) ∘ W(r_ij), one part: [n_atoms, K, F]
            return gather_neighbors(phi(part), neighbors, reverse) * self.filter(part, basis, pairs, grad)

        ds = message(0).sum(dim=1)  # [n_atoms, F]
        # Σ_j b_ij r̂_ij: [n_atoms, 3, K] @ [n_atoms, K, F]
        dv = torch.matmul(edge_vector.transpose(1, 2), message(2)) * const(self.inv_sqrt_h, ds)  # [n, 3, F]
        if vec is not None:
            # Σ_j v_j a_ij with a_ij = φ_a(s_j) W_a(r_ij): the sender's factor is
            # applied once per atom, before the gather, not once per edge.
            vec_phi = gather_neighbors(vec * phi(1).unsqueeze(1), neighbors, reverse)  # [n_atoms, K, 3, F]
            va = (vec_phi * self.filter(1, basis, pairs, grad).unsqueeze(2)).sum(dim=1)  # [n_atoms, 3, F]
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
    gradient models can also return the stress. See the module docstring for
    the input/output contract. Outputs are de-normalised with
    ``normalization`` (eV, eV/Å, eV/Å^3).
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

    def forward(
        self,
        atomic_numbers: torch.Tensor,  # [n_atoms] int64
        positions: torch.Tensor,  # [n_atoms, 3] Å
        neighbors: torch.Tensor,  # [n_atoms, K] int64 senders j
        neighbor_shift: torch.Tensor,  # [n_atoms, K, 3] Å
        neighbor_mask: torch.Tensor,  # [n_atoms, K] 1 edge / 0 padding
        slot_pair: torch.Tensor,  # [n_atoms, K] int64 pair of each slot
        pair_slots: torch.Tensor,  # [n_pairs, 2] int64 the two slots of each pair
        system_index: torch.Tensor,  # [n_atoms] int64
        natoms: torch.Tensor,  # [n_systems] int64
        neighbor_reverse: torch.Tensor | None = None,  # [n_atoms, K] int64 (gradient forces)
        cell: torch.Tensor | None = None,  # [n_systems, 3, 3] Å, rows = lattice vectors
    ) -> tuple[torch.Tensor, ...]:
        """``(energy [n_systems] eV, forces [n_atoms, 3] eV/Å)``, plus
        ``stress [n_systems, 3, 3]`` eV/Å^3 when ``cell`` is given (gradient
        models only). Inputs as :mod:`painn_export.contract`."""
        n_systems = natoms.shape[0]
        graph = (neighbors, neighbor_shift, neighbor_mask, slot_pair, pair_slots)
        if self.config.direct_forces:
            if cell is not None:
                raise ValueError(STRESS_NEEDS_GRADIENT + "; this model has a direct force head")
            x, vec = self.representation(atomic_numbers, positions, *graph, None)
            members = system_matrix(system_index, n_systems, x)  # [n_atoms, n_systems]
            energy = self.energy_head(x, members)
            forces = self.out_forces(x, vec)  # [n_atoms, 3]
            return self._denormalize(energy, forces, atomic_numbers, members)
        if neighbor_reverse is None:
            raise ValueError(
                "a gradient-force model needs neighbor_reverse (the reverse-edge slots; "
                "painn_export.batch.collate builds it)"
            )
        return self._conservative(
            atomic_numbers, positions, *graph, neighbor_reverse, system_index, n_systems, cell
        )

    def representation(
        self,
        atomic_numbers: torch.Tensor,  # [n_atoms]
        positions: torch.Tensor,  # [n_atoms, 3] Å
        neighbors: torch.Tensor,  # [n_atoms, K]
        neighbor_shift: torch.Tensor,  # [n_atoms, K, 3] Å
        neighbor_mask: torch.Tensor,  # [n_atoms, K]
        slot_pair: torch.Tensor,  # [n_atoms, K]
        pair_slots: torch.Tensor,  # [n_pairs, 2]
        reverse: torch.Tensor | None,  # [n_atoms, K]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Final scalar ``[n_atoms, F]`` and vector ``[n_atoms, 3, F]`` features."""
        # Edge geometry: r_ij = x_j + shift - x_i, pointing from centre i to neighbour j.
        x_j = gather_neighbors(positions, neighbors, reverse)  # [n_atoms, K, 3]
        distance_vec = x_j + neighbor_shift - positions.unsqueeze(1)  # [n_atoms, K, 3]
        # Padding slots get a unit stand-in, so that |r| and its gradient stay finite there.
        edge = (neighbor_mask > const(0.0, neighbor_mask)).unsqueeze(-1)  # [n_atoms, K, 1]
        distance_vec = torch.where(edge, distance_vec, torch.ones_like(distance_vec))
        distance = torch.linalg.vector_norm(distance_vec, dim=-1)  # [n_atoms, K]
        distance = torch.where(
            distance <= const(ZERO_DISTANCE_EPS, distance),
            torch.full_like(distance, ZERO_DISTANCE_EPS),
            distance,
        )
        edge_vector = distance_vec / distance.unsqueeze(-1)  # [n_atoms, K, 3]
        edge_rbf = self.radial_basis(distance.reshape(-1))  # [n_atoms * K, R]
        mask = neighbor_mask.reshape(-1, 1)  # [n_atoms * K, 1]
        # The masked basis with the mask appended (padding slots: all zeros),
        # once per pair: an edge and its reverse have one length.
        pairs = (pair_slots, slot_pair)
        basis = torch.cat([edge_rbf * mask, mask], dim=-1)  # [n_atoms * K, R + 1]
        basis = slots_to_pairs(basis, *pairs, grad=reverse is not None)  # [n_pairs, R + 1]

        # Features: scalars s [n_atoms, F], vectors v [n_atoms, 3, F] start at zero.
        x = self.atom_emb(atomic_numbers)  # [n_atoms, F]
        vec = None  # zero before the first message: its v_j term is skipped

        for message, update, scale in zip(self.message_layers, self.update_layers, self.layer_scales()):
            dx, dvec = message(x, vec, neighbors, reverse, basis, pairs, edge_vector)
            x = (x + dx) * const(self.inv_sqrt_2, x)  # [n_atoms, F]
            vec = dvec if vec is None else vec + dvec  # [n_atoms, 3, F]
            dx, dvec = update(x, vec)
            x = scale(x + dx)
            vec = vec + dvec
        return x, vec

    def energy_head(self, x: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
        """Normalised system energies ``[n_systems]``: a sum of atomic energies.

        ``members`` is the ``[n_atoms, n_systems]`` :func:`system_matrix`.
        """
        atom_energy = self.out_energy(x).squeeze(-1)  # [n_atoms]
        return atom_energy @ members  # [n_systems]

    def _conservative(
        self,
        atomic_numbers: torch.Tensor,  # [n_atoms]
        positions: torch.Tensor,  # [n_atoms, 3] Å
        neighbors: torch.Tensor,  # [n_atoms, K]
        neighbor_shift: torch.Tensor,  # [n_atoms, K, 3] Å
        neighbor_mask: torch.Tensor,  # [n_atoms, K]
        slot_pair: torch.Tensor,  # [n_atoms, K]
        pair_slots: torch.Tensor,  # [n_pairs, 2]
        reverse: torch.Tensor,  # [n_atoms, K]
        system_index: torch.Tensor,  # [n_atoms]
        n_systems: int,
        cell: torch.Tensor | None,  # [n_systems, 3, 3] Å
    ) -> tuple[torch.Tensor, ...]:
        """Energy, ``F = -∂E/∂x`` and, with ``cell``, ``σ = (1/V) ∂E/∂ε``.

        The strain ``ε`` ``[n_systems, 3, 3]`` is a symmetric deformation
        ``x -> x (1 + ε)`` applied to positions and to the periodic shifts of
        the edges (so to the cell), evaluated at ``ε = 0``.
        """
        with torch.enable_grad():
            if not positions.requires_grad:
                positions = positions.detach().requires_grad_(True)
            members = system_matrix(system_index, n_systems, positions)  # [n_atoms, n_systems]
            wrt = [positions]
            if cell is not None:
                strain = torch.zeros(
                    (n_systems, 3, 3), dtype=positions.dtype, device=positions.device, requires_grad=True
                )
                wrt.append(strain)
                sym = (strain + strain.transpose(1, 2)) * const(0.5, strain)  # [n_systems, 3, 3]
                atom_strain = (members @ sym.reshape(n_systems, 9)).view(-1, 3, 3)  # [n_atoms, 3, 3]
                positions_e = positions + (positions.unsqueeze(-1) * atom_strain).sum(dim=1)  # [n_atoms, 3]
                neighbor_shift = neighbor_shift + (
                    neighbor_shift.unsqueeze(-1) * atom_strain.unsqueeze(1)
                ).sum(dim=2)  # [n_atoms, K, 3]
            else:
                positions_e = positions
            graph = (neighbors, neighbor_shift, neighbor_mask, slot_pair, pair_slots, reverse)
            x, _ = self.representation(atomic_numbers, positions_e, *graph)
            energy = self.energy_head(x, members)  # [n_systems]
            grads = torch.autograd.grad(energy.sum(), wrt, create_graph=self.training)
        forces = -grads[0]  # [n_atoms, 3]
        energy, forces = self._denormalize(energy, forces, atomic_numbers, members)
        if cell is None:
            return energy, forces
        # Stress of the physical energy: the normalised energy's times energy_std.
        virial = grads[1] * const(self.normalization.energy_std, grads[1])  # [n_systems, 3, 3] eV
        volume = cell_volume(cell)  # [n_systems] Å^3
        has_volume = volume > const(MIN_CELL_VOLUME, volume)
        safe = torch.where(has_volume, volume, torch.ones_like(volume))
        stress = torch.where(
            has_volume[:, None, None], virial / safe[:, None, None], torch.full_like(virial, math.nan)
        )
        return energy, forces, stress

    def _denormalize(
        self,
        energy: torch.Tensor,  # [n_systems]
        forces: torch.Tensor,  # [n_atoms, 3]
        atomic_numbers: torch.Tensor,  # [n_atoms]
        members: torch.Tensor,  # [n_atoms, n_systems]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        norm = self.normalization
        energy = energy * const(norm.energy_std, energy) + const(norm.energy_mean, energy)
        forces = forces * const(norm.forces_std, forces) + const(norm.forces_mean, forces)
        if any(norm.element_references):
            # Built per call in the output dtype so that float64 stays exact.
            table = torch.tensor(
                norm.element_references, dtype=energy.dtype, device=energy.device
            )  # [Z_max + 1] eV
            energy = energy + table[atomic_numbers] @ members.to(energy.dtype)
        return energy, forces


def cell_volume(cell: torch.Tensor) -> torch.Tensor:
    """``|a1 · (a2 × a3)|`` ``[n_systems]`` Å^3 of cells ``[n_systems, 3, 3]`` (rows a1, a2, a3).

    Written with elementwise products (no ``Det``) so every runtime has it.
    """
    a, b, c = cell[:, 0], cell[:, 1], cell[:, 2]  # [n_systems, 3] each
    cross = torch.stack(
        [
            b[:, 1] * c[:, 2] - b[:, 2] * c[:, 1],
            b[:, 2] * c[:, 0] - b[:, 0] * c[:, 2],
            b[:, 0] * c[:, 1] - b[:, 1] * c[:, 0],
        ],
        dim=-1,
    )  # [n_systems, 3]
    return (a * cross).sum(dim=-1).abs()
