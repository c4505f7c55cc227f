"""Neighbour graphs against an O(N²) float64 brute force with upstream's rules, and ASE."""

import numpy as np
import pytest

from painn_export.batch import collate
from painn_export.neighbors import StructureError, neighbor_graph

from structures import Structure, all_kinds, random_rotation


def brute_force(positions, cell, pbc, cutoff, max_neighbors, strict=True):
    """Upstream semantics written plainly: every (j, image) per centre, images from face distances."""
    positions = np.asarray(positions, float)
    n = len(positions)
    reps = np.zeros(3, int)
    if np.any(pbc):
        recip = np.linalg.inv(cell).T  # rows: reciprocal vectors / 2π; |b_k| = 1 / face distance
        frac = positions @ np.linalg.inv(cell)
        span = np.ptp(frac, axis=0) if n else np.zeros(3)  # unwrapped positions need more images
        for k in range(3):
            if pbc[k]:
                reps[k] = int(np.ceil(cutoff * np.linalg.norm(recip[k]) + span[k])) + 1
    shifts = np.array(
        [
            (a, b, c)
            for a in range(-reps[0], reps[0] + 1)
            for b in range(-reps[1], reps[1] + 1)
            for c in range(-reps[2], reps[2] + 1)
        ]
    )
    shift_cart = shifts @ cell  # [n_shifts, 3] Å
    entries = []
    for i in range(n):
        d2 = np.sum((positions[None, :, :] + shift_cart[:, None, :] - positions[i]) ** 2, axis=-1)
        inside = (d2 > 1e-4) & (d2 <= cutoff**2)  # [n_shifts, n]
        entries.append(
            [(float(d2[s, j]), int(j), tuple(int(x) for x in shifts[s])) for s, j in zip(*np.nonzero(inside))]
        )
    return cap_and_symmetrize_reference(entries, max_neighbors, strict)


def cap_and_symmetrize_reference(entries, max_neighbors, strict=True):
    """Upstream's cap and symmetrisation on ``entries[i]``: centre i's ``(d², j, S)`` list.

    Returns the edge set ``{(sender, receiver, shift of sender)}``.
    """
    kept = []
    for i, cand in enumerate(entries):
        cand = _sort_with_ties(cand)  # (d², j, S): our documented deterministic tie-break
        if max_neighbors > 0 and len(cand) > max_neighbors:
            if strict:
                cand = cand[:max_neighbors]
            else:
                pivot = cand[max_neighbors][0]
                cand = [c for c in cand if c[0] <= pivot + 0.01]
        kept += [(i, j, S) for _, j, S in cand]
    out = set()
    for i, j, S in kept:
        if j < i or (j == i and S < (0, 0, 0)):
            out.add((j, i, S))  # (sender, receiver, shift of sender)
            out.add((i, j, tuple(-x for x in S)))
    return out


def _sort_with_ties(cand, rtol=1e-9):
    """Sort (d², j, S) with d² equal to rtol counted as ties (then j, then S)."""
    cand = sorted(cand)
    out, group = [], []
    for c in cand:
        if group and c[0] - group[-1][0] > rtol * c[0]:
            out += sorted(group, key=lambda x: (x[1], x[2]))
            group = []
        group.append(c)
    return out + sorted(group, key=lambda x: (x[1], x[2]))


def edge_set(g):
    return {(int(j), int(i), tuple(int(x) for x in S)) for j, i, S in zip(*g.edge_index, g.cell_shift)}


def cases(rng):
    out = list(all_kinds(rng))
    skewed = np.array([[4.0, 0.0, 0.0], [3.7, 1.2, 0.0], [3.5, 0.9, 1.5]])  # strongly sheared
    out.append(
        Structure(
            "skewed",
            rng.integers(1, 84, 6),
            rng.uniform(0, 1, (6, 3)) @ skewed,
            skewed,
            np.array([True, True, True]),
        )
    )
    c = np.eye(3) * 6.0
    unwrapped = rng.uniform(-8, 14, (6, 3))  # positions far outside the cell
    out.append(Structure("unwrapped", rng.integers(1, 84, 6), unwrapped, c, np.array([True] * 3)))
    out.append(
        Structure(
            "wire",
            rng.integers(1, 84, 5),
            rng.uniform(0, 3, (5, 3)),
            np.diag([3.1, 0, 0]) + 0,
            np.array([True, False, False]),
        )
    )
    out.append(
        Structure("single_atom", np.array([26]), np.zeros((1, 3)), np.eye(3) * 2.7, np.array([True] * 3))
    )
    lonely = np.array([[0.0, 0, 0], [1.5, 0, 0], [30.0, 30, 30]])
    out.append(Structure("isolated_atom", np.array([1, 1, 8]), lonely, np.zeros((3, 3)), np.zeros(3, bool)))
    return out


def _wire_fix(s):
    # a wire needs a non-singular cell: give the non-periodic axes vacuum vectors
    if s.name == "wire":
        return Structure(s.name, s.atomic_numbers, s.positions, np.diag([3.1, 10.0, 10.0]), s.pbc)
    return s


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize(("cutoff", "cap"), [(4.0, 8), (5.0, 1000)])
def test_against_brute_force(strict, cutoff, cap, rng):
    for s in map(_wire_fix, cases(rng)):
        for trial in range(2):
            R, t = (np.eye(3), np.zeros(3)) if trial == 0 else (random_rotation(rng), rng.normal(0, 5, 3))
            st = s.transformed(R, t)
            ours = neighbor_graph(st.positions, st.cell, st.pbc, cutoff, cap, strict=strict)
            truth = brute_force(st.positions, st.cell, st.pbc, cutoff, cap, strict=strict)
            assert edge_set(ours) == truth, (
                f"{s.name} cutoff={cutoff} cap={cap} strict={strict} "
                f"rotation={R.tolist()} translation={t.tolist()}: "
                f"missing {sorted(truth - edge_set(ours))[:5]} extra {sorted(edge_set(ours) - truth)[:5]}"
            )
            d = ours.distances()
            assert np.all(d <= cutoff + 1e-9) and np.all(d > 1e-2)


def test_two_pass_equals_single_pass(rng):
    L = (300 / 0.08) ** (1 / 3)
    pos = rng.uniform(0, L, (300, 3))
    cell = np.eye(3) * L + rng.uniform(-1, 1, (3, 3))
    for strict in (True, False):
        a = neighbor_graph(pos, cell, [True] * 3, 8.0, 30, strict=strict, two_pass=True)
        b = neighbor_graph(pos, cell, [True] * 3, 8.0, 30, strict=strict, two_pass=False)
        assert edge_set(a) == edge_set(b)  # same graph; edge order follows each search
        assert a.n_edges == b.n_edges


def test_symmetric_with_negated_shifts(rng):
    for s in map(_wire_fix, cases(rng)):
        g = neighbor_graph(s.positions, s.cell, s.pbc, 5.0, 6)
        edges = edge_set(g)
        assert all((i, j, tuple(-x for x in S)) in edges for j, i, S in edges), s.name
        np.testing.assert_allclose(g.edge_shift, g.cell_shift @ s.cell)
        # Documented order (the pipeline's too-close check relies on it): each
        # pair once in the first half, their reverses in the same order after.
        half = g.n_edges // 2
        np.testing.assert_array_equal(g.edge_index[:, half:], g.edge_index[::-1, :half])
        np.testing.assert_array_equal(g.cell_shift[half:], -g.cell_shift[:half])


def test_cutoff_is_inclusive_unlike_ase():
    """Upstream keeps d == cutoff; ASE drops it. Two atoms exactly 2.5 Å apart."""
    ase_nl = pytest.importorskip("ase.neighborlist")
    pos = np.array([[0.0, 0.0, 0.0], [2.5, 0.0, 0.0]])
    g = neighbor_graph(pos, np.zeros((3, 3)), [False] * 3, 2.5, 50)
    assert g.n_edges == 2
    from ase import Atoms

    i, _ = ase_nl.neighbor_list("ij", Atoms("H2", positions=pos), 2.5)
    assert len(i) == 0


def test_uncapped_matches_ase(rng):
    ase_nl = pytest.importorskip("ase.neighborlist")
    from ase import Atoms

    for s in map(_wire_fix, cases(rng)):
        atoms = Atoms(numbers=s.atomic_numbers, positions=s.positions, cell=s.cell, pbc=s.pbc)
        i, j, S = ase_nl.neighbor_list("ijS", atoms, 4.3)  # no pair sits exactly at 4.3 Å
        ase_edges = {(int(b), int(a), tuple(int(x) for x in sh)) for a, b, sh in zip(i, j, S)}
        g = neighbor_graph(s.positions, s.cell, s.pbc, 4.3, 0)
        assert edge_set(g) == ase_edges, s.name


def test_coincident_atoms_are_not_neighbours():
    pos = np.array([[0.0, 0, 0], [0.005, 0, 0], [1.0, 0, 0]])
    g = neighbor_graph(pos, np.zeros((3, 3)), [False] * 3, 3.0, 50)
    assert (0, 1, (0, 0, 0)) not in edge_set(g)
    assert g.n_edges == 4


@pytest.mark.parametrize(
    ("positions", "cell", "pbc", "kind"),
    [
        ([[np.nan, 0, 0]], np.eye(3), [True] * 3, "nonfinite_positions"),
        ([[0, 0, 0]], np.zeros((3, 3)), [True] * 3, "bad_cell"),
        ([[0, 0, 0]], [[1, 0, 0], [2, 0, 0], [0, 0, 1]], [True, True, False], "bad_cell"),
        ([[0, 0]], np.eye(3), [True] * 3, "bad_shape"),
    ],
)
def test_invalid_structures(positions, cell, pbc, kind):
    with pytest.raises(StructureError) as err:
        neighbor_graph(np.array(positions, float), np.array(cell, float), pbc, 5.0, 50)
    assert err.value.kind == kind


def test_empty_structure_is_refused_in_one_line():
    """A structure without atoms has no graph to evaluate (the pipeline gives it a status first)."""
    from painn_export.batch import InvalidGraphError

    with pytest.raises(InvalidGraphError, match="no atoms"):
        neighbor_graph(np.zeros((0, 3)), np.eye(3) * 5, [True] * 3, 5.0, 50)


def test_collate_offsets_indices(rng):
    structures = all_kinds(rng)
    graphs = [s.graph(5.0, 20) for s in structures]
    feed = collate(graphs)
    assert feed["edge_index"].shape == (2, sum(g.n_edges for g in graphs))
    assert feed["natoms"].tolist() == [g.n_atoms for g in graphs]
    assert feed["positions"].dtype == np.float32 and feed["edge_index"].dtype == np.int64
    start = graphs[0].n_edges
    np.testing.assert_array_equal(
        feed["edge_index"][:, start : start + graphs[1].n_edges], graphs[1].edge_index + graphs[0].n_atoms
    )
    assert np.all(feed["system_index"][feed["edge_index"][0]] == feed["system_index"][feed["edge_index"][1]])


def _fcc(a=3.6, reps=2):
    """Conventional fcc cells: shells of 12, 6, 24, ... equally distant neighbours."""
    base = np.array([[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]])
    grid = np.array([(x, y, z) for x in range(reps) for y in range(reps) for z in range(reps)])
    frac = (base[None, :, :] + grid[:, None, :]).reshape(-1, 3) / reps
    cell = np.eye(3) * a * reps
    return frac @ cell, cell


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("cap", [8, 12, 15, 30])
def test_crystal_shells_cut_by_the_cap(strict, cap, rng):
    """Perfect crystals: the cap cuts through shells of exactly tied neighbours."""
    pos, cell = _fcc()
    slab_cell = cell.copy()
    slab_cell[2, 2] += 10.0  # vacuum along the third axis
    for c, pbc in [(cell, [True] * 3), (slab_cell, [True, True, False])]:
        for trial in range(2):
            R = np.eye(3) if trial == 0 else random_rotation(rng)
            p, cl = pos @ R.T, c @ R.T
            ours = neighbor_graph(p, cl, pbc, 5.5, cap, strict=strict)
            truth = brute_force(p, cl, pbc, 5.5, cap, strict=strict)
            assert edge_set(ours) == truth, (cap, strict, pbc, trial)


def test_many_neighbours_per_centre(rng):
    """Hundreds of pairs per centre (the k-th nearest is searched among many), capped and not."""
    L = 7.0
    cell = np.eye(3) * L + rng.uniform(-0.5, 0.5, (3, 3))
    pos = rng.uniform(0, L, (40, 3))
    for cap, strict in [(150, True), (150, False), (7, True), (0, True)]:
        ours = neighbor_graph(pos, cell, [True] * 3, 7.5, cap, strict=strict)
        truth = brute_force(pos, cell, [True] * 3, 7.5, cap, strict=strict)
        assert edge_set(ours) == truth, (cap, strict)
        assert ours.n_edges == len(truth)


def test_successive_searches_do_not_leak_into_each_other(rng):
    """One vesin list per thread is reused with a new cutoff: results stay independent."""
    s = _wire_fix(cases(rng)[0])
    first = edge_set(neighbor_graph(s.positions, s.cell, s.pbc, 6.0, 0))
    neighbor_graph(s.positions, s.cell, s.pbc, 3.0, 0)
    small = edge_set(neighbor_graph(s.positions, s.cell, s.pbc, 3.0, 0))
    assert edge_set(neighbor_graph(s.positions, s.cell, s.pbc, 6.0, 0)) == first
    assert small < first and small == brute_force(s.positions, s.cell, s.pbc, 3.0, 0)


def test_skin_graph_equals_fresh_graph(rng):
    """The Verlet-skin graph is exactly the fresh graph while atoms move less than skin / 2."""
    from painn_export.skin import SkinGraph

    L = (120 / 0.08) ** (1 / 3)
    cell = np.eye(3) * L + rng.uniform(-1, 1, (3, 3))
    pos = rng.uniform(0, 1, (120, 3)) @ cell
    z = np.ones(120, dtype=np.int64)
    skin = SkinGraph(cutoff=5.0, max_neighbors=20, skin=0.6)
    for _ in range(6):
        g = skin.update(z, pos, cell, [True] * 3)
        fresh = neighbor_graph(pos, cell, [True] * 3, 5.0, 20)
        assert edge_set(g) == edge_set(fresh)
        np.testing.assert_allclose(g.edge_shift, g.cell_shift @ cell)
        pos = pos + rng.normal(0, 0.05, pos.shape)
    assert 1 <= skin.n_searches < 6


def _kernel_edges(pairs, d2, n_atoms, cap, strict):
    """Run the compiled cap + symmetrisation on a hand-made half list ``[(a, b, S)]``."""
    from painn_export._neighbors_kernel import cap_and_symmetrize
    from painn_export.neighbors import DEGENERACY_TOLERANCE, TIE_RTOL

    a = np.array([p[0] for p in pairs], dtype=np.int64)
    b = np.array([p[1] for p in pairs], dtype=np.int64)
    S = np.array([p[2] for p in pairs], dtype=np.int32).reshape(-1, 3)
    cell = np.diag([3.0, 4.0, 5.0])
    edge_index, cell_shift, edge_shift = cap_and_symmetrize(
        a, b, S, np.asarray(d2, dtype=np.float64), n_atoms, cap, strict, TIE_RTOL, DEGENERACY_TOLERANCE, cell
    )
    np.testing.assert_array_equal(edge_shift, cell_shift @ cell)
    edges = [(int(j), int(i), tuple(int(x) for x in s)) for j, i, s in zip(*edge_index, cell_shift)]
    assert len(edges) == len(set(edges))
    return set(edges)


def _entries(pairs, d2, n_atoms):
    """Both entries of every half-list pair, per centre: ``entries[i] = [(d², j, S)]``."""
    entries = [[] for _ in range(n_atoms)]
    for (a, b, S), d in zip(pairs, d2):
        entries[a].append((float(d), b, tuple(S)))
        entries[b].append((float(d), a, tuple(-x for x in S)))
    return entries


def _random_half_list(rng, n_atoms, n_pairs):
    """Distinct pairs ``(a, b, S)`` with ``a < b``, or ``a == b`` and ``S`` lexicographically positive."""
    pairs = set()
    while len(pairs) < n_pairs:
        a, b = sorted(int(x) for x in rng.integers(0, n_atoms, 2))
        S = tuple(int(x) for x in rng.integers(-2, 3, 3))
        if a == b and S <= (0, 0, 0):
            continue
        pairs.add((a, b, S))
    return sorted(pairs)


@pytest.mark.parametrize("strict", [True, False])
def test_kernel_tie_chains_against_reference(strict, rng):
    """Shells of exact, near (within TIE_RTOL, chained) and almost (2e-9 apart) ties, every cap."""
    shells = np.array([1.0, 2.0, 2.5, 4.0, 7.0])
    for trial in range(6):
        n_atoms = 3 + trial
        pairs = _random_half_list(rng, n_atoms, 40 * n_atoms)
        d2 = rng.choice(shells, len(pairs)) * (1 + rng.choice([0.0, 3e-10, -3e-10, 2e-9], len(pairs)))
        entries = _entries(pairs, d2, n_atoms)
        for cap in [1, 2, 5, 11, 20, 37, 60, 79, 200]:
            assert _kernel_edges(pairs, d2, n_atoms, cap, strict) == cap_and_symmetrize_reference(
                entries, cap, strict
            ), (trial, cap)


def test_kernel_tie_group_across_histogram_bins():
    """A tie group straddling a boundary of the kernel's d² histogram, cut by the cap on each side of it."""
    from painn_export import _neighbors_kernel as kernel

    n_atoms, r2 = 2, 64.0
    bins = min(kernel._BINS, kernel._HIST_CELLS // n_atoms)
    scale = bins * (1.0 - 1e-9) / r2  # as the kernel bins d²
    boundary = 40 / scale
    group = boundary * (1 + np.array([-4e-10, -1e-10, 2e-10, 5e-10] * 2))  # one chain of ties
    assert len({int(v * scale) for v in group}) == 2  # the premise: it straddles bins 39 and 40
    d2 = np.concatenate([np.linspace(10.0, 20.0, 10), group, np.linspace(50.0, r2, 9)])
    shifts = [(x, y, z) for x in range(-1, 2) for y in range(-1, 2) for z in range(-1, 2)]
    pairs = [(0, 1, s) for s in shifts[: len(d2)]]
    entries = _entries(pairs, d2, n_atoms)
    for cap in range(9, 21):  # k-th and (k+1)-th: below, astride, inside, above the group
        assert _kernel_edges(pairs, d2, n_atoms, cap, True) == cap_and_symmetrize_reference(entries, cap), cap


@pytest.mark.slow  # compiles the kernel from scratch in a subprocess (~10 s)
def test_graph_without_a_writable_numba_cache(tmp_path, rng):
    """Where numba has nowhere to cache (read-only install, no user cache), it compiles in each process."""
    import json
    import os
    import subprocess
    import sys

    pos, cell = rng.uniform(0, 6, (20, 3)), np.eye(3) * 6.0
    np.save(tmp_path / "pos.npy", pos)
    code = (
        "import json, sys, numpy as np\n"
        "from painn_export.neighbors import neighbor_graph\n"
        f"g = neighbor_graph(np.load({str(tmp_path / 'pos.npy')!r}), np.eye(3) * 6.0, [True] * 3, 5.0, 12)\n"
        "print(json.dumps(sorted(map(str, zip(g.edge_index[0].tolist(), g.edge_index[1].tolist(),"
        " g.cell_shift.tolist())))))\n"
    )
    # No locator numba can use for a source file: it refuses cache=True at decoration.
    env = dict(os.environ, NUMBA_CACHE_LOCATOR_CLASSES="ZipCacheLocator")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    g = neighbor_graph(pos, cell, [True] * 3, 5.0, 12)
    edges = zip(g.edge_index[0].tolist(), g.edge_index[1].tolist(), g.cell_shift.tolist())
    expected = sorted(map(str, edges))
    assert json.loads(out.stdout) == expected


def test_slot_layout_and_reverse_edges(rng):
    """Each edge in exactly one slot of its receiver; reverse slots pair (j->i, S) with (i->j, -S)."""
    from painn_export.batch import AsymmetricGraphError, Graph, collate, reverse_edges

    graphs = [s.graph(5.0, 20) for s in all_kinds(rng)]
    feed = collate(graphs, np.float64)
    n_atoms, K = feed["neighbors"].shape
    real = feed["neighbor_mask"].reshape(-1) > 0
    assert real.sum() == feed["edge_index"].shape[1]
    rev = feed["neighbor_reverse"].reshape(-1)
    assert np.array_equal(rev[rev], np.arange(n_atoms * K))  # an involution
    senders = feed["neighbors"].reshape(-1)
    centres = np.repeat(np.arange(n_atoms), K)
    shifts = feed["neighbor_shift"].reshape(-1, 3)
    assert np.array_equal(senders[rev][real], centres[real]) and np.array_equal(
        centres[rev][real], senders[real]
    )
    np.testing.assert_array_equal(shifts[rev][real], -shifts[real])
    pairs = feed["pair_slots"][:-1]  # the last one is the dummy pair of the padding
    assert np.array_equal(rev[pairs[:, 0]], pairs[:, 1])
    assert np.array_equal(feed["slot_pair"].reshape(-1)[pairs[:, 0]], np.arange(len(pairs)))

    g = graphs[0]
    order = rng.permutation(g.n_edges)  # not neighbor_graph's order: the general matching
    shuffled = reverse_edges(g.edge_index[:, order], g.cell_shift[order])
    assert np.array_equal(order[shuffled], g.edge_reverse[order])
    one_sided = slice(0, g.n_edges // 2)
    with pytest.raises(AsymmetricGraphError, match="has no reverse"):
        Graph(
            g.atomic_numbers,
            g.positions,
            g.edge_index[:, one_sided],
            g.cell_shift[one_sided],
            g.edge_shift[one_sided],
        )
