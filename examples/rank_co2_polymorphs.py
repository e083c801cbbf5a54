"""Rank two CO2 polymorphs (phase I, Pa-3, and phase III, Cmca) at zero pressure.

The second molecular crystal of the ranking workflow, to show it is not
ice-specific. Phase I (dry ice) is the stable phase at low pressure; phase III
is a high-pressure phase, shipped here at phase I's volume as a starting point
(``data/README.md``). Relaxed with the composite (Δ-model fitted on the shipped
labels, which include CO2 molecules but no CO2 crystal) and with GFN2-xTB + D4
alone; the gas-phase CO2 molecule likewise. The cells are 5–7 Å wide, so the
baseline evaluates them on supercells (``min_cell_width`` 7 Å).

Usage::

    python examples/rank_co2_polymorphs.py            # ~5-10 min
"""

from __future__ import annotations

from pathlib import Path

from ase.build import molecule
from rank_ice_polymorphs import parser_for, run

from deltaml.ranking import read_candidates

CRYSTALS = Path(__file__).resolve().parent.parent / "data" / "crystals"


def main() -> None:
    parser = parser_for(__doc__.split("\n")[0], "out/co2_ranking")
    args = parser.parse_args()
    candidates = read_candidates([CRYSTALS / "co2_pa3.extxyz", CRYSTALS / "co2_cmca.extxyz"])
    run(candidates, [molecule("CO2")], args)


if __name__ == "__main__":
    main()
