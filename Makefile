# Two commands for a fresh machine:  `make run` (start the server)  ·  `make test` (run every test)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test bench cluster clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

run: $(VENV)/.installed
	$(PY) run.py serve --dev

test: $(VENV)/.installed
	$(PY) -m pytest

# PostgreSQL, Redis, three nodes and HAProxy on http://127.0.0.1:8080 (deploy/local-cluster.sh)
cluster: $(VENV)/.installed
	PY=$(PY) deploy/local-cluster.sh

bench: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) bench/run_all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
