r"""SOAP through its spherical expansion: forces and stress by one backward pass.

The power spectrum of atom *i* is quadratic in its neighbour-density expansion
:math:`c^a_{lmn}(i)` (neighbour species *a*):

.. math::

    p^{ab}_{l n n'}(i) = s_{ab} \frac{(-1)^l}{\sqrt{2l+1}} \sum_m c^a_{lmn}(i)\, c^b_{lmn'}(i),
    \qquad s_{ab} = \sqrt 2 \text{ if } a \ne b \text{ else } 1,

exactly featomic's ``SoapPowerSpectrum`` (pairs ``a <= b``). An energy
:math:`E = \sum_i f_i(p(i))` then has

.. math::

    \frac{\partial E}{\partial r_j} = \sum_{i,a,lmn} G^a_{lmn}(i)\,
    \frac{\partial c^a_{lmn}(i)}{\partial r_j},
    \qquad G = \frac{\partial E}{\partial c},

so forces and stress need the gradients of the expansion (about 150 numbers per
pair of atoms and neighbour species) instead of those of the power spectrum
(1800 per pair for four elements): on a 99-atom water cluster featomic takes
~25 ms for the expansion with gradients against ~180 ms for the power spectrum
with gradients. The energy uncertainty needs the rows only. (The force
uncertainty needs the full row gradients and keeps
:meth:`SOAPDescriptor.compute`.)

Data flow: structures → descriptors → **expansion** → model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
from ase import Atoms
from numpy.typing import NDArray

from deltaml.descriptors import DescriptorBatch, Pullback, SOAPDescriptor, normalise_rows
from deltaml.errors import EngineError, UnsupportedCapabilityError

__all__ = ["Expansion", "expand", "expand_frames"]


@dataclass
class Expansion:
    """Spherical expansion of a batch of structures, for :meth:`backward`.

    Attributes
    ----------
    coefficients : ndarray of shape (n_rows, n_species, (l_max + 1)², n_max)
        :math:`c^a_{lmn}(i)`, ``(l, m)`` packed as ``l² + l + m``.
    n_atoms : int
        Atoms the position gradients run over.
    positions : list of tuple
        Per featomic block with position gradients: ``(l, species index, rows,
        atoms, gradients of shape (g, 3, 2l + 1, n_max))``.
    strain : list of tuple
        Per block with strain gradients: ``(l, species index, rows, gradients
        of shape (r, 3, 3, 2l + 1, n_max))``, for ``r -> r @ (I + eps)``.
    """

    coefficients: NDArray[np.float64]
    n_atoms: int
    l_max: int
    positions: list[tuple[Any, ...]] = field(default_factory=list)
    strain: list[tuple[Any, ...]] = field(default_factory=list)

    def present(self) -> NDArray[np.int64]:
        """Indices of the neighbour species that occur (the others' terms are zero)."""
        return np.flatnonzero(np.any(self.coefficients != 0.0, axis=(0, 2, 3)))

    @cached_property
    def _pairs(self) -> tuple[NDArray, NDArray, NDArray, NDArray]:
        """Present species, their pairs ``(a <= b)`` and those pairs' column blocks.

        Species absent from every environment have zero coefficients: their
        products are left out of both passes. ``here[a], here[b]`` come in the
        order of the stored pairs, whose blocks are ``pairs``.
        """
        first, second = np.triu_indices(self.coefficients.shape[1])
        here = self.present()
        a, b = np.triu_indices(len(here))
        pairs = np.flatnonzero(np.isin(first, here) & np.isin(second, here))
        return here, a, b, pairs

    def power_spectrum(self) -> NDArray[np.float64]:
        """Raw power-spectrum rows (featomic's columns of :class:`SOAPDescriptor`)."""
        c = self.coefficients
        n_rows, n_species, _, n_max = c.shape
        n_pairs = n_species * (n_species + 1) // 2
        out = np.zeros((n_rows, n_pairs, self.l_max + 1, n_max, n_max))
        here, a, b, pairs = self._pairs
        cs = c[:, here]
        for ang in range(self.l_max + 1):
            cl = cs[:, :, _lm(ang)]
            full = np.einsum("iamn,ibmv->iabnv", cl, cl)
            factor = _factors(ang, here[a], here[b])[:, None, None]
            out[:, pairs, ang] = full[:, a, b] * factor
        return out.reshape(n_rows, -1)

    def spectrum_position_gradients(
        self,
    ) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.float64]]:
        """Position gradients of the raw power-spectrum rows, as arrays.

        Returns
        -------
        rows, atoms : ndarray of int
            The (row, atom) pairs with a gradient, sorted by row, then atom, unique.
        gradients : ndarray of shape (n_pairs, 3, n_features)
            d p(row) / d r(atom) (Å⁻¹ times the rows' unit).
        """
        keys = np.unique(
            np.concatenate([rows * self.n_atoms + atoms for _, _, rows, atoms, _ in self.positions])
        )
        rows, atoms = keys // self.n_atoms, keys % self.n_atoms
        shape = self.coefficients.shape
        derivative = np.zeros((len(keys), 3, *shape[1:]))
        for ang, a, block_rows, block_atoms, grad in self.positions:
            where = np.searchsorted(keys, block_rows * self.n_atoms + block_atoms)
            np.add.at(derivative, (where, slice(None), a, _lm(ang)), grad)
        return rows, atoms, self._spectrum_derivative(rows, derivative)

    def spectrum_strain_gradients(self) -> NDArray[np.float64]:
        """Strain gradients of the raw power-spectrum rows, (n_rows, 3, 3, n_features)."""
        n_rows = self.coefficients.shape[0]
        derivative = np.zeros((n_rows, 3, 3, *self.coefficients.shape[1:]))
        for ang, a, rows, grad in self.strain:
            np.add.at(derivative, (rows, slice(None), slice(None), a, _lm(ang)), grad)
        flat = derivative.reshape(n_rows, 9, *self.coefficients.shape[1:])
        out = self._spectrum_derivative(np.arange(n_rows), flat)
        return out.reshape(n_rows, 3, 3, -1)

    def _spectrum_derivative(self, rows: NDArray[np.int64], derivative: NDArray) -> NDArray:
        """d p from d c: ``derivative`` (k, X, species, lm, n) of the coefficients of ``rows``.

        d(c^a_n c^b_v) = dc^a_n c^b_v + c^a_n dc^b_v, summed over m, with
        featomic's factor of each stored pair of neighbour species.
        """
        n_species, n_max = self.coefficients.shape[1], self.coefficients.shape[3]
        n_pairs = n_species * (n_species + 1) // 2
        k, x = derivative.shape[:2]
        out = np.zeros((k, x, n_pairs, self.l_max + 1, n_max, n_max))
        here, a, b, pairs = self._pairs
        cs = self.coefficients[rows][:, here]
        ds = derivative[:, :, here]
        for ang in range(self.l_max + 1):
            cl, dl = cs[:, :, _lm(ang)], ds[:, :, :, _lm(ang)]
            full = np.einsum("kxamn,kbmv->kxabnv", dl, cl)
            full += np.einsum("kamn,kxbmv->kxabnv", cl, dl)
            factor = _factors(ang, here[a], here[b])[:, None, None]
            out[:, :, pairs, ang] = full[:, :, a, b] * factor
        return out.reshape(k, x, -1)

    def backward(
        self, weights: NDArray[np.float64], forces: bool, strain: bool
    ) -> tuple[NDArray[np.float64] | None, NDArray[np.float64] | None]:
        """dE/dr (n_atoms, 3; eV/Å) and dE/dε (3, 3; eV) for dE/dp = ``weights``.

        Parameters
        ----------
        weights : ndarray of shape (n_rows, n_features)
            Derivative of the energy with respect to each raw power-spectrum row.
        forces, strain : bool
            Which derivatives to return (``None`` for the other).
        """
        return self.chain(self.coefficient_weights(weights), forces, strain)

    def chain(
        self, g: NDArray[np.float64], forces: bool, strain: bool
    ) -> tuple[NDArray[np.float64] | None, NDArray[np.float64] | None]:
        """dE/dr and dE/dε from G = dE/dc (``coefficients``' shape) through the gradients."""
        gradient = virial = None
        if forces:
            gradient = np.zeros((self.n_atoms, 3))
            for ang, a, rows, atoms, grad in self.positions:
                part = np.einsum("gxmn,gmn->gx", grad, g[rows, a, _lm(ang)])
                np.add.at(gradient, atoms, part)
        if strain:
            virial = np.zeros((3, 3))
            for ang, a, rows, grad in self.strain:
                virial += np.einsum("sxzmn,smn->xz", grad, g[rows, a, _lm(ang)])
        return gradient, virial

    def coefficient_weights(self, weights: NDArray[np.float64]) -> NDArray[np.float64]:
        """G = dE/dc from dE/dp (the chain rule through the quadratic form)."""
        c = self.coefficients
        n_rows, n_species, _, n_max = c.shape
        n_pairs = n_species * (n_species + 1) // 2
        w = weights.reshape(n_rows, n_pairs, self.l_max + 1, n_max, n_max)
        out = np.zeros_like(c)
        here, a, b, pairs = self._pairs
        cs = c[:, here]
        for ang in range(self.l_max + 1):
            wl = w[:, pairs, ang] * _factors(ang, here[a], here[b])[:, None, None]
            # M[a, b, n, v] = dE/d(c^a_n c^b_v): both orders of every stored pair.
            m = np.zeros((n_rows, len(here), len(here), n_max, n_max))
            m[:, a, b] += wl
            m[:, b, a] += wl.transpose(0, 1, 3, 2)
            cl = cs[:, :, _lm(ang)]
            out[:, here, _lm(ang)] = np.einsum("iabnv,ibmv->iamn", m, cl)
        return out


def _factors(ang: int, first: NDArray, second: NDArray) -> NDArray[np.float64]:
    """featomic's factor of each stored pair of neighbour species at angular order l."""
    return np.where(first == second, 1.0, np.sqrt(2.0)) * (-1.0) ** ang / np.sqrt(2 * ang + 1)


def _lm(ang: int) -> slice:
    """Packed (l, m) columns of angular order l: l² … (l + 1)² − 1."""
    return slice(ang * ang, (ang + 1) ** 2)


def expand(
    soap: SOAPDescriptor,
    frames: Atoms | Sequence[Atoms],
    gradients: Sequence[str] = (),
    *,
    centres: NDArray[np.int64] | None = None,
    normalise: bool = True,
) -> DescriptorBatch:
    """SOAP rows whose gradients come as a pullback (:attr:`DescriptorBatch.pullback`).

    Parameters
    ----------
    soap : SOAPDescriptor
        A featomic descriptor.
    frames : ase.Atoms or sequence of ase.Atoms
        As :meth:`SOAPDescriptor.compute`.
    gradients : sequence of str
        ``"positions"`` and/or ``"strain"``: what the pullback can return.
    centres : ndarray of int, optional
        Rows of these atoms only (one structure), as :meth:`SOAPDescriptor.compute`.
    normalise : bool, default=True
        As :meth:`SOAPDescriptor.compute`.

    Returns
    -------
    DescriptorBatch
        The rows of ``soap.compute(...)``, no gradient arrays, a pullback.
    """
    frames = [frames] if isinstance(frames, Atoms) else list(frames)
    if centres is not None and len(frames) != 1:
        raise UnsupportedCapabilityError("centres: one structure at a time")
    values, expansion = expand_frames(soap, frames, gradients, centres=centres)
    numbers = np.concatenate([atoms.numbers for atoms in frames]).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum([len(a) for a in frames])]).astype(np.int64)
    batch = DescriptorBatch(
        values=values,
        numbers=numbers if centres is None else numbers[centres],
        offsets=offsets if centres is None else np.array([0, len(values)], dtype=np.int64),
        n_atoms=None if centres is None else expansion.n_atoms,
        pullback=Pullback(expansion.backward, lambda w: w),
    )
    return normalise_rows(batch) if normalise else batch


def expand_frames(
    soap: SOAPDescriptor,
    frames: list[Atoms],
    gradients: Sequence[str] = (),
    *,
    centres: NDArray[np.int64] | None = None,
) -> tuple[NDArray[np.float64], Expansion]:
    """Raw power-spectrum rows of several structures in one featomic call, and their expansion.

    Rows are frame by frame, atom by atom; ``centres`` limits those of the
    first frame (the others keep every atom). Atom indices of the expansion's
    gradients run over all atoms of all frames, frame by frame.
    """
    if soap.backend != "featomic":
        raise UnsupportedCapabilityError("the expansion backward pass needs featomic")
    for k, atoms in enumerate(frames):
        soap._check_frame(atoms, k)
    sizes = [len(atoms) for atoms in frames]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    n_atoms = int(offsets[-1])
    wanted = np.ones(n_atoms, dtype=bool)
    selected = None
    if centres is not None:
        from metatensor import Labels

        wanted[: sizes[0]] = False
        wanted[np.asarray(centres, dtype=np.int64)] = True
        system = np.repeat(np.arange(len(frames)), sizes)
        local = np.arange(n_atoms) - offsets[system]
        pairs = np.stack([system[wanted], local[wanted]], axis=1).astype(np.int32)
        selected = Labels(["system", "atom"], pairs)
    row_of = np.full(n_atoms, -1, dtype=np.int64)
    row_of[wanted] = np.arange(np.count_nonzero(wanted))
    systems = [
        atoms if atoms.pbc.all() else Atoms(numbers=atoms.numbers, positions=atoms.positions)
        for atoms in frames
    ]
    try:
        tensor = _expansion_calculator(soap).compute(
            systems, gradients=list(gradients), selected_samples=selected
        )
    except Exception as error:
        raise EngineError(f"featomic failed to compute the spherical expansion: {error}") from error
    species = {z: k for k, z in enumerate(soap.species)}
    size = (soap.l_max + 1) ** 2
    coefficients = np.zeros((np.count_nonzero(wanted), len(species), size, soap.n_max))
    expansion = Expansion(coefficients, n_atoms, soap.l_max)
    names = tensor.keys.names
    for key, block in tensor.items():
        key = dict(zip(names, (int(v) for v in key.values), strict=True))
        samples = block.samples.values
        if len(samples) == 0:
            continue
        ang, a = key["o3_lambda"], species[key["neighbor_type"]]
        rows = row_of[offsets[samples[:, 0]] + samples[:, 1]]
        coefficients[rows, a, _lm(ang)] = block.values
        if "positions" in gradients:
            grad = block.gradient("positions")
            gs = grad.samples.values  # sample, system, atom
            atoms = offsets[gs[:, 1]] + gs[:, 2]
            expansion.positions.append((ang, a, rows[gs[:, 0]], atoms, grad.values))
        if "strain" in gradients:
            grad = block.gradient("strain")
            where = rows[grad.samples.values[:, 0]]
            # values[s, x, z, m, n] = d c / d eps[x, z] for r -> r @ (I + eps); for a
            # molecule (no cell) featomic gives sum_j r_j[x] d c / d r_j[z].
            expansion.strain.append((ang, a, where, grad.values))
    return expansion.power_spectrum(), expansion


def _expansion_calculator(soap: SOAPDescriptor) -> Any:
    """featomic's spherical expansion with the descriptor's settings, built once."""
    calculator = getattr(soap, "_expansion", None)
    if calculator is None:
        import featomic

        calculator = featomic.SphericalExpansion(**soap.featomic_hypers())
        soap._expansion = calculator
    return calculator
