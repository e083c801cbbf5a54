"""Optional hyperparameter tuning of the Δ-model by k-fold cross-validation.

The defaults of :class:`~deltaml.model.SparseGPR` work without tuning in the
small-data regime (tens to hundreds of structures). For larger sets,
:func:`kfold_tune` scores every combination of a parameter grid on k folds
(seeded) and returns the table and the best combination.

Score: RMSE of the energy per atom divided by the standard deviation of the
held-out targets per atom, plus the same ratio for force components (where
forces are labelled); lower is better, 0 is perfect, 2 is no better than a
constant.

Data flow: model → **selection** → CLI, benchmarks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from ase import Atoms
from sklearn.base import clone
from sklearn.model_selection import KFold, ParameterGrid

from deltaml.errors import ParameterError
from deltaml.model import SparseGPR

__all__ = ["kfold_tune"]


def kfold_tune(
    model: SparseGPR,
    frames: Sequence[Atoms],
    grid: dict[str, Sequence[Any]],
    *,
    folds: int = 5,
    seed: int = 0,
    trained_with: dict[str, Any] | None = None,
    refit: bool = True,
) -> dict[str, Any]:
    """Score a parameter grid by k-fold cross-validation.

    Parameters
    ----------
    model : SparseGPR
        Template; its parameters not in ``grid`` are kept.
    frames : sequence of ase.Atoms
        Δ-labelled structures.
    grid : dict
        ``{parameter: [values]}``, e.g. ``{"force_sigma": [0.01, 0.02, 0.05]}``.
    folds : int, default=5
        Number of folds (shuffled with ``seed``).
    seed : int, default=0
        Seed of the fold assignment.
    trained_with : dict, optional
        Passed to the final refit.
    refit : bool, default=True
        Refit the best combination on all frames.

    Returns
    -------
    dict
        ``table`` (one row per combination: parameters, ``score``, ``energy_rmse``
        eV/atom, ``force_rmse`` eV/Å), ``best`` (parameters) and, with ``refit``,
        ``model`` (fitted).
    """
    frames = list(frames)
    if folds < 2 or folds > len(frames):
        raise ParameterError(f"folds must be between 2 and the {len(frames)} structures")
    unknown = set(grid) - set(model.get_params())
    if unknown:
        raise ParameterError(f"unknown SparseGPR parameter(s) in the grid: {sorted(unknown)}")
    splitter = KFold(n_splits=folds, shuffle=True, random_state=seed)
    splits = list(splitter.split(np.arange(len(frames))))
    table = []
    for params in ParameterGrid(grid):
        e_err, e_ref, f_err, f_ref = [], [], [], []
        for train, test in splits:
            fitted = clone(model).set_params(**params).fit([frames[i] for i in train])
            for i in test:
                atoms = frames[i]
                with_forces = "forces" in atoms.calc.results
                result = fitted.predict(atoms, forces=with_forces)
                e_err.append((result.energy - atoms.calc.results["energy"]) / len(atoms))
                e_ref.append(
                    (atoms.calc.results["energy"] - fitted._offset_energy([atoms])[0]) / len(atoms)
                )
                if with_forces:
                    f_err.append((result.forces - atoms.calc.results["forces"]).ravel())
                    f_ref.append(atoms.calc.results["forces"].ravel())
        row: dict[str, Any] = dict(params)
        row["energy_rmse"] = float(np.sqrt(np.mean(np.square(e_err))))
        score = row["energy_rmse"] / max(float(np.std(e_ref)), 1e-12)
        if f_err:
            row["force_rmse"] = float(np.sqrt(np.mean(np.square(np.concatenate(f_err)))))
            score += row["force_rmse"] / max(float(np.std(np.concatenate(f_ref))), 1e-12)
        row["score"] = float(score)
        table.append(row)
    best_row = min(table, key=lambda r: r["score"])
    best = {k: best_row[k] for k in grid}
    out: dict[str, Any] = {"table": table, "best": best}
    if refit:
        out["model"] = clone(model).set_params(**best).fit(frames, trained_with=trained_with)
    return out
