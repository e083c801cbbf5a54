"""Simulations with any ASE calculator: relaxation, molecular dynamics, vibrations.

Thin, recorded wrappers around ASE: every run writes its trajectory as extxyz
(when asked), shows a progress bar, and returns a JSON-serialisable summary
(settings, convergence, energies, timings). The composite
(:class:`~deltaml.calculator.DeltaCalculator`) is the intended calculator; its
uncertainty keys are recorded when present.

Units: energies eV, forces eV/Å, time fs, temperature K, frequencies cm⁻¹.

Data flow: composite → **simulation** → active learning, evaluation, CLI.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import Calculator
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write

from deltaml.errors import ParameterError

__all__ = ["phonons", "relax", "run_md", "snapshot", "vibrations"]

_OPTIMIZERS = ("BFGS", "FIRE", "LBFGS", "PreconLBFGS")


#: Keys of ``info`` and ``arrays`` that hold results of some calculation: a frame
#: written here carries only those of its own geometry.
_RESULT_KEY = re.compile(
    r"^(energy|free_energy|energies|forces|stress|stresses)(_.*)?$|_uncertainty$"
    r"|^(record_.*|method_record|label_key|reference_energy|reference_forces)$"
)
#: Arrays a frame keeps from the structure it was made from.
_STRUCTURE_ARRAYS = ("numbers", "positions", "momenta", "initial_charges", "initial_magmoms")


def snapshot(atoms: Atoms) -> Atoms:
    """The frame of a trajectory: the structure and its calculator's results, nothing stale.

    Totals (energy, forces, stress) go to a single-point calculator; the
    composite's per-term results (``energy_<term>`` in eV, ``forces_<term>`` in
    eV/Å, ``stress_<term>``, the uncertainties) to ``info`` and ``arrays``.
    Result-like keys the structure carried from its input file (the labels and
    terms of another geometry) are dropped, so that no frame shows numbers that
    were not computed for it.
    """
    frame = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    for name in _STRUCTURE_ARRAYS[2:]:
        if name in atoms.arrays:
            frame.arrays[name] = atoms.arrays[name].copy()
    frame.info = {k: v for k, v in atoms.info.items() if not _RESULT_KEY.search(k)}
    results = dict(atoms.calc.results) if atoms.calc is not None else {}
    totals = {
        k: results.pop(k) for k in ("energy", "free_energy", "forces", "stress") if k in results
    }
    for key, value in results.items():
        value = np.asarray(value)
        per_atom = key.split("_")[0] in ("forces", "energies", "charges", "magmoms")
        if per_atom and value.ndim >= 1 and len(value) == len(atoms):
            frame.arrays[key] = value.copy()
        elif value.ndim == 0:
            frame.info[key] = value.item()
        else:
            frame.info[key] = value.tolist()
    frame.calc = SinglePointCalculator(frame, **totals)
    return frame


def _uncertainty(calc: Calculator) -> dict[str, float]:
    out = {}
    if "energy_uncertainty" in calc.results:
        out["energy_uncertainty_ev"] = float(calc.results["energy_uncertainty"])
    if "forces_uncertainty" in calc.results:
        out["max_force_uncertainty_ev_a"] = float(np.max(calc.results["forces_uncertainty"]))
    return out


def relax(
    atoms: Atoms,
    *,
    fmax: float = 0.01,
    steps: int = 500,
    cell: bool = False,
    optimizer: str = "BFGS",
    trajectory: str | Path | None = None,
    progress: bool = False,
    symmetry: bool = False,
    symprec: float = 1e-3,
    maxstep: float = 0.2,
    stress_tol_gpa: float | None = None,
) -> dict[str, Any]:
    """Relax positions (and the cell, for 3D-periodic structures) in place.

    Parameters
    ----------
    atoms : ase.Atoms
        Structure with a calculator attached; modified in place.
    fmax : float, default=0.01
        Convergence threshold on the largest force, eV/Å (and on the stress
        scaled by the cell filter).
    steps : int, default=500
        Most optimizer steps.
    cell : bool, default=False
        Relax the cell too (``FrechetCellFilter``). Its cell "forces" are V·σ/N
        (N atoms), so ``fmax`` allows a stress of up to fmax·N/V (0.05 eV/Å on 48
        water atoms in 520 Å³: 0.7 GPa); ``max_stress_gpa`` reports what is left.
    optimizer : str, default="BFGS"
        BFGS, FIRE, LBFGS or PreconLBFGS (ASE's, with the ``Exp`` preconditioner
        and a line search; cells relax in fewer steps, see ``_precon_lbfgs``: its
        scales cost one extra call at the start, and a line search that fails
        twice hands over to BFGS, noted as ``fallback``). With a cell, PreconLBFGS
        converges on the stress itself: below ``stress_tol_gpa`` at the final
        volume (without it, fmax·N/V as the filter's default criterion).
        PreconLBFGS is for 3D-periodic structures only.
    trajectory : path, optional
        extxyz file to write every step to (overwritten).
    progress : bool, default=False
        Show a progress bar over steps.
    symmetry : bool, default=False
        Keep the space group found at the start (``ase.constraints.FixSymmetry``,
        needs spglib); the constraint is removed again afterwards.
    symprec : float, default=1e-3
        spglib tolerance for that space group, Å.
    maxstep : float, default=0.2
        Largest step of the optimizer, Å (bounded steps).
    stress_tol_gpa : float, optional
        Convergence threshold on the stress, GPa (cell relaxations): the cell
        filter's factor is set so that ``fmax`` on its cell "forces" means this
        stress at the starting volume. Default: ASE's factor (N atoms, see ``cell``).

    Returns
    -------
    dict
        ``converged``, ``steps``, ``energy_initial_ev``, ``energy_final_ev``,
        ``max_force_ev_a``, ``volume_initial_a3``/``volume_final_a3`` and
        ``max_stress_gpa`` (cells),
        uncertainty at the end (composite), ``wall_time_s``.
    """
    import ase.optimize
    from ase.filters import FrechetCellFilter
    from tqdm.auto import tqdm

    if optimizer not in _OPTIMIZERS:
        raise ParameterError(f"optimizer must be one of {_OPTIMIZERS}, got {optimizer!r}")
    if cell and not atoms.pbc.all():
        raise ParameterError("cell relaxation needs a structure periodic in all three directions")
    if optimizer == "PreconLBFGS" and not atoms.pbc.all():
        raise ParameterError("PreconLBFGS needs a structure periodic in all three directions")
    summary: dict[str, Any] = {"optimizer": optimizer, "fmax_ev_a": fmax, "cell": cell}
    saved_constraints = atoms.constraints
    if symmetry:
        from ase.constraints import FixSymmetry

        fixed = FixSymmetry(atoms, symprec=symprec)
        atoms.set_constraint([*saved_constraints, fixed])
        summary["space_group"] = _space_group(atoms, symprec)
    if cell:
        # Ask for the stress first: a calculator that computes only what is asked
        # (the composite) then has the energy too, and the optimizer's first step
        # costs no second call.
        atoms.get_stress()
    summary["energy_initial_ev"] = float(atoms.get_potential_energy())
    if cell:
        summary["volume_initial_a3"] = float(atoms.get_volume())
    if cell and stress_tol_gpa is not None:
        if stress_tol_gpa <= 0:
            raise ParameterError(f"stress_tol_gpa must be positive, got {stress_tol_gpa}")
        # Cell "forces" are V·σ/factor: this factor makes fmax correspond to stress_tol.
        factor = stress_tol_gpa * units.GPa * atoms.get_volume() / fmax
        target = FrechetCellFilter(atoms, exp_cell_factor=factor)
        summary["stress_tol_gpa"] = stress_tol_gpa
    else:
        target = FrechetCellFilter(atoms) if cell else atoms
    run_kwargs: dict[str, Any] = {}
    start = time.perf_counter()
    if optimizer == "PreconLBFGS":
        at_rest = bool(np.linalg.norm(atoms.get_forces(), axis=1).max() < fmax)
        if cell:
            # The cell is converged on the Cauchy stress itself (eV/Å³), not on the
            # filter's scaled cell "forces": the threshold at the final volume.
            tol = stress_tol_gpa * units.GPa if stress_tol_gpa is not None else None
            run_kwargs["smax"] = tol if tol is not None else fmax * len(atoms) / atoms.get_volume()
            at_rest = at_rest and bool(np.abs(atoms.get_stress()).max() < run_kwargs["smax"])
        opt = _precon_lbfgs(target, maxstep, estimate=not at_rest)
        summary["precon_mu"] = [float(opt.precon.mu), float(opt.precon.mu_c or 0.0)]
    else:
        opt = getattr(ase.optimize, optimizer)(target, logfile=None, maxstep=maxstep)
    bar = tqdm(total=steps, disable=not progress, unit="step", desc="relax")
    if trajectory is not None:
        Path(trajectory).unlink(missing_ok=True)

    def attach(opt: Any) -> None:
        if trajectory is not None:
            opt.attach(lambda: write(trajectory, snapshot(atoms), format="extxyz", append=True))
        opt.attach(lambda: bar.update(1 if opt.nsteps else 0))  # not the initial call

    attach(opt)
    try:
        converged = bool(opt.run(fmax=fmax, steps=steps, **run_kwargs))
        taken = int(opt.nsteps)
    except RuntimeError as exc:
        if optimizer != "PreconLBFGS" or "linesearch" not in str(exc).lower():
            raise
        # Its line search failed twice in a row (no downhill direction, e.g. noise in
        # the energy near the minimum): BFGS goes on from where it stopped.
        taken = int(opt.nsteps)
        summary["fallback"] = f"BFGS from step {taken} ({exc})"
        opt = ase.optimize.BFGS(target, logfile=None, maxstep=maxstep)
        attach(opt)
        converged = bool(opt.run(fmax=fmax, steps=max(steps - taken, 0)))
        taken += int(opt.nsteps)
    bar.close()
    summary.update(
        converged=converged,
        steps=taken,
        energy_final_ev=float(atoms.get_potential_energy()),
        max_force_ev_a=float(np.linalg.norm(atoms.get_forces(), axis=1).max()),
        wall_time_s=time.perf_counter() - start,
        **_uncertainty(atoms.calc),
    )
    if cell:
        summary["volume_final_a3"] = float(atoms.get_volume())
        # FrechetCellFilter compares V·σ/N with fmax: the stress left can be sizeable.
        summary["max_stress_gpa"] = float(np.abs(atoms.get_stress()).max() / units.GPa)
    if symmetry:
        atoms.set_constraint(saved_constraints)
        summary["space_group_final"] = _space_group(atoms, symprec)
    return summary


def _precon_lbfgs(target: Any, maxstep: float, estimate: bool = True) -> Any:
    """ASE's ``PreconLBFGS`` with the ``Exp`` preconditioner, its scales measured here.

    The preconditioner is a sparse "Laplacian" of the bonds (stiff intramolecular
    pairs, soft contacts between molecules) scaled by μ for positions and μ_c for
    the cell. ASE estimates both from one extra force call, but its estimate
    (ASE 3.29) copies a ``FrechetCellFilter`` wrongly (a singular or absurdly
    stiff cell). The same estimate is made here on the filter itself: one extra
    call at a perturbed geometry (sine wave of 0.01 r_NN on the atoms, 0.5 %
    log-strain on the cell), after which the calculator's results at the start
    are put back, so the optimizer's first step costs no further call. Without
    ``estimate`` (a structure already converged) both scales are 1 and no call is made.
    """
    from ase.filters import Filter, FrechetCellFilter
    from ase.optimize.precon import Exp, PreconLBFGS
    from ase.optimize.precon.neighbors import estimate_nearest_neighbour_distance

    class _OneCallPreconLBFGS(PreconLBFGS):
        """The line search asks for energy, forces and stress together: a calculator
        that computes only what is asked (the composite) then needs one call per
        accepted step, not one for the energy and another for the forces."""

        def func(self, x: np.ndarray) -> float:
            self._actual_atoms.set_positions(x.reshape(-1, 3))
            self._actual_atoms.get_forces()
            return self._actual_atoms.get_potential_energy()

    is_filter = isinstance(target, Filter)
    real = target.atoms if is_filter else target
    if not estimate:
        precon = Exp(A=3.0, mu=1.0, mu_c=1.0)
        return _OneCallPreconLBFGS(
            target, precon=precon, logfile=None, maxstep=maxstep, use_armijo=True
        )
    precon = Exp(A=3.0)
    r_nn = float(estimate_nearest_neighbour_distance(real))
    precon.r_NN, precon.r_cut = r_nn, 2.0 * r_nn
    n = len(real)
    start = target.get_positions()
    gradient = -np.asarray(target.get_forces()).reshape(-1)
    calc = real.calc
    saved = (calc.atoms.copy(), dict(calc.results)) if hasattr(calc, "results") else None
    span = np.ptp(real.positions, axis=0)
    shift = np.zeros_like(start)
    shift[:n] = 1e-2 * r_nn * np.sin(real.positions / np.where(span > 0, span, 1.0))
    probe = real.copy()
    probe.calc = calc
    if is_filter:
        if not isinstance(target, FrechetCellFilter):
            raise ParameterError("PreconLBFGS relaxes cells through FrechetCellFilter only")
        shift[n:] = 5e-3 * target.exp_cell_factor * np.eye(3)
        probe = FrechetCellFilter(probe, exp_cell_factor=target.exp_cell_factor)
    probe.set_positions(start + shift)
    moved = -np.asarray(probe.get_forces()).reshape(-1)
    if saved is not None:
        calc.atoms, calc.results = saved
    v = shift.reshape(-1)
    precon.mu, precon.mu_c = 1.0, 1.0
    precon._make_sparse_precon(target, initial_assembly=True)
    lhs, rhs = (moved - gradient) * v, precon.P.dot(v) * v

    def scale(part: slice) -> float:
        # ASE's floor of 1 eV/Å² (a too small μ means too long steps).
        den = float(rhs[part].sum())
        ratio = float(lhs[part].sum()) / den if den > 0 else 1.0
        return max(ratio, 1.0) if np.isfinite(ratio) else 1.0

    precon.mu = scale(slice(0, 3 * n))
    if is_filter:
        precon.mu_c = scale(slice(3 * n, None))
    precon.P = None  # assembled again with these scales at the first step
    return _OneCallPreconLBFGS(
        target, precon=precon, logfile=None, maxstep=maxstep, use_armijo=True
    )


def _space_group(atoms: Atoms, symprec: float) -> str:
    """International symbol and number of the space group (spglib), e.g. ``Pa-3 (205)``."""
    import spglib

    cell = (atoms.cell.array, atoms.get_scaled_positions(), atoms.numbers)
    return str(spglib.get_spacegroup(cell, symprec=symprec))


def run_md(
    atoms: Atoms,
    *,
    temperature_k: float,
    steps: int,
    timestep_fs: float = 0.5,
    ensemble: str = "langevin",
    friction_per_fs: float = 0.01,
    seed: int = 0,
    interval: int = 10,
    trajectory: str | Path | None = None,
    progress: bool = False,
    observer: Any = None,
) -> dict[str, Any]:
    """Molecular dynamics in place: Langevin (NVT) or velocity Verlet (NVE).

    Parameters
    ----------
    atoms : ase.Atoms
        Structure with a calculator; momenta are drawn from Maxwell–Boltzmann at
        ``temperature_k`` with ``seed`` (centre-of-mass motion and, for
        molecules, rotation removed).
    temperature_k : float
        Initial (and, for Langevin, bath) temperature, K.
    steps : int
        Number of MD steps.
    timestep_fs : float, default=0.5
        Time step, fs.
    ensemble : {"langevin", "nve"}
        Thermostat or none.
    friction_per_fs : float, default=0.01
        Langevin friction, 1/fs.
    seed : int, default=0
        Seed of the initial velocities and of the Langevin noise.
    interval : int, default=10
        Steps between recorded frames (trajectory, energies).
    trajectory : path, optional
        extxyz file for the recorded frames (overwritten).
    progress : bool, default=False
        Progress bar over steps.
    observer : callable, optional
        Called as ``observer(step, atoms)`` at every recorded frame; it may
        raise to stop the run (the exception propagates).

    Returns
    -------
    dict
        Settings, ``time_fs``, ``potential_ev``, ``kinetic_ev``, ``temperature_k``
        and ``max_force_uncertainty_ev_a`` (where available) at recorded frames,
        ``energy_drift_ev_per_atom_ps`` (NVE), ``wall_time_s``.
    """
    from ase.constraints import FixCom
    from ase.md import velocitydistribution as velocities
    from ase.md.langevin import Langevin
    from ase.md.verlet import VelocityVerlet
    from tqdm.auto import tqdm

    if ensemble not in ("langevin", "nve"):
        raise ParameterError(f"ensemble must be 'langevin' or 'nve', got {ensemble!r}")
    if steps < 1 or interval < 1 or not timestep_fs > 0:
        raise ParameterError("steps and interval must be >= 1 and timestep_fs positive")
    rng = np.random.default_rng(seed)
    # thermalize_momenta is the name from ASE 3.29 on; the same draw as before.
    thermalize = getattr(velocities, "thermalize_momenta", None)
    if thermalize is None:
        velocities.MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_k, rng=rng)
    else:
        thermalize(atoms, temperature_k, rng=rng)
    velocities.Stationary(atoms)
    if not atoms.pbc.any():
        velocities.ZeroRotation(atoms)
        atoms.set_constraint(FixCom())
    if ensemble == "langevin":
        dyn = Langevin(
            atoms,
            timestep_fs * units.fs,
            temperature_K=temperature_k,
            friction=friction_per_fs / units.fs,
            fixcm=False,
            rng=rng,
        )
    else:
        dyn = VelocityVerlet(atoms, timestep_fs * units.fs)
    record: dict[str, list[float]] = {
        k: [] for k in ("time_fs", "potential_ev", "kinetic_ev", "temperature_k")
    }
    record["max_force_uncertainty_ev_a"] = []
    if trajectory is not None:
        Path(trajectory).unlink(missing_ok=True)

    def sample() -> None:
        record["time_fs"].append(dyn.nsteps * timestep_fs)
        record["potential_ev"].append(float(atoms.get_potential_energy()))
        record["kinetic_ev"].append(float(atoms.get_kinetic_energy()))
        record["temperature_k"].append(float(atoms.get_temperature()))
        sigma = _uncertainty(atoms.calc).get("max_force_uncertainty_ev_a")
        if sigma is not None:
            record["max_force_uncertainty_ev_a"].append(sigma)
        if trajectory is not None:
            write(trajectory, snapshot(atoms), format="extxyz", append=True)
        if observer is not None:
            observer(dyn.nsteps, atoms)

    bar = tqdm(total=steps, disable=not progress, unit="step", desc=f"MD {temperature_k:g} K")
    dyn.attach(sample, interval=interval)
    dyn.attach(lambda: bar.update(1 if dyn.nsteps else 0), interval=1)  # not step 0
    start = time.perf_counter()
    try:
        dyn.run(steps)
    finally:
        bar.close()
    summary: dict[str, Any] = {
        "ensemble": ensemble,
        "temperature_k_target": temperature_k,
        "timestep_fs": timestep_fs,
        "steps": steps,
        "seed": seed,
        **record,
        "wall_time_s": time.perf_counter() - start,
    }
    if ensemble == "nve" and len(record["time_fs"]) > 1:
        total = np.add(record["potential_ev"], record["kinetic_ev"]) / len(atoms)
        slope = np.polyfit(np.array(record["time_fs"]) / 1000.0, total, 1)[0]
        summary["energy_drift_ev_per_atom_ps"] = float(slope)
    return summary


def vibrations(
    atoms: Atoms, *, displacement: float = 0.01, workdir: str | Path | None = None
) -> dict[str, Any]:
    """Harmonic vibrational frequencies of a molecule by finite differences (ASE).

    Parameters
    ----------
    atoms : ase.Atoms
        Relaxed molecule with a calculator (non-periodic).
    displacement : float, default=0.01
        Finite-difference displacement, Å.
    workdir : path, optional
        Folder for ASE's displacement cache (a temporary folder by default).

    Returns
    -------
    dict
        ``frequencies_cm1`` (real, ascending; imaginary modes as negative numbers),
        ``zero_point_energy_ev``.
    """
    import tempfile

    from ase.vibrations import Vibrations

    if atoms.pbc.any():
        raise ParameterError("vibrations() is for molecules; use ase.phonons.Phonons for crystals")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(workdir) if workdir is not None else Path(tmp)
        vib = Vibrations(atoms, delta=displacement, name=str(folder / "vib"))
        vib.run()
        energies = vib.get_energies()
        vib.clean()
    frequencies = (
        np.where(
            np.abs(energies.imag) > np.abs(energies.real), -np.abs(energies.imag), energies.real
        )
        / units.invcm
    )
    return {
        "frequencies_cm1": sorted(float(f) for f in frequencies),
        "zero_point_energy_ev": float(0.5 * np.sum(energies.real[energies.real > 0])),
        "displacement_a": displacement,
    }


def phonons(
    atoms: Atoms,
    *,
    supercell: tuple[int, int, int] = (2, 2, 2),
    displacement: float = 0.01,
    kpoints: Any = None,
    workdir: str | Path | None = None,
) -> dict[str, Any]:
    """Harmonic phonon frequencies of a crystal by finite displacements (``ase.phonons``).

    Parameters
    ----------
    atoms : ase.Atoms
        Relaxed, 3D-periodic structure with a calculator attached.
    supercell : (int, int, int), default=(2, 2, 2)
        Repetitions for the force constants; they must reach beyond the range of
        the interactions.
    displacement : float, default=0.01
        Finite-difference displacement, Å.
    kpoints : array-like of shape (n, 3), optional
        Scaled wave vectors; default Γ only.
    workdir : path, optional
        Folder for ASE's displacement cache (a temporary folder by default).

    Returns
    -------
    dict
        ``kpoints`` and ``frequencies_cm1`` (one ascending list per k-point;
        imaginary modes as negative numbers), with the acoustic sum rule imposed.
    """
    import tempfile

    from ase.phonons import Phonons

    if not atoms.pbc.all():
        raise ParameterError("phonons() needs a 3D-periodic structure; use vibrations()")
    kpoints = np.zeros((1, 3)) if kpoints is None else np.atleast_2d(kpoints)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(workdir) if workdir is not None else Path(tmp)
        ph = Phonons(atoms, atoms.calc, supercell=tuple(supercell), delta=displacement,
                     name=str(folder / "phonon"))  # fmt: skip
        ph.run()
        ph.read(acoustic=True)
        energies = ph.band_structure(kpoints, modes=False, born=False, verbose=False)
        ph.clean()
    energies = np.asarray(energies)
    frequencies = np.where(np.abs(energies.imag) > np.abs(energies.real),
                           -np.abs(energies.imag), energies.real) / units.invcm  # fmt: skip
    return {
        "kpoints": kpoints.tolist(),
        "frequencies_cm1": [sorted(float(f) for f in row) for row in frequencies],
        "supercell": list(supercell),
        "displacement_a": displacement,
    }
