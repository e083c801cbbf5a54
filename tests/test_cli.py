"""Tests of the ``deltaml`` console script (deltaml.cli) through click's CliRunner.

The printed numbers are checked against a :class:`DeltaCalculator` evaluated in the
test itself, so the CLI is only trusted to parse and print.
"""

from __future__ import annotations

import json
import re
from importlib.metadata import version
from pathlib import Path

import click
import numpy as np
import pytest
from ase import Atoms
from ase.io import read, write
from click.testing import CliRunner, Result
from conftest import requires_xtb

from deltaml.calculator import DeltaCalculator
from deltaml.cli import main
from deltaml.correction import ZeroCorrection
from deltaml.reference_cp2k import cp2k_available
from deltaml.store import LabelStore

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


def test_fit_keeps_isolated_atoms_for_the_offsets_and_names_unanchored_elements(
    stand_in_labels, tmp_path
):
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    from deltaml.baseline import XTBBaseline
    from deltaml.dataset import write_labelled
    from deltaml.model import SparseGPR

    labels = stand_in_labels(12, seed=0)
    atoms = []
    for symbol, multiplicity in (("H", 2), ("C", 3), ("O", 3)):
        atom = Atoms(symbol, positions=[[0.0, 0.0, 0.0]])
        atom.info.update(multiplicity=multiplicity, method_record=labels[0].info["method_record"])
        atom.calc = XTBBaseline(method="GFN1-xTB")  # the stand-in reference
        energy = atom.get_potential_energy()
        atom.calc = SinglePointCalculator(atom, energy=energy, forces=np.zeros((1, 3)))
        atoms.append(atom)
    write_labelled(tmp_path / "train.extxyz", labels)
    write_labelled(tmp_path / "atoms.extxyz", atoms)
    base = ["fit", "--data", str(tmp_path / "train.extxyz"), "--n-sparse", "20",
            "--cutoff", "3.5", "--no-progress", "--validation", "0.5"]  # fmt: skip
    result = CliRunner().invoke(
        main, [*base, "--data", str(tmp_path / "atoms.extxyz"), "-o", str(tmp_path / "a.npz")]
    )
    assert result.exit_code == 0, result.output
    assert "fitted on 6 structures" in result.output  # half of the 12; the atoms never held out
    assert "validation (6 structures)" in result.output and "note:" not in result.output
    model = SparseGPR.load(tmp_path / "a.npz")
    assert model.n_isolated_atoms_ == 3 and sorted(model.offset_fit_.anchored) == [1, 6, 8]
    result = CliRunner().invoke(main, [*base, "-o", str(tmp_path / "b.npz")])
    assert result.exit_code == 0, result.output
    assert "note: the offsets of H, C, O are not anchored" in result.output


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


def test_fit_takes_the_intermolecular_prior_width(stand_in_labels, tmp_path):
    from deltaml.dataset import write_labelled
    from deltaml.model import SparseGPR

    write_labelled(tmp_path / "a.extxyz", stand_in_labels(8, seed=3))
    model = tmp_path / "model.npz"
    base = ["fit", "--data", str(tmp_path / "a.extxyz"), "-o", str(model), "--validation", "0",
            "--n-sparse", "10", "--cutoff", "3.5", "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(main, [*base, "--inter-delta", "0.03"])
    assert result.exit_code == 0, result.output
    assert "intermolecular prior width δ = 0.03 eV (0.03)" in result.output
    assert SparseGPR.load(model).terms_[1].delta == pytest.approx(0.03)
    result = CliRunner().invoke(main, [*base, "--inter-delta", "rule"])
    assert result.exit_code == 0, result.output
    assert SparseGPR.load(model).inter_delta is None
    for bad in ("-1", "wide"):
        result = CliRunner().invoke(main, [*base, "--inter-delta", bad])
        assert result.exit_code == 2 and "--inter-delta must be one of" in result.output
    result = CliRunner().invoke(main, [*base, "--inter-delta", "0.03", "--inter-kernel", "local"])
    assert result.exit_code == 0, result.output
    local = SparseGPR.load(model)
    assert local.terms_[1].kernel == "local" and local.terms_[1].zeta == 2.0


def test_fit_calibrates_by_cross_validation_on_all_the_data(stand_in_labels, tmp_path):
    """--calibration-folds k: every structure fitted, σ scaled by the k held-out folds."""
    from deltaml.dataset import write_labelled
    from deltaml.model import SparseGPR

    write_labelled(tmp_path / "a.extxyz", stand_in_labels(12, seed=4))
    model = tmp_path / "model.npz"
    base = ["fit", "--data", str(tmp_path / "a.extxyz"), "-o", str(model),
            "--n-sparse", "10", "--cutoff", "3.5", "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(main, [*base, "--calibration-folds", "3"])
    assert result.exit_code == 0, result.output
    assert "fitted on 12 structures" in result.output  # nothing held out
    assert "validation (" not in result.output
    fitted = SparseGPR.load(model)
    assert fitted.n_train_ == 12
    factor = re.search(r"calibrated by 3-fold cross-validation: energy x([0-9.]+)", result.output)
    assert factor and float(factor.group(1)) == pytest.approx(
        fitted.uncertainty_scale_["energy"], abs=0.01
    )
    assert fitted.uncertainty_scale_["energy"] != pytest.approx(1.0)  # calibrated, not default
    for bad in (["--calibration-folds", "1"], ["--calibration-folds", "2", "--validation", "0.2"]):
        result = CliRunner().invoke(main, [*base, *bad])
        assert result.exit_code == 2 and "--calibration-folds" in result.output


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


# -- hardening (issue 13): one charge rule, user errors as one line, one vocabulary ----------


def assert_one_line_error(result: Result, pattern: str) -> None:
    """Exit 1 with click's one-line ``Error: ...`` (matching ``pattern``), no traceback."""
    assert result.exit_code == 1, result.output
    assert result.exc_info is None or result.exc_info[0] is SystemExit, result.exc_info
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    assert re.search(pattern, errors[0]), errors[0]


NH4 = """5
charge=1 Properties=species:S:1:pos:R:3
N 0.0 0.0 0.0
H 0.6 0.6 0.6
H -0.6 -0.6 0.6
H 0.6 -0.6 -0.6
H -0.6 0.6 -0.6
"""


def test_single_point_reads_the_charge_from_the_file(tmp_path):
    """NH4+ with charge=1 in its info is the cation, not the neutral radical."""
    path = tmp_path / "nh4.extxyz"
    path.write_text(NH4)
    result = run_cli("single-point", str(path), "--json")
    assert result.exit_code == 0, result.output
    energy = json.loads(result.stdout)["energy"]
    cation = reference(path, charge=1, multiplicity=1)["energy"]
    neutral = tmp_path / "nh4_neutral.extxyz"
    neutral.write_text(NH4.replace("charge=1 ", ""))
    radical = reference(neutral)["energy"]  # what single-point computed before
    assert energy == pytest.approx(cation, abs=1e-8)
    assert abs(cation - radical) > 1.0
    explicit = run_cli("single-point", str(path), "--json", "--charge", "1")
    assert json.loads(explicit.stdout)["energy"] == pytest.approx(cation, abs=1e-8)
    assert_one_line_error(
        run_cli("single-point", str(path), "--charge", "0"),
        r"charge 0 given, but the structure says charge=1",
    )


def test_relax_reads_the_multiplicity_from_the_file(water, tmp_path):
    water.info["multiplicity"] = 3
    path = write_structure(water, tmp_path)
    assert_one_line_error(
        run_cli("relax", str(path), "--multiplicity", "1", "--steps", "1"),
        r"multiplicity 1 given, but the structure says multiplicity=3",
    )
    summary = tmp_path / "triplet.json"
    result = run_cli(
        "relax", str(path), "--steps", "1", "--allow-unconverged", "--summary", str(summary)
    )
    assert result.exit_code == 0, result.output
    triplet = reference(path, multiplicity=3)["energy"]
    assert json.loads(summary.read_text())["energy_initial_ev"] == pytest.approx(triplet, abs=1e-8)


@pytest.mark.parametrize("command", ["single-point", "relax", "md", "stability"])
@pytest.mark.parametrize(
    ("content", "message"),
    [
        (bytes(range(256)) * 4, r"cannot read .*input\.xyz: .*codec can't decode"),
        (b"5\n\nO 0 0 0\nH 0 0 1\nH 0 1 0\n", r"cannot read .*input\.xyz: .*3 atoms, expected 5"),
        (b"", r"cannot read .*input\.xyz"),
    ],
    ids=["binary", "wrong-atom-count", "empty"],
)
def test_unreadable_input_is_one_line(tmp_path, command, content, message):
    path = tmp_path / "input.xyz"
    path.write_bytes(content)
    extra = ["--model", str(path)] if command == "stability" else []
    assert_one_line_error(run_cli(command, str(path), *extra), message)


def test_unreadable_labelled_data_is_one_line(tmp_path):
    path = tmp_path / "input.extxyz"
    path.write_bytes(bytes(range(256)) * 4)
    for args in (["fit", "--data", str(path), "-o", str(tmp_path / "m.npz")],
                 ["import", str(path), "--store", str(tmp_path / "s.db")]):  # fmt: skip
        assert_one_line_error(run_cli(*args), r"cannot read .*input\.extxyz")
    labelled = tmp_path / "labelled.extxyz"
    labelled.write_text(NH4)
    for record in ("{not json", bytes(range(256))):
        record_file = tmp_path / "record.json"
        (record_file.write_text if isinstance(record, str) else record_file.write_bytes)(record)
        result = run_cli("import", str(labelled), "--store", str(tmp_path / "s.db"),
                         "--record", str(record_file))  # fmt: skip
        assert_one_line_error(result, r"--record .*record\.json: not JSON")


@pytest.fixture(scope="module")
def small_model(stand_in_labels, tmp_path_factory) -> Path:
    """A small model file fitted on closed-shell stand-in labels."""
    from deltaml.dataset import delta_targets
    from deltaml.model import SparseGPR

    targets, terms = delta_targets(stand_in_labels(12, seed=0))
    descriptor = {"cutoff": 3.5, "n_max": 3, "l_max": 2}
    model = SparseGPR(descriptor=descriptor, n_sparse=20).fit(targets, trained_with=terms)
    return model.save(tmp_path_factory.mktemp("model") / "model.npz")


def _damaged_models(model: Path, folder: Path) -> dict[str, Path]:
    from deltaml.model_files import read_model_file, write_model_file

    paths = {}
    truncated = folder / "truncated.npz"
    truncated.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    paths["truncated"] = truncated
    meta, arrays = read_model_file(model, (3,))
    meta.pop("content_sha256")
    badjson = folder / "badjson.npz"
    np.savez(badjson, metadata=np.array("{not json"), **arrays)
    paths["bad JSON"] = badjson
    nospecies = folder / "nospecies.npz"
    write_model_file(nospecies, {k: v for k, v in meta.items() if k != "species"}, arrays)
    paths["missing keys"] = nospecies
    short = folder / "short.npz"
    write_model_file(short, meta, {**arrays, "alpha": arrays["alpha"][:-1]})
    paths["wrong shapes"] = short
    return paths


def test_damaged_model_files_are_one_line_on_every_command(small_model, water, tmp_path):
    structure = write_structure(water, tmp_path)
    labelled = tmp_path / "test.extxyz"
    labelled.write_text("")
    crystal = tmp_path / "crystal.extxyz"
    for name, path in _damaged_models(small_model, tmp_path).items():
        commands = [
            ["single-point", str(structure), "--model", str(path)],
            ["relax", str(structure), "--model", str(path)],
            ["md", str(structure), "--model", str(path)],
            ["stability", str(structure), "--model", str(path)],
            ["evaluate", str(labelled), "--model", str(path)],
            ["rank", str(crystal), "--molecule", "H2O", "--model", str(path),
             "--workdir", str(tmp_path / "w"), "-o", str(tmp_path / "r.csv")],
        ]  # fmt: skip
        for args in commands:
            result = run_cli(*args)
            assert_one_line_error(result, re.escape(str(path)))
            assert "ModelFile" not in result.stderr, (name, args)


def test_open_shell_with_a_closed_shell_model_is_warned(small_model, tmp_path):
    """The composite warns (library users get it too); the CLI prints it once, one line."""
    oh = Atoms("OH", positions=[[0, 0, 0], [0, 0, 0.97]])
    path = write_structure(oh, tmp_path)
    result = run_cli("single-point", str(path), "--model", str(small_model))
    assert result.exit_code == 0, result.output
    pattern = (
        r"^warning: HO is an open shell \(multiplicity 2\); the model was trained on "
        r"multiplicities 1: .* extrapolation$"
    )
    warned = re.findall(pattern, result.stderr, re.MULTILINE)
    assert len(warned) == 1, result.stderr
    assert "OutOfDomainWarning" not in result.stderr  # one line, not Python's format
    relaxed = run_cli("relax", str(path), "--model", str(small_model), "--steps", "3",
                      "--allow-unconverged")  # fmt: skip
    assert relaxed.exit_code == 0, relaxed.output
    assert relaxed.stderr.count("warning: HO is an open shell") == 1, relaxed.stderr
    closed = run_cli("single-point", str(path), "--model", str(small_model), "--charge", "-1")
    assert closed.exit_code == 0, closed.output
    assert "open shell" not in closed.stderr


def test_fit_checks_the_output_folder_before_fitting(stand_in_labels, tmp_path, monkeypatch):
    from deltaml import cli
    from deltaml.dataset import write_labelled

    write_labelled(tmp_path / "train.extxyz", stand_in_labels(4, seed=0))

    def never(*args, **kwargs):
        raise AssertionError("fitting started before the output path was checked")

    monkeypatch.setattr(cli, "delta_targets", never)
    result = run_cli("fit", "--data", str(tmp_path / "train.extxyz"),
                     "-o", str(tmp_path / "missing_dir" / "model.npz"))  # fmt: skip
    assert_one_line_error(result, r"-o/--output .*missing_dir/model\.npz: folder .* does not exist")


def test_fit_with_dispersion_none_for_a_reference_without_partner(stand_in_labels, tmp_path):
    from deltaml.dataset import write_labelled
    from deltaml.model import SparseGPR

    frames = stand_in_labels(10, seed=3)
    for atoms in frames:  # a reference with no D3 partner, as plain HF or PBE
        atoms.info["method_record"] = {"code": "tblite", "method": "GFN1-xTB"}
    write_labelled(tmp_path / "hf.extxyz", frames)
    model = tmp_path / "model.npz"
    base = ["fit", "--data", str(tmp_path / "hf.extxyz"), "-o", str(model), "--validation", "0",
            "--n-sparse", "10", "--cutoff", "3.5", "--no-progress"]  # fmt: skip
    assert_one_line_error(run_cli(*base), r"names no D3 partner: give --dispersion")
    assert not model.exists()
    result = run_cli(*base, "--dispersion", "none")
    assert result.exit_code == 0, result.output
    assert SparseGPR.load(model).trained_with["dispersion"] is None
    result = run_cli(*base, "--dispersion", "d3bj:pbe")
    assert result.exit_code == 0, result.output
    assert SparseGPR.load(model).trained_with["dispersion"]["method"] == "pbe"


def test_store_errors_are_one_line(tmp_path, monkeypatch):
    import sqlite3

    from deltaml.store import LabelStore

    water_file = tmp_path / "water.xyz"
    write(water_file, Atoms("H2O", positions=[[0, 0, 0], [0, 0, 0.96], [0, 0.93, -0.25]]))
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(bytes(range(256)) * 16)
    for args in (
        ["fit", "--store", str(corrupt), "-o", str(tmp_path / "m.npz")],
        ["export", str(tmp_path / "out.extxyz"), "--store", str(corrupt)],
        ["label", str(water_file), "--store", str(corrupt), "--no-progress"],
    ):
        assert_one_line_error(run_cli(*args), r"label store .*corrupt\.db: file is not a database")
    # A mistyped store on a command that only reads: no empty database is created.
    for args in (
        ["fit", "--store", str(tmp_path / "typo.db"), "-o", str(tmp_path / "m.npz")],
        ["export", str(tmp_path / "out.extxyz"), "--store", str(tmp_path / "typo.db")],
    ):
        assert_one_line_error(run_cli(*args), r"no label store at .*typo\.db \(--store\)")
        assert not (tmp_path / "typo.db").exists()

    # A read-only store (simulated: the tests may run as root, who writes anyway).
    def readonly(self, *args, **kwargs):
        raise sqlite3.OperationalError("attempt to write a readonly database")

    monkeypatch.setattr(LabelStore, "claim", readonly)
    store = tmp_path / "ro.db"
    LabelStore(store)
    assert_one_line_error(
        run_cli("label", str(water_file), "--store", str(store), "--no-progress"),
        r"label store .*ro\.db: attempt to write a readonly database",
    )


def test_unreachable_scheduler_is_one_line(water, tmp_path):
    import dask
    import distributed  # noqa: F401 -- its defaults must be in dask's config first

    # Otherwise set() creates the "distributed" section and removes it again on
    # exit, defaults and all, which breaks every later Dask client in the session.

    path = write_structure(water, tmp_path)
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        result = run_cli("label", str(path), "--store", str(tmp_path / "s.db"),
                         "--scheduler", "tcp://127.0.0.1:9", "--no-progress")  # fmt: skip
    assert_one_line_error(result, r"cannot reach the Dask scheduler tcp://127\.0\.0\.1:9")


def test_unconverged_relaxation_exits_nonzero_unless_allowed(water, tmp_path):
    path = write_structure(water, tmp_path)
    summary = tmp_path / "s.json"
    result = run_cli("relax", str(path), "--steps", "1", "--summary", str(summary))
    assert_one_line_error(result, r"relaxation not converged in 1 steps .*--allow-unconverged")
    assert json.loads(summary.read_text())["converged"] is False  # written all the same
    allowed = run_cli("relax", str(path), "--steps", "1", "--allow-unconverged")
    assert allowed.exit_code == 0 and "NOT converged" in allowed.stdout


def test_relax_cell_passes_the_stress_threshold(water, tmp_path, monkeypatch):
    from deltaml import cli

    seen = {}

    def fake_relax(atoms, **kwargs):
        seen.update(kwargs)
        return {"converged": True, "steps": 0, "energy_final_ev": 0.0, "max_force_ev_a": 0.0}

    monkeypatch.setattr(cli, "relax", fake_relax)
    path = write_structure(water, tmp_path)
    assert run_cli("relax", str(path), "--cell", "--stress-tol", "0.02").exit_code == 0
    assert seen["cell"] is True and seen["stress_tol_gpa"] == 0.02
    assert run_cli("relax", str(path)).exit_code == 0
    assert seen["stress_tol_gpa"] is None  # no cell relaxation, no stress threshold


def test_python_dash_m_deltaml_runs_the_cli():
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "deltaml", "--version"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"deltaml, version {version('deltaml')}"


def test_verbose_and_quiet_set_the_deltaml_log_level(co2_crystal, tmp_path):
    import logging

    path = write_structure(co2_crystal, tmp_path)
    root_handlers = list(logging.getLogger().handlers)
    verbose = run_cli("-v", "single-point", str(path))
    assert verbose.exit_code == 0, verbose.output
    assert re.search(r"INFO deltaml\.baseline: .*supercell", verbose.stderr)
    quiet = run_cli("-q", "single-point", str(path))
    assert quiet.exit_code == 0 and "INFO" not in quiet.stderr
    assert logging.getLogger("deltaml").level == logging.ERROR
    assert logging.getLogger().handlers == root_handlers  # the root logger is left alone


def test_no_library_module_configures_the_root_logger():
    source = Path(__file__).parents[1] / "deltaml"
    offenders = [
        f"{path.name}:{n}"
        for path in sorted(source.glob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if "basicConfig" in line or "getLogger()." in line
    ]
    assert offenders == []


def _visible_options():
    for name, command in main.commands.items():
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden:
                yield name, command, param


def test_every_default_is_shown_in_the_help():
    for name, command, option in _visible_options():
        if option.is_flag or option.name == "help":
            continue
        ctx = click.Context(command, info_name=name, show_default=True)
        record = option.get_help_record(ctx)
        default = option.get_default(ctx, call=False)
        unset = default is None or type(default).__name__ == "Sentinel" or default == ()
        has_default = not unset and not option.required
        if has_default or isinstance(option.show_default, str):
            assert "default:" in record[1], (name, option.name, record)


def test_one_vocabulary_across_commands():
    seen: dict[str, set[str]] = {}
    for name, _command, option in _visible_options():
        for flag in option.opts:
            seen.setdefault(flag, set()).add(name)
    assert "--method" not in seen  # the baseline is --baseline, the reference --reference
    for composite in ("single-point", "relax", "md", "rank"):
        for flag in ("--model", "--baseline", "--engine", "--dispersion"):
            assert composite in seen[flag], (composite, flag)
    for computing in ("single-point", "relax", "md", "stability", "label", "active-learn"):
        assert computing in seen["--charge"] and computing in seen["--multiplicity"]
    assert {"label", "stability", "active-learn"} <= seen["--reference"]
    assert "evaluate" in seen["--model"]


def test_old_option_spellings_still_work_with_a_warning(water, tmp_path):
    path = write_structure(water, tmp_path)
    old = run_cli("single-point", str(path), "--method", "gfn1", "--json")
    new = run_cli("single-point", str(path), "--baseline", "gfn1", "--json")
    assert old.exit_code == new.exit_code == 0, old.output
    assert json.loads(old.stdout)["energy"] == json.loads(new.stdout)["energy"]
    assert "--method is deprecated here; use --baseline" in old.stderr
    clash = run_cli("single-point", str(path), "--method", "gfn1", "--baseline", "gfn2")
    assert clash.exit_code == 2 and "give only --baseline" in clash.stderr


def test_outputs_that_cannot_be_created_are_refused_before_any_work(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    crystal = tmp_path / "absent.cif"  # never read: the outputs are checked first
    for option in ("-o", "--plot", "--workdir"):
        result = run_cli("rank", str(crystal), "--molecule", "H2O", option,
                         str(blocker / "sub" / "out"))  # fmt: skip
        assert_one_line_error(result, rf"{option}.* cannot be created in .*a_file")
    labelled = tmp_path / "test.extxyz"
    labelled.write_text("")
    result = run_cli("evaluate", str(labelled), "--model", str(labelled),
                     "--plots", str(blocker / "plots"))  # fmt: skip
    assert_one_line_error(result, r"--plots .* cannot be created in .*a_file")


def test_label_refuses_a_malformed_dispersion_before_opening_the_store(water, tmp_path):
    path = write_structure(water, tmp_path)
    store = tmp_path / "labels.db"
    result = run_cli("label", str(path), "--store", str(store), "--dispersion", "d3bj")
    assert_one_line_error(result, r"dispersion 'd3bj' is not of the form DAMPING:FUNCTIONAL")
    assert not store.exists()


def test_active_learn_refuses_what_it_cannot_finish_before_starting(tmp_path):
    start = tmp_path / "start.xyz"
    write(start, Atoms("H2O", positions=[[0, 0, 0], [0, 0, 0.96], [0, 0.93, -0.25]]))
    base = ["active-learn", "--store", str(tmp_path / "s.db"), "--start", str(start)]
    result = run_cli(*base, "--workdir", str(tmp_path / "al"), "--reference", "hf")
    assert result.exit_code == 2 and "--reference hf has no D3 partner" in result.stderr
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = run_cli(*base, "--workdir", str(blocker / "al"))
    assert_one_line_error(result, r"--workdir .* cannot be created in .*a_file")
    assert not (tmp_path / "s.db").exists()


@pytest.mark.parametrize(
    ("command", "function"), [("relax", "relax"), ("md", "run_md"), ("rank", "rank_polymorphs")]
)
def test_no_progress_turns_the_progress_bar_off(command, function, water, co2_crystal,
                                                tmp_path, monkeypatch):  # fmt: skip
    """relax, md and rank take --no-progress, like label and fit."""
    from deltaml import cli
    from deltaml.errors import ParameterError

    asked = []

    def record(*args, **kwargs):
        asked.append(kwargs["progress"])
        raise ParameterError("stopped after the call")

    monkeypatch.setattr(cli, function, record)
    if command == "rank":
        crystal = write_structure(co2_crystal, tmp_path, "co2.extxyz")
        args = [str(crystal), "--molecule", "CO2", "--workdir", str(tmp_path / "w"),
                "-o", str(tmp_path / "r.csv")]  # fmt: skip
    else:
        args = [str(write_structure(water, tmp_path))]
    for extra in ([], ["--no-progress"]):
        assert_one_line_error(run_cli(command, *args, *extra), "stopped after the call")
    assert asked == [True, False]


@pytest.fixture
def fake_labelling(monkeypatch):
    """Replace the labelling runner by one that records its keywords (and cp2k is there)."""
    from deltaml import cli
    from deltaml.labelling import LabellingReport

    calls: list[dict] = []

    def record(structures, store, **kwargs):
        calls.append(kwargs)
        return LabellingReport(structures=len(structures))

    monkeypatch.setattr(cli, "label_structures", record)
    monkeypatch.setattr(cli, "cp2k_available", lambda command="cp2k.psmp": True)
    return calls


def test_label_reference_cp2k_builds_the_cp2k_spec(fake_labelling, water, tmp_path):
    """Issue 14, item 1: labels through the CLI can use the CP2K reference."""
    path = write_structure(water, tmp_path)
    store = ["--store", str(tmp_path / "labels.db")]
    result = run_cli("label", str(path), *store, "--reference", "cp2k", "--xc", "PBE",
                     "--cp2k-cutoff", "400", "--mpi-ranks", "2", "--threads", "3",
                     "--basis", "SZV-MOLOPT-SR-GTH", "--charge", "0")  # fmt: skip
    assert result.exit_code == 0, result.output
    call = fake_labelling[-1]
    assert call["reference"] == {
        "code": "cp2k", "xc": "pbe", "basis": "SZV-MOLOPT-SR-GTH", "cutoff_ry": 400.0,
        "mpi_ranks": 2, "charge": 0,
    }  # fmt: skip
    assert call["threads_per_worker"] == 3  # CP2K's OpenMP threads per rank
    assert call["workers"] >= 1  # the local pool is sized for ranks x threads
    assert call["dispersion"] == "partner"  # the runner reads it from the CP2K record

    assert run_cli("label", str(path), *store, "--reference", "cp2k").exit_code == 0
    assert fake_labelling[-1]["reference"] == {"code": "cp2k"}  # CP2KReference's defaults
    assert fake_labelling[-1]["workers"] is None

    assert run_cli("label", str(path), *store).exit_code == 0  # PySCF, as before
    assert fake_labelling[-1]["reference"] == {
        "method": "dft", "xc": "revpbe0", "basis": "def2-tzvp", "density_fit": True,
        "grid_level": 3,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cp2k-cutoff", "400"], "--cp2k-cutoff is for --reference cp2k"),
        (["--reference", "hf", "--mpi-ranks", "2"], "--mpi-ranks is for --reference cp2k"),
        (["--reference", "cp2k", "--grid-level", "4"], "are for the PySCF references"),
        (["--reference", "cp2k", "--no-density-fit"], "are for the PySCF references"),
        (["--reference", "cp2k", "--xc", "b3lyp"], "'b3lyp' is not a CP2K functional"),
    ],
)
def test_label_refuses_options_of_the_other_reference(fake_labelling, water, tmp_path, args,
                                                      message):  # fmt: skip
    path = write_structure(water, tmp_path)
    result = run_cli("label", str(path), "--store", str(tmp_path / "labels.db"), *args)
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert fake_labelling == [] and not (tmp_path / "labels.db").exists()


def test_label_without_cp2k_installed_is_one_line(fake_labelling, water, tmp_path, monkeypatch):
    from deltaml import cli

    monkeypatch.setattr(cli, "cp2k_available", lambda command="cp2k.psmp": False)
    path = write_structure(water, tmp_path)
    result = run_cli("label", str(path), "--store", str(tmp_path / "labels.db"),
                     "--reference", "cp2k")  # fmt: skip
    assert_one_line_error(result, r"cp2k\.psmp is not on the PATH; install CP2K")
    assert fake_labelling == [] and not (tmp_path / "labels.db").exists()


@pytest.mark.slow
@pytest.mark.skipif(not cp2k_available(), reason="CP2K (cp2k.psmp) is not installed")
def test_label_with_cp2k_writes_a_periodic_label_with_stress(tmp_path):
    """One quick CP2K label (water in a 5 Å cell, minimal basis, 200 Ry) through the CLI."""
    water = Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]],
                  cell=[5.0, 5.2, 5.4], pbc=True)  # fmt: skip
    water.positions += 2.0
    path = write_structure(water, tmp_path)
    store = tmp_path / "labels.db"
    result = run_cli("label", str(path), "--store", str(store), "--reference", "cp2k",
                     "--basis", "SZV-MOLOPT-SR-GTH", "--cp2k-cutoff", "200", "--no-terms",
                     "--workers", "1", "--no-progress")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "1 computed, 0 failed" in result.stdout
    (label,) = LabelStore(str(store)).labelled()
    record = label.info["method_record"]
    assert (record["code"], record["xc"], record["cutoff_ry"]) == ("cp2k", "revpbe", 200.0)
    assert label.get_stress().shape == (6,)
    assert np.abs(label.get_forces()).max() > 0.01


def test_active_learn_on_crystals_takes_cp2k_and_strained_cells(tmp_path, monkeypatch):
    """Issue 14: the crystal loop from the command line (the learner itself is stubbed)."""
    from deltaml import cli

    made = {}

    class Learner:
        def __init__(self, workdir, store, starting, **kwargs):
            made.update(kwargs, starting=starting)
            self.history_path = tmp_path / "history.json"

        def run(self, **kwargs):
            return [{"iteration": 0, "n_labels": 3}]

    monkeypatch.setattr(cli, "ActiveLearner", Learner)
    monkeypatch.setattr(cli, "cp2k_available", lambda: True)
    start = tmp_path / "cell.extxyz"
    write(start, Atoms("H2O", positions=[[0, 0, 0], [0, 0, 0.96], [0, 0.93, -0.25]],
                       cell=[5.0, 5.2, 5.4], pbc=True))  # fmt: skip
    base = ["active-learn", "--store", str(tmp_path / "s.db"), "--start", str(start),
            "--workdir", str(tmp_path / "al")]  # fmt: skip
    result = run_cli(*base, "--reference", "cp2k", "--cp2k-cutoff", "300", "--strained", "4")
    assert result.exit_code == 0, result.output
    assert made["reference"] == {"code": "cp2k", "cutoff_ry": 300.0}
    assert (made["strained"], made["max_strain"]) == (4, 0.05)
    assert (made["explore_starts"], made["carry"]) == (None, 0)
    result = run_cli(*base, "--reference", "cp2k", "--explore-starts", "3", "--carry", "4")
    assert result.exit_code == 0, result.output
    assert (made["explore_starts"], made["carry"]) == (3, 4)
    result = run_cli(*base, "--reference", "cp2k", "--explore-starts", "0")
    assert result.exit_code == 2 and "--explore-starts" in result.stderr
    result = run_cli(*base, "--cp2k-cutoff", "300")
    assert result.exit_code == 2 and "--cp2k-cutoff is for --reference cp2k" in result.stderr
    result = run_cli(*base, "--strained", "2", "--max-strain", "0.6")
    assert result.exit_code == 2 and "--max-strain in [0, 0.5)" in result.stderr
