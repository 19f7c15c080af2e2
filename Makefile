# The two commands of the README: `make demo` and `make test`. Each sets itself up on a fresh
# machine: a .venv with the pinned dependencies (torch==2.13.0 CPU build), the package installed
# editable so the compiled kernels sit in the source tree.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: all setup build demo test clean bench

all: setup

$(STAMP): requirements.txt pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

# Rebuild the kernels when their sources changed (cheap when nothing did).
build: setup
	$(PY) setup.py -q build_ext --inplace

demo: build
	$(PY) -m megatron_sc2.cli demo --out build/demo

test: build
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

clean:
	rm -rf build/ *.egg-info megatron_sc2/ops/*.so
