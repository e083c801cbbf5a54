"""Periodic GFN2-xTB in the tblite Python wheel against a published CP2K value: ice Ih.

A minimal, reproducible statement of the discrepancy recorded in issue 14, for an
upstream report. It uses :class:`tblite.interface.Calculator` directly (deltaml
only for cell widths and, through ``bench_periodic_consistency``, the cluster-limit
fits; the README's snippet needs neither).

**The cell.** The 12-molecule (36-atom) hexagonal ice Ih cell of the CP2K
manual's tblite example (``ice_Ih_GFN2_k333``, section "Extended Tight Binding",
lattice vectors and scaled coordinates copied verbatim below; the manual runs it
with a 3×3×3 MacDonald mesh, the reference value quoted here is Γ only).

**The reference.** CP2K with tblite (fixed multipole Ewald sum, as published by
its developers, quoted in issue 14): E(GFN2, Γ) = −61.08934 Eh for this cell;
for GFN1 the two codes differ by 3.0 kJ/mol per molecule (that total is not
recorded here).

Part 1, on that cell, each with GFN2-xTB, GFN2-xTB whose multipole
(anisotropic electrostatics, AES) section is removed from the parametrization,
and GFN1-xTB (no multipoles):

1. the total energy of the cell at Γ (and at accuracy 0.1 and 0.01);
2. the same lattice written with two other, equivalent basis vectors (a
   correct lattice sum gives the same energy to the SCF tolerance);
3. Γ-only supercells: 2×2×1 (the smallest ≥ 7 Å wide, the project convention)
   and 2×2×2, per molecule against the cell: this is the k-point error of Γ-only
   sampling; below 1 kJ/mol, the gap to CP2K is not sampling;
4. the isolated molecules (each of the 12 in its crystal geometry; molecule 0
   also relaxed), hence lattice energies per molecule.

This cell is polar (its proton order leaves a net dipole along c), so
spherical clusters cut from it carry a depolarisation energy that the periodic,
tin-foil Ewald sum does not have. Part 2 therefore uses the non-polar ice Ih
cell of ``bench_periodic_consistency.py`` (``data/crystals/ice_ih.extxyz``): its
periodic lattice energy (supercell ≥ 7 Å) against the limit of shell-closed
spherical clusters (N^(-1/3) fit over N ≥ 18, as there) for GFN2-xTB, GFN2-xTB
without AES, GFN2-xTB without any electrostatics beyond H0 (no AES, no
third-order, no second-order Coulomb: a non-SCC calculation), GFN2-xTB with the
exponent of the Coulomb kernel set to 4 instead of 2, and GFN1-xTB: which
term carries the periodic-vs-molecular gap.

Part 3, no periodicity: two water molecules whose dipole-dipole energy is zero
by symmetry, E_int·d³ at d = 8-48 Å. The kernel γ_ab = (R² + η_ab⁻²)^(-1/2)
approaches 1/R as −η_ab⁻²/(2R³), which does not cancel between neutral molecules
when η_ab depends on the pair of shells; the limit C of E_int·d³ and 2πρC, the
energy per molecule that such a tail adds per e-fold of radius in ice (density
ρ of the part 1 cell), for GFN2-xTB, without AES and D4, with exponent 4, and
GFN1-xTB with and without D3.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_tblite_periodic.py            # ~5-6 min
    OMP_NUM_THREADS=1 python benchmarks/bench_tblite_periodic.py --quick    # ~1-2 min, no part 2

Writes ``benchmarks/results/bench_tblite_periodic.json`` (``--out``). Energies in
Eh (totals) and kJ/mol per molecule (differences); 1 Eh = 2625.4996 kJ/mol.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
from _common import RESULTS_DIR, machine_info, markdown_table, warn_if_threads_unset, write_json
from bench_periodic_consistency import extrapolate
from scipy.optimize import minimize

from deltaml.structures import perpendicular_widths

#: Å per Bohr (CODATA 2018, as tblite and ASE use it).
BOHR_A = 0.529177210903
#: kJ/mol per Hartree (CODATA 2018).
KJ_MOL_PER_EH = 2625.4996394799
#: Electronic temperature, K (tblite's default 9.5e-4 Eh is 300 K).
TEMPERATURE_K = 300.0
#: Boltzmann constant, Eh/K.
KB_EH_PER_K = 3.166808578545117e-6
ACCURACY = 1.0
MAX_ITER = 250

#: CP2K with tblite, Γ only, GFN2-xTB, this cell (issue 14).
CP2K_GFN2_GAMMA_EH = -61.08934
#: |E_wheel − E_CP2K| for GFN1-xTB, kJ/mol per molecule (issue 14; the total is not recorded).
CP2K_GFN1_GAP_KJ_MOL = 3.0

#: Lattice vectors, Å (CP2K manual, ice_Ih_GFN2_k333).
LATTICE_A = np.array(
    [
        [7.678093, 0.000000, 0.000000],
        [3.839046, 6.649423, 0.000000],
        [0.000000, 0.000000, 7.234567],
    ]
)
#: Scaled (fractional) coordinates, in the manual's order (24 H, then 12 O).
SCALED = """
H  0.000007  0.334718  0.199799
H  0.665252  0.000010  0.199780
H  0.334714  0.665261  0.199791
H  0.334760  0.999976  0.699786
H  0.999980  0.665239  0.699800
H  0.665240  0.334755  0.699799
H  0.544461  0.000006  0.019584
H -0.000011  0.455520  0.019605
H  0.455505  0.544480  0.019594
H  0.455543  0.999980  0.519584
H  0.999998  0.544446  0.519600
H  0.544461  0.455524  0.519592
H  0.332240  0.879481  0.984486
H  0.211731  1.120507  0.984481
H  0.879462  0.788265  0.984489
H  0.788248  0.332255  0.984498
H  0.667731  0.211748  0.984486
H  0.120526  0.211703  0.484497
H  0.667762  1.120506  0.484488
H  0.788272  0.879477  0.484480
H  0.211722  0.667743  0.484495
H  0.332240  0.788252  0.484486
H -0.120503  0.332222  0.484499
H  1.120486  0.667750  0.984491
O  0.000009  0.331330  0.061616
O  0.668637  0.000012  0.061595
O  0.331326  0.668660  0.061608
O  0.331370  0.999972  0.561601
O  0.668637  0.331348  0.561616
O  0.335676  0.999992  0.936746
O  0.664294  0.335703  0.936768
O  0.000012  0.335655  0.436771
O  0.664333  0.999995  0.436740
O  0.335670  0.664304  0.436760
O  0.999979  0.668634  0.561617
O  0.999974  0.664306  0.94229901
"""

#: Two oxygen distances belong to different coordination shells if they differ by more, Å.
_SHELL_GAP_A = 0.1
#: Smallest perpendicular width of a periodic cell, Å (the project's ``min_cell_width``).
MIN_WIDTH_A = 7.0
#: Part 3: distances of the water pair, Å.
TAIL_DISTANCES_A = [8.0, 12.0, 16.0, 24.0, 32.0, 48.0]
#: Part 3 needs tight SCF: E_int at 48 Å is ~1e-7 Eh.
TAIL_ACCURACY = 0.01
#: Part 2: the non-polar ice Ih cell of ``bench_periodic_consistency.py``.
NONPOLAR_CRYSTAL = Path(__file__).resolve().parent.parent / "data" / "crystals" / "ice_ih.extxyz"


def ice_cell() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Atomic numbers, Cartesian positions (Å) and lattice (Å) of the 36-atom cell."""
    rows = [line.split() for line in SCALED.strip().splitlines()]
    numbers = np.array([{"H": 1, "O": 8}[row[0]] for row in rows])
    scaled = np.array([[float(x) for x in row[1:]] for row in rows])
    return numbers, scaled @ LATTICE_A, LATTICE_A.copy()


def supercell(
    numbers: np.ndarray, positions: np.ndarray, lattice: np.ndarray, repeats: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The cell repeated ``repeats`` times along its lattice vectors."""
    shifts = np.array(list(np.ndindex(*repeats))) @ lattice
    big = (positions[None, :, :] + shifts[:, None, :]).reshape(-1, 3)
    return np.tile(numbers, len(shifts)), big, lattice * np.array(repeats)[:, None]


def whole_molecules(numbers: np.ndarray, positions: np.ndarray, lattice: np.ndarray) -> np.ndarray:
    """Water molecules as (n, 3, 3) positions (O, H, H), each H unwrapped to its nearest O."""
    oxygens = positions[numbers == 8]
    hydrogens = positions[numbers == 1]
    inverse = np.linalg.inv(lattice)
    partners: list[list[np.ndarray]] = [[] for _ in oxygens]
    for h in hydrogens:
        delta = h - oxygens
        delta -= np.round(delta @ inverse) @ lattice
        nearest = int(np.argmin(np.linalg.norm(delta, axis=1)))
        partners[nearest].append(oxygens[nearest] + delta[nearest])
    if any(len(p) != 2 for p in partners):
        raise ValueError("every oxygen should have exactly two nearest hydrogens")
    return np.array([[o, *p] for o, p in zip(oxygens, partners, strict=True)])


def point_charge_dipole(molecules: np.ndarray) -> np.ndarray:
    """Net dipole (e·Å) of whole molecules with charges O −2, H +1: zero for a non-polar cell."""
    return (molecules[:, 1] + molecules[:, 2] - 2.0 * molecules[:, 0]).sum(axis=0)


# -- tblite ----------------------------------------------------------------------


def _gfn_param(method: str) -> dict:
    from tblite import library

    exporter = {"GFN2-xTB": library.export_gfn2_param, "GFN1-xTB": library.export_gfn1_param}
    param = library.new_param()
    exporter[method](param)
    table = library.new_table()
    library.dump_param(param, table)
    return library.table_to_dict(table)


def methods() -> dict[str, Any]:
    """Part 1: label → what ``tblite.interface.Calculator`` takes as its method."""
    return {
        "GFN2-xTB": "GFN2-xTB",
        "GFN2-xTB no AES": variant("GFN2-xTB", drop=("multipole",)),
        "GFN1-xTB": "GFN1-xTB",
    }


def variant(method: str, drop: tuple[str, ...] = (), gexp: float | None = None) -> dict:
    """The parametrization of ``method`` with sections removed or the Coulomb exponent changed.

    ``gexp`` is the exponent g of tblite's isotropic Coulomb kernel
    γ_ab(R) = (R^g + η_ab^-g)^(-1/g) (2 in GFN1 and GFN2); for g = 2 the kernel
    approaches 1/R only as −η_ab^-2 / (2 R³), for g = 4 as −η_ab^-4 / (4 R⁵).
    """
    param = copy.deepcopy(_gfn_param(method))
    for section in drop:
        del param[section]
    if gexp is not None:
        param["charge"]["effective"]["gexp"] = gexp
    changes = [f"no {s}" for s in drop] + ([f"gexp {gexp:g}"] if gexp is not None else [])
    param["meta"]["name"] = f"{method} ({', '.join(changes)})"
    return param


def diagnostic_methods() -> dict[str, Any]:
    """Part 2: which term carries the periodic-vs-cluster gap."""
    return {
        "GFN2-xTB": "GFN2-xTB",
        "GFN2-xTB no AES": variant("GFN2-xTB", drop=("multipole",)),
        "GFN2-xTB no Coulomb (non-SCC)": variant(
            "GFN2-xTB", drop=("multipole", "thirdorder", "charge")
        ),
        "GFN2-xTB gexp 4": variant("GFN2-xTB", gexp=4.0),
        "GFN1-xTB": "GFN1-xTB",
    }


def singlepoint(
    method: Any,
    numbers: np.ndarray,
    positions: np.ndarray,
    lattice: np.ndarray | None = None,
    accuracy: float = ACCURACY,
) -> tuple[float, np.ndarray, float]:
    """Energy (Eh), gradient (Eh/Bohr) and wall time (s); 3D-periodic if ``lattice`` is given."""
    from tblite.interface import Calculator

    start = time.perf_counter()
    kwargs: dict[str, Any] = {}
    if lattice is not None:
        kwargs = {"lattice": lattice / BOHR_A, "periodic": np.array([True, True, True])}
    calc = Calculator(method, numbers, positions / BOHR_A, **kwargs)
    calc.set("verbosity", 0)
    calc.set("accuracy", accuracy)
    calc.set("max-iter", MAX_ITER)
    calc.set("temperature", TEMPERATURE_K * KB_EH_PER_K)
    result = calc.singlepoint()
    return (
        float(result.get("energy")),
        np.asarray(result.get("gradient")),
        time.perf_counter() - start,
    )


def relaxed_monomer(method: Any, molecule: np.ndarray) -> float:
    """Energy (Eh) of one water molecule relaxed from ``molecule`` (Å)."""
    numbers = np.array([8, 1, 1])

    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        energy, gradient, _ = singlepoint(method, numbers, x.reshape(3, 3))
        return energy, gradient.ravel() / BOHR_A  # Eh/Å

    result = minimize(fun, molecule.ravel(), jac=True, method="BFGS", options={"gtol": 1e-5})
    return float(result.fun)


# -- clusters ----------------------------------------------------------------------


def spherical_clusters(molecules: np.ndarray, lattice: np.ndarray, max_molecules: int) -> list:
    """Shell-closed spheres of whole molecules around molecule 0 (O within R of its O).

    Returns
    -------
    list of (n_molecules, radius_a, positions (n, 3, 3))
    """
    n_cell = len(molecules)
    volume = abs(np.linalg.det(lattice))
    radius_max = (3.0 * max_molecules * volume / n_cell / (4.0 * math.pi)) ** (1.0 / 3.0) + 3.0
    repeats = [math.ceil((2.0 * radius_max + 4.0) / w) for w in perpendicular_widths(lattice)]
    shifts = np.array(list(np.ndindex(*repeats))) @ lattice
    big = (molecules[None] + shifts[:, None, None, :]).reshape(-1, 3, 3)
    centre = molecules[0, 0] + np.array([r // 2 for r in repeats]) @ lattice
    distance = np.linalg.norm(big[:, 0] - centre, axis=1)
    order = np.argsort(distance, kind="stable")
    sorted_d = distance[order]
    clusters = []
    for n in range(1, len(order)):
        if sorted_d[n] - sorted_d[n - 1] <= _SHELL_GAP_A:
            continue
        if n > max_molecules or sorted_d[n] > radius_max:
            break
        if n >= 5:
            radius = float((sorted_d[n - 1] + sorted_d[n]) / 2.0)
            clusters.append((n, radius, big[order[:n]]))
    return clusters


# -- the two parts -------------------------------------------------------------------


def _per_molecule_kj(energy_eh: float, n_molecules: int) -> float:
    return energy_eh / n_molecules * KJ_MOL_PER_EH


def _monomers(method: Any, molecules: np.ndarray) -> dict[str, float]:
    """Isolated molecules (Eh): each in its crystal geometry, and molecule 0 relaxed."""
    energies = [singlepoint(method, np.array([8, 1, 1]), m)[0] for m in molecules]
    mean = float(np.mean(energies))
    relaxed = relaxed_monomer(method, molecules[0])
    return {
        "crystal_geometry_mean_eh": mean,
        "crystal_geometry_spread_eh": float(np.ptp(energies)),
        "molecule0_relaxed_eh": relaxed,
        "deformation_kj_mol": (mean - relaxed) * KJ_MOL_PER_EH,
    }


def cell_run(
    label: str,
    method: Any,
    numbers: np.ndarray,
    positions: np.ndarray,
    lattice: np.ndarray,
    repeats_list: list[tuple[int, int, int]],
) -> dict[str, Any]:
    """Part 1 for one method: Γ cell, equivalent bases, supercells, monomer, lattice energy."""
    molecules = whole_molecules(numbers, positions, lattice)
    n_cell = len(molecules)
    run: dict[str, Any] = {"label": label}
    e_cell, _, t_cell = singlepoint(method, numbers, positions, lattice)
    run["cell_gamma_eh"] = e_cell
    run["cell_gamma_time_s"] = t_cell
    print(f"    cell, Γ: {e_cell:.8f} Eh ({t_cell:.1f} s)", flush=True)
    run["accuracy_check_eh"] = {
        str(acc): singlepoint(method, numbers, positions, lattice, accuracy=acc)[0]
        for acc in (0.1, 0.01)
    }
    print(f"    accuracy 0.1, 0.01: {run['accuracy_check_eh']}", flush=True)
    a, b, c = lattice
    run["equivalent_cells"] = []
    for name, other in (("(a, b-a, c)", [a, b - a, c]), ("(a, b, c+a)", [a, b, c + a])):
        energy = singlepoint(method, numbers, positions, np.array(other))[0]
        shift = _per_molecule_kj(energy - e_cell, n_cell)
        run["equivalent_cells"].append(
            {"basis": name, "energy_eh": energy, "minus_cell_kj_mol": shift}
        )
        print(f"    same lattice, basis {name}: {shift:+.1e} kJ/mol per molecule", flush=True)
    run["supercells"] = []
    for repeats in repeats_list:
        big = supercell(numbers, positions, lattice, repeats)
        n_copies = int(np.prod(repeats))
        energy, _, elapsed = singlepoint(method, *big)
        row = {
            "repeats": list(repeats),
            "n_molecules": n_cell * n_copies,
            "min_width_a": float(perpendicular_widths(big[2]).min()),
            "energy_eh": energy,
            "per_cell_eh": energy / n_copies,
            "minus_cell_kj_mol": _per_molecule_kj(energy / n_copies - e_cell, n_cell),
            "time_s": elapsed,
        }
        run["supercells"].append(row)
        print(
            f"    {'x'.join(map(str, repeats))} ({row['n_molecules']} H2O), Γ: {energy:.8f} Eh, "
            f"per molecule − cell {row['minus_cell_kj_mol']:+.3f} kJ/mol ({elapsed:.1f} s)",
            flush=True,
        )
    run["monomer"] = _monomers(method, molecules)
    e_mono = run["monomer"]["crystal_geometry_mean_eh"]
    run["lattice_energy_kj_mol"] = {
        "cell_gamma": _per_molecule_kj(e_cell, n_cell) - e_mono * KJ_MOL_PER_EH,
        "largest_supercell": _per_molecule_kj(run["supercells"][-1]["per_cell_eh"], n_cell)
        - e_mono * KJ_MOL_PER_EH,
    }
    print(
        f"    monomer (mean, crystal geometry) {e_mono:.8f} Eh; lattice energy (Γ cell) "
        f"{run['lattice_energy_kj_mol']['cell_gamma']:.2f} kJ/mol",
        flush=True,
    )
    return run


def consistency_run(
    label: str, method: Any, crystal: Any, repeats: tuple[int, int, int], max_molecules: int
) -> dict[str, Any]:
    """Part 2 for one method: periodic vs. cluster-limit lattice energy of a non-polar cell."""
    numbers, positions, lattice = crystal.numbers, crystal.positions, crystal.cell.array
    molecules = whole_molecules(numbers, positions, lattice)
    n_cell = len(molecules)
    monomer = _monomers(method, molecules)
    e_mono = monomer["crystal_geometry_mean_eh"]
    big = supercell(numbers, positions, lattice, repeats)
    energy, _, elapsed = singlepoint(method, *big)
    periodic = _per_molecule_kj(energy / np.prod(repeats), n_cell) - e_mono * KJ_MOL_PER_EH
    print(f"    periodic {'x'.join(map(str, repeats))}: {periodic:.2f} kJ/mol", flush=True)
    rows = []
    for n, radius, cluster in spherical_clusters(molecules, lattice, max_molecules):
        e_cluster, _, t_cluster = singlepoint(method, np.tile([8, 1, 1], n), cluster.reshape(-1, 3))
        rows.append(
            {
                "n_molecules": n,
                "radius_a": radius,
                "energy_per_molecule_kj_mol": (e_cluster / n - e_mono) * KJ_MOL_PER_EH,
                "time_s": t_cluster,
            }
        )
        print(
            f"    cluster N={n:4d}: {rows[-1]['energy_per_molecule_kj_mol']:8.2f} kJ/mol "
            f"({t_cluster:.1f} s)",
            flush=True,
        )
    limit = extrapolate(rows)
    return {
        "label": label,
        "monomer": monomer,
        "periodic": {
            "repeats": list(repeats),
            "energy_eh": energy,
            "lattice_energy_kj_mol": periodic,
            "time_s": elapsed,
        },
        "clusters": rows,
        "cluster_limit": limit,
        "periodic_minus_cluster_limit_kj_mol": periodic - limit["primary"]["intercept_kj_mol"],
    }


def tail_methods() -> dict[str, Any]:
    """Part 3: the 1/d³ tail between two neutral molecules, by term."""
    return {
        "GFN2-xTB": "GFN2-xTB",
        "GFN2-xTB no AES, no D4": variant("GFN2-xTB", drop=("multipole", "dispersion")),
        "GFN2-xTB gexp 4": variant("GFN2-xTB", gexp=4.0),
        "GFN1-xTB": "GFN1-xTB",
        "GFN1-xTB no D3": variant("GFN1-xTB", drop=("dispersion",)),
    }


def water_pair_tail(method: Any, distances_a: list[float]) -> dict[str, Any]:
    """Interaction of two water molecules whose dipole-dipole energy is zero by symmetry.

    Molecule 1 lies in the xy plane with its dipole along +y, molecule 2 in the
    yz plane with its dipole along +z, displaced by d along x: μ1·μ2 = 0 and
    μ1·x̂ = 0, so the dipole-dipole term vanishes at every d and what remains
    decays as d⁻⁴ (dipole-quadrupole) or faster, for point multipoles. A kernel
    γ_ab = (R² + η_ab⁻²)^(-1/2) adds −Σ q_a q_b η_ab⁻² / (2 d³), which does not
    cancel for neutral molecules when η_ab depends on the pair of atoms (shells).

    Returns
    -------
    dict
        ``rows`` (d in Å, E_int in kJ/mol, E_int·d³ in Eh·Bohr³) and ``c_eh_bohr3``:
        E_int·d³ at the largest d, the estimate of its limit.
    """
    half = np.radians(104.52) / 2.0
    y, x = 0.9572 * np.cos(half), 0.9572 * np.sin(half)
    first = np.array([[0.0, 0.0, 0.0], [x, y, 0.0], [-x, y, 0.0]])
    second = np.array([[0.0, 0.0, 0.0], [0.0, x, y], [0.0, -x, y]])
    water = np.array([8, 1, 1])
    e1 = singlepoint(method, water, first, accuracy=TAIL_ACCURACY)[0]
    e2 = singlepoint(method, water, second, accuracy=TAIL_ACCURACY)[0]
    rows = []
    for d in distances_a:
        pair = np.vstack([first, second + np.array([d, 0.0, 0.0])])
        e_pair = singlepoint(method, np.tile(water, 2), pair, accuracy=TAIL_ACCURACY)[0]
        e_int = e_pair - e1 - e2
        rows.append(
            {
                "d_a": d,
                "e_int_kj_mol": e_int * KJ_MOL_PER_EH,
                "e_int_d3_eh_bohr3": e_int * (d / BOHR_A) ** 3,
            }
        )
    # E_int·d³ still drifts by ~1 % between the two largest d (d⁻⁴, d⁻⁵ terms):
    # its value at the largest d is the estimate of the limit C.
    return {"rows": rows, "c_eh_bohr3": rows[-1]["e_int_d3_eh_bohr3"]}


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="no 2x2x2 supercell, no part 2")
    parser.add_argument(
        "--crystal", type=Path, default=NONPOLAR_CRYSTAL, help="non-polar cell for part 2"
    )
    parser.add_argument("--max-molecules", type=int, default=92, help="largest cluster, part 2")
    parser.add_argument(
        "--out", type=Path, default=RESULTS_DIR / "bench_tblite_periodic.json", help="JSON file"
    )
    args = parser.parse_args(argv)
    warn_if_threads_unset()
    start = time.perf_counter()

    numbers, positions, lattice = ice_cell()
    molecules = whole_molecules(numbers, positions, lattice)
    n_cell = len(molecules)
    widths = perpendicular_widths(lattice)
    dipole = point_charge_dipole(molecules)
    print(
        f"tblite {version('tblite')}; part 1: ice Ih, {n_cell} H2O, perpendicular widths "
        f"{', '.join(f'{w:.3f}' for w in widths)} Å, point-charge dipole "
        f"{np.linalg.norm(dipole):.2f} e·Å"
    )
    repeats_list = [(2, 2, 1)] if args.quick else [(2, 2, 1), (2, 2, 2)]
    runs = []
    for label, method in methods().items():
        print(f"  {label}", flush=True)
        runs.append(cell_run(label, method, numbers, positions, lattice, repeats_list))

    gfn2 = runs[0]
    reference = {
        "cp2k_gfn2_gamma_eh": CP2K_GFN2_GAMMA_EH,
        "wheel_minus_cp2k_gfn2_kj_mol": _per_molecule_kj(
            gfn2["cell_gamma_eh"] - CP2K_GFN2_GAMMA_EH, n_cell
        ),
        "cp2k_gfn2_lattice_energy_kj_mol": _per_molecule_kj(CP2K_GFN2_GAMMA_EH, n_cell)
        - gfn2["monomer"]["crystal_geometry_mean_eh"] * KJ_MOL_PER_EH,
        "cp2k_gfn1_gap_kj_mol": CP2K_GFN1_GAP_KJ_MOL,
        "note": "the CP2K lattice energy assumes the same molecular GFN2 energy in both codes",
    }

    consistency: dict[str, Any] = {}
    if not args.quick:
        from ase.io import read

        crystal = read(args.crystal)
        other = whole_molecules(crystal.numbers, crystal.positions, crystal.cell.array)
        widths_2 = perpendicular_widths(crystal.cell.array)
        repeats = tuple(math.ceil(MIN_WIDTH_A / w) for w in widths_2)
        print(
            f"part 2: {args.crystal.name}, {len(other)} H2O, widths "
            f"{', '.join(f'{w:.3f}' for w in widths_2)} Å, point-charge dipole "
            f"{np.linalg.norm(point_charge_dipole(other)):.2f} e·Å",
            flush=True,
        )
        consistency = {"crystal": args.crystal.name, "max_molecules": args.max_molecules}
        consistency["runs"] = []
        for label, method in diagnostic_methods().items():
            print(f"  {label}", flush=True)
            consistency["runs"].append(
                consistency_run(label, method, crystal, repeats, args.max_molecules)
            )

    # Part 3: a 1/d³ pair tail C summed over a crystal of density ρ gives, per molecule,
    # ½ ∫ ρ C / r³ 4πr² dr = 2πρC per e-fold of radius: no finite bulk limit.
    density = n_cell / abs(np.linalg.det(lattice / BOHR_A))  # molecules per Bohr³
    tail: dict[str, Any] = {
        "distances_a": TAIL_DISTANCES_A,
        "density_molecules_per_bohr3": density,
        "runs": [],
    }
    print("part 3: water pair with zero dipole-dipole energy, E_int·d³ (Eh·Bohr³)", flush=True)
    for label, method in tail_methods().items():
        result = water_pair_tail(method, TAIL_DISTANCES_A)
        result["label"] = label
        result["kj_mol_per_efold_in_ice"] = (
            2.0 * math.pi * density * result["c_eh_bohr3"] * KJ_MOL_PER_EH
        )
        tail["runs"].append(result)
        print(
            f"  {label}: "
            + ", ".join(f"{r['e_int_d3_eh_bohr3']:+.4f}" for r in result["rows"])
            + f"; limit C = {result['c_eh_bohr3']:+.4f}, 2πρC = "
            f"{result['kj_mol_per_efold_in_ice']:+.2f} kJ/mol per e-fold",
            flush=True,
        )

    total_s = time.perf_counter() - start
    print()
    print(tables(runs, reference, consistency, tail))
    payload = {
        "benchmark": "bench_tblite_periodic",
        "tblite_version": version("tblite"),
        "cell": {
            "source": "CP2K manual, Extended Tight Binding, example ice_Ih_GFN2_k333",
            "n_molecules": n_cell,
            "lattice_a": lattice.tolist(),
            "symbols": ["H" if z == 1 else "O" for z in numbers],
            "scaled_positions": [
                [float(x) for x in row.split()[1:]] for row in SCALED.strip().splitlines()
            ],
            "cartesian_positions_a": positions.tolist(),
            "perpendicular_widths_a": widths.tolist(),
            "point_charge_dipole_e_a": dipole.tolist(),
        },
        "settings": {
            "interface": "tblite.interface.Calculator",
            "accuracy": ACCURACY,
            "electronic_temperature_k": TEMPERATURE_K,
            "temperature_eh": TEMPERATURE_K * KB_EH_PER_K,
            "max_iter": MAX_ITER,
            "charge": 0,
            "uhf": 0,
            "sampling": "Γ only (tblite has no k-points); supercells for sampling",
            "bohr_a": BOHR_A,
            "kj_mol_per_eh": KJ_MOL_PER_EH,
            "monomer_reference": "mean over the molecules in crystal geometry, non-periodic",
        },
        "reference": reference,
        "machine": machine_info(),
        "total_s": total_s,
        "runs": runs,
        "consistency": consistency,
        "pair_tail": tail,
    }
    write_json(args.out, payload)
    print(f"\nwrote {args.out} ({total_s:.0f} s)")


def _fit_cell(fit: dict[str, Any] | None) -> str:
    if fit is None:
        return "-"
    return f"{fit['intercept_kj_mol']:.1f} ± {fit['intercept_stderr_kj_mol']:.1f}"


def tables(
    runs: list[dict[str, Any]],
    reference: dict[str, Any],
    consistency: dict[str, Any],
    tail: dict[str, Any],
) -> str:
    """Markdown tables of one run."""
    out = []
    header = ["method", "E(cell, Γ) (Eh)", "other bases − cell"]
    header += [f"{'x'.join(map(str, s['repeats']))} − cell" for s in runs[0]["supercells"]]
    header += ["E_mono (Eh)", "E_latt Γ cell", "E_latt largest"]
    rows = []
    for run in runs:
        shift = max(abs(e["minus_cell_kj_mol"]) for e in run["equivalent_cells"])
        rows.append(
            [
                run["label"],
                f"{run['cell_gamma_eh']:.6f}",
                f"{shift:.0e}",
                *(f"{s['minus_cell_kj_mol']:+.2f}" for s in run["supercells"]),
                f"{run['monomer']['crystal_geometry_mean_eh']:.6f}",
                f"{run['lattice_energy_kj_mol']['cell_gamma']:.2f}",
                f"{run['lattice_energy_kj_mol']['largest_supercell']:.2f}",
            ]
        )
    out.append(markdown_table(header, rows))
    out.append(
        f"CP2K GFN2 Γ {reference['cp2k_gfn2_gamma_eh']:.5f} Eh; wheel − CP2K "
        f"{reference['wheel_minus_cp2k_gfn2_kj_mol']:+.2f} kJ/mol per molecule; CP2K lattice "
        f"energy {reference['cp2k_gfn2_lattice_energy_kj_mol']:.2f} kJ/mol"
    )
    if consistency:
        c_runs = consistency["runs"]
        sizes = [r["n_molecules"] for r in c_runs[0]["clusters"]]
        rows = [
            [n, f"{c_runs[0]['clusters'][i]['radius_a']:.2f}"]
            + [f"{run['clusters'][i]['energy_per_molecule_kj_mol']:.2f}" for run in c_runs]
            for i, n in enumerate(sizes)
        ]
        out.append(markdown_table(["N", "R (Å)"] + [run["label"] for run in c_runs], rows))
        rows = [
            [
                run["label"],
                f"{run['periodic']['lattice_energy_kj_mol']:.2f}",
                *(_fit_cell(run["cluster_limit"][k]) for k in ("primary", "large", "inverse_n")),
                f"{run['periodic_minus_cluster_limit_kj_mol']:+.1f}",
            ]
            for run in c_runs
        ]
        out.append(
            markdown_table(
                [
                    "method",
                    "periodic",
                    "clusters N^-1/3, N≥18",
                    "N^-1/3, N≥39",
                    "1/N, N≥18",
                    "periodic − clusters",
                ],
                rows,
            )
        )
    header = ["method"] + [f"d = {d:g} Å" for d in tail["distances_a"]]
    header += ["C = E_int·d³ at largest d", "2πρC (kJ/mol per e-fold)"]
    rows = [
        [run["label"]]
        + [f"{r['e_int_d3_eh_bohr3']:+.4f}" for r in run["rows"]]
        + [f"{run['c_eh_bohr3']:+.4f}", f"{run['kj_mol_per_efold_in_ice']:+.2f}"]
        for run in tail["runs"]
    ]
    out.append(markdown_table(header, rows))
    return "\n\n".join(out)


if __name__ == "__main__":
    main()
