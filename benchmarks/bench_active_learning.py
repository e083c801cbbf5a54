"""Uncertainty-driven vs random selection from the same candidate pool, equal budgets.

Pool-based active learning on the shipped dataset, whose labels are known, so
the comparison costs no new reference calculation: a seeded 25 % is held out
for validation, the rest is the candidate pool. Each run starts from 5 random
pool structures and adds batches of 5, chosen by
:func:`deltaml.active.select_batch` with one of the strategies (``--strategies``):

* ``uncertainty``: the 20 candidates with the largest predicted force
  uncertainty, spread by farthest-point sampling in SOAP space;
* ``variance_reduction``: the greedy batch that most lowers the summed
  posterior variance of the candidates' atomic environments, conditioned on
  the training set (:func:`deltaml.active.variance_reduction_batch`);
* ``random``: a seeded random batch (the control; always run).

:class:`deltaml.SparseGPR` is refitted after every batch. The validation force
MAE is recorded at 25, 50 and 100 labels, for several seeds, in one run, with
the number of atoms labelled (a label is a structure; larger structures carry
more force components).

Target of the issue: active selection reaches the random selection's error at
100 labels with at most half the labels; the script prints, for each strategy,
the smallest budget at which its mean error is at or below the mean random
error at the largest budget.

Crystal mode (``--crystals FILE``, issue 14): the pool is a file of periodic
reference labels with ``info["system"]`` and ``info["source"]``
(``data/make_crystal_dataset.py`` exports them). Every system's starting cell
(``source == "start"``) is held out to score relative polymorph energies, and
whole systems, never frames, to score energies per molecule (kJ/mol) and stress
(GPa): one polymorph of every chemistry with several (seeded, as
``bench_crystals.py`` chooses them), all its cells; the gas-phase molecules stay in
the pool; strategies are ``crystal`` (the most uncertain candidates by
:func:`deltaml.active.crystal_score`: per-molecule energy and stress σ in
units of 1 kJ/mol and 0.1 GPa, spread by farthest-point sampling),
``variance_reduction`` and ``random``; the criterion is the per-molecule energy
MAE of held-out frames, and the relative energies are reported beside it.

Usage::

    python benchmarks/bench_active_learning.py --seeds 0,1,2
    python benchmarks/bench_active_learning.py --seeds 0 --budgets 25,50 \\
        --strategies variance_reduction       # quick screening (random is added)
    python benchmarks/bench_active_learning.py --crystals data/labelled/crystals.extxyz \\
        --strategies crystal --budgets 20,40,80 --start 9

Writes ``benchmarks/results/bench_active_learning.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from _common import RESULTS_DIR, machine_info, markdown_table, write_json
from ase import units
from bench_crystals import held_out_systems, molecule_count
from bench_learning_curve import DATASET, metrics

from deltaml import SparseGPR, delta_targets, read_labelled
from deltaml.active import crystal_score, select_batch

KJ_MOL = units.kJ / units.mol


def run(
    targets: list,
    pool: np.ndarray,
    validation: list,
    *,
    selection: str,
    seed: int,
    start: int,
    batch: int,
    budget: int,
    n_sparse: int,
    pool_size: int,
    noise: float,
) -> tuple[dict[int, float], dict[int, int]]:
    """Validation force MAE (eV/Å) and atoms labelled, keyed by the number of labels."""
    rng = np.random.default_rng(seed)
    # The start must hold every element of the pool: the model's descriptor is set
    # up for the training elements only (seed 2's first draw lacks N).
    elements = {int(z) for i in pool for z in targets[i].numbers}
    for _ in range(10_000):
        chosen = [int(i) for i in rng.choice(pool, size=start, replace=False)]
        if {int(z) for i in chosen for z in targets[i].numbers} == elements:
            break
    else:
        raise SystemExit(f"no {start} pool structures hold every element; raise --start")
    curve, atoms = {}, {}
    while True:
        model = SparseGPR(n_sparse=n_sparse, seed=seed, uncertainty="forces")
        model.fit([targets[i] for i in chosen])
        predicted = [(r.energy, r.forces) for r in (model.predict(a) for a in validation)]
        curve[len(chosen)] = metrics(predicted, validation)["force_mae"]
        atoms[len(chosen)] = int(sum(len(targets[i]) for i in chosen))
        if len(chosen) >= budget:
            return curve, atoms
        left = [i for i in pool if i not in set(chosen)]
        sigma = np.array(
            [np.max(model.predict(targets[i]).forces_uncertainty) for i in left]
            if selection == "uncertainty"
            else np.zeros(len(left))
        )
        picked = select_batch(
            model, [targets[i] for i in left], sigma, batch=min(batch, budget - len(chosen)),
            pool=pool_size, selection=selection, seed=seed + len(chosen),
            labelled=[targets[i] for i in chosen], noise=noise,
        )  # fmt: skip
        chosen += [int(left[i]) for i in picked]


def crystal_metrics(model: SparseGPR, validation: list, starts: list) -> dict[str, float]:
    """Lattice-energy (kJ/mol per molecule) and stress (GPa) MAE on held-out cells, and
    the MAE of relative energies per molecule between the starts of one composition."""

    e_err, s_err = [], []
    for atoms in validation:
        predicted = model.predict(atoms, forces=False, stress=True)
        e_err.append((predicted.energy - atoms.calc.results["energy"]) / molecule_count(atoms))
        s_err.append(predicted.stress - atoms.calc.results["stress"])
    groups: dict[str, list[float]] = {}
    for atoms in starts:
        error = model.predict(atoms, forces=False).energy - atoms.calc.results["energy"]
        groups.setdefault(atoms.get_chemical_formula(empirical=True), []).append(
            error / molecule_count(atoms)
        )
    relative = [abs(a - b) for g in groups.values() for i, a in enumerate(g) for b in g[i + 1 :]]
    return {
        "energy_mae_kj_mol": float(np.mean(np.abs(e_err))) / KJ_MOL,
        "stress_mae_gpa": float(np.mean(np.abs(s_err))) / units.GPa,
        "relative_mae_kj_mol": float(np.mean(relative)) / KJ_MOL if relative else float("nan"),
    }


def run_crystals(
    targets: list, pool: np.ndarray, validation: list, starts: list, *, selection: str,
    seed: int, start: int, batch: int, budget: int, pool_size: int, noise: float,
) -> tuple[dict[int, dict[str, float]], dict[int, int]]:  # fmt: skip
    """:func:`run` on periodic labels: metrics of :func:`crystal_metrics` per label count.

    The start holds one cell of every system (then random ones), so that each
    system's molecules and densities are known from the first fit.
    """
    rng = np.random.default_rng(seed)
    by_system: dict[str, list[int]] = {}
    for i in pool:
        by_system.setdefault(targets[i].info["system"], []).append(int(i))
    chosen = [int(rng.choice(members)) for members in by_system.values()]
    rest = [int(i) for i in pool if int(i) not in set(chosen)]
    chosen += [int(i) for i in rng.choice(rest, size=max(start - len(chosen), 0), replace=False)]
    curve, atoms = {}, {}
    while True:
        model = SparseGPR(seed=seed, uncertainty="energy")
        model.fit([targets[i] for i in chosen])
        curve[len(chosen)] = crystal_metrics(model, validation, starts)
        atoms[len(chosen)] = int(sum(len(targets[i]) for i in chosen))
        if len(chosen) >= budget:
            return curve, atoms
        left = [i for i in pool if i not in set(chosen)]
        frames = [targets[i] for i in left]
        sigma = None
        if selection == "crystal":
            sigma = np.array([crystal_score(model, a) for a in frames])
        picked = select_batch(
            model, frames, sigma, batch=min(batch, budget - len(chosen)), pool=pool_size,
            selection="uncertainty" if selection == "crystal" else selection,
            seed=seed + len(chosen), labelled=[targets[i] for i in chosen], noise=noise,
        )  # fmt: skip
        chosen += [int(left[i]) for i in picked]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--budgets", default="25,50,100")
    parser.add_argument("--start", type=int, default=5)
    parser.add_argument("--batch", type=int, default=5)
    parser.add_argument("--n-sparse", type=int, default=100)
    parser.add_argument("--pool", type=int, default=20, help="most uncertain kept for FPS")
    parser.add_argument(
        "--strategies",
        default="variance_reduction,uncertainty,random",
        help="comma-separated: variance_reduction, uncertainty, random (random is always run); "
        "crystal mode: crystal, variance_reduction, random",
    )
    parser.add_argument("--noise", type=float, default=0.1, help="variance_reduction noise")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "bench_active_learning.json")
    parser.add_argument(
        "--crystals", type=Path, default=None, help="crystal mode: periodic labels (extxyz)"
    )
    args = parser.parse_args()
    if args.crystals is not None:
        main_crystals(args)
        return
    budgets = [int(b) for b in args.budgets.split(",")]
    labelled = read_labelled(DATASET, check_magnitudes=False)
    targets, _ = delta_targets(labelled)
    order = np.random.default_rng(12345).permutation(len(targets))
    n_val = round(0.25 * len(targets))
    validation = [targets[i] for i in order[:n_val]]
    pool = np.sort(order[n_val:])
    strategies = [s for s in args.strategies.split(",") if s != "random"] + ["random"]
    curves: dict[str, list[dict[int, float]]] = {s: [] for s in strategies}
    counts: dict[str, list[dict[int, int]]] = {s: [] for s in strategies}
    start_time = time.perf_counter()
    for seed in [int(s) for s in args.seeds.split(",")]:
        for selection in strategies:
            curve, atoms = run(
                targets, pool, validation, selection=selection, seed=seed, start=args.start,
                batch=args.batch, budget=max(budgets), n_sparse=args.n_sparse,
                pool_size=args.pool, noise=args.noise,
            )  # fmt: skip
            curves[selection].append(curve)
            counts[selection].append(atoms)
            print(f"seed {seed} {selection}: " + ", ".join(
                f"{n}: {curve[n]:.4f}" for n in budgets if n in curve), flush=True)  # fmt: skip
    sizes = sorted(set.intersection(*(set(c) for runs in curves.values() for c in runs)))
    mean = {
        name: {n: float(np.mean([c[n] for c in runs])) for n in sizes}
        for name, runs in curves.items()
    }
    mean_atoms = {
        name: {n: float(np.mean([c[n] for c in runs])) for n in sizes}
        for name, runs in counts.items()
    }
    rows = [
        [n] + [f"{mean[s][n]:.4f} ({mean_atoms[s][n]:.0f})" for s in strategies]
        for n in sizes
        if n in budgets or n == args.start
    ]
    print("mean validation force MAE, eV/Å (mean atoms labelled):")
    print(markdown_table(["labels", *strategies], rows))
    goal = mean["random"][max(budgets)]
    reached = {s: next((n for n in sizes if mean[s][n] <= goal), None) for s in strategies}
    print(f"random selection at {max(budgets)} labels: {goal:.4f} eV/Å (target: reached with "
          f"at most {max(budgets) // 2} labels)")  # fmt: skip
    for s in strategies[:-1]:
        print(f"  {s} reaches it at {reached[s]} labels")
    write_json(
        args.out,
        {
            "machine": machine_info(),
            "settings": {**vars(args), "out": str(args.out)},
            "curves": {
                k: [{str(n): v for n, v in c.items()} for c in runs] for k, runs in curves.items()
            },
            "atoms_labelled": {
                k: [{str(n): v for n, v in c.items()} for c in runs] for k, runs in counts.items()
            },
            "mean_force_mae": {k: {str(n): v for n, v in m.items()} for k, m in mean.items()},
            "active_reaches_random_at": reached,
            "wall_time_s": time.perf_counter() - start_time,
        },
    )


def main_crystals(args: argparse.Namespace) -> None:
    """Crystal mode: active vs random on periodic labels (see the module docstring)."""
    budgets = [int(b) for b in args.budgets.split(",")]
    targets, _ = delta_targets(read_labelled(args.crystals, check_magnitudes=False))
    starts = [a for a in targets if a.info.get("source") == "start"]
    held = set(held_out_systems(targets, seed=12345))
    others = [i for i, a in enumerate(targets) if a.info.get("source") != "start"]
    validation = [targets[i] for i in others if targets[i].info["system"] in held]
    pool = np.array([i for i in others if targets[i].info["system"] not in held])
    print(f"held-out systems: {sorted(held)}")
    strategies = [s for s in args.strategies.split(",") if s != "random"] + ["random"]
    print(f"{len(targets)} periodic labels: {len(starts)} starts, {len(validation)} held out, "
          f"{len(pool)} in the pool")  # fmt: skip
    curves: dict[str, list[dict[int, dict[str, float]]]] = {s: [] for s in strategies}
    start_time = time.perf_counter()
    for seed in [int(s) for s in args.seeds.split(",")]:
        for selection in strategies:
            curve, _ = run_crystals(
                targets, pool, validation, starts, selection=selection, seed=seed,
                start=args.start, batch=args.batch, budget=max(budgets), pool_size=args.pool,
                noise=args.noise,
            )  # fmt: skip
            curves[selection].append(curve)
            print(f"seed {seed} {selection}: " + ", ".join(
                f"{n}: {curve[n]['energy_mae_kj_mol']:.2f}" for n in budgets if n in curve
            ), flush=True)  # fmt: skip
    sizes = sorted(set.intersection(*(set(c) for runs in curves.values() for c in runs)))
    keys = ("energy_mae_kj_mol", "relative_mae_kj_mol", "stress_mae_gpa")
    mean = {
        name: {n: {k: float(np.mean([c[n][k] for c in runs])) for k in keys} for n in sizes}
        for name, runs in curves.items()
    }
    rows = [
        [n] + [" / ".join(f"{mean[s][n][k]:.3g}" for k in keys) for s in strategies]
        for n in sizes
        if n in budgets
    ]
    print("mean held-out lattice energy MAE kJ/mol per molecule / relative-energy MAE kJ/mol / "
          "stress MAE GPa:")  # fmt: skip
    print(markdown_table(["labels", *strategies], rows))
    goal = mean["random"][max(budgets)]["energy_mae_kj_mol"]
    reached = {
        s: next((n for n in sizes if mean[s][n]["energy_mae_kj_mol"] <= goal), None)
        for s in strategies
    }
    print(f"random at {max(budgets)} labels: {goal:.3f} kJ/mol per molecule (target: reached "
          f"with at most {max(budgets) // 2} labels)")  # fmt: skip
    for s in strategies[:-1]:
        print(f"  {s} reaches it at {reached[s]} labels")
    write_json(
        args.out,
        {
            "machine": machine_info(),
            "settings": {**vars(args), "out": str(args.out), "crystals": str(args.crystals)},
            "curves": {
                k: [{str(n): v for n, v in c.items()} for c in runs] for k, runs in curves.items()
            },
            "mean": {k: {str(n): v for n, v in m.items()} for k, m in mean.items()},
            "active_reaches_random_at": reached,
            "wall_time_s": time.perf_counter() - start_time,
        },
    )


if __name__ == "__main__":
    main()
