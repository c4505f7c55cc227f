"""update_skins: a whole batch's skin graphs in one pass, each exactly its fresh graph, alone or not."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk, fcc111, molecule

from painn_export import skin
from painn_export.batch import Graph
from painn_export.neighbors import StructureError, neighbor_graph
from painn_export.skin import SkinGraph, update_skins

CUTOFF, CAP = 5.0, 12
FIELDS = (
    "atomic_numbers",
    "positions",
    "edge_index",
    "cell_shift",
    "edge_shift",
    "edge_slot",
    "edge_reverse",
)


def _structures(rng) -> list:
    """Bulk (rattled, and perfect: the cap cuts through whole shells), a slab, a molecule, a wire."""
    rattled = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
    rattled.positions += rng.normal(0, 0.05, rattled.positions.shape)
    perfect = bulk("Cu", "fcc", a=3.6).repeat((3, 3, 3))
    slab = fcc111("Cu", (3, 3, 3), vacuum=5.0)
    mol = molecule("CH3CH2OH")
    mol.center(3.0)
    wire = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((1, 1, 3))
    wire.pbc = [False, False, True]
    tiny = bulk("Cu", "fcc", a=3.6)  # one atom: its neighbours are its own images
    twin = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))
    twin.positions[1] = twin.positions[0] + [0.005, 0.0, 0.0]  # coincident: no edge yet, then they part
    return [rattled, perfect, slab, mol, wire, tiny, twin]


def _arrays(structures):
    return (
        [a.numbers.astype(np.int64) for a in structures],
        [a.positions.copy() for a in structures],
        [a.cell[:].copy() for a in structures],
        [a.pbc.copy() for a in structures],
    )


@pytest.mark.parametrize("search", ["images", "vesin"])
@pytest.mark.parametrize(("cap", "strict"), [(CAP, True), (CAP, False), (0, True)])
def test_a_batch_gives_each_structure_its_fresh_graph_and_what_it_gets_alone(
    rng, monkeypatch, cap, strict, search
):
    """Moving and straining together for 25 steps: every graph equals neighbor_graph's, bit for bit,
    and equals the graph the same structure's skin gives when updated alone; with the skin lists
    searched by images (small structures) or by vesin (large ones)."""
    if search == "vesin":
        from painn_export import neighbors

        monkeypatch.setattr(neighbors, "IMAGE_SEARCH_ATOMS", 0)
    structures = _structures(rng)
    z, pos, cells, pbcs = _arrays(structures)
    together = [SkinGraph(CUTOFF, cap, skin=0.6, strict=strict) for _ in structures]
    alone = [SkinGraph(CUTOFF, cap, skin=0.6, strict=strict) for _ in structures]
    for step in range(25):
        graphs = update_skins(together, z, pos, cells, pbcs)
        for s, got in enumerate(graphs):
            want = neighbor_graph(pos[s], cells[s], pbcs[s], CUTOFF, cap, atomic_numbers=z[s], strict=strict)
            single = alone[s].update(z[s], pos[s], cells[s], pbcs[s])
            for key in FIELDS:
                for other, name in ((want, "fresh"), (single, "alone")):
                    np.testing.assert_array_equal(
                        getattr(got, key),
                        getattr(other, key),
                        err_msg=f"step {step}, structure {s}: {key} vs {name}",
                    )
                    assert getattr(got, key).dtype == getattr(other, key).dtype, key
            assert got.min_distance == want.min_distance
            np.testing.assert_array_equal(got.cell, want.cell)
        for s in range(len(pos)):
            pos[s] = pos[s] + rng.normal(0, 0.04, pos[s].shape)
            if pbcs[s].all() and step % 4 == 1:  # strained periodic cells, atoms carried along
                strain = np.eye(3) + rng.normal(0, 0.01, (3, 3))
                cells[s], pos[s] = cells[s] @ strain, pos[s] @ strain
    searches = sum(s.n_searches for s in together)
    assert len(structures) <= searches < 25 * len(structures) // 2, f"{searches} searches"


def test_the_graphs_pass_graphs_own_checks(rng):
    """Built unchecked, each graph passes Graph's own full checks, with equal slots, reverses and busiest
    atom (the kernel counts it; Graph finds it from the slots)."""
    structures = _structures(rng)
    skins = [SkinGraph(CUTOFF, CAP, skin=0.6) for _ in structures]
    for got in update_skins(skins, *_arrays(structures)):
        assert "_max_degree" in vars(got)  # the kernel's count, not yet looked at
        fields = {key: np.ascontiguousarray(getattr(got, key)) for key in FIELDS[:5]}
        checked = Graph(**fields, cell=got.cell)  # slots and reverses derived and checked afresh
        np.testing.assert_array_equal(checked.edge_slot, got.edge_slot)
        np.testing.assert_array_equal(checked.edge_reverse, got.edge_reverse)
        assert got.max_degree == checked.max_degree
        Graph(**fields, cell=got.cell, edge_slot=got.edge_slot.copy(), edge_reverse=got.edge_reverse.copy())


def test_a_structure_without_a_geometry_fails_in_its_place_only(rng):
    """NaN positions and a collapsed cell give validate_structure's errors in their places only."""
    structures = _structures(rng)
    z, pos, cells, pbcs = _arrays(structures)
    skins = [SkinGraph(CUTOFF, CAP, skin=0.6) for _ in structures]
    update_skins(skins, z, pos, cells, pbcs)
    z[2], pos[2] = z[2][:0], pos[2][:0]  # an empty structure
    pos[0] = pos[0].copy()
    pos[0][3, 1] = np.nan
    cells[1] = cells[1].copy()
    cells[1][2] = cells[1][0]  # two equal lattice vectors: no volume
    graphs = update_skins(skins, z, pos, cells, pbcs)
    assert isinstance(graphs[0], StructureError) and graphs[0].kind == "nonfinite_positions"
    assert isinstance(graphs[1], StructureError) and graphs[1].kind == "bad_cell"
    assert isinstance(graphs[2], StructureError) and graphs[2].kind == "empty_structure"
    with pytest.raises(StructureError) as single:
        SkinGraph(CUTOFF, CAP).update(z[1], pos[1], cells[1], pbcs[1])
    assert str(single.value) == str(graphs[1])
    for s in range(3, len(structures)):
        want = neighbor_graph(pos[s], cells[s], pbcs[s], CUTOFF, CAP, atomic_numbers=z[s])
        np.testing.assert_array_equal(graphs[s].edge_index, want.edge_index)


def test_a_molecule_whose_cell_has_nan_rows_is_not_searched_every_step():
    """Non-periodic axes' non-finite vectors are dropped, as validate_structure does: the list is kept."""
    mol = molecule("H2O")
    cell = np.full((3, 3), np.nan)
    skin = SkinGraph(CUTOFF, CAP, skin=0.6)
    for step in range(4):
        (graph,) = update_skins([skin], [mol.numbers.astype(np.int64)], [mol.positions + 0.01 * step], [cell],
                                [np.zeros(3, bool)])  # fmt: skip
        assert graph.n_edges == 6
    assert skin.n_searches == 1


def test_update_skins_refuses_what_it_cannot_read():
    mol = molecule("H2O")
    z, x, cell, pbc = mol.numbers.astype(np.int64), mol.positions, np.zeros((3, 3)), np.zeros(3, bool)
    with pytest.raises(ValueError, match="float64"):
        update_skins([SkinGraph(CUTOFF, CAP)], [z], [x.astype(np.float32)], [cell], [pbc])
    with pytest.raises(ValueError, match="bool pbc"):
        update_skins([SkinGraph(CUTOFF, CAP)], [z], [x], [cell], [np.zeros(3, int)])
    with pytest.raises(ValueError, match="one cutoff"):
        update_skins(
            [SkinGraph(CUTOFF, CAP), SkinGraph(CUTOFF + 1, CAP)], [z, z], [x, x], [cell, cell], [pbc, pbc]
        )
    assert update_skins([], [], [], [], []) == []


def test_coincident_atoms_count_for_min_distance_and_their_edge_appears_when_they_part():
    """A pair closer than 0.01 Å has no edge but sets min_distance (what atoms_too_close reads);
    kept in the skin list, its edge appears as soon as the atoms part, without a new search."""
    twin = bulk("Cu", "fcc", a=3.6, cubic=True)
    x = twin.positions.copy()
    x[1] = x[0] + [0.005, 0.0, 0.0]
    z, cell, pbc = twin.numbers.astype(np.int64), twin.cell[:].copy(), twin.pbc.copy()
    skin = SkinGraph(CUTOFF, CAP, skin=0.6)
    got = skin.update(z, x, cell, pbc)
    want = neighbor_graph(x, cell, pbc, CUTOFF, CAP, atomic_numbers=z)
    assert got.min_distance == want.min_distance == pytest.approx(0.005)
    x = x.copy()
    x[1, 0] += 0.1  # 0.105 Å apart: within skin / 2 of the search, so no new search
    got = skin.update(z, x, cell, pbc)
    want = neighbor_graph(x, cell, pbc, CUTOFF, CAP, atomic_numbers=z)
    assert skin.n_searches == 1
    np.testing.assert_array_equal(got.edge_index, want.edge_index)
    assert ((got.edge_index[0] == 0) & (got.edge_index[1] == 1)).any()


def test_the_graphs_arrays_are_read_only(rng):
    """They are views into arrays the whole batch shares: writing one graph's would change others."""
    structures = _structures(rng)[:2]
    graphs = update_skins([SkinGraph(CUTOFF, CAP) for _ in structures], *_arrays(structures))
    for key in ("edge_index", "cell_shift", "edge_shift", "edge_slot", "edge_reverse"):
        with pytest.raises(ValueError, match="read-only"):
            getattr(graphs[0], key)[..., :1] = 0


def test_a_pool_of_threads_gives_the_same_bits_every_time(rng):
    """A realistic batch (88 structures, 20-100 atoms, 6 Å, cap 50) stepped 12 times: on two
    threads, twice, every graph and every search equal those of one thread; a structure whose
    positions turn NaN fails in its place on every path."""
    from concurrent.futures import ThreadPoolExecutor

    from painn_export.samples import bulk as bulk_sample
    from painn_export.samples import slab as slab_sample

    elements = np.array([13, 28, 29, 46, 78, 79])
    samples = [bulk_sample(rng, int(n), elements) for n in rng.integers(20, 101, 72)]
    samples += [slab_sample(rng, int(n), elements) for n in rng.integers(20, 101, 16)]
    moves = [[rng.normal(0, 0.06, s.positions.shape) for s in samples] for _ in range(12)]

    def trajectory(pool):
        skins = [SkinGraph(6.0, 50, skin=0.5) for _ in samples]
        pos = [s.positions.copy() for s in samples]
        cells = [np.array(s.cell, np.float64) for s in samples]
        out = []
        for step in range(12):
            if step == 7:
                pos[5] = pos[5] * np.nan
            z = [np.asarray(s.atomic_numbers, np.int64) for s in samples]
            out.append(update_skins(skins, z, pos, cells, [np.asarray(s.pbc) for s in samples], pool=pool))
            assert sum(len(sk._pairs[0]) for sk in skins) > skin.POOL_PAIRS  # the groups run on the pool
            pos = [p + d for p, d in zip(pos, moves[step])]
        return out, [s.n_searches for s in skins]

    want, searches = trajectory(None)
    assert sum(searches) > 2 * len(samples)  # the batch searched again along the way
    for _ in range(2):
        with ThreadPoolExecutor(2) as pool:
            got, got_searches = trajectory(pool)
        assert got_searches == searches
        for step, (graphs, expected) in enumerate(zip(got, want)):
            for s, (g, w) in enumerate(zip(graphs, expected)):
                if isinstance(w, StructureError):
                    assert isinstance(g, StructureError) and str(g) == str(w), (step, s)
                    continue
                for key in FIELDS:
                    assert getattr(g, key).tobytes() == getattr(w, key).tobytes(), (step, s, key)
                assert g.min_distance == w.min_distance
    assert isinstance(want[8][5], StructureError)


def _sides(a, b, S) -> list[tuple]:
    """Each half-list pair as its kept edge (receiver, sender, receiver's shift): the same whichever
    end a search wrote first."""
    from painn_export._neighbors_kernel import _kept_side_is_b

    out = []
    for p in range(len(a)):
        flip = _kept_side_is_b(a[p], b[p], *S[p])
        out.append(
            (int(b[p]), int(a[p]), *(-S[p]).tolist()) if flip else (int(a[p]), int(b[p]), *S[p].tolist())
        )
    return out


def test_the_image_search_finds_vesins_pairs_already_in_the_canonical_order(rng):
    """The skin's search of small structures (every atom pair against every image it can reach)
    lists vesin's pairs, the same edges, and in the order canonical_pairs would sort them into:
    skewed cells, cells smaller than the radius (many self-images: more pairs than its first
    scratch holds), atoms far outside the cell, every kind of pbc, coincident atoms."""
    from painn_export import neighbors
    from painn_export._neighbors_kernel import canonical_pairs
    from painn_export.neighbors import _image_search, _search, validate_structure

    cases = []
    for pbc in ([1, 1, 1], [1, 1, 0], [0, 0, 1], [0, 0, 0], [1, 0, 1]):
        for n, scale in ((1, 2.3), (5, 3.0), (30, 9.0), (60, 11.0)):
            cell = scale * (np.eye(3) + rng.normal(0, 0.25, (3, 3)))  # skewed
            x = rng.random((n, 3)) @ cell + rng.normal(0, 3 * scale, (n, 3))  # unwrapped
            if n > 1:
                x[1] = x[0]  # coincident: a skin list keeps them
            cases.append((x, cell, np.array(pbc, bool)))
    # Exact lattices, radius the lattice constant: pairs exactly on the radius (kept: d² <= r²), found
    # only thanks to the bounds' margin where the fractional coordinates round down.
    for a in (2.135, 2.275, 3.0):  # the first two: without the margin, pairs would be missed
        lattice = bulk("Cu", "sc", a=a).repeat((2, 2, 2))
        cases.append((lattice.positions, lattice.cell[:], np.ones(3, bool), (a, 2 * a)))
    near = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((4, 4, 6))  # 384 atoms: the largest searched so
    near.positions += rng.normal(0, 0.05, near.positions.shape)
    cases.append((near.positions, near.cell[:], near.pbc, (7.0,)))
    empty = 0
    for x, cell, pbc, *radii in cases:
        x, cell, pbc = validate_structure(x, cell, pbc)
        for radius in radii[0] if radii else (3.0, 7.0):
            a, b, S, _, _ = _search(x, cell, pbc, radius, min_d2=-1.0)
            mine = _image_search(x, cell, pbc, radius, min_d2=-1.0)
            assert sorted(_sides(*mine)) == sorted(_sides(a, b, S)), (len(x), pbc, radius)
            empty += len(mine[0]) == 0
            np.testing.assert_array_equal(canonical_pairs(*mine, len(x)), np.arange(len(mine[0])))
            assert mine[2].dtype == np.int32 and mine[0].dtype == np.int64
    assert empty <= 4  # a lone atom without periodic images, at each radius
    assert len(near) == neighbors.IMAGE_SEARCH_ATOMS
    # More pairs than a fresh scratch holds (48 an atom): found again with room for them, the same.
    x, cell, pbc = validate_structure(rng.random((5, 3)) * 3.0, 3.0 * np.eye(3), np.ones(3, bool))
    before = _image_search(x, cell, pbc, 7.0, -1.0)
    del neighbors._local.image_pairs
    again = _image_search(x, cell, pbc, 7.0, -1.0)
    assert len(again[0]) > 1.25 * 48 * len(x)
    for mine, theirs in zip(again, before):
        np.testing.assert_array_equal(mine, theirs)


def test_a_large_structure_is_searched_by_vesin(rng, monkeypatch):
    """More atoms than IMAGE_SEARCH_ATOMS, or image offsets beyond int32 (a cell nearly flat, atoms
    far outside it): the image search declines, and the skin's graph, then vesin's, is still
    neighbor_graph's."""
    from painn_export import neighbors
    from painn_export.neighbors import _image_search, validate_structure

    flat = np.array([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [3.0, 3.0, 1e-6]])  # c nearly in the ab plane
    x = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 5e3]])  # 5e9 cells apart along c's dual
    x, flat, pbc = validate_structure(x, flat, np.ones(3, bool))
    assert _image_search(x, flat, pbc, CUTOFF + 0.5, -1.0) is None  # declined before any search
    big = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((5, 5, 4))  # 400 atoms
    big.positions += rng.normal(0, 0.05, big.positions.shape)
    assert len(big) > neighbors.IMAGE_SEARCH_ATOMS
    assert _image_search(big.positions, big.cell[:], big.pbc, CUTOFF + 0.5, -1.0) is None
    small = _structures(rng)[0]  # 32 atoms: searched by images, unless the limit is lower
    args = (small.positions, small.cell[:], small.pbc, CUTOFF + 0.5, -1.0)
    assert _image_search(*args) is not None
    monkeypatch.setattr(neighbors, "IMAGE_SEARCH_ATOMS", 31)
    assert _image_search(*args) is None
    for atoms in (big, small):
        numbers = atoms.numbers.astype(np.int64)
        skin_graph = SkinGraph(CUTOFF, CAP, skin=0.5)
        got = skin_graph.update(numbers, atoms.positions, atoms.cell[:], atoms.pbc)
        want = neighbor_graph(atoms.positions, atoms.cell[:], atoms.pbc, CUTOFF, CAP, atomic_numbers=numbers)
        for key in FIELDS:
            np.testing.assert_array_equal(getattr(got, key), getattr(want, key), err_msg=key)


def test_collate_reads_a_passs_graphs_in_place_with_the_same_bits_as_their_copies(rng, monkeypatch):
    """A realistic batch (100 structures, 20-100 atoms, 6 Å, cap 50) from a pass on two threads: its
    graphs' feed, read in place (shown: every group collate lays out reads the pass's arrays, on a
    pool and not), equals the feed of
    copies of them (on the pool and not, and the numpy reference) bit for bit; so do one set's graphs,
    one graph, sub-batches, a batch with a gap, and ones with another graph first or in between. A
    pickled graph carries its own arrays only, and a graph rebuilt from another's fields nothing it
    derived."""
    import pickle
    from concurrent.futures import ThreadPoolExecutor

    from painn_export import batch
    from painn_export.batch import collate, collate_reference
    from painn_export.contract import slot_count
    from painn_export.samples import bulk as bulk_sample

    elements = np.array([13, 28, 29, 46, 78, 79])
    samples = [bulk_sample(rng, int(n), elements) for n in rng.integers(20, 101, 100)]
    arrays = (
        [np.asarray(s.atomic_numbers, np.int64) for s in samples],
        [s.positions.copy() for s in samples],
        [np.array(s.cell, np.float64) for s in samples],
        [np.asarray(s.pbc) for s in samples],
    )
    with ThreadPoolExecutor(2) as pool:
        graphs = update_skins([SkinGraph(6.0, 50, skin=0.5) for _ in samples], *arrays, pool=pool)
        outsider = neighbor_graph(samples[0].positions, samples[0].cell, samples[0].pbc, 6.0, 50,
                                  atomic_numbers=arrays[0][0])  # fmt: skip
        spans = [g.__dict__[batch._SPAN] for g in graphs]
        sets = [k for k in range(1, len(graphs)) if spans[k][0] is not spans[k - 1][0]]
        assert len(sets) == skin.GROUPS - 1  # the pass ran in groups, each graph marked with its set
        first_set = graphs[: sets[0]]
        K = slot_count(max(g.max_degree for g in graphs))
        work = np.array([g.n_atoms * K + g.n_edges for g in graphs])
        groups = batch._groups(graphs, work, batch.COLLATE_GROUPS)
        assert set(sets) <= {g0 for g0, _ in groups} and len(groups) <= batch.COLLATE_GROUPS + len(sets)
        assert batch._groups([outsider, *graphs[:10]], work[:11], 1) == [
            (0, 1),
            (1, 11),
        ]  # a foreign graph first
        mixed = [g if k % 2 else outsider for k, g in enumerate(graphs[:40])]
        assert batch._groups(mixed, work[:40], 4) == batch.even_runs(work[:40], 4)  # too many cuts: not cut

        read = []  # what collate's layout reads: the pass's own arrays, or copies

        def joined(part, in_place=False):
            out = original(part, in_place)
            read.append(any(out["edge_index"] is span[0] for span in spans))
            return out

        original = batch._joined
        monkeypatch.setattr(batch, "_joined", joined)
        for chosen, with_pool in ((graphs, pool), (graphs, None), (first_set, None), (graphs[5:6], None)):
            read.clear()
            collate(chosen, np.float32, pool=with_pool)
            assert read and all(read), (len(chosen), with_pool)  # every group read in place
        read.clear()
        collate([*graphs[:30], outsider, *graphs[30:]], np.float32)
        assert read.count(False) == 1  # the foreign graph alone is copied
        monkeypatch.undo()
        assert batch._joined(graphs[:2])["edge_index"].base is None  # the reference's: always copies
        for chosen in (
            graphs,
            first_set,
            graphs[5:6],
            graphs[3:41],
            graphs[:20] + graphs[21:],
            [outsider, *graphs],
            [*graphs[:30], outsider, *graphs[30:]],
        ):
            copies = [Graph(**{key: np.array(value) for key, value in g.fields().items()}) for g in chosen]
            assert not any(batch._SPAN in vars(c) for c in copies)
            want = collate_reference(copies, np.float32)
            for feed in (
                collate(chosen, np.float32, pool=pool),
                collate(chosen, np.float32),
                collate(copies, np.float32, pool=pool),
                collate_reference(chosen, np.float32),
            ):
                assert feed.keys() == want.keys()
                for key in want:
                    assert feed[key].tobytes() == want[key].tobytes(), key
    kept = pickle.loads(pickle.dumps(graphs[7]))
    assert batch._SPAN not in vars(kept)
    assert len(pickle.dumps(graphs[7])) < 2 * len(pickle.dumps(Graph(**graphs[7].fields())))
    for key in FIELDS:
        assert getattr(kept, key).tobytes() == getattr(graphs[7], key).tobytes()
    assert kept.max_degree == graphs[7].max_degree
    # Rebuilt from another graph's fields with other slots: its own busiest atom, no mark.
    g = graphs[7]
    rebuilt = Graph.from_checked(**{**vars(g), "edge_slot": np.zeros_like(g.edge_slot)})
    assert rebuilt.max_degree == 1 and batch._SPAN not in vars(rebuilt)


def test_a_structure_without_edges_has_no_busiest_atom():
    """An atom alone (no pbc): no edges, and the pass's count of its busiest atom is 0, as Graph's."""
    (graph,) = update_skins([SkinGraph(CUTOFF, CAP)], [np.array([29])], [np.zeros((1, 3))],
                            [np.zeros((3, 3))], [np.zeros(3, bool)])  # fmt: skip
    assert graph.n_edges == 0 and vars(graph)["_max_degree"] == 0
    assert Graph(**graph.fields()).max_degree == 0
