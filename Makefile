# Two commands do all the set-up on a fresh machine:
#   make demo   -> creates .venv, installs everything, runs the end-to-end main job into demo-out/
#   make test   -> creates .venv, installs everything, runs the test suite
#
# The torch build is chosen explicitly (a bare `torch==2.13.0` from PyPI is the CUDA build on Linux x86-64,
# with multi-GB CUDA wheels). TORCH_SPEC is the requirement, TORCH_INDEX the index added for it
# (`--extra-index-url`; empty: only the configured indexes). The local tag (+cpu, +cu128) makes pip refuse
# any other build, whichever index serves it.
#   make test                                  # CPU build (default): torch==2.13.0+cpu, PyTorch's CPU index
#   make install TORCH_BUILD=cu128             # CUDA 12.8 build: torch==2.13.0+cu128 from .../whl/cu128
#   make install TORCH_SPEC=torch==2.13.0 TORCH_INDEX=   # macOS, or whatever the configured index serves
# A `make -n -B install ...` dry run prints the torch line that would run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0
TORCH_BUILD ?= cpu
TORCH_SPEC ?= torch==$(TORCH_VERSION)+$(TORCH_BUILD)
TORCH_INDEX ?= https://download.pytorch.org/whl/$(TORCH_BUILD)

.PHONY: install demo test test-fast lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# the chosen torch build first (only torch from TORCH_INDEX, its dependencies from the configured index),
	# so the project's `torch>=2.4` is already met and pulls no other build
	$(BIN)/pip install --no-deps $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(BIN)/pip install "$(TORCH_SPEC)"
	$(BIN)/python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
	$(BIN)/pip install -e ".[all]"
	# the fused ET edge kernel for CPU training, built once here rather than at a first training step
	$(BIN)/scd build-kernel || echo "warning: the fused ET edge kernel did not build; CPU training uses the plain path"
	# QM9 CSVs for the data kit; the package's own dependencies are not needed to read them
	$(BIN)/pip install --no-deps qm9pack==1.0.3
	# pyxtal's CIF/POSCAR database (real crystals for the converter tests); only its data files are used
	$(BIN)/pip install --no-deps pyxtal==1.1.5
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/scd demo --out demo-out

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not cluster"

clean:
	rm -rf $(VENV) demo-out
