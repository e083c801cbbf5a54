"""Model files: checksummed, size-bounded, finite, and consistent with their metadata."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
from ase.build import molecule
from ase.calculators.singlepoint import SinglePointCalculator

from deltaml.errors import MissingLabelError, ModelFileError
from deltaml.model import SparseGPR
from deltaml.model_files import (
    MAX_ELEMENTS,
    MODEL_FORMAT,
    content_checksum,
    read_model_file,
    write_model_file,
)

META = {"format": MODEL_FORMAT, "format_version": 2, "note": "test"}


def _arrays() -> dict[str, np.ndarray]:
    return {"alpha": np.arange(4.0), "numbers": np.array([1, 8, 8, 1])}


def test_a_file_reads_back_with_its_checksum(tmp_path):
    path = tmp_path / "m.npz"
    checksum = write_model_file(path, META, _arrays())
    meta, arrays = read_model_file(path, (2,))
    assert meta["content_sha256"] == checksum == content_checksum(META, _arrays())
    np.testing.assert_array_equal(arrays["alpha"], _arrays()["alpha"])
    changed = {**_arrays(), "alpha": np.arange(4.0) + 1e-12}
    assert content_checksum(META, changed) != checksum


def _rewrite(path, meta: dict, arrays: dict) -> None:
    """Write an npz directly (no checksum update), as a damaged or hand-edited file."""
    np.savez(path, metadata=np.array(json.dumps(meta)), **arrays)


def test_an_altered_file_is_refused(tmp_path):
    path = tmp_path / "m.npz"
    write_model_file(path, META, _arrays())
    meta, arrays = read_model_file(path, (2,))
    arrays["alpha"][1] = 7.0
    _rewrite(tmp_path / "altered.npz", meta, arrays)
    with pytest.raises(ModelFileError, match="checksum does not match"):
        read_model_file(tmp_path / "altered.npz", (2,))


def test_non_finite_arrays_are_refused_even_with_a_valid_checksum(tmp_path):
    path = tmp_path / "nan.npz"
    write_model_file(path, META, {**_arrays(), "alpha": np.array([0.0, np.nan, 1.0, np.inf])})
    with pytest.raises(ModelFileError, match="'alpha' holds NaN or infinite"):
        read_model_file(path, (2,))


def test_an_oversized_array_is_refused_from_its_header_before_reading(tmp_path):
    header = {"descr": "<f8", "fortran_order": False, "shape": (MAX_ELEMENTS + 1,)}
    stream = io.BytesIO()
    np.lib.format.write_array_header_2_0(stream, header)  # the header alone: no data follows
    path = tmp_path / "huge.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("metadata.npy", _npy(np.array(json.dumps(META))))
        archive.writestr("alpha.npy", b"\x93NUMPY" + stream.getvalue()[6:])
    with pytest.raises(ModelFileError, match=r"more than .* elements; refused before reading"):
        read_model_file(path, (2,))


def _npy(array: np.ndarray) -> bytes:
    stream = io.BytesIO()
    np.save(stream, array)
    return stream.getvalue()


def test_a_missing_folder_is_named_before_anything_is_written(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        write_model_file(tmp_path / "nowhere" / "m.npz", META, _arrays())


@pytest.fixture(scope="module")
def fitted() -> SparseGPR:
    rng = np.random.default_rng(0)
    frames = []
    for k in range(6):
        atoms = molecule(("H2O", "CH3OH")[k % 2])
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
        atoms.calc = SinglePointCalculator(
            atoms, energy=float(rng.normal()), forces=rng.normal(scale=0.1, size=(len(atoms), 3))
        )
        frames.append(atoms)
    descriptor = {"cutoff": 3.5, "n_max": 3, "l_max": 2}
    return SparseGPR(descriptor=descriptor, n_sparse=10).fit(frames)


def test_a_model_whose_arrays_do_not_fit_its_metadata_is_refused(fitted, tmp_path):
    path = fitted.save(tmp_path / "model.npz")
    meta, arrays = read_model_file(path, (3,))
    assert SparseGPR.load(path).content_sha256 == fitted.content_sha256 == meta["content_sha256"]
    meta.pop("content_sha256")
    arrays["alpha"] = arrays["alpha"][:-1]  # re-checksummed: only the shapes disagree
    write_model_file(tmp_path / "short.npz", meta, arrays)
    with pytest.raises(ModelFileError, match="alpha has shape"):
        SparseGPR.load(tmp_path / "short.npz")
    broken = {k: v for k, v in meta.items() if k != "species"}
    write_model_file(tmp_path / "nospecies.npz", broken, read_model_file(path, (3,))[1])
    with pytest.raises(ModelFileError, match="metadata incomplete or invalid"):
        SparseGPR.load(tmp_path / "nospecies.npz")


def test_the_identity_of_a_model_changes_when_it_is_recalibrated(fitted):
    before = fitted.content_sha256
    saved = fitted.uncertainty_scale_
    with pytest.raises(MissingLabelError, match="no structures"):
        fitted.calibrate([])  # would give NaN scales
    assert fitted.content_sha256 == before
    fitted.uncertainty_scale_ = {"energy": 2.0, "forces": 1.0}
    fitted.content_sha256_ = None
    try:
        assert fitted.content_sha256 != before
    finally:
        fitted.uncertainty_scale_, fitted.content_sha256_ = saved, None
    assert fitted.content_sha256 == before


def test_a_force_floor_survives_save_and_load_and_a_negative_one_is_refused(fitted, tmp_path):
    saved = dict(fitted.uncertainty_scale_)
    try:
        fitted.uncertainty_scale_ = {"energy": 2.0, "forces": 1.5, "forces_floor": 0.02}
        fitted.content_sha256_ = None
        fitted.save(tmp_path / "floor.npz")
        loaded = SparseGPR.load(tmp_path / "floor.npz")
        assert loaded.uncertainty_scale_ == fitted.uncertainty_scale_
        atoms = molecule("H2O")
        sigma = loaded.predict(atoms).forces_uncertainty
        loaded.uncertainty_scale_ = {"energy": 2.0, "forces": 1.5}  # an older file: no floor
        assert sigma == pytest.approx(np.hypot(loaded.predict(atoms).forces_uncertainty, 0.02))
        fitted.uncertainty_scale_ = {"energy": 2.0, "forces": 1.5, "forces_floor": -0.02}
        fitted.content_sha256_ = None
        fitted.save(tmp_path / "negative.npz")
        with pytest.raises(ModelFileError, match="floors >= 0"):
            SparseGPR.load(tmp_path / "negative.npz")
    finally:
        fitted.uncertainty_scale_, fitted.content_sha256_ = saved, None
