"""Neighbour graphs between processes in shared memory (pipelines.graph_transport): the same items, no leaks.

Every item a chunk carries must arrive as the pickled one would: each graph
field equal in dtype, shape and bits, ``min_distance`` equal, statuses,
messages and order unchanged; the descriptors and mappings it took must be
gone once its items are; a SIGKILL must leave nothing in ``/dev/shm`` and no
process of the run holding the files. Where a memfd cannot be made (missing,
refused, failing mid-run) the items travel pickled; where one cannot be
mapped here, the chunk's items raise an ``OSError`` that says so.
"""

import dataclasses
import errno
import gc
import mmap
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from painn_export import save_model
from painn_export.samples import bulk, molecule
from painn_export.schema import InputReader, write_input
from pipelines import graph_transport
from pipelines import graphs as graphs_module
from pipelines.graphs import GraphSettings, build_shared, init_worker_process, items_from, neighbour_items

from conftest import SMALL, make_model

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not graph_transport.available(), reason="needs os.memfd_create (Linux)")

FEEDS = ["float32", "float64"]
SETTINGS = {dtype: GraphSettings(5.0, 20, 83, dtype) for dtype in FEEDS}
NO_CELL = np.zeros((3, 3)), [False] * 3
STATUSES = [  # one of each input status the worker gives without a graph
    ((np.zeros(0, int), np.zeros((0, 3)), *NO_CELL), "empty_structure"),
    ((np.array([1, 120]), np.array([[0.0, 0, 0], [1.0, 0, 0]]), *NO_CELL), "unknown_element"),
    ((np.array([1, 1]), np.array([[0.0, 0, 0], [0.2, 0, 0]]), *NO_CELL), "atoms_too_close"),
]


def _rows(n: int, seed: int = 0) -> list:
    """``n`` small periodic and molecular structures (6-24 atoms), a structure without a graph every 5th."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        if k % 5 == 2:
            out.append(STATUSES[(k // 5) % len(STATUSES)][0])
            continue
        s = (bulk if k % 3 else molecule)(rng, int(rng.integers(6, 25)), np.arange(1, 30))
        out.append((s.atomic_numbers, s.positions, s.cell, s.pbc))
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """An input of 40 structures (statuses mixed in) and one of statuses only."""
    where = tmp_path_factory.mktemp("transport")
    return {
        "mixed": write_input(where / "mixed.h5", _rows(40)),
        "statuses": write_input(where / "statuses.h5", [row for row, _ in STATUSES]),
    }


def _built(path, settings, indices=None) -> list:
    """What items_from gives in this process: the items as pickling would carry them."""
    with InputReader(str(path)) as reader:
        return items_from(reader, settings, np.arange(reader.n_structures) if indices is None else indices)


def assert_same_items(got: list, want: list, read_only: bool | None = None) -> None:
    """Every field of every item equal in dtype, shape and bits; ``read_only``: whether graph arrays are."""
    assert [it.index for it in got] == [it.index for it in want]
    for g, w in zip(got, want):
        assert (g.status, g.message, g.start) == (w.status, w.message, w.start), w.index
        assert (g.graph is None) == (w.graph is None), w.index
        if w.graph is None:
            continue
        assert g.graph.min_distance == w.graph.min_distance
        for name in graph_transport.FIELDS:
            mine, theirs = getattr(g.graph, name), getattr(w.graph, name)
            where = f"structure {w.index}: {name}"
            assert (mine.dtype, mine.shape) == (theirs.dtype, theirs.shape), where
            assert np.array_equal(mine, theirs) and mine.tobytes() == theirs.tobytes(), where
            if read_only is not None:
                assert mine.flags.writeable is not read_only, where


def _spawn_pool(workers: int = 1, **kw) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), **kw)


@pytest.fixture
def fresh_probe():
    """available() tried anew in this test (its answer is cached per process), and again after it."""
    graph_transport.available.cache_clear()
    yield
    graph_transport.available.cache_clear()


def _refuse(code: int):
    """A stand-in for ``os.memfd_create`` (or ``mmap.mmap``) that raises ``OSError(code)``."""

    def refused(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    return refused


def test_fields_are_the_graphs_arrays_in_declaration_order():
    names = [field.name for field in dataclasses.fields(graph_transport.Graph)]
    assert graph_transport.FIELDS == tuple(n for n in names if n != "min_distance")
    assert graph_transport.FIELDS[:3] == ("atomic_numbers", "positions", "edge_index")


def test_importing_the_graphs_module_loads_no_multiprocessing():
    """multiprocessing.reduction (and socket) only where a chunk is pickled or unpickled."""
    probe = "import sys, pipelines.graphs; print(sorted({'multiprocessing', 'socket'} & set(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("feed", FEEDS)
def test_a_packed_chunk_unpacks_to_the_same_items_here_and_in_a_spawned_worker(inputs, feed):
    settings = SETTINGS[feed]
    want = _built(inputs["mixed"], settings)
    assert {it.status for it in want} == {"ok", *(status for _, status in STATUSES)}
    if feed == "float32":  # what the float32 feed's graphs travel as
        assert (want[0].graph.edge_index.dtype, want[0].graph.edge_shift.dtype) == (np.int32, np.float32)
    chunk = graph_transport.pack(want)
    assert chunk.size > 0 and len(chunk) == len(want)
    assert_same_items(chunk.items(), want, read_only=True)  # the sender's own mapping
    received = pickle.loads(pickle.dumps(chunk))  # the descriptor through the resource sharer
    assert_same_items(graph_transport.unpack(received), want, read_only=True)
    # Unpacked in another process: the chunk goes there in shared memory, the items come back pickled.
    with _spawn_pool() as pool:
        there = pool.submit(graph_transport.unpack, chunk).result(timeout=120)
    assert_same_items(there, want)
    # ... and the other way: packed in a neighbour worker, unpacked here.
    with _spawn_pool(initializer=init_worker_process, initargs=(str(inputs["mixed"]), settings)) as pool:
        sent = pool.submit(build_shared, np.arange(len(want))).result(timeout=120)
    assert isinstance(sent, graph_transport.SharedChunk)
    assert_same_items(graph_transport.unpack(sent), want, read_only=True)


def test_chunks_without_graphs_need_no_file(inputs):
    want = _built(inputs["statuses"], SETTINGS["float32"])
    assert [it.status for it in want] == [status for _, status in STATUSES]
    for items in (want, []):
        chunk = graph_transport.pack(items)
        assert chunk.size == 0
        assert_same_items(graph_transport.unpack(pickle.loads(pickle.dumps(chunk))), items)
    with _spawn_pool() as pool:
        assert_same_items(pool.submit(graph_transport.unpack, graph_transport.pack(want)).result(120), want)


def test_a_relaxations_items_are_refused(inputs):
    settings = GraphSettings(5.0, 20, 83, "float32", relax=True)
    items = _built(inputs["mixed"], settings, np.arange(3))
    with pytest.raises(ValueError, match="travels pickled"):
        graph_transport.pack(items)


def test_the_file_is_sealed_and_the_received_chunk_is_not_sent_on(inputs):
    import fcntl

    chunk = graph_transport.pack(_built(inputs["mixed"], SETTINGS["float32"], np.arange(4)))
    with pytest.raises(PermissionError):  # F_SEAL_WRITE (and grow, shrink)
        os.pwrite(chunk._fd, b"x", 0)
    assert fcntl.fcntl(chunk._fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_WRITE
    with pytest.raises(TypeError, match="not sent on"):
        pickle.dumps(pickle.loads(pickle.dumps(chunk)))


def _memfd_maps() -> list[str]:
    return [line for line in Path("/proc/self/maps").read_text().splitlines() if "memfd:" in line]


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _wait_for(condition, timeout: float = 20.0) -> bool:
    deadline = time.time() + timeout
    while not condition() and time.time() < deadline:
        time.sleep(0.05)
    return condition()


@pytest.mark.parametrize("feed", FEEDS)
def test_workers_give_the_same_items_as_this_process_and_leave_no_descriptor_or_mapping(
    inputs, monkeypatch, feed
):
    """neighbour_items with workers (several chunks) equal to workers=0 in every bit; their graphs
    in this process's memfd mappings while held, and no descriptor or mapping left once dropped."""
    monkeypatch.setattr(graphs_module, "CHUNK", 8)  # five chunks, three with statuses
    settings, pending = SETTINGS[feed], np.arange(40)
    want = list(neighbour_items(str(inputs["mixed"]), pending, settings, 0))
    gc.collect()
    fds, maps = _fds(), len(_memfd_maps())
    got = list(neighbour_items(str(inputs["mixed"]), pending, settings, 2))
    assert len(_memfd_maps()) > maps  # the graphs are views of the workers' files
    assert_same_items(got, want, read_only=True)
    del got
    gc.collect()
    assert len(_memfd_maps()) == maps
    # The pool's pipes close as its workers exit, in the background.
    assert _wait_for(lambda: _fds() <= fds), f"{_fds() - fds} descriptors more than before the run"


def test_without_memfd_the_workers_list_is_pickled_with_the_same_items(inputs, monkeypatch, fresh_probe):
    monkeypatch.setattr(graphs_module, "CHUNK", 8)
    monkeypatch.delattr(os, "memfd_create")  # macOS, Windows: the one place that chooses says no
    assert not graph_transport.available()
    settings, pending = SETTINGS["float32"], np.arange(40)
    want = list(neighbour_items(str(inputs["mixed"]), pending, settings, 0))
    maps = len(_memfd_maps())
    got = list(neighbour_items(str(inputs["mixed"]), pending, settings, 2))
    assert len(_memfd_maps()) == maps
    assert_same_items(got, want, read_only=False)  # unpickled arrays are writable: no shared memory


@pytest.mark.parametrize("code", [errno.ENOSYS, errno.EPERM])
def test_a_memfd_refused_at_run_time_makes_the_workers_list_pickled(inputs, monkeypatch, fresh_probe, code):
    """An old kernel (ENOSYS) or a seccomp sandbox (EPERM): os.memfd_create is there but fails.
    The probe says no (once per process), and a run with workers gives the same items, pickled."""
    monkeypatch.setattr(graphs_module, "CHUNK", 8)
    monkeypatch.setattr(os, "memfd_create", _refuse(code))
    assert not graph_transport.available()
    assert graph_transport.available.cache_info().misses == 1
    settings, pending = SETTINGS["float32"], np.arange(40)
    want = list(neighbour_items(str(inputs["mixed"]), pending, settings, 0))
    maps = len(_memfd_maps())
    got = list(neighbour_items(str(inputs["mixed"]), pending, settings, 2))
    assert len(_memfd_maps()) == maps
    assert_same_items(got, want, read_only=False)
    assert graph_transport.available.cache_info().misses == 1  # tried once, not per run


def test_the_probe_says_yes_here_and_leaves_no_descriptor(fresh_probe):
    fds = _fds()
    assert graph_transport.available() and graph_transport.available()
    assert graph_transport.available.cache_info().misses == 1
    assert _fds() == fds


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENOMEM])
def test_a_worker_that_cannot_make_its_file_returns_the_list(inputs, monkeypatch, code):
    """build_shared where pack fails mid-run (out of descriptors, of memory): build_items' list,
    which unpack takes as it is."""
    settings = SETTINGS["float32"]
    reader = InputReader(str(inputs["mixed"]))
    try:
        monkeypatch.setitem(graphs_module._worker, "reader", reader)  # what init_worker_process sets
        monkeypatch.setitem(graphs_module._worker, "settings", settings)
        indices = np.arange(12)
        want = graphs_module.build_items(indices)
        assert isinstance(build_shared(indices), graph_transport.SharedChunk)  # as usual
        monkeypatch.setattr(os, "memfd_create", _refuse(code))
        got = build_shared(indices)
    finally:
        reader.close()
    assert isinstance(got, list)
    assert_same_items(graph_transport.unpack(pickle.loads(pickle.dumps(got))), want, read_only=False)


def test_a_chunk_that_cannot_be_mapped_here_raises_on_items_not_while_unpickling(inputs, monkeypatch):
    """mmap refused in the receiver (ENOMEM) while it unpickles: the chunk arrives, its items()
    raise the OSError that says so, and no descriptor is left open."""
    want = _built(inputs["mixed"], SETTINGS["float32"], np.arange(6))
    data = pickle.dumps(graph_transport.pack(want))  # in-process: the resource sharer hands it over
    fds = _fds()
    monkeypatch.setattr(mmap, "mmap", _refuse(errno.ENOMEM))
    received = pickle.loads(data)
    monkeypatch.undo()
    assert isinstance(received, graph_transport.SharedChunk) and len(received) == len(want)
    with pytest.raises(
        OSError, match="neighbour graphs from a worker could not be mapped in this process"
    ) as e:
        received.items()
    assert e.value.errno == errno.ENOMEM and isinstance(e.value.__cause__, OSError)
    assert os.strerror(errno.ENOMEM) in str(e.value)
    with pytest.raises(OSError, match="could not be mapped"):
        graph_transport.unpack(received)
    assert _wait_for(lambda: _fds() <= fds), f"{_fds() - fds} descriptors more than before"


def test_a_descriptor_lost_in_transit_is_reported_as_this_process_out_of_descriptors(inputs, monkeypatch):
    """recvfds raises RuntimeError when the descriptor is dropped on the way in (this process has
    none free): the chunk arrives, and its items() say so, as an OSError (EMFILE)."""
    from multiprocessing import resource_sharer

    want = _built(inputs["mixed"], SETTINGS["float32"], np.arange(6))
    data = pickle.dumps(graph_transport.pack(want))

    def dropped(self):
        raise RuntimeError("received 0 items of ancdata")

    monkeypatch.setattr(resource_sharer.DupFd, "detach", dropped)
    received = pickle.loads(data)
    monkeypatch.undo()
    with pytest.raises(OSError, match="could not be mapped in this process") as e:
        received.items()
    assert e.value.errno == errno.EMFILE and "received 0 items of ancdata" in str(e.value)


def test_a_chunk_from_a_worker_that_cannot_be_mapped_leaves_the_pool_working(inputs, monkeypatch):
    """The same in the process pool's manager thread: the pool is not broken (no "worker died"),
    the error comes from items(), and the next chunk arrives as usual."""
    settings = SETTINGS["float32"]
    want = _built(inputs["mixed"], settings, np.arange(6))
    with _spawn_pool(initializer=init_worker_process, initargs=(str(inputs["mixed"]), settings)) as pool:
        pool.submit(int).result(timeout=120)  # the worker is up (spawned before mmap is refused)
        with monkeypatch.context() as patch:
            patch.setattr(mmap, "mmap", _refuse(errno.ENOMEM))
            sent = pool.submit(build_shared, np.arange(6)).result(timeout=120)
        with pytest.raises(OSError, match="could not be mapped in this process"):
            graph_transport.unpack(sent)
        again = pool.submit(build_shared, np.arange(6)).result(timeout=120)
    assert_same_items(graph_transport.unpack(again), want, read_only=True)


CLI = "import sys; from pipelines.cli import main; sys.exit(main())"


def _shm() -> set[str]:
    return set(os.listdir("/dev/shm"))


def test_sigkill_of_the_process_group_mid_run_leaves_nothing_in_dev_shm(tmp_path):
    """A ``painn-batch run`` with workers, killed with its process group (workers, resource tracker)
    while its main process maps graphs in shared memory (``memfd:painn-graphs``: the transport is in
    use): afterwards no process of the run's session holds such a file (mapped or open), no new
    entry in /dev/shm but the process pool's own named semaphores (which only the killed resource
    tracker would have unlinked: this test then removes them), and in TMPDIR only the workers'
    resource-sharer sockets (empty files, as docs/usage.md says)."""
    model = save_model(make_model(SMALL, torch.float32), tmp_path / "m.pt")
    inp = write_input(tmp_path / "in.h5", _rows(1500, seed=1))
    temp = tmp_path / "tmp"  # the run's TMPDIR: what the stdlib leaves on a kill stays in here
    temp.mkdir()
    before = _shm()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(temp)}
    args = ["run", str(inp), "--model", str(model), "--runtime", "torch", "--workers", "2", "-q"]
    proc = subprocess.Popen(
        [sys.executable, "-c", CLI, *args, "-o", str(tmp_path / "out.h5")],
        env=env,
        cwd=ROOT,
        start_new_session=True,  # a process group of its own: the run, its workers, the resource tracker
        stderr=subprocess.PIPE,
    )
    maps = Path(f"/proc/{proc.pid}/maps")
    holders_seen: list[set[int]] = []  # while the run was alive: its processes holding a memfd of graphs

    def holds_shared_graphs() -> bool:
        try:
            mapped = graph_transport.NAME in maps.read_text()
        except (FileNotFoundError, ProcessLookupError):
            return False
        if mapped:
            holders_seen.append(_memfd_holders(proc.pid))
        return mapped

    try:
        assert _wait_for(lambda: holds_shared_graphs() or proc.poll() is not None, 120)
        assert proc.poll() is None, f"the run ended first: {proc.stderr.read().decode()[-2000:]}"
        assert holders_seen and proc.pid in holders_seen[0]  # the main process maps a worker's file
        group = [int(p) for p in os.listdir("/proc") if p.isdigit() and _group_of(int(p)) == proc.pid]
        assert len(group) >= 3  # the run and its two workers (and the resource tracker)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert _wait_for(lambda: not any(_alive(p) for p in group), 30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    new = _shm() - before
    try:
        assert not _memfd_holders(proc.pid)  # the kernel has freed every file of graphs
        assert not [n for n in new if not n.startswith("sem.mp-")], new
        # The resource sharer that handed the descriptors over leaves its socket (no memory) in TMPDIR.
        left = [p for p in temp.rglob("*") if not p.is_dir()]
        assert left and all(p.parent.name.startswith("pymp-") and p.is_socket() for p in left), left
        assert all(p.name.startswith("listener-") and p.stat().st_size == 0 for p in left), left
    finally:
        for name in new - _mapped_semaphores():  # the killed pool's: no live process has them open
            if name.startswith("sem.mp-"):
                Path("/dev/shm", name).unlink(missing_ok=True)


def _mapped_semaphores() -> set[str]:
    """The /dev/shm semaphores some live process has open (mapped)."""
    names = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            text = Path(f"/proc/{pid}/maps").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        names.update(line.rsplit("/", 1)[1] for line in text.splitlines() if "/dev/shm/sem." in line)
    return names


def _memfd_holders(session: int) -> set[int]:
    """The live processes of ``session`` that map or hold open a memfd of graphs (graph_transport.NAME)."""
    holders = set()
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            if os.getsid(pid) != session or not _alive(pid):
                continue
            mapped = "memfd:" + graph_transport.NAME in Path(f"/proc/{pid}/maps").read_text()
            fds = Path(f"/proc/{pid}/fd")
            held = any("memfd:" + graph_transport.NAME in os.readlink(fds / fd) for fd in os.listdir(fds))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if mapped or held:
            holders.add(pid)
    return holders


def _group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"
