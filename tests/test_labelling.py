"""Labelling runner: labels equal direct calls, skip/retry rules, SIGKILL resume, Dask."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule
from ase.io import write

from deltaml.baseline import XTBBaseline
from deltaml.dispersion import D3Dispersion
from deltaml.labelling import label_structures
from deltaml.reference import PySCFReference
from deltaml.store import LabelStore

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
