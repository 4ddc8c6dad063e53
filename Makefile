# The README's commands. `make test` and `make demo` set everything up on a fresh machine:
# a virtualenv in .venv with torch, triton and the test dependencies, and fusedformer installed
# editable (its CUDA extension built when nvcc is found). A torch that is already installed
# (a GPU machine's CUDA build) is kept: the venv then sees the system packages and installs
# nothing over them.

PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.fusedformer-installed
PYTEST_ARGS ?=
# make gpu-check and make bench write under $(OUT)
OUT ?= gpu-check-out

# CPU machines pin what the triton interpreter needs; GPU machines keep what they have.
TORCH_PIN := torch==2.13.0
CPU_PINS := triton==3.6.0 "numpy<2.3"
TEST_DEPS := pytest pytest-timeout pybind11 ninja "transformers>=4.50" expecttest

.PHONY: test demo bench lint gpu-check info clean

$(STAMP): setup.py pyproject.toml
	@if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
	  echo "fusedformer: keeping the installed torch $$($(PYTHON) -c 'import torch; print(torch.__version__)')"; \
	  $(PYTHON) -m venv --system-site-packages $(VENV); \
	  missing=$$($(VPY) -c "import importlib.util as u; print(' '.join(p for p, m in [('pytest','pytest'), ('pytest-timeout','pytest_timeout'), ('pybind11','pybind11'), ('ninja','ninja'), ('transformers','transformers'), ('expecttest','expecttest')] if u.find_spec(m) is None))"); \
	  if [ -n "$$missing" ]; then $(VPY) -m pip install -q $$missing || echo "fusedformer: could not install $$missing (offline?); tests needing them skip"; fi; \
	else \
	  $(PYTHON) -m venv $(VENV); \
	  $(VPY) -m pip install -q --upgrade pip "setuptools>=70" wheel; \
	  $(VPY) -m pip install -q $(TORCH_PIN) $(CPU_PINS) $(TEST_DEPS); \
	fi
	$(VPY) -m pip install -q --no-build-isolation --no-deps -e .
	@touch $(STAMP)

test: $(STAMP)
	$(VPY) -m pytest tests $(PYTEST_ARGS)

demo: $(STAMP)
	$(VPY) -m fusedformer demo

# Every op against torch and the other libraries (quick preset; BENCH_ARGS="--full" for more).
BENCH_ARGS ?= --quick
bench: $(STAMP)
	$(VPY) -m fusedformer bench $(BENCH_ARGS) --out $(OUT)/bench

# The GPU check within GPU_CHECK_SECONDS (default 420): probe, build, parity, GPU tests, the headline
# benchmark, then the rest as time allows; summary.md, results.json, junit.xml, check.log under $(OUT).
gpu-check: $(STAMP)
	$(VPY) benchmarks/gpu_check.py --out $(OUT)

info: $(STAMP)
	$(VPY) -m fusedformer info

lint: $(STAMP)
	$(VPY) -m pip install -q ruff && $(VPY) -m ruff check python kernels tests benchmarks setup.py

clean:
	rm -rf build $(VENV) python/fusedformer/_C*.so python/*.egg-info
