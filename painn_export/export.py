"""Tracing the scatter-free PaiNN to ONNX with dynamic atoms, slots and systems.

The graph's inputs and outputs are the model contract
(:mod:`painn_export.contract`, version 2: the neighbour-major slot layout).
Every sum is a ``ReduceSum`` over the slot axis or a ``MatMul`` with the
one-hot system matrix, forward and backward (see :mod:`painn_export.model`):
the graph has no scatter, so ONNX Runtime gives the same numbers on every
run and TensorRT's ONNX parser takes it without a plugin. One file serves
both runtimes. It carries metadata: model config, cutoff, max_neighbors,
supported elements, units, contract version, source checkpoint hash,
package version.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from painn_export.batch import SLOT_MULTIPLE, collate
from painn_export.contract import (
    AXES,
    CONTRACT_VERSION,
    STRESS_NEEDS_GRADIENT,
    UNITS,
    input_names,
    output_names,
)
from painn_export.model import PaiNN
from painn_export.neighbors import neighbor_graph
from painn_export.samples import example_set

DEFAULT_OPSET = 18  # TensorRT 10's parser accepts opsets 9..20


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
    static axis (3 for xyz, 2 for a pair's slots), so ``n_systems`` (5),
    ``n_atoms``, ``n_slots`` and ``n_pairs`` must all differ and be none of
    those.
    """
    samples = example_set(seed=0, num_elements=model.config.num_elements, sizes=(5, 9))[:5]
    graphs = graphs_for(model, samples)
    n_atoms = sum(g.n_atoms for g in graphs)
    taken = {2, 3, n_atoms, len(graphs)}
    n_slots = max(SLOT_MULTIPLE, max(g.max_degree for g in graphs))
    while n_slots in taken:
        n_slots += 1
    n_pairs = sum(g.n_edges for g in graphs) // 2 + 1  # (dummy pairs may be added)
    while n_pairs in taken | {n_slots}:
        n_pairs += 1
    dtype_np = np.float64 if dtype == torch.float64 else np.float32
    feed = collate(graphs, dtype_np, n_slots=n_slots, n_pairs=n_pairs)
    names = input_names(model.gradient_forces, stress)
    return tuple(torch.from_numpy(feed[name]) for name in names)


def _dynamic_shapes(names: tuple[str, ...]) -> dict[str, dict[int, object]]:
    from torch.export import Dim

    dims = {
        "n_atoms": Dim("n_atoms", min=1),
        "n_slots": Dim("n_slots", min=1),
        "n_systems": Dim("n_systems", min=1),
        "n_pairs": Dim("n_pairs", min=1),
    }
    return {name: {k: dims[a] for k, a in enumerate(AXES[name]) if a} for name in names}


def trace_gradient_graph(model: PaiNN, example: tuple[torch.Tensor, ...]) -> torch.fx.GraphModule:
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

    def forward(*inputs):
        return model(*inputs)

    # native_layer_norm is decomposed too: its ONNX form (LayerNormalization)
    # keeps the saved mean and 1/std, which the backward reads, in float32
    # whatever the graph's dtype.
    table = {**core_aten_decompositions(), **get_decompositions([torch.ops.aten.native_layer_norm])}
    return make_fx(
        forward,
        tracing_mode="symbolic",
        decomposition_table=table,
        _allow_non_fake_inputs=True,  # the parameters are real tensors, captured as constants
    )(*example)


def onnx_metadata(model: PaiNN, dtype: torch.dtype, stress: bool = False) -> dict[str, str]:
    from painn_export.version import __version__

    cfg = model.config
    provenance = model.provenance
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
        "painn_export.inputs": json.dumps(list(input_names(model.gradient_forces, stress))),
        "painn_export.outputs": json.dumps(list(output_names(stress))),
        "painn_export.forces": "direct" if model.config.direct_forces else "gradient",
        "painn_export.source_sha256": str(provenance.get("source_sha256", "")),
        "painn_export.source_format": str(provenance.get("source_format", "")),
    }


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
    """Write ``model`` as ONNX at ``path`` (float32 or float64 graph) and check it.

    A direct-force model exports its forward pass. A gradient-force model
    (``direct_forces=False``) exports forward and backward: ``forces =
    -∂E/∂positions`` and, with ``stress=True``, a ``cell`` input and a
    ``stress`` output (see :func:`trace_gradient_graph`). ``model`` is not
    changed (a copy is cast to ``dtype``).
    """
    import copy

    import onnx

    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    if stress and model.config.direct_forces:
        raise ValueError(STRESS_NEEDS_GRADIENT)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model).to(dtype).eval()
    names = input_names(model.gradient_forces, stress)
    example = _example_inputs(model, dtype, stress)
    dynamic = _dynamic_shapes(names)
    with _quiet_exporter():
        if model.config.direct_forces:
            traced, dynamic_shapes = model, dynamic
        else:
            traced, dynamic_shapes = trace_gradient_graph(model, example), tuple(dynamic.values())
        with torch.no_grad():
            program = torch.onnx.export(
                traced,
                example,
                input_names=list(names),
                output_names=list(output_names(stress)),
                dynamic_shapes=dynamic_shapes,
                opset_version=opset,
                dynamo=True,
                verbose=False,
            )
    proto = program.model_proto
    _name_dynamic_outputs(proto)
    for key, value in onnx_metadata(model, dtype, stress).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # concurrent exports never share one
    try:
        onnx.save(proto, tmp)
        onnx.checker.check_model(str(tmp), full_check=True)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _name_dynamic_outputs(proto) -> None:
    """Give outputs the input axes' names (energy: n_systems, forces: n_atoms)."""
    for out in proto.graph.output:
        for dim, name in zip(out.type.tensor_type.shape.dim, AXES.get(out.name, ())):
            if name is not None and not dim.HasField("dim_value"):
                dim.dim_param = name
