"""Molecular crystals: molecules from connectivity, cell shapes, ice polymorphs.

A molecular crystal is a set of molecules in a periodic cell. The ranking
workflow (:mod:`deltaml.ranking`) needs to know which molecules a cell holds
(to count Z and to check that every candidate holds the same ones), whether a
relaxation changed the bonding, and cells wide enough for the Γ-point baseline.

Bonds are the pairs closer than ``scale`` × the sum of ASE's natural (covalent)
radii, minimum image included; molecules are the connected components of that
graph. The default ``scale=1.2`` keeps O–H···O hydrogen bonds (H···O ≈ 1.8 Å
against 1.2 × (0.31 + 0.66) = 1.16 Å) out of the molecules.

Ice polymorphs come from GenIce2 (Matsumoto et al., J. Comput. Chem. 39, 61
(2018)), with rigid water (O–H 0.98 Å, H–O–H 104.52°) on its oxygen sites.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.units import _amu
from numpy.typing import NDArray

from deltaml.errors import ParameterError, TopologyChangedError, TopologyError
from deltaml.structures import perpendicular_widths

#: Bonded if closer than this factor times the sum of the covalent radii.
BOND_SCALE = 1.2

#: Rigid water geometry of the ice builders: O–H (Å) and H–O–H (degrees).
OH_BOND_A = 0.98
HOH_ANGLE_DEG = 104.52


@dataclass(frozen=True)
class Molecules:
    """The molecules of a structure, found from its bonds.

    Attributes
    ----------
    labels : ndarray of int, shape (n_atoms,)
        Molecule index of every atom (0 … n_molecules − 1).
    formulas : list of str
        Hill formula of every molecule.
    bonds : frozenset of (int, int)
        Bonded atom pairs (i < j), minimum image.
    """

    labels: NDArray[np.int64]
    formulas: list[str]
    bonds: frozenset[tuple[int, int]] = field(repr=False)

    @property
    def count(self) -> dict[str, int]:
        """Number of molecules of each formula."""
        out: dict[str, int] = {}
        for formula in self.formulas:
            out[formula] = out.get(formula, 0) + 1
        return dict(sorted(out.items()))


def bonded_pairs(atoms: Atoms, scale: float = BOND_SCALE) -> set[tuple[int, int]]:
    """Bonded pairs (i < j): closer than ``scale`` × the sum of covalent radii.

    The one bond rule of deltaml (molecules of crystals and of the molecular
    decomposition, bonding changes, MD stability), with ASE's covalent radii;
    periodic images count.
    """
    from ase.data import covalent_radii
    from ase.neighborlist import natural_cutoffs, neighbor_list

    if atoms.pbc.any():
        first, second = neighbor_list("ij", atoms, natural_cutoffs(atoms, mult=scale))
    else:
        # The same rule without images: all pairs at once, ~20× faster than a
        # neighbour list on the small molecules and clusters a calculator sees
        # at every step. Blocks of rows keep memory linear in large clusters.
        radii = scale * covalent_radii[atoms.numbers]
        positions = atoms.positions
        found = []
        for start in range(0, len(atoms), _PAIR_BLOCK):
            block = slice(start, start + _PAIR_BLOCK)
            d = np.linalg.norm(positions[block, None, :] - positions[None, :, :], axis=-1)
            i, j = np.nonzero(d < radii[block, None] + radii[None, :])
            found.append((i + start, j))
        first = np.concatenate([f for f, _ in found])
        second = np.concatenate([s for _, s in found])
    return {(int(i), int(j)) for i, j in zip(first, second, strict=True) if i < j}


#: Rows per block of the all-pairs bond search of a non-periodic structure.
_PAIR_BLOCK = 512


def identify_molecules(atoms: Atoms, *, scale: float = BOND_SCALE) -> Molecules:
    """Split a structure into molecules from its covalent bonds.

    Parameters
    ----------
    atoms : ase.Atoms
        Molecule, cluster or periodic crystal (periodic images count).
    scale : float, default=1.2
        Bond if the distance is below ``scale`` × (r_cov,i + r_cov,j).

    Returns
    -------
    Molecules
    """
    if len(atoms) == 0:
        raise ParameterError("the structure has no atoms")
    # A calculator checks the bonding and the model splits by molecule on the
    # same geometry within one call: remember the last answer.
    key = (
        atoms.numbers.tobytes(),
        atoms.positions.tobytes(),
        atoms.cell.array.tobytes(),
        atoms.pbc.tobytes(),
        float(scale),
    )
    if _LAST_MOLECULES.get("key") != key:
        _LAST_MOLECULES.update(key=key, value=_identify_molecules(atoms, scale))
    return _LAST_MOLECULES["value"]


#: The last structure :func:`identify_molecules` saw (its key) and its answer.
_LAST_MOLECULES: dict = {}


def _identify_molecules(atoms: Atoms, scale: float) -> Molecules:
    from ase.formula import Formula
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    pairs = sorted(bonded_pairs(atoms, scale))
    first = np.array([i for i, _ in pairs], dtype=int)
    second = np.array([j for _, j in pairs], dtype=int)
    n = len(atoms)
    graph = coo_matrix((np.ones(len(first)), (first, second)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    # Number molecules in order of their first atom (stable under nothing but atom order).
    _, first_atom = np.unique(labels, return_index=True)
    renumber = np.empty_like(labels)
    renumber[labels[np.sort(first_atom)]] = np.arange(len(first_atom))
    labels = renumber[labels]
    symbols = np.array(atoms.get_chemical_symbols())
    formulas = [
        Formula.from_list(symbols[labels == k].tolist()).format("hill")
        for k in range(len(first_atom))
    ]
    bonds = frozenset(pairs)
    return Molecules(labels=labels.astype(np.int64), formulas=formulas, bonds=bonds)


def whole_molecules(atoms: Atoms, *, scale: float = BOND_SCALE) -> tuple[Molecules, NDArray]:
    """Molecules and positions with every molecule whole (unwrapped across the cell).

    Each molecule is grown from its first atom along its bonds, taking every bonded
    neighbour at the periodic image the bond reaches, so that a molecule split by
    the cell boundary comes out in one piece. A molecule is always whole in a
    non-periodic structure.

    Parameters
    ----------
    atoms : ase.Atoms
        Molecule, cluster or periodic crystal.
    scale : float, default=1.2
        Bond rule of :func:`identify_molecules`.

    Returns
    -------
    molecules : Molecules
        As :func:`identify_molecules`.
    positions : ndarray of shape (n_atoms, 3)
        Cartesian positions (Å), atoms moved by lattice vectors only.

    Raises
    ------
    TopologyError
        A molecule is bonded to its own periodic image (a chain, layer or network
        solid): it has no finite "own molecule".
    """
    from collections import deque

    from ase.neighborlist import natural_cutoffs, neighbor_list

    molecules = identify_molecules(atoms, scale=scale)
    positions = atoms.get_positions()
    if not atoms.pbc.any():
        return molecules, positions
    first, second, shifts = neighbor_list("ijS", atoms, natural_cutoffs(atoms, mult=scale))
    order = np.argsort(first, kind="stable")
    first, second, shifts = first[order], second[order], shifts[order]
    bounds = np.searchsorted(first, np.arange(len(atoms) + 1))
    image = np.zeros((len(atoms), 3), dtype=np.int64)
    seen = np.zeros(len(atoms), dtype=bool)
    for start in range(len(atoms)):
        if seen[start]:
            continue
        seen[start] = True
        queue = deque([start])
        while queue:
            i = queue.popleft()
            for k in range(bounds[i], bounds[i + 1]):
                j, reached = int(second[k]), image[i] + shifts[k]
                if not seen[j]:
                    seen[j], image[j] = True, reached
                    queue.append(j)
                elif (image[j] != reached).any():
                    label = molecules.labels[i]
                    raise TopologyError(
                        f"molecule {label} ({molecules.formulas[label]}) is bonded to its own "
                        f"periodic image (atoms {i} and {j}): an infinite "
                        "chain, layer or network has no intramolecular part; use the atomic "
                        "decomposition for it"
                    )
    return molecules, positions + image @ atoms.cell.array


def check_same_molecules(reference: NDArray, atoms: Atoms, *, scale: float = BOND_SCALE) -> None:
    """Refuse a structure whose molecules differ from ``reference`` labels.

    Raises
    ------
    TopologyChangedError
        Naming a molecule that broke or two that merged.
    """
    now = identify_molecules(atoms, scale=scale).labels
    if len(now) == len(reference) and (now == reference).all():
        return
    # Labels are numbered by first atom, so equal partitions give equal labels.
    changed = np.flatnonzero(now != reference) if len(now) == len(reference) else [0]
    atom = int(changed[0])
    raise TopologyChangedError(
        f"the covalent bonding changed (at atom {atom}, {atoms.get_chemical_symbols()[atom]}): "
        f"{int(reference.max()) + 1} molecules at the start, {int(now.max()) + 1} now. The "
        "molecular decomposition fixes the molecules for a calculation; a bond broken or "
        "formed is outside what it models"
    )


def bonding_changes(
    before: Atoms, after: Atoms, *, scale: float = BOND_SCALE
) -> dict[str, list[tuple[int, int]]]:
    """Bonds broken and formed between two geometries of the same atoms.

    Returns
    -------
    dict
        ``broken`` and ``formed``: sorted atom pairs (i < j); both empty if the
        bonding is unchanged.
    """
    if len(before) != len(after) or (before.numbers != after.numbers).any():
        raise ParameterError("bonding_changes needs two geometries of the same atoms")
    old = identify_molecules(before, scale=scale).bonds
    new = identify_molecules(after, scale=scale).bonds
    return {"broken": sorted(old - new), "formed": sorted(new - old)}


def formula_units(molecules: Molecules, unit: dict[str, int]) -> int:
    """Number of formula units Z of ``unit`` (molecule formula → count) in a cell.

    Raises
    ------
    ParameterError
        If the cell holds other molecules, or not a whole number of units.
    """
    have = molecules.count
    if set(have) != set(unit):
        raise ParameterError(
            f"the cell holds molecules {have}, the formula unit is {dict(sorted(unit.items()))}"
        )
    ratios = {formula: have[formula] / unit[formula] for formula in unit}
    z = next(iter(ratios.values()))
    if any(r != z for r in ratios.values()) or z != int(z) or z < 1:
        raise ParameterError(
            f"the cell holds molecules {have}: not a whole number of formula units "
            f"{dict(sorted(unit.items()))}"
        )
    return int(z)


def density_g_cm3(atoms: Atoms) -> float:
    """Mass density of a periodic cell, g/cm³ (ASE's atomic masses)."""
    return float(atoms.get_masses().sum() * _amu * 1e3 / (atoms.get_volume() * 1e-24))


def strained_cell(atoms: Atoms, max_strain: float, rng: np.random.Generator) -> Atoms:
    """A copy of a cell under a random homogeneous strain (atoms follow the cell).

    The cell becomes ``cell @ (I + ε)`` with ε symmetric, ``(U + Uᵀ)/2`` for U
    uniform in ±``max_strain`` per component (one draw of ``rng``): the compressed,
    stretched and sheared cells that a cell relaxation or a pressure scan visits.
    """
    out = atoms.copy()
    draw = rng.uniform(-max_strain, max_strain, size=(3, 3))
    out.set_cell(atoms.cell.array @ (np.eye(3) + 0.5 * (draw + draw.T)), scale_atoms=True)
    return out


def wide_cell_matrix(
    cell: NDArray[np.float64], min_width: float, *, max_entry: int = 2
) -> NDArray[np.int64]:
    """Smallest integer supercell matrix whose cell is at least ``min_width`` wide.

    Among matrices with entries in −1 … ``max_entry`` (rows = new vectors in
    terms of the old), the one with the fewest copies whose three perpendicular
    widths are all ≥ ``min_width``; ties go to the widest. A cell that is wide
    enough already gives the identity.

    Parameters
    ----------
    cell : ndarray of shape (3, 3)
        Cell vectors as rows, Å.
    min_width : float
        Smallest perpendicular width wanted, Å.

    Returns
    -------
    ndarray of int, shape (3, 3)
    """
    cell = np.asarray(cell, dtype=float)
    if perpendicular_widths(cell).min() >= min_width:
        return np.eye(3, dtype=np.int64)
    values = np.arange(-1, max_entry + 1)
    rows = np.array(list(itertools.product(values, repeat=3)))
    rows = rows[np.any(rows != 0, axis=1)]
    vectors = rows @ cell
    best: tuple[int, float, NDArray] | None = None
    # Widths of a cell: volume / area of the opposite face; enumerate row triples.
    for i, j in itertools.combinations(range(len(rows)), 2):
        cross = np.cross(vectors[i], vectors[j])
        area_ij = np.linalg.norm(cross)
        if area_ij == 0:
            continue
        signed = vectors @ cross
        volumes = np.abs(signed)
        dets = np.rint(volumes / abs(np.linalg.det(cell))).astype(int)
        ok = dets > 0
        if best is not None:
            ok &= dets <= best[0]
        for k in np.flatnonzero(ok):
            if k <= j:
                continue
            volume = volumes[k]
            widths = volume / np.array(
                [
                    np.linalg.norm(np.cross(vectors[j], vectors[k])),
                    np.linalg.norm(np.cross(vectors[k], vectors[i])),
                    area_ij,
                ]
            )
            if widths.min() < min_width:
                continue
            # A left-handed triple becomes right-handed by swapping two vectors.
            order = [i, j, k] if signed[k] * np.linalg.det(cell) > 0 else [i, k, j]
            candidate = (int(dets[k]), float(widths.min()), rows[order])
            if best is None or (candidate[0], -candidate[1]) < (best[0], -best[1]):
                best = candidate
    if best is None:
        raise ParameterError(
            f"no supercell with entries up to {max_entry} is {min_width} Å wide; "
            "raise max_entry or lower min_width"
        )
    return best[2].astype(np.int64)


def wide_cell(atoms: Atoms, min_width: float = 7.0) -> Atoms:
    """The smallest supercell of ``atoms`` that is ``min_width`` wide in every direction.

    A Γ-point calculation (tblite, CP2K's default) of a narrow cell misses the
    dispersion of its bands; labels and baseline on the same wide cell keep a
    Δ-target free of that error. Atoms are not wrapped, so whole molecules stay
    whole; ``info`` is kept.

    Parameters
    ----------
    atoms : ase.Atoms
        Periodic cell.
    min_width : float, default=7.0
        Smallest perpendicular width, Å (:func:`wide_cell_matrix`).

    Returns
    -------
    ase.Atoms
        The supercell (a copy of ``atoms`` when it is wide enough already).
    """
    from ase.build import make_supercell

    matrix = wide_cell_matrix(atoms.cell.array, min_width)
    if (matrix == np.eye(3, dtype=np.int64)).all():
        return atoms.copy()
    out = make_supercell(atoms, matrix, wrap=False, order="cell-major")
    out.info = dict(atoms.info)
    return out


@dataclass(frozen=True)
class IcePhase:
    """How GenIce2 builds one ice phase."""

    lattice: str
    options: dict[str, bool]
    description: str
    #: Divisors of GenIce2's cell to its smallest repeat unit (checked when used).
    reduce: tuple[int, int, int] = (1, 1, 1)


#: Ice phases by name. Proton-ordered where GenIce2 has the ordered form; VI is
#: proton-disordered (GenIce2 has no XV), made non-polar and seeded.
ICE_PHASES: dict[str, IcePhase] = {
    "Ih": IcePhase(
        "11i",
        {"6": True},
        "ice Ih, proton order P2₁2₁2₁ (Hirsch & Ojamäe 2004, structure 6), non-polar",
        reduce=(2, 1, 1),
    ),
    "Ic": IcePhase("XIc-a", {}, "ice Ic, proton-ordered candidate XIc 'a' (Geiger et al.)"),
    "II": IcePhase("2", {}, "ice II, proton-ordered (R-3)"),
    "IX": IcePhase("9", {}, "ice IX, proton-ordered counterpart of ice III (P4₁2₁2)"),
    "XIII": IcePhase("13", {}, "ice XIII, proton-ordered counterpart of ice V (P2₁/a)"),
    "VI": IcePhase("6", {}, "ice VI, proton-disordered (non-polar, seeded)"),
    "VIII": IcePhase(
        "8", {}, "ice VIII, proton-ordered counterpart of ice VII (I4₁/amd)", reduce=(2, 2, 2)
    ),
}


def ice_polymorph(name: str, *, min_width: float = 7.0, seed: int = 0) -> Atoms:
    """A proton-ordered (or non-polar disordered) ice cell built by GenIce2.

    The cell is GenIce2's, reduced to its smallest repeat unit where that is
    known (checked atom by atom), then enlarged by the smallest integer
    supercell that is ``min_width`` wide in every direction, so that the
    Γ-point baseline evaluates it without a further supercell. Density is
    GenIce2's default for the phase (its experimental density).

    Parameters
    ----------
    name : str
        A key of :data:`ICE_PHASES` (Ih, Ic, II, IX, XIII, VI, VIII).
    min_width : float, default=7.0
        Smallest perpendicular width of the cell, Å (0 keeps the repeat unit).
    seed : int, default=0
        Seed of GenIce2's proton arrangement (disordered phases only).

    Returns
    -------
    ase.Atoms
        Periodic cell, atoms O, H, H per molecule, molecules whole;
        ``info["ice_phase"]`` and ``info["source"]`` say what it is.
    """
    if name not in ICE_PHASES:
        raise ParameterError(f"unknown ice phase {name!r}; known: {sorted(ICE_PHASES)}")
    phase = ICE_PHASES[name]
    cell = _genice_cell(phase.lattice, tuple(sorted(phase.options)), seed)
    unit = repeat_unit(cell, phase.reduce)
    atoms = wide_cell(unit, min_width) if min_width > 0 else unit
    from importlib.metadata import version

    atoms.info["ice_phase"] = name
    atoms.info["source"] = (
        f"GenIce2 {version('genice2')} lattice {phase.lattice}"
        f"{'[' + ','.join(phase.options) + ']' if phase.options else ''}, seed {seed}: "
        f"{phase.description}"
    )
    return atoms


def genice_water() -> object:
    """GenIce2 rigid-molecule plugin: O on the lattice site, O–H 0.98 Å, H–O–H 104.52°."""
    import genice2.molecules

    class _Water(genice2.molecules.Molecule):
        def __init__(self) -> None:
            half_angle = np.radians(HOH_ANGLE_DEG) / 2.0
            oh_nm = OH_BOND_A / 10.0
            # GenIce2's frame: the molecular bisector along +z, the H atoms in the yz plane.
            self.sites_ = np.array(
                [
                    [0.0, 0.0, 0.0],
                    [0.0, oh_nm * np.sin(half_angle), oh_nm * np.cos(half_angle)],
                    [0.0, -oh_nm * np.sin(half_angle), oh_nm * np.cos(half_angle)],
                ]
            )
            self.labels_ = ["O", "H", "H"]
            self.name_ = "SOL"

    _Water.water = 1  # GenIce2 identifies water plugins by this attribute
    return _Water()


class _GenIceProgressFilter:
    """Logging filter: drops GenIce2's (and genice-core's) records below WARNING."""

    def filter(self, record: logging.LogRecord) -> bool:
        path = str(getattr(record, "pathname", ""))
        level = getattr(record, "levelno", logging.WARNING)
        ours = any(part in ("genice2", "genice_core") for part in Path(path).parts)
        return not (ours and level < logging.WARNING)


@cache
def _genice_cell(lattice: str, options: tuple[str, ...], seed: int) -> Atoms:
    """GenIce2's cell of a lattice at its default density (cached: it is deterministic)."""
    from genice2.genice import GenIce
    from genice2.plugin import Format, Lattice

    # GenIce2 logs its progress at INFO on the root logger: drop those records while
    # it runs (a filter on its own records; the root logger's level is left alone).
    root = logging.getLogger()
    quiet = _GenIceProgressFilter()
    root.addFilter(quiet)
    try:
        np.random.seed(seed)  # noqa: NPY002 -- GenIce2 draws from numpy's global generator
        ice = GenIce(
            Lattice(lattice, **dict.fromkeys(options, True)),
            density=0,
            reshape=np.eye(3, dtype=int),
        )
        # depol="strict": disordered phases get a proton arrangement with no net dipole.
        raw = ice.generate_ice(Format("raw", stage=(1, 7)), water=genice_water(), depol="strict")
        del ice  # it logs "Completed." when it is collected: while the filter is on
    finally:
        root.removeFilter(quiet)
    positions = [np.asarray(p) * 10.0 for u in raw["mols"] for p in u.positions]  # nm → Å
    return Atoms(
        symbols="OHH" * len(positions),
        positions=np.concatenate(positions),
        cell=np.asarray(raw["repcell"]) * 10.0,
        pbc=True,
    )


def repeat_unit(atoms: Atoms, divisors: tuple[int, int, int]) -> Atoms:
    """The repeat unit of a water cell made of translation copies (checked to 1e-6 Å).

    Keeps the molecules (atoms O, H, H, consecutive and whole) whose oxygen lies
    in the first 1/n_k of each axis and checks that every other molecule is one
    of them shifted by a lattice vector of the small cell (its two H atoms in
    either order).

    Parameters
    ----------
    atoms : ase.Atoms
        Periodic water cell, molecules whole.
    divisors : (int, int, int)
        Copies along each cell vector.

    Raises
    ------
    ParameterError
        If the cell is not that many translation copies.
    """
    if divisors == (1, 1, 1):
        return atoms.copy()
    counts = np.array(divisors)
    molecules = atoms.positions.reshape(-1, 3, 3)
    frac = atoms.cell.scaled_positions(molecules[:, 0]) % 1.0
    keep = np.all(frac < 1.0 / counts - 1e-9, axis=1)
    if keep.sum() * counts.prod() != len(molecules):
        raise ParameterError(
            f"{keep.sum()} of {len(molecules)} molecules in the first 1/{divisors} of the "
            "cell: it is not made of that many copies"
        )
    small = atoms.cell.array / counts[:, None]
    kept = molecules[keep]
    for mol in molecules[~keep]:
        found = False
        for order in ([0, 1, 2], [0, 2, 1]):
            delta = mol[order][None] - kept  # (n_kept, 3 atoms, 3)
            shift = np.linalg.solve(small.T, delta.reshape(-1, 3).T).T.reshape(delta.shape)
            whole = np.round(shift[:, :1])  # the O atom fixes the lattice translation
            residual = np.linalg.norm((shift - whole) @ small, axis=2).max(axis=1)
            if residual.min() < 1e-6:
                found = True
                break
        if not found:
            raise ParameterError(
                "a molecule has no copy in the repeat unit: the cell is not "
                f"{divisors} translation copies"
            )
    return Atoms(symbols="OHH" * len(kept), positions=kept.reshape(-1, 3), cell=small, pbc=True)
