"""Labelling runner: fill a label store with reference calculations.

Takes structures, skips those already in the store (done, failed, or claimed by
a running process), and computes the rest on a local process pool (default) or
on a Dask distributed cluster given by its scheduler address (e.g. a
``dask-jobqueue`` SLURM cluster; a ``LocalCluster`` in tests). Workers only
compute; this process writes every result to the store the moment it arrives,
in its own transaction, so that killing it loses at most the calculations in
flight. Failures are written per structure with their error and retried only
when asked (``retry_failed=True``).

Besides the reference, every row gets the terms that form the Δ target on the
same structure: the dispersion-free baseline and the reference's D3 partner.

Data flow: reference, baseline, dispersion → store → **labelling**.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ase import Atoms

from deltaml.baseline import XTBBaseline
from deltaml.dataset import DELTA_BASELINE
from deltaml.dispersion import D3Dispersion, parse_dispersion_spec
from deltaml.errors import ParameterError
from deltaml.reference import PySCFReference
from deltaml.store import LabelStore, label_key
from deltaml.structures import charge_and_multiplicity

__all__ = [
    "DEFAULT_BASELINE",
    "LabelOutcome",
    "LabelTask",
    "LabellingReport",
    "compute_label",
    "label_structures",
]

#: The Δ-target baseline: GFN2-xTB with its own D4 removed (the composite's default).
DEFAULT_BASELINE: dict[str, Any] = DELTA_BASELINE


@dataclass(frozen=True)
class LabelTask:
    """One calculation, as sent to a worker (picklable).

    Attributes
    ----------
    key : str
        Store key (:func:`deltaml.store.label_key`).
    atoms : ase.Atoms
        Structure, Å.
    charge, multiplicity : int
        Total charge (e) and 2S+1.
    reference, baseline, dispersion : dict or None
        Keyword parameters of :class:`PySCFReference`, :class:`XTBBaseline` and
        :class:`D3Dispersion`; ``None`` leaves that term out.
    threads : int
        OpenMP threads of the worker's PySCF.
    """

    key: str
    atoms: Atoms
    charge: int
    multiplicity: int
    reference: dict[str, Any]
    baseline: dict[str, Any] | None
    dispersion: dict[str, Any] | None
    threads: int = 1


@dataclass
class LabelOutcome:
    """What a worker sends back: results, or the error that stopped it."""

    key: str
    energy: float | None = None
    forces: np.ndarray | None = None
    terms: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0


def compute_label(task: LabelTask) -> LabelOutcome:
    """Compute one label (runs in a worker): reference energy and forces, and terms.

    Every error is caught and returned, so that one bad structure costs one row.
    """
    start = time.perf_counter()
    try:
        from pyscf import lib

        lib.num_threads(task.threads)
        atoms = task.atoms.copy()
        reference = PySCFReference(
            **task.reference, charge=task.charge, multiplicity=task.multiplicity
        )
        atoms.calc = reference
        energy = atoms.get_potential_energy()
        forces = atoms.get_forces() if "forces" in _reference_properties(task) else None
        terms = {}
        for name, calc in _term_calculators(task).items():
            atoms.calc = calc
            terms[name] = {
                "energy": atoms.get_potential_energy(),
                "forces": atoms.get_forces(),
                "record": calc.record(),
            }
    except Exception as exc:  # recorded in the store, per structure
        return LabelOutcome(
            task.key, error=f"{type(exc).__name__}: {exc}", seconds=time.perf_counter() - start
        )
    return LabelOutcome(task.key, energy, forces, terms, seconds=time.perf_counter() - start)


def _reference_properties(task: LabelTask) -> tuple[str, ...]:
    from deltaml.reference import REFERENCE_METHODS

    return REFERENCE_METHODS[task.reference.get("method", "dft")]


def _term_calculators(task: LabelTask) -> dict[str, Any]:
    calcs: dict[str, Any] = {}
    if task.baseline is not None:
        calcs["baseline"] = XTBBaseline(
            **task.baseline, charge=task.charge, multiplicity=task.multiplicity
        )
    if task.dispersion is not None:
        calcs["dispersion"] = D3Dispersion(**task.dispersion)
    return calcs


@dataclass
class LabellingReport:
    """Counts and timings of one labelling run.

    Attributes
    ----------
    structures : int
        Structures given.
    already_done, already_failed, in_progress, duplicates : int
        Skipped: in the store already, failed before (not retried), claimed by
        another running process, given twice in ``structures``.
    computed, failed : int
        Labels written by this run, and failures recorded by it.
    wall_seconds : float
        Time of the run, s.
    compute_seconds : float
        Sum of the workers' times per label, s.
    """

    structures: int = 0
    already_done: int = 0
    already_failed: int = 0
    in_progress: int = 0
    duplicates: int = 0
    computed: int = 0
    failed: int = 0
    wall_seconds: float = 0.0
    compute_seconds: float = 0.0
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def labels_per_hour(self) -> float:
        """Labels (computed + failed) per hour of wall time."""
        done = self.computed + self.failed
        return 3600.0 * done / self.wall_seconds if self.wall_seconds > 0 else 0.0


def label_structures(
    structures: Iterable[Atoms],
    store: LabelStore,
    *,
    reference: dict[str, Any] | None = None,
    baseline: dict[str, Any] | None = DEFAULT_BASELINE,
    dispersion: dict[str, Any] | str | None = "partner",
    scheduler: str | Any | None = None,
    workers: int | None = None,
    threads_per_worker: int = 1,
    retry_failed: bool = False,
    progress: bool = True,
) -> LabellingReport:
    """Label the structures that the store lacks; write each result as it arrives.

    Parameters
    ----------
    structures : iterable of ase.Atoms
        Molecules, Å. Charge and multiplicity come from ``reference`` if given
        there, else from each structure's ``info`` or initial charges and
        magnetic moments (:func:`~deltaml.structures.charge_and_multiplicity`).
    store : LabelStore
        Where results go (and what is skipped).
    reference : dict, optional
        Keyword parameters of :class:`~deltaml.reference.PySCFReference` (its
        defaults: revPBE0/def2-TZVP).
    baseline : dict or None, default=:data:`DEFAULT_BASELINE`
        :class:`~deltaml.baseline.XTBBaseline` parameters of the Δ-target baseline;
        None: not computed.
    dispersion : dict, "partner" or None, default="partner"
        :class:`~deltaml.dispersion.D3Dispersion` parameters; ``"partner"``: the
        reference's published D3(BJ) partner; None: not computed.
    scheduler : str or distributed.Client, optional
        Dask scheduler address (``tcp://host:8786``) or a client; None: a local
        process pool.
    workers : int, optional
        Local pool size; default ``os.cpu_count() // threads_per_worker``.
        Ignored with a scheduler (the cluster decides).
    threads_per_worker : int, default=1
        OpenMP threads per calculation.
    retry_failed : bool, default=False
        Compute again the structures whose earlier calculation failed.
    progress : bool, default=True
        Show a tqdm progress bar with the estimated time left.

    Returns
    -------
    LabellingReport
    """
    start = time.perf_counter()
    reference = dict(reference or {})
    record = PySCFReference(**reference).record()
    dispersion = _dispersion_parameters(dispersion, record)
    if threads_per_worker < 1:
        raise ParameterError(f"threads_per_worker must be >= 1, got {threads_per_worker}")
    report = LabellingReport()
    store.release_stale_claims()
    tasks, claims, seen = [], {}, set()
    for atoms in structures:
        report.structures += 1
        charge, multiplicity = charge_and_multiplicity(
            atoms, reference.get("charge"), reference.get("multiplicity")
        )
        key = label_key(atoms, record, charge, multiplicity)
        if key in seen:
            report.duplicates += 1
            continue
        seen.add(key)
        if retry_failed and store.status(key) == "failed":
            store.forget_failures({key})
        claim = store.claim(atoms, record, charge, multiplicity)
        if claim is None:
            status = store.status(key)
            if status == "done":
                report.already_done += 1
            elif status == "failed":
                report.already_failed += 1
            else:
                report.in_progress += 1
            continue
        params = {k: v for k, v in reference.items() if k not in ("charge", "multiplicity")}
        tasks.append(
            LabelTask(
                key,
                atoms.copy(),
                charge,
                multiplicity,
                params,
                baseline,
                dispersion,
                threads_per_worker,
            )
        )
        claims[key] = (claim, atoms, charge, multiplicity)
    try:
        for outcome in _run(tasks, scheduler, workers, threads_per_worker, progress):
            claim, atoms, charge, multiplicity = claims.pop(outcome.key)
            report.compute_seconds += outcome.seconds
            if outcome.error is not None:
                store.put_failure(
                    atoms,
                    record,
                    outcome.error,
                    charge=charge,
                    multiplicity=multiplicity,
                    claim=claim,
                )
                report.failed += 1
                report.errors[outcome.key] = outcome.error
                continue
            store.put(
                atoms,
                record,
                energy=outcome.energy,
                forces=outcome.forces,
                terms=outcome.terms,
                charge=charge,
                multiplicity=multiplicity,
                claim=claim,
                compute_seconds=outcome.seconds,
            )
            report.computed += 1
    finally:  # interrupted (Ctrl-C, an exception): hand back what was not computed
        store.release_claims({claim for claim, *_ in claims.values()})
    report.wall_seconds = time.perf_counter() - start
    return report


def _dispersion_parameters(
    dispersion: dict[str, Any] | str | None, record: dict[str, Any]
) -> dict[str, Any] | None:
    if dispersion != "partner":
        return dispersion
    partner = record.get("dispersion_partner")
    return None if partner is None else parse_dispersion_spec(partner)


def _run(
    tasks: list[LabelTask],
    scheduler: str | Any | None,
    workers: int | None,
    threads: int,
    progress: bool,
) -> Iterator[LabelOutcome]:
    """Outcomes in the order they complete, with a progress bar."""
    from tqdm.auto import tqdm

    if not tasks:
        return
    bar = tqdm(total=len(tasks), unit="label", disable=not progress, smoothing=0.1)
    failed = 0
    try:
        runner = _run_dask if scheduler is not None else _run_local
        for outcome in runner(tasks, scheduler, workers, threads):
            failed += outcome.error is not None
            bar.set_postfix(failed=failed, refresh=False)
            bar.update(1)
            yield outcome
    finally:
        bar.close()


def _run_local(
    tasks: list[LabelTask], _scheduler: None, workers: int | None, threads: int
) -> Iterator[LabelOutcome]:
    workers = workers or max(1, (os.cpu_count() or 1) // threads)
    # spawn, not fork: the parent may hold OpenMP thread pools (PySCF, tblite).
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures: dict[Future, str] = {pool.submit(compute_label, t): t.key for t in tasks}
        try:
            for future in as_completed(futures):
                yield _outcome(future, futures[future])
        finally:
            for future in futures:
                future.cancel()


def _run_dask(
    tasks: list[LabelTask], scheduler: str | Any, _workers: int | None, _threads: int
) -> Iterator[LabelOutcome]:
    from distributed import Client
    from distributed import as_completed as dask_completed

    client = scheduler if isinstance(scheduler, Client) else Client(scheduler)
    try:
        futures = {
            client.submit(compute_label, t, key=f"deltaml-label-{t.key}", pure=False): t.key
            for t in tasks
        }
        try:
            for future in dask_completed(futures):
                yield _outcome(future, futures[future])
        finally:
            client.cancel(list(futures))
    finally:
        if client is not scheduler:
            client.close()


def _outcome(future: Any, key: str) -> LabelOutcome:
    """The future's outcome; a crashed worker becomes a recorded failure."""
    try:
        return future.result()
    except Exception as exc:
        return LabelOutcome(key, error=f"worker failed: {type(exc).__name__}: {exc}")
