"""The SOAP backward pass through the spherical expansion (deltaml.expansion)."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import molecule

from deltaml.descriptors import SOAPDescriptor
from deltaml.errors import UnsupportedCapabilityError
from deltaml.expansion import expand

SOAP = {"cutoff": 4.0, "n_max": 4, "l_max": 3}


@pytest.fixture(scope="module")
def soap() -> SOAPDescriptor:
    return SOAPDescriptor(["H", "C", "N", "O"], **SOAP)  # N absent below: a zero species


@pytest.fixture
def cluster() -> object:
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.05, seed=1)
    water = molecule("H2O")
    water.positions += [3.0, 0.0, 0.0]
    return atoms + water


def _contracted(batch, w):
    """dE/dr and dE/dε of E = Σ w · rows, from the gradient arrays."""
    per_pair = np.einsum("paf,pf->pa", batch.position_gradients, w[batch.position_rows])
    gradient = np.zeros((batch.atom_count, 3))
    np.add.at(gradient, batch.position_atoms, per_pair)
    virial = None
    if batch.strain_gradients is not None:
        virial = np.einsum("iabf,if->ab", batch.strain_gradients, w)
    return gradient, virial


@pytest.mark.parametrize("normalise", [True, False])
@pytest.mark.parametrize("case", ["cluster", "cell", "batch", "centres"])
def test_rows_and_their_pullback_equal_the_power_spectrum_gradients(soap, cluster, case, normalise):
    cell = cluster.copy()
    cell.set_cell([7.5, 7.0, 8.0])
    cell.pbc = True
    cell.center()
    frames, kinds, centres = {
        "cluster": ([cluster], ("positions",), None),
        "cell": ([cell], ("positions", "strain"), None),
        "batch": ([cluster, cell, molecule("NH3")], ("positions",), None),
        "centres": (cell, ("positions", "strain"), np.array([0, 2, 5, 9])),
    }[case]
    reference = soap.compute(frames, kinds, normalise=normalise, centres=centres)
    batch = expand(soap, frames, kinds, normalise=normalise, centres=centres)
    assert batch.position_gradients is None and batch.pullback is not None
    np.testing.assert_allclose(batch.values, reference.values, atol=1e-13)
    np.testing.assert_array_equal(batch.numbers, reference.numbers)
    np.testing.assert_array_equal(batch.offsets, reference.offsets)
    w = np.random.default_rng(0).normal(size=reference.values.shape)
    gradient, virial = batch.pullback(w, True, "strain" in kinds)
    expected_gradient, expected_virial = _contracted(reference, w)
    np.testing.assert_allclose(gradient, expected_gradient, atol=1e-12)
    if "strain" in kinds:
        np.testing.assert_allclose(virial, expected_virial, atol=1e-12)
    else:
        assert virial is None


def test_the_strain_pullback_of_a_molecule_is_its_virial(soap, cluster):
    """A molecule has no cell: dE/dε = Σ_j r_j ⊗ dE/dr_j, as the molecular split needs."""
    batch = expand(soap, cluster, ("positions", "strain"))
    w = np.random.default_rng(1).normal(size=batch.values.shape)
    gradient, virial = batch.pullback(w, True, True)
    np.testing.assert_allclose(virial, cluster.positions.T @ gradient, atol=1e-12)


def test_the_expansion_needs_featomic(cluster):
    with pytest.raises(UnsupportedCapabilityError, match="featomic"):
        expand(SOAPDescriptor(["H", "C", "O"], backend="dscribe", **SOAP), cluster)
