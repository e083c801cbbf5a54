"""SOAP descriptors: shapes, normalisation, gradients against finite differences,
invariances, smoothness at the cut-off, refusals and the settings record."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ase import Atoms

from deltaml.descriptors import DescriptorBatch, SOAPDescriptor
from deltaml.errors import (
    EmptyStructureError,
    NonFiniteGeometryError,
    ParameterError,
    UnsupportedCapabilityError,
    UnsupportedElementError,
)

pytest.importorskip("featomic")

#: Small settings that keep every test fast (featomic: F = 384 for H, C, O).
SMALL = {"cutoff": 4.0, "smoothing": 0.5, "gaussian_width": 0.3, "n_max": 4, "l_max": 3}
#: Fewer features for the 12-atom periodic cell (all 144 atom pairs within the cut-off).
TINY = {"cutoff": 4.0, "smoothing": 0.5, "gaussian_width": 0.3, "n_max": 3, "l_max": 2}


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


BACKENDS = [
    "featomic",
    pytest.param(
        "dscribe", marks=pytest.mark.skipif(not _has("dscribe"), reason="dscribe missing")
    ),
]


def soap(backend: str = "featomic", species=(1, 6, 8), **settings) -> SOAPDescriptor:
    return SOAPDescriptor(species, backend=backend, **{**SMALL, **settings})


def dense_gradients(batch: DescriptorBatch) -> np.ndarray:
    """Position gradients as (n_rows, n_atoms, 3, F), zero for pairs not stored."""
    n = int(batch.offsets[-1])
    dense = np.zeros((n, n, 3, batch.values.shape[1]))
    dense[batch.position_rows, batch.position_atoms] = batch.position_gradients
    return dense


def strained(atoms: Atoms, eps: np.ndarray) -> Atoms:
    """``r -> r @ (I + eps)``, ``cell -> cell @ (I + eps)``."""
    out = atoms.copy()
    deformation = np.eye(3) + eps
    out.set_cell(atoms.cell.array @ deformation, scale_atoms=False)
    out.positions = atoms.positions @ deformation
    return out


# ---------------------------------------------------------------- shapes and batches


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_have_unit_norm_and_n_features_columns(backend, water, ethanol):
    descriptor = soap(backend)
    batch = descriptor.compute([water, ethanol], gradients=("positions",))
    expected = {"featomic": 6 * 4 * 16, "dscribe": 12 * 13 // 2 * 4}[backend]
    assert descriptor.n_features == expected
    assert batch.values.shape == (12, descriptor.n_features)
    np.testing.assert_allclose(np.linalg.norm(batch.values, axis=1), 1.0, atol=1e-12)
    assert batch.offsets.tolist() == [0, 3, 12]
    assert batch.numbers.tolist() == [*water.numbers, *ethanol.numbers]
    assert batch.values[batch.frame_slice(1)].shape == (9, descriptor.n_features)
    assert batch.position_gradients.shape == (len(batch.position_rows), 3, expected)
    assert batch.strain_gradients is None
    # Pairs are unique, sorted, never cross frames, and include every self pair.
    keys = batch.position_rows * 12 + batch.position_atoms
    assert np.all(np.diff(keys) > 0)
    frame_of = np.searchsorted(batch.offsets, np.arange(12), side="right") - 1
    assert np.array_equal(frame_of[batch.position_rows], frame_of[batch.position_atoms])
    assert set(np.arange(12) * 13) <= set(keys.tolist())


@pytest.mark.parametrize("backend", BACKENDS)
def test_frame_alone_equals_frame_in_mixed_batch(backend, water, ethanol, co2_crystal):
    descriptor = soap(backend)
    gradients = ("positions", "strain") if backend == "featomic" else ("positions",)
    alone = descriptor.compute(water, gradients=gradients)
    batch = descriptor.compute([co2_crystal, water, ethanol], gradients=gradients)
    rows = batch.frame_slice(1)
    assert np.array_equal(batch.values[rows], alone.values)
    assert np.array_equal(batch.numbers[rows], water.numbers)
    assert np.array_equal(dense_gradients(batch)[rows, rows], dense_gradients(alone))
    if backend == "featomic":
        assert np.array_equal(batch.strain_gradients[rows], alone.strain_gradients)
        # Water has no carbon: the columns of pairs with C are zero in its rows.
        assert np.count_nonzero(alone.values.any(axis=0)) < descriptor.n_features


def test_featomic_rows_match_metatensor_densification(water, ethanol, co2_crystal):
    from metatensor import Labels

    descriptor = soap("featomic")
    frames = [co2_crystal, water, ethanol]
    batch = descriptor.compute(frames, gradients=("positions",))
    pairs = [[a, b] for i, a in enumerate(descriptor.species) for b in descriptor.species[i:]]
    tensor = descriptor._calculator.compute(frames, gradients=["positions"])
    tensor = tensor.keys_to_properties(
        Labels(["neighbor_1_type", "neighbor_2_type"], np.array(pairs, dtype=np.int32))
    ).keys_to_samples("center_type")
    block = tensor.block()
    reference = block.values / np.linalg.norm(block.values, axis=1, keepdims=True)
    np.testing.assert_allclose(batch.values, reference, rtol=0, atol=1e-15)
    assert np.array_equal(batch.numbers, block.samples.values[:, 2])
    grad = block.gradient("positions").samples.values
    atoms = batch.offsets[grad[:, 1]] + grad[:, 2]
    rows = batch.offsets[block.samples.values[grad[:, 0], 0]] + block.samples.values[grad[:, 0], 1]
    expected = sorted(zip(rows.tolist(), atoms.tolist(), strict=True))
    got = list(zip(batch.position_rows.tolist(), batch.position_atoms.tolist(), strict=True))
    assert got == expected


def test_empty_batch():
    descriptor = soap()
    batch = descriptor.compute([], gradients=("positions", "strain"))
    assert batch.values.shape == (0, descriptor.n_features)
    assert batch.offsets.tolist() == [0]
    assert batch.position_gradients.shape == (0, 3, descriptor.n_features)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("structure", ["ethanol", "co2_crystal_strained"])
def test_position_gradients_match_finite_differences(backend, structure, request):
    atoms = request.getfixturevalue(structure)
    descriptor = soap(backend, **(TINY if atoms.pbc.all() else {}))
    batch = descriptor.compute(atoms, gradients=("positions",))
    analytic = dense_gradients(batch)
    h = 1e-5
    for j in range(len(atoms)):
        for a in range(3):
            plus, minus = atoms.copy(), atoms.copy()
            plus.positions[j, a] += h
            minus.positions[j, a] -= h
            fd = (descriptor.compute(plus).values - descriptor.compute(minus).values) / (2 * h)
            # featomic: ~1e-10; dscribe (its own numerical derivatives): ~1e-8.
            np.testing.assert_allclose(analytic[:, j, a], fd, rtol=0, atol=1e-7)
    assert np.abs(analytic).max() > 0.1
    # Translating everything leaves each row unchanged: the gradients of a row sum to zero.
    np.testing.assert_allclose(analytic.sum(axis=1), 0.0, atol=1e-7)


@pytest.mark.parametrize("structure", ["water", "co2_crystal_strained"])
def test_strain_gradients_match_finite_differences(structure, request):
    atoms = request.getfixturevalue(structure)
    descriptor = soap("featomic", **(TINY if atoms.pbc.all() else {}))
    grad = descriptor.compute(atoms, gradients=("strain",)).strain_gradients
    assert grad.shape == (len(atoms), 3, 3, descriptor.n_features)
    h = 1e-5
    for a in range(3):
        for b in range(3):  # one component at a time: non-symmetric strains
            eps = np.zeros((3, 3))
            eps[a, b] = h
            fd = (
                descriptor.compute(strained(atoms, eps)).values
                - descriptor.compute(strained(atoms, -eps)).values
            ) / (2 * h)
            np.testing.assert_allclose(grad[:, a, b], fd, rtol=0, atol=1e-7)
    # A general non-symmetric strain, as a directional derivative.
    eps = h * np.array([[0.3, 1.0, -0.4], [-0.7, 0.2, 0.5], [0.9, -0.1, -0.6]])
    fd = (
        descriptor.compute(strained(atoms, eps)).values
        - descriptor.compute(strained(atoms, -eps)).values
    ) / 2
    np.testing.assert_allclose(np.einsum("iabf,ab->if", grad, eps), fd, rtol=0, atol=1e-12)
    assert np.abs(grad).max() > 0.1
    # Rotations leave rows unchanged, so the antisymmetric part vanishes.
    np.testing.assert_allclose(grad, grad.transpose(0, 2, 1, 3), atol=1e-9)


# ---------------------------------------------------------------- invariances


@pytest.mark.parametrize("backend", BACKENDS)
def test_rotation_and_translation_invariance(backend, ethanol, co2_crystal_strained, rotation):
    descriptor = soap(backend)
    moved = ethanol.copy()
    moved.positions = ethanol.positions @ rotation.T + [1.3, -2.0, 0.7]
    np.testing.assert_allclose(
        descriptor.compute(moved).values, descriptor.compute(ethanol).values, atol=1e-10
    )
    cell = co2_crystal_strained
    descriptor = soap(backend, species=(6, 8), **TINY)
    moved = cell.copy()
    moved.set_cell(cell.cell.array @ rotation.T, scale_atoms=True)
    moved.positions += [2.1, -0.4, 3.3]
    moved.wrap()
    reference = descriptor.compute(cell).values
    np.testing.assert_allclose(descriptor.compute(moved).values, reference, atol=1e-10)
    # Sanity: the check is sensitive to a real change of geometry.
    moved.positions[0] += 0.05
    assert np.abs(descriptor.compute(moved).values - reference).max() > 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_permuting_atoms_permutes_rows(backend, ethanol):
    descriptor = soap(backend)
    perm = np.random.default_rng(5).permutation(len(ethanol))
    permuted = ethanol[perm]
    ref = descriptor.compute(ethanol, gradients=("positions",))
    out = descriptor.compute(permuted, gradients=("positions",))
    np.testing.assert_allclose(out.values, ref.values[perm], atol=1e-12)
    assert np.array_equal(out.numbers, ref.numbers[perm])
    np.testing.assert_allclose(
        dense_gradients(out), dense_gradients(ref)[np.ix_(perm, perm)], atol=1e-10
    )


# ---------------------------------------------------------------- smoothness


@pytest.mark.parametrize("backend", BACKENDS)
def test_dimer_goes_smoothly_to_isolated_atoms_at_the_cutoff(backend):
    cutoff = 3.0
    descriptor = soap(backend, species=(1, 8), cutoff=cutoff)
    isolated = np.concatenate(
        [descriptor.compute(Atoms("O")).values, descriptor.compute(Atoms("H")).values]
    )

    def deviation(delta: float) -> float:
        dimer = Atoms("OH", positions=[[0, 0, 0], [0.3, -0.2, cutoff + delta]])
        dimer.positions[1] *= (cutoff + delta) / np.linalg.norm(dimer.positions[1])
        return float(np.abs(descriptor.compute(dimer).values - isolated).max())

    assert deviation(-1.0) > 1e-3  # the neighbour is seen inside the cut-off
    for delta in (0.0, 1e-3, 0.1, 1.0):
        assert deviation(delta) < 1e-14  # and not at all beyond it
    # Continuous with zero slope at the cut-off: the deviation falls ~ (cutoff - r)².
    # Measured at 1e-3 Å: featomic 1.2e-6, dscribe 1.5e-9; ratio 1e-2 for both.
    near, nearer = deviation(-1e-2), deviation(-1e-3)
    assert nearer < 1e-5
    assert nearer < 0.02 * near


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("backend", BACKENDS)
def test_unknown_element_is_named(backend, ethanol):
    descriptor = soap(backend, species=("H", "O"))
    with pytest.raises(UnsupportedElementError, match=r"C \(Z=6\).*H \(Z=1\), O \(Z=8\)"):
        descriptor.compute([Atoms("H2O", positions=[[0, 0, 0], [0, 0, 1], [0, 1, 0]]), ethanol])


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_periodicity_is_refused(backend, water):
    slab = water.copy()
    slab.set_cell([6.0, 6.0, 6.0])
    slab.pbc = [True, True, False]
    with pytest.raises(UnsupportedCapabilityError, match="pbc=True"):
        soap(backend).compute(slab)


def test_dscribe_has_no_strain(co2_crystal):
    pytest.importorskip("dscribe")
    with pytest.raises(UnsupportedCapabilityError, match=r"stress.*featomic"):
        soap("dscribe", species=(6, 8)).compute(co2_crystal, gradients=("positions", "strain"))


def test_invalid_structures_raise_their_errors(water):
    descriptor = soap()
    with pytest.raises(EmptyStructureError):
        descriptor.compute(Atoms())
    broken = water.copy()
    broken.positions[1, 0] = np.nan
    with pytest.raises(NonFiniteGeometryError):
        descriptor.compute([water, broken])
    with pytest.raises(ParameterError, match="cell"):
        descriptor.compute(water, gradients=("cell",))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"backend": "quip"}, "backend"),
        ({"species": []}, "empty"),
        ({"species": ["H", "Xx"]}, "Xx"),
        ({"species": [1, 0]}, "not an element"),
        ({"cutoff": 0.0}, "cutoff"),
        ({"cutoff": float("nan")}, "cutoff"),
        ({"smoothing": -0.1}, "smoothing"),
        ({"smoothing": 4.0}, "smaller than cutoff"),
        ({"gaussian_width": 0}, "gaussian_width"),
        ({"n_max": 0}, "n_max"),
        ({"n_max": 2.5}, "n_max"),
        ({"l_max": -1}, "l_max"),
        ({"backend": "dscribe", "cutoff": 0.9, "smoothing": 0.1}, "dscribe"),
    ],
)
def test_bad_settings_raise_parameter_error(changes, message):
    if changes.get("backend") == "dscribe":
        pytest.importorskip("dscribe")
    settings = {"species": (1, 8), **SMALL, **changes}
    species = settings.pop("species")
    with pytest.raises(ParameterError, match=message):
        SOAPDescriptor(species, **settings)


# ---------------------------------------------------------------- record


@pytest.mark.parametrize("backend", BACKENDS)
def test_record_round_trip(backend):
    descriptor = SOAPDescriptor(["O", 1, "C", 1], backend=backend, **SMALL)
    assert descriptor.species == (1, 6, 8)
    record = json.loads(json.dumps(descriptor.record()))
    assert record["species"] == [1, 6, 8]
    assert record["normalised"] is True
    assert record["backend"] == backend
    assert record["backend_version"]
    again = SOAPDescriptor.from_record(record)
    assert again.record() == record
    assert again.n_features == descriptor.n_features
    with pytest.raises(ParameterError, match="unknown keys"):
        SOAPDescriptor.from_record({**record, "rcut": 3.0})
    with pytest.raises(ParameterError, match="missing keys"):
        SOAPDescriptor.from_record({k: v for k, v in record.items() if k != "n_max"})


@pytest.mark.parametrize("backend", BACKENDS)
def test_isolated_atom_keeps_its_zero_self_pair(backend):
    batch = soap(backend, species=(1, 8), cutoff=3.0).compute(
        Atoms("OH", positions=[[0, 0, 0], [0, 0, 5.0]]), gradients=("positions",)
    )
    assert batch.position_rows.tolist() == [0, 1]
    assert batch.position_atoms.tolist() == [0, 1]
    assert not batch.position_gradients.any()


# ---------------------------------------------------------------- rows of some centres


@pytest.mark.parametrize("periodic", [True, False])
def test_rows_of_some_centres_equal_those_of_the_whole_structure(periodic, water_box):
    """Issue 13, item 11: a piece of the centres gives exactly the rows and gradients
    the whole structure gives them (gradients with respect to any atom)."""
    atoms = water_box.copy()
    atoms.pbc = periodic
    descriptor = soap(species=(1, 8), **TINY)
    kinds = ("positions", "strain") if periodic else ("positions",)
    whole = descriptor.compute(atoms, kinds)
    centres = np.arange(6, 15)
    piece = descriptor.compute(atoms, kinds, centres=centres)
    assert piece.atom_count == len(atoms) and len(piece.values) == len(centres)
    np.testing.assert_array_equal(piece.values, whole.values[centres])
    np.testing.assert_array_equal(piece.numbers, atoms.numbers[centres])
    mine = np.isin(whole.position_rows, centres)
    np.testing.assert_array_equal(centres[piece.position_rows], whole.position_rows[mine])
    np.testing.assert_array_equal(piece.position_atoms, whole.position_atoms[mine])
    assert piece.position_atoms.max() >= centres.max()  # atoms outside the piece move it
    np.testing.assert_array_equal(piece.position_gradients, whole.position_gradients[mine])
    if periodic:
        np.testing.assert_array_equal(piece.strain_gradients, whole.strain_gradients[centres])


def test_centres_are_checked(water, ethanol):
    descriptor = soap()
    with pytest.raises(ParameterError, match="ascending"):
        descriptor.compute(ethanol, centres=[3, 1])
    with pytest.raises(UnsupportedCapabilityError, match="one structure"):
        descriptor.compute([water, ethanol], centres=[0])


def test_centre_chunks_cover_every_atom_in_whole_molecules():
    from deltaml.descriptors import centre_chunks

    labels = np.array([0, 0, 1, 2, 1, 2, 2, 3, 3, 4])
    chunks = centre_chunks(len(labels), 3, labels)
    np.testing.assert_array_equal(np.sort(np.concatenate(chunks)), np.arange(len(labels)))
    for chunk in chunks:
        assert np.all(np.diff(chunk) > 0)
        for m in np.unique(labels[chunk]):  # a molecule is never cut
            assert set(np.flatnonzero(labels == m)) <= set(chunk)
    assert [len(c) for c in centre_chunks(7, 3)] == [3, 3, 1]
    assert len(centre_chunks(7, 10)) == 1
