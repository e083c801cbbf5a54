"""Tests of deltaml.store: the ase.db store of labelled structures."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from ase.build import molecule

from deltaml.errors import ParameterError
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
