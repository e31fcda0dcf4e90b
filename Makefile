# Two commands set everything up on a fresh machine (Python 3.10+ and the package index):
#   make quickstart    virtual environment, install, run suites/quickstart.yaml into ./mlflow.db
#   make test          virtual environment, install with test extras, run the tests
#   make bench         kdbench bench: classic loop vs kdbench vs ceiling, results into results/perf/
#   make perf-executors  a suite's wall time: one process, the default local workers, Ray; interleaved, into results/perf/
#   make bench-micro   pytest-benchmark micro-benchmarks, saved to results/perf/micro/ and compared with the last
#   make test-slow     the slow tests (torch.compile on CPU, one job on two gloo processes: minutes), left out of `make test`
#   make device-prep   wheels (.whl/) and a CIFAR-10 subset (.data/) for a GPU machine without network
#   make device-check  scripts/device_check.py on this machine's GPU, results into device-check-out/
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

.PHONY: install quickstart test test-slow bench bench-micro perf-executors device-prep device-check
install: $(VENV)/.installed

quickstart: $(VENV)/.installed
	$(VENV)/bin/kdbench run suites/quickstart.yaml $(ARGS)

# One pytest worker per core (pytest-xdist); a test file stays on one worker, so its module fixtures
# (a Ray cluster, an MLflow server, a trained store) are built once. TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= auto
test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(ARGS)

bench: $(VENV)/.installed
	$(VENV)/bin/kdbench bench --out results/perf/ $(ARGS)

perf-executors: $(VENV)/.installed
	PYTHON=$(VENV)/bin/python scripts/perf_executors.sh $(ARGS)

bench-micro: $(VENV)/.installed
	$(VENV)/bin/python -m pytest benchmarks --benchmark-autosave --benchmark-compare $(ARGS)

test-slow: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m slow $(ARGS)

device-prep: $(VENV)/.installed
	$(VENV)/bin/python scripts/device_check.py prepare $(ARGS)

device-check: $(VENV)/.installed
	$(VENV)/bin/python scripts/device_check.py run --out device-check-out $(ARGS)
