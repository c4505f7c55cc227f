"""One small interface for every runtime: PyTorch, ONNX Runtime, TensorRT.

A runner is a context manager: ``activate()`` imports the heavy library and
allocates device resources (nothing touches a GPU before it), ``infer(feed)``
takes a feed of the model contract (:func:`painn_export.batch.collate`) as
numpy arrays, runs the graph, and returns ``{"energy", "forces"}`` (and
``"stress"`` for stress graphs) as numpy arrays after the host's float64
sums per system (:mod:`painn_export.readout`); ``deactivate()`` frees.
``input_names``/``output_names`` are the graph's, and say which contract
variant the runner serves; extra feed entries are ignored. ``device`` says
where it runs (``cpu``, ``cuda:0``), ``provider`` what kind of engine ran it
(``cpu``, ``cuda``, ``tensorrt``) and ``gpu`` the GPU's name (empty on the
CPU); :meth:`Runner.identity` is what a run's fingerprint records of it, and
:func:`describe` predicts it from a model file without starting anything
(a Ray driver's view). Each records the wall time of its last inference in
``last_inference_s``. A failed inference raises
:class:`~painn_export.errors.BatchTooLargeError` (memory, engine profile: a
smaller batch may work) or :class:`~painn_export.errors.InferenceError`
(anything else), whatever the runtime's own exception type.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from painn_export.contract import HOST_INPUTS, VIRIAL_OUTPUT, input_names, output_names
from painn_export.errors import (
    BatchTooLargeError,
    InferenceError,
    RuntimeUnavailableError,
    classify_runtime_error,
)
from painn_export.metadata import ModelFacts
from painn_export.readout import SystemReadout

DEVICES = "auto|cpu|cuda|cuda:N"
RUNTIMES = ("torch", "onnxruntime", "tensorrt", "aoti")


def parse_device(device: str) -> tuple[str, int]:
    """``("auto"|"cpu"|"cuda", index)`` of a ``--device`` value; anything else is a ValueError."""
    kind, _, index = device.partition(":")
    if kind in ("auto", "cpu") and not index:
        return kind, 0
    if kind == "cuda" and (not index or index.isdigit()):
        return kind, int(index or 0)
    raise ValueError(f"device must be {DEVICES}, got {device!r}")


@dataclass(frozen=True)
class RunnerIdentity:
    """What evaluated a run's structures: results of two runs mix only when these agree.

    It is what an output's fingerprint records (:mod:`pipelines.output`), and
    what a Ray actor reports back to its driver.
    """

    runtime: str  # the runner's name once active: onnxruntime-cpu, torch-cuda-float32, aoti-cpu, tensorrt
    precision: str  # of its inputs and weights (a TensorRT engine's kernels: fp32, tf32, fp16)
    stress: bool  # it returns stress
    device: str  # cpu or cuda (not which GPU: any GPU of the same kind continues a run)
    provider: str  # cpu, cuda or tensorrt: the execution provider or device that ran it


def torch_runner_name(device: str, dtype: str) -> str:
    """The name of eager PyTorch's runner on ``device`` (``cpu``, ``cuda:N``) in ``dtype``."""
    return f"torch-{device.split(':')[0]}-{dtype}"


class Runner(ABC):
    name = "runner"

    def __init__(self) -> None:
        self.active = False
        self.precision = "float32"  # of the inputs it takes and the weights it runs
        self.last_inference_s = float("nan")
        self.input_names: tuple[str, ...] = input_names()
        self.output_names: tuple[str, ...] = output_names()
        self.readout = SystemReadout()
        self.device = "cpu"  # where it runs, once active
        self.provider = "cpu"  # what ran it, once active: cpu, cuda, tensorrt
        self.gpu = ""  # the GPU's name, once active on one

    @property
    def has_stress(self) -> bool:
        return VIRIAL_OUTPUT in self.output_names

    def identity(self) -> RunnerIdentity:
        """What ran (once active): the fields a run's fingerprint records."""
        if not self.active:
            raise RuntimeError(f"{self.name}: its identity is known once it is active")
        kind = self.device.split(":")[0]
        return RunnerIdentity(self.name, self.precision, self.has_stress, kind, self.provider)

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
        missing = [k for k in (*self.input_names, *HOST_INPUTS) if k not in feed]
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
        return self.readout.totals(out, feed)

    @abstractmethod
    def _activate(self) -> None: ...

    @abstractmethod
    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def _deactivate(self) -> None:
        return None


class TorchRunner(Runner):
    """Eager PyTorch: the scatter-free model on CPU or CUDA, in float64, float32, float16 or bfloat16.

    ``device`` is ``auto`` (CUDA when torch sees a GPU), ``cpu``, ``cuda`` or
    ``cuda:N``; a CUDA device that torch cannot see is refused, never
    replaced by the CPU. ``stress=True`` (gradient-force models) returns
    stress. The caller's model is left as it is: the runner casts its own copy.
    """

    def __init__(self, model, device: str = "cpu", dtype: str = "float32", stress: bool = False) -> None:
        super().__init__()
        parse_device(device)
        self.source, self.requested, self.dtype = model, device, dtype
        self.precision = dtype
        self.name = f"torch-{dtype}"
        self.input_names = input_names(model.gradient_forces)
        self.output_names = output_names(stress)
        self.readout = SystemReadout.of(model.normalization)

    def _activate(self) -> None:
        import copy

        import torch

        kind, index = parse_device(self.requested)
        if kind == "auto":
            kind = "cuda" if torch.cuda.is_available() else "cpu"
        if kind == "cuda":
            if not torch.cuda.is_available() or index >= torch.cuda.device_count():
                raise RuntimeUnavailableError(
                    f"torch: no CUDA device {index} (torch {torch.__version__} sees "
                    f"{torch.cuda.device_count()}); use --device cpu or auto"
                )
            self.device, self.provider = f"cuda:{index}", "cuda"
            self.gpu = torch.cuda.get_device_name(index)
        else:
            self.device = self.provider = "cpu"
        self.name = torch_runner_name(self.device, self.dtype)
        dtype = getattr(torch, self.dtype)
        self.model = copy.deepcopy(self.source).to(device=self.device, dtype=dtype).eval()

    def _deactivate(self) -> None:
        self.model = None

    def _infer(self, feed):
        return self.model.per_atom(feed, virial=self.has_stress)  # copied to the host: synchronised


class OnnxRuntimeRunner(Runner):
    """ONNX Runtime on an exported file, on the CPU or on a GPU (onnxruntime-gpu).

    ``device``: ``cpu``; ``cuda``/``cuda:N`` (the CUDA execution provider,
    with TensorRT's provider first where onnxruntime has it and
    ``tensorrt_provider=True``); ``auto``: CUDA when this onnxruntime has it,
    else the CPU. A CUDA device that this onnxruntime cannot give is refused,
    never replaced by the CPU. On CUDA the inputs are bound to the device
    once per batch (IO binding) and the outputs copied back once.
    ``threads`` sets the CPU provider's intra-op threads (default: ORT's,
    one per core).
    """

    def __init__(
        self,
        path: str | Path,
        device: str = "cpu",
        threads: int | None = None,
        tensorrt_provider: bool = False,
    ) -> None:
        super().__init__()
        parse_device(device)
        self.path, self.requested, self.threads = Path(path), device, threads
        self.tensorrt_provider = tensorrt_provider
        self.name = "onnxruntime"

    def _providers(self, ort) -> list:
        kind, index = parse_device(self.requested)
        available = ort.get_available_providers()
        if kind == "auto":
            kind = "cuda" if "CUDAExecutionProvider" in available else "cpu"
        if kind == "cpu":
            self.device = "cpu"
            return ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" not in available:
            raise RuntimeUnavailableError(
                f"onnxruntime {ort.__version__} has no CUDA execution provider (it has "
                f"{', '.join(available)}): pip install onnxruntime-gpu, or use --device cpu"
            )
        self.device = f"cuda:{index}"
        providers: list = [("CUDAExecutionProvider", {"device_id": index})]
        if self.tensorrt_provider and "TensorrtExecutionProvider" in available:
            providers.insert(0, ("TensorrtExecutionProvider", {"device_id": index}))
        return providers

    def _activate(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise RuntimeUnavailableError("onnxruntime is not installed: pip install onnxruntime") from exc
        from painn_export.metadata import model_facts

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Memory patterns plan one block per input shape for all intermediates;
        # with dynamic atoms and slots that held 2.4x eager's peak at 10k atoms
        # and was slower (docs/benchmarks.md). The arena alone reuses buffers.
        options.enable_mem_pattern = False
        if self.threads:
            options.intra_op_num_threads = self.threads
        auto = parse_device(self.requested)[0] == "auto"
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=self._providers(ort))
            failed = self.device != "cpu" and self.session.get_providers()[0] == "CPUExecutionProvider"
        except Exception:
            if not auto or self.device == "cpu":
                raise
            failed = True
        if failed and auto:  # the provider is there but no GPU works: auto means the CPU then
            self.device = "cpu"
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        elif failed:
            raise RuntimeUnavailableError(
                f"onnxruntime could not start its CUDA provider on {self.device}; use --device cpu or auto"
            )
        ran = self.session.get_providers()[0]
        self.provider = ran.removesuffix("ExecutionProvider").lower()
        self.name = "onnxruntime-" + self.provider
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.output_names = tuple(o.name for o in self.session.get_outputs())
        meta = self.session.get_modelmeta().custom_metadata_map
        self.readout = model_facts(meta, self.path).readout
        types = {i.name: i.type for i in self.session.get_inputs()}
        self._float = np.float64 if types.get("positions") == "tensor(double)" else np.float32
        self.precision = np.dtype(self._float).name
        self._ort = ort

    def _infer(self, feed):
        inputs = {
            name: np.ascontiguousarray(
                feed[name], dtype=self._float if feed[name].dtype.kind == "f" else np.int64
            )
            for name in self.input_names
        }
        if self.device == "cpu":
            outputs = self.session.run(list(self.output_names), inputs)
            return dict(zip(self.output_names, outputs))
        index = int(self.device.split(":")[1])
        binding = self.session.io_binding()
        for name, array in inputs.items():
            value = self._ort.OrtValue.ortvalue_from_numpy(array, "cuda", index)
            binding.bind_ortvalue_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return dict(zip(self.output_names, binding.copy_outputs_to_cpu()))

    def _deactivate(self) -> None:
        self.session = None


class TensorRTRunner(Runner):
    """A serialized TensorRT engine built by :func:`painn_export.trt.build_engine`, on ``device``
    (``cuda``, ``cuda:N``; ``auto`` is ``cuda``: an engine runs on a GPU only)."""

    def __init__(
        self,
        engine_path: str | Path,
        precision: str = "fp32",
        readout: SystemReadout | None = None,
        device: str = "cuda",
    ) -> None:
        super().__init__()
        self.index = _engine_device(engine_path, device)
        self.engine_path = Path(engine_path)
        self.precision = precision  # fp32, tf32 or fp16 kernels (its inputs are float32)
        self.readout = readout or SystemReadout()
        self.name = "tensorrt"

    def _activate(self) -> None:
        from painn_export.trt import import_tensorrt, load_engine, read_profiles

        _, torch = import_tensorrt()  # without TensorRT or any GPU: what is missing, first
        if self.index >= torch.cuda.device_count():
            raise RuntimeUnavailableError(
                f"tensorrt: no CUDA device {self.index} (torch {torch.__version__} sees "
                f"{torch.cuda.device_count()}); a TensorRT engine runs on a GPU only"
            )
        with torch.cuda.device(self.index):  # the engine, its context and stream live on that GPU
            self.engine, self.context, self._torch = load_engine(self.engine_path)
            self.stream = torch.cuda.Stream()
        self.profiles = read_profiles(self.engine_path)
        names = [self.engine.get_tensor_name(k) for k in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n).name == "INPUT" for n in names}
        self.input_names = tuple(n for n in names if is_input[n])
        self.output_names = tuple(n for n in names if not is_input[n])
        self._profile = 0
        self.device, self.provider = f"cuda:{self.index}", "tensorrt"
        self.gpu = torch.cuda.get_device_name(self.index)

    def _select_profile(self, feed) -> None:
        n_atoms, n_slots = feed["neighbors"].shape
        for index, profile in enumerate(self.profiles):
            if profile.admits(n_atoms, n_slots):
                if index != self._profile:
                    self.context.set_optimization_profile_async(index, self.stream.cuda_stream)
                    self._profile = index
                return
        raise BatchTooLargeError(
            f"tensorrt: a batch of {n_atoms} atoms, {n_slots} slots fits no "
            "optimisation profile of this engine; split the batch or rebuild with larger --max-*"
        )

    def _infer(self, feed):
        torch = self._torch
        with torch.cuda.device(self.index):
            self._select_profile(feed)
            buffers = {}
            for name in self.input_names:
                array = np.ascontiguousarray(feed[name])
                tensor = torch.from_numpy(array).to(self.device)
                if tensor.is_floating_point():
                    tensor = tensor.float()
                buffers[name] = tensor
                self.context.set_input_shape(name, tuple(tensor.shape))
                self.context.set_tensor_address(name, tensor.data_ptr())
            for name in self.output_names:
                shape = tuple(self.context.get_tensor_shape(name))
                buffers[name] = torch.empty(shape, dtype=torch.float32, device=self.device)
                self.context.set_tensor_address(name, buffers[name].data_ptr())
            # The inputs were copied on the current stream: the engine's stream waits for them.
            self.stream.wait_stream(torch.cuda.current_stream())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("tensorrt: execute_async_v3 failed")
            self.stream.synchronize()
            return {name: buffers[name].cpu().numpy() for name in self.output_names}

    def _deactivate(self) -> None:
        self.context = self.engine = None


class AOTInductorRunner(Runner):
    """An AOTInductor package (``.pt2``, :mod:`painn_export.aoti`) on the device it was compiled for.

    ``device``: ``auto`` is the package's own device kind; a package compiled
    for another torch, device or GPU is refused in one line before its code
    is loaded. ``threads`` sets torch's intra-op threads (the CPU package's
    OpenMP loops use them).
    """

    def __init__(self, path: str | Path, device: str = "auto", threads: int | None = None) -> None:
        super().__init__()
        parse_device(device)
        self.path, self.requested, self.threads = Path(path), device, threads
        self.name = "aoti"

    def _activate(self) -> None:
        import torch

        from painn_export.aoti import load_package, read_package_facts
        from painn_export.metadata import model_facts

        kind, index = parse_device(self.requested)
        built = read_package_facts(self.path).get("device", "cpu")
        if kind == "auto":
            kind = built
        if kind == "cuda" and not torch.cuda.is_available():
            raise RuntimeUnavailableError(
                f"{self.path} runs on device {built}, and torch {torch.__version__} sees no GPU here"
                + ("" if built == "cuda" else "; use --device cpu or auto")
            )
        self.device = f"cuda:{index}" if kind == "cuda" else "cpu"
        self._threads_before = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)  # process-wide: put back by deactivate()
        self.model, facts = load_package(self.path, self.device)
        meta = facts["metadata"]
        info = model_facts(meta, self.path)
        self.readout, self.precision = info.readout, info.precision
        self.input_names = tuple(json.loads(meta["painn_export.inputs"]))
        self.output_names = tuple(json.loads(meta["painn_export.outputs"]))
        self.provider = kind
        self.gpu = torch.cuda.get_device_name(index) if kind == "cuda" else ""
        self.name = f"aoti-{kind}"
        self._torch = torch

    def _infer(self, feed):
        torch = self._torch
        dtype = np.float64 if self.precision == "float64" else np.float32
        inputs = [
            torch.from_numpy(
                np.ascontiguousarray(feed[n], dtype=dtype if feed[n].dtype.kind == "f" else np.int64)
            ).to(self.device)
            for n in self.input_names
        ]
        with torch.no_grad():
            outputs = self.model(*inputs)
        return {n: t.detach().cpu().numpy() for n, t in zip(self.output_names, outputs)}

    def _deactivate(self) -> None:
        self.model = None
        self._torch.set_num_threads(self._threads_before)


def open_runner(
    path: str | Path | None, runtime: str = "onnxruntime", device: str = "auto", threads: int | None = None
) -> tuple[Runner, ModelFacts]:
    """A runner for ``path`` and the model facts, for any model file.

    ``path`` is a checkpoint (OCP/fairchem or native; run with PyTorch, or
    exported to a cached ONNX file when ``runtime="onnxruntime"``), an
    ``.onnx`` file (ONNX Runtime), or an ``.engine`` (TensorRT). ``None`` is
    the bundled demo model. Gradient-force models serve stress where the
    file has it (checkpoints always do). ``device`` is ``auto``, ``cpu``,
    ``cuda`` or ``cuda:N`` (checked when the runner starts: a device the
    runtime cannot give is a :class:`RuntimeUnavailableError`). ``threads``:
    ONNX Runtime's CPU threads.
    """
    from painn_export.metadata import model_facts, read_metadata

    kind, _ = parse_device(device)
    path = _model_file(path, runtime)
    if path.suffix == ".engine":
        facts = engine_facts(path)
        return TensorRTRunner(path, facts.precision, facts.readout, device=device), facts
    if path.suffix == ".pt2":
        from painn_export.aoti import read_package_facts

        facts = model_facts(read_package_facts(path)["metadata"], path)
        return AOTInductorRunner(path, device=device, threads=threads), facts
    if path.suffix == ".onnx":
        _check_onnx_runtime(path, runtime)
        facts = model_facts(read_metadata(path), path)
        return OnnxRuntimeRunner(path, device=device, threads=threads), facts
    from painn_export.checkpoint import load_model

    model = load_model(path)
    if runtime == "tensorrt":
        raise ValueError(f"{path}: --runtime tensorrt needs an engine built from an ONNX export")
    if runtime == "onnxruntime":
        from painn_export.demo import cached_onnx

        return open_runner(cached_onnx(model, path), "onnxruntime", device, threads)
    if runtime == "aoti":
        import torch

        from painn_export.demo import cached_aoti

        target = "cuda" if kind == "cuda" or (kind == "auto" and torch.cuda.is_available()) else "cpu"
        if target == "cuda" and not torch.cuda.is_available():
            raise RuntimeUnavailableError(f"torch {torch.__version__} sees no GPU: use --device cpu or auto")
        target = device if device.startswith("cuda:") else target
        return open_runner(cached_aoti(model, path, target), "aoti", target, threads)
    return TorchRunner(model, device=device, stress=model.gradient_forces), checkpoint_facts(model)


def _model_file(path: str | Path | None, runtime: str) -> Path:
    """The model file to open (None: the bundled demo model); an unknown runtime or no file is refused."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if path is None:
        from painn_export.demo import demo_model_path

        path = demo_model_path()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file")
    return path


def checkpoint_facts(model) -> ModelFacts:
    """The facts of a model loaded from a checkpoint (it serves stress when its forces are gradients)."""
    cfg = model.config
    return ModelFacts(
        cfg.cutoff,
        cfg.max_neighbors,
        cfg.num_elements,
        model.gradient_forces,
        readout=SystemReadout.of(model.normalization),
        stress=model.gradient_forces,
    )


def _check_onnx_runtime(path: Path, runtime: str) -> None:
    """An ONNX file runs on ONNX Runtime only: another runtime is refused, saying what to pass."""
    if runtime == "tensorrt":
        raise ValueError(f"{path}: --runtime tensorrt needs an engine (painn-export trt {path.name})")
    if runtime != "onnxruntime":
        raise ValueError(f"{path}: an ONNX file runs on onnxruntime, not {runtime}; pass the checkpoint")


def _engine_device(path: str | Path, device: str) -> int:
    """The GPU index a TensorRT engine runs on for ``device``; the CPU is refused."""
    kind, index = parse_device(device)
    if kind == "cpu":
        raise RuntimeUnavailableError(f"{path}: a TensorRT engine runs on a GPU only, not --device cpu")
    return index


def engine_facts(path: Path) -> ModelFacts:
    """A TensorRT engine's facts from its sidecar (no TensorRT): its kernels' precision, its profiles."""
    from painn_export.metadata import model_facts
    from painn_export.trt import read_profiles, read_sidecar

    side = read_sidecar(path)
    facts = model_facts(side["model_metadata"], path)  # the engine's own copy: its ONNX may be gone
    return replace(facts, precision=side.get("precision", "fp32"), profiles=tuple(read_profiles(path)))


def describe(
    path: str | Path | None, runtime: str = "onnxruntime", device: str = "cpu"
) -> tuple[RunnerIdentity, ModelFacts]:
    """What :func:`open_runner` would run, and the model's facts, read from the file alone.

    Nothing is exported, compiled or started: no runtime, no GPU (a
    checkpoint is loaded on the CPU for its config). It refuses what
    :func:`open_runner` refuses, with the same words. It is how a Ray driver
    learns what its actors will run. ``device`` must be ``cpu`` or
    ``cuda[:N]``: ``auto`` depends on the machine that runs it. The
    identity equals the started runner's (a test holds them together).
    """
    from painn_export.metadata import model_facts, read_metadata

    kind, _ = parse_device(device)
    if kind == "auto":
        raise ValueError("describe needs the device the runner will use (cpu or cuda), not auto")
    path = _model_file(path, runtime)
    if path.suffix == ".engine":
        _engine_device(path, device)
        facts = engine_facts(path)
        return RunnerIdentity("tensorrt", facts.precision, facts.stress, "cuda", "tensorrt"), facts
    if path.suffix == ".pt2":
        from painn_export.aoti import PackageMismatchError, read_package_facts

        package = read_package_facts(path)
        built = package.get("device", "cpu")
        if built != kind:  # what the runner refuses when it starts, said before anything starts
            raise PackageMismatchError(
                f"{path} was compiled for device {built}, not {kind}; compile it for {kind} "
                "with painn-export aoti (or --runtime aoti on the checkpoint)"
            )
        facts = model_facts(package["metadata"], path)
        return RunnerIdentity(f"aoti-{kind}", facts.precision, facts.stress, kind, kind), facts
    if path.suffix == ".onnx":
        _check_onnx_runtime(path, runtime)
        facts = model_facts(read_metadata(path), path)
        return RunnerIdentity(f"onnxruntime-{kind}", facts.precision, facts.stress, kind, kind), facts
    if runtime == "tensorrt":
        raise ValueError(f"{path}: --runtime tensorrt needs an engine built from an ONNX export")
    from painn_export.checkpoint import load_model

    model = load_model(path)
    facts, gradient = checkpoint_facts(model), model.gradient_forces
    if runtime == "torch":
        name = torch_runner_name(kind, "float32")
    else:  # onnxruntime and aoti export it (float32, with stress when its forces are gradients)
        name = f"{'onnxruntime' if runtime == 'onnxruntime' else 'aoti'}-{kind}"
    return RunnerIdentity(name, "float32", gradient, kind, kind), facts
