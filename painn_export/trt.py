"""TensorRT engines from the exported ONNX file: built with TensorRT 10 or 11, run by :class:`EngineSession`.

The graph has no scatter (contract version 3), so no plugin is needed. Its
outputs are per atom; the sums over systems and the element references are
the host's, in float64 (:mod:`painn_export.readout`), so no total is ever
summed in FP16 or TF32.

Two build paths, chosen by the major version read once from ``tensorrt``
(NVIDIA, "Migrating from TensorRT 10.x to 11.x", TensorRT 11 documentation,
API > Migration Guide; docs/gpu.md cites each fact):

- TensorRT 11 has only strongly typed networks: each tensor's type is the
  ONNX file's, and the weak-typing API (``BuilderFlag.FP16``, precision
  constraints, a layer's ``precision`` and ``set_output_type``) is gone. An
  FP16 or BF16 engine is built from a float16/bfloat16 export
  (``painn-export onnx --dtype float16``); ``--fp16`` is refused with that advice.
- TensorRT 10 builds a float32 export weakly typed as before (TF32 by
  default, FP16 kernels with ``--fp16``, the layers that write the outputs
  pinned to FP32), and a float16/bfloat16 export strongly typed, as 11 does.

``tensorrt`` is imported only here, lazily; without it (or without a GPU)
:class:`~painn_export.errors.RuntimeUnavailableError` says what to install.
Every TensorRT call that reports failure through its return value (``False``
or ``None``) is checked and fails in one line naming the call and the engine.
Each engine gets a JSON sidecar (TensorRT version, GPU and compute
capability, profiles, precision, device memory, hashes of the ONNX file and
of the engine), written together with the engine
(:func:`painn_export.files.write_together`); an engine whose sidecar does not
match the TensorRT, the GPU or the engine's bytes at hand is refused.
Everything that touches the GPU itself (its name, a stream, buffers, copies)
is in :func:`gpu_identity` and :class:`CudaDevice`, so that the rest runs, and
is tested, without one.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from painn_export.contract import AXES, CONTRACT_VERSION, STATIC, input_names, output_names, slot_count
from painn_export.errors import BatchTooLargeError, InferenceError, RuntimeUnavailableError, one_line

INSTALL_HINT = (
    "TensorRT is not installed: on a machine with an NVIDIA GPU, pip install 'painn-export[tensorrt]' "
    "(tensorrt>=10,<12)"
)
SUPPORTED_MAJORS = (10, 11)
# The batcher's default --max-atoms, and the default profile's largest batch: an engine built
# with the defaults admits every batch the batcher makes with its defaults.
DEFAULT_MAX_ATOMS = 4096
# Of a graph's float compute dtype (its painn_export.dtype metadata): what an engine built from it runs.
REDUCED_PRECISION = {"float16": "fp16", "bfloat16": "bf16"}
FP16_ON_STRONGLY_TYPED = (
    "--fp16: TensorRT {version} builds strongly typed networks, whose precision is the ONNX file's; "
    "export with: painn-export onnx --dtype float16 (then build without --fp16)"
)
# TensorRT's data types (by name) that a graph's inputs and outputs may have, and their numpy type.
_NUMPY = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64}
_FLOAT_TYPES = ("FLOAT", "HALF")
_INDEX_TYPES = ("INT64", "INT32")


@dataclass(frozen=True)
class Profile:
    """One optimisation profile: (min, opt, max) for atoms and neighbour slots per atom.

    Slot counts are those of :func:`~painn_export.contract.slot_count` (the
    one rule collate and the batcher use): a profile's slots are rounded to it.
    The default admits the batcher's default batches (:data:`DEFAULT_MAX_ATOMS`).
    """

    atoms: tuple[int, int, int] = (1, DEFAULT_MAX_ATOMS // 2, DEFAULT_MAX_ATOMS)
    slots: tuple[int, int, int] = (1, 64, 128)

    def __post_init__(self) -> None:
        for name in ("atoms", "slots"):
            lo, opt, hi = getattr(self, name)
            if not 1 <= lo <= opt <= hi:
                raise ValueError(f"profile {name}: need 1 <= min <= opt <= max, got {(lo, opt, hi)}")
        if any(slot_count(k) != k for k in self.slots):
            raise ValueError(
                f"profile slots {self.slots}: each must be a slot count collate makes "
                f"(1, 2, 4, 8, then multiples of 8), e.g. {tuple(slot_count(k) for k in self.slots)}"
            )

    def input_shapes(self) -> dict[str, tuple[tuple[int, ...], ...]]:
        """Per contract input: its (min, opt, max) shapes."""
        sizes = {"n_atoms": self.atoms, "n_slots": self.slots, "n_pairs": self.pairs}
        shapes = {}
        for name in input_names(gradient=True):
            static = STATIC.get(name, (None,) * len(AXES[name]))
            shapes[name] = tuple(
                tuple(sizes[axis][k] if axis else static[d] for d, axis in enumerate(AXES[name]))
                for k in range(3)
            )
        return shapes

    @property
    def pairs(self) -> tuple[int, int, int]:
        """Edge pairs that the atoms and slots can hold: at most half the slots, at least one."""
        return (1, max(1, self.atoms[1] * self.slots[1] // 2), max(1, self.atoms[2] * self.slots[2] // 2))

    def admits(self, n_atoms: int, n_slots: int) -> bool:
        return self.atoms[0] <= n_atoms <= self.atoms[2] and self.slots[0] <= n_slots <= self.slots[2]


@dataclass(frozen=True)
class TensorRTVersion:
    """The ``tensorrt`` module's version, read once: its major decides the build path."""

    text: str
    major: int

    @classmethod
    def of(cls, trt) -> TensorRTVersion:
        text = str(getattr(trt, "__version__", "unknown"))
        head = text.split(".")[0]
        major = int(head) if head.isdigit() else -1
        if major not in SUPPORTED_MAJORS:
            raise RuntimeUnavailableError(
                f"TensorRT {text}: painn-export builds and runs engines with TensorRT 10 or 11; "
                "pip install 'tensorrt>=10,<12'"
            )
        return cls(text, major)

    @property
    def weak_typing(self) -> bool:
        """Builder precision flags and per-layer precision exist (TensorRT 10; removed in 11)."""
        return self.major == 10


def import_tensorrt():
    """``(tensorrt, its TensorRTVersion)``; without TensorRT, one line saying what to install."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise RuntimeUnavailableError(INSTALL_HINT) from exc
    return trt, TensorRTVersion.of(trt)


def gpu_identity(index: int | None = None) -> dict[str, str]:
    """Name and compute capability of CUDA device ``index`` (``None``: the current one), via torch.

    Without a GPU, or without that one, a one-line :class:`RuntimeUnavailableError`.
    """
    import torch

    if not torch.cuda.is_available():
        raise RuntimeUnavailableError("TensorRT needs an NVIDIA GPU and none is visible to this process")
    if index is None:
        index = torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise RuntimeUnavailableError(
            f"tensorrt: no CUDA device {index} (torch {torch.__version__} sees "
            f"{torch.cuda.device_count()}); a TensorRT engine runs on a GPU only"
        )
    major, minor = torch.cuda.get_device_capability(index)
    return {"gpu_name": torch.cuda.get_device_name(index), "compute_capability": f"{major}.{minor}"}


def checked(call: str, subject: str | Path, fn: Callable, *args, error: type[Exception] = RuntimeError):
    """``fn(*args)``, a TensorRT call that reports failure by returning ``False`` or ``None``.

    Some bindings raise a RuntimeError instead: either way, one line naming
    the call and the engine (or file) it was for.
    """
    try:
        result = fn(*args)
    except RuntimeError as exc:
        raise error(f"{subject}: TensorRT's {call} failed ({one_line(exc)})") from exc
    if result is None or result is False:
        raise error(f"{subject}: TensorRT's {call} returned {result}")
    return result


def sidecar_path(engine_path: str | Path) -> Path:
    """``ENGINE.json``: the engine's build facts and its model's metadata."""
    return Path(str(engine_path) + ".json")


def read_sidecar(engine_path: str | Path) -> dict:
    """The sidecar of an engine (no TensorRT needed); a missing or damaged one is a clear error."""
    side = sidecar_path(engine_path)
    try:
        sidecar = json.loads(side.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"{engine_path}: its sidecar {side.name} is missing or damaged; "
            "rebuild the engine with: painn-export trt MODEL.onnx"
        ) from exc
    if "model_metadata" not in sidecar or "profiles" not in sidecar:
        raise ValueError(f"{engine_path}: {side.name} lacks the model's metadata; rebuild the engine")
    return sidecar


def check_sidecar(sidecar: dict, tensorrt_version: str, gpu_name: str, compute_capability: str) -> None:
    """Refuse an engine built for another TensorRT or GPU; the message says to rebuild."""
    problems = []
    if sidecar.get("tensorrt_version") != tensorrt_version:
        problems.append(f"TensorRT {sidecar.get('tensorrt_version')} (this machine has {tensorrt_version})")
    if sidecar.get("compute_capability") != compute_capability or sidecar.get("gpu_name") != gpu_name:
        problems.append(
            f"GPU {sidecar.get('gpu_name')} sm {sidecar.get('compute_capability')} "
            f"(this machine has {gpu_name} sm {compute_capability})"
        )
    if problems:
        raise RuntimeError(
            "engine was built for "
            + " and ".join(problems)
            + "; rebuild it here with: painn-export trt MODEL.onnx"
        )


def read_profiles(engine_path: str | Path) -> list[Profile]:
    """The optimisation profiles recorded in an engine's sidecar (no TensorRT needed)."""
    return [Profile(**{k: tuple(v) for k, v in p.items()}) for p in read_sidecar(engine_path)["profiles"]]


def device_memory_bytes(engine) -> int:
    """Device memory an execution context of ``engine`` allocates (its largest profile's).

    ``device_memory_size_v2`` (TensorRT 10.1 and 11); 10.0 has only ``device_memory_size``,
    which 11 removed.
    """
    if hasattr(engine, "device_memory_size_v2"):
        return int(engine.device_memory_size_v2)
    return int(engine.device_memory_size)


def _graph_dtype(onnx_path: str | Path, meta: dict[str, str]) -> str:
    """The ONNX file's compute dtype (its metadata), refused where TensorRT cannot build it."""
    version = meta.get("painn_export.contract_version")
    if version != str(CONTRACT_VERSION):
        raise ValueError(
            f"{onnx_path} has model contract version {version} (this painn-export writes "
            f"{CONTRACT_VERSION}: the scatter-free slot layout); export it again with painn-export onnx"
        )
    dtype = meta.get("painn_export.dtype", "float32")
    if dtype == "float64":
        raise ValueError(
            f"{onnx_path} is a float64 graph, and TensorRT has no float64 kernels; export it with "
            "painn-export onnx --dtype float32 (or float16, bfloat16)"
        )
    return dtype


def build_engine(
    onnx_path: str | Path,
    output: str | Path,
    profiles: list[Profile],
    *,
    fp16: bool = False,
    tf32: bool = True,
    workspace_gib: float = 4.0,
    timing_cache: str | Path | None = None,
) -> Path:
    """Parse ``onnx_path``, build a serialized engine with ``profiles``, write it and its sidecar.

    TensorRT 11, or a float16/bfloat16 export on TensorRT 10: a strongly typed
    network (precision is the file's; ``fp16`` is refused). TensorRT 10 and a
    float32 export: weakly typed, TF32 with ``tf32``, FP16 kernels with
    ``fp16``, outputs pinned to FP32. ``timing_cache`` is read and, after a
    build, updated; one written on another GPU is refused and left
    as it is. The engine and its sidecar appear together or not at all; the
    sidecar records the device memory a context will allocate.
    """
    from painn_export.files import file_sha256, write_together, written_whole
    from painn_export.metadata import read_metadata

    trt, version = import_tensorrt()
    meta = read_metadata(onnx_path)
    graph_dtype = _graph_dtype(onnx_path, meta)
    if not profiles:
        raise ValueError("at least one optimisation profile is needed")
    strongly_typed = not version.weak_typing or graph_dtype in REDUCED_PRECISION
    if fp16 and not version.weak_typing:
        raise ValueError(FP16_ON_STRONGLY_TYPED.format(version=version.text))
    if fp16 and strongly_typed:
        raise ValueError(f"--fp16: {onnx_path} is a {graph_dtype} graph already; build it without --fp16")
    ident = gpu_identity()
    output = Path(output)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        # 10: opt in; 11: kept for compatibility, and strong typing is on whatever the flags.
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = checked("create_network", onnx_path, builder.create_network, flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{onnx_path}: TensorRT's parse_from_file returned False: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if tf32:
        config.set_flag(trt.BuilderFlag.TF32)
    else:
        config.clear_flag(trt.BuilderFlag.TF32)
    if not strongly_typed:  # TensorRT 10, a float32 graph: weak typing, as before
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        if fp16 or tf32:
            _pin_outputs_to_fp32(trt, network)
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    cache_path = Path(timing_cache) if timing_cache else None
    cache_bytes = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    cache = checked("create_timing_cache", cache_path or output, config.create_timing_cache, cache_bytes)
    try:
        checked("set_timing_cache", cache_path or output, config.set_timing_cache, cache, False)
    except RuntimeError as exc:
        raise RuntimeError(
            f"{exc}: the timing cache was written for another GPU (or cannot be read) and is left as it is; "
            "give another --timing-cache file"
        ) from exc

    for profile in profiles:
        opt_profile = builder.create_optimization_profile()
        shapes = profile.input_shapes()
        for k in range(network.num_inputs):
            name = network.get_input(k).name
            if name not in shapes:
                raise ValueError(f"{onnx_path}: unexpected graph input {name!r}; not a painn-export graph")
            opt_profile.set_shape(name, *shapes[name])
        if config.add_optimization_profile(opt_profile) < 0:
            raise RuntimeError(f"{output}: TensorRT's add_optimization_profile refused {profile}")

    start = time.perf_counter()
    build = builder.build_serialized_network
    serialized = checked("build_serialized_network", output, build, network, config)
    engine_bytes = bytes(serialized)
    seconds = time.perf_counter() - start
    # Deserialized once here: the engine is whole, and its context's device memory is known.
    runtime = trt.Runtime(logger)
    engine = checked("deserialize_cuda_engine", output, runtime.deserialize_cuda_engine, engine_bytes)
    if graph_dtype in REDUCED_PRECISION:
        precision = REDUCED_PRECISION[graph_dtype]
    else:
        precision = "fp16" if fp16 else ("tf32" if tf32 else "fp32")
    sidecar = {
        "tensorrt_version": version.text,
        **ident,
        "profiles": [asdict(p) for p in profiles],
        "precision": precision,
        "strongly_typed": strongly_typed,
        "device_memory_bytes": device_memory_bytes(engine),
        "engine_sha256": hashlib.sha256(engine_bytes).hexdigest(),
        "onnx_path": str(onnx_path),
        "onnx_sha256": file_sha256(onnx_path),
        "model_metadata": meta,  # the engine does not need its ONNX file later
        "build_seconds": round(seconds, 2),
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    write_together(
        {
            output: lambda tmp: tmp.write_bytes(engine_bytes),
            sidecar_path(output): lambda tmp: tmp.write_text(json.dumps(sidecar, indent=2)),
        }
    )
    if cache_path:
        updated = bytes(config.get_timing_cache().serialize())
        with written_whole(cache_path) as tmp:
            tmp.write_bytes(updated)
    return output


def _pin_outputs_to_fp32(trt, network) -> None:
    """Run the layers that write the graph's outputs (atomic energies, forces, virials) in FP32.

    What the host sums in float64 is then never rounded to FP16's or TF32's
    10 mantissa bits on its last step. TensorRT 10's weak typing only: in a
    strongly typed network the graph's own casts do this.
    """
    outputs = {network.get_output(k).name for k in range(network.num_outputs)}
    for k in range(network.num_layers):
        layer = network.get_layer(k)
        for o in range(layer.num_outputs):
            if layer.get_output(o).name in outputs:
                layer.precision = trt.float32
                layer.set_output_type(o, trt.float32)


class CudaDevice:
    """The GPU side of an :class:`EngineSession` (torch.cuda): one device, a stream, buffers, copies."""

    def __init__(self, index: int) -> None:
        import torch

        self.torch, self.index = torch, index
        self.device = torch.device("cuda", index)
        self.stream = torch.cuda.Stream(device=self.device)

    def scope(self):
        """A context in which ``index`` is the current CUDA device (where TensorRT allocates)."""
        return self.torch.cuda.device(self.index)

    @property
    def stream_handle(self) -> int:
        return self.stream.cuda_stream

    def upload(self, array: np.ndarray):
        return self.torch.from_numpy(array).to(self.device)  # on the current stream

    def adopt(self, tensor, dtype: np.dtype):
        """``tensor`` (already on this GPU) in ``dtype``, contiguous: cast there, never through the host."""
        if tensor.device != self.device:
            raise InferenceError(f"tensorrt: a feed tensor on {tensor.device}, the engine on {self.device}")
        torch_dtype = self.torch.from_numpy(np.empty(0, dtype)).dtype
        return tensor.to(dtype=torch_dtype).contiguous()  # on the current stream

    def empty(self, shape: tuple[int, ...], dtype: np.dtype):
        torch_dtype = self.torch.from_numpy(np.empty(0, dtype)).dtype
        return self.torch.empty(shape, dtype=torch_dtype, device=self.device)

    @staticmethod
    def address(buffer) -> int:
        return buffer.data_ptr()

    def after_uploads(self) -> None:
        """The engine's stream waits for the copies made on the current stream."""
        self.stream.wait_stream(self.torch.cuda.current_stream(self.device))

    def synchronize(self) -> None:
        self.stream.synchronize()

    @staticmethod
    def download(buffer) -> np.ndarray:
        return buffer.cpu().numpy()

    def close(self) -> None:
        self.stream = None


def _largest(value, tensor: bool) -> int:
    """The largest entry of an index array or tensor (0 when empty)."""
    if tensor:
        return int(value.max()) if value.numel() else 0
    return int(np.asarray(value).max(initial=0))


class EngineSession:
    """A serialized engine ready to run on CUDA device ``device_index``: what the TensorRT runner calls.

    Opening it checks the sidecar (TensorRT, GPU, the engine's hash),
    deserializes the engine, creates its execution context (which allocates
    the largest profile's device memory: refused in one line when it cannot)
    and a stream, and reads the I/O names and TensorRT dtypes from the engine,
    checked against the contract: float inputs FLOAT or HALF, indices INT64
    or INT32 (as the ONNX graph has them), outputs FLOAT or HALF. Inputs are
    fed, and outputs allocated, in the engine's own dtypes.
    """

    def __init__(self, engine_path: Path, device_index: int) -> None:
        self.engine_path = Path(engine_path)
        trt, version = import_tensorrt()  # without TensorRT or any GPU: what is missing, first
        ident = gpu_identity(device_index)
        sidecar = read_sidecar(self.engine_path)
        check_sidecar(sidecar, version.text, ident["gpu_name"], ident["compute_capability"])
        self.precision: str = sidecar.get("precision", "fp32")
        self.gpu_name: str = ident["gpu_name"]
        self.profiles = read_profiles(self.engine_path)
        data = self.engine_path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if sidecar.get("engine_sha256", digest) != digest:  # older sidecars have no hash
            raise RuntimeError(
                f"{self.engine_path}: the engine's bytes are not the ones its sidecar describes "
                "(written by another build meanwhile?); rebuild it with: painn-export trt MODEL.onnx"
            )
        self._device = CudaDevice(device_index)
        try:  # a failure below (no memory for the context, a foreign engine) frees what it made
            self._load(trt, data)
        except BaseException:
            self.close()
            raise

    def _load(self, trt, data: bytes) -> None:
        """Deserialize the engine on its GPU, make its context (checked) and read its inputs and outputs."""
        logger = trt.Logger(trt.Logger.WARNING)
        with self._device.scope():  # the engine, its context and stream live on that GPU
            checked("init_libnvinfer_plugins", self.engine_path, trt.init_libnvinfer_plugins, logger, "")
            self._runtime = trt.Runtime(logger)  # outlives its engine
            self._engine = checked(
                "deserialize_cuda_engine", self.engine_path, self._runtime.deserialize_cuda_engine, data
            )
            self._context = self._engine.create_execution_context()
        if self._context is None:
            need = device_memory_bytes(self._engine) / (1 << 20)
            raise RuntimeError(
                f"{self.engine_path}: TensorRT's create_execution_context() returned None: the "
                f"{need:.0f} MiB its largest profile needs could not be allocated on {self.gpu_name}; "
                "free GPU memory, or rebuild with a smaller --max-atoms"
            )
        count = self._engine.num_optimization_profiles
        if count != len(self.profiles):
            raise RuntimeError(
                f"{self.engine_path}: the engine has {count} optimisation profiles, its sidecar "
                f"{len(self.profiles)}; rebuild it"
            )
        self._read_io()
        self._profile = 0  # a new context runs profile 0

    def _read_io(self) -> None:
        """Names and dtypes of the engine's inputs and outputs, checked against the contract."""
        engine = self._engine
        names = [engine.get_tensor_name(k) for k in range(engine.num_io_tensors)]
        is_input = {n: engine.get_tensor_mode(n).name == "INPUT" for n in names}
        self.input_names = tuple(n for n in names if is_input[n])
        self.output_names = tuple(n for n in names if not is_input[n])
        gradient = "neighbor_reverse" in self.input_names
        problems = []
        if set(self.input_names) != set(input_names(gradient)):
            want = list(input_names(gradient))
            problems.append(f"inputs {sorted(self.input_names)} (the contract's: {want})")
        if not set(output_names()) <= set(self.output_names) <= set(output_names(stress=True)):
            problems.append(f"outputs {sorted(self.output_names)}")
        float_inputs = {"positions", "neighbor_shift", "neighbor_mask"}
        self._dtypes: dict[str, type] = {}
        for name in names:
            kind = engine.get_tensor_dtype(name).name
            allowed = _INDEX_TYPES if is_input[name] and name not in float_inputs else _FLOAT_TYPES
            if kind not in allowed:
                problems.append(f"{name} is {kind} (allowed: {', '.join(allowed)})")
            else:
                self._dtypes[name] = _NUMPY[kind]
        if problems:
            raise RuntimeError(
                f"{self.engine_path}: not an engine of a painn-export graph: " + "; ".join(problems)
            )
        self.feed_dtype = np.dtype(self._dtypes["positions"])

    def _select_profile(self, n_atoms: int, n_slots: int) -> None:
        for index, profile in enumerate(self.profiles):
            if profile.admits(n_atoms, n_slots):
                if index != self._profile:
                    checked(
                        f"set_optimization_profile_async({index})",
                        self.engine_path,
                        self._context.set_optimization_profile_async,
                        index,
                        self._device.stream_handle,
                        error=InferenceError,
                    )
                    self._profile = index
                return
        raise BatchTooLargeError(
            f"tensorrt: a batch of {n_atoms} atoms, {n_slots} slots fits no "
            "optimisation profile of this engine; split the batch or rebuild with larger --max-*"
        )

    def _call(self, call: str, fn: Callable, *args):
        """A checked TensorRT call while running a batch: its failure is an InferenceError."""
        return checked(call, self.engine_path, fn, *args, error=InferenceError)

    def run(self, feed: dict) -> dict[str, np.ndarray]:
        """The graph's per-atom outputs (numpy, float32 or wider) for a collated feed.

        Inputs are fed in the engine's dtypes and outputs allocated in its
        output dtypes (float16 outputs come back as float32). The feed's
        values are numpy arrays (copied to the GPU) or torch tensors on the
        engine's GPU (:mod:`painn_export.device_graphs`: cast there if need be,
        their device addresses given to the engine, no host round trip). A
        batch that no profile admits is a :class:`BatchTooLargeError`.
        """
        n_atoms, n_slots = feed["neighbors"].shape
        device, context = self._device, self._context
        with device.scope():
            self._select_profile(n_atoms, n_slots)
            buffers = {}
            for name in self.input_names:
                dtype, value = self._dtypes[name], feed[name]
                tensor = not isinstance(value, np.ndarray) and hasattr(value, "data_ptr")
                if dtype == np.int32 and _largest(value, tensor) > np.iinfo(np.int32).max:
                    raise InferenceError(f"tensorrt: {name} exceeds the engine's int32 indices")
                if tensor:
                    buffers[name] = device.adopt(value, dtype)
                else:
                    buffers[name] = device.upload(np.ascontiguousarray(value, dtype=dtype))
                shape = tuple(buffers[name].shape)
                self._call(f"set_input_shape({name!r}, {shape})", context.set_input_shape, name, shape)
                address = device.address(buffers[name])
                self._call(f"set_tensor_address({name!r})", context.set_tensor_address, name, address)
            for name in self.output_names:
                shape = tuple(context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise InferenceError(f"{self.engine_path}: output {name} has no shape yet: {shape}")
                buffers[name] = device.empty(shape, self._dtypes[name])
                address = device.address(buffers[name])
                self._call(f"set_tensor_address({name!r})", context.set_tensor_address, name, address)
            device.after_uploads()
            self._call("execute_async_v3", context.execute_async_v3, device.stream_handle)
            device.synchronize()
            outputs = {name: device.download(buffers[name]) for name in self.output_names}
        # float32 or wider on the host (the contract), whatever the engine wrote
        return {n: a.astype(np.promote_types(a.dtype, np.float32), copy=False) for n, a in outputs.items()}

    def close(self) -> None:
        """Free the context, the engine and the stream (in that order)."""
        self._context = self._engine = self._runtime = None
        if self._device is not None:
            self._device.close()
            self._device = None
