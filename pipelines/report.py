"""``painn-batch report``: what a ``run`` or ``relax`` output holds, as a page a person can read.

:func:`write_report` writes a folder (:mod:`painn_export.plots`):
``index.html``, which stands alone (no network; images by file name), one
PNG per figure, and ``report.json`` with every number the page shows.

- Every output: statuses with counts, their meaning (:data:`STATUS_MEANING`)
  and the command that lists each group's structures; what ran (the
  fingerprint); a partial output (``.partial.h5``) is reported as far as it
  is done, and the page says so.
- A run, with ``--input``: distributions of energy per atom, of the largest
  force per structure and of the stress; with reference labels in the
  input, parity and error histograms of energy per atom and force
  components (MAE as ``painn-batch run --json`` computes it, one function),
  force MAE per element, and the worst structures with a ready
  ``painn-batch export`` command.
- A relaxation: steps, the final largest force on a free atom, relaxed
  against reference energies (``relaxed_energy`` in the input), and with
  ``--trajectory-every`` energy and largest force along the steps (:mod:`pipelines.report_relax`).

Without ``--input`` (the file the output was computed from: its hash is
checked) only what needs no atom counts is shown, and the page says what
``--input`` would add. Memory: see :mod:`pipelines.report_data`.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np

from painn_export.plots import (
    Figure,
    Number,
    Page,
    Points,
    ReportError,
    Series,
    bars,
    element,
    histogram,
    number,
    parity,
    report_folder,
    write_page,
)
from pipelines.output import STATUS_MEANING, SUCCESS
from pipelines.report_data import (
    BINS_1D,
    Output,
    RunScan,
    check_input,
    cloud,
    edges,
    force_clouds,
    open_output,
    scan_run,
    summary_mae,
)

__all__ = ["DEFAULT_MAX_POINTS", "STATUS_MEANING", "ReportError", "list_ids", "write_report"]

DEFAULT_MAX_POINTS = 100_000  # points in a scatter plot; past that, a 2-D histogram
WORST = 20  # structures in each "worst" table


def default_folder(output: str | Path) -> Path:
    """``OUT.h5`` -> ``OUT.report``."""
    output = Path(output)
    return output.with_name(output.name.removesuffix(".h5") + ".report")


def _command(*words) -> str:
    return " ".join(shlex.quote(str(w)) for w in words)


def list_ids(output: str | Path, status: str, input_path: str | Path | None = None):
    """``(index, id, message)`` of each structure of ``output`` with ``status`` (ids need ``input_path``)."""
    out = open_output(output)
    try:
        if status not in out.codes:
            raise ReportError(f"no status {status!r} in {output}: one of {', '.join(out.codes)}")
        reader = check_input(out, input_path) if input_path else None
        indices = np.flatnonzero(out.status == out.codes[status])
        try:
            for s in indices.tolist():
                name = reader.ids(s, s + 1)[0] if reader else f"structure {s}"
                message = out.fh["message"][s].decode("utf-8", "replace") if "message" in out.fh else ""
                yield s, name, message
        finally:
            if reader:
                reader.close()
    finally:
        out.close()


def write_report(
    output: str | Path,
    input_path: str | Path | None = None,
    folder: str | Path | None = None,
    *,
    max_points: int = DEFAULT_MAX_POINTS,
) -> Path:
    """Write the report of ``output`` (a ``run`` or ``relax`` output, or its ``.partial.h5``).

    ``input_path``: the file the output was computed from (refused if its
    hash differs from the output's fingerprint). ``folder``: default
    ``OUT.report`` beside the output; an earlier report there is replaced.
    Returns the path of ``index.html``. Raises :class:`ReportError` (one
    line) for a file that is not a painn-batch output, a mismatched input or
    a folder that cannot be written.
    """
    out = open_output(output)
    try:
        reader = check_input(out, input_path) if input_path else None
        try:
            with report_folder(folder or default_folder(output)) as tmp:
                report = _Report(out, reader, Path(tmp), max_points)
                report.build()
                write_page(Path(tmp), report.page, report.data)
        finally:
            if reader:
                reader.close()
    finally:
        out.close()
    return Path(folder or default_folder(output)) / "index.html"


class _Report:
    """The page, report.json and figures of one output, built section by section."""

    def __init__(self, out: Output, reader, folder: Path, max_points: int) -> None:
        self.out, self.reader, self.folder, self.max_points = out, reader, folder, max_points
        self.page = Page(f"painn-batch {out.kind}: {out.path.name}")
        self.figures: list[Figure] = []
        self.data: dict = {
            "kind": out.kind,
            "output": str(out.path),
            "input": str(reader.path) if reader else None,
            "n_structures": out.n_structures,
            "done": out.n_structures - out.pending,
            "partial": bool(out.pending) or out.path.name.endswith(".partial.h5"),
            "fingerprint": out.fingerprint,
        }

    # -- helpers --------------------------------------------------------------------------------

    def show(self, *figures: Figure) -> None:
        self.figures += figures
        self.page.figures(list(figures))

    def _export(self, indices: list[int], name: str) -> str:
        return _command(
            "painn-batch",
            "export",
            self.out.path.resolve(),
            "--input",
            self.reader.path.resolve(),
            "--index",
            ",".join(map(str, indices)),
            "-o",
            name,
        )

    # -- sections -------------------------------------------------------------------------------

    def build(self) -> None:
        out = self.out
        if self.data["partial"]:
            self.page.notice(
                f"Partial output: {self.data['done']} of {out.n_structures} structures are done "
                f"({out.pending} pending). This report shows what is done; finish the run with "
                "the same command and --resume, then report on the finished file."
            )
        self._what_ran()
        self._statuses()
        if self.reader is None:
            self.page.notice(
                "No --input given: the per-atom energies, largest forces per structure, errors against "
                "reference labels and structure ids need the input file this output was computed from."
            )
        if out.kind == "run":
            self._run()
        else:
            from pipelines.report_relax import relax_sections

            relax_sections(self)
        self.data["figures"] = [f.as_dict() for f in self.figures]
        from painn_export.version import __version__

        self.page.text(f"Made by painn-export {__version__}; every number on this page is in report.json.")

    def _what_ran(self) -> None:
        fp = self.out.fingerprint
        self.page.heading("What ran")
        keys = [
            ("model SHA-256", "model_sha256"),
            ("runtime", "runtime"),
            ("device", "device"),
            ("provider", "provider"),
            ("precision", "precision"),
            ("stress", "stress"),
            ("painn-export version", "package_version"),
            ("input SHA-256", "input_sha256"),
            ("structures", "n_structures"),
            ("atoms", "n_atoms"),
            ("fmax (eV/Å)", "fmax"),
            ("most steps", "max_steps"),
            ("cell relaxed", "relax_cell"),
            ("optimiser", "optimizer"),
            ("trajectory every", "trajectory_every"),
        ]
        rows = [[label, fp[k]] for label, k in keys if k in fp]
        rows.append(["throughput", "not recorded in the output file (painn-batch --json prints it)"])
        self.page.table(["", "fingerprint"], rows)

    def _statuses(self) -> None:
        out = self.out
        self.page.heading("Statuses")
        counts = np.bincount(out.status.astype(np.int64) - out.status.min(), minlength=1)
        by_code = {int(c) + int(out.status.min()): int(n) for c, n in enumerate(counts) if n}
        names = {code: name for name, code in out.codes.items()}
        rows, entries = [], []
        for code, count in sorted(by_code.items()):
            name = names.get(code, f"code {code}")
            words = ["painn-batch", "report", out.path.resolve()]
            if self.reader:
                words += ["--input", self.reader.path.resolve()]
            command = _command(*words, "--list-ids", name)
            meaning = STATUS_MEANING.get(name, "unknown to this painn-export version")
            rows.append([name, count, meaning, command])
            entries.append(
                {"status": name, "code": code, "count": count, "meaning": meaning, "list": command}
            )
        self.page.table(["status", "structures", "meaning", "list them (index, id, message)"], rows)
        self.data["statuses"] = entries

    def _run(self) -> None:
        if self.reader is None:
            self._energy_only()
            return
        scan = scan_run(self.out, self.reader, self.max_points)
        if scan.labelled:
            self._accuracy(scan)
        self._distributions(scan)

    def _energy_only(self) -> None:
        """Without atom counts: the total energies and stresses of the structures that are done."""
        ok = self.out.ok(SUCCESS)
        energy = self.out.fh["energy"][...][ok]
        self.page.heading("Distributions")
        figures = [self.distribution("energy", "Energy per structure", energy, "energy (eV)")]
        if "stress" in self.out.fh:
            figures.append(self._stress(self.out.fh["stress"][...][ok].reshape(-1, 9)[:, [0, 4, 8, 5, 2, 1]]))
        self.show(*figures)

    def distribution(self, name: str, title: str, values: np.ndarray, label: str, **kw) -> Figure:
        values = values[np.isfinite(values)]
        lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
        log_x = kw.pop("log_x", False) and values.size and lo > 0
        e = np.logspace(np.log10(lo), np.log10(hi if hi > lo else lo * 10), BINS_1D + 1) if log_x else None
        e = e if e is not None else edges(lo, hi, BINS_1D)
        counts = np.histogram(values, e)[0]
        stats = [
            Number("structures", len(values)),
            Number("median", float(np.median(values)) if values.size else None, kw.pop("unit", "")),
        ]
        self.data.setdefault("distributions", {})[name] = {
            "structures": len(values),
            "median": stats[1].value,
            "min": lo if values.size else None,
            "max": hi if values.size else None,
        }
        return histogram(
            self.folder,
            name,
            title,
            [Series(name, counts, e)],
            label,
            stats,
            log_x=bool(log_x),
            log_count=False,
            **kw,
        )

    def _stress(self, voigt: np.ndarray) -> Figure:
        finite = voigt[np.isfinite(voigt).all(axis=1)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        e = edges(lo, hi, BINS_1D)
        labels = ("xx", "yy", "zz", "yz", "xz", "xy")
        series = [Series(label, np.histogram(finite[:, i], e)[0], e) for i, label in enumerate(labels)]
        self.data.setdefault("distributions", {})["stress"] = {
            "structures": len(finite),
            "min": lo,
            "max": hi,
        }
        return histogram(
            self.folder,
            "stress",
            "Stress components",
            series,
            "stress (eV/Å³)",
            [Number("structures with a stress", len(finite))],
            caption="Structures without a volume (ok_no_stress) have none.",
        )

    def _distributions(self, scan: RunScan) -> None:
        self.page.heading("Distributions")
        ok = scan.ok & (scan.natoms > 0)
        figures = [
            self.distribution(
                "energy_per_atom",
                "Energy per atom",
                scan.energy[ok] / scan.natoms[ok],
                "energy per atom (eV/atom)",
                unit="eV/atom",
            ),
            self.distribution(
                "largest_force",
                "Largest force per structure",
                scan.fmax[ok],
                "largest |F| in the structure (eV/Å)",
                unit="eV/Å",
                log_x=True,
            ),
        ]
        if scan.stress is not None:
            figures.append(self._stress(scan.stress[ok]))
        self.show(*figures)

    def _accuracy(self, scan: RunScan) -> None:
        out, reader = self.out, self.reader
        e_mae, f_mae = summary_mae(out, reader.path, reader.offsets)
        ok = scan.ok & (scan.natoms > 0)
        n_ok = int(ok.sum())
        e_rmse = float(np.sqrt(scan.energy_sq / n_ok)) if n_ok else None
        f_rmse = float(np.sqrt(scan.force_sq / scan.force_components)) if scan.force_components else None
        self.data["accuracy"] = {
            "structures": n_ok,
            "force_components": scan.force_components,
            "energy_mae_eV_per_atom": e_mae,
            "energy_rmse_eV_per_atom": e_rmse,
            "forces_mae_eV_per_A": f_mae,
            "forces_rmse_eV_per_A": f_rmse,
        }
        self.page.heading("Against the reference labels in the input")
        self.page.text(
            f"Over the {n_ok} structures with status ok or ok_no_stress. MAE as painn-batch run --json "
            "reports it (energy_mae_eV_per_atom, forces_mae_eV_per_A)."
        )
        self.page.table(
            ["", "MAE", "RMSE"],
            [
                ["energy per atom", number(e_mae, "eV/atom"), number(e_rmse, "eV/atom")],
                ["force components", number(f_mae, "eV/Å"), number(f_rmse, "eV/Å")],
            ],
        )
        e_ref = scan.ref_energy[ok] / scan.natoms[ok]
        e_pred = scan.energy[ok] / scan.natoms[ok]
        e_numbers = [Number("MAE", e_mae, "eV/atom"), Number("RMSE", e_rmse, "eV/atom")]
        f_numbers = [Number("MAE", f_mae, "eV/Å"), Number("RMSE", f_rmse, "eV/Å")]
        f_cloud, f_err_counts, f_err_edges = force_clouds(out, reader, scan)
        self.data["accuracy"]["force_parity"] = "points" if isinstance(f_cloud, Points) else "binned"
        m = float(np.abs(e_pred - e_ref).max()) if n_ok else 1.0
        e_edges = np.linspace(-m, m, BINS_1D + 1) if m > 0 else edges(0.0, 0.0, BINS_1D)
        binned = "" if len(e_ref) <= self.max_points else f" More than {self.max_points} points: binned."
        self.show(
            parity(
                self.folder,
                "energy_parity",
                "Energy per atom",
                cloud(e_ref, e_pred, self.max_points),
                "reference (eV/atom)",
                "predicted (eV/atom)",
                e_numbers,
                caption="Predicted against the input's energy, per atom." + binned,
            ),
            parity(
                self.folder,
                "force_parity",
                "Force components",
                f_cloud,
                "reference (eV/Å)",
                "predicted (eV/Å)",
                f_numbers,
                caption="Every Cartesian component of every atom"
                + ("." if isinstance(f_cloud, Points) else " (binned: a 2-D histogram)."),
            ),
            histogram(
                self.folder,
                "energy_error",
                "Energy error per atom",
                [Series("energy", np.histogram(e_pred - e_ref, e_edges)[0], e_edges)],
                "predicted - reference (eV/atom)",
                e_numbers,
            ),
            histogram(
                self.folder,
                "force_error",
                "Force component error",
                [Series("forces", f_err_counts, f_err_edges)],
                "predicted - reference (eV/Å)",
                f_numbers,
            ),
        )
        self._per_element(scan)
        self._worst(scan, ok)

    def _per_element(self, scan: RunScan) -> None:
        present = np.flatnonzero(scan.element_atoms)
        per = [
            {
                "Z": int(z),
                "element": element(int(z)),
                "atoms": int(scan.element_atoms[z]),
                "forces_mae_eV_per_A": float(scan.element_abs[z] / (3 * scan.element_atoms[z])),
            }
            for z in present
        ]
        self.data["per_element"] = per
        self.show(
            bars(
                self.folder,
                "force_mae_per_element",
                "Force MAE per element",
                [Number(p["element"], p["forces_mae_eV_per_A"], "eV/Å") for p in per],
                "force MAE (eV/Å)",
                caption="Mean |component error| over the atoms of each element in ok structures.",
            )
        )
        self.page.table(
            ["element", "atoms", "force MAE"],
            [[p["element"], p["atoms"], number(p["forces_mae_eV_per_A"], "eV/Å")] for p in per],
        )

    def _worst(self, scan: RunScan, ok: np.ndarray) -> None:
        e_err = np.full(len(ok), np.nan)
        e_err[ok] = np.abs(scan.energy[ok] - scan.ref_energy[ok]) / scan.natoms[ok]
        worst = {}
        for key, title, values, unit in (
            ("energy", "energy error per atom", e_err, "eV/atom"),
            ("forces", "largest force error (|F - F_ref| of one atom)", scan.force_error_max, "eV/Å"),
        ):
            order = _top(values, WORST)
            ids = [self.reader.ids(int(s), int(s) + 1)[0] for s in order]
            command = self._export(order, f"worst_{key}.extxyz") if order else ""
            rows = [
                {
                    "index": int(s),
                    "id": i,
                    "atoms": int(scan.natoms[s]),
                    "error": float(values[s]),
                    "unit": unit,
                }
                for s, i in zip(order, ids)
            ]
            worst[key] = {"structures": rows, "export": command}
            self.page.heading(f"The {len(rows)} worst structures by {title}")
            self.page.table(
                ["index", "id", "atoms", title],
                [[r["index"], r["id"], r["atoms"], number(r["error"], unit)] for r in rows],
            )
            if command:
                self.page.text("To write them, with their results, as extxyz:")
                self.page.code(command)
        self.data["worst"] = worst


def _top(values: np.ndarray, k: int) -> list[int]:
    """Indices of the ``k`` largest finite values, largest first."""
    finite = np.flatnonzero(np.isfinite(values))
    if not finite.size:
        return []
    k = min(k, finite.size)
    part = finite[np.argpartition(values[finite], -k)[-k:]]
    return [int(s) for s in part[np.argsort(-values[part], kind="stable")]]
