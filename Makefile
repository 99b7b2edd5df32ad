# Sidegate developer entry points. `make demo` and `make test` are the two set-up commands.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: venv deps test test-fast lint demo bench e2e-kind clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,lint,bench]'
	touch $@

venv: $(VENV)/.installed

# System packages the tests use (PostgreSQL, PgBouncer, nginx): installed only when missing.
deps:
	@bash hack/install-deps.sh

test: venv deps controlplane
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -q -m "not k8s and not slow" $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check proxy operator tests bench
	$(VENV)/bin/mypy

demo: venv deps
	$(PY) -m sidegate_proxy.demo

bench: venv deps controlplane
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info

include Makefile.controlplane
-include Makefile.e2e
