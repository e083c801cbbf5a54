"""Cost of one composite call: the atomic and the molecular model, before and after the
prediction-path changes of 2026-12-02, in one run.

Two changes to :meth:`deltaml.SparseGPR.predict` are measured against the code
before them, emulated in the same process:

* **one BLAS thread** during a prediction (before: OpenBLAS's default, one thread
  per core, whose threads spin after each call on the cores that tblite's
  OpenMP threads need next);
* **forces through the spherical expansion from 4 atoms** (``PULLBACK_ATOMS``;
  before: from 16, so dimers and small clusters took the power spectrum's own
  gradients, which for the molecular model's pairwise rows means two featomic
  calls).

Both models are fitted on the same seeded share of the shipped labels
(``water_chno`` + the interaction set; ``--every`` k: every k-th structure, since
the cost of a prediction follows the sparse points, not the training set), with
the energy uncertainty (the composite's default). Each composite call is energy +
forces (+ stress for cells) on a copy moved by 0.001 Å, so nothing is cached;
each calculator makes ``--repeats`` calls in a row per structure after one
warm-up call (taking turns call by call would charge one variant's spinning BLAS
threads to the next); the median is reported. Also timed: the terms alone (zero
correction).

Usage::

    python benchmarks/bench_call_cost.py              # ~3 min on two idle cores
    python benchmarks/bench_call_cost.py --every 1    # fit on all the labels

Writes ``benchmarks/results/bench_call_cost.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from _common import RESULTS_DIR, machine_info, markdown_table, write_json
from ase import Atoms
from ase.io import read

import deltaml.model as model_module
from deltaml import DeltaCalculator, SparseGPR, ZeroCorrection, delta_targets, read_labelled
from deltaml.dataset import interaction_groups

ROOT = Path(__file__).resolve().parent.parent
LABELLED = ROOT / "data" / "labelled"
#: The prediction path before 2026-12-02.
BEFORE_PULLBACK_ATOMS = 16


def probes(targets: list[Atoms], interactions: list[Atoms]) -> dict[str, Atoms]:
    """The structures timed: two dimers, water clusters of 3 and 6, an ice cell."""
    complexes = [interactions[g[0]] for g in interaction_groups(interactions)]
    by_formula = {a.get_chemical_formula(): a for a in reversed(targets) if not a.pbc.any()}
    out = {
        "dimer, 6 atoms": next(a for a in complexes if len(a) == 6),
        "dimer, 12 atoms": next(a for a in complexes if len(a) == 12),
        "water trimer, 9 atoms": by_formula["H6O3"],
        "water hexamer, 18 atoms": by_formula["H12O6"],
        "ice Ih cell, 48 atoms": read(ROOT / "data" / "structures" / "crystal_starts.extxyz", 0),
    }
    return {name: Atoms(a.numbers, a.positions, cell=a.cell, pbc=a.pbc) for name, a in out.items()}


@contextlib.contextmanager
def before_changes() -> Iterator[None]:
    """The prediction path as it was: BLAS threads free, expansion from 16 atoms."""
    saved = (model_module.PULLBACK_ATOMS, model_module._one_blas_thread)
    model_module.PULLBACK_ATOMS = BEFORE_PULLBACK_ATOMS
    model_module._one_blas_thread = contextlib.nullcontext
    try:
        yield
    finally:
        model_module.PULLBACK_ATOMS, model_module._one_blas_thread = saved


def one_call(calc: DeltaCalculator, atoms: Atoms, rng: np.random.Generator) -> float:
    """Seconds of energy + forces (+ stress of a cell) on a slightly moved copy."""
    probe = atoms.copy()
    probe.positions += rng.normal(scale=1e-3, size=probe.positions.shape)
    probe.calc = calc
    start = time.perf_counter()
    probe.get_forces()
    if probe.pbc.all():
        probe.get_stress()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--every", type=int, default=3, help="fit on every k-th structure")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "bench_call_cost.json")
    args = parser.parse_args()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the small files' units check
        targets, terms = delta_targets(read_labelled(LABELLED / "water_chno.extxyz"))
        interactions, _ = delta_targets(read_labelled(LABELLED / "interactions.extxyz"))
    train = (targets + interactions)[:: args.every]
    calcs = {"terms": DeltaCalculator(correction=ZeroCorrection(), dispersion="d3bj:revpbe0")}
    fit_seconds = {}
    for decomposition in ("atomic", "molecular"):
        start = time.perf_counter()
        model = SparseGPR(decomposition=decomposition, uncertainty="energy", seed=args.seed)
        model.fit(train, trained_with=terms)
        fit_seconds[decomposition] = time.perf_counter() - start
        calcs[decomposition] = DeltaCalculator.from_model(model)
    print(f"fitted on {len(train)} structures: {fit_seconds}")

    rng = np.random.default_rng(args.seed)
    variants = [("terms", "terms", False)] + [
        (f"{d}, {when}", d, when == "before") for d in ("atomic", "molecular")
        for when in ("before", "after")
    ]  # fmt: skip
    structures = probes(targets, interactions)
    seconds: dict[str, dict[str, list[float]]] = {
        s: {v[0]: [] for v in variants} for s in structures
    }
    for name, atoms in structures.items():
        for label, calc_name, before in variants:
            with before_changes() if before else contextlib.nullcontext():
                for repeat in range(args.repeats + 1):
                    spent = one_call(calcs[calc_name], atoms, rng)
                    if repeat:  # the first call of a block is the warm-up
                        seconds[name][label].append(spent)
        print(f"{name}: done", flush=True)

    ms = {s: {v: 1000 * float(np.median(t)) for v, t in by.items()} for s, by in seconds.items()}
    header = ["structure", *(v[0] for v in variants), "molecular / atomic after",
              "molecular after / atomic before"]  # fmt: skip
    rows = [
        [
            s,
            *(f"{m[v[0]]:.1f}" for v in variants),
            f"{m['molecular, after'] / m['atomic, after']:.2f}",
            f"{m['molecular, after'] / m['atomic, before']:.2f}",
        ]
        for s, m in ms.items()
    ]
    print("\nmedian ms per composite call (energy + forces; + stress for the cell)\n")
    print(markdown_table(header, rows))
    write_json(
        args.out,
        {
            "machine": machine_info(),
            "settings": vars(args) | {"out": str(args.out), "n_train": len(train)},
            "load_average": os.getloadavg(),
            "fit_seconds": fit_seconds,
            "median_ms": ms,
            "seconds": seconds,
        },
    )


if __name__ == "__main__":
    main()
