# `make test` and `make bench` each set everything up in .venv on a fresh machine, then run.
# torch: a torch already importable by python3 (say, your CUDA build) is reused through
# --system-site-packages and never replaced. Otherwise TORCH_SPEC is installed; on a machine
# without an NVIDIA GPU it is pinned to a release whose CPU wheel is commonly cached locally.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.runlora-installed
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
BENCH_ARGS ?=

.PHONY: test bench lint setup clean
setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m runlora bench $(BENCH_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m ruff format --check src tests benchmarks examples
	$(VENV)/bin/lint-imports

# The GPU check (benchmarks/gpu_check.sh, then benchmarks/gpu_check.py): without an NVIDIA GPU it
# says so in one line and exits 2 before any set-up; QUICK=1 (or gpu-check-quick): ~2 minutes.
GPU_CHECK_ARGS ?=
.PHONY: gpu-check gpu-check-quick
gpu-check:
	@PYTHON="$(PYTHON)" VENV="$(VENV)" bash benchmarks/gpu_check.sh $(if $(QUICK),--quick) $(GPU_CHECK_ARGS)

gpu-check-quick:
	@PYTHON="$(PYTHON)" VENV="$(VENV)" bash benchmarks/gpu_check.sh --quick $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
