"""Helpers shared by the benchmark scripts: machine record, JSON output, tables.

Not part of the deltaml package; the scripts in ``benchmarks/`` import it by
file name (Python puts the script's folder first on ``sys.path``).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import warnings
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from deltaml.files import write_text_atomic

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"

#: Distributions whose versions change the numbers or the timings.
_PACKAGES = ("deltaml", "tblite", "dftd3", "xtb", "ase", "numpy", "scipy")

#: Thread-count variables read by the OpenMP/BLAS runtimes under tblite and simple-dftd3.
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_STACKSIZE")


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def _git_state() -> dict[str, Any]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "deltaml"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "deltaml_modified": None}
    return {"commit": commit, "deltaml_modified": bool(dirty)}


def machine_info() -> dict[str, Any]:
    """What the timings depend on: CPU, thread settings, package versions, git commit.

    Returns
    -------
    dict
        JSON-serialisable record.
    """
    versions: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not available on every platform
        usable = None
    return {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_count_usable": usable,
        "threads": {name: os.environ.get(name) for name in _THREAD_VARIABLES},
        "versions": versions,
        "git": _git_state(),
    }


def warn_if_threads_unset() -> None:
    """Timings depend on the OpenMP thread count: say so when it is left to the runtime."""
    if os.environ.get("OMP_NUM_THREADS") is None:
        warnings.warn(
            "OMP_NUM_THREADS is not set: tblite and simple-dftd3 use as many threads as "
            "the OpenMP runtime picks; set it (e.g. OMP_NUM_THREADS=2) for comparable timings",
            RuntimeWarning,
            stacklevel=2,
        )


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as indented JSON, atomically (:func:`deltaml.files.write_text_atomic`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (numbers already formatted by the caller)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    separator = "| " + " | ".join("-" * w for w in widths) + " |"
    return "\n".join([line(cells[0]), separator, *(line(row) for row in cells[1:])])
