"""Tests of deltaml.reference_cp2k: the CP2K (GPW) reference for cells and molecules.

Every test runs CP2K on water in a box of about 5 Å with a minimal basis and a
200 Ry cutoff (a few seconds per point); they skip where CP2K is not installed
(``.ci/run`` installs Debian's package, so they run in CI).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.fd import calculate_numerical_forces
from ase.units import Hartree, create_units

from deltaml.dataset import check_records, import_labelled
from deltaml.errors import (
    MethodMismatchError,
    ParameterError,
    SCFConvergenceError,
    UnsupportedCapabilityError,
)
from deltaml.reference_cp2k import CP2KReference, cp2k_available
from deltaml.store import LabelStore

pytestmark = pytest.mark.skipif(
    not (cp2k_available("cp2k.psmp") and cp2k_available("cp2k_shell")),
    reason="CP2K (cp2k.psmp, cp2k_shell) is not installed",
)

#: Small and quick: revPBE/SZV-MOLOPT-SR-GTH at 200 Ry, tight SCF for derivatives.
QUICK = {"basis": "SZV-MOLOPT-SR-GTH", "cutoff_ry": 200, "rel_cutoff_ry": 40, "eps_scf": 1e-8}


@pytest.fixture
def water_cell() -> Atoms:
    """Water in a slightly skewed 5 Å cell, rattled so that no force vanishes by symmetry."""
    atoms = molecule("H2O")
    atoms.cell = [[5.0, 0.0, 0.0], [0.3, 5.2, 0.0], [0.0, 0.2, 5.4]]
    atoms.pbc = True
    atoms.center()
    atoms.positions += np.random.default_rng(3).normal(scale=0.03, size=atoms.positions.shape)
    return atoms


def _cp2k_shell(atoms: Atoms, directory, stress: bool = True) -> dict[str, np.ndarray | float]:
    """The same calculation through ASE's CP2K calculator (cp2k_shell, its own input)."""
    from ase.calculators.cp2k import CP2K

    template = """&FORCE_EVAL
  &DFT
    &MGRID
      REL_CUTOFF 40
    &END MGRID
    &QS
      EPS_DEFAULT 1.0E-12
    &END QS
    &SCF
      EPS_SCF 1.0E-8
      &OT
        MINIMIZER DIIS
      &END OT
    &END SCF
    &XC
      &XC_FUNCTIONAL
        &PBE
          PARAMETRIZATION REVPBE
        &END PBE
      &END XC_FUNCTIONAL
    &END XC
  &END DFT
&END FORCE_EVAL
"""
    atoms = atoms.copy()
    with CP2K(
        command="cp2k_shell",
        basis_set="SZV-MOLOPT-SR-GTH",
        potential_file="GTH_POTENTIALS",
        pseudo_potential="GTH-PBE",
        xc=None,
        cutoff=200 * create_units("2006")["Rydberg"],
        max_scf=200,
        inp=template,
        stress_tensor=stress,
        directory=str(directory),
    ) as calc:
        atoms.calc = calc
        results = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()}
        if stress:
            results["stress"] = atoms.get_stress()
        return results


def test_matches_cp2k_run_directly(water_cell, tmp_path):
    water_cell.calc = CP2KReference(workdir=tmp_path / "ours", **QUICK)
    water_cell.calc.calculate(water_cell, ["energy", "forces", "stress"])
    ours = water_cell.calc.results
    direct = _cp2k_shell(water_cell, tmp_path / "shell")
    # the shell converts to eV with CP2K's (CODATA 2006) constants, we with ASE's:
    # compared in Hartree, to 2e-8 Eh (the constants agree to a few 1e-10)
    hartree_2006 = create_units("2006")["Hartree"]
    assert ours["energy"] / Hartree == pytest.approx(direct["energy"] / hartree_2006, abs=2e-8)
    np.testing.assert_allclose(ours["forces"], direct["forces"], atol=2e-5)
    np.testing.assert_allclose(ours["stress"], direct["stress"], atol=1e-6)
    assert np.abs(ours["forces"]).max() > 0.1  # rattled: the comparison is not of zeros
    assert "PARAMETRIZATION REVPBE" in (tmp_path / "ours" / "deltaml.inp").read_text()


def test_forces_and_stress_match_finite_differences(water_cell):
    """Central differences: 2e-3 Å steps on the oxygen, 1e-3 strain on two components.

    Tolerances: 3e-3 eV/Å and 2e-5 eV/Å³ (a few percent of the values, which
    are ~1 eV/Å and ~1e-3 eV/Å³ here); the analytic GPW derivatives lack only the
    grid's small egg-box term at this low cutoff.
    """
    water_cell.calc = CP2KReference(**QUICK)
    water_cell.calc.calculate(water_cell, ["energy", "forces", "stress"])
    forces, stress = water_cell.calc.results["forces"], water_cell.calc.results["stress"]
    numerical = calculate_numerical_forces(water_cell, 2e-3, iatoms=[0])
    np.testing.assert_allclose(forces[:1], numerical, atol=3e-3)
    cell, volume = water_cell.cell.array.copy(), water_cell.get_volume()
    for voigt, (i, j) in ((0, (0, 0)), (5, (0, 1))):
        energies = []
        for sign in (1, -1):
            strain = np.eye(3)
            strain[i, j] += 0.5e-3 * sign
            strain[j, i] += 0.5e-3 * sign
            strained = water_cell.copy()
            strained.set_cell(cell @ strain, scale_atoms=True)
            strained.calc = CP2KReference(**QUICK)
            energies.append(strained.get_potential_energy())
        assert stress[voigt] == pytest.approx((energies[0] - energies[1]) / 2e-3 / volume, abs=2e-5)
    assert np.abs(stress[[0, 5]]).min() > 1e-4  # non-trivial components


def test_molecule_matches_cp2k_run_directly_in_the_same_box(tmp_path):
    """Isolated: Martyna–Tuckerman Poisson solver in a cube ``vacuum_a`` wider than it."""
    water = molecule("H2O")
    water.positions += np.random.default_rng(4).normal(scale=0.03, size=water.positions.shape)
    water.calc = CP2KReference(vacuum_a=3.0, **QUICK)
    water.calc.calculate(water, ["energy", "forces"])
    ours = water.calc.results
    boxed = water.copy()
    boxed.cell = np.eye(3) * (np.ptp(water.positions, axis=0).max() + 2 * 3.0)
    boxed.center()
    boxed.pbc = False  # ASE's CP2K writes PERIODIC NONE and PSOLVER MT for it
    direct = _cp2k_shell(boxed, tmp_path / "shell", stress=False)
    hartree_2006 = create_units("2006")["Hartree"]
    assert ours["energy"] / Hartree == pytest.approx(direct["energy"] / hartree_2006, abs=2e-8)
    np.testing.assert_allclose(ours["forces"], direct["forces"], atol=2e-5)
    with pytest.raises(PropertyNotImplementedError, match="no stress for a molecule"):
        water.get_stress()


def test_mpi_layout_changes_nothing_but_the_processes(water_cell, tmp_path):
    water_cell.calc = CP2KReference(**QUICK)
    water_cell.calc.calculate(water_cell, ["energy", "forces"])
    serial = dict(water_cell.calc.results)
    water_cell.calc = CP2KReference(mpi_ranks=2, omp_threads=1, workdir=tmp_path, **QUICK)
    water_cell.calc.calculate(water_cell, ["energy", "forces"])
    output = (tmp_path / "deltaml.out").read_text()
    assert re.search(r"Total number of message passing processes\s+2\n", output)
    assert water_cell.calc.results["energy"] == pytest.approx(serial["energy"], abs=1e-6)
    np.testing.assert_allclose(water_cell.calc.results["forces"], serial["forces"], atol=1e-5)


def test_scf_failure_is_the_scf_error(water_cell):
    water_cell.calc = CP2KReference(max_scf=2, max_outer_scf=1, **QUICK)
    with pytest.raises(SCFConvergenceError, match="SCF not converged in 1 outer loops of 2"):
        water_cell.get_potential_energy()


def test_unknown_names_and_unsupported_structures_are_refused(water_cell):
    with pytest.raises(ParameterError, match="unknown CP2K functional 'b3lyp'"):
        CP2KReference(xc="b3lyp")
    with pytest.raises(ParameterError, match="unknown basis 'DZVP-NONSENSE'"):
        CP2KReference(basis="dzvp-nonsense")
    with pytest.raises(ParameterError, match="unknown pseudopotential 'GTH-XYZ'"):
        CP2KReference(pseudopotential="gth-xyz")
    with pytest.raises(ParameterError, match="for hybrid functionals"):
        CP2KReference(admm_basis="cFIT3")
    with pytest.raises(ParameterError, match="cutoff_ry must be positive"):
        CP2KReference(cutoff_ry=0)
    slab = water_cell.copy()
    slab.pbc = [True, True, False]
    slab.calc = CP2KReference(**QUICK)
    with pytest.raises(UnsupportedCapabilityError, match="all three directions or none"):
        slab.get_potential_energy()
    water_cell.calc = CP2KReference(xc="pbe0", admm_basis="cFIT3", **QUICK)
    with pytest.raises(UnsupportedCapabilityError, match="exceeds half the narrowest cell"):
        water_cell.get_potential_energy()


def test_record_names_the_method_and_its_dispersion_partner():
    record = CP2KReference().record()
    assert record["code"] == "cp2k" and record["engine_version"]
    assert (record["xc"], record["parametrization"]) == ("revpbe", "REVPBE")
    assert record["dispersion_partner"] == "d3bj:revpbe"
    assert CP2KReference(xc="PBE").record()["dispersion_partner"] == "d3bj:pbe"
    assert record["cutoff_ry"] == CP2KReference.default_parameters["cutoff_ry"]
    # how a calculation runs is not part of the method
    assert CP2KReference(mpi_ranks=2, omp_threads=2).record() == record
    assert CP2KReference(reuse_guess=False).record() == record  # a start, not the answer


def _first_scf_gradient(folder) -> float:
    """The SCF convergence measure of the first OT step of the run in ``folder``."""
    output = (folder / "deltaml.out").read_text()
    return float(re.search(r"\n\s+1 OT DIIS\s+\S+\s+\S+\s+(\S+)", output).group(1))


def test_a_similar_structure_starts_from_the_last_wavefunction(water_cell, tmp_path):
    """A strained and rattled copy starts its SCF from the last run's wavefunction:
    closer to convergence at the first step, and converged to the same answer."""
    calc = CP2KReference(workdir=tmp_path / "reused", **QUICK)
    calc.calculate(water_cell, ["energy", "forces", "stress"])
    copy = water_cell.copy()
    copy.set_cell(water_cell.cell.array * 1.02, scale_atoms=True)
    copy.positions += np.random.default_rng(5).normal(scale=0.03, size=copy.positions.shape)
    calc.calculate(copy, ["energy", "forces", "stress"])
    assert "SCF_GUESS RESTART" in (tmp_path / "reused" / "deltaml.inp").read_text()
    fresh = CP2KReference(workdir=tmp_path / "fresh", reuse_guess=False, **QUICK)
    fresh.calculate(copy, ["energy", "forces", "stress"])
    assert "SCF_GUESS ATOMIC" in (tmp_path / "fresh" / "deltaml.inp").read_text()
    assert _first_scf_gradient(tmp_path / "reused") < 0.2 * _first_scf_gradient(tmp_path / "fresh")
    assert calc.results["energy"] == pytest.approx(fresh.results["energy"], abs=1e-5)
    np.testing.assert_allclose(calc.results["forces"], fresh.results["forces"], atol=1e-4)
    np.testing.assert_allclose(calc.results["stress"], fresh.results["stress"], atol=1e-7)


def test_a_wavefunction_is_not_reused_for_other_atoms_or_a_distant_structure(water_cell, tmp_path):
    """Atoms in another order, a cell strained by 20 % or other settings start from
    CP2K's atomic guess (a wavefunction is a start only where it fits)."""
    calc = CP2KReference(workdir=tmp_path, **QUICK)
    calc.calculate(water_cell, ["energy"])
    permuted = water_cell[[1, 0, 2]]
    strained = water_cell.copy()
    strained.set_cell(water_cell.cell.array * 1.2, scale_atoms=True)
    for atoms, settings in ((permuted, {}), (strained, {}), (water_cell, {"cutoff_ry": 250})):
        calc.set(**settings)
        calc.calculate(atoms, ["energy"])
        assert "SCF_GUESS ATOMIC" in (tmp_path / "deltaml.inp").read_text()
    # the output of every run is its own (CP2K appends to an existing output file)
    assert (tmp_path / "deltaml.out").read_text().count("PROGRAM STARTED AT") == 1


def test_a_labelling_worker_keeps_one_calculator_per_settings():
    """So that the wavefunctions of a worker's last labels start its next ones."""
    import json

    from deltaml.labelling import _worker_cp2k

    settings = json.dumps(QUICK, sort_keys=True)
    first = _worker_cp2k(settings)
    assert _worker_cp2k(settings) is first
    assert _worker_cp2k(json.dumps({**QUICK, "cutoff_ry": 250}, sort_keys=True)) is not first


def test_docstring_table_matches_default_parameters():
    from test_baseline import _check_table

    _check_table(CP2KReference)


def test_method_record_mismatches_are_refused(water_cell, tmp_path):
    labels = []
    for cutoff in (200, 250):
        calc = CP2KReference(**{**QUICK, "cutoff_ry": cutoff})
        atoms = water_cell.copy()
        atoms.calc = calc
        calc.calculate(atoms, ["energy", "forces"])
        atoms.info["method_record"] = calc.record()
        labels.append(atoms)
    with pytest.raises(MethodMismatchError, match="cutoff_ry"):
        check_records(labels)
    store = LabelStore(tmp_path / "labels.db")
    assert import_labelled(store, labels[:1]) == (1, 0)
    with pytest.raises(MethodMismatchError, match=r"holds labels of another method.*cutoff_ry"):
        import_labelled(store, labels[1:])


def test_labels_go_through_the_store_and_the_runner(water_cell, tmp_path):
    """A ``{"code": "cp2k", ...}`` reference on the local pool: energy, forces and
    stress of the cell in the store under the CP2K record, with the D3 partner's terms;
    the MPI/OpenMP layout is not part of the record (the same key on a cluster)."""
    from deltaml.labelling import label_structures

    store = LabelStore(tmp_path / "labels.db")
    reference = {"code": "cp2k", "omp_threads": 1, **QUICK}
    report = label_structures(
        [water_cell], store, reference=reference, baseline=None, workers=1, progress=False
    )
    assert (report.computed, report.failed) == (1, 0), report.errors
    (label,) = store.labelled()
    water_cell.calc = CP2KReference(**QUICK)
    water_cell.calc.calculate(water_cell, ["energy", "forces", "stress"])
    expected = water_cell.calc.results
    assert label.get_potential_energy() == pytest.approx(expected["energy"], abs=1e-6)
    np.testing.assert_allclose(label.get_forces(), expected["forces"], atol=1e-6)
    np.testing.assert_allclose(label.get_stress(), expected["stress"], atol=1e-8)
    assert label.info["method_record"] == CP2KReference(**QUICK).record()
    assert label.info["record_dispersion"]["method"] == "revpbe"
    assert label.info["stress_dispersion"].shape == (6,)
    again = label_structures(
        [water_cell],
        store,
        reference={**reference, "mpi_ranks": 2, "omp_threads": 2},
        baseline=None,
        progress=False,
    )
    assert (again.already_done, again.computed) == (1, 0)


def test_an_unknown_reference_code_is_refused(water_cell, tmp_path):
    from deltaml.labelling import label_structures

    with pytest.raises(ParameterError, match="unknown reference code 'vasp'; choose"):
        label_structures(
            [water_cell], LabelStore(tmp_path / "l.db"), reference={"code": "vasp"}, progress=False
        )


def test_labels_on_a_dask_cluster_match_the_local_pool(water_cell, tmp_path):
    """The same CP2K label through a Dask LocalCluster (threads in this process)."""
    distributed = pytest.importorskip("distributed")
    from deltaml.labelling import label_structures

    reference = {"code": "cp2k", "omp_threads": 1, **QUICK}
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
    ) as cluster:
        store = LabelStore(tmp_path / "dask.db")
        report = label_structures(
            [water_cell], store, reference=reference, baseline=None,
            scheduler=cluster.scheduler_address, progress=False,
        )  # fmt: skip
    assert (report.computed, report.failed) == (1, 0), report.errors
    (label,) = store.labelled()
    water_cell.calc = CP2KReference(**QUICK)
    water_cell.calc.calculate(water_cell, ["energy", "forces", "stress"])
    assert label.get_potential_energy() == pytest.approx(
        water_cell.calc.results["energy"], abs=1e-6
    )
    np.testing.assert_allclose(label.get_stress(), water_cell.calc.results["stress"], atol=1e-8)
