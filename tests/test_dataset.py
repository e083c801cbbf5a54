"""extxyz import/export of labels: round trip through a store, and every bad input refused.

GFN1-xTB stands in for an external reference code: its labels agree with the
GFN2-xTB magnitude check to tens of percent, as a DFT code's would.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write
from ase.units import Bohr, Hartree, kcal, mol
from click.testing import CliRunner

from deltaml.baseline import XTBBaseline
from deltaml.cli import main
from deltaml.dataset import (
    check_units,
    export_labelled,
    import_labelled,
    read_labelled,
    write_labelled,
)
from deltaml.errors import (
    LabelError,
    LabelUnitsError,
    LabelUnitsWarning,
    MethodMismatchError,
    MissingLabelError,
)
from deltaml.store import LabelStore

RECORD = {"code": "some-dft", "version": "1.0", "xc": "pbe0", "basis": "def2-tzvp"}


def _frames(count: int = 8, seed: int = 0) -> list[Atoms]:
    """Rattled water and ethanol, several of each (energy differences per formula)."""
    rng = np.random.default_rng(seed)
    frames = []
    for k in range(count):
        atoms = molecule("H2O" if k % 2 else "CH3CH2OH")
        atoms.positions += rng.normal(scale=0.06, size=atoms.positions.shape)
        frames.append(atoms)
    return frames


def _labelled(
    frames: list[Atoms], *, energy_unit: float = 1.0, force_unit: float = 1.0
) -> list[Atoms]:
    """GFN1-xTB labels, expressed in the given units (sizes in eV and eV/Å)."""
    out = []
    for atoms in frames:
        probe = atoms.copy()
        probe.calc = XTBBaseline(method="GFN1-xTB")
        energy, forces = probe.get_potential_energy(), probe.get_forces()
        labelled = atoms.copy()
        labelled.calc = SinglePointCalculator(
            labelled, energy=energy / energy_unit, forces=forces / force_unit
        )
        labelled.info["method_record"] = dict(RECORD)
        out.append(labelled)
    return out


def test_round_trip_through_a_store_keeps_labels_terms_and_records(tmp_path):
    labelled = _labelled(_frames(4))
    labelled[0].info["energy_baseline"] = -5.0
    labelled[0].arrays["forces_baseline"] = np.full((len(labelled[0]), 3), 0.25)
    write_labelled(tmp_path / "in.extxyz", labelled)
    frames = read_labelled(tmp_path / "in.extxyz")
    store = LabelStore(tmp_path / "labels.db")
    assert import_labelled(store, frames) == (4, 0)
    assert import_labelled(store, frames) == (0, 4)  # nothing twice
    assert export_labelled(store, tmp_path / "out.extxyz") == 4
    back = read_labelled(tmp_path / "out.extxyz", check_magnitudes=False)
    for before, after in zip(labelled, back, strict=True):
        assert after.get_potential_energy() == pytest.approx(before.get_potential_energy())
        np.testing.assert_allclose(after.get_forces(), before.get_forces(), atol=1e-7)  # 8 decimals
        assert after.info["method_record"] == RECORD
    assert back[0].info["energy_baseline"] == -5.0
    np.testing.assert_allclose(back[0].arrays["forces_baseline"], 0.25)


def test_export_of_given_structures_keeps_their_order_and_info(tmp_path):
    labelled = _labelled(_frames(3))
    store = LabelStore(tmp_path / "labels.db")
    import_labelled(store, labelled)
    wanted = [labelled[2].copy(), _frames(1, seed=9)[0], labelled[0].copy()]
    wanted[0].info = {"name": "third"}
    written = export_labelled(store, tmp_path / "out.extxyz", wanted, record=RECORD)
    assert written == 2  # the unlabelled one is left out
    back = read_labelled(tmp_path / "out.extxyz", check_magnitudes=False)
    assert back[0].info["name"] == "third"
    assert back[0].get_potential_energy() == pytest.approx(labelled[2].get_potential_energy())
    assert back[1].get_potential_energy() == pytest.approx(labelled[0].get_potential_energy())


def test_magnitudes_in_ev_pass_and_give_slopes_near_one():
    slopes = check_units(_labelled(_frames()))
    assert 0.7 < slopes["force_slope"] < 1.4
    assert 0.5 < slopes["energy_slope"] < 2.0


@pytest.mark.parametrize(
    ("energy_unit", "force_unit", "named"),
    [
        (1.0, Hartree / Bohr, "forces look like Hartree/Bohr"),
        (Hartree, Hartree / Bohr, "forces look like Hartree/Bohr"),
        (Hartree, 1.0, "energies look like Hartree"),
        (kcal / mol, kcal / mol, "forces look like kcal/mol/Å"),
    ],
)
def test_wrong_units_are_caught_by_magnitude(tmp_path, energy_unit, force_unit, named):
    frames = _labelled(_frames(), energy_unit=energy_unit, force_unit=force_unit)
    write_labelled(tmp_path / "labels.extxyz", frames)
    with pytest.raises(LabelUnitsError, match=named):
        read_labelled(tmp_path / "labels.extxyz")


#: Distinct molecules of H, C, N, O: one structure per composition.
DISTINCT = ("CH4", "NH3", "H2O", "HCN", "CO2", "H2CO", "CH3OH", "HCOOH", "C2H4", "C2H6",
            "CH3CN", "C2H2", "CH3NO2", "H2CCO", "CH3CHO", "N2O")  # fmt: skip


def _at_minima(energy_unit: float) -> list[Atoms]:
    """GFN1-xTB energies of distinct molecules, forces zero as at minima."""
    frames = _labelled([molecule(name) for name in DISTINCT], energy_unit=energy_unit)
    for atoms in frames:
        atoms.calc.results["forces"] = np.zeros((len(atoms), 3))
    return frames


def test_wrong_units_are_caught_on_distinct_molecules_at_their_minima(tmp_path):
    assert 0.5 < check_units(_at_minima(1.0))["energy_slope"] < 2.0
    write_labelled(tmp_path / "labels.extxyz", _at_minima(Hartree))
    with pytest.raises(LabelUnitsError, match="energies look like Hartree"):
        read_labelled(tmp_path / "labels.extxyz")


def test_units_that_cannot_be_checked_give_a_warning_that_says_why():
    few = _at_minima(Hartree)[:5]  # five compositions of four elements: undecidable
    with pytest.warns(LabelUnitsWarning, match="could not be checked"):
        slopes = check_units(few)
    assert np.isnan(slopes["energy_slope"]) and np.isnan(slopes["force_slope"])


def test_declared_units_other_than_ev_are_refused(tmp_path):
    frames = _labelled(_frames(2))
    frames[1].info["energy_units"] = "Hartree"
    write_labelled(tmp_path / "labels.extxyz", frames)
    with pytest.raises(LabelUnitsError, match="structure 1: declared energy_units='Hartree'"):
        read_labelled(tmp_path / "labels.extxyz")


def test_missing_energy_is_named_with_the_key_found(tmp_path):
    atoms = _frames(1)[0]
    atoms.info["total_energy"] = -10.0
    write(tmp_path / "plain.extxyz", atoms)
    with pytest.raises(MissingLabelError, match=r"no energy .*found \['total_energy'\]"):
        read_labelled(tmp_path / "plain.extxyz", record=RECORD)


def test_missing_forces_are_refused_unless_energies_only_are_asked_for(tmp_path):
    atoms = _frames(1)[0]
    atoms.calc = SinglePointCalculator(atoms, energy=-10.0)
    atoms.info["method_record"] = dict(RECORD)
    write_labelled(tmp_path / "energies.extxyz", [atoms])
    with pytest.raises(MissingLabelError, match="no forces"):
        read_labelled(tmp_path / "energies.extxyz")
    frames = read_labelled(tmp_path / "energies.extxyz", require_forces=False)
    assert frames[0].get_potential_energy() == -10.0


def test_non_finite_values_and_stress_of_a_molecule_are_refused(tmp_path):
    atoms = _labelled(_frames(1))[0]
    atoms.calc.results["forces"][0, 0] = np.nan
    write_labelled(tmp_path / "nan.extxyz", [atoms])
    with pytest.raises(LabelError, match="forces contain NaN"):
        read_labelled(tmp_path / "nan.extxyz")
    atoms = _labelled(_frames(1))[0]
    atoms.calc.results["stress"] = np.zeros(6)
    write_labelled(tmp_path / "stress.extxyz", [atoms])
    with pytest.raises(LabelError, match="not 3D periodic"):
        read_labelled(tmp_path / "stress.extxyz")


def test_periodic_labels_with_stress_round_trip(tmp_path, co2_crystal):
    atoms = co2_crystal.copy()
    atoms.calc = SinglePointCalculator(
        atoms, energy=-100.0, forces=np.zeros((len(atoms), 3)), stress=np.arange(6) * 1e-3
    )
    atoms.info["method_record"] = {"code": "vasp", "version": "6.4", "xc": "pbe"}
    write_labelled(tmp_path / "crystal.extxyz", [atoms])
    frames = read_labelled(tmp_path / "crystal.extxyz", check_magnitudes=False)
    store = LabelStore(tmp_path / "labels.db")
    import_labelled(store, frames)
    np.testing.assert_allclose(store.labelled()[0].get_stress(), np.arange(6) * 1e-3)


def test_a_cell_label_keeps_its_terms_stress_and_cost_through_import_and_export(
    tmp_path, co2_crystal
):
    """A fresh checkout imports the shipped labels into a new store and exports them
    again: the baseline's stress (needed for Δ stress) and the cost must survive."""
    atoms = co2_crystal.copy()
    atoms.calc = SinglePointCalculator(
        atoms, energy=-100.0, forces=np.zeros((len(atoms), 3)), stress=np.arange(6) * 1e-3
    )
    atoms.info["method_record"] = {"code": "cp2k", "version": "2023.1", "xc": "revpbe"}
    atoms.info["energy_baseline"] = -90.0
    atoms.arrays["forces_baseline"] = np.full((len(atoms), 3), 0.5)
    atoms.info["stress_baseline"] = np.arange(6) * -2e-3
    atoms.info["compute_seconds"] = 123.5
    first = tmp_path / "first.extxyz"
    write_labelled(first, [atoms])
    for generation in ("second", "third"):  # twice: what one session exports, the next imports
        store = LabelStore(tmp_path / f"{generation}.db")
        import_labelled(store, read_labelled(first, check_magnitudes=False))
        first = tmp_path / f"{generation}.extxyz"
        export_labelled(store, first)
    back = read_labelled(first, check_magnitudes=False)[0]
    np.testing.assert_allclose(back.info["stress_baseline"], np.arange(6) * -2e-3)
    np.testing.assert_allclose(back.arrays["forces_baseline"], 0.5)
    assert back.info["energy_baseline"] == -90.0
    assert back.info["compute_seconds"] == pytest.approx(123.5)
    np.testing.assert_allclose(back.get_stress(), np.arange(6) * 1e-3)


def test_missing_record_is_refused_unless_given(tmp_path):
    frames = _labelled(_frames(2))
    for atoms in frames:
        del atoms.info["method_record"]
    write_labelled(tmp_path / "labels.extxyz", frames)
    with pytest.raises(MissingLabelError, match="no method_record; give record="):
        read_labelled(tmp_path / "labels.extxyz")
    read = read_labelled(tmp_path / "labels.extxyz", record=RECORD)
    assert read[1].info["method_record"] == RECORD


def test_method_records_must_match_within_a_file_and_with_the_one_asked_for(tmp_path):
    frames = _labelled(_frames(3))
    frames[2].info["method_record"] = {**RECORD, "basis": "def2-svp"}
    write_labelled(tmp_path / "mixed.extxyz", frames)
    with pytest.raises(
        MethodMismatchError, match=r"structure 2 .*basis: 'def2-tzvp' != 'def2-svp'"
    ):
        read_labelled(tmp_path / "mixed.extxyz")
    write_labelled(tmp_path / "one.extxyz", frames[:2])
    with pytest.raises(MethodMismatchError, match=r"differs from the one asked for.*xc"):
        read_labelled(tmp_path / "one.extxyz", record={**RECORD, "xc": "b3lyp"})


def test_merging_labels_of_another_method_into_a_store_is_refused(tmp_path):
    store = LabelStore(tmp_path / "labels.db")
    import_labelled(store, _labelled(_frames(2)))
    other = _labelled(_frames(2, seed=1))
    for atoms in other:
        atoms.info["method_record"] = {**RECORD, "xc": "revpbe0"}
    with pytest.raises(MethodMismatchError, match=r"holds labels of another method.*xc"):
        import_labelled(store, other)
    assert len(store) == 2


def test_cli_import_and_export(tmp_path):
    frames = _labelled(_frames(4))
    for atoms in frames:
        del atoms.info["method_record"]
    write_labelled(tmp_path / "external.extxyz", frames)
    (tmp_path / "record.json").write_text(json.dumps(RECORD))
    runner = CliRunner()
    store = str(tmp_path / "labels.db")
    args = ["import", str(tmp_path / "external.extxyz"), "--store", store]
    result = runner.invoke(main, args)
    assert result.exit_code == 1 and "no method_record" in result.output
    result = runner.invoke(main, [*args, "--record", str(tmp_path / "record.json")])
    assert result.exit_code == 0, result.output
    assert "4 labels added, 0 already present" in result.output
    result = runner.invoke(main, ["export", str(tmp_path / "out.extxyz"), "--store", store])
    assert result.exit_code == 0 and "4 labelled structures" in result.output
    back = read_labelled(tmp_path / "out.extxyz")
    assert [a.get_potential_energy() for a in back] == pytest.approx(
        [a.get_potential_energy() for a in frames]
    )


def test_interaction_groups_match_geometries_across_rounding_boundaries():
    from deltaml.dataset import interaction_groups

    # A water whose centred coordinates, moved by a rigid scan, change by round-off
    # (5.6e-16 Å) across a 6-decimal rounding edge: a rounded key missed the match.
    positions = [[-0.00390545, 0.016273, 0.10750664], [0.00160076, 0.74186076, -0.47706267],
                 [0.00899566, -0.76560563, -0.48334055]]  # fmt: skip
    water = Atoms("OH2", positions=positions)
    other = molecule("NH3")
    other.positions += [3.1, 0.0, 0.0]
    shift = np.array([-1.04443579, 4.40934188, -2.98796799])
    complex_ = Atoms("OH2", positions=np.round(water.positions + shift, 8)) + other
    other_moved = other.copy()
    other_moved.positions = complex_.positions[3:]
    groups = interaction_groups([water, other_moved, complex_])
    assert groups == [(2, [0, 1])]


def test_interaction_systems_join_complexes_that_share_a_molecule():
    from deltaml.dataset import interaction_systems

    # Structure 0 stands alone; 1 and 2 are monomers of the complexes 3 (minimum)
    # and 5 (a scan point sharing monomer 1 but with its own monomer 4); 6 and 7
    # are another dimer's monomer and complex.
    groups = [(3, [1, 2]), (5, [1, 4]), (7, [6, 6])]
    labels = interaction_systems(groups, 9)
    assert labels.tolist() == [0, 1, 1, 1, 1, 1, 2, 2, 3]
    assert interaction_systems([], 3).tolist() == [0, 1, 2]


def test_held_out_units_join_interaction_systems_and_named_systems():
    """The frames of one crystal (start, strained, MD) are held out together, and a
    name shared with an interaction system joins it: never a split by frame alone."""
    from ase.build import molecule

    from deltaml.dataset import held_out_units

    a, b = molecule("H2O"), molecule("CH3OH")
    b.positions += [3.2, 0.0, 0.0]
    dimer, monomer_a, monomer_b = a + b, a.copy(), b.copy()
    cells = [molecule(name) for name in ("CH4", "NH3", "CO2", "HCN")]
    for atoms, name in zip(cells, ["ice:Ih", "co2", "ice:Ih", "contacts"], strict=True):
        atoms.info["system"] = name
    monomer_b.info["system"] = "contacts"  # a contact set naming one monomer
    loose = molecule("C2H6")
    frames = [cells[0], dimer, cells[1], monomer_a, cells[2], monomer_b, cells[3], loose]
    units = held_out_units(frames)
    assert units[0] == units[4]  # both "ice:Ih"
    assert units[1] == units[3] == units[5] == units[6]  # the dimer and "contacts"
    assert len({units[0], units[1], units[2], units[7]}) == 4
    assert units.tolist() == [0, 1, 2, 1, 0, 1, 1, 3]  # numbered by first structure


def test_split_systems_keeps_each_interaction_system_whole():
    """A held-out set holds whole interaction energies (they calibrate their σ);
    ``deltaml fit --validation`` and the ranking examples split this way."""
    from ase.build import molecule

    from deltaml.dataset import split_systems

    a, b = molecule("H2O"), molecule("CH3OH")  # distinct molecules: one match each
    b.positions += [3.2, 0.0, 0.0]
    scan = a + b.copy()
    scan.positions[3:] += [0.4, 0.0, 0.0]  # monomer B moved rigidly: the same molecule
    system = [a + b, scan, a.copy(), b.copy()]
    loose = [molecule(name) for name in ("CH4", "NH3", "CO2", "HCN", "C2H6", "CH3OH")]
    frames = system + loose
    kept_together = 0
    for seed in range(12):
        train, held = split_systems(frames, 0.4, seed)
        assert sorted(train + held) == list(range(len(frames)))
        together = {0, 1, 2, 3} <= set(held) or {0, 1, 2, 3} <= set(train)
        assert together, (seed, train, held)
        kept_together += {0, 1, 2, 3} <= set(held)
    assert 0 < kept_together < 12  # the system is drawn like any other unit
