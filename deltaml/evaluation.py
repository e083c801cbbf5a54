"""Errors of a fitted Δ-model against reference labels, and the plots that show them.

The composite predicts reference energies as baseline + D3 + correction, so its
error on a labelled structure equals the correction's error on the Δ target
(reference − baseline − D3). "Baseline alone" means baseline + D3 + the model's
per-element offsets (a constant per element is needed to compare GFN-xTB with
all-electron DFT totals at all); its error is minus the Δ target left after
the offsets.

Units: energies in meV/atom and kcal/mol per structure, forces in eV/Å.

Data flow: model, labelled data → **evaluation** → CLI, benchmarks, demo.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.data import chemical_symbols
from ase.units import kcal, mol
from numpy.typing import NDArray

from deltaml.crystals import BOND_SCALE, bonded_pairs

__all__ = [
    "GAUSSIAN_COVERAGE",
    "Predictions",
    "bonds",
    "calibration",
    "coverage",
    "cross_calibrated_fit",
    "delta_targets_for",
    "error_table",
    "errors",
    "interaction_coverage",
    "interaction_energies",
    "md_stability",
    "parity_values",
    "plot_calibration",
    "plot_parity",
    "predict_all",
]

_KCAL_PER_MOL = kcal / mol  # eV


@dataclass
class Predictions:
    """Targets and predictions of a model on Δ-labelled structures (eV, eV/Å).

    ``baseline_*`` are the predictions of baseline + D3 + offsets (no GP).
    ``force_terms`` are the forces of baseline + D3 (eV/Å), where the targets
    carry the reference's total forces (``arrays["reference_forces"]``, as
    :func:`deltaml.dataset.delta_targets` writes them), else NaN: total forces are
    ``force_terms + force_target`` (reference) and ``force_terms +
    force_predicted`` (composite).
    """

    n_atoms: NDArray[np.int64]
    energy_target: NDArray[np.float64]
    energy_predicted: NDArray[np.float64]
    energy_baseline: NDArray[np.float64]
    energy_std: NDArray[np.float64]
    force_target: NDArray[np.float64] = field(default_factory=lambda: np.zeros((0, 3)))
    force_predicted: NDArray[np.float64] = field(default_factory=lambda: np.zeros((0, 3)))
    force_std: NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    force_numbers: NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, dtype=int))
    force_terms: NDArray[np.float64] = field(default_factory=lambda: np.zeros((0, 3)))


def predict_all(model: Any, frames: Sequence[Atoms], *, progress: bool = False) -> Predictions:
    """Predict every Δ-labelled structure (energies always, forces where labelled)."""
    from tqdm.auto import tqdm

    energy = {k: [] for k in ("target", "predicted", "baseline", "std")}
    forces = {k: [] for k in ("target", "predicted", "std", "numbers", "terms")}
    for atoms in tqdm(frames, disable=not progress, unit="structure"):
        with_forces = "forces" in atoms.calc.results
        result = model.predict(atoms, forces=with_forces)
        energy["target"].append(atoms.calc.results["energy"])
        energy["predicted"].append(result.energy)
        energy["baseline"].append(model._offset_energy([atoms])[0])
        energy["std"].append(
            np.nan if result.energy_uncertainty is None else result.energy_uncertainty
        )
        if with_forces:
            forces["target"].append(atoms.calc.results["forces"])
            forces["predicted"].append(result.forces)
            std = result.forces_uncertainty
            forces["std"].append(np.full(len(atoms), np.nan) if std is None else std)
            forces["numbers"].append(atoms.numbers)
            total = atoms.arrays.get("reference_forces")
            forces["terms"].append(
                np.full((len(atoms), 3), np.nan)
                if total is None
                else total - atoms.calc.results["forces"]
            )
    out = Predictions(
        n_atoms=np.array([len(a) for a in frames]),
        energy_target=np.array(energy["target"]),
        energy_predicted=np.array(energy["predicted"]),
        energy_baseline=np.array(energy["baseline"]),
        energy_std=np.array(energy["std"]),
    )
    if forces["target"]:
        out.force_target = np.concatenate(forces["target"])
        out.force_predicted = np.concatenate(forces["predicted"])
        out.force_std = np.concatenate(forces["std"])
        out.force_numbers = np.concatenate(forces["numbers"])
        out.force_terms = np.concatenate(forces["terms"])
    return out


def interaction_energies(
    model: Any, targets: Sequence[Atoms], groups: Sequence[tuple[int, list[int]]] | None = None
) -> list[dict[str, Any]]:
    """Interaction energies of complexes: reference, terms alone and composite, with σ.

    For a complex C with molecules M_k at the same geometry, the interaction
    energy is E(C) − Σ_k E(M_k). Δ targets are reference − terms, so the terms'
    interaction energy is the reference's minus the Δ targets', and the
    composite's is the terms' plus the model's. σ is that of the model's
    prediction of the difference, from the posterior covariance of the complex
    and its molecules together (:meth:`~deltaml.model.SparseGPR.energy_covariance`).
    With the molecular decomposition the intramolecular part and the offsets
    cancel in it: σ is the intermolecular part's, scaled by the model's
    ``uncertainty_scale_["inter"]`` where :meth:`~deltaml.model.SparseGPR.calibrate`
    saw held-out interaction systems (else by its energy factor), and 0 for a
    complex whose molecules are out of each other's cut-off.

    Parameters
    ----------
    model : SparseGPR
        Fitted Δ-model.
    targets : sequence of ase.Atoms
        Δ-labelled structures (:func:`deltaml.dataset.delta_targets`), each with
        ``info["reference_energy"]`` (eV), complexes and molecules among them.
    groups : sequence of (int, list of int), optional
        Complex and molecule indices into ``targets``; default: every complex
        found by :func:`deltaml.dataset.interaction_groups`.

    Returns
    -------
    list of dict
        Per complex: ``index``, ``name``, ``reference``, ``terms``, ``composite``
        and ``sigma`` (kcal/mol).
    """
    from deltaml.dataset import interaction_groups

    if groups is None:
        groups = interaction_groups(targets)
    out = []
    weights = None
    for index, parts in groups:
        members = [targets[index], *(targets[k] for k in parts)]
        missing = [
            k
            for k, a in zip([index, *parts], members, strict=True)
            if "reference_energy" not in a.info
        ]
        if missing:
            raise ValueError(
                f"structure(s) {missing} carry no info['reference_energy'] (eV): use the targets "
                "returned by deltaml.dataset.delta_targets"
            )
        weights = np.array([1.0] + [-1.0] * len(parts))
        reference = float(weights @ [a.info["reference_energy"] for a in members])
        delta = float(weights @ [a.calc.results["energy"] for a in members])
        predicted = float(weights @ [model.predict(a, forces=False).energy for a in members])
        covariance = model.energy_covariance(members)
        sigma = float(np.sqrt(max(weights @ covariance @ weights, 0.0)))
        terms = reference - delta
        out.append(
            {
                "index": int(index),
                "name": targets[index].info.get("name", str(index)),
                "reference": reference / _KCAL_PER_MOL,
                "terms": terms / _KCAL_PER_MOL,
                "composite": (terms + predicted) / _KCAL_PER_MOL,
                "sigma": sigma / _KCAL_PER_MOL,
            }
        )
    return out


def interaction_coverage(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """:func:`coverage` of the composite's interaction energies (rows of
    :func:`interaction_energies`): fractions within 1σ and 2σ, RMS z-score, ``n``.

    Complexes with σ = 0 (no intermolecular contact within the cut-off) are left
    out, as :func:`coverage` leaves out every σ that is not positive.
    """
    errors = np.array([r["composite"] - r["reference"] for r in rows], dtype=float)
    return coverage(errors, np.array([r["sigma"] for r in rows], dtype=float))


def cross_calibrated_fit(
    model: Any,
    frames: Sequence[Atoms],
    *,
    folds: int = 5,
    seed: int = 0,
    trained_with: dict[str, Any] | None = None,
) -> Any:
    """Fit on all ``frames``, with σ calibrated by k-fold cross-validation over them.

    Each of ``folds`` models is fitted without one fold and gives the held-out
    errors of it (:meth:`~deltaml.model.SparseGPR.calibration_statistics`); pooled,
    they calibrate the model fitted on everything
    (:meth:`~deltaml.model.SparseGPR.calibrate_from`). An interaction system (a
    complex with all its molecules, and every complex sharing one of those
    molecules, as a rigid scan does) stays in one fold, so its interaction
    energies are held out whole and calibrate the σ of interaction energies
    (the ``"inter"`` factor and floor), and so do the structures of one named
    system (``info["system"]``: a crystal's start, strained and MD cells), which
    would otherwise calibrate σ on near-copies of fitted frames
    (:func:`~deltaml.dataset.held_out_units`); isolated atoms are always fitted (they
    anchor the offsets). Measured on unseen molecule families
    (``benchmarks/bench_transfer.py --cv 5``), this is steadier than one held-out
    set, and the final model keeps all the data. Cost: ``folds`` + 1 fits.

    Parameters
    ----------
    model : SparseGPR
        Template: its parameters are used, it is not changed.
    frames : sequence of ase.Atoms
        Δ-labelled structures (:func:`deltaml.dataset.delta_targets`).
    folds : int, default=5
        Number of folds (at least 2; units dealt with ``seed``).
    trained_with : dict, optional
        Records of the terms (passed to every fit).

    Returns
    -------
    SparseGPR
        Fitted on all ``frames``, calibrated.
    """
    from sklearn.base import clone

    from deltaml.dataset import held_out_units
    from deltaml.errors import ParameterError
    from deltaml.offsets import split_isolated_atoms

    if folds < 2:
        raise ParameterError(f"folds must be at least 2, got {folds}")
    frames = list(frames)
    anchors = {k for k, a in enumerate(frames) if not split_isolated_atoms([a])[1]}
    # Units that must not be split: interaction systems and named systems.
    system = held_out_units(frames)
    units: dict[int, list[int]] = {}
    for k in range(len(frames)):
        if k not in anchors:
            units.setdefault(int(system[k]), []).append(k)
    order = [list(units.values())[i] for i in np.random.default_rng(seed).permutation(len(units))]
    statistics = []
    for fold in range(folds):
        out = {k for unit in order[fold::folds] for k in unit}
        if not out:
            continue
        inner = clone(model).fit(
            [a for k, a in enumerate(frames) if k not in out], trained_with=trained_with
        )
        # A held-out structure with an element the fold's model never saw (the only
        # urea of a crystal set) has no prediction to calibrate against: left out.
        known = set(inner.species_)
        held = [frames[k] for k in sorted(out) if known.issuperset(frames[k].numbers)]
        if held:
            statistics.append(inner.calibration_statistics(held))
    final = clone(model).fit(frames, trained_with=trained_with)
    final.calibrate_from(statistics)
    return final


def fit_crystal_model(
    frames: Sequence[Atoms],
    *,
    seed: int = 0,
    folds: int = 5,
    trained_with: dict[str, Any] | None = None,
    **params: Any,
) -> Any:
    """The crystal model: a :class:`~deltaml.model.SparseGPR` with
    :data:`~deltaml.model.CRYSTAL_PARAMS` and energy σ, fitted on ``frames`` and
    calibrated by :func:`cross_calibrated_fit` over whole systems.

    A crystal's cells (start, strained and MD copies) and each gas molecule are
    held out together, so that σ is calibrated on cells unlike any fitted one, as a
    new polymorph is. With fewer systems than ``folds`` the empty folds are left out.

    Parameters
    ----------
    frames : sequence of ase.Atoms
        Δ-labelled periodic cells and gas molecules (:func:`deltaml.dataset.delta_targets`).
    seed : int, default=0
        Seed of the model (sparse points) and of the folds.
    folds : int, default=5
        Cross-validation folds.
    trained_with : dict, optional
        Records of the terms (passed to every fit).
    **params
        Overrides of the model's parameters (e.g. ``inter_delta``).

    Returns
    -------
    SparseGPR
        Fitted on all ``frames``, calibrated.
    """
    from deltaml.model import CRYSTAL_PARAMS, SparseGPR

    template = SparseGPR(seed=seed, **{"uncertainty": "energy", **CRYSTAL_PARAMS, **params})
    return cross_calibrated_fit(template, frames, folds=folds, seed=seed, trained_with=trained_with)


def errors(predictions: Predictions) -> dict[str, Any]:
    """MAE and RMSE of the composite and of the baseline alone.

    Returns
    -------
    dict
        ``{"composite": {...}, "baseline": {...}}``, each with
        ``energy_mae_mev_per_atom``, ``energy_rmse_mev_per_atom``,
        ``energy_mae_kcal_mol``, ``energy_rmse_kcal_mol`` (per structure),
        ``force_mae``, ``force_rmse`` (eV/Å, per component) and
        ``force_mae_by_element`` ({symbol: eV/Å}).
    """
    p = predictions
    out: dict[str, Any] = {}
    force_zero = np.zeros_like(p.force_target)
    for name, energy, force in (
        ("composite", p.energy_predicted, p.force_predicted),
        ("baseline", p.energy_baseline, force_zero),
    ):
        e_err = energy - p.energy_target
        table = {
            "energy_mae_mev_per_atom": 1000 * float(np.mean(np.abs(e_err) / p.n_atoms)),
            "energy_rmse_mev_per_atom": 1000 * float(np.sqrt(np.mean((e_err / p.n_atoms) ** 2))),
            "energy_mae_kcal_mol": float(np.mean(np.abs(e_err))) / _KCAL_PER_MOL,
            "energy_rmse_kcal_mol": float(np.sqrt(np.mean(e_err**2))) / _KCAL_PER_MOL,
            "n_structures": len(e_err),
        }
        if len(p.force_target):
            f_err = force - p.force_target
            table["force_mae"] = float(np.mean(np.abs(f_err)))
            table["force_rmse"] = float(np.sqrt(np.mean(f_err**2)))
            table["force_mae_by_element"] = {
                chemical_symbols[z]: float(np.mean(np.abs(f_err[p.force_numbers == z])))
                for z in np.unique(p.force_numbers)
            }
        out[name] = table
    return out


def error_table(table: dict[str, Any]) -> str:
    """Baseline alone and composite side by side, as aligned text."""
    rows = [
        ("energy MAE (meV/atom)", "energy_mae_mev_per_atom"),
        ("energy RMSE (meV/atom)", "energy_rmse_mev_per_atom"),
        ("energy MAE (kcal/mol)", "energy_mae_kcal_mol"),
        ("energy RMSE (kcal/mol)", "energy_rmse_kcal_mol"),
        ("force MAE (eV/Å)", "force_mae"),
        ("force RMSE (eV/Å)", "force_rmse"),
    ]
    lines = [f"{'':26s}{'baseline+D3':>14s}{'composite':>14s}"]
    for label, key in rows:
        if key in table["composite"]:
            base, comp = table["baseline"][key], table["composite"][key]
            lines.append(f"{label:26s}{base:14.4f}{comp:14.4f}")
    for symbol, value in table["composite"].get("force_mae_by_element", {}).items():
        base = table["baseline"]["force_mae_by_element"][symbol]
        lines.append(f"{'force MAE ' + symbol + ' (eV/Å)':26s}{base:14.4f}{value:14.4f}")
    return "\n".join(lines)


def plot_parity(predictions: Predictions, path: str | Path) -> Path:
    """Parity plots of energies and forces, composite vs baseline + D3 alone.

    Energies are shown per atom relative to the model's per-element offsets
    (what is left once composition is accounted for; the offsets alone span
    hundreds of eV per atom between elements and would hide everything else).
    Forces are totals (reference vs baseline + D3 (+ correction)) where the
    targets carry the reference's forces, else Δ forces. Each panel states its
    MAE and the number of points.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = parity_values(predictions)
    fig, axes = plt.subplots(1, len(panels), figsize=(10, 4.5), squeeze=False)
    for ax, (label, (values, unit)) in zip(axes[0], panels.items(), strict=True):
        _parity_panel(ax, values, label, unit)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parity_values(predictions: Predictions) -> dict[str, tuple[dict[str, NDArray], str]]:
    """What :func:`plot_parity` shows: ``{axis label: ({series: values}, unit)}``.

    Series ``reference``, ``baseline+D3`` and ``composite``: energies in meV/atom
    relative to the offsets; force components in eV/Å, totals where the targets
    carry the reference's forces, else Δ.
    """
    p = predictions
    panels = {
        "energy − offsets (meV/atom)": (
            {
                "reference": 1000 * (p.energy_target - p.energy_baseline) / p.n_atoms,
                "baseline+D3": np.zeros(len(p.n_atoms)),
                "composite": 1000 * (p.energy_predicted - p.energy_baseline) / p.n_atoms,
            },
            "meV/atom",
        )
    }
    if len(p.force_target):
        totals = bool(np.isfinite(p.force_terms).all())
        terms = p.force_terms if totals else np.zeros_like(p.force_target)
        label = "force component (eV/Å)" if totals else "Δ force component (eV/Å)"
        panels[label] = (
            {
                "reference": (terms + p.force_target).ravel(),
                "baseline+D3": terms.ravel(),
                "composite": (terms + p.force_predicted).ravel(),
            },
            "eV/Å",
        )
    return panels


def _parity_panel(ax: Any, values: dict[str, NDArray], label: str, unit: str) -> None:
    """Predicted against reference, with each prediction's MAE and count in the legend."""
    reference = values["reference"]
    for name, marker in (("baseline+D3", "x"), ("composite", "o")):
        mae = float(np.mean(np.abs(values[name] - reference)))
        ax.scatter(reference, values[name], s=6, marker=marker, alpha=0.6,
                   label=f"{name}: MAE {mae:.3g} {unit}")  # fmt: skip
    _diagonal(ax)
    ax.set_xlabel(f"reference {label}")
    ax.set_ylabel(f"predicted {label}")
    ax.set_title(f"{len(reference)} points", fontsize=10)
    ax.legend(fontsize=9)


def plot_calibration(predictions: Predictions, path: str | Path) -> Path:
    """Observed error vs predicted standard deviation (binned), for energies and forces."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = predictions
    sets = [("energy (eV)", np.abs(p.energy_predicted - p.energy_target), p.energy_std)]
    if len(p.force_target) and np.isfinite(p.force_std).all():
        per_atom = np.sqrt(np.mean((p.force_predicted - p.force_target) ** 2, axis=1))
        sets.append(("force (eV/Å, RMS per atom)", per_atom, p.force_std))
    fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 4.5), squeeze=False)
    for ax, (label, error, std) in zip(axes[0], sets, strict=True):
        ax.scatter(std, error, s=6, alpha=0.5, label="structures" if "energy" in label else "atoms")
        edges = np.quantile(std, np.linspace(0, 1, 9))
        which = np.clip(np.searchsorted(edges, std, side="right") - 1, 0, 7)
        centres = [np.mean(std[which == b]) for b in range(8) if np.any(which == b)]
        rms = [np.sqrt(np.mean(error[which == b] ** 2)) for b in range(8) if np.any(which == b)]
        ax.plot(centres, rms, "o-", color="black", label="RMS error per bin")
        _diagonal(ax)
        ax.set_xlabel(f"predicted std, {label}")
        ax.set_ylabel(f"|error|, {label}")
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _diagonal(ax: Any) -> None:
    low = min(ax.get_xlim()[0], ax.get_ylim()[0])
    high = max(ax.get_xlim()[1], ax.get_ylim()[1])
    ax.plot([low, high], [low, high], color="grey", lw=1)


def delta_targets_for(model: Any, frames: Sequence[Atoms]) -> list[Atoms]:
    """Δ targets of reference-labelled structures with the terms a model was trained with.

    The terms are rebuilt from the model's records and checked against them, as
    :meth:`deltaml.calculator.DeltaCalculator.from_model` does before a calculation:
    targets formed with other terms than the model's would make every error
    meaningless (eV per atom, not the model's).

    Raises
    ------
    TermMismatchError
        The terms rebuilt here differ from the records the model was trained with
        (e.g. another engine version or parametrization).
    """
    from deltaml.calculator import DeltaCalculator
    from deltaml.dataset import delta_targets

    calc = DeltaCalculator.from_model(model)
    calc.check_correction()
    baseline = {
        k: calc.baseline.parameters[k]
        for k in calc.baseline.default_parameters
        if k not in ("charge", "multiplicity")
    }
    dispersion = None
    if calc.dispersion is not None:
        dispersion = {k: calc.dispersion.parameters[k] for k in calc.dispersion.default_parameters}
    targets, _ = delta_targets(frames, baseline=baseline, dispersion=dispersion)
    return targets


# -- uncertainty calibration --------------------------------------------------------

#: Fractions of a Gaussian within 1σ and 2σ.
GAUSSIAN_COVERAGE = {"1sigma": 0.6827, "2sigma": 0.9545}


def coverage(errors: NDArray[np.float64], sigmas: NDArray[np.float64]) -> dict[str, float]:
    """How often |error| falls within 1σ and 2σ of the prediction (Gaussian: 0.683, 0.954).

    Parameters
    ----------
    errors, sigmas : ndarray
        Errors and predicted standard deviations, same shape and unit.

    Returns
    -------
    dict
        ``1sigma``, ``2sigma`` (observed fractions), ``rms_z`` (RMS of error/σ;
        1 for a calibrated Gaussian), ``n``.
    """
    errors, sigmas = np.abs(np.ravel(errors)), np.ravel(sigmas)
    keep = np.isfinite(errors) & np.isfinite(sigmas) & (sigmas > 0)
    errors, sigmas = errors[keep], sigmas[keep]
    if not len(errors):
        return {"1sigma": float("nan"), "2sigma": float("nan"), "rms_z": float("nan"), "n": 0}
    return {
        "1sigma": float(np.mean(errors <= sigmas)),
        "2sigma": float(np.mean(errors <= 2 * sigmas)),
        "rms_z": float(np.sqrt(np.mean((errors / sigmas) ** 2))),
        "n": len(errors),
    }


def calibration(predictions: Predictions) -> dict[str, dict[str, float]]:
    """Coverage of the energy and per-atom force uncertainties on labelled data.

    Forces: the error of an atom is the RMS over x, y, z, compared with the
    predicted per-atom force standard deviation (also an RMS over components).
    """
    p = predictions
    out = {"energy": coverage(p.energy_predicted - p.energy_target, p.energy_std)}
    if len(p.force_target):
        per_atom = np.sqrt(np.mean((p.force_predicted - p.force_target) ** 2, axis=1))
        out["forces"] = coverage(per_atom, p.force_std)
    return out


# -- MD stability ---------------------------------------------------------------------


def bonds(atoms: Atoms, scale: float = BOND_SCALE) -> set[tuple[int, int]]:
    """Bonded pairs (i < j): :func:`deltaml.crystals.bonded_pairs` (the one bond rule)."""
    return bonded_pairs(atoms, scale)


class _Unstable(Exception):
    """Raised inside the MD observer to stop a run at the first unphysical event."""


def md_stability(
    atoms: Atoms,
    calc: Any,
    *,
    temperature_k: float = 300.0,
    steps: int = 2000,
    timestep_fs: float = 0.5,
    ensemble: str = "langevin",
    seed: int = 0,
    interval: int = 10,
    min_distance: float = 0.6,
    bond_scale: float = BOND_SCALE,
    break_scale: float = 1.6,
    form_scale: float = 1.05,
    drift_threshold: float = 5e-3,
    reference: Any = None,
    baseline: Any = None,
    samples: int = 10,
    stop_on_event: bool = True,
    trajectory: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Run MD with ``calc`` and say whether it stays physical; compare with the reference.

    Unphysical events, checked at every recorded frame: a bond of the starting
    structure (closer than ``bond_scale`` × the sum of covalent radii) stretched
    beyond ``break_scale`` × that sum, a pair not bonded at the start closer than
    ``form_scale`` × that sum (the gap between the scales keeps thermal
    vibrations from counting), two atoms closer than ``min_distance``; in NVE,
    a total-energy drift above ``drift_threshold`` (eV/atom/ps). ``samples``
    frames spread over the run are re-evaluated with ``reference`` (and
    ``baseline``, e.g. the composite with a ``ZeroCorrection``), giving the error
    against simulation time.

    Parameters
    ----------
    atoms : ase.Atoms
        Starting structure (not modified).
    calc : ase Calculator
        The calculator judged (e.g. ``DeltaCalculator.from_model(...)``).
    reference, baseline : ase Calculator, optional
        Re-evaluate sampled frames with these.
    Other parameters as in :func:`deltaml.simulation.run_md`.

    Returns
    -------
    dict
        ``stable`` (bool), ``events`` (step, time, kind, detail), ``md`` (the MD
        summary), ``samples``: per sampled frame ``time_fs``, and where available
        ``energy_error_mev_per_atom`` (relative to the first sample, which removes
        the constant offset between methods), ``force_mae``,
        ``baseline_energy_error_mev_per_atom``, ``baseline_force_mae``,
        ``energy_uncertainty_ev``, ``max_force_uncertainty_ev_a``; and
        ``calibration`` (coverage of the force uncertainty on the samples).
    """
    from deltaml.simulation import run_md

    work = atoms.copy()
    work.calc = calc
    start_bonds = bonds(work, bond_scale)
    events: list[dict[str, Any]] = []
    frames: list[tuple[float, Atoms]] = []

    def observe(step: int, current: Atoms) -> None:
        frames.append((step * timestep_fs, current.copy()))
        found = []
        for pair in sorted(start_bonds - bonds(current, break_scale)):
            found.append(("bond broken", f"atoms {pair}"))
        for pair in sorted(bonds(current, form_scale) - start_bonds):
            found.append(("bond formed", f"atoms {pair}"))
        distances = current.get_all_distances(mic=current.pbc.any())
        np.fill_diagonal(distances, np.inf)
        if distances.min() < min_distance:
            i, j = np.unravel_index(np.argmin(distances), distances.shape)
            found.append(("atoms too close", f"atoms ({i}, {j}) at {distances[i, j]:.2f} Å"))
        for kind, detail in found:
            events.append(
                {"step": step, "time_fs": step * timestep_fs, "kind": kind, "detail": detail}
            )
        if found and stop_on_event:
            raise _Unstable

    try:
        summary = run_md(
            work, temperature_k=temperature_k, steps=steps, timestep_fs=timestep_fs,
            ensemble=ensemble, seed=seed, interval=interval, trajectory=trajectory,
            progress=progress, observer=observe,
        )  # fmt: skip
    except _Unstable:
        summary = {"stopped_at_step": events[0]["step"]}
    except Exception as exc:  # the calculator refused a geometry: the run went unphysical
        step = len(frames) * interval
        events.append(
            {"step": step, "time_fs": step * timestep_fs, "kind": "calculation failed",
             "detail": f"{type(exc).__name__}: {exc}"}
        )  # fmt: skip
        summary = {"stopped_at_step": step}
    drift = summary.get("energy_drift_ev_per_atom_ps")
    if drift is not None and abs(drift) > drift_threshold:
        events.append(
            {"step": steps, "time_fs": steps * timestep_fs, "kind": "energy drift",
             "detail": f"{drift:.2e} eV/atom/ps (threshold {drift_threshold:.0e})"}
        )  # fmt: skip
    return {
        "stable": not events,
        "events": events,
        "md": summary,
        **_sampled_errors(frames, calc, reference, baseline, samples, progress),
    }


def _sampled_errors(
    frames: list[tuple[float, Atoms]],
    calc: Any,
    reference: Any,
    baseline: Any,
    samples: int,
    progress: bool = False,
) -> dict[str, Any]:
    # The composite skips the force uncertainty unless asked; its calibration needs it.
    asked = getattr(calc, "parameters", {}).get("force_uncertainty")
    if asked is not False:
        return _sampled_errors_of(frames, calc, reference, baseline, samples, progress)
    calc.set(force_uncertainty=True)
    try:
        return _sampled_errors_of(frames, calc, reference, baseline, samples, progress)
    finally:
        calc.set(force_uncertainty=False)


def _sampled_errors_of(
    frames: list[tuple[float, Atoms]],
    calc: Any,
    reference: Any,
    baseline: Any,
    samples: int,
    progress: bool,
) -> dict[str, Any]:
    from tqdm.auto import tqdm

    if not frames or reference is None:
        return {"samples": [], "calibration": {}}
    picks = np.unique(np.linspace(0, len(frames) - 1, min(samples, len(frames))).astype(int))
    rows, first = [], {}
    force_err, force_std = [], []
    # The reference is the slow part (minutes per frame for a DFT): show it.
    for k in tqdm(picks, disable=not progress, unit="frame", desc="reference on MD frames"):
        time_fs, frame = frames[k]
        values = {}
        for name, term in (("model", calc), ("reference", reference), ("baseline", baseline)):
            if term is None:
                continue
            probe = frame.copy()
            probe.calc = term
            values[name] = (probe.get_potential_energy(), probe.get_forces(), dict(term.results))
            first.setdefault(name, values[name][0])
        n = len(frame)
        row: dict[str, Any] = {"time_fs": time_fs}
        ref_rel = values["reference"][0] - first["reference"]
        for name, prefix in (("model", ""), ("baseline", "baseline_")):
            if name in values:
                rel = values[name][0] - first[name]
                row[f"{prefix}energy_error_mev_per_atom"] = 1000 * (rel - ref_rel) / n
                error = values[name][1] - values["reference"][1]
                row[f"{prefix}force_mae"] = float(np.mean(np.abs(error)))
        results = values["model"][2]
        if "energy_uncertainty" in results:
            row["energy_uncertainty_ev"] = float(results["energy_uncertainty"])
        if "forces_uncertainty" in results:
            row["max_force_uncertainty_ev_a"] = float(np.max(results["forces_uncertainty"]))
            error = values["model"][1] - values["reference"][1]
            force_err.append(np.sqrt(np.mean(error**2, axis=1)))
            force_std.append(results["forces_uncertainty"])
        rows.append(row)
    out: dict[str, Any] = {"samples": rows, "calibration": {}}
    if force_err:
        out["calibration"]["forces"] = coverage(
            np.concatenate(force_err), np.concatenate(force_std)
        )
    return out
