"""The model contract: what every runtime takes and returns, written once (no torch).

Version 2: the neighbour-major ("slot", ELL) layout. Each atom ``i`` (the
centre, the receiver of messages) has ``n_slots`` slots holding its incoming
edges ``j -> i``; a slot without an edge is padding (``neighbor_mask == 0``).
Every sum over edges is then a sum over the slot axis, and the exported
graph has no scatter of any kind (see :mod:`painn_export.model`).

==================== ======== ============================== ==============================================
input                dtype    shape                          meaning
==================== ======== ============================== ==============================================
``atomic_numbers``   int64    ``[n_atoms]``                  Z in ``1..num_elements``
``positions``        float    ``[n_atoms, 3]``               Cartesian positions, Å
``neighbors``        int64    ``[n_atoms, n_slots]``         sender ``j`` of each slot of centre ``i``
                                                             (padding: any valid atom index)
``neighbor_shift``   float    ``[n_atoms, n_slots, 3]``      periodic shift of ``j``, Å: ``S @ cell``
``neighbor_mask``    float    ``[n_atoms, n_slots]``         1 for an edge, 0 for padding
``slot_pair``        int64    ``[n_atoms, n_slots]``         the pair (edge and reverse) of each slot;
                                                             padding: a dummy pair of padding slots
``pair_slots``       int64    ``[n_pairs, 2]``               the two flat slots ``i * n_slots + k`` of each
                                                             pair (an edge and its reverse share one
                                                             length, so one radial filter)
``system_index``     int64    ``[n_atoms]``                  system of each atom, ``0..n_systems-1``
``natoms``           int64    ``[n_systems]``                atoms per system (its length sets n_systems)
``neighbor_reverse`` int64    ``[n_atoms, n_slots]``         flat slot ``j * n_slots + k'`` of the reverse
                                                             edge ``i -> j`` (padding: the slot itself);
                                                             gradient-force models only
``cell``             float    ``[n_systems, 3, 3]``          Å, rows are lattice vectors; stress graphs only
==================== ======== ============================== ==============================================

The edge vector is ``r_ij = x_j + shift - x_i``: from the centre to the
neighbour, as upstream's ``distance_vec``. "float" is float32 or float64, the
same for every float input and the graph's parameters.

Outputs: ``energy`` ``[n_systems]`` eV, ``forces`` ``[n_atoms, 3]`` eV/Å,
and for stress graphs ``stress`` ``[n_systems, 3, 3]`` eV/Å³ (NaN for a cell
without volume).
"""

from __future__ import annotations

CONTRACT_VERSION = 2

# The inputs every graph has, in order; the reverse index and the cell follow
# where the variant needs them (:func:`input_names`).
BASE_INPUTS = (
    "atomic_numbers",
    "positions",
    "neighbors",
    "neighbor_shift",
    "neighbor_mask",
    "slot_pair",
    "pair_slots",
    "system_index",
    "natoms",
)
REVERSE_INPUT = "neighbor_reverse"  # gradient-force graphs: the backward of a gather
STRESS_INPUT = "cell"
OUTPUTS = ("energy", "forces")
STRESS_OUTPUT = "stress"

# Dynamic axis names, by input (None: a static axis).
AXES: dict[str, tuple[str | None, ...]] = {
    "atomic_numbers": ("n_atoms",),
    "positions": ("n_atoms", None),
    "neighbors": ("n_atoms", "n_slots"),
    "neighbor_shift": ("n_atoms", "n_slots", None),
    "neighbor_mask": ("n_atoms", "n_slots"),
    "neighbor_reverse": ("n_atoms", "n_slots"),
    "slot_pair": ("n_atoms", "n_slots"),
    "pair_slots": ("n_pairs", None),
    "system_index": ("n_atoms",),
    "natoms": ("n_systems",),
    "cell": ("n_systems", None, None),
    "energy": ("n_systems",),
    "forces": ("n_atoms", None),
    "stress": ("n_systems", None, None),
}
# Static sizes of the axes marked None above.
STATIC = {
    "positions": (None, 3),
    "neighbor_shift": (None, None, 3),
    "pair_slots": (None, 2),
    "cell": (None, 3, 3),
}
INTEGER_INPUTS = frozenset(
    {"atomic_numbers", "neighbors", "slot_pair", "pair_slots", "neighbor_reverse", "system_index", "natoms"}
)

UNITS = {
    "positions": "Angstrom",
    "neighbor_shift": "Angstrom",
    "cell": "Angstrom",
    "energy": "eV",
    "forces": "eV/Angstrom",
    "stress": "eV/Angstrom^3",
}

# Metadata keys of an exported graph (and of an engine's sidecar).
META_PREFIX = "painn_export."


def input_names(gradient: bool = False, stress: bool = False) -> tuple[str, ...]:
    """Inputs of a graph: gradient-force graphs add the reverse index, stress graphs the cell."""
    if stress and not gradient:
        raise ValueError(STRESS_NEEDS_GRADIENT)
    return BASE_INPUTS + ((REVERSE_INPUT,) if gradient else ()) + ((STRESS_INPUT,) if stress else ())


def output_names(stress: bool = False) -> tuple[str, ...]:
    return OUTPUTS + ((STRESS_OUTPUT,) if stress else ())


STRESS_NEEDS_GRADIENT = (
    "stress needs a gradient-force model (direct_forces=False): the stress is the strain "
    "derivative of the energy, which a direct force head does not provide"
)
