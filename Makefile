# Two commands on a fresh machine (each creates .venv on first use):
#   make run    distil MNIST-5k (embedded), evaluate, print the result beside the baselines
#   make test   run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: run test test-fast test-e2e e2e-deps bench gpu-check clean

# tests/e2e run PostgreSQL from Debian's package (the S3 and MLflow servers come
# with the dev extra): installed once, skipped when already there.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
e2e-deps:
	@if ! command -v initdb >/dev/null 2>&1 && [ -z "$$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null)" ]; then \
		echo "tests/e2e: installing PostgreSQL (apt-get install postgresql)"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq postgresql >/dev/null; \
	fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# --compile: 500 meta-steps repay its minute of compiling (README, "The command line")
run: $(VENV)/.installed
	$(VENV)/bin/ddray distill --baselines --compile

# two pytest-xdist workers, a test module each at a time (tests/conftest.py: tests/e2e as one, the modules with
# slow tests first): most tests wait on processes and servers, so two share 2 cores well
XDIST := -n 2 --dist loadfile --no-loadscope-reorder

# the whole suite: pyproject's addopts leave the slow tests out of a bare `pytest`
test: $(VENV)/.installed e2e-deps
	$(PY) -m pytest -q $(XDIST) -m 'slow or not slow'

test-e2e: $(VENV)/.installed e2e-deps
	$(PY) -m pytest -q -m e2e

test-fast: $(VENV)/.installed e2e-deps
	$(PY) -m pytest -q $(XDIST) -m 'not slow'

bench: $(VENV)/.installed
	$(PY) bench/bench_core.py

# GPU readiness (bench/gpu_check.py): CUDA tests, core on the GPU, shared-GPU Ray run, DC/DM/MTT on CUDA
gpu-check: $(VENV)/.installed
	PYTHON=$(PY) bench/gpu_check.sh

clean:
	rm -rf $(VENV) runs mlflow.db .pytest_cache
