"""Tracing the scatter-free PaiNN to ONNX with dynamic atoms, edges and systems.

The graph's inputs and outputs are the model contract (see
:mod:`painn_export.model`); every sum is ``ScatterElements(reduction="add")``
with int64 indices of the updates' shape (see
:func:`painn_export.model.segment_sum`). The file carries metadata: model
config, cutoff, max_neighbors, supported elements, units, contract version,
source checkpoint hash, package version.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from painn_export.batch import collate
from painn_export.layers import tracing_for_export
from painn_export.model import CONTRACT_VERSION, PaiNN, input_names, output_names
from painn_export.neighbors import neighbor_graph
from painn_export.samples import example_set

DEFAULT_OPSET = 18  # TensorRT 10's parser accepts opsets 9..20
UNITS = {
    "positions": "Angstrom",
    "edge_shift": "Angstrom",
    "cell": "Angstrom",
    "energy": "eV",
    "forces": "eV/Angstrom",
    "stress": "eV/Angstrom^3",
}


def graphs_for(model: PaiNN, samples) -> list:
    cfg = model.config
    return [
        neighbor_graph(
            s.positions, s.cell, s.pbc, cfg.cutoff, cfg.max_neighbors, atomic_numbers=s.atomic_numbers
        )
        for s in samples
    ]


def _example_inputs(model: PaiNN, dtype: torch.dtype, stress: bool = False) -> tuple[torch.Tensor, ...]:
    """A batch of five systems: no dynamic axis is 0, 1, 2 or 3, nor equal to another.

    ``make_fx`` gives equal sizes one symbol and specialises sizes equal to a
    static axis (3 for xyz, 2 for edge_index rows), so ``n_systems`` must be
    none of those.
    """
    samples = example_set(seed=0, num_elements=model.config.num_elements, sizes=(5, 9))[:5]
    feed = collate(graphs_for(model, samples), np.float64 if dtype == torch.float64 else np.float32)
    return tuple(torch.from_numpy(feed[name]) for name in input_names(stress))


def _dynamic_shapes(stress: bool = False) -> dict[str, dict[int, object]]:
    from torch.export import Dim

    atoms, edges, systems = Dim("n_atoms", min=1), Dim("n_edges", min=0), Dim("n_systems", min=1)
    shapes = {
        "atomic_numbers": {0: atoms},
        "positions": {0: atoms},
        "edge_index": {1: edges},
        "edge_shift": {0: edges},
        "system_index": {0: atoms},
        "natoms": {0: systems},
        "cell": {0: systems},
    }
    return {name: shapes[name] for name in input_names(stress)}


def trace_gradient_graph(
    model: PaiNN, example: tuple[torch.Tensor, ...], target: str = "tensorrt"
) -> torch.fx.GraphModule:
    """Trace a gradient-force model, backward pass included, into one aten graph.

    ``torch.export`` cannot trace ``torch.autograd.grad``; ``make_fx`` runs the
    autograd engine on symbolic tensors and records the backward's aten ops
    next to the forward's (decomposed to core aten, which the ONNX exporter
    knows). Traced for TensorRT, every gather's backward is ``scatter_add``,
    so the graph's sums are all ``ScatterElements(reduction="add")``.
    """
    from torch._decomp import core_aten_decompositions, get_decompositions
    from torch.fx.experimental.proxy_tensor import make_fx

    for p in model.parameters():
        p.requires_grad_(False)

    def forward(*inputs):
        return model(*inputs)

    # native_layer_norm is decomposed too: its ONNX form (LayerNormalization)
    # keeps the saved mean and 1/std, which the backward reads, in float32
    # whatever the graph's dtype.
    table = {**core_aten_decompositions(), **get_decompositions([torch.ops.aten.native_layer_norm])}
    with tracing_for_export(target):
        return make_fx(
            forward,
            tracing_mode="symbolic",
            decomposition_table=table,
            _allow_non_fake_inputs=True,  # the parameters are real tensors, captured as constants
        )(*example)


def onnx_metadata(model: PaiNN, dtype: torch.dtype, stress: bool = False) -> dict[str, str]:
    from painn_export import __version__

    cfg = model.config
    provenance = getattr(model, "provenance", {}) or {}
    return {
        "painn_export.contract_version": str(CONTRACT_VERSION),
        "painn_export.package_version": __version__,
        "painn_export.config": json.dumps(dataclasses.asdict(cfg)),
        "painn_export.normalization": json.dumps(dataclasses.asdict(model.normalization)),
        "painn_export.cutoff": repr(cfg.cutoff),
        "painn_export.max_neighbors": str(cfg.max_neighbors),
        "painn_export.elements": json.dumps(list(range(1, cfg.num_elements + 1))),
        "painn_export.units": json.dumps(UNITS),
        "painn_export.dtype": str(dtype).removeprefix("torch."),
        "painn_export.inputs": json.dumps(list(input_names(stress))),
        "painn_export.outputs": json.dumps(list(output_names(stress))),
        "painn_export.forces": "direct" if model.config.direct_forces else "gradient",
        "painn_export.source_sha256": str(provenance.get("source_sha256", "")),
        "painn_export.source_format": str(provenance.get("source_format", "")),
    }


def export_onnx(
    model: PaiNN,
    path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    dtype: torch.dtype = torch.float32,
    stress: bool = False,
    target: str = "tensorrt",
) -> Path:
    """Write ``model`` as ONNX at ``path`` (float32 or float64 graph) and check it.

    A direct-force model exports its forward pass. A gradient-force model
    (``direct_forces=False``) exports forward and backward: ``forces =
    -∂E/∂positions`` and, with ``stress=True``, a ``cell`` input and a
    ``stress`` output (see :func:`trace_gradient_graph`).

    ``target="tensorrt"`` (default) writes every sum as
    ``ScatterElements(reduction="add")``, which TensorRT's parser accepts and
    ONNX Runtime runs too; ``target="onnxruntime"`` writes
    ``ScatterND(reduction="add")``, several times faster on ONNX Runtime but
    rejected by TensorRT (see :func:`painn_export.model.segment_sum`).
    """
    import copy

    import onnx

    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    if stress and model.config.direct_forces:
        raise ValueError(
            "--stress needs a gradient-force model (direct_forces=False): the stress is the "
            "strain derivative of the energy, which a direct-force head does not provide"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model).to(dtype).eval()
    example = _example_inputs(model, dtype, stress)
    dynamic = _dynamic_shapes(stress)
    # torch.onnx logs a warning per torchvision op it cannot register: noise here.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if model.config.direct_forces:
            traced, dynamic_shapes = model, dynamic
        else:
            traced, dynamic_shapes = trace_gradient_graph(model, example, target), tuple(dynamic.values())
        with torch.no_grad(), tracing_for_export(target):
            program = torch.onnx.export(
                traced,
                example,
                input_names=list(input_names(stress)),
                output_names=list(output_names(stress)),
                dynamic_shapes=dynamic_shapes,
                opset_version=opset,
                dynamo=True,
                verbose=False,
            )
    proto = program.model_proto
    _name_dynamic_outputs(proto)
    metadata = {**onnx_metadata(model, dtype, stress), "painn_export.target": target}
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # concurrent exports never share one
    onnx.save(proto, tmp)
    onnx.checker.check_model(str(tmp), full_check=True)
    tmp.replace(path)
    return path


def _name_dynamic_outputs(proto) -> None:
    """Give outputs the input axes' names (energy: n_systems, forces: n_atoms)."""
    names = {"energy": ["n_systems"], "forces": ["n_atoms", None], "stress": ["n_systems", None, None]}
    for out in proto.graph.output:
        for dim, name in zip(out.type.tensor_type.shape.dim, names.get(out.name, [])):
            if name is not None and not dim.HasField("dim_value"):
                dim.dim_param = name


def read_metadata(path: str | Path) -> dict[str, str]:
    """The ``painn_export.*`` metadata of an exported file, without loading weights."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}
