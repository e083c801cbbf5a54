"""Calibration of the Δ-model's standard deviations on held-out errors.

The GP's posterior variance has the right shape but not the right size: its scale
comes from priors set before the data were seen. Held-out structures (never in the
fit) fix it: factors ``"energy"`` and ``"forces"`` that give their z-scores unit
RMS, with ``"forces_floor"`` (eV/Å) beside the force factor: the error of the
forces the model cannot move (beyond every cut-off, fixed by symmetry), and for the
molecular decomposition ``"inter"`` and ``"inter_floor"``: the factor of the
intermolecular part's σ and a floor (eV) fitted on held-out interaction energies,
in which the intramolecular part and the offsets cancel.

:meth:`deltaml.model.SparseGPR.calibrate` does it in one step; the two steps
(:func:`calibration_statistics` on held-out data, :func:`calibrate_from` on the
pooled statistics) let the models of a cross-validation calibrate the model fitted
on all the data (:func:`deltaml.evaluation.cross_calibrated_fit`).

Data flow: labelled data, a fitted model → **calibration** → the model's
``uncertainty_scale_``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.optimize
from ase import Atoms
from numpy.typing import NDArray

from deltaml.dataset import interaction_groups
from deltaml.errors import MissingLabelError
from deltaml.offsets import split_isolated_atoms

__all__ = [
    "MIN_CALIBRATION_INTERACTIONS",
    "calibrate_from",
    "calibration_statistics",
    "energy_factor",
    "factor_and_floor",
    "inter_factor",
]

#: An interaction energy whose uncalibrated variance is below this fraction of
#: δ_inter² has no intermolecular part (no contact within the cut-off): it cannot
#: calibrate the intermolecular factor.
_NO_CONTACT = 1e-10
#: Fewest held-out interaction energies that fit the intermolecular factor: the RMS
#: of fewer z-scores is too noisy to trust (one z-score can be anything).
MIN_CALIBRATION_INTERACTIONS = 5


def calibration_statistics(model: Any, frames: Sequence[Atoms]) -> dict[str, NDArray]:
    """Errors and uncalibrated variances of held-out structures, for :func:`calibrate_from`.

    Parameters
    ----------
    model : SparseGPR
        Fitted; its scales are set to 1 for the duration and then restored.
    frames : sequence of ase.Atoms
        Held-out Δ-labelled structures (not used in the model's fit); isolated
        atoms are left out.

    Returns
    -------
    dict of ndarray
        ``energy_error`` (eV) and ``energy_parts`` (eV², columns a, b, c, d: the
        variance of the offsets and first term, of the intermolecular term,
        their covariance, and 1 where the structure has an intermolecular
        part) per structure; ``force_error`` (eV/Å) and ``force_variance``
        (eV²/Å², the atom's uncalibrated σ², 0 where the model cannot move
        the force) per force component (with ``uncertainty="forces"``);
        ``interaction_error`` (eV),
        ``interaction_variance`` (eV², intermolecular part) and
        ``interaction_contact`` (a contact within the cut-off) per interaction
        energy found among ``frames`` (molecular decomposition).
    """
    frames = split_isolated_atoms(list(frames))[1]
    if not frames:
        raise MissingLabelError("calibrate: no structures (the scales would be undefined)")
    saved = dict(model.uncertainty_scale_)
    model.uncertainty_scale_ = {"energy": 1.0, "forces": 1.0}
    errors, predicted, parts, force_errors, force_variances = [], [], [], [], []
    try:
        for atoms in frames:
            with_forces = "forces" in atoms.calc.results and model.uncertainty == "forces"
            result = model.predict(atoms, forces=with_forces)
            predicted.append(result.energy)
            errors.append(atoms.calc.results["energy"] - result.energy)
            if model.molecular:
                a = model._energy_covariance([atoms], [1.0, 0.0], 1.0)[0, 0]
                b = model._energy_covariance([atoms], [0.0, 1.0], 0.0)[0, 0]
                c = (result.energy_uncertainty**2 - a - b) / 2.0
                parts.append((a, b, c, float(model._has_contacts(atoms))))
            else:
                parts.append((result.energy_uncertainty**2, 0.0, 0.0, 0.0))
            if with_forces:
                err = atoms.calc.results["forces"] - result.forces
                force_errors.append(err.ravel())
                force_variances.append(np.repeat(result.forces_uncertainty**2, 3))
        groups = interaction_groups(frames) if model.molecular else []
        interactions = _interaction_statistics(model, frames, groups, np.array(predicted))
    finally:
        model.uncertainty_scale_ = saved
    return {
        "energy_error": np.array(errors),
        "energy_parts": np.array(parts).reshape(-1, 4),
        "force_error": np.concatenate(force_errors) if force_errors else np.zeros(0),
        "force_variance": np.concatenate(force_variances) if force_variances else np.zeros(0),
        **interactions,
    }


def calibrate_from(model: Any, statistics: Sequence[dict[str, NDArray]]) -> dict[str, float]:
    """Set ``model.uncertainty_scale_`` from pooled :func:`calibration_statistics`.

    Parameters
    ----------
    model : SparseGPR
        Fitted; the statistics may come from other models of the same settings.
    statistics : sequence of dict
        Outputs of :func:`calibration_statistics`.

    Returns
    -------
    dict
        The factors now in ``uncertainty_scale_``.
    """
    pooled = {k: np.concatenate([s[k] for s in statistics]) for k in statistics[0]}
    errors, parts = pooled["energy_error"], pooled["energy_parts"]
    if not len(errors):
        raise MissingLabelError("calibrate: no structures (the scales would be undefined)")
    total = np.maximum(parts[:, 0] + parts[:, 1] + 2 * parts[:, 2], 1e-24)
    scale = {"energy": float(np.sqrt(np.mean(errors**2 / total)))}
    if len(pooled["force_error"]):
        # A force the model cannot move (σ = 0: beyond every cut-off, the C of a
        # linear CO2) still errs by the terms' error: the floor is that error, so
        # that it neither blows up the factor (it made it 1e8) nor passes as exact.
        scale["forces"], scale["forces_floor"] = factor_and_floor(
            pooled["force_error"], pooled["force_variance"]
        )
    else:
        scale["forces"] = 1.0
    inter = None
    if model.molecular:
        inter = inter_factor(
            pooled["interaction_error"],
            pooled["interaction_variance"],
            pooled["interaction_contact"].astype(bool),
        )
    if inter is not None:
        scale["inter"], scale["inter_floor"] = inter
        scale["energy"] = energy_factor(errors, parts, scale)
    model.uncertainty_scale_ = scale
    model.content_sha256_ = None  # the model changed
    return dict(scale)


def _interaction_statistics(
    model: Any, frames: list[Atoms], groups: list[tuple[int, list[int]]], predicted: NDArray
) -> dict[str, NDArray]:
    """Error and uncalibrated intermolecular variance of each interaction energy."""
    inter_only = [1.0 if t.name == "inter" else 0.0 for t in model.terms_]
    errors, variances = [], []
    for index, parts in groups:
        members = [index, *parts]
        weights = np.array([1.0] + [-1.0] * len(parts))
        covariance = model._energy_covariance([frames[k] for k in members], inter_only, 0.0)
        target = weights @ [frames[k].calc.results["energy"] for k in members]
        errors.append(float(target - weights @ predicted[members]))
        variances.append(max(float(weights @ covariance @ weights), 0.0))
    variances = np.array(variances)
    contact = (
        variances > _NO_CONTACT * model.terms_[1].delta ** 2
        if model.molecular
        else np.zeros(len(variances), dtype=bool)
    )
    return {
        "interaction_error": np.array(errors),
        "interaction_variance": np.where(contact, variances, 0.0),
        "interaction_contact": contact,
    }


def factor_and_floor(errors: NDArray, variances: NDArray) -> tuple[float, float]:
    """Factor s and floor τ of σ = √(s² v + τ²) for held-out ``errors`` of variance ``v``.

    Both maximise the Gaussian likelihood of the errors, then are scaled together
    so that the z-scores have RMS exactly 1 (which the optimum satisfies already
    unless a bound stopped it). The floor is the error that the variance cannot
    describe: where v = 0 it is all of σ.

    Parameters
    ----------
    errors : ndarray
        Held-out errors (any unit u).
    variances : ndarray
        Their uncalibrated variances (u²), ≥ 0; if none is positive, the factor
        is 1 and the floor the RMS error.

    Returns
    -------
    factor, floor : float
        s (dimensionless) and τ (u, ≥ 0).
    """
    moved = variances > 0
    if not moved.any():  # nothing to scale: the floor is all of σ
        return 1.0, float(np.sqrt(np.mean(errors**2)))
    start = float(np.sqrt(np.mean(errors[moved] ** 2 / variances[moved])))
    largest = max(float(np.abs(errors).max()), 1e-12)

    def nll(x: NDArray) -> float:
        total = np.exp(2 * x[0]) * variances + np.exp(2 * x[1])
        return float(np.sum(np.log(total) + errors**2 / total))

    x0 = np.array([np.log(max(start, 1e-12)), np.log(0.1 * largest)])
    bounds = [(x0[0] - 12.0, x0[0] + 12.0), (np.log(largest) - 25.0, np.log(largest) + 1.0)]
    found = scipy.optimize.minimize(nll, x0, method="L-BFGS-B", bounds=bounds).x
    factor, floor = np.exp(found)
    rms = np.sqrt(np.mean(errors**2 / (factor**2 * variances + floor**2)))
    return float(rms * factor), float(rms * floor)


def inter_factor(
    errors: NDArray, variances: NDArray, contact: NDArray
) -> tuple[float, float] | None:
    """Factor s_I and floor τ (eV) of the σ of held-out interaction energies.

    The σ of an interaction energy is modelled as √(s_I² v + τ²), v its
    uncalibrated intermolecular variance (0 without a contact within the
    cut-off): τ is the error that the intermolecular part cannot describe (the
    terms' error beyond the cut-off, noise of the labels); both from
    :func:`factor_and_floor`. None if fewer than
    :data:`MIN_CALIBRATION_INTERACTIONS` have a contact: too few to set s_I.
    """
    if contact.sum() < MIN_CALIBRATION_INTERACTIONS:
        return None
    return factor_and_floor(errors, np.where(contact, variances, 0.0))


def energy_factor(errors: NDArray, parts: NDArray, scale: dict[str, float]) -> float:
    """Energy factor s_E giving unit RMS z-score of total energies, inter factor fixed.

    The variance of a total energy is s_E² a + s_I² b + 2 s_E s_I c + τ² d (a:
    offsets and first term, b: intermolecular part, c: their covariance, d: 1
    for a structure with an intermolecular part).
    """
    a, b, c, d = parts.T
    inter, floor = scale["inter"], scale["inter_floor"]

    def excess(log_s: float) -> float:
        s = np.exp(log_s)
        variance = np.maximum(s**2 * a + inter**2 * b + 2 * s * inter * c + floor**2 * d, 1e-24)
        return float(np.log(np.mean(errors**2 / variance)))

    guess = np.log(scale["energy"])
    low, high = guess - np.log(1e3), guess + np.log(1e3)
    if excess(low) > 0 > excess(high):
        return float(np.exp(scipy.optimize.brentq(excess, low, high, xtol=1e-6)))
    return scale["energy"]  # the inter part alone explains the errors: keep the plain one
