"""Tests of the ``deltaml`` console script (deltaml.cli) through click's CliRunner.

The printed numbers are checked against a :class:`DeltaCalculator` evaluated in the
test itself, so the CLI is only trusted to parse and print.
"""

from __future__ import annotations

import json
import re
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.io import read, write
from click.testing import CliRunner, Result
from conftest import requires_xtb

from deltaml.calculator import DeltaCalculator
from deltaml.cli import main
from deltaml.correction import ZeroCorrection

#: Printed with 6 decimals: half a unit of the last digit plus SCF round-off.
PRINT_TOL = 6e-7


def run_cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def write_structure(atoms: Atoms, folder: Path, name: str = "structure.extxyz") -> Path:
    path = folder / name
    write(path, atoms, format="extxyz")
    return path


def reference(path: Path, **kwargs) -> dict:
    """Energy, max force and per-term energies from a DeltaCalculator, eV and eV/Å."""
    atoms = read(path)
    atoms.calc = DeltaCalculator(correction=ZeroCorrection(), **kwargs)
    forces = atoms.get_forces()
    results = atoms.calc.results
    return {
        "energy": atoms.get_potential_energy(),
        "max_force": float(np.linalg.norm(forces, axis=1).max()),
        "terms": {t: results[f"energy_{t}"] for t in ("baseline", "correction", "dispersion")},
    }


def parse_text(output: str) -> dict:
    """The numbers of the text report."""
    energy = re.search(r"^energy\s+(-?\d+\.\d{6}) eV$", output, re.MULTILINE)
    max_force = re.search(r"^max force\s+(\d+\.\d{6}) eV/Å$", output, re.MULTILINE)
    terms = dict(re.findall(r"^  (\w+)\s+(-?\d+\.\d{6})$", output, re.MULTILINE))
    assert energy and max_force, output
    return {
        "energy": float(energy.group(1)),
        "max_force": float(max_force.group(1)),
        "terms": {name: float(value) for name, value in terms.items()},
    }


def test_version_is_the_package_version():
    result = run_cli("--version")
    assert result.exit_code == 0
    assert result.output.strip() == f"deltaml, version {version('deltaml')}"


def test_single_point_text_matches_calculator(ethanol, tmp_path):
    path = write_structure(ethanol, tmp_path)
    result = run_cli("single-point", str(path), "--method", "gfn2", "--dispersion", "d3bj:pbe0")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"({len(ethanol)} atoms)" in out
    assert re.search(r"^baseline\s+GFN2-xTB via tblite \(own dispersion removed\)$", out, re.M)
    assert re.search(r"^dispersion\s+d3bj:pbe0$", out, re.MULTILINE)
    assert "note" not in out  # a molecule is never evaluated on a supercell

    printed = parse_text(out)
    ref = reference(path, method="gfn2", dispersion="d3bj:pbe0")
    assert printed["energy"] == pytest.approx(ref["energy"], abs=PRINT_TOL)
    assert printed["max_force"] == pytest.approx(ref["max_force"], abs=PRINT_TOL)
    assert set(printed["terms"]) == {"baseline", "correction", "dispersion"}
    for term, value in ref["terms"].items():
        assert printed["terms"][term] == pytest.approx(value, abs=PRINT_TOL), term
    assert printed["terms"]["dispersion"] < 0.0
    assert printed["terms"]["correction"] == 0.0


def test_single_point_json(water, tmp_path):
    path = write_structure(water, tmp_path)
    result = run_cli("single-point", str(path), "--dispersion", "d3zero:b3lyp:atm", "--json")
    assert result.exit_code == 0, result.output
    budget = json.loads(result.stdout)
    assert sum(budget["terms"].values()) == pytest.approx(budget["energy"], rel=1e-12)
    ref = reference(path, dispersion="d3zero:b3lyp:atm")
    assert budget["energy"] == pytest.approx(ref["energy"], rel=1e-10)
    assert budget["max_force"] == pytest.approx(ref["max_force"], rel=1e-8)
    for term, value in ref["terms"].items():
        assert budget["terms"][term] == pytest.approx(value, rel=1e-10, abs=1e-12)
    assert budget["n_atoms"] == 3
    assert budget["supercell_repeats"] is None
    assert budget["energy_uncertainty"] is None  # ZeroCorrection has none, not zero
    disp = budget["records"]["dispersion"]
    assert (disp["damping"], disp["method"], disp["atm"]) == ("d3zero", "b3lyp", True)
    assert disp["parameters"]["s9"] == 1.0
    assert budget["records"]["baseline"]["method"] == "GFN2-xTB"


def test_dispersion_none_gives_zero_dispersion(water, tmp_path):
    path = write_structure(water, tmp_path)
    result = run_cli("single-point", str(path), "--dispersion", "none")
    assert result.exit_code == 0, result.output
    assert re.search(r"^dispersion\s+none$", result.stdout, re.MULTILINE)
    printed = parse_text(result.stdout)
    assert printed["terms"]["dispersion"] == 0.0
    assert printed["energy"] == pytest.approx(printed["terms"]["baseline"], abs=1e-6)
    ref = reference(path, dispersion=None)
    assert printed["energy"] == pytest.approx(ref["energy"], abs=PRINT_TOL)

    as_json = json.loads(
        run_cli("single-point", str(path), "--dispersion", "None", "--json").stdout
    )
    assert as_json["terms"]["dispersion"] == 0.0
    assert as_json["records"]["dispersion"] is None


@pytest.mark.slow
def test_periodic_file_reports_supercell(co2_crystal, tmp_path):
    path = write_structure(co2_crystal, tmp_path, "co2.extxyz")
    assert read(path).pbc.all()
    result = run_cli("single-point", str(path))
    assert result.exit_code == 0, result.output
    # 5.68 Å cell, 7 Å minimum width: ceil(7 / 5.68) = 2 along each axis.
    assert re.search(
        r"^note\s+narrow cell evaluated on a 2x2x2 supercell \(per-cell values\)$",
        result.stdout,
        re.MULTILINE,
    )
    assert "(12 atoms)" in result.stdout
    printed = parse_text(result.stdout)
    assert sum(printed["terms"].values()) == pytest.approx(printed["energy"], abs=2e-6)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--dispersion", "d3bj"],
            r"Error: dispersion 'd3bj' is not of the form DAMPING:FUNCTIONAL\[:atm\]",
        ),
        (["--dispersion", "d9:pbe0"], r"Error: unknown D3 damping 'd9'; choose one of \["),
        (
            ["--dispersion", "d3bj:nosuchfunctional"],
            r"Error: no d3bj parameters for functional 'nosuchfunctional' .*pbe0",
        ),
        (["--method", "gfn3"], r"Error: unknown baseline method 'gfn3'; choose GFN2-xTB or GFN1"),
        (["--engine", "orca"], r"Error: unknown engine 'orca'; choose one of \('tblite', 'xtb'\)"),
        (
            ["--charge", "1", "--multiplicity", "1"],
            r"Error: multiplicity 1 is impossible with charge 1: 9 electrons \(odd\)",
        ),
    ],
)
def test_bad_options_fail_with_the_specific_message(water, tmp_path, args, message):
    path = write_structure(water, tmp_path)
    result = run_cli("single-point", str(path), *args)
    assert result.exit_code == 1
    assert re.search(message, result.stderr), result.stderr
    assert "Traceback" not in result.output
    assert result.stdout == ""


@requires_xtb
def test_xtb_engine_refuses_periodic_gfn2_before_computing(co2_crystal, tmp_path):
    path = write_structure(co2_crystal, tmp_path)
    result = run_cli("single-point", str(path), "--engine", "xtb", "--method", "gfn2")
    assert result.exit_code == 1
    assert re.search(
        r"Error: xtb engine: GFN2-xTB is not available under periodic boundary", result.stderr
    )


def test_missing_file_is_a_usage_error(tmp_path):
    result = run_cli("single-point", str(tmp_path / "absent.xyz"))
    assert result.exit_code == 2
    assert "does not exist" in result.stderr


def test_unreadable_file_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.xyz"
    path.write_text("3\nwater\nO 0 0\n")
    result = run_cli("single-point", str(path))
    assert result.exit_code == 1
    assert re.search(r"Error: cannot read .*broken\.xyz", result.stderr)
    assert "Traceback" not in result.output


def test_baseline_dispersion_runs_the_full_method(water, tmp_path):
    """--baseline-dispersion --dispersion none: plain GFN2-xTB with its own D4."""
    path = write_structure(water, tmp_path)
    result = run_cli("single-point", str(path), "--baseline-dispersion", "--dispersion", "none")
    assert result.exit_code == 0, result.output
    expected = reference(path, baseline_dispersion=True, dispersion=None)
    assert parse_text(result.stdout)["energy"] == pytest.approx(expected["energy"], abs=PRINT_TOL)
    assert "own dispersion kept" in result.stdout
    doubled = run_cli("single-point", str(path), "--baseline-dispersion")
    assert doubled.exit_code == 1
    assert "counted twice" in doubled.stderr


def test_fit_and_evaluate_from_the_command_line(stand_in_labels, tmp_path):
    from deltaml.dataset import write_labelled
    from deltaml.model import SparseGPR

    write_labelled(tmp_path / "train.extxyz", stand_in_labels(30, seed=0))
    write_labelled(tmp_path / "test.extxyz", stand_in_labels(8, seed=1))
    model = tmp_path / "model.npz"
    result = CliRunner().invoke(
        main,
        ["fit", "--data", str(tmp_path / "train.extxyz"), "-o", str(model),
         "--n-sparse", "30", "--cutoff", "4.0", "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "fitted on 27 structures" in result.output  # 10 % held out
    assert "validation (3 structures)" in result.output
    assert SparseGPR.load(model).n_train_ == 27
    out = tmp_path / "plots"
    result = CliRunner().invoke(
        main,
        ["evaluate", str(model), str(tmp_path / "test.extxyz"), "--plots", str(out), "--json"],
    )
    assert result.exit_code == 0, result.output
    table = json.loads(result.output)
    assert table["composite"]["force_mae"] < table["baseline"]["force_mae"]
    assert (out / "parity.png").exists() and (out / "calibration.png").exists()


def test_fit_takes_several_files_and_the_decomposition(stand_in_labels, tmp_path):
    from deltaml.dataset import write_labelled
    from deltaml.model import SparseGPR

    frames = stand_in_labels(12, seed=2)
    write_labelled(tmp_path / "a.extxyz", frames[:6])
    write_labelled(tmp_path / "b.extxyz", frames[6:])
    model = tmp_path / "model.npz"
    result = CliRunner().invoke(
        main,
        ["fit", "--data", str(tmp_path / "a.extxyz"), "--data", str(tmp_path / "b.extxyz"),
         "-o", str(model), "--decomposition", "atomic", "--validation", "0",
         "--n-sparse", "10", "--cutoff", "3.5", "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    fitted = SparseGPR.load(model)
    assert fitted.n_train_ == 12 and fitted.decomposition == "atomic"
    result = CliRunner().invoke(
        main, ["fit", "--data", str(tmp_path / "a.extxyz"), "-o", str(model),
               "--decomposition", "quantum"],
    )  # fmt: skip
    assert result.exit_code == 2 and "quantum" in result.output


def test_fit_needs_exactly_one_source(tmp_path):
    result = CliRunner().invoke(main, ["fit", "-o", str(tmp_path / "m.npz")])
    assert result.exit_code == 2 and "exactly one of --store and --data" in result.output


def test_relax_and_md_commands_write_trajectories_and_summaries(tmp_path):
    from ase.build import molecule

    write(tmp_path / "water.xyz", molecule("H2O"))
    summary = tmp_path / "relax.json"
    result = run_cli(
        "relax", str(tmp_path / "water.xyz"), "-o", str(tmp_path / "relax.extxyz"),
        "--summary", str(summary),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(summary.read_text())["converged"] is True
    assert read(tmp_path / "relax.extxyz", ":")[-1].calc.results["energy"] < 0
    result = run_cli(
        "md", str(tmp_path / "water.xyz"), "--steps", "20", "--interval", "5", "--nve",
        "-o", str(tmp_path / "md.extxyz"), "--summary", str(tmp_path / "md.json"),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(read(tmp_path / "md.extxyz", ":")) == 5  # steps 0, 5, 10, 15, 20
    assert "energy drift" in result.output


def test_stability_command_with_a_model(stand_in_labels, tmp_path):
    from ase.build import molecule

    from deltaml.dataset import delta_targets
    from deltaml.model import SparseGPR

    targets, terms = delta_targets(stand_in_labels(20, seed=0))
    descriptor = {"cutoff": 4.0, "n_max": 4, "l_max": 3}
    model = SparseGPR(descriptor=descriptor, n_sparse=30).fit(targets, trained_with=terms)
    model.save(tmp_path / "model.npz")
    write(tmp_path / "start.xyz", molecule("CH3OH"))
    result = run_cli(
        "stability", str(tmp_path / "start.xyz"), "--model", str(tmp_path / "model.npz"),
        "--steps", "40", "--no-reference", "--summary", str(tmp_path / "s.json"),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "stable\n" in result.output and "UNSTABLE" not in result.output
    assert json.loads((tmp_path / "s.json").read_text())["stable"] is True
