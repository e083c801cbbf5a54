"""The ``deltaml`` console script: parsing and printing only.

Each subcommand calls one importable library function; no science lives here.

One vocabulary on every command: ``--baseline``/``--engine`` are the GFN-xTB
baseline, ``--dispersion`` the D3 term, ``--model`` the model file,
``--reference`` the reference method (``label``, ``stability``, ``active-learn``),
``--charge``/``--multiplicity`` override a structure's own (its
``info["charge"]``/``["multiplicity"]``, else its initial charges and magnetic
moments; a disagreement is an error). A user's mistake is one line on stderr
(exit 1; 2 for a malformed command line), never a traceback. The group's
``-v``/``-q`` set what the ``deltaml`` loggers print; library code never
configures logging.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import numpy as np
from ase import Atoms
from ase.data import chemical_symbols
from ase.io import read
from ase.units import kcal, mol

from deltaml import __version__
from deltaml.active import ActiveLearner
from deltaml.baseline import XTBBaseline
from deltaml.calculator import DeltaCalculator, energy_budget
from deltaml.correction import ZeroCorrection
from deltaml.dataset import (
    DELTA_BASELINE,
    check_records,
    delta_targets,
    export_labelled,
    import_labelled,
    read_labelled,
    split_systems,
)
from deltaml.dispersion import parse_dispersion_spec
from deltaml.errors import DeltaMLError
from deltaml.evaluation import (
    cross_calibrated_fit,
    delta_targets_for,
    error_table,
    errors,
    md_stability,
    plot_calibration,
    plot_parity,
    predict_all,
)
from deltaml.files import write_text_atomic
from deltaml.labelling import DEFAULT_BASELINE, label_structures
from deltaml.model import INTER_DELTA_SEARCHES, SparseGPR
from deltaml.ranking import rank_polymorphs, read_candidates
from deltaml.reference import PySCFReference
from deltaml.reference_cp2k import CP2K_FUNCTIONALS, CP2KReference, cp2k_available
from deltaml.simulation import relax, run_md
from deltaml.store import LabelStore
from deltaml.structures import charge_and_multiplicity

#: Reference defaults of ``label`` (PySCF's, and CP2K's with --reference cp2k).
_PYSCF_XC = "revpbe0"
_PYSCF_BASIS = "def2-tzvp"
_CP2K_XC = CP2KReference.default_parameters["xc"]
_CP2K_BASIS = CP2KReference.default_parameters["basis"]
_CP2K_CUTOFF = CP2KReference.default_parameters["cutoff_ry"]

#: Defaults of the composite without a model (with one: the terms it was trained with).
DEFAULT_METHOD = "gfn2"
DEFAULT_ENGINE = "tblite"
DEFAULT_DISPERSION = "d3bj:pbe0"

_POSTGRESQL = ("postgresql://", "postgres://")


logger = logging.getLogger(__name__)


class _ClickHandler(logging.Handler):
    """Log records to stderr through click (so that CliRunner captures them)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            click.echo(self.format(record), err=True)
        except Exception:  # logging must never raise
            self.handleError(record)


def _configure_logging(verbose: int, quiet: bool) -> None:
    """Level and handler of the ``deltaml`` loggers (only the CLI does this)."""
    level = (
        logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    )
    package = logging.getLogger("deltaml")
    handler = next((h for h in package.handlers if isinstance(h, _ClickHandler)), None)
    if handler is None:
        handler = _ClickHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        package.addHandler(handler)
    handler.setLevel(level)
    package.setLevel(level)


@contextlib.contextmanager
def _warnings_as_lines() -> Iterator[None]:
    """Print warnings through click: deltaml's own as one line ``warning: ...``.

    So that a library warning (e.g. a model used on a spin state it never saw)
    reaches a CLI user once, in the same form as the CLI's own notes; warnings
    of other packages keep Python's format. The warning filters are left alone.
    """

    def show(message: Any, category: type[Warning], filename: str, lineno: int,
             file: Any = None, line: str | None = None) -> None:  # fmt: skip
        ours = category.__module__.startswith("deltaml") or (
            Path(filename).resolve().parent == _PACKAGE
        )
        text = (
            f"warning: {message}"
            if ours
            else warnings.formatwarning(message, category, filename, lineno, line).rstrip()
        )
        click.echo(text, err=True)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


_PACKAGE = Path(__file__).resolve().parent


@contextlib.contextmanager
def _user_errors(store: str | None = None) -> Iterator[None]:
    """Turn the errors a user can cause into one line (click's ``Error: ...``, exit 1)."""
    try:
        yield
    except click.ClickException:
        raise
    except DeltaMLError as exc:
        raise click.ClickException(str(exc)) from exc
    except sqlite3.DatabaseError as exc:  # a damaged, foreign or read-only SQLite file
        where = f"label store {store}" if store else "database"
        raise click.ClickException(f"{where}: {exc}") from exc
    except OSError as exc:  # unwritable output, unreachable scheduler, full disk, ...
        raise click.ClickException(str(exc) or type(exc).__name__) from exc


@contextlib.contextmanager
def _scheduler_errors(scheduler: str | None) -> Iterator[None]:
    """An unreachable Dask scheduler, named as such."""
    try:
        yield
    except OSError as exc:
        if scheduler is None:
            raise
        raise click.ClickException(f"cannot reach the Dask scheduler {scheduler}: {exc}") from exc


def _store(url: str, *, must_exist: bool) -> LabelStore:
    """Open a label store; commands that only read refuse to create an empty one."""
    if must_exist and not url.startswith(_POSTGRESQL) and not Path(url).is_file():
        raise click.ClickException(
            f"no label store at {url} (--store): check the path; only label and import "
            "create a store"
        )
    return LabelStore(url)


def _check_output(path: str | None, option: str) -> None:
    """Refuse an output path whose folder is missing or unwritable, before any work."""
    if path is None:
        return
    folder = Path(path).resolve().parent
    if not folder.is_dir():
        raise click.ClickException(f"{option} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise click.ClickException(f"{option} {path}: folder {folder} is not writable")
    if Path(path).is_dir():
        raise click.ClickException(f"{option} {path} is a folder, not a file")


def _check_creatable(path: str | None, option: str) -> None:
    """Refuse a path (file or folder, made with its parents) that cannot be created there."""
    if path is None:
        return
    target = Path(path).resolve()
    ancestor = target.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK):
        raise click.ClickException(f"{option} {path}: cannot be created in {ancestor}")


def _read_frames(path: str, index: int | str = -1) -> Any:
    """One frame (``index`` int) or a list (``":"``); any failure is 'cannot read'."""
    try:
        frames = read(path, index=index)
    except Exception as exc:  # ase.io raises many types; all mean "cannot read"
        raise click.ClickException(f"cannot read {path}: {exc}") from exc
    if isinstance(frames, list) and not frames:
        raise click.ClickException(f"cannot read {path}: no structures in it")
    return frames


def _read_all(path: str) -> list:
    return _read_frames(path, ":")


def _alias(new: str, old: str, new_value: Any, old_value: Any) -> Any:
    """The value of an option given under its new name or a deprecated old one."""
    if old_value is None:
        return new_value
    if new_value is not None and new_value != old_value:
        raise click.UsageError(f"{old} is the old name of {new}: give only {new}")
    click.echo(f"warning: {old} is deprecated here; use {new}", err=True)
    return old_value


@click.group(context_settings={"show_default": True})
@click.version_option(__version__, prog_name="deltaml")
@click.option("-v", "--verbose", count=True, help="more log messages (-vv: debug)")
@click.option("-q", "--quiet", is_flag=True, help="errors only")
def main(verbose: int, quiet: bool) -> None:
    """deltaml: GFN-xTB baseline + learned correction + D3 dispersion."""
    _configure_logging(verbose, quiet)
    click.get_current_context().with_resource(_warnings_as_lines())


def _none(spec: str | None) -> str | None:
    return None if spec is None or spec.lower() == "none" else spec


_baseline_option = click.option(
    "--baseline", default=None, show_default=f"{DEFAULT_METHOD}; with --model: the model's",
    help="baseline method: gfn2 or gfn1",
)  # fmt: skip
_method_alias = click.option("--method", "method_alias", default=None, hidden=True)
_engine_option = click.option(
    "--engine", default=None, show_default=f"{DEFAULT_ENGINE}; with --model: the model's",
    help="baseline engine: tblite or xtb",
)  # fmt: skip
_dispersion_option = click.option(
    "--dispersion", default=None,
    show_default=f"{DEFAULT_DISPERSION}; with --model: the model's",
    help="D3 term DAMPING:FUNCTIONAL[:atm], or 'none'",
)  # fmt: skip
_model_option = click.option(
    "--model", default=None, type=click.Path(exists=True, dir_okay=False),
    help="model.npz; without it, baseline + D3 alone",
)  # fmt: skip
_charge_option = click.option(
    "--charge", type=int, default=None, show_default="the structure's own",
    help="total charge, e",
)  # fmt: skip
_multiplicity_option = click.option(
    "--multiplicity", type=int, default=None, show_default="the structure's own",
    help="spin multiplicity 2S+1",
)  # fmt: skip
_summary_option = click.option(
    "--summary", default=None, type=click.Path(dir_okay=False), help="JSON summary file"
)
_no_progress_option = click.option("--no-progress", is_flag=True, help="no progress bar")


def _composite(
    model: str | None,
    *,
    baseline: str | None = None,
    engine: str | None = None,
    dispersion: str | None = None,
    baseline_dispersion: bool = False,
    charge: int | None = None,
    multiplicity: int | None = None,
) -> DeltaCalculator:
    """The composite from a model file (its terms), or baseline + D3 alone without one.

    Term options given with a model are passed on: the composite refuses them
    (``TermMismatchError``) where they differ from what the model was trained with.
    """
    given: dict[str, Any] = {"charge": charge, "multiplicity": multiplicity}
    if baseline is not None:
        given["method"] = baseline
    if engine is not None:
        given["engine"] = engine
    if dispersion is not None:
        given["dispersion"] = _none(dispersion)
    if baseline_dispersion:
        given["baseline_dispersion"] = True
    if model is not None:
        calc = DeltaCalculator.from_model(model, **given)
        calc.check_correction()
        return calc
    given.setdefault("method", DEFAULT_METHOD)
    given.setdefault("engine", DEFAULT_ENGINE)
    given.setdefault("dispersion", DEFAULT_DISPERSION)
    return DeltaCalculator(correction=ZeroCorrection(), **given)


@main.command("single-point")
@click.argument("structure", type=click.Path(exists=True, dir_okay=False))
@_model_option
@_baseline_option
@_method_alias
@_engine_option
@_dispersion_option
@click.option(
    "--baseline-dispersion",
    is_flag=True,
    help="keep the baseline's own D4/D3 (then use --dispersion none)",
)
@_charge_option
@_multiplicity_option
@click.option("--index", default=-1, help="frame of the file to read")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
def single_point(
    structure: str,
    model: str | None,
    baseline: str | None,
    method_alias: str | None,
    engine: str | None,
    dispersion: str | None,
    baseline_dispersion: bool,
    charge: int | None,
    multiplicity: int | None,
    index: int,
    as_json: bool,
) -> None:
    """Energy, largest force and per-term budget of STRUCTURE with the composite."""
    baseline = _alias("--baseline", "--method", baseline, method_alias)
    atoms = _read_frames(structure, index)
    with _user_errors():
        calc = _composite(
            model, baseline=baseline, engine=engine, dispersion=dispersion,
            baseline_dispersion=baseline_dispersion, charge=charge, multiplicity=multiplicity,
        )  # fmt: skip
        budget = energy_budget(atoms, calc)
    if as_json:
        json.dump(budget, sys.stdout, indent=2)
        click.echo()
        return
    click.echo(_format_budget(structure, budget))


def _format_budget(name: str, budget: dict) -> str:
    base = budget["records"]["baseline"]
    disp = budget["records"]["dispersion"]
    disp_name = "none" if disp is None else f"{disp['damping']}:{disp['method']}"
    lines = [
        f"structure   {name} ({budget['n_atoms']} atoms)",
        f"baseline    {base['method']} via {base['engine']} "
        f"(own dispersion {'removed' if base['remove_dispersion'] else 'kept'})",
        f"dispersion  {disp_name}",
    ]
    if budget["supercell_repeats"] and budget["supercell_repeats"] != [1, 1, 1]:
        reps = "x".join(str(r) for r in budget["supercell_repeats"])
        lines.append(f"note        narrow cell evaluated on a {reps} supercell (per-cell values)")
    lines += [
        f"energy      {budget['energy']:.6f} eV",
        f"max force   {budget['max_force']:.6f} eV/Å",
        "budget (eV):",
    ]
    lines += [f"  {term:<11s}{value:16.6f}" for term, value in budget["terms"].items()]
    return "\n".join(lines)


_reference_option = click.option(
    "--reference", default="dft", type=click.Choice(["dft", "hf", "mp2"]),
    help="reference method (with --xc for dft)",
)  # fmt: skip
_store_option = click.option(
    "--store", "store_url", required=True, help="label store: file.db or a database URL"
)


@main.command("label")
@click.argument("structures", type=click.Path(exists=True, dir_okay=False))
@_store_option
@click.option("--scheduler", default=None, help="Dask scheduler address; default a local pool")
@click.option("--workers", type=int, default=None,
              show_default="cores / (threads x MPI ranks)", help="local processes")  # fmt: skip
@click.option("--threads", type=int, default=1,
              help="threads per label (cp2k: OpenMP threads per MPI rank)")  # fmt: skip
@click.option(
    "--reference", default="dft", type=click.Choice(["dft", "hf", "mp2", "cp2k"]),
    help="reference: dft, hf, mp2 (PySCF, molecules) or cp2k (CP2K GPW DFT: periodic "
    "cells with stress, and molecules)",
)  # fmt: skip
@click.option("--method", "method_alias", default=None, hidden=True)
@click.option("--xc", default=None, show_default=f"{_PYSCF_XC}; cp2k: {_CP2K_XC}",
              help="functional (PySCF: libxc name; cp2k: pbe, revpbe, pbe0, revpbe0)")  # fmt: skip
@click.option("--basis", default=None, show_default=f"{_PYSCF_BASIS}; cp2k: {_CP2K_BASIS}",
              help="basis set")  # fmt: skip
@click.option("--no-density-fit", is_flag=True, help="PySCF: exact Coulomb and exchange integrals")
@click.option("--grid-level", type=int, default=3, help="PySCF: DFT grid level 0-9")
@click.option("--cp2k-cutoff", type=float, default=None,
              show_default=f"{_CP2K_CUTOFF:g}",
              help="cp2k: plane-wave cutoff, Ry")  # fmt: skip
@click.option("--mpi-ranks", type=int, default=None, show_default="1",
              help="cp2k: MPI ranks per label")  # fmt: skip
@_charge_option
@_multiplicity_option
@click.option(
    "--dispersion", default="partner",
    help="D3 term stored beside each label: 'partner' (the reference's published D3 "
    "partner; none for HF, MP2), DAMPING:FUNCTIONAL[:atm], or 'none'",
)  # fmt: skip
@click.option("--no-terms", is_flag=True, help="skip the baseline and D3 values (Δ targets)")
@click.option("--retry-failed", is_flag=True, help="compute failed structures again")
@_no_progress_option
def label(
    structures: str,
    store_url: str,
    scheduler: str | None,
    workers: int | None,
    threads: int,
    reference: str,
    method_alias: str | None,
    xc: str | None,
    basis: str | None,
    no_density_fit: bool,
    grid_level: int,
    cp2k_cutoff: float | None,
    mpi_ranks: int | None,
    charge: int | None,
    multiplicity: int | None,
    dispersion: str,
    no_terms: bool,
    retry_failed: bool,
    no_progress: bool,
) -> None:
    """Label STRUCTURES (any ASE-readable file) with the reference into --store.

    Structures already in the store are skipped; failures are recorded and
    retried only with --retry-failed. --charge/--multiplicity apply to every
    structure (each structure's own info["charge"]/["multiplicity"] otherwise).
    --reference cp2k labels with CP2K (cp2k.psmp on the PATH): 3D-periodic cells
    get stress too; the MPI/OpenMP layout is not part of the method record.
    """
    method = _alias("--reference", "--method", None, method_alias) or reference
    if method == "cp2k":
        settings = _cp2k_settings(xc, basis, no_density_fit, cp2k_cutoff, mpi_ranks)
        if workers is None and scheduler is None and mpi_ranks:
            workers = max(1, (os.cpu_count() or 1) // (threads * mpi_ranks))
    else:
        for value, option in ((cp2k_cutoff, "--cp2k-cutoff"), (mpi_ranks, "--mpi-ranks")):
            if value is not None:
                raise click.UsageError(f"{option} is for --reference cp2k")
        settings = {
            "method": method,
            "xc": _PYSCF_XC if xc is None else xc,
            "basis": _PYSCF_BASIS if basis is None else basis,
            "density_fit": not no_density_fit,
            "grid_level": grid_level,
        }
    frames = _read_all(structures)
    if charge is not None:
        settings["charge"] = charge
    if multiplicity is not None:
        settings["multiplicity"] = multiplicity
    with _user_errors(store_url), _scheduler_errors(scheduler):
        terms_dispersion = None if no_terms else _target_dispersion(dispersion)
        report = label_structures(
            frames,
            _store(store_url, must_exist=False),
            reference=settings,
            baseline=None if no_terms else DEFAULT_BASELINE,
            dispersion=terms_dispersion,
            scheduler=scheduler,
            workers=workers,
            threads_per_worker=threads,
            retry_failed=retry_failed,
            progress=not no_progress,
        )
    click.echo(
        f"{report.structures} structures: {report.computed} computed, {report.failed} failed, "
        f"{report.already_done} already done, {report.already_failed} failed before "
        f"(--retry-failed), {report.in_progress} in progress elsewhere; "
        f"{report.wall_seconds:.1f} s"
    )
    for key, error in report.errors.items():
        click.echo(f"failed {key[:12]}: {error}", err=True)
    if report.failed:
        sys.exit(1)


def _cp2k_settings(
    xc: str | None, basis: str | None, no_density_fit: bool, cutoff: float | None,
    mpi_ranks: int | None,
) -> dict[str, Any]:  # fmt: skip
    """The reference spec of ``label --reference cp2k``: only what was given (CP2K defaults)."""
    ctx = click.get_current_context()
    grid_level = ctx.get_parameter_source("grid_level")  # None: the command has no such option
    pyscf_only = no_density_fit or grid_level not in (None, click.core.ParameterSource.DEFAULT)
    if pyscf_only:
        raise click.UsageError("--no-density-fit and --grid-level are for the PySCF references")
    if xc is not None and xc.lower() not in CP2K_FUNCTIONALS:
        raise click.UsageError(
            f"--xc {xc!r} is not a CP2K functional here; choose one of "
            f"{', '.join(CP2K_FUNCTIONALS)}"
        )
    if not cp2k_available():
        raise click.ClickException(
            "--reference cp2k: the CP2K executable cp2k.psmp is not on the PATH; install "
            "CP2K (Debian: apt-get install cp2k)"
        )
    given = {
        "xc": None if xc is None else xc.lower(),
        "basis": basis,
        "cutoff_ry": cutoff,
        "mpi_ranks": mpi_ranks,
    }
    return {"code": "cp2k", **{k: v for k, v in given.items() if v is not None}}


@main.command("import")
@click.argument("labelled", type=click.Path(exists=True, dir_okay=False))
@_store_option
@click.option(
    "--record",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="JSON file with the method record, for files that carry none",
)
@click.option("--energies-only", is_flag=True, help="accept labels without forces")
@click.option("--no-magnitude-check", is_flag=True, help="skip the units check against GFN2-xTB")
def import_command(
    labelled: str,
    store_url: str,
    record: str | None,
    energies_only: bool,
    no_magnitude_check: bool,
) -> None:
    """Check LABELLED (extxyz: energy eV, forces eV/Å) and add it to --store."""
    with _user_errors(store_url):
        try:
            record_dict = None if record is None else json.loads(Path(record).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise click.ClickException(f"--record {record}: not JSON ({exc})") from exc
        logger.info("reading %s (units checked against GFN2-xTB on up to 20 structures)", labelled)
        frames = _read_labelled(labelled, record=record_dict, require_forces=not energies_only,
                                check_magnitudes=not no_magnitude_check)  # fmt: skip
        logger.info("%d structures read; adding them to the store", len(frames))
        added, present = import_labelled(_store(store_url, must_exist=False), frames)
    click.echo(f"{added} labels added, {present} already present")


def _read_labelled(path: str, **kwargs: Any) -> list[Atoms]:
    """:func:`read_labelled`, with a file that is no extxyz at all as 'cannot read'."""
    try:
        return read_labelled(path, **kwargs)
    except DeltaMLError:
        raise
    except Exception as exc:  # ase.io raises many types; all mean "cannot read"
        raise click.ClickException(f"cannot read {path}: {exc}") from exc


@main.command("export")
@click.argument("output", type=click.Path(dir_okay=False))
@_store_option
def export_command(output: str, store_url: str) -> None:
    """Write every done label of --store to OUTPUT (extxyz)."""
    _check_output(output, "OUTPUT")
    with _user_errors(store_url):
        written = export_labelled(_store(store_url, must_exist=True), output)
    click.echo(f"{written} labelled structures written to {output}")


def _target_dispersion(spec: str) -> dict[str, Any] | str | None:
    """``--dispersion`` of label and fit: "partner", "none" or DAMPING:FUNCTIONAL[:atm]."""
    if spec.lower() == "partner":
        return "partner"
    return None if spec.lower() == "none" else parse_dispersion_spec(spec)


#: ζ of ``deltaml fit --inter-kernel local`` (benchmarks/bench_transfer.py: 2 transferred
#: best of 2 and 8).
LOCAL_INTER_ZETA = 2.0


def _inter_delta(text: str) -> float | str | None:
    """``--inter-delta``: a search name, ``rule`` (None), or a positive width in eV."""
    if text in INTER_DELTA_SEARCHES:
        return text
    if text == "rule":
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        choices = ", ".join([*INTER_DELTA_SEARCHES, "rule"])
        raise click.UsageError(f"--inter-delta must be one of {choices} or a width in eV > 0")
    return value


@main.command("fit")
@click.option("--store", "store_url", default=None, help="label store to train on")
@click.option(
    "--data",
    type=click.Path(exists=True, dir_okay=False),
    multiple=True,
    help="labelled extxyz to train on (instead of --store; repeat for several files)",
)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="model.npz")
@click.option(
    "--decomposition",
    type=click.Choice(["molecular", "atomic"]),
    default="molecular",
    help="molecular: intra- + intermolecular parts (interactions corrected only by the "
    "intermolecular one); atomic: whole environments (bonds may break)",
)
@click.option("--baseline", default=DEFAULT_METHOD, help="baseline method: gfn2 or gfn1")
@click.option("--engine", default=DEFAULT_ENGINE, help="baseline engine: tblite or xtb")
@click.option(
    "--dispersion",
    default="partner",
    help="D3 term of the targets: 'partner' (the reference's published D3 partner), "
    "DAMPING:FUNCTIONAL[:atm], or 'none' (e.g. a reference without a D3 partner: PBE, HF)",
)
@click.option(
    "--validation",
    default=0.1,
    help="held-out fraction (whole interaction systems and named systems)",
)
@click.option(
    "--calibration-folds",
    type=int,
    default=0,
    show_default=True,
    help="k ≥ 2: fit on all the data and calibrate σ by k-fold cross-validation over whole "
    "interaction systems and named systems (info['system'], e.g. a crystal's cells; k + 1 "
    "fits; steadier than one small validation set); 0: "
    "calibrate on the --validation split",
)
@click.option("--seed", default=0, help="seed of the split and the model")
@click.option("--n-sparse", type=int, default=None, show_default="300",
              help="sparse points per element")  # fmt: skip
@click.option("--zeta", type=int, default=None, show_default="2", help="kernel exponent")
@click.option("--cutoff", type=float, default=None, show_default="5.0", help="SOAP cutoff, Å")
@click.option("--backend", default=None, show_default="featomic", help="featomic or dscribe")
@click.option("--energy-sigma", type=float, default=None, show_default="SparseGPR's",
              help="eV/atom")  # fmt: skip
@click.option("--force-sigma", type=float, default=None, show_default="SparseGPR's",
              help="eV/Å")  # fmt: skip
@click.option(
    "--inter-delta",
    default="cv",
    show_default=True,
    help="molecular: prior width of the intermolecular part: cv (chosen by cross-validation "
    "over families), cv-interactions, evidence, rule, or a width in eV",
)
@click.option(
    "--inter-kernel",
    type=click.Choice(["dot", "local"]),
    default="dot",
    show_default=True,
    help="molecular: intermolecular kernel: dot (x·y, linear) or local ((x·y)exp(2(x̂·ŷ−1)): "
    "returns to the terms for contacts unlike the training data; transfers better, "
    "fits the training chemistry less closely)",
)
@_no_progress_option
def fit_command(
    store_url: str | None,
    data: tuple[str, ...],
    output: str,
    decomposition: str,
    baseline: str,
    engine: str,
    dispersion: str,
    validation: float,
    calibration_folds: int,
    seed: int,
    n_sparse: int | None,
    zeta: int | None,
    cutoff: float | None,
    backend: str | None,
    energy_sigma: float | None,
    force_sigma: float | None,
    inter_delta: str,
    inter_kernel: str,
    no_progress: bool,
) -> None:
    """Fit the Δ-model on labelled data; print train and validation errors."""
    if (store_url is None) == (not data):
        raise click.UsageError("give exactly one of --store and --data")
    inter_width = _inter_delta(inter_delta)
    if not 0 <= validation < 1:
        raise click.UsageError("--validation must be in [0, 1)")
    if calibration_folds == 1 or calibration_folds < 0:
        raise click.UsageError("--calibration-folds must be 0 or at least 2")
    source = click.get_current_context().get_parameter_source("validation")
    if calibration_folds and source is click.core.ParameterSource.COMMANDLINE:
        raise click.UsageError("give --validation or --calibration-folds, not both")
    _check_output(output, "-o/--output")
    with _user_errors(store_url):
        if store_url:
            frames = _store(store_url, must_exist=True).labelled()
        else:
            frames = [atoms for path in data for atoms in _read_labelled(path)]
        if dispersion.lower() == "partner":
            partner = check_records(frames).get("dispersion_partner") if frames else True
            if partner is None:
                raise click.ClickException(
                    "the reference's method record names no D3 partner: give --dispersion "
                    "DAMPING:FUNCTIONAL (e.g. d3bj:pbe) or --dispersion none"
                )
        disp = _target_dispersion(dispersion)
        terms = {**DELTA_BASELINE, "method": baseline, "engine": engine}
        targets, trained_with = delta_targets(frames, baseline=terms, dispersion=disp)
        # Isolated atoms anchor the offsets: always fitted, never validation data.
        anchors = [t for t in targets if len(t) == 1 and not t.pbc.any()]
        targets = [t for t in targets if not (len(t) == 1 and not t.pbc.any())]
        train_idx, val_idx = split_systems(targets, 0 if calibration_folds else validation, seed)
        train = [targets[i] for i in train_idx]
        held_out = [targets[i] for i in val_idx]
        descriptor = {"backend": backend, "cutoff": cutoff}
        given = {
            "descriptor": {k: v for k, v in descriptor.items() if v is not None} or None,
            "n_sparse": n_sparse,
            "zeta": zeta,
            "energy_sigma": energy_sigma,
            "force_sigma": force_sigma,
        }
        local = {"inter_kernel": "local", "inter_zeta": LOCAL_INTER_ZETA}
        model = SparseGPR(
            decomposition=decomposition,
            seed=seed,
            inter_delta=inter_width,
            **(local if inter_kernel == "local" else {}),
            **{k: v for k, v in given.items() if v is not None},
        )
        if calibration_folds:
            model = cross_calibrated_fit(
                model, train + anchors, folds=calibration_folds, seed=seed,
                trained_with=trained_with,
            )  # fmt: skip
            scales = dict(model.uncertainty_scale_)
        else:
            model.fit(train + anchors, trained_with=trained_with, progress=not no_progress)
        if held_out:
            scales = model.calibrate(held_out)
        model.save(output)
    click.echo(f"fitted on {len(train)} structures; model written to {output}")
    if model.molecular:
        search = model.inter_cv_ or model.inter_evidence_
        how = f"{inter_delta}, rule {search['rule_delta']:.4g} eV" if search else inter_delta
        click.echo(
            f"intermolecular prior width δ = {model.terms_[1].delta:.4g} eV ({how}); "
            f"{model.n_interactions_} interaction energies in the training set"
        )
    unanchored = [
        chemical_symbols[z] for z in model.species_ if z not in model.offset_fit_.anchored
    ]
    if unanchored:
        click.echo(
            f"note: the offsets of {', '.join(unanchored)} are not anchored by isolated-atom "
            "labels (e.g. --data data/labelled/isolated_atoms.extxyz): compositions outside "
            "the training ones get σ ≈ 1000 eV",
            err=True,
        )
    for name, part in (("train", train), ("validation", held_out)):
        if part:
            click.echo(f"\n{name} ({len(part)} structures)")
            click.echo(error_table(errors(predict_all(model, part))))
    if held_out or calibration_folds:
        where = f"by {calibration_folds}-fold cross-validation" if calibration_folds else (
            "on the validation set"
        )  # fmt: skip
        line = (
            f"\nuncertainty calibrated {where}: energy x{scales['energy']:.2f}, "
            f"forces x{scales['forces']:.2f}"
        )
        if "forces_floor" in scales:
            line += f" + {scales['forces_floor']:.3f} eV/Å"
        if "inter" in scales:
            line += (
                f", interaction energies x{scales['inter']:.2f} "
                f"+ {scales['inter_floor'] / (kcal / mol):.2f} kcal/mol"
            )
        click.echo(line)


@main.command("evaluate")
@click.argument("files", nargs=-1, required=True, metavar="TEST")
@click.option("--model", default=None, type=click.Path(exists=True, dir_okay=False),
              help="model.npz (required)")  # fmt: skip
@click.option("--plots", default=None, type=click.Path(file_okay=False), help="folder for PNGs")
@click.option("--json", "as_json", is_flag=True, help="print the errors as JSON")
def evaluate_command(files: tuple[str, ...], model: str | None, plots: str | None,
                     as_json: bool) -> None:  # fmt: skip
    """Errors of --model on TEST (labelled extxyz): composite vs baseline alone.

    The older form ``deltaml evaluate MODEL TEST`` is still accepted.
    """
    if model is None and len(files) == 2:
        model, files = files[0], files[1:]
    if model is None:
        raise click.UsageError("give the model with --model")
    if len(files) != 1:
        raise click.UsageError(f"give one TEST file, got {len(files)}: {' '.join(files)}")
    test = files[0]
    _check_creatable(plots, "--plots")
    for path in (model, test):
        if not Path(path).is_file():
            raise click.UsageError(f"{path} does not exist")
    with _user_errors():
        fitted = SparseGPR.load(model)
        frames = _read_labelled(test)
        logger.info("%s: %d structures; forming the Δ targets", test, len(frames))
        predictions = predict_all(fitted, delta_targets_for(fitted, frames), progress=not as_json)
        table = errors(predictions)
        if plots is not None:
            folder = Path(plots)
            folder.mkdir(parents=True, exist_ok=True)
            table["plots"] = [
                str(plot_parity(predictions, folder / "parity.png")),
                str(plot_calibration(predictions, folder / "calibration.png")),
            ]
    if as_json:
        json.dump(table, sys.stdout, indent=2)
        click.echo()
        return
    click.echo(f"{test}: {len(frames)} structures")
    click.echo(error_table(table))
    for plot in table.get("plots", []):
        click.echo(f"plot written: {plot}")


def _write_summary(summary: dict, path: str | None) -> None:
    if path is not None:
        with _user_errors():
            write_text_atomic(path, json.dumps(summary, indent=2, default=float))
        click.echo(f"summary written to {path}")


def _terms_options(command: Any) -> Any:
    """--model, --baseline, --engine, --dispersion, --charge, --multiplicity."""
    for option in reversed(
        (_model_option, _baseline_option, _engine_option, _dispersion_option, _charge_option,
         _multiplicity_option)
    ):  # fmt: skip
        command = option(command)
    return command


def _composite_for(
    atoms: Atoms, model: str | None, baseline: str | None, engine: str | None,
    dispersion: str | None, charge: int | None, multiplicity: int | None,
) -> DeltaCalculator:  # fmt: skip
    """The composite of a command, with its charge and spin checked against ``atoms``.

    The composite itself warns (once) where the model never saw that charge or
    spin state; :func:`_warnings_as_lines` prints it.
    """
    calc = _composite(
        model, baseline=baseline, engine=engine, dispersion=dispersion, charge=charge,
        multiplicity=multiplicity,
    )  # fmt: skip
    charge_and_multiplicity(atoms, charge, multiplicity)  # a conflict: one line, before any work
    return calc


@main.command("relax")
@click.argument("structure", type=click.Path(exists=True, dir_okay=False))
@_terms_options
@click.option("--cell", is_flag=True, help="relax the cell too (3D-periodic structures)")
@click.option("--fmax", default=0.01, help="force threshold, eV/Å")
@click.option("--stress-tol", default=0.05, help="stress threshold with --cell, GPa")
@click.option("--steps", default=500, help="most optimizer steps")
@click.option("--allow-unconverged", is_flag=True,
              help="exit 0 when --steps run out before convergence")  # fmt: skip
@click.option("-o", "--output", default=None, type=click.Path(dir_okay=False), help="trajectory")
@_summary_option
@_no_progress_option
def relax_command(
    structure: str, model: str | None, baseline: str | None, engine: str | None,
    dispersion: str | None, charge: int | None, multiplicity: int | None, cell: bool,
    fmax: float, stress_tol: float, steps: int, allow_unconverged: bool, output: str | None,
    summary: str | None, no_progress: bool,
) -> None:  # fmt: skip
    """Relax STRUCTURE with the composite; write the trajectory (extxyz) and a summary.

    Exits 1 when the relaxation has not converged in --steps (after writing the
    trajectory and the summary), unless --allow-unconverged.
    """
    _check_output(output, "-o/--output")
    _check_output(summary, "--summary")
    atoms = _read_frames(structure)
    with _user_errors():
        atoms.calc = _composite_for(atoms, model, baseline, engine, dispersion, charge,
                                    multiplicity)  # fmt: skip
        result = relax(
            atoms, fmax=fmax, steps=steps, cell=cell, trajectory=output,
            progress=not no_progress,
            stress_tol_gpa=stress_tol if cell else None,
        )  # fmt: skip
    status = "converged" if result["converged"] else "NOT converged"
    click.echo(
        f"{status} in {result['steps']} steps: E = {result['energy_final_ev']:.6f} eV, "
        f"max |F| = {result['max_force_ev_a']:.4f} eV/Å"
    )
    _write_summary(result, summary)
    if not result["converged"] and not allow_unconverged:
        raise click.ClickException(
            f"relaxation not converged in {steps} steps (fmax {fmax} eV/Å): raise --steps, "
            "or give --allow-unconverged to accept it"
        )


@main.command("md")
@click.argument("structure", type=click.Path(exists=True, dir_okay=False))
@_terms_options
@click.option("--temperature", default=300.0, help="K")
@click.option("--steps", default=1000, help="MD steps")
@click.option("--timestep", default=0.5, help="fs")
@click.option("--nve", is_flag=True, help="velocity Verlet instead of Langevin")
@click.option("--interval", default=10, help="steps between frames")
@click.option("--seed", default=0)
@click.option("-o", "--output", default=None, type=click.Path(dir_okay=False), help="trajectory")
@_summary_option
@_no_progress_option
def md_command(
    structure: str, model: str | None, baseline: str | None, engine: str | None,
    dispersion: str | None, charge: int | None, multiplicity: int | None,
    temperature: float, steps: int, timestep: float, nve: bool, interval: int, seed: int,
    output: str | None, summary: str | None, no_progress: bool,
) -> None:  # fmt: skip
    """Run MD of STRUCTURE with the composite; write the trajectory and a summary."""
    _check_output(output, "-o/--output")
    _check_output(summary, "--summary")
    atoms = _read_frames(structure)
    with _user_errors():
        atoms.calc = _composite_for(atoms, model, baseline, engine, dispersion, charge,
                                    multiplicity)  # fmt: skip
        result = run_md(
            atoms, temperature_k=temperature, steps=steps, timestep_fs=timestep,
            ensemble="nve" if nve else "langevin", interval=interval, seed=seed,
            trajectory=output, progress=not no_progress,
        )  # fmt: skip
    click.echo(
        f"{steps} steps in {result['wall_time_s']:.1f} s; mean T = "
        f"{np.mean(result['temperature_k']):.0f} K"
    )
    if "energy_drift_ev_per_atom_ps" in result:
        click.echo(f"energy drift {result['energy_drift_ev_per_atom_ps']:.2e} eV/atom/ps")
    _write_summary(result, summary)


@main.command("stability")
@click.argument("structure", type=click.Path(exists=True, dir_okay=False))
@click.option("--model", required=True, type=click.Path(exists=True, dir_okay=False),
              help="model.npz")  # fmt: skip
@_charge_option
@_multiplicity_option
@click.option("--temperature", default=300.0, help="K")
@click.option("--steps", default=2000, help="MD steps")
@click.option("--timestep", default=0.5, help="fs")
@click.option("--samples", default=5, help="frames re-evaluated")
@_reference_option
@click.option("--xc", default="revpbe0", help="reference functional")
@click.option("--basis", default="def2-tzvp", help="reference basis")
@click.option("--no-reference", is_flag=True, help="only detect unphysical events")
@click.option("--seed", default=0)
@_summary_option
def stability_command(
    structure: str, model: str, charge: int | None, multiplicity: int | None,
    temperature: float, steps: int, timestep: float, samples: int, reference: str, xc: str,
    basis: str, no_reference: bool, seed: int, summary: str | None,
) -> None:  # fmt: skip
    """Is the model fit for MD? Unphysical events, and errors vs the reference over time."""
    _check_output(summary, "--summary")
    atoms = _read_frames(structure)
    with _user_errors():
        calc = _composite_for(atoms, model, None, None, None, charge, multiplicity)
        p = calc.parameters
        baseline = DeltaCalculator(
            correction=ZeroCorrection(), method=p.method, engine=p.engine,
            dispersion=p.dispersion, baseline_dispersion=p.baseline_dispersion,
            charge=charge, multiplicity=multiplicity,
        )  # fmt: skip
        spin = {"charge": charge, "multiplicity": multiplicity}
        reference_calc = None if no_reference else PySCFReference(
            method=reference, xc=xc, basis=basis,
            **{k: v for k, v in spin.items() if v is not None},
        )  # fmt: skip
        report = md_stability(
            atoms, calc, temperature_k=temperature, steps=steps, timestep_fs=timestep,
            seed=seed, reference=reference_calc, baseline=baseline, samples=samples,
            progress=True,
        )  # fmt: skip
    click.echo("stable" if report["stable"] else "UNSTABLE")
    for event in report["events"]:
        click.echo(f"  step {event['step']}: {event['kind']} ({event['detail']})")
    for row in report["samples"]:
        click.echo(
            f"  t = {row['time_fs']:7.1f} fs: force MAE {row['force_mae']:.4f} eV/Å "
            f"(baseline {row['baseline_force_mae']:.4f}), max σ_F "
            f"{row.get('max_force_uncertainty_ev_a', float('nan')):.4f} eV/Å"
        )
    _write_summary(report, summary)
    if not report["stable"]:
        sys.exit(1)


@main.command("active-learn")
@click.option("--store", "store_url", required=True, help="label store (initial labels)")
@click.option("--start", required=True, type=click.Path(exists=True, dir_okay=False),
              help="starting geometries (any ASE-readable file)")  # fmt: skip
@click.option("--workdir", required=True, type=click.Path(file_okay=False))
@click.option("--validation", default=None, type=click.Path(exists=True, dir_okay=False),
              help="labelled extxyz never trained on")  # fmt: skip
@click.option("--iterations", default=5)
@click.option("--budget", type=int, default=None, help="stop at this many labels")
@click.option(
    "--target-uncertainty",
    type=float,
    default=None,
    help="stop below it: eV/Å (--score forces) or × (1 kJ/mol, 0.1 GPa) (--score crystal)",
)
@click.option("--batch", default=5, help="labels per iteration")
@click.option("--selection", default="variance_reduction",
              type=click.Choice(["uncertainty", "variance_reduction", "random"]),
              help="how a batch is chosen (deltaml.active.select_batch)")  # fmt: skip
@click.option("--temperature", "temperatures", multiple=True, type=float, default=(300.0,),
              help="K (repeat for several)")  # fmt: skip
@click.option("--md-steps", default=400)
@click.option(
    "--reference", default="dft", type=click.Choice(["dft", "hf", "mp2", "cp2k"]),
    help="reference: dft (PySCF, molecules) or cp2k (CP2K: periodic cells with stress)",
)  # fmt: skip
@click.option("--xc", default=None, show_default=f"{_PYSCF_XC}; cp2k: {_CP2K_XC}",
              help="reference functional")  # fmt: skip
@click.option("--basis", default=None, show_default=f"{_PYSCF_BASIS}; cp2k: {_CP2K_BASIS}",
              help="reference basis")  # fmt: skip
@click.option("--cp2k-cutoff", type=float, default=None, show_default=f"{_CP2K_CUTOFF:g}",
              help="cp2k: plane-wave cutoff, Ry")  # fmt: skip
@click.option("--strained", default=0, show_default=True,
              help="crystals: strained copies of each periodic start as candidates")  # fmt: skip
@click.option("--max-strain", default=0.05, show_default=True,
              help="crystals: largest strain component of those copies")  # fmt: skip
@click.option("--relax-steps", default=0, show_default=True,
              help="crystals: cell-relaxation steps of each periodic start; 5 frames become "
                   "candidates")  # fmt: skip
@click.option("--explore-starts", type=click.IntRange(min=1), default=None,
              help="starts explored per iteration, in rotation (default all)")  # fmt: skip
@click.option("--carry", type=click.IntRange(min=0), default=0, show_default=True,
              help="iterations an unlabelled candidate stays in the pool")  # fmt: skip
@click.option("--score", default="forces", show_default=True,
              type=click.Choice(["forces", "crystal"]),
              help="a candidate's uncertainty: largest force σ, or (crystals) per-molecule "
                   "energy and stress σ in units of 1 kJ/mol and 0.1 GPa")  # fmt: skip
@_charge_option
@_multiplicity_option
@click.option("--workers", default=1)
@click.option("--seed", default=0)
def active_learn_command(
    store_url: str, start: str, workdir: str, validation: str | None, iterations: int,
    budget: int | None, target_uncertainty: float | None, batch: int, selection: str,
    temperatures: tuple[float, ...], md_steps: int, reference: str, xc: str | None,
    basis: str | None, cp2k_cutoff: float | None, strained: int, max_strain: float,
    relax_steps: int, explore_starts: int | None, carry: int, score: str, charge: int | None,
    multiplicity: int | None, workers: int, seed: int,
) -> None:  # fmt: skip
    """Grow the store where the composite is uncertain (resumes from --workdir).

    Crystals: --reference cp2k labels periodic cells (with stress), --strained N
    adds N strained copies of every periodic start to each iteration's candidates,
    --relax-steps frames of a cell relaxation, and --score crystal ranks them by
    the σ of the energy per molecule and of the stress. With many starts,
    --explore-starts K explores K of them per iteration in rotation and --carry M
    keeps the unlabelled candidates of the last M iterations in the pool.
    """
    if reference not in ("dft", "cp2k"):
        raise click.UsageError(
            f"active-learn needs a reference with forces and a D3 partner (dft, cp2k); "
            f"--reference {reference} has {'no forces' if reference == 'mp2' else 'no D3 partner'}"
        )
    if strained < 0 or not 0 <= max_strain < 0.5:
        raise click.UsageError("--strained must be >= 0 and --max-strain in [0, 0.5)")
    if relax_steps < 0:
        raise click.UsageError(f"--relax-steps must be >= 0, got {relax_steps}")
    if reference == "cp2k":
        settings: dict[str, Any] = _cp2k_settings(xc, basis, False, cp2k_cutoff, None)
    elif cp2k_cutoff is not None:
        raise click.UsageError("--cp2k-cutoff is for --reference cp2k")
    else:
        settings = {
            "method": reference,
            "xc": _PYSCF_XC if xc is None else xc,
            "basis": _PYSCF_BASIS if basis is None else basis,
        }
    _check_creatable(workdir, "--workdir")
    starting = _read_all(start)
    with _user_errors(store_url):
        for atoms in starting:  # the structures carry it: MD frames and labels alike
            atoms.info["charge"], atoms.info["multiplicity"] = charge_and_multiplicity(
                atoms, charge, multiplicity
            )
        if charge is not None:
            settings["charge"] = charge
        if multiplicity is not None:
            settings["multiplicity"] = multiplicity
        learner = ActiveLearner(
            workdir, _store(store_url, must_exist=False), starting, reference=settings,
            validation=_read_labelled(validation) if validation else None,
            temperatures=temperatures, md_steps=md_steps, batch=batch,
            pool=max(4 * batch, 20), selection=selection, seed=seed, workers=workers,
            strained=strained, max_strain=max_strain, relax_steps=relax_steps, score=score,
            explore_starts=explore_starts, carry=carry,
        )  # fmt: skip
        history = learner.run(
            iterations=iterations, budget=budget, target_uncertainty=target_uncertainty,
            progress=True,
        )  # fmt: skip
    for record in history:
        line = f"iteration {record['iteration']}: {record.get('n_labels')} labels"
        if "validation" in record:
            line += f", validation force MAE {record['validation']['force_mae']:.4f} eV/Å"
        if record.get("candidate_uncertainty_median") is not None:
            median = record["candidate_uncertainty_median"]
            line += (
                f", median candidate σ_F {median:.3f} eV/Å"
                if score == "forces"
                else f", median candidate σ {median:.2f} × (1 kJ/mol per molecule, 0.1 GPa)"
            )
        click.echo(line)
    click.echo(f"history: {learner.history_path}")


def _gas_molecule(spec: str) -> Atoms:
    """A gas-phase molecule from a file, or by name from ASE's G2 collection (e.g. H2O)."""
    if Path(spec).is_file():
        return _read_frames(spec)
    from ase.build import molecule

    try:
        return molecule(spec)
    except KeyError as exc:
        raise click.ClickException(
            f"--molecule {spec!r} is neither a file nor a molecule name of ase.build.molecule"
        ) from exc


@main.command("rank")
@click.argument("candidates", nargs=-1, required=True)
@click.option(
    "--molecule", "molecules", multiple=True, required=True,
    help="gas-phase molecule: a file or a G2 name (repeat for a co-crystal)",
)  # fmt: skip
@_model_option
@_baseline_option
@_engine_option
@_dispersion_option
@click.option("--no-baseline", is_flag=True, help="skip the ranking by the baseline alone")
@click.option("--no-relax", is_flag=True, help="single points on the given geometries")
@click.option("--fmax", default=0.01, help="force threshold, eV/Å")
@click.option("--steps", default=300, help="most optimizer steps")
@click.option("--stress-tol", default=0.05, help="cell threshold, GPa")
@click.option("--symmetry", is_flag=True, help="keep each candidate's space group")
@click.option("--workdir", default="ranking", help="relaxed structures (resume)")
@click.option("--reference-energies", default=None,
              type=click.Path(exists=True, dir_okay=False),
              help="CSV: candidate,energy_kj_mol")  # fmt: skip
@click.option("--reference", "reference_alias", default=None, hidden=True,
              type=click.Path(exists=True, dir_okay=False))  # fmt: skip
@click.option("--plot", default=None, type=click.Path(dir_okay=False), help="energy ladder PNG")
@click.option("--seed", default=0, help="proton disorder of ice:NAME")
@click.option("-o", "--output", default="ranking.csv", help="CSV table")
@_summary_option
@_no_progress_option
def rank_command(
    candidates: tuple[str, ...], molecules: tuple[str, ...], model: str | None,
    baseline: str | None, engine: str | None, dispersion: str | None, no_baseline: bool,
    no_relax: bool, fmax: float, steps: int, stress_tol: float, symmetry: bool, workdir: str,
    reference_energies: str | None, reference_alias: str | None, plot: str | None, seed: int,
    output: str, summary: str | None, no_progress: bool,
) -> None:  # fmt: skip
    """Rank CANDIDATES (crystal files or ice:NAME) by lattice energy per formula unit.

    Relaxes every candidate (positions and cell) and the gas-phase molecule(s)
    with the composite and, unless --no-baseline, with the GFN-xTB baseline alone
    (its own dispersion kept); relaxed structures in --workdir are not relaxed again.
    A candidate whose relaxation fails (e.g. its cell collapses) is reported as
    failed, with the reason, and the others are ranked.
    """
    reference = _alias("--reference-energies", "--reference", reference_energies, reference_alias)
    _check_output(summary, "--summary")
    for path, option in ((output, "-o/--output"), (plot, "--plot"), (workdir, "--workdir")):
        _check_creatable(path, option)

    def composite() -> DeltaCalculator:
        calc = _composite(model, baseline=baseline, engine=engine, dispersion=dispersion)
        if getattr(calc.correction, "uncertainty", None) == "forces":
            calc.correction.uncertainty = "energy"  # the ranking needs energies only
        return calc

    with _user_errors():
        methods: dict[str, Any] = {"composite": composite}
        if not no_baseline:
            p = composite().parameters
            base, base_engine = p["method"], p["engine"]
            methods[base] = lambda: XTBBaseline(method=base, engine=base_engine)
        ranking = rank_polymorphs(
            read_candidates(candidates, seed=seed), [_gas_molecule(m) for m in molecules],
            methods, workdir=workdir, relax_structures=not no_relax, fmax=fmax, steps=steps,
            symmetry=symmetry, stress_tol_gpa=stress_tol, progress=not no_progress,
        )  # fmt: skip
        result: dict[str, Any] = {"table": str(ranking.to_csv(output))}
        if plot is not None:
            result["plot"] = str(ranking.plot(plot))
        if reference is not None:
            result["reference"] = {m: ranking.compare(reference, m) for m in ranking.methods}
    table = ranking.table()
    shown = [c for c in table.columns if c.startswith(("Z", "rel_", "sigma_rel_", "rank_"))]
    click.echo(table[shown].to_string(float_format=lambda v: f"{v:.2f}"))
    for method, failures in ranking.failed.items():
        for name, reason in failures.items():
            click.echo(f"{method} / {name}: FAILED ({reason})", err=True)
    for method, comparison in result.get("reference", {}).items():
        click.echo(
            f"{method} vs reference: MAE {comparison['mae_relative_kj_mol']:.2f} kJ/mol, "
            f"Spearman {comparison['spearman']:.2f}, {len(comparison['wrong_pairs'])} pairs "
            "in the wrong order"
        )
    correction = ranking.records["composite"].get("correction", {})
    if correction.get("content_sha256"):
        click.echo(
            f"composite: model {correction.get('path')} (content sha256 "
            f"{correction['content_sha256'][:16]}…)"
        )
    else:
        click.echo(f"composite: correction {correction.get('name')!r} (no model file)")
    click.echo(f"table written to {output}")
    result["records"] = ranking.records
    result["failed"] = ranking.failed
    _write_summary(result, summary)


if __name__ == "__main__":  # pragma: no cover
    main()
