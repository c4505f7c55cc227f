"""collate's compiled slot layout against its numpy reference, bit for bit.

The graphs: every structure kind the neighbour tests use, a realistic batch
(thousands of atoms, the demo's graph settings), and graphs a caller builds
with :class:`~painn_export.batch.Graph` (any edge order, narrow dtypes,
repeated edges, self-images, no edges at all).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from painn_export import batch
from painn_export.batch import Graph, InvalidGraphError, collate, collate_reference
from painn_export.neighbors import neighbor_graph
from painn_export.samples import bulk as bulk_sample
from painn_export.samples import example_set
from painn_export.samples import slab as slab_sample

from structures import all_kinds, bulk, chain


def assert_same_feed(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert got[name].shape == want[name].shape, name
        assert got[name].tobytes() == want[name].tobytes(), name


def caller_graphs(rng) -> list[Graph]:
    """Graphs as a caller may build them: shuffled edges, int32 indices, float32 geometry, repeats."""
    host = bulk(rng, n=9).graph(5.0, 20)
    perm = rng.permutation(host.n_edges)
    shuffled = Graph(
        atomic_numbers=host.atomic_numbers.astype(np.int32),
        positions=host.positions.astype(np.float32),
        edge_index=host.edge_index[:, perm].astype(np.int32),
        cell_shift=host.cell_shift[perm].astype(np.int32),
        edge_shift=host.edge_shift[perm].astype(np.float32),
        cell=host.cell,
    )
    # One edge listed twice (with its reverse twice): valid, counted twice, as upstream would.
    twice = np.concatenate([host.edge_index, host.edge_index[:, :1], host.edge_index[::-1, :1]], axis=1)
    shifts = np.concatenate([host.cell_shift, host.cell_shift[:1], -host.cell_shift[:1]])
    repeated = Graph(
        atomic_numbers=host.atomic_numbers,
        positions=host.positions + 100.0,  # far from the origin: the centroid matters
        edge_index=twice,
        cell_shift=shifts,
        edge_shift=shifts @ host.cell,
        cell=host.cell,
    )
    lonely = Graph(  # one atom, no edges
        atomic_numbers=np.array([8]),
        positions=np.array([[1.0, 2.0, 3.0]]),
        edge_index=np.zeros((2, 0), np.int64),
        cell_shift=np.zeros((0, 3), np.int64),
        edge_shift=np.zeros((0, 3)),
    )
    return [shuffled, repeated, lonely]


@pytest.fixture(params=[None, 2], ids=["one_pass", "two_threads"])
def pool(request, monkeypatch):
    if request.param is None:
        yield None
        return
    monkeypatch.setattr(batch, "COLLATE_POOL_SLOTS", 0)  # small feeds too go to the threads here
    with ThreadPoolExecutor(request.param) as threads:
        yield threads


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_collate_is_its_reference_on_every_kind(dtype, rng, pool):
    graphs = [s.graph(5.0, 20) for s in all_kinds(rng)] + [s.graph(6.0, 3) for s in all_kinds(rng)]
    graphs += [chain(rng, 12), *caller_graphs(rng)]
    for subset in (graphs, graphs[::-1], graphs[-1:], graphs[3:4], graphs[-2:]):
        assert_same_feed(collate(subset, dtype, pool=pool), collate_reference(subset, dtype))
    need = max(g.max_degree for g in graphs)
    pairs = sum(g.n_edges for g in graphs) // 2
    extra = {"n_slots": need + 5, "n_pairs": pairs + 7}  # padding slots and spare pairs
    assert_same_feed(collate(graphs, dtype, pool=pool, **extra), collate_reference(graphs, dtype, **extra))
    # Without the flat edge list (what the pipelines feed every runtime): the rest is the same bytes.
    want = collate_reference(graphs, dtype, n_slots=need)
    lean = collate(graphs, dtype, pool=pool, n_slots=need, edges=False)
    assert "edge_index" not in lean and "edge_shift" not in lean
    assert_same_feed(lean, {k: v for k, v in want.items() if k not in ("edge_index", "edge_shift")})


def test_collate_is_its_reference_at_realistic_size_every_time(rng):
    """A batch of thousands of atoms at the demo's settings (6 Å, cap 50), in one pass and on two
    threads, each twice: the same bytes."""
    elements = np.arange(1, 84)
    samples = [bulk_sample(rng, n, elements) for n in rng.integers(20, 121, 30)]
    samples += [slab_sample(rng, n, elements) for n in rng.integers(20, 121, 10)]
    samples += example_set(seed=1, large=256)
    graphs = [
        neighbor_graph(s.positions, s.cell, s.pbc, 6.0, 50, atomic_numbers=s.atomic_numbers) for s in samples
    ]
    assert sum(g.n_atoms for g in graphs) > 2000
    want = collate_reference(graphs)
    assert_same_feed(collate(graphs), want)
    assert_same_feed(collate(graphs), want)
    with ThreadPoolExecutor(2) as threads:
        assert_same_feed(collate(graphs, pool=threads), want)
        assert_same_feed(collate(graphs, pool=threads), want)


def test_collate_refuses_what_its_reference_refuses(rng, monkeypatch):
    monkeypatch.setattr(batch, "COLLATE_POOL_SLOTS", 0)  # with a pool, even these few slots are shared out
    graphs = [s.graph(5.0, 20) for s in all_kinds(rng)]
    need = max(g.max_degree for g in graphs)
    pairs = sum(g.n_edges for g in graphs) // 2
    for kw, message in (
        ({"n_slots": need - 1}, "fewer than the"),
        ({"n_pairs": pairs - 1}, f"n_pairs={pairs - 1} is fewer than the {pairs} pairs"),
    ):
        for function in (collate, collate_reference):
            with pytest.raises(ValueError, match=message):
                function(graphs, **kw)
        with pytest.raises(ValueError, match=message):  # given n_slots, the kernel finds the slot beyond
            collate(graphs, edges=False, **kw)
        with ThreadPoolExecutor(2) as threads, pytest.raises(ValueError, match=message):
            collate(graphs, edges=False, pool=threads, **{"n_pairs": pairs, **kw})
    edgeless = [g for g in graphs if not g.n_edges] + caller_graphs(rng)[-1:]
    for function in (collate, collate_reference):  # no edge to check: refused all the same
        with pytest.raises(ValueError, match="n_slots=0 is fewer than the 1 slots"):
            function(edgeless, n_slots=0)
    for function in (collate, collate_reference):
        with pytest.raises(InvalidGraphError, match="no graphs"):
            function([])


def test_what_from_checked_lets_through_is_refused_before_anything_is_written(rng, pool):
    """Graph.from_checked skips Graph's checks; collate still refuses, naming the graph, reverses that
    are not a pairing (itself, a swap that is not mutual), indices outside the graph, slots beyond
    the slots and a graph without atoms, where the numpy reference would fail or write elsewhere."""
    good = bulk(rng, n=6).graph(5.0, 12)
    n = good.n_edges
    swapped = good.edge_reverse.copy()
    swapped[[0, 1]] = swapped[[1, 0]]  # e0 -> rev(e1), whose reverse is e1, not e0
    wrong = {
        "itself": {"edge_reverse": np.arange(n)},
        "not mutual": {"edge_reverse": swapped},
        "out of range reverse": {"edge_reverse": np.full(n, n)},
        "sender outside": {"edge_index": np.where(np.arange(n) == 3, good.n_atoms, good.edge_index)},
        "negative slot": {"edge_slot": good.edge_slot - 1},
        "no atoms": {"positions": np.zeros((0, 3)), "atomic_numbers": np.zeros(0, np.int64)},
    }
    for change in wrong.values():
        broken = Graph.from_checked(**{**good.fields(), **change})
        with pytest.raises(InvalidGraphError, match="graph 1 has"):
            collate([good, broken, good], pool=pool)


def test_from_checked_refuses_a_field_graph_does_not_have(rng):
    good = bulk(rng, n=4).graph(5.0, 12)
    fields = {name: getattr(good, name) for name in good.__dataclass_fields__}
    assert_same_feed(collate([Graph.from_checked(**fields)]), collate([good]))
    with pytest.raises(TypeError, match="Graph has no field edge_vectors"):
        Graph.from_checked(**fields, edge_vectors=good.edge_shift)
