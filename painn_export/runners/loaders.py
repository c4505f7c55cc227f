"""From a model file to a runner: one loader per kind of file, and the one dispatch between them.

=====================  ==================  ============================================
file                   loader              runs on (``--runtime``)
=====================  ==================  ============================================
checkpoint (any name)  CheckpointLoader    ``torch`` (eager PyTorch)
checkpoint             ExportedCheckpoint  ``onnxruntime`` (the default) or ``aoti``:
                                           exported once into the cache, then as below
``.onnx``              OnnxLoader          ``onnxruntime``
``.pt2``               PackageLoader       ``aoti`` (AOTInductor)
``.engine``            EngineLoader        ``tensorrt`` (with its ``.engine.json`` sidecar)
=====================  ==================  ============================================

Each loader reads its file's facts (:class:`~painn_export.metadata.ModelFacts`)
and predicts its runner's identity without starting anything (no runtime,
no GPU, no export): what a Ray driver or a fingerprint needs before any work.
It makes its runner on demand. A ``--runtime`` that does not fit the file,
and a file whose graph's inputs or outputs are not the contract's, are
refused here, in one line, before an output file exists.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import replace
from pathlib import Path

from painn_export.errors import RuntimeUnavailableError
from painn_export.metadata import ModelFacts, model_facts, read_onnx_io
from painn_export.readout import SystemReadout
from painn_export.runners.base import RUNTIMES, Runner, RunnerIdentity, check_io, parse_device, runner_name
from painn_export.trt import read_profiles, read_sidecar  # no TensorRT: the sidecar only


def _onnxruntime_runner():
    from painn_export.runners.ort import OnnxRuntimeRunner  # onnxruntime itself: when it starts

    return OnnxRuntimeRunner


def _aoti_runner():
    from painn_export.runners.aot import AOTInductorRunner

    return AOTInductorRunner


class Loader(ABC):
    """A model file of one kind: its facts, its runner's identity, its runner.

    ``dtype`` is the precision asked for (None: the file's own); an exported
    file has one, and another is refused when its facts are read.
    """

    runtime: str  # the one of RUNTIMES its runner is
    what: str  # the kind of file, as messages name it

    def __init__(self, path: Path, dtype: str | None = None) -> None:
        self.path, self.dtype = path, dtype
        self._facts: ModelFacts | None = None

    def facts(self) -> ModelFacts:
        """The model's facts from the file alone (read once), after checking its graph's I/O."""
        if self._facts is None:
            facts = self._read_facts()
            if self.dtype not in (None, self._dtype_of(facts)):
                raise ValueError(
                    f"{self.path}: {self.what} in {facts.precision}, not {self.dtype}; export the "
                    f"checkpoint in {self.dtype} (painn-export {self.runtime_command} --dtype {self.dtype}), "
                    "or pass the checkpoint"
                )
            self._facts = facts
        return self._facts

    def _dtype_of(self, facts: ModelFacts) -> str:
        """The dtype (float32, float64, float16, bfloat16) the file computes in, as ``--dtype`` names it."""
        return facts.precision

    @property
    def runtime_command(self) -> str:
        return {"aoti": "aoti", "tensorrt": "onnx"}.get(self.runtime, "onnx")

    def identity(self, device: str) -> RunnerIdentity:
        """What the runner will report once active on ``device`` (``cpu``, ``cuda``, ``cuda:N``)."""
        kind, _ = parse_device(device)
        if kind == "auto":
            raise ValueError("describe needs the device the runner will use (cpu or cuda), not auto")
        facts = self.facts()
        provider = self._provider(device)
        return RunnerIdentity(
            runner_name(self.runtime, provider, facts.precision),
            facts.precision,
            facts.stress,
            kind,
            provider,
        )

    def _provider(self, device: str) -> str:
        return parse_device(device)[0]

    @abstractmethod
    def _read_facts(self) -> ModelFacts: ...

    def runner(self, device: str = "auto", threads: int | None = None) -> Runner:
        """The file's runner (not started), once its facts and graph I/O are checked."""
        self.facts()
        return self._runner_class()(self.path, device=device, threads=threads)

    @staticmethod
    def _runner_class():
        """The Runner class that runs this kind of file, imported when asked for."""
        raise NotImplementedError


class CheckpointLoader(Loader):
    """An OCP/fairchem or native checkpoint, run by eager PyTorch in ``dtype`` (default float32)."""

    runtime, what = "torch", "a checkpoint"

    def __init__(self, path: Path, dtype: str | None = None) -> None:
        super().__init__(path, None)
        if dtype not in (None, *PRECISIONS):
            raise ValueError(f"dtype must be one of {', '.join(PRECISIONS)}, got {dtype!r}")
        self.precision = dtype or "float32"

    @property
    def model(self):
        if getattr(self, "_model", None) is None:
            from painn_export.checkpoint import load_model

            self._model = load_model(self.path)
        return self._model

    def _read_facts(self) -> ModelFacts:
        return replace(checkpoint_facts(self.model), precision=self.precision)

    def runner(self, device: str = "auto", threads: int | None = None) -> Runner:
        from painn_export.runners.eager import TorchRunner

        return TorchRunner(self.model, device=device, dtype=self.precision, stress=self.model.gradient_forces)


class ExportedCheckpoint(CheckpointLoader):
    """A checkpoint for ONNX Runtime or AOTInductor: exported once into the cache, then run from there.

    Its facts are the checkpoint's (the export keeps them, with stress for
    gradient-force models); nothing is exported until :meth:`runner`.
    """

    what = "a checkpoint"

    def __init__(self, path: Path, runtime: str, dtype: str | None = None) -> None:
        super().__init__(path, dtype)
        if self.precision not in ("float32", "float64"):
            raise ValueError(f"{path}: a checkpoint exports for {runtime} in float32 or float64, not {dtype}")
        self.runtime = runtime

    def runner(self, device: str = "auto", threads: int | None = None) -> Runner:
        from painn_export.demo import cached_aoti, cached_onnx

        if self.runtime == "onnxruntime":
            return OnnxLoader(cached_onnx(self.model, self.path, self.precision)).runner(device, threads)
        target = _aoti_target(device)
        package = cached_aoti(self.model, self.path, target, self.precision)
        return PackageLoader(package).runner(target, threads)


class OnnxLoader(Loader):
    """An exported ``.onnx`` file, run by ONNX Runtime."""

    runtime, what = "onnxruntime", "an ONNX file"
    _runner_class = staticmethod(_onnxruntime_runner)

    def _read_facts(self) -> ModelFacts:
        meta, inputs, outputs = read_onnx_io(self.path)  # the graph's own names, not its metadata's
        facts = model_facts(meta, self.path)
        check_io(self.path, inputs, outputs, facts.gradient_forces, facts.stress)
        return facts


class PackageLoader(Loader):
    """An AOTInductor ``.pt2`` package, run on the device kind it was compiled for."""

    runtime, what = "aoti", "an AOTInductor package"
    _runner_class = staticmethod(_aoti_runner)

    def _read_facts(self) -> ModelFacts:
        return _recorded_facts(self.path, self._package()["metadata"])

    def _package(self) -> dict:
        """What the ``.pt2`` says of itself (:func:`painn_export.aoti.read_package_facts`)."""
        from painn_export.aoti import read_package_facts

        return read_package_facts(self.path)

    def _provider(self, device: str) -> str:
        from painn_export.aoti import PackageMismatchError

        kind = parse_device(device)[0]
        built = self._package().get("device", "cpu")
        if built != kind:  # what the runner refuses when it starts, said before anything starts
            raise PackageMismatchError(
                f"{self.path} was compiled for device {built}, not {kind}; compile it for {kind} "
                "with painn-export aoti (or --runtime aoti on the checkpoint)"
            )
        return kind


class EngineLoader(Loader):
    """A TensorRT ``.engine`` with its sidecar (its facts are read without TensorRT)."""

    runtime, what = "tensorrt", "a TensorRT engine"

    def _read_facts(self) -> ModelFacts:
        side = read_sidecar(self.path)
        facts = _recorded_facts(self.path, side["model_metadata"])  # its own copy: its ONNX may be gone
        return replace(
            facts, precision=side.get("precision", "fp32"), profiles=tuple(read_profiles(self.path))
        )

    def _dtype_of(self, facts: ModelFacts) -> str:  # an engine's kernels: fp32 and tf32 take float32
        return {"fp32": "float32", "tf32": "float32", "fp16": "float16", "bf16": "bfloat16"}[facts.precision]

    def _provider(self, device: str) -> str:
        from painn_export.runners.engine import engine_device

        engine_device(self.path, device)
        return "tensorrt"

    def identity(self, device: str) -> RunnerIdentity:
        found = super().identity(device)
        return replace(found, device="cuda")  # an engine runs on a GPU: auto and cuda:N are cuda

    def runner(self, device: str = "auto", threads: int | None = None) -> Runner:
        from painn_export.runners.engine import TensorRTRunner

        facts = self.facts()
        return TensorRTRunner(self.path, precision=facts.precision, readout=facts.readout, device=device)


PRECISIONS = ("float32", "float64", "float16", "bfloat16")  # eager PyTorch's


def _recorded_facts(path: Path, meta: dict[str, str]) -> ModelFacts:
    """The facts of a compiled file (package, engine) from the metadata it carries, I/O checked."""
    facts = model_facts(meta, path)
    inputs, outputs = (json.loads(meta.get(f"painn_export.{k}", "[]")) for k in ("inputs", "outputs"))
    check_io(path, inputs, outputs, facts.gradient_forces, facts.stress)
    return facts


# What each file suffix is; anything else is read as a checkpoint.
FILE_KINDS: dict[str, type[Loader]] = {".onnx": OnnxLoader, ".pt2": PackageLoader, ".engine": EngineLoader}
# How to get from each kind of file to each other runtime: the second half of a refusal.
_HOW = {
    ("onnxruntime", "tensorrt"): "build an engine from it with: painn-export trt {name}",
    ("torch", "tensorrt"): "export it (painn-export onnx), then build an engine (painn-export trt)",
}


def model_file(path: str | Path | None) -> Path:
    """The model file to open (None: the bundled demo model); a missing file is refused."""
    if path is None:
        from painn_export.demo import demo_model_path

        path = demo_model_path()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file")
    return path


def loader_for(path: str | Path | None, runtime: str | None = None, dtype: str | None = None) -> Loader:
    """The loader of ``path`` (None: the bundled demo) for ``runtime`` (None: the file's own).

    A checkpoint runs on ``torch``, ``onnxruntime`` (its default) or
    ``aoti``; every other kind of file on its own runtime only. A runtime
    that does not fit is a ValueError saying what to pass instead.
    ``dtype`` (None: the file's own, a checkpoint's float32): a checkpoint
    runs or is exported in it; an exported file in another is refused.
    """
    if runtime is not None and runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    path = model_file(path)
    kind = FILE_KINDS.get(path.suffix)
    if kind is not None:
        if runtime in (None, kind.runtime):
            return kind(path, dtype)
        how = _HOW.get(
            (kind.runtime, runtime), "pass the checkpoint it was made from with --runtime {runtime}"
        )
        raise ValueError(
            f"{path}: {kind.what} runs on --runtime {kind.runtime}, not {runtime}; "
            + how.format(name=path.name, runtime=runtime)
        )
    if runtime == "tensorrt":
        raise ValueError(
            f"{path}: {CheckpointLoader.what} cannot run on --runtime tensorrt; "
            + _HOW[("torch", "tensorrt")]
        )
    if runtime == "torch":
        return CheckpointLoader(path, dtype)
    return ExportedCheckpoint(path, runtime or "onnxruntime", dtype)


def _aoti_target(device: str) -> str:
    """The device a checkpoint's AOTInductor package is compiled for, given ``--device``."""
    import torch

    kind, _ = parse_device(device)
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if not torch.cuda.is_available():
        raise RuntimeUnavailableError(f"torch {torch.__version__} sees no GPU: use --device cpu or auto")
    return device if device.startswith("cuda:") else "cuda"


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


def open_runner(
    path: str | Path | None,
    runtime: str | None = None,
    device: str = "auto",
    threads: int | None = None,
    dtype: str | None = None,
) -> tuple[Runner, ModelFacts]:
    """A runner for ``path`` and the model's facts, for any model file (see the module's table).

    ``None`` is the bundled demo model; ``runtime`` None is the file's own.
    ``device`` is ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (checked when the
    runner starts: a device the runtime cannot give is a
    :class:`~painn_export.errors.RuntimeUnavailableError`). ``threads``: the
    CPU threads of ONNX Runtime and AOTInductor. ``dtype``: see :func:`loader_for`.
    """
    parse_device(device)
    loader = loader_for(path, runtime, dtype)
    return loader.runner(device, threads), loader.facts()


def describe(
    path: str | Path | None, runtime: str | None = None, device: str = "cpu", dtype: str | None = None
) -> tuple[RunnerIdentity, ModelFacts]:
    """What :func:`open_runner` would run, and the model's facts, read from the file alone.

    Nothing is exported, compiled or started: no runtime, no GPU (a
    checkpoint is loaded on the CPU for its config). It refuses what
    :func:`open_runner` refuses, with the same words (one dispatch:
    :func:`loader_for`). It is how a Ray driver learns what its actors will
    run. ``device`` must be ``cpu`` or ``cuda[:N]``: ``auto`` depends on the
    machine that runs it.
    """
    loader = loader_for(path, runtime, dtype)
    return loader.identity(device), loader.facts()
