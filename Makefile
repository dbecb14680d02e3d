# Two entry points for a fresh machine:  `make demo`  and  `make test`.
# Both create .venv, install kdcache into it, then run. Re-running skips the install.
#
# Every pip install takes the lock (constraints.txt: the exact versions that were tested), so a
# fresh machine gets the same environment. `make lock` regenerates it from a fresh resolve.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
LOCK   := constraints.txt
PIP    := $(PY) -m pip install -q -c $(LOCK)
# torch and torchvision, at the lock's versions: the registry's CUDA builds, which also run on the
# CPU. (A CPU-only torch wheel next to the registry's torchvision does not work: torchvision's ops
# are built for CUDA torch.) `make lock` resolves with TORCH_LOCK.
TORCH      ?= torch torchvision
TORCH_LOCK ?= torch==2.14.1 torchvision==0.29.1
# Other Triton releases the kernel suite must pass under (interpreter mode), beside the lock's.
TRITON_ALSO ?= 3.9.0
PYTEST_ARGS ?=

.PHONY: install install-dev demo demo-quick test test-all test-kernel-triton bench bench-scale bench-gpu lock clean

# The build tools come from the lock too, and packages are built without pip's build isolation,
# which would fetch the newest setuptools instead of the locked one.
$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip setuptools wheel pybind11

# torch first (the large wheels), then kdcache, then Pillow-SIMD last, since the other packages
# pull plain Pillow in.
$(VENV)/.installed: $(VENV)/bin/activate pyproject.toml $(LOCK)
	$(PIP) $(TORCH)
	$(PIP) --no-build-isolation -e .[demo]
	PIP_CONSTRAINT=$(abspath $(LOCK)) bash tools/install_pillow_simd.sh $(PY)
	touch $@

# The dev extras include the demo's; installing them marks the plain install done too.
$(VENV)/.installed-dev: $(VENV)/bin/activate pyproject.toml $(LOCK)
	$(PIP) $(TORCH)
	$(PIP) --no-build-isolation -e .[dev]
	PIP_CONSTRAINT=$(abspath $(LOCK)) bash tools/install_pillow_simd.sh $(PY)
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
	$(MAKE) --no-print-directory test-kernel-triton

test-all: install-dev
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m "" $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-kernel-triton PYTEST_ARGS='-m ""'

# The kernel and loss tests under each release in TRITON_ALSO, installed beside the venv
# (.triton-VERSION/, first on PYTHONPATH) so the locked Triton stays what everything else uses.
test-kernel-triton: install-dev
	@for v in $(TRITON_ALSO); do \
	  [ -d .triton-$$v/triton ] || $(PY) -m pip install -q --no-deps --target .triton-$$v triton==$$v || exit 1; \
	  echo "kernel and loss tests under Triton $$v:"; \
	  PYTHONPATH=$(CURDIR)/.triton-$$v TRITON_INTERPRET=1 $(PY) -m pytest -q -p no:cacheprovider \
	    tests/test_kernel.py tests/test_losses.py $(PYTEST_ARGS) || exit 1; \
	done

bench: install-dev
	$(PY) benchmarks/loss_bench.py
	$(PY) benchmarks/precompute_bench.py
	$(PY) benchmarks/train_bench.py
	$(PY) benchmarks/storage_bench.py
	$(PY) benchmarks/targets_bench.py
	$(PY) benchmarks/digest_check_bench.py --mixup

# How costs grow with records and shards, and the storage requests each step makes (docs/benchmarks.md,
# "Scale"); SCALE_ARGS='--quick' for a minute's check, the default sweep takes about half an hour here.
SCALE_ARGS ?=
bench-scale: install-dev
	$(PY) benchmarks/scale_bench.py $(SCALE_ARGS)
	$(PY) benchmarks/ranks_bench.py $(RANKS_ARGS)

# The GPU suite (benchmarks/gpu_suite.py): loss, precompute data path and training throughput, written
# as JSON + markdown to BENCH_OUT. It installs nothing, so it runs on a machine set up by hand (the
# device machine: see docs/benchmarks.md and tools/device_prep.sh); the venv's Python when there is one.
BENCH_OUT  ?= bench-gpu-results
BENCH_ARGS ?=
BENCH_PY   ?= $(if $(wildcard $(PY)),$(PY),python3)

bench-gpu:
	$(BENCH_PY) benchmarks/gpu_suite.py --out $(BENCH_OUT) $(BENCH_ARGS)

lock:
	bash tools/lock.sh $(PYTHON) "$(TORCH_LOCK)" $(LOCK)

clean:
	rm -rf $(VENV) kdcache-demo build *.egg-info .triton-*
