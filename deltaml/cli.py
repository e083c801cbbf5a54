"""The ``deltaml`` console script: parsing and printing only.

Each subcommand calls one importable library function; no science lives here.
"""

from __future__ import annotations

import json
import sys

import click
from ase.io import read

from deltaml import __version__
from deltaml.calculator import DeltaCalculator, energy_budget
from deltaml.correction import ZeroCorrection
from deltaml.errors import DeltaMLError


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


if __name__ == "__main__":  # pragma: no cover
    main()
