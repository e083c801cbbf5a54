"""The composite ASE calculator: dispersion-free baseline + learned correction + D3.

:class:`DeltaCalculator` owns one :class:`~deltaml.baseline.XTBBaseline` (with
the method's own D4/D3 removed, so dispersion is counted once), one
:class:`~deltaml.dispersion.D3Dispersion` and one correction following
:class:`~deltaml.correction.Correction`. It reports the sum under ASE's names and
every term under ``<property>_<term>`` (``energy_baseline``, ``forces_dispersion``,
``stress_correction``, ...), so users can see the energy budget.

Data flow: baseline, dispersion, correction (model) → **composite** → applications.
"""

from __future__ import annotations

import warnings
import weakref
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes

from deltaml.baseline import (
    SUPPORTED_ELEMENTS,
    XTBBaseline,
    canonical_method,
    check_baseline_parameters,
)
from deltaml.correction import (
    Correction,
    CorrectionResult,
    accepts_force_uncertainty,
    predict_correction,
    record_differences,
)
from deltaml.crystals import check_same_molecules, identify_molecules
from deltaml.dispersion import D3Dispersion, damping_parameters, parse_dispersion_spec
from deltaml.errors import (
    NonFiniteResultError,
    OutOfDomainError,
    OutOfDomainWarning,
    ParameterError,
    TermMismatchError,
)
from deltaml.structures import (
    DEFAULT_MIN_DISTANCE,
    require_3d_for_stress,
    resolve_charge,
    resolve_multiplicity,
    validate_structure,
)

__all__ = ["TERMS", "DeltaCalculator", "energy_budget"]

#: Names of the terms, in the order they are summed.
TERMS = ("baseline", "correction", "dispersion")

#: Stands for a correction that records no training spin states at all (not a model).
_NOT_RECORDED = object()

#: Composite parameters handed to the baseline unchanged.
_BASELINE_KEYS = (
    "method",
    "engine",
    "charge",
    "multiplicity",
    "electronic_temperature",
    "accuracy",
    "max_iterations",
    "min_cell_width",
    "supercell",
    "min_distance",
)


class DeltaCalculator(Calculator):
    r"""Composite calculator: GFN-xTB (own dispersion removed) + correction + D3.

    ====================== ============ ===== =========================================
     Keyword                Default      Unit  Description
    ====================== ============ ===== =========================================
     method                 "GFN2-xTB"   -     baseline, GFN2-xTB or GFN1-xTB
     engine                 "tblite"     -     baseline engine, "tblite" or "xtb"
     baseline_dispersion    False        -     keep the baseline's own D4/D3 term
     dispersion             "d3bj:pbe0"  -     D3 term "DAMPING:FUNCTIONAL[:atm]", or None
     charge                 None         e     total charge; None: sum of initial charges
     multiplicity           None         -     2S+1; None: from initial magnetic moments
     electronic_temperature 300.0        K     baseline Fermi smearing temperature
     accuracy               1.0          -     baseline engine accuracy
     max_iterations         250          -     baseline maximum SCF iterations
     min_cell_width         7.0          Å     baseline supercell threshold
     supercell              None         -     fixed baseline supercell (n1, n2, n3)
     min_distance           0.5          Å     closest allowed interatomic distance
     uncertainty_threshold  None         eV/Å  max correction force uncertainty; None: off
     uncertainty_action     "warn"       -     "warn" or "raise" above the threshold
     force_uncertainty      False        -     compute the force uncertainty (a threshold does)
    ====================== ============ ===== =========================================

    Parameters
    ----------
    atoms : ase.Atoms, optional
        Structure to attach to.
    correction : Correction
        The learned correction. Required: pass ``ZeroCorrection()`` to run the
        physical terms alone.
    **kwargs
        Keywords of the table above.

    Notes
    -----
    Results: ``energy``/``free_energy`` (eV), ``forces`` (eV/Å), ``stress``
    (eV/Å³, Voigt; periodic cells only); per term ``energy_<term>``,
    ``forces_<term>``, ``stress_<term>`` for ``baseline``, ``correction`` and
    ``dispersion``; ``energy_uncertainty`` (eV), ``energies_uncertainty`` (eV) and
    ``forces_uncertainty`` (eV/Å) when the correction provides them.

    A correction that records the spin states it was trained on
    (``training_multiplicities_`` of a :class:`~deltaml.model.SparseGPR`; ``None``
    for model files older than that record: closed shells assumed) or the total
    charges (``training_charges_``, where recorded) gives an
    :class:`~deltaml.errors.OutOfDomainWarning`, once per formula, charge and
    multiplicity, when it is asked for a structure outside them: its correction
    there is an extrapolation.

    The force uncertainty of a :class:`~deltaml.model.SparseGPR` roughly doubles
    the cost of the correction, so it is asked for only when something uses it:
    an ``uncertainty_threshold``, or ``force_uncertainty=True`` (active learning
    and stability runs set it). A correction without the ``force_uncertainty``
    keyword decides alone (see :func:`~deltaml.correction.predict_correction`).

    Keeping the baseline's own dispersion and adding D3 on top counts
    dispersion twice (several kcal/mol of overbinding for dispersion-bound
    dimers) and is refused.

    Examples
    --------
    >>> from ase.build import molecule
    >>> atoms = molecule("H2O")
    >>> atoms.calc = DeltaCalculator(correction=ZeroCorrection(), dispersion="d3bj:pbe0")
    >>> energy = atoms.get_potential_energy()  # eV
    >>> budget = {t: atoms.calc.results[f"energy_{t}"] for t in ("baseline", "dispersion")}
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    default_parameters: dict[str, Any] = {
        "method": "GFN2-xTB",
        "engine": "tblite",
        "baseline_dispersion": False,
        "dispersion": "d3bj:pbe0",
        "charge": None,
        "multiplicity": None,
        "electronic_temperature": 300.0,
        "accuracy": 1.0,
        "max_iterations": 250,
        "min_cell_width": 7.0,
        "supercell": None,
        "min_distance": DEFAULT_MIN_DISTANCE,
        "uncertainty_threshold": None,
        "uncertainty_action": "warn",
        "force_uncertainty": False,
    }

    def __init__(
        self,
        atoms: Atoms | None = None,
        *,
        correction: Correction | None = None,
        **kwargs: Any,
    ) -> None:
        if correction is None:
            raise ParameterError(
                "no correction given: pass a fitted model, or correction=ZeroCorrection() "
                "to run baseline + dispersion alone"
            )
        self._baseline: XTBBaseline | None = None
        self._dispersion: D3Dispersion | None = None
        self._molecules: tuple[weakref.ref, np.ndarray] | None = None
        self._spin_warned: set[tuple[str, int, int]] = set()
        self._cells_checked: set[str] = set()
        Calculator.__init__(self, atoms=atoms, **kwargs)
        self.correction = correction
        _check_double_counting(self.parameters)

    # -- parameters and terms ---------------------------------------------------

    @property
    def correction(self) -> Correction:
        """The learned correction; replacing it resets the results and re-checks it."""
        return self._correction

    @correction.setter
    def correction(self, value: Correction) -> None:
        if not isinstance(value, Correction):
            raise ParameterError(
                f"correction {type(value).__name__} does not follow the Correction protocol "
                "(name, trained_with, predict(atoms, forces=, stress=))"
            )
        self._correction = value
        self._accepts_force_uncertainty = accepts_force_uncertainty(value)
        self._terms_checked = False
        self._molecules = None
        self._spin_warned = set()
        self._cells_checked = set()
        self.reset()

    def set(self, **kwargs: Any) -> dict:
        """Set parameters, forwarding them to the terms that use them."""
        # Check everything before storing anything: a refused set() changes nothing.
        action = kwargs.get("uncertainty_action", "warn")
        if action not in ("warn", "raise"):
            raise ParameterError(f"uncertainty_action must be 'warn' or 'raise', got {action!r}")
        threshold = kwargs.get("uncertainty_threshold")
        if threshold is not None and not threshold > 0:
            raise ParameterError(f"uncertainty_threshold must be positive (eV/Å), got {threshold}")
        if "method" in kwargs:
            kwargs["method"] = canonical_method(kwargs["method"])
        if kwargs.get("dispersion") is not None:
            spec = parse_dispersion_spec(kwargs["dispersion"])
            damping_parameters(spec["method"], spec["damping"], spec["atm"])
        check_baseline_parameters(kwargs)
        if self.parameters is not None:
            _check_double_counting({**self.parameters, **kwargs})
        changed = Calculator.set(self, **kwargs)
        if not changed:
            return changed
        self.reset()
        self._terms_checked = False
        if self._baseline is not None:
            forward = {k: changed[k] for k in _BASELINE_KEYS if k in changed}
            if "baseline_dispersion" in changed:
                forward["remove_dispersion"] = not changed["baseline_dispersion"]
            if forward:
                self._baseline.set(**forward)
        if {"dispersion", "min_distance"} & set(changed):
            self._dispersion = None
        return changed

    @property
    def baseline(self) -> XTBBaseline:
        """The baseline term (built on first use)."""
        if self._baseline is None:
            p = self.parameters
            self._baseline = XTBBaseline(
                **{k: p[k] for k in _BASELINE_KEYS},
                remove_dispersion=not p.baseline_dispersion,
            )
        return self._baseline

    @property
    def dispersion(self) -> D3Dispersion | None:
        """The D3 term, or ``None`` without one (built on first use)."""
        spec = self.parameters.dispersion
        if spec is None:
            return None
        if self._dispersion is None:
            self._dispersion = D3Dispersion.from_spec(
                spec, min_distance=self.parameters.min_distance
            )
        return self._dispersion

    def terms_record(self) -> dict[str, Any]:
        """Records by value of the physical terms: ``{"baseline": ..., "dispersion": ...}``."""
        dispersion = self.dispersion
        return {
            "baseline": self.baseline.record(),
            "dispersion": None if dispersion is None else dispersion.record(),
        }

    def _check_terms_unchanged(self) -> None:
        """The terms are owned by the composite: refuse settings changed behind its back."""
        p = self.parameters
        expected = {("baseline", k): p[k] for k in _BASELINE_KEYS}
        expected["baseline", "remove_dispersion"] = not p.baseline_dispersion
        actual = {key: self.baseline.parameters[key[1]] for key in expected}
        dispersion = self.dispersion
        if dispersion is not None:
            wanted = {**parse_dispersion_spec(p.dispersion), "min_distance": p.min_distance}
            wanted.update(params_tweaks=None, realspace_cutoff=None)
            for name, value in wanted.items():
                expected["dispersion", name] = value
                actual["dispersion", name] = dispersion.parameters[name]
        changed = [".".join(key) for key in expected if expected[key] != actual[key]]
        if changed:
            raise ParameterError(
                f"term setting(s) {changed} were changed on a term directly; change them "
                "with DeltaCalculator.set() so that the composite and its record agree"
            )

    def correction_record(self) -> dict[str, Any]:
        """What identifies the correction: name, content checksum and file, where known."""
        correction = self.correction
        return {
            "name": correction.name,
            "content_sha256": getattr(correction, "content_sha256", None),
            "path": getattr(self, "_model_path", None),
        }

    def todict(self) -> dict[str, Any]:
        """ASE's parameter record plus the correction's identity and the terms by value.

        What produced a result, across the ASE boundary: trajectories, databases
        and saved results key on it (a model's content checksum changes whenever
        its numbers do).
        """
        return {
            **Calculator.todict(self),
            "correction": self.correction_record(),
            "terms": self.terms_record(),
        }

    def check_correction(self) -> None:
        """Refuse a correction fitted against other physical terms.

        Raises
        ------
        TermMismatchError
            Listing every differing value (e.g. a damping parameter or the method).
        """
        trained = getattr(self.correction, "trained_with", None)
        if trained is not None:
            reference = getattr(self.correction, "reference_", None) or {}
            if "reference_dispersion" not in trained and reference.get("dispersion_partner"):
                raise TermMismatchError(
                    f"correction {self.correction.name!r} was fitted before 2026-12-01 on targets "
                    "without the reference's D3 partner: it reproduces the dispersion-free "
                    f"{reference.get('xc', 'functional')}, not the reference method; refit it"
                )
            terms = {k: trained.get(k) for k in ("baseline", "dispersion")}
            lines = record_differences(terms, self.terms_record())
            if lines:
                raise TermMismatchError(
                    f"correction {self.correction.name!r} was fitted against other terms "
                    "than this calculator's (trained != now):\n  " + "\n  ".join(lines)
                )
        self._terms_checked = True

    # -- calculation ------------------------------------------------------------

    def calculate(
        self,
        atoms: Atoms | None = None,
        properties: list[str] | None = None,
        system_changes: list[str] = all_changes,
    ) -> None:
        """Evaluate every term and their sum; see the class docstring."""
        properties = properties or ["energy"]
        owner = atoms  # the caller's object: the molecules stay fixed while it is computed
        Calculator.calculate(self, atoms, properties, system_changes)
        atoms = self.atoms
        want_stress = "stress" in properties
        require_3d_for_stress(atoms, properties)
        self._check_terms_unchanged()
        if not self._terms_checked:
            self.check_correction()
        p = self.parameters
        charge = resolve_charge(atoms, p.charge)
        multiplicity = resolve_multiplicity(atoms, charge, p.multiplicity, f_in_core=True)
        validate_structure(
            atoms,
            supported_elements=SUPPORTED_ELEMENTS,
            method_name=canonical_method(p.method),
            min_distance=p.min_distance,
            charge=charge,
            multiplicity=multiplicity,
            f_in_core=True,
        )
        self._warn_unseen_charge_or_spin(atoms, charge, multiplicity)
        self._warn_unseen_crystal(atoms)
        wanted = ["energy", "forces"] + (["stress"] if want_stress else [])
        self.baseline.check_capabilities(atoms, wanted)

        terms: dict[str, dict[str, Any]] = {
            "baseline": _term_results(self.baseline, atoms, wanted),
        }
        want_forces = True  # the baseline computes forces anyway; ASE caches them
        if getattr(self.correction, "molecular", False):
            self._check_molecules(atoms, owner)
        predicted = predict_correction(
            self.correction,
            atoms,
            forces=want_forces,
            stress=want_stress,
            force_uncertainty=self.wants_force_uncertainty,
            accepts=self._accepts_force_uncertainty,
        )
        terms["correction"] = {
            "energy": float(predicted.energy),
            "forces": predicted.forces,
            "stress": predicted.stress,
        }
        dispersion = self.dispersion
        if dispersion is not None:
            terms["dispersion"] = _term_results(dispersion, atoms, wanted)
        else:
            terms["dispersion"] = {
                "energy": 0.0,
                "forces": np.zeros((len(atoms), 3)),
                "stress": np.zeros(6) if want_stress else None,
            }

        _check_finite(terms)
        self.results["energy"] = sum(t["energy"] for t in terms.values())
        self.results["free_energy"] = self.results["energy"]
        for name, values in terms.items():
            self.results[f"energy_{name}"] = values["energy"]
        for prop, wanted_prop in (("forces", want_forces), ("stress", want_stress)):
            if not wanted_prop:
                continue
            parts = [terms[name][prop] for name in TERMS]
            missing = [name for name, part in zip(TERMS, parts, strict=True) if part is None]
            if missing:
                raise PropertyNotImplementedError(
                    f"term(s) {missing} returned no {prop}; the composite cannot sum them"
                )
            for name, part in zip(TERMS, parts, strict=True):
                self.results[f"{prop}_{name}"] = np.asarray(part, dtype=float)
            self.results[prop] = np.sum(parts, axis=0)
        for part, energy in (predicted.parts or {}).items():
            self.results[f"energy_correction_{part}"] = float(energy)
        if "supercell_repeats" in self.baseline.results:
            self.results["supercell_repeats"] = self.baseline.results["supercell_repeats"]
        if predicted.energy_uncertainty is not None:
            self.results["energy_uncertainty"] = float(predicted.energy_uncertainty)
        if predicted.energies_uncertainty is not None:
            self.results["energies_uncertainty"] = np.asarray(predicted.energies_uncertainty)
        if predicted.forces_uncertainty is not None:
            self.results["forces_uncertainty"] = np.asarray(predicted.forces_uncertainty)
        self._check_domain(predicted)

    @property
    def wants_force_uncertainty(self) -> bool:
        """Whether the correction's force uncertainty is computed: asked for, or a threshold."""
        p = self.parameters
        return bool(p.force_uncertainty) or p.uncertainty_threshold is not None

    def _check_molecules(self, atoms: Atoms, owner: Atoms | None) -> None:
        """Fix the molecules of a new Atoms object; refuse a change of bonding on the same one."""
        if self._molecules is not None and owner is not None:
            known, labels = self._molecules
            if known() is owner and len(labels) == len(atoms):
                check_same_molecules(labels, atoms)
                return
        labels = identify_molecules(atoms).labels
        self._molecules = (weakref.ref(owner), labels) if owner is not None else None

    def _warn_unseen_charge_or_spin(self, atoms: Atoms, charge: int, multiplicity: int) -> None:
        """Warn, once per formula, charge and spin, where the correction never saw them."""
        formula = atoms.get_chemical_formula()
        key = (formula, charge, multiplicity)
        if key in self._spin_warned:
            return
        correction = self.correction
        problems = []
        spins = getattr(correction, "training_multiplicities_", _NOT_RECORDED)
        if spins is None and multiplicity != 1:
            problems.append(
                f"{formula} is an open shell (multiplicity {multiplicity}); the model "
                "does not record the spin states it was trained on (model files written "
                "before they were recorded; the shipped labels are closed shells only)"
            )
        elif spins is not None and spins is not _NOT_RECORDED and multiplicity not in spins:
            kind = "an open shell" if multiplicity != 1 else "a closed shell"
            problems.append(
                f"{formula} is {kind} (multiplicity {multiplicity}); the model was trained "
                f"on multiplicities {', '.join(map(str, sorted(spins)))}"
            )
        charges = getattr(correction, "training_charges_", None)
        if charges is not None and charge not in charges:
            problems.append(
                f"{formula} has charge {charge}; the model was trained on charges "
                f"{', '.join(map(str, sorted(charges)))}"
            )
        if not problems:
            return
        self._spin_warned.add(key)
        warnings.warn(
            "; ".join(problems) + ": its correction here is an extrapolation",
            OutOfDomainWarning,
            stacklevel=3,
        )

    def _warn_unseen_crystal(self, atoms: Atoms) -> None:
        """Warn, once per composition, on a cell of molecules no training cell held.

        Measured (``benchmarks/README.md``, ``bench_crystals.py``): a correction
        trained on ice cells alone moved CO2 I's lattice energy by −46 kJ/mol per
        molecule (terms alone: −7.9 from the reference); molecular clusters do not
        teach the periodic baseline's error either.
        """
        seen = getattr(self.correction, "periodic_molecules_", None)
        composition = atoms.get_chemical_formula()
        if seen is None or not atoms.pbc.all() or composition in self._cells_checked:
            return
        self._cells_checked.add(composition)
        unseen = sorted(set(identify_molecules(atoms).formulas) - set(seen))
        if not unseen:
            return
        trained = f"periodic cells of {', '.join(seen)}" if seen else "no periodic cell"
        warnings.warn(
            f"a periodic cell of {', '.join(unseen)}: the correction was trained on "
            f"{trained}, so its crystal energies here are an extrapolation (trained on ice "
            "alone, one moved CO2 I's lattice energy by -46 kJ/mol per molecule)",
            OutOfDomainWarning,
            stacklevel=3,
        )

    def _check_domain(self, predicted: CorrectionResult) -> None:
        """Warn or raise where the correction's force uncertainty exceeds the threshold."""
        threshold = self.parameters.uncertainty_threshold
        if threshold is None:
            return
        if predicted.forces_uncertainty is None:
            raise ParameterError(
                f"uncertainty_threshold is set but correction {self.correction.name!r} gives "
                "no force uncertainty (a SparseGPR with uncertainty='forces' or 'energy' does)"
            )
        worst = int(np.argmax(predicted.forces_uncertainty))
        value = float(predicted.forces_uncertainty[worst])
        if value <= threshold:
            return
        message = (
            f"force uncertainty {value:.3f} eV/Å on atom {worst} "
            f"({self.atoms.get_chemical_symbols()[worst]}) exceeds the threshold "
            f"{threshold} eV/Å: the structure is outside the model's training domain"
        )
        if self.parameters.uncertainty_action == "raise":
            raise OutOfDomainError(message)
        warnings.warn(message, OutOfDomainWarning, stacklevel=3)

    @classmethod
    def from_model(cls, model: str | Path | Any, **kwargs: Any) -> DeltaCalculator:
        """The composite for a fitted model, with the terms it was trained against.

        Parameters
        ----------
        model : str, pathlib.Path or fitted model
            A model file (``.npz`` written by ``SparseGPR.save``) or a fitted model.
        **kwargs
            Other keywords of the table (e.g. ``uncertainty_threshold``); keywords
            that change the physical terms are refused later by the term check.

        Examples
        --------
        >>> atoms.calc = DeltaCalculator.from_model("model.npz")
        """
        from deltaml.model import SparseGPR

        path = None
        if isinstance(model, (str, Path)):
            path = str(Path(model).resolve())
            model = SparseGPR.load(model)
        trained = model.trained_with
        settings: dict[str, Any] = {}
        if trained is not None:
            settings.update(_settings_from_records(trained))
        settings.update(kwargs)
        calc = cls(correction=model, **settings)
        calc._model_path = path
        return calc


def _settings_from_records(trained: dict[str, Any]) -> dict[str, Any]:
    """Calculator keywords that rebuild the terms of ``trained_with`` records."""
    base = trained["baseline"]
    settings: dict[str, Any] = {
        "method": base["method"],
        "engine": base["engine"],
        "baseline_dispersion": not base["remove_dispersion"],
        "electronic_temperature": base["electronic_temperature_k"],
        "accuracy": base["accuracy"],
        "min_cell_width": base["min_cell_width_a"],
        "supercell": base["supercell"],
    }
    disp = trained.get("dispersion")
    if disp is None:
        settings["dispersion"] = None
    elif disp.get("method") is None:
        raise ParameterError(
            "the model was trained with D3 parameters given by value, not by functional: "
            "build DeltaCalculator(correction=model, dispersion=...) yourself"
        )
    else:
        settings["dispersion"] = f"{disp['damping']}:{disp['method']}" + (
            ":atm" if disp["atm"] else ""
        )
    return settings


def _check_finite(terms: dict[str, dict[str, Any]]) -> None:
    """Refuse NaN or infinite values from any term: never a silent wrong number."""
    for name, values in terms.items():
        for prop, value in values.items():
            if value is not None and not np.isfinite(np.asarray(value, dtype=float)).all():
                raise NonFiniteResultError(
                    f"the {name} term returned non-finite {prop} (NaN or inf); nothing was "
                    "summed. A model file with such values is refused on load: refit or "
                    "reload it; for the baseline, check the structure and SCF settings"
                )


def _check_double_counting(parameters: dict[str, Any]) -> None:
    """Refuse the baseline's own dispersion together with a D3 term."""
    if parameters["baseline_dispersion"] and parameters["dispersion"] is not None:
        raise ParameterError(
            f"baseline_dispersion=True keeps {canonical_method(parameters['method'])}'s own "
            f"dispersion and dispersion={parameters['dispersion']!r} adds D3 on top: "
            "dispersion would be counted twice; set dispersion=None or "
            "baseline_dispersion=False"
        )


def _term_results(calc: Calculator, atoms: Atoms, properties: list[str]) -> dict[str, Any]:
    """Properties of one term calculator, reusing its cache and engine."""
    out: dict[str, Any] = {"stress": None}
    for prop in properties:
        out[prop] = calc.get_property(prop, atoms)
    return out


def energy_budget(atoms: Atoms, calc: DeltaCalculator) -> dict[str, Any]:
    """Energy, largest force and the per-term budget of one structure.

    Parameters
    ----------
    atoms : ase.Atoms
        Structure; not modified (a copy is evaluated).
    calc : DeltaCalculator
        The composite.

    Returns
    -------
    dict
        ``energy`` (eV), ``max_force`` (eV/Å, largest atomic force norm),
        ``terms`` (``{term: energy in eV}``), ``n_atoms``, ``energy_uncertainty``
        (eV or ``None``), ``supercell_repeats`` (list or ``None``) and
        ``records`` (the physical terms by value).
    """
    work = atoms.copy()
    work.calc = calc
    forces = work.get_forces()
    results = calc.results
    repeats = results.get("supercell_repeats")
    return {
        "n_atoms": len(work),
        "energy": float(results["energy"]),
        "max_force": float(np.linalg.norm(forces, axis=1).max()),
        "terms": {name: float(results[f"energy_{name}"]) for name in TERMS},
        "energy_uncertainty": results.get("energy_uncertainty"),
        "supercell_repeats": None if repeats is None else [int(r) for r in repeats],
        "records": calc.terms_record(),
    }
