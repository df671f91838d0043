# The README's two commands:
#   make run    install fedlora and run a simulated fleet on the embedded model and data
#   make test   install the dev tools and run lint, type checks and the test suite
#   make test-scale  the tests marked scale (100-device runs and covered-elsewhere e2e cases)
#                    that make test leaves out (~20 min)
#   make bench  every benchmark under bench/ (JSON in bench/results/, README table); long
#   make bench-quick  the same at the smaller sizes each bench's --quick documents (< 10 min; 5.8 min 2026-12-02)
VENV ?= .venv
RUN_DIR ?= runs/default
export OMP_NUM_THREADS ?= 2
export TOKENIZERS_PARALLELISM ?= false
# Flower would install app dependencies at run time; everything is installed up front.
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION ?= 1

.PHONY: install install-dev run test test-scale lint typecheck unit clean bench bench-quick

install:
	scripts/install.sh

install-dev:
	scripts/install.sh dev

run: install
	$(VENV)/bin/fedlora simulate --out $(RUN_DIR) --force

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck:
	$(VENV)/bin/mypy

unit:
	$(VENV)/bin/pytest -m "not slow"

test: install-dev lint typecheck
	$(VENV)/bin/pytest -m "not scale" --durations=25

test-scale: install-dev
	$(VENV)/bin/pytest -m scale

bench:
	$(VENV)/bin/python bench/run_all.py

bench-quick:
	$(VENV)/bin/python bench/run_all.py --quick

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
