# Quick start: `make demo` (install, run the demo) and `make test` (install, lint, test).
# Python 3.11 where available (xtb-python has wheels up to 3.11 only).
PYTHON ?= $(shell command -v python3.11 2>/dev/null || echo python3)
VENV ?= .venv
BIN := $(VENV)/bin
# OpenMP in tblite: one thread per core is best on small machines.
export OMP_NUM_THREADS ?= 2
export OMP_STACKSIZE ?= 512M

.PHONY: demo test lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/python examples/demo_delta.py --out out/demo

lint: $(VENV)/.installed-test
	$(BIN)/ruff check deltaml tests examples benchmarks data
	$(BIN)/ruff format --check deltaml tests examples benchmarks data

test: lint
	$(BIN)/python -m pytest

format: $(VENV)/.installed-test
	$(BIN)/ruff check --fix deltaml tests examples benchmarks data
	$(BIN)/ruff format deltaml tests examples benchmarks data

$(VENV)/.installed-bench: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	touch $@

bench: $(VENV)/.installed-bench
	$(BIN)/python benchmarks/bench_terms.py
	$(BIN)/python benchmarks/bench_periodic_consistency.py
	$(BIN)/python benchmarks/bench_labelling.py
	$(BIN)/python benchmarks/bench_learning_curve.py
	$(BIN)/python benchmarks/bench_model_scaling.py
	$(BIN)/python benchmarks/bench_gap.py

clean:
	rm -rf $(VENV) out build *.egg-info .pytest_cache .ruff_cache
