"""Time energy + forces of each physical term and of the composite on water boxes.

For every water system (periodic boxes of about 10, 100, 300 and 1000 atoms at
1 g/cm³, and non-periodic clusters of 9, 18 and 99 atoms) five calculators are
timed on the same geometries:

* ``baseline``: :class:`~deltaml.XTBBaseline`, GFN2-xTB through tblite with its
  own D4 removed (``remove_dispersion=True``), default ``min_cell_width=7`` Å;
* ``dispersion``: :class:`~deltaml.D3Dispersion`, the D3 term the model was
  fitted with (D3(BJ), revPBE0 parameters for the shipped data);
* ``correction``: a fitted :class:`~deltaml.SparseGPR` (its ``predict``, energy
  and forces with the energy uncertainty: what the composite asks by default);
* ``correction_sigma_f``: the same with the per-atom force uncertainty, what an
  ``uncertainty_threshold``, active learning or a stability run ask for;
* ``composite``: :class:`~deltaml.DeltaCalculator` from the fitted model, which
  owns its own baseline and dispersion calculators.

The model is fitted once (``SparseGPR(seed=0)``, molecular decomposition, H, C,
N, O) on the shipped ``data/labelled/water_chno.extxyz`` and kept in
``benchmarks/results/bench_terms_model.npz`` (``--model`` to give another).
After the timings, one more call of each correction term runs under
``tracemalloc`` for its peak memory (numpy reports its arrays to it).
Systems above ``--baseline-max-atoms`` (default 400) time the learned and
dispersion terms only: a 999-atom periodic GFN2 call takes ~150 s on 2 cores.

Each calculator is built fresh for each system. The first call (``cold``) includes
building the engine (tblite calculator, D3 model, supercell); the next ``repeats``
calls (``warm``) move every atom by a small random displacement (0.01 Å standard
deviation), so only positions change and the engine is updated in place (tblite
also restarts its SCF from the previous density). The calculators take turns
on each geometry, so a change of machine load between calls affects them alike;
the 1-minute load average before and after each system is recorded, because on a
shared 2-core machine another process makes OpenMP threads wait for each other
and can slow a call several-fold. Before any timing, every term is called once on
a water monomer so that library loading and the one-time export of the
dispersion-free GFN2 parametrization are not charged to the first system.

A periodic box narrower than ``min_cell_width`` is evaluated by the baseline on a
supercell (``supercell`` column); D3 and the correction see the cell as given.

Usage::

    OMP_NUM_THREADS=2 python benchmarks/bench_terms.py               # sizes 10,100,300,1000
    OMP_NUM_THREADS=2 python benchmarks/bench_terms.py --sizes 10,100  # skip the large boxes
    OMP_NUM_THREADS=2 python benchmarks/bench_terms.py --quick         # 10,100 atoms, 2 warm calls

Writes ``benchmarks/results/bench_terms.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import os
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from _common import RESULTS_DIR, machine_info, markdown_table, warn_if_threads_unset, write_json
from ase import Atoms
from ase.build import molecule
from ase.calculators.calculator import Calculator
from ase.data import atomic_masses
from ase.units import _Nav

from deltaml import D3Dispersion, DeltaCalculator, SparseGPR, XTBBaseline

TERMS = ("baseline", "dispersion", "correction", "correction_sigma_f", "composite")
#: Terms that run the GFN2 baseline (skipped above ``--baseline-max-atoms``).
_WITH_BASELINE = ("baseline", "composite")
_LEARNED = ("correction", "correction_sigma_f")
DATASET = Path(__file__).resolve().parent.parent / "data" / "labelled" / "water_chno.extxyz"

#: Rigid water for the boxes: O–H (Å) and H–O–H (degrees), the gas-phase geometry.
_OH_A = 0.9572
_HOH_DEG = 104.52

#: Closest allowed O···O (Å) and other intermolecular atom pairs (Å) in a generated box.
_MIN_OO_A = 2.5
_MIN_INTER_A = 1.5

#: Standard deviation of the warm-call displacements, Å.
_RATTLE_A = 0.01


# -- structures ------------------------------------------------------------------


def _random_rotations(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` rotation matrices uniform on SO(3) (from uniform unit quaternions)."""
    q = rng.normal(size=(n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    ).transpose(2, 0, 1)


def water_box(
    n_molecules: int,
    *,
    density_g_cm3: float = 1.0,
    seed: int = 0,
    periodic: bool = True,
    max_tries: int = 20000,
) -> Atoms:
    """Cubic box of rigid water molecules at a given density, without overlaps.

    Molecules are added one at a time at a uniformly random position and
    orientation (random sequential addition); a trial is kept only if its oxygen
    is at least 2.5 Å from every other oxygen and all its other atoms at least
    1.5 Å from every atom of the other molecules, periodic images included.

    Parameters
    ----------
    n_molecules : int
        Number of water molecules.
    density_g_cm3 : float, default=1.0
        Mass density, g/cm³; sets the cube edge.
    seed : int, default=0
        Seed of the ``numpy.random.default_rng`` that draws positions and orientations.
    periodic : bool, default=True
        ``False`` returns the same molecules as a cluster (no cell, no periodicity);
        distances between molecules can then only grow.
    max_tries : int, default=20000
        Trials per molecule before giving up.

    Returns
    -------
    ase.Atoms
        O, H, H per molecule, molecules whole; positions in Å.

    Raises
    ------
    RuntimeError
        If a molecule cannot be placed in ``max_tries`` trials (density too high).
    """
    rng = np.random.default_rng(seed)
    mass_g = (atomic_masses[8] + 2 * atomic_masses[1]) / _Nav
    edge = (n_molecules * mass_g / density_g_cm3 * 1e24) ** (1.0 / 3.0)  # Å
    half = np.radians(_HOH_DEG) / 2.0
    template = np.array(
        [
            [0.0, 0.0, 0.0],
            [_OH_A * np.sin(half), 0.0, _OH_A * np.cos(half)],
            [-_OH_A * np.sin(half), 0.0, _OH_A * np.cos(half)],
        ]
    )
    placed = np.empty((0, 3, 3))
    batch = 256
    for index in range(n_molecules):
        for _ in range(max_tries // batch + 1):
            centres = rng.uniform(0.0, edge, size=(batch, 3))
            trial = centres[:, None, :] + template @ _random_rotations(rng, batch).transpose(
                0, 2, 1
            )
            ok = _fits(trial, placed, edge)
            if ok.any():
                placed = np.concatenate([placed, trial[np.argmax(ok)][None]])
                break
        else:
            raise RuntimeError(
                f"could not place water molecule {index + 1} of {n_molecules} in a "
                f"{edge:.2f} Å box after {max_tries} trials; lower the density "
                f"({density_g_cm3} g/cm³) or raise max_tries"
            )
    atoms = Atoms("OHH" * n_molecules, positions=placed.reshape(-1, 3))
    if periodic:
        atoms.cell = np.eye(3) * edge
        atoms.pbc = True
    return atoms


def _fits(trial: np.ndarray, placed: np.ndarray, edge: float) -> np.ndarray:
    """Which trial molecules (shape (n_trial, 3, 3)) keep their distance from ``placed``."""
    if len(placed) == 0:
        return np.ones(len(trial), dtype=bool)
    delta = trial[:, None, :, None, :] - placed[None, :, None, :, :]
    delta -= edge * np.round(delta / edge)  # minimum image in a cube
    dist = np.linalg.norm(delta, axis=-1)  # (n_trial, n_placed, 3, 3)
    oo_ok = dist[:, :, 0, 0].min(axis=1) >= _MIN_OO_A
    dist[:, :, 0, 0] = np.inf
    return oo_ok & (dist.reshape(len(trial), -1).min(axis=1) >= _MIN_INTER_A)


def build_systems(sizes: list[int], cluster_sizes: list[int], seed: int) -> list[dict[str, Any]]:
    """The benchmark systems: periodic boxes, then clusters, each of about n atoms."""
    systems = []
    for kind, targets in (("box", sizes), ("cluster", cluster_sizes)):
        for target in targets:
            n_molecules = max(1, round(target / 3))
            atoms = water_box(n_molecules, seed=seed + target, periodic=kind == "box")
            systems.append({"label": f"{kind}-{len(atoms)}", "kind": kind, "atoms": atoms})
    return systems


# -- calculators -----------------------------------------------------------------


class _CorrectionTerm:
    """The model's ``predict`` (energy and forces), as the composite calls it."""

    def __init__(self, model: SparseGPR, force_uncertainty: bool) -> None:
        self.model = model
        self.force_uncertainty = force_uncertainty
        self.results: dict[str, Any] = {}

    def compute(self, atoms: Atoms) -> None:
        result = self.model.predict(
            atoms, forces=True, stress=False, force_uncertainty=self.force_uncertainty
        )
        self.results = {"energy": result.energy, "forces": result.forces}


def fitted_model(path: Path | None) -> tuple[SparseGPR, Path]:
    """The model timed: loaded from ``path``, or fitted once on the shipped data and kept."""
    if path is not None:
        return SparseGPR.load(path), path
    kept = RESULTS_DIR / "bench_terms_model.npz"
    if kept.exists():
        return SparseGPR.load(kept), kept
    from deltaml import delta_targets, read_labelled

    print(f"fitting the model on {DATASET.name} (once; kept in {kept})", flush=True)
    targets, terms = delta_targets(read_labelled(DATASET))
    model = SparseGPR(seed=0).fit(targets, trained_with=terms)
    kept.parent.mkdir(parents=True, exist_ok=True)
    model.save(kept)
    return model, kept


def _make(term: str, model: SparseGPR) -> Calculator | _CorrectionTerm:
    if term == "baseline":
        return XTBBaseline(method="GFN2-xTB", remove_dispersion=True)
    if term == "dispersion":
        return D3Dispersion.from_spec(DeltaCalculator.from_model(model).parameters.dispersion)
    if term in _LEARNED:
        return _CorrectionTerm(model, force_uncertainty=term == "correction_sigma_f")
    return DeltaCalculator.from_model(model)


def _evaluate(calc: Calculator | _CorrectionTerm, atoms: Atoms) -> float:
    """Energy and forces of ``atoms``; returns the energy, eV."""
    if isinstance(calc, _CorrectionTerm):
        calc.compute(atoms)
        return float(calc.results["energy"])
    calc.get_property("forces", atoms)
    return float(calc.get_property("energy", atoms))


def _timed(func: Callable[[], float]) -> tuple[float, float]:
    start = time.perf_counter()
    value = func()
    return time.perf_counter() - start, value


def warm_up(model: SparseGPR) -> None:
    """Load every library and export the dispersion-free GFN2 parameters once."""
    water = molecule("H2O")
    for term in TERMS:
        _evaluate(_make(term, model), water.copy())


def _peak_mb(calc: _CorrectionTerm, atoms: Atoms) -> float:
    """Peak memory (MB, from tracemalloc) of one call of a correction term."""
    tracemalloc.start()
    try:
        _evaluate(calc, atoms)
        return tracemalloc.get_traced_memory()[1] / 1e6
    finally:
        tracemalloc.stop()


def time_system(
    system: dict[str, Any],
    repeats: int,
    seed: int,
    model: SparseGPR,
    *,
    baseline_max_atoms: int = 400,
    verbose: bool = False,
) -> dict[str, Any]:
    """Cold and warm timings (s) of every term on one system, on the same geometries.

    Parameters
    ----------
    system : dict
        ``label``, ``kind`` and ``atoms`` (from :func:`build_systems`).
    repeats : int
        Warm calls after the cold one.
    seed : int
        Seed of the displacements of the warm calls.
    model : SparseGPR
        The fitted model of the correction terms and of the composite.
    baseline_max_atoms : int, default=400
        Larger systems time the learned and dispersion terms only.
    verbose : bool, default=False
        Print every call as it finishes (progress of long runs).

    Returns
    -------
    dict
        Timings (s), energies (eV), supercell and ratios; see the JSON output.
    """
    atoms = system["atoms"]
    rng = np.random.default_rng(seed)
    geometries = [atoms.positions.copy()] + [
        atoms.positions + rng.normal(scale=_RATTLE_A, size=atoms.positions.shape)
        for _ in range(repeats)
    ]
    record: dict[str, Any] = {
        "label": system["label"],
        "kind": system["kind"],
        "n_atoms": len(atoms),
        "n_molecules": len(atoms) // 3,
        "pbc": bool(atoms.pbc.any()),
        "cell_a": atoms.cell.lengths().tolist() if atoms.pbc.any() else None,
        "terms": {},
    }
    terms_here = [t for t in TERMS if len(atoms) <= baseline_max_atoms or t not in _WITH_BASELINE]
    calcs = {term: _make(term, model) for term in terms_here}
    works = {term: atoms.copy() for term in terms_here}
    times: dict[str, list[float]] = {term: [] for term in terms_here}
    energies: dict[str, list[float]] = {term: [] for term in terms_here}
    record["load_average_before"] = os.getloadavg()[0]
    # Terms take turns on each geometry, so that a change in machine load between
    # calls hits every term alike and the ratios stay fair.
    for call, positions in enumerate(geometries):
        for term in terms_here:
            calc, work = calcs[term], works[term]
            work.positions = positions
            elapsed, energy = _timed(lambda c=calc, w=work: _evaluate(c, w))
            times[term].append(elapsed)
            energies[term].append(energy)
            if verbose:
                kind = "cold" if call == 0 else f"warm {call}"
                print(f"    {system['label']} {term} {kind}: {elapsed:.3f} s", flush=True)
    record["load_average_after"] = os.getloadavg()[0]
    for term in terms_here:
        warm = times[term][1:]
        record["terms"][term] = {
            "cold_s": times[term][0],
            "warm_s": warm,
            "warm_median_s": float(np.median(warm)) if warm else None,
            "warm_min_s": float(np.min(warm)) if warm else None,
            "energy_ev": energies[term][0],
        }
        print(
            f"  {system['label']:>12s} {term:>10s}: cold {times[term][0]:8.3f} s"
            + (f", warm median {np.median(warm):8.3f} s" if warm else ""),
            flush=True,
        )
    for term in _LEARNED:
        record["terms"][term]["peak_mb"] = _peak_mb(calcs[term], works[term])
    if "baseline" not in calcs:
        return record
    if atoms.pbc.any():
        repeats_used = calcs["baseline"].results["supercell_repeats"]
        record["supercell_repeats"] = [int(r) for r in repeats_used]
        record["n_atoms_baseline"] = len(atoms) * int(np.prod(repeats_used))
    terms = record["terms"]
    # Same sum, two routes: the composite must reproduce baseline + D3 + correction.
    parts = sum(terms[t]["energy_ev"] for t in ("baseline", "dispersion", "correction"))
    record["composite_minus_parts_ev"] = terms["composite"]["energy_ev"] - parts
    record["ratio_composite_baseline_cold"] = (
        terms["composite"]["cold_s"] / terms["baseline"]["cold_s"]
    )
    if repeats:
        record["ratio_composite_baseline_warm"] = (
            terms["composite"]["warm_median_s"] / terms["baseline"]["warm_median_s"]
        )
        record["ratio_composite_baseline_warm_min"] = (
            terms["composite"]["warm_min_s"] / terms["baseline"]["warm_min_s"]
        )
    return record


# -- output ----------------------------------------------------------------------


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1e3:.2f} ms" if value < 0.1 else f"{value:.2f} s"


def tables(records: list[dict[str, Any]]) -> str:
    """Markdown tables: timings per term (and peak memory), then ratios to the baseline."""
    rows = []
    for rec in records:
        supercell = "x".join(str(r) for r in rec.get("supercell_repeats", [])) or "-"
        for term, t in rec["terms"].items():
            warm = t["warm_s"]
            rows.append(
                [
                    rec["label"],
                    rec["n_atoms"],
                    supercell if term in _WITH_BASELINE else "-",
                    term,
                    _seconds(t["cold_s"]),
                    _seconds(t["warm_median_s"]),
                    _seconds(min(warm)) if warm else "-",
                    _seconds(max(warm)) if warm else "-",
                    f"{t['peak_mb']:.0f}" if "peak_mb" in t else "-",
                ]
            )
    timing = markdown_table(
        [
            "system",
            "atoms",
            "supercell",
            "term",
            "cold",
            "warm median",
            "warm min",
            "warm max",
            "peak MB",
        ],
        rows,
    )

    def ratio(rec: dict[str, Any], term: str, kind: str) -> str:
        terms = rec["terms"]
        if "baseline" not in terms or term not in terms:
            return "-"
        key = "cold_s" if kind == "cold" else "warm_median_s"
        if terms[term][key] is None:
            return "-"
        return f"{terms[term][key] / terms['baseline'][key]:.2f}"

    ratio_rows = [
        [
            rec["label"],
            rec["n_atoms"],
            rec.get("n_atoms_baseline", rec["n_atoms"]),
            ratio(rec, "composite", "cold"),
            ratio(rec, "composite", "warm"),
            ratio(rec, "correction", "warm"),
            ratio(rec, "correction_sigma_f", "warm"),
            f"{rec['composite_minus_parts_ev']:.1e}" if "composite_minus_parts_ev" in rec else "-",
            f"{rec['load_average_before']:.2f} / {rec['load_average_after']:.2f}",
        ]
        for rec in records
    ]
    ratios = markdown_table(
        [
            "system",
            "atoms",
            "atoms in baseline",
            "composite/baseline cold",
            "composite/baseline warm",
            "correction/baseline warm",
            "correction+σF/baseline warm",
            "E_comp − Σ terms, eV",
            "load avg before / after",
        ],
        ratio_rows,
    )
    return timing + "\n\n" + ratios


def _int_list(text: str) -> list[int]:
    return [int(item) for item in text.split(",") if item.strip()]


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        type=_int_list,
        default=None,
        help="comma-separated atom counts of the periodic boxes (default 10,100,300,1000)",
    )
    parser.add_argument(
        "--cluster-sizes",
        type=_int_list,
        default=None,
        help="comma-separated atom counts of non-periodic clusters (default 9,18,99; '' for none)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="warm calls (default 3)")
    parser.add_argument(
        "--quick", action="store_true", help="sizes 10,100, one cluster, 2 warm calls"
    )
    parser.add_argument("--seed", type=int, default=2024, help="seed for boxes and rattles")
    parser.add_argument(
        "--model", type=Path, default=None, help="fitted model file (default: fit once, keep)"
    )
    parser.add_argument(
        "--baseline-max-atoms",
        type=int,
        default=400,
        help="larger systems time the learned and dispersion terms only (default 400)",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="print every call (always for ≥ 500 atoms)"
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS_DIR / "bench_terms.json", help="JSON file to write"
    )
    args = parser.parse_args(argv)
    sizes = (
        args.sizes
        if args.sizes is not None
        else ([10, 100] if args.quick else [10, 100, 300, 1000])
    )
    cluster_sizes = args.cluster_sizes if args.cluster_sizes is not None else [9, 18, 99]
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 3)

    warn_if_threads_unset()
    machine = machine_info()
    print(
        f"cpus {machine['cpu_count']} (usable {machine['cpu_count_usable']}), "
        f"OMP_NUM_THREADS={machine['threads']['OMP_NUM_THREADS']}, "
        f"tblite {machine['versions']['tblite']}, dftd3 {machine['versions']['dftd3']}"
    )
    systems = build_systems(sizes, cluster_sizes, args.seed)
    model, model_path = fitted_model(args.model)
    start = time.perf_counter()
    warm_up(model)
    records = []
    for system in systems:
        verbose = len(system["atoms"]) >= 500 or args.verbose
        records.append(
            time_system(
                system,
                repeats,
                args.seed,
                model,
                baseline_max_atoms=args.baseline_max_atoms,
                verbose=verbose,
            )
        )
    total_s = time.perf_counter() - start

    print()
    print(tables(records))
    payload = {
        "benchmark": "bench_terms",
        "settings": {
            "sizes": sizes,
            "cluster_sizes": cluster_sizes,
            "repeats": repeats,
            "seed": args.seed,
            "rattle_a": _RATTLE_A,
            "density_g_cm3": 1.0,
            "baseline": {"method": "GFN2-xTB", "engine": "tblite", "remove_dispersion": True},
            "dispersion": DeltaCalculator.from_model(model).parameters.dispersion,
            "correction": {
                "model": str(model_path),
                "content_sha256": model.content_sha256,
                "sparse_points": [t.size for t in model.terms_],
                "n_features": model.descriptor_.n_features,
            },
            "baseline_max_atoms": args.baseline_max_atoms,
            "min_cell_width_a": 7.0,
        },
        "machine": machine,
        "total_s": total_s,
        "systems": records,
    }
    write_json(args.out, payload)
    print(f"\nwrote {args.out} ({total_s:.0f} s)")


if __name__ == "__main__":
    main()
