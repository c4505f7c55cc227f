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
import warnings
from pathlib import Path

import numpy as np
import torch

from painn_export.batch import collate
from painn_export.model import CONTRACT_VERSION, INPUT_NAMES, OUTPUT_NAMES, PaiNN
from painn_export.neighbors import neighbor_graph
from painn_export.samples import example_set

DEFAULT_OPSET = 18  # TensorRT 10's parser accepts opsets 9..20
UNITS = {"positions": "Angstrom", "edge_shift": "Angstrom", "energy": "eV", "forces": "eV/Angstrom"}


def graphs_for(model: PaiNN, samples) -> list:
    cfg = model.config
    return [
        neighbor_graph(
            s.positions, s.cell, s.pbc, cfg.cutoff, cfg.max_neighbors, atomic_numbers=s.atomic_numbers
        )
        for s in samples
    ]


def _example_inputs(model: PaiNN, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """A batch of three systems of different sizes: no axis is 0 or 1, so none specialises."""
    samples = example_set(seed=0, num_elements=model.config.num_elements, sizes=(5, 9))[:3]
    feed = collate(graphs_for(model, samples), np.float64 if dtype == torch.float64 else np.float32)
    return tuple(torch.from_numpy(feed[name]) for name in INPUT_NAMES)


def _dynamic_shapes() -> dict[str, dict[int, object]]:
    from torch.export import Dim

    atoms, edges, systems = Dim("n_atoms", min=1), Dim("n_edges", min=0), Dim("n_systems", min=1)
    return {
        "atomic_numbers": {0: atoms},
        "positions": {0: atoms},
        "edge_index": {1: edges},
        "edge_shift": {0: edges},
        "system_index": {0: atoms},
        "natoms": {0: systems},
    }


def onnx_metadata(model: PaiNN, dtype: torch.dtype) -> dict[str, str]:
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
        "painn_export.inputs": json.dumps(list(INPUT_NAMES)),
        "painn_export.outputs": json.dumps(list(OUTPUT_NAMES)),
        "painn_export.source_sha256": str(provenance.get("source_sha256", "")),
        "painn_export.source_format": str(provenance.get("source_format", "")),
    }


def export_onnx(
    model: PaiNN,
    path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write ``model`` as ONNX at ``path`` (float32 or float64 graph) and check it."""
    import onnx

    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.to(dtype).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            _example_inputs(model, dtype),
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes=_dynamic_shapes(),
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
    proto = program.model_proto
    _name_dynamic_outputs(proto)
    for key, value in onnx_metadata(model, dtype).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(proto, tmp)
    onnx.checker.check_model(str(tmp), full_check=True)
    tmp.replace(path)
    return path


def _name_dynamic_outputs(proto) -> None:
    """Give outputs the input axes' names (energy: n_systems, forces: n_atoms)."""
    names = {"energy": ["n_systems"], "forces": ["n_atoms", None]}
    for out in proto.graph.output:
        for dim, name in zip(out.type.tensor_type.shape.dim, names.get(out.name, [])):
            if name is not None and not dim.HasField("dim_value"):
                dim.dim_param = name


def read_metadata(path: str | Path) -> dict[str, str]:
    """The ``painn_export.*`` metadata of an exported file, without loading weights."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}
