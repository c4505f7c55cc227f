"""ASE calculator over any runtime: PyTorch, ONNX Runtime or a TensorRT engine.

    from painn_export.ase import PaiNNCalculator
    atoms.calc = PaiNNCalculator.from_file("model.onnx")      # or a checkpoint, an engine
    atoms.calc = PaiNNCalculator.from_file(None)               # the bundled demo model

Energies in eV, forces in eV/Å, stress (gradient-force models) in eV/Å^3 in
ASE's Voigt order. The graph is the pipeline's (:mod:`painn_export.neighbors`),
kept across steps with a Verlet skin (:class:`~painn_export.skin.SkinGraph`):
the neighbour search reruns only when an atom has moved more than half the
skin, and the graph is always exactly the one a fresh search would give.
With ``graphs="device"`` (``auto``: when the runtime runs on a GPU and
device graphs are installed) each calculation builds the graph and the feed
on the runtime's device instead (:mod:`painn_export.device_graphs`): the
same graph, edge order included, hence the same numbers.

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
from painn_export.runners import Runner, open_runner
from painn_export.skin import SkinGraph


class PaiNNCalculator(Calculator):
    """Energy, forces (and stress where the graph has it) from a painn-export runner."""

    def __init__(
        self, runner: Runner, facts: ModelFacts, *, skin: float = 0.5, graphs: str = "host", **kwargs
    ) -> None:
        super().__init__(**kwargs)
        from painn_export.graphs_where import GRAPHS

        if graphs not in GRAPHS:
            raise ValueError(f"graphs must be one of {', '.join(GRAPHS)}, got {graphs!r}")
        self.runner, self.facts, self.where = runner, facts, graphs
        self.graphs = SkinGraph(facts.cutoff, facts.max_neighbors, skin=skin)
        self.on_device: bool | None = None  # decided when the runtime starts (it knows its device then)

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
        runtime: str | None = None,
        *,
        device: str = "auto",
        skin: float = 0.5,
        graphs: str = "host",
        **kwargs,
    ) -> PaiNNCalculator:
        """A calculator for a checkpoint, ``.onnx``, ``.pt2`` or ``.engine`` (None: the demo model).

        ``runtime``: None is the file's own (a checkpoint: ONNX Runtime, exported once); one that
        does not fit the file is refused (:func:`painn_export.runners.loader_for`).

        ``device``: ``auto`` (a GPU where the runtime can use one, else the
        CPU), ``cpu``, ``cuda`` or ``cuda:N``; a GPU the runtime cannot give is
        an error at the first calculation, never a silent CPU run. ``graphs``:
        ``host`` (a Verlet skin), ``device`` or ``auto`` (module doc);
        ``device`` without device graphs installed is an error at the first calculation.
        """
        runner, facts = open_runner(path, runtime, device)
        return cls(runner, facts, skin=skin, graphs=graphs, **kwargs)

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
        if self.on_device is None:
            from painn_export.graphs_where import graphs_on_device

            self.on_device = graphs_on_device(self.where, self.runner.device)
        if self.on_device:
            import torch

            from painn_export.device_graphs import structures_feed

            feed = structures_feed(  # float64, as the host's collate below: each runner casts
                [_Structure(self.atoms)], cutoff=self.facts.cutoff, max_neighbors=self.facts.max_neighbors,
                device=self.runner.device, dtype=torch.float64,
            )  # fmt: skip
        else:
            graph = self.graphs.update(
                z, self.atoms.get_positions(), self.atoms.get_cell()[:], self.atoms.get_pbc()
            )
            feed = collate([graph], np.float64)  # each runner casts to its own dtype
        out = self.runner.infer(feed)
        self.results["energy"] = self.results["free_energy"] = float(out["energy"][0])
        self.results["forces"] = np.asarray(out["forces"], dtype=np.float64)
        if "stress" in out:
            stress = np.asarray(out["stress"][0], dtype=np.float64)
            if "stress" in properties and not np.isfinite(stress).all():
                raise ValueError("stress is undefined for a cell without volume")
            self.results["stress"] = full_3x3_to_voigt_6_stress(stress)


class _Structure:
    """What :func:`~painn_export.device_graphs.structures_feed` reads of ASE ``Atoms``."""

    def __init__(self, atoms) -> None:
        self.positions, self.cell = atoms.get_positions(), atoms.get_cell()[:]
        self.pbc, self.atomic_numbers = atoms.get_pbc(), atoms.get_atomic_numbers()
