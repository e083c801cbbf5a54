r"""The Δ-model: sparse Gaussian-process regression on SOAP, energies + forces + virials.

The correction energy is a sum of atomic contributions (size-extensive by
construction), each a per-element offset plus a Gaussian process on the atom's
normalised SOAP power spectrum :math:`\hat x_i`:

.. math::

    E = \sum_i \Big[\mu_{Z_i}
        + \sum_{m \in Z_i} \alpha_m\, \delta^2 k(\hat x_i \cdot \hat x_m)\Big],
    \qquad k(c) = c^\zeta \ \text{(dot)} \quad\text{or}\quad e^{\zeta (c - 1)} \ \text{(exp)},

over sparse (representative) environments :math:`\hat x_m` of the same element,
chosen by farthest-point sampling or CUR. Energies, forces and virials are all
linear functionals of the same latent field, so they are fitted jointly, each with
its own noise (:math:`\sigma_E\sqrt{N}`, :math:`\sigma_F`, :math:`\sigma_V\sqrt{N}`),
by the projected-process (DTC) approximation:

.. math::

    \min_\alpha \|\Lambda^{-1/2}(y - K_{nm}\alpha)\|^2 + \alpha^T K_{mm} \alpha,

solved through the QR factorisation of :math:`[\Lambda^{-1/2}K_{nm};\ L^T]`
(:math:`K_{mm} = LL^T`); no inverse is formed and no observations × observations
matrix exists (memory: observations × sparse points). Forces and stress are
exact derivatives through the descriptor gradients. The posterior variance
(DTC) is available per atom, per structure and per force component; it returns
to the prior far from the data, where the prediction returns to the offsets.

Data flow: descriptors, labelled data → **model** → composite calculator.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg
import scipy.sparse
from ase import Atoms
from ase.data import atomic_numbers, chemical_symbols
from numpy.typing import NDArray
from sklearn.base import BaseEstimator

from deltaml.correction import CorrectionResult
from deltaml.descriptors import DescriptorBatch, SOAPDescriptor
from deltaml.errors import (
    MissingLabelError,
    ModelFileError,
    NotFittedError,
    ParameterError,
    UnsupportedElementError,
)

__all__ = ["MODEL_FORMAT", "MODEL_FORMAT_VERSION", "SparseGPR"]

MODEL_FORMAT = "deltaml-model"
#: Bumped whenever the arrays or metadata of a model file change meaning.
MODEL_FORMAT_VERSION = 1

_KERNELS = ("dot", "exp")
_SELECTIONS = ("fps", "cur", "random")
_UNCERTAINTY = ("forces", "energy", None)
#: Voigt order of ASE: xx, yy, zz, yz, xz, xy.
_VOIGT = (np.array([0, 1, 2, 1, 0, 0]), np.array([0, 1, 2, 2, 2, 1]))


def kernel_values(c: NDArray, kind: str, zeta: float) -> tuple[NDArray, NDArray, NDArray]:
    """k(c), k'(c), k''(c) of the kernel as a function of c = x̂·ŷ (``kind`` "dot" or "exp")."""
    if kind == "dot":
        k1 = zeta * c ** (zeta - 1) if zeta >= 1 else np.zeros_like(c)
        k2 = zeta * (zeta - 1) * c ** (zeta - 2) if zeta >= 2 else np.zeros_like(c)
        return c**zeta, k1, k2
    k = np.exp(zeta * (c - 1.0))
    return k, zeta * k, zeta * zeta * k


class SparseGPR(BaseEstimator):
    r"""Sparse GP regression of Δ energies, forces and virials on per-atom SOAP.

    ================ ================= ======= ===========================================
     Parameter        Default           Unit    Description
    ================ ================= ======= ===========================================
     descriptor       None              -       SOAPDescriptor keywords except species
                                                (backend, cutoff, smoothing, ...);
                                                None: its defaults
     n_sparse         200               -       sparse environments per element (at most
                                                the number of distinct ones)
     selection        "fps"             -       fps (farthest point), cur, or random
     kernel           "dot"             -       dot: (x̂·ŷ)^ζ; exp: exp(ζ(x̂·ŷ − 1))
     zeta             2                 -       kernel exponent ζ (integer for dot)
     delta            None              eV      prior std of an atomic energy; None:
                                                from the spread of the training energies
     energy_sigma     0.002             eV/atom energy noise (× √N per structure)
     force_sigma      0.05              eV/Å    force-component noise
     virial_sigma     0.05              eV/atom virial noise (× √N per structure)
     offsets          "least_squares"   eV      per-element offsets: least squares on
                                                the energies, or {symbol: eV}
     jitter           1e-8              -       relative diagonal added to K_mm
     batch_size       20                -       structures per descriptor batch
     uncertainty      "forces"          -       forces, energy (cheaper), or None
     seed             0                 -       seed of every random choice
    ================ ================= ======= ===========================================

    Fitted attributes end in ``_``: ``descriptor_`` (:class:`SOAPDescriptor`),
    ``species_``, ``offsets_`` ({Z: eV}), ``delta_`` (eV), ``sparse_values_``,
    ``sparse_numbers_``, ``alpha_``, ``trained_with_`` (records of the terms the
    targets were formed with), ``reference_`` (reference method record),
    ``training_set_sha256_``, ``uncertainty_scale_`` ({"energy", "forces"}: factor
    applied to the GP's standard deviations, 1 until :meth:`calibrate`).

    The model is a :class:`~deltaml.correction.Correction`: ``name``,
    ``trained_with`` and ``predict(atoms, forces=, stress=)``.

    Examples
    --------
    >>> from deltaml.dataset import delta_targets, read_labelled
    >>> frames, terms = delta_targets(read_labelled("data/labelled/water_chno.extxyz"))
    >>> model = SparseGPR(n_sparse=100).fit(frames[:200], trained_with=terms)
    >>> model.save("model.npz")
    """

    name = "soap-gpr"

    def __init__(
        self,
        descriptor: dict[str, Any] | None = None,
        n_sparse: int = 200,
        selection: str = "fps",
        kernel: str = "dot",
        zeta: float = 2,
        delta: float | None = None,
        energy_sigma: float = 0.002,
        force_sigma: float = 0.05,
        virial_sigma: float = 0.05,
        offsets: str | dict[str, float] = "least_squares",
        jitter: float = 1e-8,
        batch_size: int = 20,
        uncertainty: str | None = "forces",
        seed: int = 0,
    ) -> None:
        self.descriptor = descriptor
        self.n_sparse = n_sparse
        self.selection = selection
        self.kernel = kernel
        self.zeta = zeta
        self.delta = delta
        self.energy_sigma = energy_sigma
        self.force_sigma = force_sigma
        self.virial_sigma = virial_sigma
        self.offsets = offsets
        self.jitter = jitter
        self.batch_size = batch_size
        self.uncertainty = uncertainty
        self.seed = seed

    # -- Correction protocol ------------------------------------------------------

    @property
    def trained_with(self) -> dict[str, Any] | None:
        """Records of the baseline and dispersion the targets were formed with."""
        self._check_fitted()
        return self.trained_with_

    def _check_fitted(self) -> None:
        if not hasattr(self, "alpha_"):
            raise NotFittedError(
                "this SparseGPR is not fitted yet: call fit(frames) or SparseGPR.load(path)"
            )

    # -- fitting ------------------------------------------------------------------

    def _check_parameters(self) -> None:
        if self.kernel not in _KERNELS:
            raise ParameterError(f"kernel must be one of {_KERNELS}, got {self.kernel!r}")
        if self.kernel == "dot" and (self.zeta < 1 or int(self.zeta) != self.zeta):
            raise ParameterError(f"the dot kernel needs an integer zeta >= 1, got {self.zeta}")
        if self.kernel == "exp" and not self.zeta > 0:
            raise ParameterError(f"zeta must be positive, got {self.zeta}")
        if self.selection not in _SELECTIONS:
            raise ParameterError(f"selection must be one of {_SELECTIONS}, got {self.selection!r}")
        if self.uncertainty not in _UNCERTAINTY:
            raise ParameterError(f"uncertainty must be one of {_UNCERTAINTY}")
        for name in ("energy_sigma", "force_sigma", "virial_sigma", "jitter"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value > 0):
                raise ParameterError(f"{name} must be positive, got {value}")
        if self.delta is not None and not self.delta > 0:
            raise ParameterError(f"delta must be positive (eV) or None, got {self.delta}")
        if int(self.n_sparse) < 1 or int(self.batch_size) < 1:
            raise ParameterError("n_sparse and batch_size must be at least 1")

    def fit(
        self,
        frames: Sequence[Atoms],
        trained_with: dict[str, Any] | None = None,
        *,
        progress: bool = False,
    ) -> SparseGPR:
        """Fit on Δ-labelled structures (energies, and forces/stress where present).

        Parameters
        ----------
        frames : sequence of ase.Atoms
            Each with a calculator holding the Δ ``energy`` (eV) and optionally
            ``forces`` (eV/Å) and ``stress`` (eV/Å³, 3D-periodic cells), e.g. from
            :func:`deltaml.dataset.delta_targets`.
        trained_with : dict, optional
            Records of the terms the targets were formed with (``{"baseline": ...,
            "dispersion": ...}``); the composite refuses other terms.
        progress : bool, default=False
            Show a progress bar over the descriptor batches.

        Returns
        -------
        SparseGPR
            self, fitted.
        """
        self._check_parameters()
        frames = list(frames)
        if not frames:
            raise MissingLabelError("fit: no structures")
        for index, atoms in enumerate(frames):
            if atoms.calc is None or "energy" not in atoms.calc.results:
                raise MissingLabelError(f"fit: structure {index} has no energy")
        self.species_ = sorted({int(z) for a in frames for z in a.numbers})
        self.descriptor_ = SOAPDescriptor(self.species_, **(self.descriptor or {}))
        self.offsets_ = self._fit_offsets(frames)
        self.delta_ = float(self.delta) if self.delta is not None else self._auto_delta(frames)
        self._select_sparse(frames)
        design, target, sigma = self._design(frames, progress)
        self._solve(design, target, sigma)
        self.trained_with_ = trained_with
        self.reference_ = frames[0].info.get("method_record")
        self.training_set_sha256_ = training_set_hash(frames)
        self.n_train_ = len(frames)
        self.uncertainty_scale_ = {"energy": 1.0, "forces": 1.0}
        return self

    def _fit_offsets(self, frames: list[Atoms]) -> dict[int, float]:
        if isinstance(self.offsets, dict):
            given = {}
            for symbol, value in self.offsets.items():
                if symbol not in atomic_numbers:
                    raise ParameterError(f"offsets: {symbol!r} is not an element symbol")
                given[atomic_numbers[symbol]] = float(value)
            missing = [chemical_symbols[z] for z in self.species_ if z not in given]
            if missing:
                raise ParameterError(f"offsets lack the element(s) {missing}")
            return {z: given[z] for z in self.species_}
        if self.offsets != "least_squares":
            raise ParameterError(
                f"offsets must be 'least_squares' or a dict of eV per element, got {self.offsets!r}"
            )
        counts = _counts(frames, self.species_)
        energies = np.array([a.calc.results["energy"] for a in frames])
        # A tiny ridge keeps elements that always appear in the same ratio determined.
        scale = max(1.0, float(np.abs(energies).max()))
        lhs = np.vstack([counts, 1e-8 * np.eye(len(self.species_))])
        rhs = np.concatenate([energies, np.zeros(len(self.species_))]) / scale
        mu = np.linalg.lstsq(lhs, rhs, rcond=None)[0] * scale
        return {z: float(m) for z, m in zip(self.species_, mu, strict=True)}

    def _offset_energy(self, frames: Sequence[Atoms]) -> NDArray[np.float64]:
        mu = np.array([self.offsets_[z] for z in self.species_])
        return _counts(frames, self.species_) @ mu

    def _auto_delta(self, frames: list[Atoms]) -> float:
        """Prior std of an atomic energy (eV), from the spread of the training targets.

        Energies: if atomic energies were independent with variance δ², a
        structure of N atoms would vary by N δ² around its offsets, so
        δ_E² = mean(r²/N). Forces: the prior force variance is δ² times a
        descriptor-dependent factor p (measured on up to 20 training structures
        at δ = 1), so δ_F = rms(F)/√p. The larger of the two is used: a prior that
        is too narrow for the forces underfits them badly (measured on water:
        3× larger force errors).
        """
        residual = np.array([a.calc.results["energy"] for a in frames]) - self._offset_energy(
            frames
        )
        n_atoms = np.array([len(a) for a in frames])
        delta = float(np.sqrt(np.mean(residual**2 / n_atoms)))
        with_forces = [a for a in frames if "forces" in a.calc.results]
        if with_forces:
            rng = np.random.default_rng(self.seed)
            picked = rng.permutation(len(with_forces))[:20]
            sample = [with_forces[i] for i in sorted(picked)]
            self.delta_ = 1.0
            prior = [
                self._prior_force_variance(self.descriptor_.compute(a, gradients=("positions",)))
                for a in sample
            ]
            forces = np.concatenate([a.calc.results["forces"].ravel() for a in sample])
            p = float(np.mean(np.concatenate(prior)))
            if p > 0:
                delta = max(delta, float(np.sqrt(np.mean(forces**2) / p)))
        return max(delta, 1e-3)

    def _batches(self, frames: Sequence[Atoms]) -> list[list[Atoms]]:
        size = int(self.batch_size)
        return [list(frames[i : i + size]) for i in range(0, len(frames), size)]

    def _select_sparse(self, frames: list[Atoms]) -> None:
        values, numbers = [], []
        for batch in self._batches(frames):
            computed = self.descriptor_.compute(batch)
            values.append(computed.values)
            numbers.append(computed.numbers)
        values, numbers = np.concatenate(values), np.concatenate(numbers)
        rng = np.random.default_rng(self.seed)
        chosen_values, chosen_numbers = [], []
        for z in self.species_:
            rows = values[numbers == z]
            rows = np.unique(np.round(rows, 12), axis=0)  # identical environments once
            picked = _select(rows, min(int(self.n_sparse), len(rows)), self.selection, rng)
            chosen_values.append(rows[picked])
            chosen_numbers.append(np.full(len(picked), z))
        self.sparse_values_ = np.concatenate(chosen_values)
        self.sparse_numbers_ = np.concatenate(chosen_numbers)

    def _columns(self) -> dict[int, NDArray[np.int64]]:
        return {z: np.flatnonzero(self.sparse_numbers_ == z) for z in self.species_}

    def _design(
        self, frames: list[Atoms], progress: bool
    ) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
        """Rows of K_nm for every observation, with targets and noise std."""
        from tqdm.auto import tqdm

        blocks, targets, sigmas = [], [], []
        offsets = self._offset_energy(frames)
        start = 0
        for batch in tqdm(self._batches(frames), disable=not progress, unit="batch"):
            with_forces = all("forces" in a.calc.results for a in batch)
            with_stress = [("stress" in a.calc.results) and a.pbc.all() for a in batch]
            gradients = ("positions",) if with_forces else ()
            if any(with_stress):
                gradients += ("strain",)
            computed = self.descriptor_.compute(batch, gradients=gradients)
            rows = self._rows(computed, batch, with_forces, any(with_stress))
            n_atoms = np.array([len(a) for a in batch])
            energies = np.array([a.calc.results["energy"] for a in batch])
            blocks.append(rows["energy"])
            targets.append(energies - offsets[start : start + len(batch)])
            sigmas.append(self.energy_sigma * np.sqrt(n_atoms))
            if with_forces:
                blocks.append(rows["forces"])
                targets.append(np.concatenate([a.calc.results["forces"].ravel() for a in batch]))
                sigmas.append(np.full(3 * n_atoms.sum(), self.force_sigma))
            for k, atoms in enumerate(batch):
                if with_stress[k]:
                    stress = np.asarray(atoms.calc.results["stress"], dtype=float)
                    if stress.shape == (3, 3):
                        stress = stress[_VOIGT]
                    blocks.append(rows["virial"][k])
                    targets.append(stress * atoms.get_volume())
                    sigmas.append(np.full(6, self.virial_sigma * np.sqrt(len(atoms))))
            start += len(batch)
        return np.vstack(blocks), np.concatenate(targets), np.concatenate(sigmas)

    def _rows(
        self, computed: DescriptorBatch, frames: Sequence[Atoms], forces: bool, virial: bool
    ) -> dict[str, NDArray[np.float64]]:
        """Kernel rows of energies, forces (−dE/dr) and virials (dE/dε, Voigt) per structure."""
        n_frames, n_atoms = len(frames), len(computed.values)
        m = len(self.sparse_values_)
        frame_of_row = np.repeat(np.arange(n_frames), np.diff(computed.offsets))
        energy = np.zeros((n_frames, m))
        force = np.zeros((3 * n_atoms, m)) if forces else None
        virial_rows = np.zeros((n_frames, 6, m)) if virial else None
        d2 = self.delta_**2
        for z, cols in self._columns().items():
            rows = np.flatnonzero(computed.numbers == z)
            if not len(rows):
                continue
            sparse = self.sparse_values_[cols]
            k, dk, _ = kernel_values(computed.values[rows] @ sparse.T, self.kernel, self.zeta)
            block = np.zeros((n_frames, len(cols)))
            np.add.at(block, frame_of_row[rows], d2 * k)
            energy[:, cols] = block
            local = np.full(n_atoms, -1)
            local[rows] = np.arange(len(rows))
            if forces:
                pairs = np.flatnonzero(local[computed.position_rows] >= 0)
                grad = computed.position_gradients[pairs]  # (p, 3, F)
                proj = (grad.reshape(-1, grad.shape[-1]) @ sparse.T).reshape(len(pairs), 3, -1)
                proj *= d2 * dk[local[computed.position_rows[pairs]]][:, None, :]
                atoms_idx = computed.position_atoms[pairs]
                target_rows = (3 * atoms_idx[:, None] + np.arange(3)).ravel()
                gather = scipy.sparse.csr_matrix(
                    (np.ones(len(target_rows)), (target_rows, np.arange(len(target_rows)))),
                    shape=(3 * n_atoms, len(target_rows)),
                )
                force[:, cols] = -(gather @ proj.reshape(len(target_rows), -1))
            if virial:
                strain = computed.strain_gradients[rows][:, _VOIGT[0], _VOIGT[1], :]  # (r, 6, F)
                proj = (strain.reshape(-1, strain.shape[-1]) @ sparse.T).reshape(len(rows), 6, -1)
                proj *= d2 * dk[:, None, :]
                block = np.zeros((n_frames, 6, len(cols)))
                np.add.at(block, frame_of_row[rows], proj)
                virial_rows[:, :, cols] = block
        out = {"energy": energy}
        if forces:
            out["forces"] = force
        if virial:
            out["virial"] = virial_rows
        return out

    def _kmm(self) -> NDArray[np.float64]:
        same = self.sparse_numbers_[:, None] == self.sparse_numbers_[None, :]
        k, _, _ = kernel_values(self.sparse_values_ @ self.sparse_values_.T, self.kernel, self.zeta)
        return self.delta_**2 * np.where(same, k, 0.0)

    def _solve(self, design: NDArray, target: NDArray, sigma: NDArray) -> None:
        kmm = self._kmm()
        m = len(kmm)
        kmm[np.diag_indices(m)] += self.jitter * self.delta_**2
        self.chol_mm_ = np.linalg.cholesky(kmm)
        stacked = np.vstack([design / sigma[:, None], self.chol_mm_.T])
        rhs = np.concatenate([target / sigma, np.zeros(m)])
        q, r = scipy.linalg.qr(stacked, mode="economic", check_finite=False)
        self.r_factor_ = r
        self.alpha_ = scipy.linalg.solve_triangular(r, q.T @ rhs, check_finite=False)

    # -- prediction ---------------------------------------------------------------

    def predict(
        self, atoms: Atoms, *, forces: bool = True, stress: bool = False
    ) -> CorrectionResult:
        """Correction for one structure: energy (eV), forces (eV/Å), stress (eV/Å³).

        Uncertainties (standard deviations, scaled by :meth:`calibrate`): per
        structure and per atom (eV) always (unless ``uncertainty=None``), per
        atom for forces (eV/Å, RMS over x, y, z) with ``uncertainty="forces"``.
        """
        self._check_fitted()
        want_var = self.uncertainty is not None
        want_force_var = self.uncertainty == "forces" and forces
        gradients: tuple[str, ...] = ("positions",) if forces or want_force_var else ()
        if stress:
            gradients += ("strain",)
        computed = self.descriptor_.compute(atoms, gradients=gradients)
        result: dict[str, Any] = {}
        if want_force_var:
            # The kernel rows of the forces are needed for their variance anyway.
            rows = self._rows(computed, [atoms], True, stress)
            result["energy"] = float(rows["energy"][0] @ self.alpha_)
            if forces:
                result["forces"] = (rows["forces"] @ self.alpha_).reshape(-1, 3)
            if stress:
                result["stress"] = rows["virial"][0] @ self.alpha_ / atoms.get_volume()
        else:
            result.update(self._fast_prediction(computed, forces, stress, atoms))
        result["energy"] += float(self._offset_energy([atoms])[0])
        if want_var:
            per_atom, total = self._energy_variance(computed)
            scale = self.uncertainty_scale_["energy"]
            result["energies_uncertainty"] = scale * np.sqrt(per_atom)
            result["energy_uncertainty"] = scale * float(np.sqrt(total))
        if want_force_var:
            variance = self._force_variance(computed, rows["forces"])
            rms = np.sqrt(variance.reshape(-1, 3).mean(axis=1))
            result["forces_uncertainty"] = self.uncertainty_scale_["forces"] * rms
        return CorrectionResult(**result)

    def _fast_prediction(
        self, computed: DescriptorBatch, forces: bool, stress: bool, atoms: Atoms
    ) -> dict[str, Any]:
        """Energy, forces and stress through dE/dx̂ per atom (no kernel rows per force).

        With w_i = δ² Σ_m α_m k'(x̂_i·x̂_m) x̂_m, dE/dr = Σ_i (dx̂_i/dr)·w_i: the cost
        is atoms × sparse points × features once, instead of per force component.
        """
        d2 = self.delta_**2
        n_atoms = len(computed.values)
        energy = 0.0
        weights = np.zeros_like(computed.values)
        for z, cols in self._columns().items():
            rows = np.flatnonzero(computed.numbers == z)
            if not len(rows):
                continue
            sparse, alpha = self.sparse_values_[cols], self.alpha_[cols]
            k, dk, _ = kernel_values(computed.values[rows] @ sparse.T, self.kernel, self.zeta)
            energy += d2 * float(np.sum(k @ alpha))
            weights[rows] = d2 * (dk * alpha) @ sparse
        out: dict[str, Any] = {"energy": energy}
        if forces:
            per_pair = np.einsum(
                "paf,pf->pa", computed.position_gradients, weights[computed.position_rows]
            )
            gradient = np.zeros((n_atoms, 3))
            np.add.at(gradient, computed.position_atoms, per_pair)
            out["forces"] = -gradient
        if stress:
            virial = np.einsum("iabf,if->ab", computed.strain_gradients, weights)
            out["stress"] = virial[_VOIGT] / atoms.get_volume()
        return out

    def predict_energies(self, frames: Sequence[Atoms]) -> NDArray[np.float64]:
        """Correction energies of many structures (eV), batched, without gradients."""
        self._check_fitted()
        out = []
        for batch in self._batches(list(frames)):
            rows = self._rows(self.descriptor_.compute(batch), batch, False, False)
            out.append(rows["energy"] @ self.alpha_ + self._offset_energy(batch))
        return np.concatenate(out)

    def _posterior_terms(self, kvec: NDArray) -> NDArray:
        """k^T K_mm^-1 k and k^T Σ k for rows of kernel vectors (DTC variance)."""
        q = scipy.linalg.solve_triangular(self.chol_mm_, kvec.T, lower=True, check_finite=False)
        s = scipy.linalg.solve_triangular(self.r_factor_, kvec.T, trans="T", check_finite=False)
        return -np.sum(q**2, axis=0) + np.sum(s**2, axis=0)

    def _atom_kernel_rows(self, computed: DescriptorBatch) -> NDArray:
        """δ² k(x̂_i, x̂_m) of every atom i with every sparse point m (zero across species)."""
        values, numbers = computed.values, computed.numbers
        per_atom_k = np.zeros((len(values), len(self.sparse_values_)))
        for z, cols in self._columns().items():
            mine = numbers == z
            c = values[mine] @ self.sparse_values_[cols].T
            k, _, _ = kernel_values(c, self.kernel, self.zeta)
            per_atom_k[np.ix_(mine, cols)] = self.delta_**2 * k
        return per_atom_k

    def _prior_energy_covariance(self, first: DescriptorBatch, second: DescriptorBatch) -> float:
        """Prior covariance of two structures' energies (eV²): δ² Σ_ij k(x̂_i, x̂_j), same species."""
        same = first.numbers[:, None] == second.numbers[None, :]
        k_pairs, _, _ = kernel_values(first.values @ second.values.T, self.kernel, self.zeta)
        return self.delta_**2 * float(np.sum(np.where(same, k_pairs, 0.0)))

    def _energy_variance(self, computed: DescriptorBatch) -> tuple[NDArray, float]:
        """Posterior variance of each atomic energy and of the total (eV²), one structure."""
        per_atom_k = self._atom_kernel_rows(computed)
        k_self, _, _ = kernel_values(np.ones(1), self.kernel, self.zeta)
        per_atom = self.delta_**2 * k_self[0] + self._posterior_terms(per_atom_k)
        prior_total = self._prior_energy_covariance(computed, computed)
        # The structure's kernel row is the sum of its atoms' rows.
        total_k = per_atom_k.sum(axis=0, keepdims=True)
        total = prior_total + float(self._posterior_terms(total_k)[0])
        return np.maximum(per_atom, 0.0), max(total, 0.0)

    def energy_covariance(self, frames: Sequence[Atoms]) -> NDArray[np.float64]:
        """Posterior covariance of the correction energies of several structures (eV²).

        The diagonal is the square of :meth:`predict`'s ``energy_uncertainty``;
        the off-diagonal terms are what makes an energy *difference* between
        similar structures more certain than either energy (polymorph ranking).
        Scaled by the energy factor of :meth:`calibrate`.

        Parameters
        ----------
        frames : sequence of ase.Atoms
            Structures (any sizes).

        Returns
        -------
        ndarray of shape (n_frames, n_frames)
            Symmetric, positive semi-definite up to round-off, eV².
        """
        self._check_fitted()
        computed = [self.descriptor_.compute(atoms) for atoms in frames]
        n = len(computed)
        prior = np.zeros((n, n))
        for i in range(n):
            for j in range(i, n):
                prior[i, j] = prior[j, i] = self._prior_energy_covariance(computed[i], computed[j])
        rows = np.array([self._atom_kernel_rows(c).sum(axis=0) for c in computed])
        q = scipy.linalg.solve_triangular(self.chol_mm_, rows.T, lower=True, check_finite=False)
        s = scipy.linalg.solve_triangular(self.r_factor_, rows.T, trans="T", check_finite=False)
        covariance = prior - q.T @ q + s.T @ s
        return self.uncertainty_scale_["energy"] ** 2 * (covariance + covariance.T) / 2.0

    def _force_variance(self, computed: DescriptorBatch, force_rows: NDArray) -> NDArray:
        """Posterior variance of each force component (eV²/Å²)."""
        # Forces are −dE/dr: the sign does not change a variance.
        prior = self._prior_force_variance(computed)
        return np.maximum(prior + self._posterior_terms(force_rows), 0.0)

    def _prior_force_variance(self, computed: DescriptorBatch) -> NDArray:
        """Prior variance of each force component (eV²/Å²), exactly, pair by pair."""
        d2 = self.delta_**2
        values, numbers = computed.values, computed.numbers
        n_atoms = len(values)
        prior = np.zeros(3 * n_atoms)
        order = np.argsort(computed.position_atoms, kind="stable")
        atoms_sorted = computed.position_atoms[order]
        bounds = np.searchsorted(atoms_sorted, np.arange(n_atoms + 1))
        for j in range(n_atoms):
            pairs = order[bounds[j] : bounds[j + 1]]
            rows = computed.position_rows[pairs]
            x = values[rows]
            same = numbers[rows][:, None] == numbers[rows][None, :]
            _, k1, k2 = kernel_values(x @ x.T, self.kernel, self.zeta)
            for a in range(3):
                g = computed.position_gradients[pairs, a, :]
                gx = g @ x.T  # (g_i · x̂_i')
                cov = k1 * (g @ g.T) + k2 * gx * gx.T
                prior[3 * j + a] = d2 * np.sum(np.where(same, cov, 0.0))
        return prior

    # -- calibration --------------------------------------------------------------

    def calibrate(self, frames: Sequence[Atoms]) -> dict[str, float]:
        """Scale the GP's standard deviations so that held-out errors have unit z-score.

        Parameters
        ----------
        frames : sequence of ase.Atoms
            Held-out Δ-labelled structures (not used in the fit).

        Returns
        -------
        dict
            ``{"energy": s_E, "forces": s_F}``: RMS of error / predicted std before
            scaling (1 means the GP's variance was calibrated already).
        """
        self._check_fitted()
        saved = dict(self.uncertainty_scale_)
        self.uncertainty_scale_ = {"energy": 1.0, "forces": 1.0}
        z_energy, z_forces = [], []
        try:
            for atoms in frames:
                with_forces = "forces" in atoms.calc.results and self.uncertainty == "forces"
                result = self.predict(atoms, forces=with_forces)
                error = atoms.calc.results["energy"] - result.energy
                z_energy.append(error / max(result.energy_uncertainty, 1e-12))
                if with_forces:
                    err = atoms.calc.results["forces"] - result.forces
                    std = np.maximum(result.forces_uncertainty, 1e-12)[:, None]
                    z_forces.append((err / std).ravel())
        except Exception:
            self.uncertainty_scale_ = saved
            raise
        scale = {"energy": float(np.sqrt(np.mean(np.square(z_energy))))}
        scale["forces"] = (
            float(np.sqrt(np.mean(np.square(np.concatenate(z_forces))))) if z_forces else 1.0
        )
        self.uncertainty_scale_ = scale
        return dict(scale)

    # -- files --------------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        """JSON metadata of the model file (see :meth:`save`)."""
        self._check_fitted()
        return {
            "format": MODEL_FORMAT,
            "format_version": MODEL_FORMAT_VERSION,
            "deltaml_version": _deltaml_version(),
            "model": type(self).__name__,
            "params": self.get_params(),
            "descriptor": self.descriptor_.record(),
            "species": [chemical_symbols[z] for z in self.species_],
            "offsets_ev": {chemical_symbols[z]: v for z, v in self.offsets_.items()},
            "delta_ev": self.delta_,
            "trained_with": self.trained_with_,
            "reference": self.reference_,
            "training_set_sha256": self.training_set_sha256_,
            "n_train": self.n_train_,
            "uncertainty_scale": self.uncertainty_scale_,
            "units": {"energy": "eV", "forces": "eV/Å", "stress": "eV/Å^3"},
        }

    def save(self, path: str | Path) -> Path:
        """Write ``.npz`` arrays plus JSON metadata (no pickle), atomically.

        Returns
        -------
        pathlib.Path
            The file written.
        """
        path = Path(path)
        partial = path.with_name(path.name + ".partial.npz")
        np.savez(
            partial,
            metadata=np.array(json.dumps(self.metadata(), sort_keys=True)),
            sparse_values=self.sparse_values_,
            sparse_numbers=self.sparse_numbers_,
            alpha=self.alpha_,
            chol_mm=self.chol_mm_,
            r_factor=self.r_factor_,
        )
        partial.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> SparseGPR:
        """Read a model file written by :meth:`save`.

        Raises
        ------
        ModelFileError
            Not a deltaml model, or written in another format version.
        """
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {key: data[key] for key in data.files}
        except (OSError, ValueError) as exc:
            raise ModelFileError(f"{path}: not a deltaml model file ({exc})") from exc
        if "metadata" not in arrays:
            raise ModelFileError(f"{path}: no metadata; not a deltaml model file")
        meta = json.loads(str(arrays["metadata"]))
        if meta.get("format") != MODEL_FORMAT:
            raise ModelFileError(f"{path}: format {meta.get('format')!r} is not {MODEL_FORMAT!r}")
        if meta.get("format_version") != MODEL_FORMAT_VERSION:
            raise ModelFileError(
                f"{path}: model format version {meta.get('format_version')} (written by deltaml "
                f"{meta.get('deltaml_version')}); this deltaml ({_deltaml_version()}) reads "
                f"version {MODEL_FORMAT_VERSION}: refit the model"
            )
        model = cls(**meta["params"])
        model.species_ = [atomic_numbers[s] for s in meta["species"]]
        model.descriptor_ = SOAPDescriptor.from_record(meta["descriptor"])
        model.offsets_ = {atomic_numbers[s]: float(v) for s, v in meta["offsets_ev"].items()}
        model.delta_ = float(meta["delta_ev"])
        model.trained_with_ = meta["trained_with"]
        model.reference_ = meta["reference"]
        model.training_set_sha256_ = meta["training_set_sha256"]
        model.n_train_ = int(meta["n_train"])
        model.uncertainty_scale_ = dict(meta["uncertainty_scale"])
        model.sparse_values_ = arrays["sparse_values"]
        model.sparse_numbers_ = arrays["sparse_numbers"]
        model.alpha_ = arrays["alpha"]
        model.chol_mm_ = arrays["chol_mm"]
        model.r_factor_ = arrays["r_factor"]
        return model


def _counts(frames: Sequence[Atoms], species: list[int]) -> NDArray[np.float64]:
    """Number of atoms of each element per structure (n_frames × n_species)."""
    index = {z: k for k, z in enumerate(species)}
    counts = np.zeros((len(frames), len(species)))
    for row, atoms in enumerate(frames):
        for z in atoms.numbers:
            if int(z) not in index:
                raise UnsupportedElementError(
                    f"element {chemical_symbols[int(z)]} is not among the model's species "
                    f"{[chemical_symbols[s] for s in species]}"
                )
            counts[row, index[int(z)]] += 1
    return counts


def _select(rows: NDArray, count: int, method: str, rng: np.random.Generator) -> NDArray:
    """Indices of ``count`` representative rows (unit vectors)."""
    if count >= len(rows):
        return np.arange(len(rows))
    if method == "random":
        return np.sort(rng.choice(len(rows), size=count, replace=False))
    if method == "cur":
        # Leverage scores on the leading right-singular subspace of rank ``count``.
        u, _, _ = np.linalg.svd(rows, full_matrices=False)
        leverage = np.sum(u[:, :count] ** 2, axis=1)
        return np.sort(np.argsort(-leverage, kind="stable")[:count])
    chosen = [int(rng.integers(len(rows)))]
    distance = 2.0 - 2.0 * rows @ rows[chosen[0]]  # squared distance of unit vectors
    for _ in range(count - 1):
        nxt = int(np.argmax(distance))
        if distance[nxt] <= 0.0:
            break
        chosen.append(nxt)
        distance = np.minimum(distance, 2.0 - 2.0 * rows @ rows[nxt])
    return np.array(chosen)


def training_set_hash(frames: Sequence[Atoms]) -> str:
    """SHA-256 of the training structures and their targets (order included)."""
    digest = hashlib.sha256()
    for atoms in frames:
        digest.update(np.asarray(atoms.numbers, dtype=np.int64).tobytes())
        digest.update(np.round(atoms.positions, 8).tobytes())
        digest.update(np.round(atoms.cell.array, 8).tobytes())
        for key in ("energy", "forces", "stress"):
            if key in atoms.calc.results:
                digest.update(np.round(np.asarray(atoms.calc.results[key], float), 10).tobytes())
    return digest.hexdigest()


def _deltaml_version() -> str:
    try:
        return version("deltaml")
    except Exception:  # a source tree that is not installed
        return "0+unknown"
