"""Regenerate the shipped labelled dataset: water clusters, small CHNO molecules, dimers.

Three stages, each resumable; run them all with::

    python data/make_labelled_dataset.py            # all stages
    python data/make_labelled_dataset.py --stage structures|label|export

1. ``structures``: seeded sampling with the baseline (GFN2-xTB, with its D4, via
   tblite). Water clusters of 1-6 molecules from random seeds relaxed to a local
   minimum, then Langevin MD at 100, 300 and 600 K; 15 small closed-shell CHNO
   molecules (relaxed, then MD at 300 and 800 K); 9 dimers (relaxed, scanned
   along the centre-of-mass axis, and MD at 300 K). Written once to
   ``data/work/structures.extxyz``; a rerun reuses that file, so floating-point
   differences between machines never change the keys of a half-done store.
2. ``label``: the reference (revPBE0/def2-TZVP, density fitting, PySCF) with the
   Δ-target terms (dispersion-free GFN2-xTB and D3(BJ)-revPBE0), into the label
   store ``data/work/labels.db``. Interrupt it at any time; a rerun computes only
   what is missing.
3. ``export``: ``data/labelled/water_chno.extxyz`` (energies, forces, the method
   records and the terms), in the order of the structures file.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.build import molecule
from ase.constraints import FixCom
from ase.io import read, write
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary, ZeroRotation
from ase.optimize import BFGS
from ase.units import fs

from deltaml.baseline import XTBBaseline
from deltaml.dataset import export_labelled
from deltaml.files import atomic_path
from deltaml.labelling import label_structures
from deltaml.reference import PySCFReference
from deltaml.store import LabelStore

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
STRUCTURES = WORK / "structures.extxyz"
STORE = WORK / "labels.db"
OUTPUT = HERE / "labelled" / "water_chno.extxyz"

SEED = 20261124
#: Reference settings of the shipped dataset (PySCFReference keywords).
REFERENCE = {"method": "dft", "xc": "revpbe0", "basis": "def2-tzvp", "density_fit": True}

#: Water clusters: snapshots per temperature for each cluster size.
WATER_SNAPSHOTS = {1: 12, 2: 12, 3: 10, 4: 8, 5: 6, 6: 6}
WATER_TEMPERATURES_K = (100.0, 300.0, 600.0)
MOLECULES = (
    "CH4", "NH3", "HCN", "CO2", "H2CO", "CH3OH", "HCOOH", "C2H4", "C2H6", "CH3CN",
    "H3CNH2", "CH3CHO", "CH3CH2OH", "CH3COOH", "CH3CONH2",
)  # fmt: skip
MOLECULE_TEMPERATURES_K = (300.0, 800.0)
MOLECULE_SNAPSHOTS = 3
DIMERS = (
    ("H2O", "CH3OH"), ("CH3OH", "CH3OH"), ("HCOOH", "HCOOH"), ("NH3", "NH3"),
    ("NH3", "H2O"), ("CH4", "CH4"), ("HCN", "HCN"), ("H2CO", "H2O"), ("CH3CN", "H2O"),
)  # fmt: skip
#: Dimer scan: centre-of-mass distance relative to the relaxed dimer's.
DIMER_SCAN = (0.9, 1.1, 1.25, 1.5, 2.0)
DIMER_SNAPSHOTS = 3

#: MD settings: time step (fs), friction (1/fs), equilibration and sampling interval (steps).
TIMESTEP_FS, FRICTION, EQUILIBRATION, INTERVAL = 0.5, 0.02, 200, 40


def _sampler() -> XTBBaseline:
    # Full GFN2-xTB (with D4): sampling should follow a physical surface.
    return XTBBaseline(method="GFN2-xTB")


def _relaxed(atoms: Atoms) -> Atoms:
    atoms = atoms.copy()
    atoms.calc = _sampler()
    BFGS(atoms, logfile=None).run(fmax=0.02, steps=500)
    atoms.calc = None
    return atoms


def _md_snapshots(
    atoms: Atoms, temperature_k: float, count: int, rng: np.random.Generator
) -> list[Atoms]:
    """``count`` snapshots of Langevin MD, every ``INTERVAL`` steps after equilibration."""
    atoms = atoms.copy()
    atoms.calc = _sampler()
    with warnings.catch_warnings():  # renamed thermalize_momenta in ASE 3.29; same draw
        warnings.simplefilter("ignore", DeprecationWarning)
        MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_k, rng=rng)
    Stationary(atoms)
    ZeroRotation(atoms)
    atoms.set_constraint(FixCom())  # a free cluster: no drift of the centre of mass
    dyn = Langevin(
        atoms,
        TIMESTEP_FS * fs,
        temperature_K=temperature_k,
        friction=FRICTION / fs,
        fixcm=False,
        rng=rng,
    )
    dyn.run(EQUILIBRATION)
    frames = []
    for _ in range(count):
        dyn.run(INTERVAL)
        frames.append(Atoms(atoms.numbers, atoms.positions.copy()))
    return frames


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _placed(mol: Atoms, centre: np.ndarray, rng: np.random.Generator) -> Atoms:
    mol = mol.copy()
    mol.positions = (mol.positions - mol.get_center_of_mass()) @ _random_rotation(rng).T + centre
    return mol


def _water_cluster(n: int, rng: np.random.Generator) -> Atoms:
    """n waters at random orientations, oxygens >= 2.7 Å apart, relaxed with GFN2-xTB."""
    radius = 1.4 * n ** (1 / 3)
    centres: list[np.ndarray] = []
    while len(centres) < n:
        trial = rng.uniform(-radius, radius, 3)
        if np.linalg.norm(trial) <= radius and all(
            np.linalg.norm(trial - c) >= 2.7 for c in centres
        ):
            centres.append(trial)
    cluster = Atoms()
    for centre in centres:
        cluster += _placed(molecule("H2O"), centre, rng)
    return _relaxed(cluster)


def _dimer(first: str, second: str, rng: np.random.Generator) -> tuple[Atoms, int]:
    """Relaxed dimer (GFN2-xTB) and the number of atoms of the first molecule."""
    a, b = molecule(first), molecule(second)
    a.positions -= a.get_center_of_mass()
    b = _placed(b, np.zeros(3), rng)
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    distance = 1.0
    while True:  # closest intermolecular contact about 2.2 Å
        shifted = b.positions + distance * axis
        closest = np.min(np.linalg.norm(a.positions[:, None] - shifted[None], axis=-1))
        if closest >= 2.2:
            break
        distance += 0.1
    b.positions = shifted
    return _relaxed(a + b), len(a)


def _scanned(dimer: Atoms, n_first: int, factor: float) -> Atoms:
    first, second = dimer[:n_first], dimer[n_first:]
    axis = second.get_center_of_mass() - first.get_center_of_mass()
    moved = dimer.copy()
    moved.positions[n_first:] += (factor - 1.0) * axis
    return moved


def _tagged(atoms: Atoms, **info: object) -> Atoms:
    atoms = Atoms(atoms.numbers, atoms.positions)
    atoms.info.update(info)
    return atoms


def make_structures(seed: int = SEED) -> list[Atoms]:
    """Sample every structure of the dataset (deterministic for a given seed)."""
    rng = np.random.default_rng(seed)
    frames: list[Atoms] = []
    for n, count in WATER_SNAPSHOTS.items():
        cluster = _water_cluster(n, rng)
        name = f"(H2O){n}"
        frames.append(_tagged(cluster, kind="water_cluster", name=name, sampling="minimum"))
        for temperature in WATER_TEMPERATURES_K:
            for k, snap in enumerate(_md_snapshots(cluster, temperature, count, rng)):
                sampling = f"md {temperature:.0f} K #{k}"
                frames.append(_tagged(snap, kind="water_cluster", name=name, sampling=sampling))
    for name in MOLECULES:
        relaxed = _relaxed(molecule(name))
        frames.append(_tagged(relaxed, kind="molecule", name=name, sampling="minimum"))
        for temperature in MOLECULE_TEMPERATURES_K:
            for k, snap in enumerate(_md_snapshots(relaxed, temperature, MOLECULE_SNAPSHOTS, rng)):
                sampling = f"md {temperature:.0f} K #{k}"
                frames.append(_tagged(snap, kind="molecule", name=name, sampling=sampling))
    for first, second in DIMERS:
        dimer, n_first = _dimer(first, second, rng)
        name = f"{first}...{second}"
        frames.append(_tagged(dimer, kind="dimer", name=name, sampling="minimum"))
        for factor in DIMER_SCAN:
            scanned = _scanned(dimer, n_first, factor)
            sampling = f"scan x{factor:g}"
            frames.append(_tagged(scanned, kind="dimer", name=name, sampling=sampling))
        for k, snap in enumerate(_md_snapshots(dimer, 300.0, DIMER_SNAPSHOTS, rng)):
            frames.append(_tagged(snap, kind="dimer", name=name, sampling=f"md 300 K #{k}"))
    return frames


def structures() -> list[Atoms]:
    """The sampled structures: read from the work file, or sampled and written once."""
    if not STRUCTURES.exists():
        WORK.mkdir(parents=True, exist_ok=True)
        frames = make_structures()
        with atomic_path(STRUCTURES) as partial:  # never a half-written structures file
            write(partial, frames, format="extxyz")
    return read(STRUCTURES, index=":", format="extxyz")


def summary(path: Path = OUTPUT) -> str:
    """Markdown table of the exported dataset: structures and cost per kind."""
    frames = read(path, index=":", format="extxyz")
    # Labels written before the store kept timings count at their kind's mean cost.
    lines = [
        "| kind | structures | atoms | mean cost per label (s) | total cost (h) |",
        "| --- | --- | --- | --- | --- |",
    ]
    total = 0.0
    for kind in ("water_cluster", "molecule", "dimer"):
        chosen = [a for a in frames if a.info["kind"] == kind]
        costs = [a.info["compute_seconds"] for a in chosen if "compute_seconds" in a.info]
        sizes = sorted({len(a) for a in chosen})
        if not costs:
            continue
        total += float(np.sum(costs)) * len(chosen) / max(len(costs), 1)
        lines.append(
            f"| {kind} | {len(chosen)} | {sizes[0]}-{sizes[-1]} | {np.mean(costs):.1f} "
            f"| {np.sum(costs) * len(chosen) / len(costs) / 3600:.2f} |"
        )
    lines.append(f"| all | {len(frames)} | | | {total / 3600:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stage", choices=("all", "structures", "label", "export"), default="all")
    parser.add_argument("--workers", type=int, default=2, help="local processes")
    parser.add_argument("--threads", type=int, default=1, help="OpenMP threads per process")
    parser.add_argument("--scheduler", default=None, help="Dask scheduler address")
    args = parser.parse_args(argv)
    frames = structures()
    print(f"{len(frames)} structures in {STRUCTURES}")
    if args.stage in ("all", "label"):
        report = label_structures(
            frames,
            LabelStore(STORE),
            reference=REFERENCE,
            scheduler=args.scheduler,
            workers=args.workers,
            threads_per_worker=args.threads,
        )
        print(report)
    if args.stage in ("all", "export"):
        record = PySCFReference(**REFERENCE).record()
        written = export_labelled(LabelStore(STORE), OUTPUT, frames, record=record)
        print(f"{written} labelled structures written to {OUTPUT}")
        print(summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
