"""Graphs and feeds built with torch ops (painn_export.device_graphs) against the host path.

On the CPU (Warp's CPU backend): edge sets equal the host's exactly, the
feed equals ``collate`` of the host graphs in the device's edge order
bitwise, statuses equal the pipeline's, and each trap of the search library
is shown, then shown handled. Warp compiles its kernels once into
``$WARP_CACHE_PATH``, else the repository's ignored ``.warp-cache/``.
"""

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from test_neighbors import _fcc, brute_force, cases, edge_set

from painn_export.batch import InvalidGraphError, collate
from painn_export.device_graphs import (
    build_graphs,
    canonical_graph,
    device_feed,
    expected_neighbors,
    init_kernels,
    max_edges,
)
from painn_export.neighbors import neighbor_graph

from checks import assert_close
from conftest import SMALL, make_model
from structures import Structure, all_kinds, random_rotation

ROOT = Path(__file__).resolve().parents[1]

# Not imported here: importing nvalchemiops starts Warp, whose kernel cache must be set first.
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("nvalchemiops") is None, reason="device graphs need nvalchemi-toolkit-ops"
)


@pytest.fixture(scope="module", autouse=True)
def _kernels():
    init_kernels(os.environ.get("WARP_CACHE_PATH") or ROOT / ".warp-cache")


def batch(structures):
    """The batch arrays of ``structures``: positions, cells, pbc, atomic numbers, natoms."""
    return (
        np.concatenate([s.positions for s in structures]).reshape(-1, 3),
        np.stack([s.cell for s in structures]),
        np.stack([s.pbc for s in structures]),
        np.concatenate([s.atomic_numbers for s in structures]).astype(np.int64),
        np.array([len(s.positions) for s in structures]),
    )


def device_edge_sets(graphs) -> list[set]:
    """Each structure's ``{(sender, receiver, S)}`` with atom indices local to it."""
    index, shift = graphs.edge_index.cpu().numpy(), graphs.cell_shift.cpu().numpy()
    out, atom, edge = [], 0, 0
    for n, e in zip(graphs.natoms.tolist(), graphs.n_edges.tolist()):
        j, i = index[:, edge : edge + e] - atom
        out.append(
            {(int(a), int(b), tuple(int(x) for x in s)) for a, b, s in zip(j, i, shift[edge : edge + e])}
        )
        atom, edge = atom + n, edge + e
    return out


def assert_same_edges(structures, cutoff, cap, strict=True, **kw):
    graphs = build_graphs(*batch(structures), cutoff=cutoff, max_neighbors=cap, strict=strict, **kw)
    assert graphs.status.kind == ("ok",) * len(structures)
    for s, got, n_edges, degree in zip(
        structures, device_edge_sets(graphs), graphs.n_edges, graphs.max_degree
    ):
        host = neighbor_graph(s.positions, s.cell, s.pbc, cutoff, cap, strict=strict)
        want = edge_set(host)
        assert got == want, (
            f"{s.name} cutoff={cutoff} cap={cap} strict={strict}: "
            f"missing {sorted(want - got)[:5]} extra {sorted(got - want)[:5]}"
        )
        assert (n_edges, degree) == (host.n_edges, host.max_degree), s.name
    return graphs


def transformed(structures, rng):
    """Each structure as given, and rotated and moved (the transform is in its name)."""
    out = list(structures)
    for s in structures:
        R, t = random_rotation(rng), rng.normal(0, 5, 3)
        moved = s.transformed(R, t)
        out.append(Structure(f"{s.name} R={R.tolist()} t={t.tolist()}", *list(vars(moved).values())[1:]))
    return out


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize(("cutoff", "cap"), [(4.0, 8), (5.0, 1000), (5.5, 12)])
def test_edge_sets_equal_the_host(strict, cutoff, cap, rng):
    """Every kind of tests/test_neighbors.py (bulk, skewed, unwrapped, slab, molecule, wire with zero
    rows, tiny cell, single atom, isolated atom), as given and rotated, in one batch."""
    assert_same_edges(transformed(cases(rng), rng), cutoff, cap, strict)


@pytest.mark.parametrize("strict", [True, False])
def test_crystal_shells_cut_by_the_cap(strict, rng):
    """Perfect fcc crystals and slabs: the cap cuts through shells of exactly tied neighbours."""
    pos, cell = _fcc()
    slab_cell = cell.copy()
    slab_cell[2, 2] += 10.0
    z = np.full(len(pos), 29)
    crystals = []
    for c, pbc in [(cell, [True] * 3), (slab_cell, [True, True, False])]:
        for R in (np.eye(3), random_rotation(rng)):
            crystals.append(Structure(f"fcc pbc={pbc}", z, pos @ R.T, c @ R.T, np.array(pbc)))
    for cap in (8, 12, 15, 30):
        graphs = assert_same_edges(crystals, 5.5, cap, strict)
        for s, got in zip(crystals, device_edge_sets(graphs)):
            assert got == brute_force(s.positions, s.cell, s.pbc, 5.5, cap, strict=strict), (s.name, cap)


def test_pairs_exactly_at_the_cutoff():
    """The cutoff is inclusive (the search library's is strict): simple cubic at a = cutoff, and a dimer."""
    a = 2.5
    cubic = Structure("cubic", np.array([6]), np.zeros((1, 3)), np.eye(3) * a, np.array([True] * 3))
    dimer = Structure(
        "dimer", np.array([1, 1]), np.array([[0.0, 0, 0], [a, 0, 0]]), np.zeros((3, 3)), np.zeros(3, bool)
    )
    graphs = assert_same_edges([cubic, dimer], a, 50)
    assert graphs.n_edges.tolist() == [6, 2]
    # The cap at a tie: 6 equally distant images, 4 kept (by (j, S)), then symmetrised.
    assert_same_edges([cubic], a, 4)


def test_many_neighbours_per_centre(rng):
    """Hundreds of entries per centre, capped strictly, by tolerance, below them, and not at all."""
    L = 7.0
    cell = np.eye(3) * L + rng.uniform(-0.5, 0.5, (3, 3))
    dense = Structure(
        "dense", rng.integers(1, 84, 40), rng.uniform(0, L, (40, 3)), cell, np.array([True] * 3)
    )
    for cap, strict in [(150, True), (150, False), (7, True), (0, True)]:
        assert_same_edges([dense], 7.5, cap, strict)


def test_tiny_cells_and_far_away_molecules(rng):
    """Cells far smaller than the cutoff (many images of each atom), and structures 1e4 Å out."""
    tiny = next(s for s in all_kinds(rng) if s.name == "tiny_cell")
    one = Structure(
        "one_atom", np.array([26]), np.zeros((1, 3)), np.diag([2.7, 2.9, 3.1]), np.array([True] * 3)
    )
    far = [
        Structure(s.name, s.atomic_numbers, s.positions + 1.0e4, s.cell, s.pbc)
        for s in all_kinds(rng)
        if s.name in ("molecule", "slab")
    ]
    assert_same_edges([tiny, one, *far], 6.0, 50)
    assert_same_edges([tiny, one], 6.0, 0)


def test_overflow_of_the_neighbour_matrix_is_caught(rng):
    """The search library counts a row past the matrix's width but stores nothing there: shown, then
    build_graphs searching again as wide as the busiest row loses no edge."""
    from nvalchemiops.torch.neighbors import batch_cell_list

    s = next(x for x in all_kinds(rng) if x.name == "bulk")
    pos = torch.tensor(s.positions)
    cell, pbc = torch.tensor(s.cell)[None], torch.tensor(s.pbc)[None]
    neighbor, count, _ = batch_cell_list(
        pos, 5.0, cell, pbc, torch.zeros(len(pos), dtype=torch.int32), max_neighbors=4
    )
    assert neighbor.shape[1] == 4 and int(count.max()) > 4  # the silent overflow
    structures = cases(rng)
    wide = build_graphs(*batch(structures), cutoff=5.0, max_neighbors=12)
    narrow = assert_same_edges(structures, 5.0, 12, _first_width=1)
    for name in ("edge_index", "cell_shift", "edge_shift"):
        assert torch.equal(getattr(wide, name), getattr(narrow, name)), name


def test_traps_of_the_search_library():
    """What batch_cell_list does unlike the host path: strict cutoff, coincident atoms kept, cells
    without volume refused; build_graphs applies the host's rules to each."""
    from nvalchemiops.torch.neighbors import batch_cell_list

    def search(positions, cell, pbc, cutoff):
        pos = torch.tensor(positions, dtype=torch.float64)
        _, count, _ = batch_cell_list(
            pos,
            cutoff,
            torch.tensor(cell, dtype=torch.float64)[None],
            torch.tensor(pbc)[None],
            torch.zeros(len(pos), dtype=torch.int32),
            max_neighbors=8,
        )
        return int(count.sum())

    box = np.eye(3) * 10.0
    assert search([[1.0, 1, 1], [3.5, 1, 1]], box, [False] * 3, 2.5) == 0  # d == cutoff: dropped
    assert search([[1.0, 1, 1], [1.005, 1, 1]], box, [False] * 3, 2.5) == 2  # 0.005 Å apart: kept
    with pytest.raises(RuntimeError, match="volume"):
        search([[1.0, 1, 1], [2.0, 1, 1]], np.zeros((3, 3)), [False] * 3, 2.5)
    z = np.array([1, 1, 1])
    molecule = Structure(
        "m", z, np.array([[0.0, 0, 0], [0.005, 0, 0], [2.5, 0, 0]]), np.zeros((3, 3)), np.zeros(3, bool)
    )
    graphs = assert_same_edges([molecule], 2.5, 50)
    pairs = {(0, 2), (2, 0), (1, 2), (2, 1)}  # 0-1 (0.005 Å) dropped, 0-2 at the cutoff kept
    assert device_edge_sets(graphs)[0] == {(j, i, (0, 0, 0)) for j, i in pairs}
    assert graphs.status.min_distance[0] == pytest.approx(0.005)


def mixed(rng):
    """A batch of every kind, each twice with other atoms, and a chain whose centres have many neighbours."""
    out = cases(rng) + all_kinds(rng)
    pos = np.arange(30)[:, None] * np.array([0.9, 0.3, 0.0]) + rng.normal(0, 0.05, (30, 3))
    out.append(Structure("chain", rng.integers(1, 84, 30), pos, np.eye(3) * 20, np.zeros(3, bool)))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_feed_is_bitwise_collate_of_the_host_graphs(dtype, rng):
    """Every array of the feed, bit for bit (signed zeros included), as collate makes it from the host
    graphs put in the device's edge order; and again with spare slots and pairs."""
    structures = mixed(rng)
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    host = [canonical_graph(s.graph(5.0, 20)) for s in structures]
    for n_slots, n_pairs in [(None, None), (40, sum(g.n_edges for g in host) // 2 + 7)]:
        feed, _ = device_feed(
            *batch(structures), cutoff=5.0, max_neighbors=20, dtype=dtype, n_slots=n_slots, n_pairs=n_pairs
        )
        want = collate(host, np_dtype, n_slots=n_slots, n_pairs=n_pairs)
        assert set(feed) == set(want)
        for name, value in want.items():
            got = feed[name].cpu().numpy()
            assert got.dtype == value.dtype and got.shape == value.shape, name
            assert got.tobytes() == value.tobytes(), f"{name}: {np.abs(got - value).max()}"
    with pytest.raises(ValueError, match="n_slots=8 is fewer"):
        device_feed(*batch(structures), cutoff=5.0, max_neighbors=20, n_slots=8)
    with pytest.raises(ValueError, match="n_pairs=3 is fewer"):
        device_feed(*batch(structures), cutoff=5.0, max_neighbors=20, n_pairs=3)


def test_a_selection_is_the_feed_of_those_structures_alone(rng):
    """Graphs built for a chunk, then cut into batches: each batch's feed is bitwise collate's of its
    structures' host graphs (edges, reverses and atoms renumbered)."""
    structures = mixed(rng)
    graphs = build_graphs(*batch(structures), cutoff=5.0, max_neighbors=20)
    host = [canonical_graph(s.graph(5.0, 20)) for s in structures]
    for chosen in ([0, 3, 4, 9], [len(structures) - 1], list(range(1, len(structures), 2))):
        feed = graphs.select(chosen).feed(torch.float64)
        want = collate([host[k] for k in chosen], np.float64)
        for name, value in want.items():
            assert feed[name].numpy().tobytes() == value.tobytes(), (chosen, name)
    with pytest.raises(ValueError, match="increasing"):
        graphs.select([3, 1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_model_outputs(dtype, rng):
    """The model on the device feed: bitwise the host feed in the device's edge order; within
    rounding of the host's own (search) order, a permutation of every sum over slots."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _model_outputs(dtype, rng)
    finally:
        torch.set_num_threads(threads)


def _model_outputs(dtype, rng):
    model = make_model(SMALL, dtype)
    structures = mixed(rng)
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    feed, _ = device_feed(
        *batch(structures), cutoff=SMALL.cutoff, max_neighbors=SMALL.max_neighbors, dtype=dtype
    )
    got = model.predict({k: v.cpu().numpy() for k, v in feed.items()})
    graphs = [s.graph(SMALL.cutoff, SMALL.max_neighbors) for s in structures]
    same_order = model.predict(collate([canonical_graph(g) for g in graphs], np_dtype))
    for name in ("energy", "forces"):
        assert got[name].tobytes() == same_order[name].tobytes(), name
    if dtype == torch.float64:
        search_order = model.predict(collate(graphs, np_dtype))
        n = feed["natoms"].numpy()
        assert_close("energy", got["energy"] / n, search_order["energy"] / n, "invariance", "float64")
        assert_close("forces", got["forces"], search_order["forces"], "invariance", "float64")


def test_statuses_equal_the_pipelines(rng):
    """Each status the graph stage gives, with its message, as pipelines.graphs.structure_item gives
    it; the feed holds the ok structures only, their edges the host's."""
    from pipelines.graphs import MIN_SEPARATION, GraphSettings, structure_item

    z1, z2 = np.array([6]), np.array([6, 6])
    bad = [
        Structure("empty", np.zeros(0, np.int64), np.zeros((0, 3)), np.eye(3) * 5, np.array([True] * 3)),
        Structure(
            "unknown_element",
            np.array([6, 99]),
            np.array([[0.0, 0, 0], [1.5, 0, 0]]),
            np.eye(3) * 9,
            np.zeros(3, bool),
        ),
        Structure(
            "nan_position", z2, np.array([[np.nan, 0, 0], [1.5, 0, 0]]), np.eye(3) * 5, np.array([True] * 3)
        ),
        Structure("zero_cell", z1, np.zeros((1, 3)), np.zeros((3, 3)), np.array([True] * 3)),
        Structure(
            "dependent",
            z1,
            np.zeros((1, 3)),
            np.array([[1.0, 0, 0], [2, 0, 0], [0, 0, 1]]),
            np.array([True, True, False]),
        ),
        Structure(
            "nan_periodic_row",
            z1,
            np.zeros((1, 3)),
            np.array([[np.nan, 0, 0], [0, 5, 0], [0, 0, 5]]),
            np.array([True] * 3),
        ),
        Structure("self_image", z1, np.zeros((1, 3)), np.diag([0.4, 3.0, 3.0]), np.array([True] * 3)),
        Structure(
            "coincident", z2, np.array([[0.0, 0, 0], [0.005, 0, 0]]), np.zeros((3, 3)), np.zeros(3, bool)
        ),
        Structure(
            "across_boundary",
            z2,
            np.array([[0.001, 1, 1], [4.996, 1, 1]]),
            np.eye(3) * 5,
            np.array([True] * 3),
        ),
        Structure("identical", z2, np.array([[1.0, 1, 1], [1.0, 1, 1]]), np.eye(3) * 5, np.array([True] * 3)),
    ]
    nan_vacuum = np.array([[5.0, 0, 0], [0, 5, 0], [np.nan, 0, 0]])  # not periodic: dropped, as the host does
    good = [
        *all_kinds(rng),
        Structure(
            "nan_vacuum", z2, np.array([[0.0, 0, 0], [1.5, 0, 0]]), nan_vacuum, np.array([True, True, False])
        ),
    ]
    structures = [x for pair in zip(bad, good + good[: len(bad) - len(good)]) for x in pair]
    settings = GraphSettings(cutoff=5.0, max_neighbors=20, num_elements=83)
    graphs = build_graphs(
        *batch(structures), cutoff=5.0, max_neighbors=20, min_separation=MIN_SEPARATION, num_elements=83
    )
    items = [
        structure_item(k, s.atomic_numbers, s.positions, s.cell, s.pbc, settings)
        for k, s in enumerate(structures)
    ]
    assert graphs.status.kind == tuple(item.status for item in items)
    assert graphs.status.message == tuple(item.message for item in items)
    ok = [k for k, item in enumerate(items) if item.status == "ok"]
    assert graphs.status.in_feed.tolist() == ok
    assert device_edge_sets(graphs) == [edge_set(items[k].graph) for k in ok]
    # The pipeline's graphs carry float32 edge shifts (for_float32_feed): a float32 feed.
    feed, _ = device_feed(
        *batch(structures), cutoff=5.0, max_neighbors=20, min_separation=MIN_SEPARATION, num_elements=83
    )
    want = collate([canonical_graph(items[k].graph) for k in ok], np.float32)
    for name in ("neighbors", "neighbor_shift", "positions", "cell", "pair_slots"):
        assert feed[name].numpy().tobytes() == want[name].tobytes(), name
    with pytest.raises(InvalidGraphError, match="no graphs"):
        device_feed(*batch(bad), cutoff=5.0, max_neighbors=20, min_separation=MIN_SEPARATION, num_elements=83)


def test_two_runs_in_a_row_are_identical(rng):
    structures = mixed(rng)
    first, _ = device_feed(*batch(structures), cutoff=5.0, max_neighbors=20)
    second, _ = device_feed(*batch(structures), cutoff=5.0, max_neighbors=20)
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_size_helpers(rng):
    """max_edges never under-counts under a strict cap; the first search's width is a usable guess."""
    structures = mixed(rng)
    positions, cells, pbc, z, natoms = batch(structures)
    for cap in (4, 20):
        graphs = build_graphs(positions, cells, pbc, z, natoms, cutoff=5.0, max_neighbors=cap)
        assert np.all(graphs.n_edges <= max_edges(natoms, max_neighbors=cap, pbc=pbc))
    with pytest.raises(ValueError, match="strict cap"):
        max_edges(natoms, max_neighbors=20, strict=False)
    expected = expected_neighbors(natoms, cells, pbc, 5.0)
    assert expected.shape == natoms.shape and np.all(np.isfinite(expected))
    molecule = ~pbc.any(axis=1)
    np.testing.assert_array_equal(expected[molecule], natoms[molecule] - 1)


def test_bad_batch_shapes_are_refused():
    pos, cells, pbc, z = (
        np.zeros((2, 3)),
        np.stack([np.eye(3)] * 2),
        np.ones((2, 3), bool),
        np.ones(2, np.int64),
    )
    with pytest.raises(ValueError, match="sum to the 2 rows"):
        build_graphs(pos, cells, pbc, z, [1, 2], cutoff=5.0, max_neighbors=8)
    with pytest.raises(ValueError, match=r"cells must have shape \[2, 3, 3\]"):
        build_graphs(pos, cells[:1], pbc, z, [1, 1], cutoff=5.0, max_neighbors=8)


@pytest.mark.gpu
@pytest.mark.parametrize("strict", [True, False])
def test_gpu_feed_is_bitwise_the_cpu_feed(strict, rng):
    """On a CUDA device (the search's other kernels, atomics in its row order): the same feed, bit for
    bit, as on the CPU, which the tests above hold equal to the host path's."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    structures = [*mixed(rng), Structure("fcc", np.full(32, 29), *_fcc(), np.array([True] * 3))]
    for dtype in (torch.float32, torch.float64):
        cpu, cpu_status = device_feed(
            *batch(structures), cutoff=5.5, max_neighbors=12, strict=strict, dtype=dtype
        )
        gpu, gpu_status = device_feed(
            *batch(structures), cutoff=5.5, max_neighbors=12, strict=strict, dtype=dtype, device="cuda"
        )
        assert gpu_status.kind == cpu_status.kind
        for name, value in cpu.items():
            assert gpu[name].device.type == "cuda", name
            assert gpu[name].cpu().numpy().tobytes() == value.numpy().tobytes(), (name, dtype)
