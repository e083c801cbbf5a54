"""deltaml's SparseGPR side by side with QUIP/GAP's ``gap_fit`` on the same Δ targets.

Same held-out set, same nested training sets as ``bench_learning_curve.py`` (seeded),
same targets (reference − dispersion-free GFN2-xTB − D3), comparable SOAP settings
(cutoff 5 Å with a 0.5 Å transition, n_max 6, l_max 4, Gaussian width 0.3 Å,
dot-product kernel ζ = 2, 200 sparse points per element), the same noise
(σ_E = 0.001 eV/atom, σ_F = 0.02 eV/Å, per-atom energy sigma), the same prior δ
(deltaml's, from the training targets) and the same per-element offsets (deltaml's
least-squares values given to gap_fit as ``e0``). Sparse points: FPS in deltaml,
CUR in GAP (``cur_points``).

Measured in the same run for each N: energy and force MAE on the held-out set,
fit wall time, and prediction time per structure (energy + forces; GAP through
quippy's ASE calculator, deltaml through ``SparseGPR.predict`` without
uncertainty, which GAP does not compute here).

Needs ``quippy-ase`` (``pip install quippy-ase``, which brings ``gap_fit``); without
it the script says so and exits 0.

Usage::

    python benchmarks/bench_gap.py --sizes 10,25,50,100,200

Writes ``benchmarks/results/bench_gap.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import RESULTS_DIR, machine_info, markdown_table, write_json
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.data import chemical_symbols
from ase.io import write
from bench_learning_curve import DATASET, metrics

from deltaml import SparseGPR, delta_targets, read_labelled

SOAP = {"cutoff": 5.0, "smoothing": 0.5, "gaussian_width": 0.3, "n_max": 6, "l_max": 4}
ZETA, N_SPARSE, SIGMA_E, SIGMA_F = 2, 200, 0.001, 0.02


def gap_frame(atoms: Atoms) -> Atoms:
    """A copy gap_fit can read: a lattice line (40 Å, no periodicity), labels only."""
    frame = Atoms(atoms.numbers, atoms.positions, cell=[40.0] * 3, pbc=False)
    frame.calc = SinglePointCalculator(
        frame, energy=atoms.get_potential_energy(), forces=atoms.get_forces()
    )
    return frame


def gap_command(train_file: Path, model_file: Path, delta: float, offsets: dict[int, float]):
    e0 = ":".join(f"{chemical_symbols[z]}:{v:.10f}" for z, v in offsets.items())
    soap = (
        f"soap cutoff={SOAP['cutoff']} cutoff_transition_width={SOAP['smoothing']} "
        f"n_max={SOAP['n_max']} l_max={SOAP['l_max']} atom_sigma={SOAP['gaussian_width']} "
        f"zeta={ZETA} delta={delta:.8f} n_sparse={N_SPARSE} sparse_method=cur_points "
        "covariance_type=dot_product"
    )
    return [
        f"at_file={train_file}",
        f"gap={{{soap}}}",
        f"default_sigma={{{SIGMA_E} {SIGMA_F} 0.0 0.0}}",
        f"e0={{{e0}}}",
        "energy_parameter_name=energy",
        "force_parameter_name=forces",
        "sparse_jitter=1e-8",
        f"gp_file={model_file}",
        "rnd_seed=1",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10,25,50,100,200")
    parser.add_argument("--held-out", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "bench_gap.json")
    args = parser.parse_args()
    beside = Path(sys.executable).parent / "gap_fit"  # a venv that is not activated
    gap_fit = shutil.which("gap_fit") or (str(beside) if beside.exists() else None)
    if gap_fit is None:
        print("gap_fit not found: pip install quippy-ase to run this comparison (skipped)")
        return
    from quippy.potential import Potential

    labelled = read_labelled(DATASET, check_magnitudes=False)
    delta, terms = delta_targets(labelled)
    order = np.random.default_rng(args.seed).permutation(len(labelled))
    n_test = round(args.held_out * len(labelled))
    test = [delta[i] for i in np.sort(order[:n_test])]
    pool = order[n_test:]
    results, rows = [], []
    for n in [int(s) for s in args.sizes.split(",")]:
        train = [delta[i] for i in np.sort(pool[:n])]
        entry: dict[str, object] = {"n_train": n}
        ours = SparseGPR(
            descriptor=SOAP, n_sparse=N_SPARSE, zeta=ZETA, energy_sigma=SIGMA_E,
            force_sigma=SIGMA_F, uncertainty=None, seed=args.seed,
        )  # fmt: skip
        start = time.perf_counter()
        ours.fit(train, trained_with=terms)
        entry["deltaml_fit_s"] = time.perf_counter() - start
        start = time.perf_counter()
        predicted = [(r.energy, r.forces) for r in (ours.predict(a) for a in test)]
        entry["deltaml_predict_s_per_structure"] = (time.perf_counter() - start) / len(test)
        entry["deltaml"] = metrics(predicted, test)

        with tempfile.TemporaryDirectory() as tmp:
            train_file, model_file = Path(tmp) / "train.extxyz", Path(tmp) / "gap.xml"
            write(train_file, [gap_frame(a) for a in train], format="extxyz")
            command = [gap_fit, *gap_command(train_file, model_file, ours.delta_, ours.offsets_)]
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True, cwd=tmp)
            entry["gap_fit_s"] = time.perf_counter() - start
            potential = Potential(param_filename=str(model_file))
            start = time.perf_counter()
            predicted = []
            for atoms in test:
                probe = gap_frame(atoms)
                probe.calc = potential
                predicted.append((probe.get_potential_energy(), probe.get_forces()))
            entry["gap_predict_s_per_structure"] = (time.perf_counter() - start) / len(test)
            entry["gap"] = metrics(predicted, test)
        results.append(entry)
        for name in ("deltaml", "gap"):
            m = entry[name]
            rows.append(
                [n, name, f"{m['energy_mae_mev_per_atom']:.2f}", f"{m['force_mae']:.4f}",
                 f"{entry[name + '_fit_s']:.2f}",
                 f"{1000 * entry[name + '_predict_s_per_structure']:.1f}"]
            )  # fmt: skip
        print(f"N = {n} done", flush=True)
    print(
        markdown_table(
            ["N", "code", "E MAE (meV/atom)", "F MAE (eV/Å)", "fit (s)", "predict (ms/structure)"],
            rows,
        )
    )
    write_json(
        args.out,
        {
            "machine": machine_info(),
            "settings": {**vars(args), "out": str(args.out), "soap": SOAP, "zeta": ZETA},
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
