"""Per-atom SOAP descriptors with position and strain gradients.

The learned correction is a function of the environment of each atom. This
module turns structures into one SOAP power-spectrum row per atom, normalised
to unit length, together with the derivatives of those rows with respect to
the atomic positions (for forces) and to a homogeneous strain of the cell (for
stress). Two engines sit behind one interface:

- ``"featomic"`` (default): featomic's ``SoapPowerSpectrum`` with a shifted-cosine
  smooth cut-off, analytical position and strain gradients, molecules and fully
  periodic cells.
- ``"dscribe"``: dscribe's ``SOAP``, position gradients only (no stress).

The feature set is fixed by the species list, not by the structures: every row
has :attr:`SOAPDescriptor.n_features` columns whatever the composition of the
frame, so a frame computed alone gives the same rows as in any batch.

Data flow: structures → **descriptors** → model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

import numpy as np
from ase import Atoms
from ase.data import atomic_numbers, chemical_symbols
from numpy.typing import NDArray

from deltaml.errors import (
    EngineError,
    ParameterError,
    UnsupportedCapabilityError,
    UnsupportedElementError,
)
from deltaml.structures import validate_structure

__all__ = [
    "BACKENDS",
    "CHUNK_ATOMS",
    "GRADIENTS",
    "DescriptorBatch",
    "Pullback",
    "SOAPDescriptor",
    "centre_chunks",
    "normalise_rows",
]

#: Engines behind :class:`SOAPDescriptor`.
BACKENDS = ("featomic", "dscribe")

#: Gradient kinds :meth:`SOAPDescriptor.compute` can return.
GRADIENTS = ("positions", "strain")

#: Closest interatomic distance accepted by :meth:`SOAPDescriptor.compute`, Å. SOAP
#: itself is finite at any distance; this only catches duplicated atoms.
MIN_DISTANCE = 0.1

#: Keys of :meth:`SOAPDescriptor.record`.
_RECORD_KEYS = (
    "backend",
    "backend_version",
    "species",
    "cutoff",
    "smoothing",
    "gaussian_width",
    "n_max",
    "l_max",
    "normalised",
)


@dataclass
class Pullback:
    """dE/d(rows) → (dE/dr, dE/dε) through a backward pass (see :mod:`deltaml.expansion`).

    ``backward(W, forces, strain)`` is linear in ``W``, the derivative of the
    energy with respect to the rows of the engine (e.g. raw power spectra of
    the structures and of their molecules); ``transform`` maps the derivative
    with respect to this batch's rows onto them, ``finish`` maps the engine's
    atoms onto the structure's. Being linear, the pullbacks of several batches
    on one engine can be summed before one backward pass (:meth:`weights`).
    """

    backward: Callable[[NDArray, bool, bool], tuple[Any, Any]]
    transform: Callable[[NDArray], NDArray]
    finish: Callable[[Any], Any] = lambda gradient: gradient

    def __call__(self, w: NDArray, forces: bool, strain: bool) -> tuple[Any, Any]:
        gradient, virial = self.backward(self.transform(w), forces, strain)
        return (None if gradient is None else self.finish(gradient)), virial

    def weights(self, w: NDArray) -> NDArray:
        """``w`` mapped onto the engine's rows (to be summed, then :meth:`apply`)."""
        return self.transform(w)

    def apply(self, weights: NDArray, forces: bool, strain: bool) -> tuple[Any, Any]:
        """The backward pass of summed :meth:`weights`."""
        gradient, virial = self.backward(weights, forces, strain)
        return (None if gradient is None else self.finish(gradient)), virial

    def then(self, before: Callable[[NDArray], NDArray]) -> Pullback:
        """This pullback after ``before`` (the transpose of a change of the rows)."""
        inner = self.transform
        return Pullback(self.backward, lambda w: inner(before(w)), self.finish)


@dataclass
class DescriptorBatch:
    """SOAP rows of a batch of frames, with optional gradients.

    Rows are ordered frame by frame and, within a frame, atom by atom. Atom
    indices in the gradient arrays are global (``offsets[k] + local index``).
    All gradients are those of the normalised rows ``values``.

    Attributes
    ----------
    values : ndarray of shape (n_atoms_total, n_features)
        Descriptor rows, each of unit Euclidean norm (dimensionless).
    numbers : ndarray of shape (n_atoms_total,)
        Atomic number of the centre atom of each row.
    offsets : ndarray of shape (n_frames + 1,)
        Rows of frame ``k`` are ``offsets[k]:offsets[k + 1]``.
    position_rows : ndarray of shape (n_pairs,), or None
        Row ``i`` of each stored position derivative.
    position_atoms : ndarray of shape (n_pairs,), or None
        Global index ``j`` of the atom that is moved. Only pairs within the
        cut-off are stored (the self pair ``j == i`` included); contributions of
        periodic images of ``j`` are summed into ``j``. Pairs are sorted by
        ``(row, atom)`` and unique.
    position_gradients : ndarray of shape (n_pairs, 3, n_features), or None
        ``d values[i] / d r[j, a]``, 1/Å.
    strain_gradients : ndarray of shape (n_atoms_total, 3, 3, n_features), or None
        ``d values[i] / d eps[a, b]`` for the homogeneous deformation
        ``r -> r @ (I + eps)``, ``cell -> cell @ (I + eps)`` (ASE's row-vector
        convention; not symmetrised), dimensionless.
    n_atoms : int or None
        Atoms of the structure that ``position_atoms`` index, when the rows are
        those of some centres only (``compute(..., centres=...)``, one frame);
        ``None``: one row per atom, ``len(values)``.
    pullback : Pullback or None
        Instead of the gradient arrays (:mod:`deltaml.expansion`):
        ``pullback(w, forces, strain) -> (dE/dr or None, dE/dε or None)`` for
        ``w = dE/d values`` (n_rows, n_features), dE/dr of shape
        (``atom_count``, 3) in eV/Å and dE/dε (3, 3) in eV.
    """

    values: NDArray[np.float64]
    numbers: NDArray[np.int64]
    offsets: NDArray[np.int64]
    position_rows: NDArray[np.int64] | None = None
    position_atoms: NDArray[np.int64] | None = None
    position_gradients: NDArray[np.float64] | None = None
    strain_gradients: NDArray[np.float64] | None = None
    n_atoms: int | None = None
    pullback: Pullback | None = None

    @property
    def atom_count(self) -> int:
        """Atoms the gradients run over (``n_atoms``, or one per row)."""
        return len(self.values) if self.n_atoms is None else int(self.n_atoms)

    def frame_slice(self, k: int) -> slice:
        """Rows (and global atom indices) of frame ``k``."""
        return slice(int(self.offsets[k]), int(self.offsets[k + 1]))

    def split_frames(self, k: int) -> tuple[DescriptorBatch, DescriptorBatch]:
        """Two batches: frames ``0 .. k-1`` and frames ``k ..`` (indices renumbered).

        One SOAP call for several sets of structures costs one fixed overhead
        instead of several (about 2 ms per featomic call); this undoes the
        concatenation. Not for batches of some centres only.
        """
        if self.n_atoms is not None:
            raise ParameterError("split_frames: a batch of some centres cannot be split")
        cut = int(self.offsets[k])
        first = DescriptorBatch(
            values=self.values[:cut],
            numbers=self.numbers[:cut],
            offsets=self.offsets[: k + 1].copy(),
        )
        rest = DescriptorBatch(
            values=self.values[cut:],
            numbers=self.numbers[cut:],
            offsets=self.offsets[k:] - cut,
        )
        if self.position_rows is not None:
            # Pairs are sorted by row, and a pair's atom is in its row's frame.
            at = int(np.searchsorted(self.position_rows, cut))
            first.position_rows = self.position_rows[:at]
            first.position_atoms = self.position_atoms[:at]
            first.position_gradients = self.position_gradients[:at]
            rest.position_rows = self.position_rows[at:] - cut
            rest.position_atoms = self.position_atoms[at:] - cut
            rest.position_gradients = self.position_gradients[at:]
        if self.strain_gradients is not None:
            first.strain_gradients = self.strain_gradients[:cut]
            rest.strain_gradients = self.strain_gradients[cut:]
        return first, rest


def _atomic_number(value: Any) -> int:
    if isinstance(value, str):
        z = atomic_numbers.get(value.strip())
        if z is None or z == 0:
            raise ParameterError(f"unknown element symbol {value!r} in species")
        return z
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ParameterError(f"species must be atomic numbers or symbols, got {value!r}")
    if not 1 <= int(value) < len(chemical_symbols):
        raise ParameterError(f"atomic number {value} in species is not an element")
    return int(value)


def _positive(name: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ParameterError(f"{name} must be a number (Å), got {value!r}") from None
    if not np.isfinite(number) or number <= 0:
        raise ParameterError(f"{name} must be a positive finite length (Å), got {value!r}")
    return number


def _integer(name: str, value: Any, lowest: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ParameterError(f"{name} must be an integer, got {value!r}")
    if value < lowest:
        raise ParameterError(f"{name} must be at least {lowest}, got {value}")
    return int(value)


def _element_names(numbers: Iterable[int]) -> str:
    return ", ".join(f"{chemical_symbols[z]} (Z={z})" for z in numbers)


class SOAPDescriptor:
    r"""Per-atom SOAP power spectra, normalised to unit length, with gradients.

    ================ ========== ===== ===============================================
     Keyword          Default    Unit  Description
    ================ ========== ===== ===============================================
     species          (needed)   -     elements covered (atomic numbers or symbols)
     backend          "featomic" -     "featomic" or "dscribe"
     cutoff           5.0        Å     radius of the atomic environment
     smoothing        0.5        Å     width of the smooth cut-off (featomic only)
     gaussian_width   0.3        Å     σ of the Gaussian on each atom in the density
     n_max            6          -     number of radial basis functions
     l_max            4          -     largest angular momentum (inclusive)
    ================ ========== ===== ===============================================

    Each row ``x`` of a structure is divided by its norm; the gradients returned
    are those of ``x / |x|``.

    featomic backend (``SoapPowerSpectrum``): GTO radial basis (featomic's
    ``max_radial = n_max - 1``, inclusive), Gaussian density that includes the
    centre atom, shifted-cosine cut-off that takes the density of a neighbour
    smoothly to zero between ``cutoff - smoothing`` and ``cutoff``. Features are
    split by centre element and by neighbour-element pair ``(a, b)``, ``a <= b``:
    ``n_features = S (S + 1) / 2 · (l_max + 1) · n_max²`` for S species, columns
    in the order (neighbour 1, neighbour 2, l, n1, n2). Analytical gradients for
    positions and strain. Molecules (``pbc`` all False) and cells periodic in
    all three directions are supported; for slabs and wires set ``pbc=True``
    with enough vacuum.

    dscribe backend (``SOAP``, GTO basis): dscribe has no smooth cut-off of its
    own (it truncates Gaussians at ``cutoff`` plus a padding, a jump of about
    1e-4 in the features). This class therefore sets dscribe's ``"poly"``
    radial weighting (Caro 2019) with ``r0 = cutoff, c = 1, m = 1``:
    ``w(r) = 1 + 2 (r/r0)³ - 3 (r/r0)²`` for ``r <= r0``, 0 beyond, which
    weights each neighbour's density and goes to zero with zero slope at the
    cut-off (features are continuous and differentiable there). It acts on the
    whole sphere (``w(r0/2) = 1/2``), so ``smoothing`` is not used. With a
    weighting dscribe has no analytical derivatives: position gradients are
    dscribe's numerical ones (central differences in its C++ extension,
    about 1e-8 from exact), for molecules and periodic cells alike. No strain
    gradients, so no stress. The features differ from featomic's (no split by
    centre element, only ``n <= n'`` for equal species, another orthonormal
    radial basis, prefactors and the weighting): models are not
    interchangeable between backends.

    Parameters
    ----------
    species : iterable of int or str
        Elements the descriptor covers, stored as a sorted tuple of atomic
        numbers (:attr:`species`). Structures with other elements are refused.

    Raises
    ------
    ParameterError
        Unknown backend or element symbol, empty species, non-positive lengths,
        ``smoothing >= cutoff``, ``n_max < 1``, ``l_max < 0``, or settings the
        engine refuses.

    Examples
    --------
    >>> from ase.build import molecule
    >>> soap = SOAPDescriptor(["H", "C", "O"], cutoff=4.0)
    >>> batch = soap.compute(molecule("CH3OH"), gradients=("positions",))
    >>> batch.values.shape == (6, soap.n_features)
    True
    """

    def __init__(
        self,
        species: Iterable[int | str],
        *,
        backend: str = "featomic",
        cutoff: float = 5.0,
        smoothing: float = 0.5,
        gaussian_width: float = 0.3,
        n_max: int = 6,
        l_max: int = 4,
    ) -> None:
        if backend not in BACKENDS:
            raise ParameterError(f"unknown SOAP backend {backend!r}; choose one of {BACKENDS}")
        if isinstance(species, (str, int, np.integer)):
            species = [species]
        self.species: tuple[int, ...] = tuple(sorted({_atomic_number(s) for s in species}))
        if not self.species:
            raise ParameterError("species is empty: give the elements the descriptor covers")
        self.backend = backend
        self.cutoff = _positive("cutoff", cutoff)
        self.smoothing = _positive("smoothing", smoothing)
        self.gaussian_width = _positive("gaussian_width", gaussian_width)
        if self.smoothing >= self.cutoff:
            raise ParameterError(
                f"smoothing ({self.smoothing} Å) must be smaller than cutoff ({self.cutoff} Å)"
            )
        self.n_max = _integer("n_max", n_max, 1)
        self.l_max = _integer("l_max", l_max, 0)
        try:
            if backend == "featomic":
                self._calculator = self._featomic_calculator()
            else:
                self._calculators = {p: self._dscribe_calculator(p) for p in (False, True)}
        except ImportError:
            raise
        except Exception as error:
            raise ParameterError(f"{backend} refuses the SOAP settings {self}: {error}") from None

    def __repr__(self) -> str:
        return (
            f"SOAPDescriptor({list(self.species)}, backend={self.backend!r}, "
            f"cutoff={self.cutoff}, smoothing={self.smoothing}, "
            f"gaussian_width={self.gaussian_width}, n_max={self.n_max}, l_max={self.l_max})"
        )

    # ------------------------------------------------------------------ engines

    def _featomic_calculator(self) -> Any:
        import featomic

        return featomic.SoapPowerSpectrum(**self.featomic_hypers())

    def featomic_hypers(self) -> dict[str, Any]:
        """featomic's settings of this descriptor (those of its power spectrum)."""
        return dict(
            cutoff={
                "radius": self.cutoff,
                "smoothing": {"type": "ShiftedCosine", "width": self.smoothing},
            },
            density={"type": "Gaussian", "width": self.gaussian_width},
            basis={
                "type": "TensorProduct",
                "max_angular": self.l_max,
                "radial": {"type": "Gto", "max_radial": self.n_max - 1},  # inclusive
            },
        )

    def _dscribe_weighting(self) -> dict[str, float | str]:
        return {"function": "poly", "r0": self.cutoff, "c": 1.0, "m": 1.0}

    def _dscribe_calculator(self, periodic: bool) -> Any:
        from dscribe.descriptors import SOAP

        return SOAP(
            species=list(self.species),
            r_cut=self.cutoff,
            n_max=self.n_max,
            l_max=self.l_max,
            sigma=self.gaussian_width,
            rbf="gto",
            weighting=self._dscribe_weighting(),
            periodic=periodic,
            average="off",
            sparse=False,
            dtype="float64",
        )

    # ------------------------------------------------------------------ metadata

    @property
    def n_features(self) -> int:
        """Length of each descriptor row."""
        if self.backend == "dscribe":
            return int(self._calculators[False].get_number_of_features())
        n_pairs = len(self.species) * (len(self.species) + 1) // 2
        return n_pairs * (self.l_max + 1) * self.n_max**2

    def record(self) -> dict[str, Any]:
        """Settings by value, with the engine version (JSON-serialisable)."""
        return {
            "backend": self.backend,
            "backend_version": version(self.backend),
            "species": list(self.species),
            "cutoff": self.cutoff,
            "smoothing": self.smoothing,
            "gaussian_width": self.gaussian_width,
            "n_max": self.n_max,
            "l_max": self.l_max,
            "normalised": True,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> SOAPDescriptor:
        """Descriptor from :meth:`record` (``backend_version`` is not checked).

        Raises
        ------
        ParameterError
            Missing or unknown keys, or a record of unnormalised features.
        """
        missing = sorted(set(_RECORD_KEYS) - {"backend_version"} - set(record))
        unknown = sorted(set(record) - set(_RECORD_KEYS))
        if missing or unknown:
            raise ParameterError(
                f"not a SOAP descriptor record: missing keys {missing}, unknown keys {unknown}"
            )
        if record["normalised"] is not True:
            raise ParameterError("the record describes unnormalised SOAP rows, not supported")
        return cls(
            record["species"],
            backend=record["backend"],
            cutoff=record["cutoff"],
            smoothing=record["smoothing"],
            gaussian_width=record["gaussian_width"],
            n_max=record["n_max"],
            l_max=record["l_max"],
        )

    # ------------------------------------------------------------------ compute

    def compute(
        self,
        frames: Atoms | Sequence[Atoms],
        gradients: Iterable[str] = (),
        *,
        normalise: bool = True,
        centres: Sequence[int] | NDArray[np.int64] | None = None,
    ) -> DescriptorBatch:
        """Normalised SOAP rows of every atom of one or several structures.

        Parameters
        ----------
        frames : ase.Atoms or sequence of ase.Atoms
            Structures, positions in Å. Each must be a molecule (``pbc`` all
            False) or periodic in all three directions.
        gradients : iterable of str, default=()
            Any of ``"positions"`` and ``"strain"`` (featomic only).
        normalise : bool, default=True
            False: the raw power spectra (and their gradients), whose norm grows
            with the density of neighbours (the intermolecular part of
            :mod:`deltaml.intermolecular` needs them; see :func:`normalise_rows`).

        centres : sequence of int, optional
            Rows of these atoms only (ascending, one structure, featomic): the
            environments still see every atom, gradients are with respect to
            any atom of the structure (``DescriptorBatch.n_atoms``). Memory and
            time follow the centres, so that a large structure can be done in
            pieces with the rows it would have whole.

        Returns
        -------
        DescriptorBatch
            Rows in frame order, then atom order; the requested gradients.

        Raises
        ------
        ParameterError
            Unknown gradient kind.
        UnsupportedCapabilityError
            Strain gradients with dscribe, or mixed periodicity (e.g. slabs).
        UnsupportedElementError
            An element outside :attr:`species` (checked before computing).
        EmptyStructureError, NonFiniteGeometryError, SingularCellError, OverlappingAtomsError
            From :func:`deltaml.structures.validate_structure` (atoms closer than
            0.1 Å).
        """
        frames = [frames] if isinstance(frames, Atoms) else list(frames)
        if isinstance(gradients, str):
            gradients = (gradients,)
        gradients = tuple(dict.fromkeys(gradients))
        unknown = [g for g in gradients if g not in GRADIENTS]
        if unknown:
            raise ParameterError(f"unknown gradient kind(s) {unknown}; choose from {GRADIENTS}")
        if "strain" in gradients and self.backend == "dscribe":
            raise UnsupportedCapabilityError(
                "the dscribe SOAP backend has no strain gradients: stress of periodic cells "
                "needs the featomic backend"
            )
        for k, atoms in enumerate(frames):
            self._check_frame(atoms, k)
        sizes = np.array([len(atoms) for atoms in frames], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        if not frames:
            return _empty_batch(self.n_features, gradients)
        if centres is not None:
            centres = np.asarray(centres, dtype=np.int64)
            if len(frames) != 1 or self.backend != "featomic":
                raise UnsupportedCapabilityError(
                    "centres: one structure at a time, with the featomic backend"
                )
            if (
                len(centres) == 0
                or np.any(np.diff(centres) <= 0)
                or centres[0] < 0
                or (centres[-1] >= len(frames[0]))
            ):
                raise ParameterError("centres must be ascending, distinct atom indices")
            batch = self._compute_featomic(frames, gradients, offsets, centres)
            return normalise_rows(batch) if normalise else batch
        if self.backend == "featomic":
            batch = self._compute_featomic(frames, gradients, offsets)
        else:
            batch = self._compute_dscribe(frames, gradients, offsets)
        return normalise_rows(batch) if normalise else batch

    def _check_frame(self, atoms: Atoms, k: int) -> None:
        if not isinstance(atoms, Atoms):
            raise TypeError(f"frame {k} is a {type(atoms).__name__}, not an ase.Atoms")
        validate_structure(atoms, min_distance=MIN_DISTANCE)
        unknown = sorted(set(atoms.numbers.tolist()) - set(self.species))
        if unknown:
            raise UnsupportedElementError(
                f"element(s) {_element_names(unknown)} in frame {k} not covered by this SOAP "
                f"descriptor, which was set up for {_element_names(self.species)}"
            )
        pbc = atoms.pbc
        if pbc.any() and not pbc.all():
            raise UnsupportedCapabilityError(
                f"frame {k} is periodic along {pbc.tolist()} only: the SOAP descriptors "
                "support molecules (pbc all False) and 3D-periodic cells; for a slab or "
                "wire set pbc=True with enough vacuum along the open directions"
            )

    def _compute_featomic(
        self,
        frames: list[Atoms],
        gradients: tuple[str, ...],
        offsets: NDArray[np.int64],
        centres: NDArray[np.int64] | None = None,
    ) -> DescriptorBatch:
        # Molecules get a zero cell: featomic warns about (and ignores) any other.
        systems = [
            atoms if atoms.pbc.all() else Atoms(numbers=atoms.numbers, positions=atoms.positions)
            for atoms in frames
        ]
        selected = None
        if centres is not None:
            from metatensor import Labels

            selected = Labels(["atom"], centres.astype(np.int32).reshape(-1, 1))
        try:
            tensor = self._calculator.compute(
                systems, gradients=list(gradients), selected_samples=selected
            )
        except Exception as error:
            raise EngineError(f"featomic failed to compute SOAP: {error}") from error
        return _densify_featomic(
            tensor, self.species, self.n_max, self.l_max, offsets, frames, centres
        )

    def _compute_dscribe(
        self, frames: list[Atoms], gradients: tuple[str, ...], offsets: NDArray[np.int64]
    ) -> DescriptorBatch:
        values, rows, atoms_j, grads = [], [], [], []
        for k, atoms in enumerate(frames):
            soap = self._calculators[bool(atoms.pbc.all())]
            try:
                if "positions" in gradients:
                    # attach=True: the centre moves with its atom (self term included).
                    d, x = soap.derivatives(atoms, attach=True, method="auto")
                else:
                    x = soap.create(atoms)
            except Exception as error:
                raise EngineError(f"dscribe failed to compute SOAP: {error}") from error
            values.append(np.asarray(x, dtype=np.float64).reshape(len(atoms), -1))
            if "positions" in gradients:
                # Dense (centre i, atom j, xyz, F) -> stored pairs within the cut-off.
                d = np.asarray(d, dtype=np.float64).reshape(len(atoms), len(atoms), 3, -1)
                mask = np.any(d != 0.0, axis=(2, 3)) | np.eye(len(atoms), dtype=bool)
                i, j = np.nonzero(mask)
                rows.append(i + offsets[k])
                atoms_j.append(j + offsets[k])
                grads.append(d[i, j])
        batch = DescriptorBatch(
            values=np.concatenate(values),
            numbers=np.concatenate([atoms.numbers for atoms in frames]).astype(np.int64),
            offsets=offsets,
        )
        if "positions" in gradients:
            batch.position_rows = np.concatenate(rows).astype(np.int64)
            batch.position_atoms = np.concatenate(atoms_j).astype(np.int64)
            batch.position_gradients = np.concatenate(grads)
        return batch


#: Atoms per piece when a model evaluates a large structure in pieces (see
#: :func:`centre_chunks`). Measured on a 999-atom water box (5 Å cut-off, four
#: species, 1800 features): peak memory of a prediction 1.36 GB with pieces of
#: 256 atoms, 0.69 GB with 128, 0.37 GB with 64, in about the same time.
CHUNK_ATOMS = 128


def centre_chunks(
    n_atoms: int, size: int = CHUNK_ATOMS, labels: NDArray[np.int64] | None = None
) -> list[NDArray[np.int64]]:
    """Ascending centre indices of about ``size`` atoms each, covering ``range(n_atoms)``.

    Parameters
    ----------
    n_atoms : int
        Atoms of the structure.
    size : int, default=CHUNK_ATOMS
        Atoms per piece (a molecule larger than that is a piece of its own).
    labels : ndarray of int, optional
        Molecule of every atom: pieces are then whole molecules, taken in
        molecule order.

    Returns
    -------
    list of ndarray
        One array of atom indices per piece; a single piece when ``n_atoms <= size``.
    """
    size = max(int(size), 1)
    if n_atoms <= size:
        return [np.arange(n_atoms)]
    if labels is None:
        return [np.arange(a, min(a + size, n_atoms)) for a in range(0, n_atoms, size)]
    order = np.argsort(labels, kind="stable")
    counts = np.bincount(labels)
    chunks, current, filled = [], [], 0
    start = 0
    for count in counts:
        current.append(order[start : start + count])
        filled += count
        start += count
        if filled >= size:
            chunks.append(np.sort(np.concatenate(current)))
            current, filled = [], 0
    if current:
        chunks.append(np.sort(np.concatenate(current)))
    return chunks


def _empty_batch(n_features: int, gradients: tuple[str, ...]) -> DescriptorBatch:
    batch = DescriptorBatch(
        values=np.zeros((0, n_features)),
        numbers=np.zeros(0, dtype=np.int64),
        offsets=np.zeros(1, dtype=np.int64),
    )
    if "positions" in gradients:
        batch.position_rows = np.zeros(0, dtype=np.int64)
        batch.position_atoms = np.zeros(0, dtype=np.int64)
        batch.position_gradients = np.zeros((0, 3, n_features))
    if "strain" in gradients:
        batch.strain_gradients = np.zeros((0, 3, 3, n_features))
    return batch


def _densify_featomic(
    tensor: Any,
    species: tuple[int, ...],
    n_max: int,
    l_max: int,
    offsets: NDArray[np.int64],
    frames: list[Atoms],
    centres: NDArray[np.int64] | None = None,
) -> DescriptorBatch:
    """One dense matrix from featomic's blocks, over a fixed set of element pairs.

    Equivalent to metatensor's ``keys_to_properties`` over all pairs ``(a <= b)``
    of ``species`` followed by ``keys_to_samples("center_type")``: neighbour
    pairs absent from a structure give zero columns (and zero gradients). With
    ``centres`` (one frame), the rows are those centres in order.
    """
    n_atoms = int(offsets[-1])  # what the gradient atom indices run over
    row_of = None
    n_rows = n_atoms
    if centres is not None:
        row_of = np.full(n_atoms, -1, dtype=np.int64)
        row_of[centres] = np.arange(len(centres))
        n_rows = len(centres)
    pairs = {pair: k for k, pair in enumerate((a, b) for a in species for b in species if a <= b)}
    n_props = (l_max + 1) * n_max * n_max
    n_features = len(pairs) * n_props
    values = np.zeros((n_rows, n_features))
    with_positions = "positions" in tensor.block(0).gradients_list()
    with_strain = "strain" in tensor.block(0).gradients_list()
    strain = np.zeros((n_rows, 3, 3, n_features)) if with_strain else None
    pos_parts = []
    names = tensor.keys.names
    for key, block in tensor.items():
        key = dict(zip(names, (int(v) for v in key.values), strict=True))
        pair = (key["neighbor_1_type"], key["neighbor_2_type"])
        if len(block.samples) == 0:
            continue
        prop = block.properties.values
        cols = pairs[pair] * n_props + (prop[:, 0] * n_max + prop[:, 1]) * n_max + prop[:, 2]
        samples = block.samples.values
        rows = offsets[samples[:, 0]] + samples[:, 1]
        if row_of is not None:
            rows = row_of[rows]
        values[np.ix_(rows, cols)] = block.values
        if with_positions:
            grad = block.gradient("positions")
            gs = grad.samples.values  # sample (row of the block), system, atom
            pos_parts.append((rows[gs[:, 0]], offsets[gs[:, 1]] + gs[:, 2], cols, grad.values))
        if with_strain:
            grad = block.gradient("strain")
            # values[s, a, b] = d x_s / d eps[a, b] for r -> r @ (I + eps).
            where = rows[grad.samples.values[:, 0]]
            span = _column_span(cols)
            if span is not None:
                strain[where, :, :, span] = grad.values
            else:
                strain[where[:, None], :, :, cols[None, :]] = grad.values.transpose(0, 3, 1, 2)
    numbers = np.concatenate([atoms.numbers for atoms in frames]).astype(np.int64)
    batch = DescriptorBatch(
        values=values,
        numbers=numbers if centres is None else numbers[centres],
        offsets=offsets if centres is None else np.array([0, n_rows], dtype=np.int64),
        strain_gradients=strain,
        n_atoms=None if centres is None else n_atoms,
    )
    if with_positions:
        keys = np.concatenate([r * n_atoms + j for r, j, _, _ in pos_parts])
        unique, where = np.unique(keys, return_inverse=True)
        gradients = np.zeros((len(unique), 3, n_features))
        start = 0
        for r, _, cols, g in pos_parts:
            index = where[start : start + len(r)]
            span = _column_span(cols)
            if span is not None:  # featomic's properties are in column order: a copy
                gradients[index, :, span] = g
            else:
                gradients[
                    index[:, None, None], np.arange(3)[None, :, None], cols[None, None, :]
                ] = g
            start += len(r)
        batch.position_rows = unique // n_atoms
        batch.position_atoms = unique % n_atoms
        batch.position_gradients = gradients
    return batch


def _column_span(cols: NDArray[np.int64]) -> slice | None:
    """``cols`` as a slice when they are consecutive and ascending, else ``None``.

    Assigning a block through a slice copies it; through three index arrays
    numpy scatters element by element, several times slower on gradient
    blocks of hundreds of MB.
    """
    if len(cols) and cols[-1] - cols[0] == len(cols) - 1 and np.all(np.diff(cols) == 1):
        return slice(int(cols[0]), int(cols[-1]) + 1)
    return None


def normalise_rows(batch: DescriptorBatch) -> DescriptorBatch:
    """Rows ``x / |x|`` and gradients ``(dx - x̂ (x̂ · dx)) / |x|``, in place."""
    norms = np.linalg.norm(batch.values, axis=1)
    if np.any(norms == 0):
        raise EngineError("a SOAP row is zero and cannot be normalised")
    unit = batch.values / norms[:, None]
    batch.values = unit
    if batch.position_gradients is not None:
        g = batch.position_gradients
        u = unit[batch.position_rows]
        along = np.einsum("paf,pf->pa", g, u)
        g -= along[:, :, None] * u[:, None, :]
        g /= norms[batch.position_rows][:, None, None]
    if batch.strain_gradients is not None:
        g = batch.strain_gradients
        along = np.einsum("iabf,if->iab", g, unit)
        g -= along[..., None] * unit[:, None, None, :]
        g /= norms[:, None, None, None]
    if batch.pullback is not None:
        # dE/dp = (w − x̂ (x̂ · w)) / |p|: the transpose of the gradient map above.
        batch.pullback = batch.pullback.then(
            lambda w: (w - unit * np.einsum("if,if->i", w, unit)[:, None]) / norms[:, None]
        )
    return batch
