"""Neighbour-graph speed: our capped + symmetrised graph against plain neighbour lists.

    python scripts/bench_neighbors.py [--repeats 5] [--quick]

Cases: (a) 4096 random atoms at 0.08 Å⁻³, (b) 1000 structures of 20-200
atoms in random triclinic cells, one after another, (c) a 2-atom cell, (d)
512-2048 atoms against the O(N²) torch radius graph.
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


def torch_radius_graph_pbc(pos, cell, cutoff):
    """O(N²) over images, upstream's radius_graph_pbc approach, in torch (float32)."""
    import torch

    p = torch.as_tensor(pos, dtype=torch.float32)
    c = torch.as_tensor(cell, dtype=torch.float32)
    inv = torch.linalg.inv(c).T
    reps = [int(np.ceil(cutoff * float(torch.linalg.norm(inv[k])))) for k in range(3)]
    shifts = torch.cartesian_prod(*[torch.arange(-r, r + 1, dtype=torch.float32) for r in reps]) @ c
    out = 0
    for s in shifts:  # one image at a time keeps memory at N²
        d2 = ((p[None, :, :] + s - p[:, None, :]) ** 2).sum(-1)
        out += int(((d2 <= cutoff * cutoff) & (d2 > 1e-4)).sum())
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="100 structures in (b), no torch O(N²) on (a)")
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
    cases = {"(a) 4096 atoms": [(pos_a, cell_a)], f"(b) {n_b} structures": b, "(c) 2-atom cell": [c]}

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
                * timed(each(few, lambda p, cl: torch_radius_graph_pbc(p, cl, cutoff)), 1, warm=False)
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

    print("\n(d) ours against the O(N²) torch radius graph (upstream's approach), 12 Å, cap 50")
    print(f"{'atoms':>8}{'ours ms':>12}{'O(N²) ms':>12}{'speed-up':>10}")
    for n in (512, 1024, 2048):
        p, cl = random_bulk(rng, n)
        t_ours = timed(lambda: neighbor_graph(p, cl, [True] * 3, 12.0, 50), args.repeats)
        t_torch = timed(lambda: torch_radius_graph_pbc(p, cl, 12.0), 1)
        print(f"{n:>8}{1e3 * t_ours:>12.1f}{1e3 * t_torch:>12.1f}{t_torch / t_ours:>9.0f}x")


if __name__ == "__main__":
    main()
