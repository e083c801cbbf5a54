"""Exception hierarchy of deltaml.

Every error raised on purpose by deltaml derives from :class:`DeltaMLError`, and
also from the builtin (or ASE) exception that matches its meaning, as
``tblite/exceptions.py`` does. So ``except ValueError`` keeps working for code that
does not know deltaml, and ASE's calculator taxonomy is respected: problems with
the input of a calculator are :class:`ase.calculators.calculator.InputError`,
failures of an engine are :class:`ase.calculators.calculator.CalculationFailed`.

This module is the bottom layer of the package and imports nothing from it.
"""

from __future__ import annotations

from ase.calculators.calculator import CalculationFailed, InputError

__all__ = [
    "ChargeMultiplicityError",
    "DeltaMLError",
    "EmptyStructureError",
    "EngineError",
    "LabelError",
    "LabelUnitsError",
    "MethodMismatchError",
    "MissingLabelError",
    "ModelFileError",
    "NonFiniteGeometryError",
    "NonFiniteResultError",
    "NotFittedError",
    "OutOfDomainError",
    "OutOfDomainWarning",
    "OverlappingAtomsError",
    "ParameterError",
    "SCFConvergenceError",
    "SingularCellError",
    "StaleLockWarning",
    "StoreBackendError",
    "StoreConnectionError",
    "StoreLockedError",
    "StructureError",
    "TermMismatchError",
    "TopologyChangedError",
    "TopologyError",
    "UnsupportedCapabilityError",
    "UnsupportedElementError",
]


class DeltaMLError(Exception):
    """Base class of every error raised on purpose by deltaml."""


class StructureError(DeltaMLError, InputError, ValueError):
    """A structure that cannot be evaluated (base class of the structure checks)."""


class EmptyStructureError(StructureError):
    """The structure has no atoms."""


class NonFiniteGeometryError(StructureError):
    """Positions or cell contain NaN or infinite values."""


class OverlappingAtomsError(StructureError):
    """Two atoms are closer than the minimum allowed distance."""


class UnsupportedElementError(StructureError):
    """An element is not supported by the chosen method."""


class SingularCellError(StructureError):
    """The cell vectors of a periodic structure are (nearly) linearly dependent."""


class ChargeMultiplicityError(StructureError):
    """Charge and multiplicity are inconsistent with the number of electrons."""


class TopologyError(StructureError):
    """The molecules of a structure cannot be told apart (a molecule bonded to its own image)."""


class TopologyChangedError(DeltaMLError, CalculationFailed):
    """The covalent bonding changed during a calculation that fixed the molecules."""


class ParameterError(DeltaMLError, InputError, ValueError):
    """An unknown or invalid calculator parameter (method, damping, engine, ...)."""


class UnsupportedCapabilityError(DeltaMLError, InputError, NotImplementedError):
    """The chosen engine cannot compute what was asked (raised before computing)."""


class TermMismatchError(DeltaMLError, InputError, ValueError):
    """A correction is combined with physical terms other than those it was fitted with."""


class EngineError(DeltaMLError, CalculationFailed):
    """An electronic-structure or dispersion library failed during a calculation."""


class NonFiniteResultError(EngineError):
    """A term returned NaN or infinite energies, forces or stress."""


class SCFConvergenceError(EngineError):
    """The self-consistent field iterations did not converge."""


class LabelError(DeltaMLError, ValueError):
    """Labelled reference data that cannot be used as it is (base class)."""


class MissingLabelError(LabelError):
    """A labelled structure lacks its energy, forces or method record."""


class LabelUnitsError(LabelError):
    """Labels whose units are not eV and eV/Å (declared so, or evident by magnitude)."""


class LabelUnitsWarning(UserWarning):
    """The units of labels could not be checked; the user is asked to make sure."""


class MethodMismatchError(LabelError):
    """Labels from different methods (their records differ) would be mixed."""


class NotFittedError(DeltaMLError, ValueError, AttributeError):
    """A model was used before ``fit`` (same bases as scikit-learn's NotFittedError)."""


class ModelFileError(DeltaMLError, ValueError):
    """A model file of another format version, or not a deltaml model."""


class OutOfDomainError(DeltaMLError, CalculationFailed):
    """The model's predicted uncertainty exceeds the threshold set on the calculator."""


class OutOfDomainWarning(UserWarning):
    """The correction extrapolates: its predicted uncertainty exceeds the threshold
    (``uncertainty_action="warn"``), or the structure holds a spin state, charge or
    crystal of molecules its training never held."""


class StoreBackendError(DeltaMLError, ImportError):
    """A label store's database backend or driver is not installed."""


class StoreConnectionError(DeltaMLError, ConnectionError):
    """A label store's database server cannot be reached."""


class StoreLockedError(DeltaMLError, TimeoutError):
    """A label store stayed locked by a live process for longer than the timeout."""


class StaleLockWarning(UserWarning):
    """A lock on a label store left by a process that no longer runs was removed."""
