"""Regenerate the crystal-contact dimers: pairs of molecules cut from molecular crystals.

The intermolecular part of the correction is pairwise additive between molecules
(:mod:`deltaml.intermolecular`): a crystal's intermolecular correction is exactly
the sum of those of its dimers. A crystal's contacts (orientations and distances
no gas-phase dimer minimum has, e.g. the T-shaped 3.1 Å contact of CO2 phase I)
are therefore learned from the dimers cut from it, labelled with the molecular
reference at a small fraction of a periodic label's cost. Same reference and
conventions as ``make_interaction_dataset.py`` (each dimer with its two
monomers at their geometry in it, so that the interaction energy is an exact
difference of labels), ``sampling`` "crystal contact" (and "crystal contact
x1.1", … for the rigid scans along the centre-of-mass axis). Three stages,
each resumable::

    python data/make_crystal_contacts.py             # all stages
    python data/make_crystal_contacts.py --stage structures|label|export

1. ``structures``: for each crystal (the seven GenIce2 ice phases at their
   experimental densities; CO2 I and III, urea I and oxalic acid α, β from
   ``data/crystals``, experimental cells), every pair of a molecule of the cell
   and a molecule or image within the SOAP cut-off (closest atoms < 5 Å);
   pairs with the same sorted intermolecular distances (0.05 Å) are one
   contact; of the remaining, ``CONTACTS`` per crystal, evenly spread from the
   closest contact to the farthest. Written once to
   ``data/structures/crystal_contacts.extxyz`` (a rerun reuses it).
2. ``label``: into ``data/work/crystal_contacts.db``, cheapest first.
3. ``export``: ``data/labelled/crystal_contacts.extxyz`` (complete systems).

Benzene I is left out: its dimers cost ~12 min per label here.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import sys
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.io import read, write

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import make_interaction_dataset as interactions  # noqa: E402

from deltaml.crystals import ICE_PHASES, ice_polymorph, whole_molecules  # noqa: E402

STRUCTURES = HERE / "structures" / "crystal_contacts.extxyz"
STORE = HERE / "work" / "crystal_contacts.db"
OUTPUT = HERE / "labelled" / "crystal_contacts.extxyz"
#: Contacts are pairs whose closest atoms are within the SOAP cut-off (Å).
CUTOFF = 5.0
#: Two pairs are one contact when their sorted intermolecular distances agree to this (Å).
SAME = 0.05
#: Crystal → (molecule name, family, contacts kept, rigid scan factors besides 1.0).
#: Fewer contacts and points for the larger molecules (cost per label).
CRYSTALS: dict[str, tuple[str, str, int, tuple[float, ...]]] = {
    "co2_pa3": ("CO2", "other", 8, (0.95, 1.1, 1.25)),
    "co2_cmca": ("CO2", "other", 8, (0.95, 1.1, 1.25)),
    **{f"ice:{p}": ("H2O", "water", 5, (0.95, 1.1, 1.25)) for p in ICE_PHASES},
    "urea_i": ("urea", "amide", 4, (1.1,)),
    "oxalic_acid_alpha": ("oxalic_acid", "carboxylic_acid", 2, ()),
    "oxalic_acid_beta": ("oxalic_acid", "carboxylic_acid", 2, ()),
}


def crystal(name: str) -> Atoms:
    """The crystal's cell: a GenIce2 ice phase (repeat unit) or a ``data/crystals`` file."""
    if name.startswith("ice:"):
        return ice_polymorph(name[4:], min_width=0.0)
    return read(HERE / "crystals" / f"{name}.extxyz")


def contacts(atoms: Atoms, keep: int) -> list[tuple[float, Atoms, int]]:
    """Distinct molecule pairs within the cut-off: (closest distance, dimer, size of first).

    Molecule m of the cell with molecule k shifted by a lattice vector; the pair
    (m, k + t) and (k, m − t) are the same contact and the fingerprint finds it.
    """
    found, positions = whole_molecules(atoms)
    cell = atoms.cell.array
    reach = int(np.ceil(2 * CUTOFF / min(atoms.cell.lengths()))) + 1
    shifts = np.array(np.meshgrid(*[np.arange(-reach, reach + 1)] * 3)).reshape(3, -1).T
    seen, pairs = [], []
    for m in range(len(found.formulas)):
        first = np.flatnonzero(found.labels == m)
        for k in range(len(found.formulas)):
            second = np.flatnonzero(found.labels == k)
            for shift in shifts:
                if k == m and not shift.any():
                    continue
                moved = positions[second] + shift @ cell
                distances = np.linalg.norm(positions[first][:, None] - moved[None], axis=2)
                if distances.min() >= CUTOFF:
                    continue
                fingerprint = np.sort(distances.ravel())
                if any(
                    len(f) == len(fingerprint) and np.abs(f - fingerprint).max() < SAME
                    for f in seen
                ):
                    continue
                seen.append(fingerprint)
                dimer = Atoms(
                    np.concatenate([atoms.numbers[first], atoms.numbers[second]]),
                    positions=np.vstack([positions[first], moved]),
                )
                pairs.append((float(distances.min()), dimer, len(first)))
    pairs.sort(key=lambda p: p[0])
    chosen = np.unique(np.round(np.linspace(0, len(pairs) - 1, min(keep, len(pairs)))))
    return [pairs[int(i)] for i in chosen]


def system_frames(
    name: str, index: int, dimer: Atoms, n_first: int, molecule: str, family: str, scan: tuple
) -> list[Atoms]:
    """Monomers, the contact and its rigid scan (fragment 1 along the centre-of-mass axis)."""
    common = {
        "system": f"{name}#{index}",
        "name": f"{molecule}...{molecule}#{name}-{index}",
        "family": family,
        "families": f"{family},{family}",
        "fragment_names": f"{molecule},{molecule}",
        "crystal": name,
    }
    tag = interactions._tagged
    parts = (dimer[:n_first], dimer[n_first:])
    frames = [
        tag(part, kind="monomer", role="monomer", sampling="monomer", fragment=k, **common)
        for k, part in enumerate(parts)
    ]
    axis = parts[1].get_center_of_mass() - parts[0].get_center_of_mass()
    fragment = np.repeat([0, 1], [n_first, len(dimer) - n_first])
    for factor in (1.0, *scan):
        moved = dimer.copy()
        moved.positions[n_first:] += (factor - 1.0) * axis
        sampling = "crystal contact" if factor == 1.0 else f"crystal contact x{factor:g}"
        frame = tag(
            moved, kind="dimer", role="complex", sampling=sampling, scan_factor=float(factor),
            **common,
        )  # fmt: skip
        frame.arrays["fragment"] = fragment.copy()
        frames.append(frame)
    return frames


def make_structures() -> list[Atoms]:
    """Every crystal's chosen contacts (CO2 first: its phase I is where the old rows failed)."""
    frames = []
    for name, (molecule, family, keep, scan) in CRYSTALS.items():
        chosen = contacts(crystal(name), keep)
        print(
            f"{name}: {len(chosen)} contacts, closest atoms "
            + ", ".join(f"{d:.2f}" for d, _, _ in chosen)
            + " Å",
            flush=True,
        )
        for index, (_, dimer, n_first) in enumerate(chosen):
            frames += system_frames(name, index, dimer, n_first, molecule, family, scan)
    return frames


def structures() -> list[Atoms]:
    """The structures file, written on first use (reruns keep the store's keys)."""
    if not STRUCTURES.is_file():
        write(STRUCTURES, make_structures(), format="extxyz")
    return read(STRUCTURES, index=":")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stage", choices=("all", "structures", "label", "export"), default="all")
    parser.add_argument("--workers", type=int, default=1, help="local processes")
    parser.add_argument("--threads", type=int, default=1, help="OpenMP threads per process")
    parser.add_argument("--scheduler", default=None, help="Dask scheduler address")
    args = parser.parse_args(argv)
    frames = structures()
    print(f"{len(frames)} structures in {STRUCTURES}", flush=True)
    interactions.label_and_export(frames, args, STORE, OUTPUT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
