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
from dataclasses import dataclass, field

import numpy as np
import torch

from painn_export.batch import collate
from painn_export.export import graphs_for
from painn_export.model import PaiNN
from painn_export.runners import RUNTIMES, Runner, TorchRunner
from painn_export.tolerances import Comparison, compare, tolerance


@dataclass(frozen=True)
class ParityRow:
    runtime: str
    precision: str
    comparison: Comparison
    worst_structure: str
    # [n_structures] largest |difference| of each structure (for reports); not part of the row's value
    per_structure: np.ndarray | None = field(default=None, compare=False, repr=False)

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
    """The tolerance table's row for ``runner`` against PyTorch: ``<runtime>_vs_torch``.

    A runner of the caller's own (a wrapper, a test double) that names no runtime of
    :data:`~painn_export.runners.RUNTIMES` is held to PyTorch's own bounds.
    """
    runtime = getattr(runner, "runtime", "")
    return f"{runtime if runtime in RUNTIMES else 'torch'}_vs_torch"


def run_parity(
    model: PaiNN, runners: list[tuple[Runner, str]], samples, repeats: int = 2, graphs: str = "host"
) -> list[ParityRow]:
    """Run each ``(runner, precision)`` on ``samples`` and compare with float64 PyTorch.

    Energies per atom, forces per component, and the stress when the runner
    returns one (eV/Å^3, NaN on both sides for cells without volume). Each
    runner evaluates the feed ``repeats`` times; later runs must equal the
    first bit for bit. ``graphs``: where each runner's feed is built
    (``host``; ``device``: on the runner's device, by
    :mod:`painn_export.device_graphs`; ``auto``: device for a runner on a
    GPU); the truth is always fed the host's graphs.
    """
    truth_model = copy.deepcopy(model).to(torch.float64)
    feed = collate(graphs_for(truth_model, samples), np.float64)
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
            fed = _feed_on(runner, graphs, samples, truth_model.config, feed)
            runs = [runner.infer(fed) for _ in range(max(1, repeats))]
        got = runs[0]
        kind = _comparison_kind(runner)
        checks = [
            ("energy_per_atom", got["energy"] / natoms, expected["energy"] / natoms, "energy"),
            ("forces", got["forces"], expected["forces"], "forces"),
        ]
        if "stress" in got:
            checks.append(("stress", got["stress"], expected["stress"], "stress"))
        tols = [tolerance(kind, precision, q) for *_, q in checks]
        for again in runs[1:]:
            checks += [(f"repeat:{q}", again[q], got[q], q) for q in got]
            tols += [tolerance("repeat", "any", q) for q in got]
        for (quantity, actual, reference, _), tol in zip(checks, tols):
            c = compare(quantity, actual, reference, tol)
            atoms = system_of_atom if quantity.endswith("forces") else None
            per = _per_structure(actual, reference, len(names), atoms)
            rows.append(
                ParityRow(
                    runner.name, precision, c, worst(quantity, c.worst_index if c.max_abs > 0 else -1), per
                )
            )
    return rows


def _feed_on(runner: Runner, graphs: str, samples, config, host_feed: dict) -> dict:
    """The float64 feed of ``samples`` for an active ``runner``: built on its device where ``graphs`` asks."""
    from painn_export.graphs_where import graphs_on_device

    if not graphs_on_device(graphs, runner.device):
        return host_feed
    from painn_export.device_graphs import structures_feed

    return structures_feed(
        samples, cutoff=config.cutoff, max_neighbors=config.max_neighbors, device=runner.device,
        dtype=torch.float64,
    )  # fmt: skip


def _per_structure(actual, reference, n_structures: int, system_of_atom: np.ndarray | None) -> np.ndarray:
    """``[n_structures]``: the largest |actual - reference| of each structure; NaN on both sides
    counts as equal, as in :func:`~painn_export.tolerances.compare`.

    Rows are structures (energy ``[n]``, stress ``[n, 3, 3]``), or atoms of
    the structures ``system_of_atom`` gives (forces ``[n_atoms, 3]``).
    """
    a = np.asarray(actual, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    err = np.where(np.isnan(a) & np.isnan(b), 0.0, np.abs(a - b)).reshape(len(a), -1).max(axis=1)
    if system_of_atom is None:
        return err
    per = np.zeros(n_structures)
    np.maximum.at(per, system_of_atom, err)
    return per


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
