"""Polymorph ranking: relax candidate crystals, rank them by lattice energy.

For every method (e.g. the composite and the baseline alone) each candidate
crystal is relaxed (positions and cell) and so is the gas-phase molecule; the
lattice energy per formula unit is

    E_latt = E_crystal / Z − Σ_g n_g E_gas,g

with Z the number of formula units in the cell (counted from the molecules
found by connectivity) and n_g the number of molecules g in a formula unit.
Relative energies are taken to the most stable candidate of each method.

Uncertainty: when a method's correction has ``energy_covariance`` (the sparse
GP of :mod:`deltaml.model`), the covariance of the lattice energies is
propagated from the posterior covariance of the correction energies of all
relaxed structures, crystals and gas molecules together. Energy *differences*
between similar polymorphs are then more certain than either energy, because
their errors are correlated. Baseline and D3 carry no statistical error.

Every relaxation is written to ``workdir`` as it finishes (extxyz, atomically,
with its summary); a rerun with the same inputs and settings reads it instead
of relaxing again. A candidate whose relaxation fails (its cell collapses, the
SCF fails, ...) is recorded as failed with the reason (``Ranking.failed``, the
``failed_m`` column of the table) and the others are ranked; it is not written
to ``workdir``, so a rerun tries it again. A gas-phase molecule that fails is
an error: no lattice energy can be formed without it.

Energies in the table: kJ/mol per formula unit (1 eV = 96.485 kJ/mol);
densities g/cm³; cell lengths Å and angles degrees.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import CalculationFailed, Calculator
from ase.io import read, write
from ase.units import kJ, mol

from deltaml.crystals import (
    bonding_changes,
    density_g_cm3,
    formula_units,
    ice_polymorph,
    identify_molecules,
)
from deltaml.errors import DeltaMLError, ParameterError
from deltaml.files import atomic_path
from deltaml.simulation import relax
from deltaml.structures import structure_digest

log = logging.getLogger(__name__)

#: eV per kJ/mol.
KJ_PER_MOL = kJ / mol

#: Version of the files in the work folder (a different one is relaxed again).
RELAXATION_FORMAT = 2

_CELL_KEYS = ("a", "b", "c", "alpha", "beta", "gamma")


class BondingChangedWarning(UserWarning):
    """A relaxation broke or formed covalent bonds: that candidate is not the same crystal."""


@dataclass
class Relaxed:
    """One relaxation of one structure with one method.

    Attributes
    ----------
    name, method : str
    initial, final : ase.Atoms
        Geometry before and after (no calculator attached).
    summary : dict
        :func:`deltaml.simulation.relax`'s summary plus ``energy_ev`` (final, eV),
        ``correction_energy_ev`` where a correction exists, ``bonds_broken`` and
        ``bonds_formed``.
    """

    name: str
    method: str
    initial: Atoms
    final: Atoms
    summary: dict[str, Any]

    @property
    def bonding_changed(self) -> bool:
        return bool(self.summary["bonds_broken"] or self.summary["bonds_formed"])

    @property
    def failed(self) -> str | None:
        """Why the relaxation failed (then ``final`` is the start), or None."""
        return self.summary.get("failed")


def read_candidates(
    sources: Sequence[str | Path], *, ice_min_width: float = 7.0, seed: int = 0
) -> dict[str, Atoms]:
    """Candidate crystals from files (CIF, extxyz, …) or ice phase names.

    Parameters
    ----------
    sources : sequence of str or path
        ``ice:NAME`` (a phase of :data:`deltaml.crystals.ICE_PHASES`, built by
        GenIce2) or a file ASE can read. A file with several frames gives
        ``stem-0``, ``stem-1``, … unless a frame has ``info["name"]``.
    ice_min_width : float, default=7.0
        Cell width of the ice builders, Å.
    seed : int, default=0
        Proton arrangement of disordered ice phases.

    Returns
    -------
    dict of str to ase.Atoms
        Candidates by name, in the order given.
    """
    out: dict[str, Atoms] = {}
    for source in sources:
        text = str(source)
        if text.startswith("ice:"):
            frames = [ice_polymorph(text[4:], min_width=ice_min_width, seed=seed)]
            names = [f"ice {text[4:]}"]
        else:
            path = Path(text)
            if not path.is_file():
                raise ParameterError(f"candidate {text!r} is neither ice:NAME nor a file")
            frames = read(path, index=":")
            names = [
                str(f.info.get("name", path.stem if len(frames) == 1 else f"{path.stem}-{k}"))
                for k, f in enumerate(frames)
            ]
        for name, atoms in zip(names, frames, strict=True):
            if name in out:
                raise ParameterError(f"two candidates are named {name!r}")
            if not atoms.pbc.all():
                raise ParameterError(f"candidate {name!r} is not periodic in three directions")
            out[name] = atoms
    if not out:
        raise ParameterError("no candidates given")
    return out


def formula_unit(molecules: Sequence[Atoms]) -> dict[str, int]:
    """Formula unit (molecule formula → count) from the gas-phase molecules.

    Each structure must be a single molecule; the same molecule may be given twice
    (e.g. a 1:2 co-crystal).
    """
    if not molecules:
        raise ParameterError("no gas-phase molecule given")
    unit: dict[str, int] = {}
    for gas in molecules:
        found = identify_molecules(gas)
        if len(found.formulas) != 1:
            raise ParameterError(
                f"a gas-phase structure holds {len(found.formulas)} molecules "
                f"({found.count}); give one molecule per structure"
            )
        unit[found.formulas[0]] = unit.get(found.formulas[0], 0) + 1
    return unit


def rank_polymorphs(
    candidates: Mapping[str, Atoms],
    molecules: Sequence[Atoms],
    methods: Mapping[str, Callable[[], Calculator]],
    *,
    workdir: str | Path | None = None,
    relax_structures: bool = True,
    fmax: float = 0.01,
    steps: int = 300,
    optimizer: str = "BFGS",
    symmetry: bool = False,
    maxstep: float = 0.2,
    stress_tol_gpa: float | None = 0.05,
    progress: bool = False,
) -> Ranking:
    """Relax candidates and gas-phase molecules with each method; rank by lattice energy.

    Parameters
    ----------
    candidates : mapping of str to ase.Atoms
        Crystal structures by name (3D-periodic).
    molecules : sequence of ase.Atoms
        The isolated molecule(s) of one formula unit (one molecule each).
    methods : mapping of str to callable
        Method name → a function returning a fresh ASE calculator. The first is
        the primary method (the table is sorted by it).
    workdir : path, optional
        Folder of the relaxed structures (resume); without it nothing is kept.
    relax_structures : bool, default=True
        False: single points on the given geometries.
    fmax : float, default=0.01
        Force threshold, eV/Å (the cell filter scales the stress alike).
    steps : int, default=300
        Most optimizer steps per relaxation (unconverged ones are reported).
    optimizer : {"BFGS", "PreconLBFGS", "FIRE", "LBFGS"}, default="BFGS"
        "PreconLBFGS" (ASE's, ``Exp`` preconditioner, see :func:`deltaml.simulation.relax`)
        relaxes GFN2-xTB ice cells in up to half the calls of BFGS (Ih, VI; one
        or two more on Ic, VIII) to the same lattice energy, but follows the
        cluster-trained composite's runaway expansions further (ice XIII: 11× the
        volume, unconverged), so it is not the default (``benchmarks/README.md``,
        bench_ranking). Gas molecules are relaxed with BFGS when it is chosen.
    symmetry : bool, default=False
        Keep each crystal's starting space group (spglib).
    maxstep : float, default=0.2
        Largest optimizer step, Å.
    stress_tol_gpa : float or None, default=0.05
        Stress threshold of the cell relaxation, GPa (None: ASE's cell filter
        default, fmax·N/V, which for molecular crystals can leave ~1 GPa).
    progress : bool, default=False
        Progress bar over candidates.

    Returns
    -------
    Ranking
    """
    from tqdm.auto import tqdm

    if not methods:
        raise ParameterError("no method given")
    unit = formula_unit(molecules)
    z = {}
    for name, atoms in candidates.items():
        try:
            z[name] = formula_units(identify_molecules(atoms), unit)
        except ParameterError as exc:
            raise ParameterError(f"candidate {name!r}: {exc}") from exc
    settings = {
        "relax": relax_structures, "fmax": fmax, "steps": steps, "optimizer": optimizer,
        "symmetry": symmetry, "maxstep": maxstep, "stress_tol_gpa": stress_tol_gpa,
        "format": RELAXATION_FORMAT,
    }  # fmt: skip
    # Every saved relaxation is keyed by the full record of what produced it: the
    # calculator's parameters, the model's content checksum and the terms by value.
    records = {method: calculator_record(factory()) for method, factory in methods.items()}
    gas = {f"gas {k} {m.get_chemical_formula('hill')}": m for k, m in enumerate(molecules)}
    jobs = [(n, a, True) for n, a in candidates.items()] + [(n, a, False) for n, a in gas.items()]
    results: dict[str, dict[str, Relaxed]] = {m: {} for m in methods}
    bar = tqdm(total=len(jobs) * len(methods), disable=not progress, desc="rank", unit="relax")
    for method, factory in methods.items():
        for name, atoms, is_crystal in jobs:
            bar.set_postfix_str(f"{method}: {name}")
            keyed = {**settings, "calculator": records[method]}
            try:
                done = _relax_one(name, method, atoms, factory, keyed, is_crystal, workdir)
            except (DeltaMLError, CalculationFailed) as exc:
                if not is_crystal:
                    raise type(exc)(f"{method} / {name}: {exc}") from exc
                log.warning("%s / %s: failed, left out of the ranking (%s)", method, name, exc)
                done = _failed(name, method, atoms, exc)
            results[method][name] = done
            bar.update(1)
    bar.close()
    covariances = {}
    for method, factory in methods.items():
        relaxed = [n for n in candidates if not results[method][n].failed]
        covariances[method] = _correction_covariance(factory, results[method], relaxed, list(gas))
    return Ranking(
        candidates=list(candidates),
        gas=list(gas),
        z=z,
        unit=unit,
        results=results,
        correction_covariance=covariances,
        records=records,
    )


def _relax_one(
    name: str,
    method: str,
    atoms: Atoms,
    factory: Callable[[], Calculator],
    settings: dict[str, Any],
    is_crystal: bool,
    workdir: str | Path | None,
) -> Relaxed:
    """Relax (or read back) one structure with one method."""
    key = _job_key(atoms, method, settings, is_crystal)
    path = None
    if workdir is not None:
        path = Path(workdir) / _safe(method) / f"{_safe(name)}.extxyz"
        done = _read_relaxed(path, key)
        if done is not None:
            log.info("%s / %s: read back from %s", method, name, path)
            return Relaxed(name, method, atoms.copy(), done[0], done[1])
    work = atoms.copy()
    work.calc = factory()
    if settings["relax"]:
        summary = relax(
            work, fmax=settings["fmax"], steps=settings["steps"], cell=is_crystal,
            optimizer=_optimizer(settings["optimizer"], is_crystal),
            symmetry=settings["symmetry"] and is_crystal,
            maxstep=settings["maxstep"],
            stress_tol_gpa=settings["stress_tol_gpa"] if is_crystal else None,
        )  # fmt: skip
        if not summary["converged"]:
            log.warning("%s / %s: not converged in %d steps", method, name, summary["steps"])
    else:
        summary = {"converged": True, "steps": 0}
    summary["energy_ev"] = float(work.get_potential_energy())
    if "energy_correction" in work.calc.results:
        summary["correction_energy_ev"] = float(work.calc.results["energy_correction"])
    changes = bonding_changes(atoms, work)
    summary["bonds_broken"] = [list(p) for p in changes["broken"]]
    summary["bonds_formed"] = [list(p) for p in changes["formed"]]
    if changes["broken"] or changes["formed"]:
        warnings.warn(
            f"{method} / {name}: relaxation changed the bonding ({len(changes['broken'])} "
            f"bonds broken, {len(changes['formed'])} formed): not the same crystal",
            BondingChangedWarning,
            stacklevel=3,
        )
    final = work.copy()
    final.calc = None
    if path is not None:
        _write_relaxed(path, final, summary, key)
    return Relaxed(name, method, atoms.copy(), final, summary)


def _optimizer(optimizer: str, is_crystal: bool) -> str:
    """The optimizer of one relaxation: gas molecules (few atoms, no cell) take BFGS
    where the crystals take PreconLBFGS, whose preconditioner needs a periodic cell."""
    return "BFGS" if optimizer == "PreconLBFGS" and not is_crystal else optimizer


def _failed(name: str, method: str, atoms: Atoms, exc: Exception) -> Relaxed:
    """The record of a relaxation that raised: the start geometry and the reason."""
    reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"
    summary = {
        "failed": reason, "converged": False, "steps": 0, "bonds_broken": [],
        "bonds_formed": [],
    }  # fmt: skip
    return Relaxed(name, method, atoms.copy(), atoms.copy(), summary)


def calculator_record(calc: Calculator) -> dict[str, Any]:
    """JSON-safe record of a calculator: its class and ``todict()`` (parameters, model)."""
    return json.loads(
        json.dumps({"class": type(calc).__name__, **calc.todict()}, sort_keys=True, default=str)
    )


def _job_key(atoms: Atoms, method: str, settings: dict[str, Any], is_crystal: bool) -> str:
    """SHA-256 of the input structure, the method name and the settings."""
    digest = structure_digest(hashlib.sha256(), atoms)
    digest.update(json.dumps([method, settings, is_crystal], sort_keys=True).encode())
    return digest.hexdigest()


def _safe(name: str) -> str:
    """A file name for ``name``: readable, and distinct for distinct names (``x/y`` ≠ ``x_y``)."""
    readable = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    if readable == name:
        return name
    return f"{readable}-{hashlib.sha256(name.encode()).hexdigest()[:10]}"


def _write_relaxed(path: Path, atoms: Atoms, summary: dict[str, Any], key: str) -> None:
    """Write atomically: a partial file must never be read back as a finished relaxation."""
    path.parent.mkdir(parents=True, exist_ok=True)
    out = atoms.copy()
    out.info = {"ranking_key": key, "ranking_summary": json.dumps(summary, default=float)}
    with atomic_path(path) as tmp:
        write(tmp, out, format="extxyz")


def _read_relaxed(path: Path, key: str) -> tuple[Atoms, dict[str, Any]] | None:
    if not path.is_file():
        return None
    try:
        atoms = read(path, format="extxyz")
        stored_key = atoms.info.get("ranking_key")
        summary = json.loads(atoms.info["ranking_summary"]) if stored_key == key else None
    except Exception as exc:  # a truncated or foreign file: compute again, never crash
        log.warning("%s cannot be read back (%s): relaxing again", path, exc)
        return None
    if summary is None:
        log.info("%s holds another input, settings or model: relaxing again", path)
        return None
    atoms.info = {}
    atoms.calc = None
    return atoms, summary


def _correction_covariance(
    factory: Callable[[], Calculator],
    relaxed: dict[str, Relaxed],
    crystals: list[str],
    gas: list[str],
) -> np.ndarray | None:
    """Posterior covariance of the correction energies (eV²), crystals then gas; or None."""
    correction = getattr(factory(), "correction", None)
    if (
        not hasattr(correction, "energy_covariance")
        or getattr(correction, "uncertainty", 1) is None
    ):
        return None
    return correction.energy_covariance([relaxed[n].final for n in crystals + gas])


@dataclass
class Ranking:
    """Relaxed candidates of every method and the lattice energies they give.

    Attributes
    ----------
    candidates, gas : list of str
        Candidate names (input order) and gas-phase structure names.
    z : dict of str to int
        Formula units per cell.
    unit : dict of str to int
        The formula unit (molecule formula → count).
    results : dict
        ``results[method][name]`` is a :class:`Relaxed`.
    correction_covariance : dict
        Per method, the correction energies' covariance (eV², crystals then gas),
        or None where the method has no uncertainty.
    records : dict
        Per method, :func:`calculator_record` of its calculator (the model's
        content checksum among it).
    """

    candidates: list[str]
    gas: list[str]
    z: dict[str, int]
    unit: dict[str, int]
    results: dict[str, dict[str, Relaxed]]
    correction_covariance: dict[str, np.ndarray | None]
    records: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def methods(self) -> list[str]:
        return list(self.results)

    @property
    def failed(self) -> dict[str, dict[str, str]]:
        """Per method, the candidates whose relaxation failed and why (JSON-safe)."""
        return {
            method: {n: self.results[method][n].failed for n in self.candidates
                     if self.results[method][n].failed}
            for method in self.methods
        }  # fmt: skip

    def ranked(self, method: str) -> list[str]:
        """Candidates with a lattice energy for ``method`` (not failed), input order."""
        return [n for n in self.candidates if not self.results[method][n].failed]

    def _gas_energy(self, method: str) -> float:
        return sum(self.results[method][g].summary["energy_ev"] for g in self.gas)

    def lattice_energies(self, method: str) -> dict[str, float]:
        """Lattice energy per formula unit of every candidate not failed, kJ/mol."""
        gas = self._gas_energy(method)
        return {
            n: (self.results[method][n].summary["energy_ev"] / self.z[n] - gas) / KJ_PER_MOL
            for n in self.ranked(method)
        }

    def covariance(self, method: str) -> np.ndarray | None:
        """Covariance of the lattice energies ((kJ/mol)², :meth:`ranked` candidates in order)."""
        cov = self.correction_covariance.get(method)
        if cov is None:
            return None
        ranked = self.ranked(method)
        n = len(ranked)
        # E_latt,i = E_i / Z_i − Σ_g E_g: a linear map of the correction energies.
        mapping = np.zeros((n, n + len(self.gas)))
        mapping[np.arange(n), np.arange(n)] = [1.0 / self.z[c] for c in ranked]
        mapping[:, n:] = -1.0
        return mapping @ cov @ mapping.T / KJ_PER_MOL**2

    def relative_uncertainty(self, first: str, second: str, method: str) -> float:
        """Standard deviation of E_latt(first) − E_latt(second), kJ/mol (NaN: no model)."""
        cov = self.covariance(method)
        if cov is None:
            return float("nan")
        ranked = self.ranked(method)
        return _difference_sigma(cov, ranked.index(first), ranked.index(second))

    def table(self) -> Any:
        """pandas DataFrame, one row per candidate, sorted by the primary method.

        Columns per method m: ``E_latt_m`` and ``rel_m`` (kJ/mol per formula
        unit; rel to the most stable candidate of m), ``sigma_latt_m`` and
        ``sigma_rel_m`` (kJ/mol, where m has an uncertainty), ``rank_m``,
        ``density_m`` (g/cm³, relaxed), ``converged_m``, ``steps_m``,
        ``max_stress_gpa_m`` (largest stress component left, GPa),
        ``bonding_changed_m``, ``failed_m`` (why the relaxation failed, empty
        if it did not; the energy columns are then NaN), the relaxed cell
        ``a_m`` … ``gamma_m`` (Å,
        degrees); and ``Z``, ``formula``, ``density_initial`` and the cell before
        (``a_initial`` …).
        """
        import pandas as pd

        first = self.methods[0]
        rows: dict[str, dict[str, Any]] = {n: {} for n in self.candidates}
        for name in self.candidates:
            start = self.results[first][name].initial
            rows[name].update(
                formula=start.get_chemical_formula("hill"), Z=self.z[name],
                density_initial=density_g_cm3(start),
            )  # fmt: skip
            for key, value in zip(_CELL_KEYS, start.cell.cellpar(), strict=True):
                rows[name][f"{key}_initial"] = float(value)
            for method in self.methods:
                final = self.results[method][name].final.cell.cellpar()
                for key, value in zip(_CELL_KEYS, final, strict=True):
                    rows[name][f"{key}_{method}"] = float(value)
        for method in self.methods:
            energies = self.lattice_energies(method)
            ranked = self.ranked(method)
            best = min(energies, key=energies.get) if energies else None
            order = sorted(ranked, key=energies.get)
            cov = self.covariance(method)
            for name in self.candidates:
                done = self.results[method][name]
                rows[name].update(
                    {
                        f"E_latt_{method}": energies.get(name, np.nan),
                        f"rel_{method}": energies[name] - energies[best]
                        if name in energies else np.nan,
                        f"rank_{method}": order.index(name) + 1 if name in energies else np.nan,
                        f"density_{method}": density_g_cm3(done.final),
                        f"converged_{method}": bool(done.summary["converged"]),
                        f"steps_{method}": int(done.summary["steps"]),
                        f"max_stress_gpa_{method}": done.summary.get("max_stress_gpa", np.nan),
                        f"bonding_changed_{method}": done.bonding_changed,
                        f"failed_{method}": done.failed or "",
                    }
                )  # fmt: skip
                if cov is not None and name in energies:
                    i, b = ranked.index(name), ranked.index(best)
                    rows[name][f"sigma_latt_{method}"] = float(np.sqrt(max(cov[i, i], 0.0)))
                    rows[name][f"sigma_rel_{method}"] = _difference_sigma(cov, i, b)
        table = pd.DataFrame.from_dict(rows, orient="index")
        table.index.name = "candidate"
        return table.sort_values(f"E_latt_{first}", na_position="last")

    def to_csv(self, path: str | Path) -> Path:
        """Write :meth:`table` as CSV; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.table().to_csv(path, float_format="%.6g")
        return path

    def compare(self, reference: Mapping[str, float] | str | Path, method: str) -> dict[str, Any]:
        """Compare a method's ranking with reference lattice energies.

        Parameters
        ----------
        reference : mapping or path
            Candidate name → reference lattice (or relative) energy in kJ/mol,
            or a CSV with columns ``candidate`` and ``energy_kj_mol``. Only the
            candidates present in both are compared; only differences matter.
        method : str

        Returns
        -------
        dict
            ``n``; ``mae_relative_kj_mol`` (MAE of energies relative to the
            reference's most stable candidate); ``spearman`` (rank correlation);
            ``wrong_pairs``: list of dicts (``lower``, ``higher`` in the
            reference; ``gap_reference``, ``gap_predicted`` = E(higher) −
            E(lower), kJ/mol; ``sigma`` of the predicted gap).
        """
        from scipy.stats import spearmanr

        ref = _read_reference(reference)
        energies = self.lattice_energies(method)
        names = [n for n in self.candidates if n in ref]
        if len(names) < 2:
            raise ParameterError(
                f"the reference names {len(names)} of the candidates; at least 2 are needed "
                f"(candidates: {self.candidates})"
            )
        best = min(names, key=ref.get)
        rel_ref = np.array([ref[n] - ref[best] for n in names])
        rel_pred = np.array([energies[n] - energies[best] for n in names])
        wrong = []
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                low, high = (a, b) if ref[a] <= ref[b] else (b, a)
                gap_ref, gap_pred = ref[high] - ref[low], energies[high] - energies[low]
                if gap_ref > 0 and gap_pred < 0:
                    wrong.append(
                        {
                            "lower": low, "higher": high, "gap_reference": gap_ref,
                            "gap_predicted": gap_pred,
                            "sigma": self.relative_uncertainty(high, low, method),
                        }
                    )  # fmt: skip
        return {
            "method": method,
            "n": len(names),
            "mae_relative_kj_mol": float(np.mean(np.abs(rel_pred - rel_ref))),
            "spearman": float(spearmanr(rel_pred, rel_ref).statistic),
            "wrong_pairs": wrong,
        }

    def plot(self, path: str | Path) -> Path:
        """Energy ladder (PNG): relative lattice energy per method, error bars where known."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        table = self.table()
        fig, ax = plt.subplots(figsize=(3.2 * len(self.methods) + 1.5, 5.0))
        levels = [table[f"rel_{m}"].dropna() for m in self.methods]
        span = max((float(np.ptp(x)) for x in levels if len(x)), default=0.0) or 1.0
        for k, method in enumerate(self.methods):
            rel = table[f"rel_{method}"].dropna().sort_values()  # failed candidates: no level
            sigma = table.get(f"sigma_rel_{method}")
            # Error bars side by side along the level, labels pushed apart vertically.
            xs = np.linspace(k - 0.25, k + 0.25, len(rel)) if len(rel) > 1 else [k]
            label_y = _spread(rel.to_numpy(), 0.035 * span)
            for x, y, (name, value) in zip(xs, label_y, rel.items(), strict=True):
                ax.hlines(value, k - 0.3, k + 0.3, color=f"C{k}", lw=2)
                if sigma is not None:
                    ax.errorbar(x, value, yerr=sigma[name], color=f"C{k}", capsize=3, lw=1)
                ax.annotate(str(name), (k + 0.33, y), fontsize=7, va="center")
        ax.set_xticks(range(len(self.methods)), self.methods)
        ax.set_xlim(-0.6, len(self.methods) - 0.05)
        ax.set_ylabel("relative lattice energy (kJ/mol per formula unit)")
        ax.set_title("polymorph ranking (error bars: ±1σ of the model)")
        fig.tight_layout()
        fig.savefig(path, dpi=150)
        plt.close(fig)
        return path


def _difference_sigma(cov: np.ndarray, i: int, j: int) -> float:
    """Standard deviation of x_i − x_j from the covariance of x."""
    return float(np.sqrt(max(cov[i, i] + cov[j, j] - 2.0 * cov[i, j], 0.0)))


def _spread(values: np.ndarray, gap: float) -> np.ndarray:
    """Sorted ``values`` moved up just enough that neighbours are ``gap`` apart (labels)."""
    out = np.array(values, dtype=float)
    for i in range(1, len(out)):
        out[i] = max(out[i], out[i - 1] + gap)
    return out


def _read_reference(reference: Mapping[str, float] | str | Path) -> dict[str, float]:
    if isinstance(reference, Mapping):
        return {str(k): float(v) for k, v in reference.items()}
    import pandas as pd

    frame = pd.read_csv(reference)
    missing = {"candidate", "energy_kj_mol"} - set(frame.columns)
    if missing:
        raise ParameterError(
            f"reference file {reference} lacks column(s) {sorted(missing)}; it has "
            f"{list(frame.columns)} (energies in kJ/mol per formula unit)"
        )
    names, values = frame["candidate"].astype(str), frame["energy_kj_mol"].astype(float)
    return dict(zip(names, values, strict=True))
