"""Model files: ``.npz`` arrays + JSON metadata, checksummed, checked before use.

A model file is data, never code: NumPy's ``.npz`` container (no pickle) with one
array ``metadata`` holding JSON, and the model's float and integer arrays. What
this module guarantees for a file it reads back:

- it is a deltaml model of a known format version;
- no array is larger than :data:`MAX_ELEMENTS` (checked from the array headers,
  before anything is allocated) and every array is finite;
- its content checksum (SHA-256 of the metadata without the checksum and of
  every array's name, dtype, shape and bytes) matches the one recorded: a file
  altered or damaged after it was written is refused.

The checksum is also the model's identity (``content_sha256``): results saved with
a model (rankings, say) are keyed by it.

Data flow: model ⇄ **model files**.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from deltaml.errors import ModelFileError
from deltaml.files import atomic_path

__all__ = [
    "MAX_ELEMENTS",
    "MODEL_FORMAT",
    "content_checksum",
    "read_model_file",
    "write_model_file",
]

MODEL_FORMAT = "deltaml-model"

#: Largest array a model file may hold (elements): a 20 000 × 20 000 matrix. A file
#: that claims more is refused before any memory is allocated for it.
MAX_ELEMENTS = 400_000_000


def content_checksum(metadata: dict[str, Any], arrays: dict[str, NDArray]) -> str:
    """SHA-256 of the metadata (without its checksum) and of every array, in name order."""
    digest = hashlib.sha256()
    plain = {k: v for k, v in metadata.items() if k != "content_sha256"}
    digest.update(json.dumps(plain, sort_keys=True).encode())
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{value.dtype.str}|{value.shape}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def write_model_file(path: str | Path, metadata: dict[str, Any], arrays: dict[str, NDArray]) -> str:
    """Write a model file atomically (a partial file, then renamed); return its checksum.

    Parameters
    ----------
    path : str or pathlib.Path
        Target ``.npz`` file.
    metadata : dict
        JSON-serialisable; ``content_sha256`` is added.
    arrays : dict of str to ndarray
        The model's arrays (not ``metadata``).

    Returns
    -------
    str
        The content checksum recorded in the file.
    """
    path = Path(path)
    if not path.parent.exists():
        raise ModelFileError(f"cannot write {path}: folder {path.parent} does not exist")
    checksum = content_checksum(metadata, arrays)
    meta = {**metadata, "content_sha256": checksum}
    with atomic_path(path) as partial, partial.open("wb") as stream:
        # A stream, so that numpy appends no ".npz" to a name without it.
        np.savez(stream, metadata=np.array(json.dumps(meta, sort_keys=True)), **arrays)
    return checksum


def read_model_file(path: str | Path, versions: tuple[int, ...]) -> tuple[dict, dict[str, NDArray]]:
    """Read and check a model file: format, version, sizes, finiteness, checksum.

    Parameters
    ----------
    path : str or pathlib.Path
        A file written by :func:`write_model_file`.
    versions : tuple of int
        Format versions the caller can read. Files of version 1 carry no checksum.

    Returns
    -------
    metadata : dict
    arrays : dict of str to ndarray

    Raises
    ------
    ModelFileError
        Naming what is wrong: not a model file, another format or version, an array
        too large, non-finite values, or a checksum that does not match.
    """
    _check_sizes(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ModelFileError(f"{path}: not a deltaml model file ({exc})") from exc
    if "metadata" not in arrays:
        raise ModelFileError(f"{path}: no metadata; not a deltaml model file")
    try:
        meta = json.loads(str(arrays.pop("metadata")))
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path}: its metadata is not JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ModelFileError(f"{path}: format {found!r} is not {MODEL_FORMAT!r}")
    version = meta.get("format_version")
    if version not in versions:
        raise ModelFileError(
            f"{path}: model format version {version} (written by deltaml "
            f"{meta.get('deltaml_version')}); this deltaml reads versions "
            f"{', '.join(map(str, versions))}: refit the model"
        )
    for name, value in arrays.items():
        if value.dtype.kind not in "fiub":
            raise ModelFileError(f"{path}: array {name!r} has dtype {value.dtype}, not numbers")
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise ModelFileError(f"{path}: array {name!r} holds NaN or infinite values")
    if version != 1:
        recorded = meta.get("content_sha256")
        if recorded != content_checksum(meta, arrays):
            raise ModelFileError(
                f"{path}: content checksum does not match the one recorded "
                f"({recorded!r}): the file was altered or damaged after it was written"
            )
    return meta, arrays


def _check_sizes(path: str | Path) -> None:
    """Refuse arrays above :data:`MAX_ELEMENTS` from their headers, before reading them."""
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                with archive.open(member) as stream:
                    major, _ = np.lib.format.read_magic(stream)
                    reader = (
                        np.lib.format.read_array_header_1_0
                        if major == 1
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, _, _ = reader(stream)
                if int(np.prod(shape, dtype=np.int64)) > MAX_ELEMENTS:
                    raise ModelFileError(
                        f"{path}: array {member!r} claims shape {shape}, more than "
                        f"{MAX_ELEMENTS} elements; refused before reading it"
                    )
    except ModelFileError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ModelFileError(f"{path}: not a deltaml model file ({exc})") from exc
