r"""Sparse kernel terms: one Gaussian process over per-atom descriptor rows.

A term is a sum of atomic energies, each a GP on the atom's descriptor row
:math:`x_i`, over sparse (representative) rows :math:`x_m` of the same element:

.. math::

    E = \sum_i \sum_{m \in Z_i} \alpha_m\, \delta^2 k(x_i \cdot x_m),
    \qquad k(c) = c^\zeta \ \text{(dot)} \quad\text{or}\quad e^{\zeta (c - 1)} \ \text{(exp)}.

:class:`~deltaml.model.SparseGPR` fits one term (the atomic decomposition) or
two independent ones (intramolecular + intermolecular) on the same targets.
This module holds what a term computes for given descriptor rows: kernel rows
of energies, forces and virials, the sparse-sparse kernel, the prior variances
and the fast energy-and-gradient path. Nothing here fits or stores a model.

Rows need not be normalised: the intermolecular rows are not, and the dot
kernel with integer ζ ≥ 1 makes their energy, and its gradient, vanish with
them.

Data flow: descriptors → **kernels** → model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse
from numpy.typing import NDArray

from deltaml.descriptors import DescriptorBatch

__all__ = ["KERNELS", "VOIGT", "KernelTerm", "kernel_values"]

#: Kernel functions of c = x·y.
KERNELS = ("dot", "exp")

#: Voigt order of ASE: xx, yy, zz, yz, xz, xy, as index pairs into a 3×3 tensor.
VOIGT = (np.array([0, 1, 2, 1, 0, 0]), np.array([0, 1, 2, 2, 2, 1]))


def kernel_values(c: NDArray, kind: str, zeta: float) -> tuple[NDArray, NDArray, NDArray]:
    """k(c), k'(c), k''(c) of the kernel as a function of c = x·y (``kind`` "dot" or "exp")."""
    if kind == "dot":
        k1 = zeta * c ** (zeta - 1) if zeta >= 1 else np.zeros_like(c)
        k2 = zeta * (zeta - 1) * c ** (zeta - 2) if zeta >= 2 else np.zeros_like(c)
        return c**zeta, k1, k2
    k = np.exp(zeta * (c - 1.0))
    return k, zeta * k, zeta * zeta * k


@dataclass
class KernelTerm:
    """One sparse GP term over per-atom rows (see the module docstring).

    Attributes
    ----------
    name : str
        ``"atomic"``, ``"intra"`` or ``"inter"``.
    kernel : str
        ``"dot"`` or ``"exp"``.
    zeta : float
        Kernel exponent.
    delta : float
        Prior standard deviation of an atomic energy at unit kernel, eV.
    sparse_values : ndarray of shape (m, n_features)
        Sparse rows.
    sparse_numbers : ndarray of shape (m,)
        Element of each sparse row; the kernel is zero between elements.
    """

    name: str
    kernel: str
    zeta: float
    delta: float
    sparse_values: NDArray[np.float64]
    sparse_numbers: NDArray[np.int64]

    @property
    def size(self) -> int:
        """Number of sparse points (columns of this term)."""
        return len(self.sparse_values)

    def columns(self) -> dict[int, NDArray[np.int64]]:
        """Sparse columns of each element."""
        return {
            int(z): np.flatnonzero(self.sparse_numbers == z) for z in np.unique(self.sparse_numbers)
        }

    def kmm(self) -> NDArray[np.float64]:
        """δ² k(x_m, x_m') between sparse points (zero across elements)."""
        same = self.sparse_numbers[:, None] == self.sparse_numbers[None, :]
        k, _, _ = kernel_values(self.sparse_values @ self.sparse_values.T, self.kernel, self.zeta)
        return self.delta**2 * np.where(same, k, 0.0)

    def atom_rows(self, batch: DescriptorBatch) -> NDArray[np.float64]:
        """δ² k(x_i, x_m) of every atom i with every sparse point m."""
        out = np.zeros((len(batch.values), self.size))
        for z, cols in self.columns().items():
            mine = batch.numbers == z
            k, _, _ = kernel_values(
                batch.values[mine] @ self.sparse_values[cols].T, self.kernel, self.zeta
            )
            out[np.ix_(mine, cols)] = self.delta**2 * k
        return out

    def rows(
        self, batch: DescriptorBatch, n_frames: int, forces: bool, virial: bool
    ) -> dict[str, NDArray[np.float64]]:
        """Kernel rows of energies, forces (−dE/dr) and virials (dE/dε, Voigt) per frame."""
        n_atoms = len(batch.values)
        frame_of_row = np.repeat(np.arange(n_frames), np.diff(batch.offsets))
        out = {"energy": np.zeros((n_frames, self.size))}
        if forces:
            out["forces"] = np.zeros((3 * n_atoms, self.size))
        if virial:
            out["virial"] = np.zeros((n_frames, 6, self.size))
        d2 = self.delta**2
        for z, cols in self.columns().items():
            rows = np.flatnonzero(batch.numbers == z)
            if not len(rows):
                continue
            sparse = self.sparse_values[cols]
            k, dk, _ = kernel_values(batch.values[rows] @ sparse.T, self.kernel, self.zeta)
            block = np.zeros((n_frames, len(cols)))
            np.add.at(block, frame_of_row[rows], d2 * k)
            out["energy"][:, cols] = block
            if forces:
                local = np.full(n_atoms, -1)
                local[rows] = np.arange(len(rows))
                pairs = np.flatnonzero(local[batch.position_rows] >= 0)
                grad = batch.position_gradients[pairs]  # (p, 3, F)
                proj = (grad.reshape(-1, grad.shape[-1]) @ sparse.T).reshape(len(pairs), 3, -1)
                proj *= d2 * dk[local[batch.position_rows[pairs]]][:, None, :]
                target = (3 * batch.position_atoms[pairs][:, None] + np.arange(3)).ravel()
                gather = scipy.sparse.csr_matrix(
                    (np.ones(len(target)), (target, np.arange(len(target)))),
                    shape=(3 * n_atoms, len(target)),
                )
                out["forces"][:, cols] = -(gather @ proj.reshape(len(target), -1))
            if virial:
                strain = batch.strain_gradients[rows][:, VOIGT[0], VOIGT[1], :]  # (r, 6, F)
                proj = (strain.reshape(-1, strain.shape[-1]) @ sparse.T).reshape(len(rows), 6, -1)
                proj *= d2 * dk[:, None, :]
                block = np.zeros((n_frames, 6, len(cols)))
                np.add.at(block, frame_of_row[rows], proj)
                out["virial"][:, :, cols] = block
        return out

    def energy_and_gradients(
        self, batch: DescriptorBatch, alpha: NDArray, forces: bool, virial: bool
    ) -> tuple[float, NDArray | None, NDArray | None]:
        """Energy (eV), forces (eV/Å) and virial dE/dε (3×3, eV) of one frame, through dE/dx.

        With w_i = δ² Σ_m α_m k'(x_i·x_m) x_m, dE/dr = Σ_i (dx_i/dr)·w_i: the cost is
        atoms × sparse points × features once, instead of per force component.
        """
        d2 = self.delta**2
        n_atoms = len(batch.values)
        energy = 0.0
        weights = np.zeros_like(batch.values)
        for z, cols in self.columns().items():
            rows = np.flatnonzero(batch.numbers == z)
            if not len(rows):
                continue
            sparse, a = self.sparse_values[cols], alpha[cols]
            k, dk, _ = kernel_values(batch.values[rows] @ sparse.T, self.kernel, self.zeta)
            energy += d2 * float(np.sum(k @ a))
            weights[rows] = d2 * (dk * a) @ sparse
        force_out = virial_out = None
        if forces:
            per_pair = np.einsum(
                "paf,pf->pa", batch.position_gradients, weights[batch.position_rows]
            )
            gradient = np.zeros((n_atoms, 3))
            np.add.at(gradient, batch.position_atoms, per_pair)
            force_out = -gradient
        if virial:
            virial_out = np.einsum("iabf,if->ab", batch.strain_gradients, weights)
        return energy, force_out, virial_out

    def prior_atom_variance(self, batch: DescriptorBatch) -> NDArray[np.float64]:
        """Prior variance of each atomic energy, δ² k(x_i·x_i) (eV²)."""
        k, _, _ = kernel_values(
            np.einsum("if,if->i", batch.values, batch.values), self.kernel, self.zeta
        )
        return self.delta**2 * k

    def prior_energy_covariance(self, first: DescriptorBatch, second: DescriptorBatch) -> float:
        """Prior covariance of two frames' energies (eV²): δ² Σ_ij k(x_i·x_j), same element."""
        same = first.numbers[:, None] == second.numbers[None, :]
        k, _, _ = kernel_values(first.values @ second.values.T, self.kernel, self.zeta)
        return self.delta**2 * float(np.sum(np.where(same, k, 0.0)))

    def prior_force_variance(self, batch: DescriptorBatch) -> NDArray[np.float64]:
        """Prior variance of each force component (eV²/Å²), exactly, pair by pair."""
        d2 = self.delta**2
        values, numbers = batch.values, batch.numbers
        n_atoms = len(values)
        prior = np.zeros(3 * n_atoms)
        order = np.argsort(batch.position_atoms, kind="stable")
        atoms_sorted = batch.position_atoms[order]
        bounds = np.searchsorted(atoms_sorted, np.arange(n_atoms + 1))
        for j in range(n_atoms):
            pairs = order[bounds[j] : bounds[j + 1]]
            rows = batch.position_rows[pairs]
            x = values[rows]
            same = numbers[rows][:, None] == numbers[rows][None, :]
            _, k1, k2 = kernel_values(x @ x.T, self.kernel, self.zeta)
            for a in range(3):
                g = batch.position_gradients[pairs, a, :]
                gx = g @ x.T  # (g_i · x_i')
                cov = k1 * (g @ g.T) + k2 * gx * gx.T
                prior[3 * j + a] = d2 * np.sum(np.where(same, cov, 0.0))
        return prior
