r"""SOAP split by molecule: what an atom sees of its own molecule, and of the others.

The molecular decomposition of the Δ-model (:class:`~deltaml.model.SparseGPR`
with ``decomposition="molecular"``) needs two rows per atom *i* of molecule *M*:

- **intra**: the SOAP power spectrum of *i* in *M* alone (isolated, made whole
  across the cell), normalised. It depends on the geometry of *M* only, so an
  energy built from it cancels exactly in an interaction or lattice energy at
  fixed monomer geometry.
- **inter**: what the other molecules add to the raw power spectrum of *i*.
  With the neighbour density split as :math:`\rho_i = \rho_i^M + \rho_i^{o}`
  (own molecule, others), the power spectrum is quadratic in the density
  expansion :math:`c`:

  .. math::

      p(\rho_i) - p(\rho_i^M) = c^M \otimes c^{o} + c^{o} \otimes c^M + c^{o} \otimes c^{o}.

  The default rows (``rows="pairwise"``) are the cross terms only,
  :math:`c^M \otimes c^o + c^o \otimes c^M`. They are *linear* in the others'
  density, :math:`c^o = \sum_K c^K` over the other molecules *K*, so an energy
  linear in them (the default intermolecular kernel) is exactly a sum over
  pairs of molecules: a crystal's intermolecular correction is the sum of those
  of the dimers cut from it, and it grows with the number of contacts, not with
  its square. The third term (``rows="difference"``, the rows before
  2026-12-01) couples two other molecules: measured in CO2 phase I it is 24
  times its size in the CO2 dimer (the cross terms 9 times, one contact against
  twelve), far outside what dimers and small clusters constrain.
  Either rows are exactly zero when no atom of another molecule is within the
  cut-off, and go to zero smoothly, with zero slope, as they leave it (the
  cut-off function does). They carry the directions of the contacts relative to
  the own molecule, e.g. of a hydrogen bond. The pairwise rows need featomic's
  spherical expansion (:mod:`deltaml.expansion`) for the others' term.

Molecules come from covalent connectivity (:func:`deltaml.crystals.whole_molecules`).

Data flow: structures, descriptors → **intermolecular** → model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from ase import Atoms
from numpy.typing import NDArray

from deltaml.crystals import Molecules, whole_molecules
from deltaml.descriptors import DescriptorBatch, Pullback, SOAPDescriptor, normalise_rows
from deltaml.errors import ParameterError, UnsupportedCapabilityError
from deltaml.expansion import Expansion, expand_frames

__all__ = ["INTER_ROWS", "MolecularBatch", "split_by_molecule"]

#: Intermolecular rows: own ⊗ others cross terms (pairwise additive between
#: molecules), or the whole-structure row minus the own-molecule row.
INTER_ROWS = ("pairwise", "difference")


@dataclass
class MolecularBatch:
    """Descriptor rows of a batch of frames, split by molecule.

    Attributes
    ----------
    intra : DescriptorBatch
        Normalised SOAP rows of every atom within its own molecule.
    inter : DescriptorBatch
        Raw full-structure rows minus raw own-molecule rows (not normalised).
    labels : list of ndarray
        Molecule index of every atom, one array per frame.
    intra_norms : ndarray of shape (n_atoms_total,)
        Norm of each raw own-molecule row (the natural scale of the inter rows).
    """

    intra: DescriptorBatch
    inter: DescriptorBatch
    labels: list[NDArray[np.int64]]
    intra_norms: NDArray[np.float64]


def split_by_molecule(
    soap: SOAPDescriptor,
    frames: Atoms | Sequence[Atoms],
    gradients: Iterable[str] = (),
    *,
    centres: NDArray[np.int64] | None = None,
    molecules: tuple[Molecules, NDArray[np.float64]] | None = None,
    pullback: bool = False,
    rows: str = "pairwise",
) -> MolecularBatch:
    """Intra- and intermolecular rows of every atom, with the requested gradients.

    Parameters
    ----------
    soap : SOAPDescriptor
        The descriptor (both parts use its settings).
    frames : ase.Atoms or sequence of ase.Atoms
        Molecules, clusters or periodic cells.
    gradients : iterable of str, default=()
        ``"positions"`` and/or ``"strain"``. The strain gradients of the intra
        rows follow from their position gradients at the unwrapped positions
        (an isolated molecule deforms with the cell as its atoms move).
    centres : ndarray of int, optional
        Rows of these atoms only (ascending; whole molecules; one structure):
        the rows, and gradients with respect to any atom, that the whole
        structure would give them (:meth:`SOAPDescriptor.compute`). A large
        structure is done in such pieces so that memory follows the piece.
    molecules : (Molecules, ndarray), optional
        :func:`~deltaml.crystals.whole_molecules` of the (one) structure, when
        known already (each piece would otherwise find them again).
    pullback : bool, default=False
        Gradients as :attr:`DescriptorBatch.pullback` through the spherical
        expansion (:mod:`deltaml.expansion`; featomic) instead of arrays: the
        cheap way to forces and stress, not to their uncertainty.
    rows : {"pairwise", "difference"}, default="pairwise"
        The intermolecular rows (:data:`INTER_ROWS`, see the module notes).

    Returns
    -------
    MolecularBatch

    Raises
    ------
    TopologyError
        A molecule bonded to its own periodic image.
    ParameterError
        ``centres`` that cut a molecule, or unknown ``rows``.
    UnsupportedCapabilityError
        Pairwise rows of a structure with contacts with a descriptor backend
        other than featomic.
    """
    if rows not in INTER_ROWS:
        raise ParameterError(f"rows must be one of {INTER_ROWS}, got {rows!r}")
    frames = [frames] if isinstance(frames, Atoms) else list(frames)
    gradients = tuple(dict.fromkeys((gradients,) if isinstance(gradients, str) else gradients))
    if (centres is not None or molecules is not None) and len(frames) != 1:
        raise ParameterError("centres and molecules need exactly one structure")
    found_all = [molecules] if molecules is not None else [whole_molecules(a) for a in frames]
    if pullback:
        return _split_with_pullback(soap, frames, gradients, centres, found_all, rows)
    if centres is None and all(
        not a.pbc.any() and len(f[0].formulas) == 1 for a, f in zip(frames, found_all, strict=True)
    ):
        # Isolated molecules: the own-molecule rows are the full rows and the
        # intermolecular part is exactly zero; one SOAP evaluation, not two.
        return _single_molecules(soap, frames, gradients, found_all)
    if rows == "pairwise" and soap.backend != "featomic":
        raise UnsupportedCapabilityError(
            f"pairwise intermolecular rows need the featomic SOAP backend, not {soap.backend!r}"
        )
    pieces, owners, labels, unwrapped = _own_molecules(frames, found_all, centres)
    own_gradients = ("positions",) if gradients else ()
    if centres is None and "strain" not in gradients and soap.backend == "featomic":
        # One SOAP call for the structures and their molecules: featomic's fixed
        # cost per call (~2 ms) is most of the cost on small systems.
        both = soap.compute(frames + _exploded(pieces, soap.cutoff), gradients, normalise=False)
        full, own = both.split_frames(len(frames))
    else:
        full = soap.compute(frames, gradients, normalise=False, centres=centres)
        if soap.backend == "featomic":
            pieces = _exploded(pieces, soap.cutoff)
        own = soap.compute(pieces, own_gradients, normalise=False)
    n_atoms = full.atom_count  # what gradient atom indices run over
    n_rows = len(full.values)
    row_of = np.arange(n_atoms)
    if centres is not None:
        row_of = np.full(n_atoms, -1, dtype=np.int64)
        row_of[centres] = np.arange(n_rows)
    owner = np.concatenate(owners)  # atom index of each own row
    # Rows of ``own`` are molecule by molecule; put them back in row order.
    own_values = np.empty_like(own.values)
    own_values[row_of[owner]] = own.values
    shared = {"numbers": full.numbers, "offsets": full.offsets, "n_atoms": full.n_atoms}
    intra = DescriptorBatch(values=own_values, **shared)
    inter = DescriptorBatch(values=full.values - own_values, **shared)
    if gradients:
        # The own rows' position pairs, sorted by row (the strain needs them too).
        pair_rows, moved = row_of[owner[own.position_rows]], owner[own.position_atoms]
        order = np.lexsort((moved, pair_rows))
        own_rows, own_atoms = pair_rows[order], moved[order]
        own_gradients_sorted = own.position_gradients[order]
    if "positions" in gradients:
        intra.position_rows, intra.position_atoms = own_rows, own_atoms
        intra.position_gradients = own_gradients_sorted
        inter.position_rows, inter.position_atoms, inter.position_gradients = _difference_pairs(
            full, intra, n_atoms
        )
    if "strain" in gradients:
        # r -> r @ (I + eps): d x_i / d eps[a, c] = sum_j r_j[a] d x_i / d r_j[c].
        # Pairs are sorted by row and every row has its self pair: sum by segments.
        contribution = np.einsum("pa,pcf->pacf", unwrapped[own_atoms], own_gradients_sorted)
        starts = np.searchsorted(own_rows, np.arange(n_rows))
        own_strain = np.add.reduceat(contribution, starts, axis=0)
        intra.strain_gradients = own_strain
        inter.strain_gradients = full.strain_gradients - own_strain
    if rows == "pairwise":
        _remove_others_square(soap, frames, pieces, owner, row_of[owner], inter, gradients, centres)
    norms = np.linalg.norm(intra.values, axis=1)
    normalise_rows(intra)  # after the raw rows were used for ``inter``
    return MolecularBatch(intra=intra, inter=inter, labels=labels, intra_norms=norms)


def _others_expansion(
    expansion: Expansion,
    n_full: int,
    own_rows: NDArray[np.int64],
    owner: NDArray[np.int64],
    n_frame_atoms: int,
) -> Expansion:
    r"""The expansion :math:`c^o = c - c^M` of the other molecules' density around each atom.

    ``expansion`` holds the structures' rows (the first ``n_full``) and then the
    molecules' rows (the atom of the structure's row ``own_rows[k]``, whose
    atom is ``owner[k]``); the result's gradients are the difference of theirs,
    with the molecules' atoms put back onto the structures' (``n_frame_atoms``).
    """
    c = expansion.coefficients
    others = c[:n_full].copy()
    others[own_rows] -= c[n_full:]
    row_map = np.concatenate([np.arange(n_full), own_rows])
    sign = np.where(np.arange(len(c)) < n_full, 1.0, -1.0)
    atom_map = np.concatenate([np.arange(n_frame_atoms), owner])
    positions = [
        (ang, a, row_map[r], atom_map[atoms], sign[r][:, None, None, None] * g)
        for ang, a, r, atoms, g in expansion.positions
    ]
    strain = [
        (ang, a, row_map[r], sign[r][:, None, None, None, None] * g)
        for ang, a, r, g in expansion.strain
    ]
    return Expansion(others, n_frame_atoms, expansion.l_max, positions, strain)


def _remove_others_square(
    soap: SOAPDescriptor,
    frames: list[Atoms],
    pieces: list[Atoms],
    owner: NDArray[np.int64],
    own_rows: NDArray[np.int64],
    inter: DescriptorBatch,
    gradients: tuple[str, ...],
    centres: NDArray[np.int64] | None,
) -> None:
    """Subtract the others ⊗ others term from ``inter`` (full − own), with its gradients."""
    n_full = len(inter.values)
    _, expansion = expand_frames(
        soap, frames + _exploded(pieces, soap.cutoff), gradients, centres=centres
    )
    n_frame_atoms = sum(len(a) for a in frames)
    others = _others_expansion(expansion, n_full, own_rows, owner, n_frame_atoms)
    inter.values = inter.values - others.power_spectrum()
    if "positions" in gradients:
        square = DescriptorBatch(values=inter.values, numbers=inter.numbers, offsets=inter.offsets)
        (
            square.position_rows,
            square.position_atoms,
            square.position_gradients,
        ) = others.spectrum_position_gradients()
        (
            inter.position_rows,
            inter.position_atoms,
            inter.position_gradients,
        ) = _difference_pairs(inter, square, n_frame_atoms)
    if "strain" in gradients:
        inter.strain_gradients = inter.strain_gradients - others.spectrum_strain_gradients()


def _split_with_pullback(
    soap: SOAPDescriptor,
    frames: list[Atoms],
    gradients: tuple[str, ...],
    centres: NDArray[np.int64] | None,
    found_all: list,
    rows: str,
) -> MolecularBatch:
    """:func:`split_by_molecule` with pullbacks: one expansion of structures and molecules.

    With pairwise rows the engine's weights get ``n_full`` more rows: the
    derivative with respect to the others' square term, pulled back through
    :math:`c^o = c - c^M` onto the same expansion (one backward pass).
    """
    pieces, owners, labels, _ = _own_molecules(frames, found_all, centres)
    # Isolated molecules are their own pieces: no need to expand them twice. (Not a
    # molecule in a cell: it sees its own images.)
    alone = (
        centres is None
        and len(pieces) == len(frames)
        and all(not a.pbc.any() and len(p) == len(a) for p, a in zip(pieces, frames, strict=True))
    )
    values, expansion = expand_frames(
        soap,
        frames if alone else frames + _exploded(pieces, soap.cutoff),
        gradients,
        centres=centres,
    )
    n_frame_atoms = sum(len(a) for a in frames)
    owner = np.concatenate(owners)  # atom of each own row, molecule by molecule
    n_full = len(values) if alone else len(values) - len(owner)
    row_of = np.arange(n_frame_atoms)
    if centres is not None:
        row_of = np.full(n_frame_atoms, -1, dtype=np.int64)
        row_of[centres] = np.arange(n_full)
    own_rows = row_of[owner]
    full_values = values[:n_full]
    own_values = full_values.copy() if alone else np.empty_like(full_values)
    if not alone:
        own_values[own_rows] = values[n_full:]
    inter_values = full_values - own_values if not alone else np.zeros_like(full_values)
    n_engine = len(values)
    backward = expansion.backward
    square = not alone and rows == "pairwise"
    if square:
        others = _others_expansion(expansion, n_full, own_rows, owner, n_frame_atoms)
        inter_values -= others.power_spectrum()

        def backward(w: NDArray, forces: bool, strain: bool) -> tuple:
            g = expansion.coefficient_weights(w[:n_engine])
            g_square = others.coefficient_weights(w[n_engine:])  # dE/dc^o
            g[:n_full] += g_square
            g[n_full:] -= g_square[own_rows]
            return expansion.chain(g, forces, strain)

    n_weights = n_engine + (n_full if square else 0)

    def finish(gradient: NDArray) -> NDArray:
        if alone:
            return gradient
        # The molecules' atoms are copies of the structures' atoms.
        moved = gradient[:n_frame_atoms].copy()
        np.add.at(moved, owner, gradient[n_frame_atoms:])
        return moved

    def own_weights(w: NDArray) -> NDArray:
        weights = np.zeros((n_weights, values.shape[1]))
        if alone:
            weights[:] = w
        else:
            weights[n_full:n_engine] = w[own_rows]
        return weights

    def inter_weights(w: NDArray) -> NDArray:
        weights = np.zeros((n_weights, values.shape[1]))
        if not alone:  # else the intermolecular rows are exactly zero
            weights[:n_full] = w
            weights[n_full:n_engine] = -w[own_rows]
        if square:
            weights[n_engine:] = -w
        return weights

    numbers = np.concatenate([a.numbers for a in frames]).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum([len(a) for a in frames])]).astype(np.int64)
    shared = {
        "numbers": numbers if centres is None else numbers[centres],
        "offsets": offsets if centres is None else np.array([0, n_full], dtype=np.int64),
        "n_atoms": None if centres is None else n_frame_atoms,
    }
    intra = DescriptorBatch(
        values=own_values, pullback=Pullback(backward, own_weights, finish), **shared
    )
    inter = DescriptorBatch(
        values=inter_values, pullback=Pullback(backward, inter_weights, finish), **shared
    )
    norms = np.linalg.norm(intra.values, axis=1)
    normalise_rows(intra)
    return MolecularBatch(intra=intra, inter=inter, labels=labels, intra_norms=norms)


#: From this many molecules, their own-molecule rows come from one structure of
#: the molecules set far apart (:func:`_exploded`) instead of one structure each.
EXPLODE_MOLECULES = 9


def _exploded(pieces: list[Atoms], cutoff: float) -> list[Atoms]:
    """The molecules as one structure, on a grid far enough apart that none sees another.

    featomic's cost has a part per structure (44 ms for 33 water molecules as 33
    structures, 10 ms as one, 2026-12-01): one structure of molecules further
    apart than the cut-off gives each atom the rows and gradients it has alone
    (SOAP is invariant under translation; so is the strain derivative of an
    isolated molecule, Σ_j dx_i/dr_j being zero), but to round-off only: a
    translated molecule's rows differ in the last bits. Below
    :data:`EXPLODE_MOLECULES` molecules they stay where they are, so that in
    dimers and small clusters the intermolecular rows of atoms without contacts
    are exactly zero and an interaction energy gets exactly nothing from the
    intramolecular part.
    """
    if len(pieces) < EXPLODE_MOLECULES:
        return pieces
    extent = max(float(np.ptp(p.positions, axis=0).max()) if len(p) > 1 else 0.0 for p in pieces)
    spacing = extent + cutoff + 1.0
    side = int(np.ceil(len(pieces) ** (1.0 / 3.0)))
    grid = spacing * np.array(np.unravel_index(np.arange(len(pieces)), (side, side, side))).T
    positions = np.concatenate(
        [
            p.positions - p.positions.mean(axis=0) + corner
            for p, corner in zip(pieces, grid, strict=True)
        ]
    )
    return [Atoms(numbers=np.concatenate([p.numbers for p in pieces]), positions=positions)]


def _own_molecules(
    frames: list[Atoms], found_all: list, centres: NDArray[np.int64] | None
) -> tuple[list[Atoms], list[NDArray[np.int64]], list[NDArray[np.int64]], NDArray[np.float64]]:
    """Each molecule alone (whole), the atoms it owns, labels and unwrapped positions.

    Returns
    -------
    pieces : list of ase.Atoms
        Molecules in frame order, then molecule order (those of ``centres`` only).
    owners : list of ndarray
        Global atom index (``centres``: atom index of the one frame) of each
        piece's atoms.
    labels : list of ndarray
        Molecule index of every atom, one array per frame.
    unwrapped : ndarray of shape (n_atoms_total, 3)
        Positions with every molecule whole (Å).
    """
    pieces, owners, labels, unwrapped = [], [], [], []
    start = 0
    for atoms, (found, positions) in zip(frames, found_all, strict=True):
        unwrapped.append(positions)
        labels.append(found.labels)
        wanted = range(len(found.formulas))
        if centres is not None:
            wanted = np.unique(found.labels[centres])
            if np.count_nonzero(np.isin(found.labels, wanted)) != len(centres):
                raise ParameterError("centres must be whole molecules")
        for m in wanted:
            index = np.flatnonzero(found.labels == m)
            pieces.append(Atoms(numbers=atoms.numbers[index], positions=positions[index]))
            owners.append(start + index)
        start += len(atoms)
    return pieces, owners, labels, np.concatenate(unwrapped)


def _single_molecules(
    soap: SOAPDescriptor,
    frames: list[Atoms],
    gradients: tuple[str, ...],
    found_all: list,
) -> MolecularBatch:
    """:func:`split_by_molecule` of structures that are one isolated molecule each."""
    own = soap.compute(frames, gradients, normalise=False)
    width = own.values.shape[1]
    no_pairs = np.zeros(0, dtype=np.int64)
    inter = DescriptorBatch(
        values=np.zeros_like(own.values),
        numbers=own.numbers,
        offsets=own.offsets,
        n_atoms=own.n_atoms,
    )
    if "positions" in gradients:
        inter.position_rows, inter.position_atoms = no_pairs, no_pairs.copy()
        inter.position_gradients = np.zeros((0, 3, width))
    norms = np.linalg.norm(own.values, axis=1)
    normalise_rows(own)
    return MolecularBatch(
        intra=own, inter=inter, labels=[f[0].labels for f in found_all], intra_norms=norms
    )


def _difference_pairs(
    full: DescriptorBatch, own: DescriptorBatch, n_atoms: int
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.float64]]:
    """Position gradients of full − own rows, over the union of their (row, atom) pairs.

    The full rows' gradients are reused in place (``full`` must not be used
    afterwards): an atom of the own molecule within the cut-off is within it
    in the whole structure too, so the own pairs are, but for round-off at the
    cut-off, a subset of the full ones, and the difference needs no new array.
    """
    full_keys = full.position_rows * n_atoms + full.position_atoms  # sorted, unique
    own_keys = own.position_rows * n_atoms + own.position_atoms
    at = np.searchsorted(full_keys, own_keys)
    inside = at < len(full_keys)
    if inside.all() and np.array_equal(full_keys[at], own_keys):
        gradients = full.position_gradients
        gradients[at] -= own.position_gradients  # pairs are unique: no repeated index
        return full.position_rows, full.position_atoms, gradients
    keys = np.concatenate(
        [
            full.position_rows * n_atoms + full.position_atoms,
            own.position_rows * n_atoms + own.position_atoms,
        ]
    )
    unique, where = np.unique(keys, return_inverse=True)
    gradients = np.zeros((len(unique), 3, full.values.shape[1]))
    n_full = len(full.position_rows)
    # Pairs are unique within each part, so plain fancy indexing accumulates correctly.
    gradients[where[:n_full]] = full.position_gradients
    gradients[where[n_full:]] -= own.position_gradients
    return unique // n_atoms, unique % n_atoms, gradients
