"""Moving a chunk's neighbour items from a worker process to the main one: the graphs in shared memory.

Pickled, the graphs at the OCP settings (12 Å, cap 50) are bytes that the
worker dumps, the pipe copies and the main process loads, all on the cores
that feed the runtime (the bytes and microseconds per atom are measured:
see docs/benchmarks.md, issue 32). Instead :func:`pack` writes every array
of a chunk's graphs (:data:`FIELDS`: every field of
:class:`~painn_export.batch.Graph` but ``min_distance``) back to back into one anonymous
shared-memory file, ``os.memfd_create``, each at an offset aligned to
:data:`ALIGN` bytes, and seals it (no write, no growing or shrinking).
What is pickled is small: the file's descriptor
(:func:`multiprocessing.reduction.DupFd`: the standard library's resource
sharer hands it over a Unix socket when the main process unpickles it), the
file's size, and a table of each array's dtype, shape and offset and each
graph's ``min_distance``, with each item's index, status and message.

The main process maps the file read-only as it unpickles the chunk and
closes the descriptor it was given; :meth:`SharedChunk.items` makes each
:class:`~painn_export.batch.Graph` (``Graph.from_checked``: the worker's
graphs were checked where they were built) over views of the mapping
(``np.ndarray`` over its buffer), without a copy. The mapping lives as long as any of its views
(refcounting: until the batches holding the chunk's graphs are collated and
dropped), and on Python < 3.13 ``mmap`` keeps its own duplicate of the
descriptor for as long; then both are gone.

Why a memfd and not :mod:`multiprocessing.shared_memory`: a memfd has no
name (nothing in ``/dev/shm``), so no kill, of the main process, a worker or
the whole process group, can leave its memory behind: the kernel frees it
with its last descriptor and mapping. A sealed file also cannot change
under the main process's views, nor be truncated under them (a fault).

The items the main process gets are the same bits as pickled ones (dtypes,
shapes, values; statuses, messages, order); only their graphs' arrays are
read-only. ``run``'s consumers only read them (:class:`~pipelines.batches.Budget`
reads sizes; :func:`~painn_export.batch.collate` copies the arrays into the
feed; results are written from the runtime's outputs).

Not through shared memory: relaxation items (``GraphSettings.relax``: a
``Start`` with its ``SkinGraph`` each) stay pickled, and so does every item
where a sealed memfd cannot be made: ``os.memfd_create`` missing (macOS,
Windows) or refused at run time (an old kernel: ENOSYS; a seccomp sandbox:
EPERM; sealing unsupported). :func:`available` is the one place that tells,
by trying once per process. A worker whose :func:`pack` fails all the same
(EMFILE, ENOMEM mid-run) returns that chunk's list pickled instead
(:func:`pipelines.graphs.build_shared`). A chunk the main process cannot map
(ENOMEM from ``mmap``, EMFILE) is no worker death: the error is kept and
raised by :meth:`SharedChunk.items` on the main thread. Ray's tasks move
graphs their own way (:mod:`pipelines.ray_columns`).

:mod:`multiprocessing.reduction` (and with it :mod:`socket`) is imported
where a chunk is pickled or unpickled, not with this module: importing
:mod:`pipelines.graphs` stays light.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import mmap
import os
import sys
import weakref
from collections.abc import Sequence

import numpy as np

from painn_export.batch import Graph

# A graph's arrays, in the order they are written (a missing one, None, takes no bytes): every
# field of Graph in declaration order but min_distance (a float, carried in the table).
FIELDS = tuple(name for name in Graph.__dataclass_fields__ if name != "min_distance")
ALIGN = 64  # bytes: every array starts on a cache line (and at any dtype's alignment)
NAME = "painn-graphs"  # the memfd's name: only in /proc/<pid>/maps and /proc/<pid>/fd, never a file
# The main process's mapping needs no descriptor of its own where mmap can do without one.
_UNTRACKED = {"trackfd": False} if sys.version_info >= (3, 13) else {}


@functools.cache
def available() -> bool:
    """Graphs can travel in shared memory here (a sealed ``os.memfd_create`` file); else they are pickled.

    Tried once per process (cached): a memfd made with ``MFD_ALLOW_SEALING``,
    given the seals :func:`_seal` adds, and closed. False where
    ``os.memfd_create`` is missing (macOS, Windows) or any step raises
    ``OSError`` (an old kernel: ENOSYS; a seccomp sandbox: EPERM; no sealing: EINVAL).
    """
    if not hasattr(os, "memfd_create"):
        return False
    try:
        fd = os.memfd_create(NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except OSError:
        return False
    try:
        _seal(fd)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


# Where one array lies in the file: (dtype.str, shape, byte offset); None for a field that is None.
Place = tuple[str, tuple[int, ...], int] | None


class SharedChunk:
    """A chunk's items whose graphs' arrays lie in one sealed memfd; pickled, a descriptor and a table.

    Made by :func:`pack` in a worker (which holds the descriptor until the
    chunk is garbage) and pickled once, by the process pool, to reach the
    main process; unpickled there, it holds the file's read-only mapping, or
    the ``OSError`` that kept it from being mapped (raised by :meth:`items`).
    :meth:`items` gives the items with their graphs, in order.
    """

    def __init__(
        self,
        items: list,
        table: list,
        size: int,
        fd: int | None = None,
        buffer=None,
        error: OSError | None = None,
    ) -> None:
        self._items = items  # each item without its graph (graph=None)
        self._table = table  # per item: None (no graph), or (a Place per FIELDS, min_distance Å)
        self.size = size  # bytes in the file; 0: no file (no item has a graph)
        self._fd = fd  # the sender's descriptor (closed when this object is garbage)
        self._buffer = buffer  # the receiver's read-only mapping
        self._error = error  # the receiver's: why the file could not be taken or mapped (then no buffer)
        if fd is not None:
            weakref.finalize(self, os.close, fd)

    def __len__(self) -> int:
        return len(self._items)

    def __reduce__(self):
        if self.size and self._fd is None:
            raise TypeError("a received SharedChunk is not sent on: pickle its items() instead")
        if not self.size:
            return _arrive, (None, 0, self._items, self._table)
        from multiprocessing import reduction  # here, not at import: pipelines.graphs stays light

        handle = reduction.DupFd(self._fd)  # the receiver takes it in _arrive
        return _arrive, (handle, self.size, self._items, self._table)

    def items(self) -> list:
        """The items, each with its graph over views of the mapping (read-only arrays), in order.

        Raises ``OSError`` (the cause's errno, the cause chained) where the
        receiver could not take or map the file (see :func:`_arrive`).
        """
        if self._error is not None:
            cause = self._error
            message = (
                "a chunk of neighbour graphs from a worker could not be mapped in this process: "
                f"{cause.strerror or cause}"
            )
            raise (OSError(message) if cause.errno is None else OSError(cause.errno, message)) from cause
        buffer = self._mapping()
        out = []
        for item, entry in zip(self._items, self._table):
            if entry is None:
                out.append(item)
                continue
            places, min_distance = entry
            fields = {name: _view(buffer, place) for name, place in zip(FIELDS, places)}
            graph = Graph.from_checked(**fields, min_distance=min_distance)
            out.append(dataclasses.replace(item, graph=graph))
        return out

    def _mapping(self):
        if self._buffer is None and self.size:  # the sender's own chunk, never pickled
            self._buffer = mmap.mmap(self._fd, self.size, prot=mmap.PROT_READ, **_UNTRACKED)
        return self._buffer


def pack(items: Sequence) -> SharedChunk:
    """``items`` (:class:`~pipelines.graphs.Item`, without a ``start``) with their graphs in a new memfd.

    Raises ``ValueError`` for an item with a ``start`` (a relaxation's: it
    travels pickled) and ``OSError`` where the file cannot be made (no
    memory); ``AttributeError`` without ``os.memfd_create`` (see :func:`available`).
    """
    table, writes, size = [], [], 0
    for item in items:
        if getattr(item, "start", None) is not None:
            raise ValueError(f"structure {item.index}: a relaxation's item (with a start) travels pickled")
        if item.graph is None:
            table.append(None)
            continue
        places = []
        for name in FIELDS:
            array = getattr(item.graph, name)
            if array is None:
                places.append(None)
                continue
            array = np.asarray(array)
            size = -(-size // ALIGN) * ALIGN
            places.append((array.dtype.str, array.shape, size))
            writes.append((array, size))
            size += array.nbytes
        table.append((tuple(places), float(item.graph.min_distance)))
    bare = [item if item.graph is None else dataclasses.replace(item, graph=None) for item in items]
    if not size:  # no graph (statuses only, or no item): no file
        return SharedChunk(bare, table, 0)
    fd = os.memfd_create(NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        with mmap.mmap(fd, size) as out:  # MAP_SHARED, writable: this process's only writable view
            for array, offset in writes:
                np.ndarray(array.shape, array.dtype, buffer=out, offset=offset)[...] = array
        _seal(fd)
    except BaseException:
        os.close(fd)
        raise
    return SharedChunk(bare, table, size, fd=fd)


def unpack(received) -> list:
    """The items a neighbour task returned: a :class:`SharedChunk`'s, or the pickled list itself."""
    return received.items() if isinstance(received, SharedChunk) else received


def _arrive(handle, size: int, items: list, table: list) -> SharedChunk:
    """Unpickling in the receiver: take the descriptor, map the file read-only, close the descriptor.

    Runs in the process pool's manager thread, where any exception marks the
    pool broken (and the run reports a dead worker). So an ``OSError`` of this
    process's own (ENOMEM from ``mmap``, EMFILE) is kept in the chunk and
    raised by :meth:`SharedChunk.items` on the caller's thread instead.
    """
    if handle is None:
        return SharedChunk(items, table, size)
    try:
        fd = handle.detach()  # over the sender's resource-sharer socket
    except (ConnectionError, FileNotFoundError):
        # Refused or reset (its socket file outlives a SIGKILL, its listener does not), or the
        # socket file gone (it exited and cleaned up): the sender is gone. That is a worker
        # death, and the pool's "broken" (the run's WorkerError) is the right report: let it
        # propagate as before (the pool notices the dead process too).
        raise
    except OSError as exc:  # this process's own: EMFILE for the socket, ...
        return SharedChunk(items, table, size, error=exc)
    except RuntimeError as exc:  # recvfds: the descriptor dropped in transit (this process has no free one)
        error = OSError(errno.EMFILE, f"no descriptor received ({exc}): too many open files?")
        return SharedChunk(items, table, size, error=error)
    try:
        buffer = mmap.mmap(fd, size, prot=mmap.PROT_READ, **_UNTRACKED)
    except OSError as exc:  # ENOMEM (no address space, map count), ...
        return SharedChunk(items, table, size, error=exc)
    finally:
        os.close(fd)
    return SharedChunk(items, table, size, buffer=buffer)


def _view(buffer, place: Place):
    """The array at ``place`` of ``buffer``: no copy, read-only as the mapping is, keeping it alive.

    ``np.ndarray`` over the buffer: the same view as ``np.frombuffer(...).reshape``, chosen as
    the cheaper (measured: see docs/benchmarks.md, issue 32).
    """
    if place is None:
        return None
    dtype, shape, offset = place
    return np.ndarray(shape, dtype, buffer, offset)


def _seal(fd: int) -> None:
    """No more writes, growth or shrinking of the file (and no more seals): the receiver's views are final."""
    import fcntl

    if hasattr(fcntl, "F_ADD_SEALS"):
        seals = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
