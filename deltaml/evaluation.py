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

__all__ = [
    "Predictions",
    "delta_targets_for",
    "error_table",
    "errors",
    "plot_calibration",
    "plot_parity",
    "predict_all",
]

_KCAL_PER_MOL = kcal / mol  # eV


@dataclass
class Predictions:
    """Targets and predictions of a model on Δ-labelled structures (eV, eV/Å).

    ``baseline_*`` are the predictions of baseline + D3 + offsets (no GP).
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


def predict_all(model: Any, frames: Sequence[Atoms], *, progress: bool = False) -> Predictions:
    """Predict every Δ-labelled structure (energies always, forces where labelled)."""
    from tqdm.auto import tqdm

    energy = {k: [] for k in ("target", "predicted", "baseline", "std")}
    forces = {k: [] for k in ("target", "predicted", "std", "numbers")}
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
    return out


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
    """Parity plots (energies per atom and force components), composite vs baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = predictions
    fig, axes = plt.subplots(1, 2 if len(p.force_target) else 1, figsize=(10, 4.5), squeeze=False)
    centre = np.mean(p.energy_target / p.n_atoms)
    ax = axes[0, 0]
    for label, values, marker in (
        ("baseline+D3", p.energy_baseline, "x"),
        ("composite", p.energy_predicted, "o"),
    ):
        ax.scatter(
            1000 * (p.energy_target / p.n_atoms - centre),
            1000 * (values / p.n_atoms - centre),
            s=10,
            marker=marker,
            label=label,
        )
    _diagonal(ax)
    ax.set_xlabel("reference (meV/atom, shifted)")
    ax.set_ylabel("predicted (meV/atom, shifted)")
    ax.legend()
    if len(p.force_target):
        ax = axes[0, 1]
        ax.scatter(p.force_target.ravel(), np.zeros(p.force_target.size), s=4, marker="x",
                   label="baseline+D3")  # fmt: skip
        ax.scatter(p.force_target.ravel(), p.force_predicted.ravel(), s=4, label="composite")
        _diagonal(ax)
        ax.set_xlabel("reference Δ force (eV/Å)")
        ax.set_ylabel("predicted Δ force (eV/Å)")
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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
    """Δ targets of reference-labelled structures with the terms a model was trained with."""
    from deltaml.calculator import DeltaCalculator
    from deltaml.dataset import delta_targets

    calc = DeltaCalculator.from_model(model)
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
