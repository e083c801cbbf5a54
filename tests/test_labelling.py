"""Labelling runner: labels equal direct calls, skip/retry rules, SIGKILL resume, Dask."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import psutil
import pytest
from ase import Atoms
from ase.build import molecule
from ase.io import write

from deltaml import labelling
from deltaml.baseline import XTBBaseline
from deltaml.dispersion import D3Dispersion
from deltaml.labelling import label_structures
from deltaml.reference import PySCFReference
from deltaml.store import LabelStore, label_key

#: Small basis: these tests check the runner, not the chemistry.
REFERENCE = {"basis": "sto-3g", "grid_level": 1}


def _waters(count: int, seed: int = 0) -> list[Atoms]:
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(count):
        atoms = molecule("H2O")
        atoms.positions += rng.normal(scale=0.04, size=atoms.positions.shape)
        frames.append(atoms)
    return frames


def _water_dimers(count: int, seed: int = 0) -> list[Atoms]:
    """Labels of a few tenths of a second (6 atoms) for the interruption test."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(count):
        first, second = molecule("H2O"), molecule("H2O")
        second.translate([0.0, 0.0, 2.9])
        atoms = first + second
        atoms.positions += rng.normal(scale=0.04, size=atoms.positions.shape)
        frames.append(atoms)
    return frames


def _contents(store: LabelStore) -> dict[str, tuple[float, np.ndarray]]:
    return {
        a.info["label_key"]: (a.get_potential_energy(), a.get_forces()) for a in store.labelled()
    }


def _assert_same_contents(first: LabelStore, second: LabelStore) -> None:
    one, two = _contents(first), _contents(second)
    assert sorted(one) == sorted(two)
    for key, (energy, forces) in one.items():
        assert two[key][0] == pytest.approx(energy, abs=1e-7)
        np.testing.assert_allclose(two[key][1], forces, atol=1e-6)


def test_labels_and_terms_equal_the_calculators_called_directly(tmp_path):
    frames = _waters(2)
    store = LabelStore(tmp_path / "labels.db")
    report = label_structures(frames, store, reference=REFERENCE, workers=1, progress=False)
    assert (report.computed, report.failed) == (2, 0)
    labelled = store.labelled()
    assert len(labelled) == 2
    for atoms in labelled:
        probe = atoms.copy()
        probe.calc = PySCFReference(**REFERENCE)
        assert atoms.get_potential_energy() == pytest.approx(probe.get_potential_energy(), abs=1e-6)
        np.testing.assert_allclose(atoms.get_forces(), probe.get_forces(), atol=1e-5)
        assert atoms.info["method_record"] == PySCFReference(**REFERENCE).record()
        assert atoms.info["compute_seconds"] > 0
        probe.calc = XTBBaseline(remove_dispersion=True)
        assert atoms.info["energy_baseline"] == pytest.approx(probe.get_potential_energy())
        np.testing.assert_allclose(atoms.arrays["forces_baseline"], probe.get_forces())
        probe.calc = D3Dispersion(method="revpbe0", damping="d3bj")
        assert atoms.info["energy_dispersion"] == pytest.approx(probe.get_potential_energy())
        assert atoms.info["record_dispersion"]["method"] == "revpbe0"


def test_done_rows_are_skipped_and_failures_retried_only_when_asked(tmp_path):
    good = _waters(2)
    bad = molecule("H2O")
    bad.positions[1] = bad.positions[0] + [0.1, 0.0, 0.0]  # overlapping atoms
    store = LabelStore(tmp_path / "labels.db")
    first = label_structures([*good, bad], store, reference=REFERENCE, workers=1, progress=False)
    assert (first.computed, first.failed) == (2, 1)
    assert "OverlappingAtomsError" in next(iter(first.errors.values()))
    assert list(store.failures().values()) == list(first.errors.values())

    again = label_structures([*good, bad], store, reference=REFERENCE, workers=1, progress=False)
    assert (again.computed, again.failed) == (0, 0)
    assert (again.already_done, again.already_failed) == (2, 1)

    retried = label_structures(
        [*good, bad], store, reference=REFERENCE, workers=1, progress=False, retry_failed=True
    )
    assert (retried.computed, retried.failed, retried.already_done) == (0, 1, 2)
    assert len(store) == 2 and len(store.failures()) == 1


def test_a_new_method_is_a_new_label(tmp_path):
    frames = _waters(1)
    store = LabelStore(tmp_path / "labels.db")
    label_structures(frames, store, reference=REFERENCE, workers=1, progress=False, baseline=None)
    other = {**REFERENCE, "xc": "pbe0"}
    report = label_structures(
        frames, store, reference=other, workers=1, progress=False, baseline=None
    )
    assert report.computed == 1
    assert len(store) == 2


@pytest.mark.slow
def test_sigkill_then_restart_computes_only_the_missing_rows(tmp_path):
    """Kill `deltaml label` (and its workers) with SIGKILL partway, then resume."""
    frames = _water_dimers(8)
    write(tmp_path / "frames.extxyz", frames)
    reference = {"basis": "sto-3g", "grid_level": 1}  # what the command line asks for
    killed = LabelStore(tmp_path / "killed.db")
    command = [
        sys.executable, "-m", "deltaml.cli", "label", str(tmp_path / "frames.extxyz"),
        "--store", str(tmp_path / "killed.db"), "--workers", "1", "--basis", "sto-3g",
        "--grid-level", "1", "--no-terms", "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, start_new_session=True)
    deadline = time.monotonic() + 300
    while len(killed) < 2:
        assert process.poll() is None, "the labelling run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the runner and its worker processes
    process.wait()
    done_at_kill = len(killed)
    assert 2 <= done_at_kill < len(frames)

    resumed = label_structures(
        frames, killed, reference=reference, baseline=None, dispersion=None, workers=2,
        progress=False,
    )  # fmt: skip
    assert resumed.already_done == done_at_kill
    assert resumed.computed == len(frames) - done_at_kill
    assert resumed.in_progress == 0  # the killed run's claim was released

    whole = LabelStore(tmp_path / "whole.db")
    label_structures(
        frames, whole, reference=reference, baseline=None, dispersion=None, workers=2,
        progress=False,
    )  # fmt: skip
    _assert_same_contents(killed, whole)


@pytest.mark.slow
def test_dask_local_cluster_gives_the_same_labels_as_the_local_pool(tmp_path):
    distributed = pytest.importorskip("distributed")
    frames = _waters(3, seed=1)
    local = LabelStore(tmp_path / "local.db")
    label_structures(frames, local, reference=REFERENCE, workers=2, progress=False)
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        on_dask = LabelStore(tmp_path / "dask.db")
        report = label_structures(
            frames, on_dask, reference=REFERENCE, scheduler=cluster.scheduler_address,
            progress=False,
        )  # fmt: skip
        assert report.computed == 3
        assert len(client.scheduler_info()["workers"]) == 2
    _assert_same_contents(local, on_dask)
    assert [a.info["energy_baseline"] for a in on_dask.labelled()] == pytest.approx(
        [a.info["energy_baseline"] for a in local.labelled()]
    )


def test_charge_and_multiplicity_come_from_info_and_bad_ones_fail_per_structure(tmp_path):
    hydroxide = Atoms("OH", positions=[[0, 0, 0], [0, 0, 0.97]], info={"charge": -1})
    radical = Atoms("OH", positions=[[0, 0, 0], [0, 0, 0.98]])  # doublet from the odd count
    wrong = Atoms("OH", positions=[[0, 0, 0], [0, 0, 0.99]], info={"multiplicity": 1})
    store = LabelStore(tmp_path / "labels.db")
    report = label_structures(
        [hydroxide, radical, wrong, hydroxide.copy()], store, reference=REFERENCE,
        baseline=None, workers=1, progress=False,
    )  # fmt: skip
    assert (report.computed, report.failed, report.duplicates) == (2, 1, 1)
    assert "ChargeMultiplicityError" in next(iter(report.errors.values()))
    by_charge = {a.info["charge"]: a for a in store.labelled()}
    assert by_charge[-1].info["multiplicity"] == 1
    assert by_charge[0].info["multiplicity"] == 2
    probe = hydroxide.copy()
    probe.calc = PySCFReference(**REFERENCE, charge=-1)
    assert by_charge[-1].get_potential_energy() == pytest.approx(
        probe.get_potential_energy(), abs=1e-6
    )


def test_a_charge_that_disagrees_with_the_structure_stops_before_computing(tmp_path):
    from deltaml.errors import ChargeMultiplicityError

    neutral = Atoms("OH", positions=[[0, 0, 0], [0, 0, 0.97]])
    hydroxide = Atoms("OH", positions=[[0, 0, 0], [0, 0, 0.98]], info={"charge": -1})
    store = LabelStore(tmp_path / "labels.db")
    with pytest.raises(ChargeMultiplicityError, match=r"structure 1 \(HO\): charge 0 given, but"):
        label_structures(
            [neutral, hydroxide], store, reference={**REFERENCE, "charge": 0}, baseline=None,
            workers=1, progress=False,
        )  # fmt: skip
    assert store.labelled() == []
    assert store.status(label_key(neutral, PySCFReference(**REFERENCE).record(), 0, 2)) is None


#: A stand-in for compute_label, importable by spawned workers: it records its
#: worker's pid, then answers once two workers are busy (``info["quick"]``) or
#: works for minutes.
_STAND_IN = """
import os, time
from pathlib import Path
from deltaml.labelling import LabelOutcome

def compute(task):
    folder = os.environ["DELTAML_TEST_PIDS"]
    Path(folder, str(os.getpid())).touch()
    while task.atoms.info.get("quick") and len(os.listdir(folder)) < 2:
        time.sleep(0.01)
    if not task.atoms.info.get("quick"):
        time.sleep(300)
    return LabelOutcome(task.key, energy=-1.0, seconds=0.01)
"""


def _stand_in(tmp_path) -> tuple[str, dict[str, str]]:
    """Folder of the stand-in module and its pid folder, and the environment to use it."""
    (tmp_path / "stand_in.py").write_text(_STAND_IN)
    (tmp_path / "pids").mkdir()
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    return str(tmp_path / "pids"), {"PYTHONPATH": path, "DELTAML_TEST_PIDS": str(tmp_path / "pids")}


def _wait_for_pids(folder: str, count: int, seconds: float = 120) -> list[int]:
    deadline = time.monotonic() + seconds
    while len(os.listdir(folder)) < count:
        assert time.monotonic() < deadline, "the workers did not start"
        time.sleep(0.05)
    return [int(name) for name in os.listdir(folder)]


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _all_gone_within(pids: list[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not all(_gone(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_workers_end_when_the_labelling_run_is_killed(tmp_path):
    """SIGKILL of the runner alone (not its process group): its pool must not outlive it."""
    pids, env = _stand_in(tmp_path)
    script = textwrap.dedent(
        """
        import sys
        from ase.build import molecule
        import deltaml.labelling, stand_in
        from deltaml.store import LabelStore
        deltaml.labelling.compute_label = stand_in.compute
        deltaml.labelling.label_structures(
            [molecule("H2O"), molecule("NH3")], LabelStore(sys.argv[1]), baseline=None,
            dispersion=None, workers=2, progress=False,
        )
        """
    )
    run = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "labels.db")], env={**os.environ, **env}
    )
    workers = []
    try:
        workers = _wait_for_pids(pids, 2)
        run.kill()
        run.wait()
        assert _all_gone_within(workers, 5.0)
    finally:
        run.kill()
        _kill(workers)


def test_the_watchdog_ends_a_worker_whose_parent_is_gone(tmp_path):
    """The portable half of the workers' guard: no prctl, only the watching thread's check."""
    ready = tmp_path / "watching"
    child = textwrap.dedent(
        """
        import pathlib, sys
        from deltaml import labelling
        pathlib.Path(sys.argv[2]).touch()
        labelling._watch_parent(int(sys.argv[1]), 0.1)
        """
    )
    parent = textwrap.dedent(
        f"""
        import os, subprocess, sys, time
        args = [sys.executable, "-c", {child!r}, str(os.getpid()), {str(ready)!r}]
        print(subprocess.Popen(args).pid, flush=True)
        time.sleep(600)
        """
    )
    run = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    watcher = [int(run.stdout.readline())]
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert time.monotonic() < deadline, "the watching process did not start"
            time.sleep(0.05)
        time.sleep(0.5)
        assert not _gone(watcher[0])  # it keeps watching while its parent runs
        run.kill()
        run.wait()
        assert _all_gone_within(watcher, 5.0)
    finally:
        run.kill()
        _kill(watcher)


def test_an_interrupted_run_ends_its_workers_and_releases_its_claims(tmp_path, monkeypatch):
    """An error while writing the first result must not wait minutes for the second."""
    pids, env = _stand_in(tmp_path)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.syspath_prepend(str(tmp_path))  # spawned workers inherit sys.path
    import stand_in

    monkeypatch.setattr(labelling, "compute_label", stand_in.compute)
    store = LabelStore(tmp_path / "labels.db")

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(store, "put", disk_full)
    quick, slow = molecule("H2O"), molecule("NH3")
    quick.info["quick"] = True
    started = time.monotonic()
    try:
        with pytest.raises(OSError, match="disk full"):
            label_structures(
                [quick, slow], store, baseline=None, dispersion=None, workers=2, progress=False
            )
        assert time.monotonic() - started < 60  # the slow stand-in works for 300 s
        assert _all_gone_within(_wait_for_pids(pids, 2, seconds=1), 5.0)
    finally:
        _kill([int(name) for name in os.listdir(pids)])
    record = PySCFReference().record()
    assert [store.status(label_key(a, record)) for a in (quick, slow)] == [None, None]
