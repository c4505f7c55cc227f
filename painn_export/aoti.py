"""AOTInductor: the scatter-free model compiled ahead of time into a ``.pt2`` package.

The same graph as the ONNX export (:mod:`painn_export.export`): the
contract's inputs in order, dynamic atoms, slots and pairs, and for
gradient-force models the joint energy-force(-virial) graph traced with
``make_fx`` first (``torch.export`` cannot capture ``autograd.grad``), so
the backward of every gather stays a gather through the reverse slots.
``torch._inductor.aoti_compile_and_package`` compiles it to C++ (CPU) or
Triton (CUDA); the package runs without the model's Python code.

Every package carries ``painn_export.json`` (the model's metadata, the torch
version, the device and, for CUDA, the GPU's compute capability), read
without loading the compiled code: a package built for another torch or
device is refused in one line (:func:`check_package`), never loaded. Each
compile is checked against the eager model on two batch sizes before the
file is kept (fails closed).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch

from painn_export.batch import collate
from painn_export.contract import STRESS_NEEDS_GRADIENT, input_names
from painn_export.errors import RuntimeUnavailableError
from painn_export.export import (
    ContractModule,
    dynamic_shapes,
    example_inputs,
    graphs_for,
    onnx_metadata,
    trace_gradient_graph,
)
from painn_export.files import durable_replace, temporary_path
from painn_export.model import PaiNN
from painn_export.samples import example_set
from painn_export.tolerances import compare, tolerance

PACKAGE_FACTS = "painn_export.json"  # inside the .pt2 zip, beside AOTInductor's own files

# Inductor settings: its defaults. Freezing, loop ordering after fusion and
# the tiling heuristics were measured and changed nothing beyond the noise
# (docs/benchmarks.md, "AOTInductor").
INDUCTOR_CONFIGS: dict[str, object] = {}


class PackageMismatchError(RuntimeUnavailableError):
    """A ``.pt2`` built for another torch, device or GPU than this process has."""


def _device_facts(device: str) -> dict[str, str]:
    """What a package is tied to: torch, the device kind, and the GPU's sm or the CPU's vector ISA."""
    facts = {"torch_version": torch.__version__, "device": device.split(":")[0]}
    if facts["device"] == "cuda":
        major, minor = torch.cuda.get_device_capability(torch.device(device))
        facts["compute_capability"] = f"{major}.{minor}"
    else:  # the C++ is built for this CPU's vector instructions (AVX2, AVX-512, ...)
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        facts["cpu_vector_isa"] = str(pick_vec_isa()) or "none"
    return facts


def device_tag(device: str) -> str:
    """A short name of what a package for ``device`` is tied to (cache names): ``cuda-sm90``, ``cpu-avx2``."""
    facts = _device_facts(device)
    return f"{facts['device']}-" + (
        f"sm{facts['compute_capability'].replace('.', '')}"
        if "compute_capability" in facts
        else facts["cpu_vector_isa"]
    )


def have_compiler() -> str | None:
    """The C++ compiler AOTInductor will call, or None."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def export_aoti(
    model: PaiNN,
    path: str | Path,
    *,
    device: str = "cpu",
    stress: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Compile ``model`` to an AOTInductor package at ``path`` and check it against eager.

    ``device`` is ``cpu`` or ``cuda[:N]``; ``stress`` adds the per-atom virial
    (gradient-force models). Raises :class:`RuntimeUnavailableError` without a
    C++ compiler (or a GPU for ``cuda``), and ``RuntimeError`` when the
    compiled package disagrees with the eager model (no file is left then).
    """
    if stress and model.config.direct_forces:
        raise ValueError(STRESS_NEEDS_GRADIENT)
    if have_compiler() is None:
        raise RuntimeUnavailableError(
            "AOTInductor needs a C++ compiler and none was found (set CXX, or install g++)"
        )
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeUnavailableError(f"torch {torch.__version__} sees no GPU: cannot compile for {device}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model).to(dtype=dtype, device=device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    names = input_names(model.gradient_forces)
    example = tuple(t.to(device) for t in example_inputs(model, dtype))
    traced = ContractModule(model, stress)
    if model.gradient_forces:
        traced = trace_gradient_graph(model, example, stress)
    with torch.no_grad():
        program = torch.export.export(traced, example, dynamic_shapes=dynamic_shapes(names), strict=False)
    meta = {**onnx_metadata(model, dtype, stress), "painn_export.runtime": "aoti"}
    facts = {"metadata": meta, **_device_facts(device)}
    tmp = temporary_path(path, ".tmp.pt2")  # AOTInductor wants the suffix
    try:
        torch._inductor.aoti_compile_and_package(
            program, package_path=str(tmp), inductor_configs=dict(INDUCTOR_CONFIGS)
        )
        with zipfile.ZipFile(tmp, "a") as archive:
            archive.writestr(PACKAGE_FACTS, json.dumps(facts, indent=1))
        _check_against_eager(model, tmp, device, stress)
        durable_replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_package_facts(path: str | Path) -> dict:
    """What a ``.pt2`` says of itself (no compiled code is loaded); a foreign file is a ValueError."""
    try:
        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read(PACKAGE_FACTS))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise ValueError(
            f"{path}: not a painn-export AOTInductor package (no {PACKAGE_FACTS}); "
            "compile the checkpoint with painn-export aoti"
        ) from exc


def check_package(facts: dict, device: str, source: str | Path) -> None:
    """Refuse a package built for another torch, device kind or GPU than ``device`` here."""
    here = _device_facts(device)
    problems = [
        f"{key} {facts.get(key)} (this process has {value})"
        for key, value in here.items()
        if facts.get(key) != value
    ]
    if problems:
        raise PackageMismatchError(
            f"{source} was compiled for " + " and ".join(problems) + "; compile it again here with "
            "painn-export aoti (or --runtime aoti on the checkpoint)"
        )


def load_package(path: str | Path, device: str):
    """The compiled model of ``path`` for ``device`` after :func:`check_package`."""
    facts = read_package_facts(path)
    check_package(facts, device, path)
    index = int(device.split(":")[1]) if ":" in device else (0 if device.startswith("cuda") else -1)
    with _quiet():
        return torch._inductor.aoti_load_package(str(path), device_index=index), facts


@contextlib.contextmanager
def _quiet():
    import logging

    logger = logging.getLogger("torch._inductor")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _check_against_eager(model: PaiNN, package: Path, device: str, stress: bool) -> None:
    """Run the compiled package and the eager model on two batches; raise if they disagree."""
    from painn_export.contract import output_names

    compiled, _ = load_package(package, device)
    precision = str(next(model.parameters()).dtype).removeprefix("torch.")
    kind = "aoti_vs_torch"
    for sizes in ((5, 9), (30,)):
        samples = example_set(seed=1, num_elements=model.config.num_elements, sizes=sizes)
        feed = collate(graphs_for(model, samples), np.float64 if precision == "float64" else np.float32)
        want = model.per_atom(feed, virial=stress)
        inputs = [torch.from_numpy(feed[n]).to(device) for n in input_names(model.gradient_forces)]
        got = dict(zip(output_names(stress), (t.detach().cpu().numpy() for t in compiled(*inputs))))
        for name in got:
            quantity = "energy" if name == "atom_energy" else "forces"  # virials: as forces, per atom
            result = compare(name, got[name], want[name], tolerance(kind, precision, quantity))
            if not result.passed:
                raise RuntimeError(
                    f"the compiled package disagrees with the eager model: {result.describe()}"
                )
