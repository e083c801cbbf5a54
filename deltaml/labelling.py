"""Labelling runner: fill a label store with reference calculations.

Takes structures, skips those already in the store (done, failed, or claimed by
a running process), and computes the rest on a local process pool (default) or
on a Dask distributed cluster given by its scheduler address (e.g. a
``dask-jobqueue`` SLURM cluster; a ``LocalCluster`` in tests). Workers only
compute; this process writes every result to the store the moment it arrives,
in its own transaction, so that killing it loses at most the calculations in
flight. Failures are written per structure with their error and retried only
when asked (``retry_failed=True``). The local pool's workers end with this process,
even when it is killed with SIGKILL; an interrupted run ends its workers at once
and releases its claims.

Besides the reference, every row gets the terms that form the Δ target on the
same structure: the dispersion-free baseline and the reference's D3 partner.
The reference is PySCF's (molecules) unless its parameters say ``"code": "cp2k"``
(:class:`~deltaml.reference_cp2k.CP2KReference`: periodic cells too, with stress).

Data flow: reference, baseline, dispersion → store → **labelling**.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ase import Atoms

from deltaml.baseline import XTBBaseline
from deltaml.dataset import DELTA_BASELINE
from deltaml.dispersion import D3Dispersion, parse_dispersion_spec
from deltaml.errors import ChargeMultiplicityError, ParameterError
from deltaml.reference import PySCFReference
from deltaml.reference_cp2k import CP2KReference
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

#: prctl option of linux/prctl.h: the signal a process gets when its parent ends.
_PR_SET_PDEATHSIG = 1


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
        Keyword parameters of :class:`PySCFReference` (or, with ``"code": "cp2k"``,
        :class:`CP2KReference`), :class:`XTBBaseline` and :class:`D3Dispersion`;
        ``None`` leaves that term out.
    threads : int
        OpenMP threads of the worker's PySCF (CP2K: its ``omp_threads`` unless given).
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
    stress: np.ndarray | None = None


def compute_label(task: LabelTask) -> LabelOutcome:
    """Compute one label (runs in a worker): reference energy and forces, and terms.

    Every error is caught and returned, so that one bad structure costs one row.
    """
    start = time.perf_counter()
    stress = None
    try:
        atoms = task.atoms.copy()
        if task.reference.get("code") == "cp2k":
            energy, forces, stress = _cp2k_label(task, atoms)
        else:
            from pyscf import lib

            lib.num_threads(task.threads)
            parameters = {k: v for k, v in task.reference.items() if k != "code"}
            reference = PySCFReference(
                **parameters, charge=task.charge, multiplicity=task.multiplicity
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
                "stress": atoms.get_stress() if stress is not None else None,
                "record": calc.record(),
            }
    except Exception as exc:  # recorded in the store, per structure
        return LabelOutcome(
            task.key, error=f"{type(exc).__name__}: {exc}", seconds=time.perf_counter() - start
        )
    return LabelOutcome(
        task.key, energy, forces, terms, seconds=time.perf_counter() - start, stress=stress
    )


def _cp2k_label(task: LabelTask, atoms: Atoms) -> tuple[float, np.ndarray, np.ndarray | None]:
    """Energy, forces and (3D-periodic cells) stress from one CP2K run."""
    parameters = {k: v for k, v in task.reference.items() if k != "code"}
    parameters.setdefault("omp_threads", task.threads)
    reference = _worker_cp2k(json.dumps(parameters, sort_keys=True, default=str))
    reference.set(charge=task.charge, multiplicity=task.multiplicity)
    properties = ["energy", "forces"] + (["stress"] if atoms.pbc.all() else [])
    reference.calculate(atoms, properties)
    results = reference.results
    return results["energy"], results["forces"], results.get("stress")


#: Per worker thread: the CP2K calculator of the last settings labelled there.
_WORKER = threading.local()


def _worker_cp2k(parameters: str) -> CP2KReference:
    """One CP2K calculator per worker thread and settings (JSON): it keeps the
    wavefunctions of its last runs, so that a rattled copy of a cell labelled after
    it starts its SCF from there (``CP2KReference(reuse_guess=...)``). Per thread,
    because a Dask worker may run several tasks at once."""
    if getattr(_WORKER, "cp2k", (None, None))[0] != parameters:
        _WORKER.cp2k = (parameters, CP2KReference(**json.loads(parameters)))
    return _WORKER.cp2k[1]


def reference_calculator(parameters: dict[str, Any]) -> PySCFReference | CP2KReference:
    """The reference of ``parameters``: CP2K's if ``"code": "cp2k"``, else PySCF's."""
    parameters = dict(parameters)
    code = parameters.pop("code", "pyscf")
    if code == "cp2k":
        return CP2KReference(**parameters)
    if code != "pyscf":
        raise ParameterError(f"unknown reference code {code!r}; choose 'pyscf' or 'cp2k'")
    return PySCFReference(**parameters)


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
        Molecules (with a CP2K reference also 3D-periodic cells), Å. Charge
        and multiplicity come from ``reference`` if given there, else from each
        structure's ``info`` or initial charges and magnetic moments
        (:func:`~deltaml.structures.charge_and_multiplicity`); sources that
        disagree raise ``ChargeMultiplicityError`` naming the structure, before
        anything is computed or claimed for good.
    store : LabelStore
        Where results go (and what is skipped).
    reference : dict, optional
        Keyword parameters of :class:`~deltaml.reference.PySCFReference` (its
        defaults: revPBE0/def2-TZVP), or, with ``"code": "cp2k"``, of
        :class:`~deltaml.reference_cp2k.CP2KReference` (revPBE/DZVP-MOLOPT-SR-GTH;
        cells periodic in 3D get stress too; its ``mpi_ranks`` and ``omp_threads``
        are each worker's layout, not part of the method record).
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
    record = reference_calculator(reference).record()
    dispersion = _dispersion_parameters(dispersion, record)
    if threads_per_worker < 1:
        raise ParameterError(f"threads_per_worker must be >= 1, got {threads_per_worker}")
    report = LabellingReport()
    store.release_stale_claims()
    params = {k: v for k, v in reference.items() if k not in ("charge", "multiplicity")}
    template = {
        "reference": params,
        "baseline": baseline,
        "dispersion": dispersion,
        "threads": threads_per_worker,
    }
    claims: dict[str, tuple[int, Atoms, int, int]] = {}
    try:  # interrupted (Ctrl-C, an exception), even while claiming: hand back the rest
        tasks = _claim_tasks(
            structures, store, record, reference, template, retry_failed, report, claims
        )
        # closed at once on an error, so that the pool's workers end before the claims go
        with contextlib.closing(
            _run(tasks, scheduler, workers, threads_per_worker, progress)
        ) as run:
            for outcome in run:
                _write_outcome(store, record, outcome, claims[outcome.key], report)
                del claims[outcome.key]  # after the write: a failed write releases it too
    finally:
        store.release_claims({claim for claim, *_ in claims.values()})
    report.wall_seconds = time.perf_counter() - start
    return report


def _claim_tasks(
    structures: Iterable[Atoms],
    store: LabelStore,
    record: dict[str, Any],
    reference: dict[str, Any],
    template: dict[str, Any],
    retry_failed: bool,
    report: LabellingReport,
    claims: dict[str, tuple[int, Atoms, int, int]],
) -> list[LabelTask]:
    """Claim every structure that the store lacks; the tasks to compute.

    ``claims`` receives ``{key: (row id, atoms, charge, multiplicity)}`` as each
    claim is made, so that the caller can release them if this is interrupted.
    """
    tasks, seen = [], set()
    for index, atoms in enumerate(structures):
        report.structures += 1
        try:
            charge, multiplicity = charge_and_multiplicity(
                atoms, reference.get("charge"), reference.get("multiplicity")
            )
        except ChargeMultiplicityError as exc:  # sources that disagree: nothing to key on
            raise ChargeMultiplicityError(
                f"structure {index} ({atoms.get_chemical_formula()}): {exc}"
            ) from exc
        key = label_key(atoms, record, charge, multiplicity)
        if key in seen:
            report.duplicates += 1
            continue
        seen.add(key)
        if retry_failed and store.status(key) == "failed":
            store.forget_failures({key})
        claim = store.claim(atoms, record, charge, multiplicity)
        if claim is None:
            _count_skipped(store.status(key), report)
            continue
        claims[key] = (claim, atoms, charge, multiplicity)
        tasks.append(LabelTask(key, atoms.copy(), charge, multiplicity, **template))
    return tasks


def _count_skipped(status: str | None, report: LabellingReport) -> None:
    if status == "done":
        report.already_done += 1
    elif status == "failed":
        report.already_failed += 1
    else:
        report.in_progress += 1


def _write_outcome(
    store: LabelStore,
    record: dict[str, Any],
    outcome: LabelOutcome,
    claimed: tuple[int, Atoms, int, int],
    report: LabellingReport,
) -> None:
    """Write one worker's result (or its error) into its reservation."""
    claim, atoms, charge, multiplicity = claimed
    report.compute_seconds += outcome.seconds
    if outcome.error is not None:
        store.put_failure(
            atoms, record, outcome.error, charge=charge, multiplicity=multiplicity, claim=claim
        )
        report.failed += 1
        report.errors[outcome.key] = outcome.error
        return
    store.put(
        atoms,
        record,
        energy=outcome.energy,
        forces=outcome.forces,
        stress=outcome.stress,
        terms=outcome.terms,
        charge=charge,
        multiplicity=multiplicity,
        claim=claim,
        compute_seconds=outcome.seconds,
    )
    report.computed += 1


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
        with contextlib.closing(runner(tasks, scheduler, workers, threads)) as outcomes:
            for outcome in outcomes:
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
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=context,
        initializer=_end_with_parent,
        initargs=(os.getpid(),),
    )
    finished = False
    try:
        futures: dict[Future, str] = {pool.submit(compute_label, t): t.key for t in tasks}
        for future in as_completed(futures):
            yield _outcome(future, futures[future])
        finished = True
    finally:
        if finished:
            pool.shutdown()
        else:
            _stop_pool(pool)


def _stop_pool(pool: ProcessPoolExecutor) -> None:
    """Drop the queued tasks and end the workers now.

    An interrupted run (an exception, Ctrl-C in the parent alone) does not wait
    for the calculations in flight, which may take hours.
    """
    if hasattr(pool, "terminate_workers"):  # Python >= 3.14
        pool.terminate_workers()
        return
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(timeout=10)


def _end_with_parent(parent: int) -> None:
    """Worker initializer: the worker ends when its parent process ends.

    A run killed with SIGKILL cannot stop its pool, whose workers would otherwise
    finish their calculations as orphans. On Linux the kernel sends SIGKILL to the
    worker when its parent ends (``prctl(PR_SET_PDEATHSIG)``); everywhere a daemon
    thread checks every second that the parent is still there.

    Parameters
    ----------
    parent : int
        Process id of the labelling run.
    """
    _set_parent_death_signal()
    if os.getppid() != parent:  # it ended before the signal was set
        os._exit(1)
    watch = threading.Thread(
        target=_watch_parent, args=(parent,), daemon=True, name="deltaml-watch-parent"
    )
    watch.start()


def _set_parent_death_signal() -> None:
    """Linux only: SIGKILL to this process when the thread that started it ends."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # a libc without it: the watching thread remains
        return
    prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _watch_parent(
    parent: int, interval: float = 1.0, stop: Callable[[int], Any] = os._exit
) -> None:
    """Call ``stop(1)`` once this process's parent is no longer ``parent``.

    Parameters
    ----------
    parent : int
        Process id of the parent; an orphan is adopted by another process.
    interval : float, default=1.0
        Time between checks, s.
    stop : callable, default=os._exit
        Ends the process (no cleanup: the parent that would receive it is gone).
    """
    while os.getppid() == parent:
        time.sleep(interval)
    stop(1)


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
