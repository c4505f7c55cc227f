"""The one interface every runtime has, and the words every runner shares: devices, names, identity.

A runner is a context manager: ``activate()`` imports the heavy library and
allocates device resources (nothing touches a GPU before it), ``infer(feed)``
takes a feed of the model contract (:func:`painn_export.batch.collate`) as
numpy arrays in the runner's :attr:`Runner.feed_dtype` (or as torch tensors
already on the runner's device, :func:`painn_export.device_graphs.device_feed`:
they reach the runtime without a copy to the host), runs the graph, and
returns ``{"energy", "forces"}`` (and ``"stress"`` for stress graphs) as
numpy arrays after the host's float64 sums per system
(:mod:`painn_export.readout`); ``deactivate()`` frees. ``input_names`` /
``output_names`` are the graph's, and say which contract variant the runner
serves; extra feed entries are ignored. ``device`` says where it runs
(``cpu``, ``cuda:0``), ``provider`` what kind of engine ran it (``cpu``,
``cuda``, ``tensorrt``) and ``gpu`` the GPU's name (empty on the CPU);
:meth:`Runner.identity` is what a run's fingerprint records of it. Each
records the wall time of its last inference in ``last_inference_s``. A failed
inference raises :class:`~painn_export.errors.BatchTooLargeError` (memory,
engine profile: a smaller batch may work) or
:class:`~painn_export.errors.InferenceError` (anything else), whatever the
runtime's own exception type.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from painn_export.contract import HOST_INPUTS, VIRIAL_OUTPUT, input_names, output_names
from painn_export.errors import BatchTooLargeError, InferenceError, classify_runtime_error
from painn_export.metadata import NotAModelError
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


def feed_dtype_of(precision: str) -> np.dtype:
    """The float dtype a runner of ``precision`` is fed: float64 for float64, float32 for every other.

    Reduced-precision graphs (float16, bfloat16, TF32, an engine's fp16) take
    float32 positions and shifts and narrow inside, after the edge vectors.
    """
    return np.dtype(np.float64 if precision == "float64" else np.float32)


def runner_name(runtime: str, provider: str, precision: str = "float32") -> str:
    """The one way a runner's name is written: what fingerprints, summaries and parity rows show.

    ``runtime`` is one of :data:`RUNTIMES`; ``provider`` what ran it (``cpu``,
    ``cuda``, ``tensorrt``); eager PyTorch's name also carries its precision.
    """
    if runtime == "torch":
        return f"torch-{provider}-{precision}"
    if runtime == "tensorrt":
        return "tensorrt"
    return f"{runtime}-{provider}"


@dataclass(frozen=True)
class RunnerIdentity:
    """What evaluated a run's structures: results of two runs mix only when these agree.

    It is what an output's fingerprint records (:mod:`pipelines.output`), and
    what a Ray actor reports back to its driver.
    """

    runtime: str  # the runner's name once active (runner_name): onnxruntime-cpu, torch-cuda-float32, ...
    precision: str  # of its inputs and weights (a TensorRT engine's kernels: fp32, tf32, fp16)
    stress: bool  # it returns stress
    device: str  # cpu or cuda (not which GPU: any GPU of the same kind continues a run)
    provider: str  # cpu, cuda or tensorrt: the execution provider or device that ran it


def check_io(source, inputs, outputs, gradient: bool, stress: bool) -> None:
    """Refuse a model file whose graph inputs or outputs are not the contract's, naming what differs.

    ``inputs``/``outputs`` are the names the file declares; the contract's
    are :func:`~painn_export.contract.input_names` (``gradient``) and
    :func:`~painn_export.contract.output_names` (``stress``). Checked when a
    file is opened, before any output file exists.
    """
    want_in, want_out = set(input_names(gradient)), set(output_names(stress))
    problems = []
    for what, have, want in (("inputs", set(inputs), want_in), ("outputs", set(outputs), want_out)):
        if missing := sorted(want - have):
            problems.append(f"lacks {what} {missing}")
        if extra := sorted(have - want):
            problems.append(f"has unexpected {what} {extra}")
    if problems:
        raise NotAModelError(
            f"{source}: its graph {' and '.join(problems)}, unlike the model contract; "
            "export the checkpoint again with painn-export"
        )


def is_tensor(value) -> bool:
    """``value`` is a torch tensor (told without importing torch)."""
    return not isinstance(value, np.ndarray) and hasattr(value, "data_ptr")


# What the host's float64 sums read of a feed (SystemReadout.totals).
READOUT_ENTRIES = ("system_index", "natoms", "cell", "atomic_numbers")


def host_entries(feed) -> dict[str, np.ndarray]:
    """The entries the host's sums read (small: per atom or per system), as numpy arrays."""
    return {
        name: feed[name].cpu().numpy() if is_tensor(feed[name]) else feed[name]
        for name in READOUT_ENTRIES
        if name in feed
    }


class Runner(ABC):
    """The runtime-independent half of every runner: activation, the feed check, timing, readout."""

    runtime = "runner"  # one of RUNTIMES
    name = "runner"  # until active: then runner_name(...) of what runs it

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

    @property
    def feed_dtype(self) -> np.dtype:
        """The float dtype its feed is collated in: float64 for a float64 model, else float32.

        Half-precision graphs take float32 positions and shifts (they narrow
        inside, after the edge vectors), so every feed keeps its coordinates'
        digits at least to float32.
        """
        return feed_dtype_of(self.precision)

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
        """Start the runtime; a graph whose inputs or outputs are not the contract's is refused."""
        if not self.active:
            self._activate()
            try:
                gradient = "neighbor_reverse" in self.input_names
                check_io(self.name, self.input_names, self.output_names, gradient, self.has_stress)
            except BaseException:
                self._deactivate()
                raise
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
        on_device = any(is_tensor(v) for v in feed.values())
        if on_device:
            self._check_feed_device(feed)
        start = time.perf_counter()
        try:
            out = self._infer(feed)
        except (BatchTooLargeError, InferenceError):
            raise
        except Exception as exc:  # runtimes have their own types; onnxruntime's are not RuntimeError
            raise classify_runtime_error(exc, self.name) from exc
        self.last_inference_s = time.perf_counter() - start
        return self.readout.totals(out, host_entries(feed) if on_device else feed)

    def free_memory(self) -> None:
        """Give back cached device memory after a failed batch (a no-op where nothing is cached)."""
        return None

    def _inputs(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The graph's inputs from ``feed``, contiguous: floats in :attr:`feed_dtype`, integers int64."""
        dtype = self.feed_dtype
        return {
            name: np.ascontiguousarray(feed[name], dtype=dtype if feed[name].dtype.kind == "f" else np.int64)
            for name in self.input_names
        }

    def _check_feed_device(self, feed) -> None:
        """A tensor feed must be on this runner's device: refused, never copied behind the caller's back."""
        where = {str(v.device) for v in feed.values() if is_tensor(v)}
        want = "cpu" if self.device == "cpu" else self.device
        if where != {want}:
            raise ValueError(f"{self.name}: a tensor feed on {sorted(where)}, the runner on {want}")

    def _tensor_inputs(self, feed) -> dict:
        """The graph's inputs from a tensor ``feed``, contiguous: floats in :attr:`feed_dtype`, else int64."""
        import torch

        dtype = torch.from_numpy(np.empty(0, self.feed_dtype)).dtype
        return {
            name: feed[name].to(dtype if feed[name].is_floating_point() else torch.int64).contiguous()
            for name in self.input_names
        }

    @abstractmethod
    def _activate(self) -> None: ...

    @abstractmethod
    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def _deactivate(self) -> None:
        return None
