"""Periodic vs. cluster lattice energy of ice Ih with the GFN-xTB baseline.

The same crystal, ``data/crystals/ice_ih.extxyz`` (8 molecules, proton-ordered,
non-polar), is evaluated two ways with :class:`~deltaml.XTBBaseline` (tblite,
each method with its own dispersion, ``remove_dispersion=False``; with
``--dispersion-free`` also without it):

1. **periodic**: ``E_latt = E_cell / N_cell − E_monomer`` at several
   ``min_cell_width`` values: 0 (the raw 8-molecule cell, Γ point only, 4.5 Å
   wide), 7 Å (the default; a 2×1×1 supercell) and 10 Å (3×2×2, 96 molecules),
   which shows how far the Γ-only energy of a narrow cell is from convergence;
2. **clusters**: spheres of whole molecules cut from a large supercell, all
   molecules whose oxygen lies within R of the oxygen of molecule 0 (in the middle
   copy of the cell), R chosen in the gaps between coordination shells.
   ``E_cluster / N − E_monomer`` is fitted linearly in N^(-1/3) (the
   surface-to-volume ratio of a sphere) and extrapolated to N → ∞. Alternative
   fits (larger clusters only; 1/N) show how uncertain the extrapolation is.

The monomer is a molecule of the crystal in its crystal geometry (not relaxed),
for both routes, so the two lattice energies differ only by how the bulk limit is
reached. The relaxation energy of the monomer is reported separately.

A third, independent check (``vacuum box``): one cluster placed in cubic periodic
boxes of growing edge. ``E_periodic − E_molecular`` must vanish as the box grows
(for a polar cluster the tin-foil boundary conditions of an Ewald sum leave a
term that falls as 1/L³).

Usage::

    OMP_NUM_THREADS=2 python benchmarks/bench_periodic_consistency.py
    OMP_NUM_THREADS=2 python benchmarks/bench_periodic_consistency.py --quick
    OMP_NUM_THREADS=2 python benchmarks/bench_periodic_consistency.py --dispersion-free

Energies in kJ/mol per molecule (1 eV = 96.485 kJ/mol, from ``ase.units``).
Writes ``benchmarks/results/bench_periodic_consistency.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    REPO_ROOT,
    RESULTS_DIR,
    machine_info,
    markdown_table,
    warn_if_threads_unset,
    write_json,
)
from ase import Atoms, units
from ase.io import read
from ase.optimize import BFGS
from scipy.stats import linregress

from deltaml import XTBBaseline, perpendicular_widths

#: eV per kJ/mol: divide an energy in eV by this to get kJ/mol.
EV_PER_KJ_MOL = units.kJ / units.mol

DEFAULT_CRYSTAL = REPO_ROOT / "data" / "crystals" / "ice_ih.extxyz"

#: Two oxygen distances belong to different coordination shells if they differ by more, Å.
_SHELL_GAP_A = 0.1

#: Smallest cluster used in the primary and in the alternative fits.
_FIT_MIN_MOLECULES = 18
_FIT_MIN_MOLECULES_LARGE = 39


def _kj_mol(energy_ev: float) -> float:
    return float(energy_ev / EV_PER_KJ_MOL)


def _energy(atoms: Atoms, method: str, remove_dispersion: bool, **kwargs: Any) -> float:
    """Energy (eV) and nothing else from a fresh baseline calculator."""
    work = atoms.copy()
    work.calc = XTBBaseline(method=method, remove_dispersion=remove_dispersion, **kwargs)
    return float(work.get_potential_energy())


def _timed_energy(
    atoms: Atoms, method: str, remove_dispersion: bool, **kwargs: Any
) -> tuple[float, float, XTBBaseline]:
    work = atoms.copy()
    calc = XTBBaseline(method=method, remove_dispersion=remove_dispersion, **kwargs)
    work.calc = calc
    start = time.perf_counter()
    energy = float(work.get_potential_energy())
    return energy, time.perf_counter() - start, calc


# -- structures ------------------------------------------------------------------


def molecules_of(crystal: Atoms) -> np.ndarray:
    """Positions as (n_molecules, 3, 3), checking the O, H, H order of whole molecules."""
    symbols = "".join(crystal.get_chemical_symbols())
    if len(crystal) % 3 or symbols != "OHH" * (len(crystal) // 3):
        raise ValueError(
            f"expected whole water molecules listed as O, H, H; got {symbols[:12]}... "
            "(regenerate the file with benchmarks/make_ice_ih.py)"
        )
    molecules = crystal.positions.reshape(-1, 3, 3)
    oh = np.linalg.norm(molecules[:, 1:] - molecules[:, :1], axis=2)
    if oh.max() > 1.2:
        raise ValueError(
            f"an O–H distance is {oh.max():.2f} Å (at most 1.2 Å expected): molecules are "
            "not whole; do not wrap the crystal into its cell"
        )
    return molecules


def spherical_clusters(
    crystal: Atoms, min_molecules: int, max_molecules: int
) -> list[dict[str, Any]]:
    """Shell-closed spherical clusters of whole molecules cut from a supercell.

    Parameters
    ----------
    crystal : ase.Atoms
        Periodic crystal with whole molecules (O, H, H).
    min_molecules, max_molecules : int
        Keep the shell-closed clusters with this many molecules or between.

    Returns
    -------
    list of dict
        ``n_molecules``, ``radius_a`` (Å, midway between the last shell kept and
        the next one) and ``atoms`` (non-periodic).
    """
    # Radius of the largest cluster, estimated from the density of molecules, plus margin.
    n_cell = len(crystal) // 3
    radius_max = (3.0 * max_molecules * crystal.get_volume() / n_cell / (4.0 * math.pi)) ** (
        1.0 / 3.0
    ) + 3.0
    widths = perpendicular_widths(crystal.cell.array)
    repeats = [math.ceil((2.0 * radius_max + 4.0) / w) for w in widths]
    big = crystal.repeat(repeats)
    molecules = molecules_of(big)
    # Molecule 0 of the cell in the middle copy: the same centre whatever the supercell.
    middle = np.array([r // 2 for r in repeats]) @ crystal.cell.array
    target = molecules_of(crystal)[0, 0] + middle
    central = int(np.argmin(np.linalg.norm(molecules[:, 0] - target, axis=1)))
    distance = np.linalg.norm(molecules[:, 0] - molecules[central, 0], axis=1)
    order = np.argsort(distance, kind="stable")
    sorted_d = distance[order]
    clusters = []
    for n in range(1, len(order)):
        if sorted_d[n] - sorted_d[n - 1] <= _SHELL_GAP_A:
            continue  # n would split a coordination shell
        if n > max_molecules or sorted_d[n] > radius_max:
            break
        if n < min_molecules:
            continue
        chosen = molecules[order[:n]].reshape(-1, 3)
        clusters.append(
            {
                "n_molecules": n,
                "radius_a": float((sorted_d[n - 1] + sorted_d[n]) / 2.0),
                "atoms": Atoms("OHH" * n, positions=chosen),
            }
        )
    return clusters


# -- the two routes ----------------------------------------------------------------


def monomer_energies(molecules: np.ndarray, method: str, remove_dispersion: bool) -> dict:
    """Monomer energies (eV): crystal geometry (each molecule) and relaxed."""
    crystal_geometry = [
        _energy(Atoms("OHH", positions=m), method, remove_dispersion) for m in molecules
    ]
    relaxed = Atoms("OHH", positions=molecules[0])
    relaxed.calc = XTBBaseline(method=method, remove_dispersion=remove_dispersion)
    BFGS(relaxed, logfile=None).run(fmax=1e-3)
    e_relaxed = float(relaxed.get_potential_energy())
    return {
        "energy_ev": crystal_geometry[0],
        "spread_over_molecules_ev": float(np.ptp(crystal_geometry)),
        "relaxed_energy_ev": e_relaxed,
        "deformation_kj_mol": _kj_mol(crystal_geometry[0] - e_relaxed),
        "relaxed_oh_a": [float(relaxed.get_distance(0, k)) for k in (1, 2)],
        "relaxed_hoh_deg": float(relaxed.get_angle(1, 0, 2)),
    }


def periodic_lattice_energies(
    crystal: Atoms,
    method: str,
    remove_dispersion: bool,
    e_monomer_ev: float,
    widths_a: list[float],
) -> list[dict[str, Any]]:
    """Lattice energy (kJ/mol) of the periodic crystal for each ``min_cell_width`` (Å)."""
    n_molecules = len(crystal) // 3
    rows = []
    for width in widths_a:
        energy, elapsed, calc = _timed_energy(
            crystal, method, remove_dispersion, min_cell_width=width
        )
        repeats = [int(r) for r in calc.results["supercell_repeats"]]
        rows.append(
            {
                "min_cell_width_a": width,
                "supercell_repeats": repeats,
                "n_molecules_evaluated": n_molecules * int(np.prod(repeats)),
                "lattice_energy_kj_mol": _kj_mol(energy / n_molecules - e_monomer_ev),
                "time_s": elapsed,
            }
        )
        print(
            f"    periodic min_cell_width={width:4.1f} Å {'x'.join(map(str, repeats)):>6s}: "
            f"{rows[-1]['lattice_energy_kj_mol']:9.3f} kJ/mol ({elapsed:.1f} s)",
            flush=True,
        )
    return rows


def cluster_lattice_energies(
    clusters: list[dict[str, Any]], method: str, remove_dispersion: bool, e_monomer_ev: float
) -> list[dict[str, Any]]:
    """``E_cluster / N − E_monomer`` (kJ/mol) of each cluster."""
    rows = []
    for cluster in clusters:
        n = cluster["n_molecules"]
        energy, elapsed, _ = _timed_energy(cluster["atoms"], method, remove_dispersion)
        rows.append(
            {
                "n_molecules": n,
                "radius_a": cluster["radius_a"],
                "energy_per_molecule_kj_mol": _kj_mol(energy / n - e_monomer_ev),
                "time_s": elapsed,
            }
        )
        print(
            f"    cluster N={n:4d} R={cluster['radius_a']:5.2f} Å: "
            f"{rows[-1]['energy_per_molecule_kj_mol']:9.3f} kJ/mol ({elapsed:.1f} s)",
            flush=True,
        )
    return rows


def extrapolate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Linear fits of the cluster energies to N → ∞ (kJ/mol).

    Returns
    -------
    dict
        ``primary``: fit in N^(-1/3) over N ≥ 18; ``large``: the same over N ≥ 39;
        ``inverse_n``: fit in 1/N over N ≥ 18 (not the surface scaling of a
        sphere; shown for comparison). Each with intercept (the bulk limit), its
        standard error, slope, root-mean-square residual and the sizes used.
        ``spread_kj_mol``: difference of the two N^(-1/3) intercepts.
    """
    n = np.array([r["n_molecules"] for r in rows], dtype=float)
    y = np.array([r["energy_per_molecule_kj_mol"] for r in rows])
    fits: dict[str, Any] = {}
    for name, n_min, power in (
        ("primary", _FIT_MIN_MOLECULES, 1.0 / 3.0),
        ("large", _FIT_MIN_MOLECULES_LARGE, 1.0 / 3.0),
        ("inverse_n", _FIT_MIN_MOLECULES, 1.0),
    ):
        used = n >= n_min
        if used.sum() < 3:
            fits[name] = None
            continue
        x = n[used] ** -power
        fit = linregress(x, y[used])
        residual = y[used] - (fit.intercept + fit.slope * x)
        fits[name] = {
            "variable": "N^(-1/3)" if power < 1 else "1/N",
            "n_min": n_min,
            "sizes": [int(k) for k in n[used]],
            "intercept_kj_mol": float(fit.intercept),
            "intercept_stderr_kj_mol": float(fit.intercept_stderr),
            "slope_kj_mol": float(fit.slope),
            "rms_residual_kj_mol": float(np.sqrt(np.mean(residual**2))),
        }
    intercepts = [fits[k]["intercept_kj_mol"] for k in ("primary", "large") if fits[k]]
    fits["spread_kj_mol"] = float(np.ptp(intercepts)) if len(intercepts) == 2 else None
    return fits


def vacuum_box_check(
    cluster: dict[str, Any], method: str, remove_dispersion: bool, edges_a: list[float]
) -> list[dict[str, Any]]:
    """Periodic minus molecular energy (kJ/mol per molecule) of a cluster in cubic boxes."""
    n = cluster["n_molecules"]
    e_molecular = _energy(cluster["atoms"], method, remove_dispersion)
    rows = []
    for edge in edges_a:
        boxed = cluster["atoms"].copy()
        boxed.cell = np.eye(3) * edge
        boxed.pbc = True
        boxed.center()
        e_periodic = _energy(boxed, method, remove_dispersion)
        rows.append(
            {
                "n_molecules": n,
                "edge_a": edge,
                "periodic_minus_molecular_kj_mol": _kj_mol((e_periodic - e_molecular) / n),
            }
        )
        print(
            f"    vacuum box N={n} L={edge:4.1f} Å: E_pbc − E_mol = "
            f"{rows[-1]['periodic_minus_molecular_kj_mol']:8.3f} kJ/mol per molecule",
            flush=True,
        )
    return rows


# -- output ----------------------------------------------------------------------


def _fit_cell(fit: dict[str, Any] | None) -> str:
    """``intercept ± stderr (rms residual)`` in kJ/mol."""
    if fit is None:
        return "-"
    return (
        f"{fit['intercept_kj_mol']:.1f} ± {fit['intercept_stderr_kj_mol']:.1f} "
        f"(rms {fit['rms_residual_kj_mol']:.1f})"
    )


def _label(method: str, remove_dispersion: bool) -> str:
    own = {"GFN2-xTB": "D4", "GFN1-xTB": "D3"}[method]
    return f"{method} (no {own})" if remove_dispersion else f"{method} (+{own})"


def tables(runs: list[dict[str, Any]]) -> str:
    """Markdown tables of one benchmark run."""
    out = []
    rows = []
    for run in runs:
        for p in run["periodic"]:
            rows.append(
                [
                    run["label"],
                    f"{p['min_cell_width_a']:.0f}",
                    "x".join(map(str, p["supercell_repeats"])),
                    p["n_molecules_evaluated"],
                    f"{p['lattice_energy_kj_mol']:.2f}",
                    f"{p['lattice_energy_kj_mol'] - run['periodic_reference_kj_mol']:+.2f}",
                    f"{p['time_s']:.1f}",
                ]
            )
    out.append(
        markdown_table(
            [
                "method",
                "min_cell_width (Å)",
                "supercell",
                "molecules",
                "E_latt (kJ/mol)",
                "− widest (kJ/mol)",
                "time (s)",
            ],
            rows,
        )
    )
    sizes = [c["n_molecules"] for c in runs[0]["clusters"]]
    radii = [c["radius_a"] for c in runs[0]["clusters"]]
    rows = [
        [n, f"{r:.2f}"]
        + [f"{run['clusters'][i]['energy_per_molecule_kj_mol']:.2f}" for run in runs]
        for i, (n, r) in enumerate(zip(sizes, radii, strict=True))
    ]
    out.append(
        markdown_table(
            ["N", "R (Å)"] + [f"{run['label']} E/N − E_mono (kJ/mol)" for run in runs], rows
        )
    )
    rows = []
    for run in runs:
        fits = run["extrapolation"]
        primary = fits["primary"]
        rows.append(
            [
                run["label"],
                f"{run['periodic'][0]['lattice_energy_kj_mol']:.2f}",
                f"{run['periodic_reference_kj_mol']:.2f}",
                *(_fit_cell(fits[k]) for k in ("primary", "large", "inverse_n")),
                f"{run['periodic_reference_kj_mol'] - primary['intercept_kj_mol']:+.1f}"
                if primary
                else "-",
                f"{run['monomer']['deformation_kj_mol']:.2f}",
            ]
        )
    out.append(
        markdown_table(
            [
                "method",
                "periodic Γ-only raw cell",
                "periodic widest",
                f"clusters → ∞: N^-1/3, N≥{_FIT_MIN_MOLECULES}",
                f"N^-1/3, N≥{_FIT_MIN_MOLECULES_LARGE}",
                f"1/N, N≥{_FIT_MIN_MOLECULES}",
                "periodic widest − clusters (N^-1/3, N≥18)",
                "monomer deformation",
            ],
            rows,
        )
    )
    rows = [
        [
            run["label"],
            b["n_molecules"],
            f"{b['edge_a']:.0f}",
            f"{b['periodic_minus_molecular_kj_mol']:.3f}",
        ]
        for run in runs
        for b in run["vacuum_box"]
    ]
    if rows:
        out.append(
            markdown_table(
                ["method", "N", "box edge (Å)", "E_pbc − E_mol (kJ/mol per molecule)"], rows
            )
        )
    return "\n\n".join(out)


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python number JSON needs; anything else unchanged."""
    return value.item() if isinstance(value, np.generic) else value


def _float_list(text: str) -> list[float]:
    return [float(item) for item in text.split(",") if item.strip()]


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crystal", type=Path, default=DEFAULT_CRYSTAL, help="extxyz crystal")
    parser.add_argument(
        "--methods", default="GFN2-xTB,GFN1-xTB", help="comma-separated GFN methods"
    )
    parser.add_argument(
        "--dispersion-free",
        action="store_true",
        help="also run every method with its own dispersion removed (doubles the time)",
    )
    parser.add_argument(
        "--widths",
        type=_float_list,
        default=None,
        help="min_cell_width values for the periodic route, Å (default 0,7,10; quick 0,7)",
    )
    parser.add_argument(
        "--max-molecules", type=int, default=None, help="largest cluster (default 125; quick 50)"
    )
    parser.add_argument(
        "--box-edges",
        type=_float_list,
        default=None,
        help="vacuum-box edges, Å (default 20,30,40; quick 20,30; '' to skip)",
    )
    parser.add_argument("--quick", action="store_true", help="smaller clusters and cells")
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS_DIR / "bench_periodic_consistency.json",
        help="JSON file to write",
    )
    args = parser.parse_args(argv)
    default_widths = [0.0, 7.0] if args.quick else [0.0, 7.0, 10.0]
    widths = args.widths if args.widths is not None else default_widths
    max_molecules = args.max_molecules or (50 if args.quick else 125)
    box_edges = (
        args.box_edges
        if args.box_edges is not None
        else ([20.0, 30.0] if args.quick else [20.0, 30.0, 40.0])
    )
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]

    warn_if_threads_unset()
    start = time.perf_counter()
    crystal = read(args.crystal)
    molecules = molecules_of(crystal)
    clusters = spherical_clusters(crystal, min_molecules=5, max_molecules=max_molecules)
    box_cluster = next((c for c in clusters if c["n_molecules"] >= 18), clusters[0])
    print(
        f"{args.crystal.name}: {len(molecules)} molecules, cell "
        f"{', '.join(f'{x:.3f}' for x in crystal.cell.lengths())} Å; clusters "
        f"{[c['n_molecules'] for c in clusters]}"
    )
    runs = []
    for remove_dispersion in (False, True) if args.dispersion_free else (False,):
        for method in methods:
            label = _label(method, remove_dispersion)
            print(f"  {label}", flush=True)
            monomer = monomer_energies(molecules, method, remove_dispersion)
            e_mono = monomer["energy_ev"]
            periodic = periodic_lattice_energies(crystal, method, remove_dispersion, e_mono, widths)
            cluster_rows = cluster_lattice_energies(clusters, method, remove_dispersion, e_mono)
            boxes = vacuum_box_check(box_cluster, method, remove_dispersion, box_edges)
            runs.append(
                {
                    "label": label,
                    "method": method,
                    "remove_dispersion": remove_dispersion,
                    "monomer": monomer,
                    "periodic": periodic,
                    "periodic_reference_kj_mol": periodic[-1]["lattice_energy_kj_mol"],
                    "clusters": cluster_rows,
                    "extrapolation": extrapolate(cluster_rows),
                    "vacuum_box": boxes,
                }
            )
    total_s = time.perf_counter() - start
    print()
    print(tables(runs))
    payload = {
        "benchmark": "bench_periodic_consistency",
        "settings": {
            "crystal": str(args.crystal.resolve().relative_to(REPO_ROOT))
            if args.crystal.resolve().is_relative_to(REPO_ROOT)
            else str(args.crystal),
            "crystal_info": {k: _plain(v) for k, v in crystal.info.items()},
            "n_molecules_cell": len(molecules),
            "cell_a": crystal.cell.lengths().tolist(),
            "min_cell_widths_a": widths,
            "max_molecules": max_molecules,
            "box_edges_a": box_edges,
            "monomer_reference": "molecule 0 of the crystal, crystal geometry, non-periodic",
            "engine": "tblite",
            "electronic_temperature_k": 300.0,
            "kj_mol_per_ev": 1.0 / EV_PER_KJ_MOL,
        },
        "machine": machine_info(),
        "total_s": total_s,
        "runs": runs,
    }
    write_json(args.out, payload)
    print(f"\nwrote {args.out} ({total_s:.0f} s)")


if __name__ == "__main__":
    main()
