"""Tests of deltaml.calculator: the composite of baseline + correction + D3."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.fd import calculate_numerical_forces, calculate_numerical_stress
from ase.filters import FrechetCellFilter
from ase.md import velocitydistribution
from ase.md.langevin import Langevin
from ase.md.verlet import VelocityVerlet
from ase.optimize import BFGS, FIRE
from ase.units import fs, kcal, mol
from conftest import requires_xtb

from deltaml.baseline import XTBBaseline
from deltaml.calculator import DeltaCalculator, energy_budget
from deltaml.correction import CorrectionResult, ZeroCorrection
from deltaml.dispersion import D3Dispersion
from deltaml.errors import ParameterError, TermMismatchError, UnsupportedCapabilityError

TIGHT = {"accuracy": 0.01}


class HarmonicCorrection:
    """A smooth analytic stand-in for a learned correction, with uncertainty.

    E = k Σ_i |r_i − r̄|² over atoms (r̄: centroid of the given positions),
    translation and rotation invariant. Under a homogeneous strain every r_i − r̄
    is strained, which gives its stress (a toy: it is not periodic-image aware).
    """

    name = "harmonic"

    def __init__(self, k: float = 0.05, trained_with: dict | None = None) -> None:
        self.k = k
        self.trained_with = trained_with

    def predict(self, atoms: Atoms, *, forces: bool, stress: bool) -> CorrectionResult:
        centred = atoms.positions - atoms.positions.mean(axis=0)
        energy = self.k * float((centred**2).sum())
        return CorrectionResult(
            energy=energy,
            forces=-2.0 * self.k * centred if forces else None,
            # Σ r_i r_i^T scales with the strain: virial = -2k Σ r r^T, stress = -virial/V.
            stress=(
                (2.0 * self.k * centred.T @ centred / atoms.get_volume()).flat[[0, 4, 8, 5, 2, 1]]
                if stress
                else None
            ),
            energy_uncertainty=0.01 * len(atoms),
            forces_uncertainty=np.full(len(atoms), 0.02),
        )


def _composite(**kwargs) -> DeltaCalculator:
    kwargs.setdefault("correction", ZeroCorrection())
    return DeltaCalculator(**kwargs)


def _energy(atoms: Atoms, calc) -> float:
    work = atoms.copy()
    work.calc = calc
    return work.get_potential_energy()


# -- the sum and the budget ------------------------------------------------------------


def test_sum_of_terms_equals_independent_term_calculators(ethanol):
    calc = _composite(correction=HarmonicCorrection(), **TIGHT)
    ethanol.calc = calc
    energy, forces = ethanol.get_potential_energy(), ethanol.get_forces()
    baseline = XTBBaseline(remove_dispersion=True, **TIGHT)
    d3 = D3Dispersion(method="pbe0", damping="d3bj")
    e_base, e_d3 = _energy(ethanol, baseline), _energy(ethanol, d3)
    e_corr = HarmonicCorrection().predict(ethanol, forces=False, stress=False).energy
    assert calc.results["energy_baseline"] == pytest.approx(e_base, abs=1e-8)
    assert calc.results["energy_dispersion"] == pytest.approx(e_d3, abs=1e-10)
    assert calc.results["energy_correction"] == pytest.approx(e_corr, abs=1e-12)
    assert energy == pytest.approx(e_base + e_d3 + e_corr, abs=1e-8)
    np.testing.assert_allclose(
        forces,
        calc.results["forces_baseline"]
        + calc.results["forces_dispersion"]
        + calc.results["forces_correction"],
        atol=1e-12,
    )
    assert calc.results["free_energy"] == energy


def test_uncertainty_passed_through_only_when_given(water):
    water.calc = calc = _composite(correction=HarmonicCorrection())
    water.get_forces()
    assert calc.results["energy_uncertainty"] == pytest.approx(0.03)
    np.testing.assert_allclose(calc.results["forces_uncertainty"], 0.02)
    water.calc = calc = _composite()
    water.get_forces()
    assert "energy_uncertainty" not in calc.results  # never a fake zero


def test_energy_budget_terms_add_up(ethanol):
    budget = energy_budget(ethanol, _composite())
    assert sum(budget["terms"].values()) == pytest.approx(budget["energy"], abs=1e-10)
    assert budget["terms"]["correction"] == 0.0
    assert budget["terms"]["dispersion"] < 0.0
    assert budget["max_force"] > 0.0
    assert budget["records"]["baseline"]["remove_dispersion"] is True


# -- derivatives -----------------------------------------------------------------------


def test_forces_match_finite_differences_molecule(ethanol):
    """Composite with a non-zero correction; step 1e-3 Å, tolerance 5e-4 eV/Å."""
    ethanol.calc = _composite(correction=HarmonicCorrection(), **TIGHT)
    np.testing.assert_allclose(
        ethanol.get_forces(), calculate_numerical_forces(ethanol, 1e-3), atol=5e-4
    )


@pytest.mark.slow
def test_forces_and_stress_match_finite_differences_crystal(water_chain):
    """Composite on a narrow cell (3×1×1 supercell path) with a non-zero correction.
    Steps 1e-3 Å and strain 1e-4; tolerances 5e-4 eV/Å and 1e-5 eV/Å³."""
    atoms = water_chain
    atoms.calc = _composite(correction=HarmonicCorrection(), **TIGHT)
    stress = atoms.get_stress()
    terms = {t: atoms.calc.results[f"stress_{t}"] for t in ("baseline", "dispersion", "correction")}
    np.testing.assert_allclose(
        atoms.get_forces(), calculate_numerical_forces(atoms, 1e-3), atol=5e-4
    )
    np.testing.assert_allclose(stress, calculate_numerical_stress(atoms, 1e-4), atol=1e-5)
    for term, value in terms.items():
        assert np.abs(value).max() > 1e-6, term  # each term contributes to the check


def test_stress_of_molecule_is_not_implemented(water):
    water.calc = _composite()
    with pytest.raises(PropertyNotImplementedError, match="periodic"):
        water.get_stress()


# -- invariances -------------------------------------------------------------------------


def test_energy_invariant_to_rotation_translation_permutation(ethanol, rotation):
    calc = _composite(correction=HarmonicCorrection(), **TIGHT)
    reference = _energy(ethanol, calc)
    moved = ethanol.copy()
    moved.positions = moved.positions @ rotation.T + np.array([-4.0, 2.5, 9.0])
    shuffled = ethanol[np.random.default_rng(5).permutation(len(ethanol))]
    assert _energy(moved, calc) == pytest.approx(reference, abs=1e-6)
    assert _energy(shuffled, calc) == pytest.approx(reference, abs=1e-6)


def test_equivalent_cell_gives_proportional_energy(water_chain):
    calc = _composite(**TIGHT)
    single = _energy(water_chain, calc)
    assert _energy(water_chain.repeat((3, 1, 1)), calc) == pytest.approx(3 * single, abs=1e-6)


def test_size_extensive_separated_molecules():
    """Methane and benzene 30 Å apart: sum of the parts to 5e-6 eV (the D3 C6 tail
    at 30 Å is ~1e-7 eV)."""
    methane, benzene = molecule("CH4"), molecule("C6H6")
    far = benzene.copy()
    far.translate([30.0, 0.0, 0.0])
    calc = _composite()
    parts = _energy(methane, calc) + _energy(benzene, calc)
    assert _energy(methane + far, calc) == pytest.approx(parts, abs=5e-6)


# -- dispersion counted once -------------------------------------------------------------


def _interaction(calc, dimer: Atoms, n_first: int) -> float:
    return _energy(dimer, calc) - _energy(dimer[:n_first], calc) - _energy(dimer[n_first:], calc)


@pytest.mark.parametrize("distance", [4.0, 6.0, 9.0, 12.0])
def test_interaction_tail_is_dispersion_free_baseline_plus_d3(make_dimer, distance):
    """Along a benzene dimer pulled apart, the composite's interaction energy is the
    dispersion-free baseline's plus D3's (each from its own calculator), to 1e-7 eV."""
    dimer = make_dimer(distance)
    n = len(dimer) // 2
    composite = _interaction(_composite(), dimer, n)
    free = _interaction(XTBBaseline(remove_dispersion=True), dimer, n)
    d3 = _interaction(D3Dispersion(method="pbe0", damping="d3bj"), dimer, n)
    assert composite == pytest.approx(free + d3, abs=1e-7)


def test_stacking_d3_on_full_gfn2_would_overbind(make_dimer):
    """Why the baseline's own dispersion is removed: at 3.8 Å (stacked benzene),
    GFN2 (with D4) + D3 binds more than the composite by roughly a whole dispersion
    term — more than 2 kcal/mol here (the brief measured ~3.5 kcal/mol)."""
    dimer = make_dimer(3.8)
    n = len(dimer) // 2
    composite = _interaction(_composite(), dimer, n)
    full_gfn2 = _interaction(XTBBaseline(), dimer, n)
    d3 = _interaction(D3Dispersion(method="pbe0", damping="d3bj"), dimer, n)
    overbinding = composite - (full_gfn2 + d3)
    assert overbinding > 2.0 * kcal / mol


def test_double_counting_is_refused():
    with pytest.raises(ParameterError, match="counted twice"):
        DeltaCalculator(correction=ZeroCorrection(), baseline_dispersion=True)
    calc = DeltaCalculator(correction=ZeroCorrection(), baseline_dispersion=True, dispersion=None)
    with pytest.raises(ParameterError, match="counted twice"):
        calc.set(dispersion="d3bj:pbe0")


def test_baseline_dispersion_without_d3_is_the_full_method(ethanol):
    calc = _composite(baseline_dispersion=True, dispersion=None)
    assert _energy(ethanol, calc) == pytest.approx(_energy(ethanol, XTBBaseline()), abs=1e-8)


# -- the correction --------------------------------------------------------------------


def test_correction_is_required():
    with pytest.raises(ParameterError, match="correction=ZeroCorrection"):
        DeltaCalculator()
    with pytest.raises(ParameterError, match="does not follow the Correction protocol"):
        DeltaCalculator(correction=object())


def test_correction_fitted_against_other_terms_is_refused(water):
    record = _composite().terms_record()
    water.calc = _composite(correction=HarmonicCorrection(trained_with=record))
    assert np.isfinite(water.get_potential_energy())  # same terms: accepted

    altered = _composite(dispersion="d3bj:pbe").terms_record()
    water.calc = _composite(correction=HarmonicCorrection(trained_with=altered))
    with pytest.raises(TermMismatchError, match=r"dispersion\.parameters\.a1: 0\.4289 != 0\.4145"):
        water.get_potential_energy()

    gfn1 = _composite(method="gfn1").terms_record()
    water.calc = _composite(correction=HarmonicCorrection(trained_with=gfn1))
    with pytest.raises(TermMismatchError, match=r"baseline\.method: 'GFN1-xTB' != 'GFN2-xTB'"):
        water.get_potential_energy()


# -- parameters and engines ---------------------------------------------------------------


def test_set_forwards_cheap_parameters_without_rebuilding(ethanol):
    ethanol.calc = calc = _composite()
    e_gfn2 = ethanol.get_potential_energy()
    engine = calc.baseline._engine
    calc.set(accuracy=0.1)
    ethanol.get_potential_energy()
    assert calc.baseline._engine is engine
    calc.set(method="gfn1")
    e_gfn1 = ethanol.get_potential_energy()
    assert calc.baseline._engine is not engine
    assert calc.terms_record()["baseline"]["method"] == "GFN1-xTB"
    assert abs(e_gfn1 - e_gfn2) > 1.0  # different Hamiltonians, different energy zero
    calc.set(dispersion="d3zero:pbe0")
    assert calc.terms_record()["dispersion"]["damping"] == "d3zero"


@requires_xtb
def test_xtb_engine_composite_matches_tblite_for_gfn1(ethanol):
    a = _energy(ethanol, _composite(method="gfn1", engine="xtb", **TIGHT))
    b = _energy(ethanol, _composite(method="gfn1", engine="tblite", **TIGHT))
    assert a == pytest.approx(b, abs=1e-5)


@requires_xtb
def test_xtb_engine_gfn2_composite_is_refused(ethanol):
    """GFN2's D4 cannot be removed in xtb-python: refused, not silently doubled."""
    ethanol.calc = _composite(engine="xtb")
    with pytest.raises(UnsupportedCapabilityError, match="D4 cannot be switched off"):
        ethanol.get_potential_energy()


def test_docstring_table_matches_default_parameters():
    from test_baseline import _check_table

    _check_table(DeltaCalculator)


# -- with ASE optimizers and MD -------------------------------------------------------------


def test_bfgs_relaxation_converges(water):
    water.calc = _composite()
    start = water.get_potential_energy()
    assert BFGS(water, logfile=None).run(fmax=0.01, steps=100)
    assert water.get_potential_energy() < start
    assert np.linalg.norm(water.get_forces(), axis=1).max() < 0.01


@pytest.mark.slow
def test_fire_cell_relaxation_lowers_enthalpy(water_chain):
    water_chain.calc = _composite()
    filtered = FrechetCellFilter(water_chain)
    start = water_chain.get_potential_energy()
    FIRE(filtered, logfile=None).run(fmax=0.05, steps=15)
    assert water_chain.get_potential_energy() < start
    assert water_chain.calc.results["supercell_repeats"][0] >= 2


def test_velocity_verlet_conserves_energy(ethanol):
    """NVE, 0.25 fs steps, 40 steps from 300 K: total energy drift below 5 meV."""
    ethanol.calc = _composite(**TIGHT)
    # thermalize_momenta replaces MaxwellBoltzmannDistribution from ASE 3.29 on.
    thermalize = getattr(
        velocitydistribution,
        "thermalize_momenta",
        velocitydistribution.MaxwellBoltzmannDistribution,
    )
    thermalize(ethanol, temperature_K=300, rng=np.random.default_rng(3))
    total = [ethanol.get_total_energy()]
    dyn = VelocityVerlet(ethanol, timestep=0.25 * fs, logfile=None)
    dyn.attach(lambda: total.append(ethanol.get_total_energy()), interval=5)
    dyn.run(40)
    assert np.ptp(total) < 5e-3


def test_langevin_is_reproducible_with_a_seed(water):
    """Same seed, same trajectory (to 1e-8 Å: tblite's OpenMP reductions are not
    bit-for-bit repeatable); another seed moves the atoms differently (>1e-4 Å)."""

    def run(seed: int) -> np.ndarray:
        atoms = water.copy()
        atoms.calc = _composite()
        dyn = Langevin(
            atoms,
            0.5 * fs,
            temperature_K=300,
            friction=0.02,
            rng=np.random.default_rng(seed),
            fixcm=False,
            logfile=None,
        )
        dyn.run(10)
        return atoms.positions.copy()

    first, second, other = run(9), run(9), run(10)
    np.testing.assert_allclose(first, second, atol=1e-8, rtol=0)
    assert np.abs(first - other).max() > 1e-4


def test_dispersion_tail_scales_as_r6_once():
    """No double counting, by the shape of the tail of an argon dimer: R⁶·E_int of
    the dispersion-free baseline is negligible (< 1 % of D3's), the composite's is
    D3's, and full GFN2's (its own D4) is of the same size as D3's — so adding D3
    to full GFN2 would double the C6 tail. (Measured R⁶·E_int at 5–12 Å, eV Å⁶:
    free GFN2 -0.02 … -8e-5, D3 -48 … -42, GFN2 with D4 -61 … -46.)"""
    distances = np.array([6.0, 8.0, 10.0, 12.0])

    def scaled(calc) -> np.ndarray:
        values = []
        for distance in distances:
            dimer = Atoms("Ar2", positions=[[0.0, 0.0, 0.0], [0.0, 0.0, distance]])
            values.append(_interaction(calc, dimer, 1))
        return np.array(values) * distances**6

    free = scaled(XTBBaseline(remove_dispersion=True, **TIGHT))
    composite = scaled(_composite(**TIGHT))
    d3 = scaled(D3Dispersion(method="pbe0", damping="d3bj"))
    full = scaled(XTBBaseline(**TIGHT))
    assert np.all(d3 < 0) and np.ptp(d3) < 0.2 * abs(d3.mean())  # C6 regime
    assert np.all(np.abs(free) < 0.01 * np.abs(d3))
    np.testing.assert_allclose(composite, d3, rtol=0.01)
    assert np.all((full / d3 > 0.8) & (full / d3 < 1.5))


def test_refused_set_changes_nothing(water):
    water.calc = calc = _composite()
    energy = water.get_potential_energy()
    with pytest.raises(ParameterError, match="counted twice"):
        calc.set(baseline_dispersion=True)
    assert calc.parameters.baseline_dispersion is False
    assert calc.terms_record()["baseline"]["remove_dispersion"] is True
    with pytest.raises(ParameterError, match="electronic_temperature must be positive"):
        calc.set(electronic_temperature=0.0)
    assert calc.parameters.electronic_temperature == 300.0
    with pytest.raises(ParameterError, match="no d3bj parameters for functional 'pbe7'"):
        calc.set(dispersion="d3bj:pbe7")
    assert calc.parameters.dispersion == "d3bj:pbe0"
    water.positions[0] += 1e-4
    water.positions[0] -= 1e-4
    assert water.get_potential_energy() == pytest.approx(energy, abs=1e-8)


def test_terms_changed_behind_the_composites_back_are_refused(water):
    water.calc = calc = _composite()
    water.get_potential_energy()
    calc.dispersion.set(method="pbe", damping="d3zero")
    water.positions[0] += 0.01
    with pytest.raises(ParameterError, match=r"dispersion\.damping.*DeltaCalculator\.set"):
        water.get_potential_energy()


def test_fixed_supercell_is_used_and_recorded(water_chain):
    """supercell=(n1, n2, n3) overrides min_cell_width (for smooth cell relaxations)."""
    calc = _composite(supercell=(4, 1, 1), **TIGHT)
    energy = _energy(water_chain, calc)
    assert tuple(calc.results["supercell_repeats"]) == (4, 1, 1)
    assert calc.terms_record()["baseline"]["supercell"] == [4, 1, 1]
    explicit = water_chain.repeat((4, 1, 1))
    assert _energy(explicit, _composite(min_cell_width=0.0, **TIGHT)) == pytest.approx(
        4 * energy, abs=1e-5
    )


# -- with a fitted Δ-model ------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted_model(stand_in_labels):
    from deltaml.dataset import delta_targets
    from deltaml.model import SparseGPR

    targets, terms = delta_targets(stand_in_labels(30, seed=0))
    descriptor = {"cutoff": 4.0, "n_max": 4, "l_max": 3}
    return SparseGPR(descriptor=descriptor, n_sparse=40).fit(targets, trained_with=terms)


def test_from_model_rebuilds_the_terms_the_model_was_trained_with(fitted_model, tmp_path):
    path = fitted_model.save(tmp_path / "model.npz")
    calc = DeltaCalculator.from_model(path)
    assert calc.parameters.dispersion == "d3bj:pbe0"  # the stand-in reference's partner
    trained = fitted_model.trained_with
    assert calc.terms_record() == {k: trained[k] for k in ("baseline", "dispersion")}
    assert trained["reference_dispersion"] == trained["dispersion"]  # the partner, added
    atoms = molecule("CH3OH")
    atoms.calc = calc
    energy = atoms.get_potential_energy()
    parts = sum(calc.results[f"energy_{t}"] for t in ("baseline", "correction", "dispersion"))
    assert energy == pytest.approx(parts)
    assert calc.results["energy_correction"] == pytest.approx(fitted_model.predict(atoms).energy)
    assert calc.results["energy_uncertainty"] > 0
    assert "forces_uncertainty" not in calc.results  # not asked for: not computed
    numeric = calculate_numerical_forces(atoms, 1e-3)
    np.testing.assert_allclose(atoms.get_forces(), numeric, atol=5e-4)


def test_the_composite_reproduces_the_reference_functional_with_its_d3_partner(
    stand_in_labels,
):
    """Labels are the dispersion-free functional; the reference method adds its D3 partner.

    Δ = label + partner − baseline − D3: with the partner as the D3 term the two
    cancel (dispersion is not learned), and terms + Δ is the functional + D3,
    which is ``reference_energy``. Without a D3 term Δ carries the partner.
    """
    from deltaml.baseline import XTBBaseline
    from deltaml.dataset import DELTA_BASELINE, delta_targets

    labels = stand_in_labels(3, seed=4)
    partner = DeltaCalculator(correction=ZeroCorrection()).dispersion  # d3bj:pbe0
    with_d3, terms = delta_targets(labels)
    without, bare = delta_targets(labels, dispersion=None)
    assert terms["reference_dispersion"] == partner.record() == bare["reference_dispersion"]
    for label, a, b in zip(labels, with_d3, without, strict=True):
        probe = label.copy()
        probe.calc = XTBBaseline(**DELTA_BASELINE)
        baseline, baseline_forces = probe.get_potential_energy(), probe.get_forces()
        probe.calc = partner
        d3 = probe.get_potential_energy()
        assert abs(d3) > 1e-3
        energy = label.get_potential_energy()
        assert a.get_potential_energy() == pytest.approx(energy - baseline, abs=1e-9)
        np.testing.assert_allclose(a.get_forces(), label.get_forces() - baseline_forces, atol=1e-8)
        assert b.get_potential_energy() == pytest.approx(energy - baseline + d3, abs=1e-9)
        assert a.info["reference_energy"] == pytest.approx(energy + d3, abs=1e-9)


def test_a_model_fitted_without_the_d3_partner_is_refused(fitted_model):
    """Models fitted before the partner was added reproduce the dispersion-free functional."""
    import copy

    old = copy.copy(fitted_model)
    old.trained_with_ = {
        k: v for k, v in fitted_model.trained_with_.items() if k != "reference_dispersion"
    }
    atoms = molecule("H2O")
    atoms.calc = DeltaCalculator.from_model(old)
    with pytest.raises(TermMismatchError, match="D3 partner"):
        atoms.get_potential_energy()


def test_a_model_on_other_terms_is_refused(fitted_model):
    atoms = molecule("H2O")
    atoms.calc = DeltaCalculator.from_model(fitted_model, dispersion="d3bj:b3lyp")
    with pytest.raises(TermMismatchError, match=r"dispersion.method: 'pbe0' != 'b3lyp'"):
        atoms.get_potential_energy()


def test_uncertainty_threshold_warns_or_raises_out_of_domain(fitted_model):
    from deltaml.errors import OutOfDomainError, OutOfDomainWarning

    strange = molecule("H2O")
    strange.positions[1] = strange.positions[0] + [0.0, 0.0, 1.9]  # a broken O-H bond
    calc = DeltaCalculator.from_model(fitted_model, force_uncertainty=True)
    strange.calc = calc
    worst = float(np.max((strange.get_forces(), calc.results["forces_uncertainty"])[1]))
    calc.set(force_uncertainty=False)  # the threshold alone turns it on
    calc.set(uncertainty_threshold=0.5 * worst)
    with pytest.warns(OutOfDomainWarning, match="exceeds the threshold"):
        strange.get_potential_energy()
    calc.set(uncertainty_action="raise")
    with pytest.raises(OutOfDomainError, match="outside the model's training domain"):
        strange.get_potential_energy()
    calc.set(uncertainty_threshold=2.0 * worst)
    strange.get_potential_energy()  # below the threshold: no complaint
    with pytest.raises(ParameterError, match="uncertainty_action"):
        calc.set(uncertainty_action="ignore")


def _domain_warnings(atoms: Atoms) -> list[str]:
    """Messages of the OutOfDomainWarnings of one energy and force evaluation."""
    import warnings

    from deltaml.errors import OutOfDomainWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        atoms.get_forces()
    return [str(w.message) for w in caught if issubclass(w.category, OutOfDomainWarning)]


class _SpinAware(HarmonicCorrection):
    """A stand-in model that records the charges and spin states it was trained on."""

    def __init__(self, multiplicities, charges=None) -> None:
        super().__init__()
        self.training_multiplicities_ = multiplicities
        if charges is not None:
            self.training_charges_ = charges


def test_unseen_spin_or_charge_is_warned_once_by_the_calculator():
    """Issue 13, item 2: the library itself says when a model meets an open shell (or a
    charge) it was not trained on, once per formula, charge and multiplicity."""
    oh = Atoms("OH", positions=[[0, 0, 0], [0, 0, 0.97]])
    oh.calc = calc = _composite(correction=_SpinAware([1]))
    (message,) = _domain_warnings(oh)
    assert message.startswith("HO is an open shell (multiplicity 2); the model was trained ")
    assert "on multiplicities 1: its correction here is an extrapolation" in message
    oh.positions[1, 2] += 0.05  # the same structure and spin: said once, not every step
    assert _domain_warnings(oh) == []
    calc.set(charge=-1)  # OH-, a closed shell the model knows
    assert _domain_warnings(oh) == []
    calc.set(charge=0, multiplicity=4)  # another spin: said again
    assert "(multiplicity 4)" in _domain_warnings(oh)[0]

    water = molecule("H2O")
    water.calc = _composite(correction=_SpinAware([2]))  # trained on radicals only
    assert "H2O is a closed shell (multiplicity 1)" in _domain_warnings(water)[0]
    water.calc = _composite(correction=_SpinAware(None))  # an old file: closed shells assumed
    assert _domain_warnings(water) == []
    oh.calc = _composite(correction=_SpinAware(None))
    assert "does not record the spin states" in _domain_warnings(oh)[0]

    ammonium = molecule("NH3")
    ammonium.append("H")
    ammonium.positions[-1] = [0.0, 0.0, -1.02]
    ammonium.info["charge"] = 1
    ammonium.calc = _composite(correction=_SpinAware([1], charges=[0]))
    (message,) = _domain_warnings(ammonium)
    assert "H4N has charge 1; the model was trained on charges 0" in message
    for silent in (ZeroCorrection(), HarmonicCorrection()):  # nothing recorded: nothing said
        oh.calc = _composite(correction=silent)
        assert _domain_warnings(oh) == []


def test_a_fitted_model_warns_on_an_open_shell(fitted_model):
    assert fitted_model.training_multiplicities_ == [1]
    oh = Atoms("OH", positions=[[0, 0, 0], [0, 0, 0.97]])
    oh.calc = DeltaCalculator.from_model(fitted_model)
    assert "HO is an open shell (multiplicity 2)" in _domain_warnings(oh)[0]
    water = molecule("H2O")
    water.calc = oh.calc
    assert _domain_warnings(water) == []


@pytest.mark.parametrize("where", ["energy", "forces"])
def test_a_non_finite_term_is_refused_not_summed(water, where):
    from deltaml.errors import NonFiniteResultError

    class Broken(HarmonicCorrection):
        def predict(self, atoms, *, forces, stress):
            good = super().predict(atoms, forces=forces, stress=stress)
            if where == "energy":
                return CorrectionResult(energy=float("nan"), forces=good.forces)
            bad = good.forces.copy()
            bad[0, 1] = np.inf
            return CorrectionResult(energy=good.energy, forces=bad)

    water.calc = _composite(correction=Broken())
    with pytest.raises(NonFiniteResultError, match=f"correction term returned non-finite {where}"):
        water.get_forces()


class _Spy:
    """Records the ``force_uncertainty`` keyword of every call to a model's predict."""

    def __init__(self, model) -> None:
        self.model, self.asked = model, []
        self.name, self.trained_with = model.name, model.trained_with
        self.molecular = model.molecular

    def predict(self, atoms, *, forces, stress, force_uncertainty=None):
        self.asked.append(force_uncertainty)
        return self.model.predict(
            atoms, forces=forces, stress=stress, force_uncertainty=force_uncertainty
        )


def test_force_uncertainty_is_computed_only_when_used(fitted_model, monkeypatch):
    """Issue 13, item 13: the composite asks for the force uncertainty only with a
    threshold or when asked (active learning, stability runs); the model's own
    predict keeps its behaviour."""
    atoms = molecule("CH3OH")
    spy = _Spy(fitted_model)
    atoms.calc = calc = DeltaCalculator.from_model(fitted_model)
    calc.correction = spy
    forces = atoms.get_forces()
    assert spy.asked == [False]
    assert "forces_uncertainty" not in calc.results
    assert calc.results["energy_uncertainty"] > 0  # the cheap one is still there
    explicit = fitted_model.predict(atoms)  # default: uncertainty="forces", unchanged
    assert explicit.forces_uncertainty.shape == (len(atoms),)
    np.testing.assert_allclose(calc.results["forces_correction"], explicit.forces, atol=1e-12)
    np.testing.assert_allclose(forces.sum(axis=0), 0.0, atol=1e-6)

    for setting in ({"force_uncertainty": True}, {"uncertainty_threshold": 10.0}):
        calc.set(force_uncertainty=False, uncertainty_threshold=None)
        calc.set(**setting)
        atoms.get_forces()
        assert spy.asked[-1] is True
        np.testing.assert_allclose(
            calc.results["forces_uncertainty"], explicit.forces_uncertainty, rtol=1e-10
        )

    # The expensive part is not even entered on the common path.
    def refuse(*args, **kwargs):
        raise AssertionError("force variance computed although nobody asked")

    monkeypatch.setattr(fitted_model, "_force_variance", refuse)
    calc.set(force_uncertainty=False, uncertainty_threshold=None)
    atoms.get_forces()
    with pytest.raises(AssertionError, match="nobody asked"):
        fitted_model.predict(atoms)  # an explicit call still computes it


def test_model_predict_force_uncertainty_keyword(fitted_model):
    atoms = molecule("CH3OH")
    default = fitted_model.predict(atoms)
    assert fitted_model.predict(atoms, force_uncertainty=False).forces_uncertainty is None
    np.testing.assert_array_equal(
        fitted_model.predict(atoms, force_uncertainty=True).forces_uncertainty,
        default.forces_uncertainty,
    )
    saved = fitted_model.uncertainty
    try:
        fitted_model.uncertainty = "energy"
        assert fitted_model.predict(atoms).forces_uncertainty is None
        asked = fitted_model.predict(atoms, force_uncertainty=True)
        np.testing.assert_array_equal(asked.forces_uncertainty, default.forces_uncertainty)
        fitted_model.uncertainty = None
        assert fitted_model.predict(atoms, force_uncertainty=True).forces_uncertainty is None
    finally:
        fitted_model.uncertainty = saved


def test_stability_samples_ask_for_the_force_uncertainty(fitted_model):
    """md_stability's calibration reads the force uncertainty of sampled frames: it
    asks the composite for it there, and leaves the calculator as it was."""
    from deltaml.evaluation import _sampled_errors

    atoms = molecule("CH3OH")
    calc = DeltaCalculator.from_model(fitted_model)
    reference = DeltaCalculator.from_model(fitted_model)  # any calculator will do
    out = _sampled_errors([(0.0, atoms), (1.0, atoms.copy())], calc, reference, None, 2)
    assert all("max_force_uncertainty_ev_a" in row for row in out["samples"])
    assert "forces" in out["calibration"]
    assert calc.parameters.force_uncertainty is False


@pytest.fixture(scope="module")
def atomic_model(stand_in_labels):
    from deltaml.dataset import delta_targets
    from deltaml.model import SparseGPR

    targets, terms = delta_targets(stand_in_labels(30, seed=0))
    descriptor = {"cutoff": 4.0, "n_max": 4, "l_max": 3}
    model = SparseGPR(descriptor=descriptor, n_sparse=40, decomposition="atomic")
    return model.fit(targets, trained_with=terms)


@pytest.mark.parametrize(
    ("periodic", "decomposition"), [(True, "molecular"), (False, "molecular"), (True, "atomic")]
)
def test_model_in_pieces_equals_whole_and_pieces_bound_memory(
    request, periodic, decomposition, monkeypatch, water_box
):
    """Issue 13, item 11: a large structure is predicted in pieces of whole molecules
    (the descriptor gradients, the largest arrays, then follow the piece, not the
    structure), with the results of one piece to round-off."""
    from deltaml.descriptors import SOAPDescriptor

    fitted_model = request.getfixturevalue(
        "fitted_model" if decomposition == "molecular" else "atomic_model"
    )
    atoms = water_box.copy()
    atoms.pbc = periodic
    stress = periodic
    whole = fitted_model.predict(atoms, stress=stress, force_uncertainty=True)
    rows: list[int] = []
    compute = SOAPDescriptor.compute

    def counting(self, frames, gradients=(), **kwargs):
        batch = compute(self, frames, gradients, **kwargs)
        if kwargs.get("centres") is not None:
            rows.append(len(batch.values))
        return batch

    monkeypatch.setattr(SOAPDescriptor, "compute", counting)
    monkeypatch.setattr(fitted_model, "chunk_atoms", 6, raising=False)
    # The gradient arrays' path (the expansion's, from PULLBACK_ATOMS, is compared
    # with it in test_molecular_model).
    monkeypatch.setattr("deltaml.model.PULLBACK_ATOMS", 10**9)
    pieces = fitted_model.predict(atoms, stress=stress, force_uncertainty=False)
    assert rows and max(rows) <= 6 + 2  # a piece closes on a whole molecule
    assert sum(rows) == len(atoms)
    assert pieces.forces_uncertainty is None
    assert pieces.energy == pytest.approx(whole.energy, abs=1e-10)
    np.testing.assert_allclose(pieces.forces, whole.forces, atol=1e-10)
    if stress:
        np.testing.assert_allclose(pieces.stress, whole.stress, atol=1e-12)
    assert pieces.energy_uncertainty == pytest.approx(whole.energy_uncertainty, rel=1e-9)
    np.testing.assert_allclose(
        pieces.energies_uncertainty, whole.energies_uncertainty, rtol=1e-9, atol=1e-12
    )
    for name, value in (whole.parts or {}).items():
        assert pieces.parts[name] == pytest.approx(value, abs=1e-10)
    # The force uncertainty in pieces (molecular: gradient sums; atomic: each piece
    # grown by its neighbours), same numbers.
    asked = fitted_model.predict(atoms, stress=stress, force_uncertainty=True)
    np.testing.assert_allclose(
        asked.forces_uncertainty, whole.forces_uncertainty, rtol=1e-9, atol=1e-12
    )


def test_a_fitted_model_records_its_charges_and_warns_on_an_ion(fitted_model, tmp_path):
    """Issue 13, item 2: the charges seen in training travel in the model file."""
    from deltaml.model import SparseGPR

    assert fitted_model.training_charges_ == [0]
    path = fitted_model.save(tmp_path / "model.npz")
    loaded = SparseGPR.load(path)
    assert loaded.training_charges_ == [0]
    hydroxide = Atoms("OH", positions=[[0, 0, 0], [0, 0, 0.97]])
    hydroxide.calc = DeltaCalculator.from_model(loaded, charge=-1)
    messages = _domain_warnings(hydroxide)
    assert any("HO has charge -1; the model was trained on charges 0" in m for m in messages)


class _CellAware(HarmonicCorrection):
    """A stand-in model that records the molecules of the periodic cells it was trained on."""

    def __init__(self, periodic_molecules) -> None:
        super().__init__()
        self.periodic_molecules_ = periodic_molecules


def test_a_cell_of_molecules_no_training_cell_held_is_warned_once(water_chain):
    """A crystal model trained on ice alone moved CO2 I by -46 kJ/mol (benchmarks/README):
    the composite says so on a cell of molecules its training cells never held, once."""
    water_chain.calc = _composite(correction=_CellAware(["CO2"]))
    (message,) = _domain_warnings(water_chain)
    assert message.startswith("a periodic cell of H2O: the correction was trained on ")
    assert "periodic cells of CO2, so its crystal energies here are an extrapolation" in message
    water_chain.positions[0, 0] += 0.02
    assert _domain_warnings(water_chain) == []  # the same composition: said once
    water_chain.calc = _composite(correction=_CellAware([]))
    assert "trained on no periodic cell" in _domain_warnings(water_chain)[0]
    for quiet in (_CellAware(["H2O"]), _CellAware(None), HarmonicCorrection()):
        water_chain.calc = _composite(correction=quiet)  # seen, or nothing recorded
        assert _domain_warnings(water_chain) == []
    free = molecule("H2O")  # a molecule is no cell: nothing said
    free.calc = _composite(correction=_CellAware([]))
    assert _domain_warnings(free) == []


def test_a_fitted_model_records_the_molecules_of_its_periodic_cells(fitted_model, tmp_path):
    assert fitted_model.periodic_molecules_ == []  # trained on molecules and dimers only
    loaded = type(fitted_model).load(fitted_model.save(tmp_path / "m.npz"))
    assert loaded.periodic_molecules_ == []
    from deltaml.model import _periodic_molecules

    ice = Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]], cell=[6, 6, 6])
    ice.pbc = True
    assert _periodic_molecules([molecule("CO2"), ice, ice]) == ["H2O"]
