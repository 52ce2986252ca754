# silofed: the two commands. Everything runs inside .venv, created on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.silofed-installed
export FLWR_TELEMETRY_ENABLED ?= 0

.PHONY: demo test test-all bench bench-quick lint clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "silofed needs Python >= 3.11 (flwr 1.41 and pandas 3 do); set PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first: this exact version is the CPU build; any other request may pull a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/silofed simulate --out runs/demo --overwrite

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

test-all: $(STAMP) lint
	$(BIN)/python -m pytest -q -m ""

# Benchmarks on real data and against baselines; regenerate docs/benchmarks.md and .json.
bench: $(STAMP)
	$(BIN)/python -m bench

bench-quick: $(STAMP)
	$(BIN)/python -m bench --quick

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

clean:
	rm -rf runs .pytest_cache
