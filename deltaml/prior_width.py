"""Choosing the intermolecular part's prior width δ from the data.

The molecular model's intermolecular part has its own prior width δ (eV per atom
at a typical contact). :class:`deltaml.model.SparseGPR` sets it by a rule (the
spread of the training interaction energies) and then, by default, searches a
grid of factors on that rule:

* by **cross-validation over families** (``inter_delta="cv"``, the default): the
  factor whose fits without one group of families predict that group's
  interaction energies best (:func:`cv_errors`);
* by **maximum evidence** (``inter_delta="evidence"``): the marginal likelihood of
  the training data (:func:`log_evidence`), best in-domain, poor in transfer.

Both rest on one observation: the design's intermolecular columns and K_mm's
intermolecular block scale as δ², so with L Lᵀ = K_mm and B = (K_nm / σ) L⁻ᵀ the
columns of B scale as δ. The whitened normal equations BᵀB and Bᵀ(y / σ) are
formed once (:func:`whitened_normal_equations`); a trial factor t is then the
diagonal D = diag(1, …, t, …) on the intermolecular columns and costs m × m work
(m sparse points), and leaving a fold out subtracts that fold's rows' sums.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.linalg
from numpy.typing import NDArray

from deltaml.dataset import interaction_systems

__all__ = [
    "CV_FACTORS",
    "EVIDENCE_FACTORS",
    "cv_errors",
    "interaction_folds",
    "least_regret",
    "log_evidence",
    "whitened_normal_equations",
]

#: Trial factors on the rule's δ: cross-validation (0.03 … 10 ×) and evidence (0.01 … 100 ×).
CV_FACTORS = np.geomspace(0.03, 10.0, 31)
EVIDENCE_FACTORS = np.geomspace(0.01, 100.0, 41)
#: Rows of K_nm whitened at a time (memory of a chunk: rows × m doubles).
_CHUNK = 4096


def whitened_normal_equations(
    kmm: NDArray,
    design: NDArray,
    target: NDArray,
    sigma: NDArray,
    masks: Sequence[NDArray[np.bool_]] = (),
) -> tuple[NDArray, NDArray, NDArray, list[tuple[NDArray, NDArray]]]:
    """A fit's normal equations in whitened coordinates, without an n × m copy.

    Parameters
    ----------
    kmm : ndarray of shape (m, m)
        K_mm with its jitter (eV²).
    design, target, sigma : ndarray
        K_nm (n × m), the targets (n,) and their noise std (n,), as fitted.
    masks : sequence of bool ndarray of shape (n,)
        Rows of each fold.

    Returns
    -------
    lower : ndarray (m, m)
        L with L Lᵀ = K_mm.
    gram, c : ndarray (m, m), (m,)
        BᵀB and Bᵀ(y / σ) with B = (K_nm / σ) L⁻ᵀ.
    parts : list of (ndarray, ndarray)
        The same two sums over each mask's rows.
    """
    lower = np.linalg.cholesky(kmm)
    m = len(kmm)
    gram, c0 = np.zeros((m, m)), np.zeros(m)
    parts = [(np.zeros((m, m)), np.zeros(m)) for _ in masks]
    for begin in range(0, len(design), _CHUNK):
        rows = slice(begin, begin + _CHUNK)
        b = scipy.linalg.solve_triangular(
            lower, (design[rows] / sigma[rows, None]).T, lower=True, check_finite=False
        )
        y = target[rows] / sigma[rows]
        gram += b @ b.T
        c0 += b @ y
        for (g, c), mask in zip(parts, masks, strict=True):
            mine = mask[rows]
            if mine.any():
                g += b[:, mine] @ b[:, mine].T
                c += b[:, mine] @ y[mine]
    return lower, gram, c0, parts


def _scaling(m: int, columns: slice, factor: float) -> NDArray[np.float64]:
    d = np.ones(m)
    d[columns] = factor
    return d


def log_evidence(
    gram: NDArray, c0: NDArray, columns: slice, factors: NDArray = EVIDENCE_FACTORS
) -> list[float]:
    """Log marginal likelihood of the projected process per trial factor, up to a constant.

    −½ yᵀ(Σ + BBᵀ)⁻¹y − ½ log|Σ + BBᵀ| is, up to constants, ½ cᵀM⁻¹c − ½ log|M|
    with M = I + D BᵀB D and c = D Bᵀ(y / σ), D scaling ``columns`` by the factor.
    """
    m = len(gram)
    out = []
    for factor in factors:
        d = _scaling(m, columns, float(factor))
        chol = np.linalg.cholesky(np.eye(m) + d[:, None] * gram * d[None, :])
        y = scipy.linalg.solve_triangular(chol, d * c0, lower=True)
        out.append(0.5 * float(y @ y) - float(np.sum(np.log(np.diag(chol)))))
    return out


def cv_errors(
    gram: NDArray,
    c0: NDArray,
    folds: Sequence[tuple[NDArray, NDArray, Sequence[tuple[NDArray, NDArray]]]],
    columns: slice,
    factors: NDArray = CV_FACTORS,
) -> NDArray[np.float64]:
    """Mean absolute error of held-out predictions per kind of quantity and trial factor.

    Parameters
    ----------
    gram, c0 : ndarray
        :func:`whitened_normal_equations` of all rows.
    folds : sequence of (gram_out, c_out, [(probes, truths), ...])
        Per fold: the sums over its rows (to leave it out) and, per kind of
        quantity it predicts, the whitened kernel rows L⁻¹kᵀ (m × q) and the true
        values (q,). Every fold lists the same kinds, in the same order.
    columns : slice
        The columns the factor scales (the intermolecular part's).
    factors : ndarray
        Trial factors on δ.

    Returns
    -------
    ndarray of shape (n_kinds, len(factors))
        MAE of each kind over all folds (units of the truths; NaN for a kind
        without any quantity).
    """
    m = len(gram)
    n_kinds = len(folds[0][2]) if folds else 0
    errors = np.zeros((n_kinds, len(factors)))
    counts = np.zeros(n_kinds)
    for g_out, c_out, kinds in folds:
        g_in, c_in = gram - g_out, c0 - c_out
        for k, factor in enumerate(factors):
            d = _scaling(m, columns, float(factor))
            matrix = np.eye(m) + d[:, None] * g_in * d[None, :]
            w = scipy.linalg.cho_solve(scipy.linalg.cho_factor(matrix), d * c_in)
            for j, (probes, truths) in enumerate(kinds):
                if len(truths):
                    errors[j, k] += np.abs((d[:, None] * probes).T @ w - truths).sum()
        counts += [len(truths) for _, truths in kinds]
    with np.errstate(invalid="ignore", divide="ignore"):
        return errors / counts[:, None]


def least_regret(errors: NDArray) -> int:
    """Index of the trial whose worst error, relative to each kind's own best, is smallest.

    With one kind of quantity this is its smallest error. With several (interaction
    energies of unseen families; energies of clusters of the training chemistry),
    no kind loses more, in proportion, than it must for the others.
    """
    usable = errors[np.all(np.isfinite(errors), axis=1) & np.any(errors > 0, axis=1)]
    if not len(usable):
        return 0
    relative = usable / usable.min(axis=1, keepdims=True)
    return int(np.argmin(relative.max(axis=0)))


def interaction_folds(
    groups: Sequence[tuple[int, Sequence[int]]],
    families: Sequence[str | None],
    count: int,
    seed: int,
) -> list[set[int]]:
    """Structures (complexes and their molecules) of each cross-validation fold.

    Complexes of one family stay together; complexes without a family that share a
    molecule's structure (a scan and its minimum) form one group. The groups are
    dealt, seeded, into at most ``count`` folds.

    Parameters
    ----------
    groups : sequence of (int, sequence of int)
        Each complex's index and its molecules' (:func:`deltaml.dataset.interaction_groups`).
    families : sequence of str or None
        Each complex's family (in the order of ``groups``).
    count : int
        Most folds.
    seed : int
        Seed of the dealing.

    Returns
    -------
    list of set of int
        Structure indices of each fold (fewer than two when there are fewer groups).
    """
    n_structures = 1 + max((max(index, *parts) for index, parts in groups), default=-1)
    system = interaction_systems(groups, n_structures)
    keyed: dict[str, set[int]] = {}
    for (index, parts), family in zip(groups, families, strict=True):
        key = f"family:{family}" if family is not None else f"system:{system[index]:06d}"
        keyed.setdefault(key, set()).update([index, *parts])
    members = [keyed[key] for key in sorted(keyed)]
    n_folds = min(count, len(members))
    rng = np.random.default_rng(seed)
    folds: list[set[int]] = [set() for _ in range(n_folds)]
    for k, g in enumerate(rng.permutation(len(members))):
        folds[k % n_folds].update(members[g])
    return folds
