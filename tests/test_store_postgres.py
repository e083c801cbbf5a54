"""deltaml.store on a real PostgreSQL server, started here for the tests.

The server (Debian's ``postgresql`` package: ``initdb`` and ``pg_ctl``) runs on
127.0.0.1 at a free port in a temporary folder and is stopped after the tests;
they skip where its binaries, or the ``postgres`` extra (ase-db-backends and
psycopg2), are missing. initdb refuses to run as root, so as root it runs as the
``postgres`` user.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections import Counter
from collections.abc import Iterator

import numpy as np
import pytest
from ase.build import molecule
from ase.io import write

from deltaml.errors import StoreConnectionError, StoreLockedError
from deltaml.labelling import label_structures
from deltaml.store import LabelStore, label_key

psycopg2 = pytest.importorskip("psycopg2", reason="the postgres extra is not installed")
pytest.importorskip("ase_db_backends", reason="the postgres extra is not installed")

RECORD = {"code": "test", "method": "toy", "basis": "none"}
#: Small basis: the resume test checks the runner, not the chemistry.
REFERENCE = {"basis": "sto-3g", "grid_level": 1}


def _server_bin() -> str | None:
    """Folder holding initdb and pg_ctl (PATH first, then Debian's versioned folders)."""
    found = shutil.which("pg_ctl")
    folders = [os.path.dirname(found)] if found else []
    folders += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version, reverse=True)
    for folder in folders:
        if all(os.access(os.path.join(folder, name), os.X_OK) for name in ("initdb", "pg_ctl")):
            return folder
    return None


def _version(folder: str) -> float:
    try:
        return float(folder.split("/")[-2])
    except ValueError:
        return 0.0


def _as_server_user(command: list[str]) -> list[str]:
    """The command as the ``postgres`` user when run as root (initdb refuses root)."""
    if os.geteuid() != 0:
        return command
    if shutil.which("runuser"):
        return ["runuser", "-u", "postgres", "--", *command]
    return ["su", "postgres", "-s", "/bin/sh", "-c", shlex.join(command)]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[str]:
    """URL (without database) of a PostgreSQL server that trusts user ``deltaml``."""
    folder = _server_bin()
    if folder is None:
        pytest.skip(
            "PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql"
        )
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root, and initdb refuses root: no postgres user to run it as")
    work = tempfile.mkdtemp(prefix="deltaml-pg-")
    if os.geteuid() == 0:
        os.chown(work, user.pw_uid, user.pw_gid)
    data, log, port = os.path.join(work, "data"), os.path.join(work, "log"), _free_port()
    initdb = [f"{folder}/initdb", "-D", data, "-U", "deltaml", "--auth=trust", "-E", "UTF8"]
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {work} -F"
    start = [f"{folder}/pg_ctl", "-D", data, "-l", log, "-w", "-t", "60", "-o", options, "start"]
    try:
        for command in ([*initdb, "--no-sync"], start):
            done = subprocess.run(_as_server_user(command), capture_output=True, text=True)
            if done.returncode != 0:
                server_log = open(log).read() if os.path.exists(log) else ""
                pytest.fail(f"{command[0]} failed: {done.stderr}{done.stdout}{server_log}")
        yield f"postgresql://deltaml@127.0.0.1:{port}"
    finally:
        stop = [f"{folder}/pg_ctl", "-D", data, "-m", "immediate", "-w", "stop"]
        subprocess.run(_as_server_user(stop), capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def url(postgres_server: str) -> str:
    """A new, empty database on the test server."""
    name = f"labels_{uuid.uuid4().hex[:12]}"
    connection = psycopg2.connect(f"{postgres_server}/postgres")
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name}")
    connection.close()
    return f"{postgres_server}/{name}"


def _waters(count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(count):
        atoms = molecule("H2O")
        atoms.positions += rng.normal(scale=0.04, size=atoms.positions.shape)
        frames.append(atoms)
    return frames


def _rows_per_key(url: str) -> Counter:
    """How many rows each key has (reservations, failures and done rows), read by ase.db."""
    import ase.db

    return Counter(row.key for row in ase.db.connect(url).select(include_data=False))


def _run(script: str, *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args], text=True, **kwargs
    )


def test_round_trip(url, water):
    store = LabelStore(url)
    forces = np.arange(9.0).reshape(3, 3) / 10
    stress = np.array([0.1, 0.2, 0.3, 0.01, 0.02, 0.03])
    claim = store.claim(water, RECORD)
    assert store.claim(water, RECORD) is None  # in progress
    store.put(
        water,
        RECORD,
        energy=-2076.5,
        forces=forces,
        stress=stress,
        terms={"baseline": {"energy": -137.9, "forces": forces * 2, "record": {"m": "x"}}},
        claim=claim,
        compute_seconds=1.5,
    )
    other = _waters(1)[0]
    store.put_failure(other, RECORD, "SCF not converged", claim=store.claim(other, RECORD))

    reopened = LabelStore(url)
    (row,) = reopened.labelled()
    assert row.get_potential_energy() == -2076.5
    np.testing.assert_allclose(row.get_forces(), forces)
    np.testing.assert_allclose(row.get_stress(voigt=True), stress)
    np.testing.assert_allclose(row.positions, water.positions)
    assert row.info["method_record"] == RECORD
    assert row.info["energy_baseline"] == -137.9
    assert row.info["record_baseline"] == {"m": "x"}
    np.testing.assert_allclose(row.arrays["forces_baseline"], forces * 2)
    assert row.info["compute_seconds"] == 1.5
    assert reopened.records() == [RECORD]
    assert reopened.status(label_key(water, RECORD)) == "done"
    assert reopened.failures() == {label_key(other, RECORD): "SCF not converged"}
    assert reopened.get(label_key(water, RECORD)).get_potential_energy() == -2076.5
    assert len(reopened) == 1
    assert reopened.forget_failures() == 1
    assert _rows_per_key(url) == {label_key(water, RECORD): 1}


def test_a_killed_run_resumes(url, tmp_path):
    """A run killed with SIGKILL leaves two labels and one claim; the next run resumes."""
    frames = _waters(3, seed=1)
    script = f"""
        import os, signal, sys
        import numpy as np
        from ase.io import read
        from deltaml.reference import PySCFReference
        from deltaml.store import LabelStore
        store = LabelStore(sys.argv[1])
        record = PySCFReference(**{REFERENCE!r}).record()
        frames = [read(sys.argv[2], index=i) for i in range(3)]
        for atoms in frames[:2]:
            store.put(atoms, record, energy=-1.0, forces=np.zeros((3, 3)),
                      claim=store.claim(atoms, record))
        assert store.claim(frames[2], record) is not None
        os.kill(os.getpid(), signal.SIGKILL)
    """
    write(tmp_path / "frames.extxyz", frames)
    killed = _run(script, url, str(tmp_path / "frames.extxyz"))
    assert killed.wait(timeout=120) == -signal.SIGKILL
    store = LabelStore(url)
    assert len(store) == 2

    report = label_structures(
        frames, store, reference=REFERENCE, baseline=None, dispersion=None, workers=1,
        progress=False,
    )  # fmt: skip
    assert (report.already_done, report.computed, report.in_progress) == (2, 1, 0)
    assert len(store) == 3
    assert sorted(a.get_potential_energy() for a in store.labelled())[-2:] == [-1.0, -1.0]
    assert set(_rows_per_key(url).values()) == {1}


def test_concurrent_claimers_never_compute_a_key_twice(url, tmp_path):
    """Two processes claim the same 30 calculations at the same moment."""
    script = f"""
        import json, os, sys, time
        from ase.build import molecule
        from deltaml.store import LabelStore
        store = LabelStore(sys.argv[1])
        while not os.path.exists(sys.argv[2]):
            time.sleep(0.01)
        claims = {{}}
        for i in range(30):  # claim everything first, as label_structures does
            atoms = molecule("H2O")
            atoms.positions[0, 0] += 0.01 * i
            claim = store.claim(atoms, {RECORD!r})
            if claim is not None:
                claims[i] = (atoms, claim)
        for i, (atoms, claim) in claims.items():
            store.put(atoms, {RECORD!r}, energy=float(i), claim=claim)
        print(json.dumps(sorted(claims)))
    """
    LabelStore(url)  # create the tables once
    go = tmp_path / "go"
    claimers = [_run(script, url, str(go), stdout=subprocess.PIPE) for _ in range(2)]
    try:
        time.sleep(4)  # both import deltaml and connect, then start together
        go.touch()
        outputs = [claimer.communicate(timeout=240)[0] for claimer in claimers]
    finally:
        for claimer in claimers:
            claimer.kill()
            claimer.wait()
    assert [claimer.returncode for claimer in claimers] == [0, 0]
    first, second = (set(json.loads(output)) for output in outputs)
    assert not first & second  # no calculation was given to both
    assert first | second == set(range(30))
    rows = _rows_per_key(url)
    assert len(rows) == 30 and set(rows.values()) == {1}
    energies = sorted(a.get_potential_energy() for a in LabelStore(url).labelled())
    assert energies == [float(i) for i in range(30)]


_HOLD_LOCK = """
    import sys, time
    from deltaml.store import LabelStore
    store = LabelStore(sys.argv[1])
    store._db.lock.__enter__()
    print("locked", flush=True)
    time.sleep(600)
"""


def test_a_locked_store_times_out_and_a_killed_holder_releases_it(url, water):
    LabelStore(url)
    holder = _run(_HOLD_LOCK, url, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        with pytest.raises(StoreLockedError, match=rf"is locked by deltaml pid {holder.pid} on"):
            LabelStore(url, lock_timeout=0.5)
        assert 0.5 <= time.monotonic() - started < 10
    finally:
        holder.kill()
        holder.wait()
    started = time.monotonic()
    store = LabelStore(url, lock_timeout=30)  # the server ended the killed holder's session
    store.put(water, RECORD, energy=-1.0)
    assert time.monotonic() - started < 10
    assert len(store) == 1


def test_an_unreachable_server_is_one_clear_line():
    """No server needed: a port where none listens."""
    url = f"postgresql://deltaml:secret@127.0.0.1:{_free_port()}/labels"
    with pytest.raises(StoreConnectionError) as caught:
        LabelStore(url)
    message = str(caught.value)
    assert message.startswith("cannot connect to the label store postgresql://deltaml:***@")
    assert "secret" not in message and "\n" not in message
