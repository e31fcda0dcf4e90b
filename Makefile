# Two commands set everything up on a fresh machine (Python 3.10+ and the package index):
#   make quickstart    virtual environment, install, run suites/quickstart.yaml into ./mlflow.db
#   make test          virtual environment, install with test extras, run the tests
#   make bench         kdbench bench: classic loop vs kdbench vs ceiling, results into results/perf/
#   make perf-executors  a suite's wall time in-process and on Ray (two one-thread workers), into results/perf/
#   make bench-micro   pytest-benchmark micro-benchmarks, saved to results/perf/micro/ and compared with the last
VENV ?= .venv
PYTHON ?= python3
# Where datasets live: ../shared/data beside a kdbench checkout when it exists, else ./data.
KDBENCH_DATA ?= $(abspath $(if $(wildcard ../shared/data),../shared/data,data))
export KDBENCH_DATA

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e ".[test]"
	touch $@

.PHONY: install quickstart test bench bench-micro perf-executors
install: $(VENV)/.installed

quickstart: $(VENV)/.installed
	$(VENV)/bin/kdbench run suites/quickstart.yaml $(ARGS)

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q $(ARGS)

bench: $(VENV)/.installed
	$(VENV)/bin/kdbench bench --out results/perf/ $(ARGS)

perf-executors: $(VENV)/.installed
	PYTHON=$(VENV)/bin/python scripts/perf_executors.sh $(ARGS)

bench-micro: $(VENV)/.installed
	$(VENV)/bin/python -m pytest benchmarks --benchmark-autosave --benchmark-compare $(ARGS)
