"""What a :class:`~deltaml.model.SparseGPR` file holds, and how a file becomes a model.

The container (``.npz`` + JSON, checksum, size and finiteness checks) is
:mod:`deltaml.model_files`; this module fills it with a fitted model's metadata
and arrays, and checks a file's arrays against its metadata when it is read
(shapes, species, the decomposition's terms, the offsets' covariance), so that
an inconsistent file is refused with a :class:`~deltaml.errors.ModelFileError`
that says what, instead of giving wrong numbers.

Format versions: 1 (atomic decomposition only, no checksum), 2 (decompositions,
checksum), 3 (the offsets' covariance and the span of the training compositions,
:mod:`deltaml.offsets`). Older files load; their offsets carry no uncertainty.

Data flow: kernels, offsets → **model_io** → model.
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
from ase.data import atomic_numbers, chemical_symbols
from numpy.typing import NDArray

from deltaml.descriptors import SOAPDescriptor
from deltaml.errors import ModelFileError
from deltaml.kernels import KernelTerm
from deltaml.model_files import MODEL_FORMAT, read_model_file
from deltaml.offsets import Offsets, fixed_offsets

__all__ = [
    "DECOMPOSITIONS",
    "MODEL_FORMAT_VERSION",
    "model_arrays",
    "model_from_file",
    "model_metadata",
]

#: Version of the model file format written (see the module notes).
MODEL_FORMAT_VERSION = 3
#: Decompositions of the correction (see :mod:`deltaml.model`).
DECOMPOSITIONS = ("molecular", "atomic")


def model_metadata(model: Any) -> dict[str, Any]:
    """JSON metadata of a fitted :class:`~deltaml.model.SparseGPR`'s file."""
    return {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "deltaml_version": _deltaml_version(),
        "model": type(model).__name__,
        "params": model.get_params(),
        "decomposition": model.decomposition,
        "terms": [
            {
                "name": t.name,
                "kernel": t.kernel,
                "zeta": t.zeta,
                "delta_ev": t.delta,
                "linear": t.linear,
            }
            for t in model.terms_
        ],
        "inter_scale": {chemical_symbols[z]: v for z, v in model.inter_scale_.items()},
        "n_interactions": model.n_interactions_,
        "descriptor": model.descriptor_.record(),
        "species": [chemical_symbols[z] for z in model.species_],
        "offsets_ev": {chemical_symbols[z]: v for z, v in model.offsets_.items()},
        "offsets_anchored": [chemical_symbols[z] for z in model.offset_fit_.anchored],
        "n_isolated_atoms": model.n_isolated_atoms_,
        "training_multiplicities": model.training_multiplicities_,
        "training_charges": getattr(model, "training_charges_", None),
        "periodic_molecules": getattr(model, "periodic_molecules_", None),
        "trained_with": model.trained_with_,
        "reference": model.reference_,
        "training_set_sha256": model.training_set_sha256_,
        "n_train": model.n_train_,
        "uncertainty_scale": model.uncertainty_scale_,
        "units": {"energy": "eV", "forces": "eV/Å", "stress": "eV/Å^3"},
    }


def model_arrays(model: Any) -> dict[str, NDArray]:
    """The arrays of a fitted model's file."""
    arrays = {
        "alpha": model.alpha_,
        "chol_mm": model.chol_mm_,
        "r_factor": model.r_factor_,
        "offset_covariance": model.offset_fit_.covariance,
        "offset_span": model.offset_fit_.span,
    }
    for k, term in enumerate(model.terms_):
        arrays[f"sparse_values_{k}"] = term.sparse_values
        arrays[f"sparse_numbers_{k}"] = term.sparse_numbers
    return arrays


def model_from_file(cls: type, path: str | Path) -> Any:
    """The model of ``cls`` read from a file written by its ``save`` (format versions 1-3).

    The file is checked before use (:func:`deltaml.model_files.read_model_file`:
    sizes, finite values, checksum), then its arrays against its metadata
    (shapes, species, the decomposition's terms).

    Raises
    ------
    ModelFileError
        Not a deltaml model, another format version, or an inconsistent or
        damaged file (the message says what).
    """
    meta, arrays = read_model_file(path, (1, 2, MODEL_FORMAT_VERSION))
    version_read = meta["format_version"]
    params = dict(meta.get("params", {}))
    if version_read == 1:
        # Version 1 knew only the atomic decomposition, with one term.
        params["decomposition"] = "atomic"
        meta["terms"] = [
            {"name": "atomic", "kernel": params.get("kernel"), "zeta": params.get("zeta"),
             "delta_ev": meta.get("delta_ev")}
        ]  # fmt: skip
        for name in ("sparse_values", "sparse_numbers"):
            if name in arrays:
                arrays[f"{name}_0"] = arrays[name]
    elif meta.get("decomposition") not in DECOMPOSITIONS or "terms" not in meta:
        raise ModelFileError(
            f"{path}: decomposition {meta.get('decomposition')!r} or its terms missing or "
            f"unknown (expected one of {DECOMPOSITIONS})"
        )
    params["decomposition"] = meta.get("decomposition", "atomic")
    # Files written before the pairwise intermolecular rows used full − own rows.
    params.setdefault("inter_rows", "difference")
    needed = ["alpha", "chol_mm", "r_factor"]
    if version_read >= 3:
        needed += ["offset_covariance", "offset_span"]
    needed += [
        f"{name}_{k}"
        for k in range(len(meta["terms"]))
        for name in ("sparse_values", "sparse_numbers")
    ]
    missing = [name for name in needed if name not in arrays]
    if missing:
        raise ModelFileError(f"{path}: array(s) {missing} missing; the file is incomplete")
    try:
        model = _from_metadata(cls, meta, arrays, params, path)
    except ModelFileError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ModelFileError(f"{path}: metadata incomplete or invalid ({exc!r})") from exc
    model.content_sha256_ = meta.get("content_sha256")
    _check_consistent(model, path)
    return model


def _from_metadata(
    cls: type, meta: dict[str, Any], arrays: dict[str, NDArray], params: dict, path: str | Path
) -> Any:
    """The fitted model described by checked file contents (raises KeyError etc.)."""
    model = cls(**params)
    model.species_ = [atomic_numbers[s] for s in meta["species"]]
    model.descriptor_ = SOAPDescriptor.from_record(meta["descriptor"])
    model.offsets_ = {atomic_numbers[s]: float(v) for s, v in meta["offsets_ev"].items()}
    model.offset_fit_ = _offsets_from_file(model, meta, arrays)
    model.n_isolated_atoms_ = int(meta.get("n_isolated_atoms", 0))
    seen = meta.get("training_multiplicities")
    model.training_multiplicities_ = None if seen is None else [int(m) for m in seen]
    charges = meta.get("training_charges")
    model.training_charges_ = None if charges is None else [int(q) for q in charges]
    periodic = meta.get("periodic_molecules")
    model.periodic_molecules_ = None if periodic is None else [str(f) for f in periodic]
    model.terms_ = [
        KernelTerm(
            t["name"],
            t["kernel"],
            float(t["zeta"]),
            float(t["delta_ev"]),
            arrays[f"sparse_values_{k}"],
            arrays[f"sparse_numbers_{k}"],
            linear=float(t.get("linear", 0.0)),
        )
        for k, t in enumerate(meta["terms"])
    ]
    expected = ["atomic"] if params["decomposition"] == "atomic" else ["intra", "inter"]
    if [t.name for t in model.terms_] != expected:
        raise ModelFileError(
            f"{path}: terms {[t.name for t in model.terms_]} do not match the "
            f"{params['decomposition']!r} decomposition"
        )
    model.inter_scale_ = {
        atomic_numbers[s]: float(v) for s, v in meta.get("inter_scale", {}).items()
    }
    model.n_interactions_ = int(meta.get("n_interactions", 0))
    model.trained_with_ = meta["trained_with"]
    model.reference_ = meta["reference"]
    model.training_set_sha256_ = meta["training_set_sha256"]
    model.n_train_ = int(meta["n_train"])
    model.uncertainty_scale_ = dict(meta["uncertainty_scale"])
    model.alpha_ = arrays["alpha"]
    model.chol_mm_ = arrays["chol_mm"]
    model.r_factor_ = arrays["r_factor"]
    return model


def _check_consistent(model: Any, path: str | Path) -> None:
    """Refuse a loaded model whose arrays do not fit its metadata (shapes, species, scales)."""
    problems = []
    width = model.descriptor_.n_features
    sizes = [t.size for t in model.terms_]
    for term in model.terms_:
        values, numbers = term.sparse_values, term.sparse_numbers
        if values.ndim != 2 or values.shape[1] != width or numbers.shape != (len(values),):
            problems.append(f"term {term.name}: sparse arrays {values.shape}/{numbers.shape} "
                            f"do not fit {width} descriptor features")  # fmt: skip
        elif not set(numbers.tolist()) <= set(model.species_):
            problems.append(f"term {term.name}: sparse points of elements outside the species")
        if not (np.isfinite(term.delta) and term.delta > 0):
            problems.append(f"term {term.name}: prior width {term.delta} is not positive")
    m = sum(sizes)
    for name in ("alpha", "chol_mm", "r_factor"):
        shape = getattr(model, f"{name}_").shape
        expected = (m,) if name == "alpha" else (m, m)
        if shape != expected:
            problems.append(f"{name} has shape {shape}, expected {expected}")
    if set(model.offsets_) != set(model.species_):
        problems.append("offsets do not cover exactly the species")
    if not all(np.isfinite(v) for v in model.offsets_.values()):
        problems.append("an offset is not finite")
    n_species = len(model.species_)
    covariance, span = model.offset_fit_.covariance, model.offset_fit_.span
    if covariance.shape != (n_species, n_species):
        problems.append(f"offset_covariance has shape {covariance.shape}, expected "
                        f"({n_species}, {n_species})")  # fmt: skip
    elif not _positive_semidefinite(covariance):
        problems.append("offset_covariance is not symmetric positive semi-definite")
    if span.ndim != 2 or span.shape[1] != n_species or len(span) > n_species:
        problems.append(f"offset_span has shape {span.shape}, expected (≤{n_species}, {n_species})")
    scales = model.uncertainty_scale_
    # "inter" (the intermolecular part's factor) and "inter_floor" (eV, may be 0) only
    # where calibrated on interaction energies; "forces_floor" (eV/Å) where
    # calibrated on forces (files before 2026-12-02 have none: 0).
    floors = {k: v for k, v in scales.items() if k in ("inter_floor", "forces_floor")}
    factors = {k: v for k, v in scales.items() if k not in floors}
    if (
        not {"energy", "forces"} <= set(factors) <= {"energy", "forces", "inter"}
        or not all(np.isfinite(v) and v > 0 for v in factors.values())
        or not all(np.isfinite(v) and v >= 0 for v in floors.values())
    ):
        problems.append(
            f"uncertainty scales {scales} are not positive numbers for energy, forces (and "
            "inter, and floors >= 0)"
        )
    if model.molecular and set(model.inter_scale_) != set(model.species_):
        problems.append("intermolecular scales do not cover exactly the species")
    if any(not (np.isfinite(v) and v > 0) for v in model.inter_scale_.values()):
        problems.append("an intermolecular scale is not positive")
    if problems:
        raise ModelFileError(f"{path}: inconsistent model file: " + "; ".join(problems))


def _positive_semidefinite(matrix: NDArray) -> bool:
    """Symmetric with no eigenvalue below round-off."""
    if not np.allclose(matrix, matrix.T):
        return False
    scale = max(1.0, float(np.abs(matrix).max()))
    return matrix.size == 0 or float(np.linalg.eigvalsh(matrix).min()) >= -1e-8 * scale


def _offsets_from_file(model: Any, meta: dict, arrays: dict[str, NDArray]) -> Offsets:
    """The offsets of a model file; files before version 3 carry no covariance."""
    if "offset_covariance" not in arrays:
        # Older files: offsets without uncertainty, every composition accepted.
        return fixed_offsets(model.offsets_, model.species_)
    return Offsets(
        species=tuple(model.species_),
        mean=np.array([model.offsets_[z] for z in model.species_]),
        covariance=arrays["offset_covariance"],
        span=arrays["offset_span"],
        anchored=tuple(atomic_numbers[s] for s in meta.get("offsets_anchored", [])),
    )


def _deltaml_version() -> str:
    try:
        return version("deltaml")
    except Exception:  # a source tree that is not installed
        return "0+unknown"
