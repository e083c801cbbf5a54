"""Molecules from connectivity, wide cells and the GenIce2 ice builders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ase.build import molecule

from deltaml.crystals import (
    ICE_PHASES,
    bonding_changes,
    density_g_cm3,
    formula_units,
    ice_polymorph,
    identify_molecules,
    repeat_unit,
    wide_cell_matrix,
)
from deltaml.errors import ParameterError
from deltaml.structures import perpendicular_widths


def test_molecules_across_the_cell_boundary_are_whole(co2_crystal):
    found = identify_molecules(co2_crystal)
    assert found.count == {"CO2": 4}
    # Every molecule has one C and two O, though the O atoms sit in other images.
    for k in range(4):
        symbols = sorted(np.array(co2_crystal.get_chemical_symbols())[found.labels == k])
        assert symbols == ["C", "O", "O"]
    assert len(found.bonds) == 8


def test_hydrogen_bonds_do_not_join_water_molecules():
    ice = ice_polymorph("Ic", min_width=0.0)
    found = identify_molecules(ice)
    assert found.count == {"H2O": len(ice) // 3}
    assert len(found.bonds) == 2 * len(ice) // 3  # two O–H bonds per molecule, no H···O


def test_molecule_labels_follow_the_atom_order(water):
    pair = water.copy()
    other = water.copy()
    other.translate([5.0, 0.0, 0.0])
    pair += other
    found = identify_molecules(pair)
    assert found.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_formula_units_count_and_refuse_other_molecules(co2_crystal):
    found = identify_molecules(co2_crystal)
    assert formula_units(found, {"CO2": 1}) == 4
    assert formula_units(found, {"CO2": 2}) == 2
    with pytest.raises(ParameterError, match="formula unit"):
        formula_units(found, {"H2O": 1})
    with pytest.raises(ParameterError, match="whole number"):
        formula_units(found, {"CO2": 3})


def test_a_broken_bond_is_reported(water):
    stretched = water.copy()
    stretched.positions[1] += 1.5 * (stretched.positions[1] - stretched.positions[0])
    changes = bonding_changes(water, stretched)
    assert changes["broken"] == [(0, 1)]
    assert changes["formed"] == []
    assert bonding_changes(water, water) == {"broken": [], "formed": []}
    with pytest.raises(ParameterError, match="same atoms"):
        bonding_changes(water, molecule("CO2"))


@pytest.mark.parametrize(
    ("cellpar", "copies"),
    [([6.38, 6.38, 6.38, 90, 90, 90], 2), ([7.5, 8.0, 9.0, 90, 90, 90], 1)],
)
def test_wide_cell_matrix_is_the_smallest_wide_supercell(cellpar, copies):
    from ase.geometry import cellpar_to_cell

    cell = cellpar_to_cell(cellpar)
    matrix = wide_cell_matrix(cell, 7.0)
    assert round(abs(np.linalg.det(matrix))) == copies
    assert np.linalg.det(matrix) > 0
    assert perpendicular_widths(matrix @ cell).min() >= 7.0
    # No single copy of a cubic 6.38 Å cell is 7 Å wide, so 2 is the minimum.
    if copies == 2:
        assert perpendicular_widths(cell).min() < 7.0


def test_wide_cell_enlarges_narrow_cells_and_keeps_molecules_whole():
    from ase.io import read

    from deltaml.crystals import wide_cell

    data = Path(__file__).resolve().parents[1] / "data" / "crystals"
    dry_ice = read(data / "co2_pa3.extxyz")
    dry_ice.info["system"] = "co2_pa3"
    wide = wide_cell(dry_ice, 7.0)
    copies = round(wide.get_volume() / dry_ice.get_volume())
    assert copies > 1 and len(wide) == copies * len(dry_ice)
    assert perpendicular_widths(wide.cell.array).min() >= 7.0
    assert identify_molecules(wide).count == {"CO2": 4 * copies}
    assert wide.info["system"] == "co2_pa3"
    # Already wide: an equal copy.
    again = wide_cell(wide, 7.0)
    assert again is not wide
    np.testing.assert_array_equal(again.positions, wide.positions)


@pytest.mark.parametrize("name", sorted(ICE_PHASES))
def test_ice_phases_are_wide_whole_water_cells(name):
    ice = ice_polymorph(name)
    assert ice.info["ice_phase"] == name
    assert perpendicular_widths(ice.cell.array).min() >= 7.0
    assert np.linalg.det(ice.cell.array) > 0
    found = identify_molecules(ice)
    assert found.count == {"H2O": len(ice) // 3}
    # Molecules are whole as stored (O–H 0.98 Å without minimum image).
    mol = ice.positions.reshape(-1, 3, 3)
    np.testing.assert_allclose(np.linalg.norm(mol[:, 1:] - mol[:, :1], axis=2), 0.98, atol=1e-6)
    # Nearest O···O at a hydrogen-bond distance, not overlapping.
    oxygens = ice[ice.numbers == 8]
    d = oxygens.get_all_distances(mic=True)
    np.fill_diagonal(d, np.inf)
    assert 2.4 < d.min() < 3.0
    assert 0.85 < density_g_cm3(ice) < 1.7


def test_ice_builder_refuses_unknown_phases_and_wrong_reductions():
    with pytest.raises(ParameterError, match="unknown ice phase"):
        ice_polymorph("XXI")
    ice = ice_polymorph("II", min_width=0.0)
    with pytest.raises(ParameterError, match="copies"):
        repeat_unit(ice, (2, 1, 1))


def test_reduced_ice_cell_replicates_to_the_original():
    from deltaml.crystals import _genice_cell

    full = _genice_cell("8", (), 0)
    unit = repeat_unit(full, (2, 2, 2))
    assert len(unit) * 8 == len(full)
    np.testing.assert_allclose(unit.get_volume() * 8, full.get_volume())


def test_the_bond_search_without_images_is_the_neighbour_list_rule(water_box):
    """Molecules and clusters take an all-pairs search: same bonds as ASE's neighbour list."""
    from ase.neighborlist import natural_cutoffs, neighbor_list

    from deltaml.crystals import BOND_SCALE, bonded_pairs

    cluster = water_box.copy()
    cluster.pbc = False
    cluster.positions[0] = cluster.positions[1] + [0.0, 0.0, 1.15]  # just inside 1.2 × r_OH
    first, second = neighbor_list("ij", cluster, natural_cutoffs(cluster, mult=BOND_SCALE))
    expected = {(int(i), int(j)) for i, j in zip(first, second, strict=True) if i < j}
    assert bonded_pairs(cluster) == expected
    assert (0, 1) in expected and (0, 2) not in expected  # a bond near the threshold kept


def test_molecules_are_found_again_when_the_atoms_move(water):
    """The last answer is remembered, but only for the same geometry."""
    moved = water.copy()
    assert identify_molecules(moved).count == {"H2O": 1}
    moved.positions[0] += [3.0, 0.0, 0.0]  # the O leaves: three fragments
    assert identify_molecules(moved).formulas == ["O", "H", "H"]
    moved.set_cell([3.5, 8.0, 8.0], scale_atoms=False)
    moved.pbc = True  # same positions, but the O's image is back at 0.5 Å beside them
    assert identify_molecules(moved).formulas == ["H2O"]
    assert identify_molecules(water).count == {"H2O": 1}
