"""Store of labelled structures on ASE's database (``ase.db``).

Reference calculations are the scarce resource of the method: every result is
written the moment it arrives, in its own transaction, keyed by a hash of
structure + method record, so that the same calculation is never done twice and
killing the process loses at most the calculation in flight. SQLite by default
(a file path), PostgreSQL by URL (``postgresql://…``) with no code change.

A row holds the structure with the reference ``energy``/``forces``/``stress`` (as
ASE's single-point results), the status (``done`` or ``failed`` with its error),
the method record (JSON, in ``data``), and optionally the baseline's and
dispersion's values used to form Δ targets (``energy_<term>`` key-value pairs,
``forces_<term>``/``stress_<term>`` arrays in ``data``).

Data flow: reference (and physical terms) → **store** → descriptors/model.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from numpy.typing import NDArray

from deltaml.errors import ParameterError

__all__ = ["STORE_METADATA", "LabelStore", "label_key"]

#: Written to the database's metadata: units and meaning of the keys.
STORE_METADATA = {
    "format": "deltaml-labels",
    "format_version": 1,
    "units": {"energy": "eV", "forces": "eV/Å", "stress": "eV/Å^3 (Voigt xx yy zz yz xz xy)"},
    "keys": {
        "key": "sha256 of structure + charge + multiplicity + method record",
        "status": "done or failed",
        "error": "error message of a failed calculation",
        "total_charge": "total charge of the calculation, e",
        "multiplicity": "spin multiplicity 2S+1 of the calculation",
        "compute_seconds": "time of the calculation, s",
        "energy_<term>": "energy of a physical term on the same structure, eV",
    },
}

#: Positions are hashed after rounding to this many decimals (Å): numerically
#: identical structures written by different codes get the same key.
_HASH_DECIMALS = 6


def label_key(atoms: Atoms, record: dict[str, Any], charge: int = 0, multiplicity: int = 1) -> str:
    """Key of one calculation: SHA-256 of the structure and the method record.

    Parameters
    ----------
    atoms : ase.Atoms
        Structure (positions and cell in Å).
    record : dict
        Method record by value (JSON-serialisable), e.g. ``PySCFReference().record()``.
    charge : int, default=0
        Total charge, e.
    multiplicity : int, default=1
        Spin multiplicity 2S+1.

    Returns
    -------
    str
        64 hexadecimal characters.
    """
    digest = hashlib.sha256()
    digest.update(np.asarray(atoms.numbers, dtype=np.int64).tobytes())
    # + 0.0 turns -0.0 into 0.0, so that the sign of a zero does not change the key.
    for array in (atoms.positions, atoms.cell.array):
        digest.update((np.round(array, _HASH_DECIMALS) + 0.0).astype(np.float64).tobytes())
    digest.update(np.asarray(atoms.pbc, dtype=bool).tobytes())
    digest.update(f"{int(charge)}/{int(multiplicity)}".encode())
    digest.update(json.dumps(record, sort_keys=True, separators=(",", ":")).encode())
    return digest.hexdigest()


class LabelStore:
    """Labelled structures in an ``ase.db`` database, one row per calculation.

    Parameters
    ----------
    url : str or pathlib.Path
        SQLite file (``labels.db``) or a database URL (``postgresql://…``).

    Examples
    --------
    >>> store = LabelStore(tmp_path / "labels.db")
    >>> claim = store.claim(atoms, record)       # None if done, failed or in progress
    >>> if claim is not None:
    ...     store.put(atoms, record, energy=e, forces=f, claim=claim)
    """

    def __init__(self, url: str | Path) -> None:
        import ase.db

        self.url = str(url)
        self._db = ase.db.connect(self.url)
        metadata = self._db.metadata
        if metadata.get("format") not in (None, STORE_METADATA["format"]):
            raise ParameterError(f"{self.url} is not a deltaml label store: {metadata}")
        if metadata.get("format_version", 1) != STORE_METADATA["format_version"]:
            raise ParameterError(
                f"{self.url} has store format {metadata.get('format_version')}, this deltaml "
                f"reads format {STORE_METADATA['format_version']}"
            )
        if not metadata:
            self._db.metadata = STORE_METADATA

    def __len__(self) -> int:
        return self._db.count(status="done")

    def status(self, key: str) -> str | None:
        """``"done"``, ``"failed"``, ``"reserved"`` (in progress) or ``None``."""
        rows = list(self._db.select(key=key, limit=1))
        if not rows:
            return None
        return rows[0].get("status", "reserved")

    def claim(
        self, atoms: Atoms, record: dict[str, Any], charge: int = 0, multiplicity: int = 1
    ) -> int | None:
        """Reserve a calculation; ``None`` if it is done, failed or claimed elsewhere.

        The reservation is stamped with this process (``host:pid``), so that a later
        run can tell an abandoned claim from one still in progress.

        Returns
        -------
        int or None
            Row id of the reservation, to pass to :meth:`put` or :meth:`put_failure`.
        """
        claim = self._db.reserve(key=label_key(atoms, record, charge, multiplicity))
        if claim is not None:
            self._db.update(claim, owner=_owner())
        return claim

    def release_stale_claims(self, *, everyone: bool = False) -> int:
        """Delete reservations left by interrupted runs; returns how many.

        Parameters
        ----------
        everyone : bool, default=False
            False: only reservations of processes on this host that no longer run
            (a run killed with SIGKILL). True: every reservation, whoever holds it;
            use it only when no other process labels into the store.
        """
        stale = [
            row.id
            for row in self._db.select()
            if row.get("status") is None and (everyone or _abandoned(row.get("owner")))
        ]
        if stale:
            self._db.delete(stale)
        return len(stale)

    def release_claims(self, claims: set[int]) -> int:
        """Delete reservations (row ids from :meth:`claim`) that will not be filled."""
        ids = [
            row.id for row in self._db.select() if row.id in claims and row.get("status") is None
        ]
        if ids:
            self._db.delete(ids)
        return len(ids)

    def records(self) -> list[dict[str, Any]]:
        """The distinct reference method records of the done rows."""
        seen: dict[str, dict[str, Any]] = {}
        for row in self._db.select(status="done"):
            seen.setdefault(row.data["record"], json.loads(row.data["record"]))
        return list(seen.values())

    def put(
        self,
        atoms: Atoms,
        record: dict[str, Any],
        *,
        energy: float,
        forces: NDArray[np.float64] | None = None,
        stress: NDArray[np.float64] | None = None,
        terms: dict[str, dict[str, Any]] | None = None,
        charge: int = 0,
        multiplicity: int = 1,
        claim: int | None = None,
        compute_seconds: float | None = None,
    ) -> int:
        """Write one result at once, in its own transaction.

        Parameters
        ----------
        atoms : ase.Atoms
            Structure, Å.
        record : dict
            Method record of the reference.
        energy : float
            Reference energy, eV.
        forces : ndarray of shape (n_atoms, 3), optional
            Reference forces, eV/Å.
        stress : ndarray of shape (6,), optional
            Reference stress, eV/Å³, Voigt order.
        terms : dict, optional
            ``{"baseline": {"energy": eV, "forces": eV/Å, "record": {...}}, ...}``:
            other terms on the same structure, for Δ targets.
        charge, multiplicity : int
            Total charge (e) and 2S+1.
        claim : int, optional
            Row id from :meth:`claim`; the reservation is replaced.
        compute_seconds : float, optional
            Cost of the calculation, s (kept for reports).

        Returns
        -------
        int
            Row id.
        """
        forces = None if forces is None else _checked(forces, (len(atoms), 3), "forces")
        stress = None if stress is None else _checked(stress, (6,), "stress")
        labelled = atoms.copy()
        labelled.calc = SinglePointCalculator(
            labelled, energy=float(energy), forces=forces, stress=stress
        )
        pairs: dict[str, Any] = {
            "key": label_key(atoms, record, charge, multiplicity),
            "status": "done",
            "total_charge": int(charge),  # ase.db overwrites "charge" with sum(initial charges)
            "multiplicity": int(multiplicity),
        }
        if compute_seconds is not None:
            pairs["compute_seconds"] = float(compute_seconds)
        data: dict[str, Any] = {"record": json.dumps(record, sort_keys=True)}
        for name, values in (terms or {}).items():
            pairs[f"energy_{name}"] = float(values["energy"])
            for prop in ("forces", "stress"):
                if values.get(prop) is not None:
                    data[f"{prop}_{name}"] = np.asarray(values[prop], dtype=float)
            if values.get("record") is not None:
                data[f"record_{name}"] = json.dumps(values["record"], sort_keys=True)
        return self._db.write(labelled, key_value_pairs=pairs, data=data, id=claim)

    def put_failure(
        self,
        atoms: Atoms,
        record: dict[str, Any],
        error: str,
        *,
        charge: int = 0,
        multiplicity: int = 1,
        claim: int | None = None,
    ) -> int:
        """Record a failed calculation with its error (not retried unless asked)."""
        pairs = {
            "key": label_key(atoms, record, charge, multiplicity),
            "status": "failed",
            "error": str(error)[:2000],
            "total_charge": int(charge),  # ase.db overwrites "charge" with sum(initial charges)
            "multiplicity": int(multiplicity),
        }
        data = {"record": json.dumps(record, sort_keys=True)}
        return self._db.write(atoms, key_value_pairs=pairs, data=data, id=claim)

    def forget_failures(self, keys: set[str] | None = None) -> int:
        """Delete failed rows so that a new run retries them; returns how many.

        Parameters
        ----------
        keys : set of str, optional
            Only these calculations (from :func:`label_key`); default all failures.
        """
        ids = [
            row.id
            for row in self._db.select(status="failed")
            if keys is None or row.get("key") in keys
        ]
        if ids:
            self._db.delete(ids)
        return len(ids)

    def failures(self) -> dict[str, str]:
        """Failed calculations: ``{key: error message}``."""
        return {row.key: row.error for row in self._db.select(status="failed")}

    def get(self, key: str) -> Atoms | None:
        """The done row of one calculation as ``Atoms`` (see :meth:`labelled`), or None."""
        rows = list(self._db.select(key=key, status="done", limit=1))
        return _row_atoms(rows[0]) if rows else None

    def labelled(self) -> list[Atoms]:
        """All done rows as ``Atoms`` with their reference results and method record.

        ``info`` holds ``method_record`` (dict), ``label_key``, ``charge``,
        ``multiplicity``, ``compute_seconds`` where known, and the terms'
        ``energy_<term>`` (eV) and ``record_<term>`` (dict); ``arrays`` holds
        ``forces_<term>`` (eV/Å).
        """
        return [_row_atoms(row) for row in self._db.select(status="done", sort="id")]


def _row_atoms(row: Any) -> Atoms:
    atoms = row.toatoms()
    atoms.info["method_record"] = json.loads(row.data["record"])
    atoms.info["label_key"] = row.key
    pairs = row.key_value_pairs
    atoms.info["charge"] = int(pairs.get("total_charge", pairs.get("charge", 0)))
    for name in ("multiplicity", "compute_seconds"):
        if name in pairs:
            atoms.info[name] = pairs[name]
    for name, value in row.key_value_pairs.items():
        if name.startswith("energy_"):
            atoms.info[name] = value
    for name, value in row.data.items():
        if name.startswith("forces_"):
            atoms.arrays[name] = np.asarray(value, dtype=float)
        elif name.startswith("stress_"):
            atoms.info[name] = np.asarray(value, dtype=float)
        elif name.startswith("record_"):
            atoms.info[name] = json.loads(value)
    return atoms


def _owner() -> str:
    """This process as ``host:pid`` (read at call time: forked workers differ)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _abandoned(owner: str | None) -> bool:
    """True if ``owner`` (``host:pid``) is a process of this host that no longer runs."""
    if owner is None:
        return False
    host, _, pid = str(owner).rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by another user
        return False
    return False


def _checked(values: Any, shape: tuple[int, ...], name: str) -> NDArray[np.float64]:
    array = np.asarray(values, dtype=float)
    if array.shape != shape:
        raise ParameterError(f"{name} must have shape {shape}, got {array.shape}")
    if not np.isfinite(array).all():
        raise ParameterError(f"{name} contains NaN or infinite values")
    return array
