"""Tests of deltaml.dispersion: the D3 term against simple-dftd3's own ASE calculator,
finite differences, invariances, records and error paths.

Independent routes used here:

* ``dftd3.ase.DFTD3(method=..., damping=...)`` loads the damping parameters compiled
  into the s-dftd3 library (``load_*_damping(method, atm=False)``: in dftd3 1.7 this
  route is two-body only, s9 = 0), whereas :class:`D3Dispersion` reads the TOML table
  through ``dftd3.parameters``; the ASE wrapper also does its own unit conversion and
  Voigt ordering.
* ``dftd3.interface.RationalDampingParam(method=..., atm=True)`` with a bare
  ``DispersionModel`` for the three-body (ATM) variant.
* Central finite differences (``ase.calculators.fd``) and closed forms (C6/R^6 tail).
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable

import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.fd import calculate_numerical_forces, calculate_numerical_stress
from ase.stress import full_3x3_to_voigt_6_stress, voigt_6_to_full_3x3_stress
from ase.units import Bohr, Hartree
from dftd3.ase import DFTD3
from dftd3.interface import DispersionModel, RationalDampingParam
from dftd3.parameters import get_all_damping_params, get_damping_param

from deltaml.dispersion import D3Dispersion, damping_parameters, parse_dispersion_spec
from deltaml.errors import OverlappingAtomsError, ParameterError, UnsupportedElementError

#: deltaml damping name → key of simple-dftd3's parameter table.
TABLE_KEY = {"d3bj": "bj", "d3zero": "zero", "d3bjm": "bjm", "d3zerom": "zerom", "d3op": "op"}
DAMPINGS = list(TABLE_KEY)
#: Functionals with parameters for all five damping functions in simple-dftd3's table.
FUNCTIONALS = ["pbe0", "b3lyp"]

#: Default two-body real-space cut-off of simple-dftd3: 60 Bohr.
DISP2_CUTOFF = 60.0 * Bohr  # 31.75 Å


def table_parameters(method: str, damping: str, s9: float) -> dict[str, float]:
    """Damping parameters from simple-dftd3's TOML table, with the ATM scaling s9."""
    values = dict(get_damping_param(method, defaults=[TABLE_KEY[damping]]))
    values["s9"] = s9
    return values


def evaluate(atoms: Atoms, calc, stress: bool = False) -> dict[str, np.ndarray | float]:
    """Energy, forces (and stress) of a copy of ``atoms`` with ``calc``."""
    work = atoms.copy()
    work.calc = calc
    out = {"energy": work.get_potential_energy(), "forces": work.get_forces()}
    if stress:
        out["stress"] = work.get_stress()
    return out


@pytest.fixture
def make_separated_pair() -> Callable[[float], tuple[Atoms, Atoms]]:
    """Ethanol and a copy shifted along z by ``distance`` Å: (monomer, pair)."""

    def build(distance: float) -> tuple[Atoms, Atoms]:
        monomer = molecule("CH3CH2OH")
        monomer.center()
        other = monomer.copy()
        other.translate([0.0, 0.0, distance])
        return monomer, monomer + other

    return build


# -- against simple-dftd3's ASE calculator ----------------------------------------


@pytest.mark.parametrize("method", FUNCTIONALS)
@pytest.mark.parametrize("damping", DAMPINGS)
def test_two_body_matches_dftd3_library_table(ethanol, damping, method):
    ours = evaluate(ethanol, D3Dispersion(method=method, damping=damping, atm=False))
    ref = evaluate(ethanol, DFTD3(method=method, damping=damping))
    # Same library kernel, different parameter source: agreement to round-off.
    assert ours["energy"] < 0.0
    assert ours["energy"] == pytest.approx(ref["energy"], rel=1e-12, abs=1e-14)
    np.testing.assert_allclose(ours["forces"], ref["forces"], rtol=0, atol=1e-12)


@pytest.mark.parametrize("damping", DAMPINGS)
def test_two_body_matches_dftd3_params_tweaks_s9_zero(water, damping):
    ours = evaluate(water, D3Dispersion(method="pbe0", damping=damping))  # atm=False default
    tweaks = table_parameters("pbe0", damping, s9=0.0)
    ref = evaluate(water, DFTD3(damping=damping, params_tweaks=tweaks))
    assert ours["energy"] == pytest.approx(ref["energy"], rel=1e-12, abs=1e-14)
    np.testing.assert_allclose(ours["forces"], ref["forces"], rtol=0, atol=1e-12)


@pytest.mark.parametrize("damping", DAMPINGS)
def test_atm_matches_dftd3_params_tweaks_s9_one(ethanol, damping):
    ours = evaluate(ethanol, D3Dispersion(method="b3lyp", damping=damping, atm=True))
    tweaks = table_parameters("b3lyp", damping, s9=1.0)
    ref = evaluate(ethanol, DFTD3(damping=damping, params_tweaks=tweaks))
    assert ours["energy"] == pytest.approx(ref["energy"], rel=1e-12, abs=1e-14)
    np.testing.assert_allclose(ours["forces"], ref["forces"], rtol=0, atol=1e-12)


def test_atm_matches_library_table_with_atm(ethanol):
    ours = evaluate(ethanol, D3Dispersion(method="pbe0", damping="d3bj", atm=True))
    model = DispersionModel(
        ethanol.numbers, ethanol.positions / Bohr, ethanol.cell.array / Bohr, ethanol.pbc
    )
    res = model.get_dispersion(RationalDampingParam(method="pbe0", atm=True), grad=True)
    assert ours["energy"] == pytest.approx(res["energy"] * Hartree, rel=1e-12)
    np.testing.assert_allclose(
        ours["forces"], -res["gradient"] * Hartree / Bohr, rtol=0, atol=1e-12
    )
    # The three-body term is switched on for real: it changes the energy.
    two_body = evaluate(ethanol, D3Dispersion(method="pbe0", damping="d3bj", atm=False))
    assert abs(ours["energy"] - two_body["energy"]) > 1e-6


def test_periodic_matches_dftd3(co2_crystal_strained):
    ours = evaluate(co2_crystal_strained, D3Dispersion(), stress=True)
    ref = evaluate(co2_crystal_strained, DFTD3(method="pbe0", damping="d3bj"), stress=True)
    assert ours["energy"] == pytest.approx(ref["energy"], rel=1e-12)
    np.testing.assert_allclose(ours["forces"], ref["forces"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(ours["stress"], ref["stress"], rtol=0, atol=1e-13)
    assert (np.abs(ours["stress"]) > 0).all()


def test_periodic_atm_and_realspace_cutoff_match_dftd3(co2_crystal_strained):
    # A short three-body cut-off (10 Å instead of 40 Bohr) keeps the ATM sum cheap and
    # checks that realspace_cutoff (Å) reaches the engine like DFTD3's.
    cutoff = {"disp2": 20.0, "disp3": 10.0}
    ours = evaluate(
        co2_crystal_strained, D3Dispersion(atm=True, realspace_cutoff=cutoff), stress=True
    )
    tweaks = table_parameters("pbe0", "d3bj", s9=1.0)
    ref = evaluate(
        co2_crystal_strained,
        DFTD3(damping="d3bj", params_tweaks=tweaks, realspace_cutoff=cutoff),
        stress=True,
    )
    assert ours["energy"] == pytest.approx(ref["energy"], rel=1e-12)
    np.testing.assert_allclose(ours["forces"], ref["forces"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(ours["stress"], ref["stress"], rtol=0, atol=1e-13)
    # ... and the cut-off is really applied: the default 31.75 Å two-body sum differs.
    default = evaluate(co2_crystal_strained, D3Dispersion(), stress=False)
    short = evaluate(co2_crystal_strained, D3Dispersion(realspace_cutoff={"disp2": 20.0}))
    assert abs(short["energy"] - default["energy"]) > 1e-5


def test_params_tweaks_override_single_values(water):
    tweaks = {"a1": 0.5, "s8": 1.0}
    calc = D3Dispersion(method="pbe0", params_tweaks=tweaks)
    expected = {**table_parameters("pbe0", "d3bj", s9=0.0), **tweaks}
    assert calc.parameters_by_value() == expected
    ours = evaluate(water, calc)
    ref = evaluate(water, DFTD3(damping="d3bj", params_tweaks=expected))
    assert ours["energy"] == pytest.approx(ref["energy"], rel=1e-12)
    plain = evaluate(water, D3Dispersion(method="pbe0"))
    assert ours["energy"] != pytest.approx(plain["energy"], rel=1e-6)


def test_params_tweaks_without_functional(water):
    full = table_parameters("pbe0", "d3bj", s9=0.0)
    ours = evaluate(water, D3Dispersion(method=None, params_tweaks=full))
    ref = evaluate(water, D3Dispersion(method="pbe0"))
    assert ours["energy"] == pytest.approx(ref["energy"], rel=1e-14)


# -- finite differences -----------------------------------------------------------


@pytest.mark.parametrize("damping", ["d3bj", "d3zero"])
def test_molecule_forces_match_finite_differences(ethanol, damping):
    ethanol.calc = D3Dispersion(damping=damping, atm=True)
    forces = ethanol.get_forces()
    # Central differences, step 1e-4 Å: truncation error ~eps² · E''' ≈ 1e-10 eV/Å
    # (measured 1.4e-10); tolerance 1e-8 eV/Å against forces of ~4e-3 eV/Å.
    numerical = calculate_numerical_forces(ethanol, eps=1e-4)
    assert np.abs(forces).max() > 1e-3
    np.testing.assert_allclose(forces, numerical, rtol=0, atol=1e-8)


# The periodic real-space sum is truncated at a sphere (31.75 Å by default). A finite
# difference sees pairs crossing that sphere, the analytic derivative does not: under
# strain this boundary term is ~4e-6 eV/Å³ at the default cut-off (~1e-3 of the stress)
# and falls as Rc^-3. With a 90 Å cut-off it is ~1.6e-7 eV/Å³, so the derivatives are
# compared there; a displaced atom moving a pair across 90 Å changes a force by < 1e-6
# eV/Å.
_LONG_CUTOFF = {"disp2": 90.0}


def test_crystal_forces_match_finite_differences(co2_crystal_strained):
    atoms = co2_crystal_strained
    atoms.calc = D3Dispersion(realspace_cutoff=_LONG_CUTOFF)
    forces = atoms.get_forces()
    # Step 1e-5 Å (round-off ~1e-15 eV / 1e-5 Å ≈ 1e-10 eV/Å); a C and three O atoms
    # keep the test fast. Tolerance 1e-6 eV/Å against forces up to ~4e-3 eV/Å.
    iatoms = [0, 4, 5, 11]
    numerical = calculate_numerical_forces(atoms, eps=1e-5, iatoms=iatoms)
    assert np.abs(forces[iatoms]).max() > 1e-3
    np.testing.assert_allclose(forces[iatoms], numerical, rtol=0, atol=1e-6)


def test_crystal_stress_matches_finite_differences(co2_crystal_strained):
    atoms = co2_crystal_strained
    atoms.calc = D3Dispersion(realspace_cutoff=_LONG_CUTOFF)
    stress = atoms.get_stress()
    # Strain step 1e-5; tolerance 3e-7 eV/Å³ (boundary term above) against a diagonal
    # stress of ~4.5e-3 eV/Å³.
    numerical = calculate_numerical_stress(atoms, eps=1e-5)
    assert np.abs(stress[:3]).min() > 1e-3
    np.testing.assert_allclose(stress, numerical, rtol=0, atol=3e-7)


# -- invariances ------------------------------------------------------------------


def test_rotation_invariance_molecule(ethanol, rotation):
    ref = evaluate(ethanol, D3Dispersion(atm=True))
    rotated = ethanol.copy()
    rotated.positions = ethanol.positions @ rotation.T
    out = evaluate(rotated, D3Dispersion(atm=True))
    assert out["energy"] == pytest.approx(ref["energy"], rel=1e-12)
    np.testing.assert_allclose(out["forces"], ref["forces"] @ rotation.T, rtol=0, atol=1e-12)


def test_rotation_invariance_crystal(co2_crystal_strained, rotation):
    ref = evaluate(co2_crystal_strained, D3Dispersion(), stress=True)
    rotated = co2_crystal_strained.copy()
    rotated.set_cell(co2_crystal_strained.cell.array @ rotation.T, scale_atoms=True)
    out = evaluate(rotated, D3Dispersion(), stress=True)
    assert out["energy"] == pytest.approx(ref["energy"], rel=1e-12)
    np.testing.assert_allclose(out["forces"], ref["forces"] @ rotation.T, rtol=0, atol=1e-12)
    # Stress is a rank-2 tensor: σ' = R σ Rᵀ.
    sigma = rotation @ voigt_6_to_full_3x3_stress(ref["stress"]) @ rotation.T
    np.testing.assert_allclose(out["stress"], full_3x3_to_voigt_6_stress(sigma), rtol=0, atol=1e-13)


def test_translation_invariance(ethanol, co2_crystal_strained):
    shift = np.array([3.7, -12.1, 0.45])
    for atoms, stress in ((ethanol, False), (co2_crystal_strained, True)):
        ref = evaluate(atoms, D3Dispersion(), stress=stress)
        moved = atoms.copy()
        moved.translate(shift)
        if stress:
            moved.wrap()  # also an image change: periodic atoms may be wrapped back
        out = evaluate(moved, D3Dispersion(), stress=stress)
        assert out["energy"] == pytest.approx(ref["energy"], rel=1e-12)
        np.testing.assert_allclose(out["forces"], ref["forces"], rtol=0, atol=1e-12)
        if stress:
            np.testing.assert_allclose(out["stress"], ref["stress"], rtol=0, atol=1e-13)


def test_permutation_invariance(ethanol, co2_crystal_strained):
    rng = np.random.default_rng(11)
    for atoms, stress in ((ethanol, False), (co2_crystal_strained, True)):
        order = rng.permutation(len(atoms))
        assert (order != np.arange(len(atoms))).any()
        ref = evaluate(atoms, D3Dispersion(atm=not stress), stress=stress)
        out = evaluate(atoms[order], D3Dispersion(atm=not stress), stress=stress)
        assert out["energy"] == pytest.approx(ref["energy"], rel=1e-12)
        np.testing.assert_allclose(out["forces"], ref["forces"][order], rtol=0, atol=1e-12)
        if stress:
            np.testing.assert_allclose(out["stress"], ref["stress"], rtol=0, atol=1e-13)


def test_supercell_doubles_energy(co2_crystal_strained):
    ref = evaluate(co2_crystal_strained, D3Dispersion(), stress=True)
    out = evaluate(co2_crystal_strained.repeat((2, 1, 1)), D3Dispersion(), stress=True)
    # Spherical cut-offs: every atom sees the same neighbours in the supercell.
    assert out["energy"] == pytest.approx(2 * ref["energy"], rel=1e-12)
    np.testing.assert_allclose(out["forces"], np.tile(ref["forces"], (2, 1)), atol=1e-12)
    np.testing.assert_allclose(out["stress"], ref["stress"], rtol=0, atol=1e-13)


def test_separated_molecules_are_additive(make_separated_pair):
    # At 40 Å centre to centre the closest intermolecular pair is 38.2 Å apart, beyond
    # the 60 Bohr = 31.75 Å two-body cut-off (and the 40 Bohr three-body and CN ones), so
    # the energy is exactly additive. At 30 Å it is not: see the next test.
    monomer, pair = make_separated_pair(40.0)
    gap = np.linalg.norm(
        monomer.positions[:, None] - pair.positions[len(monomer) :][None], axis=-1
    ).min()
    assert gap > DISP2_CUTOFF
    one = evaluate(monomer, D3Dispersion(atm=True))
    two = evaluate(pair, D3Dispersion(atm=True))
    assert two["energy"] == pytest.approx(2 * one["energy"], rel=1e-14, abs=1e-14)
    np.testing.assert_allclose(two["forces"], np.tile(one["forces"], (2, 1)), atol=1e-14)


def test_interaction_tail_is_c6_over_r6(make_separated_pair):
    # Between neutral molecules far apart, D3 reduces to -Σ C6/r⁶: the interaction times
    # R⁶ is constant. Deviations: the C8/r⁸ term and the finite size of ethanol (a few %
    # at 15 Å) and, at 30 Å, the few pairs beyond the 31.75 Å cut-off. At 30 Å the
    # residual is ~-4e-7 eV, the tail expected from 20 Å: not zero, hence 40 Å above.
    monomer, _ = make_separated_pair(10.0)
    e_mono = evaluate(monomer, D3Dispersion())["energy"]
    scaled = {}
    for distance in (15.0, 20.0, 25.0, 30.0):
        interaction = evaluate(make_separated_pair(distance)[1], D3Dispersion())["energy"]
        interaction -= 2 * e_mono
        assert interaction < 0.0
        scaled[distance] = interaction * distance**6
    for distance, value in scaled.items():
        assert value == pytest.approx(scaled[20.0], rel=0.05), distance


# -- records ----------------------------------------------------------------------


@pytest.mark.parametrize("atm", [False, True])
@pytest.mark.parametrize("damping", DAMPINGS)
def test_record_holds_parameters_by_value(damping, atm):
    calc = D3Dispersion(method="PBE0", damping=damping, atm=atm)
    record = calc.record()
    assert record["damping"] == damping
    assert record["method"] == "pbe0"
    assert record["atm"] is atm
    assert record["model"] == "D3"
    assert record["term"] == "dispersion"
    assert record["engine"] == "dftd3"
    table = table_parameters("pbe0", damping, s9=1.0 if atm else 0.0)
    assert record["parameters"] == table
    assert json.loads(json.dumps(record)) == record


def test_record_with_aliases_and_tweaks():
    calc = D3Dispersion(method="b3lyp", damping="d3mbj", params_tweaks={"a2": 5.0})
    record = calc.record()
    assert record["damping"] == "d3bjm"
    assert record["parameters"]["a2"] == 5.0
    assert record["parameters"]["a1"] == get_damping_param("b3lyp", defaults=["bjm"])["a1"]


def test_damping_parameters_function_matches_table():
    for damping in DAMPINGS:
        assert damping_parameters("b3lyp", damping, atm=True) == table_parameters(
            "b3lyp", damping, s9=1.0
        )


def test_record_follows_set():
    calc = D3Dispersion(method="pbe0")
    a1_pbe0 = calc.record()["parameters"]["a1"]
    calc.set(method="pbe")
    assert calc.record()["method"] == "pbe"
    assert calc.record()["parameters"]["a1"] == get_damping_param("pbe", defaults=["bj"])["a1"]
    assert calc.record()["parameters"]["a1"] != a1_pbe0


# -- docstring table --------------------------------------------------------------


def test_docstring_table_matches_default_parameters():
    lines = D3Dispersion.__doc__.splitlines()
    borders = [i for i, line in enumerate(lines) if re.fullmatch(r"\s*=+( +=+)+\s*", line)]
    rows = lines[borders[1] + 1 : borders[2]]
    table = {}
    for row in rows:
        keyword, default = row.split()[:2]
        table[keyword] = json.loads(default.replace("None", "null").replace("False", "false"))
    assert table == D3Dispersion.default_parameters


# -- parse_dispersion_spec --------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("d3bj:pbe0", {"damping": "d3bj", "method": "pbe0", "atm": False}),
        ("D3Zero:B3LYP:atm", {"damping": "d3zero", "method": "b3lyp", "atm": True}),
        (" d3op : pbe0 ", {"damping": "d3op", "method": "pbe0", "atm": False}),
        ("bj:pbe", {"damping": "d3bj", "method": "pbe", "atm": False}),
        ("d3mbj:pbe0", {"damping": "d3bjm", "method": "pbe0", "atm": False}),
        ("d3mzero:pbe0:atm", {"damping": "d3zerom", "method": "pbe0", "atm": True}),
    ],
)
def test_parse_dispersion_spec_good(spec, expected):
    assert parse_dispersion_spec(spec) == expected


@pytest.mark.parametrize(
    "spec", ["d3bj", "d3bj:", ":pbe0", "d3bj:pbe0:abc", "d3bj:pbe0:atm:x", "", "d3bj::atm"]
)
def test_parse_dispersion_spec_bad_form(spec):
    with pytest.raises(
        ParameterError,
        match=rf"dispersion {re.escape(repr(spec))} is not of the form DAMPING:FUNCTIONAL\[:atm\]"
        r", e\.g\. 'd3bj:pbe0'",
    ):
        parse_dispersion_spec(spec)


def test_parse_dispersion_spec_unknown_damping():
    with pytest.raises(
        ParameterError,
        match=r"unknown D3 damping 'd4'; choose one of "
        r"\['d3bj', 'd3bjm', 'd3op', 'd3zero', 'd3zerom'\]",
    ):
        parse_dispersion_spec("d4:pbe0")


def test_from_spec_equals_keywords(water):
    calc = D3Dispersion.from_spec("d3zero:b3lyp:atm")
    assert calc.record() == D3Dispersion(damping="d3zero", method="b3lyp", atm=True).record()
    ref = evaluate(
        water, DFTD3(damping="d3zero", params_tweaks=table_parameters("b3lyp", "d3zero", s9=1.0))
    )
    assert evaluate(water, calc)["energy"] == pytest.approx(ref["energy"], rel=1e-12)


# -- error paths ------------------------------------------------------------------


def test_unknown_damping_raises():
    with pytest.raises(
        ParameterError,
        match=r"unknown D3 damping 'd3xyz'; choose one of \['d3bj', 'd3bjm', 'd3op', "
        r"'d3zero', 'd3zerom'\]",
    ):
        D3Dispersion(damping="d3xyz")


def test_unknown_functional_lists_alternatives():
    with pytest.raises(
        ParameterError,
        match=r"no d3bj parameters for functional 'nosuchfunctional' in simple-dftd3 "
        r"[\d.]+; functionals with d3bj parameters: .*\bb3lyp\b.*\bpbe0\b",
    ):
        D3Dispersion(method="nosuchfunctional")


def test_functional_without_parameters_for_that_damping():
    with_op = sorted(get_all_damping_params(defaults=["op"]))
    assert "b2plyp" not in with_op  # has d3bj parameters, but none for d3op
    with pytest.raises(
        ParameterError,
        match=rf"no d3op parameters for functional 'b2plyp' .*; functionals with d3op "
        rf"parameters: {', '.join(with_op)}$",
    ):
        D3Dispersion(method="b2plyp", damping="d3op")


def test_unknown_tweak_key_raises():
    with pytest.raises(
        ParameterError,
        match=r"unknown d3bj damping parameter 'rs6'; accepted: "
        r"\['a1', 'a2', 'alp', 's6', 's8', 's9'\]",
    ):
        D3Dispersion(params_tweaks={"rs6": 1.2})


def test_missing_parameters_without_functional():
    with pytest.raises(
        ParameterError,
        match=r"d3bj damping needs \['a2', 's8'\]: give a functional name or params_tweaks",
    ):
        D3Dispersion(method=None, params_tweaks={"a1": 0.4})


@pytest.mark.parametrize(
    ("cutoff", "message"),
    [
        pytest.param({"disp4": 20.0}, r"'disp4'", id="unknown-key"),
        pytest.param({"width3": -1.0}, r"width3 = -1\.0 Å", id="negative-width"),
        pytest.param({"disp2": -1.0}, r"disp2.*-1\.0", id="negative"),
    ],
)
def test_bad_realspace_cutoff_raises(cutoff, message):
    with pytest.raises(ParameterError, match=message):
        D3Dispersion(realspace_cutoff=cutoff)


def test_set_checks_parameters_at_once():
    calc = D3Dispersion()
    with pytest.raises(ParameterError, match="no d3bj parameters for functional 'pbe7'"):
        calc.set(method="pbe7")
    with pytest.raises(ParameterError, match="unknown D3 damping 'd5'"):
        calc.set(damping="d5")


_STRESS_3D_ONLY = "stress is only defined for cells periodic in all three directions"


def test_stress_of_a_molecule_is_refused(water):
    water.calc = D3Dispersion()
    with pytest.raises(PropertyNotImplementedError, match=_STRESS_3D_ONLY):
        water.get_stress()
    assert water.get_potential_energy() < 0.0  # energy is still available


# Partially periodic structures: water with a 6 Å period in one or two directions and
# 40 Å along the others. In a 40 Å vacuum every image across the non-periodic directions
# is farther than the 31.75 Å two-body and 21.2 Å CN/three-body cut-offs, so the fully
# periodic cell is an independent route to the same energy.
_PARTIAL = [
    pytest.param([True, True, False], [6.0, 6.0, 40.0], id="slab"),
    pytest.param([True, False, False], [6.0, 40.0, 40.0], id="wire"),
]


def _partially_periodic(water: Atoms, pbc: list[bool], cell: list[float]) -> Atoms:
    atoms = water.copy()
    atoms.cell = cell
    atoms.pbc = pbc
    atoms.center()
    return atoms


@pytest.mark.parametrize(("pbc", "cell"), _PARTIAL)
def test_partially_periodic_matches_3d_cell_with_wide_vacuum(water, pbc, cell):
    atoms = _partially_periodic(water, pbc, cell)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no division by a missing volume
        out = evaluate(atoms, D3Dispersion())
    bulk = atoms.copy()
    bulk.pbc = True
    ref = evaluate(bulk, D3Dispersion())
    assert out["energy"] == pytest.approx(ref["energy"], rel=1e-12)
    np.testing.assert_allclose(out["forces"], ref["forces"], rtol=0, atol=1e-12)
    # The 6 Å images interact: more binding than the isolated molecule.
    assert out["energy"] < evaluate(water, D3Dispersion())["energy"] - 1e-4


@pytest.mark.parametrize(("pbc", "cell"), _PARTIAL)
def test_stress_of_a_partially_periodic_cell_is_refused(water, pbc, cell):
    atoms = _partially_periodic(water, pbc, cell)
    atoms.calc = D3Dispersion()
    atoms.get_forces()
    assert "stress" not in atoms.calc.results  # not computed, not zero
    with pytest.raises(PropertyNotImplementedError, match=_STRESS_3D_ONLY):
        atoms.get_stress()


@pytest.mark.parametrize(("pbc", "cell"), _PARTIAL)
def test_partially_periodic_translation_along_vacuum(water, pbc, cell):
    atoms = _partially_periodic(water, pbc, cell)
    ref = evaluate(atoms, D3Dispersion())
    moved = atoms.copy()
    # Half a cell down along every non-periodic direction: atoms now sit outside the cell
    # there, which is legal (nothing is periodic along it).
    moved.translate(-0.5 * np.where(pbc, 0.0, np.diag(moved.cell.array)))
    out = evaluate(moved, D3Dispersion())
    assert out["energy"] == pytest.approx(ref["energy"], rel=1e-12)
    np.testing.assert_allclose(out["forces"], ref["forces"], rtol=0, atol=1e-12)


@pytest.mark.parametrize(("pbc", "cell"), _PARTIAL)
def test_partially_periodic_with_zero_vacuum_vector(water, pbc, cell):
    atoms = _partially_periodic(water, pbc, cell)
    ref = evaluate(atoms, D3Dispersion())
    flat = atoms.copy()
    flat.cell = np.where(pbc, cell, 0.0) * np.eye(3)
    out = evaluate(flat, D3Dispersion())
    assert out["energy"] == pytest.approx(ref["energy"], rel=1e-12)
    np.testing.assert_allclose(out["forces"], ref["forces"], rtol=0, atol=1e-12)


def test_unsupported_element_names_d3_range():
    atoms = Atoms("AmH", positions=[[0, 0, 0], [2.0, 0, 0]])
    atoms.calc = D3Dispersion()
    with pytest.raises(
        UnsupportedElementError,
        match=r"Am \(Z=95\) not supported by DFT-D3, which covers Z=1\.\.94 \(H\.\.Pu\)",
    ):
        atoms.get_potential_energy()


def test_min_distance_parameter_is_used():
    atoms = Atoms("H2", positions=[[0, 0, 0], [0.74, 0, 0]])
    atoms.calc = D3Dispersion(min_distance=0.8)
    with pytest.raises(OverlappingAtomsError, match=r"0\.740 Å apart \(minimum 0\.8 Å\)"):
        atoms.get_potential_energy()


# -- engine reuse -----------------------------------------------------------------


def test_engine_reused_when_only_positions_change(ethanol):
    calc = D3Dispersion(atm=True)
    ethanol.calc = calc
    ethanol.get_potential_energy()
    engine = calc._model
    assert engine is not None
    ethanol.positions[0] += [0.05, -0.02, 0.01]
    energy = ethanol.get_potential_energy()
    assert calc._model is engine
    # the updated engine gives the numbers of a fresh one
    fresh = evaluate(ethanol, D3Dispersion(atm=True))
    assert energy == pytest.approx(fresh["energy"], rel=1e-13)
    np.testing.assert_allclose(ethanol.get_forces(), fresh["forces"], rtol=0, atol=1e-14)


def test_engine_reused_when_cell_changes(co2_crystal_strained):
    calc = D3Dispersion()
    atoms = co2_crystal_strained
    atoms.calc = calc
    atoms.get_stress()
    engine = calc._model
    atoms.set_cell(atoms.cell.array * 1.02, scale_atoms=True)
    stress = atoms.get_stress()
    assert calc._model is engine
    fresh = evaluate(atoms, D3Dispersion(), stress=True)
    assert atoms.get_potential_energy() == pytest.approx(fresh["energy"], rel=1e-13)
    np.testing.assert_allclose(stress, fresh["stress"], rtol=0, atol=1e-14)


def test_engine_rebuilt_when_atoms_change(ethanol):
    calc = D3Dispersion()
    ethanol.calc = calc
    ethanol.get_potential_energy()
    engine = calc._model
    smaller = ethanol[:-1]
    smaller.calc = calc
    energy = smaller.get_potential_energy()
    assert calc._model is not engine
    assert energy == pytest.approx(evaluate(smaller, D3Dispersion())["energy"], rel=1e-13)
    # same count, another element: rebuilt too
    engine = calc._model
    other = smaller.copy()
    other.numbers[0] = 7
    other.calc = calc
    assert other.get_potential_energy() == pytest.approx(
        evaluate(other, D3Dispersion())["energy"], rel=1e-13
    )
    assert calc._model is not engine


def test_set_resets_results(water):
    calc = D3Dispersion(damping="d3bj")
    water.calc = calc
    e_bj = water.get_potential_energy()
    calc.set(damping="d3zero")
    e_zero = water.get_potential_energy()
    assert e_zero != pytest.approx(e_bj, rel=1e-6)
    assert e_zero == pytest.approx(evaluate(water, D3Dispersion(damping="d3zero"))["energy"])


def test_model_is_not_reused_after_a_failed_call(water):
    """After a call refused by validation, ASE holds the new atoms but the old model
    must not be updated with them: the next result equals a fresh calculator's."""
    calc = D3Dispersion()
    water.calc = calc
    water.get_potential_energy()
    other = Atoms("SH2", positions=water.positions)
    other.positions[1] = other.positions[0] + [0.1, 0.0, 0.0]  # overlapping: refused
    other.calc = calc
    with pytest.raises(OverlappingAtomsError):
        other.get_potential_energy()
    other.positions[1] = [1.3, 0.0, 0.3]
    fresh = other.copy()
    fresh.calc = D3Dispersion()
    assert other.get_potential_energy() == pytest.approx(fresh.get_potential_energy(), abs=1e-12)


def test_refused_set_changes_nothing():
    calc = D3Dispersion()
    with pytest.raises(ParameterError, match="pbe7"):
        calc.set(method="pbe7")
    assert calc.parameters.method == "pbe0"


def test_record_holds_effective_cutoffs():
    record = D3Dispersion(realspace_cutoff={"disp2": 40.0}).record()
    assert record["realspace_cutoff_a"]["disp2"] == 40.0
    assert record["realspace_cutoff_a"]["cn"] == pytest.approx(40.0 * 0.52917721, rel=1e-6)


def test_table_values_reproduce_the_library_for_every_functional():
    """By-value parameters (from simple-dftd3's table) give the library's own
    by-name energy for every functional and damping it knows, with and without
    ATM — except d3zero:opbe, where table and library disagree and deltaml warns."""
    import dftd3.interface
    from dftd3.parameters import get_all_damping_params

    from deltaml.dispersion import DAMPING_FUNCTIONS, ParameterTableWarning, _compare_with_library

    probe = molecule("CH3OH") + molecule("H2O")
    probe.positions[6:] += [3.0, 0.0, 0.0]
    model = dftd3.interface.DispersionModel(probe.numbers, probe.positions / Bohr)
    compared, mismatched = 0, []
    _compare_with_library.cache_clear()
    for damping, (class_name, key) in DAMPING_FUNCTIONS.items():
        cls = getattr(dftd3.interface, class_name)
        for name in get_all_damping_params(defaults=[key]):
            for atm in (False, True):
                try:
                    by_name = cls(method=name, atm=atm)
                except RuntimeError:
                    continue  # only in the table, not in the library
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    try:
                        values = damping_parameters(name, damping, atm)
                    except ParameterError:
                        mismatched.append(f"{damping}:{name}")  # incomplete table entry
                        continue
                named = model.get_dispersion(by_name, grad=False)["energy"]
                ours = model.get_dispersion(cls(**values), grad=False)["energy"]
                compared += 1
                if abs(named - ours) > 1e-12:
                    mismatched.append(f"{damping}:{name}")
                    assert any(w.category is ParameterTableWarning for w in caught)
                else:
                    assert not caught
    assert compared > 400
    assert sorted(set(mismatched)) == ["d3zero:cf22d", "d3zero:opbe"]
