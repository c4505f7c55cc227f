"""The output HDF5 file: preallocated, crash-safe, fingerprinted, resumable.

==============  =========  ===============  ==========================================
dataset         dtype      shape            meaning
==============  =========  ===============  ==========================================
``energy``      float64    ``[S]``          eV; NaN until computed
``forces``      float64    ``[Σn, 3]``      eV/Å, rows as the input's atoms; NaN until computed
``stress``      float64    ``[S, 3, 3]``    eV/Å^3 (gradient-force models with stress only)
``status``      int8       ``[S]``          :data:`STATUS` code; 0 = pending
``message``     ``S160``   ``[S]``          why a structure failed (empty when ok)
==============  =========  ===============  ==========================================

Every dataset is contiguous and written in full (NaN, pending) when the file
is created, so later writes only touch raw data, never HDF5's metadata: a
process killed at any moment leaves a readable file. A batch is committed
data first, then status, each followed by a flush, so a structure whose
status says ``ok`` has its numbers on disk. The run writes ``OUT.partial.h5``
and renames it to ``OUT`` when every structure has a final status.

Attributes fingerprint the input (SHA-256 of its arrays), the model file,
the runtime and its precision, and the package version: ``--resume`` refuses a
partial file written for anything else.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from painn_export.files import FileWriteError, WatchedFile, written_whole
from pipelines.signals import signal_of, stop_on_signals

# Per-structure status codes written to the output's `status` dataset.
STATUS = {
    "pending": 0,
    "ok": 1,
    "nonfinite_positions": 2,
    "bad_cell": 3,
    "unknown_element": 4,
    "empty_structure": 5,
    "atoms_too_close": 6,
    "nonfinite_output": 7,
    "bad_shape": 8,
    "ok_no_stress": 9,  # energy and forces ok; stress undefined (cell without volume)
    "too_large": 10,  # failed alone in a batch (memory, engine profile)
    # painn-batch relax (pipelines.relax): how a relaxation ended.
    "converged": 11,  # largest force on a free atom (and cell dof with --cell) below fmax
    "not_converged": 12,  # --steps taken without converging; the last geometry is written
    "diverged": 13,  # non-finite energy or forces, or atoms closer than the guard, mid-relaxation
}
# What each status means: the report page and docs/failures.md show it.
STATUS_MEANING = {
    "pending": "not computed yet: the run was stopped, or is still running (--resume computes it)",
    "ok": "energy and forces computed (and the stress, where the model has one)",
    "nonfinite_positions": "a position is NaN or inf",
    "bad_cell": "a periodic lattice vector is NaN, zero or not independent of the others "
    "(relax --cell: a structure not periodic in all three directions)",
    "unknown_element": "an atomic number outside the model's 1..num_elements",
    "empty_structure": "no atoms",
    "atoms_too_close": "two atoms, or an atom and its own periodic image, closer than 0.5 Å",
    "nonfinite_output": "the model returned NaN or inf for it",
    "bad_shape": "positions, cell, pbc or atomic numbers of the wrong shape",
    "ok_no_stress": "energy and forces computed; the stress is NaN because the cell has no volume",
    "too_large": "out of memory (or beyond a TensorRT engine's profiles) even alone in a batch",
    "converged": "relaxed: the largest force on a free atom (and cell row with --cell) below --fmax",
    "not_converged": "--steps taken without converging; the last geometry, energy and forces are written",
    "diverged": (
        "energy, forces or stress not finite, atoms closer than 0.5 Å, or (`--cell`) a cell turned "
        "inside out or singular, during the relaxation"
    ),
}
SUCCESS = {"ok", "ok_no_stress"}
RELAXED = {"converged"}  # what counts as success for a relaxation
MESSAGE_BYTES = 160

# What to do about each status: with STATUS_MEANING, the table docs/failures.md shows (status_table).
STATUS_ADVICE = {
    "pending": "rerun the command with --resume",
    "ok": "use it",
    "nonfinite_positions": "fix the input structure",
    "bad_cell": "give real lattice vectors, or mark the axis non-periodic",
    "unknown_element": "a model trained on that element",
    "empty_structure": "-",
    "atoms_too_close": "check the structure (a duplicated atom, a cell too small)",
    "nonfinite_output": "report it with the structure",
    "bad_shape": "fix the input file (painn-batch convert writes the schema)",
    "ok_no_stress": "expected for molecules and slabs without a cell",
    "too_large": "a smaller --max-atoms does not help: a device with more memory, or an engine with "
    "larger profiles",
    "converged": "use it",
    "not_converged": "raise --steps, or check the structure (a saddle, a soft mode)",
    "diverged": "the model leaves its training domain along the path: check the start geometry, "
    "or use a better model",
}


def status_table() -> str:
    """Every status as docs/failures.md shows it (tests/test_contract.py keeps them equal)."""
    lines = ["| status | code | meaning | what to do |", "| --- | ---: | --- | --- |"]
    for name, code in STATUS.items():
        lines.append(f"| `{name}` | {code} | {STATUS_MEANING[name]} | {STATUS_ADVICE[name]} |")
    return "\n".join(lines)


_FILL_ROWS = 1 << 20  # rows read per block when hashing the input
_FILL_BYTES = 1 << 26  # bytes written per block when preallocating (rows of any size)


class ResumeError(ValueError):
    """A partial output that cannot be resumed for this run; the message says why."""


# An output that could not be written (disk full, file size limit, I/O error): names file and cause.
OutputWriteError = FileWriteError


@contextmanager
def output_folder(output: Path) -> Iterator[None]:
    """Make the folders ``output`` lies in; those made here go again, empty, when the block fails."""
    made = list(itertools.takewhile(lambda p: not p.exists(), [output.parent, *output.parent.parents]))
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create the output folder {output.parent}: {exc.strerror or exc}") from exc
    try:
        yield
    except BaseException:
        for folder in made:  # the deepest first
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def partial_path(output: Path) -> Path:
    """Where a run on ``output`` keeps its work until every structure has a final status."""
    return output.with_name(output.name.removesuffix(".h5") + ".partial.h5")


@dataclass(frozen=True)
class Fingerprint:
    input_sha256: str
    n_structures: int
    n_atoms: int
    model_sha256: str
    runtime: str
    precision: str
    stress: bool
    package_version: str
    device: str = "cpu"  # cpu or cuda: where the runtime ran
    provider: str = (
        "cpu"  # what ran it: cpu, cuda (torch, AOTInductor, ONNX Runtime's CUDA provider), tensorrt
    )


def input_sha256(path: str | Path) -> str:
    """SHA-256 over the input's structure arrays (streamed in blocks)."""
    from painn_export.schema import InputReader

    digest = hashlib.sha256()
    with InputReader(path) as reader:
        for block in reader.structure_blocks(_FILL_ROWS):
            digest.update(block)
    return digest.hexdigest()


def create(
    path: Path,
    fp: Fingerprint,
    status_codes: dict[str, int] = STATUS,
    extra: dict[str, tuple[tuple[int, ...], type, float]] | None = None,
) -> None:
    """Write a new output file with every dataset allocated and filled (NaN, pending).

    ``extra``: more datasets, ``name -> (shape, dtype, fill)``, allocated and
    filled in the same way (a relaxation's geometry and optimiser state).

    Only a fully created file ever has the partial name (:func:`written_whole`).
    HDF5 writes it through a Python file object: when the disk fills, HDF5's
    own file driver fails to close the file and the process crashes
    (h5py issue 914), where this one raises the system's error.
    """
    import h5py

    with written_whole(path) as tmp, WatchedFile(tmp, "w+") as raw:
        fh = h5py.File(raw, "w")
        try:
            _fill(fh, fp, status_codes, extra)
        finally:
            fh.close()
        raw.check(path)


def output_datasets(n_structures: int, n_atoms: int, stress: bool, extra=None) -> dict:
    """Every dataset of a new output, ``name -> (shape, dtype, fill)``: run's, ``extra``'s, then status."""
    sets = {"energy": ((n_structures,), np.float64, np.nan), "forces": ((n_atoms, 3), np.float64, np.nan)}
    if stress:
        sets["stress"] = ((n_structures, 3, 3), np.float64, np.nan)
    sets.update(extra or {})
    sets["status"] = ((n_structures,), np.int8, 0)
    sets["message"] = ((n_structures,), np.dtype(f"S{MESSAGE_BYTES}"), b"")
    return sets


def planned_bytes(datasets: dict) -> int:
    """Bytes of the data of :func:`output_datasets` (what a new output file takes, less HDF5's few KB)."""
    return sum(
        int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        for shape, dtype, _ in datasets.values()
    )


def _fill(fh, fp: Fingerprint, status_codes: dict[str, int], extra) -> None:
    """Every dataset of a new output, allocated and filled (NaN, pending), and the fingerprint."""
    for name, (shape, dtype, fill) in output_datasets(fp.n_structures, fp.n_atoms, fp.stress, extra).items():
        ds = fh.create_dataset(name, shape=shape, dtype=dtype)
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
        block = max(1, _FILL_BYTES // max(1, row_bytes))
        for lo in range(0, shape[0], block):
            hi = min(lo + block, shape[0])
            ds[lo:hi] = np.full((hi - lo, *shape[1:]), fill, dtype=dtype)
    fh["energy"].attrs["units"] = "eV"
    fh["forces"].attrs["units"] = "eV/Angstrom"
    if fp.stress:
        fh["stress"].attrs["units"] = "eV/Angstrom^3"
    fh.attrs.update({f"fingerprint_{k}": v for k, v in asdict(fp).items()})
    fh.attrs["status_codes"] = json.dumps(status_codes)


def check_resumable(path: Path, fp: Fingerprint) -> None:
    """Raise ResumeError unless ``path`` was created for exactly this input, model and runtime."""
    import h5py

    try:
        with h5py.File(path, "r") as fh:
            stored = {
                k.removeprefix("fingerprint_"): v for k, v in fh.attrs.items() if k.startswith("fingerprint_")
            }
    except OSError as exc:
        from painn_export.errors import one_line

        raise ResumeError(f"{path}: unreadable ({one_line(exc)}); delete it to start over") from exc
    extra = sorted(set(stored) - set(asdict(fp)))
    if extra:  # e.g. a relaxation's partial file given to `run`
        raise ResumeError(
            f"{path} was written by another painn-batch command (its fingerprint has {', '.join(extra)}): "
            "resume it with that command, or write to another output"
        )
    missing = sorted(set(asdict(fp)) - set(stored))
    if missing:  # e.g. a run's partial file given to `relax`
        raise ResumeError(
            f"{path} was written by another painn-batch command (its fingerprint lacks "
            f"{', '.join(missing)}): resume it with that command, or write to another output"
        )
    for key, value in asdict(fp).items():
        got = stored.get(key)
        got = got.item() if hasattr(got, "item") else got
        if got != value:
            raise ResumeError(
                f"{path} was written for {key}={got!r}, this run has {value!r}: "
                "resume with the same input, model and runtime, or delete it to start over"
            )


def open_partial(
    partial: Path,
    output_path: Path,
    fp: Fingerprint,
    resume: bool,
    extra: dict[str, tuple[tuple[int, ...], type, float]] | None = None,
) -> None:
    """Make ``partial`` the file this run writes: resumed (a finished output resumes to itself, a
    partial one continues) after :func:`check_resumable`, or created anew (:func:`create`)."""
    if resume and not partial.exists() and output_path.exists():
        check_resumable(output_path, fp)
        output_path.replace(partial)
    elif resume and partial.exists():
        check_resumable(partial, fp)
    else:
        create(partial, fp, extra=extra)


def contiguous_runs(indices) -> list[slice]:
    """Slices of ``indices`` (sorted) over which they increase by one: one hyperslab each."""
    if not len(indices):
        return []
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    bounds = [0, *breaks.tolist(), len(indices)]
    return [slice(a, b) for a, b in itertools.pairwise(bounds)]


def write_rows(dataset, index: np.ndarray, data: np.ndarray, offsets: np.ndarray | None = None) -> None:
    """``data`` into the rows of the structures ``index`` (increasing), in one HDF5 write.

    ``dataset`` is per structure (row ``s``), or per atom with ``offsets``
    (rows ``offsets[s]:offsets[s + 1]``); ``data`` holds those rows in order.
    The rows are one selection (a union of hyperslabs, a run of consecutive
    structures one each): a relaxation's finished structures are scattered
    over the file, and h5py's overhead per write outweighs the bytes.
    """
    from h5py import h5s

    index = np.asarray(index, dtype=np.int64)
    if not index.size:
        return
    if (np.diff(index) <= 0).any():  # HDF5 walks a selection in file order, not in the order given
        raise ValueError("write_rows takes strictly increasing structure indices")
    data = np.ascontiguousarray(data, dtype=dataset.dtype)
    tail = dataset.shape[1:]
    space = dataset.id.get_space()
    space.select_none()
    for run in contiguous_runs(index):
        lo, hi = int(index[run.start]), int(index[run.stop - 1]) + 1
        if offsets is not None:
            lo, hi = int(offsets[lo]), int(offsets[hi])
        if hi > lo:
            space.select_hyperslab((lo,) + (0,) * len(tail), (hi - lo, *tail), op=h5s.SELECT_OR)
    if data.shape[0] != space.get_select_npoints() // max(1, int(np.prod(tail, dtype=np.int64))):
        raise ValueError(f"{data.shape[0]} rows of data for {space.get_select_npoints()} selected elements")
    if data.size:
        dataset.id.write(h5s.create_simple(data.shape), space, data)


class Writer:
    """Commits batches into an open output file: data, flush, status, flush."""

    def __init__(self, path: Path, offsets: np.ndarray) -> None:
        import h5py

        self.fh = h5py.File(path, "r+")
        self.offsets = offsets
        self.has_stress = "stress" in self.fh
        self._sets: dict = {}

    def dataset(self, name: str):
        """The open dataset ``name`` (looked up once: h5py's lookup by name is not free)."""
        if name not in self._sets:
            self._sets[name] = self.fh[name]
        return self._sets[name]

    def pending(self) -> np.ndarray:
        """Indices of the structures without a final status."""
        return np.flatnonzero(self.dataset("status")[...] == STATUS["pending"])

    def commit_results(self, rows: list[tuple[int, float, np.ndarray, np.ndarray | None, str]]) -> None:
        """``rows``: (structure, energy, forces [n, 3], stress [3, 3] or None, status name)."""
        if not rows:
            return
        rows = sorted(rows, key=lambda r: r[0])
        index = np.array([r[0] for r in rows], dtype=np.int64)
        write_rows(self.dataset("energy"), index, np.array([r[1] for r in rows], dtype=np.float64))
        write_rows(self.dataset("forces"), index, np.concatenate([r[2] for r in rows]), self.offsets)
        with_stress = [r for r in rows if r[3] is not None]
        if self.has_stress and with_stress:
            stressed = np.array([r[0] for r in with_stress], dtype=np.int64)
            write_rows(self.dataset("stress"), stressed, np.stack([r[3] for r in with_stress]))
        self.fh.flush()
        self.commit_status([(s, kind, "") for s, _, _, _, kind in rows])

    def commit_status(self, rows: list[tuple[int, str, str]]) -> None:
        """``rows``: (structure, status name, message)."""
        if not rows:
            return
        rows = sorted(rows, key=lambda r: r[0])
        message = self.dataset("message")
        for s, _, text in rows:
            if text:
                message[s] = text.encode("utf-8", "replace")[:MESSAGE_BYTES]
        index = np.array([r[0] for r in rows], dtype=np.int64)
        write_rows(self.dataset("status"), index, np.array([STATUS[r[1]] for r in rows], np.int8))
        self.fh.flush()

    def status_counts(self) -> dict[str, int]:
        names = {v: k for k, v in STATUS.items()}
        codes, counts = np.unique(self.dataset("status")[...], return_counts=True)
        return {names[int(c)]: int(n) for c, n in zip(codes, counts)}

    def close(self) -> None:
        self.fh.close()


class OutputBusyError(ResumeError):
    """Another process holds the output's lock: it is writing that file now."""


class OutputLock:
    """An exclusive lock on an output path, held for a whole run (``OUT.lock`` beside it).

    A second run (or ``--resume``) on the same output is refused while the
    first holds it, instead of both writing one file. The lock is the kernel's
    (``flock``), so a killed run never leaves a stale one; the file itself
    is removed when the run ends, or when taking the lock fails (a full disk).
    """

    def __init__(self, output: Path) -> None:
        self.path = output.with_name(output.name + ".lock")
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        import fcntl
        import os

        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise OutputWriteError(self.path, exc) from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
                os.close(fd)
                output = self.path.with_name(self.path.name.removesuffix(".lock"))
                raise OutputBusyError(
                    f"another painn-batch run (pid {holder}) is writing {output} now: wait for it to "
                    "finish, or write to another --output; its partial file is not yours to delete"
                ) from None
            # Locked; make sure the file was not removed by a run that just ended.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self._fd = fd
        try:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        except BaseException as exc:
            self.__exit__()
            if isinstance(exc, OSError):
                raise OutputWriteError(self.path, exc) from exc
            raise
        return self

    def __exit__(self, *exc) -> None:
        import os

        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)  # releases the lock
            self._fd = None


def refuse_same_file(output: Path, *inputs: str | Path) -> None:
    """Raise ValueError when ``output`` is one of ``inputs`` (also through links)."""
    import os

    for source in inputs:
        if Path(output).exists() and os.path.samefile(output, source):
            raise ValueError(
                f"{output} is the input file {source}: choose another output, the input would be lost"
            )


class RunInterruptedError(RuntimeError):
    """A stop signal (Ctrl-C, SIGTERM, SIGHUP): what was done is kept; ``--resume`` continues."""

    def __init__(self, sig: signal.Signals, partial: Path) -> None:
        if partial.exists():
            what = f"what was computed is kept in {partial}: rerun with --resume to continue"
        else:
            what = "before any result was written: rerun the command to start"
        super().__init__(f"stopped by {sig.name}; {what}")
        self.signal = sig
        self.exit_code = 128 + sig  # the shell's convention: 130 SIGINT, 129 SIGHUP, 143 SIGTERM


@contextmanager
def output_session(input_path, output_path: Path, resume: bool, overwrite: bool) -> Iterator[Path]:
    """What every command that writes an output runs inside; yields the partial file's path.

    Stop signals (their one line and exit code), the output's folder (made,
    and removed again if the command fails before writing), its lock, and the
    refusals: the output is the input, or exists without ``resume`` or
    ``overwrite``. A stop signal becomes :class:`RunInterruptedError`.
    """
    partial = partial_path(output_path)
    try:
        with stop_on_signals(), output_folder(output_path), OutputLock(output_path):
            refuse_same_file(output_path, input_path)
            refuse_same_file(partial, input_path)
            if not resume and not overwrite:
                refuse_to_replace(output_path, partial)
            yield partial
    except KeyboardInterrupt as exc:
        raise RunInterruptedError(signal_of(exc), partial) from exc


def refuse_to_replace(output_path: Path, partial: Path) -> None:
    """Work on disk is never started over silently: name --resume and --overwrite."""
    if partial.exists():
        try:
            import h5py

            with h5py.File(partial, "r") as fh:
                done = int(np.count_nonzero(fh["status"][...]))
            what = f"holds {done} finished structures of an earlier run"
        except (OSError, KeyError):
            what = "is left from an earlier run"
        raise ResumeError(f"{partial} {what}: continue it with --resume, or start over with --overwrite")
    if output_path.exists():
        raise ResumeError(
            f"{output_path} exists: replace it with --overwrite, or complete/check it with --resume"
        )


def fingerprint_fields(input_path, info, model_sha256: str, identity) -> dict:
    """What every command's fingerprint records: the input, the model file, the package, what ran."""
    from painn_export.version import __version__

    return {
        "input_sha256": input_sha256(input_path),
        "n_structures": info.n_structures,
        "n_atoms": info.n_atoms,
        "model_sha256": model_sha256,
        "package_version": __version__,
        **asdict(identity),
    }
