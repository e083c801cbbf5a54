r"""Sparse kernel terms: one Gaussian process over per-atom descriptor rows.

A term is a sum of atomic energies, each a GP on the atom's descriptor row
:math:`x_i`, over sparse (representative) rows :math:`x_m` of the same element:

.. math::

    E = \sum_i \sum_{m \in Z_i} \alpha_m\, \delta^2 k(x_i, x_m),
    \qquad k = c^\zeta \ \text{(dot)}, \quad e^{\zeta (c - 1)} \ \text{(exp)}
    \quad\text{or}\quad c\, e^{\zeta (\hat c - 1)} \ \text{(local)},

with :math:`c = x_i \cdot x_m` and :math:`\hat c = \hat x_i \cdot \hat x_m` the cosine.
The *local* kernel is meant for unnormalised rows that vanish with what they
describe (the intermolecular rows): its prior variance is :math:`|x|^2`, as the
linear kernel's, and it vanishes with :math:`x`, but two rows of different
directions are decorrelated, so that far from the data the term returns to zero
instead of extrapolating one linear functional of the rows everywhere.

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

__all__ = ["KERNELS", "VOIGT", "KernelTerm", "kernel_values", "local_kernel"]

#: Kernels: functions of c = x·y ("dot", "exp"), and of c and the cosine ("local").
KERNELS = ("dot", "exp", "local")

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
#: Rows shorter than this are taken as zero by the local kernel (no contact).
_ZERO_NORM = 1e-12


def _unit_rows(x: NDArray) -> tuple[NDArray, NDArray]:
    """Norms of rows and the rows normalised (zero rows stay zero)."""
    norms = np.linalg.norm(x, axis=1)
    safe = np.where(norms > _ZERO_NORM, norms, 1.0)
    return norms, np.where((norms > _ZERO_NORM)[:, None], x / safe[:, None], 0.0)


def local_kernel(
    x: NDArray, y: NDArray, zeta: float, linear: float = 0.0
) -> tuple[NDArray, NDArray, NDArray]:
    r"""The local kernel k = c·[w + (1 − w) exp(ζ(ĉ − 1))] of rows ``x`` with ``y``, and dk/dx.

    w = ``linear`` is the share of the plain linear kernel c = x·y (a trend common
    to all contacts); the rest decorrelates contacts of other directions.
    dk/dx_i = A_im y_m + B_im x_i with A = w + (1 − w) e(1 + ζĉ) and
    B = −(1 − w) ζ e ĉ² |y_m| / |x_i| (e = exp(ζ(ĉ − 1))); both are set to zero
    for a zero row (no contact: its gradient is zero too).

    Returns
    -------
    k, A, B : ndarray of shape (len(x), len(y))
    """
    nx, ux = _unit_rows(x)
    ny, uy = _unit_rows(y)
    cosine = ux @ uy.T
    e = (1.0 - linear) * np.exp(zeta * (cosine - 1.0))
    k = (nx[:, None] * ny[None, :]) * cosine * (linear + e)
    a = linear + e * (1.0 + zeta * cosine)
    b = -zeta * e * cosine**2 * ny[None, :] / np.where(nx > _ZERO_NORM, nx, 1.0)[:, None]
    zero = (nx <= _ZERO_NORM)[:, None] | (ny <= _ZERO_NORM)[None, :]
    return np.where(zero, 0.0, k), np.where(zero, 0.0, a), np.where(zero, 0.0, b)


def local_gradient_covariance(x: NDArray, g: NDArray, zeta: float, linear: float = 0.0) -> NDArray:
    r"""g_iᵀ (∂²k(x_i, x_j)/∂x_i∂x_j) g_j of the local kernel, for all pairs i, j.

    With u = x̂_i·x̂_j and e = exp(ζ(u − 1)), the mixed second derivative is
    e(1+ζu) I + ζe(2+ζu) x̂_j ⊗ (x̂_i − u x̂_j) − ζe x̂_i ⊗ [(ζu² + 2u)(x̂_i − u x̂_j) + u² x̂_j]
    (first index along x_i, second along x_j); ζ = 0 gives the linear kernel's I;
    a share w = ``linear`` of the linear kernel adds w I (and scales the rest by
    1 − w). The prior covariance of the derivatives of two atomic energies along g.

    Parameters
    ----------
    x : ndarray of shape (r, F)
        Rows (one element).
    g : ndarray of shape (r, F)
        Derivative of each row along one direction (a position component, a strain).
    """
    _, ux = _unit_rows(x)
    u = ux @ ux.T
    e = (1.0 - linear) * np.exp(zeta * (u - 1.0))
    p = g @ ux.T  # p[i, j] = g_i · x̂_j
    d = np.diag(p)  # g_i · x̂_i
    across = p.T - u * d[None, :]  # (x̂_i − u x̂_j) · g_j
    out = (linear + e * (1.0 + zeta * u)) * (g @ g.T)
    out += zeta * e * (2.0 + zeta * u) * p * across
    out -= zeta * e * d[:, None] * ((zeta * u**2 + 2.0 * u) * across + u**2 * d[None, :])
    zero = np.linalg.norm(x, axis=1) <= _ZERO_NORM
    out[zero, :] = 0.0
    out[:, zero] = 0.0
    return out


def _kernel_sum(x: NDArray, y: NDArray, kind: str, zeta: float, linear: float = 0.0) -> float:
    """Σ_ij k(x_i·y_j) in memory linear in the rows (and time, where the kernel allows)."""
    n_features = x.shape[1]
    if kind == "local":
        return float(
            sum(
                np.sum(local_kernel(x[start : start + BLOCK_ROWS], y, zeta, linear)[0])
                for start in range(0, len(x), BLOCK_ROWS)
            )
        )
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
    linear : float
        Local kernel only: the share of the plain linear kernel (0 … 1).
    """

    name: str
    kernel: str
    zeta: float
    delta: float
    sparse_values: NDArray[np.float64]
    sparse_numbers: NDArray[np.int64]
    linear: float = 0.0

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
        k = self._kernel(self.sparse_values, self.sparse_values)[0]
        return self.delta**2 * np.where(same, k, 0.0)

    def _kernel(self, x: NDArray, y: NDArray) -> tuple[NDArray, NDArray, NDArray | None]:
        """k(x_i, y_m) and its derivative: (k, k'(c), None) for kernels of c = x·y,
        (k, A, B) with dk/dx_i = A y_m + B x_i for the local kernel."""
        if self.kernel == "local":
            return local_kernel(x, y, self.zeta, self.linear)
        k, dk, _ = kernel_values(x @ y.T, self.kernel, self.zeta)
        return k, dk, None

    def atom_rows(self, batch: DescriptorBatch) -> NDArray[np.float64]:
        """δ² k(x_i, x_m) of every atom i with every sparse point m."""
        out = np.zeros((len(batch.values), self.size))
        for z, cols in self.columns().items():
            mine = batch.numbers == z
            k = self._kernel(batch.values[mine], self.sparse_values[cols])[0]
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
            k, dk, across = self._kernel(batch.values[rows], sparse)
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
                mine = local[batch.position_rows[pairs]]
                proj *= dk[mine][:, None, :]
                if across is not None:  # the local kernel's B x_i part
                    along = np.einsum("paf,pf->pa", grad, batch.values[rows][mine])
                    proj += along[:, :, None] * across[mine][:, None, :]
                proj *= d2
                target = (3 * batch.position_atoms[pairs][:, None] + np.arange(3)).ravel()
                gather = scipy.sparse.csr_matrix(
                    (np.ones(len(target)), (target, np.arange(len(target)))),
                    shape=(3 * n_atoms, len(target)),
                )
                out["forces"][:, cols] = -(gather @ proj.reshape(len(target), len(cols)))
            if virial:
                strain = batch.strain_gradients[rows][:, VOIGT[0], VOIGT[1], :]  # (r, 6, F)
                proj = (strain.reshape(-1, strain.shape[-1]) @ sparse.T).reshape(len(rows), 6, -1)
                proj *= dk[:, None, :]
                if across is not None:
                    along = np.einsum("rcf,rf->rc", strain, batch.values[rows])
                    proj += along[:, :, None] * across[:, None, :]
                proj *= d2
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
            k, dk, across = self._kernel(batch.values[rows], sparse)
            energy += d2 * float(np.sum(k @ a))
            if weights:
                out[rows] = d2 * (dk * a) @ sparse
                if across is not None:
                    out[rows] += d2 * (across @ a)[:, None] * batch.values[rows]
            if atom_rows:
                rows_out[rows if isinstance(cols, slice) else rows[:, None], cols] = d2 * k
        return energy, out, rows_out

    def prior_atom_variance(self, batch: DescriptorBatch) -> NDArray[np.float64]:
        """Prior variance of each atomic energy, δ² k(x_i·x_i) (eV²)."""
        squares = np.einsum("if,if->i", batch.values, batch.values)
        if self.kernel == "local":  # k(x, x) = |x|²
            return self.delta**2 * squares
        k, _, _ = kernel_values(squares, self.kernel, self.zeta)
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
            total += _kernel_sum(x, y, self.kernel, self.zeta, self.linear)
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
            covariances = self._gradient_covariances(values[mine], strain[mine])
            out += [np.sum(cov) for cov in covariances]
        return self.delta**2 * out

    def _gradient_covariances(self, x: NDArray, gradients: NDArray) -> list[NDArray]:
        """g_iᵀ (∂²k(x_i, x_j)/∂x_i∂x_j) g_j of rows ``x`` (r, F), all pairs, for each
        direction of ``gradients`` (r, C, F): C matrices (r, r).

        For kernels of c = x·y: k'(c) g_i·g_j + k''(c)(g_i·x_j)(g_j·x_i); for the
        local kernel: :func:`local_gradient_covariance`.
        """
        directions = range(gradients.shape[1])
        if self.kernel == "local":
            return [
                local_gradient_covariance(x, gradients[:, c, :], self.zeta, self.linear)
                for c in directions
            ]
        _, k1, k2 = kernel_values(x @ x.T, self.kernel, self.zeta)
        out = []
        for c in directions:
            g = gradients[:, c, :]
            gx = g @ x.T  # (g_i · x_j)
            out.append(k1 * (g @ g.T) + k2 * gx * gx.T)
        return out

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
            same = numbers[rows][:, None] == numbers[rows][None, :]
            covariances = self._gradient_covariances(values[rows], batch.position_gradients[pairs])
            for a, cov in enumerate(covariances):
                prior[3 * j + a] = d2 * np.sum(np.where(same, cov, 0.0))
        return prior
