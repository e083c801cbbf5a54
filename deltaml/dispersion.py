"""D3 dispersion term through simple-dftd3, with its parameters recorded by value.

The composite adds this term to the dispersion-free baseline and the learned
correction. Damping functions: ``d3bj`` (rational), ``d3zero``, ``d3bjm``
(modified rational), ``d3zerom`` (modified zero) and ``d3op`` (optimized power);
the damping parameters of a density functional are looked up by name in
simple-dftd3's parameter table, and can be overridden one by one. The optional
three-body Axilrod–Teller–Muto term is off by default.

Names are not enough to identify a term (libraries have renamed functionals
before), so :meth:`D3Dispersion.record` holds the numbers actually used
(s6, s8, a1, a2, s9, ...), which a trained model compares against.

Data flow: structures → **dispersion** → composite calculator.
"""

from __future__ import annotations

import functools
import inspect
from importlib.metadata import version
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
from ase.units import Bohr, Hartree

from deltaml.errors import EngineError, ParameterError
from deltaml.structures import (
    DEFAULT_MIN_DISTANCE,
    engine_frame,
    require_3d_for_stress,
    stress_from_virial,
    validate_structure,
)

__all__ = [
    "DAMPING_FUNCTIONS",
    "D3Dispersion",
    "ParameterTableWarning",
    "damping_parameters",
    "parse_dispersion_spec",
]

#: Damping name → (simple-dftd3 damping class name, key in its parameter table).
DAMPING_FUNCTIONS = {
    "d3bj": ("RationalDampingParam", "bj"),
    "d3zero": ("ZeroDampingParam", "zero"),
    "d3bjm": ("ModifiedRationalDampingParam", "bjm"),
    "d3zerom": ("ModifiedZeroDampingParam", "zerom"),
    "d3op": ("OptimizedPowerDampingParam", "op"),
}
_DAMPING_ALIASES = {"d3mbj": "d3bjm", "d3mzero": "d3zerom", "bj": "d3bj", "zero": "d3zero"}

#: simple-dftd3's real-space cut-offs (Å): pairs, triples, coordination number,
#: and the widths of the smooth switching of the pair and triple sums.
_DEFAULT_CUTOFFS = {
    "disp2": 60.0 * Bohr,
    "disp3": 40.0 * Bohr,
    "cn": 40.0 * Bohr,
    "width2": 0.0,
    "width3": 0.0,
}

#: D3 reference C6 coefficients exist for H to Pu.
SUPPORTED_ELEMENTS = frozenset(range(1, 95))


def _damping_name(damping: str) -> str:
    key = str(damping).strip().lower()
    key = _DAMPING_ALIASES.get(key, key)
    if key not in DAMPING_FUNCTIONS:
        raise ParameterError(
            f"unknown D3 damping {damping!r}; choose one of {sorted(DAMPING_FUNCTIONS)}"
        )
    return key


def _check_cutoffs(cutoff: dict | None) -> None:
    for key, value in (cutoff or {}).items():
        if key not in _DEFAULT_CUTOFFS:
            raise ParameterError(
                f"unknown realspace_cutoff key {key!r}; accepted: {sorted(_DEFAULT_CUTOFFS)} (Å)"
            )
        lowest = 0.0 if key.startswith("width") else 1e-3
        if not np.isfinite(value) or value < lowest:
            raise ParameterError(
                f"realspace_cutoff {key} = {value} Å is not allowed: "
                f"{'non-negative' if lowest == 0 else 'positive'} finite length in Å expected"
            )


def _damping_class(damping: str) -> type:
    import dftd3.interface

    return getattr(dftd3.interface, DAMPING_FUNCTIONS[damping][0])


def damping_parameters(
    method: str | None, damping: str = "d3bj", atm: bool = False, tweaks: dict | None = None
) -> dict[str, float]:
    """Numerical damping parameters of a D3 variant.

    Parameters
    ----------
    method : str or None
        Density functional whose parameters to look up (case-insensitive, e.g.
        ``"pbe0"``). ``None`` takes every parameter from ``tweaks``.
    damping : str, default="d3bj"
        Damping function, one of :data:`DAMPING_FUNCTIONS`.
    atm : bool, default=False
        Include the three-body ATM term (s9 from the table, usually 1); else s9 = 0.
    tweaks : dict, optional
        Values that override the table (s6, s8, s9, a1, a2, rs6, rs8, alp, bet).

    Returns
    -------
    dict
        The keyword arguments of the simple-dftd3 damping class, by value.

    Raises
    ------
    ParameterError
        Unknown damping, a functional without parameters for that damping, or
        missing/unknown parameter names.
    """
    from dftd3.parameters import get_all_damping_params, get_damping_param

    damping = _damping_name(damping)
    table_key = DAMPING_FUNCTIONS[damping][1]
    accepted = {
        name
        for name in inspect.signature(_damping_class(damping).new_param).parameters
        if name != "self"
    }
    values: dict[str, float] = {}
    if method is not None:
        try:
            values = dict(get_damping_param(str(method).lower(), defaults=[table_key]))
        except KeyError:
            known = sorted(get_all_damping_params(defaults=[table_key]))
            raise ParameterError(
                f"no {damping} parameters for functional {method!r} in simple-dftd3 "
                f"{version('dftd3')}; functionals with {damping} parameters: "
                f"{', '.join(known)}"
            ) from None
        values = {k: float(v) for k, v in values.items() if k in accepted}
        values["s9"] = values.get("s9", 1.0) if atm else 0.0
    if not atm and float((tweaks or {}).get("s9", 0.0)) != 0.0:
        raise ParameterError(
            f"params_tweaks sets s9 = {tweaks['s9']} (the ATM three-body scale) but atm=False; "
            "set atm=True to include the three-body term"
        )
    for key, value in (tweaks or {}).items():
        if key not in accepted:
            raise ParameterError(
                f"unknown {damping} damping parameter {key!r}; accepted: {sorted(accepted)}"
            )
        values[key] = float(value)
    if method is None and "s9" not in (tweaks or {}):
        values["s9"] = 1.0 if atm else 0.0
    missing = sorted(
        name
        for name, par in inspect.signature(_damping_class(damping).new_param).parameters.items()
        if par.default is inspect.Parameter.empty and name not in values
    )
    if missing and method is None:
        raise ParameterError(
            f"{damping} damping needs {missing}: give a functional name or params_tweaks"
        )
    if missing:
        raise ParameterError(
            f"simple-dftd3's parameter table has no {missing} for {damping}:{method}; "
            "give them in params_tweaks"
        )
    if method is not None and not tweaks:
        _compare_with_library(
            str(method).lower(), damping, bool(atm), tuple(sorted(values.items()))
        )
    return values


@functools.cache
def _dftd3_version() -> str:
    """Installed dftd3 version, read once (the metadata look-up costs ~1 ms per record)."""
    return version("dftd3")


class ParameterTableWarning(UserWarning):
    """simple-dftd3's parameter table and its compiled library disagree for a functional."""


@functools.cache
def _compare_with_library(
    method: str, damping: str, atm: bool, values: tuple[tuple[str, float], ...]
) -> None:
    """Warn when the table's numbers differ from the library's own for that name.

    deltaml uses (and records) the table's numbers; the library's built-in
    parameters are what ``dftd3`` gives by name. For a probe molecule both must
    give the same energy; they do for every functional but d3zero:opbe
    (simple-dftd3 1.7.0: 4e-5 Eh on methanol + water).
    """
    import warnings

    import dftd3.interface
    from ase.build import molecule

    cls = _damping_class(damping)
    probe = molecule("CH3OH") + molecule("H2O")
    probe.positions[6:] += [3.0, 0.0, 0.0]
    model = dftd3.interface.DispersionModel(probe.numbers, probe.positions / Bohr)
    try:
        by_name = cls(method=method, atm=atm)
    except RuntimeError:
        return  # a table-only name: nothing to compare with
    named = float(model.get_dispersion(by_name, grad=False)["energy"])
    ours = float(model.get_dispersion(cls(**dict(values)), grad=False)["energy"])
    if abs(named - ours) > 1e-10:
        warnings.warn(
            f"simple-dftd3's parameter table gives {dict(values)} for {damping}:{method}, "
            f"but its library's built-in parameters for that name differ "
            f"({(ours - named) * Hartree * 1000:.3f} meV on a probe molecule); deltaml uses "
            "and records the table's values",
            ParameterTableWarning,
            stacklevel=4,
        )


def parse_dispersion_spec(spec: str) -> dict[str, Any]:
    """Parse ``"DAMPING:FUNCTIONAL[:atm]"`` (e.g. ``"d3bj:pbe0"``).

    Returns
    -------
    dict
        Keywords ``damping``, ``method`` and ``atm`` for :class:`D3Dispersion`.

    Raises
    ------
    ParameterError
        If the text does not have that form.
    """
    parts = [part.strip() for part in str(spec).split(":")]
    if len(parts) == 3:
        parts[2] = parts[2].lower()
    if len(parts) not in (2, 3) or not all(parts) or (len(parts) == 3 and parts[2] != "atm"):
        raise ParameterError(
            f"dispersion {spec!r} is not of the form DAMPING:FUNCTIONAL[:atm], "
            "e.g. 'd3bj:pbe0' or 'd3zero:b3lyp:atm'"
        )
    return {"damping": _damping_name(parts[0]), "method": parts[1].lower(), "atm": len(parts) == 3}


class D3Dispersion(Calculator):
    r"""ASE calculator for DFT-D3 dispersion (simple-dftd3) with recorded parameters.

    ================= ========== ===== ==============================================
     Keyword           Default    Unit  Description
    ================= ========== ===== ==============================================
     method            "pbe0"     -     functional whose damping parameters are used
     damping           "d3bj"     -     d3bj, d3zero, d3bjm, d3zerom or d3op
     atm               False      -     include the three-body ATM term
     params_tweaks     None       -     dict overriding single damping parameters
     realspace_cutoff  None       Å     dict: disp2, disp3, cn cut-offs, width2/3
     min_distance      0.5        Å     closest allowed interatomic distance
    ================= ========== ===== ==============================================

    Results: ``energy``/``free_energy`` (eV), ``forces`` (eV/Å), ``stress``
    (eV/Å³, Voigt order; periodic cells only).

    Examples
    --------
    >>> from ase.build import molecule
    >>> atoms = molecule("C6H6")
    >>> atoms.calc = D3Dispersion(method="pbe0", damping="d3bj")
    >>> energy = atoms.get_potential_energy()  # eV
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    default_parameters: dict[str, Any] = {
        "method": "pbe0",
        "damping": "d3bj",
        "atm": False,
        "params_tweaks": None,
        "realspace_cutoff": None,
        "min_distance": DEFAULT_MIN_DISTANCE,
    }

    def __init__(self, atoms: Atoms | None = None, **kwargs: Any) -> None:
        self._model = None
        self._model_key: tuple | None = None
        self._damping = None
        Calculator.__init__(self, atoms=atoms, **kwargs)

    @classmethod
    def from_spec(cls, spec: str, **kwargs: Any) -> D3Dispersion:
        """Build from ``"DAMPING:FUNCTIONAL[:atm]"``, e.g. ``"d3bj:pbe0"``."""
        return cls(**parse_dispersion_spec(spec), **kwargs)

    def set(self, **kwargs: Any) -> dict:
        """Set parameters; checks them at once and resets the results on any change."""
        # Check the merged settings before storing them: a refused set() changes nothing.
        if "damping" in kwargs:
            kwargs["damping"] = _damping_name(kwargs["damping"])
        if "realspace_cutoff" in kwargs:
            _check_cutoffs(kwargs["realspace_cutoff"])
        merged = {**(self.parameters or self.get_default_parameters()), **kwargs}
        damping_parameters(
            merged["method"], merged["damping"], merged["atm"], merged["params_tweaks"]
        )
        changed = Calculator.set(self, **kwargs)
        if changed:
            self.reset()
            self._damping = None
        return changed

    def parameters_by_value(self) -> dict[str, float]:
        """Damping parameters actually used (s6, s8, s9, a1, a2, ...)."""
        p = self.parameters
        return damping_parameters(p.method, p.damping, p.atm, p.params_tweaks)

    def record(self) -> dict[str, Any]:
        """Term record by value and by name (JSON-serialisable)."""
        p = self.parameters
        return {
            "term": "dispersion",
            "model": "D3",
            "damping": _damping_name(p.damping),
            "method": None if p.method is None else str(p.method).lower(),
            "atm": bool(p.atm),
            "parameters": self.parameters_by_value(),
            "realspace_cutoff_a": {**_DEFAULT_CUTOFFS, **(p.realspace_cutoff or {})},
            "engine": "dftd3",
            "engine_version": _dftd3_version(),
        }

    def calculate(
        self,
        atoms: Atoms | None = None,
        properties: list[str] | None = None,
        system_changes: list[str] = all_changes,
    ) -> None:
        """Evaluate the D3 energy, forces and (periodic) stress."""
        properties = properties or ["energy"]
        Calculator.calculate(self, atoms, properties, system_changes)
        atoms = self.atoms
        require_3d_for_stress(atoms, properties)
        validate_structure(
            atoms,
            supported_elements=SUPPORTED_ELEMENTS,
            method_name="DFT-D3",
            min_distance=self.parameters.min_distance,
        )
        model = self._get_model(atoms, system_changes)
        if self._damping is None:
            cls = _damping_class(_damping_name(self.parameters.damping))
            self._damping = cls(**self.parameters_by_value())
        try:
            res = model.get_dispersion(self._damping, grad=True)
        except RuntimeError as exc:
            raise EngineError(f"dftd3: {exc}") from exc
        self.results["energy"] = float(res["energy"]) * Hartree
        self.results["free_energy"] = self.results["energy"]
        self.results["forces"] = -res["gradient"] * (Hartree / Bohr)
        if atoms.pbc.all():
            self.results["stress"] = stress_from_virial(res["virial"], atoms.get_volume())

    def _get_model(self, atoms: Atoms, system_changes: list[str]):
        """Reuse the dispersion model while the atoms, pbc and cut-offs stay the same.

        The key is checked rather than ``system_changes``: after a failed call ASE
        already holds the new atoms while the model still belongs to the old ones.
        """
        from dftd3.interface import DispersionModel

        positions, cell = engine_frame(atoms)
        cutoff = self.parameters.realspace_cutoff
        key = (tuple(atoms.numbers), tuple(atoms.pbc), tuple(sorted((cutoff or {}).items())))
        if self._model is not None and key == self._model_key:
            try:
                self._model.update(positions / Bohr, cell / Bohr)
                return self._model
            except RuntimeError as exc:
                raise EngineError(f"dftd3 rejected the geometry: {exc}") from exc
        self._model = None
        try:
            model = DispersionModel(atoms.numbers, positions / Bohr, cell / Bohr, atoms.pbc)
            if cutoff:
                values = {**_DEFAULT_CUTOFFS, **cutoff}
                model.set_realspace_cutoff(*(values[key] / Bohr for key in _DEFAULT_CUTOFFS))
        except RuntimeError as exc:
            raise EngineError(f"dftd3 could not set up the dispersion model: {exc}") from exc
        self._model = model
        self._model_key = key
        return model
