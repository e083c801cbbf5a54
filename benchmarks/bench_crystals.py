"""Crystals against their periodic reference: the baseline, learning curves, rankings.

Issue 14, items 2 and 4, on ``data/labelled/crystals.extxyz`` (CP2K labels of the
cells of every system and of their gas-phase molecules; ``data/make_crystal_dataset.py``).
Split by system, never by frame.

* **Learning curves, GFN2-xTB vs GFN1-xTB** (``--baselines``): for each baseline
  (its own dispersion removed; the reference's D3(BJ) partner added), one
  polymorph of every chemistry with several (seeded) is held out whole; models
  are fitted on nested, seeded subsets of the other labels (``--sizes``) and
  scored on the held-out cells: lattice energy per molecule (kJ/mol), forces
  (eV/Å) and stress (GPa). Size 0 is the terms alone.
* **Rankings at fixed geometries** (``--rankings``), for each baseline: every
  system left out in turn (its cells; the gas molecules stay, they are every
  system's other end), a model fitted on the rest, its σ calibrated by
  cross-validation over the rest's systems
  (:func:`deltaml.evaluation.fit_crystal_model`, whole systems per fold); at each
  system's starting cell, the lattice energy E_latt = E_cell / N − E_molecule
  (the gas-phase molecule relaxed with GFN2-xTB, labelled at the same level)
  against the reference's, the stress, the relative energies of the polymorphs
  of one chemistry, whether their order is right where the gap exceeds 2σ, and
  the fraction of errors within 1σ and 2σ (σ from the covariance of the
  structures involved). Also the model fitted on everything (in-sample).

Usage::

    python benchmarks/bench_crystals.py                          # both parts
    python benchmarks/bench_crystals.py --sizes 10,25,50,all --baselines GFN2-xTB
    python benchmarks/bench_crystals.py --sizes all --inter-delta cv     # SparseGPR's default δ

Writes ``benchmarks/results/bench_crystals.json`` (``--out`` to change) after each
part (``"complete": false`` until the last), so that a run stopped for time keeps
what it measured.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from _common import RESULTS_DIR, machine_info, markdown_table, write_json
from ase import Atoms
from ase.units import GPa, kJ, mol

from deltaml import SparseGPR, delta_targets, read_labelled
from deltaml.crystals import identify_molecules
from deltaml.evaluation import fit_crystal_model
from deltaml.model import CRYSTAL_PARAMS

DATA = Path(__file__).resolve().parent.parent / "data" / "labelled" / "crystals.extxyz"
KJ_MOL = kJ / mol
#: Model settings of every fit (:data:`deltaml.model.CRYSTAL_PARAMS`, as the crystal
#: dataset's loop; ``--inter-delta`` sets ``inter_delta``, e.g. ``cv``, SparseGPR's default).
MODEL: dict = {"uncertainty": "energy", **CRYSTAL_PARAMS}
#: Most folds of the cross-validation that calibrates σ.
CALIBRATION_FOLDS = 5


def chemistry(atoms: Atoms) -> str:
    """The molecule(s) a structure is made of, e.g. ``"H2O"``."""
    return ",".join(sorted(identify_molecules(atoms).count))


def molecule_count(atoms: Atoms) -> int:
    """Number of molecules in a structure."""
    return len(identify_molecules(atoms).formulas)


def gas_references(frames: list[Atoms]) -> dict[str, int]:
    """Index of the relaxed gas-phase molecule of each chemistry."""
    return {
        a.info["system"][4:]: k
        for k, a in enumerate(frames)
        if str(a.info.get("system", "")).startswith("gas:") and "relaxed" in a.info["source"]
    }


def held_out_systems(frames: list[Atoms], seed: int) -> list[str]:
    """One polymorph (seeded) of every chemistry that has several."""
    by_chemistry: dict[str, set[str]] = {}
    for atoms in frames:
        if atoms.pbc.all():
            by_chemistry.setdefault(chemistry(atoms), set()).add(atoms.info["system"])
    rng = np.random.default_rng(seed)
    return sorted(
        str(rng.choice(sorted(systems)))
        for _, systems in sorted(by_chemistry.items())
        if len(systems) > 1
    )


def cell_errors(
    model: SparseGPR | None, targets: list[Atoms], cells: list[int], gas: dict[str, int]
) -> dict[str, float]:
    """Lattice energy per molecule (kJ/mol), force (eV/Å) and stress (GPa) MAE on cells.

    The error of a Δ prediction is the composite's error against the reference;
    ``model`` None is the terms alone (Δ = 0).
    """

    def predict(atoms: Atoms) -> tuple[float, np.ndarray, np.ndarray]:
        if model is None:
            return 0.0, np.zeros((len(atoms), 3)), np.zeros(6)
        result = model.predict(atoms, forces=True, stress=bool(atoms.pbc.all()))
        return result.energy, result.forces, result.stress

    gas_error = {}
    for name, k in gas.items():
        gas_error[name] = predict(targets[k])[0] - targets[k].calc.results["energy"]
    e_err, f_err, s_err = [], [], []
    for k in cells:
        atoms = targets[k]
        energy, forces, stress = predict(atoms)
        error = (energy - atoms.calc.results["energy"]) / molecule_count(atoms)
        e_err.append(error - gas_error[chemistry(atoms)])
        f_err.append((forces - atoms.calc.results["forces"]).ravel())
        s_err.append(stress - atoms.calc.results["stress"])
    return {
        "lattice_mae_kj_mol": float(np.mean(np.abs(e_err))) / KJ_MOL,
        "force_mae": float(np.mean(np.abs(np.concatenate(f_err)))),
        "stress_mae_gpa": float(np.mean(np.abs(s_err))) / GPa,
    }


def learning_curve(
    targets: list[Atoms], sizes: list[str], seed: int
) -> tuple[list[dict], list[str]]:
    """Errors on held-out polymorphs against the number of training labels."""
    gas = gas_references(targets)
    held = held_out_systems(targets, seed)
    test = [k for k, a in enumerate(targets) if a.info.get("system") in held]
    rest = [k for k in range(len(targets)) if k not in set(test)]
    order = [rest[i] for i in np.random.default_rng(seed).permutation(len(rest))]
    # Gas molecules always train: they are the other end of every lattice energy.
    order = [k for k in order if k in gas.values()] + [k for k in order if k not in gas.values()]
    points = [{"n_labels": 0, **cell_errors(None, targets, test, gas)}]
    for size in sizes:
        n = len(order) if size == "all" else min(int(size), len(order))
        model = SparseGPR(seed=seed, **MODEL).fit([targets[k] for k in order[:n]])
        points.append({"n_labels": n, **cell_errors(model, targets, test, gas)})
        print(f"  {n} labels: {points[-1]}", flush=True)
    return points, held


def lattice_energies(
    model: SparseGPR, targets: list[Atoms], starts: list[int], gas: dict[str, int]
) -> list[dict]:
    """Error and σ of the lattice energy of each start, and its stress error."""
    rows = []
    for k in starts:
        cell = targets[k]
        molecule = targets[gas[chemistry(cell)]]
        n = molecule_count(cell)
        weights = np.array([1.0 / n, -1.0])
        predicted = np.array([model.predict(a, forces=False).energy for a in (cell, molecule)])
        target = np.array([a.calc.results["energy"] for a in (cell, molecule)])
        reference = np.array([a.info["reference_energy"] for a in (cell, molecule)])
        covariance = model.energy_covariance([cell, molecule])
        stress = model.predict(cell, forces=False, stress=True).stress
        rows.append({
            "index": k,
            "system": cell.info["system"],
            "chemistry": chemistry(cell),
            "reference_kj_mol": float(weights @ reference) / KJ_MOL,
            "error_kj_mol": float(weights @ (predicted - target)) / KJ_MOL,
            "terms_error_kj_mol": float(weights @ (-target)) / KJ_MOL,
            "sigma_kj_mol": float(np.sqrt(max(weights @ covariance @ weights, 0.0))) / KJ_MOL,
            "stress_mae_gpa": float(np.mean(np.abs(stress - cell.calc.results["stress"]))) / GPa,
            "terms_stress_mae_gpa": float(np.mean(np.abs(cell.calc.results["stress"]))) / GPa,
        })  # fmt: skip
    return rows


def relative_energy(model: SparseGPR, targets: list[Atoms], a: dict, b: dict) -> dict:
    """E_latt(A) − E_latt(B) of two polymorphs: error, σ (one model), order check."""
    cells = [targets[a["index"]], targets[b["index"]]]
    weights = np.array([1.0 / molecule_count(c) for c in cells]) * [1.0, -1.0]
    sigma = np.sqrt(max(weights @ model.energy_covariance(cells) @ weights, 0.0)) / KJ_MOL
    reference = a["reference_kj_mol"] - b["reference_kj_mol"]
    error = a["error_kj_mol"] - b["error_kj_mol"]
    predicted = reference + error
    return {
        "pair": f"{a['system']} − {b['system']}",
        "reference_kj_mol": reference,
        "error_kj_mol": error,
        "sigma_kj_mol": float(sigma),
        "terms_error_kj_mol": a["terms_error_kj_mol"] - b["terms_error_kj_mol"],
        "resolved": bool(abs(predicted) > 2 * sigma),
        "order_right": bool(np.sign(predicted) == np.sign(reference)),
    }


def summary(rows: list[dict]) -> dict[str, float]:
    """MAE of the composite and of the terms, and the fraction within 1σ and 2σ."""
    errors = np.abs([r["error_kj_mol"] for r in rows])
    sigmas = np.array([r["sigma_kj_mol"] for r in rows])
    out = {
        "count": len(rows),
        "mae_kj_mol": float(np.mean(errors)),
        "terms_mae_kj_mol": float(np.mean(np.abs([r["terms_error_kj_mol"] for r in rows]))),
        "within_1sigma": float(np.mean(errors <= sigmas)),
        "within_2sigma": float(np.mean(errors <= 2 * sigmas)),
    }
    if "stress_mae_gpa" in rows[0]:
        out["stress_mae_gpa"] = float(np.mean([r["stress_mae_gpa"] for r in rows]))
    if "order_right" in rows[0]:
        resolved = [r for r in rows if r["resolved"]]
        out["resolved_pairs"] = len(resolved)
        out["resolved_order_right"] = sum(r["order_right"] for r in resolved)
    return out


def rankings(targets: list[Atoms], seed: int) -> dict:
    """Each system left out in turn (its polymorphs seen); the model fitted on everything.

    Left out, the system's lattice energy is predicted by a model that has seen
    the other polymorphs of its chemistry, and its relative energy to each of
    them comes from that one model (their errors and covariance): the use case
    of a new candidate polymorph of a molecule whose other forms were labelled.
    """
    gas = gas_references(targets)
    starts = [k for k, a in enumerate(targets) if a.info.get("source") == "start"]
    left_out, relative_out = [], []
    for k in starts:
        system = targets[k].info["system"]
        train = [j for j, a in enumerate(targets) if a.info.get("system") != system]
        model = fit_crystal_model(
            [targets[j] for j in train], seed=seed, folds=CALIBRATION_FOLDS, **MODEL
        )
        same = [k] + [
            j for j in starts if j != k and chemistry(targets[j]) == chemistry(targets[k])
        ]
        rows = lattice_energies(model, targets, same, gas)
        left_out.append(rows[0])
        relative_out += [relative_energy(model, targets, rows[0], other) for other in rows[1:]]
        print(f"  {system} left out: {rows[0]['error_kj_mol']:+.2f} kJ/mol "
              f"(σ {rows[0]['sigma_kj_mol']:.2f}, terms {rows[0]['terms_error_kj_mol']:+.2f})",
              flush=True)  # fmt: skip
    everything = fit_crystal_model(targets, seed=seed, folds=CALIBRATION_FOLDS, **MODEL)
    in_sample = lattice_energies(everything, targets, starts, gas)
    relative_in = [
        relative_energy(everything, targets, a, b)
        for i, a in enumerate(in_sample)
        for b in in_sample[i + 1 :]
        if a["chemistry"] == b["chemistry"]
    ]
    return {
        "left_out": left_out,
        "left_out_summary": summary(left_out),
        "relative_left_out": relative_out,
        "relative_left_out_summary": summary(relative_out) if relative_out else None,
        "in_sample": in_sample,
        "in_sample_summary": summary(in_sample),
        "relative_in_sample": relative_in,
        "relative_in_sample_summary": summary(relative_in) if relative_in else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--crystals", type=Path, default=DATA)
    parser.add_argument("--baselines", default="GFN2-xTB,GFN1-xTB")
    parser.add_argument("--sizes", default="10,25,50,100,all", help="training labels")
    parser.add_argument("--rankings", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--inter-delta", default=None,
        help="SparseGPR inter_delta: eV, or cv / cv-interactions / evidence (default: 0.05)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "bench_crystals.json")
    args = parser.parse_args()
    if args.inter_delta is not None:
        MODEL["inter_delta"] = (
            args.inter_delta if args.inter_delta.isalpha() or "-" in args.inter_delta
            else float(args.inter_delta)
        )  # fmt: skip
    labelled = read_labelled(args.crystals, check_magnitudes=False)
    settings = {**vars(args), "out": str(args.out), "crystals": str(args.crystals)}
    report: dict = {"machine": machine_info(), "settings": settings}
    start = time.perf_counter()
    sizes = args.sizes.split(",")
    for method in args.baselines.split(","):
        targets, _ = delta_targets(labelled, baseline={"method": method, "remove_dispersion": True})
        print(f"{method}: {len(targets)} labels", flush=True)
        curve, held = learning_curve(targets, sizes, args.seed)
        report[f"curve_{method}"] = {"held_out": held, "points": curve}
        write_json(args.out, {**report, "complete": False})  # each part as it ends
        print(f"{method}, held out {held}:")
        print(markdown_table(
            ["labels", "E_latt MAE (kJ/mol)", "F MAE (eV/Å)", "stress MAE (GPa)"],
            [[p["n_labels"], f"{p['lattice_mae_kj_mol']:.2f}", f"{p['force_mae']:.3f}",
              f"{p['stress_mae_gpa']:.3f}"] for p in curve],
        ))  # fmt: skip
        if args.rankings:
            ranked = rankings(targets, args.seed)
            report[f"rankings_{method}"] = ranked
            write_json(args.out, {**report, "complete": False})
            for part in ("left_out", "in_sample"):
                print(f"{method}, lattice energies, {part}: {ranked[f'{part}_summary']}")
                print(f"{method}, relative energies, {part}: "
                      f"{ranked[f'relative_{part}_summary']}")  # fmt: skip
                print(markdown_table(
                    ["pair", "reference", "error", "σ", "terms error", "order right"],
                    [[r["pair"], f"{r['reference_kj_mol']:.2f}", f"{r['error_kj_mol']:+.2f}",
                      f"{r['sigma_kj_mol']:.2f}", f"{r['terms_error_kj_mol']:+.2f}",
                      r["order_right"]] for r in ranked[f"relative_{part}"]],
                ))  # fmt: skip
    report["wall_time_s"] = time.perf_counter() - start
    write_json(args.out, {**report, "complete": True})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
