"""A serialized TensorRT engine (:mod:`painn_export.trt`): a thin runner over its EngineSession."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from painn_export.errors import RuntimeUnavailableError
from painn_export.readout import SystemReadout
from painn_export.runners.base import Runner, parse_device, runner_name


def engine_device(path: str | Path, device: str) -> int:
    """The GPU index a TensorRT engine runs on for ``device``; the CPU is refused."""
    kind, index = parse_device(device)
    if kind == "cpu":
        raise RuntimeUnavailableError(f"{path}: a TensorRT engine runs on a GPU only, not --device cpu")
    return index


class TensorRTRunner(Runner):
    """A TensorRT engine built by :func:`painn_export.trt.build_engine`, on ``device``
    (``cuda``, ``cuda:N``; ``auto`` is ``cuda``: an engine runs on a GPU only)."""

    runtime = name = "tensorrt"

    def __init__(self, engine_path: str | Path, *, precision="fp32", readout=None, device="cuda") -> None:
        """``precision``: its kernels' (the sidecar's); ``readout``: the host's sums (SystemReadout)."""
        super().__init__()
        self.index = engine_device(engine_path, device)
        self.engine_path = Path(engine_path)
        self.precision = precision  # its kernels' precision: fp32, tf32, fp16, bf16
        self.readout = readout or SystemReadout()
        self.session = None

    def _activate(self) -> None:
        from painn_export.trt import EngineSession

        self.session = EngineSession(self.engine_path, self.index)
        self.input_names, self.output_names = self.session.input_names, self.session.output_names
        self.precision = self.session.precision
        self.device, self.provider, self.gpu = f"cuda:{self.index}", "tensorrt", self.session.gpu_name
        self.name = runner_name("tensorrt", "tensorrt")

    @property
    def feed_dtype(self) -> np.dtype:
        """What the engine's positions input takes (read from the engine once active)."""
        return np.dtype(self.session.feed_dtype) if self.session is not None else np.dtype(np.float32)

    def _infer(self, feed):
        return self.session.run(feed)

    def free_memory(self) -> None:
        import torch

        torch.cuda.empty_cache()

    def _deactivate(self) -> None:
        self.session.close()
        self.session = None
