# Two commands do all set-up on a fresh machine:
#   make demo   installs what the demo needs (torch, the package, ONNX Runtime CPU), then runs it
#   make test   adds the test tools (torch-scatter, pytest, ruff, ASE, Ray, ...), then runs lint,
#               the whole test suite, and the onnxruntime-gpu wheel's check in an environment of its own
# torch is pinned and installed first (an unpinned torch pulls gigabytes of
# CUDA wheels); torch-scatter builds from source against it, without build
# isolation, afterwards (about 4 minutes, make test only).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
ORT_GPU_VENV ?= .venv-ort-gpu

.PHONY: install install-dev demo test lint clean gpu-check ort-gpu-check

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -e ".[cpu]"
	touch $@

$(VENV)/.dev-installed: $(VENV)/.installed
	$(PIP) install -q --no-build-isolation torch-scatter
	$(PIP) install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.dev-installed

demo: install
	$(VENV)/bin/painn-batch run examples/emt_examples.h5 --output out/emt_examples.out.h5 --json --overwrite
	$(VENV)/bin/painn-batch report out/emt_examples.out.h5 --input examples/emt_examples.h5

lint: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest
	$(MAKE) ort-gpu-check

# The real onnxruntime-gpu wheel, alone (what `pip install painn-export[gpu]` gives a GPU user),
# on this machine without CUDA: --device auto says why it runs on the CPU, --device cuda is
# refused with ONNX Runtime's reason, and the numbers equal plain onnxruntime's bitwise.
$(ORT_GPU_VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(ORT_GPU_VENV)
	$(ORT_GPU_VENV)/bin/python -m pip install -q --upgrade pip setuptools wheel
	$(ORT_GPU_VENV)/bin/python -m pip install -q torch==$(TORCH_VERSION)
	$(ORT_GPU_VENV)/bin/python -m pip install -q -e ".[gpu]" pytest
	touch $@

ort-gpu-check: install $(ORT_GPU_VENV)/.installed
	$(VENV)/bin/painn-batch run examples/emt_examples.h5 --output out/ort-gpu/plain.h5 --device cpu --overwrite -q
	PAINN_PLAIN_ORT_OUTPUT=out/ort-gpu/plain.h5 $(ORT_GPU_VENV)/bin/python -m pytest -p no:cacheprovider tests/test_ort_gpu_wheel.py

# On a machine with an NVIDIA GPU and its own PyTorch (2.11 or newer), no
# registry: installs nothing but the wheels in $(WHEELS) (made elsewhere with
# `pip download`, see docs/gpu.md, "The GPU check"), into $(GPU_SITE), and never
# touches torch. Writes out/gpu-check/gpu_check.{json,md}.
WHEELS ?= .whl
GPU_SITE ?= /tmp/painn-gpu-site
GPU_CHECK_ARGS ?= --device cuda
gpu-check:
	@if ls $(WHEELS)/*.whl >/dev/null 2>&1; then \
		$(PYTHON) -m pip install -q --no-index --no-deps --no-compile --upgrade --target $(GPU_SITE) $(WHEELS)/*.whl; fi
	PYTHONPATH=$(GPU_SITE):$(CURDIR) $(PYTHON) scripts/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) $(ORT_GPU_VENV) out
