"""GFN-xTB baseline: an ASE calculator over tblite (default) or xtb-python.

The baseline is the physical starting point of the Δ-model. Two engines sit
behind one interface:

* ``tblite`` (default): GFN2-xTB and GFN1-xTB for molecules and periodic cells,
  energy, forces and stress. Its dispersion-free variants are exact: the method's
  parametrization is exported from the library, its ``dispersion`` section (D4 for
  GFN2, D3(BJ) for GFN1) is deleted and the rest is loaded back unchanged.
* ``xtb`` (xtb-python): molecules for both methods, GFN1-xTB under periodic
  boundaries. It cannot give stress, has no GFN2-xTB under periodic boundaries
  and cannot switch off GFN2's self-consistent D4; these raise
  :class:`~deltaml.errors.UnsupportedCapabilityError` before anything is computed.
  Its dispersion-free GFN1-xTB subtracts GFN1's D3(BJ) (s6=1, s8=2.4, a1=0.63,
  a2=5.0, no ATM) evaluated with simple-dftd3; the test suite measures that this
  agrees with tblite's exact removal.

Narrow periodic cells are evaluated on a supercell: tblite samples the Brillouin
zone at Γ only, which for a molecular crystal with a narrow cell costs binding
(measured for ice Ih with a 4.5 Å axis: 2.2 kJ/mol per molecule with GFN2-xTB,
3.2 with GFN1-xTB; up to tens of kJ/mol reported for narrower cells). A cell
narrower than ``min_cell_width`` is repeated until every perpendicular width
reaches it; energy, forces and stress are
returned for the cell that was given (``results["supercell_repeats"]`` and the
log say which supercell was used). Charge and multiplicity are per given cell;
the copies in a supercell add up (open-shell cells are coupled high-spin). The
supercell chosen from the width changes by a whole repeat when a cell crosses
``min_cell_width`` during a cell relaxation or NPT run, and the energy jumps by
the Γ-point error (2 meV per cell measured for an H-bonded water chain); fix it
with ``supercell=(n1, n2, n3)`` for such runs.

Data flow: structures → **baseline** → composite calculator.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
from ase.units import Bohr, Hartree, kB
from numpy.typing import NDArray

from deltaml.errors import (
    EngineError,
    ParameterError,
    SCFConvergenceError,
    UnsupportedCapabilityError,
)
from deltaml.structures import (
    DEFAULT_MIN_DISTANCE,
    engine_frame,
    require_3d_for_stress,
    resolve_charge,
    resolve_multiplicity,
    stress_from_virial,
    supercell_repeats,
    validate_structure,
)

__all__ = [
    "SUPPORTED_ELEMENTS",
    "XTBBaseline",
    "canonical_method",
    "dispersion_free_parametrization",
]

logger = logging.getLogger(__name__)

#: GFN1-xTB and GFN2-xTB are parametrized for H to Rn.
SUPPORTED_ELEMENTS = frozenset(range(1, 87))

_METHOD_ALIASES = {
    "gfn2": "GFN2-xTB",
    "gfn2-xtb": "GFN2-xTB",
    "gfn2xtb": "GFN2-xTB",
    "gfn1": "GFN1-xTB",
    "gfn1-xtb": "GFN1-xTB",
    "gfn1xtb": "GFN1-xTB",
}

_ENGINES = ("tblite", "xtb")

#: Parameters that change the Hamiltonian or the system: changing them rebuilds the engine.
_REBUILD_KEYS = ("method", "engine", "remove_dispersion", "charge", "multiplicity")


def canonical_method(method: str) -> str:
    """Canonical name of a GFN method (``"gfn2"`` → ``"GFN2-xTB"``).

    Raises
    ------
    ParameterError
        If the method is not GFN1-xTB or GFN2-xTB.
    """
    key = str(method).strip().lower()
    if key not in _METHOD_ALIASES:
        raise ParameterError(
            f"unknown baseline method {method!r}; choose GFN2-xTB or GFN1-xTB (aliases: gfn2, gfn1)"
        )
    return _METHOD_ALIASES[key]


def check_baseline_parameters(values: dict[str, Any]) -> None:
    """Refuse out-of-range baseline settings before they are stored.

    Parameters
    ----------
    values : dict
        Some or all of :attr:`XTBBaseline.default_parameters`.

    Raises
    ------
    ParameterError
        Naming the parameter, its value and the allowed range.
    """
    if "engine" in values and values["engine"] not in _ENGINES:
        raise ParameterError(f"unknown engine {values['engine']!r}; choose one of {_ENGINES}")
    if values.get("engine") == "xtb":
        _require_xtb()
    positive = {"electronic_temperature": "K", "accuracy": ""}
    for key, unit in positive.items():
        if key in values and not (np.isfinite(values[key]) and values[key] > 0):
            raise ParameterError(f"{key} must be positive, got {values[key]} {unit}".rstrip())
    if "max_iterations" in values and not (
        int(values["max_iterations"]) == values["max_iterations"] and values["max_iterations"] >= 1
    ):
        raise ParameterError(
            f"max_iterations must be a positive integer, got {values['max_iterations']}"
        )
    for key in ("min_cell_width", "min_distance"):
        if key in values and not (np.isfinite(values[key]) and values[key] >= 0):
            raise ParameterError(f"{key} must be a non-negative length in Å, got {values[key]}")
    supercell = values.get("supercell")
    if supercell is not None and (
        len(supercell) != 3 or any(int(n) != n or n < 1 for n in supercell)
    ):
        raise ParameterError(
            f"supercell must be three positive integers (n1, n2, n3), got {supercell!r}"
        )


def _require_xtb() -> None:
    import importlib.util

    if importlib.util.find_spec("xtb") is None:
        raise ParameterError(
            "engine='xtb' needs xtb-python, which is not installed (it has wheels for "
            "CPython <= 3.11 only); use engine='tblite' or install xtb"
        )


class XTBBaseline(Calculator):
    r"""ASE calculator for GFN2-xTB / GFN1-xTB with an optional exact removal of
    the method's own dispersion.

    ====================== ============ ======= =====================================
     Keyword                Default      Unit    Description
    ====================== ============ ======= =====================================
     method                 "GFN2-xTB"   -       GFN2-xTB or GFN1-xTB (or gfn2, gfn1)
     engine                 "tblite"     -       "tblite" or "xtb" (xtb-python)
     remove_dispersion      False        -       drop the method's own D4/D3 term
     charge                 None         e       total charge; None: sum of initial charges
     multiplicity           None         -       2S+1; None: from initial magnetic moments
     electronic_temperature 300.0        K       Fermi smearing temperature
     accuracy               1.0          -       engine accuracy (smaller is tighter)
     max_iterations         250          -       maximum SCF iterations
     min_cell_width         7.0          Å       evaluate narrower cells on a supercell
     supercell              None         -       fixed repeats (n1, n2, n3) instead
     min_distance           0.5          Å       closest allowed interatomic distance
     verbosity              0            -       engine print level
    ====================== ============ ======= =====================================

    Results are in ASE units: ``energy``/``free_energy`` (eV; the electronic free
    energy at the electronic temperature), ``forces`` (eV/Å), ``stress`` (eV/Å³,
    Voigt order xx, yy, zz, yz, xz, xy; periodic cells only) and, for periodic
    cells, ``supercell_repeats`` (the supercell actually evaluated).

    Examples
    --------
    >>> from ase.build import molecule
    >>> atoms = molecule("H2O")
    >>> atoms.calc = XTBBaseline(method="GFN2-xTB", remove_dispersion=True)
    >>> energy = atoms.get_potential_energy()  # eV
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    default_parameters: dict[str, Any] = {
        "method": "GFN2-xTB",
        "engine": "tblite",
        "remove_dispersion": False,
        "charge": None,
        "multiplicity": None,
        "electronic_temperature": 300.0,
        "accuracy": 1.0,
        "max_iterations": 250,
        "min_cell_width": 7.0,
        "supercell": None,
        "min_distance": DEFAULT_MIN_DISTANCE,
        "verbosity": 0,
    }

    def __init__(self, atoms: Atoms | None = None, **kwargs: Any) -> None:
        self._engine: _Engine | None = None
        self._engine_key: tuple | None = None
        Calculator.__init__(self, atoms=atoms, **kwargs)

    # -- parameters -------------------------------------------------------------

    def set(self, **kwargs: Any) -> dict:
        """Set parameters; rebuild the engine only when the Hamiltonian changes.

        Cheap settings (accuracy, electronic temperature, SCF iterations) are
        pushed into the live engine; any change resets the results.
        """
        if "method" in kwargs:
            kwargs["method"] = canonical_method(kwargs["method"])
        check_baseline_parameters(kwargs)
        changed = Calculator.set(self, **kwargs)
        if changed:
            self.reset()
        if any(key in changed for key in _REBUILD_KEYS):
            self._engine = None
            self._engine_key = None
        elif self._engine is not None:
            self._engine.configure(self.parameters)
        return changed

    @property
    def method(self) -> str:
        """Canonical method name, e.g. ``"GFN2-xTB"``."""
        return canonical_method(self.parameters.method)

    def record(self) -> dict[str, Any]:
        """Method record by value: everything that changes the baseline energy.

        Returns
        -------
        dict
            JSON-serialisable: method, engine and its version, whether the
            method's own dispersion is removed (and which term that was, with
            its damping parameters), a SHA-256 fingerprint of the method's full
            parametrization as tblite exports it (so that a library release
            that changes parameters is detected), electronic temperature (K),
            accuracy, minimum cell width (Å) and fixed supercell. The SCF
            iteration limit is left out: it does not change a converged energy.
        """
        p = self.parameters
        own = _own_dispersion(self.method)
        return {
            "term": "baseline",
            "method": self.method,
            "engine": p.engine,
            "engine_version": _engine_version(p.engine),
            "remove_dispersion": bool(p.remove_dispersion),
            "removed_dispersion": own if p.remove_dispersion else None,
            "parametrization_sha256": _param_fingerprint(self.method),
            "electronic_temperature_k": float(p.electronic_temperature),
            "accuracy": float(p.accuracy),
            "min_cell_width_a": float(p.min_cell_width),
            "supercell": None if p.supercell is None else [int(n) for n in p.supercell],
        }

    # -- calculation ------------------------------------------------------------

    def check_capabilities(self, atoms: Atoms, properties: list[str]) -> None:
        """Raise before computing if the engine cannot provide ``properties``.

        Raises
        ------
        UnsupportedCapabilityError
            xtb engine with GFN2-xTB under periodic boundaries, with stress, or
            with GFN2-xTB and ``remove_dispersion``.
        """
        p = self.parameters
        if p.engine != "xtb":
            return
        if self.method == "GFN2-xTB" and atoms.pbc.any():
            raise UnsupportedCapabilityError(
                "xtb engine: GFN2-xTB is not available under periodic boundary "
                "conditions in xtb-python; use engine='tblite' or GFN1-xTB"
            )
        if "stress" in properties:
            raise UnsupportedCapabilityError(
                "xtb engine: xtb-python does not compute stress (it returns a zero "
                "virial); use engine='tblite' for stress and cell relaxations"
            )
        if self.method == "GFN2-xTB" and p.remove_dispersion:
            raise UnsupportedCapabilityError(
                "xtb engine: GFN2-xTB's self-consistent D4 cannot be switched off in "
                "xtb-python; use engine='tblite' for dispersion-free GFN2-xTB"
            )

    def calculate(
        self,
        atoms: Atoms | None = None,
        properties: list[str] | None = None,
        system_changes: list[str] = all_changes,
    ) -> None:
        """Evaluate the baseline; see the class docstring for the results."""
        properties = properties or ["energy"]
        Calculator.calculate(self, atoms, properties, system_changes)
        atoms = self.atoms
        p = self.parameters
        require_3d_for_stress(atoms, properties)
        self.check_capabilities(atoms, properties)
        charge = resolve_charge(atoms, p.charge)
        multiplicity = resolve_multiplicity(atoms, charge, p.multiplicity, f_in_core=True)
        validate_structure(
            atoms,
            supported_elements=SUPPORTED_ELEMENTS,
            method_name=self.method,
            min_distance=p.min_distance,
            charge=charge,
            multiplicity=multiplicity,
            f_in_core=True,
        )

        repeats = self._repeats(atoms)
        work = atoms.repeat(repeats) if repeats != (1, 1, 1) else atoms
        n_cells = int(np.prod(repeats))
        # Charge and unpaired electrons are per given cell; the copies of the cell in
        # a supercell add up (open-shell cells are thus coupled high-spin).
        uhf = (multiplicity - 1) * n_cells
        if n_cells > 1:
            logger.info(
                "%s: cell evaluated on a %dx%dx%d supercell (min_cell_width %.2f Å; "
                "supercell charge %d, unpaired electrons %d)",
                self.method,
                *repeats,
                p.min_cell_width,
                charge * n_cells,
                uhf,
            )

        engine = self._get_engine(work, charge * n_cells, uhf, repeats)
        energy, gradient, virial = engine.singlepoint()

        n_atoms = len(atoms)
        self.results["energy"] = energy * Hartree / n_cells
        self.results["free_energy"] = self.results["energy"]
        # Every image of an atom carries the same force; block 0 is the given cell.
        self.results["forces"] = -gradient[:n_atoms] * (Hartree / Bohr)
        if atoms.pbc.any():
            self.results["supercell_repeats"] = np.array(repeats)
            if virial is not None and atoms.pbc.all():
                # The virial is extensive and the volume too: stress is unchanged.
                self.results["stress"] = stress_from_virial(virial, work.get_volume())

    def _repeats(self, atoms: Atoms) -> tuple[int, int, int]:
        """The supercell to evaluate: fixed by ``supercell`` or from ``min_cell_width``."""
        p = self.parameters
        if not atoms.pbc.any():
            return (1, 1, 1)
        if p.supercell is not None:
            pairs = zip(p.supercell, atoms.pbc, strict=True)
            return tuple(int(n) if periodic else 1 for n, periodic in pairs)
        return supercell_repeats(atoms.cell.array, atoms.pbc, p.min_cell_width)

    def _get_engine(
        self, work: Atoms, charge: int, uhf: int, repeats: tuple[int, int, int]
    ) -> _Engine:
        """Reuse the engine while only positions or cell change."""
        key = (tuple(work.numbers), tuple(work.pbc), repeats, charge, uhf)
        if self._engine is not None and key == self._engine_key:
            self._engine.update(work)
            return self._engine
        cls = _TBLiteEngine if self.parameters.engine == "tblite" else _XTBEngine
        self._engine = cls(self.method, work, charge, uhf, self.parameters)
        self._engine_key = key
        return self._engine


# -- engines -------------------------------------------------------------------


@functools.cache
def _engine_version(engine: str) -> str:
    """Installed version of an engine (read once: the metadata look-up costs ~1 ms)."""
    from importlib.metadata import version

    return version(engine)


def _own_dispersion(method: str) -> dict[str, Any]:
    """The dispersion model built into a GFN method, by value (from tblite)."""
    return {"model": _param_dict(method)["dispersion"]}


_PARAM_CACHE: dict[str, dict] = {}


def _param_dict(method: str) -> dict:
    """The full parametrization of a GFN method as exported by tblite."""
    if method not in _PARAM_CACHE:
        from tblite import library

        exporter = {
            "GFN2-xTB": library.export_gfn2_param,
            "GFN1-xTB": library.export_gfn1_param,
        }[method]
        param = library.new_param()
        exporter(param)
        table = library.new_table()
        library.dump_param(param, table)
        _PARAM_CACHE[method] = library.table_to_dict(table)
    return _PARAM_CACHE[method]


@functools.cache
def _param_fingerprint(method: str) -> str:
    """SHA-256 of the exported parametrization, once per method (the JSON text costs ~3 ms)."""
    import hashlib
    import json

    text = json.dumps(_param_dict(method), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def dispersion_free_parametrization(method: str) -> dict:
    """tblite parametrization of ``method`` with its dispersion section removed."""
    import copy

    params = copy.deepcopy(_param_dict(canonical_method(method)))
    del params["dispersion"]
    params["meta"]["name"] = f"{params['meta']['name']} (dispersion removed)"
    return params


#: tblite parameter handles of the dispersion-free methods, built once per process.
_FREE_PARAM_HANDLES: dict[str, Any] = {}
#: How many times each handle was built (the tests check that it is once).
PARAM_BUILDS: dict[str, int] = {}


def dispersion_free_param_handle(method: str) -> Any:
    """tblite parameter object of ``method`` without its dispersion, built once per method.

    Converting the parametrization from a dict to tblite's records costs about
    35 ms (GFN2-xTB, all 86 elements), against 0.1 ms for building a calculator
    from records already loaded; the records are only read when a calculator is
    built, so one object serves every system and every calculator of the process.

    Parameters
    ----------
    method : str
        ``"GFN2-xTB"`` or ``"GFN1-xTB"`` (or an alias).

    Returns
    -------
    tblite parameter handle (cffi ``tblite_param``)
        The same object on every call for the same method.
    """
    method = canonical_method(method)
    handle = _FREE_PARAM_HANDLES.get(method)
    if handle is None:
        from tblite import library

        handle = library.new_param()
        library.load_param(handle, library.dict_to_table(dispersion_free_parametrization(method)))
        _FREE_PARAM_HANDLES[method] = handle
        PARAM_BUILDS[method] = PARAM_BUILDS.get(method, 0) + 1
    return handle


def _tblite_calculator(
    method: str,
    remove_dispersion: bool,
    numbers: NDArray,
    positions: NDArray,
    charge: int,
    uhf: int,
    lattice: NDArray,
    pbc: NDArray,
) -> Any:
    """A tblite calculator; the dispersion-free parametrization comes from the cache."""
    from tblite.interface import Calculator as TBLiteCalculator

    if not remove_dispersion:
        return TBLiteCalculator(method, numbers, positions, charge, uhf, lattice, pbc)
    return _cached_param_class()(
        dispersion_free_param_handle(method), numbers, positions, charge, uhf, lattice, pbc
    )


@functools.cache
def _cached_param_class() -> type:
    from tblite import library
    from tblite.interface import Calculator as TBLiteCalculator
    from tblite.interface import Structure

    class CachedParamCalculator(TBLiteCalculator):
        """tblite's Calculator built from a parameter object loaded beforehand.

        What ``tblite.interface.Calculator(dict, ...)`` does, less converting
        and loading the dict again for every system.
        """

        def __init__(self, param: Any, numbers, positions, charge, uhf, lattice, periodic):
            Structure.__init__(self, numbers, positions, charge, uhf, lattice, periodic)
            self._ctx = library.new_context()
            self._calc = library.new_xtb_calculator(self._ctx, self._mol, param, None)
            self._param = param  # kept alive with the calculator, as tblite does
            self._method = "xTB"

    return CachedParamCalculator


def _wrap_failure(engine: str, exc: Exception) -> EngineError:
    message = f"{engine}: {exc}".strip()
    if "converge" in message.lower():
        return SCFConvergenceError(
            f"{message} (raise max_iterations, the electronic temperature, or check the geometry)"
        )
    return EngineError(message)


class _Engine:
    """Interface of an engine: atomic units inside, ASE units never."""

    def configure(self, parameters: Any) -> None:
        raise NotImplementedError

    def update(self, atoms: Atoms) -> None:
        raise NotImplementedError

    def singlepoint(self) -> tuple[float, NDArray[np.float64], NDArray[np.float64] | None]:
        """Energy (Eh), gradient (Eh/Bohr, shape (n, 3)), virial (Eh, 3×3) or None.

        The virial is returned whenever the engine has it (it costs nothing
        extra), so a later stress request needs no second SCF.
        """
        raise NotImplementedError


class _TBLiteEngine(_Engine):
    def __init__(self, method: str, atoms: Atoms, charge: int, uhf: int, parameters: Any) -> None:
        positions, cell = engine_frame(atoms)
        try:
            self._calc = _tblite_calculator(
                method,
                bool(parameters.remove_dispersion),
                atoms.numbers,
                positions / Bohr,
                charge,
                uhf,
                cell / Bohr,
                atoms.pbc,
            )
        except (RuntimeError, ValueError) as exc:
            raise EngineError(f"tblite could not set up {method}: {exc}") from exc
        self._result = None
        self._periodic = bool(atoms.pbc.all())
        self.configure(parameters)

    def configure(self, parameters: Any) -> None:
        self._calc.set("verbosity", int(parameters.verbosity))
        self._calc.set("accuracy", float(parameters.accuracy))
        self._calc.set("max-iter", int(parameters.max_iterations))
        self._calc.set("temperature", float(parameters.electronic_temperature) * kB / Hartree)

    def update(self, atoms: Atoms) -> None:
        positions, cell = engine_frame(atoms)
        try:
            self._calc.update(positions=positions / Bohr, lattice=cell / Bohr)
        except (RuntimeError, ValueError) as exc:
            raise EngineError(f"tblite rejected the geometry: {exc}") from exc

    def singlepoint(self):
        try:
            # Restarting from the previous density saves SCF cycles along a trajectory.
            self._result = self._calc.singlepoint(self._result)
        except RuntimeError as exc:
            self._result = None
            raise _wrap_failure("tblite", exc) from exc
        virial = self._result.get("virial") if self._periodic else None
        return float(self._result.get("energy")), self._result.get("gradient"), virial


class _XTBEngine(_Engine):
    def __init__(self, method: str, atoms: Atoms, charge: int, uhf: int, parameters: Any) -> None:
        from xtb.interface import Calculator as XTBCalculator
        from xtb.interface import Param, XTBException

        param = {"GFN2-xTB": Param.GFN2xTB, "GFN1-xTB": Param.GFN1xTB}[method]
        positions, cell = engine_frame(atoms)
        try:
            self._calc = XTBCalculator(
                param, atoms.numbers, positions / Bohr, charge, uhf, cell / Bohr, atoms.pbc
            )
        except XTBException as exc:
            raise EngineError(f"xtb could not set up {method}: {exc}") from exc
        self._remove_d3 = bool(parameters.remove_dispersion)  # GFN1 only, checked above
        self._atoms = atoms.copy()
        self._d3 = None
        self.configure(parameters)

    def configure(self, parameters: Any) -> None:
        from xtb.libxtb import VERBOSITY_FULL, VERBOSITY_MUTED

        self._calc.set_verbosity(VERBOSITY_FULL if parameters.verbosity > 0 else VERBOSITY_MUTED)
        self._calc.set_accuracy(float(parameters.accuracy))
        self._calc.set_max_iterations(int(parameters.max_iterations))
        self._calc.set_electronic_temperature(float(parameters.electronic_temperature))

    def update(self, atoms: Atoms) -> None:
        from xtb.interface import XTBException

        self._atoms = atoms.copy()
        positions, cell = engine_frame(atoms)
        try:
            self._calc.update(positions / Bohr, cell / Bohr)
        except XTBException as exc:
            raise EngineError(f"xtb rejected the geometry: {exc}") from exc

    def singlepoint(self):
        # xtb-python returns a zero virial for GFN1/GFN2: never pass it on.
        from xtb.interface import XTBException

        try:
            result = self._calc.singlepoint()
        except XTBException as exc:
            raise _wrap_failure("xtb", exc) from exc
        energy = float(result.get_energy())
        gradient = np.array(result.get_gradient())
        if self._remove_d3:
            d3_energy, d3_gradient = self._gfn1_d3()
            energy -= d3_energy
            gradient -= d3_gradient
        return energy, gradient, None

    def _gfn1_d3(self) -> tuple[float, NDArray[np.float64]]:
        from dftd3.interface import DispersionModel, RationalDampingParam

        atoms = self._atoms
        positions, cell = engine_frame(atoms)
        try:
            if self._d3 is None:
                self._d3 = DispersionModel(atoms.numbers, positions / Bohr, cell / Bohr, atoms.pbc)
            else:
                self._d3.update(positions / Bohr, cell / Bohr)
        except RuntimeError as exc:
            raise EngineError(f"dftd3 (removing GFN1-xTB's D3 from xtb): {exc}") from exc
        # GFN1-xTB's own D3(BJ) damping parameters, read from tblite's export.
        values = _param_dict("GFN1-xTB")["dispersion"]["d3"]
        damping = RationalDampingParam(**{k: values[k] for k in ("s6", "s8", "s9", "a1", "a2")})
        try:
            result = self._d3.get_dispersion(damping, grad=True)
        except RuntimeError as exc:
            raise EngineError(f"dftd3 (removing GFN1-xTB's D3 from xtb): {exc}") from exc
        return float(result["energy"]), result["gradient"]
