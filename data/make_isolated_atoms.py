"""Regenerate the shipped isolated-atom labels: H, C, N and O in their ground states.

They anchor the Δ-model's per-element offsets physically. Fitted on a few
compositions only (water clusters and ethanol: two independent compositions for
three elements), least-squares offsets are not determined and came out at
hundreds of eV per element, which a molecule of another composition then carries
in full. With the isolated atoms' Δ as the offsets' prior, such a direction falls
back to the isolated-atom value (see :mod:`deltaml.offsets`).

Same reference method as the other shipped labels (revPBE0/def2-TZVP, density
fitting, PySCF), spin-unrestricted at the ground-state multiplicity of each atom
(H doublet, C triplet, N quartet, O triplet); the Δ-target terms are the
dispersion-free GFN2-xTB at the same multiplicity, and D3, which is zero for one
atom. A few seconds per atom::

    python data/make_isolated_atoms.py        # label into data/work/atoms.db, export
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ase import Atoms

from deltaml.dataset import export_labelled
from deltaml.labelling import label_structures
from deltaml.reference import PySCFReference
from deltaml.store import LabelStore

HERE = Path(__file__).resolve().parent
STORE = HERE / "work" / "atoms.db"
OUTPUT = HERE / "labelled" / "isolated_atoms.extxyz"

#: Same settings as ``make_labelled_dataset.REFERENCE`` (one method record).
REFERENCE = {"method": "dft", "xc": "revpbe0", "basis": "def2-tzvp", "density_fit": True}

#: Ground-state multiplicities (Hund's rules: 2S+1).
GROUND_STATES = {"H": 2, "C": 3, "N": 4, "O": 3}


def structures() -> list[Atoms]:
    """One atom per element, at the origin, with its multiplicity in ``info``."""
    frames = []
    for symbol, multiplicity in GROUND_STATES.items():
        atoms = Atoms(symbol, positions=[[0.0, 0.0, 0.0]])
        atoms.info.update(kind="isolated_atom", name=symbol, charge=0, multiplicity=multiplicity)
        atoms.set_initial_magnetic_moments([multiplicity - 1.0])
        frames.append(atoms)
    return frames


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=1, help="local processes")
    args = parser.parse_args(argv)
    frames = structures()
    STORE.parent.mkdir(exist_ok=True)
    report = label_structures(frames, LabelStore(STORE), reference=REFERENCE, workers=args.workers)
    print(report)
    record = PySCFReference(**REFERENCE).record()
    written = export_labelled(LabelStore(STORE), OUTPUT, frames, record=record)
    print(f"{written} labelled atoms written to {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
