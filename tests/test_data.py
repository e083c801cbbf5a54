"""Tests of the shipped structures in data/: readable, valid, and as documented."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ase.io import read
from ase.neighborlist import neighbor_list

from deltaml.structures import validate_structure

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.mark.parametrize("name", ["molecules/benzene.xyz", "crystals/co2_pa3.extxyz"])
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
