"""The relaxation sections of ``painn-batch report`` (:mod:`pipelines.report`).

Steps, the final largest force on a free atom, relaxed against reference
energies (the numbers of the relaxation's own ``reference`` summary), and
with ``--trajectory-every`` energy and largest force along the steps: a
sample of structures one by one, and the spread of all of them.
"""

from __future__ import annotations

import numpy as np

from painn_export.plots import Curve, Number, Series, histogram, lines, parity
from pipelines.output import RELAXED
from pipelines.report_data import BINS_1D, cloud, free_fmax, trajectory_spread

TRAJECTORY_SAMPLE = 10  # structures drawn one by one along their relaxation


def relax_sections(r) -> None:
    """The sections of a relaxation's report, into ``r`` (a :class:`pipelines.report._Report`)."""
    out, reader = r.out, r.reader
    fp = out.fingerprint
    r.page.heading("Relaxations")
    steps = out.fh["steps"][...]
    ended = steps >= 0
    top = max(int(steps[ended].max()) if ended.any() else 1, 1)
    e = np.arange(-0.5, top + 1.5, max(1, (top + 1) // BINS_1D + 1))
    counts = {
        name: np.histogram(steps[out.ok({name})], e)[0] for name in ("converged", "not_converged", "diverged")
    }
    r.data["steps"] = {
        "structures": int(ended.sum()),
        "median": float(np.median(steps[ended])) if ended.any() else None,
        "max": int(steps[ended].max()) if ended.any() else None,
    }
    figures = [
        histogram(
            r.folder,
            "steps",
            "FIRE steps taken",
            [Series(k, v, e) for k, v in counts.items() if v.any()]
            or [Series("none", counts["converged"], e)],
            "steps",
            [
                Number("median", r.data["steps"]["median"]),
                Number("most", r.data["steps"]["max"]),
                Number("limit (--steps)", fp.get("max_steps")),
            ],
            log_count=False,
        )
    ]
    if reader is not None:
        fmax = free_fmax(out, reader, {"converged", "not_converged"})
        figures.append(
            r.distribution(
                "final_largest_force",
                "Final largest force on a free atom",
                fmax,
                "largest |F| on a free atom (eV/Å)",
                unit="eV/Å",
                log_x=True,
                marks={"--fmax": fp["fmax"]} if "fmax" in fp else None,
                caption="Converged and not converged structures; atoms only (with --cell the "
                "convergence test also has the cell rows).",
            )
        )
    r.show(*figures)
    if reader is not None and "relaxed_energy" in reader.fh:
        _relaxed_reference(r)
    if "trajectory_energy" in out.fh:
        _trajectories(r)


def _relaxed_reference(r) -> None:
    """Relaxed energies against the input's; numbers by the relaxation's own summary function."""
    from types import SimpleNamespace

    from pipelines.relax_output import relaxed_reference

    out, reader = r.out, r.reader
    summary = relaxed_reference(reader, SimpleNamespace(fh=out.fh)) or {}
    r.data["relaxed_reference"] = summary
    ok = out.ok(RELAXED)
    natoms = np.diff(reader.offsets)[ok]
    ours = out.fh["energy"][...][ok] / natoms
    ref = reader.fh["relaxed_energy"][...][ok] / natoms
    numbers = [
        Number("MAE", summary.get("relaxed_energy_mae_eV_per_atom"), "eV/atom"),
        Number("largest error", summary.get("relaxed_energy_max_error_eV_per_atom"), "eV/atom"),
    ]
    if "relaxed_positions_rms_A" in summary:
        numbers.append(Number("positions RMS", summary["relaxed_positions_rms_A"], "Å"))
    r.page.heading("Relaxed against the reference")
    r.page.text(f"Over the {int(ok.sum())} converged structures (relaxed_energy in the input).")
    r.show(
        parity(
            r.folder,
            "relaxed_energy_parity",
            "Relaxed energy per atom",
            cloud(ref, ours, r.max_points),
            "reference relaxed (eV/atom)",
            "relaxed here (eV/atom)",
            numbers,
        )
    )


def _trajectories(r) -> None:
    fh, fp = r.out.fh, r.out.fingerprint
    every = int(fp.get("trajectory_every", 1)) or 1
    natoms = np.diff(r.reader.offsets) if r.reader else None
    unit = "eV/atom" if natoms is not None else "eV"
    energy_ds = fh["trajectory_energy"]
    frames_done = ~np.isnan(fh["trajectory_fmax"][:, 0]) if energy_ds.shape[1] else np.zeros(0, bool)
    candidates = np.flatnonzero(frames_done)
    sample = candidates[
        np.linspace(0, len(candidates) - 1, min(TRAJECTORY_SAMPLE, len(candidates))).astype(int)
    ]
    sample = np.unique(sample)
    r.page.heading(f"Along the relaxations (every {every} steps)")
    if not len(sample):
        r.page.text("No trajectory frame is written yet.")
        return
    e_rows = energy_ds[sample.tolist()]
    f_rows = fh["trajectory_fmax"][sample.tolist()]
    steps = np.arange(energy_ds.shape[1]) * every
    ids = [r.reader.ids(int(s), int(s) + 1)[0] if r.reader else f"structure {s}" for s in sample]
    scale = natoms[sample][:, None] if natoms is not None else 1.0
    de = (e_rows - e_rows[:, :1]) / scale
    spread_e = trajectory_spread(fh, "energy", every, natoms, log=False)
    spread_f = trajectory_spread(fh, "fmax", every, None, log=True)
    reached = int(np.flatnonzero(spread_f.running)[-1]) + 1 if spread_f.running.any() else 0
    spread_e, spread_f = spread_e.first(reached), spread_f.first(reached)
    steps, de, f_rows = steps[:reached], de[:, :reached], f_rows[:, :reached]
    r.data["trajectory"] = {
        "every": every,
        "sample": [{"index": int(s), "id": i} for s, i in zip(sample, ids)],
        "steps": steps,
        "energy_change": {"p10": spread_e.p10, "median": spread_e.p50, "p90": spread_e.p90, "unit": unit},
        "fmax": {"p10": spread_f.p10, "median": spread_f.p50, "p90": spread_f.p90, "unit": "eV/Å"},
        "running": spread_f.running,
    }
    r.show(
        lines(
            r.folder,
            "trajectory_energy",
            f"Energy change along {len(sample)} relaxations",
            [Curve(i, steps, row) for i, row in zip(ids, de)],
            "step",
            f"E - E(step 0) ({unit})",
            caption="A sample of structures spread over the file.",
        ),
        lines(
            r.folder,
            "trajectory_fmax",
            f"Largest force along {len(sample)} relaxations",
            [Curve(i, steps, row) for i, row in zip(ids, f_rows)],
            "step",
            "largest force (eV/Å)",
            log_y=True,
        ),
        lines(
            r.folder,
            "trajectory_energy_spread",
            "All relaxations: energy change, median and 10-90 %",
            [Curve("median", spread_e.steps, spread_e.p50, spread_e.p10, spread_e.p90)],
            "step",
            f"E - E(step 0) ({unit})",
            caption=f"Over every structure still relaxing at each step (from {BINS_1D * 4} bins).",
        ),
        lines(
            r.folder,
            "trajectory_fmax_spread",
            "All relaxations: largest force, median and 10-90 %",
            [Curve("median", spread_f.steps, spread_f.p50, spread_f.p10, spread_f.p90)],
            "step",
            "largest force (eV/Å)",
            log_y=True,
            caption=f"Over every structure still relaxing at each step (from {BINS_1D * 4} log bins).",
        ),
    )
