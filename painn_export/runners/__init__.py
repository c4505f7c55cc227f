"""Every runtime behind one small interface, and one loader per kind of model file.

- :mod:`~painn_export.runners.base`: the :class:`Runner` interface, devices,
  names and the identity a fingerprint records;
- :mod:`~painn_export.runners.loaders`: model file -> facts, identity and
  runner (:func:`open_runner`, :func:`describe`: one dispatch);
- one module per runtime: :mod:`~painn_export.runners.eager` (PyTorch),
  :mod:`~painn_export.runners.ort` (ONNX Runtime),
  :mod:`~painn_export.runners.aot` (AOTInductor),
  :mod:`~painn_export.runners.engine` (TensorRT).
"""

from painn_export.runners.aot import AOTInductorRunner
from painn_export.runners.base import (
    DEVICES,
    RUNTIMES,
    Runner,
    RunnerIdentity,
    parse_device,
    runner_name,
)
from painn_export.runners.eager import TorchRunner
from painn_export.runners.engine import TensorRTRunner
from painn_export.runners.loaders import checkpoint_facts, describe, loader_for, open_runner
from painn_export.runners.ort import OnnxRuntimeRunner

__all__ = [
    "DEVICES",
    "RUNTIMES",
    "AOTInductorRunner",
    "OnnxRuntimeRunner",
    "Runner",
    "RunnerIdentity",
    "TensorRTRunner",
    "TorchRunner",
    "checkpoint_facts",
    "describe",
    "loader_for",
    "open_runner",
    "parse_device",
    "runner_name",
]
