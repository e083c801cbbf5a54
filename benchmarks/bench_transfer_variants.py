"""Interaction-energy MAE of SparseGPR variants on bench_transfer's family folds (no σ).

A quicker companion of ``bench_transfer.py`` for choosing the intermolecular part's
settings: the same folds (families dealt with ``--seed``), the same held-out
systems of seen families, but every variant is fitted on *all* of a fold's
training structures (no calibration systems held out) and only the MAE of
interaction energies (kcal/mol, against revPBE0-D3(BJ)) is reported, pooled over
the folds, next to the terms alone, and each variant's difference from the first
with a 95 % bootstrap interval over systems (paired: same complexes).

``--contacts``: the crystal contacts (``data/labelled/crystal_contacts.extxyz``,
dimers cut from ice, CO2, urea and oxalic-acid crystals) join the training set of
every fold, except those of an unseen family, as in the shipped ranking model.
``--fractions 0.25,0.5,1``: a learning curve pooled over the folds; each variant
is fitted on nested, seeded subsets of a fold's training interaction systems (the
loose structures and contacts always all), named ``variant@fraction``.

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
    parser.add_argument("--contacts", action="store_true", help="train on the crystal contacts too")
    parser.add_argument("--fractions", default="1", help="shares of the training systems")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "bench_transfer_variants.json")
    args = parser.parse_args()
    fractions = [float(f) for f in args.fractions.split(",")]
    variants = {
        name if fractions == [1.0] else f"{name}@{f:g}": (keywords, f)
        for name, keywords in json.loads(args.variants).items()
        for f in fractions
    }

    base_targets, terms = delta_targets(read_labelled(bt.DATA / "water_chno.extxyz"))
    targets, _ = delta_targets(read_labelled(bt.DATA / "interactions.extxyz"))
    contacts = []
    if args.contacts:
        contacts, _ = delta_targets(read_labelled(bt.DATA / "crystal_contacts.extxyz"))
    groups = interaction_groups(targets)
    systems = bt.systems_of(targets)
    family_of = bt.molecule_families(targets)
    system_family = {name: targets[idx[0]].info["family"] for name, idx in systems.items()}
    rng = np.random.default_rng(args.seed)  # drawn in bench_transfer's order
    folds = bt.deal_families(system_family, args.folds, rng)

    # Per held-out complex: its system, the reference, the terms and every variant.
    rows: dict[str, list[dict]] = {"seen": [], "unseen": []}
    report: dict = {"machine": machine_info(), "variants": variants, "contacts": args.contacts}
    report["fractions"] = fractions
    report["per_fit"] = []
    for k, unseen in enumerate(folds):
        held, trained = bt.fold_split(unseen, system_family, args.seen_test, rng)
        loose = [a for a in base_targets if not bt.holds_family(a, unseen, family_of)]
        loose += [a for a in contacts if not set(a.info["families"].split(",")) & unseen]
        order = [trained[i] for i in np.random.default_rng(args.seed + k).permutation(len(trained))]
        parts = bt.held_out(groups, targets, unseen, held)
        fold_rows = {part: [] for part in parts}
        for name, (keywords, fraction) in variants.items():
            start = time.perf_counter()
            chosen = order[: round(fraction * len(order))]
            train = loose + [targets[i] for s in chosen for i in systems[s]]
            model = SparseGPR(**keywords, uncertainty="energy", seed=args.seed)
            model.fit(train, trained_with=terms)
            for part, picked in parts.items():
                found = interaction_energies(model, targets, picked)
                if not fold_rows[part]:
                    fold_rows[part] = [
                        {
                            "system": targets[g[0]].info["system"],
                            "reference": r["reference"],
                            "terms": r["terms"],
                        }
                        for g, r in zip(picked, found, strict=True)
                    ]
                for row, r in zip(fold_rows[part], found, strict=True):
                    row[name] = r["composite"]
            seconds = time.perf_counter() - start
            print(f"fold {k} {name}: {seconds:.0f} s ({len(train)} training structures)")
            report["per_fit"].append({"fold": k, "variant": name, "seconds": seconds})
        for part in rows:
            rows[part] += fold_rows[part]
        report["mae"] = mae_table(rows, ["terms", *variants], args.seed)
        report["rows"] = rows
        write_json(args.out, report)
        print(f"after fold {k}:")
        for name, entry in report["mae"].items():
            print(f"  {name}: {entry}")


def mae_table(rows: dict[str, list[dict]], methods: list[str], seed: int) -> dict:
    """MAE (kcal/mol) of every method on each part, and its difference from the
    first variant (``methods[1]``) with a bootstrap 95 % interval over systems."""
    out: dict = {}
    first = methods[1]
    for method in methods:
        out[method] = {}
        for part, picked in rows.items():
            if not picked:
                continue
            errors = [abs(r[method] - r["reference"]) for r in picked]
            entry = {"mae": round(float(np.mean(errors)), 3)}
            if method != first:
                diff = bt.bootstrap_difference(picked, method, first, seed)
                entry[f"- {first}"] = {key: round(v, 3) for key, v in diff.items()}
            out[method][part] = entry
    return out


if __name__ == "__main__":
    main()
