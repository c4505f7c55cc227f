"""Generate the relaxation demo: perturbed EMT structures with EMT-relaxed references.

Structures built with ASE, in painn-batch's input schema, then relaxed with
ASE's EMT calculator and ASE's FIRE (``fmax`` 0.01 eV/Å):

- bulk fcc Al, Cu, Ag, Au, Ni, Pd, Pt and random binary alloys of them,
  4 to 32 atoms, rattled (0.05 to 0.15 Å); the cell stays fixed;
- (111) and (100) slabs, 12 to 18 atoms with vacuum (pbc = T, T, F), rattled,
  their bottom layer held fixed (``fixed``, ASE's ``FixAtoms``), as OC20's
  slabs hold their subsurface layers.

Datasets beyond the schema's: ``relaxed_energy`` ``[S]`` eV and
``relaxed_positions`` ``[Σn, 3]`` Å (EMT's minimum from these starting
points), ``relaxed_steps`` ``[S]`` (ASE FIRE's steps). ``energy`` and
``forces`` are EMT's labels at the starting geometry. ``painn-batch relax``
reports its relaxed energies and positions against these references.

Seeded: the same arguments give the same file.

    python scripts/make_relax_examples.py --n 24 --seed 0 --output examples/emt_relax_examples.h5
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

ELEMENTS = ("Al", "Cu", "Ag", "Au", "Ni", "Pd", "Pt")
FMAX = 0.01  # eV/Å: the references are relaxed tighter than painn-batch's default


# Bulk repeats of the 4-atom cubic fcc cell, and slab sizes (a, b, layers): the demo's small ones.
BULK_REPEATS = ((1, 1, 1), (2, 1, 1), (2, 2, 1), (2, 2, 2))
SLAB_SIZES = ((2, 2, 3), (2, 2, 4))


def perturbed(k: int, rng: np.random.Generator, bulk_repeats=BULK_REPEATS, slab_sizes=SLAB_SIZES):
    """The ``k``-th structure: a rattled bulk (alloy), or each third a slab with its bottom layer fixed."""
    from ase.build import bulk, fcc100, fcc111
    from ase.constraints import FixAtoms

    element = str(rng.choice(ELEMENTS))
    if k % 3 == 2:
        build = fcc111 if rng.random() < 0.5 else fcc100
        atoms = build(element, size=slab_sizes[int(rng.integers(0, len(slab_sizes)))], vacuum=6.0)
        bottom = atoms.positions[:, 2] < atoms.positions[:, 2].min() + 0.5
        atoms.set_constraint(FixAtoms(mask=bottom))
    else:
        atoms = bulk(element, "fcc", cubic=True).repeat(bulk_repeats[int(rng.integers(0, len(bulk_repeats)))])
        if rng.random() < 0.5:
            other = str(rng.choice([e for e in ELEMENTS if e != element]))
            symbols = np.array(atoms.get_chemical_symbols(), dtype=object)
            symbols[rng.random(len(atoms)) < 0.3] = other
            atoms.set_chemical_symbols(list(symbols))
    atoms.rattle(float(rng.uniform(0.05, 0.15)), seed=int(rng.integers(1 << 31)))
    return atoms


def fixed_mask(atoms) -> np.ndarray:
    """``[n]`` bool: the atoms ``atoms``' FixAtoms constraints hold."""
    mask = np.zeros(len(atoms), bool)
    for c in atoms.constraints:
        mask[c.index] = True
    return mask


def make(n: int, seed: int, output: Path) -> None:
    import h5py
    from ase.calculators.emt import EMT
    from ase.optimize import FIRE

    from painn_export.schema import write_input

    rng = np.random.default_rng(seed)
    rows, fixed, energies, forces = [], [], [], []
    relaxed_e, relaxed_x, relaxed_steps = [], [], []
    for k in range(n):
        atoms = perturbed(k, rng)
        mask = fixed_mask(atoms)
        rows.append((atoms.numbers, atoms.positions.copy(), atoms.cell[:].copy(), atoms.pbc.copy()))
        fixed.append(mask)
        atoms.calc = EMT()
        energies.append(atoms.get_potential_energy())
        forces.append(atoms.get_forces(apply_constraint=False))
        opt = FIRE(atoms, logfile=None)
        if not opt.run(fmax=FMAX, steps=2000):
            raise RuntimeError(f"structure {k}: EMT/FIRE did not converge")
        relaxed_e.append(atoms.get_potential_energy())
        relaxed_x.append(atoms.positions.copy())
        relaxed_steps.append(opt.nsteps)
    output.parent.mkdir(parents=True, exist_ok=True)
    ids = [f"relax-{k}" for k in range(n)]
    write_input(output, rows, energies=energies, forces=forces, ids=ids, fixed=fixed)
    with h5py.File(output, "a") as fh:
        fh.create_dataset("relaxed_energy", data=np.array(relaxed_e, np.float64)).attrs["units"] = "eV"
        fh.create_dataset("relaxed_positions", data=np.concatenate(relaxed_x)).attrs["units"] = "Angstrom"
        fh.create_dataset("relaxed_steps", data=np.array(relaxed_steps, np.int32))
        fh.attrs["source"] = f"scripts/make_relax_examples.py --n {n} --seed {seed}"
        fh.attrs["reference"] = f"ASE EMT, ASE FIRE to fmax {FMAX} eV/A (cell fixed)"
    sizes = [len(r[0]) for r in rows]
    print(f"wrote {output}: {n} structures, {sum(sizes)} atoms ({min(sizes)}-{max(sizes)} per structure)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("examples/emt_relax_examples.h5"))
    args = parser.parse_args()
    make(args.n, args.seed, args.output)


if __name__ == "__main__":
    main()
