"""Store of labelled structures on ASE's database (``ase.db``).

Reference calculations are the scarce resource of the method: every result is
written the moment it arrives, in its own transaction, keyed by a hash of
structure + method record, so that the same calculation is never done twice and
killing the process loses at most the calculation in flight. SQLite by default
(a file path), PostgreSQL by URL (``postgresql://…``; ``pip install
'deltaml[postgres]'`` brings ase-db-backends and the psycopg2 driver).

There is one row per key. Claiming a calculation and writing its row are atomic
across processes: every write holds the store's lock, which is ase.db's lock file
(``labels.db.lock``) for SQLite and a PostgreSQL advisory lock for PostgreSQL. The
lock file records its owner (``host:pid:start``); a lock left by a killed process
is recognised and removed with a :class:`~deltaml.errors.StaleLockWarning`, and a
lock held by a live process for longer than ``lock_timeout`` raises
:class:`~deltaml.errors.StoreLockedError` naming the file (ase's own lock waits
forever). PostgreSQL releases an advisory lock by itself when its session ends.

A row holds the structure with the reference ``energy``/``forces``/``stress`` (as
ASE's single-point results), the status (``done`` or ``failed`` with its error),
the method record (JSON, in ``data``), and optionally the baseline's and
dispersion's values used to form Δ targets (``energy_<term>`` key-value pairs,
``forces_<term>``/``stress_<term>`` arrays in ``data``).

Data flow: reference (and physical terms) → **store** → descriptors/model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import psutil  # a dependency of distributed
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from numpy.typing import NDArray

from deltaml.errors import (
    ParameterError,
    StaleLockWarning,
    StoreBackendError,
    StoreConnectionError,
    StoreLockedError,
)
from deltaml.structures import structure_digest

__all__ = ["DEFAULT_LOCK_TIMEOUT", "STORE_METADATA", "LabelStore", "label_key"]

#: Written to the database's metadata: units and meaning of the keys.
STORE_METADATA = {
    "format": "deltaml-labels",
    "format_version": 1,
    "units": {"energy": "eV", "forces": "eV/Å", "stress": "eV/Å^3 (Voigt xx yy zz yz xz xy)"},
    "keys": {
        "key": "sha256 of structure + charge + multiplicity + method record",
        "status": "done or failed (absent: reserved by a running calculation)",
        "owner": "host:pid:start of the process that reserved the calculation",
        "error": "error message of a failed calculation",
        "total_charge": "total charge of the calculation, e",
        "multiplicity": "spin multiplicity 2S+1 of the calculation",
        "compute_seconds": "time of the calculation, s",
        "energy_<term>": "energy of a physical term on the same structure, eV",
    },
}

#: Positions are hashed after rounding to this many decimals (Å): numerically
#: identical structures written by different codes get the same key.

#: How long a write waits for the store's lock before it gives up, s. ase.db holds
#: it for one write (milliseconds) or one delete with its VACUUM (seconds for a
#: large file); a lock with no owner recorded is deemed stale once this old.
DEFAULT_LOCK_TIMEOUT = 120.0

#: A lock breaker (held for microseconds) with no live owner is stale after this, s.
_BREAKER_MAX_AGE = 5.0

#: PostgreSQL advisory lock of label stores: any fixed 63-bit number (here from a hash).
_ADVISORY_KEY = int(hashlib.sha256(b"deltaml-label-store").hexdigest()[:15], 16)

#: ase.db backends that a store accepts: those whose lock this module replaces.
_FILE_SUFFIXES = (".db", ".json")
_POSTGRESQL_PREFIXES = ("postgresql://", "postgres://")


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
    digest = structure_digest(hashlib.sha256(), atoms)
    digest.update(f"{int(charge)}/{int(multiplicity)}".encode())
    digest.update(json.dumps(record, sort_keys=True, separators=(",", ":")).encode())
    return digest.hexdigest()


class LabelStore:
    """Labelled structures in an ``ase.db`` database, one row per calculation.

    Parameters
    ----------
    url : str or pathlib.Path
        SQLite file (``labels.db``) or a database URL (``postgresql://…``).
    lock_timeout : float, default=:data:`DEFAULT_LOCK_TIMEOUT`
        How long a write waits for a lock held by a live process, s.

    Raises
    ------
    ParameterError
        Not a deltaml store, another store format, or another kind of database.
    StoreBackendError
        ``postgresql://`` without ase-db-backends or psycopg2 installed.
    StoreConnectionError
        The PostgreSQL server cannot be reached.
    StoreLockedError
        The store stayed locked by a live process for ``lock_timeout`` (also raised
        by every method that writes).

    Examples
    --------
    >>> store = LabelStore(tmp_path / "labels.db")
    >>> claim = store.claim(atoms, record)       # None if done, failed or in progress
    >>> if claim is not None:
    ...     store.put(atoms, record, energy=e, forces=f, claim=claim)
    """

    def __init__(self, url: str | Path, *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> None:
        self.url = str(url)
        self._db = _connect(self.url, lock_timeout)
        try:
            with self._db.lock:  # two processes may create the same store at once
                self._check_metadata()
        except _connection_errors(self._db) as exc:
            raise StoreConnectionError(
                f"cannot connect to the label store {_redacted(self.url)}: "
                f"{str(exc).strip().splitlines()[0]}"
            ) from exc

    def _check_metadata(self) -> None:
        metadata = self._db.metadata
        if metadata.get("format") not in (None, STORE_METADATA["format"]):
            raise ParameterError(f"{_redacted(self.url)} is not a deltaml label store: {metadata}")
        if metadata.get("format_version", 1) != STORE_METADATA["format_version"]:
            raise ParameterError(
                f"{_redacted(self.url)} has store format {metadata.get('format_version')}, "
                f"this deltaml reads format {STORE_METADATA['format_version']}"
            )
        if not metadata:
            self._db.metadata = STORE_METADATA

    def __len__(self) -> int:
        return self._db.count(status="done")

    def status(self, key: str) -> str | None:
        """``"done"``, ``"failed"``, ``"reserved"`` (in progress) or ``None``."""
        statuses = self._statuses(key)
        if not statuses:
            return None
        for status in ("done", "failed"):
            if status in statuses.values():
                return status
        return "reserved"

    def _statuses(self, key: str) -> dict[int, str | None]:
        """``{row id: status}`` of the rows of one key (None: a reservation)."""
        return {row.id: row.get("status") for row in self._db.select(key=key, include_data=False)}

    def claim(
        self, atoms: Atoms, record: dict[str, Any], charge: int = 0, multiplicity: int = 1
    ) -> int | None:
        """Reserve a calculation; ``None`` if it is done, failed or claimed elsewhere.

        The look-up and the reservation hold the store's lock together, so that of
        several processes claiming one calculation at once exactly one gets it. The
        reservation is stamped with this process (``host:pid:start``), so that a later
        run can tell an abandoned claim from one still in progress.

        Returns
        -------
        int or None
            Row id of the reservation, to pass to :meth:`put` or :meth:`put_failure`.
        """
        key = label_key(atoms, record, charge, multiplicity)
        with self._db.lock:
            if self._db.count(key=key):
                return None
            return self._db.write(Atoms(), key_value_pairs={"key": key, "owner": _owner()})

    def release_stale_claims(self, *, everyone: bool = False) -> int:
        """Delete reservations left by interrupted runs; returns how many.

        Parameters
        ----------
        everyone : bool, default=False
            False: only reservations of processes on this host that no longer run
            (a run killed with SIGKILL). True: every reservation, whoever holds it;
            use it only when no other process labels into the store.
        """
        with self._db.lock:
            stale = [
                row.id
                for row in self._db.select(include_data=False)
                if row.get("status") is None and (everyone or _abandoned(row.get("owner")))
            ]
            if stale:
                self._db.delete(stale)
        return len(stale)

    def release_claims(self, claims: set[int]) -> int:
        """Delete reservations (row ids from :meth:`claim`) that will not be filled."""
        if not claims:
            return 0
        with self._db.lock:  # a reservation filled meanwhile by another process stays
            ids = [
                row.id
                for row in self._db.select(include_data=False)
                if row.id in claims and row.get("status") is None
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
            Row id from :meth:`claim`; the reservation is replaced. Without it (or
            if it was released meanwhile) the row of the key is written all the same.
        compute_seconds : float, optional
            Cost of the calculation, s (kept for reports).

        Returns
        -------
        int
            Row id. A key that is done already keeps its first result and row.
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
        return self._write(labelled, pairs, data, claim)

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
        return self._write(atoms, pairs, data, claim)

    def _write(
        self, atoms: Atoms, pairs: dict[str, Any], data: dict[str, Any], claim: int | None
    ) -> int:
        """Write the one row of ``pairs["key"]``: into a reservation, or as a new row.

        Under the store's lock, so that no other process writes the same key
        between the look-up and the write: a done row is kept (the same
        calculation is never stored twice), a reservation (ours, else another
        process's, which then finds the key done) or a failure is overwritten.
        """
        with self._db.lock:
            rows = self._statuses(pairs["key"])
            done = [row for row, status in rows.items() if status == "done"]
            if done:
                return done[0]
            target = claim if claim in rows else next(iter(rows), None)
            written = self._db.write(atoms, key_value_pairs=pairs, data=data, id=target)
        return target if target is not None else written

    def forget_failures(self, keys: set[str] | None = None) -> int:
        """Delete failed rows so that a new run retries them; returns how many.

        Parameters
        ----------
        keys : set of str, optional
            Only these calculations (from :func:`label_key`); default all failures.
        """
        with self._db.lock:
            ids = [
                row.id
                for row in self._db.select(status="failed", include_data=False)
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
    """This process as ``host:pid:start`` (read at call time: forked workers differ).

    The start time (s since the epoch) tells a process from a later one that was
    given the same pid.
    """
    return f"{socket.gethostname()}:{os.getpid()}:{_start_time(os.getpid())}"


def _start_time(pid: int) -> str:
    """Start time of process ``pid``, s since the epoch (2 decimals); "" if unknown."""
    try:
        return f"{psutil.Process(pid).create_time():.2f}"
    except psutil.Error:
        return ""


def _abandoned(owner: str | None) -> bool:
    """True if ``owner`` (``host:pid[:start]``) is a process of this host that no longer runs.

    A zombie no longer runs, nor does a process that has the pid but started at
    another time (the pid was given again).
    """
    if not owner:
        return False
    host, pid, start = ([*str(owner).split(":"), ""])[:3]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        process = psutil.Process(int(pid))
        if process.status() == psutil.STATUS_ZOMBIE:
            return True
        return bool(start) and f"{process.create_time():.2f}" != start
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:  # alive, owned by another user
        return False


def _redacted(url: str) -> str:
    """The URL with its password hidden, for messages."""
    return re.sub(r"://([^:/@]*):[^@/]*@", r"://\1:***@", url)


def _connect(url: str, lock_timeout: float) -> Any:
    """ase.db connection whose lock times out and recognises stale owners."""
    import ase.db

    if url.startswith(_POSTGRESQL_PREFIXES):
        db = _postgresql_class(url)(url)
        db.lock = _AdvisoryLock(url, lock_timeout)
        return db
    if os.path.splitext(url)[1] not in _FILE_SUFFIXES:
        raise ParameterError(
            f"{_redacted(url)}: a label store is an SQLite file (.db), a JSON file (.json) "
            "or a postgresql:// URL"
        )
    db = ase.db.connect(url)
    db.lock = _FileLock(db.lock.name, lock_timeout)
    return db


def _postgresql_class(url: str) -> type:
    """ase-db-backends' PostgreSQL database, with row ids that are this session's."""
    try:
        from ase_db_backends.postgresql import PostgreSQLDatabase
    except ModuleNotFoundError as exc:
        missing = "ase-db-backends" if "ase_db_backends" in str(exc.name) else exc.name
        raise StoreBackendError(
            f"{_redacted(url)}: PostgreSQL label stores need ase-db-backends and the "
            f"psycopg2 driver ({missing} is missing): pip install 'deltaml[postgres]'"
        ) from exc

    class Database(PostgreSQLDatabase):
        def get_last_id(self, cur: Any) -> int:
            # ase-db-backends reads the sequence's last_value, which is the last id
            # handed to any session; lastval() is the one of this connection's insert.
            cur.execute("SELECT lastval()")
            return int(cur.fetchone()[0])

    return Database


def _connection_errors(db: Any) -> tuple[type[BaseException], ...]:
    """Exceptions of a database driver that mean "cannot connect"."""
    if getattr(db, "type", None) != "postgresql":
        return ()
    import psycopg2

    return (psycopg2.OperationalError,)


class _StoreLock:
    """Reentrant lock of a store's writes, in ase.db's ``lock`` slot (used with ``with``).

    Reentrant, so that a method holding it may call ase.db's methods that take it
    again; within one process, threads take turns.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = float(timeout)
        self._depth = 0
        self._mutex = threading.RLock()

    def __enter__(self) -> None:
        self._mutex.acquire()
        try:
            if self._depth == 0:
                self._acquire_once()
        except BaseException:
            self._mutex.release()
            raise
        self._depth += 1

    def __exit__(self, *exc_info: object) -> None:
        self._depth -= 1
        try:
            if self._depth == 0:
                self._release_once()
        finally:
            self._mutex.release()

    def _acquire_once(self) -> None:
        raise NotImplementedError

    def _release_once(self) -> None:
        raise NotImplementedError


class _FileLock(_StoreLock):
    """ase.db's lock file (``labels.db.lock``), with its owner recorded.

    The file is created exclusively, as ase's own lock does, so the two exclude
    each other. It holds ``host:pid:start``; a lock whose owner no longer runs on
    this host, or that records no owner (ase's own) and is older than the
    timeout, is stale and removed with a warning.

    Parameters
    ----------
    path : str
        The lock file.
    timeout : float
        How long to wait for a live owner, s.
    """

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__(timeout)
        self.path = str(path)

    def _acquire_once(self) -> None:
        deadline = time.monotonic() + self.timeout
        delay = 0.005
        while not (_create_exclusive(self.path) or _break_if_stale(self.path, self.timeout)):
            if time.monotonic() > deadline:
                raise StoreLockedError(self._locked_message())
            time.sleep(delay)
            delay = min(2 * delay, 0.05)  # short: the holder may take it again at once

    def _release_once(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)

    def _locked_message(self) -> str:
        state = _lock_state(self.path)
        owner = (state[0] or "a process that recorded no owner") if state else "nobody now"
        return (
            f"the label store is locked: {self.path} is held by {owner} (waited "
            f"{self.timeout:g} s); another process is writing to the store. If none is "
            f"(e.g. its owner ran on another host and was killed), delete {self.path}"
        )


def _create_exclusive(path: str) -> bool:
    """Create ``path`` holding this process's owner string; False if it exists."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(_owner())
    except BaseException:  # e.g. a full disk: leave no lock behind
        os.remove(path)
        raise
    return True


def _lock_state(path: str) -> tuple[str, int, int] | None:
    """(owner, mtime in ns, inode) of a lock file, or None if there is none."""
    try:
        with open(path) as handle:
            owner = handle.read(200).strip()
            info = os.fstat(handle.fileno())
    except FileNotFoundError:
        return None
    return owner, info.st_mtime_ns, info.st_ino


def _is_stale(state: tuple[str, int, int] | None, max_age: float) -> bool:
    """A lock whose owner is dead here, or with no owner and older than ``max_age`` s."""
    if state is None:
        return False
    owner, mtime_ns, _ = state
    if owner:
        return _abandoned(owner)
    return time.time() - mtime_ns / 1e9 > max_age


def _break_if_stale(path: str, max_age: float) -> bool:
    """Remove the lock ``path`` if it is stale; True if the caller now holds it.

    Breaking takes a second lock (``path.break``), so that of several processes
    that find one stale lock exactly one removes it, and only that lock: it is
    read again under the breaker and kept if it changed meanwhile.
    """
    state = _lock_state(path)
    if not _is_stale(state, max_age):
        return False
    breaker = path + ".break"
    if not _create_exclusive(breaker):
        if _is_stale(_lock_state(breaker), _BREAKER_MAX_AGE):
            with contextlib.suppress(FileNotFoundError):
                os.remove(breaker)
        return False
    try:
        if _lock_state(path) != state:
            return False
        os.remove(path)
        held = _create_exclusive(path)
    finally:
        os.remove(breaker)
    owner = state[0] or f"no owner recorded, {time.time() - state[1] / 1e9:.0f} s old"
    warnings.warn(f"removed the stale lock {path} ({owner})", StaleLockWarning, stacklevel=2)
    return held


class _AdvisoryLock(_StoreLock):
    """A PostgreSQL session-level advisory lock on its own connection.

    The server releases it when the session ends, so a killed process leaves
    no stale lock; the application name of the connection names its owner.
    """

    def __init__(self, url: str, timeout: float) -> None:
        super().__init__(timeout)
        self.url = url
        self._connection: Any = None

    def _cursor(self) -> Any:
        if self._connection is None or self._connection.closed:
            import psycopg2

            name = f"deltaml pid {os.getpid()} on {socket.gethostname()}"
            self._connection = psycopg2.connect(self.url, application_name=name[:63])
            self._connection.autocommit = True
        return self._connection.cursor()

    def _acquire_once(self) -> None:
        """Wait in the server's queue (first come, first served), up to the timeout."""
        import psycopg2.errors

        with self._cursor() as cursor:
            # lock_timeout 0 would mean "wait forever"
            cursor.execute("SET lock_timeout = %s", (f"{max(1, round(self.timeout * 1000))}ms",))
            try:
                cursor.execute("SELECT pg_advisory_lock(%s)", (_ADVISORY_KEY,))
            except psycopg2.errors.LockNotAvailable as exc:
                raise StoreLockedError(self._locked_message()) from exc

    def _release_once(self) -> None:
        import psycopg2

        try:
            with self._cursor() as cursor:
                cursor.execute("SELECT pg_advisory_unlock(%s)", (_ADVISORY_KEY,))
        except psycopg2.Error:  # the session is gone, and its lock with it
            self._connection = None

    def _locked_message(self) -> str:
        query = (
            "SELECT a.application_name, a.client_addr, a.pid FROM pg_locks l "
            "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' "
            "AND l.granted AND l.classid = %s AND l.objid = %s AND l.objsubid = 1 "
            "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        with self._cursor() as cursor:
            cursor.execute(query, (_ADVISORY_KEY >> 32, _ADVISORY_KEY & 0xFFFFFFFF))
            row = cursor.fetchone()
        holder = "nobody now" if row is None else f"{row[0] or 'a client'} (server pid {row[2]})"
        return (
            f"the label store {_redacted(self.url)} is locked by {holder} (waited "
            f"{self.timeout:g} s): another process is writing to the store"
        )


def _checked(values: Any, shape: tuple[int, ...], name: str) -> NDArray[np.float64]:
    array = np.asarray(values, dtype=float)
    if array.shape != shape:
        raise ParameterError(f"{name} must have shape {shape}, got {array.shape}")
    if not np.isfinite(array).all():
        raise ParameterError(f"{name} contains NaN or infinite values")
    return array
