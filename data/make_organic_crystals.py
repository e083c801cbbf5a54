"""Organic molecular crystals for the periodic reference set (issue 14), from the CSD.

Run from the repository root, with pyxtal's test database at hand::

    pip download --no-deps pyxtal==1.1.5 -d /tmp/pyxtal
    python data/make_organic_crystals.py --database /tmp/pyxtal/pyxtal-1.1.5-py3-none-any.whl

The experimental structures come from the Cambridge Structural Database, as shipped
in pyxtal's test database (``pyxtal/database/test.db``, an ASE database keyed by
CSD refcode; read straight from the wheel, pyxtal need not be installed). They are
X-ray structures, so each is made usable for electronic structure the usual way:

* molecules made whole across the cell (:func:`deltaml.crystals.whole_molecules`);
* X–H bonds set to the mean neutron lengths (C–H 1.083, N–H 1.009, O–H 0.983 Å;
  Allen et al., *J. Chem. Soc., Perkin Trans. 2*, S1 (1987)): X-rays see the H
  electron density pulled into the bond, ~0.1 Å short;
* α-oxalic acid (OXALAC02) has no H in the database: each hydroxyl O (the longer
  C–O of its carboxyl group) gets its H 0.983 Å away at a C–O–H angle of 110°,
  in the plane of C, O and the hydrogen-bond acceptor (the nearest O of another
  molecule), on the acceptor's side; then only the added H atoms are relaxed with
  GFN2-xTB (tblite, its D4 kept; BFGS, fmax 0.02 eV/Å).

Written to ``data/crystals/<name>.extxyz`` once (a file there is kept: the
crystal dataset's keys depend on it; ``--force`` rebuilds) (primitive cells as published; the
crystal dataset enlarges them to 7 Å, :func:`deltaml.crystals.wide_cell`), each
with ``info["source"]`` naming the refcode, the CCDC deposition and what was done.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.data import atomic_numbers
from ase.db import connect
from ase.io import write

from deltaml.crystals import whole_molecules

HERE = Path(__file__).resolve().parent

#: name: (CSD refcode, description). Polymorphs of one molecule share a prefix.
CRYSTALS: dict[str, tuple[str, str]] = {
    "oxalic_acid_alpha": ("OXALAC02", "α-oxalic acid, Pcab, Z = 4, carboxyl H added"),
    "oxalic_acid_beta": ("OXALAC11", "β-oxalic acid, P2₁/c, Z = 2"),
    "urea_i": ("UREAXX02", "urea I, P-42₁m, Z = 2"),
    "benzene_i": ("BENZEN", "benzene I, Pbca, Z = 4"),
    "aspirin_i": ("ACSALA", "aspirin form I, P2₁/c, Z = 4"),
    "aspirin_ii": ("ACSALA13", "aspirin form II, P2₁/c, Z = 4"),
    # 3-azabicyclo[3.3.1]nonane-2,4-dione (C8H11NO2): an imide whose N–H···O=C
    # hydrogen bonds differ between the two forms; 88 and 176 atoms.
    "imide_boqqut": ("BOQQUT", "3-azabicyclo[3.3.1]nonane-2,4-dione, P2₁/a, Z = 4"),
    "imide_boqqut01": ("BOQQUT01", "3-azabicyclo[3.3.1]nonane-2,4-dione, P2₁/c, Z = 8"),
}
#: Mean X–H bond lengths from neutron diffraction, Å (Allen et al. 1987).
NEUTRON_XH_A = {"C": 1.083, "N": 1.009, "O": 0.983}
#: C–O–H angle of a carboxylic acid, degrees.
COH_ANGLE_DEG = 110.0


def read_database(path: Path) -> Path:
    """The test database itself: ``path``, or extracted from a pyxtal wheel."""
    if path.suffix != ".whl":
        return path
    target = Path(tempfile.mkdtemp()) / "test.db"
    with zipfile.ZipFile(path) as wheel:
        target.write_bytes(wheel.read("pyxtal/database/test.db"))
    return target


def normalise_hydrogens(atoms: Atoms) -> Atoms:
    """Every H moved along its bond to the neutron X–H length of its neighbour."""
    out = atoms.copy()
    positions = out.get_positions()
    heavy = np.flatnonzero(out.numbers != 1)
    for h in np.flatnonzero(out.numbers == 1):
        vectors = out.get_distances(h, heavy, mic=True, vector=True)
        nearest = int(np.argmin(np.linalg.norm(vectors, axis=1)))
        partner = out[heavy[nearest]].symbol
        bond = -vectors[nearest]  # from the heavy atom to H
        length = NEUTRON_XH_A[partner]
        positions[h] = positions[h] + vectors[nearest] + length * bond / np.linalg.norm(bond)
    out.positions = positions
    return out


def add_carboxyl_hydrogens(atoms: Atoms) -> Atoms:
    """H on the hydroxyl O of every carboxyl group, towards its acceptor O."""
    oxygens = np.flatnonzero(atoms.numbers == atomic_numbers["O"])
    carbons = np.flatnonzero(atoms.numbers == atomic_numbers["C"])
    molecules, _ = whole_molecules(atoms)
    added = []
    for c in carbons:
        distances = atoms.get_distances(c, oxygens, mic=True)
        pair = oxygens[np.argsort(distances)[:2]]
        hydroxyl = pair[np.argmax(atoms.get_distances(c, pair, mic=True))]
        others = [o for o in oxygens if molecules.labels[o] != molecules.labels[hydroxyl]]
        vectors = atoms.get_distances(hydroxyl, others, mic=True, vector=True)
        towards = vectors[np.argmin(np.linalg.norm(vectors, axis=1))]
        to_carbon = atoms.get_distances(hydroxyl, [c], mic=True, vector=True)[0]
        e1 = to_carbon / np.linalg.norm(to_carbon)
        e2 = towards - (towards @ e1) * e1
        e2 /= np.linalg.norm(e2)
        angle = np.radians(COH_ANGLE_DEG)
        direction = np.cos(angle) * e1 + np.sin(angle) * e2
        added.append(atoms.positions[hydroxyl] + NEUTRON_XH_A["O"] * direction)
    hydrogens = Atoms(["H"] * len(added), positions=added)
    return relax_added(atoms + hydrogens, len(atoms))


def relax_added(atoms: Atoms, first: int) -> Atoms:
    """The atoms from index ``first`` on relaxed with GFN2-xTB, the others fixed."""
    from ase.constraints import FixAtoms
    from ase.optimize import BFGS

    from deltaml.baseline import XTBBaseline

    out = atoms.copy()
    out.set_constraint(FixAtoms(indices=range(first)))
    out.calc = XTBBaseline(method="GFN2-xTB")
    BFGS(out, logfile=None).run(fmax=0.02, steps=200)
    out.set_constraint()
    out.calc = None
    return out


def prepared(row_atoms: Atoms) -> Atoms:
    """Whole molecules, molecule by molecule, X–H at neutron lengths."""
    atoms = row_atoms.copy()
    atoms.pbc = True
    if not (atoms.numbers == 1).any():
        atoms = add_carboxyl_hydrogens(atoms)
    atoms = normalise_hydrogens(atoms)
    molecules, positions = whole_molecules(atoms)
    order = np.argsort(molecules.labels, kind="stable")
    out = Atoms(atoms.numbers[order], positions[order], cell=atoms.cell, pbc=True)
    whole_molecules(out)  # every molecule whole and finite, or TopologyError
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--database", type=Path, required=True,
                        help="pyxtal's test.db, or the pyxtal 1.1.5 wheel holding it")  # fmt: skip
    parser.add_argument("--force", action="store_true", help="rebuild files that exist")
    args = parser.parse_args(argv)
    database = connect(read_database(args.database))
    for name, (refcode, description) in CRYSTALS.items():
        path = HERE / "crystals" / f"{name}.extxyz"
        if path.exists() and not args.force:
            continue
        row = database.get(csd_code=refcode)
        atoms = prepared(row.toatoms())
        atoms.info = {
            "system": name,
            "source": (
                f"CSD {refcode} (CCDC {row.url.rsplit('=', 1)[-1]}) via pyxtal 1.1.5 "
                f"test.db: {description}; X-H at neutron lengths"
            ),
        }
        write(path, atoms, format="extxyz")
        molecules, _ = whole_molecules(atoms)
        print(f"{name}: {refcode}, {len(atoms)} atoms, {len(molecules.formulas)} molecules "
              f"{sorted(set(molecules.formulas))}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
