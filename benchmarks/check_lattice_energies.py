"""Lattice energies at fixed geometries: terms alone and composite against CP2K revPBE-D3(BJ).

The quick check on crystals of a composite trained on molecular data
(``bench_crystals.py`` trains on the periodic labels themselves): a model is fitted
as the ranking examples fit theirs (``water_chno`` + the interaction set,
optionally + the crystal contacts), σ calibrated by ``--calibration-folds``-fold
cross-validation over whole systems (0: a seeded 10 % of the systems held out,
the script's only way before the tenth session), and scored on

* every periodic cell in ``data/labelled/crystals.extxyz`` (CP2K revPBE + its
  D3(BJ) partner, against the GFN2-xTB-relaxed gas-phase molecule labelled at the
  same level, as ``bench_crystals.py`` takes it);
* CO2 phase I at its experimental cell with an experimental-geometry molecule
  (C=O 1.154 Å) against CP2K revPBE-D3(BJ) −29.69 kJ/mol
  (``bench_cp2k_reference.py``, 600 Ry).

Usage::

    python benchmarks/check_lattice_energies.py                   # default model
    python benchmarks/check_lattice_energies.py --contacts        # + crystal contacts
    python benchmarks/check_lattice_energies.py --inter-rows difference
    python benchmarks/check_lattice_energies.py --model out/ice_ranking/model.npz  # a file

Prints a table and writes ``benchmarks/results/check_lattice_energies.json``.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
from _common import RESULTS_DIR, machine_info, markdown_table, write_json
from ase import Atoms
from ase.io import read
from ase.units import kJ, mol

from deltaml import DeltaCalculator, SparseGPR, delta_targets, read_labelled
from deltaml.correction import ZeroCorrection
from deltaml.crystals import identify_molecules
from deltaml.dataset import split_systems
from deltaml.dispersion import D3Dispersion
from deltaml.evaluation import cross_calibrated_fit

ROOT = Path(__file__).resolve().parent.parent
LABELLED = ROOT / "data" / "labelled"
PERIODIC = ROOT / "data" / "labelled" / "crystals.extxyz"
KJ_MOL = kJ / mol
#: CP2K revPBE-D3(BJ) lattice energy of CO2 Pa-3 at the experimental cell (kJ/mol).
CO2_PA3_REFERENCE = -29.69
TERM_KEYS = ("method", "engine", "baseline_dispersion", "dispersion")


def fitted_model(contacts: bool, inter_rows: str, seed: int, folds: int = 5) -> SparseGPR:
    """The composite's model, fitted on the shipped labels, σ calibrated by ``folds``-fold
    cross-validation over whole systems (0: on a seeded 10 % of the systems, not fitted)."""
    paths = ["water_chno", "interactions"] + (["crystal_contacts"] if contacts else [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the small files' units check
        labelled = [a for name in paths for a in read_labelled(LABELLED / f"{name}.extxyz")]
        targets, terms = delta_targets(labelled)
        anchors, _ = delta_targets(read_labelled(LABELLED / "isolated_atoms.extxyz"))
    model = SparseGPR(inter_rows=inter_rows, uncertainty="energy", seed=seed)
    if folds:
        return cross_calibrated_fit(
            model, targets + anchors, folds=folds, seed=seed, trained_with=terms
        )
    fit, held = split_systems(targets, 0.1, seed)
    model.fit([targets[i] for i in fit] + anchors, trained_with=terms)
    model.calibrate([targets[i] for i in held])
    return model


def cases() -> list[tuple[str, Atoms, Atoms, float]]:
    """(name, cell, gas molecule, reference E_latt in kJ/mol) of every case available."""
    out = []
    if PERIODIC.is_file():
        from bench_crystals import gas_references

        partner = D3Dispersion(method="revpbe", damping="d3bj")  # CP2K revPBE's partner

        def total(atoms: Atoms) -> float:
            probe = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
            probe.calc = partner
            return atoms.get_potential_energy() + probe.get_potential_energy()

        frames = read(PERIODIC, index=":")
        gas = {name: frames[k] for name, k in gas_references(frames).items()}
        for cell in frames:
            if not cell.pbc.all():
                continue
            molecules = identify_molecules(cell)
            molecule = gas.get(molecules.formulas[0])
            if molecule is None:
                continue
            n = len(molecules.formulas)
            reference = (total(cell) / n - total(molecule)) / KJ_MOL
            name = f"{cell.info['system']} ({cell.info['source']})"
            out.append((name, cell, molecule, reference))
    pa3 = read(ROOT / "data" / "crystals" / "co2_pa3.extxyz")
    co2 = Atoms("CO2", positions=[[0, 0, 0], [0, 0, 1.154], [0, 0, -1.154]])
    out.append(("CO2 Pa-3 experimental", pa3, co2, CO2_PA3_REFERENCE))
    return out


def lattice_energy(calc: DeltaCalculator, cell: Atoms, molecule: Atoms) -> tuple[float, float]:
    """E_latt (kJ/mol per molecule) and the cell's σ per molecule (kJ/mol; NaN without)."""
    n = len(identify_molecules(cell).formulas)
    energies, sigma = [], np.nan
    for atoms in (cell, molecule):
        probe = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
        probe.calc = calc
        energies.append(probe.get_potential_energy())
        if atoms is cell:
            sigma = calc.results.get("energy_uncertainty", np.nan) / n / KJ_MOL
    return (energies[0] / n - energies[1]) / KJ_MOL, sigma


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contacts", action="store_true", help="train on crystal contacts too")
    parser.add_argument("--inter-rows", default="pairwise", choices=("pairwise", "difference"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--calibration-folds", type=int, default=5,
        help="k-fold CV over whole systems calibrates σ (k + 1 fits); 0: a 10 %% split",
    )  # fmt: skip
    parser.add_argument(
        "--model", type=Path, default=None, help="score this model file instead of fitting one"
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "check_lattice_energies.json")
    args = parser.parse_args()
    start = time.perf_counter()
    if args.model is not None:
        model = SparseGPR.load(args.model)
        model.uncertainty = "energy"
        args.inter_rows, args.contacts = model.inter_rows, "as fitted"
    else:
        model = fitted_model(args.contacts, args.inter_rows, args.seed, args.calibration_folds)
    fit_seconds = time.perf_counter() - start
    composite = DeltaCalculator.from_model(model)
    settings = {k: v for k, v in composite.parameters.items() if k in TERM_KEYS}
    terms = DeltaCalculator(correction=ZeroCorrection(), **settings)
    rows = []
    for name, cell, molecule, reference in cases():
        alone, _ = lattice_energy(terms, cell, molecule)
        learned, sigma = lattice_energy(composite, cell, molecule)
        rows.append(
            {"case": name, "reference": reference, "terms": alone, "composite": learned,
             "sigma": sigma}
        )  # fmt: skip
    table = [
        [r["case"], f"{r['reference']:.1f}", f"{r['terms']:.1f}", f"{r['composite']:.1f}",
         f"{r['sigma']:.1f}"]
        for r in rows
    ]  # fmt: skip
    print(
        f"inter_rows={args.inter_rows}, contacts={args.contacts}, fit {fit_seconds:.0f} s, "
        f"intermolecular δ {model.terms_[1].delta:.4f} eV"
    )
    print(markdown_table(["case", "CP2K revPBE-D3", "terms", "composite", "σ"], table))
    write_json(
        args.out,
        {"machine": machine_info(),
         "settings": vars(args) | {"out": str(args.out), "model": str(args.model)},
         "fit_seconds": fit_seconds, "rows": rows},
    )  # fmt: skip


if __name__ == "__main__":
    main()
