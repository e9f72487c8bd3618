# Two commands set everything up on a fresh machine:
#   make demo   create .venv, install nanoseek, run the whole pipeline
#   make test   create .venv, install with the dev extras, run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch first, pinned to the version whose CPU wheel is on the machine, so that
# nothing later resolves torch to a CUDA build.
TORCH := torch==2.13.0

.PHONY: demo test venv dev clean browser

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

# The web-chat test drives Debian's Chromium with Playwright (never a downloaded browser).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) ; } || \
	  echo "note: chromium not installed; the web-page test will be skipped"

test: $(VENV)/.dev-installed browser
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
