"""Bringing structures into the input schema, and results back out.

``painn-batch convert`` reads, streaming, and appends to a schema file
(:class:`painn_export.schema.SchemaWriter`):

- any file ASE reads (extxyz, traj, ASE db, ...): energies and forces from
  ``--energy-key`` / ``--forces-key`` (``atoms.info`` / ``atoms.arrays``), or
  by default from the calculator results the file carries;
- ANI-style HDF5 (ANI-1, ANI-1x): a group per formula with ``coordinates``
  ``[C, N, 3]`` Å, ``species`` (symbols) or ``atomic_numbers`` ``[N]``, and
  energies ``[C]`` in hartree (``energies``, ``wb97x_dz.energy``, ...),
  forces in hartree/Å when present;
- SPICE-style HDF5: a group per molecule with ``atomic_numbers`` ``[N]``,
  ``conformations`` ``[C, N, 3]`` in bohr, ``dft_total_energy`` ``[C]`` in
  hartree and ``dft_total_gradient`` ``[C, N, 3]`` in hartree/bohr (forces are
  its negative).

Molecular datasets are non-periodic: zero cell, pbc false. Everything is
converted to Å, eV and eV/Å (CODATA 2018 constants).

``painn-batch export`` writes a run's results with the input structures as
extxyz, under prefixed keys (``painn_energy``, ``painn_forces``,
``painn_stress``, ``painn_status``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from painn_export.errors import one_line

HARTREE_EV = 27.211386245988  # eV per hartree (CODATA 2018)
BOHR_ANGSTROM = 0.529177210903  # Å per bohr (CODATA 2018)

ANI_ENERGY_KEYS = ("energies", "wb97x_dz.energy", "wb97x_tz.energy", "ccsd(t)_cbs.energy", "energy")
ANI_FORCES_KEYS = ("forces", "wb97x_dz.forces", "wb97x_tz.forces")
SPICE_ENERGY_KEY = "dft_total_energy"
SPICE_GRADIENT_KEY = "dft_total_gradient"

# One converted structure: (Z [n], positions [n, 3] Å, cell [3, 3] Å, pbc [3], energy eV or None,
# forces [n, 3] eV/Å or None, id[, fixed [n] bool or None: ASE FixAtoms])
Record = tuple


class ConvertError(ValueError):
    """The source cannot be converted; the message names the file and the key."""


def detect_format(path: Path) -> str:
    """``ani``, ``spice`` or ``ase`` from the file's content."""
    import h5py

    if not h5py.is_hdf5(path):
        return "ase"
    with h5py.File(path, "r") as fh:
        found = {"spice": False, "ani": False}

        def visit(name, obj):
            if isinstance(obj, h5py.Group):
                if "conformations" in obj and "atomic_numbers" in obj:
                    found["spice"] = True
                if "coordinates" in obj:
                    found["ani"] = True
            return None

        fh.visititems(visit)
    if found["spice"]:
        return "spice"
    if found["ani"]:
        return "ani"
    raise ConvertError(
        f"{path}: an HDF5 file, but neither ANI-style (coordinates) nor SPICE-style (conformations)"
    )


def read_ase(
    path: Path, energy_key: str | None, forces_key: str | None, index: str = ":"
) -> Iterator[Record]:
    try:
        import ase.io
    except ImportError as exc:
        raise ImportError("converting ASE-readable files needs ASE: pip install painn-export[ase]") from exc
    warned = False
    for k, atoms in enumerate(ase.io.iread(str(path), index=index)):
        energy = forces = None
        if energy_key:
            if energy_key not in atoms.info:
                raise ConvertError(f"{path}: structure {k} has no info key {energy_key!r}")
            energy = float(atoms.info[energy_key])
        elif atoms.calc is not None and "energy" in atoms.calc.results:
            energy = float(atoms.calc.results["energy"])
        if forces_key:
            if forces_key not in atoms.arrays:
                raise ConvertError(f"{path}: structure {k} has no per-atom array {forces_key!r}")
            forces = np.asarray(atoms.arrays[forces_key], dtype=np.float64)
        elif atoms.calc is not None and "forces" in atoms.calc.results:
            forces = np.asarray(atoms.calc.results["forces"], dtype=np.float64)
        cell = np.asarray(atoms.cell[:])
        fixed, others = _fixed_mask(atoms)
        if others and not warned:  # once per file
            warned = True
            logging.getLogger(__name__).warning(
                "%s: structure %d has %s constraints, which the schema cannot hold: dropped "
                "(only FixAtoms is carried, as 'fixed')",
                path,
                k,
                ", ".join(others),
            )
        yield (atoms.numbers, atoms.positions, cell, atoms.pbc, energy, forces, f"{k}", fixed)


def _fixed_mask(atoms) -> tuple[np.ndarray | None, list[str]]:
    """``[n]`` bool: the atoms ASE's ``FixAtoms`` constraints hold (None: none), and the other
    constraints' type names, which the schema cannot hold (``relax`` would not honour them)."""
    from ase.constraints import FixAtoms

    mask = np.zeros(len(atoms), dtype=bool)
    others = []
    for c in atoms.constraints:
        if isinstance(c, FixAtoms):
            mask[c.index] = True
        else:
            others.append(type(c).__name__)
    return (mask if mask.any() else None), others


def _dataset(path: Path, group, name: str, key: str, shape: tuple | None = None) -> np.ndarray:
    """``group[key]`` read whole, of ``shape`` (None: any length on that axis); errors name both."""
    where = f"{path}: group {name!r}, dataset {key!r}"
    if key not in group:
        raise ConvertError(f"{path}: group {name!r} has no dataset {key!r}")
    try:
        data = group[key][...]
    except (OSError, TypeError, ValueError) as exc:
        raise ConvertError(f"{where}: unreadable ({one_line(exc)})") from exc
    if shape is not None and (
        data.ndim != len(shape) or any(want not in (None, got) for want, got in zip(shape, data.shape))
    ):
        expected = ", ".join("C" if want is None else str(want) for want in shape)
        raise ConvertError(
            f"{where} is {list(data.shape)}, expected [{expected}] (conformations, atoms, xyz)"
        )
    return data


def _atomic_numbers(group, path: Path, name: str) -> np.ndarray:
    if "atomic_numbers" in group:
        return np.asarray(_dataset(path, group, name, "atomic_numbers"), dtype=np.int64).reshape(-1)
    if "species" in group:
        try:
            from ase.data import atomic_numbers
        except ImportError as exc:
            raise ImportError("element symbols ('species') need ASE: pip install painn-export[ase]") from exc
        species = _dataset(path, group, name, "species")
        symbols = [s.decode() if isinstance(s, bytes) else str(s) for s in species.reshape(-1)]
        unknown = sorted({s for s in symbols if s not in atomic_numbers or atomic_numbers[s] == 0})
        if unknown:
            raise ConvertError(
                f"{path}: group {name!r}, dataset 'species' has unknown element symbols {unknown}"
            )
        return np.array([atomic_numbers[s] for s in symbols], dtype=np.int64)
    raise ConvertError(f"{path}: group {name!r} has neither 'atomic_numbers' nor 'species'")


def _molecule_records(path: Path, g, name: str, keys: tuple, scales: tuple) -> Iterator[Record]:
    """One non-periodic record per conformation of the molecule group ``g`` (Å, eV, eV/Å).

    ``keys``: its coordinates, energy and forces datasets (None: absent);
    ``scales``: the factors that bring them to Å, eV and eV/Å. Each dataset
    is checked against the group's atoms and conformations, and an error
    names the group and the dataset.
    """
    coords_key, energy_key, forces_key = keys
    z = _atomic_numbers(g, path, name)
    coords = _dataset(path, g, name, coords_key, (None, len(z), 3)) * scales[0]
    n_conf = coords.shape[0]
    energies = _dataset(path, g, name, energy_key, (n_conf,)) * scales[1] if energy_key else None
    forces = _dataset(path, g, name, forces_key, (n_conf, len(z), 3)) * scales[2] if forces_key else None
    for c in range(n_conf):
        yield (
            z,
            coords[c].astype(np.float64),
            np.zeros((3, 3)),
            np.zeros(3, bool),
            None if energies is None else float(energies[c]),
            None if forces is None else forces[c].astype(np.float64),
            f"{name}/{c}",
        )


def read_ani(path: Path, energy_key: str | None, forces_key: str | None) -> Iterator[Record]:
    """ANI-style groups; coordinates Å, energies hartree, forces hartree/Å."""
    import h5py

    with h5py.File(path, "r") as fh:
        groups: list[str] = []
        fh.visititems(
            lambda name, obj: (
                groups.append(name) if isinstance(obj, h5py.Group) and "coordinates" in obj else None
            )
        )
        for name in groups:
            g = fh[name]
            if energy_key and energy_key not in g:
                raise ConvertError(f"{path}: group {name!r} has no dataset {energy_key!r}")
            e_key = energy_key or next((k for k in ANI_ENERGY_KEYS if k in g), None)
            f_key = forces_key or next((k for k in ANI_FORCES_KEYS if k in g), None)
            yield from _molecule_records(
                path, g, name, ("coordinates", e_key, f_key), (1.0, HARTREE_EV, HARTREE_EV)
            )


def read_spice(path: Path, energy_key: str | None, forces_key: str | None) -> Iterator[Record]:
    """SPICE-style groups; conformations bohr, energy hartree, gradient hartree/bohr (forces = -gradient)."""
    import h5py

    e_key = energy_key or SPICE_ENERGY_KEY
    g_key = forces_key or SPICE_GRADIENT_KEY
    scales = (BOHR_ANGSTROM, HARTREE_EV, -HARTREE_EV / BOHR_ANGSTROM)
    with h5py.File(path, "r") as fh:
        for name in fh:
            g = fh[name]
            if not isinstance(g, h5py.Group) or "conformations" not in g:
                continue
            keys = ("conformations", e_key if e_key in g else None, g_key if g_key in g else None)
            yield from _molecule_records(path, g, name, keys, scales)


def convert(
    source: str | Path,
    output: str | Path,
    *,
    fmt: str = "auto",
    energy_key: str | None = None,
    forces_key: str | None = None,
    chunk: int = 1024,
) -> int:
    """Convert ``source`` into the input schema at ``output``; returns the number of structures."""
    from painn_export.schema import SchemaWriter
    from pipelines.output import refuse_same_file

    source = Path(source)
    if not source.is_file():
        raise ConvertError(f"{source}: no such file")
    try:
        refuse_same_file(Path(output), source)
    except ValueError as exc:
        raise ConvertError(str(exc)) from exc
    fmt = detect_format(source) if fmt == "auto" else fmt
    reader = {"ase": read_ase, "ani": read_ani, "spice": read_spice}[fmt]
    count = 0
    with SchemaWriter(output) as writer:
        block: list[Record] = []
        try:
            for record in reader(source, energy_key, forces_key):
                block.append(record)
                if len(block) >= chunk:
                    writer.append(block)
                    count += len(block)
                    block = []
            writer.append(block)
        except (ValueError, TypeError, KeyError, IndexError, AssertionError) as exc:
            if isinstance(exc, ConvertError):
                raise
            first = (str(exc).strip().splitlines() or [""])[0]
            raise ConvertError(
                f"{source}: not readable as {fmt} near structure {count + len(block)} "
                f"({type(exc).__name__}: {first}); check the file, or pass --format"
            ) from exc
        count += len(block)
        writer.attrs["source"] = str(source)
        writer.attrs["source_format"] = fmt
    return count


def export_extxyz(
    result: str | Path,
    input_path: str | Path,
    output: str | Path,
    prefix: str = "painn_",
    indices: list[int] | None = None,
) -> int:
    """Write the input structures with a run's results under ``prefix`` keys as extxyz.

    ``indices``: only these structures (0-based, in the files' order), e.g.
    the worst ones a ``painn-batch report`` lists; default every one.

    The result must have been computed from ``input_path`` (its input
    fingerprint is checked). Frames are written one at a time, so memory does
    not grow with the file, into a temporary file beside OUTPUT, renamed when complete and
    removed on any failure. The text is UTF-8 whatever the locale.
    """
    import h5py

    try:
        import ase.io
        from ase import Atoms
        from ase.constraints import FixAtoms
    except ImportError as exc:
        raise ImportError("painn-batch export needs ASE: pip install painn-export[ase]") from exc
    from painn_export.schema import InputReader, iter_structures
    from pipelines.output import STATUS, input_sha256, refuse_same_file, written_whole

    try:
        refuse_same_file(Path(output), result, input_path)
    except ValueError as exc:
        raise ConvertError(str(exc)) from exc
    names = {v: k for k, v in STATUS.items()}
    with InputReader(input_path) as reader, h5py.File(result, "r") as res:
        offsets = reader.offsets
        if "status" not in res or "energy" not in res:
            raise ConvertError(f"{result}: not a painn-batch output (no 'status'/'energy')")
        recorded = res.attrs.get("fingerprint_input_sha256")
        if recorded is None or str(recorded) != input_sha256(input_path):
            raise ConvertError(
                f"{result} was not computed from {input_path} (input fingerprints differ): "
                "give the --input that painn-batch run read"
            )
        if indices is not None:
            indices = sorted(set(indices))
            if indices and not 0 <= indices[0] <= indices[-1] < reader.n_structures:
                raise ConvertError(f"--index: {input_path} has structures 0 to {reader.n_structures - 1}")
        selected = enumerate(iter_structures(input_path)) if indices is None else _picked(reader, indices)
        count = 0
        with written_whole(Path(output)) as tmp, open(tmp, "w", encoding="utf-8") as out:
            for s, sample in selected:
                atoms = Atoms(
                    numbers=sample.atomic_numbers,
                    positions=sample.positions,
                    cell=sample.cell,
                    pbc=sample.pbc,
                )
                if "positions" in res and np.isfinite(res["cell"][s]).all():  # a relaxation's result
                    atoms.set_cell(res["cell"][s])
                    atoms.set_positions(res["positions"][offsets[s] : offsets[s + 1]])
                fixed = reader.fixed(s, s + 1)
                if fixed.any():
                    atoms.set_constraint(FixAtoms(mask=fixed))
                atoms.info[f"{prefix}energy"] = float(res["energy"][s])
                atoms.info[f"{prefix}status"] = names.get(int(res["status"][s]), str(res["status"][s]))
                atoms.info["id"] = sample.name
                atoms.arrays[f"{prefix}forces"] = res["forces"][offsets[s] : offsets[s + 1]]
                if "stress" in res:
                    atoms.info[f"{prefix}stress"] = res["stress"][s].reshape(-1)
                ase.io.write(out, atoms, format="extxyz")
                count += 1
    return count


def _picked(reader, indices: list[int]):
    """``(index, Sample)`` of the structures ``indices``, read one at a time."""
    from painn_export.samples import Sample

    for s in indices:
        z, pos, cell, pbc = reader.structures(s, s + 1)
        yield s, Sample(reader.ids(s, s + 1)[0], z, pos, cell[0], pbc[0])
