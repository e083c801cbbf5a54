"""Convergence and cost of the CP2K reference: cutoff (Pulay stress) and box size.

Three measurements with :class:`~deltaml.CP2KReference` (revPBE, dispersion-free,
DZVP-MOLOPT-SR-GTH, GTH-PBE pseudopotentials, unless given otherwise):

1. **cutoff**: the CO2 Pa-3 cell of ``data/crystals/co2_pa3.extxyz`` (4 molecules,
   12 atoms, 5.624 Å; atoms rattled by 0.02 Å so that every force component is
   non-zero) at plane-wave cutoffs from 300 to 800 Ry (``REL_CUTOFF`` fixed). Energy
   per molecule, forces and stress are compared with the highest cutoff: the change
   of the stress with the cutoff is the Pulay stress of an unconverged grid;
2. **rel_cutoff**: the same cell at one cutoff with ``REL_CUTOFF`` 40 to 80 Ry;
3. **box**: an isolated CO2 molecule (the crystal's bond length) with the
   Martyna–Tuckerman Poisson solver, in cubes ``vacuum_a`` = 3 to 8 Å wider than
   it on every side; the energy against the largest box. The revPBE and
   revPBE-D3(BJ) lattice energies ``E_cell / 4 − E_molecule`` follow at the
   chosen defaults.

Every point is one ``cp2k.psmp`` run (start-up included in its time).

Usage::

    python benchmarks/bench_cp2k_reference.py                  # about 10 min on 1 core
    python benchmarks/bench_cp2k_reference.py --quick          # fewer points
    python benchmarks/bench_cp2k_reference.py --omp-threads 2

Units: meV/molecule, meV/Å, GPa (1 GPa = 6.2415 meV/Å³), kJ/mol, s.
Writes ``benchmarks/results/bench_cp2k_reference.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import REPO_ROOT, RESULTS_DIR, machine_info, markdown_table, write_json
from ase import Atoms, units
from ase.io import read

from deltaml import CP2KReference, D3Dispersion

_KJ_MOL = units.kJ / units.mol  # eV per kJ/mol


def _run(atoms: Atoms, properties: list[str], **parameters: Any) -> tuple[dict, float]:
    calc = CP2KReference(**parameters)
    start = time.perf_counter()
    calc.calculate(atoms.copy(), properties)
    return dict(calc.results), time.perf_counter() - start


def _crystal() -> Atoms:
    crystal = read(REPO_ROOT / "data/crystals/co2_pa3.extxyz")
    crystal.positions += np.random.default_rng(0).normal(scale=0.02, size=(len(crystal), 3))
    return crystal


def _molecule() -> Atoms:
    """Linear CO2 with the C=O length of the (unrattled) crystal."""
    bond = float(np.linalg.norm(read(REPO_ROOT / "data/crystals/co2_pa3.extxyz").positions[4]))
    axis = np.ones(3) / np.sqrt(3.0)
    return Atoms("CO2", positions=[np.zeros(3), bond * axis, -bond * axis])


def cutoff_scan(
    crystal: Atoms, cutoffs: list[float], rel_cutoff: float, common: dict
) -> list[dict[str, Any]]:
    """Energy, forces and stress of the cell at each cutoff, vs. the highest."""
    rows = []
    for cutoff in cutoffs:
        results, seconds = _run(
            crystal,
            ["energy", "forces", "stress"],
            cutoff_ry=cutoff,
            rel_cutoff_ry=rel_cutoff,
            **common,
        )
        rows.append(
            {
                "cutoff_ry": cutoff,
                "rel_cutoff_ry": rel_cutoff,
                "seconds": seconds,
                "energy": results["energy"],
                "forces": results["forces"].tolist(),
                "stress": results["stress"].tolist(),
            }
        )
        print(f"  cutoff {cutoff:6.0f} Ry, rel {rel_cutoff:4.0f}: {seconds:6.1f} s", flush=True)
    return rows


def _against_last(rows: list[dict[str, Any]], per: int) -> list[dict[str, Any]]:
    last = rows[-1]
    table = []
    for row in rows:
        stress = np.asarray(row["stress"]) - np.asarray(last["stress"])
        table.append(
            {
                **{k: row[k] for k in ("cutoff_ry", "rel_cutoff_ry", "seconds")},
                "energy_mev_per_molecule": 1e3 * (row["energy"] - last["energy"]) / per,
                "force_max_mev_a": 1e3
                * float(np.abs(np.subtract(row["forces"], last["forces"])).max()),
                "stress_max_gpa": float(np.abs(stress).max()) / units.GPa,
                "pressure_gpa": -float(np.mean(row["stress"][:3])) / units.GPa,
            }
        )
    return table


def box_scan(molecule: Atoms, vacua: list[float], common: dict) -> list[dict[str, Any]]:
    rows = []
    for vacuum in vacua:
        results, seconds = _run(molecule, ["energy", "forces"], vacuum_a=vacuum, **common)
        side = float(np.ptp(molecule.positions, axis=0).max()) + 2 * vacuum
        rows.append(
            {
                "vacuum_a": vacuum,
                "box_a": side,
                "seconds": seconds,
                "energy": results["energy"],
                "forces": results["forces"].tolist(),
            }
        )
        print(f"  vacuum {vacuum:4.1f} Å (box {side:5.2f} Å): {seconds:6.1f} s", flush=True)
    last = rows[-1]
    for row in rows:
        row["energy_mev"] = 1e3 * (row["energy"] - last["energy"])
        row["force_max_mev_a"] = 1e3 * float(
            np.abs(np.subtract(row["forces"], last["forces"])).max()
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer points")
    parser.add_argument("--omp-threads", type=int, default=1)
    parser.add_argument("--basis", default="DZVP-MOLOPT-SR-GTH")
    parser.add_argument("--xc", default="revpbe")
    parser.add_argument("--rel-cutoff", type=float, default=60.0, help="Ry, for the cutoff scan")
    parser.add_argument("--cutoff", type=float, default=600.0, help="Ry, rel_cutoff and box scans")
    parser.add_argument("--vacuum", type=float, default=6.0, help="Å, for the lattice energy")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "bench_cp2k_reference.json")
    args = parser.parse_args()
    common = {"basis": args.basis, "xc": args.xc, "omp_threads": args.omp_threads}
    cutoffs = [300.0, 500.0, 800.0] if args.quick else [300.0, 400.0, 500.0, 600.0, 800.0]
    rel_cutoffs = [40.0, 80.0] if args.quick else [40.0, 50.0, 60.0, 80.0]
    vacua = [3.0, 5.0, 8.0] if args.quick else [3.0, 4.0, 5.0, 6.0, 8.0]

    crystal = _crystal()
    molecule = _molecule()
    per = len(crystal) // 3
    print(f"cutoff scan, CO2 Pa-3 ({len(crystal)} atoms), {args.xc}/{args.basis}", flush=True)
    cutoff_rows = cutoff_scan(crystal, cutoffs, args.rel_cutoff, common)
    print(f"rel_cutoff scan at {args.cutoff:.0f} Ry", flush=True)
    rel_rows = []
    for rel in rel_cutoffs:
        rel_rows += cutoff_scan(crystal, [args.cutoff], rel, common)
    print(f"box scan, CO2 molecule at {args.cutoff:.0f} Ry", flush=True)
    common_box = {**common, "cutoff_ry": args.cutoff, "rel_cutoff_ry": args.rel_cutoff}
    box_rows = box_scan(molecule, vacua, common_box)

    # lattice energy at the chosen settings, in the experimental (unrattled) geometry
    print("lattice energy", flush=True)
    unrattled = read(REPO_ROOT / "data/crystals/co2_pa3.extxyz")
    cell_energy = _run(unrattled, ["energy"], **common_box)[0]["energy"]
    molecule_row = next((r for r in box_rows if r["vacuum_a"] == args.vacuum), None)
    if molecule_row is None:
        molecule_row = box_scan(molecule, [args.vacuum], common_box)[0]
    partner = CP2KReference(xc=args.xc).record()["dispersion_partner"]
    d3 = {}
    for name, atoms in (("cell", unrattled), ("molecule", molecule)):
        atoms = atoms.copy()
        atoms.calc = D3Dispersion(damping="d3bj", method=args.xc)
        d3[name] = atoms.get_potential_energy()
    lattice = cell_energy / per - molecule_row["energy"]
    lattice_d3 = lattice + d3["cell"] / per - d3["molecule"]

    cutoff_table = _against_last(cutoff_rows, per)
    rel_table = _against_last(rel_rows, per)
    header = ["cutoff Ry", "rel Ry", "ΔE meV/mol", "max ΔF meV/Å", "max Δσ GPa", "P GPa", "s"]

    def rows_of(table: list[dict[str, Any]]) -> list[list[str]]:
        return [
            [
                f"{r['cutoff_ry']:.0f}",
                f"{r['rel_cutoff_ry']:.0f}",
                f"{r['energy_mev_per_molecule']:+.2f}",
                f"{r['force_max_mev_a']:.2f}",
                f"{r['stress_max_gpa']:.4f}",
                f"{r['pressure_gpa']:+.4f}",
                f"{r['seconds']:.0f}",
            ]
            for r in table
        ]

    print("\ncutoff convergence (against the highest cutoff)")
    print(markdown_table(header, rows_of(cutoff_table)))
    print(f"\nrel_cutoff convergence at {args.cutoff:.0f} Ry (against the highest)")
    print(markdown_table(header, rows_of(rel_table)))
    print("\nisolated CO2, Martyna–Tuckerman (against the largest box)")
    print(
        markdown_table(
            ["vacuum Å", "box Å", "ΔE meV", "max ΔF meV/Å", "s"],
            [
                [
                    f"{r['vacuum_a']:.1f}",
                    f"{r['box_a']:.2f}",
                    f"{r['energy_mev']:+.3f}",
                    f"{r['force_max_mev_a']:.2f}",
                    f"{r['seconds']:.0f}",
                ]
                for r in box_rows
            ],
        )
    )
    print(
        f"\nlattice energy at {args.cutoff:.0f}/{args.rel_cutoff:.0f} Ry, vacuum {args.vacuum} Å "
        f"(experimental geometry): {args.xc} {lattice / _KJ_MOL:+.2f} kJ/mol, "
        f"{args.xc}-D3(BJ) ({partner}) {lattice_d3 / _KJ_MOL:+.2f} kJ/mol"
    )
    write_json(
        args.out,
        {
            "benchmark": "bench_cp2k_reference",
            "machine": machine_info(),
            "settings": {**common, "structure": "data/crystals/co2_pa3.extxyz, rattled 0.02 Å"},
            "record": CP2KReference(**common_box).record(),
            "cutoff_scan": cutoff_table,
            "rel_cutoff_scan": rel_table,
            "box_scan": [{k: v for k, v in r.items() if k not in ("forces",)} for r in box_rows],
            "lattice_energy_kj_mol": {
                "dft": lattice / _KJ_MOL,
                "dft_d3": lattice_d3 / _KJ_MOL,
                "d3_partner": partner,
                "cutoff_ry": args.cutoff,
                "rel_cutoff_ry": args.rel_cutoff,
                "vacuum_a": args.vacuum,
            },
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
