"""Transfer of interaction energies to unseen molecule families: terms alone vs the Δ-models.

Data: ``data/labelled/interactions.extxyz`` (dimer minima, rigid scans and small
clusters of common CHNO molecules, every monomer labelled at its geometry in the
complex, revPBE0/def2-TZVP) and ``data/labelled/water_chno.extxyz`` (the shipped
training set). Interaction energies are exact differences of labels:
E_int = E(complex) − Σ E(monomers).

Split by molecule family, never by frame: the families of the interaction set
are dealt (seeded) into ``--folds`` folds; each fold in turn is *unseen*: every
complex of those families, and every structure of ``water_chno`` that holds one
of their molecules, leaves the training set. Of the other (*seen*) families,
``--seen-test`` of the systems (a system = a minimum with its scan and monomers)
are held out as well, to measure the error on seen families.

Side by side, in kcal/mol, on the complexes of the held-out systems:

* ``GFN2-xTB``: GFN2-xTB with its own D4, no correction;
* ``terms``: GFN2-xTB without D4 + D3(BJ)-revPBE0, zero correction;
* ``atomic``: the terms + :class:`deltaml.SparseGPR` with ``decomposition="atomic"``
  (the model of the previous release);
* ``molecular``: the terms + ``decomposition="molecular"`` (intra + inter);
* alternatives, with ``--models``: ``atomic-exp`` (a kernel that decays out of
  domain, exp(ζ(x̂·ŷ − 1)) with ζ = 20, so the correction returns to its offsets
  far from the data), ``atomic-small-prior`` (δ = 0.02 eV instead of the
  automatic width), ``molecular-zeta2`` (a quadratic intermolecular kernel),
  ``molecular-local2``, ``molecular-local8`` (the local intermolecular kernel
  (x·y) exp(ζ(x̂·ŷ − 1)), ζ = 2 and 8: it returns to zero correction, the terms,
  for contacts unlike the data), ``molecular-local2-half`` (half of its prior
  variance plain linear, ``inter_linear=0.5``), ``molecular-difference`` (the
  intermolecular rows before 2026-12-01, full − own, with the others ⊗ others
  term that makes the correction of a crystal more than the sum of its dimers').

Reported: MAE of interaction energies (minima, scans, all) and of the scan
energies relative to their minimum (the shape of each curve); the difference of
the molecular composite's MAE from the terms' on unseen families with a
bootstrap 95 % interval over systems (the target: never worse beyond noise);
the calibration of σ (fraction of errors within 1σ and 2σ, RMS z-score, median σ),
after and before the interaction-energy calibration, always on structures of the
training families that the calibrating model did not see: by default every model
is fitted without a seeded 10 % of the loose training structures and
``--calibration-systems`` (20 %) of the training interaction systems (``--refit``:
then refitted on all, keeping the factors); with ``--cv k``, k models fitted
without one k-th of them each give held-out errors of all of them, pooled to
calibrate the model fitted on all. The loose structures alone give the energy
factor as before, the systems the intermolecular factor and floor
(:meth:`deltaml.SparseGPR.calibrate`); a learning curve
against the number of interaction systems in training (first fold); the errors
on the shipped demo split of ``water_chno`` (seeded 20 % held out); fit time and
the cost of one composite call (energy + forces) with each model, measured in
the same run.

Usage::

    python benchmarks/bench_transfer.py                    # all folds, learning curve
    python benchmarks/bench_transfer.py --folds 3 --curve 0,8,all
    python benchmarks/bench_transfer.py --folds 3 --curve all --models molecular --cv 5

Writes ``benchmarks/results/bench_transfer.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from _common import RESULTS_DIR, machine_info, markdown_table, write_json
from ase import Atoms
from ase.units import kcal, mol

from deltaml import DeltaCalculator, SparseGPR, XTBBaseline, delta_targets, read_labelled
from deltaml.dataset import interaction_groups
from deltaml.evaluation import interaction_energies

DATA = Path(__file__).resolve().parent.parent / "data" / "labelled"
KCAL = kcal / mol
#: The Δ-models compared (SparseGPR keywords); "atomic" and "molecular" always run.
MODELS = {
    "atomic": {"decomposition": "atomic"},
    "molecular": {"decomposition": "molecular"},
    "atomic-exp": {"decomposition": "atomic", "kernel": "exp", "zeta": 20.0},
    "atomic-small-prior": {"decomposition": "atomic", "delta": 0.02},
    "molecular-zeta2": {"decomposition": "molecular", "inter_zeta": 2},
    "molecular-difference": {"decomposition": "molecular", "inter_rows": "difference"},
    "molecular-small-prior": {"decomposition": "molecular", "inter_delta": 0.02},
    "molecular-cv": {"decomposition": "molecular", "inter_delta": "cv"},
    "molecular-cv-interactions": {"decomposition": "molecular", "inter_delta": "cv-interactions"},
    "molecular-local2": {"decomposition": "molecular", "inter_kernel": "local", "inter_zeta": 2},
    "molecular-local8": {"decomposition": "molecular", "inter_kernel": "local", "inter_zeta": 8},
    "molecular-local2-half": {
        "decomposition": "molecular",
        "inter_kernel": "local",
        "inter_zeta": 2,
        "inter_linear": 0.5,
    },
}


def systems_of(frames: list[Atoms]) -> dict[str, list[int]]:
    """Indices of the frames of each system (``info["system"]``)."""
    out: dict[str, list[int]] = {}
    for index, atoms in enumerate(frames):
        out.setdefault(atoms.info["system"], []).append(index)
    return out


def molecule_families(frames: list[Atoms]) -> dict[str, str]:
    """Family of every molecule name, from the complexes' fragment names and families."""
    out = {}
    for atoms in frames:
        names = atoms.info["fragment_names"].split(",")
        families = atoms.info["families"].split(",")
        out.update(zip(names, families, strict=True))
    return out


def deal_families(
    system_family: dict[str, str], n_folds: int, rng: np.random.Generator
) -> list[set[str]]:
    """The molecule families (water and mixed clusters excepted) dealt into folds."""
    families = sorted(set(system_family.values()) - {"water", "mixed"})
    dealt = [families[i] for i in rng.permutation(len(families))]
    return [set(dealt[k::n_folds]) for k in range(n_folds)]


def fold_split(
    unseen: set[str], system_family: dict[str, str], seen_test: float, rng: np.random.Generator
) -> tuple[set[str], list[str]]:
    """Of one fold's seen systems, the held-out share ``seen_test`` (drawn with
    ``rng``) and the training systems, in name order."""
    seen_systems = sorted(s for s, f in system_family.items() if f not in unseen)
    size = round(seen_test * len(seen_systems))
    held = set(rng.choice(seen_systems, size=size, replace=False))
    return held, [s for s in seen_systems if s not in held]


def holds_family(atoms: Atoms, families: set[str], family_of: dict[str, str]) -> bool:
    """Whether a ``water_chno`` structure holds a molecule of one of ``families``."""
    names = str(atoms.info.get("name", "")).replace("(H2O)", "H2O").split("...")
    return any(family_of.get(name.split(")")[0]) in families for name in names)


def gfn2_energies(frames: list[Atoms]) -> np.ndarray:
    """GFN2-xTB (with its D4) energies, eV."""
    calc = XTBBaseline(method="GFN2-xTB")
    out = []
    for atoms in frames:
        probe = Atoms(atoms.numbers, atoms.positions)
        probe.calc = calc
        out.append(probe.get_potential_energy())
    return np.array(out)


def fit(
    name: str,
    frames: list[Atoms],
    terms: dict,
    seed: int,
    calibration_systems: float = 0.0,
    refit: bool = False,
    cv_folds: int = 0,
) -> tuple[SparseGPR, float]:
    """A model fitted on ``frames`` (training families only), with σ calibrated on
    structures of those families that the calibrating model did not see.

    Held out (``cv_folds`` = 0): a seeded 10 % of the loose (single-molecule and
    cluster) structures and a seeded fraction ``calibration_systems`` of the
    interaction systems (whole systems: complexes with their monomers) leave the
    fit and calibrate it; ``refit``: refit on all of ``frames`` afterwards, keeping
    the factors. Cross-validated (``cv_folds`` = k > 1): the loose structures and
    the systems are dealt (seeded) into k parts, k models each fitted without one
    part give the held-out statistics of every structure
    (``SparseGPR.calibration_statistics``), pooled to calibrate the model fitted
    on all of ``frames`` (``SparseGPR.calibrate_from``).

    The loose structures alone give the energy factor as before (recorded as
    ``model.scales_before``); with the systems, the interaction energies also give
    the intermolecular factor and floor. Returns the model and the seconds of its
    (final) fit and calibration.
    """
    loose = [k for k, a in enumerate(frames) if "system" not in a.info]
    systems: dict[str, list[int]] = {}
    for k, atoms in enumerate(frames):
        if "system" in atoms.info:
            systems.setdefault(atoms.info["system"], []).append(k)
    names = sorted(systems)
    rng = np.random.default_rng(seed)

    def new_model() -> SparseGPR:
        return SparseGPR(**MODELS[name], uncertainty="energy", seed=seed)

    if cv_folds > 1:
        loose_order = [loose[i] for i in rng.permutation(len(loose))]
        system_order = [names[i] for i in rng.permutation(len(names))]
        on_loose, on_systems = [], []
        for part in range(cv_folds):
            out_loose = loose_order[part::cv_folds]
            out_systems = [k for n in system_order[part::cv_folds] for k in systems[n]]
            out = set(out_loose) | set(out_systems)
            inner = new_model().fit([a for k, a in enumerate(frames) if k not in out], terms)
            on_loose.append(inner.calibration_statistics([frames[k] for k in out_loose]))
            if out_systems:
                on_systems.append(inner.calibration_statistics([frames[k] for k in out_systems]))
        start = time.perf_counter()
        model = new_model().fit(frames, trained_with=terms)
        before = model.calibrate_from(on_loose)
        model.calibrate_from(on_loose + on_systems)
        seconds = time.perf_counter() - start
        model.scales_before = before
        model.n_calibration_systems = len(names)
        return model, seconds
    start = time.perf_counter()
    held = set(rng.choice(loose, size=len(loose) // 10, replace=False).tolist())
    count = round(calibration_systems * len(names))
    if calibration_systems > 0:
        count = min(max(count, 1), len(names))
    for system in rng.choice(names, size=count, replace=False) if count else []:
        held.update(systems[system])
    model = new_model()
    model.fit([a for k, a in enumerate(frames) if k not in held], trained_with=terms)
    model.calibrate([frames[k] for k in sorted(held) if "system" not in frames[k].info])
    before = dict(model.uncertainty_scale_)
    if count:
        model.calibrate([frames[k] for k in sorted(held)])
    if refit:
        after = dict(model.uncertainty_scale_)
        model = new_model().fit(frames, trained_with=terms)
        model.uncertainty_scale_ = after
    model.scales_before = before
    model.n_calibration_systems = count
    return model, time.perf_counter() - start


def held_out(
    groups: list[tuple[int, list[int]]], targets: list[Atoms], unseen: set[str], held: set[str]
) -> dict[str, list[tuple[int, list[int]]]]:
    """Complexes of the unseen families and of the held-out systems of seen families."""
    info = [targets[g[0]].info for g in groups]
    return {
        "unseen": [g for g, i in zip(groups, info, strict=True) if i["family"] in unseen],
        "seen": [g for g, i in zip(groups, info, strict=True) if i["system"] in held],
    }


def score(
    models: dict[str, SparseGPR],
    targets: list[Atoms],
    groups: list[tuple[int, list[int]]],
    gfn2: np.ndarray,
) -> list[dict]:
    """One row per complex: interaction energies of every method (kcal/mol) and σ."""
    rows = [
        {
            "index": g[0],
            "system": targets[g[0]].info["system"],
            "family": targets[g[0]].info["family"],
            "scan_factor": float(targets[g[0]].info.get("scan_factor", 1.0)),
            "GFN2-xTB": float(gfn2[g[0]] - gfn2[g[1]].sum()) / KCAL,
        }
        for g in groups
    ]
    for name, model in models.items():
        for row, result in zip(rows, interaction_energies(model, targets, groups), strict=True):
            row["reference"], row["terms"] = result["reference"], result["terms"]
            row[name], row[f"sigma_{name}"] = result["composite"], result["sigma"]
        before = getattr(model, "scales_before", None)
        if before is not None and before != model.uncertainty_scale_:
            # σ as calibrated before on the loose structures only: same fit, same errors.
            after, model.uncertainty_scale_ = model.uncertainty_scale_, before
            try:
                for row, (index, parts) in zip(rows, groups, strict=True):
                    members = [targets[index], *(targets[k] for k in parts)]
                    weights = np.array([1.0] + [-1.0] * len(parts))
                    variance = weights @ model.energy_covariance(members) @ weights
                    row[f"sigma_{name}_before"] = float(np.sqrt(max(variance, 0.0))) / KCAL
            finally:
                model.uncertainty_scale_ = after
        elif before is not None:
            for row in rows:
                row[f"sigma_{name}_before"] = row[f"sigma_{name}"]
    return rows


def summary(rows: list[dict], methods: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """MAE (kcal/mol) of interaction energies (minima, scans, all) and of scan shapes."""
    out: dict[str, dict[str, float]] = {}
    minima = [r for r in rows if r["scan_factor"] == 1.0]
    minimum_of = {r["system"]: r for r in minima}
    scans = [r for r in rows if r["scan_factor"] != 1.0]
    shaped = [r for r in scans if r["system"] in minimum_of]
    for method in methods:

        def err(chosen: list[dict], method: str = method) -> list[float]:
            return [abs(r[method] - r["reference"]) for r in chosen]

        shape = [
            abs(
                (r[method] - minimum_of[r["system"]][method])
                - (r["reference"] - minimum_of[r["system"]]["reference"])
            )
            for r in shaped
        ]
        out[method] = {
            "mae_all": float(np.mean(err(rows))) if rows else float("nan"),
            "mae_minima": float(np.mean(err(minima))) if minima else float("nan"),
            "mae_scans": float(np.mean(err(scans))) if scans else float("nan"),
            "mae_scan_shape": float(np.mean(shape)) if shape else float("nan"),
            "n": len(rows),
        }
        for suffix in ("", "_before"):
            key = f"sigma_{method}{suffix}"
            if not rows or key not in rows[0]:
                continue
            z = np.array([abs(r[method] - r["reference"]) / max(r[key], 1e-9) for r in rows])
            out[method][f"within_1_sigma{suffix}"] = float(np.mean(z <= 1.0))
            out[method][f"within_2_sigma{suffix}"] = float(np.mean(z <= 2.0))
            # σ = 0 where the molecules are out of each other's cut-off (the model
            # predicts no interaction there, exactly): those count as misses above
            # but would make an RMS z of 10^6, so it is taken over σ > 0 only.
            finite = np.array([r[key] > 1e-9 for r in rows])
            rms = np.sqrt(np.mean(z[finite] ** 2)) if finite.any() else float("nan")
            out[method][f"rms_z{suffix}"] = float(rms)
            out[method][f"n_zero_sigma{suffix}"] = int((~finite).sum())
            out[method][f"median_sigma{suffix}"] = float(np.median([r[key] for r in rows]))
    return out


def bootstrap_difference(rows: list[dict], first: str, second: str, seed: int) -> dict[str, float]:
    """MAE(first) − MAE(second) with a 95 % bootstrap interval over systems (kcal/mol)."""
    by_system: dict[str, list[dict]] = {}
    for row in rows:
        by_system.setdefault(row["system"], []).append(row)
    names = sorted(by_system)
    rng = np.random.default_rng(seed)

    def diff(chosen: list[str]) -> float:
        picked = [r for name in chosen for r in by_system[name]]
        return float(
            np.mean(
                [abs(r[first] - r["reference"]) - abs(r[second] - r["reference"]) for r in picked]
            )
        )

    draws = [diff(list(rng.choice(names, size=len(names)))) for _ in range(2000)]
    return {
        "difference": diff(names),
        "low": float(np.percentile(draws, 2.5)),
        "high": float(np.percentile(draws, 97.5)),
    }


def call_cost(
    models: dict[str, SparseGPR], frames: list[Atoms], repeats: int = 3
) -> dict[str, float]:
    """Seconds per composite call (energy + forces, σ as fitted) with each model and with none."""
    from deltaml import ZeroCorrection

    out = {}
    for name, correction in [("terms", ZeroCorrection()), *models.items()]:
        calc = DeltaCalculator.from_model(correction) if name != "terms" else None
        if calc is None:
            calc = DeltaCalculator(correction=correction, dispersion="d3bj:revpbe0")
        start = time.perf_counter()
        for _ in range(repeats):
            for atoms in frames:
                probe = Atoms(atoms.numbers, atoms.positions)
                probe.calc = calc
                probe.get_forces()
        out[name] = (time.perf_counter() - start) / (repeats * len(frames))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument(
        "--seen-test", type=float, default=0.2, help="systems of seen families held out"
    )
    parser.add_argument("--curve", default="0,4,8,16,all", help="interaction systems in training")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--models", default="atomic,molecular", help=f"comma-separated, of {sorted(MODELS)}"
    )
    parser.add_argument(
        "--calibration-systems",
        type=float,
        default=0.2,
        help="fraction of the training interaction systems held out of the fit to calibrate "
        "the σ of interaction energies (0: loose structures only, as before)",
    )
    parser.add_argument(
        "--refit",
        action="store_true",
        help="refit on all training data after calibration, keeping the factors",
    )
    parser.add_argument(
        "--cv",
        type=int,
        default=0,
        help="k > 1: calibrate by k-fold cross-validation over the training structures and "
        "systems, then fit on all of them (k + 1 fits per model); 0: hold out",
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "bench_transfer.json")
    args = parser.parse_args()
    names = list(dict.fromkeys(["atomic", "molecular", *args.models.split(",")]))
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {sorted(MODELS)}")
    methods = ("GFN2-xTB", "terms", *names)

    base = read_labelled(DATA / "water_chno.extxyz")
    extra = read_labelled(DATA / "interactions.extxyz")
    base_targets, terms = delta_targets(base)
    targets, _ = delta_targets(extra)
    groups = interaction_groups(targets)
    gfn2 = gfn2_energies(targets)
    systems = systems_of(targets)
    family_of = molecule_families(targets)
    system_family = {name: targets[idx[0]].info["family"] for name, idx in systems.items()}
    rng = np.random.default_rng(args.seed)
    folds = deal_families(system_family, args.folds, rng)
    print(f"{len(targets)} interaction structures, {len(groups)} complexes, "
          f"{len(systems)} systems, "
          f"{len(set().union(*folds))} families; folds: {[sorted(f) for f in folds]}")  # fmt: skip

    report: dict = {
        "machine": machine_info(),
        "folds": [sorted(f) for f in folds],
        "calibration_systems": args.calibration_systems,
        "refit": args.refit,
        "cv": args.cv,
        "per_fold": [],
    }
    calibration = (args.calibration_systems, args.refit, args.cv)
    all_rows: dict[str, list[dict]] = {"unseen": [], "seen": []}
    costs: list[dict] = []
    fit_times: dict[str, list[float]] = {}
    curve_fold = None
    for k, unseen in enumerate(folds):
        held, train_systems = fold_split(unseen, system_family, args.seen_test, rng)
        base_train = [a for a in base_targets if not holds_family(a, unseen, family_of)]
        train = base_train + [targets[i] for s in train_systems for i in systems[s]]
        models = {}
        for name in names:
            models[name], seconds = fit(name, train, terms, args.seed, *calibration)
            fit_times.setdefault(name, []).append(seconds)
        scales = {
            name: {"before": m.scales_before, "after": dict(m.uncertainty_scale_)}
            for name, m in models.items()
        }
        print(f"fold {k}: σ factors {scales}")
        chosen = {name: m.terms_[1].delta for name, m in models.items() if m.molecular}
        print(f"fold {k}: intermolecular δ (eV) {chosen}")
        for part, picked in held_out(groups, targets, unseen, held).items():
            rows = score(models, targets, picked, gfn2)
            all_rows[part] += rows
            report["per_fold"].append(
                {
                    "fold": k,
                    "part": part,
                    "summary": summary(rows, methods),
                    "scales": scales,
                    "inter_delta": chosen,
                }
            )
        probe = [targets[g[0]] for g in groups if targets[g[0]].info["family"] in unseen][:4]
        costs.append(call_cost({k: models[k] for k in ("atomic", "molecular")}, probe))
        if curve_fold is None:
            curve_fold = (k, unseen, held, train_systems, base_train)
        print(f"fold {k}: unseen {sorted(unseen)}: {len(train)} training structures")

    report["unseen"] = summary(all_rows["unseen"], methods)
    report["seen"] = summary(all_rows["seen"], methods)
    for name in names:
        report[f"{name}_minus_terms_unseen"] = bootstrap_difference(
            all_rows["unseen"], name, "terms", args.seed
        )
    report["fit_seconds"] = {k: float(np.mean(v)) for k, v in fit_times.items()}
    report["call_seconds"] = {k: float(np.mean([c[k] for c in costs])) for k in costs[0]}
    report["rows"] = all_rows

    # Learning curve on the first fold: interaction systems added in a seeded order.
    k, unseen, held, train_systems, base_train = curve_fold
    order = [
        train_systems[i]
        for i in np.random.default_rng(args.seed + 1).permutation(len(train_systems))
    ]
    curve = []
    for size in args.curve.split(","):
        n = len(order) if size == "all" else min(int(size), len(order))
        train = base_train + [targets[i] for s in order[:n] for i in systems[s]]
        point = {"n_systems": n, "n_interactions": len(interaction_groups(train))}
        for decomposition in ("atomic", "molecular"):
            model, _ = fit(decomposition, train, terms, args.seed, *calibration)
            for part, picked in held_out(groups, targets, unseen, held).items():
                rows = score({decomposition: model}, targets, picked, gfn2)
                maes = summary(rows, (decomposition, "terms"))
                point[f"{decomposition}_{part}"] = maes[decomposition]["mae_all"]
                point[f"terms_{part}"] = maes["terms"]["mae_all"]
        curve.append(point)
        print(f"curve: {n} systems done")
    report["learning_curve"] = curve

    # The shipped demo split of water_chno (seed 0, 20 % held out): must not get worse.
    order = np.random.default_rng(0).permutation(len(base_targets))
    n_test = round(0.2 * len(base_targets))
    test = [base_targets[i] for i in np.sort(order[:n_test])]
    train = [base_targets[i] for i in np.sort(order[n_test:])]
    shipped = {}
    for decomposition in ("atomic", "molecular"):
        model = SparseGPR(decomposition=decomposition, uncertainty=None, seed=0).fit(
            train, trained_with=terms
        )
        e_err, f_err = [], []
        for atoms in test:
            result = model.predict(atoms)
            e_err.append(result.energy - atoms.calc.results["energy"])
            f_err.append(np.abs(result.forces - atoms.calc.results["forces"]).ravel())
        shipped[decomposition] = {
            "energy_mae_kcal_mol": float(np.mean(np.abs(e_err))) / KCAL,
            "force_mae": float(np.mean(np.concatenate(f_err))),
        }
    report["shipped_split"] = shipped
    write_json(args.out, report)

    for part in ("unseen", "seen"):
        print(
            f"\n{part} families: interaction energies, MAE kcal/mol "
            f"({report[part]['terms']['n']} complexes)"
        )
        header = ["method", "minima", "scans", "all", "scan shape", "within 1σ / 2σ",
                  "RMS z", "median σ", "before: within 1σ / 2σ", "RMS z", "median σ"]  # fmt: skip
        table = []
        nan = float("nan")
        for method in methods:
            s = report[part][method]
            table.append([
                method, f"{s['mae_minima']:.2f}", f"{s['mae_scans']:.2f}", f"{s['mae_all']:.2f}",
                f"{s['mae_scan_shape']:.2f}",
                f"{s.get('within_1_sigma', nan):.2f} / {s.get('within_2_sigma', nan):.2f}",
                f"{s.get('rms_z', nan):.2f}", f"{s.get('median_sigma', nan):.2f}",
                f"{s.get('within_1_sigma_before', nan):.2f} / "
                f"{s.get('within_2_sigma_before', nan):.2f}",
                f"{s.get('rms_z_before', nan):.2f}", f"{s.get('median_sigma_before', nan):.2f}",
            ])  # fmt: skip
        print(markdown_table(header, table))
    for name in names:
        d = report[f"{name}_minus_terms_unseen"]
        print(f"\n{name} − terms on unseen families: {d['difference']:+.2f} kcal/mol "
              f"(95 % bootstrap over systems {d['low']:+.2f} … {d['high']:+.2f})")  # fmt: skip
    print("\nlearning curve (first fold), interaction MAE kcal/mol")
    print(markdown_table(
        ["systems", "interactions", "terms unseen", "atomic unseen", "molecular unseen",
         "terms seen", "atomic seen", "molecular seen"],
        [[p["n_systems"], p["n_interactions"], *(f"{p[k]:.2f}" for k in (
            "terms_unseen", "atomic_unseen", "molecular_unseen", "terms_seen", "atomic_seen",
            "molecular_seen"))] for p in curve],
    ))  # fmt: skip
    print("\nshipped demo split (water_chno, 20 % held out):")
    for name, s in shipped.items():
        print(
            f"  {name:9s} energy MAE {s['energy_mae_kcal_mol']:.2f} kcal/mol, "
            f"force MAE {s['force_mae']:.4f} eV/Å"
        )
    print(
        f"\nfit seconds {report['fit_seconds']}; "
        f"seconds per composite call {report['call_seconds']}"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
