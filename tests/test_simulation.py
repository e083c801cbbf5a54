"""Relaxation, MD and vibrations with ASE calculators, and their summaries."""

from __future__ import annotations

import numpy as np
import pytest
from ase import units
from ase.build import molecule
from ase.io import read

from deltaml.baseline import XTBBaseline
from deltaml.errors import ParameterError
from deltaml.simulation import relax, run_md, vibrations


def test_relax_converges_and_lowers_the_energy(tmp_path):
    atoms = molecule("CH3OH")
    atoms.positions += np.random.default_rng(0).normal(scale=0.05, size=atoms.positions.shape)
    atoms.calc = XTBBaseline()
    summary = relax(atoms, fmax=0.01, trajectory=tmp_path / "relax.extxyz")
    assert summary["converged"]
    assert summary["energy_final_ev"] < summary["energy_initial_ev"]
    assert summary["max_force_ev_a"] < 0.01
    assert len(read(tmp_path / "relax.extxyz", ":")) == summary["steps"] + 1


def test_cell_relaxation_needs_a_periodic_structure():
    atoms = molecule("H2O")
    atoms.calc = XTBBaseline()
    with pytest.raises(ParameterError, match="periodic in all three directions"):
        relax(atoms, cell=True)


def test_nve_conserves_energy_and_reports_a_small_drift():
    atoms = molecule("H2O")
    atoms.calc = XTBBaseline()
    summary = run_md(atoms, temperature_k=300, steps=200, timestep_fs=0.25, ensemble="nve")
    total = np.add(summary["potential_ev"], summary["kinetic_ev"])
    assert np.ptp(total) < 5e-3  # eV, 50 fs of a water molecule
    assert abs(summary["energy_drift_ev_per_atom_ps"]) < 5e-3
    assert len(summary["time_fs"]) == 21


def test_langevin_md_is_reproducible_with_a_seed():
    runs = []
    for seed in (4, 4, 5):
        atoms = molecule("H2O")
        atoms.calc = XTBBaseline()
        run_md(atoms, temperature_k=300, steps=30, seed=seed)
        runs.append(atoms.positions.copy())
    # Same seed, same trajectory up to round-off: tblite's OpenMP reductions may
    # change the last bit of a force (1e-16 Å seen in CI), never 1e-10 Å in 30 steps.
    np.testing.assert_allclose(runs[0], runs[1], rtol=0, atol=1e-10)
    # Another seed gives another trajectory.
    assert np.abs(runs[0] - runs[2]).max() > 1e-4


def test_vibrations_of_water_have_three_real_modes():
    atoms = molecule("H2O")
    atoms.calc = XTBBaseline()
    relax(atoms, fmax=0.001)
    frequencies = np.array(vibrations(atoms)["frequencies_cm1"])
    real = frequencies[frequencies > 500]
    assert len(real) == 3  # bend and two stretches; the rest are translations/rotations
    assert 1400 < real[0] < 1700 and 3400 < real[1] < real[2] < 3900


def test_phonons_of_a_crystal_have_three_acoustic_modes_at_gamma():
    from ase.build import bulk
    from ase.calculators.emt import EMT

    from deltaml.simulation import phonons

    atoms = bulk("Cu", "fcc", a=3.6)  # EMT: cheap and periodic, enough to check the plumbing
    atoms.calc = EMT()
    result = phonons(atoms, supercell=(3, 3, 3), kpoints=[[0, 0, 0], [0.5, 0.5, 0.5]])
    gamma, edge = (np.array(f) for f in result["frequencies_cm1"])
    np.testing.assert_allclose(gamma, 0.0, atol=1.0)  # acoustic sum rule imposed
    assert np.all(edge > 50.0)  # at the zone boundary every mode is finite
    with pytest.raises(ParameterError, match="3D-periodic"):
        phonons(molecule("H2O"))


def test_symmetry_constrained_relaxation_keeps_the_space_group():
    from pathlib import Path

    from ase.calculators.lj import LennardJones
    from ase.io import read

    atoms = read(Path(__file__).resolve().parent.parent / "data" / "crystals" / "co2_pa3.extxyz")
    atoms.calc = LennardJones(sigma=2.9, epsilon=0.01, rc=6.0, smooth=True)
    summary = relax(atoms, fmax=0.005, steps=100, cell=True, symmetry=True)
    assert summary["converged"]
    assert summary["space_group"] == "Pa-3 (205)"
    assert summary["space_group_final"] == "Pa-3 (205)"
    assert summary["volume_final_a3"] != pytest.approx(summary["volume_initial_a3"], rel=1e-4)
    # The stress left is reported and obeys the cell filter's criterion, V·σ/N < fmax.
    stress_limit = 0.005 * len(atoms) / atoms.get_volume() / units.GPa
    assert 0.0 <= summary["max_stress_gpa"] < stress_limit * 1.0001
    assert atoms.constraints == []  # the symmetry constraint is removed afterwards


def test_cell_relaxation_starts_with_one_call_of_the_composite(co2_crystal):
    from deltaml import DeltaCalculator, ZeroCorrection

    calc = DeltaCalculator(correction=ZeroCorrection(), method="GFN1-xTB", dispersion=None)
    calls = []
    inner = calc.calculate

    def counted(*args, **kwargs):
        calls.append(args)
        return inner(*args, **kwargs)

    calc.calculate = counted
    co2_crystal.calc = calc
    summary = relax(co2_crystal, fmax=0.05, steps=1, cell=True)
    # One call before the first step, one per step; the final values are cached.
    assert len(calls) == summary["steps"] + 1


def test_stress_threshold_of_a_cell_relaxation_is_met():
    from pathlib import Path

    from ase.calculators.lj import LennardJones
    from ase.io import read

    atoms = read(Path(__file__).resolve().parent.parent / "data" / "crystals" / "co2_pa3.extxyz")
    atoms.calc = LennardJones(sigma=2.9, epsilon=0.01, rc=6.0, smooth=True)
    loose = atoms.copy()
    loose.calc = LennardJones(sigma=2.9, epsilon=0.01, rc=6.0, smooth=True)
    default = relax(loose, fmax=0.05, steps=200, cell=True)
    tight = relax(atoms, fmax=0.05, steps=200, cell=True, stress_tol_gpa=0.001)
    assert tight["converged"]
    assert tight["max_stress_gpa"] < 0.001
    assert tight["max_stress_gpa"] < default["max_stress_gpa"]
    with pytest.raises(ParameterError, match="stress_tol_gpa"):
        relax(atoms, cell=True, stress_tol_gpa=0.0)


def test_trajectories_carry_the_terms_of_each_frame_and_nothing_stale(tmp_path):
    from ase.calculators.singlepoint import SinglePointCalculator

    from deltaml.calculator import DeltaCalculator
    from deltaml.correction import ZeroCorrection

    atoms = molecule("CH3OH")
    atoms.rattle(0.05, seed=1)
    # What an input file of labels brings along: results of its own geometry.
    atoms.info.update(name="methanol", energy_baseline=-1.0, label_key="abc")
    atoms.arrays["forces_baseline"] = np.full((len(atoms), 3), 9.0)
    atoms.calc = SinglePointCalculator(atoms, energy=-2.0)
    calc = DeltaCalculator(correction=ZeroCorrection(), dispersion="d3bj:pbe0")
    atoms.calc = calc
    relax(atoms, fmax=0.05, steps=5, trajectory=tmp_path / "relax.extxyz")
    run_md(atoms, temperature_k=300, steps=4, interval=2, trajectory=tmp_path / "md.extxyz")
    for name in ("relax.extxyz", "md.extxyz"):
        frames = read(tmp_path / name, index=":")
        assert len(frames) >= 2
        for frame in frames:
            assert frame.info["name"] == "methanol" and "label_key" not in frame.info
            probe = frame.copy()
            probe.calc = DeltaCalculator(correction=ZeroCorrection(), dispersion="d3bj:pbe0")
            probe.get_forces()
            expected = probe.calc.results
            assert frame.info["energy_baseline"] == pytest.approx(expected["energy_baseline"])
            assert frame.info["energy_dispersion"] == pytest.approx(expected["energy_dispersion"])
            np.testing.assert_allclose(
                frame.arrays["forces_baseline"], expected["forces_baseline"], atol=1e-3
            )
            assert frame.get_potential_energy() == pytest.approx(expected["energy"])


def _strained_copper():
    from ase.build import bulk

    atoms = bulk("Cu", cubic=True).repeat(2)
    atoms.rattle(0.05, seed=1)
    atoms.set_cell(atoms.cell * 1.03, scale_atoms=True)
    return atoms


def test_preconditioned_cell_relaxation_reaches_the_same_minimum_in_fewer_calls():
    """PreconLBFGS (Exp, scales measured on the cell filter) against BFGS: same minimum,
    fewer force calls, and the stress threshold itself met at the final volume."""
    from ase.calculators.emt import EMT

    done = {}
    for optimizer in ("BFGS", "PreconLBFGS"):
        atoms = _strained_copper()
        atoms.calc = EMT()
        calls = []
        inner = atoms.calc.calculate

        def counted(*args, _calls=calls, _inner=inner, **kwargs):
            _calls.append(1)
            return _inner(*args, **kwargs)

        atoms.calc.calculate = counted
        done[optimizer] = relax(
            atoms, fmax=0.005, steps=200, cell=True, optimizer=optimizer, stress_tol_gpa=0.01
        )
        done[optimizer]["calls"] = len(calls)
        assert done[optimizer]["converged"]
        assert done[optimizer]["optimizer"] == optimizer
    precon, bfgs = done["PreconLBFGS"], done["BFGS"]
    assert precon["energy_final_ev"] == pytest.approx(bfgs["energy_final_ev"], abs=1e-4)
    assert precon["volume_final_a3"] == pytest.approx(bfgs["volume_final_a3"], rel=1e-3)
    assert precon["max_stress_gpa"] < 0.01
    assert precon["calls"] < bfgs["calls"]
    mu, mu_c = precon["precon_mu"]
    assert mu >= 1.0 and mu_c >= 1.0  # measured on the filter, not ASE's singular copy


def test_preconditioned_relaxation_hands_over_to_bfgs_when_its_line_search_fails(monkeypatch):
    from ase.calculators.emt import EMT
    from ase.optimize.precon import PreconLBFGS

    def fails(self, *args, **kwargs):
        raise RuntimeError("Armijo linesearch failed after reset of Hessian, aborting")

    monkeypatch.setattr(PreconLBFGS, "line_search", fails)
    atoms = _strained_copper()
    atoms.calc = EMT()
    summary = relax(atoms, fmax=0.01, steps=200, cell=True, optimizer="PreconLBFGS")
    assert summary["converged"]
    assert summary["fallback"].startswith("BFGS from step 0")
