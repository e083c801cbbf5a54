"""Periodic reference method: an ASE calculator over CP2K (GPW), for crystals and molecules.

Beside :class:`~deltaml.reference.PySCFReference` (molecules, Gaussian basis, all
electrons), :class:`CP2KReference` computes reference labels of periodic cells with
CP2K's Gaussian-and-plane-waves method: GTH pseudopotentials, MOLOPT basis sets, a
plane-wave density cutoff. GGA functionals are given by name (default revPBE,
dispersion-free, whose D3(BJ) partner ``"d3bj:revpbe"`` is recorded so that the
composite's D3 term completes it; PBE too); the hybrids PBE0 and revPBE0 use a
truncated Coulomb operator, with the auxiliary density matrix method (ADMM) as an
option that makes them affordable for small cells. Energy, forces and the analytic
stress tensor come from one ``cp2k.psmp`` run per structure, in a work folder
(temporary unless given); its MPI ranks and OpenMP threads are parameters.

Isolated molecules (no periodic direction) are computed at the same level in a
cubic box with the Martyna–Tuckerman Poisson solver (``POISSON PERIODIC NONE``,
``PSOLVER MT``), so that lattice energies ``E_crystal / N − E_molecule`` compare
like with like. The box is ``vacuum_a`` wider than the molecule on every side; see
``benchmarks/bench_cp2k_reference.py`` for the convergence of both the cutoff
(Pulay stress) and the box.

Data flow: structures → **reference** → labelled data (store).
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.data import chemical_symbols
from ase.units import Bohr, GPa, Hartree

from deltaml.errors import (
    EngineError,
    ParameterError,
    SCFConvergenceError,
    UnsupportedCapabilityError,
    UnsupportedElementError,
)
from deltaml.structures import (
    DEFAULT_MIN_DISTANCE,
    perpendicular_widths,
    resolve_charge,
    resolve_multiplicity,
    validate_structure,
)

__all__ = ["CP2K_FUNCTIONALS", "CP2KReference", "cp2k_available"]

#: Functionals by name: (CP2K PBE PARAMETRIZATION, exact-exchange fraction).
CP2K_FUNCTIONALS: dict[str, tuple[str, float]] = {
    "pbe": ("ORIG", 0.0),
    "revpbe": ("REVPBE", 0.0),
    "pbe0": ("ORIG", 0.25),
    "revpbe0": ("REVPBE", 0.25),
}

#: Files of the CP2K data directory that hold the basis sets and pseudopotentials.
_BASIS_FILES = ("BASIS_MOLOPT",)
_ADMM_BASIS_FILES = ("BASIS_ADMM", "BASIS_ADMM_MOLOPT")
_POTENTIAL_FILE = "GTH_POTENTIALS"

#: MPI launcher of a calculation with ``mpi_ranks > 1`` (``{ranks}``: the count).
_MPI_COMMAND = "mpiexec -n {ranks}"

#: Largest displacement (Å) of any atom from a kept run for its wavefunction to be reused.
GUESS_MAX_SHIFT = 1.0

#: Wavefunctions of earlier runs a calculator keeps (each ~1 MB for 50 atoms).
GUESS_KEEP = 32

#: Largest relative change of the cell (max |ΔC| / max |C|) for a wavefunction to be reused.
_GUESS_MAX_STRAIN = 0.1

#: Parameters that do not change the wavefunction (any other change forbids reusing it).
_NOT_WAVEFUNCTION = frozenset(
    {"command", "mpi_ranks", "omp_threads", "mpi_command", "workdir", "reuse_guess",
     "min_distance"}
)  # fmt: skip

#: Wavefunction files: the one a run starts from, the one CP2K writes (PROJECT deltaml).
_GUESS_FILE = "guess.wfn"
_WAVEFUNCTION_FILE = "deltaml-RESTART.wfn"

_ENERGY = re.compile(r"ENERGY\| Total FORCE_EVAL \( QS \) energy \[a\.u\.\]:\s+(\S+)")
_SCF_FAILED = ("SCF run NOT converged", "outer SCF loop FAILED")


def _shift(last: dict[str, Any], now: dict[str, Any]) -> float:
    """Largest displacement (Å) of an atom from run ``last`` to run ``now``, or ∞ where
    the wavefunction of ``last`` cannot start ``now``: other atoms or their order,
    charge, multiplicity or settings, or a cell changed by more than
    ``_GUESS_MAX_STRAIN``. Periodic cells: the nearest image, in fractional
    coordinates of the new cell."""
    same = (
        last["pbc"] == now["pbc"]
        and last["charge_multiplicity"] == now["charge_multiplicity"]
        and last["settings"] == now["settings"]
        and np.array_equal(last["numbers"], now["numbers"])
    )
    cell = now["cell"]
    if not same or np.abs(last["cell"] - cell).max() > _GUESS_MAX_STRAIN * np.abs(cell).max():
        return float("inf")
    shift = now["positions"] - last["positions"]
    if now["pbc"]:
        fractional = np.linalg.solve(cell.T, shift.T).T
        shift = (fractional - np.round(fractional)) @ cell
    return float(np.linalg.norm(shift, axis=1).max())


def cp2k_available(command: str = "cp2k.psmp") -> bool:
    """Whether the CP2K executable ``command`` is on the ``PATH``."""
    return shutil.which(command) is not None


@functools.lru_cache(maxsize=8)
def _version_text(command: str) -> str:
    """Output of ``command --version`` (cached: one call per executable)."""
    if shutil.which(command) is None:
        raise EngineError(
            f"cp2k: executable {command!r} not found; install CP2K (Debian: "
            "apt-get install cp2k) or give its path as command"
        )
    try:
        done = subprocess.run(
            [command, "--version"], capture_output=True, text=True, timeout=120, check=True
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise EngineError(f"cp2k: {command} --version failed: {exc}") from exc
    return done.stdout


def _engine_version(command: str) -> str:
    match = re.search(r"CP2K version\s+(\S+)", _version_text(command))
    if match is None:
        raise EngineError(f"cp2k: no version in the output of {command} --version")
    return match.group(1)


def _data_dir(command: str, data_dir: str | None) -> Path:
    """CP2K's data directory: given, else $CP2K_DATA_DIR, else the one compiled in."""
    if data_dir is None:
        data_dir = os.environ.get("CP2K_DATA_DIR")
    if data_dir is None:
        match = re.search(r'__DATA_DIR="([^"]+)"', _version_text(command).replace("\n", ""))
        data_dir = match.group(1) if match else None
    if data_dir is None or not Path(data_dir, _POTENTIAL_FILE).is_file():
        raise ParameterError(
            f"CP2K data directory {data_dir!r} has no {_POTENTIAL_FILE}; set data_dir or "
            "CP2K_DATA_DIR to the folder holding BASIS_MOLOPT and GTH_POTENTIALS"
        )
    return Path(data_dir)


@functools.lru_cache(maxsize=16)
def _named_sets(path: str) -> dict[str, dict[str, str]]:
    """``{name: {element: first name of its entry}}`` of a CP2K basis or potential file.

    An entry starts with a line ``Element NAME [ALIAS ...]``; every name and alias
    is listed, so that ``GTH-PBE`` finds ``GTH-PBE-q6`` for oxygen.
    """
    found: dict[str, dict[str, str]] = {}
    for line in Path(path).read_text(encoding="latin-1").splitlines():
        tokens = line.split()
        if len(tokens) < 2 or tokens[0] not in chemical_symbols[1:]:
            continue
        if tokens[1][0].isdigit() or tokens[1][0] in "-.":
            continue  # a line of numbers
        for name in tokens[1:]:
            found.setdefault(name.upper(), {}).setdefault(tokens[0], tokens[1])
    return found


def _lookup(data: Path, files: tuple[str, ...]) -> dict[str, dict[str, str]]:
    merged: dict[str, dict[str, str]] = {}
    for name in files:
        if (data / name).is_file():
            for key, elements in _named_sets(str(data / name)).items():
                merged.setdefault(key, {}).update(elements)
    return merged


def _check_parameters(values: dict[str, Any]) -> None:
    """Refuse unknown functionals and invalid numbers before they are stored."""
    if "xc" in values and str(values["xc"]).lower() not in CP2K_FUNCTIONALS:
        raise ParameterError(
            f"unknown CP2K functional {values['xc']!r}; choose one of {sorted(CP2K_FUNCTIONALS)}"
        )
    for key in (
        "cutoff_ry",
        "rel_cutoff_ry",
        "eps_scf",
        "eps_default",
        "max_scf",
        "max_outer_scf",
        "vacuum_a",
        "hfx_cutoff_radius_a",
        "mpi_ranks",
        "omp_threads",
    ):
        if key in values and not values[key] > 0:
            raise ParameterError(f"{key} must be positive, got {values[key]!r}")
    for key in ("mpi_ranks", "omp_threads", "max_scf", "max_outer_scf"):
        if key in values and int(values[key]) != values[key]:
            raise ParameterError(f"{key} must be an integer, got {values[key]!r}")


class CP2KReference(Calculator):
    r"""GGA or hybrid DFT reference for periodic cells and molecules through CP2K (GPW).

    ===================== ===================== ==== =========================================
     Keyword               Default               Unit Description
    ===================== ===================== ==== =========================================
     xc                    "revpbe"              -    pbe, revpbe, pbe0, revpbe0 (D3: d3bj:<xc>)
     basis                 "DZVP-MOLOPT-SR-GTH"  -    MOLOPT basis set (BASIS_MOLOPT name)
     pseudopotential       "GTH-PBE"             -    GTH family (GTH_POTENTIALS), per element
     cutoff_ry             600.0                 Ry   plane-wave cutoff of the finest grid
     rel_cutoff_ry         60.0                  Ry   cutoff that maps Gaussians to grids
     eps_default           1e-12                 -    CP2K QS EPS_DEFAULT (integral screening)
     eps_scf               1e-07                 Eh   SCF convergence (OT, outer loop too)
     max_scf               10                    -    SCF iterations per outer loop
     max_outer_scf         20                    -    outer SCF loops
     admm_basis            None                  -    hybrids: ADMM auxiliary basis (cFIT3)
     hfx_cutoff_radius_a   6.0                   Å    hybrids: truncated Coulomb radius
     vacuum_a              6.0                   Å    molecules: box margin on every side
     charge                None                  e    total charge; None: from the structure
     multiplicity          None                  -    2S+1; None: from the structure
     min_distance          0.5                   Å    closest allowed interatomic distance
     command               "cp2k.psmp"           -    CP2K executable
     mpi_ranks             1                     -    MPI ranks of one calculation
     omp_threads           1                     -    OpenMP threads per rank
     mpi_command           None                  -    launcher if mpi_ranks > 1; None: mpiexec
     workdir               None                  -    folder of the work files; None: temporary
     data_dir              None                  -    CP2K data; None: CP2K_DATA_DIR or built in
     reuse_guess           True                  -    start the SCF from the last similar run
    ===================== ===================== ==== =========================================

    A structure periodic in all three directions is computed in its cell
    (``PERIODIC XYZ``); one periodic in none is centred in a cubic box
    ``vacuum_a`` wider than it on every side and computed with the
    Martyna–Tuckerman Poisson solver (no stress). Partly periodic structures are
    refused. Open shells (multiplicity > 1) are unrestricted (UKS).

    With ``reuse_guess`` the SCF starts from the converged wavefunction of the
    nearest of this calculator's last ``GUESS_KEEP`` runs that had the same atoms in
    the same order, charge, multiplicity and settings, and a similar structure (cell
    within 10 %, no atom moved by more than ``GUESS_MAX_SHIFT`` Å): a rattled or
    strained copy of a cell, the next MD frame. It is a starting point only,
    converged to the same ``eps_scf``, so it is not part of the method record; the
    SCF steps it saves are measured in ``benchmarks/README.md``. Otherwise the guess
    is CP2K's ``ATOMIC``.

    Why ``max_scf=10``: every outer loop rebuilds the OT preconditioner from the
    current density, and one built from the atomic guess converges slowly (the
    last decade of the gradient at ~0.93 per step). On the ice Ih start (48
    atoms, atomic guess) 50 inner steps per loop took 54 steps, 20 took 29, 15
    took 24, 10 took 21 (same energy to 2·10⁻¹² Eh, stress to 10⁻⁶ of itself;
    ``benchmarks/README.md``). Neither is part of the method record: they change
    the path to the same ``eps_scf``, not the label.

    Results: ``energy``/``free_energy`` (eV), ``forces`` (eV/Å) and, for periodic
    cells, ``stress`` (eV/Å³, Voigt order, ASE's sign: positive is tensile),
    all analytic, from one run that computes everything asked. An SCF that does not
    converge raises :class:`~deltaml.errors.SCFConvergenceError`; a number is never
    returned from an unconverged SCF.

    Examples
    --------
    >>> from ase.io import read
    >>> crystal = read("data/crystals/co2_pa3.extxyz")
    >>> crystal.calc = CP2KReference(omp_threads=2)
    >>> stress = crystal.get_stress()  # eV/Å³
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    default_parameters: dict[str, Any] = {
        "xc": "revpbe",
        "basis": "DZVP-MOLOPT-SR-GTH",
        "pseudopotential": "GTH-PBE",
        "cutoff_ry": 600.0,
        "rel_cutoff_ry": 60.0,
        "eps_default": 1e-12,
        "eps_scf": 1e-7,
        "max_scf": 10,
        "max_outer_scf": 20,
        "admm_basis": None,
        "hfx_cutoff_radius_a": 6.0,
        "vacuum_a": 6.0,
        "charge": None,
        "multiplicity": None,
        "min_distance": DEFAULT_MIN_DISTANCE,
        "command": "cp2k.psmp",
        "mpi_ranks": 1,
        "omp_threads": 1,
        "mpi_command": None,
        "workdir": None,
        "data_dir": None,
        "reuse_guess": True,
    }

    def __init__(self, **kwargs: Any) -> None:
        Calculator.__init__(self, **kwargs)
        self._check_data()
        # the last converged runs, newest last: what each computed, and its wavefunction
        self._guesses: list[tuple[dict[str, Any], bytes]] = []

    def set(self, **kwargs: Any) -> dict:
        """Set parameters, refusing unknown functionals and basis sets at once."""
        if "xc" in kwargs:
            kwargs["xc"] = str(kwargs["xc"]).lower()
        for key in ("basis", "pseudopotential"):
            if key in kwargs:
                kwargs[key] = str(kwargs[key]).upper()
        _check_parameters(kwargs)
        changed = Calculator.set(self, **kwargs)
        if changed:
            self.reset()
            if hasattr(self, "_data"):  # after __init__: check the new names now
                self._check_data()
        return changed

    def _check_data(self) -> None:
        """Refuse basis sets and pseudopotentials that CP2K's data files lack."""
        p = self.parameters
        self._data = _data_dir(p.command, p.data_dir)
        checks = [
            ("basis", p.basis, _BASIS_FILES),
            ("pseudopotential", p.pseudopotential, (_POTENTIAL_FILE,)),
        ]
        if p.admm_basis is not None:
            checks.append(("admm_basis", p.admm_basis, _ADMM_BASIS_FILES))
        for key, name, files in checks:
            if str(name).upper() not in _lookup(self._data, files):
                raise ParameterError(
                    f"unknown {key} {name!r}: not in {', '.join(files)} of {self._data}"
                )
        if p.admm_basis is not None and CP2K_FUNCTIONALS[p.xc][1] == 0.0:
            raise ParameterError(
                f"admm_basis {p.admm_basis!r} is for hybrid functionals; {p.xc!r} has no "
                "exact exchange (use admm_basis=None)"
            )

    def record(self) -> dict[str, Any]:
        """Method record by value (JSON-serialisable): code, version and settings."""
        p = self.parameters
        hybrid = CP2K_FUNCTIONALS[p.xc][1] > 0.0
        return {
            "term": "reference",
            "code": "cp2k",
            "engine_version": _engine_version(p.command),
            "method": "dft",
            "xc": p.xc,
            "parametrization": CP2K_FUNCTIONALS[p.xc][0],
            "exact_exchange": CP2K_FUNCTIONALS[p.xc][1],
            "basis": str(p.basis).upper(),
            "pseudopotential": str(p.pseudopotential).upper(),
            "cutoff_ry": float(p.cutoff_ry),
            "rel_cutoff_ry": float(p.rel_cutoff_ry),
            "eps_default": float(p.eps_default),
            "eps_scf": float(p.eps_scf),
            "poisson": {"periodic": "periodic xyz", "isolated": "mt"},
            "vacuum_a": float(p.vacuum_a),
            "admm": None if p.admm_basis is None else str(p.admm_basis),
            "hfx_cutoff_radius_a": float(p.hfx_cutoff_radius_a) if hybrid else None,
            "dispersion_partner": f"d3bj:{p.xc}",
        }

    def calculate(
        self,
        atoms: Atoms | None = None,
        properties: list[str] | None = None,
        system_changes: list[str] = all_changes,
    ) -> None:
        """Run CP2K once and fill ``energy``, ``forces`` and (periodic cells) ``stress``."""
        properties = properties or ["energy"]
        Calculator.calculate(self, atoms, properties, system_changes)
        atoms, p = self.atoms, self.parameters
        periodic = bool(atoms.pbc.all())
        if atoms.pbc.any() and not periodic:
            raise UnsupportedCapabilityError(
                f"CP2KReference computes cells periodic in all three directions or none; "
                f"got pbc={atoms.pbc.tolist()}"
            )
        if "stress" in properties and not periodic:
            raise PropertyNotImplementedError(
                "CP2KReference gives no stress for a molecule (no periodic direction)"
            )
        charge = resolve_charge(atoms, p.charge)
        multiplicity = resolve_multiplicity(atoms, charge, p.multiplicity)
        validate_structure(
            atoms, min_distance=p.min_distance, charge=charge, multiplicity=multiplicity
        )
        if periodic:
            cell, positions = atoms.cell.array, atoms.positions
            if CP2K_FUNCTIONALS[p.xc][1] > 0.0:
                self._check_hfx_radius(cell)
        else:
            cell, positions = self._box(atoms.positions)
        kinds = self._kinds(atoms)
        state = self._state(atoms, positions, cell, charge, multiplicity)
        guess = self._closest_guess(state)
        text = self._input(
            atoms.get_chemical_symbols(),
            positions,
            cell,
            periodic,
            charge,
            multiplicity,
            kinds,
            want_forces="forces" in properties or "stress" in properties,
            want_stress="stress" in properties,
            guess=guess is not None,
        )
        output, wavefunction = self._run(text, guess)
        self._parse(output, len(atoms), "stress" in properties)
        if p.reuse_guess and wavefunction is not None:
            self._guesses = [*self._guesses[-(GUESS_KEEP - 1) :], (state, wavefunction)]

    def _closest_guess(self, state: dict[str, Any]) -> bytes | None:
        """The wavefunction of the kept run nearest to ``state`` among the similar ones."""
        if not self.parameters.reuse_guess:
            return None
        shifts = [(_shift(last, state), wfn) for last, wfn in self._guesses]
        usable = [(shift, wfn) for shift, wfn in shifts if shift <= GUESS_MAX_SHIFT]
        return min(usable, key=lambda item: item[0])[1] if usable else None

    def _state(
        self, atoms: Atoms, positions: np.ndarray, cell: np.ndarray, charge: int, mult: int
    ) -> dict[str, Any]:
        """What a wavefunction was computed for: atoms, structure, charge, settings."""
        settings = {k: v for k, v in self.parameters.items() if k not in _NOT_WAVEFUNCTION}
        return {
            "numbers": atoms.numbers.copy(),
            "pbc": bool(atoms.pbc.all()),
            "positions": np.array(positions, dtype=float),
            "cell": np.array(cell, dtype=float),
            "charge_multiplicity": (int(charge), int(mult)),
            "settings": repr(sorted(settings.items())),
        }

    # -- input -----------------------------------------------------------------

    def _box(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cubic box ``vacuum_a`` wider than the molecule on every side, molecule centred."""
        extent = np.ptp(positions, axis=0)
        side = float(extent.max()) + 2.0 * float(self.parameters.vacuum_a)
        centred = positions - positions.min(axis=0) - extent / 2 + side / 2
        return np.eye(3) * side, centred

    def _check_hfx_radius(self, cell: np.ndarray) -> None:
        radius = float(self.parameters.hfx_cutoff_radius_a)
        half = float(perpendicular_widths(cell).min()) / 2
        if radius > half:
            raise UnsupportedCapabilityError(
                f"truncated Coulomb radius {radius} Å exceeds half the narrowest cell width "
                f"({half:.3f} Å); lower hfx_cutoff_radius_a (a different method record) "
                "or use a supercell"
            )

    def _kinds(self, atoms: Atoms) -> dict[str, tuple[str, str, str | None]]:
        """``{element: (basis, potential, ADMM basis)}`` as CP2K names them."""
        p = self.parameters
        bases = _lookup(self._data, _BASIS_FILES)[str(p.basis).upper()]
        potentials = _lookup(self._data, (_POTENTIAL_FILE,))
        admm = None if p.admm_basis is None else _lookup(self._data, _ADMM_BASIS_FILES)
        kinds = {}
        for element in dict.fromkeys(atoms.get_chemical_symbols()):
            if element not in bases:
                raise UnsupportedElementError(
                    f"basis {p.basis} has no functions for {element} in {self._data}"
                )
            # the basis is made for one valence count: take the potential that matches it
            valence = re.search(r"-Q(\d+)$", bases[element].upper())
            family = str(p.pseudopotential).upper()
            name = f"{family}-Q{valence.group(1)}" if valence else family
            if element not in potentials.get(name, {}):
                raise UnsupportedElementError(
                    f"no pseudopotential {name} for {element} in {self._data / _POTENTIAL_FILE}"
                )
            aux = None
            if admm is not None:
                if element not in admm[str(p.admm_basis).upper()]:
                    raise UnsupportedElementError(
                        f"ADMM basis {p.admm_basis} has no functions for {element}"
                    )
                aux = admm[str(p.admm_basis).upper()][element]
            kinds[element] = (bases[element], potentials[name][element], aux)
        return kinds

    def _input(
        self,
        symbols: list[str],
        positions: np.ndarray,
        cell: np.ndarray,
        periodic: bool,
        charge: int,
        multiplicity: int,
        kinds: dict[str, tuple[str, str, str | None]],
        *,
        want_forces: bool,
        want_stress: bool,
        guess: bool = False,
    ) -> str:
        """CP2K input (Å, Ry, Hartree as CP2K reads them); with ``guess`` the SCF
        starts from the wavefunction file ``guess.wfn`` of the work folder."""
        p = self.parameters
        parametrization, exact = CP2K_FUNCTIONALS[p.xc]
        lines = [
            "&GLOBAL",
            "  PROJECT deltaml",
            f"  RUN_TYPE {'ENERGY_FORCE' if want_forces else 'ENERGY'}",
            "  PRINT_LEVEL LOW",
            "&END GLOBAL",
            "&FORCE_EVAL",
            "  METHOD QUICKSTEP",
        ]
        if want_stress:
            lines.append("  STRESS_TENSOR ANALYTICAL")
        lines += [
            "  &DFT",
            *(f"    BASIS_SET_FILE_NAME {name}" for name in _BASIS_FILES),
        ]
        if p.admm_basis is not None:
            lines += [f"    BASIS_SET_FILE_NAME {name}" for name in _ADMM_BASIS_FILES]
        lines += [
            f"    POTENTIAL_FILE_NAME {_POTENTIAL_FILE}",
            f"    CHARGE {charge}",
            f"    MULTIPLICITY {multiplicity}",
            *(["    UKS"] if multiplicity > 1 else []),
            "    &MGRID",
            f"      CUTOFF {float(p.cutoff_ry)}",
            f"      REL_CUTOFF {float(p.rel_cutoff_ry)}",
            "    &END MGRID",
            "    &QS",
            f"      EPS_DEFAULT {float(p.eps_default):.3E}",
            "    &END QS",
            "    &POISSON",
            f"      PERIODIC {'XYZ' if periodic else 'NONE'}",
            f"      PSOLVER {'PERIODIC' if periodic else 'MT'}",
            "    &END POISSON",
            *([f"    WFN_RESTART_FILE_NAME {_GUESS_FILE}"] if guess else []),
            "    &SCF",
            *(["      SCF_GUESS RESTART"] if guess else ["      SCF_GUESS ATOMIC"]),
            f"      EPS_SCF {float(p.eps_scf):.3E}",
            f"      MAX_SCF {int(p.max_scf)}",
            "      &OT",
            "        MINIMIZER DIIS",
            "        PRECONDITIONER FULL_SINGLE_INVERSE",
            "      &END OT",
            "      &OUTER_SCF",
            f"        EPS_SCF {float(p.eps_scf):.3E}",
            f"        MAX_SCF {int(p.max_outer_scf)}",
            "      &END OUTER_SCF",
            "    &END SCF",
        ]
        if p.admm_basis is not None:
            lines += [
                "    &AUXILIARY_DENSITY_MATRIX_METHOD",
                "      METHOD BASIS_PROJECTION",
                "      ADMM_PURIFICATION_METHOD MO_DIAG",
                "    &END AUXILIARY_DENSITY_MATRIX_METHOD",
            ]
        lines += [
            "    &XC",
            "      &XC_FUNCTIONAL",
            "        &PBE",
            f"          PARAMETRIZATION {parametrization}",
            f"          SCALE_X {1.0 - exact}",
            "        &END PBE",
            "      &END XC_FUNCTIONAL",
        ]
        if exact > 0.0:
            lines += [
                "      &HF",
                f"        FRACTION {exact}",
                "        &SCREENING",
                "          EPS_SCHWARZ 1.0E-10",
                "        &END SCREENING",
                "        &INTERACTION_POTENTIAL",
                "          POTENTIAL_TYPE TRUNCATED",
                f"          CUTOFF_RADIUS {float(p.hfx_cutoff_radius_a)}",
                f"          T_C_G_DATA {self._data / 't_c_g.dat'}",
                "        &END INTERACTION_POTENTIAL",
                "      &END HF",
            ]
        lines += ["    &END XC", "  &END DFT", "  &SUBSYS", "    &CELL"]
        lines += [
            f"      {axis} {v[0]:.10f} {v[1]:.10f} {v[2]:.10f}"
            for axis, v in zip("ABC", cell, strict=True)
        ]
        lines += [f"      PERIODIC {'XYZ' if periodic else 'NONE'}", "    &END CELL", "    &COORD"]
        lines += [
            f"      {s} {x:.10f} {y:.10f} {z:.10f}"
            for s, (x, y, z) in zip(symbols, positions, strict=True)
        ]
        lines.append("    &END COORD")
        for element, (basis, potential, aux) in kinds.items():
            lines += [f"    &KIND {element}", f"      BASIS_SET {basis}"]
            if aux is not None:
                lines.append(f"      BASIS_SET AUX_FIT {aux}")
            lines += [f"      POTENTIAL {potential}", "    &END KIND"]
        lines += ["  &END SUBSYS", "  &PRINT"]
        if want_forces:
            lines += ["    &FORCES ON", "    &END FORCES"]
        if want_stress:
            lines += ["    &STRESS_TENSOR ON", "    &END STRESS_TENSOR"]
        lines += ["  &END PRINT", "&END FORCE_EVAL", ""]
        return "\n".join(lines)

    # -- running and reading -----------------------------------------------------

    def _run(self, text: str, guess: bytes | None = None) -> tuple[str, bytes | None]:
        """Run CP2K on ``text`` in the work folder, starting from the wavefunction
        ``guess`` if given; its output and the wavefunction it wrote (if any)."""
        p = self.parameters
        if p.workdir is not None:
            Path(p.workdir).mkdir(parents=True, exist_ok=True)
            return self._run_in(Path(p.workdir), text, guess)
        with tempfile.TemporaryDirectory(prefix="deltaml-cp2k-") as folder:
            return self._run_in(Path(folder), text, guess)

    def _run_in(self, folder: Path, text: str, guess: bytes | None) -> tuple[str, bytes | None]:
        p = self.parameters
        (folder / "deltaml.inp").write_text(text, encoding="utf-8")
        # CP2K appends to an existing output file: an earlier run's output or
        # wavefunction in a given work folder must not pass as this run's.
        written = folder / _WAVEFUNCTION_FILE
        for name in ("deltaml.out", _WAVEFUNCTION_FILE):
            (folder / name).unlink(missing_ok=True)
        if guess is not None:
            (folder / _GUESS_FILE).write_bytes(guess)
        env = dict(os.environ, OMP_NUM_THREADS=str(int(p.omp_threads)))
        command = [p.command, "-i", "deltaml.inp", "-o", "deltaml.out"]
        if int(p.mpi_ranks) > 1:
            launcher = p.mpi_command or _MPI_COMMAND
            command = [*shlex.split(launcher.format(ranks=int(p.mpi_ranks))), *command]
            if hasattr(os, "geteuid") and os.geteuid() == 0:  # Open MPI refuses root otherwise
                env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        try:
            done = subprocess.run(
                command, cwd=folder, env=env, capture_output=True, text=True, check=False
            )
        except OSError as exc:
            raise EngineError(f"cp2k: could not start {command[0]}: {exc}") from exc
        out = folder / "deltaml.out"
        output = out.read_text(encoding="utf-8", errors="replace") if out.is_file() else ""
        if done.returncode != 0 or _ENERGY.search(output) is None:
            tail = "\n".join((output or done.stderr or done.stdout).splitlines()[-15:])
            raise EngineError(
                f"cp2k: run failed (exit status {done.returncode}) in {folder}:\n{tail}"
            )
        return output, written.read_bytes() if written.is_file() else None

    def _parse(self, output: str, n_atoms: int, want_stress: bool) -> None:
        p = self.parameters
        if any(marker in output for marker in _SCF_FAILED):
            raise SCFConvergenceError(
                f"cp2k: SCF not converged in {p.max_outer_scf} outer loops of {p.max_scf} "
                f"steps (eps_scf {p.eps_scf}); raise max_scf or max_outer_scf, or check the "
                "geometry"
            )
        energy = float(_ENERGY.findall(output)[-1]) * Hartree
        self.results["energy"] = energy
        self.results["free_energy"] = energy
        lines = output.splitlines()
        starts = [i for i, line in enumerate(lines) if "ATOMIC FORCES in [a.u.]" in line]
        if starts:
            rows = lines[starts[-1] + 3 : starts[-1] + 3 + n_atoms]
            forces = np.array([[float(v) for v in row.split()[3:6]] for row in rows])
            self.results["forces"] = forces * (Hartree / Bohr)
        if want_stress:
            starts = [
                i
                for i, line in enumerate(lines)
                if "STRESS| Analytical stress tensor [GPa]" in line
            ]
            if not starts:
                raise EngineError("cp2k: no analytical stress tensor in the output")
            rows = lines[starts[-1] + 2 : starts[-1] + 5]
            tensor = np.array([[float(v) for v in row.split()[2:5]] for row in rows])
            # CP2K prints the pressure tensor (positive: the cell pushes outwards);
            # ASE's stress has the opposite sign.
            tensor = -0.5 * (tensor + tensor.T) * GPa
            self.results["stress"] = tensor[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]
