"""Evaluation: errors of composite and baseline alone, and the plots."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from deltaml.dataset import delta_targets
from deltaml.errors import TermMismatchError
from deltaml.evaluation import (
    delta_targets_for,
    error_table,
    errors,
    parity_values,
    plot_calibration,
    plot_parity,
    predict_all,
)
from deltaml.model import SparseGPR

DESCRIPTOR = {"cutoff": 4.0, "n_max": 4, "l_max": 3}


@pytest.fixture(scope="module")
def fitted(stand_in_labels):
    targets, terms = delta_targets(stand_in_labels(40, seed=0))
    model = SparseGPR(descriptor=DESCRIPTOR, n_sparse=50).fit(targets, trained_with=terms)
    return model, stand_in_labels(12, seed=1)


def test_errors_match_a_direct_computation(fitted):
    model, test = fitted
    targets = delta_targets_for(model, test)
    table = errors(predict_all(model, targets))
    n_atoms = np.array([len(a) for a in targets])
    predicted = np.array([model.predict(a).energy for a in targets])
    reference = np.array([a.get_potential_energy() for a in targets])
    mae = 1000 * np.mean(np.abs(predicted - reference) / n_atoms)
    assert table["composite"]["energy_mae_mev_per_atom"] == pytest.approx(mae)
    forces = np.concatenate([a.get_forces() for a in targets])
    # baseline alone predicts no Δ force: its force error is the Δ force itself
    assert table["baseline"]["force_mae"] == pytest.approx(np.mean(np.abs(forces)))
    assert table["composite"]["force_mae"] < table["baseline"]["force_mae"]
    assert set(table["composite"]["force_mae_by_element"]) == {"H", "C", "O"}
    assert "composite" in error_table(table).splitlines()[0]


def test_delta_targets_for_a_model_use_its_terms(fitted, stand_in_labels):
    model, test = fitted
    expected, _ = delta_targets(test)
    for mine, theirs in zip(delta_targets_for(model, test), expected, strict=True):
        assert mine.get_potential_energy() == pytest.approx(theirs.get_potential_energy())


def test_a_model_trained_against_other_terms_is_refused_not_evaluated(fitted):
    model, test = fitted
    original = model.trained_with_
    changed = copy.deepcopy(original)
    # Another parametrization of the baseline: the rebuilt terms cannot reproduce it.
    changed["baseline"]["parametrization_sha256"] = "0" * 64
    model.trained_with_ = changed
    try:
        with pytest.raises(TermMismatchError, match="parametrization_sha256"):
            delta_targets_for(model, test)
    finally:
        model.trained_with_ = original


def test_the_parity_plot_shows_energies_beyond_the_offsets_and_total_forces(fitted):
    model, test = fitted
    targets = delta_targets_for(model, test)
    predictions = predict_all(model, targets)
    (energy, _), (forces, unit) = parity_values(predictions).values()
    # Relative to the offsets, a few hundred meV/atom at most (not ±10⁶).
    assert np.abs(energy["reference"]).max() < 500.0
    assert np.all(energy["baseline+D3"] == 0.0)
    # Forces are totals: the reference method's (the label + its D3 partner), not Δ forces.
    from deltaml.dispersion import D3Dispersion, parse_dispersion_spec

    partner = D3Dispersion(
        **parse_dispersion_spec(test[0].info["method_record"]["dispersion_partner"])
    )
    d3 = []
    for atoms in test:
        probe = atoms.copy()
        probe.calc = partner
        d3.append(probe.get_forces())
    total = np.concatenate([a.get_forces() + f for a, f in zip(test, d3, strict=True)]).ravel()
    assert np.abs(np.concatenate(d3)).max() > 1e-4  # the partner is there to be missed
    np.testing.assert_allclose(forces["reference"], total, atol=1e-10)
    delta = np.concatenate([a.get_forces() for a in targets]).ravel()
    np.testing.assert_allclose(forces["reference"] - forces["baseline+D3"], delta, atol=1e-10)
    assert unit == "eV/Å"


def test_plots_are_written(fitted, tmp_path):
    model, test = fitted
    predictions = predict_all(model, delta_targets_for(model, test))
    for plot in (plot_parity, plot_calibration):
        path = plot(predictions, tmp_path / f"{plot.__name__}.png")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_coverage_of_a_calibrated_gaussian_is_gaussian():
    from deltaml.evaluation import GAUSSIAN_COVERAGE, coverage

    rng = np.random.default_rng(0)
    sigmas = rng.uniform(0.5, 2.0, 20000)
    found = coverage(rng.normal(scale=sigmas), sigmas)
    assert found["1sigma"] == pytest.approx(GAUSSIAN_COVERAGE["1sigma"], abs=0.01)
    assert found["2sigma"] == pytest.approx(GAUSSIAN_COVERAGE["2sigma"], abs=0.01)
    assert found["rms_z"] == pytest.approx(1.0, abs=0.02)
    overconfident = coverage(rng.normal(scale=sigmas), sigmas / 3)
    assert overconfident["1sigma"] < 0.35


class _Flipped:
    """A deliberately broken potential: the baseline with energy and forces negated."""

    def __new__(cls):
        from ase.calculators.calculator import Calculator, all_changes

        from deltaml.baseline import XTBBaseline

        class Flipped(Calculator):
            implemented_properties = ["energy", "forces"]

            def calculate(self, atoms=None, properties=("energy",), changes=all_changes):
                super().calculate(atoms, properties, changes)
                probe = self.atoms.copy()
                probe.calc = XTBBaseline()
                self.results = {
                    "energy": -probe.get_potential_energy(),
                    "forces": -probe.get_forces(),
                }

        return Flipped()


def test_stability_passes_the_reference_and_flags_a_broken_potential():
    from ase.build import molecule

    from deltaml.baseline import XTBBaseline
    from deltaml.evaluation import md_stability

    atoms = molecule("CH3OH")
    reference = XTBBaseline(method="GFN1-xTB")
    good = md_stability(atoms, reference, steps=300, reference=reference, samples=3)
    assert good["stable"] and good["events"] == []
    assert [s["force_mae"] for s in good["samples"]] == pytest.approx([0.0, 0.0, 0.0])
    bad = md_stability(atoms, _Flipped(), steps=300)
    assert not bad["stable"]
    assert bad["events"][0]["kind"] in {"bond broken", "bond formed", "atoms too close",
                                        "calculation failed"}  # fmt: skip


def test_stability_reports_errors_against_the_reference_along_the_run(fitted):
    from deltaml.baseline import XTBBaseline
    from deltaml.calculator import DeltaCalculator
    from deltaml.correction import ZeroCorrection
    from deltaml.evaluation import md_stability

    model, test = fitted
    atoms = test[1].copy()  # methanol
    calc = DeltaCalculator.from_model(model)
    baseline = DeltaCalculator(correction=ZeroCorrection(), dispersion="d3bj:pbe0")
    report = md_stability(
        atoms, calc, steps=200, reference=XTBBaseline(method="GFN1-xTB"), baseline=baseline,
        samples=4,
    )  # fmt: skip
    assert report["stable"]
    last = report["samples"][-1]
    assert last["force_mae"] < last["baseline_force_mae"]  # the correction helps along MD
    assert last["max_force_uncertainty_ev_a"] > 0
    assert report["calibration"]["forces"]["n"] == 4 * len(atoms)


def _labelled(frames: list) -> list:
    """Δ = GFN1 − GFN2 with ``info["reference_energy"]`` = GFN1 (the "terms" are GFN2)."""
    from ase.calculators.singlepoint import SinglePointCalculator

    from deltaml.baseline import XTBBaseline

    gfn1, gfn2 = XTBBaseline(method="GFN1-xTB"), XTBBaseline(method="GFN2-xTB")
    out = []
    for atoms in frames:
        energies = []
        for calc in (gfn1, gfn2):
            probe = atoms.copy()
            probe.calc = calc
            energies.append(probe.get_potential_energy())
        labelled = atoms.copy()
        labelled.calc = SinglePointCalculator(labelled, energy=energies[0] - energies[1])
        labelled.info["reference_energy"] = energies[0]
        out.append(labelled)
    return out


#: Scan of each dimer: 1, 1.15 and 1.3 × the contact distance.
_SCAN = (1.0, 1.15, 1.3)


def test_interaction_sigmas_follow_the_calibrated_inter_factor(dimer_scan):
    from ase.units import kcal, mol

    from deltaml.dataset import interaction_groups
    from deltaml.evaluation import interaction_coverage, interaction_energies

    pairs = [("H2O", "H2O"), ("CH3OH", "H2O"), ("H2O", "CH3OH"), ("CH3OH", "CH3OH")]
    train = _labelled([f for k, p in enumerate(pairs * 2) for f in dimer_scan(*p, 10 + k, _SCAN)])
    held = _labelled([f for k, p in enumerate(pairs) for f in dimer_scan(*p, 30 + k, _SCAN)])
    model = SparseGPR(descriptor=DESCRIPTOR, n_sparse=30, inter_n_sparse=20, uncertainty="energy")
    model.fit(train)
    before = interaction_energies(model, held)
    assert len(before) == len(interaction_groups(held)) == 12
    scales = model.calibrate(held)
    after = interaction_energies(model, held)
    # Uncalibrated (factors 1) before: after, √(s_I² σ² + τ²), τ in kcal/mol here.
    floor = scales["inter_floor"] / (kcal / mol)
    for old, new in zip(before, after, strict=True):
        assert new["composite"] == old["composite"]
        want = np.hypot(scales["inter"] * old["sigma"], floor)
        assert new["sigma"] == pytest.approx(want, rel=1e-6, abs=1e-9)
    found = interaction_coverage(after)
    assert found["n"] == 12
    assert found["rms_z"] == pytest.approx(1.0, rel=1e-6)


def test_a_cross_calibrated_fit_keeps_all_data_and_calibrates_interactions(dimer_scan):
    from deltaml.errors import ParameterError
    from deltaml.evaluation import cross_calibrated_fit

    pairs = [("H2O", "H2O"), ("CH3OH", "H2O"), ("H2O", "CH3OH"), ("CH3OH", "CH3OH")]
    frames = _labelled([f for k, p in enumerate(pairs * 2) for f in dimer_scan(*p, 50 + k, _SCAN)])
    template = SparseGPR(descriptor=DESCRIPTOR, n_sparse=30, inter_n_sparse=20)
    model = cross_calibrated_fit(template, frames, folds=3, seed=1)
    assert not hasattr(template, "alpha_")  # the template is not fitted
    plain = SparseGPR(**template.get_params()).fit(frames)
    np.testing.assert_array_equal(model.alpha_, plain.alpha_)  # fitted on everything
    # Every system was held out whole once: its interaction energies calibrate σ.
    assert {"inter", "inter_floor"} <= set(model.uncertainty_scale_)
    with pytest.raises(ParameterError, match="folds"):
        cross_calibrated_fit(template, frames, folds=1)


def test_a_cross_calibrated_fit_holds_out_named_systems_whole_and_skips_unseen_elements():
    """Cells of one crystal are held out together (else σ is calibrated on near-copies);
    a held-out structure of an element no other has (the only NH3) cannot be predicted
    by its fold's model and is left out of the calibration instead of failing it."""
    from ase.build import molecule

    from deltaml.evaluation import cross_calibrated_fit

    rng = np.random.default_rng(3)
    frames = []
    for name in ("H2O", "CH3OH", "CH4", "C2H6", "CO2", "H2CO"):
        for _ in range(3):  # three rattled copies of one "system"
            atoms = molecule(name)
            atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
            atoms.info["system"] = name
            frames.append(atoms)
    frames.append(molecule("NH3"))
    frames = _labelled(frames)
    template = SparseGPR(descriptor=DESCRIPTOR, n_sparse=20, uncertainty="energy")
    held_out: list[list[str]] = []
    original = SparseGPR.calibration_statistics

    def spy(self, held):
        held_out.append(sorted(str(a.info.get("system", a.get_chemical_formula())) for a in held))
        return original(self, held)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SparseGPR, "calibration_statistics", spy)
        model = cross_calibrated_fit(template, frames, folds=3, seed=0)
    assert model.uncertainty_scale_["energy"] > 0
    seen = [name for fold in held_out for name in fold]
    assert "H3N" not in seen and len(seen) == 18  # every copy held out once, NH3 never
    for fold in held_out:  # whole systems: three copies of each name
        assert all(fold.count(name) == 3 for name in fold)


def test_the_crystal_model_uses_crystal_params_and_calibrates_over_systems():
    """fit_crystal_model is the one recipe of the crystal benchmark and example:
    CRYSTAL_PARAMS, energy σ, cross-calibrated; overrides win."""
    from ase.build import molecule

    from deltaml.evaluation import cross_calibrated_fit, fit_crystal_model
    from deltaml.model import CRYSTAL_PARAMS

    rng = np.random.default_rng(5)
    frames = []
    for name in ("H2O", "CH3OH", "CH4", "C2H6"):
        for _ in range(2):
            atoms = molecule(name)
            atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
            atoms.info["system"] = name
            frames.append(atoms)
    frames = _labelled(frames)
    model = fit_crystal_model(frames, seed=2, folds=2, descriptor=DESCRIPTOR, n_sparse=10)
    assert model.inter_delta == CRYSTAL_PARAMS["inter_delta"]
    assert model.uncertainty == "energy" and model.uncertainty_scale_["energy"] > 0
    template = SparseGPR(descriptor=DESCRIPTOR, n_sparse=10, seed=2, uncertainty="energy",
                         **CRYSTAL_PARAMS)  # fmt: skip
    same = cross_calibrated_fit(template, frames, folds=2, seed=2)
    np.testing.assert_array_equal(model.alpha_, same.alpha_)
    assert model.uncertainty_scale_ == same.uncertainty_scale_
    assert fit_crystal_model(frames, folds=2, descriptor=DESCRIPTOR, n_sparse=10,
                             inter_delta=0.01).inter_delta == 0.01  # fmt: skip
