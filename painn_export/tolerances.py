"""The one table of numerical tolerances, each with its reason.

Keys are ``(comparison, dtype)``. Energies are compared per atom (eV/atom) so
that one tolerance fits systems of any size, except where an entry's reason
says "per structure" (``other_batch``); forces per component (eV/Å).
A value passes when ``|a - b| <= atol + rtol * |b|`` elementwise, ``b`` being
the reference side, or when both are NaN (a stress undefined on both sides).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    reason: str


TOLERANCES: dict[tuple[str, str], dict[str, Tolerance]] = {
    # Same equations, different summation order (index_add vs torch_scatter):
    # only rounding differs, ~1e-16 per op accumulated over 6 layers.
    ("scatter_free_vs_reference", "float64"): {
        "energy": Tolerance(1e-12, 1e-10, "float64 rounding from a different summation order"),
        "forces": Tolerance(1e-12, 1e-10, "float64 rounding from a different summation order"),
    },
    ("scatter_free_vs_reference", "float32"): {
        "energy": Tolerance(1e-6, 1e-5, "float32 rounding (eps 1.2e-7) through ~30 layers of sums"),
        "forces": Tolerance(1e-6, 1e-5, "float32 rounding (eps 1.2e-7) through ~30 layers of sums"),
    },
    # Gradient forces go through the forward and the backward pass: twice the
    # depth of rounding, and the derivative of float32 sums amplifies it.
    ("scatter_free_vs_reference_gradient", "float64"): {
        "energy": Tolerance(1e-12, 1e-10, "float64 rounding from a different summation order"),
        "forces": Tolerance(1e-11, 1e-10, "float64 rounding through forward and backward pass"),
    },
    ("scatter_free_vs_reference_gradient", "float32"): {
        "energy": Tolerance(1e-6, 1e-5, "float32 rounding (eps 1.2e-7) through ~30 layers of sums"),
        "forces": Tolerance(2e-5, 1e-4, "float32 rounding through forward and backward (~60 layers)"),
    },
    # Physics invariances of one model in one dtype: rotating/permuting the
    # input reorders sums and rotates vectors, so rounding only.
    ("invariance", "float64"): {
        "energy": Tolerance(1e-10, 1e-10, "float64 rounding after rotation/permutation"),
        "forces": Tolerance(1e-10, 1e-10, "float64 rounding after rotation/permutation"),
    },
    # ONNX Runtime vs PyTorch float64 truth. ORT fuses ops (LayerNorm, Gemm)
    # and reorders reductions; in float32 its error is float32 rounding
    # amplified by the network's depth.
    ("onnxruntime_vs_torch", "float32"): {
        "energy": Tolerance(2e-5, 1e-4, "float32 kernels vs float64 truth; fused LayerNorm/Gemm"),
        "forces": Tolerance(1e-4, 1e-3, "float32 kernels vs float64 truth; forces are small differences"),
        "stress": Tolerance(1e-5, 1e-3, "float32 backward pass; eV/Å^3 values are ~1e-2 or less"),
    },
    # A float16 export (painn_export.export.ReducedPrecisionPaiNN: network in float16, geometry,
    # inputs and outputs in float32) on ONNX Runtime vs float64 truth. float16 keeps 11 significant
    # bits (rounding 4.9e-4 relative per op) through ~30 layers; atomic energies of ~15 eV then
    # carry a few 1e-3 eV. ORT's CPU provider runs the ops it has no float16 kernel for in float32
    # between casts it inserts; the bounds also hold the same network in eager PyTorch with every
    # op rounded to float16. Measured on the test models (SMALL, GRADIENT; example_set with 256
    # atoms of bulk), max abs: ORT 1.32 CPU energy 2.6e-3 eV/atom, forces 1.0e-2 eV/Å, stress
    # 4.6e-4 eV/Å^3; eager float16 2.5e-3, 2.1e-2, 1.2e-3. Totals stay exact to 1e-4 relative:
    # the host sums in float64 (tests/test_precision.py).
    ("onnxruntime_vs_torch", "float16"): {
        "energy": Tolerance(1e-2, 1e-2, "float16 network (11-bit significand) vs float64 truth"),
        "forces": Tolerance(5e-2, 2e-2, "float16 network; forces of ~20 eV/Å keep ~1e-2 eV/Å"),
        "stress": Tolerance(2e-3, 2e-2, "float16 network's backward; virials summed in float64"),
    },
    # bfloat16 keeps 8 significant bits (rounding 3.9e-3 relative per op): 8x float16's. ORT's
    # CPU provider has no bfloat16 Gemm (it cannot run such a graph); the bounds are those of the
    # same network in eager PyTorch on the CPU (ReducedPrecisionPaiNN in bfloat16, max abs on the
    # test models: energy 4.0e-2 eV/atom, forces 0.86 eV/Å, stress 2.5e-3 eV/Å^3), for ORT's CUDA
    # provider. Not yet checked on a GPU.
    ("onnxruntime_vs_torch", "bfloat16"): {
        "energy": Tolerance(2e-1, 5e-2, "bfloat16 network (8-bit significand) vs float64 truth"),
        "forces": Tolerance(1.0, 1e-1, "bfloat16 network (8-bit significand) vs float64 truth"),
        "stress": Tolerance(2e-2, 1e-1, "bfloat16 network's backward (8-bit significand)"),
    },
    # painn-batch run/relax on a float64 model (a float64 export, or eager PyTorch in float64)
    # against that model called directly: the pipeline feeds it float64, so only the runtime's
    # own float64 rounding (fused ops, another batch) separates them. Fed float32 it was 4e-6 eV.
    ("pipeline", "float64"): {
        "energy": Tolerance(1e-10, 1e-10, "float64 feed; fused float64 kernels reorder sums"),
        "forces": Tolerance(1e-10, 1e-10, "float64 feed; fused float64 kernels reorder sums"),
    },
    ("onnxruntime_vs_torch", "float64"): {
        "energy": Tolerance(1e-9, 1e-9, "float64 kernels; fused ops reorder sums"),
        "forces": Tolerance(1e-9, 1e-9, "float64 kernels; fused ops reorder sums"),
        "stress": Tolerance(1e-11, 1e-9, "float64 kernels; fused ops reorder sums"),
    },
    # AOTInductor against PyTorch float64 truth: compiled kernels fuse the
    # gathers, products and sums and reorder them (vectorised reductions).
    ("aoti_vs_torch", "float32"): {
        "energy": Tolerance(2e-5, 1e-4, "float32 fused kernels vs float64 truth"),
        "forces": Tolerance(1e-4, 1e-3, "float32 fused kernels vs float64 truth"),
        "stress": Tolerance(1e-5, 1e-3, "float32 fused backward vs float64 truth"),
    },
    ("aoti_vs_torch", "float64"): {
        "energy": Tolerance(1e-9, 1e-9, "float64 fused kernels; reordered sums"),
        "forces": Tolerance(1e-9, 1e-9, "float64 fused kernels; reordered sums"),
        "stress": Tolerance(1e-11, 1e-9, "float64 fused kernels; reordered sums"),
    },
    ("torch_vs_torch", "float64"): {
        "energy": Tolerance(1e-10, 1e-10, "float64 on another device: different reduction order"),
        "forces": Tolerance(1e-10, 1e-10, "float64 on another device: different reduction order"),
        "stress": Tolerance(1e-12, 1e-10, "float64 on another device: different reduction order"),
    },
    ("torch_vs_torch", "float32"): {
        "energy": Tolerance(2e-5, 1e-4, "float32 eager vs float64 truth"),
        "forces": Tolerance(1e-4, 1e-3, "float32 eager vs float64 truth"),
        "stress": Tolerance(1e-5, 1e-3, "float32 eager vs float64 truth"),
    },
    # The same model and runtime on the same structure in another batch (other
    # neighbours in the batch, another slot count, another worker or node):
    # the kernels block the work differently, so float32 rounding only.
    # Energies are per structure (eV), summed by the host in float64.
    ("other_batch", "float32"): {
        "energy": Tolerance(1e-5, 1e-6, "float32 atomic energies in another kernel blocking"),
        "forces": Tolerance(1e-6, 1e-5, "float32 kernels in another blocking"),
        "stress": Tolerance(1e-8, 1e-5, "float32 kernels in another blocking"),
    },
    ("other_batch", "float64"): {
        "energy": Tolerance(1e-12, 1e-12, "float64 sums over another slot count: reordered"),
        "forces": Tolerance(1e-12, 1e-11, "float64 sums over another slot count: reordered"),
        "stress": Tolerance(1e-13, 1e-11, "float64 sums over another slot count: reordered"),
    },
    # The same structure translated far from the origin (1e4 Å): collate
    # centres it in float64, so only the ~1e-12 Å of float64 rounding there
    # and then float32 rounding of the centred coordinates differ.
    ("far_from_origin", "float32"): {
        "energy": Tolerance(1e-5, 1e-5, "float32 rounding of centred coordinates"),
        "forces": Tolerance(1e-5, 1e-4, "float32 rounding of centred coordinates"),
    },
    # The same runtime, input and thread count, run twice: every sum has one
    # fixed order (no scatter, no atomics), so the outputs must be identical.
    # A difference here is non-determinism, never rounding.
    ("repeat", "any"): {
        q: Tolerance(0.0, 0.0, "bitwise: same runtime, same input, same threads")
        for q in ("energy", "forces", "stress")
    },
    # Batched FIRE (pipelines.fire) against ase.optimize.FIRE fed the same
    # forces: the same arithmetic in the same order, scipy's expm/logm called
    # alike with the cell, so equal up to a last-bit difference in BLAS.
    ("fire_vs_ase", "float64"): {
        q: Tolerance(1e-12, 0.0, "same forces, same arithmetic in the same order")
        for q in ("positions", "cell")
    },
    # painn-batch relax against ASE FIRE with this package's calculator, same
    # float64 runtime: the batch holds other structures (another slot count,
    # another blocking), so forces differ by float64 rounding (~1e-15), which
    # FIRE carries over up to a few hundred steps.
    ("relax_vs_ase", "float64"): {
        "positions": Tolerance(1e-8, 0.0, "float64 rounding of batched forces, carried by FIRE"),
        "cell": Tolerance(1e-8, 0.0, "float64 rounding of batched stress, carried by FIRE"),
        "energy": Tolerance(1e-9, 0.0, "float64 rounding of batched forces, carried by FIRE (eV/atom)"),
    },
    ("relax_vs_ase", "float32"): {
        "positions": Tolerance(
            1e-5, 0.0, "float32 forces in another batch (~1e-6 relative), over a few steps"
        ),
        "cell": Tolerance(1e-5, 0.0, "float32 stress in another batch (~1e-6 relative), over a few steps"),
    },
    # Analytic derivatives against central differences of the float64 energy
    # with step h = 1e-4 (Å, or strain): truncation O(h^2 d3E) ~ 1e-8 plus
    # rounding eps*E/h ~ 1e-12 E.
    ("finite_difference", "float64"): {
        "forces": Tolerance(1e-6, 1e-5, "central difference, h = 1e-4 Å"),
        "stress": Tolerance(1e-7, 1e-5, "central difference, strain h = 1e-4, divided by volume"),
    },
    # TensorRT: tf32 matmuls keep 10 mantissa bits; fp16 keeps 10 bits with a
    # narrow exponent range: both need loose bounds by construction.
    ("tensorrt_vs_torch", "float32"): {
        "energy": Tolerance(1e-4, 1e-3, "fp32 kernels chosen by the builder; different reduction order"),
        "forces": Tolerance(5e-4, 5e-3, "fp32 kernels chosen by the builder; different reduction order"),
    },
    ("tensorrt_vs_torch", "tf32"): {
        "energy": Tolerance(5e-3, 5e-3, "tf32 matmuls round inputs to 10 mantissa bits"),
        "forces": Tolerance(2e-2, 2e-2, "tf32 matmuls round inputs to 10 mantissa bits"),
    },
    ("tensorrt_vs_torch", "fp16"): {
        "energy": Tolerance(5e-2, 5e-2, "fp16 storage and math: 10 mantissa bits, 5 exponent bits"),
        "forces": Tolerance(1e-1, 1e-1, "fp16 storage and math: 10 mantissa bits, 5 exponent bits"),
    },
    # An engine of a bfloat16 export (strongly typed: TensorRT 11, or 10 with a bfloat16 file):
    # the bounds of the same network in PyTorch eager bfloat16 (see onnxruntime_vs_torch, bfloat16).
    # Not yet checked on a GPU.
    ("tensorrt_vs_torch", "bf16"): {
        "energy": Tolerance(2e-1, 5e-2, "bf16 network (8-bit significand) vs float64 truth"),
        "forces": Tolerance(1.0, 1e-1, "bf16 network (8-bit significand) vs float64 truth"),
        "stress": Tolerance(2e-2, 1e-1, "bf16 network's backward (8-bit significand)"),
    },
}


def tolerance(comparison: str, dtype: str, quantity: str) -> Tolerance:
    try:
        return TOLERANCES[(comparison, dtype)][quantity]
    except KeyError:
        raise KeyError(f"no tolerance for {comparison!r}, {dtype!r}, {quantity!r}") from None


@dataclass(frozen=True)
class Comparison:
    """Errors of ``actual`` against ``reference`` for one quantity."""

    quantity: str
    max_abs: float
    p99_abs: float
    max_rel: float
    worst_index: int  # flat index of the largest violation ratio
    passed: bool
    tolerance: Tolerance

    def describe(self) -> str:
        status = "ok" if self.passed else "FAIL"
        return (
            f"{self.quantity}: max abs {self.max_abs:.3e}, p99 abs {self.p99_abs:.3e}, "
            f"max rel {self.max_rel:.3e} (atol {self.tolerance.atol:g}, rtol {self.tolerance.rtol:g}) "
            f"worst at flat index {self.worst_index}: {status}"
        )


def compare(quantity: str, actual, reference, tol: Tolerance) -> Comparison:
    """Elementwise ``|a - b| <= atol + rtol |b|`` with a report of the actual errors."""
    a = np.asarray(actual, dtype=np.float64).ravel()
    b = np.asarray(reference, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"{quantity}: shapes differ, {a.shape} vs {b.shape}")
    if a.size == 0:
        return Comparison(quantity, 0.0, 0.0, 0.0, -1, True, tol)
    both_nan = np.isnan(a) & np.isnan(b)  # undefined on both sides (stress without a volume)
    a, b = np.where(both_nan, 0.0, a), np.where(both_nan, 0.0, b)
    err = np.abs(a - b)
    bound = tol.atol + tol.rtol * np.abs(b)
    # A zero bound (bitwise comparisons) passes only exact equality.
    ratio = np.divide(err, bound, out=np.where(err == 0, 0.0, np.inf), where=(bound > 0) & np.isfinite(err))
    rel = err / np.maximum(np.abs(b), np.finfo(np.float64).tiny)
    return Comparison(
        quantity=quantity,
        max_abs=float(np.max(err)),
        p99_abs=float(np.percentile(err, 99)),
        max_rel=float(np.max(rel)),
        worst_index=int(np.argmax(ratio)),
        passed=bool(np.all(ratio <= 1.0)),
        tolerance=tol,
    )
