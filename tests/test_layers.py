"""The layer rule of STYLE.md, checked from the import statements of deltaml/.

A module imports only from its own layer or earlier ones. A module that is not in
:data:`LAYERS` fails the test: place it in the table when adding it. ``__init__``
re-exports everything and is exempt; importing the package root (``from deltaml
import ...``) counts as importing the top layer, because ``__init__`` imports every
module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import deltaml

PACKAGE_DIR = Path(deltaml.__file__).resolve().parent

#: Layers in data-flow order (STYLE.md, "Module layout"). ``units`` is listed in the
#: structures row of STYLE.md.
LAYERS: list[list[str]] = [
    ["errors", "files"],
    ["structures", "units", "crystals"],
    ["baseline", "dispersion", "correction", "reference", "reference_cp2k"],
    ["store", "dataset"],
    ["labelling"],
    ["descriptors", "expansion", "intermolecular"],
    [
        "kernels",
        "model_files",
        "offsets",
        "model_io",
        "sampling",
        "prior_width",
        "calibration",
        "model",
        "selection",
    ],
    ["calculator"],
    ["evaluation", "simulation"],
    ["active", "ranking"],
    ["cli", "__main__"],
]
LAYER_OF = {name: rank for rank, names in enumerate(LAYERS) for name in names}
#: Importing the package root pulls in every module: it ranks with the last layer.
ROOT_RANK = len(LAYERS) - 1


def package_modules() -> list[str]:
    """Dotted names (relative to deltaml) of every module file in the package."""
    names = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = path.relative_to(PACKAGE_DIR).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join(parts))
    return names


def imported_modules(source: str, module: str, submodules: set[str]) -> set[str]:
    """deltaml modules imported by ``source`` (anywhere, functions included).

    Returns names relative to the package; ``""`` stands for the package root.
    """
    package = module.split(".")[:-1]  # the package holding ``module``
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "deltaml" or alias.name.startswith("deltaml."):
                    found.add(alias.name.removeprefix("deltaml").lstrip("."))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join([*base, *([node.module] if node.module else [])])
            elif node.module == "deltaml" or (node.module or "").startswith("deltaml."):
                target = node.module.removeprefix("deltaml").lstrip(".")
            else:
                continue
            # ``from deltaml import errors`` imports the submodule ``errors``.
            for alias in node.names:
                candidate = f"{target}.{alias.name}" if target else alias.name
                found.add(candidate if candidate in submodules else target)
    return found


def layer_violations(module: str, imports: set[str]) -> list[str]:
    """Imports of ``module`` that point to a later layer."""
    rank = LAYER_OF[module]
    bad = []
    for target in sorted(imports):
        if target == module:
            continue
        target_rank = ROOT_RANK if target == "" else LAYER_OF.get(target.split(".")[0])
        if target_rank is None:
            bad.append(f"{module} imports deltaml.{target}, which is in no layer")
        elif target_rank > rank:
            bad.append(
                f"{module} (layer {rank}) imports deltaml{'.' if target else ''}{target} "
                f"(layer {target_rank})"
            )
    return bad


MODULES = [m for m in package_modules() if m != ""]
SUBMODULES = set(MODULES)


def test_package_has_the_foundation_modules():
    assert {"errors", "structures", "baseline", "dispersion", "calculator", "cli"} <= SUBMODULES


@pytest.mark.parametrize("module", MODULES)
def test_module_is_placed_in_a_layer(module):
    assert module in LAYER_OF, (
        f"deltaml/{module.replace('.', '/')}.py is in no layer: add it to LAYERS in "
        "tests/test_layers.py (and to STYLE.md's table)"
    )


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_only_earlier_layers(module):
    if module not in LAYER_OF:
        pytest.fail(f"deltaml.{module} is in no layer (see test_module_is_placed_in_a_layer)")
    path = PACKAGE_DIR.joinpath(*module.split(".")).with_suffix(".py")
    imports = imported_modules(path.read_text(encoding="utf-8"), module, SUBMODULES)
    assert layer_violations(module, imports) == []


def test_errors_imports_nothing_from_the_package():
    source = (PACKAGE_DIR / "errors.py").read_text(encoding="utf-8")
    assert imported_modules(source, "errors", SUBMODULES) == set()


# -- the checker itself -----------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from deltaml.errors import ParameterError", {"errors"}),
        ("import deltaml.calculator", {"calculator"}),
        ("import deltaml.calculator as c", {"calculator"}),
        ("from deltaml import errors, structures", {"errors", "structures"}),
        ("from deltaml import __version__", {""}),
        ("from . import calculator", {"calculator"}),
        ("from .calculator import DeltaCalculator", {"calculator"}),
        ("def f():\n    from deltaml.cli import main\n", {"cli"}),
        ("import numpy\nfrom ase import Atoms\nfrom deltaml_extra import x", set()),
    ],
)
def test_imported_modules_recognises_every_form(source, expected):
    assert imported_modules(source, "dispersion", SUBMODULES) == expected


def test_layer_violations_detects_upward_and_unknown_imports():
    assert layer_violations("dispersion", {"errors", "structures", "baseline"}) == []
    assert layer_violations("dispersion", {"calculator"}) == [
        f"dispersion (layer 2) imports deltaml.calculator (layer {LAYER_OF['calculator']})"
    ]
    assert layer_violations("structures", {""}) == [
        f"structures (layer 1) imports deltaml (layer {ROOT_RANK})"
    ]
    assert layer_violations("errors", {"structures"}) == [
        "errors (layer 0) imports deltaml.structures (layer 1)"
    ]
    assert layer_violations("model", {"mystery"}) == [
        "model imports deltaml.mystery, which is in no layer"
    ]
    assert layer_violations("cli", {"", "calculator", "errors"}) == []


# -- public names -----------------------------------------------------------------


def test_all_names_exist():
    missing = [name for name in deltaml.__all__ if not hasattr(deltaml, name)]
    assert missing == []


def test_all_has_no_duplicates_and_no_private_names():
    assert len(deltaml.__all__) == len(set(deltaml.__all__))
    assert [n for n in deltaml.__all__ if n.startswith("_") and n != "__version__"] == []


@pytest.mark.parametrize("module", MODULES)
def test_module_all_names_exist(module):
    mod = __import__(f"deltaml.{module}", fromlist=["_"])
    for name in getattr(mod, "__all__", []):
        assert hasattr(mod, name), f"deltaml.{module}.__all__ names missing {name!r}"
