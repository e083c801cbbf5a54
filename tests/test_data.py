"""Tests of the shipped structures in data/: readable, valid, and as documented."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.io import read
from ase.neighborlist import neighbor_list

from deltaml.structures import validate_structure

DATA = Path(__file__).resolve().parents[1] / "data"


ORGANIC = {
    "oxalic_acid_alpha": ("OXALAC02", "C2H2O4", 4),
    "oxalic_acid_beta": ("OXALAC11", "C2H2O4", 2),
    "urea_i": ("UREAXX02", "CH4N2O", 2),
    "benzene_i": ("BENZEN", "C6H6", 4),
    "aspirin_i": ("ACSALA", "C9H8O4", 4),
    "aspirin_ii": ("ACSALA13", "C9H8O4", 4),
    "imide_boqqut": ("BOQQUT", "C8H11NO2", 4),
    "imide_boqqut01": ("BOQQUT01", "C8H11NO2", 8),
}


@pytest.mark.parametrize(
    "name",
    ["molecules/benzene.xyz", "crystals/co2_pa3.extxyz"]
    + [f"crystals/{name}.extxyz" for name in ORGANIC],
)
def test_shipped_structures_are_valid(name):
    atoms = read(DATA / name)
    validate_structure(atoms, charge=0)
    assert atoms.info.get("source")


def test_dry_ice_matches_its_published_structure():
    """Simon & Peters (1980): Pa-3, a = 5.624 Å, Z = 4, C=O = sqrt(3)·x·a = 1.154 Å."""
    atoms = read(DATA / "crystals" / "co2_pa3.extxyz")
    assert atoms.get_chemical_formula() == "C4O8"
    np.testing.assert_allclose(atoms.cell.cellpar(), [5.624] * 3 + [90.0] * 3)
    d = neighbor_list("d", atoms, 1.3)
    assert len(d) == 16  # two C=O bonds per CO2, each counted from both ends
    np.testing.assert_allclose(d, np.sqrt(3) * 0.1185 * 5.624, atol=1e-6)


@pytest.mark.parametrize("name", sorted(ORGANIC))
def test_organic_crystals_are_whole_molecules_with_neutron_hydrogens(name):
    """CSD cells: the documented molecules, whole; X–H at the neutron lengths."""
    from deltaml.crystals import identify_molecules

    refcode, formula, count = ORGANIC[name]
    atoms = read(DATA / "crystals" / f"{name}.extxyz")
    assert refcode in atoms.info["source"]
    assert identify_molecules(atoms).count == {formula: count}
    first, second, d = neighbor_list("ijd", atoms, 1.2)
    hydrogen = atoms.numbers[first] == 1
    partners = {6: 1.083, 7: 1.009, 8: 0.983}
    for j, length in zip(second[hydrogen], d[hydrogen], strict=True):
        assert length == pytest.approx(partners[atoms.numbers[j]], abs=1e-6)
    assert np.count_nonzero(hydrogen) == np.count_nonzero(atoms.numbers == 1)


def test_alpha_oxalic_acid_hydrogens_donate_hydrogen_bonds():
    """The H added to α-oxalic acid each point at an O of another molecule."""
    from deltaml.crystals import identify_molecules

    atoms = read(DATA / "crystals" / "oxalic_acid_alpha.extxyz")
    labels = identify_molecules(atoms).labels
    oxygens = np.flatnonzero(atoms.numbers == 8)
    for h in np.flatnonzero(atoms.numbers == 1):
        others = [o for o in oxygens if labels[o] != labels[h]]
        assert atoms.get_distances(h, others, mic=True).min() < 2.0


def test_crystal_starts_are_wide_cells_of_whole_molecules():
    """Every starting cell of the periodic reference set is ≥ 7 Å wide (Γ-point labels)."""
    from deltaml.crystals import whole_molecules
    from deltaml.structures import perpendicular_widths

    starts = read(DATA / "structures" / "crystal_starts.extxyz", ":")
    systems = [a.info["system"] for a in starts]
    assert len(set(systems)) == len(systems) == 17
    assert {"co2_pa3", "co2_cmca", *ORGANIC} <= set(systems)
    for atoms in starts:
        assert perpendicular_widths(atoms.cell.array).min() >= 7.0
        _, positions = whole_molecules(atoms)
        np.testing.assert_allclose(positions, atoms.positions, atol=1e-8)  # stored whole


def test_crystal_molecules_are_each_starts_molecule_cut_and_relaxed():
    """The gas-phase ends of the lattice energies: every molecule of the starts, twice."""
    from deltaml.baseline import XTBBaseline
    from deltaml.crystals import whole_molecules

    starts = read(DATA / "structures" / "crystal_starts.extxyz", ":")
    molecules = read(DATA / "structures" / "crystal_molecules.extxyz", ":")
    formulas = {f for a in starts for f in whole_molecules(a)[0].formulas}
    assert sorted(m.info["system"] for m in molecules) == sorted(
        f"gas:{f}" for f in formulas for _ in range(2)
    )
    for atoms in molecules:
        assert not atoms.pbc.any()
        assert whole_molecules(atoms)[0].formulas == [atoms.info["system"][4:]]
        if "relaxed" in atoms.info["source"]:
            atoms.calc = XTBBaseline(method="GFN2-xTB")
            assert np.abs(atoms.get_forces()).max() < 0.01


def test_structures_are_reproduced_by_their_script(tmp_path, monkeypatch):
    """data/make_structures.py regenerates exactly what is shipped."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_structures", DATA / "make_structures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (tmp_path / "molecules").mkdir()
    (tmp_path / "crystals").mkdir()
    monkeypatch.setattr(module, "HERE", tmp_path)
    module.main()
    for name in ("molecules/benzene.xyz", "crystals/co2_pa3.extxyz"):
        shipped, made = read(DATA / name), read(tmp_path / name)
        np.testing.assert_allclose(made.positions, shipped.positions, atol=1e-8)
        np.testing.assert_allclose(made.cell.array, shipped.cell.array, atol=1e-8)


LABELLED = DATA / "labelled" / "water_chno.extxyz"


def _labelled():
    return read(LABELLED, index=":")


def test_labelled_dataset_is_as_documented():
    """At least 300 labels: water (H2O)1-6, CHNO molecules and dimers, one method, < 20 MB."""
    frames = _labelled()
    assert len(frames) >= 300
    assert LABELLED.stat().st_size < 20e6
    kinds = {a.info["kind"] for a in frames}
    assert kinds == {"water_cluster", "molecule", "dimer"}
    sizes = {len(a) // 3 for a in frames if a.info["kind"] == "water_cluster"}
    assert sizes == {1, 2, 3, 4, 5, 6}
    assert all(set(a.get_chemical_symbols()) <= set("CHNO") for a in frames)
    for atoms in frames:
        assert np.isfinite(atoms.get_potential_energy())
        assert atoms.get_forces().shape == (len(atoms), 3)
        assert "energy_baseline" in atoms.info and "forces_dispersion" in atoms.arrays
    readme = (DATA / "README.md").read_text()
    counts = {k: sum(a.info["kind"] == k for a in frames) for k in kinds}
    for kind, count in counts.items():
        assert f"| {kind} | {count} |" in readme  # the README's table states the counts


def test_labelled_dataset_passes_the_import_checks():
    """One method record throughout, and units that agree with GFN2-xTB by magnitude."""
    from deltaml.dataset import read_labelled
    from deltaml.reference import PySCFReference

    frames = read_labelled(LABELLED, max_check_structures=12)
    record = frames[0].info["method_record"]
    expected = PySCFReference(xc="revpbe0", basis="def2-tzvp").record()
    assert {k: v for k, v in record.items() if k != "engine_version"} == {
        k: v for k, v in expected.items() if k != "engine_version"
    }


@pytest.mark.slow
def test_a_shipped_label_is_reproduced_by_the_reference():
    """Recompute the smallest labelled structure (a water monomer) from scratch."""
    from deltaml.reference import PySCFReference

    frames = [a for a in _labelled() if len(a) == 3]
    atoms = frames[len(frames) // 2]
    probe = atoms.copy()
    probe.calc = PySCFReference(xc="revpbe0", basis="def2-tzvp")
    assert probe.get_potential_energy() == pytest.approx(atoms.get_potential_energy(), abs=1e-5)
    np.testing.assert_allclose(probe.get_forces(), atoms.get_forces(), atol=1e-4)


INTERACTIONS = DATA / "labelled" / "interactions.extxyz"


@pytest.mark.parametrize("path", ["interactions", "crystal_contacts"])
def test_every_shipped_interaction_is_an_exact_difference_of_labels(path):
    """Each complex's molecules are labelled at the same geometry, with the same method."""
    from deltaml.dataset import interaction_groups, read_labelled

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the units check needs more compositions
        frames = read_labelled(DATA / "labelled" / f"{path}.extxyz", max_check_structures=12)
    shipped = read_labelled(LABELLED, max_check_structures=1)[0].info["method_record"]
    record = frames[0].info["method_record"]
    assert {k: v for k, v in record.items() if k != "engine_version"} == {
        k: v for k, v in shipped.items() if k != "engine_version"
    }  # the same reference as water_chno: the two files train one model
    groups = dict(interaction_groups(frames))
    complexes = [k for k, a in enumerate(frames) if a.info["role"] == "complex"]
    assert sorted(groups) == complexes  # every complex, and nothing else
    for index, parts in groups.items():
        atoms = frames[index]
        # A crystal's contacts share molecules: a monomer of another contact of the
        # same crystal at the same geometry (up to a translation) serves as well.
        key = "system" if path == "interactions" else "crystal"
        assert {frames[m].info[key] for m in parts} == {atoms.info[key]}
        assert len(parts) == len(atoms.info["fragment_names"].split(","))
        fragments = atoms.arrays["fragment"]
        for k, m in enumerate(parts):
            assert key == "crystal" or frames[m].info["fragment"] == k
            assert (frames[m].numbers == atoms.numbers[fragments == k]).all()
    systems = {a.info["system"] for a in frames}
    assert all(any(frames[k].info["system"] == s for k in complexes) for s in systems)


def test_the_interaction_dataset_is_as_documented():
    frames = read(INTERACTIONS, index=":")
    assert INTERACTIONS.stat().st_size < 8e6
    assert all(set(a.get_chemical_symbols()) <= set("CHNO") for a in frames)
    systems = {a.info["system"] for a in frames}
    readme = (DATA / "README.md").read_text()
    assert "labelled/interactions.extxyz" in readme
    assert f"{len(systems)} complete systems" in readme  # the README states the count
    minima = [a for a in frames if a.info["role"] == "complex" and a.info["scan_factor"] == 1.0]
    assert len(minima) == len(systems)


CONTACTS = DATA / "labelled" / "crystal_contacts.extxyz"


def test_the_crystal_contacts_are_as_documented():
    frames = read(CONTACTS, index=":")
    assert CONTACTS.stat().st_size < 2e6
    systems = {a.info["system"] for a in frames}
    crystals = {a.info["crystal"] for a in frames}
    readme = (DATA / "README.md").read_text()
    assert f"{len(systems)} contact systems of {len(crystals)} crystals" in readme
    points = [a for a in frames if a.info["role"] == "complex" and a.info["scan_factor"] == 1.0]
    assert len(points) == len(systems)
    assert all(a.info["sampling"] == "crystal contact" for a in points)


def test_crystal_contacts_are_the_distinct_pairs_within_the_cutoff():
    """CO2 phase I: twelve T-shaped neighbours at 3.11 Å (closest atoms) are one contact."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "make_crystal_contacts", DATA / "make_crystal_contacts.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    found = module.contacts(module.crystal("co2_pa3"), keep=50)
    assert [round(d, 2) for d, _, _ in found] == [3.11, 4.69]
    for distance, dimer, n_first in found:
        gaps = np.linalg.norm(
            dimer.positions[:n_first, None] - dimer.positions[None, n_first:], axis=2
        )
        assert gaps.min() == pytest.approx(distance) and distance < module.CUTOFF


ATOMS = DATA / "labelled" / "isolated_atoms.extxyz"


def test_the_isolated_atoms_are_ground_states_consistent_with_the_other_labels():
    from deltaml.dataset import delta_targets, read_labelled
    from deltaml.offsets import fit_offsets, split_isolated_atoms
    from deltaml.structures import composition_counts

    atoms = read_labelled(ATOMS)
    ground = {"H": 2, "C": 3, "N": 4, "O": 3}
    assert {a.get_chemical_formula(): a.info["multiplicity"] for a in atoms} == ground
    shipped = read_labelled(LABELLED, max_check_structures=1)
    assert atoms[0].info["method_record"] == shipped[0].info["method_record"]
    targets, _ = delta_targets(shipped + atoms)
    anchors, rest = split_isolated_atoms(targets)
    species = sorted(anchors)
    counts = composition_counts(rest, species)
    energies = np.array([a.get_potential_energy() for a in rest])
    loose = fit_offsets(counts, energies, species)
    # The data-determined offsets lie within the documented prior width of the anchors.
    assert np.all(np.abs(loose.mean - [anchors[z] for z in species]) < 5.0)


def test_the_label_keys_of_the_shipped_labels_are_reproduced():
    """The structure hash must stay stable: stores resume by these keys."""
    from deltaml.dataset import read_labelled
    from deltaml.store import label_key

    for path in (LABELLED, INTERACTIONS, ATOMS):
        for atoms in read_labelled(path, check_magnitudes=False)[::7]:
            info = atoms.info
            key = label_key(atoms, info["method_record"], info["charge"], info["multiplicity"])
            assert key == info["label_key"], (path.name, info.get("name"))


PERIODIC = DATA / "labelled" / "crystals.extxyz"


@pytest.mark.skipif(not PERIODIC.is_file(), reason="no periodic labels exported yet")
def test_the_periodic_labels_are_cp2k_labels_of_the_shipped_structures():
    """Every exported CP2K label is of a start, a seed copy or a gas molecule (or a
    selected candidate), with the method record the script asks for, cells with their
    stress and molecules without; its key resumes a new store; data/README counts it."""
    from deltaml.dataset import read_labelled
    from deltaml.store import label_key

    frames = read_labelled(PERIODIC, check_magnitudes=False)
    starts = {a.info["system"]: a for a in read(DATA / "structures" / "crystal_starts.extxyz", ":")}
    molecules = read(DATA / "structures" / "crystal_molecules.extxyz", ":")
    for atoms in frames:
        info = atoms.info
        record = info["method_record"]
        assert (record["code"], record["xc"], record["basis"], record["cutoff_ry"]) == (
            "cp2k",
            "revpbe",
            "DZVP-MOLOPT-SR-GTH",
            600.0,
        )
        key = label_key(atoms, record, info["charge"], info["multiplicity"])
        assert key == info["label_key"]
        if info["system"].startswith("gas:"):
            assert not atoms.pbc.any() and "stress" not in atoms.calc.results
            assert any(
                len(m) == len(atoms) and np.allclose(m.positions, atoms.positions)
                for m in molecules
            )
        else:
            assert atoms.pbc.all() and atoms.calc.results["stress"].shape in ((6,), (3, 3))
            start = starts[info["system"]]
            assert np.array_equal(atoms.numbers, start.numbers)
            if info["source"] == "start":
                np.testing.assert_array_equal(atoms.positions, start.positions)
                np.testing.assert_array_equal(atoms.cell[:], start.cell[:])
    readme = (DATA / "README.md").read_text()
    assert f"{len(frames)} periodic-reference labels" in readme


def test_a_system_added_to_the_crystal_script_is_appended_and_keeps_earlier_keys(
    tmp_path, monkeypatch
):
    """The stored starts are never rebuilt (their label keys depend on them); a system
    new to the script goes at the end, a molecule of a new formula too."""
    import importlib.util

    from ase.build import molecule

    spec = importlib.util.spec_from_file_location(
        "make_crystal_dataset", DATA / "make_crystal_dataset.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def cell(name: str, formula: str, shift: float) -> Atoms:
        atoms = molecule(formula, cell=[8.0, 8.0, 8.0], pbc=True)
        atoms.positions += 4.0 + shift
        atoms.info = {"system": name}
        return atoms

    names = ["a", "b"]
    built: list[set] = []

    def starting_cells(seed=0, skip=frozenset()):
        built.append(set(skip))
        formulas = {"a": "H2O", "b": "CO2", "c": "CH4"}
        # A rebuild would move every atom: what is stored must not be rebuilt.
        return [cell(n, formulas[n], 0.1 * len(built)) for n in names if n not in skip]

    monkeypatch.setattr(module, "STARTS", tmp_path / "starts.extxyz")
    monkeypatch.setattr(module, "MOLECULES", tmp_path / "molecules.extxyz")
    monkeypatch.setattr(module, "system_names", lambda: list(names))
    monkeypatch.setattr(module, "starting_cells", starting_cells)
    first, molecules = module.stored_structures(0)
    assert [a.info["system"] for a in first] == ["a", "b"]
    assert sorted(m.info["system"] for m in molecules) == ["gas:CO2"] * 2 + ["gas:H2O"] * 2
    names.append("c")
    again, more = module.stored_structures(0)
    assert [a.info["system"] for a in again] == ["a", "b", "c"]
    for old, new in zip(first, again, strict=False):
        np.testing.assert_allclose(old.positions, new.positions, atol=1e-6)
    assert [m.info["system"] for m in more[: len(molecules)]] == [
        m.info["system"] for m in molecules
    ]
    assert [m.info["system"] for m in more[len(molecules) :]] == ["gas:CH4"] * 2
    assert built == [set(), {"a", "b"}]
    module.stored_structures(0)  # nothing new: nothing built
    assert len(built) == 2
