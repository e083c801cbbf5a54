"""Tests of deltaml.reference: the PySCF reference calculator for molecules."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule
from ase.calculators.calculator import CalculationFailed, PropertyNotImplementedError
from ase.calculators.fd import calculate_numerical_forces
from ase.units import Bohr, Hartree

from deltaml.errors import (
    ChargeMultiplicityError,
    ParameterError,
    SCFConvergenceError,
    UnsupportedCapabilityError,
)
from deltaml.reference import PySCFReference

pyscf = pytest.importorskip("pyscf")

#: Small and quick: PBE0/def2-SVP with density fitting on water.
QUICK = {"xc": "pbe0", "basis": "def2-svp"}


def _direct_rks(atoms: Atoms, xc: str, basis: str, grid_level: int = 3):
    """The same calculation with PySCF called directly (Bohr/Hartree inside)."""
    from pyscf import dft, gto

    mol = gto.M(
        atom=[
            (symbol, tuple(position / Bohr))
            for symbol, position in zip(atoms.get_chemical_symbols(), atoms.positions, strict=True)
        ],
        unit="Bohr",
        basis=basis,
        verbose=0,
    )
    mf = dft.RKS(mol, xc=xc).density_fit()
    mf.grids.level = grid_level
    mf.conv_tol = 1e-10
    energy = mf.kernel()
    return energy, mf.nuc_grad_method().kernel()


def test_matches_pyscf_called_directly(water):
    water.calc = PySCFReference(conv_tol=1e-10, **QUICK)
    energy, gradient = _direct_rks(water, "pbe0", "def2-svp")
    assert water.get_potential_energy() == pytest.approx(energy * Hartree, abs=1e-6)
    np.testing.assert_allclose(water.get_forces(), -gradient * Hartree / Bohr, atol=1e-6)


@pytest.mark.slow
def test_forces_match_finite_differences(water):
    """Hartree–Fock (no grid): step 1e-3 Å, tolerance 2e-4 eV/Å. DFT on the oxygen
    atom: tolerance 2e-3 eV/Å, since the analytic gradient has no grid response."""
    water.calc = PySCFReference(method="hf", basis="def2-svp", conv_tol=1e-11)
    np.testing.assert_allclose(
        water.get_forces(), calculate_numerical_forces(water, 1e-3), atol=2e-4
    )
    water.calc = PySCFReference(conv_tol=1e-11, **QUICK)
    np.testing.assert_allclose(
        water.get_forces()[:1], calculate_numerical_forces(water, 1e-3, iatoms=[0]), atol=2e-3
    )


def test_open_shell_is_unrestricted():
    hydroxyl = molecule("OH")
    hydroxyl.calc = PySCFReference(**QUICK)
    doublet = hydroxyl.get_potential_energy()
    hydroxyl.calc = PySCFReference(multiplicity=4, **QUICK)
    assert hydroxyl.get_potential_energy() > doublet + 1.0  # quartet OH is far above


def test_mp2_energy_matches_pyscf_and_has_no_forces(water):
    from pyscf import gto, scf

    water.calc = PySCFReference(method="mp2", basis="def2-svp", conv_tol=1e-10)
    mol = gto.M(
        atom=list(zip(water.get_chemical_symbols(), water.positions.tolist(), strict=True)),
        basis="def2-svp",
        verbose=0,
    )
    mf = scf.RHF(mol).density_fit()
    mf.conv_tol = 1e-10
    mf.kernel()
    expected = mf.MP2().run().e_tot * Hartree
    assert water.get_potential_energy() == pytest.approx(expected, abs=1e-6)
    assert water.get_potential_energy() < PySCFReference(
        method="hf", basis="def2-svp"
    ).get_potential_energy(water)
    with pytest.raises(PropertyNotImplementedError, match="mp2 reference gives no forces"):
        water.get_forces()


def test_scf_not_converged_names_the_cycles(water):
    water.calc = PySCFReference(max_cycle=2, **QUICK)
    with pytest.raises(SCFConvergenceError, match="SCF not converged in 2 cycles") as info:
        water.get_potential_energy()
    assert isinstance(info.value, CalculationFailed)


def test_bad_inputs_raise_specific_errors(water):
    with pytest.raises(ParameterError, match="unknown reference method 'ccsd'"):
        PySCFReference(method="ccsd")
    with pytest.raises(ParameterError, match="unknown basis set 'def2-qqq'"):
        PySCFReference(basis="def2-qqq")
    with pytest.raises(ParameterError, match="unknown exchange-correlation functional 'b4lyp'"):
        PySCFReference(xc="b4lyp")
    water.calc = PySCFReference(multiplicity=2, **QUICK)
    with pytest.raises(ChargeMultiplicityError, match="multiplicity 2 is impossible"):
        water.get_potential_energy()
    crystal = water.copy()
    crystal.cell = [8.0, 8.0, 8.0]
    crystal.pbc = True
    crystal.calc = PySCFReference(**QUICK)
    with pytest.raises(UnsupportedCapabilityError, match="molecules only"):
        crystal.get_potential_energy()


def test_record_names_the_dispersion_partner():
    record = PySCFReference().record()
    assert record["code"] == "pyscf" and record["engine_version"]
    assert (record["method"], record["xc"], record["basis"]) == ("dft", "revpbe0", "def2-tzvp")
    assert record["dispersion_partner"] == "d3bj:revpbe0"


def test_docstring_table_matches_default_parameters():
    from test_baseline import _check_table

    _check_table(PySCFReference)


def test_charge_and_multiplicity_come_from_the_structure_as_in_every_calculator():
    """One rule: info["charge"]/["multiplicity"] are read here as by the loaders."""
    h2 = Atoms("H2", positions=[[0, 0, 0], [0, 0, 1.06]], info={"charge": 1})
    settings = {"method": "hf", "basis": "sto-3g"}
    h2.calc = PySCFReference(**settings)
    from_info = h2.get_potential_energy()
    explicit = Atoms("H2", positions=h2.positions)
    explicit.calc = PySCFReference(**settings, charge=1, multiplicity=2)
    assert from_info == pytest.approx(explicit.get_potential_energy(), abs=1e-8)
    neutral = Atoms("H2", positions=h2.positions)
    neutral.calc = PySCFReference(**settings)
    assert abs(neutral.get_potential_energy() - from_info) > 5.0  # H2 vs H2+: ~15 eV
    h2.calc = PySCFReference(**settings, charge=0)
    with pytest.raises(ChargeMultiplicityError, match="charge 0 given, but the structure says"):
        h2.get_potential_energy()
