"""Regenerate the small structures shipped in data/ (deterministic, no network).

Run from the repository root::

    python data/make_structures.py

* ``molecules/benzene.xyz``: benzene from ASE's G2 collection (``ase.build.molecule``;
  G2 geometries are MP2/6-31G(d) minima, Curtiss et al., J. Chem. Phys. 106, 1063 (1997)).
* ``crystals/co2_pa3.extxyz``: solid CO2 (dry ice), space group Pa-3 (No. 205), Z = 4,
  a = 5.624 Å and O at 8c (x, x, x) with x = 0.1185, from the single-crystal X-ray
  structure at 150 K of Simon & Peters, Acta Cryst. B36, 2750 (1980).
"""

from __future__ import annotations

from pathlib import Path

from ase.build import molecule
from ase.io import write
from ase.spacegroup import crystal

HERE = Path(__file__).resolve().parent


def co2_pa3() -> object:
    """Dry ice (Pa-3) from the published cell and oxygen position."""
    atoms = crystal(
        ["C", "O"],
        basis=[(0.0, 0.0, 0.0), (0.1185, 0.1185, 0.1185)],
        spacegroup=205,
        cellpar=[5.624, 5.624, 5.624, 90, 90, 90],
    )
    atoms.info["source"] = "Simon & Peters, Acta Cryst. B36, 2750 (1980); Pa-3, 150 K"
    return atoms


def main() -> None:
    benzene = molecule("C6H6")
    benzene.info["source"] = "ASE G2 collection (MP2/6-31G(d) geometry)"
    write(HERE / "molecules" / "benzene.xyz", benzene, format="extxyz")
    write(HERE / "crystals" / "co2_pa3.extxyz", co2_pa3(), format="extxyz")


if __name__ == "__main__":
    main()
