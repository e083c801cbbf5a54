"""Regenerate the interaction dataset: CHNO dimers, their scans, small mixed clusters.

Every complex is labelled together with its monomers *at their geometry in the
complex*, so that each interaction energy is an exact difference of stored labels.
Three stages, each resumable; run them all with::

    python data/make_interaction_dataset.py            # all stages
    python data/make_interaction_dataset.py --stage structures|label|export

1. ``structures``: seeded sampling with full GFN2-xTB (with its D4, via tblite).
   48 neutral closed-shell CHNO molecules (ASE's G2 set, plus phenol, toluene,
   aniline and formamide built by substitution), each relaxed; for each a
   homodimer and a heterodimer with water (the lowest of a few relaxed random
   starts; for the aromatics a relaxed parallel-displaced π-stacked start instead,
   plus the lowest random start where it is hydrogen-bonded and a T-shaped start
   for benzene); each dimer minimum scanned rigidly along the centre-of-mass axis
   (fewer points for the larger dimers, by their measured cost); a few mixed
   trimers and tetramers. Written once to
   ``data/work/interaction_structures.extxyz``; a rerun reuses that file, so
   floating-point differences between machines never change the keys of a
   half-done store. Each configuration draws from its own generator (seeded by
   ``SEED`` and its name), so adding or removing one leaves the others unchanged.
2. ``label``: the reference (revPBE0/def2-TZVP, density fitting, PySCF) with the
   Δ-target terms (dispersion-free GFN2-xTB and D3(BJ)-revPBE0), into the label
   store ``data/work/interactions.db``, in the order of the structures file
   (cheapest configurations first, families interleaved). Interrupt it at any
   time; a rerun computes only what is missing.
3. ``export``: ``data/labelled/interactions.extxyz`` with the *complete* systems
   only (every complex frame and every monomer labelled), in the order of the
   structures file, and a markdown summary. Can be run while labelling goes on.

Conventions of every frame's ``info``: ``kind`` (dimer, cluster, monomer),
``system`` (id of the configuration, shared by its complex frames and its
monomers), ``role`` (complex or monomer), ``name``, ``family`` (of the first
molecule; ``mixed`` for clusters), ``families`` and ``fragment_names`` (comma-
joined, in fragment order), ``sampling`` (minimum, scan x0.9, …, monomer),
``charge`` 0, ``multiplicity`` 1. Complex frames: atoms ordered fragment by
fragment, per-atom integer array ``fragment``, ``scan_factor`` (1.0 at the
minimum). Monomer frames: ``info["fragment"]`` (its index) and positions exactly
those of that fragment in the minimum (the scans move fragment 1 rigidly, so the
same monomers serve every point of a dimer's scan).
"""

from __future__ import annotations

import os

# One thread for the GFN2-xTB sampling: tblite's OpenMP reductions may change the
# last bit with more, and the sampled geometries (hence the store keys) must not.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import itertools
import sys
import time
import zlib
from collections import defaultdict
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.build import molecule
from ase.io import read, write
from ase.optimize import BFGS
from ase.units import kcal, mol

from deltaml.baseline import XTBBaseline
from deltaml.crystals import bonding_changes, identify_molecules
from deltaml.dataset import import_labelled, read_labelled, write_labelled
from deltaml.files import atomic_path
from deltaml.labelling import label_structures
from deltaml.reference import PySCFReference
from deltaml.store import LabelStore, label_key
from deltaml.structures import charge_and_multiplicity

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
#: Shipped (not in work/): a later session resumes on exactly these geometries, so the
#: keys of the labels shipped in OUTPUT match and are not computed again.
STRUCTURES = HERE / "structures" / "interaction_structures.extxyz"
STORE = WORK / "interactions.db"
OUTPUT = HERE / "labelled" / "interactions.extxyz"

SEED = 20261201
#: Reference settings (PySCFReference keywords): the same as the shipped water_chno set.
REFERENCE = {"method": "dft", "xc": "revpbe0", "basis": "def2-tzvp", "density_fit": True}

#: Molecule name (ASE's G2 name, or one of BUILT) → family.
MOLECULES: dict[str, str] = {
    "H2O": "water",
    "CH3OH": "alcohol", "CH3CH2OH": "alcohol", "C2H6CHOH": "alcohol",
    "HCOOH": "carboxylic_acid", "CH3COOH": "carboxylic_acid",
    "HCOOCH3": "ester",
    "HCONH2": "amide", "CH3CONH2": "amide",
    "NH3": "amine", "H3CNH2": "amine", "CH3CH2NH2": "amine", "C2H6NH": "amine",
    "C3H9N": "amine", "CH2NHCH2": "amine",
    "C6H6": "aromatic", "phenol": "aromatic", "toluene": "aromatic", "aniline": "aromatic",
    "C5H5N": "heteroaromatic", "C4H4NH": "heteroaromatic", "C4H4O": "heteroaromatic",
    "HCN": "nitrile", "CH3CN": "nitrile", "H2CCHCN": "nitrile", "NCCN": "nitrile",
    "H2CO": "carbonyl", "CH3CHO": "carbonyl", "CH3COCH3": "carbonyl", "OCHCHO": "carbonyl",
    "CH3OCH3": "ether", "CH3CH2OCH3": "ether", "CH2OCH2": "ether",
    "CH4": "alkane", "C2H6": "alkane", "C3H8": "alkane", "trans-butane": "alkane",
    "isobutane": "alkane",
    "C3H6_D3h": "cycloalkane", "cyclobutane": "cycloalkane",
    "C2H4": "alkene", "C2H2": "alkene", "butadiene": "alkene", "isobutene": "alkene",
    "N2H4": "other", "CH3NO2": "other", "CO2": "other", "H2O2": "other",
}  # fmt: skip
#: Molecules not in G2, built by substitution and relaxed: name → (parent, group).
BUILT = {
    "phenol": ("C6H6", "OH"),
    "toluene": ("C6H6", "CH3"),
    "aniline": ("C6H6", "NH2"),
    "HCONH2": ("CH3CONH2", "H"),  # formamide: acetamide's methyl replaced by H
}
#: Families whose homodimer is the relaxed π-stacked start; the lowest random start is
#: kept beside it only when it is hydrogen-bonded (phenol). A T-shaped start is relaxed
#: for the molecules in T_SHAPED only (cost, see SCAN_TIERS).
PI_FAMILIES = ("aromatic", "heteroaromatic")
T_SHAPED = ("C6H6",)
#: Partner of every heterodimer.
PARTNER = "H2O"
#: Random starts of a homodimer / heterodimer / cluster search (lowest relaxed kept).
STARTS = {"homo": 8, "hetero": 8, "cluster": 8}
#: Mixed clusters (fragment order = molecule order).
CLUSTERS = (
    ("H2O", "CH3OH", "HCONH2"),
    ("CH3COOH", "H2O", "H2O"),
    ("NH3", "H2O", "CH3OH"),
    ("HCOOH", "CH3OH", "H2O"),
    ("C5H5N", "H2O", "H2O"),
    ("CH3OH", "CH3OH", "H2O", "H2O"),
    ("HCONH2", "H2O", "H2O", "H2O"),
)
#: Dimer scan: centre-of-mass distance relative to the minimum's (the minimum is 1.0).
SCAN = (0.9, 1.1, 1.25, 1.5, 2.0)
#: Fewer scan points for larger dimers, by the estimated cost of one label of the
#: complex (s): (up to this cost, scan factors). Keeps the whole set near 12.6 h of
#: single-thread labels (6.3 h on two idle cores; the budget was 8 h).
SCAN_TIERS = (
    (60.0, SCAN),
    (200.0, (0.9, 1.25, 2.0)),
    (400.0, (1.25,)),
    (float("inf"), ()),
)
#: Relaxation: force threshold (eV/Å) and step limit.
FMAX, MAX_STEPS = 0.02, 2000
#: Random starts: closest intermolecular contact (Å).
CONTACT = 2.3
#: A relaxed complex whose closest intermolecular contact exceeds this (Å) fell apart.
DISSOCIATED = 4.5
#: π starts: plane separation and offset (Å); H···ring-centre distance of the T (Å).
STACK_HEIGHT, STACK_OFFSET, T_HEIGHT = 3.5, 1.5, 2.5
#: Two minima of the same pair closer than this in energy (kcal/mol) and in
#: centre-of-mass distance (Å) are the same; the later one is dropped.
SAME_ENERGY_KCAL, SAME_DISTANCE = 0.05, 0.1

#: Cost of one label measured on the 2-core development machine, one thread, one label
#: at a time: (def2-TZVP basis functions, wall s) for a water monomer, the water dimer,
#: a benzene monomer, the acetic acid dimer and the stacked benzene dimer. Estimates
#: interpolate log-log (and extrapolate with the slope of the end segments).
COST_POINTS = ((43, 2.6), (86, 10.2), (222, 82.6), (296, 218.1), (444, 694.8))
BASIS_FUNCTIONS = {1: 6, 6: 31, 7: 31, 8: 31}  # def2-TZVP, spherical


def _sampler() -> XTBBaseline:
    # Full GFN2-xTB (with D4): sampling should follow a physical surface.
    return XTBBaseline(method="GFN2-xTB")


def _energy(atoms: Atoms) -> float:
    atoms = Atoms(atoms.numbers, atoms.positions)
    atoms.calc = _sampler()
    return float(atoms.get_potential_energy())


def _relaxed(atoms: Atoms) -> tuple[Atoms, float, bool]:
    """GFN2-xTB minimum (BFGS), its energy (eV) and whether it converged."""
    atoms = Atoms(atoms.numbers, atoms.positions)
    atoms.calc = _sampler()
    converged = BFGS(atoms, logfile=None).run(fmax=FMAX, steps=MAX_STEPS)
    energy = float(atoms.get_potential_energy())
    atoms.calc = None
    return atoms, energy, bool(converged)


def _rng(name: str) -> np.random.Generator:
    """A generator of its own for each configuration: stable under adding others."""
    return np.random.default_rng([SEED, zlib.crc32(name.encode())])


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _rotation_onto(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Rotation matrix R with R @ â = b̂ (Rodrigues)."""
    a, b = _unit(a), _unit(b)
    v, c = np.cross(a, b), float(a @ b)
    if c < -1 + 1e-10:  # antiparallel: half turn about any perpendicular axis
        axis = _unit(np.cross(a, [1.0, 0, 0] if abs(a[0]) < 0.9 else [0, 1.0, 0]))
        return 2 * np.outer(axis, axis) - np.eye(3)
    k = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + k + k @ k / (1 + c)


def _rotation_about(axis: np.ndarray, angle: float) -> np.ndarray:
    x, y, z = _unit(axis)
    k = np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _neighbours(atoms: Atoms, index: int) -> list[int]:
    bonds = identify_molecules(atoms).bonds
    return sorted({j for i, j in bonds if i == index} | {i for i, j in bonds if j == index})


def _built(name: str) -> Atoms:
    """Phenol, toluene, aniline (benzene + group) and formamide (acetamide − CH3 + H)."""
    parent, group = BUILT[name]
    atoms = molecule(parent)
    if group == "H":  # replace the methyl carbon and its hydrogens by one H
        methyl = next(
            i
            for i in range(len(atoms))
            if atoms[i].symbol == "C"
            and sum(atoms[j].symbol == "H" for j in _neighbours(atoms, i)) == 3
        )
        carbonyl = next(j for j in _neighbours(atoms, methyl) if atoms[j].symbol == "C")
        hydrogens = [j for j in _neighbours(atoms, methyl) if atoms[j].symbol == "H"]
        direction = _unit(atoms[methyl].position - atoms[carbonyl].position)
        site = atoms[carbonyl].position + 1.10 * direction
        del atoms[sorted([methyl, *hydrogens], reverse=True)]
        return atoms + Atoms("H", [site])
    source, bond = {"OH": ("H2O", 1.37), "CH3": ("CH4", 1.50), "NH2": ("NH3", 1.40)}[group]
    h = next(i for i in range(len(atoms)) if atoms[i].symbol == "H")
    c = _neighbours(atoms, h)[0]
    u = _unit(atoms[h].position - atoms[c].position)
    donor = molecule(source)
    x = next(i for i in range(len(donor)) if donor[i].symbol != "H")
    dh = next(i for i in range(len(donor)) if donor[i].symbol == "H")
    rotation = _rotation_onto(donor[dh].position - donor[x].position, -u)
    # a 20° twist about the new bond, so that no symmetry holds the group at a saddle
    rotation = _rotation_about(u, np.radians(20.0)) @ rotation
    positions = (donor.positions - donor[x].position) @ rotation.T + atoms[c].position + bond * u
    keep = [i for i in range(len(donor)) if i != dh]
    group_atoms = Atoms(donor.numbers[keep], positions[keep])
    del atoms[[h]]
    return atoms + group_atoms


_MONOMERS: dict[str, tuple[Atoms, float]] = {}


def monomer(name: str) -> tuple[Atoms, float]:
    """The GFN2-xTB-relaxed molecule (centred at its centre of mass) and its energy."""
    if name not in _MONOMERS:
        start = _built(name) if name in BUILT else molecule(name)
        relaxed, energy, converged = _relaxed(start)
        changes = bonding_changes(start, relaxed)
        if not converged or changes["broken"] or changes["formed"]:
            raise RuntimeError(f"{name}: relaxation failed ({converged=}, {changes})")
        relaxed.positions -= relaxed.get_center_of_mass()
        _MONOMERS[name] = (relaxed, energy)
    atoms, energy = _MONOMERS[name]
    return atoms.copy(), energy


def _closest(first: np.ndarray, second: np.ndarray) -> float:
    return float(np.min(np.linalg.norm(first[:, None] - second[None], axis=-1)))


def _random_complex(names: tuple[str, ...], rng: np.random.Generator) -> Atoms:
    """Molecules added one by one at random orientations, each along a random
    direction from the complex's centre until the closest contact is CONTACT."""
    first, _ = monomer(names[0])
    complex_ = first
    for name in names[1:]:
        mol, _ = monomer(name)
        mol.positions = mol.positions @ _random_rotation(rng).T
        axis = _unit(rng.normal(size=3))
        centre = complex_.get_center_of_mass()
        distance = 0.0
        while _closest(complex_.positions, mol.positions + centre + distance * axis) < CONTACT:
            distance += 0.05
        mol.positions += centre + distance * axis
        complex_ = complex_ + mol
    return complex_


def _plane(atoms: Atoms) -> tuple[np.ndarray, np.ndarray]:
    """Centroid and unit normal of the heavy atoms of the ring's plane."""
    heavy = atoms.positions[atoms.numbers > 1]
    centroid = heavy.mean(axis=0)
    _, _, vt = np.linalg.svd(heavy - centroid)
    return centroid, vt[2]


def _stacked_start(name: str) -> Atoms:
    """Parallel-displaced, antiparallel π stack: B = A turned half a turn about the
    ring normal, STACK_HEIGHT above and STACK_OFFSET aside."""
    a, _ = monomer(name)
    centroid, normal = _plane(a)
    in_plane = _unit(np.cross(normal, [0.0, 0.0, 1.0] if abs(normal[2]) < 0.9 else [1.0, 0, 0]))
    b = a.copy()
    b.positions = (b.positions - centroid) @ _rotation_about(normal, np.pi).T + centroid
    b.positions += STACK_HEIGHT * normal + STACK_OFFSET * in_plane
    return a + b


def _t_start(name: str) -> Atoms:
    """T shape: a ring C–H of B (the one farthest from B's centre of mass) pointing
    at A's ring centre from T_HEIGHT above it."""
    a, _ = monomer(name)
    b = a.copy()
    centroid, normal = _plane(a)
    hydrogens = [
        i for i in range(len(b)) if b[i].symbol == "H" and b[_neighbours(b, i)[0]].symbol == "C"
    ]
    h = max(hydrogens, key=lambda i: np.linalg.norm(b[i].position))  # b is COM-centred
    c = _neighbours(b, h)[0]
    rotation = _rotation_onto(b[h].position - b[c].position, -normal)
    b.positions = b.positions @ rotation.T
    b.positions += centroid + T_HEIGHT * normal - b[h].position
    return a + b


def _check(start: Atoms, relaxed: Atoms, sizes: tuple[int, ...]) -> str | None:
    """Why a relaxed complex is unusable (bonds changed, fell apart), or None."""
    changes = bonding_changes(start, relaxed)
    if changes["broken"] or changes["formed"]:
        return f"bonds changed {changes}"
    labels = identify_molecules(relaxed).labels
    bounds = np.cumsum((0, *sizes))
    if len(set(labels)) != len(sizes) or any(
        len(set(labels[lo:hi])) != 1 for lo, hi in itertools.pairwise(bounds)
    ):
        return "molecules merged"
    for k in range(len(sizes)):
        inside = relaxed.positions[bounds[k] : bounds[k + 1]]
        outside = np.delete(relaxed.positions, np.s_[bounds[k] : bounds[k + 1]], axis=0)
        if _closest(inside, outside) > DISSOCIATED:
            return "dissociated"
    return None


def _binding_kcal(relaxed: Atoms, energy: float, names: tuple[str, ...]) -> float:
    """GFN2-xTB binding energy against the relaxed monomers, kcal/mol."""
    return (energy - sum(monomer(n)[1] for n in names)) / (kcal / mol)


def _motif(atoms: Atoms, sizes: tuple[int, ...]) -> str:
    """'hb' if an N/O–H···N/O contact below 2.5 Å joins two fragments, else 'vdw'."""
    fragment = np.repeat(np.arange(len(sizes)), sizes)
    bonds = identify_molecules(atoms).bonds
    donors = {
        h
        for i, j in bonds
        for h, x in ((i, j), (j, i))
        if atoms[h].symbol == "H" and atoms[x].symbol in ("N", "O")
    }
    acceptors = [k for k in range(len(atoms)) if atoms[k].symbol in ("N", "O")]
    for h in donors:
        for k in acceptors:
            if fragment[h] != fragment[k] and atoms.get_distance(h, k) < 2.5:
                return "hb"
    return "vdw"


def _com_distance(atoms: Atoms, n_first: int) -> float:
    return float(
        np.linalg.norm(atoms[n_first:].get_center_of_mass() - atoms[:n_first].get_center_of_mass())
    )


def _search(
    names: tuple[str, ...], starts: list[Atoms], log: list[str], label: str
) -> tuple[Atoms, float] | None:
    """The lowest usable relaxed start, with its energy; None if none is usable."""
    sizes = tuple(len(monomer(n)[0]) for n in names)
    best: tuple[Atoms, float] | None = None
    for k, start in enumerate(starts):
        relaxed, energy, converged = _relaxed(start)
        problem = _check(start, relaxed, sizes)
        if problem is None and not converged:
            problem = f"not converged in {MAX_STEPS} steps"
        if problem is not None:
            log.append(f"{label} start {k}: dropped ({problem})")
            continue
        if best is None or energy < best[1]:
            best = (relaxed, energy)
    return best


def _basis_functions(atoms: Atoms) -> int:
    return int(sum(BASIS_FUNCTIONS[z] for z in atoms.numbers))


def estimated_cost(atoms: Atoms) -> float:
    """Estimated wall time of one label (s), one thread (from COST_POINTS)."""
    x, y = np.log(np.array(COST_POINTS, dtype=float)).T
    t = np.log(_basis_functions(atoms))
    if t < x[0]:
        return float(np.exp(y[0] + (t - x[0]) * (y[1] - y[0]) / (x[1] - x[0])))
    if t > x[-1]:
        return float(np.exp(y[-1] + (t - x[-1]) * (y[-1] - y[-2]) / (x[-1] - x[-2])))
    return float(np.exp(np.interp(t, x, y)))


def _tagged(atoms: Atoms, **info: object) -> Atoms:
    frame = Atoms(atoms.numbers, atoms.positions)
    frame.info.update(info, charge=0, multiplicity=1)
    return frame


def _system_frames(
    complex_: Atoms, names: tuple[str, ...], kind: str, system: str, name: str, family: str
) -> list[Atoms]:
    """Monomers, minimum and (dimers) scan of one configuration."""
    sizes = [len(monomer(n)[0]) for n in names]
    fragment = np.repeat(np.arange(len(names)), sizes)
    common = {
        "system": system,
        "name": name,
        "family": family,
        "families": ",".join(MOLECULES[n] for n in names),
        "fragment_names": ",".join(names),
    }
    frames = []
    bounds = np.cumsum((0, *sizes))
    for k in range(len(names)):
        part = complex_[bounds[k] : bounds[k + 1]]
        frames.append(
            _tagged(part, kind="monomer", role="monomer", sampling="monomer", fragment=k, **common)
        )
    factors: tuple[float, ...] = (1.0,)
    if kind == "dimer":
        cost = estimated_cost(complex_)
        factors = (1.0, *next(scan for limit, scan in SCAN_TIERS if cost <= limit))
    axis = complex_[bounds[1] :].get_center_of_mass() - complex_[: bounds[1]].get_center_of_mass()
    for factor in factors:
        moved = complex_.copy()
        moved.positions[bounds[1] :] += (factor - 1.0) * axis
        sampling = "minimum" if factor == 1.0 else f"scan x{factor:g}"
        frame = _tagged(
            moved, kind=kind, role="complex", sampling=sampling, scan_factor=float(factor), **common
        )
        frame.arrays["fragment"] = fragment.copy()
        frames.append(frame)
    return frames


def _dimer_configurations(name: str, log: list[str]) -> list[tuple[str, Atoms, tuple[str, ...]]]:
    """(system id, relaxed complex, fragment names) of every dimer of one molecule."""
    family = MOLECULES[name]
    found: list[tuple[str, Atoms, tuple[str, ...], float]] = []

    def add(names: tuple[str, ...], result: tuple[Atoms, float] | None, motif: str | None) -> None:
        pair = "...".join(names)
        if result is None:
            log.append(f"{pair}#{motif or 'min'}: no usable minimum")
            return
        relaxed, energy = result
        n_first = len(monomer(names[0])[0])
        motif = motif or _motif(relaxed, (n_first, len(relaxed) - n_first))
        binding = _binding_kcal(relaxed, energy, names)
        distance = _com_distance(relaxed, n_first)
        for system, other, other_names, other_binding in found:
            if (
                other_names == names
                and abs(binding - other_binding) < SAME_ENERGY_KCAL
                and abs(distance - _com_distance(other, n_first)) < SAME_DISTANCE
            ):
                log.append(f"{pair}#{motif}: same minimum as {system}, dropped")
                return
        system = f"{pair}#{motif}"
        if any(s == system for s, *_ in found):
            system = f"{pair}#{motif}2"
        found.append((system, relaxed, names, binding))
        log.append(
            f"{system}: {len(relaxed)} atoms, R_com {distance:.2f} Å, "
            f"GFN2-xTB binding {binding:.2f} kcal/mol"
        )

    homo = (name, name)
    if family in PI_FAMILIES:
        add(homo, _search(homo, [_stacked_start(name)], log, f"{name} stack"), "stack")
        if name in T_SHAPED:
            add(homo, _search(homo, [_t_start(name)], log, f"{name} T"), "tshape")
    rng = _rng("...".join(homo))
    starts = [_random_complex(homo, rng) for _ in range(STARTS["homo"])]
    result = _search(homo, starts, log, "...".join(homo))
    size = len(monomer(name)[0])
    if family in PI_FAMILIES and result is not None and _motif(result[0], (size, size)) != "hb":
        log.append(
            f"{name}...{name}: lowest random start ({_binding_kcal(*result, homo):.2f} "
            "kcal/mol) not hydrogen-bonded, left out for the π-stacked one (cost)"
        )
    else:
        add(homo, result, None)
    if name != PARTNER:
        hetero = (name, PARTNER)
        rng = _rng("...".join(hetero))
        starts = [_random_complex(hetero, rng) for _ in range(STARTS["hetero"])]
        add(hetero, _search(hetero, starts, log, "...".join(hetero)), None)
    return [(system, relaxed, names) for system, relaxed, names, _ in found]


def make_structures() -> list[Atoms]:
    """Sample every configuration, then order them (deterministic)."""
    systems: list[tuple[str, list[Atoms]]] = []  # (family, frames)
    log: list[str] = []
    start = time.perf_counter()
    for name, family in MOLECULES.items():
        for system, relaxed, names in _dimer_configurations(name, log):
            frames = _system_frames(relaxed, names, "dimer", system, "...".join(names), family)
            systems.append((family, frames))
        print("\n".join(log), flush=True)
        log.clear()
    for names in CLUSTERS:
        cluster_name = "+".join(names)
        rng = _rng(cluster_name)
        starts = [_random_complex(names, rng) for _ in range(STARTS["cluster"])]
        result = _search(names, starts, log, cluster_name)
        if result is None:
            log.append(f"{cluster_name}: no usable minimum")
            continue
        relaxed, energy = result
        system = f"{cluster_name}#min"
        log.append(
            f"{system}: {len(relaxed)} atoms, GFN2-xTB binding "
            f"{_binding_kcal(relaxed, energy, names):.2f} kcal/mol"
        )
        systems.append(
            ("mixed", _system_frames(relaxed, names, "cluster", system, cluster_name, "mixed"))
        )
        print("\n".join(log), flush=True)
        log.clear()
    print(f"sampled {len(systems)} configurations in {time.perf_counter() - start:.0f} s")
    return [frame for _, frames in _ordered(systems) for frame in frames]


def _ordered(systems: list[tuple[str, list[Atoms]]]) -> list[tuple[str, list[Atoms]]]:
    """Cheapest first, families interleaved: each configuration is ranked by the
    estimated cost of its family's configurations up to and including it (cheapest
    first within a family), so every family gets a fair share of a partial run."""
    costs = [sum(estimated_cost(a) for a in frames) for _, frames in systems]
    by_family: dict[str, list[int]] = defaultdict(list)
    for index, (family, _) in enumerate(systems):
        by_family[family].append(index)
    rank = {}
    for indices in by_family.values():
        total = 0.0
        for index in sorted(indices, key=lambda i: (costs[i], i)):
            total += costs[index]
            rank[index] = (total, costs[index], index)
    return [systems[i] for i in sorted(rank, key=rank.get)]


def structures() -> list[Atoms]:
    """The sampled structures: read from the work file, or sampled and written once."""
    if not STRUCTURES.exists():
        STRUCTURES.parent.mkdir(parents=True, exist_ok=True)
        frames = make_structures()
        with atomic_path(STRUCTURES) as partial:  # never a half-written structures file
            write(partial, frames, format="extxyz")
    return read(STRUCTURES, index=":", format="extxyz")


def _labelled_frames(
    frames: list[Atoms], store: LabelStore, record: dict
) -> tuple[list[Atoms], dict[str, str], list[float]]:
    """Labelled frames of the complete systems (structures-file order), the status
    (complete, partial, failed, pending) of every system, and the measured cost (s)
    of every structure labelled so far (NaN where not labelled)."""
    labels: list[Atoms | None] = []
    failed = set(store.failures())
    for atoms in frames:
        charge, multiplicity = charge_and_multiplicity(atoms)
        key = label_key(atoms, record, charge, multiplicity)
        labels.append("failed" if key in failed else store.get(key))
    by_system: dict[str, list[int]] = defaultdict(list)
    for index, atoms in enumerate(frames):
        by_system[atoms.info["system"]].append(index)
    status, out = {}, []
    for system, members in by_system.items():
        done = [isinstance(labels[i], Atoms) for i in members]
        if all(done):
            status[system] = "complete"
            for i in members:
                labelled = labels[i]
                labelled.info = {**frames[i].info, **labelled.info}
                if "fragment" in frames[i].arrays:  # per-atom arrays are not in the store
                    labelled.arrays["fragment"] = frames[i].arrays["fragment"].astype(int)
                out.append(labelled)
        elif any(isinstance(labels[i], str) for i in members):
            status[system] = "failed"
        else:
            status[system] = "partial" if any(done) else "pending"
    costs = [
        float(label.info.get("compute_seconds", np.nan)) if isinstance(label, Atoms) else np.nan
        for label in labels
    ]
    return out, status, costs


def summary(
    frames: list[Atoms], exported: list[Atoms], status: dict[str, str], costs: list[float]
) -> str:
    """Markdown summary: what was exported, cost per kind and family, projection."""
    states = list(status.values())
    molecules = sorted({n for a in exported for n in a.info["fragment_names"].split(",")})
    families = sorted({f for a in exported for f in a.info["families"].split(",")})
    lines = [
        f"{states.count('complete')} of {len(status)} systems complete and exported "
        f"({states.count('partial')} partly labelled, {states.count('failed')} with a failed "
        f"label, {states.count('pending')} not started); {len(molecules)} molecules, "
        f"{len(families)} families",
        "",
        "| kind | systems | frames | atoms | mean cost per label (s) | total cost (h) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    total = 0.0
    for kind in ("dimer", "cluster", "monomer"):
        chosen = [a for a in exported if a.info["kind"] == kind]
        if not chosen:
            continue
        seconds = [a.info["compute_seconds"] for a in chosen if "compute_seconds" in a.info]
        hours = float(np.sum(seconds)) / 3600
        total += hours
        sizes = sorted({len(a) for a in chosen})
        systems = len({a.info["system"] for a in chosen})
        lines.append(
            f"| {kind} | {systems} | {len(chosen)} | {sizes[0]}-{sizes[-1]} "
            f"| {np.mean(seconds):.1f} | {hours:.2f} |"
        )
    n_systems = len({a.info["system"] for a in exported})
    lines.append(f"| all | {n_systems} | {len(exported)} | | | {total:.2f} |")
    if exported:
        lines += ["", "| family | systems | frames |", "| --- | --- | --- |"]
        for family in sorted({a.info["family"] for a in exported}):
            chosen = [a for a in exported if a.info["family"] == family]
            systems = len({a.info["system"] for a in chosen})
            lines.append(f"| {family} | {systems} | {len(chosen)} |")
    measured = np.array(costs)
    done = np.isfinite(measured)
    estimates = np.array([estimated_cost(a) for a in frames])
    if done.any():  # projection: the cost model scaled by the measured/estimated ratio
        ratio = measured[done].sum() / estimates[done].sum()
        spent, left = measured[done].sum() / 3600, ratio * estimates[~done].sum() / 3600
        lines += [
            "",
            f"labelled {done.sum()} of {len(frames)} structures in {spent:.2f} h of "
            f"single-thread labels; measured/estimated cost {ratio:.2f}; the rest ≈ "
            f"{left:.1f} h, the whole set ≈ {spent + left:.1f} h",
        ]
    return "\n".join(lines)


def label_and_export(
    frames: list[Atoms],
    args: argparse.Namespace,
    store_path: Path,
    output: Path,
    chosen: list[Atoms] | None = None,
) -> None:
    """The ``label`` and ``export`` stages of ``args.stage`` (this script's and the
    crystal contacts'): shipped labels imported into a new store first, ``chosen``
    (default all) labelled, then the complete systems of ``frames`` exported."""
    if args.stage in ("all", "label"):
        store = LabelStore(store_path)
        if output.is_file():
            # Labels shipped with the repository go into a new store first: a fresh
            # checkout resumes where the last session's export stopped.
            added, present = import_labelled(store, read_labelled(output))
            print(f"{added} shipped labels imported into {store_path} ({present} present)")
        report = label_structures(
            frames if chosen is None else chosen,
            store,
            reference=REFERENCE,
            scheduler=args.scheduler,
            workers=args.workers,
            threads_per_worker=args.threads,
        )
        print(report)
    if args.stage in ("all", "export"):
        record = PySCFReference(**REFERENCE).record()
        exported, status, costs = _labelled_frames(frames, LabelStore(store_path), record)
        if exported:
            written = write_labelled(output, exported)
            print(f"{written} labelled structures of complete systems written to {output}")
        print(summary(frames, exported, status, costs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stage", choices=("all", "structures", "label", "export"), default="all")
    parser.add_argument("--workers", type=int, default=2, help="local processes")
    parser.add_argument("--threads", type=int, default=1, help="OpenMP threads per process")
    parser.add_argument("--scheduler", default=None, help="Dask scheduler address")
    parser.add_argument(
        "--systems", default=None, help="label only these systems (comma-separated ids)"
    )
    args = parser.parse_args(argv)
    frames = structures()
    print(f"{len(frames)} structures in {STRUCTURES}", flush=True)
    chosen = frames
    if args.systems is not None:
        wanted = set(args.systems.split(","))
        chosen = [a for a in frames if a.info["system"] in wanted]
    label_and_export(frames, args, STORE, OUTPUT, chosen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
