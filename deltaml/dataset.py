"""Labelled data in and out as extended XYZ, with the checks that keep it honest.

Labels from any code (the embedded PySCF reference, VASP, FHI-aims, CP2K, ORCA, …)
travel as extxyz with ASE's keys: ``energy`` (eV), ``forces`` (eV/Å, per atom),
``stress`` (eV/Å³) and the method record as JSON in ``info["method_record"]``.
The terms stored beside a label for Δ targets travel too: ``energy_<term>`` and
``record_<term>`` in ``info``, ``forces_<term>`` as per-atom arrays.

Reading checks what can be checked: a missing energy, forces or method record,
non-finite values, declared units other than eV/Å, units evident by magnitude
(forces in Hartree/Bohr are 51× smaller than GFN2-xTB's on the same structures),
and method records that differ (inside a file, from the one asked for, or from
the store's on import). Each problem has its own error class.

Data flow: structures, baseline → **dataset** (and store).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write
from ase.units import Bohr, Hartree, Rydberg, kcal, kJ, mol

from deltaml.baseline import XTBBaseline
from deltaml.correction import record_differences
from deltaml.dispersion import D3Dispersion, parse_dispersion_spec
from deltaml.errors import (
    LabelError,
    LabelUnitsError,
    LabelUnitsWarning,
    MethodMismatchError,
    MissingLabelError,
)
from deltaml.files import atomic_path
from deltaml.store import LabelStore, label_key
from deltaml.structures import charge_and_multiplicity, to_voigt

__all__ = [
    "DELTA_BASELINE",
    "ENERGY_UNITS",
    "FORCE_UNITS",
    "check_records",
    "check_units",
    "delta_targets",
    "export_labelled",
    "held_out_units",
    "import_labelled",
    "interaction_groups",
    "interaction_systems",
    "read_labelled",
    "split_systems",
    "write_labelled",
]

#: The Δ-target baseline: GFN2-xTB with its own D4 removed (the composite's default).
DELTA_BASELINE: dict[str, Any] = {"method": "GFN2-xTB", "remove_dispersion": True}

#: Size of one unit in eV: what a number in that unit must be multiplied by.
ENERGY_UNITS = {
    "eV": 1.0,
    "Hartree": Hartree,
    "Rydberg": Rydberg,
    "kcal/mol": kcal / mol,
    "kJ/mol": kJ / mol,
}
#: Size of one force unit in eV/Å.
FORCE_UNITS = {
    "eV/Å": 1.0,
    "Hartree/Bohr": Hartree / Bohr,
    "Hartree/Å": Hartree,
    "Rydberg/Bohr": Rydberg / Bohr,
    "kcal/mol/Å": kcal / mol,
    "kJ/mol/Å": kJ / mol,
}
#: Keys under which some writers declare units; the values they may hold for eV, eV/Å.
_UNIT_KEYS = ("units", "energy_units", "energy_unit", "force_units", "forces_units")
_EV_SPELLINGS = {"ev", "ev/a", "ev/å", "ev/ang", "ev/angstrom", "ev,ev/a", "ev,ev/å"}
#: Keys that other writers use for the energy, named in the error for a missing one.
_OTHER_ENERGY_KEYS = ("Energy", "total_energy", "energy_eV", "E", "free_energy", "TotEnergy")
#: A magnitude check decides only when the slope is this close (factor) to one unit
#: and the reference correlates at least this well with the baseline.
_UNIT_TOLERANCE, _MIN_CORRELATION = 1.6, 0.7
#: Largest coordinate difference (Å) of a molecule and its own structure: the same.
_SAME_GEOMETRY_A = 1e-5
#: Compositions beyond the number of elements needed to compare energies across them.
_MIN_EXTRA_COMPOSITIONS = 4


def write_labelled(path: str | Path, structures: Sequence[Atoms]) -> int:
    """Write labelled structures to extxyz, atomically (a partial file, then renamed).

    Parameters
    ----------
    path : str or pathlib.Path
        Output file.
    structures : sequence of ase.Atoms
        Each with a calculator holding ``energy`` (and ``forces``/``stress``) and
        ``info["method_record"]`` (dict); other ``info`` entries are kept,
        dicts written as JSON.

    Returns
    -------
    int
        Number of structures written.
    """
    path = Path(path)
    frames = []
    for index, atoms in enumerate(structures):
        if atoms.calc is None or "energy" not in atoms.calc.results:
            raise MissingLabelError(f"structure {index} has no energy to write")
        frame = atoms.copy()
        results = {
            k: v for k, v in atoms.calc.results.items() if k in ("energy", "forces", "stress")
        }
        frame.calc = SinglePointCalculator(frame, **results)
        for key, value in list(frame.info.items()):
            if isinstance(value, dict):
                frame.info[key] = json.dumps(value, sort_keys=True)
        frames.append(frame)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as partial:
        write(partial, frames, format="extxyz")
    return len(frames)


def export_labelled(
    store: LabelStore,
    path: str | Path,
    structures: Iterable[Atoms] | None = None,
    *,
    record: dict[str, Any] | None = None,
) -> int:
    """Write the store's labels to extxyz.

    Parameters
    ----------
    store : LabelStore
        Source of the labels.
    path : str or pathlib.Path
        Output file (written atomically).
    structures : iterable of ase.Atoms, optional
        Export these, in this order, keeping their ``info`` (provenance); the ones
        without a done label are left out. Default: every done row.
    record : dict, optional
        Method record the labels of ``structures`` were computed with (needed
        with ``structures``).

    Returns
    -------
    int
        Number of structures written.
    """
    if structures is None:
        return write_labelled(path, store.labelled())
    if record is None:
        raise LabelError(
            "export_labelled: give the method record the structures were labelled with"
        )
    frames = []
    for atoms in structures:
        charge, multiplicity = charge_and_multiplicity(atoms)
        labelled = store.get(label_key(atoms, record, charge, multiplicity))
        if labelled is None:
            continue
        labelled.info = {**atoms.info, **labelled.info}
        frames.append(labelled)
    return write_labelled(path, frames)


def read_labelled(
    path: str | Path,
    *,
    record: dict[str, Any] | None = None,
    require_forces: bool = True,
    check_magnitudes: bool = True,
    max_check_structures: int = 20,
    seed: int = 0,
) -> list[Atoms]:
    """Read labelled structures from extxyz and check them.

    Parameters
    ----------
    path : str or pathlib.Path
        extxyz file with ``energy`` (eV) and ``forces`` (eV/Å) per structure.
    record : dict, optional
        Method record: required where the file has none; must match where it has.
    require_forces : bool, default=True
        Refuse structures without forces.
    check_magnitudes : bool, default=True
        Compare forces and energy differences with GFN2-xTB on up to
        ``max_check_structures`` structures (drawn with ``seed``), to catch
        labels in other units (:func:`check_units`).
    max_check_structures : int, default=20
        Structures evaluated with the baseline for the magnitude check.
    seed : int, default=0
        Seed of that draw.

    Returns
    -------
    list of ase.Atoms
        With a single-point calculator holding the labels and ``info["method_record"]``
        as a dict (also ``record_<term>``).

    Raises
    ------
    MissingLabelError
        A structure without energy, forces (if required) or method record.
    LabelUnitsError
        Units declared or evident by magnitude other than eV and eV/Å.
    MethodMismatchError
        Method records differ between structures or from ``record``.
    LabelError
        Non-finite values, stress on a structure that is not periodic in 3D.
    """
    path = Path(path)
    frames = read(path, index=":", format="extxyz")
    if not frames:
        raise MissingLabelError(f"{path}: no structures")
    for index, atoms in enumerate(frames):
        where = f"{path.name}, structure {index}"
        _check_declared_units(atoms, where)
        _check_results(atoms, where, require_forces)
        _parse_records(atoms, where, record)
    check_records(frames, source=path.name)
    if check_magnitudes:
        rng = np.random.default_rng(seed)
        chosen = rng.permutation(len(frames))[:max_check_structures]
        check_units([frames[i] for i in sorted(chosen)], source=path.name)
    return frames


def _check_declared_units(atoms: Atoms, where: str) -> None:
    for key in _UNIT_KEYS:
        if key in atoms.info:
            value = str(atoms.info[key]).strip().lower().replace(" ", "")
            if value not in _EV_SPELLINGS and not value.startswith("ev"):
                raise LabelUnitsError(
                    f"{where}: declared {key}={atoms.info[key]!r}; deltaml reads energies in "
                    "eV and forces in eV/Å (convert with ase.units)"
                )


def _check_results(atoms: Atoms, where: str, require_forces: bool) -> None:
    results = atoms.calc.results if atoms.calc is not None else {}
    if "energy" not in results:
        others = [k for k in _OTHER_ENERGY_KEYS if k in atoms.info]
        hint = f" (found {others}: rename to 'energy', in eV)" if others else ""
        raise MissingLabelError(f"{where}: no energy (ASE key 'energy'){hint}")
    if not np.isfinite(results["energy"]):
        raise LabelError(f"{where}: energy is {results['energy']}")
    if "forces" not in results:
        if require_forces:
            raise MissingLabelError(
                f"{where}: no forces (per-atom ASE key 'forces', eV/Å); "
                "pass require_forces=False for energy-only labels"
            )
    elif not np.isfinite(results["forces"]).all():
        raise LabelError(f"{where}: forces contain NaN or infinite values")
    if "stress" in results:
        if not atoms.pbc.all():
            raise LabelError(f"{where}: stress given for a structure that is not 3D periodic")
        if not np.isfinite(results["stress"]).all():
            raise LabelError(f"{where}: stress contains NaN or infinite values")
    for name, value in atoms.arrays.items():
        if name.startswith("forces_") and np.asarray(value).shape != (len(atoms), 3):
            raise LabelError(f"{where}: {name} must have shape ({len(atoms)}, 3)")


def _parse_records(atoms: Atoms, where: str, record: dict[str, Any] | None) -> None:
    """Turn JSON records into dicts; fill in or check ``record``."""
    for key in [k for k in atoms.info if k == "method_record" or k.startswith("record_")]:
        value = atoms.info[key]
        if isinstance(value, str):
            try:
                atoms.info[key] = json.loads(value)
            except json.JSONDecodeError as exc:
                raise LabelError(f"{where}: {key} is not JSON: {exc}") from exc
    found = atoms.info.get("method_record")
    if found is None:
        if record is None:
            raise MissingLabelError(
                f"{where}: no method_record; give record= describing the method (code, "
                "version, functional, basis, settings) so that labels are never mixed blindly"
            )
        atoms.info["method_record"] = dict(record)
    elif record is not None:
        differences = record_differences(record, found, path="method_record")
        if differences:
            raise MethodMismatchError(
                f"{where}: method record differs from the one asked for: " + "; ".join(differences)
            )


def check_records(structures: Sequence[Atoms], *, source: str = "labels") -> dict[str, Any]:
    """The common method record of labelled structures; refuse a mixture.

    Raises
    ------
    MethodMismatchError
        Listing the differing keys of the first structure that differs.
    """
    first = structures[0].info["method_record"]
    for index, atoms in enumerate(structures[1:], start=1):
        differences = record_differences(first, atoms.info["method_record"])
        if differences:
            raise MethodMismatchError(
                f"{source}: structure {index} was labelled with another method than "
                "structure 0: " + "; ".join(differences)
            )
    return first


def check_units(structures: Sequence[Atoms], *, source: str = "labels") -> dict[str, float]:
    """Catch labels in other units than eV and eV/Å by comparing with GFN2-xTB.

    A force label in eV/Å agrees with GFN2-xTB's forces on the same structure to
    some tens of percent; one in Hartree/Bohr is 51× smaller. The least-squares
    slope of the labels against the baseline's (forces; energies relative to
    their mean per composition) therefore names the unit. A slope that is
    closest to another unit, within a factor :data:`_UNIT_TOLERANCE`, is refused.
    Where the baseline varies too little or correlates poorly, nothing is
    concluded, and a :class:`~deltaml.errors.LabelUnitsWarning` says so.
    Isolated atoms are left out: the model checks them against the other
    training energies when it fits (:func:`deltaml.offsets.fit_offsets`).

    Returns
    -------
    dict
        ``force_slope`` and ``energy_slope`` (NaN where not determined).

    Raises
    ------
    LabelUnitsError
        Naming the likely unit and the measured slope.
    """
    baseline = XTBBaseline(method="GFN2-xTB")
    ref_f, base_f, by_formula = [], [], {}
    structures = [a for a in structures if len(a) > 1 or a.pbc.any()]
    if not structures:
        return {"force_slope": float("nan"), "energy_slope": float("nan")}
    for atoms in structures:
        probe = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
        probe.calc = baseline
        try:
            energy = probe.get_potential_energy()
            forces = probe.get_forces() if "forces" in atoms.calc.results else None
        except Exception:  # the baseline cannot judge this structure
            continue
        if forces is not None:
            ref_f.append(atoms.calc.results["forces"].ravel())
            base_f.append(forces.ravel())
        by_formula.setdefault(atoms.get_chemical_formula(), []).append(
            (atoms.calc.results["energy"], energy)
        )
    slopes = {"force_slope": float("nan"), "energy_slope": float("nan")}
    if ref_f:
        slopes["force_slope"] = _slope(np.concatenate(ref_f), np.concatenate(base_f), 0.05)
        _judge(slopes["force_slope"], FORCE_UNITS, "forces", "eV/Å", source)
    pairs = [(np.array(v) - np.mean(v, axis=0)) for v in by_formula.values() if len(v) >= 2]
    if pairs:
        stacked = np.concatenate(pairs)
        slopes["energy_slope"] = _slope(stacked[:, 0], stacked[:, 1], 0.02)
    if not np.isfinite(slopes["energy_slope"]):
        slopes["energy_slope"] = _composition_slope(by_formula)
    _judge(slopes["energy_slope"], ENERGY_UNITS, "energies", "eV", source)
    if not (np.isfinite(slopes["energy_slope"]) or np.isfinite(slopes["force_slope"])):
        warnings.warn(
            f"{source}: the units of the labels could not be checked (forces too small, "
            "e.g. at minima, and too few structures of one composition or too few "
            "distinct compositions to compare energies with GFN2-xTB): make sure "
            "energies are in eV and forces in eV/Å",
            LabelUnitsWarning,
            stacklevel=2,
        )
    return slopes


def _composition_slope(by_formula: dict[str, list[tuple[float, float]]]) -> float:
    """Energy slope across compositions (one structure each is enough).

    Both methods' energies are fitted as sums of per-element constants; what the
    constants leave (binding beyond additivity, about 0.5 eV per molecule) is
    compared. Needs :data:`_MIN_EXTRA_COMPOSITIONS` more compositions than elements;
    measured on the shipped minima (29 compositions of H, C, N, O): correlation
    0.95, slope 0.76 for labels in eV, so 0.028 in Hartree.
    """
    formulas = list(by_formula)
    elements = sorted({s for f in formulas for s in Atoms(f).get_chemical_symbols()})
    if len(formulas) < len(elements) + _MIN_EXTRA_COMPOSITIONS:
        return float("nan")
    counts = np.array([[Atoms(f).get_chemical_symbols().count(e) for e in elements]
                       for f in formulas], dtype=float)  # fmt: skip
    energies = np.array([np.mean(by_formula[f], axis=0) for f in formulas])  # (n, 2)
    fitted = counts @ np.linalg.lstsq(counts, energies, rcond=None)[0]
    residual = energies - fitted
    return _slope(residual[:, 0], residual[:, 1], 0.05)


def _slope(reference: np.ndarray, baseline: np.ndarray, min_rms: float) -> float:
    """Slope of reference against baseline through the origin; NaN if undetermined."""
    if np.sqrt(np.mean(baseline**2)) < min_rms or np.std(reference) == 0:
        return float("nan")
    correlation = np.corrcoef(reference, baseline)[0, 1]
    if not np.isfinite(correlation) or correlation < _MIN_CORRELATION:
        return float("nan")
    return float(reference @ baseline / (baseline @ baseline))


def _judge(slope: float, units: dict[str, float], what: str, expected: str, source: str) -> None:
    if not np.isfinite(slope) or slope <= 0:
        return
    # A label in unit u is (value in eV)/size(u): slope ≈ 1/size(u).
    distance = {name: abs(np.log(slope * size)) for name, size in units.items()}
    likely = min(distance, key=distance.get)
    if likely != expected and distance[likely] < np.log(_UNIT_TOLERANCE):
        raise LabelUnitsError(
            f"{source}: {what} look like {likely}, not {expected}: they are {slope:.4g} times "
            f"GFN2-xTB's on the same structures (least squares); multiply by "
            f"{units[likely]:.6g} (ase.units) to convert"
        )


def import_labelled(store: LabelStore, structures: Sequence[Atoms]) -> tuple[int, int]:
    """Add checked labelled structures (from :func:`read_labelled`) to a store.

    Labels are mixed only when their method record matches the store's.

    Returns
    -------
    tuple of int
        (added, already present).

    Raises
    ------
    MethodMismatchError
        The store holds labels of another method.
    """
    if not structures:
        return 0, 0
    record = check_records(structures)
    for existing in store.records():
        differences = record_differences(existing, record)
        if differences:
            raise MethodMismatchError(
                f"{store.url} holds labels of another method: " + "; ".join(differences)
            )
    added = present = 0
    for atoms in structures:
        charge, multiplicity = charge_and_multiplicity(atoms)
        claim = store.claim(atoms, record, charge, multiplicity)
        if claim is None:
            present += 1
            continue
        results = atoms.calc.results
        # Everything the store keeps beside a label comes back in: the terms'
        # energies, forces, stresses and records, and the cost.
        terms = {}
        for key, value in atoms.info.items():
            if key.startswith("energy_") and key not in _UNIT_KEYS and _is_number(value):
                name = key[len("energy_") :]
                terms[name] = {
                    "energy": value,
                    "forces": atoms.arrays.get(f"forces_{name}"),
                    "stress": _voigt(atoms.info.get(f"stress_{name}")),
                    "record": atoms.info.get(f"record_{name}"),
                }
        seconds = atoms.info.get("compute_seconds")
        store.put(
            atoms,
            record,
            energy=results["energy"],
            forces=results.get("forces"),
            stress=_voigt(results.get("stress")),
            terms=terms,
            charge=charge,
            multiplicity=multiplicity,
            claim=claim,
            compute_seconds=float(seconds) if _is_number(seconds) else None,
        )
        added += 1
    return added, present


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)


def _voigt(stress: Any) -> np.ndarray | None:
    return None if stress is None else to_voigt(stress)


def delta_targets(
    structures: Sequence[Atoms],
    *,
    baseline: dict[str, Any] | None = None,
    dispersion: dict[str, Any] | str | None = "partner",
) -> tuple[list[Atoms], dict[str, Any]]:
    """Δ labels: reference method − dispersion-free baseline − D3, with the terms' records.

    The reference *method* of a dispersion-free functional is that functional
    plus its published D3 partner (``method_record["dispersion_partner"]``, e.g.
    revPBE0-D3(BJ)): the label is the functional's energy and the partner is
    added to it here, so that the composite (baseline + Δ + D3) reproduces
    functional + D3. With the default ``dispersion="partner"`` the two D3 energies
    cancel and Δ = label − baseline: dispersion stays a physical term and is not
    learned. (Before 2026-12-01 the partner was not added, Δ held −D3, and the
    composite reproduced the dispersion-free functional; such models are refused
    by the composite.) A reference without a partner (MP2, HF, imported labels)
    is taken as complete.

    The terms stored beside each label (``energy_<term>``, ``forces_<term>``,
    ``record_<term>``, as the labelling runner writes them) are used when their
    record matches the requested term; otherwise the term is computed here.

    Parameters
    ----------
    structures : sequence of ase.Atoms
        Labelled structures (reference ``energy`` in eV, ``forces`` in eV/Å,
        ``stress`` in eV/Å³ where present) with ``info["method_record"]``.
    baseline : dict, optional
        :class:`~deltaml.baseline.XTBBaseline` parameters; default
        :data:`DELTA_BASELINE` (GFN2-xTB without its D4).
    dispersion : dict, "partner" or None, default="partner"
        :class:`~deltaml.dispersion.D3Dispersion` parameters; ``"partner"``: the
        reference's published D3 partner (``method_record["dispersion_partner"]``);
        None: no dispersion term.

    Returns
    -------
    frames : list of ase.Atoms
        Copies whose calculator holds the Δ energy (eV), forces (eV/Å) and stress
        (eV/Å³) where the reference has them; ``info`` is kept, with the
        reference method's total energy (label + D3 partner) added as
        ``info["reference_energy"]`` (eV) and its forces as
        ``arrays["reference_forces"]`` (eV/Å).
    trained_with : dict
        ``{"baseline": record, "dispersion": record or None}``, as
        :meth:`deltaml.calculator.DeltaCalculator.terms_record` gives them, and
        ``"reference_dispersion"``: the record of the D3 partner added to the
        labels (None: none added).
    """
    if not structures:
        raise MissingLabelError("delta_targets: no structures")
    reference = check_records(structures)
    base = XTBBaseline(**(DELTA_BASELINE if baseline is None else baseline))
    calcs: dict[str, Any] = {"baseline": base}
    partner = reference.get("dispersion_partner")
    if dispersion == "partner":
        if partner is None:
            raise LabelError(
                "the reference record names no dispersion_partner: give dispersion= explicitly "
                "(D3Dispersion parameters) or None"
            )
        dispersion = parse_dispersion_spec(partner)
    if dispersion is not None:
        calcs["dispersion"] = D3Dispersion(**dispersion)
    records = {name: calc.record() for name, calc in calcs.items()}
    completion = None if partner is None else D3Dispersion(**parse_dispersion_spec(partner))
    completion_record = None if completion is None else completion.record()
    # With the default D3 term (the partner itself) one evaluation serves both.
    shared = "dispersion" if records.get("dispersion") == completion_record else None
    frames = []
    for atoms in structures:
        results = atoms.calc.results
        wanted = [k for k in ("forces", "stress") if k in results]
        delta = {k: np.array(results[k], dtype=float) for k in wanted}
        delta["energy"] = float(results["energy"])
        if "stress" in delta:
            delta["stress"] = _voigt(delta["stress"])
        partner_term = None
        if completion is not None:
            # The reference method's total: the functional's label plus its D3 partner
            # (the labelling runner stores the partner beside the label as "dispersion").
            partner_term = _term(atoms, "dispersion", completion_record, completion, wanted)
            for key in delta:
                delta[key] = delta[key] + partner_term[key]
        total = {key: np.array(value, copy=True) for key, value in delta.items()}
        for name, calc in calcs.items():
            if name == shared:
                term = partner_term
            else:
                term = _term(atoms, name, records[name], calc, wanted)
            for key in delta:
                delta[key] = delta[key] - term[key]
        frame = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
        frame.info = {**atoms.info, "reference_energy": float(total["energy"])}
        if "forces" in total:  # totals, for plots and tables that show them
            frame.arrays["reference_forces"] = total["forces"]
        frame.calc = SinglePointCalculator(frame, **delta)
        frames.append(frame)
    trained_with = {"baseline": records["baseline"], "dispersion": records.get("dispersion")}
    return frames, {**trained_with, "reference_dispersion": completion_record}


def _term(
    atoms: Atoms, name: str, record: dict[str, Any], calc: Any, wanted: list[str]
) -> dict[str, Any]:
    """A term of a label: the one stored beside it when it matches, else computed."""
    term = _stored_term(atoms, name, record, wanted)
    return _computed_term(atoms, calc, wanted) if term is None else term


def _stored_term(
    atoms: Atoms, name: str, record: dict[str, Any], wanted: list[str]
) -> dict[str, Any] | None:
    """The term stored beside the label, if it is the requested one and complete."""
    stored = atoms.info.get(f"record_{name}")
    if stored is None or f"energy_{name}" not in atoms.info:
        return None
    if isinstance(stored, str):
        stored = json.loads(stored)
    if record_differences(record, stored):
        return None
    term: dict[str, Any] = {"energy": float(atoms.info[f"energy_{name}"])}
    if "forces" in wanted:
        if f"forces_{name}" not in atoms.arrays:
            return None
        term["forces"] = np.asarray(atoms.arrays[f"forces_{name}"], dtype=float)
    if "stress" in wanted:
        if f"stress_{name}" not in atoms.info:
            return None
        term["stress"] = _voigt(atoms.info[f"stress_{name}"])
    return term


def _computed_term(atoms: Atoms, calc: Any, wanted: list[str]) -> dict[str, Any]:
    probe = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    if isinstance(calc, XTBBaseline):
        charge, multiplicity = charge_and_multiplicity(atoms)
        calc.set(charge=charge, multiplicity=multiplicity)
    probe.calc = calc
    term: dict[str, Any] = {"energy": probe.get_potential_energy()}
    if "forces" in wanted:
        term["forces"] = probe.get_forces()
    if "stress" in wanted:
        term["stress"] = probe.get_stress(voigt=True)
    return term


def interaction_groups(structures: Sequence[Atoms]) -> list[tuple[int, list[int]]]:
    """Complexes whose every molecule is also a structure of its own, at the same geometry.

    Such a group makes an interaction energy an exact difference of labels:
    E_int = E(complex) − Σ E(molecule). A molecule matches when a single-molecule,
    non-periodic structure has the same elements and positions in the same order,
    up to a translation, to 1e-5 Å (a rigid scan moves a monomer; it does not
    change it). Molecules are found by :func:`deltaml.crystals.whole_molecules`.

    Parameters
    ----------
    structures : sequence of ase.Atoms
        Any structures; periodic ones are skipped.

    Returns
    -------
    list of (int, list of int)
        Index of each complex and the indices of its molecules, in the order of
        the complex's molecules (first atom first).
    """
    from deltaml.crystals import whole_molecules

    # Matched with a tolerance, not by rounding: a rounded key splits two equal
    # geometries whose coordinates straddle a rounding boundary (it lost 3 of 162
    # scan points of the shipped dimers).
    monomers: dict[bytes, list[tuple[np.ndarray, int]]] = {}
    complexes = []
    for index, atoms in enumerate(structures):
        if atoms.pbc.any():
            continue
        molecules, positions = whole_molecules(atoms)
        if len(molecules.formulas) == 1:
            kind = atoms.numbers.astype(np.int64).tobytes()
            monomers.setdefault(kind, []).append((positions - positions.mean(axis=0), index))
            continue
        parts = [
            (atoms.numbers[molecules.labels == m], positions[molecules.labels == m])
            for m in range(len(molecules.formulas))
        ]
        complexes.append((index, parts))

    def match(numbers: np.ndarray, positions: np.ndarray) -> int | None:
        centred = positions - positions.mean(axis=0)
        for candidate, index in monomers.get(numbers.astype(np.int64).tobytes(), []):
            if np.abs(candidate - centred).max() < _SAME_GEOMETRY_A:
                return index
        return None

    groups = []
    for index, parts in complexes:
        found = [match(numbers, positions) for numbers, positions in parts]
        if all(m is not None for m in found):
            groups.append((index, found))
    return groups


def interaction_systems(groups: Sequence[tuple[int, Sequence[int]]], count: int) -> np.ndarray:
    """Label of the interaction system each structure belongs to.

    An interaction system is a connected set of complexes and molecules: a complex,
    its molecules, and every other complex sharing one of them (a rigid scan and its
    minimum share a monomer). Such a unit must not be split between training and
    held-out data, or an interaction energy would be half seen. Every structure in
    no group is a system of its own.

    Parameters
    ----------
    groups : sequence of (int, sequence of int)
        Complexes and their molecules (:func:`interaction_groups`).
    count : int
        Number of structures (every index in ``groups`` is below it).

    Returns
    -------
    numpy.ndarray of int, shape (count,)
        System label of each structure, 0 … n_systems − 1, numbered in order of
        each system's first structure.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    rows = [index for index, parts in groups for _ in parts]
    cols = [k for _, parts in groups for k in parts]
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(count, count))
    _, labels = connected_components(graph, directed=False)
    # connected_components numbers systems in order of its search; renumber them by
    # their first structure so that the labels do not depend on its traversal.
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    return np.argsort(np.argsort(first))[inverse]


def held_out_units(frames: Sequence[Atoms]) -> np.ndarray:
    """Label of the unit each structure is held out with: never split, only by frame.

    A unit joins an interaction system (a complex, its molecules and every complex
    sharing one, :func:`interaction_systems`: an interaction energy is never half
    seen) with every structure of the same named system (``info["system"]``: the
    start, strained, rattled and MD frames of one crystal, the contact dimers cut
    from one crystal), which are too alike for one to test the other. A structure
    in neither is a unit of its own.

    Parameters
    ----------
    frames : sequence of ase.Atoms
        Labelled structures (monomers matched to complexes by :func:`interaction_groups`).

    Returns
    -------
    numpy.ndarray of int, shape (len(frames),)
        Unit of each structure, 0 … n_units − 1, numbered in order of each unit's
        first structure.
    """
    groups = [(i, list(parts)) for i, parts in interaction_groups(frames)]
    first_of: dict[str, int] = {}
    for k, atoms in enumerate(frames):
        name = atoms.info.get("system")
        if name is not None:
            # A named structure joins the first of its name, as a one-molecule "complex".
            groups.append((first_of.setdefault(str(name), k), [k]))
    return interaction_systems(groups, len(frames))


def split_systems(
    frames: Sequence[Atoms], fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Seeded split into kept and held-out indices, each system on one side.

    Units are :func:`held_out_units`: interaction systems, so that the held-out
    set holds whole interaction energies, which calibrate their σ, joined with the
    structures of one named system (``info["system"]``); every other structure is
    a unit of its own. Units are drawn in a seeded order until about ``fraction``
    of the structures are held out.

    Parameters
    ----------
    frames : sequence of ase.Atoms
        Labelled structures (monomers matched to complexes by
        :func:`interaction_groups`).
    fraction : float
        Share of the structures to hold out, 0 … 1.
    seed : int
        Seed of the order in which units are drawn.

    Returns
    -------
    kept, held : list of int
        Sorted indices into ``frames``.
    """
    count = len(frames)
    unit = held_out_units(frames)
    target = round(fraction * count)
    held: list[int] = []
    for u in np.random.default_rng(seed).permutation(unit.max() + 1 if count else 0):
        if len(held) >= target:
            break
        held.extend(np.flatnonzero(unit == u).tolist())
    held_set = set(held)
    return [i for i in range(count) if i not in held_set], sorted(held)
