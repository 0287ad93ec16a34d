# Two commands on a fresh machine (each creates .venv on first use):
#   make run    distil MNIST-5k (embedded), evaluate, print the result beside the baselines
#   make test   run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: run test test-fast bench gpu-check clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/ddray distill --baselines

test: $(VENV)/.installed
	$(PY) -m pytest -q

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m 'not slow'

bench: $(VENV)/.installed
	$(PY) bench/bench_core.py

# GPU readiness (bench/gpu_check.py): CUDA tests, core on the GPU, shared-GPU Ray run, DC/DM/MTT on CUDA
gpu-check: $(VENV)/.installed
	PYTHON=$(PY) bench/gpu_check.sh

clean:
	rm -rf $(VENV) runs mlflow.db .pytest_cache
