"""Generate the EMT training/test data of the bundled demo model.

Structures built with ASE and labelled with ASE's EMT calculator (energy in
eV, forces in eV/Å), written in painn-batch's HDF5 input schema:

- bulk fcc/bcc/hcp of Al, Cu, Ag, Au, Ni, Pd, Pt and random alloys of them,
  in supercells, rattled and strained;
- the same with one or two vacancies;
- (111)/(100)/(110) slabs with vacuum (pbc = T, T, F);
- small clusters (icosahedra, octahedra, random packings) in a box,
  non-periodic;
- sizes from 1 to 200 atoms.

Seeded: the same arguments give the same file. Each structure gets a split
("train"/"test") by a seeded permutation, stored in the ``split`` dataset.

    python scripts/make_emt_dataset.py --n 4000 --seed 0 --output out/emt.h5 \
        --examples examples/emt_examples.h5
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ELEMENTS = ("Al", "Cu", "Ag", "Au", "Ni", "Pd", "Pt")
MAX_ATOMS = 200


def _lattice_a(symbol: str) -> float:
    """The element's fcc lattice constant (Å) from ASE's reference states."""
    from ase.data import atomic_numbers, reference_states

    return float(reference_states[atomic_numbers[symbol]]["a"])


def _alloy(atoms, rng: np.random.Generator) -> None:
    """Replace a random fraction of sites by up to two other elements (in place)."""
    n = len(atoms)
    if rng.random() < 0.35 or n < 2:
        return
    others = rng.choice(ELEMENTS, size=rng.integers(1, 3), replace=False)
    frac = rng.uniform(0.1, 0.6)
    sites = rng.random(n) < frac
    symbols = np.array(atoms.get_chemical_symbols(), dtype=object)
    symbols[sites] = rng.choice(others, size=int(sites.sum()))
    atoms.set_chemical_symbols(list(symbols))


def _strain(atoms, rng: np.random.Generator, amount: float) -> None:
    """Apply a random symmetric strain of up to ``amount`` per component (in place)."""
    eps = rng.uniform(-amount, amount, (3, 3))
    eps = 0.5 * (eps + eps.T)
    atoms.set_cell(atoms.cell[:] @ (np.eye(3) + eps), scale_atoms=True)


def _rattle(atoms, rng: np.random.Generator, sigma: float) -> None:
    atoms.positions = atoms.positions + rng.normal(0.0, sigma, atoms.positions.shape)


def _bulk(rng: np.random.Generator):
    from ase.build import bulk

    symbol = str(rng.choice(ELEMENTS))
    a_fcc = _lattice_a(symbol) * rng.uniform(0.97, 1.04)
    kind = rng.choice(["fcc", "fcc", "bcc", "hcp"])
    if kind == "fcc":
        atoms = bulk(symbol, "fcc", a=a_fcc, cubic=bool(rng.random() < 0.5))
    elif kind == "bcc":
        # same volume per atom as fcc: a_bcc^3 / 2 = a_fcc^3 / 4
        atoms = bulk(symbol, "bcc", a=a_fcc / 2 ** (1 / 3), cubic=bool(rng.random() < 0.5))
    else:
        atoms = bulk(symbol, "hcp", a=a_fcc / np.sqrt(2), c=a_fcc / np.sqrt(2) * np.sqrt(8 / 3))
    reps = rng.integers(1, 5, 3)
    while len(atoms) * int(np.prod(reps)) > MAX_ATOMS:
        reps[np.argmax(reps)] -= 1
    atoms = atoms.repeat(tuple(int(r) for r in reps))
    _alloy(atoms, rng)
    _strain(atoms, rng, 0.03)
    _rattle(atoms, rng, rng.uniform(0.01, 0.12))
    return atoms, f"bulk-{kind}"


def _vacancy(rng: np.random.Generator):
    atoms, _ = _bulk(rng)
    while len(atoms) < 8:
        atoms = atoms.repeat((2, 1, 1))
    del atoms[list(rng.choice(len(atoms), size=rng.integers(1, 3), replace=False))]
    return atoms, "vacancy"


def _slab(rng: np.random.Generator):
    from ase.build import fcc100, fcc110, fcc111

    symbol = str(rng.choice(ELEMENTS))
    build = [fcc111, fcc100, fcc110][rng.integers(3)]
    size = (int(rng.integers(2, 5)), int(rng.integers(2, 5)), int(rng.integers(2, 6)))
    atoms = build(symbol, size=size, a=_lattice_a(symbol), vacuum=float(rng.uniform(5.0, 8.0)))
    atoms.pbc = (True, True, False)
    _alloy(atoms, rng)
    _rattle(atoms, rng, rng.uniform(0.01, 0.12))
    return atoms, f"slab-{build.__name__}"


def _cluster(rng: np.random.Generator):
    from ase import Atoms
    from ase.cluster import Icosahedron, Octahedron

    symbol = str(rng.choice(ELEMENTS))
    a = _lattice_a(symbol)
    choice = rng.integers(3)
    if choice == 0:
        atoms = Icosahedron(symbol, noshells=int(rng.integers(1, 4)), latticeconstant=a)
    elif choice == 1:
        atoms = Octahedron(symbol, length=int(rng.integers(2, 5)), latticeconstant=a)
    else:
        # random packing: add atoms one by one at near-neighbour distance
        n = int(rng.integers(1, 30))
        d = a / np.sqrt(2)
        pos = [np.zeros(3)]
        while len(pos) < n:
            base = pos[rng.integers(len(pos))]
            v = rng.normal(size=3)
            cand = base + d * v / np.linalg.norm(v)
            if min(np.linalg.norm(p - cand) for p in pos) > 0.9 * d:
                pos.append(cand)
        atoms = Atoms(symbol * n, positions=np.array(pos))
    atoms.center(vacuum=6.0)
    atoms.pbc = False
    _alloy(atoms, rng)
    _rattle(atoms, rng, rng.uniform(0.01, 0.1))
    return atoms, "cluster"


BUILDERS = ((_bulk, 0.45), (_vacancy, 0.15), (_slab, 0.25), (_cluster, 0.15))


def generate(n: int, seed: int):
    """``n`` labelled structures: (ase.Atoms with EMT results, kind) pairs, seeded."""
    from ase.calculators.emt import EMT

    rng = np.random.default_rng(seed)
    funcs, weights = zip(*BUILDERS)
    out = []
    while len(out) < n:
        atoms, kind = funcs[rng.choice(len(funcs), p=np.array(weights))](rng)
        if not 1 <= len(atoms) <= MAX_ATOMS:
            continue
        atoms.calc = EMT()
        energy = atoms.get_potential_energy()
        forces = atoms.get_forces()
        if np.abs(forces).max() > 25.0:  # rattled into a near-collision: not useful data
            continue
        out.append((atoms, kind, float(energy), forces.copy()))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=4000, help="number of structures")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-fraction", type=float, default=0.1)
    parser.add_argument("--output", type=Path, default=Path("out/emt.h5"))
    parser.add_argument(
        "--examples", type=Path, default=None, help="also write the first 100 held-out structures here"
    )
    args = parser.parse_args(argv)

    import h5py

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from painn_export.schema import write_input

    start = time.perf_counter()
    data = generate(args.n, args.seed)
    structures = [(a.numbers, a.positions, np.asarray(a.cell[:]), a.pbc) for a, _, _, _ in data]
    split = np.full(len(data), "train", dtype=object)
    n_test = round(args.test_fraction * len(data))
    split[np.random.default_rng(args.seed + 1).permutation(len(data))[:n_test]] = "test"
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_input(
        args.output,
        structures,
        energies=[e for _, _, e, _ in data],
        forces=[f for _, _, _, f in data],
        ids=[f"{k}-{i:05d}" for i, (_, k, _, _) in enumerate(data)],
    )
    with h5py.File(args.output, "a") as fh:
        fh.create_dataset("split", data=split.astype(str).astype(h5py.string_dtype()))
        fh.attrs.update({"generator": "scripts/make_emt_dataset.py", "seed": args.seed, "labels": "ase EMT"})
    if args.examples:
        pick = [k for k in range(len(data)) if split[k] == "test"][:100]
        args.examples.parent.mkdir(parents=True, exist_ok=True)
        write_input(
            args.examples,
            [structures[k] for k in pick],
            energies=[data[k][2] for k in pick],
            forces=[data[k][3] for k in pick],
            ids=[f"{data[k][1]}-{k:05d}" for k in pick],
        )
        with h5py.File(args.examples, "a") as fh:
            fh.attrs.update(
                {
                    "generator": f"scripts/make_emt_dataset.py --n {args.n} --seed {args.seed}",
                    "labels": "ase EMT (held-out test split of the demo model)",
                }
            )
        print(f"wrote {args.examples}: {len(pick)} held-out structures")
    natoms = np.array([len(a) for a, _, _, _ in data])
    print(
        f"wrote {args.output}: {len(data)} structures ({n_test} test), atoms {natoms.min()}-{natoms.max()} "
        f"(mean {natoms.mean():.1f}), {time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
