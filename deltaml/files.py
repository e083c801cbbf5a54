"""Writing files so that a kill never leaves half of one: the one atomic-write idiom.

Expensive results (labels exported, model files, relaxed structures, histories of
active learning) are written to a temporary file beside the target and renamed
onto it (``os.replace``, atomic on POSIX within one file system); a reader sees
either the old file or the new one, never a truncated one, and a failed write
leaves no temporary file behind.

Data flow: the bottom layer, beside :mod:`deltaml.errors`; it imports nothing of
deltaml.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "write_text_atomic"]


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path to write, renamed onto ``path`` when the block succeeds.

    The temporary file lies in the same folder and ends with the same suffix, so
    that writers which infer a format from the name (``ase.io.write``) pick the
    right one. On an exception it is removed and ``path`` is left as it was.

    Examples
    --------
    >>> with atomic_path("out.extxyz") as tmp:
    ...     ase.io.write(tmp, frames, format="extxyz")
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
