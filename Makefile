# Two commands set everything up on a fresh machine:
#   make demo   create .venv, install nanoseek, run the whole pipeline
#   make test   create .venv, install with the dev extras, run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch first, pinned to the version whose CPU wheel is on the machine, so that
# nothing later resolves torch to a CUDA build.
TORCH := torch==2.13.0

.PHONY: demo test venv dev clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.dev-installed: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed
dev: $(VENV)/.dev-installed

demo: $(VENV)/.installed
	$(BIN)/nanoseek demo $(DEMO_ARGS)

test: $(VENV)/.dev-installed
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
