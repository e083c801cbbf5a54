"""Learning curves on the shipped dataset: baseline alone, Δ-model (composite), direct model.

A fixed, seeded 25 % of ``data/labelled/water_chno.extxyz`` is held out; training
sets of N = 10, 25, 50, 100, 200 structures are the first N of a seeded
permutation of the rest (nested). For each N:

* ``baseline``: GFN2-xTB (own D4 removed) + D3(BJ)-revPBE0 + per-element
  offsets fitted by least squares on the N training energies;
* ``composite``: the same + :class:`deltaml.SparseGPR` (atomic decomposition)
  fitted on the Δ targets;
* ``molecular``: the same with the molecular decomposition (intra + inter);
* ``direct``: :class:`deltaml.SparseGPR` with the same settings fitted on the
  reference energies and forces themselves (no baseline, no D3).

Errors on the held-out set: energy MAE (meV/atom and kcal/mol per structure) and
force MAE (eV/Å, per component). The targets of the issue are checked and
printed: at N = 50 the composite's force MAE is at most a third of the
baseline's and at most half of the direct model's; at N = 100 its energy MAE is
below 1 kcal/mol per structure.

Usage::

    python benchmarks/bench_learning_curve.py                 # N = 10 ... 200
    python benchmarks/bench_learning_curve.py --sizes 10,50   # quicker

Writes ``benchmarks/results/bench_learning_curve.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from _common import RESULTS_DIR, machine_info, markdown_table, write_json
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.units import kcal, mol

from deltaml import SparseGPR, delta_targets, read_labelled

DATASET = Path(__file__).resolve().parent.parent / "data" / "labelled" / "water_chno.extxyz"


def metrics(predicted: list[tuple[float, np.ndarray]], test: list[Atoms]) -> dict[str, float]:
    """Energy MAE (meV/atom, kcal/mol) and force MAE (eV/Å) of predictions on ``test``."""
    n_atoms = np.array([len(a) for a in test])
    pairs = list(zip(predicted, test, strict=True))
    e_err = np.array([p[0] - a.calc.results["energy"] for p, a in pairs])
    f_err = np.concatenate([(p[1] - a.calc.results["forces"]).ravel() for p, a in pairs])
    return {
        "energy_mae_mev_per_atom": 1000 * float(np.mean(np.abs(e_err) / n_atoms)),
        "energy_mae_kcal_mol": float(np.mean(np.abs(e_err))) / (kcal / mol),
        "force_mae": float(np.mean(np.abs(f_err))),
    }


def reference_frames(labelled: list[Atoms]) -> list[Atoms]:
    """Copies labelled with the reference energy and forces alone (for the direct model)."""
    out = []
    for atoms in labelled:
        frame = Atoms(atoms.numbers, atoms.positions)
        frame.calc = SinglePointCalculator(
            frame, energy=atoms.get_potential_energy(), forces=atoms.get_forces()
        )
        out.append(frame)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10,25,50,100,200")
    parser.add_argument("--held-out", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-sparse", type=int, default=200)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "bench_learning_curve.json")
    args = parser.parse_args()
    sizes = [int(n) for n in args.sizes.split(",")]

    labelled = read_labelled(DATASET, check_magnitudes=False)
    delta, terms = delta_targets(labelled)
    direct = reference_frames(labelled)
    order = np.random.default_rng(args.seed).permutation(len(labelled))
    n_test = round(args.held_out * len(labelled))
    test_idx, pool = np.sort(order[:n_test]), order[n_test:]
    if max(sizes) > len(pool):
        raise SystemExit(f"largest N {max(sizes)} exceeds the {len(pool)} training structures")
    delta_test = [delta[i] for i in test_idx]
    direct_test = [direct[i] for i in test_idx]
    print(f"{len(labelled)} structures: {n_test} held out, training pool {len(pool)}")

    rows, results = [], []
    for n in sizes:
        train = np.sort(pool[:n])
        entry: dict[str, object] = {"n_train": n}
        for name, decomposition in (("molecular", "molecular"), ("composite", "atomic")):
            composite = SparseGPR(
                decomposition=decomposition, n_sparse=args.n_sparse, seed=args.seed
            )
            start = time.perf_counter()
            composite.fit([delta[i] for i in train], trained_with=terms)
            entry[f"fit_time_{name}_s"] = time.perf_counter() - start
            predicted = [
                (r.energy, r.forces)
                for r in (composite.predict(a, forces=True) for a in delta_test)
            ]
            entry[name] = metrics(predicted, delta_test)
        # Baseline alone: the same offsets, no GP (its Δ prediction is the offsets).
        offsets = composite._offset_energy(delta_test)
        predicted = [(e, np.zeros((len(a), 3))) for e, a in zip(offsets, delta_test, strict=True)]
        entry["baseline"] = metrics(predicted, delta_test)
        model = SparseGPR(decomposition="atomic", n_sparse=args.n_sparse, seed=args.seed)
        model.fit([direct[i] for i in train])
        predicted = [
            (r.energy, r.forces) for r in (model.predict(a, forces=True) for a in direct_test)
        ]
        entry["direct"] = metrics(predicted, direct_test)
        results.append(entry)
        for name in ("baseline", "composite", "molecular", "direct"):
            m = entry[name]
            rows.append(
                [n, name, f"{m['energy_mae_mev_per_atom']:.2f}", f"{m['energy_mae_kcal_mol']:.2f}",
                 f"{m['force_mae']:.4f}"]
            )  # fmt: skip
        print(f"N = {n} done ({entry['fit_time_composite_s']:.1f} s fit)", flush=True)

    header = ["N", "model", "E MAE (meV/atom)", "E MAE (kcal/mol)", "F MAE (eV/Å)"]
    print(markdown_table(header, rows))
    checks = {}
    by_n = {r["n_train"]: r for r in results}
    if 50 in by_n:
        r = by_n[50]
        checks["n50_force_vs_baseline"] = r["composite"]["force_mae"] / r["baseline"]["force_mae"]
        checks["n50_force_vs_direct"] = r["composite"]["force_mae"] / r["direct"]["force_mae"]
        print(
            f"N = 50: composite/baseline force MAE {checks['n50_force_vs_baseline']:.2f} "
            f"(target <= 0.33), composite/direct {checks['n50_force_vs_direct']:.2f} "
            f"(target <= 0.5)"
        )
    if 100 in by_n:
        checks["n100_energy_kcal_mol"] = by_n[100]["composite"]["energy_mae_kcal_mol"]
        print(
            f"N = 100: composite energy MAE {checks['n100_energy_kcal_mol']:.2f} kcal/mol "
            "(target < 1)"
        )
    write_json(
        args.out,
        {
            "machine": machine_info(),
            "settings": {**vars(args), "out": str(args.out)},
            "n_held_out": n_test,
            "results": results,
            "checks": checks,
        },
    )


if __name__ == "__main__":
    main()
