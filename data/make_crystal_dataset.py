"""Periodic reference labels of molecular crystals, gathered by active learning (issue 14).

Four stages, each resumable (run the script again after an interruption; the
labels shipped in ``data/labelled/crystals.extxyz`` go into a new store first, so
that a fresh checkout resumes where the last export stopped):

1. ``structures``: the starting cells, seeded: seven ice phases from GenIce2
   (:func:`deltaml.crystals.ice_polymorph`: Ih, Ic, II, IX, XIII, VI, VIII), CO2 I
   (Pa-3) and III (Cmca), α- and β-oxalic acid, urea I, benzene I, aspirin I
   and II and two forms of an imide (3-azabicyclo[3.3.1]nonane-2,4-dione) from
   ``data/crystals`` (the organic ones from the CSD, ``make_organic_crystals.py``),
   each the smallest supercell at least 7 Å wide (:func:`deltaml.crystals.wide_cell`:
   CP2K's Γ point and the baseline then see the same cell), written once to
   ``data/structures/crystal_starts.extxyz`` (kept, so that a rerun never changes
   the keys of a half-done store; a system added to the script later is appended).
   Beside them, ``data/structures/crystal_molecules.extxyz``: each distinct
   molecule in the gas phase, as cut from the first start that holds it and
   relaxed with GFN2-xTB, the gas-phase end of a lattice energy
   E_latt = E_crystal / N − E_molecule at fixed geometries.
2. ``seed``: a handful of labelled cells per system (each start, and rattled and
   strained copies of it) and the gas-phase molecules, with the periodic
   reference (molecules in a box with the non-periodic Poisson solver, same
   settings) into ``data/work/crystals.db``.
3. ``active``: :class:`deltaml.active.ActiveLearner` on all the starts at once
   (one crystal model): MD at 100 and 300 K, strained copies (±5 %) and frames
   of a cell relaxation (``--relax-steps``) as candidates, scored by the σ of
   the energy per molecule and of the stress (``score="crystal"``), the most
   uncertain spread by diversity, labelled with the reference, refitted; until
   ``--budget`` labels. Its folder is ``data/work/crystal_al``. Exploring all 17
   starts with the composite would take about 2 hours per iteration on two cores
   (0.7 s per call on a 48-atom cell, 4-5 s on aspirin's 168 atoms), for a batch
   of six labels of 3-20 minutes each: ``--explore-starts`` (3) are explored per
   iteration in rotation, and the unlabelled candidates of the last ``--carry``
   (4) iterations stay in the pool, scored again by each new model, so that the
   selection sees every system.
4. ``export``: every label of the store to ``data/labelled/crystals.extxyz``
   (method record, Δ-target terms), with counts and cost.

The reference is CP2K (:class:`deltaml.reference_cp2k.CP2KReference`): revPBE,
DZVP-MOLOPT-SR-GTH, GTH pseudopotentials, 600 Ry (the defaults, chosen by
``benchmarks/bench_cp2k_reference.py``), with its D3(BJ) partner as the
composite's dispersion term: 2–7 minutes per 48-atom cell on two busy cores.
``--quick`` uses the SZV basis at 200 Ry for a smoke test of the pipeline (its
labels are another method and go to another store).

Usage::

    python data/make_crystal_dataset.py --stage structures          # seconds
    python data/make_crystal_dataset.py --budget 300 --workers 1 --threads 2
    python data/make_crystal_dataset.py --quick --budget 12 --systems ice:Ih   # smoke test
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.io import read, write

from deltaml.active import ActiveLearner
from deltaml.crystals import (
    ICE_PHASES,
    ice_polymorph,
    strained_cell,
    whole_molecules,
    wide_cell,
)
from deltaml.dataset import export_labelled, import_labelled, read_labelled
from deltaml.files import atomic_path
from deltaml.labelling import label_structures, reference_calculator
from deltaml.model import CRYSTAL_PARAMS
from deltaml.store import LabelStore, label_key

HERE = Path(__file__).resolve().parent
STARTS = HERE / "structures" / "crystal_starts.extxyz"
MOLECULES = HERE / "structures" / "crystal_molecules.extxyz"
OUTPUT = HERE / "labelled" / "crystals.extxyz"

#: The periodic reference: CP2K's defaults (revPBE, DZVP-MOLOPT-SR-GTH, 600 Ry).
REFERENCE: dict = {"code": "cp2k"}
#: A cheap stand-in for smoke tests of the pipeline (another method record).
QUICK = {"code": "cp2k", "basis": "SZV-MOLOPT-SR-GTH", "cutoff_ry": 200, "rel_cutoff_ry": 40}

#: The model of the loop: molecular decomposition, the crystal settings
#: (:data:`deltaml.model.CRYSTAL_PARAMS`: intermolecular δ fixed at 0.05 eV), force σ.
MODEL = {"uncertainty": "forces", **CRYSTAL_PARAMS}


#: Crystals read from ``data/crystals`` (besides the ice phases GenIce2 builds).
CRYSTAL_FILES = (
    "co2_pa3",
    "co2_cmca",
    "oxalic_acid_alpha",
    "oxalic_acid_beta",
    "urea_i",
    "benzene_i",
    "aspirin_i",
    "aspirin_ii",
    "imide_boqqut",
    "imide_boqqut01",
)
#: Every starting cell is at least this wide (Å): MD in it and a Γ-point label.
MIN_WIDTH_A = 7.0


def system_names() -> list[str]:
    """Every system of the set, in the order of its starts."""
    return [f"ice:{name}" for name in ICE_PHASES] + list(CRYSTAL_FILES)


def starting_cells(seed: int = 0, skip: set[str] | frozenset[str] = frozenset()) -> list[Atoms]:
    """The starting cell of every system not in ``skip``, ``info["system"]`` naming it."""
    cells = []
    for name in ICE_PHASES:
        if f"ice:{name}" in skip:
            continue
        atoms = ice_polymorph(name, min_width=MIN_WIDTH_A, seed=seed)
        atoms.info = {"system": f"ice:{name}"}
        cells.append(atoms)
    for name in CRYSTAL_FILES:
        if name in skip:
            continue
        unit = read(HERE / "crystals" / f"{name}.extxyz")
        unit.positions = whole_molecules(unit)[1]  # stored whole, so copies stay whole
        atoms = wide_cell(unit, MIN_WIDTH_A)
        atoms.info = {"system": name}
        cells.append(atoms)
    return cells


def gas_molecules(starts: list[Atoms]) -> list[Atoms]:
    """Each distinct molecule of ``starts`` alone: as cut from the first start that
    holds it, and relaxed with GFN2-xTB (tblite, its own D4; BFGS, fmax 0.01 eV/Å).

    ``info["system"]`` is ``"gas:<formula>"``, ``info["source"]`` says which.
    """
    from ase.optimize import BFGS

    from deltaml.baseline import XTBBaseline

    out, seen = [], set()
    for start in starts:
        molecules, positions = whole_molecules(start)
        for label, formula in enumerate(molecules.formulas):
            if formula in seen:
                continue
            seen.add(formula)
            mask = molecules.labels == label
            cut = Atoms(start.numbers[mask], positions[mask] - positions[mask].mean(axis=0))
            relaxed = cut.copy()
            relaxed.calc = XTBBaseline(method="GFN2-xTB")
            BFGS(relaxed, logfile=None).run(fmax=0.01, steps=500)
            relaxed.calc = None
            origin = start.info["system"]
            cut.info = {"system": f"gas:{formula}", "source": f"cut from {origin}"}
            relaxed.info = {
                "system": f"gas:{formula}",
                "source": f"cut from {origin}, relaxed with GFN2-xTB",
            }
            out += [cut, relaxed]
    return out


def seed_cells(starts: list[Atoms], copies: int, seed: int) -> list[Atoms]:
    """Each start and ``copies`` rattled (0.03 Å) and strained (±3 %) copies of it,
    ``info`` naming the system and the source."""
    rng = np.random.default_rng(seed)
    out = []
    for start in starts:
        first = start.copy()
        first.info = {"system": start.info["system"], "source": "start"}
        out.append(first)
        for j in range(copies):
            atoms = strained_cell(start, 0.03, rng)
            atoms.positions += rng.normal(scale=0.03, size=atoms.positions.shape)
            atoms.info = {"system": start.info["system"], "source": f"seed copy {j}"}
            out.append(atoms)
    return out


def stored_structures(seed: int) -> tuple[list[Atoms], list[Atoms]]:
    """The starts and gas-phase molecules, as stored; systems new to the script appended.

    What is stored is never rebuilt (GenIce2's proton order, the seed copies drawn
    start by start and so every label key depend on it); a system added to the
    script since goes at the end of the starts, and molecules of new formulas at the
    end of the molecules, both written atomically.
    """
    starts = read(STARTS, index=":") if STARTS.exists() else []
    known = {a.info["system"] for a in starts}
    if set(system_names()) - known:
        starts += starting_cells(seed, skip=known)
        with atomic_path(STARTS) as partial:
            write(partial, starts, format="extxyz")
    molecules = read(MOLECULES, index=":") if MOLECULES.exists() else []
    formulas = {m.info["system"][4:] for m in molecules}
    holding = [a for a in starts if set(whole_molecules(a)[0].formulas) - formulas]
    if holding or not MOLECULES.exists():
        molecules += [m for m in gas_molecules(holding) if m.info["system"][4:] not in formulas]
        with atomic_path(MOLECULES) as partial:
            write(partial, molecules, format="extxyz")
    return starts, molecules


def _distinct(frames: list[Atoms], record: dict) -> list[Atoms]:
    """The first frame of each label key (the same structure, known twice), with
    only its provenance (``system``, ``source``) in ``info``."""
    seen, out = set(), []
    for atoms in frames:
        key = label_key(atoms, record)
        if key not in seen:
            seen.add(key)
            info = {k: atoms.info[k] for k in ("system", "source") if k in atoms.info}
            out.append(Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc,
                             info=info))  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stage", choices=("all", "structures", "seed", "active", "export"),
                        default="all")  # fmt: skip
    parser.add_argument("--systems", default=None,
                        help="comma-separated systems (default all), e.g. ice:Ih")  # fmt: skip
    parser.add_argument("--copies", type=int, default=2, help="seed copies per start")
    parser.add_argument("--budget", type=int, default=300, help="labels in the store at most")
    parser.add_argument("--batch", type=int, default=6, help="labels per iteration")
    parser.add_argument("--md-steps", type=int, default=100)
    parser.add_argument("--explore-starts", type=int, default=3,
                        help="starts explored per iteration, in rotation")  # fmt: skip
    parser.add_argument("--carry", type=int, default=4,
                        help="iterations an unlabelled candidate stays in the pool")  # fmt: skip
    parser.add_argument(
        "--relax-steps", type=int, default=30, help="cell-relaxation steps per start and iteration"
    )
    parser.add_argument("--workers", type=int, default=1, help="labelling processes")
    parser.add_argument("--threads", type=int, default=2, help="OpenMP threads per label")
    parser.add_argument("--quick", action="store_true", help="SZV basis, 200 Ry (smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    reference = QUICK if args.quick else REFERENCE
    suffix = "_quick" if args.quick else ""
    store_path = HERE / "work" / f"crystals{suffix}.db"
    store_path.parent.mkdir(exist_ok=True)

    starts, molecules = stored_structures(args.seed)
    if args.systems:
        wanted = set(args.systems.split(","))
        starts = [a for a in starts if a.info["system"] in wanted]
        if not starts:
            print(f"no starting cell among {sorted(wanted)}", file=sys.stderr)
            return 2
        formulas = {f for a in starts for f in whole_molecules(a)[0].formulas}
        molecules = [m for m in molecules if m.info["system"][4:] in formulas]
    print(f"{len(starts)} starting cells: {', '.join(a.info['system'] for a in starts)}; "
          f"{len(molecules)} gas-phase molecules")  # fmt: skip
    if args.stage == "structures":
        return 0

    store = LabelStore(store_path)
    output = OUTPUT.with_suffix(".quick.extxyz") if args.quick else OUTPUT
    if output.is_file() and args.stage in ("all", "seed", "active"):
        # Labels shipped with the repository go into a new store first: a fresh
        # checkout resumes where the last session's export stopped.
        added, present = import_labelled(store, read_labelled(output, check_magnitudes=False))
        print(f"{added} shipped labels imported into {store_path} ({present} present)")
    workdir = HERE / "work" / f"crystal_al{suffix}"
    if args.stage in ("all", "seed"):
        # Molecules and the starts first: with them alone, lattice energies at the
        # experimental cells are known; the rattled copies only add training data.
        cells = seed_cells(starts, args.copies, args.seed)
        first = [a for a in cells if a.info["source"] == "start"]
        rest = [a for a in cells if a.info["source"] != "start"]
        frames = [m.copy() for m in molecules] + first + rest
        for atoms in frames:
            atoms.info = {}
        report = label_structures(frames, store, reference=reference, workers=args.workers,
                                  threads_per_worker=args.threads)  # fmt: skip
        print(f"seed: {report.computed} computed, {report.failed} failed, "
              f"{report.already_done} already done")  # fmt: skip
    learner = ActiveLearner(
        workdir, store, starts, reference=reference, model=MODEL, temperatures=(100.0, 300.0),
        md_steps=args.md_steps, md_interval=20, batch=args.batch, pool=4 * args.batch,
        strained=2, max_strain=0.05, relax_steps=args.relax_steps, score="crystal",
        explore_starts=args.explore_starts, carry=args.carry,
        selection="uncertainty", seed=args.seed, workers=args.workers,
    )  # fmt: skip
    if args.stage in ("all", "active"):
        history = learner.run(iterations=10**6, budget=args.budget, progress=True)
        print(f"active: {history[-1]['n_labels']} labels after {len(history) - 1} iterations")
    if args.stage in ("all", "export"):
        # Seed cells, molecules and selected candidates, with their system and source.
        known = seed_cells(starts, args.copies, args.seed) + molecules
        for atoms in learner.selected_structures():
            source = atoms.info["source"]  # "iteration k, start s, ..."
            system = (
                atoms.info.get("system") or starts[int(source.split(", ")[1][6:])].info["system"]
            )
            info = {"system": system, "source": source}
            known.append(
                Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=True, info=info)
            )
        record = reference_calculator(dict(reference)).record()
        if output.is_file():
            # Labels shipped earlier keep the provenance they were exported with,
            # also when the loop's folder (data/work/, not committed) is gone.
            known += read(output, index=":")
        known = _distinct(known, record)
        count = export_labelled(store, output, known, record=record)  # written atomically
        print(f"export: {count} labels to {output}")
        missing = len(store.labelled()) - count
        if missing > 0:
            print(f"export: {missing} labels of the store have no known provenance: not exported")
    return 0


if __name__ == "__main__":
    sys.exit(main())
