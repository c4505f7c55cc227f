"""The model contract: what every runtime takes and returns, written once (no torch).

Version 3: the neighbour-major ("slot", ELL) layout, per-atom outputs.
Each atom ``i`` (the centre, the receiver of messages) has ``n_slots``
slots holding its incoming edges ``j -> i``; a slot without an edge is
padding (``neighbor_mask == 0``). Every sum over edges is a sum over the
slot axis, and the graph has no scatter of any kind (see
:mod:`painn_export.slots` for the layout's invariants).

The graph returns per-atom quantities. The sums over the atoms of a system
(energies, element references, the virial) are done by the host in float64
(:mod:`painn_export.readout`), whatever precision the graph ran in: float32
or float16 totals of thousands of atoms, or of per-element references near
-1000 eV, would lose whole meV to eV, and no runtime then needs a tensor
that grows as atoms × systems.

:data:`INPUTS` and :data:`OUTPUTS` are the table; docs/contract.md's table is
generated from them (:func:`markdown_table`, checked by tests/test_contract.py).
"""

from __future__ import annotations

from typing import NamedTuple

CONTRACT_VERSION = 3


class Field(NamedTuple):
    name: str
    dtype: str  # "int64", or "float": the graph's float dtype (float32/float64)
    axes: tuple[str | int, ...]  # a dynamic axis by name, a static one by size
    meaning: str
    where: str  # "graph": every graph; "gradient"/"stress": those variants; "host": feed only


# The graph's inputs, in order, then the feed's host-side entries.
INPUTS: tuple[Field, ...] = (
    Field("atomic_numbers", "int64", ("n_atoms",), "Z in 1..num_elements", "graph"),
    Field("positions", "float", ("n_atoms", 3), "Cartesian positions, Å", "graph"),
    Field(
        "neighbors",
        "int64",
        ("n_atoms", "n_slots"),
        "sender j of each slot of centre i (padding: i itself)",
        "graph",
    ),
    Field("neighbor_shift", "float", ("n_atoms", "n_slots", 3), "periodic shift of j, Å: S @ cell", "graph"),
    Field("neighbor_mask", "float", ("n_atoms", "n_slots"), "1 for an edge, 0 for padding", "graph"),
    Field(
        "slot_pair",
        "int64",
        ("n_atoms", "n_slots"),
        "the pair (an edge and its reverse: one length, one radial filter) of each slot; "
        "padding: n_pairs (none)",
        "graph",
    ),
    Field(
        "pair_slots",
        "int64",
        ("n_pairs", 2),
        "the two flat slots i * n_slots + k of each pair; n_atoms * n_slots: none (a spare pair)",
        "graph",
    ),
    Field(
        "neighbor_reverse",
        "int64",
        ("n_atoms", "n_slots"),
        "flat slot j * n_slots + k' of each edge's reverse i -> j (padding: the slot itself)",
        "gradient",
    ),
    Field("system_index", "int64", ("n_atoms",), "system of each atom, 0..n_systems-1", "host"),
    Field("natoms", "int64", ("n_systems",), "atoms per system", "host"),
    Field("cell", "float64", ("n_systems", 3, 3), "Å, rows are lattice vectors (for the volume)", "host"),
)
OUTPUTS: tuple[Field, ...] = (
    Field(
        "atom_energy",
        "float",
        ("n_atoms",),
        "each atom's energy, eV, before the energy mean and element references (float32 or wider)",
        "graph",
    ),
    Field("forces", "float", ("n_atoms", 3), "eV/Å", "graph"),
    Field(
        "atom_virial",
        "float",
        ("n_atoms", 3, 3),
        "each atom's share of ∂E/∂ε (symmetric strain ε), eV",
        "stress",
    ),
)
# What the host makes of them (painn_export.readout): what every runner returns.
RESULTS: tuple[Field, ...] = (
    Field(
        "energy", "float64", ("n_systems",), "Σ atom_energy + energy mean + element references, eV", "host"
    ),
    Field("forces", "float", ("n_atoms", 3), "eV/Å", "host"),
    Field("stress", "float64", ("n_systems", 3, 3), "Σ atom_virial / volume, eV/Å³ (NaN: no volume)", "host"),
)

VIRIAL_OUTPUT = "atom_virial"  # what makes a graph a stress graph

_BY_NAME = {f.name: f for f in (*INPUTS, *OUTPUTS)}
# Dynamic axis names, by tensor (None: a static axis), and static sizes.
AXES: dict[str, tuple[str | None, ...]] = {
    f.name: tuple(a if isinstance(a, str) else None for a in f.axes) for f in _BY_NAME.values()
}
STATIC: dict[str, tuple[int | None, ...]] = {
    f.name: tuple(a if isinstance(a, int) else None for a in f.axes)
    for f in _BY_NAME.values()
    if any(isinstance(a, int) for a in f.axes)
}
HOST_INPUTS = tuple(f.name for f in INPUTS if f.where == "host")

UNITS = {
    "positions": "Angstrom",
    "neighbor_shift": "Angstrom",
    "cell": "Angstrom",
    "atom_energy": "eV",
    "energy": "eV",
    "forces": "eV/Angstrom",
    "atom_virial": "eV",
    "stress": "eV/Angstrom^3",
}

# Metadata keys of an exported graph (and of an engine's sidecar).
META_PREFIX = "painn_export."

# The slot axis is padded to a multiple of this, so that a run sees few shapes
# (ONNX Runtime's arena, TensorRT's profiles) at a cost of < SLOT_MULTIPLE
# padded slots per atom; below it, to a power of two (1, 2, 4, 8), so that a
# batch of small molecules is not padded to eight times its edges.
SLOT_MULTIPLE = 8


def slot_count(max_degree: int) -> int:
    """Slots per atom for a batch whose busiest atom has ``max_degree`` edges.

    1, 2, 4 or 8 up to eight edges, then multiples of 8 (never fewer than one
    slot: an edgeless batch has one padding slot per atom). The one rule:
    collate, the batcher's limits and TensorRT's profiles all use it.
    """
    degree = max(1, int(max_degree))
    if degree <= SLOT_MULTIPLE:
        return 1 << (degree - 1).bit_length()
    return -(-degree // SLOT_MULTIPLE) * SLOT_MULTIPLE


STRESS_NEEDS_GRADIENT = (
    "stress needs a gradient-force model (direct_forces=False): the stress is the strain "
    "derivative of the energy, which a direct force head does not provide"
)


def input_names(gradient: bool = False) -> tuple[str, ...]:
    """Inputs of a graph, in order: gradient-force graphs add the reverse index."""
    wanted = {"graph"} | ({"gradient"} if gradient else set())
    return tuple(f.name for f in INPUTS if f.where in wanted)


def output_names(stress: bool = False) -> tuple[str, ...]:
    """Outputs of a graph, in order: stress graphs add the per-atom virial."""
    wanted = {"graph"} | ({"stress"} if stress else set())
    return tuple(f.name for f in OUTPUTS if f.where in wanted)


def output_shape(name: str, n_atoms: int) -> tuple[int, ...]:
    """The shape of graph output ``name`` for a feed of ``n_atoms`` atoms (every output is per atom)."""
    return tuple(n_atoms if a == "n_atoms" else a for a in _BY_NAME[name].axes)


def feed_names(gradient: bool = False) -> tuple[str, ...]:
    """What a feed must hold for such a graph: its inputs and the host's entries."""
    return input_names(gradient) + HOST_INPUTS


def _shape(f: Field) -> str:
    return "`[" + ", ".join(str(a) for a in f.axes) + "]`"


def markdown_table() -> str:
    """The contract as docs/contract.md shows it (tests/test_contract.py keeps them equal)."""
    where = {
        "graph": "every graph",
        "gradient": "gradient-force graphs",
        "stress": "stress graphs",
        "host": "feed, host only",
    }
    dtype = {"float": "float32/64", "int64": "int64", "float64": "float64"}
    lines = ["| name | dtype | shape | where | meaning |", "| --- | --- | --- | --- | --- |"]
    for f in INPUTS + OUTPUTS:
        lines.append(f"| `{f.name}` | {dtype[f.dtype]} | {_shape(f)} | {where[f.where]} | {f.meaning} |")
    lines += ["", "Every runner returns, after the host's float64 sums:", ""]
    lines += ["| name | dtype | shape | meaning |", "| --- | --- | --- | --- |"]
    for f in RESULTS:
        lines.append(f"| `{f.name}` | {dtype[f.dtype]} | {_shape(f)} | {f.meaning} |")
    return "\n".join(lines)
