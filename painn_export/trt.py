"""TensorRT engines from the exported ONNX file (TensorRT 10 Python API).

The graph has no scatter (contract version 3), so no plugin is needed. Its
outputs are per atom; the sums over systems and the element references are
the host's, in float64 (:mod:`painn_export.readout`), so no total is ever
summed in FP16 or TF32. The layers that write the outputs are pinned to FP32
in TF32/FP16 builds; what runs before them (the network's features) still
runs at the precision the build allows.
``tensorrt`` is imported only here, lazily; without it (or without a GPU)
:class:`~painn_export.runners.RuntimeUnavailableError` says what to install. Each
engine gets a JSON sidecar (TensorRT version, GPU and compute capability,
profiles, precision, hash of the ONNX file); an engine whose sidecar does not
match the TensorRT and GPU at hand is refused, since serialized engines are
specific to both.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from painn_export.checkpoint import file_sha256
from painn_export.contract import AXES, STATIC, input_names, slot_count
from painn_export.errors import RuntimeUnavailableError

INSTALL_HINT = (
    "TensorRT is not installed: on a machine with an NVIDIA GPU, pip install 'painn-export[gpu]' "
    "(tensorrt>=10)"
)


@dataclass(frozen=True)
class Profile:
    """One optimisation profile: (min, opt, max) for atoms and neighbour slots per atom.

    Slot counts are those of :func:`~painn_export.contract.slot_count` (the
    one rule collate and the batcher use): a profile's slots are rounded to it.
    """

    atoms: tuple[int, int, int] = (1, 2048, 16384)
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


def import_tensorrt():
    """``(tensorrt, torch)``; without TensorRT or a visible GPU, one line saying which."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise RuntimeUnavailableError(INSTALL_HINT) from exc
    import torch

    if not torch.cuda.is_available():
        raise RuntimeUnavailableError("TensorRT needs an NVIDIA GPU and none is visible to this process")
    return trt, torch


def device_identity(torch) -> dict[str, str]:
    major, minor = torch.cuda.get_device_capability()
    return {"gpu_name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}


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
    """Parse ``onnx_path``, build a serialized engine with ``profiles``, write it and its sidecar."""
    from painn_export.contract import CONTRACT_VERSION
    from painn_export.metadata import read_metadata

    trt, torch = import_tensorrt()
    version = read_metadata(onnx_path).get("painn_export.contract_version")
    if version != str(CONTRACT_VERSION):
        raise ValueError(
            f"{onnx_path} has model contract version {version} (this painn-export writes "
            f"{CONTRACT_VERSION}: the scatter-free slot layout); export it again with painn-export onnx"
        )
    if not profiles:
        raise ValueError("at least one optimisation profile is needed")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if tf32:
        config.set_flag(trt.BuilderFlag.TF32)
    else:
        config.clear_flag(trt.BuilderFlag.TF32)
    if fp16 or tf32:
        _pin_outputs_to_fp32(trt, network)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    cache_path = Path(timing_cache) if timing_cache else None
    cache_bytes = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    for profile in profiles:
        opt_profile = builder.create_optimization_profile()
        shapes = profile.input_shapes()
        for k in range(network.num_inputs):
            name = network.get_input(k).name
            if name not in shapes:
                raise ValueError(f"{onnx_path}: unexpected graph input {name!r}; not a painn-export graph")
            opt_profile.set_shape(name, *shapes[name])
        config.add_optimization_profile(opt_profile)

    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the engine (see the log above)")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(bytes(serialized))
    if cache_path:
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    precision = "fp16" if fp16 else ("tf32" if tf32 else "fp32")
    sidecar = {
        "tensorrt_version": trt.__version__,
        **device_identity(torch),
        "profiles": [asdict(p) for p in profiles],
        "precision": precision,
        "onnx_path": str(onnx_path),
        "onnx_sha256": file_sha256(onnx_path),
        "model_metadata": read_metadata(onnx_path),  # the engine does not need its ONNX file later
        "build_seconds": round(time.perf_counter() - start, 2),
    }
    sidecar_path(output).write_text(json.dumps(sidecar, indent=2))
    return output


def _pin_outputs_to_fp32(trt, network) -> None:
    """Run the layers that write the graph's outputs (atomic energies, forces, virials) in FP32.

    What the host sums in float64 is then never rounded to FP16's or TF32's
    10 mantissa bits on its last step.
    """
    outputs = {network.get_output(k).name for k in range(network.num_outputs)}
    for k in range(network.num_layers):
        layer = network.get_layer(k)
        for o in range(layer.num_outputs):
            if layer.get_output(o).name in outputs:
                layer.precision = trt.float32
                layer.set_output_type(o, trt.float32)


def load_engine(path: str | Path):
    """Deserialize an engine after checking its sidecar; returns (engine, context, torch)."""
    trt, torch = import_tensorrt()
    path = Path(path)
    sidecar = read_sidecar(path)
    ident = device_identity(torch)
    check_sidecar(sidecar, trt.__version__, ident["gpu_name"], ident["compute_capability"])
    logger = trt.Logger(trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")
    engine = trt.Runtime(logger).deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise RuntimeError(f"{path}: TensorRT could not deserialize the engine; rebuild it")
    return engine, engine.create_execution_context(), torch


def read_profiles(engine_path: str | Path) -> list[Profile]:
    """The optimisation profiles recorded in an engine's sidecar (no TensorRT needed)."""
    return [Profile(**{k: tuple(v) for k, v in p.items()}) for p in read_sidecar(engine_path)["profiles"]]
