"""Parity between runtimes: every runtime against PyTorch float64 as truth, and against itself.

Energies are compared per atom (eV/atom), forces per component (eV/Å),
against :mod:`painn_export.tolerances`. Each runtime also runs the same feed
a second time, and any difference between its two answers is reported as
non-determinism (quantity ``repeat:<name>``, tolerance zero): a racy sum
passes a single comparison against truth now and then, never this one. A
failure names the structure.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from painn_export.batch import collate
from painn_export.export import graphs_for
from painn_export.model import PaiNN
from painn_export.runners import Runner, TorchRunner
from painn_export.tolerances import Comparison, compare, tolerance


@dataclass(frozen=True)
class ParityRow:
    runtime: str
    precision: str
    comparison: Comparison
    worst_structure: str

    def as_dict(self) -> dict:
        c = self.comparison
        return {
            "runtime": self.runtime,
            "precision": self.precision,
            "quantity": c.quantity,
            "max_abs": c.max_abs,
            "p99_abs": c.p99_abs,
            "max_rel": c.max_rel,
            "atol": c.tolerance.atol,
            "rtol": c.tolerance.rtol,
            "passed": c.passed,
            "worst_structure": self.worst_structure,
        }


def _comparison_kind(runner: Runner) -> str:
    if runner.name.startswith("onnxruntime"):
        return "onnxruntime_vs_torch"
    if runner.name.startswith("tensorrt"):
        return "tensorrt_vs_torch"
    if runner.name.startswith("aoti"):
        return "aoti_vs_torch"
    return "torch_vs_torch"


def run_parity(model: PaiNN, runners: list[tuple[Runner, str]], samples, repeats: int = 2) -> list[ParityRow]:
    """Run each ``(runner, precision)`` on ``samples`` and compare with float64 PyTorch.

    Energies per atom, forces per component, and the stress when the runner
    returns one (eV/Å^3, NaN on both sides for cells without volume). Each
    runner evaluates the feed ``repeats`` times; later runs must equal the
    first bit for bit.
    """
    truth_model = copy.deepcopy(model).to(torch.float64)
    graphs = graphs_for(truth_model, samples)
    feed = collate(graphs, np.float64)
    natoms = feed["natoms"].astype(np.float64)
    with TorchRunner(truth_model, dtype="float64", stress=truth_model.gradient_forces) as truth:
        expected = truth.infer(feed)
    names = [s.name for s in samples]
    system_of_atom = feed["system_index"]

    def worst(quantity: str, index: int) -> str:
        if index < 0:
            return "-"
        if quantity.endswith("forces"):
            return names[system_of_atom[index // 3]]
        return names[index // 9] if quantity.endswith("stress") else names[index]

    rows = []
    for runner, precision in runners:
        with runner:
            runs = [runner.infer(feed) for _ in range(max(1, repeats))]
        got = runs[0]
        kind = _comparison_kind(runner)
        comparisons = [
            compare(
                "energy_per_atom",
                got["energy"] / natoms,
                expected["energy"] / natoms,
                tolerance(kind, precision, "energy"),
            ),
            compare("forces", got["forces"], expected["forces"], tolerance(kind, precision, "forces")),
        ]
        if "stress" in got:
            comparisons.append(
                compare("stress", got["stress"], expected["stress"], tolerance(kind, precision, "stress"))
            )
        for again in runs[1:]:
            for quantity in got:
                comparisons.append(
                    compare(
                        f"repeat:{quantity}",
                        again[quantity],
                        got[quantity],
                        tolerance("repeat", "any", quantity),
                    )
                )
        rows += [
            ParityRow(runner.name, precision, c, worst(c.quantity, c.worst_index if c.max_abs > 0 else -1))
            for c in comparisons
        ]
    return rows


def nondeterministic(rows: list[ParityRow]) -> list[ParityRow]:
    """The rows that show a runtime giving two answers to one input."""
    return [r for r in rows if r.comparison.quantity.startswith("repeat:") and not r.comparison.passed]


def format_table(rows: list[ParityRow]) -> str:
    header = (
        f"{'runtime':<22}{'precision':<10}{'quantity':<17}"
        f"{'max abs':>11}{'p99 abs':>11}{'max rel':>11}  result  worst"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        c = r.comparison
        lines.append(
            f"{r.runtime:<22}{r.precision:<10}{c.quantity:<17}{c.max_abs:>11.2e}{c.p99_abs:>11.2e}{c.max_rel:>11.2e}"
            f"  {'ok' if c.passed else 'FAIL':<6}  {r.worst_structure}"
        )
    return "\n".join(lines)
