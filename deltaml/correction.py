"""The learned-correction protocol and record comparison.

The composite calculator sums baseline + correction + dispersion. The correction
is anything that follows :class:`Correction`: for one structure it returns the
energy (eV) and, when asked, forces (eV/Å), stress (eV/Å³, Voigt) and optionally
an uncertainty. The Δ-model of :mod:`deltaml.model` implements it; until a model
is trained, :class:`ZeroCorrection` stands in, and only when asked for
explicitly.

A correction also says which physical terms it was fitted against
(``trained_with``: the baseline and dispersion records by value). The composite
compares them with its own terms through :func:`record_differences` and refuses
a mismatch, because a Δ learned against GFN2 + D3(BJ, PBE0) is wrong on top of
anything else.

Data flow: this module sits beside the physical terms; the model (later) and the
composite import it, it imports nothing from them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
from ase import Atoms
from numpy.typing import NDArray

__all__ = [
    "Correction",
    "CorrectionResult",
    "ZeroCorrection",
    "accepts_force_uncertainty",
    "predict_correction",
    "record_differences",
]


@dataclass(frozen=True)
class CorrectionResult:
    """What a correction returns for one structure (ASE units).

    Attributes
    ----------
    energy : float
        Correction energy, eV.
    forces : ndarray of shape (n_atoms, 3) or None
        Correction forces, eV/Å; ``None`` when not requested.
    stress : ndarray of shape (6,) or None
        Correction stress, eV/Å³, Voigt order (xx, yy, zz, yz, xz, xy); ``None``
        when not requested or not periodic.
    energy_uncertainty : float or None
        Predicted standard deviation of the energy, eV; ``None`` if the
        correction has no uncertainty.
    energies_uncertainty : ndarray of shape (n_atoms,) or None
        Per-atom standard deviations, eV.
    forces_uncertainty : ndarray of shape (n_atoms,) or None
        Per-atom force standard deviations, eV/Å.
    parts : dict of str to float, or None
        Energy of each part of a decomposed correction, eV, summing to
        ``energy`` (e.g. ``offsets``, ``intra``, ``inter``).
    """

    energy: float
    forces: NDArray[np.float64] | None = None
    stress: NDArray[np.float64] | None = None
    energy_uncertainty: float | None = None
    energies_uncertainty: NDArray[np.float64] | None = None
    forces_uncertainty: NDArray[np.float64] | None = None
    parts: dict[str, float] | None = None


@runtime_checkable
class Correction(Protocol):
    """A learned correction to baseline + dispersion.

    Attributes
    ----------
    name : str
        Short name shown in energy budgets.
    trained_with : dict or None
        ``{"baseline": record, "dispersion": record}`` of the terms the
        correction was fitted against, or ``None`` if it is independent of them.
    """

    name: str
    trained_with: dict[str, Any] | None

    def predict(self, atoms: Atoms, *, forces: bool, stress: bool) -> CorrectionResult:
        """Correction for one structure; forces/stress only when asked.

        A correction whose force uncertainty is costly may also take a keyword
        ``force_uncertainty`` (bool): the composite then passes ``True`` only
        when something uses it (see :func:`predict_correction`).
        """
        ...


def accepts_force_uncertainty(correction: Correction) -> bool:
    """True if ``correction.predict`` takes the optional ``force_uncertainty`` keyword."""
    import inspect

    try:
        parameters = inspect.signature(correction.predict).parameters
    except (TypeError, ValueError):
        return False
    return "force_uncertainty" in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )


def predict_correction(
    correction: Correction,
    atoms: Atoms,
    *,
    forces: bool,
    stress: bool,
    force_uncertainty: bool,
    accepts: bool | None = None,
) -> CorrectionResult:
    """``correction.predict``, asking for the force uncertainty only if ``force_uncertainty``.

    Parameters
    ----------
    correction : Correction
        Any correction; one without the ``force_uncertainty`` keyword is called
        with ``forces`` and ``stress`` only (it decides alone).
    atoms : ase.Atoms
        The structure.
    forces, stress : bool
        Whether forces (eV/Å) and stress (eV/Å³) are wanted.
    force_uncertainty : bool
        Whether the per-atom force uncertainty (eV/Å) is used by the caller.
    accepts : bool, optional
        :func:`accepts_force_uncertainty` of the correction, if known already.

    Returns
    -------
    CorrectionResult
    """
    if accepts is None:
        accepts = accepts_force_uncertainty(correction)
    if accepts:
        return correction.predict(
            atoms, forces=forces, stress=stress, force_uncertainty=force_uncertainty
        )
    return correction.predict(atoms, forces=forces, stress=stress)


class ZeroCorrection:
    """A correction that is exactly zero, to run the physical terms alone.

    It has no uncertainty (``energy_uncertainty`` is ``None``, not zero) and is
    compatible with any baseline and dispersion.
    """

    name = "zero"
    trained_with = None

    def predict(self, atoms: Atoms, *, forces: bool, stress: bool) -> CorrectionResult:
        """Zero energy (eV), forces (eV/Å) and stress (eV/Å³)."""
        return CorrectionResult(
            energy=0.0,
            forces=np.zeros((len(atoms), 3)) if forces else None,
            stress=np.zeros(6) if stress else None,
        )


def record_differences(
    expected: Any, actual: Any, *, path: str = "", rel_tol: float = 1e-12
) -> list[str]:
    """Differences between two term records, as readable lines.

    Floats are compared with a relative tolerance; versions of the engines
    (keys ending in ``engine_version``) are not compared, because a new release
    of a library that gives the same numbers is not a different term.

    Parameters
    ----------
    expected, actual : dict, list or scalar
        Records (nested JSON-like data).
    path : str, default=""
        Prefix for the keys in the messages.
    rel_tol : float, default=1e-12
        Relative tolerance for floats.

    Returns
    -------
    list of str
        One line per difference, e.g. ``"dispersion.parameters.a1: 0.4145 != 0.4289"``;
        empty if the records agree.
    """
    if isinstance(expected, dict) and isinstance(actual, dict):
        lines = []
        for key in sorted(set(expected) | set(actual)):
            if key.endswith("engine_version"):
                continue
            sub = f"{path}.{key}" if path else str(key)
            if key not in expected or key not in actual:
                lines.append(
                    f"{sub}: {expected.get(key, '<missing>')} != {actual.get(key, '<missing>')}"
                )
            else:
                lines += record_differences(expected[key], actual[key], path=sub, rel_tol=rel_tol)
        return lines
    if isinstance(expected, list | tuple) and isinstance(actual, list | tuple):
        if len(expected) != len(actual):
            return [f"{path}: {expected} != {actual}"]
        lines = []
        for i, (a, b) in enumerate(zip(expected, actual, strict=True)):
            lines += record_differences(a, b, path=f"{path}[{i}]", rel_tol=rel_tol)
        return lines
    if isinstance(expected, bool) or isinstance(actual, bool):
        same = type(expected) is type(actual) and expected == actual  # a flag is not 0/1
    elif isinstance(expected, int | float) and isinstance(actual, int | float):
        same = math.isclose(float(expected), float(actual), rel_tol=rel_tol, abs_tol=0.0)
    else:
        same = expected == actual
    return [] if same else [f"{path}: {expected!r} != {actual!r}"]
