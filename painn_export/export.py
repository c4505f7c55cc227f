"""Tracing the scatter-free PaiNN to ONNX with dynamic atoms, slots and systems.

The graph's inputs and outputs are the model contract
(:mod:`painn_export.contract`, version 3: the neighbour-major slot layout,
per-atom outputs). Every sum is a ``ReduceSum`` over the slot axis, forward
and backward (see :mod:`painn_export.slots`): the graph has no scatter, so
ONNX Runtime gives the same numbers on every run and TensorRT's ONNX parser
takes it without a plugin. The sums over systems are the host's
(:mod:`painn_export.readout`). One file serves
both runtimes. It carries metadata: model config, cutoff, max_neighbors,
supported elements, units, contract version, source checkpoint hash,
package version.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from painn_export.batch import collate
from painn_export.contract import (
    AXES,
    CONTRACT_VERSION,
    META_PREFIX,
    SLOT_MULTIPLE,
    STRESS_NEEDS_GRADIENT,
    UNITS,
    input_names,
    output_names,
)
from painn_export.model import EdgeGeometry, PaiNN
from painn_export.neighbors import neighbor_graph
from painn_export.samples import example_set
from painn_export.slots import GraphInputs

DEFAULT_OPSET = 18  # TensorRT 10's parser accepts opsets 9..20
# Graph dtypes: float32/float64 compute in their own dtype throughout; float16/bfloat16 compute
# the network in that dtype, with float32 inputs, geometry and outputs (ReducedPrecisionPaiNN).
EXPORT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
REDUCED_DTYPES = (torch.float16, torch.bfloat16)


def input_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a graph's float inputs: its own, or float32 for a float16/bfloat16 graph."""
    return torch.float32 if dtype in REDUCED_DTYPES else dtype


class ReducedPrecisionPaiNN(PaiNN):
    """PaiNN whose network runs in float16 or bfloat16 and whose geometry runs in float32.

    What runs in which precision (the exported graph is this, op for op):

    - float32: the float inputs (positions, shifts, mask), the edge vectors
      ``x_j + s - x_i`` (a difference of nearby coordinates: in float16 a
      40 Å cell keeps only ~0.03 Å of them), distances, unit vectors, the
      radial basis and the cutoff envelope (exp/sin/powers of d/c, whose
      gradient near the cutoff is a small difference); in gradient graphs also
      their backward, so forces and virials are assembled in float32;
    - ``dtype``: the embedding, every Linear, LayerNorm and SiLU, the messages
      and their slot sums, the updates, the energy head and the direct force head
      (and, in gradient graphs, the backward through them);
    - float32 again: the outputs (per-atom energies, forces, virials) leave the
      graph in float32; the sums per system are the host's, in float64
      (:mod:`painn_export.readout`).

    Build it with :meth:`of`; the model it is made from is not changed.
    """

    compute_dtype: torch.dtype = torch.float16

    @classmethod
    def of(cls, model: PaiNN, dtype: torch.dtype) -> ReducedPrecisionPaiNN:
        """A copy of ``model``: its layers in ``dtype`` (float16, bfloat16), its radial basis in float32."""
        if dtype not in REDUCED_DTYPES:
            raise ValueError(f"a reduced-precision model computes in float16 or bfloat16, not {dtype}")
        narrow = cls(model.config, model.normalization)
        narrow.load_state_dict(model.state_dict())
        narrow.provenance = dict(model.provenance)
        narrow.compute_dtype = dtype
        for child in narrow.children():
            # the radial basis's parameters (frequencies, widths) keep their float32 digits
            child.to(torch.float32 if child is narrow.radial_basis else dtype)
        return narrow.eval()

    def per_atom(self, feed: dict[str, np.ndarray], virial: bool = False) -> dict[str, np.ndarray]:
        """The graph's outputs (numpy float32) of a collated feed, its floats given in float32 (as the
        export's inputs are), not in the network's dtype."""
        device = self.atom_emb.embeddings.weight.device
        graph = GraphInputs.from_feed(feed, torch.float32, device, self.gradient_forces)
        with torch.inference_mode(self.config.direct_forces):  # gradient forces need autograd
            outputs = self(graph, virial=virial)
        return {n: t.detach().float().cpu().numpy() for n, t in zip(output_names(virial), outputs)}

    def edge_geometry(self, graph) -> EdgeGeometry:
        """Unit vectors and radial basis computed in float32 from float32 inputs, then narrowed."""
        edges = super().edge_geometry(graph)  # [N, K, 3] and [P + 1, R + 1], float32
        return EdgeGeometry(edges.unit_vector.to(self.compute_dtype), edges.basis.to(self.compute_dtype))


def graphs_for(model: PaiNN, samples) -> list:
    cfg = model.config
    return [
        neighbor_graph(
            s.positions, s.cell, s.pbc, cfg.cutoff, cfg.max_neighbors, atomic_numbers=s.atomic_numbers
        )
        for s in samples
    ]


class ContractModule(torch.nn.Module):
    """``model`` as a function of the contract's inputs in order (what exporters trace)."""

    def __init__(self, model: PaiNN, stress: bool = False) -> None:
        super().__init__()
        self.model, self.stress = model, stress

    def forward(
        self,
        atomic_numbers: torch.Tensor,
        positions: torch.Tensor,
        neighbors: torch.Tensor,
        neighbor_shift: torch.Tensor,
        neighbor_mask: torch.Tensor,
        slot_pair: torch.Tensor,
        pair_slots: torch.Tensor,
        neighbor_reverse: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        graph = GraphInputs(
            atomic_numbers,
            positions,
            neighbors,
            neighbor_shift,
            neighbor_mask,
            slot_pair,
            pair_slots,
            neighbor_reverse,
        )
        outputs = self.model(graph, virial=self.stress)
        # float32 or wider out of every graph (a reduced-precision network's direct forces are narrow)
        return tuple(t.to(torch.promote_types(t.dtype, torch.float32)) for t in outputs)


def example_inputs(model: PaiNN, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """A batch of five systems: no dynamic axis is 0, 1, 2 or 3, nor equal to another.

    Tracers give equal sizes one symbol and specialise sizes equal to a
    static axis (3 for xyz, 2 for a pair's slots) or to 0 and 1, so
    ``n_atoms``, ``n_slots`` and ``n_pairs`` must all differ and be none of
    those.
    """
    samples = example_set(seed=0, num_elements=model.config.num_elements, sizes=(5, 9))[:5]
    graphs = graphs_for(model, samples)
    n_atoms = sum(g.n_atoms for g in graphs)
    taken = {2, 3, n_atoms}
    n_slots = max(SLOT_MULTIPLE, max(g.max_degree for g in graphs))
    while n_slots in taken:
        n_slots += 1
    n_pairs = sum(g.n_edges for g in graphs) // 2 + 1  # (dummy pairs may be added)
    while n_pairs in taken | {n_slots}:
        n_pairs += 1
    dtype_np = np.float64 if input_dtype(dtype) == torch.float64 else np.float32
    feed = collate(graphs, dtype_np, n_slots=n_slots, n_pairs=n_pairs)
    return tuple(torch.from_numpy(feed[name]) for name in input_names(model.gradient_forces))


def dynamic_shapes(names: tuple[str, ...]) -> tuple[dict[int, object], ...]:
    """``torch.export`` dims of each input, in order: atoms, slots and pairs are dynamic."""
    from torch.export import Dim

    dims = {
        "n_atoms": Dim("n_atoms", min=1),
        "n_slots": Dim("n_slots", min=1),
        "n_pairs": Dim("n_pairs", min=1),
    }
    return tuple({k: dims[a] for k, a in enumerate(AXES[name]) if a} for name in names)


def trace_gradient_graph(
    model: PaiNN, example: tuple[torch.Tensor, ...], stress: bool = False
) -> torch.fx.GraphModule:
    """Trace a gradient-force model, backward pass included, into one aten graph.

    ``torch.export`` cannot trace ``torch.autograd.grad``; ``make_fx`` runs the
    autograd engine on symbolic tensors and records the backward's aten ops
    next to the forward's (decomposed to core aten, which the ONNX exporter
    knows). Every gather's backward is the model's own: a gather through the
    reverse-edge slots and a slot sum, so the backward has no scatter either.
    """
    from torch._decomp import core_aten_decompositions, get_decompositions
    from torch.fx.experimental.proxy_tensor import make_fx

    for p in model.parameters():
        p.requires_grad_(False)

    # native_layer_norm is decomposed too: its ONNX form (LayerNormalization)
    # keeps the saved mean and 1/std, which the backward reads, in float32
    # whatever the graph's dtype.
    table = {**core_aten_decompositions(), **get_decompositions([torch.ops.aten.native_layer_norm])}
    return make_fx(
        ContractModule(model, stress),
        tracing_mode="symbolic",
        decomposition_table=table,
        _allow_non_fake_inputs=True,  # the parameters are real tensors, captured as constants
    )(*example)


def onnx_metadata(model: PaiNN, dtype: torch.dtype, stress: bool = False) -> dict[str, str]:
    from painn_export.version import __version__

    cfg = model.config
    provenance = model.provenance
    meta = {
        "contract_version": str(CONTRACT_VERSION),
        "package_version": __version__,
        "config": json.dumps(dataclasses.asdict(cfg)),
        "normalization": json.dumps(dataclasses.asdict(model.normalization)),
        "cutoff": repr(cfg.cutoff),
        "max_neighbors": str(cfg.max_neighbors),
        "elements": json.dumps(list(range(1, cfg.num_elements + 1))),
        "units": json.dumps(UNITS),
        "dtype": str(dtype).removeprefix("torch."),  # what the network computes in
        "input_dtype": str(input_dtype(dtype)).removeprefix("torch."),  # what its float inputs take
        "inputs": json.dumps(list(input_names(model.gradient_forces))),
        "outputs": json.dumps(list(output_names(stress))),
        "forces": "direct" if model.config.direct_forces else "gradient",
        "source_sha256": str(provenance.get("source_sha256", "")),
        "source_format": str(provenance.get("source_format", "")),
    }
    return {META_PREFIX + key: value for key, value in meta.items()}


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's chatter for this call only (warnings and two loggers, restored after)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx._internal.exporter._registration", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_onnx(
    model: PaiNN,
    path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    dtype: torch.dtype = torch.float32,
    stress: bool = False,
) -> Path:
    """Write ``model`` as ONNX at ``path`` and check it.

    ``dtype`` float32 or float64: the whole graph, inputs and outputs, in it.
    float16 or bfloat16: the network in it, with float32 inputs, geometry and
    outputs (:class:`ReducedPrecisionPaiNN` says what runs in which precision).

    A direct-force model exports its forward pass. A gradient-force model
    (``direct_forces=False``) exports forward and backward: ``forces =
    -∂E/∂positions`` and, with ``stress=True``, an ``atom_virial`` output
    (each atom's share of ∂E/∂ε; the runners divide the system sums by the
    volume: see :func:`trace_gradient_graph`). ``model`` is not
    changed (a copy is cast to ``dtype``).
    """
    import onnx

    from painn_export.files import written_whole

    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype must be float32, float64, float16 or bfloat16, got {dtype}")
    if stress and model.config.direct_forces:
        raise ValueError(STRESS_NEEDS_GRADIENT)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if dtype in REDUCED_DTYPES:
        model = ReducedPrecisionPaiNN.of(model, dtype)
    else:
        model = copy.deepcopy(model).to(dtype).eval()
    names = input_names(model.gradient_forces)
    example = example_inputs(model, dtype)
    with _quiet_exporter():
        if model.config.direct_forces:
            traced = ContractModule(model)
        else:
            traced = trace_gradient_graph(model, example, stress)
        with torch.no_grad():
            program = torch.onnx.export(
                traced,
                example,
                input_names=list(names),
                output_names=list(output_names(stress)),
                dynamic_shapes=dynamic_shapes(names),
                opset_version=opset,
                dynamo=True,
                verbose=False,
            )
    proto = program.model_proto
    _name_dynamic_outputs(proto)
    for key, value in onnx_metadata(model, dtype, stress).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    with written_whole(path) as tmp:  # concurrent exports, on any host, never share one
        onnx.save(proto, tmp)
        onnx.checker.check_model(str(tmp), full_check=True)
    return path


def _name_dynamic_outputs(proto) -> None:
    """Give outputs the input axes' names (n_atoms)."""
    for out in proto.graph.output:
        for dim, name in zip(out.type.tensor_type.shape.dim, AXES.get(out.name, ())):
            if name is not None and not dim.HasField("dim_value"):
                dim.dim_param = name
