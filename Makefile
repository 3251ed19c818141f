# Two commands do everything on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint format bench clean

# The stamp depends on pyproject.toml so a changed dependency list reinstalls.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m retina_sweep.demo

test: $(STAMP)
	$(PY) -m ruff check retina_sweep hydra_plugins tests
	$(PY) -m ruff format --check retina_sweep hydra_plugins tests
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check retina_sweep hydra_plugins tests

format: $(STAMP)
	$(PY) -m ruff format retina_sweep hydra_plugins tests
	$(PY) -m ruff check --fix retina_sweep hydra_plugins tests

bench: $(STAMP)
	$(PY) -m retina_sweep.bench

clean:
	rm -rf $(VENV) build *.egg-info
