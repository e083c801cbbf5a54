"""Evaluation: errors of composite and baseline alone, and the plots."""

from __future__ import annotations

import numpy as np
import pytest

from deltaml.dataset import delta_targets
from deltaml.evaluation import (
    delta_targets_for,
    error_table,
    errors,
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


def test_plots_are_written(fitted, tmp_path):
    model, test = fitted
    predictions = predict_all(model, delta_targets_for(model, test))
    for plot in (plot_parity, plot_calibration):
        path = plot(predictions, tmp_path / f"{plot.__name__}.png")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
