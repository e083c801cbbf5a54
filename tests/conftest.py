"""Shared structure builders for the test suite.

Each builder returns a fresh ``ase.Atoms``; random perturbations use their own
``numpy.random.default_rng(seed)`` so that nothing random happens at import time.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule

#: Tests of the xtb engine need xtb-python, which has wheels for CPython <= 3.11 only.
requires_xtb = pytest.mark.skipif(
    importlib.util.find_spec("xtb") is None, reason="xtb-python is not installed"
)

# Cubic CO2 crystal (Pa-3, Z=4), the structure of tblite's ASE example.
_CO2_POSITIONS = np.array(
    [
        [0.9441259872, 0.9437851680, 0.9543505632],
        [3.7179966528, 0.9556570368, 3.7316862240],
        [3.7159517376, 3.7149292800, 0.9692330016],
        [0.9529872864, 3.7220864832, 3.7296981120],
        [1.6213905408, 1.6190616096, 1.6313879040],
        [0.2656685664, 0.2694175776, 0.2776540416],
        [4.3914553920, 1.6346256864, 3.0545920000],
        [3.0440834880, 0.2764611744, 4.4080419264],
        [4.3910577696, 3.0416409504, 0.2881058304],
        [3.0399936576, 4.3879335936, 1.6497353376],
        [0.2741322432, 4.4003734944, 3.0573754368],
        [1.6312174944, 3.0434586528, 4.4023048032],
    ]
)
CO2_CELL_A = 5.68032  # Å


def _rattle(atoms: Atoms, amplitude: float, seed: int) -> Atoms:
    rng = np.random.default_rng(seed)
    atoms.positions += rng.normal(scale=amplitude, size=atoms.positions.shape)
    return atoms


@pytest.fixture
def water() -> Atoms:
    """Water monomer, slightly distorted so that no force vanishes by symmetry."""
    return _rattle(molecule("H2O"), 0.02, seed=1)


@pytest.fixture
def ethanol() -> Atoms:
    """Ethanol, slightly distorted (9 atoms, C/H/O)."""
    return _rattle(molecule("CH3CH2OH"), 0.02, seed=2)


@pytest.fixture
def co2_crystal() -> Atoms:
    """Cubic CO2 crystal, 12 atoms, a = 5.68 Å (narrower than the 7 Å default width)."""
    atoms = Atoms("C4O8", positions=_CO2_POSITIONS, cell=[CO2_CELL_A] * 3, pbc=True)
    return atoms


@pytest.fixture
def co2_crystal_strained(co2_crystal: Atoms) -> Atoms:
    """CO2 crystal with a sheared, rattled cell: no stress component vanishes by symmetry."""
    atoms = co2_crystal
    strain = np.array([[0.01, 0.004, -0.003], [0.004, -0.008, 0.005], [-0.003, 0.005, 0.006]])
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + strain), scale_atoms=True)
    return _rattle(atoms, 0.02, seed=3)


@pytest.fixture
def make_dimer() -> Callable[[float, str], Atoms]:
    """Builder of a cofacial dimer of a molecule at a centre-of-mass distance (Å)."""

    def build(distance: float, name: str = "C6H6") -> Atoms:
        monomer = molecule(name)
        monomer.center()
        other = monomer.copy()
        other.translate([0.0, 0.0, distance])
        return monomer + other

    return build


@pytest.fixture
def rotation() -> np.ndarray:
    """A fixed proper rotation matrix (det = +1)."""
    rng = np.random.default_rng(7)
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q


@pytest.fixture(scope="session")
def water_box() -> Atoms:
    """Eight waters in a 6.2 Å periodic cube (24 atoms); copy it before changing it."""
    box = Atoms(cell=np.eye(3) * 6.2, pbc=True)
    rng = np.random.default_rng(3)
    for k in range(8):
        water = molecule("H2O")
        water.rotate(rng.uniform(0, 360), rng.normal(size=3))
        water.translate((np.array(np.unravel_index(k, (2, 2, 2))) + 0.5) * 3.1)
        box += water
    return box


@pytest.fixture
def water_chain() -> Atoms:
    """One water molecule in a sheared cell 2.9 Å wide along a (an H-bonded chain).

    With the default 7 Å minimum width it is evaluated on a cheap 3×1×1 supercell,
    which makes the supercell path affordable in finite-difference tests.
    """
    atoms = molecule("H2O")
    atoms.rotate(90, "y")  # molecular plane ⟂ a, dipole along a
    cell = np.array([[2.9, 0.0, 0.0], [0.3, 7.6, 0.0], [-0.2, 0.4, 7.4]])
    atoms.set_cell(cell)
    atoms.pbc = True
    atoms.center()
    return _rattle(atoms, 0.02, seed=4)


#: Method record of the stand-in reference below: GFN1-xTB energies and forces, with
#: D3(BJ)-PBE0 named as its dispersion partner (any published partner would do).
STAND_IN_RECORD = {"code": "tblite", "method": "GFN1-xTB", "dispersion_partner": "d3bj:pbe0"}


@pytest.fixture(scope="session")
def stand_in_labels() -> Callable[[int, int], list[Atoms]]:
    """Builder of reference-labelled molecules whose "reference" is GFN1-xTB (fast).

    ``build(count, seed)`` returns rattled H2O, CH3OH, CO2 and ethanol with a
    single-point calculator (energy eV, forces eV/Å) and ``info["method_record"]``.
    """
    from ase.calculators.singlepoint import SinglePointCalculator

    from deltaml.baseline import XTBBaseline

    names = ("H2O", "CH3OH", "CO2", "CH3CH2OH")

    def build(count: int, seed: int) -> list[Atoms]:
        rng = np.random.default_rng(seed)
        gfn1 = XTBBaseline(method="GFN1-xTB")
        frames = []
        for k in range(count):
            atoms = molecule(names[k % len(names)])
            atoms.positions += rng.normal(scale=0.08, size=atoms.positions.shape)
            atoms.calc = gfn1
            energy, forces = atoms.get_potential_energy(), atoms.get_forces()
            atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
            atoms.info["method_record"] = dict(STAND_IN_RECORD)
            frames.append(atoms)
        return frames

    return build


@pytest.fixture(scope="session")
def dimer_scan() -> Callable[..., list[Atoms]]:
    """Builder of a dimer's rigid scan and its two monomers at one geometry.

    ``dimer_scan(first, second, seed, factors)`` returns the complexes at
    ``factors`` × the distance of the first closest contact of 2.2 Å along a
    random direction (monomer B moved rigidly), then monomer A and monomer B as
    placed at factor 1: every interaction energy is a difference of these frames.
    """

    def build(
        first: str, second: str, seed: int, factors: tuple[float, ...] = (1.0, 1.2, 1.5)
    ) -> list[Atoms]:
        rng = np.random.default_rng(seed)
        a, b = molecule(first), molecule(second)
        for mol in (a, b):
            mol.positions += rng.normal(scale=0.04, size=mol.positions.shape)
            mol.positions -= mol.get_center_of_mass()
        b.rotate(float(rng.uniform(0, 360)), rng.normal(size=3))
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        shift = 2.0
        while True:  # closest contact 2.2 Å
            gap = np.linalg.norm(
                a.positions[:, None] - (b.positions + shift * direction)[None], axis=-1
            )
            if gap.min() >= 2.2:
                break
            shift += 0.05
        b.positions += shift * direction
        frames = []
        for factor in factors:
            moved = b.copy()
            moved.positions += (factor - 1.0) * shift * direction
            frames.append(a + moved)
        return [*frames, a, b]

    return build


@pytest.fixture(scope="session")
def gfn_delta() -> Callable[[list[Atoms]], list[Atoms]]:
    """Labeller of cheap, physical Δ targets: GFN1-xTB − GFN2-xTB energy (eV) and forces (eV/Å).

    ``label(frames)`` returns copies with a single-point calculator; models do not care
    which two methods differ.
    """
    from ase.calculators.singlepoint import SinglePointCalculator

    from deltaml.baseline import XTBBaseline

    def label(frames: list[Atoms]) -> list[Atoms]:
        gfn1, gfn2 = XTBBaseline(method="GFN1-xTB"), XTBBaseline(method="GFN2-xTB")
        out = []
        for atoms in frames:
            values: dict = {}
            for sign, calc in ((1.0, gfn1), (-1.0, gfn2)):
                probe = atoms.copy()
                probe.calc = calc
                values["energy"] = values.get("energy", 0.0) + sign * probe.get_potential_energy()
                values["forces"] = values.get("forces", 0.0) + sign * probe.get_forces()
            labelled = atoms.copy()
            labelled.calc = SinglePointCalculator(labelled, **values)
            out.append(labelled)
        return out

    return label
