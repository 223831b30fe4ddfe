# `make demo`, `make test` and `make test-all` each set up everything on a fresh machine.
# test: the quick suite (unit tests, no end-to-end runs); test-all: everything, including the
# slow end-to-end experiment runs and the notebooks in colabs/ (what CI runs).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all lint bench clean

$(STAMP): setup.cfg
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,imagenet,convert]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m experiments.flowar_imagenet --config digits --workdir runs/demo_flowar

lint: $(STAMP)
	$(VENV)/bin/ruff check arjax experiments tests benchmarks

test: $(STAMP) lint
	$(PY) -m pytest -q -x -n 2 --durations=15

test-all: $(STAMP) lint
	$(PY) -m pytest -q -n 2 -m "slow or not slow" --durations=25

bench: $(STAMP)
	$(PY) -m benchmarks.llamagen_sampling

clean:
	rm -rf $(VENV) runs .pytest_cache
