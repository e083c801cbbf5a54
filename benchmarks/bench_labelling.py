"""Labels per hour: local process pool vs Dask LocalCluster, same workers, one run.

Takes structures of each kind of the shipped dataset (``data/labelled/
water_chno.extxyz``: water clusters of 1-6 molecules, CHNO molecules, dimers),
``--per-kind`` of each (spread over the sizes, drawn with ``--seed``), and labels
them with the dataset's reference (revPBE0/def2-TZVP, density fitting) plus the
Δ-target terms, twice, into two fresh stores:

* ``local``: :func:`deltaml.labelling.label_structures` on its default process pool;
* ``dask``: the same function given a ``distributed.LocalCluster`` with the same
  number of worker processes and threads per worker.

Reported: wall time and labels per hour of each runner, their ratio, the mean
cost of one label per kind (worker time, s) and the largest energy difference
between the two stores (they must agree). Cluster start-up is timed apart and not
charged to the Dask run.

Usage::

    python benchmarks/bench_labelling.py                       # 3 per kind, 2 workers
    python benchmarks/bench_labelling.py --per-kind 2 --basis def2-svp   # quicker

Writes ``benchmarks/results/bench_labelling.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import RESULTS_DIR, machine_info, markdown_table, write_json
from ase import Atoms
from ase.io import read

from deltaml.labelling import label_structures
from deltaml.reference import PySCFReference
from deltaml.store import LabelStore, label_key

DATASET = Path(__file__).resolve().parent.parent / "data" / "labelled" / "water_chno.extxyz"
REFERENCE = {"method": "dft", "xc": "revpbe0", "basis": "def2-tzvp", "density_fit": True}


def pick(frames: list[Atoms], per_kind: int, seed: int) -> list[Atoms]:
    """``per_kind`` structures of each kind, spread over sizes (smallest to largest)."""
    rng = np.random.default_rng(seed)
    chosen = []
    for kind in sorted({a.info["kind"] for a in frames}):
        pool = sorted((a for a in frames if a.info["kind"] == kind), key=len)
        # one from each of per_kind equal slices of the size-sorted list
        for part in np.array_split(np.arange(len(pool)), per_kind):
            atoms = pool[int(rng.choice(part))]
            bare = Atoms(atoms.numbers, atoms.positions)
            bare.info = {"kind": kind, "name": atoms.info.get("name")}
            chosen.append(bare)
    return chosen


def run(frames: list[Atoms], store: LabelStore, reference: dict, **kwargs) -> dict:
    report = label_structures(frames, store, reference=reference, progress=False, **kwargs)
    if report.failed:
        raise RuntimeError(f"labels failed: {report.errors}")
    return {
        "wall_s": report.wall_seconds,
        "labels": report.computed,
        "labels_per_hour": report.labels_per_hour,
        "compute_s": report.compute_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-kind", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="OpenMP threads per worker")
    parser.add_argument("--basis", default=REFERENCE["basis"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "bench_labelling.json")
    args = parser.parse_args()
    from distributed import Client, LocalCluster

    reference = {**REFERENCE, "basis": args.basis}
    frames = pick(read(DATASET, index=":"), args.per_kind, args.seed)
    print(f"{len(frames)} structures, {args.workers} workers x {args.threads} threads")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        local_store = LabelStore(Path(tmp) / "local.db")
        results["local"] = run(
            frames, local_store, reference, workers=args.workers,
            threads_per_worker=args.threads,
        )  # fmt: skip
        start = time.perf_counter()
        with (
            LocalCluster(
                n_workers=args.workers, threads_per_worker=1, processes=True,
                dashboard_address=None,
            ) as cluster,
            Client(cluster),
        ):  # fmt: skip
            startup = time.perf_counter() - start
            dask_store = LabelStore(Path(tmp) / "dask.db")
            results["dask"] = run(
                frames, dask_store, reference, scheduler=cluster.scheduler_address,
                threads_per_worker=args.threads,
            )  # fmt: skip
        results["dask"]["cluster_startup_s"] = startup
        local = {a.info["label_key"]: a for a in local_store.labelled()}
        dask = {a.info["label_key"]: a for a in dask_store.labelled()}
        max_de = max(
            abs(local[k].get_potential_energy() - dask[k].get_potential_energy()) for k in local
        )
        record = PySCFReference(**reference).record()
        per_kind: dict[str, list[float]] = {}
        for atoms in frames:
            seconds = local[label_key(atoms, record)].info["compute_seconds"]
            per_kind.setdefault(atoms.info["kind"], []).append(seconds)

    rows = [
        [name, r["labels"], f"{r['wall_s']:.1f}", f"{r['labels_per_hour']:.0f}"]
        for name, r in results.items()
    ]
    print(markdown_table(["runner", "labels", "wall (s)", "labels/hour"], rows))
    ratio = results["dask"]["labels_per_hour"] / results["local"]["labels_per_hour"]
    print(f"dask / local throughput: {ratio:.2f} (cluster start-up {startup:.1f} s not included)")
    kind_rows = [
        [kind, len(costs), f"{np.mean(costs):.1f}", f"{3600 * args.workers / np.mean(costs):.0f}"]
        for kind, costs in sorted(per_kind.items())
    ]
    print(markdown_table(["kind", "n", "s per label (worker)", "labels/hour (pool)"], kind_rows))
    print(f"largest |E_local - E_dask|: {max_de:.2e} eV")
    write_json(
        args.out,
        {
            "machine": machine_info(),
            "settings": {**vars(args), "out": str(args.out), "reference": reference},
            "results": results,
            "dask_over_local": ratio,
            "seconds_per_label_by_kind": {k: float(np.mean(v)) for k, v in per_kind.items()},
            "max_energy_difference_ev": max_de,
        },
    )


if __name__ == "__main__":
    main()
