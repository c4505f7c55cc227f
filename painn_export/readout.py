"""The host's part of the contract: per-system sums in float64 (numpy, no torch).

The graph returns per-atom energies and virials (:mod:`painn_export.contract`);
here they become system energies and stress. Each sum is a ``np.bincount``
over the atoms in their order, in float64: exact to float64 rounding for
any size and whatever precision the graph ran in (float16, float32, TF32),
and the same numbers on every run. The per-element references (ANI/SPICE-style
models have about -1000 eV per atom) and the energy mean are added here in
float64 too, never rounded to the graph's precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Cells with |det| below this (Å^3) have no volume: their stress is NaN.
MIN_CELL_VOLUME = 1.0e-6


def system_sums(per_atom: np.ndarray, system_index: np.ndarray, n_systems: int) -> np.ndarray:
    """``[n_systems, ...]`` float64 sums of ``per_atom`` ``[n_atoms, ...]`` over each system's atoms."""
    values = np.asarray(per_atom, dtype=np.float64)
    flat = values.reshape(values.shape[0], -1)  # [n_atoms, C]
    index = np.asarray(system_index, dtype=np.int64)
    columns = [np.bincount(index, weights=flat[:, c], minlength=n_systems) for c in range(flat.shape[1])]
    out = np.stack(columns, axis=-1) if columns else np.zeros((n_systems, 0))
    return out.reshape(n_systems, *values.shape[1:])


def cell_volumes(cell: np.ndarray) -> np.ndarray:
    """``|det|`` ``[n_systems]`` Å^3 of cells ``[n_systems, 3, 3]``, float64."""
    return np.abs(np.linalg.det(np.asarray(cell, dtype=np.float64).reshape(-1, 3, 3)))


@dataclass(frozen=True)
class SystemReadout:
    """What the host adds per system: the energy mean (eV) and per-element references (eV/atom)."""

    energy_mean: float = 0.0
    element_references: tuple[float, ...] = ()  # index Z; empty: none

    @classmethod
    def of(cls, normalization) -> SystemReadout:
        """From a :class:`~painn_export.config.TargetNormalization` or its ``asdict`` form."""
        get = normalization.get if isinstance(normalization, dict) else normalization.__getattribute__
        return cls(float(get("energy_mean")), tuple(float(r) for r in get("element_references")))

    def totals(self, outputs: dict[str, np.ndarray], feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``{"energy", "forces"[, "stress"]}`` from a graph's outputs and its feed."""
        system_index, natoms = feed["system_index"], feed["natoms"]
        n_systems = len(natoms)
        energy = system_sums(outputs["atom_energy"], system_index, n_systems)  # [n_systems]
        energy += self.energy_mean
        if any(self.element_references):
            refs = np.asarray(self.element_references, dtype=np.float64)
            energy += system_sums(refs[np.asarray(feed["atomic_numbers"])], system_index, n_systems)
        result = {"energy": energy, "forces": outputs["forces"]}
        if "atom_virial" in outputs:
            virial = system_sums(outputs["atom_virial"], system_index, n_systems)  # [n_systems, 3, 3] eV
            volume = cell_volumes(feed["cell"])
            with np.errstate(divide="ignore", invalid="ignore"):
                stress = virial / volume[:, None, None]
            result["stress"] = np.where((volume > MIN_CELL_VOLUME)[:, None, None], stress, np.nan)
        return result
