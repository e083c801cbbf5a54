"""The ``deltaml`` console script: parsing and printing only.

Each subcommand calls one importable library function; no science lives here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import numpy as np
from ase.io import read

from deltaml import __version__
from deltaml.active import ActiveLearner
from deltaml.baseline import XTBBaseline
from deltaml.calculator import DeltaCalculator, energy_budget
from deltaml.correction import ZeroCorrection
from deltaml.dataset import delta_targets, export_labelled, import_labelled, read_labelled
from deltaml.errors import DeltaMLError
from deltaml.evaluation import (
    delta_targets_for,
    error_table,
    errors,
    md_stability,
    plot_calibration,
    plot_parity,
    predict_all,
)
from deltaml.labelling import DEFAULT_BASELINE, label_structures
from deltaml.model import SparseGPR
from deltaml.ranking import rank_polymorphs, read_candidates
from deltaml.reference import PySCFReference
from deltaml.simulation import relax, run_md
from deltaml.store import LabelStore


@click.group()
@click.version_option(__version__, prog_name="deltaml")
def main() -> None:
    """deltaml: GFN-xTB baseline + learned correction + D3 dispersion."""


@main.command("single-point")
@click.argument("structure", type=click.Path(exists=True, dir_okay=False))
@click.option("--method", default="gfn2", show_default=True, help="gfn2 or gfn1")
@click.option("--engine", default="tblite", show_default=True, help="tblite or xtb")
@click.option(
    "--dispersion",
    default="d3bj:pbe0",
    show_default=True,
    help="D3 term DAMPING:FUNCTIONAL[:atm], or 'none'",
)
@click.option(
    "--baseline-dispersion",
    is_flag=True,
    help="keep the baseline's own D4/D3 (then use --dispersion none)",
)
@click.option("--charge", type=int, default=None, help="total charge, e")
@click.option("--multiplicity", type=int, default=None, help="spin multiplicity 2S+1")
@click.option("--index", default=-1, show_default=True, help="frame of the file to read")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
def single_point(
    structure: str,
    method: str,
    engine: str,
    dispersion: str,
    baseline_dispersion: bool,
    charge: int | None,
    multiplicity: int | None,
    index: int,
    as_json: bool,
) -> None:
    """Energy, largest force and per-term budget of STRUCTURE (no learned term yet)."""
    try:
        atoms = read(structure, index=index)
    except Exception as exc:  # ase.io raises many types; all mean "cannot read"
        raise click.ClickException(f"cannot read {structure}: {exc}") from exc
    try:
        calc = DeltaCalculator(
            correction=ZeroCorrection(),
            method=method,
            engine=engine,
            dispersion=None if dispersion.lower() == "none" else dispersion,
            baseline_dispersion=baseline_dispersion,
            charge=charge,
            multiplicity=multiplicity,
        )
        budget = energy_budget(atoms, calc)
    except DeltaMLError as exc:
        raise click.ClickException(str(exc)) from exc
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


def _read_all(path: str) -> list:
    try:
        return read(path, index=":")
    except Exception as exc:  # ase.io raises many types; all mean "cannot read"
        raise click.ClickException(f"cannot read {path}: {exc}") from exc


@main.command("label")
@click.argument("structures", type=click.Path(exists=True, dir_okay=False))
@click.option("--store", "store_url", required=True, help="label store: file.db or a database URL")
@click.option("--scheduler", default=None, help="Dask scheduler address; default a local pool")
@click.option("--workers", type=int, default=None, help="local processes [cores / threads]")
@click.option("--threads", type=int, default=1, show_default=True, help="threads per label")
@click.option("--method", default="dft", show_default=True, help="dft, hf or mp2")
@click.option("--xc", default="revpbe0", show_default=True, help="functional (libxc name)")
@click.option("--basis", default="def2-tzvp", show_default=True, help="basis set")
@click.option("--no-density-fit", is_flag=True, help="exact Coulomb and exchange integrals")
@click.option("--grid-level", type=int, default=3, show_default=True, help="DFT grid level 0-9")
@click.option("--charge", type=int, default=None, help="total charge of every structure, e")
@click.option("--multiplicity", type=int, default=None, help="2S+1 of every structure")
@click.option("--no-terms", is_flag=True, help="skip the baseline and D3 values (Δ targets)")
@click.option("--retry-failed", is_flag=True, help="compute failed structures again")
@click.option("--no-progress", is_flag=True, help="no progress bar")
def label(
    structures: str,
    store_url: str,
    scheduler: str | None,
    workers: int | None,
    threads: int,
    method: str,
    xc: str,
    basis: str,
    no_density_fit: bool,
    grid_level: int,
    charge: int | None,
    multiplicity: int | None,
    no_terms: bool,
    retry_failed: bool,
    no_progress: bool,
) -> None:
    """Label STRUCTURES (any ASE-readable file) with the reference into --store.

    Structures already in the store are skipped; failures are recorded and
    retried only with --retry-failed.
    """
    frames = _read_all(structures)
    reference = {
        "method": method,
        "xc": xc,
        "basis": basis,
        "density_fit": not no_density_fit,
        "grid_level": grid_level,
    }
    if charge is not None:
        reference["charge"] = charge
    if multiplicity is not None:
        reference["multiplicity"] = multiplicity
    try:
        report = label_structures(
            frames,
            LabelStore(store_url),
            reference=reference,
            baseline=None if no_terms else DEFAULT_BASELINE,
            dispersion=None if no_terms else "partner",
            scheduler=scheduler,
            workers=workers,
            threads_per_worker=threads,
            retry_failed=retry_failed,
            progress=not no_progress,
        )
    except DeltaMLError as exc:
        raise click.ClickException(str(exc)) from exc
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


@main.command("import")
@click.argument("labelled", type=click.Path(exists=True, dir_okay=False))
@click.option("--store", "store_url", required=True, help="label store: file.db or a database URL")
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
    try:
        record_dict = None if record is None else json.loads(Path(record).read_text())
        frames = read_labelled(
            labelled,
            record=record_dict,
            require_forces=not energies_only,
            check_magnitudes=not no_magnitude_check,
        )
        added, present = import_labelled(LabelStore(store_url), frames)
    except (DeltaMLError, json.JSONDecodeError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{added} labels added, {present} already present")


@main.command("export")
@click.argument("output", type=click.Path(dir_okay=False))
@click.option("--store", "store_url", required=True, help="label store: file.db or a database URL")
def export_command(output: str, store_url: str) -> None:
    """Write every done label of --store to OUTPUT (extxyz)."""
    try:
        written = export_labelled(LabelStore(store_url), output)
    except DeltaMLError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{written} labelled structures written to {output}")


def _split(count: int, validation: float, seed: int) -> tuple[list[int], list[int]]:
    order = np.random.default_rng(seed).permutation(count)
    n_val = round(validation * count)
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


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
    show_default=True,
    help="molecular: intra- + intermolecular parts (interactions corrected only by the "
    "intermolecular one); atomic: whole environments (bonds may break)",
)
@click.option("--validation", default=0.1, show_default=True, help="held-out fraction")
@click.option("--seed", default=0, show_default=True, help="seed of the split and the model")
@click.option("--n-sparse", type=int, default=None, help="sparse points per element [200]")
@click.option("--zeta", type=int, default=None, help="kernel exponent [2]")
@click.option("--cutoff", type=float, default=None, help="SOAP cutoff, Å [5.0]")
@click.option("--backend", default=None, help="featomic or dscribe [featomic]")
@click.option("--energy-sigma", type=float, default=None, help="eV/atom [SparseGPR's default]")
@click.option("--force-sigma", type=float, default=None, help="eV/Å [SparseGPR's default]")
@click.option("--no-progress", is_flag=True, help="no progress bar")
def fit_command(
    store_url: str | None,
    data: tuple[str, ...],
    output: str,
    decomposition: str,
    validation: float,
    seed: int,
    n_sparse: int | None,
    zeta: int | None,
    cutoff: float | None,
    backend: str | None,
    energy_sigma: float | None,
    force_sigma: float | None,
    no_progress: bool,
) -> None:
    """Fit the Δ-model on labelled data; print train and validation errors."""
    if (store_url is None) == (not data):
        raise click.UsageError("give exactly one of --store and --data")
    if not 0 <= validation < 1:
        raise click.UsageError("--validation must be in [0, 1)")
    try:
        if store_url:
            frames = LabelStore(store_url).labelled()
        else:
            frames = [atoms for path in data for atoms in read_labelled(path)]
        targets, trained_with = delta_targets(frames)
        train_idx, val_idx = _split(len(targets), validation, seed)
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
        model = SparseGPR(
            decomposition=decomposition,
            seed=seed,
            **{k: v for k, v in given.items() if v is not None},
        )
        model.fit(train, trained_with=trained_with, progress=not no_progress)
        if held_out:
            scales = model.calibrate(held_out)
        model.save(output)
    except DeltaMLError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"fitted on {len(train)} structures; model written to {output}")
    for name, part in (("train", train), ("validation", held_out)):
        if part:
            click.echo(f"\n{name} ({len(part)} structures)")
            click.echo(error_table(errors(predict_all(model, part))))
    if held_out:
        click.echo(
            f"\nuncertainty calibrated on the validation set: energy x{scales['energy']:.2f}, "
            f"forces x{scales['forces']:.2f}"
        )


@main.command("evaluate")
@click.argument("model_path", type=click.Path(exists=True, dir_okay=False))
@click.argument("test", type=click.Path(exists=True, dir_okay=False))
@click.option("--plots", default=None, type=click.Path(file_okay=False), help="folder for PNGs")
@click.option("--json", "as_json", is_flag=True, help="print the errors as JSON")
def evaluate_command(model_path: str, test: str, plots: str | None, as_json: bool) -> None:
    """Errors of MODEL_PATH on TEST (labelled extxyz): composite vs baseline alone."""
    try:
        model = SparseGPR.load(model_path)
        frames = read_labelled(test)
        predictions = predict_all(model, delta_targets_for(model, frames))
    except DeltaMLError as exc:
        raise click.ClickException(str(exc)) from exc
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


def _composite(model: str | None, dispersion: str) -> DeltaCalculator:
    """The composite from a model file, or baseline + D3 alone without one."""
    if model is not None:
        return DeltaCalculator.from_model(model)
    return DeltaCalculator(
        correction=ZeroCorrection(),
        dispersion=None if dispersion.lower() == "none" else dispersion,
    )


def _write_summary(summary: dict, path: str | None) -> None:
    if path is not None:
        Path(path).write_text(json.dumps(summary, indent=2, default=float))
        click.echo(f"summary written to {path}")


_model_option = click.option(
    "--model", default=None, type=click.Path(exists=True, dir_okay=False),
    help="model.npz; without it, baseline + D3 alone",
)  # fmt: skip
_dispersion_option = click.option(
    "--dispersion", default="d3bj:pbe0", show_default=True,
    help="D3 term without --model (with a model: the one it was trained with)",
)  # fmt: skip
_summary_option = click.option(
    "--summary", default=None, type=click.Path(dir_okay=False), help="JSON summary file"
)


@main.command("relax")
@click.argument("structure", type=click.Path(exists=True, dir_okay=False))
@_model_option
@_dispersion_option
@click.option("--cell", is_flag=True, help="relax the cell too (3D-periodic structures)")
@click.option("--fmax", default=0.01, show_default=True, help="force threshold, eV/Å")
@click.option("--steps", default=500, show_default=True, help="most optimizer steps")
@click.option("-o", "--output", default=None, type=click.Path(dir_okay=False), help="trajectory")
@_summary_option
def relax_command(
    structure: str, model: str | None, dispersion: str, cell: bool, fmax: float, steps: int,
    output: str | None, summary: str | None,
) -> None:  # fmt: skip
    """Relax STRUCTURE with the composite; write the trajectory (extxyz) and a summary."""
    atoms = read(structure)
    try:
        atoms.calc = _composite(model, dispersion)
        result = relax(atoms, fmax=fmax, steps=steps, cell=cell, trajectory=output, progress=True)
    except DeltaMLError as exc:
        raise click.ClickException(str(exc)) from exc
    status = "converged" if result["converged"] else "NOT converged"
    click.echo(
        f"{status} in {result['steps']} steps: E = {result['energy_final_ev']:.6f} eV, "
        f"max |F| = {result['max_force_ev_a']:.4f} eV/Å"
    )
    _write_summary(result, summary)


@main.command("md")
@click.argument("structure", type=click.Path(exists=True, dir_okay=False))
@_model_option
@_dispersion_option
@click.option("--temperature", default=300.0, show_default=True, help="K")
@click.option("--steps", default=1000, show_default=True, help="MD steps")
@click.option("--timestep", default=0.5, show_default=True, help="fs")
@click.option("--nve", is_flag=True, help="velocity Verlet instead of Langevin")
@click.option("--interval", default=10, show_default=True, help="steps between frames")
@click.option("--seed", default=0, show_default=True)
@click.option("-o", "--output", default=None, type=click.Path(dir_okay=False), help="trajectory")
@_summary_option
def md_command(
    structure: str, model: str | None, dispersion: str, temperature: float, steps: int,
    timestep: float, nve: bool, interval: int, seed: int, output: str | None,
    summary: str | None,
) -> None:  # fmt: skip
    """Run MD of STRUCTURE with the composite; write the trajectory and a summary."""
    atoms = read(structure)
    try:
        atoms.calc = _composite(model, dispersion)
        result = run_md(
            atoms, temperature_k=temperature, steps=steps, timestep_fs=timestep,
            ensemble="nve" if nve else "langevin", interval=interval, seed=seed,
            trajectory=output, progress=True,
        )  # fmt: skip
    except DeltaMLError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(
        f"{steps} steps in {result['wall_time_s']:.1f} s; mean T = "
        f"{np.mean(result['temperature_k']):.0f} K"
    )
    if "energy_drift_ev_per_atom_ps" in result:
        click.echo(f"energy drift {result['energy_drift_ev_per_atom_ps']:.2e} eV/atom/ps")
    _write_summary(result, summary)


@main.command("stability")
@click.argument("structure", type=click.Path(exists=True, dir_okay=False))
@click.option("--model", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--temperature", default=300.0, show_default=True, help="K")
@click.option("--steps", default=2000, show_default=True, help="MD steps")
@click.option("--timestep", default=0.5, show_default=True, help="fs")
@click.option("--samples", default=5, show_default=True, help="frames re-evaluated")
@click.option("--xc", default="revpbe0", show_default=True, help="reference functional")
@click.option("--basis", default="def2-tzvp", show_default=True, help="reference basis")
@click.option("--no-reference", is_flag=True, help="only detect unphysical events")
@click.option("--seed", default=0, show_default=True)
@_summary_option
def stability_command(
    structure: str, model: str, temperature: float, steps: int, timestep: float, samples: int,
    xc: str, basis: str, no_reference: bool, seed: int, summary: str | None,
) -> None:  # fmt: skip
    """Is the model fit for MD? Unphysical events, and errors vs the reference over time."""
    atoms = read(structure)
    try:
        calc = DeltaCalculator.from_model(model)
        baseline = DeltaCalculator(
            correction=ZeroCorrection(), dispersion=calc.parameters.dispersion
        )
        reference = None if no_reference else PySCFReference(xc=xc, basis=basis)
        report = md_stability(
            atoms, calc, temperature_k=temperature, steps=steps, timestep_fs=timestep,
            seed=seed, reference=reference, baseline=baseline, samples=samples, progress=True,
        )  # fmt: skip
    except DeltaMLError as exc:
        raise click.ClickException(str(exc)) from exc
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
@click.option("--iterations", default=5, show_default=True)
@click.option("--budget", type=int, default=None, help="stop at this many labels")
@click.option("--target-uncertainty", type=float, default=None, help="eV/Å")
@click.option("--batch", default=5, show_default=True, help="labels per iteration")
@click.option("--selection", default="variance_reduction", show_default=True,
              type=click.Choice(["uncertainty", "variance_reduction", "random"]),
              help="how a batch is chosen (deltaml.active.select_batch)")  # fmt: skip
@click.option("--temperature", "temperatures", multiple=True, type=float, default=(300.0,))
@click.option("--md-steps", default=400, show_default=True)
@click.option("--xc", default="revpbe0", show_default=True)
@click.option("--basis", default="def2-tzvp", show_default=True)
@click.option("--workers", default=1, show_default=True)
@click.option("--seed", default=0, show_default=True)
def active_learn_command(
    store_url: str, start: str, workdir: str, validation: str | None, iterations: int,
    budget: int | None, target_uncertainty: float | None, batch: int, selection: str,
    temperatures: tuple[float, ...], md_steps: int, xc: str, basis: str, workers: int, seed: int,
) -> None:  # fmt: skip
    """Grow the store where the composite is uncertain (resumes from --workdir)."""
    try:
        learner = ActiveLearner(
            workdir, LabelStore(store_url), _read_all(start),
            reference={"xc": xc, "basis": basis},
            validation=read_labelled(validation) if validation else None,
            temperatures=temperatures, md_steps=md_steps, batch=batch,
            pool=max(4 * batch, 20), selection=selection, seed=seed, workers=workers,
        )  # fmt: skip
        history = learner.run(
            iterations=iterations, budget=budget, target_uncertainty=target_uncertainty,
            progress=True,
        )  # fmt: skip
    except DeltaMLError as exc:
        raise click.ClickException(str(exc)) from exc
    for record in history:
        line = f"iteration {record['iteration']}: {record.get('n_labels')} labels"
        if "validation" in record:
            line += f", validation force MAE {record['validation']['force_mae']:.4f} eV/Å"
        if record.get("candidate_uncertainty_median") is not None:
            line += f", median candidate σ_F {record['candidate_uncertainty_median']:.3f} eV/Å"
        click.echo(line)
    click.echo(f"history: {learner.history_path}")


def _gas_molecule(spec: str):
    """A gas-phase molecule from a file, or by name from ASE's G2 collection (e.g. H2O)."""
    if Path(spec).is_file():
        return read(spec)
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
@_dispersion_option
@click.option("--no-baseline", is_flag=True, help="skip the ranking by the baseline alone")
@click.option("--no-relax", is_flag=True, help="single points on the given geometries")
@click.option("--fmax", default=0.01, show_default=True, help="force threshold, eV/Å")
@click.option("--steps", default=300, show_default=True, help="most optimizer steps")
@click.option("--stress-tol", default=0.05, show_default=True, help="cell threshold, GPa")
@click.option("--symmetry", is_flag=True, help="keep each candidate's space group")
@click.option("--workdir", default="ranking", show_default=True, help="relaxed structures (resume)")
@click.option("--reference", default=None, type=click.Path(exists=True, dir_okay=False),
              help="CSV: candidate,energy_kj_mol")  # fmt: skip
@click.option("--plot", default=None, type=click.Path(dir_okay=False), help="energy ladder PNG")
@click.option("--seed", default=0, show_default=True, help="proton disorder of ice:NAME")
@click.option("-o", "--output", default="ranking.csv", show_default=True, help="CSV table")
@_summary_option
def rank_command(
    candidates: tuple[str, ...], molecules: tuple[str, ...], model: str | None, dispersion: str,
    no_baseline: bool, no_relax: bool, fmax: float, steps: int, stress_tol: float,
    symmetry: bool, workdir: str,
    reference: str | None, plot: str | None, seed: int, output: str, summary: str | None,
) -> None:  # fmt: skip
    """Rank CANDIDATES (crystal files or ice:NAME) by lattice energy per formula unit.

    Relaxes every candidate (positions and cell) and the gas-phase molecule(s)
    with the composite and, unless --no-baseline, with the GFN-xTB baseline alone
    (its own dispersion kept); relaxed structures in --workdir are not relaxed again.
    """

    def composite() -> DeltaCalculator:
        calc = _composite(model, dispersion)
        if getattr(calc.correction, "uncertainty", None) == "forces":
            calc.correction.uncertainty = "energy"  # the ranking needs energies only
        return calc

    methods = {"composite": composite}
    if not no_baseline:
        base = composite().parameters["method"]
        methods[base] = lambda: XTBBaseline(method=base)
    try:
        ranking = rank_polymorphs(
            read_candidates(candidates, seed=seed), [_gas_molecule(m) for m in molecules],
            methods, workdir=workdir, relax_structures=not no_relax, fmax=fmax, steps=steps,
            symmetry=symmetry, stress_tol_gpa=stress_tol, progress=True,
        )  # fmt: skip
        result = {"table": str(ranking.to_csv(output))}
        if plot is not None:
            result["plot"] = str(ranking.plot(plot))
        if reference is not None:
            result["reference"] = {m: ranking.compare(reference, m) for m in ranking.methods}
    except DeltaMLError as exc:
        raise click.ClickException(str(exc)) from exc
    table = ranking.table()
    shown = [c for c in table.columns if c.startswith(("Z", "rel_", "sigma_rel_", "rank_"))]
    click.echo(table[shown].to_string(float_format=lambda v: f"{v:.2f}"))
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
    _write_summary(result, summary)


if __name__ == "__main__":  # pragma: no cover
    main()
