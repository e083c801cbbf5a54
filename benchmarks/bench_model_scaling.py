"""Fit time and peak memory vs training-set size; prediction time vs structure size.

Fit: training sets of N structures with energies and forces (N = 100, 300, 1000,
3000 by default) made by repeating the shipped dataset's Δ targets on copies
rattled by 0.01 Å (the labels need not be consistent to time a fit). Each fit
runs in a fresh process that reports its own peak resident memory, so the
numbers do not include earlier fits. Observations = energies + 3 × atoms; the
design matrix is observations × sparse points (n_sparse per element), which is
what the memory should follow.

Prediction: periodic water boxes of 24 to 1536 atoms (1 g/cm³), energy + forces
+ stress of the correction, with the force uncertainty (default), the energy
uncertainty only, and none; the baseline (GFN2-xTB, own D4 removed) is timed on
the same boxes in the same run for the ratio.

Usage::

    python benchmarks/bench_model_scaling.py                    # N up to 3000
    python benchmarks/bench_model_scaling.py --sizes 100,300 --boxes 24,96

Writes ``benchmarks/results/bench_model_scaling.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _common import RESULTS_DIR, machine_info, markdown_table, write_json
from ase import Atoms
from ase.build import molecule

DATASET = Path(__file__).resolve().parent.parent / "data" / "labelled" / "water_chno.extxyz"

_CHILD = """
import json, resource, sys, time
import numpy as np
from ase.calculators.singlepoint import SinglePointCalculator
from deltaml import SparseGPR, delta_targets, read_labelled

n, n_sparse, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
targets, terms = delta_targets(read_labelled(path, check_magnitudes=False))
rng = np.random.default_rng(0)
frames = []
while len(frames) < n:
    for atoms in targets:
        if len(frames) == n:
            break
        copy = atoms.copy()
        copy.positions += rng.normal(scale=0.01, size=copy.positions.shape)
        copy.calc = SinglePointCalculator(copy, **atoms.calc.results)
        frames.append(copy)
start = time.perf_counter()
model = SparseGPR(n_sparse=n_sparse).fit(frames, trained_with=terms)
elapsed = time.perf_counter() - start
print(json.dumps({
    "n_train": n,
    "observations": int(sum(1 + 3 * len(a) for a in frames)),
    "sparse_points": int(len(model.sparse_values_)),
    "fit_time_s": elapsed,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
}))
"""


def water_box(n_molecules: int, seed: int = 0) -> Atoms:
    """Periodic box of randomly oriented waters on a grid at about 1 g/cm³."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil(n_molecules ** (1 / 3)))
    length = (n_molecules * 29.9) ** (1 / 3)  # Å³ per molecule at 1 g/cm³
    spacing = length / side
    box = Atoms(cell=[length] * 3, pbc=True)
    for k in range(n_molecules):
        i, j, m = np.unravel_index(k, (side, side, side))
        water = molecule("H2O")
        water.rotate(rng.uniform(0, 360), rng.normal(size=3))
        water.translate((np.array([i, j, m]) + 0.5) * spacing)
        box += water
    return box


def fit_scaling(sizes: list[int], n_sparse: int) -> list[dict]:
    rows = []
    for n in sizes:
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, str(n), str(n_sparse), str(DATASET)],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"fit N = {n}: {rows[-1]['fit_time_s']:.1f} s", flush=True)
    return rows


def predict_scaling(boxes: list[int], n_sparse: int, repeats: int) -> list[dict]:
    from deltaml import SparseGPR, XTBBaseline, delta_targets, read_labelled

    targets, terms = delta_targets(read_labelled(DATASET, check_magnitudes=False))
    model = SparseGPR(n_sparse=n_sparse).fit(targets, trained_with=terms)
    rows = []
    for n_atoms in boxes:
        box = water_box(n_atoms // 3)
        row = {"n_atoms": len(box)}
        for mode in ("forces", "energy", None):
            model.set_params(uncertainty=mode)
            model.predict(box, forces=True, stress=True)  # warm-up
            start = time.perf_counter()
            for _ in range(repeats):
                model.predict(box, forces=True, stress=True)
            row[f"correction_uncertainty_{mode}_s"] = (time.perf_counter() - start) / repeats
        baseline = XTBBaseline(remove_dispersion=True)
        box.calc = baseline
        box.get_forces()
        start = time.perf_counter()
        for _ in range(repeats):
            box.positions[0, 0] += 1e-4  # a new geometry: no cached result
            box.get_forces()
            box.get_stress()
        row["baseline_s"] = (time.perf_counter() - start) / repeats
        rows.append(row)
        print(f"predict {len(box)} atoms done", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100,300,1000,3000")
    parser.add_argument("--boxes", default="24,96,384,1536")
    parser.add_argument("--n-sparse", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "bench_model_scaling.json")
    args = parser.parse_args()
    fits = fit_scaling([int(n) for n in args.sizes.split(",")], args.n_sparse)
    print(
        markdown_table(
            ["N", "observations", "sparse points", "fit (s)", "peak RSS (MB)"],
            [
                [r["n_train"], r["observations"], r["sparse_points"], f"{r['fit_time_s']:.1f}",
                 f"{r['peak_rss_mb']:.0f}"]
                for r in fits
            ],
        )
    )  # fmt: skip
    predictions = predict_scaling(
        [int(n) for n in args.boxes.split(",")], args.n_sparse, args.repeats
    )
    print(
        markdown_table(
            ["atoms", "correction + force σ (s)", "+ energy σ (s)", "no σ (s)", "baseline (s)",
             "correction/baseline (no σ)"],
            [
                [r["n_atoms"], f"{r['correction_uncertainty_forces_s']:.3f}",
                 f"{r['correction_uncertainty_energy_s']:.3f}",
                 f"{r['correction_uncertainty_None_s']:.3f}", f"{r['baseline_s']:.3f}",
                 f"{r['correction_uncertainty_None_s'] / r['baseline_s']:.2f}"]
                for r in predictions
            ],
        )
    )  # fmt: skip
    write_json(
        args.out,
        {
            "machine": machine_info(),
            "settings": {**vars(args), "out": str(args.out)},
            "fit": fits,
            "predict": predictions,
        },
    )


if __name__ == "__main__":
    main()
