"""Structure validation and cell geometry.

This module holds the one validation entry point, :func:`validate_structure`,
that every calculator and every data loader calls before a structure reaches an
engine, plus the small cell-geometry helpers the periodic baseline needs
(perpendicular widths, the smallest wide-enough supercell).

It sits at the bottom of the data flow: it imports only :mod:`deltaml.errors`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import PropertyNotImplementedError
from ase.data import chemical_symbols
from ase.neighborlist import neighbor_list
from ase.stress import full_3x3_to_voigt_6_stress
from ase.units import Hartree
from numpy.typing import NDArray

from deltaml.errors import (
    ChargeMultiplicityError,
    EmptyStructureError,
    NonFiniteGeometryError,
    OverlappingAtomsError,
    SingularCellError,
    UnsupportedElementError,
)

__all__ = [
    "CHARGE_KEY",
    "DEFAULT_MIN_DISTANCE",
    "MULTIPLICITY_KEY",
    "charge_and_multiplicity",
    "composition_counts",
    "electron_count",
    "engine_frame",
    "perpendicular_widths",
    "require_3d_for_stress",
    "resolve_charge",
    "resolve_multiplicity",
    "stress_from_virial",
    "structure_digest",
    "supercell_repeats",
    "to_voigt",
    "validate_structure",
]

#: Default minimum interatomic distance, Å. Shorter than any chemical bond
#: (H2: 0.74 Å) yet long enough to catch duplicated or collapsed atoms.
DEFAULT_MIN_DISTANCE = 0.5

#: A periodic cell whose volume per atom is below this (Å³) is treated as singular.
_MIN_VOLUME_PER_ATOM = 1e-3


def validate_structure(
    atoms: Atoms,
    *,
    supported_elements: Iterable[int] | None = None,
    method_name: str = "this method",
    min_distance: float = DEFAULT_MIN_DISTANCE,
    charge: float | None = None,
    multiplicity: int | None = None,
    f_in_core: bool = False,
) -> None:
    """Check that a structure can be evaluated, raising a specific error if not.

    The checks run in order: empty structure, non-finite positions or cell,
    singular periodic cell, unsupported elements, overlapping atoms (with periodic
    images), and charge/multiplicity against the electron count.

    Parameters
    ----------
    atoms : ase.Atoms
        Structure to check. Positions in Å.
    supported_elements : iterable of int, optional
        Atomic numbers the method supports; ``None`` accepts every element.
    method_name : str, default="this method"
        Name used in the unsupported-element message.
    min_distance : float, default=0.5
        Minimum allowed distance between two atoms (including periodic images), Å.
        ``0`` disables the check.
    charge : float, optional
        Total charge, e. ``None`` skips the electron-count check.
    multiplicity : int, optional
        Spin multiplicity 2S+1. ``None`` means the lowest one compatible with the
        electron count (1 for even, 2 for odd).
    f_in_core : bool, default=False
        Count the electrons as GFN-xTB does, with the 4f shell of Ce–Yb in the
        core (3 valence electrons each), which changes the parity for even Z.

    Raises
    ------
    EmptyStructureError, NonFiniteGeometryError, SingularCellError,
    UnsupportedElementError, OverlappingAtomsError, ChargeMultiplicityError
        Each names the offending atoms, values and what is allowed.
    """
    if len(atoms) == 0:
        raise EmptyStructureError("the structure has no atoms")
    _check_finite(atoms)
    _check_cell(atoms)
    if supported_elements is not None:
        _check_elements(atoms, set(supported_elements), method_name)
    if min_distance > 0:
        _check_distances(atoms, min_distance)
    if charge is not None:
        _check_electrons(atoms, charge, multiplicity, f_in_core)
    elif multiplicity is not None:
        _check_multiplicity_value(multiplicity)


def _check_finite(atoms: Atoms) -> None:
    positions = atoms.positions
    bad = np.flatnonzero(~np.isfinite(positions).all(axis=1))
    if bad.size:
        i = int(bad[0])
        raise NonFiniteGeometryError(
            f"position of atom {i} ({atoms.get_chemical_symbols()[i]}) is not finite: "
            f"{positions[i].tolist()} Å ({bad.size} atom(s) affected)"
        )
    if not np.isfinite(atoms.cell.array).all():
        raise NonFiniteGeometryError(f"the cell is not finite: {atoms.cell.array.tolist()} Å")


def _check_cell(atoms: Atoms) -> None:
    """A periodic direction needs a cell vector independent of the other ones."""
    if not atoms.pbc.any():
        return
    periodic = atoms.cell.array[atoms.pbc]
    # Volume (3D), area (2D) or length (1D) spanned by the periodic vectors.
    measure = float(np.sqrt(max(np.linalg.det(periodic @ periodic.T), 0.0)))
    needed = (_MIN_VOLUME_PER_ATOM * len(atoms)) ** (periodic.shape[0] / 3.0)
    if measure < needed:
        raise SingularCellError(
            f"the cell of a structure periodic along {atoms.pbc.tolist()} is singular: "
            f"its periodic vectors {periodic.tolist()} Å span {measure:.3g} "
            f"(Å^{periodic.shape[0]}); set three independent cell vectors or pbc=False"
        )


def _check_elements(atoms: Atoms, supported: set[int], method_name: str) -> None:
    unknown = sorted(set(atoms.numbers.tolist()) - supported)
    if unknown:
        names = ", ".join(
            f"{chemical_symbols[z] if 0 <= z < len(chemical_symbols) else '?'} (Z={z})"
            for z in unknown
        )
        zmin, zmax = min(supported), max(supported)
        raise UnsupportedElementError(
            f"element(s) {names} not supported by {method_name}, which covers "
            f"Z={zmin}..{zmax} ({chemical_symbols[zmin]}..{chemical_symbols[zmax]})"
        )


#: Molecules up to this size are checked with a dense distance matrix (faster than a
#: neighbour list below a few hundred atoms; this check runs at every MD step).
_DENSE_DISTANCE_LIMIT = 300


#: Geometries (structure digest, minimum distance) whose distance check passed lately.
_DISTANCES_PASSED: dict[tuple[bytes, float], None] = {}


def _check_distances(atoms: Atoms, min_distance: float) -> None:
    if len(atoms) == 1 and not atoms.pbc.any():
        return
    if not atoms.pbc.any() and len(atoms) <= _DENSE_DISTANCE_LIMIT:
        d_all = np.linalg.norm(atoms.positions[:, None] - atoms.positions[None], axis=-1)
        i, j = np.nonzero(np.triu(d_all < min_distance, k=1))
        d = d_all[i, j]
    else:
        # A composite call validates one geometry in each of its terms: the
        # neighbour search of a large or periodic structure is done once.
        key = (structure_digest(hashlib.blake2b(digest_size=16), atoms).digest(), min_distance)
        if key in _DISTANCES_PASSED:
            return
        i, j, d = neighbor_list("ijd", atoms, min_distance, self_interaction=False)
        if not d.size:
            _DISTANCES_PASSED[key] = None
            while len(_DISTANCES_PASSED) > 16:
                _DISTANCES_PASSED.pop(next(iter(_DISTANCES_PASSED)))
    if d.size:
        k = int(np.argmin(d))
        symbols = atoms.get_chemical_symbols()
        a, b = int(i[k]), int(j[k])
        image = " (periodic image)" if a == b else ""
        raise OverlappingAtomsError(
            f"atoms {a} ({symbols[a]}) and {b} ({symbols[b]}){image} are "
            f"{d[k]:.3f} Å apart (minimum {min_distance} Å)"
        )


#: Lanthanides whose 4f electrons GFN-xTB keeps in the core (3 valence electrons).
_F_IN_CORE = range(58, 71)


def electron_count(atoms: Atoms, charge: int, *, f_in_core: bool = False) -> int:
    """Number of electrons of a structure with a total charge (e).

    With ``f_in_core``, each of Ce–Yb counts 3 electrons (GFN-xTB's
    convention); only the parity and the validity of a multiplicity depend on it.
    """
    numbers = atoms.numbers
    if f_in_core:
        in_core = (numbers >= _F_IN_CORE.start) & (numbers < _F_IN_CORE.stop)
        numbers = np.where(in_core, 3, numbers)
    return int(numbers.sum()) - int(charge)


def _check_electrons(
    atoms: Atoms, charge: float, multiplicity: int | None, f_in_core: bool
) -> None:
    if not float(charge).is_integer():
        raise ChargeMultiplicityError(f"total charge must be an integer, got {charge}")
    n_electrons = electron_count(atoms, int(charge), f_in_core=f_in_core)
    if n_electrons < 0:
        raise ChargeMultiplicityError(
            f"charge {int(charge)} leaves {n_electrons} electrons "
            f"(nuclear charge {int(atoms.numbers.sum())})"
        )
    if multiplicity is None:
        return
    _check_multiplicity_value(multiplicity)
    unpaired = int(multiplicity) - 1
    if unpaired > n_electrons or (n_electrons - unpaired) % 2:
        parity = "even" if n_electrons % 2 == 0 else "odd"
        possible = list(range(n_electrons % 2 + 1, n_electrons + 2, 2))
        shown = possible if len(possible) <= 4 else [*possible[:3], "...", possible[-1]]
        allowed = ", ".join(map(str, shown))
        raise ChargeMultiplicityError(
            f"multiplicity {multiplicity} is impossible with charge {int(charge)}: "
            f"{n_electrons} electrons ({parity}) allow multiplicity {allowed}"
        )


def _check_multiplicity_value(multiplicity: float) -> None:
    if int(multiplicity) != multiplicity or multiplicity < 1:
        raise ChargeMultiplicityError(
            f"multiplicity must be a positive integer (2S+1), got {multiplicity}"
        )


#: Keys of ``atoms.info`` that give the total charge (e) and the multiplicity 2S+1.
CHARGE_KEY = "charge"
MULTIPLICITY_KEY = "multiplicity"


def _info_value(atoms: Atoms, key: str) -> float | None:
    """``atoms.info[key]`` as a number, or None; a non-number is an error."""
    value = atoms.info.get(key)
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise ChargeMultiplicityError(
            f"atoms.info[{key!r}] must be a number, got {value!r}"
        ) from exc


def _integral(value: float, what: str) -> int:
    rounded = round(float(value))
    if abs(value - rounded) > 1e-6:
        raise ChargeMultiplicityError(f"{what} must be an integer, got {float(value)} e")
    return int(rounded)


def resolve_charge(atoms: Atoms, charge: float | None = None) -> int:
    """Total charge (e) of a structure, by the one rule every calculator and loader uses.

    In order: the given ``charge`` (a calculator's or the command line's
    explicit value), then ``atoms.info["charge"]`` (as extxyz files carry it),
    then the sum of the initial charges (``tblite/ase.py``'s convention).
    An explicit value wins over the initial charges (they may be partial charges
    from an earlier calculation), but never silently over ``info``.

    Raises
    ------
    ChargeMultiplicityError
        A non-integer total; an explicit charge that disagrees with
        ``info["charge"]``; an ``info["charge"]`` that disagrees with initial
        charges that are set (not all zero) and sum to another value.
    """
    info = _info_value(atoms, CHARGE_KEY)
    initial = atoms.get_initial_charges()
    if charge is not None:
        total = _integral(float(charge), "total charge")
        if info is not None and abs(info - total) > 1e-6:
            raise ChargeMultiplicityError(
                f"charge {total} given, but the structure says charge={info:g} "
                "(atoms.info['charge']): remove one of them or make them agree"
            )
        return total
    if info is not None:
        total = _integral(info, "atoms.info['charge']")
        if np.any(initial != 0) and abs(initial.sum() - total) > 1e-6:
            raise ChargeMultiplicityError(
                f"atoms.info['charge'] is {total} but the initial charges sum to "
                f"{float(initial.sum()):g} e: remove one of them or make them agree"
            )
        return total
    return _integral(float(initial.sum()), "total charge")


def resolve_multiplicity(
    atoms: Atoms, charge: int, multiplicity: int | None = None, *, f_in_core: bool = False
) -> int:
    """Spin multiplicity 2S+1 of a structure, by the same rule as :func:`resolve_charge`.

    In order: the given ``multiplicity``, then ``atoms.info["multiplicity"]``,
    then the initial magnetic moments (|Σ m| unpaired electrons); with none of
    them, the lowest multiplicity compatible with the electron count (1 for an
    even, 2 for an odd number of electrons).

    Raises
    ------
    ChargeMultiplicityError
        An explicit multiplicity that disagrees with ``info["multiplicity"]``,
        or an ``info["multiplicity"]`` that disagrees with magnetic moments
        that are set (not all zero).
    """
    info = _info_value(atoms, MULTIPLICITY_KEY)
    moments = atoms.get_initial_magnetic_moments()
    if multiplicity is not None:
        if info is not None and info != multiplicity:
            raise ChargeMultiplicityError(
                f"multiplicity {multiplicity} given, but the structure says "
                f"multiplicity={info:g} (atoms.info['multiplicity']): remove one of them "
                "or make them agree"
            )
        return int(multiplicity)
    unpaired = int(np.rint(abs(moments.sum())))
    if info is not None:
        if np.any(moments != 0) and unpaired + 1 != info:
            raise ChargeMultiplicityError(
                f"atoms.info['multiplicity'] is {info:g} but the initial magnetic moments "
                f"give {unpaired} unpaired electron(s) (multiplicity {unpaired + 1}): "
                "remove one of them or make them agree"
            )
        _check_multiplicity_value(info)
        return int(info)
    n_electrons = electron_count(atoms, charge, f_in_core=f_in_core)
    if unpaired == 0 and n_electrons % 2:
        unpaired = 1
    return unpaired + 1


def charge_and_multiplicity(
    atoms: Atoms, charge: float | None = None, multiplicity: int | None = None
) -> tuple[int, int]:
    """Charge (e) and 2S+1 of a structure: :func:`resolve_charge`, :func:`resolve_multiplicity`.

    The given values first, then ``atoms.info["charge"]``/``["multiplicity"]``,
    then the initial charges and magnetic moments; conflicts are errors.
    """
    total = resolve_charge(atoms, charge)
    return total, resolve_multiplicity(atoms, total, multiplicity)


def perpendicular_widths(cell: NDArray[np.float64]) -> NDArray[np.float64]:
    """Distances between opposite faces of a cell, Å.

    Parameters
    ----------
    cell : ndarray of shape (3, 3)
        Cell vectors as rows, Å.

    Returns
    -------
    ndarray of shape (3,)
        ``V / |a_j × a_k|`` for each cell vector ``a_i``: the width of the cell
        perpendicular to the two other vectors, Å.
    """
    cell = np.asarray(cell, dtype=float)
    volume = abs(np.linalg.det(cell))
    areas = np.array(
        [np.linalg.norm(np.cross(cell[(i + 1) % 3], cell[(i + 2) % 3])) for i in range(3)]
    )
    return volume / areas


def supercell_repeats(
    cell: NDArray[np.float64], pbc: NDArray[np.bool_], min_width: float
) -> tuple[int, int, int]:
    """Smallest diagonal supercell whose perpendicular widths all reach ``min_width``.

    Parameters
    ----------
    cell : ndarray of shape (3, 3)
        Cell vectors as rows, Å.
    pbc : ndarray of shape (3,) of bool
        Periodic directions; non-periodic ones are never repeated.
    min_width : float
        Minimum perpendicular width, Å. ``0`` gives ``(1, 1, 1)``.

    Returns
    -------
    tuple of three int
        Repeats along the three cell vectors.
    """
    pbc = np.asarray(pbc, dtype=bool)
    if min_width <= 0 or not pbc.any():
        return (1, 1, 1)
    if pbc.all():
        widths = perpendicular_widths(cell)
    else:
        # Non-periodic vectors may be zero; give them unit length to measure widths.
        filled = np.asarray(cell, dtype=float).copy()
        normals = _complement(filled[pbc], int((~pbc).sum()))
        for axis, normal in zip(np.flatnonzero(~pbc), normals, strict=True):
            filled[axis] = normal
        widths = perpendicular_widths(filled)
    repeats = np.where(pbc, np.ceil(min_width / widths - 1e-9), 1).astype(int)
    return tuple(int(max(r, 1)) for r in repeats)


#: Room left around a structure along a non-periodic direction in :func:`engine_frame`, Å.
_FRAME_MARGIN = 5.0


def _complement(periodic: NDArray[np.float64], count: int) -> NDArray[np.float64]:
    """Orthonormal vectors perpendicular to the rows of ``periodic``."""
    return np.linalg.svd(np.atleast_2d(periodic))[2][len(periodic) :][:count]


def engine_frame(atoms: Atoms) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Positions and cell to hand an engine for a partially periodic structure, Å.

    Engines wrap positions into the cell along every cell vector, periodic or not
    (simple-dftd3 then moves an atom below a slab by a whole cell vector), and a
    zero vector along a non-periodic direction gives NaN or a failed
    diagonalisation. Along each non-periodic direction the cell vector is
    therefore replaced by one perpendicular to the periodic vectors and longer
    than the structure, and all atoms are translated into the cell along it.
    A rigid translation changes neither energy nor forces; periodic vectors are
    untouched. Fully periodic and non-periodic structures are returned as they are.

    Parameters
    ----------
    atoms : ase.Atoms
        Structure, Å.

    Returns
    -------
    positions : ndarray of shape (n_atoms, 3)
        Cartesian positions, Å (a rigid translation of ``atoms.positions``).
    cell : ndarray of shape (3, 3)
        Cell vectors as rows, Å.
    """
    pbc = atoms.pbc
    positions = atoms.positions
    cell = atoms.cell.array
    if pbc.all() or not pbc.any():
        return positions, cell
    cell = cell.copy()
    shift = np.zeros(3)
    normals = _complement(cell[pbc], int((~pbc).sum()))
    for axis, normal in zip(np.flatnonzero(~pbc), normals, strict=True):
        height = positions @ normal
        cell[axis] = normal * (np.ptp(height) + 2 * _FRAME_MARGIN)
        shift += normal * (_FRAME_MARGIN - height.min())
    if np.linalg.det(cell) < 0:  # keep a right-handed cell
        axis = np.flatnonzero(~pbc)[-1]
        shift -= cell[axis]
        cell[axis] = -cell[axis]
    return positions + shift, cell


def require_3d_for_stress(atoms: Atoms, properties: list[str]) -> None:
    """Refuse a stress request unless the cell is periodic in all three directions.

    Raises
    ------
    ase.calculators.calculator.PropertyNotImplementedError
        For molecules, wires and slabs, where the stress is ill-defined.
    """
    if "stress" in properties and not atoms.pbc.all():
        raise PropertyNotImplementedError(
            "stress is only defined for cells periodic in all three directions"
        )


def stress_from_virial(virial: NDArray[np.float64], volume: float) -> NDArray[np.float64]:
    """Stress in ASE's convention from an engine's virial.

    Parameters
    ----------
    virial : ndarray of shape (3, 3)
        Virial, Eh (as tblite and simple-dftd3 return it).
    volume : float
        Volume of the cell the virial belongs to, Å³.

    Returns
    -------
    ndarray of shape (6,)
        Stress, eV/Å³, Voigt order xx, yy, zz, yz, xz, xy.
    """
    return to_voigt(np.asarray(virial) * Hartree / volume)


#: ASE's Voigt order (xx, yy, zz, yz, xz, xy) as row and column indices of a 3×3
#: tensor, for arrays with more axes than :func:`to_voigt` takes.
VOIGT_INDICES = (np.array([0, 1, 2, 1, 0, 0]), np.array([0, 1, 2, 2, 2, 1]))


def to_voigt(tensor: Any) -> NDArray[np.float64]:
    """A stress or virial in ASE's Voigt order; a 6-vector is returned as it is.

    Parameters
    ----------
    tensor : array_like of shape (3, 3) or (6,)
        Symmetric tensor (any units).

    Returns
    -------
    ndarray of shape (6,)
        xx, yy, zz, yz, xz, xy (off-diagonal pairs averaged, as ASE does).
    """
    tensor = np.asarray(tensor, dtype=float)
    if tensor.shape == (6,):
        return tensor
    if tensor.shape != (3, 3):
        raise ValueError(f"a stress must have shape (3, 3) or (6,), got {tensor.shape}")
    return full_3x3_to_voigt_6_stress(tensor)


def composition_counts(frames: Sequence[Atoms], species: Sequence[int]) -> NDArray[np.float64]:
    """Number of atoms of each element per structure (n_frames × n_species).

    Raises
    ------
    UnsupportedElementError
        A structure holds an element outside ``species``.
    """
    index = {int(z): k for k, z in enumerate(species)}
    counts = np.zeros((len(frames), len(species)))
    for row, atoms in enumerate(frames):
        for z in atoms.numbers:
            if int(z) not in index:
                raise UnsupportedElementError(
                    f"element {chemical_symbols[int(z)]} is not among the species "
                    f"{[chemical_symbols[s] for s in species]}"
                )
            counts[row, index[int(z)]] += 1
    return counts


#: Decimals of positions and cells (Å) in a structure's hash: 1e-6 Å, far below any
#: physical difference and above the round-off of a file round trip.
HASH_DECIMALS = 6

#: Decimals of positions in an extxyz file (ASE writes ``%16.8f``; cells in full).
FILE_DECIMALS = 8


def structure_digest(digest: Any, atoms: Atoms) -> Any:
    """Feed a structure into a hashlib digest: the one structure hash of deltaml.

    Atomic numbers, positions and cell rounded to :data:`HASH_DECIMALS` (−0.0
    counted as 0.0, so that the sign of a zero changes nothing), and the
    periodicity. Coordinates are first rounded to the :data:`FILE_DECIMALS` an
    extxyz file keeps: rounding straight to 1e-6 Å would send a coordinate within
    5e-9 Å of a rounding boundary (1 % of them, so most cells of a hundred atoms)
    to the other side once written and read back, and the label of a generated
    structure would not be found under its exported key. Label keys
    (:func:`deltaml.store.label_key`), ranking keys and the training-set hash of a
    model are built on it.

    Returns
    -------
    The digest, updated (for chaining).
    """
    digest.update(np.asarray(atoms.numbers, dtype=np.int64).tobytes())
    for array in (atoms.positions, atoms.cell.array):
        rounded = np.round(np.round(array, FILE_DECIMALS), HASH_DECIMALS) + 0.0
        digest.update(rounded.astype(np.float64).tobytes())
    digest.update(np.asarray(atoms.pbc, dtype=bool).tobytes())
    return digest
