"""Per-element offsets of the Δ-model: least squares anchored at the isolated atoms.

The Δ between a reference and the baseline is mostly a sum of per-element
constants (hundreds of eV per atom between a DFT and a tight-binding total
energy); the GP learns what is left. Plain least squares on the training energies
determines only the combinations of elements that the training compositions
span: fitted on water clusters and ethanol (two independent compositions for
three elements), offsets came out at H −649.6, C +317.9, O −638.4 eV, and CH4
was then predicted 1295 eV off with an uncertainty of 0.5 eV.

Here the offsets are a Bayesian linear regression:

- prior: μ_Z ~ N(a_Z, τ²), with a_Z the Δ of the isolated atom Z in its ground
  state (single-atom structures in the training data, e.g. the shipped
  ``data/labelled/isolated_atoms.extxyz``) and τ = ``width`` (eV). Elements
  without an isolated-atom label get a_Z = 0 and τ = :data:`UNANCHORED_WIDTH`:
  uninformative, and said so by the uncertainty;
- likelihood: E_i ~ N(n_i·μ, N_i w²) for a structure of N_i atoms with element
  counts n_i, with w the RMS residual per atom of the unanchored fit (the
  part the GP has to learn; at least :data:`MIN_RESIDUAL_PER_ATOM`).

Directions that the training compositions span are set by the data as before;
the rest fall back to the isolated atoms. The posterior covariance of μ goes into
the energy uncertainty (n·C·n), and a composition outside the span of the
training compositions is reported by :meth:`Offsets.outside_span`, so that the
model can warn.

Measured on the shipped data (revPBE0/def2-TZVP − dispersion-free GFN2-xTB − D3):
least-squares offsets minus the isolated-atom Δ are H +0.46, C +2.5, N +3.6,
O +3.7 eV (the baseline's atomisation energies differ from the reference's by
that much), hence the default width of 5 eV.

Data flow: structures → **offsets** → model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from ase import Atoms
from ase.data import chemical_symbols
from numpy.typing import NDArray

from deltaml.errors import ParameterError

__all__ = [
    "DEFAULT_WIDTH",
    "MIN_RESIDUAL_PER_ATOM",
    "UNANCHORED_WIDTH",
    "Offsets",
    "fit_offsets",
    "fixed_offsets",
    "split_isolated_atoms",
]

#: Prior std of an offset around its isolated-atom Δ (eV); see the module notes.
DEFAULT_WIDTH = 5.0
#: Prior std of an offset of an element without an isolated-atom label (eV).
UNANCHORED_WIDTH = 1.0e3
#: Floor of the per-atom residual scale w of the likelihood (eV).
MIN_RESIDUAL_PER_ATOM = 0.01
#: Per-atom gap (in prior widths) between training energies and isolated atoms refused.
ANCHOR_TOLERANCE = 4.0
#: Relative size of a composition's component outside the training span that counts.
SPAN_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Offsets:
    """Fitted per-element offsets with their posterior covariance.

    Attributes
    ----------
    species : tuple of int
        Atomic numbers, in the order of the arrays.
    mean : ndarray of shape (n_species,)
        Offsets μ (eV per atom).
    covariance : ndarray of shape (n_species, n_species)
        Posterior covariance of μ (eV²); zeros for offsets given by the user.
    span : ndarray of shape (rank, n_species)
        Orthonormal rows spanning the training compositions.
    anchored : tuple of int
        Elements whose prior is an isolated-atom Δ.
    """

    species: tuple[int, ...]
    mean: NDArray[np.float64]
    covariance: NDArray[np.float64]
    span: NDArray[np.float64]
    anchored: tuple[int, ...] = ()

    def as_dict(self) -> dict[int, float]:
        """``{Z: offset in eV}``."""
        return {z: float(m) for z, m in zip(self.species, self.mean, strict=True)}

    def energy(self, counts: NDArray[np.float64]) -> NDArray[np.float64]:
        """Offset energy (eV) of structures given their element counts (n × n_species)."""
        return np.asarray(counts) @ self.mean

    def covariance_of(
        self, counts: NDArray[np.float64], other: NDArray[np.float64] | None = None
    ) -> NDArray[np.float64]:
        """Covariance (eV²) of the offset energies of two sets of compositions."""
        other = counts if other is None else other
        return np.asarray(counts) @ self.covariance @ np.asarray(other).T

    def outside_span(self, counts: NDArray[np.float64]) -> NDArray[np.bool_]:
        """Whether each composition lies outside the span of the training compositions."""
        counts = np.atleast_2d(np.asarray(counts, dtype=float))
        residual = counts - (counts @ self.span.T) @ self.span
        norms = np.linalg.norm(counts, axis=1)
        return np.linalg.norm(residual, axis=1) > SPAN_TOLERANCE * np.maximum(norms, 1.0)


def split_isolated_atoms(frames: Sequence[Atoms]) -> tuple[dict[int, float], list[Atoms]]:
    """Separate isolated-atom labels (one atom, no periodicity) from the rest.

    Returns
    -------
    anchors : dict of int to float
        ``{Z: Δ energy of the isolated atom (eV)}``.
    rest : list of ase.Atoms
        The other structures, in order.

    Raises
    ------
    ParameterError
        Two isolated-atom labels of one element that disagree (e.g. two spin
        states): the ground state must be given once.
    """
    anchors: dict[int, float] = {}
    rest = []
    for atoms in frames:
        if len(atoms) == 1 and not atoms.pbc.any():
            z = int(atoms.numbers[0])
            energy = float(atoms.calc.results["energy"])
            if z in anchors and abs(anchors[z] - energy) > 1e-6:
                raise ParameterError(
                    f"two isolated-atom labels of {chemical_symbols[z]} differ by "
                    f"{abs(anchors[z] - energy):.4f} eV: give the ground state once"
                )
            anchors[z] = energy
        else:
            rest.append(atoms)
    return anchors, rest


def fit_offsets(
    counts: NDArray[np.float64],
    energies: NDArray[np.float64],
    species: Sequence[int],
    anchors: dict[int, float] | None = None,
    width: float = DEFAULT_WIDTH,
) -> Offsets:
    """Offsets by least squares regularised towards the isolated atoms.

    Parameters
    ----------
    counts : ndarray of shape (n_frames, n_species)
        Element counts of the training structures.
    energies : ndarray of shape (n_frames,)
        Their Δ energies (eV).
    species : sequence of int
        Atomic numbers of the columns of ``counts``.
    anchors : dict of int to float, optional
        Isolated-atom Δ per element (eV), the prior means.
    width : float, default=:data:`DEFAULT_WIDTH`
        Prior std of an anchored offset (eV).

    Returns
    -------
    Offsets
    """
    if not (np.isfinite(width) and width > 0):
        raise ParameterError(f"offset_prior_width must be positive (eV), got {width}")
    anchors = anchors or {}
    counts = np.asarray(counts, dtype=float)
    energies = np.asarray(energies, dtype=float)
    n_atoms = counts.sum(axis=1)
    _check_anchors(counts, energies, species, anchors, width)
    prior_mean = np.array([anchors.get(int(z), 0.0) for z in species])
    prior_std = np.array([width if int(z) in anchors else UNANCHORED_WIDTH for z in species])
    # w: the per-atom scale of what the offsets leave to the GP, from a nearly
    # unregularised fit (the tiny ridge only fixes undetermined directions).
    loose = _solve(counts, energies, np.ones(len(n_atoms)), prior_mean, prior_std * 1e6)[0]
    residual = energies - counts @ loose
    w = max(float(np.sqrt(np.mean(residual**2 / n_atoms))), MIN_RESIDUAL_PER_ATOM)
    mean, covariance = _solve(counts, energies, w * np.sqrt(n_atoms), prior_mean, prior_std)
    return Offsets(
        species=tuple(int(z) for z in species),
        mean=mean,
        covariance=covariance,
        span=_span(counts),
        anchored=tuple(int(z) for z in species if int(z) in anchors),
    )


def _check_anchors(
    counts: NDArray, energies: NDArray, species: Sequence[int], anchors: dict[int, float],
    width: float,
) -> None:  # fmt: skip
    """Refuse isolated-atom labels that cannot belong with the training energies.

    For structures made only of anchored elements, the Δ per atom beyond the
    isolated atoms' is an atomisation-energy difference: a few eV at most. Far
    more means other units, another method or another reference state.
    """
    index = [k for k, z in enumerate(species) if int(z) in anchors]
    if not index:
        return
    covered = counts[:, [k for k in range(len(species)) if k not in index]].sum(axis=1) == 0
    if not covered.any():
        return
    prior = np.array([anchors[int(species[k])] for k in index])
    per_atom = (energies[covered] - counts[covered][:, index] @ prior) / counts[covered].sum(1)
    worst = float(np.median(np.abs(per_atom)))
    if worst > ANCHOR_TOLERANCE * width:
        raise ParameterError(
            f"isolated-atom labels differ from the training energies by {worst:.4g} eV per "
            f"atom (median over {int(covered.sum())} structures; atomisation energies differ "
            f"by a few eV at most): other units, another method, or another state of the atoms"
        )


def fixed_offsets(values: dict[int, float], species: Sequence[int]) -> Offsets:
    """Offsets given by the user: no uncertainty, every composition inside the span."""
    n = len(species)
    return Offsets(
        species=tuple(int(z) for z in species),
        mean=np.array([float(values[int(z)]) for z in species]),
        covariance=np.zeros((n, n)),
        span=np.eye(n),
    )


def _solve(
    counts: NDArray, energies: NDArray, noise: NDArray, prior_mean: NDArray, prior_std: NDArray
) -> tuple[NDArray, NDArray]:
    """Posterior mean and covariance of μ as one whitened least-squares problem."""
    design = np.vstack([counts / noise[:, None], np.diag(1.0 / prior_std)])
    target = np.concatenate([energies / noise, prior_mean / prior_std])
    _, s, vt = np.linalg.svd(design, full_matrices=False)
    mean = np.linalg.lstsq(design, target, rcond=None)[0]
    covariance = (vt.T / s**2) @ vt
    return mean, (covariance + covariance.T) / 2.0


def _span(counts: NDArray) -> NDArray:
    """Orthonormal rows spanning the rows of ``counts``."""
    _, s, vt = np.linalg.svd(counts, full_matrices=False)
    if s.size == 0 or s[0] == 0:
        return np.zeros((0, counts.shape[1]))
    return vt[s > 1e-10 * s[0]]
