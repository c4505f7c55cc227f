"""One small interface for every runtime: PyTorch, ONNX Runtime, TensorRT.

A runner is a context manager: ``activate()`` imports the heavy library and
allocates device resources (nothing touches a GPU before it), ``infer(feed)``
takes the model contract's inputs as numpy arrays and returns ``{"energy",
"forces"}`` (and ``"stress"`` for stress graphs) as numpy arrays,
``deactivate()`` frees. ``input_names``/``output_names`` say which contract
variant the runner serves; extra feed entries are ignored. Each records the wall time
of its last inference in ``last_inference_s``. A failed inference raises
:class:`~painn_export.errors.BatchTooLargeError` (memory, engine profile: a
smaller batch may work) or :class:`~painn_export.errors.InferenceError`
(anything else), whatever the runtime's own exception type.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from painn_export.contract import BASE_INPUTS, OUTPUTS, input_names, output_names
from painn_export.errors import (
    BatchTooLargeError,
    InferenceError,
    RuntimeUnavailableError,
    classify_runtime_error,
)
from painn_export.metadata import ModelFacts


class Runner(ABC):
    name = "runner"

    def __init__(self) -> None:
        self.active = False
        self.precision = "float32"  # of the inputs it takes and the weights it runs
        self.last_inference_s = float("nan")
        self.input_names: tuple[str, ...] = BASE_INPUTS
        self.output_names: tuple[str, ...] = OUTPUTS

    @property
    def has_stress(self) -> bool:
        return "stress" in self.output_names

    def __enter__(self) -> Runner:
        self.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def activate(self) -> None:
        if not self.active:
            self._activate()
            self.active = True

    def deactivate(self) -> None:
        if self.active:
            self._deactivate()
            self.active = False

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.active:
            raise RuntimeError(f"{self.name}: call activate() (or use it as a context manager) first")
        missing = [k for k in self.input_names if k not in feed]
        if missing:
            raise KeyError(f"{self.name}: feed lacks {missing}")
        start = time.perf_counter()
        try:
            out = self._infer(feed)
        except (BatchTooLargeError, InferenceError):
            raise
        except Exception as exc:  # runtimes have their own types; onnxruntime's are not RuntimeError
            raise classify_runtime_error(exc, self.name) from exc
        self.last_inference_s = time.perf_counter() - start
        return out

    @abstractmethod
    def _activate(self) -> None: ...

    @abstractmethod
    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def _deactivate(self) -> None:
        return None


class TorchRunner(Runner):
    """Eager PyTorch: the scatter-free model on CPU or CUDA, float32 or float64.

    ``stress=True`` (gradient-force models) feeds ``cell`` and returns stress.
    The caller's model is left as it is: the runner casts its own copy.
    """

    def __init__(self, model, device: str = "cpu", dtype: str = "float32", stress: bool = False) -> None:
        super().__init__()
        self.source, self.device, self.dtype = model, device, dtype
        self.precision = dtype
        self.name = f"torch-{device.split(':')[0]}-{dtype}"
        self.input_names = input_names(model.gradient_forces, stress)
        self.output_names = output_names(stress)

    def _activate(self) -> None:
        import copy

        import torch

        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeUnavailableError("torch: no CUDA device available")
        self._torch = torch
        self._float = getattr(torch, self.dtype)
        self.model = copy.deepcopy(self.source).to(device=self.device, dtype=self._float).eval()

    def _deactivate(self) -> None:
        self.model = None

    def _infer(self, feed):
        torch = self._torch
        inputs = []
        for name in self.input_names:
            t = torch.from_numpy(np.ascontiguousarray(feed[name]))
            if t.is_floating_point():
                t = t.to(self._float)
            inputs.append(t.to(self.device))
        # Gradient forces need autograd: no inference mode for them.
        with torch.inference_mode(self.model.config.direct_forces):
            outputs = self.model(*inputs)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        return {name: t.detach().cpu().numpy() for name, t in zip(self.output_names, outputs)}


class OnnxRuntimeRunner(Runner):
    """ONNX Runtime on an exported file (CPU provider; CUDA/TensorRT when available)."""

    def __init__(
        self, path: str | Path, providers: list[str] | None = None, threads: int | None = None
    ) -> None:
        super().__init__()
        self.path, self.providers, self.threads = Path(path), providers, threads
        self.name = "onnxruntime"

    def _activate(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise RuntimeUnavailableError("onnxruntime is not installed: pip install onnxruntime") from exc
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Memory patterns plan one block per input shape for all intermediates;
        # with dynamic atoms and slots that held 2.4x eager's peak at 10k atoms
        # and was slower (docs/benchmarks.md). The arena alone reuses buffers.
        options.enable_mem_pattern = False
        if self.threads:
            options.intra_op_num_threads = self.threads
        available = ort.get_available_providers()
        providers = self.providers or ["CPUExecutionProvider"]
        absent = [p for p in providers if p not in available]
        if absent:
            raise RuntimeUnavailableError(
                f"onnxruntime lacks {absent} (has {available}); pip install onnxruntime-gpu"
            )
        self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.output_names = tuple(o.name for o in self.session.get_outputs())
        types = {i.name: i.type for i in self.session.get_inputs()}
        self._float = np.float64 if types.get("positions") == "tensor(double)" else np.float32
        self.precision = np.dtype(self._float).name
        self.name = "onnxruntime-" + providers[0].removesuffix("ExecutionProvider").lower()

    def _infer(self, feed):
        inputs = {
            name: np.ascontiguousarray(
                feed[name], dtype=self._float if feed[name].dtype.kind == "f" else np.int64
            )
            for name in self.input_names
        }
        outputs = self.session.run(list(self.output_names), inputs)
        return dict(zip(self.output_names, outputs))

    def _deactivate(self) -> None:
        self.session = None


class TensorRTRunner(Runner):
    """A serialized TensorRT engine built by :func:`painn_export.trt.build_engine`."""

    def __init__(self, engine_path: str | Path, precision: str = "fp32") -> None:
        super().__init__()
        self.engine_path = Path(engine_path)
        self.precision = precision  # fp32, tf32 or fp16 kernels (its inputs are float32)
        self.name = "tensorrt"

    def _activate(self) -> None:
        from painn_export.trt import load_engine, read_profiles

        self.engine, self.context, self._torch = load_engine(self.engine_path)
        self.profiles = read_profiles(self.engine_path)
        names = [self.engine.get_tensor_name(k) for k in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n).name == "INPUT" for n in names}
        self.input_names = tuple(n for n in names if is_input[n])
        self.output_names = tuple(n for n in names if not is_input[n])
        self.stream = self._torch.cuda.Stream()
        self._profile = 0

    def _select_profile(self, feed) -> None:
        n_atoms, n_slots = feed["neighbors"].shape
        n_systems = len(feed["natoms"])
        for index, profile in enumerate(self.profiles):
            if profile.admits(n_atoms, n_slots, n_systems):
                if index != self._profile:
                    self.context.set_optimization_profile_async(index, self.stream.cuda_stream)
                    self._profile = index
                return
        raise BatchTooLargeError(
            f"tensorrt: a batch of {n_atoms} atoms, {n_slots} slots, {n_systems} systems fits no "
            "optimisation profile of this engine; split the batch or rebuild with larger --max-*"
        )

    def _infer(self, feed):
        torch = self._torch
        self._select_profile(feed)
        buffers = {}
        for name in self.input_names:
            array = np.ascontiguousarray(feed[name])
            tensor = torch.from_numpy(array).to("cuda")
            if tensor.is_floating_point():
                tensor = tensor.float()
            buffers[name] = tensor
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            buffers[name] = torch.empty(shape, dtype=torch.float32, device="cuda")
            self.context.set_tensor_address(name, buffers[name].data_ptr())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("tensorrt: execute_async_v3 failed")
        self.stream.synchronize()
        return {name: buffers[name].cpu().numpy() for name in self.output_names}

    def _deactivate(self) -> None:
        self.context = self.engine = None


def open_runner(
    path: str | Path | None, runtime: str = "onnxruntime", device: str = "cpu"
) -> tuple[Runner, ModelFacts]:
    """A runner for ``path`` and the model facts, for any model file.

    ``path`` is a checkpoint (OCP/fairchem or native; run with PyTorch, or
    exported to a cached ONNX file when ``runtime="onnxruntime"``), an
    ``.onnx`` file (ONNX Runtime), or an ``.engine`` (TensorRT). ``None`` is
    the bundled demo model. Gradient-force models serve stress where the
    file has it (checkpoints always do).
    """
    from painn_export.metadata import model_facts, read_metadata

    if runtime not in ("torch", "onnxruntime", "tensorrt"):
        raise ValueError(f"runtime must be torch, onnxruntime or tensorrt, got {runtime!r}")
    if path is None:
        from painn_export.demo import demo_model_path

        path = demo_model_path()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file")
    if path.suffix == ".engine":
        from painn_export.trt import read_sidecar

        side = read_sidecar(path)
        meta = side["model_metadata"]  # the engine's own copy: its ONNX file may be gone
        runner: Runner = TensorRTRunner(path, precision=side.get("precision", "fp32"))
    elif path.suffix == ".onnx":
        if runtime == "tensorrt":
            raise ValueError(f"{path}: --runtime tensorrt needs an engine (painn-export trt {path.name})")
        if runtime == "torch":
            raise ValueError(f"{path}: an ONNX file runs on onnxruntime, not torch; pass the checkpoint")
        meta = read_metadata(path)
        runner = OnnxRuntimeRunner(path)
    else:
        from painn_export.checkpoint import load_model

        model = load_model(path)
        if runtime == "tensorrt":
            raise ValueError(f"{path}: --runtime tensorrt needs an engine built from an ONNX export")
        if runtime == "onnxruntime":
            from painn_export.demo import cached_onnx

            return open_runner(cached_onnx(model, path), "onnxruntime")
        cfg = model.config
        facts = ModelFacts(cfg.cutoff, cfg.max_neighbors, cfg.num_elements, model.gradient_forces)
        return TorchRunner(model, device=device, stress=model.gradient_forces), facts
    return runner, model_facts(meta, path)
