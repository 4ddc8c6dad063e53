# The README's commands. `make test` and `make demo` set everything up on a fresh machine:
# a virtualenv in .venv with torch, triton and the test dependencies, and fusedformer installed
# editable (its CUDA extension built when nvcc is found). A torch that is already installed
# (a GPU machine's CUDA build) is kept: the venv then sees the packages of $(PYTHON) and installs
# nothing over them.

PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.fusedformer-installed
PYTEST_ARGS ?=
# make gpu-check and make bench write under $(OUT)
OUT ?= gpu-check-out
# the install pipes pip through a filter: its exit status must survive the pipe
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c

# CPU machines pin what the triton interpreter needs; GPU machines keep what they have. The CPU
# build of torch by its local version (+cpu): a plain torch==2.13.0 from PyPI is the CUDA build
# on Linux. pip looks for it in its configured indexes first, then in PyTorch's CPU index.
TORCH_VERSION := 2.13.0
CPU_BUILD := $(if $(filter Linux,$(shell uname -s)),+cpu)
TORCH_PIN := torch==$(TORCH_VERSION)$(CPU_BUILD)
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
CPU_PINS := triton==3.6.0 "numpy<2.3"
TEST_DEPS ?= pytest pytest-timeout pybind11 ninja "transformers>=4.50" expecttest
# what `pip install --no-build-isolation -e .` needs in the venv (pyproject's build-system.requires);
# Python 3.11's venv seeds setuptools 65 without `wheel`, which cannot build an editable install
BUILD_DEPS := "setuptools>=70.1" wheel pybind11 ninja

.PHONY: venv test test-oldest demo bench lint gpu-check info clean

$(STAMP): setup.py pyproject.toml
	@if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
	  kept=$$($(PYTHON) -c 'import torch; print(torch.__version__)'); \
	  echo "fusedformer: keeping the installed torch $$kept"; \
	  $(PYTHON) -m venv --system-site-packages $(VENV); \
	  $(PYTHON) tools/keep_site_packages.py $(VENV); \
	  [ "$$($(VPY) -c 'import torch; print(torch.__version__)')" = "$$kept" ] || \
	    { echo "fusedformer: the new venv does not see the kept torch $$kept"; exit 1; }; \
	  echo "torch==$$kept" > $(VENV)/kept-torch.txt; \
	  $(VPY) -m pip install -q -c $(VENV)/kept-torch.txt $(BUILD_DEPS) || \
	    { echo "fusedformer: cannot install the build requirements $(BUILD_DEPS)"; exit 1; }; \
	  $(if $(strip $(TEST_DEPS)),$(VPY) -m pip install -q -c $(VENV)/kept-torch.txt $(TEST_DEPS) || \
	    echo "fusedformer: could not install $(TEST_DEPS) (offline?); tests needing them skip";) \
	else \
	  $(PYTHON) -m venv $(VENV); \
	  $(VPY) -m pip install -q --upgrade pip $(BUILD_DEPS); \
	  $(VPY) -m pip install -q "$(TORCH_PIN)" 2>/dev/null || \
	    $(VPY) -m pip install -q "$(TORCH_PIN)" --extra-index-url $(TORCH_CPU_INDEX); \
	  $(VPY) -m pip install -q $(CPU_PINS) $(TEST_DEPS) "$(TORCH_PIN)"; \
	fi
	@echo "fusedformer: installing fusedformer (editable); with nvcc, fusedformer._C compiles now (1-4 minutes on 2 cores)"
	@t0=$$(date +%s); \
	$(VPY) -m pip install -v --no-build-isolation --no-deps -e . 2>&1 | tee $(VENV)/install.log | \
	  (grep --line-buffered -E '^ *(fusedformer:|\[[0-9]+/[0-9]+\] |!!!|error|ERROR)' || true); \
	echo "fusedformer: installed in $$(( $$(date +%s) - t0 )) s (full log: $(VENV)/install.log)"
	@touch $(STAMP)

# set up the venv only
venv: $(STAMP)

test: $(STAMP)
	$(VPY) -m pytest tests $(PYTEST_ARGS)

# The suite on the oldest torch / triton pair the README claims, in its own venv (.venv-oldest).
# torch's CPU build, as for .venv (PyPI's Linux torch 2.5.1 is a CUDA build, about 3 GB with its
# nvidia-* wheels); a torch 2.5.1 the venv already has, either build, is kept. triton 3.1's
# interpreter predates numpy 2's type promotion (its kernels compute garbage under numpy 2.2), and
# transformers 5 wants torch >= 2.6: both pinned below those.
OLDEST_VENV ?= .venv-oldest
OLDEST_TORCH := 2.5.1
OLDEST_PINS := triton==3.1.0 "numpy<2"
OLDEST_TEST_DEPS := $(filter-out "transformers>=4.50",$(TEST_DEPS)) "transformers>=4.50,<5"
test-oldest:
	@[ -x $(OLDEST_VENV)/bin/pip ] || $(PYTHON) -m venv --clear $(OLDEST_VENV)
	@$(OLDEST_VENV)/bin/python -c "import torch; assert torch.__version__.startswith('$(OLDEST_TORCH)')" 2>/dev/null || \
	  $(OLDEST_VENV)/bin/python -m pip install -q "torch==$(OLDEST_TORCH)$(CPU_BUILD)" 2>/dev/null || \
	  $(OLDEST_VENV)/bin/python -m pip install -q "torch==$(OLDEST_TORCH)$(CPU_BUILD)" --extra-index-url $(TORCH_CPU_INDEX)
	$(OLDEST_VENV)/bin/python -m pip install -q $(BUILD_DEPS) $(OLDEST_PINS) $(OLDEST_TEST_DEPS)
	FUSEDFORMER_BUILD_CUDA=0 $(OLDEST_VENV)/bin/python -m pip install -q --no-build-isolation --no-deps -e .
	$(OLDEST_VENV)/bin/python -m pytest tests $(PYTEST_ARGS)

demo: $(STAMP)
	$(VPY) -m fusedformer demo

# Every op against torch and the other libraries (quick preset; BENCH_ARGS="--full" for more).
BENCH_ARGS ?= --quick
bench: $(STAMP)
	@$(VPY) -c "import matplotlib" 2>/dev/null || $(VPY) -m pip install -q matplotlib
	$(VPY) -m fusedformer bench $(BENCH_ARGS) --out $(OUT)/bench

# The GPU check within GPU_CHECK_SECONDS (default 420): probe, build, parity, GPU tests, the headline
# benchmark, then the rest as time allows; summary.md, results.json, junit.xml, check.log under $(OUT).
gpu-check: $(STAMP)
	$(VPY) benchmarks/gpu_check.py --out $(OUT)

info: $(STAMP)
	$(VPY) -m fusedformer info

# ruff pinned: a new release's rules would fail a tree nobody changed
RUFF_PIN := ruff==0.17.6
lint: $(STAMP)
	$(VPY) -m pip install -q $(RUFF_PIN) && $(VPY) -m ruff check python kernels tests benchmarks setup.py

clean:
	rm -rf build $(VENV) $(OLDEST_VENV) python/fusedformer/_C*.so python/fusedformer/_build.json python/*.egg-info
