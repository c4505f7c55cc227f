"""Neighbour-graph speed: our capped + symmetrised graph against plain neighbour lists.

    python scripts/bench_neighbors.py [--repeats 5] [--quick] [--cases abcde]

Cases: (a) 4096 random atoms at 0.08 Å⁻³, (b) 1000 structures of 20-200
atoms in random triclinic cells, one after another, (c) a 2-atom cell, (d)
512-4096 atoms against the O(N²) torch radius graph (upstream's algorithm,
with its cap), (e) a perfect fcc crystal (256 Pt atoms), where the cap cuts
through shells of exactly tied neighbours.
Prints the median of repeats in ms and ratios against vesin's plain full list.
ASE and the O(N²) torch graph are timed once, on at most 100 structures of a
case, and scaled to the whole case (they are 10-100x slower).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np


def timed(fn, repeats, warm=True):
    if warm:
        fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def random_bulk(rng, n, density=0.08):
    a = (n / density) ** (1 / 3)
    cell = np.eye(3) * a + rng.uniform(-0.1, 0.1, (3, 3)) * a
    return rng.uniform(0, 1, (n, 3)) @ cell, cell


def torch_radius_graph_pbc(pos, cell, cutoff, max_neighbors=50, block_elements=1 << 24):
    """Upstream's O(N²) radius graph for one structure, re-implemented in torch (float32).

    The algorithm of fairchem's ``radius_graph_pbc`` + ``get_max_neighbors_mask``
    (strict), step for step: a counter over all ordered atom pairs turned
    into (centre, neighbour) by division and modulo, both positions gathered
    and expanded over every periodic image that can be within the cutoff
    (image counts from the face distances), squared distances, the two masks,
    masked selection of indices, images and distances; then the per-centre cap
    by copying each centre's distances into a padded ``[n_atoms, max_count]``
    matrix filled with inf and sorting its rows. The only departure: pairs are
    taken in blocks of at most ``block_elements`` (pair x image) entries, where
    upstream builds one tensor for all of them (out of memory here at 4096
    atoms); the work per pair is the same. Upstream PaiNN's symmetrisation is
    not included, so this is a lower bound of upstream's graph cost.
    Returns (edge_index ``[2, E]`` as (neighbour, centre), image offsets ``[E, 3]``).
    """
    import torch

    p = torch.as_tensor(pos, dtype=torch.float32)
    c = torch.as_tensor(cell, dtype=torch.float32)
    n = p.shape[0]
    volume = torch.dot(c[0], torch.linalg.cross(c[1], c[2]))
    reps = []
    for k in range(3):
        face_normal = torch.linalg.cross(c[(k + 1) % 3], c[(k + 2) % 3]) / volume
        reps.append(int(torch.ceil(cutoff * torch.linalg.norm(face_normal))))
    images = torch.cartesian_prod(*[torch.arange(-r, r + 1, dtype=torch.float32) for r in reps])
    n_images = images.shape[0]
    offsets = (c.T @ images.T).view(1, 3, n_images)  # [1, 3, n_images] Å
    found = ([], [], [], [])
    block = max(1, block_elements // n_images)
    for first_pair in range(0, n * n, block):
        counter = torch.arange(first_pair, min(first_pair + block, n * n))
        centre = torch.div(counter, n, rounding_mode="floor")
        neighbour = counter % n
        p_centre = torch.index_select(p, 0, centre).view(-1, 3, 1).expand(-1, -1, n_images)
        p_neighbour = torch.index_select(p, 0, neighbour).view(-1, 3, 1).expand(-1, -1, n_images)
        p_neighbour = p_neighbour + offsets
        d2 = torch.sum((p_centre - p_neighbour) ** 2, dim=1).view(-1)
        mask = torch.logical_and(torch.le(d2, cutoff * cutoff), torch.gt(d2, 1e-4))
        centre = centre.view(-1, 1).repeat(1, n_images).view(-1)
        neighbour = neighbour.view(-1, 1).repeat(1, n_images).view(-1)
        image_per_pair = images.view(1, n_images, 3).repeat(counter.numel(), 1, 1)
        found[0].append(torch.masked_select(centre, mask))
        found[1].append(torch.masked_select(neighbour, mask))
        found[2].append(
            torch.masked_select(image_per_pair.view(-1, 3), mask.view(-1, 1).expand(-1, 3)).view(-1, 3)
        )
        found[3].append(torch.masked_select(d2, mask))
    centre, neighbour, image, d2 = (torch.cat(x) for x in found)  # sorted by centre
    counts = torch.zeros(n, dtype=torch.long).scatter_add_(0, centre, torch.ones_like(centre))
    width = int(counts.max()) if n else 0
    if 0 < max_neighbors < width:
        first = torch.cumsum(counts, 0) - counts
        slot = centre * width + torch.arange(centre.numel()) - torch.repeat_interleave(first, counts)
        padded = torch.full([n * width], float("inf"))
        padded.index_copy_(0, slot, d2)
        padded, order = torch.sort(padded.view(n, width), dim=1)
        order = (order[:, :max_neighbors] + first.view(-1, 1)).view(-1)
        chosen = order[torch.isfinite(padded[:, :max_neighbors]).view(-1)]
        centre, neighbour, image = centre[chosen], neighbour[chosen], image[chosen]
    return torch.stack([neighbour, centre]), image


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="100 structures in (b), no torch O(N²) on (a)")
    parser.add_argument("--cases", default="abcde", help="which cases to run, e.g. 'ad' (default: all)")
    args = parser.parse_args()

    import vesin
    from ase import Atoms
    from ase.neighborlist import neighbor_list as ase_nl
    from matscipy.neighbours import neighbour_list as matscipy_nl

    from painn_export.neighbors import neighbor_graph

    rng = np.random.default_rng(0)
    print(
        f"machine: {platform.processor() or platform.machine()}, {platform.system()}, "
        f"python {platform.python_version()}, vesin {vesin.__version__}"
    )
    pos_a, cell_a = random_bulk(rng, 4096)
    n_b = 100 if args.quick else 1000
    b = [random_bulk(rng, int(rng.integers(20, 201)), density=rng.uniform(0.04, 0.09)) for _ in range(n_b)]
    c = (
        np.array([[0.1, 0.1, 0.1], [1.3, 1.2, 1.4]]),
        np.array([[2.6, 0, 0], [0.4, 2.5, 0], [0.3, 0.2, 2.7]]),
    )
    fcc = np.array([[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]])
    grid = np.array([(x, y, z) for x in range(4) for y in range(4) for z in range(4)])
    e = (((fcc[None] + grid[:, None]).reshape(-1, 3) / 4) @ (np.eye(3) * 15.68), np.eye(3) * 15.68)
    cases = {
        "(a) 4096 atoms": [(pos_a, cell_a)],
        f"(b) {n_b} structures": b,
        "(c) 2-atom cell": [c],
        "(e) fcc Pt, 256 atoms": [e],  # perfect crystal: the cap cuts through shells of ties
    }
    cases = {name: items for name, items in cases.items() if name[1] in args.cases}

    def each(items, f):
        return lambda: [f(p, cl) for p, cl in items]

    for cutoff, cap in [(12.0, 50), (6.0, 50)]:
        print(
            f"\ncutoff {cutoff} Å, max_neighbors {cap}; median of {args.repeats}, ms (ratio: vesin time / this time)"
        )
        print(
            f"{'case':<22}{'ours (cap+sym)':>16}{'vesin full':>12}{'matscipy':>12}{'ase':>12}{'torch O(N²)':>13}"
        )
        for name, items in cases.items():
            t_ours = timed(
                each(items, lambda p, cl: neighbor_graph(p, cl, [True] * 3, cutoff, cap)), args.repeats
            )
            nl = vesin.NeighborList(cutoff=cutoff, full_list=True)
            t_vesin = timed(each(items, lambda p, cl: nl.compute(p, cl, True, "ijS")), args.repeats)
            t_mat = timed(
                each(
                    items,
                    lambda p, cl: matscipy_nl("ijS", positions=p, cell=cl, pbc=[True] * 3, cutoff=cutoff),
                ),
                1,
            )
            # The slow references run on at most 100 structures, scaled to the whole case.
            few, scale = items[:100], len(items) / min(len(items), 100)
            t_ase = scale * timed(
                each(few, lambda p, cl: ase_nl("ijS", Atoms(positions=p, cell=cl, pbc=True), cutoff)),
                1,
                warm=False,
            )
            skip_torch = args.quick and name.startswith("(a)")
            t_torch = (
                float("nan")
                if skip_torch
                else scale
                * timed(each(few, lambda p, cl: torch_radius_graph_pbc(p, cl, cutoff, cap)), 1, warm=False)
            )
            cells = [t_ours, t_vesin, t_mat, t_ase, t_torch]
            print(
                f"{name:<22}"
                + "".join(f"{1e3 * t:>12.1f}" + "    "[: (4 if i == 0 else 0)] for i, t in enumerate(cells))
            )
            print(
                f"{'  ratio vs vesin':<22}"
                + "".join(f"{t_vesin / t:>12.2f}" + ("    " if i == 0 else "") for i, t in enumerate(cells))
            )

    for cutoff in (12.0, 6.0) if "d" in args.cases else ():
        print(f"\n(d) ours against the O(N²) torch radius graph (upstream's approach), {cutoff} Å, cap 50")
        print(f"{'atoms':>8}{'ours ms':>12}{'O(N²) ms':>12}{'speed-up':>10}")
        for n in (512, 1024, 2048, 4096):
            if args.quick and n > 1024:
                continue
            p, cl = random_bulk(rng, n)
            t_ours = timed(lambda: neighbor_graph(p, cl, [True] * 3, cutoff, 50), args.repeats)
            t_torch = timed(lambda: torch_radius_graph_pbc(p, cl, cutoff, 50), 1, warm=n <= 1024)
            print(f"{n:>8}{1e3 * t_ours:>12.1f}{1e3 * t_torch:>12.1f}{t_torch / t_ours:>9.0f}x")


if __name__ == "__main__":
    main()
