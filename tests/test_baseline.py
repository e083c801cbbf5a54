"""Tests of deltaml.baseline: the GFN-xTB calculator, its engines and dispersion removal."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule
from ase.calculators.calculator import CalculationFailed, PropertyNotImplementedError
from ase.calculators.fd import calculate_numerical_forces, calculate_numerical_stress
from ase.units import Bohr, Hartree
from conftest import requires_xtb
from dftd3.ase import DFTD3

from deltaml.baseline import XTBBaseline, dispersion_free_parametrization
from deltaml.errors import (
    ChargeMultiplicityError,
    OverlappingAtomsError,
    ParameterError,
    SCFConvergenceError,
    UnsupportedCapabilityError,
    UnsupportedElementError,
)

# Tight SCF so that finite differences of the energy are not limited by SCF noise.
TIGHT = {"accuracy": 0.01}


def _energy(atoms: Atoms, **kwargs) -> float:
    work = atoms.copy()
    work.calc = XTBBaseline(**kwargs)
    return work.get_potential_energy()


# -- dispersion removal ------------------------------------------------------------


def test_gfn1_removed_dispersion_is_its_d3bj(ethanol):
    """GFN1-xTB minus its dispersion-free variant equals GFN1's D3(BJ), computed
    independently with simple-dftd3 from the published parameters
    (s6=1, s8=2.4, a1=0.63, a2=5.0, no ATM; Grimme et al., JCTC 13, 1989 (2017))."""
    full = ethanol.copy()
    full.calc = XTBBaseline(method="GFN1-xTB")
    free = ethanol.copy()
    free.calc = XTBBaseline(method="GFN1-xTB", remove_dispersion=True)
    d3 = ethanol.copy()
    d3.calc = DFTD3(
        damping="d3bj", params_tweaks={"s6": 1.0, "s8": 2.4, "a1": 0.63, "a2": 5.0, "s9": 0.0}
    )
    diff = full.get_potential_energy() - free.get_potential_energy()
    assert diff == pytest.approx(d3.get_potential_energy(), abs=1e-6)
    np.testing.assert_allclose(full.get_forces() - free.get_forces(), d3.get_forces(), atol=1e-6)


def test_dispersion_free_parametrization_only_drops_dispersion():
    for method, model in (("GFN2-xTB", "d4"), ("GFN1-xTB", "d3")):
        free = dispersion_free_parametrization(method)
        assert "dispersion" not in free
        record = XTBBaseline(method=method, remove_dispersion=True).record()
        assert model in record["removed_dispersion"]["model"]
        # Everything else (Hamiltonian, repulsion, element data) is untouched.
        assert {"hamiltonian", "repulsion", "charge", "element"} <= set(free)


@pytest.mark.parametrize("method", ["GFN2-xTB", "GFN1-xTB"])
def test_dispersion_free_parametrization_is_built_once_and_reused(method, monkeypatch):
    """Issue 13, item 12: the dispersion-free records are loaded into tblite once per
    method and shared by every system and calculator, with the energies of a fresh
    build from the dict."""
    from tblite.interface import Calculator as TBLiteCalculator

    from deltaml import baseline

    built: list[str] = []
    original = baseline.dispersion_free_parametrization

    def counting(name: str) -> dict:
        built.append(name)
        return original(name)

    monkeypatch.setattr(baseline, "dispersion_free_parametrization", counting)
    monkeypatch.setattr(baseline, "_FREE_PARAM_HANDLES", {})
    first = baseline.dispersion_free_param_handle(method)
    assert baseline.dispersion_free_param_handle(method.lower().replace("-xtb", "")) is first
    systems = [molecule(name) for name in ("H2O", "CH3CH2OH", "C6H6", "NH3")]
    energies = []
    for atoms in systems:  # every system gets a new engine (other atoms): no new records
        atoms.calc = XTBBaseline(method=method, remove_dispersion=True)
        energies.append(atoms.get_potential_energy())
        assert atoms.calc._engine._calc._param is first
    assert built == [method]
    # The same energies as tblite's own route, which converts the dict anew.
    bohr_positions = [a.positions / Bohr for a in systems]
    for atoms, energy, positions in zip(systems, energies, bohr_positions, strict=True):
        fresh = TBLiteCalculator(original(method), atoms.numbers, positions)
        fresh.set("verbosity", 0)
        assert energy == pytest.approx(fresh.singlepoint().get("energy") * Hartree, abs=1e-10)


def test_gfn2_dispersion_removal_removes_long_range_attraction():
    """For an argon dimer (no electrostatics), GFN2's attraction at 6 Å is all D4:
    without it the interaction is negligible next to the full method's."""
    far = Atoms("Ar2", positions=[[0, 0, 0], [0, 0, 30.0]])
    near = Atoms("Ar2", positions=[[0, 0, 0], [0, 0, 6.0]])
    full = _energy(near) - _energy(far)
    free = _energy(near, remove_dispersion=True) - _energy(far, remove_dispersion=True)
    assert full < -5e-4  # eV; D4 C6 tail of Ar2 at 6 Å is about -1 meV
    assert abs(free) < 0.05 * abs(full)


# -- engines -----------------------------------------------------------------------


@requires_xtb
@pytest.mark.parametrize("method", ["GFN2-xTB", "GFN1-xTB"])
def test_tblite_and_xtb_agree_on_molecule(ethanol, method):
    """Same method, two independent implementations: energies agree to 1e-5 eV and
    forces to 1e-4 eV/Å (measured: ~2e-7 eV and ~5e-5 eV/Å)."""
    a = ethanol.copy()
    a.calc = XTBBaseline(method=method, engine="tblite", **TIGHT)
    b = ethanol.copy()
    b.calc = XTBBaseline(method=method, engine="xtb", **TIGHT)
    assert a.get_potential_energy() == pytest.approx(b.get_potential_energy(), abs=1e-5)
    np.testing.assert_allclose(a.get_forces(), b.get_forces(), atol=1e-4)


@requires_xtb
def test_xtb_dispersion_free_gfn1_matches_tblite(ethanol):
    a = ethanol.copy()
    a.calc = XTBBaseline(method="gfn1", engine="tblite", remove_dispersion=True, **TIGHT)
    b = ethanol.copy()
    b.calc = XTBBaseline(method="gfn1", engine="xtb", remove_dispersion=True, **TIGHT)
    assert a.get_potential_energy() == pytest.approx(b.get_potential_energy(), abs=1e-5)
    np.testing.assert_allclose(a.get_forces(), b.get_forces(), atol=1e-4)


@pytest.mark.parametrize("engine", ["tblite", pytest.param("xtb", marks=requires_xtb)])
def test_periodic_gfn1_isolated_molecule_matches_molecular(ethanol, engine):
    """A molecule alone in a 15 Å periodic box has (nearly) its molecular energy:
    5 meV tolerance (measured for CO2: tblite 0.4 meV, xtb 2.3 meV)."""
    boxed = ethanol.copy()
    boxed.cell = [15.0, 15.0, 15.0]
    boxed.pbc = True
    boxed.center()
    periodic = _energy(boxed, method="gfn1", engine=engine, **TIGHT)
    molecular = _energy(ethanol, method="gfn1", engine=engine, **TIGHT)
    assert periodic == pytest.approx(molecular, abs=5e-3)


@requires_xtb
def test_xtb_refuses_gfn2_under_pbc(co2_crystal):
    co2_crystal.calc = XTBBaseline(method="gfn2", engine="xtb")
    with pytest.raises(
        UnsupportedCapabilityError, match="GFN2-xTB is not available under periodic"
    ):
        co2_crystal.get_potential_energy()


@requires_xtb
def test_xtb_refuses_stress_instead_of_zeros(co2_crystal):
    co2_crystal.calc = XTBBaseline(method="gfn1", engine="xtb", min_cell_width=0.0)
    assert np.isfinite(co2_crystal.get_potential_energy())
    with pytest.raises(UnsupportedCapabilityError, match="does not compute stress"):
        co2_crystal.get_stress()


@requires_xtb
def test_xtb_refuses_dispersion_free_gfn2(water):
    water.calc = XTBBaseline(method="gfn2", engine="xtb", remove_dispersion=True)
    with pytest.raises(UnsupportedCapabilityError, match="D4 cannot be switched off"):
        water.get_potential_energy()


# -- derivatives -------------------------------------------------------------------


@pytest.mark.parametrize("remove_dispersion", [False, True])
@pytest.mark.parametrize("method", ["GFN2-xTB", "GFN1-xTB"])
def test_forces_match_finite_differences_molecule(ethanol, method, remove_dispersion):
    """Central differences, step 1e-3 Å: agreement to 5e-4 eV/Å (SCF accuracy 0.01)."""
    ethanol.calc = XTBBaseline(method=method, remove_dispersion=remove_dispersion, **TIGHT)
    analytic = ethanol.get_forces()
    numeric = calculate_numerical_forces(ethanol, eps=1e-3)
    np.testing.assert_allclose(analytic, numeric, atol=5e-4)


@pytest.mark.slow
@pytest.mark.parametrize("remove_dispersion", [False, True])
def test_forces_and_stress_match_finite_differences_crystal(
    co2_crystal_strained, remove_dispersion
):
    """Γ-only cell (min_cell_width=0) for speed; steps 1e-3 Å and strain 1e-4;
    tolerances 1e-3 eV/Å and 2e-5 eV/Å³ (≈3 MPa)."""
    atoms = co2_crystal_strained
    atoms.calc = XTBBaseline(remove_dispersion=remove_dispersion, min_cell_width=0.0, **TIGHT)
    np.testing.assert_allclose(
        atoms.get_forces()[[0, 4]],
        calculate_numerical_forces(atoms, 1e-3, iatoms=[0, 4]),
        atol=1e-3,
    )
    np.testing.assert_allclose(
        atoms.get_stress(), calculate_numerical_stress(atoms, 1e-4), atol=2e-5
    )


@pytest.mark.slow
def test_supercell_path_derivatives_match_finite_differences(water_chain):
    """Forces and stress of a narrow cell evaluated on its 3×1×1 supercell are the
    derivatives of the per-cell energy (moving an atom moves all its images).
    Steps 1e-3 Å and strain 1e-4; tolerances 5e-4 eV/Å and 1e-5 eV/Å³."""
    atoms = water_chain
    atoms.calc = XTBBaseline(**TIGHT)
    np.testing.assert_allclose(
        atoms.get_forces(), calculate_numerical_forces(atoms, 1e-3), atol=5e-4
    )
    np.testing.assert_allclose(
        atoms.get_stress(), calculate_numerical_stress(atoms, 1e-4), atol=1e-5
    )
    assert tuple(atoms.calc.results["supercell_repeats"]) == (3, 1, 1)


# -- invariances and extensivity -----------------------------------------------------


def test_energy_invariant_to_rotation_translation_permutation(ethanol, rotation):
    reference = _energy(ethanol, **TIGHT)
    moved = ethanol.copy()
    moved.positions = moved.positions @ rotation.T + np.array([3.1, -7.2, 0.4])
    order = np.random.default_rng(11).permutation(len(ethanol))
    shuffled = ethanol[order]
    assert _energy(moved, **TIGHT) == pytest.approx(reference, abs=1e-6)
    assert _energy(shuffled, **TIGHT) == pytest.approx(reference, abs=1e-6)


def test_forces_rotate_with_the_molecule(ethanol, rotation):
    ethanol.calc = XTBBaseline(**TIGHT)
    forces = ethanol.get_forces()
    moved = ethanol.copy()
    moved.positions = moved.positions @ rotation.T
    moved.calc = XTBBaseline(**TIGHT)
    np.testing.assert_allclose(moved.get_forces(), forces @ rotation.T, atol=1e-5)


def test_size_extensive_separated_molecules():
    """Methane and benzene 30 Å apart: the sum of the parts to 5e-6 eV. Non-polar
    molecules, so that the only tail is dispersion (measured -6e-7 eV for GFN2,
    -2e-6 eV for GFN1); polar pairs keep a physical dipole–dipole tail (~1e-5 eV
    for water–ethanol at 30 Å)."""
    methane, benzene = molecule("CH4"), molecule("C6H6")
    far = benzene.copy()
    far.translate([30.0, 0.0, 0.0])
    for method in ("gfn2", "gfn1"):
        parts = _energy(methane, method=method) + _energy(benzene, method=method)
        assert _energy(methane + far, method=method) == pytest.approx(parts, abs=5e-6)


def test_narrow_cell_equals_explicit_supercell(water_chain):
    """A 2.9 Å wide cell is evaluated on 3×1×1: same per-cell energy, forces and
    stress as an explicit 3×1×1 supercell (wide enough to need no repeat)."""
    cell = water_chain
    cell.calc = XTBBaseline(**TIGHT)
    big = cell.repeat((3, 1, 1))
    big.calc = XTBBaseline(**TIGHT)
    assert cell.get_potential_energy() == pytest.approx(big.get_potential_energy() / 3, abs=1e-6)
    np.testing.assert_allclose(cell.get_forces(), big.get_forces()[: len(cell)], atol=1e-5)
    np.testing.assert_allclose(cell.get_stress(), big.get_stress(), atol=1e-7)
    assert tuple(cell.calc.results["supercell_repeats"]) == (3, 1, 1)
    assert tuple(big.calc.results["supercell_repeats"]) == (1, 1, 1)


def test_equivalent_cell_same_energy_per_cell(water_chain):
    """The explicit 3×1×1 supercell of the chain is exactly the system evaluated for
    the chain's own cell: exactly three times the energy."""
    triple = water_chain.repeat((3, 1, 1))
    assert _energy(triple, **TIGHT) == pytest.approx(3 * _energy(water_chain, **TIGHT), abs=1e-6)


@pytest.mark.slow
def test_equivalent_cell_doubles_energy(co2_crystal):
    """A 2×1×1 CO2 supercell is evaluated on 1×2×2 copies, i.e. the same 2×2×2
    system as the cell itself: twice the energy. (Cells mapped to different
    supercells differ by the Γ-point error left at the chosen min_cell_width.)"""
    assert _energy(co2_crystal.repeat((2, 1, 1))) == pytest.approx(
        2 * _energy(co2_crystal), abs=1e-5
    )


@pytest.mark.slow
def test_narrow_crystal_cell_uses_supercell_and_says_so(co2_crystal, caplog):
    """Why supercells are needed: the Γ-only energy of the 5.7 Å CO2 cell differs
    from the 2×2×2 one, and the supercell used is reported in results and log."""
    gamma = _energy(co2_crystal, min_cell_width=0.0)
    co2_crystal.calc = XTBBaseline()
    with caplog.at_level(logging.INFO, logger="deltaml.baseline"):
        converged = co2_crystal.get_potential_energy()
    assert abs(gamma - converged) > 1e-3  # eV per cell (measured 5 meV)
    assert tuple(co2_crystal.calc.results["supercell_repeats"]) == (2, 2, 2)
    assert "2x2x2 supercell" in caplog.text


# -- engine reuse, parameters and errors ----------------------------------------------


def test_engine_reused_while_only_positions_and_cell_change(co2_crystal):
    co2_crystal.calc = calc = XTBBaseline(min_cell_width=0.0)
    co2_crystal.get_potential_energy()
    engine = calc._engine
    co2_crystal.positions[0] += 0.01
    co2_crystal.set_cell(co2_crystal.cell.array * 1.01, scale_atoms=True)
    co2_crystal.get_potential_energy()
    assert calc._engine is engine
    calc.set(accuracy=0.5)  # pushed into the live engine
    co2_crystal.get_potential_energy()
    assert calc._engine is engine
    calc.set(method="gfn1")  # a different Hamiltonian needs a new engine
    co2_crystal.get_potential_energy()
    assert calc._engine is not engine


def test_engine_rebuilt_when_atoms_change(water, ethanol):
    calc = XTBBaseline()
    water.calc = calc
    water.get_potential_energy()
    engine = calc._engine
    ethanol.calc = calc
    ethanol.get_potential_energy()
    assert calc._engine is not engine
    assert len(calc.results["forces"]) == len(ethanol)


def test_reused_engine_gives_same_numbers_as_fresh(ethanol):
    calc = XTBBaseline(**TIGHT)
    ethanol.calc = calc
    ethanol.get_potential_energy()
    ethanol.positions[2] += [0.05, -0.02, 0.01]
    reused = ethanol.get_potential_energy()
    assert reused == pytest.approx(_energy(ethanol, **TIGHT), abs=1e-6)


def test_scf_not_converged_is_calculation_failed(ethanol):
    ethanol.calc = XTBBaseline(max_iterations=2)
    with pytest.raises(SCFConvergenceError, match="not converged") as info:
        ethanol.get_potential_energy()
    assert isinstance(info.value, CalculationFailed)
    assert "max_iterations" in str(info.value)


def test_unknown_method_and_engine():
    with pytest.raises(ParameterError, match="unknown baseline method 'GFN3'"):
        XTBBaseline(method="GFN3")
    with pytest.raises(ParameterError, match="unknown engine 'dftb'"):
        XTBBaseline(engine="dftb")


def test_bad_structures_raise_specific_errors(water):
    bad = water.copy()
    bad.positions[1] = bad.positions[0] + [0.1, 0.0, 0.0]
    bad.calc = XTBBaseline()
    with pytest.raises(OverlappingAtomsError, match=r"atoms 0 .* and 1 .* are 0\.100 Å apart"):
        bad.get_potential_energy()
    uranium = Atoms("U", positions=[[0, 0, 0]])
    uranium.calc = XTBBaseline()
    with pytest.raises(UnsupportedElementError, match=r"U \(Z=92\) not supported by GFN2-xTB"):
        uranium.get_potential_energy()
    water.calc = XTBBaseline(multiplicity=2)
    with pytest.raises(ChargeMultiplicityError, match="multiplicity 2 is impossible"):
        water.get_potential_energy()


def test_charge_and_multiplicity_are_used(water):
    neutral = _energy(water)
    cation = _energy(water, charge=1, multiplicity=2)
    # Vertical ionisation energy of water is 12.6 eV; GFN2 gives the same order.
    assert 8.0 < cation - neutral < 20.0
    hydroxyl = molecule("OH")
    assert np.isfinite(_energy(hydroxyl))  # odd electrons: doublet chosen by default
    assert _energy(hydroxyl, multiplicity=2) == pytest.approx(_energy(hydroxyl), abs=1e-8)


def test_stress_of_molecule_is_not_implemented(water):
    water.calc = XTBBaseline()
    with pytest.raises(PropertyNotImplementedError, match="periodic"):
        water.get_stress()


def test_record_holds_settings_by_value():
    record = XTBBaseline(method="gfn1", electronic_temperature=500.0).record()
    assert record["method"] == "GFN1-xTB"
    assert record["electronic_temperature_k"] == 500.0
    assert record["remove_dispersion"] is False
    assert record["removed_dispersion"] is None
    assert record["engine"] == "tblite" and record["engine_version"]


def test_docstring_table_matches_default_parameters():
    _check_table(XTBBaseline)


def _check_table(cls) -> None:
    """The keyword table of a calculator's docstring lists exactly its defaults."""
    rows = {}
    lines = cls.__doc__.splitlines()
    bars = [i for i, line in enumerate(lines) if line.strip().startswith("====")]
    for line in lines[bars[1] + 1 : bars[2]]:
        parts = line.split()
        rows[parts[0]] = parts[1]
    assert set(rows) == set(cls.default_parameters)
    for key, default in cls.default_parameters.items():
        assert rows[key] == (f'"{default}"' if isinstance(default, str) else str(default)), key


def test_partially_periodic_chain_has_energy_but_no_stress(water_chain):
    """A chain periodic along a only: supercell along a, no stress (ill-defined)."""
    water_chain.pbc = [True, False, False]
    water_chain.calc = XTBBaseline()
    assert np.isfinite(water_chain.get_potential_energy())
    assert tuple(water_chain.calc.results["supercell_repeats"]) == (3, 1, 1)
    with pytest.raises(PropertyNotImplementedError, match="all three directions"):
        water_chain.get_stress()


@pytest.mark.parametrize("engine", ["tblite", pytest.param("xtb", marks=requires_xtb)])
def test_partially_periodic_frame_does_not_matter(water_chain, engine):
    """Along a non-periodic direction, neither a translation (atoms outside the cell)
    nor a zero cell vector changes energy or forces (engines wrap positions along
    every cell vector, so deltaml hands them a frame that contains the structure)."""
    water_chain.pbc = [True, False, False]
    kwargs = {"method": "gfn1", "engine": engine, **TIGHT}
    water_chain.calc = XTBBaseline(**kwargs)
    energy, forces = water_chain.get_potential_energy(), water_chain.get_forces()
    moved = water_chain.copy()
    moved.translate([0.0, -9.0, 12.0])
    flat = water_chain.copy()
    flat.cell = [water_chain.cell[0], [0, 0, 0], [0, 0, 0]]
    for other in (moved, flat):
        other.calc = XTBBaseline(**kwargs)
        assert other.get_potential_energy() == pytest.approx(energy, abs=1e-6)
        np.testing.assert_allclose(other.get_forces(), forces, atol=1e-5)


def test_out_of_range_parameters_are_refused():
    cases = {
        "electronic_temperature": (
            -100.0,
            r"electronic_temperature must be positive, got -100\.0 K",
        ),
        "accuracy": (0.0, "accuracy must be positive, got 0.0"),
        "max_iterations": (0, "max_iterations must be a positive integer, got 0"),
        "min_cell_width": (-1.0, "min_cell_width must be a non-negative length"),
        "supercell": ((2, 0, 1), r"supercell must be three positive integers"),
    }
    for key, (value, message) in cases.items():
        with pytest.raises(ParameterError, match=message):
            XTBBaseline(**{key: value})
    calc = XTBBaseline()
    with pytest.raises(ParameterError, match="accuracy must be positive"):
        calc.set(accuracy=-1.0)
    assert calc.parameters.accuracy == 1.0  # a refused set() changes nothing


def test_engine_failure_is_calculation_failed_with_the_engine_message(water, monkeypatch):
    water.calc = calc = XTBBaseline()
    water.get_potential_energy()

    def broken(*args, **kwargs):
        raise RuntimeError("library says no")

    monkeypatch.setattr(calc._engine._calc, "singlepoint", broken)
    water.positions[0] += 0.01
    with pytest.raises(CalculationFailed, match="tblite: library says no"):
        water.get_potential_energy()


def test_open_shell_cell_on_a_supercell_is_high_spin(water_chain):
    """Charge and multiplicity are per cell: a cation doublet cell on its 3×1×1
    supercell is the explicit supercell with charge 3 and 3 unpaired electrons."""
    water_chain.calc = XTBBaseline(charge=1, multiplicity=2, **TIGHT)
    big = water_chain.repeat((3, 1, 1))
    big.calc = XTBBaseline(charge=3, multiplicity=4, **TIGHT)
    assert water_chain.get_potential_energy() == pytest.approx(
        big.get_potential_energy() / 3, abs=1e-6
    )


def test_f_in_core_lanthanide_electron_count():
    """GFN-xTB keeps Ce 4f in the core (3 valence electrons): CeH3 is a closed shell
    for the method although Z(Ce) + 3 = 61 is odd."""
    ceh3 = Atoms("CeH3", positions=[[0, 0, 0], [2.1, 0, 0], [-1.05, 1.82, 0], [-1.05, -1.82, 0]])
    ceh3.calc = XTBBaseline()
    assert np.isfinite(ceh3.get_potential_energy())
    ceh3.calc = XTBBaseline(multiplicity=2)
    with pytest.raises(ChargeMultiplicityError, match="6 electrons"):
        ceh3.get_potential_energy()


def test_record_fingerprints_the_parametrization():
    gfn2, gfn1 = XTBBaseline().record(), XTBBaseline(method="gfn1").record()
    assert len(gfn2["parametrization_sha256"]) == 64
    assert gfn2["parametrization_sha256"] != gfn1["parametrization_sha256"]
    assert "max_iterations" not in gfn2  # does not change a converged energy


@pytest.mark.slow
def test_triclinic_narrow_cell_equals_explicit_supercell(co2_crystal_strained):
    """Sheared CO2 cell: evaluated on 2×2×2, it matches the explicit 2×2×2 supercell
    evaluated as it is (min_cell_width=0)."""
    cell = co2_crystal_strained
    cell.calc = XTBBaseline()
    big = cell.repeat((2, 2, 2))
    big.calc = XTBBaseline(min_cell_width=0.0)
    assert cell.get_potential_energy() == pytest.approx(big.get_potential_energy() / 8, abs=1e-6)
    np.testing.assert_allclose(cell.get_forces(), big.get_forces()[: len(cell)], atol=1e-5)
    np.testing.assert_allclose(cell.get_stress(), big.get_stress(), atol=1e-7)
