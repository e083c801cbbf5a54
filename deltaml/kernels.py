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

from deltaml.descriptors import DescriptorBatch, _column_span
from deltaml.structures import VOIGT_INDICES

__all__ = ["KERNELS", "VOIGT", "KernelTerm", "kernel_values"]

#: Kernel functions of c = x·y.
KERNELS = ("dot", "exp")

#: Voigt order of ASE: xx, yy, zz, yz, xz, xy, as index pairs into a 3×3 tensor.
VOIGT = VOIGT_INDICES  # one definition, in deltaml.structures


def kernel_values(c: NDArray, kind: str, zeta: float) -> tuple[NDArray, NDArray, NDArray]:
    """k(c), k'(c), k''(c) of the kernel as a function of c = x·y (``kind`` "dot" or "exp")."""
    if kind == "dot":
        k1 = zeta * c ** (zeta - 1) if zeta >= 1 else np.zeros_like(c)
        k2 = zeta * (zeta - 1) * c ** (zeta - 2) if zeta >= 2 else np.zeros_like(c)
        return c**zeta, k1, k2
    k = np.exp(zeta * (c - 1.0))
    return k, zeta * k, zeta * zeta * k


#: Rows per block of a kernel sum between two sets of rows (bounds its memory).
BLOCK_ROWS = 2048


def _kernel_sum(x: NDArray, y: NDArray, kind: str, zeta: float) -> float:
    """Σ_ij k(x_i·y_j) in memory linear in the rows (and time, where the kernel allows)."""
    n_features = x.shape[1]
    if kind == "dot" and zeta == 1:
        return float(x.sum(axis=0) @ y.sum(axis=0))
    if kind == "dot" and zeta == 2 and min(len(x), len(y)) > n_features:
        return float(np.sum((x.T @ x) * (y.T @ y)))
    total = 0.0
    for start in range(0, len(x), BLOCK_ROWS):
        k, _, _ = kernel_values(x[start : start + BLOCK_ROWS] @ y.T, kind, zeta)
        total += float(np.sum(k))
    return total


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
        """Kernel rows of energies, forces (−dE/dr) and virials (dE/dε, Voigt) per frame.

        Force rows run over ``batch.atom_count`` atoms (all atoms of the structure
        when the batch holds the rows of some centres only).
        """
        n_rows, n_atoms = len(batch.values), batch.atom_count
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
                local = np.full(n_rows, -1)
                local[rows] = np.arange(len(rows))
                pairs = np.flatnonzero(local[batch.position_rows] >= 0)
                grad = batch.position_gradients[pairs]  # (p, 3, F)
                proj = (grad.reshape(-1, grad.shape[-1]) @ sparse.T).reshape(
                    len(pairs), 3, len(cols)
                )  # explicit sizes: a molecule alone has no intermolecular pairs
                proj *= d2 * dk[local[batch.position_rows[pairs]]][:, None, :]
                target = (3 * batch.position_atoms[pairs][:, None] + np.arange(3)).ravel()
                gather = scipy.sparse.csr_matrix(
                    (np.ones(len(target)), (target, np.arange(len(target)))),
                    shape=(3 * n_atoms, len(target)),
                )
                out["forces"][:, cols] = -(gather @ proj.reshape(len(target), len(cols)))
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
        energy, force_out, virial_out, _ = self.evaluate(batch, alpha, forces, virial)
        return energy, force_out, virial_out

    def evaluate(
        self,
        batch: DescriptorBatch,
        alpha: NDArray,
        forces: bool,
        virial: bool,
        atom_rows: bool = False,
    ) -> tuple[float, NDArray | None, NDArray | None, NDArray | None]:
        """:meth:`energy_and_gradients`, and :meth:`atom_rows` from the same kernel values.

        The kernel between the rows and the sparse points is the costly product
        (the sparse rows are streamed from memory once per call): the energy
        variance needs it too, so it is formed once.

        Returns
        -------
        energy : float
            eV.
        forces : ndarray of shape (n_atoms, 3) or None
            eV/Å.
        virial : ndarray of shape (3, 3) or None
            dE/dε, eV.
        rows : ndarray of shape (n_rows, size) or None
            δ² k(x_i, x_m) (eV²), with ``atom_rows``.
        """
        n_atoms = batch.atom_count
        gradients = forces or virial
        energy, weights, rows_out = self.energy_weights(batch, alpha, gradients, atom_rows)
        force_out = virial_out = None
        if batch.pullback is not None and gradients:
            # Rows from the spherical expansion (deltaml.expansion): one backward pass.
            gradient, virial_out = batch.pullback(weights, forces, virial)
            return energy, (None if gradient is None else -gradient), virial_out, rows_out
        if forces:
            per_pair = np.einsum(
                "paf,pf->pa", batch.position_gradients, weights[batch.position_rows]
            )
            gradient = np.zeros((n_atoms, 3))
            np.add.at(gradient, batch.position_atoms, per_pair)
            force_out = -gradient
        if virial:
            virial_out = np.einsum("iabf,if->ab", batch.strain_gradients, weights)
        return energy, force_out, virial_out, rows_out

    def energy_weights(
        self, batch: DescriptorBatch, alpha: NDArray, weights: bool = True, atom_rows: bool = False
    ) -> tuple[float, NDArray | None, NDArray | None]:
        """Energy (eV), w_i = dE/dx_i (eV per unit of the rows) and :meth:`atom_rows`.

        The core of :meth:`evaluate`; with rows that carry a pullback, the
        weights of several terms can be pulled back together.
        """
        d2 = self.delta**2
        energy = 0.0
        out = np.zeros_like(batch.values) if weights else None
        rows_out = np.zeros((len(batch.values), self.size)) if atom_rows else None
        for z, cols in self.columns().items():
            rows = np.flatnonzero(batch.numbers == z)
            if not len(rows):
                continue
            # A view, not a copy: copying the sparse rows (MB) was most of a small call.
            cols = _column_span(cols) or cols
            sparse, a = self.sparse_values[cols], alpha[cols]
            k, dk, _ = kernel_values(batch.values[rows] @ sparse.T, self.kernel, self.zeta)
            energy += d2 * float(np.sum(k @ a))
            if weights:
                out[rows] = d2 * (dk * a) @ sparse
            if atom_rows:
                rows_out[rows if isinstance(cols, slice) else rows[:, None], cols] = d2 * k
        return energy, out, rows_out

    def prior_atom_variance(self, batch: DescriptorBatch) -> NDArray[np.float64]:
        """Prior variance of each atomic energy, δ² k(x_i·x_i) (eV²)."""
        k, _, _ = kernel_values(
            np.einsum("if,if->i", batch.values, batch.values), self.kernel, self.zeta
        )
        return self.delta**2 * k

    def prior_energy_covariance(self, first: DescriptorBatch, second: DescriptorBatch) -> float:
        """Prior covariance of two frames' energies (eV²): δ² Σ_ij k(x_i·x_j), same element.

        Element by element, in blocks of :data:`BLOCK_ROWS` rows: memory grows
        linearly with the rows. With the dot kernel and ζ = 1 or 2 on more rows
        than features, through the sums Σ_i x_i (ζ = 1) or Σ_i x_i x_iᵀ (ζ = 2):
        time grows linearly too (Σ_ij (x_i·y_j)² = tr(XᵀX YᵀY)).
        """
        total = 0.0
        for z in np.intersect1d(first.numbers, second.numbers):
            x = first.values[first.numbers == z]
            y = second.values[second.numbers == z]
            total += _kernel_sum(x, y, self.kernel, self.zeta)
        return self.delta**2 * total

    def gradient_sums(
        self, batch: DescriptorBatch, sums: dict[int, NDArray] | None = None
    ) -> dict[int, NDArray[np.float64]]:
        """Σ_i dx_i/dr_j over the rows i of each element, added to ``sums``.

        ``{element: array of shape (atom_count, 3, n_features)}``. With the dot
        kernel and ζ = 1 the prior force variance is δ² Σ_z |Σ_{i∈z} dx_i/dr_j|²
        (:meth:`prior_force_variance_from_sums`): sums over pieces of the rows
        add up, so a structure done in pieces needs no piece to hold every row
        that an atom moves.
        """
        sums = {} if sums is None else sums
        n_atoms, width = batch.atom_count, batch.values.shape[1]
        element = batch.numbers[batch.position_rows]
        for z in np.unique(element):
            pairs = np.flatnonzero(element == z)
            gather = scipy.sparse.csr_matrix(
                (np.ones(len(pairs)), (batch.position_atoms[pairs], np.arange(len(pairs)))),
                shape=(n_atoms, len(pairs)),
            )
            part = gather @ batch.position_gradients[pairs].reshape(len(pairs), 3 * width)
            part = part.reshape(n_atoms, 3, width)
            if int(z) in sums:
                sums[int(z)] += part
            else:
                sums[int(z)] = part
        return sums

    def prior_force_variance_from_sums(self, sums: dict[int, NDArray]) -> NDArray[np.float64]:
        """Prior variance of each force component (eV²/Å²) from :meth:`gradient_sums`.

        Exact for the dot kernel with ζ = 1 (k' = 1, k'' = 0) only.
        """
        if self.kernel != "dot" or self.zeta != 1:
            raise ValueError("prior_force_variance_from_sums needs the dot kernel with zeta = 1")
        total = sum(np.einsum("jaf,jaf->ja", g, g) for g in sums.values())
        return self.delta**2 * np.asarray(total).ravel()

    def prior_virial_variance(self, batch: DescriptorBatch) -> NDArray[np.float64]:
        """Prior variance of the six virial components dE/dε (eV², Voigt order), one frame.

        Var(dE/dε_c) = δ² Σ_ij [k'(x_i·x_j) g_i·g_j + k''(x_i·x_j)(g_i·x_j)(g_j·x_i)]
        over rows i, j of one element, with g_i = dx_i/dε_c (the batch's strain
        gradients): every row of a cell moves under a homogeneous strain, so
        the sum runs over all pairs (fine for cells of a few hundred atoms).
        """
        values, numbers = batch.values, batch.numbers
        strain = batch.strain_gradients[:, VOIGT[0], VOIGT[1], :]  # (r, 6, F)
        out = np.zeros(6)
        for z in np.unique(numbers):
            mine = numbers == z
            x = values[mine]
            _, k1, k2 = kernel_values(x @ x.T, self.kernel, self.zeta)
            for c in range(6):
                g = strain[mine, c, :]
                gx = g @ x.T  # (g_i · x_j)
                out[c] += np.sum(k1 * (g @ g.T) + k2 * gx * gx.T)
        return self.delta**2 * out

    def prior_force_variance(self, batch: DescriptorBatch) -> NDArray[np.float64]:
        """Prior variance of each force component (eV²/Å²), exactly, pair by pair.

        Over ``batch.atom_count`` atoms; an atom's value is complete only if the
        batch holds every row whose environment contains it.
        """
        d2 = self.delta**2
        values, numbers = batch.values, batch.numbers
        n_atoms = batch.atom_count
        prior = np.zeros(3 * n_atoms)
        order = np.argsort(batch.position_atoms, kind="stable")
        atoms_sorted = batch.position_atoms[order]
        bounds = np.searchsorted(atoms_sorted, np.arange(n_atoms + 1))
        for j in np.unique(atoms_sorted):  # atoms with rows in this batch
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
