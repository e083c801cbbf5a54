"""Demo: fit the Δ-model on the shipped dataset, evaluate it, relax a molecule with it.

1. Reads ``data/labelled/water_chno.extxyz`` (revPBE0/def2-TZVP labels of water
   clusters, CHNO molecules and dimers), forms the Δ targets (reference −
   dispersion-free GFN2-xTB − D3(BJ)-revPBE0) from the terms stored with the
   labels, and splits it (seeded) into training and held-out parts.
2. Fits :class:`deltaml.SparseGPR`, calibrates its uncertainty on a validation
   part of the training split, and prints the held-out errors of the baseline
   alone (GFN2-xTB + D3 + per-element offsets) and of the composite side by side.
3. Relaxes acetic acid with the composite and with baseline + D3 alone, and
   prints the bond lengths of the carboxyl group and the predicted uncertainty.

Writes ``model.npz``, the relaxed molecules and a summary to ``--out``::

    python examples/demo_delta.py --out out/demo
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from ase.io import write
from ase.optimize import BFGS

from deltaml import DeltaCalculator, SparseGPR, ZeroCorrection, delta_targets, read_labelled
from deltaml.evaluation import error_table, errors, predict_all

DATA = Path(__file__).resolve().parents[1] / "data" / "labelled" / "water_chno.extxyz"


def split(count: int, held_out: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of indices into (train, held-out)."""
    order = np.random.default_rng(seed).permutation(count)
    n_test = round(held_out * count)
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def carboxyl(atoms) -> dict[str, float]:
    """C=O, C-O(H) and O-H bond lengths of acetic acid, Å."""
    from ase.neighborlist import natural_cutoffs, neighbor_list

    i, j, d = neighbor_list("ijd", atoms, natural_cutoffs(atoms, mult=1.1))
    symbols = atoms.get_chemical_symbols()
    pairs = [({symbols[a], symbols[b]}, float(x)) for a, b, x in zip(i, j, d, strict=True)]
    co = sorted(x for kinds, x in pairs if kinds == {"C", "O"})
    oh = [x for kinds, x in pairs if kinds == {"O", "H"}]
    return {"C=O": co[0], "C-O": co[-1], "O-H": oh[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/demo"))
    parser.add_argument("--held-out", type=float, default=0.2, help="fraction held out")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    labelled = read_labelled(DATA)
    targets, terms = delta_targets(labelled)
    train_idx, test_idx = split(len(targets), args.held_out, args.seed)
    fit_idx, val_idx = split(len(train_idx), 0.1, args.seed + 1)
    train = [targets[i] for i in train_idx[fit_idx]]
    validation = [targets[i] for i in train_idx[val_idx]]
    test = [targets[i] for i in test_idx]
    print(f"{len(targets)} labelled structures: {len(train)} to fit, {len(validation)} to "
          f"calibrate the uncertainty, {len(test)} held out")  # fmt: skip

    model = SparseGPR(seed=args.seed)
    t0 = time.perf_counter()
    model.fit(train, trained_with=terms, progress=True)
    fit_time = time.perf_counter() - t0
    scales = model.calibrate(validation)
    model.save(args.out / "model.npz")
    print(f"fitted in {fit_time:.1f} s; uncertainty scales {scales}")

    table = errors(predict_all(model, test))
    print(f"\nheld-out errors ({len(test)} structures)")
    print(error_table(table))

    print("\nacetic acid relaxed with baseline + D3 alone and with the composite (Å)")
    start_geometry = next(
        a for a in labelled if a.info.get("name") == "CH3COOH" and a.info["sampling"] == "minimum"
    )
    relaxed = {}
    for name, correction in (("baseline+D3", ZeroCorrection()), ("composite", model)):
        atoms = start_geometry.copy()
        atoms.calc = DeltaCalculator(correction=correction, dispersion="d3bj:revpbe0")
        BFGS(atoms, logfile=None).run(fmax=0.005, steps=300)
        relaxed[name] = carboxyl(atoms)
        if "energy_uncertainty" in atoms.calc.results:
            relaxed[name]["energy_uncertainty_ev"] = atoms.calc.results["energy_uncertainty"]
            relaxed[name]["max_force_uncertainty_ev_a"] = float(
                np.max(atoms.calc.results["forces_uncertainty"])
            )
        write(args.out / f"acetic_acid_{name.replace('+', '_')}.extxyz", atoms)
        bonds = ", ".join(f"{k} {relaxed[name][k]:.3f}" for k in ("C=O", "C-O", "O-H"))
        print(f"  {name:12s} {bonds}")
    composite = relaxed["composite"]
    sigma_e = 1000 * composite["energy_uncertainty_ev"]
    sigma_f = composite["max_force_uncertainty_ev_a"]
    print(
        f"  composite uncertainty at its minimum: energy {sigma_e:.1f} meV, "
        f"largest force {sigma_f:.3f} eV/Å"
    )

    summary = {
        "n_fit": len(train),
        "n_validation": len(validation),
        "n_held_out": len(test),
        "fit_time_s": round(fit_time, 2),
        "uncertainty_scales": scales,
        "held_out_errors": table,
        "acetic_acid": relaxed,
        "wall_time_s": round(time.perf_counter() - start, 1),
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nwrote {args.out / 'summary.json'} in {summary['wall_time_s']} s")


if __name__ == "__main__":
    main()
