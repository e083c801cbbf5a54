"""Polymorph ranking: lattice energies, invariances, uncertainty, resume, flags, CLI."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from ase import Atoms
from ase.build import make_supercell, molecule
from ase.calculators.calculator import Calculator, all_changes
from click.testing import CliRunner

from deltaml.calculator import DeltaCalculator
from deltaml.cli import main
from deltaml.crystals import identify_molecules
from deltaml.errors import ParameterError
from deltaml.model import SparseGPR
from deltaml.ranking import KJ_PER_MOL, BondingChangedWarning, rank_polymorphs

#: Toy energies: each molecule costs E_GAS; a crystal gains SLOPE × density (eV per molecule).
E_GAS, SLOPE = -5.0, -0.3


class ToyCrystalEnergy(Calculator):
    """E = n_mol (E_GAS + SLOPE ρ) with ρ the number density (molecules/Å³, 0 without a cell).

    The lattice energy per molecule is therefore SLOPE × ρ exactly: a synthetic
    set whose ranking is known in advance.
    """

    implemented_properties = ["energy", "forces", "stress"]
    default_parameters = {"model": "a"}  # stands in for the model a composite carries
    calls = 0

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        type(self).calls += 1
        n_mol = len(identify_molecules(self.atoms).formulas)
        rho = n_mol / self.atoms.get_volume() if self.atoms.pbc.all() else 0.0
        self.results = {
            "energy": n_mol * (E_GAS + SLOPE * rho),
            "forces": np.zeros((len(self.atoms), 3)),
            "stress": np.zeros(6),
        }


def _water_crystal(edge: float, count: int = 2) -> Atoms:
    """``count`` water molecules spread along the diagonal of a cubic cell of ``edge`` Å."""
    cell = Atoms(cell=[edge] * 3, pbc=True)
    for k in range(count):
        w = molecule("H2O")
        w.translate(np.full(3, (k + 0.25) * edge / count))
        cell += w
    return cell


@pytest.fixture
def synthetic() -> dict[str, Atoms]:
    return {
        "dense": _water_crystal(6.0),
        "medium": _water_crystal(7.0, 3),
        "loose": _water_crystal(8.0),
    }


def test_synthetic_ranking_is_reproduced(synthetic):
    ranking = rank_polymorphs(
        synthetic, [molecule("H2O")], {"toy": ToyCrystalEnergy}, relax_structures=False
    )
    expected = {n: SLOPE * len(a) / 3 / a.get_volume() / KJ_PER_MOL for n, a in synthetic.items()}
    energies = ranking.lattice_energies("toy")
    for name in synthetic:
        assert energies[name] == pytest.approx(expected[name], rel=1e-12)
    table = ranking.table()
    assert list(table.index) == sorted(expected, key=expected.get)
    assert table["rank_toy"].tolist() == [1, 2, 3]
    assert table.loc["medium", "Z"] == 3
    best = min(expected, key=expected.get)
    assert table.loc["loose", "rel_toy"] == pytest.approx(expected["loose"] - expected[best])
    assert "sigma_rel_toy" not in table  # no model, no error bars
    assert np.isnan(ranking.relative_uncertainty("dense", "loose", "toy"))


def test_comparison_with_a_reference_names_the_wrong_pairs(synthetic, tmp_path):
    ranking = rank_polymorphs(
        synthetic, [molecule("H2O")], {"toy": ToyCrystalEnergy}, relax_structures=False
    )
    exact = ranking.lattice_energies("toy")
    same = ranking.compare({n: e + 3.0 for n, e in exact.items()}, "toy")
    assert same["mae_relative_kj_mol"] == pytest.approx(0.0, abs=1e-9)
    assert same["spearman"] == pytest.approx(1.0)
    assert same["wrong_pairs"] == []
    swapped = dict(exact)
    swapped["dense"], swapped["loose"] = exact["loose"], exact["dense"]
    path = tmp_path / "ref.csv"
    path.write_text("candidate,energy_kj_mol\n" + "".join(f"{n},{e}\n" for n, e in swapped.items()))
    result = ranking.compare(path, "toy")
    pairs = {(p["lower"], p["higher"]) for p in result["wrong_pairs"]}
    assert ("loose", "dense") in pairs
    assert result["spearman"] < 0
    assert result["mae_relative_kj_mol"] > 0.1
    bad = tmp_path / "bad.csv"
    bad.write_text("name,energy\nloose,1\n")
    with pytest.raises(ParameterError, match="energy_kj_mol"):
        ranking.compare(bad, "toy")


class CollapsingCell(ToyCrystalEnergy):
    """The toy energy, but the "loose" crystal's cell collapses (a singular cell)."""

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        from deltaml.errors import SingularCellError

        if atoms is not None and atoms.pbc.all() and atoms.get_volume() > 8.0**3 - 1:
            raise SingularCellError("the cell of the structure is singular: it collapsed")
        super().calculate(atoms, properties, system_changes)


def test_a_failed_candidate_is_recorded_and_the_rest_ranked(synthetic, tmp_path):
    ranking = rank_polymorphs(
        synthetic, [molecule("H2O")], {"toy": CollapsingCell}, relax_structures=False,
        workdir=tmp_path,
    )  # fmt: skip
    assert ranking.failed == {"toy": {"loose": "SingularCellError: the cell of the structure "
                                      "is singular: it collapsed"}}  # fmt: skip
    assert set(ranking.lattice_energies("toy")) == {"dense", "medium"}
    table = ranking.table()
    assert list(table.index) == ["dense", "medium", "loose"]  # the failed one last
    assert table["rank_toy"].iloc[:2].tolist() == [1, 2] and np.isnan(
        table.loc["loose", "rank_toy"]
    )
    assert "SingularCellError" in table.loc["loose", "failed_toy"]
    assert table.loc["dense", "failed_toy"] == ""
    assert not (tmp_path / "toy" / "loose.extxyz").exists()  # a rerun tries it again
    ranking.to_csv(tmp_path / "table.csv")
    ranking.plot(tmp_path / "ladder.png")
    assert "SingularCellError" in (tmp_path / "table.csv").read_text()


def test_a_failed_gas_molecule_is_an_error(synthetic):
    from deltaml.errors import OverlappingAtomsError

    class NoGas(ToyCrystalEnergy):
        def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
            if not atoms.pbc.any():
                raise OverlappingAtomsError("atoms 0 and 1 are 0.1 Å apart")
            super().calculate(atoms, properties, system_changes)

    with pytest.raises(OverlappingAtomsError, match=r"toy / gas 0 H2O: atoms 0 and 1"):
        rank_polymorphs(synthetic, [molecule("H2O")], {"toy": NoGas}, relax_structures=False)


def test_candidates_with_other_molecules_are_refused(synthetic, co2_crystal):
    with pytest.raises(ParameterError, match="co2"):
        rank_polymorphs(
            {**synthetic, "co2": co2_crystal}, [molecule("H2O")], {"toy": ToyCrystalEnergy},
            relax_structures=False,
        )  # fmt: skip
    with pytest.raises(ParameterError, match="one molecule per structure"):
        rank_polymorphs(synthetic, [synthetic["dense"]], {"toy": ToyCrystalEnergy})


def test_finished_relaxations_are_read_back_not_repeated(synthetic, tmp_path):
    kwargs = {"relax_structures": False, "workdir": tmp_path}
    first = rank_polymorphs(synthetic, [molecule("H2O")], {"toy": ToyCrystalEnergy}, **kwargs)
    ToyCrystalEnergy.calls = 0
    again = rank_polymorphs(synthetic, [molecule("H2O")], {"toy": ToyCrystalEnergy}, **kwargs)
    assert ToyCrystalEnergy.calls == 0
    assert again.lattice_energies("toy") == pytest.approx(first.lattice_energies("toy"))
    # Another geometry under the same name is computed afresh.
    changed = dict(synthetic, loose=_water_crystal(8.5))
    rank_polymorphs(changed, [molecule("H2O")], {"toy": ToyCrystalEnergy}, **kwargs)
    assert ToyCrystalEnergy.calls == 1


def test_another_model_in_the_same_workdir_is_computed_afresh(synthetic, tmp_path):
    kwargs = {"relax_structures": False, "workdir": tmp_path}
    first = rank_polymorphs(synthetic, [molecule("H2O")], {"toy": ToyCrystalEnergy}, **kwargs)
    ToyCrystalEnergy.calls = 0
    other = {"toy": lambda: ToyCrystalEnergy(model="b")}
    again = rank_polymorphs(synthetic, [molecule("H2O")], other, **kwargs)
    assert ToyCrystalEnergy.calls == len(synthetic) + 1  # every crystal and the gas molecule
    assert first.records["toy"] != again.records["toy"]
    assert again.records["toy"]["model"] == "b"


def test_a_damaged_saved_relaxation_is_recomputed_and_names_never_collide(synthetic, tmp_path):
    kwargs = {"relax_structures": False, "workdir": tmp_path}
    crystals = {"x/y": synthetic["dense"], "x_y": synthetic["loose"]}
    first = rank_polymorphs(crystals, [molecule("H2O")], {"toy": ToyCrystalEnergy}, **kwargs)
    saved = sorted((tmp_path / "toy").glob("x*.extxyz"))
    assert len(saved) == 2  # two names, two files
    saved[0].write_text(saved[0].read_text()[:40])  # truncated, as by a kill mid-write
    ToyCrystalEnergy.calls = 0
    again = rank_polymorphs(crystals, [molecule("H2O")], {"toy": ToyCrystalEnergy}, **kwargs)
    assert ToyCrystalEnergy.calls == 1
    assert again.lattice_energies("toy") == pytest.approx(first.lattice_energies("toy"))


class ToyWithFreeEnergy(ToyCrystalEnergy):
    """The toy with ``free_energy``, which ASE's filters ask of PreconLBFGS's calculator."""

    implemented_properties = [*ToyCrystalEnergy.implemented_properties, "free_energy"]

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self.results["free_energy"] = self.results["energy"]


def test_crystals_take_the_preconditioned_optimizer_and_gas_molecules_bfgs(synthetic):
    ranking = rank_polymorphs(
        synthetic, [molecule("H2O")], {"toy": ToyWithFreeEnergy}, optimizer="PreconLBFGS"
    )
    results = ranking.results["toy"]
    assert {results[n].summary["optimizer"] for n in synthetic} == {"PreconLBFGS"}
    assert results[ranking.gas[0]].summary["optimizer"] == "BFGS"
    assert all(r.summary["converged"] for r in results.values())


class PullHydrogen(Calculator):
    """Constant force pulling atom 1 (an H) along +x: a relaxation tears it off."""

    implemented_properties = ["energy", "forces", "stress"]

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        forces = np.zeros((len(self.atoms), 3))
        forces[1, 0] = 1.0
        self.results = {
            "energy": -float(self.atoms.positions[1, 0]),
            "forces": forces,
            "stress": np.zeros(6),
        }


def test_a_relaxation_that_breaks_a_bond_is_flagged():
    crystal = {"pulled": _water_crystal(8.0)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ranking = rank_polymorphs(
            crystal, [molecule("H2O")], {"pull": PullHydrogen}, steps=20, optimizer="FIRE"
        )
    assert any(issubclass(w.category, BondingChangedWarning) for w in caught)
    table = ranking.table()
    assert bool(table.loc["pulled", "bonding_changed_pull"])
    assert ranking.results["pull"]["pulled"].summary["bonds_broken"][0] == [0, 1]


@pytest.fixture(scope="module")
def co2_model(stand_in_labels) -> SparseGPR:
    """A small sparse GP on GFN1 labels of small molecules (CO2 among them)."""
    frames = stand_in_labels(24, seed=5)
    return SparseGPR(
        descriptor={"cutoff": 4.0, "n_max": 4, "l_max": 3}, n_sparse=40, uncertainty="energy"
    ).fit(frames)


def _composite(model: SparseGPR):
    return lambda: DeltaCalculator(correction=model, method="GFN1-xTB", dispersion="d3bj:pbe0")


def test_lattice_energy_is_invariant_to_supercell_and_atom_order(co2_crystal, co2_model):
    permuted = co2_crystal[np.random.default_rng(3).permutation(len(co2_crystal))]
    doubled = make_supercell(co2_crystal, np.diag([2, 1, 1]))
    ranking = rank_polymorphs(
        {"cell": co2_crystal, "permuted": permuted, "doubled": doubled},
        [molecule("CO2")], {"composite": _composite(co2_model)}, relax_structures=False,
    )  # fmt: skip
    energies = ranking.lattice_energies("composite")
    assert ranking.z == {"cell": 4, "permuted": 4, "doubled": 8}
    assert energies["permuted"] == pytest.approx(energies["cell"], abs=1e-6)
    assert energies["doubled"] == pytest.approx(energies["cell"], abs=1e-6)
    # The same crystal in two cells: the model's error cancels exactly in the difference.
    sigma_same = ranking.relative_uncertainty("doubled", "cell", "composite")
    sigma_latt = np.sqrt(ranking.covariance("composite")[0, 0])
    assert sigma_same < 1e-6 * sigma_latt
    assert sigma_latt > 0


def test_error_bars_follow_the_model_uncertainty(co2_crystal, co2_model):
    strained = co2_crystal.copy()
    strained.set_cell(co2_crystal.cell.array * 1.08, scale_atoms=False)  # molecules farther apart
    candidates = {"tight": co2_crystal, "expanded": strained}
    sigma = {}
    for factor in (1.0, 0.5):
        model = SparseGPR(**co2_model.get_params())
        model.__dict__.update({k: v for k, v in co2_model.__dict__.items() if k.endswith("_")})
        model.uncertainty_scale_ = {"energy": factor, "forces": factor}
        ranking = rank_polymorphs(
            candidates, [molecule("CO2")], {"composite": _composite(model)},
            relax_structures=False,
        )  # fmt: skip
        sigma[factor] = ranking.relative_uncertainty("tight", "expanded", "composite")
        cov = ranking.covariance("composite")
        assert sigma[factor] == pytest.approx(np.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]))
        table = ranking.table()
        best = table.index[0]
        other = table.index[1]
        assert table.loc[best, "sigma_rel_composite"] == 0.0
        assert table.loc[other, "sigma_rel_composite"] == pytest.approx(sigma[factor])
    assert sigma[1.0] > 0
    assert sigma[0.5] == pytest.approx(0.5 * sigma[1.0], rel=1e-9)


@pytest.mark.slow
def test_cli_ranks_resumes_and_writes_the_table(tmp_path, co2_crystal):
    from ase.io import write

    write(tmp_path / "pa3.extxyz", co2_crystal)
    expanded = co2_crystal.copy()
    expanded.set_cell(co2_crystal.cell.array * 1.05, scale_atoms=True)
    write(tmp_path / "expanded.extxyz", expanded)
    args = [
        "rank", str(tmp_path / "pa3.extxyz"), str(tmp_path / "expanded.extxyz"),
        "--molecule", "CO2", "--no-relax", "--workdir", str(tmp_path / "work"),
        "-o", str(tmp_path / "ranking.csv"), "--plot", str(tmp_path / "ladder.png"),
        "--summary", str(tmp_path / "summary.json"),
    ]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    import pandas as pd

    table = pd.read_csv(tmp_path / "ranking.csv", index_col="candidate")
    assert set(table.index) == {"pa3", "expanded"}
    assert {"rel_composite", "rel_GFN2-xTB", "Z", "density_composite"} <= set(table.columns)
    assert {"a_initial", "a_composite", "gamma_GFN2-xTB"} <= set(table.columns)
    # No relaxation: the cell after is the cell before.
    assert table.loc["pa3", "a_composite"] == pytest.approx(table.loc["pa3", "a_initial"])
    assert (table["Z"] == 4).all()
    assert (tmp_path / "ladder.png").stat().st_size > 1000
    assert json.loads((tmp_path / "summary.json").read_text())["table"].endswith("ranking.csv")
    files = sorted(p.name for p in (tmp_path / "work").rglob("*.extxyz"))
    assert len(files) == 6  # 2 crystals + 1 gas molecule, 2 methods
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "work").rglob("*.extxyz")}
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp  # read back, not rewritten
    bad = CliRunner().invoke(main, ["rank", "nothing.cif", "--molecule", "CO2"])
    assert bad.exit_code != 0
    assert "neither ice:NAME nor a file" in bad.output


def test_candidates_from_cif_multi_frame_extxyz_and_ice_names(tmp_path, co2_crystal):
    from ase.io import write

    from deltaml.ranking import read_candidates

    write(tmp_path / "form1.cif", co2_crystal)
    frames = [co2_crystal, co2_crystal.copy()]
    frames[1].info["name"] = "named"
    write(tmp_path / "many.extxyz", frames)
    found = read_candidates([tmp_path / "form1.cif", tmp_path / "many.extxyz", "ice:Ic"])
    assert list(found) == ["form1", "many-0", "named", "ice Ic"]
    np.testing.assert_allclose(found["form1"].cell.array, co2_crystal.cell.array, atol=1e-6)
    assert identify_molecules(found["form1"]).count == {"CO2": 4}
    assert found["ice Ic"].info["ice_phase"] == "Ic"
    with pytest.raises(ParameterError, match="named 'form1'"):
        read_candidates([tmp_path / "form1.cif", tmp_path / "form1.cif"])
    write(tmp_path / "gas.xyz", molecule("CO2"))
    with pytest.raises(ParameterError, match="not periodic"):
        read_candidates([tmp_path / "gas.xyz"])
