"""Cost of a candidate relaxation: GFN2-xTB baseline alone vs the composite, same run.

For each candidate crystal (CO2 phases I and III from ``data/crystals``, ice Ih
and Ic from GenIce2) and the gas-phase molecules, :func:`deltaml.rank_polymorphs`
relaxes positions and cell with

* ``baseline``: ``XTBBaseline(method="GFN2-xTB")`` (tblite, own D4), and
* ``composite``: dispersion-free GFN2-xTB + the Δ-model fitted on the shipped
  labels (energy uncertainty on) + D3(BJ),

counting every call to the calculator (force calls; with a cell filter one call
gives energy, forces and stress). Reported per relaxation: optimizer steps,
force calls, wall time, wall time per force call; and the composite/baseline
ratios. The two methods alternate candidate by candidate, so a change of machine
load hits both alike.

Usage::

    python benchmarks/bench_ranking.py                  # ~15 min on 2 cores
    python benchmarks/bench_ranking.py --candidates co2_pa3,ice:Ic --steps 30

Writes ``benchmarks/results/bench_ranking.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from _common import RESULTS_DIR, machine_info, markdown_table, write_json
from ase.build import molecule
from bench_learning_curve import DATASET

from deltaml import DeltaCalculator, SparseGPR, XTBBaseline, delta_targets, read_labelled
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--candidates", default="co2_pa3,co2_cmca,ice:Ih,ice:Ic")
    parser.add_argument("--fmax", type=float, default=0.05, help="eV/Å")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "bench_ranking.json")
    args = parser.parse_args()

    targets, terms = delta_targets(read_labelled(DATASET, check_magnitudes=False))
    model = SparseGPR(seed=args.seed, uncertainty="energy").fit(targets, trained_with=terms)

    rows, records = [], []
    start_all = time.perf_counter()
    for source in args.candidates.split(","):
        path = source if source.startswith("ice:") else CRYSTALS / f"{source}.extxyz"
        candidates = read_candidates([path], seed=args.seed)
        gas = molecule("H2O") if source.startswith("ice:") else molecule("CO2")
        name = next(iter(candidates))
        result = {"candidate": name, "atoms": len(candidates[name])}
        for method, make in (
            ("baseline", lambda: XTBBaseline(method="GFN2-xTB")),
            ("composite", lambda: DeltaCalculator.from_model(model)),
        ):
            counted = Counted(make)
            start = time.perf_counter()
            ranking = rank_polymorphs(
                candidates, [gas], {method: counted}, fmax=args.fmax, steps=args.steps
            )
            wall = time.perf_counter() - start
            crystal = ranking.results[method][name].summary
            # calls[0] is the crystal's relaxation; the rest are the gas molecule and the
            # covariance probe (a calculator made, never called).
            result[method] = {
                "steps": crystal["steps"],
                "converged": crystal["converged"],
                "force_calls": counted.calls[0],
                "wall_s": crystal["wall_time_s"],
                "wall_per_call_s": crystal["wall_time_s"] / max(counted.calls[0], 1),
                "total_wall_s_with_gas": wall,
                "lattice_energy_kj_mol": ranking.lattice_energies(method)[name],
            }
            print(f"{name} {method}: {result[method]}", flush=True)
        base, comp = result["baseline"], result["composite"]
        result["ratio_wall"] = comp["wall_s"] / base["wall_s"]
        result["ratio_per_call"] = comp["wall_per_call_s"] / base["wall_per_call_s"]
        records.append(result)
        rows.append(
            [
                name, result["atoms"], base["steps"], base["force_calls"], f"{base['wall_s']:.1f}",
                f"{base['wall_per_call_s']:.2f}", comp["steps"], comp["force_calls"],
                f"{comp['wall_s']:.1f}", f"{comp['wall_per_call_s']:.2f}",
                f"{result['ratio_wall']:.2f}", f"{result['ratio_per_call']:.2f}",
            ]
        )  # fmt: skip
    header = [
        "candidate", "atoms", "base steps", "base calls", "base wall (s)", "base s/call",
        "comp steps", "comp calls", "comp wall (s)", "comp s/call", "wall ratio",
        "per-call ratio",
    ]  # fmt: skip
    print(markdown_table(header, rows))
    ratios = [r["ratio_per_call"] for r in records]
    print(f"composite/baseline cost per force call: median {np.median(ratios):.2f}")
    write_json(
        args.out,
        {
            "machine": machine_info(),
            "settings": {**vars(args), "out": str(args.out)},
            "results": records,
            "median_ratio_per_call": float(np.median(ratios)),
            "wall_time_s": time.perf_counter() - start_all,
        },
    )


if __name__ == "__main__":
    main()
