"""Regenerate the small structures shipped in data/ (deterministic, no network).

Run from the repository root::

    python data/make_structures.py

* ``molecules/benzene.xyz``: benzene from ASE's G2 collection (``ase.build.molecule``;
  G2 geometries are MP2/6-31G(d) minima, Curtiss et al., J. Chem. Phys. 106, 1063 (1997)).
* ``crystals/co2_pa3.extxyz``: solid CO2 (dry ice), space group Pa-3 (No. 205), Z = 4,
  a = 5.624 Å and O at 8c (x, x, x) with x = 0.1185, from the single-crystal X-ray
  structure at 150 K of Simon & Peters, Acta Cryst. B36, 2750 (1980).
* ``crystals/co2_cmca.extxyz``: CO2 phase III, space group Cmca (No. 64), Z = 4: the cell
  shape of Aoki et al., Science 263, 356 (1994) (a, b, c = 4.330, 4.657, 5.963 Å at
  11.8 GPa), scaled isotropically to the volume of the Pa-3 cell above (phase III is a
  high-pressure phase: this is a starting point for a relaxation at zero pressure, not
  a measured structure); C at 4a, O at 8f (0, y, z) with C=O 1.16 Å and the molecular
  axis in the bc plane at 52° from c.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
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


#: Phase III: cell of Aoki et al. (1994) at 11.8 GPa (Å), C=O (Å), tilt from c (degrees).
CMCA_CELL_A = (4.330, 4.657, 5.963)
CO_BOND_A = 1.16
CMCA_TILT_DEG = 52.0


def co2_cmca() -> object:
    """CO2-III (Cmca): Aoki's cell shape at the volume of the Pa-3 cell."""
    pa3_volume = co2_pa3().get_volume()
    scale = (pa3_volume / np.prod(CMCA_CELL_A)) ** (1.0 / 3.0)
    a, b, c = (scale * x for x in CMCA_CELL_A)
    tilt = np.radians(CMCA_TILT_DEG)
    oxygen = (0.0, CO_BOND_A * np.sin(tilt) / b, CO_BOND_A * np.cos(tilt) / c)
    atoms = crystal(
        ["C", "O"], basis=[(0.0, 0.0, 0.0), oxygen], spacegroup=64, cellpar=[a, b, c, 90, 90, 90]
    )
    atoms.info["source"] = (
        "CO2-III Cmca: cell shape of Aoki et al., Science 263, 356 (1994), scaled to the "
        "Pa-3 volume; C=O 1.16 A, axis 52 deg from c (a relaxation starting point)"
    )
    return atoms


def main() -> None:
    benzene = molecule("C6H6")
    benzene.info["source"] = "ASE G2 collection (MP2/6-31G(d) geometry)"
    write(HERE / "molecules" / "benzene.xyz", benzene, format="extxyz")
    write(HERE / "crystals" / "co2_pa3.extxyz", co2_pa3(), format="extxyz")
    write(HERE / "crystals" / "co2_cmca.extxyz", co2_cmca(), format="extxyz")


if __name__ == "__main__":
    main()
