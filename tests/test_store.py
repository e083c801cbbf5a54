"""Tests of deltaml.store: the ase.db store of labelled structures."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule
from ase.io import read, write

from deltaml.errors import ParameterError, StaleLockWarning, StoreBackendError, StoreLockedError
from deltaml.store import LabelStore, label_key

RECORD = {"code": "test", "method": "toy", "basis": "none"}


def _frames(count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    base = molecule("H2O")
    frames = []
    for _ in range(count):
        atoms = base.copy()
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
        frames.append(atoms)
    return frames


def _within(seconds: float, function: Callable[[], Any]) -> Any:
    """``function()`` run in a thread: fails the test instead of hanging it."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = function()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still waiting after {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _put_warned(path, atoms, energy: float, lock_timeout: float | None = None):
    """Open the store and write one row; the store and the stale-lock warnings."""
    options = {} if lock_timeout is None else {"lock_timeout": lock_timeout}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store = LabelStore(path, **options)
        store.put(atoms, RECORD, energy=energy)
    return store, [str(w.message) for w in caught if w.category is StaleLockWarning]


def _dead_pid() -> int:
    """The pid of a process that has ended (and was reaped)."""
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True
    )
    return int(done.stdout)


def test_key_ignores_round_off_but_not_the_method(water):
    key = label_key(water, RECORD)
    nudged = water.copy()
    nudged.positions += 1e-9
    assert label_key(nudged, RECORD) == key
    moved = water.copy()
    moved.positions[0, 0] += 1e-4
    assert label_key(moved, RECORD) != key
    assert label_key(water, {**RECORD, "basis": "def2-svp"}) != key
    assert label_key(water, RECORD, charge=1, multiplicity=2) != key


def test_key_survives_an_extxyz_round_trip(tmp_path):
    # Generated coordinates are full doubles; extxyz keeps 8 decimals. Rounded
    # straight to 1e-6 Å, about 1 % of coordinates change side on the way back.
    rng = np.random.default_rng(3)
    cell = np.diag([14.0, 15.0, 16.0]) + rng.normal(scale=0.3, size=(3, 3))
    atoms = Atoms("H300", positions=rng.random((300, 3)) @ cell, cell=cell, pbc=True)
    write(tmp_path / "cell.extxyz", atoms)
    again = read(tmp_path / "cell.extxyz")
    assert np.abs(again.positions - atoms.positions).max() > 0  # really rounded
    assert label_key(again, RECORD) == label_key(atoms, RECORD)


def test_put_and_read_back(tmp_path, water):
    store = LabelStore(tmp_path / "labels.db")
    forces = np.arange(9.0).reshape(3, 3) / 10
    store.put(
        water,
        RECORD,
        energy=-2076.5,
        forces=forces,
        terms={"baseline": {"energy": -137.9, "forces": forces * 2}},
    )
    (row,) = store.labelled()
    assert row.get_potential_energy() == -2076.5
    np.testing.assert_allclose(row.get_forces(), forces)
    np.testing.assert_allclose(row.positions, water.positions)
    assert row.info["method_record"] == RECORD
    assert row.info["energy_baseline"] == -137.9
    np.testing.assert_allclose(row.arrays["forces_baseline"], forces * 2)
    assert len(LabelStore(tmp_path / "labels.db")) == 1  # persisted


def test_claims_prevent_repeating_a_calculation(tmp_path, water):
    store = LabelStore(tmp_path / "labels.db")
    claim = store.claim(water, RECORD)
    assert claim is not None
    assert store.claim(water, RECORD) is None  # in progress elsewhere
    assert store.status(label_key(water, RECORD)) == "reserved"
    store.put(water, RECORD, energy=-1.0, claim=claim)
    assert store.status(label_key(water, RECORD)) == "done"
    assert store.claim(water, RECORD) is None  # done
    assert len(store) == 1


def test_stale_claims_and_failures(tmp_path):
    store = LabelStore(tmp_path / "labels.db")
    first, second = _frames(2)
    store.claim(first, RECORD)  # a run killed before writing its result
    claim = store.claim(second, RECORD)
    store.put_failure(second, RECORD, "SCF not converged in 100 cycles", claim=claim)
    assert store.status(label_key(second, RECORD)) == "failed"
    assert store.release_stale_claims() == 0  # held by this (running) process
    assert store.release_stale_claims(everyone=True) == 1
    assert store.claim(first, RECORD) is not None
    assert store.claim(second, RECORD) is None  # failures are not retried ...
    assert store.forget_failures() == 1
    assert store.claim(second, RECORD) is not None  # ... unless asked


def test_bad_shapes_are_refused(tmp_path, water):
    store = LabelStore(tmp_path / "labels.db")
    with pytest.raises(ParameterError, match=r"forces must have shape \(3, 3\), got \(3,\)"):
        store.put(water, RECORD, energy=0.0, forces=np.zeros(3))
    with pytest.raises(ParameterError, match="stress contains NaN"):
        store.put(water, RECORD, energy=0.0, stress=np.full(6, np.nan))
    assert len(store) == 0


def test_a_foreign_database_is_refused(tmp_path):
    import ase.db

    other = ase.db.connect(tmp_path / "other.db")
    other.metadata = {"format": "something-else"}
    with pytest.raises(ParameterError, match="not a deltaml label store"):
        LabelStore(tmp_path / "other.db")


def test_two_concurrent_writers_lose_nothing(tmp_path):
    """Two processes write 25 rows each into one SQLite file at the same time."""
    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        from ase.build import molecule
        from deltaml.store import LabelStore
        store = LabelStore({str(tmp_path / "labels.db")!r})
        offset = int(sys.argv[1])
        for i in range(25):
            atoms = molecule("H2O")
            atoms.positions[0, 0] += 0.01 * (offset + i)
            claim = store.claim(atoms, {RECORD!r})
            store.put(atoms, {RECORD!r}, energy=float(offset + i), claim=claim)
        """
    )
    LabelStore(tmp_path / "labels.db")  # create it (and its metadata) once
    writers = [subprocess.Popen([sys.executable, "-c", script, str(k)]) for k in (0, 100)]
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    energies = sorted(
        a.get_potential_energy() for a in LabelStore(tmp_path / "labels.db").labelled()
    )
    assert energies == [float(i) for i in (*range(25), *range(100, 125))]


def test_claims_of_a_dead_process_are_released(tmp_path):
    """A run killed with SIGKILL leaves a reservation that the next run may take over."""
    water = molecule("H2O")
    script = textwrap.dedent(
        f"""
        from ase.build import molecule
        from deltaml.store import LabelStore
        assert LabelStore({str(tmp_path / "labels.db")!r}).claim(molecule("H2O"), {RECORD!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    store = LabelStore(tmp_path / "labels.db")
    assert store.claim(water, RECORD) is None  # reserved by the dead process
    mine = store.claim(_frames(1)[0], RECORD)
    assert store.release_stale_claims() == 1  # the dead one's, not mine
    assert store.status(label_key(_frames(1)[0], RECORD)) == "reserved"
    assert store.claim(water, RECORD) is not None
    assert store.release_claims({mine}) == 1
    assert store.status(label_key(_frames(1)[0], RECORD)) is None


#: Holds the store's lock as a write in progress does, until killed.
_HOLD_LOCK = """
import sys, time
from ase import Atoms
from ase.build import molecule
from ase.io import read, write
from deltaml.store import LabelStore
store = LabelStore(sys.argv[1])
store.put(molecule("H2O"), {"code": "test", "method": "toy", "basis": "none"}, energy=-1.0)
store._db.lock.__enter__()
print("locked", flush=True)
time.sleep(600)
"""


def _hold_lock(path) -> subprocess.Popen:
    """A process that wrote one row and now holds the store's lock."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_the_lock_of_a_killed_writer_is_removed_without_losing_data(tmp_path, water):
    """SIGKILL during a write leaves labels.db.lock; ase.db alone then waits forever."""
    path, lock = tmp_path / "labels.db", f"{tmp_path / 'labels.db'}.lock"
    holder = _hold_lock(path)
    holder.kill()
    holder.wait()
    assert os.path.exists(lock)  # what the killed run left behind

    store, warned = _within(60, lambda: _put_warned(path, water, -2.0))
    owner = f"{socket.gethostname()}:{holder.pid}:"
    assert len(warned) == 1
    assert re.fullmatch(rf"removed the stale lock {re.escape(lock)} \({owner}[\d.]*\)", warned[0])
    assert sorted(a.get_potential_energy() for a in store.labelled()) == [-2.0, -1.0]
    assert not os.path.exists(lock)


def test_a_lock_held_by_a_live_process_times_out_naming_the_file(tmp_path):
    path, lock = tmp_path / "labels.db", f"{tmp_path / 'labels.db'}.lock"
    holder = _hold_lock(path)
    try:
        owner = f"{socket.gethostname()}:{holder.pid}:"
        started = time.monotonic()
        with pytest.raises(StoreLockedError, match=rf"{re.escape(lock)} is held by {owner}"):
            _within(30, lambda: LabelStore(path, lock_timeout=0.5))
        assert 0.5 <= time.monotonic() - started < 10
        assert os.path.exists(lock)  # a live owner's lock is never removed
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_of_a_reused_pid_is_stale(tmp_path, water):
    """The owner's start time tells a live process that was given a dead one's pid."""
    LabelStore(tmp_path / "labels.db")
    lock = tmp_path / "labels.db.lock"
    lock.write_text(f"{socket.gethostname()}:{os.getpid()}:1.00")  # this pid, another start
    store, warned = _within(60, lambda: _put_warned(tmp_path / "labels.db", water, -1.0))
    assert warned == [f"removed the stale lock {lock} ({socket.gethostname()}:{os.getpid()}:1.00)"]
    assert len(store) == 1


def test_a_lock_without_owner_is_stale_once_older_than_the_timeout(tmp_path, water):
    """ase's own lock (and deltaml's before this one) records no owner: the file is empty."""
    path, lock = tmp_path / "labels.db", tmp_path / "labels.db.lock"
    LabelStore(path)
    lock.touch()
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    _, warned = _within(60, lambda: _put_warned(path, water, -1.0))
    assert [re.sub(r"\d+ s old", "N s old", w) for w in warned] == [
        f"removed the stale lock {lock} (no owner recorded, N s old)"
    ]
    lock.touch()  # a fresh one may be a live ase.db write: waited for, up to the timeout
    started = time.monotonic()
    store, warned = _within(60, lambda: _put_warned(path, _frames(1)[0], -2.0, lock_timeout=1.0))
    assert 1.0 <= time.monotonic() - started < 20
    assert len(warned) == 1 and len(store) == 2


def test_writers_racing_past_a_stale_lock_lose_nothing(tmp_path):
    """Two processes find one stale lock: one removes it, both write everything."""
    script = textwrap.dedent(
        f"""
        import sys
        from ase.build import molecule
        from deltaml.store import LabelStore
        store = LabelStore({str(tmp_path / "labels.db")!r})
        offset = int(sys.argv[1])
        for i in range(10):
            atoms = molecule("H2O")
            atoms.positions[0, 0] += 0.01 * (offset + i)
            claim = store.claim(atoms, {RECORD!r})
            store.put(atoms, {RECORD!r}, energy=float(offset + i), claim=claim)
        """
    )
    LabelStore(tmp_path / "labels.db")
    (tmp_path / "labels.db.lock").write_text(f"{socket.gethostname()}:{_dead_pid()}:")
    writers = [
        subprocess.Popen(
            [sys.executable, "-W", "always", "-c", script, str(k)],
            stderr=subprocess.PIPE,
            text=True,
        )
        for k in (0, 100)
    ]
    try:
        errors = [w.communicate(timeout=120)[1] for w in writers]
    finally:
        for writer in writers:
            writer.kill()
            writer.wait()
    assert [w.returncode for w in writers] == [0, 0], errors
    assert sum(e.count("StaleLockWarning: removed the stale lock") for e in errors) == 1
    energies = sorted(
        a.get_potential_energy() for a in LabelStore(tmp_path / "labels.db").labelled()
    )
    assert energies == [float(i) for i in (*range(10), *range(100, 110))]


def test_one_row_per_key_whoever_writes_it(tmp_path, water):
    """A result whose reservation was taken away is neither lost nor stored twice."""
    store = LabelStore(tmp_path / "labels.db")
    mine = store.claim(water, RECORD)
    assert store.release_stale_claims(everyone=True) == 1  # another run cleared the store
    theirs = store.claim(water, RECORD)  # ... and claimed the calculation again
    assert store.put(water, RECORD, energy=-1.0, claim=mine) == theirs  # into their reservation
    assert store.put(water, RECORD, energy=-3.0, claim=theirs) == theirs  # the first result stays
    store.put_failure(water, RECORD, "SCF not converged")  # a failure never replaces a result
    store.put(water, RECORD, energy=-5.0)  # nor does a write without a claim
    (row,) = store.labelled()
    assert row.get_potential_energy() == -1.0
    assert store.failures() == {}
    assert store.status(label_key(water, RECORD)) == "done"


@pytest.mark.parametrize("missing", ["ase_db_backends", "psycopg2"])
def test_postgresql_without_its_packages_is_one_clear_line(monkeypatch, missing):
    monkeypatch.delitem(sys.modules, "ase_db_backends.postgresql", raising=False)
    monkeypatch.setitem(sys.modules, missing, None)  # as if not installed
    package = {"ase_db_backends": "ase-db-backends", "psycopg2": "psycopg2"}[missing]
    with pytest.raises(StoreBackendError) as caught:
        LabelStore("postgresql://deltaml:secret@127.0.0.1:5432/labels")
    assert str(caught.value) == (
        "postgresql://deltaml:***@127.0.0.1:5432/labels: PostgreSQL label stores need "
        f"ase-db-backends and the psycopg2 driver ({package} is missing): "
        "pip install 'deltaml[postgres]'"
    )


def test_other_databases_are_refused(tmp_path):
    with pytest.raises(ParameterError, match=r"labels\.aselmdb: a label store is an SQLite file"):
        LabelStore(tmp_path / "labels.aselmdb")
