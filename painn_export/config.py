"""Model hyperparameters and target normalisation, as frozen dataclasses.

`PaiNNConfig` mirrors the constructor of upstream OCP/fairchem
`PaiNN` (``ocpmodels.models.painn.painn.PaiNN``) with the same defaults, so a
checkpoint's ``model_attributes`` map onto it one to one. The neighbour-list
code reads ``cutoff`` and ``max_neighbors``. Upstream's other graph switches
(``use_pbc``, ``otf_graph``) are kept only so that a checkpoint's attributes
round-trip: nothing reads them. Periodicity comes from each structure's own
``pbc``.

`TargetNormalization` holds what upstream keeps outside the model, in the
trainer: the energy/force normalisers (``pred * std + mean``) and the linear
per-element energy references. Our model applies them inside ``forward`` so
that every runtime outputs eV and eV/Å.
"""

from __future__ import annotations

from dataclasses import dataclass, field

RBF_NAMES = ("gaussian", "spherical_bessel", "bernstein")
ENVELOPE_NAMES = ("polynomial", "exponential")


@dataclass(frozen=True)
class PaiNNConfig:
    """PaiNN hyperparameters (upstream names and defaults)."""

    hidden_channels: int = 512  # F: width of scalar and vector features
    num_layers: int = 6  # number of message + update blocks
    num_rbf: int = 128  # number of radial basis functions
    cutoff: float = 12.0  # Å, radial cutoff of the graph and the envelope
    max_neighbors: int = 50  # per-centre cap applied when building the graph
    rbf: str = "gaussian"  # radial basis: one of RBF_NAMES
    envelope: str = "polynomial"  # cutoff envelope: one of ENVELOPE_NAMES
    envelope_exponent: int = 5  # p of the polynomial envelope
    regress_forces: bool = True  # the model outputs forces
    direct_forces: bool = True  # forces from the equivariant head (else -dE/dx)
    use_pbc: bool = True  # upstream's switch, kept from the checkpoint; not read (pbc is per structure)
    otf_graph: bool = True  # upstream built the graph in forward; kept from the checkpoint, not read
    num_elements: int = 83  # embedding rows: atomic numbers 1..num_elements

    def __post_init__(self) -> None:
        if self.hidden_channels < 2 or self.hidden_channels % 2:
            raise ValueError(f"hidden_channels must be an even number >= 2, got {self.hidden_channels}")
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        if self.num_rbf < 2:
            raise ValueError(f"num_rbf must be >= 2, got {self.num_rbf}")
        if not self.cutoff > 0:
            raise ValueError(f"cutoff must be a positive distance in Å, got {self.cutoff}")
        if self.rbf not in RBF_NAMES:
            raise ValueError(f"rbf must be one of {RBF_NAMES}, got {self.rbf!r}")
        if self.envelope not in ENVELOPE_NAMES:
            raise ValueError(f"envelope must be one of {ENVELOPE_NAMES}, got {self.envelope!r}")
        if self.envelope_exponent < 1:
            raise ValueError(f"envelope_exponent must be >= 1, got {self.envelope_exponent}")
        if self.num_elements < 1:
            raise ValueError(f"num_elements must be >= 1, got {self.num_elements}")


@dataclass(frozen=True)
class TargetNormalization:
    """Output de-normalisation: ``E = E_model * energy_std + energy_mean + Σ_atoms ref[Z]``.

    Upstream keeps these in the trainer (``checkpoint["normalizers"]`` and
    ``checkpoint["elementrefs"]``); the identity is the default.
    """

    energy_mean: float = 0.0  # eV, added to each system's energy
    energy_std: float = 1.0  # eV, multiplies each system's energy
    forces_mean: float = 0.0  # eV/Å, added to each force component
    forces_std: float = 1.0  # eV/Å, multiplies each force component
    # eV per atom of element Z at index Z (index 0 unused); empty: no references
    element_references: tuple[float, ...] = field(default_factory=tuple)

    @property
    def is_identity(self) -> bool:
        return (
            self.energy_mean == 0.0
            and self.energy_std == 1.0
            and self.forces_mean == 0.0
            and self.forces_std == 1.0
            and not any(self.element_references)
        )


# Named configurations for randomly initialised models (benchmarks, smoke runs).
PRESETS: dict[str, PaiNNConfig] = {
    # The bundled demo model's size (painn_export/data/demo.pt): trains on a laptop CPU.
    "demo": PaiNNConfig(hidden_channels=96, num_layers=3, num_rbf=32, cutoff=6.0, max_neighbors=50),
    # The OC20 S2EF PaiNN (painn_h512): upstream defaults.
    "ocp": PaiNNConfig(),
}
