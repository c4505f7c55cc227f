"""TensorRT: sidecar checks, profiles, and the build and run logic of TensorRT 10 and 11 run everywhere
(against test doubles of its API, below); building a real engine needs TensorRT and a GPU."""

import contextlib
import hashlib
import json
import sys
import types

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import painn_export.trt as trt_module
from painn_export.contract import input_names
from painn_export.errors import BatchTooLargeError, InferenceError
from painn_export.trt import (
    DEFAULT_MAX_ATOMS,
    EngineSession,
    Profile,
    build_engine,
    check_sidecar,
    sidecar_path,
)


def test_sidecar_mismatch_is_refused_with_rebuild_advice():
    sidecar = {"tensorrt_version": "10.1.0", "gpu_name": "NVIDIA H100", "compute_capability": "9.0"}
    check_sidecar(sidecar, "10.1.0", "NVIDIA H100", "9.0")
    with pytest.raises(RuntimeError, match="rebuild"):
        check_sidecar(sidecar, "10.3.0", "NVIDIA H100", "9.0")
    with pytest.raises(RuntimeError, match="A100"):
        check_sidecar(sidecar, "10.1.0", "NVIDIA A100", "8.0")


def test_profiles_validate_and_admit():
    p = Profile(atoms=(1, 100, 1000), slots=(8, 48, 96))
    assert p.admits(500, 64) and not p.admits(2000, 16) and not p.admits(500, 128)
    shapes = p.input_shapes()
    assert shapes["neighbor_shift"] == ((1, 8, 3), (100, 48, 3), (1000, 96, 3))
    assert shapes["neighbor_reverse"] == ((1, 8), (100, 48), (1000, 96))
    assert shapes["pair_slots"] == ((1, 2), (2400, 2), (48000, 2))
    assert set(shapes) == {*input_names(gradient=True)}  # no host-only entry reaches the engine
    with pytest.raises(ValueError):
        Profile(atoms=(10, 5, 100))
    with pytest.raises(ValueError, match="slot count"):
        Profile(slots=(8, 50, 100))  # collate never makes 50 slots


def test_a_batch_at_the_largest_slot_profile_fits():
    """collate, the batcher and the profile agree on the slot count: a fully packed batch at
    the profile's largest slot count is admitted whole and fed with exactly that many slots."""
    from painn_export.batch import collate
    from painn_export.neighbors import neighbor_graph
    from pipelines.batches import batch_limits

    profiles = (Profile(atoms=(1, 64, 1000), slots=(8, 8, 8)),)  # an engine's (ModelFacts.profiles)

    # one atom, its eight images in a plane: every slot of K = 8 holds an edge
    g = neighbor_graph(np.zeros((1, 3)), np.diag([2.5, 2.5, 10.0]), np.array([1, 1, 0], bool), 3.6, 50)
    assert g.max_degree == 8
    limits = batch_limits(profiles, max_atoms=4096, max_edges=None)
    assert limits.admit(10, g.max_degree)
    feed = collate([g] * 10)
    assert profiles[0].admits(*feed["neighbors"].shape)


def test_an_engine_whose_profiles_start_at_eight_slots_still_takes_small_molecules():
    """Engines built before slot counts below 8 existed: a batch of diatomics (one slot would do)
    is given the engine's smallest slot count, so it fits a profile instead of failing as too large."""
    from painn_export.batch import collate
    from painn_export.neighbors import neighbor_graph
    from pipelines.batches import batch_limits

    old = (Profile(atoms=(1, 64, 1000), slots=(8, 64, 128)),)
    pos = np.array([[0.0, 0.0, 0.0], [0.74, 0.0, 0.0]])
    g = neighbor_graph(pos, np.eye(3) * 20, np.zeros(3, bool), 5.0, 50)
    assert g.max_degree == 1 and collate([g] * 10)["neighbors"].shape[1] == 1
    limits = batch_limits(old, max_atoms=4096, max_edges=None)
    assert limits.admit(20, g.max_degree)
    feed = limits.collate([g] * 10, np.float32)
    assert feed["neighbors"].shape[1] == 8 and old[0].admits(*feed["neighbors"].shape)
    assert limits.slots_for(9) == 16 and batch_limits((), 4096, None).slots_for(1) == 1


def test_cli_profiles_trtexec_style():
    from painn_export.cli import _profiles

    ranges = {f"{b}_{a}": () for b in ("min", "opt", "max") for a in ("atoms", "slots")}
    ranges.update(max_atoms=(1000, 20000), opt_atoms=(500, 10000))
    profiles = _profiles(ranges)
    assert [p.atoms[2] for p in profiles] == [1000, 20000]


@pytest.mark.tensorrt
def test_engine_build_and_parity(tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT not installed")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from painn_export.export import export_onnx
    from painn_export.parity import run_parity
    from painn_export.runners import open_runner
    from painn_export.samples import example_set
    from painn_export.trt import build_engine

    from conftest import SMALL, make_model

    model = make_model(SMALL, torch.float32)
    onnx_path = export_onnx(model, tmp_path / "m.onnx")
    engine = build_engine(onnx_path, tmp_path / "m.engine", [Profile()], tf32=False)
    runner, _ = open_runner(engine, "tensorrt", device="cuda")
    rows = run_parity(model, [(runner, "float32")], example_set())
    assert all(r.comparison.passed for r in rows), [r.as_dict() for r in rows]


# --- TensorRT 10 and 11 without TensorRT: test doubles of its Python API -------------------------
#
# ``tensorrt`` cannot be installed without a GPU, so these tests install a fake module that mimics
# the documented API of one major version: TensorRT 10 (weak typing: BuilderFlag.FP16,
# OBEY_PRECISION_CONSTRAINTS, a layer's precision and set_output_type) or TensorRT 11 (those
# names absent, as in its bindings, so touching one raises AttributeError as the real module
# would; STRONGLY_TYPED still accepted). Every call that reports failure by its return value can
# be told to fail. The GPU-facing seams (painn_export.trt.gpu_identity and CudaDevice) are
# replaced by a host double: numpy buffers at their own addresses.


_TRT_NAMES = {TensorProto.FLOAT: "FLOAT", TensorProto.FLOAT16: "HALF", TensorProto.BFLOAT16: "BF16",
              TensorProto.INT32: "INT32", TensorProto.INT64: "INT64"}  # fmt: skip


class _EnumValue:
    """A pybind11 enum value: a name and an int."""

    def __init__(self, name: str, value: int) -> None:
        self.name, self.value = name, value

    def __int__(self) -> int:
        return self.value

    def __repr__(self) -> str:
        return self.name


def _enum(*names: str) -> types.SimpleNamespace:
    return types.SimpleNamespace(**{n: _EnumValue(n, k) for k, n in enumerate(names)})


def make_fake_tensorrt(major: int, minor: int = 8, fail: frozenset = frozenset()) -> types.ModuleType:
    """A ``tensorrt`` of ``major`` 10 or 11; ``fail`` names the calls that report failure."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = f"{major}.{minor}.0"
    trt.calls = []  # (call, args) of everything the product asked of it
    weak = major == 10
    flags = ["TF32", "DEBUG", "REFIT"]
    if weak:  # the weak-typing flags that TensorRT 11 removed
        flags += ["FP16", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS"]
    trt.BuilderFlag = _enum(*flags)
    trt.NetworkDefinitionCreationFlag = _enum("STRONGLY_TYPED")
    trt.MemoryPoolType = _enum("WORKSPACE")
    trt.DataType = _enum("FLOAT", "HALF", "BF16", "INT32", "INT64")
    trt.float32 = trt.DataType.FLOAT
    trt.TensorIOMode = _enum("NONE", "INPUT", "OUTPUT")

    def record(call, *args):
        trt.calls.append((call, args))
        return call not in fail

    class Logger:
        WARNING = "WARNING"

        def __init__(self, severity) -> None:
            self.severity = severity

    class Tensor:
        def __init__(self, name, dtype) -> None:
            self.name, self.dtype = name, dtype

    if weak:

        class Layer:
            def __init__(self, output) -> None:
                self.num_outputs, self._output, self.precision = 1, output, None

            def get_output(self, k):
                return self._output

            def set_output_type(self, k, dtype):
                trt.calls.append(("set_output_type", (self._output.name, dtype)))

    else:

        class Layer:  # TensorRT 11: no precision, no set_output_type (__slots__: setting one fails)
            __slots__ = ("_output", "num_outputs")

            def __init__(self, output) -> None:
                self.num_outputs, self._output = 1, output

            def get_output(self, k):
                return self._output

    class Network:
        def __init__(self, flags) -> None:
            self.flags, self.inputs, self.outputs = flags, [], []

        num_inputs = property(lambda self: len(self.inputs))
        num_outputs = property(lambda self: len(self.outputs))
        num_layers = property(lambda self: len(self.outputs))

        def get_input(self, k):
            return self.inputs[k]

        def get_output(self, k):
            return self.outputs[k]

        def get_layer(self, k):  # one layer writes each output
            return self.layers[k]

    class OnnxParser:
        def __init__(self, network, logger) -> None:
            self.network = network
            self.num_errors = 0

        def parse_from_file(self, path):
            if not record("parse_from_file", path):
                self.num_errors = 1
                return False
            graph = onnx.load(path).graph
            typed = lambda v: Tensor(v.name, _TRT_NAMES[v.type.tensor_type.elem_type])  # noqa: E731
            self.network.inputs = [typed(v) for v in graph.input]
            self.network.outputs = [typed(v) for v in graph.output]
            self.network.layers = [Layer(t) for t in self.network.outputs]
            return True

        def get_error(self, k):
            return "In node 0 (parseGraph): INVALID_NODE: planted"

    class TimingCache:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def serialize(self):
            return self.data + b"+timed"

    class Config:
        def __init__(self) -> None:
            self.flags, self.profiles, self.cache = set(), [], None

        def set_memory_pool_limit(self, pool, size):
            trt.calls.append(("set_memory_pool_limit", (pool, size)))

        def set_flag(self, flag):
            self.flags.add(flag.name)

        def clear_flag(self, flag):
            self.flags.discard(flag.name)

        def create_timing_cache(self, data):
            return TimingCache(bytes(data)) if record("create_timing_cache", bytes(data)) else None

        def set_timing_cache(self, cache, ignore_mismatch):
            foreign = cache.data.startswith(b"other-gpu") and not ignore_mismatch  # TensorRT's header check
            self.cache = cache
            return record("set_timing_cache", ignore_mismatch) and not foreign

        def get_timing_cache(self):
            return self.cache

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)
            return len(self.profiles) - 1 if record("add_optimization_profile") else -1

    class OptimizationProfile:
        def set_shape(self, name, lo, opt, hi):
            trt.calls.append(("set_shape", (name, lo, opt, hi)))

    class Builder:
        def __init__(self, logger) -> None:
            self.logger = logger

        def create_network(self, flags=0):
            trt.calls.append(("create_network", (flags,)))
            return Network(flags)

        def create_builder_config(self):
            trt.config = Config()
            return trt.config

        def create_optimization_profile(self):
            return OptimizationProfile()

        def build_serialized_network(self, network, config):
            if not record("build_serialized_network"):
                return None
            io = {t.name: ("INPUT", t.dtype) for t in network.inputs}
            io.update({t.name: ("OUTPUT", t.dtype) for t in network.outputs})
            plan = {"io": io, "profiles": len(config.profiles), "flags": sorted(config.flags)}
            return json.dumps(plan).encode()

    class Context:
        def __init__(self, engine) -> None:
            self.engine, self.shapes, self.addresses, self.profile = engine, {}, {}, 0

        def set_optimization_profile_async(self, index, stream):
            if not record("set_optimization_profile_async", index):
                raise RuntimeError("Error in set optimization profile async.")  # as the bindings do
            self.profile = index
            return True

        def set_input_shape(self, name, shape):
            self.shapes[name] = tuple(shape)
            return record("set_input_shape", name, tuple(shape))

        def set_tensor_address(self, name, address):
            self.addresses[name] = address
            return record("set_tensor_address", name)

        def get_tensor_shape(self, name):
            n = self.shapes["positions"][0]
            return {"atom_energy": (n,), "forces": (n, 3), "atom_virial": (n, 3, 3)}[name]

        def execute_async_v3(self, stream):
            if not record("execute_async_v3", stream):
                return False
            buffers = FakeDevice.registry
            x = buffers[self.addresses["positions"]]
            buffers[self.addresses["atom_energy"]][:] = x.sum(axis=1)
            buffers[self.addresses["forces"]][:] = -x
            return True

    class Engine:
        def __init__(self, plan) -> None:
            self.io = plan["io"]
            self.num_optimization_profiles = plan["profiles"]
            self.num_io_tensors = len(self.io)

        def get_tensor_name(self, k):
            return list(self.io)[k]

        def get_tensor_mode(self, name):
            return getattr(trt.TensorIOMode, self.io[name][0])

        def get_tensor_dtype(self, name):
            return getattr(trt.DataType, self.io[name][1])

        def create_execution_context(self):
            return Context(self) if record("create_execution_context") else None

    if major == 11 or minor >= 1:
        Engine.device_memory_size_v2 = 3 << 20
    if major == 10:
        Engine.device_memory_size = 5 << 20  # 11 removed it

    class Runtime:
        def __init__(self, logger) -> None:
            self.logger = logger

        def deserialize_cuda_engine(self, data):
            if not record("deserialize_cuda_engine"):
                return None
            return Engine(json.loads(bytes(data)))

    def init_libnvinfer_plugins(logger, namespace):
        return record("init_libnvinfer_plugins")

    for item in (Logger, Builder, OnnxParser, Runtime, init_libnvinfer_plugins):
        setattr(trt, item.__name__, item)
    return trt


class FakeDevice:
    """The host standing in for painn_export.trt.CudaDevice: numpy buffers, found by their address."""

    registry: dict[int, np.ndarray] = {}  # noqa: RUF012
    stream_handle = 7

    def __init__(self, index: int) -> None:
        self.index, self.uploads = index, {}
        FakeDevice.last = self

    def scope(self):
        return contextlib.nullcontext()

    def upload(self, array):
        copy = array.copy()
        FakeDevice.registry[copy.ctypes.data] = copy
        self.uploads[len(self.uploads)] = copy
        return copy

    def empty(self, shape, dtype):
        buffer = np.full(shape, np.nan, dtype)
        FakeDevice.registry[buffer.ctypes.data] = buffer
        return buffer

    @staticmethod
    def address(buffer):
        return buffer.ctypes.data

    def after_uploads(self):
        pass

    def synchronize(self):
        pass

    @staticmethod
    def download(buffer):
        return buffer.copy()

    def close(self):
        self.closed = True


FAKE_GPU = {"gpu_name": "Fake GPU", "compute_capability": "9.0"}
PROFILES = [Profile(atoms=(1, 8, 16), slots=(1, 4, 8)), Profile(atoms=(1, 32, 64), slots=(8, 16, 32))]


@pytest.fixture
def fake_trt(monkeypatch):
    """``install(major, minor=8, fail=())``: that fake ``tensorrt``, a fake GPU and device."""

    def install(major, minor=8, fail=()):
        module = make_fake_tensorrt(major, minor, frozenset(fail))
        monkeypatch.setitem(sys.modules, "tensorrt", module)
        monkeypatch.setattr(trt_module, "gpu_identity", lambda index=None: dict(FAKE_GPU))
        monkeypatch.setattr(trt_module, "CudaDevice", FakeDevice)
        return module

    return install


def tiny_onnx(path, floats=TensorProto.FLOAT, indices=TensorProto.INT64, energy=TensorProto.FLOAT,
              dtype="float32", gradient=False):  # fmt: skip
    """An ONNX file with a painn-export graph's inputs, outputs and metadata (no nodes: the fake
    parser reads only its I/O), in the given element types."""
    from painn_export.contract import AXES, input_names, output_names

    def value(name, elem):
        dims = [a or 3 for a in AXES[name]]
        if name == "pair_slots":
            dims = ["n_pairs", 2]
        return helper.make_tensor_value_info(name, elem, dims)

    float_inputs = {"positions", "neighbor_shift", "neighbor_mask"}
    inputs = [value(n, floats if n in float_inputs else indices) for n in input_names(gradient)]
    outputs = [value(n, energy if n == "atom_energy" else TensorProto.FLOAT) for n in output_names()]
    model = helper.make_model(helper.make_graph([], "g", inputs, outputs))
    meta = {"contract_version": "3", "dtype": dtype, "config": "{}", "forces": "direct"}
    for key, val in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = f"painn_export.{key}", val
    onnx.save(model, str(path))
    return path


def small_feed(n_atoms=5):
    from painn_export.batch import collate
    from painn_export.neighbors import neighbor_graph

    rng = np.random.default_rng(n_atoms)
    g = neighbor_graph(rng.uniform(0, 4, (n_atoms, 3)), np.eye(3) * 30, np.zeros(3, bool), 3.0, 50)
    return collate([g], np.float64)


def flag_of(trt, call):
    return [args for name, args in trt.calls if name == call]


def test_the_default_profile_admits_the_batchers_default_batches():
    from pipelines.options import RunOptions

    assert Profile().atoms[2] == DEFAULT_MAX_ATOMS == RunOptions.max_atoms == 4096


def test_tensorrt_11_builds_strongly_typed_and_touches_no_removed_name(fake_trt, tmp_path):
    """The 11 fake lacks BuilderFlag.FP16, OBEY/PREFER_PRECISION_CONSTRAINTS, a layer's precision and
    set_output_type, and device_memory_size: reaching for any of them raises AttributeError."""
    trt = fake_trt(11)
    for dtype, precision in (("float16", "fp16"), ("bfloat16", "bf16"), ("float32", "tf32")):
        elem = {"float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}.get(
            dtype, TensorProto.FLOAT
        )
        onnx_path = tiny_onnx(tmp_path / f"{dtype}.onnx", energy=elem, dtype=dtype)
        engine = build_engine(onnx_path, tmp_path / f"{dtype}.engine", PROFILES)
        strongly = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        assert flag_of(trt, "create_network")[-1] == (strongly,)
        assert trt.config.flags == {"TF32"}
        side = json.loads(sidecar_path(engine).read_text())
        assert side["precision"] == precision and side["strongly_typed"]
        assert side["device_memory_bytes"] == 3 << 20 and side["tensorrt_version"] == "11.8.0"
        assert side["engine_sha256"] == hashlib.sha256(engine.read_bytes()).hexdigest()
        assert side["profiles"][1] == {"atoms": [1, 32, 64], "slots": [8, 16, 32]}


def test_tensorrt_11_refuses_fp16_with_the_export_to_use(fake_trt, tmp_path):
    fake_trt(11)
    onnx_path = tiny_onnx(tmp_path / "m.onnx")
    with pytest.raises(ValueError, match=r"painn-export onnx --dtype float16") as info:
        build_engine(onnx_path, tmp_path / "m.engine", PROFILES, fp16=True)
    assert "\n" not in str(info.value) and not (tmp_path / "m.engine").exists()


def test_tensorrt_10_keeps_weak_typing_for_float32_and_types_a_float16_file_strongly(fake_trt, tmp_path):
    trt = fake_trt(10, minor=0)  # 10.0: device_memory_size only
    onnx_path = tiny_onnx(tmp_path / "m.onnx")
    engine = build_engine(onnx_path, tmp_path / "m.engine", PROFILES, fp16=True)
    assert flag_of(trt, "create_network")[-1] == (0,)
    assert trt.config.flags == {"FP16", "TF32", "OBEY_PRECISION_CONSTRAINTS"}
    network_outputs = {"atom_energy", "forces"}
    assert {args[0] for args in flag_of(trt, "set_output_type")} == network_outputs  # pinned to FP32
    side = json.loads(sidecar_path(engine).read_text())
    assert side["precision"] == "fp16" and not side["strongly_typed"]
    assert side["device_memory_bytes"] == 5 << 20

    build_engine(onnx_path, tmp_path / "m32.engine", PROFILES, tf32=False)
    assert trt.config.flags == set()
    assert json.loads(sidecar_path(tmp_path / "m32.engine").read_text())["precision"] == "fp32"

    half = tiny_onnx(tmp_path / "h.onnx", energy=TensorProto.FLOAT16, dtype="float16")
    calls_before = len(flag_of(trt, "set_output_type"))
    build_engine(half, tmp_path / "h.engine", PROFILES)
    assert flag_of(trt, "create_network")[-1] == (1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED),)
    assert trt.config.flags == {"TF32"} and len(flag_of(trt, "set_output_type")) == calls_before
    with pytest.raises(ValueError, match="already"):
        build_engine(half, tmp_path / "h2.engine", PROFILES, fp16=True)


@pytest.mark.parametrize(
    "call",
    [
        "parse_from_file",
        "create_timing_cache",
        "set_timing_cache",
        "add_optimization_profile",
        "build_serialized_network",
        "deserialize_cuda_engine",
    ],
)
def test_each_failed_build_call_is_one_line_naming_it(fake_trt, tmp_path, call):
    fake_trt(11, fail={call})
    onnx_path = tiny_onnx(tmp_path / "m.onnx")
    with pytest.raises(RuntimeError) as info:
        build_engine(onnx_path, tmp_path / "m.engine", PROFILES, timing_cache=tmp_path / "t.cache")
    message = str(info.value)
    assert call in message and "\n" not in message, message
    assert "m.engine" in message or "m.onnx" in message or "t.cache" in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # nothing else written


def _built(fake_trt, tmp_path, major=11, fail=(), **onnx_types):
    fake_trt(major)
    engine = build_engine(tiny_onnx(tmp_path / "m.onnx", **onnx_types), tmp_path / "m.engine", PROFILES)
    return fake_trt(major, fail=fail), engine


@pytest.mark.parametrize(
    "call", ["init_libnvinfer_plugins", "deserialize_cuda_engine", "create_execution_context"]
)
def test_each_failed_load_call_is_one_line_naming_it_and_the_engine(fake_trt, tmp_path, call):
    _, engine = _built(fake_trt, tmp_path, fail={call})
    with pytest.raises(RuntimeError) as info:
        EngineSession(engine, 0)
    message = str(info.value)
    assert call in message and str(engine) in message and "\n" not in message, message
    if call == "create_execution_context":  # what it could not allocate, and what to do
        assert "3 MiB" in message and "--max-atoms" in message
    assert getattr(FakeDevice.last, "closed", False)  # its stream given back, not left to the GC


@pytest.mark.parametrize(
    "call", ["set_input_shape", "set_tensor_address", "execute_async_v3", "set_optimization_profile_async"]
)
def test_each_failed_run_call_is_one_line_naming_it_and_the_engine(fake_trt, tmp_path, call):
    _, engine = _built(fake_trt, tmp_path, fail={call})
    session = EngineSession(engine, 0)
    feed = small_feed(5)
    if call == "set_optimization_profile_async":  # profile 1 is the only one with 16 slots
        feed = {**feed, "neighbors": np.zeros((5, 16), np.int64)}
        for name in ("neighbor_shift", "neighbor_mask", "slot_pair"):
            feed[name] = np.zeros((5, 16, 3) if name == "neighbor_shift" else (5, 16), feed[name].dtype)
    with pytest.raises(InferenceError) as info:
        session.run(feed)
    message = str(info.value)
    assert call in message and str(engine) in message and "\n" not in message, message


def test_engine_and_sidecar_appear_together_or_not_at_all(fake_trt, tmp_path, monkeypatch):
    """A sidecar that cannot be written (a full disk) leaves no engine either, and no temporaries;
    an engine and sidecar from an earlier build stay as they were."""
    from pathlib import Path

    from painn_export.files import FileWriteError

    _built(fake_trt, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    write_text = Path.write_text

    def full_disk(self, *args, **kwargs):
        if ".engine.json." in self.name or ".engine2.json." in self.name:
            raise OSError(28, "No space left on device")
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    for target in (tmp_path / "m.engine", tmp_path / "m.engine2"):
        with pytest.raises(FileWriteError, match="No space left"):
            build_engine(tmp_path / "m.onnx", target, PROFILES)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_foreign_timing_cache_is_refused_and_left_as_it_is(fake_trt, tmp_path):
    fake_trt(11)
    onnx_path = tiny_onnx(tmp_path / "m.onnx")
    cache = tmp_path / "t.cache"
    cache.write_bytes(b"other-gpu cache")
    with pytest.raises(RuntimeError, match=r"set_timing_cache.*another GPU") as info:
        build_engine(onnx_path, tmp_path / "m.engine", PROFILES, timing_cache=cache)
    assert "\n" not in str(info.value)
    assert cache.read_bytes() == b"other-gpu cache" and not (tmp_path / "m.engine").exists()
    # this GPU's cache (or none yet) is read, then updated after the build
    cache.write_bytes(b"this gpu")
    build_engine(onnx_path, tmp_path / "m.engine", PROFILES, timing_cache=cache)
    assert cache.read_bytes() == b"this gpu+timed"


def test_engine_dtypes_drive_the_feed_and_the_outputs(fake_trt, tmp_path):
    """An engine whose positions are HALF, indices INT32 and energies HALF is fed float16 and int32
    arrays, writes float16 energies, and returns float32; profiles switch, and a batch that fits
    none is too large."""
    trt, engine = _built(
        fake_trt, tmp_path, floats=TensorProto.FLOAT16, indices=TensorProto.INT32,
        energy=TensorProto.FLOAT16, dtype="float16",
    )  # fmt: skip
    session = EngineSession(engine, 0)
    assert session.feed_dtype == np.float16 and session.precision == "fp16"
    assert session.gpu_name == "Fake GPU" and session.input_names[:2] == ("atomic_numbers", "positions")
    feed = small_feed(5)
    out = session.run(feed)
    fed = dict(zip(session.input_names, FakeDevice.last.uploads.values()))
    assert fed["positions"].dtype == np.float16 and fed["neighbors"].dtype == np.int32
    assert fed["atomic_numbers"].dtype == np.int32 and fed["neighbor_mask"].dtype == np.float16
    assert out["atom_energy"].dtype == np.float32 and out["forces"].dtype == np.float32
    np.testing.assert_array_equal(
        out["atom_energy"], feed["positions"].astype(np.float16).sum(axis=1).astype(np.float32)
    )
    assert not flag_of(trt, "set_optimization_profile_async")
    wide = {**feed, "neighbors": np.zeros((5, 16), np.int64)}
    for name in ("neighbor_shift", "neighbor_mask", "slot_pair"):
        wide[name] = np.zeros((5, 16, 3) if name == "neighbor_shift" else (5, 16), feed[name].dtype)
    session.run(wide)
    assert flag_of(trt, "set_optimization_profile_async") == [(1,)]
    with pytest.raises(BatchTooLargeError, match="fits no optimisation profile"):
        session.run({**wide, "neighbors": np.zeros((5, 40), np.int64)})
    session.close()


def test_an_engine_outside_the_contract_or_not_its_sidecars_is_refused(fake_trt, tmp_path):
    _, engine = _built(fake_trt, tmp_path, floats=TensorProto.INT32)
    with pytest.raises(RuntimeError, match="positions is INT32"):
        EngineSession(engine, 0)
    _, engine = _built(fake_trt, tmp_path, energy=TensorProto.BFLOAT16)
    with pytest.raises(RuntimeError, match="atom_energy is BF16"):
        EngineSession(engine, 0)
    _, engine = _built(fake_trt, tmp_path)
    engine.write_bytes(engine.read_bytes().replace(b'"profiles": 2', b'"profiles": 3'))
    with pytest.raises(RuntimeError, match="not the ones its sidecar describes"):
        EngineSession(engine, 0)


def test_cli_trt_on_tensorrt_11(fake_trt, tmp_path):
    from click.testing import CliRunner

    from painn_export.cli import main

    fake_trt(11)
    onnx_path = tiny_onnx(tmp_path / "m.onnx", energy=TensorProto.FLOAT16, dtype="float16")
    result = CliRunner().invoke(main, ["trt", str(onnx_path), "-o", str(tmp_path / "m.engine")])
    assert result.exit_code == 0, result.output
    assert "fp16, strongly typed, TensorRT 11.8.0" in result.output and "3 MiB" in result.output
    result = CliRunner().invoke(main, ["trt", str(onnx_path), "-o", str(tmp_path / "x.engine"), "--fp16"])
    assert result.exit_code == 1 and "--dtype float16" in result.output and "Traceback" not in result.output
