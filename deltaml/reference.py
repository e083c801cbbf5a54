"""Embedded reference method: an ASE calculator over PySCF, for molecules.

The Δ-model learns ``reference − dispersion-free baseline − D3``. The default
reference is therefore a dispersion-free hybrid functional with published D3(BJ)
parameters, revPBE0 (good for water and organic molecules; its D3 partner is
``"d3bj:revpbe0"``), with density fitting. Restricted or unrestricted Kohn–Sham
(chosen from the multiplicity unless given), Hartree–Fock, and density-fitted
MP2 (energies only) sit behind the same interface.

Periodic references are computed by :mod:`deltaml.reference_cp2k` (CP2K), or
imported as labelled data.

Data flow: structures → **reference** → labelled data (store).
"""

from __future__ import annotations

import warnings
from importlib.metadata import version
from typing import Any

from ase import Atoms
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.units import Bohr, Hartree

from deltaml.errors import (
    EngineError,
    ParameterError,
    SCFConvergenceError,
    UnsupportedCapabilityError,
    UnsupportedElementError,
)
from deltaml.structures import (
    DEFAULT_MIN_DISTANCE,
    resolve_charge,
    resolve_multiplicity,
    validate_structure,
)

__all__ = ["REFERENCE_METHODS", "PySCFReference"]

#: Methods and what they can give.
REFERENCE_METHODS = {
    "dft": ("energy", "forces"),
    "hf": ("energy", "forces"),
    "mp2": ("energy",),  # density-fitted MP2 on a density-fitted HF reference
}


def _check_reference_parameters(values: dict[str, Any]) -> None:
    """Refuse unknown methods, functionals and basis sets before they are stored."""
    from pyscf import gto
    from pyscf.dft import libxc

    if "method" in values and values["method"] not in REFERENCE_METHODS:
        raise ParameterError(
            f"unknown reference method {values['method']!r}; choose one of "
            f"{sorted(REFERENCE_METHODS)}"
        )
    if values.get("xc") is not None:
        try:
            libxc.parse_xc(values["xc"])
        except KeyError as exc:
            raise ParameterError(
                f"unknown exchange-correlation functional {values['xc']!r} (libxc via PySCF)"
            ) from exc
    if "basis" in values:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # PySCF's advert for BSE
                gto.basis.load(values["basis"], "H")
        except (gto.basis.BasisNotFoundError, KeyError, RuntimeError) as exc:
            raise ParameterError(f"unknown basis set {values['basis']!r} in PySCF") from exc
    if "unrestricted" in values and values["unrestricted"] not in (None, True, False):
        raise ParameterError(
            f"unrestricted must be None (from the multiplicity), True or False, "
            f"got {values['unrestricted']!r}"
        )
    for key in ("conv_tol", "max_cycle"):
        if key in values and not values[key] > 0:
            raise ParameterError(f"{key} must be positive, got {values[key]}")


class PySCFReference(Calculator):
    r"""Kohn–Sham DFT, Hartree–Fock or DF-MP2 reference for molecules through PySCF.

    ============= ============ ===== ===============================================
     Keyword       Default      Unit  Description
    ============= ============ ===== ===============================================
     method        "dft"        -     dft, hf or mp2 (mp2: energy only)
     xc            "revpbe0"    -     functional (libxc name); D3 partner d3bj:revpbe0
     basis         "def2-tzvp"  -     orbital basis set (PySCF name)
     density_fit   True         -     density fitting (RI-J/K, PySCF default aux basis)
     grid_level    3            -     DFT integration grid level (0-9)
     conv_tol      1e-09        Eh    SCF energy convergence threshold
     max_cycle     100          -     maximum SCF iterations
     charge        None         e     total charge; None: sum of initial charges
     multiplicity  None         -     2S+1; None: from initial magnetic moments
     unrestricted  None         -     None: unrestricted when multiplicity > 1
     min_distance  0.5          Å     closest allowed interatomic distance
    ============= ============ ===== ===============================================

    Results: ``energy``/``free_energy`` (eV) and ``forces`` (eV/Å, analytic; not
    for MP2). SCF non-convergence raises :class:`~deltaml.errors.SCFConvergenceError`
    with the iteration count; a number is never returned from an unconverged SCF.

    Examples
    --------
    >>> from ase.build import molecule
    >>> atoms = molecule("H2O")
    >>> atoms.calc = PySCFReference(basis="def2-svp")
    >>> energy = atoms.get_potential_energy()  # eV
    """

    implemented_properties = ["energy", "free_energy", "forces"]

    default_parameters: dict[str, Any] = {
        "method": "dft",
        "xc": "revpbe0",
        "basis": "def2-tzvp",
        "density_fit": True,
        "grid_level": 3,
        "conv_tol": 1e-9,
        "max_cycle": 100,
        "charge": None,
        "multiplicity": None,
        "unrestricted": None,
        "min_distance": DEFAULT_MIN_DISTANCE,
    }

    def set(self, **kwargs: Any) -> dict:
        """Set parameters, refusing unknown methods, functionals and basis sets at once."""
        if "method" in kwargs:
            kwargs["method"] = str(kwargs["method"]).lower()
        _check_reference_parameters(kwargs)
        changed = Calculator.set(self, **kwargs)
        if changed:
            self.reset()
        return changed

    def record(self) -> dict[str, Any]:
        """Method record by value (JSON-serialisable): code, version and settings."""
        p = self.parameters
        return {
            "term": "reference",
            "code": "pyscf",
            "engine_version": version("pyscf"),
            "method": p.method,
            "xc": p.xc if p.method == "dft" else None,
            "basis": str(p.basis).lower(),
            "density_fit": bool(p.density_fit),
            "grid_level": int(p.grid_level) if p.method == "dft" else None,
            "conv_tol_eh": float(p.conv_tol),
            "unrestricted": p.unrestricted,
            "dispersion_partner": f"d3bj:{p.xc}" if p.method == "dft" else None,
        }

    def calculate(
        self,
        atoms: Atoms | None = None,
        properties: list[str] | None = None,
        system_changes: list[str] = all_changes,
    ) -> None:
        """Run the SCF (and MP2) and fill ``energy`` and, when asked, ``forces``."""
        properties = properties or ["energy"]
        Calculator.calculate(self, atoms, properties, system_changes)
        atoms, p = self.atoms, self.parameters
        if atoms.pbc.any():
            raise UnsupportedCapabilityError(
                "PySCFReference computes molecules only; import periodic reference labels "
                "(energy, forces, stress) as extxyz instead"
            )
        for prop in properties:
            if prop not in REFERENCE_METHODS[p.method] + ("free_energy",):
                raise PropertyNotImplementedError(f"{p.method} reference gives no {prop}")
        charge = resolve_charge(atoms, p.charge)
        multiplicity = resolve_multiplicity(atoms, charge, p.multiplicity)
        validate_structure(
            atoms,
            min_distance=p.min_distance,
            charge=charge,
            multiplicity=multiplicity,
        )
        mol = self._molecule(atoms, charge, multiplicity)
        mf = self._mean_field(mol, multiplicity)
        energy = mf.kernel()
        if not mf.converged:
            raise SCFConvergenceError(
                f"pyscf: {p.method.upper()} SCF not converged in {p.max_cycle} cycles "
                f"(conv_tol {p.conv_tol} Eh); raise max_cycle or check the geometry"
            )
        if p.method == "mp2":
            energy = mf.MP2().run().e_tot
        self.results["energy"] = float(energy) * Hartree
        self.results["free_energy"] = self.results["energy"]
        if "forces" in properties:
            try:
                gradient = mf.nuc_grad_method().kernel()
            except Exception as exc:  # PySCF raises bare exceptions from its integrals
                raise EngineError(f"pyscf gradient: {exc}") from exc
            self.results["forces"] = -gradient * (Hartree / Bohr)

    def _molecule(self, atoms: Atoms, charge: int, multiplicity: int):
        from pyscf import gto

        p = self.parameters
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                return gto.M(
                    atom=list(
                        zip(atoms.get_chemical_symbols(), atoms.positions.tolist(), strict=True)
                    ),
                    unit="Angstrom",
                    basis=p.basis,
                    charge=charge,
                    spin=multiplicity - 1,
                    verbose=0,
                )
        except (gto.basis.BasisNotFoundError, KeyError, RuntimeError) as exc:
            raise UnsupportedElementError(
                f"basis {p.basis!r} has no functions for an element of "
                f"{atoms.get_chemical_formula()}: {exc}"
            ) from exc

    def _mean_field(self, mol, multiplicity: int):
        from pyscf import dft, scf

        p = self.parameters
        open_shell = multiplicity > 1 if p.unrestricted is None else bool(p.unrestricted)
        if p.method == "dft":
            mf = (dft.UKS if open_shell else dft.RKS)(mol, xc=p.xc)
            mf.grids.level = int(p.grid_level)
        else:
            mf = (scf.UHF if open_shell else scf.RHF)(mol)
        if p.density_fit or p.method == "mp2":
            mf = mf.density_fit()
        mf.conv_tol = float(p.conv_tol)
        mf.max_cycle = int(p.max_cycle)
        return mf
