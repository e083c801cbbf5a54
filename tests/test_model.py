"""The sparse GP Δ-model: exactness, derivatives, invariances, uncertainty, files.

Training data here are cheap and physical: Δ = GFN1-xTB − GFN2-xTB on rattled
small molecules (the model does not care which two methods differ).
"""

from __future__ import annotations

import contextlib
import importlib
import json

import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule
from ase.calculators.singlepoint import SinglePointCalculator
from ase.data import chemical_symbols

from deltaml.errors import (
    ModelFileError,
    NotFittedError,
    ParameterError,
    UnsupportedElementError,
)
from deltaml.model import SparseGPR
from deltaml.structures import composition_counts

#: Small descriptor: these tests check the model, not the SOAP resolution.
DESCRIPTOR = {"cutoff": 4.0, "n_max": 4, "l_max": 3}
MOLECULES = ("H2O", "CH3OH", "CO2", "CH3CH2OH", "H2CO")


def _rattled(count: int, seed: int, scale: float = 0.08) -> list[Atoms]:
    rng = np.random.default_rng(seed)
    frames = []
    for k in range(count):
        atoms = molecule(MOLECULES[k % len(MOLECULES)])
        atoms.positions += rng.normal(scale=scale, size=atoms.positions.shape)
        frames.append(atoms)
    return frames


@pytest.fixture(scope="module")
def data(gfn_delta) -> dict[str, list[Atoms]]:
    return {"train": gfn_delta(_rattled(40, seed=1)), "test": gfn_delta(_rattled(15, seed=2))}


@pytest.fixture(scope="module")
def model(data) -> SparseGPR:
    return SparseGPR(decomposition="atomic", descriptor=DESCRIPTOR, n_sparse=60).fit(data["train"])


def _energy(model: SparseGPR, atoms: Atoms) -> float:
    return model.predict(atoms, forces=False).energy


def test_fit_beats_the_mean_on_held_out_structures(model, data):
    test = data["test"]
    errors = [model.predict(a).energy - a.get_potential_energy() for a in test]
    spread = [a.get_potential_energy() - model._offset_energy([a])[0] for a in test]
    assert np.sqrt(np.mean(np.square(errors))) < 0.3 * np.sqrt(np.mean(np.square(spread)))
    force_errors = np.concatenate(
        [(model.predict(a).forces - a.get_forces()).ravel() for a in test]
    )
    forces = np.concatenate([a.get_forces().ravel() for a in test])
    assert np.sqrt(np.mean(force_errors**2)) < 0.5 * np.sqrt(np.mean(forces**2))


def test_a_target_inside_the_model_family_is_recovered(data):
    """Labels made by a model with random weights are learned back exactly."""
    train = [a.copy() for a in data["train"]]
    teacher = SparseGPR(decomposition="atomic", descriptor=DESCRIPTOR, n_sparse=40, delta=0.1).fit(
        data["train"]
    )
    teacher.alpha_ = np.random.default_rng(3).normal(size=teacher.alpha_.shape)
    for atoms in train:
        result = teacher.predict(atoms)
        atoms.calc = SinglePointCalculator(atoms, energy=result.energy, forces=result.forces)
    offsets = {chemical_symbols[z]: v for z, v in teacher.offsets_.items()}
    student = SparseGPR(
        decomposition="atomic", descriptor=DESCRIPTOR, n_sparse=40, delta=0.1, offsets=offsets,
        energy_sigma=1e-6, force_sigma=1e-6, jitter=1e-10,
    ).fit(train)  # fmt: skip
    np.testing.assert_array_equal(student.sparse_values_, teacher.sparse_values_)
    for atoms in data["test"]:
        want, got = teacher.predict(atoms), student.predict(atoms)
        assert got.energy == pytest.approx(want.energy, abs=1e-6 * len(atoms))
        np.testing.assert_allclose(got.forces, want.forces, atol=1e-5)


def test_forces_are_minus_the_gradient_of_the_energy(model, data):
    atoms = data["test"][3].copy()  # ethanol
    forces = model.predict(atoms).forces
    h = 1e-4
    for i in range(len(atoms)):
        for a in range(3):
            plus, minus = atoms.copy(), atoms.copy()
            plus.positions[i, a] += h
            minus.positions[i, a] -= h
            numeric = -(_energy(model, plus) - _energy(model, minus)) / (2 * h)
            assert forces[i, a] == pytest.approx(numeric, abs=1e-6)


def test_stress_of_a_molecule_is_refused_with_a_clear_error(model, water):
    from deltaml.errors import UnsupportedCapabilityError

    with pytest.raises(UnsupportedCapabilityError, match="periodic in all three"):
        model.predict(water, stress=True)


def test_stress_is_the_strain_derivative_of_the_energy(model, co2_crystal):
    atoms = co2_crystal.copy()
    atoms.positions += np.random.default_rng(0).normal(scale=0.03, size=atoms.positions.shape)
    stress = model.predict(atoms, stress=True).stress
    h, volume = 1e-5, atoms.get_volume()
    voigt = [(0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)]
    for k, (a, b) in enumerate(voigt):
        energies = []
        for sign in (1, -1):
            strain = np.eye(3)
            strain[a, b] += sign * h / (1 if a == b else 2)
            strain[b, a] += 0 if a == b else sign * h / 2
            probe = atoms.copy()
            probe.set_cell(atoms.cell.array @ strain, scale_atoms=True)
            energies.append(_energy(model, probe))
        assert stress[k] == pytest.approx((energies[0] - energies[1]) / (2 * h) / volume, abs=1e-8)


def test_energy_is_invariant_and_size_extensive(model, data, rotation):
    atoms = data["test"][8].copy()
    energy = _energy(model, atoms)
    moved = atoms.copy()
    moved.positions = atoms.positions @ rotation.T + [3.0, -1.0, 7.0]
    assert _energy(model, moved) == pytest.approx(energy, abs=1e-9)
    order = np.random.default_rng(0).permutation(len(atoms))
    assert _energy(model, atoms[order]) == pytest.approx(energy, abs=1e-9)
    far = atoms.copy()
    far.translate([20.0, 0.0, 0.0])  # beyond the cutoff
    assert _energy(model, atoms + far) == pytest.approx(2 * energy, abs=1e-9)


def test_far_from_the_data_the_prediction_returns_to_the_offsets(data):
    """With a sharp kernel, a structure unlike the training set gets the offsets and the prior."""
    sharp = SparseGPR(
        decomposition="atomic",
        descriptor=DESCRIPTOR,
        n_sparse=60,
        kernel="exp",
        zeta=200.0,
        delta=0.1,
    )
    sharp.fit(data["train"])
    near, far = data["train"][0].copy(), molecule("H2O")
    far.positions[1:] = far.positions[0] + 0.55 * (far.positions[1:] - far.positions[0])
    result_near, result_far = sharp.predict(near), sharp.predict(far)
    offsets = sharp._offset_energy([far])[0]
    assert result_far.energy == pytest.approx(offsets, abs=1e-6)
    # The prior of the total: O alone, and two symmetry-equivalent H (fully correlated),
    # plus the (small) uncertainty of the offsets of H2O.
    counts = composition_counts([far], sharp.species_)
    prior = np.sqrt(sharp.delta_**2 * (1 + 2**2) + sharp.offset_fit_.covariance_of(counts)[0, 0])
    assert result_far.energy_uncertainty == pytest.approx(prior, rel=1e-3)
    assert result_near.energy_uncertainty < 0.2 * result_far.energy_uncertainty


def test_uncertainty_grows_away_from_the_data(model):
    near = _rattled(1, seed=1)[0]  # the first training structure's chemistry and noise
    shifts = [0.0, 0.3, 0.6]
    sigma = []
    for shift in shifts:
        atoms = near.copy()
        atoms.positions[1] += shift * (atoms.positions[1] - atoms.positions[0])  # stretch O-H
        sigma.append(model.predict(atoms).energy_uncertainty)
    assert sigma[0] < sigma[1] < sigma[2]


def test_energy_covariance_diagonal_is_the_predicted_variance(model, data):
    frames = data["test"][:3]
    covariance = model.energy_covariance(frames)
    sigma = [model.predict(a, forces=False).energy_uncertainty for a in frames]
    np.testing.assert_allclose(np.sqrt(np.diag(covariance)), sigma, rtol=1e-8)
    np.testing.assert_allclose(covariance, covariance.T, atol=1e-14)
    assert np.linalg.eigvalsh(covariance).min() > -1e-10 * np.trace(covariance)


def test_energy_difference_of_a_structure_and_its_double_is_certain(model, data):
    # E(2 copies far apart) = 2 E(one): var(E_2/2 − E_1) must vanish, while an unrelated
    # structure keeps a finite error bar on its difference.
    one = data["test"][0].copy()
    one.center(vacuum=6.0)
    far = one.copy()
    far.translate([30.0, 0.0, 0.0])
    two = one + far
    other = data["test"][1]
    cov = model.energy_covariance([one, two, other])
    var_same = cov[0, 0] + cov[1, 1] / 4 - cov[0, 1]
    var_other = cov[0, 0] + cov[2, 2] - 2 * cov[0, 2]
    assert abs(var_same) < 1e-9 * cov[0, 0]
    assert var_other > 0.01 * cov[0, 0]


def test_calibration_makes_held_out_z_scores_unit(model, data):
    calibrated = SparseGPR(**model.get_params()).fit(data["train"])
    scales = calibrated.calibrate(data["test"][:8])
    assert all(s > 0 for s in scales.values())
    other = data["test"][8:]
    z = [
        (a.get_potential_energy() - r.energy) / r.energy_uncertainty
        for a, r in ((a, calibrated.predict(a)) for a in other)
    ]
    assert 0.3 < np.sqrt(np.mean(np.square(z))) < 3.0


def test_a_force_fixed_by_symmetry_does_not_blow_up_the_force_factor(model, data):
    """The force on C of a linear, symmetric CO2 is zero in any smooth model (σ = 0), not
    in the reference of a complex it sits in: the floor takes its error (as a z-score it
    made the factor 1e8), and its σ is that floor, not zero."""
    calibrated = SparseGPR(**model.get_params()).fit(data["train"])
    plain = calibrated.calibrate(data["test"])["forces"]
    co2 = Atoms("CO2", positions=[[0, 0, 0], [0, 0, 1.16], [0, 0, -1.16]])
    predicted = calibrated.predict(co2)
    # σ of C is the floor alone: the GP cannot move that force
    assert predicted.forces_uncertainty[0] == pytest.approx(
        calibrated.uncertainty_scale_["forces_floor"], rel=1e-6
    )
    forces = predicted.forces + np.array([[0.0075, 0, 0], [0, 0, 0], [0, 0, 0]])  # on C alone
    co2.calc = SinglePointCalculator(co2, energy=predicted.energy, forces=forces)
    with_co2 = calibrated.calibrate([*data["test"], co2])
    assert with_co2["forces"] == pytest.approx(plain, rel=0.1)  # (before: 5e8)
    assert 0.1 < plain < 10.0
    floor = with_co2["forces_floor"]
    assert 1e-4 < floor < 0.5
    assert calibrated.predict(co2).forces_uncertainty[0] == pytest.approx(floor, rel=1e-3)


def test_factor_and_floor_recover_the_scale_and_floor_errors_were_drawn_with():
    from deltaml.calibration import factor_and_floor

    rng = np.random.default_rng(0)
    variances = np.concatenate([rng.uniform(0.5, 2.0, 4000), np.zeros(1000)])  # 1000 fixed
    errors = rng.normal(size=5000) * np.sqrt(3.0**2 * variances + 0.4**2)
    factor, floor = factor_and_floor(errors, variances)
    assert factor == pytest.approx(3.0, rel=0.05)
    assert floor == pytest.approx(0.4, rel=0.1)
    z = errors / np.sqrt(factor**2 * variances + floor**2)
    assert np.sqrt(np.mean(z**2)) == pytest.approx(1.0, rel=1e-6)
    # Only forces the model cannot move (all beyond the cut-off): the floor is all of σ.
    fixed = rng.normal(scale=0.2, size=300)
    factor, floor = factor_and_floor(fixed, np.zeros(300))
    assert factor == 1.0 and floor == pytest.approx(np.sqrt(np.mean(fixed**2)))


def test_fits_are_reproducible_bit_for_bit(data):
    first = SparseGPR(
        decomposition="atomic", descriptor=DESCRIPTOR, n_sparse=30, selection="random", seed=5
    )
    second = SparseGPR(
        decomposition="atomic", descriptor=DESCRIPTOR, n_sparse=30, selection="random", seed=5
    )
    other = SparseGPR(
        decomposition="atomic", descriptor=DESCRIPTOR, n_sparse=30, selection="random", seed=6
    )
    for estimator in (first, second, other):
        estimator.fit(data["train"])
    np.testing.assert_array_equal(first.alpha_, second.alpha_)
    assert first.training_set_sha256_ == second.training_set_sha256_
    assert not np.array_equal(first.sparse_values_, other.sparse_values_)


@pytest.mark.parametrize("selection", ["fps", "leverage"])
def test_sparse_selection_picks_distinct_environments_per_element(data, selection):
    fitted = SparseGPR(
        decomposition="atomic", descriptor=DESCRIPTOR, n_sparse=25, selection=selection
    ).fit(data["train"])
    for z in fitted.species_:
        rows = fitted.sparse_values_[fitted.sparse_numbers_ == z]
        assert len(rows) == 25
        assert len(np.unique(np.round(rows, 10), axis=0)) == 25


def test_the_old_name_of_leverage_selection_still_works_and_says_so(data):
    settings = {"decomposition": "atomic", "descriptor": DESCRIPTOR, "n_sparse": 25}
    with pytest.warns(FutureWarning, match="now called 'leverage'"):
        old = SparseGPR(selection="cur", **settings).fit(data["train"][:10])
    new = SparseGPR(selection="leverage", **settings).fit(data["train"][:10])
    np.testing.assert_array_equal(old.sparse_values_, new.sparse_values_)


def test_save_and_load_give_identical_predictions(model, data, tmp_path):
    path = model.save(tmp_path / "model.npz")
    loaded = SparseGPR.load(path)
    for atoms in data["test"][:4]:
        want, got = model.predict(atoms), loaded.predict(atoms)
        assert got.energy == want.energy
        np.testing.assert_array_equal(got.forces, want.forces)
        np.testing.assert_array_equal(got.forces_uncertainty, want.forces_uncertainty)
    with np.load(path, allow_pickle=False) as stored:  # data, not code
        assert json.loads(str(stored["metadata"]))["format"] == "deltaml-model"


def test_a_file_of_another_format_version_is_refused(model, tmp_path):
    path = model.save(tmp_path / "model.npz")
    with np.load(path) as stored:
        arrays = {k: stored[k] for k in stored.files}
    meta = json.loads(str(arrays["metadata"]))
    meta["format_version"] = 99
    arrays["metadata"] = np.array(json.dumps(meta))
    np.savez(tmp_path / "future.npz", **arrays)
    with pytest.raises(ModelFileError, match="format version 99"):
        SparseGPR.load(tmp_path / "future.npz")
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    with pytest.raises(ModelFileError, match="no metadata"):
        SparseGPR.load(tmp_path / "other.npz")


def test_errors_before_fitting_and_on_bad_input(model):
    with pytest.raises(NotFittedError, match="not fitted yet"):
        SparseGPR().predict(molecule("H2O"))
    with pytest.raises(UnsupportedElementError, match="N"):
        model.predict(molecule("NH3"))
    with pytest.raises(ParameterError, match="integer zeta"):
        SparseGPR(zeta=2.5).fit([])
    with pytest.raises(ParameterError, match="kernel"):
        SparseGPR(kernel="rbf").fit([])


def test_get_params_round_trips_like_a_scikit_learn_estimator(model):
    from sklearn.base import clone

    copy = clone(model)
    assert copy.get_params() == model.get_params()
    assert not hasattr(copy, "alpha_")


def test_featomic_and_dscribe_models_predict_the_same_energies(data):
    """Same hyperparameters, same data: the two backends' models agree within 3 meV/atom.

    Their features differ (radial basis, centre-type split, cutoff function), so
    they cannot agree to numerical precision; the stated tolerance is 3 meV/atom
    in the mean, a quarter of the spread of the targets (measured: 1.5 meV/atom
    against 12.5).
    """
    test = data["test"]
    n_atoms = np.array([len(a) for a in test])
    predictions = {}
    for backend in ("featomic", "dscribe"):
        fitted = SparseGPR(
            decomposition="atomic", descriptor={**DESCRIPTOR, "backend": backend}, n_sparse=60
        )
        fitted.fit(data["train"])
        predictions[backend] = np.array([fitted.predict(a, forces=False).energy for a in test])
    target = np.array([a.get_potential_energy() for a in test])
    spread = np.mean(np.abs(target - fitted._offset_energy(test)) / n_atoms)
    difference = np.mean(np.abs(predictions["featomic"] - predictions["dscribe"]) / n_atoms)
    assert difference < 3e-3
    assert difference < 0.25 * spread


def test_kfold_tuner_prefers_a_sensible_noise_level(data):
    from deltaml.selection import kfold_tune

    template = SparseGPR(decomposition="atomic", descriptor=DESCRIPTOR, n_sparse=40, delta=0.1)
    grid = {"force_sigma": [0.01, 10.0]}  # 10 eV/Å ignores the forces
    result = kfold_tune(template, data["train"], grid, folds=3, seed=0)
    assert result["best"] == {"force_sigma": 0.01}
    scores = {row["force_sigma"]: row["score"] for row in result["table"]}
    assert scores[0.01] < scores[10.0]
    assert result["model"].force_sigma == 0.01 and hasattr(result["model"], "alpha_")
    with pytest.raises(ParameterError, match="unknown SparseGPR parameter"):
        kfold_tune(template, data["train"], {"sigma": [1.0]})


def test_the_fitting_rows_and_the_fast_prediction_path_agree(model, co2_crystal):
    """The kernel rows the fit uses and the dE/dx path of predict are the same function."""
    atoms = co2_crystal.copy()
    atoms.positions += np.random.default_rng(1).normal(scale=0.03, size=atoms.positions.shape)
    features = model._features(atoms, ("positions", "strain"))
    rows = model._rows(features, 1, True, True)
    quick = model.predict(atoms, stress=True)
    assert quick.energy == pytest.approx(
        float(rows["energy"][0] @ model.alpha_ + model._offset_energy([atoms])[0]), abs=1e-10
    )
    np.testing.assert_allclose(quick.forces.ravel(), rows["forces"] @ model.alpha_, atol=1e-10)
    virial = rows["virial"][0] @ model.alpha_
    np.testing.assert_allclose(quick.stress, virial / atoms.get_volume(), atol=1e-12)


def test_a_prediction_runs_on_one_blas_thread_and_restores_the_setting(model, data, monkeypatch):
    """BLAS threads would spin after each call on the cores the baseline needs next."""
    from threadpoolctl import threadpool_info

    def blas_threads() -> set[int]:
        return {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}

    model.predict(data["test"][0])
    # xtb-python brings an OpenBLAS of its own, loaded after the first prediction
    # here (when no test imported it before): it must be held to one thread too.
    with contextlib.suppress(ImportError):
        importlib.import_module("xtb.interface")
    seen = []
    inner = model._predict
    monkeypatch.setattr(model, "_predict", lambda *a: seen.append(blas_threads()) or inner(*a))
    before = blas_threads()
    result = model.predict(data["test"][0])
    assert seen == [{1}] and np.isfinite(result.energy)
    assert blas_threads() == before


# -- calibration of the σ of interaction energies (molecular decomposition) ----------


@pytest.fixture(scope="module")
def interaction_data(gfn_delta, dimer_scan) -> dict[str, list[Atoms]]:
    pairs = [("H2O", "H2O"), ("CH3OH", "H2O"), ("H2O", "CH3OH"), ("CH3OH", "CH3OH")]
    train = [f for k, p in enumerate(pairs * 2) for f in dimer_scan(*p, seed=10 + k)]
    held = [f for k, p in enumerate(pairs) for f in dimer_scan(*p, seed=30 + k)]
    return {
        "train": gfn_delta(_rattled(10, seed=3) + train),
        "held": gfn_delta(held),
        "monomers": gfn_delta(_rattled(6, seed=4)),
    }


@pytest.fixture(scope="module")
def molecular_model(interaction_data) -> SparseGPR:
    return SparseGPR(descriptor=DESCRIPTOR, n_sparse=40, inter_n_sparse=30).fit(
        interaction_data["train"]
    )


def _interaction_sigma(model: SparseGPR, frames: list[Atoms]) -> float:
    weights = np.array([1.0] + [-1.0] * (len(frames) - 1))
    return float(np.sqrt(max(weights @ model.energy_covariance(frames) @ weights, 0.0)))


def test_the_inter_factor_scales_the_sigma_of_an_interaction_and_not_of_a_molecule(
    molecular_model, interaction_data
):
    model = molecular_model
    dimer, first, second = interaction_data["held"][0], *interaction_data["held"][3:5]
    saved = dict(model.uncertainty_scale_)
    try:
        model.uncertainty_scale_ = {"energy": 1.0, "forces": 1.0}
        sigma_int = _interaction_sigma(model, [dimer, first, second])
        sigma_molecule = model.predict(first, forces=False).energy_uncertainty
        sigma_dimer = model.predict(dimer, forces=False).energy_uncertainty
        model.uncertainty_scale_ = {"energy": 1.0, "forces": 1.0, "inter": 3.0}
        assert _interaction_sigma(model, [dimer, first, second]) == pytest.approx(
            3.0 * sigma_int, rel=1e-6
        )
        assert model.predict(first, forces=False).energy_uncertainty == pytest.approx(
            sigma_molecule, rel=1e-12
        )
        # The complex's own σ grows (it holds the inter part), and the covariance keeps
        # agreeing with predict.
        scaled = model.predict(dimer, forces=False).energy_uncertainty
        assert scaled > sigma_dimer
        cov = model.energy_covariance([dimer, first])
        np.testing.assert_allclose(
            np.sqrt(np.diag(cov)),
            [scaled, sigma_molecule],
            rtol=1e-8,
        )
        assert np.linalg.eigvalsh(cov).min() > -1e-10 * np.trace(cov)
        # A floor adds in quadrature to the interaction (once: the complex's own term),
        # not to a molecule.
        floor = 0.5 * sigma_int
        model.uncertainty_scale_ = {
            "energy": 1.0,
            "forces": 1.0,
            "inter": 3.0,
            "inter_floor": floor,
        }
        assert _interaction_sigma(model, [dimer, first, second]) == pytest.approx(
            np.hypot(3.0 * sigma_int, floor), rel=1e-6
        )
        assert model.predict(first, forces=False).energy_uncertainty == pytest.approx(
            sigma_molecule, rel=1e-12
        )
        assert model.predict(dimer, forces=False).energy_uncertainty == pytest.approx(
            np.hypot(scaled, floor), rel=1e-10
        )
        # Without an inter factor the energy factor scales everything, as before.
        model.uncertainty_scale_ = {"energy": 2.0, "forces": 1.0}
        assert _interaction_sigma(model, [dimer, first, second]) == pytest.approx(
            2.0 * sigma_int, rel=1e-6
        )
        assert model.predict(dimer, forces=False).energy_uncertainty == pytest.approx(
            2.0 * sigma_dimer, rel=1e-10
        )
    finally:
        model.uncertainty_scale_ = saved


def test_calibration_on_held_out_interactions_gives_them_unit_z_scores(
    molecular_model, interaction_data
):
    from deltaml.dataset import interaction_groups

    model = SparseGPR(**molecular_model.get_params()).fit(interaction_data["train"])
    held = interaction_data["held"] + interaction_data["monomers"]
    scales = model.calibrate(held)
    assert set(scales) == {"energy", "forces", "forces_floor", "inter", "inter_floor"}
    assert scales["inter"] > 0 and scales["inter_floor"] >= 0
    assert model.uncertainty_scale_ == scales
    groups = interaction_groups(held)
    assert len(groups) == 12
    z = []
    for index, parts in groups:
        members = [held[index], *(held[k] for k in parts)]
        sigma = _interaction_sigma(model, members)
        weights = np.array([1.0] + [-1.0] * len(parts))
        target = weights @ [a.get_potential_energy() for a in members]
        predicted = weights @ [model.predict(a, forces=False).energy for a in members]
        z.append((target - predicted) / sigma)
    assert np.sqrt(np.mean(np.square(z))) == pytest.approx(1.0, rel=1e-6)
    # The energy factor still gives the held-out total energies unit RMS z-score.
    z_total = [
        (a.get_potential_energy() - r.energy) / r.energy_uncertainty
        for a, r in ((a, model.predict(a, forces=False)) for a in held)
    ]
    assert np.sqrt(np.mean(np.square(z_total))) == pytest.approx(1.0, rel=1e-4)


def test_without_interaction_systems_calibration_fits_no_inter_factor(
    molecular_model, interaction_data, model, data
):
    fitted = SparseGPR(**molecular_model.get_params()).fit(interaction_data["train"])
    plain = {"energy", "forces", "forces_floor"}
    assert set(fitted.calibrate(interaction_data["monomers"])) == plain
    # One system (3 complexes) is too few z-scores to trust: no inter factor either.
    assert set(fitted.calibrate(interaction_data["held"][:5])) == plain
    atomic = SparseGPR(**model.get_params()).fit(data["train"])
    assert set(atomic.calibrate(interaction_data["held"][:5] + data["test"][:4])) == plain


def test_the_inter_factor_survives_save_and_load(molecular_model, interaction_data, tmp_path):
    fitted = SparseGPR(**molecular_model.get_params()).fit(interaction_data["train"])
    fitted.calibrate(interaction_data["held"])
    loaded = SparseGPR.load(fitted.save(tmp_path / "model.npz"))
    assert loaded.uncertainty_scale_ == fitted.uncertainty_scale_
    members = interaction_data["held"][:1] + interaction_data["held"][3:5]
    assert _interaction_sigma(loaded, members) == _interaction_sigma(fitted, members)


def test_pooled_calibration_statistics_give_the_factors_of_one_calibration(
    molecular_model, interaction_data
):
    fitted = SparseGPR(**molecular_model.get_params()).fit(interaction_data["train"])
    held = interaction_data["held"]  # 4 systems of 5 frames: halves split no system
    whole = fitted.calibrate(held)
    halves = [fitted.calibration_statistics(part) for part in (held[:10], held[10:])]
    pooled = fitted.calibrate_from(halves)
    assert set(pooled) == set(whole)
    for key, value in whole.items():
        assert pooled[key] == pytest.approx(value, rel=1e-6)


def _synthetic_labels(frames: list[Atoms], seed: int) -> list[Atoms]:
    """Arbitrary Δ energies, forces and (cells) stresses: the fit's arithmetic only."""
    from ase.calculators.singlepoint import SinglePointCalculator

    rng = np.random.default_rng(seed)
    out = []
    for atoms in frames:
        atoms = atoms.copy()
        results = {"energy": rng.normal(), "forces": rng.normal(scale=0.1, size=(len(atoms), 3))}
        if atoms.pbc.all():
            results["stress"] = rng.normal(scale=1e-3, size=6)
        atoms.calc = SinglePointCalculator(atoms, **results)
        out.append(atoms)
    return out


def test_the_fit_does_not_depend_on_how_structures_are_batched(co2_crystal, monkeypatch):
    """Batches bound memory (crystal SOAP gradients take ~9 MB per atom), so they
    must not change the model: identical environments computed in different batches
    differ by ~1e-14 and must still be one sparse point."""
    import deltaml.model as model_module

    cells = [co2_crystal, co2_crystal.repeat((2, 1, 1)), _rattle_copy(co2_crystal, 4)]
    frames = _synthetic_labels([*cells, molecule("CO2"), _rattle_copy(co2_crystal, 5)], seed=0)
    settings = {"n_sparse": 500, "inter_n_sparse": 500}  # full SOAP: many features
    one = SparseGPR(batch_size=1, **settings).fit(frames)
    many = SparseGPR(batch_size=20, **settings)
    monkeypatch.setattr(model_module, "BATCH_ATOMS", 30)
    assert [len(b) for b in many._batches(frames)] == [1, 1, 3]  # 12, 24, 12+3+12 atoms
    monkeypatch.setattr(model_module, "BATCH_ATOMS", 10_000)
    many.fit(frames)
    assert len(one._batches(frames)) == 5 and len(many._batches(frames)) == 1
    np.testing.assert_array_equal(one.sparse_numbers_, many.sparse_numbers_)
    np.testing.assert_allclose(one.sparse_values_, many.sparse_values_, atol=1e-12)
    probe = _rattle_copy(co2_crystal, 9)
    assert _energy(one, probe) == pytest.approx(_energy(many, probe), abs=1e-8)


def _rattle_copy(atoms: Atoms, seed: int) -> Atoms:
    copy = atoms.copy()
    copy.positions += np.random.default_rng(seed).normal(scale=0.03, size=copy.positions.shape)
    return copy


def test_environments_equal_but_for_rounding_noise_are_one_sparse_point(co2_crystal):
    """A cell and its copy moved by 1e-12 Å hold the same environments: the sparse
    points are those of the cell alone (rounding the rows to a grid doubled them)."""
    noisy = co2_crystal.copy()
    noisy.positions += np.random.default_rng(0).normal(scale=1e-12, size=noisy.positions.shape)
    settings = {"n_sparse": 500, "inter_n_sparse": 500}
    alone = SparseGPR(**settings).fit(_synthetic_labels([co2_crystal], seed=1))
    both = SparseGPR(**settings).fit(_synthetic_labels([co2_crystal, noisy], seed=1))
    assert [t.size for t in both.terms_] == [t.size for t in alone.terms_]
    np.testing.assert_array_equal(alone.sparse_numbers_, both.sparse_numbers_)
