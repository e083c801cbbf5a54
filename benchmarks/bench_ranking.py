"""Cost of relaxing candidates: GFN2-xTB baseline alone vs the composite, optimizers side by side.

For each candidate crystal (default: CO2 phases I and III from ``data/crystals``,
ice Ih and Ic from GenIce2; ``--candidates ice`` for the seven phases of
``deltaml.crystals.ICE_PHASES``) and the gas-phase molecule,
:func:`deltaml.rank_polymorphs` relaxes positions and cell with

* ``baseline``: ``XTBBaseline(method="GFN2-xTB")`` (tblite, own D4), and
* ``composite``: dispersion-free GFN2-xTB + the Δ-model (``--model``, or fitted
  on the shipped labels of ``--fit-on``: ``crystals``, the periodic CP2K labels
  with the crystal loop's settings, the default; ``interactions``, the molecular
  PySCF set; energy uncertainty on) + D3(BJ) of the model's reference,

once per optimizer of ``--optimizers`` (default ``BFGS,PreconLBFGS``: the
optimizer of earlier releases and the default now), counting every call to the
calculator (with a cell filter one call gives energy, forces and stress).
Reported per relaxation: optimizer steps, calls, wall time, wall time per call,
the lattice energy; per candidate the composite/baseline ratios; in all, the
wall time of each optimizer over every relaxation (what ranking those
candidates with both methods costs). Methods and optimizers alternate
relaxation by relaxation, so a change of machine load hits all alike; the load
average is recorded before and after.

Usage::

    python benchmarks/bench_ranking.py                  # CO2 I, III, ice Ih, Ic
    python benchmarks/bench_ranking.py --candidates co2_pa3,ice:Ic --steps 30
    python benchmarks/bench_ranking.py --candidates ice --steps 150 --optimizers PreconLBFGS
    python benchmarks/bench_ranking.py --candidates ice --model out/ice/model.npz
    python benchmarks/bench_ranking.py --candidates ice:Ih --methods baseline --optimizers BFGS

Writes ``benchmarks/results/bench_ranking.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
from _common import RESULTS_DIR, machine_info, markdown_table, write_json
from ase.build import molecule
from bench_crystals import DATA as CRYSTAL_LABELS
from bench_crystals import MODEL as CRYSTAL_MODEL
from bench_learning_curve import DATASET

from deltaml import DeltaCalculator, SparseGPR, XTBBaseline, delta_targets, read_labelled
from deltaml.crystals import ICE_PHASES
from deltaml.ranking import rank_polymorphs, read_candidates

CRYSTALS = Path(__file__).resolve().parent.parent / "data" / "crystals"


class Counted:
    """Calculator factory that counts the calls to ``calculate`` of what it makes."""

    def __init__(self, make) -> None:
        self.make = make
        self.calls: list[int] = []

    def __call__(self):
        calc = self.make()
        self.calls.append(0)
        index = len(self.calls) - 1
        inner = calc.calculate

        def calculate(*args, **kwargs):
            self.calls[index] += 1
            return inner(*args, **kwargs)

        calc.calculate = calculate
        return calc


def candidate_sources(text: str) -> list[str]:
    """``ice`` → every phase of ICE_PHASES; otherwise the comma-separated names."""
    return [f"ice:{p}" for p in ICE_PHASES] if text == "ice" else text.split(",")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--candidates", default="co2_pa3,co2_cmca,ice:Ih,ice:Ic")
    parser.add_argument("--methods", default="baseline,composite")
    parser.add_argument("--optimizers", default="BFGS,PreconLBFGS")
    parser.add_argument("--fmax", type=float, default=0.05, help="eV/Å")
    parser.add_argument("--stress-tol", type=float, default=0.05, help="GPa")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--model", type=Path, default=None, help="model.npz (default: fit)")
    parser.add_argument("--fit-on", choices=("crystals", "interactions"), default="crystals",
                        help="shipped labels the model is fitted on without --model")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "bench_ranking.json")
    args = parser.parse_args()
    methods = args.methods.split(",")
    optimizers = args.optimizers.split(",")
    load_before = os.getloadavg()

    model = None
    if "composite" in methods:
        if args.model is not None:
            model = SparseGPR.load(args.model)
            model.uncertainty = "energy"
        else:
            labels = CRYSTAL_LABELS if args.fit_on == "crystals" else DATASET
            params = CRYSTAL_MODEL if args.fit_on == "crystals" else {"uncertainty": "energy"}
            targets, terms = delta_targets(read_labelled(labels, check_magnitudes=False))
            model = SparseGPR(seed=args.seed, **params)
            model.fit(targets, trained_with=terms)
    makers = {
        "baseline": lambda: XTBBaseline(method="GFN2-xTB"),
        "composite": lambda: DeltaCalculator.from_model(model),
    }

    rows, records = [], []
    totals = {(m, o): 0.0 for m in methods for o in optimizers}
    start_all = time.perf_counter()
    for source in candidate_sources(args.candidates):
        path = source if source.startswith("ice:") else CRYSTALS / f"{source}.extxyz"
        candidates = read_candidates([path], seed=args.seed)
        gas = molecule("H2O") if source.startswith("ice:") else molecule("CO2")
        name = next(iter(candidates))
        result = {"candidate": name, "atoms": len(candidates[name])}
        for method in methods:
            for optimizer in optimizers:
                counted = Counted(makers[method])
                start = time.perf_counter()
                ranking = rank_polymorphs(
                    candidates, [gas], {method: counted}, fmax=args.fmax, steps=args.steps,
                    stress_tol_gpa=args.stress_tol, optimizer=optimizer,
                )  # fmt: skip
                wall = time.perf_counter() - start
                totals[method, optimizer] += wall
                crystal = ranking.results[method][name].summary
                # One calculator per relaxation (and one for the method record, one for
                # the covariance probe, never called): the crystal's made the most calls.
                calls = max(counted.calls)
                record = {
                    "steps": crystal["steps"],
                    "converged": crystal["converged"],
                    "force_calls": calls,
                    "wall_s": crystal["wall_time_s"],
                    "wall_per_call_s": crystal["wall_time_s"] / max(calls, 1),
                    "total_wall_s_with_gas": wall,
                    "lattice_energy_kj_mol": ranking.lattice_energies(method).get(name),
                    "volume_a3": float(ranking.results[method][name].final.get_volume()),
                    "max_stress_gpa": crystal.get("max_stress_gpa"),
                    "fallback": crystal.get("fallback"),
                    "failed": crystal.get("failed"),
                }
                result[f"{method}/{optimizer}"] = record
                print(f"{name} {method} {optimizer}: {record}", flush=True)
                e_latt = record["lattice_energy_kj_mol"]
                rows.append(
                    [
                        name, result["atoms"], method, optimizer, record["steps"],
                        record["force_calls"], f"{record['wall_s']:.1f}",
                        f"{record['wall_per_call_s']:.2f}",
                        "failed" if e_latt is None else f"{e_latt:.2f}",
                        f"{record['volume_a3']:.1f}",
                    ]
                )  # fmt: skip
        if {"baseline", "composite"} <= set(methods):
            for optimizer in optimizers:
                base, comp = result[f"baseline/{optimizer}"], result[f"composite/{optimizer}"]
                result[f"ratio_per_call/{optimizer}"] = (
                    comp["wall_per_call_s"] / base["wall_per_call_s"]
                )
        records.append(result)
    header = [
        "candidate", "atoms", "method", "optimizer", "steps", "calls", "wall (s)", "s/call",
        "E_latt (kJ/mol)", "V (Å³)",
    ]  # fmt: skip
    print(markdown_table(header, rows))
    summary = {
        "wall_s_by_method_optimizer": {f"{m}/{o}": t for (m, o), t in totals.items()},
        "wall_s_by_optimizer": {
            o: sum(t for (_, oo), t in totals.items() if oo == o) for o in optimizers
        },
    }
    for optimizer, total in summary["wall_s_by_optimizer"].items():
        print(f"{optimizer}: {total:.0f} s for every relaxation of {args.candidates} ({methods})")
    ratio_keys = [k for r in records for k in r if k.startswith("ratio_per_call/")]
    for key in sorted(set(ratio_keys)):
        ratios = [r[key] for r in records if key in r]
        summary[f"median_{key}"] = float(np.median(ratios))
        optimizer = key.split("/")[1]
        print(f"composite/baseline cost per call ({optimizer}): median {np.median(ratios):.2f}")
    load_after = os.getloadavg()
    print(f"load average before {load_before}, after {load_after}")
    write_json(
        args.out,
        {
            "machine": machine_info(),
            "settings": {**vars(args), "out": str(args.out), "model": str(args.model)},
            "load_average_before": load_before,
            "load_average_after": load_after,
            "results": records,
            **summary,
            "wall_time_s": time.perf_counter() - start_all,
        },
    )


if __name__ == "__main__":
    main()
