# Two entry points for a fresh machine:  `make demo`  and  `make test`.
# Both create .venv, install kdcache into it, then run. Re-running skips the install.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The registry's torch and torchvision (CUDA builds, which also run on the CPU). A CPU-only torch
# wheel next to the registry's torchvision does not work: torchvision's ops are built for CUDA torch.
TORCH  ?= torch torchvision
PYTEST_ARGS ?=

.PHONY: install install-dev demo demo-quick test test-all bench clean

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch first (so the CPU wheel on disk is used where there is one), then kdcache, then
# Pillow-SIMD last, since the other packages pull plain Pillow in.
$(VENV)/.installed: $(VENV)/bin/activate pyproject.toml
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e .[demo]
	bash tools/install_pillow_simd.sh $(PY)
	touch $@

# The dev extras include the demo's; installing them marks the plain install done too.
$(VENV)/.installed-dev: $(VENV)/bin/activate pyproject.toml
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e .[dev]
	bash tools/install_pillow_simd.sh $(PY)
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(VENV)/bin/kdcache demo --out kdcache-demo

demo-quick: install
	$(VENV)/bin/kdcache demo --out kdcache-demo --quick

test: install-dev
	$(VENV)/bin/kdcache info
	TRITON_INTERPRET=1 $(PY) -m pytest -q $(PYTEST_ARGS)

test-all: install-dev
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m "" $(PYTEST_ARGS)

bench: install-dev
	$(PY) benchmarks/loss_bench.py
	$(PY) benchmarks/precompute_bench.py
	$(PY) benchmarks/train_bench.py

clean:
	rm -rf $(VENV) kdcache-demo build *.egg-info
