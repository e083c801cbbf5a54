"""Demo: fit the Δ-model on the shipped dataset, evaluate it, relax a molecule with it.

1. Reads ``data/labelled/water_chno.extxyz`` (revPBE0/def2-TZVP labels of water
   clusters, CHNO molecules and dimers) and ``data/labelled/interactions.extxyz``
   (dimer minima and scans with every monomer labelled at its geometry in the
   dimer), forms the Δ targets (reference − dispersion-free GFN2-xTB −
   D3(BJ)-revPBE0) from the terms stored with the labels, and splits them
   (seeded) into training and held-out parts: structures of ``water_chno`` at
   random, whole interaction systems (a dimer with its scan and monomers) of
   the interaction set. The isolated H, C, N and O atoms
   (``data/labelled/isolated_atoms.extxyz``) join the training part: they anchor
   the per-element offsets (:mod:`deltaml.offsets`).
2. Fits :class:`deltaml.SparseGPR` (molecular decomposition), calibrates its
   uncertainty on a validation part of the training split and on six more whole
   interaction systems (which set the σ of interaction energies), and prints the
   held-out errors of the baseline alone (GFN2-xTB + D3 + per-element offsets)
   and of the composite side by side.
3. Prints the interaction energies of the held-out dimers: reference, terms
   alone (no correction), composite and its σ, and how many errors fall within
   1σ and 2σ.
4. Relaxes acetic acid with the composite and with baseline + D3 alone, and
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
from ase import Atoms
from ase.io import write
from ase.optimize import BFGS

from deltaml import DeltaCalculator, SparseGPR, ZeroCorrection, delta_targets, read_labelled
from deltaml.dataset import interaction_groups
from deltaml.evaluation import error_table, errors, interaction_energies, predict_all

LABELLED = Path(__file__).resolve().parents[1] / "data" / "labelled"
DATA = LABELLED / "water_chno.extxyz"
INTERACTIONS = LABELLED / "interactions.extxyz"
ATOMS = LABELLED / "isolated_atoms.extxyz"  # anchor the per-element offsets


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
    parser.add_argument(
        "--held-out-systems", type=int, default=4, help="interaction systems held out"
    )
    parser.add_argument(
        "--calibration-systems",
        type=int,
        default=6,
        help="interaction systems that calibrate the σ of interaction energies",
    )
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
    pairs: list[Atoms] = []
    if INTERACTIONS.exists():
        extra, _ = delta_targets(read_labelled(INTERACTIONS))
        systems = sorted({a.info["system"] for a in extra})
        rng = np.random.default_rng(args.seed)
        drawn = rng.permutation(systems)
        held = set(drawn[: min(args.held_out_systems, len(systems) - 1)])
        # More whole systems calibrate the σ of interaction energies (not fitted).
        calibrating = set(drawn[len(held) : len(held) + args.calibration_systems])
        train += [a for a in extra if a.info["system"] not in held | calibrating]
        validation += [a for a in extra if a.info["system"] in calibrating]
        pairs = [a for a in extra if a.info["system"] in held]
    n_extra = len(train) - len(train_idx[fit_idx])
    train += delta_targets(read_labelled(ATOMS))[0]
    print(f"{len(targets)} labelled structures + {n_extra} of interaction systems: "
          f"{len(train)} to fit, {len(validation)} to calibrate the uncertainty, "
          f"{len(test)} held out, {len(pairs)} in held-out interaction systems")  # fmt: skip

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

    interactions = []
    if pairs:
        interactions = interaction_energies(model, pairs, interaction_groups(pairs))
        print("\ninteraction energies of held-out dimers (kcal/mol; systems not fitted)")
        print(f"  {'dimer':28s} {'scan':>5s} {'reference':>9s} {'terms':>7s} {'composite':>9s}  σ")
        for row in interactions:
            scan = float(pairs[row["index"]].info.get("scan_factor", 1.0))
            print(f"  {row['name']:28s} {scan:5.2f} {row['reference']:9.2f} "
                  f"{row['terms']:7.2f} {row['composite']:9.2f}  {row['sigma']:.2f}")  # fmt: skip
        for method in ("terms", "composite"):
            mae = np.mean([abs(r[method] - r["reference"]) for r in interactions])
            print(f"  MAE {method}: {mae:.2f} kcal/mol")
        z = [abs(r["composite"] - r["reference"]) / max(r["sigma"], 1e-9) for r in interactions]
        print(f"  composite errors within 1σ: {np.mean(np.less_equal(z, 1.0)):.0%}, "
              f"within 2σ: {np.mean(np.less_equal(z, 2.0)):.0%}")  # fmt: skip

    print("\nacetic acid relaxed with baseline + D3 alone and with the composite (Å)")
    start_geometry = next(
        a for a in labelled if a.info.get("name") == "CH3COOH" and a.info["sampling"] == "minimum"
    )
    relaxed = {}
    for name, correction in (("baseline+D3", ZeroCorrection()), ("composite", model)):
        atoms = start_geometry.copy()
        atoms.calc = DeltaCalculator(
            correction=correction, dispersion="d3bj:revpbe0", force_uncertainty=True
        )
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
        "held_out_interactions_kcal_mol": interactions,
        "acetic_acid": relaxed,
        "wall_time_s": round(time.perf_counter() - start, 1),
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nwrote {args.out / 'summary.json'} in {summary['wall_time_s']} s")


if __name__ == "__main__":
    main()
