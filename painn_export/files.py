"""Files written whole or not at all, their hashes, and their temporary names: numpy-free, torch-free.

Every file the package writes (an ONNX export, an AOTInductor package, a
TensorRT engine and its sidecar, a checkpoint, an input or output HDF5, an
extxyz export) is written under a temporary name beside its final one and
renamed onto it when complete: a rename within a folder is atomic, so a
reader sees either the old file, or the whole new one, never a half.

Before the rename the file's bytes are synced to the disk, and after it the
folder's entry, so that a power loss too leaves the old file or the whole new
one (:func:`durable_replace`). (The batch pipeline's outputs are committed
batch by batch with a flush, not a sync: they survive a killed process, and
``--resume`` recomputes what a power loss took.)

Temporary names are ``PATH.<host>-<pid>-<random><suffix>``: two processes,
on one host or on two that share a file system, never write the same one,
and a stale one (its process killed) is judged only by its own host
(:func:`remove_stale_temporaries`).
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


class FileWriteError(OSError):
    """A file could not be written (disk full, file size limit, I/O error): names the file and the cause."""

    def __init__(self, path: Path, exc: BaseException) -> None:
        from painn_export.errors import os_reason

        super().__init__(f"cannot write {path}: {os_reason(exc)}")


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _host() -> str:
    import socket

    return socket.gethostname().replace(".", "_").replace("-", "_")


def temporary_path(path: str | Path, suffix: str = ".tmp") -> Path:
    """A name beside ``path`` that no other process, on this host or another, writes to.

    ``PATH.<host>-<pid>-<random><suffix>``; ``suffix`` starts with ``.tmp``
    (a tool may want its own ending after it: ``.tmp.pt2``).
    """
    import secrets

    if not suffix.startswith(".tmp"):
        raise ValueError(f"a temporary suffix starts with .tmp, got {suffix!r}")
    path = Path(path)
    return path.with_name(f"{path.name}.{_host()}-{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Delete this host's temporaries of ``path`` whose process is gone; returns what was deleted.

    Another host's are never judged: its process ids mean nothing here (a
    shared cache on NFS), so they stay until that host finishes or removes them.
    """
    path = Path(path)
    prefix = f"{path.name}.{_host()}-"
    removed = []
    for tmp in path.parent.glob(f"{prefix}*.tmp*"):
        try:
            pid = int(tmp.name.removeprefix(prefix).split("-")[0])
            os.kill(pid, 0)  # raises when no such process: its writer was killed
        except ValueError:
            continue
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
        except PermissionError:
            continue  # another user's live process
    return removed


def durable_replace(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` onto ``path`` with the bytes on the disk first and the rename after."""
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    tmp.replace(path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


@contextmanager
def written_whole(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside ``path`` to write: renamed onto ``path`` when the block ends well.

    On any failure (a full disk, a stop signal, an exception) it is removed,
    so nothing but a complete file ever has the final name and nothing is
    left beside it; an OS error becomes a :class:`FileWriteError` naming ``path``.
    """
    path = Path(path)
    tmp = temporary_path(path, suffix)
    try:
        yield tmp
        durable_replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, FileWriteError):
            raise FileWriteError(path, exc) from exc
        raise


def write_together(writers: dict[Path, Callable[[Path], None]]) -> None:
    """Write several files that belong together (an engine and its sidecar): each whole, then renamed.

    ``writers`` maps each final path to a function that writes it at the
    temporary path it is given. Nothing is renamed until every file is
    written, and the renames run in the order given, so a reader that checks
    the last one (the sidecar) finds the others complete. On failure every
    temporary is removed and no final file is touched.
    """
    temps = {path: temporary_path(path) for path in writers}
    try:
        for path, write in writers.items():
            write(temps[path])
        for path, tmp in temps.items():
            durable_replace(tmp, path)
    except BaseException as exc:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, FileWriteError):
            raise FileWriteError(next(iter(writers)), exc) from exc
        raise


class WatchedFile(io.FileIO):
    """A file for HDF5 to write through that keeps its first write error.

    HDF5 learns of a failed write through a Python file object only as a
    warning, and crashes closing a file whose writes fail (h5py issue 914).
    So after the first error (a full disk) further writes are dropped, HDF5
    closes cleanly, and :meth:`check` raises the error: the caller then
    deletes the file, whose content no longer matters. Every HDF5 file the
    package creates is written through one (``h5py.File(WatchedFile(tmp, "w+"), "w")``).
    """

    error: OSError | None = None

    def write(self, data) -> int:
        if self.error is None:
            try:
                return super().write(data)
            except OSError as exc:
                self.error = exc
        return len(memoryview(data))

    def truncate(self, size=None) -> int:
        if self.error is None:
            try:
                return super().truncate(size)
            except OSError as exc:
                self.error = exc
        return self.tell() if size is None else size

    def check(self, name: str | Path) -> None:
        """Raise the kept write error, naming ``name``."""
        if self.error is not None:
            raise OSError(self.error.errno, self.error.strerror, str(name))
