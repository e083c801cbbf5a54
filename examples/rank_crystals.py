"""Relax and rank the polymorphs of every crystal of the periodic reference set.

For each chemistry of ``data/structures/crystal_starts.extxyz`` (seven ice phases;
CO2 I and III; α- and β-oxalic acid; aspirin I and II; the imide's two forms; urea
I and benzene I alone), every starting cell and the gas-phase molecule (as cut and
relaxed, ``crystal_molecules.extxyz``) are relaxed, positions and cells, with

* the composite: dispersion-free GFN2-xTB + the Δ-model fitted on the periodic CP2K
  labels (``data/labelled/crystals.extxyz``;
  :func:`deltaml.evaluation.fit_crystal_model`) + D3(BJ), the
  reference's (revPBE) partner, and
* GFN2-xTB alone, with its own D4,

and ranked by lattice energy per molecule, E_latt = E_crystal / Z − E_gas, with
±1σ from the model's posterior covariance. Per chemistry, under ``OUT/<chemistry>``:
``ranking.csv``, the energy ladder ``ranking.png`` and the relaxed structures
(a rerun resumes from them); ``OUT/summary.json`` holds every table.

Usage::

    python examples/rank_crystals.py                              # every chemistry
    python examples/rank_crystals.py --systems co2_pa3,co2_cmca   # some systems
    python examples/rank_crystals.py --fixed   # single points at the starting cells

The starting cells are experimental (CSD, GenIce2's densities), at least 7 Å wide.
Where the labels hold few cells of a chemistry, σ says so; the lattice energies at
the starting cells against CP2K's are ``benchmarks/bench_crystals.py``'s.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ase import Atoms
from ase.io import read
from rank_ice_polymorphs import methods, parser_for

from deltaml import delta_targets, read_labelled
from deltaml.crystals import identify_molecules
from deltaml.evaluation import fit_crystal_model
from deltaml.ranking import rank_polymorphs

DATA = Path(__file__).resolve().parent.parent / "data"
LABELS = DATA / "labelled" / "crystals.extxyz"
STARTS = DATA / "structures" / "crystal_starts.extxyz"
MOLECULES = DATA / "structures" / "crystal_molecules.extxyz"


def fit_or_load_model(out: Path, model_path: Path | None, seed: int) -> Path:
    """The model given, or one fitted on the periodic labels (σ by 5-fold CV over systems)."""
    if model_path is not None:
        return model_path
    path = out / "model.npz"
    if path.is_file():
        return path
    targets, terms = delta_targets(read_labelled(LABELS, check_magnitudes=False))
    model = fit_crystal_model(targets, seed=seed, trained_with=terms)
    out.mkdir(parents=True, exist_ok=True)
    return model.save(path)


def chemistries(systems: set[str] | None) -> dict[str, tuple[dict[str, Atoms], Atoms]]:
    """Formula of the molecule → (starting cells by system, the relaxed gas molecule)."""
    gas = {
        m.info["system"][4:]: m for m in read(MOLECULES, index=":") if "relaxed" in m.info["source"]
    }
    out: dict[str, tuple[dict[str, Atoms], Atoms]] = {}
    for start in read(STARTS, index=":"):
        name = start.info["system"]
        if systems is not None and name not in systems:
            continue
        (formula,) = identify_molecules(start).count  # one molecule per crystal here
        cells, _ = out.setdefault(formula, ({}, gas[formula]))
        cells[name] = Atoms(start.numbers, start.positions, cell=start.cell, pbc=True)
    return out


def main() -> None:
    parser = parser_for(__doc__.split("\n")[0], "out/crystal_ranking")
    parser.set_defaults(fmax=0.05)
    parser.add_argument("--systems", default=None, help="comma-separated (default all)")
    parser.add_argument("--optimizer", default="PreconLBFGS", help="BFGS or PreconLBFGS")
    parser.add_argument("--fixed", action="store_true", help="single points, no relaxation")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model_path = fit_or_load_model(args.out, args.model, args.seed)
    wanted = None if args.systems is None else set(args.systems.split(","))
    summary: dict = {"model": str(model_path), "optimizer": args.optimizer, "fixed": args.fixed}
    for formula, (cells, molecule) in chemistries(wanted).items():
        start = time.perf_counter()
        folder = args.out / formula
        ranking = rank_polymorphs(
            cells, [molecule], methods(model_path, args.baseline, not args.no_baseline),
            workdir=folder / "relaxed", relax_structures=not args.fixed, fmax=args.fmax,
            steps=args.steps, optimizer=args.optimizer, stress_tol_gpa=args.stress_tol,
        )  # fmt: skip
        table = ranking.table()
        ranking.to_csv(folder / "ranking.csv")
        ranking.plot(folder / "ranking.png")
        columns = [c for c in table.columns if c.startswith(("Z", "E_latt", "rel_", "sigma_"))]
        columns += [c for c in table.columns if c.startswith(("density_", "steps_"))]
        print(f"\n{formula}:")
        print(table[columns].to_string(float_format=lambda v: f"{v:.2f}"))
        summary[formula] = {
            "wall_time_s": time.perf_counter() - start,
            "table": json.loads(table.to_json(orient="index")),
        }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    print(f"written: {args.out}/<chemistry>/ranking.csv, ranking.png; {args.out}/summary.json")


if __name__ == "__main__":
    main()
