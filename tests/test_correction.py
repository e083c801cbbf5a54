"""Tests of deltaml.correction: the correction protocol and record comparison."""

from __future__ import annotations

import numpy as np

from deltaml.correction import Correction, ZeroCorrection, record_differences


def test_zero_correction_is_zero_with_the_right_shapes(co2_crystal):
    result = ZeroCorrection().predict(co2_crystal, forces=True, stress=True)
    assert result.energy == 0.0
    assert result.forces.shape == (len(co2_crystal), 3) and not result.forces.any()
    assert result.stress.shape == (6,) and not result.stress.any()
    assert result.energy_uncertainty is None  # no uncertainty, not a zero one
    lazy = ZeroCorrection().predict(co2_crystal, forces=False, stress=False)
    assert lazy.forces is None and lazy.stress is None


def test_protocol_is_checked_structurally():
    assert isinstance(ZeroCorrection(), Correction)
    assert not isinstance(object(), Correction)


def test_identical_records_have_no_differences():
    record = {"a": 1.0, "b": {"c": [1, 2, "x"], "d": None}, "engine_version": "1"}
    assert record_differences(record, dict(record)) == []


def test_differences_are_listed_with_their_path():
    expected = {"dispersion": {"parameters": {"a1": 0.4145, "s8": 1.2177}, "damping": "d3bj"}}
    actual = {"dispersion": {"parameters": {"a1": 0.4289, "s8": 1.2177}, "damping": "d3zero"}}
    assert record_differences(expected, actual) == [
        "dispersion.damping: 'd3bj' != 'd3zero'",
        "dispersion.parameters.a1: 0.4145 != 0.4289",
    ]


def test_missing_keys_and_list_lengths_are_differences():
    assert record_differences({"a": 1}, {"b": 1}) == ["a: 1 != <missing>", "b: <missing> != 1"]
    assert record_differences({"x": [1, 2]}, {"x": [1, 2, 3]}) == ["x: [1, 2] != [1, 2, 3]"]


def test_float_tolerance_and_booleans():
    assert record_differences({"x": 1.0}, {"x": 1.0 + 1e-15}) == []
    assert record_differences({"x": 1.0}, {"x": 1.0 + 1e-9}) != []
    assert record_differences({"atm": True}, {"atm": 1}) != []  # a flag is not a number
    assert record_differences({"n": np.float64(2.0)}, {"n": 2}) == []


def test_engine_versions_are_not_compared():
    assert record_differences({"engine_version": "0.7"}, {"engine_version": "0.8"}) == []
