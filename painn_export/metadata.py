"""What an exported file says about its model: read without torch, checked against the contract.

An ONNX file written by :func:`painn_export.export.export_onnx` carries
``painn_export.*`` metadata (config, contract version, inputs, outputs,
units, dtype, source hash); a TensorRT engine's JSON sidecar carries the same
metadata, copied from its ONNX file. :func:`model_facts` turns either into
what the graph builder and the pipeline need.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from painn_export.contract import CONTRACT_VERSION, META_PREFIX, VIRIAL_OUTPUT
from painn_export.readout import SystemReadout


@dataclass(frozen=True)
class ModelFacts:
    """What the graph builder needs to know about a model, from any of its files."""

    cutoff: float  # Å
    max_neighbors: int
    num_elements: int  # atomic numbers 1..num_elements
    gradient_forces: bool  # forces are -dE/dx (stress possible)
    precision: str = "float32"  # of the runtime's inputs and weights
    readout: SystemReadout = field(default_factory=SystemReadout)  # what the host adds per system
    stress: bool = False  # the graph returns per-atom virials (stress)
    # A TensorRT engine's optimisation profiles (painn_export.trt.Profile): the batches it admits.
    profiles: tuple = ()


class NotAModelError(ValueError):
    """A file that is not a painn-export model of this contract; the message says what to do."""


def read_metadata(path: str | Path) -> dict[str, str]:
    """The ``painn_export.*`` metadata of an exported ONNX file, without loading its weights."""
    return read_onnx_io(path)[0]


def read_onnx_io(path: str | Path) -> tuple[dict[str, str], tuple[str, ...], tuple[str, ...]]:
    """``(metadata, graph input names, graph output names)`` of an ONNX file, without its weights."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, ValueError, OSError ... for a bad file
        raise NotAModelError(
            f"{path}: not a readable ONNX file ({type(exc).__name__}); export it with painn-export onnx"
        ) from exc
    initializers = {t.name for t in proto.graph.initializer}
    inputs = tuple(i.name for i in proto.graph.input if i.name not in initializers)
    outputs = tuple(o.name for o in proto.graph.output)
    return {p.key: p.value for p in proto.metadata_props}, inputs, outputs


def model_facts(meta: dict[str, str], source: str | Path) -> ModelFacts:
    """The facts of a graph from its metadata; refuses files of another contract."""
    if f"{META_PREFIX}config" not in meta:
        raise NotAModelError(
            f"{source}: not a painn-export graph (no {META_PREFIX}config metadata); "
            "export the checkpoint with painn-export onnx"
        )
    version = meta.get(f"{META_PREFIX}contract_version")
    if version != str(CONTRACT_VERSION):
        raise NotAModelError(
            f"{source}: written for model contract version {version}, this painn-export reads "
            f"{CONTRACT_VERSION}; export the checkpoint again with painn-export onnx"
        )
    try:
        config = json.loads(meta[f"{META_PREFIX}config"])
        normalization = json.loads(meta[f"{META_PREFIX}normalization"])
        return ModelFacts(
            float(config["cutoff"]),
            int(config["max_neighbors"]),
            int(config["num_elements"]),
            meta.get(f"{META_PREFIX}forces") == "gradient",
            meta.get(f"{META_PREFIX}dtype", "float32"),
            SystemReadout.of(normalization),
            VIRIAL_OUTPUT in json.loads(meta.get(f"{META_PREFIX}outputs", "[]")),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise NotAModelError(f"{source}: its {META_PREFIX}config metadata is damaged ({exc})") from exc
