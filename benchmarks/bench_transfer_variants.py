"""Interaction-energy MAE of SparseGPR variants on bench_transfer's family folds (no σ).

A quicker companion of ``bench_transfer.py`` for choosing the intermolecular part's
settings: the same folds (families dealt with ``--seed``), the same held-out
systems of seen families, but every variant is fitted on *all* of a fold's
training structures (no calibration systems held out) and only the MAE of
interaction energies (kcal/mol, against revPBE0-D3(BJ)) is reported, pooled over
the folds, next to the terms alone.

Usage::

    python benchmarks/bench_transfer_variants.py \\
        '{"default": {}, "sparse50": {"inter_n_sparse": 50}, "delta0.1": {"inter_delta": 0.1}}'

Each variant is a dict of ``SparseGPR`` keywords. Writes
``benchmarks/results/bench_transfer_variants.json`` (``--out`` to change) after
every fit, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import bench_transfer as bt
import numpy as np
from _common import RESULTS_DIR, machine_info, write_json

from deltaml import SparseGPR, delta_targets, read_labelled
from deltaml.dataset import interaction_groups
from deltaml.evaluation import interaction_energies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("variants", help="JSON: name -> SparseGPR keywords")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--seen-test", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "bench_transfer_variants.json")
    args = parser.parse_args()
    variants = json.loads(args.variants)

    base_targets, terms = delta_targets(read_labelled(bt.DATA / "water_chno.extxyz"))
    targets, _ = delta_targets(read_labelled(bt.DATA / "interactions.extxyz"))
    groups = interaction_groups(targets)
    systems = bt.systems_of(targets)
    family_of = bt.molecule_families(targets)
    system_family = {name: targets[idx[0]].info["family"] for name, idx in systems.items()}
    rng = np.random.default_rng(args.seed)  # drawn in bench_transfer's order
    folds = bt.deal_families(system_family, args.folds, rng)

    errors = {name: {"seen": [], "unseen": []} for name in variants}
    report: dict = {"machine": machine_info(), "variants": variants, "per_fit": []}
    for k, unseen in enumerate(folds):
        seen_systems = sorted(s for s, f in system_family.items() if f not in unseen)
        size = round(args.seen_test * len(seen_systems))
        held = set(rng.choice(seen_systems, size=size, replace=False))
        train = [a for a in base_targets if not bt.holds_family(a, unseen, family_of)]
        train += [targets[i] for s in seen_systems if s not in held for i in systems[s]]
        parts = bt.held_out(groups, targets, unseen, held)
        for name, keywords in variants.items():
            start = time.perf_counter()
            model = SparseGPR(**keywords, uncertainty="energy", seed=args.seed)
            model.fit(train, trained_with=terms)
            for part, picked in parts.items():
                for row in interaction_energies(model, targets, picked):
                    errors[name][part].append(
                        (row["composite"] - row["reference"], row["terms"] - row["reference"])
                    )
            seconds = time.perf_counter() - start
            mae = {
                part: np.abs(np.array(pairs)).mean(axis=0).round(3).tolist()
                for part, pairs in errors[name].items()
            }
            print(f"fold {k} {name}: {seconds:.0f} s; pooled MAE so far (model, terms) {mae}")
            report["per_fit"].append({"fold": k, "variant": name, "seconds": seconds})
            report["mae"] = {
                n: {p: np.abs(np.array(v)).mean(axis=0).tolist() for p, v in e.items() if v}
                for n, e in errors.items()
            }
            write_json(args.out, report)


if __name__ == "__main__":
    main()
