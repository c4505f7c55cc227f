"""ASE calculator over any runtime: PyTorch, ONNX Runtime or a TensorRT engine.

    from painn_export.ase import PaiNNCalculator
    atoms.calc = PaiNNCalculator.from_file("model.onnx")      # or a checkpoint, an engine
    atoms.calc = PaiNNCalculator.from_file(None)               # the bundled demo model

Energies in eV, forces in eV/Å, stress (gradient-force models) in eV/Å^3 in
ASE's Voigt order. The graph is the pipeline's (:mod:`painn_export.neighbors`),
kept across steps with a Verlet skin (:class:`~painn_export.neighbors.SkinGraph`):
the neighbour search reruns only when an atom has moved more than half the
skin, and the graph is always exactly the one a fresh search would give.

ASE is optional: ``pip install painn-export[ase]``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

try:
    from ase.calculators.calculator import Calculator, all_changes
    from ase.stress import full_3x3_to_voigt_6_stress
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("painn_export.ase needs ASE: pip install painn-export[ase]") from exc

from painn_export.batch import collate
from painn_export.metadata import ModelFacts
from painn_export.neighbors import SkinGraph
from painn_export.runners import Runner, open_runner


class PaiNNCalculator(Calculator):
    """Energy, forces (and stress where the graph has it) from a painn-export runner."""

    def __init__(self, runner: Runner, facts: ModelFacts, *, skin: float = 0.5, **kwargs) -> None:
        super().__init__(**kwargs)
        self.runner, self.facts = runner, facts
        self.graphs = SkinGraph(facts.cutoff, facts.max_neighbors, skin=skin)

    @property
    def implemented_properties(self) -> list[str]:  # type: ignore[override]
        # From the file's facts: reading it starts no runtime.
        return ["energy", "free_energy", "forces"] + (["stress"] if self.facts.stress else [])

    def close(self) -> None:
        """Release the runtime (session, engine, GPU memory); the next calculation starts it again."""
        self.runner.deactivate()

    def __enter__(self) -> PaiNNCalculator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @classmethod
    def from_file(
        cls,
        path: str | Path | None,
        runtime: str = "onnxruntime",
        *,
        device: str = "auto",
        skin: float = 0.5,
        **kwargs,
    ) -> PaiNNCalculator:
        """A calculator for a checkpoint, ``.onnx`` file or ``.engine`` (None: the demo model).

        ``device``: ``auto`` (a GPU where the runtime can use one, else the
        CPU), ``cpu``, ``cuda`` or ``cuda:N``; a GPU the runtime cannot give is
        an error at the first calculation, never a silent CPU run.
        """
        runner, facts = open_runner(path, runtime, device)
        return cls(runner, facts, skin=skin, **kwargs)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        z = self.atoms.get_atomic_numbers()
        if not z.size:
            raise ValueError("these Atoms have no atoms: there is nothing to evaluate")
        if z.min() < 1 or z.max() > self.facts.num_elements:
            raise ValueError(
                f"atomic numbers outside 1..{self.facts.num_elements}: {sorted(set(z.tolist()))}"
            )
        self.runner.activate()  # started on first use, released by close()
        graph = self.graphs.update(
            z, self.atoms.get_positions(), self.atoms.get_cell()[:], self.atoms.get_pbc()
        )
        out = self.runner.infer(collate([graph], np.float64))  # each runner casts to its own dtype
        self.results["energy"] = self.results["free_energy"] = float(out["energy"][0])
        self.results["forces"] = np.asarray(out["forces"], dtype=np.float64)
        if "stress" in out:
            stress = np.asarray(out["stress"][0], dtype=np.float64)
            if "stress" in properties and not np.isfinite(stress).all():
                raise ValueError("stress is undefined for a cell without volume")
            self.results["stress"] = full_3x3_to_voigt_6_stress(stress)
