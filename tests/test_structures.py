"""Tests of deltaml.structures: validation errors, charge/multiplicity, cell geometry."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.calculator import InputError

from deltaml.errors import (
    ChargeMultiplicityError,
    DeltaMLError,
    EmptyStructureError,
    NonFiniteGeometryError,
    OverlappingAtomsError,
    SingularCellError,
    StructureError,
    UnsupportedElementError,
)
from deltaml.structures import (
    DEFAULT_MIN_DISTANCE,
    perpendicular_widths,
    resolve_charge,
    resolve_multiplicity,
    supercell_repeats,
    validate_structure,
)

#: GFN1/GFN2-xTB cover H..Rn (Z = 1..86); the baseline passes this range.
GFN_ELEMENTS = range(1, 87)


@pytest.fixture
def hydrogen_molecule() -> Atoms:
    """H2 at its equilibrium bond length (0.74 Å): 2 electrons."""
    return Atoms("H2", positions=[[0.0, 0.0, 0.0], [0.74, 0.0, 0.0]])


# -- error classes ----------------------------------------------------------------


@pytest.mark.parametrize(
    "cls",
    [
        StructureError,
        EmptyStructureError,
        NonFiniteGeometryError,
        OverlappingAtomsError,
        UnsupportedElementError,
        SingularCellError,
        ChargeMultiplicityError,
    ],
)
def test_structure_errors_subclass_deltaml_valueerror_and_ase_inputerror(cls):
    assert issubclass(cls, DeltaMLError)
    assert issubclass(cls, ValueError)
    assert issubclass(cls, InputError)
    assert issubclass(cls, StructureError)


def test_structure_error_is_caught_as_valueerror():
    with pytest.raises(ValueError, match="no atoms"):
        validate_structure(Atoms())


# -- good structures pass ---------------------------------------------------------


def test_good_molecule_passes(water, ethanol):
    for atoms in (water, ethanol):
        before = atoms.positions.copy()
        assert (
            validate_structure(atoms, supported_elements=GFN_ELEMENTS, charge=0, multiplicity=1)
            is None
        )
        np.testing.assert_array_equal(atoms.positions, before)  # not modified


def test_good_crystal_passes(co2_crystal, co2_crystal_strained):
    validate_structure(co2_crystal, supported_elements=GFN_ELEMENTS, charge=0, multiplicity=1)
    validate_structure(co2_crystal_strained, supported_elements=GFN_ELEMENTS, charge=0)


def test_single_atom_molecule_passes():
    validate_structure(Atoms("He"), supported_elements=GFN_ELEMENTS, charge=0, multiplicity=1)


# -- empty and non-finite ---------------------------------------------------------


def test_empty_structure():
    with pytest.raises(EmptyStructureError, match=r"^the structure has no atoms$"):
        validate_structure(Atoms())


def test_empty_periodic_structure():
    with pytest.raises(EmptyStructureError, match="no atoms"):
        validate_structure(Atoms(cell=[5.0, 5.0, 5.0], pbc=True))


def test_nan_position_names_atom_and_value(water):
    water.positions[1, 0] = np.nan
    with pytest.raises(
        NonFiniteGeometryError,
        match=r"position of atom 1 \(H\) is not finite: \[nan, .*\] Å \(1 atom\(s\) affected\)",
    ):
        validate_structure(water)


def test_inf_positions_count_affected_atoms(ethanol):
    ethanol.positions[3, 2] = np.inf
    ethanol.positions[5, 1] = -np.inf
    symbol = ethanol.get_chemical_symbols()[3]
    with pytest.raises(
        NonFiniteGeometryError,
        match=rf"position of atom 3 \({symbol}\) is not finite: \[.*inf\] Å "
        r"\(2 atom\(s\) affected\)",
    ):
        validate_structure(ethanol)


def test_inf_cell(co2_crystal):
    cell = co2_crystal.cell.array.copy()
    cell[1, 1] = np.inf
    co2_crystal.cell = cell
    with pytest.raises(NonFiniteGeometryError, match=r"the cell is not finite: \[\[.*inf.*\]\] Å"):
        validate_structure(co2_crystal)


def test_nan_cell_of_a_molecule_is_also_refused(water):
    # Even a non-periodic structure must not carry NaN in its cell: it would reach the engines.
    water.cell = [[np.nan, 0, 0], [0, 10, 0], [0, 0, 10]]
    with pytest.raises(NonFiniteGeometryError, match="the cell is not finite"):
        validate_structure(water)


# -- overlapping atoms ------------------------------------------------------------


def test_overlapping_atoms_names_both_and_distance():
    atoms = Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [0.0, 0.3, 0.0]])
    with pytest.raises(
        OverlappingAtomsError,
        match=r"atoms 0 \(O\) and 2 \(H\) are 0\.300 Å apart \(minimum 0\.5 Å\)",
    ):
        validate_structure(atoms)


def test_overlapping_atoms_reports_the_closest_pair():
    atoms = Atoms(
        "C3", positions=[[0.0, 0.0, 0.0], [0.4, 0.0, 0.0], [0.4, 0.25, 0.0]]
    )  # pairs: 0-1 0.40 Å, 1-2 0.25 Å, 0-2 0.47 Å
    with pytest.raises(OverlappingAtomsError, match=r"atoms [12] \(C\) and [12] \(C\) are 0\.250"):
        validate_structure(atoms)


def test_overlap_across_periodic_boundary():
    # 0.1 Å and 4.9 Å in a 5 Å cell: 4.8 Å apart inside the cell, 0.2 Å through the boundary.
    atoms = Atoms("H2", positions=[[0.1, 1, 1], [4.9, 1, 1]], cell=[5, 5, 5], pbc=True)
    with pytest.raises(
        OverlappingAtomsError,
        match=r"atoms [01] \(H\) and [01] \(H\) are 0\.200 Å apart \(minimum 0\.5 Å\)",
    ):
        validate_structure(atoms)
    atoms.pbc = False  # the same positions without periodicity are fine
    validate_structure(atoms)


def test_overlap_with_own_periodic_image():
    atoms = Atoms("H", positions=[[0, 0, 0]], cell=[0.4, 5, 5], pbc=True)
    with pytest.raises(
        OverlappingAtomsError,
        match=r"atoms 0 \(H\) and 0 \(H\) \(periodic image\) are 0\.400 Å apart",
    ):
        validate_structure(atoms)


def test_custom_min_distance_and_disabled_check(water):
    # O-H in water is ~0.97 Å: refused at 1.0 Å, fine at the default, unchecked at 0.
    with pytest.raises(OverlappingAtomsError, match=r"\(minimum 1\.0 Å\)"):
        validate_structure(water, min_distance=1.0)
    validate_structure(water, min_distance=DEFAULT_MIN_DISTANCE)
    collapsed = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.01]])
    validate_structure(collapsed, min_distance=0)


# -- elements ---------------------------------------------------------------------


def test_unsupported_element_names_it_and_the_range():
    atoms = Atoms("UO2", positions=[[0, 0, 0], [1.8, 0, 0], [-1.8, 0, 0]])
    with pytest.raises(
        UnsupportedElementError,
        match=r"element\(s\) U \(Z=92\) not supported by GFN2-xTB, which covers "
        r"Z=1\.\.86 \(H\.\.Rn\)",
    ):
        validate_structure(atoms, supported_elements=GFN_ELEMENTS, method_name="GFN2-xTB")


def test_unsupported_elements_all_listed_sorted():
    atoms = Atoms("PuUH", positions=[[0, 0, 0], [3, 0, 0], [6, 0, 0]])
    with pytest.raises(UnsupportedElementError, match=r"U \(Z=92\), Pu \(Z=94\) not supported"):
        validate_structure(atoms, supported_elements=GFN_ELEMENTS)


def test_dummy_element_x_is_unsupported():
    with pytest.raises(UnsupportedElementError, match=r"X \(Z=0\) not supported by this method"):
        validate_structure(Atoms("X"), supported_elements=GFN_ELEMENTS)


def test_any_element_without_supported_list():
    validate_structure(Atoms("U"))


# -- periodic cells ---------------------------------------------------------------


def test_singular_cell_zero_vector():
    atoms = Atoms("H", cell=[5.0, 5.0, 0.0], pbc=True)
    with pytest.raises(
        SingularCellError,
        match=r"periodic along \[True, True, True\] is singular: .* span 0 \(Å\^3\); "
        r"set three independent cell vectors or pbc=False",
    ):
        validate_structure(atoms)


def test_singular_cell_coplanar_vectors():
    atoms = Atoms("H", cell=[[5, 0, 0], [0, 5, 0], [5, 5, 0]], pbc=True)
    with pytest.raises(SingularCellError, match=r"\[5\.0, 5\.0, 0\.0\]\] Å span 0 \(Å\^3\)"):
        validate_structure(atoms)


def test_singular_cell_two_dimensional():
    atoms = Atoms("H", cell=[5.0, 0.0, 0.0], pbc=[True, True, False])
    with pytest.raises(
        SingularCellError, match=r"periodic along \[True, True, False\] .* span 0 \(Å\^2\)"
    ):
        validate_structure(atoms)


def test_partially_periodic_cells_with_zero_vectors_pass():
    slab = Atoms("H2", positions=[[0, 0, 0], [0, 0, 2]], cell=[5, 5, 0], pbc=[True, True, False])
    validate_structure(slab)
    wire = Atoms("H2", positions=[[0, 0, 0], [0, 0, 2]], cell=[5, 0, 0], pbc=[True, False, False])
    validate_structure(wire)
    molecule_no_cell = Atoms("H2", positions=[[0, 0, 0], [0, 0, 2]])
    validate_structure(molecule_no_cell)


# -- charge and multiplicity ------------------------------------------------------


def test_odd_electrons_with_singlet(water):
    # Water has 10 electrons; the cation has 9, an odd number.
    with pytest.raises(
        ChargeMultiplicityError,
        match=r"multiplicity 1 is impossible with charge 1: 9 electrons \(odd\) "
        r"allow multiplicity 2, 4, 6, \.\.\.",
    ):
        validate_structure(water, charge=1, multiplicity=1)


def test_even_electrons_with_doublet(water):
    with pytest.raises(
        ChargeMultiplicityError, match=r"10 electrons \(even\) allow multiplicity 1, 3, 5"
    ):
        validate_structure(water, charge=0, multiplicity=2)


def test_non_integer_charge(water):
    with pytest.raises(ChargeMultiplicityError, match=r"total charge must be an integer, got 0\.5"):
        validate_structure(water, charge=0.5)


def test_negative_electron_count(hydrogen_molecule):
    with pytest.raises(
        ChargeMultiplicityError, match=r"charge 3 leaves -1 electrons \(nuclear charge 2\)"
    ):
        validate_structure(hydrogen_molecule, charge=3)


@pytest.mark.parametrize("multiplicity", [0, -1, 1.5])
def test_multiplicity_not_positive_integer(water, multiplicity):
    with pytest.raises(
        ChargeMultiplicityError,
        match=rf"multiplicity must be a positive integer \(2S\+1\), got {multiplicity}",
    ):
        validate_structure(water, charge=0, multiplicity=multiplicity)


def test_more_unpaired_than_electrons_is_refused(hydrogen_molecule):
    # 2 electrons: at most 2 unpaired, so multiplicity 5 (4 unpaired) is impossible.
    with pytest.raises(ChargeMultiplicityError, match=r"multiplicity 5 is impossible"):
        validate_structure(hydrogen_molecule, charge=0, multiplicity=5)


def test_more_unpaired_than_electrons_message_lists_only_possible_values(hydrogen_molecule):
    with pytest.raises(ChargeMultiplicityError) as info:
        validate_structure(hydrogen_molecule, charge=0, multiplicity=5)
    allowed = str(info.value).split("allow multiplicity", 1)[1]
    assert "3" in allowed
    assert "5" not in allowed


@pytest.mark.parametrize(
    ("charge", "multiplicity"), [(0, 1), (0, 3), (1, 2), (-1, 2), (2, 1), (2, 3)]
)
def test_consistent_charge_and_multiplicity_pass(water, charge, multiplicity):
    validate_structure(water, charge=charge, multiplicity=multiplicity)


def test_hydrogen_atom_cannot_be_a_singlet():
    with pytest.raises(ChargeMultiplicityError, match=r"1 electrons \(odd\)"):
        validate_structure(Atoms("H"), charge=0, multiplicity=1)
    validate_structure(Atoms("H"), charge=0, multiplicity=2)
    validate_structure(Atoms("H"), charge=1, multiplicity=1)  # a bare proton


# -- resolve_charge / resolve_multiplicity ----------------------------------------


def test_resolve_charge_explicit_wins_over_initial_charges(water):
    water.set_initial_charges([1.0, 0.0, 0.0])
    assert resolve_charge(water, -1) == -1
    assert isinstance(resolve_charge(water, 2.0), int)


def test_resolve_charge_from_initial_charges(water):
    assert resolve_charge(water, None) == 0
    water.set_initial_charges([0.5, 0.25, 0.25])
    assert resolve_charge(water, None) == 1


def test_resolve_charge_refuses_fractional(water):
    water.set_initial_charges([0.5, 0.0, 0.0])
    with pytest.raises(ChargeMultiplicityError, match=r"must be an integer, got 0\.5 e"):
        resolve_charge(water, None)
    with pytest.raises(ChargeMultiplicityError, match=r"must be an integer, got 1\.3 e"):
        resolve_charge(water, 1.3)


def test_resolve_multiplicity(water):
    assert resolve_multiplicity(water, 0, 3) == 3  # explicit wins
    assert resolve_multiplicity(water, 0, None) == 1  # 10 electrons
    assert resolve_multiplicity(water, 1, None) == 2  # 9 electrons
    water.set_initial_magnetic_moments([2.0, 0.0, 0.0])
    assert resolve_multiplicity(water, 0, None) == 3  # two unpaired electrons
    water.set_initial_magnetic_moments([0.0, -1.0, -1.0])
    assert resolve_multiplicity(water, 0, None) == 3  # spin down counts the same


# -- perpendicular widths ---------------------------------------------------------


def test_perpendicular_widths_cubic_and_orthorhombic():
    np.testing.assert_allclose(perpendicular_widths(np.eye(3) * 5.68), [5.68] * 3, rtol=1e-14)
    np.testing.assert_allclose(
        perpendicular_widths(np.diag([3.0, 5.0, 10.0])), [3.0, 5.0, 10.0], rtol=1e-14
    )


def test_perpendicular_widths_hexagonal():
    # In-plane width of a hexagonal cell: a·sin(60°) = a·√3/2; out of plane: c.
    a, c = 4.0, 6.5
    cell = [[a, 0, 0], [-a / 2, a * np.sqrt(3) / 2, 0], [0, 0, c]]
    expected = [a * np.sqrt(3) / 2, a * np.sqrt(3) / 2, c]
    np.testing.assert_allclose(perpendicular_widths(cell), expected, rtol=1e-14)


def test_perpendicular_widths_triclinic_against_reciprocal_cell(co2_crystal_strained, rotation):
    # Closed form: the distance between lattice planes (hkl) = 1/|b_hkl|, with b_i the
    # rows of inv(cell).T (reciprocal vectors without 2π): width_i = 1/|b_i|.
    for cell in (
        co2_crystal_strained.cell.array,
        np.array([[4.0, 0.3, -0.2], [1.1, 5.0, 0.4], [-0.7, 0.9, 6.0]]) @ rotation.T,
    ):
        expected = 1.0 / np.linalg.norm(np.linalg.inv(cell).T, axis=1)
        np.testing.assert_allclose(perpendicular_widths(cell), expected, rtol=1e-12)


def test_perpendicular_widths_left_handed_cell_are_positive():
    cell = np.diag([3.0, 4.0, -5.0])
    np.testing.assert_allclose(perpendicular_widths(cell), [3.0, 4.0, 5.0], rtol=1e-14)


# -- supercell repeats ------------------------------------------------------------


def test_supercell_repeats_cubic_co2(co2_crystal):
    assert supercell_repeats(co2_crystal.cell.array, co2_crystal.pbc, 7.0) == (2, 2, 2)
    # ceil(7 / 5.68) = 2, ceil(12 / 5.68) = 3
    assert supercell_repeats(co2_crystal.cell.array, co2_crystal.pbc, 12.0) == (3, 3, 3)


def test_supercell_repeats_anisotropic():
    # ceil(7/3) = 3, ceil(7/5) = 2, 10 Å already wide enough
    assert supercell_repeats(np.diag([3.0, 5.0, 10.0]), [True] * 3, 7.0) == (3, 2, 1)


def test_supercell_repeats_exact_width_needs_no_extra_copy():
    # 3.5 Å x 2 = 7 Å exactly: round-off must not ask for a third copy.
    assert supercell_repeats(np.diag([3.5, 7.0, 7.0]), [True] * 3, 7.0) == (2, 1, 1)
    # Hexagonal, a = 7/√3 Å: in-plane width a·√3/2 = 3.5 Å and c = 7 Å, but computed as
    # V/area they come out a few ulp short, so 7/width is 2.0000000000000004 and
    # 1.0000000000000002: a bare ceil() would give (3, 3, 2).
    a = 7.0 / np.sqrt(3)
    cell = np.array([[a, 0, 0], [-a / 2, a * np.sqrt(3) / 2, 0], [0, 0, 7.0]])
    assert supercell_repeats(cell, [True] * 3, 7.0) == (2, 2, 1)
    assert supercell_repeats(cell * [[1], [1], [0]], [True, True, False], 7.0) == (2, 2, 1)


def test_supercell_repeats_hexagonal_uses_perpendicular_width():
    # |a| = 4 Å > 3.5 Å but the in-plane width is 4·√3/2 = 3.46 Å: ceil(7/3.46) = 3.
    a, c = 4.0, 7.5
    cell = [[a, 0, 0], [-a / 2, a * np.sqrt(3) / 2, 0], [0, 0, c]]
    assert supercell_repeats(cell, [True] * 3, 7.0) == (3, 3, 1)


def test_supercell_repeats_min_width_zero_and_no_pbc():
    cell = np.diag([3.0, 3.0, 3.0])
    assert supercell_repeats(cell, [True] * 3, 0.0) == (1, 1, 1)
    assert supercell_repeats(cell, [False] * 3, 7.0) == (1, 1, 1)


def test_supercell_repeats_never_repeats_non_periodic_directions():
    # Narrow (3 Å) or zero, a non-periodic vector is never repeated.
    assert supercell_repeats(np.diag([3.0, 3.0, 3.0]), [True, True, False], 7.0) == (3, 3, 1)
    assert supercell_repeats(np.diag([3.0, 3.0, 0.0]), [True, True, False], 7.0) == (3, 3, 1)
    assert supercell_repeats(np.diag([3.0, 0.0, 3.0]), [True, False, True], 7.0) == (3, 1, 3)


def test_supercell_repeats_slab_with_tilted_vacuum_vector():
    # A slab whose non-periodic vector is tilted: the in-plane widths are 4 Å (2 copies),
    # not the 2.2 Å of the 3D cell, which would ask for 4.
    cell = np.array([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [3.0, 3.0, 2.0]])
    assert supercell_repeats(cell, [True, True, False], 7.0) == (2, 2, 1)


def test_supercell_repeats_hexagonal_slab_and_wire():
    a = 4.0
    slab = np.array([[a, 0, 0], [-a / 2, a * np.sqrt(3) / 2, 0], [0, 0, 0]])
    assert supercell_repeats(slab, [True, True, False], 7.0) == (3, 3, 1)
    # A wire along a tilted vector of length 5 Å (3-4-5): ceil(7/5) = 2.
    wire = np.array([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert supercell_repeats(wire, [True, False, False], 7.0) == (2, 1, 1)


def test_supercell_repeats_reach_min_width(co2_crystal_strained):
    cell = co2_crystal_strained.cell.array
    for min_width in (5.0, 7.0, 11.3, 20.0):
        repeats = supercell_repeats(cell, [True] * 3, min_width)
        widths = perpendicular_widths(cell * np.array(repeats)[:, None])
        assert (widths >= min_width - 1e-9).all()
        # and it is the smallest: one copy fewer along any repeated axis is too narrow
        for axis in range(3):
            if repeats[axis] > 1:
                fewer = np.array(repeats)
                fewer[axis] -= 1
                assert perpendicular_widths(cell * fewer[:, None])[axis] < min_width


def test_charge_and_multiplicity_prefer_given_then_info_then_initial_values():
    from deltaml.structures import charge_and_multiplicity

    oh = Atoms("OH", positions=[[0, 0, 0], [0, 0, 0.97]])
    assert charge_and_multiplicity(oh) == (0, 2)  # odd electron count: a doublet
    oh.info.update(charge=-1)
    assert charge_and_multiplicity(oh) == (-1, 1)
    assert charge_and_multiplicity(oh, charge=-1) == (-1, 1)
    oh.info.update(multiplicity=3)
    assert charge_and_multiplicity(oh) == (-1, 3)
    oh.info.clear()
    oh.set_initial_charges([-1, 0])
    assert charge_and_multiplicity(oh) == (-1, 1)


def test_info_charge_is_read_by_the_calculators_rule_too():
    """One rule: resolve_charge (every calculator) reads info["charge"] like the loaders."""
    nh4 = Atoms("NH4", positions=[[0, 0, 0], [0.6, 0.6, 0.6], [-0.6, -0.6, 0.6],
                                  [0.6, -0.6, -0.6], [-0.6, 0.6, -0.6]])  # fmt: skip
    assert resolve_charge(nh4) == 0 and resolve_multiplicity(nh4, 0) == 2  # the radical
    nh4.info["charge"] = 1
    assert resolve_charge(nh4) == 1
    assert resolve_multiplicity(nh4, 1) == 1
    nh4.info["multiplicity"] = 3
    assert resolve_multiplicity(nh4, 1) == 3


@pytest.mark.parametrize(
    ("setup", "explicit", "message"),
    [
        (
            {"info": {"charge": 1}},
            {"charge": 0},
            r"charge 0 given, but the structure says charge=1",
        ),
        (
            {"info": {"charge": 1}, "charges": [0.5, -0.5, 0.0]},
            {},
            r"info\['charge'\] is 1 but the initial charges sum to 0",
        ),
        (
            {"info": {"multiplicity": 1}},
            {"multiplicity": 3},
            r"multiplicity 3 given, but the structure says multiplicity=1",
        ),
        (
            {"info": {"multiplicity": 1}, "moments": [2.0, 0.0, 0.0]},
            {},
            r"info\['multiplicity'\] is 1 but the initial magnetic moments give 2",
        ),
        ({"info": {"charge": "plus one"}}, {}, r"info\['charge'\] must be a number"),
    ],
)
def test_conflicting_charge_or_multiplicity_is_an_error(water, setup, explicit, message):
    from deltaml.structures import charge_and_multiplicity

    water.info.update(setup["info"])
    if "charges" in setup:
        water.set_initial_charges(setup["charges"])
    if "moments" in setup:
        water.set_initial_magnetic_moments(setup["moments"])
    with pytest.raises(ChargeMultiplicityError, match=message):
        charge_and_multiplicity(water, **explicit)


def test_agreeing_sources_are_no_conflict(water):
    from deltaml.structures import charge_and_multiplicity

    water.info.update(charge=0, multiplicity=3)
    water.set_initial_charges([0.5, -0.25, -0.25])  # partial charges summing to the total
    water.set_initial_magnetic_moments([2.0, 0.0, 0.0])
    assert charge_and_multiplicity(water) == (0, 3)
    assert charge_and_multiplicity(water, charge=0, multiplicity=3) == (0, 3)
    water.info.clear()
    assert charge_and_multiplicity(water, charge=-1) == (-1, 3)  # explicit wins over charges


def test_a_composite_call_searches_the_neighbours_of_a_cell_once(co2_crystal, monkeypatch):
    import deltaml.structures as structures
    from deltaml.calculator import DeltaCalculator
    from deltaml.correction import ZeroCorrection

    calls = []
    original = structures.neighbor_list

    def counted(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(structures, "neighbor_list", counted)
    monkeypatch.setattr(structures, "_DISTANCES_PASSED", {})  # earlier tests saw this cell
    atoms = co2_crystal.copy()
    atoms.calc = DeltaCalculator(correction=ZeroCorrection(), dispersion="d3bj:pbe0")
    atoms.get_potential_energy()  # composite, baseline and dispersion each validate it
    assert calls == ["ijd"]
    # A geometry that fails is never taken for one that passed.
    squeezed = co2_crystal.copy()
    squeezed.positions[1] = squeezed.positions[0] + [0.3, 0.0, 0.0]
    with pytest.raises(OverlappingAtomsError):
        validate_structure(squeezed)
    with pytest.raises(OverlappingAtomsError):
        validate_structure(squeezed)
