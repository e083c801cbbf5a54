"""deltaml: Δ-learning on top of GFN-xTB with a physical D3 dispersion term.

The composite energy is ``E = E_baseline(GFN-xTB, own dispersion removed)
+ E_correction(learned) + E_D3``. Import the pieces from here::

    from deltaml import DeltaCalculator, ZeroCorrection, XTBBaseline, D3Dispersion
"""

from importlib.metadata import PackageNotFoundError, version

from deltaml.baseline import XTBBaseline, canonical_method, dispersion_free_parametrization
from deltaml.calculator import DeltaCalculator, energy_budget
from deltaml.correction import Correction, CorrectionResult, ZeroCorrection, record_differences
from deltaml.crystals import ICE_PHASES, ice_polymorph, identify_molecules
from deltaml.dataset import (
    check_units,
    delta_targets,
    export_labelled,
    import_labelled,
    interaction_groups,
    read_labelled,
    write_labelled,
)
from deltaml.descriptors import DescriptorBatch, SOAPDescriptor
from deltaml.dispersion import D3Dispersion, damping_parameters, parse_dispersion_spec
from deltaml.errors import (
    ChargeMultiplicityError,
    DeltaMLError,
    EmptyStructureError,
    EngineError,
    LabelError,
    LabelUnitsError,
    MethodMismatchError,
    MissingLabelError,
    ModelFileError,
    NonFiniteGeometryError,
    NonFiniteResultError,
    NotFittedError,
    OutOfDomainError,
    OutOfDomainWarning,
    OverlappingAtomsError,
    ParameterError,
    SCFConvergenceError,
    SingularCellError,
    StructureError,
    TermMismatchError,
    TopologyChangedError,
    TopologyError,
    UnsupportedCapabilityError,
    UnsupportedElementError,
)
from deltaml.evaluation import interaction_energies
from deltaml.labelling import LabellingReport, label_structures
from deltaml.model import SparseGPR
from deltaml.ranking import Ranking, rank_polymorphs, read_candidates
from deltaml.reference import PySCFReference
from deltaml.reference_cp2k import CP2KReference
from deltaml.selection import kfold_tune
from deltaml.store import LabelStore, label_key
from deltaml.structures import perpendicular_widths, supercell_repeats, validate_structure

try:
    __version__ = version("deltaml")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "ICE_PHASES",
    "CP2KReference",
    "ChargeMultiplicityError",
    "Correction",
    "CorrectionResult",
    "D3Dispersion",
    "DeltaCalculator",
    "DeltaMLError",
    "DescriptorBatch",
    "EmptyStructureError",
    "EngineError",
    "LabelError",
    "LabelStore",
    "LabelUnitsError",
    "LabellingReport",
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
    "PySCFReference",
    "Ranking",
    "SCFConvergenceError",
    "SOAPDescriptor",
    "SingularCellError",
    "SparseGPR",
    "StructureError",
    "TermMismatchError",
    "TopologyChangedError",
    "TopologyError",
    "UnsupportedCapabilityError",
    "UnsupportedElementError",
    "XTBBaseline",
    "ZeroCorrection",
    "__version__",
    "canonical_method",
    "check_units",
    "damping_parameters",
    "delta_targets",
    "dispersion_free_parametrization",
    "energy_budget",
    "export_labelled",
    "ice_polymorph",
    "identify_molecules",
    "import_labelled",
    "interaction_energies",
    "interaction_groups",
    "kfold_tune",
    "label_key",
    "label_structures",
    "parse_dispersion_spec",
    "perpendicular_widths",
    "rank_polymorphs",
    "read_candidates",
    "read_labelled",
    "record_differences",
    "supercell_repeats",
    "validate_structure",
    "write_labelled",
]
