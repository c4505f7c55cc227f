"""``painn-export parity --report DIR``: the runtime comparison as a standalone page.

Per quantity, the distribution over structures of each runtime's largest
difference from PyTorch float64 (:attr:`~painn_export.parity.ParityRow.per_structure`),
the table of every comparison with its tolerance, and the structures that
differ most. The folder is written as :mod:`painn_export.plots` writes every
report (``index.html``, PNGs, ``report.json``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from painn_export.parity import ParityRow, nondeterministic
from painn_export.plots import Number, Page, Series, histogram, number, report_folder, write_page

UNITS = {"energy_per_atom": "eV/atom", "forces": "eV/Å", "stress": "eV/Å³"}
WORST = 10  # structures listed per runtime and quantity


def write_parity_report(rows: list[ParityRow], names: list[str], folder: str | Path) -> Path:
    """Write the report of ``rows`` (from :func:`~painn_export.parity.run_parity` on structures
    named ``names``) into ``folder``; returns the path of ``index.html``."""
    page = Page("painn-export parity: runtimes against PyTorch float64")
    data: dict = {"structures": len(names), "rows": [], "worst": []}
    racy = sorted({r.runtime for r in nondeterministic(rows)})
    failed = [r for r in rows if not r.comparison.passed]
    if racy:
        page.notice(f"Non-deterministic: {', '.join(racy)} gave two answers to one input.")
    if failed:
        page.notice(f"{len(failed)} comparison(s) beyond tolerance (FAIL in the table).")
    page.text(
        f"{len(names)} structures. Each runtime ran them twice; 'repeat:' rows compare its second answer "
        "with its first (tolerance zero)."
    )
    page.heading("Every comparison")
    page.table(
        [
            "runtime",
            "precision",
            "quantity",
            "max abs",
            "p99 abs",
            "max rel",
            "atol",
            "rtol",
            "result",
            "worst",
        ],
        [
            [
                r.runtime,
                r.precision,
                r.comparison.quantity,
                number(r.comparison.max_abs),
                number(r.comparison.p99_abs),
                number(r.comparison.max_rel),
                r.comparison.tolerance.atol,
                r.comparison.tolerance.rtol,
                "ok" if r.comparison.passed else "FAIL",
                r.worst_structure,
            ]
            for r in rows
        ],
    )
    data["rows"] = [{**r.as_dict(), "per_structure": r.per_structure} for r in rows]
    with report_folder(folder) as tmp:
        figures = []
        for quantity, unit in UNITS.items():
            chosen = [r for r in rows if r.comparison.quantity == quantity and r.per_structure is not None]
            if chosen:
                figures.append(_differences(Path(tmp), quantity, unit, chosen))
        page.heading("Differences per structure")
        page.figures(figures)
        data["figures"] = [f.as_dict() for f in figures]
        for r in rows:
            if r.per_structure is None or r.comparison.quantity.startswith("repeat:"):
                continue
            unit = UNITS.get(r.comparison.quantity, "")
            order = np.argsort(-r.per_structure, kind="stable")[:WORST]
            worst = [{"structure": names[s], "max_abs": float(r.per_structure[s])} for s in order]
            data["worst"].append(
                {
                    "runtime": r.runtime,
                    "precision": r.precision,
                    "quantity": r.comparison.quantity,
                    "structures": worst,
                }
            )
            page.heading(
                f"{r.runtime} ({r.precision}), {r.comparison.quantity}: the structures that differ most"
            )
            page.table(
                ["structure", f"largest |difference| ({unit})"],
                [[w["structure"], number(w["max_abs"])] for w in worst],
            )
        write_page(Path(tmp), page, data)
    return Path(folder) / "index.html"


def _differences(folder: Path, quantity: str, unit: str, rows: list[ParityRow]):
    """Histogram (log x) of each runtime's per-structure largest difference; exact zeros counted apart."""
    positive = np.concatenate([r.per_structure[r.per_structure > 0] for r in rows])
    lo, hi = (positive.min(), positive.max()) if positive.size else (1e-12, 1e-11)
    edges = np.logspace(np.log10(lo) - 0.1, np.log10(hi) + 0.1, 61)
    series, numbers = [], []
    for r in rows:
        label = f"{r.runtime} {r.precision}"
        series.append(Series(label, np.histogram(r.per_structure[r.per_structure > 0], edges)[0], edges))
        numbers.append(Number(f"{label} max", r.comparison.max_abs, unit))
        zeros = int(np.count_nonzero(r.per_structure == 0))
        if zeros:
            numbers.append(Number(f"{label} exactly equal (structures)", zeros))
    return histogram(
        folder,
        f"parity_{quantity}",
        f"{quantity}: largest |difference| per structure",
        series,
        f"|runtime - PyTorch float64| ({unit})",
        numbers,
        log_x=True,
        log_count=False,
        caption="Over the structures, each runtime's largest difference from PyTorch float64.",
    )
