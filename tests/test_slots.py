"""The slot primitives and every graph a caller can build.

Each custom autograd Function of painn_export.slots is checked against its
forward by ``torch.autograd.gradcheck`` (float64) on real layouts: with
padding and spare pairs, fully packed (no padding slot at all), and with
self-image edges. Then graphs a caller may build by hand (``Graph`` is
public) are either evaluated as the torch_scatter reference evaluates them,
or refused with one line.
"""

import dataclasses

import numpy as np
import pytest
import torch

from painn_export.batch import Graph, InvalidGraphError, collate
from painn_export.contract import slot_count
from painn_export.neighbors import neighbor_graph
from painn_export.slots import _GatherNeighbors, _PairsToSlots, _SlotsToPairs
from painn_export.tolerances import compare, tolerance

from checks import assert_close
from conftest import GRADIENT, SMALL, make_model
from structures import chain, molecule, predict, reference_feed, tiny_cell


def simple_cubic() -> Graph:
    """One atom in a 2.5 Å cubic cell, cutoff 3 Å: six self-image edges, every slot full at K = 6."""
    cell = np.eye(3) * 2.5
    return neighbor_graph(np.zeros((1, 3)), cell, np.ones(3, bool), 3.0, 50, atomic_numbers=np.array([29]))


def layouts(rng) -> dict[str, dict[str, np.ndarray]]:
    mol = molecule(rng).graph(SMALL.cutoff, SMALL.max_neighbors)
    tiny = tiny_cell(rng).graph(SMALL.cutoff, 30)
    packed = simple_cubic()
    return {
        # padding slots and three spare pairs that no slot reads
        "padding_and_spare_pairs": collate(
            [mol, tiny], np.float64, n_pairs=(mol.n_edges + tiny.n_edges) // 2 + 3
        ),
        # no padding slot anywhere: n_slots equals every atom's degree
        "fully_packed": collate([packed], np.float64, n_slots=packed.max_degree),
        # an atom's edges to its own periodic images
        "self_images": collate([tiny], np.float64),
    }


def test_layouts_are_what_their_names_say(rng):
    lay = layouts(rng)
    assert (lay["fully_packed"]["neighbor_mask"] == 1).all()
    n_slots = lay["fully_packed"]["neighbors"].size
    assert (lay["fully_packed"]["pair_slots"] < n_slots).all()
    spare = lay["padding_and_spare_pairs"]
    assert (spare["neighbor_mask"] == 0).any() and (spare["pair_slots"] == spare["neighbors"].size).sum() == 6
    edges = spare["edge_index"]
    assert (lay["self_images"]["edge_index"][0] == lay["self_images"]["edge_index"][1]).any()
    assert edges.shape[1] > 0


def _tensors(feed, *names):
    return [torch.from_numpy(feed[n]) for n in names]


@pytest.mark.parametrize("layout", ["padding_and_spare_pairs", "fully_packed", "self_images"])
def test_gather_neighbors_backward_is_the_adjoint(layout, rng):
    feed = layouts(rng)[layout]
    neighbors, reverse = _tensors(feed, "neighbors", "neighbor_reverse")
    x = torch.randn(neighbors.shape[0], 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: _GatherNeighbors.apply(x, neighbors, reverse), (x,))


@pytest.mark.parametrize("layout", ["padding_and_spare_pairs", "fully_packed", "self_images"])
def test_slots_to_pairs_backward_is_the_adjoint(layout, rng):
    feed = layouts(rng)[layout]
    pair_slots, slot_pair = _tensors(feed, "pair_slots", "slot_pair")
    x = torch.randn(slot_pair.numel(), 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: _SlotsToPairs.apply(x, pair_slots, slot_pair), (x,))


@pytest.mark.parametrize("layout", ["padding_and_spare_pairs", "fully_packed", "self_images"])
def test_pairs_to_slots_backward_is_the_adjoint(layout, rng):
    feed = layouts(rng)[layout]
    pair_slots, slot_pair = _tensors(feed, "pair_slots", "slot_pair")
    y = torch.randn(pair_slots.shape[0] + 1, 2, dtype=torch.float64, requires_grad=True)  # + padding's row
    assert torch.autograd.gradcheck(lambda y: _PairsToSlots.apply(y, pair_slots, slot_pair), (y,))


def test_gradcheck_catches_a_wrong_adjoint(rng):
    """The check can fail: a backward that counts each pair's first slot twice is caught."""

    class Doubled(_PairsToSlots):
        @staticmethod
        def backward(ctx, grad):
            pair_slots, _ = ctx.saved_tensors
            flat = grad.reshape(-1, *grad.shape[2:])
            index = torch.cat([pair_slots[:, 0], pair_slots[:1, 0]]).clamp(max=flat.shape[0] - 1)
            return 2 * flat.index_select(0, index), None, None

    feed = layouts(rng)["self_images"]
    pair_slots, slot_pair = _tensors(feed, "pair_slots", "slot_pair")
    y = torch.randn(pair_slots.shape[0] + 1, 2, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="Jacobian mismatch"):
        torch.autograd.gradcheck(lambda y: Doubled.apply(y, pair_slots, slot_pair), (y,))


def test_one_slot_count_for_collate_and_the_batcher(rng):
    """A fully packed batch gets no extra slots: collate's count is slot_count's (the batcher's)."""
    g = simple_cubic()
    assert g.max_degree == 6
    assert collate([g])["neighbors"].shape[1] == slot_count(g.max_degree) == 8
    eight = neighbor_graph(np.zeros((1, 3)), np.diag([2.5, 2.5, 10.0]), np.array([1, 1, 0], bool), 3.6, 50)
    assert eight.max_degree == 8  # four side and four diagonal images: every slot of K = 8 full
    feed = collate([eight])
    assert feed["neighbors"].shape[1] == slot_count(8) == 8 and (feed["neighbor_mask"] == 1).all()


def test_slot_counts_are_few_and_small_molecules_are_not_padded_to_eight():
    counts = {d: slot_count(d) for d in range(0, 41)}
    assert [counts[d] for d in range(0, 9)] == [1, 1, 2, 4, 4, 8, 8, 8, 8]
    assert all(counts[d] % 8 == 0 and d <= counts[d] < d + 8 for d in range(9, 41))
    assert len(set(counts.values())) == 4 + 4  # 1, 2, 4, 8, 16, 24, 32, 40: few shapes per run


@pytest.mark.parametrize("n_atoms, slots", [(1, 1), (2, 1), (3, 2), (4, 4), (5, 4)])
def test_small_molecules_on_their_few_slots_equal_the_reference(n_atoms, slots, rng):
    """A batch of n-atom molecules (in-degree n - 1) runs on slot_count(n - 1) slots, and each
    molecule's energy and forces equal those of the same molecule in a batch padded to 16 slots."""
    model = make_model(GRADIENT)
    graphs = [chain(rng, n_atoms) for _ in range(3)]
    feed = collate(graphs)
    assert feed["neighbors"].shape[1] == slots
    got = model.predict(feed)
    want = model.predict(collate(graphs, n_slots=16))
    for key in ("energy", "forces"):
        assert_close(key, got[key], want[key], "other_batch", "float64")


# Graphs a caller can build -------------------------------------------------------------


def assert_as_reference(model, graphs, label):
    pytest.importorskip("torch_scatter", reason="torch-scatter not installed (pip install .[reference])")
    from painn_export.reference import reference_forward

    gradient = not model.config.direct_forces
    kind = "scatter_free_vs_reference" + ("_gradient" if gradient else "")
    got = predict(model, graphs)
    ref_e, ref_f = reference_forward(
        model.state_dict(), model.config, model.normalization, **reference_feed(graphs)
    )
    natoms = np.array([g.n_atoms for g in graphs])
    for name, a, b in [
        ("energy", got["energy"] / natoms, ref_e.numpy() / natoms),
        ("forces", got["forces"], ref_f.numpy()),
    ]:
        result = compare(name, a, b, tolerance(kind, "float64", name))
        assert result.passed, f"{label}: {result.describe()}"


def with_duplicates(g: Graph, edges: list[int]) -> Graph:
    """``g`` with the edges ``edges`` and their reverses listed twice."""
    extra = np.array(sorted(set(edges) | {int(g.edge_reverse[e]) for e in edges}))
    return Graph(
        g.atomic_numbers,
        g.positions,
        np.concatenate([g.edge_index, g.edge_index[:, extra]], axis=1),
        np.concatenate([g.cell_shift, g.cell_shift[extra]]),
        np.concatenate([g.edge_shift, g.edge_shift[extra]]),
        g.cell,
    )


def without_edges(g: Graph) -> Graph:
    return Graph(
        g.atomic_numbers,
        g.positions,
        np.zeros((2, 0), np.int64),
        np.zeros((0, 3), np.int64),
        np.zeros((0, 3)),
        g.cell,
    )


@pytest.mark.parametrize("config", [SMALL, GRADIENT], ids=["direct", "gradient"])
def test_caller_graphs_evaluate_as_the_reference(config, rng):
    model = make_model(config)
    mol = molecule(rng).graph(config.cutoff, config.max_neighbors)
    tiny = tiny_cell(rng).graph(config.cutoff, 30)
    cases = {
        "self-image edges only": [simple_cubic()],
        "self-image edges in a small cell": [tiny],
        "repeated edges": [with_duplicates(mol, [0, 3])],
        "no edges at all": [without_edges(mol)],
        "a structure without edges beside others": [tiny, without_edges(mol), mol],
        "a single atom": [without_edges(simple_cubic())],
    }
    for label, graphs in cases.items():
        assert_as_reference(model, graphs, label)
    # repeated edges are counted, as upstream counts them: not the same as the plain graph
    assert not np.allclose(
        predict(model, [with_duplicates(mol, [0])])["energy"], predict(model, [mol])["energy"]
    )


def test_graphs_the_model_cannot_evaluate_are_refused_in_one_line(rng):
    mol = molecule(rng).graph(SMALL.cutoff, SMALL.max_neighbors)
    loop = np.array([[0], [0]])
    with pytest.raises(InvalidGraphError, match="joins atom 0 to itself in the same image"):
        Graph(mol.atomic_numbers, mol.positions, loop, np.zeros((1, 3), np.int64), np.zeros((1, 3)))
    with pytest.raises(InvalidGraphError, match="names an atom outside"):
        Graph(
            mol.atomic_numbers,
            mol.positions,
            np.array([[0, 99], [99, 0]]),
            np.zeros((2, 3), np.int64),
            np.zeros((2, 3)),
        )
    with pytest.raises(InvalidGraphError, match="no reverse"):
        Graph(
            mol.atomic_numbers,
            mol.positions,
            np.array([[0], [1]]),
            np.zeros((1, 3), np.int64),
            np.zeros((1, 3)),
        )
    with pytest.raises(InvalidGraphError, match="shape"):
        Graph(mol.atomic_numbers[:-1], mol.positions, mol.edge_index, mol.cell_shift, mol.edge_shift)
    empty = np.zeros((0, 3))
    with pytest.raises(InvalidGraphError, match="no atoms"):
        Graph(np.zeros(0, np.int64), empty, np.zeros((2, 0), np.int64), np.zeros((0, 3), np.int64), empty)
    with pytest.raises(InvalidGraphError, match="no graphs"):
        collate([])
    # a caller's own slots and reverses are checked, not trusted
    e = mol.n_edges
    with pytest.raises(InvalidGraphError, match="same slot"):
        dataclasses.replace(mol, edge_slot=np.zeros(e, np.int64))
    with pytest.raises(InvalidGraphError, match="is not the reverse"):
        dataclasses.replace(mol, edge_reverse=np.roll(mol.edge_reverse, 1))
    assert dataclasses.replace(mol, edge_reverse=mol.edge_reverse.copy()).n_edges == e  # a right one passes
