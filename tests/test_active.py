"""Active learning with a tiny-basis PySCF reference: the loop, its resumption, on-the-fly."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read

from deltaml.active import CRYSTAL_RESOLUTION, ActiveLearner, crystal_uncertainty, on_the_fly
from deltaml.labelling import label_structures
from deltaml.reference import PySCFReference
from deltaml.store import LabelStore

#: A cheap stand-in for the reference: revPBE0/STO-3G on a coarse grid.
REFERENCE = {"basis": "sto-3g", "grid_level": 1}
MODEL = {"descriptor": {"cutoff": 4.0, "n_max": 4, "l_max": 3}, "n_sparse": 40}


def _dimers(count: int, seed: int, scale: float = 0.06) -> list[Atoms]:
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(count):
        first, second = molecule("H2O"), molecule("H2O")
        second.rotate(180, "z")
        second.translate([0.0, 0.0, 2.9])
        atoms = first + second
        atoms.positions += rng.normal(scale=scale, size=atoms.positions.shape)
        frames.append(atoms)
    return frames


def _reference_labelled(frames: list[Atoms]) -> list[Atoms]:
    out = []
    for atoms in frames:
        probe = atoms.copy()
        probe.calc = PySCFReference(**REFERENCE)
        labelled = atoms.copy()
        labelled.calc = SinglePointCalculator(
            labelled, energy=probe.get_potential_energy(), forces=probe.get_forces()
        )
        labelled.info["method_record"] = PySCFReference(**REFERENCE).record()
        out.append(labelled)
    return out


@pytest.fixture(scope="module")
def validation() -> list[Atoms]:
    return _reference_labelled(_dimers(6, seed=99, scale=0.1))


def _learner(
    tmp_path, validation, name: str, selection: str = "variance_reduction"
) -> ActiveLearner:
    store = LabelStore(tmp_path / f"{name}.db")
    if len(store) == 0:
        label_structures(_dimers(5, seed=1), store, reference=REFERENCE, workers=1, progress=False)
    return ActiveLearner(
        tmp_path / name, store, _dimers(1, seed=2, scale=0.0), reference=REFERENCE, model=MODEL,
        validation=validation, md_steps=60, md_interval=6, batch=3, pool=8,
        selection=selection, seed=0,
    )  # fmt: skip


def _assert_same(first: ActiveLearner, second: ActiveLearner) -> None:
    """Same labels in the store and the same history (timings aside)."""
    one = {a.info["label_key"]: a.get_potential_energy() for a in first.store.labelled()}
    two = {a.info["label_key"]: a.get_potential_energy() for a in second.store.labelled()}
    assert sorted(one) == sorted(two)
    assert [one[k] for k in sorted(one)] == pytest.approx([two[k] for k in sorted(two)])
    for a, b in zip(first.history, second.history, strict=True):
        for key in ("iteration", "n_labels", "n_candidates", "selected", "labelled"):
            assert a.get(key) == b.get(key), key
        assert a["validation"] == pytest.approx(b["validation"])


@pytest.mark.slow
def test_the_loop_adds_labels_and_lowers_the_validation_error(tmp_path, validation):
    learner = _learner(tmp_path, validation, "run")
    history = learner.run(iterations=2)
    assert [h["n_labels"] for h in history] == [5, 8, 11]
    forces = [h["validation"]["force_mae"] for h in history]
    assert forces[-1] < forces[0]
    assert all(set(h["stages"]) == {"explore", "select", "label", "fit"} for h in history[1:])
    saved = json.loads((tmp_path / "run" / "history.json").read_text())["iterations"]
    assert [h["n_labels"] for h in saved] == [5, 8, 11]


@pytest.fixture(scope="module")
def whole(tmp_path_factory, validation) -> ActiveLearner:
    """One uninterrupted iteration, the yardstick of the resumption tests."""
    learner = _learner(tmp_path_factory.mktemp("whole"), validation, "whole")
    learner.run(iterations=1)
    return learner


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["explore", "select", "label"])
def test_an_interrupted_loop_resumes_to_the_same_result(tmp_path, validation, whole, stage):
    first = _learner(tmp_path, validation, "cut")
    first.run(iterations=1, stop_after=(1, stage))
    assert len(first.history[-1]["stages"]) < 4
    resumed = _learner(tmp_path, validation, "cut")  # a new process would do the same
    resumed.run(iterations=1)
    _assert_same(resumed, whole)


@pytest.mark.slow
def test_random_selection_is_seeded_and_differs_from_uncertainty(tmp_path, validation):
    active = _learner(tmp_path, validation, "active", selection="uncertainty")
    active.run(iterations=1)
    control = _learner(tmp_path, validation, "random")
    control.selection = "random"
    control.run(iterations=1)
    assert active.history[1]["selected"] != control.history[1]["selected"]
    sigma = [a.info["uncertainty"] for a in _candidates(active, 1)]
    picked = [sigma[i] for i in active.history[1]["selected"]]
    assert max(picked) == max(sigma)  # the most uncertain candidate is always taken


def _candidates(learner: ActiveLearner, k: int) -> list[Atoms]:
    from ase.io import read

    return read(learner.workdir / f"iteration_{k}" / "candidates.extxyz", index=":")


@pytest.mark.slow
def test_on_the_fly_labels_uncertain_frames_and_the_uncertainty_drops(tmp_path):
    store = LabelStore(tmp_path / "otf.db")
    label_structures(_dimers(3, seed=1), store, reference=REFERENCE, workers=1, progress=False)
    result = on_the_fly(
        _dimers(1, seed=2, scale=0.0)[0], store, threshold=0.05, steps=40, check_every=10,
        reference=REFERENCE, model=MODEL, max_labels=2,
    )  # fmt: skip
    assert 1 <= len(result["labelled"]) <= 2
    assert result["n_labels"] == 3 + len(result["labelled"])
    for event in result["labelled"]:
        assert event["uncertainty_after"] < event["uncertainty_before"]


# -- batch selection (no reference needed: a model fitted on made-up Δ labels) --------


def _made_up(frames: list[Atoms], seed: int = 0) -> list[Atoms]:
    """Copies with arbitrary Δ energies and forces (enough to fit a model)."""
    rng = np.random.default_rng(seed)
    out = []
    for atoms in frames:
        copy = atoms.copy()
        copy.calc = SinglePointCalculator(
            copy, energy=float(rng.normal()), forces=rng.normal(scale=0.1, size=(len(copy), 3))
        )
        out.append(copy)
    return out


@pytest.fixture(scope="module")
def small_model():
    from deltaml.model import SparseGPR

    frames = _made_up([molecule("H2O"), molecule("CH4"), molecule("CH3OH")])
    return SparseGPR(**MODEL).fit(frames)


def _shifted(name: str, seed: int, scale: float = 0.03) -> Atoms:
    atoms = molecule(name)
    atoms.positions += np.random.default_rng(seed).normal(scale=scale, size=atoms.positions.shape)
    return atoms


def test_the_greedy_batch_does_not_pick_a_duplicate_of_a_picked_structure(small_model):
    from deltaml.active import variance_reduction_batch

    dimer = _dimers(1, seed=3)[0]
    candidates = [dimer, dimer.copy(), _shifted("CH4", 4)]
    # Alone, the dimer (6 atoms, two copies in the pool) lowers the variance most ...
    first = variance_reduction_batch(small_model, candidates, 1)
    assert first == [0]
    # ... but once it is picked, its duplicate informs almost nothing new.
    assert variance_reduction_batch(small_model, candidates, 2) == [0, 2]
    # A structure already labelled is known: its duplicate is not picked first.
    again = variance_reduction_batch(small_model, candidates, 1, labelled=[dimer])
    assert again == [2]


def test_the_greedy_batch_matches_a_brute_force_gaussian_process(small_model):
    from deltaml.active import _environment_kernel, _environments, variance_reduction_batch

    candidates = [_shifted(n, s, 0.1) for s, n in enumerate(["H2O", "CH4", "CH3OH", "H2O", "CH4"])]
    labelled = [_shifted("CH3OH", 9)]
    noise = 0.1
    values, numbers, owner = _environments(small_model, candidates)
    t_values, t_numbers, _ = _environments(small_model, labelled)
    x, z = np.vstack([t_values, values]), np.concatenate([t_numbers, numbers])
    kernel = _environment_kernel(small_model, x, z, x, z)
    n_train = len(t_values)

    def total_variance(observed: list[int]) -> float:
        """Summed posterior variance of the candidates' atoms, by a plain inverse."""
        rows = np.concatenate([np.arange(n_train)] + [n_train + np.flatnonzero(owner == i)
                                                      for i in observed])  # fmt: skip
        gain = kernel[:, rows] @ np.linalg.inv(
            kernel[np.ix_(rows, rows)] + noise * np.eye(len(rows))
        )
        posterior = kernel - gain @ kernel[rows]
        return float(np.trace(posterior[n_train:, n_train:]))

    expected: list[int] = []
    for _ in range(3):
        left = [i for i in range(len(candidates)) if i not in expected]
        expected.append(min(left, key=lambda i: total_variance([*expected, i])))
    picked = variance_reduction_batch(small_model, candidates, 3, labelled=labelled, noise=noise)
    assert picked == expected


def test_select_batch_is_reproducible_and_checks_its_arguments(small_model):
    from deltaml.active import select_batch
    from deltaml.errors import ParameterError

    candidates = [_shifted(n, s) for s, n in enumerate(["H2O", "CH4", "CH3OH"] * 3)]
    sigma = np.linspace(0.1, 0.9, len(candidates))
    for selection in ("uncertainty", "variance_reduction", "random"):
        one = select_batch(small_model, candidates, sigma, batch=3, pool=6, selection=selection)
        two = select_batch(small_model, candidates, sigma, batch=3, pool=6, selection=selection)
        assert one == two and len(set(one)) == 3 and one == sorted(one)
    by_seed = {
        tuple(
            select_batch(small_model, candidates, None, batch=3, pool=6, selection="random", seed=s)
        )
        for s in range(5)
    }
    assert len(by_seed) > 1  # the seed matters
    with pytest.raises(ParameterError):
        select_batch(small_model, candidates, sigma, batch=3, pool=6, selection="largest")
    with pytest.raises(ParameterError):
        select_batch(small_model, candidates, None, batch=3, pool=6, selection="uncertainty")
    with pytest.raises(ParameterError):
        select_batch(small_model, candidates, None, batch=3, pool=6,
                     selection="variance_reduction", noise=0.0)  # fmt: skip


# -- crystals: a periodic reference (CP2K, minimal settings) ----------------------------

#: CP2K at minimal settings (revPBE, SZV basis, 200 Ry): a few seconds per label.
CP2K_QUICK = {"code": "cp2k", "basis": "SZV-MOLOPT-SR-GTH", "cutoff_ry": 200,
              "rel_cutoff_ry": 40}  # fmt: skip


def _water_cells(count: int, seed: int, scale: float = 0.04) -> list[Atoms]:
    """One water molecule in a 5 Å cell (its images are its neighbours), rattled."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(count):
        atoms = molecule("H2O")
        atoms.set_cell([5.0, 5.2, 5.4])
        atoms.pbc = True
        atoms.center()
        atoms.positions += rng.normal(scale=scale, size=atoms.positions.shape)
        frames.append(atoms)
    return frames


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cp2k.psmp") is None, reason="CP2K (cp2k.psmp) not installed")
def test_the_crystal_loop_labels_strained_and_thermal_cells_and_resumes(tmp_path):
    """Issue 14: the loop on crystals, with periodic labels (stress) and strained cells."""
    store = LabelStore(tmp_path / "cells.db")
    label_structures(_water_cells(3, seed=1), store, reference=CP2K_QUICK, workers=1,
                     progress=False)  # fmt: skip

    start = _water_cells(1, seed=2, scale=0.0)[0]
    start.info["system"] = "water cell"

    def learner() -> ActiveLearner:
        return ActiveLearner(
            tmp_path / "crystal", store, [start],
            reference=CP2K_QUICK, model=MODEL, md_steps=20, md_interval=5, batch=2, pool=4,
            strained=3, max_strain=0.05, relax_steps=4, score="crystal",
            selection="uncertainty", seed=0,
        )  # fmt: skip

    first = learner()
    first.run(iterations=1, stop_after=(1, "select"))  # interrupted before labelling
    selected = first.history[-1]["selected"]
    candidates = read(tmp_path / "crystal" / "iteration_1" / "candidates.extxyz", index=":")
    strained = [a for a in candidates if "strain" in a.info["source"]]
    relaxed = [a for a in candidates if "relaxation" in a.info["source"]]
    assert len(strained) == 3 and 1 <= len(relaxed) <= 5 and len(candidates) > 8
    assert {a.info["system"] for a in candidates} == {"water cell"}  # provenance kept
    volumes = {round(a.get_volume(), 3) for a in strained}
    assert len(volumes) == 3 and all(abs(v / (5.0 * 5.2 * 5.4) - 1) < 0.16 for v in volumes)
    assert relaxed[-1].get_volume() != pytest.approx(5.0 * 5.2 * 5.4, abs=1e-6)  # the cell moved
    # Scored by the per-molecule energy σ and the stress σ of the model that explored.
    explorer = first.model(0)
    for atoms in (strained[0], relaxed[-1], candidates[0]):
        sigma = crystal_uncertainty(explorer, atoms)
        assert sigma["stress"] > 0 and sigma["energy_per_molecule"] > 0
        expected = max(sigma[key] / CRYSTAL_RESOLUTION[key] for key in CRYSTAL_RESOLUTION)
        assert atoms.info["uncertainty"] == pytest.approx(expected, rel=1e-6)
    scores = [a.info["uncertainty"] for a in candidates]
    assert int(np.argmax(scores)) in selected  # the most uncertain first, then diversity
    resumed = learner()  # a new process would do the same
    history = resumed.run(iterations=1)
    assert [h["n_labels"] for h in history] == [3, 5]
    assert history[-1]["selected"] == selected  # the saved selection, not a new one
    labels = store.labelled()
    assert all(a.get_stress().shape == (6,) for a in labels)
    model = resumed.model()
    assert model.predict(candidates[0], stress=True).stress.shape == (6,)


@pytest.mark.slow
def test_starts_are_explored_in_rotation_and_unlabelled_candidates_carried(tmp_path):
    """Many crystals: a few starts explored per iteration, the rest of the pool carried."""
    from deltaml.active import _model_score

    store = LabelStore(tmp_path / "rotation.db")
    label_structures(_dimers(5, seed=1), store, reference=REFERENCE, workers=1, progress=False)
    starts = [_dimers(1, seed=2, scale=0.0)[0], _dimers(1, seed=3, scale=0.08)[0]]
    learner = ActiveLearner(
        tmp_path / "rotation", store, starts, reference=REFERENCE, model=MODEL,
        md_steps=30, md_interval=6, batch=2, pool=4, selection="uncertainty", seed=0,
        explore_starts=1, carry=1,
    )  # fmt: skip
    history = learner.run(iterations=3)
    assert [h["explored_starts"] for h in history[1:]] == [[0], [1], [0]]
    pools = [_candidates(learner, k) for k in (1, 2, 3)]
    assert {a.info["source"].split(", ")[1] for a in pools[0]} == {"start 0"}
    # Iteration 2: its own frames, then iteration 1's unselected ones, scored again.
    fresh = [a for a in pools[1] if a.info["explored"] == 2]
    carried = [a for a in pools[1] if a.info["explored"] == 1]
    assert {a.info["source"].split(", ")[1] for a in fresh} == {"start 1"}
    assert len(carried) == len(pools[0]) - 2 == history[2]["n_carried"]
    unselected = [a for i, a in enumerate(pools[0]) if i not in history[1]["selected"]]
    for old, new in zip(unselected, carried, strict=True):
        np.testing.assert_allclose(new.positions, old.positions)
        assert new.info["uncertainty"] == pytest.approx(
            _model_score(learner.model(1), new, "forces"), rel=1e-6
        )
    # carry=1: iteration 3 keeps iteration 2's frames only, never iteration 1's.
    assert {a.info["explored"] for a in pools[2]} == {2, 3}
    assert history[3]["n_carried"] == len(fresh) - sum(
        1 for i in history[2]["selected"] if pools[1][i].info["explored"] == 2
    )
    picked = learner.selected_structures()
    assert len(picked) == 6 == len({a.positions.round(6).tobytes() for a in picked})
