"""The molecular decomposition of the Δ-model: intramolecular + intermolecular parts.

Targets are cheap and physical, Δ = GFN1-xTB − GFN2-xTB, on rattled monomers and on
rigid-monomer scans of hydrogen-bonded dimers whose monomers are labelled at the
same geometry (so that the training set holds exact interaction energies).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule

from deltaml.calculator import DeltaCalculator
from deltaml.correction import ZeroCorrection
from deltaml.crystals import whole_molecules
from deltaml.dataset import interaction_groups
from deltaml.errors import ModelFileError, ParameterError, TopologyChangedError, TopologyError
from deltaml.model import SparseGPR
from deltaml.model_files import write_model_file
from deltaml.prior_width import interaction_folds

DESCRIPTOR = {"cutoff": 4.0, "n_max": 4, "l_max": 3}
CUTOFF = DESCRIPTOR["cutoff"]
#: Terms record the test models claim (the targets are a stand-in; only the record matters).
TERMS = DeltaCalculator(correction=ZeroCorrection(), dispersion=None).terms_record()


def _hydrogen_bonded(donor: str, acceptor: str, distance: float, seed: int) -> Atoms:
    """A donor O–H pointing at the acceptor's O, H···O = ``distance`` (Å), a little rattled."""
    rng = np.random.default_rng(seed)
    a, b = molecule(donor), molecule(acceptor)
    for mol in (a, b):
        mol.positions += rng.normal(scale=0.02, size=mol.positions.shape)
    o_a = int(np.flatnonzero(a.numbers == 8)[0])
    h_a = int(np.argmin(np.where(a.numbers == 1, a.get_distances(o_a, range(len(a))), 9.0)))
    axis = a.positions[h_a] - a.positions[o_a]
    axis /= np.linalg.norm(axis)
    o_b = int(np.flatnonzero(b.numbers == 8)[0])
    b.positions += a.positions[h_a] + distance * axis - b.positions[o_b]
    for _ in range(100):  # random orientations until no other contact is short
        turned = b.copy()
        turned.rotate(float(rng.uniform(0, 360)), rng.normal(size=3), center=b.positions[o_b])
        contacts = np.linalg.norm(a.positions[:, None] - turned.positions[None], axis=-1)
        contacts[h_a, o_b] = np.inf
        if contacts.min() > distance + 0.3:
            break
    dimer = a + turned
    dimer.info["n_first"] = len(a)
    return dimer


def _scan(dimer: Atoms, factors: tuple[float, ...]) -> list[Atoms]:
    """Rigid-monomer scan along the centre-of-mass axis."""
    n = dimer.info["n_first"]
    axis = dimer[n:].get_center_of_mass() - dimer[:n].get_center_of_mass()
    frames = []
    for factor in factors:
        moved = dimer.copy()
        moved.positions[n:] += (factor - 1.0) * axis
        frames.append(moved)
    return frames


def _monomers(dimer: Atoms) -> list[Atoms]:
    n = dimer.info["n_first"]
    return [dimer[:n], dimer[n:]]


@pytest.fixture(scope="module")
def data(gfn_delta) -> dict[str, list[Atoms]]:
    rng = np.random.default_rng(3)
    monomers = []
    for k in range(12):
        atoms = molecule(("H2O", "CH3OH", "CH3CH2OH")[k % 3])
        atoms.positions += rng.normal(scale=0.04, size=atoms.positions.shape)
        monomers.append(atoms)
    complexes, parts = [], []
    for seed, (donor, acceptor) in enumerate(
        [("H2O", "H2O"), ("CH3OH", "H2O"), ("H2O", "CH3OH"), ("CH3OH", "CH3OH")]
    ):
        dimer = _hydrogen_bonded(donor, acceptor, 1.95, seed)
        complexes += _scan(dimer, (0.95, 1.0, 1.15, 1.4))
        parts += _monomers(dimer)
    held_out = _hydrogen_bonded("CH3OH", "H2O", 2.0, seed=11)
    return {
        "monomers": gfn_delta(monomers),
        "interactions": gfn_delta(complexes + parts),
        "held_out": [held_out],
    }


@pytest.fixture(scope="module")
def model(data) -> SparseGPR:
    frames = data["monomers"] + data["interactions"]
    return SparseGPR(descriptor=DESCRIPTOR, n_sparse=60, inter_n_sparse=40).fit(
        frames, trained_with=TERMS
    )


@pytest.fixture(scope="module")
def local_model(data) -> SparseGPR:
    """The same with the local intermolecular kernel (decorrelates unlike contacts)."""
    frames = data["monomers"] + data["interactions"]
    return SparseGPR(
        descriptor=DESCRIPTOR,
        n_sparse=60,
        inter_n_sparse=40,
        inter_kernel="local",
        inter_zeta=3,
        inter_linear=0.4,
    ).fit(frames, trained_with=TERMS)


@pytest.fixture(scope="module")
def monomer_model(data) -> SparseGPR:
    """A molecular model fitted on single molecules only: its inter part has no data."""
    return SparseGPR(descriptor=DESCRIPTOR, n_sparse=60).fit(data["monomers"])


def _parts(model: SparseGPR, atoms: Atoms) -> dict[str, float]:
    return model.predict(atoms, forces=False).parts


def test_the_training_set_holds_exact_interaction_energies(model, data):
    frames = data["monomers"] + data["interactions"]
    found = interaction_groups(frames)
    assert len(found) == 16  # every complex of every scan, not the monomers
    assert all(len(parts) == 2 and index not in parts for index, parts in found)
    assert model.n_interactions_ == 16
    assert model.terms_[1].name == "inter" and model.terms_[1].size > 0


def test_an_interaction_energy_gets_nothing_from_the_intramolecular_part(model, data):
    dimer = data["held_out"][0]
    whole, first, second = (_parts(model, a) for a in [dimer, *_monomers(dimer)])
    assert whole["intra"] == pytest.approx(first["intra"] + second["intra"], abs=1e-12)
    assert whole["offsets"] == pytest.approx(first["offsets"] + second["offsets"], abs=1e-12)
    assert first["inter"] == 0.0 and second["inter"] == 0.0
    interaction = model.predict(dimer, forces=False).energy - sum(
        model.predict(m, forces=False).energy for m in _monomers(dimer)
    )
    assert interaction == pytest.approx(whole["inter"], abs=1e-12)
    assert abs(whole["inter"]) > 1e-5  # a hydrogen bond is corrected by something


def _closest_contact(dimer: Atoms) -> float:
    n = dimer.info["n_first"]
    return float(
        np.min(np.linalg.norm(dimer.positions[:n, None] - dimer.positions[None, n:], axis=-1))
    )


def _at_contact(dimer: Atoms, contact: float) -> Atoms:
    """The dimer with monomer B moved rigidly along the CoM axis to a closest contact (Å)."""
    n = dimer.info["n_first"]
    axis = dimer[n:].get_center_of_mass() - dimer[:n].get_center_of_mass()
    axis /= np.linalg.norm(axis)
    low, high = 0.0, 2 * contact
    for _ in range(80):  # bisection on the shift
        mid = 0.5 * (low + high)
        moved = dimer.copy()
        moved.positions[n:] += mid * axis
        low, high = (mid, high) if _closest_contact(moved) < contact else (low, mid)
    moved = dimer.copy()
    moved.positions[n:] += high * axis
    return moved


@pytest.mark.parametrize("name", ["model", "local_model"])
def test_the_intermolecular_part_vanishes_smoothly_at_the_cutoff(name, data, request):
    model = request.getfixturevalue(name)
    dimer = data["held_out"][0]
    monomers = _monomers(dimer)
    alone = [model.predict(m) for m in monomers]

    def interaction(contact: float) -> tuple[float, np.ndarray]:
        moved = _at_contact(dimer, contact)
        result = model.predict(moved)
        n = dimer.info["n_first"]
        moved_b = moved[n:]
        energy = result.energy - alone[0].energy - model.predict(moved_b, forces=False).energy
        forces = result.forces - np.vstack([alone[0].forces, model.predict(moved_b).forces])
        return energy, forces

    beyond_energy, beyond_forces = interaction(CUTOFF + 0.01)
    assert model.predict(_at_contact(dimer, CUTOFF + 0.01), forces=False).parts["inter"] == 0.0
    assert beyond_energy == pytest.approx(0.0, abs=1e-11)  # round-off of the other parts
    assert np.abs(beyond_forces).max() < 1e-11
    # Inside the smooth cut-off the interaction goes to zero like ε² and its force like ε.
    e1, f1 = interaction(CUTOFF - 0.02)
    e2, f2 = interaction(CUTOFF - 0.01)
    assert 0 < abs(e2) < abs(e1)
    assert abs(e2 / e1) == pytest.approx(0.25, rel=0.1)
    assert np.abs(f2).max() / np.abs(f1).max() == pytest.approx(0.5, rel=0.1)


def _finite_difference_forces(model: SparseGPR, atoms: Atoms, h: float = 1e-4) -> np.ndarray:
    forces = np.zeros((len(atoms), 3))
    for i in range(len(atoms)):
        for a in range(3):
            energies = []
            for sign in (1, -1):
                probe = atoms.copy()
                probe.positions[i, a] += sign * h
                energies.append(model.predict(probe, forces=False).energy)
            forces[i, a] = -(energies[0] - energies[1]) / (2 * h)
    return forces


@pytest.mark.parametrize("name", ["model", "local_model"])
def test_forces_of_a_dimer_are_minus_the_gradient(name, data, request):
    model = request.getfixturevalue(name)
    dimer = data["held_out"][0]
    result = model.predict(dimer)
    assert abs(result.parts["inter"]) > 1e-6
    np.testing.assert_allclose(result.forces, _finite_difference_forces(model, dimer), atol=2e-7)


@pytest.mark.parametrize("name", ["model", "local_model"])
def test_the_force_uncertainty_is_that_of_the_gradient(name, data, request):
    """σ_F of an atom = RMS over x, y, z of the finite-difference σ of −dE/dr from the
    energies' posterior covariance at ±h (both parts; the offsets cancel)."""
    model = request.getfixturevalue(name)
    dimer = data["held_out"][0]
    sigma = model.predict(dimer).forces_uncertainty
    h = 1e-3
    for i in (0, len(dimer) - 1):
        variances = []
        for a in range(3):
            pair = [dimer.copy(), dimer.copy()]
            pair[0].positions[i, a] += h
            pair[1].positions[i, a] -= h
            c = model.energy_covariance(pair)
            variances.append((c[0, 0] + c[1, 1] - 2 * c[0, 1]) / (2 * h) ** 2)
        assert sigma[i] == pytest.approx(np.sqrt(np.mean(variances)), rel=2e-3)


@pytest.mark.parametrize("linear", [0.0, 0.4])
def test_the_local_kernel_decorrelates_contacts_of_other_directions(linear):
    """k(x, y) = (x·y)(w + (1 − w) exp(ζ(x̂·ŷ − 1))): the linear kernel along one
    direction, less across directions, |x|² on the diagonal, zero with a zero row;
    dk/dx exact."""
    from deltaml.kernels import local_kernel

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(4, 6)), rng.normal(size=(3, 6))
    k, a, b = local_kernel(x, y, 2.0, linear)
    assert np.all(np.abs(k) <= np.abs(x @ y.T) + 1e-12)
    np.testing.assert_allclose(np.diag(local_kernel(x, x, 2.0, linear)[0]), np.sum(x**2, axis=1))
    np.testing.assert_allclose(
        local_kernel(x, 3 * x, 2.0, linear)[0].diagonal(), 3 * np.sum(x**2, 1)
    )
    np.testing.assert_allclose(local_kernel(x, y, 2.0, 1.0)[0], x @ y.T)  # w = 1: linear
    zero = local_kernel(np.zeros((1, 6)), y, 2.0, linear)
    assert all(np.all(part == 0.0) for part in zero)
    h = 1e-6
    for i in range(4):
        for f in range(6):
            up, down = x.copy(), x.copy()
            up[i, f] += h
            down[i, f] -= h
            numeric = (
                local_kernel(up, y, 2.0, linear)[0][i] - local_kernel(down, y, 2.0, linear)[0][i]
            ) / (2 * h)
            np.testing.assert_allclose(a[i] * y[:, f] + b[i] * x[i, f], numeric, atol=1e-7)


def _co2_pairs(gfn_delta) -> list[Atoms]:
    """CO2 dimers and their monomers: intermolecular data on C and O."""
    rng = np.random.default_rng(5)
    frames = []
    for k in range(4):
        a, b = molecule("CO2"), molecule("CO2")
        b.rotate(float(rng.uniform(0, 180)), rng.normal(size=3))
        b.translate([0.0, 3.2 + 0.2 * k, 0.5 * k])
        for mol in (a, b):
            mol.positions += rng.normal(scale=0.02, size=mol.positions.shape)
        frames += [a + b, a, b]
    return gfn_delta(frames)


@pytest.fixture(scope="module")
def co2_model(gfn_delta) -> SparseGPR:
    """A molecular model with intermolecular data on C and O (CO2 dimers and monomers)."""
    return SparseGPR(descriptor=DESCRIPTOR, n_sparse=30, inter_n_sparse=30).fit(
        _co2_pairs(gfn_delta)
    )


@pytest.fixture(scope="module")
def local_co2_model(gfn_delta) -> SparseGPR:
    """:func:`co2_model` with the local intermolecular kernel."""
    return SparseGPR(
        descriptor=DESCRIPTOR, n_sparse=30, inter_n_sparse=30, inter_kernel="local", inter_zeta=3
    ).fit(_co2_pairs(gfn_delta))


def _strained_pair(atoms: Atoms, a: int, b: int, h: float) -> list[Atoms]:
    """The cell under a symmetric strain +h and −h of component (a, b) (Voigt: the
    off-diagonal element split between ε_ab and ε_ba), atoms following the cell."""
    out = []
    for sign in (1, -1):
        eps = np.zeros((3, 3))
        eps[a, b] = eps[b, a] = sign * h / (1 if a == b else 2)
        probe = atoms.copy()
        probe.set_cell(atoms.cell.array @ (np.eye(3) + eps), scale_atoms=True)
        out.append(probe)
    return out


@pytest.mark.parametrize("name", ["co2_model", "local_co2_model"])
def test_stress_of_a_molecular_crystal_is_the_strain_derivative(
    name, co2_crystal_strained, request
):
    co2_model = request.getfixturevalue(name)
    atoms = co2_crystal_strained
    result = co2_model.predict(atoms, stress=True)
    assert abs(result.parts["inter"]) > 1e-6
    h = 1e-5
    volume = atoms.get_volume()
    voigt = [(0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)]
    for k, (a, b) in enumerate(voigt):
        energies = [
            co2_model.predict(p, forces=False).energy for p in _strained_pair(atoms, a, b, h)
        ]
        assert result.stress[k] == pytest.approx(
            (energies[0] - energies[1]) / (2 * h * volume), abs=1e-8
        )
    np.testing.assert_allclose(
        result.forces, _finite_difference_forces(co2_model, atoms), atol=2e-7
    )


@pytest.mark.parametrize("name", ["co2_model", "local_co2_model"])
def test_the_stress_uncertainty_is_that_of_the_strain_derivative(
    name, co2_crystal_strained, request
):
    """σ of each stress component equals the finite-difference variance of dE/dε / V,
    from the energies' posterior covariance at ±h (both parts, intra and inter)."""
    co2_model = request.getfixturevalue(name)
    atoms = co2_crystal_strained
    sigma = co2_model.stress_uncertainty(atoms)
    assert np.all(sigma > 0)
    h = 1e-3
    volume = atoms.get_volume()
    for k, (a, b) in enumerate([(0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)]):
        c = co2_model.energy_covariance(_strained_pair(atoms, a, b, h))
        variance = (c[0, 0] + c[1, 1] - 2 * c[0, 1]) / (2 * h) ** 2
        assert sigma[k] == pytest.approx(np.sqrt(variance) / volume, rel=2e-3)
    with pytest.raises(ParameterError, match="periodic"):
        co2_model.stress_uncertainty(molecule("CO2"))


def test_energy_is_invariant_and_size_extensive(co2_model, co2_crystal_strained, rotation):
    atoms = co2_crystal_strained
    energy = co2_model.predict(atoms, forces=False).energy
    turned = atoms.copy()
    turned.set_cell(atoms.cell.array @ rotation.T, scale_atoms=False)
    turned.positions = atoms.positions @ rotation.T + [0.3, -1.2, 2.0]
    assert co2_model.predict(turned, forces=False).energy == pytest.approx(energy, abs=1e-9)
    # Atom order across molecules (a random permutation mixes their atoms).
    order = np.random.default_rng(0).permutation(len(atoms))
    assert co2_model.predict(atoms[order], forces=False).energy == pytest.approx(energy, abs=1e-9)
    wrapped = atoms.copy()
    wrapped.positions += [2.1, 0.7, -3.3]
    wrapped.wrap()  # molecules cut by the cell boundary
    assert co2_model.predict(wrapped, forces=False).energy == pytest.approx(energy, abs=1e-9)
    double = atoms.repeat((2, 1, 1))
    assert co2_model.predict(double, forces=False).energy == pytest.approx(2 * energy, abs=1e-8)


def test_without_intermolecular_data_the_interaction_is_the_terms_alone(monomer_model, data):
    assert monomer_model.terms_[1].size == 0 and monomer_model.n_interactions_ == 0
    dimer = data["held_out"][0]
    parts = _parts(monomer_model, dimer)
    assert parts["inter"] == 0.0

    def interaction(correction) -> float:
        calc = DeltaCalculator(correction=correction, dispersion=None)
        energies = []
        for atoms in [dimer, *_monomers(dimer)]:
            work = atoms.copy()
            work.calc = calc
            energies.append(work.get_potential_energy())
        return energies[0] - energies[1] - energies[2]

    assert interaction(monomer_model) == pytest.approx(interaction(ZeroCorrection()), abs=1e-9)


def test_the_uncertainty_of_an_interaction_comes_from_the_intermolecular_part(
    model, monomer_model, data
):
    trained = data["interactions"][1]  # a complex of the training set (minimum of a scan)
    n = 3  # water donor first
    unseen = _hydrogen_bonded("CH3CH2OH", "CH3CH2OH", 1.9, seed=4)

    def sigma(fitted: SparseGPR, dimer: Atoms, n_first: int) -> float:
        cov = fitted.energy_covariance([dimer, dimer[:n_first], dimer[n_first:]])
        weights = np.array([1.0, -1.0, -1.0])
        return float(np.sqrt(max(weights @ cov @ weights, 0.0)))

    seen_sigma = sigma(model, trained, n)
    unseen_sigma = sigma(model, unseen, unseen.info["n_first"])
    assert seen_sigma < 0.5 * unseen_sigma
    # Intramolecular uncertainty cancels: the monomer-only model's σ of an interaction
    # is its intermolecular prior, far below its σ of the dimer's energy.
    cov = monomer_model.energy_covariance([unseen])
    assert sigma(monomer_model, unseen, unseen.info["n_first"]) < 0.5 * np.sqrt(cov[0, 0])


@pytest.mark.parametrize("name", ["model", "local_model"])
def test_model_files_record_the_decomposition(name, data, tmp_path, request):
    model = request.getfixturevalue(name)
    path = model.save(tmp_path / "model.npz")
    with np.load(path, allow_pickle=False) as stored:
        meta = json.loads(str(stored["metadata"]))
    assert meta["decomposition"] == "molecular"
    assert [t["name"] for t in meta["terms"]] == ["intra", "inter"]
    assert meta["terms"][1]["kernel"] == meta["params"]["inter_kernel"] == model.inter_kernel
    assert meta["format_version"] == 3
    loaded = SparseGPR.load(path)
    record = DeltaCalculator.from_model(path).todict()
    assert record["correction"]["content_sha256"] == model.content_sha256 == meta["content_sha256"]
    assert record["correction"]["path"] == str(path.resolve())
    assert record["terms"]["baseline"]["method"] == "GFN2-xTB"
    dimer = data["held_out"][0]
    assert loaded.predict(dimer).energy == pytest.approx(model.predict(dimer).energy, abs=1e-12)
    assert loaded.predict(dimer).parts == pytest.approx(model.predict(dimer).parts, abs=1e-12)


def _water_trimer(seed: int = 5) -> Atoms:
    """Three water molecules, each randomly turned, on a triangle of 2.9 Å sides."""
    rng = np.random.default_rng(seed)
    trimer = Atoms()
    for corner in ([0.0, 0.0, 0.0], [2.9, 0.0, 0.0], [1.45, 2.51, 0.0]):
        water = molecule("H2O")
        water.rotate(rng.uniform(0, 360), rng.normal(size=3), center="COM")
        water.translate(np.array(corner) - water.get_center_of_mass())
        trimer += water
    return trimer


def _interaction(model: SparseGPR, atoms: Atoms) -> float:
    """Correction energy of a complex minus those of its molecules (eV)."""
    found, _ = whole_molecules(atoms)
    parts = [atoms[found.labels == m] for m in range(len(found.formulas))]
    energy = model.predict(atoms, forces=False).energy
    return energy - sum(model.predict(p, forces=False).energy for p in parts)


def _clone_fitted(model: SparseGPR, **changes: object) -> SparseGPR:
    """A copy of a fitted model with some parameters changed (its weights kept)."""
    import copy

    changed = copy.copy(model)
    changed.set_params(**changes)
    return changed


def test_the_intermolecular_correction_is_a_sum_over_pairs_of_molecules(model):
    """Pairwise rows and the linear kernel: a cluster's correction is that of its dimers.

    A crystal's intermolecular correction is then the sum of those of the dimers
    cut from it, which is what makes crystal-contact dimers teach it. The same
    weights on the full − own rows (with the others ⊗ others term) are not.
    """
    trimer = _water_trimer()
    pairs = [
        trimer[3 * i : 3 * i + 3] + trimer[3 * j : 3 * j + 3] for i, j in ((0, 1), (0, 2), (1, 2))
    ]
    assert model.inter_rows == "pairwise"
    whole = _interaction(model, trimer)
    assert abs(whole) > 1e-3  # the contacts are within the cut-off
    assert whole == pytest.approx(sum(_interaction(model, d) for d in pairs), abs=1e-10)
    difference = _clone_fitted(model, inter_rows="difference")
    whole = _interaction(difference, trimer)
    assert abs(whole - sum(_interaction(difference, d) for d in pairs)) > 1e-4


def test_a_file_without_inter_rows_loads_with_the_difference_rows(model, tmp_path):
    """Files written before the pairwise rows keep the rows they were fitted on."""
    path = model.save(tmp_path / "model.npz")
    with np.load(path) as stored:
        arrays = {k: stored[k] for k in stored.files}
    meta = json.loads(str(arrays.pop("metadata")))
    assert meta["params"]["inter_rows"] == "pairwise"
    meta["params"].pop("inter_rows")
    meta.pop("content_sha256", None)
    write_model_file(tmp_path / "old.npz", meta, arrays)
    old = SparseGPR.load(tmp_path / "old.npz")
    assert old.inter_rows == "difference"
    trimer = _water_trimer()
    expected = _clone_fitted(model, inter_rows="difference").predict(trimer, forces=False).energy
    assert old.predict(trimer, forces=False).energy == pytest.approx(expected, abs=1e-12)
    assert SparseGPR.load(path).inter_rows == "pairwise"


def test_a_version_1_file_loads_as_the_atomic_model_and_a_broken_one_is_refused(data, tmp_path):
    atomic = SparseGPR(decomposition="atomic", descriptor=DESCRIPTOR, n_sparse=40)
    atomic.fit(data["monomers"])
    path = atomic.save(tmp_path / "atomic.npz")
    with np.load(path) as stored:
        arrays = {k: stored[k] for k in stored.files}
    meta = json.loads(str(arrays["metadata"]))
    # Rewrite it as format version 1 wrote it (one term, no decomposition key).
    meta["format_version"] = 1
    meta["delta_ev"] = meta["terms"][0]["delta_ev"]
    for key in ("decomposition", "terms", "inter_scale", "n_interactions"):
        meta.pop(key)
    for key in ("decomposition", "inter_n_sparse", "inter_zeta", "inter_delta"):
        meta["params"].pop(key)
    old = {
        "metadata": np.array(json.dumps(meta)),
        "sparse_values": arrays.pop("sparse_values_0"),
        "sparse_numbers": arrays.pop("sparse_numbers_0"),
        **{k: arrays[k] for k in ("alpha", "chol_mm", "r_factor")},
    }
    np.savez(tmp_path / "v1.npz", **old)
    loaded = SparseGPR.load(tmp_path / "v1.npz")
    assert loaded.decomposition == "atomic"
    probe = data["monomers"][0]
    assert loaded.predict(probe).energy == pytest.approx(atomic.predict(probe).energy, abs=1e-12)
    meta["format_version"] = 2
    meta["decomposition"] = "molecular"
    meta["terms"] = [{"name": "atomic", "kernel": "dot", "zeta": 2, "delta_ev": 0.1}]
    meta.pop("content_sha256", None)
    arrays = {
        k: v for k, v in old.items() if k not in ("metadata", "sparse_values", "sparse_numbers")
    }
    arrays |= {"sparse_values_0": old["sparse_values"], "sparse_numbers_0": old["sparse_numbers"]}
    # Written with a valid checksum: only the content is inconsistent.
    write_model_file(tmp_path / "broken.npz", meta, arrays)
    with pytest.raises(ModelFileError, match="do not match"):
        SparseGPR.load(tmp_path / "broken.npz")
    del arrays["sparse_values_0"]
    write_model_file(tmp_path / "missing.npz", meta, arrays)
    with pytest.raises(ModelFileError, match="sparse_values_0"):
        SparseGPR.load(tmp_path / "missing.npz")


def test_a_change_of_bonding_in_a_calculation_is_an_error(monomer_model):
    calc = DeltaCalculator(correction=monomer_model, dispersion=None)
    atoms = molecule("CH3OH")
    atoms.calc = calc
    atoms.get_potential_energy()
    atoms.positions[3] += 3.0 * (atoms.positions[3] - atoms.positions[0])  # an H leaves C
    with pytest.raises(TopologyChangedError, match="bonding changed"):
        atoms.get_potential_energy()
    # A new structure (another Atoms object) starts with its own molecules.
    other = atoms.copy()
    other.calc = calc
    assert np.isfinite(other.get_potential_energy())


def test_a_molecule_bonded_to_its_own_image_has_no_intramolecular_part(monomer_model):
    chain = Atoms("C2", positions=[[0, 0, 0], [1.4, 0, 0]], cell=[2.8, 8.0, 8.0], pbc=True)
    with pytest.raises(TopologyError, match="own periodic image"):
        whole_molecules(chain)
    wrapped = molecule("CH3OH")
    wrapped.set_cell([9.0, 9.0, 9.0])
    wrapped.pbc = True
    wrapped.positions += [8.5, 0.0, 0.0]
    wrapped.wrap()  # cut by the cell boundary
    _, positions = whole_molecules(wrapped)
    distances = np.linalg.norm(positions[:, None] - positions[None], axis=-1)
    assert distances.max() < 3.0  # made whole again


@pytest.mark.parametrize("rows", ["pairwise", "difference"])
def test_interaction_energies_of_the_training_set_are_fitted_as_observations(data, rows):
    frames = data["monomers"] + data["interactions"]
    groups = interaction_groups(frames)

    def error(fitted: SparseGPR) -> float:
        predicted = [fitted.predict(a, forces=False).energy for a in frames]
        given = [a.get_potential_energy() for a in frames]
        return float(
            np.mean(
                [
                    abs(
                        (predicted[i] - sum(predicted[m] for m in parts))
                        - (given[i] - sum(given[m] for m in parts))
                    )
                    for i, parts in groups
                ]
            )
        )

    settings = {"descriptor": DESCRIPTOR, "n_sparse": 60, "inter_n_sparse": 40, "inter_rows": rows}
    tight = SparseGPR(**settings, interaction_sigma=1e-4).fit(frames)
    loose = SparseGPR(**settings, interaction_sigma=None).fit(frames)
    assert error(tight) < 0.5 * error(loose)
    # Measured: 0.83 meV (difference) and 1.27 meV (pairwise: its rows lack the
    # other molecule's own square term, what an atom sees of two atoms of the
    # other molecule), against 6.0-6.2 meV fitted as totals only.
    assert error(tight) < {"difference": 1e-3, "pairwise": 1.5e-3}[rows]  # eV


def test_an_isolated_molecule_takes_one_soap_evaluation_with_the_same_rows():
    from deltaml.descriptors import SOAPDescriptor
    from deltaml.intermolecular import split_by_molecule

    soap = SOAPDescriptor([1, 6, 8], **DESCRIPTOR)
    ethanol = molecule("CH3CH2OH")
    ethanol.rattle(0.05, seed=3)
    dimer = molecule("H2O") + molecule("H2O")
    dimer.positions[3:] += [2.9, 0.0, 0.0]
    general = split_by_molecule(soap, [ethanol, dimer], ("positions",))  # two SOAP calls
    alone = split_by_molecule(soap, ethanol, ("positions",))  # one
    rows = slice(0, len(ethanol))
    np.testing.assert_allclose(alone.intra.values, general.intra.values[rows], atol=1e-12)
    np.testing.assert_allclose(alone.intra_norms, general.intra_norms[rows], atol=1e-12)
    assert np.abs(general.inter.values[rows]).max() < 1e-12
    assert not alone.inter.values.any() and len(alone.inter.position_rows) == 0
    mine = general.intra.position_rows < len(ethanol)
    np.testing.assert_array_equal(alone.intra.position_rows, general.intra.position_rows[mine])
    np.testing.assert_allclose(
        alone.intra.position_gradients, general.intra.position_gradients[mine], atol=1e-12
    )


@pytest.mark.parametrize("periodic", [False, True])
def test_one_soap_call_for_a_structure_and_its_molecules_gives_the_rows_of_two(periodic, water_box):
    """The structures and their molecules go to featomic together; rows are unchanged."""
    from deltaml.descriptors import SOAPDescriptor
    from deltaml.intermolecular import split_by_molecule

    soap = SOAPDescriptor([1, 8], **DESCRIPTOR)
    box = water_box.copy()
    box.pbc = periodic
    every = np.arange(len(box))
    together = split_by_molecule(soap, box, ("positions",))
    apart = split_by_molecule(soap, box, ("positions",), centres=every)  # two calls
    for part in ("intra", "inter"):
        a, b = getattr(together, part), getattr(apart, part)
        np.testing.assert_allclose(a.values, b.values, atol=1e-12)
        np.testing.assert_array_equal(a.position_rows, b.position_rows)
        np.testing.assert_array_equal(a.position_atoms, b.position_atoms)
        np.testing.assert_allclose(a.position_gradients, b.position_gradients, atol=1e-12)


@pytest.mark.parametrize("decomposition", ["molecular", "atomic"])
def test_forces_and_stress_through_the_expansion_equal_those_of_the_gradients(
    decomposition, co2_model, co2_crystal_strained, gfn_delta, monkeypatch
):
    """Large structures take forces and stress by one backward pass: same numbers."""
    import deltaml.model as model_module

    model = co2_model
    if decomposition == "atomic":
        model = SparseGPR(descriptor=DESCRIPTOR, n_sparse=40, decomposition="atomic").fit(
            gfn_delta([co2_crystal_strained])
        )
    cluster = co2_crystal_strained.copy()
    cluster.pbc = False
    for atoms, pieces in ((co2_crystal_strained, None), (cluster, None), (cluster, 6)):
        stress = bool(atoms.pbc.all())
        if pieces:  # a large structure is done in pieces of whole molecules
            monkeypatch.setattr(model, "chunk_atoms", pieces, raising=False)
        results = []
        for threshold in (10**9, 1):
            monkeypatch.setattr(model_module, "PULLBACK_ATOMS", threshold)
            results.append(model.predict(atoms, stress=stress, force_uncertainty=False))
        arrays, pulled = results
        assert pulled.energy == pytest.approx(arrays.energy, abs=1e-10)
        np.testing.assert_allclose(pulled.forces, arrays.forces, atol=1e-10)
        if stress:
            np.testing.assert_allclose(pulled.stress, arrays.stress, atol=1e-12)
        assert pulled.energy_uncertainty == pytest.approx(arrays.energy_uncertainty, rel=1e-9)


@pytest.mark.parametrize("periodic", [False, True])
def test_molecules_set_far_apart_give_the_rows_they_have_alone(periodic, water_box, monkeypatch):
    """Many molecules go to featomic as one structure of far-apart molecules: same
    rows and gradients, to round-off, on both gradient paths."""
    import deltaml.intermolecular as intermolecular
    from deltaml.descriptors import SOAPDescriptor
    from deltaml.intermolecular import split_by_molecule

    soap = SOAPDescriptor([1, 8], **DESCRIPTOR)
    box = water_box.copy()
    box.pbc = periodic
    kinds = ("positions", "strain") if periodic else ("positions",)
    w = np.random.default_rng(2).normal(size=(len(box), soap.n_features))
    results = []
    for threshold in (10**9, 2):
        monkeypatch.setattr(intermolecular, "EXPLODE_MOLECULES", threshold)
        arrays = split_by_molecule(soap, box, kinds)
        pulled = split_by_molecule(soap, box, kinds, pullback=True)
        results.append((arrays, pulled))
    (a0, p0), (a1, p1) = results
    for part in ("intra", "inter"):
        x0, x1 = getattr(a0, part), getattr(a1, part)
        np.testing.assert_allclose(x1.values, x0.values, atol=1e-13)
        np.testing.assert_allclose(x1.position_gradients, x0.position_gradients, atol=1e-12)
        if periodic:
            np.testing.assert_allclose(x1.strain_gradients, x0.strain_gradients, atol=1e-12)
        y0, y1 = getattr(p0, part), getattr(p1, part)
        np.testing.assert_allclose(y1.values, y0.values, atol=1e-13)
        pulled = zip(y1.pullback(w, True, periodic), y0.pullback(w, True, periodic), strict=True)
        for got, expected in pulled:
            if expected is not None:
                np.testing.assert_allclose(got, expected, atol=1e-11)


def test_a_molecule_in_a_cell_sees_its_images_on_the_expansion_path(
    model, water_chain, monkeypatch
):
    """One molecule per cell is not an isolated molecule: its images are other molecules."""
    import deltaml.model as model_module

    results = []
    for threshold in (10**9, 1):
        monkeypatch.setattr(model_module, "PULLBACK_ATOMS", threshold)
        results.append(model.predict(water_chain, stress=True, force_uncertainty=False))
    arrays, pulled = results
    assert abs(arrays.parts["inter"]) > 1e-8  # the chain's hydrogen bonds
    assert pulled.parts["inter"] == pytest.approx(arrays.parts["inter"], abs=1e-12)
    np.testing.assert_allclose(pulled.forces, arrays.forces, atol=1e-10)
    np.testing.assert_allclose(pulled.stress, arrays.stress, atol=1e-12)


def test_the_intermolecular_prior_by_evidence_maximises_the_marginal_likelihood(data):
    """inter_delta="evidence": its log-evidence curve is the GP's marginal likelihood."""
    import scipy.linalg

    frames = data["monomers"] + data["interactions"]
    model = SparseGPR(descriptor=DESCRIPTOR, n_sparse=30, inter_n_sparse=20, inter_delta="evidence")
    model.fit(frames, trained_with=TERMS)
    record = model.inter_evidence_
    assert model.terms_[1].delta == pytest.approx(record["delta"])
    best = int(np.argmax(record["log_evidence"]))
    design, target, sigma, _ = model._design(frames, False)  # at the chosen δ
    inter = model._columns()[1]

    def direct(factor: float) -> float:
        """log N(y | 0, Σ + A K⁻¹ Aᵀ) with the intermolecular δ times ``factor``."""
        a = design.copy()
        a[:, inter] *= factor**2
        kmm = model._kmm()
        kmm[inter, inter] *= factor**2
        kmm[np.diag_indices(len(kmm))] += model.jitter * np.concatenate(
            [np.full(t.size, t.delta**2 * (factor**2 if t.name == "inter" else 1.0))
             for t in model.terms_]
        )  # fmt: skip
        cov = np.diag(sigma**2) + a @ np.linalg.solve(kmm, a.T)
        chol = np.linalg.cholesky(cov)
        z = scipy.linalg.solve_triangular(chol, target, lower=True)
        return -0.5 * z @ z - np.sum(np.log(np.diag(chol)))

    factors = record["factors"]
    for k in (best - 4, best + 4):
        if 0 <= k < len(factors):
            relative = factors[k] / factors[best]
            expected = record["log_evidence"][k] - record["log_evidence"][best]
            assert direct(relative) - direct(1.0) == pytest.approx(expected, rel=1e-6, abs=1e-6)
            assert expected <= 0.0


@pytest.mark.parametrize("search", ["cv", "cv-interactions"])
def test_the_intermolecular_prior_by_cross_validation_scores_held_out_systems(
    data, gfn_delta, search
):
    """inter_delta="cv": each trial's error is that of a GP fitted without the fold, on
    the fold's interaction energies and (not with "cv-interactions") its clusters."""
    rng = np.random.default_rng(4)
    trimers = []
    for _ in range(3):  # clusters without their molecules: energies only, not interactions
        atoms = _hydrogen_bonded("H2O", "H2O", 1.95, seed=int(rng.integers(100)))
        third = molecule("H2O")
        third.positions += atoms.positions.mean(axis=0) + np.array([0.0, 3.2, 0.0])
        trimers.append(atoms + third)
    frames = data["monomers"] + data["interactions"] + gfn_delta(trimers)
    model = SparseGPR(descriptor=DESCRIPTOR, n_sparse=30, inter_n_sparse=20, inter_delta=search)
    model.fit(frames, trained_with=TERMS)
    record = model.inter_cv_
    assert record["folds"] == 4  # four dimers, no families: one group each
    assert record["interactions"] == 16
    assert record["clusters"] == (3 if search == "cv" else 0)
    best = int(
        np.argmin(np.abs(np.array(record["factors"]) - record["delta"] / record["rule_delta"]))
    )
    assert model.terms_[1].delta == pytest.approx(record["delta"])
    assert record["delta"] == pytest.approx(record["rule_delta"] * record["factors"][best])
    assert max(record["mae_ev"]) > 1.2 * min(record["mae_ev"])  # the choice matters
    if search == "cv-interactions":
        assert best == int(np.argmin(record["mae_ev"])) and record["cluster_mae_ev"] is None

    design, target, sigma, owners = model._design(frames, False)  # at the chosen δ
    energies = np.array([a.calc.results["energy"] for a in frames])
    folds = interaction_folds(model.groups_, [None] * len(model.groups_), 5, model.seed)
    clusters = model._cv_clusters(frames) if search == "cv" else []
    assert sorted(clusters) == (
        [len(frames) - 3, len(frames) - 2, len(frames) - 1] if clusters else []
    )
    for n, k in enumerate(clusters):
        folds[n % len(folds)].add(k)
    kmm = model._jittered_kmm()
    first = {int(o): r for r, o in reversed(list(enumerate(owners)))}
    interactions, loose = 0.0, 0.0
    for fold in folds:  # the projected-process GP solved directly, the fold left out
        keep = ~np.isin(owners, sorted(fold))
        a = design[keep] / sigma[keep, None]
        weights = np.linalg.solve(kmm + a.T @ a, a.T @ (target[keep] / sigma[keep]))
        for index, parts in model.groups_:
            if index in fold:
                row = design[first[index]] - design[[first[j] for j in parts]].sum(axis=0)
                interactions += abs(row @ weights - (energies[index] - energies[parts].sum()))
        for k in set(clusters) & fold:
            loose += abs(design[first[k]] @ weights - target[first[k]])
    # The normal equations here square the condition number that the model's QR
    # solve sees: agreement to ~1e-6 relative, measured 1.1e-6 on a fresh CI install.
    assert interactions / 16 == pytest.approx(record["mae_ev"][best], rel=1e-5)
    if clusters:
        assert loose / 3 == pytest.approx(
            record["cluster_mae_ev"][best], rel=1e-5
        )  # totals: more round-off


def _deformed_cells(cell: Atoms, count: int, strain: float, rattle: float, seed: int) -> list:
    """Copies of a cell, each deformed by I + ε (components uniform in ±``strain``) and
    rattled (normal, ``rattle`` Å)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        copy = cell.copy()
        copy.set_cell(cell.cell.array @ (np.eye(3) + rng.uniform(-strain, strain, (3, 3))),
                      scale_atoms=True)  # fmt: skip
        copy.positions += rng.normal(scale=rattle, size=copy.positions.shape)
        out.append(copy)
    return out


def test_without_interaction_energies_cv_leaves_whole_systems_of_cells_out(
    gfn_delta, co2_crystal_strained
):
    """Periodic labels of two named systems (polymorphs): δ by leaving a system out."""
    cells = _deformed_cells(co2_crystal_strained, 6, 0.04, 0.03, seed=12)
    for k, cell in enumerate(cells):
        cell.info["system"] = "compressed" if k % 2 else "expanded"
        if k % 2:
            cell.set_cell(cell.cell.array * 0.97, scale_atoms=True)
    frames = gfn_delta([*cells, molecule("CO2")])
    model = SparseGPR(descriptor=DESCRIPTOR, n_sparse=20, inter_n_sparse=20, inter_delta="cv")
    model.fit(frames, trained_with=TERMS)
    record = model.inter_cv_
    assert model.n_interactions_ == 0 and record["folds"] == 2 and record["clusters"] == 6
    assert np.all(np.isnan(record["mae_ev"]))  # no interaction energy to score
    errors = np.array(record["cluster_mae_ev"])
    best = int(np.argmin(errors))
    assert record["delta"] == pytest.approx(record["factors"][best] * record["rule_delta"])
    assert 0.0015 <= record["delta"] <= 0.5 and errors.max() > errors.min()
    # Without system names there is nothing to leave out: the rule's fallback, silently.
    for atoms in frames:
        atoms.info.pop("system", None)
    plain = SparseGPR(descriptor=DESCRIPTOR, n_sparse=20, inter_n_sparse=20).fit(frames)
    assert plain.terms_[1].delta == pytest.approx(plain.inter_cv_["rule_delta"])


def test_the_least_regret_trial_balances_two_kinds_of_error():
    from deltaml.prior_width import least_regret

    errors = np.array([[1.0, 1.1, 1.5, 3.0], [4.0, 2.0, 1.2, 1.0]])
    assert least_regret(errors) == 2  # worst relative errors 4, 2, 1.5, 3
    assert least_regret(errors[:1]) == 0
    assert least_regret(np.array([[np.nan, np.nan], [2.0, 1.0]])) == 1  # a kind without data


def test_the_folds_of_the_intermolecular_prior_follow_families(data):
    """Complexes of one family stay in one fold, with their molecules."""
    frames = [a.copy() for a in data["monomers"] + data["interactions"]]
    for atoms, source in zip(frames, data["monomers"] + data["interactions"], strict=True):
        atoms.calc = source.calc
    groups = interaction_groups(frames)
    families = ["water" if k < 8 else "alcohol" for k in range(len(groups))]
    folds = interaction_folds(groups, families, 5, seed=0)
    assert len(folds) == 2
    for fold in folds:
        members = [(i, p) for i, p in groups if i in fold]
        assert len(members) == 8
        assert all(set(p) <= fold for _, p in members)
    # Without families, complexes that share molecules (a dimer's scan) stay together.
    alone = interaction_folds(groups, [None] * len(groups), 5, seed=0)
    assert sorted(len([i for i, _ in groups if i in f]) for f in alone) == [4, 4, 4, 4]
    with pytest.warns(UserWarning, match="at least two families"):
        for atoms in frames:
            atoms.info["family"] = "water"  # one family: nothing to cross-validate
        lone = SparseGPR(descriptor=DESCRIPTOR, n_sparse=30, inter_n_sparse=20, inter_delta="cv")
        lone.fit(frames, trained_with=TERMS)
    assert lone.terms_[1].delta == pytest.approx(lone.inter_cv_["rule_delta"])


def test_inter_delta_takes_a_positive_width_or_evidence():

    with pytest.raises(ParameterError, match="inter_delta"):
        SparseGPR(inter_delta="likelihood").fit([])
    with pytest.raises(ParameterError, match="inter_delta"):
        SparseGPR(inter_delta=-0.1).fit([])


def test_the_intermolecular_kernel_is_checked():
    with pytest.raises(ParameterError, match="inter_kernel"):
        SparseGPR(inter_kernel="exp").fit([])
    with pytest.raises(ParameterError, match="inter_zeta > 0"):
        SparseGPR(inter_kernel="local", inter_zeta=0).fit([])
    with pytest.raises(ParameterError, match="integer"):
        SparseGPR(inter_zeta=1.5).fit([])
    with pytest.raises(ParameterError, match="inter_linear"):
        SparseGPR(inter_linear=0.5).fit([])  # the dot kernel is linear already
    with pytest.raises(ParameterError, match="inter_linear"):
        SparseGPR(inter_kernel="local", inter_linear=1.5).fit([])
    with pytest.raises(ParameterError, match="inter_rows"):
        SparseGPR(inter_rows="triples").fit([])
    with pytest.raises(ParameterError, match="featomic"):
        SparseGPR(descriptor={"backend": "dscribe"}).fit([])
    SparseGPR(descriptor={"backend": "dscribe"}, decomposition="atomic")._check_parameters()


@pytest.mark.slow
def test_a_lattice_energy_of_a_crystal_model_is_invariant_to_cell_choice_and_atom_order(
    gfn_delta, co2_crystal_strained
):
    """Issue 14: a model trained on periodic cells gives one lattice energy per molecule
    whatever cell (unimodular transformation, supercell) or atom order describes it."""
    from ase.build import make_supercell

    from deltaml.crystals import identify_molecules

    cells = _deformed_cells(co2_crystal_strained, 4, 0.03, 0.02, seed=8)
    gas = molecule("CO2")
    model = SparseGPR(descriptor=DESCRIPTOR, n_sparse=30, inter_n_sparse=30).fit(
        gfn_delta([*cells, gas])
    )

    def lattice_energy(crystal: Atoms) -> float:
        """Per molecule, of the learned part (the terms have their own tests)."""
        z = len(identify_molecules(crystal).formulas)
        return (model.predict(crystal, forces=False).energy - z * model.predict(gas).energy) / z

    reference = lattice_energy(co2_crystal_strained)
    assert abs(reference) > 1e-4  # the intermolecular part contributes
    sheared = make_supercell(co2_crystal_strained, [[1, 1, 0], [0, 1, 0], [0, 0, 1]])
    assert abs(np.linalg.det(sheared.cell.array)) == pytest.approx(
        abs(np.linalg.det(co2_crystal_strained.cell.array))
    )
    reordered = co2_crystal_strained[np.random.default_rng(1).permutation(12)]
    larger = make_supercell(co2_crystal_strained, [[1, 0, 1], [0, 2, 0], [0, 0, 1]])
    for other in (sheared, reordered, larger):
        assert lattice_energy(other) == pytest.approx(reference, abs=1e-9)
