# Two commands do all set-up on a fresh machine:
#   make demo   installs, then runs the main job end to end
#   make test   installs, then runs lint and the whole test suite
# torch is pinned and installed first (an unpinned torch pulls gigabytes of
# CUDA wheels); torch-scatter builds from source against it, without build
# isolation, afterwards.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0

.PHONY: install demo test lint clean gpu-check

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q --no-build-isolation torch-scatter
	$(PIP) install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/painn-batch run examples/emt_examples.h5 --output out/emt_examples.out.h5 --json
	$(VENV)/bin/painn-batch report out/emt_examples.out.h5 --input examples/emt_examples.h5

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest

# On a machine with an NVIDIA GPU and its own PyTorch (2.11 or newer), no
# registry: installs nothing but the wheels in $(WHEELS) (made elsewhere with
# `pip download`, see the README's "GPU check"), into $(GPU_SITE), and never
# touches torch. Writes out/gpu-check/gpu_check.{json,md}.
WHEELS ?= .whl
GPU_SITE ?= /tmp/painn-gpu-site
GPU_CHECK_ARGS ?= --device cuda
gpu-check:
	@if ls $(WHEELS)/*.whl >/dev/null 2>&1; then \
		$(PYTHON) -m pip install -q --no-index --no-deps --no-compile --upgrade --target $(GPU_SITE) $(WHEELS)/*.whl; fi
	PYTHONPATH=$(GPU_SITE):$(CURDIR) $(PYTHON) scripts/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) out
