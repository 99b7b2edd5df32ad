# Sidegate developer entry points. `make demo` and `make test` are the two set-up commands.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: venv native deps test test-fast lint demo bench e2e-kind clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,lint,bench,native]'
	touch $@

venv: $(VENV)/.installed

# The data plane's per-statement modules compiled with mypyc from the same sources (setup.py);
# rebuilt when one changed. Without a C compiler the Python modules run, and the tests say so.
native: venv
	@$(PY) proxy/sidegate_proxy/_native.py || { echo "compiling the data plane with mypyc (about a minute)"; \
	  SIDEGATE_NATIVE=1 $(PY) setup.py -q build_ext --inplace >build-native.log 2>&1 \
	  || { tail -n 20 build-native.log; echo "native build failed: the data plane runs as Python" >&2; }; }

# System packages the tests use (PostgreSQL, PgBouncer, nginx): installed only when missing.
deps:
	@bash hack/install-deps.sh

# the whole suite on the compiled data plane, then the data plane's own tests on its Python source
test: venv native deps controlplane
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)
	SIDEGATE_PURE_PYTHON=1 $(PY) -m pytest -q -p no:cacheprovider $(PURE_TESTS) $(PYTEST_ARGS)

PURE_TESTS := tests/test_pgwire.py tests/test_pgproxy.py tests/test_pgproxy_fuzz.py tests/test_pgproxy_masking.py \
  tests/test_pgproxy_masking_precision.py tests/test_pgproxy_upstream_tls.py tests/test_masking.py \
  tests/test_masking_joined.py tests/test_detectors.py tests/test_native.py

test-fast: venv
	$(PY) -m pytest -q -m "not k8s and not slow" $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check proxy operator tests bench setup.py
	$(VENV)/bin/mypy

demo: venv native deps
	$(PY) -m sidegate_proxy.demo

bench: venv native deps controlplane
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info build-native.log proxy/sidegate_proxy/*.so proxy/sidegate_proxy/_native_build.json

include Makefile.controlplane
-include Makefile.e2e
