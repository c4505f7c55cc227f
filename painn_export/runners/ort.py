"""ONNX Runtime on an exported file: its CPU provider, or the CUDA provider of onnxruntime-gpu.

Which wheel: ``onnxruntime`` (CPU) and ``onnxruntime-gpu`` install into the
same ``onnxruntime/`` folder, and with both installed the CUDA provider goes
missing; painn-export therefore depends on neither directly, and its ``cpu``
and ``gpu`` extras pick one (docs/gpu.md).

CUDA provider settings: float32 MatMuls in true float32 (``use_tf32=0``; ORT's
default on Ampere and newer is TF32, whose 10-bit mantissa the float32
tolerances do not allow) unless ``tf32=True`` asks for it (then the precision
is recorded as ``tf32``); the memory arena grows by what a batch asks for
(``kSameAsRequested``), not by doubling, so a batch that barely fits does not
reserve twice its size; the CUDA and cuDNN libraries that pip wheels bring
are loaded first (``onnxruntime.preload_dlls``) where this onnxruntime has it.

When the CUDA provider does not start (no GPU, a missing CUDA library),
ONNX Runtime prints its reason on stderr and runs on the CPU. Here its words
are caught, and become the reason: ``--device cuda`` is refused with it;
``--device auto`` runs on the CPU and logs it as a warning.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from painn_export.contract import output_shape
from painn_export.errors import RuntimeUnavailableError
from painn_export.runners.base import Runner, feed_dtype_of, is_tensor, parse_device, runner_name

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "onnxruntime is not installed: pip install 'painn-export[cpu]' (onnxruntime) or, "
    "on an NVIDIA GPU, 'painn-export[gpu]' (onnxruntime-gpu), not both"
)
_NUMPY = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16}


def import_onnxruntime():
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise RuntimeUnavailableError(INSTALL_HINT) from exc
    return ort


@contextmanager
def onnxruntime_words() -> Iterator[list[str]]:
    """Catch what ONNX Runtime's C++ logger writes on stderr (file descriptor 2) inside the block.

    Yields a list that holds, after the block, its messages of warning
    severity and above, without the colour codes and log prefixes: the
    reason a provider did not start, in ONNX Runtime's own words.
    """
    import tempfile

    words: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield words
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            text = re.sub(r"\x1b\[[0-9;]*m", "", caught.read().decode(errors="replace"))
            for line in text.splitlines():
                # [E:onnxruntime:Default, provider_bridge_ort.cc:2251 TryGetProviderInfo_CUDA] <message>
                match = re.search(r"\[[EWF]:onnxruntime[^\]]*\]\s*(.*)", line)
                if match and match.group(1).strip() and match.group(1).strip() not in words:
                    words.append(match.group(1).strip())


def cuda_provider_options(index: int, tf32: bool) -> dict[str, str]:
    """The CUDA provider's options: GPU ``index``, true float32 unless ``tf32``, a tight arena."""
    return {
        "device_id": str(index),
        "use_tf32": "1" if tf32 else "0",
        "arena_extend_strategy": "kSameAsRequested",
    }


class OnnxRuntimeRunner(Runner):
    """ONNX Runtime on an exported file, on the CPU or on a GPU (onnxruntime-gpu).

    ``device``: ``cpu``; ``cuda``/``cuda:N`` (the CUDA execution provider,
    with TensorRT's provider first where onnxruntime has it and
    ``tensorrt_provider=True``); ``auto``: CUDA when this onnxruntime has it
    and it starts, else the CPU (with ONNX Runtime's reason logged when it has
    CUDA and it did not start). A CUDA device that this onnxruntime cannot
    give is refused with that reason, never replaced by the CPU. Inputs and
    outputs are bound to the session (IO binding) on every device: inputs on
    the provider's device, outputs straight into host arrays, copied once; a
    feed of torch tensors on the provider's device is bound by their data pointers.
    ``threads`` sets the CPU provider's intra-op threads (default: ORT's, one
    per core). ``tf32``: allow TF32 MatMuls on CUDA (recorded as precision ``tf32``).
    """

    runtime = name = "onnxruntime"

    def __init__(
        self,
        path: str | Path,
        device: str = "cpu",
        threads: int | None = None,
        tensorrt_provider: bool = False,
        tf32: bool = False,
    ) -> None:
        super().__init__()
        parse_device(device)
        self.path, self.requested, self.threads = Path(path), device, threads
        self.tensorrt_provider, self.tf32 = tensorrt_provider, tf32
        self.fallback_reason = ""  # why --device auto runs on the CPU although ORT has CUDA

    def _providers(self, ort, kind: str, index: int) -> list:
        available = ort.get_available_providers()
        if kind == "cpu":
            return ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" not in available:
            raise RuntimeUnavailableError(
                f"onnxruntime {ort.__version__} has no CUDA execution provider (it has "
                f"{', '.join(available)}): pip install 'painn-export[gpu]' (onnxruntime-gpu alone: "
                "with onnxruntime beside it the CUDA provider is lost), or use --device cpu"
            )
        providers: list = [("CUDAExecutionProvider", cuda_provider_options(index, self.tf32))]
        if self.tensorrt_provider and "TensorrtExecutionProvider" in available:
            providers.insert(0, ("TensorrtExecutionProvider", {"device_id": str(index)}))
        return providers

    def _session(self, ort, options, kind: str, index: int):
        """``(session, reason)``: a session on ``kind``; on CUDA, ``reason`` says why it fell to the CPU."""
        providers = self._providers(ort, kind, index)
        if kind == "cpu":
            return ort.InferenceSession(str(self.path), options, providers=providers), ""
        with onnxruntime_words() as words:
            try:
                if hasattr(ort, "preload_dlls"):  # CUDA and cuDNN from pip wheels (onnxruntime-gpu >= 1.21)
                    ort.preload_dlls()
                session = ort.InferenceSession(str(self.path), options, providers=providers)
                error = None
            except Exception as exc:  # a provider that fails hard rather than falling back
                session, error = None, exc
        if session is not None and session.get_providers()[0] != "CPUExecutionProvider":
            for line in words:
                log.info("onnxruntime: %s", line)
            return session, ""
        said = "; ".join(words) or (str(error).strip() if error else "") or "it gave no reason"
        return (
            None,
            f"onnxruntime {ort.__version__} could not start its CUDA provider on cuda:{index}: {said}",
        )

    def _activate(self) -> None:
        ort = import_onnxruntime()
        from painn_export.metadata import model_facts

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Memory patterns plan one block per input shape for all intermediates;
        # with dynamic atoms and slots that held 2.4x eager's peak at 10k atoms
        # and was slower (docs/benchmarks.md). The arena alone reuses buffers.
        options.enable_mem_pattern = False
        if self.threads:
            options.intra_op_num_threads = self.threads
        # Between calls the caller's own work runs (graphs, collate, FIRE; an ASE loop's Python); by
        # default ORT's intra-op threads spin-wait there, holding the cores that work needs. Without
        # the spinning, relax and the ASE loop with PaiNNCalculator both ran faster on 2 cores
        # (docs/benchmarks.md, issue 31's rows).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        kind, index = parse_device(self.requested)
        if kind == "auto":
            kind = "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
            session, reason = self._session(ort, options, kind, index)
            if session is None:
                self.fallback_reason = reason
                log.warning("--device auto runs on the CPU: %s", reason)
                session, _ = self._session(ort, options, "cpu", 0)
        else:
            session, reason = self._session(ort, options, kind, index)
            if session is None:
                raise RuntimeUnavailableError(f"{reason}; use --device cpu, or auto")
        self.session = session
        self.provider = session.get_providers()[0].removesuffix("ExecutionProvider").lower()
        self.device = "cpu" if self.provider == "cpu" else f"cuda:{index}"
        self._memory = ("cpu", 0) if self.provider == "cpu" else ("cuda", index)
        self.name = runner_name("onnxruntime", self.provider)
        self.input_names = tuple(i.name for i in session.get_inputs())
        self.output_names = tuple(o.name for o in session.get_outputs())
        self._out_dtype = {o.name: _NUMPY[o.type] for o in session.get_outputs()}
        facts = model_facts(session.get_modelmeta().custom_metadata_map, self.path)
        self.readout = facts.readout
        self.precision = "tf32" if (self.tf32 and self.provider != "cpu") else facts.precision
        self._feed = feed_dtype_of(facts.precision)  # the file's (the precision may say tf32)
        self._ort = ort

    @property
    def feed_dtype(self) -> np.dtype:
        return self._feed if self.active else super().feed_dtype

    def _infer(self, feed):
        binding = self.session.io_binding()
        where, index = self._memory
        if is_tensor(feed["positions"]):  # on the provider's device already: bound where they lie
            inputs = self._tensor_inputs(feed)
            for name, tensor in inputs.items():
                dtype = np.dtype(str(tensor.dtype).removeprefix("torch."))
                binding.bind_input(name, where, index, dtype, tuple(tensor.shape), tensor.data_ptr())
        else:
            inputs = self._inputs(feed)
            for name, array in inputs.items():
                if where == "cpu":
                    binding.bind_cpu_input(name, array)
                else:
                    value = self._ort.OrtValue.ortvalue_from_numpy(array, where, index)
                    binding.bind_ortvalue_input(name, value)
        n_atoms = inputs["positions"].shape[0]
        outputs = {}
        for name in self.output_names:  # host arrays ORT writes into: one copy from the device
            out = np.empty(output_shape(name, n_atoms), dtype=self._out_dtype[name])
            binding.bind_output(name, "cpu", 0, out.dtype, out.shape, out.ctypes.data)
            outputs[name] = out
        self.session.run_with_iobinding(binding)
        return outputs

    def _deactivate(self) -> None:
        self.session = None
