"""Generate ``data/crystals/ice_ih.extxyz``: a proton-ordered ice Ih cell.

The cell is structure 6 of Hirsch and Ojamäe, J. Phys. Chem. B 108, 15856 (2004),
Table 1: the orthorhombic 8-molecule cell of ice Ih (a = a_hex, b = √3 a_hex,
c = c_hex) with the protons ordered in space group P2₁2₁2₁. That point group
(222) is not polar, so the cell carries no net dipole: spherical clusters cut
from it converge to the same bulk limit as the periodic crystal, which is what
``bench_periodic_consistency.py`` checks. (Ice XI proper, Cmc2₁, is
ferroelectric; a uniformly polarised cluster has an extensive depolarisation
energy that a periodic, tin-foil Ewald sum does not have.)

GenIce2 builds it (lattice plugin ``11i``, option ``6``): it places the oxygen
atoms, scales the lattice to the requested density, and orients rigid water
molecules along the hydrogen-bond network. Because the 4.5 Å axis is too thin
for its graph, GenIce2 doubles it and returns 16 molecules; this script checks
that the two halves are exact translation copies and keeps one (8 molecules).

The rigid water has O–H = 0.98 Å and H–O–H = 104.52° with the oxygen on the
lattice site. 0.98 Å sits between the gas-phase bond (0.9572 Å, the geometry of
GenIce2's built-in TIP3P/``physical_water`` models) and the ~1.0 Å reported for
the hydrogen-bonded bond in ice; the angle is the gas-phase one.

Molecules are whole (atoms O, H, H of each molecule are consecutive and not
wrapped into the cell), so cutting clusters needs no unwrapping.

Usage::

    python benchmarks/make_ice_ih.py              # writes data/crystals/ice_ih.extxyz
    python benchmarks/make_ice_ih.py --out ice.extxyz --density 0.92 --seed 1000

The rigid water is :func:`deltaml.crystals.genice_water` (the ranking's ice builders use it too).
"""

from __future__ import annotations

import argparse
import logging
from importlib.metadata import version
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.io import write

from deltaml.crystals import HOH_ANGLE_DEG, OH_BOND_A, density_g_cm3, genice_water, repeat_unit
from deltaml.files import atomic_path

#: Hirsch & Ojamäe (2004) structure number in GenIce2's ``11i`` plugin.
STRUCTURE = 6
SPACE_GROUP = "P2_12_12_1"


DEFAULT_DENSITY_G_CM3 = 0.92
DEFAULT_SEED = 1000
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "data" / "crystals" / "ice_ih.extxyz"


def generate_genice2(density_g_cm3: float, seed: int) -> Atoms:
    """The cell exactly as GenIce2 returns it (16 molecules, the 4.5 Å axis doubled).

    Parameters
    ----------
    density_g_cm3 : float
        Target density, g/cm³; GenIce2 scales the lattice isotropically to it.
    seed : int
        Seed of numpy's global generator, which GenIce2 uses (the orientations of
        this structure are fixed by the lattice plugin, so the seed changes nothing
        here; it is set so that a re-run is reproducible by construction).

    Returns
    -------
    ase.Atoms
        Positions in Å, periodic orthorhombic cell, molecules whole (O, H, H).
    """
    from genice2.genice import GenIce
    from genice2.plugin import Format, Lattice

    np.random.seed(seed)  # noqa: NPY002 -- GenIce2 draws from numpy's global generator
    ice = GenIce(
        Lattice("11i", **{str(STRUCTURE): True}),
        signature=f"deltaml benchmarks/make_ice_ih.py: 11i[{STRUCTURE}]",
        density=density_g_cm3,
        reshape=np.eye(3, dtype=int),
    )
    # depol="none": every hydrogen bond of this lattice is fixed by the plugin.
    raw = ice.generate_ice(Format("raw", stage=(1, 7)), water=genice_water(), depol="none")
    positions = [
        np.asarray(site_positions) * 10.0  # nm → Å
        for universe in raw["mols"]
        for site_positions in universe.positions
    ]
    symbols = [label for universe in raw["mols"] for _ in universe.positions for label in "OHH"]
    return Atoms(
        symbols=symbols,
        positions=np.concatenate(positions),
        cell=np.asarray(raw["repcell"]) * 10.0,
        pbc=True,
    )


def summary(atoms: Atoms) -> dict[str, float]:
    """Numbers that PROVENANCE.md reports: sizes (Å), density (g/cm³), dipole (e·Å)."""
    molecules = atoms.positions.reshape(-1, 3, 3)
    oh = np.linalg.norm(molecules[:, 1:] - molecules[:, :1], axis=2)
    oxygens = atoms[[i for i in range(len(atoms)) if atoms.numbers[i] == 8]]
    d_oo = oxygens.get_all_distances(mic=True)[np.triu_indices(len(oxygens), 1)]
    # Point charges O −2, H +1: the net dipole of whole molecules, zero for a non-polar cell.
    dipole = (molecules[:, 1] + molecules[:, 2] - 2.0 * molecules[:, 0]).sum(axis=0)
    return {
        "n_molecules": len(molecules),
        "a_a": float(atoms.cell.lengths()[0]),
        "b_a": float(atoms.cell.lengths()[1]),
        "c_a": float(atoms.cell.lengths()[2]),
        "volume_a3": float(atoms.get_volume()),
        "density_g_cm3": density_g_cm3(atoms),
        "oh_min_a": float(oh.min()),
        "oh_max_a": float(oh.max()),
        "oo_nearest_min_a": float(d_oo.min()),
        "dipole_norm_e_a": float(np.linalg.norm(dipole)),
    }


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: generate, check, write and print a summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="extxyz file to write")
    parser.add_argument("--density", type=float, default=DEFAULT_DENSITY_G_CM3, help="g/cm³")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="numpy seed for GenIce2")
    args = parser.parse_args(argv)

    logging.getLogger().setLevel(logging.WARNING)  # GenIce2 logs every stage at INFO
    doubled = generate_genice2(args.density, args.seed)
    atoms = repeat_unit(doubled, (2, 1, 1))  # checked: two exact translation copies
    numbers = summary(atoms)
    atoms.info.update(
        {
            "source": f"genice2 {version('genice2')} lattice 11i[{STRUCTURE}]",
            "reference": "Hirsch & Ojamae, J. Phys. Chem. B 108, 15856 (2004), Table 1",
            "space_group": SPACE_GROUP,
            "generator": "benchmarks/make_ice_ih.py",
            "seed": args.seed,
            "density_g_cm3": round(numbers["density_g_cm3"], 6),
            "oh_bond_a": OH_BOND_A,
            "hoh_angle_deg": HOH_ANGLE_DEG,
        }
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out) as partial:
        write(partial, atoms, format="extxyz")
    print(f"wrote {args.out}")
    for key, value in numbers.items():
        print(f"  {key:18s} {value:.6g}")


if __name__ == "__main__":
    main()
