"""painn-export: an exportable, scatter-free PaiNN for OCP/fairchem checkpoints.

Heavy libraries are imported only where needed: the names below load their
modules (and torch) on first access, so light modules such as
:mod:`painn_export.neighbors` and :mod:`painn_export.batch` (the pipeline's
neighbour workers) import without torch; onnxruntime, tensorrt,
torch_scatter and ase are imported only by the functions that use them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from painn_export.version import __version__

# name -> module that defines it
_LAZY = {
    "CheckpointError": "painn_export.checkpoint",
    "load_checkpoint": "painn_export.checkpoint",
    "load_model": "painn_export.checkpoint",
    "save_model": "painn_export.checkpoint",
    "PaiNNConfig": "painn_export.config",
    "TargetNormalization": "painn_export.config",
    "CONTRACT_VERSION": "painn_export.contract",
    "input_names": "painn_export.contract",
    "output_names": "painn_export.contract",
    "PaiNN": "painn_export.model",
}

__all__ = [  # the names of _LAZY, and the version
    "CONTRACT_VERSION",
    "CheckpointError",
    "PaiNN",
    "PaiNNConfig",
    "TargetNormalization",
    "__version__",
    "input_names",
    "load_checkpoint",
    "load_model",
    "output_names",
    "save_model",
]

if TYPE_CHECKING:
    from painn_export.checkpoint import CheckpointError, load_checkpoint, load_model, save_model
    from painn_export.config import PaiNNConfig, TargetNormalization
    from painn_export.contract import CONTRACT_VERSION, input_names, output_names
    from painn_export.model import PaiNN


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'painn_export' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
