"""The HDF5 input schema: flat CSR-style arrays, one row range per structure.

Input datasets (first axis chunked and resizable, so files stream and append):

=================  =======  ============  ==========================================
dataset            dtype    shape         meaning
=================  =======  ============  ==========================================
``atomic_numbers`` int      ``[Σn]``      all atoms of all structures, concatenated
``positions``      float    ``[Σn, 3]``   Å (attribute ``units="Angstrom"``)
``atom_offset``    int      ``[S+1]``     structure s owns atoms ``atom_offset[s]:atom_offset[s+1]``
``cell``           float    ``[S, 3, 3]`` Å, rows are lattice vectors
``pbc``            bool     ``[S, 3]``    periodicity along each lattice vector
=================  =======  ============  ==========================================

Optional: ``ids`` ``[S]`` strings, reference ``energy`` ``[S]`` eV and
``forces`` ``[Σn, 3]`` eV/Å, and ``fixed`` ``[Σn]`` bool: atoms a relaxation
holds where they are (ASE's ``FixAtoms``; absent: every atom is free). A
malformed file fails before any work, with a message naming the file and
the dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from painn_export.files import WatchedFile, durable_replace, temporary_path

REQUIRED = {
    "atomic_numbers": ("i", 1),
    "positions": ("f", 2),
    "atom_offset": ("i", 1),
    "cell": ("f", 3),
    "pbc": ("b", 2),
}


class SchemaError(ValueError):
    """The input file is not usable; the message names the file and dataset."""


@dataclass(frozen=True)
class InputFile:
    path: Path
    n_structures: int
    n_atoms: int
    has_reference: bool


def validate_input(path: str | Path) -> InputFile:
    """Open ``path`` and check every required dataset's presence, dtype and shape."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise SchemaError(f"{path}: no such file")
    try:
        fh = h5py.File(path, "r")
    except OSError as exc:
        raise SchemaError(f"{path}: not a readable HDF5 file ({exc})") from exc
    try:
        with fh:
            return _check(path, fh)
    except SchemaError:
        raise
    except (KeyError, OSError, ValueError, TypeError) as exc:  # a damaged file: h5py's own errors
        raise SchemaError(f"{path}: damaged HDF5 file ({type(exc).__name__}: {exc})") from exc


def _check(path: Path, fh) -> InputFile:
    """Every required dataset's presence, dtype and shape, in the open file ``fh``."""
    for name, (kind, ndim) in REQUIRED.items():
        if name not in fh:
            raise SchemaError(f"{path}: missing dataset '{name}'")
        ds = fh[name]
        ok_kind = ds.dtype.kind in ("i", "u") if kind == "i" else ds.dtype.kind in (kind, "u", "i")
        if not ok_kind or ds.ndim != ndim:
            raise SchemaError(
                f"{path}: dataset '{name}' has dtype {ds.dtype} and shape {ds.shape}, "
                f"expected {ndim}-d of kind '{kind}'"
            )
    n_atoms = fh["atomic_numbers"].shape[0]
    offsets = fh["atom_offset"][...]
    s = offsets.shape[0] - 1
    checks = [
        (fh["positions"].shape == (n_atoms, 3), "positions", f"[{n_atoms}, 3]"),
        (
            s >= 0 and offsets[0] == 0 and offsets[-1] == n_atoms and np.all(np.diff(offsets) >= 0),
            "atom_offset",
            f"non-decreasing from 0 to {n_atoms}",
        ),
        (fh["cell"].shape == (s, 3, 3), "cell", f"[{s}, 3, 3]"),
        (fh["pbc"].shape == (s, 3), "pbc", f"[{s}, 3]"),
    ]
    for ok, name, expected in checks:
        if not ok:
            raise SchemaError(f"{path}: dataset '{name}' must be {expected}, got shape {fh[name].shape}")
    has_ref = "energy" in fh and "forces" in fh
    if has_ref and (fh["energy"].shape != (s,) or fh["forces"].shape != (n_atoms, 3)):
        raise SchemaError(f"{path}: reference 'energy'/'forces' must be [{s}] and [{n_atoms}, 3]")
    if "fixed" in fh and (fh["fixed"].shape != (n_atoms,) or fh["fixed"].dtype.kind not in "biu"):
        raise SchemaError(
            f"{path}: dataset 'fixed' has dtype {fh['fixed'].dtype} and shape {fh['fixed'].shape}, "
            f"expected [{n_atoms}] bool (one flag per atom)"
        )
    return InputFile(path, s, n_atoms, has_ref)


# The datasets that define the structures (what an output's input fingerprint hashes);
# ``fixed`` only where a file has it, so files without it hash as before.
STRUCTURE_DATASETS = ("atom_offset", "cell", "pbc", "atomic_numbers", "positions", "fixed")


class InputReader:
    """An open input file read by ranges of structures: the schema's one reader.

    The neighbour workers, the pipeline's writer and summary, the input
    fingerprint and ``parity --input`` all read through it. Use it as a
    context manager (or call :meth:`close`).
    """

    def __init__(self, path: str | Path) -> None:
        import h5py

        self.path = Path(path)
        try:
            self.fh = h5py.File(self.path, "r")
            self.offsets = self.fh["atom_offset"][...].astype(np.int64)  # [S + 1]
        except (OSError, KeyError) as exc:
            raise SchemaError(f"{self.path}: not a readable input file ({exc})") from exc

    @property
    def n_structures(self) -> int:
        return len(self.offsets) - 1

    def __enter__(self) -> InputReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.fh.close()

    def structures(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Structures ``lo..hi``: Z int64 and positions float64 Å of their atoms, cells Å, pbc."""
        a0, a1 = int(self.offsets[lo]), int(self.offsets[hi])
        fh = self.fh
        return (
            fh["atomic_numbers"][a0:a1].astype(np.int64),
            fh["positions"][a0:a1].astype(np.float64),
            fh["cell"][lo:hi].astype(np.float64),
            fh["pbc"][lo:hi].astype(bool),
        )

    def labels(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Reference energies ``[hi - lo]`` eV and forces of their atoms eV/Å."""
        a0, a1 = int(self.offsets[lo]), int(self.offsets[hi])
        return self.fh["energy"][lo:hi], self.fh["forces"][a0:a1]

    def fixed(self, lo: int, hi: int) -> np.ndarray:
        """``[atoms of lo..hi]`` bool: atoms held fixed in a relaxation (all False without ``fixed``)."""
        a0, a1 = int(self.offsets[lo]), int(self.offsets[hi])
        if "fixed" not in self.fh:
            return np.zeros(a1 - a0, dtype=bool)
        return self.fh["fixed"][a0:a1].astype(bool)

    def ids(self, lo: int, hi: int) -> list[str]:
        """Structure names ``lo..hi``: the ``ids`` dataset (UTF-8) or ``structure N``."""
        if "ids" not in self.fh:
            return [f"structure {s}" for s in range(lo, hi)]
        ds = self.fh["ids"]
        values = ds.asstr(errors="replace")[lo:hi] if ds.dtype.kind in "SO" else ds[lo:hi]
        return [str(v) for v in values]

    def structure_blocks(self, rows: int = 1 << 20):
        """The raw bytes of :data:`STRUCTURE_DATASETS`, in blocks (for a fingerprint)."""
        for name in STRUCTURE_DATASETS:
            if name not in self.fh:  # only the optional 'fixed'
                continue
            ds = self.fh[name]
            for lo in range(0, ds.shape[0], rows):
                yield np.ascontiguousarray(ds[lo : lo + rows]).tobytes()


def write_input(path: str | Path, structures, energies=None, forces=None, ids=None, fixed=None) -> Path:
    """Write structures ``(Z, positions, cell, pbc)`` in this schema (chunked, resizable).

    ``fixed``: per structure, a ``[n]`` bool mask of atoms a relaxation holds (None: none).
    """
    import h5py

    z = [np.asarray(s[0], np.int64) for s in structures]
    counts = np.array([len(a) for a in z], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    with h5py.File(path, "w") as fh:

        def put(name, data, units=None):
            data = np.asarray(data)
            ds = fh.create_dataset(name, data=data, chunks=True, maxshape=(None, *data.shape[1:]))
            if units:
                ds.attrs["units"] = units

        put("atomic_numbers", np.concatenate(z) if z else np.zeros(0, np.int64))
        put(
            "positions",
            np.concatenate([np.asarray(s[1], float) for s in structures]).reshape(-1, 3),
            "Angstrom",
        )
        put("atom_offset", offsets)
        put("cell", np.array([s[2] for s in structures], float).reshape(-1, 3, 3), "Angstrom")
        put("pbc", np.array([s[3] for s in structures], bool).reshape(-1, 3))
        if energies is not None:
            put("energy", np.asarray(energies, float), "eV")
            put(
                "forces", np.concatenate([np.asarray(f, float) for f in forces]).reshape(-1, 3), "eV/Angstrom"
            )
        if ids is not None:
            fh.create_dataset("ids", data=np.array(ids, dtype=h5py.string_dtype()))
        if fixed is not None:
            put("fixed", np.concatenate([np.asarray(f, bool).reshape(-1) for f in fixed]))
    return Path(path)


class SchemaWriter:
    """Appends structures to a new schema file, block by block (chunked, resizable datasets).

    ``append`` takes records ``(Z, positions, cell, pbc, energy, forces, id)``
    (energy/forces may be None), optionally with an eighth item, the ``[n]``
    bool ``fixed`` mask (None: no atom fixed); reference labels are written
    when every structure has them, ``fixed`` when some atom is fixed.
    """

    def __init__(self, path: str | Path) -> None:
        import h5py

        self.path = Path(path)
        self._tmp = temporary_path(self.path)
        self._raw = WatchedFile(self._tmp, "w+")  # see WatchedFile: a full disk is an OSError
        self.fh = h5py.File(self._raw, "w")
        self.attrs = self.fh.attrs
        self.n_structures = self.n_atoms = 0
        self.labelled = True
        self.any_fixed = False
        f = self.fh
        f.create_dataset("atomic_numbers", (0,), np.int64, maxshape=(None,), chunks=(65536,))
        f.create_dataset("positions", (0, 3), np.float64, maxshape=(None, 3), chunks=(65536, 3))
        f.create_dataset("atom_offset", data=np.zeros(1, np.int64), maxshape=(None,), chunks=(16384,))
        f.create_dataset("cell", (0, 3, 3), np.float64, maxshape=(None, 3, 3), chunks=(4096, 3, 3))
        f.create_dataset("pbc", (0, 3), bool, maxshape=(None, 3), chunks=(16384, 3))
        f.create_dataset("energy", (0,), np.float64, maxshape=(None,), chunks=(16384,))
        f.create_dataset("forces", (0, 3), np.float64, maxshape=(None, 3), chunks=(65536, 3))
        f.create_dataset("ids", (0,), h5py.string_dtype(), maxshape=(None,), chunks=(16384,))
        f.create_dataset("fixed", (0,), bool, maxshape=(None,), chunks=(65536,))
        for name, units in (
            ("positions", "Angstrom"),
            ("cell", "Angstrom"),
            ("energy", "eV"),
            ("forces", "eV/Angstrom"),
        ):
            f[name].attrs["units"] = units

    def append(self, records) -> None:
        if not records:
            return
        self._raw.check(self.path)
        f = self.fh
        counts = np.array([len(r[0]) for r in records], dtype=np.int64)
        s0, s1 = self.n_structures, self.n_structures + len(records)
        a0, a1 = self.n_atoms, self.n_atoms + int(counts.sum())

        def put(name, lo, hi, data):
            f[name].resize(hi, axis=0)
            f[name][lo:hi] = data

        put("atomic_numbers", a0, a1, np.concatenate([np.asarray(r[0], np.int64) for r in records]))
        put(
            "positions",
            a0,
            a1,
            np.concatenate([np.asarray(r[1], np.float64).reshape(-1, 3) for r in records]),
        )
        put("atom_offset", s0 + 1, s1 + 1, a0 + np.cumsum(counts))
        put("cell", s0, s1, np.array([np.asarray(r[2], np.float64) for r in records]))
        put("pbc", s0, s1, np.array([np.asarray(r[3], bool) for r in records]))
        put("ids", s0, s1, np.array([str(r[6]) for r in records], dtype=object))
        fixed = [
            np.zeros(n, bool) if len(r) < 8 or r[7] is None else np.asarray(r[7], bool).reshape(n)
            for r, n in zip(records, counts)
        ]
        put("fixed", a0, a1, np.concatenate(fixed))
        self.any_fixed |= bool(any(f.any() for f in fixed))
        self.labelled &= all(r[4] is not None and r[5] is not None for r in records)
        if self.labelled:
            put("energy", s0, s1, np.array([r[4] for r in records], np.float64))
            put(
                "forces",
                a0,
                a1,
                np.concatenate([np.asarray(r[5], np.float64).reshape(-1, 3) for r in records]),
            )
        self.n_structures, self.n_atoms = s1, a1
        self._raw.check(self.path)

    def close(self) -> None:
        """Finish the file and give it its name; on failure nothing is left beside it."""
        try:
            self._raw.check(self.path)
            if not self.labelled:  # labels only when every structure has them
                del self.fh["energy"], self.fh["forces"]
            if not self.any_fixed:  # files without fixed atoms hash and read as before
                del self.fh["fixed"]
            self.fh.close()
            self._raw.check(self.path)  # what closing wrote
            self._raw.close()
            durable_replace(self._tmp, self.path)
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        """Drop the unfinished file (after a failure): closed as far as it can be, then removed."""
        for closing in (self.fh.close, self._raw.close):
            try:
                closing()
            except Exception:  # already failing; the file goes anyway
                pass
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> SchemaWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()


def iter_structures(path: str | Path, limit: int | None = None, block: int = 1024):
    """The first ``limit`` structures of a schema file as ``Sample``s, read ``block`` at a time."""
    from painn_export.samples import Sample

    info = validate_input(path)
    count = info.n_structures if limit is None else min(limit, info.n_structures)
    with InputReader(path) as reader:
        offsets = reader.offsets
        for lo in range(0, count, block):
            hi = min(lo + block, count)
            z, pos, cells, pbcs = reader.structures(lo, hi)
            ids = reader.ids(lo, hi)
            for s in range(lo, hi):
                a, b = offsets[s] - offsets[lo], offsets[s + 1] - offsets[lo]
                yield Sample(ids[s - lo], z[a:b], pos[a:b], cells[s - lo], pbcs[s - lo])


def read_structures(path: str | Path, limit: int | None = None) -> list:
    """The first ``limit`` structures of a schema file, as a list (see :func:`iter_structures`)."""
    return list(iter_structures(path, limit))
