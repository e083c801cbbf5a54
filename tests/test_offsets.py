"""Per-element offsets: anchored at the isolated atoms, with an honest uncertainty."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule
from ase.calculators.singlepoint import SinglePointCalculator

from deltaml.errors import OutOfDomainWarning, ParameterError
from deltaml.model import SparseGPR
from deltaml.offsets import (
    UNANCHORED_WIDTH,
    fit_offsets,
    split_isolated_atoms,
)
from deltaml.structures import composition_counts

HY, CA, OX = 1, 6, 8
SPECIES = [HY, CA, OX]
#: Δ per element (eV) of a made-up reference, and of its isolated atoms: the two differ
#: by a few eV, as the atomisation energies of a DFT and a tight-binding method do.
TRUE = np.array([-3.0, -980.0, -1940.0])
ANCHORS = {HY: -3.4, CA: -982.5, OX: -1943.6}


def _water_and_ethanol(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Counts and energies of (H2O)1-6 and ethanol: two compositions for three elements."""
    rng = np.random.default_rng(seed)
    counts = np.array([[2 * n, 0, n] for n in range(1, 7)] + [[6, 2, 1]] * 4, dtype=float)
    energies = counts @ TRUE + rng.normal(scale=0.05, size=len(counts)) * np.sqrt(
        counts.sum(axis=1)
    )
    return counts, energies


def test_offsets_of_undetermined_elements_fall_back_to_the_isolated_atoms():
    counts, energies = _water_and_ethanol()
    methane, co2 = np.array([[4.0, 1, 0]]), np.array([[0.0, 1, 2]])
    loose = fit_offsets(counts, energies, SPECIES)
    anchored = fit_offsets(counts, energies, SPECIES, ANCHORS)
    for probe in (methane, co2):
        truth = float((probe @ TRUE)[0])
        error = abs(float(anchored.energy(probe)[0]) - truth)
        sigma = np.sqrt(anchored.covariance_of(probe)[0, 0])
        assert error < 10.0  # was hundreds to thousands of eV without the anchors
        assert error < 3 * sigma  # and the uncertainty says how far off it may be
        # Without anchors the direction is not determined, and the σ says so.
        assert np.sqrt(loose.covariance_of(probe)[0, 0]) > 0.1 * UNANCHORED_WIDTH
    # What the data determine, they still determine: water and ethanol themselves.
    for probe in (counts[:1], counts[-1:]):
        assert float(anchored.energy(probe)[0]) == pytest.approx(
            float(loose.energy(probe)[0]), abs=0.1
        )
        assert np.sqrt(anchored.covariance_of(probe)[0, 0]) < 0.2


def test_compositions_outside_the_training_span_are_flagged():
    counts, energies = _water_and_ethanol()
    offsets = fit_offsets(counts, energies, SPECIES, ANCHORS)
    inside = np.array([[4.0, 0, 2], [12, 4, 2], [10, 2, 3]])  # (H2O)2, 2 ethanol, ethanol+2 H2O
    outside = np.array([[4.0, 1, 0], [0, 1, 2], [2, 0, 0]])  # CH4, CO2, H2
    assert not offsets.outside_span(inside).any()
    assert offsets.outside_span(outside).all()


def test_with_every_element_determined_the_anchors_change_nothing_that_matters():
    counts = np.array([[2, 0, 1], [4, 1, 0], [0, 1, 2], [6, 2, 1], [2, 1, 1]], dtype=float)
    energies = counts @ TRUE
    loose = fit_offsets(counts, energies, SPECIES)
    anchored = fit_offsets(counts, energies, SPECIES, ANCHORS)
    assert anchored.mean == pytest.approx(TRUE, abs=1e-3)
    assert loose.mean == pytest.approx(TRUE, abs=1e-6)
    assert not anchored.outside_span(np.array([[1.0, 1, 1]])).any()


def _labelled(atoms: Atoms, energy: float) -> Atoms:
    atoms = atoms.copy()
    atoms.calc = SinglePointCalculator(atoms, energy=energy)
    return atoms


def test_isolated_atoms_are_split_off_and_a_conflict_is_refused():
    frames = [_labelled(Atoms("O"), ANCHORS[OX]), _labelled(molecule("H2O"), -1950.0)]
    anchors, rest = split_isolated_atoms(frames)
    assert anchors == {OX: ANCHORS[OX]} and len(rest) == 1 and len(rest[0]) == 3
    with pytest.raises(ParameterError, match="isolated-atom labels of O differ"):
        split_isolated_atoms([*frames, _labelled(Atoms("O"), ANCHORS[OX] + 1.0)])


def _frames(seed: int = 0) -> list[Atoms]:
    """Water and ethanol with Δ = Σ per-element constants + a small geometry term."""
    rng = np.random.default_rng(seed)
    frames = []
    for k in range(8):
        atoms = molecule(("H2O", "CH3CH2OH")[k % 2])
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
        n = composition_counts([atoms], SPECIES)[0]
        frames.append(_labelled(atoms, float(n @ TRUE) + 0.01 * float(rng.normal())))
    return frames


def test_the_model_warns_outside_the_training_compositions_and_widens_its_sigma(tmp_path):
    atoms = [_labelled(Atoms(s), ANCHORS[z]) for s, z in (("H", HY), ("C", CA), ("O", OX))]
    descriptor = {"cutoff": 3.5, "n_max": 3, "l_max": 2}
    model = SparseGPR(descriptor=descriptor, n_sparse=10, uncertainty="energy")
    model.fit(_frames() + atoms)
    assert model.n_isolated_atoms_ == 3 and model.n_train_ == 8
    assert model.training_multiplicities_ == [1]  # the open-shell atoms only anchor
    assert set(model.offset_fit_.anchored) == {HY, CA, OX}
    methane = molecule("CH4")
    with pytest.warns(OutOfDomainWarning, match="CH4 is outside the span"):
        outside = model.predict(methane, forces=False)
    assert abs(outside.energy - float(composition_counts([methane], SPECIES)[0] @ TRUE)) < 10.0
    assert outside.energy_uncertainty > 1.0  # eV: the offsets are not known here
    with warnings.catch_warnings():
        warnings.simplefilter("error", OutOfDomainWarning)
        inside = model.predict(molecule("H2O"), forces=False)
    assert inside.energy_uncertainty < 0.5
    loaded = SparseGPR.load(model.save(tmp_path / "model.npz"))
    np.testing.assert_array_equal(loaded.offset_fit_.covariance, model.offset_fit_.covariance)
    assert loaded.training_multiplicities_ == [1]
    with pytest.warns(OutOfDomainWarning):
        again = loaded.predict(methane, forces=False)
    assert again.energy_uncertainty == pytest.approx(outside.energy_uncertainty, rel=1e-12)
    # Isolated atoms anchor the offsets; they are not held-out data for calibration.
    held = _frames(seed=1)
    assert model.calibrate(held + atoms) == model.calibrate(held)


def test_isolated_atoms_in_other_units_than_the_training_energies_are_refused():
    counts, energies = _water_and_ethanol()
    in_hartree = {z: e / 27.211386 for z, e in ANCHORS.items()}
    with pytest.raises(ParameterError, match="isolated-atom labels differ"):
        fit_offsets(counts, energies, SPECIES, in_hartree)
