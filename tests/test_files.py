"""Atomic writes: a failed write leaves the old file and no temporary file."""

from __future__ import annotations

import pytest
from ase.build import molecule
from ase.io import read, write

from deltaml.files import atomic_path, write_text_atomic


def test_a_failed_write_leaves_the_old_file_and_nothing_else(tmp_path):
    target = write_text_atomic(tmp_path / "history.json", "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.json"]


def test_the_temporary_file_keeps_the_suffix_so_formats_are_inferred(tmp_path):
    target = tmp_path / "relaxed.extxyz"
    with atomic_path(target) as tmp:
        assert tmp.suffix == ".extxyz" and tmp.parent == tmp_path
        write(tmp, molecule("H2O"))  # format from the name
    assert len(read(target)) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["relaxed.extxyz"]
